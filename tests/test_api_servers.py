"""``api_server_count`` (``jaxserve serve --api-server-count N``): N HTTP server processes on one port over one engine
process. A real server in a subprocess (`serve`, as ``jaxserve serve`` calls it; its decodes slowed so requests stay
running while a test acts): answers equal the engine's whichever process serves them, every process's /metrics counts
every request, a dead worker's requests are aborted while the others serve, and SIGTERM stops every process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from jaxserve import EngineConfig, SamplingParams, load
from jaxserve.engine import Engine
from jaxserve.server import ServerConfig
from tests.test_cli import _parse_serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_KW = dict(num_pages=128, max_running=8, max_tokens_per_step=64, batch_buckets=(8,), prefill_buckets=(64,),
                 decode_steps=4, max_model_len=256)
PROMPTS = ["The quick brown fox", "def add(a, b):", "lazy dog"]
SERVERS = 3


class Servers:
    def __init__(self, proc: subprocess.Popen, url: str, log: str) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.sent = 0  # generation requests answered so far

    def text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def workers(self) -> list[int]:
        """The workers' pids by their index (1, 2, ...), from the main process's start line."""
        found = re.search(r"API server processes serve the socket \(this one and pids ([\d, ]+)\)", self.text())
        return [int(pid) for pid in found.group(1).split(", ")] if found else []

    def metrics(self) -> dict[str, float]:
        lines = httpx.get(self.url + "/metrics", timeout=30).text.splitlines()
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if line[:1] != "#")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    port = _free_port()
    log = str(tmp_path_factory.mktemp("api_servers") / "server.log")
    script = ("import logging\n"
              "logging.basicConfig(level=logging.INFO)  # as `jaxserve serve` logs (the workers' start and exits)\n"
              "from jaxserve import EngineConfig\n"
              "from jaxserve.server import ServerConfig, serve\n"
              f"serve({tiny_checkpoint[0]!r}, EngineConfig(**{ENGINE_KW!r}), ServerConfig(\n"
              f"    model_name='tiny', api_server_count={SERVERS}, drain_s=2.0, allow_runtime_lora_updating=True,\n"
              "    engine_setup='tests.test_engine_process:slow_decodes'), port=" + str(port) + ")\n")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=err)
    server = Servers(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 180
        while len(re.findall(r"jaxserve.server \[api \d\]: serving tiny", server.text())) < SERVERS - 1:  # all up
            assert proc.poll() is None and time.monotonic() < deadline, server.text()[-3000:]
            time.sleep(0.2)
        yield server
    finally:
        pids = server.workers()
        if proc.poll() is None:
            proc.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The engine in this process, for each prompt's greedy continuation."""
    with Engine(load(tiny_checkpoint[0]), EngineConfig(**ENGINE_KW)) as engine:
        yield engine


def _greedy(engine, prompt) -> list[int]:
    return engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]["token_ids"]


async def _spread(url: str, asks: list[tuple[str, dict]], apart_s: float = 0.02) -> list[dict | Exception]:
    """`_ask` each (route, body), ``apart_s`` apart (0: a burst, which the kernel spreads over the processes'
    SO_REUSEPORT sockets). A connection that drops answers its error."""
    async def ask(delay: float, route: str, body: dict) -> dict | Exception:
        await asyncio.sleep(delay)
        try:
            return await _ask(url, route, body)
        except httpx.TransportError as exc:
            return exc

    return await asyncio.gather(*(ask(apart_s * i, *a) for i, a in enumerate(asks)))


