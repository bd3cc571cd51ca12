"""Speculative decoding: the multi-token extend step and cache rewind, greedy output equal to plain greedy
`generate`, the rejection sampler keeping the target distribution (statistically, with samplers that are
wrong by design as negative checks), the full loop's token distribution, and bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llmjax.config import get_config
from llmjax.infer import kv_cache
from llmjax.infer import decode_model
from llmjax.infer.generate import GenerationError, generate
from llmjax.infer.sampling import SamplingConfig, batch_sampling
from llmjax.infer.speculative import greedy_tokens, greedy_verify, probabilities, sample, speculative_generate, verify
from llmjax.model import forward, init_params

prefill = jax.jit(decode_model.prefill, static_argnames="cfg")
decode_step = jax.jit(decode_model.decode_step, static_argnames="cfg")
extend_step = jax.jit(decode_model.extend_step, static_argnames=("cfg", "min_rows"))
prepare_params = decode_model.prepare_params
DRAFT_SHAPE = dict(num_layers=1, d_model=24, num_heads=2, num_kv_heads=1, d_ff=40)


def perturbed(params, scale: float, seed: int):
    """The target's weights plus noise: a draft that agrees often but not always."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jnp.std(x) * jax.random.normal(key, x.shape, x.dtype)
                                     for x, key in zip(leaves, keys)])


@pytest.fixture(scope="module")
def models():
    """(params, cfg): the target; drafts of its shape: random weights, a noisy copy, the target itself; and a
    random draft of a smaller shape."""
    cfg = get_config("llama-tiny")
    params = init_params(cfg, jax.random.key(0))
    small_cfg = get_config("llama-tiny", **DRAFT_SHAPE)
    return {"target": (params, cfg), "random": (init_params(cfg, jax.random.key(1)), cfg),
            "noisy": (perturbed(params, 0.3, 2), cfg), "same": (params, cfg),
            "small": (init_params(small_cfg, jax.random.key(1)), small_cfg)}


# --- the model and cache pieces ------------------------------------------------------------------------

