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
