import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.cli import main
from argonne.generate import generate, load_model, read_prompts

from .conftest import SAMPLE_TOKENIZER


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", num_hidden_layers=2, initializer_range=0.2)
    ArgonneForCausalLM(config).save_pretrained(tmp_path)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(tmp_path)
    return tmp_path


def test_seeded_sampling_is_reproducible_and_greedy_is_deterministic(model_dir):
    model, tokenizer = load_model(model_dir, "cpu")
    a = generate(model, tokenizer, "The table", max_new_tokens=12, seed=7)
    b = generate(model, tokenizer, "The table", max_new_tokens=12, seed=7)
    assert a == b and len(tokenizer(a).input_ids) > 0
    greedy = [generate(model, tokenizer, "The table", max_new_tokens=12, temperature=0, seed=s) for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_cli_streams_the_continuation(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_prompts_from_a_file_one_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\nsecond\n")
    assert read_prompts(None, str(path)) == ["first", "second"]
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompt given"):
        read_prompts(None, str(path))
