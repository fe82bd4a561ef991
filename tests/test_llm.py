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
                # vLLM's dict: the sampled token first, then the top three ranked 1-3 by their places (the sampled
                # one's place too, where it is among them); a sampled token outside them at its own rank (vLLM's
                # count of the tokens at least as likely), which is then past 3.
                ranks = [e.rank for e in entry.values()]
                assert next(iter(entry)) == token and ranks[1:] == sorted(ranks[1:])
                assert sorted(ranks[1:] if len(entry) == 4 else ranks) == [1, 2, 3]
                assert len(entry) == 3 or (entry[token].rank == rank and rank > 3)
                outside += len(entry) == 4
                assert entry[token].decoded_token == model.tokenizer.decode([token])
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
        for token, entry, rank in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:],
                                      ref["prompt_logprob_ranks"][1:]):
            assert entry[token].rank == rank and next(iter(entry)) == token  # vLLM's order: the prompt token first
            others = [e.logprob for t, e in entry.items() if t != token]
            assert others == sorted(others, reverse=True)
    assert outside > 0


def test_logprob_token_ids_come_as_vllm_s_logprob_dicts_after_the_sampled_token(model):
    """vLLM's dict with logprob_token_ids: the sampled token first, then the named ones in the order asked, each at
    its rank among the vocabulary (the engine's), in place of the top-k."""
    named = model.tokenizer.encode(" yes no maybe", add_special_tokens=False)
    params = SamplingParams(max_tokens=4, temperature=0.8, seed=3, logprobs=5, logprob_token_ids=named)
    with jaxserve.Engine(model) as engine:
        want = engine.generate("Answer yes or no:", params, use_tqdm=False)[0]
    with LLM(model) as llm:
        sample = llm.generate("Answer yes or no:", params, use_tqdm=False)[0].outputs[0]
    assert sample.token_ids == want["token_ids"]
    for token, lp, rank, top, named_ranks, entry in zip(
            want["token_ids"], want["logprobs"], want["logprob_ranks"], want["top_logprobs"],
            want["top_logprob_ranks"], sample.logprobs):
        assert list(entry) == [token] + [t for t in named if t != token]
        assert entry[token].logprob == pytest.approx(lp, abs=1e-5) and entry[token].rank == rank
        for t in named:
            assert (entry[t].logprob, entry[t].rank) == (pytest.approx(top[t], abs=1e-5), named_ranks[t])
            assert entry[t].decoded_token == model.tokenizer.decode([t])


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
    # vLLM's prompt of a chat: the rendered template
    assert chat[0].prompt == model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat[0].outputs[0].logprobs is None and chat[0].outputs[0].cumulative_logprob is None
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
        encoded = llm.encode(["great movie", "awful plot"], use_tqdm=False, pooling_task="classify")
        with pytest.raises(ValueError, match="^pooling_task: this checkpoint pools for 'classify'"):
            llm.encode("great movie", pooling_task="embed", use_tqdm=False)
    for out, ref in zip(encoded, want):  # vLLM's LLM.encode: what the checkpoint pools
        np.testing.assert_allclose(out.outputs.data, ref["probs"], rtol=1e-6)
    for out, ref in zip(got, want):
        np.testing.assert_allclose(out.outputs.probs, ref["probs"], rtol=1e-6)
        assert out.outputs.num_classes == len(LABELS)
    with jaxserve.Engine(model) as engine:
        want_scores = [r["score"] for r in engine.score("import os", ["import sys", "x = 1"], use_tqdm=False)]
    with LLM(model) as llm:
        scores = llm.score("import os", ["import sys", "x = 1"], use_tqdm=False)
        (encoded,) = llm.encode("import os", use_tqdm=False)
    with jaxserve.Engine(model) as engine:
        np.testing.assert_allclose(encoded.outputs.data, engine.embed(["import os"], use_tqdm=False)[0]["embedding"],
                                   rtol=1e-6)
    assert encoded.prompt_token_ids == model.tokenizer.encode("import os", add_special_tokens=False)
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
    # vLLM's arguments at the values that are what jaxserve does (its examples pass them): taken, changing nothing
    assert engine_config_from_vllm(generation_config="auto", enable_sleep_mode=True, enable_prompt_embeds=True,
                                   tokenizer=None, revision=None, hf_overrides={}, task="generate", runner="auto",
                                   data_parallel_size=1, logits_processors=None) == EngineConfig()
    assert engine_config_from_vllm(dtype="float").dtype == "float32"
    with pytest.raises(ValueError, match="^dtype: jaxserve computes in float32 or bfloat16"):
        engine_config_from_vllm(dtype="half")
    for bad in ({"pipeline_parallel_size": 2}, {"cpu_offload_gb": 4}, {"max_logprobs": 50}, {"revision": "v2"},
                {"lora_dtype": "float32"}, {"fully_sharded_loras": True}, {"generation_config": "vllm"},
                {"tokenizer": "/elsewhere"}, {"hf_overrides": {"rope_scaling": None}}, {"runner": "draft"},
                {"logits_processors": [print]}, {"data_parallel_size": 2}):
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


