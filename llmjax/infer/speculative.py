"""Speculative decoding with a draft model: the draft proposes k tokens, the target checks them in one pass.

    out = speculative_generate(target_params, target_cfg, draft_params, draft_cfg, [[5, 17, 3]], k=4,
                               max_new_tokens=64, sampling=SamplingConfig(temperature=0.8, seed=1))
    out.tokens, out.finish_reasons, out.stats.acceptance_rate, out.stats.tokens_per_target_call

A round (Leviathan et al. 2023, "Fast inference from transformers via speculative decoding"; Chen et
al. 2023, "Accelerating large language model decoding with speculative sampling"):

1. The draft samples d_1..d_k autoregressively from its distributions q_1..q_k (its own KV cache).
2. The target runs once over [last, d_1, ..., d_k] (`decode_model.extend_step`): p_1..p_{k+1}.
3. Draft d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), left to right; at the first
   rejection the token is drawn from normalize(max(0, p_i - q_i)); when all k are accepted a bonus
   token comes from p_{k+1}. Every emitted token is then distributed exactly as the target's p.
4. Both caches forget the rejected tokens (`kv_cache.rewind`: bookkeeping only, no copies).

p and q are the distributions `generate` samples from (llmjax.infer.sampling: logit bias, temperature,
top-k, top-p, min-p, processed alike for both models), so the text follows `generate`'s distribution.
Greedy rows (temperature 0) use one-hot distributions at the argmax, which turns the same rule into
greedy verification: a draft is kept while it equals the target's argmax, then the target's argmax
follows, so the output is plain greedy `generate`'s token for token (a batch of greedy rows only takes
that shortcut directly: `greedy_verify`, no distributions, no random keys). `extend_step` computes each
verified position as `decode_step` would, bit for bit on one device (same GEMM shapes up to 8 tokens, same
attention kernel and split layout), so in bf16 too the target's argmaxes are `generate`'s.

Cache invariant between rounds: the target's cache holds every token but the last one emitted; the
draft's holds all but the last two (it re-reads [previous, last] in a 2-token extend, so a round whose
k drafts were all accepted costs it no extra step). Per round: k draft passes, one target pass.
The whole loop (prefills, rounds, stopping on EOS / max tokens) is one jitted `lax.while_loop`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.infer import kv_cache
from llmjax.infer.decode_model import decode_step, extend_step, prefill, prepare_params
from llmjax.infer.generate import FINISH_REASONS, GenerationError, check_prompts, pad_prompts
from llmjax.infer.sampling import SamplingArrays, SamplingConfig, SamplingFeatures, batch_sampling, choose, \
    token_distribution

EOS, LENGTH = FINISH_REASONS.index("eos"), FINISH_REASONS.index("length")


@dataclass(frozen=True)
class SpeculativeStats:
    """Counts summed over the rows of a batch."""

    rounds: int  # draft-and-verify rounds (target passes after the prefill), summed over rows
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens the target accepted
    generated: int  # tokens emitted (drafts kept + one target token per round + the prefill's token)
    target_calls: int  # target forward passes: the prefill + one per round, summed over rows

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.generated / self.target_calls if self.target_calls else 0.0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "generated": self.generated,
                "target_calls": self.target_calls, "acceptance_rate": self.acceptance_rate,
                "tokens_per_target_call": self.tokens_per_target_call}


@dataclass
class SpeculativeOutput:
    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" | "length"
    stats: SpeculativeStats


# --- one round's pieces (pure functions, tested on their own) -----------------------------------------

def probabilities(logits: jax.Array, arrays: SamplingArrays, features: SamplingFeatures) -> jax.Array:
    """logits [batch, n, vocab] -> the distributions `generate` samples from, [batch, n, vocab] float32:
    processed (logit bias, temperature, top-k / top-p / min-p) and normalized for sampled rows, one-hot at
    the argmax for greedy rows (temperature 0)."""
    processed = jax.vmap(lambda x: token_distribution(x, arrays, features), in_axes=1, out_axes=1)(logits)
    biased = logits + arrays.logit_bias[:, None] if features.logit_bias else logits
    greedy = jax.nn.one_hot(jnp.argmax(biased, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(arrays.temperature[:, None, None] > 0, processed, greedy)


def greedy_tokens(logits: jax.Array, arrays: SamplingArrays, features: SamplingFeatures) -> jax.Array:
    """logits [batch, n, vocab] -> [batch, n] int32: where `probabilities` puts its one-hot for greedy rows."""
    biased = logits + arrays.logit_bias[:, None] if features.logit_bias else logits
    return jnp.argmax(biased, axis=-1).astype(jnp.int32)


def greedy_verify(target_tokens: jax.Array, draft_tokens: jax.Array):
    """`verify` for one-hot distributions, without them: target_tokens [batch, k + 1] (the target's argmaxes),
    draft_tokens [batch, k] -> (accepted [batch]: the leading drafts equal to the target's token,
    next_token [batch]: the target's token after them)."""
    k = draft_tokens.shape[1]
    kept = draft_tokens == target_tokens[:, :k]
    accepted = jnp.sum(jnp.cumprod(kept, axis=1), axis=1).astype(jnp.int32)
    return accepted, jnp.take_along_axis(target_tokens, accepted[:, None], axis=1)[:, 0]


def sample(probs: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row from probs [batch, vocab] with keys [batch] -> [batch] int32."""
    draw = jax.vmap(lambda key, p: jax.random.categorical(key, jnp.log(p)))
    return draw(keys, probs).astype(jnp.int32)


def verify(target_probs: jax.Array, draft_probs: jax.Array, draft_tokens: jax.Array, keys: jax.Array):
    """Rejection sampling of k drafts (Leviathan et al. 2023, Algorithm 1).

    target_probs [batch, k + 1, vocab] (p_1..p_{k+1}), draft_probs [batch, k, vocab] (q_1..q_k), draft_tokens
    [batch, k] (d_i drawn from q_i), keys [batch]. Returns (accepted [batch] int32: how many leading drafts
    are kept, next_token [batch] int32: drawn from normalize(max(0, p - q)) at the first rejection, from
    p_{k+1} when all k were kept)."""
    batch, k = draft_tokens.shape
    uniform_keys, residual_keys = jnp.moveaxis(jax.vmap(lambda key: jax.random.split(key))(keys), 1, 0)
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(uniform_keys)  # [batch, k] in [0, 1)
    p_draft = jnp.take_along_axis(target_probs[:, :k], draft_tokens[..., None], axis=-1)[..., 0]  # [batch, k]
    q_draft = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
    kept = uniform * q_draft < p_draft  # probability min(1, p / q)
    accepted = jnp.sum(jnp.cumprod(kept, axis=1), axis=1).astype(jnp.int32)  # the leading run of kept drafts
    no_draft = jnp.zeros_like(draft_probs[:, :1])  # after k accepted drafts the residual is p_{k+1} itself
    q_padded = jnp.concatenate([draft_probs, no_draft], axis=1)  # [batch, k + 1, vocab]
    at = accepted[:, None, None]
    p_next = jnp.take_along_axis(target_probs, at, axis=1)[:, 0]  # [batch, vocab]
    residual = jnp.maximum(p_next - jnp.take_along_axis(q_padded, at, axis=1)[:, 0], 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_next)  # p == q up to rounding
    return accepted, sample(residual, residual_keys)


# --- the device loop --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpeculativeOptions:
    """Everything static about a speculative program."""

    k: int
    max_new_tokens: int
    features: SamplingFeatures
    decode_impl: str = "auto"
    greedy: bool = False  # every row at temperature 0: argmaxes and `greedy_verify`, no distributions or keys


def _round_keys(seeds: jax.Array, generated: jax.Array, k: int) -> jax.Array:
    """Per row, k draft keys and one verification key [k + 1, batch] from (its seed, tokens generated so far):
    a row's randomness depends on nothing else in the batch, and `generated` grows every round."""
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, generated + 2**30)
    return jnp.moveaxis(jax.vmap(lambda key: jax.random.split(key, k + 1))(keys), 1, 0)


def _draft(dparams, cache, previous, last, keys, arrays, cfg: ModelConfig, options: SpeculativeOptions):
    """k draft tokens [batch, k] and their distributions [batch, k, vocab] (None when options.greedy); the
    cache gains k + 1 entries ([previous, last, d_1..d_{k-1}]). The k - 1 decode steps are unrolled: k is
    small, and a device loop would add a loop's bookkeeping to every draft step."""
    vocab = cfg.vocab_size

    def pick(logits, key):  # logits [batch, 1, vocab] -> (token [batch], its distribution [batch, vocab] or None)
        if options.greedy:
            return greedy_tokens(logits, arrays, options.features)[:, 0], None
        probs = probabilities(logits, arrays, options.features)[:, 0]
        return sample(probs, key), probs

    logits, cache = extend_step(dparams, jnp.stack([previous, last], axis=1), cache, cfg, options.decode_impl)
    token, probs = pick(logits[:, 1:, :vocab], keys[0])
    tokens, all_probs = [token], [probs]
    for index in range(1, options.k):
        logits, cache = decode_step(dparams, token, cache, cfg, options.decode_impl)
        token, probs = pick(logits[:, None, :vocab], keys[index])
        tokens.append(token)
        all_probs.append(probs)
    return jnp.stack(tokens, axis=1), None if options.greedy else jnp.stack(all_probs, axis=1), cache


def _speculative_loop(target_params, draft_params, tokens, valid, target_cache, draft_cache, arrays, eos_id,
                      target_cfg: ModelConfig, draft_cfg: ModelConfig, options: SpeculativeOptions):
    """Prefill both models, then rounds until every row has stopped (eos_id: int32 scalar, -1 for none).
    Returns (out [batch, max_new], lengths, reasons, per-row counts {rounds, accepted})."""
    batch, k, max_new = tokens.shape[0], options.k, options.max_new_tokens
    vocab = target_cfg.vocab_size
    logits, target_cache = prefill(target_params, tokens, valid, target_cache, target_cfg)
    _, draft_cache = prefill(draft_params, tokens, valid, draft_cache, draft_cfg)
    draft_cache = kv_cache.rewind(draft_cache, jnp.ones((batch,), jnp.int32))  # the draft re-reads the prompt's last
    first = choose(logits[:, :vocab], arrays, options.features, 0)  # `generate`'s first step (greedy: the same token)
    reason = jnp.where(first == eos_id, EOS, LENGTH if max_new <= 1 else 0).astype(jnp.int32)
    rows = jnp.arange(batch)
    state = {
        "target_cache": target_cache, "draft_cache": draft_cache,
        "previous": tokens[:, -1], "last": first,  # prompts are left-padded: their last token ends the row
        "out": jnp.full((batch, max_new), -1, jnp.int32).at[:, 0].set(first),
        "generated": jnp.ones((batch,), jnp.int32), "done": reason > 0, "reason": reason,
        "rounds": jnp.zeros((batch,), jnp.int32), "accepted": jnp.zeros((batch,), jnp.int32),
    }

    def body(state):
        generated, done = state["generated"], state["done"]
        keys = _round_keys(arrays.seed, generated, k)
        drafts, draft_probs, draft_cache = _draft(draft_params, state["draft_cache"], state["previous"],
                                                  state["last"], keys, arrays, draft_cfg, options)
        candidates = jnp.concatenate([state["last"][:, None], drafts], axis=1)  # [batch, k + 1]
        logits, target_cache = extend_step(target_params, candidates, state["target_cache"], target_cfg,
                                           options.decode_impl)
        if options.greedy:
            accepted, next_token = greedy_verify(greedy_tokens(logits[..., :vocab], arrays, options.features), drafts)
        else:
            target_probs = probabilities(logits[..., :vocab], arrays, options.features)
            accepted, next_token = verify(target_probs, draft_probs, drafts, keys[k])
        # Emitted this round: d_1..d_a, then next_token; cut after an EOS and at max_new_tokens.
        index = jnp.arange(k + 1)[None, :]
        emitted = jnp.where(index == accepted[:, None], next_token[:, None], jnp.pad(drafts, ((0, 0), (0, 1))))
        count = jnp.minimum(accepted + 1, max_new - generated)
        is_eos = (emitted == eos_id) & (index < count[:, None])
        hit = jnp.any(is_eos, axis=1)
        count = jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, count)
        reason = jnp.where(~done & hit, EOS, state["reason"])
        count = jnp.where(done, 0, count)
        new_generated = generated + count
        reason = jnp.where(~done & (reason == 0) & (new_generated >= max_new), LENGTH, reason)
        slots = jnp.where(index < count[:, None], generated[:, None] + index, max_new)  # max_new: dropped
        out = state["out"].at[rows[:, None], slots].set(emitted, mode="drop")
        # Both caches gained k + 1 entries; keep 1 + a (finished rows: none, so they stop growing).
        drop = jnp.where(done, k + 1, k - accepted)
        kept_draft = jnp.take_along_axis(drafts, jnp.maximum(accepted - 1, 0)[:, None], axis=1)[:, 0]
        return {
            "target_cache": kv_cache.rewind(target_cache, drop), "draft_cache": kv_cache.rewind(draft_cache, drop),
            "previous": jnp.where(accepted > 0, kept_draft, state["last"]), "last": next_token,
            "out": out, "generated": new_generated, "done": done | (reason > 0), "reason": reason,
            "rounds": state["rounds"] + (~done), "accepted": state["accepted"] + jnp.where(done, 0, accepted),
        }

    state = jax.lax.while_loop(lambda state: ~jnp.all(state["done"]), body, state)
    return state["out"], state["generated"], state["reason"], {"rounds": state["rounds"], "accepted": state["accepted"]}


@functools.lru_cache(maxsize=64)
def _compiled_loop(target_cfg: ModelConfig, draft_cfg: ModelConfig, options: SpeculativeOptions):
    loop = functools.partial(_speculative_loop, target_cfg=target_cfg, draft_cfg=draft_cfg, options=options)
    return jax.jit(loop)


# --- the entry point ----------------------------------------------------------------------------------

def check_models(target_cfg: ModelConfig, draft_cfg: ModelConfig, k: int) -> None:
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise GenerationError(f"k={k}: the draft must propose at least one token per round (k >= 1)")
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise GenerationError(
            f"the draft model's vocabulary has {draft_cfg.vocab_size} tokens and the target's {target_cfg.vocab_size}: "
            f"speculative decoding needs both models on the same tokenizer")


def check_room(prompts: list[list[int]], cfg: ModelConfig, role: str, max_new_tokens: int, k: int) -> None:
    """A round may run k tokens past the last one kept: each prompt + max_new_tokens + k must fit the context."""
    room = cfg.max_seq_len - max_new_tokens - k
    for index, prompt in enumerate(prompts):
        if len(prompt) > room:
            raise GenerationError(
                f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} and k={k} drafts the "
                f"{role} model's context window of {cfg.max_seq_len} tokens leaves room for {max(room, 0)}: shorten "
                f"the prompt, ask for fewer tokens or use a smaller k")


