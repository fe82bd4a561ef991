"""The in-place LoRA term kernels (`jaxserve_kernels.lora_matmul`) against their jnp references on fresh random inputs:
ragged row counts, slot counts and ranks whose product is no power of two, rows on no adapter (slot -1), inputs
narrow enough to shrink inside the expand (one launch) and wide enough to take the split shrink (two), and gate_up's
SwiGLU form. The model's use of them (`model.LORA_KERNELS`) is checked in tests/test_lora.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels.lora_matmul import lora_add, lora_add_reference, lora_swiglu, lora_swiglu_reference
from tests.test_kernels import TOLERANCE, fresh_rng, interpreted_and_compiled, relative_error

CASES = interpreted_and_compiled(
    [  # (rows, in, out, slots, rank, dtype, tiling): `_tiling` says what each tiling runs
        (5, 200, 150, 3, 8, jnp.float32, None),
        (37, 96, 64, 2, 16, jnp.bfloat16, None),
        (70, 300, 40, 4, 16, jnp.float32, 64),
        (19, 520, 72, 1, 16, jnp.bfloat16, 256),
        (37, 200, 72, 3, 8, jnp.bfloat16, "xla"),
        (21, 96, 150, 2, 16, jnp.float32, "xla"),
        (9, 300, 40, 2, 16, jnp.bfloat16, "staged"),
        (9, 200, 40, 2, 16, jnp.bfloat16, "unrolled"),
        (11, 520, 72, 2, 16, jnp.float32, "unrolled"),
    ],
    [  # Qwen2.5-0.5B's projections with 4 rank-16 slots (QKV's parts side by side: rank 48), 64 and 256 rows
        (64, 896, 1152, 4, 48, jnp.bfloat16, None),
        (64, 4864, 896, 4, 16, jnp.bfloat16, None),
        (256, 896, 896, 4, 16, jnp.bfloat16, None),
        (13, 300, 40, 3, 8, jnp.float32, 64),
        (64, 896, 1152, 4, 48, jnp.bfloat16, "xla"),
        (64, 4864, 896, 4, 16, jnp.bfloat16, "xla"),
        (256, 896, 896, 4, 16, jnp.bfloat16, "xla"),
        (13, 300, 40, 3, 8, jnp.float32, "xla"),
        (64, 896, 1152, 4, 48, jnp.bfloat16, "staged"),
        (64, 896, 1152, 4, 48, jnp.bfloat16, 1),
        (64, 896, 1152, 4, 48, jnp.bfloat16, "unrolled"),
        (64, 4864, 896, 4, 16, jnp.bfloat16, "unrolled"),
    ])


def _tiling(tiling, rows: int) -> dict:
    """The case's kernel options: XLA's shrink (with row blocks of 16 past 16 rows), the inline shrink (None; "staged":
    its K loop on 3 pipeline stages), the split shrink for inputs wider than an int ``tiling`` (3 stages), or
    "unrolled" loops."""
    if tiling == "xla":
        return {"shrink": "xla", "block_m": 16 if rows > 16 else None}
    if tiling == "unrolled":  # loops written out: inputs up to 256 wide inline, wider ones split at 128
        return {"shrink": "kernel", "inline_k": 256, "split_k": 128, "unroll": True}
    if tiling in (None, "staged"):
        return {"shrink": "kernel", "inline_k": 4096, "num_stages": 3 if tiling else 1}
    return {"shrink": "kernel", "inline_k": tiling, "split_k": 128, "num_stages": 3}


def _inputs(rng, rows, k, n, slots, rank, dtype):
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    a = jnp.asarray(rng.standard_normal((slots, rank, k)) / np.sqrt(k), dtype)
    b = jnp.asarray(rng.standard_normal((slots, rank, n)), dtype)
    chosen = rng.integers(-1, slots, rows)
    chosen[0] = -1  # at least one row on no adapter, and one on the last slot
    chosen[-1] = slots - 1
    return x, a, b, jnp.asarray(chosen, jnp.int32)


@pytest.mark.parametrize("interpret,rows,k,n,slots,rank,dtype,tiling", CASES)
def test_lora_add_matches_reference(interpret, rows, k, n, slots, rank, dtype, tiling):
    rng, seed = fresh_rng()
    x, a, b, chosen = _inputs(rng, rows, k, n, slots, rank, dtype)
    acc = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
    want = lora_add_reference(x, a, b, chosen, acc)
    got = jax.jit(lambda x, a, b, s, acc: lora_add(x, a, b, s, acc, interpret=interpret,
                                                   **_tiling(tiling, rows)))(x, a, b, chosen, acc)
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32 and np.isfinite(got).all(), f"seed={seed}"
    term = want - np.asarray(acc)
    assert relative_error(got - np.asarray(acc), term) <= TOLERANCE[dtype], f"seed={seed}"
    none = np.asarray(chosen) < 0
    np.testing.assert_array_equal(got[none], np.asarray(acc)[none], err_msg=f"seed={seed}")  # no adapter: untouched
    # Each row takes its own slot's adapter: the term of another slot's is far off.
    other = jnp.where(chosen >= 0, (chosen + 1) % slots, -1)
    if slots > 1:
        wrong = np.asarray(lora_add_reference(x, a, b, other, acc)) - np.asarray(acc)
        assert relative_error(got - np.asarray(acc), wrong) > 10 * TOLERANCE[dtype], f"seed={seed}"


@pytest.mark.parametrize("interpret,rows,k,n,slots,rank,dtype,tiling", CASES)
def test_lora_swiglu_matches_reference(interpret, rows, k, n, slots, rank, dtype, tiling):
    rng, seed = fresh_rng()
    x, a, b, chosen = _inputs(rng, rows, k, 2 * n, slots, rank, dtype)
    h = jnp.asarray(rng.standard_normal((rows, 2 * n)) * 2, dtype)
    want = np.asarray(lora_swiglu_reference(x, a, b, chosen, h, jnp.float32))
    got = jax.jit(lambda x, a, b, s, h: lora_swiglu(x, a, b, s, h, interpret=interpret,
                                                    **_tiling(tiling, rows)))(x, a, b, chosen, h)
    assert got.shape == (rows, n) and got.dtype == dtype
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all(), f"seed={seed}"
    assert relative_error(got, want) <= TOLERANCE[dtype], f"seed={seed}"


def test_lora_kernels_refuse_mismatched_shapes():
    x, a, b = jnp.ones((3, 32)), jnp.ones((2, 16, 32)), jnp.ones((2, 16, 8))
    with pytest.raises(ValueError, match="slots"):
        lora_add(x, a, b, jnp.zeros(4, jnp.int32), jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="a must be"):
        lora_add(x, jnp.ones((2, 16, 31)), b, jnp.zeros(3, jnp.int32), jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="acc"):
        lora_add(x, a, b, jnp.zeros(3, jnp.int32), jnp.zeros((3, 9)))
    with pytest.raises(ValueError, match="even"):
        lora_swiglu(x, a, jnp.ones((2, 16, 9)), jnp.zeros(3, jnp.int32), jnp.zeros((3, 9)))
    with pytest.raises(ValueError, match="shrink"):
        lora_add(x, a, b, jnp.zeros(3, jnp.int32), jnp.zeros((3, 8)), shrink="cublas")
