"""Argonne in EleutherAI's lm-evaluation-harness (`lm_eval`): the `argonne` model class and `argonne eval tasks`.

`ArgonneLM` answers lm-eval's three request types on Argonne's own model:
- loglikelihood: scoring requests on Argonne's inference engine (inference/engine.py), logits made for the
  continuation positions only (lm-eval's `hf` backend makes and soft-maxes (batch, length, vocabulary) logits);
  requests that begin alike (few-shot examples, a question's context before each answer) share their prefix's KV
  blocks. A model passed in from training (maybe sharded) runs plain batched forwards instead: requests sorted by
  length (longest first), left-padded so that every row's continuation ends at the last position, requests with the
  same model input (the one-token answers of a multiple-choice question) sharing a row;
- loglikelihood_rolling: the document cut into lm-eval's own rolling windows, scored as above;
- generate_until: Argonne's inference engine (inference/engine.py: continuous batching, batch_size rows at a time,
  CUDA graphs on GPUs), greedy, with the request's stop strings and max_gen_toks; a model passed in from training
  (maybe sharded) decodes on the uncached greedy loop (inference/uncached.py) instead.
Token handling follows the `hf` backend (the same context/continuation split, left truncation to max_length, prefix
token for an empty context), so both score a request the same way. The class is registered with lm-eval as
"argonne" when this module is imported: `python -m argonne.lm_eval_command` is lm_eval's own command with it
(released lm-eval does not yet discover plugins; versions that do find it through the package's entry point).
Logits holding NaN or Inf raise NonFiniteLogits (generate.py) instead of scoring NaN or answering token 0.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .inference.engine import Engine, EngineSettings
from .inference.sampling import NonFiniteLogits, SamplingParams
from .inference.uncached import greedy_uncached
from .modeling_argonne import ArgonneForCausalLM

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default where a model states no context length
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's `hf` default


class HarnessError(ValueError):
    """A bad task, task file or model argument: the message names it."""


def open_model_for_evaluation(path: str | Path, device: str, dtype: str, tokenizer: str | Path | None):
    """(model, tokenizer) from an Argonne folder, a training checkpoint of any layout, or a transformers Llama /
    Qwen2 folder (converted in memory, as `argonne import` converts it)."""
    from .loading import open_model, ready_for_use, require_tokenizer_files

    path = Path(path)
    config_file = path / "config.json"
    model_type = None
    if config_file.is_file():
        from .files import read_json

        model_type = read_json(config_file, HarnessError, "model config").get("model_type")
    if model_type in (None, "argonne"):
        return open_model(path, device, dtype, tokenizer)
    from .device import resolve_device
    from .export import converted_model

    target = resolve_device(device)
    if tokenizer is None:
        require_tokenizer_files(path)
    return ready_for_use(converted_model(path), target, dtype, tokenizer if tokenizer is not None else path)


@register_model("argonne")
class ArgonneLM(TemplateLM):
    """lm-eval's LM interface on an Argonne model.

    lm-eval arguments (`--model_args`): pretrained (an Argonne folder, a training checkpoint, or a Llama / Qwen2
    folder), tokenizer (another tokenizer folder), device ("auto", "cpu", "cuda", "cuda:1"), dtype ("auto": bf16
    on GPUs, float32 on CPUs; "float32", "bfloat16", "float16"), batch_size (requests per forward; lm-eval's
    "auto" means Argonne's default, 16), max_length (tokens of context; default the model's
    max_position_embeddings), max_gen_toks (default 256, as lm-eval's `hf`), prefix_caching (default true: requests
    that begin alike share their prefix's KV blocks). A model already in memory is passed
    as `model=` with its `tokenizer`, and with the `topology` of the processes it is sharded over (training):
    every process then gets every request and scores its data-parallel share, the processes agree on the number
    of forwards before running them (FSDP gathers each layer's weights at every forward), and results are gathered.
    """

    def __init__(self, pretrained: str | None = None, tokenizer=None, device: str = "auto", dtype: str = "auto",
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, model: ArgonneForCausalLM | None = None,
                 max_batch_size: int | None = None, topology=None, prefix_caching: bool | str = True):
        super().__init__()
        if str(prefix_caching).lower() not in ("true", "false"):
            raise HarnessError(f"prefix_caching must be true or false, got {prefix_caching!r}")
        self.prefix_caching = str(prefix_caching).lower() == "true"
        # A model being trained, sharded over a ("dp", "tp") mesh. lm-eval sees one process: every process gets
        # every request (so each calls each request type, whatever the documents), computes its data-parallel
        # share and gathers the rest; tensor-parallel peers take the same share and run the same forwards.
        self.topology = topology if topology is not None and topology.world > 1 else None
        # The serving engine merges the model's projections and keeps a KV cache: only for a model opened here.
        self._owns_model = model is None
        if model is None:
            if pretrained is None:
                raise HarnessError("model argument pretrained is missing: pretrained=FOLDER (an Argonne or "
                                   "Llama/Qwen2 folder, or a training checkpoint)")
            model, tokenizer = open_model_for_evaluation(pretrained, device or "auto", dtype, tokenizer)
        elif tokenizer is None or isinstance(tokenizer, (str, Path)):
            raise HarnessError("a model passed in memory needs its tokenizer object")
        self.model, self.tokenizer = model, tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = self._batch_size(batch_size, max_batch_size)
        self._max_length = int(max_length) if max_length else int(
            getattr(model.config, "max_position_embeddings", 0) or DEFAULT_MAX_LENGTH)
        context = getattr(model.config, "max_position_embeddings", 0)
        if context and self._max_length > context:
            raise HarnessError(f"max_length {self._max_length} is longer than the model's context ({context} tokens)")
        self.max_gen_toks = int(max_gen_toks)
        if self.max_gen_toks < 1 or self._max_length < 2:
            raise HarnessError(f"max_gen_toks must be >= 1 and max_length >= 2, got {self.max_gen_toks} and "
                               f"{self._max_length}")
        self._engine: Engine | None = None

    @staticmethod
    def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            size = DEFAULT_BATCH_SIZE
        else:
            try:
                size = int(batch_size)
            except (TypeError, ValueError):
                raise HarnessError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}") from None
        if size < 1:
            raise HarnessError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        return min(size, int(max_batch_size)) if max_batch_size else size

    # ------------------------------------------------------------------------------------------ lm-eval's API

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As the `hf` backend: BOS where the tokenizer has one, else EOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "argonne").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As the `hf` backend: unless told otherwise, the tokenizer's own special tokens (a Llama tokenizer's BOS).
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) per request;
        requests are ((context, continuation), context tokens, continuation tokens)."""
        return self.score_windows([self._window(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(self._window(context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score_windows(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's `until` strings (and EOS), at most max_gen_toks
        tokens; requests with the same generation settings are batched, longest prompt first."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        settings = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            until, max_new = self._generation_settings(gen_kwargs)
            settings.append((context, until, max_new))
            groups.setdefault(json.dumps([until, max_new]), []).append(index)
        groups = {key: self._my_share(indices) for key, indices in groups.items()}
        # A sharded model decodes every batch for max_gen_toks steps, so every process knows its forwards now.
        steps = sum(-(-len(indices) // self.batch_size) * settings[indices[0]][2]
                    for indices in groups.values() if indices)
        extra = self._forwards_to_add(steps)
        met_non_finite = False
        for indices in groups.values():
            if not indices:
                continue
            until, max_new = settings[indices[0]][1:]
            prompts = {i: self.tok_encode(settings[i][0])[-(self.max_length - max_new):] or [self.prefix_token_id]
                       for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=tuple(s for s in until if s))
            if self._owns_model:  # the engine: batch_size rows at a time, a finished row's row refilled
                completions = self.engine().complete([prompts[i] for i in order], params)
            else:
                completions = []
                for start in range(0, len(order), self.batch_size):
                    batch, broken = greedy_uncached(lambda rows: self._forward(rows, keep=1)[:, -1],
                                                    [prompts[i] for i in order[start:start + self.batch_size]],
                                                    max_new, self.tokenizer, self._eos_ids(), params.stop,
                                                    lockstep=self.topology is not None)
                    completions += batch
                    met_non_finite |= broken  # raised once every process has decoded
            for i, completion in zip(order, completions):
                results[i] = completion.text
        self._dummy_forwards(extra)
        self._refuse_non_finite_anywhere(met_non_finite)
        return self._gather(results)

    # ------------------------------------------------------------------------------------------------ ours

    def _window(self, context, continuation) -> tuple[list[int], list[int]]:
        """(model inputs, scored tokens) for a context and continuation, cut from the left to max_length inputs as
        the `hf` backend cuts them."""
        if not continuation:
            raise HarnessError("a request with an empty continuation: nothing to score (lm-eval's `hf` backend "
                               "refuses it too); check the task's doc_to_choice / doc_to_target")
        context = list(context) or [self.prefix_token_id]  # a context that tokenizes to nothing: as an empty one
        whole = (context + list(continuation))[-(self.max_length + 1):]
        scored = min(len(continuation), len(whole) - 1)
        return whole[:-1], whole[len(whole) - scored:]

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        """(stop strings, max new tokens) of a request's generation settings; sampling is refused. Settings that
        only matter when sampling (top_p, top_k...) are left to lm-eval's task files."""
        kwargs = gen_kwargs or {}
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        aliases = [kwargs[name] for name in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
                   if kwargs.get(name) is not None]
        max_new = int(aliases[0]) if aliases else self.max_gen_toks
        # As the `hf` backend, a temperature without do_sample is greedy decoding.
        if kwargs.get("do_sample"):
            raise HarnessError(f"generation settings {gen_kwargs}: the argonne model decodes greedily only "
                               "(do_sample: false), as evaluation needs reproducible outputs")
        if max_new < 1 or max_new >= self.max_length:
            raise HarnessError(f"generation settings {gen_kwargs}: max_gen_toks must be in 1..{self.max_length - 1}")
        return until, max_new

    def engine(self) -> Engine:
        if self._engine is None:
            max_len = min(self.max_length, self.model.config.max_position_embeddings)
            self._engine = Engine(self.model, self.tokenizer, EngineSettings(max_batch=self.batch_size,
                                                                             max_len=max_len,
                                                                             prefix_caching=self.prefix_caching))
        return self._engine

    def _eos_ids(self) -> list[int]:
        return sorted({self.tokenizer.eos_token_id, getattr(self.model.config, "eos_token_id", None)} - {None})

    @torch.no_grad()
    def _forward(self, rows: list[list[int]] | list[tuple[int, ...]], keep: int) -> torch.Tensor:
        """Logits (float32) at the last `keep` positions of each row, rows left-padded to end together."""
        width = max(len(row) for row in rows)
        tokens = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for slot, row in enumerate(rows):
            tokens[slot, width - len(row):] = torch.tensor(row)
            mask[slot, width - len(row):] = 1
        padded = bool((mask == 0).any())
        logits = self.model(tokens.to(self.device), attention_mask=mask.to(self.device) if padded else None,
                            use_cache=False, logits_to_keep=keep).logits
        return logits.float()

    def _my_share(self, items: list) -> list:
        """This process's part of `items` (all of them unsharded): every dp-th, so that with items sorted by length
        every process gets rows of every length."""
        if self.topology is None:
            return items
        return items[self.topology.mesh.get_local_rank("dp")::self.topology.dp]

    def _gather(self, results: list) -> list:
        """Every process's results merged (each filled its share, None elsewhere), in every process."""
        if self.topology is None:
            return results
        parts = [None] * self.topology.dp
        torch.distributed.all_gather_object(parts, results, group=self.topology.mesh.get_group("dp"))
        return [next((part[i] for part in parts if part[i] is not None), None) for i in range(len(results))]

    def _forwards_to_add(self, planned: int) -> int:
        """How many one-token forwards this process adds to its `planned` ones so that every process runs the same
        number (FSDP gathers each layer's weights from all of them at every forward): agreed before any runs."""
        if self.topology is None:
            return 0
        count = torch.tensor([planned], dtype=torch.long)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=self.topology.host_group)
        return int(count.item()) - planned

    def _dummy_forwards(self, count: int) -> None:
        for _ in range(count):
            self._forward([[self.prefix_token_id]], keep=1)

    @torch.no_grad()
    def score_windows(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (inputs, continuation) — continuation the tokens that inputs[-len(continuation):] predict —
        the continuation's summed log-probability (float32) and whether each of its tokens is the argmax.

        A model opened here scores on the engine: every window a scoring request, windows that begin alike (few-shot
        examples, a question's context before each answer) sharing their prefix's KV blocks. A model passed in (maybe
        sharded) runs plain batched forwards: windows with the same inputs share one row (a multiple-choice
        question's one-token answers all read the logits at its last token); rows go longest first, batch_size per
        forward."""
        if self._owns_model:
            unique = {(tuple(inputs) + tuple(continuation[-1:]), len(continuation)): None for inputs, continuation
                      in windows}
            scores = dict(zip(unique, self.engine().score([(list(tokens), n) for tokens, n in unique])))
            return [scores[(tuple(inputs) + tuple(continuation[-1:]), len(continuation))]
                    for inputs, continuation in windows]
        row_of: dict[tuple[int, ...], int] = {}
        for inputs, _ in windows:
            row_of.setdefault(tuple(inputs), len(row_of))
        rows = list(row_of)
        keep = [0] * len(rows)
        readers: list[list[int]] = [[] for _ in rows]
        for index, (inputs, continuation) in enumerate(windows):
            row = row_of[tuple(inputs)]
            keep[row] = max(keep[row], len(continuation))
            readers[row].append(index)
        order = self._my_share(sorted(range(len(rows)), key=lambda row: -len(rows[row])))
        extra = self._forwards_to_add(-(-len(order) // self.batch_size))
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            # (rows, positions kept, vocabulary), rows left-padded so that they all end at the last position
            logprobs = F.log_softmax(self._forward([rows[row] for row in batch], max(keep[row] for row in batch)),
                                     dim=-1)
            for slot, row in enumerate(batch):
                for index in readers[row]:
                    continuation = windows[index][1]
                    scored = logprobs[slot, logprobs.shape[1] - len(continuation):]
                    target = torch.tensor(continuation, device=scored.device)
                    picked = scored.gather(-1, target[:, None]).squeeze(-1)
                    results[index] = (float(picked.sum()), bool((scored.argmax(-1) == target).all()))
        self._dummy_forwards(extra)
        # (Python floats: free to check) After every forward, so that a sharded model's processes all stop here.
        self._refuse_non_finite_anywhere(any(r is not None and not math.isfinite(r[0]) for r in results))
        return self._gather(results)

    def _refuse_non_finite_anywhere(self, found: bool) -> None:
        """Raise NonFiniteLogits in every process when any process met non-finite logits (agreed over the host
        group: a process raising alone would leave the others waiting in a sharded forward)."""
        from .parallel import any_process

        if any_process(found, self.topology) if self.topology is not None else found:
            raise NonFiniteLogits()


# ------------------------------------------------------------------------------------------------- running tasks


_TASK_MANAGERS: dict[tuple[str | None, bool], object] = {}


def task_manager(include_path: str | Path | None = None, tasks: list[str] | None = None):
    """lm-eval's TaskManager for `include_path`; one per process and folder (indexing lm-eval's thousands of task
    files takes seconds). When every one of `tasks` is in `include_path`, lm-eval's own tasks are not indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"--include-path {include_path}: not a folder of task YAML files")
    folder = str(Path(include_path).resolve()) if include_path is not None else None
    if folder is not None and tasks:
        own = _TASK_MANAGERS.get((folder, False)) or TaskManager(include_path=folder, include_defaults=False)
        _TASK_MANAGERS[(folder, False)] = own
        if all(task in own.all_subtasks for task in tasks):  # tasks, not groups (a group may name lm-eval's own)
            return own
    if (folder, True) not in _TASK_MANAGERS:
        _TASK_MANAGERS[(folder, True)] = TaskManager(include_path=folder)
    return _TASK_MANAGERS[(folder, True)]


def check_tasks(tasks: list[str], manager) -> None:
    """Every task name known to lm-eval (its own, and those under include_path): else an error naming the unknown
    ones and where to look."""
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        broken = [f"{path}: {problem}" for path, problem in unreadable_task_files(manager)]
        raise HarnessError(f"unknown task(s): {', '.join(unknown)} (`lm_eval ls tasks` lists lm-eval's own; "
                           "--include-path adds a folder of task YAML files)"
                           + ("; task files that do not parse: " + "; ".join(broken) if broken else ""))


def unreadable_task_files(manager) -> list[tuple[Path, str]]:
    """The YAML files under the manager's include paths that lm-eval cannot read (lm-eval skips them with a log
    line, and their tasks are then simply unknown). Read without running their `!function`s."""
    from lm_eval.tasks._yaml_loader import load_yaml

    folders = getattr(manager, "include_path", None) or []
    found = []
    for folder in [folders] if isinstance(folders, (str, Path)) else folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                load_yaml(path, resolve_func=False)
            except Exception as error:  # noqa: BLE001 - yaml, include and type errors alike: reported, not raised
                found.append((path, " ".join(str(error).split())))
    return found


def task_limit(value: float | None, name: str) -> int | float | None:
    """lm-eval's `limit` from a count or a fraction below 1 (None: every document); `name` says where it came
    from in the error."""
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0 or (value >= 1 and value != int(value)):
        raise HarnessError(f"{name} must be a count (1, 2, ...) or a fraction in (0, 1), got {value:g}")
    return int(value) if value >= 1 else value


def evaluate_tasks(lm, tasks: list[str], include_path: str | Path | None = None, num_fewshot: int | None = None,
                   limit: int | float | None = None, manager=None, log_samples: bool = False,
                   describe_machine: bool = True) -> dict:
    """lm-eval's `simple_evaluate` on the model (any lm-eval LM): its results dictionary (lm-eval's layout), with
    every request's responses under "samples" when `log_samples`. Seeds fixed, no bootstrap: the same model gives
    the same numbers. describe_machine=False leaves out lm-eval's description of the machine (see
    `_without_machine_description`)."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(include_path, tasks)
    check_tasks(tasks, manager)
    try:
        with contextlib.nullcontext() if describe_machine else _without_machine_description():
            return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                   log_samples=log_samples, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)
    except (HarnessError, RuntimeError, MemoryError):  # ours already clear; torch's (OOM, collectives) are not
        raise  # the user's to fix by a message
    except Exception as error:  # lm-eval raises many kinds for a task it cannot build (files, fields, datasets)
        raise HarnessError(f"tasks {', '.join(tasks)}: lm-eval could not run them: "
                           f"{type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _without_machine_description():
    """simple_evaluate ends by describing the machine into its results (torch's collect_env: `pip list`, compiler
    and GPU queries in subprocesses; half a second on a 2-core CPU machine, more on a GPU node). The tasks run
    during training, every eval.every steps, keep only the metrics: they skip it. (`argonne eval tasks` writes
    lm-eval's whole results, description included.) It replaces lm-eval's function for the whole process: the
    trainer evaluates from one thread."""
    import lm_eval.evaluator

    described = getattr(lm_eval.evaluator, "add_env_info", None)
    if described is None:  # an lm-eval that no longer has it: nothing to leave out
        yield
        return
    lm_eval.evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = described


def write_results(results: dict, output) -> Path:
    """lm-eval's results dictionary as JSON (what `lm_eval --output_path` writes) through `output`, an
    outputs.Output checked before the evaluation ran."""
    from lm_eval.utils import handle_non_serializable

    return output.write(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


# ------------------------------------------------------------------------------------------ during training


def flat_metrics(results: dict | None) -> dict[str, float]:
    """lm-eval's results as flat numbers: {"eval/TASK/METRIC": value} (the filter named when it is not "none")."""
    metrics = {}
    for task, values in (results or {}).get("results", {}).items():
        for name, value in values.items():
            if "," not in name or "stderr" in name or not isinstance(value, (int, float)):
                continue
            metric, filter_name = name.split(",", 1)
            key = metric if filter_name == "none" else f"{metric}_{filter_name}"
            metrics[f"eval/{task}/{key}"] = float(value)
    return metrics


class TaskEvaluator:
    """The run config's [eval] tasks on the model as it trains: every process takes part with its shard of the
    model (tensor parallel x FSDP2: nothing is gathered to one process, nothing converted). Training is not
    disturbed: the random generators (torch, CUDA, Python, NumPy; lm-eval seeds them) are restored afterwards, the
    data stream is not touched, and the model goes back to training mode."""

    def __init__(self, settings, tokenizer, topology):
        self.settings, self.tokenizer, self.topology = settings, tokenizer, topology
        self.tasks = list(settings.tasks)
        self.manager = task_manager(settings.include_path or None, self.tasks)
        check_tasks(self.tasks, self.manager)  # at start, not after hours of training

    def due(self, step: int, last: bool) -> bool:
        return last or bool(self.settings.every and step % self.settings.every == 0)

    def __call__(self, model, amp) -> dict[str, float]:
        """{"eval/TASK/METRIC": value, ...} and "eval_seconds" (every process gets the results; the main one logs)."""
        import time

        limit = task_limit(self.settings.limit or None, "eval.limit")
        started = time.perf_counter()
        state = _random_state()
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), amp():
                lm = ArgonneLM(model=model, tokenizer=self.tokenizer, batch_size=self.settings.batch_size,
                               topology=self.topology)
                results = evaluate_tasks(lm, self.tasks, manager=self.manager,
                                         num_fewshot=None if self.settings.num_fewshot < 0 else
                                         self.settings.num_fewshot,
                                         limit=limit, describe_machine=False)
        finally:
            _restore_random_state(state)
            model.train(training)
        return {**flat_metrics(results), "eval_seconds": time.perf_counter() - started}


def _random_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_random_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
