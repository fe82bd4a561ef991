"""The Mosaic GPU skinny matmul (experimental) against the skinny-matmul reference.

On the CPU it runs in Mosaic GPU's interpreter (TMA copies, barriers and shared memory
simulated; the products as plain dots); `-m gpu` compiles it. Fresh random bf16 inputs every
run; tolerance against the float32 reference as for every bf16 kernel.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels.skinny_matmul import skinny_matmul_reference
import jaxserve_kernels.skinny_matmul_mgpu as skinny_matmul_mgpu_module
from jaxserve_kernels.skinny_matmul_mgpu import argmax_matmul_mgpu, skinny_matmul_mgpu, split_count, supports
from tests.test_kernels import (MODES, STEP_TOLERANCE_BF16, TOLERANCE, fresh_rng, interpreted_and_compiled,
                                relative_error)


def _operands(rng, m, k, n):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.bfloat16)
    return x, w


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("epilogue,m,k,n,block_n,slots,splits,boxes,block_m", [
    ("partials", 8, 256, 128, 64, 2, 1, 1, None),     # fewer steps than slots
    ("partials", 24, 512, 128, 32, 3, 3, 1, None),    # uneven splits: 8 steps over 3 (3, 3, 2)
    ("partials", 64, 896, 192, 64, 6, None, 1, None), # 14 steps; the default split count
    ("partials", 32, 1024, 64, 32, 3, 3, 2, None),    # steps of two boxes: 8 steps over 3 splits
    ("partials", 64, 4864, 64, 32, 3, 8, 2, None),    # down_proj at 64 rows: 38 two-box steps, 5 a split, 3 last
    ("none", 16, 384, 192, 64, 4, 2, 1, None),        # the splits summed outside, with a bias
    ("none", 24, 256, 128, 32, 3, 1, 1, None),        # one split: the bias added in the kernel
    ("swiglu", 8, 128, 128, 32, 2, 1, 1, None),
    ("swiglu", 40, 896, 320, 32, 6, 1, 1, None),      # M not a power of two, 14 steps over 6 slots
    ("swiglu", 16, 896, 128, 32, 3, 1, 2, None),      # 7 steps of two boxes
    ("swiglu", 64, 256, 224, 40, 3, 1, 2, None),      # 112 columns in blocks of 40 (80-byte output rows,
                                                      # unswizzled): the last block 32 wide
    ("swiglu", 16, 128, 224, 48, 2, 1, 1, None),      # 112 in blocks of 48: the last 16 wide (TMA stores
                                                      # want N whole 32-byte swizzle tiles)
    # wide steps: one program's rows past 64 (WGMMA's M granule), or row blocks of block_m
    ("partials", 256, 512, 64, 32, 3, 2, 1, None),    # all 256 rows in one accumulator
    ("partials", 192, 256, 64, 32, 2, 1, 1, 64),      # three row blocks of 64
    ("none", 128, 256, 96, 32, 3, 1, 1, 64),          # two row blocks, the bias in the kernel
    ("none", 96, 384, 64, 32, 4, 2, 1, None),         # 96 rows in a 128-row accumulator, split
    ("swiglu", 256, 256, 128, 32, 3, 1, 1, 128),      # two row blocks of 128
])
def test_mgpu_skinny_matches_reference(interpret, epilogue, m, k, n, block_n, slots, splits, boxes, block_m):
    want = splits or split_count(k, n, block_n, 264, boxes or 1)
    _matches_reference(interpret, epilogue, m, k, n, want, block_n=block_n, num_slots=slots, num_splits=splits,
                       boxes=boxes, block_m=block_m)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("epilogue,m,k,n,block_n,slots,splits", [
    ("partials", 64, 512, 128, 32, 4, 3),   # uneven splits (3, 3, 2 steps)
    ("partials", 8, 128, 64, 32, 4, 1),     # fewer steps than the weight tiles issued before the wait
    ("none", 64, 256, 96, 32, 3, 1),        # the bias (loaded before the wait) added in the kernel
    ("swiglu", 64, 896, 128, 32, 4, 1),
])
def test_pdl_launch_matches_reference(interpret, epilogue, m, k, n, block_n, slots, splits):
    # A programmatic dependent launch (`pdl=True`): the first weight tiles are copied before the
    # grid-dependency wait, the activations after it; the result must not change.
    _matches_reference(interpret, epilogue, m, k, n, splits, block_n=block_n, num_slots=slots,
                       num_splits=splits, pdl=True)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("epilogue,m,k,n,splits", [
    ("partials", 64, 896, 128, 7), ("none", 24, 256, 128, 1), ("swiglu", 64, 896, 256, 1)])
def test_read_only_exit_wait_matches_reference(interpret, epilogue, m, k, n, splits, monkeypatch):
    # EXIT_READ_ONLY (opt-in): a program waits for its output copy to read shared memory, not for
    # the writes, before it exits; every output must still land.
    monkeypatch.setattr(importlib.import_module("jaxserve_kernels.skinny_matmul_mgpu"), "EXIT_READ_ONLY", True)
    _matches_reference(interpret, epilogue, m, k, n, splits, block_n=32, num_slots=3, num_splits=splits)


def _matches_reference(interpret, epilogue: str, m: int, k: int, n: int, want_splits: int, **tiling):
    """The kernel with this tiling on fresh random operands against the float32 reference; returns
    the operands."""
    rng, seed = fresh_rng()
    x, w = _operands(rng, m, k, n)
    bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16) if epilogue == "none" else None
    out = skinny_matmul_mgpu(x, w, bias, epilogue=epilogue, interpret=interpret, **tiling)
    ref = skinny_matmul_reference(x, w, bias, epilogue=epilogue, layout="nk")
    if epilogue == "partials":
        assert out.shape == (want_splits, m, n) and out.dtype == jnp.float32
        out, ref = out.sum(axis=0), ref.sum(axis=0)
    else:
        assert out.shape == ref.shape and out.dtype == jnp.bfloat16
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"seed={seed}"
    tol = 1e-5 if epilogue == "partials" else TOLERANCE[jnp.bfloat16]
    assert relative_error(out, ref) <= tol, f"seed={seed}"
    return x, w


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,k,n,tiling", [
    (64, 896, 1152, {}),                                     # QKV at 64 rows: its default 7 splits
    # down_proj's depth: the deep tile's two-box steps, 38 over 8 splits (5 each, 3 in the last)
    (64, 4864, 128, dict(block_n=32, num_slots=3, num_splits=8, boxes=2)),
    (24, 512, 128, dict(block_n=32, num_slots=3, num_splits=3)),  # uneven splits (3, 3, 2 steps)
    (8, 256, 64, dict(block_n=64, num_slots=2, num_splits=1)),    # one split
    (128, 896, 896, {}),                                     # two row blocks of 64 (WIDE_TILES)
    (96, 384, 64, dict(block_n=32, num_slots=4, num_splits=2)),   # 96 rows in a 128-row accumulator
    (256, 896, 896, {}),                                     # four row blocks, 64 weight rows (WIDEST_TILES)
    (256, 2048, 128, {}),  # two 128-row blocks of down_proj's depth (WIDEST_TILES["deep"])
    (64, 896, 1152, dict(pdl=True)),  # a dependent launch: the weights first, the reduction after the wait
])
def test_accumulate_adds_into_its_input_in_place(interpret, m, k, n, tiling, monkeypatch):
    # epilogue "accumulate": every K split adds its sums into `acc` (a TMA reduction compiled), so
    # `acc + x @ w.T` comes back in acc's buffer: under jit with acc donated, no copy. The programs
    # exit on a read-only wait of their copies (EXIT_READ_ONLY) where M is a multiple of 16 (four of
    # the six cases): the sums must still all land.
    monkeypatch.setattr(importlib.import_module("jaxserve_kernels.skinny_matmul_mgpu"), "EXIT_READ_ONLY", m % 16 == 0)
    rng, seed = fresh_rng()
    x, w = _operands(rng, m, k, n)
    acc = jnp.asarray(rng.standard_normal((m, n)) * 4, jnp.float32)
    ref = acc + skinny_matmul_reference(x, w, None, epilogue="partials", layout="nk").sum(axis=0)
    step = jax.jit(lambda x, w, a: skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=a, interpret=interpret,
                                                      **tiling), donate_argnums=2)
    assert "input_output_alias" in step.lower(x, w, acc).compile().as_text(), "acc is not aliased to the output"
    acc = jnp.array(acc)
    pointer = acc.unsafe_buffer_pointer()
    out = step(x, w, acc)
    assert out.unsafe_buffer_pointer() == pointer, "acc was copied"
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= 1e-5, f"seed={seed}"


_SHRINK_SMALL = [  # (m, k, n, shrink columns C, tiling)
    (64, 1024, 128, 64, dict(block_n=32, num_slots=3, boxes=2)),  # the deep tile's steps, 2 shrink blocks
    (8, 256, 64, 48, dict(block_n=32, num_slots=2)),      # C not whole blocks: 2 blocks, columns 64.. untouched
    (128, 512, 128, 64, {}),                              # two row blocks of 64 (WIDE_TILES), one 64-wide block
]
_SHRINK_FULL = [
    (64, 4864, 896, 64, {}),    # Qwen2.5-0.5B's down_proj at 64 rows, 4 slots of rank 16: 28 + 2 column blocks
    (256, 4864, 896, 64, {}),   # at 256 rows (WIDEST_TILES["deep"]: 128-row programs, 64 columns a block)
    (24, 4864, 896, 48, {}),    # 24 rows, 3 slots of rank 16
] + _SHRINK_SMALL


@pytest.mark.parametrize("interpret,m,k,n,cols,tiling", interpreted_and_compiled(_SHRINK_SMALL, _SHRINK_FULL))
def test_accumulate_adds_its_lora_shrink_into_a_second_buffer(interpret, m, k, n, cols, tiling):
    # shrink (model.LORA_DOWN_SHRINK): column blocks past w's stream the shrink stack's rows and add into their own
    # float32 accumulator, in place like acc; columns past the blocks' are left as they were.
    rng, seed = fresh_rng()
    x, w = _operands(rng, m, k, n)
    width = 128
    a_cols = jnp.asarray(rng.standard_normal((width, k)) * 0.1, jnp.bfloat16)
    acc = jnp.asarray(rng.standard_normal((m, n)) * 4, jnp.float32)
    s = jnp.asarray(rng.standard_normal((m, width)), jnp.float32)
    block_n = tiling.get("block_n") or skinny_matmul_mgpu_module.tile_for(m, k, "accumulate")["block_n"]
    live = -(-cols // block_n) * block_n
    ref_acc = acc + skinny_matmul_reference(x, w, None, epilogue="partials", layout="nk").sum(axis=0)
    ref_s = s.at[:, :live].add(skinny_matmul_reference(x, a_cols[:live], None, epilogue="partials",
                                                        layout="nk").sum(axis=0))
    step = jax.jit(lambda x, w, a, acc, s: skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=acc,
                                                              shrink=(a, s, cols), interpret=interpret, **tiling),
                   donate_argnums=(3, 4))
    acc, s = jnp.array(acc), jnp.array(s)
    pointers = acc.unsafe_buffer_pointer(), s.unsafe_buffer_pointer()
    out_acc, out_s = step(x, w, a_cols, acc, s)
    assert (out_acc.unsafe_buffer_pointer(), out_s.unsafe_buffer_pointer()) == pointers, "an accumulator was copied"
    assert not np.isnan(np.asarray(out_acc)).any() and not np.isnan(np.asarray(out_s)).any(), f"seed={seed}"
    assert relative_error(out_acc, ref_acc) <= 1e-5, f"seed={seed}"
    assert relative_error(out_s[:, :live], ref_s[:, :live]) <= 1e-5, f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out_s[:, live:]), np.asarray(ref_s[:, live:]), err_msg=f"seed={seed}")


def test_shrink_errors_name_the_field():
    x, w = jnp.ones((8, 128), jnp.bfloat16), jnp.ones((64, 128), jnp.bfloat16)
    acc, s, a = jnp.zeros((8, 64)), jnp.zeros((8, 128)), jnp.ones((128, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="epilogue 'accumulate' and no term"):
        skinny_matmul_mgpu(x, w, shrink=(a, s, 64))
    with pytest.raises(ValueError, match="a_cols"):
        skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=acc, shrink=(a[:, :64], s, 64))
    with pytest.raises(ValueError, match="a_cols"):
        skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=acc, shrink=(a, s, 0))
    with pytest.raises(ValueError, match="shrink's s"):
        skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=acc, shrink=(a, s[:, :32], 64))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,k,n,tile", [
    (8, 128, 1000, dict(block_n=128)),                          # 8 rows; the last block 104 of 128 columns
    (64, 256, 1536, dict(block_n=256, num_slots=2, boxes=2)),   # whole blocks, two-box steps
    (128, 128, 776, dict(block_n=64, block_m=64)),              # two row blocks of 64; 8 of 64 in the last block
    (256, 128, 520, {}),                                        # the default: all 256 rows a program, 64 columns
])
def test_argmax_matmul_is_argmax_of_the_rounded_products(interpret, m, k, n, tile, monkeypatch):
    # The greedy LM head without logits: each row's first column of the maximum of x @ w.T rounded to
    # bf16, as jnp.argmax on bf16 logits; rows 0-1 have their maximum three times (weight rows 5, 6 and
    # the last are equal: in one block and in another), where the first column must win. The blocks'
    # maxima merged by either route (ARGMAX_MERGE), alternating by case.
    monkeypatch.setattr(skinny_matmul_mgpu_module, "ARGMAX_MERGE", "pallas" if m in (8, 128) else "xla")
    rng, seed = fresh_rng()
    x, w = _operands(rng, m, k, n)
    w = w.at[n - 1].set(w[5]).at[6].set(w[5])
    x = x.at[0].set(w[5] * 4).at[1].set(w[6] * 4)
    got = argmax_matmul_mgpu(x, w, interpret=interpret, **tile)
    logits = jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    want = jnp.argmax(logits, axis=-1)
    assert got.dtype == jnp.int32 and got.shape == (m,)
    assert int(got[0]) == 5 and int(got[1]) == 5, f"seed={seed}"
    assert np.array_equal(np.asarray(got), np.asarray(want)), f"seed={seed}"


def test_accumulate_refuses_a_missing_or_wrong_acc():
    x, w = jnp.zeros((16, 128), jnp.bfloat16), jnp.zeros((64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="acc"):
        skinny_matmul_mgpu(x, w, epilogue="accumulate")
    with pytest.raises(ValueError, match="acc"):
        skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=jnp.zeros((16, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="acc"):
        skinny_matmul_mgpu(x, w, epilogue="partials", acc=jnp.zeros((16, 64), jnp.float32))
    with pytest.raises(ValueError, match="warpgroups"):
        skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=jnp.zeros((16, 64), jnp.float32), warpgroups=2)
    assert supports(64, 896, 1152, "accumulate") and not supports(12, 128, 128, "accumulate")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("epilogue,m,k,n,block_n,slots,splits,block_m", [
    ("partials", 128, 512, 128, 64, 3, 2, 128),   # two warpgroups of 64 rows, 4 steps a split
    ("partials", 256, 384, 64, 32, 2, 3, 128),    # two row blocks, fewer slots than steps
    ("none", 256, 256, 96, 32, 4, 2, 256),        # 128 rows a warpgroup, the bias outside
    ("swiglu", 128, 256, 256, 64, 3, 1, 128),
    ("swiglu", 256, 896, 128, 32, 4, 1, 256),     # 14 steps over 4 slots
])
def test_two_warpgroup_kernel_matches_reference(interpret, epilogue, m, k, n, block_n, slots, splits, block_m):
    # The warp-specialized variant (warpgroups=2, experimental): a memory warpgroup feeds two
    # compute warpgroups that share each CTA's activation and weight tiles.
    x, w = _matches_reference(interpret, epilogue, m, k, n, splits, block_n=block_n, num_slots=slots,
                              num_splits=splits, block_m=block_m, warpgroups=2)
    with pytest.raises(ValueError, match="warpgroups 2"):  # rows not whole blocks
        skinny_matmul_mgpu(x[:64], w, epilogue=epilogue, block_m=128, warpgroups=2, interpret=interpret)


def test_default_tiles_by_rows_and_depth():
    # Up to 64 rows TILES, to 128 WIDE_TILES, past them WIDEST_TILES; each table's "deep" tile for the K-split products of
    # K >= DEEP_K (down_proj); M that is not whole row blocks in one block. A deep product with its
    # default tiling matches.
    import importlib

    mg = importlib.import_module("jaxserve_kernels.skinny_matmul_mgpu")
    assert mg.tile_for(64, 896, "partials") == {"cluster": 1, **mg.TILES["partials"], "block_m": 64, "boxes": 1,
                                                "warpgroups": 1}
    assert mg.tile_for(64, 4864, "partials") == {"boxes": 1, "cluster": 1, **mg.TILES["deep"], "block_m": 64,
                                                 "warpgroups": 1}
    assert mg.tile_for(128, 4864, "partials")["block_n"] == mg.WIDE_TILES["deep"]["block_n"]
    assert mg.tile_for(128, 896, "partials")["block_n"] == mg.WIDE_TILES["partials"]["block_n"]
    assert mg.tile_for(128, 4864, "swiglu")["block_n"] == mg.WIDE_TILES["swiglu"]["block_n"]
    assert mg.tile_for(96, 896, "none")["block_m"] == 128 and mg.tile_for(192, 896, "none")["block_m"] == 64
    for epilogue, k in (("partials", 896), ("accumulate", 4864), ("none", 896), ("swiglu", 896)):
        entry = "deep" if k >= mg.DEEP_K else epilogue
        assert mg.tile_for(256, k, epilogue) == {"boxes": 1, "warpgroups": 1, "cluster": 1,
                                                 **mg.WIDEST_TILES[entry]}, epilogue
    # Steps of TILES' boxes where they divide K, one box where they do not.
    assert mg.tile_for(64, 896, "swiglu")["boxes"] == mg.TILES["swiglu"].get("boxes", 1)
    assert mg.tile_for(64, 960, "swiglu")["boxes"] == 1
    rng, seed = fresh_rng()
    x, w = _operands(rng, 128, mg.DEEP_K, 128)
    out = skinny_matmul_mgpu(x, w, epilogue="partials")
    assert out.shape[1:] == (128, 128) and not np.isnan(np.asarray(out)).any(), f"seed={seed}"
    ref = skinny_matmul_reference(x, w, None, epilogue="partials", layout="nk").sum(axis=0)
    assert relative_error(out.sum(axis=0), ref) <= 1e-5, f"seed={seed}"


# (epilogue, m, k, n, term width, tiling): the term's K steps after x's (`term=(t, bt)`, LoRA's folded decode steps)
_TERM_SMALL = [
    ("none", 24, 256, 128, 64, dict(block_n=32, num_slots=3, num_splits=1)),   # one split, the bias in the kernel
    ("none", 16, 384, 192, 128, dict(block_n=64, num_slots=4, num_splits=2)),  # split: one split holds the term
    ("partials", 64, 512, 96, 128, dict(block_n=32, num_slots=3, num_splits=3)),  # 10 steps over 3: the term's two
                                                                                  # in the last split with x's last
    ("partials", 64, 256, 64, 256, dict(block_n=32, num_slots=2, num_splits=3)),  # a split of term steps alone
    ("swiglu", 64, 256, 224, 128, dict(block_n=40, num_slots=3, boxes=2)),     # two-box steps, ragged last block
    ("swiglu", 8, 128, 128, 128, dict(block_n=32, num_slots=2)),  # the default two-box steps
    ("partials", 128, 256, 64, 128, dict(block_n=32, num_slots=3, num_splits=2, block_m=64)),  # two row blocks
    ("accumulate", 64, 512, 96, 128, dict(block_n=32, num_slots=3, num_splits=3)),  # each split adds in place
    ("accumulate", 16, 256, 64, 64, dict(block_n=32, num_slots=2, num_splits=1)),
]
# Qwen2.5-0.5B's four projections with 4 rank-16 slots (T: slots x R padded to 128s), default tilings
_TERM_05B = [("none", rows, 896, 1152, 256, {}) for rows in (64, 256)] + [
    ("none", rows, 896, 896, 128, {}) for rows in (64, 256)] + [
    ("swiglu", rows, 896, 9728, 128, {}) for rows in (64, 256)] + [
    ("none", rows, 4864, 896, 128, {}) for rows in (64, 256)] + [
    ("accumulate", 64, k, n, width, {}) for k, n, width in ((896, 1152, 256), (896, 896, 128), (4864, 896, 128))]


@pytest.mark.parametrize("interpret,epilogue,m,k,n,width,tiling",
                         interpreted_and_compiled(_TERM_SMALL, _TERM_SMALL + _TERM_05B))
def test_term_is_the_product_over_both_operands(interpret, epilogue, m, k, n, width, tiling):
    # `t @ bt.T` joins the sums before the epilogue (the bias, SwiGLU): the product over x and t side by side.
    # t's columns are sparse as LoRA's masked shrink is (a row's own slot's columns only), and large enough that
    # the term moves the output far past the tolerance.
    _check_term(interpret, epilogue, m, k, n, width, tiling)


# The same with t two or three shrinks side by side over one bt (the fused attention's, one a KV head): 0.5B's o_proj
# at 64 and 256 rows, a split count that cuts through the second copy, two-box steps, SwiGLU
_TERM_REPEATED = [("accumulate", 16, 256, 64, 64, 2, dict(block_n=32, num_slots=2, num_splits=3)),
                  ("none", 24, 256, 128, 128, 3, dict(block_n=32, num_slots=3, num_splits=1, boxes=2)),
                  ("swiglu", 8, 128, 128, 128, 2, dict(block_n=32, num_slots=2))]
_TERM_REPEATED_05B = [("accumulate", rows, 896, 896, 128, 2, {}) for rows in (64, 256)]


@pytest.mark.parametrize("interpret,epilogue,m,k,n,width,repeat,tiling",
                         interpreted_and_compiled(_TERM_REPEATED, _TERM_REPEATED + _TERM_REPEATED_05B))
def test_term_of_shrinks_side_by_side_reads_bt_for_each(interpret, epilogue, m, k, n, width, repeat, tiling):
    _check_term(interpret, epilogue, m, k, n, width, tiling, repeat)


def _check_term(interpret, epilogue, m, k, n, width, tiling, repeat=1):
    rng, seed = fresh_rng()
    x, w = _operands(rng, m, k, n)
    slot_cols = rng.integers(0, width // 16, m)[:, None] == np.arange(width)[None, :] // 16
    t = jnp.asarray(np.concatenate([np.where(slot_cols, rng.standard_normal((m, width)) * 4, 0.0)
                                    for _ in range(repeat)], 1), jnp.bfloat16)
    bt = jnp.asarray(rng.standard_normal((n, width)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16) if epilogue == "none" else None
    acc = jnp.asarray(rng.standard_normal((m, n)), jnp.float32) if epilogue == "accumulate" else None
    out = skinny_matmul_mgpu(x, w, bias, epilogue=epilogue, acc=acc, term=(t, bt), interpret=interpret, **tiling)
    ref_epilogue = "partials" if epilogue == "accumulate" else epilogue
    # SwiGLU's bt is gate's rows then up's, as w's: each half repeated on its own rows
    ref = skinny_matmul_reference(jnp.concatenate([x, t], 1), jnp.concatenate([w] + [bt] * repeat, 1), bias,
                                  epilogue=ref_epilogue, layout="nk")
    base = skinny_matmul_reference(x, w, bias, epilogue=ref_epilogue, layout="nk")
    if ref_epilogue == "partials":
        ref, base = ref.sum(axis=0), base.sum(axis=0)
        out = out.sum(axis=0) if epilogue == "partials" else out
    if epilogue == "accumulate":
        ref, base = acc + ref, acc + base
    assert out.shape == ref.shape, f"seed={seed}"
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"seed={seed}"
    tol = 1e-5 if epilogue in ("partials", "accumulate") else TOLERANCE[jnp.bfloat16]
    assert relative_error(out, ref) <= tol, f"seed={seed}"
    assert relative_error(base, ref) > 10 * TOLERANCE[jnp.bfloat16], f"the term is too small to see, seed={seed}"


def test_term_refuses_what_it_cannot_run():
    x, w = jnp.zeros((16, 128), jnp.bfloat16), jnp.zeros((128, 128), jnp.bfloat16)
    t, bt = jnp.zeros((16, 64), jnp.bfloat16), jnp.zeros((128, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="term must be"):  # 48 columns: not whole 64-wide boxes
        skinny_matmul_mgpu(x, w, term=(t[:, :48], bt[:, :48]))
    with pytest.raises(ValueError, match="term must be"):
        skinny_matmul_mgpu(x, w, term=(t, bt[:64]))
    with pytest.raises(ValueError, match="term must be"):  # t not whole copies of bt's width
        skinny_matmul_mgpu(x, w, term=(jnp.zeros((16, 192), jnp.bfloat16), jnp.zeros((128, 128), jnp.bfloat16)))
    with pytest.raises(ValueError, match="term must be"):
        skinny_matmul_mgpu(x, w, term=(t.astype(jnp.float32), bt))
    with pytest.raises(ValueError, match="term must be"):  # two-box steps want whole 128s
        skinny_matmul_mgpu(x, w, boxes=2, term=(t, bt))
    with pytest.raises(ValueError, match="term runs with"):
        skinny_matmul_mgpu(x, w, cluster=2, term=(t, bt))


def test_mgpu_skinny_refuses_what_it_cannot_run():
    x, w = jnp.zeros((16, 128), jnp.bfloat16), jnp.zeros((128, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        skinny_matmul_mgpu(x.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="multiple of 8"):
        skinny_matmul_mgpu(x[:12], w)
    with pytest.raises(ValueError, match="K of 64"):
        skinny_matmul_mgpu(x[:, :96], w[:, :96])
    with pytest.raises(ValueError, match="boxes"):
        skinny_matmul_mgpu(x[:, :64], w[:, :64], boxes=2)
    with pytest.raises(ValueError, match="epilogue"):
        skinny_matmul_mgpu(x, w, epilogue="gelu")
    with pytest.raises(ValueError, match="bias"):
        skinny_matmul_mgpu(x, w, jnp.zeros(128, jnp.bfloat16), epilogue="partials")
    with pytest.raises(ValueError, match="block_m"):  # 72 rows are not whole blocks of 64
        skinny_matmul_mgpu(jnp.zeros((72, 128), jnp.bfloat16), w, block_m=64)
    with pytest.raises(ValueError, match="shared memory"):  # 6 x (256 + 64) x 64 x 2 bytes of ring
        skinny_matmul_mgpu(jnp.zeros((256, 128), jnp.bfloat16), w, block_n=64, num_slots=6, block_m=256)
    assert not supports(12, 128, 128, "partials") and not supports(264, 128, 128, "partials")
    assert supports(64, 896, 896, "partials") and supports(64, 896, 9728, "swiglu")
    assert supports(72, 128, 128, "partials") and supports(256, 896, 9728, "swiglu")


def _tiny_bf16_decode_step(rng, batch: int, tie: bool = False, layers: int = 2):
    """A bf16 Qwen2's decode step (two layers unless told) of `batch` rows over random pages (ragged
    lengths, a shuffled block table), impl "pallas"; returns its config and a function that runs the
    step (the model's module knobs read when it traces)."""
    from jaxserve.config import ModelConfig
    from jaxserve.model import PagedAttention, Qwen2ForCausalLM, init_params, new_kv_cache

    cfg = ModelConfig(vocab_size=296 if tie else 96, hidden_size=128, intermediate_size=192, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    params = init_params(cfg, jax.random.key(int(rng.integers(1 << 30))), jnp.bfloat16)
    page_size, width = 8, 2
    lengths = rng.integers(1, page_size * width - 1, batch)
    table = jnp.asarray(rng.permutation(batch * width).reshape(batch, width), jnp.int32)
    kv = new_kv_cache(cfg, batch * width, page_size, jnp.bfloat16)
    kv = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), kv)
    slots = table[jnp.arange(batch), lengths // page_size] * page_size + lengths % page_size
    paged = PagedAttention(slots[:, None], table, jnp.asarray(lengths + 1, jnp.int32),
                           jnp.asarray(lengths, jnp.int32), impl="pallas")
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, 1)), jnp.int32)
    model = Qwen2ForCausalLM(cfg, jnp.bfloat16)

    def run(greedy_tokens: bool = False, logits_dtype=jnp.float32, lora: dict | None = None,
            reference: bool = False):
        """The step's logits; ``reference``: the same weights and pages in float32 through the jnp references."""
        f32 = (lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)) if reference else (lambda t: t)
        logits, _ = (Qwen2ForCausalLM(cfg, jnp.float32) if reference else model).apply(
            {"params": f32(params)}, tokens, jnp.asarray(lengths[:, None], jnp.int32), kv=f32(kv),
            paged=paged.replace(impl="reference") if reference else paged, logits_dtype=logits_dtype,
            greedy_tokens=greedy_tokens, lora=lora)
        return logits

    return cfg, run


