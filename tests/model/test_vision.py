"""The ViT (llmjax.model.vision) against transformers' CLIPVisionModel and SiglipVisionModel: tiny random towers saved
with save_pretrained, imported with llmjax.io.hf_vision, last hidden states and pooled outputs compared in float32
(also at another image size through the interpolated position embeddings); the pieces against NumPy references;
bad images and a tower of the wrong width; a from-scratch ViT that learns."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax.config import ConfigError  # noqa: E402
from llmjax.io import CheckpointMismatchError  # noqa: E402
from llmjax.io.hf_vision import load_hf_vision  # noqa: E402
from llmjax.model.vision import (  # noqa: E402
    bicubic_matrix,
    encode_images,
    get_vision_config,
    init_vision_params,
    normalize_images,
    patchify,
    pooled_embedding,
    vision_features,
)

TOWER = dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=6, image_size=24,
             patch_size=6, num_channels=3)
MEAN, STD = (0.3, 0.5, 0.6), (0.2, 0.25, 0.3)  # written to preprocessor_config.json: must be read from there
IMAGES = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3)).astype(np.uint8)  # [batch, H, W, C]


def noisy(model):
    """Noise on every parameter (fresh biases are zero and norms one: a mix-up between them would hide)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.float().eval()


def saved_tower(tmp_path, kind: str, **overrides):
    """(transformers model, folder) of a random tiny CLIP or SigLIP vision tower saved with save_pretrained."""
    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER | overrides))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER | overrides))
    model = noisy(model)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return model, folder


def hf_outputs(model, images, **kwargs):
    """transformers' (last_hidden_state, pooler_output) on uint8 images normalized as its image processor does."""
    pixels = (images / 255.0 - np.array(MEAN)) / np.array(STD)  # [batch, H, W, C]
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float(), **kwargs)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def assert_close(ours, expected, what):
    error = float(np.abs(np.asarray(ours) - expected).max())
    assert error < 2e-5, f"{what}: max |difference| {error:.3g}"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_imported_tower_equals_transformers(tmp_path, kind):
    model, folder = saved_tower(tmp_path, kind)
    params, cfg = load_hf_vision(folder)
    assert cfg.image_mean == MEAN and cfg.class_token == (kind == "clip")
    hidden, pooled = hf_outputs(model, IMAGES)
    assert hidden.shape == (3, 16 + (kind == "clip"), 36)
    ours_hidden, ours_pooled = encode_images(params, IMAGES, cfg)
    assert_close(ours_hidden, hidden, "last hidden states")
    assert_close(ours_pooled, pooled, "pooled output")
    # another image size: the position embeddings resized as transformers' interpolate_pos_encoding (not square)
    wide = np.random.default_rng(1).integers(0, 256, (2, 30, 42, 3)).astype(np.uint8)
    hidden, pooled = hf_outputs(model, wide, interpolate_pos_encoding=True)
    ours_hidden, ours_pooled = encode_images(params, wide, cfg, interpolate_positions=True)
    assert_close(ours_hidden, hidden, "interpolated hidden states")
    assert_close(ours_pooled, pooled, "interpolated pooled output")


