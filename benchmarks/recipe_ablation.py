"""Recipe ablation (issue 21, "a better recipe per token"): validation loss at equal tokens for the tiny preset's
original recipe, each recipe option alone and a combination of them, over several seeds, with a plain transformers
LlamaForCausalLM of the same shape, trained by a minimal loop, as a reference for the original recipe.

    python benchmarks/recipe_ablation.py --combo muon,qk_norm    # every option alone, + that combination as "best"
    python benchmarks/recipe_ablation.py --variants original muon --seeds 0   # a quick look

Every run is the real trainer (`argonne train configs/tiny.toml`, in this process) with the variant's options on top
of configs/tiny.toml. A seed fixes both the initial weights and the data order (train.seed), so seed k of every
variant starts from the same weights and sees the same batches; every run is validated on the same held-out windows.

Budget, sized for the project's shared 2-core CPU machine, where one run trains at ~1,000 tokens/s on one thread:
the whole bundled sample, seq_len 128, micro-batch 8 (1,024 tokens a step), 150 steps (153,600 tokens per run, a
fifth of configs/tiny.toml's), warmup 15 (a tenth of the steps, as configs/tiny.toml's 20 of 200), lr 3e-3 -> 3e-4
and everything else as in configs/tiny.toml; validation every 15 steps on 32 held-out windows. 3 seeds x 7 variants
and the reference took 72 minutes of runs (two at a time: a driver can call train_variant for other variants in a
second process on the same --workdir, as long as no two processes train the same run). It ranks options on early
training: options whose gains come late or at scale may not show. Windows of 128 tokens rarely hold a document
boundary (the sample's documents average ~3,800 tokens), so document attention has little to change here.

The reference mirrors the original recipe outside Argonne: Argonne's freshly initialised weights for the seed copied
into transformers' LlamaForCausalLM (parameter names match one to one), the trainer's own batches (pretraining_data,
split_batch) in the same order, AdamW with the trainer's three parameter groups, the same lr schedule (lr_at),
clipping, float32, F.cross_entropy on the logits. Its step-1 loss must equal the original's (same weights, same
batch) and its final validation loss must lie within the original's seed spread.

The table (markdown) goes to --output and the raw curves to --json. Finished runs are kept in --workdir and reused
when a later call asks for the same run (same trainer options), so a combination can be chosen after the
single-option runs without training those again (--no-reuse trains everything afresh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.toml"
TOKENIZER = REPO / "data" / "tokenizers" / "sample-bpe-8k"

# Each recipe option: the trainer options that turn it on, on top of configs/tiny.toml. Model fields go one by one
# into model.overrides, so options that set different fields combine.
VARIANTS = {
    "original": [],
    "wsd": ["--optim.schedule='wsd'"],
    "z_loss": ["--train.z_loss=1e-4"],
    "document": ["--model.overrides.attention_scope='document'"],  # the tiny preset's boundary: eos_token_id 0
    "qk_norm": ["--model.overrides.qk_norm=true"],
    "muon": ["--optim.optimizer='muon'"],
    # FP8 (issue 22): not a recipe change but a precision one; emulated on CPUs, FP8 tensor cores on H100/H200.
    "float8_tensorwise": ["--parallel.float8='tensorwise'"],
    "float8_rowwise": ["--parallel.float8='rowwise'"],
}
REFERENCE = "llama reference"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        help=f"options to train alone, of: {', '.join(VARIANTS)}")
    parser.add_argument("--combo", default="", help="options trained together as the variant 'best', e.g. "
                                                    "wsd,z_loss,document")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: a tenth of --steps, as "
                                                                 "configs/tiny.toml's 20 of 200)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--val-windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on shared cores, a thread waiting for a descheduled partner stalls "
                             "every op (2 threads ran 4x slower than 1 on the busy 2-core machine)")
    parser.add_argument("--data", nargs="+", default=[str(REPO / "data" / "sample")],
                        help="parquet inputs, tokenized once into the work dir")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="train the transformers Llama reference of the original recipe")
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse finished runs of the work dir that had the same trainer options")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "recipe-ablation")
    parser.add_argument("--output", type=Path, default=None, help="the table (default: WORKDIR/ablation.md)")
    parser.add_argument("--json", type=Path, default=None, help="raw curves (default: WORKDIR/results.json)")
    return parser.parse_args(argv)


def chosen_variants(args) -> dict[str, list[str]]:
    """name -> the options it combines, for --variants and --combo (as "best"); unknown names end the script."""
    combo = [name for name in args.combo.split(",") if name]
    unknown = [name for name in [*args.variants, *combo] if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    variants = {"original": []}  # the baseline every other variant is measured against
    variants.update({name: [name] for name in args.variants if name != "original"})
    if combo:
        variants["best"] = combo
    return variants


def options_of(parts: list[str]) -> list[str]:
    return [option for name in parts for option in VARIANTS[name]]


def trainer_options(args, prepared: Path, seed: int, run_dir: Path) -> list[str]:
    """The run settings every variant shares (the budget above), as trainer overrides."""
    return [
        f"--data.prepared={str(prepared)!r}", "--data.inputs=[]", f"--data.tokenizer={str(TOKENIZER)!r}",
        f"--data.seq_len={args.seq_len}", f"--data.val_windows={args.val_windows}", "--data.workers=0",
        f"--train.steps={args.steps}", f"--optim.warmup_steps={args.warmup}",
        f"--train.micro_batch_size={args.micro_batch}", f"--train.seed={seed}",
        f"--train.eval_every={args.eval_every}", "--train.log_every=1",  # every step's loss: step 1 is compared
        "--train.tensorboard=false", "--train.peak_tflops=1", f"--train.run_dir={str(run_dir)!r}",
    ]


def check_variants(variants: dict[str, list[str]], args, prepared: Path) -> None:
    """Every variant's config loads on this checkout before anything trains (qk_norm and muon need their branches)."""
    from argonne import ArgonneConfig
    from argonne.run_config import load_run_config

    for name, parts in variants.items():
        try:
            options = [*trainer_options(args, prepared, 0, args.workdir), *options_of(parts)]
            config = load_run_config(CONFIG, options, "train")
            ArgonneConfig.from_preset(config.model.preset, **config.model.overrides)
        except ValueError as error:
            raise SystemExit(f"variant {name!r} ({' '.join(options_of(parts))}) does not run on this checkout: "
                             f"{error}")


