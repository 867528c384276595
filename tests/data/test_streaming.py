"""argonne/data/streaming: the token stream from parquet equals prepare's, with any settings, and its tokenization is
shared across processes."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from argonne import load_tokenizer
from argonne.run_config import load_run_config
from argonne.data import DataError, DocumentSettings
from argonne.data.batches import pretraining_data, read_window
from argonne.data.prepare import PreparedTokens, prepare_dataset
from argonne.data.streaming import StreamingTokens, StreamPosition, held_out_tokens, iter_stream_windows

from ..conftest import SAMPLE_TOKENIZER, failure, run_process, torchrun
from .test_prepare import settings, write_parquet

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SAMPLE_TOKENIZER)


@pytest.fixture
def keyed_shards(tmp_path, sample_texts):
    """Three shards whose ids are in a column named `key` (an `id` column holds decoys), with some mostly-digit
    and short texts for the filters to act on."""
    texts, ids = sample_texts
    texts = texts[:54] + ["12345 " * 20, "x1 " * 40, "tiny text", "A normal sentence with words in it, " * 3]
    folder = tmp_path / "keyed"
    folder.mkdir()
    return [write_parquet(folder / f"part-{i}.parquet", texts[i * 20:(i + 1) * 20], row_group_size=6,
                          key=[f"doc-{i}-{j}" for j in range(len(texts[i * 20:(i + 1) * 20]))],
                          id=["same"] * len(texts[i * 20:(i + 1) * 20]))
            for i in range(3)]


@pytest.fixture(scope="module")
def sample_texts():
    from .test_prepare import SAMPLE_SHARD, pq

    table = pq.read_table(SAMPLE_SHARD, columns=["text", "id"])
    return table.column("text").to_pylist()[:60], table.column("id").to_pylist()[:60]


NON_DEFAULT = dict(id_column="key", val_fraction=0.3, ratio_rules_min_chars=20, max_digit_fraction=0.2,
                   min_letter_space_fraction=0.8, min_tokens=30)


@pytest.mark.slow
def test_streaming_yields_the_prepared_token_stream(keyed_shards, tokenizer, tmp_path):
    manifest = prepare_dataset(keyed_shards, tokenizer, tmp_path / "out", settings(**NON_DEFAULT), progress=False)
    # The settings acted: documents were dropped by every filter, and held out by the `key` column.
    for reason in ("too_many_digits", "too_few_letters", "too_few_tokens", "validation"):
        assert manifest["documents"][reason] > 0, reason
    prepared = PreparedTokens(tmp_path / "out", tokenizer=tokenizer)
    stream = StreamingTokens(keyed_shards, tokenizer, DocumentSettings(**NON_DEFAULT))
    windows = list(iter_stream_windows(stream, StreamPosition(), 64))
    assert len(windows) == (len(prepared) - 1) // 64 > 10
    for k, (window, _) in enumerate(windows):
        assert np.array_equal(window, read_window(prepared, k, 64)), k
    held_out = PreparedTokens(tmp_path / "out", "val").read(0, manifest["val_tokens"])
    assert np.array_equal(held_out_tokens(stream, 10**9), held_out)
    # Resuming from any window's recorded position continues with exactly that window.
    for k in (1, 17, len(windows) // 2, len(windows) - 1):
        resumed = iter_stream_windows(stream, windows[k][1], 64)
        assert all(np.array_equal(next(resumed)[0], windows[j][0]) for j in range(k, min(k + 3, len(windows))))


@pytest.mark.slow
def test_a_run_config_streams_with_its_document_settings(keyed_shards, tokenizer, tmp_path):
    prepare_dataset(keyed_shards, tokenizer, tmp_path / "out", settings(**NON_DEFAULT), progress=False)
    overrides = [f"--data.{name}={value!r}" for name, value in NON_DEFAULT.items()]
    config = load_run_config(None, [f"--data.inputs={[str(s) for s in keyed_shards]!r}", "--data.seq_len=64",
                                    "--data.val_windows=2", *overrides])
    batches, validation = pretraining_data(config.data, 4, 0, tokenizer)
    prepared = PreparedTokens(tmp_path / "out")
    first = next(iter(batches))
    assert all(np.array_equal(first[i].numpy(), read_window(prepared, i, 64)) for i in range(4))
    assert np.array_equal(validation[0][0].numpy(), read_window(PreparedTokens(tmp_path / "out", "val"), 0, 64))


@pytest.mark.slow
def test_prepared_data_refuses_other_document_settings(keyed_shards, tokenizer, tmp_path):
    prepare_dataset(keyed_shards, tokenizer, tmp_path / "out", settings(**NON_DEFAULT), progress=False)

    def data(*overrides):
        return load_run_config(None, [f"--data.prepared={str(tmp_path / 'out')!r}", "--data.seq_len=64",
                                      *overrides]).data

    pretraining_data(data(), 4, 0, tokenizer)  # defaults: the prepared data keeps its own settings
    pretraining_data(data("--data.min_tokens=30"), 4, 0, tokenizer)  # the same as prepared
    with pytest.raises(DataError, match=r"data.text_column = 'body' \(prepared with 'text'\); data.min_tokens = 5 "
                                        r"\(prepared with 30\)\. Prepare it again"):
        pretraining_data(data("--data.min_tokens=5", "--data.text_column='body'"), 4, 0, tokenizer)


def run_shared(out: Path, nproc: int, **cases: tuple[DocumentSettings, list]) -> dict[str, list[dict]]:
    """Each case read by `nproc` processes sharing the tokenization, in one launch: what every rank saw of it."""
    plan = [{"name": name, "settings": asdict(settings_), "files": list(map(str, files))}
            for name, (settings_, files) in cases.items()]
    result = run_process(torchrun(nproc, str(HERE / "stream_share.py"), str(out), json.dumps(plan)))
    assert result.returncode == 0, failure(result.stdout, result.stderr)
    return {name: [json.loads((out / name / f"rank{rank}.json").read_text()) for rank in range(nproc)]
            for name in cases}


@pytest.mark.slow
def test_shared_tokenization_gives_every_process_the_whole_stream(keyed_shards, tokenizer, tmp_path):
    documents = DocumentSettings(**NON_DEFAULT)
    stream = StreamingTokens(keyed_shards, tokenizer, documents)
    alone = list(iter_stream_windows(stream, StreamPosition(), 16))
    row_groups = stream.tokenized["row_groups"]
    bad = write_parquet(tmp_path / "bad.parquet", ["A good first document with enough words in it. " * 3] * 7 + [None])
    launched = run_shared(tmp_path / "shared", 2, good=(documents, keyed_shards),
                          bad=(DocumentSettings(), [*keyed_shards[:1], bad]))
    ranks = launched["good"]
    for rank in ranks:
        assert rank["windows"] == [w.tolist() for w, _ in alone]
        assert rank["positions"] == [[p.file, p.row, p.offset] for _, p in alone]
        assert rank["held_out"] == held_out_tokens(stream, 200).tolist()
    # Each process tokenized its half of the row groups (the held-out pass reads from the start again).
    counts = [rank["tokenized"]["row_groups"] for rank in ranks]
    assert abs(counts[0] - counts[1]) <= 2 and sum(counts) < 2 * row_groups + 4, (counts, row_groups)
    # A bad row that one process meets stops every process with its message (none waits forever for it).
    assert all("bad.parquet: row 7" in rank["error"] for rank in launched["bad"]), launched["bad"]
