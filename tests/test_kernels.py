"""Kernels against their jnp references on fresh random inputs.

CPU runs use Pallas interpret mode; the `gpu`-marked variants compile the same cases with
Triton (`pytest -m gpu` on the device). Every test draws a new seed and names it on
failure. Pages a sequence does not own, and slots past its length, are filled with NaN:
a kernel that reads them into its result fails. Interpret mode starts every kernel
output as NaN, so an element the kernel forgets to write fails the NaN checks too.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxserve_kernels
from jaxserve_kernels import cache_scatter, paged_attention, paged_prefill_attention

# The jnp references as one program each: run eagerly, every one of their few dozen ops compiles on its
# own for each new shape (~1-2 s a case on the CPU, against ~0.2 s for the whole reference).
paged_attention_reference = jax.jit(jaxserve_kernels.paged_attention_reference, static_argnames=("scale",))
paged_prefill_attention_reference = jax.jit(jaxserve_kernels.paged_prefill_attention_reference,
                                            static_argnames=("scale",))
cache_scatter_reference = jax.jit(jaxserve_kernels.cache_scatter_reference)

MODES = [pytest.param(None, id="interpret-on-cpu"),
         pytest.param(False, id="compiled", marks=pytest.mark.gpu)]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# A whole bf16 decode step (two layers, each rounding its activations to bf16) against the float32 model, or
# against another route whose residual stream is float32 where this one's is bf16: the roundings compound past one
# kernel's 2e-2 (tests/test_lora.py's step: 0.6-1.9% in 100 seeds, 2.07% once in CI; test_skinny_matmul_mgpu's
# model steps up to 1.55% in 41 seeds, a fit's failure odds at 2e-2 ~3e-3 a run, at 3e-2 ~1e-5).
STEP_TOLERANCE_BF16 = 3e-2


def interpreted_and_compiled(interpreted: list[tuple], compiled: list[tuple] | None = None) -> list:
    """`(interpret, *case)` params: the cases interpreted on the CPU and compiled on the GPU (`-m gpu`), or there
    `compiled` instead: a full-size shape the GPU compiles can be interpreted at a size that takes the same paths."""
    def case_id(case: tuple) -> str:
        return "-".join(getattr(v, "__name__", str(v)) for v in case)

    return ([pytest.param(None, *case, id=f"{case_id(case)}-interpret-on-cpu") for case in interpreted]
            + [pytest.param(False, *case, id=f"{case_id(case)}-compiled", marks=pytest.mark.gpu)
               for case in (interpreted if compiled is None else compiled)])


def fresh_rng() -> tuple[np.random.Generator, int]:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    return np.random.default_rng(seed), seed


def relative_error(out, ref) -> float:
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))


def make_pool(rng, *, kv_heads, head_dim, page_size, num_pages, dtype):
    shape = (kv_heads, num_pages, page_size, head_dim)
    return (jnp.asarray(rng.standard_normal(shape), dtype),
            jnp.asarray(rng.standard_normal(shape), dtype))


def make_sequences(rng, *, batch, page_size, table_pages, num_pages, lengths):
    """Random non-contiguous page tables; every page nobody owns is NaN-poisoned later."""
    table = rng.permutation(num_pages)[: batch * table_pages].reshape(batch, table_pages)
    return jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32)


def poison_unowned(pages, table, lengths, page_size):
    """NaN in every slot that is not within some sequence's length."""
    kv_heads, num_pages, _, head_dim = pages.shape
    owned = np.zeros((num_pages, page_size), bool)
    for row, length in zip(np.asarray(table), np.asarray(lengths)):
        for slot in range(int(length)):
            owned[row[slot // page_size], slot % page_size] = True
    return jnp.where(jnp.asarray(owned)[None, :, :, None], pages, jnp.nan)


def ragged_lengths(rng, batch, page_size, max_len):
    """0, 1, one page, one page + 1 and the maximum first, then random lengths."""
    special = [0, 1, page_size, page_size + 1, max_len]
    rest = rng.integers(0, max_len + 1, size=max(0, batch - len(special)))
    return np.concatenate([special, rest])[:batch]


# (num_heads, kv_heads, head_dim, page_size, dtype, num_splits, pages_per_block): a
# sample of the sweep (GQA 1/2/7/8, head_dim 64/128, page 8/16/32, splits 1..3), not
# the full product, to keep interpret mode fast.
DECODE_CASES = [
    (14, 2, 64, 16, jnp.bfloat16, 1, 2),
    (14, 2, 64, 8, jnp.float32, 3, 2),
    (28, 4, 128, 16, jnp.float32, 2, 1),
    (8, 1, 64, 32, jnp.bfloat16, 2, 1),
    (4, 2, 128, 8, jnp.bfloat16, 1, 4),
    (4, 4, 64, 16, jnp.float32, None, None),
    # One iteration wider than the 5-page table: the shape of the single-pass rule
    # (SINGLE_PASS_KEYS), whose table loads and keys past the table's end are masked.
    (14, 2, 64, 16, jnp.bfloat16, 1, 8),
    # Groups of 5 query heads a KV head (Qwen2.5-14B / 32B: 40 / 8).
    (10, 2, 128, 16, jnp.float32, 2, 1),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,page_size,dtype,num_splits,ppb,v_mask",
                         [(*case, "redirect") for case in DECODE_CASES]  # the default
                         + [(*DECODE_CASES[i], "where") for i in (0, 1, 3)])
def test_decode_matches_reference_on_ragged_paged_batch(
        interpret, num_heads, kv_heads, head_dim, page_size, dtype, num_splits, ppb, v_mask):
    rng, seed = fresh_rng()
    batch, table_pages = 6, 5
    num_pages = batch * table_pages + 3
    max_len = table_pages * page_size
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim,
                                 page_size=page_size, num_pages=num_pages, dtype=dtype)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages,
                                    lengths=ragged_lengths(rng, batch, page_size, max_len))
    k_pages = poison_unowned(k_pages, table, lengths, page_size)
    v_pages = poison_unowned(v_pages, table, lengths, page_size)
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), dtype)

    out = paged_attention(q, k_pages, v_pages, table, lengths, interpret=interpret,
                          num_splits=num_splits, pages_per_block=ppb, v_mask=v_mask)
    ref = paged_attention_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                    v_pages.astype(jnp.float32), table, lengths)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0,
                                  err_msg=f"length-0 row not zero, seed={seed}")


