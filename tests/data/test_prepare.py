"""argonne/data/parquet, documents and prepare: filters, accounting, bad input, worker independence, resume, streaming, hub paths."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from argonne import load_tokenizer
from argonne_cli import main
from argonne.data import DataError, DocumentSettings
from argonne.data.documents import _encode, _init_worker, char_filter_reasons, is_held_out
from argonne.data.parquet import iter_texts, resolve_parquet_files
from argonne.data.prepare import PrepareSettings, PreparedTokens, load_manifest, prepare_dataset
from argonne.data.streaming import StreamingTokens, StreamPosition

from ..conftest import SAMPLE_SHARD, SAMPLE_TOKENIZER

GOOD = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest again."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SAMPLE_TOKENIZER)


@pytest.fixture(scope="module")
def sample_texts():
    table = pq.read_table(SAMPLE_SHARD, columns=["text", "id"])
    return table.column("text").to_pylist()[:60], table.column("id").to_pylist()[:60]


def write_parquet(path, texts, ids=None, row_group_size=8, **columns):
    data = {"text": texts, **columns}
    if ids is not None:
        data["id"] = ids
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def three_shards(tmp_path, sample_texts):
    texts, ids = sample_texts
    folder = tmp_path / "in"
    folder.mkdir()
    return [write_parquet(folder / f"part-{i}.parquet", texts[i * 20:(i + 1) * 20], ids[i * 20:(i + 1) * 20])
            for i in range(3)]


def settings(workers=0, **documents):
    return PrepareSettings(seq_len=64, workers=workers, documents=DocumentSettings(**documents))


# ------------------------------------------------------------------------------------------- sources and filters


def test_inputs_resolve_in_natural_order(tmp_path):
    for name in ("shard-10.parquet", "shard-2.parquet", "shard-1.parquet"):
        write_parquet(tmp_path / name, [GOOD])
    names = [p.rsplit("/", 1)[1] for p in resolve_parquet_files([tmp_path])]
    assert names == ["shard-1.parquet", "shard-2.parquet", "shard-10.parquet"]
    assert resolve_parquet_files([str(tmp_path / "shard-1*.parquet")])[-1].endswith("shard-10.parquet")
    with pytest.raises(DataError, match="nothing.parquet: no such file"):
        resolve_parquet_files([tmp_path / "nothing.parquet"])


@pytest.mark.parametrize(
    "text,reason",
    [
        ("1234567890" * 5 + "abcdefghij" * 1, "too_many_digits"),   # 50 digits of 60 characters
        ("12345" * 10, None),                                       # 50 characters: the ratio rules do not apply
        ("12345" * 10 + "6", "too_many_digits"),                    # 51 characters, all digits
        ("1234567890" * 5 + "abcdefghij" * 5, None),                # exactly 0.5 digits is allowed
        ("!@#$%^&*()" * 8 + "abcdefghij" * 2, "too_few_letters"),   # 0.2 letters
        ("!@#$%^&*()" * 7 + "abcde fghi" * 3, None),                # exactly 0.3 letters and spaces
        ("٣٤٥٦٧٨٩٠١٢" * 6, "too_many_digits"),                      # Unicode digits count as digits
        ("Ünïcödé letters count as letters too, très bien! " * 2, None),
    ],
)
def test_character_rules(text, reason):
    assert char_filter_reasons([text], DocumentSettings()) == [reason]
    assert char_filter_reasons([GOOD, text, ""], DocumentSettings()) == [None, reason, None]


def test_every_document_is_accounted_for(tmp_path, tokenizer):
    texts = [GOOD, "9" * 80, "#" * 80, "Too short.", "", None, GOOD + " Again."]
    path = write_parquet(tmp_path / "mixed.parquet", texts)
    manifest = prepare_dataset([path], tokenizer, tmp_path / "out", settings(on_error="skip"), progress=False)
    docs = manifest["documents"]
    assert docs == {"kept": 2, "validation": 0, "too_many_digits": 1, "too_few_letters": 1, "too_few_tokens": 1,
                    "null_text": 1, "invalid_utf8": 0, "empty_text": 1, "unreadable": 0}
    assert sum(docs.values()) == len(texts)
    # Tokens: exactly the kept documents' tokens plus one boundary each.
    expected = sum(len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in (GOOD, GOOD + " Again."))
    assert manifest["train_tokens"] == manifest["stats"]["kept"]["tokens"] == expected
    assert manifest["stats"]["too_few_tokens"]["tokens"] == len(tokenizer("Too short.").input_ids)
    stream = PreparedTokens(tmp_path / "out").read(0, expected)
    assert stream[-1] == 0 and (stream == 0).sum() == 2  # <|endoftext|> after each document


def test_filter_thresholds_are_configurable(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "a.parquet", [GOOD, "Short one here."])
    strict = settings(min_tokens=100, on_error="skip")
    with pytest.raises(DataError, match="no document left after filtering"):
        prepare_dataset([path], tokenizer, tmp_path / "strict", settings(min_tokens=100),
                        progress=False)
    manifest = prepare_dataset([path, write_parquet(tmp_path / "b.parquet", [GOOD * 30])], tokenizer,
                               tmp_path / "skip", strict, progress=False)
    assert manifest["documents"]["too_few_tokens"] == 2 and manifest["documents"]["kept"] == 1
    assert manifest["skipped_files"][0]["path"].endswith("a.parquet")


@pytest.mark.slow
def test_worker_tokenization_equals_the_transformers_tokenizer(sample_texts, qwen_tokenizer_dir):
    texts = sample_texts[0][:10]
    for folder in (SAMPLE_TOKENIZER, qwen_tokenizer_dir):
        tok = load_tokenizer(folder)
        _init_worker(tok.backend_tokenizer.to_str(), 0)
        assert _encode(texts) == tok(texts, add_special_tokens=False).input_ids


# ------------------------------------------------------------------------------------------- bad input


def bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    invalid = pa.array([GOOD.encode(), b"bad \xff\xfe bytes"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": invalid}), tmp_path / "utf8.parquet")
    return {
        "corrupt": (str(corrupt), r"corrupt.parquet: not a readable parquet file"),
        "missing column": (write_parquet(tmp_path / "nocol.parquet", [GOOD], content=[GOOD]).replace(
            "nocol", "nocol"), None),
        "null": (write_parquet(tmp_path / "null.parquet", [GOOD, None]), r"null.parquet: row 1: 'text' is null"),
        "non-string": (None, None),
        "empty": (write_parquet(tmp_path / "empty.parquet", pa.array([], type=pa.string())),
                  r"empty.parquet: the file has no rows"),
        "all filtered": (write_parquet(tmp_path / "filtered.parquet", ["1" * 100, "2" * 100]),
                         r"filtered.parquet: no document left after filtering \(too_many_digits: 2\)"),
        "utf8": (str(tmp_path / "utf8.parquet"), r"utf8.parquet: row 1: 'text' is not valid UTF-8"),
    }


@pytest.mark.parametrize("case", ["corrupt", "missing column", "null", "non-string", "empty", "all filtered", "utf8"])
def test_bad_input_fails_naming_the_file_or_skips_and_counts(tmp_path, tokenizer, case):
    cases = bad_inputs(tmp_path)
    if case == "missing column":
        path = str(tmp_path / "nocol.parquet")
        pq.write_table(pa.table({"content": [GOOD]}), path)
        message = r"nocol.parquet: no column 'text'; columns are \['content'\]"
    elif case == "non-string":
        path = str(tmp_path / "ints.parquet")
        pq.write_table(pa.table({"text": [1, 2]}), path)
        message = r"ints.parquet: column 'text' holds int64, not text"
    else:
        path, message = cases[case]
    good = write_parquet(tmp_path / "good.parquet", [GOOD, GOOD + " Two."])
    with pytest.raises(DataError, match=message):
        prepare_dataset([good, path], tokenizer, tmp_path / "fail", settings(), progress=False)
    manifest = prepare_dataset([good, path], tokenizer, tmp_path / "skip", settings(on_error="skip"), progress=False)
    assert manifest["documents"]["kept"] >= 2
    row_level = {"null": "null_text", "utf8": "invalid_utf8"}
    if case in row_level:
        assert manifest["documents"][row_level[case]] == 1
    else:
        assert [s["path"] for s in manifest["skipped_files"]] == [path]
    # Streaming reports the same problems.
    stream = StreamingTokens([good, path], tokenizer, DocumentSettings())
    with pytest.raises(DataError, match=message):
        list(stream.read_from(StreamPosition()))


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_failed_prepare_leaves_no_temporary_files(tmp_path, tokenizer, on_error):
    # The bad row is in the second row group, so the first one's tokens are already written when the file fails;
    # the all-digits file fails (or is skipped) only after all its rows were read.
    bad_row = write_parquet(tmp_path / "bad-row.parquet", [GOOD] * 8 + [None])
    filtered = write_parquet(tmp_path / "filtered.parquet", ["1" * 100] * 9)
    good = write_parquet(tmp_path / "good.parquet", [GOOD, GOOD + " Two."])
    out = tmp_path / "out"
    if on_error == "fail":
        for bad in (bad_row, filtered):
            with pytest.raises(DataError):
                prepare_dataset([good, bad], tokenizer, out, settings(), progress=False)
            assert not list(out.rglob("*.tmp"))
    else:
        manifest = prepare_dataset([good, filtered], tokenizer, out, settings(on_error="skip"), progress=False)
        assert [s["path"] for s in manifest["skipped_files"]] == [filtered]
        assert not list(out.rglob("*.tmp"))


def damaged_pages(path, texts, group: int = 1):
    """A zstd parquet file whose footer is intact but whose row group `group` has 4 KB of 0xFF in its data pages."""
    pq.write_table(pa.table({"text": texts}), path, row_group_size=8, compression="zstd")
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    with open(path, "r+b") as f:  # inside the column chunk: from a third of it, a third of it long (at most 4 KB)
        f.seek(start + column.total_compressed_size // 3)
        f.write(b"\xff" * min(4096, column.total_compressed_size // 3))
    return str(path)


@pytest.mark.slow
def test_damaged_pages_are_an_error_naming_the_row_group_or_a_counted_skip(tmp_path, tokenizer, sample_texts):
    texts = sample_texts[0][:24]
    damaged = damaged_pages(tmp_path / "damaged.parquet", texts)
    with pytest.raises(DataError, match=r"damaged\.parquet: row group 1 \(8 rows\) cannot be read"):
        prepare_dataset([damaged], tokenizer, tmp_path / "fail", settings(), progress=False)
    with pytest.raises(DataError, match="row group 1"):
        list(iter_texts([damaged]))
    manifest = prepare_dataset([damaged], tokenizer, tmp_path / "skip", settings(on_error="skip"), progress=False)
    assert manifest["stats"]["unreadable"]["documents"] == 8
    clean = write_parquet(tmp_path / "clean.parquet", texts[:8] + texts[16:])
    expected = prepare_dataset([clean], tokenizer, tmp_path / "clean", settings(), progress=False)
    assert manifest["train_tokens"] == expected["train_tokens"]  # the other row groups, whole


def dictionary_encoded(path, texts, ids):
    """A parquet file whose text column is dictionary-encoded, as pandas writes its category dtype."""
    text = pa.array(texts, type=pa.string()).dictionary_encode()
    assert text.type == pa.dictionary(pa.int32(), pa.string())
    pq.write_table(pa.table({"text": text, "id": ids}), path, row_group_size=8)
    assert pq.ParquetFile(path).schema_arrow.field("text").type == text.type
    return str(path)


@pytest.mark.slow
def test_a_dictionary_encoded_text_column_is_text(tmp_path, tokenizer, sample_texts):
    texts, ids = sample_texts[0][:30], sample_texts[1][:30]
    texts[3] = texts[10]  # a repeated value, which the dictionary stores once
    plain = write_parquet(tmp_path / "plain.parquet", texts, ids)
    encoded = dictionary_encoded(tmp_path / "encoded.parquet", texts, ids)
    expected = prepare_dataset([plain], tokenizer, tmp_path / "plain", settings(val_fraction=0.2), progress=False)
    manifest = prepare_dataset([encoded], tokenizer, tmp_path / "encoded", settings(val_fraction=0.2),
                               progress=False)
    assert manifest["stats"] == expected["stats"]
    for split in ("train", "val"):
        assert PreparedTokens(tmp_path / "encoded", split).read(0, manifest[f"{split}_tokens"]).tolist() == \
            PreparedTokens(tmp_path / "plain", split).read(0, expected[f"{split}_tokens"]).tolist()
    streamed = StreamingTokens([encoded], tokenizer, DocumentSettings(val_fraction=0.2))
    tokens = np.concatenate([chunk for chunk, _ in streamed.read_from(StreamPosition())])
    assert tokens.tolist() == PreparedTokens(tmp_path / "plain").read(0, expected["train_tokens"]).tolist()
    assert list(iter_texts([encoded])) == list(iter_texts([plain])) == [t for t in texts if t]


# ------------------------------------------------------------------------------------------- prepare


@pytest.mark.slow
def test_output_is_byte_identical_whatever_the_worker_count(three_shards, tokenizer, tmp_path):
    outputs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        prepare_dataset(three_shards, tokenizer, out, settings(workers, val_fraction=0.2), progress=False)
        outputs.append(out)
    files = sorted(p.relative_to(outputs[0]) for p in outputs[0].rglob("*") if p.is_file())
    assert len(files) == 3 + 3 * 3  # manifest.json, prepare.json, .prepare.lock; per shard two token files, a record
    files = [rel for rel in files if rel.name != ".prepare.lock"]  # (its owner record: the process and time)
    for rel in files:
        assert (outputs[0] / rel).read_bytes() == (outputs[1] / rel).read_bytes(), rel


@pytest.mark.slow
def test_interrupted_prepare_resumes_without_redoing_finished_shards(three_shards, tokenizer, tmp_path,
                                                                     monkeypatch):
    import argonne.data.documents as data

    clean = prepare_dataset(three_shards, tokenizer, tmp_path / "clean", settings(), progress=False)
    real_tokenize, calls = data.tokenize_row_group, []

    def interrupted(path, group, tokenize_settings):
        calls.append(path)
        if path == three_shards[2] and group == 1:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third shard, after part of it was written
        return real_tokenize(path, group, tokenize_settings)

    monkeypatch.setattr(data, "tokenize_row_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(three_shards, tokenizer, tmp_path / "out", settings(), progress=False)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not (out / "shards" / "00002.json").exists()
    assert not list(out.rglob("*.tmp"))  # the partial shard is removed, never left or taken as done
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("0000[01].*")}
    calls.clear()
    monkeypatch.setattr(data, "tokenize_row_group", lambda path, *rest: calls.append(path) or real_tokenize(path, *rest))
    resumed = prepare_dataset(three_shards, tokenizer, out, settings(), progress=False)
    assert set(calls) == {three_shards[2]}  # only the unfinished shard is tokenized again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("0000[01].*")} == finished
    assert resumed == clean
    for path in (tmp_path / "clean").rglob("*.bin"):
        assert (out / path.relative_to(tmp_path / "clean")).read_bytes() == path.read_bytes()

    # A finished shard damaged since (cut short; overwritten at the same size) is prepared again, not trusted.
    shard = out / "shards" / "00000.train.bin"
    with open(shard, "r+b") as f:
        f.truncate(1000)
    with open(out / "shards" / "00001.val.bin", "r+b") as f:
        f.write(b"\xff" * 8)
    calls.clear()
    assert prepare_dataset(three_shards, tokenizer, out, settings(), progress=False) == clean
    assert set(calls) == {three_shards[0], three_shards[1]}
    for path in (tmp_path / "clean").rglob("*.bin"):
        assert (out / path.relative_to(tmp_path / "clean")).read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_manifest_records_tokenizer_sources_and_counts(three_shards, tokenizer, tmp_path):
    manifest = prepare_dataset(three_shards, tokenizer, tmp_path / "out", settings(val_fraction=0.25),
                               progress=False)
    assert manifest == load_manifest(tmp_path / "out")
    assert manifest["tokenizer"]["vocab_size"] == 8192 and len(manifest["tokenizer"]["vocab_sha256"]) == 64
    assert [s["path"] for s in manifest["sources"]] == three_shards
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in manifest["sources"])
    assert manifest["documents"]["kept"] + manifest["documents"]["validation"] == 60
    assert manifest["train_tokens"] == sum(s["train_tokens"] for s in manifest["shards"])
    assert all(len(s["train_sha256"]) == 64 and len(s["val_sha256"]) == 64 for s in manifest["shards"])


@pytest.mark.parametrize("content, problem", [
    ('{"format": "argonne-tokens-v1", "dty', "not JSON, or cut off: Unterminated string"),
    ("{}", "format is missing; dtype is missing"),
    ('{"format": "argonne-tokens-v1", "dtype": "uint32", "seq_len": 64, "tokenizer": {}, "boundary_token_id": 0, '
     '"sources": [], "skipped_files": [], "train_tokens": 1, "val_tokens": 0, "stats": {}}', "shards is missing"),
    ('{"format": "argonne-tokens-v1", "dtype": "uint32", "seq_len": 64, "tokenizer": {"name": "x", "vocab_size": '
     '"8", "vocab_sha256": "y"}, "boundary_token_id": 0, "sources": [], "skipped_files": [], "train_tokens": 1, '
     '"val_tokens": 0, "stats": {}, "shards": [{"index": 0, "train_file": "../x.bin", "val_file": "shards/v.bin", '
     '"train_tokens": 1, "val_tokens": 0}]}',
     r"tokenizer.vocab_size is str, not int; shards\[0\].train_file '../x.bin' is not a file of the dataset's "
     r"shards/ folder"),
    ("[]", "a JSON array, not a JSON object"),
], ids=["truncated", "empty-object", "no-shards", "mistyped-fields", "array"])
def test_a_bad_manifest_is_an_error_naming_the_file_and_the_field(tmp_path, content, problem):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(DataError, match=rf"{tmp_path}/manifest\.json: not a valid prepared-data manifest.*{problem}"):
        load_manifest(tmp_path)


def test_validation_split_is_by_document_id_hash(sample_texts):
    _, ids = sample_texts
    held = [i for i in ids if is_held_out(i, 0.3)]
    assert 5 < len(held) < 35
    assert held == [i for i in ids if is_held_out(i, 0.3)]  # deterministic
    assert set(i for i in ids if is_held_out(i, 0.1)) <= set(held)  # nested fractions
    assert not any(is_held_out(i, 0.0) for i in ids)


@pytest.mark.slow
def test_inspect_prints_manifest_and_decodes_a_window(three_shards, tokenizer, tmp_path, capsys):
    prepare_dataset(three_shards, tokenizer, tmp_path / "out", settings(), progress=False)
    assert main(["data", "inspect", str(tmp_path / "out"), "--show-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "8,192 tokens" in out and "kept" in out and "--- window 0" in out and "part-0.parquet" in out
    assert "not verified (--verify reads every shard)" in out
    # A shard changed at its size: sizes pass, --verify names it; a token outside the vocabulary is named anyway.
    shard = tmp_path / "out" / "shards" / "00001.train.bin"
    with open(shard, "r+b") as f:
        f.write(b"\x01\x00\x00\x00")
    assert main(["data", "inspect", str(tmp_path / "out")]) == 0
    assert main(["data", "inspect", str(tmp_path / "out"), "--verify"]) == 2
    assert "00001.train.bin does not match its checksum" in capsys.readouterr().err
    with open(tmp_path / "out" / "shards" / "00000.train.bin", "r+b") as f:
        f.write(b"\xff" * 8)
    assert main(["data", "inspect", str(tmp_path / "out")]) == 2
    assert "00000.train.bin, token 0: token id 4,294,967,295 is outside the vocabulary" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_command_line(three_shards, tmp_path, capsys):
    code = main(["data", "prepare", *three_shards, "--tokenizer", str(SAMPLE_TOKENIZER), "--output",
                 str(tmp_path / "cli"), "--workers", "0", "--val-fraction", "0.1", "--seq-len", "128"])
    assert code == 0
    assert load_manifest(tmp_path / "cli")["seq_len"] == 128
    assert main(["data", "prepare", str(tmp_path / "missing.parquet"), "--tokenizer", str(SAMPLE_TOKENIZER),
                 "--output", str(tmp_path / "x")]) == 2
    assert "missing.parquet: no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- hub and tokenizer


@pytest.mark.slow
def test_hub_paths_go_through_the_hub_filesystem(tmp_path, tokenizer, monkeypatch, three_shards):
    import fsspec

    import argonne.data.parquet as data

    class FakeHub:
        """Maps hf://datasets/org/name/... onto the local input folder, as HfFileSystem would the hub."""

        def __init__(self):
            self.local = fsspec.filesystem("file")
            self.root = str(tmp_path / "in")

        def _map(self, path):
            return path.replace("datasets/org/name", self.root)

        def glob(self, path):
            return [p.replace(self.root, "datasets/org/name") for p in self.local.glob(self._map(path))]

        def isdir(self, path):
            return self.local.isdir(self._map(path))

        def open(self, path, mode):
            return self.local.open(self._map(path), mode)

        def info(self, path):
            return {"size": self.local.info(self._map(path))["size"], "lfs": {"sha256": "f" * 64}}

    monkeypatch.setattr(data, "_hub_filesystem", FakeHub)
    files = resolve_parquet_files(["hf://datasets/org/name/*.parquet"])
    assert files == [f"hf://datasets/org/name/part-{i}.parquet" for i in range(3)]
    manifest = prepare_dataset(["hf://datasets/org/name"], tokenizer, tmp_path / "out", settings(), progress=False)
    local = prepare_dataset(three_shards, tokenizer, tmp_path / "local", settings(), progress=False)
    assert manifest["train_tokens"] == local["train_tokens"]
    assert manifest["sources"][0]["sha256"] == "f" * 64


