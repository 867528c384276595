"""What the command line and the package both need to know, with the standard library only: `argonne_cli` builds
the parser from it without importing torch (so `--help` is instant), and the package imports it too, so each name
is written once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

# One-token decoding: torch's kernels (cuBLAS, SDPA) or our Triton kernels for GPUs (argonne.inference.decode_kernels;
# gemv: the matmuls; gemv+attention: and the attention). On GPUs the default is CUDA_DEFAULT_KERNELS when Triton is
# installed; elsewhere "torch".
DECODE_KERNELS = ("torch", "gemv", "gemv+attention")
CUDA_DEFAULT_KERNELS = "gemv"


# ---------------------------------------------------------------------------------------------- document settings
# The one set of document settings that `argonne data prepare` and streaming both read, so that a stream gives the
# tokens a prepare would, whatever the settings. The run config's [data] section holds these fields (DataSection
# extends DocumentSettings) and `argonne data prepare`'s flags are made from them.


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DocumentSettings:
    """Which column is text, how documents are split off for validation, which ones the quality filters drop (the
    original Argonne code's rules, as defaults) and what bad input does."""

    text_column: str = _setting("text", "parquet column holding the document text")
    id_column: str = _setting(
        "id", "column whose value decides the validation split (without it, the document's text is hashed)")
    val_fraction: float = _setting(0.0, "fraction of documents held out for validation, chosen by a hash of the id")
    on_error: str = _setting(
        "fail", 'bad input: "fail" raises an error naming the file and row; "skip" logs, counts and goes on')
    ratio_rules_min_chars: int = _setting(50, "the digit and letter rules apply to texts longer than this")
    max_digit_fraction: float = _setting(0.5, "drop texts whose characters are more than this fraction digits")
    min_letter_space_fraction: float = _setting(
        0.3, "drop texts whose characters are less than this fraction letters and whitespace")
    min_tokens: int = _setting(10, "drop documents of fewer tokens (the boundary token not counted)")

    def document_settings(self) -> DocumentSettings:
        """These settings alone (for a DataSection, without its other fields)."""
        return DocumentSettings(**{f.name: getattr(self, f.name) for f in fields(DocumentSettings)})

    def tokens_record(self) -> dict:
        """The settings that decide which tokens come out (on_error does not: it fails or skips the same rows)."""
        return {f.name: getattr(self, f.name) for f in fields(DocumentSettings) if f.name != "on_error"}


def _fraction(value) -> bool:
    return 0 <= value <= 1


# Field -> (check, what the value must be).
RULES = {
    "val_fraction": ((lambda value: 0 <= value < 1), "in [0, 1)"),  # 1 would hold every document out
    "on_error": ((lambda value: value in ("fail", "skip")), '"fail" or "skip"'),
    "ratio_rules_min_chars": ((lambda value: value >= 0), ">= 0"),
    "max_digit_fraction": (_fraction, "in [0, 1]"),
    "min_letter_space_fraction": (_fraction, "in [0, 1]"),
    "min_tokens": ((lambda value: value >= 0), ">= 0"),
    "text_column": ((lambda value: bool(value)), "a column name"),
}


def document_problems(settings: DocumentSettings, prefix: str = "", skip: set[str] = frozenset()) -> list[str]:
    """What is wrong with the settings' values (types are checked by the caller), each naming `prefix + field`."""
    problems = []
    for name, (valid, rule) in RULES.items():
        value = getattr(settings, name)
        if prefix + name in skip:
            continue
        if isinstance(value, float) and not math.isfinite(value) or not valid(value):
            problems.append(f"{prefix}{name} must be {rule}, got {value!r}")
    return problems
