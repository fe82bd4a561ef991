"""The fused decode attention kernel (RoPE + cache write + paged attention) against its
jnp reference: fresh random inputs, NaN-poisoned pages (the new token's own slot
included, so reading it before it is written fails), ragged lengths, random page tables.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model import rope_tables
from jaxserve_kernels import decode_attention
from jaxserve_kernels.decode_attention import fused_decode_attention, fused_decode_attention_o
from tests.test_kernels import (DECODE_CASES, MODES, TOLERANCE, fresh_rng, make_pool, make_sequences,
                                poison_unowned, ragged_lengths, relative_error)

# The jnp references as one program each: run eagerly, every one of their few dozen ops compiles on its
# own for each new shape (~2 s a case on the CPU, against ~0.3 s for the whole reference).
fused_decode_attention_reference = jax.jit(decode_attention.fused_decode_attention_reference,
                                           static_argnames=("scale", "out_dtype"))
fused_decode_attention_o_reference = jax.jit(decode_attention.fused_decode_attention_o_reference,
                                             static_argnames=("scale",))


def fused_case(rng, *, batch, num_heads, kv_heads, head_dim, page_size, table_pages, dtype,
               lengths=None):
    num_pages = batch * table_pages + 3
    max_len = table_pages * page_size
    if lengths is None:
        lengths = ragged_lengths(rng, batch, page_size, max_len)
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim,
                                 page_size=page_size, num_pages=num_pages, dtype=dtype)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages,
                                    lengths=lengths)
    cached = jnp.maximum(lengths - 1, 0)
    # Only the keys before the new token hold data; its own slot is NaN until written.
    k_pages = poison_unowned(k_pages, table, cached, page_size)
    v_pages = poison_unowned(v_pages, table, cached, page_size)
    pos = np.asarray(cached)
    rows = np.arange(batch)
    slots = np.asarray(table)[rows, pos // page_size] * page_size + pos % page_size
    slots = jnp.asarray(np.where(np.asarray(lengths) >= 1, slots, -1), jnp.int32)
    # Positions far from 0 make RoPE's rotation matter; the tables are the model's own.
    cos, sin = rope_tables(jnp.asarray(pos + rng.integers(0, 5000)), head_dim, 1e6)
    qkv = jnp.asarray(rng.standard_normal((batch, num_heads + 2 * kv_heads, head_dim)), dtype)
    return qkv, cos, sin, k_pages, v_pages, table, lengths, slots


# Rotated K is RoPE in float32 then cast: the kernel's and the reference's float32 rounding may
# differ in the last bit and so, rarely, the bf16 result by one unit (seen once in ~70k elements).
BF16_ULP = 2.0 ** -7
# ... and where x * cos - y * sin nearly cancels (inputs ~N(0, 1), a result ~3e-7), a float32 rounding
# apart is many bf16 units of the small result: an absolute allowance of a few float32 units at the
# inputs' scale (seen once: 2.906e-7 against 2.980e-7, session 30's CI).
ROPE_ATOL = 2.0 ** -19


def assert_pools_equal(new, ref, seed, rtol: float = 0.0, atol: float = 0.0):
    """Equal pools (NaN poison in the same places), values within ``rtol`` / ``atol``."""
    np.testing.assert_allclose(np.asarray(new, np.float32), np.asarray(ref, np.float32), rtol=rtol, atol=atol,
                               equal_nan=True, err_msg=f"seed={seed}")


def assert_cache_written(k_new, v_new, k_ref, v_ref, dtype, seed) -> None:
    """The new tokens' rotated K and V are in their slots and nothing else in the pool changed (the NaN
    poison stays exactly where it was); K within RoPE's float32 rounding, V a copy, so bitwise."""
    if dtype == jnp.float32:
        assert_pools_equal(k_new, k_ref, seed, rtol=1e-6, atol=1e-6)
    else:
        assert_pools_equal(k_new, k_ref, seed, rtol=BF16_ULP, atol=ROPE_ATOL)
    assert_pools_equal(v_new, v_ref, seed)


@pytest.mark.parametrize("interpret", MODES)
# The decode kernel's sweep (GQA 1/2/7/8, head_dim 64/128, pages 8/16/32, with and without splits).
# The split cases again with the merge inside the kernel (combine="inkernel").
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,page_size,dtype,num_splits,ppb,combine",
                         [(*case, "pallas") for case in DECODE_CASES]
                         + [(*DECODE_CASES[i], "inkernel") for i in (1, 2, 3)])
