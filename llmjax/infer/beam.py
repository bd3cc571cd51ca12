"""Beam search on the device, with length penalty and early stopping, and diverse (group) beam search.

    out = beam_search(params, cfg, [[5, 17, 3]], num_beams=4, max_new_tokens=20, eos_id=0)
    out.sequences[0]   # num_beams finished hypotheses of prompt 0, best first
    out.scores[0]      # their scores: sum of token log-probabilities / generated_length ** length_penalty

The algorithm is Hugging Face's static-shape beam search (transformers >= 4.50, `_beam_search`), so
outputs agree with `model.generate(num_beams=...)` token for token: every step keeps the top
2 * num_beams continuations of all beams, sends those ending in EOS (or reaching the length limit) among
the top num_beams to the finished pool, scored sum_logprobs / length ** length_penalty, and continues
the best num_beams unfinished ones. early_stopping: True stops a prompt once num_beams hypotheses are
finished; False stops when the best running beam, scored at its current length, cannot beat the worst
finished one; "never" scores it at the longest possible length when length_penalty > 0.

Diverse beam search (Vijayakumar et al. 2016): the beams split into `num_groups` groups that step one
after another; a group's log-probabilities are lowered by diversity_penalty times the number of times
each token was just chosen by the groups before it (Hamming diversity). Each group keeps its own
finished pool; the result merges them by score.

The KV cache holds batch * num_beams rows; each step gathers the rows of the surviving beams' parents.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.infer import kv_cache
from llmjax.infer.decode_model import decode_step, prefill
from llmjax.infer.generate import GenerationError, _prepare_jit, check_prompts, pad_prompts

LARGE_NEGATIVE = -1.0e9  # Hugging Face's marker for "cannot be chosen"


@dataclass
class BeamOutput:
    sequences: list[list[list[int]]]  # [prompt][hypothesis] -> generated ids, best first
    scores: list[list[float]]


@dataclass(frozen=True)
class BeamOptions:
    num_beams: int
    num_groups: int
    max_new_tokens: int
    eos_id: int | None
    early_stopping: bool | str
    diverse: bool  # diversity_penalty > 0 (its value is an argument: no recompiling per setting)
    decode_impl: str = "auto"


def _gather(x, index):
    """x [batch, beams, ...] gathered along beams by index [batch, k] -> [batch, k, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _group_step(group: dict, log_probs, t, length_penalty, options: BeamOptions):
    """One step of one group. log_probs [batch, beams_per_group, vocab]; t tokens generated so far.

    Returns (group state, parent beam [batch, beams_per_group], next token [batch, beams_per_group])."""
    batch, beams, vocab = log_probs.shape
    keep = 2 * beams  # Hugging Face: max(2, 1 + number of EOS ids) * beams
    max_new = options.max_new_tokens
    scores = (log_probs + group["running_scores"][:, :, None]).reshape(batch, beams * vocab)
    topk_scores, topk_index = jax.lax.top_k(scores, keep)
    topk_beam, topk_token = topk_index // vocab, topk_index % vocab
    topk_sequences = _gather(group["running"], topk_beam).at[:, :, t].set(topk_token)
    hits = jnp.broadcast_to(t + 1 >= max_new, topk_token.shape)
    if options.eos_id is not None:
        hits = hits | (topk_token == options.eos_id)

    # Running beams for the next step: the best unfinished continuations.
    running_scores = topk_scores + hits * LARGE_NEGATIVE
    _, next_index = jax.lax.top_k(running_scores, beams)
    new = dict(group)
    new["running"] = _gather(topk_sequences, next_index)
    new["running_scores"] = _gather(running_scores, next_index)
    parent = _gather(topk_beam, next_index)

    # Finished pool: merge the newly finished among the top `beams` continuations, keep the best.
    in_top = jnp.arange(keep) < beams
    just_finished = hits & in_top[None, :]
    finished_scores = topk_scores / ((t + 1.0) ** length_penalty)
    full = jnp.all(group["finished"], axis=-1, keepdims=True) & (options.early_stopping is True)
    finished_scores += full * LARGE_NEGATIVE
    finished_scores += ~group["improvable"] * LARGE_NEGATIVE
    finished_scores += ~just_finished * LARGE_NEGATIVE
    merged_sequences = jnp.concatenate([group["sequences"], topk_sequences], axis=1)
    merged_scores = jnp.concatenate([group["scores"], finished_scores], axis=1)
    merged_finished = jnp.concatenate([group["finished"], just_finished], axis=1)
    _, best = jax.lax.top_k(merged_scores, beams)
    new["sequences"] = _gather(merged_sequences, best)
    new["scores"] = _gather(merged_scores, best)
    new["finished"] = _gather(merged_finished, best)

    # Can a running beam still beat the worst finished one?
    length = t + 1.0
    if options.early_stopping == "never":
        length = jnp.where(length_penalty > 0, float(max_new), length)
    best_possible = new["running_scores"][:, :1] / (length ** length_penalty)
    worst_finished = jnp.where(new["finished"], jnp.min(new["scores"], axis=1, keepdims=True), LARGE_NEGATIVE)
    new["improvable"] = group["improvable"] & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
    new["go_on"] = (jnp.any(new["improvable"]) & ~(jnp.all(new["finished"]) & (options.early_stopping is True))
                    & ~jnp.all(hits))
    return new, parent, new["running"][:, :, t]


def _beam_loop(dparams, tokens, valid, cache, length_penalty, diversity_penalty, cfg: ModelConfig,
               options: BeamOptions):
    batch = tokens.shape[0]
    groups, beams = options.num_groups, options.num_beams // options.num_groups
    total = options.num_beams
    max_new = options.max_new_tokens
    logits, cache = prefill(dparams, tokens, valid, cache, cfg)
    repeat = lambda x: jnp.repeat(x, total, axis=0)  # noqa: E731  [batch * num_beams, ...]
    cache = jax.tree.map(repeat, cache)
    logits = repeat(logits)

    def fresh_group():
        return {
            "running": jnp.full((batch, beams, max_new), -1, jnp.int32),
            "running_scores": jnp.zeros((batch, beams)).at[:, 1:].set(LARGE_NEGATIVE),
            "sequences": jnp.full((batch, beams, max_new), -1, jnp.int32),
            "scores": jnp.full((batch, beams), LARGE_NEGATIVE),
            "finished": jnp.zeros((batch, beams), bool),
            "improvable": jnp.ones((batch, 1), bool),
            "go_on": jnp.bool_(True),
        }

    state = {"t": jnp.int32(0), "cache": cache, "logits": logits,
             "groups": tuple(fresh_group() for _ in range(groups))}

    def body(state):
        t = state["t"]
        log_probs = jax.nn.log_softmax(state["logits"].astype(jnp.float32), axis=-1)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, groups, beams, vocab)
        chosen = jnp.zeros((batch, vocab), jnp.float32)  # tokens picked by earlier groups at this step
        new_groups, parents, next_tokens = [], [], []
        for g, group in enumerate(state["groups"]):
            lp = log_probs[:, g]
            if options.diverse:
                lp = lp - diversity_penalty * chosen[:, None, :]
            new, parent, token = _group_step(group, lp, t, length_penalty, options)
            new = jax.tree.map(lambda a, b: jnp.where(group["go_on"], a, b), new, group)  # a stopped group stays
            new_groups.append(new)
            parents.append(parent + g * beams)
            next_tokens.append(token)
            chosen = chosen.at[jnp.arange(batch)[:, None], token].add(1.0)
        parent = jnp.concatenate(parents, axis=1)  # [batch, num_beams], index within the prompt's beams
        rows = (jnp.arange(batch)[:, None] * total + parent).reshape(-1)
        token = jnp.maximum(jnp.concatenate(next_tokens, axis=1).reshape(-1), 0)
        cache = kv_cache.reorder(state["cache"], rows)
        logits, cache = decode_step(dparams, token, cache, cfg, options.decode_impl)
        return {"t": t + 1, "cache": cache, "logits": logits, "groups": tuple(new_groups)}

    def cond(state):
        go_on = functools.reduce(jnp.logical_or, [g["go_on"] for g in state["groups"]])
        return (state["t"] < max_new) & go_on

    state = jax.lax.while_loop(cond, body, state)
    sequences = jnp.concatenate([g["sequences"] for g in state["groups"]], axis=1)
    scores = jnp.concatenate([g["scores"] for g in state["groups"]], axis=1)
    order = jnp.argsort(-scores, axis=1, stable=True)
    return _gather(sequences, order), _gather(scores, order)


