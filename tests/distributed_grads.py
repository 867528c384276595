"""Run under torchrun with 2 processes: tensor parallel 2 must give every rank identical gradients for the
parameters it replicates (norms), the sharded ones (blocks, and the vocabulary-split embedding and head) must
assemble to the one-process gradients, and the loss and the gathered logits must equal the one-process ones.
The vocabulary (515) does not divide by 2, so the two vocabulary slices differ in size.

Heads: "tied", "untied", "qk-norm" (tied, with QK-norm) and "learned" (GPT-2's layout: learned positions,
LayerNorm, GELU, biases). Options after a "+": "z_loss" adds the z-loss (computed per vocabulary slice from the
combined row statistics), "document" attends within documents (the windows hold several, closed by token 3),
"sp_off" turns sequence parallel off (it is on by default), "selective" adds selective activation checkpointing
and checks that its recompute communicates nothing, "full" adds full activation checkpointing (the recompute runs
sequence-sharded like its forward), "logits" takes the loss on the gathered logits as distillation does (the
vocabulary slices' shares of the hidden states' gradient are summed). "saved-activations" alone compares the
activation memory of sequence parallel on and off; "gathered-dtype" alone checks that under bf16 autocast the
sequence-parallel all-gathers move bf16."""

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.parallel import init_distributed, parallelize

SEQ = 32  # training forwards: divisible by tp, so sequence-sharded


def gradients(model):
    return {n.replace("._checkpoint_wrapped_module", ""): (p.grad.full_tensor() if isinstance(p.grad, DTensor)
                                                            else p.grad)
            for n, p in model.named_parameters()}


def main():
    topology = init_distributed(2, torch.device("cpu"))
    for head in sys.argv[1:]:  # several heads in one launch: process start-up costs more than the check
        check(topology, head)
    # Both ranks tear down together: a rank that exits while its peer is still working leaves gloo's threads
    # running into interpreter shutdown ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def build_config(kind: str, scope: str = "causal") -> ArgonneConfig:
    gpt2 = dict(norm_type="layernorm", mlp_type="gelu", position_embedding="learned", attention_bias=True,
                mlp_bias=True, attention_out_bias=True) if kind == "learned" else {}
    return ArgonneConfig.from_preset("tiny", vocab_size=515, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=128, tie_word_embeddings=kind in ("tied", "qk-norm"),
                                     qk_norm=kind == "qk-norm", attention_scope=scope, eos_token_id=3, **gpt2)


def reference_and_parallel(topology, config, sequence_parallel=True, checkpointing="none"):
    torch.manual_seed(0)
    reference = ArgonneForCausalLM(config)
    for name, parameter in reference.named_parameters():  # norm weights other than ones, so that they count
        if "norm" in name:
            torch.nn.init.uniform_(parameter, 0.5, 1.5)
    model = ArgonneForCausalLM(config)
    model.load_state_dict(reference.state_dict())
    parallelize(model, topology, activation_checkpointing=checkpointing, compile=False, param_dtype=None,
                sequence_parallel=sequence_parallel)
    return reference, model


def batch():
    tokens = torch.randint(0, 515, (4, SEQ + 1), generator=torch.Generator().manual_seed(1))
    tokens[:, ::5] = 3  # documents of 5 tokens (their attention differs from causal only with "document")
    targets = tokens[:, 1:].clone()
    targets[0, :7] = -100
    return tokens, targets


def check(topology, head: str) -> None:
    """`head`: a kind of model and options after a "+" (see the module docstring)."""
    if head == "saved-activations":
        return check_saved_activations(topology)
    if head == "gathered-dtype":
        return check_gathered_dtype(topology)
    kind, *options = head.split("+")
    z_loss = 0.05 if "z_loss" in options else None
    sequence_parallel = "sp_off" not in options
    checkpointing = next((mode for mode in ("selective", "full") if mode in options), "none")
    config = build_config(kind, "document" if "document" in options else "causal")
    reference, model = reference_and_parallel(topology, config, sequence_parallel, checkpointing)
    tokens, targets = batch()
    with norm_input_lengths(model) as lengths:
        outputs = [forward_loss(m, tokens, targets, z_loss, "logits" in options) for m in (reference, model)]
    # The feature is on, not only the numbers equal: each rank's norms see 1/tp of the tokens.
    assert set(lengths) == {SEQ // 2 if sequence_parallel else SEQ}, lengths
    losses = [output.loss for output in outputs]
    with collectives() as backward_collectives:
        losses[1].backward()
    losses[0].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    if z_loss is not None:
        torch.testing.assert_close(outputs[1].z_loss, outputs[0].z_loss, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the vocabulary-parallel head gathers whole logits for generation and evaluation
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(tokens[:, :-1], targets=targets, z_loss=z_loss).loss, losses[0],
                                   rtol=1e-6, atol=1e-6)
        check_evaluation_forwards(model, reference, tokens)
    ours, expected = gradients(model), gradients(reference)
    replicated = {n: p for n, p in model.named_parameters()
                  if not isinstance(p, DTensor) or all(place.is_replicate() for place in p.placements)}
    assert replicated and all(("norm" in n or "embed_positions" in n or n.endswith("bias")) for n in replicated), \
        list(replicated)
    assert any("q_norm" in n for n in replicated) == (kind == "qk-norm")
    assert isinstance(model.model.embed_tokens.weight, DTensor) and isinstance(model.output_weight, DTensor)
    for name, parameter in replicated.items():  # what each rank's optimizer steps with
        grad = parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
        gathered = [torch.empty_like(grad) for _ in range(2)]
        dist.all_gather(gathered, grad.contiguous())
        assert torch.equal(gathered[0], gathered[1]), f"{name}: gradients differ between ranks"
    for name, grad in ours.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=f"{name}")
    if checkpointing == "selective":  # the recompute in the backward communicates nothing
        _, plain = reference_and_parallel(topology, config, sequence_parallel)
        loss = plain(tokens[:, :-1], targets=targets, use_cache=False, z_loss=z_loss).loss
        with collectives() as plain_collectives:
            loss.backward()
        assert backward_collectives == plain_collectives, (backward_collectives, plain_collectives)
    if topology.is_main:
        print(f"ok ({head}): {len(replicated)} replicated parameters have identical gradients on both ranks",
              flush=True)


