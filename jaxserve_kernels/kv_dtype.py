"""KV pools in 8-bit floats (vLLM's ``kv_cache_dtype="fp8"`` / ``"fp8_e5m2"``): how values enter and leave them.

Owns: the rule every kernel and reference that writes or reads a pool follows, so that a pool of
``float8_e4m3fn`` or ``float8_e5m2`` means the same thing on every path. Never decides the pool's dtype
(`jaxserve.engine_config.EngineConfig.kv_cache_dtype` does).

Why fp8: a page holds half the bytes of a bf16 one, so the same memory holds twice the tokens and a
decode step reads half the KV bytes. The scale is 1 (vLLM's default when a checkpoint brings no KV
scales): K and V are stored as they are, rounded to the nearest fp8 value.

- Into a pool: saturated at the format's largest finite value, then rounded (`to_pool`). XLA's and
  numpy's float-to-fp8 conversions turn an out-of-range value into NaN (e4m3fn has no infinity) or
  infinity (e5m2), either of which would poison every later attention over that key; vLLM's kernels
  saturate too. Triton's conversion on Hopper saturates already, so the clip costs it nothing.
- Out of a pool: widened as loaded to the products' dtype (`compute_dtype`), float32 accumulation, so
  only the storage is 8-bit. For 16-bit activations that dtype is float16, not bfloat16: both fp8
  formats widen into float16 exactly (e5m2 is float16's top byte; e4m3 in one `cvt.rn.f16x2.e4m3x2`
  a pair on Hopper), while Triton widens e4m3 to bfloat16 through a longer bit-twiddling sequence
  that left the decode kernel instruction-bound at ~2.0 TB/s of fp8 bytes against ~3.0 for bf16
  pages (H100, session 53, bench/results/bandwidth.md: 7B heads 1.33-1.47x faster than bf16 pages
  with bfloat16 products, 1.64-1.73x with float16). At head_dim 64 the same change lost (0.5B heads
  1.26-1.41x -> 1.22-1.24x), so heads under 128 dims keep bfloat16 (`FP8_PRODUCTS`). The queries and
  probabilities take float16's three more mantissa bits; its range (65504) is far above attention's
  inputs. Float32 activations keep float32. Every other pool dtype keeps its rule: products in the
  pool's own dtype.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def is_fp8(dtype: Any) -> bool:
    """Whether a pool of ``dtype`` is one of the 8-bit float formats.

    Example:
        >>> is_fp8(jnp.float8_e4m3fn), is_fp8(jnp.bfloat16)
        (True, False)
    """
    return jnp.dtype(dtype) in FP8_DTYPES


def to_pool(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` as stored in a pool of ``dtype``: for fp8, saturated at the largest finite value first.

    Example:
        >>> to_pool(jnp.array([1000.0, -3.0, 0.1]), jnp.float8_e4m3fn).astype(jnp.float32).tolist()
        [448.0, -3.0, 0.1015625]
    """
    if x.dtype == jnp.dtype(dtype):
        # Already stored values; and no max / min on fp8 values: Triton lowers one to llvm.maxnum on i8, which
        # LLVM refuses ("Failed to emit LLVM IR": the scatter kernel fed fp8 rows, H100, session 53).
        return x
    if is_fp8(dtype):
        limit = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -limit, limit)
    return x.astype(dtype)


# The 16-bit products' dtype over an fp8 pool: "auto" (float16 at head_dim >= 128, bfloat16 below: see the module
# docstring), or "float16" / "bfloat16" everywhere (to measure one against the other). Read when a kernel is traced.
FP8_PRODUCTS = os.environ.get("JAXSERVE_FP8_PRODUCTS", "auto")


def compute_dtype(pool_dtype: Any, act_dtype: Any, head_dim: int = 128) -> Any:
    """The dtype attention's products run in over a pool of ``pool_dtype`` (heads of ``head_dim``) for activations
    of ``act_dtype``: the pool's own, or over an fp8 pool float32 for float32 activations and float16 or bfloat16
    (`FP8_PRODUCTS`) for 16-bit ones.

    Example:
        >>> compute_dtype(jnp.float8_e4m3fn, jnp.bfloat16), compute_dtype(jnp.bfloat16, jnp.float32)
        (dtype('float16'), dtype(bfloat16))
    """
    if not is_fp8(pool_dtype):
        return jnp.dtype(pool_dtype)
    if jnp.dtype(act_dtype) == jnp.float32:
        return jnp.dtype(jnp.float32)
    if FP8_PRODUCTS == "auto":
        return jnp.dtype(jnp.float16 if head_dim >= 128 else jnp.bfloat16)
    return jnp.dtype(FP8_PRODUCTS)
