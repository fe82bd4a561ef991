"""Every Pallas kernel lowers to Triton for CUDA, on the CPU.

`jax.export` lowers a jitted function for a platform this machine does not have; with interpret
mode off, each `pallas_call` then goes through JAX's Triton lowering exactly as on the GPU (the
Triton-to-PTX compile is XLA's, at GPU compile time, and is not run here). So a kernel that
lowers in interpret mode but not for Triton (a Python int yielded from a loop, an index form
Triton has no rule for) fails here in CI instead of in a device call: session 15's first try of
an unprefetched block loop (`scf.yield` of a Python int) would have.

Inputs are abstract (`jax.ShapeDtypeStruct`): nothing is allocated, so the real Qwen2.5-0.5B
head and projection shapes cost only tracing time.
"""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import pytest

from jaxserve.config import ModelConfig
from jaxserve.lora import fold_width
from jaxserve.model import PagedAttention, Qwen2ForCausalLM, init_params, new_kv_cache
from jaxserve_kernels import cache_scatter, paged_attention, paged_prefill_attention
from jaxserve_kernels.decode_attention import fused_decode_attention_o
from jaxserve_kernels.greedy_pick import greedy_pick
from jaxserve_kernels.kv_touch import touch_pages

compat = importlib.import_module("jaxserve_kernels.pallas_compat")
sm = importlib.import_module("jaxserve_kernels.skinny_matmul")  # the package exports a function of that name

# Qwen2.5-0.5B's shapes, two layers.
CFG = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                  num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6)
PAGE, PAGES, TABLE = 16, 1024, 16


@pytest.fixture
def compiled_kernels(monkeypatch):
    """The kernels as the GPU runs them: no interpret mode, whatever the backend."""
    monkeypatch.setattr(compat, "resolve_interpret", lambda interpret: bool(interpret))


def lower_for_cuda(fn, *args) -> str:
    """`fn(*args)` lowered for CUDA (Triton kernels included); its StableHLO text."""
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(name)
                         for name in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2")])(*args)
    return exported.mlir_module()


def decode_step_text(batch: int, kv_dtype=jnp.bfloat16, loras: int = 0, folded: bool = False) -> str:
    """The StableHLO of a ``batch``-row decode step; with ``loras``, rank-16 adapters in that many slots (and with
    ``folded`` their stacks as the folded terms read them, as `LoraSlots(folded=True)` keeps them)."""
    model = Qwen2ForCausalLM(CFG, jnp.bfloat16)
    params = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0), jnp.bfloat16))
    kv = jax.eval_shape(lambda: new_kv_cache(CFG, PAGES, PAGE, kv_dtype))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    h, kvh, d = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    dims = {"qkv_proj": (CFG.hidden_size, (h + 2 * kvh) * d), "o_proj": (h * d, CFG.hidden_size),
            "gate_up_proj": (CFG.hidden_size, 2 * CFG.intermediate_size),
            "down_proj": (CFG.intermediate_size, CFG.hidden_size)}
    ab = lambda n: tuple(jax.ShapeDtypeStruct((loras, 16, n), jnp.bfloat16)  # noqa: E731  (`LoraSlots`' form)
                         for _ in range(CFG.num_hidden_layers))
    lora = {"weights": {p: (ab(i), ab(o)) for p, (i, o) in dims.items()}, "slots": i32(batch)} if loras else None
    if loras and folded:
        cols = lambda *shape: tuple(jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
                                    for _ in range(CFG.num_hidden_layers))
        lora["folded"] = {p: (cols(fold_width(loras * 16), i), cols(o, fold_width(loras * 16)))
                          for p, (i, o) in dims.items()}

    def step(params, kv, tokens, positions, slots, tables, lengths, lora):
        paged = PagedAttention(slots, tables, lengths, lengths - 1, impl="pallas")
        return model.apply({"params": params}, tokens, positions, kv=kv, paged=paged, lora=lora)

    return lower_for_cuda(step, params, kv, i32(batch, 1), i32(batch, 1), i32(batch, 1), i32(batch, TABLE),
                          i32(batch), lora)


def triton_kernel_names(text: str) -> set[str]:
    """Names of the Triton kernels in lowered StableHLO (calls of one jitted kernel share a function)."""
    return {m for line in text.splitlines() if "__gpu$xla.gpu.triton" in line
            for m in re.findall(r'name = "([^"]*)"', line)}


