"""``EngineProcess``: the engine in a child process of its own, driven from asyncio (vLLM V1's EngineCore).

Why: with the engine on a thread of the server process (`jaxserve.async_engine.AsyncEngine`), the engine thread and
the event loop take turns on one GIL, so a streamed token costs the sum of both sides' Python. In a child, the
engine's host work (scheduling, sampling's host side, detokenizing, stop strings) runs beside the HTTP side's instead
of between its turns: on an H100, 256 streams of the 0.5B model at a token an SSE event went from 11.0k to 20.8k
output tok/s on the same ~1.1 s of device calls (bench/results/serving_stream_h100.md, session 72).

What crosses: the parent sends commands down one pipe (add, abort, abort_all, a named call, stop) and a reader
thread takes the child's messages off another: once a step, every request's new chunks (text already detokenized
and held back at stop strings, engine-side, as `AsyncEngine`'s), and each call's reply. The child builds the engine
itself from an `EngineSpec` (a checkpoint path, not arrays: weights do not cross), so a `LoadedModel` given as params
cannot be served this way.

The parent's API is `AsyncEngine`'s (submit, stream, generate_async, abort, abort_all, stats, sleep, wake_up, LoRA,
clear_prefix_cache, structured_guide, shutdown), so the server takes either.

Example:
    >>> engine = EngineProcess(EngineSpec("/models/Qwen2.5-0.5B-Instruct", EngineConfig()))  # doctest: +SKIP
    >>> out = await engine.generate_async([1, 2, 3], SamplingParams(max_tokens=8))          # doctest: +SKIP
    >>> await engine.shutdown()                                                             # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import importlib
import itertools
import logging
import multiprocessing.connection
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from jaxserve.async_engine import (EngineDeadError, EngineLoop, RequestHandle, Submitting, _deliver, _Output,
                                   _settle, _Stop)
from jaxserve.engine_config import EngineConfig
from jaxserve.sampling import SamplingParams

log = logging.getLogger("jaxserve.engine_process")

# The calls the parent may name, each a method of `_ChildLoop` run between steps (never an arbitrary attribute: the
# names come down a pipe).
_CALLS = frozenset({"stats", "register_lora", "forget_lora", "clear_prefix_cache", "sleep", "wake_up",
                    "sleep_level"})


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What the child builds its engine from (picklable: it crosses into a spawned process).

    ``model``: a checkpoint folder (or a Hugging Face repo id in the local cache; None: the embedded default model);
    ``tokenizer``: another tokenizer folder (vLLM's --tokenizer);
    ``data_parallel_size`` > 1 builds `jaxserve.replicas.Replicas`; ``loras``: adapters registered before it
    serves; ``warmup`` / ``warmup_structured``: `Engine.warmup` before it serves; ``setup``: ``"module:function"``
    called with the built engine in the child before it serves (a benchmark's stub device, a test's fault).

    Example:
        >>> EngineSpec("/models/qwen", EngineConfig(max_running=64), warmup=True).warmup
        True
    """

    model: str | None
    engine_config: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    tokenizer: str | None = None
    data_parallel_size: int = 1
    loras: tuple[Any, ...] = ()
    warmup: bool = False
    warmup_structured: bool = False
    setup: str | None = None


def build_engine(model: Any, engine_config: EngineConfig, tokenizer: str | None = None,
                 data_parallel_size: int = 1, loras: tuple[Any, ...] = (), warmup: bool = False,
                 warmup_structured: bool = False) -> tuple[Any, Any]:
    """The server's engine (``Engine``, or ``Replicas`` for data parallelism) and its `LoadedModel`: loaded, LoRA
    adapters registered, warmed up where asked. ``model``: a `LoadedModel` or a checkpoint path.

    Example:
        >>> engine, loaded = build_engine("/models/Qwen2.5-0.5B-Instruct", EngineConfig())  # doctest: +SKIP
    """
    from jaxserve.engine import Engine
    from jaxserve.loading import LoadedModel, load
    from jaxserve.replicas import Replicas
    from jaxserve.tokenizer import load_tokenizer

    loaded = model if isinstance(model, LoadedModel) else load(model, engine_config.compute_dtype())
    if tokenizer is not None:
        # The engine's too (stop strings, detokenizing), as vLLM's; a missing folder stops the start.
        loaded = dataclasses.replace(loaded, tokenizer=load_tokenizer(tokenizer))
    engine = Replicas(loaded, engine_config, data_parallel_size) if data_parallel_size > 1 else Engine(loaded,
                                                                                                         engine_config)
    for lora in loras:  # a bad adapter stops the start, not a request
        engine.register_lora(lora)
    if warmup or warmup_structured:
        # Clients ask for log-probabilities per request: both step variants, warm.
        shapes = engine.warmup(sampling=True, logprobs=True, structured=warmup_structured, pooling=True)
        log.info("warm-up compiled %d step shapes", shapes)
    return engine, loaded


