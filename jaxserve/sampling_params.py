"""vLLM's ``vllm.sampling_params`` module under jaxserve's names, so that ``from vllm.sampling_params import ...``
becomes ``from jaxserve.sampling_params import ...`` and the rest of a script stays as it is.

Example:
    >>> from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
    >>> SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"])).structured_outputs.choice
    ('yes', 'no')
"""

from jaxserve.beam_search import BeamSearchParams
from jaxserve.sampling import RequestOutputKind, SamplingParams
from jaxserve.structured import GuidedDecodingParams, StructuredOutputs, StructuredOutputsParams

__all__ = ["BeamSearchParams", "GuidedDecodingParams", "RequestOutputKind", "SamplingParams", "StructuredOutputs",
           "StructuredOutputsParams"]
