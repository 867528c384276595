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
from argonne.decode_kernels import gemv

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


def decode_shapes(config: ArgonneConfig) -> list[tuple[str, int, int, bool]]:
    d, hd = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    return [("q/k/v", qkv, d, False), ("o_proj", d, config.num_attention_heads * hd, False),
            ("gate/up + SwiGLU", 2 * config.intermediate_size, d, True), ("down_proj", d, config.intermediate_size, False),
            ("head", config.vocab_size, d, False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    config = ArgonneConfig.from_preset(args.preset)
    print(f"{args.preset}, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'matmul':<18}{'rows x columns':>16}{'cuBLAS us':>11}{'gemv us':>9}{'gemv GB/s':>11}")
    for name, rows, columns, swiglu in decode_shapes(config):
        x = torch.randn(1, 1, columns, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16)

        def cublas():
            y = F.linear(x, weight)
            if swiglu:
                gate, up = y.chunk(2, dim=-1)
                y = F.silu(gate) * up
            return y

        theirs, ours = graphed_time_us(cublas), graphed_time_us(lambda: gemv(x, weight, None, swiglu))
        print(f"{name:<18}{f'{rows} x {columns}':>16}{theirs:>11.2f}{ours:>9.2f}"
              f"{weight.numel() * 2 / ours / 1e3:>11,.0f}", flush=True)


if __name__ == "__main__":
    main()
