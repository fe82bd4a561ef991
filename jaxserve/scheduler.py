"""Who runs next: admission, prefix reuse, page growth, preemption.

Owns the waiting queue, the running set, the page pool bookkeeping and the radix prefix
index (both pure-array state, kept on the host CPU device and updated with jitted pure
functions, so admission and prefix matching never wait on the accelerator). It never runs the
model and never samples: it returns a ``Plan`` that the engine hands to the runner.

Rules, in one place:
- A request is admitted when a sequence slot is free and pages for its whole prompt can be
  had (evicting unused cached prefixes first). Its longest cached prefix (whole pages, at
  least one prompt token left to compute) is attached instead of recomputed, unless the request
  still needs prompt log-probabilities.
- Prompts longer than the step's token budget are prefilled in chunks.
- A waiting request whose prompt shares at least a page beyond the cache with a prompt being
  prefilled (the n samples of one prompt, requests with one long system prompt) waits until that
  prefill is dispatched and indexed, then attaches those pages instead of computing them again
  (SGLang's in-batch prefix caching); the requests behind it are admitted meanwhile.
- Before a decode call of ``k`` steps every decoding request gets room for ``k`` more
  tokens; when pages run out, cached prefixes are evicted, then the most recently admitted
  request is preempted (its pages freed; it re-enters the queue's front and is recomputed
  from prompt + output, so nothing is lost).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import kv_pool, radix_index
from jaxserve.engine_config import EngineConfig
from jaxserve.request import Request, Status


@dataclasses.dataclass
class Plan:
    """One engine step: prefill chunks ``(request, start, end)`` and/or ``decode_steps`` decode steps."""

    prefill: list[tuple[Request, int, int]]
    decode: list[Request]
    decode_steps: int


_create_pool = jax.jit(kv_pool.create, static_argnums=(0, 1, 2, 3))
_create_index = jax.jit(radix_index.create, static_argnums=(0, 1))
# Sequences a host-side index call takes (`radix_index.insert_many`, `unlock_many`); fewer are padding rows.
_INDEX_ROWS = 8


def _claim_prefix(index: radix_index.RadixIndex, pool: kv_pool.PagePool, tokens: jax.Array, length: jax.Array,
                  slot: jax.Array) -> tuple[radix_index.RadixIndex, kv_pool.PagePool, jax.Array]:
    """A waiting request's cached prefix in one call: match ``tokens[:length]``, attach the matched pages to the
    (empty) ``slot`` and lock the path. Returns ``[cached tokens, locked node or -1]``: one read-back, where match,
    attach, the path's last node and lock were four jitted calls and two read-backs (~0.1 ms each on the host)."""
    index, n, pages, nodes = radix_index.match(index, tokens, length)
    node = radix_index.deepest_node(nodes)
    pool, index = jax.lax.cond(n > 0, lambda: (kv_pool.attach(pool, slot, pages, n), radix_index.lock(index, node)),
                               lambda: (pool, index))
    return index, pool, jnp.stack([n, jnp.where(n > 0, node, -1)])


