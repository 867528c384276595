"""Run under torchrun with 2 processes: tensor parallel 2 must give every rank identical gradients for the
parameters it replicates (embeddings, norms), and the sharded ones must assemble to the one-process gradients."""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.parallel import init_distributed, parallelize


def gradients(model):
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}


def main():
    topology = init_distributed(2, torch.device("cpu"))
    config = ArgonneConfig.from_preset("tiny", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       intermediate_size=128)
    torch.manual_seed(0)
    reference = ArgonneForCausalLM(config)
    model = ArgonneForCausalLM(config)
    model.load_state_dict(reference.state_dict())
    parallelize(model, topology, activation_checkpointing="none", compile=False, param_dtype=None)
    tokens = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    for m in (reference, model):
        m(tokens[:, :-1], targets=tokens[:, 1:], use_cache=False).loss.backward()
    ours, expected = gradients(model), gradients(reference)
    replicated = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    assert replicated and any("norm" in n for n in replicated) and "model.embed_tokens.weight" in replicated
    for name in replicated:
        gathered = [torch.empty_like(ours[name]) for _ in range(2)]
        dist.all_gather(gathered, ours[name].contiguous())
        assert torch.equal(gathered[0], gathered[1]), f"{name}: gradients differ between ranks"
    for name, grad in ours.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=f"{name}")
    if topology.is_main:
        print(f"ok: {len(replicated)} replicated parameters have identical gradients on both ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
