"""Read a decode step's K/V pages ahead of its attention, so that they sit in L2 when the attention gathers them.

Owns: `touch_pages`, a Pallas Triton kernel that reads every page a row's attention will read and sums it (the sum
keeps the loads alive), and its jnp reference. An experiment for wide decode steps (`jaxserve.model.KV_TOUCH`, off
by default): in the H100's 256-row x 192-key step the fused attention took 10.7 us a layer with its pages read
ahead against 15.0 from HBM (5.1 against 6.6 at 64 rows; bench/results/decode_step.md, session 54), and the kernels
before it (the input norm, QKV) leave HBM mostly idle. The read-ahead has to fit in that idle time to pay: its
first form took 23 us, and the step lost. The kernel takes an array it never reads (`after`: the layer's input, or
the layer before's attention output): XLA then cannot start it earlier, and with the command buffer's concurrent
scheduling (`xla_gpu_command_buffer_scheduling_mode=CONCURRENT`) it may run beside the kernels after that.

Pool layout as `jaxserve_kernels.paged_attention`: `[kv_heads, num_pages, page_size, head_dim]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat

# A program reads ENTRIES table entries of one row, every page's load issued before any sum: session 54's first
# form, one program a row looping over its pages, read 25 MB in 23 us at 256 rows and 6 MB in 20 us at 64 (H100),
# a row's pages one after another being a chain of HBM trips. Not yet timed on the GPU.
ENTRIES = 4
NUM_WARPS = 2


def supports(k_pages: jax.Array) -> bool:
    """Whether `touch_pages` takes a pool of this shape: kv_heads, page_size and head_dim powers of two (a page is
    one Triton block).

    Example:
        >>> supports(jnp.zeros((2, 4, 16, 64))), supports(jnp.zeros((2, 4, 16, 96)))
        (True, False)
    """
    return not any(n & (n - 1) for n in (k_pages.shape[0], k_pages.shape[2], k_pages.shape[3]))


def _check(k_pages, v_pages, block_tables, lengths) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError("k_pages and v_pages must both be [kv_heads, num_pages, page_size, head_dim], "
                         f"got {k_pages.shape} and {v_pages.shape}")
    if block_tables.ndim != 2 or lengths.shape != (block_tables.shape[0],):
        raise ValueError(f"block_tables must be [rows, pages] and lengths [rows], got {block_tables.shape} "
                         f"and {lengths.shape}")


def touch_pages_reference(k_pages, v_pages, block_tables, lengths, after=None, *, entries: int = ENTRIES):
    """What `touch_pages` returns: `[rows, ceil(pages / entries)]`, for each run of `entries` table entries the
    float32 sum of the K and V pages among them that hold one of the row's first `lengths[row]` keys (page ids
    clipped into the pool). `after` is ignored.

    Example:
        >>> kp = vp = jnp.ones((2, 4, 8, 64))
        >>> touch_pages_reference(kp, vp, jnp.array([[3, 1, 0]]), jnp.array([9]), entries=2).tolist()
        [[4096.0, 0.0]]
    """
    del after
    _check(k_pages, v_pages, block_tables, lengths)
    page_size = k_pages.shape[2]
    pages = jnp.clip(block_tables, 0, k_pages.shape[1] - 1)
    used = jnp.arange(block_tables.shape[1])[None, :] * page_size < lengths[:, None]
    per_page = (k_pages.astype(jnp.float32).sum(axis=(0, 2, 3)) + v_pages.astype(jnp.float32).sum(axis=(0, 2, 3)))
    sums = jnp.where(used, per_page[pages], 0.0)
    pad = -block_tables.shape[1] % entries
    return jnp.pad(sums, ((0, 0), (0, pad))).reshape(block_tables.shape[0], -1, entries).sum(axis=2)


def _touch_kernel(table_ref, len_ref, _after_ref, k_ref, v_ref, o_ref, *, page_size: int, entries: int):
    row, group = pl.program_id(0), pl.program_id(1)
    width, num_pages = table_ref.shape[1], k_ref.shape[1]
    block = k_ref.shape[:1] + k_ref.shape[2:]
    loads = []
    for j in range(entries):  # every load first: a program's pages are in flight together, not one by one
        entry = group * entries + j
        used = (entry < width) & (entry * page_size < len_ref[row])
        page = jnp.clip(table_ref[row, jnp.minimum(entry, width - 1)], 0, num_pages - 1)
        mask = jnp.full(block, used)
        loads.append((compat.load(k_ref.at[:, page], mask=mask, other=0),
                      compat.load(v_ref.at[:, page], mask=mask, other=0)))
    total = jnp.float32(0)
    for k, v in loads:
        total = total + jnp.sum(k.astype(jnp.float32)) + jnp.sum(v.astype(jnp.float32))
    o_ref[row, pl.ds(group, 1)] = jnp.full((1,), total, jnp.float32)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "entries"))
def _touch(k_pages, v_pages, block_tables, lengths, after, *, interpret, num_warps, entries):
    shape = (block_tables.shape[0], pl.cdiv(block_tables.shape[1], entries))
    return compat.triton_call(
        functools.partial(_touch_kernel, page_size=k_pages.shape[2], entries=entries),
        block_tables.astype(jnp.int32), lengths.astype(jnp.int32), after, k_pages, v_pages,
        grid=shape, out_shape=jax.ShapeDtypeStruct(shape, jnp.float32), name="kv_touch",
        interpret=interpret, num_warps=num_warps)


def touch_pages(k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, lengths: jax.Array,
                after: jax.Array | None = None, *, interpret: bool | None = None, num_warps: int | None = None,
                entries: int | None = None) -> jax.Array:
    """Read the K and V pages of each row's first `lengths[row]` keys (whole pages), a program a run of `entries`
    table entries (default ENTRIES), and return each run's float32 sum `[rows, ceil(pages / entries)]`; the point is
    the reads (the pages end up in L2), the sums keep them from being dropped.

    Args:
        k_pages, v_pages: `[kv_heads, num_pages, page_size, head_dim]` pools (read only); kv_heads, page_size and
            head_dim powers of two (`supports`).
        block_tables: `[rows, pages]` page ids (clipped into the pool); lengths: `[rows]` keys a row.
        after: any array, never read: the call depends on it, so XLA runs it after `after` is computed.
        interpret: run the kernel in interpret mode (default: on CPU).

    Example:
        >>> kp = vp = jnp.ones((2, 4, 8, 64))
        >>> touch_pages(kp, vp, jnp.array([[3, 1, 0]]), jnp.array([9]), entries=2).tolist()
        [[4096.0, 0.0]]
    """
    _check(k_pages, v_pages, block_tables, lengths)
    if not supports(k_pages):
        raise ValueError(f"touch_pages wants kv_heads, page_size and head_dim powers of two, got {k_pages.shape}")
    after = jnp.zeros((1,), jnp.float32) if after is None else after
    return _touch(k_pages, v_pages, block_tables, lengths, after, interpret=compat.resolve_interpret(interpret),
                  num_warps=num_warps or NUM_WARPS, entries=entries or ENTRIES)
