"""Read a decode step's K/V pages ahead of its attention, so that they sit in L2 when the attention gathers them.

Owns: `touch_pages`, a Pallas Triton kernel that reads every page a row's attention will read and sums it (the sum
keeps the loads alive), and its jnp reference. An experiment for wide decode steps (`jaxserve.model.KV_TOUCH`, off
by default): at 256 rows x 192 keys the fused attention takes ~6.8 us a layer less when its pages are in L2 than
when they come from HBM (H100, `bench/fused_tune.py --same-pool` against the default, bench/results/decode_step.md
session 54), and the kernels before it (the input norm, QKV) leave HBM mostly idle. The kernel takes the layer's
input as an operand it never reads: XLA then cannot start it before the layer does, and with the command buffer's
concurrent scheduling (`xla_gpu_command_buffer_scheduling_mode=CONCURRENT`) it may run beside the norm and QKV.

Pool layout as `jaxserve_kernels.paged_attention`: `[kv_heads, num_pages, page_size, head_dim]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat

# One program a (row, table entry): session 54's first form, one program a row looping over its pages, read 25 MB
# in 23 us at 256 rows and 6 MB in 20 us at 64 (H100): a row's pages one after another are a chain of HBM trips.
NUM_WARPS = 2
NUM_STAGES = 1


def _check(k_pages, v_pages, block_tables, lengths) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError("k_pages and v_pages must both be [kv_heads, num_pages, page_size, head_dim], "
                         f"got {k_pages.shape} and {v_pages.shape}")
    if block_tables.ndim != 2 or lengths.shape != (block_tables.shape[0],):
        raise ValueError(f"block_tables must be [rows, pages] and lengths [rows], got {block_tables.shape} "
                         f"and {lengths.shape}")


def touch_pages_reference(k_pages, v_pages, block_tables, lengths, after=None):
    """What `touch_pages` returns: `[rows, pages]`, the float32 sum of each K and V page holding one of the row's
    first `lengths[row]` keys (page ids clipped into the pool), 0 for the entries past them. `after` is ignored.

    Example:
        >>> kp = vp = jnp.ones((2, 4, 8, 64))
        >>> touch_pages_reference(kp, vp, jnp.array([[3, 1, 0]]), jnp.array([9])).tolist()
        [[2048.0, 2048.0, 0.0]]
    """
    del after
    _check(k_pages, v_pages, block_tables, lengths)
    page_size = k_pages.shape[2]
    pages = jnp.clip(block_tables, 0, k_pages.shape[1] - 1)
    used = jnp.arange(block_tables.shape[1])[None, :] * page_size < lengths[:, None]
    per_page = (k_pages.astype(jnp.float32).sum(axis=(0, 2, 3)) + v_pages.astype(jnp.float32).sum(axis=(0, 2, 3)))
    return jnp.where(used, per_page[pages], 0.0)


def _touch_kernel(table_ref, len_ref, _after_ref, k_ref, v_ref, o_ref, *, page_size: int):
    row, entry = pl.program_id(0), pl.program_id(1)
    used = entry * page_size < len_ref[row]
    page = jnp.clip(table_ref[row, entry], 0, k_ref.shape[1] - 1)

    @pl.when(used)
    def _read():
        total = jnp.sum(k_ref[:, page].astype(jnp.float32)) + jnp.sum(v_ref[:, page].astype(jnp.float32))
        o_ref[row, pl.ds(entry, 1)] = jnp.full((1,), total, jnp.float32)

    @pl.when(jnp.logical_not(used))
    def _skip():
        o_ref[row, pl.ds(entry, 1)] = jnp.zeros((1,), jnp.float32)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "num_stages"))
def _touch(k_pages, v_pages, block_tables, lengths, after, *, interpret, num_warps, num_stages):
    return compat.triton_call(
        functools.partial(_touch_kernel, page_size=k_pages.shape[2]),
        block_tables.astype(jnp.int32), lengths.astype(jnp.int32), after, k_pages, v_pages,
        grid=block_tables.shape, out_shape=jax.ShapeDtypeStruct(block_tables.shape, jnp.float32), name="kv_touch",
        interpret=interpret, num_warps=num_warps, num_stages=num_stages)


def touch_pages(k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, lengths: jax.Array,
                after: jax.Array | None = None, *, interpret: bool | None = None, num_warps: int | None = None,
                num_stages: int | None = None) -> jax.Array:
    """Read the K and V pages of each row's first `lengths[row]` keys (whole pages), one program a table entry, and
    return each page's float32 sum `[rows, pages]` (0 past the row's keys); the point is the reads (the pages end up
    in L2), the sums keep them from being dropped.

    Args:
        k_pages, v_pages: `[kv_heads, num_pages, page_size, head_dim]` pools (read only); kv_heads, page_size and
            head_dim powers of two (a page is one Triton block).
        block_tables: `[rows, pages]` page ids (clipped into the pool); lengths: `[rows]` keys a row.
        after: any array, never read: the call depends on it, so XLA runs it after `after` is computed.
        interpret: run the kernel in interpret mode (default: on CPU).

    Example:
        >>> kp = vp = jnp.ones((2, 4, 8, 64))
        >>> touch_pages(kp, vp, jnp.array([[3, 1, 0]]), jnp.array([9])).tolist()
        [[2048.0, 2048.0, 0.0]]
    """
    _check(k_pages, v_pages, block_tables, lengths)
    if any(n & (n - 1) for n in (k_pages.shape[0], k_pages.shape[2], k_pages.shape[3])):
        raise ValueError(f"touch_pages wants kv_heads, page_size and head_dim powers of two, got {k_pages.shape}")
    after = jnp.zeros((1,), jnp.float32) if after is None else after
    return _touch(k_pages, v_pages, block_tables, lengths, after, interpret=compat.resolve_interpret(interpret),
                  num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES)