def reload_weights(model: str | None, engine_config: EngineConfig) -> Any:
    """The checkpoint's weights read again, as the engine first loaded them (`Engine.wake_up` after a level-2 sleep).

    Example:
        >>> engine.wake_up(reload_weights("/models/qwen", engine.config))  # doctest: +SKIP
    """
    from jaxserve.loading import load

    return load(model, engine_config.compute_dtype(), device="cpu" if engine_config.loads_on_host else None).params


def engine_info(engine: Any, loaded: Any) -> dict[str, Any]:
    """What the server reads of its engine and model at start (the same for a thread's engine and a child's, where
    this dict is what crosses the pipe).

    Example:
        >>> engine_info(*build_engine(None, EngineConfig()))["max_model_len"]  # doctest: +SKIP
        32768
    """
    runner = (engine.engines[0] if hasattr(engine, "engines") else engine).runner
    pool = runner.kv[0][0]  # [kv_heads, pages, page_size, head_dim]: every layer's K and V alike
    return dict(name=loaded.name, path=loaded.path, hidden_size=loaded.config.hidden_size,
                labels=tuple(loaded.config.labels), max_model_len=engine.max_model_len,
                sampling_defaults=dict(engine.sampling_defaults), eos_ids=tuple(engine.eos_ids),
                pool_pages=int(pool.shape[1]),
                page_size=int(pool.shape[2]), pool_dtype=str(pool.dtype),
                pool_gib=2 * len(runner.kv) * pool.nbytes / 2**30)


def keep_off_accelerators() -> None:
    """JAX in this process (a server whose engine is a child's) runs on the CPU, so it never takes the accelerator
    memory the child's engine needs: JAX preallocates most of a GPU's memory at its first use there. A warning where
    it is too late (this process already used the accelerator).

    Example:
        >>> keep_off_accelerators(); engine = EngineProcess(EngineSpec("/models/qwen"))  # doctest: +SKIP
    """
    import jax

    try:
        from jax._src import xla_bridge

        initialized = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without it: leave the platform be
        return
    if not initialized:
        jax.config.update("jax_platforms", "cpu")
        log.info("JAX in this process (the server's) runs on the CPU; the engine's process has the accelerator")
    elif jax.default_backend() != "cpu":
        log.warning("this process already uses the %s (JAX preallocates its memory there): the engine's process "
                    "may find too little; start the server before anything here computes with JAX",
                    jax.default_backend())


# ----- the child ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _ChildOutput:
    request_id: str
    client: int  # the index of the client that added it (its chunks go there alone)
    sent_tokens: int = 0


class _Forward:
    """The child's metrics: each finished result goes up with the step's chunks, to every client's collectors."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def observe_finished(self, result: dict[str, Any]) -> None:
        self.results.append(result)


@dataclasses.dataclass
class _Client:
    """One server process's pipes in the child (client 0: the process that started the engine)."""

    index: int
    commands: Connection
    outputs: Connection
    send_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # the guide thread replies too
    chunks: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    requests: int = 0  # added so far (stats' api_server_requests)
    broken: bool = False  # a send or a read failed: the loop drops it at its next look for commands
    gone: bool = False  # dropped: its requests aborted, nothing more sent


