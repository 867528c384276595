"""Host cost of turning generated tokens into streamed text (StopStrings), per token, as generations grow.

    python benchmarks/stream_text.py --tokenizer ../shared/data/qwen2.5-tokenizer --inputs ../shared/data/text

Feeds the tokens of real text one at a time, as the decoding loop does, with a stop string to look for, and reports
the mean host time per token over the first N tokens. The GPU decodes a token in about a millisecond or less: text
handling must stay well under that however long the generation.
"""

from __future__ import annotations

import argparse
import time

import torch

from argonne.data.parquet import iter_texts, resolve_parquet_files
from argonne.inference.text import StopStrings
from argonne.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--inputs", nargs="+", required=True, help="parquet files or folders of real text")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1000, 4000])
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    ids: list[int] = []
    for text in iter_texts(resolve_parquet_files(args.inputs)):
        ids += tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= max(args.lengths):
            break
    print(f"{'tokens':>8}  {'us per token':>12}")
    for length in args.lengths:
        texts = StopStrings(tokenizer, 1, ["<|stop|>"], eos_ids=[], stream=lambda piece: None)
        started = time.perf_counter()
        for token in ids[:length]:
            texts.add(torch.tensor([token]))
        texts.finish()
        print(f"{length:>8,}  {(time.perf_counter() - started) / length * 1e6:>12,.1f}")


if __name__ == "__main__":
    main()
