"""``AsyncEngine``: the ``Engine`` driven by one background thread, used from asyncio.

Owns the engine thread, the command queue into it and the per-request output queues out of
it. Exactly one thread, the engine thread, ever touches the ``Engine`` (and so the scheduler,
the pool and the tokenizer's streaming state): callers only post commands (submit, abort,
stats, clear, stop) on a thread-safe queue and read chunks from their request's
``asyncio.Queue``, filled by one ``loop.call_soon_threadsafe`` per event loop and engine step
(`AsyncEngine._flush`). It never speaks HTTP and never formats OpenAI responses (``server.py`` does).

`EngineLoop` is the engine side alone (commands, steps, chunks), over a transport: `AsyncEngine`'s thread and queues
here, `jaxserve.engine_process`'s pipes to a child process (the server's default for a checkpoint folder).

A chunk is a dict: ``text`` (new text, never half a character, stop strings held back),
``token_ids``, ``logprobs`` / ``top_logprobs`` (when asked), ``finish_reason`` (None until
the last chunk), and on the last chunk ``result``, the dict ``Request.result()`` returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable

from jaxserve.engine import Engine, Prompt
from jaxserve.request import Request, Status
from jaxserve.sampling import SamplingParams

log = logging.getLogger("jaxserve.async_engine")


class RequestError(ValueError):
    """A request ended by its own parameters partway (its structured output constraint left no token by its other
    rules): the caller's to fix, where `EngineDeadError` is the engine's failure."""


class EngineDeadError(RuntimeError):
    """A request failed because a step raised (the message says why) or the engine stopped."""


class _Stop:
    """Sentinel command: drain for ``drain_s`` seconds, abort the rest, leave the loop."""

    def __init__(self, drain_s: float) -> None:
        self.deadline = time.monotonic() + drain_s


@dataclasses.dataclass
class _Output:
    """Where one request's chunks go, on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent_tokens: int = 0


class RequestHandle:
    """One submitted request: iterate it for chunks, or ``await result()``.

    Example:
        >>> handle = await engine.submit("def fib(n):", SamplingParams(max_tokens=8))  # doctest: +SKIP
        >>> async for chunk in handle: print(chunk["text"], end="")                   # doctest: +SKIP
    """

    def __init__(self, engine: "AsyncEngine", request_id: str, output: _Output) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = output.queue
        self.finished = False

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item["finish_reason"] is not None:
                    self.finished = True
                yield item
        finally:
            # The consumer went away (closed stream, cancelled task) before the end: free the pages.
            self.abort()

    async def result(self) -> dict[str, Any]:
        """Wait for the end; the ``Request.result()`` dict (``EngineDeadError`` if a step failed)."""
        last = None
        try:
            async for chunk in self:
                last = chunk
        finally:
            self.abort()
        if last is None:
            raise EngineDeadError(f"request {self.request_id} ended without output")
        return last["result"]

    def abort(self) -> None:
        """Stop the request now (no-op once it finished)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class Submitting:
    """`stream` and `generate_async` over a driver's ``submit`` (`AsyncEngine`'s, `jaxserve.engine_process`'s)."""

    async def submit(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     priority: int = 0, lora_request: Any = None) -> RequestHandle:
        raise NotImplementedError

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     lora_request: Any = None) -> AsyncIterator[dict[str, Any]]:
        """Chunks of one request as they are produced; leaving the loop early aborts it. ``lora_request``: the
        adapter it runs with (vLLM's ``AsyncLLM.generate`` takes one too)."""
        handle = await self.submit(prompt, params, request_id, priority, lora_request)
        try:
            async for chunk in handle:
                yield chunk
        finally:  # an early exit must not wait for the inner generator's garbage collection
            handle.abort()

    async def generate_async(self, prompt: Prompt, params: SamplingParams | None = None,
                             request_id: str | None = None, priority: int = 0,
                             lora_request: Any = None) -> dict[str, Any]:
        """Run one request to the end; the ``Request.result()`` dict (``lora_request``: as `stream`'s)."""
        handle = await self.submit(prompt, params, request_id, priority, lora_request)
        try:
            return await handle.result()
        finally:
            handle.abort()