class _ChildLoop(EngineLoop):
    """`EngineLoop` over pipes: commands from each client, one message of chunks a step back to each.

    Several clients (`EngineProcess`'s ``clients``: the API server processes of ``--api-server-count``) share the
    engine: each request's chunks and each call's reply go to the client that sent it; every finished request's
    result goes to all of them (each process's /metrics counts every request). The engine's lifetime is client 0's
    (the process that started it): its stop, or its pipe's end, stops the child; another client's pipe end (its
    process died or detached) aborts that client's requests alone, and its abort of a request id only reaches its own
    requests (abort_all reaches every request: SGLang's abort_all is the server's).
    """

    def __init__(self, engine: Any, spec: EngineSpec, clients: list[tuple[Connection, Connection]]) -> None:
        super().__init__(engine, _Forward())
        self.spec = spec
        self._clients = [_Client(i, commands, outputs) for i, (commands, outputs) in enumerate(clients)]
        self._pending: collections.deque[tuple[_Client, tuple]] = collections.deque()
        # Structured outputs compile here, off the loop, as the server's constraint thread does in its own process.
        self._guides = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-constraints")
        self._stopped = False

    def _send(self, client: _Client, message: tuple) -> None:
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an unpicklable reply (an exotic exception): its words still reach the caller
            if message[0] != "reply":
                raise
            error = message[3]
            kind = ValueError if isinstance(error, ValueError) else EngineDeadError
            data = pickle.dumps(("reply", message[1], None, kind(f"{type(error).__name__}: {error}")))
            log.debug("reply not picklable: %s", exc)
        with client.send_lock:
            if client.broken or client.gone:
                return
            try:
                client.outputs.send_bytes(data)
            except OSError:  # its process is gone (BrokenPipeError): dropped at the loop's next look for commands
                client.broken = True

    def _reply(self, client: _Client, call_id: int) -> Callable[[Any, BaseException | None], None]:
        return lambda value, error: self._send(client, ("reply", call_id, value, error))

    def _drop(self, client: _Client) -> None:
        """A client whose pipe broke (or that detached): its requests aborted (their pages freed), its pipes closed."""
        with client.send_lock:
            client.gone = True
            for conn in (client.commands, client.outputs):
                conn.close()
        client.chunks.clear()
        if client.index:
            log.info("API server %d left the engine; its requests are aborted", client.index)
        for request_id in [r for r, output in self._outputs.items() if output.client == client.index]:
            self._abort(request_id)

    def _next_command(self, block: bool) -> tuple | None:
        while True:
            for client in self._clients:
                if client.broken and not client.gone:
                    self._drop(client)
            if self._clients[0].gone:  # the engine's owner is gone: one stop (abort what runs, leave the loop)
                if self._stopped:
                    return None
                self._stopped = True
                return ("stop", _Stop(0.0))
            if self._pending:
                client, message = self._pending.popleft()
                if not client.gone:
                    command = self._command(client, message)
                    if command is not None:
                        return command
                continue
            live = {client.commands: client for client in self._clients if not client.gone}
            for conn in multiprocessing.connection.wait(list(live), self.idle_poll_s if block else 0):
                self._take(live[conn])
            if not self._pending and not any(client.broken and not client.gone for client in self._clients):
                return None

    def _take(self, client: _Client) -> None:
        """Queue what ``client`` has sent so far, in its order; a pipe that ended marks it broken."""
        try:
            while client.commands.poll(0):
                self._pending.append((client, client.commands.recv()))
        except (EOFError, OSError):
            client.broken = True

    def _command(self, client: _Client, message: tuple) -> tuple | None:
        kind = message[0]
        if kind == "add":
            _, call_id, prompt, params, request_id, priority, lora = message

            def add() -> None:
                self._add(prompt, params, request_id, _ChildOutput(request_id, client.index), priority, lora)
                client.requests += 1
            return ("call", add, self._reply(client, call_id))
        if kind == "call":
            _, call_id, name, args = message
            if name not in _CALLS:
                self._send(client, ("reply", call_id, None, EngineDeadError(f"unknown engine call {name!r}")))
                return None
            return ("call", lambda: getattr(self, "_call_" + name)(*args), self._reply(client, call_id))
        if kind == "guide":
            _, call_id, spec = message
            reply = self._reply(client, call_id)

            def compile_guide() -> None:
                try:
                    self.engine.structured_guide(spec)
                except Exception as exc:
                    reply(None, exc)
                else:
                    reply(None, None)
            self._guides.submit(compile_guide)
            return None
        if kind == "stop":
            if client.index:  # only the owner stops the engine; another client's stop is its leaving
                client.broken = True
                return None
            return ("stop", _Stop(message[1]))
        if kind == "abort":
            output = self._outputs.get(message[1])
            # Another client's request of that id is not this one's to end (a refused add of an id in use aborts it).
            return message if output is not None and output.client == client.index else None
        return message  # abort_all

    def _post(self, output: _ChildOutput, item: Any) -> None:
        client = self._clients[output.client]
        if not client.gone:
            client.chunks.append((output.request_id, item))

    def _flush(self) -> None:
        results, self.metrics.results = self.metrics.results, []
        for client in self._clients:
            if client.chunks or (results and not client.gone):
                chunks, client.chunks = client.chunks, []
                self._send(client, ("chunks", chunks, results))

    def _refuse_pending_calls(self) -> None:
        self._guides.shutdown(wait=True)
        for client in self._clients:
            if not (client.gone or client.broken):
                self._take(client)
        for client, message in self._pending:
            if message[0] in ("add", "call", "guide"):
                self._send(client, ("reply", message[1], None, EngineDeadError("the engine has stopped")))
        self._pending.clear()

    # the calls a client may name (_CALLS)
    def _call_stats(self) -> dict[str, Any]:
        # Each API server's share of the requests (--api-server-count; server 0 started the engine) and how many
        # still talk to it.
        return {**self.engine.stats(), "api_servers": sum(not client.gone for client in self._clients),
                "api_server_requests": [client.requests for client in self._clients]}

    def _call_register_lora(self, lora: Any) -> None:
        self.engine.register_lora(lora)

    def _call_forget_lora(self, lora_id: int) -> None:
        self.engine.forget_lora(lora_id)

    def _call_clear_prefix_cache(self) -> None:
        self.engine.clear_prefix_cache()

    def _call_sleep(self, level: int) -> None:
        self.engine.sleep(level)

    def _call_wake_up(self) -> None:
        # After a level-2 sleep the weights went too: read from the checkpoint (asleep: nothing waits).
        params = reload_weights(self.spec.model, self.spec.engine_config) if self.engine.sleeping == 2 else None
        self.engine.wake_up(params)

    def _call_sleep_level(self) -> int:
        return int(self.engine.sleeping)