def ragged_decode_case(case: int, q_scale: float = 1.0):
    """A decode batch of `DECODE_CASES[case]`'s shape: 6 ragged rows (the first of length 0) over 5-page
    tables in a NaN-poisoned pool; returns `(q, k_pages, v_pages, table, lengths)`, the seed and the case's
    splits and pages an iteration."""
    num_heads, kv_heads, head_dim, page_size, dtype, num_splits, ppb = DECODE_CASES[case]
    rng, seed = fresh_rng()
    batch, table_pages = 6, 5
    num_pages = batch * table_pages + 3
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim,
                                 page_size=page_size, num_pages=num_pages, dtype=dtype)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages,
                                    lengths=ragged_lengths(rng, batch, page_size, table_pages * page_size))
    k_pages = poison_unowned(k_pages, table, lengths, page_size)
    v_pages = poison_unowned(v_pages, table, lengths, page_size)
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)) * q_scale, dtype)
    return (q, k_pages, v_pages, table, lengths), seed, num_splits, ppb


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case,num_splits", [(1, 3), (2, 2), (3, 2), (0, 5)])
def test_decode_merge_inside_the_kernel_matches_reference(interpret, case, num_splits):
    """combine="inkernel": the last split of a (sequence, KV head) merges; more splits than a
    short row fills leave some empty (never read). Two calls in one jit: the arrival counters
    must come back to zero."""
    (q, k_pages, v_pages, table, lengths), seed, _, _ = ragged_decode_case(case)
    dtype = DECODE_CASES[case][4]
    attend = functools.partial(paged_attention, interpret=interpret, num_splits=num_splits,
                               pages_per_block=1, combine="inkernel")

    @jax.jit
    def twice(q):
        first = attend(q, k_pages, v_pages, table, lengths)
        return first, attend(first, k_pages, v_pages, table, lengths)

    first, second = twice(q)
    ref = paged_attention_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                    v_pages.astype(jnp.float32), table, lengths)
    ref2 = paged_attention_reference(first.astype(jnp.float32), k_pages.astype(jnp.float32),
                                     v_pages.astype(jnp.float32), table, lengths)
    for out, r in ((first, ref), (second, ref2)):
        assert out.shape == q.shape and out.dtype == q.dtype
        assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
        assert relative_error(out, r) <= TOLERANCE[dtype], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(second[0], np.float32), 0.0,
                                  err_msg=f"length-0 row not zero, seed={seed}")


