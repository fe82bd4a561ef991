"""jaxserve: a JAX/Pallas inference engine for Qwen2/Qwen2.5 models."""

from jaxserve.config import ModelConfig
from jaxserve.loading import LoadedModel, load

__all__ = ["ModelConfig", "LoadedModel", "load"]
