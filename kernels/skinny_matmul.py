"""Skinny matmul: a few activation rows times a weight matrix, at weight-streaming speed.

Owns: the decode step's projections (`x [M, K] @ w [K, N] + bias` with M, the batch,
at most `MAX_ROWS`) and their jnp reference. Never decides when it is used (the model
does: decode steps of small batches under the "pallas" implementation).

Why: a decode step reads every weight once and does almost no arithmetic on it, so a
projection should take its weight's bytes over the HBM bandwidth. XLA does not get there
at small M (H100 profile, Qwen2.5-0.5B, bench/results/decode_step.md): at M = 1 it
rewrites the dot as a multiply (materialized at the weight's size for two of the four
projections) plus a reduction, ~790 µs a step for 713 MB of layer weights (~0.9 TB/s);
at M = 64 its Triton GEMMs reach ~1 TB/s.

How: one program per (block of `block_n` output columns, K split). Each program keeps the
M rows (padded to 16, the MMA's minimum, by masked loads) and streams its weight columns
`block_k` rows at a time through a tensor-core product with a float32 accumulator; the
loop is software-pipelined (`num_stages`) so several weight tiles are in flight. Narrow
matrices (few column blocks) split K so that enough programs run to fill the GPU; the
splits write float32 partial sums that one XLA reduction adds (which XLA fuses into the
consumer when it can), or hands them to a consumer that adds them as it loads them
(`partials=True`). Deterministic: no atomics.

Prologues: the op that feeds a projection in the decoder layer (RMSNorm given each row's
inverse RMS, or SwiGLU's `silu(gate) * up`) is applied to each activation tile as it is
loaded, so it needs no kernel of its own. At decode sizes every small XLA kernel costs
1-2 µs a launch against a few µs for a projection; the layer's glue (norms, activation,
split sums, residual adds) was ~270 µs of a ~950 µs batch-1 step on the H100.

Backend: Pallas Triton, like the other kernels (`kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import pallas_compat as compat

# Up to this many rows the weight stream dominates; beyond it XLA's GEMMs are the better choice.
MAX_ROWS = 64
PROLOGUES = (None, "none", "rmsnorm", "swiglu")
# Programs wanted in flight: about two per H100 SM.
_TARGET_PROGRAMS = 264


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernel(x_ref, w_ref, *rest, prologue: str, has_bias: bool, num_splits: int,
            partials: bool, k_per_split: int, block_m: int, block_n: int, block_k: int,
            precision):
    rest = list(rest)
    if prologue == "rmsnorm":
        inv_rms_ref, norm_w_ref = rest.pop(0), rest.pop(0)
    b_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    col_block, split = pl.program_id(0), pl.program_id(1)
    rows = x_ref.shape[0]
    k_total, n_total = w_ref.shape
    row_ids = jnp.arange(block_m)
    row_ok = row_ids < rows
    cols = col_block * block_n + jnp.arange(block_n)
    col_ok = cols < n_total
    k_start = split * k_per_split
    k_end = jnp.minimum(k_start + k_per_split, k_total)
    num_iters = pl.cdiv(jnp.maximum(k_end - k_start, 0), block_k)
    if prologue == "rmsnorm":
        inv_rms = compat.load(inv_rms_ref.at[pl.ds(0, block_m)], mask=row_ok, other=0)

    def load_x(k0, k_ok):
        mask = row_ok[:, None] & k_ok[None, :]
        x = compat.load(x_ref.at[pl.ds(0, block_m), pl.ds(k0, block_k)], mask=mask, other=0)
        if prologue == "rmsnorm":
            # RMSNorm's arithmetic as the model does it: normalize in f32, round to the
            # activation dtype, then the weight multiply in that dtype.
            x = (x.astype(jnp.float32) * inv_rms[:, None]).astype(x_ref.dtype)
            scale = compat.load(norm_w_ref.at[pl.ds(k0, block_k)], mask=k_ok, other=0)
            x = (x.astype(jnp.float32) * scale.astype(jnp.float32)[None, :]).astype(x_ref.dtype)
        elif prologue == "swiglu":
            # x holds [gate | up]: silu(gate) * up, each rounded like the model's ops.
            up = compat.load(x_ref.at[pl.ds(0, block_m), pl.ds(k_total + k0, block_k)],
                             mask=mask, other=0)
            g = x.astype(jnp.float32)
            x = (g * jax.nn.sigmoid(g)).astype(x_ref.dtype)
            x = (x.astype(jnp.float32) * up.astype(jnp.float32)).astype(x_ref.dtype)
        return x

    def body(i, acc):
        k0 = k_start + i * block_k
        ks = k0 + jnp.arange(block_k)
        k_ok = ks < k_end
        x = load_x(k0, k_ok)
        w = compat.load(w_ref.at[pl.ds(k0, block_k), pl.ds(col_block * block_n, block_n)],
                        mask=k_ok[:, None] & col_ok[None, :], other=0)
        return acc + compat.dot(x.astype(w.dtype), w, precision=precision)

    acc = lax.fori_loop(0, num_iters, body, jnp.zeros((block_m, block_n), jnp.float32))
    mask = row_ok[:, None] & col_ok[None, :]
    if partials:
        compat.store(o_ref.at[split, pl.ds(0, block_m), pl.ds(col_block * block_n, block_n)],
                     acc, mask=mask)
    else:
        if has_bias:
            bias = compat.load(b_ref.at[pl.ds(col_block * block_n, block_n)], mask=col_ok, other=0)
            acc = acc + bias.astype(jnp.float32)[None, :]
        compat.store(o_ref.at[pl.ds(0, block_m), pl.ds(col_block * block_n, block_n)],
                     acc.astype(o_ref.dtype), mask=mask)


def default_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(block_n, block_k, num_splits): 64 columns x 128 rows of weight (16 KiB of bf16) a
    loop iteration; K split until about `_TARGET_PROGRAMS` programs run."""
    block_n, block_k = 64, 128
    col_blocks = pl.cdiv(n, block_n)
    k_blocks = pl.cdiv(k, block_k)
    num_splits = max(1, min(k_blocks, _TARGET_PROGRAMS // col_blocks))
    return block_n, block_k, num_splits


@functools.partial(jax.jit, static_argnames=("prologue", "block_n", "block_k", "num_splits",
                                             "num_warps", "num_stages", "partials", "interpret"))
def _skinny(x, w, bias, inv_rms, norm_weight, *, prologue: str, block_n: int, block_k: int,
            num_splits: int, num_warps: int, num_stages: int, partials: bool, interpret: bool):
    m = x.shape[0]
    k, n = w.shape
    block_m = max(16, _next_pow2(m))
    k_blocks = pl.cdiv(k, block_k)
    k_per_split = pl.cdiv(k_blocks, num_splits) * block_k
    precision = lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    # The bias goes in the kernel only when one program sees a column's whole sum.
    bias_in_kernel = bias is not None and num_splits == 1 and not partials
    in_kernel_partials = partials or num_splits > 1
    kernel = functools.partial(_kernel, prologue=prologue, has_bias=bias_in_kernel,
                               num_splits=num_splits, partials=in_kernel_partials,
                               k_per_split=k_per_split, block_m=block_m, block_n=block_n,
                               block_k=block_k, precision=precision)
    args = [x, w] + ([inv_rms.astype(jnp.float32), norm_weight] if prologue == "rmsnorm" else []) \
        + ([bias] if bias_in_kernel else [])
    if in_kernel_partials:
        out_shape = jax.ShapeDtypeStruct((num_splits, m, n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, block_n), num_splits),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=compat.compiler_params(num_warps=num_warps, num_stages=num_stages),
        name="skinny_matmul",
    )(*args)
    if partials or not in_kernel_partials:
        return out
    # Added as elementwise ops, not a reduction, so that XLA fuses the sum into the
    # consumer's kernel (a residual add, the next RMSNorm's statistics).
    out = functools.reduce(operator.add, [out[i] for i in range(num_splits)])
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def skinny_matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                  prologue: str | None = None, inv_rms: jax.Array | None = None,
                  norm_weight: jax.Array | None = None, partials: bool = False,
                  interpret: bool | None = None, block_n: int | None = None,
                  block_k: int | None = None, num_splits: int | None = None,
                  num_warps: int = 4, num_stages: int = 3) -> jax.Array:
    """`f(x) @ w (+ bias)` for a few rows of `x`, accumulated in float32.

    `f` is a prologue applied to each `x` tile as it is loaded, so the op that produces
    the projection's input needs no kernel of its own:
    - None: `f(x) = x`;
    - "rmsnorm": `f(x) = norm_weight * (x * inv_rms[:, None])`, RMSNorm given each row's
      inverse RMS (each rounding as in `jaxserve.model.RMSNorm`);
    - "swiglu": `x` is `[M, 2K]` holding `[gate | up]`; `f(x) = silu(gate) * up`.

    Args:
        x: `[M, K]` activations (`[M, 2K]` for "swiglu"), M <= `MAX_ROWS`.
        w: `[K, N]` weights (Flax `Dense` layout).
        bias: optional `[N]`.
        prologue, inv_rms (`[M]`), norm_weight (`[K]`): see above.
        partials: return the float32 K-split partial sums `[num_splits, M, N]` (bias not
            added) for a consumer that adds them itself; otherwise `[M, N]` in x's dtype.
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        block_n, block_k, num_splits: tiling; None picks `default_tiling`.
        num_warps, num_stages: Triton launch parameters.

    Example:
        >>> x = jnp.ones((2, 256), jnp.bfloat16); w = jnp.ones((256, 384), jnp.bfloat16)
        >>> skinny_matmul(x, w).shape
        (2, 384)
        >>> skinny_matmul(jnp.ones((2, 512), jnp.bfloat16), w, prologue="swiglu").shape
        (2, 384)
    """
    _check(x, w, bias, prologue, inv_rms, norm_weight)
    dn, dk, ds = default_tiling(x.shape[0], w.shape[0], w.shape[1])
    block_n, block_k = block_n or dn, block_k or dk
    num_splits = num_splits or ds
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    return _skinny(x, w, bias, inv_rms, norm_weight, prologue=prologue or "none",
                   block_n=block_n, block_k=block_k, num_splits=num_splits,
                   num_warps=num_warps, num_stages=num_stages, partials=partials,
                   interpret=compat.resolve_interpret(interpret))