def _count_mgpu_calls(monkeypatch, record) -> list:
    """Calls of `skinny_matmul_mgpu` from here on, each as `record(args, kwargs)`."""
    import importlib

    mg = importlib.import_module("jaxserve_kernels.skinny_matmul_mgpu")
    calls = []
    monkeypatch.setattr(mg, "skinny_matmul_mgpu",
                        lambda *a, _f=mg.skinny_matmul_mgpu, **k: calls.append(record(a, k)) or _f(*a, **k))
    return calls


# PDL's early start and grid-dependency wait exist only compiled; interpreted the True case repeats False's.
@pytest.mark.parametrize("pdl", [False, pytest.param(True, marks=pytest.mark.gpu)])
def test_model_decode_step_through_mgpu_matches_triton(monkeypatch, pdl):
    # An 8-row bf16 decode step with the projections on Mosaic GPU (model.SKINNY_BACKEND) gives
    # the Triton path's logits; every projection of the step went through the new kernel. With
    # `PDL` each projection may start before the kernel ahead of it ends (compiled on Hopper: a
    # missing grid-dependency wait would read stale activations).
    from jaxserve import model as model_module

    monkeypatch.setattr(importlib.import_module("jaxserve_kernels.skinny_matmul_mgpu"), "PDL", pdl)
    monkeypatch.setattr(model_module, "ACCUMULATE", False)  # the partial sums' glue (the accumulating one: below)
    calls = _count_mgpu_calls(monkeypatch, lambda a, k: k["epilogue"])
    monkeypatch.setattr(model_module, "MGPU_MIN_ROWS", 8)
    rng, seed = fresh_rng()
    cfg, run = _tiny_bf16_decode_step(rng, 8)
    monkeypatch.setattr(model_module, "SKINNY_BACKEND", "triton")
    ref = run()
    assert not calls
    monkeypatch.setattr(model_module, "SKINNY_BACKEND", "mgpu")
    out = run()
    assert sorted(set(calls)) == ["none", "partials", "swiglu"] and len(calls) == 4 * cfg.num_hidden_layers
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"


