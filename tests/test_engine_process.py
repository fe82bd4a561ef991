"""The engine in a process of its own (`jaxserve.engine_process`, the server's ``engine_process``): the same answers as
the engine thread's, errors that reach callers, nothing leaked, and a dead child that fails requests instead of
hanging them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from jaxserve import EngineConfig, SamplingParams, load
from jaxserve.async_engine import EngineDeadError
from jaxserve.engine import Engine
from jaxserve.engine_process import EngineProcess, EngineSpec
from jaxserve.server import ServerConfig, create_app
from tests.test_server import API_KEY, ENGINE_CONFIG, LiveServer, post

PROMPTS = ["The quick brown fox", "def add(a, b):", "lazy dog"]


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    app = create_app(tiny_checkpoint[0], ENGINE_CONFIG,
                     ServerConfig(model_name="tiny", api_key=API_KEY, engine_process=True))
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """Each prompt's greedy continuation from an engine in this process."""
    with Engine(load(tiny_checkpoint[0]), ENGINE_CONFIG) as engine:
        return [r["token_ids"] for r in engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0))]


async def settled(engine) -> dict:
    """The engine's stats once nothing runs or waits and no page is used (the prefix cache dropped), or after 5 s."""
    for _ in range(100):  # an abort is a command the child runs between steps
        await engine.clear_prefix_cache()
        stats = await engine.stats()
        if stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0:
            break
        await asyncio.sleep(0.05)
    return stats


def engine_stats(live) -> dict:
    return live.engine_call(settled)


def assert_pages_free(live) -> None:
    stats = engine_stats(live)
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0, stats


def completion(prompt: str, **fields) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "return_token_ids": True,
            **fields}


def streamed_ids(live, body: dict) -> list[int]:
    ids = []
    with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
    return ids


def test_answers_equal_the_engine_thread_s_streamed_or_not(live, expected):
    """Greedy ids from the child, whole and streamed, equal an in-process engine's for each prompt; every page is
    free afterwards."""
    for prompt, ids in zip(PROMPTS, expected):
        whole = post(live, "/v1/completions", completion(prompt)).json()
        assert whole["choices"][0]["token_ids"] == ids
        assert streamed_ids(live, completion(prompt)) == ids
    assert_pages_free(live)


def test_concurrent_requests_each_get_their_own_answer(live, expected):
    async def run():
        async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=60) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", json=completion(p))
                                             for p in PROMPTS * 4))
        return [r.json()["choices"][0]["token_ids"] for r in replies]

    assert asyncio.run(run()) == expected * 4
    assert_pages_free(live)


def test_bad_input_is_a_400_and_the_child_keeps_serving(live, expected):
    """A token id outside the vocabulary is refused by the child's engine (its ValueError crosses the pipe as a 400);
    an impossible regex by the child's constraint compiler; the next request is served."""
    r = post(live, "/v1/completions", completion([1, 10**6]))
    assert r.status_code == 400 and "[0, 320)" in r.json()["error"]["message"], r.text
    r = post(live, "/v1/completions", completion("x", structured_outputs={"regex": "(unclosed"}))
    assert r.status_code == 400, r.text
    assert post(live, "/v1/completions", completion(PROMPTS[0])).json()["choices"][0]["token_ids"] == expected[0]
    assert_pages_free(live)


def test_structured_outputs_compile_in_the_child(live):
    r = post(live, "/v1/completions", completion("The answer:", max_tokens=12,
                                                 structured_outputs={"regex": "[0-9]{3}"}))
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert len(text) == 3 and text.isdigit(), text
    assert_pages_free(live)


