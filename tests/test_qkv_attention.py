"""The one-launch QKV projection + fused attention + o_proj (`jaxserve_kernels.qkv_attention`) against its jnp
reference: fresh random inputs, NaN-poisoned pages (the new token's own slot included), ragged lengths, random
page tables; and its counters, threaded through several launches, left at zero by each."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels import qkv_attention
from jaxserve_kernels.qkv_attention import fused_qkv_attention_o, new_counter
from tests.test_decode_attention import assert_pools_equal, fused_case
from tests.test_kernels import MODES, TOLERANCE, fresh_rng, relative_error

reference = jax.jit(qkv_attention.fused_qkv_attention_o_reference, static_argnames=("eps", "scale"))


def merged_case(rng, *, batch, num_heads, kv_heads, head_dim, page_size, table_pages, hidden, dtype, parts,
                bias, lengths=None):
    """Inputs of one call: the residual stream, partial sums, norm weight, QKV weights and bias, then
    `fused_case`'s attention inputs (its qkv dropped: the kernel computes it) and Wo."""
    _, cos, sin, k_pages, v_pages, table, lengths, slots = fused_case(
        rng, batch=batch, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size,
        table_pages=table_pages, dtype=dtype, lengths=lengths)
    n_qkv = (num_heads + 2 * kv_heads) * head_dim

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    partials = jnp.asarray(rng.standard_normal((parts, batch, hidden)), jnp.float32) if parts else None
    return (normal(batch, hidden), partials, normal(hidden, scale=0.5) + 1, normal(n_qkv, hidden, scale=hidden ** -0.5),
            normal(n_qkv, scale=0.5) if bias else None, cos, sin, k_pages, v_pages, table, lengths, slots,
            normal(hidden, num_heads * head_dim, scale=(num_heads * head_dim) ** -0.5))


def check_outputs(out, ref, args, dtype, seed) -> None:
    h, parts, k_new, v_new, counter = out
    h_ref, parts_ref, k_ref, v_ref, _ = ref
    # XLA may keep the reference's sum in float32 past its bf16 rounding (excess precision), so not bitwise.
    assert relative_error(h, h_ref) <= TOLERANCE[dtype], f"seed={seed}"
    assert parts.shape == parts_ref.shape and parts.dtype == jnp.float32
    assert not np.isnan(np.asarray(parts)).any(), f"NaN in output, seed={seed}"
    assert relative_error(parts.sum(0), parts_ref.sum(0)) <= TOLERANCE[dtype], f"seed={seed}"
    assert relative_error(parts, parts_ref) <= TOLERANCE[dtype], f"seed={seed}"
    lengths = np.asarray(args[10])
    for row in np.flatnonzero(lengths == 0):
        np.testing.assert_array_equal(np.asarray(parts[:, row]), 0.0, err_msg=f"length-0 row not zero, seed={seed}")
    # The new K and V rows are the kernel's own projection (summed in another order than the reference's dot),
    # so within the dtype's tolerance; every other slot unchanged, the NaN poison exactly where it was.
    for new, want in ((k_new, k_ref), (v_new, v_ref)):
        values = np.abs(np.asarray(want, np.float32))
        scale = float(values[~np.isnan(values)].max(initial=1.0))  # a length-0 row leaves the pool all poison
        assert_pools_equal(new, want, seed, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)
    assert counter.tolist() == [0, 0], f"counters left at {counter.tolist()}, seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,page_size,table_pages,hidden,dtype,batch,parts,bias,block_n,ppb", [
    (14, 2, 64, 16, 13, 896, jnp.bfloat16, 1, 2, True, 4, None),  # Qwen2.5-0.5B at batch-1 decode, 208 keys
    (14, 2, 64, 16, 12, 896, jnp.bfloat16, 1, 2, True, 16, 8),    # wider projection programs, two key blocks
    (8, 1, 128, 8, 5, 256, jnp.float32, 3, 1, False, 8, None),    # GQA 8, three rows, no bias
    (4, 4, 64, 32, 3, 128, jnp.float32, 2, 0, True, 64, 1),       # no grouping, no partials, one page a block
])
def test_merged_matches_reference(interpret, num_heads, kv_heads, head_dim, page_size, table_pages, hidden, dtype,
                                  batch, parts, bias, block_n, ppb):
    rng, seed = fresh_rng()
    lengths = [int(rng.integers(1, table_pages * page_size + 1))] if batch == 1 else \
        [0, 1, int(rng.integers(2, table_pages * page_size + 1))][:batch]
    args = merged_case(rng, batch=batch, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                       page_size=page_size, table_pages=table_pages, hidden=hidden, dtype=dtype, parts=parts,
                       bias=bias, lengths=lengths)
    ref = reference(*args, new_counter(), eps=1e-6)
    out = fused_qkv_attention_o(*args, new_counter(), eps=1e-6, block_n=block_n, pages_per_block=ppb, interpret=interpret)
    check_outputs(out, ref, args, dtype, seed)


@pytest.mark.parametrize("interpret", MODES)
def test_merged_launches_chain_through_one_counter(interpret):
    """Three launches in one jitted function, each layer's pools its own and the counters passed along (as the
    model's layers pass them): every launch must find them at zero, or its waiters would pass early."""
    rng, seed = fresh_rng()
    layers = [merged_case(rng, batch=1, num_heads=14, kv_heads=2, head_dim=64, page_size=16, table_pages=13,
                          hidden=896, dtype=jnp.bfloat16, parts=2, bias=True) for _ in range(3)]

    @jax.jit
    def run(layers, counter):
        outs = []
        for args in layers:
            *out, counter = fused_qkv_attention_o(*args, counter, eps=1e-6, interpret=interpret)
            outs.append((*out, counter))
        return outs

    for args, out in zip(layers, run(layers, new_counter())):
        check_outputs(out, reference(*args, new_counter(), eps=1e-6), args, jnp.bfloat16, seed)


def test_merged_errors_name_the_field():
    rng, _ = fresh_rng()
    args = merged_case(rng, batch=1, num_heads=4, kv_heads=2, head_dim=64, page_size=16, table_pages=2, hidden=128,
                       dtype=jnp.float32, parts=1, bias=True)
    with pytest.raises(ValueError, match="counter"):
        fused_qkv_attention_o(*args, jnp.zeros((3,), jnp.int32), eps=1e-6)
    with pytest.raises(ValueError, match="block_n"):
        fused_qkv_attention_o(*args, new_counter(), eps=1e-6, block_n=3)
    with pytest.raises(ValueError, match="w_qkv"):
        fused_qkv_attention_o(*args[:3], args[3][:, :64], *args[4:], new_counter(), eps=1e-6)
    with pytest.raises(ValueError, match="wo"):
        fused_qkv_attention_o(*args[:12], args[12][:, :64], new_counter(), eps=1e-6)
    wide = jnp.zeros((1, 17), jnp.int32)  # 272 keys: past one pass
    with pytest.raises(ValueError, match="block_tables"):
        fused_qkv_attention_o(*args[:9], wide, *args[10:], new_counter(), eps=1e-6)


def test_waiting_programs_must_leave_an_sm_free():
    assert qkv_attention.attention_programs(1, 2, 896) == 112  # Qwen2.5-0.5B, one row, 16 rows of Wo a program

    class Gpu:
        platform, core_count = "gpu", 112

    assert not qkv_attention.fits(1, 2, 896, Gpu())
    Gpu.core_count = 132  # an H100 SXM / H200
    assert qkv_attention.fits(1, 2, 896, Gpu())