ONE_ROW = {"skinny_matmul_norm_none", "skinny_matmul_norm_swiglu", "fused_decode_attention", "skinny_matmul"}
ROWS = {"add_rms_norm", "fused_decode_attention", "skinny_matmul"}
# (batch, skinny_matmul settings, kernels expected): the default one-row path (norms folded into
# QKV and gate_up), its experimental tilings, and the several-row tensor-core path.
DECODE_CASES = [
    (1, {}, ONE_ROW),
    (1, {"NORM_GEMV_TILES": {"none": dict(block_n=4), "swiglu": dict(block_n=2, num_programs=528)},
         "NK_GEMV_PREFETCH": True, "NK_GEMV_BLOCK_N": 4}, ONE_ROW),
    (16, {}, ROWS),
    (64, {}, ROWS),
]


@pytest.mark.parametrize("batch,settings,expected", DECODE_CASES)
def test_decode_step_lowers_to_triton_for_cuda(compiled_kernels, monkeypatch, batch, settings, expected):
    # Every projection on Triton, 64 rows included (model.SKINNY_BACKEND's Mosaic GPU path: below).
    monkeypatch.setattr(importlib.import_module("jaxserve.model"), "SKINNY_BACKEND", "triton")
    for name, value in settings.items():
        monkeypatch.setattr(sm, name, value)
    names = triton_kernel_names(decode_step_text(batch))
    assert expected <= names, names


def test_interpret_mode_does_not_lower_to_triton():
    # The check above means something only if interpret mode lowers no Triton call.
    x = jax.ShapeDtypeStruct((1, 896), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1152, 896), jnp.bfloat16)
    text = lower_for_cuda(lambda x, w: sm.skinny_matmul(x, w, layout="nk", interpret=True), x, w)
    assert "__gpu$xla.gpu.triton" not in text


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


# The kernels outside the decode step (prefill, the unfused decode path, the greedy pick), at
# Qwen2.5-0.5B heads: (name, function of abstract inputs, inputs).
POOL = _sds((2, PAGES, PAGE, 64))


def pool_kernel_cases(pool) -> list[tuple]:
    """The unfused decode, prefill and scatter kernels over a pool like ``pool``: (name, function, inputs)."""
    return [
        ("paged_attention", lambda q, kp, vp, t, n: paged_attention(q, kp, vp, t, n, num_splits=4),
         (_sds((8, 14, 64)), pool, pool, _sds((8, 64), jnp.int32), _sds((8,), jnp.int32))),
        ("paged_prefill_attention", paged_prefill_attention,
         (_sds((2, 128, 14, 64)), pool, pool, _sds((2, 64), jnp.int32), _sds((2,), jnp.int32),
          _sds((2,), jnp.int32))),
        ("cache_scatter", cache_scatter,
         (pool, pool, _sds((300, 2, 64)), _sds((300, 2, 64)), _sds((300,), jnp.int32))),
    ]


STANDALONE = [
    *pool_kernel_cases(POOL),
    ("paged_attention_inkernel_merge",
     lambda q, kp, vp, t, n: paged_attention(q, kp, vp, t, n, num_splits=4, combine="inkernel"),
     (_sds((8, 14, 64)), POOL, POOL, _sds((8, 64), jnp.int32), _sds((8,), jnp.int32))),
    ("greedy_pick", greedy_pick, (_sds((64, CFG.vocab_size)),)),
    ("kv_touch", touch_pages, (POOL, POOL, _sds((64, 16), jnp.int32), _sds((64,), jnp.int32))),
    *[(f"fused_decode_attention_o_prefetch{prefetch}",
       functools.partial(fused_decode_attention_o, prefetch_wo=prefetch),
       (_sds((1, 18, 64)), _sds((1, 64), jnp.float32), _sds((1, 64), jnp.float32), POOL, POOL,
        _sds((1, 16), jnp.int32), _sds((1,), jnp.int32), _sds((1,), jnp.int32), _sds((896, 896))))
      for prefetch in (False, True)],
]


@pytest.mark.parametrize("name,fn,args", STANDALONE, ids=[case[0] for case in STANDALONE])
def test_standalone_kernels_lower_to_triton_for_cuda(compiled_kernels, name, fn, args):
    assert triton_kernel_names(lower_for_cuda(fn, *args)), name


@pytest.mark.parametrize("batch,expected", [(1, ONE_ROW), (16, ROWS)])
def test_decode_step_over_fp8_pool_lowers_to_triton_for_cuda(compiled_kernels, monkeypatch, batch, expected):
    # EngineConfig.kv_cache_dtype="fp8": the fused attention's loads widen e4m3 keys and its write saturates.
    monkeypatch.setattr(importlib.import_module("jaxserve.model"), "SKINNY_BACKEND", "triton")
    assert expected <= triton_kernel_names(decode_step_text(batch, jnp.float8_e4m3fn))


