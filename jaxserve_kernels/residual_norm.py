"""Residual add + RMSNorm: the glue between two decoder sublayers as one kernel.

Owns: `add_rms_norm` (the residual stream plus a projection's K-split partial sums, then the
next sublayer's RMSNorm) and its jnp reference. Never decides when it is used (the model
does: decode steps of at most `jaxserve.model.SKINNY_ROWS` rows under "pallas").

Why: between the skinny matmuls of a decode step sit the sum of a projection's K splits, the
residual add, the norm's statistics and its scale. XLA spreads them over several small
fusions (about 11 launches a layer with SwiGLU and the qkv bias; ~270 µs of a ~950 µs
Qwen2.5-0.5B batch-1 step on the H100, bench/results/decode_step.md), and a launch costs more
than the bytes. Prologues inside the matmul were measured and lost (they stall its weight
pipeline); this kernel keeps the matmul a pure weight stream and does all the glue in one
launch instead.

How: one program per row. It sums the row's float32 partials, rounds the sum to the
activation dtype and adds it to the residual (the rounding Hugging Face does: the
projection's output is an activation-dtype tensor), writes the new residual, then computes
the mean square in float32 and writes `scale * round(h * rsqrt(ms + eps))` (again HF's
order: normalise in float32, round, then the weight multiply). Where the projections add into a
float32 stream themselves (`jaxserve.model.ACCUMULATE`) there are no partials: the kernel only
normalises, into the activation dtype, and the input norm also writes the rows of QKV's float32
accumulator, started at its bias (`seed`), so that start needs no launch of its own.

Backend: Pallas Triton, like the other kernels (`jaxserve_kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat


# Warps per row's program. At batch 1 the one program loads every K-split partial of the row
# (18 x 896 floats after the 0.5B down projection): more warps put more of those loads in
# flight at once. 8 measured faster than 4 on the H200 in one process, alternating rounds
# (bench/decode_step.py --glue norm_warps8, session 10): decode step 0.986 -> 0.959 ms at batch
# 1, 1.186 -> 1.144 ms at batch 64 (bench/results/decode_step.md). Read when a step is traced.
NUM_WARPS = 8
# With a seed, write its rows from programs of their own (past the norm's one a row, on SMs the
# norm leaves idle) instead of from each row's norm program: at 64 rows the seeded norm had taken
# 2.04 against 1.52 µs without a seed (session 20). Session 21 on the H200 (bench/results/
# decode_step.md, --glue seed_programs, one process, alternating rounds): step 0.804 -> 0.793 ms at
# 64 rows, 0.976 -> 0.965 at 128. Read at call time.
SEED_PROGRAMS = True
# The norm's weight loaded at the top of a row's program, before the row (so its L2 round trip runs
# under the row's), instead of after the mean square, where it waited behind the cross-warp reduction
# (the fused attention's early gather is the same move). Same bits. H200, session 25 (decode_step.md,
# --glue norm_scale_first, one process): at 64 rows 1.64 -> 1.57 and 1.52 -> 1.44 µs a launch, GPU busy
# 753.8 -> 748.0 µs a step, the step 0.767 -> 0.766 ms. Read when a step is traced.
SCALE_FIRST = True


def _kernel(h_ref, *rest, num_parts: int, eps: float, block_n: int, seed_block: int, seed_programs: bool,
            scale_first: bool = False):
    rest = list(rest)
    p_ref = rest.pop(0) if num_parts else None
    scale_ref = rest.pop(0)
    seed_ref = rest.pop(0) if seed_block else None  # the next projection's accumulator starts at it
    # Without partials the residual is unchanged: returned as is by the wrapper, not copied.
    h_out_ref = rest.pop(0) if num_parts else None
    norm_out_ref = rest.pop(0)
    seed_out_ref = rest.pop(0) if seed_block else None
    pid, m = pl.program_id(0), h_ref.shape[0]
    norm = functools.partial(_norm_row, h_ref=h_ref, p_ref=p_ref, scale_ref=scale_ref, h_out_ref=h_out_ref,
                             norm_out_ref=norm_out_ref, num_parts=num_parts, eps=eps, block_n=block_n,
                             scale_first=scale_first)

    def seed(row):
        seed_ok = jnp.arange(seed_block) < seed_ref.shape[0]
        value = compat.load(seed_ref.at[pl.ds(0, seed_block)], mask=seed_ok, other=0)
        compat.store(seed_out_ref.at[row, pl.ds(0, seed_block)], value.astype(jnp.float32), mask=seed_ok)

    if not seed_block:
        norm(pid)
    elif seed_programs:  # SEED_PROGRAMS: programs m.. write the seed's rows
        pl.when(pid >= m)(lambda: seed(pid - m))
        pl.when(pid < m)(lambda: norm(pid))
    else:
        seed(pid)
        norm(pid)


def _norm_row(row, *, h_ref, p_ref, scale_ref, h_out_ref, norm_out_ref, num_parts: int, eps: float, block_n: int,
              scale_first: bool = False):
    n = h_ref.shape[1]
    dtype = h_ref.dtype
    cols = jnp.arange(block_n)
    ok = cols < n
    if scale_first:
        scale = compat.load(scale_ref.at[pl.ds(0, block_n)], mask=ok, other=0)
    h = compat.load(h_ref.at[row, pl.ds(0, block_n)], mask=ok, other=0)
    if num_parts:
        # Unrolled, so every partial's load is in flight at once: a program is one row, and
        # at batch 1 the only program, so a load-wait-add loop is pure latency (3.6 µs a call
        # on the H100 with a fori_loop over 18 splits).
        parts = [compat.load(p_ref.at[jnp.int32(i), row, pl.ds(0, block_n)], mask=ok, other=0)
                 for i in range(num_parts)]
        delta = functools.reduce(jnp.add, parts)
        h = (h.astype(jnp.float32) + delta.astype(dtype).astype(jnp.float32)).astype(dtype)
        compat.store(h_out_ref.at[row, pl.ds(0, block_n)], h, mask=ok)
    hf = h.astype(jnp.float32)
    mean_square = jnp.sum(hf * hf) / n  # masked columns loaded as 0
    normed = (hf * lax.rsqrt(mean_square + eps)).astype(norm_out_ref.dtype)
    if not scale_first:
        scale = compat.load(scale_ref.at[pl.ds(0, block_n)], mask=ok, other=0)
    out = (scale.astype(jnp.float32) * normed.astype(jnp.float32)).astype(norm_out_ref.dtype)
    compat.store(norm_out_ref.at[row, pl.ds(0, block_n)], out, mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "num_warps", "interpret", "seed_programs",
                                             "scale_first"))
def _add_rms_norm(hidden, partials, scale, seed, *, eps: float, out_dtype, num_warps: int, interpret: bool,
                  seed_programs: bool, scale_first: bool = False):
    m, n = hidden.shape
    num_parts = 0 if partials is None else partials.shape[0]
    seed_block = 0 if seed is None else compat.next_pow2(seed.shape[0])
    seed_programs = seed_programs and bool(seed_block)
    kernel = functools.partial(_kernel, num_parts=num_parts, eps=eps, block_n=compat.next_pow2(n),
                               seed_block=seed_block, seed_programs=seed_programs, scale_first=scale_first)
    args = [hidden] + ([partials] if num_parts else []) + [scale] + ([seed] if seed_block else [])
    norm_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    out_shape = [jax.ShapeDtypeStruct((m, n), hidden.dtype), norm_shape] if num_parts else [norm_shape]
    if seed_block:
        out_shape.append(jax.ShapeDtypeStruct((m, seed.shape[0]), jnp.float32))
    outs = compat.triton_call(kernel, *args, grid=(2 * m if seed_programs else m,), out_shape=out_shape,
                              interpret=interpret, num_warps=num_warps, name="add_rms_norm")
    if not num_parts:  # the residual is unchanged: returned as is, not copied
        outs = [hidden, *outs]
    return tuple(outs)


def add_rms_norm(hidden: jax.Array, partials: jax.Array | None, scale: jax.Array, *,
                 eps: float, out_dtype: Any = None, seed: jax.Array | None = None,
                 interpret: bool | None = None, num_warps: int | None = None) -> tuple[jax.Array, ...]:
    """`h = hidden + sum(partials)`, then `(h, RMSNorm(h) * scale)`, in hidden's dtype; with
    `seed`, also `seed` broadcast to every row (float32) as a third output.

    Args:
        hidden: `[M, N]` residual stream.
        partials: `[S, M, N]` float32 partial sums of the projection that adds into the
            residual (the K splits of `jaxserve_kernels.skinny_matmul.skinny_matmul_partials`), or None
            to only normalise.
        scale: `[N]` the norm's weight.
        eps: the norm's epsilon.
        out_dtype: the normed output's dtype (None: hidden's). A float32 residual stream (the
            decode glue whose projections add into it, `jaxserve.model.ACCUMULATE`) is normed
            into the activation dtype, rounded where a bf16 stream's norm rounds.
        seed: `[N2]`, e.g. the next projection's bias: the rows of its float32 accumulator
            (`jaxserve_kernels.skinny_matmul_mgpu`'s "accumulate" epilogue) written here, so that
            start costs no launch of its own.
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        num_warps: Triton warps per program (one program per row); None: `NUM_WARPS`.

    Example:
        >>> h, y = add_rms_norm(jnp.ones((2, 8)), jnp.ones((3, 2, 8)), jnp.ones(8), eps=1e-6)
        >>> h[0, 0].item(), round(y[0, 0].item(), 4)
        (4.0, 1.0)
    """
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [M, N], got {hidden.shape}")
    if partials is not None and (partials.ndim != 3 or partials.shape[1:] != hidden.shape):
        raise ValueError(f"partials must be [S, {hidden.shape[0]}, {hidden.shape[1]}], got {partials.shape}")
    if scale.shape != (hidden.shape[1],):
        raise ValueError(f"scale must be [{hidden.shape[1]}], got {scale.shape}")
    if seed is not None and seed.ndim != 1:
        raise ValueError(f"seed must be [N2], got {seed.shape}")
    if partials is not None:
        partials = partials.astype(jnp.float32)
    return _add_rms_norm(hidden, partials, scale, seed, eps=float(eps),
                         out_dtype=jnp.dtype(hidden.dtype if out_dtype is None else out_dtype),
                         num_warps=NUM_WARPS if num_warps is None else num_warps,
                         interpret=compat.resolve_interpret(interpret), seed_programs=SEED_PROGRAMS,
                         scale_first=SCALE_FIRST)


def add_rms_norm_reference(hidden: jax.Array, partials: jax.Array | None, scale: jax.Array, *,
                           eps: float, out_dtype: Any = None,
                           seed: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """jnp reference of `add_rms_norm`, with the same roundings.

    Example:
        >>> h, y = add_rms_norm_reference(jnp.ones((1, 4)), None, 2 * jnp.ones(4), eps=0.0)
        >>> y.tolist()
        [[2.0, 2.0, 2.0, 2.0]]
    """
    dtype = hidden.dtype
    if partials is not None:
        delta = partials.astype(jnp.float32).sum(axis=0).astype(dtype)
        hidden = (hidden.astype(jnp.float32) + delta.astype(jnp.float32)).astype(dtype)
    out_dtype = dtype if out_dtype is None else out_dtype
    hf = hidden.astype(jnp.float32)
    normed = (hf * lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)).astype(out_dtype)
    out = (hidden, (scale.astype(jnp.float32) * normed.astype(jnp.float32)).astype(out_dtype))
    if seed is not None:
        out += (jnp.broadcast_to(seed.astype(jnp.float32), (hidden.shape[0], seed.shape[0])),)
    return out
