"""``--api-server-count N``: N HTTP server processes on one port, all over one engine process (vLLM's
API server scale-out).

Why: with the engine in its own process, streamed serving at many requests is bound by the one server process's
event loop (H100, 256 streams at a token an SSE event: the server process busy 0.90 of the run at 29.3k output tok/s,
the engine's 0.82; bench/results/serving_stream_h100.md, session 73). More server processes share that work.

How: the main process (`serve`) binds the socket, starts the engine process with N clients
(`EngineProcess(..., clients=N)`) and, once its app is up, N - 1 workers (`ApiServers.start`): fresh interpreters
that inherit the socket and one client's pipes, build the same app over the attached engine
(`create_app(..., attach=...)`: no weights, JAX kept off the accelerators) and serve the port beside the main
process, each on a socket of its own in the port's SO_REUSEPORT group (`listening_socket`), the kernel handing each
connection to one of them. Each request's chunks go to the process that submitted
it; every finished request is counted by every process's /metrics. SIGTERM or SIGINT to the main process: the
workers get SIGTERM and drain (``drain_s``), then the main process drains and stops the engine. A worker that dies is
logged, and the engine aborts its requests; the others go on.

Example:
    >>> serve("/models/qwen", EngineConfig(), ServerConfig(api_server_count=4), port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from jaxserve.engine_config import EngineConfig
from jaxserve.engine_process import EngineProcess, start_interpreter

log = logging.getLogger("jaxserve.server")

# How much longer than its drain a worker gets to exit before it is killed (uvicorn's graceful timeout is drain_s + 5).
_EXIT_GRACE_S = 30.0


@dataclasses.dataclass(frozen=True)
class _WorkerArgs:
    """What a worker builds its app from: the main process's own arguments (so every process answers alike: model
    name, adapters, chat template, tokenizer, limits) and the engine's start report (`engine_info`)."""

    index: int
    parent: int  # the main process's pid: a worker whose main process is gone stops
    model: str | None
    engine_config: EngineConfig
    server_config: Any  # ServerConfig
    info: dict[str, Any]
    log_level: str


