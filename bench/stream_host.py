"""The server process's host cost per streamed SSE event, with the model and the network taken out.

On an H100 the 0.5B model's streamed serving at 256 running requests is host-bound: one SSE event per token
(``--stream-interval 1``) gave 7.6k output tok/s where eight tokens an event gave 13.6k, on the same device calls.
This script runs the whole server path in one process: ``create_app``'s FastAPI app (its real ``AsyncEngine``,
engine thread, scheduler, detokenizer, ``TokenChunks``, response formats and Starlette's ``StreamingResponse``), the
engine's Runner replaced by `bench.host_overhead.StubRunner` (instant random tokens), and each request driven
through the ASGI interface (no socket, no HTTP parser, no client parsing: uvicorn's per-write cost is per engine
chunk, not per event, and is not counted). What is timed: wall time, and the CPU time of the event-loop thread and
of the engine thread, per streamed event; the difference between two stream intervals is the per-event cost.

    python bench/stream_host.py --stream-interval 1 8                 # µs per event, per thread
    python bench/stream_host.py --stream-interval 1 --profile loop    # cProfile of the event-loop thread
    python bench/stream_host.py --stream-interval 1 --profile engine  # ... of the engine thread
    python bench/stream_host.py --http --decode-ms 12 --engine-process  # the engine in its own process
    python bench/stream_host.py --engine-process --profile child         # cProfile of that process's loop
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import json
import os
import pstats
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.host_overhead import StubRunner  # noqa: E402
from bench.serving import _free_port, process_cpu  # noqa: E402
from jaxserve import EngineConfig  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.loading import LoadedModel, load  # noqa: E402
from jaxserve.model import init_params  # noqa: E402
from jaxserve.server.app import ServerConfig, create_app  # noqa: E402


class _Late:
    """A device array not computed yet: reading it waits (GIL released, as ``jax.device_get`` does) until the
    emulated device is done with the call that made it."""

    def __init__(self, value: np.ndarray, ready_at: float) -> None:
        self.value, self.ready_at = value, ready_at

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self.value


class DeviceStub(StubRunner):
    """`StubRunner` on an emulated device: a decode call takes ``decode_ms`` (one after another, as one device runs
    them), costs the host nothing, and gives up the GIL as a real call does: once when dispatched (jaxlib releases it
    to enqueue the executable) and while the host waits to read its tokens. What a GPU run's engine thread does, so
    the event loop's share of the GIL shows as it does there; the plain stub never releases it."""

    def __init__(self, runner: Any, vocab_size: int, decode_ms: float) -> None:
        super().__init__(runner, vocab_size)
        self.decode_s = decode_ms / 1e3
        self.free_at = 0.0

    def decode(self, *args: Any, return_last: bool = False, **kwargs: Any) -> Any:
        out, last = super().decode(*args, return_last=True, **kwargs)
        time.sleep(0)  # the dispatch's GIL release
        self.free_at = max(time.perf_counter(), self.free_at) + self.decode_s
        late = dataclasses.replace(out, **{f.name: _Late(getattr(out, f.name), self.free_at)
                                            for f in dataclasses.fields(out)})
        return (late, last) if return_last else late


def stub_model() -> LoadedModel:
    """A 2-layer model (its forward never runs) with the embedded default model's tokenizer and vocabulary, so
    every token is detokenized as a real one would be."""
    tokenizer = load().tokenizer
    cfg = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64,
                                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=4096))
    return LoadedModel.from_params(init_params(cfg, jax.random.key(0)), cfg, tokenizer, name="stub")


class _Counter:
    """What one response sent: its status, body bytes and SSE events."""

    def __init__(self) -> None:
        self.status = 0
        self.bytes = 0
        self.events = 0
        self.tail = b""
        self.done = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            self.bytes += len(body)
            self.events += body.count(b"\n\n")
            self.tail = (self.tail + body)[-512:]
            if not message.get("more_body", False):
                self.done.set()


async def one_request(app: Any, body: bytes) -> _Counter:
    """POST /v1/completions through the app's ASGI interface, as uvicorn calls it (ASGI spec 2.3: Starlette also
    listens for a disconnect, as it does under uvicorn)."""
    counter = _Counter()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await counter.done.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    await app(scope, receive, counter.send)
    return counter


