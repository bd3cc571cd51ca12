"""The Flamingo VLM's pieces (llmjax.model.flamingo, llmjax.infer.vlm): gates at zero leave the LM's logits bit for
bit, the image mask against a hand-built one, the resampler and the gated cross-attention against float64 NumPy, a
fixed resampler output whatever the number of visual tokens, KV-cached generation equal to uncached, gradients only
for the new parts, the extended tokenizer, and one clear error per bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, get_config
from llmjax.infer.generate import GenerationError
from llmjax.infer.vlm import stack_images, vlm_generate
from llmjax.model import forward, model_spec
from llmjax.model.flamingo import (FlamingoConfig, FlamingoInputError, check_image_tokens, cross_attention_kv,
                                   flamingo_hidden_states, flamingo_logits, gated_cross_attention, image_index,
                                   image_mask, init_flamingo_params, input_embeddings, new_parts_spec, resample,
                                   split_trainable, token_losses, visual_latents)
from llmjax.model.params import is_spec, ones, zeros
from llmjax.model.transformer import hidden_states_from_embeddings, logits_from_hidden
from llmjax.model.vision import get_vision_config, vision_spec
from llmjax.tokenizer import load_tokenizer
from llmjax.tokenizer.extended import with_special_tokens

VISION = get_vision_config("vit-tiny")  # 32x32 images, 16 patches + a class token, width 48


def make_config(lm_name="gpt2-tiny", **fields) -> FlamingoConfig:
    defaults = dict(num_latents=3, resampler_layers=1, resampler_heads=4, xattn_every=1, xattn_heads=4,
                    xattn_ff_mult=2, resampler_ff_mult=2, max_frames=2)
    return FlamingoConfig(lm=get_config(lm_name), vision=VISION, **defaults | fields)


def numpy_init(spec_tree, seed):
    """Parameters for the specs drawn with NumPy (normal(0.02), or the spec's zeros / ones): compiling every leaf's
    jax.random draw takes longer on a CPU than these tests."""
    rng = np.random.default_rng(seed)

    def leaf(spec):
        if spec.init is zeros or spec.init is ones:
            return spec.init(None, spec.shape, jnp.dtype(spec.dtype))
        return jnp.asarray(rng.normal(0.0, 0.02, spec.shape), spec.dtype)

    return jax.tree.map(leaf, spec_tree, is_leaf=is_spec)


def make_params(cfg, seed=0):
    """Every parameter: the LM's, the tower's and the new parts' (gates at 0) from NumPy draws."""
    return {"lm": numpy_init(model_spec(cfg.lm), seed), "vision": numpy_init(vision_spec(cfg.vision), seed + 1),
            **numpy_init(new_parts_spec(cfg), seed + 2)}


logits_jit = jax.jit(flamingo_logits, static_argnames="cfg")
latents_jit = jax.jit(visual_latents, static_argnames="cfg")


def with_open_gates(params, value=0.7):
    xattn = {**params["xattn"], "alpha_attn": jnp.full_like(params["xattn"]["alpha_attn"], value),
             "alpha_mlp": jnp.full_like(params["xattn"]["alpha_mlp"], -value / 2)}
    return {**params, "xattn": xattn}


def random_images(count, seed=0, batch=1):
    return np.random.default_rng(seed).integers(0, 256, size=(batch, count, 32, 32, 3), dtype=np.uint8)


def text_tokens(cfg, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.lm.vocab_size, size=(batch, seq)).astype(np.int32)


@pytest.fixture(scope="module", params=[("gpt2-tiny", 1), ("llama-tiny", 2)], ids=["gpt2-every1", "llama-every2"])
def model(request):
    lm_name, every = request.param
    cfg = make_config(lm_name, xattn_every=every)
    return cfg, make_params(cfg)


# --- gates at zero ---------------------------------------------------------------------------------------------

def test_gates_at_zero_leave_the_lm_logits_bit_identical(model):
    cfg, params = model
    tokens = text_tokens(cfg, 2, 11)
    latents = latents_jit(params, jnp.asarray(random_images(2, batch=2)), cfg)
    # text only: exactly the LM's forward, even with images given (no <image> token, so no token sees them)
    reference = jax.jit(forward, static_argnames="cfg")(params["lm"], tokens, cfg.lm)  # compiled, as the VLM
    assert np.array_equal(logits_jit(params, tokens, latents, cfg), reference)
    if cfg.xattn_every == 1:  # and with no images at all (one compilation more: one family is enough)
        assert np.array_equal(logits_jit(params, tokens, None, cfg), reference)
    # with <image> tokens: the LM's stack on the same input embeddings (the two new rows for the new tokens)
    tokens[:, 2] = tokens[:, 7] = cfg.image_token_id
    tokens[0, 5] = cfg.end_of_chunk_id
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    vocab = cfg.lm.vocab_size  # the embeddings without positions: the LM's stack adds them
    x = jnp.where((tokens >= vocab)[..., None], params["new_tokens"][np.clip(tokens - vocab, 0, 1)],
                  params["lm"]["embed"]["token"][np.minimum(tokens, vocab - 1)])

    @jax.jit
    def lm_on_embeddings(lm_params, x):
        hidden, _ = hidden_states_from_embeddings(lm_params, x, cfg.lm, positions=positions)
        return logits_from_hidden(lm_params, hidden, cfg.lm)

    expected = lm_on_embeddings(params["lm"], x)
    assert np.array_equal(logits_jit(params, tokens, latents, cfg), expected)
    # open gates change the logits of tokens after an image only: those before it keep the LM's, bit for bit
    opened = logits_jit(with_open_gates(params), tokens, latents, cfg)
    assert not np.allclose(opened[:, 2:], expected[:, 2:], atol=1e-4)
    assert np.array_equal(opened[:, :2], expected[:, :2])


def test_new_token_rows_leave_the_lm_rows_alone(model):
    cfg, params = model
    tokens = jnp.asarray([[cfg.image_token_id, 5, cfg.end_of_chunk_id, 7]])
    x = input_embeddings(params["lm"]["embed"], params["new_tokens"], tokens, jnp.zeros((1, 4), jnp.int32), cfg)
    position = params["lm"]["embed"]["position"][0] if cfg.lm.positions == "learned" else 0
    np.testing.assert_array_equal(x[0, 0], params["new_tokens"][0] + position)
    np.testing.assert_array_equal(x[0, 2], params["new_tokens"][1] + position)
    np.testing.assert_array_equal(x[0, 1], params["lm"]["embed"]["token"][5] + position)


# --- the image mask --------------------------------------------------------------------------------------------

def test_image_mask_against_a_hand_built_reference():
    cfg = make_config()
    image = cfg.image_token_id
    tokens = jnp.asarray([[5, 7, image, 3, 4, image, image, 9],
                          [image, 1, 2, 3, 4, 5, 6, 7],
                          [1, 2, 3, 4, 5, 6, 7, 8]])
    expected_index = [[-1, -1, 0, 0, 0, 1, 2, 2], [0] * 8, [-1] * 8]
    assert image_index(tokens, image).tolist() == expected_index
    mask = np.asarray(image_mask(image_index(tokens, image), 3, 2))  # 3 images of 2 latents: 6 keys
    for b, row in enumerate(expected_index):
        for t, latest in enumerate(row):
            wanted = [latest >= 0 and key // 2 == latest for key in range(6)]
            assert mask[b, t].tolist() == wanted, (b, t)


def layer_norm64(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"], np.float64) + np.asarray(p.get("bias", 0.0),
                                                                                               np.float64)


def rms_norm64(x, p, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * np.asarray(p["scale"], np.float64)


def gelu64(x):
    return x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def attention64(q, k, v, mask=None):
    """q [b, s, h, d], k, v [b, t, h, d], mask [b, s, t] -> [b, s, h, d]; fully masked rows: 0."""
    scores = np.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask[:, None], scores, -np.inf)
    peak = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(peak), peak, 0))
    total = weights.sum(-1, keepdims=True)
    probs = np.where(total > 0, weights / np.where(total > 0, total, 1), 0)
    return np.einsum("bhst,bthd->bshd", probs, v)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def mlp64(p, x):
    return gelu64(x @ p["up"]["kernel"]) @ p["down"]["kernel"]


