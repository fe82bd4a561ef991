"""LoRA adapter terms added in place: shrink, per-row adapter select and expand in one or two launches.

Owns: ``acc + ((x @ a[slot_i].T) @ b[slot_i])`` for every row i of a decode step (`lora_add`), the same with
SwiGLU applied after the term (`lora_swiglu`, gate_up's adapters), and their jnp references. Never decides
which adapter a row takes (`jaxserve.lora.LoraSlots` does) or when the kernels run (`jaxserve.model.LORA_KERNELS`).

Why: XLA runs an adapter term (`jaxserve.lora.lora_delta`) as a shrink product, the slot select, an expand
product and an add, about four launches a projection, sixteen a layer. On the H100 (bench/results/lora.md) rows
with adapters ran at 0.46-0.50x of the base model's tokens/s at every batch: at Qwen2.5-0.5B's size the step is
bound by launches, and the adapters' cost about 50 µs a layer at 64 rows, twice the layer itself.

How: the adapters of every slot are one matrix, ``a [slots * R, K]`` and ``b [slots * R, N]``; a row's shrink is
computed against every slot's columns and the columns of other slots are zeroed (the select), so mixed batches
take one dense product, as `lora_delta` does. One program per (block of rows, block of output columns):
- K up to `INLINE_K`: each program computes its rows' shrink itself (the whole ``x`` rows and ``a``, a few
  hundred KiB, from L2), selects, rounds to the activations' dtype (as `lora_delta` does), multiplies by its
  columns of ``b`` and adds into the float32 accumulator, which is aliased: one launch a projection.
- Wider K (down_proj's): a first launch writes the shrink's float32 partial sums over splits of K, the second
  sums them and goes on as above: two launches, each with programs enough to fill the GPU.
Deterministic (no atomics). Products on the tensor cores with float32 accumulation (HIGHEST in float32).

Measured (H100, session 56, bench/results/lora.md): slower than XLA's four launches, 17-23 µs a 64-row projection
against 13-17 (`bench/lora_kernels.py`), adapter rows 0.36x of the base model against 0.47x: each program's shrink is
a one-stage chain of dependent L2 loads. With XLA's shrink product before the launch (`SHRINK` "xla"; H200, session
57) the launches take 2.4-5.3 µs in the step, but a reduce launch a shrink appears (likely XLA's split-K sum): a tie
with XLA's terms (1,743 against 1,710 µs a 64-row step). The kernel's own loops pipelined (`NUM_STAGES` 3) or written
out (`UNROLL`) lose more (H100, session 58: 2,224 and 2,522 against XLA's 1,841 µs a 64-row step). Opt-in
(`jaxserve.model.LORA_KERNELS`); `skinny_matmul`'s `lora` term (`jaxserve.model.LORA_FOLD`) is the other route tried.

Backend: Pallas Triton, like the other small-row kernels (`jaxserve_kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.skinny_matmul import own_slot_columns, swiglu_sums

# Inputs this wide or narrower are shrunk inside every expand program (one launch); wider ones in a launch of
# their own over K splits. Qwen2.5-0.5B: QKV, o_proj and gate_up (896) inline, down_proj (4,864) split.
INLINE_K = int(os.environ.get("JAXSERVE_LORA_INLINE_K", "1024"))
# Elements of K a program (or an inline shrink's loop iteration) takes; a split shrink's programs take
# `SPLIT_K` each, so down_proj at 0.5B runs 10 splits a row block.
BLOCK_K = 128
# With the loops pipelined (num_stages > 1) each stage holds its x and a tiles in shared memory: QKV's 64 x 128 and
# 256 x 128 bf16 tiles on 3 stages want 240 KiB, past the H200's 227 (session 57), so staged loops take K tiles of 64.
STAGED_BLOCK_K = int(os.environ.get("JAXSERVE_LORA_STAGED_BLOCK_K", "64"))
SPLIT_K = 512
BLOCK_N = 64
MAX_ROW_BLOCK = 64
# Where the shrink runs: "kernel" (above) or "xla", XLA's product writing the float32 shrink as one split for the
# expand launch to select, round and expand, which then loads its shrink rows once (the kernel shrink's loop over K,
# and the split sum's over splits, are chains of dependent L2 loads: 10-18 µs a launch on the H100, session 56). What
# it measured is in the module's docstring. Read at trace time.
SHRINK = os.environ.get("JAXSERVE_LORA_SHRINK", "kernel")
# Triton's software pipeline over the shrink's K loop and the expand's sum over splits (1: none, each iteration's
# loads wait for the one before). Read at trace time.
NUM_STAGES = int(os.environ.get("JAXSERVE_LORA_STAGES", "1"))
# Or those loops written out (their trip counts are static), so that every iteration's loads can issue before the
# first sum waits on one. Read at trace time.
UNROLL = os.environ.get("JAXSERVE_LORA_UNROLL", "0") == "1"


def _loop(n: int, body, init, unroll: bool):
    """``lax.fori_loop(0, n, body, init)``, or the same ``n`` calls written out (one always is)."""
    if not unroll and n > 1:
        return lax.fori_loop(0, n, body, init)
    for i in range(n):
        init = body(jnp.int32(i), init)
    return init


def _shrink(x_ref, a_ref, r0, row_ok, k0, k_len: int, *, block_m: int, block_k: int, cdt, precision, unroll: bool):
    """Float32 ``x[r0:r0+block_m, k0:k0+k_len] @ a[:, k0:k0+k_len].T``: ``[block_m, padded slots * R]``."""
    nr = a_ref.shape[0]
    nr_pad = compat.next_pow2(max(16, nr))
    col_ok = jnp.arange(nr_pad) < nr
    num_k = x_ref.shape[1]

    def body(i, t):
        start = k0 + i * block_k
        k_ok = start + jnp.arange(block_k) < num_k
        xs = compat.load(x_ref.at[pl.ds(r0, block_m), pl.ds(start, block_k)], mask=row_ok[:, None] & k_ok[None, :],
                         other=0)
        a = compat.load(a_ref.at[pl.ds(0, nr_pad), pl.ds(start, block_k)], mask=col_ok[:, None] & k_ok[None, :],
                        other=0)
        return t + compat.dot(xs.astype(cdt), a.astype(cdt), trans_b=True, precision=precision)

    t0 = jnp.zeros((block_m, nr_pad), jnp.float32)
    return _loop(pl.cdiv(k_len, block_k), body, t0, unroll)


def _shrink_kernel(x_ref, a_ref, t_ref, *, block_m: int, split_k: int, block_k: int, cdt, precision, unroll: bool):
    rb, split = pl.program_id(0), pl.program_id(1)
    r0 = rb * block_m
    row_ok = r0 + jnp.arange(block_m) < x_ref.shape[0]
    t = _shrink(x_ref, a_ref, r0, row_ok, split * split_k, split_k, block_m=block_m, block_k=block_k, cdt=cdt,
                precision=precision, unroll=unroll)
    col_ok = jnp.arange(t.shape[1]) < t_ref.shape[2]
    compat.store(t_ref.at[split, pl.ds(r0, block_m), pl.ds(0, t.shape[1])], t, mask=row_ok[:, None] & col_ok[None, :])


def _expand_kernel(slots_ref, x_ref, a_ref, b_ref, acc_ref, out_ref, *, block_m: int, block_n: int, rank: int,
                   splits: int, block_k: int, swiglu: bool, cdt, precision, unroll: bool):
    """``splits`` 0: ``x_ref``/``a_ref`` are the input and adapters (shrink inline); else ``x_ref`` holds the
    split shrink's partials ``[splits, B, slots * R]`` (``a_ref`` unused)."""
    rb, cb = pl.program_id(0), pl.program_id(1)
    r0 = rb * block_m
    batch = slots_ref.shape[0]
    row_ok = r0 + jnp.arange(block_m) < batch
    nr = b_ref.shape[0]
    nr_pad = compat.next_pow2(max(16, nr))
    nrs = jnp.arange(nr_pad)
    nr_ok = nrs < nr
    if splits:  # one split's [block_m, slots * R] at a time: all at once would not fit in registers
        def split(i):
            return compat.load(x_ref.at[i, pl.ds(r0, block_m), pl.ds(0, nr_pad)], mask=row_ok[:, None] & nr_ok[None, :],
                               other=0)

        t = _loop(splits, lambda i, t: t + split(i), jnp.zeros((block_m, nr_pad), jnp.float32), unroll)
    else:
        t = _shrink(x_ref, a_ref, r0, row_ok, 0, x_ref.shape[1], block_m=block_m, block_k=block_k, cdt=cdt,
                    precision=precision, unroll=unroll)
    # The select: a row keeps its own slot's R columns (slot -1, no adapter: none), rounded as `lora_delta` rounds.
    t = own_slot_columns(t, rank, compat.load(slots_ref.at[pl.ds(r0, block_m)], mask=row_ok, other=-1), cdt)
    n_out = out_ref.shape[1]
    c0 = cb * block_n
    col_ok = c0 + jnp.arange(block_n) < n_out
    mask = row_ok[:, None] & col_ok[None, :]

    def term(start):  # the adapters' output columns start.. of this block, float32
        b = compat.load(b_ref.at[pl.ds(0, nr_pad), pl.ds(start, block_n)], mask=nr_ok[:, None] & col_ok[None, :],
                        other=0)
        return compat.dot(t, b.astype(cdt), precision=precision)

    def acc(start):
        return compat.load(acc_ref.at[pl.ds(r0, block_m), pl.ds(start, block_n)], mask=mask,
                           other=0).astype(jnp.float32)

    if swiglu:  # gate's columns c and up's columns n_out + c, then silu(gate) * up
        gate = acc(c0) + term(c0)
        up = acc(n_out + c0) + term(n_out + c0)
        out = swiglu_sums(gate, up, out_ref.dtype)  # Hugging Face's roundings, as the base model's epilogue
    else:
        out = acc(c0) + term(c0)
    compat.store(out_ref.at[pl.ds(r0, block_m), pl.ds(c0, block_n)], out.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("swiglu", "out_dtype", "interpret", "inline_k", "split_k", "block_n",
                                             "block_m", "shrink", "num_warps", "num_stages", "unroll"))
