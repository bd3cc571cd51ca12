"""Which implementation runs follows where a computation is placed (kernels/platform.py), not the process's
first device: simulated here by making the process's default device look like a GPU while the computation is
placed on the CPU backend."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.kernels.platform import compute_device, compute_platform
from llmjax.model import forward, init_params
from llmjax.model.attention import ATTENTION_IMPLS


@dataclasses.dataclass(frozen=True)
class FakeGpu:
    platform: str = "gpu"
    id: int = 0
    device_kind: str = "NVIDIA H200"
    core_count: int = 132


def test_inputs_then_default_device_then_first_device():
    cpus = jax.devices("cpu")
    placed = jax.device_put(jnp.ones(3), cpus[-1])
    assert compute_device(placed) == cpus[-1]
    assert compute_device({"a": [None, placed]}) == cpus[-1]  # any pytree, non-arrays skipped
    with jax.default_device(cpus[2]):
        assert compute_device() == cpus[2]
        assert compute_device(np.ones(3)) == cpus[2]  # NumPy inputs have no device
    with jax.default_device("cpu"):
        assert compute_platform() == "cpu"
    assert compute_device() == jax.devices()[0]


def test_a_computation_placed_on_the_cpu_runs_the_reference_in_a_gpu_process(monkeypatch):
    cfg = get_config("llama-tiny", compute_dtype="float32")  # attention / norm impl "auto"
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    want = forward(params, tokens, cfg)
    cpu = jax.devices("cpu")[0]
    chosen = []

    def spy(name, impl):  # the implementation, recording that it ran
        def run(*args, **kwargs):
            chosen.append(name)
            return impl(*args, **kwargs)
        return run

    for name, impl in list(ATTENTION_IMPLS.items()):
        monkeypatch.setitem(ATTENTION_IMPLS, name, spy(name, impl))
    monkeypatch.setattr(jax, "devices", lambda *backend: [FakeGpu()] if not backend else [cpu])

    assert compute_platform() == "gpu"  # what the process's first device says
    with jax.default_device(cpu), warnings.catch_warnings():
        warnings.simplefilter("error")  # a GPU kernel chosen and then refused would warn
        assert compute_platform() == "cpu"
        got = jax.jit(forward, static_argnums=2)(params, tokens, cfg)
    assert chosen and set(chosen) == {"xla"}
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_decode_pads_rows_only_for_gpus(monkeypatch):
    """decode_step's GPU-only row padding and kernel follow the placement too."""
    from llmjax.infer import kv_cache
    from llmjax.infer.decode_model import decode_step, prepare_params, resolve_decode_impl

    cfg = get_config("llama-tiny", compute_dtype="float32", head_dim=16)  # the Pallas kernel takes head_dim >= 16
    params = prepare_params(init_params(cfg, jax.random.key(1)), cfg)
    cache = kv_cache.init_cache(cfg, 2, 16)
    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(jax, "devices", lambda *backend: [FakeGpu()] if not backend else [cpu])
    assert resolve_decode_impl("auto", cfg) == "pallas"
    with jax.default_device(cpu):
        assert resolve_decode_impl("auto", cfg) == "xla"
        logits, _ = jax.jit(decode_step, static_argnames="cfg")(params, jnp.array([3, 4]), cache, cfg=cfg)
    assert logits.shape == (2, cfg.padded_vocab_size) and np.isfinite(logits[:, : cfg.vocab_size]).all()


def test_a_plan_over_cpu_devices_runs_the_reference_in_a_gpu_process(monkeypatch):
    """A training step traced with a plan (a static argument) reads the platform of the plan's mesh."""
    from llmjax.config import TrainConfig
    from llmjax.parallel.plan import Plan
    from llmjax.train.step import make_train_step, windows_to_batch

    cfg = get_config("llama-tiny", compute_dtype="float32")
    train_cfg = TrainConfig()
    plan = Plan.create("data=2,fsdp=2", "fsdp", devices=jax.devices("cpu")[:4])
    state = plan.init_state(cfg, train_cfg, jax.random.key(0))
    batch = windows_to_batch(jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 9)), jnp.int32))
    cpu = jax.devices("cpu")[0]
    chosen = []

    def spy(name, impl):
        def run(*args, **kwargs):
            chosen.append(name)
            return impl(*args, **kwargs)
        return run

    for name, impl in list(ATTENTION_IMPLS.items()):
        monkeypatch.setitem(ATTENTION_IMPLS, name, spy(name, impl))
    monkeypatch.setattr(jax, "devices", lambda *backend: [FakeGpu()] if not backend else [cpu])
    assert compute_platform() == "gpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, metrics = make_train_step(cfg, train_cfg, plan)(state, batch)
    assert chosen and set(chosen) == {"xla"}
    assert np.isfinite(float(metrics["loss"]))