def test_gated_cross_attention_against_numpy_float64():
    """Tokens before the first image get exactly 0 from the attention (finite gradients too); the rest match a
    float64 reference of tanh(a) * attention(norm(x) -> latents of their latest image) + tanh(b) * mlp(norm(x))."""
    cfg = make_config()
    params = with_open_gates(make_params(cfg, 1))
    layer = jax.tree.map(lambda p: p[0], params["xattn"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 48)).astype(np.float32)
    media = rng.normal(size=(2, 2 * 3, 48)).astype(np.float32)  # 2 images of 3 latents
    index = np.array([[-1, -1, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])
    visible = image_mask(jnp.asarray(index), 2, 3)

    @jax.jit
    def run(layer, x):
        return gated_cross_attention(layer, x, *cross_attention_kv(layer, jnp.asarray(media)), visible, cfg)

    out = run(layer, jnp.asarray(x))
    p, eps = f64(layer), cfg.lm.norm_eps
    h = layer_norm64(x.astype(np.float64), p["attn_norm"], eps)
    q = np.einsum("bsd,dhk->bshk", h, p["attn"]["q"]["kernel"])
    k64 = np.einsum("btd,dhk->bthk", media, p["attn"]["k"]["kernel"])
    v64 = np.einsum("btd,dhk->bthk", media, p["attn"]["v"]["kernel"])
    attended = np.einsum("bshk,hkd->bsd", attention64(q, k64, v64, np.asarray(visible)), p["attn"]["o"]["kernel"])
    assert np.all(attended[0, :2] == 0)
    y = x + np.tanh(p["alpha_attn"]) * attended
    sees = (index >= 0)[..., None]  # a token that sees no image skips the feed-forward too
    y = y + sees * np.tanh(p["alpha_mlp"]) * mlp64(p["mlp"], layer_norm64(y, p["mlp_norm"], eps))
    np.testing.assert_allclose(out, y, atol=2e-5, rtol=2e-5)
    assert np.array_equal(np.asarray(out)[0, :2], x[0, :2])  # open gates, no image seen: the input, bit for bit

    def attention_only(layer, x):
        return run({**layer, "alpha_mlp": jnp.zeros(())}, x) - x

    before_image = attention_only(layer, jnp.asarray(x))[0, :2]
    assert np.array_equal(before_image, np.zeros_like(before_image))
    grads = jax.jit(jax.grad(lambda layer: jnp.sum(attention_only(layer, jnp.asarray(x)) ** 2)))(layer)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


# --- the resampler ---------------------------------------------------------------------------------------------

def resampler64(p, features, cfg):
    """The perceiver resampler in float64: features [b, n, frames, tokens, d] -> [b, n, L, d]."""
    b, n, frames, tokens, d = features.shape
    media = (features + p["time"][:frames][None, None, :, None]).reshape(b * n, frames * tokens, d)
    latents = np.broadcast_to(p["latents"], (b * n, *p["latents"].shape))
    eps = 1e-5
    for i in range(cfg.resampler_layers):
        layer = jax.tree.map(lambda a: a[i], p["layers"])
        m, x = layer_norm64(media, layer["media_norm"], eps), layer_norm64(latents, layer["latent_norm"], eps)
        keys = np.concatenate([m, x], axis=1)
        attn = layer["attn"]
        q = np.einsum("bld,dhk->blhk", x, attn["q"]["kernel"])
        k = np.einsum("btd,dhk->bthk", keys, attn["k"]["kernel"])
        v = np.einsum("btd,dhk->bthk", keys, attn["v"]["kernel"])
        latents = latents + np.einsum("blhk,hkd->bld", attention64(q, k, v), attn["o"]["kernel"])
        latents = latents + mlp64(layer["mlp"], layer_norm64(latents, layer["mlp_norm"], eps))
    return layer_norm64(latents, p["norm"], eps).reshape(b, n, -1, d)


def test_resampler_against_numpy_and_fixed_output_shape():
    cfg = make_config(resampler_layers=2)
    params = make_params(cfg, 2)
    rng = np.random.default_rng(1)
    resample_jit = jax.jit(resample, static_argnames="cfg")
    for shape in [(2, 3, 17, 48), (1, 2, 2, 5, 48)]:  # one frame, two frames
        features = rng.normal(size=shape).astype(np.float32)
        out = resample_jit(params["resampler"], jnp.asarray(features), cfg)
        full = features if features.ndim == 5 else features[:, :, None]
        np.testing.assert_allclose(out, resampler64(f64(params["resampler"]), full.astype(np.float64), cfg),
                                   atol=1e-4, rtol=1e-4)
    for shape in [(2, 3, 1, 48), (2, 3, 17, 48), (1, 1, 400, 48), (2, 3, 2, 7, 48)]:  # any number of tokens
        out = jax.eval_shape(lambda f: resample(params["resampler"], f, cfg), jax.ShapeDtypeStruct(shape, jnp.float32))
        assert out.shape == (shape[0], shape[1], cfg.num_latents, 48)
    with pytest.raises(FlamingoInputError, match="3 frames per image, FlamingoConfig.max_frames=2"):
        resample(params["resampler"], jnp.zeros((1, 1, 3, 4, 48)), cfg)


# --- generation --------------------------------------------------------------------------------------------------

def uncached_greedy(params, cfg, prompts, images, steps):
    """Greedy decoding by the full forward on the whole sequences each step (right-padded buffers: the model is
    causal, so the zeros after a row's current token change nothing before it; one compilation)."""
    latents = latents_jit(params, jnp.asarray(stack_images(images, cfg)), cfg)
    buffer = np.zeros((len(prompts), max(map(len, prompts)) + steps), np.int32)
    for b, prompt in enumerate(prompts):
        buffer[b, :len(prompt)] = prompt
    chosen, logits_seen = [[] for _ in prompts], []
    for step in range(steps):
        logits = np.asarray(logits_jit(params, jnp.asarray(buffer), latents, cfg))
        logits = logits[np.arange(len(prompts)), [len(p) + step - 1 for p in prompts]]  # [batch, padded_vocab]
        logits_seen.append(logits)
        for b, prompt in enumerate(prompts):
            chosen[b].append(int(np.argmax(logits[b])))
            if step + 1 < steps:
                buffer[b, len(prompt) + step] = chosen[b][-1]
    return chosen, logits_seen


def test_kv_cached_generation_equals_uncached(model):
    cfg, params = model
    params = with_open_gates(params, 1.5)
    image = cfg.image_token_id
    rng = np.random.default_rng(3)
    prompts = [[image, 5, 9, 11, 4], [3, image, 8, cfg.end_of_chunk_id, image, 2, 2]]
    images = [list(random_images(1, seed=4)[0]), list(random_images(2, seed=5)[0])]
    out = vlm_generate(params, cfg, prompts, images, max_new_tokens=4, keep_logits=True, decode_impl="xla")
    tokens, logits = uncached_greedy(params, cfg, prompts, images, 4)
    assert out.tokens == tokens
    vocab = cfg.lm.vocab_size
    for step, expected in enumerate(logits):
        np.testing.assert_allclose(out.logits[step][:, :vocab], expected[:, :vocab], atol=2e-4, rtol=2e-4)
    # the images matter: another image gives other logits
    other = vlm_generate(params, cfg, prompts, [list(rng.integers(0, 256, (1, 32, 32, 3), np.uint8)), images[1]],
                         max_new_tokens=1, keep_logits=True, decode_impl="xla")
    assert not np.allclose(other.logits[0][0], out.logits[0][0], atol=1e-4)
    np.testing.assert_array_equal(other.logits[0][1], out.logits[0][1])


# --- training: only the new parts ---------------------------------------------------------------------------------

def test_loss_against_numpy_and_gradients_only_for_the_new_parameters():
    cfg = make_config()
    params = with_open_gates(make_params(cfg, 3))
    trainable, frozen = split_trainable(params)
    assert set(trainable) == {"resampler", "xattn", "new_tokens"} and set(frozen) == {"lm", "vision"}
    assert "vision" in split_trainable(params, train_vision=True)[0]
    tokens = text_tokens(cfg, 1, 8)
    tokens[0, 0], tokens[0, 4] = cfg.image_token_id, cfg.end_of_chunk_id
    mask = jnp.asarray([[True] * 6 + [False]])
    images = jnp.asarray(random_images(1))

    @jax.jit
    def loss_and_grads(trainable):
        def loss(trainable):
            merged = {**frozen, **trainable}
            latents = visual_latents(merged, images, cfg)
            total, count = token_losses(merged, jnp.asarray(tokens), latents, mask, cfg)
            return total / count, (total, count, flamingo_logits(merged, jnp.asarray(tokens[:, :-1]), latents, cfg))

        return jax.value_and_grad(loss, has_aux=True)(trainable)

    (_, (total, count, logits)), grads = loss_and_grads(trainable)
    assert set(grads) == set(trainable)  # the LM's and the tower's gradients are never computed
    for name in ("resampler", "xattn", "new_tokens"):
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[name])) > 0, name
    logits = np.asarray(logits, np.float64)[0, :, : cfg.lm.vocab_size]
    expected = [np.log(np.exp(logits[t] - logits[t].max()).sum()) + logits[t].max() - logits[t, tokens[0, t + 1]]
                for t in range(6) if tokens[0, t + 1] < cfg.lm.vocab_size]  # the <|endofchunk|> target is skipped
    assert int(count) == len(expected) == 5
    np.testing.assert_allclose(float(total), sum(expected), rtol=1e-5)