def _lora(x, a, b, slots, acc, *, swiglu: bool, out_dtype, interpret: bool, inline_k: int, split_k: int,
          block_n: int, block_m: int | None, shrink: str, num_warps: int | None, num_stages: int, unroll: bool):
    batch, k = x.shape
    n_slots, rank, _ = a.shape
    a2, b2 = a.reshape(n_slots * rank, k), b.reshape(n_slots * rank, -1)
    cdt = x.dtype
    precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None
    block_m = block_m or min(MAX_ROW_BLOCK, max(16, compat.next_pow2(batch)))
    row_blocks = pl.cdiv(batch, block_m)
    # The shrink's [block_m, slots * R] float32 sum lives in registers: 64 x 256 (QKV's 4 slots of 3 x 16) is 128 a
    # thread over 4 warps, so wide ones take 8.
    warps = num_warps or (8 if block_m * compat.next_pow2(max(16, n_slots * rank)) > 8192 else 4)
    block_k = BLOCK_K if num_stages == 1 else STAGED_BLOCK_K
    # The expand's first operand: the input (splits 0, the shrink inline), or the shrink's float32 partials.
    if shrink == "xla":  # XLA's own product, as the expand's single split
        splits = 1
        shrunk = lax.dot_general(x, a2.astype(cdt), (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)[None]
    elif k <= inline_k:
        splits, shrunk = 0, x
    else:
        splits = pl.cdiv(k, split_k)
        shrunk = compat.triton_call(
            functools.partial(_shrink_kernel, block_m=block_m, split_k=split_k, block_k=block_k, cdt=cdt,
                              precision=precision, unroll=unroll),
            x, a2, grid=(row_blocks, splits), out_shape=jax.ShapeDtypeStruct((splits, batch, n_slots * rank),
                                                                           jnp.float32),
            interpret=interpret, num_warps=warps, num_stages=num_stages, name="lora_shrink")
    n_out = acc.shape[1] // 2 if swiglu else acc.shape[1]
    kernel = functools.partial(_expand_kernel, block_m=block_m, block_n=block_n, rank=rank, splits=splits,
                               block_k=block_k, swiglu=swiglu, cdt=cdt, precision=precision, unroll=unroll)
    return compat.triton_call(
        kernel, slots.astype(jnp.int32), shrunk, a2, b2, acc, grid=(row_blocks, pl.cdiv(n_out, block_n)),
        out_shape=jax.ShapeDtypeStruct((batch, n_out), out_dtype), interpret=interpret, num_warps=warps,
        num_stages=num_stages, name="lora_swiglu" if swiglu else "lora_add",
        input_output_aliases={} if swiglu or acc.dtype != out_dtype else {4: 0})


def _check(x, a, b, slots, acc, n_out: int) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [batch, in], got {x.shape}")
    if a.ndim != 3 or a.shape[2] != x.shape[1]:
        raise ValueError(f"a must be [slots, rank, {x.shape[1]}] (x's width), got {a.shape}")
    if b.shape[:2] != a.shape[:2] or b.ndim != 3:
        raise ValueError(f"b must be [{a.shape[0]}, {a.shape[1]}, out] (a's slots and rank), got {b.shape}")
    if slots.shape != (x.shape[0],):
        raise ValueError(f"slots must be [{x.shape[0]}] (x's rows), got {slots.shape}")
    if acc.shape != (x.shape[0], n_out):
        raise ValueError(f"acc must be [{x.shape[0]}, {n_out}], got {acc.shape}")


def lora_add(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array, acc: jax.Array, *,
             interpret: bool | None = None, shrink: str | None = None, inline_k: int | None = None,
             split_k: int | None = None, block_n: int | None = None, block_m: int | None = None,
             num_warps: int | None = None, num_stages: int | None = None, unroll: bool | None = None) -> jax.Array:
    """``acc`` plus each row's adapter term ``(x_i @ a[slots_i].T) @ b[slots_i]``, in ``acc``'s dtype.

    Args:
        x: ``[batch, in]`` the projection's input (its dtype is the products').
        a: ``[slots, R, in]``, b: ``[slots, R, out]`` every slot's adapters (`jaxserve.lora.LoraSlots`).
        slots: ``[batch]`` int, each row's slot; -1: no adapter (``acc`` unchanged).
        acc: ``[batch, out]`` what the term is added to; float32 is updated in place (donate it).
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        shrink: ``"kernel"`` (inline or split, by ``inline_k``) or ``"xla"`` (XLA's product, then the kernel's
            select and expand); `SHRINK` by default.
        inline_k, split_k, block_n, block_m, num_warps, num_stages, unroll: tiling (`INLINE_K`, `SPLIT_K`,
            `BLOCK_N`, `NUM_STAGES`, `UNROLL` by default).

    Example:
        >>> a, b = jnp.ones((2, 16, 32)), jnp.ones((2, 16, 8))
        >>> out = lora_add(jnp.ones((3, 32)), a, b, jnp.array([0, 1, -1]), jnp.zeros((3, 8)))
        >>> out[:, 0].tolist()
        [512.0, 512.0, 0.0]
    """
    _check(x, a, b, slots, acc, b.shape[2])
    return _lora(x, a, b, slots, acc, swiglu=False, out_dtype=jnp.dtype(acc.dtype),
                 interpret=compat.resolve_interpret(interpret), **_tiling(shrink, inline_k, split_k, block_n, block_m,
                                                                          num_warps, num_stages, unroll))


def lora_swiglu(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array, h: jax.Array, *,
                out_dtype=None, interpret: bool | None = None, shrink: str | None = None, inline_k: int | None = None,
                split_k: int | None = None, block_n: int | None = None, block_m: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None, unroll: bool | None = None) -> jax.Array:
    """``silu(g) * u`` where ``[g | u] = h + `` each row's adapter term (gate_up's output and adapters, the halves
    side by side): the MLP's activation with the adapters in, one launch. ``out_dtype`` defaults to ``h``'s; the
    rest as `lora_add`'s.

    Example:
        >>> a, b = jnp.zeros((1, 16, 32)), jnp.zeros((1, 16, 8))
        >>> lora_swiglu(jnp.ones((2, 32)), a, b, jnp.array([0, -1]), jnp.ones((2, 8))).shape
        (2, 4)
    """
    _check(x, a, b, slots, h, b.shape[2])
    if h.shape[1] % 2:
        raise ValueError(f"h must hold gate and up side by side (an even width), got {h.shape}")
    return _lora(x, a, b, slots, h, swiglu=True, out_dtype=jnp.dtype(out_dtype or h.dtype),
                 interpret=compat.resolve_interpret(interpret), **_tiling(shrink, inline_k, split_k, block_n, block_m,
                                                                          num_warps, num_stages, unroll))


def _tiling(shrink, inline_k, split_k, block_n, block_m, num_warps, num_stages, unroll) -> dict:
    shrink = shrink or SHRINK
    if shrink not in ("kernel", "xla"):
        raise ValueError(f"shrink must be 'kernel' or 'xla', got {shrink!r}")
    return dict(shrink=shrink, inline_k=INLINE_K if inline_k is None else inline_k, split_k=split_k or SPLIT_K,
                block_n=block_n or BLOCK_N, block_m=block_m, num_warps=num_warps, num_stages=num_stages or NUM_STAGES,
                unroll=UNROLL if unroll is None else bool(unroll))


def lora_term_reference(x, a, b, slots) -> jax.Array:
    """The adapter term in float32, as `jaxserve.lora.lora_delta` computes it (shrink in float32, selected,
    rounded to ``x``'s dtype, expand in float32)."""
    n, r, _ = a.shape
    t = jnp.dot(x, a.reshape(n * r, -1).astype(x.dtype).T, preferred_element_type=jnp.float32,
                precision=lax.Precision.HIGHEST)
    t = own_slot_columns(t, r, slots, x.dtype)
    return jnp.dot(t, b.reshape(n * r, -1).astype(x.dtype), preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST)


def lora_add_reference(x, a, b, slots, acc) -> jax.Array:
    """`lora_add` in jnp."""
    return (acc.astype(jnp.float32) + lora_term_reference(x, a, b, slots)).astype(acc.dtype)


def lora_swiglu_reference(x, a, b, slots, h, out_dtype=None) -> jax.Array:
    """`lora_swiglu` in jnp: gate and up with their terms rounded to ``out_dtype``, silu's output too (Hugging
    Face's roundings of a bf16 MLP)."""
    dtype = out_dtype or h.dtype
    hh = h.astype(jnp.float32) + lora_term_reference(x, a, b, slots)
    g, u = (p.astype(dtype).astype(jnp.float32) for p in jnp.split(hh, 2, axis=1))
    return (jax.nn.silu(g).astype(dtype).astype(jnp.float32) * u).astype(dtype)