def test_fused_decode_matches_rope_scatter_attention_reference(
        interpret, num_heads, kv_heads, head_dim, page_size, dtype, num_splits, ppb, combine):
    rng, seed = fresh_rng()
    args = fused_case(rng, batch=6, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                      page_size=page_size, table_pages=5, dtype=dtype)
    out, k_new, v_new = fused_decode_attention(*args, interpret=interpret, num_splits=num_splits,
                                               pages_per_block=ppb, combine=combine)
    ref, k_ref, v_ref = fused_decode_attention_reference(*args)
    # The attention reference in float32 over the pool the reference scatter wrote.
    exact, _, _ = fused_decode_attention_reference(
        args[0].astype(jnp.float32), *args[1:3], k_ref.astype(jnp.float32),
        v_ref.astype(jnp.float32), *args[5:7], jnp.full_like(args[7], -1))
    assert out.shape == (6, num_heads, head_dim) and out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, exact) <= TOLERANCE[dtype], f"seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0,
                                  err_msg=f"length-0 row not zero, seed={seed}")
    assert_cache_written(k_new, v_new, k_ref, v_ref, dtype, seed)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_splits,combine", [(1, "pallas"), (2, "pallas"), (2, "inkernel"), (3, "xla")])
def test_fused_decode_live_rows_compute_only_the_rows_before_them(interpret, num_splits, combine):
    """`live_rows` (a batch padded for its projections): the first rows match the reference as in a call of their
    own, and the rows past them run nothing: given real lengths and slots here, their slots stay unwritten."""
    rng, seed = fresh_rng()
    args = fused_case(rng, batch=6, num_heads=14, kv_heads=2, head_dim=64, page_size=16, table_pages=5,
                      dtype=jnp.bfloat16)
    live = 3
    out, k_new, v_new = fused_decode_attention(*args, interpret=interpret, num_splits=num_splits,
                                               pages_per_block=1, combine=combine, live_rows=live)
    only_live = np.where(np.arange(6) < live, np.asarray(args[7]), -1)
    ref, k_ref, v_ref = fused_decode_attention_reference(*args[:7], jnp.asarray(only_live, jnp.int32))
    assert out.shape == (6, 14, 64)
    assert not np.isnan(np.asarray(out[:live], np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out[:live], ref[:live]) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
    assert_cache_written(k_new, v_new, k_ref, v_ref, jnp.bfloat16, seed)
    with pytest.raises(ValueError, match="live_rows"):
        fused_decode_attention(*args, interpret=interpret, live_rows=7)


@pytest.mark.parametrize("interpret", MODES)
# Qwen2.5-0.5B's heads with 4 rank-16 slots (T 128), groups of 1 and 8, rank 8 in a wider stack, float32
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,dtype,rank,width,live", [
    (14, 2, 64, jnp.bfloat16, 16, 128, None), (14, 2, 64, jnp.bfloat16, 16, 128, 4), (4, 4, 64, jnp.bfloat16, 16, 64,
                                                                                          None),
    (16, 2, 128, jnp.bfloat16, 8, 128, None), (8, 2, 64, jnp.float32, 16, 64, None)])
