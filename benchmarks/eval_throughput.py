"""Requests per second of Argonne's lm-eval model class against lm-eval's own `hf` backend, on the same model (an
exported Llama folder of random weights) and the same tasks, in one run.

    python benchmarks/eval_throughput.py                          # CPU: the tiny preset, float32
    python benchmarks/eval_throughput.py --preset 0.5b --device cuda --dtype bfloat16 --repeat 50   # a GPU

The tasks are tests/harness_tasks.py's three local ones (multiple choice, rolling log-likelihood, generation), each
document repeated --repeat times. Both backends get the same batch size. For each task and backend the script
reports requests/s in the model's own calls (lm-eval's `loglikelihood`, `loglikelihood_rolling` and
`generate_until`, timed around the call; requests as lm-eval counts them: one per choice for multiple choice, one
per document for rolling and generation) and in the whole `simple_evaluate` (task building included, the same work
for both), and checks that the two backends' metrics agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    "tiny": dict(preset="tiny"),
    # the 0.5B shape of the reference figures: Qwen2.5-0.5B's dimensions on the Argonne architecture
    "0.5b": dict(preset="tiny", vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64, intermediate_size=4864, max_position_embeddings=4096),
}


def build_folder(root: Path, preset: str, tokenizer: Path) -> Path:
    from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
    from argonne.export import export_model

    torch.manual_seed(0)
    shape = dict(PRESETS[preset])
    config = ArgonneConfig.from_preset(shape.pop("preset"), **shape)
    tok = load_tokenizer(tokenizer)
    if config.vocab_size < len(tok):
        raise SystemExit(f"the tokenizer has {len(tok)} tokens, more than the model's {config.vocab_size}")
    ArgonneForCausalLM(config).save_pretrained(root / "argonne")
    tok.save_pretrained(root / "argonne")
    return export_model(root / "argonne", "llama", root / "llama", "fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the sample BPE for tiny, ../shared's Qwen2.5 for 0.5b)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=10, help="copies of each task document")
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM

    from argonne.harness import ArgonneLM, evaluate_tasks
    from tests.harness_tasks import TASKS, write_tasks

    default_tokenizer = (REPO / "data" / "tokenizers" / "sample-bpe-8k" if args.preset == "tiny"
                         else REPO.parent / "shared" / "data" / "qwen2.5-tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = build_folder(root, args.preset, Path(args.tokenizer or default_tokenizer))
        tasks = write_tasks(root / "tasks", repeat=args.repeat)
        backends = {
            "argonne": lambda: ArgonneLM(pretrained=str(folder), device=args.device, dtype=args.dtype,
                                         batch_size=args.batch_size),
            "hf": lambda: HFLM(pretrained=str(folder), device=args.device, dtype=args.dtype,
                               batch_size=args.batch_size),
        }
        print(f"model {args.preset} ({folder}), device {args.device}, dtype {args.dtype}, batch {args.batch_size}, "
              f"each task document x{args.repeat}; torch {torch.__version__}")
        measured: dict[str, dict] = {}
        for name, make in backends.items():
            lm = make()
            evaluate_tasks(lm, list(TASKS), include_path=tasks, limit=2)  # warm-up (compile, graphs)
            model_seconds = timed_calls(lm, args.device)
            for task in TASKS:
                model_seconds[0] = 0.0
                sync(args.device)
                started = time.perf_counter()
                results = evaluate_tasks(lm, [task], include_path=tasks, log_samples=True)
                seconds = time.perf_counter() - started
                requests = sum(len(sample["resps"]) for sample in results["samples"][task])
                values = {k: v for k, v in results["results"][task].items() if "," in k and "stderr" not in k}
                measured.setdefault(task, {})[name] = (requests, model_seconds[0], seconds, values)
            del lm
        print(f"{'task':<18} {'requests':>8} | in the model's calls: {'argonne':>8} {'hf':>8} {'speed-up':>8} | "
              f"whole evaluation: {'argonne':>8} {'hf':>8} | metrics agree")
        for task, by in measured.items():
            (n, ours, ours_all, ours_metrics), (_, theirs, theirs_all, theirs_metrics) = by["argonne"], by["hf"]
            agree = all(abs(ours_metrics[k] - theirs_metrics[k]) <= 1e-4 * max(1.0, abs(theirs_metrics[k]))
                        for k in ours_metrics)
            print(f"{task:<18} {n:>8} | {'req/s':>21} {n / ours:>8.1f} {n / theirs:>8.1f} {theirs / ours:>7.2f}x | "
                  f"{'req/s':>17} {n / ours_all:>8.1f} {n / theirs_all:>8.1f} | {agree}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_calls(lm, device: str) -> list[float]:
    """Wrap the LM's three request methods so that their time adds up in the returned one-element list."""
    total = [0.0]
    for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        call = getattr(lm, method)

        def timed(*args, _call=call, **kwargs):
            sync(device)
            started = time.perf_counter()
            try:
                return _call(*args, **kwargs)
            finally:
                sync(device)
                total[0] += time.perf_counter() - started

        setattr(lm, method, timed)
    return total


if __name__ == "__main__":
    main()
