"""Data-parallel replicas: one `Engine` a device, behind a prefix-aware router.

Owns which replica serves a request. It never schedules inside a replica, touches a replica's pages, or moves a
request between replicas once routed: each engine stays what it is alone (its own weights' copy, KV pool, radix
index and compiled steps on its device), so a request's tokens are the ones it would get from that engine alone.

Why route by prefix: a replica's radix index saves the prefill of the prefixes it has seen, not of those its
neighbours saw; sending a shared system prompt or few-shot header to wherever it already lives keeps the hit rate
of one engine across N. Why not by prefix alone: one popular prefix would pile every request onto one device.
The rule (SGLang's cache-aware routing, simplified): the router keeps, per replica, the page-aligned prefixes it
sent there (a chained hash per full page, least recently used dropped past the replica's pool size); a request goes
to the replica holding most of its leading pages, unless that replica has more than ``balance_slack`` unfinished
requests over the least loaded one, or no replica holds a page of it: then to the least loaded.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

from jaxserve.engine import Engine, Prompt, check_priority, run_chat, run_score, run_to_completion
from jaxserve.engine_config import EngineConfig
from jaxserve.loading import LoadedModel, load
from jaxserve.pooling import PoolingParams, classify_params, embed_params
from jaxserve.request import Request
from jaxserve.sampling import SamplingParams
from jaxserve.structured import StructuredOutputs, TokenGuide
from jaxserve.tokenizer import Conversation


class _Requests(Mapping):
    """Every replica's ``Engine.requests`` as one read-only mapping (request ids are unique across them)."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self._engines = engines

    def __getitem__(self, request_id: str) -> Request:
        for engine in self._engines:
            if request_id in engine.requests:
                return engine.requests[request_id]
        raise KeyError(request_id)

    def __iter__(self) -> Iterator[str]:
        for engine in self._engines:
            yield from engine.requests

    def __len__(self) -> int:
        return sum(len(e.requests) for e in self._engines)


