"""vLLM's offline ``LLM`` class (`jaxserve.llm`): a vLLM script's calls give jaxserve's own results in vLLM's objects
(texts, token ids, per-token logprob dicts, cumulative logprobs, prompt logprobs, n samples, chat, embeddings), vLLM's
engine arguments reach the `EngineConfig`, and one jaxserve has no counterpart for is refused by name."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxserve
from jaxserve import LLM, EngineConfig, SamplingParams
from jaxserve.llm import RequestOutput, engine_config_from_vllm
from tests.test_engine import assert_all_pages_free

PROMPTS = ["def add(a, b):", "import os\n", {"prompt": "class A:"}]


@pytest.fixture(scope="module")
def model():
    return jaxserve.load()


def test_generate_gives_jaxserve_s_results_as_vllm_s_objects(model):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=5, n=2, logprobs=3, prompt_logprobs=2)
    with jaxserve.Engine(model) as engine:
        want = engine.generate(PROMPTS, params, use_tqdm=False)
    with LLM(model) as llm:
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        assert_all_pages_free(llm.engine)
    assert all(isinstance(o, RequestOutput) for o in got) and [o.prompt for o in got] == [
        "def add(a, b):", "import os\n", "class A:"]
    # Two runs of the same requests: on the CPU their log-probabilities agree to float32 rounding; on a GPU the
    # default model computes in bfloat16 ("auto"), where two runs differed by 3e-5 (session 68, H100).
    tol = 1e-5 if jax.default_backend() == "cpu" else 1e-3
    outside = 0  # sampled tokens ranked past the top three
    for out, ref in zip(got, want):
        assert out.prompt_token_ids == model.tokenizer.encode(out.prompt, add_special_tokens=False)
        assert len(out.outputs) == 2 and [o.index for o in out.outputs] == [0, 1]
        for sample, ref_sample in zip(out.outputs, ref["outputs"]):
            assert (sample.text, sample.token_ids, sample.finish_reason) == (
                ref_sample["text"], ref_sample["token_ids"], ref_sample["finish_reason"])
            assert sample.cumulative_logprob == pytest.approx(sum(ref_sample["logprobs"]), rel=tol, abs=tol)
            for token, lp, rank, entry in zip(sample.token_ids, ref_sample["logprobs"], ref_sample["logprob_ranks"],
                                              sample.logprobs):
                assert entry[token].logprob == pytest.approx(lp, rel=tol, abs=tol) and len(entry) in (3, 4)
                # The top three ranked 1-3 by their places (vLLM's dict); a sampled token outside them at its own
                # rank (vLLM's count of the tokens at least as likely), which is then past 3.
                tops = [e.rank for e in entry.values()][:3]
                assert tops == [1, 2, 3]
                assert len(entry) == 3 or (entry[token].rank == rank and rank > 3)
                outside += len(entry) == 4
                assert entry[token].decoded_token == model.tokenizer.decode([token])
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
        for token, entry, rank in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:],
                                      ref["prompt_logprob_ranks"][1:]):
            assert entry[token].rank == rank
    assert outside > 0


def test_chat_and_embed(model):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    greedy = SamplingParams(max_tokens=5, temperature=0)
    with jaxserve.Engine(model) as engine:
        want_chat = engine.chat(messages, greedy, use_tqdm=False)[0]
        want_embedding = engine.embed(["import os"], use_tqdm=False)[0]["embedding"]
    with LLM(model) as llm:
        chat = llm.chat(messages, greedy, use_tqdm=False)
        embedded = llm.embed("import os", use_tqdm=False)
        assert llm.get_tokenizer() is llm.engine.tokenizer
    assert len(chat) == 1 and chat[0].outputs[0].token_ids == want_chat["token_ids"]
    assert chat[0].prompt is None and chat[0].outputs[0].logprobs is None and chat[0].outputs[0].cumulative_logprob is None
    np.testing.assert_allclose(embedded[0].outputs.embedding, want_embedding, rtol=1e-6)
    assert embedded[0].prompt_token_ids == model.tokenizer.encode("import os", add_special_tokens=False)


def test_prefix_cache_reset_default_sampling_and_new_weights(model):
    # vLLM's reset_prefix_cache: the prompt computed again (no cached tokens), the same greedy text; its
    # get_default_sampling_params: the engine's; update_params: new weights change the text, and back.
    import jax

    greedy = SamplingParams(max_tokens=6, temperature=0)
    prompt = "def add(a, b):\n    return a + b\n" * 2
    with LLM(model) as llm:
        first = llm.generate(prompt, greedy, use_tqdm=False)[0]
        cached = llm.generate(prompt, greedy, use_tqdm=False)[0]
        assert llm.reset_prefix_cache() is True
        again = llm.generate(prompt, greedy, use_tqdm=False)[0]
        assert cached.num_cached_tokens > 0 and again.num_cached_tokens == 0
        assert first.outputs[0].token_ids == cached.outputs[0].token_ids == again.outputs[0].token_ids
        assert llm.get_default_sampling_params() == llm.engine.default_sampling_params()
        llm.update_params(jax.tree_util.tree_map(lambda w: -w, model.params))
        flipped = llm.generate(prompt, greedy, use_tqdm=False)[0]
        llm.update_params(model.params)
        back = llm.generate(prompt, greedy, use_tqdm=False)[0]
        assert flipped.outputs[0].token_ids != first.outputs[0].token_ids
        assert back.outputs[0].token_ids == first.outputs[0].token_ids
        assert_all_pages_free(llm.engine)


def test_classify_and_score(model, tmp_path):
    """A classifier's probabilities and an embedding model's pair scores, as `Engine.classify` / `Engine.score` give
    them, in vLLM's objects."""
    from tests.test_classify import LABELS, make_classifier

    make_classifier(str(tmp_path), LABELS)
    classifier = jaxserve.load(str(tmp_path))
    with jaxserve.Engine(classifier) as engine:
        want = engine.classify(["great movie", "awful plot"], use_tqdm=False)
    with LLM(classifier) as llm:
        got = llm.classify(["great movie", "awful plot"], use_tqdm=False)
    for out, ref in zip(got, want):
        np.testing.assert_allclose(out.outputs.probs, ref["probs"], rtol=1e-6)
        assert out.outputs.num_classes == len(LABELS)
    with jaxserve.Engine(model) as engine:
        want_scores = [r["score"] for r in engine.score("import os", ["import sys", "x = 1"], use_tqdm=False)]
    with LLM(model) as llm:
        scores = llm.score("import os", ["import sys", "x = 1"], use_tqdm=False)
    assert [s.outputs.score for s in scores] == pytest.approx(want_scores)