class ApiServers:
    """The main server process's workers (``ServerConfig.api_server_count`` - 1 of them).

    Example:
        >>> workers = ApiServers("/models/qwen", EngineConfig(), ServerConfig(api_server_count=2))  # doctest: +SKIP
        >>> workers.start(engine, sock)       # doctest: +SKIP
        >>> await workers.stop(drain_s=5.0)   # doctest: +SKIP
    """

    def __init__(self, model: str | os.PathLike | None, engine_config: EngineConfig, server_config: Any,
                 log_level: str = "info") -> None:
        self.model = None if model is None else os.fspath(model)
        self.engine_config = engine_config
        self.server_config = server_config
        self.log_level = log_level
        self.processes: list[subprocess.Popen] = []
        self._stopping = False

    def start(self, engine: EngineProcess, sock: socket.socket) -> None:
        """Start a worker for each of ``engine``'s other clients, serving ``sock`` (returns at once; each answers once
        its app is up)."""
        for index, (commands, outputs) in enumerate(engine.take_client_fds(), 1):
            # JAX in a worker never touches an accelerator (the engine's process holds it), from its first import on.
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            try:
                process, setup = start_interpreter("jaxserve.server.api_servers:_worker_entry",
                                                   (sock.fileno(), commands, outputs), env)
            finally:
                # Only the worker holds them now: its death reads as its pipe's end in the engine.
                os.close(commands)
                os.close(outputs)
            setup.send(_WorkerArgs(index, os.getpid(), self.model, self.engine_config, self.server_config,
                                   engine.info, self.log_level))
            setup.close()
            self.processes.append(process)
            threading.Thread(target=self._watch, args=(index, process), name=f"jaxserve-api-server-{index}",
                             daemon=True).start()
        log.info("%d API server processes serve the socket (this one and pids %s)", len(self.processes) + 1,
                 ", ".join(str(p.pid) for p in self.processes))

    def _watch(self, index: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if not self._stopping:
            log.error("API server %d (pid %d) exited with code %s; the engine aborted its requests, the other server "
                      "processes go on serving", index, process.pid, code)

    async def stop(self, drain_s: float) -> None:
        """SIGTERM to every worker (each drains its requests for up to ``drain_s`` and exits), and wait for them;
        one still running ``drain_s`` + 30 s later is killed."""
        self._stopping = True
        running = [process for process in self.processes if process.poll() is None]  # the dead were logged
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + drain_s + _EXIT_GRACE_S
        for process in running:
            try:
                code = await asyncio.to_thread(process.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("API server pid %d did not stop; killing it", process.pid)
                process.kill()
                code = await asyncio.to_thread(process.wait)
            log.log(logging.INFO if code == 0 else logging.WARNING, "API server pid %d exited with code %s",
                    process.pid, code)


def listening_socket(host: str, port: int, exclusive_check: bool = True) -> socket.socket:
    """A TCP socket listening on ``host:port`` with SO_REUSEPORT where the OS has it: each server process then listens
    on a socket of its own in the port's group and the kernel spreads new connections over them by a hash of each.
    With one socket shared by every process the split is whichever accept loop wins (asyncio accepts all that wait,
    up to the backlog, at one wake-up): in the tests 12 connections opened at once often went to one process.
``exclusive_check`` (the main process's socket): refused (OSError) where another process listens on the port.

    Example:
        >>> sock = listening_socket("127.0.0.1", 0); sock.getsockname()[1] > 0
        True
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not exclusive_check:
        return _bound(family, host, port, hasattr(socket, "SO_REUSEPORT"))
    # First bound without SO_REUSEPORT, which fails while any other process listens there (another server started with
    # this flag included: it would otherwise join the group and take a share of the connections).
    probe = _bound(family, host, port, False)
    port = probe.getsockname()[1]
    probe.close()
    return _bound(family, host, port, hasattr(socket, "SO_REUSEPORT"))


def _bound(family: int, host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _own_socket(inherited: socket.socket) -> socket.socket:
    """A worker's socket: its own in the port's SO_REUSEPORT group (`listening_socket`), else the inherited one."""
    if not hasattr(socket, "SO_REUSEPORT") or not inherited.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return inherited
    own = listening_socket(*inherited.getsockname()[:2], exclusive_check=False)
    inherited.close()  # this process's descriptor alone: the main process's socket goes on listening
    return own


def _worker_entry(setup: Connection, sock_fd: int, commands_fd: int, outputs_fd: int) -> None:
    """A worker's start (`start_interpreter`): the app over the attached engine, serving the inherited socket until
    SIGTERM (or its main process is gone)."""
    args: _WorkerArgs = setup.recv()
    setup.close()
    # uvicorn handles SIGINT and SIGTERM while it serves and raises the signal again under the handlers it found once
    # it has shut down: ignored ones, so a drained worker exits 0 (the main process tells a clean stop from a crash).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logger = logging.getLogger("jaxserve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s:     %(name)s [api {args.index}]: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.log_level == "trace" else args.log_level.upper())
    threading.Thread(target=_stop_without, args=(args.parent,), name="jaxserve-parent-watch", daemon=True).start()

    from jaxserve.server.app import build_server, create_app

    app = create_app(args.model, args.engine_config, args.server_config,
                     attach=(commands_fd, outputs_fd, args.info))
    build_server(app, log_level=args.log_level).run(sockets=[_own_socket(socket.socket(fileno=sock_fd))])


def _stop_without(parent: int) -> None:
    """SIGTERM to this worker once its main process is gone (killed outright: nobody else would stop it, and its
    engine went with it)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    log.warning("the main server process is gone; stopping")
    os.kill(os.getpid(), signal.SIGTERM)
