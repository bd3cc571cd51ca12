"""Mixture-of-Experts feed-forward: router, load-balancing losses, two dispatch paths, expert parallelism.

An MoE layer replaces the dense MLP of every `moe_every`-th block. Each token's router picks
`experts_per_token` (top-k) of `num_experts` expert MLPs (softmax top-k: k=1 is Switch, k=2 is
GShard / Mixtral); its output is the router-weighted sum of theirs, plus `num_shared_experts`
experts every token goes through (DeepSeek-MoE style, held as one wider MLP).

Dispatch, chosen by `cfg.moe_impl`:
    "capacity"    GShard: a one-hot dispatch tensor [seq, experts, capacity] gathers each sequence's
                  tokens into per-expert buffers of `capacity` slots (einsum), the experts run as one
                  batched matmul, a combine tensor weighted by the router scatters results back.
                  First choices of all tokens take slots before any second choice; assignments past
                  capacity are dropped (the token keeps its residual) and counted.
    "ragged_dot"  dropless: (token, choice) pairs sorted by expert, experts run as a grouped matmul over
                  ragged groups with `jax.lax.ragged_dot`.
    "pallas"      dropless, with our Pallas grouped matmul (kernels/grouped_matmul.py).

Losses and metrics, per MoE layer (stacked on a leading [moe_layers] axis by the scan):
    load_balance_loss   Switch / GShard: E * sum_e f_e * P_e, f_e the fraction of (token, choice)
                        assignments sent to expert e, P_e its mean router probability; 1.0 when
                        perfectly balanced, up to E when collapsed onto one expert.
    router_z_loss       ST-MoE: mean over tokens of logsumexp(router logits)^2.
    expert_load         [E] fraction of tokens routed to each expert (sums to k; balanced: k / E).
    dropped_fraction    assignments dropped for capacity (0 on the dropless paths).

Expert parallelism: when the mesh (the training plan's activation rules, else `jax.set_mesh`) has
an `expert` axis larger than one, experts are sharded over it and the dispatched tokens travel to
their experts' devices and back with two all-to-alls inside `shard_map`; the result equals the
single-device one. The exchange uses the capacity buffers (fixed shapes); dropless configs get one
slot per token (capacity = seq), exact but E / k times the expert FLOPs of the dropless paths: a
ragged all-to-all (`jax.lax.ragged_all_to_all`, which XLA:CPU cannot run) is the way to fix that.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmjax.config import ModelConfig, check_expert_parallel
from llmjax.model.layers import mlp, mlp_spec, residual_std
from llmjax.model.params import ParamSpec, normal, zeros
from llmjax.nn import gelu, softmax, swiglu

EXPERT_MESH_AXIS = "expert"  # the mesh axis experts are sharded over (llmjax.parallel.mesh.MESH_AXES)
TOKEN_MESH_AXES = ("data", "fsdp", "expert")  # mesh axes that split the batch inside the expert-parallel layer


# --- parameters --------------------------------------------------------------------------

def moe_spec(cfg: ModelConfig) -> dict:
    """router/kernel [d_model, experts]; experts/{gate,up,down}/kernel [experts, ...]; shared/... (a dense MLP)."""
    d, f, e, dtype = cfg.d_model, cfg.expert_width, cfg.num_experts, cfg.param_dtype

    def expert_dense(shape, axes, std):
        spec = {"kernel": ParamSpec((e, *shape), ("expert", *axes), normal(std), dtype)}
        if cfg.mlp_bias:
            spec["bias"] = ParamSpec((e, shape[-1]), ("expert", axes[-1]), zeros, dtype)
        return spec

    experts = {
        "up": expert_dense((d, f), ("embed", "mlp"), cfg.init_std),
        "down": expert_dense((f, d), ("mlp", "embed"), residual_std(cfg)),
    }
    if cfg.activation == "swiglu":
        experts["gate"] = expert_dense((d, f), ("embed", "mlp"), cfg.init_std)
    spec = {"router": {"kernel": ParamSpec((d, e), ("embed", "router"), normal(cfg.init_std), dtype)}, "experts": experts}
    if cfg.num_shared_experts:
        spec["shared"] = mlp_spec(shared_mlp_config(cfg))
    return spec


def shared_mlp_config(cfg: ModelConfig) -> ModelConfig:
    """The shared experts as one dense MLP num_shared_experts times an expert's width."""
    return cfg.replace(d_ff=cfg.num_shared_experts * cfg.expert_width, num_experts=0)


