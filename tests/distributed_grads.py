"""Run under torchrun with 2 processes: tensor parallel 2 must give every rank identical gradients for the
parameters it replicates (norms), the sharded ones (blocks, and the vocabulary-split embedding and head) must
assemble to the one-process gradients, and the loss and the gathered logits must equal the one-process ones.
The vocabulary (515) does not divide by 2, so the two vocabulary slices differ in size. Options after a "+": "z_loss"
adds the z-loss (computed per vocabulary slice from the combined row statistics), "document" attends within
documents (the windows hold several, closed by token 3)."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.parallel import init_distributed, parallelize


def gradients(model):
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}


def main():
    topology = init_distributed(2, torch.device("cpu"))
    for head in sys.argv[1:]:  # several heads in one launch: process start-up costs more than the check
        check(topology, head)
    # Both ranks tear down together: a rank that exits while its peer is still working leaves gloo's threads
    # running into interpreter shutdown ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def check(topology, head: str) -> None:
    """`head`: "tied", "untied" or "qk-norm" (tied, with QK-norm, whose replicated weights see each rank's heads),
    with options after a "+" (see the module docstring)."""
    kind, *options = head.split("+")
    tied, qk_norm = kind != "untied", kind == "qk-norm"
    z_loss = 0.05 if "z_loss" in options else None
    scope = "document" if "document" in options else "causal"
    config = ArgonneConfig.from_preset("tiny", vocab_size=515, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       intermediate_size=128, tie_word_embeddings=tied, qk_norm=qk_norm,
                                       attention_scope=scope, eos_token_id=3)
    torch.manual_seed(0)
    reference = ArgonneForCausalLM(config)
    for name, parameter in reference.named_parameters():  # norm weights other than ones, so that they count
        if "norm" in name:
            torch.nn.init.uniform_(parameter, 0.5, 1.5)
    model = ArgonneForCausalLM(config)
    model.load_state_dict(reference.state_dict())
    parallelize(model, topology, activation_checkpointing="none", compile=False, param_dtype=None)
    tokens = torch.randint(0, 515, (4, 33), generator=torch.Generator().manual_seed(1))
    tokens[:, ::5] = 3  # documents of 5 tokens (their attention differs from causal only with "document")
    targets = tokens[:, 1:].clone()
    targets[0, :7] = -100
    outputs = [m(tokens[:, :-1], targets=targets, use_cache=False, z_loss=z_loss) for m in (reference, model)]
    losses = [output.loss for output in outputs]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    if z_loss is not None:
        torch.testing.assert_close(outputs[1].z_loss, outputs[0].z_loss, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the vocabulary-parallel head gathers whole logits for generation and evaluation
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(tokens[:, :-1], targets=targets, z_loss=z_loss).loss, losses[0],
                                   rtol=1e-6, atol=1e-6)
    ours, expected = gradients(model), gradients(reference)
    replicated = {n: p for n, p in model.named_parameters()
                  if not isinstance(p, DTensor) or all(place.is_replicate() for place in p.placements)}
    assert replicated and all("norm" in n for n in replicated), list(replicated)
    assert any("q_norm" in n for n in replicated) == qk_norm
    assert isinstance(model.model.embed_tokens.weight, DTensor) and isinstance(model.output_weight, DTensor)
    for name, parameter in replicated.items():  # what each rank's optimizer steps with
        grad = parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
        gathered = [torch.empty_like(grad) for _ in range(2)]
        dist.all_gather(gathered, grad.contiguous())
        assert torch.equal(gathered[0], gathered[1]), f"{name}: gradients differ between ranks"
    for name, grad in ours.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=f"{name}")
    if topology.is_main:
        print(f"ok ({head}): {len(replicated)} replicated parameters have identical gradients on both ranks",
              flush=True)


if __name__ == "__main__":
    main()
