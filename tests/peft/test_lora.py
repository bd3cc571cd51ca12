"""LoRA: identity at init, merge == unmerged, frozen base (gradients, optimizer state), adapters save / load,
PEFT interop, QLoRA on an NF4 base, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import get_config
from llmjax.config import TrainConfig
from llmjax.model import forward, init_params
from llmjax.peft.lora import (
    AdapterMismatchError,
    LoraConfig,
    adapter_count,
    init_adapters,
    load_adapters,
    lora_forward,
    merge,
    save_adapters,
)
from llmjax.peft.train import init_lora_state, lora_loss_sums, make_lora_train_step
from llmjax.quant.model import quantize_params


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def model(request):
    cfg = get_config(request.param)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    return cfg, params, tokens


def trained_like(adapters, scale=0.05):
    """Adapters with nonzero B (as after training)."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_identity_at_init_and_merge(model):
    cfg, params, tokens = model
    lora_cfg = LoraConfig(rank=4, alpha=8)
    adapters = init_adapters(params, cfg, lora_cfg, jax.random.key(2))
    base = forward(params, tokens, cfg)
    np.testing.assert_array_equal(lora_forward(params, adapters, tokens, cfg, lora_cfg), base)
    adapters = trained_like(adapters)
    adapted = lora_forward(params, adapters, tokens, cfg, lora_cfg)
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    np.testing.assert_allclose(forward(merge(params, adapters, cfg, lora_cfg), tokens, cfg), adapted,
                               rtol=1e-5, atol=1e-5)


def test_only_adapters_get_gradients_and_optimizer_state():
    cfg = get_config("llama-tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    lora_cfg, train_cfg = LoraConfig(rank=2, targets=(r"attn/(q|v)/kernel$",)), TrainConfig(warmup_steps=0)
    adapters = trained_like(init_adapters(params, cfg, lora_cfg, jax.random.key(2)))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    grad_params, grad_adapters = jax.grad(
        lambda p, a: lora_loss_sums(a, p, batch, cfg, lora_cfg, train_cfg)[0], argnums=(0, 1))(params, adapters)
    assert all(not jnp.any(g) for g in jax.tree.leaves(grad_params))  # the base is a constant of the loss
    assert all(jnp.any(g) for g in jax.tree.leaves(grad_adapters))
    state = init_lora_state(params, cfg, lora_cfg, train_cfg, jax.random.key(3))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * adapter_count(state.adapters)  # Adam's m and v of the adapters, nothing for the base
    rank, layers = 2, cfg.num_layers
    assert adapter_count(state.adapters) == layers * rank * ((cfg.d_model + cfg.q_size) + (cfg.d_model + cfg.kv_size))


def test_qlora_trains_on_nf4_base():
    cfg = get_config("llama-tiny")
    params = quantize_params(init_params(cfg, jax.random.key(0)), cfg, "nf4", 16)
    lora_cfg, train_cfg = LoraConfig(rank=4, dropout=0.1), TrainConfig(lr=1e-2, warmup_steps=0, total_steps=8)
    state = init_lora_state(params, cfg, lora_cfg, train_cfg, jax.random.key(1))
    step = make_lora_train_step(cfg, lora_cfg, train_cfg, remat="full")
    tokens = jax.random.randint(jax.random.key(2), (4, 17), 0, 40)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    losses = []
    for _ in range(8):
        state, metrics = step(state, params, batch, jax.random.key(3))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.2, losses


def test_save_load_round_trip(model, tmp_path):
    cfg, params, tokens = model
    lora_cfg = LoraConfig(rank=3, alpha=6)
    adapters = trained_like(init_adapters(params, cfg, lora_cfg, jax.random.key(2)))
    save_adapters(tmp_path, adapters, cfg, lora_cfg)
    loaded, loaded_cfg = load_adapters(tmp_path, params, cfg)
    assert (loaded_cfg.rank, loaded_cfg.alpha) == (3, 6)
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
    other = get_config(cfg.name, d_ff=cfg.d_ff + 16)
    with pytest.raises(AdapterMismatchError, match="different model|shapes|needs"):
        load_adapters(tmp_path, init_params(other, jax.random.key(0)), other)


def test_patterns_that_match_nothing_list_names(model):
    cfg, params, _ = model
    with pytest.raises(ValueError, match=r"matches no linear weight.*blocks/attn/q/kernel"):
        init_adapters(params, cfg, LoraConfig(targets=("attn/query",)), jax.random.key(0))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)


