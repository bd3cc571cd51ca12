"""llmjax.nn: the building blocks of every llmjax model as small pure functions with explicit arguments.

Each takes arrays and returns arrays (no parameters held, no config object), checks its arguments' shapes
and dtypes with one clear error, and is what llmjax.model's layers are built from:

    linear, embedding                      linear.py
    fp8_linear                             fp8.py        (e4m3 operands, e5m2 gradients, per-tensor scales)
    layer_norm, rms_norm                   norms.py
    gelu, quick_gelu, silu, swiglu, geglu  activations.py
    softmax, log_softmax                   activations.py
    cross_entropy, token_cross_entropy     losses.py
    scaled_dot_product_attention           attention.py  (masks, biases, grouped-query heads)
    attention_mask                                       (causal, sliding-window, segment masks)
    rope, rope_frequencies                 rope.py       (layouts "half" and "interleaved")
    clip_by_global_norm, global_norm       clip.py
"""

from llmjax.nn.activations import geglu, gelu, log_softmax, quick_gelu, silu, softmax, swiglu
from llmjax.nn.attention import attention_mask, scaled_dot_product_attention
from llmjax.nn.clip import clip_by_global_norm, global_norm
from llmjax.nn.fp8 import fp8_linear
from llmjax.nn.linear import embedding, linear
from llmjax.nn.losses import cross_entropy, token_cross_entropy
from llmjax.nn.norms import layer_norm, rms_norm
from llmjax.nn.rope import rope, rope_frequencies, rope_layout_permutation

__all__ = [
    "attention_mask",
    "clip_by_global_norm",
    "cross_entropy",
    "embedding",
    "fp8_linear",
    "geglu",
    "gelu",
    "quick_gelu",
    "global_norm",
    "layer_norm",
    "linear",
    "log_softmax",
    "rms_norm",
    "rope",
    "rope_frequencies",
    "rope_layout_permutation",
    "scaled_dot_product_attention",
    "silu",
    "softmax",
    "swiglu",
    "token_cross_entropy",
]
