"""Mixtral import / export against transformers: a tiny random MixtralForCausalLM on CPU, logits within
float32 tolerance through every dispatch path, files round-tripped both ways, configs that do not fit."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax.config import get_config  # noqa: E402
from llmjax.io import hf_config_from, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from llmjax.model import forward, init_params  # noqa: E402
from llmjax.model.params import flatten_with_names  # noqa: E402

VOCAB = 97
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 13))  # [batch, seq]


def mixtral(**overrides):
    settings = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**settings | overrides))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # noise on every parameter, and a router with clear-cut choices
        for name, parameter in model.named_parameters():
            parameter.add_((1.0 if "gate.weight" in name else 0.05) * torch.randn(parameter.shape, generator=generator))
    return model.float().eval()


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


def assert_logits_match(expected, params, cfg) -> None:
    ours = np.asarray(forward(params, jnp.asarray(TOKENS), cfg))[..., :VOCAB]
    error, scale = np.abs(ours - expected).max(), max(1.0, np.abs(expected).max())
    assert error < 1e-4 * scale, f"max |logit difference| {error:.3g} at logit scale {scale:.3g}"


@pytest.mark.parametrize("impl", ["ragged_dot", "capacity", "pallas"])
def test_mixtral_import_matches_transformers(impl, tmp_path):
    model = mixtral()
    model.save_pretrained(tmp_path)
    params, cfg = load_hf_checkpoint(tmp_path)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_width, cfg.moe_every) == (4, 2, 40, 1)
    assert params["moe_blocks"]["moe"]["experts"]["gate"]["kernel"].shape == (2, 4, 48, 40)
    # capacity: enough slots that nothing is dropped (Mixtral is dropless)
    assert_logits_match(hf_logits(model), params, cfg.replace(moe_impl=impl, capacity_factor=2.0))


def test_mixtral_with_top_1_and_a_sliding_window(tmp_path):
    model = mixtral(num_experts_per_tok=1, sliding_window=5, num_local_experts=3)
    model.save_pretrained(tmp_path)
    params, cfg = load_hf_checkpoint(tmp_path)
    assert cfg.sliding_window == 5 and cfg.experts_per_token == 1 and cfg.renormalize_top_k
    assert_logits_match(hf_logits(model), params, cfg)


def test_mixtral_export_loads_in_transformers_and_round_trips(tmp_path):
    cfg = get_config("llama-moe-tiny", vocab_size=VOCAB, expert_d_ff=None, d_ff=40)
    params = init_params(cfg, __import__("jax").random.key(0))
    save_hf_checkpoint(params, cfg, tmp_path / "ours")
    model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    assert_logits_match(hf_logits(model), params, cfg)
    again, again_cfg = load_hf_checkpoint(tmp_path / "ours", cfg)
    flat, flat_again = flatten_with_names(params), flatten_with_names(again)
    assert flat.keys() == flat_again.keys()
    flat["embed/token"], flat_again["embed/token"] = flat["embed/token"][:VOCAB], flat_again["embed/token"][:VOCAB]
    flat["lm_head/kernel"] = flat["lm_head/kernel"][:, :VOCAB]
    flat_again["lm_head/kernel"] = flat_again["lm_head/kernel"][:, :VOCAB]  # padding: zeros on import
    for name in flat:
        np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(flat_again[name]), err_msg=name)
    assert hf_config_from(cfg)["num_local_experts"] == 4


@pytest.mark.parametrize("fields,message", [
    (dict(moe_every=2), r"moe_every=1 and no shared experts"),
    (dict(num_shared_experts=1), r"moe_every=1 and no shared experts"),
    (dict(expert_d_ff=24), r"expert_d_ff equal to d_ff"),
])
def test_moe_configs_without_a_mixtral_layout_are_refused(fields, message):
    cfg = get_config("llama-moe-tiny", expert_d_ff=None, d_ff=40).replace(**fields)
    with pytest.raises(ValueError, match=message):
        hf_config_from(cfg)


def test_parameter_count_agrees_with_transformers():
    from llmjax.config import count_params

    cfg = get_config("llama-moe-125m", expert_d_ff=None, d_ff=1024)
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**hf_config_from(cfg)))
    assert model.num_parameters() == count_params(cfg)
