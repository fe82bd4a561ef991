"""`jaxserve_kernels.kv_touch.touch_pages` (the K/V read-ahead of model.KV_TOUCH) against its reference, and the
model's accumulating decode step with it on against the same step without it."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels.kv_touch import touch_pages, touch_pages_reference
from tests.test_kernels import MODES, TOLERANCE, fresh_rng, make_pool, relative_error


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("kv_heads,head_dim,page_size,dtype,entries",
                         [(2, 64, 16, jnp.bfloat16, 4), (4, 128, 8, jnp.float32, 1)])
def test_touch_pages_sums_each_used_page(interpret, kv_heads, head_dim, page_size, dtype, entries):
    # Ragged lengths (0: a padding row, 1, a page, a page + 1, the whole table), a shuffled table whose unused
    # entries hold ids past the pool (clipped, never summed), 5 entries in runs of 4 (one run partly past the
    # table) or of 1; a poisoned array as `after`.
    rng, seed = fresh_rng()
    width, rows = 5, 6
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size,
                                 num_pages=rows * width, dtype=dtype)
    table = rng.permutation(rows * width).reshape(rows, width).astype(np.int32)
    lengths = np.array([0, 1, page_size, page_size + 1, width * page_size, 3 * page_size - 2], np.int32)
    table[1, 1:] = 10_000
    out = jnp.full((rows, width), jnp.nan, jnp.float32)
    out = touch_pages(k_pages, v_pages, jnp.asarray(table), jnp.asarray(lengths), after=out, interpret=interpret,
                      entries=entries)
    ref = touch_pages_reference(k_pages, v_pages, jnp.asarray(table), jnp.asarray(lengths), entries=entries)
    assert out.shape == (rows, -(-width // entries)) and not np.asarray(out[0]).any(), f"seed={seed}"
    assert not np.isnan(np.asarray(out)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= 1e-5, f"seed={seed}"


def test_touch_pages_refuses_shapes_it_cannot_block():
    kp = vp = jnp.zeros((2, 4, 8, 96))
    with pytest.raises(ValueError, match="powers of two"):
        touch_pages(kp, vp, jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32))


# "gpu": selected by `-m gpu` on the device, where the step compiles (Mosaic GPU projections, Triton kernels, XLA's
# scheduling of the read-ahead). Here only "early", which also takes "layer"'s path for layer 0.
@pytest.mark.parametrize("mode,where", [("early", "here"), pytest.param("layer", "gpu", marks=pytest.mark.gpu),
                                        pytest.param("early", "gpu", marks=pytest.mark.gpu)])
def test_model_decode_step_with_the_kv_read_ahead_matches_without(monkeypatch, mode, where):
    # model.KV_TOUCH: each layer of the accumulating glue has its pages read by a kernel of their own first (after
    # the layer's input, or after the layer before's attention); the step's logits are the same, and the kernel ran
    # once a layer.
    from jaxserve import model as model_module
    from tests.test_skinny_matmul_mgpu import _tiny_bf16_decode_step

    monkeypatch.setattr(model_module, "MGPU_MIN_ROWS", 8)
    monkeypatch.setattr(model_module, "ACCUMULATE", True)
    rng, seed = fresh_rng()
    cfg, run = _tiny_bf16_decode_step(rng, 16)
    ref = run()
    kt = importlib.import_module("jaxserve_kernels.kv_touch")
    calls = []
    monkeypatch.setattr(kt, "touch_pages", lambda *a, _f=kt.touch_pages, **k: calls.append(1) or _f(*a, **k))
    monkeypatch.setattr(model_module, "KV_TOUCH", mode)
    out = jax.jit(run)()
    assert len(calls) == cfg.num_hidden_layers
    # Compiled, the projections add their K splits into the float32 stream in whatever order they finish.
    assert relative_error(out, ref) <= (1e-6 if where == "here" else TOLERANCE[jnp.bfloat16]), f"seed={seed}"
