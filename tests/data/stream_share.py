"""Run under torchrun (gloo): every process reads streams with their tokenization shared, and writes what it saw
of each to OUT/NAME/rankN.json. `python stream_share.py OUT CASES_JSON`, each case {"name", "settings", "files"}:
several cases share one launch, which costs more than reading them."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from argonne import load_tokenizer
from argonne.data import DataError, DocumentSettings
from argonne.data.streaming import StreamingTokens, StreamPosition, TokenizeShare, held_out_tokens, iter_stream_windows

SAMPLE_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tokenizers" / "sample-bpe-8k"


def main():
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = TokenizeShare(rank, world, dist.new_group(backend="gloo"))
    for case in cases:
        record = read_stream(DocumentSettings(**case["settings"]), case["files"], share)
        (out / case["name"]).mkdir(parents=True, exist_ok=True)
        (out / case["name"] / f"rank{rank}.json").write_text(json.dumps(record))
        dist.barrier()
    dist.destroy_process_group()


def read_stream(settings: DocumentSettings, files: list[str], share: TokenizeShare) -> dict:
    # Tokenized in this process (workers=0): what is shared is the same either way, and worker processes (one
    # forkserver importing argonne per rank) are tested in test_batches.py.
    stream = StreamingTokens(files, load_tokenizer(SAMPLE_TOKENIZER), settings, workers=0, share=share)
    record = {}
    try:
        windows = list(iter_stream_windows(stream, StreamPosition(), 16))
        record["windows"] = [w.tolist() for w, _ in windows]
        record["positions"] = [[p.file, p.row, p.offset] for _, p in windows]
        record["held_out"] = held_out_tokens(stream, 200).tolist()
        record["tokenized"] = stream.tokenized
        record["skipped"] = stream.skipped()
    except DataError as error:
        record["error"] = str(error)
    return record


if __name__ == "__main__":
    main()
