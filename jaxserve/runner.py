"""The jitted device steps: tensors in, sampled tokens out.

Owns the model parameters, the KV pages and the compiled prefill and multi-step decode
functions. The KV pages are donated to every call, so the cache scatter kernel updates them
in place and no step ever copies the pool. The runner never decides which request runs,
never allocates pages and never looks at text: the scheduler hands it page tables and
lengths.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import os
import pkgutil
import threading
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxserve import kv_pool
from jaxserve.config import ModelConfig
from jaxserve.model import (KVCache, PagedAttention, Qwen2ForCausalLM, check_weight_layout, greedy_head_applies,
                            new_kv_cache)
from jaxserve.pooling import pool_hidden
from jaxserve.quantization import is_quantized
from jaxserve.sampling import (PromptLogprobs, SampleOutput, SamplingBatch, ban_bad_words, no_logprobs,
                               processed_logits, push_recent, row_keys, sample, scored, target_logprobs, token_ranks,
                               unpack_allowed, update_counts)
from jaxserve.speculative import draft_history, draft_recent, draft_states, rejection_sample
from jaxserve.tensor_parallel import AXIS, TensorParallel

# XLA compiler options of decode steps wider than the skinny matmul serves, whose projections
# are XLA GEMMs. cuBLAS instead of XLA's Triton GEMMs: cuBLAS takes the residual adds into
# its epilogue (no separate add kernels); H100, Qwen2.5-0.5B, batch 256: step 2.08 -> 1.81 ms
# (bench/results/decode_step.md, session 4). Only these compiles get it: at batch <= 64 the
# same flag process-wide measured no gain. JAXSERVE_WIDE_DECODE_OPTIONS (JSON) overrides.
WIDE_DECODE_OPTIONS: dict[str, Any] = json.loads(
    os.environ.get("JAXSERVE_WIDE_DECODE_OPTIONS", '{"xla_gpu_enable_triton_gemm": false}'))

# XLA compiler options of the other decode steps (the skinny path's, up to `model.skinny_rows`); empty:
# XLA's defaults. For experiments in one process (bench/decode_step.py --glue while_graphs: the loop in
# one command buffer, 0.807 against 0.787 ms at 64 rows on the H200, session 22). JAXSERVE_DECODE_OPTIONS
# (JSON) sets it.
DECODE_OPTIONS: dict[str, Any] = json.loads(os.environ.get("JAXSERVE_DECODE_OPTIONS", "{}"))

# Decode calls of at least this many rows (even counts; 0: off) run each step as two independent half-batch
# chains that share only the weights and the KV pool (written in place: a half's attention kernel waits on the
# other half's at the same layer, nothing else does). Why: at 256 rows every kernel of the step is latency-bound
# (20-50% of the GPU, busy 98.8% of the step; bench/results/kernel_notes.md, session 36), so two chains whose
# kernels may run side by side (XLA's command buffers with `xla_gpu_command_buffer_scheduling_mode` CONCURRENT
# build the step's graph from data dependencies) could fill each other's gaps. Measured on the H200 (session 37,
# bench/results/decode_step.md): 1.356 against 1.199 ms at 256 rows; the two 128-row chains' kernels sum to 1.47x the
# one chain's and jax 0.11.2 ran no two of them at once. Off; kept for an XLA that runs such chains side by side
# (bench/decode_step.py --glue halves / halves_cc). JAXSERVE_HALF_BATCH_ROWS sets it.
HALF_BATCH_ROWS = int(os.environ.get("JAXSERVE_HALF_BATCH_ROWS", "0"))

# Decode steps a call unrolled in the compiled loop (`lax.scan(unroll=...)`): 1 keeps XLA's while loop (its
# induction variable is a kernel a step); `num_steps` or more unrolls the call whole. Compile time grows with
# it. JAXSERVE_DECODE_UNROLL sets it.
DECODE_UNROLL = int(os.environ.get("JAXSERVE_DECODE_UNROLL", "1"))

# XLA compiler options of prefill chunks: cuBLAS instead of XLA's Triton GEMMs here too. H200,
# Qwen2.5-0.5B, bf16, one process, alternating rounds (bench/prefill_step.py, session 10): a
# 64 x 128-token chunk 13.57 -> 12.70 ms, 8 x 1024 15.16 -> 14.51 ms (bench/results/decode_step.md).
# JAXSERVE_PREFILL_OPTIONS (JSON) overrides; "{}" is XLA's defaults.
PREFILL_OPTIONS: dict[str, Any] = json.loads(
    os.environ.get("JAXSERVE_PREFILL_OPTIONS", '{"xla_gpu_enable_triton_gemm": false}'))


# How a greedy step picks its tokens under the "pallas" impl: "kernel" (`jaxserve_kernels.greedy_pick`:
# argmax and the token's log-probability in one pass over the bf16 logits) or "xla" (jnp argmax
# and log-softmax: several XLA reductions, each reading all the logits), the kernel only for
# steps of at least GREEDY_PICK_MIN_ROWS rows. H200, Qwen2.5-0.5B decode step, one process,
# alternating rounds (bench/decode_step.py --glue xla_pick): with the one-exp kernel (session
# 11, two runs) batch 64 1.153 -> 1.140 and 1.135 -> 1.125 ms, 128 1.354 -> 1.327, 256 1.707 ->
# 1.674; session 10's two-exp kernel lost at 64 (1.176 -> 1.212, 1.098 -> 1.106) and was within
# 1.5% either way at batch 1, never timed below 64 since. At 256 rows the bf16 logits (78 MB)
# outgrow the 50 MB L2 and XLA's three or four passes each come from HBM. Both read when a
# Runner is built.
GREEDY_PICK = os.environ.get("JAXSERVE_GREEDY_PICK", "kernel")
GREEDY_PICK_MIN_ROWS = int(os.environ.get("JAXSERVE_GREEDY_PICK_MIN_ROWS", "64"))
# Steps whose rows carry allowed-token masks (structured outputs, allowed_token_ids) pick through the kernel
# too, the masks read inside it (`greedy_pick(logits, allowed)`), where no row asks for log-probabilities;
# off: XLA's unpack + select + argmax over the logits. Off until timed on a GPU (bench/gpu_checks.sh
# masked46); on the CPU machine both give the same tokens (tests/test_greedy_pick.py). JAXSERVE_MASKED_PICK=1.
MASKED_PICK = os.environ.get("JAXSERVE_MASKED_PICK", "0") == "1"


def choose_tokens(logits: jax.Array, batch: SamplingBatch, steps: jax.Array, counts, seen, *, num_top: int,
                  greedy: bool, pick_kernel: bool = False, logprobs: bool = True) -> SampleOutput:
    """The sampler, or plain argmax when the host knows every row is greedy without penalties.

    The greedy path matters on the GPU: the sampler's data-dependent ``lax.cond``s each cost
    a predicate read-back per step, argmax costs one reduction. ``pick_kernel``: the greedy
    pick (without top log-probs) runs as `jaxserve_kernels.greedy_pick`, one launch and one read of the
    logits. ``logits`` may be in any float dtype; log-probs are computed in float32.
    ``logprobs=False`` (no request in the step asked for any): they are NaN, not computed, so
    the greedy pick is the argmax alone (no exponential of the logits). Rows with an allowed-token mask
    (`SamplingBatch.allowed`, structured outputs) take the argmax of their allowed tokens, without the
    sampler's data-dependent branches; their log-probabilities stay the raw model's, as the sampler's. So do rows
    with `bad_words` (`SamplingBatch.bad_words`), whose banned tokens are masked where they are picked.
    """
    if not greedy:
        return sample(logits, batch, steps, counts=counts, seen=seen, num_top_logprobs=num_top,
                      logprobs=logprobs)
    masked = bool(batch.allowed.shape[1])
    banning = bool(batch.bad_words.shape[1])
    named = bool(batch.logprob_ids.shape[1])  # some row's logprob_token_ids: scored below, as top tokens are
    if pick_kernel and num_top == 0 and not banning and not named and (not masked or (MASKED_PICK and not logprobs)):
        from jaxserve_kernels.greedy_pick import greedy_pick

        tokens, chosen = greedy_pick(logits, batch.allowed if masked else None, logprobs=logprobs)
        out = no_logprobs(tokens)  # no top tokens either way
        # vLLM's rank of an argmax is 1 but for ties: counted as the sampler's path does.
        return out if chosen is None else out.replace(logprobs=chosen, ranks=token_ranks(logits, tokens))
    picked = jnp.where(unpack_allowed(batch.allowed, logits.shape[-1]), logits, -jnp.inf) if masked else logits
    picked = ban_bad_words(picked, batch)
    tokens = jnp.argmax(picked, axis=-1).astype(jnp.int32)
    if not logprobs and num_top == 0:
        return no_logprobs(tokens)
    return scored(logits, tokens, num_top, batch.logprob_ids)


log = logging.getLogger("jaxserve.runner")


class StepShapes(set):
    """The step shapes a `Runner` has called, each compiled on its first call (or read from the compile cache).

    A shape seen for the first time is logged: at INFO, since a compile while serving holds every running stream
    for seconds and the line says which shape the warm-up did not cover; at DEBUG inside `Engine.warmup`
    (``quiet``), which compiles them on purpose and logs their count.

    Example:
        >>> shapes = StepShapes(); shapes.add(("decode", (8, 1))); len(shapes)
        1
    """

    quiet = False

    def add(self, key: tuple) -> None:
        if key not in self:
            log.log(logging.DEBUG if self.quiet else logging.INFO, "new step shape (%d so far): %s", len(self) + 1,
                    key)
        super().add(key)


class _Ahead:
    """The compiles `Runner.compiling_ahead` started: at most twice ``threads`` lowered steps wait (each holds its
    module), and a compile keeps no executable of its own (JAX's cache does)."""

    def __init__(self, threads: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxserve-compile")
        self.slots = threading.BoundedSemaphore(2 * threads)
        self.futures: list[concurrent.futures.Future] = []

    def compile(self, lowered: Any) -> None:
        self.slots.acquire()

        def run() -> None:
            try:
                lowered.compile()
            finally:
                self.slots.release()

        self.futures.append(self.pool.submit(run))

    def wait(self) -> None:
        for future in self.futures:
            future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Runner:
    """Runs prefill chunks and decode steps of the model over the paged KV cache: its own KV pages,
    the compiled steps (`Steps`) shared with every runner alike in the process. With ``tensor_parallel`` the params
    and pages are split over its devices here (`jaxserve.tensor_parallel`); params with fp8 projections
    (`jaxserve.quantization.quantize_params`) run the model's quantized variant.

    Example:
        >>> runner = Runner(m.config, m.params, num_pages=256, page_size=16)      # doctest: +SKIP
        >>> out = runner.prefill(tokens, q_start, lengths, block_tables, batch, steps)  # doctest: +SKIP
    """

    def __init__(self, config: ModelConfig, params: Any, *, num_pages: int, page_size: int,
                 attention_impl: str = "pallas", prefill_options: dict[str, Any] | None = None,
                 tensor_parallel: TensorParallel | None = None, kv_dtype: Any = None) -> None:
        check_weight_layout(params, config)
        self.config = config
        self.tp = tensor_parallel
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = params["embed_tokens"]["embedding"].dtype
        # The pool's dtype: the activations', or an fp8 format (`EngineConfig.kv_cache_dtype`). The steps need no
        # other word of it: the kernels read the pool's dtype off the arrays they are traced with.
        self.kv_dtype = jnp.dtype(self.dtype if kv_dtype is None else kv_dtype)
        quantized = is_quantized(params)
        self.attention_impl = attention_impl
        self.set_params(params)
        self.kv: KVCache | None = None
        self.new_kv()
        self.compiled_shapes = StepShapes()
        self._ahead: _Ahead | None = None  # set inside `compiling_ahead`
        # Made once: a jnp.zeros a call would be one more dispatch (and a kernel) on the host's path.
        self._no_counts = jnp.zeros((1, 1), jnp.int32)
        prefill_options = PREFILL_OPTIONS if prefill_options is None else prefill_options
        self.compiled = steps_for(config, self.dtype, page_size, attention_impl, prefill_options, tensor_parallel,
                                  quantized)

    def prefill(self, tokens: np.ndarray, q_start: np.ndarray, lengths: np.ndarray, block_tables: np.ndarray,
                batch: SamplingBatch, steps: np.ndarray, counts=None, seen=None, num_top: int = 0,
                greedy: bool = False, logprobs: bool = True, prompt_targets: np.ndarray | None = None,
                prompt_top: int = 0, lora: dict | None = None, pool_from: np.ndarray | None = None,
                embeds: tuple[np.ndarray, np.ndarray] | None = None):
        """One chunk per row: ``tokens [B, S]`` at positions ``q_start[b]..``; samples after row's last token.
        ``logprobs=False``: the chosen tokens' log-probabilities are NaN, not computed.

        ``lora`` (rows with LoRA adapters): ``{"weights": ..., "slots": [B]}``, `jaxserve.lora.LoraSlots.weights`
        and each row's slot (-1: the base model); a variant compiled apart, as for every call below.

        ``prompt_targets [B, S]`` (prompt log-probabilities asked for): the token that follows each
        position; the call then also returns a `PromptLogprobs`, the log-probability of each target
        and the ``prompt_top`` best tokens at every position, from a variant compiled apart, so
        batches that ask for none run the usual step. ``pool_from [B]`` (pooling rows, `jaxserve.pooling`): it
        also returns each row's final hidden states pooled (`pooling.pool_hidden`: ``[2, B, hidden]``, at the row's
        last token and summed from position ``pool_from[b]``), another variant. With either, the call returns
        ``(out, PromptLogprobs or None, pooled or None)``. ``embeds``: ``(embeds [B, S, hidden] float32, where [B, S]
        bool)``, embeddings read in place of the tokens' where set (prompts given as embeddings), a variant too.

        Example:
            >>> out, plp, _ = runner.prefill(tokens, q_start, lengths, tables, batch, steps,
            ...                              prompt_targets=targets, prompt_top=20)  # doctest: +SKIP
            >>> plp.logprobs.shape == tokens.shape                                 # doctest: +SKIP
            True
        """
        prompt = -1 if prompt_targets is None else prompt_top
        self.compiled_shapes.add(("prefill", tokens.shape, block_tables.shape, batch.bias_ids.shape[1],
                                  batch.allowed.shape[1], num_top, counts is not None, greedy, logprobs)
                                 + ((prompt,) if prompt >= 0 else ()) + _bad_words_key(batch) + _lora_key(lora)
                                 + _logprob_ids_key(batch.logprob_ids)
                                 + (("pool",) if pool_from is not None else ()) + (("embeds",) if embeds else ()))
        targets = None if prompt_targets is None else _int32(prompt_targets)[0]
        pool = None if pool_from is None else _int32(pool_from)[0]
        self.kv, out = self._run(
            self.compiled.prefill, self._params(lora), self.kv, *_int32(tokens, q_start, lengths, block_tables), batch,
            *_int32(steps), counts, seen, targets, pool, embeds, num_top=num_top, greedy=greedy, logprobs=logprobs,
            prompt_top=prompt)
        return out

    def verify(self, tokens: np.ndarray, q_start: np.ndarray, lengths: np.ndarray, block_tables: np.ndarray,
               num_top: int = 0, logprobs: bool = False, batch: SamplingBatch | None = None,
               steps: np.ndarray | None = None, lora: dict | None = None, counts: jax.Array | None = None,
               seen: jax.Array | None = None, guides: tuple | None = None,
               logprob_ids: np.ndarray | None = None) -> tuple[SampleOutput, jax.Array | None]:
        """A speculative decoding verify call (`jaxserve.speculative`): ``tokens [B, S]`` at positions
        ``q_start[b]..`` (each row's last token, then its draft; positions from ``lengths[b]`` on are padding),
        their K/V written as a prefill chunk's. Returns ``(out, count)`` on the device. Without ``batch`` (every
        row greedy): ``out.tokens [B, S]`` the greedy pick after every position, ``count`` None (the host compares
        them with the drafts). With ``batch`` (its rows' sampling parameters; ``steps``, each row's tokens so far):
        rows sample by `speculative.rejection_sample`, ``out.tokens`` their emitted tokens, the first ``count[b]``
        of each row. ``out`` holds each token's raw log-probability and the ``num_top`` best tokens at its position
        where ``logprobs`` (else NaN). Each position's target takes the rows' masks, logit bias, min_tokens ban
        (at its own step) and, with ``counts`` / ``seen`` (where a row has penalties: the decode step's output-token
        counts and seen tokens, ``[B, V]``), penalties with the drafts before it counted
        (`speculative.draft_history`), and bad words with the drafts shifted into the tokens they read
        (`speculative.draft_recent`), as a decode step would (`sampling.processed_logits`). ``guides`` (with
        ``batch``; `decode`'s ``(masks, next, states)``): structured outputs, position j of a row taking the mask of
        its guide's state after the first j draft tokens (`speculative.draft_states`). ``logprob_ids [B, W]`` (rows'
        `logprob_token_ids`, `sampling.logprob_id_array`; given apart from ``batch``, which greedy calls go without):
        ``out.id_logprobs`` / ``id_ranks`` score them at every position.

        Example:
            >>> out, _ = runner.verify(tokens, q_start, lengths, block_tables)  # doctest: +SKIP
            >>> out.tokens.shape == tokens.shape                                 # doctest: +SKIP
            True
        """
        self.compiled_shapes.add(("verify", tokens.shape, block_tables.shape, num_top, logprobs, batch is not None,
                                  counts is not None) + _lora_key(lora)
                                 + (_bad_words_key(batch) if batch is not None else ())
                                 + (("guides", guides[0].shape[0]) if guides else ())
                                 + _logprob_ids_key(logprob_ids))
        guided = (None,) * 3 if guides is None else (guides[0], guides[1], *_int32(guides[2]))
        sampled = () if batch is None else (batch, *_int32(steps), counts, seen, *guided)
        named = None if logprob_ids is None or not logprob_ids.shape[1] else _int32(logprob_ids)[0]
        self.kv, out = self._run(self.compiled.verify, self._params(lora), self.kv,
                                 *_int32(tokens, q_start, lengths, block_tables), *sampled, logprob_ids=named,
                                 num_top=num_top, logprobs=logprobs)
        return out

    @contextlib.contextmanager
    def compiling_ahead(self, threads: int):
        """Inside, step calls only trace: each step's compile goes to one of ``threads`` threads and the call returns
        zeros of its outputs' shapes, the KV pool untouched. Leaving waits for every compile (and raises the first
        compile error). A later call of a step compiled here finds it in JAX's cache.

        Why: a warm-up of a server's ~100 step shapes compiled one after the other took minutes on an H100 (~3 s a
        shape, bench/results/serving_stream_h100.md, session 73), while XLA's compile, the larger part, runs without
        the GIL: on a host of 16 cores, several at once.

        Example:
            >>> with runner.compiling_ahead(8):                       # doctest: +SKIP
            ...     runner.decode(tokens, positions, limits, tables, batch, steps, 8)
            >>> runner.decode(tokens, positions, limits, tables, batch, steps, 8)  # no compile   # doctest: +SKIP
        """
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        kv, ahead = self.kv, _Ahead(threads)
        self._ahead = ahead
        try:
            yield
            ahead.wait()
        finally:
            self._ahead, self.kv = None, kv
            ahead.close()

    def _run(self, fn, *args, **static):
        if self._ahead is None:
            return fn(*args, **static)
        lowered = fn.lower(*args, **static)
        self._ahead.compile(lowered)
        _, *outs = lowered.out_info  # the pool is the first; the caller keeps the real one
        return (self.kv, *jax.tree.map(lambda o: np.zeros(o.shape, o.dtype), outs))  # host zeros: no compile each

    def set_params(self, params: Any) -> None:
        """The weights the steps run with (the model's tree and dtypes: the compiled steps stay valid); split over
        the devices under tensor parallelism (`jaxserve.tensor_parallel`)."""
        self.params = params if self.tp is None else self.tp.shard_params(params, self.config)

    def new_kv(self) -> None:
        """A fresh KV pool (``num_pages`` pages; what they held is gone)."""
        if self.tp is None:
            self.kv = new_kv_cache(self.config, self.num_pages, self.page_size, self.kv_dtype)
        else:
            self.kv = self.tp.new_kv_cache(self.config, self.num_pages, self.page_size, self.kv_dtype)

    def free(self, weights: bool = False, keep: Any = None) -> None:
        """Give the KV pool's device memory back now, not when the arrays' last reference goes (the engine's
        `sleep`); with ``weights`` the weights' too, but for arrays that are leaves of ``keep`` (the caller's own
        params, which the runner may hold as they are: deleting them would break the caller's model)."""
        for leaf in jax.tree_util.tree_leaves(self.kv):
            leaf.delete()
        self.kv = None
        if weights:
            theirs = {id(leaf) for leaf in jax.tree_util.tree_leaves(keep)}
            for leaf in jax.tree_util.tree_leaves(self.params):
                if id(leaf) not in theirs:
                    leaf.delete()
            self.params = None

    def _params(self, lora: dict | None):
        if lora is None:
            return self.params
        return {**self.params, "lora": {**lora, "slots": _int32(lora["slots"])[0]}}

    def decode_fn(self, rows: int):
        """The jitted multi-step decode for a batch of ``rows`` (the wide one past the skinny
        matmul's rows, ``jaxserve.model.skinny_rows``, or past ``model.XLA_GATE_UP_ROWS`` when set)."""
        return self.compiled.decode_fn(rows)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, limits: np.ndarray, block_tables: np.ndarray,
               batch: SamplingBatch, steps: np.ndarray, num_steps: int, counts=None, seen=None, num_top: int = 0,
               greedy: bool = False, logprobs: bool = True, return_last: bool = False, live_rows: int | None = None,
               guides: tuple | None = None, lora: dict | None = None):
        """``num_steps`` decode steps in one device call; row b stops writing at position ``limits[b]``.
        ``live_rows``: the rows past it are padding whose attention does not run (`model.PagedAttention`).
        ``guides``: ``(masks [G, W], next [G, V], states [B], advance [B])``, structured outputs followed on the
        device: each step row b may take the tokens of ``masks[state_b]`` (packed as `SamplingBatch.allowed`) and
        moves to ``next[state_b, token]``; rows where ``advance`` is set first move by their input token (a first
        token the host has not read: `jaxserve.engine.Engine._guide_tables` builds them).

        Returns the sampler's outputs stacked ``[num_steps, B]`` (log-probabilities NaN with
        ``logprobs=False``: no row asked for them, and the greedy pick is then an argmax alone);
        with ``return_last``, ``(outputs, the last step's tokens [B])``: what a chained call starts
        from, sliced inside this call (an eager slice would be one more dispatch a call); with ``guides``,
        ``(tokens, states)``, the rows' guide states after the call too.
        """
        penalties = counts is not None
        if not penalties:  # placeholders keep one signature; they are never read
            counts = seen = self._no_counts
        live_rows = None if live_rows == tokens.shape[0] else live_rows
        guide_rows = -1 if guides is None else guides[0].shape[0]
        self.compiled_shapes.add(("decode", tokens.shape, block_tables.shape, batch.bias_ids.shape[1],
                                  batch.allowed.shape[1], num_steps, num_top, penalties, greedy, logprobs)
                                 + ((live_rows,) if live_rows else ()) + (("guides", guide_rows) if guides else ())
                                 + _bad_words_key(batch) + _lora_key(lora) + _logprob_ids_key(batch.logprob_ids))
        masks, nxt, states, advance = (None,) * 4 if guides is None else (guides[0], guides[1],
                                                                         *_int32(guides[2], guides[3]))
        self.kv, out, last = self._run(
            self.decode_fn(tokens.shape[0]), self._params(lora), self.kv,
            *_int32(tokens, positions, limits, block_tables), batch, *_int32(steps), counts, seen, masks, nxt, states,
            advance, num_steps=num_steps, num_top=num_top, penalties=penalties, greedy=greedy, logprobs=logprobs,
            live_rows=live_rows)
        return (out, last) if return_last else out


class Steps:
    """The jitted prefill chunk and multi-step decode of one model shape, dtype, page size and
    attention impl, traced under one setting of jaxserve's and the kernels' module knobs.

    Shared by every Runner that matches (`steps_for`): a second engine in one process, or a
    second `jaxserve.generate` call, reuses the compiled steps instead of tracing and compiling
    them again (on the H200 a second `generate` of 8 x 32 tokens took 0.05 s against 7.7 s for the
    first, bench/results/throughput.md, session 22). A Runner holds its own as ``runner.compiled``.
    `jax.clear_caches()` frees their compiled programs (the next call compiles again).

    Example:
        >>> runner = Runner(m.config, m.params, num_pages=64, page_size=16)     # doctest: +SKIP
        >>> runner.compiled.decode_fn(8) is runner.compiled.decode              # doctest: +SKIP
        True
    """

    def __init__(self, config: ModelConfig, dtype: Any, page_size: int, attention_impl: str,
                 prefill_options: dict[str, Any], tensor_parallel: TensorParallel | None = None,
                 quantized: bool = False) -> None:
        self.model = Qwen2ForCausalLM(config, dtype, quantized=quantized)
        self.tp = tensor_parallel
        if tensor_parallel is not None:  # what each device runs inside `jax.shard_map` (`_forward`)
            self.local_model = Qwen2ForCausalLM(tensor_parallel.local_config(config), dtype, AXIS, tensor_parallel.size,
                                                quantized)
        self.page_size = page_size
        self.attention_impl = attention_impl
        self.prefill = jax.jit(self._prefill_impl, donate_argnums=(1,), static_argnames=("num_top", "greedy", "logprobs", "prompt_top"),
                               compiler_options=prefill_options or None)
        self.verify = jax.jit(self._verify_impl, donate_argnums=(1,), static_argnames=("num_top", "logprobs"),
                              compiler_options=prefill_options or None)
        decode_static = ("num_steps", "num_top", "penalties", "greedy", "logprobs", "live_rows")
        self.decode = jax.jit(self._decode_impl, donate_argnums=(1,), static_argnames=decode_static,
                              compiler_options=DECODE_OPTIONS or None)
        # Batches too wide for the skinny matmul project through XLA's GEMMs; for those steps
        # its own options may differ (see WIDE_DECODE_OPTIONS). The row limit is read once here:
        # the model reads the global when it traces, so a runner built (and traced) under one
        # value must keep routing by it when the global later changes (bench/decode_step.py
        # builds runners under several; session 9's batch-256 rows timed the wrong compile).
        from jaxserve import model as model_module

        self.skinny_rows = model_module.skinny_rows(dtype)
        # Steps whose gate_up runs as XLA's GEMM (model.XLA_GATE_UP_ROWS) take the wide compile too:
        # its options give that product to cuBLAS, not XLA's Triton GEMM (11.14 vs 10.30 µs a layer
        # at 256 rows on the H200, bench/results/decode_step.md session 18).
        self.xla_gate_up_rows = model_module.XLA_GATE_UP_ROWS
        if GREEDY_PICK not in ("kernel", "xla"):
            raise ValueError(f"JAXSERVE_GREEDY_PICK must be 'kernel' or 'xla', got {GREEDY_PICK!r}")
        # A classifier's logits are its few labels' (a pooling row's token is never taken): XLA's argmax.
        self.pick_kernel = attention_impl == "pallas" and GREEDY_PICK == "kernel" and not config.num_labels
        self.pick_min_rows = GREEDY_PICK_MIN_ROWS
        self.decode_wide = jax.jit(self._decode_impl, donate_argnums=(1,), static_argnames=decode_static,
                                   compiler_options=WIDE_DECODE_OPTIONS or None)

    def decode_fn(self, rows: int):
        wide = rows > self.skinny_rows or 0 < self.xla_gate_up_rows < rows
        return self.decode_wide if wide else self.decode

    def _forward(self, params, kv, tokens, positions, paged, logits_at=None, greedy_tokens: bool = False,
                 hidden_states: bool = False, input_embeds: tuple | None = None):
        # Activation-dtype logits: the samplers widen them to float32 where they read them (exact). A call with
        # LoRA rows carries the adapters beside the weights (`Runner._params`): a variant traced apart.
        def run(model, params, kv, replicated):
            tokens, positions, paged, logits_at, input_embeds = replicated
            lora = params.get("lora")
            if lora is not None:
                params = {k: v for k, v in params.items() if k != "lora"}
            return model.apply({"params": params}, tokens, positions, kv=kv, paged=paged, logits_at=logits_at,
                               logits_dtype=None, greedy_tokens=greedy_tokens, lora=lora, hidden_states=hidden_states,
                               input_embeds=input_embeds)

        replicated = (tokens, positions, paged, logits_at, input_embeds)
        if self.tp is None:
            return run(self.model, params, kv, replicated)
        # Tensor parallelism (`jaxserve.tensor_parallel`): every device runs the model on its share and all return the
        # same logits (and hidden states); the KV pages stay split by head. check_vma off: the Pallas kernels inside
        # carry no varying-axes rules; the all-reduces and the logits' gather make the replicated outputs replicated.
        sharded = jax.shard_map(functools.partial(run, self.local_model), mesh=self.tp.mesh,
                                in_specs=(self.tp.param_specs(params), P(AXIS), P()), out_specs=(P(), P(AXIS)),
                                check_vma=False)
        return sharded(params, kv, replicated)

    def _greedy_head(self, rows: int, greedy: bool, num_top: int, logprobs: bool, batch: SamplingBatch) -> bool:
        """Whether a step's tokens come from the LM head's argmax (`model.greedy_head_applies`'s kernel; under tensor
        parallelism each device's argmax of its vocabulary slice, so no logits cross devices): every row greedy without
        penalties, allowed-token masks or bad words, no log-probabilities asked for."""
        return (greedy and not logprobs and num_top == 0 and not batch.allowed.shape[1] and not batch.bad_words.shape[1]
                and ((self.tp is not None and not self.model.config.num_labels)
                     or greedy_head_applies(self.model.config, self.model.dtype, rows)))

    def _pick_kernel(self, logits: jax.Array) -> bool:
        return self.pick_kernel and logits.shape[0] >= self.pick_min_rows

    def _chunk_attention(self, s: int, q_start, lengths, block_tables):
        """Positions ``[B, s]`` of a chunk of ``s`` tokens a row from ``q_start`` and its paged attention: K/V
        written where the positions are below ``lengths``, queries reading the row's cached keys below ``q_start``
        and the chunk's own, causally (a prefill chunk's, and a verify call's)."""
        positions = q_start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        valid = positions < lengths[:, None]
        paged = PagedAttention(kv_pool.slots_in_rows(block_tables, positions, valid, self.page_size), block_tables,
                               lengths, q_start, impl=self.attention_impl)
        return positions, paged

    def _prefill_impl(self, params, kv, tokens, q_start, lengths, block_tables, batch: SamplingBatch, steps,
                      counts, seen, targets=None, pool_from=None, embeds=None, *, num_top: int, greedy: bool,
                      logprobs: bool = True, prompt_top: int = -1):
        b, s = tokens.shape
        # Rows whose prompt was given as embeddings (`Runner.prefill`'s ``embeds``): the model reads those.
        forward = self._forward if embeds is None else functools.partial(self._forward, input_embeds=embeds)
        positions, paged = self._chunk_attention(s, q_start, lengths, block_tables)
        logits_at = jnp.maximum(lengths - q_start - 1, 0)
        if prompt_top >= 0 or pool_from is not None:
            # Every position's logits ([B, S, V]) for prompt log-probabilities, the final hidden states for pooling
            # rows (`jaxserve.pooling`): only these variants compute them, so a batch that asks for neither pays
            # nothing for it.
            at = None if prompt_top >= 0 else logits_at
            logits, kv = forward(params, kv, tokens, positions, paged, at, hidden_states=pool_from is not None)
            pooled = prompt = None
            if pool_from is not None:
                logits, hidden = logits
                pooled = pool_hidden(hidden, positions, pool_from, lengths, logits_at)
            if prompt_top >= 0:
                flat = logits.reshape(b * s, -1)
                per = scored(flat, targets.reshape(-1), prompt_top)
                prompt = PromptLogprobs(per.logprobs.reshape(b, s), per.top_ids.reshape(b, s, -1),
                                        per.top_logprobs.reshape(b, s, -1), per.ranks.reshape(b, s))
                logits = jnp.take_along_axis(logits, logits_at[:, None, None], axis=1)
            return kv, (choose_tokens(logits[:, 0], batch, steps, counts, seen, num_top=num_top, greedy=greedy,
                                      logprobs=logprobs), prompt, pooled)
        if self._greedy_head(b, greedy, num_top, logprobs, batch):
            picked, kv = forward(params, kv, tokens, positions, paged, logits_at, greedy_tokens=True)
            return kv, no_logprobs(picked[:, 0])
        logits, kv = forward(params, kv, tokens, positions, paged, logits_at)
        return kv, choose_tokens(logits[:, 0], batch, steps, counts, seen, num_top=num_top, greedy=greedy,
                                 logprobs=logprobs,
                                 pick_kernel=self._pick_kernel(logits))

    def _verify_impl(self, params, kv, tokens, q_start, lengths, block_tables, batch=None, steps=None, counts=None,
                     seen=None, guide_masks=None, guide_next=None, guide_states=None, logprob_ids=None, *, num_top: int,
                     logprobs: bool):
        # A prefill chunk whose every position is scored.
        b, s = tokens.shape
        positions, paged = self._chunk_attention(s, q_start, lengths, block_tables)
        logits, kv = self._forward(params, kv, tokens, positions, paged)
        flat = logits.reshape(b * s, -1)
        count = None
        if batch is None:
            picks = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            per_position = jax.tree.map(lambda a: jnp.repeat(a, s, axis=0), batch)
            if batch.bad_words.shape[1]:  # a bad word's ban reads the tokens before it: the drafts shift in
                per_position = per_position.replace(recent=draft_recent(batch.recent, tokens))
            if guide_masks is not None:  # each position's mask is its guide state's, the drafts before it taken
                per_position = per_position.replace(allowed=_guide_allowed(
                    guide_masks, draft_states(guide_next, guide_states, tokens), per_position.allowed))
            at_step = (steps[:, None] + jnp.arange(s)[None, :]).reshape(-1)  # position j chooses output token steps + j
            history = () if counts is None else draft_history(counts, seen, tokens, lengths - q_start - 1)
            logp = target_logprobs(processed_logits(flat, per_position, at_step, *history), per_position)
            logp = logp.reshape(b, s, -1)
            keys = row_keys(per_position.seeds, at_step).reshape(b, s)
            picks, count = rejection_sample(logp, tokens, lengths - q_start - 1, keys)
        if not logprobs and num_top == 0:
            return kv, (no_logprobs(picks), count)
        named = None if logprob_ids is None else jnp.repeat(logprob_ids, s, axis=0)  # a row's ids at each position
        out = scored(flat, picks.reshape(-1), num_top, named)
        return kv, (jax.tree.map(lambda a: a.reshape(b, s, *a.shape[1:]), out), count)

    def _decode_impl(self, params, kv, tokens, positions, limits, block_tables, batch: SamplingBatch, steps,
                     counts, seen, guide_masks=None, guide_next=None, guide_states=None, guide_advance=None, *,
                     num_steps: int, num_top: int, penalties: bool, greedy: bool, logprobs: bool = True,
                     live_rows: int | None = None):
        # Without log-probabilities a step's outputs are its tokens: the NaN log-probabilities are made once
        # after the loop, not written into the stacked outputs by a kernel every step.
        tokens_only = not logprobs and num_top == 0
        unroll = max(1, min(DECODE_UNROLL, num_steps))
        rows = tokens.shape[0]
        guided, banning = guide_masks is not None, bool(batch.bad_words.shape[1])
        if guided or banning:
            # Per-row state carried from step to step besides the tokens: each row's guide state (structured
            # outputs followed on the device) and its last tokens (which bad words' endings are banned).
            def one(carry, k):
                kv, tokens, counts, seen, states, recent = carry
                step_batch = batch
                if guided:  # this step's masks from each row's state
                    step_batch = step_batch.replace(allowed=_guide_allowed(guide_masks, states, batch.allowed))
                if banning:
                    step_batch = step_batch.replace(recent=recent)
                (kv, tokens, counts, seen), out = self.decode_one(
                    params, (kv, tokens, counts, seen), k, positions, limits, block_tables, step_batch, steps,
                    num_top=num_top, penalties=penalties, greedy=greedy, logprobs=logprobs, live_rows=live_rows)
                active = positions + k < limits
                if guided:
                    states = jnp.where(active, guide_next[states, tokens].astype(jnp.int32), states)
                if banning:
                    recent = push_recent(recent, tokens, active)
                return (kv, tokens, counts, seen, states, recent), out

            states = None
            if guided:
                states = jnp.where(guide_advance != 0, guide_next[guide_states, tokens].astype(jnp.int32),
                                   guide_states)
            (kv, last, _, _, states, _), outs = jax.lax.scan(
                one, (kv, tokens, counts, seen, states, batch.recent if banning else None),
                jnp.arange(num_steps, dtype=jnp.int32), unroll=unroll)
            if guided:
                last = (last, states)  # a chained call continues from both
        elif (HALF_BATCH_ROWS and rows >= HALF_BATCH_ROWS and rows % 2 == 0 and not penalties
              and live_rows is None):
            kv, outs, last = self._decode_halves(params, kv, tokens, positions, limits, block_tables, batch, steps,
                                                 counts, seen, num_steps=num_steps, num_top=num_top, greedy=greedy,
                                                 logprobs=logprobs, unroll=unroll)
        else:
            def one(carry, k):
                return self.decode_one(params, carry, k, positions, limits, block_tables, batch, steps,
                                       num_top=num_top, penalties=penalties, greedy=greedy, logprobs=logprobs,
                                       live_rows=live_rows)

            (kv, last, _, _), outs = jax.lax.scan(one, (kv, tokens, counts, seen),
                                                  jnp.arange(num_steps, dtype=jnp.int32), unroll=unroll)
        return kv, no_logprobs(outs) if tokens_only else outs, last

    def _decode_halves(self, params, kv, tokens, positions, limits, block_tables, batch, steps, counts, seen, *,
                       num_steps: int, num_top: int, greedy: bool, logprobs: bool, unroll: int):
        """`_decode_impl`'s loop as two half-batch chains a step (`HALF_BATCH_ROWS`): `(kv, outputs, last
        tokens)`, the same, row for row."""
        half = tokens.shape[0] // 2
        per_row = (positions, limits, block_tables, batch, steps)
        first, second = (jax.tree.map(lambda a: a[:half], per_row), jax.tree.map(lambda a: a[half:], per_row))
        params_a = params_b = params
        if "lora" in params:  # each half's rows' adapter slots
            slots = params["lora"]["slots"]
            params_a = {**params, "lora": {**params["lora"], "slots": slots[:half]}}
            params_b = {**params, "lora": {**params["lora"], "slots": slots[half:]}}

        def one(carry, k):
            kv, tokens_a, tokens_b = carry
            (kv, tokens_a, _, _), out_a = self.decode_one(params_a, (kv, tokens_a, counts, seen), k, *first,
                                                          num_top=num_top, penalties=False, greedy=greedy,
                                                          logprobs=logprobs)
            (kv, tokens_b, _, _), out_b = self.decode_one(params_b, (kv, tokens_b, counts, seen), k, *second,
                                                          num_top=num_top, penalties=False, greedy=greedy,
                                                          logprobs=logprobs)
            return (kv, tokens_a, tokens_b), jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out_a, out_b)

        (kv, last_a, last_b), outs = jax.lax.scan(one, (kv, tokens[:half], tokens[half:]),
                                                  jnp.arange(num_steps, dtype=jnp.int32), unroll=unroll)
        return kv, outs, jnp.concatenate([last_a, last_b])

    def decode_one(self, params, carry, k, positions, limits, block_tables, batch: SamplingBatch, steps, *,
                   num_top: int, penalties: bool, greedy: bool, logprobs: bool = True, live_rows: int | None = None):
        """Step ``k`` of the multi-step decode (traced inside a jit): ``carry = (kv, tokens, counts, seen)`` in
        and out, and the step's output (its tokens alone when neither log-probabilities nor top tokens are
        asked for). Also what bench/half_streams.py builds its two-half loop from."""
        kv, tokens, counts, seen = carry
        tokens_only = not logprobs and num_top == 0
        pos = positions + k
        active = pos < limits
        paged = PagedAttention(kv_pool.slots_in_rows(block_tables, pos[:, None], active[:, None], self.page_size),
                               block_tables, jnp.where(active, pos + 1, 0), pos, impl=self.attention_impl,
                               live_rows=live_rows)
        if self._greedy_head(tokens.shape[0], greedy, num_top, logprobs, batch) and not penalties:
            picked, kv = self._forward(params, kv, tokens[:, None], pos[:, None], paged, greedy_tokens=True)
            return (kv, picked[:, 0], counts, seen), picked[:, 0] if tokens_only else no_logprobs(picked[:, 0])
        logits, kv = self._forward(params, kv, tokens[:, None], pos[:, None], paged)
        out = choose_tokens(logits[:, 0], batch, steps + k, counts if penalties else None,
                            seen if penalties else None, num_top=num_top, greedy=greedy, logprobs=logprobs,
                            pick_kernel=self._pick_kernel(logits))
        if penalties:
            counts, seen = update_counts(counts, seen, out.tokens, active)
        return (kv, out.tokens, counts, seen), out.tokens if tokens_only else out


