"""Tokenizer CPU time per consumed token when streaming on N data-parallel processes, with the tokenization shared
(each process tokenizes every N-th row group, the parts are all-gathered) and without (every process tokenizes the
whole stream and keeps its own windows, as before sharing).

    python benchmarks/stream_tokenize.py                      # dp = 1, 2, 4; shared and not; real text, Qwen2.5
    python benchmarks/stream_tokenize.py --worlds 4 --no-share   # one N, without sharing only

(The whole default run takes about 5 minutes on 2 cores, most of it process start-up.)

For each N the script runs itself under `python -m torch.distributed.run --nproc-per-node N` (gloo, CPU,
OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false). Every rank streams with one tokenizer worker process
(`StreamingTokens(workers=1)`) and reads K micro-batches of `--micro-batch` windows of `--seq-len` tokens through
`StreamingBatches`, as a data-parallel run does, so the consumed tokens are K * N * micro_batch * seq_len. Each rank
reports `StreamingTokens.tokenized` (row groups tokenized and their CPU seconds, the worker's process_time), the CPU
time of its own process while reading (gloo exchange, packing), its wall time and a digest of its batches (the digests
with and without sharing must match).

The input's row groups are rewritten, in a temporary folder, to `--rows-per-group` documents each (the same texts in
the same order): the shared corpus has row groups of up to 512 documents (up to 1.7M Qwen2.5 tokens, 10 CPU-s), so
a short run would tokenize whole rounds of N of them for a fraction of their tokens. `--rows-per-group 0` reads the
files as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEXT = ROOT.parent / "shared" / "data" / "text"
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "qwen2.5-tokenizer"
SAMPLE_TEXT = ROOT / "data" / "sample" / "shard-00000.parquet"
SAMPLE_TOKENIZER = ROOT / "data" / "tokenizers" / "sample-bpe-8k"


# ----------------------------------------------------------------------------------------- one rank (under torchrun)


def worker(args) -> None:
    import torch.distributed as dist

    from argonne import load_tokenizer
    from argonne.data import DocumentSettings
    from argonne.data.batches import StreamingBatches
    from argonne.data.streaming import StreamingTokens, TokenizeShare

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = None if args.no_share else TokenizeShare(rank, world, dist.new_group(backend="gloo"))
    tokenizer = load_tokenizer(args.tokenizer)
    dist.barrier()  # every rank starts reading together
    wall, cpu = time.perf_counter(), time.process_time()
    stream = StreamingTokens(args.inputs, tokenizer, DocumentSettings(), workers=1, share=share)
    batches = StreamingBatches(stream, args.seq_len, args.micro_batch, rank, world)
    digest = hashlib.sha256()
    iterator = iter(batches)
    for index in range(args.batches):
        digest.update(next(iterator).numpy().tobytes())
        if index == 0:
            first_wall = time.perf_counter() - wall  # the tokenizer worker's start-up, and a first row group
    read_wall, read_cpu = time.perf_counter() - wall, time.process_time() - cpu
    iterator.close()  # stops the tokenizer worker (after the row group it is tokenizing)
    record = {
        "rank": rank,
        "world": world,
        "row_groups": stream.tokenized["row_groups"],
        "tokenizer_cpu_seconds": stream.tokenized["cpu_seconds"],
        "rank_cpu_seconds": read_cpu,
        "read_seconds": read_wall,
        "first_seconds": first_wall,
        "samples": batches.samples,
        "digest": digest.hexdigest(),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------- launcher


def rewrite_row_groups(inputs: list[str], rows: int, folder: str) -> list[str]:
    import pyarrow.parquet as pq

    from argonne.data.parquet import resolve_parquet_files

    files = []
    for index, path in enumerate(resolve_parquet_files(inputs)):
        target = os.path.join(folder, f"shard-{index:05d}.parquet")
        pq.write_table(pq.read_table(path), target, row_group_size=rows)
        files.append(target)
    return files


def launch(args, files: list[str], world: int, share: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="argonne-stream-bench-") as out:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            __file__, "--worker", "--out", out, "--tokenizer", args.tokenizer, "--seq-len", str(args.seq_len),
            "--micro-batch", str(args.micro_batch), "--batches", str(args.batches),
            *(["--no-share"] if not share else []), "--inputs", *files,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        total_wall = time.perf_counter() - started
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    consumed = args.batches * world * args.micro_batch * args.seq_len
    cpu = sum(r["tokenizer_cpu_seconds"] for r in ranks)
    return {
        "consumed": consumed,
        "row_groups": [r["row_groups"] for r in ranks],
        "tokenizer_cpu": cpu,
        "per_million": cpu / consumed * 1e6,
        "rank_cpu": sum(r["rank_cpu_seconds"] for r in ranks),
        "read_wall": max(r["read_seconds"] for r in ranks),
        "first_wall": max(r["first_seconds"] for r in ranks),
        "total_wall": total_wall,
        "digests": [r["digest"] for r in ranks],
        "batches": hashlib.sha256("".join(r["digest"] for r in ranks).encode()).hexdigest()[:12],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", help="parquet files or folders (default: ../shared/data/text, or the "
                                                    "sample shard)")
    parser.add_argument("--tokenizer", help="default: ../shared/data/qwen2.5-tokenizer, or the sample BPE")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="data-parallel sizes N")
    parser.add_argument("--batches", type=int, default=200, help="K: micro-batches read by every rank")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4, help="windows per rank per micro-batch")
    parser.add_argument("--rows-per-group", type=int, default=16,
                        help="rewrite the inputs with row groups of this many documents (0: as they are)")
    parser.add_argument("--no-share", action="store_true",
                        help="only the runs without sharing (share=None: every rank tokenizes the whole stream)")
    parser.add_argument("--share-only", action="store_true", help="only the runs with sharing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    if args.inputs is None:
        args.inputs = [str(SHARED_TEXT if SHARED_TEXT.is_dir() else SAMPLE_TEXT)]
    if args.tokenizer is None:
        args.tokenizer = str(SHARED_TOKENIZER if SHARED_TOKENIZER.is_dir() else SAMPLE_TOKENIZER)
    modes = [m for m in (True, False) if not (m and args.no_share) and not (not m and args.share_only)]
    print(f"inputs {' '.join(args.inputs)}; tokenizer {args.tokenizer}; {os.cpu_count()} CPU cores")
    print(f"K = {args.batches} micro-batches of {args.micro_batch} x {args.seq_len} tokens per rank; "
          f"row groups of {args.rows_per_group or 'the files'} documents; one tokenizer worker per rank")
    with tempfile.TemporaryDirectory(prefix="argonne-stream-bench-data-") as folder:
        files = rewrite_row_groups(args.inputs, args.rows_per_group, folder) if args.rows_per_group \
            else args.inputs
        header = (f"{'N':>2} {'sharing':>7} {'consumed':>10} {'row groups/rank':>16} {'tok CPU-s':>9} "
                  f"{'CPU-s/1M':>8} {'rank CPU-s':>10} {'1st batch s':>11} {'read s':>7} {'run s':>6} {'batches':>12}")
        print(header)
        digests = {}
        for world in args.worlds:
            for share in modes:
                r = launch(args, files, world, share)
                groups = ",".join(str(g) for g in r["row_groups"])
                print(f"{world:>2} {'yes' if share else 'no':>7} {r['consumed']:>10,} {groups:>16} "
                      f"{r['tokenizer_cpu']:>9.1f} {r['per_million']:>8.2f} {r['rank_cpu']:>10.1f} "
                      f"{r['first_wall']:>11.1f} {r['read_wall']:>7.1f} {r['total_wall']:>6.1f} {r['batches']:>12}",
                      flush=True)
                digests.setdefault(world, []).append(r["digests"])
        for world, seen in digests.items():
            if len(seen) == 2:
                print(f"N={world}: batches with and without sharing {'match' if seen[0] == seen[1] else 'DIFFER'}")
    print("tok CPU-s: tokenizer workers' CPU seconds summed over ranks (StreamingTokens.tokenized); CPU-s/1M: per "
          "million consumed tokens; rank CPU-s: the ranks' own processes while reading, summed; 1st batch s, "
          "read s: slowest rank's time to its first and its K-th batch (worker start-up included); run s: the "
          "whole torchrun, start-up included; batches: a digest of every rank's batches (equal with and without "
          "sharing)")


if __name__ == "__main__":  # the tokenizer workers' processes import this file too
    main()
