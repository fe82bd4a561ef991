"""Paged attention for decode: each sequence's query heads attend to its KV pages.

Owns: the Pallas attention kernel over a paged KV pool (shared with prefill through
`attend_query_rows`), the flash-decoding combine step, and the jnp reference. Never
writes the pool (`jaxserve_kernels.cache_scatter` does) and never decides page placement.

Design (one kernel for decode and prefill):
- One program per (sequence, KV head, block of query rows, split). The query rows of a
  program are all query heads of one KV group (and, for prefill, several positions), so
  every K/V page is loaded once per KV head and used by one matrix product on tensor
  cores. The rows are padded to at least 16, the MMA's minimum, by a masked load (no
  padded copy of q), and only real rows are stored.
- Each loop iteration gathers `pages_per_block` pages' worth of keys through the block
  table, so enough bytes are in flight per program; Triton pipelines the loop
  (`num_stages`). The gather is per key (`k_ref[page[key], offset[key]]`, a 2-D
  `[keys, head_dim]` load, `gather_key_block`), not per page (`k_ref[page_ids]`, a 3-D
  load reshaped to 2-D): on the H200 that alone took 7B heads at batch 64, 8k context
  from 368 to 279 µs (2.9 -> 3.9 TB/s). Keys past the length are pointed at the row's
  first slot, so V needs no select before the product.
- Online softmax in float32, in base 2 (`exp2`; see `LOG2E`: -1.6% to -4.7% on the H200's
  0.5B decode step, unchanged at the bandwidth table's long contexts), each exponential one
  `ex2.approx.ftz`, no select after it in decode (`FTZ_EXP2`, `LEAN_SOFTMAX`); the loop is bounded by
  the row block's own key count, so a short sequence does no work for its empty pages, and a
  length-0 row writes zeros.
- Flash-decoding: the pages are cut into `num_splits` ranges, sized at run time from the
  longest length in the batch; each split writes a normalized partial output and its
  log-sum-exp, and one more small kernel merges them (`jaxserve_kernels.split_combine`). Small
  batches fill the GPU this way. `combine="inkernel"` (decode only, opt-in) drops
  that launch: each split takes a ticket from a per-(sequence, KV head) atomic counter
  after a barrier, and the one that draws the last ticket folds the others' partials in;
  on the H200 that serial fold cost more than the launch at every shape (`merge_last_split`).
  Unsplit, a decode call is one kernel launch and nothing else.

Measured on an H100 and an H200 against JAX's bundled kernel and XLA over a contiguous
cache: bench/results/bandwidth.md.

Backend choice: the Pallas Triton lowering. Its ref indexing with an index vector
(gathering pages named by the block table inside the kernel), masked loads and
`CompilerParams(num_warps, num_stages)` are what a gather-by-block-table decode kernel
needs, and it is the path JAX's own paged-attention kernel takes. It is deprecated from
JAX 0.11 but works on 0.11.2; Mosaic GPU is Hopper-first and still experimental for
this pattern. `jaxserve_kernels.pallas_compat` hides the API moves between 0.10 and 0.11.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.kv_dtype import compute_dtype
from jaxserve_kernels.split_combine import combine_splits, combine_splits_reference

# Finite, so a fully masked row never computes inf - inf; far below any real logit.
_MASK_VALUE = -1e30
# The online softmax keeps its running maximum in base-2 units (logits times log2(e)) and
# exponentiates with exp2: Triton lowers a float32 `exp` to libdevice's accurate `expf` (a
# range reduction around one `ex2.approx`) and `exp2` to about the `ex2.approx` alone. The fold
# of log2(e) into the softmax scale is free (a Python float). Split outputs and every lse that
# leaves a kernel stay natural logs (`finish_rows` converts).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Programs wanted on the GPU before splitting stops paying, at head_dim 128: about two per SM
# (measured: 256 beat 128 and 512 on most shapes; bench/results/kernel_notes.md). A head_dim-64
# program holds half the tile, twice as many fit an SM, and twice the target won 6-12% at
# every 0.5B-head shape it split further on the H200 (bandwidth.md, session 8).
_TARGET_PROGRAMS = 256
_TARGET_HEAD_DIM = 128
# Keys gathered per loop iteration. Decode: 128 measured best at head_dim 64 and 128
# (64 and 256 lost). Prefill, whose q tile is larger, keeps 16 KiB of bf16 K.
DECODE_BLOCK_KEYS = 128
PREFILL_KEY_TILE_ELEMENTS = 8192
# A decode block table of at most this many keys that the defaults would split runs unsplit in
# one loop iteration instead: the merge launch costs more than the longer pass saves. H200,
# session 8: fused decode at 1 x 192 keys 8.9-10.9 µs a layer against 10.9-13.6 split in two
# (fused_tune); the engine's batch-64 step -3.0 / -3.6% (decode_step.md). Unsplit rows keep
# 128 keys an iteration (256 cost batch 256's step 3.5%). Read when a step is traced; 0: off.
SINGLE_PASS_KEYS = 2 * DECODE_BLOCK_KEYS
# The decode kernels' online softmax in fewer instructions a logit. Why: Nsight Compute on the H200
# (session 28, bench/results/kernel_notes.md) reads the fused attention at 64 rows x 192 keys as
# ~1,170 warp instructions a warp, one warp a scheduler, bound by that stream (FMUL 14%, FADD 10%,
# FSEL 8%), and the 256-row one as bound by instruction issue (four programs an SM). `FTZ_EXP2`: each
# exponential one `ex2.approx.ftz.f32` (`compat.exp2`) instead of libdevice's denormal-guarded one (a
# compare and two multiplies more). `LEAN_SOFTMAX`: no select after the exponential in decode, where
# every row's running maximum is finite once a block is folded (a hidden key's exp2(-1e30 - m) is
# 0 already), and, in the fused kernel, q rounded with `scale * LOG2E` in it (it is rounded to the
# pool's dtype there anyway), so the logits need no multiply. H200, session 28 (decode_step.md,
# bandwidth.md; one process, alternating rounds): the 64-row fused attention 6.58 -> 6.05 µs a layer
# (either cut alone 6.05-6.07), GPU busy 747.7 -> 734.7 µs a step, step -1.7%; 1 row 6.03 -> 5.85 µs;
# 256 rows 13.12 -> 12.84; the bandwidth sweep gains 0.2-0.8% at every shape (0.5B 64 x 2k 23.7 ->
# 23.2 µs). On by default; read when a kernel is traced; JAXSERVE_FTZ_EXP2 / JAXSERVE_LEAN_SOFTMAX = 0
# turn them off.
FTZ_EXP2 = os.environ.get("JAXSERVE_FTZ_EXP2", "1") == "1"
LEAN_SOFTMAX = os.environ.get("JAXSERVE_LEAN_SOFTMAX", "1") == "1"


def split_pages(longest_pages, num_splits: int, pages_per_block: int):
    """Pages each split of a decode call reads: the longest row's pages shared among `num_splits`, a whole
    number of `pages_per_block` loop iterations, at least one. Traced in-kernel (`split_page_range`), or
    Python ints on the host (the engine's choice of a call's shape must see the kernels' own split sizes).

    Example:
        >>> split_pages(1024, 256, 8), split_pages(1024, 32, 8), split_pages(0, 32, 8)
        (8, 32, 8)
    """
    per_split = pl.cdiv(pl.cdiv(longest_pages, num_splits), pages_per_block) * pages_per_block
    if isinstance(per_split, int):
        return max(per_split, pages_per_block)
    return jnp.maximum(per_split, pages_per_block)


def split_page_range(lengths_ref, split, row_pages, *, num_splits: int, pages_per_block: int,
                     page_size: int, table_pages: int, key_offset: int = 0):
    """In-kernel: `(first_page, end_page, used)`: the pages that program `split` reads of a
    row holding `row_pages` pages, and how many of the row's splits hold any (the first
    `used`; the rest are empty).

    Split ranges are sized from the batch's longest sequence (`max(lengths) + key_offset`
    keys, read in-kernel, so no extra XLA op): short batches in a wide page table still
    use every split. Each range is a whole number of `pages_per_block` loop iterations.
    """
    if num_splits == 1:
        return 0, row_pages, 1
    batch = lengths_ref.shape[0]
    padded_batch = compat.next_pow2(batch)
    all_lengths = compat.load(lengths_ref.at[pl.ds(0, padded_batch)],
                              mask=jnp.arange(padded_batch) < batch, other=0)
    longest_keys = jnp.clip(all_lengths.max() + key_offset, 0, table_pages * page_size)
    longest = pl.cdiv(longest_keys, page_size)
    per_split = split_pages(longest, num_splits, pages_per_block)
    first_page = split * per_split
    return first_page, jnp.minimum(first_page + per_split, row_pages), pl.cdiv(row_pages, per_split)


# A decode split of exactly two 128-key blocks at head_dim >= 128 runs as two splits of two 64-key blocks. Why:
# the defaults give ~256 programs at head_dim 128 (about two an SM); when a batch's work is 512 blocks each
# program is two iterations, too short to keep an SM's loads in flight, and twice the programs of half the
# block keep the two-iteration pipeline while doubling the bytes in flight. H200, session 36
# (bench/results/bandwidth.md): 7B heads 8 x 2k 16.1 -> 15.4-15.5 µs (XLA contiguous 15.8 in the same process).
# Splits of one block (7B 1 x 8k: 11.5 -> 11.9) or four (1 x 32k: 23.6 -> 24.0) lose, and every 0.5B-head shape
# loses, so the rule is this narrow. `paged_attention` only: the engine's fused decode kernel was not timed so.
RETILE_TWO_BLOCK_SPLITS = os.environ.get("JAXSERVE_RETILE_TWO_BLOCK_SPLITS", "1") == "1"


def retile_two_block_splits(table_pages: int, pages_per_block: int, num_splits: int,
                            head_dim: int) -> tuple[int, int]:
    """`RETILE_TWO_BLOCK_SPLITS`' rule on the default (pages per block, splits).

    Example:
        >>> retile_two_block_splits(128, 8, 8, 128)  # 7B heads, batch 8 x 2k keys, pages of 16
        (4, 16)
        >>> retile_two_block_splits(2048, 8, 64, 128)  # batch 1 x 32k: four blocks a split, kept
        (8, 64)
    """
    if (head_dim >= _TARGET_HEAD_DIM and num_splits > 1 and pages_per_block >= 2
            and pl.cdiv(table_pages, num_splits) == 2 * pages_per_block):
        return pages_per_block // 2, 2 * num_splits
    return pages_per_block, num_splits


# A decode program that loops over at least this many key blocks at head_dim >= 128 keeps three blocks in flight,
# not two. Why: on the H100 (issue 6's device) a lone long loop at two stages leaves the memory short of requests;
# H100, session 52 (bench/results/bandwidth.md): 7B heads 64 x 8k (64 blocks a program) 367.2 -> 362.4 µs, a win in
# each of six interleaved pairs, 87.5% -> 88.5% of the 3.35 TB/s spec; shorter loops lose (7B 8 x 2k's two blocks
# 19.0 -> 19.1, 0.5B 64 x 2k's 30.3 -> 30.6), and on the H200 (session 13) three stages tied at 64 x 8k. 0: off.
LONG_LOOP_BLOCKS = int(os.environ.get("JAXSERVE_LONG_LOOP_BLOCKS", "32"))


def default_num_stages(table_pages: int, pages_per_block: int, num_splits: int, head_dim: int) -> int:
    """`LONG_LOOP_BLOCKS`' rule: Triton pipeline stages for a decode program's loop.

    Example:
        >>> default_num_stages(512, 8, 1, 128), default_num_stages(128, 4, 16, 128)  # 7B 64 x 8k; 8 x 2k
        (3, 2)
    """
    blocks = pl.cdiv(pl.cdiv(table_pages, num_splits), pages_per_block)
    long_loop = LONG_LOOP_BLOCKS > 0 and head_dim >= _TARGET_HEAD_DIM and blocks >= LONG_LOOP_BLOCKS
    return 3 if long_loop else 2


def gather_page_block(block_table_ref, k_pages_ref, v_pages_ref, page0, pages_per_block: int,
                      dtype=None):
    """In-kernel: K and V `[pages_per_block * page_size, head_dim]` of the row's pages
    `page0 ..` (through the block table); entries past the table read page 0, which is
    valid, and the caller masks their keys. `dtype`: widened to it as loaded (an fp8 pool's
    `compute_dtype`; None: as stored)."""
    offsets = page0 + jnp.arange(pages_per_block)
    page_ids = compat.load(block_table_ref.at[pl.ds(page0, pages_per_block)],
                           mask=offsets < block_table_ref.shape[0], other=0)
    page_size, head_dim = k_pages_ref.shape[-2], k_pages_ref.shape[-1]
    keys = pages_per_block * page_size
    return _widen(k_pages_ref[page_ids].reshape(keys, head_dim), v_pages_ref[page_ids].reshape(keys, head_dim),
                  dtype)


def _widen(k, v, dtype):
    return (k, v) if dtype is None or dtype == k.dtype else (k.astype(dtype), v.astype(dtype))


V_MASKS = ("where", "redirect", "none")
COMBINES = ("pallas", "xla", "inkernel")


def gather_key_block(block_table_ref, k_pages_ref, v_pages_ref, page0, pages_per_block: int,
                     written, clamp_pages: bool = False, dtype=None):
    """In-kernel: K and V `[pages_per_block * page_size, head_dim]` of the row's keys from
    page `page0` on; keys where `written [keys]` is False are read from the row's first slot.

    The gather is per key, so the tile comes out 2-D `[keys, head_dim]` as the products want
    it: 21-27% faster on the H200 than gathering whole pages (`gather_page_block`, a 3-D tile
    reshaped), bench/results/bandwidth.md. Slots past a sequence's length may hold anything
    (stale pages, even NaN), and p = 0 times NaN is NaN in the second product; pointing those
    keys at slot 0 of the row's first page (written whenever the loop runs) keeps V finite
    with no select after the load. `clamp_pages`: page ids kept inside the pool, for a caller
    that gathers before it knows the row holds any page (a padding row's table may hold
    anything). `dtype`: as in `gather_page_block`.
    """
    page_size = k_pages_ref.shape[-2]
    table_pages = block_table_ref.shape[0]
    keys = jnp.arange(pages_per_block * page_size)
    entry = jnp.minimum(page0 + keys // page_size, table_pages - 1)
    page = jnp.where(written, block_table_ref[entry], block_table_ref[0])
    if clamp_pages:
        page = jnp.clip(page, 0, k_pages_ref.shape[0] - 1)
    offset = jnp.where(written, keys % page_size, 0)
    return _widen(k_pages_ref[page, offset], v_pages_ref[page, offset], dtype)


def online_softmax_step(carry, q, k, v, key_ok, visible, *, scale: float | None, precision,
                        select_p: bool = True, ftz: bool = False, interpret: bool = True):
    """One block of keys folded into the float32 online-softmax state `(acc, m, l)`.

    `key_ok [keys]`: slots holding written keys, or None when V's unwritten slots were
    already made finite (`gather_key_block`); `visible [rows or 1, keys]`: what each
    query row may attend to. `m` is in base-2 units (`LOG2E` times the scaled logits);
    `finish_rows` turns the state back into natural logs. `scale` None: q already carries
    `scale * LOG2E` (folded in where q is rounded anyway, one multiply a query element
    instead of one a logit). `select_p` False: the caller guarantees that every row's `m`
    is finite after this block (a seed logit, or a visible key in every block it folds),
    so a hidden key's `exp2(-1e30 - m)` is already 0 and the select after the exponential
    is dropped. `ftz`: the exponentials as `compat.exp2(ftz=True)`.
    """
    acc, m, l = carry
    if key_ok is not None:
        # Slots past the length may hold anything (stale or never-written pages, even NaN);
        # zeroing them keeps p = 0 from meeting NaN in the second product.
        v = jnp.where(key_ok[:, None], v, jnp.zeros_like(v))
    s = compat.dot(q, k, trans_b=True, precision=precision)
    if scale is not None:
        s = s * (scale * LOG2E)
    s = jnp.where(visible, s, _MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=1))
    alpha = compat.exp2(m - m_next, ftz=ftz, interpret=interpret)
    p = compat.exp2(s - m_next[:, None], ftz=ftz, interpret=interpret)
    if select_p:
        p = jnp.where(visible, p, 0.0)
    l = l * alpha + p.sum(axis=1)
    pv = compat.dot(p.astype(v.dtype), v, precision=precision)
    return acc * alpha[:, None] + pv, m_next, l


def finish_rows(acc, m, l):
    """Normalized float32 rows and their natural log-sum-exp (from `online_softmax_step`'s
    base-2 state); rows that saw no key give 0 and -inf."""
    has_keys = l > 0.0
    out = acc / jnp.where(has_keys, l, 1.0)[:, None]
    lse = jnp.where(has_keys, m * LN2 + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)
    return jnp.where(has_keys[:, None], out, 0.0), lse


def _attend_kernel(block_table_ref, lengths_ref, q_start_ref, q_ref, k_pages_ref, v_pages_ref,
                   *refs, group: int, start_offset: int, block_rows: int,
                   num_splits: int,
                   pages_per_block: int, scale: float, precision, v_mask: str,
                   merge_in_kernel: bool = False, interpret: bool = False, ftz: bool = False,
                   lean: bool = False):
    (o_ref, lse_ref, out_ref, counter_ref), _ = split_refs(refs, num_splits, merge_in_kernel)
    seq, head = pl.program_id(0), pl.program_id(1)
    row_block, split = pl.program_id(2), pl.program_id(3)
    table_pages = block_table_ref.shape[0]
    query_rows, head_dim = q_ref.shape[2], q_ref.shape[3]
    page_size = k_pages_ref.shape[-2]
    block_keys = pages_per_block * page_size
    # A length past the table would index pages the sequence does not own.
    length = jnp.minimum(lengths_ref[seq], table_pages * page_size)
    q_start = q_start_ref[seq] + start_offset

    # Row r of the block is query position q_start + r // group, head r % group.
    first_row = row_block * block_rows
    rows = first_row + jnp.arange(block_rows)
    positions = q_start + rows // group
    real_row = rows < query_rows
    live = real_row & (positions < length)
    row_limit = jnp.where(live, jnp.minimum(positions + 1, length), 0)
    last_row = jnp.minimum(first_row + block_rows - 1, query_rows - 1)
    block_limit = jnp.clip(q_start + last_row // group + 1, 0, length)
    block_pages = pl.cdiv(block_limit, page_size)

    first_page, end_page, used_splits = split_page_range(
        lengths_ref, split, block_pages, num_splits=num_splits, pages_per_block=pages_per_block,
        page_size=page_size, table_pages=table_pages)
    num_iters = pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_block)

    # Both products run in the pool's dtype (tensor cores for bf16), whatever q's is; over an fp8
    # pool in q's, the keys widened as loaded (`jaxserve_kernels.kv_dtype`).
    cdt = compute_dtype(k_pages_ref.dtype, q_ref.dtype, head_dim)
    widen = None if cdt == k_pages_ref.dtype else cdt
    q = compat.load(q_ref.at[seq, head, pl.ds(first_row, block_rows), :],
                    mask=real_row[:, None], other=0).astype(cdt)

    def body(i, carry):
        page0 = first_page + i * pages_per_block
        key_pos = page0 * page_size + jnp.arange(block_keys)
        written = key_pos < block_limit
        if v_mask == "redirect":
            k, v = gather_key_block(block_table_ref, k_pages_ref, v_pages_ref, page0, pages_per_block,
                                    written, dtype=widen)
        else:
            k, v = gather_page_block(block_table_ref, k_pages_ref, v_pages_ref, page0, pages_per_block,
                                     dtype=widen)
        # `lean` (decode): a split's first block holds a key every live row sees, so no select
        # after the exponential; rows that see none are padding, never stored.
        return online_softmax_step(carry, q, k, v, written if v_mask == "where" else None,
                                   key_pos[None, :] < row_limit[:, None],
                                   scale=scale, precision=precision, select_p=not lean, ftz=ftz,
                                   interpret=interpret)

    init = (jnp.zeros((block_rows, head_dim), jnp.float32),
            jnp.full((block_rows,), _MASK_VALUE, jnp.float32),
            jnp.zeros((block_rows,), jnp.float32))
    out, lse = finish_rows(*lax.fori_loop(0, num_iters, body, init))
    out = out.astype(o_ref.dtype)
    # Rows past the real ones (a group of 7 padded to 16) are neither read nor stored.
    out_rows = pl.ds(first_row, block_rows)
    if num_splits == 1:
        compat.store(o_ref.at[seq, head, out_rows, :], out, mask=real_row[:, None])
    elif not merge_in_kernel:
        compat.store(o_ref.at[split, seq, head, out_rows, :], out, mask=real_row[:, None])
        compat.store(lse_ref.at[split, seq, head, out_rows], lse, mask=real_row)
    else:
        merge_last_split(o_ref, lse_ref, out_ref, counter_ref, out, lse, seq=seq, head=head,
                         split=split, rows=out_rows, real_row=real_row, used=used_splits,
                         num_splits=num_splits, interpret=interpret)


def merge_last_split(o_ref, lse_ref, out_ref, counter_ref, out, lse, *, seq, head, split, rows,
                     real_row, used, num_splits: int, interpret: bool) -> None:
    """In-kernel flash-decoding merge: store this split's partial, take a ticket, and if it is
    the last of the (sequence, KV head)'s `num_splits`, fold the first `used` splits' partials
    (the ones holding keys; the rest were never meant to be read) into `out_ref`.

    `o_ref [S, B, H, rows, D]`, `lse_ref [S, B, H, rows]`: partial scratch; `counter_ref
    [B, H]` int32, zero on entry, left at zero. The barrier puts every thread's partial stores
    before the ticket (a scalar acquire-release atomic at GPU scope); the merger's loads
    are volatile, so they bypass L1, which is not coherent across SMs (a `.cg` cache modifier
    would do, but JAX's Triton lowering, 0.10.2 and 0.11.2, checks for ".ca" / ".cg" and
    then looks them up without the dot: both raise KeyError).

    Correct compiled on the H200 (the `gpu` tests) but slower than the separate merge launch
    at every shape measured (bandwidth.md, session 8): the last program folds the splits one
    after another, its volatile loads (never software-pipelined) waiting on L2 every split,
    so 128 splits at batch 1 x 32k cost ~30 µs where the launch it saves costs ~4. A fold in
    two waves of loads (every lse, then the partials in large tiles) with caller-kept counters
    was tried in session 12 and tied the launch at best (bandwidth.md): the barrier, atomic and
    dependent loads every split then ends with cost about what the launch does. Kept opt-in.
    """
    compat.store(o_ref.at[split, seq, head, rows, :], out.astype(o_ref.dtype), mask=real_row[:, None])
    compat.store(lse_ref.at[split, seq, head, rows], lse, mask=real_row)
    compat.barrier(interpret)
    ticket = compat.atomic_add(counter_ref, (seq, head), jnp.int32(1))

    @pl.when(ticket == num_splits - 1)
    def _merge():
        compat.barrier(interpret)
        block_rows, head_dim = out.shape

        def fold(s, carry):
            acc, m, w = carry
            part_lse = compat.load(lse_ref.at[s, seq, head, rows], mask=real_row,
                                   other=_MASK_VALUE, volatile=True)
            part = compat.load(o_ref.at[s, seq, head, rows, :], mask=real_row[:, None],
                               other=0, volatile=True).astype(jnp.float32)
            part_lse = jnp.maximum(part_lse, _MASK_VALUE)
            m_next = jnp.maximum(m, part_lse)
            alpha, beta = jnp.exp(m - m_next), jnp.exp(part_lse - m_next)
            return acc * alpha[:, None] + part * beta[:, None], m_next, w * alpha + beta

        init = (jnp.zeros((block_rows, head_dim), jnp.float32),
                jnp.full((block_rows,), _MASK_VALUE, jnp.float32),
                jnp.zeros((block_rows,), jnp.float32))
        acc, _, w = lax.fori_loop(0, used, fold, init)
        merged = jnp.where((w > 0)[:, None], acc / jnp.where(w > 0, w, 1.0)[:, None], 0.0)
        compat.store(out_ref.at[seq, head, rows, :], merged.astype(out_ref.dtype),
                     mask=real_row[:, None])
        counter_ref[seq, head] = jnp.int32(0)  # every split has counted: ready for the next call


def merge_splits(o: jax.Array, lse: jax.Array, out_dtype, combine: str, interpret: bool,
                 live_rows: int | None = None) -> jax.Array:
    """The flash-decoding merge by `combine`: "pallas" (one launch, `jaxserve_kernels.split_combine`;
    only the first `live_rows` rows, the rest left undefined) or "xla" (the jnp reference, which XLA
    fuses into one or several kernels; every row)."""
    if combine == "pallas":
        return combine_splits(o, lse, out_dtype, interpret=interpret, live_rows=live_rows)
    return combine_splits_reference(o, lse, out_dtype)


def default_num_splits(programs: int, table_pages: int, pages_per_block: int,
                       interpret: bool, head_dim: int = _TARGET_HEAD_DIM) -> int:
    """Splits so that about `_TARGET_PROGRAMS` programs run (scaled up for head dims under
    128), each split at least one loop iteration long; 1 in interpret mode.

    Example:
        >>> default_num_splits(2 * 64, 128, 8, False, head_dim=64)  # 0.5B heads, batch 64, 2k
        4
    """
    if interpret:
        return 1
    target = _TARGET_PROGRAMS * max(1, _TARGET_HEAD_DIM // head_dim)
    max_splits = max(1, pl.cdiv(table_pages, pages_per_block))
    return int(min(max_splits, pl.cdiv(target, programs)))


def default_pages_per_block(page_size: int, table_pages: int, block_keys: int) -> int:
    """Pages per loop iteration: `block_keys` keys' worth, fewer for a narrow table."""
    return max(1, min(compat.next_pow2(table_pages), block_keys // page_size))


@functools.partial(jax.jit, static_argnames=(
    "group", "start_offset", "block_rows", "scale", "num_splits", "pages_per_block",
    "num_warps", "num_stages", "interpret", "v_mask", "combine", "ftz", "lean"))
def attend_query_rows(q_rows, k_pages, v_pages, block_tables, q_start, lengths, *,
                      group: int, start_offset: int, block_rows: int, scale: float,
                      num_splits: int,
                      pages_per_block: int, num_warps: int,
                      num_stages: int, interpret: bool, v_mask: str = "redirect",
                      combine: str = "xla", ftz: bool = False, lean: bool = False):
    """Shared core: query rows `[batch, kv_heads, rows, head_dim]` over paged K/V.

    Row r holds query position `q_start[b] + start_offset + r // group` of head
    `r % group` of the KV
    group; it sees keys at positions <= its own and < `lengths[b]`; rows at positions
    >= `lengths[b]` come back as zeros. Rows are processed `block_rows` (a power of two
    >= 16) at a time. The only XLA work besides the kernel is the split combine. `ftz`,
    `lean`: `FTZ_EXP2` and `LEAN_SOFTMAX` (`lean` for decode rows only: one position a row block).
    """
    batch, kv_heads, query_rows, head_dim = q_rows.shape
    row_blocks = pl.cdiv(query_rows, block_rows)
    precision = (lax.Precision.HIGHEST if compute_dtype(k_pages.dtype, q_rows.dtype, head_dim) == jnp.float32
                 else None)
    merge_in_kernel = combine == "inkernel" and num_splits > 1
    if merge_in_kernel and row_blocks != 1:
        raise ValueError("combine='inkernel' merges one block of query rows per (sequence, KV head): "
                         f"got {query_rows} rows in blocks of {block_rows}")
    kernel = functools.partial(
        _attend_kernel, group=group, start_offset=start_offset, block_rows=block_rows,
        num_splits=num_splits,
        pages_per_block=pages_per_block, scale=scale,
        precision=precision, v_mask=v_mask, merge_in_kernel=merge_in_kernel,
        interpret=interpret, ftz=ftz, lean=lean)
    whole = pl.no_block_spec
    pool_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda b, h, r, s: (h, 0, 0, 0))
    in_specs = [pl.BlockSpec((None, block_tables.shape[1]), lambda b, h, r, s: (b, 0)),
                whole, whole, whole, pool_spec, pool_spec]
    operands = [block_tables.astype(jnp.int32), lengths.astype(jnp.int32), q_start.astype(jnp.int32),
                q_rows, k_pages, v_pages]
    out_shape, counter = split_outputs(q_rows.shape, q_rows.dtype, num_splits, merge_in_kernel)
    aliases = {}
    if counter is not None:
        in_specs.append(whole)
        operands.append(counter)
        aliases = {len(operands) - 1: len(out_shape) - 1}
    if num_splits == 1:
        out_shape = out_shape[0]
    result = compat.triton_call(
        kernel, *operands, grid=(batch, kv_heads, row_blocks, num_splits), in_specs=in_specs,
        out_shape=out_shape, input_output_aliases=aliases, interpret=interpret, num_warps=num_warps,
        num_stages=num_stages, name="paged_attention")
    if num_splits == 1:
        return result
    if merge_in_kernel:
        return result[2]
    return merge_splits(*result, q_rows.dtype, combine, interpret)


def split_outputs(rows_shape: tuple[int, ...], dtype, num_splits: int, merge_in_kernel: bool):
    """A decode kernel's attention outputs for `rows_shape = (batch, kv_heads, rows, D)`, and
    the zeroed arrival counters to pass in and alias to the last output, or None.

    Unsplit: the output. Split: the splits' partials and log-sum-exps, for `merge_splits`.
    Merged in the kernel (`merge_last_split`): those as scratch, then the merged output and
    the counters (one per sequence and KV head, left at zero by the merging program).

    Example:
        >>> [s.shape for s in split_outputs((2, 1, 16, 64), jnp.bfloat16, 3, False)[0]]
        [(3, 2, 1, 16, 64), (3, 2, 1, 16)]
    """
    if num_splits == 1:
        return [jax.ShapeDtypeStruct(rows_shape, dtype)], None
    # Partials are normalized (|o| <= max |v|), so the output dtype loses nothing that the
    # final cast would keep, and halves their traffic for bf16.
    shapes = [jax.ShapeDtypeStruct((num_splits, *rows_shape), dtype),
              jax.ShapeDtypeStruct((num_splits, *rows_shape[:-1]), jnp.float32)]
    if not merge_in_kernel:
        return shapes, None
    counters = jax.ShapeDtypeStruct(rows_shape[:2], jnp.int32)
    return (shapes + [jax.ShapeDtypeStruct(rows_shape, dtype), counters],
            jnp.zeros(counters.shape, counters.dtype))


def split_refs(refs, num_splits: int, merge_in_kernel: bool):
    """In-kernel twin of `split_outputs`: `(o_ref, lse_ref, out_ref, counter_ref)` from the refs
    that follow a decode kernel's own inputs (None where the case has none; the counter's
    input ref, aliased to its output, is skipped), and the refs after them."""
    if num_splits == 1:
        return (refs[0], None, None, None), refs[1:]
    if merge_in_kernel:
        _, o_ref, lse_ref, out_ref, counter_ref, *rest = refs
        return (o_ref, lse_ref, out_ref, counter_ref), rest
    o_ref, lse_ref, *rest = refs
    return (o_ref, lse_ref, None, None), rest


def check_pool(k_pages: jax.Array, v_pages: jax.Array, num_heads: int, head_dim: int) -> None:
    """Shape checks shared by the decode and prefill wrappers."""
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "k_pages and v_pages must both be [kv_heads, num_pages, page_size, head_dim], "
            f"got {k_pages.shape} and {v_pages.shape}")
    kv_heads, _, page_size, pool_head_dim = k_pages.shape
    if pool_head_dim != head_dim:
        raise ValueError(f"k_pages head_dim must equal q's {head_dim}, got {pool_head_dim}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads must be a multiple of kv_heads={kv_heads}, got {num_heads}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *,
                    scale: float | None = None, interpret: bool | None = None,
                    num_splits: int | None = None, pages_per_block: int | None = None,
                    num_warps: int = 4, num_stages: int | None = None, v_mask: str = "redirect",
                    combine: str = "pallas", ftz_exp2: bool | None = None,
                    lean_softmax: bool | None = None) -> jax.Array:
    """Decode attention of one new query per sequence over its paged K/V.

    Args:
        q: `[batch, num_heads, head_dim]`; query head h uses KV head
            `h // (num_heads // kv_heads)`.
        k_pages, v_pages: `[kv_heads, num_pages, page_size, head_dim]`; bf16, float32, or an fp8
            format, widened as loaded (`jaxserve_kernels.kv_dtype.compute_dtype`).
        block_tables: `[batch, max_pages]` int32 page ids; entries past a sequence's
            pages are ignored (0 is fine).
        lengths: `[batch]` int32 keys per sequence (this step's token included);
            0 gives a zero output row.
        scale: logit scale, default `head_dim ** -0.5`.
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        num_splits: flash-decoding splits of each sequence; None sizes them to fill
            the GPU (1 in interpret mode).
        pages_per_block: pages gathered per loop iteration (power of two); None picks
            128 keys' worth. With both None, a split of exactly two such blocks at head_dim
            >= 128 becomes two splits of half blocks (`RETILE_TWO_BLOCK_SPLITS`).
        num_warps, num_stages: Triton launch parameters; `num_stages` None: 2, or 3 for a long loop at head_dim
            >= 128 (`default_num_stages`).
        v_mask: how V's unwritten slots are kept out of the second product: "redirect"
            (default: read from the row's first slot instead, `gather_key_block`), "where"
            (pages gathered whole, unwritten slots zeroed after the load: 23-30% slower on
            the H200, bench/results/bandwidth.md), or "none" (pages gathered whole, not
            masked: wrong when such a slot holds NaN; kept only to measure the others).
        combine: how split partials merge: "pallas" (one launch, `jaxserve_kernels.split_combine`),
            "xla" (the jnp merge fused by XLA) or "inkernel" (the last split of each
            sequence and KV head to finish merges, counted with an atomic: one launch in
            all; opt-in, slower than "pallas" at every shape on the H200, see
            `merge_last_split`).
        ftz_exp2, lean_softmax: the softmax's instruction cuts (`FTZ_EXP2`, `LEAN_SOFTMAX`;
            None: those module defaults).

    Returns:
        `[batch, num_heads, head_dim]` in q's dtype; softmax in float32.

    Example:
        >>> q = jnp.ones((2, 14, 64), jnp.bfloat16)
        >>> pages = jnp.ones((2, 8, 16, 64), jnp.bfloat16)
        >>> table = jnp.array([[0, 1], [2, 3]], jnp.int32)
        >>> paged_attention(q, pages, pages, table, jnp.array([20, 0], jnp.int32)).shape
        (2, 14, 64)
    """
    batch, num_heads, head_dim = q.shape
    check_pool(k_pages, v_pages, num_heads, head_dim)
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_pages], got {block_tables.shape}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [{batch}], got {lengths.shape}")
    if v_mask not in V_MASKS:
        raise ValueError(f"v_mask must be one of {V_MASKS}, got {v_mask!r}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // kv_heads
    table_pages = block_tables.shape[1]
    interpret = compat.resolve_interpret(interpret)
    tuned = pages_per_block is None and num_splits is None
    pages_per_block, num_splits = resolve_tuning(
        page_size, table_pages, batch * kv_heads, pages_per_block, num_splits, interpret,
        DECODE_BLOCK_KEYS, head_dim=k_pages.shape[-1], single_pass=True)
    if tuned and RETILE_TWO_BLOCK_SPLITS:
        pages_per_block, num_splits = retile_two_block_splits(table_pages, pages_per_block, num_splits, head_dim)
    if num_stages is None:
        num_stages = default_num_stages(table_pages, pages_per_block, num_splits, head_dim)
    # The query sits at position length - 1: pass lengths as q_start with offset -1
    # rather than an XLA subtraction (one kernel launch fewer per step).
    out = attend_query_rows(
        q.reshape(batch, kv_heads, group, head_dim), k_pages, v_pages, block_tables,
        lengths, lengths, group=group, start_offset=-1,
        block_rows=max(16, compat.next_pow2(group)),
        scale=float(head_dim ** -0.5 if scale is None else scale),
        num_splits=num_splits, pages_per_block=pages_per_block,
        num_warps=num_warps, num_stages=num_stages,
        interpret=interpret, v_mask=v_mask, combine=combine,
        ftz=FTZ_EXP2 if ftz_exp2 is None else bool(ftz_exp2),
        lean=LEAN_SOFTMAX if lean_softmax is None else bool(lean_softmax))
    return out.reshape(batch, num_heads, head_dim)


def resolve_tuning(page_size: int, table_pages: int, programs: int,
                   pages_per_block: int | None, num_splits: int | None, interpret: bool,
                   block_keys: int, head_dim: int = _TARGET_HEAD_DIM,
                   single_pass: bool = False) -> tuple[int, int]:
    """Defaults and range checks for the loop's pages per block and the split count
    (`head_dim` scales the default split count; see `default_num_splits`). With
    `single_pass` (decode), a table of at most `SINGLE_PASS_KEYS` keys that the defaults
    would split is one unsplit iteration instead (unsplit rows keep their iteration size).

    Example:
        >>> resolve_tuning(16, 13, 2, None, None, False, 128, head_dim=64, single_pass=True)
        (16, 1)
        >>> resolve_tuning(16, 13, 2, None, None, False, 128, head_dim=64)
        (8, 2)
    """
    if (single_pass and pages_per_block is None and num_splits is None
            and table_pages * page_size <= SINGLE_PASS_KEYS
            and default_num_splits(programs, table_pages, default_pages_per_block(
                page_size, table_pages, block_keys), interpret, head_dim) > 1):
        pages_per_block, num_splits = compat.next_pow2(table_pages), 1
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size, table_pages, block_keys)
    if pages_per_block < 1 or pages_per_block & (pages_per_block - 1):
        raise ValueError(f"pages_per_block must be a power of two >= 1, got {pages_per_block}")
    if num_splits is None:
        num_splits = default_num_splits(programs, table_pages, pages_per_block, interpret,
                                        head_dim)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return pages_per_block, num_splits