class _HostState:
    """The pool and the index, with their pure functions jitted once for the CPU backend."""

    def __init__(self, num_pages: int, page_size: int, max_seqs: int, max_pages_per_seq: int, capacity: int):
        self.cpu = jax.devices("cpu")[0]
        with jax.default_device(self.cpu):
            # Committed to the CPU like every later state (outputs of the jitted updates): an
            # uncommitted first state made each function compile twice, the second time in the
            # middle of serving. Built by one jitted call each: run eagerly, their ~40 small ops each
            # compiled on its own for every new pool shape (~1 s an engine of a test suite's many).
            self.pool = jax.device_put(_create_pool(num_pages, page_size, max_seqs, max_pages_per_seq), self.cpu)
            self.index = jax.device_put(_create_index(capacity, page_size), self.cpu)
        # Donated, so each update reuses the state's buffers instead of copying them (about 4x
        # cheaper per request on the CPU: bench/results/prefix_index.md). They take host arrays (numpy) as they
        # are: a call whose state is committed to the CPU runs there and moves its uncommitted arguments along,
        # where a `jax.device_put` each first cost ~0.1 ms of the engine thread (tests/test_scheduler.py checks
        # that the state stays on the CPU beside another default device).
        self._allocate = jax.jit(kv_pool.allocate, donate_argnums=0)
        self._allocate_batch = jax.jit(kv_pool.allocate_batch, donate_argnums=0)
        self._free = jax.jit(kv_pool.free, donate_argnums=0)
        self._free_batch = jax.jit(kv_pool.free_batch, donate_argnums=0)
        self._claim_prefix = jax.jit(_claim_prefix, donate_argnums=(0, 1))
        self._insert_many = jax.jit(radix_index.insert_many, donate_argnums=(0, 1))
        self._unlock = jax.jit(radix_index.unlock, donate_argnums=0)
        self._unlock_many = jax.jit(radix_index.unlock_many, donate_argnums=0)
        self._evict = jax.jit(radix_index.evict, donate_argnums=(0, 1))
        self._clear = jax.jit(radix_index.clear, donate_argnums=(0, 1), static_argnames="locked")
        # One call for `Engine.stats()` (a server's /metrics polls it), not ~30 eager ops.
        self._pool_stats = jax.jit(kv_pool.stats)
        self._index_stats = jax.jit(radix_index.stats)


