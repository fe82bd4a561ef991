"""Pallas kernels of jaxserve, each beside a plain-jnp reference of the same function.

Owns: the cache scatter (new K/V into pages), paged decode and prefill attention, the fused
decode attention (RoPE + cache write + attention), the flash-decoding split merge, and the
skinny matmul (decode projections).
Never holds model or scheduling logic.
"""

from jaxserve_kernels.cache_scatter import cache_scatter, cache_scatter_reference
from jaxserve_kernels.decode_attention import fused_decode_attention, fused_decode_attention_reference
from jaxserve_kernels.paged_attention import paged_attention, paged_attention_reference
from jaxserve_kernels.prefill_attention import (paged_prefill_attention,
                                       paged_prefill_attention_reference)
from jaxserve_kernels.skinny_matmul import skinny_matmul, skinny_matmul_reference
from jaxserve_kernels.split_combine import combine_splits, combine_splits_reference

__all__ = [
    "cache_scatter", "cache_scatter_reference",
    "fused_decode_attention", "fused_decode_attention_reference",
    "paged_attention", "paged_attention_reference",
    "paged_prefill_attention", "paged_prefill_attention_reference",
    "skinny_matmul", "skinny_matmul_reference",
    "combine_splits", "combine_splits_reference",
]
