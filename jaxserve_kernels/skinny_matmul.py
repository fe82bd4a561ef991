"""Skinny matmul: a few activation rows times a weight matrix, at weight-streaming speed.

Owns: the decode step's projections (`x [M, K] @ w + bias` with M, the batch, at most
`MAX_ROWS`; `w` stored `[N, K]`, the engine's layout, or `[K, N]`), the 1-4-row projection with
the add + RMSNorm before it folded in (`skinny_matmul_norm`), and their jnp references; on the
tensor-core path each row's LoRA adapter term added before the epilogue (`lora=LoraTerm(...)`, its
shrink from `lora_shrink`; opt-in `jaxserve.model.LORA_FOLD`, which measured 2-3% behind XLA's terms
on the H100, bench/results/lora.md session 58). Never decides when it is used (the model does:
decode steps of small batches under "pallas").

Why: a decode step reads every weight once and does almost no arithmetic on it, so a
projection should take its weight's bytes over the HBM bandwidth. XLA does not get there
at small M with `[K, N]` weights (H100 profile, Qwen2.5-0.5B, bench/results/decode_step.md): at
M = 1 it rewrites the dot as a multiply (materialized at the weight's size for two of the four
projections) plus a reduction, ~790 µs a step for 713 MB of layer weights (~0.9 TB/s); at M = 64
its Triton GEMMs reach ~1 TB/s. And between the projections sits glue a launch each.

How, several rows: one program per (block of `block_m` rows, `ROW_BLOCK` by default, block of
`block_n` outputs, K split); a decode step of up to 64 rows is one row block. Each program keeps
its rows (padded to 16, the MMA's minimum, by masked loads) and streams its weight tiles `block_k`
deep through a tensor-core product with a float32 accumulator; the loop is software-pipelined
(`num_stages`) so several weight tiles are in flight. Narrow matrices (few column blocks) split K
so that enough programs run to fill the GPU; the splits write float32 partial sums that one XLA
reduction adds, or, with the "partials" epilogue, that the caller hands on whole to the next
kernel (`jaxserve_kernels.residual_norm` sums them with the residual add and the next RMSNorm in one
launch). The "swiglu" epilogue reads gate and up outputs in one program and returns
silu(gate) * up, so the MLP's activation costs no launch. Deterministic: no atomics.

How, one row (`gemv`, `[N, K]` weights): a program takes a few whole weight rows
(`NK_GEMV_BLOCK_N` x `NK_GEMV_BLOCK_K`: a Qwen2.5-0.5B row of 896 in one load), multiplies them
by the activation row lane by lane and sums each row once at the end: no tensor-core product
padded to 16 rows, many programs with all their bytes in flight at once (session 14: 0.685 vs
0.757 ms a batch-1 step for the `[K, N]` tensor-core path). `skinny_matmul_norm` also starts
each program with the residual add and RMSNorm of the row (re-derived per program from a few
KiB in L2), so a one-row decode layer has no norm launches at all (0.666 ms, 132 kernels). Its
programs may loop over blocks of rows, each loading the next block into registers before it
multiplies the current one, so the norm is derived once per program and a program keeps bytes in
flight while it computes (gate_up: 8.6 -> 7.0 µs; session 15, with the tiles retiled: 0.618 ms).
Triton's own software pipeline of that loop (`num_stages`, no register prefetch) was much slower
(0.68-1.03 ms). A leaner one-row kernel (K in chunks so each row's sum stays in one warp, one-instruction
bf16 widening: a half to a third of the instructions) was 20-55% slower a launch (session 42): these
programs are bound by their chain to the first product and by how many run at once, not by issue.
`skinny_matmul_norm(touch_pages=...)` also reads the pages of the attention after it, in programs of
their own past the projection's (`jaxserve.model.PREFETCH_KV`).
By default the lane-wise path takes one row: with 2-16 rows (each row's products summed every
iteration) it lost to the tensor-core path at every batch (session 15: 0.793 vs 0.757 ms at 2 rows,
3.1 vs 0.79 at 16; bench/results/decode_step.md). Asked for (`gemv=True`), it takes up to
`NK_GEMV_MAX_ROWS` rows, each weight tile loaded once for all of them and each row's lanes summed
once at the end: the opt-in norm-folded path of 2-4-row steps (`jaxserve.model.FOLD_MAX_ROWS`), where
the tensor-core path's K splits would hand the next `skinny_matmul_norm` many more partial sums to add.
Measured, that path loses at 2-4 rows (session 38): the per-row reductions cost more than the launches.

Backend: Pallas Triton, like the other kernels (`jaxserve_kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat

# Up to this many rows the weight stream dominates; beyond it XLA's GEMMs are the better choice
# (the model's default routing: `jaxserve.model.SKINNY_ROWS`). The kernel takes any row count,
# ROW_BLOCK rows a program.
MAX_ROWS = 64
ROW_BLOCK = 64
# Programs wanted in flight: about two per H100 SM.
_TARGET_PROGRAMS = 264
# Default tile of the `[N, K]` weight layout's tensor-core path (several rows): weight rows a
# program, and contiguous elements of each row a loop iteration (32 x 128 bf16: 8 KiB in 256-byte
# runs; the best of five tiles in the decode step at batch 16, session 14: 0.779 ms vs 0.794 at
# 32 x 256 and 0.793 for `[K, N]`).
NK_BLOCK_N = 32
NK_BLOCK_K = 128
LAYOUTS = ("kn", "nk")
# One row with the "nk" layout: lane-wise multiply-adds (no 16-row padding of a tensor-core
# product, no per-iteration reduction), a few weight rows x 1024 elements a block (a Qwen2.5-0.5B
# row of 896 in one load, so the QKV projection needs no K split) over 8 warps: decode step 0.689
# vs 0.759 ms for the [K, N] default at batch 1 on the H200 (bench/results/decode_step.md, session
# 14). 4 rows a block, the next K block loaded ahead, ~528 programs (the down projection's K split
# in two): o 2.12 vs 2.16 µs, down 4.53 vs 4.62 at 8 rows over ~264 programs (session 15). Read
# when a step is traced.
NK_GEMV = True
NK_GEMV_BLOCK_N = 4
NK_GEMV_BLOCK_K = 1024
NK_GEMV_WARPS = 8
# One row: load the next K block's tiles before multiplying the current ones (tilings that loop
# over K instead of splitting it all the way).
NK_GEMV_PREFETCH = True
# Rows the lane-wise path takes when asked (`gemv=True`; by default it takes one row): each weight tile is
# loaded once for all of them and every row keeps its own lanes, so registers grow with the rows. The
# norm-folded decode path of 2-4 rows (`jaxserve.model.FOLD_MAX_ROWS`, opt-in) asks for it; there down_proj
# took 12.5 µs a launch at 4 rows against ~4.5 at one (H200, session 38): each row's lanes are summed
# apart, one cross-warp reduction a row and half.
NK_GEMV_MAX_ROWS = 4
NK_TARGET_PROGRAMS = _TARGET_PROGRAMS
# Programs wanted on the one-row lane-wise path (how far a narrow projection's K is split).
NK_GEMV_TARGET_PROGRAMS = 2 * _TARGET_PROGRAMS
# `[N, K]` weight rows a program in interpret mode (the CPU), when the caller picks no tile.
INTERPRET_BLOCK_N = 64


def _load_weights(ref, mask):
    """A masked weight tile with zeros where the mask is off. Float8 tiles are loaded without a fill value and
    zeroed after widening to float32: Triton's lowering casts the fill to the pointee type and has no int -> float8
    cast ("cannot cast ... tp tensor<...xf8E4M3FN>", the H100, session 51), and a masked lane's bytes may be NaN."""
    if jnp.dtype(ref.dtype).itemsize == 1:
        return jnp.where(mask, compat.load(ref, mask=mask).astype(jnp.float32), 0.0)
    return compat.load(ref, mask=mask, other=0)


