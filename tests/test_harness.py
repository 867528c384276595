"""lm-evaluation-harness: Argonne's model class against lm-eval's own `hf` backend, checkpoints against their
exported folders, `argonne eval tasks`, and bad input. Tasks are local JSONL fixtures (tests/harness_tasks.py)."""

import json
import math
from pathlib import Path

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.harness import ArgonneLM, HarnessError, evaluate_tasks
from argonne.inference.sampling import NonFiniteLogits

from .conftest import SAMPLE_TOKENIZER, break_weights, small_model
from .harness_tasks import TASKS, write_tasks

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# lm-eval's TaskManager reads every one of lm-eval's own task files (thousands of YAMLs, 10 s or more) each time it
# is built with them; a task name not under --include-path (an unknown one, a file that does not parse) needs them.
# lm-eval builds its index folder by folder and merges the folders' indexes in order (later ones win): here its own
# folder's index is built once per test process and reused, the --include-path folders are read afresh each time.
CACHE_LM_EVALS_OWN_INDEX = """
def cache_lm_evals_own_index(load=None):
    from pathlib import Path

    from lm_eval.tasks import _index, manager

    build, own, built = _index.TaskIndex.build, Path(manager.__file__).parent, {}
    if load is not None:  # the index a test process built (a pickle), for a process of its own
        import pickle

        built[True] = pickle.loads(Path(load).read_bytes())

    def cached(paths, *, resolve_includes=True):
        index = {}
        for root in paths:
            if Path(root) == own:
                if resolve_includes not in built:
                    built[resolve_includes] = build([root], resolve_includes=resolve_includes)
                index.update(built[resolve_includes])
            else:
                index.update(build([root], resolve_includes=resolve_includes))
        return index

    _index.TaskIndex.build = staticmethod(cached)
    return build, built
"""


