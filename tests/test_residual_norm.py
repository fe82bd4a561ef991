"""The residual-add + RMSNorm kernel (decode glue) against its jnp reference on fresh random
inputs: 1..MAX_ROWS rows, widths that are not powers of two, with and without K-split
partials, float32 within 1e-5 and bfloat16 within 2e-2 relative of the float32 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels.residual_norm import add_rms_norm, add_rms_norm_reference
from jaxserve_kernels.skinny_matmul import MAX_ROWS
from tests.test_kernels import MODES, TOLERANCE, fresh_rng, relative_error

CASES = [  # (M, N, partial splits or None, dtype)
    (1, 896, 18, jnp.bfloat16),   # Qwen2.5-0.5B down_proj at batch 1
    (3, 70, 1, jnp.float32),
    (5, 130, None, jnp.float32),  # the first layer's norm: nothing to add
    (MAX_ROWS, 64, 7, jnp.bfloat16),
    (2, 200, 3, jnp.float32),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,n,splits,dtype", CASES)
def test_add_rms_norm_matches_reference(interpret, m, n, splits, dtype):
    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((m, n)) * 3, dtype)
    partials = None if splits is None else jnp.asarray(rng.standard_normal((splits, m, n)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, n), dtype)
    eps = float(rng.uniform(1e-6, 1e-5))
    new_hidden, normed = add_rms_norm(hidden, partials, scale, eps=eps, interpret=interpret)
    ref_hidden, ref_normed = add_rms_norm_reference(hidden.astype(jnp.float32), partials,
                                                    scale.astype(jnp.float32), eps=eps)
    for out, ref in ((new_hidden, ref_hidden), (normed, ref_normed)):
        assert out.shape == (m, n) and out.dtype == dtype
        assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
        assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    # Same-dtype reference: the kernel rounds where the reference (and Hugging Face) rounds.
    same = add_rms_norm_reference(hidden, partials, scale, eps=eps)
    assert relative_error(normed, same[1]) <= (1e-6 if dtype == jnp.float32 else 8e-3), f"seed={seed}"


def test_add_rms_norm_inside_jit_with_bf16_partials_cast():
    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((4, 96)), jnp.float32)
    partials = jnp.asarray(rng.standard_normal((2, 4, 96)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 96), jnp.float32)
    out = jax.jit(lambda h, p, s: add_rms_norm(h, p, s, eps=1e-6))(hidden, partials, scale)
    ref = add_rms_norm_reference(hidden, partials, scale, eps=1e-6)
    assert relative_error(out[1], ref[1]) <= 1e-5, f"seed={seed}"


def test_add_rms_norm_errors_name_the_field():
    with pytest.raises(ValueError, match="hidden"):
        add_rms_norm(jnp.zeros(8), None, jnp.ones(8), eps=1e-6)
    with pytest.raises(ValueError, match="partials"):
        add_rms_norm(jnp.zeros((2, 8)), jnp.zeros((3, 2, 9)), jnp.ones(8), eps=1e-6)
    with pytest.raises(ValueError, match="scale"):
        add_rms_norm(jnp.zeros((2, 8)), None, jnp.ones(7), eps=1e-6)


@pytest.mark.parametrize("interpret", MODES)
def test_add_rms_norm_with_four_warps(interpret):
    # 4 warps (the default before session 10) stays a choice: bench/decode_step.py --glue
    # norm_warps4 times it against the default, so it must compile and agree.
    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((1, 896)), jnp.bfloat16)
    partials = jnp.asarray(rng.standard_normal((18, 1, 896)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 896), jnp.bfloat16)
    out = add_rms_norm(hidden, partials, scale, eps=1e-6, interpret=interpret, num_warps=4)
    ref = add_rms_norm_reference(hidden, partials, scale, eps=1e-6)
    for a, b in zip(out, ref):
        assert relative_error(a, b) <= 8e-3, f"seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("seed_programs", [False, True])
@pytest.mark.parametrize("m,n,seed_n", [(64, 896, 1152), (5, 130, 40)])
def test_float32_stream_normed_to_bf16_with_a_seeded_accumulator(interpret, seed_programs, m, n, seed_n,
                                                                  monkeypatch):
    # The accumulating decode glue (model.ACCUMULATE): a float32 residual stream, normed into
    # bf16, and the next projection's accumulator started at its bias (every row of it, bitwise),
    # from each row's program or (SEED_PROGRAMS) from programs of its own.
    import importlib

    monkeypatch.setattr(importlib.import_module("jaxserve_kernels.residual_norm"), "SEED_PROGRAMS", seed_programs)
    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((m, n)) * 3, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(seed_n), jnp.bfloat16)
    out = add_rms_norm(hidden, None, scale, eps=1e-6, out_dtype=jnp.bfloat16, seed=bias, interpret=interpret)
    ref = add_rms_norm_reference(hidden, None, scale, eps=1e-6, out_dtype=jnp.bfloat16, seed=bias)
    assert len(out) == 3 and np.array_equal(np.asarray(out[0]), np.asarray(hidden))
    assert out[1].dtype == jnp.bfloat16 and out[2].dtype == jnp.float32 and out[2].shape == (m, seed_n)
    assert relative_error(out[1], ref[1]) <= 8e-3, f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(ref[2]), err_msg=f"seed={seed}")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("with_partials", [False, True])
def test_scale_loaded_first_gives_the_same_bits(interpret, with_partials, monkeypatch):
    # SCALE_FIRST only moves the norm weight's load to the top of a row's program.
    import importlib

    module = importlib.import_module("jaxserve_kernels.residual_norm")
    rng, seed = fresh_rng()
    dtype = jnp.bfloat16 if with_partials else jnp.float32
    hidden = jnp.asarray(rng.standard_normal((6, 200)) * 3, dtype)
    partials = jnp.asarray(rng.standard_normal((3, 6, 200)), jnp.float32) if with_partials else None
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 200), jnp.bfloat16)
    outs = []
    for first in (False, True):
        monkeypatch.setattr(module, "SCALE_FIRST", first)
        outs.append(add_rms_norm(hidden, partials, scale, eps=1e-6, out_dtype=jnp.bfloat16, interpret=interpret))
    for late, early in zip(*outs):
        np.testing.assert_array_equal(np.asarray(late, np.float32), np.asarray(early, np.float32), err_msg=f"seed={seed}")
    ref = add_rms_norm_reference(hidden, partials, scale, eps=1e-6, out_dtype=jnp.bfloat16)
    assert relative_error(outs[1][1], ref[1]) <= 8e-3, f"seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_warps", [1, 2])
def test_seeded_float32_stream_on_one_or_two_warps(interpret, num_warps):
    # bench/decode_step.py --glue norm_warps1 / norm_warps2 (session 28): the 64-row step's norm (a float32
    # stream, QKV's accumulator seeded) with its row's reduction inside one or two warps.
    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((64, 896)) * 3, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 896), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(1152), jnp.bfloat16)
    out = add_rms_norm(hidden, None, scale, eps=1e-6, out_dtype=jnp.bfloat16, seed=bias, interpret=interpret,
                       num_warps=num_warps)
    ref = add_rms_norm_reference(hidden, None, scale, eps=1e-6, out_dtype=jnp.bfloat16, seed=bias)
    assert np.array_equal(np.asarray(out[0]), np.asarray(hidden))
    assert relative_error(out[1], ref[1]) <= 8e-3, f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(ref[2]), err_msg=f"seed={seed}")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,n,slots,rank,seeded", [
    (64, 896, 4, 48, True),    # Qwen2.5-0.5B's QKV at rank 16 (q, k, v side by side), 4 slots
    (64, 896, 4, 32, False),   # its gate_up
    (8, 200, 3, 12, True),     # a rank that is no whole chunk
    (5, 130, 10, 4, False),    # the last slot's chunk would pass the stack's end: it starts earlier
    (9, 96, 2, 20, False),     # two chunks, the second partial
])
def test_norm_writes_each_rows_own_slot_lora_shrink(interpret, m, n, slots, rank, seeded):
    # model.LORA_NORM_SHRINK: the accumulating glue's norm also writes the next projection's LoRA shrink, each row's
    # normed row (as the norm stores it) times its own slot's rows of the folded stack, zeros in every other column
    # and in rows of no adapter (-1). Slots drawn so every slot (the last one too) and -1 appear.
    from jaxserve.lora import fold_columns

    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((m, n)) * 3, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.bfloat16)
    a = jnp.asarray(rng.standard_normal((slots, rank, n)) * 0.1, jnp.bfloat16)
    a_cols, _ = fold_columns(a, jnp.zeros((slots, rank, 8), jnp.bfloat16))
    row_slots = jnp.asarray(rng.permutation(np.resize(np.arange(-1, slots), m)), jnp.int32)
    bias = jnp.asarray(rng.standard_normal(40), jnp.bfloat16) if seeded else None
    kwargs = dict(eps=1e-6, out_dtype=jnp.bfloat16, seed=bias, shrink=(a_cols, row_slots, rank))
    out = add_rms_norm(hidden, None, scale, interpret=interpret, **kwargs)
    ref = add_rms_norm_reference(hidden, None, scale, **kwargs)
    t, t_ref = np.asarray(out[-1], np.float32), np.asarray(ref[-1], np.float32)
    assert len(out) == len(ref) == (4 if seeded else 3) and t.shape == (m, a_cols.shape[0])
    assert out[-1].dtype == jnp.bfloat16 and not np.isnan(t).any(), f"seed={seed}"
    mine = (np.arange(a_cols.shape[0]) // rank)[None, :] == np.asarray(row_slots)[:, None]
    assert not t[~mine].any(), f"a column outside the row's slot written, seed={seed}"
    assert np.abs(t[mine]).min() > 0, f"a slot column left zero, seed={seed}"
    assert relative_error(t, t_ref) <= 1e-2, f"seed={seed}"
    assert relative_error(out[1], ref[1]) <= 8e-3, f"seed={seed}"
    if seeded:
        np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(ref[2]), err_msg=f"seed={seed}")


def test_norm_shrink_errors_name_the_field():
    h, s = jnp.zeros((2, 32)), jnp.ones(32)
    with pytest.raises(ValueError, match="a_cols"):
        add_rms_norm(h, None, s, eps=1e-6, shrink=(jnp.zeros((128, 31)), jnp.zeros(2, jnp.int32), 4))
    with pytest.raises(ValueError, match="slots"):
        add_rms_norm(h, None, s, eps=1e-6, shrink=(jnp.zeros((128, 32)), jnp.zeros(3, jnp.int32), 4))
    with pytest.raises(ValueError, match="rank"):
        add_rms_norm(h, None, s, eps=1e-6, shrink=(jnp.zeros((128, 32)), jnp.zeros(2, jnp.int32), 0))
    with pytest.raises(ValueError, match="partials"):
        add_rms_norm(h, jnp.zeros((1, 2, 32)), s, eps=1e-6, shrink=(jnp.zeros((128, 32)), jnp.zeros(2, jnp.int32), 4))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,n,slots,rank,with_shrink", [
    (64, 896, 4, 16, True),    # Qwen2.5-0.5B's input norm: down_proj's term pending, QKV's shrink (R = 48) written
    (8, 200, 3, 12, False),    # a rank of no power of two
    (5, 130, 1, 12, True),     # one slot narrower than its power-of-two tile: the stack padded
    (9, 96, 16, 12, False),    # the last slot's tile would pass the stack's end: it starts earlier
])
def test_norm_adds_the_pending_lora_term_before_norming(interpret, m, n, slots, rank, with_shrink):
    # model.LORA_DOWN_SHRINK: down_proj leaves its adapters' float32 shrink sums; the next norm adds each row's term
    # (own slot's columns rounded to bf16, times that slot's expand rows) to the stream, writes the new stream and
    # norms it, its shrink programs norming the same row. Every other column of t holds garbage the kernel must not
    # read; slots drawn so every slot and -1 appear.
    from jaxserve.lora import fold_columns, fold_width
    from jaxserve_kernels.residual_norm import pending_term_reference

    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((m, n)) * 3, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.bfloat16)
    width = fold_width(slots * rank)
    t = jnp.asarray(rng.standard_normal((m, width)) * 2, jnp.float32)
    b_rows = jnp.asarray(rng.standard_normal((slots * rank, n)) * 0.1, jnp.bfloat16)
    row_slots = jnp.asarray(rng.permutation(np.resize(np.arange(-1, slots), m)), jnp.int32)
    shrink = None
    if with_shrink:
        a = jnp.asarray(rng.standard_normal((slots, 3 * rank, n)) * 0.1, jnp.bfloat16)
        shrink = (fold_columns(a, jnp.zeros((slots, 3 * rank, 8), jnp.bfloat16))[0], row_slots, 3 * rank)
    kwargs = dict(eps=1e-6, out_dtype=jnp.bfloat16, shrink=shrink, pending=(t, b_rows, row_slots, rank), zeros=width)
    out = add_rms_norm(hidden, None, scale, interpret=interpret, **kwargs)
    ref = add_rms_norm_reference(hidden, None, scale, **kwargs)
    assert len(out) == len(ref) == (4 if with_shrink else 3), f"seed={seed}"
    term = np.asarray(pending_term_reference(t, b_rows, row_slots, rank))
    assert not term[np.asarray(row_slots) < 0].any() and np.abs(term[np.asarray(row_slots) >= 0]).max() > 0
    assert relative_error(out[0], ref[0]) <= 1e-5, f"the new stream, seed={seed}"
    assert relative_error(out[1], ref[1]) <= 8e-3, f"seed={seed}"
    if with_shrink:
        assert relative_error(out[2], ref[2]) <= 1e-2, f"the shrink of the same normed rows, seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[-1]), np.zeros((m, width), np.float32), err_msg=f"seed={seed}")


def test_norm_pending_errors_name_the_field():
    h, s, slots = jnp.zeros((2, 32)), jnp.ones(32), jnp.zeros(2, jnp.int32)
    t, b = jnp.zeros((2, 128)), jnp.zeros((64, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="float32 stream"):
        add_rms_norm(h.astype(jnp.bfloat16), None, s, eps=1e-6, pending=(t, b, slots, 16))
    with pytest.raises(ValueError, match="pending's t"):
        add_rms_norm(h, None, s, eps=1e-6, pending=(t[:1], b, slots, 16))
    with pytest.raises(ValueError, match="b_rows"):
        add_rms_norm(h, None, s, eps=1e-6, pending=(t, b[:, :31], slots, 16))
    with pytest.raises(ValueError, match="pending's slots"):
        add_rms_norm(h, None, s, eps=1e-6, pending=(t, b, slots[:1], 16))
    with pytest.raises(ValueError, match="rank"):
        add_rms_norm(h, None, s, eps=1e-6, pending=(t, b, slots, 0))
    with pytest.raises(ValueError, match="zeros"):
        add_rms_norm(h, None, s, eps=1e-6, zeros=-1)
