"""Experimental: paged decode attention on the Pallas Mosaic GPU backend (TMA + WGMMA).

Owns: a second decode kernel, for measuring Mosaic GPU against the Triton-lowered
`jaxserve_kernels.paged_attention` (issue 6 asks for both backends). Same contract as
`jaxserve_kernels.paged_attention.paged_attention` for one decode token per sequence; its
reference is that module's `paged_attention_reference`. Never used by the engine.

Why it was written: the Triton kernel's programs stall on their gathered loads (Nsight
Compute: L1TEX scoreboard, 3 programs an SM). Here each page of K and V arrives by one TMA
copy straight into shared memory, `num_slots` blocks of pages in flight behind mbarriers,
and the two products run on WGMMA. Measured on the H200 (bench/results/bandwidth.md,
session 9) it is 5-23% slower than the Triton kernel at every shape: the softmax over the
group padded to 64 rows and the SMEM each program holds (few programs an SM) cost more than
TMA saves. kernel_notes.md says what would change that.

How (one program, one warpgroup, per sequence and KV head):
- The block-table row and the length come in one TMA copy of a row of `meta`
  (`[batch, rows, 128]` int32: [length, page ids...], built by the wrapper; a TMA box holds
  at most 256 elements a dimension); page ids are then scalar reads of shared memory. Pages
  past the length are redirected to the row's last page holding keys and masked.
- WGMMA wants 64 rows: the KV group's query heads (7 at Qwen2.5-0.5B) are padded to 64 by
  the wrapper. That is 8x the flops of the group, still far under the compute roof at decode's
  ~7 flops a byte.
- Online softmax in float32 over `pages_per_block * page_size` keys a step; the next block's
  copies are issued before the current block is computed (two slots). The last block's V rows
  past the length are zeroed in shared memory (whatever the pool holds there).
- Flash-decoding: each (sequence, KV head) runs `num_splits` programs over equal runs of
  that row's own blocks; each writes its rows normalized plus their log-sum-exp, and
  `jaxserve_kernels.split_combine` merges them (one launch), as for the Triton kernel.
- Only the group's rows, padded to one 8-row tile, are written back (TMA copies of the
  swizzled tile; the lse row is 8 floats, TMA's 16-byte minimum).

Limits: bf16 only (WGMMA), head_dim a multiple of 64, at most 32767 pages a row. Tested in
Mosaic GPU's interpret mode on the CPU and compiled on the H200 (bench/results/bandwidth.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxserve_kernels import mgpu_pipeline as ring
from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.paged_attention import _MASK_VALUE
from jaxserve_kernels.split_combine import combine_splits

_ROWS = 64  # WGMMA's M
# Two programs an SM of an H100 / H200 (132 SMs): enough to hide a program's ramp and tail.
_TARGET_PROGRAMS = 264
# A TMA copy moves at most 256 elements along each dimension: the meta row goes as [rows, 128].
_META_COLS = 128


def _kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, o_smem,
            lse_smem, meta_smem, q_bar, meta_bar, k_bars, v_bars, *, page_size: int,
            pages_per_block: int, num_slots: int, num_splits: int, scale: float,
            table_pages: int, out_rows: int, interpret: bool):
    seq, head, split = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("splits")
    block_keys = pages_per_block * page_size
    plgpu.copy_gmem_to_smem(meta_ref.at[seq], meta_smem, meta_bar)
    plgpu.copy_gmem_to_smem(q_ref.at[seq, head], q_smem, q_bar)
    plgpu.barrier_wait(meta_bar)

    def meta(index):  # entry `index` of the row [length, page ids...], staged as [rows, 128]
        return meta_smem[index // _META_COLS, index % _META_COLS]

    length = jnp.minimum(meta(0), table_pages * page_size)
    row_blocks = pl.cdiv(length, block_keys)
    last_page = jnp.maximum(pl.cdiv(length, page_size) - 1, 0)
    # Each split takes an equal run of this row's own blocks (sized by its length, not the
    # table's width); a split past them reads nothing and reports lse = -inf.
    per_split = pl.cdiv(row_blocks, num_splits)
    first = split * per_split
    num_blocks = jnp.clip(row_blocks - first, 0, per_split)

    def issue(step, slot):
        block = first + step
        for j in range(pages_per_block):
            page = meta(1 + jnp.minimum(block * pages_per_block + j, last_page))
            rows = pl.ds(j * page_size, page_size)
            plgpu.copy_gmem_to_smem(k_ref.at[head, page], k_smem.at[slot, rows], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[head, page], v_smem.at[slot, rows], v_bars.at[slot])

    ring.prime(issue, num_slots, num_blocks)

    plgpu.barrier_wait(q_bar)
    # Register layouts are a compiler matter: Mosaic GPU's interpreter has no rule for them.
    def cast(x, layout):
        return x if interpret else plgpu.layout_cast(x, layout)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m0 = cast(jnp.full((_ROWS,), _MASK_VALUE, jnp.float32), row_layout)
    l0 = cast(jnp.zeros((_ROWS,), jnp.float32), row_layout)
    acc0 = cast(jnp.zeros((_ROWS, q_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)

    def body(step, carry):
        acc, m, l = carry
        # Step - 1's products are done: their results are this step's carry.
        slot = ring.advance(issue, step, num_slots, num_blocks)
        plgpu.barrier_wait(k_bars.at[slot])

        def scores(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

        if interpret:  # the interpreter's WGMMA takes no transposed operand: the same product
            s = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
        else:
            s = pl.run_scoped(scores, plgpu.ACC((_ROWS, block_keys), jnp.float32)) * scale
        block_start = (first + step) * block_keys
        keys = block_start + (
            lax.broadcasted_iota(jnp.int32, (_ROWS, block_keys), 1) if interpret else
            plgpu.broadcasted_iota(jnp.int32, (_ROWS, block_keys), 1, layout=plgpu.Layout.WGMMA))
        s = jnp.where(keys < length, s, _MASK_VALUE)
        m_next = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bars.at[slot])

        # The last page's slots past the length hold anything (NaN included); p is 0 there,
        # and 0 x NaN is NaN, so those V rows are zeroed in shared memory first.
        @pl.when(block_start + block_keys > length)
        def _zero_tail():
            if interpret:
                tile = v_smem[slot]
                rows = lax.broadcasted_iota(jnp.int32, tile.shape, 0)
            else:
                tile = compat.mgpu_load(v_smem.at[slot], plgpu.Layout.WGMMA)
                rows = plgpu.broadcasted_iota(jnp.int32, tile.shape, 0, layout=plgpu.Layout.WGMMA)
            v_smem[slot] = jnp.where(block_start + rows < length, tile, jnp.zeros_like(tile))
            plgpu.commit_smem()

        def values(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])

        if interpret:  # nor a rule for `run_state`, which accumulates into `acc` in place
            acc = acc + jnp.dot(p.astype(v_smem.dtype), v_smem[slot],
                                preferred_element_type=jnp.float32)
        else:
            acc = pl.run_state(values)(plgpu.ACC.init(acc))
        return acc, m_next, l

    acc, m, l = lax.fori_loop(0, num_blocks, body, (acc0, m0, l0))
    safe = jnp.where(l > 0, l, 1.0)
    o_smem[...] = (acc / lax.broadcast_in_dim(safe, acc.shape, [0])).astype(o_smem.dtype)
    # A split that saw no key weighs nothing in the merge: log(0) = -inf.
    lse_smem[...] = m + jnp.log(l)
    plgpu.commit_smem()
    # Only the group's rows (padded to a tile of 8) leave: the rest are WGMMA padding.
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, out_rows)], o_ref.at[split, seq, head])
    plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, out_rows)], lse_ref.at[split, seq, head])
    plgpu.wait_smem_to_gmem(0)


def default_mgpu_splits(batch: int, kv_heads: int, table_pages: int, pages_per_block: int) -> int:
    """Splits so that about two programs run per SM of an H100/H200 (132), each at least one
    block of pages; none once the batch alone runs more than half that (rounded down: at 7B
    batch 64, 256 programs, two splits read 79.8 µs against 74.0 unsplit on the H200).

    Example:
        >>> default_mgpu_splits(1, 4, 2048, 8), default_mgpu_splits(64, 4, 128, 4)
        (66, 1)
    """
    programs = batch * kv_heads
    return int(max(1, min(pl.cdiv(table_pages, pages_per_block), _TARGET_PROGRAMS // programs)))


def paged_attention_mgpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                         block_tables: jax.Array, lengths: jax.Array, *,
                         scale: float | None = None, pages_per_block: int = 8,
                         num_slots: int = 2, num_splits: int | None = None,
                         interpret: bool | None = None) -> jax.Array:
    """Decode attention `q [batch, num_heads, D]` over paged bf16 K/V, Mosaic GPU backend.

    Arguments as `jaxserve_kernels.paged_attention.paged_attention` (lengths 0 give zeros);
    `pages_per_block` pages a step, `num_slots` steps' copies in flight, `num_splits`
    flash-decoding splits of each row (None: `default_mgpu_splits`), merged by
    `jaxserve_kernels.split_combine`. `interpret` (default: on the CPU) runs Mosaic GPU's interpreter.

    Example:
        >>> q = jnp.ones((2, 14, 64), jnp.bfloat16)
        >>> pages = jnp.ones((2, 8, 16, 64), jnp.bfloat16)
        >>> table = jnp.array([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32)
        >>> paged_attention_mgpu(q, pages, pages, table, jnp.array([20, 0]),
        ...                      pages_per_block=4).shape
        (2, 14, 64)
    """
    batch, num_heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // kv_heads
    if q.dtype != jnp.bfloat16 or k_pages.dtype != jnp.bfloat16 or v_pages.dtype != jnp.bfloat16:
        raise ValueError("q, k_pages and v_pages must be bfloat16 (WGMMA operands)")
    if head_dim % 64 or group > _ROWS or num_heads % kv_heads:
        raise ValueError(f"head_dim must be a multiple of 64 and the group at most {_ROWS}, got "
                         f"head_dim {head_dim}, {num_heads} query heads on {kv_heads} KV heads")
    if (pages_per_block * page_size) % 64:
        raise ValueError("pages_per_block * page_size must be a multiple of 64 (WGMMA's N)")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    table_pages = block_tables.shape[1]
    if num_splits is None:
        num_splits = default_mgpu_splits(batch, kv_heads, table_pages, pages_per_block)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    meta_rows = pl.cdiv(1 + table_pages, _META_COLS)
    if meta_rows > 256:
        raise ValueError(f"block_tables may have at most {256 * _META_COLS - 1} pages a row, "
                         f"got {table_pages}")
    meta = jnp.zeros((batch, meta_rows * _META_COLS), jnp.int32)
    meta = meta.at[:, 0].set(lengths.astype(jnp.int32)).at[:, 1:1 + table_pages].set(
        block_tables.astype(jnp.int32)).reshape(batch, meta_rows, _META_COLS)
    q_rows = jnp.zeros((batch, kv_heads, _ROWS, head_dim), q.dtype).at[:, :, :group].set(
        q.reshape(batch, kv_heads, group, head_dim))
    o, lse = _call(meta, q_rows, k_pages, v_pages, page_size=page_size, table_pages=table_pages,
                   pages_per_block=pages_per_block, num_slots=num_slots, num_splits=num_splits,
                   out_rows=-(-group // 8) * 8,
                   scale=float(head_dim ** -0.5 if scale is None else scale),
                   interpret=bool(interpret))
    out = o[0] if num_splits == 1 else combine_splits(o, lse, interpret=interpret)
    return out[:, :, :group].reshape(batch, num_heads, head_dim)


@functools.partial(jax.jit, static_argnames=("page_size", "table_pages", "pages_per_block",
                                             "num_slots", "num_splits", "out_rows", "scale",
                                             "interpret"))
def _call(meta, q_rows, k_pages, v_pages, *, page_size, table_pages, pages_per_block, num_slots,
          num_splits, out_rows, scale, interpret):
    batch, kv_heads, _, head_dim = q_rows.shape
    block_keys = pages_per_block * page_size
    # WGMMA reads 128-byte swizzled tiles of 8 rows x 64 bf16.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((_ROWS, head_dim), q_rows.dtype, transforms=transforms),
        plgpu.SMEM((num_slots, block_keys, head_dim), k_pages.dtype, transforms=transforms),
        plgpu.SMEM((num_slots, block_keys, head_dim), v_pages.dtype, transforms=transforms),
        plgpu.SMEM((_ROWS, head_dim), q_rows.dtype, transforms=transforms),
        plgpu.SMEM((_ROWS,), jnp.float32),
        plgpu.SMEM(meta.shape[1:], jnp.int32),
        plgpu.Barrier(),
        plgpu.Barrier(),
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_slots),
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_slots),
    ]
    return plgpu.kernel(
        functools.partial(_kernel, page_size=page_size, pages_per_block=pages_per_block,
                          num_slots=num_slots, num_splits=num_splits, scale=scale,
                          table_pages=table_pages, out_rows=out_rows, interpret=interpret),
        out_type=(jax.ShapeDtypeStruct((num_splits, batch, kv_heads, out_rows, head_dim),
                                       q_rows.dtype),
                  jax.ShapeDtypeStruct((num_splits, batch, kv_heads, out_rows), jnp.float32)),
        scratch_types=scratch,
        grid=(batch, kv_heads, num_splits),
        grid_names=("batch", "heads", "splits"),
        **compat.mgpu_interpret_kwargs(interpret),
    )(meta, q_rows, k_pages, v_pages)
