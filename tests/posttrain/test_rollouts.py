"""GRPO rollouts from the serving engine: G seeded samples per prompt in group order, reproducible per seed, every
request served even through a small queue; training rows whose mask covers exactly the completion tokens."""

import dataclasses

import jax
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.infer.engine import Engine, EngineConfig, SamplingParams
from llmjax.infer.generate import generate
from llmjax.infer.sampling import SamplingConfig
from llmjax.model import init_params
from llmjax.posttrain.rollouts import Rollout, completion_rows, sample_groups

ENGINE = {"num_blocks": 64, "block_size": 4, "max_running": 8, "max_tokens_per_step": 32, "max_prefill_rows": 2}
SAMPLING = SamplingParams(max_tokens=6, temperature=1.0)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("llama-tiny")
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9, 5)]
    return params, cfg, prompts


def test_groups_are_seeded_ordered_and_equal_generate(tiny):
    params, cfg, prompts = tiny
    engine = Engine(params, cfg, EngineConfig(**ENGINE))
    rollouts = sample_groups(engine, prompts, 4, SAMPLING, seed=3)
    assert [r.prompt_index for r in rollouts] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(len(r.completion_ids) == 6 and r.finish_reason == "length" for r in rollouts)
    assert all(r.prompt_ids == tuple(prompts[r.prompt_index]) for r in rollouts)
    assert len({r.completion_ids for r in rollouts[:4]}) > 1  # the samples of one prompt differ
    assert sample_groups(engine, prompts, 4, SAMPLING, seed=3) == rollouts  # reproducible
    assert sample_groups(engine, prompts, 4, SAMPLING, seed=4) != rollouts
    # request i of seed s is sampled with seed s * requests + i, as generate samples it
    want = generate(params, cfg, [prompts[1]], max_new_tokens=6,
                    sampling=SamplingConfig(temperature=1.0, seed=3 * 12 + 5)).tokens[0]
    assert list(rollouts[5].completion_ids) == want


def test_a_small_queue_still_serves_every_request_and_stop_ids_end_them(tiny):
    params, cfg, prompts = tiny
    free = sample_groups(Engine(params, cfg, EngineConfig(**ENGINE)), prompts, 3, SAMPLING)
    stop = free[0].completion_ids[2]  # the same seeds sample the same tokens until a stop id ends a request
    engine = Engine(params, cfg, EngineConfig(**ENGINE, max_queue=2))
    rollouts = sample_groups(engine, prompts, 3, dataclasses.replace(SAMPLING, stop_token_ids=(stop,)))
    assert len(rollouts) == 9 and not engine.has_unfinished()
    assert rollouts[0].completion_ids == free[0].completion_ids[:3] and rollouts[0].finish_reason == "stop"
    for got, full in zip(rollouts, free):
        ends = [i for i, t in enumerate(full.completion_ids) if t == stop]
        assert got.completion_ids == full.completion_ids[:ends[0] + 1 if ends else None]
        assert got.finish_reason == ("stop" if ends else "length")


def test_group_of_one_and_busy_engine_are_refused(tiny):
    params, cfg, prompts = tiny
    engine = Engine(params, cfg, EngineConfig(**ENGINE))
    with pytest.raises(ValueError, match="at least two samples"):
        sample_groups(engine, prompts, 1, SAMPLING)
    engine.add_request("busy", prompts[0], SAMPLING)
    with pytest.raises(ValueError, match="idle engine"):
        sample_groups(engine, prompts, 2, SAMPLING)


def test_completion_rows_mask_exactly_the_completion_targets():
    rollouts = [Rollout(0, (5, 6, 7), (8, 9), "stop"), Rollout(0, (5, 6, 7), (10,), "length"),
                Rollout(1, (1,), (2, 3, 4, 11), "length")]
    rows = completion_rows(rollouts, seq_len=6, pad_id=0)
    np.testing.assert_array_equal(rows["inputs"][0], [5, 6, 7, 8, 9, 0])
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 9, 0, 0])
    for row, rollout in enumerate(rollouts):
        mask = rows["completion_mask"][row].astype(bool)
        assert rows["targets"][row][mask].tolist() == list(rollout.completion_ids)
    with pytest.raises(ValueError, match="more than seq_len"):
        completion_rows(rollouts, seq_len=3)
