"""Generation with a KV cache, on the device: prefill the prompts, then a `lax.while_loop` of decode steps.

    out = generate(params, cfg, [[5, 17, 3], [8]], max_new_tokens=32,
                   sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=1), eos_id=0)
    out.tokens          # [[...], [...]] generated ids per prompt (EOS included when it ended the row)
    out.finish_reasons  # ["eos" | "stop" | "length" | "constraint", ...]

The whole loop is one compiled program: sampling (llmjax.infer.sampling), stopping (EOS, stop strings,
max tokens), constraints (llmjax.infer.constrained) and the cache update all run on the device; the host
sees the tokens when the loop ends, or as they come through `stream` (an ordered io_callback).

Prompts of different lengths share one batch, padded on the left (default) or right; the cache records
each token's position, so padding changes no result. Stop strings are matched on the decoded bytes by an
automaton over the vocabulary, so a stop string split across tokens still stops the row.

`continuation` / `greedy_continuation` are the one-prompt helpers the trainer's samples use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from llmjax.config import ModelConfig
from llmjax.infer import kv_cache
from llmjax.infer.decode_model import decode_step, prefill, prepare_params
from llmjax.infer.sampling import SamplingConfig, SamplingFeatures, batch_sampling, choose
from llmjax.kernels.platform import compiler_options, compute_platform

FINISH_REASONS = ("running", "eos", "stop", "length", "constraint")


class GenerationError(ValueError):
    """A generation request that cannot be served as asked."""


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    finish_reasons: list[str]


# --- input checks ---------------------------------------------------------------------------

def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, *,
                  truncate: bool = False) -> list[list[int]]:
    """Validate prompts (and cut them from the left to fit when truncate=True); one clear error each."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if max_new_tokens >= cfg.max_seq_len:
        raise GenerationError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context window of "
            f"{cfg.max_seq_len} tokens (max_seq_len); ask for fewer tokens")
    if len(prompts) == 0:
        raise GenerationError("no prompts given")
    checked = []
    for index, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise GenerationError(f"prompt {index} is empty; give at least one token (e.g. the BOS / end-of-text id)")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        room = cfg.max_seq_len - max_new_tokens
        if len(prompt) > room:
            if not truncate:
                raise GenerationError(
                    f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} the context window "
                    f"of {cfg.max_seq_len} tokens leaves room for {room}: shorten the prompt, ask for fewer tokens, "
                    f"or pass truncate=True to keep its last {room} tokens")
            prompt = prompt[-room:]
        checked.append(prompt)
    return checked


def pad_prompts(prompts: list[list[int]], padding: str = "left", multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [batch, seq] int32, valid [batch, seq] bool): seq rounded up to `multiple` (fewer compiles)."""
    if padding not in ("left", "right"):
        raise GenerationError(f"padding={padding!r}: expected 'left' or 'right'")
    seq = -(-max(map(len, prompts)) // multiple) * multiple
    tokens = np.zeros((len(prompts), seq), np.int32)
    valid = np.zeros((len(prompts), seq), bool)
    for row, prompt in enumerate(prompts):
        span = slice(seq - len(prompt), seq) if padding == "left" else slice(0, len(prompt))
        tokens[row, span] = prompt
        valid[row, span] = True
    return tokens, valid


# --- the device loop --------------------------------------------------------------------------

def _text_prefill(dparams, tokens, valid, cache, context, cfg: ModelConfig):
    logits, cache = prefill(dparams, tokens, valid, cache, cfg)
    return logits, cache, None


def _text_decode(dparams, tokens, cache, context, carried, cfg: ModelConfig, impl: str):
    return decode_step(dparams, tokens, cache, cfg, impl)


@dataclass(frozen=True)
class DecodeModel:
    """What the generation loop runs: `prefill(dparams, tokens, valid, cache, context, cfg) -> (logits [batch,
    padded_vocab], cache, carried)` and `decode(dparams, tokens [batch], cache, context, carried, cfg, impl) ->
    (logits, cache)`. The text decoder's (TEXT_MODEL) ignores `context` and carries nothing; the VLM's
    (llmjax.infer.vlm) reads its cross-attention keys / values from `context` and carries each row's image."""

    prefill: Callable
    decode: Callable


TEXT_MODEL = DecodeModel(_text_prefill, _text_decode)


@dataclass(frozen=True)
class LoopOptions:
    """Everything static about a generation program."""

    max_new_tokens: int
    features: SamplingFeatures
    eos_id: int | None = None
    constrained: bool = False
    stop_strings: bool = False
    decode_impl: str = "auto"
    stream: Callable | None = None
    model: DecodeModel = TEXT_MODEL
    keep_logits: bool = False  # also return every step's logits, float32 [max_new, batch, padded_vocab] (tests)