def test_two_tower_clip_folder_loads_its_vision_tower(tmp_path):
    """A CLIPModel folder (text tower, projections, logit scale) gives the same vision tower as CLIPVisionModel."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=TOWER, text_config=dict(hidden_size=16, intermediate_size=20,
                                     num_hidden_layers=1, num_attention_heads=2, vocab_size=50), projection_dim=8)
    model = noisy(transformers.CLIPModel(config))
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    params, cfg = load_hf_vision(tmp_path)  # the same config as the CLIPVisionModel test's: its compiled call
    with torch.no_grad():
        pixels = (IMAGES / 255.0 - np.array(cfg.image_mean)) / np.array(cfg.image_std)
        out = model.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float())
    ours_hidden, ours_pooled = encode_images(params, IMAGES, cfg)
    assert_close(ours_hidden, out.last_hidden_state.numpy(), "CLIPModel hidden states")
    assert_close(ours_pooled, out.pooler_output.numpy(), "CLIPModel pooled output")


def test_pieces_against_numpy_references():
    # patches in row-major order, each flattened (row, column, channel): the stride-p convolution's receptive fields
    images = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
    patches = np.asarray(patchify(jnp.asarray(images), 4))  # [2, 6, 48]
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(patches[1, 4], images[1, 4:8, 4:8].reshape(-1))  # row 1, column 1
    # bicubic resampling equals torch's interpolate, and keeps a constant constant
    grid = np.random.default_rng(2).normal(size=(5, 5)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(7, 3), mode="bicubic",
                                               align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(bicubic_matrix(5, 7) @ grid @ bicubic_matrix(5, 3).T, expected, atol=1e-5)
    np.testing.assert_allclose(bicubic_matrix(4, 9).sum(axis=1), 1.0, atol=1e-6)
    cfg = get_vision_config("vit-tiny", image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 2.0))
    pixels = np.asarray(normalize_images(jnp.asarray(IMAGES), cfg))
    np.testing.assert_allclose(pixels, (IMAGES / 255.0 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0], atol=1e-5)
    # float images are taken as already in [0, 1]
    np.testing.assert_allclose(normalize_images(jnp.asarray(IMAGES / 255.0, jnp.float32), cfg), pixels, atol=1e-5)


def test_bad_images_and_mismatched_tower(tmp_path):
    cfg = get_vision_config("vit-tiny")
    params = {}  # the images are checked before the parameters are read
    with pytest.raises(ValueError, match=r"32x32 pixels.*40x40|40x40 pixels.*image_size=32"):
        vision_features(params, np.zeros((1, 40, 40, 3), np.uint8), cfg)
    with pytest.raises(ValueError, match="4 channels, the vision tower takes num_channels=3"):
        vision_features(params, np.zeros((1, 32, 32, 4), np.uint8), cfg)
    with pytest.raises(ValueError, match="not tiled by patch_size=8"):
        vision_features(params, np.zeros((1, 36, 32, 3), np.uint8), cfg, interpolate_positions=True)
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        vision_features(params, np.zeros((32, 32, 3), np.uint8), cfg)
    with pytest.raises(TypeError, match="uint8"):
        vision_features(params, np.zeros((1, 32, 32, 3), np.int64), cfg)
    with pytest.raises(ConfigError, match="patch_size=7 does not divide image_size=32"):
        cfg.replace(patch_size=7)
    with pytest.raises(ConfigError, match="pooling='cls' needs class_token=True"):
        get_vision_config("siglip-base-16", pooling="cls")
    _, folder = saved_tower(tmp_path, "siglip")
    _, file_cfg = load_hf_vision(folder)
    narrow = get_vision_config("siglip-base-16")
    with pytest.raises(CheckpointMismatchError, match="width does not match.*hidden_size=36.*d_model=768"):
        load_hf_vision(folder, narrow)
    with pytest.raises(CheckpointMismatchError, match="num_layers=1 but"):
        load_hf_vision(folder, file_cfg.replace(model=file_cfg.model.replace(num_layers=1)))


def random_colour_images(key, count: int):
    """[count, 32, 32, 3] uint8 images of one random colour plus noise, labelled by their dominant channel."""
    colour_key, noise_key = jax.random.split(key)
    colours = jax.random.uniform(colour_key, (count, 1, 1, 3))
    noise = 0.1 * jax.random.normal(noise_key, (count, 32, 32, 3))
    images = jnp.clip(colours + noise, 0, 1)
    return (images * 255).astype(jnp.uint8), jnp.argmax(colours[:, 0, 0], axis=-1)


def test_vit_tiny_trains_from_scratch():
    """A classifier on the pooled class token learns the dominant colour: the loss falls and the patch embedding
    gets gradients (the only path from the pixels)."""
    cfg = get_vision_config("vit-tiny")
    params = {"vit": init_vision_params(cfg, jax.random.key(0)),
              "classifier": 0.02 * jax.random.normal(jax.random.key(2), (cfg.model.d_model, 3))}
    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)

    def loss_fn(params, images, labels):
        logits = pooled_embedding(params["vit"], images, cfg) @ params["classifier"]  # [batch, 3]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss, grads

    images, labels = random_colour_images(jax.random.key(1), 32)
    losses = []
    for i in range(15):
        params, state, loss, grads = step(params, state, images, labels)
        losses.append(float(loss))
        if i == 0:
            assert float(jnp.abs(grads["vit"]["embed"]["patch"]["kernel"]).max()) > 0
    assert losses[-1] < 0.6 * losses[0], losses
