"""parallel.py in one process: activation checkpointing modes (the multi-process layouts are in test_distributed)."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.parallel import apply_activation_checkpointing

SHAPE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=160)


def loss_grads_and_backward_flops(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    # checkpoint_wrapper puts its wrapped block under `_checkpoint_wrapped_module.` in parameter names.
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, counter.get_total_flops()


@pytest.mark.slow
def test_selective_checkpointing_recomputes_no_matmul_and_keeps_the_gradients():
    torch.manual_seed(0)
    plain = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE)).train()
    tokens = torch.randint(0, 320, (2, 33))
    expected_loss, expected_grads, plain_flops = loss_grads_and_backward_flops(plain, tokens)
    flops = {}
    for mode in ("full", "selective"):
        model = copy.deepcopy(plain)
        apply_activation_checkpointing(model, mode)
        loss, grads, flops[mode] = loss_grads_and_backward_flops(model, tokens)
        assert torch.equal(loss, expected_loss)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert flops["selective"] == plain_flops  # matmuls and attention are kept, only element-wise ops rerun
    assert flops["full"] > plain_flops  # the whole block forward is recomputed


# ------------------------------------------------------------------------------------------------ FP8 (float8)


def float8_linear():
    from argonne.parallel import import_torchao_float8

    return import_torchao_float8().float8_linear.Float8Linear


def block_linears(model) -> dict:
    return {name: module for name, module in model.named_modules()
            if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)}


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_swaps_the_block_linears_and_keeps_the_state_dict(recipe):
    """Every linear of the blocks computes in (emulated) FP8 and nothing else does; the parameters are the same
    objects, so the state dict (names, shapes, dtypes, values) and a checkpoint are unchanged; the loss moves by
    FP8's rounding only."""
    from argonne.parallel import Float8Plan, apply_float8

    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE, tie_word_embeddings=False))
    tokens = torch.randint(0, 320, (2, 33))
    expected_loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    parameters = dict(model.named_parameters())
    assert apply_float8(model, Float8Plan(recipe, emulate=True)) == []
    linears = block_linears(model)
    assert len(linears) == 2 * 7 and all(isinstance(m, float8_linear()) for m in linears.values())
    assert not isinstance(model.lm_head, float8_linear())  # the output head stays in high precision
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert all(parameters[name] is p for name, p in model.named_parameters())
    assert all(block.self_attn.o_proj.writes_residual and block.mlp.down_proj.writes_residual
               for block in model.model.layers)
    loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
    assert loss != expected_loss and abs(loss - expected_loss) < 1e-2 * expected_loss


def test_float8_weights_built_on_meta_are_initialised_as_documented():
    """The large-model path: built on meta, FP8 linears whose weights torchao wraps for FSDP2's FP8 all-gather
    (tensorwise, data parallel), then materialised and initialised; the residual projections keep their smaller
    std (init_module reads a mark that the swap must carry over)."""
    from argonne.parallel import Float8Plan, apply_float8

    config = ArgonneConfig.from_preset("tiny", **{**SHAPE, "num_hidden_layers": 4, "hidden_size": 256,
                                                  "intermediate_size": 512})
    with torch.device("meta"):
        model = ArgonneForCausalLM(config)
    apply_float8(model, Float8Plan("tensorwise", emulate=True), dp=2)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    block = model.model.layers[0]
    assert isinstance(block.self_attn.q_proj, float8_linear())
    residual_std = config.initializer_range / (2 * config.num_hidden_layers) ** 0.5
    for linear, std in ((block.self_attn.q_proj, config.initializer_range), (block.self_attn.o_proj, residual_std),
                        (block.mlp.down_proj, residual_std)):
        weight = linear.weight.detach()
        weight = getattr(weight, "_tensor", weight)  # the FP8 all-gather wrapper holds the full-precision weight
        assert abs(weight.float().std().item() - std) < 0.1 * std


def test_float8_skip_keeps_named_linears_and_refuses_patterns_that_match_none():
    from argonne.parallel import Float8Plan, apply_float8

    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE))
    kept = apply_float8(model, Float8Plan("rowwise", ("first", "*.down_proj"), emulate=True))
    names = block_linears(model)
    assert kept == sorted([n for n in names if n.startswith("model.layers.0.")] + ["model.layers.1.mlp.down_proj"])
    assert all(isinstance(m, float8_linear()) != (n in kept) for n, m in names.items())
    # "last" names the last block; a pattern that matches nothing is a typo, not a silent no-op
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE))
    assert all(n.startswith("model.layers.1.") for n in apply_float8(model, Float8Plan("tensorwise", ("last",), True)))
    with pytest.raises(ValueError, match=r"parallel.float8_skip: \['model.layer.1.\*'\] match no linear"):
        apply_float8(ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE)),
                     Float8Plan("tensorwise", ("model.layer.1.*",), True))


