"""Hugging Face import / export against transformers itself: tiny random models of awkward sizes,
logits compared on random tokens, files round-tripped both ways, and every kind of bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from llmjax.config import PRESETS, ModelConfig, RopeScaling  # noqa: E402
from llmjax.io import (  # noqa: E402
    CheckpointMismatchError,
    config_from_hf,
    hf_config_from,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from llmjax.model import forward, init_params  # noqa: E402
from llmjax.model.params import flatten_with_names  # noqa: E402

VOCAB = 97
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 13))  # [batch, seq]


# --- tiny Hugging Face models ------------------------------------------------------------

def _ready(model):
    """Fresh HF models have zero biases and unit norm scales; noise on every parameter makes
    a mix-up of any two tensors show in the logits."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.float().eval()


def gpt2(**overrides):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_inner=80, n_positions=32, **overrides
    )
    torch.manual_seed(0)
    return _ready(transformers.GPT2LMHeadModel(config))


def llama(**overrides):
    settings = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    return _ready(transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings | overrides)))


def mistral(**overrides):
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64, sliding_window=5, **overrides
    )
    torch.manual_seed(0)
    return _ready(transformers.MistralForCausalLM(config))


LLAMA3_ROPE = {  # head_dim 8, theta 1e4: wavelengths 6.3 (kept), 63 (interpolated), 628 and 6283 (scaled)
    "rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}
MODELS = {
    "gpt2_tied": gpt2,
    "gpt2_untied": lambda: gpt2(tie_word_embeddings=False),
    "llama_gqa_untied": llama,
    "llama_tied": lambda: llama(tie_word_embeddings=True),
    "llama_biases": lambda: llama(attention_bias=True, mlp_bias=True),
    "llama3_rope": lambda: llama(rope_parameters=LLAMA3_ROPE),
    "linear_rope": lambda: llama(rope_parameters={"rope_type": "linear", "rope_theta": 5_000.0, "factor": 4.0}),
    "yarn_rope": lambda: llama(rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 16}),
    "mistral_sliding_window": mistral,
}


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()  # [batch, seq, vocab]


def assert_logits_match(expected: np.ndarray, params, cfg) -> None:
    ours = np.asarray(forward(params, jnp.asarray(TOKENS), cfg))[..., :VOCAB]
    error, scale = np.abs(ours - expected).max(), max(1.0, np.abs(expected).max())
    assert error < 1e-4 * scale, f"max |logit difference| {error:.3g} at logit scale {scale:.3g}"


def assert_params_equal(a, b) -> None:
    flat_a, flat_b = flatten_with_names(a), flatten_with_names(b)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        assert flat_a[name].dtype == flat_b[name].dtype, name
        np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), err_msg=name)


# --- numerics against transformers ------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_import_matches_transformers(name, tmp_path):
    model = MODELS[name]()
    model.save_pretrained(tmp_path)
    params, cfg = load_hf_checkpoint(tmp_path)
    assert params["embed"]["token"].shape == (cfg.padded_vocab_size, cfg.d_model)
    assert not np.asarray(params["embed"]["token"][VOCAB:]).any(), "padding rows must be zero"
    assert_logits_match(hf_logits(model), params, cfg)


@pytest.mark.parametrize("name", ["gpt2_tied", "gpt2_untied", "llama_gqa_untied", "llama3_rope", "mistral_sliding_window"])
def test_gradients_match_torch_autograd(name, tmp_path):
    """d(sum(logits * weights))/d(params) in JAX equals torch's; HF's gradients are brought into our
    layout by saving them in place of the weights and loading them through the same tensor table."""
    model = MODELS[name]()
    model.save_pretrained(tmp_path / "weights")
    weights = np.random.default_rng(1).standard_normal((*TOKENS.shape, VOCAB)).astype(np.float32)
    (model(torch.from_numpy(TOKENS)).logits * torch.from_numpy(weights)).sum().backward()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.grad)
    model.save_pretrained(tmp_path / "grads")
    expected, _ = load_hf_checkpoint(tmp_path / "grads")

    params, cfg = load_hf_checkpoint(tmp_path / "weights")
    grads = jax.grad(lambda p: (forward(p, jnp.asarray(TOKENS), cfg)[..., :VOCAB] * weights).sum())(params)
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
    flat_expected = flatten_with_names(expected)
    for path, grad in flatten_with_names(grads).items():
        np.testing.assert_allclose(np.asarray(grad), np.asarray(flat_expected[path]), atol=1e-4 * largest, err_msg=path)