@pytest.fixture(scope="module", autouse=True)
def lm_evals_own_index():
    """lm-eval's own task index, built at most once for this module (CACHE_LM_EVALS_OWN_INDEX); yields what it
    has built ({resolve_includes: index})."""
    from lm_eval.tasks import _index

    namespace = {}
    exec(CACHE_LM_EVALS_OWN_INDEX, namespace)
    build, built = namespace["cache_lm_evals_own_index"]()
    try:
        yield built
    finally:
        _index.TaskIndex.build = staticmethod(build)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An Argonne folder, its Llama export, and a training checkpoint of the same weights; the task files."""
    from argonne.checkpoint import save_checkpoint
    from argonne.export import export_model

    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                       max_position_embeddings=128, initializer_range=0.2)
    model = ArgonneForCausalLM(config)
    tokenizer = load_tokenizer(SAMPLE_TOKENIZER)
    model.save_pretrained(root / "argonne")
    tokenizer.save_pretrained(root / "argonne")
    export_model(root / "argonne", "llama", root / "llama", "fp32")
    checkpoint = save_checkpoint(root / "checkpoints", 7, model, torch.optim.AdamW(model.parameters()),
                                 {"step": 7}, is_main=True, tokenizer=tokenizer)
    return {"argonne": root / "argonne", "llama": root / "llama", "checkpoint": checkpoint,
            "tasks": write_tasks(root / "tasks")}


def per_request(results: dict) -> dict[tuple[str, int], list]:
    """(task, document) -> the responses to each of its requests, as lm-eval logged them."""
    return {(task, sample["doc_id"]): sample["resps"] for task, samples in results["samples"].items()
            for sample in samples}


def metrics(results: dict) -> dict[str, float]:
    """task/metric -> value."""
    return {f"{task}/{name}": float(value) for task, values in results["results"].items()
            for name, value in values.items() if "," in name and "stderr" not in name}


def assert_same_responses(ours: dict, theirs: dict, tolerance=1e-4):
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        for a, b in zip(ours[key], theirs[key], strict=True):
            a, b = a[0], b[0]
            if isinstance(a, str):  # generation
                assert a == b, (key, a, b)
            elif isinstance(a, (list, tuple)):  # loglikelihood: (log-probability, greedy)
                assert abs(a[0] - b[0]) <= tolerance and a[1] == b[1], (key, a, b)
            else:  # loglikelihood_rolling: log-probability
                assert abs(a - b) <= tolerance, (key, a, b)


@pytest.mark.slow
def test_argonne_and_lm_evals_hf_backend_agree_on_every_request(folders):
    from lm_eval.models.huggingface import HFLM

    tasks = list(TASKS)
    ours = evaluate_tasks(ArgonneLM(pretrained=str(folders["llama"]), device="cpu", dtype="float32", batch_size=3),
                          tasks, include_path=folders["tasks"], log_samples=True)
    theirs = evaluate_tasks(HFLM(pretrained=str(folders["llama"]), device="cpu", dtype="float32", batch_size=3),
                            tasks, include_path=folders["tasks"], log_samples=True)
    assert_same_responses(per_request(ours), per_request(theirs))
    assert metrics(ours) == pytest.approx(metrics(theirs), rel=1e-5)
    # The fixtures exercise each kind of request: several choices, documents longer than one window, generation.
    assert {task: len(samples) for task, samples in ours["samples"].items()} == {
        "argonne_choice": 6, "argonne_rolling": 4, "argonne_generate": 5}


@pytest.mark.slow
def test_a_checkpoint_scores_as_its_model_folder(folders):
    tasks = ["argonne_choice", "argonne_rolling"]
    results = [evaluate_tasks(ArgonneLM(pretrained=str(folders[kind]), device="cpu", dtype="float32"), tasks,
                              include_path=folders["tasks"], log_samples=True)
               for kind in ("checkpoint", "argonne")]
    assert_same_responses(per_request(results[0]), per_request(results[1]), tolerance=0)
    assert metrics(results[0]) == metrics(results[1])


def test_one_forward_per_batch_longest_first(folders):
    """On a model passed in (the plain batched forwards; a model opened here scores on the engine), log-likelihood
    requests are sorted by length and batched: ceil(n / batch_size) forwards, each as wide as its longest row,
    requests with the same inputs share a row, and the scores equal scoring each alone, and the engine's."""
    lm = ArgonneLM(model=ArgonneForCausalLM.from_pretrained(folders["argonne"]).eval(),
                   tokenizer=load_tokenizer(folders["argonne"]), batch_size=4)
    torch.manual_seed(1)
    # Windows as lm-eval's requests make them: the inputs are the sequence but its last token, the continuation
    # the sequence's last tokens.
    sequences = [torch.randint(3, 8192, (n + 1,)).tolist() for n in (5, 17, 9, 30, 2, 12, 7, 21, 3, 4)]
    windows = [(tokens[:-1], tokens[-min(3, len(tokens) - 1):]) for tokens in sequences]
    longest = windows[3][0]
    windows += [(longest, [5]), (longest, [longest[-1], 7])]  # other answers to the longest row's question
    widths = []
    hook = lm.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape
                                                                                          if "input_ids" in kwargs
                                                                                          else args[0].shape),
                                              with_kwargs=True)
    try:
        batched = lm.score_windows(windows)
    finally:
        hook.remove()
    assert widths == [(4, 30), (4, 9), (2, 3)]
    lm.batch_size = 1
    alone = lm.score_windows(windows)
    on_the_engine = ArgonneLM(pretrained=str(folders["argonne"]), device="cpu", dtype="float32",
                              batch_size=4).score_windows(windows)
    for (a, greedy_a), (b, greedy_b), (c, greedy_c) in zip(batched, alone, on_the_engine, strict=True):
        assert abs(a - b) <= 1e-4 and greedy_a == greedy_b
        assert abs(a - c) <= 1e-4 and greedy_a == greedy_c


def test_a_continuation_longer_than_the_context_window_is_cut_from_the_left(folders):
    lm = ArgonneLM(pretrained=str(folders["argonne"]), device="cpu", dtype="float32", max_length=8)
    inputs, scored = lm._window(list(range(10, 16)), list(range(20, 30)))
    assert inputs == list(range(21, 29))  # the last 9 tokens, less the one nothing follows
    assert scored == list(range(22, 30))  # what those 8 inputs predict