def test_fused_decode_writes_o_projs_lora_shrink(interpret, num_heads, kv_heads, head_dim, dtype, rank, width, live,
                                                 monkeypatch):
    """``shrink``: each row's KV-head parts of ``out @ a_cols.T``, in its slot's columns only (rows of no slot: all
    zero), against the reference on the kernel's own output and on the float32 reference attention's; a split call
    gives None and the same attention. The stack rows loaded before the attention, or after it (the live-rows and
    float32 cases)."""
    rng, seed = fresh_rng()
    monkeypatch.setattr(decode_attention, "SHRINK_PREFETCH", live is None and dtype == jnp.bfloat16)
    batch = 6
    args = fused_case(rng, batch=batch, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, page_size=16,
                      table_pages=5, dtype=dtype)
    a_cols = jnp.asarray(rng.standard_normal((width, num_heads * head_dim)) * 0.2, dtype)
    slots = jnp.asarray(rng.permutation([0, width // rank - 1, -1] + list(rng.integers(-1, width // rank, 3))),
                        jnp.int32)
    out, k_new, v_new, t = fused_decode_attention(*args, interpret=interpret, num_splits=1, live_rows=live,
                                                  shrink=(a_cols, slots, rank))
    rows = batch if live is None else live
    assert t.shape == (batch, kv_heads * width) and t.dtype == dtype, f"seed={seed}"
    t = np.asarray(t[:rows], np.float32)
    ref = np.asarray(decode_attention.attention_shrink_reference(out, a_cols, slots, rank, kv_heads)[:rows],
                     np.float32)
    exact_out, _, _ = fused_decode_attention_reference(*args, out_dtype=jnp.float32)
    exact = decode_attention.attention_shrink_reference(exact_out, a_cols.astype(jnp.float32), slots, rank,
                                                        kv_heads)[:rows]
    assert not np.isnan(t).any(), f"seed={seed}"
    mine = (np.arange(width)[None, :] // rank == np.asarray(slots[:rows])[:, None])
    mine = np.tile(mine, (1, kv_heads))
    np.testing.assert_array_equal(t[~mine], 0.0, err_msg=f"a column outside the row's slot, seed={seed}")
    attended = np.asarray(args[6][:rows])[:, None] >= 1  # a length-0 row's output is zeros, and so its shrink
    assert (t[mine & attended] != 0).all(), f"seed={seed}"
    assert relative_error(t, ref) <= TOLERANCE[dtype], f"seed={seed}"
    assert relative_error(t, exact) <= TOLERANCE[dtype], f"seed={seed}"
    # The attention and the pool as without it.
    plain, k_plain, v_plain = fused_decode_attention(*args, interpret=interpret, num_splits=1, live_rows=live)
    np.testing.assert_array_equal(np.asarray(out[:rows], np.float32), np.asarray(plain[:rows], np.float32))
    assert_pools_equal(k_new, k_plain, seed)
    assert_pools_equal(v_new, v_plain, seed)
    split = fused_decode_attention(*args, interpret=interpret, num_splits=2, shrink=(a_cols, slots, rank))
    assert split[3] is None and len(split) == 4


def test_fused_decode_shrink_errors_name_the_field():
    rng, _ = fresh_rng()
    args = fused_case(rng, batch=2, num_heads=4, kv_heads=2, head_dim=64, page_size=16, table_pages=2,
                      dtype=jnp.bfloat16)
    a, slots = jnp.zeros((64, 256), jnp.bfloat16), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="shrink's a_cols"):
        fused_decode_attention(*args, shrink=(a[:, :128], slots, 16))
    with pytest.raises(ValueError, match="shrink's slots"):
        fused_decode_attention(*args, shrink=(a, slots[:1], 16))
    with pytest.raises(ValueError, match="shrink's rank"):
        fused_decode_attention(*args, shrink=(a, slots, 0))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_fused_decode_of_a_float32_accumulator_into_bf16(interpret, num_splits):
    # The accumulating decode glue (model.ACCUMULATE) hands the kernel the QKV projection's float32
    # accumulator: rounded to bf16 first, as the bf16 projection output it replaces; out in bf16.
    rng, seed = fresh_rng()
    args = fused_case(rng, batch=5, num_heads=14, kv_heads=2, head_dim=64, page_size=16, table_pages=4,
                      dtype=jnp.bfloat16)
    qkv32 = jnp.asarray(rng.standard_normal(args[0].shape), jnp.float32)
    out, k_new, v_new = fused_decode_attention(qkv32, *args[1:], interpret=interpret, num_splits=num_splits,
                                               pages_per_block=1, out_dtype=jnp.bfloat16)
    ref, k_ref, v_ref = fused_decode_attention_reference(qkv32.astype(jnp.bfloat16), *args[1:])
    assert out.dtype == jnp.bfloat16 and not np.isnan(np.asarray(out, np.float32)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
    same, _, _ = fused_decode_attention_reference(qkv32, *args[1:], out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(same, np.float32), np.asarray(ref, np.float32))
    assert_pools_equal(k_new, k_ref, seed, rtol=BF16_ULP, atol=ROPE_ATOL)
    assert_pools_equal(v_new, v_ref, seed)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("combine", ["pallas", "inkernel"])
def test_fused_decode_in_place_under_jit_and_steps_chain(interpret, combine):
    """Three decode steps in a row, each reading the keys the last one wrote."""
    rng, seed = fresh_rng()
    qkv, cos, sin, k_pages, v_pages, table, lengths, slots = fused_case(
        rng, batch=3, num_heads=14, kv_heads=2, head_dim=64, page_size=16, table_pages=4,
        dtype=jnp.bfloat16, lengths=[1, 17, 40])
    step = jax.jit(functools.partial(fused_decode_attention, interpret=interpret,
                                     num_splits=2, pages_per_block=1, combine=combine),
                   donate_argnums=(3, 4))
    hlo = step.lower(qkv, cos, sin, k_pages, v_pages, table, lengths, slots).compile().as_text()
    assert "input_output_alias" in hlo, "the pools are not aliased to the outputs"
    ref_k, ref_v = k_pages, v_pages
    k_pages, v_pages = jnp.array(k_pages), jnp.array(v_pages)
    page_size = 16
    for _ in range(3):
        pointer = k_pages.unsafe_buffer_pointer()
        out, k_pages, v_pages = step(qkv, cos, sin, k_pages, v_pages, table, lengths, slots)
        assert k_pages.unsafe_buffer_pointer() == pointer, "the pool was copied"
        ref, ref_k, ref_v = fused_decode_attention_reference(qkv, cos, sin, ref_k, ref_v, table,
                                                             lengths, slots)
        assert relative_error(out, ref) <= 2e-2, f"seed={seed}"
        assert_pools_equal(k_pages, ref_k, seed, rtol=BF16_ULP, atol=ROPE_ATOL)
        lengths = lengths + 1
        pos = np.asarray(lengths) - 1
        slots = jnp.asarray(np.asarray(table)[np.arange(3), pos // page_size] * page_size
                            + pos % page_size, jnp.int32)
        qkv = jnp.asarray(rng.standard_normal(qkv.shape), qkv.dtype)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,page_size,table_pages,dtype,n_out,o_rows,prefetch", [
    (14, 2, 64, 16, 13, jnp.bfloat16, 896, 8, False),    # Qwen2.5-0.5B at batch-1 decode, 208 keys
    (14, 2, 64, 16, 13, jnp.bfloat16, 896, 16, True),    # Wo loaded before the attention
    (8, 1, 128, 8, 5, jnp.float32, 100, 16, False),      # GQA 8, N not a multiple of the rows
    (4, 4, 64, 32, 3, jnp.float32, 48, 4, True),         # no grouping
    (14, 2, 64, 16, 40, jnp.bfloat16, 64, 32, False),    # a table past 256 keys: several iterations
])
def test_fused_decode_o_matches_reference(interpret, num_heads, kv_heads, head_dim, page_size, table_pages,
                                          dtype, n_out, o_rows, prefetch):
    """The output projection folded into the fused attention: o_proj's per-KV-head partials."""
    rng, seed = fresh_rng()
    batch = 3
    args = fused_case(rng, batch=batch, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                      page_size=page_size, table_pages=table_pages, dtype=dtype,
                      lengths=[0, 1, int(rng.integers(2, table_pages * page_size + 1))])
    wo = jnp.asarray(rng.standard_normal((n_out, num_heads * head_dim)) / np.sqrt(num_heads * head_dim), dtype)
    parts, k_new, v_new = fused_decode_attention_o(*args, wo, interpret=interpret, o_rows=o_rows,
                                                   prefetch_wo=prefetch)
    ref, k_ref, v_ref = fused_decode_attention_o_reference(*args, wo)
    assert parts.shape == (kv_heads, batch, n_out) and parts.dtype == jnp.float32
    assert not np.isnan(np.asarray(parts)).any(), f"NaN in output, seed={seed}"
    assert relative_error(parts.sum(0), ref.sum(0)) <= TOLERANCE[dtype], f"seed={seed}"
    assert relative_error(parts, ref) <= TOLERANCE[dtype], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(parts[:, 0]), 0.0, err_msg=f"length-0 row not zero, seed={seed}")
    assert_cache_written(k_new, v_new, k_ref, v_ref, dtype, seed)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("o_proj", [False, True], ids=["attention", "with-o"])
def test_fused_decode_of_a_one_block_table_ignores_entries_past_each_row(interpret, o_proj):
    """A short table read in one iteration: entries past a row's pages name no page (huge or negative
    ids) and change nothing; rows of length 0 and 1 too."""
    rng, seed = fresh_rng()
    page_size, table_pages, batch = 16, 13, 7
    args = fused_case(rng, batch=batch, num_heads=14, kv_heads=2, head_dim=64, page_size=page_size,
                      table_pages=table_pages, dtype=jnp.bfloat16)
    table, lengths = np.asarray(args[5]), np.asarray(args[6])
    owned = np.arange(table_pages)[None, :] < -(-lengths[:, None] // page_size)
    garbage = np.where(rng.random(table.shape) < 0.5, 10**6 + 7, -5)
    bad_table = jnp.asarray(np.where(owned, table, garbage), jnp.int32)
    bad_args = (*args[:5], bad_table, *args[6:])
    if o_proj:
        wo = jnp.asarray(rng.standard_normal((128, 14 * 64)) / 30.0, jnp.bfloat16)
        out, k_new, v_new = fused_decode_attention_o(*bad_args, wo, interpret=interpret)
        ref, k_ref, v_ref = fused_decode_attention_o_reference(*args, wo)
        zero_row = np.asarray(out[:, lengths == 0])
    else:
        out, k_new, v_new = fused_decode_attention(*bad_args, interpret=interpret)
        ref, k_ref, v_ref = fused_decode_attention_reference(*args)
        zero_row = np.asarray(out[lengths == 0], np.float32)
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
    np.testing.assert_array_equal(zero_row, 0.0, err_msg=f"length-0 row not zero, seed={seed}")
    assert_pools_equal(k_new, k_ref, seed, rtol=BF16_ULP, atol=ROPE_ATOL)
    assert_pools_equal(v_new, v_ref, seed)


def outputs_with_flag_on_and_off(monkeypatch, flag: str, run, seed, exact: bool = True):
    """`run()` with `decode_attention.<flag>` on, then off: the same bits in every output (a flag that
    only reorders work), or with ``exact=False`` the pools within a bf16 unit (RoPE's cancellation
    allowance) and the output within one bf16 unit of relative error; returns the outputs with it on."""
    outs = []
    for value in (True, False):
        monkeypatch.setattr(decode_attention, flag, value)
        outs.append(run())
    for name, got, want in zip(("out", "k_pages", "v_pages"), *outs):
        if exact:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                          err_msg=f"{flag} {name}, seed={seed}")
        elif name == "out":
            assert relative_error(got, want) <= BF16_ULP, f"{flag} {name}, seed={seed}"
        else:
            assert_pools_equal(got, want, seed, rtol=BF16_ULP, atol=ROPE_ATOL)
    return outs[0]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,dtype,o_proj", [
    (14, 2, 64, jnp.bfloat16, False),    # Qwen2.5-0.5B: the key rides in row 7 of 16
    (14, 2, 64, jnp.bfloat16, True),     # the same with o_proj folded in
    (28, 4, 128, jnp.float32, False),    # 7B heads in float32
    # 7B and 1.5B heads in bf16 (tensor-core products; session 33's 7B 64-row and 1.5B 1-row hangs): for the
    # compiled run (`-m gpu`); interpreted they passed in session 33 and would add ~30 s to the CPU suite
    pytest.param(28, 4, 128, jnp.bfloat16, False, marks=pytest.mark.gpu),
    pytest.param(12, 2, 128, jnp.bfloat16, False, marks=pytest.mark.gpu),
    (4, 4, 64, jnp.bfloat16, False),     # no grouping: the key in row 1
    (16, 1, 64, jnp.bfloat16, False),    # a group that fills the tile: no free row, two products
])
def test_fused_decode_joint_rope_equals_two_products_bitwise(interpret, num_heads, kv_heads, head_dim, dtype,
                                                             o_proj, monkeypatch):
    """`ROPE_JOINT` (RoPE's matrix loaded, the new key rotated in the queries' product) against the
    matrix built in each program and two products: the same rows and products, so the same bits.
    With `LEAN_SOFTMAX` off: its scale multiplies the rotated rows in float32 before they are rounded,
    and on the CPU interpreter the two layouts then round apart now and then (one output row a bf16
    unit off in about one run of four, seed 1728193266; most likely the two programs' float32 chains
    compiled into different FMAs); the lean tests check both layouts against the reference.
    Interpreted, not even LEAN_SOFTMAX off keeps the bits: the new key rotated as row 1 of the queries'
    product and as row 0 of its own came out a bf16 unit apart where RoPE nearly cancels (k_pages
    2.14e-4 against 2.13e-4, seed 260809248, session 34's CI check; XLA's CPU dot rounds a row by its
    place in the tile), so there the two must agree within a bf16 unit, and bitwise only compiled."""
    monkeypatch.setattr(importlib.import_module("jaxserve_kernels.paged_attention"), "LEAN_SOFTMAX", False)
    rng, seed = fresh_rng()
    args = fused_case(rng, batch=5, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, page_size=16,
                      table_pages=4, dtype=dtype)
    wo = jnp.asarray(rng.standard_normal((96, num_heads * head_dim)) / 30.0, dtype)

    def run():
        if o_proj:
            return fused_decode_attention_o(*args, wo, interpret=interpret)
        return fused_decode_attention(*args, interpret=interpret, num_stages=1)

    joint = outputs_with_flag_on_and_off(monkeypatch, "ROPE_JOINT", run, seed, exact=interpret is False)
    ref = (fused_decode_attention_o_reference(*args, wo) if o_proj else fused_decode_attention_reference(*args))[0]
    assert relative_error(joint[0], ref) <= TOLERANCE[dtype], f"seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("o_proj,num_heads,kv_heads,head_dim,pages_per_block", [
    (False, 14, 2, 64, 2), (True, 14, 2, 64, 2),
    # 7B heads, the engine's 128-key blocks; 1.5B heads with o_proj folded in (session 33's hangs; compiled
    # only, as above)
    pytest.param(False, 28, 4, 128, 8, marks=pytest.mark.gpu),
    pytest.param(True, 12, 2, 128, 8, marks=pytest.mark.gpu),
])
def test_fused_decode_early_gather_equals_the_loop_bitwise(interpret, o_proj, num_heads, kv_heads, head_dim,
                                                           pages_per_block, monkeypatch):
    """`EARLY_GATHER` (unsplit one-stage steps: the first key block gathered before RoPE and the cache write)
    against the plain loop: the same blocks folded in the same order, so the same bits; a padding row whose table holds
    ids outside the pool (gathered early, then discarded) changes nothing."""
    rng, seed = fresh_rng()
    qkv, cos, sin, k_pages, v_pages, table, lengths, slots = fused_case(
        rng, batch=6, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, page_size=16, table_pages=10,
        dtype=jnp.bfloat16)
    assert int(lengths[0]) == 0  # ragged_lengths starts with a padding row
    table = table.at[0, :5].set(jnp.asarray([-7, 10 ** 6, 3, -1, 2], jnp.int32))
    args = (qkv, cos, sin, k_pages, v_pages, table, lengths, slots)
    wo = jnp.asarray(rng.standard_normal((64, num_heads * head_dim)) / 30.0, jnp.bfloat16)

    def run():
        if o_proj:
            return fused_decode_attention_o(*args, wo, interpret=interpret)
        return fused_decode_attention(*args, interpret=interpret, num_stages=1, num_splits=1,
                                      pages_per_block=pages_per_block)

    early = outputs_with_flag_on_and_off(monkeypatch, "EARLY_GATHER", run, seed)
    ref = (fused_decode_attention_o_reference(*args, wo) if o_proj else fused_decode_attention_reference(*args))[0]
    assert relative_error(early[0], ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"


def test_fused_decode_o_errors_name_the_field():
    qkv = jnp.zeros((1, 18, 64))
    pages = jnp.zeros((2, 4, 16, 64))
    args = (qkv, jnp.zeros((1, 64)), jnp.zeros((1, 64)), pages, pages, jnp.zeros((1, 2), jnp.int32),
            jnp.ones(1, jnp.int32), jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="wo must be"):
        fused_decode_attention_o(*args, jnp.zeros((896, 64)))
    with pytest.raises(ValueError, match="o_rows"):
        fused_decode_attention_o(*args, jnp.zeros((896, 896)), o_rows=3)


def test_fused_decode_shape_errors_name_the_field():
    qkv = jnp.zeros((2, 18, 64))
    pages = jnp.zeros((2, 4, 16, 64))
    table = jnp.zeros((2, 2), jnp.int32)
    ones = jnp.ones(2, jnp.int32)
    with pytest.raises(ValueError, match="cos"):
        fused_decode_attention(qkv, jnp.zeros((2, 32)), jnp.zeros((2, 64)), pages, pages, table,
                               ones, ones)
    with pytest.raises(ValueError, match="slot_mapping"):
        fused_decode_attention(qkv, jnp.zeros((2, 64)), jnp.zeros((2, 64)), pages, pages, table,
                               ones, jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="qkv"):
        fused_decode_attention(jnp.zeros((2, 64)), jnp.zeros((2, 64)), jnp.zeros((2, 64)), pages,
                               pages, table, ones, ones)


@pytest.mark.parametrize("impl,qkv_tiling,layout,projections", [
    ("pallas", {}, "kn", "pallas"), ("pallas-unfused", {}, "kn", "pallas"),
    # The QKV projection retiled (model.QKV_SKINNY_TILING): unsplit over two K blocks with its
    # bias in the kernel, and split in two with the sum and bias outside.
    ("pallas", {"num_splits": 1, "block_k": 32, "block_n": 32}, "kn", "pallas"),
    ("pallas", {"num_splits": 2, "block_k": 32}, "kn", "pallas"),
    # Projection weights stored [out, in] (model.WEIGHT_LAYOUT "nk"), through the skinny matmul
    # and through XLA's dots feeding the glue kernels (model.DECODE_PROJECTIONS "xla").
    ("pallas", {}, "nk", "pallas"),
    ("pallas", {}, "nk", "xla"),
    # Each norm folded into the projection after it (model.NORM_IN_PROJECTION; one-row steps).
    ("pallas", {}, "nk", "pallas+norm"),
    # Folded, with programs looping over weight blocks (skinny_matmul.NORM_GEMV_TILES) and the
    # one-row projections loading their next K block ahead (NK_GEMV_PREFETCH).
    ("pallas", {}, "nk", "pallas+norm+loop"),
    # Folded, and o_proj inside the fused attention kernel (model.O_IN_ATTENTION).
    ("pallas", {}, "nk", "pallas+norm+o"),
    # The same, the QKV projection also reading the attention's pages ahead of it (model.PREFETCH_KV).
    ("pallas", {}, "nk", "pallas+norm+touch+o"),
    # The same over three rows (model.FOLD_MAX_ROWS 4, opt-in: each program's weights multiply every row).
    ("pallas", {}, "nk", "pallas+norm+rows3+o"),
])
def test_model_decode_step_matches_dense_forward(impl, qkv_tiling, layout, projections, monkeypatch):
    # One paged decode step of the whole model (under "pallas": the fused attention kernel and
    # the skinny-matmul projections) against a dense forward pass over the same tokens; the
    # pages are filled by a paged prefill through the references.
    from jaxserve import model as model_module
    from jaxserve.config import ModelConfig
    from jaxserve.model import (PagedAttention, Qwen2ForCausalLM, convert_weight_layout, init_params,
                                new_kv_cache)

    monkeypatch.setattr(model_module, "QKV_SKINNY_TILING", qkv_tiling)
    monkeypatch.setattr(model_module, "WEIGHT_LAYOUT", layout)
    monkeypatch.setattr(model_module, "DECODE_PROJECTIONS", projections.split("+")[0])
    fold = "+norm" in projections
    monkeypatch.setattr(model_module, "NORM_IN_PROJECTION", fold)
    monkeypatch.setattr(model_module, "O_IN_ATTENTION", projections.endswith("+o"))
    monkeypatch.setattr(model_module, "PREFETCH_KV", "+touch" in projections)
    if projections.endswith("+o"):
        import importlib

        da = importlib.import_module("jaxserve_kernels.decode_attention")
        fused_o = []
        monkeypatch.setattr(da, "fused_decode_attention_o",
                            lambda *a, _f=da.fused_decode_attention_o, **k: fused_o.append(1) or _f(*a, **k))
    if projections.endswith("+loop"):
        import importlib

        sm = importlib.import_module("jaxserve_kernels.skinny_matmul")
        # Interpret mode's 64-row blocks: the MLP's 160 gate rows are 3 blocks over 2 programs.
        monkeypatch.setattr(sm, "NORM_GEMV_TILES", {"none": {"num_programs": 1}, "swiglu": {"num_programs": 2}})
        monkeypatch.setattr(sm, "NK_GEMV_PREFETCH", True)
    rng, seed = fresh_rng()
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
    model = Qwen2ForCausalLM(cfg, jnp.float32)
    # Jitted (init, the prefill, the step, the dense pass): run eagerly, every one of their few hundred ops
    # compiles on its own, ~20 s of this test's first case on the CPU.
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.key(int(rng.integers(1 << 30))))
    # Norm scales of 1 and biases of 0 (the init) would hide a fast path that skips them.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if "layernorm" in jax.tree_util.keystr(p) else x, params)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.standard_normal(x.shape) * 0.5, x.dtype)
        if "bias" in jax.tree_util.keystr(p) else x, params)
    if "+rows3" in projections:
        monkeypatch.setattr(model_module, "FOLD_MAX_ROWS", 4)
    # Norms fold into one-row steps by default (model.FOLD_MAX_ROWS), into three rows where the case asks.
    batch, page_size, width = (1 if fold and "+rows3" not in projections else 3), 8, 4
    lengths = np.array([5, 17, 9])[:batch]  # tokens before the decoded one
    if fold:
        import importlib

        sm = importlib.import_module("jaxserve_kernels.skinny_matmul")  # the package exports a function of that name
        folded = []
        monkeypatch.setattr(sm, "skinny_matmul_norm",
                            lambda *a, _f=sm.skinny_matmul_norm, **k: folded.append(1) or _f(*a, **k))
    tokens = rng.integers(0, cfg.vocab_size, (batch, lengths.max() + 1)).astype(np.int32)
    table = rng.permutation(batch * width).reshape(batch, width).astype(np.int32)
    kv = new_kv_cache(cfg, batch * width, page_size, jnp.float32)

    def slots(pos, valid):
        return jnp.where(valid, jnp.asarray(table)[np.arange(batch)[:, None], pos // page_size] * page_size
                         + pos % page_size, -1)

    s = lengths.max()
    pos = np.broadcast_to(np.arange(s), (batch, s))
    valid = pos < lengths[:, None]
    pre = PagedAttention(slots(pos, valid), jnp.asarray(table), jnp.asarray(lengths, jnp.int32),
                         jnp.zeros(batch, jnp.int32), impl="reference")
    _, kv = jax.jit(lambda params, kv: model.apply(
        {"params": params}, jnp.asarray(tokens[:, :s]), jnp.asarray(pos, jnp.int32),
        lengths=jnp.asarray(lengths, jnp.int32), kv=kv, paged=pre))(params, kv)
    new_tok = tokens[np.arange(batch), lengths][:, None]
    dec = PagedAttention(slots(lengths[:, None], np.ones((batch, 1), bool)), jnp.asarray(table),
                         jnp.asarray(lengths + 1, jnp.int32), jnp.asarray(lengths, jnp.int32), impl=impl)
    logits, _ = jax.jit(lambda params, kv: model.apply(
        {"params": params}, jnp.asarray(new_tok), jnp.asarray(lengths[:, None], jnp.int32),
        kv=kv, paged=dec))(params, kv)
    if fold:
        assert len(folded) == 2 * cfg.num_hidden_layers  # qkv and gate_up of every layer
    if projections.endswith("+o"):
        assert len(fused_o) == cfg.num_hidden_layers
    # The dense pass over every row's tokens at once: causal, so row b's logits at its position lengths[b]
    # see only its first lengths[b] + 1 tokens (one compile, not one a row length).
    dense_apply = jax.jit(lambda params, t: model.apply({"params": params}, t)[0])
    dense = dense_apply(params, jnp.asarray(tokens))
    for b in range(batch):
        assert relative_error(logits[b, 0], dense[b, lengths[b]]) <= 1e-4, f"row {b}, seed={seed}"
    if layout != "kn":  # the same weights in the default layout give the same logits
        monkeypatch.setattr(model_module, "WEIGHT_LAYOUT", "kn")
        kn_params = convert_weight_layout(params, layout, "kn")
        dense = jax.jit(lambda params, t: model.apply({"params": params}, t)[0])(
            kn_params, jnp.asarray(tokens[:1, : lengths[0] + 1]))
        assert relative_error(logits[0, 0], dense[0, -1]) <= 1e-4, f"seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case,combine,stages", [
    (0, "pallas", 1),      # 0.5B heads, unsplit, one stage: the early gather and the joint RoPE
    (1, "pallas", 2),      # float32, three splits
    (1, "inkernel", 2),    # the same merged in the kernel
    (2, "pallas", 1),      # 7B heads in float32, two splits
    (3, "pallas", 1),      # a group of 8 filling the tile: two products for RoPE
    (6, "pallas", 1),      # the single-pass table
])
def test_fused_decode_lean_softmax_matches_reference(interpret, case, combine, stages, monkeypatch):
    """`LEAN_SOFTMAX` (q rounded with the logits' scale in it, no select after the exponential) and
    `FTZ_EXP2` on: the reference's tolerance, no NaN from the poisoned pool (the new token's slot
    included), length-0 rows zero, the cache written as without them."""
    pa = importlib.import_module("jaxserve_kernels.paged_attention")
    monkeypatch.setattr(pa, "LEAN_SOFTMAX", True)
    monkeypatch.setattr(pa, "FTZ_EXP2", True)
    num_heads, kv_heads, head_dim, page_size, dtype, num_splits, ppb = DECODE_CASES[case]
    rng, seed = fresh_rng()
    args = fused_case(rng, batch=6, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                      page_size=page_size, table_pages=5, dtype=dtype)
    args = (args[0] * 3.0, *args[1:])  # logits of a few units: the scale matters
    out, k_new, v_new = fused_decode_attention(*args, interpret=interpret, num_splits=num_splits,
                                               pages_per_block=ppb, combine=combine, num_stages=stages)
    ref, k_ref, v_ref = fused_decode_attention_reference(*args)
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    # q rounded to bf16 with the scale in it is one rounding more than the reference makes (2^-9 of each logit, at
    # logits of a few units here): on case 3, 26 seeds gave a mean relative error of 0.0065 and at most 0.0219 with
    # it, at most 0.0071 without (session 50; seed 1480856930 the largest); float32 keeps its tolerance.
    tolerance = 3e-2 if dtype == jnp.bfloat16 else TOLERANCE[dtype]
    assert relative_error(out, ref) <= tolerance, f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0,
                                  err_msg=f"length-0 row not zero, seed={seed}")
    assert_cache_written(k_new, v_new, k_ref, v_ref, dtype, seed)


