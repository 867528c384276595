"""Distillation: the KL term, vocabulary checks, and the trainer with a teacher."""

import json

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.run_config import ConfigError, load_run_config
from argonne.training.build import PRETRAINING
from argonne.training.distill import DISTILLATION, distillation_loss
from argonne.training.loop import train

from .conftest import SAMPLE_TOKENIZER

SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, max_position_embeddings=128)


def save_model(folder, seed=0, tokenizer=SAMPLE_TOKENIZER, **overrides):
    torch.manual_seed(seed)
    ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **{**SHAPE, **overrides})).save_pretrained(folder)
    load_tokenizer(tokenizer).save_pretrained(folder)
    return folder


def run(tmp_path, prepared, name, *extra):
    args = [f"--data.prepared={str(prepared)!r}", f"--data.tokenizer={str(SAMPLE_TOKENIZER)!r}", "--data.workers=0",
            "--data.seq_len=32", "--data.val_windows=0", f"--train.run_dir={str(tmp_path / name)!r}",
            "--train.micro_batch_size=4", "--train.peak_tflops=1", "--train.tensorboard=false",
            "--train.log_every=1", "--optim.warmup_steps=2",
            "--model.overrides={" + ", ".join(f"{k} = {v}" for k, v in SHAPE.items()) + "}", *extra]
    distilling = any(arg.startswith("--distill.teacher") for arg in extra)
    train(load_run_config(None, args), DISTILLATION if distilling else PRETRAINING)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]


@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 0.7)])
def test_the_chunked_loss_and_its_gradient_equal_the_whole_logits_formula(alpha, temperature):
    torch.manual_seed(0)
    student = torch.randn(2, 7, 13, requires_grad=True)  # 13 rows for 11 real tokens
    teacher = torch.randn(2, 7, 12)  # padded by one row
    targets = torch.randint(0, 13, (2, 7))
    targets[0, :3] = -100
    loss, kl, ce = distillation_loss(student, teacher, targets, 11, alpha, temperature, chunk=3)
    (grad,) = torch.autograd.grad(loss, student)

    scored, exact = targets != -100, student.double()  # the reference in float64
    p_teacher = (teacher[..., :11].double() / temperature).softmax(-1)
    kl_ref = (p_teacher * (p_teacher.log() - (exact[..., :11] / temperature).log_softmax(-1))).sum(-1)[scored].mean()
    ce_ref = torch.nn.functional.cross_entropy(exact.reshape(-1, 13), targets.reshape(-1), ignore_index=-100)
    reference = alpha * temperature**2 * kl_ref + (1 - alpha) * ce_ref
    (grad_ref,) = torch.autograd.grad(reference, student)
    close = dict(rtol=1e-5, atol=1e-6, check_dtype=False)  # float32 against float64
    torch.testing.assert_close(loss.detach(), reference.detach(), **close)
    torch.testing.assert_close((kl, ce), (kl_ref.detach(), ce_ref.detach()), **close)
    torch.testing.assert_close(grad, grad_ref, **close)
    whole, *_ = distillation_loss(student, teacher, targets, 11, alpha, temperature, chunk=100)
    torch.testing.assert_close(whole, loss)


def test_a_student_equal_to_the_teacher_has_zero_kl_and_no_scored_token_is_nan():
    logits = torch.randn(1, 5, 11)
    targets = torch.randint(0, 11, (1, 5))
    assert distillation_loss(logits, logits, targets, 11, 1.0, 1.0)[1].abs() < 1e-6
    assert distillation_loss(logits, logits, torch.full_like(targets, -100), 11, 0.5, 1.0)[0].isnan()


@pytest.mark.slow
def test_alpha_zero_is_plain_training(tmp_path, prepared_sample):
    teacher = save_model(tmp_path / "teacher", seed=5)
    plain = run(tmp_path, prepared_sample, "plain", "--train.steps=6")
    distilled = run(tmp_path, prepared_sample, "alpha0", "--train.steps=6", f"--distill.teacher={str(teacher)!r}",
                    "--distill.alpha=0")
    # Plain training takes the model's chunked loss, distillation its own: float32 rounding apart, the same run.
    assert [r["loss"] for r in distilled] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert all("kl" in r and "ce" in r for r in distilled)


@pytest.mark.slow
def test_a_student_identical_to_the_teacher_has_zero_kl(tmp_path, prepared_sample):
    teacher = save_model(tmp_path / "teacher", seed=5)
    records = run(tmp_path, prepared_sample, "same", "--train.steps=1", f"--model.init_from={str(teacher)!r}",
                  f"--distill.teacher={str(teacher)!r}", "--distill.alpha=1")
    assert abs(records[0]["kl"]) < 1e-6


@pytest.mark.slow
def test_the_students_kl_to_the_teacher_falls(tmp_path, prepared_sample):
    run(tmp_path, prepared_sample, "teacher", "--train.steps=40", "--optim.lr=3e-3")  # a teacher that knows something
    teacher = tmp_path / "teacher" / "model"
    records = run(tmp_path, prepared_sample, "learn", "--train.steps=30", f"--distill.teacher={str(teacher)!r}",
                  "--distill.alpha=1", "--distill.temperature=2", "--optim.lr=3e-3", "--train.seed=1")
    first, last = records[0]["kl"], sum(r["kl"] for r in records[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert records[0]["loss"] == pytest.approx(4 * records[0]["kl"], rel=1e-5)  # alpha * T^2 * KL


@pytest.mark.slow
def test_vocabularies_padded_mismatched_or_foreign(tmp_path, prepared_sample, qwen_tokenizer_dir):
    padded = save_model(tmp_path / "padded", seed=1, vocab_size=8192 + 64)
    assert run(tmp_path, prepared_sample, "padded-run", "--train.steps=1", f"--distill.teacher={str(padded)!r}")
    small = save_model(tmp_path / "small", seed=1, vocab_size=4096)
    with pytest.raises(ConfigError, match="teacher's output has 4096 rows for a 8192-token tokenizer"):
        run(tmp_path, prepared_sample, "small-run", "--train.steps=1", f"--distill.teacher={str(small)!r}")
    foreign = save_model(tmp_path / "foreign", seed=1, tokenizer=qwen_tokenizer_dir, vocab_size=151_665)
    with pytest.raises(ConfigError, match=r"teacher's tokenizer \(151665 tokens\) is not the training tokenizer"):
        run(tmp_path, prepared_sample, "foreign-run", "--train.steps=1", f"--distill.teacher={str(foreign)!r}")


def test_a_teacher_asking_to_run_its_own_code_is_refused_without_a_prompt(tmp_path, monkeypatch):
    from argonne.training.distill import load_teacher

    folder = save_model(tmp_path / "teacher")
    ran = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evilmodel", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked on the terminal"))
    with pytest.raises(ConfigError, match=f"distill.teacher {folder}: cannot be loaded"):
        load_teacher(folder, torch.device("cpu"))
    assert not ran.exists()


def test_a_teacher_with_non_finite_weights_is_refused(nan_model_dir):
    from argonne.training.distill import load_teacher
    from argonne.loading import ModelError

    with pytest.raises(ModelError, match="non-finite weights") as error:
        load_teacher(nan_model_dir, torch.device("cpu"))
    assert str(error.value).startswith(str(nan_model_dir))
