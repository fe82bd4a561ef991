"""The decode MLP in one Mosaic GPU kernel (experimental, `kernels.fused_mlp_mgpu`) against its reference.

On the CPU Mosaic GPU's interpreter runs the two phases as two kernels (it has no global semaphores);
`-m gpu` compiles the one kernel whose down_proj tiles wait on gate_up's semaphores. Fresh random bf16
inputs every run; the SwiGLU buffer starts as NaN, so a column read before it was written shows.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.fused_mlp_mgpu import fused_mlp_mgpu, fused_mlp_reference, plan_for, supports
from tests.test_kernels import MODES, TOLERANCE, fresh_rng, relative_error


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,k,inter,hidden,programs", [
    (16, 256, 512, 128, None),   # one gate_up item a program
    (16, 256, 512, 128, 10),     # six programs run two gate_up items; down_proj on the other four
    (8, 128, 384, 96, None),     # 8 rows in a 64-row accumulator; 96 = two blocks of 48 columns
    (64, 128, 256, 64, 5),       # 64 rows, three programs with two items
    # Qwen2.5-0.5B's MLP over the SM count's programs: compiled only (50 s in the interpreter)
    pytest.param(40, 896, 4864, 896, None, marks=pytest.mark.gpu),
])
def test_fused_mlp_matches_reference_in_place(interpret, m, k, inter, hidden, programs):
    if interpret is None and k == 896 and jax.default_backend() != "cpu":
        pytest.skip("the compiled case covers it")
    rng, seed = fresh_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w_gate_up = jnp.asarray(rng.standard_normal((2 * inter, k)) * k ** -0.5, jnp.bfloat16)
    w_down = jnp.asarray(rng.standard_normal((hidden, inter)) * inter ** -0.5, jnp.bfloat16)
    acc = jnp.asarray(rng.standard_normal((m, hidden)) * 4, jnp.float32)
    ref = fused_mlp_reference(x, w_gate_up, w_down, acc)
    step = jax.jit(lambda x, a, h: fused_mlp_mgpu(x, w_gate_up, w_down, a, h=h, programs=programs,
                                                  interpret=interpret), donate_argnums=(1, 2))
    h = jnp.full((m, inter), jnp.nan, jnp.bfloat16)
    assert "input_output_alias" in step.lower(x, acc, h).compile().as_text(), "acc is not aliased"
    acc = jnp.array(acc)
    pointer = acc.unsafe_buffer_pointer()
    for _ in range(2):  # twice: the semaphores a launch leaves must let the next one run right
        out, h = step(x, jnp.array(acc), h)
    out, h = step(x, acc, h)
    assert out.unsafe_buffer_pointer() == pointer, "acc was copied"
    assert out.shape == (m, hidden) and out.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"


def test_plan_and_refusals():
    # Qwen2.5-0.5B on the H200's 132 SMs: 152 gate_up items (20 programs run two), 76 down_proj tiles
    # of 224 columns x 256 K on the programs with one.
    plan = plan_for(64, 896, 4864, 896, programs=132)
    assert (plan.items1, plan.items2, plan.block_n2, plan.boxes2, plan.items_per_split) == (152, 76, 224, 4, 8)
    assert plan.items2 <= 2 * plan.programs - plan.items1 and plan.smem_bytes() <= 227 * 1024
    assert supports(64, 896, 4864, 896) and not supports(72, 896, 4864, 896) and not supports(12, 896, 4864, 896)
    assert plan_for(64, 896, 4864, 896, programs=70) is None  # every program would run two items
    x = jnp.zeros((16, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="w_down"):
        fused_mlp_mgpu(x, jnp.zeros((128, 128), jnp.bfloat16), jnp.zeros((64, 32), jnp.bfloat16), jnp.zeros((16, 64)))
    with pytest.raises(ValueError, match="acc"):
        fused_mlp_mgpu(x, jnp.zeros((128, 128), jnp.bfloat16), jnp.zeros((64, 64), jnp.bfloat16), jnp.zeros((16, 32)))
    with pytest.raises(ValueError, match="no fused MLP plan"):
        fused_mlp_mgpu(jnp.zeros((12, 128), jnp.bfloat16), jnp.zeros((128, 128), jnp.bfloat16),
                       jnp.zeros((64, 64), jnp.bfloat16), jnp.zeros((12, 64)))


def test_model_decode_step_with_the_fused_mlp(monkeypatch):
    # model.FUSED_MLP: under ACCUMULATE's glue each layer's MLP is one launch, its SwiGLU buffer handed
    # from layer to layer; the logits are the two-kernel MLP's within bf16's tolerance.
    from jaxserve import model as model_module
    from tests.test_skinny_matmul_mgpu import _tiny_bf16_decode_step

    fm = importlib.import_module("kernels.fused_mlp_mgpu")
    calls = []
    monkeypatch.setattr(fm, "fused_mlp_mgpu", lambda *a, _f=fm.fused_mlp_mgpu, **k: calls.append(k["h"]) or _f(*a, **k))
    monkeypatch.setattr(model_module, "MGPU_MIN_ROWS", 8)
    rng, seed = fresh_rng()
    cfg, run = _tiny_bf16_decode_step(rng, 16)
    ref = jax.jit(lambda: run())()
    assert not calls
    monkeypatch.setattr(model_module, "FUSED_MLP", True)
    out = jax.jit(lambda: run())()
    assert len(calls) == cfg.num_hidden_layers and calls[0] is None and calls[1] is not None
    assert not np.isnan(np.asarray(out)).any(), f"seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
