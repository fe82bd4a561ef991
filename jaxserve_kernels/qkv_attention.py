"""A one-row decode layer's QKV projection and its attention + o_proj in one launch.

Owns: `fused_qkv_attention_o` (the norm-folded QKV projection of
`jaxserve_kernels.skinny_matmul.skinny_matmul_norm` and the fused attention with o_proj of
`jaxserve_kernels.decode_attention.fused_decode_attention_o`, as two kinds of program of one grid), its
arrival counter (`new_counter`), the rule for when it can run (`fits`), and its jnp reference. Never decides
when it is used (`jaxserve.model.MERGE_QKV_ATTENTION` does).

Why: at one row every dependent kernel costs ~2.6 µs on the H200 besides its bytes (bench/kernel_floor.py,
bench/results/decode_step.md session 42), and the attention's own chain starts with a DRAM round trip for
its key / value pages and Wo's rows, none of which depends on the QKV projection before it. Here the
attention's programs are launched with the projection's: they gather their first key block and load their Wo
rows at once, then wait for the projection, so that chain runs under the projection's instead of after it.

How: a 1-D grid. Programs `[0, P)` are the projection's (`skinny_matmul.norm_gemv_program`, writing qkv as
`[M, heads, head_dim]`); each then takes a barrier (its threads' stores before the ticket) and adds one to
`counter[0]` (an acquire-release atomic at GPU scope). Programs `[P, P + A)` are the attention's
(`decode_attention._fused_kernel` with o_proj folded: one per row, KV head and block of Wo's rows); after
their independent loads each spins on `counter[0]` until all P have arrived, then reads qkv. The last of
them to pass (a ticket on `counter[1]`) puts both counters back to zero, so the array the caller threads
through the layers (aliased in place) is ready for the next launch.

Why it cannot deadlock: a waiting program holds its SM slot, so the waiters must never fill the GPU while
a projection program is still to be scheduled. Every SM holds at least one program of any kernel that
launches, so fewer attention programs than SMs always leave a slot for the projection (`fits`); and the
GPU hands out programs in grid order in practice, so the projection's are all placed first anyway. In
interpret mode programs run one after another in grid order: the projection's have all finished when the
first waiter looks.

Backend: Pallas Triton, as both halves (`jaxserve_kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat

# Modules, not the functions of the same names that the package's __init__ exports.
_da = sys.modules["jaxserve_kernels.decode_attention"]
_paged = sys.modules["jaxserve_kernels.paged_attention"]
_sm = sys.modules["jaxserve_kernels.skinny_matmul"]

# Weight rows a projection program (a divisor of head_dim). 4 is `skinny_matmul_norm`'s own QKV tile.
QKV_BLOCK_N = 4


def new_counter() -> jax.Array:
    """The kernel's two arrival counters, zeroed: made once a forward pass and threaded through its layers.

    Example:
        >>> new_counter().tolist()
        [0, 0]
    """
    return jnp.zeros((2,), jnp.int32)


def attention_programs(batch: int, kv_heads: int, hidden: int, o_rows: int | None = None) -> int:
    """Programs of the attention half: one per row, KV head and block of `o_rows` rows of Wo."""
    return batch * kv_heads * pl.cdiv(hidden, o_rows or _da.O_ROWS)


def fits(batch: int, kv_heads: int, hidden: int, device: Any = None) -> bool:
    """Whether the attention half's waiting programs leave a slot for the projection on `device` (None: the
    first JAX device): fewer of them than its SMs. Always true on the CPU (interpret mode runs programs in
    order). See the module docstring.

    Example:
        >>> fits(1, 2, 896) if jax.default_backend() == "cpu" else True
        True
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return True
    cores = getattr(device, "core_count", 0) or 0
    return attention_programs(batch, kv_heads, hidden) < cores


