"""Inference: KV cache, prefill / decode steps, sampling, on-device generation, beam search, constrained output.

    from llmjax.infer import generate, beam_search, SamplingConfig
    out = generate(params, cfg, [[1, 2, 3]], max_new_tokens=32, sampling=SamplingConfig(temperature=0.8, seed=0))
"""

from llmjax.infer.beam import beam_search
from llmjax.infer.generate import GenerationError, continuation, generate, greedy_continuation
from llmjax.infer.sampling import SamplingConfig

__all__ = ["GenerationError", "SamplingConfig", "beam_search", "continuation", "generate", "greedy_continuation"]
