"""`argonne serve` under concurrent load: continuous batching against one request at a time, same model, same run.

    python benchmarks/serve_load.py                                       # CPU: the tiny preset, float32
    python benchmarks/serve_load.py --device cuda --preset small           # a GPU: the 0.5B shape, bf16 (serve's auto)
    python benchmarks/serve_load.py --concurrency 1,4,16 --requests-per-worker 1 --max-tokens 32   # a quick look

The model is --model (an Argonne folder with its tokenizer), or by default a random model of --preset in a temporary
folder (tiny: the sample 8k BPE; other presets: the Qwen2.5 tokenizer from shared/ or ../shared when present).
Two servers run on it, one after the other, each its own `argonne serve` process on 127.0.0.1:
  batching       --max-batch = the largest concurrency (or --max-batch): the engine decodes every running request
                 together, admitting and retiring them between steps;
  one-at-a-time  --max-batch 1: requests queue and one decodes at a time, as the server did before the engine
                 (a lock around one generator).
Each gets a short warm-up (one request, then a ramp of concurrent ones over the decode batch sizes, so that GPU
compilation and CUDA-graph capture are not timed). Then, for each --concurrency level c, c client threads each send
--requests-per-worker streaming /v1/completions requests, one after another (greedy, --max-tokens tokens, prompts
drawn in a fixed order from a list of English prompts of different lengths; the same for both servers).

Per request: the time to first token (TTFT: from sending the request to the first stream chunk that carries a
choice; the server sends one for the first token even when its text is held back, e.g. half a UTF-8 character),
the arrival of every later chunk, and the completion tokens from the final usage chunk (include_usage). The time per
output token (TPOT) of a request is (arrival of its last token - its first token) / (tokens - 1). Per server and
level: aggregate output tokens/s (all completion tokens / the level's wall time, first request sent to last
answer read), TTFT and TPOT p50/p95; then batching's speed-up in tokens/s over one-at-a-time, and batching's p50
TPOT over its single-stream (c = 1) p50 TPOT: what sharing the batch costs each stream.

The client runs in this process (threads with http.client, light next to the server's work; on a machine with few
cores it still takes some CPU from the server). `argonne serve` has no --dtype: it loads bf16 on GPUs and float32 on
CPUs. --threads sets OMP_NUM_THREADS for the servers only (default: the environment as it is). --output writes the
numbers, the machine and the command line as JSON.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
sys.path.insert(0, str(SRC))  # a checkout runs without installing; the servers get it on PYTHONPATH too

SAMPLE_TOKENIZER = REPO / "data" / "tokenizers" / "sample-bpe-8k"
QWEN_TOKENIZERS = [root / "shared" / "data" / "qwen2.5-tokenizer" for root in (REPO, REPO.parent)]

# Varied lengths (a few tokens to a paragraph), so prefill lengths differ within a batch as they would in service.
PROMPTS = (
    "Once upon a time",
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in simple terms why the sky is blue during the day and red at sunset.",
    "List three things to pack for a weekend hiking trip in the mountains, and say why each one matters.",
    "The history of the printing press begins long before Gutenberg. In China, woodblock printing was used to "
    "reproduce texts and images on paper, and movable type made of clay appeared in the eleventh century. In "
    "Europe, the",
    "Dear hiring manager, I am writing to apply for the position of data analyst at your company. Over the last "
    "five years I have",
    "Question: A train leaves the station at nine in the morning and travels at sixty miles per hour. A second "
    "train leaves the same station an hour later at eighty miles per hour on the same track. At what time does "
    "the second train catch up with the first? Answer step by step.\nAnswer:",
)
VARIANTS = ("batching", "one-at-a-time")
WARMUP_TOKENS = 16  # long enough that the concurrent warm-up requests overlap and fill the batch sizes they aim at


@dataclass
class RequestResult:
    prompt: int
    first_chunk: float | None = None
    """Seconds from sending the request to the first chunk that carries a choice: the time to first token."""
    chunk_times: list[float] = field(default_factory=list)
    """Seconds from sending the request to each chunk that carries a choice."""
    last_token: float | None = None
    """Seconds to the chunk with the finish reason: the last token's."""
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def time_per_output_token(self) -> float | None:
        if self.error or not self.completion_tokens or self.completion_tokens < 2 or self.last_token is None:
            return None
        return (self.last_token - self.first_chunk) / (self.completion_tokens - 1)


