"""The loader: windows over prepared shards, the global sample order, and exact resume on any number of ranks."""

import itertools

import numpy as np
import pytest
import torch

from argonne import load_tokenizer
from argonne.data import DataError, DocumentSettings
from argonne.data.batches import InMemoryTokens, StreamingBatches, TokenWindows, WindowBatches, WindowOrder, read_window
from argonne.data.prepare import PrepareSettings, PreparedTokens, prepare_dataset
from argonne.data.streaming import StreamingTokens, StreamPosition

from ..conftest import SAMPLE_TOKENIZER
from .test_prepare import write_parquet

SEQ = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SAMPLE_TOKENIZER)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import pyarrow.parquet as pq

    from ..conftest import SAMPLE_SHARD

    texts = pq.read_table(SAMPLE_SHARD, columns=["text"]).column("text").to_pylist()
    texts = [t[:1500] for t in texts[:90]]  # ~30k tokens: hundreds of windows, quick to tokenize
    folder = tmp_path_factory.mktemp("loader")
    return [write_parquet(folder / f"s{i}.parquet", texts[i * 30:(i + 1) * 30]) for i in range(3)]


@pytest.fixture(scope="module")
def prepared(shards, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(shards, tokenizer, out, PrepareSettings(seq_len=SEQ, workers=0), progress=False)
    return out


def take(batches, n):
    iterator = iter(batches)
    return [next(iterator) for _ in range(n)]


def test_prepared_tokens_read_across_shard_boundaries(prepared):
    tokens = PreparedTokens(prepared)
    whole = np.concatenate([np.fromfile(p, dtype=np.uint32) for p in sorted(prepared.glob("shards/*.train.bin"))])
    assert len(tokens) == len(whole) and len(tokens.arrays) == 3
    boundary = len(tokens.arrays[0])
    assert np.array_equal(tokens.read(boundary - 5, 10), whole[boundary - 5:boundary + 5])
    assert np.array_equal(read_window(tokens, 3, SEQ), whole[3 * SEQ:4 * SEQ + 1])


def test_window_order_is_a_seeded_permutation_per_epoch():
    order = WindowOrder(10, seed=3, shuffle=True)
    first, second = [order[i] for i in range(10)], [order[i] for i in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert [WindowOrder(10, seed=3, shuffle=True)[i] for i in range(10)] == first
    assert [WindowOrder(10, seed=3, shuffle=False)[i] for i in range(12)] == list(range(10)) + [0, 1]


def test_windows_overlap_by_one_token_so_every_token_is_a_target_once():
    tokens = InMemoryTokens(np.arange(100, dtype=np.uint32))
    batches = WindowBatches(TokenWindows(tokens, 10), micro_batch_size=3, shuffle=False)
    first = take(batches, 1)[0]
    assert first.dtype == torch.int64 and first.shape == (3, 11)
    assert first[0].tolist() == list(range(11)) and first[1, 0] == 10


def ranks_step(prepared, world, micro, steps, accum=1, state=None, workers=0):
    """The samples each optimizer step consumes, over all ranks (sorted rows), and the rank-0 state after."""
    loaders = [WindowBatches(TokenWindows(PreparedTokens(prepared), SEQ), micro, rank, world, seed=5, workers=workers)
               for rank in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    iterators = [iter(loader) for loader in loaders]
    consumed = []
    for _ in range(steps):
        rows = torch.cat([next(it) for it in iterators for _ in range(accum)])
        consumed.append(sorted(map(tuple, rows.tolist())))
    return consumed, loaders[0].state_dict()


def test_resume_continues_exactly(prepared):
    straight, _ = ranks_step(prepared, world=1, micro=4, steps=8)
    first, state = ranks_step(prepared, world=1, micro=4, steps=3)
    rest, _ = ranks_step(prepared, world=1, micro=4, steps=5, state=state)
    assert first + rest == straight
    assert state["samples"] == 12


def test_global_order_does_not_depend_on_the_rank_count(prepared):
    one_rank, _ = ranks_step(prepared, world=1, micro=8, steps=6)
    two_ranks, _ = ranks_step(prepared, world=2, micro=4, steps=6)
    accumulated, _ = ranks_step(prepared, world=2, micro=2, steps=6, accum=2)
    assert one_rank == two_ranks == accumulated
    all_samples = [row for step in two_ranks for row in step]
    assert len(set(all_samples)) == len(all_samples)  # ranks take disjoint samples


@pytest.mark.parametrize("before,after", [((2, 4), (1, 8)), ((1, 8), (2, 4))], ids=["2-to-1", "1-to-2"])
def test_resume_on_a_different_rank_count(prepared, before, after):
    straight, _ = ranks_step(prepared, world=1, micro=8, steps=7)
    first, state = ranks_step(prepared, world=before[0], micro=before[1], steps=3)
    rest, _ = ranks_step(prepared, world=after[0], micro=after[1], steps=4, state=state)
    assert first + rest == straight


def test_worker_processes_deliver_the_same_batches(prepared):
    in_process, _ = ranks_step(prepared, world=1, micro=4, steps=5)
    workers, state = ranks_step(prepared, world=1, micro=4, steps=5, workers=2)
    assert workers == in_process
    assert state["samples"] == 20  # counts batches handed out, not those prefetched


def test_resume_state_mismatches_are_errors(prepared):
    _, state = ranks_step(prepared, world=1, micro=4, steps=1)
    other_seed = WindowBatches(TokenWindows(PreparedTokens(prepared), SEQ), 4, seed=6)
    with pytest.raises(DataError, match="seed was 5, now 6"):
        other_seed.load_state_dict(state)
    odd = WindowBatches(TokenWindows(PreparedTokens(prepared), SEQ), 3, seed=5)
    with pytest.raises(DataError, match="not a multiple of world"):
        odd.load_state_dict(state)


@pytest.mark.slow
def test_tokenizer_mismatch_is_an_error(prepared, qwen_tokenizer_dir):
    with pytest.raises(DataError, match=r"was tokenized with .*8192 tokens.* but training uses .*151665"):
        PreparedTokens(prepared, tokenizer=load_tokenizer(qwen_tokenizer_dir))


def streaming_steps(shards, tokenizer, world, micro, steps, state=None):
    loaders = [StreamingBatches(StreamingTokens(shards, tokenizer, DocumentSettings()), SEQ, micro, rank, world)
               for rank in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    iterators = [iter(loader) for loader in loaders]
    consumed = [sorted(map(tuple, torch.cat([next(it) for it in iterators]).tolist())) for _ in range(steps)]
    return consumed, loaders[0].state_dict()


@pytest.mark.slow
def test_streaming_matches_prepared_order_and_resumes_on_other_rank_counts(shards, tokenizer, prepared):
    straight, _ = streaming_steps(shards, tokenizer, world=1, micro=8, steps=6)
    in_order = WindowBatches(TokenWindows(PreparedTokens(prepared), SEQ), 8, shuffle=False)
    assert straight == [sorted(map(tuple, b.tolist())) for b in take(in_order, 6)]
    first, state = streaming_steps(shards, tokenizer, world=2, micro=4, steps=2)
    assert state["position"]["file"] == 0 and state["samples"] == 16
    rest, _ = streaming_steps(shards, tokenizer, world=1, micro=8, steps=4, state=state)
    assert first + rest == straight


def test_streaming_starts_a_new_epoch_at_the_end(shards, tokenizer):
    stream = StreamingTokens(shards[:1], tokenizer, DocumentSettings())
    loader = StreamingBatches(stream, SEQ, 16)
    batches = list(itertools.islice(iter(loader), 40))
    assert loader.state_dict()["epoch"] >= 1
    per_epoch = next(i for i in range(1, 40) if torch.equal(batches[i], batches[0]))
    assert torch.equal(batches[per_epoch + 1], batches[1])


def streams_with_bad_input(folder, shards):
    """A corrupt file, then a file with a null row and an invalid UTF-8 row in its first row group, then an
    all-digits file that no document survives, then good shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    corrupt = folder / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    good = pq.read_table(shards[0]).column("text").to_pylist()
    texts = pa.array([good[0].encode(), None, b"bad \xff\xfe bytes", *(t.encode() for t in good[1:])],
                     type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts}), folder / "bad-rows.parquet", row_group_size=8)
    digits = write_parquet(folder / "digits.parquet", ["1" * 100] * 3)
    return [str(corrupt), str(folder / "bad-rows.parquet"), digits, *shards[1:]]


@pytest.mark.slow
def test_streaming_counts_what_it_skips_across_worker_processes(shards, tokenizer, tmp_path):
    inputs = streams_with_bad_input(tmp_path / "in", shards)
    stream = StreamingTokens(inputs, tokenizer, DocumentSettings(on_error="skip"), workers=1)
    assert stream.skipped() == {"null_text": 0, "invalid_utf8": 0, "unreadable": 0, "files": 0}
    list(stream.read_from(StreamPosition()))
    assert stream.skipped() == {"null_text": 1, "invalid_utf8": 1, "unreadable": 0, "files": 2}
    list(stream.read_from(StreamPosition()))  # a second epoch skips them again
    assert stream.skipped() == {"null_text": 2, "invalid_utf8": 2, "unreadable": 0, "files": 4}
    # The batches report the counts of their stream; by the first batch the bad rows and files were passed.
    batches = StreamingBatches(StreamingTokens(inputs, tokenizer, DocumentSettings(on_error="skip")), SEQ, 4)
    next(iter(batches))
    assert batches.skipped() == {"null_text": 1, "invalid_utf8": 1, "unreadable": 0, "files": 1}


@pytest.mark.slow
def test_a_bad_row_met_in_a_worker_process_is_the_streams_error(shards, tokenizer, tmp_path):
    """A row that stops the stream (on_error="fail") is found by a worker process: its error, naming the file and
    the row, is what reading the stream raises (tests/data/stream_share.py tokenizes in the sharing processes
    themselves; the error then reaches every one of them)."""
    bad_rows = streams_with_bad_input(tmp_path / "in", shards)[1]
    stream = StreamingTokens([bad_rows], tokenizer, DocumentSettings(), workers=1)
    with pytest.raises(DataError, match=r"bad-rows.parquet: row 1: 'text' is null"):
        list(stream.read_from(StreamPosition()))


# ------------------------------------------------------------------------------------------- what is read is checked


def damaged_copy(prepared, tmp_path, checksums: bool):
    """A copy of the prepared data whose first train shard has 4 KB of 0xFF every 64 KB (token id 2**32 - 1), its
    manifest with or without the shard checksums (a dataset prepared before they were recorded)."""
    import json
    import shutil

    copy = shutil.copytree(prepared, tmp_path / "damaged")
    shard = copy / "shards" / "00000.train.bin"
    with open(shard, "r+b") as f:
        for offset in range(0, shard.stat().st_size, 64 << 10):
            f.seek(offset)
            f.write(b"\xff" * 4096)
    if not checksums:
        manifest = json.loads((copy / "manifest.json").read_text())
        for entry in manifest["shards"]:
            entry.pop("train_sha256", None), entry.pop("val_sha256", None)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def prepared_config(directory, workers: int = 0):
    from argonne.run_config import load_run_config

    return load_run_config(None, [f"--data.prepared={str(directory)!r}", f"--data.seq_len={SEQ}", f"--data.workers={workers}",
                                  "--data.shuffle=false", "--data.val_windows=0"]).data


def test_a_changed_shard_is_refused_by_its_checksum_when_training_opens_the_data(prepared, tokenizer, tmp_path):
    from argonne.data.batches import pretraining_data

    damaged = damaged_copy(prepared, tmp_path, checksums=True)
    with pytest.raises(DataError, match=r"shards/00000\.train\.bin does not match its checksum"):
        pretraining_data(prepared_config(damaged), 4, 0, tokenizer)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_token_id_outside_the_vocabulary_names_the_shard_and_its_position(prepared, tokenizer, tmp_path, workers):
    """Without checksums (data prepared before they were recorded) the data opens with a note, and the damaged
    window is an error naming the shard and the token, not an IndexError inside the embedding; from a loader
    worker process too, as its message alone (not the worker's traceback)."""
    from argonne.data.batches import pretraining_data

    damaged = damaged_copy(prepared, tmp_path, checksums=False)
    with pytest.warns(UserWarning, match="prepared before shard checksums were recorded"):
        batches, _ = pretraining_data(prepared_config(damaged, workers), 4, 0, tokenizer)
    with pytest.raises(DataError, match=r"^\S*shards/00000\.train\.bin, token 0: token id 4,294,967,295 is outside "
                                        r"the vocabulary \(8,192 tokens\)") as error:
        next(iter(batches))
    assert "Traceback" not in str(error.value) and "\n" not in str(error.value)