def test_eval_tasks_prints_lm_evals_table_and_writes_its_results_json(folders, tmp_path, capsys):
    from argonne_cli import main

    output = tmp_path / "results" / "tasks.json"
    assert main(["eval", "tasks", str(folders["checkpoint"]), "--tasks", "argonne_choice,argonne_rolling",
                 "--include-path", str(folders["tasks"]), "--limit", "3", "--batch-size", "2", "--device", "cpu",
                 "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "|argonne_choice " in printed and "acc_norm" in printed and "word_perplexity" in printed
    written = json.loads(output.read_text())
    # lm-eval's layout, with its description of the machine (which only the in-loop tasks leave out)
    assert {"results", "configs", "versions", "n-shot", "n-samples", "pretty_env_info"} <= written.keys()
    assert written["n-samples"]["argonne_choice"] == {"original": 6, "effective": 3}
    assert 0 <= written["results"]["argonne_choice"]["acc,none"] <= 1
    assert math.isfinite(written["results"]["argonne_rolling"]["word_perplexity,none"])


@pytest.mark.parametrize("problem", [
    pytest.param("unknown task", marks=pytest.mark.slow),  # lm-eval indexes its own thousands of task files
    pytest.param("task file that does not parse", marks=pytest.mark.slow),
    "no tokenizer", "bad limit", "infinite limit", "not a folder"])
def test_bad_input_is_a_clear_error(folders, tmp_path, capsys, problem):
    import shutil

    from argonne_cli import main

    model, tasks, include = str(folders["argonne"]), "argonne_choice", str(folders["tasks"])
    extra = []
    if problem == "unknown task":
        tasks, expected = "argonne_choice,hellaswagg", "unknown task(s): hellaswagg"
    elif problem == "task file that does not parse":
        include = str(shutil.copytree(folders["tasks"], tmp_path / "tasks"))
        (tmp_path / "tasks" / "mine.yaml").write_text("task: mine\ndataset_path: json\n  bad: [indent\n")
        tasks, expected = "mine", "mine.yaml: mapping values are not allowed in this context"
    elif problem == "no tokenizer":
        model = str(tmp_path / "bare")
        (tmp_path / "bare").mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(folders["argonne"] / name, tmp_path / "bare" / name)
        expected = "has no tokenizer: neither tokenizer.json nor tokenizer_config.json"
    elif problem == "bad limit":
        extra, expected = ["--limit", "2.5"], "--limit must be a count (1, 2, ...) or a fraction in (0, 1), got 2.5"
    elif problem == "infinite limit":
        extra, expected = ["--limit", "inf"], "--limit must be a count (1, 2, ...) or a fraction in (0, 1), got inf"
    else:
        include, expected = str(tmp_path / "missing"), "not a folder of task YAML files"
    code = main(["eval", "tasks", model, "--tasks", tasks, "--include-path", include, "--device", "cpu", *extra])
    error = capsys.readouterr().err
    assert code == 2 and "argonne eval: error:" in error and expected in " ".join(error.split()), error


def test_generation_settings_are_read_as_the_hf_backend_reads_them_and_sampling_is_refused(folders):
    lm = ArgonneLM(pretrained=str(folders["argonne"]), device="cpu")
    with pytest.raises(HarnessError, match="decodes greedily only"):
        lm._generation_settings({"until": ["\n"], "do_sample": True, "temperature": 0.7})
    assert lm._generation_settings({"until": "\n\n", "max_gen_toks": 5}) == (["\n\n"], 5)
    assert lm._generation_settings({"until": ["."], "max_new_tokens": 7}) == (["."], 7)  # an alias lm-eval takes
    assert lm._generation_settings({"do_sample": False, "temperature": 0.7, "max_gen_toks": 9}) == ([], 9)  # greedy
    context = lm.model.config.max_position_embeddings
    with pytest.raises(HarnessError, match=f"max_length {context + 1} is longer than the model's context"):
        ArgonneLM(model=lm.model, tokenizer=lm.tokenizer, max_length=context + 1)
    with pytest.raises(HarnessError, match="prefix_caching must be true or false"):
        ArgonneLM(model=lm.model, tokenizer=lm.tokenizer, prefix_caching="maybe")


def test_a_tokenizer_that_adds_bos_encodes_as_in_the_hf_backend(folders):
    """Llama tokenizers put BOS in front of every text they encode; lm-eval's `hf` backend keeps it, and so must
    Argonne's class, or every score differs."""
    import types

    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM
    from tokenizers.processors import TemplateProcessing

    tokenizer = load_tokenizer(SAMPLE_TOKENIZER)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    theirs = types.SimpleNamespace(tokenizer=tokenizer, add_bos_token=None, backend="causal",
                                   prefix_token_id=tokenizer.bos_token_id)
    theirs.tok_encode = types.MethodType(HFLM.tok_encode, theirs)
    ours = ArgonneLM(model=ArgonneForCausalLM.from_pretrained(folders["argonne"]), tokenizer=tokenizer)
    assert ours.tok_encode("Question: hi")[0] == tokenizer.bos_token_id
    assert ours.tok_encode("Question: hi") == theirs.tok_encode("Question: hi")
    assert ours._encode_pair("Question: hi\nAnswer:", " blue") == \
        TemplateLM._encode_pair(theirs, "Question: hi\nAnswer:", " blue")


def test_non_finite_logits_are_an_error_not_a_nan_score_or_token():
    lm = ArgonneLM(model=break_weights(small_model()), tokenizer=load_tokenizer(SAMPLE_TOKENIZER))
    with pytest.raises(NonFiniteLogits, match=r"non-finite logits \(NaN or Inf\)"):
        lm.score_windows([([5, 6, 7], [7]), ([5, 6], [6])])  # loglikelihood and loglikelihood_rolling
    from types import SimpleNamespace

    request = SimpleNamespace(args=("The database", {"until": ["\n"], "max_gen_toks": 2}))
    with pytest.raises(NonFiniteLogits):
        lm.generate_until([request])  # on a model passed in: the uncached greedy loop, raised once all rows decoded


def test_empty_contexts_and_continuations(folders):
    lm = ArgonneLM(pretrained=str(folders["argonne"]), device="cpu")
    assert lm._window([], [5, 6]) == ([lm.prefix_token_id, 5], [5, 6])  # a context that tokenizes to nothing
    with pytest.raises(HarnessError, match="empty continuation"):
        lm._window([1, 2], [])


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_the_argonne_model(folders, lm_evals_own_index, tmp_path):
    """`python -m argonne.lm_eval_command` is `lm_eval` with Argonne's class registered: lm_eval's options work."""
    import subprocess
    import sys

    from .conftest import env

    import pickle

    from lm_eval.tasks import _index, manager

    # `python -m argonne.lm_eval_command ...` as runpy runs it, with lm-eval's own index (built once in this
    # process, as the other tests use it) read from a file instead of lm-eval's thousands of task files.
    _index.TaskIndex.build([Path(manager.__file__).parent])
    (tmp_path / "index.pickle").write_bytes(pickle.dumps(lm_evals_own_index[True]))
    as_dash_m = CACHE_LM_EVALS_OWN_INDEX + (f"cache_lm_evals_own_index({str(tmp_path / 'index.pickle')!r})\n"
                                            "import runpy\nrunpy.run_module('argonne.lm_eval_command', "
                                            "run_name='__main__', alter_sys=True)\n")
    result = subprocess.run(
        [sys.executable, "-c", as_dash_m, "--model", "argonne", "--model_args",
         f"pretrained={folders['argonne']},dtype=float32", "--device", "cpu", "--tasks", "argonne_choice",
         "--include_path", str(folders["tasks"]), "--batch_size", "4", "--output_path", str(tmp_path / "out")],
        env={**env(), "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "argonne_choice" in result.stdout and "acc_norm" in result.stdout
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert written and json.loads(written[0].read_text())["config"]["model"] == "argonne"


def test_the_package_declares_the_model_for_lm_evals_plugin_discovery():
    """lm-eval versions that discover plugins (the `lm_eval.models` entry-point group) find `argonne` with no
    import; lm-eval resolves such an entry point to the registered class."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "argonne"]
    assert found and found[0].load() is ArgonneLM


@pytest.mark.slow
def test_in_loop_tasks_leave_training_untouched_and_resume_exactly(prepared_sample, eval_tasks, eval_one_process,
                                                                   tmp_path, monkeypatch):
    """A run with [eval] tasks trains exactly as one without (data position and random state untouched), resumes
    to the same losses and task metrics, and its plot draws the task scores beside the loss. The tasks do not
    describe the machine each time (lm-eval's collect_env: `pip list` and GPU queries in subprocesses)."""
    import matplotlib.image
    import torch.utils.collect_env

    from .launches import by_step, losses, records, train_here

    described = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: described.append(1) or "")

    with_tasks = by_step(eval_one_process["all"])
    plain = train_here(prepared_sample, tmp_path / "plain", extra=["--data.val_windows=0"])
    assert plain == {step: r["loss"] for step, r in with_tasks.items()}  # bit for bit
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-00000005"
    train_here(prepared_sample, tmp_path / "straight", extra=[*eval_tasks, "--checkpoint.every=5",
                                                              "--checkpoint.keep=0"], plot=False)
    train_here(prepared_sample, tmp_path / "resumed", extra=[*eval_tasks, "--resume", str(checkpoint)])
    resumed = by_step(records(tmp_path / "resumed"))
    assert sorted(resumed) == list(range(6, 11))
    for step, record in resumed.items():
        assert record["loss"] == with_tasks[step]["loss"]
    assert {k: v for k, v in resumed[10].items() if k.startswith("eval/")} == \
        {k: v for k, v in with_tasks[10].items() if k.startswith("eval/")}
    assert losses(tmp_path / "straight") == plain
    assert not described
    assert matplotlib.image.imread(tmp_path / "resumed" / "loss.png").shape[1] == 14 * 120  # loss and tasks
    assert matplotlib.image.imread(tmp_path / "plain" / "loss.png").shape[1] == 8 * 120  # loss alone


@pytest.mark.slow  # an unknown name makes lm-eval index its own thousands of task files
def test_in_loop_tasks_are_checked_when_training_starts(prepared_sample, tmp_path):
    from .launches import cli_args

    from argonne_cli import main

    code = main(cli_args(prepared_sample, tmp_path / "run", extra=["--eval.tasks=['argonne_choise']",
                                                                   f"--eval.include_path={str(tmp_path)!r}"]))
    assert code == 2 and not (tmp_path / "run" / "metrics.jsonl").exists()
