"""configuration_argonne.py: presets, exact parameter counts, field checks, FLOPs per token."""

import pytest

from argonne import PRESETS, ArgonneConfig
from argonne.metrics import count_parameters, training_flops_per_token

EXACT_PARAMETERS = {
    "argonne-2.0": 4_918_072_800,
    "argonne-1.5": 356_516_640,
    "argonne-1.0": 275_827_680,
    "small": 493_762_304,
    "tiny": 4_999_424,
    "tiny-plus": 4_999_936,  # + QK-norm: 2 x head_dim per layer
    "small-plus": 493_765_376,
}


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_the_plus_presets_are_their_originals_with_qk_norm(name):
    """The recipe ablation's winner ships as new presets; the originals stay as they were."""
    original, plus = ArgonneConfig.from_preset(name), ArgonneConfig.from_preset(f"{name}-plus")
    assert plus.qk_norm and not original.qk_norm
    assert {**plus.to_diff_dict(), "qk_norm": False} == original.to_diff_dict()


def test_every_preset_has_a_pinned_parameter_count():
    assert set(PRESETS) == set(EXACT_PARAMETERS)


@pytest.mark.parametrize("preset", sorted(EXACT_PARAMETERS))
def test_exact_parameter_count(preset):
    assert count_parameters(ArgonneConfig.from_preset(preset)) == EXACT_PARAMETERS[preset]


def test_argonne_2_shape():
    config = ArgonneConfig.from_preset("argonne-2.0")
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (4080, 24, 170)
    assert (config.num_attention_heads, config.num_key_value_heads) == (24, 8)
    assert (config.norm_type, config.mlp_type, config.position_embedding) == ("rmsnorm", "swiglu", "rope")
    assert config.tie_word_embeddings and not config.attention_bias and not config.mlp_bias


def test_argonne_1_is_gpt2_style():
    config = ArgonneConfig.from_preset("argonne-1.5")
    assert (config.norm_type, config.mlp_type, config.position_embedding) == ("layernorm", "gelu", "learned")
    assert config.attention_bias and config.mlp_bias and not config.tie_word_embeddings
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.max_position_embeddings == 2048


def test_overrides_change_any_field():
    config = ArgonneConfig.from_preset("tiny", vocab_size=151_665, num_hidden_layers=2)
    assert (config.vocab_size, config.num_hidden_layers) == (151_665, 2)
    assert ArgonneConfig.from_preset("tiny").vocab_size == 8192  # presets are not mutated


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*argonne-2.0"):
        ArgonneConfig.from_preset("huge")


def test_invalid_fields_are_all_reported_at_once():
    with pytest.raises(ValueError) as error:
        ArgonneConfig(norm_type="batchnorm", mlp_type="relu", hidden_size=0)
    message = str(error.value)
    assert "norm_type" in message and "mlp_type" in message and "hidden_size" in message


def test_kv_heads_must_divide_query_heads():
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"):
        ArgonneConfig.from_preset("tiny", num_key_value_heads=3)


def test_config_round_trips_through_dict():
    config = ArgonneConfig.from_preset("argonne-1.0")
    again = ArgonneConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_flops_per_token_matches_the_reference_formula():
    # ../shared/reference README: 6 N + 12 L H hd S, with N the 0.5B shape's 493,762,304 parameters (tied).
    config = ArgonneConfig.from_preset("small")
    assert training_flops_per_token(config, 4096) == 6 * 493_762_304 + 12 * 24 * 14 * 64 * 4096


def test_unknown_model_fields_suggest_the_close_match():
    with pytest.raises(ValueError, match=r"unknown model field 'num_layerz' \(did you mean 'num_hidden_layers'\?\)"):
        ArgonneConfig.from_preset("tiny", num_layerz=2)
    with pytest.raises(ValueError) as error:
        ArgonneConfig.from_preset("tiny", hiden_size=8, zzz=1)
    assert "'hiden_size' (did you mean 'hidden_size'?)" in str(error.value) and "'zzz'" in str(error.value)
    # transformers' own fields are still accepted
    config = ArgonneConfig.from_preset("tiny", pad_token_id=0, bos_token_id=0, output_hidden_states=True)
    assert config.pad_token_id == 0


def test_qk_norm_is_off_by_default_and_in_configs_saved_without_it():
    assert not any(ArgonneConfig.from_preset(name).qk_norm for name in PRESETS if not name.endswith("-plus"))
    saved_before = {k: v for k, v in ArgonneConfig.from_preset("tiny").to_dict().items() if k != "qk_norm"}
    assert ArgonneConfig.from_dict(saved_before).qk_norm is False
    config = ArgonneConfig.from_preset("tiny", qk_norm=True)
    assert ArgonneConfig.from_dict(config.to_dict()).qk_norm is True
    # one weight of head_dim for the queries and one for the keys, per layer
    assert count_parameters(config) == EXACT_PARAMETERS["tiny"] + 2 * config.head_dim * config.num_hidden_layers


def test_switches_must_be_booleans():
    with pytest.raises(ValueError) as error:
        ArgonneConfig.from_preset("tiny", qk_norm="false", mlp_bias=1)
    assert "qk_norm must be true or false, got 'false'" in str(error.value)
    assert "mlp_bias must be true or false, got 1" in str(error.value)
