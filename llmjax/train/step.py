"""The jitted training step: `train_step(state, batch) -> (state, metrics)`.

Mixed precision: parameters and optimizer state stay float32; the model computes in
cfg.compute_dtype. The loss is a token-weighted mean of cross-entropy computed over chunks of
tokens, so the [tokens, vocab] float32 logits never exist at once. Gradient accumulation is a
`lax.scan` over micro-batches of summed losses, equal to one step on the whole batch.

A batch is a dict of [batch, seq] arrays: `inputs`, `targets`, and optionally `positions`,
`segment_ids` and `loss_mask` (1 where the target counts).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from llmjax.config import ModelConfig, TrainConfig
from llmjax.model.moe import moe_loss_sums, moe_metrics_from_sums
from llmjax.model.transformer import hidden_states_and_moe_metrics, init_params, output_embedding
from llmjax.parallel.logical import active_rules, partition_spec
from llmjax.train.optim import learning_rate_schedule, make_optimizer

if TYPE_CHECKING:
    from llmjax.parallel.plan import Plan


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: updates applied so far
    params: dict
    opt_state: optax.OptState


def init_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, key: jax.Array) -> TrainState:
    params = init_params(model_cfg, key)
    opt_state = make_optimizer(model_cfg, train_cfg).init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def windows_to_batch(windows: jax.Array) -> dict:
    """[batch, seq + 1] token windows -> {"inputs", "targets"} shifted by one."""
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


@jax.custom_vjp
def output_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x [..., d_model] @ embedding [d_model, vocab] -> float32 logits, the matmul in x's dtype.

    The backward pass rounds the float32 logit gradients to x's dtype before its two matmuls, so
    they run on bf16 tensor cores like the forward (plain autodiff would pair the float32 cotangent
    with a bf16 operand and fall back to a float32 GEMM, 58 ms of a 335 ms llama-1b step on an H200);
    the embedding's gradient still accumulates in float32 when the embedding is float32.
    """
    return jnp.dot(x, embedding.astype(x.dtype), preferred_element_type=jnp.float32)


def _output_logits_forward(x, embedding):
    return output_logits(x, embedding), (x, embedding)


def _output_logits_backward(residuals, grad):
    x, embedding = residuals
    grad = grad.astype(x.dtype)  # [..., vocab]
    d_x = jnp.dot(grad, embedding.astype(x.dtype).T, preferred_element_type=jnp.float32).astype(x.dtype)
    d_embedding = jnp.dot(x.reshape(-1, x.shape[-1]).T, grad.reshape(-1, grad.shape[-1]),
                          preferred_element_type=jnp.float32)
    return d_x, d_embedding.astype(embedding.dtype)


output_logits.defvjp(_output_logits_forward, _output_logits_backward)


