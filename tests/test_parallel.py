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
