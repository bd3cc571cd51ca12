"""Pure-function Transformer: parameter specs, init and forward."""

from llmjax.model.transformer import forward, hidden_states, init_params, logits_from_hidden, model_spec

__all__ = ["forward", "hidden_states", "init_params", "logits_from_hidden", "model_spec"]