def test_fp8_delayed_scaling_base_is_one_clear_error():
    """LoRA freezes the base, so the amax histories of FP8 delayed scaling could never move: refused."""
    cfg = get_config("llama-tiny", matmul_precision="fp8", fp8_scaling="delayed")
    params = init_params(cfg, jax.random.key(0))
    adapters = init_adapters(params, cfg, LoraConfig(), jax.random.key(1))
    with pytest.raises(ValueError, match="fp8_scaling='current' for LoRA"):
        lora_forward(params, adapters, jnp.zeros((1, 4), jnp.int32), cfg, LoraConfig())


def test_peft_loads_our_adapters(tmp_path):
    """Hugging Face PEFT on the transformers export of the base gives our adapted logits."""
    peft = pytest.importorskip("peft", reason="Hugging Face peft is not installed (pip install peft)")
    if not hasattr(peft, "PeftModel"):  # `import peft` found this tests/peft folder, not the package
        pytest.skip("Hugging Face peft is not installed (pip install peft)")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llmjax.io import save_hf_checkpoint

    for name in ("gpt2-tiny", "llama-tiny"):
        cfg = get_config(name)
        params = init_params(cfg, jax.random.key(0))
        lora_cfg = LoraConfig(rank=4, alpha=8)
        adapters = trained_like(init_adapters(params, cfg, lora_cfg, jax.random.key(2)), 0.2)
        tokens = np.array([[1, 5, 9, 33, 7, 2, 60, 4]])
        ours = np.asarray(lora_forward(params, adapters, jnp.asarray(tokens), cfg, lora_cfg))[..., : cfg.vocab_size]
        save_hf_checkpoint(params, cfg, tmp_path / name / "base")
        save_adapters(tmp_path / name / "adapter", adapters, cfg, lora_cfg)
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "base", dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, tmp_path / name / "adapter").eval()
        with torch.no_grad():
            theirs = model(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(theirs, ours, rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("remat", ["none", "full", "offload"])
def test_qlora_on_gpu_at_real_width(remat):
    """llama-1b's width (d_model 2048, 2 layers), bf16, NF4 base: identity at init against the dequantized base,
    and the loss falls; the offload policy really moves residuals to host memory here (not on CPU backends)."""
    cfg = get_config("llama-1b", num_layers=2, vocab_size=4096, compute_dtype="bfloat16")
    params = quantize_params(init_params(cfg, jax.random.key(0)), cfg, "nf4", 64)
    lora_cfg, train_cfg = LoraConfig(rank=16, alpha=32), TrainConfig(lr=3e-3, warmup_steps=0, total_steps=6)
    state = init_lora_state(params, cfg, lora_cfg, train_cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (4, 257), 0, 64)  # a small alphabet: learnable in a few steps
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    from llmjax.quant.model import quantized_forward

    base_logits = jax.jit(quantized_forward, static_argnums=2)(params, batch["inputs"], cfg)
    adapted = jax.jit(lambda a, p, t: lora_forward(p, a, t, cfg, lora_cfg))(state.adapters, params, batch["inputs"])
    np.testing.assert_allclose(adapted, base_logits, rtol=0, atol=1e-6)  # B = 0: exactly the base model
    step = make_lora_train_step(cfg, lora_cfg, train_cfg, remat=remat)
    losses = []
    for _ in range(6):
        state, metrics = step(state, params, batch, jax.random.key(3))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.3, losses
