"""What a run is built from (training/build.py): the run config's checks, the tokenizer and the model config,
the data, the objective."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.run_config import ConfigError, check_command, load_run_config
from argonne.training.loop import train

from .conftest import streaming_run_args
from ..conftest import REPO, SAMPLE_TOKENIZER


def test_shipped_quickstart_config_loads():
    config = load_run_config(REPO / "configs" / "tiny.toml")
    assert config.model.preset == "tiny" and config.data.tokenizer.endswith("sample-bpe-8k")


def test_overrides_are_typed_and_checked(tmp_path):
    config = load_run_config(None, ["--optim.lr=1e-2", "--train.steps=7", "--data.inputs=['a.parquet']"])
    with pytest.raises(ConfigError, match="exactly one of data.inputs"):
        load_run_config(None, ["--data.inputs=['a.parquet']", "--data.prepared=out"])
    assert (config.optim.lr, config.train.steps, config.data.inputs) == (1e-2, 7, ["a.parquet"])
    with pytest.raises(ConfigError, match=r"\[optim\] has unknown field\(s\) \['learning_rate'\]"):
        load_run_config(None, ["--optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="train.steps must be > 0"):
        load_run_config(None, ["--train.steps=0"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_run_config(tmp_path / "missing.toml")
    inputs = "--data.inputs=['a.parquet']"
    for given, meant in (("true", "full"), ("false", "none"), ("selective", "selective")):
        config = load_run_config(None, [inputs, f"--parallel.activation_checkpointing={given}"])
        assert config.parallel.activation_checkpointing == meant
    with pytest.raises(ConfigError, match="activation_checkpointing must be none, full or selective, got 'some'"):
        load_run_config(None, [inputs, "--parallel.activation_checkpointing=some"])


def test_shipped_configs_load_and_fit_their_presets():
    from argonne import ArgonneConfig

    for name in ("quickstart", "tiny", "small", "argonne-2.0", "tiny-plus", "small-plus"):
        config = load_run_config(REPO / "configs" / f"{name}.toml")
        model = ArgonneConfig.from_preset(config.model.preset, **config.model.overrides)
        tp = config.parallel.tensor_parallel
        assert model.num_key_value_heads % tp == 0 and model.intermediate_size % tp == 0
    original = load_run_config(REPO / "configs" / "argonne-2.0.toml")
    assert (original.parallel.tensor_parallel, original.train.grad_accum, original.data.seq_len) == (8, 4, 4096)
    assert (original.optim.lr, original.optim.min_lr, original.optim.warmup_steps) == (1e-4, 1e-5, 2000)
    assert (original.optim.weight_decay, original.optim.grad_clip) == (0.1, 1.0)
    for name in ("tiny", "small"):  # the -plus configs: the original's, with the ablation's winner
        plain, plus = (load_run_config(REPO / "configs" / f"{n}.toml").to_dict() for n in (name, f"{name}-plus"))
        assert plus["model"]["preset"] == f"{name}-plus" and plus["optim"]["optimizer"] == "muon"
        assert plain["optim"]["optimizer"] == "adamw"
        for section, field in (("model", "preset"), ("optim", "optimizer"), ("train", "run_dir")):
            plus[section][field] = plain[section][field]
        assert plus == plain
    # The quickstart trains with the winner, and the fine-tuning and distillation examples start from its model.
    quickstart = load_run_config(REPO / "configs" / "quickstart.toml")
    assert (quickstart.model.preset, quickstart.optim.optimizer) == ("tiny-plus", "muon")
    for name in ("sft-tiny", "distill-tiny"):
        assert f'"{quickstart.train.run_dir}/model"' in (REPO / "configs" / f"{name}.toml").read_text(), name


@pytest.mark.slow
def test_tokenizer_larger_than_the_vocabulary_is_an_error(tmp_path, tiny_run_args):
    config = load_run_config(None, tiny_run_args(tmp_path, "--model.overrides={vocab_size = 1000}"))
    with pytest.raises(ConfigError, match="8192 tokens but model preset 'tiny' has vocab_size 1000"):
        train(config)


def test_a_sequence_longer_than_the_model_context_is_refused(tmp_path, tiny_run_args):
    config = load_run_config(None, tiny_run_args(tmp_path, "--data.seq_len=2048"))  # tiny: 1024 positions
    with pytest.raises(ConfigError, match=r"data.seq_len \(2048\) exceeds the model's context"):
        train(config)


@pytest.mark.slow
def test_init_from_brings_its_tokenizer_and_another_one_is_an_error(tmp_path, qwen_tokenizer_dir):
    from argonne.training.build import build_tokenizer

    base = tmp_path / "base"
    ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", num_hidden_layers=1)).save_pretrained(base)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(base)
    config = load_run_config(None, [f"--model.init_from={str(base)!r}", "--data.inputs=['a.parquet']"])
    assert build_tokenizer(config).name_or_path == str(base)  # the default: init_from's own
    config.data.tokenizer = str(SAMPLE_TOKENIZER)  # the same vocabulary under another name: fine
    assert len(build_tokenizer(config)) == 8192
    config.data.tokenizer = str(qwen_tokenizer_dir)
    with pytest.raises(ConfigError, match=rf"data.tokenizer '{qwen_tokenizer_dir}' \(151,665 tokens\) is not the "
                                          rf"tokenizer of model.init_from '{base}' \(8,192 tokens\)"):
        build_tokenizer(config)


def test_bad_text_column_names_the_file(tmp_path, tiny_run_args):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["hello"]}), bad)
    config = load_run_config(None, streaming_run_args(tmp_path, f"--data.inputs=[{str(bad)!r}]"))
    with pytest.raises(ValueError, match=r"bad.parquet: no column 'text'"):
        train(config)


def test_z_loss_trains_with_the_cross_entropy_and_is_logged_apart(prepared_sample, one_process, tmp_path):
    """The first step's cross-entropy is the plain run's loss (same weights, same batch); the logged loss is
    ce + c * z; distillation, whose loss has no z term, refuses the option."""
    from ..launches import records, train_here

    train_here(prepared_sample, tmp_path / "z", steps=3, extra=["--train.z_loss=0.01"])
    logged = [r for r in records(tmp_path / "z") if "loss" in r]
    plain, _ = one_process
    assert abs(logged[0]["ce"] - plain[1]) <= 1e-6 * plain[1]
    for record in logged:
        assert record["z_loss"] > 1.0  # log(vocab)^2 at the start, about 81
        assert abs(record["loss"] - (record["ce"] + 0.01 * record["z_loss"])) <= 1e-5 * record["loss"]
    with pytest.raises(ConfigError, match="train.z_loss is not part of the distillation loss"):
        check_command(load_run_config(None, ["--distill.teacher=t", "--train.z_loss=1e-4", "--data.prepared=x"]),
                      "distill")
