"""AWQ and GPTQ checkpoints (`jaxserve.packed_weights`): a checkpoint written in each packed layout (by packers written
here from AutoAWQ's ``WQLinear_GEMM.from_linear`` and GPTQModel's ``pack_original`` loops, field by field: not the
loader's vectorized unpacking) loads as the floats its integers stand for, bit for bit, and runs as transformers does
on those floats (greedy tokens, log-probabilities); what the loader cannot unpack is refused by name."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jaxserve
from jaxserve import Engine, SamplingParams
from tests.test_engine import assert_all_pages_free, random_prompts, small_config
from tests.test_quantization import assert_like_hf, rewrite_linears, write_quantized_config

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: the word's field i holds column AWQ_ORDER[i] of its eight


def pack_awq(ints: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` 4-bit values -> ``[rows, cols / 8]`` int32 words, AutoAWQ's interleave."""
    words = np.zeros((ints.shape[0], ints.shape[1] // 8), np.uint32)
    for col in range(words.shape[1]):
        for i in range(8):
            words[:, col] |= ints[:, col * 8 + AWQ_ORDER[i]].astype(np.uint32) << (4 * i)
    return words.view(np.int32)


def pack_gptq_rows(ints: np.ndarray, bits: int) -> np.ndarray:
    """``[in, out]`` values -> ``[in * bits / 32, out]`` words, ``32 // bits`` consecutive input rows a word."""
    per = 32 // bits
    words = np.zeros((ints.shape[0] // per, ints.shape[1]), np.uint32)
    for row in range(words.shape[0]):
        for j in range(per):
            words[row] |= ints[row * per + j].astype(np.uint32) << (bits * j)
    return words.view(np.int32)


def pack_gptq_cols(ints: np.ndarray, bits: int) -> np.ndarray:
    """``[groups, out]`` values -> ``[groups, out * bits / 32]`` words along the outputs."""
    per = 32 // bits
    words = np.zeros((ints.shape[0], ints.shape[1] // per), np.uint32)
    for col in range(words.shape[1]):
        for j in range(per):
            words[:, col] |= ints[:, col * per + j].astype(np.uint32) << (bits * j)
    return words.view(np.int32)


def write_packed_checkpoint(src: str, hf, dst: str, qc: dict, *, seed: int = 0, skip: tuple[str, ...] = ()):
    """``hf``'s checkpoint at ``src`` with every decoder Linear but ``skip``'s replaced by random integers, zero points
    and float16 scales packed as ``qc`` says; returns the torch model holding the floats they stand for."""
    import torch

    rng = np.random.default_rng(seed)
    bits = qc["bits"]
    v1 = qc["quant_method"] == "gptq" and qc.get("checkpoint_format", "gptq") == "gptq"

    def quantize(name, module, state):
        out_f, in_f = module.weight.shape
        group = in_f if qc["group_size"] == -1 else qc["group_size"]
        groups = in_f // group
        q = rng.integers(0, 2 ** bits, (in_f, out_f))
        zeros = rng.integers(0, 2 ** bits, (groups, out_f))
        if v1:
            zeros = np.maximum(zeros, 1)  # stored minus one: a zero point of 0 does not survive the original format
        scales = (rng.uniform(0.5, 1.5, (groups, out_f)) * 0.3 / 2 ** bits).astype(np.float16)  # weights ~0.1
        g_idx = np.arange(in_f) // group
        if qc.get("desc_act"):
            g_idx = rng.permutation(g_idx)  # act-order: input rows quantized in another order, groups scattered
        w = (q - zeros[g_idx]).astype(np.float32) * scales[g_idx].astype(np.float32)  # [in, out]
        del state[name + ".weight"]
        if qc["quant_method"] == "awq":
            state[name + ".qweight"] = torch.from_numpy(pack_awq(q))
            state[name + ".qzeros"] = torch.from_numpy(pack_awq(zeros))
        else:
            state[name + ".qweight"] = torch.from_numpy(pack_gptq_rows(q, bits))
            state[name + ".qzeros"] = torch.from_numpy(pack_gptq_cols(zeros - 1 if v1 else zeros, bits))
            state[name + ".g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        state[name + ".scales"] = torch.from_numpy(scales)
        return torch.from_numpy(w.T.copy())

    return rewrite_linears(src, hf, dst, qc, quantize, skip=skip)


SCHEMES = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True,
            "modules_to_not_convert": ["model.layers.1.mlp.up_proj"]},
    "gptq4_act_order": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False},
    "gptq8_v2_one_group": {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False,
                           "checkpoint_format": "gptq_v2"},
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_a_packed_checkpoint_loads_as_the_floats_it_stands_for(scheme, tiny_checkpoint, tmp_path):
    """Each projection's loaded kernel is exactly the float32 its integers stand for (a module left out keeps its own
    weight); an engine on it gives transformers' greedy tokens on those floats, log-probabilities within 1e-4; saved
    again, it is a plain checkpoint of the same floats."""
    import torch

    from jaxserve.weights import save_hf_checkpoint

    src, hf = tiny_checkpoint
    qc = SCHEMES[scheme]
    skip = tuple(qc.get("modules_to_not_convert") or ())
    ref = write_packed_checkpoint(src, hf, str(tmp_path), qc, skip=skip)
    m = jaxserve.load(str(tmp_path), dtype="float32")
    assert m.config.quantization == qc["quant_method"] and m.config.packing.bits == qc["bits"]
    ref_state = ref.state_dict()
    layer = m.params["layers_1"]
    want = torch.cat([ref_state["model.layers.1.mlp.gate_proj.weight"], ref_state["model.layers.1.mlp.up_proj.weight"]])
    got = np.asarray(layer["mlp"]["gate_up_proj"]["kernel"])
    got = got if got.shape == tuple(want.shape) else got.T  # the model's weight layout
    np.testing.assert_array_equal(got, want.numpy())
    prompts = random_prompts(m.config.vocab_size, (4, 19))
    with Engine(m, small_config()) as engine:
        outs = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert_all_pages_free(engine)
    assert_like_hf(ref, prompts, outs)
    save_hf_checkpoint(m.params, m.config, tmp_path / "plain")
    with open(tmp_path / "plain" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    again = jaxserve.load(str(tmp_path / "plain"), dtype="float32")
    assert again.config.quantization is None
    np.testing.assert_array_equal(np.asarray(again.params["layers_1"]["mlp"]["gate_up_proj"]["kernel"]),
                                  np.asarray(layer["mlp"]["gate_up_proj"]["kernel"]))


@pytest.mark.parametrize("qc, field", [
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "awq", "bits": 8}, "bits must be 4 for awq"),
    ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits must be 4 or 8 for gptq"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True}, "is_marlin_format"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
])
def test_unpackable_schemes_are_refused_by_name(qc, field, tiny_checkpoint):
    from jaxserve.config import ModelConfig

    with open(os.path.join(tiny_checkpoint[0], "config.json")) as f:
        config = json.load(f)
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf_dict({**config, "quantization_config": qc})


def test_a_packed_tensor_missing_or_misshapen_is_named(tiny_checkpoint, tmp_path):
    import safetensors.numpy

    src, hf = tiny_checkpoint
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    write_packed_checkpoint(src, hf, str(tmp_path), qc)
    tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj"
    # Zero biases where the model has none, as some GPTQ exports write them: taken.
    zero_bias = {**tensors, name + ".bias": np.zeros(64, np.float16), "model.layers.1.mlp.down_proj.bias":
                 np.zeros(64, np.float16)}
    safetensors.numpy.save_file(zero_bias, str(tmp_path / "model.safetensors"))
    assert "bias" not in jaxserve.load(str(tmp_path)).params["layers_0"]["self_attn"]["o_proj"]
    for broken, message in (({k: v for k, v in tensors.items() if k != name + ".qzeros"}, f"{name}.qzeros is missing"),
                            ({**tensors, name + ".scales": tensors[name + ".scales"][:1]},
                             f"{name}.scales has shape"),
                            ({**zero_bias, name + ".bias": np.ones(64, np.float16)},
                             f"{name}.bias is not zero")):
        safetensors.numpy.save_file(broken, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            jaxserve.load(str(tmp_path))


def test_vllm_quantization_flags_naming_the_checkpoint_s_scheme_are_checked(tiny_checkpoint, tmp_path):
    """`vllm serve ...-AWQ -q awq` (or awq_marlin, gptq_marlin) works as it is: the scheme loads from config.json
    anyway, so the flag is checked against it, not applied; naming a scheme the checkpoint does not hold is refused."""
    from jaxserve import cli

    src, hf = tiny_checkpoint
    write_packed_checkpoint(src, hf, str(tmp_path), SCHEMES["awq"])
    for flag in ("awq", "awq_marlin"):
        args = cli.build_parser().parse_args(["serve", str(tmp_path), "-q", flag])
        args.model = args.model_tag
        assert cli.engine_config_from_args(args).quantization is None
    for model, flag in ((str(tmp_path), "gptq_marlin"), (src, "awq"), (None, "gptq")):
        args = cli.build_parser().parse_args(["serve", *([model] if model else []), "-q", flag])
        args.model = args.model_tag
        with pytest.raises(SystemExit, match=f"--quantization {flag}: the checkpoint"):
            cli.engine_config_from_args(args)
