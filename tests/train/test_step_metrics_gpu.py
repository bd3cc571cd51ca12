"""A step's metrics read after the next step was dispatched (what llmjax.train.loop does: it reports step N while
step N + 1 runs, the state donated) hold step N's values. On the H100 an SFT run logged learning_rate 0.0 and
update_ratio 0.0 at its log steps while its loss fell (2026-12-06, docs/posttrain.md); CPUs do not donate buffers,
so only a GPU can show whether donation reaches the metrics."""

import jax
import numpy as np
import pytest

from llmjax.config import TrainConfig, get_config
from llmjax.train.optim import learning_rate_schedule
from llmjax.train.step import init_train_state, make_train_step, windows_to_batch


@pytest.mark.gpu
def test_metrics_survive_the_next_donating_step():
    cfg = get_config("llama-tiny")
    train_cfg = TrainConfig(lr=1e-3, warmup_steps=2, total_steps=10)
    state = init_train_state(cfg, train_cfg, jax.random.key(0))
    step = make_train_step(cfg, train_cfg)
    batch = windows_to_batch(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 33)))
    metrics = []
    for _ in range(4):
        state, step_metrics = step(state, batch)  # dispatched before the previous metrics are read
        metrics.append(step_metrics)
    schedule = learning_rate_schedule(train_cfg)
    for index, values in enumerate(jax.device_get(metrics)):
        assert float(values["learning_rate"]) == pytest.approx(float(schedule(index)), rel=1e-6), index
        if index > 0:  # step 0's learning rate is 0 in the warmup
            assert float(values["update_ratio"]) > 0, index
