"""The loop's periodic actions (training/hooks.py)."""

import json
import math

import pytest
import torch

from argonne import load_tokenizer
from argonne.training.loop import train

from ..conftest import SAMPLE_TOKENIZER, small_model


def test_an_evaluation_task_that_fails_stops_the_run_with_one_line_naming_it():
    from types import SimpleNamespace

    from argonne.training.hooks import evaluate_tasks_or_stop
    from argonne.training.recovery import TrainingStopped

    class FailingTasks:
        tasks = ["arc_easy", "broken"]

        def __call__(self, model, amp):
            raise RuntimeError("dataset 'broken' not found\nmore lines of lm-eval's")

    run = SimpleNamespace(tasks=FailingTasks(), model=None, amp=None,
                          config=SimpleNamespace(checkpoint=SimpleNamespace(every=5), train=SimpleNamespace(steps=10)))
    with pytest.raises(TrainingStopped, match=r"the evaluation task\(s\) arc_easy, broken failed at step 5 "
                                              r"\(RuntimeError: dataset 'broken' not found\); its checkpoint is saved: "
                                              r".*--resume auto"):
        evaluate_tasks_or_stop(run, 5)


def test_a_sample_is_the_prompt_and_the_engines_greedy_continuation_and_leaves_the_model_as_it_was():
    import copy
    from contextlib import nullcontext

    from argonne.inference.engine import Engine
    from argonne.inference.sampling import SamplingParams
    from argonne.training.hooks import sample_text

    model, tokenizer = small_model().train(), load_tokenizer(SAMPLE_TOKENIZER)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = tokenizer("The database", add_special_tokens=False).input_ids
    reference = Engine(copy.deepcopy(model), tokenizer)
    expected = reference.complete([ids], SamplingParams(max_new_tokens=6, temperature=0))[0].text
    assert sample_text(model, tokenizer, "The database", 6, "cpu", nullcontext) == "The database" + expected
    assert model.training and model.model.layers[0].self_attn.qkv is None  # borrowed as training has it: not merged
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    assert expected  # (some text to compare)


class Recording:
    """A hook that says whether it is due at each step, and records its calls in a shared list."""

    def __init__(self, name, calls, due_at, ends_step=False):
        self.name, self.calls, self.due_at, self.ends_step = name, calls, due_at, ends_step

    def due(self, step, done):
        return step in self.due_at

    def __call__(self, step, done):
        self.calls.append((self.name, step))
        return self.ends_step


def test_hooks_are_called_in_order_only_when_due_and_one_that_ends_the_step_skips_the_rest():
    from argonne.training.hooks import call_hooks

    calls = []
    hooks = [Recording("first", calls, {1, 2}), Recording("second", calls, {2}, ends_step=True),
             Recording("third", calls, {1, 2, 3})]
    assert [call_hooks(hooks, step, step == 3) for step in (1, 2, 3)] == [False, True, False]
    assert calls == [("first", 1), ("third", 1), ("first", 2), ("second", 2), ("third", 3)]


def test_a_run_takes_its_actions_in_order_each_when_due(tmp_path, tiny_run_args, capsys):
    """Validation's loss is on the log line; then the sample, the checkpoint; each on its own interval."""
    from argonne.run_config import load_run_config

    train(load_run_config(None, tiny_run_args(tmp_path, "--train.steps=4", "--train.log_every=2",
                                              "--train.eval_every=4", "--train.sample_every=2",
                                              "--train.sample_tokens=2", "--checkpoint.every=4",
                                              "--train.tensorboard=false")))
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith(("step ", "sample: ", "checkpoint saved: "))]
    kinds = [("val" if "val loss" in line else "log") if line.startswith("step ") else line.split(":")[0]
             for line in lines]
    assert kinds == ["log", "sample", "val", "sample", "checkpoint saved"], lines
    # The last line says what the run reached (the last record's losses) and where its outputs are.
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert out[-1] == (f"done after step 4: loss {record['loss']:.2f}, validation loss {record['val_loss']:.2f} "
                       f"(perplexity {math.exp(record['val_loss']):,.0f}); the model is in {tmp_path / 'run' / 'model'}, "
                       f"the loss curve in {tmp_path / 'run' / 'loss.png'}"), out[-3:]
