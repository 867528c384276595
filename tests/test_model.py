"""The model against transformers' Llama and GPT-2, its cache, masks, loss and save/load."""

import json
import os
import subprocess
import sys

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer

from .conftest import SAMPLE_TOKENIZER, scramble_norms

# Small shapes that still exercise every option: head_dim independent of hidden / heads, grouped-query attention.
LLAMA_STYLE = dict(
    vocab_size=320, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=40, intermediate_size=160, max_position_embeddings=128,
)
GPT2_STYLE = dict(
    vocab_size=320, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    head_dim=24, intermediate_size=384, max_position_embeddings=128,
)


def make_model(preset="tiny", seed=0, **overrides) -> ArgonneForCausalLM:
    torch.manual_seed(seed)
    # A wide initialisation makes greedy decoding pick varied tokens, so token-for-token comparisons mean something.
    overrides.setdefault("initializer_range", 0.2)
    return ArgonneForCausalLM(ArgonneConfig.from_preset(preset, **overrides)).eval()


def to_llama(model: ArgonneForCausalLM) -> LlamaForCausalLM:
    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, attention_bias=c.attention_bias, mlp_bias=c.mlp_bias,
        tie_word_embeddings=c.tie_word_embeddings,
    )).eval()
    # Parameter names are Llama's, so the state dict maps one to one (a tied head has no lm_head entry).
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    assert missing == (["lm_head.weight"] if c.tie_word_embeddings else [])
    return llama


def to_gpt2(model: ArgonneForCausalLM) -> GPT2LMHeadModel:
    c = model.config
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_position_embeddings, n_embd=c.hidden_size,
        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_inner=c.intermediate_size,
        activation_function="gelu", layer_norm_epsilon=c.norm_eps, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )).eval()
    src = model.state_dict()
    dst = {
        "transformer.wte.weight": src["model.embed_tokens.weight"],
        "transformer.wpe.weight": src["model.embed_positions.weight"],
        "transformer.ln_f.weight": src["model.norm.weight"],
        "transformer.ln_f.bias": src["model.norm.bias"],
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        a, g = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            dst[g + f"ln_1.{kind}"] = src[a + f"input_layernorm.{kind}"]
            dst[g + f"ln_2.{kind}"] = src[a + f"post_attention_layernorm.{kind}"]
        # GPT-2's Conv1D stores (in, out): transpose; its c_attn is q, k and v stacked.
        dst[g + "attn.c_attn.weight"] = torch.cat([src[a + f"self_attn.{n}_proj.weight"] for n in "qkv"]).t()
        dst[g + "attn.c_attn.bias"] = torch.cat([src[a + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        for ours, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            dst[g + f"{theirs}.weight"] = src[a + f"{ours}.weight"].t()
            dst[g + f"{theirs}.bias"] = src[a + f"{ours}.bias"]
    gpt2.load_state_dict(dst, strict=True)
    return gpt2


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"attention_bias": True, "mlp_bias": True},
        {"num_key_value_heads": 4},
        {"num_key_value_heads": 1, "rope_theta": 1e6},
    ],
    ids=["tied-gqa", "untied", "biases", "mha", "mqa-theta1e6"],
)
def test_logits_equal_llama(overrides):
    model = make_model(**{**LLAMA_STYLE, **overrides})
    llama = to_llama(model)
    tokens = torch.randint(0, 320, (3, 37))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, llama(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def to_qwen3(model: ArgonneForCausalLM) -> Qwen3ForCausalLM:
    """transformers' own Qwen3 (QK-norm per head before RoPE) with the model's weights, built here from the config
    rather than by export.py, so that it checks the model independently."""
    c = model.config
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, attention_bias=c.attention_bias,
        tie_word_embeddings=c.tie_word_embeddings,
    )).eval()
    missing, unexpected = qwen3.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing == ([] if not c.tie_word_embeddings else ["lm_head.weight"])
    return qwen3


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "tie_word_embeddings": False}],
                         ids=["tied", "biases-untied"])
def test_qk_norm_logits_equal_qwen3(overrides):
    model = scramble_norms(make_model(**{**LLAMA_STYLE, **overrides, "qk_norm": True}))
    assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= \
        set(model.state_dict())
    qwen3 = to_qwen3(model)
    without_qk_norm = make_model(**{**LLAMA_STYLE, **overrides})
    without_qk_norm.load_state_dict(model.state_dict(), strict=False)  # the same weights but QK-norm's
    tokens = torch.randint(0, 320, (3, 37))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, qwen3(tokens).logits
        assert (without_qk_norm(tokens).logits - theirs).abs().max().item() > 1e-2  # so the norms matter here
    assert (ours - theirs).abs().max().item() <= 1e-5


