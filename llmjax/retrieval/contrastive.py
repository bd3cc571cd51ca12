"""Contrastive (InfoNCE) training of dense retrievers: the loss, and the query / document towers it trains.

    loss = info_nce_loss(queries, positives, hard_negatives, temperature=0.05, doc_ids=ids, hard_ids=hard_ids)

Per query i the candidates are its positive (column i), the other queries' positives (in-batch negatives) and its own
M mined hard negatives; the loss is the cross-entropy of the positive among them at `temperature`:

    -log exp(s(q_i, d_i) / t) / sum over kept candidates c of exp(s(q_i, c) / t)

Masking (with document ids given): a candidate that is the same document as the query's positive (a duplicate in the
batch, or a mined "negative" that is in fact the positive) is never counted as a negative, and a document that
appears more than once among a query's candidates counts once. symmetric=True adds the document -> query direction
(each positive against the batch's queries; queries sharing that document masked) and averages the two.

Towers: the query and document encoders are one model ("shared") or two ("separate"), trained fully or through LoRA
adapters (llmjax.peft.lora: merged into the frozen weights inside the step). `encode` is llmjax.embed.embed_tokens,
differentiated inside the training step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.embed import embed_tokens

TOWERS = ("shared", "separate")


def candidate_mask(doc_ids: jax.Array, hard_ids: jax.Array | None) -> jax.Array:
    """bool [B, B + M]: which candidates of each query count (see the module docstring). doc_ids [B] int: the id of
    each query's positive; hard_ids [B, M] int: the ids of its hard negatives (None: M = 0)."""
    batch = doc_ids.shape[0]
    candidates = jnp.broadcast_to(doc_ids[None, :], (batch, batch))  # [B, B]: row i's in-batch candidate ids
    if hard_ids is not None:
        candidates = jnp.concatenate([candidates, hard_ids], axis=1)  # [B, C]
    count = candidates.shape[1]
    own = jnp.arange(count)[None, :] == jnp.arange(batch)[:, None]  # [B, C]: the positive's column
    is_positive_doc = candidates == doc_ids[:, None]  # [B, C]
    same = candidates[:, :, None] == candidates[:, None, :]  # [B, C, C]
    earlier = jnp.tril(jnp.ones((count, count), bool), k=-1)  # [C, C]: c' < c
    repeated = jnp.any(same & earlier[None], axis=2)  # [B, C]: an earlier candidate has this id
    return own | (~is_positive_doc & ~repeated)


