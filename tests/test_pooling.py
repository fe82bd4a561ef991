"""Embeddings (`jaxserve.pooling`, vLLM's ``LLM.embed``): the engine's pooled hidden states equal transformers' final
hidden states (last token or mean, through prefill chunks and the prefix cache), pooling requests run beside
generation without changing it, adapters apply, and bad values are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxserve
from jaxserve import Engine, LoRARequest, PoolingParams, SamplingParams
from tests.test_engine import assert_all_pages_free, random_prompts, small_config, tiny  # noqa: F401  (fixture)


def hf_hidden(hf, prompt: list[int]) -> np.ndarray:
    """transformers' final hidden states (after the last RMSNorm) of ``prompt``, ``[len, hidden]``."""
    with torch.no_grad():
        return hf.model(torch.tensor([prompt])).last_hidden_state[0].numpy()


def expected(hf, prompt: list[int], params: PoolingParams) -> np.ndarray:
    h = hf_hidden(hf, prompt)
    v = h[-1] if params.pooling_type == "last" else h.mean(axis=0)
    return v / np.linalg.norm(v) if params.normalize else v


@pytest.mark.parametrize("pooling", [PoolingParams(), PoolingParams(pooling_type="mean", normalize=False),
                                     PoolingParams(pooling_type="mean")])
def test_embeddings_match_transformers_through_chunks(tiny, pooling):  # noqa: F811
    m, hf = tiny
    # 150 tokens is three prefill chunks of max_tokens_per_step 64.
    prompts = random_prompts(m.config.vocab_size, (1, 9, 17, 150))
    with Engine(m, small_config()) as engine:
        outs = engine.embed(prompts, pooling, use_tqdm=False)
        for p, o in zip(prompts, outs):
            assert o["embedding"].dtype == np.float32 and o["embedding"].shape == (m.config.hidden_size,)
            np.testing.assert_allclose(o["embedding"], expected(hf, p, pooling), rtol=1e-4, atol=1e-5)
            assert o["prompt_tokens"] == len(p) and o["finish_reason"] == "stop"
        assert_all_pages_free(engine)


def test_a_cached_prefix_serves_the_last_token_and_a_mean_computes_the_whole_prompt(tiny):  # noqa: F811
    m, hf = tiny
    prompt = random_prompts(m.config.vocab_size, [40])[0]
    with Engine(m, small_config(prefix_caching=True)) as engine:
        first = engine.embed([prompt], use_tqdm=False)[0]
        again = engine.embed([prompt], use_tqdm=False)[0]
        assert first["cached_tokens"] == 0 and again["cached_tokens"] > 0
        np.testing.assert_allclose(again["embedding"], first["embedding"], rtol=1e-5, atol=1e-6)
        mean = PoolingParams(pooling_type="mean")
        out = engine.embed([prompt], mean, use_tqdm=False)[0]
        assert out["cached_tokens"] == 0
        np.testing.assert_allclose(out["embedding"], expected(hf, prompt, mean), rtol=1e-4, atol=1e-5)
        # A generation request then finds the embedded prompt's pages in the prefix cache.
        gen = engine.generate([prompt + [5]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0]
        assert gen["cached_tokens"] > 0
        assert_all_pages_free(engine)


def test_pooling_requests_share_steps_with_generation_and_change_nothing(tiny):  # noqa: F811
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 30, 12, 70, 8, 3))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    mean = PoolingParams(pooling_type="mean")
    for policy in ("mixed", "prefill_first"):
        with Engine(m, small_config(policy=policy)) as engine:
            alone = [o["token_ids"] for o in engine.generate(prompts[::2], greedy, use_tqdm=False)]
            ids = [engine.add_request(p, greedy if i % 2 == 0 else mean) for i, p in enumerate(prompts)]
            while engine.has_unfinished():
                engine.step()
            results = [engine.release(rid).result() for rid in ids]
            assert [r["token_ids"] for r in results[::2]] == alone
            for p, r in zip(prompts[1::2], results[1::2]):
                np.testing.assert_allclose(r["embedding"], expected(hf, p, mean), rtol=1e-4, atol=1e-5)
            assert_all_pages_free(engine)


