"""vLLM's `SamplingParams.n` through `generate` / `chat`, and the scheduler's sharing of a prompt being prefilled:
a prompt's samples compute its pages once (the others wait a step and attach them), give what n separate requests
give, and leave every page free."""

from __future__ import annotations

import numpy as np
import pytest

import jaxserve
from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.request import Request
from jaxserve.scheduler import Scheduler
from tests.test_engine import assert_all_pages_free, small_config


@pytest.fixture(scope="module")
def model():
    return jaxserve.load()


def _scheduler(prefix_caching: bool = True) -> Scheduler:
    cfg = EngineConfig(num_pages=64, page_size=8, max_running=8, max_tokens_per_step=256, decode_steps=4,
                       batch_buckets=(8,), prefill_buckets=(16, 64, 256), prefix_caching=prefix_caching)
    return Scheduler(cfg, 64, max_model_len=256)


def _request(rid: str, prompt: list[int], **params) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=4, **params), None, ())


def _dispatched(s: Scheduler, plan) -> None:
    """What the engine does when it dispatches a prefill call: progress recorded, finished prompts indexed."""
    for r, _, e in plan.prefill:
        r.computed = e
        if e == r.prefill_end:
            s.after_prefill(r)


def test_a_request_sharing_a_prompt_being_prefilled_waits_for_its_pages_and_the_queue_moves_on():
    rng = np.random.default_rng()
    prompt = rng.integers(3, 100, size=37).tolist()  # four whole pages and five tokens
    s = _scheduler()
    a, b = _request("a", prompt), _request("b", prompt)
    c = _request("c", rng.integers(100, 200, size=20).tolist())  # unrelated: admitted past the held b
    d = _request("d", prompt[:8] + rng.integers(200, 300, size=12).tolist())  # shares a's first page only
    e = _request("e", prompt[:5] + rng.integers(200, 300, size=12).tolist())  # less than a page: not held
    for r in (a, b, c, d, e):
        s.add(r)
    plan = s.schedule()
    assert [r.request_id for r, _, _ in plan.prefill] == ["a", "c", "e"]
    assert [r.request_id for r in s.waiting] == ["b", "d"]  # their order kept
    _dispatched(s, plan)
    plan = s.schedule()
    assert [(r.request_id, st, en) for r, st, en in plan.prefill] == [("b", 32, 37), ("d", 8, 20)]
    assert b.cached_tokens == 32 and d.cached_tokens == 8


def test_nothing_is_held_without_prefix_caching_or_for_a_request_owed_prompt_logprobs():
    prompt = list(range(3, 40))
    s = _scheduler(prefix_caching=False)
    for rid in "ab":
        s.add(_request(rid, prompt))
    assert len(s.schedule().prefill) == 2
    s = _scheduler()
    s.add(_request("a", prompt))
    s.add(_request("b", prompt, prompt_logprobs=0))  # computes its whole prompt anyway
    assert len(s.schedule().prefill) == 2


def test_a_prompt_already_cached_holds_nothing_more():
    # a's prompt was indexed before; b and c share it, and what they would wait for is already there.
    prompt = list(range(3, 40))
    s = _scheduler()
    a = _request("a", prompt)
    s.add(a)
    _dispatched(s, s.schedule())
    for rid in "bc":
        s.add(_request(rid, prompt))
    assert [(r.request_id, st) for r, st, _ in s.schedule().prefill] == [("b", 32), ("c", 32)]


def test_generate_n_greedy_samples_equal_one_request_and_share_the_prompt(model):
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed by iteration.\"\"\"\n"
    greedy = dict(max_tokens=12, temperature=0, ignore_eos=True)
    with Engine(model, small_config()) as engine:
        (alone,) = engine.generate([prompt], SamplingParams(**greedy), use_tqdm=False)
        engine.clear_prefix_cache()
        before = engine.stats()["prefill_tokens"]
        (out,) = engine.generate([prompt], SamplingParams(**greedy, n=4), use_tqdm=False)
        computed = engine.stats()["prefill_tokens"] - before
        assert [o["token_ids"] for o in out["outputs"]] == [alone["token_ids"]] * 4
        assert out["token_ids"] == alone["token_ids"] and out["text"] == out["outputs"][0]["text"]
        n_prompt = alone["prompt_tokens"]
        assert n_prompt > 2 * 8
        whole = (n_prompt - 1) // 8 * 8  # whole pages of all but the last token: attached, not computed
        assert [o["cached_tokens"] for o in out["outputs"]] == [0] + [whole] * 3
        assert computed == n_prompt + 3 * (n_prompt - whole)
        assert_all_pages_free(engine)


def test_generate_n_seeded_samples_are_the_requests_seeded_seed_plus_i(model):
    prompts = ["import os", "class Point:"]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    with Engine(model, small_config()) as engine:
        outs = engine.generate(prompts, SamplingParams(**{**params.to_dict(), "n": 3}), use_tqdm=False)
        one_by_one = [[engine.generate([p], SamplingParams(**{**params.to_dict(), "seed": 123 + i}),
                                       use_tqdm=False)[0]["token_ids"] for i in range(3)] for p in prompts]
        assert [[o["token_ids"] for o in out["outputs"]] for out in outs] == one_by_one
        assert len({tuple(ids) for ids in one_by_one[0]}) > 1  # the samples differ
        assert_all_pages_free(engine)


def test_chat_n_and_per_prompt_n(model):
    with Engine(model, small_config()) as engine:
        outs = engine.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]],
                           [SamplingParams(max_tokens=4, n=2), SamplingParams(max_tokens=4)], use_tqdm=False)
        assert len(outs[0]["outputs"]) == 2 and [o["token_ids"] for o in outs[1]["outputs"]] == [outs[1]["token_ids"]]
        assert all(o["completion_tokens"] >= 1 for o in outs[0]["outputs"])
        assert_all_pages_free(engine)


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2", 10**6])
def test_bad_n_is_refused_by_name(n):
    with pytest.raises(ValueError, match="^n must be"):
        SamplingParams(n=n)


def test_add_request_takes_one_sample(model):
    with Engine(model, small_config()) as engine:
        with pytest.raises(ValueError, match="^n must be 1"):
            engine.add_request("import os", SamplingParams(n=2))
        assert engine.stats()["waiting"] == 0
