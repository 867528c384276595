"""loading.py: every kind of model folder and checkpoint opens in one place, and nothing else opens."""

import json

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne_cli import main
from argonne.loading import ModelError, check_finite_weights, open_model, read_weights

from .conftest import BROKEN_TENSORS, SAMPLE_TOKENIZER, break_weights, small_model


def bin_folder(model_dir, folder, state=None, name="pytorch_model.bin"):
    """model_dir's model as a transformers folder with torch.save weights (pytorch_model.bin) instead of safetensors."""
    model, tokenizer = open_model(model_dir, "cpu")
    folder.mkdir()
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict() if state is None else state, folder / name)
    return model


@pytest.mark.slow
def test_a_folder_with_pytorch_model_bin_loads(model_dir, tmp_path, capsys):
    folder = tmp_path / "bin"
    model = bin_folder(model_dir, folder)
    assert not list(folder.glob("*.safetensors"))
    loaded, _ = open_model(folder, "cpu")
    tokens = torch.randint(3, 8192, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert main(["generate", str(folder), "--prompt", "Hello", "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


@pytest.mark.slow
def test_bin_weights_that_do_not_fit_or_run_code_are_refused(model_dir, tmp_path, capsys):
    model = bin_folder(model_dir, tmp_path / "shapes")
    state = dict(model.state_dict())
    state["model.norm.weight"] = torch.ones(7)
    del state["model.layers.0.mlp.down_proj.weight"]
    state["extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "shapes" / "pytorch_model.bin")
    with pytest.raises(ValueError) as error:
        open_model(tmp_path / "shapes", "cpu")
    message = str(error.value)
    assert "model.layers.0.mlp.down_proj.weight" in message and "extra.weight" in message
    assert "model.norm.weight (7,) != (256,)" in message
    bin_folder(model_dir, tmp_path / "pickle", state={"weight": torch.ones(1), "payload": print})
    assert main(["generate", str(tmp_path / "pickle"), "--prompt", "x"]) == 2
    assert "refused" in capsys.readouterr().err


def test_a_folder_without_weights_says_what_it_looked_for(tmp_path, capsys):
    ArgonneConfig.from_preset("tiny", num_hidden_layers=1).save_pretrained(tmp_path / "empty")
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "no weights" in err and "model.safetensors" in err and "pytorch_model.bin" in err and "COMPLETE" in err


@pytest.mark.slow
def test_a_training_checkpoint_loads_directly(model_dir, tmp_path):
    from argonne.checkpoint import save_checkpoint

    model, tokenizer = open_model(model_dir, "cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path / "ckpt", 7, model, optimizer, {"step": 7}, is_main=True, tokenizer=tokenizer)
    loaded, _ = open_model(path, "cpu")
    tokens = torch.randint(3, 8192, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_a_shard_index_pointing_outside_the_folder_is_refused(tmp_path, capsys):
    ArgonneConfig.from_preset("tiny", num_hidden_layers=1).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}))
    assert main(["generate", str(tmp_path / "model"), "--prompt", "x"]) == 2
    assert "weight_map points outside the folder" in capsys.readouterr().err


def test_pickled_objects_are_refused_and_plain_bin_files_load(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save({"weight": torch.ones(2)}, folder / "pytorch_model.bin")
    assert torch.equal(read_weights(folder)["weight"], torch.ones(2))
    torch.save({"weight": torch.ones(2), "extra": ModelError("arbitrary object")}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="refused .* arbitrary Python objects"):
        read_weights(folder)


def test_a_folder_without_a_tokenizer_says_which_files_and_how_to_pass_one(model_dir, tmp_path_factory, capsys):
    tmp_path = tmp_path_factory.mktemp("export")  # model_dir fills its own tmp_path
    bare = tmp_path / "bare"
    ArgonneForCausalLM.from_pretrained(model_dir).save_pretrained(bare)  # a new user's save: no tokenizer files
    with pytest.raises(ModelError, match=r"has no tokenizer: neither tokenizer.json nor tokenizer_config.json.*"
                                         r"pass one with --tokenizer"):
        open_model(bare, "cpu")
    # Export fails the same way and writes nothing.
    assert main(["export", str(bare), "--to", "llama", "--output", str(tmp_path / "out")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bare"]
    # Given a tokenizer, the folder opens and exports.
    model, tokenizer = open_model(bare, "cpu", tokenizer=SAMPLE_TOKENIZER)
    assert len(tokenizer) == 8192
    assert main(["export", str(bare), "--to", "llama", "--output", str(tmp_path / "out"),
                 "--tokenizer", str(SAMPLE_TOKENIZER)]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "out"]  # no staging folder left


@pytest.mark.slow
def test_an_export_that_fails_midway_leaves_the_earlier_output_as_it_was(model_dir, tmp_path_factory, monkeypatch):
    import argonne.export as export

    tmp_path = tmp_path_factory.mktemp("export")
    out = tmp_path / "out"
    assert main(["export", str(model_dir), "--to", "hf", "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_model(model_dir, "gguf", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def lying_header(file):
    """Rewrite a safetensors file's header so that its first tensor claims 4 KB more than the file holds."""
    raw = file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4096
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


@pytest.mark.parametrize("damage", ["truncated", "lying-header"])
def test_a_damaged_safetensors_file_is_an_error_naming_it(model_dir, damage):
    file = model_dir / "model.safetensors"
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        lying_header(file)
    with pytest.raises(ModelError, match=rf"{file}: not a valid safetensors file \(.*\); it may be truncated"):
        open_model(model_dir, "cpu")


def test_non_finite_weights_are_refused_naming_the_folder_and_tensors(nan_model_dir, capsys):
    with pytest.raises(ModelError) as error:
        open_model(nan_model_dir, "cpu")
    message = str(error.value)
    assert message.startswith(f"{nan_model_dir}: non-finite weights (NaN or Inf) in ")
    assert all(tensor in message for tensor in BROKEN_TENSORS) and "retrain" in message
    assert main(["generate", str(nan_model_dir), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("argonne generate: error: ") and "non-finite weights" in err and "Traceback" not in err


def test_a_training_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    from argonne.checkpoint import save_checkpoint

    model = break_weights(small_model())
    optimizer = torch.optim.SGD(model.parameters())
    path = save_checkpoint(tmp_path / "ckpt", 7, model, optimizer, {"step": 7}, is_main=True,
                           tokenizer=load_tokenizer(SAMPLE_TOKENIZER))
    with pytest.raises(ModelError, match="non-finite weights") as error:
        open_model(path, "cpu")
    assert str(error.value).startswith(str(path)) and all(tensor in str(error.value) for tensor in BROKEN_TENSORS)


def test_the_finite_check_counts_values_and_names_at_most_a_few_tensors():
    state = {f"w{i}": torch.full((3,), float("nan")) for i in range(6)} | {"ok": torch.ones(2),
                                                                            "ids": torch.arange(3)}
    with pytest.raises(ModelError) as error:
        check_finite_weights(state, "here")
    assert str(error.value).startswith("here: non-finite weights (NaN or Inf) in w0 (3 values), w1 (3 values)")
    assert "w3 (3 values) and 2 more tensors;" in str(error.value) and "w4" not in str(error.value)
    check_finite_weights({"ok": torch.ones(2), "empty": torch.ones(0), "ids": torch.arange(3)}, "here")
