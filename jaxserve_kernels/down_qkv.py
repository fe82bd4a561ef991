"""One layer's down_proj and the next layer's add + RMSNorm + QKV projection in one launch (one-row decode).

Owns: `fused_down_qkv` (the one-row lane-wise down_proj of `jaxserve_kernels.skinny_matmul.skinny_matmul`, as K-split
partial sums, and the norm-folded QKV projection of `skinny_matmul_norm` that adds them into the residual stream, as
two kinds of program of one grid), its arrival counters (`new_counter`), the rule for when it may run (`fits`), and
its jnp reference. Never decides when it is used (`jaxserve.model.MERGE_DOWN_QKV` does).

Why: at one row a dependent kernel costs ~2.6 µs on the H200 besides its bytes (bench/kernel_floor.py,
bench/results/decode_step.md session 42), and the QKV kernel (2.7 µs for 2 MB) is mostly that: its launch, its
weight rows' DRAM round trip, then its product. Its weights do not depend on the down_proj before it, only its
input row does. Here the QKV programs are placed with the down_proj's, load their weight rows (and the norm's
weight, the bias) at once, and wait only for the partial sums.

How: a 1-D grid. Programs `[0, D)` are down_proj's (`skinny_matmul._kernel`, its one-row tiling and K splits);
each ends with a barrier (its threads' stores before the ticket) and an acquire-release atomic add on one of
`ARRIVAL_SLOTS` counters; the last to arrive on a slot zeroes it and adds one to the master counter (its own add
having acquired the slot's earlier arrivals, its release passes them on). Programs `[D, D + Q)` are QKV's
(`skinny_matmul.norm_gemv_program`), which spin on the master (atomic reads) after their independent loads until
every slot has arrived, then read the partials. The last of them to pass (a ticket on the departures counter)
zeroes the master and itself, so the array the caller threads through the layers (aliased in place) is ready for
the next launch. With `touch_pages`, programs past those read the next
attention's pages as `skinny_matmul_norm(touch_pages=...)` does (`jaxserve.model.PREFETCH_KV`).

Why it cannot deadlock: a waiting program holds its slot on an SM, so the waiters must never fill the GPU while a
down_proj program is still to be placed. Every SM holds at least one program of any kernel that launches, so fewer
QKV programs than SMs always leave a slot (`fits`; hence QKV programs of `QKV_BLOCK_N` = 16 rows, 72 of them at
Qwen2.5-0.5B); in practice the GPU places programs in grid order anyway, down_proj's first. Interpreted,
programs run one after another in grid order: down_proj's have all finished when the first waiter looks.

Backend: Pallas Triton, as both halves (`jaxserve_kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat

# The module, not the function of the same name that the package's __init__ exports.
_sm = sys.modules["jaxserve_kernels.skinny_matmul"]

# Weight rows a QKV program: few enough programs to stay under the SM count (see the module docstring).
QKV_BLOCK_N = 16
# down_proj's programs arrive on this many counters (one 128-byte row each), the last of each on the master
# counter the waiters poll: every poll and arrival on one address queued at its L2 slice (H200, session 43:
# 448 arrivals and 72 polling programs, 10.5 µs a launch against 7.3 for the two kernels).
ARRIVAL_SLOTS = 16
_MASTER, _DEPARTED, _SLOT0 = 0, 1, 2


def new_counter() -> jax.Array:
    """The kernel's counters, zeroed (the master, the departures, then `ARRIVAL_SLOTS` arrival slots, a 128-byte
    row each): made once a forward pass and threaded through its layers.

    Example:
        >>> int(new_counter().sum()), new_counter().shape
        (0, (18, 32))
    """
    return jnp.zeros((_SLOT0 + ARRIVAL_SLOTS, 32), jnp.int32)


def qkv_programs(n_qkv: int, block_n: int | None = None) -> int:
    """Programs of the QKV half (those that wait): one a block of `block_n` weight rows."""
    return pl.cdiv(n_qkv, block_n or QKV_BLOCK_N)


def fits(n_qkv: int, block_n: int | None = None, device: Any = None) -> bool:
    """Whether the QKV half's waiting programs leave a slot for down_proj's on `device` (None: the first JAX
    device): fewer of them than its SMs. Always true on the CPU (interpret mode runs programs in order).

    Example:
        >>> fits(1152) if jax.default_backend() == "cpu" else True
        True
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return True
    return qkv_programs(n_qkv, block_n) < (getattr(device, "core_count", 0) or 0)


