"""Per-shape time of decode_kernels.gemv against cuBLAS (F.linear) for one-row matmuls, on a GPU.

    python benchmarks/gemv_kernels.py                  # the 0.5B (small preset) decode shapes, bf16
    python benchmarks/gemv_kernels.py --preset argonne-2.0

Each matmul is captured 200 times in a CUDA graph and the graph replayed, as the decode step runs, so the figure is
the kernel's time plus the gap between graphed kernels, not Python's launch cost. Prints microseconds per call and
the bandwidth of reading the weight once.
"""

import argparse

import torch
import torch.nn.functional as F

from argonne import ArgonneConfig
from argonne.inference.decode_kernels import gemv

CALLS = 200


def graphed_time_us(fn) -> float:
    for _ in range(3):  # autotuning and warm-up, outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * CALLS)


def decode_shapes(config: ArgonneConfig) -> list[tuple[str, int, int, bool, set[str]]]:
    """(name, rows, columns, SwiGLU, what GemvBlock fuses into it: "norm" before, "residual" after)."""
    d, hd = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    return [("q/k/v", qkv, d, False, {"norm"}), ("o_proj", d, config.num_attention_heads * hd, False, {"residual"}),
            ("gate/up, SwiGLU", 2 * config.intermediate_size, d, True, {"norm"}),
            ("down_proj", d, config.intermediate_size, False, {"residual"}),
            ("head", config.vocab_size, d, False, set())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    config = ArgonneConfig.from_preset(args.preset)
    print(f"{args.preset}, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds per call "
          f"(cuBLAS: the matmul, and SwiGLU's element-wise ops; fused: with the norm / residual add GemvBlock adds)")
    print(f"{'matmul':<17}{'rows x columns':>16}{'cuBLAS':>9}{'gemv':>8}{'GB/s':>7}{'fused':>8}")
    for name, rows, columns, swiglu, fused in decode_shapes(config):
        x = torch.randn(1, 1, columns, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16)
        extra = {}
        if "norm" in fused:
            extra.update(norm_weight=torch.ones(columns, device="cuda", dtype=torch.bfloat16), eps=1e-6)
        if "residual" in fused:
            extra.update(residual=torch.randn(1, 1, rows, device="cuda", dtype=torch.bfloat16))

        def cublas():
            y = F.linear(x, weight)
            if swiglu:
                gate, up = y.chunk(2, dim=-1)
                y = F.silu(gate) * up
            return y

        theirs, ours = graphed_time_us(cublas), graphed_time_us(lambda: gemv(x, weight, None, swiglu))
        with_fusion = graphed_time_us(lambda: gemv(x, weight, None, swiglu, **extra)) if extra else ours
        print(f"{name:<17}{f'{rows} x {columns}':>16}{theirs:>9.2f}{ours:>8.2f}"
              f"{weight.numel() * 2 / ours / 1e3:>7,.0f}{with_fusion:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
