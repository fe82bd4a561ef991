"""FP8 weight-only quantization (`jaxserve.quantization`, vLLM's ``--quantization fp8``): each weight within e4m3's
rounding of the original, the quantized engine exactly the model with the dequantized weights (greedy tokens and
log-probabilities) through prefill chunks, the prefix cache, sampling with penalties, speculation and an adapter, the
embedding, LM head and norms left as they were, the projections' bytes halved; bad values refused by name."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxserve
from jaxserve import Engine, EngineConfig, LoadedModel, LoRARequest, SamplingParams
from jaxserve.quantization import FP8, QUANTIZED, SCALE, dequantize, output_axis, quantize_fp8, quantize_params
from tests.test_engine import assert_all_pages_free, random_prompts, small_config, tiny  # noqa: F401  (fixture)

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)


def dequantized(params):
    """The model whose weights are what the quantized ones stand for: the reference a quantized engine must equal."""
    if not isinstance(params, dict):
        return params
    if SCALE in params:
        rest = {k: v for k, v in params.items() if k not in ("kernel", SCALE)}
        return {**rest, "kernel": dequantize(params["kernel"], params[SCALE], output_axis())}
    return {k: dequantized(v) for k, v in params.items()}


def test_each_weight_is_within_e4m3_rounding():
    w = jax.random.normal(jax.random.key(0), (64, 48)) * jnp.linspace(0.01, 3.0, 64)[:, None]
    w = w.at[5].set(0.0)  # an all-zero channel
    q, scale = quantize_fp8(w, axis=0)
    assert q.dtype == FP8 and scale.shape == (64,) and scale.dtype == jnp.float32
    err = jnp.abs(dequantize(q, scale, axis=0) - w)
    # 3 mantissa bits: half a unit in the last place is 2^-4 of the value; below e4m3's normals, half of the
    # subnormal step (2^-9 of the scale).
    assert bool(jnp.all(err <= jnp.abs(w) * 2.0 ** -4 + scale[:, None] * 2.0 ** -10))
    assert bool(jnp.all(dequantize(q, scale, axis=0)[5] == 0))
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == 448.0  # each channel's largest is e4m3's largest


def test_the_quantized_engine_is_the_model_with_dequantized_weights(tiny):  # noqa: F811
    m, _ = tiny
    ref = LoadedModel.from_params(dequantized(quantize_params(m.params)), m.config, m.tokenizer)
    prompts = random_prompts(m.config.vocab_size, (3, 17, 150))  # 150: three prefill chunks of 64
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=5, repetition_penalty=1.3, logprobs=0)
    with Engine(m, small_config(quantization="fp8", prefix_caching=True)) as engine:
        params = engine.runner.params
        for name in QUANTIZED:
            group = "self_attn" if name in ("qkv_proj", "o_proj") else "mlp"
            leaf = params["layers_1"][group][name]
            assert leaf["kernel"].dtype == FP8 and leaf[SCALE].dtype == jnp.float32
        assert params["embed_tokens"]["embedding"].dtype == jnp.float32 and params["lm_head"]["kernel"].dtype == \
            jnp.float32 and params["layers_0"]["self_attn"]["qkv_proj"]["bias"].dtype == jnp.float32
        got = engine.generate(prompts, GREEDY, use_tqdm=False)
        again = engine.generate(prompts[2:], GREEDY, use_tqdm=False)[0]  # its prefix cached now
        got_sampled = engine.generate(prompts, sampled, use_tqdm=False)
        assert again["cached_tokens"] > 0 and again["token_ids"] == got[2]["token_ids"]
        assert_all_pages_free(engine)
    with Engine(ref, small_config()) as engine:
        want = engine.generate(prompts, GREEDY, use_tqdm=False)
        want_sampled = engine.generate(prompts, sampled, use_tqdm=False)
    for a, b in zip(got + got_sampled, want + want_sampled):
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-4, atol=1e-5)
    with Engine(m, small_config(quantization="fp8", speculative_tokens=3)) as engine:
        loop = [[5, 6, 7, 8] * 6]
        spec = engine.generate(loop, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
        assert engine.stats()["spec_verify_calls"] > 0
        assert_all_pages_free(engine)
    plain = jaxserve.generate(ref, loop, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
    assert spec["token_ids"] == plain["token_ids"]


def test_the_skinny_kernel_reads_the_fp8_weights(tiny, monkeypatch):  # noqa: F811
    """Under the Pallas kernels (interpreted here) a quantized decode step's projections go through the skinny matmul
    with the float8 weights and their scales, and give the dequantized model's tokens and log-probabilities."""
    skinny = importlib.import_module("jaxserve_kernels.skinny_matmul")  # the package exports a function of that name

    m, _ = tiny
    seen = []
    kernel = skinny.skinny_matmul

    def spy(x, w, *args, **kw):
        seen.append((w.dtype, kw.get("scale") is not None))
        return kernel(x, w, *args, **kw)

    monkeypatch.setattr(skinny, "skinny_matmul", spy)
    ref = LoadedModel.from_params(dequantized(quantize_params(m.params)), m.config, m.tokenizer)
    prompts = random_prompts(m.config.vocab_size, (3, 20))
    got = jaxserve.generate(m, prompts, GREEDY, engine_config=small_config(quantization="fp8", attention_impl="pallas"),
                            use_tqdm=False)
    assert (FP8, True) in seen
    want = jaxserve.generate(ref, prompts, GREEDY, engine_config=small_config(), use_tqdm=False)
    for a, b in zip(got, want):
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-4, atol=1e-5)


def test_an_adapter_on_the_quantized_model(tiny, tmp_path):  # noqa: F811
    from tests.test_lora import make_adapter

    m, hf = tiny
    make_adapter(str(tmp_path), hf, seed=4)
    lora = LoRARequest("a", 1, str(tmp_path))
    ref = LoadedModel.from_params(dequantized(quantize_params(m.params)), m.config, m.tokenizer)
    prompts = random_prompts(m.config.vocab_size, (6, 30))
    got = jaxserve.generate(m, prompts, GREEDY, engine_config=small_config(quantization="fp8", max_loras=1),
                            lora_request=lora, use_tqdm=False)
    want = jaxserve.generate(ref, prompts, GREEDY, engine_config=small_config(max_loras=1), lora_request=lora,
                             use_tqdm=False)
    for a, b in zip(got, want):
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-4, atol=1e-5)


def test_weight_bytes_and_bad_values(tiny_checkpoint):
    path, _ = tiny_checkpoint
    with Engine(path, small_config(quantization="fp8")) as engine:  # from a path: quantized on the host first
        def projection_bytes(params):
            return sum(leaf["kernel"].nbytes for layer in (v for k, v in params.items() if k.startswith("layers_"))
                       for group in layer.values() for name, leaf in group.items() if name in QUANTIZED)

        assert projection_bytes(engine.runner.params) * 4 == projection_bytes(engine.model.params)  # float32 -> fp8
        assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)[0]["finish_reason"]
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int4")
    from jaxserve.cli import build_parser, engine_config_from_args

    assert engine_config_from_args(build_parser().parse_args(["generate", "-q", "fp8", "hi"])).quantization == "fp8"
