"""Open-loop serving benchmark: Poisson arrivals against an OpenAI-compatible server.

Owns the workload (random token-id prompts of mixed lengths, an optional shared prefix that a
given share of requests start with, mixed output lengths with ignore_eos so lengths are
exact), the load generator (httpx async streaming, one task per request, started on a Poisson
clock that never waits for answers; spread over --client-procs processes, one per four CPUs by default, since one
event loop parsing every SSE event can itself bound the rate) and the report (throughput, TTFT / TPOT / latency
p50/p90/p99, success rate, prefix-cache hits, and the engine's time split read from the
server's /metrics). It never changes the server's behaviour.

Against a running server (the engine columns come from its /metrics when it is jaxserve):
    python bench/serving.py --url http://127.0.0.1:8000 --num-requests 200 --rate 8

With --model the benchmark starts the server itself, as a separate OS process (this script
with --serve-child, which calls jaxserve.server.serve, the function `jaxserve serve` runs), so
the load generator's parsing never competes with the engine thread for the GIL. Per mode: a
fresh server, a warm-up (a burst at every batch bucket, then --warmup requests at the rate)
that compiles the step shapes, then the measured run; compilations, preemptions and the
engine's time split are the difference between two /metrics scrapes around it. The warm-up
uses shared prefixes of its own (same lengths, other tokens) and the prefix cache is emptied
after it (POST /flush_cache), so the measured run starts cold. --in-process keeps the old
layout (uvicorn in a thread of this process, with the load generator: they share the GIL).

On the GPU machine, a random Qwen2.5-0.5B-shaped checkpoint, prefix caching on vs off on a
long shared system prompt:
    PYTHONPATH=. python3 bench/serving.py --random-model qwen2.5-0.5b --model /tmp/q05 \\
        --compare-prefix-caching --shared-prefix-len 1024 --shared-prefix-share 1.0 \\
        --out bench/results/serving_prefix.md

CPU harness check (tiny random model; bench/results/serving_cpu_smoke.md):
    python bench/serving.py --random-model tiny --model /tmp/tiny --compare-prefix-caching \\
        --num-requests 40 --rate 16 --input-len 128 --output-len 32 --shared-prefix-len 512 \\
        --shared-prefix-share 1.0 --num-pages 2048 --max-running 64 --max-model-len 1024 \\
        --batch-buckets 1 4 16 64 --prefill-buckets 256 1024 2048 --warmup 8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)


# ----- workload ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Item:
    prompt: list[int]
    max_tokens: int
    shared: bool


def make_workload(args: argparse.Namespace, vocab: int, seed: int, prefix_seed: int | str | None = None) -> list[Item]:
    """Token-id prompts, so lengths are exact whatever the tokenizer; ids avoid the special ones.

    ``seed`` draws the requests, ``prefix_seed`` (default ``args.seed``) the shared prefixes.
    The warm-up passes a prefix seed of its own: same prefix lengths, so it compiles the same
    prefix-hit prefill shapes, but other tokens, so the measured run finds none of its prefixes
    cached even where the cache cannot be emptied in between.

    Example:
        >>> args = parse_args(["--url", "http://x", "--num-requests", "3", "--shared-prefix-len", "8",
        ...                    "--shared-prefix-share", "1"])
        >>> [len(i.prompt) > 8 for i in make_workload(args, vocab=300, seed=1)]
        [True, True, True]
    """
    lo_id = 16  # below: special tokens in the test tokenizer's layout
    prefix_rng = random.Random(args.seed if prefix_seed is None else prefix_seed)
    prefixes = [[prefix_rng.randrange(lo_id, vocab) for _ in range(args.shared_prefix_len)]
                for _ in range(max(1, args.num_prefixes))]
    rng = random.Random(seed)

    def length(mean: int) -> int:
        spread = args.len_range * mean
        return max(1, int(rng.uniform(mean - spread, mean + spread)))

    items = []
    for _ in range(args.num_requests):
        shared = args.shared_prefix_len > 0 and rng.random() < args.shared_prefix_share
        head = rng.choice(prefixes) if shared else []
        tail = [rng.randrange(lo_id, vocab) for _ in range(length(args.input_len))]
        items.append(Item(head + tail, length(args.output_len), shared))
    return items


# ----- load generator ------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    ok: bool
    ttft: float | None = None
    latency: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


async def one_request(client, url: str, model: str, item: Item, headers: dict[str, str]) -> Outcome:
    # logprobs=0 makes every chunk list its tokens, so the first token is seen even when it
    # decodes to no text (a random model's ids mostly fall outside the test tokenizer's vocabulary).
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, usage = None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return Outcome(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return Outcome(False, error=event["error"]["message"])
                choice = event["choices"][0] if event.get("choices") else {}
                if ttft is None and (choice.get("text") or (choice.get("logprobs") or {}).get("tokens")):
                    ttft = time.perf_counter() - start
                if event.get("usage"):
                    usage = event["usage"]
    except Exception as exc:  # a failed request is counted, never fatal to the run
        return Outcome(False, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    if usage is None:
        return Outcome(False, error="stream ended without usage")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Outcome(True, ttft if ttft is not None else latency, latency, usage["completion_tokens"],
                   usage["prompt_tokens"], cached)


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each of ``n`` requests is sent: a Poisson clock of ``rate`` a second (all at
    0 for an infinite rate)."""
    rng = np.random.default_rng(seed)
    offsets, at = [], 0.0
    for _ in range(n):
        offsets.append(at)
        if math.isfinite(rate):
            at += rng.exponential(1.0 / rate)
    return offsets


