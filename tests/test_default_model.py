"""The embedded default model loads like any Hugging Face checkpoint and writes the text it was shipped with."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxserve
from jaxserve.loading import DEFAULT_MODEL_DIR
from jaxserve.model import Qwen2ForCausalLM, param_count

# Recorded from the shipped weights: CPU, float32, greedy (see jaxserve/default_model/MODEL_CARD.md).
RECORDED_PROMPT = "def fibonacci(n):"
RECORDED_COMPLETION = " pass\ndef fibonen(n): pass\ndef fibonen(n): pass\ndef fibon"


@pytest.fixture(scope="module")
def default_model():
    return jaxserve.load()


def dense_greedy(model: jaxserve.LoadedModel, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence each step (one fixed-length buffer, one compile)."""
    net = Qwen2ForCausalLM(model.config)
    next_logits = jax.jit(lambda p, buf, pos: jax.lax.dynamic_index_in_dim(
        net.apply({"params": p}, buf)[0][0], pos, keepdims=False))
    buf = np.zeros((1, len(prompt) + steps), np.int32)
    buf[0, :len(prompt)] = prompt
    for pos in range(len(prompt) - 1, buf.shape[1] - 1):
        buf[0, pos + 1] = int(jnp.argmax(next_logits(model.params, jnp.asarray(buf), pos)))
    return buf[0, len(prompt):].tolist()


def test_default_folder_is_a_small_hf_checkpoint():
    names = set(os.listdir(DEFAULT_MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "MODEL_CARD.md"} <= names
    assert sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, n)) for n in names) < 40 * 2 ** 20


def test_default_model_loads_through_jaxserve_load(default_model):
    cfg = default_model.config
    assert default_model.path == DEFAULT_MODEL_DIR
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (8, 2, True)
    assert cfg.vocab_size == len(default_model.tokenizer) == 8192
    assert 1_000_000 < param_count(default_model.params) < 30_000_000
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(default_model.params))


def test_tokenizer_has_chatml_and_stop_tokens(default_model):
    tok = default_model.tokenizer
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == default_model.config.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with open(os.path.join(DEFAULT_MODEL_DIR, "generation_config.json")) as f:
        eos = json.load(f)["eos_token_id"]
    assert eos == tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    ids = tok.encode("def f(x):\n    return 'é'\n", add_special_tokens=False)
    assert tok.decode(ids) == "def f(x):\n    return 'é'\n"


def test_transformers_greedy_matches_ours(default_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    prompt = default_model.tokenizer.encode("def ", add_special_tokens=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert dense_greedy(default_model, prompt, 16) == ref


def test_greedy_completion_equals_recorded_text(default_model):
    tok = default_model.tokenizer
    ids = dense_greedy(default_model, tok.encode(RECORDED_PROMPT, add_special_tokens=False), 24)
    assert tok.decode(ids) == RECORDED_COMPLETION
