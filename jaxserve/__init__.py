"""jaxserve: a JAX/Pallas inference engine for Qwen2/Qwen2.5 models.

Example:
    >>> import jaxserve
    >>> outs = jaxserve.generate(jaxserve.load(), ["def add(a, b):"], jaxserve.SamplingParams(max_tokens=16))
"""

from jaxserve.beam_search import BeamSearchParams
from jaxserve.config import ModelConfig
from jaxserve.engine import Engine, beam_search, chat, classify, embed, generate, score
from jaxserve.engine_config import EngineConfig
from jaxserve.llm import LLM, EngineArgs, LLMEngine
from jaxserve.loading import LoadedModel, load
from jaxserve.lora import LoRARequest
from jaxserve.pooling import PoolingParams
from jaxserve.replicas import Replicas
from jaxserve.sampling import RequestOutputKind, SamplingParams
from jaxserve.structured import GuidedDecodingParams, StructuredOutputs, StructuredOutputsParams

__all__ = ["BeamSearchParams", "Engine", "EngineArgs", "EngineConfig", "GuidedDecodingParams", "LLM", "LLMEngine",
           "LoRARequest", "LoadedModel", "ModelConfig", "PoolingParams", "Replicas", "RequestOutputKind",
           "SamplingParams", "StructuredOutputs", "StructuredOutputsParams", "beam_search", "chat", "classify", "embed",
           "generate", "load", "score"]
