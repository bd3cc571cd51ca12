"""Beam search against an exhaustive search, and diverse beam search's groups (HF parity: test_hf_parity)."""

import itertools

import jax
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.infer.beam import beam_search
from llmjax.infer.generate import GenerationError
from llmjax.model import forward, init_params


@pytest.fixture(scope="module")
def small_vocab():
    cfg = get_config("llama-tiny", vocab_size=6, vocab_multiple=8)
    return init_params(cfg, jax.random.key(3)), cfg


def sequence_logprobs(params, cfg, prompt, sequences):
    """Log-probability of each continuation, all in one forward pass."""
    tokens = np.array([prompt + list(seq) for seq in sequences])
    logits = np.asarray(forward(params, tokens, cfg))[:, :, : cfg.vocab_size].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    steps = np.arange(len(sequences[0]))
    picked = logp[:, len(prompt) - 1 + steps][np.arange(len(sequences))[:, None], steps, tokens[:, len(prompt):]]
    return picked.sum(-1)


def test_wide_beam_finds_the_most_likely_sequence(small_vocab):
    """With as many beams as sequences of length 3 (6^3 > beams * 2 at each step suffices for 36 -> 216),
    beam search without EOS returns the exhaustive argmax, scored as its log-probability / 3."""
    params, cfg = small_vocab
    prompt = [1, 4]
    out = beam_search(params, cfg, [prompt], num_beams=36, max_new_tokens=3, length_penalty=1.0)
    sequences = list(itertools.product(range(6), repeat=3))
    scores = dict(zip(sequences, sequence_logprobs(params, cfg, prompt, sequences)))
    best = max(scores, key=scores.get)
    assert out.sequences[0][0] == list(best)
    np.testing.assert_allclose(out.scores[0][0], scores[best] / 3, rtol=1e-4)
    assert out.scores[0] == sorted(out.scores[0], reverse=True)


def test_diverse_groups_pick_different_first_tokens(small_vocab):
    params, cfg = small_vocab
    plain = beam_search(params, cfg, [[2, 3]], num_beams=4, max_new_tokens=4, num_groups=2)
    diverse = beam_search(params, cfg, [[2, 3]], num_beams=4, max_new_tokens=4, num_groups=2, diversity_penalty=50.0)
    one_group = beam_search(params, cfg, [[2, 3]], num_beams=2, max_new_tokens=4)
    # Without a penalty each group is an independent beam search of 2 beams: both equal the 2-beam search.
    assert plain.sequences[0][0] == one_group.sequences[0][0]
    # With a huge penalty the second group never repeats the first group's token at any step.
    first_tokens = {seq[0] for seq in diverse.sequences[0]}
    assert len(first_tokens) >= 2
    assert len({tuple(s) for s in diverse.sequences[0]}) == 4


def test_early_stopping_true_stops_when_beams_are_finished(small_vocab):
    params, cfg = small_vocab
    eos = beam_search(params, cfg, [[1]], num_beams=1, max_new_tokens=2).sequences[0][0][0]
    out = beam_search(params, cfg, [[1]], num_beams=2, max_new_tokens=20, eos_id=eos, early_stopping=True)
    assert all(seq[-1] == eos or len(seq) == 20 for seq in out.sequences[0])
    assert min(len(s) for s in out.sequences[0]) < 20


@pytest.mark.parametrize("kwargs,message", [
    ({"num_beams": 0}, "num_beams"), ({"num_beams": 4, "num_groups": 3}, "must divide"),
    ({"early_stopping": "sometimes"}, "early_stopping"), ({"diversity_penalty": -1.0}, "diversity_penalty"),
    ({"eos_id": 100}, "eos_id"),
])
def test_bad_beam_settings(small_vocab, kwargs, message):
    params, cfg = small_vocab
    with pytest.raises(GenerationError, match=message):
        beam_search(params, cfg, [[1]], max_new_tokens=3, **kwargs)