def _kernel(x_ref, w_ref, *rest, epilogue: str, has_bias: bool, k_per_split: int,
            block_m: int, block_n: int, block_k: int, n_out: int, precision, layout: str,
            gemv: bool, prefetch: bool = False, has_scale: bool = False, lora_rank: int = 0, own_rank: int = 0):
    rest = list(rest)
    b_ref = rest.pop(0) if has_bias else None
    s_ref = rest.pop(0) if has_scale else None
    lora_refs = tuple(rest.pop(0) for _ in range(3)) if lora_rank else None
    own_ref = rest.pop(0) if own_rank else None  # `own_slot`'s row slots
    (o_ref,) = rest
    # fp8 weights are widened to the activations' dtype in registers: HBM and L2 move one byte a weight.
    compute = x_ref.dtype if jnp.dtype(w_ref.dtype).itemsize == 1 else w_ref.dtype
    # Row blocks vary fastest in launch order, so the programs that read one weight tile run
    # together and all but the first find it in L2.
    row_block, col_block, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, k_total = x_ref.shape
    row0 = row_block * block_m
    row_ids = row0 + jnp.arange(block_m)
    cols = col_block * block_n + jnp.arange(block_n)
    col_ok = cols < n_out
    k_start = split * k_per_split
    k_end = jnp.minimum(k_start + k_per_split, k_total)
    num_iters = pl.cdiv(jnp.maximum(k_end - k_start, 0), block_k)
    # SwiGLU reads the gate columns and the matching up columns (n_out further on) of the
    # fused gate_up weight, so one program holds both halves of its outputs.
    halves = (0, n_out) if epilogue == "swiglu" else (0,)

    def body(i, accs):  # several rows: tensor-core products
        k0 = k_start + i * block_k
        ks = k0 + jnp.arange(block_k)
        k_ok = ks < k_end
        x = compat.load(x_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)],
                        mask=(row_ids < rows)[:, None] & k_ok[None, :], other=0)
        out = list(accs)
        for h, offset in enumerate(halves):
            cols_at = pl.ds(offset + col_block * block_n, block_n)
            if layout == "nk":  # block_n weight rows of block_k contiguous elements each
                w = _load_weights(w_ref.at[cols_at, pl.ds(k0, block_k)], col_ok[:, None] & k_ok[None, :])
                prod = compat.dot(x.astype(compute), w.astype(compute), trans_b=True, precision=precision)
            else:
                w = _load_weights(w_ref.at[pl.ds(k0, block_k), cols_at], k_ok[:, None] & col_ok[None, :])
                prod = compat.dot(x.astype(compute), w.astype(compute), precision=precision)
            out[h] += prod
        return tuple(out)

    cols_at = pl.ds(col_block * block_n, block_n)
    if gemv:  # a few rows ([N, K] weights): lane-wise products, reduced once after the loop
        _gemv_rows(x_ref, w_ref, o_ref, b_ref, s_ref, row0=row0, rows=block_m, halves=halves, k_start=k_start,
                   k_end=k_end, num_iters=num_iters, block_n=block_n, block_k=block_k, col_block=col_block,
                   col_ok=col_ok, cols_at=cols_at, epilogue=epilogue, split=split, prefetch=prefetch)
        return
    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    accs = tuple(zeros for _ in halves)
    if lora_rank:  # first, so that its loads overlap the weight stream's first tiles instead of following them
        accs = _lora_term(accs, *lora_refs, rank=lora_rank, row0=row0, row_ok=row_ids < rows, halves=halves,
                          cols_at=lambda offset: pl.ds(offset + col_block * block_n, block_n), col_ok=col_ok,
                          first_split=split == 0, compute=compute, precision=precision)
    accs = lax.fori_loop(0, num_iters, body, accs)
    if own_rank:  # each row keeps its own slot's columns (`own_slot`), the rest zeros
        row_slot = compat.load(own_ref.at[pl.ds(row0, block_m)], mask=row_ids < rows, other=-1)
        accs = (jnp.where(row_slot[:, None] == (cols // own_rank)[None, :], accs[0], 0.0),)
    mask = (row_ids < rows)[:, None] & col_ok[None, :]
    tile = (pl.ds(row0, block_m), cols_at)
    if epilogue == "partials":
        compat.store(o_ref.at[(split,) + tile], accs[0], mask=mask)
        return
    _store_output(accs, o_ref, b_ref, epilogue=epilogue, tile=tile, mask=mask,
                  cols_at=cols_at, col_ok=col_ok, s_ref=s_ref)


def own_slot_columns(t: jax.Array, rank: int, slots: jax.Array, dtype) -> jax.Array:
    """A shrink over every slot's adapter, ``t [rows, slots * R]``, with each row keeping only its own slot's R
    columns (slot -1: none), rounded to ``dtype``: `jaxserve.lora.lora_delta`'s select, inside a kernel or in jnp.

    Example:
        >>> own_slot_columns(jnp.ones((2, 4)), 2, jnp.array([1, -1]), jnp.float32).tolist()
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """
    mine = (jnp.arange(t.shape[-1]) // rank)[None, :] == slots[:, None]
    return jnp.where(mine, t, 0.0).astype(dtype)


def _lora_term(accs, t_ref, lb_ref, slot_ref, *, rank: int, row0, row_ok, halves, cols_at, col_ok, first_split,
               compute, precision) -> tuple:
    """The program's sums plus its rows' adapter term (`skinny_matmul`'s ``lora``): the shrink's float32 partials
    summed, every column but the row's slot's ``rank`` zeroed, rounded to the compute dtype (as
    `jaxserve.lora.lora_delta` rounds), times this program's columns of the stacked ``b``. Only the first K split
    adds it (the others' loads are masked off and add zeros), so split sums hold it once."""
    parts, _, width = t_ref.shape
    block_m = row_ok.shape[0]
    wide = max(16, compat.next_pow2(width))  # a tensor-core product's K is at least 16
    lanes = jnp.arange(wide)
    lane_ok = (lanes < width) & first_split
    rows_at, lanes_at = pl.ds(row0, block_m), pl.ds(0, wide)
    mask = row_ok[:, None] & lane_ok[None, :]
    # Every part's load issued before the first add (a loop over them, one load waiting for the sum before it, was
    # slower: bench/lora_fold.py, H100, session 58).
    t = sum(compat.load(t_ref.at[jnp.int32(p), rows_at, lanes_at], mask=mask, other=0).astype(jnp.float32)
            for p in range(parts))
    t = own_slot_columns(t, rank, compat.load(slot_ref.at[rows_at], mask=row_ok, other=-1), compute)
    out = list(accs)
    for h, offset in enumerate(halves):
        b = compat.load(lb_ref.at[lanes_at, cols_at(offset)], mask=lane_ok[:, None] & col_ok[None, :], other=0)
        out[h] += compat.dot(t, b.astype(compute), precision=precision)
    return tuple(out)


def _gemv_rows(x_ref, w_ref, o_ref, bias_ref, s_ref, *, row0, rows: int, halves, k_start, k_end, num_iters,
               block_n: int, block_k: int, col_block, col_ok, cols_at, epilogue: str, split, prefetch: bool) -> None:
    """The lane-wise path's program: `rows` activation rows (1 to `NK_GEMV_MAX_ROWS`) times `block_n` weight rows,
    each weight tile loaded once for all of them; every row keeps its own `[block_n, block_k]` float32 lanes."""

    def tiles(i):  # K block i's activation rows and weight rows
        k0 = k_start + i * block_k
        k_ok = k0 + jnp.arange(block_k) < k_end  # past the split's end: masked, loads nothing
        xs = tuple(compat.load(x_ref.at[pl.ds(row0 + r, 1), pl.ds(k0, block_k)], mask=k_ok[None, :], other=0)
                   for r in range(rows))
        return xs, tuple(_load_weights(w_ref.at[pl.ds(offset + col_block * block_n, block_n), pl.ds(k0, block_k)],
                                       col_ok[:, None] & k_ok[None, :]) for offset in halves)

    def lanes(accs, xs, ws):  # accs: row-major over (row, half)
        wf = tuple(w.astype(jnp.float32) for w in ws)
        return tuple(accs[r * len(ws) + h] + wf[h] * xs[r].astype(jnp.float32)
                     for r in range(rows) for h in range(len(ws)))

    def step(i, carry):  # the next iteration's tiles loaded before this one's multiply
        accs, cur = carry
        nxt = tiles(i + 1)
        return lanes(accs, *cur), nxt

    init = tuple(jnp.zeros((block_n, block_k), jnp.float32) for _ in range(rows * len(halves)))
    if prefetch:
        accs, _ = lax.fori_loop(0, num_iters, step, (init, tiles(0)))
    else:
        accs = lax.fori_loop(0, num_iters, lambda i, accs: lanes(accs, *tiles(i)), init)
    for r in range(rows):
        sums = tuple(jnp.sum(a, axis=1)[None, :] for a in accs[r * len(halves):(r + 1) * len(halves)])
        tile = (pl.ds(row0 + r, 1), cols_at)
        if epilogue == "partials":
            compat.store(o_ref.at[(split,) + tile], sums[0], mask=col_ok[None, :])
        else:
            _store_output(sums, o_ref, bias_ref, epilogue=epilogue, tile=tile, mask=col_ok[None, :],
                          cols_at=cols_at, col_ok=col_ok, s_ref=s_ref)


def swiglu_sums(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """In-kernel: `silu(gate) * up` from a program's float32 sums, with Hugging Face's roundings
    (both projections in the activation `dtype`, silu of the gate rounded; the product is float32,
    for the caller to round). `apply_epilogue`'s math, written with `exp` for the kernels' lowerings.

    Example:
        >>> swiglu_sums(jnp.zeros(2), jnp.ones(2), jnp.float32).tolist()
        [0.0, 0.0]
    """
    gate, up = (a.astype(dtype).astype(jnp.float32) for a in (gate, up))
    return (gate / (1.0 + jnp.exp(-gate))).astype(dtype).astype(jnp.float32) * up


def _store_output(accs, o_ref, b_ref, *, epilogue: str, tile, mask, cols_at, col_ok, bias=None,
                  s_ref=None) -> None:
    """A program's float32 sums to its output tile: SwiGLU of the (gate, up) pair, or (column scale of fp8
    weights +) bias + round (`bias`: its columns already loaded, else read from `b_ref` here)."""
    dtype = o_ref.dtype
    if epilogue == "swiglu":
        compat.store(o_ref.at[tile], swiglu_sums(*accs, dtype).astype(dtype), mask=mask)
        return
    acc = accs[0]
    if s_ref is not None:
        acc = acc * compat.load(s_ref.at[cols_at], mask=col_ok, other=0)[None, :]
    if b_ref is not None:
        if bias is None:
            bias = compat.load(b_ref.at[cols_at], mask=col_ok, other=0)
        acc = acc + bias.astype(jnp.float32)[None, :]
    compat.store(o_ref.at[tile], acc.astype(dtype), mask=mask)


def default_tiling(m: int, k: int, n: int, epilogue: str = "none",
                   block_m: int = ROW_BLOCK, layout: str = "kn", gemv: bool = False,
                   block_n: int | None = None, block_k: int | None = None,
                   weight_bytes: int = 2) -> tuple[int, int, int]:
    """(block_n, block_k, num_splits): 64 columns x 128 rows of weight (16 KiB of bf16) a
    loop iteration (never deeper than K's power of two); K split until about
    `_TARGET_PROGRAMS` programs run. SwiGLU loads two 32-column tiles an iteration (gate and
    up: the same bytes) and never splits. A `block_n` or `block_k` given replaces the default
    and the split is counted for the tile that results.

    With the `[N, K]` layout a tile is `NK_BLOCK_N` weight rows of `NK_BLOCK_K` contiguous
    elements (`NK_GEMV_BLOCK_N` x `NK_GEMV_BLOCK_K` on the one-row `gemv` path), so narrow column
    blocks still read long runs of memory. On the lane-wise path one-byte (float8) weights take twice the K
    depth a tile, so that a tile moves the bytes the tiles were tuned for in bf16."""
    if layout == "nk":
        dn, dk = (NK_GEMV_BLOCK_N, NK_GEMV_BLOCK_K) if gemv else (NK_BLOCK_N, NK_BLOCK_K)
        target = NK_GEMV_TARGET_PROGRAMS if gemv else NK_TARGET_PROGRAMS
    else:
        dn, dk = (32 if epilogue == "swiglu" else 64), 128
        target = _TARGET_PROGRAMS
    block_n = block_n or dn
    deeper = 2 if weight_bytes == 1 and gemv else 1  # the lane-wise path widens to float32 lanes, not tiles
    block_k = block_k or min(dk * deeper, max(16, compat.next_pow2(k)))
    if epilogue == "swiglu":
        return block_n, block_k, 1
    return block_n, block_k, split_count(m, k, n, block_n, block_k, target, block_m)


def split_count(m: int, k: int, n: int, block_n: int, block_k: int,
                target: int = _TARGET_PROGRAMS, block_m: int = ROW_BLOCK) -> int:
    """K splits so that about `target` programs run over the row blocks (`block_m` rows) and
    column blocks, each split at least one `block_k` iteration.

    Example:
        >>> split_count(1, 4864, 896, 64, 128), split_count(256, 4864, 896, 64, 128)
        (18, 4)
    """
    blocks = pl.cdiv(n, block_n) * pl.cdiv(m, block_m)
    return max(1, min(pl.cdiv(k, block_k), target // blocks))


@functools.partial(jax.jit, static_argnames=("epilogue", "block_m", "block_n", "block_k",
                                             "num_splits", "num_warps", "num_stages", "interpret",
                                             "layout", "gemv", "prefetch", "lora_rank", "own_rank"))
def _skinny(x, w, bias, scale, lora=None, own_slots=None, *, epilogue: str, block_m: int, block_n: int, block_k: int,
            num_splits: int, num_warps: int, num_stages: int, interpret: bool, layout: str,
            gemv: bool, prefetch: bool = False, lora_rank: int = 0, own_rank: int = 0):
    m, k = x.shape
    n_total = w.shape[0] if layout == "nk" else w.shape[1]
    n_out = n_total // 2 if epilogue == "swiglu" else n_total
    block_m = m if gemv else max(16, compat.next_pow2(min(m, block_m)))  # gemv: every row in each program
    k_blocks = pl.cdiv(k, block_k)
    k_per_split = pl.cdiv(k_blocks, num_splits) * block_k
    compute = x.dtype if w.dtype.itemsize == 1 else w.dtype  # as _kernel's: fp8 weights widen to x's dtype
    precision = lax.Precision.HIGHEST if compute == jnp.float32 else None
    # Split programs write float32 partials; the scale and bias join where they are summed.
    in_kernel_bias = bias is not None and epilogue == "none" and num_splits == 1
    in_kernel_scale = scale is not None and num_splits == 1
    kernel = functools.partial(_kernel, epilogue="partials" if num_splits > 1 else epilogue,
                               has_bias=in_kernel_bias, has_scale=in_kernel_scale, k_per_split=k_per_split,
                               block_m=block_m, block_n=block_n, block_k=block_k, n_out=n_out,
                               precision=precision, layout=layout, gemv=gemv,
                               prefetch=prefetch and gemv, lora_rank=lora_rank, own_rank=own_rank)
    args = [x, w] + ([bias] if in_kernel_bias else []) + ([scale] if in_kernel_scale else []) + list(lora or ()) + (
        [own_slots] if own_rank else [])
    if num_splits > 1 or epilogue == "partials":
        out_shape = jax.ShapeDtypeStruct((num_splits, m, n_out), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, n_out), x.dtype)
    out = compat.triton_call(kernel, *args, grid=(pl.cdiv(m, block_m), pl.cdiv(n_out, block_n), num_splits),
                             out_shape=out_shape, interpret=interpret, num_warps=num_warps,
                             num_stages=num_stages, name="skinny_matmul")
    if num_splits == 1 or epilogue == "partials":
        return out
    out = out.sum(axis=0)
    if scale is not None:
        out = out * scale
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)


EPILOGUES = ("none", "partials", "swiglu")


def skinny_matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                  epilogue: str = "none", scale: jax.Array | None = None, interpret: bool | None = None,
                  block_n: int | None = None, block_k: int | None = None,
                  num_splits: int | None = None, num_warps: int | None = None,
                  num_stages: int = 3, block_m: int = ROW_BLOCK, layout: str = "kn",
                  gemv: bool | None = None, prefetch: bool | None = None,
                  lora: LoraTerm | None = None, own_slot: tuple[jax.Array, int] | None = None) -> jax.Array:
    """`x @ w (+ bias)` for a few rows of `x`, accumulated in float32.

    Args:
        x: `[M, K]` activations (any M; the kernel pays off up to about `MAX_ROWS`).
        w: `[K, N]` weights (Flax `Dense` layout), or `[N, K]` with `layout="nk"` (PyTorch's
            and Hugging Face's: each output's weights contiguous).
        bias: optional `[N]` (epilogue "none" only).
        scale: optional float32 `[N]`, each output column's factor (epilogue "none" only): the
            per-channel scales of float8 weights (`jaxserve.quantization`), which the kernel
            reads as they are stored, one byte a weight, and widens to x's dtype in registers.
        epilogue: what the kernel returns:
            "none": the product (+ bias) in x's dtype, `[M, N]`;
            "partials": the float32 partial sums of its K splits, `[S, M, N]`, for a consumer
            that adds them itself (`jaxserve_kernels.residual_norm.add_rms_norm`), saving a launch;
            "swiglu": `silu(x @ w_gate) * (x @ w_up)` in x's dtype, `[M, N/2]`, the gate being
            the first N/2 outputs of w and up the rest (the fused gate_up projection and its
            activation; never split along K).
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        block_n, block_k, num_splits: tiling; None picks `default_tiling`.
        block_m: rows a program (a power of two >= 16; fewer rows round up to 16).
        num_warps, num_stages: Triton launch parameters (num_warps None: 4, or `NK_GEMV_WARPS`
            on the one-row `[N, K]` path).
        layout: "kn" or "nk", how `w` is stored (see `w`).
        gemv: rows with the "nk" layout as lane-wise products, summed once at the end, instead of
            a tensor-core product padded to 16 rows: up to `NK_GEMV_MAX_ROWS` rows when True; None:
            `NK_GEMV` for one row, else the tensor-core path.
        prefetch: one-row lane-wise path only: each loop iteration loads the next K block's
            tiles before multiplying its own (a manual software pipeline in registers); None:
            `NK_GEMV_PREFETCH`.
        lora: each row's LoRA adapter term added into the sums before the epilogue (`LoraTerm`:
            the rows' shrink from `lora_shrink`, the stacked expand `b [slots * R, N]`, each
            row's slot, R), so the expand costs no launch of its own; tensor-core path only.
        own_slot: `(slots [M] int32, R)`: row i keeps only columns `slots[i] * R` to `slots[i] * R + R - 1` of the
            product (the others, and every column of a row whose slot is -1, are zeros): LoRA's shrink over every
            slot with each row's own adapter's columns kept (`own_slot_columns`), in the launch that makes it.
            Epilogue "none" in one K split, no bias or scale; tensor-core path only.

    Example:
        >>> x = jnp.ones((2, 256), jnp.bfloat16); w = jnp.ones((256, 384), jnp.bfloat16)
        >>> skinny_matmul(x, w).shape, skinny_matmul(x, w, epilogue="swiglu").shape
        ((2, 384), (2, 192))
        >>> skinny_matmul(x, w.T, layout="nk").shape
        (2, 384)
        >>> w8 = jnp.ones((384, 256), jnp.float8_e4m3fn)
        >>> skinny_matmul(x, w8, scale=jnp.full(384, 0.5), layout="nk")[0, :2].tolist()
        [128.0, 128.0]
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    k_axis = 1 if layout == "nk" else 0
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[k_axis]:
        want = "[N, K]" if layout == "nk" else "[K, N]"
        raise ValueError(f"x must be [M, K] and w {want}, got {x.shape} and {w.shape}")
    n = w.shape[1 - k_axis]
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if bias is not None and (epilogue != "none" or bias.shape != (n,)):
        raise ValueError(f"bias must be [{n}] with epilogue 'none', got {bias.shape} "
                         f"with {epilogue!r}")
    if scale is not None and (epilogue != "none" or scale.shape != (n,)):
        raise ValueError(f"scale must be [{n}] with epilogue 'none', got {scale.shape} with {epilogue!r}")
    if epilogue == "swiglu":
        if n % 2:
            raise ValueError(f"swiglu needs an even number of weight columns, got {n}")
        if num_splits not in (None, 1):
            raise ValueError(f"num_splits must be 1 with swiglu, got {num_splits}")
    if gemv and (layout != "nk" or x.shape[0] > NK_GEMV_MAX_ROWS):
        raise ValueError(f"gemv takes the 'nk' layout and at most NK_GEMV_MAX_ROWS={NK_GEMV_MAX_ROWS} rows, got "
                         f"{layout!r} and {x.shape[0]} rows")
    if lora is not None:
        if scale is not None:
            raise ValueError("lora takes unscaled weights: scale must be None")
        if gemv:
            raise ValueError("lora takes the tensor-core path: gemv must be None or False")
        gemv = False
        _check_lora(lora, x.shape[0], n)
    if own_slot is not None:
        own_slots, own_rank = own_slot
        if (epilogue != "none" or num_splits not in (None, 1) or bias is not None or scale is not None or gemv
                or lora is not None):
            raise ValueError("own_slot takes epilogue 'none' in one K split, no bias, scale or lora, the tensor-core "
                             "path")
        if own_slots.shape != (x.shape[0],) or not isinstance(own_rank, int) or own_rank < 1:
            raise ValueError(f"own_slot must be (slots [{x.shape[0]}], rank >= 1), got {own_slots.shape} and "
                             f"{own_rank!r}")
        gemv, num_splits = False, 1
    gemv = (NK_GEMV and x.shape[0] == 1 if gemv is None else gemv) and layout == "nk"

    def check_tile(name: str, v: int, least: int = 16) -> None:
        if v < least or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= {least}, got {v}")

    check_tile("block_m", block_m)  # before the default tiling divides by it
    interpret = compat.resolve_interpret(interpret)
    if interpret and layout == "nk" and block_n is None:
        # Interpret mode runs programs one after another: the GPU's narrow tiles would make a
        # CPU decode step ~10x slower than wide ones.
        block_n = INTERPRET_BLOCK_N
    block_n, block_k, splits = default_tiling(x.shape[0], x.shape[1], n, epilogue, block_m, layout, gemv,
                                              block_n, block_k, w.dtype.itemsize)
    num_splits = num_splits or splits
    # The lane-wise path has no tensor-core minimum: a few weight rows a program is fine.
    check_tile("block_n", block_n, 1 if gemv else 16)
    check_tile("block_k", block_k)
    if num_warps is None:
        num_warps = NK_GEMV_WARPS if gemv else 4
    if scale is not None:
        scale = scale.astype(jnp.float32)
    term = None if lora is None else (_parts(lora.shrink), lora.b, lora.slots.astype(jnp.int32))
    own_slots = None if own_slot is None else own_slot[0].astype(jnp.int32)
    return _skinny(x, w, bias, scale, term, own_slots, epilogue=epilogue, block_m=block_m, block_n=block_n,
                   block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                   interpret=interpret, layout=layout, gemv=gemv,
                   prefetch=NK_GEMV_PREFETCH if prefetch is None else prefetch,
                   lora_rank=0 if lora is None else lora.rank, own_rank=0 if own_slot is None else own_slot[1])


class LoraTerm(NamedTuple):
    """Each row's LoRA adapter term for `skinny_matmul` to add: ``(shrink_i masked to slot_i's R columns) @ b``.

    ``shrink``: ``[M, slots * R]`` or float32 partial sums ``[S, M, slots * R]`` (`lora_shrink`) of ``x @ a.T`` over
    every slot's adapter; ``b``: ``[slots * R, N]``, the slots' expand matrices stacked (for SwiGLU, gate's
    columns then up's, as the weight's); ``slots``: ``[M]``, each row's slot (-1: no adapter); ``rank``: R.

    Example (two slots of rank 4; row 0 on slot 0, row 1 on none):
        >>> x, w, a, b = jnp.ones((2, 32)), jnp.ones((16, 32)), jnp.ones((8, 32)), jnp.ones((8, 16))
        >>> term = LoraTerm(lora_shrink(x, a, interpret=True), b, jnp.array([0, -1]), 4)
        >>> skinny_matmul(x, w, layout="nk", lora=term, interpret=True)[:, 0].tolist()
        [160.0, 32.0]
    """
    shrink: jax.Array
    b: jax.Array
    slots: jax.Array
    rank: int


def _parts(shrink: jax.Array) -> jax.Array:
    return (shrink if shrink.ndim == 3 else shrink[None]).astype(jnp.float32)


def _check_lora(lora: LoraTerm, m: int, n: int) -> None:
    width = lora.b.shape[0]
    if lora.b.ndim != 2 or lora.b.shape[1] != n:
        raise ValueError(f"lora.b must be [slots * R, {n}], got {lora.b.shape}")
    if lora.shrink.ndim not in (2, 3) or lora.shrink.shape[-2:] != (m, width):
        raise ValueError(f"lora.shrink must be [{m}, {width}] or [S, {m}, {width}], got {lora.shrink.shape}")
    if lora.slots.shape != (m,):
        raise ValueError(f"lora.slots must be [{m}], got {lora.slots.shape}")
    if not isinstance(lora.rank, int) or lora.rank < 1 or width % lora.rank:
        raise ValueError(f"lora.rank must be a positive int dividing {width}, got {lora.rank!r}")


# The shrink's K splits at most (`lora_shrink`): every program of the projection's first split sums them. Read at
# trace time.
LORA_SHRINK_SPLITS = int(os.environ.get("JAXSERVE_LORA_SHRINK_SPLITS", "8"))
# K blocks a shrink split takes at least: Qwen2.5-0.5B's 896-wide inputs in 2 splits (2.6 µs a 64-row launch on the
# H100, against 2.2 in 4 and 3.3 unsplit), down_proj's 4,864 in 8 (3.0 µs; 6.4 in 2). Read at trace time.
LORA_SHRINK_BLOCKS = 4


def lora_shrink(x: jax.Array, a: jax.Array, *, interpret: bool | None = None) -> jax.Array:
    """Float32 partial sums ``[S, M, slots * R]`` of ``x @ a.T`` for ``x [M, K]`` and every slot's shrink matrix
    stacked, ``a [slots * R, K]``: one launch whose few K splits `skinny_matmul`'s ``lora`` sums itself.

    Example:
        >>> lora_shrink(jnp.ones((2, 256)), jnp.ones((32, 256)), interpret=True).sum(0)[0, :2].tolist()
        [256.0, 256.0]
    """
    block_k = min(128, max(16, compat.next_pow2(x.shape[1])))
    splits = max(1, min(LORA_SHRINK_SPLITS, pl.cdiv(pl.cdiv(x.shape[1], block_k), LORA_SHRINK_BLOCKS)))
    return skinny_matmul(x, a, epilogue="partials", layout="nk", num_splits=splits, block_k=block_k,
                         interpret=interpret)


def skinny_matmul_reference(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                            epilogue: str = "none", layout: str = "kn", scale: jax.Array | None = None,
                            lora: LoraTerm | None = None) -> jax.Array:
    """jnp reference: float32 product (HIGHEST precision), with the kernel's roundings.

    "partials" comes back as one split (`[1, M, N]`), a valid split of the same sum.

    Example:
        >>> skinny_matmul_reference(jnp.ones((1, 4)), jnp.ones((4, 3))).tolist()
        [[4.0, 4.0, 4.0]]
    """
    if layout == "nk":
        w = w.T
    out = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    if scale is not None:
        out = out * scale.astype(jnp.float32)
    if lora is not None:
        t = own_slot_columns(_parts(lora.shrink).sum(0), lora.rank, lora.slots, x.dtype).astype(jnp.float32)
        out = out + jnp.dot(t, lora.b.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return apply_epilogue(out, x.dtype, bias, epilogue)


def apply_epilogue(out: jax.Array, dtype, bias: jax.Array | None, epilogue: str) -> jax.Array:
    """The kernel's epilogues and roundings in jnp, on a float32 product `[M, N]` (for the
    reference and for callers that take the product from elsewhere, e.g. XLA's dot).

    Example:
        >>> apply_epilogue(jnp.ones((1, 2)), jnp.float32, None, "partials").shape
        (1, 1, 2)
    """
    if epilogue == "partials":
        return out[None]
    if epilogue == "swiglu":
        half = out.shape[1] // 2
        gate, up = (a.astype(dtype).astype(jnp.float32) for a in (out[:, :half], out[:, half:]))
        act = jax.nn.silu(gate).astype(dtype).astype(jnp.float32)
        return (act * up).astype(dtype)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(dtype)


# Widest row the norm-folding one-row path takes in a single load (a Qwen2.5-0.5B row is 896,
# padded to 1024, the only width timed): each program holds the whole row and its weight rows in
# registers, twice as many a thread at 2048 (Qwen2.5-1.5B / 3B), where it may spill. Wider models
# keep the norm kernels (`jaxserve.model._fold_norms`).
NORM_GEMV_MAX_K = 1024
# Rows `skinny_matmul_norm` takes: each program holds every row's normed activations in registers.
NORM_GEMV_MAX_ROWS = NK_GEMV_MAX_ROWS
# `skinny_matmul_norm`'s tiling by epilogue, over the one-row path's defaults: `block_n` weight
# rows a block (a half's: SwiGLU loads gate and up rows), `num_warps`, and `num_programs` (0: one
# block of rows a program; fewer: each program loops over blocks, loading the next while it
# multiplies the current). Timed and removed in session 15: Triton's software pipeline of that loop
# instead of the register prefetch (0.68-1.03 ms a step), the row as a [1, K] tile (no gain).
# Read when a step is traced. Session 15 on the H200 (bench/results/decode_step.md): QKV at 4 rows a block, one block a
# program (3.0 vs 3.3 µs at 8 rows); gate_up at 2 + 2 rows a block over 1056 programs of 4 warps,
# each looping over ~2.3 blocks (7.0 vs 8.6 µs at 8 + 8 rows, one block a program): batch-1 step
# 0.618-0.620 vs 0.665 ms with the one-row defaults above.
NORM_GEMV_TILES: dict[str, dict[str, int]] = {"none": {"block_n": 4},
                                              "swiglu": {"block_n": 2, "num_warps": 4, "num_programs": 1056}}
# The norm's weight (and, one block a program, the bias) loaded with the weight rows at the top of
# `skinny_matmul_norm`'s programs, not after the row's statistics and the products: as the add +
# RMSNorm kernel's `SCALE_FIRST`. Same bits. H200, session 26 (`bash bench/gpu_checks.sh hoist26`, one
# process): batch-1 step 0.556 vs 0.566 ms, GPU busy 565.0 vs 577.8 µs. Read when a step is traced.
NORM_GEMV_HOIST = True


def _norm_gemv_kernel(h_ref, *refs, num_parts: int, eps: float, epilogue: str, has_bias: bool,
                      block_n: int, block_k: int, n_out: int, num_programs: int, hoist: bool = False,
                      touch_tiles: int = 0):
    refs = list(refs)
    p_ref = refs.pop(0) if num_parts else None
    scale_ref, w_ref = refs.pop(0), refs.pop(0)
    b_ref = refs.pop(0) if has_bias else None
    k_pages_ref, v_pages_ref, table_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if touch_tiles else (None,) * 3
    h_out_ref = refs.pop(0) if num_parts else None
    o_ref = refs.pop(0)
    touch_ref = refs.pop(0) if touch_tiles else None
    pid = pl.program_id(0)
    if touch_tiles:
        # `touch_pages`: programs past the projection's each read one (row, KV head, table entry)'s key and value
        # page; the projection's own programs do not wait on those loads.
        @pl.when(pid >= num_programs)
        def _touch():
            t = pid - num_programs
            kv_heads, num_pages = k_pages_ref.shape[0], k_pages_ref.shape[1]
            width = table_ref.shape[1]
            row, rest = t // (kv_heads * width), t % (kv_heads * width)
            page = jnp.clip(table_ref[row, rest % width], 0, num_pages - 1)
            k = k_pages_ref[rest // width, page].astype(jnp.float32)
            v = v_pages_ref[rest // width, page].astype(jnp.float32)
            touch_ref[pl.ds(t, 1)] = jnp.full((1,), jnp.sum(k) + jnp.sum(v), jnp.float32)

    def work():  # the projection's program
        rows, k_total = h_ref.shape
        k_ok = jnp.arange(block_k) < k_total
        halves = (0, n_out) if epilogue == "swiglu" else (0,)
        num_blocks = pl.cdiv(n_out, block_n)

        def load_rows(block):
            col_ok = block * block_n + jnp.arange(block_n) < n_out
            return tuple(compat.load(w_ref.at[pl.ds(offset + block * block_n, block_n), pl.ds(0, block_k)],
                                     mask=col_ok[:, None] & k_ok[None, :], other=0) for offset in halves)

        # The weight rows first: they do not depend on the norm, so their loads are in flight while
        # the program sums the residual and its statistics.
        ws = load_rows(pid)
        one_block = num_programs >= num_blocks
        if hoist:
            scale = compat.load(scale_ref.at[pl.ds(0, block_k)], mask=k_ok, other=0)
        bias = None
        if hoist and has_bias and one_block:
            bias_ok = pid * block_n + jnp.arange(block_n) < n_out
            bias = compat.load(b_ref.at[pl.ds(pid * block_n, block_n)], mask=bias_ok, other=0)
        dtype = h_ref.dtype

        def normed_row(r: int):
            row = jnp.int32(r)  # a traced index: interpret mode's discharge wants one, not a Python int
            h = compat.load(h_ref.at[row, pl.ds(0, block_k)], mask=k_ok, other=0)
            if num_parts:  # add_rms_norm's sum and roundings, redone by every program (an L2-resident row)
                parts = [compat.load(p_ref.at[jnp.int32(i), row, pl.ds(0, block_k)], mask=k_ok, other=0)
                         for i in range(num_parts)]
                delta = functools.reduce(jnp.add, parts)
                h = (h.astype(jnp.float32) + delta.astype(dtype).astype(jnp.float32)).astype(dtype)
                compat.store(h_out_ref.at[row, pl.ds(0, block_k)], h, mask=k_ok & (pid == 0))
            hf = h.astype(jnp.float32)
            return (hf * lax.rsqrt(jnp.sum(hf * hf) / k_total + eps)).astype(dtype)

        normed = [normed_row(r) for r in range(rows)]
        if not hoist:
            scale = compat.load(scale_ref.at[pl.ds(0, block_k)], mask=k_ok, other=0)
        xs = [(scale.astype(jnp.float32) * n.astype(jnp.float32)).astype(dtype).astype(jnp.float32) for n in normed]

        def emit(block, ws, bias=None):
            cols_at = pl.ds(block * block_n, block_n)
            col_ok = block * block_n + jnp.arange(block_n) < n_out
            wf = tuple(w.astype(jnp.float32) for w in ws)
            for r, x in enumerate(xs):  # each weight block loaded once for every row
                accs = tuple(jnp.sum(w * x[None, :], axis=1)[None, :] for w in wf)
                _store_output(accs, o_ref, b_ref, epilogue=epilogue, tile=(pl.ds(r, 1), cols_at),
                              mask=col_ok[None, :], cols_at=cols_at, col_ok=col_ok, bias=bias)

        if one_block:  # one block a program
            emit(pid, ws, bias)
            return

        # Fewer programs than blocks: program p takes blocks p, p + P, p + 2P, ..., the next block's
        # rows loaded (into registers) before this one's are multiplied, so every program keeps a
        # block of weights in flight while it computes, and derives the norm once for all its blocks.
        def body(i, ws):
            block = pid + i * num_programs
            nxt = load_rows(block + num_programs)  # past the last block: masked, loads nothing
            emit(block, ws)
            return nxt

        lax.fori_loop(0, pl.cdiv(num_blocks - pid, num_programs), body, ws)

    if touch_tiles:
        pl.when(pid < num_programs)(work)
    else:
        work()


@functools.partial(jax.jit, static_argnames=("eps", "epilogue", "block_n", "num_warps", "num_programs",
                                             "interpret", "hoist"))
def _norm_gemv(hidden, partials, scale, w, bias, touch_pages=None, *, eps: float, epilogue: str, block_n: int,
               num_warps: int, num_programs: int, interpret: bool, hoist: bool = False):
    k = hidden.shape[1]
    n_out = w.shape[0] // 2 if epilogue == "swiglu" else w.shape[0]
    num_parts = 0 if partials is None else partials.shape[0]
    num_blocks = pl.cdiv(n_out, block_n)
    num_programs = min(num_programs or num_blocks, num_blocks)
    touch_tiles = 0
    if touch_pages is not None:
        k_pages, _, table = touch_pages
        touch_tiles = table.shape[0] * k_pages.shape[0] * table.shape[1]
    kernel = functools.partial(_norm_gemv_kernel, num_parts=num_parts, eps=eps, epilogue=epilogue,
                               has_bias=bias is not None, block_n=block_n, block_k=compat.next_pow2(k),
                               n_out=n_out, num_programs=num_programs, hoist=hoist, touch_tiles=touch_tiles)
    args = [hidden] + ([partials] if num_parts else []) + [scale, w] + ([bias] if bias is not None else [])
    if touch_tiles:
        args += list(touch_pages)
    out_shape = ([jax.ShapeDtypeStruct(hidden.shape, hidden.dtype)] if num_parts else []) \
        + [jax.ShapeDtypeStruct((hidden.shape[0], n_out), hidden.dtype)] \
        + ([jax.ShapeDtypeStruct((touch_tiles,), jnp.float32)] if touch_tiles else [])
    outs = compat.triton_call(kernel, *args, grid=(num_programs + touch_tiles,), out_shape=out_shape,
                              interpret=interpret, num_warps=num_warps,
                              name=f"skinny_matmul_norm_{epilogue}")  # QKV and gate_up apart in a profile
    return (outs[0], outs[1]) if num_parts else (hidden, outs[0])


def skinny_matmul_norm(hidden: jax.Array, partials: jax.Array | None, scale: jax.Array, w: jax.Array,
                       bias: jax.Array | None = None, *, eps: float, epilogue: str = "none",
                       block_n: int | None = None, num_warps: int | None = None,
                       num_programs: int | None = None, touch_pages: tuple | None = None,
                       interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """`jaxserve_kernels.residual_norm.add_rms_norm` folded into a few-row `[N, K]` skinny matmul.

    `h = hidden + sum(partials)`, `x = RMSNorm(h) * scale` (add_rms_norm's roundings), and returns
    `(h, skinny_matmul(x, w, bias, epilogue=epilogue, layout="nk"))` from one launch: every
    program re-derives the rows' norms (each row is a few KiB, read from L2) instead of waiting for
    a norm kernel before it, and multiplies each weight block it loads by every row. 1 to
    `NORM_GEMV_MAX_ROWS` rows, one K block (`K <= NORM_GEMV_MAX_K`), no K split.

    Args:
        hidden: `[M, K]` residual stream, M <= NORM_GEMV_MAX_ROWS.
        partials: `[S, M, K]` float32 partial sums to add into it first, or None.
        scale: `[K]` the norm's weight.
        w: `[N, K]` weights; bias: optional `[N]` (epilogue "none").
        eps: the norm's epsilon.
        epilogue: "none" or "swiglu" (as `skinny_matmul`).
        block_n: weight rows a block (power of two); None: `NORM_GEMV_TILES`, else `NK_GEMV_BLOCK_N`.
        num_warps: None: `NORM_GEMV_TILES`, else `NK_GEMV_WARPS`.
        num_programs: programs launched, each looping over blocks when fewer than the blocks;
            None: `NORM_GEMV_TILES`, else one block a program.
        touch_pages: `(k_pages, v_pages, block_tables)` (`[kv_heads, pages, page_size, D]` twice, `[M, W]`),
            or None: programs past the projection's also read the key and value pages the tables name (one page
            of one KV head a program), so that the attention kernel after this one finds them in L2
            (`jaxserve.model.PREFETCH_KV`). Changes no output.
        interpret: Pallas interpret mode; None picks it on the CPU backend.

    Example:
        >>> h, y = skinny_matmul_norm(jnp.ones((1, 8)), None, jnp.ones(8), jnp.ones((4, 8)), eps=0.0)
        >>> y.tolist()
        [[8.0, 8.0, 8.0, 8.0]]
    """
    if hidden.ndim != 2 or not 1 <= hidden.shape[0] <= NORM_GEMV_MAX_ROWS:
        raise ValueError(f"hidden must be [M, K] with 1 <= M <= NORM_GEMV_MAX_ROWS={NORM_GEMV_MAX_ROWS}, "
                         f"got {hidden.shape}")
    k = hidden.shape[1]
    if k > NORM_GEMV_MAX_K:
        raise ValueError(f"hidden's K must be at most NORM_GEMV_MAX_K={NORM_GEMV_MAX_K}, got {k}")
    if partials is not None and (partials.ndim != 3 or partials.shape[1:] != hidden.shape):
        raise ValueError(f"partials must be [S, {hidden.shape[0]}, {k}], got {partials.shape}")
    if scale.shape != (k,):
        raise ValueError(f"scale must be [{k}], got {scale.shape}")
    if w.ndim != 2 or w.shape[1] != k:
        raise ValueError(f"w must be [N, {k}], got {w.shape}")
    if epilogue not in ("none", "swiglu"):
        raise ValueError(f"epilogue must be 'none' or 'swiglu', got {epilogue!r}")
    if epilogue == "swiglu" and w.shape[0] % 2:
        raise ValueError(f"swiglu needs an even number of weight rows, got {w.shape[0]}")
    if bias is not None and (epilogue != "none" or bias.shape != (w.shape[0],)):
        raise ValueError(f"bias must be [{w.shape[0]}] with epilogue 'none', got {bias.shape} with {epilogue!r}")
    interpret = compat.resolve_interpret(interpret)
    tile = NORM_GEMV_TILES.get(epilogue, {})
    block_n = block_n or (INTERPRET_BLOCK_N if interpret else tile.get("block_n", NK_GEMV_BLOCK_N))
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    num_programs = tile.get("num_programs", 0) if num_programs is None else num_programs
    if num_programs < 0:
        raise ValueError(f"num_programs must be >= 0, got {num_programs}")
    if partials is not None:
        partials = partials.astype(jnp.float32)
    if touch_pages is not None and (len(touch_pages) != 3 or touch_pages[2].shape[0] != hidden.shape[0]):
        raise ValueError(f"touch_pages must be (k_pages, v_pages, block_tables [{hidden.shape[0]}, W])")
    return _norm_gemv(hidden, partials, scale, w, bias, touch_pages, eps=float(eps), epilogue=epilogue, block_n=block_n,
                      num_warps=num_warps or tile.get("num_warps", NK_GEMV_WARPS), num_programs=num_programs,
                      interpret=interpret, hoist=NORM_GEMV_HOIST)


def skinny_matmul_norm_reference(hidden: jax.Array, partials: jax.Array | None, scale: jax.Array,
                                 w: jax.Array, bias: jax.Array | None = None, *, eps: float,
                                 epilogue: str = "none") -> tuple[jax.Array, jax.Array]:
    """jnp reference of `skinny_matmul_norm`: the two references it folds together.

    Example:
        >>> h, y = skinny_matmul_norm_reference(jnp.ones((1, 4)), None, jnp.ones(4), jnp.ones((2, 4)), eps=0.0)
        >>> y.tolist()
        [[4.0, 4.0]]
    """
    from jaxserve_kernels.residual_norm import add_rms_norm_reference

    h, x = add_rms_norm_reference(hidden, partials, scale, eps=eps)
    return h, skinny_matmul_reference(x, w, bias, epilogue=epilogue, layout="nk")