def _kernel(h_ref, *refs, num_parts: int, has_bias: bool, n_proj: int, n_attn: int, chunks: int, kv_heads: int,
            norm_kw: dict, attn_kw: dict, interpret: bool):
    refs = list(refs)
    p_ref = refs.pop(0) if num_parts else None
    scale_ref, w_ref = refs.pop(0), refs.pop(0)
    b_ref = refs.pop(0) if has_bias else None
    slot_ref, table_ref, lengths_ref, cos_ref, sin_ref, k_pages_ref, v_pages_ref, wo_ref = refs[:8]
    refs = refs[8:]
    rot_ref = refs.pop(0) if attn_kw["rot_input"] else None
    refs.pop(0)  # the counter's input; its output ref (aliased) is the one used
    h_out_ref = refs.pop(0) if num_parts else None
    qkv_ref, o_ref, k_out_ref, v_out_ref, counter_ref = refs
    pid = pl.program_id(0)

    @pl.when(pid < n_proj)
    def _project():
        _sm.norm_gemv_program(pid, h_ref, p_ref, scale_ref, w_ref, b_ref, h_out_ref, qkv_ref, num_parts=num_parts,
                              **norm_kw)
        compat.barrier(interpret)  # every thread's qkv stores before the ticket
        compat.atomic_add(counter_ref, (jnp.int32(0),), jnp.int32(1))

    @pl.when(pid >= n_proj)
    def _attend():
        a = pid - n_proj
        seq, head, chunk = a // (kv_heads * chunks), (a // chunks) % kv_heads, a % chunks

        def qkv_ready():
            # Interpreted, the projection's programs have all run (grid order), and the interpreter's state
            # discharge has no rule for a loop around an atomic: no loop there.
            if not interpret:
                arrived = lambda _: compat.atomic_add(counter_ref, (jnp.int32(0),), jnp.int32(0))
                lax.while_loop(lambda n: n < n_proj, arrived, arrived(None))
            ticket = compat.atomic_add(counter_ref, (jnp.int32(1),), jnp.int32(1))

            @pl.when(ticket == n_attn - 1)
            def _reset():  # every waiter has passed: ready for the next launch
                counter_ref[0] = jnp.int32(0)
                counter_ref[1] = jnp.int32(0)

        extra = ([wo_ref] + ([rot_ref] if rot_ref is not None else []))
        # table_ref, the pools: this program's row and KV head already (`_fused`'s block specs).
        _da._fused_kernel(slot_ref, table_ref, lengths_ref, qkv_ref, cos_ref, sin_ref,
                          k_pages_ref, v_pages_ref, *extra, o_ref,
                          k_out_ref, v_out_ref, program=(seq, head, chunk),
                          qkv_ready=qkv_ready, interpret=interpret, **attn_kw)


@functools.partial(jax.jit, static_argnames=("eps", "scale", "block_n", "o_rows", "pages_per_block", "num_warps",
                                             "interpret"))
def _fused(hidden, partials, norm_scale, w_qkv, b_qkv, cos, sin, k_pages, v_pages, block_tables, lengths,
           slot_mapping, wo, counter, *, eps: float, scale: float, block_n: int, o_rows: int, pages_per_block: int,
           num_warps: int, interpret: bool):
    batch, k = hidden.shape
    kv_heads, _, _, head_dim = k_pages.shape
    n_qkv = w_qkv.shape[0]
    heads = n_qkv // head_dim
    num_heads = heads - 2 * kv_heads
    group = num_heads // kv_heads
    block_rows = max(16, compat.next_pow2(group))
    num_parts = 0 if partials is None else partials.shape[0]
    n_proj = pl.cdiv(n_qkv, block_n)
    chunks = pl.cdiv(wo.shape[0], o_rows)
    n_attn = batch * kv_heads * chunks
    rot_input = _da.ROPE_JOINT  # one pipeline stage, as fused_decode_attention_o
    norm_kw = dict(eps=eps, epilogue="none", block_n=block_n, block_k=compat.next_pow2(k), n_out=n_qkv,
                   num_programs=n_proj, hoist=_sm.NORM_GEMV_HOIST, head_dim=head_dim)
    attn_kw = dict(num_heads=num_heads, kv_heads=kv_heads, group=group, block_rows=block_rows, num_splits=1,
                   pages_per_block=pages_per_block, scale=scale,
                   precision=lax.Precision.HIGHEST if k_pages.dtype == jnp.float32 else None,
                   act_dtype=hidden.dtype, o_rows=o_rows, prefetch_wo=_da.O_PREFETCH_WO, rot_input=rot_input,
                   joint_rope=rot_input and group < block_rows, early_gather=_da.EARLY_GATHER, ftz=_paged.FTZ_EXP2,
                   lean=_paged.LEAN_SOFTMAX)
    kernel = functools.partial(_kernel, num_parts=num_parts, has_bias=b_qkv is not None, n_proj=n_proj, n_attn=n_attn,
                               chunks=chunks, kv_heads=kv_heads, norm_kw=norm_kw, attn_kw=attn_kw, interpret=interpret)
    operands = [hidden] + ([partials] if num_parts else []) + [norm_scale, w_qkv] \
        + ([b_qkv] if b_qkv is not None else [])
    pools = len(operands) + 5  # the index of k_pages
    operands += [slot_mapping.astype(jnp.int32), block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
           cos.astype(jnp.float32), sin.astype(jnp.float32), k_pages, v_pages, wo]
    if rot_input:
        operands.append(jnp.asarray(_da._rotate_half_matrix(head_dim, np.float32, xp=np),
                                    k_pages.dtype))
    operands.append(counter)
    out_shape = ([jax.ShapeDtypeStruct(hidden.shape, hidden.dtype)] if num_parts else []) + [
        jax.ShapeDtypeStruct((batch, heads, head_dim), hidden.dtype),
        jax.ShapeDtypeStruct((kv_heads, batch, wo.shape[0]), jnp.float32),
        jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype), jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype),
        jax.ShapeDtypeStruct(counter.shape, counter.dtype)]
    first_pool_out = len(out_shape) - 3
    aliases = {pools: first_pool_out, pools + 1: first_pool_out + 1, len(operands) - 1: len(out_shape) - 1}
    whole = pl.no_block_spec

    def attention_ids(pid):  # (row, KV head) of an attention program; the projection's get row 0, head 0
        a = jnp.maximum(pid - n_proj, 0)
        return a // (kv_heads * chunks), (a // chunks) % kv_heads

    # Pallas Triton takes one indexer a load, so the row's table and the KV head's pool come as blocks.
    table_spec = pl.BlockSpec((None, block_tables.shape[1]), lambda pid: (attention_ids(pid)[0], 0))
    pool_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda pid: (attention_ids(pid)[1], 0, 0, 0))
    in_specs = [whole] * len(operands)
    in_specs[pools - 4] = table_spec
    in_specs[pools] = in_specs[pools + 1] = pool_spec
    out_specs = [whole] * len(out_shape)
    out_specs[first_pool_out] = out_specs[first_pool_out + 1] = pool_spec
    outs = compat.triton_call(kernel, *operands, grid=(n_proj + n_attn,), out_shape=out_shape,
                              in_specs=in_specs, out_specs=out_specs, input_output_aliases=aliases, interpret=interpret, num_warps=num_warps,
                              name="fused_qkv_attention")
    h = outs[0] if num_parts else hidden
    return h, outs[-4], outs[-3], outs[-2], outs[-1]


