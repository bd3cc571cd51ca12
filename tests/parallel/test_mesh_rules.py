"""Meshes from axis sizes and the logical-axis rules, on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.model import init_params, model_spec
from llmjax.parallel.mesh import MeshError, make_mesh, mesh_shape, parse_mesh
from llmjax.parallel.rules import ShardingError, describe, spec_shardings


def test_parse_and_fill():
    assert parse_mesh("data=2, fsdp=-1") == {"data": 2, "fsdp": -1}
    assert mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "sequence": 1, "expert": 1, "tensor": 1}
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "expert": 1, "tensor": 2}
    assert dict(make_mesh().shape)["data"] == jax.device_count() == 8


@pytest.mark.parametrize(
    "text,message",
    [
        ("data=3", r"mesh data=3 has 3 devices but there are 8"),
        ("data=3,fsdp=-1", r"the other mesh axes multiply to 3, which does not divide the 8 devices"),
        ("data=-1,fsdp=-1", r"only one mesh axis may be -1"),
        ("pipeline=2", r"--mesh item 'pipeline=2': expected AXIS=SIZE"),
        ("data=two", r"--mesh data='two': the size must be an integer"),
        ("data=2,data=4", r"--mesh names axis 'data' twice"),
        ("data=0,fsdp=-1", r"mesh axis sizes must be positive"),
    ],
)
def test_bad_meshes_are_named(text, message):
    with pytest.raises(MeshError, match=message):
        make_mesh(text)


def specs(preset, mesh_text, model="llama-tiny", **overrides):
    return describe(spec_shardings(model_spec(get_config(model, **overrides)), make_mesh(mesh_text), preset))


def test_fsdp_shards_the_embed_axis_and_never_layers():
    got = specs("fsdp", "fsdp=8")
    assert got["blocks/attn/q/kernel"] == (None, 'fsdp', None, None)  # [layers, embed, heads, head_dim]
    assert got["blocks/mlp/down/kernel"] == (None, None, 'fsdp')  # [layers, mlp, embed]
    assert got["embed/token"] == (None, 'fsdp')  # [vocab, embed]
    assert got["blocks/attn_norm/scale"] == (None, 'fsdp')


def test_tensor_parallel_shards_heads_mlp_and_vocab():
    got = specs("fsdp+tp", "fsdp=4,tensor=2")
    assert got["blocks/attn/q/kernel"] == (None, 'fsdp', 'tensor', None)
    assert got["blocks/attn/k/kernel"] == (None, 'fsdp', 'tensor', None)  # 2 kv heads over tensor=2
    assert got["blocks/mlp/up/kernel"] == (None, 'fsdp', 'tensor')
    assert got["lm_head/kernel"] == ('fsdp', 'tensor')


def test_data_parallel_replicates_every_parameter():
    assert all(entry is None for spec in specs("dp", "data=8").values() for entry in spec)


def test_an_axis_that_does_not_divide_names_the_parameter():
    with pytest.raises(ShardingError, match=r"parameter 'blocks/attn/k/kernel': its 'kv_heads' dimension of 2 does not "
                                            r"divide over mesh axes \('tensor',\) of size 4"):
        specs("tp", "data=2,tensor=4")


def test_params_are_initialized_directly_sharded_and_equal_the_unsharded_init():
    cfg = get_config("llama-tiny", d_model=64, head_dim=8, d_ff=128, num_heads=8, num_kv_heads=4)
    shardings = spec_shardings(model_spec(cfg), make_mesh("fsdp=4,tensor=2"), "fsdp+tp")
    sharded = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(cfg, jax.random.key(0))
    plain = init_params(cfg, jax.random.key(0))
    for a, b, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), jax.tree.leaves(shardings)):
        assert a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