async def http_client(port: int, bodies: list[bytes]) -> list[tuple[int, int, bool]]:
    """Each body POSTed on its own connection; the raw response read to its end, never parsed (what a client's
    parsing would cost stays out of the server's numbers): per request, (bytes, SSE events, ended with [DONE])."""

    async def one(body: bytes) -> tuple[int, int, bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        size, events, tail = 0, 0, b""
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            size += len(data)
            seam = tail + data  # an event's blank line may straddle two reads
            events += seam.count(b"\n\n") - tail.count(b"\n\n")
            tail = seam[-64:]
            if b"data: [DONE]\n\n" in tail and tail.endswith(b"0\r\n\r\n"):
                break
        writer.close()
        return size, events, b"[DONE]" in tail

    return await asyncio.gather(*(one(b) for b in bodies))


def client_main(spec_path: str) -> None:
    """The --client subprocess: the requests in ``spec_path``, their counts printed as one JSON line."""
    with open(spec_path) as f:
        spec = json.load(f)
    start = time.perf_counter()
    out = asyncio.run(http_client(spec["port"], [b.encode() for b in spec["bodies"]]))
    print(json.dumps({"counts": out, "wall_s": time.perf_counter() - start}), flush=True)


class GcTimer:
    """Wall time in the cyclic garbage collector, by generation (whichever thread's allocation set it off: it stops
    every thread, holding the GIL)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1


def thread_cpu(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


async def run_once(app: Any, args: argparse.Namespace, seed: int, port: int | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    vocab = app.state.jaxserve.tokenizer.vocab_size
    bodies = [json.dumps({"model": "stub", "prompt": rng.integers(3, vocab, args.input_len).tolist(),
                          "max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True,
                          "logprobs": args.logprobs, "stream": True,
                          "stream_options": {"include_usage": True}}).encode() for _ in range(args.num_requests)]
    if port is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"port": port, "bodies": [b.decode() for b in bodies]}, f)
        proc = await asyncio.create_subprocess_exec(sys.executable, os.path.abspath(__file__), "--client", f.name,
                                                    stdout=asyncio.subprocess.PIPE)
        stdout, _ = await proc.communicate()
        os.unlink(f.name)
        reply = json.loads(stdout)
        counts = reply["counts"]
        if not all(done for _, _, done in counts):
            raise RuntimeError(f"{sum(not d for _, _, d in counts)} requests did not end with [DONE]")
        return {"events": sum(e for _, e, _ in counts), "bytes": sum(b for b, _, _ in counts),
                "wall_s": reply["wall_s"]}
    out = await asyncio.gather(*(one_request(app, b) for b in bodies))
    bad = [c for c in out if c.status != 200 or not c.tail.endswith(b"data: [DONE]\n\n")]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. status {bad[0].status}: {bad[0].tail[-300:]!r}")
    return {"events": sum(c.events for c in out), "bytes": sum(c.bytes for c in out)}


def install_stub(engine: Any) -> None:
    """`EngineSpec.setup` hook for ``--engine-process``: the child's runner replaced as the in-process run's is (the
    emulated call's length from ``JAXSERVE_STUB_DECODE_MS``, set by the parent before it starts the child)."""
    decode_ms = float(os.environ.get("JAXSERVE_STUB_DECODE_MS", "0"))
    vocab = engine.model.config.vocab_size
    engine.runner = DeviceStub(engine.runner, vocab, decode_ms) if decode_ms else StubRunner(engine.runner, vocab)
    path = os.environ.get("JAXSERVE_STUB_PROFILE")
    if path:  # --profile child: SIGUSR1 starts cProfile on the child's engine loop (its main thread), the next stops
        # it and writes the stats to ``path`` (a handler runs between the loop's bytecodes, as a call would)
        profiler, on = cProfile.Profile(), [False]

        def toggle(signum: int, frame: Any) -> None:
            if on[0]:
                profiler.disable()
                profiler.dump_stats(path)
            else:
                profiler.enable()
            on[0] = not on[0]

        signal.signal(signal.SIGUSR1, toggle)


async def measure(model: LoadedModel | str, args: argparse.Namespace, interval: int) -> dict[str, Any]:
    cfg = EngineConfig(page_size=16, max_running=args.max_running, decode_steps=args.decode_steps,
                       max_tokens_per_step=2048, max_model_len=args.input_len + args.output_len + 16,
                       num_pages=(args.num_pages
                                  or args.max_running * ((args.input_len + args.output_len) // 16 + 2) + 64),
                       batch_buckets=tuple(args.batch_buckets))
    app = create_app(model, cfg, ServerConfig(stream_interval=interval, model_name="stub",
                                              engine_process=args.engine_process,
                                              engine_setup="bench.stream_host:install_stub"))
    async with app.router.lifespan_context(app):
        port, server, serving = None, None, None
        if args.http:  # uvicorn as `jaxserve serve` runs it, in this loop; the client in another process
            import uvicorn

            port = _free_port()
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                   lifespan="off", loop="none"))
            serving = asyncio.ensure_future(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
        st = app.state.jaxserve
        if args.engine_process:  # the child installed the stub itself (install_stub); its CPU is a process's
            pid = st.engine._process.pid
            engine_cpu = lambda: process_cpu(pid)  # noqa: E731
        else:
            install_stub(st.engine.engine)
            engine_thread = st.engine._thread
            engine_cpu = lambda: thread_cpu(engine_thread)  # noqa: E731
        # The same batch shapes once first: their compiles stay out of the timing.
        await run_once(app, args, seed=0, port=port)
        gc.collect()
        before = await st.engine.stats()
        profiler = cProfile.Profile() if args.profile in ("loop", "engine") else None
        if args.profile == "child":
            os.kill(pid, signal.SIGUSR1)
        if args.profile == "engine":
            await st.engine._call(profiler.enable)
        gc_timer = GcTimer()
        gc.callbacks.append(gc_timer)
        loop0, engine0, wall0 = time.thread_time(), engine_cpu(), time.perf_counter()
        if args.profile == "loop":
            profiler.enable()
        sent = await run_once(app, args, seed=interval, port=port)
        if args.profile == "loop":
            profiler.disable()
        wall, loop_s, engine_s = (sent.get("wall_s", time.perf_counter() - wall0), time.thread_time() - loop0,
                                  engine_cpu() - engine0)
        gc.callbacks.remove(gc_timer)
        if args.profile == "engine":
            await st.engine._call(profiler.disable)
        if args.profile == "child":
            os.kill(pid, signal.SIGUSR1)
        stats = await st.engine.stats()  # answered after the child's loop ran the handler: its stats are written
        if server is not None:
            server.should_exit = True
            await serving
    if profiler is not None:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)
    if args.profile == "child":
        pstats.Stats(os.environ["JAXSERVE_STUB_PROFILE"]).sort_stats(args.sort).print_stats(args.top)
    tokens = args.num_requests * args.output_len
    return dict(interval=interval, tokens=tokens, events=sent["events"], wall_s=wall, loop_cpu_s=loop_s,
                engine_cpu_s=engine_s, tok_per_s=tokens / wall, bytes=sent["bytes"],
                gc_s=sum(gc_timer.seconds), gc_counts="/".join(map(str, gc_timer.counts)),
                engine_host_s=stats["host_s"] - before["host_s"],
                prefix_index_s=stats.get("prefix_index_s", 0.0) - before.get("prefix_index_s", 0.0))


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        client_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream-interval", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--batch-buckets", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--num-pages", type=int, default=0,
                    help="the KV pool's pages (0: the running requests' need, so the measured run evicts the warm-up "
                         "run's cached prefixes; a larger pool leaves eviction out)")
    ap.add_argument("--logprobs", type=int, default=0, help="the request's logprobs (bench/serving.py sends 0)")
    ap.add_argument("--decode-ms", type=float, default=0.0,
                    help="emulate a device whose decode call takes this long (GIL released while the host waits); "
                         "0: the plain stub, which never releases the GIL")
    ap.add_argument("--switch-interval-ms", type=float, default=None, help="sys.setswitchinterval for the run")
    ap.add_argument("--http", action="store_true",
                    help="serve through uvicorn on a local port, read by a raw-socket client in another process "
                         "(otherwise each request is an ASGI call in this process)")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the server's event loop")
    ap.add_argument("--engine-process", action="store_true",
                    help="the engine in a process of its own (the server's default for a checkpoint folder): the stub "
                         "model is saved to a temporary folder the child loads, and its runner replaced there; "
                         "'engine CPU' is then the child's whole process")
    ap.add_argument("--profile", choices=("loop", "engine", "child"), default=None,
                    help="cProfile of the measured run's event-loop thread, engine thread, or (--engine-process) the "
                         "engine process's loop")
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    if args.engine_process and args.profile == "engine":
        ap.error("--profile engine profiles the engine thread; with --engine-process the engine is another process "
                 "(--profile child)")
    if args.profile == "child" and not args.engine_process:
        ap.error("--profile child needs --engine-process")
    model: LoadedModel | str = stub_model()
    if args.engine_process:
        from jaxserve.weights import save_hf_checkpoint

        folder = tempfile.mkdtemp(prefix="stream_host_")
        save_hf_checkpoint(model.params, model.config, folder)
        model.tokenizer.save_pretrained(folder)
        model = folder
        os.environ["JAXSERVE_STUB_DECODE_MS"] = str(args.decode_ms)
        if args.profile == "child":
            os.environ["JAXSERVE_STUB_PROFILE"] = os.path.join(folder, "child.prof")
    print(f"host: {os.cpu_count()} cpus; {args.num_requests} streamed requests x {args.output_len} tokens, "
          f"{args.max_running} running, {args.decode_steps} decode steps a call, logprobs={args.logprobs}, "
          f"emulated decode call {args.decode_ms} ms, GIL switch interval {sys.getswitchinterval() * 1e3:.2f} ms, "
          f"{'uvicorn + a client process' if args.http else 'ASGI calls'}, {args.loop} loop")
    print("| interval | events | wall s | tok/s | loop CPU s | engine CPU s | engine host s | loop µs/event "
          "| engine µs/token | gc s (collections by generation) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for interval in args.stream_interval:
        if args.loop == "uvloop":
            import uvloop

            r = uvloop.run(measure(model, args, interval))
        else:
            r = asyncio.run(measure(model, args, interval))
        print(f"| {r['interval']} | {r['events']} | {r['wall_s']:.2f} | {r['tok_per_s']:.0f} | {r['loop_cpu_s']:.2f} "
              f"| {r['engine_cpu_s']:.2f} | {r['engine_host_s']:.2f} | {r['loop_cpu_s'] / r['events'] * 1e6:.1f} "
              f"| {r['engine_cpu_s'] / r['tokens'] * 1e6:.1f} | {r['gc_s']:.2f} ({r['gc_counts']}) |", flush=True)


if __name__ == "__main__":
    main()
