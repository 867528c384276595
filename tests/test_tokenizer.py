"""Tokenizer loading: local folders, hub names, and the errors for each."""

import pytest

from argonne.tokenizer import TokenizerError, load_tokenizer, looks_local

from .conftest import REPO, SAMPLE_TOKENIZER


@pytest.mark.parametrize("name,local", [
    ("Qwen/Qwen2.5-3B-Instruct", False),
    ("gpt2", False),
    ("./tok", True),
    ("~/tok", True),
    ("/abs/tok", True),
    ("a/b/c", True),
    ("data/tokenizers/typo", True),  # data/tokenizers exists here: a typo in a local path, not a hub repository
    ("with space", True),
])
def test_which_names_are_local_folders(name, local, monkeypatch):
    monkeypatch.chdir(REPO)
    assert looks_local(name) is local


def test_a_local_folder_loads_and_errors_are_tokenizer_errors(tmp_path):
    assert len(load_tokenizer(SAMPLE_TOKENIZER)) == 8192
    with pytest.raises(TokenizerError, match=f"tokenizer folder {tmp_path / 'missing'} does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TokenizerError, match="is a file"):
        load_tokenizer(tmp_path / "file")
    with pytest.raises(TokenizerError, match=r"could not load tokenizer 'no-such-org/no-such-tokenizer'.*hub") as error:
        load_tokenizer("no-such-org/no-such-tokenizer")  # the tests run offline (conftest)
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert isinstance(error.value, ValueError)  # the command line reports it as a user mistake (exit 2)


def test_a_tokenizer_that_asks_to_run_its_own_code_is_refused_without_a_prompt(tmp_path, monkeypatch):
    """Left unset, trust_remote_code makes transformers ask on the terminal, and a "y" runs the folder's code."""
    import json
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(SAMPLE_TOKENIZER, folder)
    ran = tmp_path / "code-ran"
    (folder / "evtok.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n"
                                     "from transformers import PreTrainedTokenizerFast as EvilTok\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTok", auto_map={"AutoTokenizer": ["evtok.EvilTok", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked on the terminal"))
    with pytest.raises(TokenizerError, match=str(folder)):
        load_tokenizer(folder)
    assert not ran.exists()