# The two GPT-2-style presets differ only in size; shrunk to one shape they would be the same model. So each keeps
# what sets it apart: Argonne 1.5's head_dim of 81 is no multiple of 8 (here 15), and it is deeper and has more heads.
GPT2_SHAPES = {
    "argonne-1.0": GPT2_STYLE,
    "argonne-1.5": dict(GPT2_STYLE, hidden_size=90, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6,
                        head_dim=15, intermediate_size=360),
}


@pytest.mark.parametrize("preset", ["argonne-1.0", "argonne-1.5"])
def test_logits_equal_gpt2(preset):
    model = make_model(preset, **GPT2_SHAPES[preset])
    other = next(p for p in GPT2_SHAPES if p != preset)
    assert model.config.to_dict() != make_model(other, **GPT2_SHAPES[other]).config.to_dict()
    gpt2 = to_gpt2(model)
    tokens = torch.randint(0, 320, (2, 45))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, gpt2(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("preset,shape", [("tiny", LLAMA_STYLE), ("argonne-1.0", GPT2_STYLE)])
def test_greedy_with_cache_equals_without(preset, shape):
    model = make_model(preset, **shape)
    prompt = torch.randint(3, 320, (1, 7))
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 31)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 7:].tolist())) >= 4, "degenerate output would make this comparison vacuous"


def test_greedy_equals_llama_generate():
    model = make_model(**LLAMA_STYLE)
    llama = to_llama(model)
    prompt = torch.randint(3, 320, (2, 9))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(prompt, **kwargs), llama.generate(prompt, **kwargs))


@pytest.mark.parametrize("preset,shape", [("tiny", LLAMA_STYLE), ("argonne-1.0", GPT2_STYLE)])
def test_left_padded_batch_equals_each_prompt_alone(preset, shape):
    model = make_model(preset, **shape)
    prompts = [torch.randint(3, 320, (n,)) for n in (11, 4, 8)]
    width = max(len(p) for p in prompts)
    pad = 0
    input_ids = torch.full((len(prompts), width), pad)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = p
        attention_mask[row, width - len(p):] = 1
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=pad, eos_token_id=None)
    batched = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    with torch.no_grad():
        batched_logits = model(input_ids, attention_mask=attention_mask).logits
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert torch.equal(batched[row, width:], alone[0, len(p):])
        with torch.no_grad():
            alone_logits = model(p[None]).logits[0]
        # Masked and unmasked attention sum in different orders: float32 rounding only.
        torch.testing.assert_close(batched_logits[row, width - len(p):], alone_logits, rtol=1e-5, atol=5e-5)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = make_model(**LLAMA_STYLE)
    tokens = torch.randint(0, 320, (2, 12))
    labels = tokens.clone()
    labels[0, :5] = -100
    output = model(tokens, labels=labels)
    logits = output.logits[:, :-1].reshape(-1, 320)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(output.loss, expected, atol=1e-6)


def test_non_finite_loss_stays_non_finite():
    model = make_model(**LLAMA_STYLE)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    tokens = torch.randint(0, 320, (1, 8))
    assert torch.isnan(model(tokens, labels=tokens).loss)