# --- the tokenizer --------------------------------------------------------------------------------------------------

def test_extended_tokenizer_round_trips(tmp_path):
    base = load_tokenizer("bytes")
    tokenizer = with_special_tokens(base, ["<image>", "<|endofchunk|>"], first_id=301)
    ids = tokenizer.encode("<image>Caption: a red circle<|endofchunk|><|endoftext|>")
    assert ids[0] == 301 and ids[-2:] == [302, 256] and ids[1:-2] == list(b"Caption: a red circle")
    assert tokenizer.decode(ids) == "<image>Caption: a red circle<|endofchunk|><|endoftext|>"
    assert tokenizer.vocab_size == 303 and tokenizer.eot_id == 256
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode("x<image>") == [120, 301] and loaded.fingerprint() == tokenizer.fingerprint()
    with pytest.raises(ValueError, match="outside this vocabulary"):
        tokenizer.decode([290])
    with pytest.raises(ValueError, match="already one of its special tokens"):
        with_special_tokens(base, ["<|endoftext|>"])


# --- bad input --------------------------------------------------------------------------------------------------

def test_bad_input_gets_one_clear_error_each():
    cfg = make_config()
    params = make_params(cfg, 5)
    image = cfg.image_token_id
    with pytest.raises(FlamingoInputError, match="row 0: 2 <image> token.*1 image.*more <image> tokens than images"):
        check_image_tokens([[image, 4, image]], [1], cfg)
    with pytest.raises(FlamingoInputError, match="row 1: 1 <image> token.*2 image.*more images than <image> tokens"):
        check_image_tokens([[image, 4, 5], [image, 3, 3]], [1, 2], cfg)
    with pytest.raises(FlamingoInputError, match="more <image> tokens than images"):
        vlm_generate(params, cfg, [[image, 3, image]], [list(random_images(1)[0])], max_new_tokens=2)
    # a vision tower of another width than the config's
    wide = get_vision_config("vit-tiny", model=VISION.model.replace(d_model=64, d_ff=128))
    with pytest.raises(FlamingoInputError, match="width 64 does not match.*d_model=48"):
        init_flamingo_params(cfg, jax.random.key(0), lm_params=params["lm"],
                             vision_params=numpy_init(vision_spec(wide), 0))
    with pytest.raises(FlamingoInputError, match="does not match FlamingoConfig.lm"):
        init_flamingo_params(cfg, jax.random.key(0), lm_params=numpy_init(model_spec(get_config("llama-tiny")), 0))
    # images of the wrong number of channels / size
    with pytest.raises(ValueError, match="4 channels, the vision tower takes num_channels=3"):
        visual_latents(params, jnp.zeros((1, 1, 32, 32, 4), jnp.uint8), cfg)
    with pytest.raises(GenerationError, match=r"image 0: shape \(40, 40, 3\)"):
        vlm_generate(params, cfg, [[image, 3]], [[np.zeros((40, 40, 3), np.uint8)]], max_new_tokens=2)
    with pytest.raises(FlamingoInputError, match=r"\[batch, images, height, width, channels\]"):
        visual_latents(params, jnp.zeros((1, 32, 32, 3), jnp.uint8), cfg)
    with pytest.raises(GenerationError, match="exceeds the LM's max_seq_len=64"):
        vlm_generate(params, cfg, [[image] + [3] * 60], [list(random_images(1)[0])], max_new_tokens=8)
    with pytest.raises(ConfigError, match="xattn_every=3 does not divide"):
        make_config(xattn_every=3)
    with pytest.raises(FlamingoInputError, match="sequence length 65 exceeds"):
        flamingo_hidden_states(params, jnp.zeros((1, 65), jnp.int32), None, cfg)
