"""Sequence classifiers (`jaxserve.pooling`'s classify task, vLLM's ``LLM.classify`` and cross-encoder ``score``): a
transformers ``Qwen2ForSequenceClassification`` checkpoint loads with its labels and ``score`` head, the engine's
probabilities are transformers' softmax (sigmoid for one label) of its logits at the last token, through prefill
chunks, the prefix cache and beside embeddings; a one-label classifier scores pairs as transformers does their texts
one after the other; generation on a classifier and classify on a causal LM are refused by name; the checkpoint saves
back as transformers reads it."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import jaxserve
from jaxserve import Engine, PoolingParams, SamplingParams
from tests.conftest import save_test_tokenizer
from tests.test_engine import assert_all_pages_free, random_prompts, small_config, tiny  # noqa: F401  (fixture)

LABELS = ("negative", "neutral", "positive")


def make_classifier(path: str, labels: tuple[str, ...], seed: int = 0, tie: bool = True):
    """Save a random transformers Qwen2ForSequenceClassification (and the test tokenizer) in ``path``."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = Qwen2ForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    save_test_tokenizer(path, config.vocab_size)
    return model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("classifier"))
    hf = make_classifier(path, LABELS)
    return jaxserve.load(path), hf, path


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cross_encoder"))
    hf = make_classifier(path, ("relevant",), seed=1, tie=False)
    return jaxserve.load(path), hf