def test_a_vllm_script_s_calls(model):
    """What vLLM's examples do past generate: set fields of the default sampling parameters (vLLM's are mutable;
    a request keeps what it was given), beam search's objects, chat_template_content_format, sleep and wake_up(tags),
    seed 0 by default (unseeded
    sampling repeats from one LLM to the next), embed's truncate_prompt_tokens, detokenize=False, and vLLM's
    sampling_params module."""
    from jaxserve.beam_search import BeamSearchParams
    from jaxserve.llm import BeamSearchOutput
    from jaxserve.sampling_params import SamplingParams as VllmSamplingParams
    from jaxserve.sampling_params import StructuredOutputsParams

    assert VllmSamplingParams is SamplingParams
    prompt = "def add(a, b):"
    with LLM(model) as llm:
        # the first requests of an LLM (each later one draws its seed from the engine's generator in turn)
        first = llm.generate([prompt] * 2, SamplingParams(max_tokens=8), use_tqdm=False)
        assert [o.request_id for o in first] == ["0", "1"]  # vLLM's numbering
        sampled = [o.outputs[0].token_ids for o in first]
        params = llm.get_default_sampling_params()
        params.max_tokens, params.temperature = 6, 0.0
        queued = llm.engine.add_request(prompt, params)
        params.max_tokens = 2  # after the request was made: not its concern
        while llm.engine.has_unfinished():
            llm.engine.step()
        assert len(llm.engine.requests[queued].output_ids) == 6
        bare = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, detokenize=False), use_tqdm=False)[0]
        greedy = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
        assert bare.outputs[0].text == "" and bare.outputs[0].token_ids == greedy.outputs[0].token_ids
        embedded = llm.generate({"prompt_embeds": np.random.default_rng().normal(
            size=(3, model.config.hidden_size)).astype(np.float32)}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
        assert embedded.prompt_token_ids is None and len(embedded.outputs[0].token_ids) == 2  # vLLM's None
        choice = llm.generate(prompt, SamplingParams(max_tokens=6, structured_outputs=StructuredOutputsParams(
            choice=["yes", "no"])), use_tqdm=False)[0]
        assert choice.outputs[0].text in ("yes", "no")
        beams = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.0))
        want = llm.engine.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=4), use_tqdm=False)[0]
        ids = model.tokenizer.encode(prompt, add_special_tokens=False)
        assert isinstance(beams[0], BeamSearchOutput) and len(beams[0].sequences) == 2
        for seq, ref in zip(beams[0].sequences, want["sequences"]):
            assert seq.tokens == ids + ref["token_ids"] and seq.text == model.tokenizer.decode(seq.tokens)
            assert seq.cum_logprob == ref["cum_logprob"] and seq.finish_reason == ref["finish_reason"]
            assert [next(iter(d)) for d in seq.logprobs] == ref["token_ids"]
        with pytest.raises(ValueError, match="chat_template_content_format"):
            llm.chat([{"role": "user", "content": "hi"}], chat_template_content_format="openai", use_tqdm=False)
        assert llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1),
                        chat_template_content_format="string", use_tqdm=False)[0].outputs[0].token_ids
        llm.sleep()
        with pytest.raises(ValueError, match="tags must be"):
            llm.wake_up(tags=["everything"])
        llm.wake_up(tags=["weights"])
        llm.wake_up(tags=["kv_cache"])  # awake already: nothing to do
        short = llm.embed("import os import sys", truncate_prompt_tokens=2, use_tqdm=False)[0]
        want_short = llm.embed("import os import sys", jaxserve.PoolingParams(truncate_prompt_tokens=2),
                               use_tqdm=False)[0]
        assert len(short.prompt_token_ids) == 2
        np.testing.assert_array_equal(short.outputs.embedding, want_short.outputs.embedding)
        metrics = {(m.name, tuple(m.labels.items())): m.value for m in llm.get_metrics()}
        assert metrics[("vllm:num_requests_running", ())] == 0 and metrics[("vllm:generation_tokens", ())] > 0
        assert metrics[("vllm:request_success", (("finished_reason", "length"),))] >= 4
        assert_all_pages_free(llm.engine)
    with LLM(model) as again:
        assert [o.outputs[0].token_ids for o in again.generate([prompt] * 2, SamplingParams(max_tokens=8),
                                                               use_tqdm=False)] == sampled