# --- routing -----------------------------------------------------------------------------

def route(router: dict, x: jax.Array, cfg: ModelConfig, rng: jax.Array | None = None):
    """x [..., d_model] -> (weights [..., k], experts [..., k] int32, logits [..., E], probs [..., E]).

    Logits and softmax in cfg.router_dtype (float32). With k > 1 the top-k probabilities are
    renormalized to sum to one (GShard / Mixtral); with k = 1 the weight is the raw probability
    (Switch), so the router still gets a gradient (cfg.renormalize_top_k overrides either way).
    Jitter and noise apply only when `rng` is given.
    """
    dtype = jnp.dtype(cfg.router_dtype)
    h = x.astype(dtype)
    if rng is not None and cfg.router_jitter > 0:
        h = h * jax.random.uniform(jax.random.fold_in(rng, 0), h.shape, dtype, 1 - cfg.router_jitter, 1 + cfg.router_jitter)
    logits = h @ router["kernel"].astype(dtype)
    if rng is not None and cfg.router_noise > 0:
        logits = logits + cfg.router_noise * jax.random.normal(jax.random.fold_in(rng, 1), logits.shape, dtype)
    probs = softmax(logits, axis=-1)
    top_probs, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    weights = top_probs / top_probs.sum(-1, keepdims=True) if cfg.top_k_renormalized else top_probs
    return weights, experts.astype(jnp.int32), logits, probs


def router_metrics(logits: jax.Array, probs: jax.Array, experts: jax.Array, num_experts: int) -> dict:
    """Load-balancing loss, router z-loss and expert load over all tokens (leading axes flattened)."""
    k = experts.shape[-1]
    probs = probs.reshape(-1, num_experts)
    tokens = probs.shape[0]
    assigned = jax.nn.one_hot(experts.reshape(tokens, k), num_experts, dtype=jnp.float32).sum(1)  # [tokens, E]
    expert_load = assigned.mean(0)  # [E] fraction of tokens sent to each expert; sums to k
    load_balance = num_experts * jnp.sum(expert_load / k * probs.astype(jnp.float32).mean(0))
    log_z = jax.nn.logsumexp(logits.reshape(tokens, num_experts).astype(jnp.float32), axis=-1)
    return {"load_balance_loss": load_balance, "router_z_loss": jnp.mean(jnp.square(log_z)), "expert_load": expert_load}


def capacity(seq_len: int, cfg: ModelConfig) -> int:
    """Slots per expert per sequence: ceil(capacity_factor * k * seq / E), at most seq."""
    return max(1, min(seq_len, math.ceil(cfg.capacity_factor * cfg.experts_per_token * seq_len / cfg.num_experts)))


# --- experts -----------------------------------------------------------------------------

def _activate(gate, up, cfg: ModelConfig):
    return swiglu(gate, up) if cfg.activation == "swiglu" else gelu(up, approximate=True)


