"""The one Transformer block: its named intermediates (remat policies by name), its named scopes (profiles read
by layer part), and the decode path running through it."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import REMAT_NAMES, ConfigError, get_config
from llmjax.model import hidden_states, init_params

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 301, (2, 8)), jnp.int32)


def saved_scan_shapes(cfg, params) -> list[tuple[int, ...]]:
    """Shapes of what the layer scan keeps for the backward pass (jax.ad_checkpoint.print_saved_residuals)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(lambda p: hidden_states(p, TOKENS, cfg).sum(), params)
    shapes = re.findall(r"^\w+\[([\d,]*)\] output of scan", out.getvalue(), re.M)
    return [tuple(int(n) for n in shape.split(",")) for shape in shapes]


def test_remat_by_name_keeps_exactly_the_named_intermediates():
    base = get_config("llama-tiny")
    params = init_params(base, jax.random.key(0))
    layers, (batch, seq) = base.num_layers, TOKENS.shape
    query = (layers, batch, seq, base.num_heads, base.head_dim)
    key = (layers, batch, seq, base.num_kv_heads, base.head_dim)
    hidden = (layers, batch, seq, base.d_ff)

    kept = saved_scan_shapes(base.replace(remat="names", remat_save=("query", "key", "value")), params)
    assert query in kept and kept.count(key) == 2 and hidden not in kept
    kept = saved_scan_shapes(base.replace(remat="names", remat_save=("mlp_hidden",)), params)
    assert hidden in kept and query not in kept
    kept = saved_scan_shapes(base.replace(remat="full"), params)
    assert hidden not in kept and query not in kept


@pytest.mark.parametrize("unroll", [1, 2])  # 2 = every layer in one iteration: XLA inlines the one-trip scan
def test_remat_saves_memory_in_the_compiled_step_however_the_layers_are_unrolled(unroll):
    """What XLA keeps, not only what JAX asks for: an inlined scan once let XLA merge the recomputation with the
    forward pass (remat had no effect on GPUs, where the layers are unrolled)."""
    cfg = get_config("llama-tiny", d_model=96, d_ff=384, scan_unroll=unroll)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((4, 64), jnp.int32)

    def temp_bytes(remat):
        c = cfg.replace(remat=remat)
        grad = jax.jit(jax.grad(lambda p: hidden_states(p, tokens, c).astype(jnp.float32).sum()))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < 0.8 * temp_bytes("none")


def test_remat_by_name_does_not_change_values_or_gradients():
    base = get_config("llama-tiny")
    params = init_params(base, jax.random.key(1))

    def loss(p, cfg):
        return jnp.mean(hidden_states(p, TOKENS, cfg) ** 2)

    want_loss, want_grads = jax.value_and_grad(loss)(params, base)
    for cfg in (base.replace(remat="names", remat_save=("attention_output", "mlp_hidden")),
                base.replace(remat="names", remat_save=("query",), remat_offload=())):
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads, want_grads)


def test_remat_names_from_a_command_line_and_bad_names():
    cfg = get_config("llama-tiny", remat="names", remat_save="query, mlp_hidden")  # --set remat_save=query,mlp_hidden
    assert cfg.remat_save == ("query", "mlp_hidden")
    assert set(REMAT_NAMES) >= {"query", "key", "value", "attention_output", "mlp_hidden", "block_output"}
    with pytest.raises(ConfigError, match=r"remat_save: unknown intermediate\(s\) 'queries'; the named ones are block_input, query"):
        get_config("llama-tiny", remat="names", remat_save=("queries",))
    with pytest.raises(ConfigError, match=r"remat_save / remat_offload are set but remat='full'"):
        get_config("llama-tiny", remat="full", remat_save=("query",))
    with pytest.raises(ConfigError, match=r"query in both remat_save and remat_offload"):
        get_config("llama-tiny", remat="names", remat_save=("query",), remat_offload=("query",))


def test_profiles_read_by_layer_part():
    """Op names in the compiled programs carry the block's scopes: training (one scanned body) and decoding
    (one scope per layer: "layer 1/attention/qkv")."""
    from llmjax.infer import kv_cache
    from llmjax.infer.decode_model import decode_step, prepare_params

    cfg = get_config("llama-tiny")
    params = init_params(cfg, jax.random.key(2))
    training = jax.jit(lambda p: hidden_states(p, TOKENS, cfg)).lower(params).as_text(debug_info=True)
    for part in ("attention/qkv", "attention/rope", "attention/core", "attention/out_proj", "mlp/"):
        assert part in training, part
    cache = kv_cache.init_cache(cfg, 2, 16)
    decoding = jax.jit(decode_step, static_argnames="cfg").lower(
        prepare_params(params, cfg), TOKENS[:, 0], cache, cfg=cfg).as_text(debug_info=True)
    for part in ("layer 0/attention/qkv", "layer 1/attention/core", "layer 1/mlp/"):
        assert part in decoding, part