def test_max_tokens_past_the_model_s_length_ends_there_and_a_profile_is_written(model, tmp_path):
    """vLLM's offline engine runs a request whose max_tokens passes max_model_len up to it ("length"), where
    jaxserve's engine (and vLLM's server) refuse it; start_profile / stop_profile write JAX's trace; vLLM's newer
    PoolingParams(use_activation) is taken."""
    prompt = "def add(a, b):"
    n = len(model.tokenizer.encode(prompt, add_special_tokens=False))
    with LLM(model, max_model_len=n + 4) as llm:
        llm.start_profile(tmp_path)
        out = llm.generate(prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), use_tqdm=False)[0]
        llm.stop_profile()
        assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
        # truncate_prompt_tokens=-1 cuts only what does not fit beside one token, then max_tokens is capped
        cut = llm.generate(prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True,
                                                  truncate_prompt_tokens=-1), use_tqdm=False)[0]
        assert len(cut.prompt_token_ids) == n and cut.outputs[0].token_ids == out.outputs[0].token_ids
        with pytest.raises(ValueError, match="exceeds max_model_len"):  # a prompt that fills it leaves nothing
            llm.generate("x " * (n + 8), SamplingParams(max_tokens=1), use_tqdm=False)
        assert_all_pages_free(llm.engine)
    assert any(path.is_file() for path in tmp_path.rglob("*"))
    with jaxserve.Engine(model, EngineConfig(max_model_len=n + 4)) as engine:
        with pytest.raises(ValueError, match="exceeds max_model_len"):
            engine.generate([prompt], SamplingParams(max_tokens=50), use_tqdm=False)
    assert jaxserve.PoolingParams(use_activation=False) == jaxserve.PoolingParams(activation=False)
    with jaxserve.Engine(model) as engine:  # vLLM's matryoshka cut: the model's own width only, as vLLM refuses it
        width = engine.embed(["x"], jaxserve.PoolingParams(dimensions=model.config.hidden_size), use_tqdm=False)
        assert len(width[0]["embedding"]) == model.config.hidden_size
        with pytest.raises(ValueError, match="^dimensions must be the model's"):
            engine.embed(["x"], jaxserve.PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="^dimensions must be None or an int"):
        jaxserve.PoolingParams(dimensions=0)


def test_llm_engine_steps_give_vllm_s_outputs_by_output_kind(model):
    """vLLM's ``LLMEngine`` loop (its llm_engine_example.py): requests added between steps, each step's news as
    RequestOutputs by the request's output_kind (CUMULATIVE the text so far, DELTA what is new, FINAL_ONLY once),
    n samples' streamed outputs one sample each, an embedding request's PoolingRequestOutput, an abort that says
    nothing more; the finished texts are LLM.generate's. Also collective_rpc on the one worker, the Engine."""
    from jaxserve import EngineArgs, LLMEngine, RequestOutputKind
    from jaxserve.llm import PoolingRequestOutput

    greedy = dict(max_tokens=7, temperature=0, logprobs=1)
    kinds = {"cum": RequestOutputKind.CUMULATIVE, "delta": RequestOutputKind.DELTA,
             "final": RequestOutputKind.FINAL_ONLY}
    with LLM(model) as llm:
        want = llm.generate("def add(a, b):", SamplingParams(**greedy), use_tqdm=False)[0].outputs[0]
        sampled = llm.generate("import os\n", SamplingParams(max_tokens=5, temperature=1.0, seed=4, n=2),
                               use_tqdm=False)[0].outputs
        engine = llm.llm_engine
        assert isinstance(engine, LLMEngine) and engine is llm.llm_engine and engine.get_tokenizer() is model.tokenizer
        queue = [(name, "def add(a, b):", SamplingParams(**greedy, output_kind=kind)) for name, kind in kinds.items()]
        queue += [("n2", "import os\n", SamplingParams(max_tokens=5, temperature=1.0, seed=4, n=2)),
                  ("emb", "import os\n", jaxserve.PoolingParams()),
                  ("gone", "class A:", SamplingParams(max_tokens=50))]
        seen: dict[str, list] = {}
        steps = 0
        while queue or engine.has_unfinished_requests():
            if queue:
                engine.add_request(*queue.pop(0))
                if not queue:
                    with pytest.raises(ValueError, match="request_id"):
                        engine.add_request("cum", "x", SamplingParams())  # still running
            for out in engine.step():
                seen.setdefault(out.request_id, []).append(out)
            steps += 1
            if steps == 8:
                engine.abort_request(["gone"])
                assert engine.get_num_unfinished_requests() == len({"cum", "delta", "final", "n2"} - {
                    rid for rid, outs in seen.items() if outs[-1].finished})
        assert "gone" not in seen or not seen["gone"][-1].finished
        cum, delta, final = seen["cum"], seen["delta"], seen["final"]
        assert len(cum) > 1 and all(o.finished == (i == len(cum) - 1) for i, o in enumerate(cum))
        texts = [o.outputs[0].text for o in cum]
        assert all(a == b[:len(a)] for a, b in zip(texts, texts[1:]))  # each the one before, grown
        for outs in (cum[-1:], final):
            assert len(outs) == 1 or outs is cum[-1:]
            sample = outs[-1].outputs[0]
            assert (sample.text, sample.token_ids, sample.finish_reason) == (want.text, want.token_ids, "length")
            assert [list(d) for d in sample.logprobs] == [list(d) for d in want.logprobs]
        assert len(final) == 1 and final[0].finished
        assert "".join(o.outputs[0].text for o in delta) == want.text and delta[-1].finished
        assert [t for o in delta for t in o.outputs[0].token_ids] == want.token_ids
        assert sum(len(o.outputs[0].logprobs) for o in delta) == len(want.token_ids)
        assert delta[0].prompt_logprobs is None and delta[0].prompt_token_ids == cum[0].prompt_token_ids
        n2 = seen["n2"]
        assert all(len(o.outputs) == 1 for o in n2) and n2[-1].finished and not any(o.finished for o in n2[:-1])
        last = {o.outputs[0].index: o.outputs[0] for o in n2 if o.outputs[0].finished()}
        assert [(last[i].text, last[i].token_ids) for i in (0, 1)] == [(s.text, s.token_ids) for s in sampled]
        (emb,) = seen["emb"]
        assert isinstance(emb, PoolingRequestOutput) and emb.outputs.data.shape == (model.config.hidden_size,)
        with pytest.raises(ValueError, match="temperature"):
            engine.add_request("bad", "x", SamplingParams(temperature=-1))
        assert not engine.has_unfinished_requests() and engine.step() == []
        assert llm.collective_rpc("stats")[0]["running"] == 0
        assert llm.collective_rpc(lambda e, k: e.config.page_size * k, args=(2,)) == [2 * llm.engine.config.page_size]
        with pytest.raises(ValueError, match="method"):
            llm.collective_rpc("_queue")
        assert_all_pages_free(llm.engine)
    assert isinstance(LLMEngine.from_engine_args(EngineArgs(model, max_model_len=256)).llm, LLM)