# A started interpreter's first lines (``python -c``), before any import of jaxserve: the parent's sys.path, so the
# child runs the jaxserve the parent runs (and the spec's classes and a setup hook import as there). Imported first,
# jaxserve came from the child's own path: another installed copy (an editable install of another checkout: the child
# ran that tree's code beside the parent's), or none ("No module named 'jaxserve'") where the parent found it on a path
# it added (a bench script's sys.path.insert) and was started from another folder.
_BOOTSTRAP = ("import sys; from multiprocessing.connection import Connection; "
              "setup = Connection({setup}, writable=False); sys.path[:] = setup.recv(); "
              "from {module} import {function} as entry; entry(setup, *{fds!r})")


def start_interpreter(entry: str, fds: tuple[int, ...] = (),
                      env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Connection]:
    """A fresh Python running ``entry`` (``"module:function"``), called with a `Connection` that reads what the
    returned one sends (this process's sys.path first, taken by `_BOOTSTRAP`) and with ``fds``, which it inherits.
    A fresh interpreter, never a fork: this process may hold JAX's (and the GPU driver's) threads and state; and not
    multiprocessing's spawn, which runs the parent's ``__main__`` again (a script without a main guard would start a
    server in its engine).

    Example:
        >>> process, setup = start_interpreter("jaxserve.engine_process:_child_entry", (3, 4))  # doctest: +SKIP
    """
    module, _, function = entry.partition(":")
    read, write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP.format(setup=read, module=module, function=function, fds=tuple(fds))],
            pass_fds=(read, *fds), env=env)
    finally:
        os.close(read)
    setup = Connection(write, readable=False)
    setup.send(list(sys.path))
    return process, setup