@pytest.mark.parametrize("pdl", [False, pytest.param(True, marks=pytest.mark.gpu)])  # PDL is compiled-only
@pytest.mark.parametrize("batch", [16, 72])
def test_model_decode_step_accumulating_in_place_matches_partials(monkeypatch, batch, pdl):
    # model.ACCUMULATE: o, down and QKV add their K splits into the float32 residual stream / a
    # bias-seeded accumulator ("accumulate"), no partial sums; the logits are the partials glue's
    # within bf16's tolerance (the stream is float32 there, bf16 here). 72 rows: WIDE_TILES.
    from jaxserve import model as model_module

    calls = _count_mgpu_calls(monkeypatch, lambda a, k: k["epilogue"])
    monkeypatch.setattr(model_module, "MGPU_MIN_ROWS", 8)
    monkeypatch.setattr(model_module, "MGPU_MAX_ROWS", 128)
    rng, seed = fresh_rng()
    cfg, run = _tiny_bf16_decode_step(rng, batch)
    monkeypatch.setattr(model_module, "ACCUMULATE", False)
    ref = run()
    assert sorted(set(calls)) == ["none", "partials", "swiglu"]
    calls.clear()
    monkeypatch.setattr(model_module, "ACCUMULATE", True)
    # With PDL every projection may start before the kernel ahead ends (its weights first).
    monkeypatch.setattr(importlib.import_module("jaxserve_kernels.skinny_matmul_mgpu"), "PDL", pdl)
    out = jax.jit(run)()
    assert calls == ["accumulate", "accumulate", "swiglu", "accumulate"] * cfg.num_hidden_layers
    assert out.dtype == ref.dtype and not np.isnan(np.asarray(out)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= STEP_TOLERANCE_BF16, f"seed={seed}"


def test_model_greedy_tokens_from_the_lm_head(monkeypatch):
    # model.GREEDY_HEAD: a tied bf16 model's decode step hands back each row's argmax token from the
    # LM head's kernel (no logits): argmax of the step's own bf16 logits, or, where the two roundings
    # part, a token whose logit is within one bf16 step of the maximum.
    from jaxserve import model as model_module

    monkeypatch.setattr(model_module, "MGPU_MIN_ROWS", 8)
    monkeypatch.setattr(model_module, "GREEDY_HEAD", True)
    monkeypatch.setattr(model_module, "GREEDY_HEAD_MIN_ROWS", 8)
    rng, seed = fresh_rng()
    cfg, run = _tiny_bf16_decode_step(rng, 16, tie=True)
    applies = model_module.greedy_head_applies
    assert applies(cfg, jnp.bfloat16, 16) and not applies(cfg, jnp.bfloat16, 12)  # rows a multiple of 8
    assert not applies(cfg, jnp.bfloat16, 72) and not applies(cfg, jnp.float32, 16)  # past the rows; bf16 only
    logits = np.asarray(jax.jit(lambda: run(logits_dtype=None))()[:, 0], np.float32)  # bf16, as the engine's
    tokens = np.asarray(jax.jit(lambda: run(greedy_tokens=True))())
    assert tokens.shape == (16, 1) and tokens.dtype == np.int32
    best = logits.max(axis=1)
    chosen = logits[np.arange(16), tokens[:, 0]]
    assert (chosen >= best - np.abs(best) * 2 ** -7).all(), f"seed={seed}"
    assert (tokens[:, 0] == logits.argmax(axis=1)).mean() >= 0.75, f"seed={seed}"
    # The "reference" impl asked for greedy tokens runs no kernel: its own logits' argmax.
    assert "pallas_call[" not in str(jax.make_jaxpr(lambda: run(greedy_tokens=True, reference=True))())
    exact = np.asarray(jax.jit(lambda: run(reference=True))()[:, 0])
    assert (np.asarray(jax.jit(lambda: run(greedy_tokens=True, reference=True))())[:, 0] == exact.argmax(1)).all()


def test_model_128_row_step_through_mgpu_matches_xla(monkeypatch):
    # A 128-row bf16 decode step takes the skinny path where the Mosaic GPU projections run
    # (model.MGPU_MAX_ROWS; two row blocks of 64 in WIDE_TILES): its logits are those of the route
    # such steps took before, XLA's GEMMs and glue, and every projection went through the kernel.
    from jaxserve import model as model_module

    calls = _count_mgpu_calls(monkeypatch, lambda a, k: a[0].shape[0])
    rng, seed = fresh_rng()
    batch = 128
    cfg, run = _tiny_bf16_decode_step(rng, batch)
    assert model_module.skinny_rows(jnp.bfloat16) == model_module.MGPU_MAX_ROWS >= batch
    monkeypatch.setattr(model_module, "MGPU_MAX_ROWS", 0)
    ref = run()
    assert not calls
    monkeypatch.setattr(model_module, "MGPU_MAX_ROWS", batch)
    out = run()
    assert calls == [batch] * (4 * cfg.num_hidden_layers), calls
    assert relative_error(out, ref) <= STEP_TOLERANCE_BF16, f"seed={seed}"


# The partial-sums glue's case (off by default since session 21) compiled only: ~10 s interpreted, of a suite
# near CI's time limit, for a knob off by default (XLA_GATE_UP_ROWS, 0 since session 31).
@pytest.mark.parametrize("accumulate", [pytest.param(False, marks=pytest.mark.gpu), True])
def test_model_step_with_gate_up_on_xla_past_its_row_limit(monkeypatch, accumulate):
    # model.XLA_GATE_UP_ROWS (128 by default; half the batch here): a fused-glue step wider than it
    # runs gate_up + SwiGLU as XLA's GEMM and one fusion, QKV, o and down still on Mosaic GPU (adding
    # into the float32 stream with ACCUMULATE); logits as XLA's route.
    from jaxserve import model as model_module

    monkeypatch.setattr(model_module, "ACCUMULATE", accumulate)
    calls = _count_mgpu_calls(monkeypatch, lambda a, k: k["epilogue"])
    rng, seed = fresh_rng()
    batch = 128
    cfg, run = _tiny_bf16_decode_step(rng, batch)
    monkeypatch.setattr(model_module, "MGPU_MAX_ROWS", 0)
    ref = run()
    monkeypatch.setattr(model_module, "MGPU_MAX_ROWS", batch)
    monkeypatch.setattr(model_module, "XLA_GATE_UP_ROWS", batch // 2)
    out = run()
    assert sorted(calls) == (["accumulate"] * 6 if accumulate else ["none"] * 2 + ["partials"] * 4), calls
    assert relative_error(out, ref) <= STEP_TOLERANCE_BF16, f"seed={seed}"


def test_model_256_row_step_by_default_matches_xla(monkeypatch):
    # The defaults at 256 rows (MGPU_MAX_ROWS, XLA_GATE_UP_ROWS, ACCUMULATE, WIDEST_TILES): QKV, o
    # and down on Mosaic GPU adding into the float32 stream, gate_up + SwiGLU on Mosaic GPU too (the
    # joint 128-row tile); logits as XLA's route.
    from jaxserve import model as model_module

    calls = _count_mgpu_calls(monkeypatch, lambda a, k: (a[0].shape[0], k["epilogue"]))
    rng, seed = fresh_rng()
    batch = 256
    # One layer: its interpreted kernels at 256 rows are the suite's slowest model step (the stream carried from
    # layer to layer on these routes is the 128-row test's).
    cfg, run = _tiny_bf16_decode_step(rng, batch, layers=1)
    assert model_module.skinny_rows(jnp.bfloat16) >= batch and not 0 < model_module.XLA_GATE_UP_ROWS < batch
    with monkeypatch.context() as patch:
        patch.setattr(model_module, "MGPU_MAX_ROWS", 0)
        ref = run()
    assert not calls
    # Under jit: run eagerly first, in two pytest runs here the eager XLA step after it never returned
    # (0% CPU; not reproduced in a plain script, nor with this order).
    out = jax.jit(run)()
    layer = [(batch, "accumulate"), (batch, "accumulate"), (batch, "swiglu"), (batch, "accumulate")]
    assert calls == layer * cfg.num_hidden_layers, calls
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= STEP_TOLERANCE_BF16, f"seed={seed}"


def test_rows_past_64_on_mgpu_for_decode_steps_only(monkeypatch):
    # 128 rows of one token each (a decode step) run the Mosaic GPU kernel; a 128-token prefill
    # chunk keeps XLA's GEMM (SKINNY_ROWS), the route measured for it.
    from jaxserve import model as model_module

    calls = _count_mgpu_calls(monkeypatch, lambda a, k: a[0].shape)
    layer = model_module.Linear(192, True, jnp.bfloat16)
    x = jnp.asarray(fresh_rng()[0].standard_normal((128, 1, 128)), jnp.bfloat16)
    params = layer.init(jax.random.key(0), x)
    decode = layer.apply(params, x, fast=True)
    assert calls == [(128, 128)]
    prefill = layer.apply(params, x.reshape(1, 128, 128), fast=True)
    assert calls == [(128, 128)]
    assert relative_error(decode.reshape(prefill.shape), prefill) <= TOLERANCE[jnp.bfloat16]


def test_skinny_rows_past_64_only_where_mgpu_runs(monkeypatch):
    # Steps of 65-MGPU_MAX_ROWS rows leave cuBLAS only for the Mosaic GPU projections: bf16 on a
    # Hopper GPU (or the CPU's interpreter) with "nk" weights; elsewhere the limit stays SKINNY_ROWS.
    from jaxserve import model as model_module

    monkeypatch.setattr(model_module, "_wgmma_device", lambda: True)
    wide = max(model_module.SKINNY_ROWS, model_module.MGPU_MAX_ROWS)
    assert model_module.skinny_rows(jnp.bfloat16) == wide > 64
    assert model_module.skinny_rows(jnp.float32) == model_module.SKINNY_ROWS
    monkeypatch.setattr(model_module, "SKINNY_BACKEND", "triton")
    assert model_module.skinny_rows(jnp.bfloat16) == model_module.SKINNY_ROWS
    monkeypatch.setattr(model_module, "SKINNY_BACKEND", "mgpu")
    monkeypatch.setattr(model_module, "_wgmma_device", lambda: False)
    assert model_module.skinny_rows(jnp.bfloat16) == model_module.SKINNY_ROWS


def test_mgpu_projections_only_where_wgmma_runs(monkeypatch):
    # WGMMA is Hopper's (compute capability 9.x): an Ampere or Blackwell GPU keeps Triton's path;
    # the CPU runs the kernel in Mosaic GPU's interpreter.
    from jaxserve import model as model_module

    class Device:
        def __init__(self, platform, capability):
            self.platform, self.compute_capability = platform, capability

    try:
        for platform, capability, want in (("gpu", "9.0", True), ("gpu", "8.0", False), ("gpu", "10.0", False),
                                           ("gpu", "12.0", False), ("cpu", None, True)):
            monkeypatch.setattr(model_module.jax, "devices", lambda d=Device(platform, capability): [d])
            model_module._wgmma_device.cache_clear()
            assert model_module._wgmma_device() is want, (platform, capability)
    finally:
        model_module._wgmma_device.cache_clear()


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,k,n,tiling", [
    (64, 896, 256, dict(block_n=32, num_slots=3, boxes=2)),   # gate_up's 64-row tile
    (8, 128, 128, dict(block_n=32, num_slots=2)),
    (256, 256, 128, dict(block_n=32, num_slots=3, block_m=128)),  # two row blocks of 128
])
def test_swiglu_approx_matches_reference(interpret, m, k, n, tiling, monkeypatch):
    # SWIGLU_APPROX (the default): the sigmoid as rsqrt(1 + exp(-gate)) ** 2 with Mosaic GPU's approximate
    # math; against the float32 reference to bf16's tolerance, and bf16 products equal to the exact
    # epilogue's but for rare roundings (at most 1% of elements one bf16 unit apart).
    rng, seed = fresh_rng()
    x, w = _operands(rng, m, k, n)
    x = x * 4  # gates of several units: exp(-gate) from ~1e-4 to ~1e4
    monkeypatch.setattr(skinny_matmul_mgpu_module, "SWIGLU_APPROX", False)
    exact = skinny_matmul_mgpu(x, w, epilogue="swiglu", interpret=interpret, **tiling)
    monkeypatch.setattr(skinny_matmul_mgpu_module, "SWIGLU_APPROX", True)
    out = skinny_matmul_mgpu(x, w, epilogue="swiglu", interpret=interpret, **tiling)
    ref = skinny_matmul_reference(x, w, None, epilogue="swiglu", layout="nk")
    assert out.dtype == jnp.bfloat16 and not np.isnan(np.asarray(out, np.float32)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
    apart = np.asarray(out, np.float32) != np.asarray(exact, np.float32)
    assert apart.mean() <= 0.01, f"{apart.mean():.4f} of elements apart, seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,k,n,tiling", [
    (64, 896, 224, dict(block_n=40, num_slots=4, boxes=2)),       # gate_up's 64-row tile, the last block ragged
    (8, 128, 128, dict(block_n=32, num_slots=2)),
    (128, 256, 256, dict(block_n=64, num_slots=3, block_m=64)),   # two row blocks, N = 128 a product
    (256, 256, 160, dict(block_n=40, num_slots=3, block_m=128)),  # two row blocks of 128, ragged
])
def test_joint_swiglu_matches_reference(interpret, m, k, n, tiling):
    # joint: gate's and up's weight rows in one shared-memory tile, one WGMMA of N = 2 x block_n; the
    # accumulator's two column blocks are the halves. The same sums as two products of N = block_n.
    rng, seed = fresh_rng()
    x, w = _operands(rng, m, k, n)
    out = skinny_matmul_mgpu(x, w, epilogue="swiglu", joint=True, interpret=interpret, **tiling)
    apart_from = skinny_matmul_mgpu(x, w, epilogue="swiglu", joint=False, interpret=interpret, **tiling)
    ref = skinny_matmul_reference(x, w, None, epilogue="swiglu", layout="nk")
    assert out.shape == ref.shape and out.dtype == jnp.bfloat16, f"seed={seed}"
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
    apart = np.asarray(out, np.float32) != np.asarray(apart_from, np.float32)
    assert apart.mean() <= 0.01, f"{apart.mean():.4f} of elements apart from the two-product kernel, seed={seed}"


