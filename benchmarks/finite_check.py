"""What the non-finite weight check costs (loading.check_finite_weights, run wherever a model is opened or written).

    python benchmarks/finite_check.py [--layers 2] [--repeats 3]

Builds weights of Argonne 2.0's shapes on the CPU — `--layers` decoder layers in float32, and the embedding with the
same layers in bf16 (the largest tensor, 151,665 x 4,080, is where the check's boolean temporary peaks) — and times,
each the best of `--repeats`:
  - check_finite_weights over the set (one `aminmax` per tensor);
  - the obvious alternative, `torch.isfinite(tensor).all()` per tensor (it writes a boolean per value first);
  - one plain read of every value (`tensor.sum()`), the floor any check that reads the weights pays.
Then extrapolates the check's rate to Argonne 2.0's 4,918,072,800 parameters in bf16 (9.8 GB).
"""

from __future__ import annotations

import argparse

import torch

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.loading import check_finite_weights
from checkpoint_io import best_of  # (benchmarks/ is on the path: this script's folder)

ARGONNE_2_PARAMETERS = 4_918_072_800


def weights_of_shape(layers: int, dtype: torch.dtype, embedding: bool) -> dict[str, torch.Tensor]:
    """Random tensors shaped as Argonne 2.0's first `layers` layers (and its embedding)."""
    with torch.device("meta"):
        model = ArgonneForCausalLM(ArgonneConfig.from_preset("argonne-2.0"))
    wanted = tuple(f"model.layers.{i}." for i in range(layers)) + (("model.embed_tokens.",) if embedding else ())
    return {name: torch.randn(t.shape, dtype=dtype) for name, t in model.state_dict().items()
            if name.startswith(wanted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype, embedding in ((torch.float32, False), (torch.bfloat16, True)):
        state = weights_of_shape(args.layers, dtype, embedding)
        parameters = sum(t.numel() for t in state.values())
        gigabytes = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
        check = best_of(args.repeats, lambda: check_finite_weights(state, "bench"))
        isfinite = best_of(args.repeats, lambda: [bool(torch.isfinite(t).all()) for t in state.values()])
        read = best_of(args.repeats, lambda: [t.sum() for t in state.values()])
        line = (f"{str(dtype).removeprefix('torch.'):>9}: {len(state)} tensors, {parameters:,} parameters, "
                f"{gigabytes:.2f} GB: check {check:.3f} s ({gigabytes / check:.2f} GB/s), "
                f"isfinite-all {isfinite:.3f} s, "
                f"plain read {read:.3f} s")
        if dtype == torch.bfloat16:
            scale = ARGONNE_2_PARAMETERS / parameters
            line += f"; Argonne 2.0 in bf16: check {check * scale:.2f} s, isfinite-all {isfinite * scale:.1f} s"
        print(line)
        del state


if __name__ == "__main__":
    main()
