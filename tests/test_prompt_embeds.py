"""Prompts given as embeddings (vLLM's ``{"prompt_embeds": ...}``): greedy continuations of random embeddings are
transformers' (``inputs_embeds``) through prefill chunks, preemption and speculation; the embedding table's rows give
what their token ids give; such prompts never enter the prefix cache (their placeholder ids name no K/V) nor count as
penalized tokens; embeddings pool too; bad ones are refused by name; every page is free at the end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxserve
from jaxserve import Engine, PoolingParams, SamplingParams
from tests.test_engine import assert_all_pages_free, random_prompts, small_config, tiny  # noqa: F401  (fixture)

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)


def hf_greedy_embeds(hf, embeds: np.ndarray, n: int) -> list[int]:
    """transformers' greedy continuation of ``embeds`` ([len, hidden]), one token at a time."""
    x = torch.tensor(embeds)[None]
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(hf(inputs_embeds=x).logits[0, -1].argmax())
            out.append(token)
            x = torch.cat([x, hf.model.embed_tokens(torch.tensor([[token]]))], dim=1)
    return out


def random_embeds(rng, n: int, hidden: int) -> np.ndarray:
    return (rng.normal(size=(n, hidden)) * 0.5).astype(np.float32)


def test_random_embeddings_continue_as_transformers_through_chunks(tiny):  # noqa: F811
    m, hf = tiny
    rng = np.random.default_rng(0)
    embeds = [random_embeds(rng, n, m.config.hidden_size) for n in (1, 9, 150)]  # 150: three prefill chunks of 64
    with Engine(m, small_config()) as engine:
        outs = engine.generate([{"prompt_embeds": e} for e in embeds], GREEDY, use_tqdm=False)
        for e, o in zip(embeds, outs):
            assert o["token_ids"] == hf_greedy_embeds(hf, e, 8)
            assert o["prompt_tokens"] == len(e) and o["cached_tokens"] == 0
        assert_all_pages_free(engine)


def test_the_table_s_rows_give_what_their_ids_give_and_nothing_is_cached(tiny):  # noqa: F811
    m, _ = tiny
    table = np.asarray(m.params["embed_tokens"]["embedding"])
    prompts = random_prompts(m.config.vocab_size, (5, 40, 70))
    with Engine(m, small_config(prefix_caching=True)) as engine:
        by_ids = engine.generate(prompts, GREEDY, use_tqdm=False)
        by_rows = engine.generate([{"prompt_embeds": table[p]} for p in prompts], GREEDY, use_tqdm=False)
        for a, b in zip(by_ids, by_rows):
            assert a["token_ids"] == b["token_ids"] and b["cached_tokens"] == 0
            np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-4, atol=1e-5)
        # An embeddings prompt's placeholder ids (0) must not serve a prompt of token 0s from its pages.
        zeros = [0] * 40
        fresh = Engine(m, small_config(prefix_caching=False)).generate([zeros], GREEDY, use_tqdm=False)[0]
        rng = np.random.default_rng(1)
        engine.generate([{"prompt_embeds": random_embeds(rng, 40, m.config.hidden_size)}], GREEDY, use_tqdm=False)
        after = engine.generate([zeros], GREEDY, use_tqdm=False)[0]
        assert after["cached_tokens"] == 0 and after["token_ids"] == fresh["token_ids"]
        # vLLM's other prompt dicts.
        assert engine.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)[0]["token_ids"] \
            == by_ids[0]["token_ids"]
        assert_all_pages_free(engine)


def test_preempted_and_speculating_rows_recompute_from_their_embeddings(tiny):  # noqa: F811
    m, hf = tiny
    rng = np.random.default_rng(2)
    embeds = [random_embeds(rng, n, m.config.hidden_size) for n in (30, 30, 30, 30)]
    long = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    # 4 rows x (30 + 24) tokens need 28 pages of 8: 20 make rows preempt and recompute prompt and outputs.
    with Engine(m, small_config(num_pages=20)) as engine:
        outs = engine.generate([{"prompt_embeds": e} for e in embeds], long, use_tqdm=False)
        assert engine.stats()["preemptions"] > 0
        for e, o in zip(embeds, outs):
            assert o["token_ids"] == hf_greedy_embeds(hf, e, 24)
        assert_all_pages_free(engine)
    with Engine(m, small_config(speculative_tokens=3)) as engine:
        assert engine.generate([{"prompt_embeds": embeds[0]}], long, use_tqdm=False)[0]["token_ids"] == \
            outs[0]["token_ids"]
        assert_all_pages_free(engine)


def test_penalties_count_the_generated_tokens_alone(tiny):  # noqa: F811
    m, _ = tiny
    table = np.asarray(m.params["embed_tokens"]["embedding"])
    zeros_rows = {"prompt_embeds": table[[0] * 12]}  # placeholders are 0 too: a penalty must not see them as 0s
    free = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    penalized = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, presence_penalty=2.0,
                               frequency_penalty=1.0, repetition_penalty=1.5)
    with Engine(m, small_config()) as engine:
        req = engine.make_request(zeros_rows, penalized)
        assert req.known_ids == [] and req.prompt_ids == [0] * 12
        plain, pen = engine.generate([zeros_rows] * 2, [free, penalized], use_tqdm=False)
        # The first token reads no history at all: the penalties leave it as it is.
        assert pen["token_ids"][0] == plain["token_ids"][0]
        assert_all_pages_free(engine)


