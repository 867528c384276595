"""Export to Argonne and Llama folders, import from Llama and Qwen2, and safe loading of third-party files."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.cli import main
from argonne.export import ConversionError, export_model, import_model, read_weights

from .conftest import SAMPLE_TOKENIZER

SHAPE = dict(vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=24, intermediate_size=128, max_position_embeddings=128)


def saved_argonne(folder, preset="tiny", **overrides):
    torch.manual_seed(0)
    ArgonneForCausalLM(ArgonneConfig.from_preset(preset, **{**SHAPE, **overrides}, initializer_range=0.1)) \
        .save_pretrained(folder)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(folder)
    return folder


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_llama_export_loads_in_plain_transformers_with_equal_logits(tmp_path):
    source = saved_argonne(tmp_path / "argonne")
    assert main(["export", str(source), "--to", "llama", "--output", str(tmp_path / "llama"), "--dtype", "fp32"]) == 0
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    tokens = torch.randint(3, 8192, (2, 20))
    torch.save({"tokens": tokens, "logits": logits(ArgonneForCausalLM.from_pretrained(source), tokens)},
               tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'llama')!r})
AutoTokenizer.from_pretrained({str(tmp_path / 'llama')!r})
assert type(model).__name__ == "LlamaForCausalLM" and "argonne" not in sys.modules
data = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    print((model(data["tokens"]).logits - data["logits"]).abs().max().item())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-5


def test_gpt2_style_models_do_not_fit_llama(tmp_path):
    source = saved_argonne(tmp_path / "gpt2", preset="argonne-1.0", num_key_value_heads=4)
    with pytest.raises(ConversionError, match="norm_type is 'layernorm'.*mlp_type is 'gelu'.*learned"):
        export_model(source, "llama", tmp_path / "out")


def test_hf_export_of_a_checkpoint_equals_the_model(tmp_path):
    from argonne.checkpoint import save_checkpoint
    from argonne.generate import load_model

    model, tokenizer = load_model(saved_argonne(tmp_path / "argonne"), "cpu")
    checkpoint = save_checkpoint(tmp_path / "ckpt", 1, model, torch.optim.AdamW(model.parameters()), {"step": 1},
                                 is_main=True, tokenizer=tokenizer)
    export_model(checkpoint, "hf", tmp_path / "hf", "fp32")
    tokens = torch.randint(3, 8192, (1, 16))
    assert torch.equal(logits(ArgonneForCausalLM.from_pretrained(tmp_path / "hf"), tokens), logits(model, tokens))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_import_llama_and_qwen2_with_equal_logits_and_identity_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    common = dict(vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    theirs = (LlamaForCausalLM(LlamaConfig(**common, rope_theta=5e5)) if kind == "llama"
              else Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1e6)))
    for p in theirs.parameters():  # make biases non-zero so that they are really compared
        torch.nn.init.normal_(p, std=0.05)
    theirs.save_pretrained(tmp_path / kind)
    assert main(["import", str(tmp_path / kind), "--output", str(tmp_path / "ours")]) == 0
    ours = ArgonneForCausalLM.from_pretrained(tmp_path / "ours")
    assert ours.config.attention_bias == (kind == "qwen2") and not ours.config.attention_out_bias
    tokens = torch.randint(0, 8192, (2, 24))
    assert (logits(ours, tokens) - logits(theirs, tokens)).abs().max() <= 1e-5
    if kind == "llama":  # import -> export is the identity on weights
        load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(tmp_path / "ours")
        export_model(tmp_path / "ours", "llama", tmp_path / "again", "fp32")
        original, again = read_weights(tmp_path / kind), read_weights(tmp_path / "again")
        assert original.keys() == again.keys()
        assert all(torch.equal(original[k], again[k]) for k in original)


def test_pickled_objects_are_refused_and_plain_bin_files_load(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save({"weight": torch.ones(2)}, folder / "pytorch_model.bin")
    assert torch.equal(read_weights(folder)["weight"], torch.ones(2))
    torch.save({"weight": torch.ones(2), "extra": ConversionError("arbitrary object")}, folder / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="refused .* arbitrary Python objects"):
        read_weights(folder)