class Replicas:
    """``devices`` (a count, the devices themselves, or None for every local device) engines of one model (with
    ``EngineConfig.tensor_parallel_size`` t > 1, each engine over t of the devices: a count is then of engines),
    driven from one thread: `step` steps each in turn, so one replica's host work overlaps the others' device
    calls (``EngineConfig.overlap``). The Engine's batch API (`add_request`, `step`, `abort`, `release`,
    `generate`, `stats`, `clear_prefix_cache`, a context manager), and what `jaxserve.async_engine.AsyncEngine`
    and the server read of an engine (`requests`, `structured_guide`, `max_model_len`...), so it serves too.

    Example:
        >>> with Replicas(jaxserve.load(), EngineConfig(max_running=64), devices=2) as dp:   # doctest: +SKIP
        ...     outs = dp.generate(prompts, SamplingParams(max_tokens=64, temperature=0))
    """

    def __init__(self, model: LoadedModel | str | None = None, config: EngineConfig | None = None,
                 devices: int | Sequence[jax.Device] | None = None, balance_slack: int = 8) -> None:
        config = config or EngineConfig()
        tp = config.tensor_parallel_size  # devices an engine splits its model over (`jaxserve.tensor_parallel`)
        available = jax.local_devices()
        if devices is None:
            devices = available[:len(available) - len(available) % tp]
        elif isinstance(devices, int):  # replicas
            if not 1 <= devices * tp <= len(available):
                raise ValueError(f"devices must be in [1, {len(available) // tp}] (the local devices"
                                 + (f" over tensor_parallel_size {tp}" if tp > 1 else "") + f"), got {devices}")
            devices = available[:devices * tp]
        devices = list(devices)
        if not devices:
            raise ValueError("devices must name at least one device")
        if len(devices) % tp:
            raise ValueError(f"{len(devices)} devices do not split into engines of tensor_parallel_size {tp}")
        if balance_slack < 0:
            raise ValueError(f"balance_slack must be >= 0, got {balance_slack}")
        if not isinstance(model, LoadedModel):
            model = load(model, dtype=config.compute_dtype(), device="cpu" if config.loads_on_host else None)
        self.config = config
        self.balance_slack = balance_slack
        groups = devices if tp == 1 else [devices[i:i + tp] for i in range(0, len(devices), tp)]
        # Each replica draws unseeded requests' seeds from its own stream (EngineConfig.seed + its index).
        configs = [config if config.seed is None else dataclasses.replace(config, seed=config.seed + k)
                   for k in range(len(groups))]
        self.engines = [Engine(model, c, device=group) for c, group in zip(configs, groups)]
        self.page_size = config.page_size
        # Per replica: chained hashes of the full prompt pages routed there, least recently used first.
        self._pages: list[collections.OrderedDict[int, None]] = [collections.OrderedDict() for _ in self.engines]
        self._owner: dict[str, int] = {}  # request id -> replica, until released
        self._load = [0] * len(self.engines)  # routed, not yet released
        self._ids = itertools.count()
        self.closed = False
        self.requests = _Requests(self.engines)
        self._failed: int | None = None  # the replica whose step raised last (`failed_step_requests`)
        first = self.engines[0]
        self.model, self.tokenizer, self.max_model_len = first.model, first.tokenizer, first.max_model_len
        self.sampling_defaults = first.sampling_defaults
        self.eos_ids = first.eos_ids

    # ----- routing -------------------------------------------------------------------------
    def _page_keys(self, ids: Sequence[int], lora_id: int = 0) -> list[int]:
        # An adapter's pages hold K/V of its own (each engine's prefix index keeps them apart): its chain starts
        # from its id, so its prompts follow its own earlier prompts, not the base model's.
        keys, h = [], hash(("lora", lora_id)) if lora_id else 0
        for start in range(0, len(ids) - len(ids) % self.page_size, self.page_size):
            h = hash((h, tuple(ids[start:start + self.page_size])))
            keys.append(h)
        return keys

    def route(self, prompt_ids: Sequence[int], lora_id: int = 0) -> int:
        """The replica a prompt of these token ids goes to (the module docstring's rule), with the adapter of id
        ``lora_id`` (0: none): its cached pages are its own."""
        keys = self._page_keys(prompt_ids, lora_id)
        held = []
        for pages in self._pages:
            n = 0
            while n < len(keys) and keys[n] in pages:
                n += 1
            held.append(n)
        least = min(self._load)
        best = max(range(len(self.engines)), key=lambda i: (held[i], -self._load[i]))
        if held[best] > 0 and self._load[best] <= least + self.balance_slack:
            return best
        return self._load.index(least)

    def _record(self, replica: int, prompt_ids: Sequence[int], lora_id: int = 0) -> None:
        pages = self._pages[replica]
        for key in self._page_keys(prompt_ids, lora_id):
            pages[key] = None
            pages.move_to_end(key)
        while len(pages) > self.engines[replica].scheduler.num_pages:
            pages.popitem(last=False)

    # ----- the Engine's batch API ------------------------------------------------------------
    def structured_guide(self, spec: StructuredOutputs) -> TokenGuide:
        """`Engine.structured_guide`, compiled once for every replica: they share the first one's token bytes,
        so the guide (cached by spec and vocabulary) is the same object in each; each writes it into its own
        device's guide pool when a decode call needs it."""
        guide = self.engines[0].structured_guide(spec)
        for engine in self.engines[1:]:
            engine._vocabulary = self.engines[0]._vocabulary
        return guide

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return self.engines[0].default_sampling_params(**overrides)

    def make_request(self, prompt: Prompt, params: SamplingParams | PoolingParams | None = None,
                     request_id: str | None = None, priority: int = 0, lora_request: Any = None) -> Request:
        """Route and validate a request (ValueError on bad input, nothing routed), without queueing it."""
        if self.closed:
            raise RuntimeError("replicas are closed")
        check_priority(priority, self.engines[0].config.scheduling_policy)
        if getattr(params, "structured_outputs", None) is not None:  # a PoolingParams has none
            self.structured_guide(params.structured_outputs)  # one compile, and the replicas share its vocabulary
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        lora_id = 0 if lora_request is None else lora_request.lora_int_id
        # A prompt given as embeddings is cached nowhere (its ids are placeholders): the least loaded takes it, and
        # its engine reads (and checks) the embeddings.
        embeds = isinstance(prompt, Mapping) and "prompt_embeds" in prompt
        ids = [] if embeds else self.request_ids(prompt, params or self.default_sampling_params())
        replica = self._load.index(min(self._load)) if embeds else self.route(ids, lora_id)
        request = self.engines[replica].make_request(prompt if embeds else ids, params, request_id, priority,
                                                     lora_request)
        self._owner[request_id] = replica
        self._load[replica] += 1
        if not embeds:
            self._record(replica, ids, lora_id)
        return request

    def request_ids(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """`Engine.request_ids` (every replica tokenizes alike)."""
        return self.engines[0].request_ids(prompt, params)

    def register_lora(self, lora_request: Any) -> None:
        """`Engine.register_lora` on every replica (each loads the adapters its requests name)."""
        for engine in self.engines:
            engine.register_lora(lora_request)

    def forget_lora(self, lora_id: int) -> None:
        for engine in self.engines:
            engine.forget_lora(lora_id)

    def _queue(self, request: Request) -> str:
        return self.engines[self._owner[request.request_id]]._queue(request)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0, lora_request: Any = None) -> str:
        """Route a prompt (text or token ids) to a replica and queue it there; returns its request id."""
        return self._queue(self.make_request(prompt, params, request_id, priority, lora_request))

    def replica_of(self, request_id: str) -> int | None:
        """The replica a request was routed to (None once released, or if unknown)."""
        return self._owner.get(request_id)

    def step(self) -> list[Request]:
        """One step of every replica with work; the requests that got new tokens or finished. A replica's step
        that raises ends this one (the exception propagates); `failed_step_requests` then names that replica's
        requests only, so a server fails them and the other replicas go on."""
        out: list[Request] = []
        for i, engine in enumerate(self.engines):
            if engine.has_unfinished():
                try:
                    out.extend(engine.step())
                except Exception:
                    self._failed = i
                    raise
        return out

    def stream(self) -> Iterator[Request]:
        while self.has_unfinished():
            yield from self.step()

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    def abort(self, request_id: str) -> bool:
        replica = self._owner.get(request_id)
        return replica is not None and self.engines[replica].abort(request_id)

    def abort_after_failure(self, request: Request) -> None:
        self.engines[self._owner[request.request_id]].abort_after_failure(request)

    def failed_step_requests(self) -> list[Request]:
        """The requests the last failed step may have touched: those of the replica whose step raised."""
        failed, self._failed = self._failed, None
        engines = self.engines if failed is None else [self.engines[failed]]
        return [r for e in engines for r in e.failed_step_requests()]

    def release(self, request_id: str) -> Request | None:
        """Forget a finished request (the caller has read its result)."""
        replica = self._owner.get(request_id)
        if replica is None:
            return None
        request = self.engines[replica].release(request_id)
        if request is not None and request_id not in self.engines[replica].requests:
            del self._owner[request_id]
            self._load[replica] -= 1
        return request

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: Any = None) -> list[dict[str, Any]]:
        """`Engine.generate` over the replicas: every prompt routed and validated first, then all run together;
        one result dict per prompt, in order."""
        return run_to_completion(self, prompts, sampling_params, use_tqdm, priority, lora_request)

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True, priority: Sequence[int] | None = None,
              lora_request: Any = None) -> list[dict[str, Any]]:
        """`Engine.embed` over the replicas."""
        return run_to_completion(self, prompts, embed_params(pooling_params), use_tqdm, priority, lora_request)

    def classify(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: Any = None) -> list[dict[str, Any]]:
        """`Engine.classify` over the replicas."""
        return run_to_completion(self, prompts, classify_params(pooling_params), use_tqdm, priority, lora_request)

    def score(self, text_1: Any, text_2: Any, pooling_params: PoolingParams | None = None, use_tqdm: bool = True,
              lora_request: Any = None) -> list[dict[str, Any]]:
        """`Engine.score` over the replicas."""
        return run_score(self, text_1, text_2, pooling_params, use_tqdm, lora_request)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             **template_options: Any) -> list[dict[str, Any]]:
        """`Engine.chat` over the replicas (``template_options``: `jaxserve.engine.run_chat`'s)."""
        return run_chat(self, messages, sampling_params, use_tqdm, **template_options)

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: Any, use_tqdm: bool = True) -> list[dict[str, Any]]:
        """`Engine.beam_search` over the replicas (a beam's request follows its parent's pages by the router's
        prefix rule)."""
        from jaxserve.beam_search import run_beam_search

        return run_beam_search(self, prompts, params, use_tqdm)

    def stats(self) -> dict[str, Any]:
        """Each replica's `Engine.stats` (``replicas``); at the top, as one engine's: the sums of their counts,
        times and rates, and the mean prefix hit rate."""
        per = [e.stats() for e in self.engines]
        out: dict[str, Any] = {k: sum(s[k] for s in per) for k in per[0]
                               if all(isinstance(s.get(k), (int, float)) for s in per)}
        out["prefix_hit_rate"] = sum(s["prefix_hit_rate"] for s in per) / len(per)
        return {**out, "replicas": per, "routed": list(self._load)}

    def warmup(self, sampling: bool = True, logprobs: bool = False, structured: bool = False,
               lora: bool | None = None, pooling: bool = False, compile_threads: int | None = None) -> int:
        """`Engine.warmup` on every replica (each device compiles its own programs); the shapes compiled."""
        return sum(e.warmup(sampling=sampling, logprobs=logprobs, structured=structured, lora=lora, pooling=pooling,
                            compile_threads=compile_threads) for e in self.engines)

    def clear_prefix_cache(self) -> None:
        for engine in self.engines:
            engine.clear_prefix_cache()
        self._forget_routes()

    def _forget_routes(self) -> None:
        """The router's record of the prefixes each replica holds, emptied as the replicas' caches are."""
        for pages in self._pages:
            pages.clear()

    def update_params(self, params: Any, copy: bool = False) -> None:
        """`Engine.update_params` on every replica (each device its own copy; ``copy`` as the engine's); the router
        forgets its prefixes, as the replicas' caches do."""
        for engine in self.engines:
            engine.update_params(params, copy=copy)
        self._forget_routes()

    def check_params_alive(self) -> None:
        """`Engine.check_params_alive` on every replica."""
        for engine in self.engines:
            engine.check_params_alive()

    def sleep(self, level: int = 1) -> None:
        """`Engine.sleep` on every replica, refused before any sleeps while one has unfinished requests."""
        if self.has_unfinished():
            raise ValueError("sleep needs idle replicas: requests are unfinished (let them finish or abort them)")
        for engine in self.engines:
            engine.sleep(level)
        self._forget_routes()

    def wake_up(self, params: Any = None) -> None:
        """`Engine.wake_up` on every replica."""
        for engine in self.engines:
            engine.wake_up(params)

    @property
    def sleeping(self) -> int:
        """The deepest sleep level of the replicas (0: all awake)."""
        return max(engine.sleeping for engine in self.engines)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        self.closed = True

    def __enter__(self) -> "Replicas":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
