"""The engine loop and ``jaxserve.generate``: requests in, finished results out.

Owns request validation, the step loop (scheduler plan -> runner call -> tokens appended to
requests -> finished requests released) and statistics. It never decides admission
(scheduler), never touches device arrays beyond handing them to the runner, and is not
thread-safe: one thread (the async engine's loop, or the caller) drives it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import operator
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.beam_search import BeamSearchParams, run_beam_search
from jaxserve.config import CLASSIFIER
from jaxserve.engine_config import EngineConfig
from jaxserve.guide_pool import GuidePool
from jaxserve.loading import LoadedModel, generation_eos_ids, generation_sampling_defaults, load
from jaxserve.lora import NAMESPACE_STRIDE, LoRARequest, LoraSlots
from jaxserve import model as model_module
from jaxserve.model import decode_rows
from jaxserve.pooling import (PoolingParams, classify_params, cross_encoder_prompt, embed_params, finish_classification,
                              finish_embedding, pair_scores, score_pairs, text_key)
from jaxserve.quantization import cast_params, quantize_params
from jaxserve.request import THINK_END, THINK_START, Request, Status, ThinkBudget, cache_salt_keys
from jaxserve.runner import Runner, default_attention_impl, enable_compile_cache
from jaxserve.sampling import (SamplingParams, allowed_masks, check_bad_word_ids, check_banned_ids, logprob_id_array,
                               make_batch, needs_history, needs_penalties, needs_sampling, recent_tokens, sample_seed)
from jaxserve.scheduler import Scheduler
from jaxserve.speculative import accepted_tokens, ngram_draft
from jaxserve.structured import GuideState, StructuredOutputs, TokenGuide, Vocabulary, compile_guide
from jaxserve.tensor_parallel import TensorParallel
from jaxserve.tokenizer import Conversation, IncrementalDetokenizer, bad_words_token_ids, chat_prompts, vocabulary_bytes

log = logging.getLogger("jaxserve.engine")

# Text, token ids, or vLLM's prompt dicts: {"prompt": text}, {"prompt_token_ids": ids}, {"prompt_embeds": [n, hidden]},
# each with an optional "cache_salt" (vLLM's: its prefixes are cached apart from other salts', `cache_salt_keys`).
Prompt = str | Sequence[int] | Mapping[str, Any]
PROMPT_KEYS = ("prompt", "prompt_token_ids", "prompt_embeds")
PROMPT_OPTIONS = ("cache_salt",)
MAX_TOP_LOGPROBS = 20
# Structured outputs are followed on the device (several steps a call) while the tables of a decode call's
# guides (2 bytes a state and token, 4 a state and 32 tokens) fit in this; past it, one step a call with masks
# from the host. The most `GuidePool` holds on the device. JAXSERVE_DEVICE_GUIDE_BYTES sets it.
DEVICE_GUIDE_BYTES = int(os.environ.get("JAXSERVE_DEVICE_GUIDE_BYTES", str(1 << 30)))


def _check_prompt_dict(prompt: Mapping) -> None:
    if len(set(prompt) & set(PROMPT_KEYS)) != 1 or set(prompt) - set(PROMPT_KEYS) - set(PROMPT_OPTIONS):
        raise ValueError(f"a prompt dict holds exactly one of {PROMPT_KEYS} (and optionally {PROMPT_OPTIONS}), "
                         f"got keys {sorted(prompt)}")


def _salt_keys(prompt: Prompt, lora_namespace: int, vocab_size: int) -> tuple[int, ...]:
    """A prompt dict's ``cache_salt`` as its request's index namespaces (`request.cache_salt_keys`); () unsalted."""
    if not isinstance(prompt, Mapping) or prompt.get("cache_salt") is None:
        return ()
    if vocab_size > NAMESPACE_STRIDE:  # a namespaced key must not be another namespace's token
        raise ValueError(f"cache_salt takes vocabularies of at most {NAMESPACE_STRIDE} tokens, got {vocab_size}")
    return cache_salt_keys(prompt["cache_salt"], lora_namespace)


def prompt_embeds_array(value: Any, hidden: int) -> np.ndarray:
    """``prompt_embeds`` as float32 ``[n, hidden]`` (any array: numpy, JAX, torch); ValueError naming it if bad."""
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 ones have no numpy twin)
        if value.is_complex():
            raise ValueError(f"prompt_embeds must be real numbers, got {value.dtype}")
        value = value.detach().float().cpu().numpy()
    if np.iscomplexobj(value):  # the cast below would drop the imaginary part with a warning
        raise ValueError(f"prompt_embeds must be real numbers, got {np.asarray(value).dtype}")
    try:
        with np.errstate(over="ignore"):  # a float64 past float32's range: refused as not finite just below
            embeds = np.asarray(value, np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"prompt_embeds must be an array of shape [tokens, {hidden}], got {type(value).__name__}")
    if embeds.ndim != 2 or embeds.shape[1] != hidden or not embeds.shape[0]:
        raise ValueError(f"prompt_embeds must be an array of shape [tokens >= 1, {hidden}] (the model's hidden size), "
                         f"got {embeds.shape}")
    if not np.isfinite(embeds).all():
        raise ValueError("prompt_embeds must be finite")
    return embeds


def _pages_from_memory(config: EngineConfig, bytes_per_page: int, device: jax.Device | None = None,
                       tp: TensorParallel | None = None) -> int:
    if tp is not None:  # each device holds its share of every page: the least free one bounds them
        free = tp.free_bytes(config.memory_fraction)
        return 1024 if free is None else max(16, free // bytes_per_page)
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return 1024
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return max(16, int(free * config.memory_fraction) // bytes_per_page)


@dataclasses.dataclass
class _Decode:
    """A dispatched multi-step decode call: its rows, device outputs and the positions it covers."""

    reqs: list[Request]
    out: Any
    positions: np.ndarray
    limits: np.ndarray
    num_steps: int
    penalties: bool
    last: Any = None  # the last step's tokens [B], on the device: a chained call's input (with guides, and states)
    # The prefill call whose first tokens this call started from on the device (_can_follow_prefill),
    # still to be read: the next step() reads it before anything else.
    after: "_Prefill | None" = None
    shape: "DecodeShape | None" = None
    guided: bool = False  # its rows followed structured outputs on the device (a chained call may continue them)


# What a pooling request runs as (`Engine._pooling_request`): one greedy token, which is never taken.
_POOLING_STEP = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


@dataclasses.dataclass
class _Prefill:
    """A dispatched prefill call: its rows ``(request, start, end)`` and device outputs."""

    rows: list[tuple[Request, int, int]]
    out: Any
    # Rows owed prompt log-probabilities: (row index, first prompt position, end) this call fills.
    prompt_rows: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    prompt_out: Any = None  # their `PromptLogprobs`, on the device
    pool_rows: list[int] = dataclasses.field(default_factory=list)  # pooling rows (`jaxserve.pooling`)
    pool_out: Any = None  # their pooled hidden states, on the device

    def finishing(self) -> dict[int, int]:
        """The rows whose prompt this call finishes (it samples their first token): id -> index."""
        return {id(r): i for i, (r, _, e) in enumerate(self.rows) if e == r.prefill_end}


# Chained decode calls go on past rows that finish (`Engine._chain_rows`): off, a call after one in which a row ended
# waits for the host to read it, schedule and dispatch. H100, session 55 (bench/results/ragged_finish.md): rows of
# ragged lengths +17% tokens/s at 64 rows, +15% at 256; JSON-constrained rows +8%. Read at each chaining decision;
# JAXSERVE_CHAIN_PAST_FINISHES=0 turns it off.
CHAIN_PAST_FINISHES = os.environ.get("JAXSERVE_CHAIN_PAST_FINISHES", "1") == "1"
# Under prefill_first, waiting prompts' prefill goes to the device behind the decode call in flight, before the host
# reads it (`Engine._prefill_behind`); off, the host reads the decode first, then schedules and dispatches. H100,
# session 55 (bench/results/policies_h200.md, 96 requests at 64/s): TTFT p50 203 -> 5.6 ms, 1,530 -> 1,812 tokens/s.
# JAXSERVE_PREFILL_BEHIND_DECODE=0 turns it off.
PREFILL_BEHIND_DECODE = os.environ.get("JAXSERVE_PREFILL_BEHIND_DECODE", "1") == "1"
# `Engine.warmup`'s default compile threads. A server's ~100 step shapes compiled one after the other took minutes on
# an H100 (~3 s a shape; bench/results/serving_stream_h100.md, session 73), while XLA's compile runs without the GIL;
# on the 2-core CPU threads gained nothing (bench/warmup.py --threads, session 74), and the GPU run that decides the
# default (gpu_checks.sh warm74) has not run. Read when the module loads.
COMPILE_THREADS = int(os.environ.get("JAXSERVE_COMPILE_THREADS", "1"))


@jax.jit
def _gather_rows(last: Any, rows: jax.Array) -> Any:
    """A chained call's input tokens (and guide states) from the call it follows, ``rows`` picking each of its rows'
    (rows that dropped out left gaps: `Engine._chain_rows`). One dispatch, no host read."""
    return jax.tree_util.tree_map(lambda a: a[rows], last)


@jax.jit
def _first_tokens(host: jax.Array, prefill_tokens: jax.Array, source: jax.Array, owed: jax.Array) -> jax.Array:
    """A decode call's input tokens: ``host``'s, but ``prefill_tokens[source]`` where ``owed``
    (rows whose first token a prefill call in flight samples). One dispatch, no host read."""
    return jnp.where(owed, prefill_tokens[source], host)


def _check_in_vocab(ids: Sequence[int], vocab: int, what: str) -> None:
    """ValueError `"{what} in [0, vocab), got <the first bad ids>"` when some id is outside the vocabulary.
    min/max first: the per-id scan only when something is out of range (a batch-256 generate validates
    32k prompt ids before its first step, with nothing on the device yet)."""
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        bad = [t for t in ids if not 0 <= t < vocab]
        raise ValueError(f"{what} in [0, {vocab}), got {bad[:5]}")


# Each decode block-table width past the narrow one is this many times the one before (until the full
# `max_pages`). Why: a split decode call sizes its splits from the table's width, so a short row in a table as
# wide as the model's length launches mostly empty splits and merges them all. H200, Qwen2.5-0.5B at 1,088 keys
# (session 37, bench/results/decode_step.md): batch 1 0.598 ms in a 70-page table, 0.604 in 256 pages, 0.630-0.634
# in the 2048 pages of a 32k model; batch 8 0.724 against 0.747 (70 / 2048 pages), a tie in another call (its split
# count is capped by the programs wanted, the same at 256 pages as at 2048). So a middle width is kept only for the
# batch buckets whose split count it changes (batch 1-4 at Qwen2.5-0.5B's heads, 1 at 7B's): one more compiled
# decode shape each. x16 keeps a 32k model at three widths at most, a 128k one at four.
DECODE_TABLE_GROWTH = 16


def _decode_table_widths(page_size: int, max_pages: int, splits_of=None) -> tuple[int, ...]:
    """Block-table widths (pages) of decode calls: a narrow one, wider ones `DECODE_TABLE_GROWTH` times apart,
    and the full ``max_pages``; with ``splits_of`` (a width's split count in the decode kernels), only the
    middle widths that the kernels would split otherwise than the next wider width.

    A call whose rows all fit in ``jaxserve_kernels.paged_attention.SINGLE_PASS_KEYS`` keys gets a table
    that narrow, which the decode kernels read in one unsplit pass with no split-merge launch;
    a table as wide as the model's length (2048 pages at 32k) makes them split even a short
    row and merge the splits: +3% a step at batch 1 and 16, +6% at 64 on the H200
    (bench/results/decode_step.md, session 13), +5% at batch 1 over 1,088 keys (session 37), hence the
    widths between. One more compiled decode shape per width and bucket.

    Example:
        >>> _decode_table_widths(16, 2048), _decode_table_widths(16, 10), _decode_table_widths(16, 300)
        ((16, 256, 2048), (10,), (16, 300))
        >>> _decode_table_widths(16, 2048, lambda w: min(w // 8, 32))  # 32 splits at 256 pages and at 2048
        (16, 2048)
    """
    from jaxserve_kernels.paged_attention import SINGLE_PASS_KEYS

    widths = [max(1, SINGLE_PASS_KEYS // page_size)]
    # A width within 2x of the full table would be one more compile for little.
    while widths[-1] * DECODE_TABLE_GROWTH * 2 <= max_pages:
        widths.append(widths[-1] * DECODE_TABLE_GROWTH)
    widths = [w for w in widths if w < max_pages] + [max_pages]
    if splits_of is not None and len(widths) > 2:
        # Where the split count is capped by the programs wanted (wider batches), a middle width splits as the
        # full table does: one more compiled shape for nothing.
        kept = [widths[-1]]
        for width in reversed(widths[1:-1]):
            if splits_of(width) != splits_of(kept[-1]):
                kept.append(width)
        widths = [widths[0], *reversed(kept)]
    return tuple(widths)


def _decode_tuning(page_size: int, head_dim: int, kv_heads: int, rows: int, width: int) -> tuple[int, int]:
    """``(pages a loop iteration, splits)`` the decode kernels give a call of ``rows`` rows and a ``width``-page
    block table (one split where they run interpreted, on the CPU)."""
    from jaxserve_kernels import pallas_compat
    from jaxserve_kernels.paged_attention import DECODE_BLOCK_KEYS, resolve_tuning

    return resolve_tuning(page_size, width, rows * kv_heads, None, None, pallas_compat.resolve_interpret(None),
                          DECODE_BLOCK_KEYS, head_dim=head_dim, single_pass=True)


def _splits_used(pages_per_block: int, splits: int, pages: int) -> int:
    """How many of a decode call's ``splits`` hold keys when its longest row holds ``pages`` pages: the kernels
    size every split from the longest row (`jaxserve_kernels.paged_attention.split_pages`).

    Example:
        >>> _splits_used(8, 256, 1024), _splits_used(8, 32, 1024), _splits_used(8, 32, 64)
        (128, 32, 8)
    """
    from jaxserve_kernels.paged_attention import split_pages

    return 1 if splits == 1 else -(-pages // split_pages(pages, splits, pages_per_block))


class DecodeShape(NamedTuple):
    """A decode call's shape (`Engine.decode_shape`)."""

    batch: int  # rows the call runs, padding included
    width: int  # pages in its block table
    live: int  # rows whose attention runs; past them, padding (`model.PagedAttention.live_rows`)


def _on_device(method):
    """Run ``method`` with the engine's device as JAX's default (`Engine.device`): the arrays it makes
    (inputs, pool state, guide tables) land there, not on the first device, so replicas on other devices
    never copy them across each call."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if self.device is None:
            return method(self, *args, **kwargs)
        with jax.default_device(self.device):
            return method(self, *args, **kwargs)

    return wrapped


class Engine:
    """Continuous batching over the paged KV pool.

    ``device``: the JAX device whose memory holds this engine's weights and KV pool and that runs its steps
    (default: JAX's default device); `jaxserve.replicas.Replicas` runs one engine a device.

    Example:
        >>> with Engine(jaxserve.load(), EngineConfig(max_running=8)) as engine:   # doctest: +SKIP
        ...     rid = engine.add_request("def fib(n):", SamplingParams(max_tokens=16, temperature=0))
        ...     while engine.has_unfinished():
        ...         for req in engine.step():
        ...             print(req.request_id, req.take_delta())
    """

    def __init__(self, model: LoadedModel | str | os.PathLike | None = None,
                 config: EngineConfig | None = None,
                 device: jax.Device | Sequence[jax.Device] | None = None) -> None:
        tp_size = (config or EngineConfig()).tensor_parallel_size
        self.tp: TensorParallel | None = None
        if tp_size > 1:  # the devices the model splits over: ``device`` (a group of them) or this host's first
            group = list(device) if isinstance(device, Sequence) else None
            if group is None and device is not None:
                raise ValueError(f"tensor_parallel_size {tp_size} needs a group of {tp_size} devices, got one device")
            if group is None:
                group = jax.local_devices()[:tp_size]
            if len(group) != tp_size:
                raise ValueError(f"tensor_parallel_size {tp_size} needs {tp_size} devices, got {len(group)} "
                                 f"(this host has {len(jax.local_devices())})")
            self.tp = TensorParallel.over(group)
            device = group[0] if isinstance(device, Sequence) else None
        elif isinstance(device, Sequence):
            if len(device) != 1:
                raise ValueError(f"device: {len(device)} devices given, but tensor_parallel_size is 1")
            device = device[0]
        self.device = device
        self._init(model, config)

    @_on_device
    def _init(self, model: LoadedModel | str | os.PathLike | None, config: EngineConfig | None) -> None:
        if config is not None and config.compile_cache_dir:
            enable_compile_cache(config.compile_cache_dir)
        if isinstance(model, Mapping):  # a params tree alone says nothing of its heads or tokenizer
            raise ValueError("model is a params tree: pass jaxserve.LoadedModel.from_params(params, model_config) "
                             "(with a tokenizer for text prompts), a checkpoint folder, or a loaded model")
        config = config or EngineConfig()
        on_host = not isinstance(model, LoadedModel) and config.loads_on_host
        if not isinstance(model, LoadedModel):
            model = load(model, dtype=config.compute_dtype(), device="cpu" if on_host else None)
        self.config = config
        self._seeds = None if config.seed is None else np.random.default_rng(config.seed)
        self.model = model
        self.tokenizer = model.tokenizer
        mcfg = model.config
        target = jnp.dtype(self.config.compute_dtype())
        params = self._prepared(model.params, on_host)
        self.sleeping = 0  # `sleep`'s level while asleep
        if self.config.max_model_len is not None and self.config.max_model_len > mcfg.context_length:
            # vLLM refuses it too: positions past the model's own length were never trained (and RoPE tables end).
            raise ValueError(f"max_model_len ({self.config.max_model_len}) is larger than the model's context length "
                             f"({mcfg.context_length})")
        self.max_model_len = self.config.max_model_len or mcfg.context_length
        # A page's bytes on each device: its share of the KV heads under tensor parallelism.
        kv_heads = (mcfg if self.tp is None else self.tp.local_config(mcfg)).num_key_value_heads
        bytes_per_page = (2 * mcfg.num_hidden_layers * kv_heads * self.config.page_size * mcfg.head_dim
                          * jnp.dtype(self.config.kv_dtype()).itemsize)
        num_pages = self.config.num_pages or _pages_from_memory(self.config, bytes_per_page, self.device, self.tp)
        impl = self.config.attention_impl
        self.runner = Runner(mcfg, params, num_pages=num_pages, page_size=self.config.page_size,
                             attention_impl=default_attention_impl() if impl == "auto" else impl,
                             tensor_parallel=self.tp, kv_dtype=self.config.kv_dtype())
        self.lora = None
        if self.config.max_loras:
            if mcfg.vocab_size > NAMESPACE_STRIDE:  # `Request.index_ids` keeps adapters' prefixes apart past these
                raise ValueError(f"LoRA serving takes vocabularies of at most {NAMESPACE_STRIDE} tokens, "
                                 f"got {mcfg.vocab_size}")
            self.lora = LoraSlots(mcfg, self.config.max_loras, self.config.max_lora_rank, target, self.device,
                                  self.tp, folded=model_module.lora_folds_on_mgpu(target))
        self.scheduler = Scheduler(self.config, num_pages, self.max_model_len, lora=self.lora)
        # The batch a decode call of n rows runs as: the smallest bucket holding model.decode_rows(n) (small steps
        # may run faster padded). A padded width past the largest bucket (max_running under 8 on the GPU) runs as
        # a decode-only shape of its own: padding rows hold no page and write nothing, so max_running still bounds
        # the sequences and the pool.
        # A call with adapter rows may pad where one without does not (`decode_rows`' ``adapters``).
        buckets = self.config.batch_buckets

        def padded(adapters: bool) -> dict[int, int]:
            rows = {n: decode_rows(n, mcfg, target, self.runner.attention_impl, adapters)
                    for n in range(1, buckets[-1] + 1)}
            return {n: EngineConfig.bucket(buckets, r) if r <= buckets[-1] else r for n, r in rows.items()}

        self._decode_batch = {False: padded(False)}
        self._decode_batch[True] = padded(True) if self.lora is not None else self._decode_batch[False]
        self.decode_buckets = tuple(sorted({b for batches in self._decode_batch.values() for b in batches.values()}))
        # (rows, table width) -> the decode kernels' (pages a loop iteration, splits).
        self._tuning = functools.cache(functools.partial(_decode_tuning, self.config.page_size, mcfg.head_dim,
                                                         kv_heads))
        # Per batch bucket and decode-only shape (a middle width pays only where it changes the split count).
        self._decode_widths = {
            rows: _decode_table_widths(self.config.page_size, self.scheduler.max_pages_per_seq,
                                       lambda width, rows=rows: self._tuning(rows, width)[1])
            for rows in sorted(set(buckets) | set(self.decode_buckets))}
        self.decode_table_widths = tuple(sorted({w for ws in self._decode_widths.values() for w in ws}))
        # model.PAD_LIVE_ROWS: where padding would cut the rows' attention splits, the padded call runs only its
        # real rows' attention (the Pallas kernels' live_rows) instead of running unpadded.
        self._live_rows = model_module.PAD_LIVE_ROWS and self.runner.attention_impl == "pallas"
        # Every decode shape a call can take (warm-up compiles them): every decode bucket's widths (a chained call
        # keeps its padded batch), and where padding would cut the rows' attention splits (decode_shape), the
        # padded batch's live-rows calls or, without live rows, the rows' own bucket, at that bucket's widths.
        # (Those only adapter rows' calls take: warm-up compiles them with the adapters' inputs alone.)
        shapes = {DecodeShape(b, w, b) for b in self.decode_buckets for w in self._decode_widths[b]}

        def padded_shapes(adapters: bool) -> set[DecodeShape]:
            out = set()
            for n, wide in self._decode_batch[adapters].items():
                natural = EngineConfig.bucket(buckets, n)
                if wide != natural:
                    edges = sorted(set(self._decode_widths[natural]) | set(self._decode_widths[wide]))
                    out |= {self._decode_shape_for_pages(n, pages, adapters) for pages in edges}
            return out

        self._decode_shapes = tuple(sorted(shapes | padded_shapes(False)))
        adapter_shapes = padded_shapes(True) if self.lora is not None else set()
        self._adapter_decode_shapes = tuple(sorted(adapter_shapes - set(self._decode_shapes)))
        eos = set(mcfg.eos_token_ids) | set(generation_eos_ids(model.path))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        # vLLM's EOS is the tokenizer's: it ends a request with no stop_reason, and the model's other EOS ids
        # (generation_config.json's) are stop ids there, named (`Request.named_eos`); with no tokenizer, all are.
        primary_eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self._named_eos = frozenset(self.eos_ids) - {primary_eos}
        # The checkpoint's own sampling (generation_config.json), for requests that bring none.
        self.sampling_defaults = generation_sampling_defaults(model.path)
        self._sampling_cache: tuple | None = None
        self._vocabulary: Vocabulary | None = None  # token bytes for structured outputs, built at the first use
        # A server compiles constraints on several threads: one vocabulary (compile_guide's cache keys on it).
        self._vocabulary_lock = threading.Lock()
        # Structured outputs followed on the device (`_guide_tables`): every guide's tables at an offset of one
        # pair of arrays, allocated at the first constrained decode call.
        self.guide_pool = GuidePool(mcfg.vocab_size, self.eos_ids, DEVICE_GUIDE_BYTES)
        self.requests: dict[str, Request] = {}
        self._pending: _Decode | None = None  # a decode call dispatched but not yet read
        self._pending_prefill: _Prefill | None = None  # likewise, a prefill call
        self.chained_calls = 0
        self.chained_calls_dropping_rows = 0
        self.prefill_calls_behind_decode = 0
        self.overlapped_prefill_calls = 0
        self.decode_calls_after_prefill = 0
        # Speculative decoding (EngineConfig.speculative_tokens): verify calls, draft tokens sent, drafts accepted.
        self.spec = {"verify_calls": 0, "draft_tokens": 0, "accepted_tokens": 0}
        self._ids = itertools.count()
        self._started = time.perf_counter()
        self.generated_tokens = 0
        self.prefill_tokens = 0
        # Wall time split: device calls (dispatch to results on the host) vs everything else in step().
        self.time_s = {"prefill": 0.0, "decode": 0.0, "step": 0.0}
        self.closed = False
        # True: a request whose max_tokens would pass max_model_len runs up to it ("length"), as vLLM's offline
        # engine does (`jaxserve.LLM` sets it); False (jaxserve's and vLLM's server's rule): refused naming both.
        self.cap_max_tokens = False
        self._refused: list[Request] = []  # ended when added (`_queue`), until a step hands them out
        # What the engine's own request ids start with ("req-0", ...); `jaxserve.LLM` numbers them bare, as vLLM's.
        self.request_id_prefix = "req-"

    # ----- requests ------------------------------------------------------------------------
    def request_ids(self, prompt: Prompt, params: SamplingParams | PoolingParams) -> list[int]:
        """The token ids a request of ``prompt`` runs on: tokenized (or checked against the vocabulary) and cut
        to its last ``params.truncate_prompt_tokens`` (a chat's newest turns are its end). ValueError if bad."""
        ids = self._prompt_ids(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-self._truncation(params):]
        return ids

    def _truncation(self, params: SamplingParams | PoolingParams) -> int:
        # Under `cap_max_tokens` max_tokens is cut to what the prompt leaves, so the prompt keeps all but one; an
        # embedding runs as a one-token request (`_pooling_request`).
        reserve = params.max_tokens if isinstance(params, SamplingParams) and not self.cap_max_tokens else None
        return truncation(params.truncate_prompt_tokens, self.max_model_len, reserve)

    def _prompt_input(self, prompt: Prompt, params: SamplingParams | PoolingParams) -> tuple[list[int], Any]:
        """`request_ids`, and for a ``{"prompt_embeds": ...}`` prompt its embeddings as the engine keeps them (float32
        ``[n, hidden]`` on the host, cut as the ids are; the ids are then placeholders, 0), read once; None for any
        other prompt. ValueError naming what is bad."""
        if not (isinstance(prompt, Mapping) and "prompt_embeds" in prompt):
            return self.request_ids(prompt, params), None
        _check_prompt_dict(prompt)
        embeds = prompt_embeds_array(prompt["prompt_embeds"], self.model.config.hidden_size)
        if params.truncate_prompt_tokens is not None:
            embeds = embeds[-self._truncation(params):]
        return [0] * len(embeds), embeds

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, Mapping):  # vLLM's TextPrompt / TokensPrompt / EmbedsPrompt
            _check_prompt_dict(prompt)
            if "prompt_embeds" in prompt:  # placeholders: the embeddings stand for these positions' tokens
                return [0] * len(prompt_embeds_array(prompt["prompt_embeds"], self.model.config.hidden_size))
            if "prompt_token_ids" in prompt and isinstance(prompt["prompt_token_ids"], (str, bytes)):
                raise ValueError(f"prompt_token_ids must be token ids, got {prompt['prompt_token_ids']!r:.200}")
            prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
            if prompt is None or (not isinstance(prompt, str) and isinstance(prompt, Mapping)):
                raise ValueError(f"prompt must be a string or token ids, got {prompt!r}")
        if isinstance(prompt, (bytes, bytearray)):  # its bytes would read as token ids
            raise ValueError(f"prompt must be a string or integer token ids, got {prompt!r:.200}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but this engine has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            try:  # operator.index, not int: 1.7 or "3" is a caller's mistake, not token 1 or 3
                ids = list(map(operator.index, prompt))  # ~20% under a comprehension: 32k ids a batch-256 run
            except TypeError:
                raise ValueError(f"prompt must be a string or integer token ids, got {prompt!r:.200}") from None
            # operator.index takes True as 1; a set of the element types is ~1 µs per 100 ids.
            if isinstance(prompt, (list, tuple)) and bool in set(map(type, prompt)):
                raise ValueError(f"prompt token ids must be ints, not bools, got {prompt!r:.200}")
            _check_in_vocab(ids, self.model.config.vocab_size, "prompt token ids must be")
        if not ids:
            raise ValueError("prompt must not be empty")
        return ids

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """``SamplingParams`` with the checkpoint's defaults (``generation_config.json``'s temperature,
        top-p/k, min-p, repetition penalty, max_new_tokens: `sampling_defaults`) under ``overrides``;
        what a request without its own sampling parameters gets (vLLM's ``get_default_sampling_params``).

        Example:
            >>> engine.default_sampling_params(max_tokens=64).max_tokens  # doctest: +SKIP
            64
        """
        return SamplingParams(**{**self.sampling_defaults, **overrides})

    @_on_device
    def make_request(self, prompt: Prompt, params: SamplingParams | PoolingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     lora_request: LoRARequest | None = None) -> Request:
        """Validate and build a request without queueing it (raises ``ValueError`` on bad input); a `PoolingParams`
        makes an embedding request (`jaxserve.pooling`). ``priority``
        (vLLM's): lower runs first, where ``EngineConfig.scheduling_policy`` is "priority" (elsewhere only 0).
        ``lora_request``: the LoRA adapter it runs with (``EngineConfig.max_loras`` > 0; read and checked here)."""
        check_priority(priority, self.config.scheduling_policy)
        self._check_awake()
        namespace = self._lora_namespace(lora_request)
        lora_id = 0 if lora_request is None else lora_request.lora_int_id
        if isinstance(params, PoolingParams):
            return self._pooling_request(prompt, params, request_id, priority, lora_id, namespace)
        if self.classify_head is not None:
            raise ValueError(f"this model is a sequence classifier ({CLASSIFIER}, labels {list(self.model.config.labels)}) "
                             f"with no language-model head: it classifies (classify, or PoolingParams(task='classify')) "
                             f"and embeds, and generates nothing")
        params = params or self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams or PoolingParams, got {type(params).__name__}")
        # The caller's may be changed later (vLLM's are mutable), never this request's; a shallow copy, its fields
        # already checked (every one immutable but extra_args, which nothing here reads).
        params = copy.copy(params)
        if params.n != 1:
            raise ValueError(f"n must be 1 for one request (generate and chat run n samples; here add n requests, "
                             f"each its own seed), got {params.n}")
        ids, embeds = self._prompt_input(prompt, params)
        if embeds is not None and params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs score the prompt's tokens, and a prompt given as prompt_embeds has none")
        if params.max_tokens is None:  # vLLM's: what the model's length leaves (none left: refused just below),
            # within what the pool holds (a pool smaller than the model's length would abort the request instead)
            room = min(self.max_model_len, self.scheduler.num_pages * self.config.page_size) - len(ids)
            params = dataclasses.replace(params, max_tokens=max(1, room))
        if len(ids) + params.max_tokens > self.max_model_len:
            if not self.cap_max_tokens or len(ids) >= self.max_model_len:
                raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                 f"max_model_len ({self.max_model_len})")
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids),
                                         min_tokens=min(params.min_tokens, self.max_model_len - len(ids)))
        _check_in_vocab([t for t, _ in params.logit_bias], self.model.config.vocab_size,
                        "logit_bias keys must be token ids")
        _check_in_vocab(params.allowed_token_ids or [], self.model.config.vocab_size,
                        "allowed_token_ids must be token ids")
        _check_in_vocab(params.logprob_token_ids or [], self.model.config.vocab_size,
                        "logprob_token_ids must be token ids")
        if params.min_tokens > 0:  # refused here, not by the step that would carry them
            check_banned_ids(params.stop_token_ids, self.eos_ids)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to match the text, and this engine has none; "
                             "use stop_token_ids")
        bad_words = self._bad_words(params.bad_words) if params.bad_words else ()
        if params.logprobs is not None and params.logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.logprobs}")
        guide = self._guide(params) if params.structured_outputs is not None else None
        think = None
        if params.thinking_token_budget is not None:
            think = ThinkBudget.from_prompt(params.thinking_token_budget, *self._think_markers(), ids)
        request_id = self._new_request_id(request_id)
        if params.seed is None and self._seeds is not None:  # EngineConfig.seed: drawn in the order requests come,
            # once nothing can refuse the request (a refused one must not move the seeds of those after it)
            params = dataclasses.replace(params, seed=int(self._seeds.integers(0, 1 << 62)))
        # The detokenizer opens on the prompt's last tokens (a split character's bytes); placeholders are no text.
        detok = (IncrementalDetokenizer(self.tokenizer, ids if embeds is None else (), params.skip_special_tokens)
                 if self.tokenizer is not None and params.detokenize else None)
        return Request(request_id, ids, params, detok, self.eos_ids, named_eos=self._named_eos, guide=guide,
                       bad_word_ids=bad_words, think=think, priority=int(priority), lora_id=lora_id,
                       lora_namespace=namespace, prompt_embeds=embeds,
                       salt_keys=_salt_keys(prompt, namespace, self.model.config.vocab_size))

    def _think_markers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The token ids of ``<think>`` and ``</think>`` (Qwen's reasoning models', QwQ's and DeepSeek-R1's
        distills': one added token each), for `SamplingParams.thinking_token_budget`."""
        if self.tokenizer is None:
            raise ValueError("thinking_token_budget needs a tokenizer (the <think> markers' tokens), and this "
                             "engine has none")
        start, end = (tuple(self.tokenizer.encode(m, add_special_tokens=False)) for m in (THINK_START, THINK_END))
        return start, end

    def _new_request_id(self, request_id: str | None) -> str:
        """``request_id``, or a fresh one where it is None; ValueError if it is already in use."""
        if not request_id:  # skip ids a caller chose for requests of their own ("req-2"), still running
            request_id = next(rid for rid in (f"{self.request_id_prefix}{i}" for i in self._ids)
                              if rid not in self.requests)
        elif request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return request_id

    def _pooling_request(self, prompt: Prompt, pooling: PoolingParams, request_id: str | None, priority: int,
                         lora_id: int, namespace: int) -> Request:
        """`make_request` for an embedding: a prompt prefilled and never decoded (`jaxserve.pooling`). It runs as a
        one-token greedy request whose token is never taken: the prefill that ends its prompt finishes it."""
        if pooling.dimensions is not None and pooling.dimensions != self.model.config.hidden_size:
            raise ValueError(f"dimensions must be the model's {self.model.config.hidden_size} (this model has no "
                             f"matryoshka representation to cut), got {pooling.dimensions}")
        if pooling.task == "classify" and self.classify_head is None:
            raise ValueError(f"task 'classify' needs a sequence classifier (config.json's architectures {CLASSIFIER}); "
                             f"this model is a causal LM: embed it, or generate")
        ids, embeds = self._prompt_input(prompt, pooling)
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) exceeds max_model_len ({self.max_model_len}) - 1")
        return Request(self._new_request_id(request_id), ids, _POOLING_STEP, None, (), priority=int(priority),
                       pooling=pooling, lora_id=lora_id, lora_namespace=namespace, prompt_embeds=embeds,
                       salt_keys=_salt_keys(prompt, namespace, self.model.config.vocab_size))

    def _lora_namespace(self, lora_request: LoRARequest | None) -> int:
        if lora_request is None:
            return 0
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a jaxserve.LoRARequest or None, got {type(lora_request).__name__}")
        if self.lora is None:
            raise ValueError("lora_request needs an engine that serves adapters: EngineConfig(max_loras=...) > 0")
        if self.lora.retired:  # forgotten adapters' host copies, dropped once their last requests are gone
            self._purge_adapters()
        return self.lora.register(lora_request)

    def register_lora(self, lora_request: LoRARequest) -> None:
        """Read and check an adapter now, so requests naming it start at once (a server's start, vLLM's
        ``/v1/load_lora_adapter``); ValueError where the engine serves no adapters or the folder is bad."""
        self._lora_namespace(lora_request)

    def forget_lora(self, lora_id: int) -> None:
        """`jaxserve.lora.LoraSlots.forget` (vLLM's unload): requests made with the adapter before still finish with
        it; nothing where the engine serves no adapters."""
        if self.lora is not None:
            self.lora.forget(lora_id)
            self._purge_adapters()

    def _purge_adapters(self) -> None:
        """Free forgotten adapters that no queued or running request needs any more."""
        sched = self.scheduler
        self.lora.purge({r.lora_namespace for r in (*sched.waiting, *sched.running) if r.lora_id})

    def _has_adapters(self, reqs: list[Request]) -> bool:
        return self.lora is not None and any(r.lora_slot >= 0 for r in reqs)

    def _lora_inputs(self, reqs: list[Request], batch: int) -> dict | None:
        """A call's LoRA inputs for the runner: the adapters and each row's slot; None when no row has one."""
        if not self._has_adapters(reqs):
            return None
        slots = np.full(batch, -1, np.int32)
        slots[: len(reqs)] = [r.lora_slot for r in reqs]
        return self.lora.inputs(slots)

    def _bad_words(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        if self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer to find their tokens, and this engine has none")
        seqs = bad_words_token_ids(self.tokenizer, words)
        check_bad_word_ids(seqs)
        # A tokenizer may know more tokens than the model's logits have (added tokens past the embedding).
        _check_in_vocab([t for seq in seqs for t in seq], self.model.config.vocab_size,
                        "bad_words must tokenize to ids")
        return tuple(seqs)

    def _guide(self, params: SamplingParams) -> GuideState:
        return GuideState(self.structured_guide(params.structured_outputs))

    def _prepared(self, params: Any, on_host: bool = False) -> Any:
        """``params`` as the steps take them: in the engine's dtype (fp8 weights kept), quantized where the config
        says so, on the engine's device; sets the classifier head they hold."""
        params = cast_params(params, jnp.dtype(self.config.compute_dtype()))  # a checkpoint's fp8 weights stay fp8
        # A classifier's score head on the host: a classify request's labels come from its pooled vector there
        # (`pooling.finish_classification`), a few products a request.
        self.classify_head = (np.asarray(params["score"]["kernel"], np.float32) if self.model.config.num_labels
                              else None)
        if self.config.quantization is not None:  # where the weights are (the host, when loaded here)
            params = quantize_params(params, self.config.quantization)
        if self.tp is None and (self.device is not None or on_host):
            params = jax.device_put(params, self.device or jax.local_devices()[0])
        return params

    @_on_device
    def update_params(self, params: Any, copy: bool = False) -> None:
        """New weights for this engine (the same tree and shapes: a training step's, as `LoadedModel.with_params`
        checks them; vLLM's weight update), compiling nothing again. The prefix cache is emptied (its pages hold
        keys of the old weights), prefixes running requests hold included; running requests go on with the new
        weights from their next step, and what they computed is never cached.

        Arrays already in the engine's dtype and on its device are run as they are, not copied (no second copy of
        the weights in device memory): a train step jitted with ``donate_argnums`` over them gives their buffers
        away, and the next `generate` refuses to run on them (ValueError naming params). ``copy=True``: the engine
        keeps copies of its own (vLLM's weight update copies), at the price of that memory.

        Example:
            >>> engine.update_params(jax.tree_util.tree_map(lambda w: w * 1.01, engine.model.params))  # doctest: +SKIP
        """
        if self.sleeping == 2:
            raise ValueError("params: this engine's weights were freed by sleep(level=2); pass them to wake_up")
        if copy:
            params = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a,
                                            params)
        self._take_params(params)

    def check_params_alive(self) -> None:
        """ValueError naming params where an array the engine runs was deleted or donated since it was given (a
        train step jitted with ``donate_argnums``): XLA's own error came from inside a step, naming no cause."""
        params = getattr(self.runner, "params", None)
        if params is not None and any(isinstance(a, jax.Array) and a.is_deleted()
                                      for a in jax.tree_util.tree_leaves(params)):
            raise ValueError("params: an array this engine runs was deleted or donated since update_params (a "
                             "train step jitted with donate_argnums gives its inputs' buffers away; the engine runs "
                             "the arrays it is given without copying them): give it live arrays again, or "
                             "update_params(params, copy=True)")

    def _take_params(self, params: Any) -> None:
        self.model = self.model.with_params(params)
        self.runner.set_params(self._prepared(self.model.params))
        self.scheduler.clear_index(new_weights=True)

    @_on_device
    def sleep(self, level: int = 1) -> None:
        """Give this engine's device memory back while it is idle (vLLM's ``LLM.sleep``: a training step beside it
        can use the memory): level 1 frees the KV pool, level 2 the weights too (the copies the engine made are
        deleted; arrays of the caller's model that it ran as they are are only let go, and stay the caller's).
        Compiled steps are kept, so `wake_up` compiles nothing. Refused while requests are unfinished; requests are
        refused while asleep.

        Example:
            >>> engine.sleep(); train_step(...); engine.wake_up()                  # doctest: +SKIP
            >>> engine.sleep(level=2); params = train(...); engine.wake_up(params)  # doctest: +SKIP
        """
        if level not in (1, 2):
            raise ValueError(f"level must be 1 (the KV pool) or 2 (the weights too), got {level!r}")
        if self.scheduler.has_work():
            counts = self.scheduler.stats()
            raise ValueError(f"sleep needs an idle engine: {counts['running']} request(s) running and "
                             f"{counts['waiting']} waiting (let them finish or abort them)")
        if self.sleeping >= level:
            return
        self.scheduler.clear_index()  # every page free: the pool's contents no longer matter
        self.runner.free(weights=level == 2, keep=self.model.params)
        if level == 2:  # the engine's hold on the caller's arrays goes too; their shapes stay, for wake_up's check
            self.model = dataclasses.replace(self.model, params=jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.model.params))
        self.sleeping = level

    def _check_awake(self) -> None:
        """Requests and warm-up need the KV pool that `sleep` freed."""
        if self.sleeping:
            raise ValueError("this engine is asleep (sleep() freed its KV pool): wake_up() first")

    @_on_device
    def wake_up(self, params: Any = None) -> None:
        """A fresh KV pool after `sleep`, and with ``params`` new weights (needed after ``sleep(level=2)``; the same
        tree and shapes, as `update_params` takes them)."""
        if self.sleeping == 2 and params is None:
            raise ValueError("params: sleep(level=2) freed the weights; pass them to wake_up(params)")
        if self.sleeping:
            self.runner.new_kv()
        if params is not None:
            self._take_params(params)
        self.sleeping = 0

    @_on_device
    def structured_guide(self, spec: StructuredOutputs) -> TokenGuide:
        """The compiled constraint (`jaxserve.structured.TokenGuide`) of ``spec`` over this model's vocabulary:
        compiled once per spec (`structured.compile_guide`'s cache), the vocabulary's bytes read once per
        engine. ValueError naming the spec's field where it cannot be compiled. Thread-safe, so a server
        compiles a request's constraint off the engine thread before submitting it.

        Example:
            >>> engine.structured_guide(StructuredOutputs(regex="[0-9]+")).dfa.fullmatch("42")  # doctest: +SKIP
            True
        """
        if self.tokenizer is None:
            raise ValueError("structured_outputs need a tokenizer (the tokens' bytes), and this engine has none")
        with self._vocabulary_lock:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(vocabulary_bytes(self.tokenizer, self.model.config.vocab_size))
        guide = compile_guide(spec, self._vocabulary, self.eos_ids)
        if self.guide_pool.fits([guide]):
            # The host's copy of its tables here (a server's tokenizer thread), not in the engine's next decode
            # call; that call writes the device's copy into the pool.
            guide.prepare_host_tables()
        return guide

    def add_request(self, prompt: Prompt, params: SamplingParams | PoolingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id. ``priority``, ``lora_request``:
        `make_request`'s."""
        if self.closed:
            raise RuntimeError("engine is closed")
        return self._queue(self.make_request(prompt, params, request_id, priority, lora_request))

    @_on_device
    def _queue(self, request: Request) -> str:
        self.requests[request.request_id] = request
        if self.scheduler.never_fits(request):
            request.finish("abort", f"prompt + max_tokens needs more KV pages than the pool holds "
                                    f"({self.scheduler.num_pages} pages of {self.config.page_size})")
            self._refused.append(request)  # handed out by the next step, as every other end is
        else:
            self.scheduler.add(request)
        return request.request_id

    @_on_device
    def abort(self, request_id: str) -> bool:
        """Stop a request now; its pages are freed. False if it is unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None or request.status is Status.FINISHED:
            return False
        self.scheduler.remove(request)
        request.finish("abort")
        return True

    def abort_after_failure(self, request: Request) -> None:
        """End ``request`` after a step raised: aborted through the scheduler, or, where that raises too
        (its state may be inconsistent after the failure), marked aborted anyway, so nothing waits on it."""
        try:
            self.abort(request.request_id)
        except Exception:
            log.exception("abort after a failed step raised")
            request.finish("abort")

    def release(self, request_id: str) -> Request | None:
        """Forget a finished request (the caller has read its result)."""
        request = self.requests.get(request_id)
        if request is not None and request.status is Status.FINISHED:
            del self.requests[request_id]
        return request

    def has_unfinished(self) -> bool:
        """Work left for `step`: requests queued or running, or ended when added and not yet handed out."""
        return self.scheduler.has_work() or bool(self._ended_at_add())

    def _ended_at_add(self) -> list[Request]:
        # Still registered: a caller that read the end at once and released the request (AsyncEngine) is done.
        return [r for r in self._refused if self.requests.get(r.request_id) is r]

    def failed_step_requests(self) -> list[Request]:
        """The requests a step that raised may have touched: those running, and those it took off the queue to
        admit (still waiting, but no longer queued: no later step would reach them). `AsyncEngine` ends them."""
        queued = set(self.scheduler.waiting)
        return [r for r in self.requests.values()
                if r.status is Status.RUNNING or (r.status is Status.WAITING and r not in queued)]

    # ----- steps ---------------------------------------------------------------------------
    def _sampling_inputs(self, reqs: list[Request], batch: int, host_masks: bool = True):
        # The same rows decode call after call: their stacked parameters (and each unseeded
        # request's drawn seed) are reused until the set of rows changes (~1.5 ms a call at 256).
        # Keyed by the request objects themselves (Request compares by identity, and the key
        # holds them, so no object id can be reused meanwhile).
        key = (batch, tuple(reqs))
        if self._sampling_cache is None or self._sampling_cache[0] != key:
            params = [r.params for r in reqs]
            sampled = needs_sampling(params)
            static = allowed_masks(params, batch, self.model.config.vocab_size)
            self._sampling_cache = (key, make_batch(params, batch, eos_token_ids=self.eos_ids, allowed=static,
                                                    bad_words=[r.bad_word_ids for r in reqs]), static,
                                    MAX_TOP_LOGPROBS if any(p.top_logprob_count > 0 for p in params) else 0,
                                    sampled, needs_penalties(params),
                                    # Log-probabilities only when some row asks (vLLM's rule too): the
                                    # greedy pick is then an argmax without an exponential an element.
                                    any(p.logprobs is not None for p in params), self._needs_history(reqs))
        _, sbatch, static, num_top, sampled, penalties, logprobs, history = self._sampling_cache
        if history:  # the bad words' bans read each row's last tokens
            sbatch = sbatch.replace(recent=jax.device_put(recent_tokens([r.output_ids for r in reqs], batch)))
        forced = [None if r.think is None else r.think.forced() for r in reqs]
        if host_masks and (any(r.guide is not None for r in reqs) or any(f is not None for f in forced)):
            # Each row's next-token mask depends on the tokens so far: built for every call, which is then
            # one token long (a prefill's, or a decode step's where `_guide_tables` cannot serve the batch, or
            # where a row's thinking budget forces its next token).
            allowed = (np.full((batch, self._vocabulary_words()), 0xFFFFFFFF, np.uint32) if static is None
                       else static.copy())
            for i, r in enumerate(reqs):
                if r.guide is not None:
                    r.guide.advance(r.output_ids)
                    allowed[i] &= r.guide.mask()
                if forced[i] is not None:  # the budget outranks the row's other masks (it asked for both)
                    allowed[i] = 0
                    allowed[i, forced[i] // 32] = np.uint32(1 << (forced[i] % 32))
            sbatch = sbatch.replace(allowed=jax.device_put(allowed))
        steps = np.zeros(batch, np.int32)
        steps[: len(reqs)] = [len(r.output_ids) for r in reqs]
        counts = seen = None
        if penalties:
            vocab = self.model.config.vocab_size
            counts_np = np.zeros((batch, vocab), np.int32)
            seen_np = np.zeros((batch, vocab), bool)
            for i, r in enumerate(reqs):
                np.add.at(counts_np[i], np.asarray(r.output_ids, np.int64), 1)
                seen_np[i, np.asarray(r.known_ids, np.int64)] = True
            counts, seen = jnp.asarray(counts_np), jnp.asarray(seen_np)
        return sbatch, steps, num_top, counts, seen, not sampled, logprobs

    @staticmethod
    def _needs_history(reqs: Sequence[Request]) -> bool:
        """Whether some row's bad words are longer than a token: its call's bans then read its last tokens,
        which the host sends (`sampling.recent_tokens`), so the call cannot start before the host has them."""
        return any(needs_history(r.bad_word_ids) for r in reqs)

    @staticmethod
    def _forcing(reqs: Sequence[Request]) -> bool:
        """Whether some row's thinking budget forces its next token (`ThinkBudget.forced`): a one-step call whose
        masks come from the host."""
        return any(r.think is not None and r.think.pending for r in reqs)

    @staticmethod
    def _near_think_budget(reqs: Sequence[Request], tokens: int) -> bool:
        """Whether some row may spend its thinking budget within ``tokens`` more tokens: a call may then not be
        dispatched before the host reads the one before it (the forcing mask needs those tokens)."""
        return any(r.think is not None and (room := r.think.room()) is not None and room <= tokens for r in reqs)

    def _place_guides(self, reqs: Sequence[Request]) -> dict[TokenGuide, int] | None:
        """The pool offsets of the rows' guides (`GuidePool.place`), or None where they cannot all be on the
        device at once: their decode calls then take masks from the host."""
        return self.guide_pool.place([r.guide.guide for r in reqs if r.guide is not None])

    def _guide_tables(self, reqs: list[Request], batch: int, states: Any = None,
                      owed: np.ndarray | None = None) -> tuple | None:
        """The ``guides`` of a decode call whose rows follow their structured outputs on the device
        (`Runner.decode`): ``(masks [G, W], next [G, V], states [batch], advance [batch])``, the pool's tables
        (`GuidePool`: state 0 free, every token, for unconstrained rows; 1 EOS only, a finished match or EOS
        taken; each guide's states at its offset), so calls compile for the pool's few sizes whatever their
        guides. None where the guides cannot all be in the pool: the call then runs one step with masks from the
        host. ``states``: a chained call's, still on the device (the host has not read the tokens that led
        there; the pool placed the same guides for the call it chains, and nothing moved them since). ``owed``:
        rows whose first token is still in a prefill call on the device; they advance by it there first."""
        offsets = self._place_guides(reqs)
        if offsets is None:
            return None
        masks, nxt = self.guide_pool.tables()
        advance = np.zeros(batch, np.int32) if owed is None else owed.astype(np.int32)
        if states is not None:
            return masks, nxt, states, advance
        states = np.zeros(batch, np.int32)
        for i, r in enumerate(reqs):
            if r.guide is not None:
                r.guide.advance(r.output_ids)
                states[i] = 1 if r.guide.eos or r.guide.broken else offsets[r.guide.guide] + r.guide.state
        return masks, nxt, states, advance

    def _vocabulary_words(self) -> int:
        return -(-self.model.config.vocab_size // 32)

    @staticmethod
    def _guided(reqs: Sequence[Request]) -> bool:
        return any(r.guide is not None for r in reqs)

    def _end_guided(self, reqs: Sequence[Request]) -> None:
        """Finish the structured-output requests whose output is a complete match nothing can extend (no
        need to sample an EOS for them); abort one a token took out of its constraint (never expected:
        the sampler masks every step)."""
        for r in reqs:
            if r.guide is None or r.finish_reason is not None:
                continue
            r.guide.advance(r.output_ids)
            if r.guide.broken:  # the sampler masks every step, so the request's other rules must have left no token
                r.finish("abort", "a sampled token broke the structured output constraint: the request's other token "
                                  "rules (allowed_token_ids, bad_words, logit_bias, min_tokens) left it no allowed "
                                  "token", client_error=True)
            elif r.guide.final:
                r.finish("stop")

    @staticmethod
    def _top(request: Request, out, index: tuple) -> dict[int, float] | None:
        """The request's top tokens at ``out.top_ids/top_logprobs[index]``, or its `logprob_token_ids` at
        ``out.id_logprobs[index]`` (in the order asked); None if it asked for neither."""
        named = request.params.logprob_token_ids
        if named is not None:
            return dict(zip(named, out.id_logprobs[index][:len(named)].tolist()))
        n = request.params.logprobs
        if not n:
            return None
        return dict(zip(out.top_ids[index][:n].tolist(), out.top_logprobs[index][:n].tolist()))

    @staticmethod
    def _named_ranks(request: Request, out, index: tuple) -> dict[int, int] | None:
        """The ranks of the request's `logprob_token_ids` at ``out.id_ranks[index]``; None without them."""
        named = request.params.logprob_token_ids
        if named is None:
            return None
        return dict(zip(named, out.id_ranks[index][:len(named)].tolist()))

    def _dispatch_prefill(self, rows: list[tuple[Request, int, int]]) -> _Prefill:
        """Start a prefill call without waiting for it; the rows' progress and prefix-index
        entries are recorded now.

        Their K/V are written by the call in flight, and every later call that could read those
        pages (a next chunk, a prompt sharing the indexed prefix) runs after it on the device's
        stream; only the first sampled tokens wait for ``_collect_prefill``.
        """
        cfg = self.config
        batch = EngineConfig.bucket(cfg.batch_buckets, len(rows))
        width = EngineConfig.bucket(cfg.prefill_buckets, max(e - s for _, s, e in rows))
        tokens = np.zeros((batch, width), np.int32)
        q_start = np.zeros(batch, np.int32)
        lengths = np.zeros(batch, np.int32)
        table = self.scheduler.page_table()
        block_tables = np.zeros((batch, table.shape[1]), np.int32)
        for i, (r, s, e) in enumerate(rows):
            tokens[i, : e - s] = r.all_ids[s:e]
            q_start[i], lengths[i] = s, e
            block_tables[i] = table[r.slot]
        reqs = [r for r, _, _ in rows]
        sbatch, steps, num_top, counts, seen, greedy, logprobs = self._sampling_inputs(reqs, batch)
        targets, prompt_rows = self._prompt_targets(rows, tokens.shape)
        pool_from, pool_rows = self._pool_inputs(rows, batch)
        out = self.runner.prefill(tokens, q_start, lengths, block_tables, sbatch, steps, counts, seen, num_top,
                                  greedy, logprobs, prompt_targets=targets,
                                  prompt_top=MAX_TOP_LOGPROBS if any(rows[i][0].params.prompt_logprobs
                                                                     for i, _, _ in prompt_rows) else 0,
                                  lora=self._lora_inputs(reqs, batch), pool_from=pool_from,
                                  embeds=self._embeds_inputs(rows, tokens.shape))
        for r, s, e in rows:
            r.computed = e
            self.prefill_tokens += e - s
        self.scheduler.after_prefill(*(r for r, _, e in rows if e == r.prefill_end))
        if targets is None and pool_from is None:
            return _Prefill(rows, out)
        return _Prefill(rows, out[0], prompt_rows, out[1], pool_rows, out[2])

    def _embeds_inputs(self, rows: list[tuple[Request, int, int]], shape: tuple[int, int]):
        """For a prefill call covering prompt positions given as embeddings: the runner's ``embeds`` (``[B, S,
        hidden]`` float32 and where they stand); None without any (the usual step)."""
        if all(r.prompt_embeds is None or s >= len(r.prompt_embeds) for r, s, _ in rows):
            return None
        embeds = np.zeros((*shape, self.model.config.hidden_size), np.float32)
        where = np.zeros(shape, bool)
        for i, (r, s, e) in enumerate(rows):
            if r.prompt_embeds is not None and s < len(r.prompt_embeds):
                end = min(e, len(r.prompt_embeds))  # a recompute's chunk may run on into generated tokens
                embeds[i, : end - s] = r.prompt_embeds[s:end]
                where[i, : end - s] = True
        return embeds, where

    @staticmethod
    def _pool_inputs(rows: list[tuple[Request, int, int]], batch: int) -> tuple[np.ndarray | None, list[int]]:
        """For a prefill call with pooling rows: the runner's ``pool_from`` (each row's first position not yet in
        its sum: a recompute after preemption may cover positions summed before) and those rows' indices;
        ``(None, [])`` without any (the usual step). The positions are marked summed now, as prompt
        log-probabilities' are."""
        pool_rows = [i for i, (r, _, _) in enumerate(rows) if r.pooling is not None]
        if not pool_rows:
            return None, []
        pool_from = np.zeros(batch, np.int32)
        for i in pool_rows:
            r, s, e = rows[i]
            pool_from[i] = max(s, r.pooled_upto)
            r.pooled_upto = max(r.pooled_upto, e)
        return pool_from, pool_rows

    @staticmethod
    def _prompt_targets(rows: list[tuple[Request, int, int]], shape: tuple[int, int]):
        """For a prefill call whose rows include one owed prompt log-probabilities: the token after
        each position (``[B, S]``, the runner's ``prompt_targets``) and, per such row, the prompt
        positions it fills ``(row, lo, hi)``; ``(None, [])`` when no row is owed any (the usual step).

        A chunk ``[s, e)`` has the logits of positions ``s..e-1``, which score prompt tokens
        ``s+1..e``; the positions are marked covered now, so a later chunk or a recompute after
        preemption does not compute them again.
        """
        owed = [(i, r, s, e) for i, (r, s, e) in enumerate(rows) if r.wants_prompt_logprobs]
        if not owed:
            return None, []
        targets = np.zeros(shape, np.int32)
        prompt_rows = []
        for i, r, s, e in owed:
            lo, hi = max(s + 1, r.prompt_logprobs_upto), min(e + 1, len(r.prompt_ids))
            if not r.prompt_lps:
                r.prompt_lps = [None] * len(r.prompt_ids)
            if lo < hi:  # a recompute's chunk may hold only positions already scored
                targets[i, lo - s - 1: hi - s - 1] = r.prompt_ids[lo:hi]
                prompt_rows.append((i, lo, hi))
                r.prompt_logprobs_upto = hi
        return (targets, prompt_rows) if prompt_rows else (None, [])

    def _collect_prefill(self, call: _Prefill) -> list[Request]:
        """Read a prefill call's first tokens and hand them to the rows whose prompt it finished
        (those it returns; a pooling row it finished takes its embedding instead, and ends). A row aborted
        meanwhile takes nothing."""
        start = time.perf_counter()
        out, prompt, pooled = jax.device_get((call.out, call.prompt_out, call.pool_out))
        self.time_s["prefill"] += time.perf_counter() - start
        done = []
        for i in call.pool_rows:
            r, _, e = call.rows[i]
            r.pool_sum = pooled[1, i] if r.pool_sum is None else r.pool_sum + pooled[1, i]
            if e == r.prefill_end and r.finish_reason is None:
                vector = pooled[0, i] if r.pooling.pooling_type == "last" else r.pool_sum
                if r.pooling.task == "classify":
                    r.embedding = finish_classification(vector, r.pooling, len(r.prompt_ids), self.classify_head)
                    r.label = self.model.config.labels[int(np.argmax(r.embedding))]
                else:
                    r.embedding = finish_embedding(vector, r.pooling, len(r.prompt_ids))
                r.finish("stop")
                done.append(r)
        for i, lo, hi in call.prompt_rows:
            r, s, _ = call.rows[i]
            k, at = r.params.prompt_logprobs, slice(lo - s - 1, hi - s - 1)  # the chunk's columns scoring lo..hi-1
            chosen = prompt.logprobs[i, at].tolist()
            ids = prompt.top_ids[i, at, :k].tolist()
            lps = prompt.top_logprobs[i, at, :k].tolist()
            if not r.prompt_ranks:
                r.prompt_ranks = [None] * len(r.prompt_ids)
            r.prompt_ranks[lo:hi] = prompt.ranks[i, at].tolist()
            for p, lp, top_ids, top_lps in zip(range(lo, hi), chosen, ids, lps):
                # vLLM's entry: the prompt token first, then the top-k (which may include it).
                entry = {r.prompt_ids[p]: lp}
                for t, v in zip(top_ids, top_lps):
                    entry.setdefault(t, v)
                r.prompt_lps[p] = entry
        tokens_out, logprobs_out, ranks_out = out.tokens.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        for i, (r, _, e) in enumerate(call.rows):
            if e == r.prefill_end and r.finish_reason is None:
                if r.think is not None:  # a forced token where the budget is spent: the prefill sampled under its mask
                    r.think.take([tokens_out[i]])
                r.append(tokens_out[i], logprobs_out[i], self._top(r, out, (i,)), ranks_out[i],
                         self._named_ranks(r, out, (i,)))
                self.generated_tokens += 1
                done.append(r)
        return done

    def _dispatch_decode(self, reqs: list[Request], num_steps: int, chained: _Decode | None = None,
                         after: _Prefill | None = None) -> _Decode:
        """Start a multi-step decode call without waiting for it.

        ``chained``: the call still in flight for these rows (all of its own, or those left after some dropped out:
        `_chain_rows`); this one continues from its last sampled tokens, which stay on the device, so the host can
        read the earlier call's tokens while the device already runs this one. ``after``: the prefill call in
        flight that samples the first token of some of ``reqs``; those rows start from it on the device.
        """
        table = self.scheduler.page_table()
        caps = self.scheduler.capacities()
        shift = 0 if chained is None else chained.num_steps
        # Rows whose first token is still on the device (in ``after``): its index there.
        first = {} if after is None else after.finishing()
        # ``computed`` and ``remaining`` are as of before the chained call's tokens are read
        # (and before ``after``'s first tokens are: ``owed`` counts that one).
        owed = [int(id(r) in first) for r in reqs]
        row_limits = [min(caps[r.slot], r.computed + r.remaining - o) for r, o in zip(reqs, owed)]
        shape = self.decode_shape(len(reqs), max(row_limits), self._has_adapters(reqs))
        last = None if chained is None else chained.last
        if chained is not None and chained.shape.batch != shape.batch:
            # Its input tokens are the chained call's, so its batch too (rows that grew past the contexts where
            # they pad, or some dropped out within the bucket: `_chain_rows`), and its live rows, at the widths of
            # the rows whose attention runs.
            live = chained.shape.live
            shape = DecodeShape(chained.shape.batch, self.decode_table_width(max(row_limits), live), live)
        if chained is not None and [id(r) for r in reqs] != [id(r) for r in chained.reqs]:
            # Rows dropped out: the others' tokens (and guide states) gathered to the front, padding after.
            index = {id(r): i for i, r in enumerate(chained.reqs)}
            rows = np.zeros(shape.batch, np.int32)
            rows[: len(reqs)] = [index[id(r)] for r in reqs]
            last = _gather_rows(last, rows)
        batch, width = shape.batch, shape.width
        positions = np.zeros(batch, np.int32)
        limits = np.zeros(batch, np.int32)
        positions[: len(reqs)] = [r.computed + shift for r in reqs]
        limits[: len(reqs)] = row_limits
        owed = np.array(owed + [0] * (batch - len(reqs)), np.int32)
        block_tables = np.zeros((batch, width), np.int32)
        for i, r in enumerate(reqs):
            block_tables[i] = table[r.slot, :width]
        guides = None
        if self._forcing(reqs):
            num_steps = 1  # the forced token's mask from the host (the guided rows' too, this call)
        elif self._guided(reqs):
            guides = self._guide_tables(reqs, batch, last[1] if chained is not None else None, owed)
            if guides is None:
                num_steps = 1  # each token's mask from the host
        sbatch, steps, num_top, counts, seen, greedy, logprobs = self._sampling_inputs(reqs, batch,
                                                                                      host_masks=guides is None)
        if chained is not None:
            tokens = last[0] if chained.guided else last
        else:
            tokens = np.zeros(batch, np.int32)
            tokens[: len(reqs)] = [0 if owed[i] else r.output_ids[-1] for i, r in enumerate(reqs)]
            if first:
                source = np.array([first.get(id(r), 0) for r in reqs] + [0] * (batch - len(reqs)), np.int32)
                tokens = _first_tokens(tokens, after.out.tokens, source, owed.astype(bool))
        out, last = self.runner.decode(tokens, positions, limits, block_tables, sbatch, steps + shift + owed,
                                       num_steps, counts, seen, num_top, greedy, logprobs, return_last=True,
                                       live_rows=shape.live, guides=guides,
                                       lora=self._lora_inputs(reqs, tokens.shape[0]))
        return _Decode(reqs, out, positions, limits, num_steps, penalties=counts is not None, last=last,
                       after=after, shape=shape, guided=guides is not None)

    def _collect_decode(self, call: _Decode) -> None:
        """Read a decode call's tokens and hand them to their requests (stop rules apply)."""
        start = time.perf_counter()
        out = jax.device_get(call.out)
        self.time_s["decode"] += time.perf_counter() - start
        # Python lists once per call: indexing numpy arrays per token cost ~10 µs a token, most of
        # the host's time per decode call at batch 256.
        tokens, logprobs = out.tokens.T.tolist(), out.logprobs.T.tolist()
        ranks = None  # read only when some row asked for log-probabilities
        for i, r in enumerate(call.reqs):
            # Rows that finished (or were aborted) earlier produced padding tokens: skipped.
            n = max(0, min(call.num_steps, int(call.limits[i] - call.positions[i])))
            if r.guide is not None and r.finish_reason is None:  # the device ran on past a complete match
                n = r.guide.until_final(r.output_ids, tokens[i][:n])
            if r.think is not None and r.finish_reason is None:  # the device ran on past a thinking budget
                n = r.think.take(tokens[i][:n])
            # Two fields read, not `has_top_logprobs`: every row of every call passes here, and the properties cost
            # a row without log-probabilities ~0.1 µs more a call (~40 µs a call at 256 rows on the CPU).
            asked, named = r.params.logprobs, r.params.logprob_token_ids
            tops = [self._top(r, out, (k, i)) for k in range(n)] if asked or named is not None else None
            named_ranks = [self._named_ranks(r, out, (k, i)) for k in range(n)] if named is not None else None
            if asked is not None and ranks is None:
                ranks = out.ranks.T.tolist()
            taken = r.extend(tokens[i][:n], logprobs[i][:n], tops, ranks[i][:n] if asked is not None else None,
                             named_ranks)
            r.computed += taken
            self.generated_tokens += taken

    # ----- speculative decoding (jaxserve.speculative) ----------------------------------------
    def _speculating(self, reqs: Sequence[Request]) -> bool:
        """Whether n-gram speculation serves these rows: on, fewer rows than ``speculative_disable_by_batch_size``
        (where set), and every row's rules can be followed through a draft on the device: any sampling parameters,
        and structured outputs where the guide pool holds every row's guide (else their masks come from the host,
        one token a call)."""
        cfg = self.config
        if not cfg.speculative_tokens or 0 < cfg.speculative_disable_by_batch_size <= len(reqs):
            return False
        guides = [r.guide.guide for r in reqs if r.guide is not None]
        return not guides or self.guide_pool.fits(guides)  # (placed by the verify call itself)

    def _drafts(self, reqs: list[Request]) -> list[list[int]] | None:
        """Each decoding row's draft (`speculative.ngram_draft` over its text, cut where its length or the model's
        ends), or None where no verify call should run: speculation off or not for these rows, no row has a draft,
        or the pages for the drafts cannot be had without preempting."""
        if not self._speculating(reqs) or self._forcing(reqs):  # a forced token is a one-step call's
            return None
        cfg = self.config
        drafts = []
        for r in reqs:
            room = min(cfg.speculative_tokens, r.remaining - 1, self.max_model_len - 1 - r.computed)
            drafts.append(ngram_draft(r.known_ids, room, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
                          if room > 0 else [])
        if not any(drafts):
            return None
        if not self.scheduler.reserve(reqs, [r.computed + 1 + len(d) for r, d in zip(reqs, drafts)]):
            return None
        return drafts

    def _verify(self, reqs: list[Request], drafts: list[list[int]]) -> None:
        """One verify call over the rows' last tokens and drafts; each row takes its accepted draft tokens and
        the model's token after them (`speculative.accepted_tokens`), greedy decoding's tokens."""
        batch = EngineConfig.bucket(self.config.batch_buckets, len(reqs))
        tokens = np.zeros((batch, self.config.speculative_tokens + 1), np.int32)
        q_start = np.zeros(batch, np.int32)
        lengths = np.zeros(batch, np.int32)
        table = self.scheduler.page_table()
        block_tables = np.zeros((batch, table.shape[1]), np.int32)
        for i, (r, d) in enumerate(zip(reqs, drafts)):
            tokens[i, : 1 + len(d)] = [r.output_ids[-1], *d]
            q_start[i], lengths[i] = r.computed, r.computed + 1 + len(d)
            block_tables[i] = table[r.slot]
        params = [r.params for r in reqs]
        # Fields, not `top_logprob_count`'s property, and no `logprob_id_array` without named tokens: every verify call.
        named = any(p.logprob_token_ids is not None for p in params)
        num_top = MAX_TOP_LOGPROBS if any(p.logprobs and p.logprob_token_ids is None for p in params) else 0
        sampled = {}
        guided = self._guided(reqs)
        if guided or needs_sampling(params) or any(p.allowed_token_ids is not None or r.bad_word_ids
                                                   for p, r in zip(params, reqs)):
            # Rejection sampling on the device, greedy rows too: their target is the argmax of their processed
            # logits (masks, guides, bad words, bias, min_tokens, penalties).
            sbatch, steps, _, counts, seen = self._sampling_inputs(reqs, batch, host_masks=False)[:5]
            sampled = dict(batch=sbatch, steps=steps, counts=counts, seen=seen,
                           guides=self._guide_tables(reqs, batch)[:3] if guided else None)
        start = time.perf_counter()
        out, count = jax.device_get(self.runner.verify(tokens, q_start, lengths, block_tables, num_top=num_top,
                                                       logprobs=any(r.params.logprobs is not None for r in reqs),
                                                       lora=self._lora_inputs(reqs, batch),
                                                       logprob_ids=logprob_id_array(params, batch) if named else None,
                                                       **sampled))
        self.time_s["decode"] += time.perf_counter() - start
        self.spec["verify_calls"] += 1
        picks, logprobs, ranks = out.tokens.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        for i, (r, d) in enumerate(zip(reqs, drafts)):
            # Every emitted token is the one chosen at its position (greedy: an accepted draft token is the pick).
            if count is None:
                emitted, accepted = accepted_tokens(d, picks[i])
            else:
                emitted, accepted = picks[i][:int(count[i])], int(count[i]) - 1
            if r.guide is not None:  # the device ran on past a complete match (an EOS-only state): cut there
                emitted = emitted[: r.guide.until_final(r.output_ids, emitted)]
            if r.think is not None:  # drafts accepted past a thinking budget
                emitted = emitted[: r.think.take(emitted)]
            asked, named = r.params.logprobs, r.params.logprob_token_ids  # as `_collect_decode` reads them
            tops = [self._top(r, out, (i, j)) for j in range(len(emitted))] if asked or named is not None else None
            named_ranks = ([self._named_ranks(r, out, (i, j)) for j in range(len(emitted))] if named is not None
                           else None)
            taken = r.extend(emitted, logprobs[i][:len(emitted)], tops, ranks[i][:len(emitted)], named_ranks)
            r.computed += taken  # the K/V of the row's last token and of the accepted drafts
            self.generated_tokens += taken
            self.spec["draft_tokens"] += len(d)
            self.spec["accepted_tokens"] += accepted

    def _chain_rows(self, call: _Decode) -> list[Request] | None:
        """The rows of a call that may follow ``call`` over its rows, dispatched before reading it (None if none may).

        Only in steady decoding: nothing waits or prefills, no penalties (their counts live on the host) nor bad
        words of several tokens (their last tokens too), no row runs that ``call`` did not, and every row gets
        room for the chained call's tokens without preemption. Rows that finished or were aborted since ``call``
        was dispatched, and those it ends (their last tokens are in it), drop out while the others still fill the
        same batch bucket: their tokens are gathered on the device (`_gather_rows`), so a row finishing at its own
        length (an EOS, a stop string) does not make the device wait for the host to read, schedule and dispatch
        (~5 ms a call at 256 rows on the H200, bench/results/engine_timeline.md).
        """
        if not self.config.overlap or call.penalties or self.scheduler.waiting:
            return None
        in_call = {id(r) for r in call.reqs}
        if any(r.is_prefilling or id(r) not in in_call for r in self.scheduler.running):
            return None
        rows = [r for r in call.reqs
                if r.status is Status.RUNNING and r.finish_reason is None and r.remaining > call.num_steps]
        if not rows or self._needs_history(rows):
            return None
        # Rows drop out within their bucket (the call keeps its batch: one gather shape a bucket); fewer rows than
        # a smaller bucket holds end the chain, so that the next call runs at the smaller batch.
        if len(rows) < len(call.reqs) and (
                not CHAIN_PAST_FINISHES or self.decode_batch(len(rows), self._has_adapters(rows))
                != self.decode_batch(len(call.reqs), self._has_adapters(call.reqs))):
            return None
        if self._speculating(rows):  # the next call may be a verify call, whose drafts need the tokens
            return None
        if self._guided(rows) and not call.guided:  # masks from the host need its tokens first
            return None
        if self._near_think_budget(rows, 2 * call.num_steps):  # the forcing mask needs the tokens first
            return None
        want = [min(r.computed + r.remaining, self.max_model_len, r.computed + 2 * call.num_steps) for r in rows]
        return rows if self.scheduler.reserve(rows, want) else None

    def _prefill_behind(self, call: _Decode) -> _Prefill | None:
        """Under ``prefill_first`` with ``overlap``: the prefill of waiting prompts, dispatched behind the decode
        call in flight before the host reads it (None if nothing can be admitted), so that the device goes from
        the decode straight into the prefill instead of waiting for the host to read, schedule and dispatch. It
        needs none of the decode's tokens: admission takes free pages only (no running row is preempted), and the
        rows the read finishes free theirs after it. The next step goes on as after any prefill (more prefill, or
        the decode over every row from the prefill's first tokens on the device: `_can_follow_prefill`)."""
        if not (self.config.overlap and self.config.policy == "prefill_first" and self.scheduler.waiting
                and PREFILL_BEHIND_DECODE):
            return None
        plan = self.scheduler.schedule(prefill_only=True)
        return self._dispatch_prefill(plan.prefill) if plan.prefill else None

    def _can_follow_prefill(self, call: _Prefill) -> list[Request] | None:
        """The rows of a decode call that may start before the host reads ``call``'s first tokens
        (None if none may): with ``overlap``, once ``call`` is the last prefill (no prompt waits or
        is partway), nobody asks for penalties (their token counts need the first tokens on the
        host) or bad words of several tokens, and every row gets its pages without preempting. Each of
        ``call``'s rows starts from its first token on the device, so the device goes from the prefill straight into
        decoding instead of waiting for the host to read, schedule and dispatch.
        """
        if not self.config.overlap or self.scheduler.waiting:
            return None
        rows = self.scheduler.running
        if not rows or any(r.is_prefilling or r.finish_reason is not None for r in rows):
            return None
        if needs_penalties([r.params for r in rows]) or self._needs_history(rows):
            return None
        if self._guided(rows) and self._place_guides(rows) is None:
            return None  # masks from the host need the first tokens there
        if self._near_think_budget(rows, 1 + self.config.decode_steps):
            return None
        first = call.finishing()
        # Rows whose first token is on the device owe it: it is not in ``remaining`` yet.
        want = [min(r.computed + r.remaining - (id(r) in first), self.max_model_len,
                    r.computed + self.config.decode_steps) for r in rows]
        if any(w <= r.computed for w, r in zip(want, rows)):
            return None  # a row the first token finishes by length: read it first
        return list(rows) if self.scheduler.reserve(rows, want) else None

    @_on_device
    def step(self) -> list[Request]:
        """Run one scheduled step; returns the requests that got new tokens or finished (those `add_request`
        ended at once too, whose prompt + max_tokens no pool of this size holds).

        With ``EngineConfig.overlap`` a decode or prefill call may still run on the device when
        step() returns; its tokens come back from the next step(), which first chains the
        following call (a decode over the same rows in steady decoding, the next prefill, or
        after the last prefill the first decode, from that prefill's tokens on the device) so
        the device does not wait for the host.
        """
        start = time.perf_counter()
        touched: dict[str, Request] = {r.request_id: r for r in self._ended_at_add()}
        self._refused.clear()
        pending, self._pending = self._pending, None
        if pending is not None and pending.after is not None:
            # A decode call that started from a prefill's first tokens on the device: read those
            # first (the decode stays in flight), so their TTFT is the prefill's, not the decode's.
            after, pending.after = pending.after, None
            self._pending = pending
            touched.update((r.request_id, r) for r in self._collect_prefill(after))
        elif pending is not None:
            if (rows := self._chain_rows(pending)) is not None:
                self._pending = self._dispatch_decode(rows, pending.num_steps, chained=pending)
                self.chained_calls += 1
                self.chained_calls_dropping_rows += len(rows) < len(pending.reqs)
            elif (call := self._prefill_behind(pending)) is not None:
                self._pending_prefill = call
                self.prefill_calls_behind_decode += 1
            # Rows that finished before this call was read (in the collection of the call it was chained to) were
            # handed back then: again, a caller reusing the id would have got the old request's end for its new one.
            live = [r for r in pending.reqs if r.finish_reason is None]
            self._collect_decode(pending)
            touched.update((r.request_id, r) for r in live)
        else:
            previous, self._pending_prefill = self._pending_prefill, None
            plan = None
            if previous is not None:
                # Prefill after prefill: the next call goes to the device before the host reads
                # this one's first tokens (and while it schedules), so the device never waits
                # between them. Anything else reads the tokens first: a decode needs them.
                plan = self.scheduler.schedule(prefill_only=True)
                if plan.prefill:
                    self._pending_prefill = self._dispatch_prefill(plan.prefill)
                    self.overlapped_prefill_calls += 1
                elif (rows := self._can_follow_prefill(previous)) is not None:
                    self._pending = self._dispatch_decode(rows, self.config.decode_steps, after=previous)
                    self.decode_calls_after_prefill += 1
                    self.time_s["step"] += time.perf_counter() - start
                    return list(touched.values())
                touched.update((r.request_id, r) for r in self._collect_prefill(previous))
            if plan is None or not plan.prefill:
                plan = self.scheduler.schedule()
                if plan.prefill:
                    call = self._dispatch_prefill(plan.prefill)
                    if self.config.overlap and not plan.decode:
                        self._pending_prefill = call
                    else:
                        touched.update((r.request_id, r) for r in self._collect_prefill(call))
            # A row whose first token just finished it (a stop id, max_tokens 1, or a complete structured output: a
            # recompute's prefill may bring the token that completes it) decodes no more.
            self._end_guided(touched.values())
            decode = [r for r in plan.decode if r.finish_reason is None]
            if decode and (drafts := self._drafts(decode)) is not None:
                self._verify(decode, drafts)
                touched.update((r.request_id, r) for r in decode)
                decode = []
            if decode:
                plan.decode = decode
                call = self._dispatch_decode(plan.decode, plan.decode_steps)
                if self.config.overlap and not plan.prefill:
                    self._pending = call
                else:
                    self._collect_decode(call)
                    touched.update((r.request_id, r) for r in plan.decode)
        self._end_guided(touched.values())
        finished = [r for r in touched.values() if r.finish_reason is not None]
        self.scheduler.remove_many(finished)
        for r in finished:
            r.status = Status.FINISHED
        self.time_s["step"] += time.perf_counter() - start
        return list(touched.values())

    def stream(self) -> Iterator[Request]:
        """Step until no work is left, yielding every request that progressed."""
        while self.has_unfinished():
            yield from self.step()

    # ----- batch API -----------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[dict[str, Any]]:
        """Run prompts to completion; one result dict per prompt, in order. ``priority``: one a prompt
        (`make_request`'s; with ``scheduling_policy="priority"``). ``lora_request``: one adapter for all, or one (or
        None) a prompt (vLLM's).

        Every prompt is validated before anything runs, so a bad one raises ``ValueError`` and
        leaves the engine untouched.
        """
        return run_to_completion(self, prompts, sampling_params, use_tqdm, priority, lora_request)

    def embed(self, prompts: Prompt | Sequence[Prompt],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True,
              priority: Sequence[int] | None = None,
              lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[dict[str, Any]]:
        """Embed prompts (vLLM's ``LLM.embed``): one dict a prompt, in order, ``embedding`` (float32 ``[hidden_size]``,
        the final hidden state at the last token, unit length, unless ``pooling_params`` says otherwise),
        ``prompt_tokens``, ``cached_tokens``, ``finish_reason``, ``total_time``. Runs beside generation in the same
        steps (`jaxserve.pooling`).

        Example:
            >>> out = engine.embed(["import os", "def add(a, b):"], use_tqdm=False)  # doctest: +SKIP
            >>> float(out[0]["embedding"] @ out[1]["embedding"])                    # doctest: +SKIP
            0.83
        """
        return run_to_completion(self, prompts, embed_params(pooling_params), use_tqdm, priority, lora_request)

    def classify(self, prompts: Prompt | Sequence[Prompt],
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True,
                 priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[dict[str, Any]]:
        """Classify prompts with a sequence classifier (vLLM's ``LLM.classify``; a checkpoint of
        ``Qwen2ForSequenceClassification``): one dict a prompt, in order, ``probs`` (float32 ``[num_labels]``: softmax
        of the labels' logits at the last token, sigmoid for one label; raw logits with
        ``PoolingParams(activation=False)``), ``label`` (the likeliest's name), ``prompt_tokens``, ``cached_tokens``.

        Example:
            >>> engine.classify(["great movie", "awful plot"], use_tqdm=False)[0]["label"]  # doctest: +SKIP
            'positive'
        """
        return run_to_completion(self, prompts, classify_params(pooling_params), use_tqdm, priority, lora_request)

    def score(self, text_1: Any, text_2: Any, pooling_params: PoolingParams | None = None, use_tqdm: bool = True,
              lora_request: LoRARequest | None = None) -> list[dict[str, Any]]:
        """vLLM's ``LLM.score``: for an embedding model the cosine similarity of each pair's embeddings, for a
        one-label classifier (a cross-encoder) the probability it gives the pair's texts one after the other
        (`pooling.score_pairs`: one text against one or each of a list, or two lists item by item; a text is a
        string or token ids). One dict a pair, in order: ``score``, ``prompt_tokens`` (both texts').

        Example:
            >>> engine.score("import os", ["import sys", "x = 1"], use_tqdm=False)[0]["score"]  # doctest: +SKIP
            0.78
        """
        return run_score(self, text_1, text_2, pooling_params, use_tqdm, lora_request)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             **template_options: Any) -> list[dict[str, Any]]:
        """vLLM's ``LLM.chat``: one conversation (OpenAI-style messages) or a list of them, rendered with the chat
        template and run as `generate` runs prompts; one result dict per conversation. ``template_options``:
        `run_chat`'s.

        Example:
            >>> engine.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=16))  # doctest: +SKIP
        """
        return run_chat(self, messages, sampling_params, use_tqdm, **template_options)

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = True) -> list[dict[str, Any]]:
        """vLLM's ``LLM.beam_search``: each prompt's ``params.beam_width`` best continuations by beam search
        (`jaxserve.beam_search`); one dict a prompt, its ``sequences`` best first (``text``, ``token_ids``,
        ``logprobs``, ``cum_logprob``, ``score``, ``finish_reason``).

        Example:
            >>> out = engine.beam_search(["import os"], BeamSearchParams(beam_width=4, max_tokens=8))  # doctest: +SKIP
            >>> out[0]["sequences"][0]["text"]  # doctest: +SKIP
        """
        return run_beam_search(self, prompts, params, use_tqdm)

    def decode_batch(self, rows: int, adapters: bool = False) -> int:
        """The batch a decode call of ``rows`` sequences runs as over short contexts: their batch bucket, or a
        wider one where ``jaxserve.model.decode_rows`` says a small step is faster padded (on the GPU, 8 rows;
        past the largest bucket too, as a decode-only shape). ``adapters``: the call has adapter rows (on the GPU
        one such row pads to 8 too). ``decode_shape`` has the call's actual shape.

        Example: with the default buckets (1, 2, 4, 8, ...), ``engine.decode_batch(3)`` is 4 on the CPU and 8 on
        an H100 / H200 in bf16.
        """
        return self._decode_batch[adapters][rows]

    def decode_shape(self, rows: int, max_limit: int, adapters: bool = False) -> DecodeShape:
        """``(batch, block-table width in pages, live rows)`` of a decode call of ``rows`` sequences none of which
        writes at or past position ``max_limit``.

        The batch is ``decode_batch(rows, adapters)``. Padded, a call's attention split count is capped by the
        programs the padded batch wants, so over long contexts eight rows split a table 8x less than one row does and
        the one real row's keys go to a few programs (H200, 16k keys: 1.5B batch 1 1.89 against 1.71 ms a step
        unpadded; bench/results/throughput.md run 46). Where padding would leave the rows fewer splits holding keys than
        their own bucket's call, the padded call runs only the real rows' attention, split as their own call
        would be (``live`` < ``batch``, ``model.PAD_LIVE_ROWS``: 1.5B batch 1 at 16k 1.56 ms, 0.5B batch 2 0.86
        against 0.88 unpadded; run 47), or, with that off, runs unpadded in their own bucket. Elsewhere the whole
        padded batch's attention runs: at short contexts it costs nothing, while live rows' finer split did
        (1.5B batch 1, 128 tokens: 1.371 against 1.397 ms).

        Example (Qwen2.5-1.5B on an H200, a 32k model, page 16):
            >>> engine.decode_shape(1, 256)     # padded: one unsplit pass either way  # doctest: +SKIP
            DecodeShape(batch=8, width=16, live=8)
            >>> engine.decode_shape(1, 16384)   # one row: 128 splits hold keys, padded 16  # doctest: +SKIP
            DecodeShape(batch=8, width=2048, live=1)
        """
        return self._decode_shape_for_pages(rows, -(-max_limit // self.config.page_size), adapters)

    def _decode_shape_for_pages(self, rows: int, pages: int, adapters: bool = False) -> DecodeShape:
        padded = self._decode_batch[adapters][rows]
        natural = EngineConfig.bucket(self.config.batch_buckets, rows)
        width = self._width_for_pages(pages, padded)
        if padded != natural:
            own = self._width_for_pages(pages, natural)
            if (_splits_used(*self._tuning(padded, width), min(pages, width))
                    < _splits_used(*self._tuning(natural, own), min(pages, own))):
                return DecodeShape(padded, own, natural) if self._live_rows else DecodeShape(natural, own, natural)
        return DecodeShape(padded, width, padded)

    def _width_for_pages(self, pages: int, rows: int | None) -> int:
        widths = self.decode_table_widths if rows is None else self._decode_widths.get(rows, self.decode_table_widths)
        return next((w for w in widths if w >= pages), widths[-1])

    def decode_table_width(self, max_limit: int, rows: int | None = None) -> int:
        """Pages in a decode call's block table when no row writes at or past ``max_limit``: the narrowest
        of the widths of its batch bucket ``rows`` (None: of ``decode_table_widths``, every bucket's) that holds
        every page the call can touch."""
        return self._width_for_pages(-(-max_limit // self.config.page_size), rows)

    @_on_device
    def warmup(self, sampling: bool = True, logprobs: bool = False, structured: bool = False,
               lora: bool | None = None, pooling: bool = False, compile_threads: int | None = None) -> int:
        """Compile every step shape the buckets allow, so no request waits on the compiler.

        Runs padding-only batches (length 0: nothing is written, no page is touched) for each
        decode batch bucket and each prefill (batch, length) bucket pair within the padding
        bound; ``sampling=False`` compiles only the greedy variants; ``logprobs=True`` also the
        steps of batches where a request asks for log-probabilities (``SamplingParams.logprobs``
        set; the top log-probabilities' variants still compile on first use); ``structured=True``
        also those where a row follows a structured output (decode calls at the guide pool's first
        size, `GuidePool`, and prefills with masks; a pool grown past it compiles again). Steps of batches
        with a `logit_bias`, `bad_words` or `logprob_token_ids` compile on first use. ``lora`` (default: where the
        engine serves adapters, ``max_loras`` > 0) also the steps of batches with adapter rows (`jaxserve.lora`),
        each shape once more. ``pooling=True`` also the prefills of embedding requests (`jaxserve.pooling`; greedy
        rows, as an embedding's are); a classifier's warm-up compiles those alone. ``compile_threads`` > 1: XLA's
        compiles run side by side on that many threads (`Runner.compiling_ahead`), then every shape runs once;
        default ``$JAXSERVE_COMPILE_THREADS``, else 1 (one after the other: threads gain nothing on a 2-core CPU, and
        on a GPU their speed, memory and XLA's autotuning beside other compiles are not measured yet). Returns the
        number of shapes compiled.

        Example:
            >>> engine.warmup(logprobs=True)   # doctest: +SKIP
            96
        """
        self._check_awake()
        threads = compile_threads if compile_threads is not None else COMPILE_THREADS
        if threads < 1:
            raise ValueError(f"compile_threads must be >= 1, got {threads}")
        self.runner.compiled_shapes.quiet = True
        try:
            before = len(self.runner.compiled_shapes)
            if threads > 1:
                # Traced here, compiled on the threads; the pass below then runs every shape from JAX's cache (and
                # compiles whatever the first pass could not reach: the outputs it fed on were zeros).
                with self.runner.compiling_ahead(threads):
                    self._warmup(sampling, logprobs, structured, lora, pooling)
            self._warmup(sampling, logprobs, structured, lora, pooling)
            return len(self.runner.compiled_shapes) - before
        finally:
            self.runner.compiled_shapes.quiet = False

    def _warmup(self, sampling: bool, logprobs: bool, structured: bool, lora: bool | None, pooling: bool) -> None:
        cfg = self.config
        lora = self.lora is not None if lora is None else lora
        if lora and self.lora is None:
            raise ValueError("warmup(lora=True) needs an engine that serves adapters: EngineConfig(max_loras=...) > 0")
        generating = self.classify_head is None  # a classifier's requests are pooling prefills alone
        pooling = pooling or not generating
        variants = [(greedy, lps) for greedy in ((True, False) if sampling else (True,))
                    for lps in ((False, True) if logprobs else (False,))] if generating else []
        step_counts = sorted({1, cfg.decode_steps})
        guided = [None]
        if structured and self.guide_pool.max_rows:
            guided.append(self.guide_pool.tables())
        fewest_rows = 1  # the scheduler bounds (rows x padded length), and a bucket holds >= this many rows
        first_tokens: dict[int, jax.Array] = {}  # a prefill call's sampled tokens, by its batch
        for batch in sorted(set(cfg.batch_buckets) | set(self.decode_buckets)):
            zeros = np.zeros(batch, np.int32)
            table = np.zeros((batch, self.scheduler.max_pages_per_seq), np.int32)
            sbatch = make_batch([], batch)
            # Buckets whose decode calls run padded wider (decode_batch) compile only the shapes of this batch
            # they take (decode_shape), and a decode-only shape past the largest bucket no prefill.
            shapes = [s for s in self._decode_shapes if s.batch == batch]
            adapter_shapes = [s for s in self._adapter_decode_shapes if s.batch == batch]
            # Prefill widths within the padding bound (the scheduler bounds rows x padded length).
            lengths = [n for n in (cfg.prefill_buckets if batch in cfg.batch_buckets else ())
                       if fewest_rows == 1 or fewest_rows * n <= 2 * cfg.max_tokens_per_step]
            # Adapter rows' variants: their inputs (the slots' weights, every row's slot -1) shape the compile alone.
            loras = [None] + ([self.lora.inputs(zeros - 1)] if lora else [])
            for (greedy, lps), pool, lo in itertools.product(variants, guided, loras):
                guides = None if pool is None else (*pool, zeros, zeros)
                # A prefill's rows with structured outputs take their first token's masks from the host.
                prefill_batch = sbatch if pool is None else sbatch.replace(
                    allowed=jnp.full((batch, self._vocabulary_words()), 0xFFFFFFFF, jnp.uint32))
                for steps, shape in itertools.product(step_counts, shapes + (adapter_shapes if lo else [])):
                    self.runner.decode(zeros, zeros, zeros, table[:, :shape.width], sbatch, zeros, steps,
                                       greedy=greedy, logprobs=lps, live_rows=shape.live, guides=guides, lora=lo)
                for length in lengths:
                    out = self.runner.prefill(np.zeros((batch, length), np.int32), zeros, zeros, table,
                                              prefill_batch, zeros, greedy=greedy, logprobs=lps, lora=lo)
                    first_tokens[batch] = out.tokens
            for length, lo in itertools.product(lengths if pooling else (), loras):
                self.runner.prefill(np.zeros((batch, length), np.int32), zeros, zeros, table, sbatch, zeros,
                                    greedy=True, logprobs=False, lora=lo, pool_from=zeros)
            if cfg.speculative_tokens and generating and batch in cfg.batch_buckets:
                for (greedy, lps), lo in itertools.product(variants, loras):  # sampling rows: the rejection sampler
                    self.runner.verify(np.zeros((batch, cfg.speculative_tokens + 1), np.int32), zeros, zeros, table,
                                       logprobs=lps, lora=lo, **({} if greedy else dict(batch=sbatch, steps=zeros)))
            fewest_rows = batch + 1
        if cfg.overlap:  # a decode call that follows a prefill (_can_follow_prefill) picks its first tokens
            for batch in sorted({s.batch for s in self._decode_shapes}):
                zeros = np.zeros(batch, np.int32)
                for tokens in (t for b, t in first_tokens.items() if b <= batch):
                    _first_tokens(zeros, tokens, zeros, zeros.astype(bool))
                # and a chained call that rows dropped out of (_chain_rows) gathers the others' tokens (and states)
                last = jnp.zeros(batch, jnp.int32)
                for tree in (last, (last, last)) if len(guided) > 1 else (last,):
                    _gather_rows(tree, zeros)
        jax.block_until_ready(self.runner.kv)

    @_on_device
    def stats(self) -> dict[str, Any]:
        """Running/waiting counts, pages, prefix hit rate, throughput, step shapes run ("compilations":
        compiled once a process, `jaxserve.runner.steps_for`), and the
        wall time of step() split into prefill calls, decode calls (dispatch until the results are
        on the host) and host work (scheduling, inputs, bookkeeping)."""
        elapsed = time.perf_counter() - self._started
        out = self.scheduler.stats()
        out.update(generated_tokens=self.generated_tokens, prefill_tokens=self.prefill_tokens,
                   tokens_per_s=self.generated_tokens / max(elapsed, 1e-9),
                   prefill_call_s=self.time_s["prefill"], decode_call_s=self.time_s["decode"],
                   host_s=self.time_s["step"] - self.time_s["prefill"] - self.time_s["decode"],
                   compilations=len(self.runner.compiled_shapes), overlapped_decode_calls=self.chained_calls,
                   overlapped_decode_calls_dropping_rows=self.chained_calls_dropping_rows,
                   prefill_calls_behind_decode=self.prefill_calls_behind_decode,
                   overlapped_prefill_calls=self.overlapped_prefill_calls,
                   decode_calls_after_prefill=self.decode_calls_after_prefill,
                   spec_verify_calls=self.spec["verify_calls"], spec_draft_tokens=self.spec["draft_tokens"],
                   spec_accepted_tokens=self.spec["accepted_tokens"])
        if self.lora is not None:  # vLLM's lora_requests_info: adapters on the device, and slots in use
            out.update(lora_slots=self.lora.max_loras,
                       lora_adapters_loaded=sum(r is not None for r in self.lora.resident),
                       lora_slots_held=sum(h > 0 for h in self.lora.held))
        return out

    @_on_device
    def clear_prefix_cache(self) -> None:
        self.scheduler.clear_index()

    def close(self) -> None:
        """Abort everything still queued or running; the engine accepts no new requests."""
        for rid, r in list(self.requests.items()):
            if r.status is not Status.FINISHED:
                self.abort(rid)
        self.closed = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_priority(priority: Any, scheduling_policy: str) -> None:
    """ValueError naming ``priority`` unless it is an int, and 0 where the policy is not "priority" (vLLM's rule:
    a priority that nothing would honour is refused, not ignored)."""
    if not isinstance(priority, (int, np.integer)) or isinstance(priority, (bool, np.bool_)):
        raise ValueError(f"priority must be an int, got {priority!r}")
    if priority != 0 and scheduling_policy != "priority":
        raise ValueError(f"priority must be 0 unless the engine's scheduling_policy is 'priority', got {priority}")


def prompt_list(prompts: Any) -> list[Any]:
    """One prompt (text, a prompt dict, token ids) or any iterable of them (a generator too), as a list of prompts;
    ValueError for what is neither.

    Example:
        >>> prompt_list("hi"), prompt_list([1, 2]), prompt_list(p for p in ["a", "b"])
        (['hi'], [[1, 2]], ['a', 'b'])
    """
    if isinstance(prompts, np.ndarray):  # token ids as an array: one prompt [T] or a batch [B, T]
        prompts = prompts.tolist()
    if prompts is None or not hasattr(prompts, "__iter__") or isinstance(prompts, (bytes, bytearray)):
        raise ValueError(f"prompts must be a string, token ids, a prompt dict or a list of them, got {prompts!r:.200}")
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    prompts = list(prompts)  # before looking at the first: a generator has no [0]
    if prompts and isinstance(prompts[0], (int, np.integer)):
        return [prompts]
    return prompts


def _one_a_prompt(value: Any, name: str, count: int, single: tuple[type, ...], expected: str) -> list[Any]:
    """``value`` for each of ``count`` prompts: one for all (None, or an instance of ``single``) or a list of them,
    one a prompt; ValueError naming ``name`` otherwise (a dict, iterated, would have been its keys; an int, a
    TypeError from list())."""
    if value is None or isinstance(value, single):
        return [value] * count
    if isinstance(value, (Mapping, str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be {expected}, got {type(value).__name__}")
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts")
    return values


def truncation(truncate_prompt_tokens: int, max_model_len: int, max_tokens: int | None) -> int:
    """How many of a prompt's last tokens ``truncate_prompt_tokens`` keeps: itself, or for vLLM's -1 (the model's
    length) the longest prompt that leaves room for ``max_tokens`` (one token where None): vLLM's cut to
    max_model_len itself leaves none, and refuses the request. The engine's rule and the server's.

    Example:
        >>> truncation(-1, 64, 10), truncation(8, 64, 10), truncation(-1, 64, None)
        (54, 8, 63)
    """
    if truncate_prompt_tokens != -1:
        return truncate_prompt_tokens
    return max(1, max_model_len - (max_tokens if max_tokens and max_tokens > 0 else 1))


def loras_per_prompt(lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
                     count: int) -> list[LoRARequest | None]:
    """Each of ``count`` prompts' adapter from ``generate``'s ``lora_request`` (one for all, or one a prompt)."""
    return _one_a_prompt(lora_request, "lora_request", count, (LoRARequest,),
                         "a jaxserve.LoRARequest, a list of them (one a prompt) or None")


def run_to_completion(driver: Any, prompts: Prompt | Sequence[Prompt],
                      sampling_params: SamplingParams | Sequence[SamplingParams] | None, use_tqdm: bool,
                      priority: Sequence[int] | None = None,
                      lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[dict[str, Any]]:
    """`Engine.generate`'s loop over any ``driver`` with the Engine's batch API (an `Engine`, or
    `jaxserve.replicas.Replicas`): make (validate) every request, queue them, step until each finished."""
    prompts = prompt_list(prompts)
    params_list = _one_a_prompt(sampling_params, "sampling_params", len(prompts), (SamplingParams, PoolingParams),
                                "a SamplingParams, a list of them (one a prompt) or None (a dict: SamplingParams(**d))")
    for sp in params_list:
        if not isinstance(sp, (SamplingParams, PoolingParams)) and sp is not None:
            raise ValueError(f"sampling_params entries must be SamplingParams or None, got {type(sp).__name__}")
    priorities = [0] * len(prompts) if priority is None else _one_a_prompt(
        priority, "priority", len(prompts), (), "a list of ints, one a prompt (vLLM's)")
    loras = loras_per_prompt(lora_request, len(prompts))
    if driver.closed:
        raise RuntimeError("engine is closed")
    if hasattr(driver, "check_params_alive"):
        driver.check_params_alive()
    # A prompt's n samples are n requests. Every prompt's first sample is queued ahead of the others' so the
    # prompts are prefilled together; the other samples then attach the first's indexed pages (the scheduler
    # holds them back while it prefills).
    samples = [sample_requests(sp) for sp in params_list]
    order = ([(i, 0) for i in range(len(prompts))]
             + [(i, j) for i in range(len(prompts)) for j in range(1, len(samples[i]))])
    seeds = getattr(driver, "_seeds", None)  # EngineConfig.seed's draws: a refused batch gives back its own
    drawn = None if seeds is None else seeds.bit_generator.state
    try:
        made = {(i, j): driver.make_request(prompts[i], samples[i][j], priority=priorities[i], lora_request=loras[i])
                for i, j in order}
    except BaseException:
        if drawn is not None:
            seeds.bit_generator.state = drawn
        raise
    requests = [made[key] for key in order]
    for r in requests:
        driver._queue(r)
    pending = {r.request_id for r in requests}
    bar = None
    if use_tqdm and len(requests) > 1:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(requests), desc="generate", unit="req")
    try:
        while pending:
            if not driver.has_unfinished():
                break
            for r in driver.step():
                if r.finish_reason is not None and r.request_id in pending:
                    pending.discard(r.request_id)
                    if bar is not None:
                        bar.update(1)
    except BaseException:
        # A step that raised (or a KeyboardInterrupt) would leave this call's requests queued, and
        # every later step would meet them again: end them so the engine keeps serving.
        for r in requests:
            driver.abort_after_failure(r)
            driver.release(r.request_id)
        raise
    finally:
        if bar is not None:
            bar.close()
    results = {key: driver.release(r.request_id).result() for key, r in zip(order, requests)}
    out = []
    for i, group in enumerate(samples):
        first = results[(i, 0)]
        # Every generation result lists its samples (one where n is 1), so code reading ``outputs`` runs whatever n
        # is, as vLLM's RequestOutput.outputs; an embedding has none.
        pooled = isinstance(group[0], PoolingParams)
        out.append(first if pooled else {**first, "outputs": [results[(i, j)] for j in range(len(group))]})
    return out


def sample_requests(params: SamplingParams | PoolingParams | None) -> list[SamplingParams | PoolingParams | None]:
    """One prompt's requests: ``params.n`` of them, n = 1 each, a seeded one's sample i seeded ``seed + i``
    (as the server's ``n`` does; ``seed - i`` for a negative seed, whose count up would reach -1, "no seed")."""
    if not isinstance(params, SamplingParams) or params.n == 1:
        return [params]
    return [dataclasses.replace(params, n=1, seed=sample_seed(params.seed, i)) for i in range(params.n)]


def run_chat(driver: Any, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: Sequence[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[dict[str, Any]]:
    """`Engine.chat` and `Replicas.chat`: each conversation rendered with ``driver``'s chat template (or
    ``chat_template``, a Jinja string), then run to completion (``lora_request``: `Engine.generate`'s). ``tools``
    (OpenAI tool definitions) and
    ``chat_template_kwargs`` go to the template; ``continue_final_message`` (with
    ``add_generation_prompt=False``) continues the last message instead of starting the assistant's turn.
    `jaxserve.tokenizer.chat_prompts` says what a message may hold; a bad one raises ValueError naming
    ``messages`` before anything runs."""
    prompts = chat_prompts(driver.tokenizer, messages, chat_template=chat_template, tools=tools,
                           add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, template_kwargs=chat_template_kwargs)
    return run_to_completion(driver, prompts, sampling_params, use_tqdm, lora_request=lora_request)


def generate(model: LoadedModel | str | os.PathLike | None, prompts: Prompt | Sequence[Prompt],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             engine_config: EngineConfig | None = None, use_tqdm: bool = True,
             data_parallel_size: int = 1, priority: Sequence[int] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[dict[str, Any]]:
    """Generate completions for one or many prompts (text or token ids).

    ``model`` is what ``jaxserve.load`` returned, a checkpoint path, or None for the embedded
    default model. Returns one dict per prompt: text, token_ids, finish_reason, prompt_token_ids, prompt_tokens,
    cached_tokens, completion_tokens, ttft, tpot, total_time. ``data_parallel_size`` > 1: that many
    engines on as many devices (`jaxserve.replicas.Replicas`), prompts routed by shared prefix and load.

    Example:
        >>> import jaxserve
        >>> outs = jaxserve.generate(None, ["def add(a, b):"], jaxserve.SamplingParams(max_tokens=16, temperature=0),
        ...                          use_tqdm=False)
        >>> outs[0]["finish_reason"] in ("stop", "length")
        True
    """
    engine_config = _serving_loras(engine_config, lora_request)
    if data_parallel_size != 1:
        from jaxserve.replicas import Replicas

        with Replicas(model, engine_config, devices=data_parallel_size) as replicas:
            return replicas.generate(prompts, sampling_params, use_tqdm=use_tqdm, priority=priority,
                                     lora_request=lora_request)
    with Engine(model, engine_config) as engine:
        return engine.generate(prompts, sampling_params, use_tqdm=use_tqdm, priority=priority,
                               lora_request=lora_request)


def embed(model: LoadedModel | str | os.PathLike | None, prompts: Prompt | Sequence[Prompt],
          pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
          engine_config: EngineConfig | None = None, use_tqdm: bool = True,
          lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[dict[str, Any]]:
    """Embeddings of one or many prompts (text or token ids) from ``model`` (as `generate` takes it): vLLM's
    ``LLM.embed``. Each result's ``embedding`` is a float32 ``[hidden_size]`` array: by default the final hidden state
    at the prompt's last token, normalized (`PoolingParams` picks a mean instead, or no normalization).

    Example:
        >>> import jaxserve
        >>> out = jaxserve.embed(None, ["import os", "import sys"], use_tqdm=False)
        >>> out[0]["embedding"].shape, round(float(out[0]["embedding"] @ out[0]["embedding"]), 4)
        ((256,), 1.0)
    """
    with Engine(model, _serving_loras(engine_config, lora_request)) as engine:
        return engine.embed(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request)


def classify(model: LoadedModel | str | os.PathLike | None, prompts: Prompt | Sequence[Prompt],
             pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
             engine_config: EngineConfig | None = None, use_tqdm: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[dict[str, Any]]:
    """`Engine.classify` in one call (vLLM's ``LLM.classify``): ``model`` a sequence classifier
    (``Qwen2ForSequenceClassification``); one dict a prompt with ``probs`` and ``label``.

    Example:
        >>> out = jaxserve.classify("/models/qwen2-sentiment", ["great movie"], use_tqdm=False)  # doctest: +SKIP
        >>> out[0]["label"], out[0]["probs"]                                                   # doctest: +SKIP
        ('positive', array([0.03, 0.97], dtype=float32))
    """
    with Engine(model, _serving_loras(engine_config, lora_request)) as engine:
        return engine.classify(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request)


def run_score(driver: Any, text_1: Any, text_2: Any, pooling_params: PoolingParams | None, use_tqdm: bool,
              lora_request: LoRARequest | None = None) -> list[dict[str, Any]]:
    """`Engine.score` over any driver with ``embed`` and ``classify`` (an `Engine`, `Replicas`): each distinct text
    embedded once; a one-label classifier's pairs classified (a cross-encoder's score)."""
    pairs = score_pairs(text_1, text_2)
    labels = driver.model.config.num_labels
    if labels:
        if labels != 1:
            raise ValueError(f"score needs an embedding model or a classifier of one label (a cross-encoder); this "
                             f"classifier has {labels} labels: classify the texts instead")
        prompts = [cross_encoder_prompt(driver.tokenizer, a, b) for a, b in pairs]
        out = driver.classify(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        return [{"score": float(o["probs"][0]), "prompt_tokens": o["prompt_tokens"]} for o in out]
    texts = list({text_key(t): t for pair in pairs for t in pair}.values())
    out = driver.embed(texts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request)
    return pair_scores(pairs, {text_key(t): o for t, o in zip(texts, out)})


def score(model: LoadedModel | str | os.PathLike | None, text_1: Any, text_2: Any,
          pooling_params: PoolingParams | None = None, *, engine_config: EngineConfig | None = None,
          use_tqdm: bool = True, lora_request: LoRARequest | None = None) -> list[dict[str, Any]]:
    """Cosine similarities of text pairs' embeddings (vLLM's ``LLM.score`` for an embedding model; `Engine.score`).

    Example:
        >>> import jaxserve
        >>> [round(o["score"], 4) for o in jaxserve.score(None, "import os", ["import os"], use_tqdm=False)]
        [1.0]
    """
    score_pairs(text_1, text_2)  # bad pairs are refused before an engine is built
    with Engine(model, _serving_loras(engine_config, lora_request)) as engine:
        return engine.score(text_1, text_2, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request)


def _serving_loras(engine_config: EngineConfig | None, lora_request: Any) -> EngineConfig | None:
    """``engine_config`` with LoRA slots where a one-call API names adapters and the config has none: as many as
    the call names (vLLM's ``enable_lora``)."""
    if lora_request is None or (engine_config is not None and engine_config.max_loras):
        return engine_config
    named = [lora_request] if isinstance(lora_request, LoRARequest) else list(lora_request)
    count = len({r.lora_int_id for r in named if isinstance(r, LoRARequest)})
    return dataclasses.replace(engine_config or EngineConfig(), max_loras=min(max(count, 1), 64))


def beam_search(model: LoadedModel | str | os.PathLike | None, prompts: Prompt | Sequence[Prompt],
                params: BeamSearchParams, *, engine_config: EngineConfig | None = None, use_tqdm: bool = True,
                data_parallel_size: int = 1) -> list[dict[str, Any]]:
    """`Engine.beam_search` in one call (vLLM's ``LLM.beam_search``): one dict a prompt, ``sequences`` best first.

    Example:
        >>> import jaxserve
        >>> outs = jaxserve.beam_search(None, ["def add(a, b):"], jaxserve.BeamSearchParams(beam_width=2, max_tokens=4),
        ...                             use_tqdm=False)
        >>> len(outs[0]["sequences"])
        2
    """
    if data_parallel_size != 1:
        from jaxserve.replicas import Replicas

        with Replicas(model, engine_config, devices=data_parallel_size) as replicas:
            return replicas.beam_search(prompts, params, use_tqdm=use_tqdm)
    with Engine(model, engine_config) as engine:
        return engine.beam_search(prompts, params, use_tqdm=use_tqdm)


def chat(model: LoadedModel | str | os.PathLike | None, messages: Conversation | Sequence[Conversation],
         sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
         engine_config: EngineConfig | None = None, use_tqdm: bool = True, data_parallel_size: int = 1,
         **template_options: Any) -> list[dict[str, Any]]:
    """`generate` for chats (vLLM's ``LLM.chat``): one conversation or a list of them, rendered with the model's
    chat template; ``template_options`` are `Engine.chat`'s (``chat_template``, ``add_generation_prompt``,
    ``continue_final_message``, ``tools``, ``chat_template_kwargs``, ``lora_request``). One result dict per
    conversation.

    Example:
        >>> import jaxserve
        >>> outs = jaxserve.chat(None, [{"role": "user", "content": "def add(a, b):"}],
        ...                      jaxserve.SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        >>> outs[0]["finish_reason"] in ("stop", "length")
        True
    """
    engine_config = _serving_loras(engine_config, template_options.get("lora_request"))
    if data_parallel_size != 1:
        from jaxserve.replicas import Replicas

        with Replicas(model, engine_config, devices=data_parallel_size) as replicas:
            return replicas.chat(messages, sampling_params, use_tqdm=use_tqdm, **template_options)
    with Engine(model, engine_config) as engine:
        return engine.chat(messages, sampling_params, use_tqdm=use_tqdm, **template_options)
