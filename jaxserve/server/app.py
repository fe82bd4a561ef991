"""The FastAPI app: routes over one ``AsyncEngine``, and the uvicorn server that runs it.

Owns the HTTP surface: authentication, body-size, ``n`` and ``max_tokens`` bounds, prompt
rendering (chat template, tools included) and tokenization with the server's own tokenizer copy
(on a thread of its own, off the event loop), submitting to the async engine, SSE streaming,
client-disconnect aborts, SGLang's ``/generate`` (with ``/get_model_info``, ``/get_server_info`` and
``/health_generate``),
``/v1/embeddings``, ``/score`` and ``/rerank`` (vLLM's, by the embeddings' cosine), ``/health``, ``/version``,
``/v1/models``, ``/tokenize`` and ``/detokenize`` (vLLM's), ``/metrics`` and the draining shutdown. It
never schedules or runs the model: the async engine's thread (with ``engine_process``, the engine's own process) alone
drives the ``Engine``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import hmac
import importlib.metadata
import io
import json
import logging
import os
import re
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxserve.async_engine import AsyncEngine, EngineDeadError, RequestError, RequestHandle
from jaxserve.beam_search import BeamSearchParams, best_next, search, step_params
from jaxserve.engine import prompt_embeds_array, truncation
from jaxserve.engine_config import EngineConfig
from jaxserve.engine_process import (EngineProcess, EngineSpec, build_engine, engine_info, keep_off_accelerators,
                                     reload_weights)
from jaxserve.loading import LoadedModel
from jaxserve.lora import LoRARequest
from jaxserve.metrics import CONTENT_TYPE, ServingMetrics
from jaxserve.pooling import POOLING_TYPES, PoolingParams, pair_scores, score_pairs
from jaxserve.sampling import MAX_LOGPROBS, SamplingParams, sample_seed
from jaxserve.server.protocol import (AbortRequest, APIError, ChatRequest, ClassificationRequest, CompletionRequest,
                                      DetokenizeRequest, EmbeddingRequest, GenerateRequest,
                                      LoadLoraRequest, RerankRequest, SamplingFields, Schema, ScoreRequest,
                                      TokenizeRequest, ToolCall, UnloadLoraRequest, bad_params)
from jaxserve.server.api_servers import ApiServers, listening_socket
from jaxserve.server.reasoning import REASONING_PARSERS, THINK_END
from jaxserve.server.responses import ChatFormat, CompletionFormat, GenerateFormat
from jaxserve.server.responses_api import (ResponsesFormat, ResponsesRequest, ResponseStore, chat_body,
                                           input_messages, output_messages)
from jaxserve.server.token_chunks import TokenChunks
from jaxserve.server.tool_calls import TOOL_CALL_END, TOOL_CALL_START
from jaxserve.structured import StructuredOutputs, escape
from jaxserve.tokenizer import chat_prompts, load_tokenizer

log = logging.getLogger("jaxserve.server")

try:
    _VERSION = importlib.metadata.version("jaxserve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    _VERSION = "unknown"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """HTTP-side limits and identity.

    ``max_tokens_limit`` bounds ``max_tokens`` per choice (None, the default: only the context bounds it, as in
    vLLM), ``max_body_bytes`` the request body
    (413 above it), ``max_choices`` the prompts x ``n`` of one request; ``drain_s`` is how long
    shutdown lets running requests finish before aborting them; ``warmup`` compiles every step
    shape before the server answers (``Engine.warmup``; embeddings' prefills too), so no request waits on the
    compiler;
    ``warmup_structured`` also those of requests with structured outputs (``response_format``
    and vLLM's ``structured_outputs`` / ``guided_*``: each decode shape compiles once more);
    ``chat_template`` (a file or a Jinja template) replaces the checkpoint's chat template;
    ``data_parallel_size`` > 1 serves that many engines on as many devices (`jaxserve.replicas.Replicas`);
    ``return_tokens_as_token_ids``: logprobs name tokens ``token_id:<id>`` unless a request says otherwise.

    Example:
        >>> ServerConfig(api_key="secret", max_tokens_limit=1024).max_body_bytes
        1048576
    """

    model_name: str | None = None
    # vLLM's --served-model-name with several names: the others, which requests may send too; responses name the
    # first (model_name).
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_tokens_limit: int | None = None
    max_body_bytes: int = 1 << 20
    max_choices: int = 64
    max_stop: int = 16
    drain_s: float = 5.0
    warmup: bool = False
    warmup_structured: bool = False
    data_parallel_size: int = 1
    # vLLM's --chat-template: a Jinja file or the template itself, replacing the checkpoint's (a base
    # model has none; a fine-tune may want another).
    chat_template: str | None = None
    # vLLM's --return-tokens-as-token-ids: the default of the requests' return_tokens_as_token_ids.
    return_tokens_as_token_ids: bool = False
    # vLLM's --lora-modules: (name, PEFT folder) pairs; a request whose `model` is a name runs with that adapter.
    lora_modules: tuple[tuple[str, str], ...] = ()
    # vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
    allow_runtime_lora_updating: bool = False
    # How /v1/embeddings pools the final hidden states (`jaxserve.pooling`; vLLM's --pooler-config pooling_type).
    pooling_type: str = "last"
    # vLLM's --enable-prompt-embeds: /v1/completions takes `prompt_embeds` (base64 of torch.save of a [tokens,
    # hidden] tensor, read with torch.load(weights_only=True)). Off by default, as vLLM's: it unpickles client bytes.
    enable_prompt_embeds: bool = False
    # vLLM's --reasoning-parser: "deepseek_r1" (QwQ-32B, DeepSeek-R1-Distill-Qwen) puts a chat answer's text up to
    # </think> in its message's reasoning_content (`reasoning.py`); None: the text is all content.
    reasoning_parser: str | None = None
    # vLLM's CORS flags (--allowed-origins and so on), with vLLM's defaults: any origin, method and header, no
    # credentials, so a browser page can call the API (the API key still applies).
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # vLLM's --root-path (behind a proxy that serves the API under a path) and --ssl-keyfile / --ssl-certfile (HTTPS).
    root_path: str = ""
    # Finished /v1/responses kept in memory for previous_response_id and GET /v1/responses/{id} (the latest this
    # many; 0: none, as a request's store: false).
    max_stored_responses: int = 1024
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    # vLLM's --max-logprobs: the most logprobs / top_logprobs / prompt_logprobs a request may ask (the engine's
    # MAX_LOGPROBS at most: its steps compute that many).
    max_logprobs: int = MAX_LOGPROBS
    # vLLM's --enable-log-requests: each request's id, params and adapter logged at INFO (its prompt's length at DEBUG,
    # never the text: prompts hold users' data).
    log_requests: bool = False
    # vLLM's --tokenizer: a tokenizer folder other than the model's, for the engine and the server alike.
    tokenizer: str | None = None
    # vLLM's --enable-request-id-headers: every HTTP answer carries an X-Request-Id header (the request's own, or a
    # new one).
    enable_request_id_headers: bool = False
    # vLLM's --stream-interval: tokens per streamed chunk (1: one chunk a token, vLLM's default); a device call's
    # tokens are split, never held for the next call's.
    stream_interval: int = 1
    # The engine in a process of its own (vLLM V1's EngineCore; `jaxserve.engine_process`): its host work no longer
    # takes turns with the HTTP side's on one GIL (H100, 256 streams: 1.9x the output rate of the engine thread;
    # bench/results/serving_stream_h100.md). Needs a checkpoint folder (weights do not cross processes). None (the
    # default): a process where the model is a checkpoint folder (or the default model), the engine thread where it
    # is a `LoadedModel` (given as params, say); False: always the thread.
    engine_process: bool | None = None
    # With engine_process: "module:function" the child calls with its built engine before serving (a benchmark's
    # stub device, a test's fault); None in production.
    engine_setup: str | None = None
    # vLLM's --api-server-count: this many HTTP server processes on one port, all over the one engine
    # process (`serve` starts the others: `jaxserve.server.api_servers`), when one process's event loop bounds streamed
    # serving. Needs the engine in its own process. Each process keeps its own /v1/responses store and /generate rids
    # (a previous_response_id or an /abort_request rid reaches only the process that served it); runtime LoRA
    # loading is refused (an adapter loaded in one process would be unknown to the others).
    api_server_count: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) or not (
                0 <= self.max_logprobs <= MAX_LOGPROBS):
            raise ValueError(f"max_logprobs must be an int in [0, {MAX_LOGPROBS}] (the most the engine computes), "
                             f"got {self.max_logprobs!r}")
        for name in ("max_tokens_limit", "max_body_bytes", "max_choices", "max_stop", "data_parallel_size",
                     "stream_interval", "api_server_count"):
            if name == "max_tokens_limit" and self.max_tokens_limit is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.drain_s < 0:
            raise ValueError(f"drain_s must be >= 0, got {self.drain_s}")
        if not isinstance(self.max_stored_responses, int) or self.max_stored_responses < 0:
            raise ValueError(f"max_stored_responses must be an int >= 0, got {self.max_stored_responses!r}")
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS} or None, "
                             f"got {self.reasoning_parser!r}")
        if isinstance(self.model_aliases, str) or not all(isinstance(v, str) and v for v in self.model_aliases):
            raise ValueError(f"model_aliases must be a list of non-empty strings, got {self.model_aliases!r}")
        object.__setattr__(self, "model_aliases", tuple(self.model_aliases))
        modules = tuple((str(n), str(p)) for n, p in (self.lora_modules.items() if isinstance(self.lora_modules, dict)
                                                      else self.lora_modules))
        names = [n for n, _ in modules]
        if (len(set(names)) != len(names) or not all(names) or (self.model_name and self.model_name in names)
                or set(names) & set(self.model_aliases)):
            raise ValueError(f"lora_modules must have distinct non-empty names, other than the model's, got {names}")
        object.__setattr__(self, "lora_modules", modules)
        if self.api_server_count > 1 and self.engine_process is False:
            raise ValueError("api_server_count > 1 needs the engine in its own process (engine_process), which the "
                             "server processes share; engine_process is False")



class _RequestIdHeader:
    """vLLM's ``--enable-request-id-headers``: each HTTP answer carries ``X-Request-Id``, the request's own header or a
    new id. Plain ASGI, so a stream's events pass through untouched (Starlette's BaseHTTPMiddleware wraps each
    answer in a task and a queue)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next((v for k, v in scope["headers"] if k == b"x-request-id"), None) or uuid.uuid4().hex.encode()

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


# ----- app state ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
    engine: AsyncEngine | EngineProcess
    metrics: ServingMetrics
    tokenizer: Any  # the server's own copy: the engine thread's tokenizer is never shared
    # Where the tokenizer works, off the event loop: tokenizing a megabyte of prompt text, or spelling
    # out a non-streamed body of 64 choices' top-20 logprobs, takes seconds, which on the loop stalled
    # every open stream and /health. One thread, so this never takes more than one core from the
    # engine thread.
    tokenizer_thread: concurrent.futures.ThreadPoolExecutor
    # Where structured outputs compile (regex or schema or grammar -> DFA -> token tables: up to seconds for a
    # large schema or grammar): on the tokenizer's thread they held up the tokenizing of every other request
    # meanwhile. One thread: a second core only while a constraint compiles.
    constraint_thread: concurrent.futures.ThreadPoolExecutor
    # The checkpoint's generation_config.json sampling, for the fields a request leaves unset (vLLM's
    # `--generation-config auto`); max_tokens keeps OpenAI's defaults.
    sampling_defaults: dict[str, Any]
    model_name: str
    max_model_len: int
    hidden_size: int  # an embedding's length
    labels: tuple[str, ...]  # a classifier's (`jaxserve.pooling`); empty for a causal LM
    config: ServerConfig
    created: int
    loras: dict[str, LoRARequest] = dataclasses.field(default_factory=dict)  # served adapters by name
    last_lora_id: int = 0  # ids only grow (vLLM's counter): an unloaded adapter's id is never another's
    # /v1/load_lora_adapter and /v1/unload_lora_adapter one at a time: a load checks its name is free, then waits for
    # the engine to read the adapter; two loads of one name both passed the check, both answered success, and the
    # engine kept the first's adapter, which no name served and no unload could free.
    lora_updates: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # Finished /v1/responses, for previous_response_id.
    responses: ResponseStore = dataclasses.field(default_factory=lambda: ResponseStore(0))
    # /generate's requests in flight by rid (its meta_info.id), for /abort_request.
    generating: dict[str, RequestHandle | None] = dataclasses.field(default_factory=dict)
    # Reserved rids (their requests' submits in flight) that /abort_request named: aborted once submitted (`_serve`).
    # Dropped, such an abort had left the request to run to its end.
    aborted: set[str] = dataclasses.field(default_factory=set)


def _state(request: Request) -> _State:
    return request.app.state.jaxserve


def create_app(model: LoadedModel | str | os.PathLike | None, engine_config: EngineConfig | None = None,
               server_config: ServerConfig | None = None, *,
               attach: tuple[int, int, dict[str, Any]] | None = None) -> FastAPI:
    """The FastAPI app; the model loads and the engine thread starts in the lifespan startup.

    ``attach``: (commands fd, outputs fd, engine info) of an engine process another server process started
    (`EngineProcess.attach`: an API server worker of ``api_server_count``); the app serves over it and loads no weights.

    Example:
        >>> app = create_app("/models/Qwen2.5-0.5B-Instruct", EngineConfig(dtype="bfloat16"))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)                                      # doctest: +SKIP
    """
    engine_config = engine_config or EngineConfig()
    server_config = server_config or ServerConfig()
    chat_template = resolve_chat_template(server_config.chat_template)  # a bad one stops the start, not a request
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(server_config.lora_modules)}
    if (loras or server_config.allow_runtime_lora_updating) and not engine_config.max_loras:
        # vLLM's --enable-lora: as many slots as adapters, up to 8
        engine_config = dataclasses.replace(engine_config, max_loras=min(max(len(loras), 1), 8))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = ServingMetrics()
        engine: AsyncEngine | EngineProcess
        in_process = (server_config.engine_process if server_config.engine_process is not None
                      else not isinstance(model, LoadedModel))
        if server_config.api_server_count > 1 and not in_process:
            raise ValueError("api_server_count > 1 needs the engine in its own process, which the server processes "
                             "share: give a checkpoint folder, not a LoadedModel")
        if in_process:
            keep_off_accelerators()
            if attach is not None:
                engine = EngineProcess.attach(*attach, metrics=metrics)
            elif isinstance(model, LoadedModel):  # its arrays (or a config overridden at load) cannot cross
                raise ValueError("engine_process: the engine's process loads its model itself, from a checkpoint "
                                 "folder; give the folder, not a LoadedModel (or serve it with engine_process off)")
            else:
                spec = EngineSpec(None if model is None else os.fspath(model), engine_config, server_config.tokenizer,
                                  server_config.data_parallel_size, tuple(loras.values()), server_config.warmup,
                                  server_config.warmup_structured, server_config.engine_setup)
                engine = await asyncio.to_thread(EngineProcess, spec, metrics, server_config.api_server_count)
            info = engine.info
            tokenizer = await asyncio.to_thread(load_tokenizer, server_config.tokenizer or info["path"])
        else:
            built, loaded = await asyncio.to_thread(
                build_engine, model, engine_config, server_config.tokenizer, server_config.data_parallel_size,
                tuple(loras.values()), server_config.warmup, server_config.warmup_structured)
            if not loaded.path and loaded.tokenizer is None:
                raise ValueError("model: the server needs a tokenizer; give LoadedModel.from_params one")
            info = engine_info(built, loaded)
            # Its own copy (the engine thread's is never shared): read again, or copied where the model was given
            # as params.
            tokenizer = (load_tokenizer(server_config.tokenizer or loaded.path)
                         if server_config.tokenizer or loaded.path else copy.deepcopy(loaded.tokenizer))
            reload_params = functools.partial(reload_weights, loaded.path, engine_config) if loaded.path else None
            engine = AsyncEngine(built, metrics=metrics, reload_params=reload_params)
            del loaded, built  # a level-2 sleep frees the weights only if nothing here holds them
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        app.state.jaxserve = _State(
            engine=engine, metrics=metrics,
            tokenizer=tokenizer,
            tokenizer_thread=concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-tokenizer"),
            constraint_thread=concurrent.futures.ThreadPoolExecutor(CONSTRAINT_THREADS,
                                                                    thread_name_prefix="jaxserve-constraints"),
            sampling_defaults={k: v for k, v in info["sampling_defaults"].items() if k != "max_tokens"},
            model_name=server_config.model_name or info["name"],
            max_model_len=info["max_model_len"], hidden_size=info["hidden_size"],
            labels=info["labels"], config=server_config,
            created=int(time.time()), loras=loras, responses=ResponseStore(server_config.max_stored_responses))
        # As vLLM logs its KV blocks: what the pool holds (a replica's, under data parallelism: each holds as much).
        log.info("serving %s (max_model_len %d; KV pool %d pages of %d tokens in %s, %.2f GiB, %d tokens in all%s)",
                 app.state.jaxserve.model_name, info["max_model_len"], info["pool_pages"], info["page_size"],
                 info["pool_dtype"], info["pool_gib"], info["pool_pages"] * info["page_size"],
                 "; the engine in its own process" if in_process else "")
        try:
            yield
        finally:
            await app.state.jaxserve.engine.shutdown(drain_s=server_config.drain_s)
            app.state.jaxserve.tokenizer_thread.shutdown(cancel_futures=True)
            app.state.jaxserve.constraint_thread.shutdown(cancel_futures=True)

    app = FastAPI(title="jaxserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  root_path=server_config.root_path)
    app.state.jaxserve_config = server_config
    if server_config.enable_request_id_headers:
        app.add_middleware(_RequestIdHeader)
    if server_config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server_config.allowed_origins),
                           allow_methods=list(server_config.allowed_methods),
                           allow_headers=list(server_config.allowed_headers),
                           allow_credentials=server_config.allow_credentials)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(EngineDeadError)
    async def _engine_gone(request: Request, exc: EngineDeadError) -> JSONResponse:
        # The engine thread refuses calls once it stops (shutdown). A failed step reaches only the
        # requests it ran, as their own 500 (_results_unless_disconnected, _sse).
        return APIError(503, str(exc), "server_error", code="engine_unavailable").response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    @app.get("/health")
    @app.api_route("/ping", methods=["GET", "POST"])  # vLLM's (SageMaker's) name for the same check
    async def health(request: Request) -> JSONResponse:
        alive = _state(request).engine.is_running
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus's scrape. With ``api_server_count`` > 1 any one process's answer counts every request: each
        finished request reaches every process's collectors, and the engine's gauges come from the engine's process."""
        st = _state(request)
        if st.engine.is_running:
            st.metrics.set_engine_stats(await st.engine.stats())
        return Response(st.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post("/sleep")
    async def sleep(request: Request) -> JSONResponse:
        """vLLM's sleep mode (its dev routes): ``?level=1`` frees the KV pool's device memory until ``/wake_up``
        (a trainer beside the server can use it; every replica's), ``?level=2`` the weights too, which ``/wake_up``
        reads again from the checkpoint (as vLLM's ``reload_weights``; refused where the model was given as params);
        requests are refused meanwhile (400). Needs the API key when one is set."""
        st = _state(request)
        _authorize(request, st)
        level = request.query_params.get("level", "1")
        if level not in ("1", "2"):
            raise APIError(400, f"level must be 1 (the KV pool) or 2 (the weights too), got {level!r}", param="level")
        if level == "2" and not st.engine.can_reload_weights:
            raise APIError(400, "level 2 frees the weights, and this server has no checkpoint to read them again "
                                "from (its model was given as params)", param="level")
        return await _engine_command(st.engine.sleep(int(level)))

    @app.post("/wake_up")
    async def wake_up(request: Request) -> JSONResponse:
        st = _state(request)
        _authorize(request, st)
        # After a level-2 sleep the weights are read again from the checkpoint, off the loop (`AsyncEngine.wake_up`).
        return await _engine_command(st.engine.wake_up())

    @app.get("/is_sleeping")
    async def is_sleeping(request: Request) -> JSONResponse:
        st = _state(request)
        return JSONResponse({"is_sleeping": await st.engine.sleep_level() > 0})

    @app.post("/flush_cache")
    async def flush_cache(request: Request) -> JSONResponse:
        """Drop every cached prefix not in use (SGLang's route of the same name): benchmarks call it
        between runs so each starts cold. Needs the API key when one is set."""
        st = _state(request)
        _authorize(request, st)
        await st.engine.clear_prefix_cache()
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _VERSION})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        st = _state(request)
        _authorize(request, st)
        cards = [_model_card(st)] + [_model_card(st, alias=a) for a in st.config.model_aliases]
        return JSONResponse({"object": "list", "data": cards + [_model_card(st, n) for n in st.loras]})

    @app.get("/v1/models/{model_id:path}")
    async def model_card(request: Request, model_id: str) -> JSONResponse:
        """OpenAI's model retrieval; ids may hold slashes (``Qwen/Qwen2.5-0.5B-Instruct``)."""
        st = _state(request)
        _authorize(request, st)
        _check_model(model_id, st)
        return JSONResponse(_model_card(st, model_id if model_id in st.loras else None,
                                        model_id if model_id in st.config.model_aliases else None))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        """vLLM's route: the token ids a generation route would give the model for this prompt or
        these messages, with ``count`` (its ``usage.prompt_tokens``) and ``max_model_len``."""
        st, req = await _accept_plain(request, TokenizeRequest)
        ids, strs = await _on_tokenizer_thread(st, _tokenize, req, st)
        return JSONResponse({"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids,
                             "token_strs": strs})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        """vLLM's route (with VLLM_ALLOW_RUNTIME_LORA_UPDATING; here ``--allow-runtime-lora-updating``): serve one
        more adapter under a name; it is read and checked before the answer."""
        st, req = await _accept_plain(request, LoadLoraRequest)
        _check_runtime_lora(st)
        async with st.lora_updates:
            if req.lora_name in st.loras or req.lora_name in _base_names(st):
                raise APIError(400, f"The lora adapter '{req.lora_name}' has already been loaded.", param="lora_name")
            try:
                st.last_lora_id = max([st.last_lora_id, *(x.lora_int_id for x in st.loras.values())]) + 1
                lora = LoRARequest(req.lora_name, st.last_lora_id, req.lora_path)
                await st.engine.register_lora(lora)
            except EngineDeadError:
                raise
            except Exception as exc:  # noqa: BLE001 (vLLM's: an adapter that does not load is the request's 400)
                # A ValueError names what is wrong; a file the readers refuse (a corrupt safetensors) says what it is.
                message = str(exc) if isinstance(exc, ValueError) else f"could not load the adapter: {exc!r}"
                raise APIError(400, message, param="lora_path") from None
            st.loras[req.lora_name] = lora
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        """vLLM's route: stop serving an adapter's name (requests already running with it finish)."""
        st, req = await _accept_plain(request, UnloadLoraRequest)
        _check_runtime_lora(st)
        async with st.lora_updates:  # after a load of the name in progress
            lora = st.loras.pop(req.lora_name, None)
            if lora is None:
                raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name",
                               code="model_not_found")
            await st.engine.forget_lora(lora.lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        """vLLM's route: token ids back to text, as the generation routes decode them."""
        st, req = await _accept_plain(request, DetokenizeRequest)
        vocab = len(st.tokenizer)
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is outside the tokenizer's vocabulary [0, {vocab})", param="tokens")
        text = await _on_tokenizer_thread(st, st.tokenizer.decode, req.tokens)
        return JSONResponse({"prompt": text})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        st, req = await _accept(request, CompletionRequest)
        if req.echo and req.stream and req.logprobs is not None:
            # The prompt's log-probabilities arrive with the whole result, after its tokens were streamed.
            raise APIError(400, "echo with logprobs is not supported with stream", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1) and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        embeds = await _on_tokenizer_thread(st, _prompt_embeds, req, st)
        prompts = [] if req.prompt is None and embeds else [
            _truncated(ids, req, st) for ids in await _on_tokenizer_thread(st, _completion_prompts, req, st)]
        # Prompts given as embeddings come first (vLLM's order); the answer counts their placeholder ids.
        engine_prompts = [{"prompt_embeds": e} for e in embeds] + prompts
        prompts = [[0] * len(e) for e in embeds] + prompts
        # OpenAI documents max_tokens as nullable with a default of 16: null is the default, not an error.
        requested = 16 if req.max_tokens is None else req.max_tokens
        # max_tokens 0 with echo scores the prompt alone (lm-evaluation-harness's loglikelihood): the
        # engine generates one token, which the answer leaves out.
        prompt_only = req.echo and requested == 0
        max_tokens = _max_tokens(1 if prompt_only else requested, "max_tokens", st)
        for ids in prompts:
            _check_context(len(ids), max_tokens, "prompt", st)
        # Echoed log-probabilities score the prompt too: the engine computes the more of the two asked for.
        if req.use_beam_search:
            fmt = CompletionFormat(req.model or st.model_name, st.tokenizer, req, prompts)
            _name_answer(fmt, request, req)
            return await _beam_search(request, st, req, prompts, max_tokens, fmt)
        asked = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
        prompt_logprobs = max(asked) if asked else None
        structured = await _structured_outputs(req, st)
        params = _sampling_params(req, max_tokens, req.logprobs, len(prompts) * req.n, st, prompt_logprobs,
                                  structured)
        echo_texts = None
        if req.echo:
            echo_texts = await _on_tokenizer_thread(st, _echo_texts, req, prompts, st)
        fmt = CompletionFormat(req.model or st.model_name, st.tokenizer, req, prompts, echo_texts, prompt_only=prompt_only,
                               token_ids_as_names=_ids_as_names(req, st))
        _name_answer(fmt, request, req)
        return await _serve(request, st, req, [p for p in engine_prompts for _ in range(req.n)], params, fmt)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        """SGLang's native route (its RL frameworks' rollouts and ``bench_serving --backend sglang`` use it): ``text``
        or ``input_ids``, one or a batch, with SGLang's ``sampling_params``, answered as SGLang answers
        (`GenerateFormat`); run as ``/v1/completions`` runs its prompts (`_generate`)."""
        st, req = await _accept_plain(request, GenerateRequest)
        return await _generate(request, st, req)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        """SGLang's: end the ``/generate`` requests whose rid starts with ``rid`` now (SGLang's scheduler matches
        the prefix: a batch's ``rid_0``, ``rid_1``, ... by the batch's ``rid``; each answer, streamed or not, ends with
        finish reason ``abort``; its pages are freed), or with ``abort_all`` every request the server runs. 200 with
        an empty body either way, an unknown or finished rid included, as SGLang answers. With ``api_server_count`` >
        1 a rid reaches only the requests of the process that answers this call (each keeps its own rids); abort_all
        reaches every process's."""
        st, req = await _accept_plain(request, AbortRequest)
        if req.abort_all:
            st.engine.abort_all()
        if req.abort_all or req.rid:
            for rid, handle in list(st.generating.items()):
                if req.abort_all or rid.startswith(req.rid):
                    if handle is None:  # reserved, its submit in flight (a step's wait, in an engine process)
                        st.aborted.add(rid)
                    elif not req.abort_all:
                        # Through the engine, not the handle: a handle's abort ends its answer at once with no last
                        # chunk, where the engine's publishes the request's end (finish reason abort) to the client.
                        st.engine.abort(handle.request_id)
        return Response(status_code=200)

    @app.get("/get_model_info")
    @app.get("/model_info")  # SGLang's newer name
    async def model_info(request: Request) -> JSONResponse:
        st = _state(request)
        _authorize(request, st)
        return JSONResponse({"model_path": st.model_name, "tokenizer_path": st.config.tokenizer or st.model_name,
                             "is_generation": not st.labels, "preferred_sampling_params": None,
                             "weight_version": "default", "has_image_understanding": False,
                             "has_audio_understanding": False})

    @app.get("/get_server_info")
    @app.get("/server_info")  # SGLang's newer name
    async def server_info(request: Request) -> JSONResponse:
        """SGLang's: the settings its routers and benchmark scripts read, under SGLang's names (the model, the
        context, the KV pool's tokens, the running cap), and the engine's state as ``internal_states`` (one a
        server: data-parallel replicas report together)."""
        st = _state(request)
        _authorize(request, st)
        stats = await st.engine.stats() if st.engine.is_running else {}
        state = {"last_gen_throughput": stats.get("tokens_per_s", 0.0),
                 "memory_usage": {"kv_pages_used": stats.get("pages_used", 0),
                                  "kv_pages_total": stats.get("pages_total", 0)}}
        if stats.get("spec_verify_calls"):  # tokens a verify call adds, as SGLang's accept length counts them
            state["avg_spec_accept_length"] = 1 + stats["spec_accepted_tokens"] / stats["spec_verify_calls"]
        return JSONResponse({
            "model_path": st.model_name, "tokenizer_path": st.config.tokenizer or st.model_name,
            "served_model_name": st.model_name, "context_length": st.max_model_len,
            "page_size": engine_config.page_size, "max_running_requests": engine_config.max_running,
            "max_total_num_tokens": stats.get("pages_total", 0) * engine_config.page_size,
            "dp_size": server_config.data_parallel_size, "tp_size": engine_config.tensor_parallel_size,
            "version": _VERSION, "internal_states": [state]})

    @app.get("/health_generate")
    async def health_generate(request: Request) -> JSONResponse:
        """SGLang's deeper health check: 200 once a one-token request runs through the engine, 503 where it fails or
        takes over ``HEALTH_GENERATE_S``. Open without the API key, as /health (and SGLang's /health*) are."""
        st = _state(request)
        try:
            handles = await _submit_all(st, [[0]], [SamplingParams(max_tokens=1, temperature=0)],
                                        f"health-{uuid.uuid4().hex}", logged=False)
            await asyncio.wait_for(_results_unless_disconnected(request, handles), HEALTH_GENERATE_S)
        except (APIError, EngineDeadError, asyncio.TimeoutError) as exc:
            return JSONResponse({"status": f"generation failed: {exc}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        st, req = await _accept_plain(request, EmbeddingRequest)
        _check_dimensions(req, st)
        base_id = f"embd-{uuid.uuid4().hex}"
        results = await _embed(request, st, _items(req.input), "input", req, base_id, normalize=req.normalize)
        return await _on_tokenizer_thread(st, _embedding_response, req, base_id, results)

    @app.post("/pooling")
    async def pooling(request: Request) -> Response:
        """vLLM's generic pooling route: each input's pooled output, a causal LM's embedding (as /v1/embeddings
        gives it) or a classifier's label probabilities (as /classify), in vLLM's ``PoolingResponse``."""
        st, req = await _accept_plain(request, EmbeddingRequest)
        _check_dimensions(req, st)
        base_id = f"pool-{uuid.uuid4().hex}"
        if st.labels:
            params = _pooling_params("last", truncate_prompt_tokens=req.truncate_prompt_tokens, task="classify")
            results = await _pool(request, st, _items(req.input), "input", req, base_id, params)
            vectors = [r["probs"] for r in results]
        else:
            results = await _embed(request, st, _items(req.input), "input", req, base_id, normalize=req.normalize)
            vectors = [r["embedding"] for r in results]
        data = [{"index": i, "object": "pooling", "data": _encoded(vector, req.encoding_format)}
                for i, vector in enumerate(vectors)]
        used = sum(r["prompt_tokens"] for r in results)
        return JSONResponse({"id": base_id, "object": "list", "created": int(time.time()), "model": req.model,
                             "data": data, "usage": {"prompt_tokens": used, "total_tokens": used,
                                                     "completion_tokens": 0}})

    @app.post("/classify")
    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        st, req = await _accept_plain(request, ClassificationRequest)
        if not st.labels:
            raise APIError(400, "this model is not a sequence classifier (config.json's architectures "
                                "Qwen2ForSequenceClassification): /classify has nothing to answer with", param="model")
        base_id = f"classify-{uuid.uuid4().hex}"
        params = _pooling_params("last", truncate_prompt_tokens=req.truncate_prompt_tokens, task="classify",
                                 activation=req.activation)
        results = await _pool(request, st, _items(req.input), "input", req, base_id, params)
        data = [{"index": i, "label": r["label"], "probs": np.asarray(r["probs"]).tolist(),
                 "num_classes": len(st.labels)} for i, r in enumerate(results)]
        used = sum(r["prompt_tokens"] for r in results)
        return JSONResponse({"id": base_id, "object": "list", "created": int(time.time()), "model": req.model,
                             "data": data, "usage": {"prompt_tokens": used, "total_tokens": used,
                                                     "completion_tokens": 0}})

    @app.post("/score")
    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        st, req = await _accept_plain(request, ScoreRequest)
        (name_1, text_1), (name_2, text_2) = req.sides()
        try:
            pairs = score_pairs(text_1, text_2)
        except ValueError as exc:  # pooling names the sides text_1 / text_2: here the request's own names
            message = str(exc).replace("text_1", name_1).replace("text_2", name_2)
            raise APIError(400, message, param=name_1 if message.startswith(name_1) else name_2) from None
        base_id = f"score-{uuid.uuid4().hex}"
        scored = await _score(request, st, pairs, (name_1, name_2), req, base_id)
        data = [{"index": i, "object": "score", "score": s["score"]} for i, s in enumerate(scored)]
        used = sum(s["prompt_tokens"] for s in scored)
        return JSONResponse({"id": base_id, "object": "list", "created": int(time.time()), "model": req.model,
                             "data": data, "usage": {"prompt_tokens": used, "total_tokens": used}})

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(request: Request) -> Response:
        st, req = await _accept_plain(request, RerankRequest)
        if not req.documents:
            raise APIError(400, "documents must not be empty", param="documents")
        if req.top_n < 0:
            raise APIError(400, f"top_n must be >= 0 (0: every document), got {req.top_n}", param="top_n")
        base_id = f"rerank-{uuid.uuid4().hex}"
        scored = await _score(request, st, [(req.query, d) for d in req.documents], ("query", "documents"), req,
                              base_id)
        results = sorted(({"index": i, "document": {"text": d}, "relevance_score": s["score"]}
                          for i, (d, s) in enumerate(zip(req.documents, scored))), key=lambda r: -r["relevance_score"])
        used = sum(s["prompt_tokens"] for s in scored)
        return JSONResponse({"id": base_id, "model": req.model, "usage": {"prompt_tokens": used, "total_tokens": used},
                             "results": results[: req.top_n or None]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        st, req = await _accept(request, ChatRequest)
        return await _chat(request, st, req)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        st = _state(request)
        _authorize(request, st)
        body = await _read_body(request, st.config.max_body_bytes)
        rreq = _parse(ResponsesRequest, body)
        _served_model(rreq, st)
        store = st.responses
        history = [] if rreq.previous_response_id is None else store.conversation(rreq.previous_response_id)
        try:
            turn = history + input_messages(rreq)
            req = _parse(ChatRequest, chat_body(rreq, json.loads(body), turn))
            on_done = None
            if store.capacity > 0 and rreq.store is not False:  # OpenAI's default: stored
                on_done = lambda response: store.put(response, turn + output_messages(response))  # noqa: E731
            return await _chat(request, st, req, (rreq, on_done))
        except APIError as exc:  # the chat route's names for the Responses API's fields
            for chat, own in (("max_completion_tokens", "max_output_tokens"), ("messages", "input"),
                              ("response_format", "text")):
                exc.message = exc.message.replace(chat, own)
                exc.param = own if exc.param == chat else exc.param
            raise

    @app.get("/v1/responses/{response_id}")
    async def get_response(request: Request, response_id: str) -> Response:
        st = _state(request)
        _authorize(request, st)
        return JSONResponse(st.responses.response(response_id))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> Response:
        st = _state(request)
        _authorize(request, st)
        st.responses.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    return app


async def _engine_command(command: Awaitable[None]) -> JSONResponse:
    """An admin route's engine call: a refusal (ValueError) answered 400 with its message."""
    try:
        await command
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return JSONResponse({"status": "ok"})


async def _chat(request: Request, st: _State, req: ChatRequest,
                responses: tuple[ResponsesRequest, Callable[[dict[str, Any]], None] | None] | None = None) -> Response:
    """A chat request run and answered: as a chat completion, or with ``responses`` (the request it was translated
    from, and what to call with the finished response) as a Responses API ``response``."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    ids = _truncated(await _on_tokenizer_thread(st, _chat_prompt, req, st), req, st)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if requested is None:  # OpenAI's and vLLM's default: as much as the context leaves (or the server's cap)
        _check_context(len(ids), 1, "messages", st)
        requested = min(st.config.max_tokens_limit or st.max_model_len, st.max_model_len - len(ids))
    max_tokens = _max_tokens(requested, name, st)
    _check_context(len(ids), max_tokens, "messages", st)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    reasoning = st.config.reasoning_parser is not None
    if responses is not None:
        fmt = ResponsesFormat(req.model or st.model_name, st.tokenizer, req, ids, responses[0], reasoning=reasoning,
                              on_done=responses[1])
    else:
        fmt = ChatFormat(req.model or st.model_name, st.tokenizer, req, ids,
                         token_ids_as_names=_ids_as_names(req, st), reasoning=reasoning)
        _name_answer(fmt, request, req)
    if req.use_beam_search:
        return await _beam_search(request, st, req, [ids], max_tokens, fmt)
    structured = await _structured_outputs(req, st)
    params = _sampling_params(req, max_tokens, logprobs, req.n, st, req.prompt_logprobs, structured)
    return await _serve(request, st, req, [ids] * req.n, params, fmt)


def resolve_chat_template(value: str | None) -> str | None:
    """``--chat-template``'s value as template text: a file's contents, or the value itself where it is
    a Jinja template (holds ``{{`` or ``{%``), as vLLM reads it.

    Example:
        >>> resolve_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")[:6]
        '{% for'
    """
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template")


# Threads compiling requests' constraints (schemas to regexes to DFAs, in Python): with one, a schema of thousands of
# tool names (seconds) held every other constrained request behind it; several share the interpreter's lock, so a
# small schema's compile ends in about twice its own time beside a large one.
CONSTRAINT_THREADS = 4

# Arguments of transformers' apply_chat_template that a request's chat_template_kwargs must not set.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


# ----- request handling ----------------------------------------------------------------------------
async def _accept(request: Request, schema: type[Schema]) -> tuple[_State, Any]:
    """The checks every generation route makes first: API key, body size, schema, model, n."""
    st, req = await _accept_plain(request, schema)
    _check_n(req, st)
    return st, req


async def _accept_plain(request: Request, schema: type[Schema]) -> tuple[_State, Any]:
    """API key, body size, schema, and the model of a schema that has one (`_served_model`)."""
    st = _state(request)
    _authorize(request, st)
    req = _parse(schema, await _read_body(request, st.config.max_body_bytes))
    if "model" in type(req).model_fields:
        _served_model(req, st)
    return st, req


def _served_model(req: Any, st: _State) -> None:
    """``req.model`` checked, or where the body named none the served base model (vLLM's: OpenAI's API requires
    the field, vLLM's routes default it), so that responses always name a model."""
    if req.model is None or req.model in st.config.model_aliases:
        req.model = st.model_name
    _check_model(req.model, st)


def _check_runtime_lora(st: _State) -> None:
    if not st.config.allow_runtime_lora_updating:
        raise APIError(404, "runtime LoRA updating is off: start the server with --allow-runtime-lora-updating "
                            "(vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)", code="not_found")
    if st.config.api_server_count > 1:
        # The served names live in each server process: an adapter loaded through one would be unknown to the others.
        raise APIError(400, "runtime LoRA updating is not supported with --api-server-count > 1 (each server process "
                            "holds its own adapter names); give the adapters at start with --lora-modules")


def _model_card(st: _State, lora: str | None = None, alias: str | None = None) -> dict[str, Any]:
    """The model's card (under ``alias``, one of its other names), or with ``lora`` an adapter's (vLLM's: its parent
    the base model, its root the folder)."""
    if lora is not None:
        return {"id": lora, "object": "model", "created": st.created, "owned_by": "jaxserve",
                "root": st.loras[lora].lora_path, "parent": st.model_name, "max_model_len": st.max_model_len}
    return {"id": alias or st.model_name, "object": "model", "created": st.created, "owned_by": "jaxserve",
            "root": st.model_name, "parent": None, "max_model_len": st.max_model_len}


def _authorize(request: Request, st: _State) -> None:
    key = st.config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    body, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        body.append(part)
    return b"".join(body)


def _parse(schema: type[Schema], body: bytes | dict[str, Any]) -> Any:
    try:
        return schema.model_validate(body) if isinstance(body, dict) else schema.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"malformed JSON body: {err['msg']}") from None
        loc = [str(x) for x in err["loc"]]
        param = loc[0] if loc else None
        where = ".".join(loc) if loc else "body"
        raise APIError(400, f"{where}: {err['msg']}", param=param) from None


def _base_names(st: _State) -> tuple[str, ...]:
    """The served base model's names: the one responses give, then --served-model-name's others."""
    return (st.model_name, *st.config.model_aliases)


def _check_model(name: str, st: _State) -> None:
    if name not in _base_names(st) and name not in st.loras:
        served = [*_base_names(st), *st.loras]
        raise APIError(404, f"model {name!r} does not exist; this server serves {', '.join(map(repr, served))}",
                       param="model", code="model_not_found")


async def _on_tokenizer_thread(st: _State, fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(st.tokenizer_thread, fn, *args)


def _items(value: str | list) -> list:
    """A prompt field's items as OpenAI takes them: a string or a list of token ids is one item, any other list
    holds several."""
    if isinstance(value, str) or (value and all(isinstance(t, int) for t in value)):
        return [value]
    return list(value)


def _token_ids(items: list, fields: list[str], st: _State) -> list[list[int]]:
    """Each item (a string, or token ids) as token ids, with the server's tokenizer; 400 naming the item's field
    where one is empty."""
    out = []
    for item, field in zip(items, fields):
        ids = st.tokenizer.encode(item, add_special_tokens=False) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, f"{field} must not be empty", param=field)
        out.append(ids)
    return out


def _prompt_embeds(req: CompletionRequest, st: _State) -> list[np.ndarray]:
    """A completion's ``prompt_embeds`` (vLLM's: each a base64 string of ``torch.save`` of a ``[tokens, hidden]``
    tensor) as float32 arrays cut to ``truncate_prompt_tokens``; 400 naming the field where the server does not take
    them (``--enable-prompt-embeds``), one does not decode, or a field that needs token ids is set with them."""
    if req.prompt_embeds is None:
        return []
    if not st.config.enable_prompt_embeds:
        raise APIError(400, "prompt_embeds are off on this server (start it with --enable-prompt-embeds)",
                       param="prompt_embeds")
    for name in ("echo", "prompt_logprobs", "use_beam_search"):
        if getattr(req, name, None):
            raise APIError(400, f"{name} is not supported with prompt_embeds (they have no token ids)", param=name)
    try:
        import torch
    except ImportError:
        raise APIError(400, "prompt_embeds need torch on the server to read torch.save's bytes",
                       param="prompt_embeds") from None
    items = [req.prompt_embeds] if isinstance(req.prompt_embeds, str) else req.prompt_embeds
    if not items or len(items) * req.n > st.config.max_choices:
        raise APIError(400, f"prompt_embeds must hold 1 to {st.config.max_choices} items (with n)",
                       param="prompt_embeds")
    out = []
    for item in items:
        try:
            tensor = torch.load(io.BytesIO(base64.b64decode(item, validate=True)), weights_only=True,
                                map_location="cpu")
        except Exception as exc:  # noqa: BLE001  (any undecodable payload is the client's error)
            raise APIError(400, f"prompt_embeds must be base64 of torch.save of a tensor: {exc}",
                           param="prompt_embeds") from None
        if not isinstance(tensor, torch.Tensor):
            raise APIError(400, f"prompt_embeds must hold a tensor, got {type(tensor).__name__}", param="prompt_embeds")
        if tensor.ndim == 3 and tensor.shape[0] == 1:  # a batch of one
            tensor = tensor[0]
        try:  # the engine's own check, answered here with the field's name
            embeds = prompt_embeds_array(tensor, st.hidden_size)
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt_embeds") from None
        if req.truncate_prompt_tokens is not None:
            embeds = embeds[-_truncation(req.truncate_prompt_tokens, req, st):]
        out.append(embeds)
    return out


def _completion_prompts(req: CompletionRequest, st: _State) -> list[list[int]]:
    if req.prompt is None:
        raise APIError(400, "prompt is required (or prompt_embeds)", param="prompt")
    prompts = _items(req.prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if len(prompts) * req.n > st.config.max_choices:
        raise APIError(400, f"prompts x n must be in [1, {st.config.max_choices}], got {len(prompts) * req.n}",
                       param="n")
    return _token_ids(prompts, ["prompt"] * len(prompts), st)


# How long /health_generate waits for its one token (SGLang's HEALTH_CHECK_TIMEOUT).
HEALTH_GENERATE_S = 20.0

# SGLang's sampling_params, each by the completion request field it is (app.py runs /generate as completions).
_SGLANG_SAMPLING = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "no_stop_trim":
                    "include_stop_str_in_output", "sampling_seed": "seed", "json_schema": "guided_json",
                    "regex": "guided_regex", "ebnf": "guided_grammar",
                    **{name: name for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                                               "presence_penalty", "repetition_penalty", "stop", "stop_token_ids",
                                               "ignore_eos", "skip_special_tokens", "n", "logit_bias")}}
# Taken and changing nothing: Qwen2's tokenizer decodes the same either way; streamed chunks follow the server's
# --stream-interval; custom_params only reach a custom logit processor, which is refused.
_SGLANG_IGNORED = frozenset({"spaces_between_special_tokens", "stream_interval", "custom_params"})
# SGLang's request fields this server cannot serve: refused by name where set (ignored, they would change the
# answer unseen).
_SGLANG_UNSERVED = ("input_embeds", "image_data", "video_data", "audio_data", "session_params",
                    "custom_logit_processor", "token_ids_logprob", "return_hidden_states", "return_routed_experts")


async def _generate(request: Request, st: _State, gen: GenerateRequest) -> Response:
    """SGLang's ``/generate``: each prompt's ``sampling_params`` as a completion request (`_generate_requests`), so
    the completions route's checks, sampling params, structured outputs, adapter and disconnect aborts (`_serve`)
    all hold; errors name SGLang's fields (`_sglang_named`)."""
    prompt_field = "input_ids" if gen.input_ids is not None else "text"
    try:
        reqs, single = _generate_requests(gen, st, prompt_field)
        n = reqs[0].n
        prompts = await _on_tokenizer_thread(st, lambda: [_completion_prompts(r, st)[0] for r in reqs])
        logprobs = list(zip(*(_per_prompt(getattr(gen, name), len(reqs), name)
                              for name in ("return_logprob", "logprob_start_len", "top_logprobs_num"))))
        params, asked, scored_only = [], [], []
        for req, ids, (wanted, start, k) in zip(reqs, prompts, logprobs):
            _check_n(req, st)
            max_tokens, shown = _generate_max_tokens(req, ids, st)
            scored_only.append(not shown)
            asked.append(_generate_logprobs(ids, start, k) if wanted else None)
            # Logprobs of prompt tokens before the last come with the engine's whole result (prompt_logprobs).
            prompt_logprobs = k if wanted and asked[-1][0] < len(ids) - 1 else None
            if prompt_logprobs is not None and gen.stream:
                raise APIError(400, "logprob_start_len other than -1 or the prompt's last token is not available "
                                    "with stream (the prompt's logprobs come with the whole result)",
                               param="logprob_start_len")
            params += _sampling_params(req, max_tokens, k if wanted else None, n, st, prompt_logprobs,
                                       await _structured_outputs(req, st))
        rids = _generate_rids(gen, len(prompts), n, single)
        fmt = GenerateFormat(st.tokenizer, prompts, n, rids, single and n == 1, asked, gen.return_text_in_logprobs,
                             scored_only)
        return await _serve(request, st, reqs[0], [ids for ids in prompts for _ in range(n)], params, fmt, rids)
    except APIError as exc:
        raise _sglang_named(exc, prompt_field) from None


def _generate_requests(gen: GenerateRequest, st: _State, prompt_field: str) -> tuple[list[CompletionRequest], bool]:
    """One completion request a prompt of ``gen`` (its sampling_params under the completion fields' names), and
    whether ``gen`` holds a single prompt (SGLang answers it with an object, a batch with a list)."""
    for name in _SGLANG_UNSERVED:
        if (gen.model_extra or {}).get(name):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    # Both given, SGLang's tokenizer manager takes the ids.
    given = gen.input_ids if gen.input_ids is not None else gen.text
    if given is None:
        raise APIError(400, "text or input_ids is required", param="text")
    single = isinstance(given, str) or (bool(given) and all(isinstance(t, int) for t in given))
    items = _items(given)
    if not items:
        raise APIError(400, f"{prompt_field} must not be empty", param=prompt_field)
    if isinstance(gen.sampling_params, list):
        if single or len(gen.sampling_params) != len(items):
            raise APIError(400, f"sampling_params must be one object, or a list of one a prompt ({len(items)})",
                           param="sampling_params")
        given_params = gen.sampling_params
    else:
        given_params = [gen.sampling_params or {}] * len(items)
    lora = _generate_lora(gen, st)
    reqs = []
    for item, sampling in zip(items, given_params):
        body = {"prompt": item, "stream": gen.stream, "model": lora, "max_tokens": 128}  # SGLang's default
        for key, value in sampling.items():
            if key in _SGLANG_SAMPLING:
                body[_SGLANG_SAMPLING[key]] = value
            elif key not in _SGLANG_IGNORED and value is not None:
                raise APIError(400, f"sampling_params.{key} is not supported by this server",
                               param=f"sampling_params.{key}")
        req = _parse(CompletionRequest, body)
        if "max_new_tokens" in sampling and sampling["max_new_tokens"] is None:
            req.max_tokens = None  # the schema reads null as its default (16): here it is SGLang's "no limit"
        reqs.append(req)
    if len({r.n for r in reqs}) > 1:  # SGLang's rule: the answer is prompt-major, n a prompt
        raise APIError(400, "sampling_params.n must be the same for every prompt", param="sampling_params.n")
    if len(reqs) * reqs[0].n > st.config.max_choices:
        raise APIError(400, f"prompts x n must be in [1, {st.config.max_choices}], got {len(reqs) * reqs[0].n}",
                       param=prompt_field)
    return reqs, single


def _generate_max_tokens(req: CompletionRequest, ids: list[int], st: _State) -> tuple[int, bool]:
    """The max_tokens a /generate prompt runs with, and whether its tokens are shown: SGLang cuts max_new_tokens to
    what the context leaves (null: all of it) rather than refusing it, and takes 0 (the prompt scored alone: the
    engine runs one token, which the answer leaves out)."""
    _check_context(len(ids), 1, "prompt", st)
    room = st.max_model_len - len(ids)
    requested = req.max_tokens
    if requested is None:
        requested = min(st.config.max_tokens_limit or room, room)
    if requested < 0:
        raise APIError(400, f"sampling_params.max_new_tokens must be >= 0, got {requested}",
                       param="sampling_params.max_new_tokens")
    return min(_max_tokens(max(requested, 1), "max_tokens", st), room), requested > 0


def _generate_logprobs(ids: list[int], start: int, k: int) -> tuple[int, int]:
    """A /generate prompt's ``(logprob_start_len, top_logprobs_num)``, -1 read as the prompt's last token."""
    start = len(ids) - 1 if start == -1 else start
    if not 0 <= start < len(ids):
        raise APIError(400, f"logprob_start_len must be -1 (the prompt's last token) or in [0, {len(ids)}) (the "
                            f"prompt's tokens), got {start}", param="logprob_start_len")
    return start, k


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    """A /generate field given once or a prompt, as one value a prompt."""
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise APIError(400, f"{name} must be one value, or a list of one a prompt ({count}), got {len(value)}",
                       param=name)
    return value


def _generate_lora(gen: GenerateRequest, st: _State) -> str | None:
    """The served adapter ``lora_path`` names (by its name or its folder), as the completion request's model."""
    paths = set(gen.lora_path) if isinstance(gen.lora_path, list) else {gen.lora_path}
    if len(paths) > 1:
        raise APIError(400, "lora_path must name one adapter for the whole request", param="lora_path")
    path = next(iter(paths), None)
    if path is None or path in st.loras:
        return path
    name = next((name for name, lora in st.loras.items() if lora.lora_path == path), None)
    if name is None:
        raise APIError(400, f"lora_path {path!r} is not an adapter this server serves (by name or folder: "
                            f"{sorted(st.loras)})", param="lora_path")
    return name


def _generate_rids(gen: GenerateRequest, count: int, n: int, single: bool) -> list[str]:
    """Each sample's ``meta_info.id``: SGLang's (the request's ``rid``; a batch's ``{rid}_{i}`` or its list; fresh
    ids for ``n`` > 1 samples, as SGLang gives them)."""
    if n > 1 or gen.rid is None:
        return [uuid.uuid4().hex for _ in range(count * n)]
    if isinstance(gen.rid, str):
        return [gen.rid] if single else [f"{gen.rid}_{i}" for i in range(count)]
    if single or len(gen.rid) != count or len(set(gen.rid)) != count:
        raise APIError(400, f"rid must be a string, or a list of {count} distinct ones (one a prompt)", param="rid")
    return list(gen.rid)


def _sglang_named(exc: APIError, prompt_field: str) -> APIError:
    """An error of the completion request a /generate request ran as, naming the field as SGLang's body does."""
    names = {**{ours: f"sampling_params.{theirs}" for theirs, ours in _SGLANG_SAMPLING.items()},
             "logprobs": "top_logprobs_num", "prompt_logprobs": "top_logprobs_num", "prompt": prompt_field}
    if exc.param in names:
        # Not inside a flag's name: "--max-logprobs" stays the server's flag.
        exc.message = re.sub(rf"(?<![\w-]){re.escape(exc.param)}\b", names[exc.param], exc.message)
        exc.param = names[exc.param]
    return exc


async def _embed(request: Request, st: _State, items: list, field: str | list[str], req: Any, base_id: str,
                 normalize: bool = True) -> list[dict[str, Any]]:
    """Each item's embedding result (`Engine.embed`'s dicts): `_pool` with the server's pooling."""
    params = _pooling_params(st.config.pooling_type, normalize, req.truncate_prompt_tokens)
    return await _pool(request, st, items, field, req, base_id, params)


def _pooling_params(*args: Any, **kwargs: Any) -> PoolingParams:
    """`PoolingParams` of a request's fields; a bad one answers 400 naming it."""
    try:
        return PoolingParams(*args, **kwargs)
    except ValueError as exc:
        raise bad_params(exc, also=("truncate_prompt_tokens",)) from None


async def _score(request: Request, st: _State, pairs: list[tuple[Any, Any]], names: tuple[str, str], req: Any,
                 base_id: str) -> list[dict[str, Any]]:
    """Each pair's ``score`` and ``prompt_tokens`` (`pooling.pair_scores`): the cosine of its texts' embeddings
    (each distinct text embedded once), or where the model is a one-label classifier, the probability it gives the
    texts one after the other (a cross-encoder's, `pooling.cross_encoder_prompt`). 400s name ``names`` (the first
    texts' field, the second's)."""
    if st.labels:
        if len(st.labels) != 1:
            raise APIError(400, f"scores need an embedding model or a classifier of one label (a cross-encoder); this "
                                f"classifier has {len(st.labels)} labels: use /classify", param="model")
        ids = await _on_tokenizer_thread(st, _token_ids, [t for pair in pairs for t in pair],
                                         [name for _ in pairs for name in names], st)
        params = _pooling_params("last", truncate_prompt_tokens=req.truncate_prompt_tokens, task="classify")
        out = await _pool(request, st, [a + b for a, b in zip(ids[::2], ids[1::2])], names[1], req, base_id, params)
        return [{"score": float(o["probs"][0]), "prompt_tokens": o["prompt_tokens"]} for o in out]
    firsts = {a for a, _ in pairs}
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    fields = [names[0] if t in firsts else names[1] for t in texts]
    return pair_scores(pairs, dict(zip(texts, await _embed(request, st, texts, fields, req, base_id))))


async def _pool(request: Request, st: _State, items: list, field: str | list[str], req: Any, base_id: str,
                params: PoolingParams) -> list[dict[str, Any]]:
    """Each item's pooling result (`Engine.embed`'s or `Engine.classify`'s dicts), for the pooling routes: ``items``
    strings or token-id lists, cut to ``req.truncate_prompt_tokens`` and run with ``req.priority`` and the adapter
    ``req.model`` names; a bad one answers 400 naming ``field`` (given a list, each item's own)."""
    prompts = await _on_tokenizer_thread(st, _pooling_prompts, items, field, req, st)
    try:
        handles = await _submit_all(st, prompts, [params] * len(prompts), base_id, req.priority,
                                    st.loras.get(req.model))
    except APIError as exc:  # the engine names a prompt's faults "prompt": here the field is the route's own
        exc.param = (field if isinstance(field, str) else field[0]) if exc.param == "prompt" else exc.param
        raise
    return await _results_unless_disconnected(request, handles)


def _pooling_prompts(items: list, field: str | list[str], req: Any, st: _State) -> list[list[int]]:
    """Token-id prompts of the pooling routes' texts (strings or id lists), each cut to ``req.truncate_prompt_tokens``
    (`_truncated`) and checked against the context; 400 naming ``field`` (given a list, the item's own) otherwise."""
    names = [field] * len(items) if isinstance(field, str) else field
    if not items or len(items) > st.config.max_choices:
        name = names[0] if names else field
        raise APIError(400, f"{name} must hold 1 to {st.config.max_choices} items, got {len(items)}", param=name)
    out = [_truncated(ids, req, st) for ids in _token_ids(items, names, st)]
    for ids, name in zip(out, names):
        _check_context(len(ids), 1, name, st)
    return out


def _check_dimensions(req: EmbeddingRequest, st: _State) -> None:
    if req.dimensions is not None and req.dimensions != st.hidden_size:
        # vLLM's answer too: only matryoshka models may be cut, and Qwen2's hidden states are not one.
        raise APIError(400, f"dimensions must be the model's {st.hidden_size} (this model has no matryoshka "
                            f"representation to cut), got {req.dimensions}", param="dimensions")


def _encoded(vector: Any, encoding_format: str) -> list[float] | str:
    """A vector as a response carries it: floats, or ``base64`` of its little-endian float32 bytes (what the openai
    client reads)."""
    vector = np.asarray(vector, "<f4")
    return base64.b64encode(vector.tobytes()).decode() if encoding_format == "base64" else vector.tolist()


def _embedding_response(req: EmbeddingRequest, base_id: str, results: list[dict[str, Any]]) -> Response:
    """OpenAI's embeddings list (`_encoded` vectors)."""
    data = [{"object": "embedding", "index": i, "embedding": _encoded(r["embedding"], req.encoding_format)}
            for i, r in enumerate(results)]
    used = sum(r["prompt_tokens"] for r in results)
    return JSONResponse({"id": base_id, "object": "list", "created": int(time.time()), "model": req.model,
                         "data": data, "usage": {"prompt_tokens": used, "total_tokens": used}})


def _echo_texts(req: CompletionRequest, prompts: list[list[int]], st: _State) -> list[str]:
    """What ``echo`` puts before each prompt's choices: the prompt as sent when it is text (as vLLM
    does), its tokens decoded when it is token ids or was cut (``truncate_prompt_tokens``)."""
    sent = req.prompt if isinstance(req.prompt, list) and len(req.prompt) == len(prompts) else [req.prompt]
    cut = req.truncate_prompt_tokens is not None
    return [p if isinstance(p, str) and not cut else st.tokenizer.decode(ids) for p, ids in zip(sent, prompts)]


def _tokenize(req: TokenizeRequest, st: _State) -> tuple[list[int], list[str] | None]:
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "exactly one of prompt and messages must be given", param="prompt")
    if req.messages is not None:
        ids = _chat_prompt(req, st)
    else:
        ids = st.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return ids, st.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None


def _chat_prompt(req: ChatRequest | TokenizeRequest, st: _State) -> list[int]:
    reserved = sorted(set(req.chat_template_kwargs or ()) & _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {reserved}", param="chat_template_kwargs")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true (a turn is "
                            "either continued or a new one started)", param="continue_final_message")
    messages = []
    for m in req.messages:
        content = [part.model_dump() for part in m.content] if isinstance(m.content, list) else m.content
        message: dict[str, Any] = {"role": m.role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [_templated_call(call) for call in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    # With tool_choice "none" the tools are still rendered, as vLLM does by default: the model
    # sees them, its answer is not parsed for calls.
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools] if req.tools else None
    try:
        # The Python API's path (`Engine.chat`): text parts joined, "developer" as "system", the template's
        # own refusals (role order, ...) as input errors.
        [ids] = chat_prompts(st.tokenizer, [messages], add_generation_prompt=req.add_generation_prompt, tools=tools,
                             continue_final_message=req.continue_final_message,
                             template_kwargs=req.chat_template_kwargs)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return ids


def _templated_call(call: ToolCall) -> dict[str, Any]:
    """An assistant message's tool call as chat templates take it: ``arguments`` parsed (Qwen2.5's
    writes ``arguments | tojson``, which would quote OpenAI's JSON string a second time; vLLM parses
    it too)."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        raise APIError(400, f"tool call arguments must be JSON, got {call.function.arguments!r}",
                       param="messages") from None
    out = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    return {"id": call.id, **out} if call.id is not None else out


def _max_tokens(value: int | None, name: str, st: _State) -> int:
    """``value`` checked against the server's cap, where it has one; the context is checked apart
    (`_check_context`), with vLLM's message."""
    limit = st.config.max_tokens_limit
    if value is None or value < 1 or (limit is not None and value > limit):
        raise APIError(400, f"{name} must be in [1, {limit or 'the context'}], got {value}", param=name)
    return value


def _truncated(ids: list[int], req: SamplingFields | EmbeddingRequest | ScoreRequest | RerankRequest,
               st: _State) -> list[int]:
    """The prompt tokens the engine uses: all, or the last ``truncate_prompt_tokens`` (vLLM's). Cut here,
    before the context check, the usage counts and echo, so that all of them see what the model sees."""
    k = req.truncate_prompt_tokens
    if k is None:
        return ids
    try:
        SamplingParams(truncate_prompt_tokens=k)  # its rule for k, refused here before any cut
    except ValueError as exc:
        raise bad_params(exc) from None
    return ids[-_truncation(k, req, st):]


def _truncation(k: int, req: Any, st: _State) -> int:
    """`jaxserve.engine.truncation` of ``truncate_prompt_tokens=k`` beside the request's max_tokens (either name)."""
    max_tokens = getattr(req, "max_tokens", None) or getattr(req, "max_completion_tokens", None)
    return truncation(k, st.max_model_len, max_tokens if isinstance(max_tokens, int) else None)


def _check_context(prompt_len: int, max_tokens: int, param: str, st: _State) -> None:
    if prompt_len + max_tokens > st.max_model_len:
        raise APIError(400, f"This model's maximum context length is {st.max_model_len} tokens. However, you "
                            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {param}, "
                            f"{max_tokens} for the completion). Please reduce the length of the {param} "
                            f"or the completion.", param=param, code="context_length_exceeded")


def _ids_as_names(req: SamplingFields, st: _State) -> bool:
    asked = req.return_tokens_as_token_ids
    return st.config.return_tokens_as_token_ids if asked is None else asked


def _check_n(req: SamplingFields, st: _State) -> None:
    if not 1 <= req.n <= st.config.max_choices:
        raise APIError(400, f"n must be in [1, {st.config.max_choices}], got {req.n}", param="n")
    if req.prompt_logprobs is not None:
        most = st.config.max_logprobs
        if not 0 <= req.prompt_logprobs <= most:  # vLLM's -1 (the whole vocabulary) too
            raise APIError(400, f"prompt_logprobs must be in [0, {most}] (the server's --max-logprobs), got "
                                f"{req.prompt_logprobs}", param="prompt_logprobs")
        if req.stream:  # they come with the whole result (vLLM's rule too)
            raise APIError(400, "prompt_logprobs are not available with stream", param="prompt_logprobs")


def _sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, count: int,
                     st: _State, prompt_logprobs: int | None = None,
                     structured: StructuredOutputs | None = None) -> list[SamplingParams]:
    if req.stream_options is not None and not req.stream:  # vLLM's and OpenAI's 400
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > st.config.max_stop:
        raise APIError(400, f"stop must hold at most {st.config.max_stop} strings, got {len(stop)}", param="stop")
    if logprobs is not None and not 0 <= logprobs <= st.config.max_logprobs:
        name = "top_logprobs" if isinstance(req, ChatRequest) else "logprobs"
        raise APIError(400, f"{name} must be in [0, {st.config.max_logprobs}] (the server's --max-logprobs), got "
                            f"{logprobs}", param=name)
    if req.logprob_token_ids is not None and logprobs is None:  # vLLM's rule: nothing else would return them
        needs = "logprobs to be true" if isinstance(req, ChatRequest) else "logprobs to be set"
        raise APIError(400, f"logprob_token_ids requires {needs}", param="logprob_token_ids")
    given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
             "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
             "repetition_penalty": req.repetition_penalty, "min_tokens": req.min_tokens,
             "ignore_eos": req.ignore_eos, "stop_token_ids": req.stop_token_ids, "logit_bias": req.logit_bias,
             "include_stop_str_in_output": req.include_stop_str_in_output,
             "truncate_prompt_tokens": req.truncate_prompt_tokens, "allowed_token_ids": req.allowed_token_ids,
             "skip_special_tokens": req.skip_special_tokens, "bad_words": req.bad_words,
             "thinking_token_budget": req.thinking_token_budget, "logprob_token_ids": req.logprob_token_ids}
    kwargs = {**st.sampling_defaults, **{k: v for k, v in given.items() if v is not None}}
    try:
        # n > 1 with a seed: sample j of every prompt uses seed + j (vLLM's rule; `sample_seed`), so a prompt's
        # choices differ, yet each is what the same prompt gets when sent alone or with others.
        # -1 is vLLM's "no seed" for every choice, not seeds -1, 0, 1...
        return [SamplingParams(max_tokens=max_tokens, stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                               structured_outputs=structured,
                               seed=None if req.seed in (None, -1) else sample_seed(req.seed, i % req.n), **kwargs)
                for i in range(count)]
    except ValueError as exc:
        raise bad_params(exc) from None


async def _structured_outputs(req: SamplingFields, st: _State) -> StructuredOutputs | None:
    """The request's output constraint, from whichever field gives one (at most one may): OpenAI's
    ``response_format`` (``json_object``, ``json_schema``), vLLM's ``structured_outputs`` object or its
    ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, or a chat's ``tool_choice`` "required" or
    named function. Compiled here, on the constraint thread (a JSON schema's DFA takes up to a second the
    first time; the engine thread then finds it cached; other requests' tokenizing goes on meanwhile); a bad
    one is a 400 naming its field."""
    sources: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None:
        kind = fmt.get("type", "text")
        if kind == "json_object":
            sources.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise APIError(400, "response_format.json_schema must be an object whose 'schema' is a JSON schema",
                               param="response_format")
            sources.append(("response_format", {"json": spec["schema"]} if "schema" in spec else {"json_object": True}))
        elif kind != "text":
            raise APIError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format")
    if req.structured_outputs is not None:
        sources.append(("structured_outputs", dict(req.structured_outputs)))
    guided = {key: value for key, value in (("json", req.guided_json), ("regex", req.guided_regex),
                                             ("choice", req.guided_choice), ("grammar", req.guided_grammar))
              if value is not None}
    if guided:
        sources.append((f"guided_{next(iter(guided))}", guided))
    if isinstance(req, ChatRequest):
        # On the constraint thread, as the guide's compile below: a tool's schema can take seconds to write out, and
        # the event loop serves every other request meanwhile.
        tools = await asyncio.get_running_loop().run_in_executor(st.constraint_thread, _tool_call_regex, req)
        if tools is not None:
            sources.append(("tool_choice", {"regex": tools}))
    if len(sources) > 1:
        raise APIError(400, f"at most one output constraint may be given, got {[name for name, _ in sources]}",
                       param=sources[1][0])
    if not sources:
        if req.guided_whitespace_pattern is not None:
            raise APIError(400, "guided_whitespace_pattern needs a JSON constraint", param="guided_whitespace_pattern")
        return None
    param, fields = sources[0]
    if req.guided_whitespace_pattern is not None:
        fields.setdefault("whitespace_pattern", req.guided_whitespace_pattern)
    if isinstance(req, ChatRequest) and st.config.reasoning_parser is not None:
        # The constraint starts where the reasoning ends (vLLM's); a structured_outputs object's own "after" (null:
        # from the first token) overrides it.
        fields.setdefault("after", THINK_END)
    try:
        spec = StructuredOutputs.from_value(fields)
        await st.engine.structured_guide(spec, st.constraint_thread)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None
    return spec


def _arguments_regex(parameters: dict[str, Any] | None) -> str:
    """The regex of a tool's arguments: a JSON object, held to ``parameters`` where it says what one holds. OpenAI's
    arguments are an object; a schema of no type (``{}``, or properties alone) would otherwise allow any value."""
    from jaxserve.json_schema import json_object_regex, schema_to_regex

    if not parameters or (parameters.get("type") is None and "properties" not in parameters):
        return json_object_regex()
    if parameters.get("type") is None:
        parameters = {**parameters, "type": "object"}
    return schema_to_regex(parameters)


def _tool_call_regex(req: ChatRequest) -> str | None:
    """With ``tool_choice`` "required" (one call or more, of any tool) or a named function (one call of it),
    the regex of the Hermes blocks Qwen2.5's chat template asks for (``<tool_call>\n{"name": ..., "arguments":
    ...}\n</tool_call>``), the arguments held to the tool's ``parameters`` schema; None otherwise, as vLLM's."""
    choice = req.tool_choice
    if choice in (None, "auto", "none"):
        return None
    tools = {t.function.name: t.function.parameters for t in req.tools or ()}
    if choice == "required":
        names = list(tools)
    elif (isinstance(choice, dict) and choice.get("type") == "function"
          and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)):
        names = [choice["function"]["name"]]
        if names[0] not in tools:
            raise APIError(400, f"tool_choice names {names[0]!r}, which is not among the request's tools",
                           param="tool_choice")
    else:
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                            "{'name': ...}}", param="tool_choice")
    if not names:
        raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
    try:
        calls = [escape(f'{TOOL_CALL_START}\n{{"name": {json.dumps(name)}, "arguments": ')
                 + _arguments_regex(tools[name]) + escape(f"}}\n{TOOL_CALL_END}") for name in names]
    except ValueError as exc:
        raise APIError(400, f"tools: {exc}", param="tools") from None
    one = "(?:" + "|".join(calls) + ")"
    # "required" allows several calls, unless the request asked for one at most (parallel_tool_calls false: the
    # further calls were generated, then dropped, and could end a one-call answer at "length").
    return one if choice != "required" or req.parallel_tool_calls is False else f"{one}(?:\n{one})*"


async def _submit_all(st: _State, prompts: list[list[int]], params: list[SamplingParams],
                      base_id: str, priority: int = 0, lora: LoRARequest | None = None,
                      logged: bool = True) -> list[RequestHandle]:
    """Each prompt submitted with its params as ``{base_id}-{i}``, logged where the server logs requests (``logged``
    false: a beam search's steps, logged once as the search). All at once, in order: a submit waits for the engine's
    next look at its commands (between two steps), so one after another a request's n choices (a batch's prompts, a
    beam search step's beams) started one engine step apart (n = 32 under load: its last choice's first token ~2 s
    after its first's)."""
    if logged and st.config.log_requests:
        for i, (ids, p) in enumerate(zip(prompts, params)):
            _log_request(f"{base_id}-{i}", ids, p, lora)
    tasks = [asyncio.ensure_future(st.engine.submit(ids, p, f"{base_id}-{i}", priority, lora))
             for i, (ids, p) in enumerate(zip(prompts, params))]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks)
    finally:
        for t in tasks:
            t.cancel()  # we were cancelled: a submit still waiting aborts its own request (no-op on those done)
        handles = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
        if len(handles) < len(tasks):  # one was refused (or we were cancelled): drop the rest
            for h in handles:
                h.abort()
    error = next((t.exception() for t in tasks if t.exception() is not None), None)  # the first prompt's refusal
    if isinstance(error, ValueError):
        raise bad_params(error) from None
    if error is not None:
        raise error
    return handles


def _name_answer(fmt: Any, request: Request, req: Any) -> None:
    """vLLM's request ids: the answer's id takes the client's (the X-Request-Id header, else the body's
    ``request_id``) after its kind's prefix. The engine's requests then get ids of their own beside it
    (`_engine_id`): two clients may send the same id while both run."""
    client_id = request.headers.get("x-request-id") or req.request_id
    if client_id:
        fmt.engine_id = fmt.id  # the random one
        fmt.id = f"{fmt.id.split('-', 1)[0]}-{client_id}"


def _engine_id(fmt: Any) -> str:
    """The base of the engine's request ids for an answer (its id, unless the client named it: `_name_answer`)."""
    return getattr(fmt, "engine_id", fmt.id)


def _log_request(request_id: str, prompt: Any, params: Any, lora: LoRARequest | None) -> None:
    """vLLM's --enable-log-requests line: the id, params and adapter at INFO; the prompt's length at DEBUG. Never the
    prompt's text (vLLM's DEBUG line holds it; prompts are users' data)."""
    log.info("Received request %s: params: %s, lora_request: %s.", request_id, params,
             None if lora is None else lora.lora_name)
    if log.isEnabledFor(logging.DEBUG):
        embeds = prompt.get("prompt_embeds") if isinstance(prompt, dict) else None
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else prompt
        log.debug("Request %s details: prompt_token_ids_len: %s, prompt_embeds shape: %s.", request_id,
                  None if ids is None else len(ids), None if embeds is None else tuple(np.shape(embeds)))


async def _merge(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Chunks of several requests as they come, tagged with the request's index."""
    if len(handles) == 1:
        async for chunk in handles[0]:
            yield 0, chunk
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for chunk in handle:
                await q.put((i, chunk, None))
        except Exception as exc:
            await q.put((i, None, exc))
        await q.put((i, None, StopAsyncIteration()))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        open_count = len(tasks)
        while open_count:
            i, chunk, exc = await q.get()
            if isinstance(exc, StopAsyncIteration):
                open_count -= 1
            elif exc is not None:
                raise exc
            else:
                yield i, chunk
    finally:
        for t in tasks:
            t.cancel()


async def _serve(request: Request, st: _State, req: SamplingFields, prompts: list[Any],
                 params: list[SamplingParams], fmt: CompletionFormat | ChatFormat | GenerateFormat,
                 rids: list[str] | None = None) -> Response:
    """Submit the prompts and answer in ``fmt``, streamed or whole; ``rids``: a /generate request's, under which
    /abort_request finds its handles while they run (`_reserve`)."""
    rids = rids or []
    _reserve(st, rids)
    try:
        handles = await _submit_all(st, _salted(prompts, req), params, _engine_id(fmt), req.priority,
                                    st.loras.get(req.model))
    except BaseException:
        _forget(st, rids)
        raise
    st.generating.update(zip(rids, handles))
    for rid, handle in zip(rids, handles):
        if rid in st.aborted:  # /abort_request named it while it was being submitted
            st.engine.abort(handle.request_id)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and req.stream_options.continuous_usage_stats
        # Starlette runs the background task however the response ends. A client gone before the
        # stream's first step cancels the generator before its body runs, so its `finally` never
        # aborts the requests: this does (a no-op for requests already finished).
        # A device call's tokens come as one engine chunk; vLLM streams each token (--stream-interval 1) as its own.
        pieces = TokenChunks(st.tokenizer, st.config.stream_interval, req.skip_special_tokens is not False)

        async def end() -> None:
            _forget(st, rids)
            await _abort_all(handles)

        return StreamingResponse(_sse(handles, fmt, include_usage, continuous, pieces), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(end))
    try:
        results = await _results_unless_disconnected(request, handles)
    finally:
        _forget(st, rids)
    return await _on_tokenizer_thread(st, lambda: JSONResponse(fmt.response(results)))


def _reserve(st: _State, rids: list[str]) -> None:
    """Hold ``rids`` in `_State.generating` before their requests are submitted, so that a second request naming a
    rid in flight is refused (SGLang refuses a duplicate rid); the handles replace the reservations once submitted."""
    taken = sorted(set(rids) & st.generating.keys())  # a request's own rids are distinct (`_generate_rids`)
    if taken:
        raise APIError(400, f"rid {taken[0]} is already in use by a request in flight", param="rid")
    st.generating.update(dict.fromkeys(rids))


def _forget(st: _State, rids: list[str]) -> None:
    # Reserved rids are refused to every other request, so each entry under one of them is this request's.
    for rid in rids:
        st.generating.pop(rid, None)
        st.aborted.discard(rid)


def _salted(prompts: list[Any], req: SamplingFields) -> list[Any]:
    """The prompts under the request's ``cache_salt`` (vLLM's: they share cached prefixes only with prompts of the
    same salt); as they are without one. The engine refuses a bad salt (`request.cache_salt_keys`)."""
    if req.cache_salt is None:
        return prompts
    return [{**(p if isinstance(p, dict) else {"prompt_token_ids": p}), "cache_salt": req.cache_salt} for p in prompts]


# Fields a beam search request may not set (vLLM's beam search takes n, max_tokens, ignore_eos, length_penalty).
_NOT_WITH_BEAM_SEARCH = ("stream", "logprobs", "top_logprobs", "logprob_token_ids", "echo", "stop", "stop_token_ids",
                         "logit_bias", "bad_words", "allowed_token_ids", "min_tokens", "prompt_logprobs",
                         "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                         "guided_grammar")


async def _beam_search(request: Request, st: _State, req: SamplingFields, prompts: list[list[int]],
                       max_tokens: int, fmt: CompletionFormat | ChatFormat) -> Response:
    """vLLM's ``use_beam_search``: each prompt's n best beams of width n (`jaxserve.beam_search.search`, its
    steps' one-token requests submitted to the engine like any others) as its n choices, best first."""
    for name in _NOT_WITH_BEAM_SEARCH:
        if getattr(req, name, None) not in (None, False, [], {}):
            raise APIError(400, f"{name} is not supported with use_beam_search", param=name)
    if getattr(req, "tool_choice", None) not in (None, "auto", "none"):  # a forced call constrains the output
        raise APIError(400, "tool_choice other than 'auto' or 'none' is not supported with use_beam_search",
                       param="tool_choice")
    try:
        params = BeamSearchParams(beam_width=req.n, max_tokens=max_tokens, ignore_eos=bool(req.ignore_eos),
                                  length_penalty=req.length_penalty)
    except ValueError as exc:
        field = str(exc).split(" ")[0]
        raise APIError(400, str(exc).replace("beam_width", "n (the beam width)"),
                       param="n" if field == "beam_width" else field) from None
    loop = asyncio.get_running_loop()
    lora = st.loras.get(req.model)
    step = step_params(params)
    if st.config.log_requests:
        for i, prompt in enumerate(prompts):
            _log_request(f"{_engine_id(fmt)}-{i}", prompt, params, lora)

    def next_logprobs(seqs: list[list[int]], k: int) -> list[dict[int, float]]:
        async def run() -> list[dict[str, Any]]:
            # A step ends well inside `_results_unless_disconnected`'s poll: the client is checked before each.
            if await request.is_disconnected():
                raise APIError(499, "client disconnected", code="client_closed_request")
            handles = await _submit_all(st, _salted(seqs, req), [step] * len(seqs), f"{_engine_id(fmt)}-beam",
                                        req.priority, lora, logged=False)
            return await _results_unless_disconnected(request, handles)

        return [best_next(o, k) for o in asyncio.run_coroutine_threadsafe(run(), loop).result()]

    try:
        found = await asyncio.to_thread(search, next_logprobs, prompts, params, st.engine.eos_ids)
    except ValueError as exc:  # a step the engine refused (`best_next`): beams longer than the KV pool holds
        raise APIError(400, str(exc), param="max_tokens") from None

    def results() -> list[dict[str, Any]]:
        out = []
        for prompt, beams in zip(prompts, found):
            for b in beams:
                new = b.tokens[len(prompt):]
                out.append({"text": st.tokenizer.decode(new, skip_special_tokens=req.skip_special_tokens is not False),
                            "token_ids": new, "finish_reason": "stop" if b.finished else "length", "stop_reason": None,
                            "completion_tokens": len(new), "cached_tokens": 0, "prompt_tokens": len(prompt)})
        return out

    done = await _on_tokenizer_thread(st, results)
    return await _on_tokenizer_thread(st, lambda: JSONResponse(fmt.response(done)))


async def _abort_all(handles: list[RequestHandle]) -> None:
    for h in handles:
        h.abort()


def _ended_with_error(exc: RequestError | EngineDeadError) -> APIError:
    """A request the engine ended with an error: a 400 where its own parameters caused it, a 500 where the engine
    failed."""
    if isinstance(exc, RequestError):
        return APIError(400, str(exc))
    return APIError(500, str(exc), "server_error", code="engine_error")


async def _results_unless_disconnected(request: Request, handles: list[RequestHandle]) -> list[dict[str, Any]]:
    task = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client disconnected", code="client_closed_request")
    except (RequestError, EngineDeadError) as exc:
        raise _ended_with_error(exc) from None
    finally:
        task.cancel()
        # An abort may end the gather with the requests' error before the cancel lands: read it, or asyncio logs
        # "exception was never retrieved" for every client that went away.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        for h in handles:
            h.abort()


async def _sse(handles: list[RequestHandle], fmt: CompletionFormat | ChatFormat | GenerateFormat,
               include_usage: bool, continuous: bool = False,
               pieces: TokenChunks | None = None) -> AsyncIterator[str]:
    """The SSE events of a streamed request: each engine chunk as ``pieces`` splits it (`TokenChunks`; None: whole)."""
    # By choice index, not in finishing order: usage counts a prompt's cached tokens once over its
    # n neighbouring choices, and sampled choices finish in any order.
    results: dict[int, dict[str, Any]] = {}
    # The Responses API's events are typed (an `event:` line each, the final event's response the end: no [DONE]).
    typed = isinstance(fmt, ResponsesFormat)
    try:
        # vLLM's continuous_usage_stats: each chunk also carries its choice's usage so far.
        generated = [0] * len(handles)

        def counted(event: dict[str, Any], i: int) -> dict[str, Any]:
            if continuous:
                prompt = fmt.prompt_tokens_of(i)
                event["usage"] = {"prompt_tokens": prompt, "completion_tokens": generated[i],
                                  "total_tokens": prompt + generated[i]}
            return event

        for i in range(len(handles)):
            for event in fmt.stream_start(i, include_usage):
                yield _event(counted(event, i), typed)
        async for i, whole in _merge(handles):
            # One write for an engine chunk's events (a token each): they reach the client together anyway (one
            # device call's tokens), and a send per event multiplied the server's per-write cost by the call's steps.
            events = []
            for chunk in [whole] if pieces is None else pieces.split(i, whole):
                # echo with max_tokens 0 shows no token of the one the engine ran (CompletionFormat.prompt_only)
                generated[i] += 0 if getattr(fmt, "prompt_only", False) else len(chunk["token_ids"])
                events += [_event(counted(event, i), typed) for event in fmt.stream_chunk(i, chunk, include_usage)]
                if chunk["finish_reason"] is not None:
                    results[i] = chunk["result"]
            if events:
                yield "".join(events)
        if include_usage:
            yield _event(fmt.usage_chunk([results[i] for i in sorted(results)]))
    except (RequestError, EngineDeadError) as exc:
        error = _ended_with_error(exc)
        yield _event({"type": "error", "code": error.code, "message": error.message, "param": None} if typed
                     else error.body(), typed)
    finally:
        # Runs on normal end and when the client disconnects (the response task is cancelled).
        for h in handles:
            h.abort()
    if not typed:
        yield "data: [DONE]\n\n"


def _json_encoder() -> Callable[[Any], str]:
    """``json.dumps(obj, ensure_ascii=False)`` as one encoder made once: dumps builds a JSONEncoder and its C encoder
    every call, half of its ~4.4 µs for a one-token SSE chunk, and a streamed token is one such call on the server's
    event loop (the process a streaming server is bound by). The same text; no circular-reference check (an event is a
    fresh tree of plain values). Python's pure encoder where the C one is missing."""
    c_encoder = getattr(json.encoder, "c_make_encoder", None)
    plain = json.JSONEncoder(ensure_ascii=False)
    if c_encoder is None:
        return plain.encode
    encode = c_encoder(None, plain.default, json.encoder.encode_basestring, None, ": ", ", ", False, False, True)
    return lambda obj: "".join(encode(obj, 0))


_dumps = _json_encoder()


def _event(obj: dict[str, Any], typed: bool = False) -> str:
    head = f"event: {obj['type']}\n" if typed else ""
    return f"{head}data: {_dumps(obj)}\n\n"


# ----- running it ------------------------------------------------------------------------------------
def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """A ``uvicorn.Server`` for an app from ``create_app`` whose shutdown drains the engine first.

    Plain uvicorn waits for open responses and only then runs the lifespan shutdown, so a long
    stream would be cut when its graceful timeout expires. Here SIGINT/SIGTERM first stops the
    engine (new requests get 503, running ones finish within ``drain_s`` or end with
    finish_reason "abort" and ``[DONE]``), so the connections close on their own. With ``api_servers`` set (`serve`
    with ``api_server_count`` > 1) it starts them once its app is up, and its shutdown stops them (each drains)
    before the engine's.

    Example:
        >>> build_server(create_app("/models/qwen"), port=8000).run()  # doctest: +SKIP
    """
    import uvicorn

    class _Server(uvicorn.Server):
        api_servers: ApiServers | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            st = getattr(app.state, "jaxserve", None)
            if self.api_servers is not None and st is not None and not self.should_exit:
                self.api_servers.start(st.engine, sockets[0])

        async def shutdown(self, sockets=None) -> None:
            st = getattr(app.state, "jaxserve", None)
            if st is not None:
                drain_s = st.config.drain_s
                if self.api_servers is not None:  # the engine serves the workers' drains, then this one's rest
                    start = time.monotonic()
                    st.engine.stop_accepting()
                    await self.api_servers.stop(drain_s)
                    drain_s = max(0.0, drain_s - (time.monotonic() - start))
                await st.engine.shutdown(drain_s=drain_s)
            await super().shutdown(sockets=sockets)

    config = getattr(app.state, "jaxserve_config", None) or ServerConfig()
    return _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=int(config.drain_s) + 5,
                                  ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile))


def serve(model: LoadedModel | str | os.PathLike | None, engine_config: EngineConfig | None = None,
          server_config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (see ``build_server`` for the shutdown order). With ``api_server_count`` > 1 this
    process binds the socket and serves it beside the workers it starts (`jaxserve.server.api_servers`).

    Example:
        >>> serve("/models/Qwen2.5-0.5B-Instruct", EngineConfig(dtype="bfloat16"), port=8000)  # doctest: +SKIP
    """
    server_config = server_config or ServerConfig()
    server = build_server(create_app(model, engine_config, server_config), host, port, log_level)
    if server_config.api_server_count == 1:
        server.run()
        return
    server.api_servers = ApiServers(model, engine_config or EngineConfig(), server_config, log_level)
    server.run(sockets=[listening_socket(host, port)])
