"""Prometheus metrics of one server: request outcomes, token counts, latencies, engine gauges and
the engine's cumulative time split.

Owns the collectors, each in a ``CollectorRegistry`` of its own (so two apps in one process,
as in the tests, never clash), and the text exposition. It never reads the engine itself:
the async engine reports finished requests (``observe_finished``) and the server hands it
``Engine.stats()`` at scrape time (``set_engine_stats``).
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Latency buckets in seconds: CPU tests sit at the top end, a GPU decode step at the bottom.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


# Parts of the engine thread's step() wall time (Engine.stats() keys); they add up to it.
_STEP_PARTS = (("prefill_call", "prefill_call_s"), ("decode_wait", "decode_call_s"), ("host", "host_s"))


class _EngineTotals(Collector):
    """The engine's cumulative totals from the last ``Engine.stats()``, exposed as counters.

    They are counters, not gauges, because the engine only ever adds to them, so ``rate()``
    and ``increase()`` are the meaningful queries (a benchmark takes the difference between two
    scrapes). ``prometheus_client.Counter`` can only ``inc()``, while the engine hands over
    running totals, so they are yielded from the snapshot at collection time instead.
    """

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None  # nothing is exposed before the first snapshot

    def collect(self) -> Iterator[Metric]:
        st = self.stats
        if st is None:
            return
        step = CounterMetricFamily(
            "jaxserve_engine_step_seconds",
            "Wall time of the engine's step() by part: prefill device calls, waiting for decode results, "
            "and host work (scheduling, inputs, bookkeeping, decode dispatch); the parts add up to step().",
            labels=["part"])
        for part, key in _STEP_PARTS:
            step.add_metric([part], float(st.get(key, 0.0)))
        yield step
        # A separate series, not a fourth part: it is included in part="host", and summing over
        # `part` must give step()'s wall time.
        yield CounterMetricFamily("jaxserve_engine_prefix_index_seconds",
                                  "Radix prefix-index work (match at admission, insert at release); inside step() it "
                                  "is part of part=\"host\" (aborts between steps add a little outside it).",
                                  value=float(st.get("prefix_index_s", 0.0)))
        yield CounterMetricFamily("jaxserve_engine_overlapped_decode_calls",
                                  "Decode calls dispatched before the previous call's tokens were read.",
                                  value=float(st.get("overlapped_decode_calls", 0)))
        yield CounterMetricFamily("jaxserve_engine_overlapped_prefill_calls",
                                  "Prefill calls dispatched before the previous prefill's first tokens were read.",
                                  value=float(st.get("overlapped_prefill_calls", 0)))
        yield CounterMetricFamily("jaxserve_engine_decode_calls_after_prefill",
                                  "Decode calls dispatched before the last prefill's first tokens were read, "
                                  "starting from them on the device.",
                                  value=float(st.get("decode_calls_after_prefill", 0)))
        for key, what in (("spec_verify_calls", "Speculative decoding's verify calls (EngineConfig.speculative_tokens)."),
                          ("spec_draft_tokens", "Draft tokens speculative decoding sent to verify calls."),
                          ("spec_accepted_tokens", "Draft tokens the verify calls accepted (each a token without a "
                                                   "step of its own).")):
            yield CounterMetricFamily(f"jaxserve_engine_{key}", what, value=float(st.get(key, 0)))
        yield CounterMetricFamily("jaxserve_engine_generated_tokens",
                                  "Tokens sampled by the engine (running, finished and aborted requests).",
                                  value=float(st.get("generated_tokens", 0)))
        yield CounterMetricFamily("jaxserve_engine_prefill_tokens",
                                  "Prompt tokens computed by prefill (cached prefixes excluded, recomputation "
                                  "after preemption included).", value=float(st.get("prefill_tokens", 0)))
        for key, what in (("lora_adapters_loaded", "LoRA adapters on the device (EngineConfig.max_loras slots)."),
                          ("lora_slots_held", "LoRA slots held by running requests.")):
            if key in st:
                yield GaugeMetricFamily(f"jaxserve_{key}", what, value=float(st[key]))
        if "api_servers" in st:  # an engine process's: its server processes (--api-server-count), each one's share
            yield GaugeMetricFamily("jaxserve_api_servers", "Server processes the engine serves (--api-server-count; "
                                    "one whose process died no longer counts).", value=float(st["api_servers"]))
            shares = CounterMetricFamily("jaxserve_api_server_requests",
                                         "Requests each server process submitted to the engine (server 0: the process "
                                         "that started it; --api-server-count).", labels=["server"])
            for server, count in enumerate(st["api_server_requests"]):
                shares.add_metric([str(server)], float(count))
            yield shares
        # A gauge: the number of distinct step shapes compiled so far, a level rather than a flow.
        yield GaugeMetricFamily("jaxserve_compiled_step_shapes",
                                "Distinct step shapes the engine has run (each compiled once a process: engines "
                                "alike share them).",
                                value=float(st.get("compilations", 0)))


class ServingMetrics:
    """The ``jaxserve_*`` metrics. With several server processes over one engine (``--api-server-count``), each
    process's collectors see every finished request (the engine's process sends each result to all of them), so a
    scrape of any one process counts all requests.

    Example:
        >>> m = ServingMetrics()
        >>> m.observe_finished({"finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 3,
        ...                     "cached_tokens": 0, "ttft": 0.1, "tpot": 0.01, "total_time": 0.2})
        >>> b"jaxserve_requests_total" in m.exposition()
        True
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxserve_requests", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_tokens = Counter("jaxserve_cached_prompt_tokens",
                                     "Prompt tokens served from the prefix cache.", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("jaxserve_time_per_output_token_seconds",
                              "Mean time between output tokens of a request.", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("jaxserve_request_latency_seconds", "Arrival to finish.", buckets=_E2E_BUCKETS,
                             registry=r)
        self.running = Gauge("jaxserve_requests_running", "Requests holding a sequence slot.", registry=r)
        self.waiting = Gauge("jaxserve_requests_waiting", "Requests queued for admission.", registry=r)
        self.pages_used = Gauge("jaxserve_kv_pages_used", "KV pages in use (requests and cached prefixes).",
                                registry=r)
        self.pages_total = Gauge("jaxserve_kv_pages_total", "KV pages in the pool.", registry=r)
        self.hit_rate = Gauge("jaxserve_prefix_cache_hit_rate",
                              "Prompt tokens found in the prefix cache / prompt tokens looked up.", registry=r)
        self.preemptions = Gauge("jaxserve_preemptions", "Requests preempted so far (recomputed later).",
                                 registry=r)
        self.engine_totals = _EngineTotals()
        r.register(self.engine_totals)

    def observe_finished(self, result: dict[str, Any]) -> None:
        """Count one finished request (a ``Request.result()`` dict); safe from any thread."""
        self.requests.labels(finish_reason=result["finish_reason"] or "unknown").inc()
        self.prompt_tokens.inc(result["prompt_tokens"])
        self.cached_tokens.inc(result.get("cached_tokens") or 0)
        self.generation_tokens.inc(result.get("completion_tokens", 0))  # an embedding has none
        if result.get("ttft") is not None:
            self.ttft.observe(result["ttft"])
        if result.get("tpot") is not None:
            self.tpot.observe(result["tpot"])
        if result.get("total_time") is not None:
            self.e2e.observe(result["total_time"])

    def set_engine_stats(self, stats: dict[str, Any]) -> None:
        """Copy ``Engine.stats()`` into the gauges and the engine's cumulative counters.

        Example:
            >>> m = ServingMetrics()
            >>> m.set_engine_stats({"running": 1, "waiting": 0, "pages_used": 4, "pages_total": 64,
            ...                     "prefix_hit_rate": 0.0, "preemptions": 0, "host_s": 0.5, "compilations": 2})
            >>> b'jaxserve_engine_step_seconds_total{part="host"} 0.5' in m.exposition()
            True
        """
        self.engine_totals.stats = dict(stats)
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.pages_used.set(stats["pages_used"])
        self.pages_total.set(stats["pages_total"])
        self.hit_rate.set(stats["prefix_hit_rate"])
        self.preemptions.set(stats["preemptions"])

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