class LossOnLogits:
    """Distillation's path: the model returns gathered logits and the loss is taken on them."""

    def __init__(self, logits, targets):
        self.loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        self.z_loss = None


def forward_loss(model, tokens, targets, z_loss, through_logits: bool):
    if through_logits:
        return LossOnLogits(model(tokens[:, :-1], use_cache=False).logits, targets)
    return model(tokens[:, :-1], targets=targets, use_cache=False, z_loss=z_loss)


def check_gathered_dtype(topology) -> None:
    """Under bf16 autocast without FSDP (tensor parallel on one node) the residual stream is float32; what the
    sequence-parallel all-gather hands attention and the MLP is what their matmuls read, bf16: half the bytes."""
    _, model = reference_and_parallel(topology, build_config("tied"))
    seen = []
    for block in model.model.layers:
        for linear in (block.self_attn.q_proj, block.mlp.up_proj):
            linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    tokens, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens[:, :-1], targets=targets, use_cache=False).loss.backward()
    assert seen and set(seen) == {torch.bfloat16}, seen
    if topology.is_main:
        print("ok (gathered-dtype): sequence parallel gathers bf16 under autocast", flush=True)


def check_evaluation_forwards(model, reference, tokens) -> None:
    """Forwards of evaluation and generation: a left-padded batch whose length divides by tp (sequence-sharded)
    and one whose length does not (plain tensor parallel), and a KV cache filled by a prefill, then one token at a
    time."""
    mask = torch.ones_like(tokens)
    mask[1, :6] = 0
    for length in (SEQ, SEQ + 1):
        torch.testing.assert_close(model(tokens[:, :length], attention_mask=mask[:, :length]).logits,
                                   reference(tokens[:, :length], attention_mask=mask[:, :length]).logits,
                                   rtol=1e-5, atol=1e-5)
    decoded = []
    for m in (reference, model):
        prefill = m(tokens[:, :SEQ - 2], use_cache=True)
        cache = getattr(prefill, "cache", None) or prefill.past_key_values
        steps = [m(tokens[:, t:t + 1], cache=cache, use_cache=True).logits for t in (SEQ - 2, SEQ - 1)]
        decoded.append(torch.cat([prefill.logits, *steps], dim=1))
    torch.testing.assert_close(decoded[1], decoded[0], rtol=1e-5, atol=1e-5)


class norm_input_lengths:
    """The sequence lengths the first block's input norm sees on this rank, within the `with`."""

    def __init__(self, model):
        self.norm = _unwrapped(model.model.layers[0]).input_layernorm

    def __enter__(self) -> list[int]:
        self.lengths = []
        self.handle = self.norm.register_forward_pre_hook(lambda module, args: self.lengths.append(args[0].shape[1]))
        return self.lengths

    def __exit__(self, *exc):
        self.handle.remove()


def _unwrapped(block):
    return getattr(block, "_checkpoint_wrapped_module", block)


class collectives(TorchDispatchMode):
    """Counts the collectives dispatched within the `with` (functional ones, and c10d's in-place ones), by name;
    not the waits (a wait on a saved output communicates nothing) nor DTensor's wrapping of pending results."""

    def __enter__(self) -> dict[str, int]:
        self.counts: dict[str, int] = {}
        super().__enter__()
        return self.counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("_c10d_functional", "c10d") and func.__name__.split(".")[0] not in (
                "wait_tensor", "_wrap_tensor_autograd"):
            name = func.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def check_saved_activations(topology) -> None:
    """Sequence parallel keeps less for the backward on each rank: the norms' and the residual stream's activations
    are 1/tp of the tokens (benchmarks/sp_memory.py measures it at a larger shape)."""
    path = Path(__file__).parents[1] / "benchmarks" / "sp_memory.py"
    spec = importlib.util.spec_from_file_location("sp_memory", path)
    sp_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp_memory)
    tokens, targets = batch()
    saved = {}
    for sequence_parallel in (False, True):
        _, model = reference_and_parallel(topology, build_config("tied"), sequence_parallel)
        saved[sequence_parallel] = sp_memory.saved_activation_bytes(model, tokens[:, :-1], targets)
    assert saved[True] < saved[False], saved
    if topology.is_main:
        print(f"ok (saved-activations): bytes saved for the backward per rank, sequence parallel off "
              f"{saved[False]}, on {saved[True]}", flush=True)


if __name__ == "__main__":
    main()