# How many Steps stay compiled (the engine needs one; a benchmark comparing settings, or a test
# suite, builds several). The least recently built goes first, its compiled programs with it.
STEPS_CACHE_SIZE = 8
_steps_cache: collections.OrderedDict[tuple, Steps] = collections.OrderedDict()
_steps_lock = threading.Lock()
# Where the model, its sampler and its kernels read their knobs (and the kernels package).
TRACED_MODULES = ("jaxserve.config", "jaxserve.kv_pool", "jaxserve.model", "jaxserve.runner", "jaxserve.sampling",
                  "jaxserve_kernels")


def steps_for(config: ModelConfig, dtype: Any, page_size: int, attention_impl: str,
              prefill_options: dict[str, Any], tensor_parallel: TensorParallel | None = None,
              quantized: bool = False) -> Steps:
    """The compiled steps for these arguments, shared with every earlier Runner that matched.

    The key holds every module-level value of jaxserve's and the kernels' modules, since the
    model reads its knobs when it traces (a benchmark sets `model.MGPU_MAX_ROWS`, a test swaps a
    kernel for a spy): a Runner built under other values never gets steps traced under these.

    Example:
        >>> steps_for(m.config, jnp.bfloat16, 16, "pallas", {}) is steps_for(m.config, jnp.bfloat16, 16, "pallas", {})  # doctest: +SKIP
        True
    """
    key = (_frozen(dataclasses.asdict(config)), jnp.dtype(dtype).name, page_size, attention_impl,
           _frozen(prefill_options), module_knobs(), None if tensor_parallel is None else tensor_parallel.key(),
           quantized)
    with _steps_lock:
        steps = _steps_cache.get(key)
        if steps is None:
            steps = _steps_cache[key] = Steps(config, dtype, page_size, attention_impl, prefill_options,
                                              tensor_parallel, quantized)
            while len(_steps_cache) > STEPS_CACHE_SIZE:
                _steps_cache.popitem(last=False)
        _steps_cache.move_to_end(key)
        return steps


