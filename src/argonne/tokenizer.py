"""Tokenizer loading, the document boundary policy, and byte-level BPE training.

Document boundary policy: Qwen2.5 has no BOS token, so Argonne appends `<|endoftext|>` after every document and
nothing before it. The first document of a training window therefore starts cold, and every later one starts right
after an `<|endoftext|>`, which the model learns as "a new document begins". Chat tokens (`<|im_start|>`,
`<|im_end|>`) are never borrowed as document boundaries.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# The original Argonne 2.0 tokenizer. Loads from the hub when online; pass a local folder when offline.
DEFAULT_TOKENIZER = "Qwen/Qwen2.5-3B-Instruct"
END_OF_DOCUMENT = "<|endoftext|>"

# ChatML, as Qwen uses, for tokenizers that ship no chat template of their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded: the message names it and says why."""


# A hub repository id: "name" or "owner/name" of letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def looks_local(name: str) -> bool:
    """Whether `name` means a folder rather than a hub repository: it starts with ".", "~" or "/", has more than one
    "/" (or a "\\"), or its parent folder exists here (a typo in the last part of a real path)."""
    if name.startswith((".", "~", "/")) or not _HUB_ID.fullmatch(name):
        return True
    parent = Path(name).parent
    return parent != Path(".") and parent.is_dir()


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Any Hugging Face tokenizer: a local folder (works offline) or a hub name such as "Qwen/Qwen2.5-3B-Instruct"
    (needs the network the first time, then the local hub cache). Raises TokenizerError when it cannot be loaded."""
    name = str(name_or_path or DEFAULT_TOKENIZER)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise TokenizerError(f"tokenizer path {local} is a file; pass the folder that holds tokenizer files")
        try:
            return AutoTokenizer.from_pretrained(local, trust_remote_code=False)
        except Exception as error:  # the tokenizers library raises a plain Exception for a damaged tokenizer.json
            raise TokenizerError(f"{local} holds no tokenizer transformers can load "
                                 f"({local / 'tokenizer.json'}, tokenizer_config.json): {_first_line(error)}") from None
    if looks_local(name):
        raise TokenizerError(f"tokenizer folder {name} does not exist")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as error:  # offline, no such repository, a name the hub rejects
        # One message rather than transformers' chain of hub tracebacks.
        raise TokenizerError(
            f"could not load tokenizer {name!r}: no such local folder, and the Hugging Face hub did not serve it "
            f"(offline, or no such repository?); pass a local folder saved with save_pretrained "
            f"({_first_line(error)})"
        ) from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def document_boundary_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token appended after every document: `<|endoftext|>` when the vocabulary has it, else the EOS token."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_DOCUMENT)
    if token_id is not None and token_id != tokenizer.unk_token_id:
        return token_id
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither {END_OF_DOCUMENT} nor an EOS token")
    return tokenizer.eos_token_id


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 / Argonne 1.x style) and save it in Hugging Face format.

    Special tokens come first: `<|endoftext|>` (id 0; document boundary, EOS and padding), `<|im_start|>` and
    `<|im_end|>` (id 1, 2; ChatML). Every byte is in the initial alphabet, so no text is ever unknown.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special_tokens = [END_OF_DOCUMENT, "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_DOCUMENT,
        pad_token=END_OF_DOCUMENT,
        additional_special_tokens=special_tokens[1:],
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(output_dir)
    return tokenizer
