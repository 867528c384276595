"""`argonne plot RUN_DIR`: training and validation loss against tokens seen, and beside them the [eval] tasks'
metrics when the run has them, as RUN_DIR/loss.png."""

from __future__ import annotations

from pathlib import Path

from .run_folder import METRICS_FILE
from .run_folder import read_metrics as read_records


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's records in step order, one per step: a step's records merged (training figures, then the [eval]
    tasks' metrics, logged after the step's checkpoint)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a training run folder?)")
    by_step: dict[int, dict] = {}
    for record in read_records(path)[0]:
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def plot_run(run_dir: str | Path, output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Draw the run's losses (and task scores) into `output`, through the output policy: an existing `output` is
    refused unless `overwrite`. The default, RUN_DIR/loss.png, is the run's own plot and is always redrawn."""
    import matplotlib

    from .outputs import FILE, Output

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    target = Output(output, FILE, overwrite) if output else Output(run_dir / "loss.png", FILE, overwrite=True,
                                                                     option="the run's plot")
    records = read_metrics(run_dir)
    # Accuracies and other [0, 1] scores of the [eval] tasks (perplexities have scales of their own: metrics.jsonl
    # and TensorBoard have them).
    task_metrics = sorted(key for key in {k for record in records for k in record if k.startswith("eval/")}
                          if all(0 <= record[key] <= 1 for record in records if key in record))
    fig, axes = plt.subplots(1, 2 if task_metrics else 1, figsize=(14 if task_metrics else 8, 5), squeeze=False)
    ax = axes[0][0]
    trained = [r for r in records if "loss" in r]
    ax.plot([r["tokens"] for r in trained], [r["loss"] for r in trained], label="training loss")
    validation = [r for r in records if "val_loss" in r]
    if validation:
        ax.plot([r["tokens"] for r in validation], [r["val_loss"] for r in validation], "o-", label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{run_dir.name}: loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    if task_metrics:  # the [eval] tasks' metrics (accuracies, perplexities...) against tokens, beside the loss
        tasks_ax = axes[0][1]
        for key in task_metrics:
            points = [(r["tokens"], r[key]) for r in records if key in r]
            tasks_ax.plot(*zip(*points), "o-", label=key[len("eval/"):])
        tasks_ax.set_xlabel("tokens")
        tasks_ax.set_title("task scores (lm-evaluation-harness)")
        tasks_ax.set_ylim(0, 1)
        tasks_ax.grid(alpha=0.3)
        tasks_ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with target.staged() as staging:  # the format from the target's name: the staging's name has no suffix
            fig.savefig(staging, dpi=120, format=target.path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return target.path
