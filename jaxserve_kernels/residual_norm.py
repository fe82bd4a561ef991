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
accumulator, started at its bias (`seed`), so that start needs no launch of its own. With `shrink` the same launch
writes the next projection's LoRA shrink `t` (`jaxserve.model.LORA_NORM_SHRINK`), which would otherwise be an XLA
product and a select of their own, two launches a projection: programs of their own, one a row and 16 of its slot's
rows of the folded stack (`jaxserve.lora.fold_columns`), each norm that row again and multiply it by those rows; the
row's norm program writes the zeros of every other slot's columns. With `pending` (`jaxserve.model.LORA_DOWN_SHRINK`)
every program that norms a row first adds the LoRA term down_proj left for it (its own slot's shrink sums, rounded,
times that slot's expand rows), and the row's program writes the new stream; with `zeros` it also starts the next
down_proj's shrink accumulator at zero.

Backend: Pallas Triton, like the other kernels (`jaxserve_kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools
import os
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
# Rows of a slot's shrink stack a `shrink` program loads and reduces (a power of two): a [16, 1024] float32 product
# is 64 values a thread at 8 warps. JAXSERVE_NORM_SHRINK_CHUNK; read when a step is traced.
SHRINK_CHUNK = int(os.environ.get("JAXSERVE_NORM_SHRINK_CHUNK", "16"))
# Not blocks of rows: programs of 16 rows whose pending terms and shrinks were tensor-core products (each stack tile
# loaded once a block, not once a row) took 13.3-15.4 µs a launch at 64 and 256 rows alike on the H100, against these
# per-row programs' 4.0 / 9.7: a block walks its rows' columns twice, 14 dependent steps, where the per-row programs
# run side by side (bench/results/lora.md, session 64; the kernel is in commit 30c03fb).


def _kernel(h_ref, *rest, num_parts: int, eps: float, block_n: int, seed_block: int, seed_programs: bool,
            scale_first: bool = False, rank: int = 0, in_rank: int = 0, zeros: int = 0):
    rest = list(rest)
    p_ref = rest.pop(0) if num_parts else None
    scale_ref = rest.pop(0)
    seed_ref = rest.pop(0) if seed_block else None  # the next projection's accumulator starts at it
    a_ref = rest.pop(0) if rank else None
    slot_ref = rest.pop(0) if rank or in_rank else None
    t_in_ref, b_ref = (rest.pop(0), rest.pop(0)) if in_rank else (None, None)
    # Without partials or a pending term the residual is unchanged: returned as is by the wrapper, not copied.
    h_out_ref = rest.pop(0) if num_parts or in_rank else None
    norm_out_ref = rest.pop(0)
    seed_out_ref = rest.pop(0) if seed_block else None
    t_ref = rest.pop(0) if rank else None
    zeros_ref = rest.pop(0) if zeros else None
    pid, m = pl.program_id(0), h_ref.shape[0]
    shrink = (a_ref, slot_ref, t_ref, rank) if rank else None
    pending = (t_in_ref, b_ref, slot_ref, in_rank) if in_rank else None
    norm = functools.partial(_norm_row, h_ref=h_ref, p_ref=p_ref, scale_ref=scale_ref, h_out_ref=h_out_ref,
                             norm_out_ref=norm_out_ref, num_parts=num_parts, eps=eps, block_n=block_n,
                             scale_first=scale_first, shrink=shrink, pending=pending, zeros_ref=zeros_ref)
    # With a shrink, programs m..m+S-1 each make one SHRINK_CHUNK of one row's shrink (norming the row again):
    # chunks of a row done one after another in its norm's program cost ~1.1 µs each on the H100 (session 60).
    shrinks = _shrink_programs(m, rank)
    first_seed = m + shrinks

    def seed(row):
        seed_ok = jnp.arange(seed_block) < seed_ref.shape[0]
        value = compat.load(seed_ref.at[pl.ds(0, seed_block)], mask=seed_ok, other=0)
        compat.store(seed_out_ref.at[row, pl.ds(0, seed_block)], value.astype(jnp.float32), mask=seed_ok)

    def norm_program():
        if seed_block and not seed_programs:
            seed(pid)
        norm(pid)

    if not (shrinks or seed_programs):
        norm_program()
        return
    pl.when(pid < m)(norm_program)
    if shrinks:
        pl.when((pid >= m) & (pid < first_seed))(
            lambda: _shrink_chunk((pid - m) % m, (pid - m) // m, h_ref=h_ref, scale_ref=scale_ref, shrink=shrink,
                                  eps=eps, block_n=block_n, out_dtype=norm_out_ref.dtype, pending=pending))
    if seed_programs:  # SEED_PROGRAMS: the last m programs write the seed's rows
        pl.when(pid >= first_seed)(lambda: seed(pid - first_seed))


def _shrink_programs(m: int, rank: int) -> int:
    """The programs that write `m` rows' shrinks of rank `rank` (0: none): a row's SHRINK_CHUNK-row chunks each."""
    return m * -(-rank // SHRINK_CHUNK)


def _normed(h, *, n: int, eps: float, out_dtype):
    """RMSNorm of a loaded row ``h`` (masked columns 0), rounded to ``out_dtype`` before the weight (HF's order)."""
    hf = h.astype(jnp.float32)
    mean_square = jnp.sum(hf * hf) / n
    return (hf * lax.rsqrt(mean_square + eps)).astype(out_dtype)


def _scaled(normed, scale, out_dtype):
    return (scale.astype(jnp.float32) * normed.astype(jnp.float32)).astype(out_dtype)


def _stack_window(want, end, width: int, stack_rows: int) -> tuple[jax.Array, jax.Array]:
    """Rows ``want..end-1`` of a stack of ``stack_rows`` rows, loaded as a tile of ``width`` rows: the tile's start
    and which of its rows are wanted. A tile that would run past the stack's last row starts earlier instead (its
    extra rows masked off): interpret mode clamps such a slice's start, and a slot's own rows always end inside the
    stack."""
    start = jnp.clip(want, 0, stack_rows - width)
    at = start + jnp.arange(width)
    return start, (at >= want) & (at < end)


def _pending_term(row, h, pending: tuple, *, block_n: int, n: int):
    """``h`` (a float32 row of the stream) plus the row's pending LoRA term of the projection before (`add_rms_norm`'s
    ``pending``): its own slot's R shrink columns of ``t`` rounded to the expand's dtype, times that slot's R rows of
    ``b``, summed in float32; nothing for a row of no adapter (slot -1). Every program that norms the row runs this
    same code, so they all norm the same bits."""
    t_ref, b_ref, slot_ref, rank = pending
    slot = slot_ref[row]
    width = compat.next_pow2(rank)
    start, live = _stack_window(slot * rank, (slot + 1) * rank, width, b_ref.shape[0])
    live = live & (slot >= 0)
    ok = jnp.arange(block_n) < n
    t = compat.load(t_ref.at[row, pl.ds(start, width)], mask=live, other=0)
    t = t.astype(b_ref.dtype).astype(jnp.float32)
    b = compat.load(b_ref.at[pl.ds(start, width), pl.ds(0, block_n)], mask=live[:, None] & ok[None, :], other=0)
    return h + jnp.sum(t[:, None] * b.astype(jnp.float32), axis=0)


def _norm_row(row, *, h_ref, p_ref, scale_ref, h_out_ref, norm_out_ref, num_parts: int, eps: float, block_n: int,
              scale_first: bool = False, shrink: tuple | None = None, pending: tuple | None = None, zeros_ref=None):
    n = h_ref.shape[1]
    dtype = h_ref.dtype
    cols = jnp.arange(block_n)
    ok = cols < n
    if shrink is not None:
        slot = shrink[1][row]
    if scale_first:
        scale = compat.load(scale_ref.at[pl.ds(0, block_n)], mask=ok, other=0)
    h = compat.load(h_ref.at[row, pl.ds(0, block_n)], mask=ok, other=0)
    if pending is not None:
        h = _pending_term(row, h, pending, block_n=block_n, n=n)
        compat.store(h_out_ref.at[row, pl.ds(0, block_n)], h, mask=ok)
    if zeros_ref is not None:  # the next projection's shrink accumulator, started at zero
        zero_cols = jnp.arange(compat.next_pow2(zeros_ref.shape[1]))
        compat.store(zeros_ref.at[row, pl.ds(0, zero_cols.shape[0])], jnp.zeros(zero_cols.shape, zeros_ref.dtype),
                     mask=zero_cols < zeros_ref.shape[1])
    if num_parts:
        # Unrolled, so every partial's load is in flight at once: a program is one row, and
        # at batch 1 the only program, so a load-wait-add loop is pure latency (3.6 µs a call
        # on the H100 with a fori_loop over 18 splits).
        parts = [compat.load(p_ref.at[jnp.int32(i), row, pl.ds(0, block_n)], mask=ok, other=0)
                 for i in range(num_parts)]
        delta = functools.reduce(jnp.add, parts)
        h = (h.astype(jnp.float32) + delta.astype(dtype).astype(jnp.float32)).astype(dtype)
        compat.store(h_out_ref.at[row, pl.ds(0, block_n)], h, mask=ok)
    normed = _normed(h, n=n, eps=eps, out_dtype=norm_out_ref.dtype)
    if not scale_first:
        scale = compat.load(scale_ref.at[pl.ds(0, block_n)], mask=ok, other=0)
    out = _scaled(normed, scale, norm_out_ref.dtype)
    compat.store(norm_out_ref.at[row, pl.ds(0, block_n)], out, mask=ok)
    if shrink is not None:  # zeros in every column of t but the row's slot's (its chunks' programs write those)
        _, _, t_ref, rank = shrink
        width = t_ref.shape[1]
        t_cols = jnp.arange(compat.next_pow2(width))
        own = (slot >= 0) & (t_cols >= slot * rank) & (t_cols < (slot + 1) * rank)
        compat.store(t_ref.at[row, pl.ds(0, t_cols.shape[0])], jnp.zeros(t_cols.shape, t_ref.dtype),
                     mask=(t_cols < width) & ~own)


def _shrink_chunk(row, chunk, *, h_ref, scale_ref, shrink: tuple, eps: float, block_n: int, out_dtype,
                  pending: tuple | None = None) -> None:
    """Chunk ``chunk`` of ``t[row]``'s own-slot columns: the row normed as its norm program norms it (same code, so
    the same bits), times those SHRINK_CHUNK rows of the folded stack ``a [T, N]``, summed in float32 and rounded
    once (`jaxserve.lora.lora_delta`'s shrink). Nothing for a row of no adapter (slot -1)."""
    a_ref, slot_ref, t_ref, rank = shrink
    n = h_ref.shape[1]
    ok = jnp.arange(block_n) < n
    slot = slot_ref[row]

    @pl.when(slot >= 0)
    def _():
        want = slot * rank + chunk * SHRINK_CHUNK
        start, live = _stack_window(want, (slot + 1) * rank, SHRINK_CHUNK, a_ref.shape[0])
        tile = compat.load(a_ref.at[pl.ds(start, SHRINK_CHUNK), pl.ds(0, block_n)],
                           mask=live[:, None] & ok[None, :], other=0)
        scale = compat.load(scale_ref.at[pl.ds(0, block_n)], mask=ok, other=0)
        h = compat.load(h_ref.at[row, pl.ds(0, block_n)], mask=ok, other=0)
        if pending is not None:
            h = _pending_term(row, h, pending, block_n=block_n, n=n)
        out = _scaled(_normed(h, n=n, eps=eps, out_dtype=out_dtype), scale, out_dtype)
        sums = jnp.sum(tile.astype(jnp.float32) * out.astype(jnp.float32)[None, :], axis=1)
        compat.store(t_ref.at[row, pl.ds(start, SHRINK_CHUNK)], sums.astype(t_ref.dtype), mask=live)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "num_warps", "interpret", "seed_programs",
                                             "scale_first", "rank", "in_rank", "zeros"))
def _add_rms_norm(hidden, partials, scale, seed, a_cols=None, slots=None, t_in=None, b_rows=None, *, eps: float,
                  out_dtype, num_warps: int, interpret: bool, seed_programs: bool, scale_first: bool = False,
                  rank: int = 0, in_rank: int = 0, zeros: int = 0):
    m, n = hidden.shape
    num_parts = 0 if partials is None else partials.shape[0]
    seed_block = 0 if seed is None else compat.next_pow2(seed.shape[0])
    seed_programs = seed_programs and bool(seed_block)
    kernel = functools.partial(_kernel, num_parts=num_parts, eps=eps, block_n=compat.next_pow2(n),
                               seed_block=seed_block, seed_programs=seed_programs, scale_first=scale_first,
                               rank=rank, in_rank=in_rank, zeros=zeros)
    args = [hidden] + ([partials] if num_parts else []) + [scale] + ([seed] if seed_block else [])
    args += [a_cols.astype(out_dtype)] if rank else []
    args += [slots.astype(jnp.int32)] if rank or in_rank else []
    if in_rank:
        # A slot's rows load as a power-of-two tile inside the stack: one narrower than that tile is padded.
        short = compat.next_pow2(in_rank) - b_rows.shape[0]
        args += [t_in, jnp.pad(b_rows, ((0, short), (0, 0))) if short > 0 else b_rows]
    norm_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    out_shape = [jax.ShapeDtypeStruct((m, n), hidden.dtype), norm_shape] if num_parts or in_rank else [norm_shape]
    if seed_block:
        out_shape.append(jax.ShapeDtypeStruct((m, seed.shape[0]), jnp.float32))
    if rank:
        out_shape.append(jax.ShapeDtypeStruct((m, a_cols.shape[0]), out_dtype))
    if zeros:
        out_shape.append(jax.ShapeDtypeStruct((m, zeros), jnp.float32))
    programs = m + _shrink_programs(m, rank) + (m if seed_programs else 0)
    outs = compat.triton_call(kernel, *args, grid=(programs,), out_shape=out_shape,
                              interpret=interpret, num_warps=num_warps, name="add_rms_norm")
    if not (num_parts or in_rank):  # the residual is unchanged: returned as is, not copied
        outs = [hidden, *outs]
    return tuple(outs)


def add_rms_norm(hidden: jax.Array, partials: jax.Array | None, scale: jax.Array, *,
                 eps: float, out_dtype: Any = None, seed: jax.Array | None = None,
                 shrink: tuple[jax.Array, jax.Array, int] | None = None,
                 pending: tuple[jax.Array, jax.Array, jax.Array, int] | None = None, zeros: int = 0,
                 interpret: bool | None = None, num_warps: int | None = None) -> tuple[jax.Array, ...]:
    """`h = hidden + sum(partials)` (or plus a pending LoRA term), then `(h, RMSNorm(h) * scale)`, in hidden's dtype;
    with `seed`, also `seed` broadcast to every row (float32) as a third output; with `shrink`, each row's LoRA shrink
    of its normed row next; with `zeros`, a float32 `[M, zeros]` of zeros last.

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
        shrink: `(a_cols [T, N], slots [M], R)`: the next projection's folded shrink stack
            (`jaxserve.lora.fold_columns`: slot s's rows s*R..s*R+R-1) and each row's slot (-1: none); adds
            `t [M, T]` in the normed output's dtype: row i's normed row times its slot's rows of `a_cols` (float32
            sums rounded once) in those columns, zeros in the rest.
        pending: `(t [M, T] float32, b_rows [n * R, N], slots [M], R)`: the LoRA term of the projection that added
            into a float32 `hidden` last, left for this norm (`jaxserve.model.LORA_DOWN_SHRINK`): row i's shrink sums
            in its slot's R columns of t (its slot s: columns s*R..s*R+R-1; the other columns are not read),
            rounded to b_rows' dtype, times rows s*R..s*R+R-1 of b_rows, summed in float32 and added to the row
            before the norm; `h` (the first output) is then the new stream, in a buffer of its own. With a shrink
            too, both are the same rows' slots (the kernel reads shrink's).
        zeros: a width: also a float32 `[M, zeros]` of zeros (the accumulator the next projection's shrink adds
            into, `skinny_matmul_mgpu`'s ``shrink``), so that start costs no launch of its own.
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        num_warps: Triton warps per program (one a row, and a shrink chunk's or seed's); None: `NUM_WARPS`.

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
    a_cols, slots, rank = (None, None, 0) if shrink is None else shrink
    if shrink is not None:
        if partials is not None:
            raise ValueError("shrink takes a stream with no partials to add (the accumulating glue's norms)")
        if a_cols.ndim != 2 or a_cols.shape[1] != hidden.shape[1]:
            raise ValueError(f"shrink's a_cols must be [T, {hidden.shape[1]}], got {a_cols.shape}")
        if slots.shape != (hidden.shape[0],):
            raise ValueError(f"shrink's slots must be [{hidden.shape[0]}], got {slots.shape}")
        if not 1 <= int(rank) <= a_cols.shape[0] or a_cols.shape[0] < SHRINK_CHUNK:
            raise ValueError(f"shrink's rank {rank} must be 1..T and a_cols' T >= {SHRINK_CHUNK}, "
                             f"got T = {a_cols.shape[0]}")
    t_in, b_rows, in_rank = None, None, 0
    if pending is not None:
        t_in, b_rows, pending_slots, in_rank = pending
        if partials is not None or hidden.dtype != jnp.float32:
            raise ValueError("pending takes a float32 stream with no partials to add (the accumulating glue's norms)")
        if t_in.ndim != 2 or t_in.shape[0] != hidden.shape[0] or t_in.dtype != jnp.float32:
            raise ValueError(f"pending's t must be a float32 [{hidden.shape[0]}, T], got {(t_in.shape, t_in.dtype)}")
        if b_rows.ndim != 2 or b_rows.shape[1] != hidden.shape[1] or b_rows.shape[0] > t_in.shape[1]:
            raise ValueError(f"pending's b_rows must be [n * R, {hidden.shape[1]}] with n * R <= T "
                             f"({t_in.shape[1]}), got {b_rows.shape}")
        if pending_slots.shape != (hidden.shape[0],):
            raise ValueError(f"pending's slots must be [{hidden.shape[0]}], got {pending_slots.shape}")
        if not 1 <= int(in_rank) <= b_rows.shape[0] or compat.next_pow2(int(in_rank)) > t_in.shape[1]:
            raise ValueError(f"pending's rank {in_rank} must be 1..n * R, its power of two at most T")
        slots = pending_slots if slots is None else slots  # the same rows' slots: the kernel reads one array
    if not (isinstance(zeros, int) and zeros >= 0):
        raise ValueError(f"zeros must be a width >= 0, got {zeros!r}")
    if partials is not None:
        partials = partials.astype(jnp.float32)
    return _add_rms_norm(hidden, partials, scale, seed, a_cols, slots, t_in, b_rows, eps=float(eps),
                         out_dtype=jnp.dtype(hidden.dtype if out_dtype is None else out_dtype),
                         num_warps=NUM_WARPS if num_warps is None else num_warps,
                         interpret=compat.resolve_interpret(interpret), seed_programs=SEED_PROGRAMS,
                         scale_first=SCALE_FIRST, rank=int(rank), in_rank=int(in_rank), zeros=zeros)


def add_rms_norm_reference(hidden: jax.Array, partials: jax.Array | None, scale: jax.Array, *,
                           eps: float, out_dtype: Any = None, seed: jax.Array | None = None,
                           shrink: tuple[jax.Array, jax.Array, int] | None = None,
                           pending: tuple[jax.Array, jax.Array, jax.Array, int] | None = None,
                           zeros: int = 0) -> tuple[jax.Array, ...]:
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
    if pending is not None:
        hidden = hidden + pending_term_reference(*pending)
    out_dtype = dtype if out_dtype is None else out_dtype
    hf = hidden.astype(jnp.float32)
    normed = (hf * lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)).astype(out_dtype)
    out = (hidden, (scale.astype(jnp.float32) * normed.astype(jnp.float32)).astype(out_dtype))
    if seed is not None:
        out += (jnp.broadcast_to(seed.astype(jnp.float32), (hidden.shape[0], seed.shape[0])),)
    if shrink is not None:
        from jaxserve_kernels.skinny_matmul import own_slot_columns

        a_cols, slots, rank = shrink
        t = jnp.dot(out[1].astype(jnp.float32), a_cols.astype(out_dtype).astype(jnp.float32).T,
                    precision=lax.Precision.HIGHEST)
        out += (own_slot_columns(t, rank, slots, out_dtype),)
    if zeros:
        out += (jnp.zeros((hidden.shape[0], zeros), jnp.float32),)
    return out


def pending_term_reference(t: jax.Array, b_rows: jax.Array, slots: jax.Array, rank: int) -> jax.Array:
    """Each row's pending LoRA term (`add_rms_norm`'s ``pending``) in float32: its own slot's ``rank`` columns of the
    float32 shrink ``t [M, T]`` rounded to ``b_rows``' dtype, times that slot's rows of ``b_rows [n * R, N]``; zeros
    for rows of no adapter (slot -1).

    Example:
        >>> pending_term_reference(jnp.ones((2, 64)), jnp.ones((4, 3)), jnp.array([1, -1]), 2).tolist()
        [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]
    """
    from jaxserve_kernels.skinny_matmul import own_slot_columns

    own = own_slot_columns(t[:, :b_rows.shape[0]], rank, slots, b_rows.dtype)
    return jnp.dot(own.astype(jnp.float32), b_rows.astype(jnp.float32), precision=lax.Precision.HIGHEST)