@pytest.mark.parametrize("name", MODELS)
def test_export_loads_in_transformers_and_round_trips(name, tmp_path):
    model = MODELS[name]()
    model.save_pretrained(tmp_path / "hf")
    params, cfg = load_hf_checkpoint(tmp_path / "hf")

    save_hf_checkpoint(params, cfg, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert type(reloaded) is type(model)
    assert_logits_match(hf_logits(reloaded), params, cfg)

    params_again, cfg_again = load_hf_checkpoint(tmp_path / "export", cfg)
    assert cfg_again == cfg
    assert_params_equal(params_again, params)


def meta_interleaved(weight, heads):
    """A Hugging Face LLaMA q/k projection (rows: per head, RoPE pairs (i, i + head_dim/2)) in Meta's original
    layout (pairs (2i, 2i + 1)): the inverse of transformers' conversion-script permutation."""
    rows = weight.shape[0]
    head_dim = rows // heads
    return weight.reshape(heads, 2, head_dim // 2, -1).transpose(0, 2, 1, 3).reshape(weight.shape)


def test_interleaved_rope_checkpoint_imports_without_surgery_and_exports_for_transformers(tmp_path):
    model = llama(attention_bias=True)
    model.save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    heads = {"q_proj": 6, "k_proj": 2}
    for name in list(tensors):
        projection = next((p for p in heads if f".{p}." in name), None)
        if projection:
            value = tensors[name]
            tensors[name] = meta_interleaved(value.reshape(value.shape[0], -1), heads[projection]).reshape(value.shape)
    folder = tmp_path / "interleaved"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text()) | {"rope_interleave": True}
    (folder / "config.json").write_text(json.dumps(config))

    params, cfg = load_hf_checkpoint(folder)
    assert cfg.rope_layout == "interleaved"
    stored = tensors["model.layers.1.self_attn.q_proj.weight"]  # [heads * head_dim, d_model], as in the file
    np.testing.assert_array_equal(np.asarray(params["blocks"]["attn"]["q"]["kernel"][1]),
                                  stored.T.reshape(cfg.d_model, cfg.num_heads, cfg.head_dim))
    assert_logits_match(hf_logits(model), params, cfg)

    save_hf_checkpoint(params, cfg, tmp_path / "export")
    assert "rope_interleave" not in json.loads((tmp_path / "export" / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert_logits_match(hf_logits(reloaded), params, cfg)
    half_params, half_cfg = load_hf_checkpoint(tmp_path / "export")
    assert half_cfg == cfg.replace(rope_layout="half")
    with pytest.raises(CheckpointMismatchError, match=r"cfg.rope_layout='interleaved' but the checkpoint's"):
        load_hf_checkpoint(tmp_path / "export", cfg)


def test_sharded_checkpoints_both_ways(tmp_path):
    model = llama()
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    params, cfg = load_hf_checkpoint(tmp_path / "hf")
    assert_logits_match(hf_logits(model), params, cfg)

    save_hf_checkpoint(params, cfg, tmp_path / "export", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "export" / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert_logits_match(hf_logits(reloaded), params, cfg)
    assert_params_equal(load_hf_checkpoint(tmp_path / "export")[0], params)


def test_original_gpt2_names_without_prefix_and_with_mask_buffers(tmp_path):
    """The hub's gpt2 files name tensors "h.0.attn.c_attn.weight" and carry the causal-mask buffer."""
    model = gpt2()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors = {name.removeprefix("transformer."): value for name, value in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    params, cfg = load_hf_checkpoint(tmp_path)
    assert_logits_match(hf_logits(model), params, cfg)


def test_bfloat16_export_and_import(tmp_path):
    cfg = PRESETS["llama-tiny"]
    params = init_params(cfg, jnp.zeros(2, jnp.uint32))
    save_hf_checkpoint(params, cfg, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, loaded_cfg = load_hf_checkpoint(tmp_path, cfg, dtype="bfloat16")
    assert loaded_cfg.param_dtype == "bfloat16"
    expected = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _without_padding(params, cfg))
    assert_params_equal(loaded, expected)


def _without_padding(params, cfg):
    """params as an export + import gives them back: padding rows are not saved and return as zeros."""
    params = jax.tree.map(lambda p: p, params)  # a copy of the dicts
    params["embed"]["token"] = params["embed"]["token"].at[cfg.vocab_size:].set(0)
    if "lm_head" in params:
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, cfg.vocab_size:].set(0)
    return params


def test_our_own_params_round_trip_exactly(tmp_path):
    for preset in ("gpt2-tiny", "llama-tiny"):
        cfg = PRESETS[preset]
        params = init_params(cfg, jnp.zeros(2, jnp.uint32))
        save_hf_checkpoint(params, cfg, tmp_path / preset)
        loaded, _ = load_hf_checkpoint(tmp_path / preset, cfg)
        assert_params_equal(loaded, _without_padding(params, cfg))


# --- configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b", "llama-8b", "gpt2-tiny", "llama-tiny"])
def test_config_round_trip(preset):
    cfg = PRESETS[preset]
    back = config_from_hf(hf_config_from(cfg), name=cfg.name, vocab_multiple=cfg.vocab_multiple,
                          param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
    assert back == cfg


def test_mistral_config_round_trip():
    cfg = PRESETS["llama-7b"].replace(sliding_window=4096)
    hf = hf_config_from(cfg)
    assert hf["model_type"] == "mistral" and hf["architectures"] == ["MistralForCausalLM"]
    assert config_from_hf(hf).sliding_window == 4096


def test_ntk_scaling_exports_as_the_larger_base(tmp_path):
    """NTK-aware scaling is plain RoPE with base theta * factor ** (d / (d - 2)): written so, transformers computes
    our logits (and a re-import is the same model, without the scaling record)."""
    cfg = PRESETS["llama-tiny"].replace(rope_scaling=RopeScaling("ntk", 4.0), max_seq_len=64)
    params = init_params(cfg, jax.random.key(3))
    save_hf_checkpoint(params, cfg, tmp_path / "ntk")
    hf = json.loads((tmp_path / "ntk" / "config.json").read_text())
    assert hf["rope_parameters"]["rope_type"] == "default"
    assert hf["rope_theta"] == pytest.approx(cfg.rope_theta * 4.0 ** (cfg.head_dim / (cfg.head_dim - 2)))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ntk", dtype=torch.float32).eval()
    tokens = TOKENS % cfg.vocab_size
    with torch.no_grad():
        expected = reloaded(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(forward(params, jnp.asarray(tokens), cfg))[..., :expected.shape[-1]]
    assert np.abs(ours - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_legacy_rope_scaling_keys():
    llama3 = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    legacy = dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, rope_theta=500_000.0, rope_scaling=llama3,
    )
    cfg = config_from_hf(legacy)
    assert cfg.rope_theta == 500_000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    linear = config_from_hf(legacy | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == RopeScaling("linear", 2.0)
    assert config_from_hf(legacy | {"rope_scaling": None}).rope_scaling is None


def test_unsupported_configs_are_named():
    llama_config = hf_config_from(PRESETS["llama-tiny"])
    with pytest.raises(CheckpointMismatchError, match="model_type='t5'"):
        config_from_hf({"model_type": "t5"})
    with pytest.raises(CheckpointMismatchError, match="'longrope'"):
        config_from_hf(llama_config | {"rope_scaling": None,
                                       "rope_parameters": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(CheckpointMismatchError, match="hidden_act='gelu'"):
        config_from_hf(llama_config | {"hidden_act": "gelu"})
    gpt2_config = hf_config_from(PRESETS["gpt2-tiny"])
    with pytest.raises(CheckpointMismatchError, match="activation_function='relu'"):
        config_from_hf(gpt2_config | {"activation_function": "relu"})
    with pytest.raises(CheckpointMismatchError, match="'n_embd'"):
        config_from_hf({k: v for k, v in gpt2_config.items() if k != "n_embd"})


def test_config_without_hf_layout():
    mixed = ModelConfig(vocab_size=VOCAB, d_model=48, num_layers=2, num_heads=6, d_ff=80, norm="rmsnorm")
    with pytest.raises(ValueError, match="no Hugging Face layout"):
        hf_config_from(mixed)
    gqa_gpt2 = PRESETS["gpt2-tiny"].replace(num_kv_heads=2)
    with pytest.raises(ValueError, match="num_kv_heads == num_heads"):
        hf_config_from(gqa_gpt2)


# --- bad input ---------------------------------------------------------------------------

@pytest.fixture
def llama_folder(tmp_path):
    llama().save_pretrained(tmp_path)
    return tmp_path


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(llama_folder):
    _edit_tensors(llama_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(llama_folder)


def test_untied_model_without_lm_head(llama_folder):
    _edit_tensors(llama_folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointMismatchError, match="'lm_head.weight'"):
        load_hf_checkpoint(llama_folder)


def test_extra_tensor(llama_folder):
    extra = {"model.layers.3.mlp.up_proj.weight": np.zeros((80, 48), np.float32)}  # the model has 3 layers
    _edit_tensors(llama_folder, lambda t: t.update(extra))
    with pytest.raises(CheckpointMismatchError, match=r"does not call for: 'model\.layers\.3\.mlp\.up_proj\.weight'"):
        load_hf_checkpoint(llama_folder)


def test_wrong_shape(llama_folder):
    wrong = {"model.layers.0.self_attn.k_proj.weight": np.zeros((24, 48), np.float32)}  # 2 kv heads * 8 = 16 rows
    _edit_tensors(llama_folder, lambda t: t.update(wrong))
    expected_message = r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*\[24, 48\], expected \[16, 48\]"
    with pytest.raises(CheckpointMismatchError, match=expected_message):
        load_hf_checkpoint(llama_folder)


def test_missing_files(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointMismatchError, match="no model.safetensors"):
        load_hf_checkpoint(llama_folder)
    (llama_folder / "config.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="no config.json"):
        load_hf_checkpoint(llama_folder)


def test_corrupt_weights_file(llama_folder):
    data = (llama_folder / "model.safetensors").read_bytes()
    (llama_folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="model.safetensors is not a readable safetensors file"):
        load_hf_checkpoint(llama_folder)


def test_cfg_differs_from_config_json(llama_folder):
    _, cfg = load_hf_checkpoint(llama_folder)
    with pytest.raises(CheckpointMismatchError, match=r"cfg\.num_kv_heads=3 .* gives 2"):
        load_hf_checkpoint(llama_folder, cfg.replace(num_kv_heads=3))
    with pytest.raises(CheckpointMismatchError, match=r"cfg\.d_ff=96"):
        load_hf_checkpoint(llama_folder, cfg.replace(d_ff=96))
    # Longer context for RoPE models and other dtypes are the caller's choice.
    params, chosen = load_hf_checkpoint(llama_folder, cfg.replace(max_seq_len=256, compute_dtype="bfloat16"))
    assert chosen.max_seq_len == 256


def test_save_refuses_to_clobber_and_leaves_nothing_half_written(tmp_path):
    cfg = PRESETS["gpt2-tiny"]
    params = init_params(cfg, jnp.zeros(2, jnp.uint32))
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_checkpoint(params, cfg, target)
    assert (target / "notes.txt").read_text() == "keep me"

    bad = dict(params, final_norm={"scale": jnp.ones(47), "bias": jnp.zeros(48)})
    with pytest.raises(CheckpointMismatchError, match=r"'final_norm/scale' has shape \[47\], expected \[48\]"):
        save_hf_checkpoint(bad, cfg, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no partial folder may remain"

    save_hf_checkpoint(params, cfg, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
