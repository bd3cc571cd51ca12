"""Pure-function Transformer: parameter specs, init and forward."""

from llmjax.model.transformer import (
    forward,
    hidden_states,
    hidden_states_and_moe_metrics,
    hidden_states_from_embeddings,
    init_params,
    logits_from_hidden,
    model_spec,
)

__all__ = ["forward", "hidden_states", "hidden_states_and_moe_metrics", "hidden_states_from_embeddings", "init_params",
           "logits_from_hidden", "model_spec"]