def test_llm_engine_abort_spares_a_request_added_under_an_ended_sample_s_id(model):
    """An n-sample request's sample that ended frees its engine id ("1_z"); a request added under that id afterwards
    is not the parent's: aborting the parent neither ends it unreported nor leaves it unfinished for good."""
    long = dict(max_tokens=12, temperature=0, ignore_eos=True)
    with LLM(model) as llm:
        engine = llm.llm_engine
        engine.add_request("z", "import os\n", SamplingParams(**long, n=2))
        engine.step()
        llm.engine.abort("1_z")  # sample 1 ends (by hand here; a stop string ends one sample before the other)
        assert [o.outputs[0].finish_reason for o in engine.step() if o.request_id == "z"][-1:] == ["abort"]
        engine.add_request("1_z", "import os\n", SamplingParams(**long))
        engine.abort_request("z")
        outs = []
        for _ in range(100):
            if not engine.has_unfinished_requests():
                break
            outs += engine.step()
        assert not engine.has_unfinished_requests()
        assert [(o.outputs[0].finish_reason, len(o.outputs[0].token_ids)) for o in outs
                if o.request_id == "1_z" and o.finished] == [("length", 12)]
        assert_all_pages_free(llm.engine)


def test_a_prompt_the_pool_never_holds_is_named_by_embed_and_ends_unpooled_in_llm_engine(model):
    """A pooling request that can never fit the KV pool ends unpooled: `Engine.embed`'s result says why, LLM.embed
    raises a ValueError naming the prompt (vLLM's outputs have no place for an abort), LLMEngine's output has no
    data (not a NaN array); the engine serves on."""
    long = "import os " * 30
    with LLM(model, num_gpu_blocks_override=4, block_size=8, max_num_seqs=2, max_model_len=256) as llm:
        (result,) = llm.engine.embed([long], use_tqdm=False)
        assert result["embedding"] is None and "pages" in result["error"]
        with pytest.raises(ValueError, match="prompt 1 was not pooled"):
            llm.embed(["import os", long], use_tqdm=False)
        engine = llm.llm_engine
        engine.add_request("long", long, jaxserve.PoolingParams())
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert [(o.request_id, o.outputs.data) for o in outs] == [("long", None)]
        assert llm.embed(["import os"], use_tqdm=False)[0].outputs.embedding
        assert_all_pages_free(llm.engine)
