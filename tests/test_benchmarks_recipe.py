"""benchmarks/recipe_ablation.py at a toy budget: the table and raw curves it writes, and its transformers Llama
reference as a faithful mirror of the original recipe: the same initial weights and first batch give the same step-1
loss, and the same optimizer, schedule and clipping keep the next steps' losses together."""

import importlib.util
import json

import pytest

from .conftest import REPO, write_sample_head


def load_ablation():
    spec = importlib.util.spec_from_file_location("recipe_ablation", REPO / "benchmarks" / "recipe_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown variant.*'?nope"):
        load_ablation().main(["--variants", "original", "nope", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown variant.*qk_nrom"):
        load_ablation().main(["--combo", "wsd,qk_nrom", "--workdir", str(tmp_path)])


def test_summary_arithmetic():
    ablation = load_ablation()
    assert ablation.tokens_to_reach([[10, 5.0], [20, 4.0], [30, 3.0]], 4.5) == 15  # between evaluations
    assert ablation.tokens_to_reach([[10, 5.0], [20, 4.0]], 3.0) is None
    assert ablation.verdict([-0.10, -0.11, -0.09]) == "better"
    assert ablation.verdict([0.05, 0.06, 0.04]) == "worse"
    assert ablation.verdict([-0.02, -0.04, 0.01]) == "no clear difference"
    assert ablation.verdict([-0.1]) == "untested (one seed)"


def test_toy_ablation(tmp_path, monkeypatch):
    import argonne.plot

    monkeypatch.setattr(argonne.plot, "plot_run", lambda *args, **kwargs: None)  # matplotlib: seconds per run
    ablation = load_ablation()
    output, raw = tmp_path / "ablation.md", tmp_path / "ablation.json"
    argv = ["--variants", "original", "wsd", "--seeds", "0", "--steps", "6", "--warmup", "2", "--seq-len", "32",
            "--micro-batch", "4", "--eval-every", "3", "--val-windows", "4",
            "--data", str(write_sample_head(tmp_path / "head.parquet", documents=50)), "--val-fraction", "0.1",
            "--workdir", str(tmp_path / "work"),
            "--output", str(output), "--json", str(raw)]
    assert ablation.main(argv) == 0

    results = json.loads(raw.read_text())
    runs, summary = results["runs"], results["summary"]
    assert list(runs) == ["original", "wsd", "llama reference"]
    for (run,) in runs.values():  # one seed
        assert len(run["step_losses"]) == 6
        assert [tokens for tokens, _ in run["val"]] == [3 * 4 * 32, 6 * 4 * 32]
        assert run["tokens_per_s"] > 0
    assert summary["original"]["fraction"] == 1.0  # the original reaches its own final loss at the end

    original, reference = runs["original"][0], runs["llama reference"][0]
    # Same weights, same batch: the same loss but for float32 rounding (chunked vs whole-logits cross-entropy).
    assert abs(reference["step_losses"][0] - original["step_losses"][0]) <= 1e-5
    # Same AdamW groups, schedule and clipping: later steps drift only by rounding, far below any recipe effect.
    for ours, theirs in zip(original["step_losses"], reference["step_losses"]):
        assert abs(ours - theirs) <= 1e-3, (original["step_losses"], reference["step_losses"])

    table = output.read_text()
    for row in ("| original |", "| wsd |", "| llama reference |"):
        assert table.count(row) == 2  # the summary and the curve tables
    assert "Reference: step-1 loss" in table and "**matches**" in table

    # A second call reuses the finished runs (same options) and trains only what is new: the combination.
    assert ablation.main([*argv, "--combo", "wsd,z_loss", "--no-reference"]) == 0
    results = json.loads(raw.read_text())
    assert list(results["runs"]) == ["original", "wsd", "best"]
    assert results["runs"]["original"] == runs["original"]
    assert results["variants"]["best"] == ablation.VARIANTS["wsd"] + ablation.VARIANTS["z_loss"]
    assert "Goal (best = wsd,z_loss" in output.read_text()
