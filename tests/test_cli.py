import pytest

from argonne.cli import COMMANDS, build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    assert set(COMMANDS) >= {"info", "train", "generate"}


def test_info_prints_architecture_and_exact_count(capsys):
    assert main(["info", "argonne-2.0"]) == 0
    out = capsys.readouterr().out
    assert "4,918,072,800" in out
    assert "head_dim" in out and "170" in out and "swiglu" in out


def test_info_accepts_a_model_folder(tmp_path, capsys):
    from argonne import ArgonneConfig

    ArgonneConfig.from_preset("argonne-1.0").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "275,827,680" in capsys.readouterr().out


def test_info_rejects_unknown_names():
    with pytest.raises(SystemExit, match="neither a preset"):
        main(["info", "no-such-preset"])


def test_unknown_options_are_errors_outside_train():
    with pytest.raises(SystemExit):
        main(["info", "tiny", "--train.steps=3"])


def test_every_command_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        assert sub.description, f"{name} has no description"


def test_sft_and_distill_check_their_sections(capsys):
    from .conftest import REPO

    assert main(["sft", str(REPO / "configs" / "tiny.toml")]) == 2
    assert "needs data.sft" in capsys.readouterr().err
    assert main(["distill", str(REPO / "configs" / "tiny.toml")]) == 2
    assert "needs distill.teacher" in capsys.readouterr().err


# ------------------------------------------------------------------------------ user mistakes: messages, exit 2


def error_line(capsys) -> str:
    """The command's stderr, checked to be one short line (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("name,expected", [
    ("no/such/tokenizer", "tokenizer folder no/such/tokenizer does not exist"),
    ("./nope", "tokenizer folder ./nope does not exist"),
    ("data/tokenizers/sample-bpe-9k", "tokenizer folder data/tokenizers/sample-bpe-9k does not exist"),
    ("nope", "could not load tokenizer 'nope'"),
])
def test_a_missing_tokenizer_is_one_line_for_data_prepare_and_train(name, expected, tmp_path, capsys, monkeypatch):
    from .conftest import REPO, SAMPLE_SHARD

    monkeypatch.chdir(REPO)
    assert main(["data", "prepare", str(SAMPLE_SHARD), "--tokenizer", name, "--output", str(tmp_path / "out"),
                 "--workers", "0"]) == 2
    assert error_line(capsys).startswith(f"argonne data: error: {expected}")
    assert main(["train", "configs/tiny.toml", f"--train.run_dir={str(tmp_path / 'run')!r}",
                 f"--data.tokenizer={name!r}"]) == 2
    assert error_line(capsys).startswith(f"argonne train: error: {expected}")


def test_a_folder_without_tokenizer_files_is_an_error(tmp_path, capsys):
    from .conftest import SAMPLE_SHARD

    (tmp_path / "empty").mkdir()
    assert main(["data", "prepare", str(SAMPLE_SHARD), "--tokenizer", str(tmp_path / "empty"), "--output",
                 str(tmp_path / "out"), "--workers", "0"]) == 2
    assert f"{tmp_path / 'empty'} holds no tokenizer" in error_line(capsys)


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    import argonne.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(argonne.cli, "cmd_info", interrupted)
    assert main(["info", "tiny"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "argonne info: interrupted"  # on a new line, after the terminal's ^C