class EngineLoop:
    """The engine side of a driver: one thread owns the ``Engine`` and runs this loop (commands between steps,
    a step, each progressed request's chunk handed out). `AsyncEngine` runs it on a thread beside the caller's
    event loop; `jaxserve.engine_process` runs it in a child process, its commands and chunks crossing pipes.
    A transport gives the four methods below.

    Commands are tuples: ``("call", fn, reply)`` (``reply(value, error)`` is called on this thread with what ``fn()``
    gave), ``("abort", request_id)``, ``("abort_all",)``, ``("stop", _Stop)``.
    """

    def __init__(self, engine: Engine, metrics: Any = None, idle_poll_s: float = 1.0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.idle_poll_s = idle_poll_s
        self._outputs: dict[str, Any] = {}  # request_id -> its transport's output (with sent_tokens); loop only

    # ----- the transport's -------------------------------------------------------------------
    def _next_command(self, block: bool) -> tuple | None:
        """The next command; None when there is none (after ``idle_poll_s`` where ``block``)."""
        raise NotImplementedError

    def _post(self, output: Any, item: Any) -> None:
        """Queue a chunk (or the exception a request ends with) for ``output``'s caller until `_flush`."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Hand over what `_post` queued since the last flush: once a step, for every request at once."""
        raise NotImplementedError

    def _refuse_pending_calls(self) -> None:
        """The loop has ended: answer the calls still queued with `EngineDeadError`."""
        raise NotImplementedError

    # ----- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        stop: _Stop | None = None
        try:
            while True:
                try:
                    busy = self.engine.has_unfinished()
                    stop = self._drain_commands(block=not busy and stop is None) or stop
                    if stop is not None and (not self.engine.has_unfinished()
                                             or time.monotonic() >= stop.deadline):
                        break
                    if self.engine.has_unfinished():
                        self._step()
                except Exception as exc:  # a bug outside the step: fail what runs, keep serving
                    log.exception("engine loop error")
                    self._fail_running(f"engine loop error: {type(exc).__name__}: {exc}")
                finally:
                    self._flush()
        finally:
            self._closing()
            self._end_all("the engine is shutting down")
            self._flush()
            self._refuse_pending_calls()
            self.engine.close()

    def _closing(self) -> None:
        """The loop is about to end (no more requests may be added)."""

    def _drain_commands(self, block: bool) -> _Stop | None:
        stop = None
        cmd = self._next_command(block)
        while cmd is not None:
            kind = cmd[0]
            if kind == "call":
                _, fn, reply = cmd
                try:
                    value, error = fn(), None
                except Exception as exc:  # bad input must reach the caller, never kill the loop
                    value, error = None, exc
                reply(value, error)
            elif kind == "abort":
                self._abort(cmd[1])
            elif kind == "abort_all":
                for request_id in list(self.engine.requests):
                    self._abort(request_id)
            elif kind == "stop":
                stop = cmd[1]
            cmd = self._next_command(False)
        return stop

    def _abort(self, request_id: str) -> None:
        request = self.engine.requests.get(request_id)
        if self.engine.abort(request_id) and request is not None:
            self._publish(request)

    def _add(self, prompt: Prompt, params: SamplingParams | None, request_id: str, output: Any,
             priority: int = 0, lora_request: Any = None) -> None:
        self.engine.add_request(prompt, params, request_id, priority, lora_request)
        request = self.engine.requests[request_id]
        if request.finish_reason is not None:  # refused at once (it could never fit the pool)
            self.engine.release(request_id)
            raise ValueError(request.error or f"request {request_id} was refused")
        self._outputs[request_id] = output

    def _step(self) -> None:
        try:
            progressed = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the running requests")
            self._fail_running(f"engine step failed: {type(exc).__name__}: {exc}")
            return
        for request in progressed:
            self._publish(request)

    def _fail_running(self, message: str) -> None:
        """Requests a failed step may have touched end with an error instead of hanging: those running,
        and those it took off the queue to admit (still waiting, but no longer queued: no step would
        ever reach them)."""
        for request in self.engine.failed_step_requests():
            self.engine.abort_after_failure(request)
            request.error = message
            self._publish(request)

    def _end_all(self, message: str) -> None:
        """Shutdown: every unfinished request aborted with ``message``, and every caller still waiting answered."""
        for request in list(self.engine.requests.values()):
            if request.status is not Status.FINISHED:
                try:
                    self.engine.abort(request.request_id)
                except Exception:
                    log.exception("abort during shutdown raised")
                    request.finish("abort", message)
            self._publish(request)
        for output in self._outputs.values():  # nothing should be left; never leave a caller waiting
            self._post(output, EngineDeadError(message))
        self._outputs.clear()

    def _publish(self, request: Request) -> None:
        """Hand a request's new text and tokens to its caller; on finish, the result, then forget it."""
        output = self._outputs.get(request.request_id)
        if output is None:
            return
        text, _ = request.take_delta()
        start, end = output.sent_tokens, len(request.output_ids)
        output.sent_tokens = end
        finished = request.finish_reason is not None
        if not text and start == end and not finished:
            return
        chunk: dict[str, Any] = {"request_id": request.request_id, "text": text,
                                 "token_ids": request.output_ids[start:end], "finish_reason": request.finish_reason,
                                 "stop_reason": request.stop_reason}
        if request.params.logprobs is not None:
            chunk["logprobs"] = request.output_logprobs[start:end]
            # `has_top_logprobs` read as its two fields: a chunk a step for every such request (logprobs=0 is common).
            top = request.params.logprobs or request.params.logprob_token_ids is not None
            chunk["top_logprobs"] = request.top_logprobs[start:end] if top else None
        if finished:
            chunk["result"] = request.result()
            del self._outputs[request.request_id]
            self.engine.release(request.request_id)
            if self.metrics is not None:
                try:
                    self.metrics.observe_finished(chunk["result"])
                except Exception:
                    log.exception("metrics observer raised")
            if request.error:  # a failed step or a request that could not go on: the error, not a normal end
                error = RequestError(request.error) if request.client_error else EngineDeadError(request.error)
                self._post(output, error)
                return
        self._post(output, chunk)


class AsyncEngine(EngineLoop, Submitting):
    """Continuous batching for many concurrent asyncio callers.

    ``metrics``, if given, gets ``observe_finished(result)`` for every request that ends (from
    the engine thread); the server passes its Prometheus collectors here. ``reload_params``: the weights read
    again (from the checkpoint) for a `wake_up` after a level-2 `sleep` that was given none.

    Example:
        >>> engine = AsyncEngine(Engine(jaxserve.load(), EngineConfig(max_running=8)))  # doctest: +SKIP
        >>> out = await engine.generate_async("def fib(n):", SamplingParams(max_tokens=16))  # doctest: +SKIP
        >>> async for chunk in engine.stream("Hello", SamplingParams(max_tokens=16)):   # doctest: +SKIP
        ...     print(chunk["text"], end="")
        >>> await engine.shutdown()                                                    # doctest: +SKIP
    """

    def __init__(self, engine: Engine, metrics: Any = None, idle_poll_s: float = 1.0,
                 reload_params: Callable[[], Any] | None = None) -> None:
        super().__init__(engine, metrics, idle_poll_s)
        self.reload_params = reload_params
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Chunks published since the last flush, by the loop they go to (engine thread only).
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        self._ids = itertools.count()
        self._accepting = True
        # Calls are queued and refused under one lock, so none is queued after the engine thread's
        # last look at the queue (it would never be answered).
        self._calls_lock = threading.Lock()
        self._calls_closed = False
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    # ----- caller side (any thread / event loop) --------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence token ids."""
        return self.engine.eos_ids

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result here."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._calls_lock:
            if self._calls_closed or not self.is_running:
                raise EngineDeadError("the engine thread is not running")
            self._commands.put(("call", fn, functools.partial(_reply_to, loop, fut)))
        return await fut

    async def submit(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     lora_request: Any = None) -> RequestHandle:
        """Queue a request; raises ``ValueError`` for bad input (checked on the engine thread). ``priority``,
        ``lora_request``: `Engine.make_request`'s."""
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down and accepts no new requests")
        loop = asyncio.get_running_loop()
        output = _Output(loop, asyncio.Queue())
        request_id = request_id or f"async-{next(self._ids)}"
        try:
            await self._call(lambda: self._add(prompt, params, request_id, output, priority, lora_request))
        except asyncio.CancelledError:  # the caller left while the engine thread was adding it
            self.abort(request_id)
            raise
        return RequestHandle(self, request_id, output)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once; unknown or finished ids are ignored)."""
        self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request submitted so far and not yet finished (SGLang's ``abort_all``: an RL trainer stops
        its rollouts before it updates the weights). Each caller gets its request's end, finish reason ``abort``;
        the engine keeps serving. Thread-safe, returns at once.

        Example:
            >>> engine.abort_all()  # doctest: +SKIP
        """
        self._commands.put(("abort_all",))

    async def stats(self) -> dict[str, Any]:
        """``Engine.stats()`` taken on the engine thread between steps."""
        return await self._call(self.engine.stats)

    async def register_lora(self, lora_request: Any) -> None:
        """`Engine.register_lora` on the engine thread."""
        await self._call(lambda: self.engine.register_lora(lora_request))

    async def forget_lora(self, lora_id: int) -> None:
        """`Engine.forget_lora` on the engine thread."""
        await self._call(lambda: self.engine.forget_lora(lora_id))

    async def clear_prefix_cache(self) -> None:
        """Drop unlocked cached prefixes (their pages return to the pool)."""
        await self._call(self.engine.clear_prefix_cache)

    async def sleep(self, level: int = 1) -> None:
        """`Engine.sleep` (or `Replicas.sleep`) on the engine thread (ValueError while requests are unfinished)."""
        await self._call(lambda: self.engine.sleep(level))

    async def wake_up(self, params: Any = None) -> None:
        """`Engine.wake_up` on the engine thread (``params``: the weights, after a level-2 sleep; where none are
        given, ``reload_params``' are read, off the event loop)."""
        if params is None and self.reload_params is not None and self.engine.sleeping == 2:
            params = await asyncio.to_thread(self.reload_params)
        await self._call(lambda: self.engine.wake_up(params))

    @property
    def can_reload_weights(self) -> bool:
        """Whether a level-2 `sleep` may be woken without weights (``reload_params`` reads them again)."""
        return self.reload_params is not None

    async def structured_guide(self, spec: Any, executor: concurrent.futures.Executor | None = None) -> Any:
        """`Engine.structured_guide` on ``executor`` (a compile takes up to seconds: off the event loop and off the
        engine thread); ValueError naming the spec's field where it cannot be compiled."""
        return await asyncio.get_running_loop().run_in_executor(executor, self.engine.structured_guide, spec)

    async def sleep_level(self) -> int:
        """0 awake, else the level the engine sleeps at (`Engine.sleep`)."""
        return int(self.engine.sleeping)

    async def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop accepting, let running requests finish for up to ``drain_s`` seconds, abort the
        rest (their streams end with finish_reason "abort"), join the thread, close the engine."""
        self._accepting = False
        if self.is_running:
            self._commands.put(("stop", _Stop(drain_s)))
            await asyncio.to_thread(self._thread.join)

    # ----- engine thread: the transport ---------------------------------------------------------
    def _closing(self) -> None:
        self._accepting = False

    def _next_command(self, block: bool) -> tuple | None:
        try:
            return self._commands.get(timeout=self.idle_poll_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return None

    def _refuse_pending_calls(self) -> None:
        with self._calls_lock:
            self._calls_closed = True
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "call":
                cmd[2](None, EngineDeadError("the engine has stopped"))

    def _post(self, output: _Output, item: Any) -> None:
        self._outbox.setdefault(output.loop, []).append((output.queue, item))

    def _flush(self) -> None:
        """Hand each event loop what was published for it, in one wakeup. A wakeup per chunk cost the engine thread
        a self-pipe write each (asyncio's releases the GIL: at 256 running requests the event loop took it back 256
        times a step, and the engine thread waited for it at each) and the loop as many callbacks."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its callers are gone, the other loops' are not
                log.warning("dropped %d chunks for a closed event loop", len(items))


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _reply_to(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    loop.call_soon_threadsafe(_settle, fut, value, error)


def _settle(fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
