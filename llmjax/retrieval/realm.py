"""End-to-end retriever training through a language model's likelihood (REALM; RAG-sequence and RAG-token).

For an input x (a query: a docstring, or the text before a code chunk) and a target y (the code), the retriever
scores its top-K documents z_1..z_K, p(z | x) = softmax_k(q(x) . d(z_k) / temperature), and a frozen language model
gives log p(y | z_k, x). The marginal likelihood of y is the training signal of the towers q and d:

    RAG-sequence / REALM   -log p(y | x) = -log sum_k p(z_k | x) p(y | z_k, x)
    RAG-token              -sum_t log sum_k p(z_k | x) p(y_t | z_k, x, y_<t)

Only the scores carry gradients (the LM is frozen, its log-likelihoods are numbers computed before the step); a
document that makes y likely gains probability, which is how the retriever learns what helps the model. As in REALM,
the top-K come from an index whose document vectors are stale (re-embedded and rebuilt every N steps by the caller),
while the K retrieved documents are re-encoded inside the step so the document tower is trained too.

    lm = retrieved_log_likelihoods(lm_params, lm_cfg, rows, num_targets)     # [B, K]: log p(y | z_k, x)
    loss = realm_loss(query_params, doc_params, batch, cfg, temperature)      # mean marginal NLL over the batch
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.embed import embed_tokens

MARGINALS = ("sequence", "token")


def document_log_probs(retrieval_logits: jax.Array) -> jax.Array:
    """log p(z_k | x): retrieval_logits [B, K] (score / temperature; -inf for a slot with no document) -> [B, K]."""
    return jax.nn.log_softmax(retrieval_logits.astype(jnp.float32), axis=-1)


def marginal_nll(retrieval_logits: jax.Array, lm_log_likelihood: jax.Array) -> jax.Array:
    """RAG-sequence / REALM: -log sum_k p(z_k | x) p(y | z_k, x). retrieval_logits [B, K], lm_log_likelihood [B, K]
    (log p(y | z_k, x), the target's whole sequence) -> [B] nats."""
    return -jax.nn.logsumexp(document_log_probs(retrieval_logits) + lm_log_likelihood.astype(jnp.float32), axis=-1)


def token_marginal_nll(retrieval_logits: jax.Array, token_log_likelihood: jax.Array,
                       target_mask: jax.Array | None = None) -> jax.Array:
    """RAG-token: -sum_t log sum_k p(z_k | x) p(y_t | z_k, x, y_<t). retrieval_logits [B, K], token_log_likelihood
    [B, K, T], target_mask [B, T] (True at scored tokens; None: all) -> [B] nats."""
    log_z = document_log_probs(retrieval_logits)[:, :, None]  # [B, K, 1]
    per_token = jax.nn.logsumexp(log_z + token_log_likelihood.astype(jnp.float32), axis=1)  # [B, T]
    if target_mask is not None:
        per_token = jnp.where(target_mask, per_token, 0.0)
    return -per_token.sum(axis=-1)


def retrieval_logits(query_params: dict, doc_params: dict, batch: dict, cfg, temperature: float) -> jax.Array:
    """The towers' scores of each query's K retrieved documents, divided by temperature: [B, K] (differentiable in
    both towers). batch: query_tokens / query_mask [B, Lq], doc_tokens / doc_mask [B, K, Ld] (encoder ids)."""
    queries = embed_tokens(query_params, batch["query_tokens"], batch["query_mask"], cfg)  # [B, d]
    size, k, length = batch["doc_tokens"].shape
    docs = embed_tokens(doc_params, batch["doc_tokens"].reshape(size * k, length),
                        batch["doc_mask"].reshape(size * k, length), cfg).reshape(size, k, -1)  # [B, K, d]
    return jnp.einsum("bd,bkd->bk", queries, docs) / temperature


def realm_loss(query_params: dict, doc_params: dict, batch: dict, cfg, temperature: float,
               marginal: str = "sequence") -> jax.Array:
    """Mean marginal NLL of the batch's targets (scalar): batch as in retrieval_logits plus "lm_log_likelihood"
    [B, K] (sequence) or [B, K, T] with "target_mask" [B, T] (token), from the frozen LM."""
    if marginal not in MARGINALS:
        raise ValueError(f"marginal={marginal!r}: expected one of {', '.join(MARGINALS)}")
    logits = retrieval_logits(query_params, doc_params, batch, cfg, temperature)
    likelihood = jax.lax.stop_gradient(batch["lm_log_likelihood"])
    if marginal == "sequence":
        return marginal_nll(logits, likelihood).mean()
    return token_marginal_nll(logits, likelihood, batch.get("target_mask")).mean()


def retrieved_log_likelihoods(lm_params: dict, lm_cfg, rows, num_targets: int, *,
                              per_token: bool = False) -> np.ndarray:
    """The frozen LM's log p(y | z_k, x) for rows [B, K, S] of LM token ids (document, then x, then the target's last
    num_targets tokens): float32 [B, K] (summed over the target) or [B, K, num_targets] with per_token.
    llmjax.evaluation.target_token_losses scores each row (one forward pass over the B * K rows)."""
    from llmjax.evaluation import target_token_losses

    rows = np.asarray(rows, np.int32)
    if rows.ndim != 3:
        raise ValueError(f"rows of shape {rows.shape}: expected [batch, documents, seq]")
    size, k, length = rows.shape
    log_probs = -target_token_losses(lm_params, lm_cfg, rows.reshape(size * k, length), num_targets)
    log_probs = log_probs.reshape(size, k, num_targets)
    return log_probs if per_token else log_probs.sum(axis=-1)


__all__ = ["MARGINALS", "document_log_probs", "marginal_nll", "realm_loss", "retrieval_logits",
           "retrieved_log_likelihoods", "token_marginal_nll"]
