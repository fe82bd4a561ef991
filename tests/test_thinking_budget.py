"""vLLM's thinking_token_budget: at most k tokens inside a <think> section, then </think> forced, then free text; held
to transformers' greedy tokens of the same sequence, across multi-step decode calls, chaining, speculation,
preemption and every policy."""

from __future__ import annotations

import pytest

from jaxserve import Engine, SamplingParams
from jaxserve.request import ThinkBudget
from tests.test_engine import assert_all_pages_free, hf_greedy, random_prompts, small_config, tiny  # noqa: F401


def markers(engine: Engine) -> tuple[list[int], list[int]]:
    start, end = engine._think_markers()
    return list(start), list(end)


def expected(hf, prompt: list[int], budget: int, max_tokens: int, end: list[int]) -> list[int]:
    """transformers' greedy tokens for ``budget`` free thinking tokens, the end marker, then greedy again (the
    random model never writes the marker itself within them: checked)."""
    thought = hf_greedy(hf, prompt, budget) if budget else []
    rest = max_tokens - budget - len(end)
    after = hf_greedy(hf, prompt + thought + end, rest) if rest > 0 else []
    return (thought + end + after)[:max_tokens]


def test_the_state_cuts_at_the_budget_and_forces_the_marker():
    b = ThinkBudget.from_prompt(3, (7, 8), (9, 8), [1, 7, 8])  # the prompt opened a section
    assert b.thinking and b.room() == 3
    assert b.take([4, 5, 6, 4, 5]) == 3 and b.forced() == 9 and b.room() == 0
    assert b.take([4]) == 0  # sampled without the forcing mask: not taken
    assert b.take([9]) == 1 and b.forced() == 8
    assert b.take([8, 4, 5]) == 3 and not b.thinking and b.room() is None
    assert b.take([7, 8, 4]) == 3 and b.thinking and b.room() == 2  # a new section: a new budget
    assert ThinkBudget.from_prompt(0, (7,), (9,), [7]).forced() == 9  # no thinking at all
    assert ThinkBudget.from_prompt(2, (7,), (9,), [7, 4, 9]).room() is None  # the prompt closed its section


@pytest.mark.parametrize("budget", [0, 1, 5, 6])
@pytest.mark.parametrize("policy", ["prefill_first", "mixed"])
def test_greedy_output_thinks_budget_tokens_then_closes(tiny, budget, policy):
    """Across 4-step decode calls (budgets cut inside a call and at its end, and 0: the prefill's token forced)
    and two policies: the budgeted row's tokens are transformers' with the marker where the budget ends, a row
    without a budget beside it is untouched, and every page is free after."""
    m, hf = tiny
    with Engine(m, small_config(policy=policy)) as engine:
        start, end = markers(engine)
        prompt = random_prompts(m.config.vocab_size, [9])[0] + start
        plain = random_prompts(m.config.vocab_size, [12])[0]
        max_tokens = budget + len(end) + 7
        outs = engine.generate([prompt, plain], [
            SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, thinking_token_budget=budget),
            SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)], use_tqdm=False)
        want = expected(hf, prompt, budget, max_tokens, end)
        assert end not in [want[i:i + len(end)] for i in range(budget)]  # the model did not close it itself
        assert outs[0]["token_ids"] == want
        assert outs[1]["token_ids"] == hf_greedy(hf, plain, max_tokens)
        assert_all_pages_free(engine)


def test_a_prompt_outside_a_section_is_not_limited_and_a_large_budget_changes_nothing(tiny):
    m, hf = tiny
    with Engine(m, small_config()) as engine:
        start, end = markers(engine)
        closed = random_prompts(m.config.vocab_size, [6])[0] + start + [5, 6] + end
        opened = random_prompts(m.config.vocab_size, [6])[0] + start
        outs = engine.generate([closed, opened], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                                thinking_token_budget=100), use_tqdm=False)
        assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 12) for p in (closed, opened)]
        assert_all_pages_free(engine)


def test_budgets_under_speculation_and_preemption(tiny):
    """Accepted drafts are cut at the budget too, and a request preempted (recomputed later) keeps its count."""
    m, hf = tiny
    with Engine(m, small_config(speculative_tokens=3)) as speculating, \
            Engine(m, small_config(num_pages=12, max_running=4)) as small:
        start, end = markers(speculating)
        prompts = [p + start for p in random_prompts(m.config.vocab_size, [5, 7, 9, 11])]
        params = SamplingParams(max_tokens=len(end) + 12, temperature=0, ignore_eos=True, thinking_token_budget=6)
        want = [expected(hf, p, 6, params.max_tokens, end) for p in prompts]
        for engine in (speculating, small):
            assert [o["token_ids"] for o in engine.generate(prompts, params, use_tqdm=False)] == want
            assert_all_pages_free(engine)
        assert small.stats()["preemptions"] > 0


def test_bad_budgets_are_refused_by_name(tiny):
    m, _ = tiny
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="thinking_token_budget"):
            SamplingParams(thinking_token_budget=bad)
    from jaxserve import LoadedModel

    bare = LoadedModel.from_params(m.params, m.config)  # no tokenizer: no markers to count between
    with Engine(bare, small_config()) as engine:
        with pytest.raises(ValueError, match="thinking_token_budget needs a tokenizer"):
            engine.generate([[5, 6, 7]], SamplingParams(thinking_token_budget=4), use_tqdm=False)


def test_the_server_takes_the_budget_from_a_request(tiny_checkpoint, tiny):
    """vLLM's request field: a completion whose prompt opens a section thinks that many tokens, then the marker;
    a bad budget is a 400 naming it."""
    import httpx

    from jaxserve.server import ServerConfig, create_app
    from tests.test_server import ENGINE_CONFIG, LiveServer

    m, hf = tiny
    with LiveServer(create_app(m, ENGINE_CONFIG, ServerConfig(model_name="tiny"))) as live:
        start, end = markers(live.app.state.jaxserve.engine.engine)
        prompt = random_prompts(m.config.vocab_size, [7])[0] + start
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 3 + len(end) + 2, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "thinking_token_budget": 3}
        r = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected(hf, prompt, 3, body["max_tokens"], end)
        r = httpx.post(live.url + "/v1/completions", json={**body, "thinking_token_budget": -2}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget", r.text


def test_the_forced_marker_outranks_allowed_token_ids(tiny):
    """A request whose allowed_token_ids leave out the marker still gets it at its budget (it asked for both), and
    only allowed tokens elsewhere."""
    m, _ = tiny
    with Engine(m, small_config()) as engine:
        start, end = markers(engine)
        allowed = [5, 6, 7]
        (out,) = engine.generate([random_prompts(m.config.vocab_size, [6])[0] + start], SamplingParams(
            max_tokens=2 + len(end) + 3, temperature=0, ignore_eos=True, thinking_token_budget=2,
            allowed_token_ids=allowed), use_tqdm=False)
        ids = out["token_ids"]
        assert ids[2:2 + len(end)] == end
        assert set(ids[:2] + ids[2 + len(end):]) <= set(allowed)
        assert_all_pages_free(engine)