def _kernel(act_ref, w_down_ref, h_ref, scale_ref, w_ref, *refs, has_bias: bool, touches: int, n_down: int,
            n_qkv: int, down_kw: dict, norm_kw: dict, splits: int, interpret: bool):
    refs = list(refs)
    b_ref = refs.pop(0) if has_bias else None
    k_pages_ref, v_pages_ref, table_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if touches else (None,) * 3
    refs.pop(0)  # the counter's input; its output ref (aliased) is the one used
    parts_ref, h_out_ref, o_ref, counter_ref = refs[:4]
    touch_ref = refs[4] if touches else None
    pid = pl.program_id(0)

    slots = min(ARRIVAL_SLOTS, n_down)

    def add(row: int | jax.Array, value: int) -> jax.Array:  # an acquire-release add at GPU scope
        return compat.atomic_add(counter_ref, (jnp.int32(row), jnp.int32(0)), jnp.int32(value))

    @pl.when(pid < n_down)
    def _down():
        _sm._kernel(act_ref, w_down_ref, parts_ref, ids=(0, pid // splits, pid % splits), **down_kw)
        compat.barrier(interpret)  # every thread's partial stores before the ticket
        slot = pid % slots
        ticket = add(_SLOT0 + slot, 1)

        @pl.when(ticket == n_down // slots + (slot < n_down % slots).astype(jnp.int32) - 1)
        def _last_of_slot():  # its add acquired the slot's earlier arrivals; this one releases them all
            counter_ref[_SLOT0 + slot, 0] = jnp.int32(0)  # nobody else touches the slot in this launch
            add(_MASTER, 1)

    def inputs_ready():
        # Interpreted, down_proj's programs have all run (grid order), and the interpreter's state discharge
        # has no rule for a loop around an atomic: no loop there.
        if not interpret:
            arrived = lambda _: add(_MASTER, 0)
            lax.while_loop(lambda n: n < slots, arrived, arrived(None))
        ticket = add(_DEPARTED, 1)

        @pl.when(ticket == n_qkv - 1)
        def _reset():  # every waiter has passed: ready for the next launch
            counter_ref[_MASTER, 0] = jnp.int32(0)
            counter_ref[_DEPARTED, 0] = jnp.int32(0)

    @pl.when((pid >= n_down) & (pid < n_down + n_qkv))
    def _qkv():
        _sm.norm_gemv_program(pid - n_down, h_ref, parts_ref, scale_ref, w_ref, b_ref, h_out_ref, o_ref,
                              inputs_ready=inputs_ready, **norm_kw)

    if touches:
        pl.when(pid >= n_down + n_qkv)(
            lambda: _sm.touch_program(pid - n_down - n_qkv, k_pages_ref, v_pages_ref, table_ref, touch_ref))


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "interpret"))
def _fused(act, w_down, hidden, norm_scale, w_qkv, b_qkv, counter, touch_pages, *, eps: float, block_n: int,
           interpret: bool):
    m, k_down = act.shape
    n_hidden, k = hidden.shape[1], hidden.shape[1]
    # down_proj exactly as `skinny_matmul(act, w_down, epilogue="partials", layout="nk", gemv=True)` tiles it.
    down_n, down_k, splits = _sm.default_tiling(m, k_down, n_hidden, "partials", layout="nk", gemv=True)
    precision = lax.Precision.HIGHEST if w_down.dtype == jnp.float32 else None
    down_kw = dict(epilogue="partials", has_bias=False, k_per_split=pl.cdiv(pl.cdiv(k_down, down_k), splits) * down_k,
                   block_m=m, block_n=down_n, block_k=down_k, n_out=n_hidden, precision=precision, layout="nk",
                   gemv=True, prefetch=_sm.NK_GEMV_PREFETCH)
    n_down = pl.cdiv(n_hidden, down_n) * splits
    n_qkv = w_qkv.shape[0]
    n_wait = pl.cdiv(n_qkv, block_n)
    norm_kw = dict(num_parts=splits, eps=eps, epilogue="none", block_n=block_n, block_k=compat.next_pow2(k),
                   n_out=n_qkv, num_programs=n_wait, hoist=_sm.NORM_GEMV_HOIST)
    touches = _sm.touch_tiles(touch_pages)
    kernel = functools.partial(_kernel, has_bias=b_qkv is not None, touches=touches, n_down=n_down, n_qkv=n_wait,
                               down_kw=down_kw, norm_kw=norm_kw, splits=splits, interpret=interpret)
    operands = [act, w_down, hidden, norm_scale, w_qkv] + ([b_qkv] if b_qkv is not None else []) \
        + (list(touch_pages) if touches else []) + [counter]
    out_shape = [jax.ShapeDtypeStruct((splits, m, n_hidden), jnp.float32),  # down_proj's partials (scratch)
                 jax.ShapeDtypeStruct(hidden.shape, hidden.dtype), jax.ShapeDtypeStruct((m, n_qkv), hidden.dtype),
                 jax.ShapeDtypeStruct(counter.shape, counter.dtype)] \
        + ([jax.ShapeDtypeStruct((touches,), jnp.float32)] if touches else [])
    outs = compat.triton_call(kernel, *operands, grid=(n_down + n_wait + touches,), out_shape=out_shape,
                              input_output_aliases={len(operands) - 1: 3}, interpret=interpret,
                              num_warps=_sm.NK_GEMV_WARPS, num_stages=_sm.NUM_STAGES, name="fused_down_qkv")
    return outs[1], outs[2], outs[3]


def fused_down_qkv(act: jax.Array, w_down: jax.Array, hidden: jax.Array, norm_scale: jax.Array, w_qkv: jax.Array,
                   b_qkv: jax.Array | None, counter: jax.Array, *, eps: float, touch_pages: tuple | None = None,
                   block_n: int | None = None, interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`skinny_matmul(act, w_down, epilogue="partials", layout="nk", gemv=True)`, then `skinny_matmul_norm(hidden,
    those partials, norm_scale, w_qkv, b_qkv)`, in one launch.

    Args:
        act: `[M, F]` the MLP's activations (M <= `NORM_GEMV_MAX_ROWS`); w_down: `[H, F]` down_proj (`[N, K]`).
        hidden: `[M, H]` the residual stream before down_proj's output is added (H <= `NORM_GEMV_MAX_K`).
        norm_scale: `[H]` the next layer's input norm weight; w_qkv: `[N, H]` its QKV projection; b_qkv: `[N]` or None.
        counter: `new_counter()`'s array, or the one the previous call returned (left at zero); donate it.
        eps: the norm's epsilon.
        touch_pages: `(k_pages, v_pages, block_tables)` or None, as `skinny_matmul_norm`'s.
        block_n: QKV weight rows a program (None: `QKV_BLOCK_N`); `fits` says which counts a device can wait on.
        interpret: Pallas interpret mode; None picks it on the CPU backend.

    Returns:
        `(h, qkv, counter)`: the new residual stream `hidden + down_proj(act)` (rounded as `skinny_matmul_norm`
        rounds it), the QKV projection of its norm `[M, N]`, the counters back at zero.

    Example:
        >>> h, qkv, c = fused_down_qkv(jnp.ones((1, 64)), jnp.ones((32, 64)) / 64, jnp.ones((1, 32)), jnp.ones(32),
        ...                            jnp.ones((48, 32)), None, new_counter(), eps=0.0)
        >>> h[0, :2].tolist(), qkv.shape, int(c.sum())
        ([2.0, 2.0], (1, 48), 0)
    """
    if act.ndim != 2 or not 1 <= act.shape[0] <= _sm.NORM_GEMV_MAX_ROWS:
        raise ValueError(f"act must be [M, F] with 1 <= M <= {_sm.NORM_GEMV_MAX_ROWS}, got {act.shape}")
    m, f = act.shape
    if hidden.ndim != 2 or hidden.shape[0] != m or hidden.shape[1] > _sm.NORM_GEMV_MAX_K:
        raise ValueError(f"hidden must be [{m}, H] with H <= {_sm.NORM_GEMV_MAX_K}, got {hidden.shape}")
    h = hidden.shape[1]
    if w_down.shape != (h, f):
        raise ValueError(f"w_down must be [{h}, {f}] ([hidden, intermediate]), got {w_down.shape}")
    if norm_scale.shape != (h,):
        raise ValueError(f"norm_scale must be [{h}], got {norm_scale.shape}")
    if w_qkv.ndim != 2 or w_qkv.shape[1] != h:
        raise ValueError(f"w_qkv must be [N, {h}], got {w_qkv.shape}")
    if b_qkv is not None and b_qkv.shape != (w_qkv.shape[0],):
        raise ValueError(f"b_qkv must be [{w_qkv.shape[0]}], got {b_qkv.shape}")
    want = new_counter()
    if counter.shape != want.shape or counter.dtype != want.dtype:
        raise ValueError(f"counter must be new_counter()'s int32{list(want.shape)}, got {counter.dtype}"
                         f"{list(counter.shape)}")
    if touch_pages is not None and (len(touch_pages) != 3 or touch_pages[2].shape[0] != m):
        raise ValueError(f"touch_pages must be (k_pages, v_pages, block_tables [{m}, W])")
    block_n = block_n or QKV_BLOCK_N
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    return _fused(act, w_down, hidden, norm_scale, w_qkv, b_qkv, counter, touch_pages, eps=float(eps),
                  block_n=block_n, interpret=compat.resolve_interpret(interpret))


def fused_down_qkv_reference(act, w_down, hidden, norm_scale, w_qkv, b_qkv, counter, *, eps, touch_pages=None):
    """jnp reference of `fused_down_qkv`: the two references it runs, one after the other.

    Example:
        >>> h, qkv, c = fused_down_qkv_reference(jnp.ones((1, 64)), jnp.ones((32, 64)) / 64, jnp.ones((1, 32)),
        ...                                      jnp.ones(32), jnp.ones((48, 32)), None, new_counter(), eps=0.0)
        >>> h[0, :2].tolist(), qkv.shape
        ([2.0, 2.0], (1, 48))
    """
    partials = _sm.skinny_matmul_reference(act, w_down, epilogue="partials", layout="nk")
    h, qkv = _sm.skinny_matmul_norm_reference(hidden, partials, norm_scale, w_qkv, b_qkv, eps=eps)
    return h, qkv, jnp.zeros_like(counter)