def hf_logits(hf, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():  # one prompt, no padding: transformers pools its last token
        return hf(torch.tensor([prompt])).logits[0].numpy()


def test_config_and_weights_load_as_a_classifier(classifier):
    m, hf, path = classifier
    assert m.config.labels == LABELS and m.config.num_labels == 3
    assert m.params["score"]["kernel"].shape == (64, 3) and "lm_head" not in m.params
    np.testing.assert_array_equal(np.asarray(m.params["score"]["kernel"]), hf.score.weight.detach().numpy().T)
    assert m.config.to_hf_dict()["architectures"] == ["Qwen2ForSequenceClassification"]


def test_probabilities_match_transformers_through_chunks_and_the_prefix_cache(classifier):
    m, hf, _ = classifier
    prompts = random_prompts(m.config.vocab_size, (1, 9, 150))  # 150 tokens: three prefill chunks of 64
    with Engine(m, small_config(prefix_caching=True)) as engine:
        outs = engine.classify(prompts, use_tqdm=False)
        raw = engine.classify(prompts, PoolingParams(activation=False), use_tqdm=False)
        again = engine.classify(prompts[2:], use_tqdm=False)[0]  # its prefix cached now
        for p, o, r in zip(prompts, outs, raw):
            logits = hf_logits(hf, p)
            np.testing.assert_allclose(r["probs"], logits, rtol=1e-4, atol=1e-5)
            expect = torch.softmax(torch.tensor(logits), -1).numpy()
            np.testing.assert_allclose(o["probs"], expect, rtol=1e-4, atol=1e-6)
            assert o["label"] == LABELS[int(np.argmax(logits))] and o["prompt_tokens"] == len(p)
            assert o["probs"].dtype == np.float32 and "embedding" not in o
        assert again["cached_tokens"] > 0
        np.testing.assert_allclose(again["probs"], outs[2]["probs"], rtol=1e-5, atol=1e-6)
        # Embeddings of a classifier are its final hidden states too, in the same calls as classify requests.
        rids = [engine.add_request(prompts[1], PoolingParams(task="classify")),
                engine.add_request(prompts[1], PoolingParams())]
        while engine.has_unfinished():
            engine.step()
        both = [engine.release(r).result() for r in rids]
        np.testing.assert_allclose(both[0]["probs"], outs[1]["probs"], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            h = hf.model(torch.tensor([prompts[1]])).last_hidden_state[0, -1].numpy()
        np.testing.assert_allclose(both[1]["embedding"], h / np.linalg.norm(h), rtol=1e-4, atol=1e-5)
        assert_all_pages_free(engine)


def test_a_classifier_s_warmup_compiles_its_pooling_prefills_alone(classifier):
    m, _, _ = classifier
    with Engine(m, small_config()) as engine:
        assert engine.warmup() == len(engine.config.prefill_buckets)  # one pooling prefill a bucket, no decode
        shapes = set(engine.runner.compiled_shapes)
        engine.classify(random_prompts(m.config.vocab_size, (5, 40)), use_tqdm=False)
        assert engine.runner.compiled_shapes == shapes


def test_a_one_label_classifier_scores_pairs_as_a_cross_encoder(cross_encoder):
    m, hf = cross_encoder
    query, docs = "the cat sat", ["on the mat", "a dog ran far"]
    out = jaxserve.score(m, query, docs, use_tqdm=False)
    for doc, o in zip(docs, out):
        ids = m.tokenizer.encode(query, add_special_tokens=False) + m.tokenizer.encode(doc, add_special_tokens=False)
        expect = torch.sigmoid(torch.tensor(hf_logits(hf, ids))).item()
        assert o["score"] == pytest.approx(expect, rel=1e-4) and o["prompt_tokens"] == len(ids)
    assert jaxserve.score(m, [1, 2], [3, 4], use_tqdm=False)[0]["score"] == pytest.approx(
        torch.sigmoid(torch.tensor(hf_logits(hf, [1, 2, 3, 4]))).item(), rel=1e-4)
    outs = jaxserve.classify(m, ["the cat sat"], use_tqdm=False)
    assert outs[0]["label"] == "relevant" and outs[0]["probs"].shape == (1,)


def test_wrong_task_for_the_model_is_refused_by_name(classifier, tiny):  # noqa: F811
    m, _, _ = classifier
    with Engine(m, small_config()) as engine:
        with pytest.raises(ValueError, match="sequence classifier .* generates nothing"):
            engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="classifier of one label"):
            engine.score("a", "b", use_tqdm=False)
        assert engine.stats()["waiting"] == 0
    lm, _ = tiny
    with Engine(lm, small_config()) as engine:
        with pytest.raises(ValueError, match="task 'classify' needs a sequence classifier"):
            engine.classify([[1, 2, 3]], use_tqdm=False)
    with pytest.raises(ValueError, match="task must be one of"):
        PoolingParams(task="reward")
    with pytest.raises(ValueError, match="activation must be a bool"):
        PoolingParams(activation="yes")


def test_a_classifier_saves_back_as_transformers_reads_it(classifier, tmp_path):
    from transformers import Qwen2ForSequenceClassification

    from jaxserve.weights import save_hf_checkpoint

    m, hf, _ = classifier
    save_hf_checkpoint(m.params, m.config, tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    assert saved["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    back = Qwen2ForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor([[5, 6, 7]])).logits.numpy(),
                                   hf(torch.tensor([[5, 6, 7]])).logits.numpy(), rtol=1e-5, atol=1e-6)
    assert dataclasses.replace(m.config).labels == LABELS


def _live(model):
    from jaxserve import EngineConfig
    from jaxserve.server import ServerConfig, create_app
    from tests.test_server import LiveServer

    config = EngineConfig(num_pages=64, max_running=4, max_tokens_per_step=64, batch_buckets=(4,),
                          prefill_buckets=(64,), decode_steps=4, max_model_len=256)
    return LiveServer(create_app(model, config, ServerConfig(model_name="clf")))


def _pages_free(server) -> None:
    async def check(engine):
        await engine.clear_prefix_cache()
        return await engine.stats()

    stats = server.engine_call(check)
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0, stats


def test_server_classifies_and_refuses_what_a_classifier_cannot_do(classifier):
    from tests.test_server import post

    m, _, _ = classifier
    texts = ["the cat sat", "on the mat today"]
    want = jaxserve.classify(m, texts, use_tqdm=False)
    raw = jaxserve.classify(m, texts, PoolingParams(activation=False), use_tqdm=False)
    with _live(m) as live:
        r = post(live, "/classify", {"model": "clf", "input": texts}, key=None)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["id"].startswith("classify-")
        assert [d["index"] for d in body["data"]] == [0, 1] and {d["num_classes"] for d in body["data"]} == {3}
        assert [d["label"] for d in body["data"]] == [w["label"] for w in want]
        for d, w in zip(body["data"], want):
            assert d["probs"] == pytest.approx(w["probs"].tolist(), abs=1e-6)
        assert body["usage"]["prompt_tokens"] == sum(w["prompt_tokens"] for w in want)
        r = post(live, "/v1/classify", {"model": "clf", "input": texts[0], "activation": False}, key=None)
        assert r.json()["data"][0]["probs"] == pytest.approx(raw[0]["probs"].tolist(), abs=1e-5)
        pooled = post(live, "/pooling", {"model": "clf", "input": texts}, key=None).json()  # vLLM's: the probs
        assert [d["object"] for d in pooled["data"]] == ["pooling"] * 2
        for d, w in zip(pooled["data"], want):
            assert d["data"] == pytest.approx(w["probs"].tolist(), abs=1e-6)
        for path, body, param in (("/v1/completions", {"model": "clf", "prompt": "hi", "max_tokens": 2}, None),
                                  ("/score", {"model": "clf", "text_1": "a", "text_2": "b"}, "model"),
                                  ("/classify", {"model": "clf", "input": []}, "input"),
                                  ("/classify", {"model": "clf", "input": "x", "activation": "no"}, "activation")):
            r = post(live, path, body, key=None)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error", r.text
            if param is not None:
                assert r.json()["error"]["param"] == param, r.text
        assert "sequence classifier" in post(live, "/v1/completions", {"model": "clf", "prompt": "hi"},
                                             key=None).json()["error"]["message"]
        _pages_free(live)


def test_server_scores_and_reranks_with_a_cross_encoder(cross_encoder):
    from tests.test_server import post

    m, _ = cross_encoder
    query, docs = "the cat sat", ["on the mat", "a dog ran far", "the cat"]
    want = [o["score"] for o in jaxserve.score(m, query, docs, use_tqdm=False)]
    with _live(m) as live:
        r = post(live, "/v1/score", {"model": "clf", "text_1": query, "text_2": docs}, key=None)
        assert r.status_code == 200, r.text
        assert [d["score"] for d in r.json()["data"]] == pytest.approx(want, abs=1e-6)
        r = post(live, "/rerank", {"model": "clf", "query": query, "documents": docs, "top_n": 2}, key=None)
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()["results"]] == sorted(range(3), key=lambda i: -want[i])[:2]
        _pages_free(live)
