"""AsyncEngine: one engine thread, many asyncio callers; errors reach callers, never the loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from jaxserve import Engine, EngineConfig, SamplingParams, load
from jaxserve.async_engine import AsyncEngine, EngineDeadError

# One batch bucket and one prefill bucket: two compiled shapes serve every test here.
CONFIG = EngineConfig(num_pages=128, max_running=8, max_tokens_per_step=64, batch_buckets=(8,),
                      prefill_buckets=(64,), decode_steps=4, max_model_len=256)
GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = [f"The quick brown fox {i}" for i in range(12)]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load(tiny_checkpoint[0])


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def sync_engine(model):
    return Engine(model, CONFIG)


@pytest.fixture(scope="module")
def expected(sync_engine):
    """Greedy outputs of the plain synchronous engine (run before the async engine takes it over)."""
    results = sync_engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    sync_engine.clear_prefix_cache()
    return dict(zip(PROMPTS, results))


@pytest.fixture(scope="module")
def engine(sync_engine, expected, loop):
    engine = AsyncEngine(sync_engine)
    yield engine
    loop.run_until_complete(engine.shutdown())


def assert_pages_free(engine: AsyncEngine, loop) -> None:
    async def check():
        await engine.clear_prefix_cache()
        stats = await engine.stats()
        assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0, stats

    loop.run_until_complete(check())


def test_generate_async_matches_sync_engine(engine, loop, expected):
    result = loop.run_until_complete(engine.generate_async(PROMPTS[0], GREEDY))
    assert result["token_ids"] == expected[PROMPTS[0]]["token_ids"]
    assert result["text"] == expected[PROMPTS[0]]["text"]
    assert result["finish_reason"] == "length" and result["completion_tokens"] == 12
    assert_pages_free(engine, loop)


def test_stream_deltas_join_to_the_full_text(engine, loop, expected):
    async def collect():
        return [chunk async for chunk in engine.stream(PROMPTS[1], GREEDY)]

    chunks = loop.run_until_complete(collect())
    assert "".join(c["text"] for c in chunks) == expected[PROMPTS[1]]["text"]
    assert sum((c["token_ids"] for c in chunks), []) == expected[PROMPTS[1]]["token_ids"]
    assert [c["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["result"]["completion_tokens"] == 12
    assert_pages_free(engine, loop)


def test_concurrent_callers_get_their_own_outputs(engine, loop, expected):
    async def run_all():
        return await asyncio.gather(*(engine.generate_async(p, GREEDY) for p in PROMPTS))

    for prompt, result in zip(PROMPTS, loop.run_until_complete(run_all())):
        assert result["token_ids"] == expected[prompt]["token_ids"]
    assert_pages_free(engine, loop)


def test_stream_logprobs_come_per_token(engine, loop):
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=2)

    async def collect():
        return [chunk async for chunk in engine.stream(PROMPTS[2], params)]

    chunks = loop.run_until_complete(collect())
    tokens = sum((c["token_ids"] for c in chunks), [])
    assert len(sum((c["logprobs"] for c in chunks), [])) == len(tokens) == 6
    tops = sum((c["top_logprobs"] for c in chunks), [])
    assert all(len(t) == 2 and tok in t for t, tok in zip(tops, tokens))  # greedy: the token is the top one
    assert_pages_free(engine, loop)


@pytest.mark.parametrize("prompt, params, match", [
    ("", GREEDY, "prompt must not be empty"),
    ("x" * 300, GREEDY, "max_model_len"),
    ([1, 2, 100000], GREEDY, "prompt token ids"),
    ("hi", "not params", "SamplingParams"),
])
def test_bad_input_raises_value_error_and_loop_keeps_serving(engine, loop, expected, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        loop.run_until_complete(engine.generate_async(prompt, params))
    assert engine.is_running
    result = loop.run_until_complete(engine.generate_async(PROMPTS[0], GREEDY))
    assert result["token_ids"] == expected[PROMPTS[0]]["token_ids"]


def test_request_that_never_fits_the_pool_is_refused(engine, loop, monkeypatch):
    monkeypatch.setattr(engine.engine.scheduler, "never_fits", lambda request: True)
    with pytest.raises(ValueError, match="more KV pages than the pool"):
        loop.run_until_complete(engine.generate_async(PROMPTS[0], GREEDY))
    monkeypatch.undo()
    assert loop.run_until_complete(engine.generate_async(PROMPTS[0], GREEDY))["finish_reason"] == "length"
    assert_pages_free(engine, loop)


def test_duplicate_request_id_is_refused(engine, loop):
    async def run():
        handle = await engine.submit(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True), "dup")
        with pytest.raises(ValueError, match="already in use"):
            await engine.submit(PROMPTS[1], GREEDY, "dup")
        handle.abort()

    loop.run_until_complete(run())
    assert_pages_free(engine, loop)


@pytest.fixture
def slow_decode(engine, monkeypatch):
    """Each decode call takes 20 ms more, so a long request is surely still running when aborted."""
    real = engine.engine.runner.decode

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.engine.runner, "decode", slow)


def test_leaving_a_stream_early_aborts_it_and_frees_pages(engine, loop, slow_decode):
    async def run():
        agen = engine.stream(PROMPTS[3], SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()
        # The abort is a command to the engine thread; stats() runs after it, in order.
        return await engine.stats()

    stats = loop.run_until_complete(run())
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert_pages_free(engine, loop)


def test_cancelled_task_aborts_its_request(engine, loop, slow_decode):
    async def run():
        task = asyncio.ensure_future(engine.generate_async(PROMPTS[4], SamplingParams(max_tokens=200, ignore_eos=True)))
        await asyncio.sleep(0.2)
        assert (await engine.stats())["running"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.stats()

    stats = loop.run_until_complete(run())
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert_pages_free(engine, loop)


def test_failing_step_fails_running_requests_and_loop_recovers(engine, loop, expected, monkeypatch):
    real_decode = engine.engine.runner.decode
    calls = {"n": 0}

    def flaky_decode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected device failure")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(engine.engine.runner, "decode", flaky_decode)

    async def run():
        return await asyncio.gather(*(engine.generate_async(p, GREEDY) for p in PROMPTS[:3]),
                                    return_exceptions=True)

    results = loop.run_until_complete(run())
    assert all(isinstance(r, EngineDeadError) and "injected device failure" in str(r) for r in results)
    assert engine.is_running
    monkeypatch.setattr(engine.engine.runner, "decode", real_decode)
    result = loop.run_until_complete(engine.generate_async(PROMPTS[0], GREEDY))
    assert result["token_ids"] == expected[PROMPTS[0]]["token_ids"]
    assert_pages_free(engine, loop)


def test_step_failing_while_admitting_fails_those_requests_and_returns_their_slots(engine, loop, expected,
                                                                                  monkeypatch):
    """A failure between taking a request off the queue and admitting it (its pages' allocation) left it
    neither waiting nor running: its caller waited forever and its sequence slot was never given back."""
    scheduler = engine.engine.scheduler
    slots = len(scheduler.free_slots)

    def failing_allocation(*args, **kwargs):
        raise RuntimeError("injected allocation failure")

    monkeypatch.setattr(scheduler, "_allocate_rows", failing_allocation)

    async def run():
        return await asyncio.wait_for(asyncio.gather(*(engine.generate_async(p, GREEDY) for p in PROMPTS[:2]),
                                                     return_exceptions=True), 30)

    results = loop.run_until_complete(run())
    assert all(isinstance(r, EngineDeadError) and "injected allocation failure" in str(r) for r in results), results
    monkeypatch.undo()
    assert loop.run_until_complete(engine.stats())["running"] == 0
    assert len(scheduler.free_slots) == slots
    result = loop.run_until_complete(engine.generate_async(PROMPTS[0], GREEDY))
    assert result["token_ids"] == expected[PROMPTS[0]]["token_ids"]
    assert_pages_free(engine, loop)


def test_shutdown_drains_then_aborts_and_refuses_new_requests(model):
    async def run():
        engine = AsyncEngine(Engine(model, CONFIG))
        # Compile first (greedy, like both requests below), so the drain time measures serving.
        await engine.generate_async(PROMPTS[0], GREEDY)
        real = engine.engine.runner.decode
        # 0.05 s a call: the long request needs >= 60 calls (3 s), past the drain; the short
        # one 3 calls, well inside it even on a loaded 2-core CI machine.
        engine.engine.runner.decode = lambda *a, **k: (time.sleep(0.05), real(*a, **k))[1]
        long_params = SamplingParams(max_tokens=240, temperature=0, ignore_eos=True)
        short = asyncio.ensure_future(engine.generate_async(PROMPTS[1], GREEDY))
        long = asyncio.ensure_future(engine.generate_async(PROMPTS[2], long_params))
        await asyncio.sleep(0.05)
        await engine.shutdown(drain_s=2.5)
        assert not engine.is_running and engine.engine.closed
        with pytest.raises(EngineDeadError):
            await engine.submit(PROMPTS[3], GREEDY)
        return await short, await long

    short, long = asyncio.run(run())
    assert short["finish_reason"] == "length"  # finished within the drain time
    assert long["finish_reason"] == "abort" and long["completion_tokens"] < 240


def test_one_wakeup_per_engine_step_carries_every_request_chunk(engine, loop, expected):
    """The engine thread hands the loop a step's chunks in one call_soon_threadsafe, not one per request."""
    deliveries = []
    real = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        if getattr(callback, "__name__", "") == "_deliver":
            deliveries.append(len(args[0]))
        return real(callback, *args, **kwargs)

    async def run():
        handles = [await engine.submit(p, GREEDY) for p in PROMPTS[:6]]  # all queued before they run
        return await asyncio.gather(*(h.result() for h in handles))

    loop.call_soon_threadsafe = counting
    try:
        results = loop.run_until_complete(run())
    finally:
        del loop.call_soon_threadsafe
    for p, r in zip(PROMPTS[:6], results):
        assert r["token_ids"] == expected[p]["token_ids"]
    # Every request's chunks came in these wakeups (12 tokens in calls of 4: at least 3 chunks a request), and the
    # requests that ran side by side shared them.
    assert sum(deliveries) >= 6 * 3 and max(deliveries) > 1, deliveries
    assert_pages_free(engine, loop)
