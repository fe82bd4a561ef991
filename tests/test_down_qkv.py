"""One layer's down_proj and the next layer's add + RMSNorm + QKV projection in one launch
(`jaxserve_kernels.down_qkv`) against its jnp reference, on fresh random inputs with NaN-poisoned outputs
where the kernel writes (its QKV and residual come from fresh buffers, so the poison is in the pages it touches);
and its counters, threaded through several launches, left at zero by each."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels import down_qkv
from jaxserve_kernels.down_qkv import fused_down_qkv, new_counter
from tests.test_kernels import TOLERANCE, fresh_rng, interpreted_and_compiled, make_pool, relative_error

reference = jax.jit(down_qkv.fused_down_qkv_reference, static_argnames=("eps",))


def down_case(rng, *, rows, hidden, inter, n_qkv, dtype, bias):
    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    return (normal(rows, inter), normal(hidden, inter, scale=inter ** -0.5), normal(rows, hidden),
            normal(hidden, scale=0.3) + 1, normal(n_qkv, hidden, scale=hidden ** -0.5),
            normal(n_qkv, scale=0.5) if bias else None)


def check(out, ref, dtype, seed) -> None:
    (h, qkv, counter), (h_ref, qkv_ref, _) = out, ref
    assert h.shape == h_ref.shape and qkv.shape == qkv_ref.shape and qkv.dtype == qkv_ref.dtype
    assert not np.isnan(np.asarray(qkv, np.float32)).any(), f"NaN in output, seed={seed}"
    # XLA may keep the reference's residual sum in float32 past its rounding (excess precision): not bitwise.
    assert relative_error(h, h_ref) <= TOLERANCE[dtype], f"seed={seed}"
    assert relative_error(qkv, qkv_ref) <= TOLERANCE[dtype], f"seed={seed}"
    assert not np.asarray(counter).any(), f"counters left at {np.asarray(counter)[:, 0].tolist()}, seed={seed}"


# Shapes: interpreted, small ones that take the same paths (several K splits of down_proj, several QKV programs);
# compiled, Qwen2.5-0.5B's too.
SMALL = dict(hidden=256, inter=2560, n_qkv=384)
FULL = dict(hidden=896, inter=4864, n_qkv=1152)


@pytest.mark.parametrize("interpret,rows,hidden,inter,n_qkv,dtype,bias,block_n", interpreted_and_compiled([
    (1, 896, 4864, 1152, jnp.bfloat16, True, 16),  # Qwen2.5-0.5B at batch-1 decode
    (1, 256, 2560, 384, jnp.bfloat16, True, 64),   # fewer, wider QKV programs
    (3, 256, 640, 192, jnp.float32, False, 8),     # three rows, no bias
    (2, 100, 300, 60, jnp.float32, True, 4),       # ragged: no dimension a power of two
], [
    (1, 896, 4864, 1152, jnp.bfloat16, True, 16),
    (1, 896, 4864, 1152, jnp.bfloat16, True, 64),
    (3, 256, 640, 192, jnp.float32, False, 8),
    (2, 100, 300, 60, jnp.float32, True, 4),
]))
def test_down_qkv_matches_reference(interpret, rows, hidden, inter, n_qkv, dtype, bias, block_n):
    rng, seed = fresh_rng()
    args = down_case(rng, rows=rows, hidden=hidden, inter=inter, n_qkv=n_qkv, dtype=dtype, bias=bias)
    out = fused_down_qkv(*args, new_counter(), eps=1e-6, block_n=block_n, interpret=interpret)
    check(out, reference(*args, new_counter(), eps=1e-6), dtype, seed)


@pytest.mark.parametrize("interpret,shape", interpreted_and_compiled([("small",)], [("full",)]))
def test_down_qkv_touching_the_next_pages_changes_nothing(interpret, shape):
    """`touch_pages` (model.PREFETCH_KV) programs read the pages after the wait's programs; outputs bitwise as
    without them, NaN pages included (a touch only sums what it reads)."""
    rng, seed = fresh_rng()
    args = down_case(rng, rows=1, dtype=jnp.bfloat16, bias=True, **(FULL if shape == "full" else SMALL))
    k_pages, v_pages = (p.at[:, 3].set(jnp.nan) for p in make_pool(rng, kv_heads=2, head_dim=64, page_size=16,
                                                                    num_pages=20, dtype=jnp.bfloat16))
    table = jnp.asarray(rng.permutation(20)[None, :12], jnp.int32)
    plain = fused_down_qkv(*args, new_counter(), eps=1e-6, interpret=interpret)
    touched = fused_down_qkv(*args, new_counter(), eps=1e-6, touch_pages=(k_pages, v_pages, table),
                             interpret=interpret)
    for a, b in zip(plain, touched):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=f"seed={seed}")


@pytest.mark.parametrize("interpret,shape", interpreted_and_compiled([("small",)], [("full",)]))
def test_down_qkv_launches_chain_through_one_counter(interpret, shape):
    """Four launches in one jitted function, each one's residual the last one's and the counters passed along
    (as the model's layers pass them): every launch must find them at zero, or its waiters would pass early."""
    rng, seed = fresh_rng()
    layers = [down_case(rng, rows=1, dtype=jnp.bfloat16, bias=True, **(FULL if shape == "full" else SMALL))
              for _ in range(4)]

    @functools.partial(jax.jit, static_argnames="ref")
    def run(layers, counter, ref: bool):
        h, outs = layers[0][2], []
        for act, w_down, _, scale, w, b in layers:
            call = down_qkv.fused_down_qkv_reference if ref else fused_down_qkv
            h, qkv, counter = call(act, w_down, h, scale, w, b, counter, eps=1e-6,
                                   **({} if ref else {"interpret": interpret}))
            outs.append((h, qkv, counter))
        return outs

    for out, ref in zip(run(layers, new_counter(), ref=False), run(layers, new_counter(), ref=True)):
        check(out, ref, jnp.bfloat16, seed)


def test_down_qkv_errors_name_the_field():
    rng, _ = fresh_rng()
    act, w_down, hidden, scale, w, b = down_case(rng, rows=1, hidden=64, inter=128, n_qkv=96, dtype=jnp.float32,
                                                 bias=True)
    with pytest.raises(ValueError, match="counter"):
        fused_down_qkv(act, w_down, hidden, scale, w, b, jnp.zeros((3,), jnp.int32), eps=1e-6)
    with pytest.raises(ValueError, match="w_down"):
        fused_down_qkv(act, w_down.T, hidden, scale, w, b, new_counter(), eps=1e-6)
    with pytest.raises(ValueError, match="w_qkv"):
        fused_down_qkv(act, w_down, hidden, scale, w[:, :32], b, new_counter(), eps=1e-6)
    with pytest.raises(ValueError, match="b_qkv"):
        fused_down_qkv(act, w_down, hidden, scale, w, b[:5], new_counter(), eps=1e-6)
    with pytest.raises(ValueError, match="block_n"):
        fused_down_qkv(act, w_down, hidden, scale, w, b, new_counter(), eps=1e-6, block_n=3)
    with pytest.raises(ValueError, match="act"):
        fused_down_qkv(jnp.zeros((5, 128)), w_down, hidden, scale, w, b, new_counter(), eps=1e-6)


def test_waiting_programs_must_leave_an_sm_free():
    assert down_qkv.qkv_programs(1152) == 72  # Qwen2.5-0.5B: 16 rows of QKV's weights a program

    class Gpu:
        platform, core_count = "gpu", 72

    assert not down_qkv.fits(1152, device=Gpu())
    Gpu.core_count = 132  # an H100 SXM / H200
    assert down_qkv.fits(1152, device=Gpu()) and not down_qkv.fits(1152, block_n=4, device=Gpu())
