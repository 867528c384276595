"""optim.py: the learning-rate schedule, which parameters each optimizer takes, Muon's step (against
torch.optim.Muon, skipped on non-finite steps) and which optimizer a checkpoint's state belongs to."""

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.checkpoint import CheckpointError, save_checkpoint
from argonne.run_config import ConfigError, OptimSection, load_run_config
from argonne.optim import Muon, build_optimizer, check_resumable, checkpoint_optimizer, lr_at, newton_schulz, set_lr

ARGONNE_1 = dict(hidden_size=32, head_dim=8, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                 intermediate_size=64)  # untied head, biases, learned positions, LayerNorm, GELU MLP
TINY = dict(num_hidden_layers=2, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)  # tied head, RMSNorm, SwiGLU, no biases


def test_lr_schedule_warms_up_then_decays_to_min():
    optim = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, optim, 100) == pytest.approx(0.1)
    assert lr_at(9, optim, 100) == pytest.approx(1.0)
    assert lr_at(55, optim, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, optim, 100) == pytest.approx(0.1)
    values = [lr_at(s, optim, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    optim = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, optim, 100) == pytest.approx(0.1)  # the same warmup as cosine
    assert [lr_at(s, optim, 100) for s in (9, 10, 50, 80)] == [1.0, 1.0, 1.0, 1.0]  # stable until the last 20%
    assert lr_at(90, optim, 100) == pytest.approx(0.55)
    assert lr_at(100, optim, 100) == pytest.approx(0.1)
    values = [lr_at(s, optim, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(99, OptimSection(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.0), 100) == 1.0
    whole = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=1.0)
    assert lr_at(55, whole, 100) == pytest.approx(0.55)  # decaying from the end of the warmup
    with pytest.raises(ConfigError, match="optim.schedule must be cosine or wsd, got 'linear'"):
        load_run_config(None, ["--optim.schedule=linear"])
    with pytest.raises(ConfigError, match=r"optim.decay_fraction must be in \[0, 1\]"):
        load_run_config(None, ["--optim.decay_fraction=1.5"])


def model_of(preset: str, **fields) -> ArgonneForCausalLM:
    torch.manual_seed(0)
    return ArgonneForCausalLM(ArgonneConfig.from_preset(preset, **fields))


def names_of(model, params) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in params}


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = model_of("argonne-1.0", **ARGONNE_1)
    [optimizer] = build_optimizer(model, OptimSection(weight_decay=0.1))  # the default: AdamW alone
    decayed = names_of(model, optimizer.param_groups[0]["params"])
    assert decayed == {n for n, p in model.named_parameters()
                       if p.ndim == 2 and "embed_" not in n}
    assert "lm_head.weight" in decayed and "model.embed_tokens.weight" not in decayed
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("preset,fields", [("argonne-1.0", ARGONNE_1), ("tiny", TINY)], ids=["untied", "tied"])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(preset, fields):
    model = model_of(preset, **fields)
    optim = OptimSection(optimizer="muon", lr=0.02, weight_decay=0.1, muon_momentum=0.9, muon_ns_steps=4)
    adamw, muon = build_optimizer(model, optim)
    matrices = names_of(model, muon.param_groups[0]["params"])
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert matrices == {n for n, p in model.named_parameters()
                        if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    assert {n.split(".")[-2] for n in matrices} == set(projections) - ({"gate_proj"} if preset != "tiny" else set())
    rest = [names_of(model, group["params"]) for group in adamw.param_groups]
    assert set().union(*rest) == {n for n, _ in model.named_parameters()} - matrices  # each parameter once
    decayed = set().union(*(names for names, g in zip(rest, adamw.param_groups) if g["weight_decay"]))
    assert decayed == ({"lm_head.weight"} if preset != "tiny" else set())  # a tied head is the embedding
    assert (muon.defaults["lr"], muon.defaults["weight_decay"]) == (0.02, 0.1)  # AdamW's lr and decay
    assert (muon.defaults["momentum"], muon.defaults["ns_steps"], muon.defaults["nesterov"]) == (0.9, 4, True)
    set_lr([adamw, muon], 0.005)
    assert [g["lr"] for o in (adamw, muon) for g in o.param_groups] == [0.005] * (len(adamw.param_groups) + 1)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=["tall", "wide"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_on_plain_tensors_equals_torch_muon(shape, nesterov):
    """torch.optim.Muon scaled to AdamW's RMS is the reference: the same arithmetic, to the bit (in bfloat16, as
    torch's runs Newton-Schulz; on a CPU ours runs float32 unless told)."""
    torch.manual_seed(0)
    start = torch.randn(shape)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours_opt = Muon([ours], lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=nesterov, ns_dtype=torch.bfloat16)
    theirs_opt = torch.optim.Muon([theirs], lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                                  adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(shape)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_opt.state[ours]["momentum_buffer"], theirs_opt.state[theirs]["momentum_buffer"])


def test_newton_schulz_makes_the_singular_values_near_one_and_keeps_the_vectors():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        matrix = torch.randn(shape)
        out = newton_schulz(matrix * 1e3, 5).float()  # the scale of the input does not matter; bfloat16 suffices
        assert out.shape == shape
        singular = torch.linalg.svdvals(out)
        assert singular.min() > 0.6 and singular.max() < 1.25, singular
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        assert torch.nn.functional.cosine_similarity(out.flatten(), (u @ vh).flatten(), dim=0) > 0.98


def test_a_skipped_muon_step_changes_neither_weights_nor_momentum():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 4))
    muon = Muon([param], lr=0.1, weight_decay=0.1)
    param.grad = torch.randn(8, 4)
    muon.step()  # a momentum buffer to keep
    weight, buffer = param.detach().clone(), muon.state[param]["momentum_buffer"].clone()
    param.grad = torch.full((8, 4), float("nan"))
    muon.found_inf = torch.ones(())
    muon.step()
    assert torch.equal(param, weight) and torch.equal(muon.state[param]["momentum_buffer"], buffer)
    param.grad = torch.randn(8, 4)
    muon.found_inf = torch.zeros(())
    muon.step()
    assert not torch.equal(param, weight) and not torch.equal(muon.state[param]["momentum_buffer"], buffer)


def saved_after_a_step(folder, optim: OptimSection):
    model = model_of("tiny", **TINY)
    optimizers = build_optimizer(model, optim)
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return save_checkpoint(folder, 1, model, optimizers, {"step": 1}, is_main=True), model, optimizers


def test_muon_state_resumes_and_another_optimizers_state_is_refused(tmp_path):
    from argonne.checkpoint import load_checkpoint

    muon_path, saved, (_, saved_muon) = saved_after_a_step(tmp_path / "muon", OptimSection(optimizer="muon"))
    adamw_path, *_ = saved_after_a_step(tmp_path / "adamw", OptimSection())
    assert (checkpoint_optimizer(muon_path), checkpoint_optimizer(adamw_path)) == ("muon", "adamw")

    model = model_of("tiny", **TINY)
    optimizers = build_optimizer(model, OptimSection(optimizer="muon"))
    check_resumable(muon_path, OptimSection(optimizer="muon"))
    load_checkpoint(muon_path, model, optimizers, {"step": 0})
    by_name = dict(saved.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, by_name[name]), name
    for param, saved_param in zip(optimizers[1].param_groups[0]["params"], saved_muon.param_groups[0]["params"]):
        assert torch.equal(optimizers[1].state[param]["momentum_buffer"],
                           saved_muon.state[saved_param]["momentum_buffer"])

    for path, saved_with, resumed_with in ((adamw_path, "adamw", "muon"), (muon_path, "muon", "adamw")):
        expected = (rf"optimizer state is {saved_with}'s .*this run has optim.optimizer = '{resumed_with}'"
                    rf".*--optim.optimizer={saved_with}")
        with pytest.raises(CheckpointError, match=expected):
            check_resumable(path, OptimSection(optimizer=resumed_with))