def chunked_cross_entropy(
    hidden: jax.Array, embedding: jax.Array, targets: jax.Array, vocab_size: int, chunk_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, a chunk of positions at a time.

    hidden [..., tokens, d_model] (compute dtype); embedding [d_model, padded_vocab]; targets
    [..., tokens]. Chunks cut the `tokens` axis only, so leading (batch) axes stay whole in every
    chunk: a batch sharded over devices stays sharded and each device works on its own rows.
    Each chunk's logits are float32 [..., chunk, padded_vocab] with about chunk_tokens rows in all,
    rematerialized in the backward pass rather than stored. Returns (nll, log_z) like targets, float32.
    """
    *lead, tokens, d_model = hidden.shape
    rows = math.prod(lead)
    chunk = max(1, min(chunk_tokens // rows, tokens))
    count = -(-tokens // chunk)
    pad = [(0, 0)] * len(lead) + [(0, count * chunk - tokens)]
    hidden = jnp.pad(hidden, pad + [(0, 0)]).reshape(*lead, count, chunk, d_model)
    targets = jnp.pad(targets, pad).reshape(*lead, count, chunk)
    hidden, targets = jnp.moveaxis(hidden, -3, 0), jnp.moveaxis(targets, -2, 0)  # [count, ..., chunk, (d_model)]
    in_vocab = jnp.arange(embedding.shape[1]) < vocab_size

    @jax.checkpoint
    def one_chunk(_, chunk_inputs):
        x, t = chunk_inputs  # [..., chunk, d_model], [..., chunk]
        logits = output_logits(x, embedding)  # [..., chunk, padded_vocab] float32
        if vocab_size < embedding.shape[1]:  # padding columns get no probability
            logits = jnp.where(in_vocab, logits, -jnp.inf)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return None, (log_z - target_logit, log_z)

    _, (nll, log_z) = jax.lax.scan(one_chunk, None, (hidden, targets))  # [count, ..., chunk]

    def unchunk(x):
        return jnp.moveaxis(x, 0, -2).reshape(*lead, count * chunk)[..., :tokens]

    return unchunk(nll), unchunk(log_z)


def resolve_loss_impl(impl: str) -> str:
    """'auto' -> the fused Pallas kernel on GPUs when the step's layout allows it (one device, or a batch cut
    over devices with whole vocabulary and sequence: each device runs the kernel on its rows), else XLA's
    chunks (CPUs; vocabulary- or sequence-parallel layouts, which the kernel does not split)."""
    if impl != "auto":
        return impl
    return "pallas" if jax.devices()[0].platform == "gpu" and _loss_batch_axes() is not None else "xla"


def _loss_batch_axes():
    """The mesh axes cutting the batch when only the batch is cut (() on one device); None otherwise."""
    active = active_rules()
    if active is None:
        return ()
    mesh, rules = active
    batch, vocab, length = partition_spec(("batch", "vocab", "length"), rules, mesh)
    if vocab is not None or length is not None:
        return None
    return () if batch is None else batch


def _fused_token_losses(x, embedding, targets, vocab_size: int):
    """linear_cross_entropy on [batch, seq] arrays (the kernel takes flat tokens)."""
    from kernels.cross_entropy import linear_cross_entropy

    batch, seq, d_model = x.shape
    nll, log_z = linear_cross_entropy(x.reshape(-1, d_model), embedding.astype(x.dtype), targets.reshape(-1),
                                      vocab_size, interpret=jax.devices()[0].platform == "cpu")
    return nll.reshape(batch, seq), log_z.reshape(batch, seq)


def token_losses(x: jax.Array, embedding: jax.Array, targets: jax.Array, model_cfg: ModelConfig,
                 train_cfg: TrainConfig) -> tuple[jax.Array, jax.Array]:
    """(nll, log_z) float32 [batch, seq] of the output layer on hidden states x [batch, seq, d_model]."""
    if resolve_loss_impl(train_cfg.loss_impl) == "xla":
        return chunked_cross_entropy(x, embedding, targets, model_cfg.vocab_size, train_cfg.loss_chunk_tokens)
    batch_axes = _loss_batch_axes()
    if batch_axes is None:
        raise ValueError("loss_impl='pallas' needs the vocabulary and the sequence whole on each device; "
                         "use loss_impl='auto' or 'xla' with tensor or sequence parallelism")
    fused = functools.partial(_fused_token_losses, vocab_size=model_cfg.vocab_size)
    if not batch_axes:
        return fused(x, embedding, targets)
    mesh, _ = active_rules()  # each device: its rows against the whole embedding (gathered; gradient summed)
    rows = PartitionSpec(batch_axes)
    return jax.shard_map(fused, mesh=mesh, in_specs=(rows, PartitionSpec(), rows), out_specs=(rows, rows),
                         check_vma=False)(x, embedding, targets)


def loss_sums(params: dict, batch: dict, model_cfg: ModelConfig, train_cfg: TrainConfig, rng: jax.Array | None = None
              ) -> tuple[jax.Array, dict]:
    """(objective summed over counted tokens, {"nll_sum", "z_sum", "tokens"}) for one (micro-)batch.

    MoE models add their weighted auxiliary losses (times the tokens) to the objective and
    token-weighted "moe_*_sum" entries to the sums (llmjax.model.moe.moe_loss_sums); rng: router noise.
    """
    x, moe_metrics = hidden_states_and_moe_metrics(
        params, batch["inputs"], model_cfg, positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
        rng=rng,
    )  # [batch, seq, d_model]
    embedding = output_embedding(params, model_cfg)  # [d_model, padded_vocab], master dtype
    nll, log_z = token_losses(x, embedding, batch["targets"], model_cfg, train_cfg)  # [batch, seq] each
    mask = batch.get("loss_mask")
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    sums = {"nll_sum": (nll * mask).sum(), "z_sum": (jnp.square(log_z) * mask).sum(), "tokens": mask.sum()}
    objective = sums["nll_sum"] + train_cfg.z_loss * sums["z_sum"]
    if moe_metrics:
        moe_objective, moe_sums = moe_loss_sums(moe_metrics, sums["tokens"], model_cfg)
        objective, sums = objective + moe_objective, {**sums, **moe_sums}
    return objective, sums


def split_micro_batches(batch: dict, micro_batches: int) -> dict:
    """[batch, ...] leaves -> [micro_batches, batch / micro_batches, ...]."""

    def split(x):
        if x.shape[0] % micro_batches:
            raise ValueError(
                f"batch of {x.shape[0]} sequences does not split into micro_batches={micro_batches}; "
                f"choose a batch size that is a multiple of it"
            )
        return x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])

    return jax.tree.map(split, batch)


def accumulated_gradients(params: dict, batch: dict, model_cfg: ModelConfig, train_cfg: TrainConfig,
                          rng: jax.Array | None = None):
    """(grads of the summed objective, summed metrics), scanning over micro-batches."""
    grad_fn = jax.grad(functools.partial(loss_sums, model_cfg=model_cfg, train_cfg=train_cfg), has_aux=True)
    if train_cfg.micro_batches == 1:
        return grad_fn(params, batch, rng=rng)

    def add_micro_batch(carry, micro):
        micro_batch, index = micro
        grads, sums = grad_fn(params, micro_batch, rng=None if rng is None else jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    micro_batches = split_micro_batches(batch, train_cfg.micro_batches)
    sums_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), rng=rng)[1]
    zeros = jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape)
    (grads, sums), _ = jax.lax.scan(add_micro_batch, zeros, (micro_batches, jnp.arange(train_cfg.micro_batches)))
    return grads, sums


def train_step(state: TrainState, batch: dict, *, model_cfg: ModelConfig, train_cfg: TrainConfig,
               plan: Plan | None = None) -> tuple[TrainState, dict]:
    """One optimizer update on the batch: the token-weighted mean loss's gradients, clipped, AdamW.

    plan: the mesh layout (llmjax.parallel.plan); activations and gradients are constrained by it.
    """
    optimizer = make_optimizer(model_cfg, train_cfg)
    with plan.activations() if plan else contextlib.nullcontext():
        grads, sums = accumulated_gradients(state.params, batch, model_cfg, train_cfg, rng=_router_rng(state, model_cfg))
    if plan is not None:  # ZeRO-2 / FSDP: gradients land cut (a reduce-scatter instead of an all-reduce)
        grads = jax.lax.with_sharding_constraint(grads, plan.gradient_shardings(model_cfg))
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = sums["nll_sum"] / tokens
    grad_norm = optax.tree.norm(grads)
    if train_cfg.skip_nonfinite:  # keep the old weights, but move on: the next step takes the next batch
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep_if_nonfinite = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep_if_nonfinite, params, state.params)
        opt_state = jax.tree.map(keep_if_nonfinite, opt_state, state.opt_state)
    new_state = TrainState(state.step + 1, params, opt_state)
    metrics = {
        "loss": loss,
        "z_loss": sums["z_sum"] / tokens,
        "grad_norm": grad_norm,
        "learning_rate": learning_rate_schedule(train_cfg)(state.step),
        "tokens": sums["tokens"],
        "update_ratio": optax.tree.norm(updates) / optax.tree.norm(state.params),
        **moe_metrics_from_sums(sums, tokens),  # MoE models: aux losses, dropped tokens, expert load per layer
    }
    return new_state, metrics


def _router_rng(state: TrainState, model_cfg: ModelConfig) -> jax.Array | None:
    """A key per step for MoE router jitter / noise (None when the model uses neither)."""
    if not (model_cfg.is_moe and (model_cfg.router_jitter > 0 or model_cfg.router_noise > 0)):
        return None
    return jax.random.fold_in(jax.random.key(0), state.step)


def eval_step(params: dict, batch: dict, *, model_cfg: ModelConfig, train_cfg: TrainConfig,
              plan: Plan | None = None) -> dict:
    """{"nll_sum", "tokens"} on a batch; validation loss = sum nll / sum tokens, perplexity = exp(loss)."""
    with plan.activations() if plan else contextlib.nullcontext():
        _, sums = loss_sums(params, batch, model_cfg, train_cfg)
    return {"nll_sum": sums["nll_sum"], "tokens": sums["tokens"]}


def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, plan: Plan | None = None):
    """train_step jitted once for these configs, with the state donated (updated in place); with a plan,
    the new state keeps the plan's layout."""
    step = functools.partial(train_step, model_cfg=model_cfg, train_cfg=train_cfg, plan=plan)
    if plan is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, out_shardings=(plan.state_shardings(model_cfg, train_cfg), plan.replicated()))


def make_eval_step(model_cfg: ModelConfig, train_cfg: TrainConfig, plan: Plan | None = None):
    step = functools.partial(eval_step, model_cfg=model_cfg, train_cfg=train_cfg, plan=plan)
    return jax.jit(step) if plan is None else jax.jit(step, out_shardings=plan.replicated())