async def _ask(url: str, route: str, body: dict) -> dict:
    """One request on a connection of its own (a kept-alive one would stay with one process): the answer's ids, its
    prompt's and its finish reason, streamed or not."""
    body = {"model": "tiny", "max_tokens": 10, "temperature": 0, "return_token_ids": True, **body}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        if not body.get("stream"):
            out = (await client.post(route, json=body)).raise_for_status().json()
            choice = out["choices"][0]
            # A completion's prompt ids are its choice's, a chat's its answer's (vLLM's).
            return {"ids": choice["token_ids"], "prompt": choice.get("prompt_token_ids", out.get("prompt_token_ids")),
                    "finish": choice["finish_reason"]}
        answer = {"ids": [], "prompt": None, "finish": None}
        async with client.stream("POST", route, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    choice = event["choices"][0]
                    answer["ids"] += choice.get("token_ids") or []
                    answer["prompt"] = (answer["prompt"] or choice.get("prompt_token_ids")
                                        or event.get("prompt_token_ids"))
                    answer["finish"] = choice["finish_reason"] or answer["finish"]
        return answer


def _served(servers: Servers) -> list[float]:
    m = servers.metrics()
    return [m.get(f'jaxserve_api_server_requests_total{{server="{i}"}}', 0.0) for i in range(SERVERS)]


def test_every_process_answers_as_the_engine_does(servers, engine):
    """Concurrent completions and chats, streamed and not, on connections of their own: each answer's greedy ids equal
    the engine's for its prompt, whichever process served it; rounds go on until every process has served some (the
    engine counts each one's requests)."""
    asks = [(route, {**body, "stream": stream}) for p in PROMPTS for stream in (False, True)
            for route, body in (("/v1/completions", {"prompt": p}),
                                ("/v1/chat/completions", {"messages": [{"role": "user", "content": p}]}))]
    for _ in range(10):
        answers = asyncio.run(_spread(servers.url, asks))
        servers.sent += len(answers)
        for answer in answers:
            assert answer["ids"] == _greedy(engine, answer["prompt"]), answer
        if all(_served(servers)):
            break
    assert all(_served(servers)) and sum(_served(servers)) == servers.sent, _served(servers)
    # One burst of 30 connections opened at once reaches every process (each listens on a socket of its own in the
    # port's SO_REUSEPORT group, the kernel picking one by a hash of the connection: a process missed by all 30 picks,
    # 3 x (2/3)^30, 2e-5). Not a test of the group alone: a socket shared by the processes spread this burst too.
    before = _served(servers)
    answers = asyncio.run(_spread(servers.url, [("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 1})] * 30,
                                  apart_s=0.0))
    servers.sent += len(answers)
    assert all(len(a["ids"]) == 1 for a in answers), answers
    assert all(after > b for after, b in zip(_served(servers), before)), (before, _served(servers))


def test_metrics_of_any_process_count_every_request_and_pages_are_free(servers):
    """Scrapes on connections of their own (any process may answer each) all count every request; the engine's
    pages are all free once its prefix cache is dropped."""
    assert servers.sent, "runs after the requests above"
    deadline = time.monotonic() + 30
    while True:
        counts = [sum(v for k, v in servers.metrics().items() if k.startswith("jaxserve_requests_total{"))
                  for _ in range(6)]
        if counts == [servers.sent] * 6 or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # a result reaches the other processes beside its own answer
    assert counts == [servers.sent] * 6
    assert httpx.post(servers.url + "/flush_cache").json() == {"status": "ok"}
    m = servers.metrics()
    assert (m["jaxserve_kv_pages_used"], m["jaxserve_requests_running"], m["jaxserve_api_servers"]) == (0, 0, SERVERS)


def test_runtime_lora_loading_is_refused(servers):
    for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = httpx.post(servers.url + route, json={"lora_name": "a", "lora_path": "/nowhere"})
        assert r.status_code == 400 and "--api-server-count" in r.json()["error"]["message"], r.text


def test_a_dead_worker_s_requests_are_aborted_and_the_others_serve(servers):
    """A worker killed with requests running: they end in the engine (finish reason abort, pages freed), its clients'
    connections drop, the main process logs it; the other processes' streams finish and later requests are served."""
    pid = servers.workers()[-1]

    async def run() -> list[dict | Exception]:
        before = (await asyncio.to_thread(_served, servers))[-1]
        long = ("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 120, "ignore_eos": True, "stream": True})
        answers = asyncio.ensure_future(_spread(servers.url, [long] * 12))
        deadline = time.monotonic() + 60
        while True:  # every request in the engine
            m = await asyncio.to_thread(servers.metrics)
            if m["jaxserve_requests_running"] + m["jaxserve_requests_waiting"] == 12:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        if (await asyncio.to_thread(_served, servers))[-1] > before:
            os.kill(pid, signal.SIGKILL)
        return await answers

    for _ in range(5):  # until a round has some of its streams on the worker
        answers = asyncio.run(run())
        servers.sent += len(answers)
        lost = [a for a in answers if isinstance(a, Exception)]
        if lost:
            break
    assert lost and all(a["finish"] == "length" and len(a["ids"]) == 120 for a in answers if isinstance(a, dict))
    assert f"API server {SERVERS - 1} (pid {pid}) exited with code -9" in servers.text()
    deadline = time.monotonic() + 30
    while True:
        httpx.post(servers.url + "/flush_cache")
        m = servers.metrics()
        if m["jaxserve_kv_pages_used"] == 0 and m["jaxserve_requests_running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (m["jaxserve_kv_pages_used"], m["jaxserve_requests_running"], m["jaxserve_api_servers"]) == (0, 0,
                                                                                                       SERVERS - 1)
    assert m['jaxserve_requests_total{finish_reason="abort"}'] == len(lost)
    answer = asyncio.run(_ask(servers.url, "/v1/completions", {"prompt": PROMPTS[1]}))
    assert answer["finish"] == "length" and len(answer["ids"]) == 10


def test_sigterm_stops_every_process(servers):
    """SIGTERM to the main process: the workers drain and exit 0, then the main process stops the engine (which
    exits 0) and ends as uvicorn ends on a signal (it raises it again: -SIGTERM is its clean stop)."""
    workers = [pid for pid in servers.workers() if _alive(pid)]
    children = _children(servers.proc.pid)
    assert workers and set(workers) < set(children), (workers, children)
    start = time.monotonic()
    servers.proc.send_signal(signal.SIGTERM)
    assert servers.proc.wait(60) == -signal.SIGTERM
    assert time.monotonic() - start < 30
    assert not any(_alive(pid) for pid in children)
    log = servers.text()
    for pid in workers:
        assert f"API server pid {pid} exited with code 0" in log, log[-3000:]
    assert "engine process exited with code" not in log and "killing" not in log, log[-3000:]


def test_bad_values_are_refused_naming_the_flag(monkeypatch):
    from jaxserve import cli

    seen = {}
    monkeypatch.setattr("jaxserve.server.serve", lambda model, e, s, **kw: seen.update(server=s))
    assert cli.cmd_serve(_parse_serve(["--api-server-count", "4"])) == 0 and seen["server"].api_server_count == 4
    for flags, message in ((["--api-server-count", "0"], "--api-server-count must be >= 1"),
                           (["--api-server-count", "2", "--no-engine-process"], "--no-engine-process"),
                           (["--api-server-count", "2", "--rope-scaling", '{"rope_type": "dynamic", "factor": 2.0}'],
                            "--rope-scaling")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            cli.cmd_serve(_parse_serve(flags))
    with pytest.raises(ValueError, match="api_server_count must be an int >= 1"):
        ServerConfig(api_server_count=0)
    with pytest.raises(ValueError, match="api_server_count > 1 needs the engine in its own process"):
        ServerConfig(api_server_count=2, engine_process=False)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_listening_sockets_share_a_port_but_refuse_one_held_elsewhere():
    from jaxserve.server.api_servers import listening_socket

    main = listening_socket("127.0.0.1", 0)
    port = main.getsockname()[1]
    worker = listening_socket("127.0.0.1", port, exclusive_check=False)  # joins the main socket's group
    try:
        with pytest.raises(OSError):  # a second server on the port: refused, not a member of the group
            listening_socket("127.0.0.1", port)
    finally:
        worker.close()
        main.close()
    with socket.socket() as other:  # a port another program listens on
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", other.getsockname()[1])