async def _send(url: str, model: str, items: list[Item], offsets: list[float], api_key: str | None,
                timeout_s: float, t0: float) -> tuple[list[Outcome], float]:
    """Each item sent at ``t0`` (wall clock) + its offset, whatever is still in flight (an open loop); the outcomes
    and how late the first request went out."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        tasks, late = [], None
        for item, offset in zip(items, offsets):
            delay = t0 + offset - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if late is None:
                late = max(0.0, time.time() - t0 - offset)
            tasks.append(asyncio.ensure_future(one_request(client, url, model, item, headers)))
        return list(await asyncio.gather(*tasks)), late or 0.0


async def run_load(url: str, model: str, items: list[Item], rate: float, api_key: str | None,
                   seed: int, timeout_s: float) -> tuple[list[Outcome], float]:
    """The items on `arrival_offsets`' clock from this event loop: the outcomes and the run's duration."""
    t0 = time.time()
    outcomes, _ = await _send(url, model, items, arrival_offsets(len(items), rate, seed), api_key, timeout_s, t0)
    return outcomes, time.time() - t0


def _client_worker(url: str, model: str, items: list[Item], offsets: list[float], api_key: str | None,
                   timeout_s: float, t0: float) -> tuple[list[Outcome], float, float, float]:
    """One load-generator process: its share of the requests (`_send`). Returns the outcomes, the wall time its last
    answer ended, its CPU seconds, and how late its first request went out."""
    cpu0 = time.process_time()
    outcomes, late = asyncio.run(_send(url, model, items, offsets, api_key, timeout_s, t0))
    return outcomes, time.time(), time.process_time() - cpu0, late


def run_load_procs(url: str, model: str, items: list[Item], rate: float, api_key: str | None, seed: int,
                   timeout_s: float, procs: int) -> tuple[list[Outcome], float, float]:
    """`run_load`'s open loop spread over ``procs`` processes (request i to process i mod procs, on one arrival
    clock; one: this process): one event loop parsing every SSE event of hundreds of streams can itself bound the
    rate measured. Returns the outcomes (in the items' order), the run's duration and the busiest client process's
    CPU share (this process's whole CPU where it is the only one)."""
    import concurrent.futures
    import multiprocessing

    offsets = arrival_offsets(len(items), rate, seed)
    if procs <= 1:
        t0 = time.time()
        results = [_client_worker(url, model, items, offsets, api_key, timeout_s, t0)]
    else:
        with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(time.sleep, [0.5] * procs))  # every worker started (and idle) before the clock starts
            t0 = time.time() + 0.5
            futures = [pool.submit(_client_worker, url, model, items[i::procs], offsets[i::procs], api_key,
                                   timeout_s, t0) for i in range(procs)]
            results = [f.result() for f in futures]
    late = max(r[3] for r in results)
    if late > 0.1:
        print(f"warning: a client process sent its first request {late:.2f} s late", flush=True)
    duration = max(r[1] for r in results) - t0
    outcomes: list[Outcome] = [None] * len(items)  # type: ignore[list-item]
    for i, r in enumerate(results):
        outcomes[i::len(results)] = r[0]
    return outcomes, duration, max(r[2] for r in results) / duration


def summarize(outcomes: list[Outcome], duration: float) -> dict[str, Any]:
    good = [o for o in outcomes if o.ok]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) * 1000 if values else float("nan")

    ttft = [o.ttft for o in good]
    tpot = [o.tpot for o in good if o.tpot is not None]
    lat = [o.latency for o in good]
    out_tokens = sum(o.completion_tokens for o in good)
    in_tokens = sum(o.prompt_tokens for o in good)
    row = {
        "requests": len(outcomes), "success_rate": len(good) / max(len(outcomes), 1), "duration_s": duration,
        "req_per_s": len(good) / duration, "output_tok_per_s": out_tokens / duration,
        "total_tok_per_s": (in_tokens + out_tokens) / duration,
        "cached_prompt_share": sum(o.cached_tokens for o in good) / max(in_tokens, 1),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("latency", lat)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = pct(values, q)
    errors = sorted({o.error for o in outcomes if not o.ok})
    row["errors"] = errors[:5]
    return row


# ----- the server under test ---------------------------------------------------------------------------
def make_random_checkpoint(kind: str, path: str) -> None:
    """A random Qwen2 checkpoint of the given shapes with the tests' byte-level tokenizer."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import jax
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    precision = jax.config.jax_default_matmul_precision
    from tests.conftest import save_test_tokenizer

    # conftest pins float32-exact matmuls for the tests; the benchmark keeps the default.
    jax.config.update("jax_default_matmul_precision", precision)

    from bench.throughput import qwen25_shape

    shapes = qwen25_shape("0.5B") if kind == "qwen2.5-0.5b" else TINY
    torch.manual_seed(0)
    config = Qwen2Config(**shapes, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if kind == "qwen2.5-0.5b" else torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    save_test_tokenizer(path, shapes["vocab_size"])
    print(f"wrote a random {kind} checkpoint to {path}", flush=True)


def engine_config(args: argparse.Namespace, prefix_caching: bool):
    """The served ``EngineConfig``; call it in the process that runs the engine (it asks JAX for the backend), or with
    with the engine in its own process (the server's default) in the server's (it only looks for a GPU plugin: the
    backend started here would take the GPU memory the engine's process needs)."""
    from jaxserve.engine_config import EngineConfig

    if args.engine_process is not False:
        import importlib.util

        cpu = not any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    else:
        import jax

        cpu = jax.default_backend() == "cpu"
    return EngineConfig(
        num_pages=args.num_pages or (512 if cpu else None), page_size=args.page_size,
        max_running=args.max_running, max_tokens_per_step=args.max_tokens_per_step,
        max_model_len=args.max_model_len, prefix_caching=prefix_caching,
        dtype=args.dtype or ("float32" if cpu else "bfloat16"), policy=args.policy, decode_steps=args.decode_steps,
        batch_buckets=tuple(args.batch_buckets) if args.batch_buckets else None,
        prefill_buckets=tuple(args.prefill_buckets) if args.prefill_buckets else None)


def server_config(args: argparse.Namespace):
    from jaxserve.server import ServerConfig

    # drain_s=0: a stopped benchmark server has nothing worth finishing.
    return ServerConfig(model_name="bench", max_tokens_limit=max(4096, 2 * args.output_len), drain_s=0.0,
                        stream_interval=args.stream_interval, warmup=args.server_warmup,
                        engine_process=args.engine_process, api_server_count=args.api_server_count)


def _use_compilation_cache(folder: str) -> None:
    import jax

    if folder:
        # Every mode's fresh engine compiles the same steps: later ones (and later runs) reuse them. The environment
        # too: an engine in its own process (--engine-process) reads it at its start.
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command's name (which may hold spaces); None where it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (0.0 where it is gone)."""
    fields = _proc_stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (the server's engine process), from /proc."""
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and (fields := _proc_stat(int(entry))) is not None and int(fields[1]) == pid]


def server_cpu(server: Any) -> dict[str, float]:
    """CPU seconds so far of the server's process (``server``), of each of its other HTTP processes (``http <pid>``:
    ``--api-server-count``'s workers) and of its engine process (``engine``, where there is one); empty for a server
    inside this process."""
    proc = getattr(server, "proc", None)
    if proc is None or not os.path.isdir("/proc"):
        return {}
    out = {"server": process_cpu(proc.pid)}
    for child in child_pids(proc.pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                worker = b"jaxserve.server.api_servers" in f.read()
        except OSError:
            continue
        key = f"http {child}" if worker else "engine"
        out[key] = out.get(key, 0.0) + process_cpu(child)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """The server as its own OS process (``--serve-child``) on a free 127.0.0.1 port.

    ``__enter__`` returns once /health answers; ``__exit__`` (also on errors and Ctrl-C) sends
    SIGTERM, which drains and stops it like ``jaxserve serve``, and kills it after
    ``stop_timeout`` seconds. ``device`` and ``engine_config`` are what the child reported.

    Example:
        >>> with ServerProcess(parse_args(["--model", "/tmp/tiny"]), prefix_caching=True) as server:  # doctest: +SKIP
        ...     httpx.get(server.url + "/health").json()
        {'status': 'ok'}
    """

    def __init__(self, args: argparse.Namespace, prefix_caching: bool, stop_timeout: float = 30.0) -> None:
        self.args, self.prefix_caching, self.stop_timeout = args, prefix_caching, stop_timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.device, self.engine_config = "unknown", {}

    def __enter__(self) -> "ServerProcess":
        import httpx

        self._dir = tempfile.TemporaryDirectory(prefix="jaxserve-bench-")
        spec = {"args": vars(self.args), "prefix_caching": self.prefix_caching, "port": self.port,
                "info": os.path.join(self._dir.name, "info.json")}
        spec_path = os.path.join(self._dir.name, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        # Same working directory as this process, so relative --model / cache paths mean the same there.
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-child", spec_path])
        try:
            deadline = time.monotonic() + self.args.server_start_timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server process exited with code {self.proc.returncode} before it "
                                       f"answered /health (its output is above)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer /health within {self.args.server_start_timeout}s")
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass  # not listening yet: the model loads first
                time.sleep(0.5)
            with open(spec["info"]) as f:
                info = json.load(f)
            self.device, self.engine_config = info["device"], info["engine_config"]
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL after ``stop_timeout``; safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                print(f"the server process did not stop within {self.stop_timeout}s of SIGTERM: killing it", flush=True)
                proc.kill()
                proc.wait()
        if getattr(self, "_dir", None) is not None:
            self._dir.cleanup()
            self._dir = None

    def clear_prefix_cache(self) -> bool:
        """``POST /flush_cache``; False if the server has no such route (the warm-up's own prefixes
        then keep the measured run cold)."""
        import httpx

        r = httpx.post(self.url + "/flush_cache", timeout=60)
        return r.status_code == 200


def serve_child(spec_path: str) -> None:
    """The ``--serve-child`` process: build the engine config here, where the engine runs, report it, serve."""
    with open(spec_path) as f:
        spec = json.load(f)
    args = argparse.Namespace(**spec["args"])
    _use_compilation_cache(args.compilation_cache)
    # INFO reaches the engine (its process takes this level): a step shape compiled after the warm-up is logged there
    # with its key, the line that says which shape a burst missed. uvicorn's access lines stay at its own level.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from jaxserve.server import serve

    cfg = engine_config(args, spec["prefix_caching"])
    with open(spec["info"], "w") as f:
        json.dump({"device": device_name(args.engine_process is not False), "engine_config": cfg.to_dict()}, f)
    serve(args.model, cfg, server_config(args), host="127.0.0.1", port=spec["port"], log_level="warning")


class InProcessServer:
    """``create_app`` + ``build_server`` on a free 127.0.0.1 port in a background thread of this process."""

    def __init__(self, args: argparse.Namespace, prefix_caching: bool) -> None:
        from jaxserve.server import build_server, create_app

        _use_compilation_cache(args.compilation_cache)
        cfg = engine_config(args, prefix_caching)
        self.device, self.engine_config = device_name(args.engine_process is not False), cfg.to_dict()
        self.app = create_app(args.model, cfg, server_config(args))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = build_server(self.app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                self.sock.close()
                raise RuntimeError("the server failed to start")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()

    def clear_prefix_cache(self) -> bool:
        asyncio.run(self.app.state.jaxserve.engine.clear_prefix_cache())
        return True


# ----- engine totals from /metrics -------------------------------------------------------------------
# Row key -> the /metrics sample holding its running total (jaxserve.metrics names them).
ENGINE_SAMPLES = {
    "prefill_call_s": 'jaxserve_engine_step_seconds_total{part="prefill_call"}',
    "decode_call_s": 'jaxserve_engine_step_seconds_total{part="decode_wait"}',
    "host_s": 'jaxserve_engine_step_seconds_total{part="host"}',
    "prefix_index_s": "jaxserve_engine_prefix_index_seconds_total",
    "overlapped_decode_calls": "jaxserve_engine_overlapped_decode_calls_total",
    "engine_prefill_tokens": "jaxserve_engine_prefill_tokens_total",
    "engine_generated_tokens": "jaxserve_engine_generated_tokens_total",
    "compilations": "jaxserve_compiled_step_shapes",
    "preemptions": "jaxserve_preemptions",
    "prefix_hit_rate": "jaxserve_prefix_cache_hit_rate",
    "pages_used": "jaxserve_kv_pages_used",
    "pages_total": "jaxserve_kv_pages_total",
}


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of the Prometheus text format by name and labels.

    Example:
        >>> parse_metrics('# TYPE x counter\\nx_total{part="host"} 0.5\\ny 2.0\\n')
        {'x_total{part="host"}': 0.5, 'y': 2.0}
    """
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def scrape_engine(url: str) -> dict[str, float] | None:
    """The engine's running totals from ``url``/metrics; None when the server exposes none of them."""
    import httpx

    try:
        r = httpx.get(url + "/metrics", timeout=30)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    samples = parse_metrics(r.text)
    if any(name not in samples for name in ENGINE_SAMPLES.values()):
        return None
    return {key: samples[name] for key, name in ENGINE_SAMPLES.items()}


def engine_fields(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the engine did between two scrapes, as report-row fields; printed as one line."""
    d = {k: after[k] - before[k] for k in ENGINE_SAMPLES}
    fields = {k: d[k] for k in ("prefill_call_s", "decode_call_s", "host_s", "prefix_index_s")}
    fields.update(compiled_during_run=int(d["compilations"]), preemptions=int(d["preemptions"]),
                  overlapped_decode_calls=int(d["overlapped_decode_calls"]),
                  engine_prefill_tokens=int(d["engine_prefill_tokens"]),
                  engine_generated_tokens=int(d["engine_generated_tokens"]),
                  # The index keeps one running ratio (warm-up included), not a per-run one.
                  engine_prefix_hit_rate=after["prefix_hit_rate"])
    print("engine during the run (from /metrics): "
          + ", ".join(f"{k} {fields[k]:.3f}" for k in ("prefill_call_s", "decode_call_s", "host_s", "prefix_index_s"))
          + f"; overlapped decode calls {fields['overlapped_decode_calls']}, prefill tokens "
          f"{fields['engine_prefill_tokens']}, generated tokens {fields['engine_generated_tokens']}, "
          f"compiled {fields['compiled_during_run']}, preemptions {fields['preemptions']}", flush=True)
    return fields


# ----- one mode: start, warm up, measure -------------------------------------------------------------
def warm_up(url: str, args: argparse.Namespace, batch_buckets: list[int], vocab: int) -> None:
    """Compile the step shapes the run needs before the clock starts: a burst at every batch
    bucket, then --warmup requests at the measured rate; same lengths as the measured run, other
    tokens and other shared prefixes."""
    loads = [(size, math.inf) for size in batch_buckets] + [(args.warmup, args.rate)]
    for i, (size, rate) in enumerate(loads):
        warm = make_workload(_with(args, num_requests=size), vocab, args.seed + 1 + i,
                             prefix_seed=f"warm-up {args.seed}")
        outcomes, _ = asyncio.run(run_load(url, "bench", warm, rate, None, args.seed, args.timeout))
        failed = [o for o in outcomes if not o.ok]
        if failed:
            print(f"warm-up: {len(failed)} of {len(outcomes)} requests failed, e.g. {failed[0].error}", flush=True)


def run_served(args: argparse.Namespace, prefix_caching: bool, vocab: int) -> tuple[dict[str, Any], str]:
    """One measured run against a fresh server; returns the report row and the server's device."""
    server = InProcessServer(args, prefix_caching) if args.in_process else ServerProcess(args, prefix_caching)
    with server:
        t = time.perf_counter()
        warm_up(server.url, args, server.engine_config["batch_buckets"], vocab)
        cleared = False if args.keep_warm_cache else server.clear_prefix_cache()
        before = scrape_engine(server.url)
        if before is None:
            raise RuntimeError(f"{server.url}/metrics lacks the engine series {sorted(ENGINE_SAMPLES.values())}")
        print(f"warm-up: {time.perf_counter() - t:.1f}s, {before['compilations']:.0f} compiled step shapes, "
              f"prefix cache {'emptied' if cleared else 'kept (the measured run uses other prefixes)'}", flush=True)
        if args.keep_warm_cache:
            print(f"KV pages used after the warm-up (cached prefixes): {before['pages_used']:.0f} of "
                  f"{before['pages_total']:.0f}", flush=True)
        items = make_workload(args, vocab, args.seed)
        # The client's CPU share of the run (the load generator's alone where the server is another process): near
        # 1, the client (an event loop parsing every SSE event) bounds the rate, not the server.
        procs = client_procs(args)
        cpu_before = server_cpu(server)
        outcomes, duration, client_share = run_load_procs(server.url, "bench", items, args.rate, None, args.seed,
                                                          args.timeout, procs)
        cpu_after = server_cpu(server)
        after = scrape_engine(server.url)
        if after is None:
            raise RuntimeError(f"{server.url}/metrics stopped answering during the run")
    row = summarize(outcomes, duration)
    row.update(prefix_caching=prefix_caching, **engine_fields(before, after))
    if not args.in_process:
        row["client_cpu_share"] = client_share
        row["client_procs"] = procs
        # Near 1, that process's Python bounds the rate: the HTTP side's (with the engine on its thread, both sides')
        # or the engine process's.
        shares = {side: (cpu_after[side] - cpu_before.get(side, 0.0)) / duration for side in cpu_after}
        http = [v for side, v in shares.items() if side == "server" or side.startswith("http ")]
        if http:  # with --api-server-count N: the busiest of the N HTTP processes, and all of them together
            row["server_cpu_share"], row["http_cpu_share"] = max(http), sum(http)
        if "engine" in shares:
            row["engine_cpu_share"] = shares["engine"]
    return row, server.device


def _with(args: argparse.Namespace, **changes) -> argparse.Namespace:
    out = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(out, k, v)
    return out


# ----- report ---------------------------------------------------------------------------------------
COLUMNS = [("prefix_caching", "prefix cache"), ("success_rate", "success"), ("req_per_s", "req/s"),
           ("output_tok_per_s", "out tok/s"), ("total_tok_per_s", "total tok/s"),
           ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p90_ms", "TTFT p90"), ("ttft_p99_ms", "TTFT p99"),
           ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p90_ms", "TPOT p90"), ("tpot_p99_ms", "TPOT p99"),
           ("latency_p50_ms", "E2E p50 ms"), ("latency_p99_ms", "E2E p99"),
           ("cached_prompt_share", "cached prompt share"), ("compiled_during_run", "compiles in run"),
           ("preemptions", "preemptions"), ("prefill_call_s", "prefill calls s"),
           ("decode_call_s", "decode calls s"), ("host_s", "engine host s"), ("prefix_index_s", "of which index s"),
           ("client_procs", "client processes"), ("client_cpu_share", "client CPU / run (busiest)"),
           ("server_cpu_share", "server process CPU / run (busiest)"), ("http_cpu_share", "all server processes CPU"),
           ("engine_cpu_share", "engine process CPU / run")]


def client_procs(args: argparse.Namespace) -> int:
    """--client-procs, where 0 is a process per four CPUs (at most 8): 16 on the GPU machine make 4, 2 here 1."""
    if args.in_process:
        return 1
    return args.client_procs or max(1, min(8, (os.cpu_count() or 1) // 4))


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def device_name(engine_process: bool = False) -> str:
    if engine_process:  # JAX here would take the GPU the engine's process needs: ask the driver instead
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            return f"gpu: {out.stdout.splitlines()[0].strip()} (nvidia-smi; engine in its own process)"
        except Exception:
            return "cpu (engine in its own process)"
    try:
        import jax

        d = jax.devices()[0]
        return f"{d.platform}: {getattr(d, 'device_kind', d)} (jax {jax.__version__})"
    except Exception as exc:
        return f"unknown ({exc})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxserve", "jaxserve_kernels", "bench"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (out.stdout.strip() or "unknown") + (" (+uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def server_layout(args: argparse.Namespace) -> str:
    if args.url:
        return f"a running server at {args.url} (no warm-up; engine columns from its /metrics when it has them)"
    if args.in_process:
        return ("in-process: uvicorn in a thread of the benchmark's process, which also runs the load generator "
                "(they share the GIL); warm-up, then the prefix cache emptied")
    return ("a separate OS process per mode (bench/serving.py --serve-child, i.e. jaxserve.server.serve); "
            "warm-up on shared prefixes of its own, then the prefix cache emptied (POST /flush_cache)")


def write_report(path: str, args: argparse.Namespace, rows: list[dict[str, Any]], device: str) -> None:
    workload = (f"{args.num_requests} requests, Poisson rate {args.rate}/s, prompt ~{args.input_len} tokens "
                f"(+-{args.len_range:.0%}), output ~{args.output_len} tokens (+-{args.len_range:.0%}, ignore_eos), "
                f"shared prefix {args.shared_prefix_len} tokens on {args.shared_prefix_share:.0%} of requests "
                f"({args.num_prefixes} distinct)")
    text = "\n".join([
        "# Serving benchmark (bench/serving.py)", "",
        f"- device: {device}", f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- git commit: {git_commit()}", f"- host: {platform.node()}, Python {platform.python_version()}",
        f"- command: `{' '.join(sys.argv)}`", f"- model: {args.model or args.url}", f"- workload: {workload}",
        f"- server: {server_layout(args)}", "",
        table(rows), "",
        "TTFT: request sent to the first streamed token (requests ask logprobs=0 so chunks list their tokens); TPOT: (latency - TTFT) / (completion tokens - 1); "
        "cached prompt share: prompt tokens the server reports as served from its prefix cache. "
        "Engine columns: differences between two /metrics scrapes around the measured run; the time split is the "
        "engine thread's step() wall time in prefill device calls, waiting for decode results, and everything "
        "else (host), of which radix-index work.", ""])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("target (one of)")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="checkpoint folder to serve (or the served model id with --url)")
    target.add_argument("--random-model", choices=("tiny", "qwen2.5-0.5b"),
                        help="first write a random checkpoint of these shapes to --model (if it is not there)")
    p.add_argument("--api-key", default=None, help="Bearer key for --url")
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=200)
    w.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second (inf: all at once)")
    w.add_argument("--input-len", type=int, default=256, help="mean prompt tokens (after the shared prefix)")
    w.add_argument("--output-len", type=int, default=128, help="mean output tokens")
    w.add_argument("--len-range", type=float, default=0.5, help="lengths are uniform in mean*(1 +- this)")
    w.add_argument("--shared-prefix-len", type=int, default=0, help="tokens of the shared system prompt")
    w.add_argument("--shared-prefix-share", type=float, default=0.0, help="share of requests that start with it")
    w.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    e = p.add_argument_group("served engine (--model)")
    e.add_argument("--in-process", action="store_true",
                   help="run the server in a thread of this process (shares the GIL with the load generator)")
    e.add_argument("--server-start-timeout", type=float, default=900.0,
                   help="seconds the server process gets to load the model and answer /health")
    e.add_argument("--compare-prefix-caching", action="store_true", help="run with prefix caching on, then off")
    e.add_argument("--repeat-first", action="store_true",
                   help="with --compare-prefix-caching: on, off, then on again (shows what run order costs)")
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--warmup", type=int, default=64, help="requests of the warm-up burst (compiles the shapes)")
    # A long-running server's pool is full of cached prefixes: every page a running request grows into is taken
    # from them (Scheduler._allocate_rows' eviction), where a fresh server's pool is free.
    e.add_argument("--keep-warm-cache", action="store_true",
                   help="keep the warm-up's cached prefixes (with --num-pages small enough: a full pool, as a "
                        "long-running server's), instead of emptying the cache before the measured run")
    # A burst can miss a shape the measured run then compiles (H100, session 71: a step shape or two compiled inside
    # a 512-request run, seconds each, in the run's host time and latencies).
    e.add_argument("--server-warmup", action="store_true",
                   help="the server compiles every step shape before it answers (`jaxserve serve --warmup`)")
    w.add_argument("--client-procs", type=int, default=0,
                   help="load-generator processes sharing the arrival clock (0: one per four CPUs, at most 8); one "
                        "event loop parsing every SSE event can bound what is measured")
    e.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="the server's engine in a process of its own (the server's default; --no-engine-process: "
                        "the engine thread, `jaxserve serve --no-engine-process`)")
    e.add_argument("--api-server-count", type=int, default=1,
                   help="HTTP server processes over the one engine process (jaxserve serve --api-server-count)")
    e.add_argument("--compilation-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "jaxserve-bench-xla"),
                   help="persistent XLA compilation cache folder ('' to disable)")
    e.add_argument("--num-pages", type=int, default=None)
    e.add_argument("--page-size", type=int, default=16)
    e.add_argument("--max-running", type=int, default=64)
    e.add_argument("--max-tokens-per-step", type=int, default=2048)
    e.add_argument("--max-model-len", type=int, default=4096)
    e.add_argument("--decode-steps", type=int, default=4)
    e.add_argument("--stream-interval", type=int, default=1,
                   help="tokens a streamed chunk (the server's --stream-interval; 1: vLLM's one a chunk)")
    e.add_argument("--policy", default="prefill_first", choices=("prefill_first", "time_share", "mixed"))
    e.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    e.add_argument("--batch-buckets", type=int, nargs="+", default=None)
    e.add_argument("--prefill-buckets", type=int, nargs="+", default=None)
    p.add_argument("--out", default=None, help="markdown report path (e.g. bench/results/serving_h100.md)")
    p.add_argument("--json", action="store_true", help="also print each result row as JSON")
    args = p.parse_args(argv)
    if not args.url and not args.model:
        p.error("give --url (a running server) or --model (a checkpoint to serve)")
    if args.url and args.in_process:
        p.error("--in-process serves --model itself: drop --url")
    if args.random_model and not args.model:
        p.error("--random-model needs --model DIR to write the checkpoint to")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-child"]:  # internal: the server process that ServerProcess starts
        serve_child(argv[1])
        return 0
    args = parse_args(argv)
    if args.url:
        import httpx

        models = httpx.get(args.url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"}
                           if args.api_key else {}).json()["data"]
        model_id = args.model or models[0]["id"]
        items = make_workload(args, vocab=300, seed=args.seed)  # ids every Qwen vocabulary holds
        before = scrape_engine(args.url)
        procs = client_procs(args)
        outcomes, duration, share = run_load_procs(args.url, model_id, items, args.rate, args.api_key, args.seed,
                                                   args.timeout, procs)
        after = scrape_engine(args.url) if before is not None else None
        row = summarize(outcomes, duration)
        if procs > 1:
            row.update(client_procs=procs, client_cpu_share=share)
        if after is not None:
            row.update(engine_fields(before, after))
        rows, device = [row], f"remote server {args.url}"
    else:
        # SIGTERM (a job's time limit, kill) unwinds like Ctrl-C, so the server process is stopped
        # on the way out instead of being left behind holding the accelerator.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        if not args.in_process:
            # The server process owns the accelerator: a JAX backend started here (say by the
            # checkpoint writer) would take most of its memory first.
            import jax

            jax.config.update("jax_platforms", "cpu")
        if args.random_model:
            make_random_checkpoint(args.random_model, args.model)
        from jaxserve.config import ModelConfig

        vocab = ModelConfig.from_pretrained(args.model).vocab_size
        modes = ([True, False] + [True] * args.repeat_first) if args.compare_prefix_caching \
            else [not args.no_prefix_caching]
        rows, devices = zip(*(run_served(args, mode, vocab) for mode in modes))
        rows, device = list(rows), devices[0]
    print(table(rows))
    for r in rows:
        if r["errors"]:
            print("errors:", r["errors"])
        if args.json:
            print(json.dumps(r))
    if args.out:
        write_report(args.out, args, rows, device)
    return 0 if all(r["success_rate"] == 1.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
