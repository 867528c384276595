"""`argonne generate`: streaming from the command line on the engine; seeded sampling is reproducible; a model whose
logits overflow ends with one line, never a token."""

import pytest

from argonne_cli import main
from argonne.inference.engine import Engine, EngineSettings
from argonne.inference.sampling import NonFiniteLogits, SamplingParams
from argonne.loading import open_model

from .conftest import small_model
from .inference.test_runner import IdTokenizer, prompts_of


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(model_dir):
    model, tokenizer = open_model(model_dir, "cpu")
    generator = Engine(model, tokenizer, EngineSettings(max_batch=2))
    a, b = (generator.generate(["The table"], SamplingParams(max_new_tokens=12, seed=7))[0] for _ in range(2))
    assert a == b and a
    c = generator.generate(["The table"], SamplingParams(max_new_tokens=12, seed=8))[0]
    assert c != a


def test_cli_streams_the_continuation(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_triton_kernels_on_a_cpu_are_a_clear_error(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--kernels", "gemv+attention"]) == 2
    assert "Triton kernels for CUDA GPUs" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_prompts_longer_than_the_context_are_a_clear_error(model_dir, capsys):
    prompt = " ".join(["word"] * 1100)  # the tiny preset's context is 1,024 tokens
    assert main(["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "5"]) == 2
    assert "exceeds the context window" in capsys.readouterr().err


def test_the_cli_decodes_every_prompt_of_a_file_on_one_engine(model_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "prompts.txt"
    path.write_text("The table\nA chair\n")
    made = []
    real = Engine.__init__
    monkeypatch.setattr(Engine, "__init__", lambda self, *a, **k: (made.append(a[2:3]), real(self, *a, **k))[1])
    assert main(["generate", str(model_dir), "--prompt-file", str(path), "--max-new-tokens", "4", "--seed", "1",
                 "--temperature", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["The", "A"]
    settings = made[0][0]
    assert len(made) == 1 and settings.max_batch == 1 and settings.max_len == 256  # 2-3 tokens + 4, rounded up
    model, tokenizer = open_model(model_dir, "cpu")
    expected = Engine(model, tokenizer).generate(["The table"], SamplingParams(max_new_tokens=4, temperature=0))
    assert lines[0] == "The table" + expected[0]


def nan_logits_from_call(model, call: int, row: int | None = None):
    """Makes the model's logits NaN (in `row`, else every row) from its `call`-th forward on (1: the prefill)."""
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) >= call and (row is None or row < len(output.logits)):
            output.logits[slice(None) if row is None else row] = float("nan")
        return output

    model.register_forward_hook(poison)
    return model


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("call", [1, 3], ids=["in-prefill", "in-decode"])
def test_non_finite_logits_raise_instead_of_becoming_a_token(temperature, call):
    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=0)
    engine = Engine(nan_logits_from_call(small_model(), call, row=1), IdTokenizer(), EngineSettings(max_batch=2))
    with pytest.raises(NonFiniteLogits, match=r"non-finite logits \(NaN or Inf\)"):
        engine.complete(prompts_of([4, 3]), params)
    engine = Engine(nan_logits_from_call(small_model(), call), IdTokenizer(), EngineSettings(max_batch=2))
    with pytest.raises(NonFiniteLogits, match=r"non-finite logits \(NaN or Inf\)"):
        engine.stream(prompts_of([4])[0], params, lambda text: None)


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_generate_on_overflowing_logits_ends_with_one_line_and_no_traceback(overflowing_model_dir, capsys,
                                                                           temperature):
    argv = ["generate", str(overflowing_model_dir), "--prompt", "hi", "--max-new-tokens", "3", "--temperature",
            temperature, "--seed", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("argonne generate: error: the model produced non-finite logits (NaN or Inf)")
    assert err.count("\n") == 1 and "Traceback" not in err