def fused_qkv_attention_o(hidden: jax.Array, partials: jax.Array | None, norm_scale: jax.Array, w_qkv: jax.Array,
                          b_qkv: jax.Array | None, cos: jax.Array, sin: jax.Array, k_pages: jax.Array,
                          v_pages: jax.Array, block_tables: jax.Array, lengths: jax.Array, slot_mapping: jax.Array,
                          wo: jax.Array, counter: jax.Array, *, eps: float, scale: float | None = None,
                          block_n: int | None = None, o_rows: int | None = None, num_warps: int | None = None,
                          pages_per_block: int | None = None, interpret: bool | None = None):
    """`skinny_matmul_norm` (QKV) then `fused_decode_attention_o` on its output, in one launch.

    Args:
        hidden, partials, norm_scale: the residual stream `[M, K]`, the partial sums to add into it (or None)
            and the input norm's weight, as `skinny_matmul_norm` takes them (M <= `NORM_GEMV_MAX_ROWS`).
        w_qkv: `[(num_heads + 2 * kv_heads) * head_dim, K]` the QKV projection (`[N, K]`); b_qkv its bias or None.
        cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping, wo: as `fused_decode_attention_o`
            (block tables of at most `SINGLE_PASS_KEYS` keys: one pass, never split).
        counter: `new_counter()`'s array, or the one the previous call returned (left at zero); donate it.
        eps: the norm's epsilon; scale: the logits' (None: head_dim ** -0.5).
        block_n: weight rows a projection program (a divisor of head_dim; None: `QKV_BLOCK_N`).
        o_rows, num_warps: as `fused_decode_attention_o` (None: its defaults).
        pages_per_block: pages a key block of the attention (a power of two; None: the whole table in one).
        interpret: Pallas interpret mode; None picks it on the CPU backend.

    Returns:
        `(h, o_partials [kv_heads, M, N] float32, k_pages, v_pages, counter)`: the new residual, o_proj's per-KV-head
        partial sums (`skinny_matmul_norm` takes them as they are), the pools with the new token written, the
        counters back at zero.

    Example:
        >>> m, kvh, d, hid = 1, 2, 64, 256
        >>> heads = hid // d + 2 * kvh
        >>> kp = vp = jnp.zeros((kvh, 4, 16, d), jnp.float32)
        >>> h, parts, kp, vp, c = fused_qkv_attention_o(
        ...     jnp.ones((m, hid)), None, jnp.ones(hid), jnp.ones((heads * d, hid)) / hid, None,
        ...     jnp.ones((m, d)), jnp.zeros((m, d)), kp, vp, jnp.array([[0, 1]], jnp.int32), jnp.array([20], jnp.int32),
        ...     jnp.array([19], jnp.int32), jnp.ones((hid, hid)), new_counter(), eps=1e-6)
        >>> parts.shape, c.tolist()
        ((2, 1, 256), [0, 0])
    """
    m, k = hidden.shape if hidden.ndim == 2 else (0, 0)
    if hidden.ndim != 2 or not 1 <= m <= _sm.NORM_GEMV_MAX_ROWS or k > _sm.NORM_GEMV_MAX_K:
        raise ValueError(f"hidden must be [M, K] with 1 <= M <= {_sm.NORM_GEMV_MAX_ROWS} and K <= "
                         f"{_sm.NORM_GEMV_MAX_K}, got {hidden.shape}")
    if partials is not None and (partials.ndim != 3 or partials.shape[1:] != hidden.shape):
        raise ValueError(f"partials must be [S, {m}, {k}], got {partials.shape}")
    if norm_scale.shape != (k,):
        raise ValueError(f"norm_scale must be [{k}], got {norm_scale.shape}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [kv_heads, num_pages, page_size, head_dim], got {k_pages.shape}")
    head_dim = k_pages.shape[-1]
    if w_qkv.ndim != 2 or w_qkv.shape[1] != k or w_qkv.shape[0] % head_dim:
        raise ValueError(f"w_qkv must be [heads * {head_dim}, {k}], got {w_qkv.shape}")
    if b_qkv is not None and b_qkv.shape != (w_qkv.shape[0],):
        raise ValueError(f"b_qkv must be [{w_qkv.shape[0]}], got {b_qkv.shape}")
    if counter.shape != (2,) or counter.dtype != jnp.int32:
        raise ValueError(f"counter must be new_counter()'s int32[2], got {counter.dtype}{list(counter.shape)}")
    qkv_shape = (m, w_qkv.shape[0] // head_dim, head_dim)
    # The attention's own checks, on the shapes the projection will hand it.
    _da._check_args(jax.ShapeDtypeStruct(qkv_shape, hidden.dtype), cos, sin, k_pages, v_pages, block_tables,
                    lengths, slot_mapping)
    num_heads = qkv_shape[1] - 2 * k_pages.shape[0]
    if wo.ndim != 2 or wo.shape[1] != num_heads * head_dim:
        raise ValueError(f"wo must be [N, {num_heads * head_dim}] (num_heads * head_dim), got {wo.shape}")
    page_size, table_pages = k_pages.shape[2], block_tables.shape[1]
    if table_pages * page_size > _paged.SINGLE_PASS_KEYS:
        raise ValueError(f"block_tables must hold at most {_paged.SINGLE_PASS_KEYS} keys (one pass), got "
                         f"{table_pages} pages of {page_size}")
    interpret = compat.resolve_interpret(interpret)
    block_n = block_n or QKV_BLOCK_N
    if block_n < 1 or head_dim % block_n or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two dividing head_dim={head_dim}, got {block_n}")
    if o_rows is None:  # interpret mode: one block of rows a KV head (as fused_decode_attention_o)
        o_rows = max(_da.O_ROWS, compat.next_pow2(wo.shape[0])) if interpret else _da.O_ROWS
    if o_rows < 1 or o_rows & (o_rows - 1):
        raise ValueError(f"o_rows must be a power of two >= 1, got {o_rows}")
    return _fused(hidden, None if partials is None else partials.astype(jnp.float32), norm_scale, w_qkv, b_qkv,
                  cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping, wo, counter, eps=float(eps),
                  scale=float(head_dim ** -0.5 if scale is None else scale), block_n=block_n, o_rows=o_rows,
                  pages_per_block=pages_per_block or compat.next_pow2(table_pages), num_warps=num_warps or _da.O_NUM_WARPS,
                  interpret=interpret)


def fused_qkv_attention_o_reference(hidden, partials, norm_scale, w_qkv, b_qkv, cos, sin, k_pages, v_pages,
                                    block_tables, lengths, slot_mapping, wo, counter, *, eps, scale=None):
    """jnp reference of `fused_qkv_attention_o`: the two references it runs, one after the other.

    Example:
        >>> kp = vp = jnp.zeros((1, 2, 16, 64))
        >>> h, parts, kp, vp, c = fused_qkv_attention_o_reference(
        ...     jnp.ones((1, 64)), None, jnp.ones(64), jnp.ones((192, 64)), None, jnp.ones((1, 64)),
        ...     jnp.zeros((1, 64)), kp, vp, jnp.zeros((1, 2), jnp.int32), jnp.array([1], jnp.int32),
        ...     jnp.array([0], jnp.int32), jnp.ones((64, 64)), new_counter(), eps=0.0)
        >>> parts.shape
        (1, 1, 64)
    """
    h, qkv = _sm.skinny_matmul_norm_reference(hidden, partials, norm_scale, w_qkv, b_qkv, eps=eps)
    head_dim = k_pages.shape[-1]
    qkv = qkv.reshape(qkv.shape[0], -1, head_dim)
    parts, k_pages, v_pages = _da.fused_decode_attention_o_reference(qkv, cos, sin, k_pages, v_pages, block_tables,
                                                                     lengths, slot_mapping, wo, scale=scale)
    return h, parts, k_pages, v_pages, jnp.zeros_like(counter)
