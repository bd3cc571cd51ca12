"""ModelConfig validation and presets."""

import pytest

from llmjax.config import ConfigError, ModelConfig, RopeScaling, count_params, get_config


def make(**kw):
    fields = dict(vocab_size=100, d_model=64, num_layers=2, num_heads=4, d_ff=128)
    fields.update(kw)
    return ModelConfig(**fields)


def test_defaults_are_filled_in():
    cfg = make()
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16
    assert cfg.padded_vocab_size == 128
    assert hash(cfg) == hash(make())  # hashable: usable as a static jit argument


def test_explicit_head_dim_may_differ_from_d_model_over_heads():
    cfg = make(d_model=60, num_heads=4, head_dim=32)
    assert cfg.q_size == 128


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(d_model=70), r"num_heads=4 does not divide d_model=70"),
        (dict(num_kv_heads=3), r"num_kv_heads=3 does not divide num_heads=4"),
        (dict(num_layers=0), r"num_layers=0: must be a positive integer"),
        (dict(vocab_size=-5), r"vocab_size=-5: must be a positive integer"),
        (dict(d_ff=2.5), r"d_ff=2.5: must be a positive integer"),
        (dict(norm="batchnorm"), r"norm='batchnorm': expected one of 'layernorm', 'rmsnorm'"),
        (dict(activation="relu"), r"activation='relu': expected one of"),
        (dict(positions="rope", rope_layout="pairs"), r"rope_layout='pairs': expected one of 'half', 'interleaved'"),
        (dict(rope_scaling=RopeScaling("linear", 2.0)), r"rope_scaling is set but positions is not 'rope'"),
        (dict(sliding_window=0), r"sliding_window=0: must be >= 1"),
        (dict(compute_dtype="int8"), r"compute_dtype='int8': expected one of"),
        (dict(remat="sometimes"), r"remat='sometimes': expected one of"),
    ],
)
def test_inconsistent_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        make(**fields)


def test_bad_rope_scaling_is_rejected():
    with pytest.raises(ConfigError, match=r"RopeScaling.kind='xpos'"):
        RopeScaling("xpos", 2.0)
    for kind in ("ntk", "yarn"):
        with pytest.raises(ConfigError, match=rf"RopeScaling.factor=1.0: {kind} extends the context, must be > 1"):
            RopeScaling(kind, 1.0)
    with pytest.raises(ConfigError, match="need beta_fast > beta_slow > 0"):
        RopeScaling("yarn", 4.0, beta_fast=1.0, beta_slow=2.0)
    with pytest.raises(ConfigError, match="performer_features=3"):
        get_config("llama-tiny", performer_features=3)
    with pytest.raises(ConfigError, match="mlp_block_tokens=-1"):
        get_config("llama-tiny", mlp_block_tokens=-1)
    with pytest.raises(ConfigError, match="high_freq_factor=1.0 must be greater than low_freq_factor=2.0"):
        RopeScaling("llama3", 8.0, low_freq_factor=2.0, high_freq_factor=1.0)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown model preset 'gpt5'; available: gpt2-124m, "):
        get_config("gpt5")


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="num_kv_heads=5"):
        get_config("llama-125m").replace(num_kv_heads=5)


def test_counts_agree_with_hugging_face():
    """Our formula against transformers' own models, built on the meta device (no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llmjax.io import hf_config_from

    for name in ["gpt2-124m", "gpt2-355m", "llama-125m", "llama-1b", "llama-8b"]:
        cfg = get_config(name)
        hf_config = transformers.AutoConfig.for_model(**hf_config_from(cfg))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        assert model.num_parameters() == count_params(cfg), name


def test_odd_head_dim_with_rope_is_refused_only_where_rope_is_applied():
    """A config is not refused for a field no call has used yet: the odd head size is an error when RoPE
    runs (one line naming the shape), not when the config is built or its parameters counted."""
    import jax
    import numpy as np

    from llmjax.model import forward, init_params

    cfg = ModelConfig(vocab_size=50, d_model=30, num_layers=1, num_heads=2, d_ff=40, positions="rope",
                      max_seq_len=16, vocab_multiple=8)
    assert cfg.head_dim == 15
    assert count_params(cfg) > 0
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"rope: x \[1, 4, 2, 15\] has an odd head_dim 15"):
        forward(params, np.zeros((1, 4), np.int32), cfg)