@pytest.mark.parametrize("name, overrides, cache_dtype, capacity", [
    ("gpt2-tiny", {}, None, 13),
    ("llama-tiny", {"sliding_window": 4}, "int8", 7),  # a ring that wraps during the extend
])
def test_extend_step_equals_decode_steps_and_rewind_forgets(name, overrides, cache_dtype, capacity):
    """n tokens through extend_step = n decode_steps (logits and cache); after rewind(c) the cache decodes
    exactly like one that never saw the last c tokens."""
    cfg = get_config(name, **overrides)
    dparams = prepare_params(init_params(cfg, jax.random.key(3)), cfg)
    tokens = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    valid = jnp.array([[False, False, True, True, True], [True] * 5])
    _, cache = prefill(dparams, tokens, valid, kv_cache.init_cache(cfg, 2, capacity, cache_dtype), cfg)
    new = jnp.array([[9, 10, 11], [13, 14, 15]])
    stepped, logits = cache, []
    for j in range(new.shape[1]):
        step_logits, stepped = decode_step(dparams, new[:, j], stepped, cfg)
        logits.append(step_logits)
    extended_logits, extended = extend_step(dparams, new, cache, cfg)
    np.testing.assert_allclose(extended_logits, jnp.stack(logits, axis=1), rtol=1e-5, atol=1e-5)
    padded_logits, _ = extend_step(dparams, new, cache, cfg, min_rows=8)  # the GPU layout: zero rows added
    np.testing.assert_allclose(padded_logits, extended_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(extended), jax.tree.leaves(stepped)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    forgotten = jnp.array([2, 0])  # row 0 keeps only token 9, row 1 keeps all three
    rewound = kv_cache.rewind(extended, forgotten)
    kept_row0 = decode_step(dparams, new[:, 0], cache, cfg)[1]
    expected0, _ = decode_step(dparams, jnp.array([20, 20]), kept_row0, cfg)
    expected1, _ = decode_step(dparams, jnp.array([20, 20]), stepped, cfg)
    got, _ = decode_step(dparams, jnp.array([20, 20]), rewound, cfg)
    if cfg.sliding_window is None:  # a ring loses what the forgotten tokens overwrote (capacity < window + 2 here)
        np.testing.assert_allclose(got[0], expected0[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], expected1[1], rtol=1e-5, atol=1e-5)
    assert rewound["next_position"].tolist() == [4, 8] and rewound["next_slot"].tolist() == [6, 8]


def test_rewind_clears_only_the_forgotten_slots_of_a_ring():
    cfg = get_config("llama-tiny")
    cache = kv_cache.init_cache(cfg, 2, 5)
    cache = {**cache, "next_slot": jnp.array([7, 3]), "next_position": jnp.array([7, 3]),
             "positions": jnp.array([[5, 6, 2, 3, 4], [0, 1, 2, -1, -1]])}
    rewound = kv_cache.rewind(cache, jnp.array([3, 1]))
    assert rewound["positions"].tolist() == [[-1, -1, 2, 3, -1], [0, 1, -1, -1, -1]]
    assert rewound["next_slot"].tolist() == [4, 2] and rewound["next_position"].tolist() == [4, 2]


# --- greedy: exactly plain greedy generate -------------------------------------------------------------

PROMPTS = [[5, 17, 3, 9], [1], [200, 4, 4, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_plain_greedy_generate(models, k):
    params, cfg = models["target"]
    expected = generate(params, cfg, PROMPTS, max_new_tokens=24).tokens
    drafts = ["random", "noisy", "same"] + (["small"] if k == 3 else [])
    for draft in drafts:
        out = speculative_generate(params, cfg, *models[draft], PROMPTS, k=k, max_new_tokens=24)
        assert out.tokens == expected, draft
        assert out.finish_reasons == ["length"] * 3
        rate = out.stats.acceptance_rate
        assert {"same": rate == 1.0, "noisy": 0.2 < rate < 0.95}.get(draft, rate < 0.2), (draft, rate)
        assert out.stats.generated == 3 * 24 and out.stats.drafted == k * out.stats.rounds
        if draft == "same":  # every round keeps k drafts and adds one: k + 1 tokens per target pass
            assert out.stats.rounds == 3 * -(-23 // (k + 1))


def test_greedy_stops_at_eos_inside_an_accepted_run(models):
    params, cfg = models["target"]
    free = generate(params, cfg, PROMPTS, max_new_tokens=24).tokens
    eos = free[0][6]
    expected = generate(params, cfg, PROMPTS, max_new_tokens=24, eos_id=eos)
    for draft in ("same", "noisy"):  # the program compiled for the test above (EOS is an argument)
        out = speculative_generate(params, cfg, *models[draft], PROMPTS, k=3, max_new_tokens=24, eos_id=eos)
        assert out.tokens == expected.tokens and out.finish_reasons == expected.finish_reasons
    assert expected.finish_reasons[0] == "eos"


@pytest.mark.slow
def test_greedy_with_a_sliding_window_ring_that_wraps():
    """A window model's cache is a ring (64 slots for 110 tokens): rounds that write and forget drafts must
    never lose a key still inside the window."""
    cfg = get_config("llama-tiny", sliding_window=8, max_seq_len=256)
    params = init_params(cfg, jax.random.key(4))
    prompts = [list(range(1, 11)), [7, 7, 7]]
    expected = generate(params, cfg, prompts, max_new_tokens=100).tokens
    out = speculative_generate(params, cfg, perturbed(params, 0.2, 5), cfg, prompts, k=3, max_new_tokens=100)
    assert out.tokens == expected and 0.2 < out.stats.acceptance_rate < 1.0


# --- bf16 on the GPU: the verify pass is decode, bit for bit ---------------------------------------------

def gpu_model(num_layers: int):
    """llama-1b's width and heads (bf16, byte vocabulary) cut to a few layers, random weights."""
    cfg = get_config("llama-1b", vocab_size=257, num_layers=num_layers)
    return decode_model.prepare_params(init_params(cfg, jax.random.key(7)), cfg), cfg


@pytest.mark.gpu
@pytest.mark.parametrize("batch, count, cache_dtype", [(1, 5, None), (1, 2, None), (2, 3, None), (1, 7, "int8")])
def test_extend_step_is_decode_steps_bit_for_bit_on_gpu(batch, count, cache_dtype):
    """bf16, the Pallas kernel, batch * n <= 8 (decode's 8-row GEMMs): the logits of extend_step equal those of n
    successive decode_steps, and so does the cache they leave. Bit for bit in the first GPU run; in a later one the
    int8 case's float32 logits differed by one ulp (4.8e-7; likely XLA chose another GEMM configuration for one of
    the two programs, which it does not promise to keep). So: logits within 1e-5 (the jnp verify path this replaced differed by ~1e-2, bf16
    rounding), the greedy tokens equal, the cache within one step of its storage type."""
    dparams, cfg = gpu_model(2)
    rng = np.random.default_rng(batch * 10 + count)
    prompt = jnp.asarray(rng.integers(0, 256, (batch, 128)), jnp.int32)
    _, cache = prefill(dparams, prompt, jnp.ones(prompt.shape, bool), kv_cache.init_cache(cfg, batch, 448, cache_dtype),
                       cfg)
    new = jnp.asarray(rng.integers(0, 256, (batch, count)), jnp.int32)
    stepped, logits = cache, []
    for j in range(count):
        step_logits, stepped = decode_step(dparams, new[:, j], stepped, cfg)
        logits.append(step_logits)
    extended_logits, extended = extend_step(dparams, new, cache, cfg)
    want = np.asarray(jnp.stack(logits, axis=1))
    np.testing.assert_allclose(np.asarray(extended_logits), want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(extended_logits).argmax(-1), want.argmax(-1))
    for a, b in zip(jax.tree.leaves(extended), jax.tree.leaves(stepped)):
        a, b = np.asarray(a), np.asarray(b)
        if jnp.issubdtype(a.dtype, jnp.integer):  # int8 codes within one step; positions and slots exact
            step = 1 if a.dtype == np.int8 else 0
        else:  # one bf16 step of the largest value
            step = 2.0**-7 * max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=0, atol=step)


@pytest.mark.gpu
def test_target_as_its_own_draft_accepts_everything_and_equals_generate_on_gpu():
    """bf16 on the GPU: with the target as its own draft every draft is accepted (the draft's decode steps and
    the verify pass agree bit for bit, near-ties included), and the text is greedy `generate`'s."""
    dparams, cfg = gpu_model(2)
    prompts = [list(np.random.default_rng(row).integers(0, 256, 100)) for row in range(2)]
    for prompt in prompts:
        expected = generate(None, cfg, [prompt], max_new_tokens=96, prepared=dparams).tokens
        out = speculative_generate(None, cfg, None, cfg, [prompt], k=4, max_new_tokens=96, target_prepared=dparams,
                                   draft_prepared=dparams)
        assert out.tokens == expected and out.stats.acceptance_rate == 1.0


# --- sampling: the rejection sampler keeps p -----------------------------------------------------------

VOCAB, SAMPLES = 6, 20_000


def tiny_vocab_distributions(k: int, config: SamplingConfig, seed: int = 0):
    """Fixed random target and draft logits over 6 tokens -> p [k + 1, 6], q [k, 6] after the sampling
    processing (temperature, top-k)."""
    rng = np.random.default_rng(seed)
    arrays, features = batch_sampling([config], VOCAB, VOCAB)
    p = probabilities(jnp.asarray(rng.normal(size=(1, k + 1, VOCAB)) * 1.5, jnp.float32), arrays, features)[0]
    q = probabilities(jnp.asarray(rng.normal(size=(1, k, VOCAB)) * 1.5, jnp.float32), arrays, features)[0]
    return p, q


def run_rounds(p, q, verifier, samples: int = SAMPLES, seed: int = 1):
    """`samples` independent rounds: drafts from q, then verifier -> (accepted, next_token, drafts)."""
    k = q.shape[0]
    keys = jax.random.split(jax.random.key(seed), k + 1)
    draft_keys = [jax.random.split(key, samples) for key in keys[:k]]
    drafts = jnp.stack([sample(jnp.broadcast_to(q[i], (samples, VOCAB)), draft_keys[i]) for i in range(k)], axis=1)
    accepted, next_token = verifier(jnp.broadcast_to(p, (samples, *p.shape)), jnp.broadcast_to(q, (samples, *q.shape)),
                                    drafts, jax.random.split(keys[k], samples))
    accepted, next_token, drafts = np.asarray(accepted), np.asarray(next_token), np.asarray(drafts)
    emitted = np.where(np.arange(k + 1)[None] < accepted[:, None], np.pad(drafts, ((0, 0), (0, 1))), -1)
    emitted[np.arange(samples), accepted] = next_token
    return accepted, emitted  # emitted [samples, k + 1]: -1 after the round's last token


def chi_square_p_value(tokens: np.ndarray, p: np.ndarray) -> float:
    """p-value of the tokens coming from p (cells of probability 0 must be empty)."""
    counts = np.bincount(tokens, minlength=len(p))
    support = p > 0
    if counts[~support].any():
        return 0.0
    expected = p[support] / p[support].sum() * counts.sum()
    return float(stats.chisquare(counts[support], expected).pvalue)


def always_accept(p, q, drafts, keys):
    """Wrong on purpose: keeps every draft (the output follows q)."""
    return jnp.full(drafts.shape[:1], drafts.shape[1], jnp.int32), sample(p[:, -1], keys)


def resample_from_p(p, q, drafts, keys):
    """Wrong on purpose: the right acceptance test, but a rejected token is redrawn from p, not max(0, p - q)."""
    accepted, _ = verify(p, q, drafts, keys)
    at = accepted[:, None, None]
    return accepted, sample(jnp.take_along_axis(p, at, axis=1)[:, 0], jax.random.split(keys[0], len(keys)))


@pytest.mark.parametrize("config", [SamplingConfig(temperature=0.7, top_k=4), SamplingConfig(temperature=1.3),
                                    SamplingConfig(temperature=0.9, top_p=0.8)])
def test_rejection_sampling_keeps_the_target_distribution(config):
    k = 3
    p, q = tiny_vocab_distributions(k, config)
    p_np, q_np = np.asarray(p, np.float64), np.asarray(q, np.float64)
    accepted, emitted = run_rounds(p, q, verify)
    assert chi_square_p_value(emitted[:, 0], p_np[0]) > 1e-4  # the round's first token ~ p_1
    second = emitted[accepted >= 1, 1]  # given d_1 was kept, the next token ~ p_2
    assert len(second) > 2000 and chi_square_p_value(second, p_np[1]) > 1e-4
    expected_first_acceptance = np.minimum(p_np[0], q_np[0]).sum()
    assert abs(np.mean(accepted >= 1) - expected_first_acceptance) < 0.015
    # The same test rejects samplers that are wrong by design, at the same sample size.
    assert chi_square_p_value(run_rounds(p, q, always_accept)[1][:, 0], p_np[0]) < 1e-12
    assert chi_square_p_value(run_rounds(p, q, resample_from_p)[1][:, 0], p_np[0]) < 1e-12


def test_equal_distributions_accept_everything_and_the_bonus_token_follows_p():
    k = 2
    p, _ = tiny_vocab_distributions(k, SamplingConfig(temperature=0.8, top_k=5), seed=3)
    accepted, emitted = run_rounds(p, p[:k], verify)
    assert (accepted == k).all()
    assert chi_square_p_value(emitted[:, k], np.asarray(p[k], np.float64)) > 1e-4
    assert chi_square_p_value(emitted[:, k], np.asarray(p[0], np.float64)) < 1e-12  # the test can tell p_3 from p_1


def test_greedy_verification_keeps_the_drafts_equal_to_the_target_argmax():
    arrays, features = batch_sampling([SamplingConfig.greedy()] * 2, VOCAB, VOCAB)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, VOCAB)), jnp.float32)
    p = probabilities(logits, arrays, features)
    argmax = np.asarray(jnp.argmax(logits, -1))
    drafts = np.stack([argmax[0, :3], [argmax[1, 0], (argmax[1, 1] + 1) % VOCAB, argmax[1, 2]]]).astype(np.int32)
    q = jax.nn.one_hot(drafts, VOCAB)
    accepted, next_token = verify(p, q, jnp.asarray(drafts), jax.random.split(jax.random.key(0), 2))
    assert accepted.tolist() == [3, 1] and next_token.tolist() == [argmax[0, 3], argmax[1, 1]]
    shortcut = greedy_verify(greedy_tokens(logits, arrays, features), jnp.asarray(drafts))  # greedy batches' path
    assert [x.tolist() for x in shortcut] == [[3, 1], [argmax[0, 3], argmax[1, 1]]]