@pytest.mark.parametrize("interpret", MODES)
def test_decode_split_combine_inside_jit_with_custom_scale(interpret):
    rng, seed = fresh_rng()
    batch, heads, kv_heads, head_dim, page_size, table_pages = 3, 14, 2, 64, 16, 8
    num_pages = batch * table_pages
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim,
                                 page_size=page_size, num_pages=num_pages, dtype=jnp.float32)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages,
                                    lengths=[table_pages * page_size, 37, 0])
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), jnp.float32)
    step = jax.jit(functools.partial(paged_attention, scale=0.3, interpret=interpret,
                                     num_splits=4, pages_per_block=1))
    out = step(q, k_pages, v_pages, table, lengths)
    ref = paged_attention_reference(q, k_pages, v_pages, table, lengths, scale=0.3)
    assert relative_error(out, ref) <= 1e-5, f"seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
def test_decode_float32_queries_over_bfloat16_pool_return_float32(interpret):
    rng, seed = fresh_rng()
    batch, heads, kv_heads, head_dim, page_size, table_pages = 3, 14, 2, 64, 16, 3
    num_pages = batch * table_pages
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim,
                                 page_size=page_size, num_pages=num_pages, dtype=jnp.bfloat16)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages,
                                    lengths=[0, 17, 48])
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), jnp.float32)
    out = paged_attention(q, k_pages, v_pages, table, lengths, interpret=interpret)
    ref = paged_attention_reference(q, k_pages.astype(jnp.float32),
                                    v_pages.astype(jnp.float32), table, lengths)
    assert out.dtype == jnp.float32
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"


# (num_heads, kv_heads, head_dim, page_size, dtype, q_len, block_rows, num_splits)
PREFILL_CASES = [
    (14, 2, 64, 16, jnp.bfloat16, 12, 64, 1),
    (14, 2, 64, 8, jnp.float32, 9, 16, 2),
    (16, 2, 128, 16, jnp.float32, 5, 32, 1),
    (2, 2, 64, 32, jnp.bfloat16, 20, 16, 3),
    (10, 2, 128, 16, jnp.bfloat16, 12, 16, 2),   # groups of 5 (Qwen2.5-14B / 32B)
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,page_size,dtype,q_len,block_rows,splits",
                         PREFILL_CASES)
def test_prefill_chunk_attends_causally_to_prefix_and_itself(
        interpret, num_heads, kv_heads, head_dim, page_size, dtype, q_len, block_rows, splits):
    rng, seed = fresh_rng()
    table_pages = 4
    max_len = table_pages * page_size
    # Rows: a fresh prompt, a chunk after a cached prefix, a chunk padded past its
    # length, a row that is all padding, a chunk ending exactly at the table's end.
    q_start = np.array([0, page_size + 1, max_len - q_len // 2, 0, max_len - q_len])
    lengths = np.array([q_len, page_size + 1 + q_len, max_len, 0, max_len])
    batch = len(lengths)
    num_pages = batch * table_pages + 1
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim,
                                 page_size=page_size, num_pages=num_pages, dtype=dtype)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages,
                                    lengths=lengths)
    k_pages = poison_unowned(k_pages, table, lengths, page_size)
    v_pages = poison_unowned(v_pages, table, lengths, page_size)
    q = jnp.asarray(rng.standard_normal((batch, q_len, num_heads, head_dim)), dtype)
    q_start = jnp.asarray(q_start, jnp.int32)

    out = paged_prefill_attention(q, k_pages, v_pages, table, q_start, lengths,
                                  interpret=interpret, block_rows=block_rows,
                                  num_splits=splits, pages_per_block=2)
    ref = paged_prefill_attention_reference(
        q.astype(jnp.float32), k_pages.astype(jnp.float32), v_pages.astype(jnp.float32),
        table, q_start, lengths)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    padding = np.asarray(q_start)[:, None] + np.arange(q_len)[None] >= np.asarray(lengths)[:, None]
    np.testing.assert_array_equal(np.asarray(out, np.float32)[padding], 0.0,
                                  err_msg=f"padding queries not zero, seed={seed}")


