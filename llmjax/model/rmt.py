"""Recurrent Memory Transformer (Bulatov et al. 2022, 2023: "Scaling Transformer to 1M tokens and beyond with RMT").

A long sequence is cut into segments of `segment_len` tokens. Each segment runs through an ordinary llmjax decoder
(any gpt2 / llama preset) with `memory_tokens` memory vectors before and after it (the paper's decoder variant):

    input  [read memory (M); token embeddings (L); write memory (M)]     M + L + M positions, causal attention
    output logits of the L token positions; the final hidden states of the M write positions become the memory
           (read and write) of the next segment.

Read and write placeholders are the same vectors (the current memory); the first segment's memory is the learned
params["memory"] [M, d_model]. Because attention is causal, the token positions see only the read memory (the past),
and the write positions see the whole segment: they are where the model summarizes it for what comes after.

`rmt_forward` scans the segments carrying the memory (one compiled segment, whatever the length), rematerializes
each segment in the backward pass (`jax.checkpoint`: activations of one segment alive at a time), and truncates
backpropagation through time to `bptt_segments` segments (the memory entering every K-th segment is a
`stop_gradient`). `rmt_generate` decodes greedily with the memory carried across segment boundaries.

Parameters: the backbone's (llmjax.model.transformer) plus
    memory     [memory_tokens, d_model]     the initial memory
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError, ModelConfig
from llmjax.model.transformer import (
    forward,
    hidden_states_from_embeddings,
    init_params,
    logits_from_hidden,
)
from llmjax.nn import embedding, token_cross_entropy


WRITE_SCALES = ("none", "embedding")


@dataclasses.dataclass(frozen=True)
class RmtConfig:
    """memory_tokens M (memory vectors read and written per segment), segment_len L (tokens per segment),
    bptt_segments K (gradients flow back through at most K segments of memory), write_scale: "none" (the written
    memory is the final-normed hidden state, RMS ~1 per component) or "embedding" (that times the token embedding
    table's RMS, so the memory a segment reads enters the stack at the tokens' scale, as the learned first memory
    does, instead of ~50x above them at GPT-2's 0.02 init)."""

    memory_tokens: int = 10
    segment_len: int = 64
    bptt_segments: int = 4
    write_scale: str = "none"

    def __post_init__(self):
        for field in ("memory_tokens", "segment_len", "bptt_segments"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"RmtConfig.{field}={value!r}: must be an integer >= 1")
        if self.write_scale not in WRITE_SCALES:
            raise ConfigError(f"RmtConfig.write_scale={self.write_scale!r}: expected one of {', '.join(WRITE_SCALES)}")

    @property
    def positions_per_segment(self) -> int:
        """M + L + M: read memory, tokens, write memory."""
        return 2 * self.memory_tokens + self.segment_len

    def replace(self, **changes) -> RmtConfig:
        return dataclasses.replace(self, **changes)


def check_rmt_config(cfg: ModelConfig, rmt_cfg: RmtConfig) -> None:
    """One clear error when a segment with its memory does not fit the backbone's max_seq_len."""
    if not isinstance(rmt_cfg, RmtConfig):
        raise TypeError(f"rmt_cfg must be an RmtConfig, got {type(rmt_cfg).__name__}")
    if rmt_cfg.positions_per_segment > cfg.max_seq_len:
        raise ConfigError(
            f"RmtConfig: a segment takes memory_tokens + segment_len + memory_tokens = {rmt_cfg.positions_per_segment} "
            f"positions, more than the backbone's max_seq_len={cfg.max_seq_len}; shorten segment_len or raise "
            f"max_seq_len")


def init_memory(cfg: ModelConfig, rmt_cfg: RmtConfig, key: jax.Array, std: float = 0.02) -> jax.Array:
    """Initial memory embeddings [memory_tokens, d_model] (float32), drawn like token embeddings."""
    return std * jax.random.normal(key, (rmt_cfg.memory_tokens, cfg.d_model), jnp.float32)


def add_memory(params: dict, cfg: ModelConfig, rmt_cfg: RmtConfig, key: jax.Array) -> dict:
    """An existing (e.g. pretrained) backbone's params with freshly initialized params["memory"] added."""
    check_rmt_config(cfg, rmt_cfg)
    if "memory" in params:
        raise ValueError("params already have a 'memory' entry; add_memory takes a backbone's params")
    return {**params, "memory": init_memory(cfg, rmt_cfg, key)}


def init_rmt_params(cfg: ModelConfig, rmt_cfg: RmtConfig, key: jax.Array) -> dict:
    """Freshly initialized backbone params plus params["memory"] [memory_tokens, d_model]."""
    backbone_key, memory_key = jax.random.split(key)
    return add_memory(init_params(cfg, backbone_key), cfg, rmt_cfg, memory_key)


def initial_memory(params: dict, batch: int, cfg: ModelConfig, rmt_cfg: RmtConfig) -> jax.Array:
    """params["memory"] broadcast over the batch: [batch, memory_tokens, d_model]."""
    if "memory" not in params:
        raise ValueError("params have no 'memory' entry: make them with init_rmt_params or add_memory")
    memory = params["memory"]
    if tuple(memory.shape) != (rmt_cfg.memory_tokens, cfg.d_model):
        raise ValueError(f"params['memory'] has shape {tuple(memory.shape)}, expected [memory_tokens="
                         f"{rmt_cfg.memory_tokens}, d_model={cfg.d_model}]: the params were made for another RmtConfig")
    return jnp.broadcast_to(memory, (batch, *memory.shape))


# --- one segment ------------------------------------------------------------------------------

def rmt_segment(params: dict, memory: jax.Array, tokens: jax.Array, cfg: ModelConfig, rmt_cfg: RmtConfig
                ) -> tuple[jax.Array, jax.Array]:
    """One segment: memory [batch, M, d_model], tokens [batch, L] -> (logits [batch, L, padded_vocab] float32,
    new memory [batch, M, d_model] in memory's dtype).

    The backbone runs on [memory; embed(tokens); memory] at positions 0 .. 2M+L-1 with causal attention; the new
    memory is the final (final-normed) hidden states of the M write positions. MoE backbones run, but their auxiliary
    metrics are dropped here.
    """
    batch, seg_len = tokens.shape
    memory_tokens = rmt_cfg.memory_tokens
    if seg_len != rmt_cfg.segment_len or memory.shape[1:] != (memory_tokens, cfg.d_model):
        raise ValueError(f"rmt_segment: tokens {tuple(tokens.shape)} and memory {tuple(memory.shape)} must be "
                         f"[batch, segment_len={rmt_cfg.segment_len}] and [batch, memory_tokens={memory_tokens}, "
                         f"d_model={cfg.d_model}]")
    token_vectors = embedding(params["embed"]["token"].astype(cfg.compute_dtype), tokens)  # [batch, L, d_model]
    read = write = memory.astype(cfg.compute_dtype)  # [batch, M, d_model]
    x = jnp.concatenate([read, token_vectors, write], axis=1)  # [batch, M + L + M, d_model]
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), (batch, x.shape[1]))  # [batch, M + L + M]
    backbone = {k: v for k, v in params.items() if k != "memory"}
    hidden, _ = hidden_states_from_embeddings(backbone, x, cfg, positions=positions)  # [batch, M + L + M, d_model]
    logits = logits_from_hidden(backbone, hidden[:, memory_tokens:memory_tokens + seg_len], cfg)  # [batch, L, vocab]
    new_memory = hidden[:, memory_tokens + seg_len:]  # [batch, M, d_model]
    if rmt_cfg.write_scale == "embedding":
        table = params["embed"]["token"].astype(jnp.float32)
        new_memory = new_memory * jnp.sqrt(jnp.mean(jnp.square(table))).astype(new_memory.dtype)
    return logits, new_memory.astype(memory.dtype)


