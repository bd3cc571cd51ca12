"""Recurrent Memory Transformer (llmjax.model.rmt) and the associative recall task (llmjax.data.synthetic)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, get_config
from llmjax.data.synthetic import (
    RecallLayout,
    associative_recall_batch,
    recall_accuracy,
    recall_accuracy_by_pair,
    recall_accuracy_by_query,
)
from llmjax.model.rmt import (
    RmtConfig,
    add_memory,
    init_rmt_params,
    next_token_loss,
    no_memory_forward,
    rmt_forward,
    rmt_forward_with_memory,
    rmt_generate,
    rmt_loss,
    rmt_segment,
)
from llmjax.model.transformer import init_params

ROOT = Path(__file__).resolve().parents[2]
CFG = get_config("llama-tiny", num_layers=1)  # one block: the memory path, not depth, is under test
SEG = 4  # tokens per segment
N_SEGMENTS = 4


def rmt_cfg(bptt=N_SEGMENTS, memory_tokens=2):
    return RmtConfig(memory_tokens=memory_tokens, segment_len=SEG, bptt_segments=bptt)


@pytest.fixture(scope="module")
def params():
    return init_rmt_params(CFG, rmt_cfg(), jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, N_SEGMENTS * SEG), 0, CFG.vocab_size, jnp.int32)


def by_hand(params, tokens, rmt, truncate=False):
    """rmt_segment called segment by segment in Python, memory carried (and stop_gradient'ed every K if truncate)."""
    memory = jnp.broadcast_to(params["memory"], (tokens.shape[0], *params["memory"].shape))
    logits = []
    for s in range(tokens.shape[1] // SEG):
        if truncate and s > 0 and s % rmt.bptt_segments == 0:
            memory = jax.lax.stop_gradient(memory)
        segment_logits, memory = rmt_segment(params, memory, tokens[:, s * SEG:(s + 1) * SEG], CFG, rmt)
        logits.append(segment_logits)
    return jnp.concatenate(logits, axis=1), memory


def assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_forward_equals_segments_by_hand_values_and_gradients(params, tokens):
    rmt = rmt_cfg()
    logits, memory = jax.jit(lambda p, t: rmt_forward_with_memory(p, t, CFG, rmt))(params, tokens)
    hand_logits, hand_memory = by_hand(params, tokens, rmt)
    assert logits.shape == (2, N_SEGMENTS * SEG, CFG.padded_vocab_size)
    np.testing.assert_allclose(logits, hand_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(memory, hand_memory, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: rmt_loss(p, tokens, CFG, rmt)))(params)
    hand_grads = jax.jit(jax.grad(lambda p: next_token_loss(by_hand(p, tokens, rmt)[0], tokens)))(params)
    assert float(jnp.abs(grads["memory"]).max()) > 0
    assert_trees_close(grads, hand_grads)


def test_truncated_bptt_stops_the_gradient_every_k_segments(params, tokens):
    rmt = rmt_cfg(bptt=2)
    positions = jnp.arange(N_SEGMENTS * SEG)

    gradient = jax.jit(jax.grad(lambda p, mask: rmt_loss(p, tokens, CFG, rmt, mask)))

    for segment in range(N_SEGMENTS):
        # score only the predictions made by this segment's positions: tokens 1 .. SEG after its start
        mask = jnp.broadcast_to((positions >= 1) & ((positions - 1) // SEG == segment), tokens.shape)
        largest = float(jnp.abs(gradient(params, mask)["memory"]).max())
        assert (largest > 0) == (segment < 2), (segment, largest)
    # the whole truncated gradient is the hand-unrolled one with the same stop_gradients
    grads = gradient(params, jnp.ones(tokens.shape, bool))
    hand = jax.jit(jax.grad(lambda p: next_token_loss(by_hand(p, tokens, rmt, truncate=True)[0], tokens)))(params)
    assert_trees_close(grads, hand)
    full = jax.jit(jax.grad(lambda p: rmt_loss(p, tokens, CFG, rmt_cfg(bptt=N_SEGMENTS))))(params)
    assert not np.allclose(full["blocks"]["attn"]["q"]["kernel"], grads["blocks"]["attn"]["q"]["kernel"])


def test_memory_carries_information_across_segments(params, tokens):
    rmt = rmt_cfg()
    changed = tokens.at[:, :SEG].set((tokens[:, :SEG] + 7) % CFG.vocab_size)  # only segment 0 differs
    third = slice(2 * SEG, 3 * SEG)
    with_memory = jax.jit(lambda t: rmt_forward(params, t, CFG, rmt))
    assert float(jnp.abs(with_memory(tokens)[:, third] - with_memory(changed)[:, third]).max()) > 1e-4
    without = jax.jit(lambda t: no_memory_forward(params, t, CFG, SEG))
    np.testing.assert_array_equal(without(tokens)[:, third], without(changed)[:, third])


@pytest.mark.parametrize("prompt_len", [6, 8])  # inside a segment, and exactly at a segment boundary
def test_generation_continues_across_segment_boundaries(params, tokens, prompt_len):
    rmt = rmt_cfg()
    new = 9  # crosses two boundaries
    generated = rmt_generate(params, tokens[:, :prompt_len], CFG, rmt, new)
    assert generated.shape == (2, prompt_len + new)
    np.testing.assert_array_equal(generated[:, :prompt_len], tokens[:, :prompt_len])
    padded = jnp.pad(generated, ((0, 0), (0, -generated.shape[1] % SEG)))
    predicted = jnp.argmax(rmt_forward(params, padded, CFG, rmt), axis=-1)  # [batch, padded_len]
    np.testing.assert_array_equal(generated[:, prompt_len:], predicted[:, prompt_len - 1:prompt_len + new - 1])


def test_gpt2_backbone_and_adding_memory_to_existing_params():
    cfg = get_config("gpt2-tiny")  # learned positions: 0 .. 2M + L - 1 in every segment
    rmt = RmtConfig(memory_tokens=3, segment_len=5, bptt_segments=1)
    params = add_memory(init_params(cfg, jax.random.key(2)), cfg, rmt, jax.random.key(3))
    assert params["memory"].shape == (3, cfg.d_model)
    logits = rmt_forward(params, jnp.ones((1, 10), jnp.int32), cfg, rmt)
    assert logits.shape == (1, 10, cfg.padded_vocab_size) and bool(jnp.isfinite(logits[..., :cfg.vocab_size]).all())


def test_write_scale_puts_the_written_memory_at_the_token_embeddings_scale(params, tokens):
    """write_scale="embedding": the memory a segment writes has the token table's RMS (the final norm's output times
    it; the norm's scales are 1 at init), where "none" writes RMS ~1 vectors, 50x the 0.02-std tokens."""
    table_rms = float(jnp.sqrt(jnp.mean(jnp.square(params["embed"]["token"].astype(jnp.float32)))))
    memory = jnp.broadcast_to(params["memory"], (tokens.shape[0], *params["memory"].shape))
    rms = {}
    for scale in ("none", "embedding"):
        rmt = RmtConfig(memory_tokens=2, segment_len=SEG, bptt_segments=N_SEGMENTS, write_scale=scale)
        _, written = rmt_segment(params, memory, tokens[:, :SEG], CFG, rmt)
        rms[scale] = np.sqrt(np.mean(np.square(np.asarray(written, np.float32)), axis=-1))  # [batch, M]
    np.testing.assert_allclose(rms["none"], 1.0, rtol=0.05)  # RMS-normed in the compute dtype
    np.testing.assert_allclose(rms["embedding"] / rms["none"], table_rms, rtol=1e-2)
    assert table_rms < 0.05
    with pytest.raises(ConfigError, match="write_scale='tokens': expected one of none, embedding"):
        RmtConfig(write_scale="tokens")


@pytest.mark.parametrize("field", ["memory_tokens", "segment_len", "bptt_segments"])
def test_bad_rmt_config_names_the_field(field):
    values = {"memory_tokens": 2, "segment_len": 4, "bptt_segments": 1, field: 0}
    with pytest.raises(ConfigError, match=rf"^RmtConfig\.{field}=0: must be an integer >= 1$"):
        RmtConfig(**values)


def test_bad_inputs_are_one_clear_error(params, tokens):
    with pytest.raises(ConfigError, match="= 66 positions, more than the backbone's max_seq_len=64"):
        rmt_forward(params, tokens, CFG, RmtConfig(memory_tokens=31, segment_len=SEG, bptt_segments=1))
    with pytest.raises(ValueError, match=r"params\['memory'\] has shape \(2, 48\), expected \[memory_tokens=3"):
        rmt_forward(params, tokens, CFG, RmtConfig(memory_tokens=3, segment_len=SEG, bptt_segments=1))
    with pytest.raises(ValueError, match="not a positive multiple of RmtConfig.segment_len=4"):
        rmt_forward(params, tokens[:, :7], CFG, rmt_cfg())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rmt_forward(params, tokens.at[0, 0].set(CFG.vocab_size), CFG, rmt_cfg())
    with pytest.raises(ValueError, match="no 'memory' entry"):
        rmt_forward({k: v for k, v in params.items() if k != "memory"}, tokens, CFG, rmt_cfg())


# --- the associative recall task ----------------------------------------------------------------

def test_recall_batch_places_pairs_early_and_queries_in_the_last_segment():
    layout = RecallLayout(num_keys=10, num_values=7, num_filler=5)
    starts = (layout.query, layout.first_key, layout.first_value, layout.first_filler, layout.vocab_size)
    assert starts == (0, 1, 11, 18, 23)
    tokens, mask = associative_recall_batch(jax.random.key(4), 16, 3, 24, 8, layout, num_queries=2)
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    assert tokens.shape == mask.shape == (16, 24) and tokens.dtype == np.int32
    keys, values = tokens[:, 0:6:2], tokens[:, 1:6:2]
    assert ((keys >= 1) & (keys < 11)).all() and ((values >= 11) & (values < 18)).all()
    assert all(len(set(row)) == 3 for row in keys)  # distinct keys
    assert ((tokens[:, 6:18] >= 18) & (tokens[:, 6:18] < 23)).all()  # filler up to the queries
    np.testing.assert_array_equal(np.nonzero(mask[0])[0], [20, 23])  # the answers, in the last segment
    assert mask.sum() == 16 * 2
    for row in range(16):
        pairs = dict(zip(keys[row], values[row]))
        assert tokens[row, 18] == tokens[row, 21] == 0  # QUERY markers
        assert tokens[row, 19] != tokens[row, 22]  # distinct pairs asked
        assert pairs[tokens[row, 19]] == tokens[row, 20] and pairs[tokens[row, 22]] == tokens[row, 23]
    again, _ = associative_recall_batch(jax.random.key(4), 16, 3, 24, 8, layout, num_queries=2)
    np.testing.assert_array_equal(tokens, again)  # deterministic in the key


def test_recall_pairs_spread_over_a_region():
    layout = RecallLayout(num_keys=10, num_values=7, num_filler=5)
    tokens, _ = associative_recall_batch(jax.random.key(5), 32, 3, 32, 8, layout, pair_region=24)
    tokens = np.asarray(tokens)
    is_key = (tokens[:, :24] >= 1) & (tokens[:, :24] < 11)
    assert (is_key.sum(axis=1) == 3).all() and not is_key[:, 1::2].any()  # keys on even slots of the region
    assert is_key[:, 6:].any()  # not all packed at the start
    assert ((tokens[:, 24:29] >= 18)).all()  # the last segment before the query is filler
    key_at = np.nonzero(is_key[0])[0]
    assert ((tokens[0, key_at + 1] >= 11) & (tokens[0, key_at + 1] < 18)).all()  # each key followed by its value


def test_recall_accuracy_scores_only_the_masked_next_token_predictions():
    tokens = jnp.array([[3, 1, 2, 0]])
    mask = jnp.array([[False, False, True, True]])
    logits = jax.nn.one_hot(jnp.array([[1, 2, 1, 0]]), 4)  # predicts 2 at position 2 (right), 1 at 3 (wrong)
    assert float(recall_accuracy(logits, tokens, mask)) == 0.5
    assert float(recall_accuracy(logits, tokens, jnp.zeros_like(mask))) == 0.0
    nll = next_token_loss(10 * logits, tokens, mask)
    assert 0 < float(nll) and float(next_token_loss(10 * logits, tokens, mask.at[0, 3].set(False))) < 1e-3


def test_recall_accuracy_by_pair_groups_answers_by_where_the_pair_stands():
    """Spread pairs, every one asked: a guess right exactly for the first two pairs in sequence order scores 1 for
    those and 0 for the rest, whatever order the queries ask them in; a pair never asked is NaN."""
    layout = RecallLayout(num_keys=10, num_values=7, num_filler=5)
    tokens, mask = associative_recall_batch(jax.random.key(3), 16, 4, 48, 16, layout, num_queries=4, pair_region=32)
    tokens, mask = np.array(tokens), np.array(mask)
    predicted = np.full((16, 47), -1)
    for row in range(16):
        keys = tokens[row, :32][(tokens[row, :32] >= 1) & (tokens[row, :32] < 11)]  # the pairs' keys, in order
        for answer in np.flatnonzero(mask[row]):
            if tokens[row, answer - 1] in keys[:2]:
                predicted[row, answer - 1] = tokens[row, answer]
            if tokens[row, answer - 1] == keys[3]:
                mask[row, answer] = False  # the last pair is never asked
    np.testing.assert_array_equal(recall_accuracy_by_pair(predicted, tokens, mask, layout, 4, 4), [1, 1, 0, np.nan])


def test_recall_accuracy_by_query_scores_each_query_of_the_block_in_order():
    """Right on the last two queries only: [0, 0, 1, 1]; with the 3rd query's answers unmasked it is NaN."""
    layout = RecallLayout(num_keys=10, num_values=7, num_filler=5)
    tokens, mask = associative_recall_batch(jax.random.key(4), 8, 4, 48, 16, layout, num_queries=4)
    tokens, mask = np.asarray(tokens), np.array(mask)
    predicted = np.full((8, 47), -1)
    predicted[:, [43, 46]] = tokens[:, [44, 47]]  # the answers of queries 3 and 4 (block from 36: 38, 41, 44, 47)
    np.testing.assert_array_equal(recall_accuracy_by_query(predicted, tokens, mask, 4), [0, 0, 1, 1])
    mask[:, 44] = False
    np.testing.assert_array_equal(recall_accuracy_by_query(predicted, tokens, mask, 4), [0, 0, np.nan, 1])


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 20}, "seq_len=20 is not a multiple of segment_len=8"),
    ({"seq_len": 8}, "at least 2 segments"),
    ({"num_pairs": 4, "num_queries": 3}, "num_queries=3 take 9 tokens"),
    ({"num_pairs": 5, "num_queries": 6}, "num_queries=6 exceeds num_pairs=5"),
    ({"num_pairs": 11}, "num_pairs=11 exceeds RecallLayout.num_keys=10"),
    ({"pair_region": 20}, r"pair_region=20, which must end before the last segment \(<= 16\)"),
])
def test_bad_recall_shapes_are_one_clear_error(kwargs, message):
    args = {"num_pairs": 2, "seq_len": 24, "num_queries": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        associative_recall_batch(jax.random.key(0), 2, args.pop("num_pairs"), args.pop("seq_len"), 8,
                                 RecallLayout(num_keys=10, num_values=7, num_filler=5), **args)
    with pytest.raises(ValueError, match="RecallLayout.num_filler=0"):
        RecallLayout(num_filler=0)


# --- the experiment -----------------------------------------------------------------------------

def test_rmt_recall_quick_run_writes_json_and_png(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "experiments", "rmt_recall", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "rmt_recall.json").read_text())
    assert 0 <= summary["rmt_accuracy"] <= 1 and 0 <= summary["no_memory_accuracy"] <= 1
    assert summary["sequence_len"] == 24 and len(summary["history"]["rmt_loss"]) == 4
    assert (tmp_path / "rmt_recall.png").stat().st_size > 1000
    assert "held-out accuracy" in result.stdout
    assert len(summary["rmt_accuracy_by_pair"]) == 2 and "accuracy by pair" in result.stdout
    assert len(summary["no_memory_accuracy_by_query"]) == 1 and "accuracy by query" in result.stdout


def test_rmt_recall_bad_flag_is_one_clear_error():
    from llmjax.experiments.rmt_recall import main

    with pytest.raises(SystemExit, match=r"^--memory-tokens 0: must be >= 1$"):
        main(["--memory-tokens", "0"])
    with pytest.raises(SystemExit, match="--curriculum"):
        main(["--curriculum", "4,2,8"])