FP8_CASES = pool_kernel_cases(_sds((2, PAGES, PAGE, 64), jnp.float8_e4m3fn))


@pytest.mark.parametrize("name,fn,args", FP8_CASES, ids=[case[0] for case in FP8_CASES])
def test_kernels_over_fp8_pools_lower_to_triton_for_cuda(compiled_kernels, name, fn, args):
    assert triton_kernel_names(lower_for_cuda(fn, *args)), name


def test_decode_step_with_o_in_attention_lowers_to_triton_for_cuda(compiled_kernels, monkeypatch):
    monkeypatch.setattr(importlib.import_module("jaxserve.model"), "O_IN_ATTENTION", True)
    assert ONE_ROW <= triton_kernel_names(decode_step_text(1))


@pytest.mark.parametrize("batch", [64, 128])
def test_decode_step_with_mgpu_projections_lowers_for_cuda(compiled_kernels, monkeypatch, batch):
    # model.SKINNY_BACKEND "mgpu" (the default): a 64- or 128-row step's four projections as Mosaic
    # GPU kernels (their lowering to Mosaic GPU's MLIR runs here; its compile to PTX, on the GPU
    # only), the glue kernels still Triton (128 rows: model.MGPU_MAX_ROWS, not cuBLAS).
    text = decode_step_text(batch)
    assert text.count("custom_call @mosaic_gpu_v2") >= 4, "the projections did not go to Mosaic GPU"
    names = triton_kernel_names(text)
    assert {"add_rms_norm", "fused_decode_attention"} <= names and "skinny_matmul" not in names, names


@pytest.mark.parametrize("glue,kernels,shrink", [(True, False, "kernel"), (False, False, "kernel"),
                                                 (True, True, "kernel"), (False, True, "xla"),
                                                 (False, True, "unrolled")])
def test_decode_step_with_adapters_lowers_for_cuda(compiled_kernels, monkeypatch, glue, kernels, shrink):
    # model.LORA_GLUE: a 64-row step with adapter rows on the accumulating glue (its norms in add_rms_norm, the
    # projections on Mosaic GPU, the adapters' products XLA's, or with LORA_KERNELS lora_matmul's: down_proj's
    # 4,864 wide input through the split shrink, or with lora_matmul.SHRINK "xla" every shrink XLA's, or their loops
    # written out, lora_matmul.UNROLL); off, the plain path (XLA's norms).
    model = importlib.import_module("jaxserve.model")
    monkeypatch.setattr(model, "LORA_GLUE", glue)
    monkeypatch.setattr(model, "LORA_KERNELS", kernels)
    lora_matmul = importlib.import_module("jaxserve_kernels.lora_matmul")
    monkeypatch.setattr(lora_matmul, "SHRINK", "xla" if shrink == "xla" else "kernel")
    monkeypatch.setattr(lora_matmul, "UNROLL", shrink == "unrolled")
    text = decode_step_text(64, loras=4)
    assert text.count("custom_call @mosaic_gpu_v2") >= 4, "the projections did not go to Mosaic GPU"
    names = triton_kernel_names(text)
    assert "fused_decode_attention" in names and ("add_rms_norm" in names) == glue, names
    assert ({"lora_add", "lora_swiglu"} <= names) == kernels, names
    assert ("lora_shrink" in names) == (kernels and shrink != "xla"), names


def test_decode_step_with_folded_adapter_terms_lowers_for_cuda(compiled_kernels, monkeypatch):
    # model.LORA_FOLD_TRITON (no folded stacks kept): a 64-row adapter step's projections all on Triton's
    # skinny_matmul, each adding its rows' adapter terms after a shrink launch of its own; no Mosaic GPU projection,
    # no lora_matmul launch.
    model = importlib.import_module("jaxserve.model")
    monkeypatch.setattr(model, "LORA_FOLD", True)
    monkeypatch.setattr(model, "LORA_FOLD_TRITON", True)
    monkeypatch.setattr(model, "LORA_GLUE", False)
    text = decode_step_text(64, loras=4)
    assert "custom_call @mosaic_gpu_v2" not in text
    names = triton_kernel_names(text)
    assert {"skinny_matmul", "fused_decode_attention"} <= names, names
    assert not names & {"lora_add", "lora_swiglu", "lora_shrink", "add_rms_norm"}, names


@pytest.mark.parametrize("glue,shrink_kernel,norm_shrink,attention_shrink,down_shrink", [
    (False, False, True, True, True), (True, False, False, False, False), (True, True, False, False, False),
    (True, False, True, False, False), (True, False, True, True, False), (True, False, True, True, True)])