def test_a_closed_stream_aborts_its_request_in_the_child(live):
    body = {**completion(PROMPTS[1], max_tokens=200, ignore_eos=True), "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    assert_pages_free(live)


def test_metrics_and_sleep_cross_the_pipe(live, expected):
    """/metrics counts requests the child finished; a level-2 sleep frees the child's weights and /wake_up has the
    child read its checkpoint again (weights never cross): the same greedy answer after."""
    post(live, "/v1/completions", completion(PROMPTS[0]))
    text = httpx.get(live.url + "/metrics").text
    finished = [line for line in text.splitlines() if line.startswith("jaxserve_requests_total{")]
    assert finished and sum(float(line.split()[-1]) for line in finished) >= 1, finished
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(live.url + "/sleep?level=2", headers=auth).json() == {"status": "ok"}
    assert httpx.get(live.url + "/is_sleeping").json() == {"is_sleeping": True}
    assert post(live, "/v1/completions", completion(PROMPTS[0])).status_code == 400
    assert httpx.post(live.url + "/wake_up", headers=auth).json() == {"status": "ok"}
    assert post(live, "/v1/completions", completion(PROMPTS[0])).json()["choices"][0]["token_ids"] == expected[0]


def test_a_loaded_model_is_refused_by_name(tiny_checkpoint):
    app = create_app(load(tiny_checkpoint[0]), ENGINE_CONFIG, ServerConfig(engine_process=True))
    with pytest.raises(ValueError, match="engine_process.*checkpoint folder"):
        asyncio.run(app.router.lifespan_context(app).__aenter__())


def test_a_child_that_cannot_start_says_why(tiny_checkpoint):
    spec = EngineSpec(tiny_checkpoint[0], ENGINE_CONFIG, setup="jaxserve.no_such_module:setup")
    with pytest.raises(RuntimeError, match="could not start: ModuleNotFoundError.*no_such_module"):
        EngineProcess(spec)


def test_a_killed_child_fails_its_requests_instead_of_hanging(tiny_checkpoint):
    """SIGINT and SIGTERM leave the child serving (a terminal's Ctrl-C and a service manager's stop reach the whole
    process group: the server drains, then stops the child); then it dies mid-request (SIGKILL: no goodbye): the open
    request ends with EngineDeadError, later calls are refused at once, and the driver reports it is not running."""
    config = EngineConfig(num_pages=128, max_running=8, max_tokens_per_step=64, batch_buckets=(8,),
                          prefill_buckets=(64,), decode_steps=1, max_model_len=256)
    # Slowed decodes keep the request running past the signals (at full speed its 200 tokens took under the 0.5 s
    # below, and it finished before the SIGKILL).
    engine = EngineProcess(EngineSpec(tiny_checkpoint[0], config, setup="tests.test_engine_process:slow_decodes"))

    async def run():
        handle = await engine.submit([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
        chunks = aiter(handle)
        first = await anext(chunks)
        assert first["finish_reason"] is None
        # A terminal's Ctrl-C, or systemd's stop, reaches the child too, which leaves its end to the server (a
        # drain): it goes on.
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(engine._process.pid, sig)
            await asyncio.sleep(0.5)
            assert (await anext(chunks))["finish_reason"] is None and engine.is_running, sig
        os.kill(engine._process.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="exited with code"):
            async for _ in chunks:
                pass
        assert time.monotonic() - start < 30
        with pytest.raises(EngineDeadError):
            await engine.stats()
        assert not engine.is_running
        await engine.shutdown()

    asyncio.run(run())


def test_pooling_beam_search_and_logprobs_cross_the_pipe(live):
    """The routes that are not one plain completion: an embedding (PoolingParams crosses), a beam search (its steps are
    requests to the child; eos ids come from the child's start report) and logprobs."""
    embedded = post(live, "/v1/embeddings", {"model": "tiny", "input": PROMPTS[0]})
    assert embedded.status_code == 200, embedded.text
    assert len(embedded.json()["data"][0]["embedding"]) == 64  # the tiny checkpoint's hidden size
    beams = post(live, "/v1/completions", completion(PROMPTS[0], max_tokens=4, n=2, use_beam_search=True))
    assert beams.status_code == 200 and len(beams.json()["choices"]) == 2, beams.text
    scored = post(live, "/v1/completions", completion(PROMPTS[0], max_tokens=4, logprobs=2)).json()["choices"][0]
    assert len(scored["logprobs"]["token_logprobs"]) == 4
    assert all(len(top) >= 1 for top in scored["logprobs"]["top_logprobs"])
    assert_pages_free(live)


def test_logprob_token_ids_cross_the_pipe(live, tiny_checkpoint):
    """A request's logprob_token_ids reach the child inside its pickled SamplingParams, and each position's values
    come back: transformers' log-softmax of the named tokens, after the sampled one's."""
    from tests.test_engine import hf_log_softmax64

    r = post(live, "/v1/completions", completion(PROMPTS[1], max_tokens=3, logprobs=0, logprob_token_ids=[9, 4],
                                                 return_tokens_as_token_ids=True))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt = choice["prompt_token_ids"]
    ref = hf_log_softmax64(tiny_checkpoint[1], prompt + choice["token_ids"])[len(prompt) - 1:]
    for k, (token, top) in enumerate(zip(choice["token_ids"], choice["logprobs"]["top_logprobs"])):
        assert list(top) == list(dict.fromkeys([f"token_id:{token}", "token_id:9", "token_id:4"]))
        assert [top["token_id:9"], top["token_id:4"]] == pytest.approx(ref[k, [9, 4]].tolist(), abs=1e-4)
    assert_pages_free(live)


def slow_decodes(engine) -> None:
    """An engine setup hook (`EngineSpec.setup`, run in the child): each decode call takes 50 ms more, so requests stay
    running while a test acts on them."""
    real = engine.runner.decode

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)

    engine.runner.decode = slow


def test_abort_all_and_shutdown_reach_requests_in_the_child(tiny_checkpoint):
    """SGLang's abort_all ends every running request (finish reason abort, answers still given); a shutdown with
    requests running aborts them after its drain, and each caller gets its end."""
    app = create_app(tiny_checkpoint[0], ENGINE_CONFIG,
                     ServerConfig(model_name="tiny", engine_process=True, drain_s=0.0,
                                  engine_setup="tests.test_engine_process:slow_decodes"))
    long = completion(PROMPTS[0], max_tokens=200, ignore_eos=True)
    with LiveServer(app) as server, concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(post, server, "/v1/completions", long) for _ in range(3)]
        deadline = time.time() + 60
        while engine_stats_now(server)["running"] < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.post(server.url + "/abort_request", json={"abort_all": True}).status_code == 200
        for r in running:
            assert r.result(timeout=60).json()["choices"][0]["finish_reason"] == "abort"
        assert_pages_free(server)
        last = pool.submit(post, server, "/v1/completions", long)
        while engine_stats_now(server)["running"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        engine = app.state.jaxserve.engine
        server.server.should_exit = True  # uvicorn's shutdown: the lifespan's EngineProcess.shutdown(drain_s=0)
        reply = last.result(timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "abort", reply.text
    assert not engine.is_running and engine._process.returncode == 0


def engine_stats_now(live) -> dict:
    return live.engine_call(lambda engine: engine.stats())


def test_a_burst_larger_than_the_pipe_is_answered_whole(live):
    """200 prompts of 300 tokens (~120 kB of commands, past a pipe's 64 kB; each longer than the model's 256, so the
    child refuses it without computing) and 8 short ones, submitted at once: the writer thread feeds them as the
    child reads, and every caller gets its answer, a refusal or a result."""
    async def burst(engine):
        async def one(prompt):
            try:
                return await engine.generate_async(prompt, SamplingParams(max_tokens=2, temperature=0))
            except ValueError as exc:
                return exc

        long = [[3 + (i + j) % 300 for j in range(300)] for i in range(200)]
        return await asyncio.gather(*(one(p) for p in long + [[5, 6, 7]] * 8))

    answers = live.engine_call(burst)
    assert all(isinstance(a, ValueError) and "max_model_len" in str(a) for a in answers[:200]), answers[0]
    assert all(len(a["token_ids"]) == 2 for a in answers[200:])
    assert_pages_free(live)


def test_the_child_exits_when_its_server_is_killed(tiny_checkpoint):
    """A server killed outright (SIGKILL: no shutdown) leaves no engine behind: the child reads its pipe's end, aborts
    what it runs and exits."""
    script = ("import sys, time\n"
              "from jaxserve import EngineConfig\n"
              "from jaxserve.engine_process import EngineProcess, EngineSpec\n"
              f"engine = EngineProcess(EngineSpec({tiny_checkpoint[0]!r}, EngineConfig(num_pages=64, max_running=2)))\n"
              "print(engine._process.pid, flush=True)\n"
              "time.sleep(600)\n")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        os.kill(server.pid, signal.SIGKILL)
        server.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child), "the engine's process outlived its server"
    finally:
        server.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (its parent is gone)
    except FileNotFoundError:
        return False


def test_the_child_runs_the_jaxserve_its_parent_runs(tiny_checkpoint, tmp_path):
    """A parent that found jaxserve on a path it added (a bench script's sys.path.insert), started from another folder:
    the child imports jaxserve from the same place (it came from the child's own path: another installed checkout's
    code, or none at all)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "jaxserve").symlink_to(os.path.join(os.path.dirname(os.path.dirname(__file__)), "jaxserve"))
    # A setup hook that reports where the child's jaxserve came from, as its start's failure.
    (tree / "where_hook.py").write_text("def setup(engine):\n"
                                        "    import jaxserve\n"
                                        "    raise RuntimeError('jaxserve at ' + jaxserve.__file__)\n")
    script = (f"import sys\n"
              f"sys.path.insert(0, {str(tree)!r})\n"
              "import jaxserve\n"
              "from jaxserve.engine_process import EngineProcess, EngineSpec\n"
              "print('parent', jaxserve.__file__, flush=True)\n"
              "try:\n"
              f"    EngineProcess(EngineSpec({tiny_checkpoint[0]!r}, jaxserve.EngineConfig(num_pages=64, max_running=2),"
              " setup='where_hook:setup'))\n"
              "except RuntimeError as exc:\n"
              "    print(exc, flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert f"parent {tree}/jaxserve/__init__.py" in out.stdout, out.stdout + out.stderr
    assert f"could not start: RuntimeError: jaxserve at {tree}/jaxserve/__init__.py" in out.stdout, (
        out.stdout + out.stderr[-2000:])


class _Results:
    """A metrics observer that keeps what it is given."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def observe_finished(self, result: dict) -> None:
        self.results.append(result)


def test_clients_of_one_engine_process_get_their_own_chunks(tiny_checkpoint):
    """Three clients of one child (`--api-server-count`'s server processes): each gets its own requests' chunks
    (never another's) and every finished result (each process's /metrics counts all); another client's abort of an id,
    and its add of an id in use, leave the owner's request running; a client whose pipe closes gets its requests
    aborted (pages freed) while the others go on; a killed child fails every client's open request."""
    config = EngineConfig(num_pages=128, max_running=8, max_tokens_per_step=64, batch_buckets=(8,),
                          prefill_buckets=(64,), decode_steps=1, max_model_len=256)
    seen = [_Results() for _ in range(3)]
    owner = EngineProcess(EngineSpec(tiny_checkpoint[0], config, setup="tests.test_engine_process:slow_decodes"),
                          seen[0], clients=3)
    clients = [owner] + [EngineProcess.attach(commands, outputs, owner.info, metrics)
                         for (commands, outputs), metrics in zip(owner.take_client_fds(), seen[1:])]
    delivered: list[set] = []
    for client in clients:  # the request ids each client's reader was handed chunks of
        ids: set = set()
        delivered.append(ids)
        client._deliver = (lambda real, ids: lambda chunks, results: (ids.update(r for r, _ in chunks),
                                                                      real(chunks, results)))(client._deliver, ids)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    long = SamplingParams(max_tokens=200, ignore_eos=True)

    async def run():
        prompts = [[5, 6, 7], [8, 9, 10], [11, 12]]
        together = await asyncio.gather(*(c.generate_async(p, greedy, f"mine-{i}") for i, (c, p) in
                                          enumerate(zip(clients, prompts))))
        alone = [await owner.generate_async(p, greedy) for p in prompts]
        assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone]
        assert [{i for i in ids if i.startswith("mine-")} for ids in delivered] == [{"mine-0"}, {"mine-1"},
                                                                                     {"mine-2"}]
        # Another client's abort of the id, then its add of the same id (refused: in use) leave the request running.
        mine = await owner.submit([5, 6, 7], long, request_id="shared")
        chunks = aiter(mine)
        clients[1].abort("shared")
        with pytest.raises(ValueError, match="already in use"):
            await clients[1].submit([1, 2], long, request_id="shared")
        for _ in range(5):
            assert (await asyncio.wait_for(anext(chunks), 30))["finish_reason"] is None
        mine.abort()
        # A client whose pipe closes (its process died): its running request is aborted, its pages freed.
        theirs = aiter(await clients[1].submit([8, 9, 10], long))
        await anext(theirs)
        assert (await owner.stats())["api_servers"] == 3
        clients[1]._commands.close()
        with pytest.raises(EngineDeadError):  # its own pipe's end: the child dropped it
            async for _ in theirs:
                pass
        stats = await settled(owner)
        assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["api_servers"] == 2, stats
        assert stats["api_server_requests"] == [5, 2, 1]
        # Every finished request reached every client's metrics while it was there (the refused add never ran). The
        # results ride on a step's chunks, which the stats reply above may overtake: read once they are in.
        for _ in range(100):
            if len(seen[0].results) == len(seen[2].results) == 8:
                break
            await asyncio.sleep(0.05)
        assert len(seen[0].results) == len(seen[2].results) == 8 and len(seen[1].results) >= 6
        # The child killed: every client's open request fails, and none reports it runs.
        open_one = aiter(await clients[2].submit([11, 12], long))
        await anext(open_one)
        os.kill(owner._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in open_one:
                pass
        await owner.shutdown()
        for client in clients[1:]:
            await client.shutdown()
        assert not any(client.is_running for client in clients)

    asyncio.run(run())