def speculative_capacity(cfg: ModelConfig, total_length: int, k: int, multiple: int = 64) -> int:
    """Cache slots: every token, or for a sliding window the window plus the k + 1 a round may write and forget."""
    needed = total_length if cfg.sliding_window is None else min(total_length, cfg.sliding_window + k + 1)
    return -(-needed // multiple) * multiple


def speculative_generate(
    target_params: dict,
    target_cfg: ModelConfig,
    draft_params: dict,
    draft_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    k: int = 4,
    max_new_tokens: int = 64,
    sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
    eos_id: int | None = None,
    cache_dtype: str | None = None,
    decode_impl: str = "auto",
    target_prepared: dict | None = None,
    draft_prepared: dict | None = None,
) -> SpeculativeOutput:
    """Generate up to `max_new_tokens` after each prompt with the target model, k draft tokens per round.

    sampling: one SamplingConfig for all rows or one per row (default greedy); logit bias, temperature,
        top-k, top-p and min-p are kept exactly; the repetition / presence / frequency penalties are not
        supported (they change within a round).
    target_prepared / draft_prepared: `prepare_params` outputs to reuse across calls.
    Returns the tokens (EOS included when it ended the row), finish reasons and acceptance statistics.
    """
    check_models(target_cfg, draft_cfg, k)
    prompts = check_prompts(prompts, target_cfg, max_new_tokens)
    check_room(prompts, target_cfg, "target", max_new_tokens, k)
    check_room(prompts, draft_cfg, "draft", max_new_tokens, k)
    batch = len(prompts)
    configs = [sampling or SamplingConfig.greedy()] * batch if not isinstance(sampling, (list, tuple)) else list(sampling)
    if len(configs) != batch:
        raise GenerationError(f"{len(configs)} sampling configs for {batch} prompts; give one, or one per prompt")
    if eos_id is not None and not 0 <= eos_id < target_cfg.vocab_size:
        raise GenerationError(f"eos_id={eos_id} is outside the vocabulary [0, {target_cfg.vocab_size})")
    vocab = target_cfg.vocab_size
    arrays, features = batch_sampling(configs, vocab, vocab)  # both models' logits are cut to the vocabulary
    if features.penalties:
        raise GenerationError("speculative decoding keeps logit bias, temperature, top-k, top-p and min-p; the "
                              "repetition / presence / frequency penalties are not supported: use generate")

    tokens, valid = pad_prompts(prompts, "left")
    total = tokens.shape[1] + max_new_tokens + k + 1
    target_cache = kv_cache.init_cache(target_cfg, batch, speculative_capacity(target_cfg, total, k), cache_dtype)
    draft_cache = kv_cache.init_cache(draft_cfg, batch, speculative_capacity(draft_cfg, total, k), cache_dtype)
    target_prepared = target_prepared if target_prepared is not None else _prepare_jit(target_params, target_cfg)
    draft_prepared = draft_prepared if draft_prepared is not None else _prepare_jit(draft_params, draft_cfg)
    options = SpeculativeOptions(k=int(k), max_new_tokens=max_new_tokens, features=features, decode_impl=decode_impl,
                                 greedy=all(config.temperature == 0 for config in configs))
    out, lengths, reasons, counts = _compiled_loop(target_cfg, draft_cfg, options)(
        target_prepared, draft_prepared, jnp.asarray(tokens), jnp.asarray(valid), target_cache, draft_cache, arrays,
        jnp.int32(-1 if eos_id is None else eos_id))
    out, lengths, reasons = np.asarray(out), np.asarray(lengths), np.asarray(reasons)
    rounds, accepted = np.asarray(counts["rounds"]), np.asarray(counts["accepted"])
    stats = SpeculativeStats(rounds=int(rounds.sum()), drafted=int(k * rounds.sum()), accepted=int(accepted.sum()),
                             generated=int(lengths.sum()), target_calls=int(rounds.sum() + batch))
    return SpeculativeOutput(tokens=[out[row, : lengths[row]].tolist() for row in range(batch)],
                             finish_reasons=[FINISH_REASONS[r] for r in reasons], stats=stats)


_prepare_jit = jax.jit(prepare_params, static_argnames=("cfg",))