def _loss_and_grads(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_training_loss_from_targets_equals_full_logits_cross_entropy(tied, monkeypatch):
    """`targets` takes the chunked linear + cross-entropy path: same loss, same gradients, no logits."""
    import argonne.loss_argonne as loss_module

    model = make_model(**LLAMA_STYLE, tie_word_embeddings=tied).train()
    tokens = torch.randint(0, 320, (3, 17))
    targets = tokens[:, 1:].clone()
    targets[0, :6] = -100
    full_loss, full_grads = _loss_and_grads(model, lambda m: m(tokens[:, :-1], labels=torch.cat(
        [tokens[:, :1], targets], dim=1)).loss)
    # 320-token vocabulary, chunks of 7 tokens: 48 positions take 7 chunks, the last one short.
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_LOGITS", 7 * 320)
    output = model(tokens[:, :-1], targets=targets, use_cache=False)
    assert output.logits is None
    chunked_loss, chunked_grads = _loss_and_grads(model, lambda m: m(tokens[:, :-1], targets=targets).loss)
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation takes the same path without building gradients
        torch.testing.assert_close(model(tokens[:, :-1], targets=targets).loss, full_loss, rtol=1e-6, atol=1e-6)


def test_linear_cross_entropy_under_bfloat16_autocast_matches_the_autocast_reference():
    from argonne.loss_argonne import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    reference.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_logits=16 * 300)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, reference)
    # bf16 matmuls; the weight gradient sums per-chunk bf16 products in float32 (a little more precise).
    torch.testing.assert_close(hidden.grad, expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.grad, expected[1], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_linear_cross_entropy_with_a_padded_head_matrix_is_unchanged(fused):
    """The GPU path pads the head matrix to aligned rows (zero logits, masked): loss and gradients stay the same."""
    from argonne.loss_argonne import cross_entropy_chunk, linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(45, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (45,))
    targets[:4] = -100
    reference = F.cross_entropy(F.linear(hidden, weight), targets)
    expected = torch.autograd.grad(reference, (hidden, weight))
    chunk_loss = partial(cross_entropy_chunk, fused=fused)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_logits=10 * 320, chunk_loss=chunk_loss,
                                pad_vocab_to=64)  # 320 rows, 20 of them padding; chunks of 10 tokens
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, reference)
    for grad, reference_grad in zip(grads, expected):
        assert grad.shape == reference_grad.shape
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_z_loss_inside_the_chunked_loss_equals_the_reference_from_whole_logits(fused):
    """loss = cross-entropy + c * mean(logsumexp(logits)^2) over scored tokens, its gradients those of autograd on
    the whole logits, and z returned apart without a gradient; also over chunks and a padded head matrix."""
    from argonne.loss_argonne import cross_entropy_chunk, linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(45, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (45,))
    targets[:4] = -100
    coefficient = 0.05
    logits = F.linear(hidden, weight)
    z_reference = logits[4:].logsumexp(-1).square().mean()
    reference = F.cross_entropy(logits, targets) + coefficient * z_reference
    expected = torch.autograd.grad(reference, (hidden, weight))
    loss, z = linear_cross_entropy(hidden, weight, targets, chunk_logits=10 * 320, pad_vocab_to=64,
                                   chunk_loss=partial(cross_entropy_chunk, fused=fused), z_loss=coefficient)
    assert not z.requires_grad
    torch.testing.assert_close(z, z_reference)
    torch.testing.assert_close(loss, reference)
    for grad, reference_grad in zip(torch.autograd.grad(loss, (hidden, weight)), expected):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the evaluation path gives the same pair
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, z_loss=coefficient)[0], reference)
    plain, z = linear_cross_entropy(hidden, weight, targets, z_loss=0.0)  # a coefficient of 0: z still reported
    torch.testing.assert_close(plain, F.cross_entropy(logits, targets))
    torch.testing.assert_close(z, z_reference)


def test_the_model_returns_its_z_loss_only_with_targets():
    from .conftest import small_model

    model = small_model()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    output = model(tokens[:, :-1], targets=tokens[:, 1:], use_cache=False, z_loss=1e-2)
    logits = model(tokens[:, :-1], use_cache=False).logits
    torch.testing.assert_close(output.z_loss, logits.logsumexp(-1).square().mean(), rtol=1e-5, atol=1e-5)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(output.loss, ce + 1e-2 * output.z_loss, rtol=1e-5, atol=1e-5)
    assert model(tokens[:, :-1], targets=tokens[:, 1:], use_cache=False).z_loss is None
    with pytest.raises(ValueError, match="z_loss .* with targets"):
        model(tokens, labels=tokens, z_loss=1e-2)


@pytest.mark.parametrize("fused", [False, True])
def test_loss_chunk_of_padded_logits_equals_the_unpadded_one(fused):
    """Padding columns are left out, also for a vocabulary slice whose neighbour's targets fall where they lie."""
    from argonne.loss_argonne import cross_entropy_chunk

    torch.manual_seed(0)
    padded = torch.randn(37, 320, dtype=torch.bfloat16)
    targets = torch.randint(0, 600, (37,))  # a slice of 300 rows starting at 150: many targets are elsewhere
    targets[:3] = -100
    targets[3] = 460  # the next slice's, where this slice's padding lies
    scale = torch.tensor(1 / 34)
    expected = cross_entropy_chunk(padded[:, :300].contiguous(), targets, scale, True, fused=fused, vocab_start=150)
    loss, grad = cross_entropy_chunk(padded, targets, scale, True, fused=fused, vocab_start=150, columns=300)
    torch.testing.assert_close(loss, expected[0])
    torch.testing.assert_close(grad[:, :300], expected[1])
    assert grad.shape == padded.shape and (grad[:, 300:] == 0).all()


