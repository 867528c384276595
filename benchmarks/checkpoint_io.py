"""What checkpoint checksums cost: save and load times of a training checkpoint with and without them.

    python benchmarks/checkpoint_io.py --preset small --folder /tmp/ckpt-bench [--cold]

Builds the preset in float32 with its AdamW state (the small preset: 494M parameters, a 5.9 GB checkpoint), then
times, each the best of `--repeats`:
  - dcp.save alone (what a save cost before checksums) and save_checkpoint (DCP + hashing + marker);
  - hashing alone (sha256 of every file, a few threads);
  - load_checkpoint without verification and verification alone.
`--cold` drops the page cache before each hashing and loading (root only), as after a restart on a node whose
memory does not hold the checkpoint; without it the files are read from memory, as right after a save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from argonne.files import hash_files


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def best_of(repeats: int, run, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--folder", default="/tmp/argonne-checkpoint-bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before reads (needs root)")
    args = parser.parse_args()

    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset(args.preset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():  # moments for every parameter, as after a training step
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = {"step": 1, "data": "{}"}
    before_reads = drop_page_cache if args.cold else None

    def plain_save():
        target = folder / "plain"
        shutil.rmtree(target, ignore_errors=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state, "train": state}, checkpoint_id=str(target))

    def verified_save():
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        save_checkpoint(folder / "checkpoints", 1, model, optimizer, state, is_main=True, run_id="bench")

    results = {"preset": args.preset, "cold_cache": args.cold, "threads": os.cpu_count()}
    results["dcp_save_s"] = best_of(args.repeats, plain_save)
    results["save_checkpoint_s"] = best_of(args.repeats, verified_save)
    path = folder / "checkpoints" / "step-00000001"
    names = sorted(p.name for p in path.iterdir() if p.name != "COMPLETE")
    results["checkpoint_gb"] = sum((path / n).stat().st_size for n in names) / 1e9
    results["hash_s"] = best_of(args.repeats, lambda: hash_files(path, names), before_reads)
    results["verify_s"] = best_of(args.repeats, lambda: verify_checkpoint(path), before_reads)
    results["load_s"] = best_of(
        args.repeats, lambda: load_checkpoint(path, model, optimizer, {"step": 0, "data": ""}, verify=False),
        before_reads)
    results["hash_gb_per_s"] = results["checkpoint_gb"] / results["hash_s"]
    results["save_overhead"] = results["save_checkpoint_s"] / results["dcp_save_s"] - 1
    results["load_overhead"] = results["verify_s"] / results["load_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