def module_knobs() -> tuple:
    """Every module-level name, with its value, of the modules a step's trace reads."""
    import jaxserve_kernels

    names = list(TRACED_MODULES) + [f"jaxserve_kernels.{m.name}" for m in pkgutil.iter_modules(jaxserve_kernels.__path__)]
    knobs = []
    for name in names:
        # Imported here, not as the trace first reaches them: a module that appeared after the
        # first key would change every later one.
        for attr, value in list(vars(importlib.import_module(name)).items()):
            if not (attr.startswith("__") or isinstance(value, types.ModuleType) or value is _steps_cache):
                knobs.append((name, attr, _frozen(value)))
    return tuple(knobs)


class _Same:
    """Compares by identity and holds its object: an object swapped out and freed could otherwise
    leave its id to the next one swapped in (a test's second spy), which would match."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


def _frozen(value: Any) -> Any:
    """Plain data by value (a tile table rebuilt equal still matches), anything else by identity."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((repr(k), _frozen(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(v) for v in value)))
    return _Same(value)


def _guide_allowed(guide_masks: jax.Array, states: jax.Array, allowed: jax.Array) -> jax.Array:
    """The packed masks of rows at guide ``states`` (structured outputs followed on the device), and the rows' own
    ``allowed`` (allowed_token_ids) where some row has them (its width is static: 0 where none)."""
    masks = guide_masks[states]
    return masks & allowed if allowed.shape[1] else masks