def gather_pages(pages: jax.Array, block_tables: jax.Array, lengths: jax.Array) -> jax.Array:
    """`[kv_heads, num_pages, page_size, D]` -> contiguous `[batch, kv_heads, keys, D]` f32.

    Keys at or past `lengths[b]` are zeroed: unwritten slots may hold anything.
    """
    kv_heads, _, page_size, head_dim = pages.shape
    batch, table_pages = block_tables.shape
    gathered = pages[:, block_tables].astype(jnp.float32)  # [kv_heads, batch, pages, S, D]
    gathered = gathered.reshape(kv_heads, batch, table_pages * page_size, head_dim)
    written = jnp.arange(table_pages * page_size)[None, :] < lengths[:, None]
    return jnp.where(written[:, None, :, None], jnp.swapaxes(gathered, 0, 1), 0.0)


def masked_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                             scale: float) -> jax.Array:
    """float32 attention `q [b, h, g, n, D]` x `k, v [b, h, keys, D]`; no-key rows give 0."""
    s = jnp.einsum("bhgnd,bhkd->bhgnk", q.astype(jnp.float32), k,
                   precision=lax.Precision.HIGHEST) * scale
    s = jnp.where(visible, s, -jnp.inf)
    m = s.max(axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    total = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhgnk,bhkd->bhgnd", p, v, precision=lax.Precision.HIGHEST)


def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, scale=None):
    """jnp reference of `paged_attention`: gather the pages, then masked softmax in f32.

    Example:
        >>> q = jnp.ones((1, 2, 64)); pages = jnp.ones((1, 4, 16, 64))
        >>> paged_attention_reference(q, pages, pages, jnp.zeros((1, 2), jnp.int32),
        ...                           jnp.array([3], jnp.int32)).shape
        (1, 2, 64)
    """
    batch, num_heads, head_dim = q.shape
    check_pool(k_pages, v_pages, num_heads, head_dim)
    kv_heads = k_pages.shape[0]
    group = num_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    k = gather_pages(k_pages, block_tables, lengths)
    v = gather_pages(v_pages, block_tables, lengths)
    keys = k.shape[2]
    visible = (jnp.arange(keys)[None, :] < lengths[:, None])[:, None, None, None, :]
    qg = q.reshape(batch, kv_heads, group, 1, head_dim)
    out = masked_softmax_attention(qg, k, v, visible, scale)
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
