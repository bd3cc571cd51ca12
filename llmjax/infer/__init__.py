"""Inference: KV cache, prefill / decode steps, sampling, on-device generation, beam search, constrained output,
speculative decoding; the serving engine (llmjax.infer.engine) and HTTP server (llmjax.infer.server) are imported
from their modules.

    from llmjax.infer import generate, beam_search, SamplingConfig
    out = generate(params, cfg, [[1, 2, 3]], max_new_tokens=32, sampling=SamplingConfig(temperature=0.8, seed=0))
"""

from llmjax.infer.beam import beam_search
from llmjax.infer.generate import GenerationError, continuation, generate, greedy_continuation
from llmjax.infer.sampling import SamplingConfig
from llmjax.infer.speculative import speculative_generate

__all__ = ["GenerationError", "SamplingConfig", "beam_search", "continuation", "generate", "greedy_continuation",
           "speculative_generate"]
