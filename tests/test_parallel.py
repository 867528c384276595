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


def test_unknown_checkpointing_mode_is_refused():
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **SHAPE))
    with pytest.raises(ValueError, match="must be one of"):
        apply_activation_checkpointing(model, "some")


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