@pytest.mark.parametrize("interpret", MODES)
def test_fused_decode_o_lean_softmax_matches_reference(interpret, monkeypatch):
    """The one-row fused attention with o_proj folded in, `LEAN_SOFTMAX` and `FTZ_EXP2` on."""
    pa = importlib.import_module("jaxserve_kernels.paged_attention")
    monkeypatch.setattr(pa, "LEAN_SOFTMAX", True)
    monkeypatch.setattr(pa, "FTZ_EXP2", True)
    rng, seed = fresh_rng()
    args = fused_case(rng, batch=3, num_heads=14, kv_heads=2, head_dim=64, page_size=16, table_pages=5,
                      dtype=jnp.bfloat16)
    wo = jnp.asarray(rng.standard_normal((128, 14 * 64)) / 30.0, jnp.bfloat16)
    out, k_new, v_new = fused_decode_attention_o(*args, wo, interpret=interpret)
    ref, k_ref, v_ref = fused_decode_attention_o_reference(*args, wo)
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
    assert_pools_equal(k_new, k_ref, seed, rtol=BF16_ULP, atol=ROPE_ATOL)
    assert_pools_equal(v_new, v_ref, seed)


def test_split_calls_whose_table_loops_take_two_pipeline_stages(monkeypatch):
    """`decode_attention.default_num_stages`: a split call runs two stages when its table gives a split two or more key
    blocks (`SPLIT_TWO_STAGE_BLOCKS`), whatever the batch; one-block splits and small unsplit calls keep one."""
    import jaxserve_kernels.decode_attention as da

    assert da.default_num_stages(1, 2048, 64, 8) == 2      # 7B heads at batch 1, a 32k table: 4 blocks a split
    assert da.default_num_stages(8, 2048, 8, 8) == 2       # 7B heads at batch 8
    assert da.default_num_stages(1, 2048, 256, 8) == 1     # 0.5B heads at batch 1: one block a split
    assert da.default_num_stages(64, 16, 1, 16) == 1       # the single-pass table, unsplit: the early gather's stage
    assert da.default_num_stages(256, 16, 1, 16) == 2      # unsplit at UNSPLIT_TWO_STAGE_ROWS
    assert da.default_num_stages(128, 2048, 4, 8) == 2     # split at TWO_STAGE_ROWS
    monkeypatch.setattr(da, "SPLIT_TWO_STAGE_BLOCKS", 0)
    assert da.default_num_stages(1, 2048, 64, 8) == 1      # off: the batch rules alone