@pytest.mark.parametrize("interpret", MODES)
def test_prefill_of_one_query_equals_decode(interpret):
    rng, seed = fresh_rng()
    batch, heads, kv_heads, head_dim, page_size, table_pages = 4, 14, 2, 64, 8, 3
    num_pages = batch * table_pages
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim,
                                 page_size=page_size, num_pages=num_pages, dtype=jnp.float32)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages,
                                    lengths=[1, 8, 9, 24])
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), jnp.float32)
    decode = paged_attention(q, k_pages, v_pages, table, lengths, interpret=interpret)
    prefill = paged_prefill_attention(q[:, None], k_pages, v_pages, table, lengths - 1,
                                      lengths, interpret=interpret)
    assert relative_error(prefill[:, 0], decode) <= 1e-5, f"seed={seed}"


def scatter_case(rng, *, tokens, kv_heads, head_dim, page_size, num_pages, dtype, padding):
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim,
                                 page_size=page_size, num_pages=num_pages, dtype=dtype)
    slots = rng.permutation(num_pages * page_size)[:tokens].astype(np.int32)
    slots[rng.random(tokens) < padding] = -1
    k = jnp.asarray(rng.standard_normal((tokens, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((tokens, kv_heads, head_dim)), dtype)
    return k_pages, v_pages, k, v, jnp.asarray(slots)


def assert_scattered(old, new, rows, slots, seed):
    """Each written slot holds its token's row; every other slot is unchanged."""
    old, new, rows = (np.asarray(a, np.float32) for a in (old, new, rows))
    kv_heads, num_pages, page_size, head_dim = old.shape
    old = old.reshape(kv_heads, -1, head_dim)
    new = new.reshape(kv_heads, -1, head_dim)
    slots = np.asarray(slots)
    written = slots[slots >= 0]
    np.testing.assert_array_equal(new[:, written], np.swapaxes(rows[slots >= 0], 0, 1),
                                  err_msg=f"seed={seed}")
    untouched = np.ones(new.shape[1], bool)
    untouched[written] = False
    np.testing.assert_array_equal(new[:, untouched], old[:, untouched],
                                  err_msg=f"seed={seed}")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("tokens,kv_heads,head_dim,page_size,dtype,padding", [
    (5, 2, 64, 16, jnp.bfloat16, 0.3),     # a decode step, some rows padding
    (200, 4, 128, 8, jnp.float32, 0.1),    # a prefill's worth of tokens
    (33, 1, 64, 32, jnp.bfloat16, 0.0),
])
def test_scatter_writes_each_slot_and_nothing_else(interpret, tokens, kv_heads, head_dim,
                                                   page_size, dtype, padding):
    rng, seed = fresh_rng()
    k_pages, v_pages, k, v, slots = scatter_case(
        rng, tokens=tokens, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size,
        num_pages=tokens // page_size + 3, dtype=dtype, padding=padding)
    new_k, new_v = cache_scatter(k_pages, v_pages, k, v, slots, interpret=interpret)
    assert_scattered(k_pages, new_k, k, slots, seed)
    assert_scattered(v_pages, new_v, v, slots, seed)
    ref_k, ref_v = cache_scatter_reference(k_pages, v_pages, k, v, slots)
    np.testing.assert_array_equal(np.asarray(new_k, np.float32), np.asarray(ref_k, np.float32))
    np.testing.assert_array_equal(np.asarray(new_v, np.float32), np.asarray(ref_v, np.float32))


@pytest.mark.parametrize("interpret", MODES)
def test_scatter_runs_in_place_under_jit_with_donation(interpret):
    rng, seed = fresh_rng()
    k_pages, v_pages, k, v, slots = scatter_case(
        rng, tokens=7, kv_heads=2, head_dim=64, page_size=16, num_pages=6,
        dtype=jnp.bfloat16, padding=0.2)
    old_k, old_v = np.asarray(k_pages, np.float32), np.asarray(v_pages, np.float32)
    step = jax.jit(functools.partial(cache_scatter, interpret=interpret), donate_argnums=(0, 1))
    hlo = step.lower(k_pages, v_pages, k, v, slots).compile().as_text()
    assert "input_output_alias" in hlo, "the pools are not aliased to the outputs"
    k_pointer = k_pages.unsafe_buffer_pointer()
    new_k, new_v = step(k_pages, v_pages, k, v, slots)
    assert k_pages.is_deleted(), "the donated pool was not consumed"
    assert new_k.unsafe_buffer_pointer() == k_pointer, "the pool was copied"
    assert_scattered(old_k, new_k, k, slots, seed)
    assert_scattered(old_v, new_v, v, slots, seed)


def test_shape_errors_name_the_field():
    q = jnp.zeros((2, 6, 64))
    pages = jnp.zeros((4, 3, 16, 64))
    with pytest.raises(ValueError, match="num_heads"):
        paged_attention(q, pages, pages, jnp.zeros((2, 2), jnp.int32), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        cache_scatter(pages, pages, jnp.zeros((3, 4, 64)), jnp.zeros((3, 4, 64)),
                      jnp.zeros(2, jnp.int32))
    q = jnp.zeros((2, 8, 64))
    for knob in ("v_mask", "combine"):
        with pytest.raises(ValueError, match=knob):
            paged_attention(q, pages, pages, jnp.zeros((2, 2), jnp.int32), jnp.zeros(2, jnp.int32),
                            **{knob: "fast"})


def test_decode_tuning_defaults_short_tables_and_head_dims():
    """Short decode tables that would split run unsplit in one pass; head_dim 64 splits twice as far as 128;
    explicit knobs and prefill (no `single_pass`) keep the general rule."""
    from jaxserve_kernels.paged_attention import SINGLE_PASS_KEYS, resolve_tuning

    pages = SINGLE_PASS_KEYS // 16
    assert resolve_tuning(16, pages, 2, None, None, False, 128, single_pass=True) == (pages, 1)
    assert resolve_tuning(16, pages + 1, 2, None, None, False, 128, single_pass=True)[1] > 1
    # Enough rows that the defaults would not split: the iteration size stays.
    assert resolve_tuning(16, pages, 512, None, None, False, 128, single_pass=True) == (8, 1)
    assert resolve_tuning(16, pages, 2, None, None, False, 128)[1] == 2
    assert resolve_tuning(16, pages, 2, None, 2, False, 128, single_pass=True) == (8, 2)
    wide = dict(page_size=16, table_pages=128, programs=128, pages_per_block=None, num_splits=None,
                interpret=False, block_keys=128)
    assert resolve_tuning(**wide, head_dim=128) == (8, 2)
    assert resolve_tuning(**wide, head_dim=64) == (8, 4)


def test_decode_two_block_splits_retile_only_at_head_dim_128():
    """`RETILE_TWO_BLOCK_SPLITS`: a split of exactly two blocks at head_dim >= 128 becomes two splits of two
    half blocks; one or four blocks a split, head_dim 64, and an unsplit row keep the defaults."""
    from jaxserve_kernels.paged_attention import retile_two_block_splits

    assert retile_two_block_splits(128, 8, 8, 128) == (4, 16)
    assert retile_two_block_splits(128, 8, 8, 256) == (4, 16)
    assert retile_two_block_splits(512, 8, 64, 128) == (8, 64)
    assert retile_two_block_splits(2048, 8, 64, 128) == (8, 64)
    assert retile_two_block_splits(128, 8, 8, 64) == (8, 8)
    assert retile_two_block_splits(16, 8, 1, 128) == (8, 1)
    assert retile_two_block_splits(4, 1, 2, 128) == (1, 2)


def check_7b_decode_compiled(batch: int, table_pages: int, page_size: int = 16) -> None:
    """7B heads (28 / 4 / 128), bf16, with the kernel's default tuning, compiled: ragged rows (one of length 0) over a
    NaN-poisoned pool against the float32 reference."""
    rng, seed = fresh_rng()
    num_heads, kv_heads, head_dim = 28, 4, 128
    num_pages = batch * table_pages + 5
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size,
                                 num_pages=num_pages, dtype=jnp.bfloat16)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size, table_pages=table_pages,
                                    num_pages=num_pages,
                                    lengths=ragged_lengths(rng, batch, page_size, table_pages * page_size))
    k_pages = poison_unowned(k_pages, table, lengths, page_size)
    v_pages = poison_unowned(v_pages, table, lengths, page_size)
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), jnp.bfloat16)

    out = paged_attention(q, k_pages, v_pages, table, lengths, interpret=False)
    ref = paged_attention_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                    v_pages.astype(jnp.float32), table, lengths)
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0, err_msg=f"length-0 row not zero, seed={seed}")