def test_a_greedy_row_in_a_sampled_batch_is_plain_greedy(models):
    """Mixed batches take the distributions path (one-hot rows through `verify`): the greedy row still equals
    greedy `generate`."""
    params, cfg = models["target"]
    expected = generate(params, cfg, PROMPTS[:1], max_new_tokens=24).tokens[0]
    sampling = [SamplingConfig.greedy(), SamplingConfig(temperature=0.8, seed=3)]
    out = speculative_generate(params, cfg, *models["noisy"], PROMPTS[:2], k=3, max_new_tokens=24, sampling=sampling)
    assert out.tokens[0] == expected


# --- the full loop's distribution ----------------------------------------------------------------------

def exact_joint(params, cfg, prompt, config: SamplingConfig, length: int) -> np.ndarray:
    """p(t_1..t_length | prompt) [vocab ** length] (t_1 most significant) from one full forward over every
    continuation, with the sampling processing applied to each conditional."""
    vocab = cfg.vocab_size
    continuations = np.array(list(itertools.product(range(vocab), repeat=length)))  # [vocab ** length, length]
    tokens = np.concatenate([np.tile(prompt, (len(continuations), 1)), continuations[:, :-1]], axis=1)
    logits = jax.jit(forward, static_argnames="cfg")(params, jnp.asarray(tokens), cfg)[:, -length:, :vocab]
    arrays, features = batch_sampling([config] * len(continuations), vocab, vocab)
    conditionals = np.asarray(probabilities(logits, arrays, features), np.float64)  # [rows, length, vocab]
    steps = np.take_along_axis(conditionals, continuations[..., None], axis=-1)[..., 0]
    return steps.prod(axis=1)


