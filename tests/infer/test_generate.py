"""Generation on the device: greedy = argmax of the full forward, ragged batches = one prompt at a time,
seeds, EOS / stop strings (across token boundaries) / max tokens, streaming, and bad input."""

import jax
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.infer.generate import GenerationError, continuation, generate, greedy_continuation
from llmjax.infer.sampling import SamplingConfig
from llmjax.model import forward, init_params


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("llama-tiny")
    return init_params(cfg, jax.random.key(0)), cfg


def test_greedy_equals_argmax_of_forward_step_by_step(tiny):
    """Each greedy token is the argmax of the full forward over everything before it (one causal pass)."""
    params, cfg = tiny
    prompt = [5, 17, 3]
    tokens = greedy_continuation(params, cfg, prompt, 6)
    logits = np.asarray(forward(params, np.array([prompt + tokens]), cfg))[0, :, : cfg.vocab_size]
    assert tokens == np.argmax(logits[len(prompt) - 1: -1], axis=-1).tolist()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_ragged_batch_equals_one_prompt_at_a_time(tiny, padding):
    params, cfg = tiny
    prompts = [[5, 17, 3, 9, 100, 7, 8], [1], [200, 4, 4]]
    sampling = [SamplingConfig(temperature=0.9, top_p=0.9, seed=s) for s in (1, 2, 3)]
    batch = generate(params, cfg, prompts, max_new_tokens=8, sampling=sampling, padding=padding)
    for prompt, config, tokens in zip(prompts, sampling, batch.tokens):
        assert tokens == generate(params, cfg, [prompt], max_new_tokens=8, sampling=config).tokens[0]
    assert batch.finish_reasons == ["length"] * 3


def test_sampling_is_reproducible_per_seed_and_stays_in_vocab():
    cfg = get_config("gpt2-tiny")
    params = init_params(cfg, jax.random.key(1))
    a = continuation(params, cfg, [1, 2], 20, temperature=1.0, seed=3)
    assert a == continuation(params, cfg, [1, 2], 20, temperature=1.0, seed=3)
    assert a != continuation(params, cfg, [1, 2], 20, temperature=1.0, seed=4)
    assert all(0 <= t < cfg.vocab_size for t in a)


def test_continuation_keeps_the_end_of_a_long_prompt():
    cfg = get_config("gpt2-tiny")
    params = init_params(cfg, jax.random.key(2))
    assert len(greedy_continuation(params, cfg, list(range(1, 100)), 5)) == 5


def test_eos_ends_a_row_and_streaming_sees_every_token(tiny):
    params, cfg = tiny
    free = generate(params, cfg, [[5, 6], [7]], max_new_tokens=10).tokens
    eos = free[0][2]
    seen = []
    out = generate(params, cfg, [[5, 6], [7]], max_new_tokens=10, eos_id=eos,
                   stream=lambda step, tokens: seen.append(np.asarray(tokens).tolist()))
    assert out.tokens[0] == free[0][:3] and out.finish_reasons[0] == "eos"
    cut = free[1].index(eos) + 1 if eos in free[1] else 10
    assert out.tokens[1] == free[1][:cut]
    streamed = [[step[row] for step in seen if step[row] >= 0] for row in range(2)]
    assert streamed == out.tokens


def test_stop_string_straddling_tokens_stops_the_row(bpe, bpe_model):
    params, cfg = bpe_model
    prompt = bpe.encode("def decode(self, s")
    free = generate(params, cfg, [prompt], max_new_tokens=12).tokens[0]
    pieces = [bpe.decode_bytes([t]) for t in free]
    # A stop string from the middle of one token to the middle of a later one.
    start = next(i for i, p in enumerate(pieces[:6]) if len(p) >= 2)
    end = next(i for i in range(start + 1, len(pieces)) if len(pieces[i]) >= 1)
    text = b"".join(pieces)
    begin = sum(map(len, pieces[:start])) + 1
    finish = sum(map(len, pieces[:end])) + 1
    stop = text[begin:finish].decode("utf-8", errors="strict")
    out = generate(params, cfg, [prompt], max_new_tokens=12, stop_strings=[stop], tokenizer=bpe)
    assert out.finish_reasons == ["stop"]
    assert out.tokens[0] == free[: end + 1]


@pytest.mark.parametrize("kwargs,message", [
    ({"prompts": [[]]}, "prompt 0 is empty"),
    ({"prompts": [list(range(1, 61))], "max_new_tokens": 10}, "context window of 64 tokens leaves room for 54"),
    ({"prompts": [[1]], "max_new_tokens": 0}, "max_new_tokens=0"),
    ({"prompts": [[1]], "max_new_tokens": 64}, "leaves no room"),
    ({"prompts": [[1, 999]]}, "outside the vocabulary"),
    ({"prompts": [[1]], "padding": "middle"}, "padding"),
    ({"prompts": [[1]], "stop_strings": ["x"]}, "need the tokenizer"),
    ({"prompts": [[1], [2]], "sampling": [SamplingConfig()]}, "1 sampling configs for 2 prompts"),
])
def test_bad_input_is_one_clear_error(tiny, kwargs, message):
    params, cfg = tiny
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationError, match=message):
        generate(params, cfg, **kwargs)


def test_truncation_only_when_asked(tiny):
    params, cfg = tiny
    long = list(range(1, 61))
    out = generate(params, cfg, [long], max_new_tokens=10, truncate=True)
    assert out.tokens == generate(params, cfg, [long[-54:]], max_new_tokens=10).tokens