# --- a whole sequence -------------------------------------------------------------------------

def check_rmt_tokens(tokens, cfg: ModelConfig, rmt_cfg: RmtConfig) -> None:
    """tokens must be [batch, n_segments * segment_len] integers in the vocabulary (values checked when concrete)."""
    check_rmt_config(cfg, rmt_cfg)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be [batch, seq] integers, got shape {tuple(tokens.shape)} dtype {tokens.dtype}")
    if tokens.shape[1] == 0 or tokens.shape[1] % rmt_cfg.segment_len:
        raise ValueError(f"tokens have length {tokens.shape[1]}, not a positive multiple of RmtConfig.segment_len="
                         f"{rmt_cfg.segment_len}; pad the sequence to whole segments")
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        if values.min() < 0 or values.max() >= cfg.vocab_size:
            bad = int(values.min()) if values.min() < 0 else int(values.max())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}) (ModelConfig.vocab_size)")


def rmt_forward_with_memory(params: dict, tokens: jax.Array, cfg: ModelConfig, rmt_cfg: RmtConfig,
                            memory: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """tokens [batch, n_segments * L] -> (logits [batch, n_segments * L, padded_vocab] float32, memory after the
    last segment [batch, M, d_model]). memory: the memory entering the first segment (default params["memory"]).

    A `jax.lax.scan` over segments carrying the memory; each segment is rematerialized in the backward pass
    (`jax.checkpoint`), so training keeps one segment's activations (plus the [batch, M, d_model] memories and the
    logits) alive at a time. Truncated BPTT: the memory entering segments K, 2K, 3K, ... (K = bptt_segments) is a
    `stop_gradient`, so a loss on segment s reaches back to segment s - (s mod K) only; params["memory"] (segment 0's
    memory) gets gradients from segments 0 .. K-1.
    """
    check_rmt_tokens(tokens, cfg, rmt_cfg)
    batch, total = tokens.shape
    n_segments, seg_len, bptt = total // rmt_cfg.segment_len, rmt_cfg.segment_len, rmt_cfg.bptt_segments
    if memory is None:
        memory = initial_memory(params, batch, cfg, rmt_cfg)
    segments = tokens.reshape(batch, n_segments, seg_len).transpose(1, 0, 2)  # [n_segments, batch, L]

    def segment_step(memory, inputs):
        index, segment_tokens = inputs
        truncate = (index > 0) & (index % bptt == 0)
        memory = jnp.where(truncate, jax.lax.stop_gradient(memory), memory)
        logits, memory = rmt_segment(params, memory, segment_tokens, cfg, rmt_cfg)
        return memory, logits

    # inside a scan the loop already keeps XLA from merging the recomputation with the forward pass
    segment_step = jax.checkpoint(segment_step, prevent_cse=False)
    memory, logits = jax.lax.scan(segment_step, memory, (jnp.arange(n_segments), segments))
    logits = logits.transpose(1, 0, 2, 3).reshape(batch, total, -1)  # [batch, n_segments * L, padded_vocab]
    return logits, memory


def rmt_forward(params: dict, tokens: jax.Array, cfg: ModelConfig, rmt_cfg: RmtConfig) -> jax.Array:
    """tokens [batch, n_segments * segment_len] -> logits [batch, n_segments * segment_len, padded_vocab] (float32),
    the memory carried from segment to segment (rmt_forward_with_memory)."""
    return rmt_forward_with_memory(params, tokens, cfg, rmt_cfg)[0]


def no_memory_forward(params: dict, tokens: jax.Array, cfg: ModelConfig, segment_len: int) -> jax.Array:
    """The same backbone WITHOUT memory, the baseline: each segment of tokens [batch, n_segments * segment_len]
    alone (positions 0 .. segment_len-1, nothing seen from earlier segments) -> logits [batch, seq, padded_vocab]."""
    batch, total = tokens.shape
    if total == 0 or total % segment_len:
        raise ValueError(f"tokens have length {total}, not a positive multiple of segment_len={segment_len}")
    backbone = {k: v for k, v in params.items() if k != "memory"}
    logits = forward(backbone, tokens.reshape(batch * (total // segment_len), segment_len), cfg)
    return logits.reshape(batch, total, -1)


# --- loss -------------------------------------------------------------------------------------

def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy: logits [batch, seq, vocab] at position t predict tokens [batch, seq] at t + 1.

    loss_mask [batch, seq] (bool or 0/1) marks the TOKENS to score (position 0 is never predicted); None scores every
    token but the first. A float32 scalar; 0 when nothing is scored.
    """
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(tokens.shape):
        raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)}, expected the tokens' {tuple(tokens.shape)}")
    nll, _ = token_cross_entropy(logits[:, :-1], tokens[:, 1:])  # [batch, seq - 1]
    weights = jnp.ones_like(nll) if loss_mask is None else loss_mask[:, 1:].astype(jnp.float32)
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def rmt_loss(params: dict, tokens: jax.Array, cfg: ModelConfig, rmt_cfg: RmtConfig,
             loss_mask: jax.Array | None = None) -> jax.Array:
    """Next-token cross-entropy of rmt_forward over all segments (next_token_loss: loss_mask marks scored tokens)."""
    return next_token_loss(rmt_forward(params, tokens, cfg, rmt_cfg), tokens, loss_mask)


# --- generation -------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(4, 5))
def _segment_next_token(params, memory, segment_tokens, filled, cfg, rmt_cfg):
    """(greedy next token [batch] after the first `filled` tokens of segment_tokens [batch, L], the memory the
    segment writes [batch, M, d_model], meaningful when the segment is full)."""
    logits, new_memory = rmt_segment(params, memory, segment_tokens, cfg, rmt_cfg)
    last = jax.lax.dynamic_index_in_dim(logits, filled - 1, axis=1, keepdims=False)  # [batch, padded_vocab]
    return jnp.argmax(last, axis=-1).astype(segment_tokens.dtype), new_memory


@functools.partial(jax.jit, static_argnums=(3, 4))
def _advance_memory(params, memory, segment_tokens, cfg, rmt_cfg):
    return rmt_segment(params, memory, segment_tokens, cfg, rmt_cfg)[1]


def rmt_generate(params: dict, prompt, cfg: ModelConfig, rmt_cfg: RmtConfig, max_new_tokens: int) -> jax.Array:
    """Greedy decoding with memory: prompt [batch, prompt_len] -> [batch, prompt_len + max_new_tokens].

    The prompt's whole segments run first, each updating the memory (all but the segment still being written: a
    prompt of exactly k segments leaves its k-th to predict the first new token). Then token by token, the current
    segment is RECOMPUTED from its start each step (no KV cache: simple, one compiled segment of fixed length L,
    positions after the filled ones padded and invisible to them under causal attention); when the segment fills, its
    write memory becomes the memory of the next. The result equals the argmax of rmt_forward on the generated
    sequence at every generated position. Any length: the context is the memory, not a window.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, prompt_len] token ids with prompt_len >= 1, got shape "
                         f"{tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    seg_len = rmt_cfg.segment_len
    padded_len = -(-prompt.shape[1] // seg_len) * seg_len
    check_rmt_tokens(jnp.pad(prompt, ((0, 0), (0, padded_len - prompt.shape[1]))), cfg, rmt_cfg)
    batch = prompt.shape[0]
    memory = initial_memory(params, batch, cfg, rmt_cfg)
    tokens = prompt.astype(jnp.int32)
    segment_start = 0
    while tokens.shape[1] - segment_start > seg_len:  # whole segments of the prompt before the current one
        memory = _advance_memory(params, memory, tokens[:, segment_start:segment_start + seg_len], cfg, rmt_cfg)
        segment_start += seg_len
    for _ in range(max_new_tokens):
        current = tokens[:, segment_start:]  # [batch, filled], 1 <= filled <= L
        filled = current.shape[1]
        segment_tokens = jnp.pad(current, ((0, 0), (0, seg_len - filled)))  # [batch, L]
        next_token, new_memory = _segment_next_token(params, memory, segment_tokens, filled, cfg, rmt_cfg)
        if filled == seg_len:  # the segment is complete: its write memory carries into the next
            memory, segment_start = new_memory, segment_start + seg_len
        tokens = jnp.concatenate([tokens, next_token[:, None]], axis=1)
    return tokens
