"""Page bookkeeping for the paged KV cache: page table, sequence lengths, free-page stack, refcounts.

Owns which physical page backs which logical position of which sequence slot, and how many holders
(sequence slots plus the radix index) each page has. A page goes back to the free stack only when its
refcount reaches 0. Never touches K/V data (the caller copies pages when `fork` says so) and never decides
which sequence runs or gets evicted.

Every function is pure (`pool -> new pool`), shape-static and usable under `jax.jit`, on the host CPU
backend (scheduler admission) as well as inside a jitted device step (page growth in multi-step decode).
Failures are returned values (`ok` flags), never exceptions, and a failed call returns the pool unchanged.

Layout: `page_table[slot, j]` is the physical page of logical page j of `slot`; entries at or past
`ceil(seq_lens[slot] / page_size)` are 0 (a valid page, so kernels may read it; lengths mask it).
Physical slot of logical position p of a sequence: `page_table[seq, p // page_size] * page_size + p % page_size`.

Invariant the callers keep: a page that a sequence writes into is held by that sequence alone. Pages are
shared only whole (`attach` takes full cached pages, `fork` copies a partly filled last page), so appending
tokens never writes into a shared page.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class PagePool:
    """Page bookkeeping state (a pytree; sizes are static).

    page_table: [max_seqs, max_pages_per_seq] int32, unused entries 0.
    seq_lens: [max_seqs] int32, tokens each slot holds room for.
    free_stack: [num_pages] int32, `free_stack[:free_count]` are the free pages, the top at `free_count - 1`.
    free_count: [] int32.
    refcount: [num_pages] int32, holders of each page (sequence slots + the radix index).
    """

    page_table: Array
    seq_lens: Array
    free_stack: Array
    free_count: Array
    refcount: Array
    num_pages: int = flax.struct.field(pytree_node=False)
    page_size: int = flax.struct.field(pytree_node=False)
    max_seqs: int = flax.struct.field(pytree_node=False)
    max_pages_per_seq: int = flax.struct.field(pytree_node=False)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def create(num_pages: int, page_size: int, max_seqs: int, max_pages_per_seq: int) -> PagePool:
    """An empty pool: every page free, every slot empty.

    >>> pool = create(num_pages=64, page_size=16, max_seqs=8, max_pages_per_seq=32)
    >>> int(num_free(pool))
    64
    """
    for name, value in [("num_pages", num_pages), ("page_size", page_size), ("max_seqs", max_seqs),
                        ("max_pages_per_seq", max_pages_per_seq)]:
        _check_positive(name, value)
    return PagePool(
        page_table=jnp.zeros((max_seqs, max_pages_per_seq), jnp.int32),
        seq_lens=jnp.zeros((max_seqs,), jnp.int32),
        # Reversed so that pops hand out pages 0, 1, 2, ... on a fresh pool (easy to read in tests).
        free_stack=jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32),
        free_count=jnp.asarray(num_pages, jnp.int32),
        refcount=jnp.zeros((num_pages,), jnp.int32),
        num_pages=num_pages, page_size=page_size, max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq,
    )


def _pages_for(num_tokens: Array, page_size: int) -> Array:
    return (num_tokens + page_size - 1) // page_size


def _valid_slot(pool: PagePool, seq: Array) -> Array:
    return (seq >= 0) & (seq < pool.max_seqs)


def _fit(pages: Array, length: int) -> Array:
    """Pad with 0 or truncate a page list to a static length (match results come in bucket lengths)."""
    if pages.shape[0] >= length:
        return pages[:length]
    return jnp.pad(pages, (0, length - pages.shape[0]))


def num_free(pool: PagePool) -> Array:
    """Number of free pages ([] int32)."""
    return pool.free_count


def num_pages_held(pool: PagePool, seq: int | Array) -> Array:
    """Pages slot `seq` holds: ceil(seq_lens[seq] / page_size) ([] int32)."""
    return _pages_for(pool.seq_lens[seq], pool.page_size)


def pages_needed(pool: PagePool, seq: int | Array, num_tokens: int | Array) -> Array:
    """New pages `allocate(pool, seq, num_tokens)` would take from the free stack ([] int32).

    >>> pool = create(8, 4, 2, 4)
    >>> int(pages_needed(pool, 0, 5))
    2
    """
    old_len = pool.seq_lens[seq]
    return _pages_for(old_len + num_tokens, pool.page_size) - _pages_for(old_len, pool.page_size)


def retain(pool: PagePool, pages: Array, mask: Array) -> PagePool:
    """Add one reference to each `pages[i]` where `mask[i]` (pages must be held already and distinct).

    Used by the radix index when it starts holding a page.
    """
    idx = jnp.where(mask, pages, pool.num_pages)
    return pool.replace(refcount=pool.refcount.at[idx].add(1, mode="drop"))


def release(pool: PagePool, pages: Array, mask: Array) -> PagePool:
    """Drop one reference from each `pages[i]` where `mask[i]` (pages distinct); pages reaching 0 are freed.

    Freed pages are pushed on the free stack in the order they appear in `pages`.
    """
    idx = jnp.where(mask, pages, pool.num_pages)
    refcount = pool.refcount.at[idx].add(-1, mode="drop")
    freed = mask & (refcount[jnp.clip(pages, 0, pool.num_pages - 1)] == 0)
    pos = pool.free_count + jnp.cumsum(freed, dtype=jnp.int32) - 1
    free_stack = pool.free_stack.at[jnp.where(freed, pos, pool.num_pages)].set(pages, mode="drop")
    return pool.replace(refcount=refcount, free_stack=free_stack,
                        free_count=pool.free_count + jnp.sum(freed, dtype=jnp.int32))


def allocate(pool: PagePool, seq: int | Array, num_tokens: int | Array) -> tuple[PagePool, Array]:
    """Grow slot `seq` by `num_tokens`, popping fresh pages for every page boundary crossed.

    All-or-nothing: if the free stack is short, the slot would exceed `max_pages_per_seq`, `num_tokens < 0`
    or `seq` is out of range, returns the pool unchanged and ok=False.

    >>> pool, ok = allocate(create(8, 4, 2, 4), 0, 5)   # 5 tokens -> 2 pages
    >>> bool(ok), int(pool.seq_lens[0]), pool.page_table[0].tolist()
    (True, 5, [0, 1, 0, 0])
    """
    seq = jnp.asarray(seq, jnp.int32)
    n = jnp.asarray(num_tokens, jnp.int32)
    old_len = pool.seq_lens[seq]
    have = _pages_for(old_len, pool.page_size)
    need = _pages_for(old_len + n, pool.page_size)
    ok = _valid_slot(pool, seq) & (n >= 0) & (need <= pool.max_pages_per_seq) & (need - have <= pool.free_count)
    take = jnp.where(ok, need - have, 0)
    j = jnp.arange(pool.max_pages_per_seq, dtype=jnp.int32)
    fresh = (j >= have) & (j < have + take)
    stack_pos = jnp.clip(pool.free_count - 1 - (j - have), 0, pool.num_pages - 1)
    new_pages = pool.free_stack[stack_pos]
    row = jnp.where(fresh, new_pages, pool.page_table[seq])
    return pool.replace(
        page_table=pool.page_table.at[seq].set(row, mode="drop"),
        seq_lens=pool.seq_lens.at[seq].set(jnp.where(ok, old_len + n, old_len), mode="drop"),
        free_count=pool.free_count - take,
        refcount=pool.refcount.at[jnp.where(fresh, new_pages, pool.num_pages)].set(1, mode="drop"),
    ), ok


def allocate_batch(pool: PagePool, seqs: Array, num_tokens: Array) -> tuple[PagePool, Array]:
    """`allocate` for many slots, rows in order, each all-or-nothing; returns ok per row ([B] bool).

    Rows with num_tokens == 0 leave their slot untouched (and report ok=True). Rows whose slot is
    past the pool (`seq >= max_seqs`) with num_tokens == 0 are padding: skipped, ok=True, and they
    keep the vectorized path; callers pad to a few lengths so that each compiles once (a new
    length costs ~0.5 s of compilation on the host CPU, in the middle of serving).

    >>> pool, ok = allocate_batch(create(2, 4, 3, 4), jnp.array([0, 1, 2]), jnp.array([4, 8, 1]))
    >>> ok.tolist()
    [True, False, True]
    """
    seqs = jnp.asarray(seqs, jnp.int32)
    num_tokens = jnp.asarray(num_tokens, jnp.int32)

    def one_by_one(p: PagePool) -> tuple[PagePool, Array]:
        return jax.lax.scan(lambda q, row: allocate(q, row[0], row[1]), p, (seqs, num_tokens))

    # The common case (every row valid, distinct slots, enough free pages for all) in one
    # vectorized update: the scan costs ~0.2 ms per row on the host CPU, which at batch 256 was
    # most of the engine's host time per decode call. Pages are popped in the scan's order, so
    # both paths give the same pool.
    old_len = pool.seq_lens[jnp.clip(seqs, 0, pool.max_seqs - 1)]
    have = _pages_for(old_len, pool.page_size)
    need = _pages_for(old_len + num_tokens, pool.page_size)
    take = need - have
    pad = (seqs >= pool.max_seqs) & (num_tokens == 0)
    ordered = jnp.sort(jnp.where(pad, pool.max_seqs + jnp.arange(seqs.shape[0], dtype=jnp.int32), seqs))
    fast = (jnp.all((_valid_slot(pool, seqs) | pad) & (num_tokens >= 0) & (need <= pool.max_pages_per_seq))
            & jnp.all(ordered[1:] != ordered[:-1]) & (jnp.sum(take) <= pool.free_count))

    def all_at_once(p: PagePool) -> tuple[PagePool, Array]:
        before = jnp.cumsum(take) - take  # pages popped by earlier rows
        j = jnp.arange(p.max_pages_per_seq, dtype=jnp.int32)[None, :]
        fresh = (j >= have[:, None]) & (j < need[:, None])
        stack_pos = jnp.clip(p.free_count - 1 - before[:, None] - (j - have[:, None]), 0, p.num_pages - 1)
        new_pages = p.free_stack[stack_pos]
        rows = jnp.where(fresh, new_pages, p.page_table[seqs])
        return p.replace(
            page_table=p.page_table.at[seqs].set(rows, mode="drop"),  # padding rows: dropped
            seq_lens=p.seq_lens.at[seqs].set(old_len + num_tokens, mode="drop"),
            free_count=p.free_count - jnp.sum(take),
            refcount=p.refcount.at[jnp.where(fresh, new_pages, p.num_pages)].set(1, mode="drop"),
        ), jnp.ones(seqs.shape, bool)

    pool, ok = jax.lax.cond(fast, all_at_once, one_by_one, pool)
    return pool, ok | pad


def free(pool: PagePool, seq: int | Array) -> PagePool:
    """Drop slot `seq`'s references (pages reaching refcount 0 return to the free stack); row cleared, len 0.

    >>> pool, _ = allocate(create(8, 4, 2, 4), 0, 5)
    >>> int(num_free(free(pool, 0)))
    8
    """
    seq = jnp.asarray(seq, jnp.int32)
    row = pool.page_table[seq]
    held = jnp.arange(pool.max_pages_per_seq) < num_pages_held(pool, seq)
    pool = release(pool, row, held & _valid_slot(pool, seq))
    return pool.replace(page_table=pool.page_table.at[seq].set(0, mode="drop"),
                        seq_lens=pool.seq_lens.at[seq].set(0, mode="drop"))


def free_batch(pool: PagePool, seqs: Array) -> PagePool:
    """`free` for each slot of `seqs` in order (slots outside the pool, e.g. padding, are skipped).

    Slots may share pages (prefixes attached from the radix index), so the slots are freed one
    after another inside one call; on the host CPU one call for many finished requests costs a
    fraction of one `free` call each (their dispatch and buffer donation dominate).

    >>> pool, _ = allocate_batch(create(8, 4, 3, 4), jnp.array([0, 1]), jnp.array([5, 3]))
    >>> int(num_free(free_batch(pool, jnp.array([1, 0, 3]))))
    8
    """
    seqs = jnp.asarray(seqs, jnp.int32)
    return jax.lax.scan(lambda p, seq: (free(p, seq), None), pool, seqs)[0]


def try_attach(pool: PagePool, seq: int | Array, pages: Array, num_tokens: int | Array) -> tuple[PagePool, Array]:
    """`attach` that also reports whether it happened ([] bool); see `attach`."""
    seq = jnp.asarray(seq, jnp.int32)
    num_tokens = jnp.asarray(num_tokens, jnp.int32)
    pages = _fit(jnp.asarray(pages, jnp.int32), pool.max_pages_per_seq)
    n_pages = _pages_for(num_tokens, pool.page_size)
    j = jnp.arange(pool.max_pages_per_seq)
    mask = j < n_pages
    pages_held = jnp.all(jnp.where(mask, pool.refcount[jnp.clip(pages, 0, pool.num_pages - 1)] > 0, True))
    in_range = jnp.all(jnp.where(mask, (pages >= 0) & (pages < pool.num_pages), True))
    ok = (_valid_slot(pool, seq) & (pool.seq_lens[seq] == 0) & (num_tokens >= 0)
          & (n_pages <= pool.max_pages_per_seq) & pages_held & in_range)
    mask = mask & ok
    pool = retain(pool, pages, mask)
    row = jnp.where(mask, pages, 0)
    return pool.replace(
        page_table=pool.page_table.at[seq].set(jnp.where(ok, row, pool.page_table[seq]), mode="drop"),
        seq_lens=pool.seq_lens.at[seq].set(jnp.where(ok, num_tokens, pool.seq_lens[seq]), mode="drop"),
    ), ok


def attach(pool: PagePool, seq: int | Array, pages: Array, num_tokens: int | Array) -> PagePool:
    """Give EMPTY slot `seq` the first ceil(num_tokens / page_size) of `pages` (a cached prefix), refcount += 1.

    `pages` is int32 of any length (a radix-index match result fits; it is padded or cut to max_pages_per_seq).
    `num_tokens` should be a multiple of page_size: the pages are shared, so the slot must not write into the
    last one. The call is a no-op if the slot is not empty, `seq` is out of range, the pages do not fit, or a
    page is not held by anyone (a free page cannot be shared); use `try_attach` to learn which.

    >>> pool, _ = allocate(create(8, 4, 2, 4), 0, 8)
    >>> pool = attach(pool, 1, pool.page_table[0], 8)
    >>> pool.refcount[:2].tolist()
    [2, 2]
    """
    return try_attach(pool, seq, pages, num_tokens)[0]


def fork(pool: PagePool, src: int | Array, dst: int | Array) -> tuple[PagePool, Array, Array, Array]:
    """Make EMPTY slot `dst` a copy of `src`: full pages shared (refcount + 1), a partly filled last page copied.

    Returns (pool, src_page, dst_page, ok): the caller must copy the K/V of physical page `src_page` into
    `dst_page` (both -1 when nothing is to be copied). ok=False (pool unchanged) if `dst` is not empty,
    `src == dst`, a slot is out of range, or no page is free for the copy.

    >>> pool, _ = allocate(create(8, 4, 2, 4), 0, 6)
    >>> pool, src_page, dst_page, ok = fork(pool, 0, 1)
    >>> pool.page_table[1].tolist(), int(src_page), int(dst_page)
    ([0, 2, 0, 0], 1, 2)
    """
    src = jnp.asarray(src, jnp.int32)
    dst = jnp.asarray(dst, jnp.int32)
    n = pool.seq_lens[src]
    full = n // pool.page_size
    partial = (n % pool.page_size) != 0
    ok = (_valid_slot(pool, src) & _valid_slot(pool, dst) & (src != dst) & (pool.seq_lens[dst] == 0)
          & (~partial | (pool.free_count >= 1)))
    copy = ok & partial
    j = jnp.arange(pool.max_pages_per_seq)
    shared = (j < full) & ok
    src_row = pool.page_table[src]
    fresh_page = pool.free_stack[jnp.maximum(pool.free_count - 1, 0)]
    row = jnp.where(shared, src_row, 0)
    row = jnp.where(copy & (j == full), fresh_page, row)
    pool = retain(pool, src_row, shared)
    src_page = jnp.where(copy, src_row[jnp.minimum(full, pool.max_pages_per_seq - 1)], -1)
    dst_page = jnp.where(copy, fresh_page, -1)
    pool = pool.replace(
        page_table=pool.page_table.at[dst].set(jnp.where(ok, row, pool.page_table[dst]), mode="drop"),
        seq_lens=pool.seq_lens.at[dst].set(jnp.where(ok, n, pool.seq_lens[dst]), mode="drop"),
        refcount=pool.refcount.at[jnp.where(copy, fresh_page, pool.num_pages)].set(1, mode="drop"),
        free_count=pool.free_count - copy.astype(jnp.int32),
    )
    return pool, src_page, dst_page, ok


def slot_mapping(pool: PagePool, seqs: Array, start: Array, num: Array, width: int) -> Array:
    """Physical slots of logical positions start..start+num-1 of each row: [B, width] int32.

    Entries at index >= num, or at positions the slot has no room for (>= seq_lens), are -1 (write nothing).

    >>> pool, _ = allocate(create(8, 4, 2, 4), 0, 6)
    >>> slot_mapping(pool, jnp.array([0]), jnp.array([3]), jnp.array([2]), 4).tolist()
    [[3, 4, -1, -1]]
    """
    seqs = jnp.asarray(seqs, jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    num = jnp.asarray(num, jnp.int32)
    offs = jnp.arange(width, dtype=jnp.int32)
    pos = start[:, None] + offs[None, :]
    valid = (offs[None, :] < num[:, None]) & (pos >= 0) & (pos < pool.seq_lens[seqs][:, None])
    return slots_in_rows(pool.page_table[seqs], pos, valid, pool.page_size)


def slots_in_rows(rows: Array, positions: Array, valid: Array, page_size: int) -> Array:
    """Physical slots of logical `positions` [B, W] in page-table `rows` [B, P]; -1 where not `valid`.

    The pool-free core of `slot_mapping`, for callers that hold page-table rows (the jitted step).

    >>> slots_in_rows(jnp.array([[5, 2]]), jnp.array([[3, 4]]), jnp.array([[True, True]]), 4).tolist()
    [[23, 8]]
    """
    logical = jnp.clip(positions // page_size, 0, rows.shape[1] - 1)
    page = jnp.take_along_axis(rows, logical, axis=1)
    return jnp.where(valid, page * page_size + positions % page_size, -1).astype(jnp.int32)


def stats(pool: PagePool) -> dict[str, Array]:
    """Occupancy counters, all [] arrays.

    pages_used, pages_free; pages_held_only_by_index: pages with holders but none of them a sequence slot
    (the radix index is the only other holder); fragmentation: fill ratio, tokens stored / token capacity of
    the pages in use (1.0 = no space lost to partly filled pages; pages held only by the index count as full).
    """
    ps, mpps = pool.page_size, pool.max_pages_per_seq
    j = jnp.arange(mpps)
    held = j[None, :] < _pages_for(pool.seq_lens, ps)[:, None]
    fill = jnp.clip(pool.seq_lens[:, None] - j[None, :] * ps, 0, ps)
    idx = jnp.where(held, pool.page_table, pool.num_pages)
    seq_refs = jnp.zeros(pool.num_pages, jnp.int32).at[idx].add(1, mode="drop")
    page_fill = jnp.zeros(pool.num_pages, jnp.int32).at[idx].max(fill, mode="drop")
    in_use = pool.refcount > 0
    index_only = in_use & (seq_refs == 0)
    used = pool.num_pages - pool.free_count
    stored = jnp.sum(jnp.where(index_only, ps, jnp.where(in_use, page_fill, 0)))
    return {
        "pages_used": used,
        "pages_free": pool.free_count,
        "pages_held_only_by_index": jnp.sum(index_only, dtype=jnp.int32),
        "fragmentation": jnp.where(used > 0, stored / jnp.maximum(used * ps, 1), 1.0).astype(jnp.float32),
    }