def _child_entry(setup: Connection, *fds: int) -> None:
    """The engine process's start (`start_interpreter`); ``fds``: each client's commands and outputs pipe ends, in
    turn (client 0, the process that started it, first)."""
    # Ctrl-C in a terminal reaches the whole process group, and a service manager's stop (systemd's default
    # KillMode=control-group) sends SIGTERM to every process of the server's: the server drains and then stops this
    # child (a stop command, or its pipe's end if the server dies), where either signal here would cut the drain's
    # requests off (SIGTERM had them end in a 500, "the engine process exited with code -15").
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    clients = [(Connection(fds[i], writable=False), Connection(fds[i + 1], readable=False))
               for i in range(0, len(fds), 2)]
    outputs = clients[0][1]
    spec, log_level = setup.recv()
    setup.close()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine] %(message)s")
    try:
        engine, loaded = build_engine(spec.model, spec.engine_config, spec.tokenizer, spec.data_parallel_size,
                                      spec.loras, spec.warmup, spec.warmup_structured)
        if spec.setup is not None:
            module, _, name = spec.setup.partition(":")
            getattr(importlib.import_module(module), name)(engine)
        info = engine_info(engine, loaded)
        del loaded  # a level-2 sleep frees the weights only if nothing here holds them
    except BaseException as exc:  # the parent's start fails with this message
        log.exception("the engine process could not start")
        outputs.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    outputs.send(("ready", info))
    _ChildLoop(engine, spec, clients)._run()


