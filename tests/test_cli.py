import argparse
import json
import os
import re
import subprocess
import sys

import pytest

import argonne_cli
from argonne_cli import COMMANDS, build_parser, main


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


def test_a_closed_pipe_ends_the_command_quietly():
    """`argonne info tiny | head -1`: the reader leaves early, and the command stops with no traceback. The commands
    module is a stand-in that prints a lot (so no torch is imported here)."""
    from .conftest import REPO

    code = (
        "import sys, types\n"
        "commands = types.SimpleNamespace(cmd_info=lambda args: [print('x' * 80) for _ in range(100_000)] and 0)\n"
        "sys.modules['argonne'] = types.SimpleNamespace(cli=commands)\n"
        "import argonne_cli\n"
        "sys.exit(argonne_cli.main(['info', 'tiny']))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout.readline() == b"x" * 80 + b"\n"
    process.stdout.close()
    assert process.wait(timeout=60) == 141
    assert process.stderr.read() == b""


# ------------------------------------------------------------------------------ help: instant, complete, with defaults


def subcommands(parser: argparse.ArgumentParser, prefix=()):
    """(argv, parser) for every subcommand, nested ones (data prepare, eval perplexity, ...) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*prefix, name], sub
                yield from subcommands(sub, (*prefix, name))


SUBCOMMANDS = dict((" ".join(argv), parser) for argv, parser in subcommands(build_parser()))


def words(text: str) -> str:
    return " ".join(text.split())


def help_entry(help_text: str, name: str) -> str | None:
    """The lines argparse printed for the argument whose invocation starts with `name`, whitespace collapsed."""
    lines = help_text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"^  {re.escape(name)}(?=[ ,]|$)", line):
            entry = [line]
            for following in lines[i + 1:]:
                if not following.startswith("   "):
                    break
                entry.append(following)
            return words("\n".join(entry))
    return None


def has_default(action: argparse.Action) -> bool:
    """A default worth showing: not None, not an off flag (store_true), not an empty list (--stop)."""
    return not (action.default is None or action.default is False or action.default == []
                or action.default is argparse.SUPPRESS)


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_subcommand_help_is_complete(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    parser = SUBCOMMANDS[command]
    assert parser.description and len(parser.description.split()) >= 10, f"{command}: description too short"
    assert words(parser.description) in words(out)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # a group: each subcommand listed with its summary
            for choice in action._choices_actions:
                assert choice.help and len(choice.help.split()) >= 2, f"{command} {choice.dest}: no summary"
                assert re.search(rf"^    {re.escape(choice.dest)}\b", out, re.M), f"{choice.dest} not listed"
            continue
        name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {name}: no help text"
        entry = help_entry(out, name)
        assert entry is not None, f"{command} {name}: not in the help"
        assert len(entry.split()) > len(name.split()) + 1, f"{command} {name}: help not printed"
        if has_default(action):
            assert "default" in entry and str(action.default) in entry, f"{command} {name}: default not shown"


def test_help_lists_exactly_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listed = set(re.findall(r"^    ([\w-]+)", out, re.M))
    assert listed == set(COMMANDS)
    assert {command.split()[0] for command in SUBCOMMANDS} == set(COMMANDS)


def test_help_defaults_are_the_code_defaults():
    """Defaults and choices the parser writes out (it cannot import the code that has them) match the code."""
    import inspect

    from argonne.export import export_model
    from argonne.inference.engine import EngineSettings
    from argonne.inference.sampling import SamplingParams
    from argonne.serve import ServerLimits

    generate = build_parser().parse_args(["generate", "model"])
    for field in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        assert getattr(generate, field) == getattr(SamplingParams(), field), field
    serve = build_parser().parse_args(["serve", "model"])
    limits = ServerLimits()
    assert (serve.max_prompt_tokens, serve.max_tokens_limit, serve.max_body_bytes) == (
        limits.max_prompt_tokens, limits.max_tokens, limits.max_body_bytes)
    settings = EngineSettings()
    assert (serve.max_batch, serve.max_queue, serve.prefill_chunk, not serve.no_prefix_caching) == (
        settings.max_batch, settings.max_queue, settings.prefill_chunk, settings.prefix_caching)
    export = build_parser().parse_args(["export", "model", "--to", "gguf", "--output", "out"])
    assert export.dtype == inspect.signature(export_model).parameters["dtype"].default


def test_help_needs_neither_torch_nor_transformers():
    """The deterministic stand-in for "help is instant": the installed `argonne` entry point prints every help
    without importing torch or transformers (a fresh process; importing them takes seconds)."""
    from .conftest import REPO

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["argonne"]
    module, function = entry.split(":")
    argvs = [["--help"]] + [[*command.split(), "--help"] for command in SUBCOMMANDS]
    code = (
        "import contextlib, io, json, sys\n"
        f"from {module} import {function} as main\n"
        "codes = []\n"
        f"for argv in {argvs!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as exit:\n"
        "            codes.append((exit.code, len(out.getvalue())))\n"
        "print(json.dumps({'codes': codes, 'imported': [m for m in ('torch', 'transformers') if m in sys.modules]}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["imported"] == []
    assert len(report["codes"]) == len(argvs) and all(code == 0 and size > 200 for code, size in report["codes"])


def test_library_progress_bars_stay_out_of_the_output(tmp_path, capfd, monkeypatch):
    """transformers' "Loading weights" / "Writing model shards" bars are switched off once at the start of every
    command; Argonne's own tqdm bars (training, data prepare, perplexity) are not."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer

    from .conftest import SAMPLE_TOKENIZER

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh process
    try:
        model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", num_hidden_layers=1))
        model.save_pretrained(tmp_path / "model")
        load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(tmp_path / "model")
        assert "Writing model shards" in capfd.readouterr().err  # the bars are there to be silenced
        assert main(["export", str(tmp_path / "model"), "--to", "hf", "--output", str(tmp_path / "out")]) == 0
        captured = capfd.readouterr()
        assert captured.out.strip() == str(tmp_path / "out")
        for text in ("Loading weights", "Writing", "it/s", "%|"):
            assert text not in captured.err + captured.out
        for _ in tqdm(range(2), desc="argonne's own", disable=False):
            pass
        assert "argonne's own" in capfd.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