@pytest.mark.gpu
def test_decode_retiled_two_block_splits_match_reference_compiled():
    # 7B heads at batch 8 x 2k keys: the defaults' 8 splits of two 128-key blocks run as 16 splits of two
    # 64-key blocks (`RETILE_TWO_BLOCK_SPLITS`). Compiled only: interpret mode never splits.
    from jaxserve_kernels.paged_attention import DECODE_BLOCK_KEYS, resolve_tuning, retile_two_block_splits

    tuning = resolve_tuning(16, 128, 8 * 4, None, None, False, DECODE_BLOCK_KEYS, head_dim=128, single_pass=True)
    assert retile_two_block_splits(128, *tuning, 128) == (4, 16)
    check_7b_decode_compiled(batch=8, table_pages=128)


@pytest.mark.gpu
def test_decode_long_loops_on_three_stages_match_reference_compiled():
    # 7B heads, unsplit rows of 32+ key blocks: three pipeline stages (`LONG_LOOP_BLOCKS`).
    from jaxserve_kernels.paged_attention import DECODE_BLOCK_KEYS, default_num_stages, resolve_tuning

    tuning = resolve_tuning(16, 320, 64 * 4, None, None, False, DECODE_BLOCK_KEYS, head_dim=128, single_pass=True)
    assert tuning == (8, 1) and default_num_stages(320, *tuning, 128) == 3
    check_7b_decode_compiled(batch=64, table_pages=320)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case,v_mask", [(0, "redirect"), (1, "redirect"), (2, "redirect"), (3, "where"),
                                         (5, "redirect"), (6, "redirect")])
def test_decode_lean_softmax_matches_reference(interpret, case, v_mask, monkeypatch):
    """`LEAN_SOFTMAX` (no select after the exponential) and `FTZ_EXP2` (one ex2.approx.ftz an
    exponential, compiled) on: the same tolerance against the float32 reference, no NaN from the
    poisoned slots, length-0 rows still zero, splits and the single-pass table included."""
    pa = importlib.import_module("jaxserve_kernels.paged_attention")
    monkeypatch.setattr(pa, "LEAN_SOFTMAX", True)
    monkeypatch.setattr(pa, "FTZ_EXP2", True)
    (q, k_pages, v_pages, table, lengths), seed, num_splits, ppb = ragged_decode_case(case, q_scale=3.0)
    dtype = DECODE_CASES[case][4]
    out = paged_attention(q, k_pages, v_pages, table, lengths, interpret=interpret,
                          num_splits=num_splits, pages_per_block=ppb, v_mask=v_mask)
    ref = paged_attention_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                    v_pages.astype(jnp.float32), table, lengths)
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0,
                                  err_msg=f"length-0 row not zero, seed={seed}")
