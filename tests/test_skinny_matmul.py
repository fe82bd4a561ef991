"""The skinny-matmul kernel (decode projections) against its jnp reference on fresh random
inputs: row counts 1..MAX_ROWS and several row blocks, K and N that are not multiples of the tiles, with and
without bias and K splits, and its two epilogues (K-split partials, SwiGLU); float32 within
1e-5 and bfloat16 within 2e-2 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels.skinny_matmul import (MAX_ROWS, ROW_BLOCK, LoraTerm, default_tiling, lora_shrink,
                                            own_slot_columns, skinny_matmul, skinny_matmul_norm)
from jaxserve_kernels.skinny_matmul import skinny_matmul_norm_reference as _norm_reference
from jaxserve_kernels.skinny_matmul import skinny_matmul_reference as _reference
from tests.test_kernels import MODES, TOLERANCE, fresh_rng, interpreted_and_compiled, relative_error

# The references jitted whole (tests.test_kernels says why).
skinny_matmul_reference = jax.jit(_reference, static_argnames=("epilogue", "layout"))
skinny_matmul_norm_reference = jax.jit(_norm_reference, static_argnames=("eps", "epilogue"))

CASES = [  # (M, K, N, dtype, bias, num_splits, block_n, block_k)
    (1, 896, 1152, jnp.bfloat16, True, None, None, None),   # Qwen2.5-0.5B qkv at batch 1
    (1, 256, 200, jnp.float32, False, 1, 64, 128),
    (3, 200, 130, jnp.float32, True, 3, 32, 64),            # ragged K and N, uneven splits
    (16, 320, 96, jnp.bfloat16, False, 2, 64, 128),
    (MAX_ROWS, 150, 70, jnp.float32, True, None, None, None),
    (3 * ROW_BLOCK - 5, 200, 130, jnp.bfloat16, True, 2, 64, 64),  # three row blocks, the last ragged
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,k,n,dtype,with_bias,splits,bn,bk", CASES)
def test_skinny_matmul_matches_reference(interpret, m, k, n, dtype, with_bias, splits, bn, bk):
    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if with_bias else None
    out = skinny_matmul(x, w, bias, interpret=interpret, num_splits=splits, block_n=bn, block_k=bk)
    ref = skinny_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                  None if bias is None else bias.astype(jnp.float32))
    assert out.shape == (m, n) and out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"


EPILOGUE_CASES = [  # (epilogue, M, K, N, dtype, num_splits, block_n)
    ("partials", 1, 4864, 896, jnp.bfloat16, None, None),  # Qwen2.5-0.5B down_proj, 18 splits
    ("partials", 5, 200, 130, jnp.float32, 1, 32),
    ("partials", MAX_ROWS, 300, 64, jnp.float32, 3, None),
    ("swiglu", 1, 896, 2 * 4864, jnp.bfloat16, None, None),  # Qwen2.5-0.5B gate_up
    ("swiglu", 7, 200, 2 * 90, jnp.float32, None, None),      # ragged K, half not a tile multiple
    ("swiglu", MAX_ROWS, 64, 2 * 48, jnp.float32, 1, 16),
    ("partials", 4 * ROW_BLOCK, 896, 896, jnp.bfloat16, None, None),  # o_proj at batch 256
    ("swiglu", ROW_BLOCK + 1, 128, 2 * 96, jnp.float32, None, None),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("epilogue,m,k,n,dtype,splits,bn", EPILOGUE_CASES)
def test_skinny_matmul_epilogues_match_reference(interpret, epilogue, m, k, n, dtype, splits, bn):
    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    out = skinny_matmul(x, w, epilogue=epilogue, interpret=interpret, num_splits=splits, block_n=bn)
    ref = skinny_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), epilogue=epilogue)
    if epilogue == "partials":
        expected_splits = splits or default_tiling(m, k, n)[2]
        assert out.shape == (expected_splits, m, n) and out.dtype == jnp.float32
        out, ref = out.sum(axis=0), ref.sum(axis=0)
    else:
        assert out.shape == (m, n // 2) and out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
# Wider row blocks (the gate_up + SwiGLU tilings bench/skinny_tune.py times at 128-256 rows), rows
# ragged against them.
@pytest.mark.parametrize("block_m,block_n,block_k", [(128, 32, 64), (256, 16, 64), (128, 64, 64)])
def test_skinny_swiglu_with_wide_row_blocks(interpret, block_m, block_n, block_k):
    rng, seed = fresh_rng()
    m, k, n = 200, 320, 2 * 96
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
    out = skinny_matmul(x, w, epilogue="swiglu", interpret=interpret, block_m=block_m,
                        block_n=block_n, block_k=block_k)
    ref = skinny_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), epilogue="swiglu")
    assert out.shape == (m, n // 2) and out.dtype == jnp.bfloat16
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"


NK_CASES = [  # (epilogue, M, K, N, dtype, bias, num_splits, block_n, block_k): weights [N, K]
    ("none", 1, 896, 1152, jnp.bfloat16, True, None, None, None),  # 0.5B qkv, default tiling
    ("none", 3, 200, 130, jnp.float32, True, 3, 32, 64),            # ragged K and N, uneven splits
    ("partials", 1, 4864, 896, jnp.bfloat16, False, None, None, None),  # 0.5B down
    ("partials", MAX_ROWS, 300, 64, jnp.float32, False, 3, 16, 128),
    ("swiglu", 1, 896, 2 * 1024, jnp.bfloat16, False, None, None, None),
    ("swiglu", 7, 200, 2 * 90, jnp.float32, False, None, 32, 64),   # half not a tile multiple
    # one row (the lane-wise path, gemv): ragged K and N, split and not
    ("none", 1, 200, 130, jnp.float32, True, 3, 32, 64),
    ("partials", 1, 300, 70, jnp.bfloat16, False, 2, 16, 128),
    ("swiglu", 1, 200, 2 * 90, jnp.float32, False, None, 32, 64),
    ("none", 1, 900, 37, jnp.float32, True, 1, 8, 1024),  # a few weight rows a program, one K block
    ("swiglu", 1, 900, 2 * 37, jnp.bfloat16, False, None, 4, 1024),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("epilogue,m,k,n,dtype,with_bias,splits,bn,bk", NK_CASES)
def test_skinny_matmul_nk_layout_matches_reference(interpret, epilogue, m, k, n, dtype, with_bias,
                                                   splits, bn, bk):
    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if with_bias else None
    out = skinny_matmul(x, w, bias, epilogue=epilogue, interpret=interpret, num_splits=splits,
                        block_n=bn, block_k=bk, layout="nk", gemv=m == 1)
    ref = skinny_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                  None if bias is None else bias.astype(jnp.float32),
                                  epilogue=epilogue, layout="nk")
    if epilogue == "partials":
        assert out.shape[1:] == (m, n) and out.dtype == jnp.float32
        out, ref = out.sum(axis=0), ref.sum(axis=0)
    else:
        assert out.shape == (m, n // 2 if epilogue == "swiglu" else n) and out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"


K_LOOP_CASES = [  # (epilogue, K, N, dtype, bias, num_splits, block_n, block_k)
    ("partials", 4864, 896, jnp.bfloat16, False, 1, 2, 1024),  # 0.5B down unsplit: 5 K blocks, the last short
    ("none", 1000, 70, jnp.float32, True, 2, 8, 256),          # ragged K over splits and blocks
    ("swiglu", 300, 2 * 37, jnp.float32, False, None, 4, 128),
]


@pytest.mark.parametrize("prefetch", [True, False])
# Interpreted, 0.5B down's depth over 96 of its 896 columns: the same 5-block loop in 48 programs, not 448
# (2-5 s a case interpreted).
@pytest.mark.parametrize("interpret,epilogue,k,n,dtype,with_bias,splits,bn,bk",
                         interpreted_and_compiled([(*K_LOOP_CASES[0][:2], 96, *K_LOOP_CASES[0][3:]),
                                                   *K_LOOP_CASES[1:]], K_LOOP_CASES))
def test_skinny_matmul_one_row_k_loop_matches_reference(interpret, prefetch, epilogue, k, n, dtype, with_bias,
                                                        splits, bn, bk):
    # One row, lane-wise, looping over K blocks, each iteration loading the next block's tiles
    # ahead (prefetch, the default) or its own.
    check_gemv(1, interpret, prefetch, epilogue, k, n, dtype, with_bias, splits, bn, bk)


def check_gemv(rows, interpret, prefetch, epilogue, k, n, dtype, with_bias, splits, bn, bk) -> None:
    """The lane-wise path (`gemv=True`) over `rows` fresh random rows against the float32 reference, row by row."""
    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if with_bias else None
    out = skinny_matmul(x, w, bias, epilogue=epilogue, interpret=interpret, num_splits=splits,
                        block_n=bn, block_k=bk, layout="nk", gemv=True, prefetch=prefetch)
    ref = skinny_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                  None if bias is None else bias.astype(jnp.float32),
                                  epilogue=epilogue, layout="nk")
    if epilogue == "partials":
        out, ref = out.sum(axis=0), ref.sum(axis=0)
    assert out.shape == ref.shape
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    for r in range(rows):  # a row mixed up with another fails here
        assert relative_error(out[r], ref[r]) <= TOLERANCE[dtype], f"row {r}, seed={seed}"


def one_row_norm_inputs(rng, k: int, n: int, dtype, with_bias: bool, parts: int) -> tuple:
    """(hidden [1, K], partials [parts, 1, K] or None, scale [K], w [N, K], bias [N] or None) of a norm-folded case."""
    hidden = jnp.asarray(rng.standard_normal((1, k)), dtype)
    partials = jnp.asarray(rng.standard_normal((parts, 1, k)), jnp.float32) if parts else None
    scale = jnp.asarray(rng.uniform(0.5, 1.5, k), dtype)
    w = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if with_bias else None
    return hidden, partials, scale, w, bias


NORM_CASES = [  # (epilogue, K, N, dtype, bias, partials, block_n, num_programs)
    ("none", 896, 1152, jnp.bfloat16, True, 2, None, None),    # Qwen2.5-0.5B qkv after the down split's two
    ("swiglu", 896, 2 * 4864, jnp.bfloat16, False, 1, None, None),  # gate_up after o_proj
    ("swiglu", 896, 2 * 4864, jnp.bfloat16, False, 1, 4, 264),  # the same, programs looping over blocks
    ("none", 200, 130, jnp.float32, True, 0, 16, None),         # the first layer: nothing to add
    ("none", 200, 130, jnp.float32, True, 2, 16, 4),            # 9 blocks over 4 programs: uneven
    ("swiglu", 72, 2 * 37, jnp.float32, False, 3, 4, None),     # ragged K and N, a few rows a program
    ("swiglu", 72, 2 * 37, jnp.float32, False, 3, 4, 3),        # 10 blocks over 3 programs
]


@pytest.mark.parametrize("interpret,epilogue,k,n,dtype,with_bias,parts,bn,programs", interpreted_and_compiled(
    # Interpreted, the looping case over 1160 of gate's 4864 rows in 66 programs: 290 blocks of 4, 4-5 a program
    # as 1216 over 264 are (5-17 s interpreted at full size).
    [*NORM_CASES[:2], ("swiglu", 896, 2 * 1160, jnp.bfloat16, False, 1, 4, 66), *NORM_CASES[3:]], NORM_CASES))
def test_skinny_matmul_norm_matches_reference(interpret, epilogue, k, n, dtype, with_bias, parts, bn, programs):
    rng, seed = fresh_rng()
    hidden, partials, scale, w, bias = one_row_norm_inputs(rng, k, n, dtype, with_bias, parts)
    h, y = skinny_matmul_norm(hidden, partials, scale, w, bias, eps=1e-6, epilogue=epilogue,
                              block_n=bn, num_programs=programs, interpret=interpret)
    h_ref, y_ref = skinny_matmul_norm_reference(hidden, partials, scale, w, bias, eps=1e-6, epilogue=epilogue)
    assert h.shape == hidden.shape and y.shape == (1, n // 2 if epilogue == "swiglu" else n)
    assert not np.isnan(np.asarray(y, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(h, h_ref) <= TOLERANCE[dtype], f"seed={seed}"
    assert relative_error(y, y_ref) <= TOLERANCE[dtype], f"seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("epilogue,k,n,dtype,with_bias,parts,bn,programs", [NORM_CASES[4], NORM_CASES[6]])
def test_skinny_matmul_norm_hoisted_loads_give_the_same_bits(interpret, epilogue, k, n, dtype, with_bias, parts, bn,
                                                             programs, monkeypatch):
    # NORM_GEMV_HOIST only moves the norm weight's and the bias's loads to the top of each program.
    import importlib

    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((1, k)), dtype)
    partials = jnp.asarray(rng.standard_normal((parts, 1, k)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, k), dtype)
    w = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if with_bias else None
    outs = []
    for hoist in (False, True):
        monkeypatch.setattr(importlib.import_module("jaxserve_kernels.skinny_matmul"), "NORM_GEMV_HOIST", hoist)
        # programs None: one block a program, where the bias is hoisted too
        for num_programs in (None, programs):
            outs.append(skinny_matmul_norm(hidden, partials, scale, w, bias, eps=1e-6, epilogue=epilogue, block_n=bn,
                                           num_programs=num_programs, interpret=interpret)[1])
    for late, early in zip(outs[:2], outs[2:]):
        np.testing.assert_array_equal(np.asarray(late, np.float32), np.asarray(early, np.float32), err_msg=f"seed={seed}")


@pytest.mark.parametrize("interpret,epilogue,k,n,dtype,with_bias,parts,bn,programs", interpreted_and_compiled(
    [NORM_CASES[0][:-2] + (64, None), NORM_CASES[4]], [NORM_CASES[0], NORM_CASES[4]]))
def test_skinny_matmul_norm_touching_pages_changes_no_output(interpret, epilogue, k, n, dtype, with_bias, parts, bn,
                                                             programs):
    # touch_pages (model.PREFETCH_KV) only reads the pages the tables name, ahead of the attention kernel.
    rng, seed = fresh_rng()
    hidden, partials, scale, w, bias = one_row_norm_inputs(rng, k, n, dtype, with_bias, parts)
    pages = jnp.asarray(rng.standard_normal((2, 40, 16, 64)), dtype)
    table = jnp.asarray(rng.permutation(40)[:13][None, :].astype(np.int32))
    plain = skinny_matmul_norm(hidden, partials, scale, w, bias, eps=1e-6, epilogue=epilogue, block_n=bn,
                               num_programs=programs, interpret=interpret)
    touched = skinny_matmul_norm(hidden, partials, scale, w, bias, eps=1e-6, epilogue=epilogue, block_n=bn,
                                 num_programs=programs, touch_pages=(pages, pages * 2, table), interpret=interpret)
    for a, b in zip(plain, touched):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=f"seed={seed}")
    with pytest.raises(ValueError, match="touch_pages"):
        skinny_matmul_norm(hidden, partials, scale, w, bias, eps=1e-6, touch_pages=(pages, pages, table[:, :0].T))


# (rows, epilogue, K, N, dtype, bias, partials, block_n, num_programs): the 2-4-row steps' norm-folded path
SEVERAL_ROW_NORM_CASES = [
    (2, "none", 200, 130, jnp.float32, True, 2, 16, None),
    (3, "swiglu", 72, 2 * 37, jnp.float32, False, 3, 4, 3),      # ragged, 10 blocks over 3 programs
    (4, "none", 896, 1152, jnp.bfloat16, True, 2, None, None),   # Qwen2.5-0.5B qkv at 4 rows
    (2, "swiglu", 896, 2 * 4864, jnp.bfloat16, False, 1, None, None),  # gate_up at 2 rows (NORM_GEMV_TILES)
]


@pytest.mark.parametrize("interpret,rows,epilogue,k,n,dtype,with_bias,parts,bn,programs", interpreted_and_compiled(
    # Interpreted, gate_up over 1160 of its 4864 rows (as above).
    [*SEVERAL_ROW_NORM_CASES[:3], (2, "swiglu", 896, 2 * 1160, jnp.bfloat16, False, 1, 4, 66)],
    SEVERAL_ROW_NORM_CASES))
def test_skinny_matmul_norm_several_rows_match_reference(interpret, rows, epilogue, k, n, dtype, with_bias, parts, bn,
                                                         programs):
    # Each program loads its weight block once and multiplies it by every row, each row with its own norm.
    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((rows, k)) * rng.uniform(0.5, 3.0, (rows, 1)), dtype)
    partials = jnp.asarray(rng.standard_normal((parts, rows, k)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, k), dtype)
    w = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if with_bias else None
    h, y = skinny_matmul_norm(hidden, partials, scale, w, bias, eps=1e-6, epilogue=epilogue,
                              block_n=bn, num_programs=programs, interpret=interpret)
    h_ref, y_ref = skinny_matmul_norm_reference(hidden, partials, scale, w, bias, eps=1e-6, epilogue=epilogue)
    assert h.shape == hidden.shape and y.shape == (rows, n // 2 if epilogue == "swiglu" else n)
    assert not np.isnan(np.asarray(y, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(h, h_ref) <= TOLERANCE[dtype], f"seed={seed}"
    for r in range(rows):  # every row its own: a row mixed up with another fails here
        assert relative_error(y[r], y_ref[r]) <= TOLERANCE[dtype], f"row {r}, seed={seed}"


# (rows, epilogue, K, N, dtype, bias, splits, block_n, block_k): the lane-wise path over 2-4 rows
SEVERAL_ROW_GEMV_CASES = [
    (2, "partials", 4864, 896, jnp.bfloat16, False, None, None, None),  # Qwen2.5-0.5B down at 2 rows
    (4, "partials", 896, 896, jnp.bfloat16, False, None, None, None),   # o_proj at 4 rows
    (3, "none", 300, 130, jnp.float32, True, 1, 4, 128),                # ragged, a K loop, bias in the kernel
    (4, "swiglu", 300, 2 * 37, jnp.float32, False, None, 4, 128),
    (2, "partials", 700, 70, jnp.float32, False, 3, 8, 128),            # uneven splits of a K loop
]


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("interpret,rows,epilogue,k,n,dtype,with_bias,splits,bn,bk", interpreted_and_compiled(
    # Interpreted, down's depth over 96 of its 896 columns.
    [(2, "partials", 4864, 96, jnp.bfloat16, False, None, None, None), *SEVERAL_ROW_GEMV_CASES[1:]],
    SEVERAL_ROW_GEMV_CASES))
def test_skinny_matmul_gemv_several_rows_match_reference(interpret, prefetch, rows, epilogue, k, n, dtype, with_bias,
                                                         splits, bn, bk):
    check_gemv(rows, interpret, prefetch, epilogue, k, n, dtype, with_bias, splits, bn, bk)


FP8_CASES = [  # (M, K, N, layout, dtype, bias, num_splits): float8 weights with per-column scales
    (1, 896, 1152, "nk", jnp.bfloat16, True, None),   # the one-row lane-wise path, Qwen2.5-0.5B qkv
    (1, 700, 70, "nk", jnp.float32, False, 3),        # lane-wise, uneven splits summed outside, then scaled
    (5, 200, 130, "nk", jnp.float32, True, 1),        # tensor-core tile, scale + bias in the kernel
    (MAX_ROWS, 300, 96, "nk", jnp.bfloat16, False, 2),
    (3, 200, 130, "kn", jnp.float32, True, None),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,k,n,layout,dtype,with_bias,splits", FP8_CASES)
def test_skinny_matmul_fp8_weights_match_reference(interpret, m, k, n, layout, dtype, with_bias, splits):
    """float8 e4m3 weights read as stored and widened in the kernel, each column times its scale: the product of
    the dequantized weights (`jaxserve.quantization`'s weight-only fp8)."""
    from jaxserve.quantization import quantize_fp8

    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    shape = (n, k) if layout == "nk" else (k, n)
    scales = rng.uniform(0.5, 2.0, n) / np.sqrt(k)  # channels of different sizes
    w, scale = quantize_fp8(jnp.asarray(rng.standard_normal(shape) * (scales[:, None] if layout == "nk" else scales)),
                            axis=0 if layout == "nk" else 1)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if with_bias else None
    out = skinny_matmul(x, w, bias, scale=scale, interpret=interpret, num_splits=splits, layout=layout)
    ref = skinny_matmul_reference(x.astype(jnp.float32), w, None if bias is None else bias.astype(jnp.float32),
                                  layout=layout, scale=scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    with pytest.raises(ValueError, match="scale must be"):
        skinny_matmul(x, w, scale=scale[1:], layout=layout)


def test_skinny_matmul_norm_errors_name_the_field():
    ones = jnp.ones((1, 8))
    with pytest.raises(ValueError, match="hidden"):
        skinny_matmul_norm(jnp.ones((5, 8)), None, jnp.ones(8), jnp.ones((4, 8)), eps=1e-6)
    with pytest.raises(ValueError, match="partials"):
        skinny_matmul_norm(ones, jnp.ones((2, 8)), jnp.ones(8), jnp.ones((4, 8)), eps=1e-6)
    with pytest.raises(ValueError, match="scale"):
        skinny_matmul_norm(ones, None, jnp.ones(7), jnp.ones((4, 8)), eps=1e-6)
    with pytest.raises(ValueError, match="w must be"):
        skinny_matmul_norm(ones, None, jnp.ones(8), jnp.ones((8, 4)), eps=1e-6)
    with pytest.raises(ValueError, match="NORM_GEMV_MAX_K"):
        skinny_matmul_norm(jnp.ones((1, 4096)), None, jnp.ones(4096), jnp.ones((4, 4096)), eps=1e-6)
    with pytest.raises(ValueError, match="num_programs"):
        skinny_matmul_norm(ones, None, jnp.ones(8), jnp.ones((4, 8)), eps=1e-6, num_programs=-1)


def test_default_tiling_fills_the_gpu_by_splitting_narrow_matrices():
    # A narrow matrix (few column blocks) is split along K; a wide one is not.
    _, _, narrow = default_tiling(1, 4864, 896)
    _, _, wide = default_tiling(1, 896, 9728)
    assert narrow > 1 and wide == 1
    # Row blocks are programs too: four of them (batch 256) need fewer K splits.
    assert default_tiling(4 * ROW_BLOCK, 4864, 896)[2] < narrow


# (epilogue, M, K, N, dtype, slots, R, layout, num_splits): small shapes interpreted; compiled, Qwen2.5-0.5B's
# projections at 64 and 256 rows with 4 adapters of rank 16 (QKV with its bias, gate_up + SwiGLU, down_proj split).
LORA_INTERPRETED = [("none", 37, 200, 130, jnp.float32, 3, 8, "nk", None),  # ragged rows, K, N and a K split
                    ("swiglu", 8, 128, 2 * 48, jnp.bfloat16, 2, 16, "nk", None),
                    ("partials", 5, 300, 64, jnp.float32, 1, 8, "kn", 3),  # slot width 8: the term's K padded to 16
                    ("none", 1, 256, 96, jnp.float32, 4, 4, "nk", None)]  # one row: the tensor-core path
LORA_COMPILED = [("none", rows, k, n, jnp.bfloat16, 4, 16, "nk", None) for rows in (64, 256)
                 for k, n in ((896, 1152), (4864, 896), (896, 896))] + [
    ("swiglu", rows, 896, 2 * 4864, jnp.bfloat16, 4, 16, "nk", None) for rows in (64, 256)]


@pytest.mark.parametrize("interpret,epilogue,m,k,n,dtype,slots,rank,layout,splits",
                         interpreted_and_compiled(LORA_INTERPRETED, LORA_INTERPRETED + LORA_COMPILED))
def test_skinny_matmul_adds_each_rows_lora_term(interpret, epilogue, m, k, n, dtype, slots, rank, layout, splits):
    # `lora`: each row's adapter term (shrink by `lora_shrink` over every slot, its slot's columns kept, expand)
    # inside the product, against the float32 reference of the same inputs with the shrink computed there too.
    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k) if layout == "nk" else (k, n)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if epilogue == "none" and k < 1000 else None
    a = jnp.asarray(rng.standard_normal((slots * rank, k)) / np.sqrt(k), dtype)
    b = jnp.asarray(rng.standard_normal((slots * rank, n)), dtype)
    order = rng.permutation(np.arange(-1, slots))  # every slot, -1 too, where the rows are enough for them all
    if m < order.size:  # too few: the first row takes an adapter, or one row of no adapter would show no term
        order = np.roll(order, -int(np.argmax(order >= 0)))
    row_slots = jnp.asarray(np.resize(order, m), jnp.int32)
    shrink = lora_shrink(x, a, interpret=interpret)
    out = skinny_matmul(x, w, bias, epilogue=epilogue, layout=layout, num_splits=splits, interpret=interpret,
                        lora=LoraTerm(shrink, b, row_slots, rank))
    f32 = [None if v is None else v.astype(jnp.float32) for v in (x, w, bias, a, b)]
    term = LoraTerm(f32[0] @ f32[3].T, f32[4], row_slots, rank)
    ref = _reference(*f32[:3], epilogue=epilogue, layout=layout, lora=term)
    plain = _reference(*f32[:3], epilogue=epilogue, layout=layout)
    if epilogue == "partials":
        out, ref, plain = out.sum(axis=0), ref.sum(axis=0), plain.sum(axis=0)
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    assert relative_error(plain, ref) > 10 * TOLERANCE[dtype], f"the terms are too small to see, seed={seed}"


def test_skinny_matmul_lora_errors_name_the_field():
    x, w = jnp.zeros((2, 8)), jnp.zeros((8, 4))
    good = LoraTerm(jnp.zeros((2, 16)), jnp.zeros((16, 4)), jnp.zeros(2, jnp.int32), 8)
    for bad, field in ((good._replace(b=jnp.zeros((16, 5))), "lora.b"), (good._replace(shrink=jnp.zeros((3, 16))),
                       "lora.shrink"), (good._replace(slots=jnp.zeros(3, jnp.int32)), "lora.slots"),
                       (good._replace(rank=5), "lora.rank")):
        with pytest.raises(ValueError, match=field):
            skinny_matmul(x, w, lora=bad)
    with pytest.raises(ValueError, match="gemv"):
        skinny_matmul(x, w.T, layout="nk", gemv=True, lora=good)


_OWN_SLOT = [(64, 896, 192, 48, jnp.bfloat16), (8, 128, 128, 16, jnp.bfloat16), (24, 256, 64, 16, jnp.float32),
             (100, 384, 256, 32, jnp.bfloat16)]  # 0.5B's QKV shrink (4 slots of 3 x 16); few rows; float32; 2 row blocks


@pytest.mark.parametrize("interpret,m,k,width,rank,dtype", interpreted_and_compiled(
    _OWN_SLOT, _OWN_SLOT + [(256, 896, 128, 16, jnp.bfloat16), (64, 896, 256, 32, jnp.bfloat16)]))
def test_own_slot_keeps_each_rows_adapter_columns(interpret, m, k, width, rank, dtype):
    # own_slot: the product with each row's own slot's columns kept and every other column zero (a row on no slot,
    # -1, all zeros): the folded LoRA shrink in one launch. The zeros are checked exact, the kept columns against
    # the float32 product rounded once.
    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    a = jnp.asarray(rng.standard_normal((width, k)) * 0.1, dtype)
    slots = jnp.asarray(rng.integers(-1, width // rank, m), jnp.int32)
    out = skinny_matmul(x, a, layout="nk", own_slot=(slots, rank), interpret=interpret)
    full = jnp.dot(x.astype(jnp.float32), a.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    ref = own_slot_columns(full, rank, slots, dtype)
    assert out.shape == (m, width) and out.dtype == dtype, f"seed={seed}"
    mine = (np.arange(width) // rank)[None, :] == np.asarray(slots)[:, None]
    assert (np.asarray(out, np.float32)[~mine] == 0).all(), f"seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    assert mine.any() and np.abs(np.asarray(out, np.float32)[mine]).max() > 0, f"seed={seed}"


def test_own_slot_errors_name_the_field():
    x, a, slots = jnp.zeros((4, 64)), jnp.zeros((32, 64)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="own_slot must be"):
        skinny_matmul(x, a, layout="nk", own_slot=(slots[:3], 16))
    with pytest.raises(ValueError, match="own_slot must be"):
        skinny_matmul(x, a, layout="nk", own_slot=(slots, 0))
    with pytest.raises(ValueError, match="own_slot takes"):
        skinny_matmul(x, a, layout="nk", own_slot=(slots, 16), num_splits=2)
    with pytest.raises(ValueError, match="own_slot takes"):
        skinny_matmul(x, a, jnp.zeros(32), layout="nk", own_slot=(slots, 16))


def test_skinny_matmul_errors_name_the_field():
    with pytest.raises(ValueError, match="x must be"):
        skinny_matmul(jnp.zeros((2, 8)), jnp.zeros((9, 4)))
    with pytest.raises(ValueError, match="bias"):
        skinny_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)), jnp.zeros(5))
    with pytest.raises(ValueError, match="block_k"):
        skinny_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)), block_k=24)
    with pytest.raises(ValueError, match="epilogue"):
        skinny_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)), epilogue="gelu")
    with pytest.raises(ValueError, match="bias"):
        skinny_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)), jnp.zeros(4), epilogue="partials")
    with pytest.raises(ValueError, match="num_splits"):
        skinny_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)), epilogue="swiglu", num_splits=2)
    with pytest.raises(ValueError, match="layout"):
        skinny_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)), layout="kt")
    with pytest.raises(ValueError, match=r"w \[N, K\]"):
        skinny_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)), layout="nk")
    with pytest.raises(ValueError, match="NK_GEMV_MAX_ROWS"):
        skinny_matmul(jnp.zeros((5, 8)), jnp.zeros((4, 8)), layout="nk", gemv=True)


def test_skinny_matmul_inside_jit():
    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    out = jax.jit(lambda a, b: skinny_matmul(a, b, num_splits=2))(x, w)
    assert relative_error(out, skinny_matmul_reference(x, w)) <= 1e-5, f"seed={seed}"
