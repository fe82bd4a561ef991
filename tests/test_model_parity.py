"""The Flax Qwen2 matches Hugging Face transformers (PyTorch) on the same checkpoint."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxserve
from jaxserve.config import ModelConfig
from jaxserve.model import Qwen2ForCausalLM
from jaxserve.weights import load_converted, load_hf_params, save_converted
from tests.conftest import make_hf_checkpoint

CASES = [
    # name, checkpoint kwargs
    ("untied_gqa2_hd16", dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)),
    ("tied_gqa1_hd32", dict(num_attention_heads=2, num_key_value_heads=2, hidden_size=64, head_dim=32,
                            tie_word_embeddings=True, rope_theta=1e6)),
    ("untied_gqa7_hd32_sharded", dict(num_attention_heads=7, num_key_value_heads=1, hidden_size=96, head_dim=32,
                                      rope_theta=5e5, max_shard_size="100KB")),
    ("tied_gqa2_hd64", dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=128, head_dim=64,
                            tie_word_embeddings=True, rope_theta=1e4, num_hidden_layers=3)),
    # Long-context RoPE scaling (config.json's rope_scaling): YaRN as the Qwen2.5 model cards set it past 32k (a
    # window of 32 here, so the ramp falls inside head_dim 32's frequencies), and linear.
    ("yarn_hd32", dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=128, head_dim=32, rope_theta=1e4,
                       max_position_embeddings=128,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    ("linear_hd16", dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, rope_theta=1e4,
                         rope_scaling={"rope_type": "linear", "factor": 2.5})),
]


def dense_greedy(model: Qwen2ForCausalLM, params, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence (the dense reference path).

    The sequence is right-padded to its final length so that one compilation serves every
    step (one per length took ~30 s a test); causal attention keeps the padding invisible.
    """
    total = len(prompt) + steps
    apply = jax.jit(lambda p, t, last: model.apply({"params": p}, t)[0][0, last])
    ids = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, total), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(apply(params, padded, len(ids) - 1))))
    return ids[len(prompt):]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_logits_and_greedy_match_transformers(tmp_path, name, kwargs):
    path = str(tmp_path / name)
    hf = make_hf_checkpoint(path, seed=hash(name) % 1000, **kwargs)
    if kwargs.get("max_shard_size"):
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    m = jaxserve.load(path)
    model = Qwen2ForCausalLM(m.config)

    rng = np.random.default_rng()
    tokens = rng.integers(0, m.config.vocab_size, size=(3, 17))
    # Jitted: eagerly each of the model's few hundred ops compiles on its own for this case's shapes (~2 s).
    ours, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(m.params, jnp.asarray(tokens, jnp.int32))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

    prompt = rng.integers(3, m.config.vocab_size, size=7).tolist()
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert dense_greedy(model, m.params, prompt, 32) == hf_out


def test_bfloat16_load_is_close(tmp_path):
    path = str(tmp_path / "ck")
    hf = make_hf_checkpoint(path)
    params = load_hf_params(path, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    cfg = ModelConfig.from_pretrained(path)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, size=(2, 9))
    model = Qwen2ForCausalLM(cfg, jnp.bfloat16)
    ours, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, jnp.asarray(tokens, jnp.int32))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    assert np.max(np.abs(np.asarray(ours) - ref)) < 0.1 * np.max(np.abs(ref)) + 0.05


def test_converted_params_round_trip(tmp_path):
    src, dst = str(tmp_path / "hf"), str(tmp_path / "converted")
    make_hf_checkpoint(src)
    m = jaxserve.load(src)
    save_converted(m.params, m.config, dst, extra_files_from=src)
    again = load_converted(dst)
    jax.tree_util.tree_map(np.testing.assert_array_equal, m.params, again)
    loaded = jaxserve.load(dst)
    assert loaded.config == m.config
    assert loaded.tokenizer.encode("hello world") == m.tokenizer.encode("hello world")