def _generation_loop(dparams, tokens, valid, cache, arrays, constraint, stop, context, cfg: ModelConfig,
                     options: LoopOptions):
    """Prefill + while_loop of (choose, stop checks, decode step). Returns (out [batch, max_new], lengths, reasons,
    the kept logits or None)."""
    batch = tokens.shape[0]
    vocab = cfg.padded_vocab_size
    max_new = options.max_new_tokens
    model = options.model
    logits, cache, carried = model.prefill(dparams, tokens, valid, cache, context, cfg)
    rows = jnp.arange(batch)
    state = {
        "step": jnp.int32(0),
        "cache": cache,
        "carried": carried,
        "logits": logits,
        "out": jnp.full((batch, max_new), -1, jnp.int32),
        "done": jnp.zeros((batch,), bool),
        "reason": jnp.zeros((batch,), jnp.int32),
    }
    if options.keep_logits:
        state["kept"] = jnp.zeros((max_new, batch, vocab), jnp.float32)
    if options.features.penalties:
        state["seen"] = jnp.zeros((batch, vocab), bool).at[rows[:, None], tokens].max(valid)
        state["counts"] = jnp.zeros((batch, vocab), jnp.int32)
    if options.constrained:
        state["automaton"] = constraint["initial"]
    if options.stop_strings:
        state["stop"] = jnp.zeros((batch,), jnp.int32)

    def body(state):
        step, done = state["step"], state["done"]
        allowed = None
        if options.constrained:
            remaining = max_new - step - 1  # tokens still allowed after this one
            targets = constraint["next"][state["automaton"]]  # [batch, vocab]
            reachable = targets >= 0
            allowed = reachable & (constraint["distance"][jnp.maximum(targets, 0)] <= remaining)
            if options.eos_id is not None:
                allowed = allowed.at[:, options.eos_id].set(constraint["accepting"][state["automaton"]])
        token = choose(state["logits"], arrays, options.features, step, allowed=allowed,
                       seen=state.get("seen"), generated_counts=state.get("counts"))
        token = jnp.where(done, 0, token)
        new = dict(state)
        if options.keep_logits:
            new["kept"] = state["kept"].at[step].set(state["logits"].astype(jnp.float32))
        new["out"] = state["out"].at[:, step].set(jnp.where(done, -1, token))
        reason = state["reason"]
        finished = jnp.zeros_like(done)
        if options.eos_id is not None:
            hit = token == options.eos_id
            reason = jnp.where(~done & hit & (reason == 0), 1, reason)
            finished |= hit
        if options.stop_strings:
            hit = stop["hit"][state["stop"], token]
            new["stop"] = stop["next"][state["stop"], token]
            reason = jnp.where(~done & ~finished & hit, 2, reason)
            finished |= hit
        if options.constrained:
            is_eos = (token == options.eos_id) if options.eos_id is not None else jnp.zeros_like(done)
            moved = jnp.where(is_eos | done, state["automaton"], constraint["next"][state["automaton"], token])
            new["automaton"] = moved
            stuck = constraint["accepting"][moved] & ~jnp.any(constraint["next"][moved] >= 0, axis=-1)
            reason = jnp.where(~done & ~finished & stuck, 4, reason)
            finished |= stuck
        last = step + 1 >= max_new
        reason = jnp.where(~done & ~finished & last, 3, reason)
        new["reason"] = reason
        new["done"] = done | finished | last
        if options.features.penalties:
            new["seen"] = state["seen"].at[rows, token].max(~done)
            new["counts"] = state["counts"].at[rows, token].add((~done).astype(jnp.int32))
        if options.stream is not None:
            io_callback(options.stream, None, step, jnp.where(done, -1, token), ordered=True)
        new["logits"], new["cache"] = model.decode(dparams, token, state["cache"], context, state["carried"], cfg,
                                                   options.decode_impl)
        new["step"] = step + 1
        return new

    def cond(state):
        return (state["step"] < max_new) & ~jnp.all(state["done"])

    state = jax.lax.while_loop(cond, body, state)
    lengths = jnp.sum(state["out"] >= 0, axis=1)
    return state["out"], lengths, state["reason"], state.get("kept")


@functools.lru_cache(maxsize=64)
def compiled_loop(cfg: ModelConfig, options: LoopOptions, platform: str):
    """The generation program, with the XLA options of the platform it runs on (kernels.platform.compiler_options):
    (dparams, tokens, valid, cache, sampling arrays, constraint tables, stop tables, context) -> (out, lengths,
    reasons, kept logits)."""
    loop = functools.partial(_generation_loop, cfg=cfg, options=options)
    return jax.jit(loop, compiler_options=compiler_options(platform) or None)


# --- the entry point ----------------------------------------------------------------------------

