"""run_config.py: run configs from TOML with overrides, type, range and command checks."""

import pytest

from argonne.run_config import ConfigError, load_run_config

INPUTS = "--data.inputs=['a.parquet']"


def run_config_error(*overrides) -> str:
    from argonne.run_config import ConfigError, load_run_config

    with pytest.raises(ConfigError) as error:
        load_run_config(None, [INPUTS, *overrides])
    return str(error.value)


@pytest.mark.parametrize("override,expected", [
    ("--train.steps=abc", "train.steps must be an integer, got 'abc' (str)"),
    ("--train.steps=2.5", "train.steps must be an integer, got 2.5 (float)"),
    ("--train.steps=true", "train.steps must be an integer, got True (bool)"),
    ("--optim.lr=abc", "optim.lr must be a finite number, got 'abc' (str)"),
    ("--optim.lr=inf", "optim.lr must be a finite number, got inf (float)"),
    ("--train.run_dir=''", "train.run_dir is empty"),
    ("--data.shuffle=yes", "data.shuffle must be true or false, got 'yes' (str)"),
    ("--train.run_dir=[1]", "train.run_dir must be a string, got [1] (list)"),
    ("--data.inputs=[1, 2]", "data.inputs must be a list of strings, got [1, 2] (list)"),
    ("--model.overrides=3", "model.overrides must be a table"),
    # The document settings come from a plain dataclass (argonne_options); [data] checks them as strictly.
    ("--data.val_fraction='0.1'", "data.val_fraction must be a finite number, got '0.1' (str)"),
    ("--data.min_tokens=true", "data.min_tokens must be an integer, got True (bool)"),
])
def test_fields_are_checked_against_their_types(override, expected):
    assert expected in run_config_error(override)


def test_a_toml_file_with_wrong_types_reports_every_problem_at_once(tmp_path):
    from argonne.run_config import ConfigError, load_run_config

    path = tmp_path / "run.toml"
    path.write_text('[data]\ninputs = ["a.parquet"]\nseq_len = "long"\n[train]\nsteps = 1.5\n[optim]\nbeta1 = 2\n')
    with pytest.raises(ConfigError) as error:
        load_run_config(path)
    message = str(error.value)
    assert "data.seq_len must be an integer" in message and "train.steps must be an integer" in message
    assert "optim.beta1 must be in [0, 1), got 2" in message


def test_ints_are_accepted_as_floats_and_a_single_input_as_a_list():
    from argonne.run_config import load_run_config

    config = load_run_config(None, ["--data.inputs='a.parquet'", "--optim.lr=1", "--train.peak_tflops=100"])
    assert config.data.inputs == ["a.parquet"]
    assert type(config.optim.lr) is float and config.optim.lr == 1.0 and type(config.train.peak_tflops) is float