# ----- the parent ---------------------------------------------------------------------------------------------------
class EngineProcess(Submitting):
    """`AsyncEngine`'s API over an engine in a child process (module docstring: why). Building it starts the child and
    blocks until its engine is built (and warmed up, where the spec asks): run it off the event loop.

    ``metrics``, if given, gets ``observe_finished(result)`` for every request that ends (on the parent's reader
    thread). ``info``: what the child reports of its engine (`engine_info`).

    Example:
        >>> engine = await asyncio.to_thread(EngineProcess, EngineSpec("/models/qwen"))   # doctest: +SKIP
        >>> async for chunk in engine.stream([1, 2, 3], SamplingParams(max_tokens=8)):   # doctest: +SKIP
        ...     print(chunk["token_ids"])
        >>> await engine.shutdown()                                                      # doctest: +SKIP
    """

    def __init__(self, spec: EngineSpec, metrics: Any = None, clients: int = 1) -> None:
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
            raise ValueError(f"clients must be an int >= 1, got {clients!r}")
        self.spec = spec
        pipes = [(*os.pipe(), *os.pipe()) for _ in range(clients)]  # (child's commands, ours, ours, child's outputs)
        process, setup = start_interpreter("jaxserve.engine_process:_child_entry",
                                           tuple(fd for p in pipes for fd in (p[0], p[3])))
        # Our copies of the child's ends closed, so a dead child reads as EOF here (and in the other clients).
        for child_commands, _, _, child_outputs in pipes:
            os.close(child_commands)
            os.close(child_outputs)
        # The other clients' ends (`take_client_fds`): another process's to `attach`.
        self._client_fds = [(commands, replies) for _, commands, replies, _ in pipes[1:]]
        commands = Connection(pipes[0][1], readable=False)
        replies = Connection(pipes[0][2], writable=False)
        try:
            setup.send((spec, logging.getLogger().getEffectiveLevel()))
            setup.close()
            message = replies.recv()
        except (EOFError, OSError):
            self._close_client_fds()
            code = process.wait()
            raise RuntimeError(f"the engine process exited (code {code}) before it was ready; "
                               "its log above says why") from None
        if message[0] != "ready":
            self._close_client_fds()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise RuntimeError(f"the engine process could not start: {message[1]}")
        self._connect(process, commands, replies, message[1], metrics)

    @classmethod
    def attach(cls, commands_fd: int, outputs_fd: int, info: dict[str, Any], metrics: Any = None) -> "EngineProcess":
        """A client of an engine process another process started (one of its `take_client_fds` pairs, inherited):
        the same API, but it does not own the engine. Its `shutdown` drains and aborts its own requests and leaves;
        the engine goes on serving the others (the API server workers of ``--api-server-count``).

        Example:
            >>> engine = EngineProcess.attach(5, 6, info, metrics)  # doctest: +SKIP
        """
        self = cls.__new__(cls)
        self.spec = None
        self._client_fds = []
        self._connect(None, Connection(commands_fd, readable=False), Connection(outputs_fd, writable=False), info,
                      metrics)
        return self

    def _connect(self, process: subprocess.Popen | None, commands: Connection, replies: Connection,
                 info: dict[str, Any], metrics: Any) -> None:
        self._process = process
        self._commands = commands
        self._replies = replies
        self.info: dict[str, Any] = info
        self.metrics = metrics
        self._lock = threading.Lock()  # _outputs, _calls and _dead
        self._outputs: dict[str, _Output] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        # Ids unique across the engine's clients (each a process of its own).
        self._id_prefix = f"async-{os.getpid()}-"
        self._ids = itertools.count()
        self._accepting = True
        self._dead: str | None = None
        # Commands are written by a thread of their own: a write blocks once the pipe is full (a burst of prompts,
        # while the child is in a step and reads nothing), and the event loop must not block with it.
        self._unsent: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="jaxserve-engine-writer", daemon=True)
        self._writer.start()
        self._reader = threading.Thread(target=self._read, name="jaxserve-engine-reader", daemon=True)
        self._reader.start()

    def take_client_fds(self) -> list[tuple[int, int]]:
        """The other clients' (commands, outputs) pipe ends, for the processes that will `attach` them (the caller
        closes its copies once they are passed on); each client's requests are its own, and the engine aborts them
        when its pipe closes.

        Example:
            >>> [(commands, outputs)] = EngineProcess(spec, clients=2).take_client_fds()  # doctest: +SKIP
        """
        fds, self._client_fds = self._client_fds, []
        return fds

    def _close_client_fds(self) -> None:
        for fd in (fd for pair in self.take_client_fds() for fd in pair):
            os.close(fd)

    # ----- what the server reads --------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._dead is None and (self._process is None or self._process.poll() is None)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.info["eos_ids"])

    @property
    def can_reload_weights(self) -> bool:
        """The child reads its checkpoint again after a level-2 sleep."""
        return True

    # ----- commands -----------------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        """Queue a command for the writer thread (in order; a dead child's are dropped, its callers failed by
        `_fail_all`)."""
        self._unsent.put(message)

    def _write(self) -> None:
        while (message := self._unsent.get()) is not None:
            try:
                self._commands.send(message)
            except (BrokenPipeError, OSError):  # the child is gone: the reader sees its end and fails the callers
                return

    async def _request(self, message: Callable[[int], tuple]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            call_id = next(self._call_ids)
            self._calls[call_id] = (loop, fut)
            self._send(message(call_id))
        return await fut

    async def _call(self, name: str, *args: Any) -> Any:
        return await self._request(lambda call_id: ("call", call_id, name, args))

    async def submit(self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None,
                     priority: int = 0, lora_request: Any = None) -> RequestHandle:
        """`AsyncEngine.submit`'s: queue a request, ValueError for bad input (checked in the child)."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down and accepts no new requests")
        loop = asyncio.get_running_loop()
        output = _Output(loop, asyncio.Queue())
        request_id = request_id or f"{self._id_prefix}{next(self._ids)}"
        with self._lock:
            # Registered before the child hears of it: its first chunks may come before the reply is read here.
            if request_id in self._outputs:
                raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
            self._outputs[request_id] = output
        try:
            await self._request(lambda call_id: ("add", call_id, prompt, params, request_id, priority, lora_request))
        except BaseException:
            with self._lock:
                self._outputs.pop(request_id, None)
            self.abort(request_id)  # a caller that left while the child was adding it
            raise
        return RequestHandle(self, request_id, output)  # type: ignore[arg-type]

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once; unknown or finished ids are ignored)."""
        if self._dead is None:
            self._send(("abort", request_id))

    def abort_all(self) -> None:
        """`AsyncEngine.abort_all`'s."""
        if self._dead is None:
            self._send(("abort_all",))

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    async def register_lora(self, lora_request: Any) -> None:
        await self._call("register_lora", lora_request)

    async def forget_lora(self, lora_id: int) -> None:
        await self._call("forget_lora", lora_id)

    async def clear_prefix_cache(self) -> None:
        await self._call("clear_prefix_cache")

    async def sleep(self, level: int = 1) -> None:
        await self._call("sleep", level)

    async def wake_up(self, params: Any = None) -> None:
        """`AsyncEngine.wake_up`'s; the child reads its checkpoint after a level-2 sleep (weights do not cross)."""
        if params is not None:
            raise ValueError("params: an engine process reads its own checkpoint again; it takes no weights")
        await self._call("wake_up")

    async def sleep_level(self) -> int:
        return await self._call("sleep_level")

    async def structured_guide(self, spec: Any, executor: concurrent.futures.Executor | None = None) -> None:
        """Compile ``spec``'s constraint in the child, off its engine loop (``executor`` is the parent's, unused):
        ValueError naming the spec's field where it cannot be compiled. The child's cache then holds it, so the
        request that carries it compiles nothing between steps."""
        await self._request(lambda call_id: ("guide", call_id, spec))

    def stop_accepting(self) -> None:
        """New requests are refused (`EngineDeadError`, a 503 at the server) from now on; those running go on."""
        self._accepting = False

    async def shutdown(self, drain_s: float = 0.0) -> None:
        """`AsyncEngine.shutdown`'s: drain, abort the rest, and wait for the child to exit. An attached client
        (`attach`) drains and aborts its own requests alone and leaves the engine to the others."""
        self._accepting = False
        if self._process is None:
            await self._leave(drain_s)
            return
        self._close_client_fds()  # never handed to a process: the child sees those clients leave
        if self._dead is None:
            self._send(("stop", drain_s))
        try:
            code = await asyncio.to_thread(self._process.wait, drain_s + 60)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop; killing it")
            self._process.kill()
            code = await asyncio.to_thread(self._process.wait)
        if code != 0:
            log.warning("the engine process exited with code %s", code)
        self._unsent.put(None)
        await asyncio.to_thread(self._reader.join, 10)

    async def _leave(self, drain_s: float) -> None:
        deadline = time.monotonic() + drain_s
        for give_up in (deadline, deadline + 10):  # the drain; then the aborted requests' last chunks
            while self._outputs and self._dead is None and time.monotonic() < give_up:
                await asyncio.sleep(0.02)
            with self._lock:
                left = list(self._outputs)
            for request_id in left:
                self.abort(request_id)
        self._unsent.put(None)
        await asyncio.to_thread(self._writer.join, 10)
        self._commands.close()  # the child drops this client (aborting what it still runs) and closes our replies
        await asyncio.to_thread(self._reader.join, 10)

    # ----- the reader thread --------------------------------------------------------------------------------------
    def _read(self) -> None:
        reason = "the engine process has stopped"
        try:
            while True:
                message = self._replies.recv()
                if message[0] == "chunks":
                    self._deliver(message[1], message[2])
                elif message[0] == "reply":
                    with self._lock:
                        waiting = self._calls.pop(message[1], None)
                    if waiting is not None:
                        loop, fut = waiting
                        _settle_from_thread(loop, fut, message[2], message[3])
        except (EOFError, OSError):
            pass
        except Exception as exc:  # a message it could not read: nothing after it can be trusted
            log.exception("engine process reader failed")
            reason = f"the engine process's messages could not be read: {type(exc).__name__}: {exc}"
        try:
            code = self._process.wait(5) if self._process is not None else None
        except subprocess.TimeoutExpired:
            code = None
        if code not in (0, None):
            reason = f"the engine process exited with code {code}"
        self._fail_all(reason)

    def _deliver(self, chunks: list[tuple[str, Any]], results: list[dict[str, Any]]) -> None:
        if self.metrics is not None:
            for result in results:
                try:
                    self.metrics.observe_finished(result)
                except Exception:
                    log.exception("metrics observer raised")
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for request_id, item in chunks:
                output = self._outputs.get(request_id)
                if output is None:
                    continue
                if isinstance(item, BaseException) or item["finish_reason"] is not None:
                    del self._outputs[request_id]
                by_loop.setdefault(output.loop, []).append((output.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its callers are gone
                log.warning("dropped %d chunks for a closed event loop", len(items))

    def _fail_all(self, reason: str) -> None:
        """The child is gone: every caller still waiting gets `EngineDeadError`, never a hang."""
        with self._lock:
            self._dead = reason
            self._accepting = False
            outputs, self._outputs = self._outputs, {}
            calls, self._calls = self._calls, {}
        self._unsent.put(None)  # the writer's end
        for output in outputs.values():
            try:
                output.loop.call_soon_threadsafe(_deliver, [(output.queue, EngineDeadError(reason))])
            except RuntimeError:
                pass
        for loop, fut in calls.values():
            _settle_from_thread(loop, fut, None, EngineDeadError(reason))


def _settle_from_thread(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any,
                        error: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, fut, value, error)
    except RuntimeError:  # the caller's loop is closed
        pass