def generate(
    params: dict,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
    eos_id: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    constraint=None,
    padding: str = "left",
    truncate: bool = False,
    cache_dtype: str | None = None,
    decode_impl: str = "auto",
    prepared: dict | None = None,
    stream: Callable | None = None,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids), all rows in one batch.

    sampling: one SamplingConfig for all rows or one per row (default: greedy).
    eos_id: a row stops after producing it. stop_strings: a row stops once its output text contains one
        (needs `tokenizer`; matched across token boundaries).
    constraint: a `constrained.TokenAutomaton` (or one per row) the output must follow (regex, JSON
        schema, allowed tokens, forced prefix); rows end in an accepting state.
    truncate: cut prompts that do not fit the context window from the left instead of raising.
    cache_dtype: "int8" for the quantized cache (default: the compute dtype).
    prepared: the output of `prepare_params(params, cfg)`, to reuse across calls.
    stream: called on the host as stream(step, tokens [batch]) after every step (-1 for finished rows).
    """
    prompts = check_prompts(prompts, cfg, max_new_tokens, truncate=truncate)
    batch = len(prompts)
    if sampling is None:
        sampling = SamplingConfig.greedy()
    configs = [sampling] * batch if isinstance(sampling, SamplingConfig) else list(sampling)
    if len(configs) != batch:
        raise GenerationError(f"{len(configs)} sampling configs for {batch} prompts; give one, or one per prompt")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise GenerationError(f"eos_id={eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    arrays, features = batch_sampling(configs, cfg.vocab_size, cfg.padded_vocab_size)

    stop = None
    if stop_strings:
        if tokenizer is None:
            raise GenerationError("stop_strings need the tokenizer, to match text across token boundaries")
        from llmjax.infer.constrained import stop_string_automaton

        stop = stop_string_automaton(list(stop_strings), tokenizer, cfg.padded_vocab_size).arrays()
    tables = None
    if constraint is not None:
        from llmjax.infer.constrained import batch_automata

        automata = constraint if isinstance(constraint, (list, tuple)) else [constraint] * batch
        if len(automata) != batch:
            raise GenerationError(f"{len(automata)} constraints for {batch} prompts; give one, or one per prompt")
        tables = batch_automata(automata, cfg.padded_vocab_size, max_new_tokens, eos_id)

    tokens, valid = pad_prompts(prompts, padding)
    capacity = kv_cache.cache_capacity(cfg, tokens.shape[1] + max_new_tokens, multiple=64)
    cache = kv_cache.init_cache(cfg, batch, capacity, cache_dtype)
    dparams = prepared if prepared is not None else _prepare_jit(params, cfg)
    options = LoopOptions(max_new_tokens=max_new_tokens, features=features, eos_id=eos_id,
                          constrained=tables is not None, stop_strings=stop is not None, decode_impl=decode_impl,
                          stream=stream)
    platform = compute_platform(dparams)
    out, lengths, reasons, _ = compiled_loop(cfg, options, platform)(
        dparams, jnp.asarray(tokens), jnp.asarray(valid), cache, arrays, tables, stop, None)
    return generation_output(out, lengths, reasons)


def generation_output(out, lengths, reasons) -> GenerationOutput:
    """The loop's (out [batch, max_new], lengths, reasons) as lists for people."""
    out, lengths, reasons = np.asarray(out), np.asarray(lengths), np.asarray(reasons)
    return GenerationOutput(tokens=[out[row, : lengths[row]].tolist() for row in range(len(out))],
                            finish_reasons=[FINISH_REASONS[r] for r in reasons])


_prepare_jit = jax.jit(prepare_params, static_argnames=("cfg",))


# --- the trainer's helpers ----------------------------------------------------------------------

def continuation(params, cfg: ModelConfig, prompt_ids: list[int], num_tokens: int, *,
                 temperature: float = 0.0, seed: int = 0) -> list[int]:
    """The next `num_tokens` ids after a prompt (cut from the left to fit the context window, leaving
    room): greedy when temperature is 0, else sampled at that temperature with the given seed."""
    if not prompt_ids:
        raise GenerationError("continuation needs a prompt of at least one token")
    num_tokens = min(num_tokens, cfg.max_seq_len - 1)
    prompt_ids = prompt_ids[-max(1, cfg.max_seq_len - num_tokens):]
    num_tokens = min(num_tokens, cfg.max_seq_len - len(prompt_ids))
    sampling = SamplingConfig(temperature=temperature, seed=seed)
    return generate(params, cfg, [prompt_ids], max_new_tokens=num_tokens, sampling=sampling).tokens[0]


def greedy_continuation(params, cfg: ModelConfig, prompt_ids: list[int], num_tokens: int) -> list[int]:
    return continuation(params, cfg, prompt_ids, num_tokens)
