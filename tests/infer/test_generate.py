"""Sample generation: greedy equals repeated argmax of the full forward; sampling is seeded."""

import jax
import numpy as np

from llmjax.config import get_config
from llmjax.infer.generate import continuation, greedy_continuation
from llmjax.model import forward, init_params


def test_greedy_equals_argmax_of_forward_step_by_step():
    cfg = get_config("llama-tiny")
    params = init_params(cfg, jax.random.key(0))
    prompt = [5, 17, 3]
    want = list(prompt)
    for _ in range(6):
        logits = forward(params, np.array([want]), cfg)
        want.append(int(np.argmax(logits[0, -1])))
    assert greedy_continuation(params, cfg, prompt, 6) == want[3:]


def test_sampling_is_reproducible_per_seed_and_stays_in_vocab():
    cfg = get_config("gpt2-tiny")
    params = init_params(cfg, jax.random.key(1))
    a = continuation(params, cfg, [1, 2], 20, temperature=1.0, seed=3)
    assert a == continuation(params, cfg, [1, 2], 20, temperature=1.0, seed=3)
    assert a != continuation(params, cfg, [1, 2], 20, temperature=1.0, seed=4)
    assert all(0 <= t < cfg.vocab_size for t in a)


def test_prompt_longer_than_context_keeps_its_end():
    cfg = get_config("gpt2-tiny")
    params = init_params(cfg, jax.random.key(2))
    assert len(greedy_continuation(params, cfg, list(range(1, 100)), 5)) == 5