@dataclass
class Level:
    variant: str
    concurrency: int
    requests: int
    errors: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tpot_p50_s: float | None
    tpot_p95_s: float | None
    error_messages: list[str]
    per_request: list[dict]


# ------------------------------------------------------------------------------------------------------ the model

def build_model(folder: Path, preset: str, tokenizer: Path) -> Path:
    """A random model of `preset` with `tokenizer`, saved as an Argonne folder (what `argonne serve` opens)."""
    import torch

    from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer

    torch.manual_seed(0)
    # The tests' tiny model uses a wider initialisation: with the default one a random tiny model's greedy output
    # settles on end-of-text within a few tokens, and the requests would be mostly prefill.
    overrides = {"initializer_range": 0.2} if preset == "tiny" else {}
    config = ArgonneConfig.from_preset(preset, **overrides)
    tok = load_tokenizer(tokenizer)
    if config.vocab_size < len(tok):
        raise SystemExit(f"the tokenizer {tokenizer} has {len(tok)} tokens, more than the model's {config.vocab_size}")
    model = ArgonneForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def default_tokenizer(preset: str) -> Path:
    if preset == "tiny":
        return SAMPLE_TOKENIZER
    for path in QWEN_TOKENIZERS:
        if path.is_dir():
            return path
    # The model keeps its Qwen-sized vocabulary (the output layer's work is part of the shape); ids past the
    # sample BPE decode to "", so text chunks thin out, while the usage counts stay exact.
    print(f"no Qwen2.5 tokenizer at {' or '.join(map(str, QWEN_TOKENIZERS))}: using the sample BPE "
          "(pass --tokenizer for another)", file=sys.stderr)
    return SAMPLE_TOKENIZER


# ----------------------------------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: Path, port: int, max_batch: int, args) -> list[str]:
    command = [sys.executable, "-m", "argonne_cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(max_batch),
               # Room for every client at once: no 429 (one-at-a-time queues c - 1 of them).
               "--max-queue", str(max(256, 2 * max(args.concurrency))),
               "--max-tokens-limit", str(max(1024, args.max_tokens)),
               "--device", args.device,
               "--drain-timeout", "5"]  # nothing is in flight when it stops; a hang should not hold the run
    if args.kernels:
        command += ["--kernels", args.kernels]
    return command