@pytest.mark.slow
def test_speculative_loop_samples_the_target_distribution():
    """20k rows (one seed each) of a vocab-8 model, k=2: the joint distribution of the first three tokens
    (one from the prefill, two from the first round: kept drafts, corrections, bonus tokens) matches the
    target's exact one within sampling noise, and is far from the draft's."""
    cfg = get_config("llama-tiny", vocab_size=8, vocab_multiple=8, init_std=0.2)
    params = init_params(cfg, jax.random.key(0))
    draft_params = perturbed(params, 0.6, 1)
    prompt, config, length = [3, 1, 4, 1, 5], SamplingConfig(temperature=0.9, top_k=6), 3
    rows = 20_000
    out = speculative_generate(params, cfg, draft_params, cfg, [prompt] * rows, k=2, max_new_tokens=length,
                               sampling=[SamplingConfig(temperature=0.9, top_k=6, seed=s) for s in range(rows)])
    assert 0.2 < out.stats.acceptance_rate < 0.9
    index = np.array(out.tokens) @ (cfg.vocab_size ** np.arange(length)[::-1])
    observed = np.bincount(index, minlength=cfg.vocab_size ** length) / rows
    target = exact_joint(params, cfg, prompt, config, length)
    draft = exact_joint(draft_params, cfg, prompt, config, length)
    assert abs(target.sum() - 1) < 1e-5
    tolerance = 0.06  # sampling noise alone: total variation about 0.026 for 20k draws from the exact joint
    assert 0.5 * np.abs(observed - target).sum() < tolerance
    assert 0.5 * np.abs(draft - target).sum() > 3 * tolerance  # a loop emitting the draft's tokens would fail


