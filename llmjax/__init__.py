"""llmjax: a functional LLM systems stack on JAX/XLA."""

from llmjax import _source_tree

_source_tree.install()  # llmjax.kernels / llmjax.experiments in an uninstalled checkout

from llmjax.config import ConfigError, ModelConfig, PRESETS, RopeScaling, count_params, get_config

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "RopeScaling", "count_params", "get_config"]
__version__ = "0.1.0"
