"""Export to Argonne, Llama and Qwen3 folders, import from Llama, Qwen2 and Qwen3, and safe loading of third-party
files."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne_cli import main
from argonne.export import ConversionError, export_model, import_model
from argonne.loading import ModelError, read_weights

from .conftest import BROKEN_TENSORS, SAMPLE_TOKENIZER, break_weights, scramble_norms

SHAPE = dict(vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=24, intermediate_size=128, max_position_embeddings=128)


def saved_argonne(folder, preset="tiny", **overrides):
    """A random model saved with the sample tokenizer; its norm weights are not ones, so that they are compared."""
    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset(preset, **{**SHAPE, **overrides}, initializer_range=0.1))
    scramble_norms(model).save_pretrained(folder)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(folder)
    return folder


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.slow
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


def test_qwen3_export_loads_in_plain_transformers_and_imports_back_identically(tmp_path):
    source = saved_argonne(tmp_path / "argonne", qk_norm=True)
    assert main(["export", str(source), "--to", "qwen3", "--output", str(tmp_path / "qwen3"), "--dtype", "fp32"]) == 0
    config = json.loads((tmp_path / "qwen3" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and "auto_map" not in config and config["head_dim"] == 24
    theirs = Qwen3ForCausalLM.from_pretrained(tmp_path / "qwen3").eval()  # transformers' own code
    ours = ArgonneForCausalLM.from_pretrained(source).eval()
    tokens = torch.randint(3, 8192, (2, 20))
    expected = logits(ours, tokens)
    assert (logits(theirs, tokens) - expected).abs().max() <= 1e-5
    assert main(["import", str(tmp_path / "qwen3"), "--output", str(tmp_path / "back")]) == 0
    back = ArgonneForCausalLM.from_pretrained(tmp_path / "back")
    assert back.config.qk_norm and (tmp_path / "back" / "tokenizer.json").is_file()
    assert torch.equal(logits(back, tokens), expected)
    original, again = ours.state_dict(), back.state_dict()
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


@pytest.mark.parametrize("target", ["llama", "gguf"])
def test_llama_and_gguf_refuse_a_qk_norm_model_before_writing_anything(tmp_path, target):
    source = saved_argonne(tmp_path / "argonne", qk_norm=True)
    with pytest.raises(ConversionError, match=r"qk_norm is True \(Llama has no query/key norms; export it --to qwen3"):
        export_model(source, target, tmp_path / "out" / "model")
    assert not (tmp_path / "out").exists()  # not even the staging folder beside the output


@pytest.mark.parametrize("overrides,reasons", [
    ({}, r"qk_norm is False \(Qwen3 always normalises queries and keys; export it --to llama\)"),
    ({"qk_norm": True, "mlp_bias": True, "attention_out_bias": True},
     r"o_proj bias differs from q/k/v bias \(Qwen3 .*mlp_bias is True \(Qwen3's MLP has no biases\)"),
    ({"preset": "argonne-1.0", "num_key_value_heads": 4, "qk_norm": True},
     r"norm_type is 'layernorm' \(Qwen3: rmsnorm\).*mlp_type is 'gelu'.*position_embedding is 'learned'"),
], ids=["no-qk-norm", "biases", "gpt2-style"])
def test_qwen3_refuses_what_it_cannot_hold(tmp_path, overrides, reasons):
    source = saved_argonne(tmp_path / "argonne", **overrides)
    with pytest.raises(ConversionError, match="this model does not fit the Qwen3 architecture: " + reasons):
        export_model(source, "qwen3", tmp_path / "out" / "model")
    assert not (tmp_path / "out").exists()


def test_a_qk_norm_checkpoint_exports_to_qwen3_equal_to_the_model(tmp_path):
    from argonne.checkpoint import save_checkpoint
    from argonne.loading import open_model

    model, tokenizer = open_model(saved_argonne(tmp_path / "argonne", qk_norm=True), "cpu")
    checkpoint = save_checkpoint(tmp_path / "ckpt", 1, model, torch.optim.AdamW(model.parameters()), {"step": 1},
                                 is_main=True, tokenizer=tokenizer)
    export_model(checkpoint, "qwen3", tmp_path / "qwen3", "fp32")
    tokens = torch.randint(3, 8192, (1, 16))
    assert torch.equal(logits(Qwen3ForCausalLM.from_pretrained(tmp_path / "qwen3"), tokens), logits(model, tokens))


def test_hf_export_of_a_checkpoint_equals_the_model(tmp_path):
    from argonne.checkpoint import save_checkpoint
    from argonne.loading import open_model

    model, tokenizer = open_model(saved_argonne(tmp_path / "argonne"), "cpu")
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


def test_import_qwen3_with_equal_logits(tmp_path):
    """A Qwen3 folder made by transformers alone (q/k/v/o biases, untied head, its own QK-norm weights)."""
    torch.manual_seed(0)
    theirs = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=128, max_position_embeddings=128, rope_theta=1e6, attention_bias=True,
        tie_word_embeddings=False, rms_norm_eps=1e-5)).eval()
    for p in theirs.parameters():  # biases and norm weights too, so that every one is really compared
        torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=0.05)
    theirs.save_pretrained(tmp_path / "qwen3")
    assert main(["import", str(tmp_path / "qwen3"), "--output", str(tmp_path / "ours")]) == 0
    ours = ArgonneForCausalLM.from_pretrained(tmp_path / "ours")
    c = ours.config
    assert c.qk_norm and c.attention_bias and c.attention_out_bias and not c.tie_word_embeddings
    assert (c.head_dim, c.norm_eps, c.rope_theta) == (32, 1e-5, 1e6)
    tokens = torch.randint(0, 8192, (2, 24))
    assert (logits(ours, tokens) - logits(theirs, tokens)).abs().max() <= 1e-5


@pytest.mark.parametrize("change,reason", [
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1), r"sliding-window attention"),
    (dict(hidden_act="gelu"), r"hidden_act is 'gelu'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), r"RoPE scaling 'linear'"),
], ids=["sliding-window", "gelu", "rope-scaling"])
def test_qwen3_folders_argonne_cannot_represent_are_refused(tmp_path, change, reason):
    Qwen3Config(vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=128, **change).save_pretrained(tmp_path / "qwen3")
    with pytest.raises(ConversionError, match=reason):
        import_model(tmp_path / "qwen3", tmp_path / "ours")  # refused from its config, before any weight is read
    assert not (tmp_path / "ours").exists()


def legacy_folder(folder, model: ArgonneForCausalLM, kind: str, pipeline: bool = False, as_bin: bool = False):
    """The original Argonne code's layout for `model`'s weights (built from its documented key names)."""
    from safetensors.torch import save_file

    c, ours = model.config, model.state_dict()
    state = {}
    for i in range(c.num_hidden_layers):
        a = f"model.layers.{i}."
        if kind == "argonne":
            b = f"pipeline_stages.{i}.0." if pipeline else f"blocks.{i}."
            names = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2", "self_attn.q_proj": "attn.query",
                     "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value", "self_attn.o_proj": "attn.proj",
                     "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}
            for mine, theirs in names.items():
                for kind_ in ("weight", "bias"):
                    state[f"{b}{theirs}.{kind_}"] = ours[f"{a}{mine}.{kind_}"]
            state[f"{b}attn.mask"] = torch.tril(torch.ones(1, 1, c.max_position_embeddings, c.max_position_embeddings))
        else:
            b = f"blocks.{i}."
            for mine, theirs in {"input_layernorm": "input_norm", "post_attention_layernorm": "post_norm"}.items():
                state[f"{b}{theirs}.weight"] = ours[f"{a}{mine}.weight"]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                state[f"{b}attn.{name}.weight"] = ours[f"{a}self_attn.{name}.weight"]
            for name in ("gate_proj", "up_proj", "down_proj"):
                state[f"{b}mlp.{name}.weight"] = ours[f"{a}mlp.{name}.weight"]
    if kind == "argonne":
        state.update({"token_embedding.weight": ours["model.embed_tokens.weight"],
                      "position_embedding": ours["model.embed_positions.weight"][None],
                      "ln_f.weight": ours["model.norm.weight"], "ln_f.bias": ours["model.norm.bias"],
                      "head.weight": ours["lm_head.weight"]})
        config = {"model_type": "argonne", "vocab_size": c.vocab_size, "block_size": c.max_position_embeddings,
                  "n_layer": c.num_hidden_layers, "n_head": c.num_attention_heads, "n_embd": c.hidden_size}
    else:
        state.update({"embed_tokens.weight": ours["model.embed_tokens.weight"], "norm.weight": ours["model.norm.weight"],
                      "lm_head.weight": ours["model.embed_tokens.weight"].clone()})
        config = {"model_type": "argonne2", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
                  "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                  "num_key_value_heads": c.num_key_value_heads, "intermediate_size": c.intermediate_size,
                  "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
                  "rope_theta": c.rope_theta, "tie_word_embeddings": True}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    if as_bin:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("kind,pipeline,as_bin", [("argonne", False, True), ("argonne", True, False),
                                                  ("argonne2", False, False)],
                         ids=["1.x-bin", "1.0-pipeline", "2.0"])
def test_import_original_argonne_folders(tmp_path, kind, pipeline, as_bin):
    torch.manual_seed(0)
    if kind == "argonne":
        preset, shape = "argonne-1.0", dict(SHAPE, num_key_value_heads=4, head_dim=16, intermediate_size=256)
    else:
        preset, shape = "argonne-2.0", dict(SHAPE, head_dim=16)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset(preset, **shape, initializer_range=0.1)).eval()
    source = legacy_folder(tmp_path / "legacy", model, kind, pipeline, as_bin)
    import_model(source, tmp_path / "ours")
    imported = ArgonneForCausalLM.from_pretrained(tmp_path / "ours")
    tokens = torch.randint(0, 8192, (2, 20))
    assert (logits(imported, tokens) - logits(model, tokens)).abs().max() <= 1e-5


@pytest.mark.parametrize("which", ["sample-bpe", "qwen"])
@pytest.mark.slow
def test_gguf_metadata_tokenizer_and_tensors_read_back(tmp_path, which, request):
    import gguf
    import numpy as np

    from argonne.export import gguf_tensors, permute_for_gguf_rope

    tokenizer_dir = SAMPLE_TOKENIZER if which == "sample-bpe" else request.getfixturevalue("qwen_tokenizer_dir")
    tokenizer = load_tokenizer(tokenizer_dir)
    source = tmp_path / "argonne"
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", **{**SHAPE, "vocab_size": len(tokenizer) + 7}, eos_token_id=0)
    model = ArgonneForCausalLM(config)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    assert main(["export", str(source), "--to", "gguf", "--output", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))

    def field(key):
        value = reader.fields[key]
        return value.contents()

    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length")) == (2, 64)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.attention.key_length") == 24 and field("llama.rope.freq_base") == pytest.approx(1e4)
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == ("qwen2" if which == "qwen" else "gpt-2")
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and tokens[:3] == tokenizer.convert_ids_to_tokens([0, 1, 2])
    assert tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert len(field("tokenizer.ggml.merges")) > 0
    expected = gguf_tensors(model)
    read = {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert np.array_equal(read[name], tensor.numpy()), name
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(permute_for_gguf_rope(q, 4)[:2], q[[0, 12]])  # pairs (i, i + head_dim/2) become adjacent


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.slow
def test_gguf_holds_the_dtype_asked_for(tmp_path, dtype):
    """--dtype bf16 once wrote F32 silently: matrices must be written in the asked dtype, bit for bit, and 1-D
    tensors (norms) in F32, as llama.cpp's own converter writes them."""
    import gguf
    import numpy as np

    from argonne.export import DTYPES, gguf_tensors

    source = saved_argonne(tmp_path / "argonne")
    assert main(["export", str(source), "--to", "gguf", "--output", str(tmp_path / "out"), "--dtype", dtype]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    kinds = {"bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
             "fp16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16)}
    tensor_type, file_type = kinds[dtype]
    assert reader.fields["general.file_type"].contents() == file_type
    model = ArgonneForCausalLM.from_pretrained(source).to(DTYPES[dtype])
    read = {t.name: t for t in reader.tensors}
    expected = gguf_tensors(model)
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        if tensor.dim() == 1:
            assert read[name].tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(read[name].data), tensor.float().numpy()), name
        else:
            assert read[name].tensor_type == tensor_type, name
            bits = np.asarray(read[name].data).view(np.uint16).reshape(tensor.shape)
            assert np.array_equal(bits, tensor.view(torch.int16).numpy().view(np.uint16)), name


def test_llama_cpp_runs_the_gguf_export_like_argonne(tmp_path):
    # llama-cpp-python has no wheel on PyPI for this platform; it builds llama.cpp from source (~7 min on 2 cores),
    # so it is not part of the test install. Where it is installed, this runs the exported file for real.
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (a long source build)")
    import numpy as np

    from argonne.inference.engine import Engine
    from argonne.inference.sampling import SamplingParams

    source = saved_argonne(tmp_path / "argonne", head_dim=16, max_position_embeddings=256)
    export_model(source, "gguf", tmp_path / "gguf", "fp32")
    model, tokenizer = ArgonneForCausalLM.from_pretrained(source).eval(), load_tokenizer(source)
    ids = tokenizer("The database stores", add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(model_path=str(tmp_path / "gguf" / "model.gguf"), n_ctx=128, logits_all=True, verbose=False)
    assert llm.tokenize(b"The database stores", add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[len(ids) - 1])
    ours = logits(model, torch.tensor([ids]))[0, -1].numpy()
    assert np.abs(theirs - ours).max() <= 1e-3 * max(1.0, np.abs(ours).max())
    greedy = llm.create_completion("The database stores", max_tokens=10, temperature=0.0, top_k=1)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    assert greedy["choices"][0]["text"] == Engine(model, tokenizer).generate(["The database stores"], params)[0]


@pytest.mark.parametrize("content, problem", [
    ('{"model_type": "llama", "vocab_size": 8192, "hidden_size": 64, "num_hidden_layers": 2, '
     '"intermediate_size": 128}', r"needs positive integers for num_attention_heads \(missing or None\)"),
    ('{"model_type": "qwen3", "vocab_size": "8192", "hidden_size": 64, "num_hidden_layers": 2, '
     '"num_attention_heads": 4, "intermediate_size": 128}', r"needs positive integers for vocab_size"),
    ('[{"model_type": "llama"}]', r"not a valid model config \(a JSON array, not a JSON object\)"),
    ('{"model_type": "llama", "vocab', r"not a valid model config \(not JSON, or cut off"),
], ids=["missing-field", "mistyped-field", "json-list", "truncated"])
def test_an_import_config_that_is_not_valid_names_the_file_and_field(tmp_path, content, problem):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(content)
    with pytest.raises(ConversionError, match=rf"{tmp_path}/in/config\.json: .*{problem}"):
        import_model(tmp_path / "in", tmp_path / "ours")


def test_import_of_a_llama_folder_with_non_finite_weights_is_refused_and_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    theirs = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64))
    break_weights(theirs).save_pretrained(tmp_path / "llama")
    capsys.readouterr()  # (transformers' progress bar)
    assert main(["import", str(tmp_path / "llama"), "--output", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"argonne import: error: {tmp_path / 'llama'}: non-finite weights (NaN or Inf) in ")
    assert all(tensor in err for tensor in BROKEN_TENSORS) and err.count("\n") == 1
    assert not (tmp_path / "ours").exists()


def test_export_of_a_model_with_non_finite_weights_is_refused_before_writing_anything(nan_model_dir, tmp_path):
    with pytest.raises(ModelError, match="non-finite weights") as error:
        export_model(nan_model_dir, "llama", tmp_path / "out" / "model")
    assert all(tensor in str(error.value) for tensor in BROKEN_TENSORS)
    assert not (tmp_path / "out").exists()


def test_an_fp16_export_of_weights_fp16_cannot_hold_is_refused_naming_them(model_dir, tmp_path):
    """Finite in float32, 1e5 is Inf in float16 (largest: 65,504): the export is refused, not written with Inf."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"][0] = 1e5
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"cast to fp16: non-finite weights .*model\.norm\.weight \(1 value\); fp16 "
                                         r"cannot hold them: export with --dtype bf16 or fp32"):
        export_model(model_dir, "hf", tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists()
    export_model(model_dir, "hf", tmp_path / "out", dtype="bf16")  # bf16 holds it