@pytest.mark.slow
def test_tokenizer_train_command(tmp_path, three_shards):
    assert main(["tokenizer", "train", *three_shards, "--vocab-size", "600", "--output", str(tmp_path / "bpe")]) == 0
    tok = load_tokenizer(tmp_path / "bpe")
    assert len(tok) == 600 and tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert tok.decode(tok("naïve café 123").input_ids) == "naïve café 123"


def test_a_second_prepare_into_a_folder_being_prepared_is_refused_and_inputs_are_never_an_output(
        three_shards, tokenizer, tmp_path):
    """Two prepares writing one folder in place would mix their shards (and records): the second is refused while
    the first holds the folder's lock. A folder that holds the inputs is never an output, --overwrite or not."""
    from argonne.data.prepare import PrepareLock

    out = tmp_path / "out"
    with PrepareLock(out):  # another prepare running there
        with pytest.raises(ValueError, match=r"--output .*out is being prepared by process \d+"):
            prepare_dataset(three_shards, tokenizer, out, settings(), progress=False)
    assert not (out / "prepare.json").exists()
    inputs = Path(three_shards[0]).parent
    for overwrite in (False, True):
        with pytest.raises(DataError, match="holds the input .*a prepare never writes where its inputs are"):
            prepare_dataset(three_shards, tokenizer, inputs, settings(), progress=False, overwrite=overwrite)
    assert all(Path(path).is_file() for path in three_shards)