def prepare_sample(args) -> Path:
    """The inputs tokenized once into the work dir (windows are cut at training time: any seq_len reads them)."""
    from argonne import load_tokenizer
    from argonne.data import DocumentSettings
    from argonne.data.prepare import PrepareSettings, prepare_dataset

    folder = args.workdir / "sample-tokens"
    documents = DocumentSettings(val_fraction=args.val_fraction)
    settings = PrepareSettings(seq_len=args.seq_len, workers=0, documents=documents)
    prepare_dataset(args.data, load_tokenizer(TOKENIZER), folder, settings, progress=False)  # resumes: done once
    return folder


# ------------------------------------------------------------------------------------------------------ training


def cached(run_dir: Path, key: list[str], args, compute) -> dict:
    """compute()'s result, or the one an earlier call with the same key (the run's options) left in `run_dir`."""
    kept = run_dir / "ablation-result.json"  # written last: the run finished
    if args.reuse and kept.is_file() and json.loads(kept.read_text())["key"] == key:
        return json.loads(kept.read_text())["result"]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {**compute(), "run": run_dir.name, "wall_s": time.perf_counter() - started}
    kept.write_text(json.dumps({"key": key, "result": result}))
    return result


def train_variant(parts: list[str], seed: int, args, prepared: Path) -> dict:
    """One trainer run of the options `parts` together. Its folder is named by them, so "best" reuses the runs of
    a single option, or of the same combination, that an earlier call trained."""
    run_dir = args.workdir / "runs" / f"{'+'.join(parts) or 'original'}-seed{seed}"
    argv = ["train", "--overwrite", str(CONFIG), *trainer_options(args, prepared, seed, run_dir), *options_of(parts)]
    return cached(run_dir, argv, args, lambda: run_trainer(argv, run_dir))


