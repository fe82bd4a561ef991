"""radix_index with kv_pool: random engine-like op sequences against a plain-Python trie, eager == jit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jaxserve import kv_pool, radix_index
from tests.test_kv_pool import RefPool, assert_pool_invariants, assert_pool_matches


class RefIndex:
    """The index as a dict: path (tuple of page-token tuples) -> {page, last, lock}."""

    def __init__(self, capacity: int, page_size: int):
        self.capacity, self.page_size = capacity, page_size
        self.nodes: dict[tuple, dict] = {}
        self.clock = 0
        self.counters = {"hits": 0, "misses": 0, "hit_tokens": 0, "queried_tokens": 0}

    def split(self, tokens: list[int], length: int) -> list[tuple]:
        ps = self.page_size
        return [tuple(tokens[i * ps:(i + 1) * ps]) for i in range(length // ps)]

    def touch(self, path: tuple) -> None:
        self.clock += 1
        self.nodes[path]["last"] = self.clock

    def match(self, tokens: list[int], length: int) -> tuple[int, list[int], tuple]:
        path = ()
        for page_tokens in self.split(tokens, length):
            if path + (page_tokens,) not in self.nodes:
                break
            path += (page_tokens,)
        for depth in range(1, len(path) + 1):
            self.touch(path[:depth])
        self.counters["hits" if path else "misses"] += 1
        self.counters["hit_tokens"] += len(path) * self.page_size
        self.counters["queried_tokens"] += length
        return len(path) * self.page_size, [self.nodes[path[:d]]["page"] for d in range(1, len(path) + 1)], path

    def evict_one(self, pool: RefPool, exclude: tuple | None, index_only: bool) -> tuple[bool, int]:
        leaves = [p for p, node in self.nodes.items() if node["lock"] == 0 and p != exclude
                  and not any(len(q) == len(p) + 1 and q[:-1] == p for q in self.nodes)
                  and (not index_only or pool.ref[node["page"]] == 1)]
        if not leaves:
            return False, 0
        victim = min(leaves, key=lambda p: self.nodes[p]["last"])
        return True, pool.release([self.nodes.pop(victim)["page"]])

    def insert(self, pool: RefPool, tokens: list[int], length: int, pages: list[int]) -> None:
        path = ()
        for i, page_tokens in enumerate(self.split(tokens, length)):
            key = path + (page_tokens,)
            if key not in self.nodes:
                if pool.ref[pages[i]] == 0:
                    return
                if len(self.nodes) == self.capacity:
                    self.evict_one(pool, exclude=path, index_only=False)
                if len(self.nodes) == self.capacity:
                    return
                self.nodes[key] = {"page": pages[i], "last": 0, "lock": 0}
                pool.ref[pages[i]] += 1
            self.touch(key)
            path = key

    def index_only(self, pool: RefPool, path: tuple) -> bool:
        node = self.nodes[path]
        return node["lock"] == 0 and pool.ref[node["page"]] == 1

    def evict(self, pool: RefPool, num_pages: int) -> int:
        freed = 0
        while freed < num_pages:
            evicted, returned = self.evict_one(pool, exclude=None, index_only=True)
            if not evicted:
                # No leaf frees a page: the LRU unlocked leaf with an index-only page above it goes.
                leaves = [p for p, node in self.nodes.items() if node["lock"] == 0
                          and not any(len(q) == len(p) + 1 and q[:-1] == p for q in self.nodes)
                          and any(self.index_only(pool, p[:d]) for d in range(1, len(p) + 1))]
                if not leaves:
                    break
                victim = min(leaves, key=lambda p: self.nodes[p]["last"])
                returned = pool.release([self.nodes.pop(victim)["page"]])
            freed += returned
        return freed

    def clear(self, pool: RefPool, locked: bool = False) -> None:
        for path in [p for p, node in self.nodes.items() if node["lock"] == 0 or locked]:
            pool.release([self.nodes.pop(path)["page"]])

    def lock(self, path: tuple, delta: int) -> None:
        for depth in range(1, len(path) + 1):
            node = self.nodes[path[:depth]]
            node["lock"] = max(node["lock"] + delta, 0)


def index_paths(index: radix_index.RadixIndex) -> dict[int, tuple]:
    """node id -> path of page-token tuples, for every node in use (root excluded)."""
    parent, tokens, in_use = map(np.asarray, (index.parent, index.tokens, index.in_use))
    paths = {radix_index.ROOT: ()}

    def path_of(v: int) -> tuple:
        if v not in paths:
            paths[v] = path_of(int(parent[v])) + (tuple(tokens[v].tolist()),)
        return paths[v]

    for v in np.flatnonzero(in_use):
        path_of(int(v))
    del paths[radix_index.ROOT]
    return paths


def assert_index_matches(index: radix_index.RadixIndex, ref: RefIndex) -> None:
    paths = index_paths(index)
    page, last, locks = map(np.asarray, (index.page, index.last_use, index.lock_count))
    got = {path: {"page": int(page[v]), "last": int(last[v]), "lock": int(locks[v])} for v, path in paths.items()}
    assert got == ref.nodes
    assert int(index.clock) == ref.clock
    stats = {k: int(v) for k, v in radix_index.stats(index).items()}
    assert {k: stats[k] for k in ref.counters} == ref.counters
    assert stats["nodes"] == len(ref.nodes)
    # Structure: child counts, the hash table holds each node once, the free-node stack the rest.
    in_use, parent = np.asarray(index.in_use), np.asarray(index.parent)
    children = np.bincount(parent[in_use & (parent >= 0)], minlength=index.capacity + 1)
    assert (np.asarray(index.num_children)[in_use] == children[in_use]).all()
    table = np.asarray(index.table)
    assert sorted(table[table >= 0].tolist()) == sorted(paths)
    free_nodes = np.asarray(index.free_nodes)[: int(index.free_node_count)].tolist()
    assert sorted(free_nodes + sorted(paths)) == list(range(1, index.capacity + 1))
    # Every node is reachable through the hash table (a match on a throwaway copy: the state is a value).
    for v, path in paths.items():
        toks = [t for page in path for t in page]
        _, n, _, nodes = _JIT_OPS["match"](index, pad(toks), len(toks))
        assert int(n) == len(toks) and int(radix_index.deepest_node(nodes)) == v


CAPACITY, PAGE_SIZE, NUM_PAGES, MAX_SEQS, MAX_PAGES = 7, 2, 22, 4, 6
BUCKET = MAX_PAGES * PAGE_SIZE
CONFIGS = {"roomy": {}, "colliding": {"table_size": CAPACITY + 1, "hash_bits": 1}}
SYSTEM_PROMPTS = [[1, 2, 1, 2, 1, 2], [2, 2, 1, 1, 2, 2]]

_OPS = {
    "match": radix_index.match, "insert": radix_index.insert, "lock": radix_index.lock,
    "unlock": radix_index.unlock, "evict": radix_index.evict, "clear": radix_index.clear,
    "allocate": kv_pool.allocate, "batch": kv_pool.allocate_batch, "free": kv_pool.free,
    "attach": kv_pool.try_attach, "fork": kv_pool.fork,
    "slots": functools.partial(kv_pool.slot_mapping, width=BUCKET),
}
_JIT_OPS = {name: jax.jit(fn) for name, fn in _OPS.items()}


def run(name: str, *args):
    """The op jitted and eagerly (jit disabled: loops and conds run in Python); both must agree exactly."""
    out = _JIT_OPS[name](*args)
    with jax.disable_jit():
        eager = _OPS[name](*args)
    jax.tree.map(np.testing.assert_array_equal, out, eager)
    return out


def pad(tokens: list[int]) -> jax.Array:
    return pad_to(tokens, BUCKET)


def pad_to(tokens: list[int], width: int) -> jax.Array:
    return jnp.array(tokens + [0] * (width - len(tokens)), jnp.int32)


seqs = st.integers(0, MAX_SEQS - 1)
tails = st.lists(st.integers(1, 3), max_size=8)
prompts = st.builds(lambda system, cut, tail: (SYSTEM_PROMPTS[system][:cut] + tail)[:BUCKET],
                    st.integers(0, 1), st.integers(0, 6), tails).filter(bool)


class PoolAndIndex(RuleBasedStateMachine):
    """Engine-like use: admit (match, attach, allocate, lock), decode growth, fork, insert, release, evict."""

    @initialize(config=st.sampled_from(sorted(CONFIGS)))
    def start(self, config):
        self.pool = kv_pool.create(NUM_PAGES, PAGE_SIZE, MAX_SEQS, MAX_PAGES)
        self.index = radix_index.create(CAPACITY, PAGE_SIZE, **CONFIGS[config])
        self.ref_pool = RefPool(NUM_PAGES, PAGE_SIZE, MAX_SEQS, MAX_PAGES)
        self.ref_index = RefIndex(CAPACITY, PAGE_SIZE)
        self.content = np.full((NUM_PAGES, PAGE_SIZE), -1)   # what the engine wrote into each page
        self.tokens = [[] for _ in range(MAX_SEQS)]
        self.locks = [[] for _ in range(MAX_SEQS)]

    def _match(self, prompt: list[int]) -> tuple[int, jax.Array, jax.Array, tuple]:
        self.index, n, pages, nodes = run("match", self.index, pad(prompt), len(prompt))
        want_n, want_pages, want_path = self.ref_index.match(prompt, len(prompt))
        m = want_n // PAGE_SIZE
        assert int(n) == want_n
        assert pages.tolist() == want_pages + [0] * (MAX_PAGES - m)
        paths = index_paths(self.index)
        assert [paths[v] for v in nodes[:m].tolist()] == [want_path[:d] for d in range(1, m + 1)]
        assert (nodes[m:] == -1).all()
        return want_n, pages, nodes, want_path

    def _write(self, starts: list[tuple[int, int, list[int]]]) -> None:
        """Store tokens at their slots, as the engine's cache scatter would; only into unshared pages."""
        seq_ids = jnp.array([s for s, _, _ in starts])
        slots = np.asarray(run("slots", self.pool, seq_ids, jnp.array([p for _, p, _ in starts]),
                               jnp.array([len(t) for _, _, t in starts])))
        for (seq, start, toks), row in zip(starts, slots):
            want = [self.ref_pool.rows[seq][p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE
                    for p in range(start, start + len(toks))]
            assert row.tolist() == want + [-1] * (BUCKET - len(toks))
            for slot, tok in zip(want, toks):
                assert self.ref_pool.ref[slot // PAGE_SIZE] == 1, "write into a shared page"
                self.content[slot // PAGE_SIZE, slot % PAGE_SIZE] = tok
            self.tokens[seq] = self.tokens[seq] + toks

    def _extend(self, seq: int, toks: list[int]) -> None:
        start = self.ref_pool.lens[seq]
        self.pool, ok = run("allocate", self.pool, seq, len(toks))
        assert bool(ok) == self.ref_pool.allocate(seq, len(toks))
        if ok and toks:
            self._write([(seq, start, toks)])

    def _occupied(self, seq: int) -> int:
        """`seq` mapped onto an occupied slot when there is one, so rules rarely act on empty slots."""
        occupied = [s for s in range(MAX_SEQS) if self.ref_pool.lens[s]]
        return occupied[seq % len(occupied)] if occupied else seq

    @rule(seq=seqs, prompt=prompts, do_lock=st.booleans(), then_insert=st.booleans())
    def admit(self, seq, prompt, do_lock, then_insert):
        if self.ref_pool.lens[seq]:
            return
        n, pages, nodes, path = self._match(prompt)
        self.pool, ok = run("attach", self.pool, seq, pages, n)
        assert bool(ok) and self.ref_pool.attach(seq, [int(p) for p in pages], n)
        self.tokens[seq] = prompt[:n]
        if do_lock and n:
            node = radix_index.deepest_node(nodes)
            self.index = run("lock", self.index, node)
            self.ref_index.lock(path, 1)
            self.locks[seq].append((node, path))
        self._extend(seq, prompt[n:])
        if then_insert:
            self.insert(seq)

    @rule(prompt=prompts)
    def query(self, prompt):
        self._match(prompt)

    @rule(seq=seqs, toks=tails)
    def extend(self, seq, toks):
        self._extend(self._occupied(seq), toks)

    @rule(rows=st.lists(st.tuples(seqs, tails), min_size=3, max_size=3))
    def extend_batch(self, rows):
        self.pool, ok = run("batch", self.pool, jnp.array([s for s, _ in rows]), jnp.array([len(t) for _, t in rows]))
        writes = []
        for (seq, toks), got in zip(rows, ok.tolist()):
            start = self.ref_pool.lens[seq]
            assert got == self.ref_pool.allocate(seq, len(toks))
            if got and toks:
                writes.append((seq, start, toks))
        if writes:
            self._write(writes)

    @rule(seq=seqs)
    def release(self, seq):
        seq = self._occupied(seq)
        for node, path in self.locks[seq]:
            self.index = run("unlock", self.index, node)
            self.ref_index.lock(path, -1)
        self.locks[seq] = []
        self.pool = run("free", self.pool, seq)
        self.ref_pool.free_seq(seq)
        self.tokens[seq] = []

    @rule(src=seqs, dst=seqs)
    def fork(self, src, dst):
        src = self._occupied(src)
        self.pool, src_page, dst_page, ok = run("fork", self.pool, src, dst)
        assert (int(src_page), int(dst_page), bool(ok)) == self.ref_pool.fork(src, dst)
        if ok:
            if src_page >= 0:
                self.content[int(dst_page)] = self.content[int(src_page)]
            self.tokens[dst] = list(self.tokens[src])

    @rule(seq=seqs)
    def insert_sequence(self, seq):
        self.insert(self._occupied(seq))

    def insert(self, seq: int) -> None:
        toks, n = self.tokens[seq], len(self.tokens[seq])
        self.index, self.pool = run("insert", self.index, self.pool, pad(toks), n, self.pool.page_table[seq])
        self.ref_index.insert(self.ref_pool, toks, n, self.ref_pool.rows[seq] + [0] * MAX_PAGES)

    @rule(num_pages=st.integers(0, 3))
    def evict(self, num_pages):
        self.index, self.pool, freed = run("evict", self.index, self.pool, num_pages)
        assert int(freed) == self.ref_index.evict(self.ref_pool, num_pages)

    @rule(now=st.integers(0, 3), locked=st.booleans())
    def clear(self, now, locked):
        if now:  # clear wipes the index: keep it rare so the index gets to fill up
            return
        # locked (new weights): the locked paths go too, and their holders forget their locks (never unlock the
        # dropped nodes, whose ids the index may give out again), keeping their pages by their own references.
        self.index, self.pool = run("clear", self.index, self.pool, locked)
        self.ref_index.clear(self.ref_pool, locked)
        if locked:
            self.locks = [[] for _ in range(MAX_SEQS)]

    @invariant()
    def state_agrees_with_reference(self):
        assert_pool_matches(self.pool, self.ref_pool)
        assert_index_matches(self.index, self.ref_index)
        in_use = np.array(self.index.in_use)
        in_use[radix_index.ROOT] = False
        assert_pool_invariants(self.pool, np.asarray(self.index.page)[in_use].tolist())

    @invariant()
    def pool_stats_agree(self):
        stats = kv_pool.stats(self.pool)
        seq_pages = {p for row in self.ref_pool.rows for p in row}
        index_only = {node["page"] for node in self.ref_index.nodes.values()} - seq_pages
        used = NUM_PAGES - len(self.ref_pool.free)
        assert int(stats["pages_used"]) == used and int(stats["pages_free"]) == len(self.ref_pool.free)
        assert int(stats["pages_held_only_by_index"]) == len(index_only)
        filled = {}
        for seq, row in enumerate(self.ref_pool.rows):
            for j, page in enumerate(row):
                filled[page] = max(filled.get(page, 0), min(PAGE_SIZE, self.ref_pool.lens[seq] - j * PAGE_SIZE))
        want = (sum(filled.values()) + PAGE_SIZE * len(index_only)) / (used * PAGE_SIZE) if used else 1.0
        assert float(stats["fragmentation"]) == pytest.approx(want, rel=1e-6)

    @invariant()
    def pages_hold_what_their_holders_say(self):
        for path, node in self.ref_index.nodes.items():
            assert tuple(self.content[node["page"]].tolist()) == path[-1]
        for seq in range(MAX_SEQS):
            got = [self.content[self.ref_pool.rows[seq][p // PAGE_SIZE], p % PAGE_SIZE]
                   for p in range(self.ref_pool.lens[seq])]
            assert got == self.tokens[seq]

    @invariant()
    def locked_paths_stay_indexed(self):
        for seq_locks in self.locks:
            for _, path in seq_locks:
                assert all(path[:d] in self.ref_index.nodes for d in range(1, len(path) + 1))


TestPoolAndIndex = PoolAndIndex.TestCase
# 4 fresh runs of 40 steps every time the suite runs (12 took 44 s on 2 CPU cores in session 12; 8
# took 62 s in session 31, with the whole suite at 13-14 of CI's 15 minutes; 6 took 18-33 s in session
# 34): the examples differ from run to run, so coverage accumulates across runs.
TestPoolAndIndex.settings = settings(max_examples=4, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---- targeted behaviour ---------------------------------------------------------------------------------

def _pool_with(prompts: list[list[int]], page_size: int = 2):
    pool = kv_pool.create(64, page_size, len(prompts), 8)
    for seq, prompt in enumerate(prompts):
        pool, ok = kv_pool.allocate(pool, seq, len(prompt))
        assert bool(ok)
    return pool


@pytest.mark.parametrize("table_size, hash_bits", [(11, 0), (None, 1)])
def test_hash_collisions_never_return_wrong_pages(table_size, hash_bits):
    # hash_bits=0 gives every prefix the same hash: only the token comparison tells pages apart.
    prompts = [[1, b, c, d] for b in (1, 2) for c in (1, 2) for d in (3, 4)]
    pool = _pool_with(prompts)
    index = radix_index.create(10, 2, table_size=table_size, hash_bits=hash_bits)
    insert, match = jax.jit(radix_index.insert), jax.jit(radix_index.match)
    for seq, prompt in enumerate(prompts):
        index, pool = insert(index, pool, jnp.array(prompt), 4, pool.page_table[seq])
    assert int(radix_index.stats(index)["nodes"]) == 10
    for seq, prompt in enumerate(prompts):
        index, n, pages, _ = match(index, jnp.array(prompt), 4)
        first_owner = next(s for s, p in enumerate(prompts) if p[:2] == prompt[:2])
        assert int(n) == 4
        assert pages.tolist() == [int(pool.page_table[first_owner, 0]), int(pool.page_table[seq, 1])]
    index, n, _, _ = match(index, jnp.array([1, 1, 9, 9]), 4)
    assert int(n) == 2


def test_full_index_evicts_lru_leaf_and_stops_when_everything_is_locked():
    prompts = [[1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6]]
    pool = _pool_with(prompts)
    index = radix_index.create(4, 2)
    index, pool = radix_index.insert(index, pool, jnp.array(prompts[0]), 4, pool.page_table[0])
    index, pool = radix_index.insert(index, pool, jnp.array(prompts[1]), 4, pool.page_table[1])
    index, _, _, nodes = radix_index.match(index, jnp.array(prompts[0]), 4)   # prompt 1 is now LRU
    index, pool = radix_index.insert(index, pool, jnp.array(prompts[2]), 4, pool.page_table[2])
    assert int(radix_index.match(index, jnp.array(prompts[1]), 4)[1]) == 0
    assert int(radix_index.match(index, jnp.array(prompts[2]), 4)[1]) == 4

    index = radix_index.lock(index, radix_index.deepest_node(nodes))
    index = radix_index.lock(index, radix_index.deepest_node(radix_index.match(index, jnp.array(prompts[2]), 4)[3]))
    before = radix_index.stats(index)["nodes"]
    index, pool = radix_index.insert(index, pool, jnp.array(prompts[1]), 4, pool.page_table[1])
    assert int(radix_index.stats(index)["nodes"]) == int(before) == 4
    index, pool = radix_index.clear(index, pool)
    index, pool, freed = radix_index.evict(index, pool, 10)
    assert int(freed) == 0 and int(radix_index.stats(index)["nodes"]) == 4


def test_insert_never_evicts_the_node_it_extends():
    pool = _pool_with([[1, 1, 2, 2, 3, 3]])
    index = radix_index.create(2, 2)
    index, pool = radix_index.insert(index, pool, jnp.array([1, 1, 2, 2, 3, 3]), 4, pool.page_table[0])
    # Full, and the only unlocked leaf is the node the new page would hang from: insertion must stop.
    index, pool = radix_index.insert(index, pool, jnp.array([1, 1, 2, 2, 3, 3]), 6, pool.page_table[0])
    index, n, pages, _ = radix_index.match(index, jnp.array([1, 1, 2, 2, 3, 3]), 6)
    assert int(n) == 4 and pages.tolist() == [0, 1, 0]
    assert pool.refcount[:3].tolist() == [2, 2, 1]


def test_evict_frees_only_pages_no_sequence_holds():
    pool = _pool_with([[1, 1, 2, 2]])
    index, pool = radix_index.insert(radix_index.create(4, 2), pool, jnp.array([1, 1, 2, 2]), 4, pool.page_table[0])
    assert pool.refcount[:2].tolist() == [2, 2]
    index, pool, freed = radix_index.evict(index, pool, 2)   # the sequence still holds both pages
    assert int(freed) == 0 and int(radix_index.stats(index)["nodes"]) == 2
    pool = kv_pool.free(pool, 0)
    s = kv_pool.stats(pool)
    assert int(s["pages_held_only_by_index"]) == 2 and int(s["pages_free"]) == 62
    index, pool, freed = radix_index.evict(index, pool, 1)
    assert int(freed) == 1 and int(radix_index.stats(index)["nodes"]) == 1 and int(pool.free_count) == 63
    index, n, _, _ = radix_index.match(index, jnp.array([1, 1, 2, 2]), 4)
    assert int(n) == 2   # the leaf went first


def test_evict_reaches_an_index_only_page_through_leaves_a_sequence_holds():
    # Sequence 1 ([1, 1, 9, 9]) is indexed first; sequence 0 computed its own [1, 1] page, so only
    # its pages [2, 2] and [3, 3] are indexed, below sequence 1's first page.
    pool = _pool_with([[1, 1, 2, 2, 3, 3], [1, 1, 9, 9]])
    index = radix_index.create(8, 2)
    index, pool = radix_index.insert(index, pool, jnp.array([1, 1, 9, 9]), 4, pool.page_table[1])
    index, pool = radix_index.insert(index, pool, jnp.array([1, 1, 2, 2, 3, 3]), 6, pool.page_table[0])
    pool = kv_pool.free(pool, 1)  # pages 3 ([1, 1]) and 4 ([9, 9]) are held by the index alone
    # One page: the leaf [9, 9] frees it, and sequence 0's entries stay.
    _, _, freed = run("evict", index, pool, 1)
    assert int(freed) == 1
    index, pool, freed = run("evict", index, pool, 2)
    # The second: page 3 can go only once the entries of sequence 0's pages below it have.
    assert int(freed) == 2 and int(radix_index.stats(index)["nodes"]) == 0
    assert pool.refcount[:5].tolist() == [1, 1, 1, 0, 0] and int(pool.free_count) == 61
    index, pool, freed = run("evict", index, pool, 1)  # sequence 0's pages are its own: nothing to free
    assert int(freed) == 0


def test_match_counts_hits_misses_and_tokens():
    pool = _pool_with([[1, 2, 3, 4, 5]])
    index, pool = radix_index.insert(radix_index.create(4, 2), pool, jnp.array([1, 2, 3, 4, 5, 0]), 5,
                                     pool.page_table[0])
    index, n, _, _ = radix_index.match(index, jnp.array([1, 2, 3, 9, 0, 0]), 4)
    index, m, _, _ = radix_index.match(index, jnp.array([7, 2, 3, 9, 0, 0]), 6)
    assert (int(n), int(m)) == (2, 0)
    s = {k: int(v) for k, v in radix_index.stats(index).items()}
    assert (s["nodes"], s["hits"], s["misses"], s["hit_tokens"], s["queried_tokens"]) == (2, 1, 1, 2, 10)


def test_state_can_be_donated_to_jitted_calls():
    pool = _pool_with([[1, 1, 2, 2]])
    index = radix_index.create(4, 2)
    index, pool = jax.jit(radix_index.insert, donate_argnums=(0, 1))(index, pool, jnp.array([1, 1, 2, 2]), 4,
                                                                     jnp.array([0, 1]))
    index, n, _, _ = jax.jit(radix_index.match, donate_argnums=0)(index, jnp.array([1, 1, 2, 2]), 4)
    index, pool, _ = jax.jit(radix_index.evict, donate_argnums=(0, 1))(index, pool, 1)
    assert int(n) == 4 and int(radix_index.stats(index)["nodes"]) == 2


def test_insert_many_is_the_inserts_one_by_one():
    # Random sequences sharing prefixes, some longer than the index has nodes for (so inserting evicts), and
    # padding rows between them: the index and the pool after one `insert_many` equal those after the inserts in
    # row order, array for array.
    rng = np.random.default_rng()
    ps, rows, width = 4, 8, 32
    pool = kv_pool.create(64, ps, rows, width // ps)
    prefixes = [rng.integers(1, 50, size=12).tolist() for _ in range(2)]
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.zeros(rows, np.int32)
    for r in range(rows):
        if r % 3 == 2:
            continue  # a padding row
        own = rng.integers(1, 50, size=int(rng.integers(1, width - 11))).tolist()
        seq = (prefixes[r % 2] + own)[:width] if rng.random() < 0.7 else rng.integers(1, 50, size=width).tolist()
        tokens[r, : len(seq)], lengths[r] = seq, len(seq)
        pool, _ = kv_pool.allocate(pool, r, len(seq))
    index = radix_index.create(12, ps)  # fewer nodes than the sequences' pages: later inserts evict
    want_index, want_pool = index, pool
    for r in range(rows):
        if lengths[r]:
            want_index, want_pool = radix_index.insert(want_index, want_pool, jnp.asarray(tokens[r]), int(lengths[r]),
                                                       want_pool.page_table[r])
    got_index, got_pool = jax.jit(radix_index.insert_many)(index, pool, jnp.asarray(tokens), jnp.asarray(lengths),
                                                           pool.page_table)
    for got, want in ((got_index, want_index), (got_pool, want_pool)):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(jnp.sum(got_index.in_use)) > 1  # something was indexed


def test_create_rejects_table_not_larger_than_capacity():
    with pytest.raises(ValueError, match=r"table_size must be an int > capacity \(8\), got 8"):
        radix_index.create(8, 2, table_size=8)


@pytest.mark.parametrize("block", [3, 8, 256])
def test_batched_lru_eviction_is_the_one_at_a_time_loop(monkeypatch, block):
    # Random trees: sequences sharing prefixes (stamped in random order, so parents are not always older than their
    # children), some pages still held by a sequence (refcount 2: never freed, blocking their ancestors), some paths
    # locked. `evict`'s first phase (`_evict_index_only`, blocks of `block` nodes) must evict exactly what
    # `_evict_one(index_only=True)` repeated evicts, in the same order (the free stack's), for every count asked.
    monkeypatch.setattr(radix_index, "_EVICT_BLOCK", block)
    one = jax.jit(functools.partial(radix_index._evict_one, exclude=jnp.asarray(-1, jnp.int32), index_only=True))
    batched = jax.jit(radix_index._evict_index_only)
    insert, match = jax.jit(radix_index.insert), jax.jit(radix_index.match)
    rng = np.random.default_rng()
    ps, rows, width = 2, 12, 16
    evicted_total = 0
    for _ in range(3):
        pool = kv_pool.create(96, ps, rows, width // ps)
        index = radix_index.create(95, ps)
        prefixes = [rng.integers(1, 4, size=int(rng.integers(2, 8))).tolist() for _ in range(3)]
        for r in range(rows):
            seq = (prefixes[r % 3] + rng.integers(1, 4, size=int(rng.integers(0, width))).tolist())[:width]
            pool, _ = kv_pool.allocate(pool, r, len(seq))
            index, pool = insert(index, pool, pad_to(seq, width), len(seq), pool.page_table[r])
            index, _, _, nodes = match(index, pad_to(seq, width), len(seq))  # restamps the path
            if rng.random() < 0.2:
                index = radix_index.lock(index, radix_index.deepest_node(nodes))
        for r in range(rows):
            if rng.random() < 0.75:
                pool = kv_pool.free(pool, r)  # else the sequence keeps holding its pages
        for wanted in (1, 3, 10, 100):
            want_index, want_pool, want_freed = index, pool, 0
            while want_freed < wanted:
                want_index, want_pool, evicted, returned = one(want_index, want_pool)
                if not bool(evicted):
                    break
                want_freed += int(returned)
            got_index, got_pool, got_freed = batched(index, pool, wanted)
            assert int(got_freed) == want_freed
            evicted_total += want_freed
            for got, want in ((got_index, want_index), (got_pool, want_pool)):
                for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert evicted_total > 0