def _check(x, w, bias, prologue, inv_rms, norm_weight) -> None:
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    k_in = w.shape[0] * (2 if prologue == "swiglu" else 1) if w.ndim == 2 else None
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != k_in:
        raise ValueError(f"x must be [M, K] ([M, 2K] for swiglu) and w [K, N], got "
                         f"{x.shape} and {w.shape} (prologue {prologue})")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"x has {x.shape[0]} rows, more than MAX_ROWS={MAX_ROWS}")
    if bias is not None and bias.shape != (w.shape[1],):
        raise ValueError(f"bias must be [{w.shape[1]}], got {bias.shape}")
    if prologue == "rmsnorm":
        if inv_rms is None or inv_rms.shape != (x.shape[0],):
            raise ValueError(f"inv_rms must be [{x.shape[0]}] for the rmsnorm prologue, got "
                             f"{None if inv_rms is None else inv_rms.shape}")
        if norm_weight is None or norm_weight.shape != (x.shape[1],):
            raise ValueError(f"norm_weight must be [{x.shape[1]}] for the rmsnorm prologue, got "
                             f"{None if norm_weight is None else norm_weight.shape}")


def apply_prologue(x: jax.Array, prologue: str | None, inv_rms: jax.Array | None = None,
                   norm_weight: jax.Array | None = None) -> jax.Array:
    """The prologue `f(x)` of `skinny_matmul` in jnp (for the reference and for XLA paths).

    Example:
        >>> apply_prologue(jnp.array([[0.0, 2.0]]), "swiglu").tolist()
        [[0.0]]
    """
    if prologue in (None, "none"):
        return x
    if prologue == "rmsnorm":
        xn = (x.astype(jnp.float32) * inv_rms.astype(jnp.float32)[..., None]).astype(x.dtype)
        return (xn.astype(jnp.float32) * norm_weight.astype(jnp.float32)).astype(x.dtype)
    if prologue == "swiglu":
        k = x.shape[-1] // 2
        g = x[..., :k].astype(jnp.float32)
        act = (g * jax.nn.sigmoid(g)).astype(x.dtype)
        return (act.astype(jnp.float32) * x[..., k:].astype(jnp.float32)).astype(x.dtype)
    raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")


def skinny_matmul_reference(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                            prologue: str | None = None, inv_rms: jax.Array | None = None,
                            norm_weight: jax.Array | None = None) -> jax.Array:
    """jnp reference: the prologue, then a float32 product (HIGHEST precision), back in x's dtype.

    Example:
        >>> skinny_matmul_reference(jnp.ones((1, 4)), jnp.ones((4, 3))).tolist()
        [[4.0, 4.0, 4.0]]
    """
    x = apply_prologue(x, prologue, inv_rms, norm_weight)
    out = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)
