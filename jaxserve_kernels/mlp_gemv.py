"""The one-row decode MLP in one launch: add + RMSNorm, gate_up, SwiGLU and down_proj.

Owns: `fused_mlp_gemv` (one row, `[N, K]` weights as Hugging Face stores them) and its jnp
reference. Never decides when it is used (`jaxserve.model.MLP_GEMV` does).

Why: at batch 1 the decode step is bound by each kernel's own dependent chain (launch, first
weight round trip, reduction, store) more than by its bytes: the norm-folded gate_up streamed its
17.4 MB in ~7.0 µs and down_proj its 8.7 MB in ~4.5 µs a layer on the H200 (session 15,
bench/results/decode_step.md), against ~6 µs for both at the read ceiling. Fusing the two as
phases of one kernel (a down_proj that waits for all of gate_up) lost (session 23: the phase
boundary costs what the launch did). Here nothing waits: program p owns a block of the
intermediate columns end to end. It loads its columns of W_down at its start (they do not
depend on the activation), re-derives the row's add + RMSNorm (a few KiB from L2), multiplies its
gate and up rows, applies SwiGLU, multiplies the result by its W_down columns and adds that
partial down_proj into a float32 accumulator with atomic adds. So a layer's MLP is one launch and
one dependent chain, and its down_proj weights stream under gate_up's.

The accumulator must hold zeros when the kernel starts, and it is read by the next layer's
norm-folded QKV, so two buffers alternate by layer (`spare`): each launch adds into one and
writes zeros into the other, which the layer before filled and this layer's QKV has read (every
read of it precedes this launch). Float32 atomic adds land in a run-dependent order, as
`jaxserve.model.ACCUMULATE`'s TMA reductions do: the sums agree to float32 rounding, not bit for bit.

Backend: Pallas Triton, like the other kernels (`jaxserve_kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.skinny_matmul import NORM_GEMV_MAX_K, skinny_matmul_norm_reference, swiglu_sums

# Intermediate columns a program owns (a power of two), gate/up rows a loop step of those, and
# warps. 16 columns make each W_down row's slice one 32-byte sector in bf16; the Qwen2.5-0.5B MLP
# (4864 columns) is then 304 programs.
COLUMNS = 16
BLOCK_N = 4
NUM_WARPS = 8


def _kernel(h_ref, *refs, num_parts: int, eps: float, columns: int, block_n: int, block_k: int,
            inter: int, interpret: bool):
    refs = list(refs)
    p_ref = refs.pop(0) if num_parts else None
    scale_ref, wgu_ref, wd_ref, _acc_in, _spare_in = refs[:5]
    h_out_ref, acc_ref, spare_ref = refs[5:]
    pid = pl.program_id(0)
    k_total = h_ref.shape[1]
    k_ok = jnp.arange(block_k) < k_total
    col0 = pid * columns
    cols = col0 + jnp.arange(columns)
    col_ok = cols < inter
    dtype = h_ref.dtype

    # W_down's columns first: they depend on nothing, so their bytes stream under everything else.
    wd = compat.load(wd_ref.at[pl.ds(0, block_k), pl.ds(col0, columns)], mask=k_ok[:, None] & col_ok[None, :],
                     other=0)

    def gate_up_rows(j: int):
        rows = col0 + j * block_n + jnp.arange(block_n)
        ok = (rows < inter)[:, None] & k_ok[None, :]
        return tuple(compat.load(wgu_ref.at[pl.ds(offset + col0 + j * block_n, block_n), pl.ds(0, block_k)],
                                 mask=ok, other=0) for offset in (0, inter))

    ws = gate_up_rows(0)
    scale = compat.load(scale_ref.at[pl.ds(0, block_k)], mask=k_ok, other=0)
    row = jnp.int32(0)  # a traced index: interpret mode's discharge wants one
    h = compat.load(h_ref.at[row, pl.ds(0, block_k)], mask=k_ok, other=0)
    if num_parts:  # add_rms_norm's sum and roundings, redone by every program (an L2-resident row)
        parts = [compat.load(p_ref.at[jnp.int32(i), row, pl.ds(0, block_k)], mask=k_ok, other=0)
                 for i in range(num_parts)]
        delta = functools.reduce(jnp.add, parts)
        h = (h.astype(jnp.float32) + delta.astype(dtype).astype(jnp.float32)).astype(dtype)
    hf = h.astype(jnp.float32)
    normed = (hf * lax.rsqrt(jnp.sum(hf * hf) / k_total + eps)).astype(dtype)
    x = (scale.astype(jnp.float32) * normed.astype(jnp.float32)).astype(dtype).astype(jnp.float32)

    # SwiGLU of the program's columns, block_n at a time, the next block's rows loaded before this
    # one's products (unrolled: a handful of steps, and each lands at static positions of `act`).
    act = jnp.zeros((columns,), jnp.float32)
    slots = jnp.arange(columns)
    for j in range(columns // block_n):
        nxt = gate_up_rows(j + 1) if (j + 1) * block_n < columns else None
        gate, up = (jnp.sum(w.astype(jnp.float32) * x[None, :], axis=1) for w in ws)
        vals = swiglu_sums(gate, up, dtype).astype(dtype).astype(jnp.float32)  # rounded as down's input
        place = slots[:, None] == (j * block_n + jnp.arange(block_n))[None, :]
        act = act + jnp.sum(jnp.where(place, vals[None, :], 0.0), axis=1)
        ws = nxt

    out = jnp.sum(wd.astype(jnp.float32) * act[None, :], axis=1)  # this block's share of down_proj: [K]
    if interpret:  # the interpreter has no masked atomics; it runs the programs one after another
        prev = compat.load(acc_ref.at[row, pl.ds(0, block_k)], mask=k_ok, other=0)
        compat.store(acc_ref.at[row, pl.ds(0, block_k)], prev + out, mask=k_ok)
    else:
        compat.atomic_add(acc_ref, (row, pl.ds(0, block_k)), out, mask=k_ok)

    @pl.when(pid == 0)
    def _():
        compat.store(h_out_ref.at[row, pl.ds(0, block_k)], h, mask=k_ok)
        compat.store(spare_ref.at[row, pl.ds(0, block_k)], jnp.zeros((block_k,), jnp.float32), mask=k_ok)


@functools.partial(jax.jit, static_argnames=("eps", "columns", "block_n", "num_warps", "interpret"))
def _fused(hidden, partials, scale, w_gate_up, w_down, acc, spare, *, eps: float, columns: int, block_n: int,
           num_warps: int, interpret: bool):
    k = hidden.shape[1]
    inter = w_gate_up.shape[0] // 2
    num_parts = 0 if partials is None else partials.shape[0]
    kernel = functools.partial(_kernel, num_parts=num_parts, eps=eps, columns=columns, block_n=block_n,
                               block_k=compat.next_pow2(k), inter=inter, interpret=interpret)
    args = [hidden] + ([partials] if num_parts else []) + [scale, w_gate_up, w_down, acc, spare]
    first_acc = len(args) - 2
    out_shape = [jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
                 jax.ShapeDtypeStruct(acc.shape, jnp.float32), jax.ShapeDtypeStruct(spare.shape, jnp.float32)]
    return compat.triton_call(kernel, *args, grid=(pl.cdiv(inter, columns),), out_shape=out_shape,
                              interpret=interpret, num_warps=num_warps, name="fused_mlp_gemv",
                              input_output_aliases={first_acc: 1, first_acc + 1: 2})


def fused_mlp_gemv(hidden: jax.Array, partials: jax.Array | None, scale: jax.Array, w_gate_up: jax.Array,
                   w_down: jax.Array, acc: jax.Array, spare: jax.Array, *, eps: float,
                   columns: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                   interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One row's `h = hidden + sum(partials)`, then `acc + down(swiglu(gate_up(RMSNorm(h) * scale)))`.

    The residual add and norm have `jaxserve_kernels.residual_norm.add_rms_norm`'s roundings, SwiGLU
    `skinny_matmul`'s; down_proj's sums stay float32, added into `acc` (in place: donate it).
    `spare` comes back as zeros (in place too): the next layer's accumulator.

    Args:
        hidden: `[1, K]` residual stream.
        partials: `[S, 1, K]` float32 partial sums to add into it first (o_proj's), or None.
        scale: `[K]` the norm's weight.
        w_gate_up: `[2I, K]` gate rows then up rows; w_down: `[K, I]`.
        acc: `[1, K]` float32, zeros unless something is to be added to; spare: `[1, K]` float32.
        eps: the norm's epsilon.
        columns, block_n, num_warps: intermediate columns a program (power of two), gate/up rows
            a step of them (a power of two dividing `columns`), warps; None: the module's defaults.
        interpret: Pallas interpret mode; None picks it on the CPU backend.

    Returns:
        `(h, acc + down_proj, zeros)`.

    Example:
        >>> z = jnp.zeros((1, 8))
        >>> h, out, spare = fused_mlp_gemv(jnp.ones((1, 8)), None, jnp.ones(8), jnp.ones((4, 8)),
        ...                                jnp.ones((8, 2)), z, z + 5, eps=0.0)
        >>> round(out[0, 0].item(), 3), spare.sum().item()   # two columns of silu(8) * 8
        (127.957, 0.0)
    """
    if hidden.ndim != 2 or hidden.shape[0] != 1:
        raise ValueError(f"hidden must be [1, K], got {hidden.shape}")
    k = hidden.shape[1]
    if k > NORM_GEMV_MAX_K:
        raise ValueError(f"hidden's K must be at most NORM_GEMV_MAX_K={NORM_GEMV_MAX_K}, got {k}")
    if partials is not None and (partials.ndim != 3 or partials.shape[1:] != hidden.shape):
        raise ValueError(f"partials must be [S, 1, {k}], got {partials.shape}")
    if scale.shape != (k,):
        raise ValueError(f"scale must be [{k}], got {scale.shape}")
    if w_gate_up.ndim != 2 or w_gate_up.shape[1] != k or w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must be [2I, {k}], got {w_gate_up.shape}")
    inter = w_gate_up.shape[0] // 2
    if w_down.shape != (k, inter):
        raise ValueError(f"w_down must be [{k}, {inter}], got {w_down.shape}")
    for name, arr in (("acc", acc), ("spare", spare)):
        if arr.shape != (1, k) or arr.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32 [1, {k}], got {arr.dtype} {arr.shape}")
    columns = columns or COLUMNS
    block_n = min(block_n or BLOCK_N, columns)
    for name, v in (("columns", columns), ("block_n", block_n)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    if partials is not None:
        partials = partials.astype(jnp.float32)
    return _fused(hidden, partials, scale, w_gate_up, w_down, acc, spare, eps=float(eps), columns=columns,
                  block_n=block_n, num_warps=num_warps or NUM_WARPS,
                  interpret=compat.resolve_interpret(interpret))


def fused_mlp_gemv_reference(hidden: jax.Array, partials: jax.Array | None, scale: jax.Array,
                             w_gate_up: jax.Array, w_down: jax.Array, acc: jax.Array, spare: jax.Array, *,
                             eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """jnp reference of `fused_mlp_gemv`: the norm-folded gate_up's reference, then down_proj in float32.

    Example:
        >>> z = jnp.zeros((1, 8))
        >>> _, out, _ = fused_mlp_gemv_reference(jnp.ones((1, 8)), None, jnp.ones(8), jnp.ones((4, 8)),
        ...                                      jnp.ones((8, 2)), z, z, eps=0.0)
        >>> round(out[0, 0].item(), 3)
        127.957
    """
    h, act = skinny_matmul_norm_reference(hidden, partials, scale, w_gate_up, eps=eps, epilogue="swiglu")
    down = jnp.dot(act.astype(jnp.float32), w_down.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)
    return h, acc + down, jnp.zeros_like(spare)