def _lora_key(lora: dict | None) -> tuple:
    return () if lora is None else (("lora", lora["weights"]["o_proj"][0][0].shape[0]),)  # slots (`LoraSlots`)


def _logprob_ids_key(logprob_ids: np.ndarray | jax.Array | None) -> tuple:
    """A compiled shape's mark for calls whose rows name tokens to score (`SamplingBatch.logprob_ids`: a variant a
    width); none without."""
    return () if logprob_ids is None or not logprob_ids.shape[1] else (("logprob_ids", logprob_ids.shape[1]),)


def _bad_words_key(batch: SamplingBatch) -> tuple:
    """A compiled shape's mark for batches with bad words (another compiled variant); none without."""
    return ("bad_words",) if batch.bad_words.shape[1] else ()


def _int32(*arrays) -> list:
    """Host arrays as int32 numpy, device arrays untouched (a chained call's tokens stay on the device).

    The jitted call moves numpy arguments itself, cheaper than one ``jnp.asarray`` each.
    """
    return [a if isinstance(a, jax.Array) else np.asarray(a, np.int32) for a in arrays]


@functools.lru_cache(maxsize=None)
def default_attention_impl() -> str:
    """Compiled Pallas kernels on a GPU; the jnp references on the CPU (interpret mode is for tests)."""
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def enable_compile_cache(path: str | os.PathLike, min_compile_time_s: float = 0.0) -> None:
    """Keep every compiled step in a persistent cache at ``path`` (process-wide, JAX's own cache).

    A restarted engine then loads its step shapes instead of compiling them: on the CPU a
    warm-up of 50 shapes took 33 s with the cache filled against 113 s without (the tracing
    and lowering remain; bench/results/warmup_cpu.md). Entries are kept whatever their compile time by default,
    because every step shape of a server counts, not only the slow ones; ``min_compile_time_s`` keeps only the
    programs that took at least that long (the test suite's many tiny programs load no faster than they compile).

    Example:
        >>> enable_compile_cache("/tmp/jaxserve-xla-cache")  # doctest: +SKIP
    """
    from jax.experimental.compilation_cache import compilation_cache

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    # Whatever compiled earlier in the process (loading the weights does) initialized the
    # cache without a directory; start it over so that the next compilation sees this one.
    compilation_cache.reset_cache()