def test_joint_refuses_what_one_wgmma_cannot_hold():
    x, w = _operands(np.random.default_rng(0), 64, 128, 512)
    with pytest.raises(ValueError, match="joint"):
        skinny_matmul_mgpu(x, w, epilogue="swiglu", joint=True, block_n=256 // 2 + 8, num_slots=2, interpret=True)


# Clusters exist only compiled: the interpreter has no cluster barriers and runs cluster 1, the default's
# products, which the tests above check.
@pytest.mark.gpu
@pytest.mark.parametrize("epilogue,m,k,n,tiling", [
    ("swiglu", 256, 896, 800, dict(block_n=40, num_slots=3, block_m=128, joint=True)),  # gate_up's 256-row tile
    ("swiglu", 64, 896, 640, dict(block_n=40, num_slots=4, boxes=2, joint=True)),       # its 64-row tile
    ("swiglu", 64, 256, 304, dict(block_n=40, num_slots=3, boxes=2)),  # two products, the last block ragged
    ("partials", 128, 1024, 256, dict(block_n=32, num_slots=3, num_splits=3)),  # uneven splits (6, 6, 4 steps)
    ("partials", 64, 128, 128, dict(block_n=32, num_slots=4, num_splits=1)),   # fewer steps than slots
    ("none", 64, 256, 128, dict(block_n=32, num_slots=3, num_splits=1)),       # the bias in the kernel
])
@pytest.mark.parametrize("cluster", [2, 4])
def test_cluster_multicast_matches_reference(epilogue, m, k, n, tiling, cluster):
    # A cluster's CTAs share each activation tile (one TMA multicast from L2) and wait for each other
    # before a slot is refilled; every product must be as a lone CTA's.
    n_out = n // 2 if epilogue == "swiglu" else n
    if -(-n_out // tiling["block_n"]) % cluster:
        pytest.skip("column blocks not whole clusters")
    want = tiling.get("num_splits", 1)
    _matches_reference(False, epilogue, m, k, n, want, cluster=cluster, **tiling)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,tiling", [
    (256, 4864, 896, dict(block_n=64, num_slots=3, block_m=128)),  # down_proj's 256-row tile, 9 splits
    (256, 896, 1152, dict(block_n=64, num_slots=4, block_m=64)),   # QKV's, four row blocks
])
def test_cluster_accumulates_in_place(m, k, n, tiling):
    rng, seed = fresh_rng()
    x, w = _operands(rng, m, k, n)
    acc = jnp.asarray(rng.standard_normal((m, n)) * 4, jnp.float32)
    ref = acc + skinny_matmul_reference(x, w, None, epilogue="partials", layout="nk").sum(axis=0)
    out = jax.jit(lambda x, w, a: skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=a, cluster=2, **tiling),
                  donate_argnums=2)(x, w, acc)
    assert not np.isnan(np.asarray(out)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= 1e-5, f"seed={seed}"


def test_cluster_refuses_what_it_cannot_split():
    x, w = _operands(np.random.default_rng(0), 64, 128, 96)
    with pytest.raises(ValueError, match="cluster"):  # 3 column blocks of 32: not whole clusters of 2
        skinny_matmul_mgpu(x, w, epilogue="partials", block_n=32, num_slots=2, cluster=2, interpret=True)
    with pytest.raises(ValueError, match="cluster"):  # no PDL in a cluster
        skinny_matmul_mgpu(x, w[:64], epilogue="partials", block_n=32, num_slots=2, cluster=2, pdl=True,
                           interpret=True)
    with pytest.raises(ValueError, match="cluster"):  # 8 rows cannot split among 2 CTAs' 8-row tiles
        skinny_matmul_mgpu(x[:8], w[:64], epilogue="partials", block_n=32, num_slots=2, cluster=2, interpret=True)
    assert skinny_matmul_mgpu_module.tile_for(256, 896, "swiglu")["cluster"] >= 1