@functools.lru_cache(maxsize=32)
def _compiled(cfg: ModelConfig, options: BeamOptions):
    return jax.jit(functools.partial(_beam_loop, cfg=cfg, options=options))


def beam_search(
    params: dict,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_groups: int = 1,
    diversity_penalty: float = 0.0,
    padding: str = "left",
    truncate: bool = False,
    cache_dtype: str | None = None,
    decode_impl: str = "auto",
    prepared: dict | None = None,
) -> BeamOutput:
    """Beam search (num_groups > 1 with diversity_penalty > 0: diverse beam search) for each prompt."""
    if num_beams < 1:
        raise GenerationError(f"num_beams={num_beams}: must be >= 1")
    if num_groups < 1 or num_beams % num_groups:
        raise GenerationError(f"num_groups={num_groups} must divide num_beams={num_beams}")
    if early_stopping not in (True, False, "never"):
        raise GenerationError(f"early_stopping={early_stopping!r}: expected True, False or 'never'")
    if diversity_penalty < 0:
        raise GenerationError(f"diversity_penalty={diversity_penalty}: must be >= 0")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise GenerationError(f"eos_id={eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    prompts = check_prompts(prompts, cfg, max_new_tokens, truncate=truncate)
    tokens, valid = pad_prompts(prompts, padding)
    capacity = kv_cache.cache_capacity(cfg, tokens.shape[1] + max_new_tokens, multiple=64)
    cache = kv_cache.init_cache(cfg, len(prompts), capacity, cache_dtype)
    dparams = prepared if prepared is not None else _prepare_jit(params, cfg)
    options = BeamOptions(num_beams, num_groups, max_new_tokens, eos_id, early_stopping, diversity_penalty > 0,
                          decode_impl)
    sequences, scores = _compiled(cfg, options)(dparams, jnp.asarray(tokens), jnp.asarray(valid), cache,
                                                jnp.float32(length_penalty), jnp.float32(diversity_penalty))
    sequences, scores = np.asarray(sequences), np.asarray(scores)
    return BeamOutput(
        sequences=[[[int(t) for t in hyp if t >= 0] for hyp in row] for row in sequences],
        scores=[[float(s) for s in row] for row in scores],
    )
