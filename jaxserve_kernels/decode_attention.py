"""Fused decode attention: RoPE, the new token's cache write and paged attention in one kernel.

Owns: the decode step's whole attention block between the QKV projection and the output
projection (or through it, `fused_decode_attention_o`), and their jnp references. Never
allocates pages or decides slots.

Why fuse: unfused, the block between the two projections is six launches a layer (slice
of K/V, RoPE of K, cache scatter, RoPE of Q, attention, split combine); this kernel is one,
plus the combine when it splits. On the H100 that took the Qwen2.5-0.5B decode step from
1.322 to 1.248 ms at batch 1 and 1.533 to 1.418 ms at batch 64 (72 launches fewer a step;
bench/results/decode_step.md).

How (one program per sequence, KV head and split, as in `jaxserve_kernels.paged_attention`):
- The query heads of the KV group are loaded as one tile and rotated in registers:
  rotate_half(q) is q times a signed permutation matrix built from iotas, one tiny tensor-
  core product; exact, since each output picks one input (fp32 products use HIGHEST).
- The new token's K and V come straight from the QKV activations: split 0 rotates K, writes
  both into the token's slot of the pool (aliased in place, like `jaxserve_kernels.cache_scatter`)
  and seeds its online softmax with the token's own logit, so no program ever reads the
  slot being written (the page loop covers keys `< length - 1` only).
- The cached keys are gathered per key through the block table (`gather_key_block`),
  `pages_per_block` pages' worth a loop iteration, online softmax in float32,
  flash-decoding splits merged in one more launch (`jaxserve_kernels.split_combine`). A length-0
  row writes nothing and returns zeros. Unsplit with one pipeline stage, the first block's gather
  is issued before everything above (`EARLY_GATHER`): it reads only keys earlier steps wrote.
- The rotated queries are rounded with `scale * log2(e)` in them, so the logits need no multiply,
  and no select follows the exponential (`jaxserve_kernels.paged_attention.LEAN_SOFTMAX`; each exponential
  one `ex2.approx.ftz`, `FTZ_EXP2`): the softmax is most of a short program's instructions.

With the output projection (`fused_decode_attention_o`, one-row steps of short tables): the third
grid axis becomes blocks of Wo's rows; each program loads its rows of Wo first, redoes the
(short) attention and writes its KV head's partial of o_proj, so the layer's o_proj costs no launch
(batch-1 step 0.601-0.604 vs 0.621-0.623 ms on the H200, session 15).

Backend: Pallas Triton, for the reasons in `jaxserve_kernels.paged_attention`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.cache_scatter import cache_scatter_reference
from jaxserve_kernels.kv_dtype import compute_dtype, to_pool
from jaxserve_kernels import paged_attention as _paged
from jaxserve_kernels.paged_attention import (_MASK_VALUE, COMBINES, DECODE_BLOCK_KEYS, LOG2E, SINGLE_PASS_KEYS,
                                     check_pool, finish_rows, gather_key_block, merge_last_split,
                                     merge_splits,
                                     online_softmax_step, paged_attention_reference,
                                     resolve_tuning, split_outputs, split_page_range,
                                     split_refs)


def _rotate_half_matrix(head_dim: int, dtype, xp: Any = jnp) -> jax.Array:
    """R with x @ R == concat(-x[half:], x[:half]) (Hugging Face's rotate_half); `xp=np` for a
    constant built outside a trace."""
    half = head_dim // 2
    i = xp.arange(head_dim)[:, None]
    j = xp.arange(head_dim)[None, :]
    minus = (j < half) & (i == j + half)
    plus = (j >= half) & (i == j - half)
    return xp.where(minus, -1.0, xp.where(plus, 1.0, 0.0)).astype(dtype)


def _fused_kernel(slot_ref, block_table_ref, lengths_ref, qkv_ref, cos_ref, sin_ref,
                  k_pages_ref, v_pages_ref, *refs, num_heads: int, kv_heads: int,
                  group: int, block_rows: int, num_splits: int, pages_per_block: int, scale: float,
                  precision, act_dtype, merge_in_kernel: bool = False, interpret: bool = False,
                  o_rows: int = 0, prefetch_wo: bool = False, rot_input: bool = False,
                  joint_rope: bool = False, early_gather: bool = False, ftz: bool = False,
                  lean: bool = False, has_after: bool = False, shrink_rank: int = 0,
                  shrink_prefetch: bool = True):
    refs = refs[1:] if has_after else refs  # `after`: an ordering operand, never read
    wo_ref, refs = (refs[0], refs[1:]) if o_rows else (None, refs)
    rot_ref, refs = (refs[0], refs[1:]) if rot_input else (None, refs)
    # `shrink_rank`: o_proj's LoRA shrink of this KV head's share of the output (`shrink`), its stack and the rows'
    # slots last of the inputs, its output last of all
    (a_ref, lslot_ref, *refs), t_ref = (refs[:-1], refs[-1]) if shrink_rank else ((None, None, *refs), None)
    (o_ref, lse_ref, out_ref, counter_ref), (k_out_ref, v_out_ref) = split_refs(
        refs, num_splits, merge_in_kernel)
    seq, head = pl.program_id(0), pl.program_id(1)
    # With the output projection folded in (`o_rows`), the third grid axis is the block of o's
    # rows a program computes; each program of a (sequence, KV head) redoes the same attention.
    split, chunk = (0, pl.program_id(2)) if o_rows else (pl.program_id(2), 0)
    table_pages = block_table_ref.shape[0]
    page_size, head_dim = k_pages_ref.shape[-2], k_pages_ref.shape[-1]
    pool_dtype = k_pages_ref.dtype
    # The products' dtype: the pool's, or over an fp8 pool the activations' (keys widened as loaded).
    cdt = compute_dtype(pool_dtype, act_dtype, head_dim)
    widen = None if cdt == pool_dtype else cdt
    block_keys = pages_per_block * page_size
    length = jnp.minimum(lengths_ref[seq], table_pages * page_size)
    cached = jnp.maximum(length - 1, 0)  # keys already in the pool; the new one is at `cached`
    rows = jnp.arange(block_rows)
    real_row = rows < group

    # The new token is not in the pages yet: the splits cover the cached keys only.
    first_page, end_page, used_splits = split_page_range(
        lengths_ref, split, pl.cdiv(cached, page_size), num_splits=num_splits,
        pages_per_block=pages_per_block, page_size=page_size, table_pages=table_pages,
        key_offset=-1)
    num_iters = pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_block)

    def key_block(i, clamp_pages=False):
        page0 = first_page + i * pages_per_block
        # Keys at or past `cached` read the row's first slot (see gather_key_block): written
        # whenever the loop runs, so V stays finite without a select before the product.
        valid = page0 * page_size + jnp.arange(block_keys) < cached
        k, v = gather_key_block(block_table_ref, k_pages_ref, v_pages_ref, page0, pages_per_block,
                                valid, clamp_pages=clamp_pages, dtype=widen)
        return k, v, valid

    if early_gather:
        # `EARLY_GATHER`: the first block's DRAM gather is issued before the QKV loads, RoPE and the
        # new token's write, which it does not depend on, so their latency runs under its own. It
        # reads only keys < `cached`, written by earlier steps, never the slot written below. A row
        # with no cached key (the loop would not run) reads its first slot too, possibly never
        # written (NaN): that block is computed and then discarded by a select.
        first_block = key_block(0, clamp_pages=True)

    v_new = to_pool(qkv_ref[seq, num_heads + kv_heads + head, :].astype(act_dtype), pool_dtype)
    cos = cos_ref[seq, :][None, :]
    sin = sin_ref[seq, :][None, :]
    # `rot_input`: the rotation matrix is loaded (a constant the caller passes) rather than built
    # from iotas in every program, ~32 elements a thread of compares and selects (`ROPE_JOINT`).
    rot = rot_ref[...] if rot_input else _rotate_half_matrix(head_dim, cdt)

    def rope(x, row_scale=None):  # x [rows, D] in the activation dtype -> rotated, in the products' dtype
        swapped = compat.dot(x.astype(cdt), rot, precision=precision).astype(jnp.float32)
        rotated = x.astype(jnp.float32) * cos + swapped * sin
        if row_scale is not None:  # `lean`: q's rows carry the logits' scale, rounded once with it
            rotated = rotated * row_scale[:, None]
        if widen is not None:
            # Over an fp8 pool, rounded to the activations' dtype first (exact in float16 at these magnitudes), so
            # the new key reaches the pool through the rounding the unfused path's K takes (RoPE's output in the
            # activations' dtype, then `to_pool`): float16 alone rounds ties between fp8 values the other way.
            rotated = rotated.astype(act_dtype)
        return rotated.astype(cdt)

    # `lean` (`LEAN_SOFTMAX`): the queries carry scale * log2(e), so no logit is multiplied. Row
    # `group` (the new key's under joint RoPE, else padding) keeps scale 1; one expression for both
    # layouts keeps them bitwise equal.
    q_scale = scale * LOG2E if lean else 1.0
    row_scale = jnp.where(rows == group, 1.0, q_scale).astype(jnp.float32) if lean else None
    logit_scale = None if lean else scale

    # A float32 qkv (a projection's accumulator) is rounded to the activations' dtype first, as
    # a projection's output in that dtype would be.
    if joint_rope:
        # The new key rides in row `group` of the queries' tile (a row the group leaves free), so
        # one product rotates both; rows past the group are never stored.
        src = jnp.where(rows < group, head * group + rows, num_heads + head)
        q = rope(qkv_ref[seq, src, :].astype(act_dtype), row_scale)
        k_new = jnp.sum(jnp.where((rows == group)[:, None], q.astype(jnp.float32), 0.0), axis=0)
    else:
        q_raw = compat.load(qkv_ref.at[seq, pl.ds(head * group, block_rows), :],
                            mask=real_row[:, None], other=0).astype(act_dtype)
        # The new key as row 0 of a tile (the MMA needs 16 rows), then as a vector.
        k_raw = compat.load(qkv_ref.at[seq, pl.ds(num_heads + head, block_rows), :],
                            mask=(rows == 0)[:, None], other=0).astype(act_dtype)
        q = rope(q_raw, row_scale)
        k_new = rope(k_raw).astype(jnp.float32).sum(axis=0)  # rows 1.. are exact zeros
    if widen is not None:
        # The new key as the pool will hold it, so its own logit is the one later steps compute.
        k_new = to_pool(k_new, pool_dtype).astype(jnp.float32)
    has_new = length >= 1
    slot = slot_ref[seq]

    num_slots = k_pages_ref.shape[0] * page_size

    @pl.when((split == 0) & (chunk == 0) & has_new & (slot >= 0) & (slot < num_slots))
    def _write():
        page = slot // page_size
        k_out_ref[page, slot % page_size, :] = k_new.astype(pool_dtype)  # over fp8, saturated above already
        v_out_ref[page, slot % page_size, :] = v_new

    seeds = (split == 0) & has_new
    # In the online softmax's base-2 units (`online_softmax_step`).
    s_new = (q.astype(jnp.float32) * k_new[None, :]).sum(axis=1)
    if not lean:
        s_new = s_new * (scale * LOG2E)
    m0 = jnp.where(seeds, s_new, _MASK_VALUE)
    l0 = jnp.where(seeds, jnp.ones_like(s_new), jnp.zeros_like(s_new))
    acc0 = jnp.where(seeds, jnp.broadcast_to(v_new.astype(jnp.float32)[None, :],
                                               (block_rows, head_dim)), 0.0)

    def step(carry, block):
        k, v, valid = block
        # `lean`: no select after the exponential. Every row's running maximum is finite before
        # any key is folded (split 0: the new token's logit) or after its first block (a split's
        # first block holds a cached key; an early block without one is dropped below), and all
        # rows see the same keys, so a hidden key's exp2(-1e30 - m) is 0 already.
        return online_softmax_step(carry, q, k, v, None, valid[None, :], scale=logit_scale,
                                   precision=precision, select_p=not lean, ftz=ftz, interpret=interpret)

    if o_rows:
        o_cols = chunk * o_rows + jnp.arange(o_rows)
        o_ok = o_cols < wo_ref.shape[0]

        def wo_rows(g):  # Wo[chunk's rows, query head (head * group + g)'s columns]: [o_rows, D]
            return compat.load(wo_ref.at[pl.ds(chunk * o_rows, o_rows), pl.ds((head * group + g) * head_dim, head_dim)],
                               mask=o_ok[:, None], other=0)

        # Loaded before the attention, the weights are in flight while it runs (registers held).
        wos = [wo_rows(g) for g in range(group)] if prefetch_wo else None
    if shrink_rank:
        own_slot = lslot_ref[seq]
        own_rows = pl.ds(jnp.maximum(own_slot, 0) * shrink_rank, shrink_rank)

        def stack_rows():
            # The row's own slot's R rows of the stack, this KV head's query heads' columns (a base row, slot -1,
            # reads slot 0's and writes zeros).
            return [a_ref[own_rows, pl.ds((head * group + g) * head_dim, head_dim)] for g in range(group)]

        a_heads = stack_rows() if shrink_prefetch else None  # in flight while the attention runs (registers held)
    carry = (acc0, m0, l0)
    if early_gather:
        has_first = num_iters >= 1
        carry = tuple(jnp.where(has_first, after, before) for after, before in zip(step(carry, first_block), carry))
    carry = lax.fori_loop(int(early_gather), num_iters, lambda i, c: step(c, key_block(i)), carry)
    out, lse = finish_rows(*carry)
    if o_rows:
        # o_proj's partial sum over this KV head's query heads, rounded as the unfused path rounds
        # the attention output (to the activations' dtype) before the product.
        attn = out.astype(act_dtype).astype(jnp.float32)
        acc = _group_product(attn, rows, group, lambda g: wos[g] if prefetch_wo else wo_rows(g))
        compat.store(o_ref.at[head, seq, pl.ds(chunk * o_rows, o_rows)], jnp.sum(acc, axis=1), mask=o_ok)
        return
    out = out.astype(o_ref.dtype)
    if shrink_rank:
        a_heads = stack_rows() if a_heads is None else a_heads
        _store_shrink(t_ref, out, a_heads, own_slot, rows, seq=seq, head=head, rank=shrink_rank)
    if num_splits == 1:
        compat.store(o_ref.at[seq, head, pl.ds(0, block_rows), :], out, mask=real_row[:, None])
    elif merge_in_kernel:
        # Split 0 also holds the new token, so it counts even with no cached page.
        used = jnp.maximum(used_splits, has_new.astype(jnp.int32))
        merge_last_split(o_ref, lse_ref, out_ref, counter_ref, out, lse, seq=seq, head=head,
                         split=split, rows=pl.ds(0, block_rows), real_row=real_row, used=used,
                         num_splits=num_splits, interpret=interpret)
    else:
        compat.store(o_ref.at[split, seq, head, pl.ds(0, block_rows), :], out,
                     mask=real_row[:, None])
        compat.store(lse_ref.at[split, seq, head, pl.ds(0, block_rows)], lse, mask=real_row)


def _group_product(attn, rows, group: int, tile) -> jax.Array:
    """The KV group's query rows ``attn [block_rows, D]`` (float32) times weights of their columns: the sum over
    query heads g < ``group`` of ``tile(g) [n, D]`` times attention row g, in float32 (``[n, D]``; its sum over D is
    each weight row's product with the group's rows side by side). ``tile(g)`` is called in the loop, so a load
    there is issued beside the products."""
    acc = 0.0
    for g in range(group):
        row_g = jnp.sum(jnp.where((rows == g)[:, None], attn, 0.0), axis=0)  # attention row g: [D]
        acc = acc + tile(g).astype(jnp.float32) * row_g[None, :]
    return acc


def _store_shrink(t_ref, out, a_heads, own_slot, rows, *, seq, head, rank: int) -> None:
    """This KV head's part of o_proj's LoRA shrink for row ``seq``: its query heads' attention rows ``out`` (in the
    activations' dtype, as o_proj reads them) times ``a_heads`` (each query head's ``[rank, head_dim]`` of the row's
    own slot's stack rows), summed in float32 and rounded once, in that slot's ``rank`` columns of ``t_ref[seq,
    head]``; every other column (every one for a row of no slot) zero."""
    width = t_ref.shape[-1]
    part = jnp.sum(_group_product(out.astype(jnp.float32), rows, len(a_heads), a_heads.__getitem__), axis=1)
    # Placed in the slot's columns by a select over [width, rank]: a register tile cannot be indexed by a traced
    # offset.
    cols = own_slot * rank + jnp.arange(rank)
    t = jnp.sum(jnp.where(jnp.arange(width)[:, None] == cols[None, :], part[None, :], 0.0), axis=1)
    t_ref[seq, head, :] = jnp.where(own_slot >= 0, t, 0.0).astype(t_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "scale", "num_splits", "pages_per_block", "num_warps", "num_stages", "interpret", "combine", "o_rows",
    "prefetch_wo", "out_dtype", "rope_joint", "early_gather", "ftz", "lean", "live_rows", "shrink_rank",
    "shrink_prefetch"))
def _fused(qkv, cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping, wo=None, after=None, shrink=None, *,
           scale: float, num_splits: int, pages_per_block: int, num_warps: int, num_stages: int,
           interpret: bool, combine: str, o_rows: int = 0, prefetch_wo: bool = False, out_dtype=None,
           rope_joint: bool = False, early_gather: bool = False, ftz: bool = False, lean: bool = False,
           live_rows: int | None = None, shrink_rank: int = 0, shrink_prefetch: bool = True):
    out_dtype = qkv.dtype if out_dtype is None else out_dtype
    batch, _, head_dim = qkv.shape
    live = batch if live_rows is None else live_rows  # grid rows: past them, padding nobody reads
    kv_heads = k_pages.shape[0]
    num_heads = qkv.shape[1] - 2 * kv_heads
    group = num_heads // kv_heads
    block_rows = max(16, compat.next_pow2(group))
    # ROPE_JOINT's regime: one-stage steps, the key's row in a group that leaves one free; EARLY_GATHER's:
    # one-stage unsplit steps.
    rot_input = rope_joint and num_stages == 1
    early_gather = early_gather and num_stages == 1 and num_splits == 1
    precision = (lax.Precision.HIGHEST if compute_dtype(k_pages.dtype, out_dtype, head_dim) == jnp.float32
                 else None)
    merge_in_kernel = combine == "inkernel" and num_splits > 1
    kernel = functools.partial(
        _fused_kernel, num_heads=num_heads, kv_heads=kv_heads, group=group,
        block_rows=block_rows, num_splits=num_splits, pages_per_block=pages_per_block,
        scale=scale, precision=precision, act_dtype=out_dtype, merge_in_kernel=merge_in_kernel,
        interpret=interpret, o_rows=o_rows, prefetch_wo=prefetch_wo, rot_input=rot_input,
        joint_rope=rot_input and group < block_rows, early_gather=early_gather, ftz=ftz, lean=lean,
        has_after=after is not None, shrink_rank=shrink_rank, shrink_prefetch=shrink_prefetch)
    whole = pl.no_block_spec
    pool_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda b, h, s: (h, 0, 0, 0))
    in_specs = [whole, pl.BlockSpec((None, block_tables.shape[1]), lambda b, h, s: (b, 0)),
                whole, whole, whole, whole, pool_spec, pool_spec]
    pool_shapes = [jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)]
    operands = [slot_mapping.astype(jnp.int32), block_tables.astype(jnp.int32),
                lengths.astype(jnp.int32), qkv, cos.astype(jnp.float32), sin.astype(jnp.float32),
                k_pages, v_pages]
    if after is not None:  # never read: an operand only so that XLA runs the call after it
        in_specs.append(whole)
        operands.append(after)
    if o_rows:  # o_proj's partial sums, one per KV head (the next norm adds them)
        out_shape, counter = [jax.ShapeDtypeStruct((kv_heads, batch, wo.shape[0]), jnp.float32)], None
        in_specs.append(whole)
        operands.append(wo)
        grid = (live, kv_heads, pl.cdiv(wo.shape[0], o_rows))
    else:
        out_shape, counter = split_outputs((batch, kv_heads, group, head_dim), out_dtype, num_splits,
                                           merge_in_kernel)
        grid = (live, kv_heads, num_splits)
    if rot_input:
        in_specs.append(whole)
        # Built in numpy, so XLA holds it as a constant; a jnp build would run as a kernel each step.
        operands.append(jnp.asarray(_rotate_half_matrix(head_dim, np.float32, xp=np),
                                    compute_dtype(k_pages.dtype, out_dtype, head_dim)))
    out_specs = [whole] * len(out_shape)
    aliases = {6: len(out_shape), 7: len(out_shape) + 1}  # the pools, in place
    if counter is not None:
        in_specs.append(whole)
        operands.append(counter)
        aliases[len(operands) - 1] = len(out_shape) - 1
    shrink_out = []
    if shrink_rank:  # o_proj's LoRA shrink, a part a KV head: `[batch, kv_heads, T]`, after the pools
        a_cols, lslots = shrink
        in_specs += [whole, whole]
        operands += [a_cols.astype(out_dtype), lslots.astype(jnp.int32)]
        shrink_out = [jax.ShapeDtypeStruct((batch, kv_heads, a_cols.shape[0]), out_dtype)]
    result = compat.triton_call(
        kernel, *operands, grid=grid, in_specs=in_specs, out_specs=out_specs + [pool_spec, pool_spec] + [whole] * len(
            shrink_out), out_shape=out_shape + pool_shapes + shrink_out, input_output_aliases=aliases,
        interpret=interpret, num_warps=num_warps, num_stages=num_stages, name="fused_decode_attention")
    if shrink_rank:  # last of the outputs; the call is unsplit, so the rest is as without it
        *result, t = result
    k_pages, v_pages = result[-2], result[-1]
    if o_rows:
        return result[0], k_pages, v_pages
    if num_splits == 1:
        out = result[0]
    elif merge_in_kernel:
        out = result[2]
    else:
        out = merge_splits(result[0], result[1], out_dtype, combine, interpret, live_rows=live)
    out = out.reshape(batch, num_heads, head_dim), k_pages, v_pages
    return (*out, t) if shrink_rank else out


def _check_args(qkv, cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping) -> None:
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be [batch, num_heads + 2 * kv_heads, head_dim], got {qkv.shape}")
    batch, heads, head_dim = qkv.shape
    kv_heads = k_pages.shape[0] if k_pages.ndim == 4 else 0
    num_heads = heads - 2 * kv_heads
    if num_heads < 1:
        raise ValueError(f"qkv has {heads} heads, too few for {kv_heads} KV heads")
    check_pool(k_pages, v_pages, num_heads, head_dim)
    for name, arr in (("cos", cos), ("sin", sin)):
        if arr.shape != (batch, head_dim):
            raise ValueError(f"{name} must be [{batch}, {head_dim}], got {arr.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_pages], got {block_tables.shape}")
    for name, arr in (("lengths", lengths), ("slot_mapping", slot_mapping)):
        if arr.shape != (batch,):
            raise ValueError(f"{name} must be [{batch}], got {arr.shape}")


# Pipeline stages of `fused_decode_attention`'s key loop: two from this many rows, one below. One
# stage was the better choice for session 4's kernel at every batch (H100, 0.5B heads,
# `bench/fused_tune.py`: batch 256 at 192 keys 28.1 -> 21.9 µs a layer, batch 1 11.3 -> 8.8: a
# program runs few iterations, and a second stage halved the programs resident per SM). Today's
# kernel reads the other way at 256 rows: 12.9 vs 14.2 µs a layer, step 1.332-1.335 vs 1.365-1.367
# ms in two calls, and ties at 64 (0.864 vs 0.867; H200, session 16, bench/results/decode_step.md).
# Below 128 rows it stays at one, since nothing was measured there since session 4.
TWO_STAGE_ROWS = 128
# The same for unsplit kernels with EARLY_GATHER (which needs one stage): one stage wins at 128 rows
# too, attention 9.66 -> 8.90 µs a layer, step 0.969 -> 0.951 ms; at 256 it loses (13.11 -> 14.61 µs,
# 1.259 -> 1.293 ms; H200, session 25, decode_step.md). The engine's batch buckets are powers of two,
# so nothing between the two was measured.
UNSPLIT_TWO_STAGE_ROWS = 256
# A split fused kernel whose block table allows each split at least this many key blocks runs two pipeline
# stages at any batch (0: off; unsplit kernels keep the rules above). Why: one stage gathers each block through
# registers and waits on it (no `cp.async` pipeline), which costs the long-context rows of small batches, where
# every split loops over several blocks. H200, session 37 (bench/results/decode_step.md): the engine's step at 64
# rows x 1,088 keys in its 2048-page table 1.017 -> 0.991 ms, at 8 rows (one block a split) 0.772 / 0.774, a tie
# (`bench/decode_step.py --glue split_one_stage`). `bench/fused_tune.py`, one stage -> two, µs a layer: 7B heads
# 1 x 32k 38.4 -> 35.9 and 37.4 -> 34.2 (two calls), 8 x 2k 24.5 -> 23.8 and 27.8 -> 26.7; 0.5B heads 8 x 8k 27.2
# -> 24.9 and 24.4 -> 23.2, 64 x 1,088 keys 28.0 -> 26.3; one loss, 7B 1 x 8k in a 513-page table (two blocks a
# split) 19.3 -> 20.2. The width is the table's, not the lengths': the engine hands split calls its full
# `max_model_len` table, so this is the most a split can loop. Read when a step is traced.
SPLIT_TWO_STAGE_BLOCKS = 2
# RoPE inside the fused kernels of one pipeline stage (see the two above): rotate_half's
# matrix loaded, a constant, instead of built from iotas in every program, and the new key rotated in
# the queries' product (a free row of the group's tile) instead of a second one. Qwen2.5-0.5B at 64
# rows: step 0.783 vs 0.786-0.788 ms, attention 7.01-7.03 vs 7.14-7.15 µs in two calls; at 1 row a tie
# (0.590); at 256 rows (two stages) 1.266 vs 1.262 and 1.289 vs 1.286, so not there (H200, session 24,
# bench/results/decode_step.md). JAXSERVE_ROPE_JOINT=0 turns it off. Read when a step is traced.
ROPE_JOINT = os.environ.get("JAXSERVE_ROPE_JOINT", "1") == "1"
# The first key block's gather issued at the top of the unsplit fused kernels of one pipeline stage
# (steps under UNSPLIT_TWO_STAGE_ROWS), ahead of the QKV loads, RoPE and the cache write it does not
# depend on, instead of in the loop after them: their latency runs under the gather's. Qwen2.5-0.5B on the H200 (session 25,
# bench/results/decode_step.md, one process, alternating rounds): attention 6.71 -> 5.95 µs a layer and
# the step 0.589 -> 0.572 ms at 1 row; 6.98 -> 6.57 µs and 0.782 -> 0.774 ms at 64 rows. Where several
# programs share an SM it loses (its block's registers held through RoPE): 13.11 -> 14.56 µs at 256 rows
# (two stages, whose prologue gathers ahead anyway), 16.66 -> 17.12 µs at 64 rows of 1,088 keys (4
# splits, 512 programs), so only unsplit one-stage kernels take it.
# JAXSERVE_EARLY_GATHER=0 turns it off. Read when a step is traced.
EARLY_GATHER = os.environ.get("JAXSERVE_EARLY_GATHER", "1") == "1"


# `fused_decode_attention`'s ``shrink``: the stack rows loaded before the attention (in flight while it runs, their
# registers held through it), or after it. H100, session 61 (bench/results/lora.md): with them loaded first the
# 64-row adapter step's attention takes 7.82 against 6.87 µs a launch without the shrink. Experiment:
# JAXSERVE_ATTENTION_SHRINK_PREFETCH=0 loads them after; read when a step is traced.
SHRINK_PREFETCH = os.environ.get("JAXSERVE_ATTENTION_SHRINK_PREFETCH", "1") == "1"


def fused_decode_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array,
                           v_pages: jax.Array, block_tables: jax.Array, lengths: jax.Array,
                           slot_mapping: jax.Array, *, scale: float | None = None,
                           interpret: bool | None = None, num_splits: int | None = None,
                           pages_per_block: int | None = None, num_warps: int = 4,
                           num_stages: int | None = None, combine: str = "pallas", out_dtype: Any = None,
                           live_rows: int | None = None, after: jax.Array | None = None,
                           shrink: tuple[jax.Array, jax.Array, int] | None = None) -> tuple:
    """One decode token per sequence: RoPE on its q and k, k/v into the pool, attention.

    Args:
        qkv: `[batch, num_heads + 2 * kv_heads, head_dim]`, the QKV projection (bias
            included) of each sequence's new token, before RoPE: query heads, then key
            heads, then value heads.
        cos, sin: `[batch, head_dim]` RoPE tables at each token's position
            (`jaxserve.model.rope_tables`, half-split layout).
        k_pages, v_pages: `[kv_heads, num_pages, page_size, head_dim]`; donate them so
            the write is in place. In an fp8 format the new K / V are written saturated and the pages
            widened as loaded (`jaxserve_kernels.kv_dtype`).
        block_tables: `[batch, max_pages]` int32 pages of each sequence.
        lengths: `[batch]` keys per sequence including the new token (at position
            `length - 1`); 0 marks a padding row: nothing written, zeros returned.
        slot_mapping: `[batch]` pool slot (`page * page_size + offset`) of the new token;
            negative writes nothing. A row with length >= 1 must name its token's slot.
        scale, interpret, num_splits, pages_per_block, num_warps, num_stages, combine: as in
            `jaxserve_kernels.paged_attention.paged_attention`. `num_stages` None: `default_num_stages` (by
            `TWO_STAGE_ROWS`, `UNSPLIT_TWO_STAGE_ROWS` for an unsplit call with `EARLY_GATHER`, and
            `SPLIT_TWO_STAGE_BLOCKS` for a split call whose splits loop).
        out_dtype: the activations' dtype (None: qkv's). A float32 qkv (a projection's
            accumulator) is rounded to it first, as a projection's output in it would be.
        live_rows: only the first this many rows are computed, and the split count is sized for them (a
            batch padded for its projections' sake, `jaxserve.engine.Engine.decode_shape`): the rows past it
            launch no program, write nothing to the pool, and their outputs are left undefined, for a caller
            that discards them. None: every row.
        after: any array, never read: the call waits for it (`jaxserve_kernels.kv_touch`'s read-ahead).
        shrink: `(a_cols [T, num_heads * head_dim], slots [batch], R)`: also o_proj's LoRA shrink of the output,
            as `jaxserve.lora.fold_columns` lays out the slots' stacks (slot s's R rows from s * R; slot -1: none):
            each program multiplies its KV head's query rows by the row's own slot's stack rows, so the shrink
            costs no launch of its own. Only where the call runs unsplit (every row's attention whole in one
            program), R and T powers of two: elsewhere None comes back in its place.

    Returns:
        `(out [batch, num_heads, head_dim] in out_dtype, k_pages, v_pages)`; with `shrink` also `t [batch,
        kv_heads * T]` in out_dtype, a part a KV head side by side (each zero outside the row's slot's columns),
        whose sum over the parts is `out @ a_cols.T` in the row's slot's columns (`attention_shrink_reference`;
        undefined past `live_rows`, as out is), or None.

    Example:
        >>> qkv = jnp.ones((2, 14 + 4, 64), jnp.bfloat16)
        >>> cos, sin = jnp.ones((2, 64)), jnp.zeros((2, 64))
        >>> kp = vp = jnp.zeros((2, 8, 16, 64), jnp.bfloat16)
        >>> table = jnp.array([[0, 1], [2, 3]], jnp.int32)
        >>> out, kp, vp = fused_decode_attention(qkv, cos, sin, kp, vp, table,
        ...     jnp.array([20, 0], jnp.int32), jnp.array([19, -1], jnp.int32))
        >>> out.shape
        (2, 14, 64)
    """
    _check_args(qkv, cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping)
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    batch, _, head_dim = qkv.shape
    live = batch if live_rows is None else live_rows
    if not 1 <= live <= batch:
        raise ValueError(f"live_rows must be in [1, {batch}] (the batch), got {live_rows}")
    kv_heads, _, page_size, _ = k_pages.shape
    interpret = compat.resolve_interpret(interpret)
    pages_per_block, num_splits = resolve_tuning(
        page_size, block_tables.shape[1], live * kv_heads, pages_per_block, num_splits,
        interpret, DECODE_BLOCK_KEYS, head_dim=head_dim, single_pass=True)
    if num_stages is None:
        num_stages = default_num_stages(live, block_tables.shape[1], num_splits, pages_per_block)
    rank = 0
    if shrink is not None:
        a_cols, lslots, rank = shrink
        num_heads = qkv.shape[1] - 2 * kv_heads
        if a_cols.ndim != 2 or a_cols.shape[1] != num_heads * head_dim:
            raise ValueError(f"shrink's a_cols must be [T, {num_heads * head_dim}], got {a_cols.shape}")
        if lslots.shape != (batch,):
            raise ValueError(f"shrink's slots must be [{batch}], got {lslots.shape}")
        if not 1 <= rank <= a_cols.shape[0]:
            raise ValueError(f"shrink's rank must be in [1, T = {a_cols.shape[0]}], got {rank}")
        pow2 = all(n & (n - 1) == 0 for n in (rank, a_cols.shape[0]))
        rank = rank if num_splits == 1 and pow2 else 0
    out = _fused(qkv, cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping, after=after,
                 shrink=shrink[:2] if rank else None,
                 scale=float(head_dim ** -0.5 if scale is None else scale),
                 num_splits=num_splits, pages_per_block=pages_per_block,
                 num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                 combine=combine, out_dtype=None if out_dtype is None else jnp.dtype(out_dtype),
                 rope_joint=ROPE_JOINT, early_gather=EARLY_GATHER, ftz=_paged.FTZ_EXP2,
                 lean=_paged.LEAN_SOFTMAX, live_rows=live, shrink_rank=rank, shrink_prefetch=SHRINK_PREFETCH)
    if shrink is None:
        return out
    if not rank:
        return (*out, None)
    *out, t = out
    return (*out, t.reshape(batch, -1))


def attention_shrink_reference(out: jax.Array, a_cols: jax.Array, slots: jax.Array, rank: int,
                               kv_heads: int) -> jax.Array:
    """jnp reference of `fused_decode_attention`'s ``shrink``: for `out [batch, num_heads, head_dim]` (in the
    activations' dtype), each KV head's query heads times their columns of `a_cols [T, num_heads * head_dim]` in
    float32, kept in the row's slot's `rank` columns, rounded to out's dtype: `[batch, kv_heads * T]`.

    Example:
        >>> t = attention_shrink_reference(jnp.ones((2, 4, 16)), jnp.ones((32, 64)), jnp.array([1, -1]), 16, 2)
        >>> t.shape, t[0, 16].item(), t[0, 0].item(), t[1].max().item()
        ((2, 64), 32.0, 0.0, 0.0)
    """
    from jaxserve_kernels.skinny_matmul import own_slot_columns

    batch, num_heads, head_dim = out.shape
    per_head = out.astype(jnp.float32).reshape(batch, kv_heads, -1)
    a = a_cols.astype(out.dtype).astype(jnp.float32).reshape(a_cols.shape[0], kv_heads, -1)
    parts = jnp.einsum("bhk,thk->bht", per_head, a, precision=lax.Precision.HIGHEST)
    return jax.vmap(lambda p: own_slot_columns(p, rank, slots, out.dtype), 1, 1)(parts).reshape(batch, -1)


def default_num_stages(batch: int, table_pages: int, num_splits: int, pages_per_block: int) -> int:
    """Pipeline stages of a fused decode call: `TWO_STAGE_ROWS` / `UNSPLIT_TWO_STAGE_ROWS` by batch, and two for
    split calls whose table gives a split `SPLIT_TWO_STAGE_BLOCKS` key blocks or more.

    Example:
        >>> default_num_stages(1, 2048, 64, 8), default_num_stages(1, 2048, 256, 8), default_num_stages(64, 13, 1, 16)
        (2, 1, 1)
    """
    unsplit_early = EARLY_GATHER and num_splits == 1
    if batch >= (UNSPLIT_TWO_STAGE_ROWS if unsplit_early else TWO_STAGE_ROWS):
        return 2
    if (num_splits > 1 and SPLIT_TWO_STAGE_BLOCKS
            and pl.cdiv(table_pages, num_splits * pages_per_block) >= SPLIT_TWO_STAGE_BLOCKS):
        return 2
    return 1


# `fused_decode_attention_o`: rows of Wo a program (its grid's third axis has N / O_ROWS blocks per
# sequence and KV head), whether a program loads its Wo rows before the attention (held in
# registers through it) or after, and its warps. 16 rows loaded first: the Qwen2.5-0.5B batch-1 step
# 0.604 vs 0.621 ms with o_proj apart (attention + o 6.97 vs 5.89 + 2.15 µs a layer); loaded after
# the attention 0.679 (H200, session 15, bench/results/decode_step.md); 8 warps: 6.76 vs 6.94 µs a
# layer (step 0.601 vs 0.603 ms). Read when a step is traced.
O_ROWS = 16
O_PREFETCH_WO = True
O_NUM_WARPS = 8


def fused_decode_attention_o(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array,
                             v_pages: jax.Array, block_tables: jax.Array, lengths: jax.Array,
                             slot_mapping: jax.Array, wo: jax.Array, *, scale: float | None = None,
                             interpret: bool | None = None, o_rows: int | None = None,
                             prefetch_wo: bool | None = None, num_warps: int | None = None,
                             num_stages: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`fused_decode_attention` with the output projection folded in: o_proj's partial sums.

    Why: at batch 1 the attention is two programs (one per KV head) on a latency chain of
    dependent loads, and o_proj another launch of ~2 µs that streams 1.6 MB. Here each
    (sequence, KV head) runs `N / o_rows` programs: every one redoes the same attention (its
    K/V are a few KiB, read from L2 after the first) and multiplies the result by `o_rows` rows
    of `wo`'s columns for that KV head's query heads, so o_proj costs no launch and its weights
    stream beside the attention. The attention is repeated per block of rows: meant for short
    tables at small batch (`jaxserve.model` uses it for one-row steps of short tables).

    Args:
        qkv, cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping: as in
            `fused_decode_attention`.
        wo: `[N, num_heads * head_dim]` the output projection, `[out, in]`.
        o_rows: rows of `wo` a program (None: `O_ROWS`; in interpret mode all of them).
        prefetch_wo: load them before the attention (None: `O_PREFETCH_WO`).
        num_warps: None: `O_NUM_WARPS`.
        scale, interpret, num_stages: as in `fused_decode_attention`; never split.

    Returns:
        `(partials [kv_heads, batch, N] float32, k_pages, v_pages)`: o_proj's output is
        `partials.sum(0)` (the attention output rounded to qkv's dtype first, as the unfused
        path rounds it); `jaxserve_kernels.skinny_matmul.skinny_matmul_norm` takes them as they are.

    Example:
        >>> qkv = jnp.ones((1, 14 + 4, 64), jnp.bfloat16)
        >>> cos, sin = jnp.ones((1, 64)), jnp.zeros((1, 64))
        >>> kp = vp = jnp.zeros((2, 4, 16, 64), jnp.bfloat16)
        >>> wo = jnp.ones((896, 896), jnp.bfloat16)
        >>> parts, kp, vp = fused_decode_attention_o(qkv, cos, sin, kp, vp, jnp.array([[0, 1]], jnp.int32),
        ...     jnp.array([20], jnp.int32), jnp.array([19], jnp.int32), wo)
        >>> parts.shape
        (2, 1, 896)
    """
    _check_args(qkv, cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping)
    num_heads = qkv.shape[1] - 2 * k_pages.shape[0]
    head_dim, page_size = qkv.shape[2], k_pages.shape[2]
    if wo.ndim != 2 or wo.shape[1] != num_heads * head_dim:
        raise ValueError(f"wo must be [N, {num_heads * head_dim}] (num_heads * head_dim), got {wo.shape}")
    interpret = compat.resolve_interpret(interpret)
    if o_rows is None:
        # Interpret mode runs programs one after another: one block of rows a KV head, so the
        # attention is not redone on the CPU.
        o_rows = max(O_ROWS, compat.next_pow2(wo.shape[0])) if interpret else O_ROWS
    if o_rows < 1 or o_rows & (o_rows - 1):
        raise ValueError(f"o_rows must be a power of two >= 1, got {o_rows}")
    table_pages = block_tables.shape[1]
    # One loop iteration for a table of up to 256 keys (as the unsplit default), never split.
    pages_per_block, _ = resolve_tuning(page_size, table_pages, 1, None, 1, interpret, DECODE_BLOCK_KEYS,
                                        head_dim=head_dim)
    if table_pages * page_size <= SINGLE_PASS_KEYS:
        pages_per_block = compat.next_pow2(table_pages)
    return _fused(qkv, cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping, wo,
                  scale=float(head_dim ** -0.5 if scale is None else scale), num_splits=1,
                  pages_per_block=pages_per_block, num_warps=num_warps or O_NUM_WARPS, num_stages=num_stages,
                  interpret=interpret, combine="pallas", o_rows=o_rows,
                  prefetch_wo=O_PREFETCH_WO if prefetch_wo is None else bool(prefetch_wo),
                  rope_joint=ROPE_JOINT, early_gather=EARLY_GATHER, ftz=_paged.FTZ_EXP2,
                  lean=_paged.LEAN_SOFTMAX)


def fused_decode_attention_o_reference(qkv, cos, sin, k_pages, v_pages, block_tables, lengths,
                                       slot_mapping, wo, *, scale=None):
    """jnp reference of `fused_decode_attention_o`: the attention reference, its output rounded to
    qkv's dtype, times each KV head's columns of `wo` in float32.

    Example:
        >>> qkv = jnp.ones((1, 4, 64)); cs = jnp.ones((1, 64)); pages = jnp.zeros((1, 2, 16, 64))
        >>> parts, kp, vp = fused_decode_attention_o_reference(
        ...     qkv, cs, cs, pages, pages, jnp.zeros((1, 2), jnp.int32), jnp.array([1], jnp.int32),
        ...     jnp.array([0], jnp.int32), jnp.ones((8, 128)))
        >>> parts.shape  # one KV head
        (1, 1, 8)
    """
    out, k_pages, v_pages = fused_decode_attention_reference(qkv, cos, sin, k_pages, v_pages, block_tables,
                                                             lengths, slot_mapping, scale=scale)
    kv_heads = k_pages.shape[0]
    batch, num_heads, head_dim = out.shape
    per_head = out.astype(jnp.float32).reshape(batch, kv_heads, (num_heads // kv_heads) * head_dim)
    w = wo.astype(jnp.float32).reshape(wo.shape[0], kv_heads, -1)
    parts = jnp.einsum("bhk,nhk->hbn", per_head, w, precision=lax.Precision.HIGHEST)
    return parts, k_pages, v_pages


def rope_reference(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x [batch, heads, D]` rotated by `cos/sin [batch, D]` in float32, back in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def fused_decode_attention_reference(qkv, cos, sin, k_pages, v_pages, block_tables, lengths,
                                     slot_mapping, *, scale=None, out_dtype=None):
    """jnp reference of `fused_decode_attention`: RoPE, scatter, then paged attention (qkv
    rounded to `out_dtype` first, where given).

    Example:
        >>> qkv = jnp.ones((1, 4, 64)); cs = jnp.ones((1, 64))
        >>> pages = jnp.zeros((1, 2, 16, 64))
        >>> out, kp, vp = fused_decode_attention_reference(
        ...     qkv, cs, cs, pages, pages, jnp.zeros((1, 2), jnp.int32),
        ...     jnp.array([1], jnp.int32), jnp.array([0], jnp.int32))
    """
    _check_args(qkv, cos, sin, k_pages, v_pages, block_tables, lengths, slot_mapping)
    qkv = qkv if out_dtype is None else qkv.astype(out_dtype)
    kv_heads = k_pages.shape[0]
    num_heads = qkv.shape[1] - 2 * kv_heads
    q = rope_reference(qkv[:, :num_heads], cos, sin)
    k = rope_reference(qkv[:, num_heads:num_heads + kv_heads], cos, sin)
    v = qkv[:, num_heads + kv_heads:]
    # Rows without a token write nothing (the kernel's rule), whatever their slot says.
    slots = jnp.where(lengths >= 1, slot_mapping, -1)
    k_pages, v_pages = cache_scatter_reference(k_pages, v_pages, k, v, slots)
    q = q.astype(compute_dtype(k_pages.dtype, qkv.dtype, k_pages.shape[-1]))
    out = paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, scale=scale)
    return out.astype(qkv.dtype), k_pages, v_pages