def test_decode_step_with_adapter_terms_in_the_mgpu_projections_lowers_for_cuda(compiled_kernels, monkeypatch, glue,
                                                                               shrink_kernel, norm_shrink,
                                                                               attention_shrink, down_shrink):
    # model.LORA_FOLD with the folded stacks kept: every projection of a 64-row adapter step on Mosaic GPU with its
    # rows' terms as extra K steps (4 a layer); the shrinks XLA's, or with LORA_SHRINK_MAX_K those of the 896-wide
    # inputs Triton's skinny_matmul with each row's own slot kept; no LoRA kernel. On the accumulating glue
    # (LORA_GLUE) QKV, o and down add into their float32 accumulators, with LORA_NORM_SHRINK the norms write QKV's
    # and gate_up's shrinks, and with LORA_ATTENTION_SHRINK the fused attention (unsplit at this table) o_proj's,
    # a part a KV head, which o's term reads over one expand stack (256 columns over 128), and with LORA_DOWN_SHRINK
    # down_proj's kernel its own shrink (no term: the next norm adds its expand); the plain path has none.
    model = importlib.import_module("jaxserve.model")
    monkeypatch.setattr(model, "LORA_FOLD", True)
    monkeypatch.setattr(model, "LORA_GLUE", glue)
    monkeypatch.setattr(model, "LORA_SHRINK_MAX_K", 1024 if shrink_kernel else 0)
    monkeypatch.setattr(model, "LORA_NORM_SHRINK", norm_shrink)
    monkeypatch.setattr(model, "LORA_ATTENTION_SHRINK", attention_shrink)
    monkeypatch.setattr(model, "LORA_DOWN_SHRINK", down_shrink)
    text = decode_step_text(64, loras=4, folded=True)
    in_attention, in_down = glue and attention_shrink, glue and down_shrink
    if not shrink_kernel:  # XLA's shrink products (a [64, 128] result): four a layer, fewer under the kernels' own
        shrinks = len(re.findall(r"dot_general.*-> tensor<64x128xbf16>", text))
        made = (2 if glue and norm_shrink else 0) + in_attention + in_down
        assert shrinks == (4 - made) * CFG.num_hidden_layers, shrinks
    # (a jitted kernel is one function however many layers call it)
    kind = "accumulate" if glue else "partials"
    terms = {f"{kind}_1152x896", f"{kind}_896x896" + ("_term256" if in_attention else ""), "swiglu_9728x896"}
    terms |= set() if in_down else {f"{kind}_896x4864"}
    found = {name + ("" if width == "128" else f"_term{width}")
             for name, width in re.findall(r"skinny_mgpu_(\w+?)_term(\d+)\b", text)}
    assert found == terms, (found, text.count("mosaic_gpu_v2"))
    # down_proj's shrink: 4 slots of rank 16, 64 columns past its weight's
    assert ("skinny_mgpu_accumulate_896x4864_shrink64" in text) == in_down
    assert text.count("custom_call @mosaic_gpu_v2") == len(terms) + in_down
    names = triton_kernel_names(text)
    assert "fused_decode_attention" in names and ("add_rms_norm" in names) == glue, names
    assert ("skinny_matmul" in names) == shrink_kernel and not names & {"lora_add", "lora_swiglu", "lora_shrink"}, names


def test_decode_step_with_kv_read_ahead_lowers_for_cuda(compiled_kernels, monkeypatch):
    monkeypatch.setattr(importlib.import_module("jaxserve.model"), "KV_TOUCH", "early")
    # The attention takes the read-ahead's output as an operand (XLA's compile drops a kernel whose result nobody
    # reads: session 54's first GPU run of it had no kv_touch launch).
    assert "kv_touch" in triton_kernel_names(decode_step_text(64))


@pytest.mark.parametrize("epilogue,n,k", [("swiglu", 9728, 896), ("partials", 896, 4864), ("none", 1152, 896)])
def test_two_warpgroup_projection_lowers_for_cuda(compiled_kernels, epilogue, n, k):
    # jaxserve_kernels.skinny_matmul_mgpu's warp-specialized variant (experimental) at batch 256's 0.5B
    # shapes: the pipeline's memory and compute warpgroups lower to Mosaic GPU's MLIR here.
    from jaxserve_kernels.skinny_matmul_mgpu import skinny_matmul_mgpu

    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    text = lower_for_cuda(lambda x, w: skinny_matmul_mgpu(x, w, epilogue=epilogue, block_n=32, num_slots=4,
                                                          block_m=128, warpgroups=2), bf16(256, k), bf16(n, k))
    assert text.count("custom_call @mosaic_gpu_v2") == 1
