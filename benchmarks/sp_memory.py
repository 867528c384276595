"""Activation memory of sequence parallel: the bytes one training forward saves for the backward on each rank
(tensors saved by autograd, distinct storages, weights excluded), under tensor parallel with sequence parallel on
and off. On CPU with gloo; the figures are per rank and independent of the device.

    torchrun --nproc-per-node 2 benchmarks/sp_memory.py --hidden 512 --layers 4 --seq 1024 --batch 2

tests/distributed_grads.py uses `saved_activation_bytes` to check that sequence parallel saves less.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.parallel import init_distributed, parallelize


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage under `tensor`, through wrappers (DTensor, a pending collective's result)."""
    while is_traceable_wrapper_subclass(tensor):
        inner, _ = tensor.__tensor_flatten__()
        tensor = getattr(tensor, inner[0])
    return tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()


def saved_activation_bytes(model, tokens: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the distinct storages that one training forward of `model` saves for its backward on this rank,
    the weights' own storages excluded (they are kept anyway)."""
    weights = {_storage(p) for p in model.parameters()}
    saved = set()

    def pack(tensor):
        saved.add(_storage(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens, targets=targets, use_cache=False)
    return sum(size for _, size in saved - weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 512), ("layers", 4), ("heads", 8), ("kv-heads", 4), ("seq", 1024),
                          ("batch", 2), ("vocab", 8192)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    topology = init_distributed(int(os.environ["WORLD_SIZE"]), torch.device("cpu"))  # all processes: TP
    config = ArgonneConfig.from_preset(
        "tiny", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=max(2048, args.seq))
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    figures = {}
    for sequence_parallel in (False, True):
        torch.manual_seed(0)
        model = parallelize(ArgonneForCausalLM(config), topology, "none", False, None,
                            sequence_parallel=sequence_parallel)
        figures[sequence_parallel] = saved_activation_bytes(model, tokens[:, :-1], tokens[:, 1:])
    every_rank = [None] * topology.world
    dist.all_gather_object(every_rank, figures)
    if topology.is_main:
        off, on = (max(f[key] for f in every_rank) for key in (False, True))
        print(f"tensor parallel {topology.tp}, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
              f"seq {args.seq}: saved activations per rank, sequence parallel off {off / 2**20:.1f} MiB, on "
              f"{on / 2**20:.1f} MiB ({on / off:.2f}x)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