class Scheduler:
    """Plans steps over a fixed pool of ``num_pages`` pages and ``config.max_running`` slots.

    Example:
        >>> s = Scheduler(EngineConfig(num_pages=64), num_pages=64, max_model_len=512)  # doctest: +SKIP
        >>> s.add(request); plan = s.schedule()                                      # doctest: +SKIP
    """

    def __init__(self, config: EngineConfig, num_pages: int, max_model_len: int, lora: Any = None) -> None:
        self.config = config
        self.lora = lora  # `jaxserve.lora.LoraSlots`: admitted requests hold their adapter's slot
        self.page_size = config.page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.max_pages_per_seq = math.ceil(max_model_len / self.page_size)
        capacity = config.index_capacity or num_pages
        self.state = _HostState(num_pages, self.page_size, config.max_running, self.max_pages_per_seq, capacity)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_slots = list(range(config.max_running - 1, -1, -1))
        self._decodes_since_prefill = 0
        self.num_preemptions = 0
        # Engine-thread time in radix-index calls (match, attach, lock, insert): on a GPU a step's
        # device work is a few ms, so this is what prefix caching costs per request.
        self.index_s = 0.0

    # ----- queue -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if self.config.scheduling_policy == "priority":
            self._insert_by_priority(request)
        else:
            self.waiting.append(request)

    def _requeue(self, request: Request) -> None:
        """Back into the queue after it had started (preempted, or claimed and handed back): at the front in
        arrival order; under priority scheduling where its priority and arrival place it (ahead of the later
        arrivals of its priority)."""
        if self.config.scheduling_policy == "priority":
            self._insert_by_priority(request)
        else:
            self.waiting.appendleft(request)

    def _insert_by_priority(self, request: Request) -> None:
        at = bisect.bisect_right(self.waiting, (request.priority, request.arrival),
                                 key=lambda r: (r.priority, r.arrival))
        self.waiting.insert(at, request)

    def _victim(self) -> Request:
        """The running request preempted when pages run out: the newest, or under priority scheduling the
        lowest priority's newest (vLLM's choice)."""
        if self.config.scheduling_policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival))
        return self.running[-1]

    def remove(self, request: Request) -> None:
        """Take a request out of the scheduler (finished or aborted), releasing what it holds."""
        self.remove_many([request])

    def remove_many(self, requests: list[Request]) -> None:
        """`remove` for several requests, their slots' pages freed in one call (a batch-256 run
        finishes 256 requests in one step; one jitted `free` each cost ~13 ms of host time there on
        the dev machine's CPU, with nothing on the device to hide it)."""
        freed: list[Request] = []
        ending = [r for r in requests if r in self.running]
        self._insert(ending)  # in one call, then their prefixes' locks in one
        nodes = [r.node for r in ending if r.node > 0]
        st = self.state
        for at in range(0, len(nodes), _INDEX_ROWS):
            chunk = np.full(_INDEX_ROWS, -1, np.int32)
            chunk[: len(nodes[at: at + _INDEX_ROWS])] = nodes[at: at + _INDEX_ROWS]
            st.index = st._unlock_many(st.index, chunk)
        for r in ending:
            r.node = -1
        for request in requests:
            if request in self.waiting:
                self.waiting.remove(request)
            if request in self.running:
                self.running.remove(request)
                self._release(request, index_tokens=False, free_pages=False)
                freed.append(request)
            elif request.slot >= 0:
                # Claimed for admission but never admitted (a step failed in between): off the queue
                # and not running, it would keep its slot, prefix lock and pages for good.
                self._release(request, index_tokens=False)
        if freed:
            (slots,) = self._pow2_rows([r.slot for r in freed])
            st.pool = st._free_batch(st.pool, slots)
            for r in freed:
                self.free_slots.append(r.slot)
                r.slot = -1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ----- pages ---------------------------------------------------------------------------
    def _token_bucket(self, n: int) -> int:
        return min(max(self.page_size, 1 << max(n - 1, 0).bit_length()), self.max_pages_per_seq * self.page_size)

    def _padded(self, tokens: list[int]) -> np.ndarray:
        out = np.zeros(self._token_bucket(len(tokens)), np.int32)
        out[: len(tokens)] = tokens[: out.size]
        return out

    def page_table(self) -> np.ndarray:
        # A copy: the pool's buffers are donated to the next update and may be reused.
        return np.array(self.state.pool.page_table)

    def _free_pages(self) -> int:
        return int(kv_pool.num_free(self.state.pool))

    def _evict(self, pages: int) -> None:
        if self.config.prefix_caching and pages > 0:
            st = self.state
            st.index, st.pool, _ = st._evict(st.index, st.pool, pages)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Room for ``num_tokens`` more tokens in the request's slot, evicting cached prefixes if needed."""
        st = self.state
        for attempt in range(2):
            st.pool, ok = st._allocate(st.pool, request.slot, num_tokens)
            if bool(ok):
                return True
            if attempt == 0:
                self._evict(int(kv_pool.pages_needed(st.pool, request.slot, num_tokens)) - self._free_pages())
        return False

    def _pow2_rows(self, slots, *columns) -> tuple[np.ndarray, ...]:
        """``slots`` and per-row ``columns`` as int32 arrays padded to a power of two, with no-op
        rows (a slot past the pool, zeros): the host-side batched pool functions then compile
        once per length class, not once for every count of rows a step happens to have (~0.5 s
        each on the CPU, while serving)."""
        n = len(slots)
        width = 1 << max(n - 1, 0).bit_length()
        out = [np.full(width, self.config.max_running, np.int32)] + [np.zeros(width, np.int32) for _ in columns]
        for padded, values in zip(out, (slots, *columns)):
            padded[:n] = values
        return tuple(out)

    def _allocate_rows(self, slots: np.ndarray, need: np.ndarray, have: np.ndarray | None = None) -> np.ndarray:
        """`kv_pool.allocate_batch` over ``slots`` (in order), padded (`_pow2_rows`); ok per row. ``have``: the slots'
        `capacities`, given where cached prefixes' pages may be evicted first, in one call, for what the rows need
        beyond the free ones.

        Once cached prefixes fill the pool (a server's steady state), a step's rows crossing a page boundary found
        no free page every step: the batched allocation failed (its one-row-at-a-time scan) and each row went one by
        one (`_grow`: a pool query, an eviction and an allocation a row, each a jitted call), ~0.5 ms a row of the
        engine thread's time on the host CPU."""
        st = self.state
        if have is not None and self.config.prefix_caching:
            pages = -(-(have + need) // self.page_size) - -(-have // self.page_size)
            self._evict(int(pages.sum()) - self._free_pages())
        padded_slots, padded_need = self._pow2_rows(slots, need)
        st.pool, ok = st._allocate_batch(st.pool, padded_slots, padded_need)
        return np.asarray(ok)[: len(slots)]

    def capacities(self) -> np.ndarray:
        """Tokens each slot has room for (one host copy, not one transfer per request)."""
        return np.array(self.state.pool.seq_lens)

    def _insert(self, requests: list[Request]) -> None:
        """Index what each request computed, in order, _INDEX_ROWS sequences a call (`radix_index.insert_many`:
        one jitted insert a request was ~130 µs of host time, nearly all of it the call)."""
        rows = [r for r in requests if self.config.prefix_caching and r.computed >= self.page_size
                and r.indexes_prefix and not r.stale_kv]
        if not rows:
            return
        start = time.perf_counter()
        st = self.state
        table = self.page_table()
        width = self._token_bucket(max(r.computed for r in rows))  # one compile a bucket, as `_padded`'s
        for at in range(0, len(rows), _INDEX_ROWS):
            tokens = np.zeros((_INDEX_ROWS, width), np.int32)
            lengths = np.zeros(_INDEX_ROWS, np.int32)
            pages = np.zeros((_INDEX_ROWS, width // self.page_size), np.int32)
            for i, r in enumerate(rows[at: at + _INDEX_ROWS]):
                ids = r.index_ids[: min(r.computed, width)]
                tokens[i, : len(ids)], lengths[i], pages[i] = ids, len(ids), table[r.slot][: pages.shape[1]]
            st.index, st.pool = st._insert_many(st.index, st.pool, tokens, lengths, pages)
        # Not blocked on: the insert runs on the CPU's own stream while the step goes on, and the
        # engine thread's time (what this counts) is what prefix caching costs the step.
        self.index_s += time.perf_counter() - start

    def _release(self, request: Request, index_tokens: bool, free_pages: bool = True) -> None:
        """Give back what a request holds: its prefix lock, its slot's pages (unless
        ``free_pages`` is False: the caller frees several slots in one call, then the slot)."""
        st = self.state
        if index_tokens:
            self._insert([request])
        if request.node > 0:
            st.index = st._unlock(st.index, request.node)
        request.node, request.stale_kv = -1, False
        if request.lora_slot >= 0:
            self.lora.release(request.lora_slot)
            request.lora_slot = -1
        if free_pages:
            st.pool = st._free(st.pool, request.slot)
            self.free_slots.append(request.slot)
            request.slot = -1

    def clear_index(self, new_weights: bool = False) -> None:
        """Drop every unlocked cached prefix (their pages return to the pool). ``new_weights``: every prefix, the
        ones running requests hold too, and what those requests computed so far is never indexed (K/V of the old
        weights: a later request attaching them would decode from keys the new weights never made)."""
        st = self.state
        if new_weights:
            for request in self.running:
                request.node, request.stale_kv = -1, True  # its slot keeps its own references to its pages
        st.index, st.pool = st._clear(st.index, st.pool, locked=new_weights)

    # ----- admission -----------------------------------------------------------------------
    def _claim(self, request: Request) -> None:
        """A slot and the cached prefix for a waiting request; its new pages come later, for all
        of a step's admissions in one batched allocation (`_allocate_claimed`)."""
        st = self.state
        tokens = request.index_ids
        if request.lora_id:  # first: an adapter that fails to load takes no sequence slot with it
            request.lora_slot = self.lora.acquire(request.lora_namespace)
        slot = self.free_slots.pop()
        request.slot, request.node, cached = slot, -1, 0
        # A request still owed prompt log-probabilities computes its whole prompt (vLLM v1's rule):
        # cached positions have no logits (nor hidden states, for a mean-pooling request). Its pages are indexed
        # after it all the same.
        if self.config.prefix_caching and not request.computes_whole_prompt:
            start = time.perf_counter()
            # Match all but the last token: the last one must be computed to produce logits.
            st.index, st.pool, found = st._claim_prefix(st.index, st.pool, self._padded(tokens), len(tokens) - 1, slot)
            cached, request.node = (int(x) for x in np.asarray(found))
            self.index_s += time.perf_counter() - start
        request.computed, request.prefill_end = cached, len(tokens)
        request.prefill_start = cached

    def _unclaim(self, request: Request) -> None:
        """Undo `_claim` and put the request back at the queue's front."""
        self._release(request, index_tokens=False)
        request.computed = request.prefill_end = 0
        self._requeue(request)

    def _admitted(self, request: Request) -> None:
        if request.num_preemptions == 0:
            request.cached_tokens = request.computed
        request.status = Status.RUNNING
        self.running.append(request)

    def _allocate_claimed(self, claimed: list[Request]) -> int:
        """Pages for the prompts of ``claimed`` (queue order) in one batched allocation; returns how
        many of them, from the front, are now admitted. The rest go back to the queue's front.

        One call for the step, not one a request: each host-side allocation is a jitted call and
        a read-back (~0.1 ms; a prefill step at batch 256 admits 64, bench/results/host_overhead.md).
        Where the pool runs short, everything from the first row that did not fit is handed back
        (newest first, so the queue keeps its order, and pages the scan gave later rows return),
        for the one-by-one path, which evicts cached prefixes before giving up.
        """
        slots = np.array([r.slot for r in claimed], np.int32)
        need = np.array([r.prefill_end - r.computed for r in claimed], np.int32)
        ok = self._allocate_rows(slots, need, self.capacities()[slots])
        kept = len(claimed) if ok.all() else int(np.argmin(ok))
        for r in reversed(claimed[kept:]):
            self._unclaim(r)
        for r in claimed[:kept]:
            self._admitted(r)
        return kept

    def never_fits(self, request: Request) -> bool:
        """True if the request could not run even alone in an empty pool."""
        # The last sampled token is never fed back, so it never gets K/V: counting it refused
        # requests that fit exactly (prompt + max_tokens one token past a page boundary).
        need = math.ceil((len(request.prompt_ids) + request.params.max_tokens - 1) / self.page_size)
        return need > self.num_pages

    # ----- planning ------------------------------------------------------------------------
    def _prefill_rows(self, budget: int) -> list[tuple[Request, int, int]]:
        rows: list[tuple[Request, int, int]] = []
        max_rows = self.config.batch_buckets[-1]

        def fits(chunk: int) -> bool:  # rows are padded to the longest: bound the padded token count
            longest = max([chunk] + [e - s for _, s, e in rows])
            padded = (len(rows) + 1) * EngineConfig.bucket(self.config.prefill_buckets, longest)
            return padded <= 2 * self.config.max_tokens_per_step

        for r in self.running:
            if r.is_prefilling and budget > 0 and len(rows) < max_rows:
                chunk = min(r.prefill_end - r.computed, budget)
                if rows and not fits(chunk):
                    break
                rows.append((r, r.computed, r.computed + chunk))
                budget -= chunk

        def admit(batched: bool) -> list[Request]:
            """Admit from the queue's front while budget, slots and padding allow. ``batched``:
            claim only (pages for all of them come from one `_allocate_claimed`); otherwise each
            gets its pages at once, evicting cached prefixes if needed, and admission stops at
            the first that cannot. Requests that share a prompt being prefilled (`_PrefillSharing`), or
            whose adapter finds every LoRA slot held, are passed over and keep their place in the queue."""
            claimed: list[Request] = []
            held: list[Request] = []
            sharing = _PrefillSharing(self.page_size, [x for x in self.running if x.is_prefilling])
            try:
                admit_from_queue(batched, claimed, held, sharing)
            finally:  # back at the front, ahead of any request `_unclaim` put there: they were ahead of it in the queue
                self.waiting.extendleft(reversed(held))
            return claimed

        def admit_from_queue(batched: bool, claimed: list[Request], held: list[Request],
                             sharing: _PrefillSharing) -> None:
            nonlocal budget
            while self.waiting and budget > 0 and self.free_slots and len(rows) < max_rows:
                r = self.waiting[0]
                if (self.config.prefix_caching and sharing.holds(r)) or (
                        r.lora_id and not self.lora.can_acquire(r.lora_namespace)):  # every adapter slot held
                    if len(held) >= _MAX_HELD:
                        break
                    held.append(self.waiting.popleft())
                    continue
                if rows and not fits(min(len(r.all_ids), budget)):
                    break
                self._claim(r)
                self.waiting.popleft()
                if not batched:
                    if not self._grow(r, r.prefill_end - r.computed):
                        self._unclaim(r)
                        break
                    self._admitted(r)
                claimed.append(r)
                sharing.add(r)
                chunk = min(r.prefill_end - r.computed, budget)
                rows.append((r, r.computed, r.computed + chunk))
                budget -= chunk

        claimed = admit(batched=True)
        if claimed:
            kept = self._allocate_claimed(claimed)
            if kept < len(claimed):
                # The claimed rows are the last ones: drop those handed back, return their budget,
                # and go on one by one (their cached prefixes may have changed meanwhile).
                cut = len(rows) - len(claimed) + kept
                budget += sum(e - s for _, s, e in rows[cut:])
                del rows[cut:]
                admit(batched=False)
        return rows

    def _reserve_decode(self, steps: int) -> list[Request]:
        """Room for up to ``steps`` more tokens for every decoding request; preempts when pages run out.

        One batched allocation serves the common case; only rows it could not serve take the
        slow path (evict cached prefixes, then preempt the newest request).
        """
        decoding = [r for r in self.running if not r.is_prefilling]
        if not decoding:
            return []
        caps = self.capacities()
        slots = np.array([r.slot for r in decoding], np.int32)
        want = np.array([min(steps, r.remaining, self.max_model_len - r.computed) for r in decoding], np.int32)
        need = np.maximum(np.array([r.computed for r in decoding], np.int32) + want - caps[slots], 0)
        if need.any():
            ok = self._allocate_rows(slots, need, caps[slots])  # the capacities `need` was worked out from
            for r, n, row_ok in zip(decoding, need, ok):
                if row_ok or r.status is not Status.RUNNING:
                    continue
                while not self._grow(r, int(n)):
                    victim = self._victim()
                    self.preempt(victim)
                    if victim is r:
                        break
        return [r for r in decoding if r.status is Status.RUNNING]

    def reserve(self, requests: list[Request], upto: list[int]) -> bool:
        """Room for ``upto[i]`` tokens in each request's slot, in one batched allocation; never preempts.

        False if some row could not get its pages (rows that could keep theirs).
        """
        slots = np.array([r.slot for r in requests], np.int32)
        need = np.maximum(np.asarray(upto, np.int32) - self.capacities()[slots], 0)
        if not need.any():
            return True
        return bool(np.all(self._allocate_rows(slots, need)))

    def preempt(self, request: Request) -> None:
        """Free a running request's pages and put it back at the queue's front (recompute later)."""
        self.running.remove(request)
        self._release(request, index_tokens=True)
        request.status = Status.WAITING
        request.computed = request.prefill_end = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue(request)

    def schedule(self, prefill_only: bool = False) -> Plan:
        """The next step's work under the configured policy.

        ``prefill_only``: the plan if it would be prefill alone, else an empty plan with nothing
        reserved or counted (the engine asks this while a prefill call's first tokens are still
        on the device: a decode step could not start without them).
        """
        cfg = self.config
        pending = bool(self.waiting) or any(r.is_prefilling for r in self.running)
        decoding = any(not r.is_prefilling for r in self.running)
        if prefill_only and (not pending or (cfg.policy == "mixed" and decoding)):
            return Plan([], [], 0)
        if cfg.policy == "mixed":
            steps = self._steps_while_pending() if pending else cfg.decode_steps
            decode = self._reserve_decode(steps) if decoding else []
            prefill = self._prefill_rows(cfg.max_tokens_per_step - len(decode)) if pending else []
            return Plan(prefill, decode, steps)
        prefill_turn = pending and (cfg.policy == "prefill_first" or not decoding
                                    or self._decodes_since_prefill >= cfg.time_share_ratio)
        if prefill_turn:
            rows = self._prefill_rows(cfg.max_tokens_per_step)
            if rows:
                self._decodes_since_prefill = 0
                return Plan(rows, [], 0)
        if prefill_only:
            return Plan([], [], 0)
        steps = self._steps_while_pending() if pending and cfg.policy == "time_share" else cfg.decode_steps
        self._decodes_since_prefill += 1
        return Plan([], self._reserve_decode(steps) if decoding else [], steps)

    def _steps_while_pending(self) -> int:
        """Decode steps a call takes while prompts wait (`mixed`, `time_share`): one, so that the next
        call takes a prompt as soon as one can start; but `decode_steps` when none can start before a
        running request ends (every slot taken, none mid-prefill) and no running request's token limit
        ends it inside the call. One-step calls there paid a host round trip a token; the price of the
        full call is that a request ending by a stop token inside it frees its slot at the call's end
        (as under prefill_first). Only these two counts, which warm-up compiles (a call's step count is
        static)."""
        if any(r.is_prefilling for r in self.running) or (self.waiting and self.free_slots):
            return 1
        left = [r.remaining for r in self.running]
        return self.config.decode_steps if left and min(left) >= self.config.decode_steps else 1

    def after_prefill(self, *requests: Request) -> None:
        """The requests' prompts are fully in the pool: index them so later requests can share them."""
        self._insert(list(requests))

    # ----- accounting ----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        st = self.state
        pool_stats = st._pool_stats(st.pool)
        index_stats = {k: int(v) for k, v in st._index_stats(st.index).items()}
        queried = max(index_stats["queried_tokens"], 1)
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "pages_total": self.num_pages,
            "pages_used": int(pool_stats["pages_used"]),  # counts, not the float they were once read as
            "pages_free": int(pool_stats["pages_free"]),
            "pages_cached": index_stats["nodes"],
            "prefix_hit_rate": index_stats["hit_tokens"] / queried,
            "prefix_hit_tokens": index_stats["hit_tokens"],
            "preemptions": self.num_preemptions,
            "prefix_index_s": self.index_s,
        }


# Waiting requests one admission passes over for sharing a prefill, at most: past it the step admits no more, so
# a queue of thousands of samples of a few prompts costs a step a bounded scan.
_MAX_HELD = 1024


class _PrefillSharing:
    """The prompts being prefilled (running, or claimed by this admission), grouped by their first page, and
    whether a waiting request should wait for one of them.

    A request is held when some prefill will index at least one whole page of its prompt that the index did
    not hold when that prefill was admitted: waiting a step for the insert (done when the prefill call is
    dispatched, `Engine._dispatch_prefill`) saves computing those pages twice. A request owed prompt
    log-probabilities computes its whole prompt anyway and is never held.

    Example: pages of 16 tokens, a 40-token prompt being prefilled from nothing: a request sharing its first 33
    tokens is held (it will attach two pages), one sharing 20 is held (one page), one sharing 10 is not.
    """

    def __init__(self, page_size: int, prefilling: list[Request]):
        self.page_size = page_size
        self.groups: dict[tuple[int, ...], list[Request]] = {}
        for r in prefilling:
            self.add(r)

    def add(self, request: Request) -> None:
        if request.prefill_end >= self.page_size and request.indexes_prefix and not request.stale_kv:
            self.groups.setdefault(tuple(request.index_ids[: self.page_size]), []).append(request)

    def holds(self, request: Request) -> bool:
        if not self.groups:  # the usual admission: nothing being prefilled to wait for
            return False
        ids = request.index_ids
        # The index matches whole pages of all but the last token (`Scheduler._claim`).
        if request.computes_whole_prompt or len(ids) - 1 < self.page_size:
            return False
        for other in self.groups.get(tuple(ids[: self.page_size]), ()):
            if not other.is_prefilling:
                continue
            n = min(len(ids) - 1, other.prefill_end)
            a, b = np.asarray(ids[:n]), np.asarray(other.index_ids[:n])
            diff = np.flatnonzero(a != b)
            common = int(diff[0]) if diff.size else n
            if (common // self.page_size) * self.page_size - other.prefill_start >= self.page_size:
                return True
        return False
