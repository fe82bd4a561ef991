"""kv_pool: page bookkeeping against a plain-Python reference (also used by test_radix_index)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve import kv_pool


class RefPool:
    """The pool as lists: rows of pages per slot, lengths, refcounts, a free stack (top = end)."""

    def __init__(self, num_pages: int, page_size: int, max_seqs: int, max_pages_per_seq: int):
        self.num_pages, self.page_size, self.max_pages_per_seq = num_pages, page_size, max_pages_per_seq
        self.rows = [[] for _ in range(max_seqs)]
        self.lens = [0] * max_seqs
        self.ref = [0] * num_pages
        self.free = list(range(num_pages - 1, -1, -1))

    def pages_for(self, n: int) -> int:
        return -(-n // self.page_size)

    def allocate(self, seq: int, n: int) -> bool:
        need = self.pages_for(self.lens[seq] + n)
        take = need - len(self.rows[seq])
        if n < 0 or need > self.max_pages_per_seq or take > len(self.free):
            return False
        for _ in range(take):
            page = self.free.pop()
            self.ref[page] = 1
            self.rows[seq].append(page)
        self.lens[seq] += n
        return True

    def release(self, pages: list[int]) -> int:
        freed = 0
        for page in pages:
            self.ref[page] -= 1
            if self.ref[page] == 0:
                self.free.append(page)
                freed += 1
        return freed

    def free_seq(self, seq: int) -> None:
        self.release(self.rows[seq])
        self.rows[seq], self.lens[seq] = [], 0

    def attach(self, seq: int, pages: list[int], n: int) -> bool:
        count = self.pages_for(n)
        if self.lens[seq] != 0 or count > self.max_pages_per_seq or any(self.ref[p] == 0 for p in pages[:count]):
            return False
        self.rows[seq] = list(pages[:count])
        for page in self.rows[seq]:
            self.ref[page] += 1
        self.lens[seq] = n
        return True

    def fork(self, src: int, dst: int) -> tuple[int, int, bool]:
        n = self.lens[src]
        full, partial = divmod(n, self.page_size)
        if src == dst or self.lens[dst] != 0 or (partial and not self.free):
            return -1, -1, False
        self.rows[dst] = self.rows[src][:full]
        for page in self.rows[dst]:
            self.ref[page] += 1
        copy = (-1, -1)
        if partial:
            page = self.free.pop()
            self.ref[page] = 1
            self.rows[dst].append(page)
            copy = (self.rows[src][full], page)
        self.lens[dst] = n
        return copy[0], copy[1], True


def free_pages(pool: kv_pool.PagePool) -> list[int]:
    return np.asarray(pool.free_stack)[: int(pool.free_count)].tolist()


def assert_pool_matches(pool: kv_pool.PagePool, ref: RefPool) -> None:
    """Array state equals the reference; the free stack is compared as a set, then the reference adopts
    its order (pushes in bulk, e.g. `radix_index.clear`, follow node order the reference does not model)."""
    table = np.asarray(pool.page_table)
    for seq, row in enumerate(ref.rows):
        assert table[seq].tolist() == row + [0] * (pool.max_pages_per_seq - len(row)), f"slot {seq}"
    assert np.asarray(pool.seq_lens).tolist() == ref.lens
    assert np.asarray(pool.refcount).tolist() == ref.ref
    free = free_pages(pool)
    assert sorted(free) == sorted(ref.free)
    ref.free = free


def assert_pool_invariants(pool: kv_pool.PagePool, other_holders: list[int] = ()) -> None:
    """Refcounts equal the holders (slots + `other_holders`); a page is free iff nobody holds it."""
    ps = pool.page_size
    holders = np.zeros(pool.num_pages, np.int64)
    for seq in range(pool.max_seqs):
        n = -(-int(pool.seq_lens[seq]) // ps)
        row = np.asarray(pool.page_table[seq])
        assert len(set(row[:n].tolist())) == n, "a slot holds a page twice"
        assert (row[n:] == 0).all(), "unused page-table entries must be 0"
        np.add.at(holders, row[:n], 1)
    np.add.at(holders, np.asarray(other_holders, np.int64), 1)
    assert np.asarray(pool.refcount).tolist() == holders.tolist()
    free = free_pages(pool)
    assert len(set(free)) == len(free), "a page is on the free stack twice"
    assert set(free) == set(np.flatnonzero(holders == 0).tolist()), "free pages must be exactly the unheld ones"
    assert len(free) + int((holders > 0).sum()) == pool.num_pages


# ---- unit behaviour -------------------------------------------------------------------------------------

def test_out_of_pages_returns_not_ok_and_leaves_pool_unchanged():
    pool, ok = kv_pool.allocate(kv_pool.create(4, 4, 2, 8), 0, 12)
    assert bool(ok)
    for seq, n in [(1, 5), (0, 9), (1, -1), (5, 1)]:
        after, ok = jax.jit(kv_pool.allocate)(pool, seq, n)
        assert not bool(ok)
        jax.tree.map(np.testing.assert_array_equal, after, pool)


def test_allocation_past_max_pages_per_seq_fails():
    pool = kv_pool.create(16, 4, 1, 2)
    after, ok = kv_pool.allocate(pool, 0, 9)
    assert not bool(ok) and int(after.free_count) == 16


def test_allocate_batch_is_in_order_and_all_or_nothing_per_row():
    pool = kv_pool.create(3, 2, 3, 4)
    pool, ok = jax.jit(kv_pool.allocate_batch)(pool, jnp.array([0, 1, 0, 2]), jnp.array([3, 3, 1, 0]))
    assert ok.tolist() == [True, False, True, True]
    assert pool.seq_lens.tolist() == [4, 0, 0] and pool.page_table[0, :2].tolist() == [0, 1]
    assert int(pool.free_count) == 1


@pytest.mark.parametrize("seed", range(4))
def test_allocate_batch_equals_one_allocate_per_row(seed):
    """The vectorized path (distinct slots, enough pages) and the row-by-row path give the same pool."""
    rng = np.random.default_rng(seed)
    pool = kv_pool.create(64, 4, 16, 8)
    for slot in rng.choice(16, size=10, replace=False):
        pool, _ = kv_pool.allocate(pool, int(slot), int(rng.integers(0, 12)))
    seqs = rng.choice(16, size=12, replace=False).astype(np.int32)
    # seed 3 asks for more pages than are free (and past max_pages_per_seq): the row-by-row
    # fallback decides per row.
    need = (rng.integers(16, 33, size=12) if seed == 3 else rng.integers(0, 9, size=12)).astype(np.int32)
    got, ok = jax.jit(kv_pool.allocate_batch)(pool, jnp.asarray(seqs), jnp.asarray(need))
    want, want_ok = pool, []
    for s, n in zip(seqs, need):
        want, o = kv_pool.allocate(want, int(s), int(n))
        want_ok.append(bool(o))
    assert ok.tolist() == want_ok
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert_pool_invariants(got)
    # Padding rows (a slot past the pool, no tokens), as the scheduler adds to bound the
    # compiled lengths: skipped with ok=True, the same pool.
    pad = 20 - len(seqs)
    got_padded, ok_padded = jax.jit(kv_pool.allocate_batch)(
        pool, jnp.asarray(np.concatenate([seqs, np.full(pad, 16, np.int32)])),
        jnp.asarray(np.concatenate([need, np.zeros(pad, np.int32)])))
    assert ok_padded.tolist() == want_ok + [True] * pad
    jax.tree.map(np.testing.assert_array_equal, got_padded, want)


@pytest.mark.parametrize("seed", range(3))
def test_free_batch_equals_one_free_per_slot_with_shared_pages(seed):
    """Slots that share pages (a prefix attached to several) freed in one call: same pool as one
    `free` after another, padding slots (past the pool) skipped."""
    rng = np.random.default_rng(seed)
    pool = kv_pool.create(64, 4, 12, 8)
    for slot in range(6):
        pool, _ = kv_pool.allocate(pool, slot, int(rng.integers(1, 20)))
    for slot in range(6, 10):  # each shares the full pages of one of the first six
        src = int(rng.integers(0, 6))
        n = int(pool.seq_lens[src]) // 4 * 4
        pool = kv_pool.attach(pool, slot, pool.page_table[src], n)
    seqs = rng.permutation(10)[: int(rng.integers(3, 10))].astype(np.int32)
    padded = np.concatenate([seqs, np.full(16 - len(seqs), 12, np.int32)])
    got = jax.jit(kv_pool.free_batch)(pool, jnp.asarray(padded))
    want = pool
    for s in seqs:
        want = kv_pool.free(want, int(s))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert_pool_invariants(got)


def test_fork_shares_full_pages_and_copies_the_partial_one():
    pool, _ = kv_pool.allocate(kv_pool.create(8, 4, 3, 4), 0, 10)
    pool, src_page, dst_page, ok = kv_pool.fork(pool, 0, 1)
    assert bool(ok) and (int(src_page), int(dst_page)) == (2, 3)
    assert pool.page_table[1].tolist() == [0, 1, 3, 0] and pool.refcount[:4].tolist() == [2, 2, 1, 1]
    pool, *_ = kv_pool.fork(kv_pool.free(pool, 1), 0, 2)
    assert_pool_invariants(pool)


def test_fork_of_page_aligned_sequence_copies_nothing():
    pool, _ = kv_pool.allocate(kv_pool.create(8, 4, 2, 4), 0, 8)
    pool, src_page, dst_page, ok = kv_pool.fork(pool, 0, 1)
    assert bool(ok) and (int(src_page), int(dst_page)) == (-1, -1) and int(pool.free_count) == 6


def test_fork_without_a_free_page_for_the_copy_fails_unchanged():
    pool, _ = kv_pool.allocate(kv_pool.create(2, 4, 2, 4), 0, 6)
    after, src_page, dst_page, ok = kv_pool.fork(pool, 0, 1)
    assert not bool(ok) and (int(src_page), int(dst_page)) == (-1, -1)
    jax.tree.map(np.testing.assert_array_equal, after, pool)


def test_attach_to_busy_slot_or_free_page_is_refused():
    pool, _ = kv_pool.allocate(kv_pool.create(8, 4, 2, 4), 0, 8)
    _, ok = kv_pool.try_attach(pool, 0, pool.page_table[0], 8)
    assert not bool(ok)
    _, ok = kv_pool.try_attach(pool, 1, jnp.array([0, 5]), 8)  # page 5 is free
    assert not bool(ok)
    after = kv_pool.attach(pool, 1, jnp.array([1, 0]), 8)
    assert after.page_table[1].tolist() == [1, 0, 0, 0] and after.refcount[:2].tolist() == [2, 2]


def test_shared_page_returns_to_free_stack_only_after_last_holder():
    pool, _ = kv_pool.allocate(kv_pool.create(4, 4, 2, 4), 0, 4)
    pool = kv_pool.attach(pool, 1, pool.page_table[0], 4)
    pool = kv_pool.free(pool, 0)
    assert int(pool.free_count) == 3 and int(pool.refcount[0]) == 1
    pool = kv_pool.free(pool, 1)
    assert int(pool.free_count) == 4 and int(pool.refcount[0]) == 0


def test_slot_mapping_masks_past_num_and_past_allocation():
    pool, _ = kv_pool.allocate(kv_pool.create(8, 4, 2, 4), 0, 6)
    pool, _ = kv_pool.allocate(pool, 1, 3)
    slots = jax.jit(kv_pool.slot_mapping, static_argnums=4)(pool, jnp.array([0, 1]), jnp.array([2, 1]),
                                                            jnp.array([4, 4]), 5)
    assert slots.tolist() == [[2, 3, 4, 5, -1], [9, 10, -1, -1, -1]]


def test_stats_counts_pages_and_fill():
    pool, _ = kv_pool.allocate(kv_pool.create(8, 4, 2, 4), 0, 6)
    pool = kv_pool.retain(pool, jnp.array([0]), jnp.array([True]))
    pool = kv_pool.free(pool, 0)   # page 0 now held only by a non-sequence holder (the index)
    pool, _ = kv_pool.allocate(pool, 1, 1)
    s = kv_pool.stats(pool)
    assert (int(s["pages_used"]), int(s["pages_free"]), int(s["pages_held_only_by_index"])) == (2, 6, 1)
    assert float(s["fragmentation"]) == pytest.approx(5 / 8)


def test_create_rejects_bad_sizes():
    with pytest.raises(ValueError, match="page_size must be an int >= 1, got 0"):
        kv_pool.create(8, 0, 2, 4)


# ---- random op sequences: reference == eager == jit ---------------------------------------------------

NUM_PAGES, PAGE_SIZE, MAX_SEQS, MAX_PAGES = 10, 3, 4, 4

_OPS = {
    "allocate": kv_pool.allocate,
    "free": kv_pool.free,
    "attach": kv_pool.try_attach,
    "fork": kv_pool.fork,
    "batch": kv_pool.allocate_batch,
    "slots": functools.partial(kv_pool.slot_mapping, width=MAX_PAGES * PAGE_SIZE),
}
_JIT_OPS = {name: jax.jit(fn) for name, fn in _OPS.items()}

seqs = st.integers(0, MAX_SEQS - 1)
pool_ops = st.lists(st.one_of(
    st.tuples(st.just("allocate"), seqs, st.integers(0, 7)),
    st.tuples(st.just("free"), seqs),
    st.tuples(st.just("attach"), seqs, seqs, st.integers(0, 2)),
    st.tuples(st.just("fork"), seqs, seqs),
    st.tuples(st.just("batch"), st.lists(st.tuples(seqs, st.integers(0, 5)), min_size=3, max_size=3)),
), min_size=1, max_size=25)


def _check_slots(pool: kv_pool.PagePool, ref: RefPool, run) -> None:
    slots = np.asarray(run("slots", pool, jnp.arange(MAX_SEQS), jnp.zeros(MAX_SEQS, jnp.int32),
                           jnp.full(MAX_SEQS, MAX_PAGES * PAGE_SIZE)))
    for seq in range(MAX_SEQS):
        want = [ref.rows[seq][p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(ref.lens[seq])]
        assert slots[seq].tolist() == want + [-1] * (MAX_PAGES * PAGE_SIZE - len(want))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool_ops)
def test_random_pool_ops_match_reference_eagerly_and_jitted(ops):
    ref = RefPool(NUM_PAGES, PAGE_SIZE, MAX_SEQS, MAX_PAGES)

    def run(name, *args):
        out = _JIT_OPS[name](*args)
        with jax.disable_jit():
            eager = _OPS[name](*args)
        jax.tree.map(np.testing.assert_array_equal, out, eager)
        return out

    pool = kv_pool.create(NUM_PAGES, PAGE_SIZE, MAX_SEQS, MAX_PAGES)
    for op in ops:
        if op[0] == "allocate":
            pool, ok = run("allocate", pool, op[1], op[2])
            assert bool(ok) == ref.allocate(op[1], op[2])
        elif op[0] == "free":
            pool = run("free", pool, op[1])
            ref.free_seq(op[1])
        elif op[0] == "attach":
            _, src, dst, n_pages = op
            n = min(n_pages, len(ref.rows[src])) * PAGE_SIZE
            pool, ok = run("attach", pool, dst, pool.page_table[src], n)
            assert bool(ok) == ref.attach(dst, ref.rows[src] + [0] * MAX_PAGES, n)
        elif op[0] == "fork":
            pool, src_page, dst_page, ok = run("fork", pool, op[1], op[2])
            assert (int(src_page), int(dst_page), bool(ok)) == ref.fork(op[1], op[2])
        else:
            rows = op[1]
            pool, ok = run("batch", pool, jnp.array([r[0] for r in rows]), jnp.array([r[1] for r in rows]))
            assert ok.tolist() == [ref.allocate(seq, n) for seq, n in rows]
        assert_pool_matches(pool, ref)
        assert_pool_invariants(pool)
        _check_slots(pool, ref, run)