@pytest.mark.parametrize("override,expected", [
    ("--data.val_fraction=2", "data.val_fraction must be in [0, 1), got 2"),
    ("--data.val_fraction=-0.1", "data.val_fraction must be in [0, 1), got -0.1"),
    ("--checkpoint.every=-1", "checkpoint.every must be >= 0, got -1"),
    ("--checkpoint.keep=-2", "checkpoint.keep must be >= 0, got -2"),
    ("--data.val_windows=-1", "data.val_windows must be >= 0"),
    ("--data.workers=-1", "data.workers must be >= 0"),
    ("--train.eval_every=-5", "train.eval_every must be >= 0"),
    ("--train.sample_every=-1", "train.sample_every must be >= 0"),
    ("--train.sample_tokens=-1", "train.sample_tokens must be >= 0"),
    ("--train.max_nonfinite_in_a_row=0", "train.max_nonfinite_in_a_row must be >= 1"),
    ("--train.peak_tflops=-1", "train.peak_tflops must be >= 0"),
    ("--train.seed=-1", "train.seed must be in [0, 2**63)"),
    ("--train.seed=99999999999999999999999", "train.seed must be in [0, 2**63)"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("--optim.beta1=1", "optim.beta1 must be in [0, 1), got 1"),
    ("--optim.beta2=-0.5", "optim.beta2 must be in [0, 1)"),
    ("--optim.eps=0", "optim.eps must be > 0"),
    ("--optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("--optim.min_lr=-1", "optim.min_lr must be >= 0"),
    ("--optim.muon_momentum=1", "optim.muon_momentum must be in [0, 1), got 1"),
    ("--optim.muon_ns_steps=0", "optim.muon_ns_steps must be in [1, 20], got 0"),
    ("--distill.alpha=1.5", "distill.alpha must be in [0, 1], got 1.5"),
    ("--distill.temperature=0", "distill.temperature must be > 0"),
    ("--distill.chunk=0", "distill.chunk must be > 0"),
])
def test_numeric_fields_are_range_checked(override, expected):
    assert expected in run_config_error(override)


def test_the_optimizer_is_one_the_trainer_knows():
    assert load_run_config(None, [INPUTS]).optim.optimizer == "adamw"  # every preset trains as before
    assert load_run_config(None, [INPUTS, "--optim.optimizer=muon"]).optim.optimizer == "muon"
    assert "optim.optimizer must be adamw or muon, got 'sgd'" in run_config_error("--optim.optimizer=sgd")
    assert "optim.muon_nesterov must be true or false, got 1" in run_config_error("--optim.muon_nesterov=1")


def test_float8_is_off_by_default_and_its_fields_are_checked():
    assert load_run_config(None, [INPUTS]).parallel.float8 == "off"
    config = load_run_config(None, [INPUTS, "--parallel.float8=rowwise", "--parallel.float8_skip=['first', 'last']"])
    assert (config.parallel.float8, config.parallel.float8_skip) == ("rowwise", ["first", "last"])
    assert "parallel.float8 must be off, tensorwise or rowwise, got 'fp8'" in run_config_error("--parallel.float8=fp8")
    assert "parallel.float8_skip must be a list of strings" in run_config_error("--parallel.float8_skip=0")
    assert "parallel.float8_skip is set but parallel.float8 is \"off\"" in run_config_error(
        "--parallel.float8_skip=['first']")
    assert "parallel.float8 needs train.micro_batch_size x data.seq_len (3 x 100 = 300) to divide by 16" in \
        run_config_error("--parallel.float8=tensorwise", "--train.micro_batch_size=3", "--data.seq_len=100")


def test_float8_without_torchao_is_refused_before_training(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    assert "parallel.float8 needs torchao: pip install 'argonne[float8]'" in run_config_error("--parallel.float8=rowwise")


def test_tasks_without_lm_eval_are_refused_before_training_and_before_an_evaluation(monkeypatch, tmp_path, capsys):
    import importlib.util

    from argonne_cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    assert "eval.tasks needs lm-eval: pip install 'argonne[eval]'" in run_config_error("--eval.tasks=['piqa']")
    assert main(["eval", "tasks", str(tmp_path), "--tasks", "piqa"]) == 2
    assert "benchmark tasks need lm-eval: pip install 'argonne[eval]'" in capsys.readouterr().err


def test_unknown_sections_and_fields_suggest_the_close_match():
    assert "[optim] has unknown field(s) ['lrr'] (did you mean 'lr'?)" in run_config_error("--optim.lrr=1")
    assert "unknown section(s) ['trian'] (did you mean 'train'?)" in run_config_error("--trian.steps=1")
    message = run_config_error("--train.stpes=1", "--data.seq_lne=8")
    assert "'steps' for 'stpes'" not in message  # one unknown field per section: the bare suggestion
    assert "[train] has unknown field(s) ['stpes'] (did you mean 'steps'?)" in message
    assert "[data] has unknown field(s) ['seq_lne'] (did you mean 'seq_len'?)" in message


def test_an_override_below_a_value_is_an_error_not_a_traceback():
    assert "train.steps is not a table" in run_config_error("--train.steps=3", "--train.steps.x=1")


def test_unknown_model_overrides_in_a_run_config_stop_training(tmp_path, capsys):
    from argonne_cli import main

    from .conftest import REPO

    code = main(["train", str(REPO / "configs" / "tiny.toml"), f"--train.run_dir={str(tmp_path)!r}",
                 "--model.overrides={num_layerz = 2}"])
    assert code == 2
    assert "unknown model field 'num_layerz' (did you mean 'num_hidden_layers'?)" in capsys.readouterr().err


def test_a_model_override_of_the_wrong_type_stops_training(tmp_path, capsys):
    from argonne_cli import main

    from .conftest import REPO

    code = main(["train", str(REPO / "configs" / "tiny.toml"), f"--train.run_dir={str(tmp_path)!r}",
                 "--model.overrides={qk_norm = 'yes'}"])
    assert code == 2
    assert "qk_norm must be true or false, got 'yes'" in capsys.readouterr().err


def test_each_training_command_checks_what_it_needs_and_refuses_what_it_would_ignore():
    from argonne.run_config import check_command

    sft = load_run_config(None, ["--data.sft=['chat.jsonl']", "--model.init_from='base'"])
    distill = load_run_config(None, ["--data.inputs=['a.parquet']", "--distill.teacher='teacher'"])
    plain = load_run_config(None, ["--data.inputs=['a.parquet']"])
    for config, command in ((sft, "sft"), (distill, "distill"), (plain, "train")):
        check_command(config, command)
    with pytest.raises(ConfigError, match="data.sft is instruction data: fine-tune with `argonne sft`"):
        check_command(sft, "train")
    with pytest.raises(ConfigError, match="distill.teacher is set: distil with `argonne distill`"):
        check_command(distill, "train")  # `argonne train` once distilled silently
    with pytest.raises(ConfigError, match="an sft config needs data.sft"):
        check_command(plain, "sft")
    with pytest.raises(ConfigError, match="a distill config needs distill.teacher"):
        load_run_config(None, ["--data.inputs=['a.parquet']"], command="distill")


def test_document_settings_are_range_checked_like_every_field():
    with pytest.raises(ConfigError, match=r"data.max_digit_fraction must be in \[0, 1\], got 1.5; "
                                          r"data.min_tokens must be >= 0, got -1"):
        load_run_config(None, ["--data.inputs=['a.parquet']", "--data.max_digit_fraction=1.5", "--data.min_tokens=-1"])


def test_sequence_parallel_is_on_by_default_and_needs_a_sequence_that_divides_by_tp():
    config = load_run_config(None, [INPUTS, "--parallel.tensor_parallel=2", "--data.seq_len=32"])
    assert config.parallel.sequence_parallel and not config.parallel.async_tp
    assert ("data.seq_len (33) must divide by parallel.tensor_parallel (2) with parallel.sequence_parallel = true"
            in run_config_error("--parallel.tensor_parallel=2", "--data.seq_len=33"))
    load_run_config(None, [INPUTS, "--parallel.tensor_parallel=2", "--data.seq_len=33",
                           "--parallel.sequence_parallel=false"])
    load_run_config(None, [INPUTS, "--data.seq_len=33"])  # no tensor parallel: nothing is sharded


def test_async_tp_names_every_field_it_needs():
    assert ("parallel.async_tp needs parallel.compile = true, parallel.tensor_parallel > 1 (and CUDA)"
            in run_config_error("--parallel.async_tp=true"))
    assert "parallel.async_tp needs parallel.sequence_parallel = true (and CUDA)" in run_config_error(
        "--parallel.async_tp=true", "--parallel.compile=true", "--parallel.tensor_parallel=2",
        "--parallel.sequence_parallel=false")
    config = load_run_config(None, [INPUTS, "--parallel.async_tp=true", "--parallel.compile=true",
                                    "--parallel.tensor_parallel=2", "--data.seq_len=32"])
    assert config.parallel.async_tp  # CUDA is checked when the model is parallelized


def declared_bounds() -> list[tuple[str, str, str, float]]:
    """(section, field, bound kind, bound) for every bound a run config field declares."""
    from argonne.run_config import SECTIONS

    return [(section, name, kind, getattr(rule, kind)) for section, cls in SECTIONS.items()
            for name, info in cls.__pydantic_fields__.items() for rule in info.metadata
            for kind in ("gt", "ge", "lt", "le") if hasattr(rule, kind)]


def test_the_declared_ranges_are_the_39_the_config_always_checked():
    assert len({(section, name) for section, name, *_ in declared_bounds()}) == 39


@pytest.mark.parametrize("section,name,kind,bound", declared_bounds())
def test_every_declared_bound_is_enforced_and_named(section, name, kind, bound):
    outside = {"gt": bound, "ge": bound - 1, "lt": bound, "le": bound + 1}[kind]
    message = run_config_error(f"--{section}.{name}={outside}")
    assert f"{section}.{name} must be " in message and f"got {outside}" in message


def test_sections_check_their_fields_when_built_directly():
    from pydantic import ValidationError

    from argonne.run_config import DataSection, OptimSection, ParallelSection, RunConfig

    assert type(OptimSection(lr=1).lr) is float
    with pytest.raises(ValidationError, match="greater than 0"):
        OptimSection(lr=0)
    with pytest.raises(ValidationError, match="must not exceed optim.lr"):
        OptimSection(lr=1e-3, min_lr=1e-2)
    RunConfig()  # the defaults, without data, build a model and an optimizer (tests and benchmarks do)
    with pytest.raises(ValidationError, match=r"data.seq_len \(33\) must divide by parallel.tensor_parallel"):
        RunConfig(data=DataSection(seq_len=33), parallel=ParallelSection(tensor_parallel=2))


def test_a_run_config_reads_back_the_json_a_run_writes():
    import json

    from argonne.run_config import build_run_config

    config = load_run_config(None, [INPUTS, "--optim.lr=1", "--eval.tasks=['hellaswag']",
                                    "--model.overrides={num_hidden_layers = 2}",
                                    "--parallel.activation_checkpointing=true", "--eval.limit=0.5"])
    assert build_run_config(json.loads(json.dumps(config.to_dict()))) == config