def info_nce_loss(queries: jax.Array, positives: jax.Array, hard_negatives: jax.Array | None = None, *,
                  temperature: float = 0.05, symmetric: bool = False, doc_ids: jax.Array | None = None,
                  hard_ids: jax.Array | None = None) -> jax.Array:
    """Mean InfoNCE loss (scalar, float32 or the inputs' dtype if wider).

    queries [B, d], positives [B, d] (row i: query i's positive), hard_negatives [B, M, d] or None: embeddings
    (normalized or not: the score is the dot product). doc_ids [B], hard_ids [B, M]: document ids for masking
    duplicates (None: every document distinct). temperature > 0. symmetric: average with the doc -> query loss."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be positive")
    batch = queries.shape[0]
    bad_hard = hard_negatives is not None and (hard_negatives.ndim != 3 or hard_negatives.shape[0] != batch
                                               or hard_negatives.shape[2] != queries.shape[1])
    if positives.shape != queries.shape or bad_hard:
        raise ValueError(f"info_nce_loss: queries {queries.shape}, positives {positives.shape} and hard_negatives "
                         f"{None if hard_negatives is None else hard_negatives.shape} do not fit [B, d], [B, d], "
                         f"[B, M, d]")
    dtype = jnp.promote_types(queries.dtype, jnp.float32)
    queries, positives = queries.astype(dtype), positives.astype(dtype)
    logits = queries @ positives.T / temperature  # [B, B]
    if hard_negatives is not None:
        hard = jnp.einsum("bd,bmd->bm", queries, hard_negatives.astype(dtype)) / temperature  # [B, M]
        logits = jnp.concatenate([logits, hard], axis=1)  # [B, B + M]
    if doc_ids is None:
        doc_ids = jnp.arange(batch)
        if hard_negatives is not None:
            hard_ids = batch + jnp.arange(batch * hard_negatives.shape[1]).reshape(batch, -1)
    elif hard_negatives is not None and hard_ids is None:
        raise ValueError("info_nce_loss: doc_ids given without hard_ids for the hard negatives")
    keep = candidate_mask(doc_ids, hard_ids if hard_negatives is not None else None)
    logits = jnp.where(keep, logits, -jnp.inf)
    diagonal = jnp.arange(batch)
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[diagonal, diagonal])
    if symmetric:
        reverse = positives @ queries.T / temperature  # [B docs, B queries]
        shares = doc_ids[:, None] == doc_ids[None, :]  # query j is also a positive of doc i
        reverse = jnp.where(~shares | (diagonal[:, None] == diagonal[None, :]), reverse, -jnp.inf)
        loss = (loss + jnp.mean(jax.nn.logsumexp(reverse, axis=1) - reverse[diagonal, diagonal])) / 2
    return loss


def info_nce_reference(queries, positives, hard_negatives=None, *, temperature=0.05, symmetric=False, doc_ids=None,
                       hard_ids=None) -> float:
    """info_nce_loss in float64 NumPy with explicit loops over queries and candidates (for tests)."""
    queries, positives = np.asarray(queries, np.float64), np.asarray(positives, np.float64)
    batch = len(queries)
    doc_ids = list(range(batch)) if doc_ids is None else [int(i) for i in doc_ids]
    hard = [] if hard_negatives is None else np.asarray(hard_negatives, np.float64)
    if hard_negatives is not None and hard_ids is None:
        hard_ids = [[f"hard{i}.{m}" for m in range(hard.shape[1])] for i in range(batch)]
    total = 0.0
    for i in range(batch):
        candidates = [(doc_ids[j], positives[j], j == i) for j in range(batch)]
        if hard_negatives is not None:
            candidates += [(hard_ids[i][m], hard[i, m], False) for m in range(hard.shape[1])]
        seen, terms, positive = set(), [], None
        for ident, vector, is_own in candidates:
            score = queries[i] @ vector / temperature
            if is_own:
                positive = score
                terms.append(score)
            elif ident != doc_ids[i] and ident not in seen:
                terms.append(score)
            seen.add(ident)
        total += np.log(np.sum(np.exp(terms))) - positive
    loss = total / batch
    if symmetric:
        reverse = 0.0
        for j in range(batch):
            terms = [positives[j] @ queries[i] / temperature for i in range(batch)
                     if i == j or doc_ids[i] != doc_ids[j]]
            reverse += np.log(np.sum(np.exp(terms))) - positives[j] @ queries[j] / temperature
        loss = (loss + reverse / batch) / 2
    return float(loss)


# --- towers ----------------------------------------------------------------------------------------------------


def encode(params: dict, tokens: jax.Array, token_mask: jax.Array, cfg, *, pooling: str = "mean",
           normalize: bool = True) -> jax.Array:
    """tokens, token_mask [batch, seq] -> pooled float32 embeddings [batch, d_model]: llmjax.embed.embed_tokens, which
    differentiates and inlines into a training step like any jitted function."""
    return embed_tokens(params, tokens, token_mask, cfg, pooling=pooling, normalize=normalize)


def tower_params(trainable: dict, frozen: dict, tower: str, cfg, lora_cfg=None) -> dict:
    """The full parameters of one tower ("query" or "doc"). trainable: {"query": ..., "doc": ...} for separate
    towers or {"shared": ...}: the model's params (full fine-tuning) or LoRA adapters (lora_cfg given, merged into
    frozen[tower or "shared"], the base weights)."""
    name = tower if tower in trainable else "shared"
    if lora_cfg is None:
        return trainable[name]
    from llmjax.peft.lora import merge

    return merge(frozen[name], trainable[name], cfg, lora_cfg)


__all__ = ["TOWERS", "candidate_mask", "encode", "info_nce_loss", "info_nce_reference", "tower_params"]