# --- bad input -----------------------------------------------------------------------------------------

def test_bad_input_gets_one_clear_error(models):
    params, cfg = models["target"]
    draft_params, draft_cfg = models["small"]
    other_vocab = get_config("llama-tiny", vocab_size=300, **DRAFT_SHAPE)
    with pytest.raises(GenerationError, match="vocabulary has 300 tokens and the target's 301"):
        speculative_generate(params, cfg, None, other_vocab, [[1]])  # checked before the weights are used
    for k in (0, -2):
        with pytest.raises(GenerationError, match=f"k={k}: the draft must propose at least one token"):
            speculative_generate(params, cfg, draft_params, draft_cfg, [[1]], k=k)
    short = get_config("llama-tiny", max_seq_len=32, **DRAFT_SHAPE)
    with pytest.raises(GenerationError, match="draft model's context window of 32 tokens leaves room for 12"):
        speculative_generate(params, cfg, None, short, [[1] * 20], k=4,
                             max_new_tokens=16)
    with pytest.raises(GenerationError, match="target model's context window of 64 tokens leaves room for 40"):
        speculative_generate(params, cfg, draft_params, draft_cfg, [[1] * 41], k=8, max_new_tokens=16)
    with pytest.raises(GenerationError, match="penalties are not supported"):
        speculative_generate(params, cfg, draft_params, draft_cfg, [[1]],
                             max_new_tokens=8, sampling=SamplingConfig(repetition_penalty=1.2))
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        speculative_generate(params, cfg, draft_params, draft_cfg, [[]], max_new_tokens=8)
