"""Evaluation on real text (llmjax.evaluation): sliding-window perplexity, against a direct computation on a tiny
model and against transformers on the real SmolLM2-135M-Instruct; greedy answers to the fixed prompts equal to
transformers' generate, token for token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.evaluation import (
    PROMPTS,
    held_out_text,
    perplexity,
    stream_nll,
    window_starts,
)
from llmjax.model import forward, init_params


@pytest.mark.parametrize("num_tokens,window,stride", [(10, 4, 2), (11, 4, 3), (100, 16, 5), (5, 8, 7), (2, 4, 3)])
def test_every_token_after_the_first_is_scored_once(num_tokens, window, stride):
    spans = window_starts(num_tokens, window, stride)
    scored = sorted(p for start, end, first in spans for p in range(start + first, end))
    assert scored == list(range(1, num_tokens))
    assert all(end - start <= window and first >= 1 for start, end, first in spans)


def test_a_stride_without_overlap_is_refused():
    with pytest.raises(ValueError, match="stride must be in 1..window - 1"):
        window_starts(10, 4, 4)


def test_stream_nll_equals_the_direct_sum_when_one_window_holds_the_stream():
    cfg = get_config("llama-tiny", compute_dtype="float32")
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 23)
    logits = np.asarray(forward(params, jnp.asarray(tokens[None, :-1]), cfg)[0, :, : cfg.vocab_size], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, tokens[1:, None], 1).sum()
    total, count = stream_nll(params, cfg, tokens, window=40, stride=20)
    assert count == 22
    np.testing.assert_allclose(total, want, rtol=1e-5)
    # Sliding windows (stride 5, window 8) see less context, so they score worse, but every token once.
    total, count = stream_nll(params, cfg, tokens, window=8, stride=5)
    assert count == 22 and total > 0


def transformers_stream_nll(model, tokens, window: int, stride: int) -> tuple[float, int]:
    import torch

    total, count = 0.0, 0
    for start, end, first in window_starts(len(tokens), window, stride):
        piece = torch.tensor(tokens[None, start:end], dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=piece).logits[0, :-1].double(), dim=-1)
        nll = -logp.gather(1, piece[0, 1:, None])[:, 0]
        total += float(nll[first - 1:].sum())
        count += end - start - first
    return total, count


@pytest.mark.usefixtures("optimized_xla")
def test_real_model_perplexity_equals_transformers(smollm2, smollm2_transformers):
    params, cfg = smollm2
    # three windows of 256 (overlaps of 64, the last one shorter): every path of the sliding window, at CI cost
    tokens = np.array(smollm2_transformers.tokenizer(held_out_text("stdlib-docstrings"))["input_ids"][:600])
    ours = perplexity(params, cfg, tokens, window=256, stride=192)
    nll, count = transformers_stream_nll(smollm2_transformers.model, tokens, 256, 192)
    theirs = float(np.exp(nll / count))
    assert abs(ours / theirs - 1) < 0.005  # the figure: within 0.5%
    assert 2 < ours < 60  # a real language model on English prose, not a random one (vocab 49152)


@pytest.mark.usefixtures("optimized_xla")
def test_real_model_greedy_answers_equal_transformers(smollm2, smollm2_transformers):
    """The ten fixed prompts, chat-formatted by the model's template, 64 greedy tokens each (no stop) in one batch:
    transformers, fed each prompt with our answer, picks every one of our tokens as its own greedy choice, which
    is what equal greedy generations mean (one forward pass instead of 64 generate steps)."""
    import torch

    from llmjax.infer.generate import generate

    params, cfg = smollm2
    tokenizer = smollm2_transformers.tokenizer
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  return_dict=False)) for p in PROMPTS]
    answers = [list(row)[:64] for row in generate(params, cfg, prompts, max_new_tokens=64).tokens]
    assert all(len(a) == 64 for a in answers)

    rows = [p + a for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left-padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = smollm2_transformers.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        choices = logits[row, width - 65:width - 1].argmax(-1).tolist()  # after the prompt and each answer token
        assert choices == answer, (f"prompt {row} ({PROMPTS[row]!r}) differs from token "
                                   f"{first_difference(choices, answer)}")
    assert "Paris" in tokenizer.decode(answers[0])


def first_difference(a: list, b: list) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
