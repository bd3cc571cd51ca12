"""Offloaded generation (llmjax.infer.offload): every placement gives on-device generation's greedy tokens and
logits; the cost model respects the budget; the minimum-budget error; layer files are written atomically."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.infer import kv_cache, offload
from llmjax.infer.decode_model import prefill, prepare_params
from llmjax.infer.generate import generate, pad_prompts
from llmjax.model.transformer import init_params

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3]]
NEW_TOKENS = 4


def random_params(cfg):
    """init_params' tree with random values drawn by NumPy (compiling the initializer costs seconds on 2 cores):
    norm scales near 1, matrices with unit-variance outputs."""
    rng = np.random.default_rng(0)

    def draw(leaf):
        if leaf.ndim == 1:
            return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2]), leaf.dtype)

    return jax.tree.map(draw, jax.eval_shape(init_params, cfg, jax.random.key(0)))


@pytest.fixture(scope="module")
def model():
    cfg = get_config("llama-tiny", compute_dtype="float32")
    params = random_params(cfg)
    reference = generate(params, cfg, PROMPTS, max_new_tokens=NEW_TOKENS).tokens
    tokens, valid = pad_prompts(PROMPTS)
    cache = kv_cache.init_cache(cfg, len(PROMPTS), kv_cache.cache_capacity(cfg, tokens.shape[1] + NEW_TOKENS, 64))
    prompt_logits, _ = jax.jit(prefill, static_argnames="cfg")(prepare_params(params, cfg), tokens, valid, cache, cfg)
    placed = offload.place_model(params, cfg, offload.Placement.uniform(cfg.num_layers))
    on_device = offload.offloaded_generate(placed, PROMPTS, NEW_TOKENS, keep_logits=True)
    return cfg, params, reference, np.asarray(prompt_logits), on_device


def _generate(cfg, params, placement, tmp_path, schedule="zigzag"):
    placed = offload.place_model(params, cfg, placement, disk_dir=tmp_path / "layers")
    return offload.offloaded_generate(placed, PROMPTS, NEW_TOKENS, schedule=schedule, keep_logits=True)


def test_on_device_placement_equals_generate(model):
    cfg, params, reference, prompt_logits, out = model
    assert out.tokens == reference
    np.testing.assert_allclose(out.logits[0], prompt_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights, cache, micro, schedule", [
    ("host", "host", 2, "zigzag"),
    ("disk", "device", 2, "zigzag"),  # every cache on the device: decoding merges the 2 slices into one
    ("host", "host", 2, "layer_by_layer"),  # the baseline runs one micro-batch whatever the placement says
])
def test_offloaded_placements_equal_on_device(model, tmp_path, weights, cache, micro, schedule):
    cfg, params, reference, prompt_logits, on_device = model
    placement = offload.Placement.uniform(cfg.num_layers, weights, cache, micro)
    out = _generate(cfg, params, placement, tmp_path / "b", schedule)
    assert out.tokens == reference
    for ours, theirs in zip(out.logits, on_device.logits):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    if weights == "disk":
        assert len(list((tmp_path / "b" / "layers").glob("layer_*.safetensors"))) == cfg.num_layers


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_host_weights_equal_generation_with_the_dequantized_weights(model, tmp_path, fmt):
    cfg, params, _, prompt_logits, _ = model
    placement = offload.Placement.uniform(cfg.num_layers, "host", "device", 2, host_format=fmt)
    out = _generate(cfg, params, placement, tmp_path)
    prepared = prepare_params(params, cfg)
    from llmjax.quant.model import materialize

    prepared["layers"] = [materialize(offload.quantize_layer(layer, fmt), np.float32) for layer in prepared["layers"]]
    assert out.tokens == generate(params, cfg, PROMPTS, max_new_tokens=NEW_TOKENS, prepared=prepared).tokens
    scale = np.abs(prompt_logits[:, : cfg.vocab_size]).max()
    np.testing.assert_allclose(out.logits[0][:, : cfg.vocab_size], prompt_logits[:, : cfg.vocab_size],
                               atol=(0.05 if fmt == "int8" else 0.3) * scale)


def test_the_next_layers_copy_is_issued_before_this_layers_dequantization(model, monkeypatch):
    """A host -> device copy waits for the work queued on the compute stream when it is issued: issued after layer i's
    dequantization (which waits for layer i's copy), copy i + 1 would start only once copy i ended (the H100 profile
    showed the copies serialised). The zig-zag schedule issues copy i + 1 first; weights on the device copy nothing."""
    cfg, params, reference, _, _ = model
    placement = offload.Placement(("device",) + ("host",) * (cfg.num_layers - 1), ("device",) * cfg.num_layers, 2,
                                  host_format="int8")
    placed = offload.place_model(params, cfg, placement)
    calls = []
    copy_layer, computable = offload.copy_layer, offload.computable
    monkeypatch.setattr(offload, "copy_layer", lambda m, i: calls.append(("copy", i)) or copy_layer(m, i))
    monkeypatch.setattr(offload, "computable", lambda m, i, c: calls.append(("dequantize", i)) or computable(m, i, c))
    assert offload.offloaded_generate(placed, PROMPTS, 1).tokens == [row[:1] for row in reference]
    prefill = calls[:2 * cfg.num_layers]
    assert prefill[:3] == [("copy", 0), ("copy", 1), ("dequantize", 0)]
    for i in range(1, cfg.num_layers - 1):
        assert prefill.index(("copy", i + 1)) < prefill.index(("dequantize", i))


def test_cost_model_picks_all_device_when_everything_fits():
    cfg = get_config("llama-tiny", num_layers=6)
    choice = offload.choose_placement(cfg, 4, 16, NEW_TOKENS, budget_bytes=1 << 30)
    assert choice.placement == offload.Placement.uniform(cfg.num_layers, micro_batches=choice.placement.micro_batches)
    assert choice.predicted_tokens_per_s > 0 and choice.device_bytes <= choice.budget_bytes


def test_cost_model_respects_the_budget():
    cfg = get_config("llama-tiny", num_layers=6)
    sizes = offload.model_sizes(cfg, 4, 16, NEW_TOKENS)
    everything = offload.choose_placement(cfg, 4, 16, NEW_TOKENS, budget_bytes=1 << 30).device_bytes
    budget = offload.minimum_device_bytes(cfg, 4, 16, NEW_TOKENS) + sizes["cache_row"]
    assert budget < everything
    choice = offload.choose_placement(cfg, 4, 16, NEW_TOKENS, budget_bytes=budget, host_bytes=0,
                                      host_formats=(None, "int8"))
    assert choice.device_bytes <= budget
    assert "disk" in choice.placement.weights and "host" in choice.placement.cache
    for budget in np.linspace(offload.minimum_device_bytes(cfg, 4, 16, NEW_TOKENS), everything, 6):
        choice = offload.choose_placement(cfg, 4, 16, NEW_TOKENS, budget_bytes=int(budget))
        assert choice.device_bytes <= budget
        assert choice.predicted_tokens_per_s <= offload.choose_placement(cfg, 4, 16, NEW_TOKENS, 1 << 30
                                                                         ).predicted_tokens_per_s


@pytest.mark.parametrize("extra, caches", [(30_000, {"host"}), (60_000, {"device"})])
def test_the_cost_models_choice_under_a_tight_budget_generates_exactly(model, tmp_path, extra, caches):
    """Just above the minimum: the caches on the host, 4 micro-batches; a little more: the caches on the device,
    the prefill in 4 micro-batches and decoding merged into one."""
    cfg, params, reference, _, on_device = model
    budget = offload.minimum_device_bytes(cfg, 4, 16, NEW_TOKENS) + extra
    choice = offload.choose_placement(cfg, 4, 16, NEW_TOKENS, budget_bytes=budget)
    assert set(choice.placement.cache) == caches and choice.placement.micro_batches == 4
    assert choice.device_bytes <= budget
    out = _generate(cfg, params, choice.placement, tmp_path)
    assert out.tokens == reference
    np.testing.assert_allclose(out.logits[-1], on_device.logits[-1], rtol=1e-5, atol=1e-5)


def test_every_micro_batch_reads_the_layers_weights_again():
    """A call per micro-batch re-reads the layer's weights: where that read dominates (a slow device memory), a
    decode with the caches on the host (no merging) in 4 micro-batches reads 4 layers' weights and one cache a
    layer where one micro-batch reads one of each."""
    cfg = get_config("llama-tiny", num_layers=6)
    bandwidths = {"device": 1e6, "h2d": 1e15, "d2h": 1e15}
    one, four = (offload.predict(cfg, offload.Placement.uniform(cfg.num_layers, "host", "host", micro), 4, 16, 64,
                                 bandwidths, launch_seconds=0.0) for micro in (1, 4))
    sizes = offload.model_sizes(cfg, 4, 16, 64)
    expected = (4 * sizes["layer"] + sizes["cache_layer"]) / (sizes["layer"] + sizes["cache_layer"])
    assert one.predicted_tokens_per_s / four.predicted_tokens_per_s == pytest.approx(expected, rel=0.02)


def test_the_prefills_waiting_micro_batches_hold_their_hidden_states():
    """Prefill computes one micro-batch while the others' hidden states [rows, seq, d_model] wait for the layer: a
    placement in 2 micro-batches saves half the batch's activations but keeps their hidden states (on the H100,
    uncounted, they put the measured peak 0.4 GiB above the prediction)."""
    cfg = get_config("llama-tiny", num_layers=4)
    sizes = offload.model_sizes(cfg, 8, 24, NEW_TOKENS)
    assert sizes["hidden_row"] == 24 * cfg.d_model * np.dtype(cfg.compute_dtype).itemsize

    def device_bytes(micro):
        placement = offload.Placement.uniform(cfg.num_layers, "host", "host", micro)
        return offload.predict(cfg, placement, 8, 24, NEW_TOKENS).device_bytes

    half = 8 // 2
    assert device_bytes(1) - device_bytes(2) == half * (sizes["activation_row"] - sizes["hidden_row"]
                                                        + 2 * sizes["cache_row"])


def test_choose_batch_takes_the_fastest_batch_that_fits():
    cfg = get_config("llama-tiny", num_layers=6)
    budget = 2 * offload.minimum_device_bytes(cfg, 4, 16, NEW_TOKENS)
    choice = offload.choose_batch(cfg, 16, NEW_TOKENS, budget, host_formats=(None, "int4"), cache_dtype="int8")
    assert choice.device_bytes <= budget and choice.batch in offload.BATCHES
    for batch in offload.BATCHES:  # no candidate that fits predicts more
        try:
            other = offload.choose_placement(cfg, batch, 16, NEW_TOKENS, budget, host_formats=(None, "int4"),
                                             cache_dtype="int8")
        except offload.OffloadError:
            continue
        assert other.predicted_tokens_per_s <= choice.predicted_tokens_per_s


def test_largest_batch_is_the_edge_of_the_budget():
    cfg = get_config("llama-tiny", num_layers=6)
    host = offload.Placement.uniform(cfg.num_layers, "host", "device")
    budget = 3 * offload.minimum_device_bytes(cfg, 4, 16, NEW_TOKENS)
    batch = offload.largest_batch(cfg, lambda b: host, 16, NEW_TOKENS, budget)
    assert batch > 1
    assert offload.predict(cfg, host, batch, 16, NEW_TOKENS).device_bytes <= budget
    assert offload.predict(cfg, host, batch + 1, 16, NEW_TOKENS).device_bytes > budget
    assert offload.largest_batch(cfg, lambda b: host, 16, NEW_TOKENS, 1000) == 0


def test_a_bad_host_format_is_one_clear_error():
    with pytest.raises(offload.OffloadError, match="host format 'int2'"):
        offload.Placement.uniform(2, "host", "device", host_format="int2")


def test_budget_below_one_layer_is_one_clear_error():
    cfg = get_config("llama-tiny")
    minimum = offload.minimum_device_bytes(cfg, 4, 16, NEW_TOKENS)
    with pytest.raises(offload.OffloadError, match="below the minimum .* raise --gpu-memory"):
        offload.choose_placement(cfg, 4, 16, NEW_TOKENS, budget_bytes=minimum - 1)


def test_layer_file_round_trip_and_atomic_write(tmp_path, monkeypatch):
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4,), ml_dtypes.bfloat16) * 1.5,
              np.array([-3, 7], np.int8)]
    path = offload.write_layer_file(tmp_path / "layer.safetensors", arrays)
    for ours, theirs in zip(offload.read_layer_file(path), arrays):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))

    import safetensors.numpy

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(offload.OffloadError, match="--disk .* failed"):
        offload.write_layer_file(tmp_path / "other.safetensors", arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.safetensors"]


def test_unwritable_disk_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(offload.OffloadError, match="--disk .*cannot write there"):
        offload.write_layer_file(blocker / "layer.safetensors", [np.zeros(2, np.float32)])


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_a_disk_too_small_for_the_disk_layers_is_one_clear_error_before_any_write(model, tmp_path, monkeypatch, fmt):
    cfg, params, *_ = model
    placement = offload.Placement.uniform(cfg.num_layers, "disk", "device", 1, host_format=fmt)
    layers = prepare_params(params, cfg)["layers"]
    stored = [offload.quantize_layer(layer, fmt) if fmt else layer for layer in layers]
    free = sum(np.asarray(x).nbytes for x in jax.tree.leaves(stored)) - 1  # one byte short of every layer's file
    monkeypatch.setattr(offload.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free})())
    with pytest.raises(offload.OffloadError, match=r"--disk .*the disk layers need .* GiB are free there"):
        offload.place_model(params, cfg, placement, disk_dir=tmp_path / "layers")
    assert list((tmp_path / "layers").iterdir()) == []
    monkeypatch.setattr(offload.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free + 1})())
    offload.place_model(params, cfg, placement, disk_dir=tmp_path / "layers")  # exactly enough
    files = list((tmp_path / "layers").glob("layer_*.safetensors"))
    assert len(files) == cfg.num_layers and sum(f.stat().st_size for f in files) > free  # (+ the files' headers)


def test_parse_bytes():
    assert offload.parse_bytes("20GiB") == 20 << 30 and offload.parse_bytes("512MiB") == 512 << 20
    assert offload.parse_bytes("8e9") == 8_000_000_000
    with pytest.raises(offload.OffloadError, match="--gpu-memory"):
        offload.parse_bytes("lots")


def test_int8_cache_on_the_host_equals_generate_with_the_int8_cache(model, tmp_path):
    cfg, params = model[:2]
    placed = offload.place_model(params, cfg, offload.Placement.uniform(cfg.num_layers, "host", "host", 2))
    out = offload.offloaded_generate(placed, PROMPTS, NEW_TOKENS, cache_dtype="int8")
    assert out.tokens == generate(params, cfg, PROMPTS, max_new_tokens=NEW_TOKENS, cache_dtype="int8").tokens