def test_embeddings_of_embeddings_and_bad_inputs(tiny):  # noqa: F811
    m, _ = tiny
    table = np.asarray(m.params["embed_tokens"]["embedding"])
    prompt = random_prompts(m.config.vocab_size, [20])[0]
    with Engine(m, small_config()) as engine:
        a = engine.embed([prompt], PoolingParams(pooling_type="mean"), use_tqdm=False)[0]["embedding"]
        b = engine.embed([{"prompt_embeds": table[prompt]}], PoolingParams(pooling_type="mean"),
                         use_tqdm=False)[0]["embedding"]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        cut = engine.generate([{"prompt_embeds": table[prompt]}], SamplingParams(
            max_tokens=3, temperature=0, truncate_prompt_tokens=5), use_tqdm=False)[0]
        assert cut["prompt_tokens"] == 5 and cut["token_ids"] == engine.generate(
            [prompt[-5:]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]["token_ids"]
        hidden = m.config.hidden_size
        for bad, match in (({"prompt_embeds": np.zeros((3, hidden + 1))}, "prompt_embeds must be an array of shape"),
                           ({"prompt_embeds": np.zeros((0, hidden))}, "prompt_embeds must be an array of shape"),
                           ({"prompt_embeds": np.full((2, hidden), np.nan)}, "prompt_embeds must be finite"),
                           ({"prompt_embeds": np.full((2, hidden), 1e300)}, "prompt_embeds must be finite"),
                           ({"prompt_embeds": np.zeros((2, hidden), np.complex64)}, "prompt_embeds must be real"),
                           ({"prompt_embeds": "x"}, "prompt_embeds must be an array"),
                           ({"prompt": "a", "prompt_token_ids": [1]}, "exactly one of"),
                           ({"text": "a"}, "exactly one of")):
            with pytest.raises(ValueError, match=match):
                engine.add_request(bad, SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="prompt_embeds: beam search"):
            engine.beam_search([{"prompt_embeds": table[prompt]}], jaxserve.BeamSearchParams(beam_width=2, max_tokens=2),
                               use_tqdm=False)
        with pytest.raises(ValueError, match="prompt_logprobs"):
            engine.add_request({"prompt_embeds": table[prompt]}, SamplingParams(max_tokens=2, prompt_logprobs=1))
        assert engine.stats()["waiting"] == 0
        assert_all_pages_free(engine)
    torch_embeds = torch.tensor(table[prompt[:4]], dtype=torch.bfloat16)  # a torch tensor (bf16) is taken as it is
    out = jaxserve.generate(m, {"prompt_embeds": torch_embeds}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert out[0]["prompt_tokens"] == 4


def _encoded(array: np.ndarray) -> str:
    """vLLM's wire form of a prompt's embeddings: base64 of torch.save."""
    import base64
    import io

    buffer = io.BytesIO()
    torch.save(torch.tensor(array), buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def test_server_completes_prompt_embeds_when_enabled(tiny_checkpoint):
    from jaxserve import EngineConfig
    from jaxserve.server import ServerConfig, create_app
    from tests.test_server import LiveServer, post

    m = jaxserve.load(tiny_checkpoint[0])
    table = np.asarray(m.params["embed_tokens"]["embedding"])
    prompt = random_prompts(m.config.vocab_size, [12])[0]
    want = jaxserve.generate(m, [prompt], SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
    config = EngineConfig(num_pages=64, max_running=4, max_tokens_per_step=64, batch_buckets=(4,),
                          prefill_buckets=(64,), decode_steps=4, max_model_len=256)
    body = {"model": "t", "prompt_embeds": _encoded(table[prompt]), "max_tokens": 5, "temperature": 0}
    with LiveServer(create_app(m, config, ServerConfig(model_name="t"))) as live:
        r = post(live, "/v1/completions", body, key=None)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_embeds", r.text
    with LiveServer(create_app(m, config, ServerConfig(model_name="t", enable_prompt_embeds=True))) as live:
        r = post(live, "/v1/completions", body, key=None)
        assert r.status_code == 200, r.text
        # The same tokens; their text decoded without the prompt's (a random prompt may end inside a character
        # that the first token completes: only its ids know those bytes).
        # Special tokens (a random prompt's greedy tokens may hold one) are left out, as the request's default
        # skip_special_tokens says.
        alone = m.tokenizer.decode(want["token_ids"], skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == alone and r.json()["usage"]["prompt_tokens"] == 12
        # With a text prompt too: the embeddings' choice first, then the prompt's.
        both = post(live, "/v1/completions", {**body, "prompt": [prompt]}, key=None).json()["choices"]
        assert [c["text"] for c in both] == [alone, want["text"]] and [c["index"] for c in both] == [0, 1]
        for bad, param in (({"prompt_embeds": "not base64!"}, "prompt_embeds"),
                           ({"prompt_embeds": _encoded(table[:3, :5])}, "prompt_embeds"),
                           ({"echo": True}, "echo"),
                           ({"prompt_embeds": None}, "prompt")):
            r = post(live, "/v1/completions", {**body, **bad}, key=None)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)

        async def check(engine):
            await engine.clear_prefix_cache()
            return await engine.stats()

        stats = live.engine_call(check)
        assert stats["pages_used"] == 0 and stats["running"] == 0, stats