def test_embeddings_with_an_adapter_are_the_merged_model_s(tiny_checkpoint, tmp_path):
    from tests.test_lora import make_adapter, merged

    path, hf = tiny_checkpoint
    make_adapter(str(tmp_path / "a"), hf, seed=4)
    prompt = random_prompts(hf.config.vocab_size, [12])[0]
    lora = LoRARequest("a", 1, str(tmp_path / "a"))
    out = jaxserve.embed(path, [prompt, prompt], use_tqdm=False, lora_request=[lora, None],
                         engine_config=small_config(max_loras=1))
    np.testing.assert_allclose(out[0]["embedding"], expected(merged(hf, str(tmp_path / "a")), prompt, PoolingParams()),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[1]["embedding"], expected(hf, prompt, PoolingParams()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad,field", [(dict(pooling_type="cls"), "pooling_type"), (dict(normalize="yes"), "normalize"),
                                       (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens")])
def test_bad_pooling_params_are_refused_by_name(bad, field):
    with pytest.raises(ValueError, match=field):
        PoolingParams(**bad)


def test_bad_embedding_requests_are_refused_and_the_engine_keeps_serving(tiny):  # noqa: F811
    m, hf = tiny
    with Engine(m, small_config(max_model_len=64)) as engine:
        with pytest.raises(ValueError, match="max_model_len"):
            engine.embed([[5] * 64], use_tqdm=False)
        with pytest.raises(ValueError, match="empty"):
            engine.embed([[]], use_tqdm=False)
        with pytest.raises(ValueError, match="vocabulary|token ids"):
            engine.embed([[m.config.vocab_size]], use_tqdm=False)
        cut = engine.embed([[5] * 64], PoolingParams(truncate_prompt_tokens=10), use_tqdm=False)[0]
        assert cut["prompt_tokens"] == 10
        np.testing.assert_allclose(cut["embedding"], expected(hf, [5] * 10, PoolingParams()), rtol=1e-4, atol=1e-5)
        assert_all_pages_free(engine)


def test_a_mean_preempted_between_its_chunks_sums_each_position_once(tiny):  # noqa: F811
    """A mean-pooling prompt preempted partway through its prefill is recomputed from its start (no cached
    prefix: positions have no hidden states there), and its sum takes each position once."""
    m, hf = tiny
    long, a, b = random_prompts(m.config.vocab_size, (150, 20, 20))
    mean = PoolingParams(pooling_type="mean")
    cfg = small_config(num_pages=26, scheduling_policy="priority", policy="mixed", max_tokens_per_step=32,
                       prefix_caching=False)
    with Engine(m, cfg) as engine:
        gens = [engine.add_request(p, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)) for p in (a, b)]
        engine.step()
        rid = engine.add_request(long, mean, priority=1)  # the first to give its pages back
        while engine.has_unfinished():
            engine.step()
        r = engine.release(rid)
        assert r.num_preemptions > 0 and r.finish_reason == "stop"
        np.testing.assert_allclose(r.embedding, expected(hf, long, mean), rtol=1e-4, atol=1e-5)
        for g in gens:
            engine.release(g)
        assert_all_pages_free(engine)


def test_warmup_compiles_the_embedding_prefills(tiny):  # noqa: F811
    m, _ = tiny
    cfg = small_config(batch_buckets=(1, 2, 4), prefill_buckets=(16, 32, 64), max_tokens_per_step=64)
    with Engine(m, cfg) as engine:
        plain = engine.warmup(sampling=False)
        assert engine.warmup(sampling=False, pooling=True) > 0  # the embedding variants, on top
        compiled = engine.stats()["compilations"]
        engine.embed(random_prompts(m.config.vocab_size, (3, 20, 50, 64, 9, 33)), use_tqdm=False)
        engine.embed(random_prompts(m.config.vocab_size, (70,)), PoolingParams(pooling_type="mean"), use_tqdm=False)
        assert engine.stats()["compilations"] == compiled and plain > 0
        assert_all_pages_free(engine)


def test_score_is_the_cosine_of_each_pair_s_embeddings(tiny):  # noqa: F811
    m, hf = tiny
    a, b, c = random_prompts(m.config.vocab_size, (5, 9, 12))
    with Engine(m, small_config()) as engine:
        one_to_many = engine.score(a, [a, b, c], use_tqdm=False)
        pairwise = engine.score([a, b], [c, c], use_tqdm=False)
        assert_all_pages_free(engine)
    e = {tuple(p): expected(hf, p, PoolingParams()) for p in (a, b, c)}
    ea, eb, ec = (e[tuple(p)] for p in (a, b, c))
    assert [o["score"] for o in one_to_many] == pytest.approx([1.0, ea @ eb, ea @ ec], abs=1e-5)
    assert [o["score"] for o in pairwise] == pytest.approx([ea @ ec, eb @ ec], abs=1e-5)
    assert one_to_many[1]["prompt_tokens"] == len(a) + len(b)
    with pytest.raises(ValueError, match="text_1"):
        jaxserve.score(m, [a, b], [c, c, c], use_tqdm=False)
    for bad in ([None], [{"prompt": "x"}], [[1.7, 2.0]]):  # were a TypeError / an int() error from the engine
        with pytest.raises(ValueError, match="text_2's items must be"):
            jaxserve.score(m, a, bad, use_tqdm=False)