def batched_experts(experts: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Every expert on its own rows: x [E, rows, d_model] -> [E, rows, d_model]."""

    def project(p, h):
        y = jnp.einsum("erd,edf->erf", h, p["kernel"])
        return y + p["bias"][:, None] if "bias" in p else y

    gate = project(experts["gate"], x) if cfg.activation == "swiglu" else None
    return project(experts["down"], _activate(gate, project(experts["up"], x), cfg))


def grouped_experts(experts: dict, x: jax.Array, row_experts: jax.Array, matmul, cfg: ModelConfig) -> jax.Array:
    """Experts on rows grouped by expert: x [rows, d_model] -> [rows, d_model].

    matmul(rows [rows, in], kernel [E, in, out]) -> [rows, out]: a grouped matmul (ragged_dot or our
    Pallas kernel); row_experts [rows]: each row's expert, for the biases.
    """

    def project(p, h):
        y = matmul(h, p["kernel"].astype(h.dtype))
        return y + p["bias"][row_experts] if "bias" in p else y

    gate = project(experts["gate"], x) if cfg.activation == "swiglu" else None
    return project(experts["down"], _activate(gate, project(experts["up"], x), cfg))


# --- dispatch ----------------------------------------------------------------------------

def capacity_tensors(weights: jax.Array, experts: jax.Array, num_experts: int, slots: int, dtype):
    """GShard dispatch and combine tensors for groups of tokens.

    weights, experts [groups, seq, k] -> dispatch [groups, seq, E, slots] (0/1), combine (router
    weights in the kept slots), kept [groups, seq, k] (bool). Priority: every token's first choice
    takes a slot before any token's second choice; within a choice, earlier tokens first.
    """
    groups, seq, k = experts.shape
    expert_onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [groups, seq, k, E]
    choice_major = expert_onehot.transpose(0, 2, 1, 3).reshape(groups, k * seq, num_experts)
    slot = (jnp.cumsum(choice_major, axis=1) - 1) * choice_major  # [groups, k * seq, E]
    slot = slot.sum(-1).reshape(groups, k, seq).transpose(0, 2, 1)  # [groups, seq, k]: this choice's slot
    kept = slot < slots
    slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, slots), slots, dtype=dtype)  # dropped: all zeros
    expert_onehot = expert_onehot.astype(dtype)
    dispatch = jnp.einsum("gske,gskc->gsec", expert_onehot, slot_onehot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", expert_onehot, slot_onehot, weights.astype(dtype))
    return dispatch, combine, kept


def capacity_moe(experts: dict, x: jax.Array, weights: jax.Array, chosen: jax.Array, cfg: ModelConfig, exchange=None):
    """x [batch, seq, d_model] -> (y [batch, seq, d_model], dropped assignments): GShard dispatch per sequence.

    exchange: (to_experts, from_experts), the all-to-alls of the expert-parallel layer; None on one device.
    """
    batch, seq, d = x.shape
    slots = capacity(seq, cfg)
    dispatch, combine, kept = capacity_tensors(weights, chosen, cfg.num_experts, slots, x.dtype)
    expert_inputs = jnp.einsum("gsec,gsd->egcd", dispatch, x)  # [E, batch, slots, d_model]
    if exchange is not None:
        expert_inputs = exchange[0](expert_inputs)  # [local E, devices * batch, slots, d_model]
    local_experts = expert_inputs.shape[0]
    outputs = batched_experts(experts, expert_inputs.reshape(local_experts, -1, d), cfg).reshape(expert_inputs.shape)
    if exchange is not None:
        outputs = exchange[1](outputs)  # [E, batch, slots, d_model]
    y = jnp.einsum("gsec,egcd->gsd", combine, outputs)
    return y, jnp.sum(~kept)


def dropless_moe(experts: dict, x: jax.Array, weights: jax.Array, chosen: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x [tokens, d_model] -> [tokens, d_model]: every (token, choice) pair sorted by expert, a grouped
    matmul over the ragged groups, results un-sorted and mixed with the router weights."""
    tokens, k = chosen.shape
    flat_experts = chosen.reshape(-1)  # [tokens * k], token-major
    order = jnp.argsort(flat_experts, stable=True)  # assignments sorted by expert
    group_sizes = jnp.zeros((cfg.num_experts,), jnp.int32).at[flat_experts].add(1)
    sorted_position = jnp.argsort(order)  # [tokens * k]: where each assignment sits once sorted
    if cfg.moe_impl == "pallas":
        outputs = _pallas_grouped_experts(experts, x, order, sorted_position, group_sizes, k, cfg)
    else:
        matmul = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes)
        sorted_outputs = grouped_experts(experts, x[order // k], flat_experts[order], matmul, cfg)
        outputs = sorted_outputs[sorted_position]
    outputs = outputs.reshape(tokens, k, -1)  # (token, choice) order
    return jnp.einsum("tkd,tk->td", outputs, weights.astype(outputs.dtype))


def _pallas_grouped_experts(experts, x, order, sorted_position, group_sizes, k: int, cfg: ModelConfig) -> jax.Array:
    """The experts through our grouped-matmul kernel on its padded layout (each expert's rows padded
    to a whole row tile), gathered straight from and back to token order: [tokens * k, d_model]."""
    from llmjax.kernels.grouped_matmul import default_tiles, group_layout, grouped_matmul_padded

    assignments, d, f = order.shape[0], cfg.d_model, cfg.expert_width
    block_m = default_tiles(d, f).block_m
    layout = group_layout(group_sizes, assignments, block_m)
    source = jnp.take(order, layout.padded_to_row, mode="fill", fill_value=assignments)  # padding: out of range
    x_padded = jnp.take(x, source // k, axis=0, mode="fill", fill_value=0)  # [padded rows, d_model]
    row_experts = jnp.maximum(layout.tile_group, 0)[jnp.arange(x_padded.shape[0]) // block_m]

    def matmul(h, kernel):
        tiles = default_tiles(kernel.shape[1], kernel.shape[2], block_m=block_m)
        return grouped_matmul_padded(h, kernel, layout, tiles)

    outputs = grouped_experts(experts, x_padded, row_experts, matmul, cfg)
    return outputs[layout.row_to_padded[sorted_position]]


# --- the layer ---------------------------------------------------------------------------

def moe_layer(params: dict, x: jax.Array, cfg: ModelConfig, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """[batch, seq, d_model] -> ([batch, seq, d_model], metrics of this layer)."""
    batch, seq, d = x.shape
    weights, chosen, logits, probs = route(params["router"], x, cfg, rng)  # [batch, seq, k], ..., [batch, seq, E]
    metrics = router_metrics(logits, probs, chosen, cfg.num_experts)
    weights = weights.astype(x.dtype)
    expert_parallel = expert_parallel_mesh()
    if expert_parallel is not None:
        y, dropped = _expert_parallel_moe(params["experts"], x, weights, chosen, cfg, *expert_parallel)
    elif cfg.moe_impl == "capacity":
        y, dropped = capacity_moe(params["experts"], x, weights, chosen, cfg)
    else:
        y = dropless_moe(params["experts"], x.reshape(-1, d), weights.reshape(-1, cfg.experts_per_token),
                         chosen.reshape(-1, cfg.experts_per_token), cfg).reshape(x.shape)
        dropped = jnp.zeros((), jnp.int32)
    if cfg.num_shared_experts:
        y = y + mlp(params["shared"], x, shared_mlp_config(cfg))
    metrics["dropped_fraction"] = dropped.astype(jnp.float32) / (batch * seq * cfg.experts_per_token)
    return y, metrics


# --- expert parallelism ------------------------------------------------------------------

def expert_parallel_mesh():
    """(mesh, token axes) when experts are to be sharded, else None.

    The mesh is the one of the active activation rules (llmjax.parallel.logical), else the ambient
    one (`jax.set_mesh`); experts are sharded when it has an `expert` axis larger than one. Token
    axes: the mesh axes that split the batch (the rules' "batch" entry, else data / fsdp / expert),
    always including `expert`.
    """
    from llmjax.parallel.logical import active_rules, partition_spec

    active = active_rules()
    mesh, rules = active if active is not None else (jax.sharding.get_abstract_mesh(), None)
    if mesh.empty or EXPERT_MESH_AXIS not in mesh.axis_names or mesh.shape[EXPERT_MESH_AXIS] == 1:
        return None
    if rules is not None and "batch" in rules:
        entry = partition_spec(("batch",), rules, mesh)[0]
        batch_axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    else:
        batch_axes = tuple(a for a in TOKEN_MESH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    token_axes = batch_axes + (() if EXPERT_MESH_AXIS in batch_axes else (EXPERT_MESH_AXIS,))
    return mesh, token_axes


def _expert_parallel_moe(experts: dict, x, weights, chosen, cfg: ModelConfig, mesh, token_axes):
    """The capacity dispatch inside shard_map: each device routes its own sequences into per-expert
    buffers, one all-to-all sends every buffer to the device holding its expert, the local experts run,
    a second all-to-all brings the results back. Dropless configs get capacity = seq (no drops)."""
    check_expert_parallel(cfg, mesh.shape[EXPERT_MESH_AXIS])
    token_ways = math.prod(mesh.shape[a] for a in token_axes)
    if x.shape[0] % token_ways:
        raise ValueError(
            f"the expert-parallel MoE layer splits the batch of {x.shape[0]} sequences over mesh axes "
            f"{token_axes} ({token_ways} ways); use a batch that is a multiple of {token_ways}"
        )
    layer_cfg = cfg if cfg.moe_impl == "capacity" else cfg.replace(
        moe_impl="capacity", capacity_factor=cfg.num_experts / cfg.experts_per_token)  # slots = seq: nothing dropped

    to_experts = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_MESH_AXIS, split_axis=0, concat_axis=1, tiled=True)
    from_experts = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_MESH_AXIS, split_axis=1, concat_axis=0, tiled=True)

    def local(experts, x, weights, chosen):
        y, dropped = capacity_moe(experts, x, weights, chosen, layer_cfg, exchange=(to_experts, from_experts))
        return y, jax.lax.psum(dropped, token_axes)

    tokens = P(token_axes)
    expert_specs = jax.tree.map(lambda _: P(EXPERT_MESH_AXIS), experts)
    return jax.shard_map(local, mesh=mesh, in_specs=(expert_specs, tokens, tokens, tokens), out_specs=(tokens, P()))(
        experts, x, weights, chosen
    )


# --- training-loss and logging helpers ---------------------------------------------------

def moe_loss_sums(moe_metrics: dict, tokens: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """(the weighted auxiliary objective times `tokens`, token-weighted sums of the layer metrics).

    moe_metrics: the per-layer metrics of one (micro-)batch, each with a leading [moe_layers] axis.
    The auxiliary losses are averaged over MoE layers; sums are divided by the total tokens later,
    so gradient accumulation weighs each micro-batch by its tokens, like the cross-entropy.
    """
    aux = moe_metrics["load_balance_loss"].mean()
    router_z = moe_metrics["router_z_loss"].mean()
    objective = (cfg.moe_aux_loss_weight * aux + cfg.moe_router_z_loss_weight * router_z) * tokens
    sums = {f"moe_{name}_sum": value * tokens for name, value in moe_metrics.items()}
    return objective, sums


def moe_metrics_from_sums(sums: dict, tokens: jax.Array) -> dict:
    """Logged metrics: layer means as scalars, per-layer values as arrays ([moe_layers], [moe_layers, E])."""
    per_layer = {key[len("moe_"):-len("_sum")]: value / tokens for key, value in sums.items() if key.startswith("moe_")}
    if not per_layer:
        return {}
    return {
        "moe/load_balance_loss": per_layer["load_balance_loss"].mean(),
        "moe/router_z_loss": per_layer["router_z_loss"].mean(),
        "moe/dropped_fraction": per_layer["dropped_fraction"].mean(),
        "moe/max_expert_load": per_layer["expert_load"].max(),
        "moe/load_balance_loss_per_layer": per_layer["load_balance_loss"],
        "moe/router_z_loss_per_layer": per_layer["router_z_loss"],
        "moe/dropped_fraction_per_layer": per_layer["dropped_fraction"],
        "moe/expert_load": per_layer["expert_load"],  # [moe_layers, E]: the expert-utilization histogram
    }


def collapse_threshold(cfg: ModelConfig) -> float:
    """An expert taking more than this fraction of the tokens (three quarters of the way from balanced,
    k / E, to all of them) means the router has collapsed onto it."""
    balanced = cfg.experts_per_token / cfg.num_experts
    return balanced + 0.75 * (1 - balanced)


def router_collapse(expert_load, cfg: ModelConfig) -> tuple[int, int, str] | None:
    """(layer, expert, warning) when one expert takes most of a layer's tokens, else None.

    expert_load: [moe_layers, E] fractions of tokens per expert (the metric "moe/expert_load")."""
    import numpy as np

    load = np.asarray(expert_load, dtype=np.float64).reshape(-1, cfg.num_experts)
    layer, expert = (int(i) for i in np.unravel_index(int(np.argmax(load)), load.shape))
    share = float(load[layer, expert])
    if share <= collapse_threshold(cfg):
        return None
    return layer, expert, (
        f"router collapse: MoE layer {layer} sends {share:.0%} of its tokens to expert {expert} "
        f"(balanced: {cfg.experts_per_token / cfg.num_experts:.0%}); raise moe_aux_loss_weight "
        f"(now {cfg.moe_aux_loss_weight}), add router_jitter, or lower the learning rate"
    )