def run_trainer(argv: list[str], run_dir: Path) -> dict:
    from argonne_cli import main as argonne

    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):  # a line per step
        status = argonne(argv)
    if status != 0:
        raise SystemExit(f"{run_dir.name}: the trainer exited with {status} (see above and {run_dir})")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 60 MB a run, and nothing here resumes
    return read_metrics(run_dir)


def read_metrics(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    if not any("val_loss" in r for r in steps):
        raise SystemExit(f"{run_dir.name}: no validation loss: the prepared data holds no held-out window")
    rates = [r["tokens_per_s"] for r in steps[1:]]  # the first step pays for warming up
    return {
        "step_losses": [r["loss"] for r in steps],
        "val": [[r["tokens"], r["val_loss"]] for r in steps if "val_loss" in r],
        "tokens_per_s": len(rates) / sum(1 / r for r in rates),  # = tokens / seconds: every step has the same tokens
    }


def llama_mirror(config):
    """transformers' LlamaForCausalLM of the Argonne config's shape (as benchmarks/train_throughput.py's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias, mlp_bias=config.mlp_bias, attn_implementation="sdpa",
    ))


def next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def train_reference(seed: int, args, prepared: Path) -> dict:
    run_dir = args.workdir / "runs" / f"llama-reference-seed{seed}"
    options = trainer_options(args, prepared, seed, run_dir)
    return cached(run_dir, ["reference", *options], args, lambda: reference_run(options, seed))


def reference_run(options: list[str], seed: int) -> dict:
    """The original recipe's run, done by hand on transformers' Llama (see the module docstring)."""
    from argonne import ArgonneForCausalLM
    from argonne.run_config import load_run_config
    from argonne.data.batches import pretraining_data, split_batch
    from argonne.optim import lr_at
    from argonne.training.build import build_model_config, build_tokenizer

    config = load_run_config(CONFIG, options, "train")
    optim, steps, eval_every = config.optim, config.train.steps, config.train.eval_every
    tokenizer = build_tokenizer(config)
    model_config = build_model_config(config, tokenizer)
    torch.manual_seed(seed)  # as the trainer's build_model: Argonne's initial weights for this seed
    argonne_weights = ArgonneForCausalLM(model_config).state_dict()
    model = llama_mirror(model_config)
    missing, unexpected = model.load_state_dict(argonne_weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # the tied head is embed
    assert model.lm_head.weight is model.model.embed_tokens.weight

    # The trainer's groups: linear weights decayed; the embedding (the tied head) and the norms not.
    embedding = model.get_input_embeddings().weight
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not embedding]
    norms = [p for p in model.parameters() if p is not embedding and all(p is not w for w in linear)]
    optimizer = torch.optim.AdamW(
        [{"params": linear, "weight_decay": optim.weight_decay}, {"params": [embedding], "weight_decay": 0.0},
         {"params": norms, "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True,
    )
    batches, validation = pretraining_data(config.data, config.train.micro_batch_size, seed, tokenizer)
    batch_iter = iter(batches)
    tokens_per_step = config.train.micro_batch_size * config.data.seq_len
    step_losses, val, seconds = [], [], 0.0
    model.train()
    for step in range(steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, optim, steps)
        loss = next_token_loss(model, *split_batch(next(batch_iter)))
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(loss.item())
        seconds += (time.perf_counter() - started) if step else 0.0  # as the trainer's figure: not the first step
        if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
            with torch.no_grad():
                model.eval()
                val_loss = torch.stack([next_token_loss(model, *split_batch(b)) for b in validation]).mean().item()
                model.train()
            val.append([(step + 1) * tokens_per_step, val_loss])
    return {"step_losses": step_losses, "val": val, "tokens_per_s": (steps - 1) * tokens_per_step / seconds}


# ------------------------------------------------------------------------------------------------------ report


def tokens_to_reach(curve: list[list[float]], target: float) -> float | None:
    """Tokens at which a (tokens, loss) curve first gets down to `target`, linear between evaluations."""
    for i, (tokens, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return tokens
            before_tokens, before_loss = curve[i - 1]
            return before_tokens + (tokens - before_tokens) * (before_loss - target) / (before_loss - loss)
    return None


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# Student's t, two-sided 95%, by degrees of freedom (seeds - 1); about 2 beyond.
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def verdict(deltas: list[float]) -> str:
    """Paired t-test of the per-seed final-loss differences to the original (seed k of both starts from the same
    weights and sees the same batches, so the pairs cancel most of what a seed changes)."""
    if len(deltas) < 2:
        return "untested (one seed)"
    mean, sem = statistics.fmean(deltas), spread(deltas) / len(deltas) ** 0.5
    if abs(mean) <= T_95.get(len(deltas) - 1, 2.0) * sem:
        return "no clear difference"
    return "better" if mean < 0 else "worse"


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: final validation loss over seeds and its paired difference to the original's, the mean curve,
    the tokens to reach the original's final mean validation loss, and tokens/s."""
    summary = {}
    for name, seeds in runs.items():
        finals = [run["val"][-1][1] for run in seeds]
        curve = [[point[0], statistics.fmean(run["val"][i][1] for run in seeds)] for i, point in
                 enumerate(seeds[0]["val"])]
        summary[name] = {"final_mean": statistics.fmean(finals), "final_std": spread(finals), "curve": curve,
                         "tokens_per_s": statistics.fmean(run["tokens_per_s"] for run in seeds)}
    original = summary["original"]
    total_tokens = original["curve"][-1][0]
    for name, row in summary.items():
        row["tokens_to_original_final"] = tokens_to_reach(row["curve"], original["final_mean"])
        row["fraction"] = row["tokens_to_original_final"] and row["tokens_to_original_final"] / total_tokens
        deltas = [run["val"][-1][1] - base["val"][-1][1] for run, base in zip(runs[name], runs["original"])]
        row.update(delta_mean=statistics.fmean(deltas), delta_std=spread(deltas),
                   verdict="baseline" if name == "original" else verdict(deltas))
    return summary


def reference_check(runs: dict[str, list[dict]], summary: dict) -> dict:
    """How far the Llama reference is from the original recipe: step 1 (same weights and batch: equal to float32
    rounding) and the final validation loss (within the original's seed spread)."""
    pairs = list(zip(runs["original"], runs[REFERENCE]))
    step1 = max(abs(a["step_losses"][0] - b["step_losses"][0]) for a, b in pairs)
    final = max(abs(a["val"][-1][1] - b["val"][-1][1]) for a, b in pairs)
    means = abs(summary[REFERENCE]["final_mean"] - summary["original"]["final_mean"])
    return {"step1_max_abs_diff": step1, "final_max_abs_diff": final, "final_mean_abs_diff": means,
            "matched": step1 < 1e-4 and means <= max(summary["original"]["final_std"], 1e-3)}


def markdown(runs: dict, summary: dict, check: dict | None, variants: dict, args, wall_s: float) -> str:
    tokens_per_step = args.micro_batch * args.seq_len
    total = args.steps * tokens_per_step

    def loss(row):
        return f"{row['final_mean']:.4f} ± {row['final_std']:.4f}"

    def reached(row):
        tokens = row["tokens_to_original_final"]
        return ("not reached", "–") if tokens is None else (f"{tokens:,.0f}", f"{row['fraction']:.2f}")

    lines = [
        "# Recipe ablation: tiny preset, bundled sample (CPU)", "",
        f"`python benchmarks/recipe_ablation.py --variants {' '.join(args.variants)}"
        + (f" --combo {args.combo}" if args.combo else "") + f" --seeds {' '.join(map(str, args.seeds))}"
        + f" --steps {args.steps}`: {args.steps} steps x {tokens_per_step:,} tokens (seq_len {args.seq_len}, "
        f"micro-batch {args.micro_batch}) = {total:,} tokens per run, seeds {', '.join(map(str, args.seeds))}; "
        f"validation every {args.eval_every} steps on {args.val_windows} held-out windows. The runs took "
        f"{sum({run['run']: run['wall_s'] for seeds in runs.values() for run in seeds}.values()) / 60:.1f} min; "
        f"this call "
        f"{wall_s / 60:.1f} min (it reuses finished runs).", "",
        "| variant | options | final val loss (mean ± std) | − original, same seeds (mean ± std) | verdict "
        "| tokens to original's final | fraction | tokens/s |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, row in summary.items():
        options = (" ".join(options_of(variants[name])) if name in variants else "transformers, minimal loop") \
            or "configs/tiny.toml"
        delta = "–" if name == "original" else f"{row['delta_mean']:+.4f} ± {row['delta_std']:.4f}"
        lines.append(f"| {name} | `{options}` | {loss(row)} | {delta} | {row['verdict']} | "
                     f"{' | '.join(reached(row))} | {row['tokens_per_s']:,.0f} |")
    lines += ["", "Verdict: a paired t-test (95%) of each seed's final validation loss against the original's of the "
                  "same seed. The reference's row is what float rounding alone does to a run (same recipe)."]
    points = next(iter(summary.values()))["curve"]
    lines += ["", "Validation loss, mean over seeds, by tokens trained:", "",
              "| variant | " + " | ".join(f"{tokens / 1000:,.0f}k" for tokens, _ in points) + " |",
              "|---|" + "---:|" * len(points)]
    lines += [f"| {name} | " + " | ".join(f"{value:.4f}" for _, value in row["curve"]) + " |"
              for name, row in summary.items()]
    if check is not None:
        lines += ["", f"Reference: step-1 loss differs from the original's by at most {check['step1_max_abs_diff']:.1e}"
                      f" (same weights, same batch); final validation loss by at most "
                      f"{check['final_max_abs_diff']:.4f} per seed and {check['final_mean_abs_diff']:.4f} in the "
                      f"mean, against the original's seed std {summary['original']['final_std']:.4f}: "
                      + ("**matches**." if check["matched"] else "**does not match**.")]
    if "best" in summary:
        fraction = summary["best"]["fraction"]
        lines += ["", f"Goal (best = {args.combo} reaches the original's final validation loss in at most 75% of "
                      f"its tokens): " + ("**met**" if fraction is not None and fraction <= 0.75 else "**not met**")
                  + (f" ({fraction:.2f})." if fraction is not None else " (not reached).")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    args.workdir = args.workdir.resolve()  # runs are reused by their options, which hold its paths
    variants = chosen_variants(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_ablation(args, variants)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)


def run_ablation(args, variants: dict[str, list[str]]) -> int:
    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_sample(args)
    check_variants(variants, args, prepared)
    runs: dict[str, list[dict]] = {name: [] for name in [*variants, *([REFERENCE] if args.reference else [])]}
    for seed in args.seeds:  # seeds outermost: a machine slower for a while slows every variant alike
        for name, parts in variants.items():
            print(f"seed {seed}: {name}", flush=True)
            runs[name].append(train_variant(parts, seed, args, prepared))
        if args.reference:
            print(f"seed {seed}: {REFERENCE}", flush=True)
            runs[REFERENCE].append(train_reference(seed, args, prepared))
    summary = summarize(runs)
    check = reference_check(runs, summary) if args.reference else None
    table = markdown(runs, summary, check, variants, args, time.perf_counter() - started)
    print(table)
    output = args.output or args.workdir / "ablation.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    json_path = args.json or args.workdir / "results.json"
    json_path.write_text(json.dumps({"variants": {name: options_of(parts) for name, parts in variants.items()},
                                     "runs": runs, "summary": summary,
                                     "reference_check": check, "settings": {k: str(v) for k, v in
                                                                             vars(args).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
