"""FP8 weight-only quantization (vLLM's ``--quantization fp8`` for a bf16 checkpoint): the decoder's projection
weights held as float8 e4m3 with one float32 scale per output channel, half the bytes of bf16.

Why: a decode step reads every weight once, so its time at small batches is the weights' bytes over the memory
bandwidth, and the weights bound what fits beside the KV pool (Qwen2.5-32B is 64 GB in bf16, 32 GB in fp8: one
80 GB GPU holds it with room for pages). What changes: qkv_proj, o_proj, gate_up_proj and down_proj of every layer
(nearly all of a model's weight bytes but the embedding); the embedding, the LM head, the norms and the biases stay in
the model's dtype, as vLLM keeps them. A projection computes ``(x @ upcast(w_q)) * scale`` in the activation dtype
(`jaxserve.model.Linear`): the product of the upcast weights, scaled per output column, which is exactly the product
with the dequantized weights ``upcast(w_q) * scale`` up to rounding.

Each channel's scale is its largest magnitude over e4m3's largest finite value (448), so no weight saturates;
e4m3 keeps 3 mantissa bits (a relative error of at most 2^-4 per weight).

Example:
    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> q, s = quantize_fp8(w, axis=0)
    >>> q.dtype, s.shape
    (dtype(float8_e4m3fn), (8,))
    >>> bool(jnp.all(jnp.abs(dequantize(q, s, axis=0) - w) <= jnp.abs(w) / 16 + 1e-6))
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

QUANTIZATIONS = ("fp8",)
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
# The projections quantized: every layer's (their weights are nearly all of a Qwen2.5 model's but the embedding).
QUANTIZED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
SCALE = "kernel_scale"


def quantize_fp8(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """``w`` as float8 e4m3 and its float32 scales along ``axis`` (the output channels): ``w ~ q * scale``."""
    wf = w.astype(jnp.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    scale = jnp.max(jnp.abs(wf), axis=reduce) / FP8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel: any scale, zeros stay zeros
    q = (wf / jnp.expand_dims(scale, reduce)).astype(FP8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, axis: int, dtype: Any = jnp.float32) -> jax.Array:
    """The weights ``q`` and ``scale`` stand for (for references and tests)."""
    reduce = tuple(i for i in range(q.ndim) if i != axis % q.ndim)
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, reduce)).astype(dtype)


def output_axis() -> int:
    """The output-channel axis of a projection kernel in the model's layout (`jaxserve.model.WEIGHT_LAYOUT`)."""
    from jaxserve import model as model_module

    return 0 if model_module.WEIGHT_LAYOUT == "nk" else 1


def quantize_params(params: Any, method: str = "fp8") -> Any:
    """``params`` (the model's tree) with every layer's projections quantized: their ``kernel`` float8 e4m3 and a
    ``kernel_scale`` [out] float32 beside it; everything else as it was. Runs where ``params`` are (a host copy keeps
    the accelerator free of the full-precision weights).

    Example:
        >>> q = quantize_params(m.params)                                    # doctest: +SKIP
        >>> q["layers_0"]["mlp"]["down_proj"]["kernel"].dtype                  # doctest: +SKIP
        dtype(float8_e4m3fn)
    """
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {method!r}")
    axis = output_axis()

    def walk(tree: Any, name: str | None = None) -> Any:
        if not isinstance(tree, dict):
            return tree
        if name in QUANTIZED and "kernel" in tree and tree["kernel"].dtype != FP8:
            q, scale = quantize_fp8(tree["kernel"], axis)
            return {**tree, "kernel": q, SCALE: scale}
        return {k: walk(v, k) for k, v in tree.items()}

    return walk(params)


def cast_params(params: Any, dtype: Any) -> Any:
    """``params`` in ``dtype``, but for quantized projections' float8 weights and float32 scales, which stay as they
    are (a model loaded quantized and run in bf16 keeps its fp8 weights).

    Example:
        >>> p = {"kernel": jnp.ones(2, FP8), SCALE: jnp.ones(2), "bias": jnp.ones(2)}
        >>> {k: str(v.dtype) for k, v in cast_params(p, jnp.bfloat16).items()}
        {'bias': 'bfloat16', 'kernel': 'float8_e4m3fn', 'kernel_scale': 'float32'}
    """
    def cast(path: tuple, x: jax.Array) -> jax.Array:
        keep = x.dtype == FP8 or getattr(path[-1], "key", None) == SCALE or x.dtype == dtype
        return x if keep else x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def is_quantized(params: Any) -> bool:
    """Whether ``params`` hold quantized projections (`quantize_params`)."""
    return any(leaf.dtype == FP8 for leaf in jax.tree_util.tree_leaves(params))
