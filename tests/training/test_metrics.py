"""What a run reports (training/metrics.py): MFU against a sound peak, skipped rows."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from argonne.run_config import load_run_config
from argonne.run_folder import read_metrics
from argonne.training.loop import train

from .conftest import streaming_run_args
from ..conftest import SAMPLE_SHARD


@pytest.mark.slow
def test_mfu_is_reported_only_against_a_sound_peak(tmp_path, tiny_run_args, capsys):
    """On a CPU the matmul rate measured at start is no sound peak (MFU above 1 was printed): MFU is left out,
    saying why, unless train.peak_tflops gives the peak."""
    for name, peak in (("measured", 0), ("given", 1)):
        train(load_run_config(None, tiny_run_args(tmp_path / name, "--train.steps=2", "--train.log_every=1",
                                                  "--train.tensorboard=false", "--data.val_windows=0",
                                                  f"--train.peak_tflops={peak}")))
    out = capsys.readouterr().out
    assert "MFU not reported: no sound peak on a CPU (set train.peak_tflops)" in out
    measured = read_metrics(tmp_path / "measured" / "run" / "metrics.jsonl")[0]
    given = read_metrics(tmp_path / "given" / "run" / "metrics.jsonl")[0]
    assert all("mfu" not in r for r in measured) and all(0 < r["mfu"] < 1 for r in given)


@pytest.mark.slow
def test_streamed_rows_skipped_are_counted_in_the_metrics(tmp_path):
    texts = pq.read_table(SAMPLE_SHARD, columns=["text"]).column("text").to_pylist()[:40]
    bad = tmp_path / "bad-rows.parquet"
    pq.write_table(pa.table({"text": [texts[0], None, *texts[1:]]}), bad, row_group_size=8)
    config = load_run_config(None, streaming_run_args(
        tmp_path, f"--data.inputs=[{str(bad)!r}]", "--data.on_error='skip'", "--data.val_fraction=0",
        "--data.val_windows=0", "--data.workers=0", "--train.steps=2", "--train.log_every=1",
        "--train.tensorboard=false"))
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["data_skipped_null_text"], r["data_skipped_invalid_utf8"], r["data_skipped_files"])
            for r in records] == [(1, 0, 0), (1, 0, 0)]
