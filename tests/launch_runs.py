"""Several runs in one torchrun launch: starting processes (torch, transformers, gloo) costs more than training the
test model, so the distributed tests launch once per process count and run everything in it, one run after the
other in one process group. `python launch_runs.py PLAN.json`; PLAN is a list of runs:

  {"name": ..., "argv": [...]}                 `argonne ...` (the CLI's own main), its exit status recorded
  {"name": ..., "argv": [...], "meta_init": true}   the same with the large-model path forced (built on meta)
  {"name": ..., "grads": ["tied", ...]}   tests/distributed_grads.py's checks

Rank 0 writes each run's exit status to PLAN.json.status.json; a run that raises records its error and the launch
goes on to the next. The runs draw no loss.png (rank 0 drawing it costs half a second a run while the other ranks
wait; no test of a launched run reads it, and tests/test_train.py checks the plot of a run).
"""

import json
import sys
import traceback
from pathlib import Path

import torch.distributed as dist


def run(entry: dict) -> int:
    import argonne.training.build
    from argonne_cli import main

    if "grads" in entry:
        import torch

        from argonne.parallel import init_distributed
        from distributed_grads import check

        topology = init_distributed(2, torch.device("cpu"))
        for head in entry["grads"]:
            check(topology, head)
        return 0
    forced = argonne.training.build.META_INIT_PARAMETERS
    if entry.get("meta_init"):
        argonne.training.build.META_INIT_PARAMETERS = 0
    try:
        return main(entry["argv"])
    finally:
        argonne.training.build.META_INIT_PARAMETERS = forced


def launch(plan_path: Path) -> None:
    import argonne.plot

    argonne.plot.plot_run = lambda run_dir, output=None, overwrite=False: Path(run_dir) / "loss.png"  # not drawn
    dist.init_process_group("gloo")
    status = {}
    for entry in json.loads(plan_path.read_text()):
        print(f"=== {entry['name']}", flush=True)
        try:
            status[entry["name"]] = run(entry)
        except Exception:  # noqa: BLE001 - recorded for the test to show; the other runs still run
            traceback.print_exc()
            status[entry["name"]] = "raised: " + traceback.format_exc(limit=-3)
        dist.barrier()
    if dist.get_rank() == 0:
        plan_path.with_name(plan_path.name + ".status.json").write_text(json.dumps(status))
    # Both ranks tear down together: a rank that exits while its peer is still working leaves gloo's threads
    # running into interpreter shutdown ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # streaming's tokenizer workers import this file too
    launch(Path(sys.argv[1]))
