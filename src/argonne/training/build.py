"""What a run is built from: the tokenizer, the model config and the model (parallelized), the batches, and the
objective; `TrainSpec` names the data and the objective of each training command (train, sft, distill)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ..run_config import ConfigError, RunConfig
from ..configuration_argonne import ArgonneConfig
from ..data.batches import pretraining_data
from ..device import resolve_dtype
from ..loading import load_weights, open_config
from ..metrics import count_parameters
from ..modeling_argonne import ArgonneForCausalLM
from ..parallel import Float8Plan, Topology, parallelize
from ..tokenizer import document_boundary_id, load_tokenizer
from .metrics import log_main

# Above this size the model is built on the meta device and initialised after sharding, so no process ever holds
# it whole; below it every process builds the full model from the seed, so any layout starts from identical weights.
META_INIT_PARAMETERS = 1_000_000_000


def compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 for mixed precision, or None for plain float32 (see device.resolve_dtype for "auto")."""
    dtype = resolve_dtype(name, device)
    return None if dtype == torch.float32 else dtype


# The tokenizer of runs that name none and start from no model: the tiny preset's, in the repository.
SAMPLE_TOKENIZER = "data/tokenizers/sample-bpe-8k"


def build_tokenizer(config: RunConfig):
    """data.tokenizer, by default model.init_from's own tokenizer (else the sample BPE). Starting weights come with
    the token ids they were trained on: a data.tokenizer with another vocabulary is an error naming both."""
    from ..data.documents import tokenizer_fingerprint
    from ..loading import TOKENIZER_FILES

    init_from = config.model.init_from
    has_own = bool(init_from) and any((Path(init_from) / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(config.data.tokenizer or (init_from if has_own else SAMPLE_TOKENIZER))
    if has_own and config.data.tokenizer:
        ours, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(load_tokenizer(init_from))
        if ours["vocab_sha256"] != theirs["vocab_sha256"]:
            raise ConfigError(
                f"data.tokenizer {config.data.tokenizer!r} ({ours['vocab_size']:,} tokens) is not the tokenizer of "
                f"model.init_from {init_from!r} ({theirs['vocab_size']:,} tokens): the starting weights were "
                f"trained on the other one's token ids. Leave data.tokenizer unset to use model.init_from's"
            )
    return tokenizer


def build_model_config(config: RunConfig, tokenizer) -> ArgonneConfig:
    if config.model.init_from:
        model_config = open_config(config.model.init_from)  # a checkpoint is verified first
    else:
        model_config = ArgonneConfig.from_preset(config.model.preset, **config.model.overrides)
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but model preset "
            f"{config.model.preset!r} has vocab_size {model_config.vocab_size}; set model.overrides.vocab_size"
        )
    if config.data.seq_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len ({config.data.seq_len}) exceeds the model's context, max_position_embeddings "
            f"({model_config.max_position_embeddings}); lower data.seq_len or raise model.overrides.max_position_embeddings"
        )
    model_config.eos_token_id = document_boundary_id(tokenizer)
    model_config.pad_token_id = tokenizer.pad_token_id
    return model_config


def build_model(model_config: ArgonneConfig, config: RunConfig, topology: Topology, device, dtype):
    """The model, parallelized, on `device`, initialised from train.seed."""
    # Starting weights are loaded whole before sharding, so a fine-tuning run builds the model whole.
    on_meta = count_parameters(model_config) > META_INIT_PARAMETERS and not config.model.init_from
    torch.manual_seed(config.train.seed)
    with torch.device("meta") if on_meta else nullcontext():
        model = ArgonneForCausalLM(model_config)
    if config.model.init_from:
        load_weights(model, config.model.init_from, verify=False)  # verified by build_model_config
    if not on_meta:
        model.to(device)
    float8 = Float8Plan.for_device(config.parallel.float8, config.parallel.float8_skip, device, dtype)
    parallelize(model, topology, config.parallel.activation_checkpointing, config.parallel.compile, dtype, float8,
                sequence_parallel=config.parallel.sequence_parallel, async_tp=config.parallel.async_tp)
    if on_meta:
        model.to_empty(device=device)
        torch.manual_seed(config.train.seed)
        model.reset_parameters()
    return model


def pretraining_batches(config: RunConfig, tokenizer, topology: Topology, pin_memory: bool = False):
    """This data-parallel rank's pretraining batches and the validation batches (None without held-out data). A
    stream's tokenization is shared by all processes of the run (each tokenizes 1/world of it)."""
    share = None
    if config.data.inputs and topology.world > 1:
        from ..data.streaming import TokenizeShare

        share = TokenizeShare(topology.rank, topology.world, dist.new_group(backend="gloo"))
    return pretraining_data(config.data, config.train.micro_batch_size, config.train.seed, tokenizer,
                            topology.dp_rank, topology.dp, pin_memory, share, topology.host_group)


def sft_batches(config: RunConfig, tokenizer, topology: Topology, pin_memory: bool = False):
    """This data-parallel rank's batches of instruction windows and the held-out conversations' windows."""
    from ..data.sft import sft_data

    return sft_data(config.data, config.train.micro_batch_size, config.train.seed, tokenizer, topology.dp_rank,
                    topology.dp, pin_memory, log_main=lambda text: log_main(topology.rank, text))


def cross_entropy_objective(model, inputs: torch.Tensor, targets: torch.Tensor):
    """The pretraining and SFT loss: next-token cross-entropy (targets of -100 are ignored)."""
    return model(inputs, targets=targets, use_cache=False).loss, {}


def z_loss_objective(model, inputs: torch.Tensor, targets: torch.Tensor, coefficient: float):
    """Cross-entropy + coefficient * z, computed inside the chunked loss; the parts are logged apart."""
    output = model(inputs, targets=targets, use_cache=False, z_loss=coefficient)
    return output.loss, {"ce": output.loss.detach() - coefficient * output.z_loss, "z_loss": output.z_loss}


def build_cross_entropy(config: RunConfig, model_config: ArgonneConfig, tokenizer, device):
    if config.train.z_loss:
        return partial(z_loss_objective, coefficient=config.train.z_loss)
    return cross_entropy_objective


@dataclass(frozen=True)
class TrainSpec:
    """What a training command trains on and what it minimises; the loop (`train`) is the same for all.

    `build_data(config, tokenizer, topology, pin_memory)` -> (this rank's batches, validation batches or None);
    `build_objective(config, model_config, tokenizer, device)` -> `objective(model, inputs, targets)` returning
    (loss, {name: loss component}). `name` is the command (and the config checks it asks for: see
    config.check_command)."""

    name: str
    build_data: Callable
    build_objective: Callable = build_cross_entropy


PRETRAINING = TrainSpec("train", pretraining_batches)
SFT = TrainSpec("sft", sft_batches)
