"""The engine's prefix cache and paged KV blocks, measured: with and without, same model, same run.

    python benchmarks/prefix_cache.py                    # CPU: the tiny preset, float32
    python benchmarks/prefix_cache.py --preset small     # the 0.5B shape (bf16 on a GPU)

Three measurements on a random model of --preset (speed does not depend on the weights):

1. Time to first token with a shared system prompt: --requests requests, one after another, each the same
   --system-tokens system prompt and a question of its own (16 tokens), 1 new token. Without the prefix cache every
   request prefills its whole prompt; with it, the system prompt's full blocks are prefilled once.
2. lm-eval multiple choice: --questions questions, each a --shots few-shot context (the same examples for every
   question, as lm-eval's fewshot) with its own question and 4 one-token answers, scored through `ArgonneLM.
   loglikelihood` (lm-eval's API) — on the engine with and without the prefix cache, and on plain batched forwards
   (a model passed in, as in-loop evaluation runs it: rows with the same inputs share one forward). Requests/s.
3. Concurrent requests in a fixed --kv-cache-memory: requests of --prompt-tokens + --new-tokens on an engine whose
   sequences may reach the model's context (max_len). Before the paged cache a sequence held a row of max_len
   tokens, so the budget held memory / (one row's bytes) sequences at once (run here as the engine with that many
   rows); now it holds blocks for the tokens in use. The figures are the most sequences decoding in one step, the
   preemptions, and tokens/s (greedy, no EOS: every request makes all its tokens).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.inference.engine import GIB, Engine, EngineRequest, EngineSettings
from argonne.inference.kv_cache import PagedKVCache
from argonne.inference.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
SAMPLE_TOKENIZER = REPO / "data" / "tokenizers" / "sample-bpe-8k"
GREEDY = SamplingParams(max_new_tokens=1, temperature=0.0)


def random_model(preset: str, folder: Path) -> Path:
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset(preset, initializer_range=0.2)
    tokenizer = load_tokenizer(SAMPLE_TOKENIZER)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    ArgonneForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tokens(generator: torch.Generator, count: int) -> list[int]:
    return torch.randint(100, 8000, (count,), generator=generator).tolist()


def time_to_first_token(model, tokenizer, args) -> None:
    generator = torch.Generator().manual_seed(1)
    system = tokens(generator, args.system_tokens)
    prompts = [system + tokens(generator, 16) for _ in range(args.requests)]
    print(f"\n1. time to first token: {args.requests} requests of a {args.system_tokens}-token system prompt and a "
          "16-token question, one after another, 1 new token")
    for prefix_caching in (False, True):
        engine = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=4, prefix_caching=prefix_caching))
        times = []
        engine.listeners.append(lambda timing: times.append(timing.time_to_first_token))
        engine.complete([prompts[0][:8]], GREEDY)  # warm-up
        times.clear()
        for prompt in prompts:
            engine.complete([prompt], GREEDY)
        first, rest = times[0], sorted(times[1:])
        print(f"   prefix cache {'on ' if prefix_caching else 'off'}: first request {first * 1e3:8.1f} ms; the others "
              f"p50 {rest[len(rest) // 2] * 1e3:8.1f} ms (prompt tokens prefilled: {engine.prompt_tokens:,})")


def multiple_choice(folder: Path, model, tokenizer, args) -> None:
    from lm_eval.api.instance import Instance

    from argonne.harness import ArgonneLM

    words = "the of and to in is was for on that with as by at from his an were are which".split()
    generator = torch.Generator().manual_seed(2)

    def sentence(count):
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (count,), generator=generator))

    shots = "".join(f"Question: {sentence(30)}?\nAnswer: {sentence(3)}\n\n" for _ in range(args.shots))
    requests = []
    for index in range(args.questions):
        context = f"{shots}Question: {sentence(30)}?\nAnswer:"
        for choice in (" A", " B", " C", " D"):
            requests.append(Instance("loglikelihood", {}, (context, choice), index))
    context_tokens = len(tokenizer(requests[0].args[0]).input_ids)
    print(f"\n2. lm-eval multiple choice: {args.questions} questions x 4 one-token answers, contexts of "
          f"{context_tokens} tokens ({args.shots} shared few-shot examples), batch size 16")
    ways = [("plain batched forwards (a model passed in)", dict(model=copy.deepcopy(model), tokenizer=tokenizer)),
            ("engine, prefix cache off", dict(pretrained=str(folder), prefix_caching=False)),
            ("engine, prefix cache on", dict(pretrained=str(folder), prefix_caching=True))]
    results = {}
    for label, kwargs in ways:
        lm = ArgonneLM(device="cpu" if not torch.cuda.is_available() else "auto", batch_size=16, **kwargs)
        lm.loglikelihood(requests[:4])  # warm-up
        started = time.perf_counter()
        results[label] = lm.loglikelihood(requests)
        seconds = time.perf_counter() - started
        engine = lm._engine
        prefilled = f"; prompt tokens prefilled {engine.prompt_tokens:,}" if engine else ""
        print(f"   {label:<44} {len(requests) / seconds:8.1f} requests/s{prefilled}")
    scores = list(results.values())
    worst = max(abs(a[0] - b[0]) for other in scores[1:] for a, b in zip(scores[0], other))
    print(f"   largest difference between the three ways' log-likelihoods: {worst:.2e}")


def concurrency(model, tokenizer, args) -> None:
    config = model.config
    dtype = next(model.parameters()).dtype
    max_len = config.max_position_embeddings
    # The slot cache before the paged one: a row of max_len + 1 columns per sequence (kv_cache.SlotKVCache).
    row_bytes = 2 * config.num_key_value_heads * (max_len + 1) * config.head_dim * config.num_hidden_layers * \
        torch.empty((), dtype=dtype).element_size()
    memory = args.kv_cache_memory or 2 * row_bytes / GIB
    before = int(memory * GIB // row_bytes)
    blocks = int(memory * GIB // PagedKVCache.bytes_per_block(config, 16, dtype))
    print(f"\n3. concurrent requests in --kv-cache-memory {memory:g} GiB ({blocks} blocks of 16 tokens): "
          f"{args.concurrent} requests of {args.prompt_tokens} + {args.new_tokens} tokens, max_len {max_len}")
    generator = torch.Generator().manual_seed(3)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    prompts = [tokens(generator, args.prompt_tokens) for _ in range(args.concurrent)]
    for label, rows in ((f"before (a row of max_len per sequence): {before} at once;", max(before, 1)),
                        ("paged blocks:", args.concurrent)):
        engine = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=rows, kv_cache_memory=memory))
        engine.eos_ids = []  # every request makes all its tokens
        handles = engine.submit([EngineRequest(prompt, params) for prompt in prompts])
        most, started = 0, time.perf_counter()
        while not all(h.completion for h in handles):
            engine.step()
            most = max(most, len(engine.scheduler.running))
        seconds = time.perf_counter() - started
        print(f"   {label} {most} decoding at once at most, {engine.scheduler.preemptions} preemptions, "
              f"{engine.generated_tokens / seconds:,.1f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=768)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                        help="default: what two rows of the model's context took before the paged cache")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefix-cache-") as tmp:
        folder = random_model(args.preset, Path(tmp) / "model")
        from argonne.loading import open_model

        model, tokenizer = open_model(folder, "auto")
        print(f"{args.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{next(model.parameters()).dtype}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
              f", torch {torch.__version__}")
        time_to_first_token(model, tokenizer, args)
        multiple_choice(folder, model, tokenizer, args)
        concurrency(model, tokenizer, args)


if __name__ == "__main__":
    main()
