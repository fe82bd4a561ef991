"""The one-launch one-row MLP (`jaxserve_kernels.mlp_gemv`) against its jnp reference on fresh random inputs:
the residual add + RMSNorm, gate_up, SwiGLU and down_proj added into a float32 accumulator, the spare buffer
zeroed; intermediate sizes that are not a multiple of a program's columns; float32 within 1e-5 and bfloat16
within 2e-2 relative. On the CPU the interpreter adds each program's share with a load and a store (it has no
masked atomics); the compiled cases (`-m gpu`) add them with the GPU's atomics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels.mlp_gemv import fused_mlp_gemv
from jaxserve_kernels.mlp_gemv import fused_mlp_gemv_reference as _reference
from tests.test_kernels import TOLERANCE, fresh_rng, interpreted_and_compiled, relative_error

fused_mlp_gemv_reference = jax.jit(_reference, static_argnames=("eps",))

CASES = [  # (K, I, dtype, partials, columns, block_n)
    (200, 90, jnp.float32, 3, 16, 4),     # ragged K and I: the last program's columns half empty
    (64, 48, jnp.float32, 0, 32, 8),      # no partials; two programs of 32 columns
    (128, 100, jnp.bfloat16, 2, 8, 2),
    (896, 4864, jnp.bfloat16, 2, None, None),  # Qwen2.5-0.5B's MLP after o_proj's two KV-head partials
]


@pytest.mark.parametrize("interpret,k,inter,dtype,parts,columns,block_n",
                         interpreted_and_compiled([*CASES[:3], (896, 1000, jnp.bfloat16, 2, None, None)], CASES))
def test_fused_mlp_gemv_matches_reference(interpret, k, inter, dtype, parts, columns, block_n):
    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((1, k)), dtype)
    partials = jnp.asarray(rng.standard_normal((parts, 1, k)), jnp.float32) if parts else None
    scale = jnp.asarray(rng.uniform(0.5, 1.5, k), dtype)
    w_gate_up = jnp.asarray(rng.standard_normal((2 * inter, k)) / np.sqrt(k), dtype)
    w_down = jnp.asarray(rng.standard_normal((k, inter)) / np.sqrt(inter), dtype)
    acc = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)  # not zeros: the kernel adds into it
    ref = fused_mlp_gemv_reference(hidden, partials, scale, w_gate_up, w_down, acc, acc, eps=1e-6)
    spare = jnp.full((1, k), jnp.nan, jnp.float32)  # poisoned: must come back zeros
    h, out, zeroed = fused_mlp_gemv(hidden, partials, scale, w_gate_up, w_down, acc, spare, eps=1e-6,
                                    columns=columns, block_n=block_n, interpret=interpret)
    assert h.shape == hidden.shape and h.dtype == dtype and out.shape == (1, k) and out.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any(), f"NaN in output, seed={seed}"
    assert relative_error(h, ref[0]) <= TOLERANCE[dtype], f"seed={seed}"
    # The added sums against acc + down_proj, and down_proj alone (so acc's size hides no error).
    assert relative_error(out, ref[1]) <= TOLERANCE[dtype], f"seed={seed}"
    assert relative_error(out - acc, ref[1] - acc) <= TOLERANCE[dtype], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(zeroed), 0.0, err_msg=f"spare not zeroed, seed={seed}")


@pytest.mark.parametrize("interpret,k,inter", interpreted_and_compiled([(64, 80)], [(896, 4864)]))
def test_fused_mlp_gemv_alternating_buffers_chain_layers(interpret, k, inter):
    # The model's use: layer i adds into the buffer layer i - 1 zeroed and zeroes the one layer i - 1 filled.
    rng, seed = fresh_rng()
    hidden = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
    layers = [(jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.float32),
               jnp.asarray(rng.standard_normal((2 * inter, k)) / np.sqrt(k), jnp.float32),
               jnp.asarray(rng.standard_normal((k, inter)) / np.sqrt(inter), jnp.float32)) for _ in range(3)]

    def run(fn):
        spent, zeroed, h = jnp.zeros((1, k)), jnp.zeros((1, k)), hidden
        for scale, w_gate_up, w_down in layers:
            h, zeroed, spent = fn(h, spent[None], scale, w_gate_up, w_down, zeroed, spent, eps=1e-6)
            spent, zeroed = zeroed, spent
        return h, spent

    got = run(lambda *a, **kw: fused_mlp_gemv(*a, **kw, interpret=interpret))
    want = run(fused_mlp_gemv_reference)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= 1e-5, f"seed={seed}"


@pytest.mark.parametrize("field,change", [
    ("hidden", lambda a: {**a, "hidden": jnp.zeros((2, 8))}),
    ("partials", lambda a: {**a, "partials": jnp.zeros((2, 1, 4))}),
    ("scale", lambda a: {**a, "scale": jnp.zeros(4)}),
    ("w_gate_up", lambda a: {**a, "w_gate_up": jnp.zeros((5, 8))}),
    ("w_down", lambda a: {**a, "w_down": jnp.zeros((8, 3))}),
    ("acc", lambda a: {**a, "acc": jnp.zeros((1, 8), jnp.bfloat16)}),
    ("spare", lambda a: {**a, "spare": jnp.zeros((2, 8))}),
    ("columns", lambda a: {**a, "columns": 12}),
])
def test_fused_mlp_gemv_errors_name_the_field(field, change):
    args = dict(hidden=jnp.zeros((1, 8)), partials=None, scale=jnp.zeros(8), w_gate_up=jnp.zeros((4, 8)),
                w_down=jnp.zeros((8, 2)), acc=jnp.zeros((1, 8)), spare=jnp.zeros((1, 8)))
    with pytest.raises(ValueError, match=field):
        fused_mlp_gemv(**change(args), eps=1e-6)