def test_linear_cross_entropy_ignores_non_finite_logits_of_ignored_positions():
    from argonne.loss_argonne import linear_cross_entropy

    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    with torch.no_grad():
        hidden[0] = float("inf")
    targets = torch.tensor([-100, 1, 2, 3])
    loss = linear_cross_entropy(hidden, weight, targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight), targets))
    assert torch.isnan(linear_cross_entropy(hidden, weight, torch.full((4,), -100)))  # nothing scored: 0 / 0


def test_loss_chunk_written_for_compile_equals_the_eager_one():
    from argonne.loss_argonne import cross_entropy_chunk

    torch.manual_seed(0)
    logits = torch.randn(37, 300, dtype=torch.bfloat16)
    targets = torch.randint(0, 300, (37,))
    targets[:3] = -100
    scale = torch.tensor(1 / 34)
    eager = cross_entropy_chunk(logits, targets, scale, True)
    fused = cross_entropy_chunk(logits, targets, scale, True, fused=True)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-6)
    assert eager[1].dtype == torch.bfloat16 and (eager[1][:3] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_head_dim_padding_is_the_same_math(masked):
    """Zero-padding q/k/v to a multiple of 8 (what the GPU training path does at head_dim 170) changes nothing."""
    from argonne.modeling_argonne import attention, build_attention_mask

    torch.manual_seed(0)
    q = torch.randn(2, 6, 11, 17, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 17, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 17, dtype=torch.float64, requires_grad=True)
    mask = build_attention_mask(torch.tensor([[0, 0, 0] + [1] * 8, [1] * 11]), 11, 0, q.device) if masked else None
    grads = []
    for pad_to in (1, 8):
        y = attention(q, k, v, mask, pad_to)
        assert y.shape == (2, 6, 11, 17)
        grads.append((y, *torch.autograd.grad((y * y.detach().cos()).sum(), (q, k, v))))
    for plain, padded in zip(*grads):
        torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)


def packed_documents(lengths: list[int], vocab: int, seed: int) -> list[torch.Tensor]:
    """Random documents of these lengths, each closed by the boundary token 0 (the tiny preset's eos_token_id)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(1, vocab, (n - 1,), generator=generator), torch.zeros(1, dtype=torch.long)])
            for n in lengths]


@pytest.mark.parametrize("preset,shape,restart", [
    ("tiny", LLAMA_STYLE, False), ("tiny", LLAMA_STYLE, True), ("argonne-1.0", GPT2_STYLE, True),
], ids=["rope", "rope-restart", "learned-restart"])
def test_a_packed_window_with_document_attention_equals_each_document_alone(preset, shape, restart):
    """Logits of every document of a packed window (two rows, split differently; the last document cut off) equal
    the document run alone, and the window's loss is the loss of those logits. With causal attention they do not."""
    model = make_model(preset, **shape, attention_scope="document", restart_positions=restart, eos_token_id=0)
    rows = [packed_documents([7, 12, 9, 4], 320, seed=1), packed_documents([20, 3, 9], 320, seed=2)]
    window = torch.stack([torch.cat(row) for row in rows])  # (2, 32)
    with torch.no_grad():
        packed = model(window).logits
        alone = torch.stack([torch.cat([model(doc[None]).logits[0] for doc in row]) for row in rows])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        loss = model(window[:, :-1], targets=window[:, 1:], use_cache=False).loss
        torch.testing.assert_close(loss, F.cross_entropy(alone[:, :-1].reshape(-1, 320), window[:, 1:].reshape(-1)))
        causal = make_model(preset, **shape, eos_token_id=0)(window).logits
    assert not torch.allclose(causal[:, 7:], alone[:, 7:], atol=1e-3)  # the later documents saw the earlier ones


