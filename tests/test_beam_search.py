"""Beam search (vLLM's ``LLM.beam_search``): the search rule against a plain statement of vLLM's algorithm over a
made-up model with EOS, the engine's beams against the same search over transformers' log-probabilities, width 1
against greedy decoding, the prefix cache serving each beam's parent pages, and bad parameters refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import jaxserve
from jaxserve import BeamSearchParams, Engine
from jaxserve.beam_search import search
from tests.test_engine import assert_all_pages_free, random_prompts, small_config

EOS = 2


def _markov(vocab: int, seed: int):
    """A made-up model: the next token's log-probabilities depend on the last token alone; EOS is likely after 5."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(vocab, vocab)) * 2
    logits[5, EOS] = 6.0
    table = logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    def next_logprobs(seqs, k):
        out = []
        for s in seqs:
            row = table[s[-1]]
            best = np.argsort(-row)[:k]
            out.append({int(t): float(row[t]) for t in best})
        return out

    return table, next_logprobs


def _vllm_rule(table, prompt, width, max_tokens, ignore_eos, length_penalty):
    """vLLM's beam search as its entrypoint states it: every beam extended by its 2 x width best tokens, EOS
    extensions set aside as completed, the width best of the rest by score kept; at the end completed and live
    beams ranked together. Full sorts, no shared code with `jaxserve.beam_search`."""
    def score(tokens, cum):
        n = len(tokens) - (1 if tokens[-1] == EOS else 0)
        return cum / n ** length_penalty

    beams, completed = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        if not beams:
            break
        new = []
        for tokens, cum in beams:
            row = table[tokens[-1]]
            for t in sorted(range(len(row)), key=lambda t: -row[t])[: 2 * width]:
                cand = (tokens + [t], cum + row[t])
                (completed if t == EOS and not ignore_eos else new).append(cand)
        beams = sorted(new, key=lambda b: score(*b), reverse=True)[:width]
    return sorted(completed + beams, key=lambda b: score(*b), reverse=True)[:width]


@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_search_follows_vllms_rule(ignore_eos, length_penalty):
    finished = 0
    for seed in range(5):
        table, next_logprobs = _markov(12, seed)
        prompts = [[5], [3, 7], [9, 1, 4]]
        params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=ignore_eos, length_penalty=length_penalty)
        found = search(next_logprobs, prompts, params, [EOS])
        for prompt, beams in zip(prompts, found):
            want = _vllm_rule(table, prompt, 3, 6, ignore_eos, length_penalty)
            assert [b.tokens for b in beams] == [w[0] for w in want]
            assert [b.cum_logprob for b in beams] == pytest.approx([w[1] for w in want])
            assert all(b.finished == (b.tokens[-1] == EOS and not ignore_eos) for b in beams)
            finished += sum(b.finished for b in beams)
    # The EOS path was taken (a length penalty of 2 favours the longer beams that go on).
    assert finished > 0 or ignore_eos or length_penalty > 1


def test_engine_beams_are_the_search_over_transformers_logprobs(tiny_checkpoint):
    path, hf = tiny_checkpoint

    def hf_next(seqs, k):
        out = []
        with torch.no_grad():
            for s in seqs:
                lp = torch.log_softmax(hf(torch.tensor([s])).logits[0, -1].double(), -1)
                vals, ids = torch.topk(lp, k)
                out.append(dict(zip(ids.tolist(), vals.tolist())))
        return out

    model = jaxserve.load(path)
    prompts = random_prompts(model.config.vocab_size, [5, 17, 30])
    params = BeamSearchParams(beam_width=3, max_tokens=6)
    with Engine(model, small_config()) as engine:
        outs = engine.beam_search(prompts, params, use_tqdm=False)
        want = search(hf_next, prompts, params, engine.eos_ids)
        for prompt, out, beams in zip(prompts, outs, want):
            assert [s["token_ids"] for s in out["sequences"]] == [b.tokens[len(prompt):] for b in beams]
            for s, b in zip(out["sequences"], beams):
                assert s["cum_logprob"] == pytest.approx(b.cum_logprob, abs=1e-4)
                assert s["logprobs"] == pytest.approx(b.logprobs, abs=1e-4)
                assert s["score"] == pytest.approx(s["cum_logprob"] / (len(prompt) + len(s["token_ids"])
                                                                      - (s["finish_reason"] == "stop")))
        assert_all_pages_free(engine)


def test_width_one_is_greedy_and_beams_reuse_their_parents_pages():
    model = jaxserve.load()
    prompts = ["def add(a, b):", "import numpy as np\nimport jax\n"]
    with Engine(model, small_config(page_size=8)) as engine:
        greedy = engine.generate(prompts, jaxserve.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                                  logprobs=0), use_tqdm=False)
        engine.clear_prefix_cache()
        before = engine.stats()["prefill_tokens"]
        outs = engine.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=10, ignore_eos=True),
                                  use_tqdm=False)
        computed = engine.stats()["prefill_tokens"] - before
        for g, o in zip(greedy, outs):
            (s,) = o["sequences"]
            assert s["token_ids"] == g["token_ids"] and s["text"] == g["text"]
            assert s["cum_logprob"] == pytest.approx(math.fsum(g["logprobs"]), abs=1e-4)
        # Without the cache each of the 10 steps would compute a beam's whole text; with it, the last partial page
        # and the new token (at most a page a beam a step, past the first step's prompts).
        prompt_tokens = sum(o["prompt_tokens"] for o in outs)
        assert computed <= prompt_tokens + 9 * len(prompts) * 8
        wide = engine.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=6), use_tqdm=False)
        assert all(len(o["sequences"]) == 4 for o in wide)
        scores = [s["score"] for s in wide[0]["sequences"]]
        assert scores == sorted(scores, reverse=True)
        assert wide[0]["sequences"][0]["cum_logprob"] >= greedy[0]["logprobs"][0] + sum(greedy[0]["logprobs"][1:6]) - 1e-4
        assert_all_pages_free(engine)


