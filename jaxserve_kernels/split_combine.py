"""Flash-decoding split combine as one Pallas launch, whatever the number of splits.

Owns: merging the per-split partial outputs of the decode attention kernels
(`o [splits, batch, kv_heads, group, D]`, each normalized over its own keys, and their
log-sum-exps `lse [splits, batch, kv_heads, group]`) into `[batch, kv_heads, group, D]`;
and its jnp reference (`combine_splits_reference`, the XLA path). Never decides how many
splits run (`jaxserve_kernels.paged_attention.default_num_splits` does).

Why: the split count follows the block table's width (a server with a 32k max_model_len
passes 2048 pages, so batch 1 runs ~128 splits even when a sequence holds 200 keys: the
in-kernel sizing leaves most of them empty). XLA lowers the reference's max / exp-sum /
weighted-sum over so many splits as several reduction kernels a layer (H100: 328 -> 424
kernels a batch-1 step of Qwen2.5-0.5B at a 2048-page table, +5.7% step time); this is one.

How: one program per (sequence, KV head, query row of the group, chunk of head_dim). It
loads every split's lse of its row and the matching `[splits, chunk]` slice of `o` (no
loop; with `EARLY_PARTIALS` the slice is loaded beside the lse's, masked by the split count
only, and empty splits are dropped by a select), subtracts the max, and reduces. Splits
that saw no key have lse = -inf and weigh 0; a row with no key at all gives 0. The chunk
of head_dim shrinks as the split count grows, so a program holds at most
`_MAX_TILE_ELEMENTS` values.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat

# Values of `o` one program holds: 4096 f32 over 4 warps is 32 registers a thread.
_MAX_TILE_ELEMENTS = 4096
# The partials loaded at once with the lse's (masked by the split count only; empty splits' values are
# dropped by a select after the load), not masked by their weights, which made that load wait on the
# lse's round trip. Same bits. The merge is one of batch 1 x 32k's two launches (bandwidth.md), where
# its dependent L2 round trips are the launch's cost. H200, session 26 (`bash bench/gpu_checks.sh
# combine26`): bandwidth.py batch 1 x 32k 0.5B 11.9 vs 12.3 µs, 7B 24.3 vs 24.6 µs (two processes);
# the 64-row step at 1,088 keys ties (1.052 ms both). JAXSERVE_EARLY_PARTIALS=0 turns it off.
EARLY_PARTIALS = os.environ.get("JAXSERVE_EARLY_PARTIALS", "1") == "1"


def _combine_kernel(o_ref, lse_ref, out_ref, *, num_splits: int, padded_splits: int, chunk: int,
                    early_partials: bool = False):
    seq, head, row, part = (pl.program_id(0), pl.program_id(1), pl.program_id(2),
                            pl.program_id(3))
    splits = jnp.arange(padded_splits)
    real = splits < num_splits
    cols = pl.ds(part * chunk, chunk)
    if early_partials:
        o = compat.load(o_ref.at[pl.ds(0, padded_splits), seq, head, row, cols], mask=real[:, None], other=0)
    lse = compat.load(lse_ref.at[pl.ds(0, padded_splits), seq, head, row], mask=real,
                      other=-jnp.inf)
    m = lse.max()
    w = jnp.exp(lse - jnp.where(m > -jnp.inf, m, 0.0))  # -inf (empty or padding) -> 0
    total = w.sum()
    if early_partials:
        # An empty split's partial never enters the sum (0 x NaN would be NaN): selected away.
        o = jnp.where((w > 0)[:, None], o.astype(jnp.float32), 0.0)
    else:
        o = compat.load(o_ref.at[pl.ds(0, padded_splits), seq, head, row, cols],
                        mask=(w > 0)[:, None], other=0).astype(jnp.float32)
    out = (w[:, None] * o).sum(axis=0) / jnp.where(total > 0, total, 1.0)
    out_ref[seq, head, row, cols] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "early_partials", "live_rows"))
def _combine(o, lse, *, out_dtype, interpret: bool, early_partials: bool = False, live_rows: int | None = None):
    num_splits, batch, kv_heads, group, head_dim = o.shape
    padded_splits = compat.next_pow2(num_splits)
    chunk = max(1, min(head_dim, _MAX_TILE_ELEMENTS // padded_splits))
    kernel = functools.partial(_combine_kernel, num_splits=num_splits,
                               padded_splits=padded_splits, chunk=chunk, early_partials=early_partials)
    return compat.triton_call(kernel, o, lse, grid=(live_rows or batch, kv_heads, group, head_dim // chunk),
                              out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), out_dtype),
                              interpret=interpret, num_warps=4, name="split_combine")


def combine_splits(o: jax.Array, lse: jax.Array, out_dtype=None, *,
                   interpret: bool | None = None, live_rows: int | None = None) -> jax.Array:
    """Merge flash-decoding partials by their log-sum-exp, in one kernel launch.

    Args:
        o: `[splits, batch, kv_heads, group, head_dim]` partial outputs, each normalized
            over its split's keys (any float dtype).
        lse: `[splits, batch, kv_heads, group]` float32 log-sum-exp of each split's
            scaled logits; -inf where the split saw no key.
        out_dtype: result dtype, default o's.
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        live_rows: merge only the first this many rows (the rest of the batch is padding): the rows past it
            launch nothing and are left undefined. None: every row.

    Returns:
        `[batch, kv_heads, group, head_dim]`; rows whose every split is empty are 0.

    Example:
        >>> o = jnp.ones((3, 2, 2, 7, 64), jnp.bfloat16)
        >>> lse = jnp.zeros((3, 2, 2, 7), jnp.float32)
        >>> combine_splits(o, lse).shape
        (2, 2, 7, 64)
    """
    if o.ndim != 5:
        raise ValueError(f"o must be [splits, batch, kv_heads, group, head_dim], got {o.shape}")
    if lse.shape != o.shape[:-1]:
        raise ValueError(f"lse must be {o.shape[:-1]} (o's shape without head_dim), got {lse.shape}")
    head_dim = o.shape[-1]
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if live_rows is not None and not 1 <= live_rows <= o.shape[1]:
        raise ValueError(f"live_rows must be in [1, {o.shape[1]}] (the batch), got {live_rows}")
    return _combine(o, lse.astype(jnp.float32), out_dtype=jnp.dtype(out_dtype or o.dtype),
                    interpret=compat.resolve_interpret(interpret), early_partials=EARLY_PARTIALS,
                    live_rows=None if live_rows == o.shape[1] else live_rows)


def combine_splits_reference(o: jax.Array, lse: jax.Array, out_dtype=None) -> jax.Array:
    """The same merge in jnp (what XLA fuses; several kernels at large split counts)."""
    out_dtype = out_dtype or o.dtype
    o = o.astype(jnp.float32)
    m = lse.max(axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # empty splits have lse = -inf: weight 0
    total = w.sum(axis=0)
    # An empty split's partial is never read into the sum (0 x NaN would be NaN).
    o = jnp.where(w[..., None] > 0, o, 0.0)
    out = (w[..., None] * o).sum(axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(out_dtype)
