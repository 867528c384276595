"""What the command line and the package both need to know, with the standard library only: `argonne_cli` builds
the parser from it without importing torch (so `--help` is instant), and the package imports it too, so each name
is written once."""

# One-token decoding: torch's kernels (cuBLAS, SDPA) or our Triton kernels for GPUs (argonne.inference.decode_kernels;
# gemv: the matmuls; gemv+attention: and the attention). On GPUs the default is CUDA_DEFAULT_KERNELS when Triton is
# installed; elsewhere "torch".
DECODE_KERNELS = ("torch", "gemv", "gemv+attention")
CUDA_DEFAULT_KERNELS = "gemv"
