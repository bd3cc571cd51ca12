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
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from llmjax.config import ModelConfig, TrainConfig
from llmjax.kernels.platform import compute_platform
from llmjax.model.moe import moe_loss_sums, moe_metrics_from_sums
from llmjax.model.transformer import hidden_states_and_moe_metrics, output_embedding
from llmjax.nn import fp8, token_cross_entropy
from llmjax.parallel.logical import active_rules, partition_spec
from llmjax.train.optim import learning_rate_schedule, make_optimizer
from llmjax.train.state import TrainState, init_train_state  # noqa: F401 (init_train_state: re-exported)

if TYPE_CHECKING:
    from llmjax.parallel.plan import Plan


def windows_to_batch(windows: jax.Array) -> dict:
    """[batch, seq + 1] token windows -> {"inputs", "targets"} shifted by one."""
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


@jax.custom_vjp
def output_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x [..., d_model] @ embedding [d_model, vocab] -> float32 logits, the matmul in x's dtype.

    The backward pass rounds the float32 logit gradients to x's dtype before its two matmuls, so
    they run on bf16 tensor cores like the forward (plain autodiff would pair the float32 cotangent
    with a bf16 operand and fall back to a slow float32 GEMM: docs/perf.md, "Training step against the
    PyTorch peer");
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
    (hidden, targets), unchunk = _chunks(chunk_tokens, hidden, targets)
    in_vocab = jnp.arange(embedding.shape[1]) < vocab_size

    @jax.checkpoint
    def one_chunk(_, chunk_inputs):
        x, t = chunk_inputs  # [..., chunk, d_model], [..., chunk]
        logits = output_logits(x, embedding)  # [..., chunk, padded_vocab] float32
        if vocab_size < embedding.shape[1]:  # padding columns get no probability
            logits = jnp.where(in_vocab, logits, -jnp.inf)
        return None, token_cross_entropy(logits, t)  # (nll, log_z)

    _, (nll, log_z) = jax.lax.scan(one_chunk, None, (hidden, targets))  # [count, ..., chunk]
    return unchunk(nll), unchunk(log_z)


def _chunks(chunk_tokens: int, hidden: jax.Array, *per_token: jax.Array):
    """hidden [..., tokens, d_model] and per-token arrays [..., tokens] cut into chunks of positions,
    [count, ..., chunk, (d_model)] (zero-padded), with about chunk_tokens tokens per chunk in all; and
    the `unchunk` that puts [count, ..., chunk, (d_model)] results back as [..., tokens, (d_model)].
    Leading (batch) axes stay whole in every chunk: a batch sharded over devices stays sharded."""
    *lead, tokens, _ = hidden.shape
    chunk = max(1, min(chunk_tokens // math.prod(lead), tokens))
    count = -(-tokens // chunk)
    axis = len(lead)  # the tokens axis

    def cut(x):
        x = jnp.pad(x, [(0, 0)] * axis + [(0, count * chunk - tokens)] + [(0, 0)] * (x.ndim - axis - 1))
        return jnp.moveaxis(x.reshape(*lead, count, chunk, *x.shape[axis + 1:]), axis, 0)

    def unchunk(x):
        x = jnp.moveaxis(x, 0, axis)
        x = x.reshape(*lead, count * chunk, *x.shape[axis + 2:])
        return jax.lax.slice_in_dim(x, 0, tokens, axis=axis)

    return tuple(cut(x) for x in (hidden, *per_token)), unchunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def forward_grad_cross_entropy(x, embedding, targets, weights, vocab_size: int, chunk_tokens: int, z_loss: float):
    """(objective, nll, log_z) of the output layer, its gradient computed during the forward pass.

    x [..., tokens, d_model] (compute dtype), embedding [d_model, padded_vocab], targets [..., tokens]
    int, weights [..., tokens] float (0 where a token does not count). objective = sum of
    weights * (nll + z_loss * log_z^2), a float32 scalar; nll, log_z [..., tokens] float32 are for
    metrics only (no gradient flows back through them). Chunk by chunk of tokens: logits in x's dtype
    straight from the matmul (the tensor cores' float32 accumulation rounded once, like torch autocast),
    softmax statistics in float32, then the logits' gradient and its two matmuls right away, so the
    backward pass only scales the stored dx and d_embedding by the objective's cotangent: three
    matmuls in all instead of four, and one chunk of logits alive at a time.
    """
    weights = weights.astype(jnp.float32)
    (xs, ts), unchunk = _chunks(chunk_tokens, x, targets)
    w = embedding.astype(x.dtype)

    def one_chunk(_, inputs):
        return None, _chunk_statistics(*inputs, w, vocab_size)[1:]

    _, (nll, log_z) = jax.lax.scan(one_chunk, None, (xs, ts))
    nll, log_z = unchunk(nll), unchunk(log_z)
    return (weights * (nll + z_loss * jnp.square(log_z))).sum(), nll, log_z


def _chunk_statistics(xc, tc, w, vocab_size: int):
    """float32 (logits [..., chunk, vocab], nll [..., chunk], log_z [..., chunk]) of one chunk; the
    matmul's output in xc's dtype; padding columns at -inf."""
    logits = jnp.dot(xc, w, preferred_element_type=xc.dtype).astype(jnp.float32)
    logits = jnp.where(jnp.arange(w.shape[1]) < vocab_size, logits, -jnp.inf)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return logits, log_z - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0], log_z


def _chunk_logits_grad(xc, tc, wc, w, vocab_size: int, z_loss: float):
    """(d objective / d logits [..., chunk, vocab] in xc's dtype, nll, log_z [..., chunk] float32) of one chunk.
    On GPUs one Pallas kernel (kernels/cross_entropy.cross_entropy_with_grad) reads the logits twice and
    writes their gradient once; XLA's reductions and elementwise pass read them three times."""
    if compute_platform() == "gpu":
        from llmjax.kernels.cross_entropy import cross_entropy_with_grad

        logits = jnp.dot(xc, w, preferred_element_type=xc.dtype)
        lead = logits.shape[:-1]
        g, nll, log_z = cross_entropy_with_grad(logits.reshape(-1, w.shape[1]), tc.reshape(-1), wc.reshape(-1),
                                                vocab_size, z_loss)
        return g.reshape(logits.shape), nll.reshape(lead), log_z.reshape(lead)
    logits, nll, log_z = _chunk_statistics(xc, tc, w, vocab_size)
    probs = jnp.exp(logits - log_z[..., None])
    target = jnp.arange(w.shape[1]) == tc[..., None]
    g = (wc * (1 + 2 * z_loss * log_z))[..., None] * probs - jnp.where(target, wc[..., None], 0)
    return g.astype(xc.dtype), nll, log_z


def _forward_grad_cross_entropy_fwd(x, embedding, targets, weights, vocab_size, chunk_tokens, z_loss):
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    (xs, ts, ws), unchunk = _chunks(chunk_tokens, x, targets, weights)
    w = embedding.astype(x.dtype)  # [d_model, padded_vocab]

    def one_chunk(d_w, inputs):
        xc, tc, wc = inputs  # [..., chunk, d_model], [..., chunk], [..., chunk]
        g, nll, log_z = _chunk_logits_grad(xc, tc, wc, w, vocab_size, z_loss)  # g: d objective / d logits
        dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
        d_w = d_w + jnp.einsum("...cd,...cv->dv", xc, g, preferred_element_type=jnp.float32)
        return d_w, (nll, log_z, dx)

    d_w, (nll, log_z, dx) = jax.lax.scan(one_chunk, jnp.zeros(w.shape, jnp.float32), (xs, ts, ws))
    nll, log_z, dx = unchunk(nll), unchunk(log_z), unchunk(dx)
    objective = (weights * (nll + z_loss * jnp.square(log_z))).sum()
    return (objective, nll, log_z), (dx, d_w.astype(embedding.dtype), targets, weights)


def _forward_grad_cross_entropy_bwd(vocab_size, chunk_tokens, z_loss, residuals, cotangents):
    dx, d_w, targets, weights = residuals
    scale = cotangents[0]  # the objective's; nll / log_z are metrics (their cotangents are ignored)
    d_targets = np.zeros(targets.shape, jax.dtypes.float0)
    return (dx * scale.astype(dx.dtype)), d_w * scale.astype(d_w.dtype), d_targets, jnp.zeros_like(weights)


forward_grad_cross_entropy.defvjp(_forward_grad_cross_entropy_fwd, _forward_grad_cross_entropy_bwd)


def resolve_loss_impl(impl: str) -> str:
    """'auto' -> on GPUs, when the step's layout allows it (one device, or a batch cut over devices with whole
    vocabulary and sequence: each device works on its rows), 'forward_grad' (the fastest there); else
    XLA's chunks (CPUs; vocabulary- or sequence-parallel layouts)."""
    if impl != "auto":
        return impl
    return "forward_grad" if compute_platform() == "gpu" and _loss_batch_axes() is not None else "xla"


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
    from llmjax.kernels.cross_entropy import linear_cross_entropy

    batch, seq, d_model = x.shape
    nll, log_z = linear_cross_entropy(x.reshape(-1, d_model), embedding.astype(x.dtype), targets.reshape(-1),
                                      vocab_size, interpret=compute_platform() == "cpu")
    return nll.reshape(batch, seq), log_z.reshape(batch, seq)


def _per_token_objective(token_losses_fn):
    """A (x, embedding, targets, weights) -> (objective, nll, log_z) from a per-token (nll, log_z) function."""
    def objective_fn(x, embedding, targets, weights, *, z_loss):
        nll, log_z = token_losses_fn(x, embedding, targets)
        return (weights * (nll + z_loss * jnp.square(log_z))).sum(), nll, log_z
    return objective_fn


def output_loss(x: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array, model_cfg: ModelConfig,
                train_cfg: TrainConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective, nll, log_z) of the output layer on hidden states x [batch, seq, d_model]: objective = the
    weighted sum of nll + z_loss * log_z^2 (float32 scalar), nll and log_z float32 [batch, seq]."""
    impl = resolve_loss_impl(train_cfg.loss_impl)
    vocab, chunk = model_cfg.vocab_size, train_cfg.loss_chunk_tokens
    if impl == "xla":
        fn = _per_token_objective(functools.partial(chunked_cross_entropy, vocab_size=vocab, chunk_tokens=chunk))
        return fn(x, embedding, targets, weights, z_loss=train_cfg.z_loss)
    if impl == "pallas":
        fn = _per_token_objective(functools.partial(_fused_token_losses, vocab_size=vocab))
    else:
        def fn(x, embedding, targets, weights, *, z_loss):
            objective, nll, log_z = forward_grad_cross_entropy(x, embedding, targets, weights, vocab, chunk, z_loss)
            return objective, jax.lax.stop_gradient(nll), jax.lax.stop_gradient(log_z)
    fn = functools.partial(fn, z_loss=train_cfg.z_loss)
    batch_axes = _loss_batch_axes()
    if batch_axes is None:
        raise ValueError(f"loss_impl={impl!r} needs the vocabulary and the sequence whole on each device; "
                         "use loss_impl='auto' or 'xla' with tensor or sequence parallelism")
    if not batch_axes:
        return fn(x, embedding, targets, weights)
    mesh, _ = active_rules()  # each device: its rows against the whole embedding (gathered; gradient summed)
    rows = PartitionSpec(batch_axes)

    def per_device(x, embedding, targets, weights):
        objective, nll, log_z = fn(x, embedding, targets, weights)
        return objective[None], nll, log_z  # one partial objective per device, summed outside

    objectives, nll, log_z = jax.shard_map(per_device, mesh=mesh, in_specs=(rows, PartitionSpec(), rows, rows),
                                           out_specs=(rows, rows, rows), check_vma=False)(x, embedding, targets, weights)
    return objectives.sum(), nll, log_z


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
    mask = batch.get("loss_mask")
    mask = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    objective, nll, log_z = output_loss(x, embedding, batch["targets"], mask, model_cfg, train_cfg)
    sums = {"nll_sum": (nll * mask).sum(), "z_sum": (jnp.square(log_z) * mask).sum(), "tokens": mask.sum()}
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
        return (fp8.accumulate_gradients(carry[0], grads), jax.tree.map(jnp.add, carry[1], sums)), None

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
    optimizer = make_optimizer(train_cfg, model_cfg=model_cfg)
    with plan.activations() if plan else contextlib.nullcontext():
        grads, sums = accumulated_gradients(state.params, batch, model_cfg, train_cfg, rng=_router_rng(state, model_cfg))
    if plan is not None:  # ZeRO-2 / FSDP: gradients land cut (a reduce-scatter instead of an all-reduce)
        grads = jax.lax.with_sharding_constraint(grads, plan.gradient_shardings(model_cfg))
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads_and_histories = grads  # FP8 delayed scaling: the amax histories' gradients are their next values
    grads = jax.tree.map(lambda g: g / tokens, fp8.without_histories(grads_and_histories))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = fp8.take_new_histories(optax.apply_updates(state.params, updates), grads_and_histories)
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
        "update_ratio": optax.tree.norm(updates) / optax.tree.norm(fp8.without_histories(state.params)),
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