def test_converted_params_load_in_the_models_weight_layout(tmp_path, monkeypatch):
    # Saved with projections [in, out], loaded by a model that stores them [out, in] (and back):
    # the same weights, transposed, and the same logits.
    from jaxserve import model as model_module
    from jaxserve.model import convert_weight_layout

    src, dst = str(tmp_path / "hf"), str(tmp_path / "converted")
    make_hf_checkpoint(src)
    monkeypatch.setattr(model_module, "WEIGHT_LAYOUT", "kn")
    m = jaxserve.load(src)
    save_converted(m.params, m.config, dst, extra_files_from=src)
    tokens = jnp.array([[1, 5, 9, 2]])
    # Jitted (a new function for each layout: the layout is read when it traces).
    logits, _ = jax.jit(lambda p: Qwen2ForCausalLM(m.config).apply({"params": p}, tokens))(m.params)
    monkeypatch.setattr(model_module, "WEIGHT_LAYOUT", "nk")
    nk = load_converted(dst)
    jax.tree_util.tree_map(np.testing.assert_array_equal, convert_weight_layout(m.params, "kn", "nk"), nk)
    nk_logits, _ = jax.jit(lambda p: Qwen2ForCausalLM(m.config).apply({"params": p}, tokens))(nk)
    np.testing.assert_allclose(nk_logits, logits, rtol=1e-5, atol=1e-5)
    assert nk["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (m.config.hidden_size, m.config.intermediate_size)
    save_converted(nk, m.config, dst)
    monkeypatch.setattr(model_module, "WEIGHT_LAYOUT", "kn")
    jax.tree_util.tree_map(np.testing.assert_array_equal, m.params, load_converted(dst))


def test_params_in_the_other_layout_are_refused_with_the_fix_named(tmp_path):
    from jaxserve.model import convert_weight_layout
    from jaxserve.runner import Runner

    src = str(tmp_path / "hf")
    make_hf_checkpoint(src)
    m = jaxserve.load(src)
    other = convert_weight_layout(m.params, "nk", "kn")
    with pytest.raises(ValueError, match="convert_weight_layout"):
        Runner(m.config, other, num_pages=8, page_size=4)


def test_missing_shard_is_named(tmp_path):
    path = str(tmp_path / "ck")
    make_hf_checkpoint(path, max_shard_size="100KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf_params(path)


def test_wrong_shape_is_named(tmp_path):
    path = str(tmp_path / "ck")
    make_hf_checkpoint(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 96
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"):
        load_hf_params(path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = str(tmp_path / "ck")
    make_hf_checkpoint(path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*model\.layers\.0\.extra\.weight"):
        load_hf_params(path)
    del tensors["model.layers.0.extra.weight"], tensors["model.norm.weight"]
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"missing tensor\(s\).*model\.norm\.weight"):
        load_hf_params(path)


def test_unsupported_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported architecture.*llama"):
        ModelConfig.from_hf_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                  "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                  "num_attention_heads": 1})


def test_config_reads_hf_fields(tmp_path):
    path = str(tmp_path / "ck")
    make_hf_checkpoint(path, num_attention_heads=7, num_key_value_heads=1, hidden_size=96, head_dim=32,
                       rope_theta=123456.0, tie_word_embeddings=True)
    cfg = ModelConfig.from_pretrained(path)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.q_per_kv) == (7, 1, 32, 7)
    assert cfg.rope_theta == 123456.0 and cfg.tie_word_embeddings and cfg.eos_token_ids == (2,)


def test_config_reads_rope_scaling_in_either_spelling_and_refuses_what_it_cannot_do():
    """transformers 4 writes `rope_scaling` beside `rope_theta` (the released Qwen2.5 checkpoints), transformers 5
    both in `rope_parameters`; a type jaxserve does not compute is refused by name, not silently dropped."""
    from jaxserve.config import RopeScaling

    base = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    old = ModelConfig.from_hf_dict({**base, "rope_theta": 1e6, "rope_scaling": yarn})
    new = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 32768}})
    assert old == new and old.rope_theta == 1e6
    assert old.rope_scaling == RopeScaling("yarn", 4.0, 32768)
    assert ModelConfig.from_hf_dict(old.to_hf_dict()) == old
    assert ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}
                                    ).rope_scaling is None
    assert hash(old) != hash(ModelConfig.from_hf_dict(base))  # a static argument of the jitted steps
    for kind in ("dynamic", "longrope", "llama3"):
        with pytest.raises(ValueError, match=f"rope_scaling .*{kind}.* not supported"):
            ModelConfig.from_hf_dict({**base, "rope_scaling": {"type": kind, "factor": 2.0}})
    with pytest.raises(ValueError, match="no factor"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"type": "yarn"}})
    with pytest.raises(ValueError, match="factor must be > 0"):
        RopeScaling("linear", -1.0)


def test_chat_template_comes_from_the_checkpoint(tmp_path):
    from jaxserve.tokenizer import apply_chat_template

    path = str(tmp_path / "ck")
    make_hf_checkpoint(path)
    tok = jaxserve.load(path).tokenizer
    ids = apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_tables_repeat_modes_give_the_same_bits(head_dim, monkeypatch):
    """`model.ROPE_REPEAT` only changes how the half tables fill both halves: the same bits, and the layout Hugging
    Face's Qwen2 uses (each half the other's copy), at fresh positions of a [batch, tokens] grid and of a decode row."""
    from jaxserve import model as model_module

    rng = np.random.default_rng()
    for positions in (rng.integers(0, 40000, size=(3, 5)), rng.integers(0, 40000, size=(7,))):
        tables = {}
        for mode in ("concat", "broadcast"):
            monkeypatch.setattr(model_module, "ROPE_REPEAT", mode)
            # A new function a mode: jit's cache would hand back the first mode's trace.
            tables[mode] = jax.jit(lambda p: model_module.rope_tables(p, head_dim, 1e6))(
                jnp.asarray(positions, jnp.int32))
        for got, want in zip(tables["broadcast"], tables["concat"]):
            assert got.shape == (*positions.shape, head_dim) and got.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"positions={positions}")
            np.testing.assert_array_equal(np.asarray(got)[..., :head_dim // 2], np.asarray(got)[..., head_dim // 2:])


def test_no_project_module_shadows_hugging_face_kernels():
    # transformers imports Hugging Face's `kernels` package wherever that distribution is installed
    # (CI's Python has it); a top-level `kernels` of ours, first on sys.path from the repository root,
    # broke every transformers import there ("cannot import name 'CUDAProperties' from 'kernels'").
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        return
    origin = pathlib.Path(spec.origin).resolve()
    # An installed package is no shadow, even in a virtual environment made inside the repository (.venv/).
    assert "site-packages" in origin.parts or root not in origin.parents, spec.origin