def server_environment(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: no hub look-ups
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for_health(process: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode} before answering /health:\n"
                             f"{tail(log)}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass  # not listening yet
        finally:
            conn.close()
        time.sleep(0.25)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s:\n{tail(log)}")


@dataclass
class ServerExit:
    returncode: int | None = None
    killed: bool = False
    """True when it had not exited 30 s after SIGTERM and its process group was killed."""
    stop_s: float | None = None


def stop_server(process: subprocess.Popen) -> ServerExit:
    """SIGTERM (uvicorn drains, the engine stops), then SIGKILL to the whole session if it has not exited in 30 s."""
    outcome = ServerExit()
    started = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            outcome.killed = True
            os.killpg(process.pid, signal.SIGKILL)  # its own session: pgid == pid
            process.wait()
    outcome.returncode, outcome.stop_s = process.returncode, time.monotonic() - started
    return outcome


@contextmanager
def running_server(command: list[str], env: dict[str, str], port: int, log: Path, start_timeout: float):
    """The server as a process of its own session (a stray one is killed with its group), output in `log`;
    yields (process, exit record filled in once it has stopped)."""
    outcome = ServerExit()
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            wait_for_health(process, port, start_timeout, log)
            yield process, outcome
        finally:
            vars(outcome).update(vars(stop_server(process)))


ACCESS_LINE = re.compile(r'"(?:GET|POST) (\S+) HTTP/[\d.]+" (\d{3})')


def server_problems(log: Path) -> dict:
    """What the server's log says went wrong: answers other than 200 (uvicorn's access lines), tracebacks, and
    error lines."""
    text = log.read_text(errors="replace")
    statuses: dict[str, int] = {}
    answers = ACCESS_LINE.findall(text)
    for route, status in answers:
        if status != "200":
            statuses[f"{status} {route}"] = statuses.get(f"{status} {route}", 0) + 1
    errors = [line for line in text.splitlines() if re.search(r"\bERROR\b|Traceback|Exception", line)]
    return {"answers_logged": len(answers), "non_200": statuses, "tracebacks": text.count("Traceback"),
            "error_lines": errors[:20]}


# ----------------------------------------------------------------------------------------------------- the client

def request_body(prompt: str, max_tokens: int) -> bytes:
    return json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()


def stream_completion(port: int, prompt_index: int, max_tokens: int, timeout: float) -> RequestResult:
    """One streamed /v1/completions request, timed chunk by chunk (a connection of its own, as separate clients)."""
    result = RequestResult(prompt_index)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=request_body(PROMPTS[prompt_index], max_tokens),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}"
            return result
        for line in response:  # server-sent events: "data: {...}" lines between blank ones
            arrived = time.perf_counter() - started  # before parsing: the parse is the client's time
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = f"error event: {chunk['error'].get('message')}"
                break
            if chunk.get("choices"):
                result.chunk_times.append(arrived)
                if result.first_chunk is None:
                    result.first_chunk = arrived
                if chunk["choices"][0].get("finish_reason") is not None:
                    result.last_token = arrived
            if chunk.get("usage"):
                result.completion_tokens = chunk["usage"]["completion_tokens"]
        if result.error is None and (result.completion_tokens is None or result.first_chunk is None):
            result.error = "the stream ended without a token or without its usage chunk"
    except (OSError, http.client.HTTPException, ValueError) as error:  # timeouts, resets, bad JSON
        result.error = f"{type(error).__name__}: {error}"
    finally:
        conn.close()
    return result


def prompt_index(worker: int, request: int, per_worker: int) -> int:
    return (worker * per_worker + request) % len(PROMPTS)


def run_workers(port: int, concurrency: int, per_worker: int, max_tokens: int,
                timeout: float) -> tuple[list[RequestResult], float]:
    """`concurrency` threads, each sending `per_worker` requests one after another; (results, wall seconds from the
    moment all threads are released to the last one's end)."""
    results: list[list[RequestResult]] = [[] for _ in range(concurrency)]
    ready = threading.Barrier(concurrency + 1)

    def worker(w: int) -> None:
        ready.wait()
        for i in range(per_worker):
            results[w].append(stream_completion(port, prompt_index(w, i, per_worker), max_tokens, timeout))

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return [r for own in results for r in own], time.perf_counter() - started


def warm_up(port: int, max_batch: int, top: int, timeout: float) -> None:
    """One request, then `k` concurrent ones for each decode batch size k up to the largest used: on GPUs each
    batch size's step is compiled and captured on first use, which should not be timed."""
    sizes = sorted({min(1 << i, max_batch, top) for i in range(max(max_batch, top).bit_length() + 1)})
    for k in sizes:
        results, _ = run_workers(port, k, 1, WARMUP_TOKENS, timeout)
        failed = [r.error for r in results if r.error]
        if failed:
            raise SystemExit(f"warm-up with {k} concurrent requests failed: {failed[0]}")