def test_learned_positions_need_restarting_for_a_packed_document_to_equal_it_alone():
    model = make_model("argonne-1.0", **GPT2_STYLE, attention_scope="document", eos_token_id=0)
    first, second = packed_documents([7, 12], 320, seed=1)
    with torch.no_grad():
        packed = model(torch.cat([first, second])[None]).logits[0, 7:]
        assert not torch.allclose(packed, model(second[None]).logits[0], atol=1e-3)


def test_document_attention_options_are_checked():
    with pytest.raises(ValueError, match="attention_scope is 'documents'"):
        ArgonneConfig.from_preset("tiny", attention_scope="documents")
    with pytest.raises(ValueError, match='restart_positions needs attention_scope "document"'):
        ArgonneConfig.from_preset("tiny", restart_positions=True)
    with pytest.raises(ValueError, match="needs eos_token_id"):
        ArgonneConfig.from_preset("tiny", attention_scope="document", eos_token_id=None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_of_documents_equals_the_boolean_mask(monkeypatch):
    """The GPU path (a flex attention BlockMask built from same_document_causal) is the same math as the CPU path's
    boolean mask; run here with flex attention's uncompiled reference implementation, on a length that leaves a
    partial block."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from argonne import modeling_argonne
    from argonne.modeling_argonne import attention, document_ids, document_mask, same_document_causal

    monkeypatch.setattr(modeling_argonne, "_compiled_flex_attention", flex_attention)
    torch.manual_seed(0)
    tokens = torch.randint(0, 6, (2, 150))  # boundary token 0: documents of a few tokens each
    documents = document_ids(tokens, 0)
    q, k, v = torch.randn(2, 4, 150, 16), torch.randn(2, 2, 150, 16), torch.randn(2, 2, 150, 16)
    block_mask = create_block_mask(same_document_causal(documents), 2, None, 150, 150, device="cpu")
    torch.testing.assert_close(attention(q, k, v, block_mask), attention(q, k, v, document_mask(documents)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "argonne-1.0"])
def test_forward_backward_on_cpu(preset):
    overrides = {} if preset == "tiny" else dict(GPT2_STYLE)
    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset(preset, **overrides)).train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 64))
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got no gradient"
    # Fresh initialisation: the loss starts near ln(vocab) (uniform predictions).
    assert abs(loss.item() - torch.log(torch.tensor(float(model.config.vocab_size))).item()) < 0.5


def test_initialisation_follows_the_documented_scheme():
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", hidden_size=512, intermediate_size=1024, num_hidden_layers=8)
    model = ArgonneForCausalLM(config)
    block = model.model.layers[0]
    residual_std = 0.02 / (2 * 8) ** 0.5
    assert abs(block.self_attn.q_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(block.self_attn.o_proj.weight.std().item() - residual_std) < 5e-4
    assert abs(block.mlp.down_proj.weight.std().item() - residual_std) < 5e-4
    assert torch.equal(block.input_layernorm.weight, torch.ones(512))
    # reset_parameters re-draws everything after meta-device construction + to_empty.
    with torch.device("meta"):
        meta_model = ArgonneForCausalLM(config)
    meta_model.to_empty(device="cpu")
    meta_model.reset_parameters()
    assert abs(meta_model.model.layers[3].mlp.down_proj.weight.std().item() - residual_std) < 5e-4
    assert torch.equal(meta_model.model.norm.weight, torch.ones(512))


def test_state_dict_keys_are_stable():
    """A contract: checkpoints, export and import rely on these names."""
    keys = set(make_model(**{**LLAMA_STYLE, "num_hidden_layers": 1}).state_dict())
    assert keys == {
        "model.embed_tokens.weight", "model.norm.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    gpt2_keys = set(make_model("argonne-1.0", **{**GPT2_STYLE, "num_hidden_layers": 1}).state_dict())
    assert {"model.embed_positions.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.bias"} <= gpt2_keys
    assert not any("gate_proj" in k for k in gpt2_keys)


def test_auto_classes_resolve_after_import(tmp_path):
    model = make_model(**LLAMA_STYLE)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is ArgonneForCausalLM


@pytest.mark.parametrize("preset,shape", [("tiny", LLAMA_STYLE), ("argonne-1.5", GPT2_STYLE),
                                          ("tiny", {**LLAMA_STYLE, "qk_norm": True})],
                         ids=["llama-style", "gpt2-style", "qk-norm"])
def test_save_load_round_trip_is_bit_exact(tmp_path, preset, shape):
    model = scramble_norms(make_model(preset, **shape))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = ArgonneForCausalLM.from_pretrained(tmp_path)
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()


REMOTE_CODE_FILES = {"configuration_argonne.py", "modeling_argonne.py", "loss_argonne.py"}


@pytest.mark.slow
def test_fresh_process_loads_with_trust_remote_code(tmp_path):
    """A saved folder carries its code (the model file and the loss file it imports relatively), and loads with
    trust_remote_code=True in a process where the argonne package cannot be imported at all (with QK-norm, so the
    copied code must have it too)."""
    folder = tmp_path / "model"
    model = scramble_norms(make_model(vocab_size=8192, num_hidden_layers=2, qk_norm=True))
    model.save_pretrained(folder)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_argonne.ArgonneConfig",
        "AutoModelForCausalLM": "modeling_argonne.ArgonneForCausalLM",
    }
    assert REMOTE_CODE_FILES <= {path.name for path in folder.glob("*.py")}
    tokens = torch.randint(3, 8192, (1, 16))
    with torch.no_grad():
        expected = model(tokens).logits
    torch.save({"tokens": tokens, "logits": expected}, tmp_path / "expected.pt")
    script = f"""
import importlib.abc, sys


class NoArgonne(importlib.abc.MetaPathFinder):  # ahead of every finder, the editable install's included
    def find_spec(self, name, path=None, target=None):
        if name == "argonne" or name.startswith("argonne."):
            raise ModuleNotFoundError(f"{{name}} is blocked in this process")
        return None


sys.meta_path.insert(0, NoArgonne())
try:
    import argonne
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("argonne must not be importable here")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = {str(folder)!r}
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
assert not any(name.split(".")[0] == "argonne" for name in sys.modules), "the installed package was imported"
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert model.config.qk_norm and model.model.layers[1].self_attn.k_norm is not None
remote = [name for name in sys.modules if name.startswith("transformers_modules")]
assert any(name.endswith(".loss_argonne") for name in remote), remote  # the folder's copy of the loss file
data = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    assert torch.equal(model(data["tokens"]).logits, data["logits"])
targets = data["tokens"][:, 1:]
assert torch.isfinite(model(data["tokens"][:, :-1], targets=targets).loss)  # the loss file's chunked loss
ids = tokenizer("The database", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=5, do_sample=False)
print("ok", tokenizer.decode(out[0]))
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok The database"), result.stdout


@pytest.mark.parametrize("style", ["llama", "gpt2", "qk-norm"])
def test_merged_projections_give_the_same_logits_and_state_dict(style):
    """merge_projections (inference): one matmul for q/k/v and for gate/up, same results, nothing stored twice."""
    if style == "gpt2":
        model = make_model("argonne-1.0", **GPT2_STYLE)
    else:
        model = scramble_norms(make_model(**LLAMA_STYLE, attention_bias=True, qk_norm=style == "qk-norm"))
    tokens = torch.randint(0, 320, (2, 11))
    expected = model(tokens).logits
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    parameters = list(model.parameters())
    model.merge_projections()
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    assert list(model.parameters()) == parameters and model.state_dict().keys() == state.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)
    attention = model.model.layers[0].self_attn  # its parameters are now slices of the merged tensors
    pairs = ((attention.k_proj.weight, attention.qkv.weight), (attention.v_proj.bias, attention.qkv.bias))
    for parameter, merged in pairs:
        assert parameter.untyped_storage().data_ptr() == merged.untyped_storage().data_ptr()


def test_a_4d_mask_may_be_boolean_or_additive():
    """A (B, 1, T, S) mask: True where a query may attend, or a float one added to the scores (0 / -inf)."""
    model = make_model(**LLAMA_STYLE)
    tokens = torch.randint(0, 320, (2, 6))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    allowed[0, :, :, 0] = False  # row 0 never attends to its first token (position 0 still attends to itself)
    allowed[0, :, 0, 0] = True
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    positions = torch.arange(6)[None].repeat(2, 1)
    with torch.no_grad():
        boolean = model(tokens, attention_mask=allowed, position_ids=positions, use_cache=False).logits
        added = model(tokens, attention_mask=additive, position_ids=positions, use_cache=False).logits
        causal = model(tokens, use_cache=False).logits
    torch.testing.assert_close(added, boolean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(boolean[1], causal[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(boolean[0, 1:], causal[0, 1:], atol=1e-3)