@pytest.mark.parametrize("field, kwargs", [
    ("beam_width", dict(beam_width=0, max_tokens=4)), ("beam_width", dict(beam_width=11, max_tokens=4)),
    ("beam_width", dict(beam_width=2.0, max_tokens=4)), ("max_tokens", dict(beam_width=2, max_tokens=0)),
    ("ignore_eos", dict(beam_width=2, max_tokens=4, ignore_eos=1)),
    ("length_penalty", dict(beam_width=2, max_tokens=4, length_penalty=float("nan"))),
])
def test_bad_params_are_refused_by_name(field, kwargs):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        BeamSearchParams(**kwargs)


def test_bad_prompts_are_refused_before_anything_runs():
    with Engine(jaxserve.load(), small_config(max_model_len=64)) as engine:
        with pytest.raises(ValueError, match="exceeds max_model_len"):
            engine.beam_search(["x" * 10, "a " * 60], BeamSearchParams(beam_width=2, max_tokens=8), use_tqdm=False)
        with pytest.raises(ValueError, match="prompt must not be empty"):
            engine.beam_search([""], BeamSearchParams(beam_width=2, max_tokens=8), use_tqdm=False)
        with pytest.raises(ValueError, match="BeamSearchParams"):
            engine.beam_search(["x"], jaxserve.SamplingParams(), use_tqdm=False)
        with pytest.raises(ValueError, match="prompts must be"):
            engine.beam_search(None, BeamSearchParams(beam_width=2, max_tokens=8), use_tqdm=False)
        assert engine.stats()["waiting"] == 0 and engine.stats()["generated_tokens"] == 0
        # A generator of prompts is a list of them.
        got = engine.beam_search((p for p in ["x", "y"]), BeamSearchParams(beam_width=2, max_tokens=2), use_tqdm=False)
        assert len(got) == 2
    # Beams that outgrow a small KV pool: the engine's reason as a ValueError, every page free again.
    with Engine(jaxserve.load(), small_config(num_pages=2, page_size=8)) as engine:
        with pytest.raises(ValueError, match="needs more KV pages"):
            engine.beam_search([[5] * 14], BeamSearchParams(beam_width=2, max_tokens=4), use_tqdm=False)
        assert_all_pages_free(engine)


def test_server_use_beam_search_gives_the_n_best_beams_as_choices(tiny_checkpoint):
    """vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions: the n choices are the engine's n best
    beams of width n, best first; what beam search does not take is 400 naming the field."""
    import httpx

    from jaxserve.server import ServerConfig, create_app
    from tests.test_server import LiveServer

    model = jaxserve.load(tiny_checkpoint[0])
    prompt = random_prompts(model.config.vocab_size, [9])[0]
    with Engine(model, small_config()) as engine:
        want = engine.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=5), use_tqdm=False)[0]
    with LiveServer(create_app(model, small_config(), ServerConfig(model_name="tiny"))) as live:
        post = lambda path, body: httpx.post(live.url + path, json=body, timeout=60)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "n": 3, "use_beam_search": True}
        r = post("/v1/completions", body)
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == [s["text"] for s in want["sequences"]]
        assert r.json()["usage"]["completion_tokens"] == sum(len(s["token_ids"]) for s in want["sequences"])
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "n": 2,
                "use_beam_search": True}
        r = post("/v1/chat/completions", chat)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
        for field, value in (("stream", True), ("logprobs", 1), ("stop", ["x"])):
            r = post("/v1/completions", {**body, field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r = post("/v1/completions", {**body, "n": 11})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        # A forced tool call would constrain the beams, which beam search cannot follow: refused by name too.
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        r = post("/v1/chat/completions", {**chat, "tools": tools, "tool_choice": "required"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
        # cache_salt holds for the beams' steps: a one-step search of a prompt cached without the salt hits nothing.
        assert post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1}).status_code == 200
        hits = live.engine_call(lambda e: e.stats())["prefix_hit_tokens"]
        r = post("/v1/completions", {**body, "max_tokens": 1, "cache_salt": "other tenant"})
        assert r.status_code == 200, r.text
        assert live.engine_call(lambda e: e.stats())["prefix_hit_tokens"] == hits
        r = post("/v1/completions", {**body, "max_tokens": 1})  # the same without the salt: a hit
        assert live.engine_call(lambda e: e.stats())["prefix_hit_tokens"] > hits
        stats = live.engine_call(lambda e: e.stats())
        assert stats["running"] == 0 and stats["waiting"] == 0
