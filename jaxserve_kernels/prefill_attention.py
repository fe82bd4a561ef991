"""Prefill attention over pages: a chunk of new tokens attends causally to its sequence's
cached prefix and to itself.

Owns: the prefill wrapper around the shared paged-attention kernel and its jnp reference.
Never writes the pool: the chunk's own K/V must already be scattered into the pages
(`jaxserve_kernels.cache_scatter`) before this runs.

The kernel is `jaxserve_kernels.paged_attention.attend_query_rows`, the decode kernel with more
query rows per program: the rows of a program are `block_rows / group` consecutive
positions times the `group` query heads of one KV head, each row masked to the keys at
or before its own position. Decode is the special case of one position per sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.paged_attention import (PREFILL_KEY_TILE_ELEMENTS, attend_query_rows,
                                     check_pool, gather_pages, masked_softmax_attention,
                                     resolve_tuning)


def _check_args(q, k_pages, v_pages, block_tables, q_start, lengths) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_len, num_heads, head_dim], got {q.shape}")
    batch, _, num_heads, head_dim = q.shape
    check_pool(k_pages, v_pages, num_heads, head_dim)
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_pages], got {block_tables.shape}")
    for name, arr in (("q_start", q_start), ("lengths", lengths)):
        if arr.shape != (batch,):
            raise ValueError(f"{name} must be [{batch}], got {arr.shape}")


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            block_tables: jax.Array, q_start: jax.Array, lengths: jax.Array,
                            *, scale: float | None = None, interpret: bool | None = None,
                            block_rows: int | None = None, num_splits: int | None = None,
                            pages_per_block: int | None = None,
                            num_warps: int = 4,
                            num_stages: int = 2) -> jax.Array:
    """Causal attention of a chunk of queries over paged K/V (prefix and chunk).

    Args:
        q: `[batch, q_len, num_heads, head_dim]`; query i of row b is at position
            `q_start[b] + i`.
        k_pages, v_pages: `[kv_heads, num_pages, page_size, head_dim]`, already holding
            this chunk's keys and values.
        block_tables: `[batch, max_pages]` int32.
        q_start: `[batch]` int32 position of each row's first query.
        lengths: `[batch]` int32 keys of each sequence after this chunk; queries at
            positions >= lengths[b] are padding and come back as zeros.
        scale: logit scale, default `head_dim ** -0.5`.
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        block_rows: query rows (positions x heads of a KV group) per program, a power
            of two >= 16; None picks 128 at head_dim >= 128, else 64 (measured).
        num_splits, pages_per_block, num_warps, num_stages: as in `paged_attention`.

    Returns:
        `[batch, q_len, num_heads, head_dim]` in q's dtype; softmax in float32.

    Example:
        >>> q = jnp.ones((1, 4, 14, 64), jnp.bfloat16)
        >>> pages = jnp.ones((2, 8, 16, 64), jnp.bfloat16)
        >>> paged_prefill_attention(q, pages, pages, jnp.array([[3, 5]], jnp.int32),
        ...     jnp.array([16], jnp.int32), jnp.array([20], jnp.int32)).shape
        (1, 4, 14, 64)
    """
    _check_args(q, k_pages, v_pages, block_tables, q_start, lengths)
    if block_rows is None:
        block_rows = 128 if q.shape[-1] >= 128 else 64
    if block_rows < 16 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= 16, got {block_rows}")
    batch, q_len, num_heads, head_dim = q.shape
    kv_heads = k_pages.shape[0]
    group = num_heads // kv_heads
    interpret = compat.resolve_interpret(interpret)
    query_rows = q_len * group
    block_rows = min(block_rows, max(16, compat.next_pow2(query_rows)))
    pages_per_block, num_splits = resolve_tuning(
        k_pages.shape[2], block_tables.shape[1],
        batch * kv_heads * -(-query_rows // block_rows), pages_per_block, num_splits,
        interpret, PREFILL_KEY_TILE_ELEMENTS // head_dim)
    # Rows ordered (position, head) within a KV group, so a row block is a run of
    # consecutive positions and the causal bound grows along it.
    rows = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = attend_query_rows(
        rows.reshape(batch, kv_heads, query_rows, head_dim), k_pages, v_pages,
        block_tables, q_start, lengths, group=group, start_offset=0,
        block_rows=block_rows, scale=float(head_dim ** -0.5 if scale is None else scale),
        num_splits=num_splits, pages_per_block=pages_per_block,
        num_warps=num_warps, num_stages=num_stages,
        interpret=interpret)
    out = out.reshape(batch, kv_heads, q_len, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape)


def paged_prefill_attention_reference(q, k_pages, v_pages, block_tables, q_start, lengths,
                                      *, scale=None):
    """jnp reference of `paged_prefill_attention` (gathers every page; float32).

    Example:
        >>> q = jnp.ones((1, 2, 2, 64)); pages = jnp.ones((1, 4, 16, 64))
        >>> paged_prefill_attention_reference(q, pages, pages, jnp.zeros((1, 2), jnp.int32),
        ...     jnp.array([3], jnp.int32), jnp.array([5], jnp.int32)).shape
        (1, 2, 2, 64)
    """
    _check_args(q, k_pages, v_pages, block_tables, q_start, lengths)
    batch, q_len, num_heads, head_dim = q.shape
    kv_heads = k_pages.shape[0]
    group = num_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    k = gather_pages(k_pages, block_tables, lengths)
    v = gather_pages(v_pages, block_tables, lengths)
    positions = q_start[:, None] + jnp.arange(q_len)[None, :]            # [b, n]
    keys = jnp.arange(k.shape[2])
    visible = ((keys[None, None, :] <= positions[:, :, None])
               & (keys[None, None, :] < lengths[:, None, None])
               & (positions[:, :, None] < lengths[:, None, None]))     # [b, n, keys]
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    out = masked_softmax_attention(qg, k, v, visible[:, None, None], scale)
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
