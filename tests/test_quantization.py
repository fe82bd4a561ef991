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
    """With model.FP8_SKINNY, under the Pallas kernels (interpreted here) a quantized decode step's projections go
    through the skinny matmul with the float8 weights and their scales, and give the dequantized model's tokens and
    log-probabilities."""
    skinny = importlib.import_module("jaxserve_kernels.skinny_matmul")  # the package exports a function of that name

    m, _ = tiny
    seen = []
    kernel = skinny.skinny_matmul

    def spy(x, w, *args, **kw):
        seen.append((w.dtype, kw.get("scale") is not None))
        return kernel(x, w, *args, **kw)

    monkeypatch.setattr(skinny, "skinny_matmul", spy)
    monkeypatch.setattr("jaxserve.model.FP8_SKINNY", True)  # off by default until it has run compiled
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


def write_fp8_checkpoint(src: str, hf, dst: str, *, ignore: tuple[str, ...] = (), per_tensor: tuple[str, ...] = ()):
    """``hf``'s checkpoint at ``src`` rewritten at ``dst`` as llm-compressor writes an FP8 one (compressed-tensors,
    float8 e4m3 weights of every decoder Linear but ``ignore``'s, a float32 ``weight_scale`` per output channel, or
    one a tensor with a static ``input_scale`` beside it for ``per_tensor``'s); returns the torch model whose weights
    are what the quantized ones stand for, the reference."""
    import torch

    def quantize(name, module, state):
        w = module.weight.detach().float()
        amax = w.abs().amax().reshape(1) if name in per_tensor else w.abs().amax(dim=1, keepdim=True)
        scale = amax / 448.0
        q = (w / scale).to(torch.float8_e4m3fn)
        state[name + ".weight"], state[name + ".weight_scale"] = q, scale
        if name in per_tensor:
            state[name + ".input_scale"] = torch.ones(1)
        return q.float() * scale

    return rewrite_linears(src, hf, dst, {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", *ignore],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8,
                                                                         "strategy": "channel"},
                                      "input_activations": {"type": "float", "num_bits": 8, "dynamic": True}}}},
        quantize, skip=ignore)


def rewrite_linears(src: str, hf, dst: str, quantization_config: dict, quantize, *, skip: tuple[str, ...] = ()):
    """``hf``'s checkpoint at ``src`` rewritten at ``dst`` as a quantized one: ``quantize(name, module, state)`` puts
    each decoder Linear's tensors (every one but the LM head and ``skip``'s, in module order) into the state dict and
    returns the float weight ``[out, in]`` they stand for; config.json gets ``quantization_config``. Returns a copy of
    ``hf`` holding those floats, the reference."""
    import copy
    import os

    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    ref = copy.deepcopy(hf)
    modules = dict(ref.named_modules())
    for name, module in hf.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head" or name in skip:
            continue
        weight = quantize(name, module, state)
        with torch.no_grad():
            modules[name].weight.copy_(weight)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    write_quantized_config(src, dst, quantization_config)
    return ref


def write_quantized_config(src: str, dst: str, quantization_config: dict) -> None:
    """``src``'s config.json with ``quantization_config`` and its tokenizer files, into ``dst`` (beside the weights)."""
    import json
    import os
    import shutil

    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def assert_like_hf(ref, prompts, outs) -> None:
    """Each output's tokens are transformers' greedy ones on ``ref`` and its log-probabilities within 1e-4 of its."""
    import torch

    from tests.test_engine import hf_greedy

    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(ref, prompt, len(out["token_ids"]))
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + out["token_ids"]])).logits[0].float()
        want = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(out["token_ids"])[:, None])
        np.testing.assert_allclose(out["logprobs"], want[:, 0].numpy(), rtol=1e-4, atol=1e-4)


def test_an_fp8_checkpoint_loads_as_it_is(tiny_checkpoint, tmp_path):
    """A compressed-tensors FP8 checkpoint (vLLM's usual fp8 format) runs on its float8 weights and scales: greedy
    tokens equal transformers' on the dequantized weights and log-probabilities within 1e-4 of its; a projection the
    checkpoint left unquantized takes its fused partner dequantized; a per-tensor scale is broadcast; saved and
    loaded again, the same bits."""
    from jaxserve.weights import save_converted, save_hf_checkpoint

    src, hf = tiny_checkpoint
    ref = write_fp8_checkpoint(src, hf, str(tmp_path), ignore=("model.layers.1.mlp.up_proj",),
                               per_tensor=("model.layers.0.self_attn.o_proj",))
    m = jaxserve.load(str(tmp_path))
    assert m.config.quantization == "fp8"
    layer0, layer1 = m.params["layers_0"], m.params["layers_1"]
    assert layer0["self_attn"]["qkv_proj"]["kernel"].dtype == FP8
    assert layer0["self_attn"]["qkv_proj"][SCALE].shape == (m.config.head_dim * (4 + 2 * 2),)
    assert len(set(np.asarray(layer0["self_attn"]["o_proj"][SCALE]).tolist())) == 1  # one scale for the tensor
    assert layer1["mlp"]["gate_up_proj"]["kernel"].dtype == jnp.float32 and SCALE not in layer1["mlp"]["gate_up_proj"]
    assert layer1["mlp"]["down_proj"]["kernel"].dtype == FP8
    prompts = random_prompts(m.config.vocab_size, (5, 23))
    with Engine(m, small_config()) as engine:  # no quantization asked: the checkpoint's own
        assert engine.runner.params["layers_0"]["mlp"]["down_proj"]["kernel"].dtype == FP8
        got = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert_all_pages_free(engine)
    assert_like_hf(ref, prompts, got)
    save_hf_checkpoint(m.params, m.config, tmp_path / "again")
    save_converted(m.params, m.config, tmp_path / "converted")
    for again in (jaxserve.load(str(tmp_path / "again")), jaxserve.load(str(tmp_path / "converted"))):
        assert again.config.quantization == "fp8"
        for a, b in zip(jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(again.params)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_unsupported_checkpoint_quantizations_are_refused_by_name(tiny_checkpoint, tmp_path):
    import json
    import os
    import shutil

    from jaxserve.config import ModelConfig

    src, _ = tiny_checkpoint
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    for qc, name in (({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
                     ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
                         "type": "int", "num_bits": 4, "strategy": "group"}}}}, "config_groups.g.weights")):
        with pytest.raises(ValueError, match=name):
            ModelConfig.from_hf_dict({**config, "quantization_config": qc})
    # float8 weights whose scale is missing
    shutil.copytree(src, tmp_path / "ckpt")
    import safetensors.numpy

    tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = np.asarray(jnp.asarray(tensors[name], FP8))
    safetensors.numpy.save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with open(tmp_path / "ckpt" / "config.json", "w") as f:
        json.dump({**config, "quantization_config": {"quant_method": "fbgemm_fp8"}}, f)
    with pytest.raises(ValueError, match="down_proj.weight is float8 but the checkpoint has no"):
        jaxserve.load(str(tmp_path / "ckpt"))