def test_float8_keeps_linears_whose_tensor_parallel_shard_is_not_a_multiple_of_16():
    """FP8 matmuls need both dimensions of the local weight to divide by 16: under tensor parallel 4 the MLP's 160
    columns (gate, up) or rows (down) are 40 per rank; the attention's (4 heads x 64 = 256, 2 x 64 = 128) stay FP8."""
    from argonne.parallel import Float8Plan, apply_float8

    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE))
    kept = apply_float8(model, Float8Plan("tensorwise", emulate=True), tp=4)
    assert kept == sorted(f"model.layers.{i}.mlp.{name}" for i in range(2) for name in ("gate_proj", "up_proj",
                                                                                          "down_proj"))
    assert apply_float8(ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE)),
                        Float8Plan("tensorwise", emulate=True), tp=2) == []


def test_the_plan_applies_float8_before_tensor_parallel_checkpointing_compile_and_fsdp(monkeypatch):
    """torchtitan's order: FP8 modules first, so that the tensor-parallel styles, the checkpoint wrappers, the
    compiled graph and FSDP2's FP8 all-gather all see them."""
    import argonne.parallel as parallel

    applied = []
    for step in ("float8", "tensor_parallel", "activation_checkpointing", "compile", "fsdp"):
        monkeypatch.setattr(parallel, f"apply_{step}", lambda *args, step=step: applied.append(step))
    topology = parallel.Topology(world=4, mesh={"dp": "dp mesh", "tp": "tp mesh"}, dp=2, tp=2)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE))
    parallel.parallelize(model, topology, "selective", True, torch.bfloat16, parallel.Float8Plan("rowwise"))
    assert applied == ["float8", "tensor_parallel", "activation_checkpointing", "compile", "fsdp"]
    applied.clear()
    parallel.parallelize(model, topology, "none", False, None)  # float8 off by default
    assert applied == ["tensor_parallel", "activation_checkpointing", "fsdp"]


def test_float8_is_emulated_on_cpus_and_refused_on_gpus_without_fp8(monkeypatch):
    from argonne.parallel import Float8Plan

    assert Float8Plan.for_device("rowwise", ["last"], torch.device("cpu"), None) == Float8Plan("rowwise", ("last",),
                                                                                               emulate=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability 8.9\+.*NVIDIA A100 has 8.0"):
        Float8Plan.for_device("tensorwise", [], torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match="computes in bf16"):
        Float8Plan.for_device("tensorwise", [], torch.device("cuda"), None)
    assert not Float8Plan.for_device("tensorwise", [], torch.device("cuda"), torch.bfloat16).emulate


def test_selective_checkpointing_knows_the_collectives_it_keeps():
    """Their names in torch's functional collectives (a rename would leave sequence parallel's recomputed)."""
    from argonne.parallel import _SAVED_COLLECTIVES

    for name in _SAVED_COLLECTIVES:
        assert hasattr(torch.ops._c10d_functional, name), name


class FakeTensorParallelMesh:
    def __init__(self, device_type: str):
        self.device_type = device_type

    def get_group(self):
        return type("Group", (), {"group_name": "tp-group"})()


def test_async_tp_is_refused_off_cuda():
    from argonne.parallel import enable_async_tensor_parallel

    with pytest.raises(ValueError, match="parallel.async_tp needs CUDA devices .* not 'cpu'"):
        enable_async_tensor_parallel(FakeTensorParallelMesh("cpu"))


@pytest.mark.parametrize("has_enable", [True, False], ids=["torch-2.11-to-2.13", "symmetric-memory-on-first-use"])
def test_async_tp_turns_on_inductors_micro_pipelining_and_symmetric_memory(monkeypatch, has_enable):
    import torch._inductor.config
    from torch.distributed import _symmetric_memory

    from argonne.parallel import enable_async_tensor_parallel

    enabled = []
    if has_enable:
        monkeypatch.setattr(_symmetric_memory, "enable_symm_mem_for_group", enabled.append)
    else:
        monkeypatch.delattr(_symmetric_memory, "enable_symm_mem_for_group", raising=False)
    with torch._inductor.config.patch(_micro_pipeline_tp=False):  # restored on leaving
        enable_async_tensor_parallel(FakeTensorParallelMesh("cuda"))
        assert torch._inductor.config._micro_pipeline_tp is True
    assert enabled == (["tp-group"] if has_enable else [])
