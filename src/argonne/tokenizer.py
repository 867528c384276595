"""Tokenizer loading, the document boundary policy, and byte-level BPE training.

Document boundary policy: Qwen2.5 has no BOS token, so Argonne appends `<|endoftext|>` after every document and
nothing before it. The first document of a training window therefore starts cold, and every later one starts right
after an `<|endoftext|>`, which the model learns as "a new document begins". Chat tokens (`<|im_start|>`,
`<|im_end|>`) are never borrowed as document boundaries.
"""

from __future__ import annotations

import os
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


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Any Hugging Face tokenizer: a local folder (works offline) or a hub name such as "Qwen/Qwen2.5-3B-Instruct"
    (needs the network the first time, then the local hub cache)."""
    name_or_path = str(name_or_path or DEFAULT_TOKENIZER)
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"tokenizer path {local} is a file; pass the folder that holds tokenizer files")
        return AutoTokenizer.from_pretrained(local)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise OSError(
            f"could not load tokenizer {name_or_path!r}: not a local folder, and the hub did not serve it "
            f"(offline? pass a local folder such as ../shared/data/qwen2.5-tokenizer). Cause: {error}"
        ) from error


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