# ---------------------------------------------------------------------------------------------------- the numbers

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    values = sorted(values)
    position = (len(values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def summarize(variant: str, concurrency: int, results: list[RequestResult], wall: float) -> Level:
    done = [r for r in results if not r.error]
    tokens = sum(r.completion_tokens for r in done)
    ttft = [r.first_chunk for r in done]
    tpot = [t for t in (r.time_per_output_token for r in done) if t is not None]
    per_request = [{"prompt": r.prompt, "ttft_s": r.first_chunk, "last_token_s": r.last_token,
                    "completion_tokens": r.completion_tokens, "chunks": len(r.chunk_times),
                    "tpot_s": r.time_per_output_token, "error": r.error} for r in results]
    return Level(variant, concurrency, len(results), len(results) - len(done), tokens, wall, tokens / wall,
                 percentile(ttft, 50), percentile(ttft, 95), percentile(tpot, 50), percentile(tpot, 95),
                 sorted({r.error for r in results if r.error}), per_request)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def print_levels(levels: list[Level]) -> None:
    print(f"\n{'server':<14} {'c':>3} {'requests':>8} {'errors':>6} {'tokens':>7} {'tok/req':>7} {'wall s':>7} "
          f"{'tokens/s':>9} | {'TTFT p50':>8} {'p95 ms':>8} | {'TPOT p50':>8} {'p95 ms':>8}")
    for level in levels:
        per_request = level.completion_tokens / max(1, level.requests - level.errors)
        print(f"{level.variant:<14} {level.concurrency:>3} {level.requests:>8} {level.errors:>6} "
              f"{level.completion_tokens:>7} {per_request:>7.1f} {level.wall_s:>7.2f} {level.tokens_per_s:>9.1f} | "
              f"{ms(level.ttft_p50_s):>8} {ms(level.ttft_p95_s):>8} | {ms(level.tpot_p50_s):>8} "
              f"{ms(level.tpot_p95_s):>8}")


def compare(levels: list[Level]) -> list[dict]:
    """Per concurrency: batching's tokens/s over one-at-a-time's, and batching's p50 TPOT over its c = 1 p50 TPOT."""
    by = {(level.variant, level.concurrency): level for level in levels}
    single = by.get(("batching", 1))
    rows = []
    for c in sorted({level.concurrency for level in levels}):
        batching, serial = by.get(("batching", c)), by.get(("one-at-a-time", c))
        if batching is None or serial is None:
            continue
        ratio = (batching.tpot_p50_s / single.tpot_p50_s
                 if single and single.tpot_p50_s and batching.tpot_p50_s is not None else None)
        rows.append({"concurrency": c, "batching_tokens_per_s": batching.tokens_per_s,
                     "one_at_a_time_tokens_per_s": serial.tokens_per_s,
                     "speedup": batching.tokens_per_s / serial.tokens_per_s if serial.tokens_per_s else None,
                     "tpot_p50_over_single_stream": ratio})
    return rows


def print_comparison(rows: list[dict]) -> None:
    print(f"\n{'c':>3} {'batching tok/s':>14} {'one-at-a-time':>13} {'speed-up':>8} | batching TPOT p50 / c=1 TPOT p50")
    for row in rows:
        ratio = "-" if row["tpot_p50_over_single_stream"] is None else f"{row['tpot_p50_over_single_stream']:.2f}x"
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        print(f"{row['concurrency']:>3} {row['batching_tokens_per_s']:>14.1f} "
              f"{row['one_at_a_time_tokens_per_s']:>13.1f} {speedup:>8} | {ratio}")


def machine(device: str) -> dict:
    import torch

    cuda = torch.cuda.is_available() and device != "cpu"
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "device": device,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


# ------------------------------------------------------------------------------------------------------- the run

def benchmark_server(variant: str, max_batch: int, model: Path, logs: Path, args) -> tuple[list[Level], dict]:
    port = free_port()
    log = logs / f"server-{variant}.log"
    command = server_command(model, port, max_batch, args)
    print(f"--- {variant}: {' '.join(command[1:])}", flush=True)
    levels = []
    started = time.monotonic()
    with running_server(command, server_environment(args.threads), port, log, args.start_timeout) as (_, outcome):
        print(f"    up after {time.monotonic() - started:.1f} s; warming up", flush=True)
        started = time.monotonic()
        warm_up(port, max_batch, max(args.concurrency), args.request_timeout)
        print(f"    warm-up {time.monotonic() - started:.1f} s", flush=True)
        for c in args.concurrency:
            results, wall = run_workers(port, c, args.requests_per_worker, args.max_tokens, args.request_timeout)
            level = summarize(variant, c, results, wall)
            levels.append(level)
            print(f"    c={c}: {level.requests} requests ({level.errors} failed), {level.completion_tokens} tokens "
                  f"in {wall:.2f} s = {level.tokens_per_s:.1f} tokens/s", flush=True)
            for message in level.error_messages[:3]:
                print(f"      error: {message}", flush=True)
    problems = {**server_problems(log), "exit_status": outcome.returncode, "killed_after_sigterm": outcome.killed,
                "stop_s": round(outcome.stop_s, 2)}
    if problems["non_200"] or problems["tracebacks"] or problems["error_lines"] or outcome.killed:
        print(f"    the server's log shows problems: {json.dumps(problems)}\n{tail(log, 30)}", flush=True)
    return levels, problems


def concurrency_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers >= 1, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="Argonne model folder with its tokenizer (default: a random --preset model)")
    parser.add_argument("--preset", default="tiny", help="preset of the random model: tiny, small (the 0.5B shape), "
                        "argonne-1.0, ... (configuration_argonne.PRESETS)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer of the random model")
    parser.add_argument("--device", default="auto", help="argonne serve --device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--kernels", default=None, help="argonne serve --kernels (default: serve's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the servers (default: leave the environment as it is)")
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 4, 16, 64],
                        help="comma-separated client counts (default: 1,4,16,64)")
    parser.add_argument("--requests-per-worker", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="the batching server's --max-batch (default: the largest concurrency)")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds for a server to answer /health")
    parser.add_argument("--request-timeout", type=float, default=300,
                        help="seconds a request may wait for its next bytes before it counts as failed")
    parser.add_argument("--output", type=Path, default=None, help="write the numbers as JSON to this file")
    args = parser.parse_args()
    if args.requests_per_worker < 1 or args.max_tokens < 1:
        parser.error("--requests-per-worker and --max-tokens must be >= 1")
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"argonne serve needs {' and '.join(missing)}, not installed for {sys.executable}")
    max_batch = args.max_batch or max(args.concurrency)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        if args.model is None:
            started = time.monotonic()
            tokenizer = args.tokenizer or default_tokenizer(args.preset)
            model = build_model(tmp / f"random-{args.preset}", args.preset, tokenizer)
            print(f"random {args.preset} model with tokenizer {tokenizer} in {time.monotonic() - started:.1f} s")
        else:
            model = args.model
        info = machine(args.device)
        print(f"model {model}; {args.requests_per_worker} requests per worker of {args.max_tokens} tokens, greedy; "
              f"concurrency {args.concurrency}; {info['cpu_count']} CPUs, torch {info['torch']}, device "
              f"{args.device}{' (' + info['gpu'] + ')' if info['gpu'] else ''}", flush=True)
        levels, problems = [], {}
        for variant, batch in zip(VARIANTS, (max_batch, 1)):
            own, problems[variant] = benchmark_server(variant, batch, model, tmp, args)
            levels += own

    print_levels(levels)
    rows = compare(levels)
    print_comparison(rows)
    if args.output:
        report = {"command": [sys.executable, *sys.argv], "machine": info,
                  "settings": {"model": str(args.model) if args.model else f"random {args.preset}",
                               "max_batch": max_batch, "concurrency": args.concurrency,
                               "requests_per_worker": args.requests_per_worker, "max_tokens": args.max_tokens,
                               "kernels": args.kernels, "threads": args.threads,
                               "ttft": "from sending the request to the first stream chunk carrying a choice",
                               "tpot": "(last token's chunk - first chunk) / (completion tokens - 1), per request"},
                  "levels": [asdict(level) for level in levels], "comparison": rows, "server_problems": problems}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
