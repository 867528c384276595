"""Data and arguments for the tiny runs of the training tests."""

import pytest

from ..conftest import SAMPLE_TOKENIZER, write_sample_head


@pytest.fixture(scope="package")
def prepared(tmp_path_factory):
    from argonne import load_tokenizer
    from argonne.data import DocumentSettings
    from argonne.data.prepare import PrepareSettings, prepare_dataset

    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset([write_sample_head(tmp_path_factory.mktemp("sample") / "head.parquet")], load_tokenizer(SAMPLE_TOKENIZER), out,
                    PrepareSettings(seq_len=64, workers=0, documents=DocumentSettings(val_fraction=0.02)),
                    progress=False)
    return out


def streaming_run_args(tmp_path, *extra):
    return [
        f"--data.inputs=[{str(write_sample_head(tmp_path / 'sample-head.parquet'))!r}]",
        f"--data.tokenizer={str(SAMPLE_TOKENIZER)!r}",
        f"--train.run_dir={str(tmp_path / 'run')!r}",
        "--model.overrides={num_hidden_layers = 2, hidden_size = 128, intermediate_size = 344}",
        "--data.seq_len=64",
        "--data.val_fraction=0.02",
        "--train.micro_batch_size=8",
        "--train.peak_tflops=1",
        *extra,
    ]


@pytest.fixture(scope="package")
def tiny_run_args(prepared):
    """Arguments for a quick run on prepared data (streaming costs a tokenization pass per run)."""

    def args(tmp_path, *extra):
        return [a for a in streaming_run_args(tmp_path) if not a.startswith(("--data.inputs", "--data.val_fraction"))] + [
            "--data.inputs=[]", f"--data.prepared={str(prepared)!r}", "--data.workers=0", *extra]

    return args