def test_vllm_engine_arguments_reach_the_engine_config():
    cfg = engine_config_from_vllm(max_num_seqs=8, max_num_batched_tokens=256, block_size=32, max_model_len=512,
                                  enable_prefix_caching=False, gpu_memory_utilization=0.5, seed=3, enable_lora=True,
                                  speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                      "disable_by_batch_size": 8},
                                  trust_remote_code=True, enforce_eager=True, kv_cache_dtype="fp8",
                                  enable_chunked_prefill=True, pipeline_parallel_size=1, cpu_offload_gb=0,
                                  max_logprobs=20, distributed_executor_backend="mp", max_cpu_loras=8,
                                  lora_dtype="auto", fully_sharded_loras=False)
    want = EngineConfig(max_running=8, max_tokens_per_step=256, page_size=32, max_model_len=512, prefix_caching=False,
                        memory_fraction=0.5, seed=3, max_loras=1, speculative_tokens=4,
                        speculative_disable_by_batch_size=8, kv_cache_dtype="fp8", policy="mixed")
    assert cfg == want
    for bad in ({"pipeline_parallel_size": 2}, {"cpu_offload_gb": 4}, {"max_logprobs": 50}, {"revision": "v2"},
                {"lora_dtype": "float32"}, {"fully_sharded_loras": True}):
        with pytest.raises(TypeError, match=f"'{next(iter(bad))}'"):
            engine_config_from_vllm(**bad)
    with pytest.raises(TypeError, match="only method 'ngram'"):
        engine_config_from_vllm(speculative_config={"method": "eagle"})
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization: jaxserve's memory_fraction must be in"):
        engine_config_from_vllm(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"^enable_prefix_caching: jaxserve's prefix_caching must be True or False"):
        engine_config_from_vllm(enable_prefix_caching="yes")
    with pytest.raises(ValueError, match=r"^seed must be"):  # the same name in both
        engine_config_from_vllm(seed=-1)
    with pytest.raises(TypeError, match="not both"):
        LLM(None, engine_config=EngineConfig(), max_num_seqs=4)
    for bad in ({"max_logprobs": "5"}, {"max_logprobs": None}, {"speculative_config": "ngram"},
                {"speculative_config": [1]}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))} must be"):
            engine_config_from_vllm(**bad)


def test_prompts_that_are_not_prompts_are_refused_and_a_generator_is_a_list(model):
    with LLM(model) as llm:
        for bad in (None, 5):
            with pytest.raises(ValueError, match="prompts must be"):
                llm.generate(bad, SamplingParams(max_tokens=1), use_tqdm=False)
        greedy = SamplingParams(max_tokens=3, temperature=0)
        got = llm.generate((p for p in ["import os\n", "class A:"]), greedy, use_tqdm=False)
        want = llm.generate(["import os\n", "class A:"], greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert_all_pages_free(llm.engine)
