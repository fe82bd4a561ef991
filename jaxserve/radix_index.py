"""Radix prefix index (SGLang RadixAttention, page-granular) stored as arrays.

Owns a tree of full KV pages keyed by their tokens: node -> parent, physical page, the page's tokens,
a hash of the prefix up to it, last-use clock, lock count and child count, plus an open-addressing
hash table (linear probing, backward-shift deletion) for child lookup keyed by (parent, page tokens).
Lookups always compare the stored tokens, so a hash collision can cost probes but never return a
wrong page. The index is a holder of the pages it indexes: `insert` takes one pool reference per newly
indexed page and eviction drops it (the page returns to the free stack only when no sequence holds it).

Never touches K/V data and never decides what to evict beyond LRU order among unlocked leaves: the
scheduler locks the paths of running sequences and says how many pages it needs.

Node 0 is the root (empty prefix, no page); nodes 1..capacity hold pages. Every function is pure and
usable under `jax.jit` (the scheduler runs match/insert jitted on the CPU backend with `tokens` padded to a
bucket length; donate the index and pool so updates happen in place).

The last-use clock advances by one per node touched (match and insert stamp the path root to leaf), so
ties never happen and deeper nodes are more recent. It is int32: it wraps after 2**31 node touches
(about 16M requests of 2k tokens); the counters in `stats` are int32 as well.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxserve import kv_pool
from jaxserve.kv_pool import PagePool

Array = jax.Array

ROOT = 0
_EMPTY = -1
_SEARCHING = -2
_ROOT_HASH = 0x2545F491
_INT32_MAX = 2**31 - 1


@flax.struct.dataclass
class RadixIndex:
    """Radix index state (a pytree; sizes are static). N = capacity + 1 nodes, node 0 the root.

    parent: [N] int32 (-1 for the root and nodes never used; an evicted node keeps its last: `in_use` tells);
    page: [N] int32 physical page; tokens: [N, page_size] int32 the page's tokens; prefix_hash: [N] uint32 hash
    of the prefix up to and including the node's page (the node's hash-table key); last_use: [N] int32;
    lock_count: [N] int32;
    num_children: [N] int32; in_use: [N] bool; free_nodes/free_node_count: stack of unused node ids;
    table: [table_size] int32 node ids, -1 empty; clock, hits, misses, hit_tokens, queried_tokens: [] int32.
    """

    parent: Array
    page: Array
    tokens: Array
    prefix_hash: Array
    last_use: Array
    lock_count: Array
    num_children: Array
    in_use: Array
    free_nodes: Array
    free_node_count: Array
    table: Array
    clock: Array
    hits: Array
    misses: Array
    hit_tokens: Array
    queried_tokens: Array
    capacity: int = flax.struct.field(pytree_node=False)
    page_size: int = flax.struct.field(pytree_node=False)
    table_size: int = flax.struct.field(pytree_node=False)
    hash_mask: int = flax.struct.field(pytree_node=False)


def _free_node_stack(unused: Array) -> tuple[Array, Array]:
    """Stack of the unused node ids (root excluded) with the smallest id on top."""
    n = unused.shape[0]
    unused = unused & (jnp.arange(n) != ROOT)
    count = jnp.sum(unused, dtype=jnp.int32)
    pos = jnp.where(unused, count - jnp.cumsum(unused, dtype=jnp.int32), n)
    stack = jnp.zeros(n, jnp.int32).at[pos].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    return stack, count


def create(capacity: int, page_size: int, table_size: int | None = None, hash_bits: int = 32) -> RadixIndex:
    """An empty index holding up to `capacity` pages.

    table_size defaults to the power of two >= 2 * capacity and must exceed capacity. hash_bits < 32 keeps
    only that many hash bits (tests use it to force collisions).

    >>> index = create(capacity=1024, page_size=16)
    >>> int(stats(index)["nodes"])
    0
    """
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    if table_size is None:
        table_size = 1 << (2 * capacity - 1).bit_length()
    if not isinstance(table_size, int) or table_size <= capacity:
        raise ValueError(f"table_size must be an int > capacity ({capacity}), got {table_size!r}")
    if not isinstance(hash_bits, int) or not 0 <= hash_bits <= 32:
        raise ValueError(f"hash_bits must be an int in [0, 32], got {hash_bits!r}")
    n = capacity + 1
    free_nodes, free_count = _free_node_stack(jnp.ones(n, bool))
    hash_mask = (1 << hash_bits) - 1
    return RadixIndex(
        parent=jnp.full(n, -1, jnp.int32),
        page=jnp.zeros(n, jnp.int32),
        tokens=jnp.zeros((n, page_size), jnp.int32),
        prefix_hash=jnp.zeros(n, jnp.uint32).at[ROOT].set(_ROOT_HASH & hash_mask),
        last_use=jnp.zeros(n, jnp.int32),
        lock_count=jnp.zeros(n, jnp.int32),
        num_children=jnp.zeros(n, jnp.int32),
        in_use=jnp.zeros(n, bool).at[ROOT].set(True),
        free_nodes=free_nodes,
        free_node_count=free_count,
        table=jnp.full(table_size, _EMPTY, jnp.int32),
        # Separate buffers (not one shared zero) so the whole state can be donated to a jitted call.
        **{name: jnp.zeros((), jnp.int32) for name in ("clock", "hits", "misses", "hit_tokens", "queried_tokens")},
        capacity=capacity, page_size=page_size, table_size=table_size, hash_mask=hash_mask,
    )


def _fmix(h: Array) -> Array:
    """murmur3's 32-bit finaliser: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _page_hashes(pages_tokens: Array) -> Array:
    """Hash of each page's tokens, [P, page_size] -> [P] uint32, all pages at once."""
    ps = pages_tokens.shape[-1]
    salt = (jnp.arange(ps, dtype=jnp.uint32) + 1) * jnp.uint32(0x9E3779B9)
    mixed = _fmix(pages_tokens.astype(jnp.uint32) * jnp.uint32(0x01000193) ^ salt)
    return _fmix(jnp.sum(mixed, axis=-1, dtype=jnp.uint32))


def _child_hash(index: RadixIndex, parent_hash: Array, page_hash: Array) -> Array:
    h = _fmix(parent_hash * jnp.uint32(0x9E3779B1) + page_hash + jnp.uint32(0x7F4A7C15))
    return h & jnp.uint32(index.hash_mask)


def _home(index: RadixIndex, key: Array) -> Array:
    return (key % jnp.uint32(index.table_size)).astype(jnp.int32)


def _next_slot(index: RadixIndex, slot: Array) -> Array:
    return jnp.where(slot + 1 == index.table_size, 0, slot + 1)


def _find_child(index: RadixIndex, parent: Array, key: Array, page_tokens: Array) -> Array:
    """Child of `parent` whose page holds `page_tokens` (key is its prefix hash), or -1."""
    def cond(s: tuple[Array, Array, Array]) -> Array:
        return s[2] == _SEARCHING

    def body(s: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        probes, slot, _ = s
        node = index.table[slot]
        safe = jnp.maximum(node, 0)
        same = ((node >= 0) & (index.prefix_hash[safe] == key) & (index.parent[safe] == parent)
                & jnp.all(index.tokens[safe] == page_tokens))
        result = jnp.where(node < 0, _EMPTY, jnp.where(same, node, _SEARCHING))
        result = jnp.where((result == _SEARCHING) & (probes + 1 >= index.table_size), _EMPTY, result)
        return probes + 1, _next_slot(index, slot), result

    init = (jnp.zeros((), jnp.int32), _home(index, key), jnp.asarray(_SEARCHING, jnp.int32))
    return jax.lax.while_loop(cond, body, init)[2]


def _table_put(index: RadixIndex, table: Array, node: Array, key: Array, do: Array) -> Array:
    """`table` with `node` (hash `key`) at the first empty slot from its home, if `do` (one always exists)."""
    slot = jax.lax.while_loop(lambda s: do & (table[s] != _EMPTY), lambda s: _next_slot(index, s), _home(index, key))
    return table.at[jnp.where(do, slot, index.table_size)].set(node, mode="drop")


def _table_remove(index: RadixIndex, node: Array, do: Array) -> Array:
    """The table without `node` if `do`; later entries of its probe run shift back, so no tombstones."""
    table = index.table
    slot = jax.lax.while_loop(lambda s: do & (table[s] != node), lambda s: _next_slot(index, s),
                              _home(index, index.prefix_hash[node]))

    # The loop carries the entry at j, read from the table as just written: a read of the table as it was before a
    # write of the same iteration makes XLA copy the whole table every iteration (512 KB at 65k pages).
    def body(s: tuple[Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array]:
        hole, j, t, entry = s
        home = _home(index, index.prefix_hash[entry])
        # The entry may fill the hole unless its home lies cyclically in (hole, j].
        stays = jnp.where(hole <= j, (hole < home) & (home <= j), (hole < home) | (home <= j))
        t = t.at[jnp.where(stays, index.table_size, hole)].set(entry, mode="drop")
        j = _next_slot(index, j)
        return jnp.where(stays, hole, s[1]), j, t, t[j]

    first = _next_slot(index, slot)
    hole, _, table, _ = jax.lax.while_loop(lambda s: do & (s[3] != _EMPTY), body, (slot, first, table, table[first]))
    return table.at[jnp.where(do, hole, index.table_size)].set(_EMPTY, mode="drop")


def _index_only(index: RadixIndex, pool: PagePool) -> Array:
    """Unlocked nodes whose page the index alone holds (evicting one returns its page), [N] bool."""
    ids = jnp.arange(index.capacity + 1)
    return index.in_use & (ids != ROOT) & (index.lock_count == 0) & (pool.refcount[index.page] == 1)


def _above_index_only(index: RadixIndex, pool: PagePool) -> Array:
    """Nodes with an `_index_only` node among themselves and their ancestors, [N] bool.

    Pointer jumping: round k looks 2**k levels further up, so log2(N) rounds cover any depth.
    """
    ids = jnp.arange(index.capacity + 1)
    up = jnp.where(index.in_use & (ids != ROOT), index.parent, ROOT)
    flag = _index_only(index, pool)
    for _ in range((index.capacity + 1).bit_length()):
        flag = flag | flag[up]
        up = up[up]
    return flag


def _drop(index: RadixIndex, pool: PagePool, victim: Array, found: Array) -> tuple[RadixIndex, PagePool]:
    """Node ``victim`` out of the index if ``found``: its page reference dropped, its table entry removed, its
    parent one child fewer, the node back on the free stack. Its ``parent`` entry is left as it was (`in_use` says
    it is gone): writing it after reading it made XLA copy the whole array every eviction."""
    n = index.capacity + 1
    drop_at = jnp.where(found, victim, n)
    pool = kv_pool.release(pool, index.page[victim][None], found[None])
    index = index.replace(
        table=_table_remove(index, victim, found),
        num_children=index.num_children.at[jnp.where(found, index.parent[victim], n)].add(-1, mode="drop"),
        in_use=index.in_use.at[drop_at].set(False, mode="drop"),
        free_nodes=index.free_nodes.at[jnp.where(found, index.free_node_count, n)].set(victim, mode="drop"),
        free_node_count=index.free_node_count + found.astype(jnp.int32),
    )
    return index, pool


def _evict_one(index: RadixIndex, pool: PagePool, exclude: Array, index_only: bool,
               freeing: bool = False) -> tuple[RadixIndex, PagePool, Array, Array]:
    """Evict the least recently used unlocked leaf other than `exclude`, dropping its page reference.

    index_only: consider only leaves whose page nobody else holds (evicting those frees a page).
    freeing: those leaves if there are any, else leaves below such a node (see `evict`).
    Returns (index, pool, evicted, pages returned to the free stack (0 or 1)). Written with masked updates
    rather than lax.cond: a cond over the whole state makes XLA copy it.
    """
    n = index.capacity + 1
    ids = jnp.arange(n)
    candidate = (index.in_use & (index.num_children == 0) & (index.lock_count == 0) & (ids != ROOT)
                 & (ids != exclude))
    frees = candidate & (pool.refcount[index.page] == 1)
    if index_only:
        candidate = frees
    elif freeing:
        candidate = jnp.where(jnp.any(frees), frees, candidate & _above_index_only(index, pool))
    found = jnp.any(candidate)
    victim = jnp.argmin(jnp.where(candidate, index.last_use, _INT32_MAX)).astype(jnp.int32)
    before = pool.free_count
    index, pool = _drop(index, pool, victim, found)
    return index, pool, found, pool.free_count - before


# Nodes a block of `_evict_index_only`'s two-level minimum: an eviction reads the blocks' minima and two blocks.
_EVICT_BLOCK = 256


def _evict_index_only(index: RadixIndex, pool: PagePool, num_pages: Array) -> tuple[RadixIndex, PagePool, Array]:
    """`_evict_one(index_only=True)` until ``num_pages`` pages are freed or no such leaf is left: the same
    victims in the same order, with the candidates' last use kept in blocks of `_EVICT_BLOCK` nodes and each
    block's minimum beside them. Evicting a leaf changes only whether its parent is a candidate, so an eviction
    updates two blocks and reads the minima, where `_evict_one` made its passes over all N nodes (the host's
    scheduler state: 128 evictions from a full 65,536-page index took ~25 ms on the CPU, every call of a
    server whose cached prefixes fill its pool). Returns (index, pool, pages freed)."""
    n = index.capacity + 1
    width = min(_EVICT_BLOCK, n)
    blocks = -(-n // width)
    keys = jnp.where(_index_only(index, pool) & (index.num_children == 0), index.last_use, _INT32_MAX)
    keys = jnp.pad(keys, (0, blocks * width - n), constant_values=_INT32_MAX).reshape(blocks, width)

    def body(s: tuple) -> tuple:
        # ``b`` is the first block holding the least key and ``row`` that block, read after the last iteration's
        # writes: its first least node is `_evict_one`'s argmin over all nodes. (Reading `keys` before writing it
        # in the same iteration makes XLA copy the whole array every eviction.)
        freed, _, keys, minima, b, row, index, pool = s
        j = jnp.argmin(row).astype(jnp.int32)
        found = row[j] < _INT32_MAX
        victim = b * width + j
        parent = jnp.maximum(index.parent[victim], ROOT)
        index, pool = _drop(index, pool, victim, found)
        keys = keys.at[jnp.where(found, b, blocks), j].set(_INT32_MAX, mode="drop")
        # The parent becomes a candidate once it is a leaf whose page the index alone holds (never the root).
        leaf = found & (parent != ROOT) & (index.num_children[parent] == 0) & (index.lock_count[parent] == 0) \
            & (pool.refcount[index.page[parent]] == 1)
        pb, pj = parent // width, parent % width
        keys = keys.at[jnp.where(leaf, pb, blocks), pj].set(index.last_use[parent], mode="drop")
        minima = minima.at[b].set(jnp.min(keys[b])).at[pb].set(jnp.min(keys[pb]))
        nb = jnp.argmin(minima).astype(jnp.int32)
        return freed + found.astype(jnp.int32), found, keys, minima, nb, keys[nb], index, pool

    minima = jnp.min(keys, axis=1)
    first = jnp.argmin(minima).astype(jnp.int32)
    freed, _, _, _, _, _, index, pool = jax.lax.while_loop(
        lambda s: (s[0] < num_pages) & s[1], body,
        (jnp.zeros((), jnp.int32), jnp.asarray(True), keys, minima, first, keys[first], index, pool))
    return index, pool, freed


def _split_pages(index: RadixIndex, tokens: Array) -> tuple[Array, Array]:
    """tokens [L] -> (page tokens [L // page_size, page_size], page hashes [L // page_size])."""
    num = tokens.shape[0] // index.page_size
    pages_tokens = jnp.asarray(tokens, jnp.int32)[: num * index.page_size].reshape(num, index.page_size)
    return pages_tokens, _page_hashes(pages_tokens)


def _walk(index: RadixIndex, pages_tokens: Array, page_hashes: Array, limit: Array) -> tuple[Array, Array, Array]:
    """Follow the cached path of the first `limit` pages: (pages matched, last node, path padded with -1)."""
    num = pages_tokens.shape[0]

    def cond(s: tuple[Array, Array, Array, Array]) -> Array:
        return (s[0] < limit) & ~s[2]

    def body(s: tuple[Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array]:
        i, node, _, path = s
        key = _child_hash(index, index.prefix_hash[node], page_hashes[i])
        child = _find_child(index, node, key, pages_tokens[i])
        hit = child >= 0
        return i + hit, jnp.where(hit, child, node), ~hit, path.at[i].set(child)

    init = (jnp.zeros((), jnp.int32), jnp.asarray(ROOT, jnp.int32), jnp.asarray(False),
            jnp.full(num, _EMPTY, jnp.int32))
    matched, node, _, path = jax.lax.while_loop(cond, body, init)
    return matched, node, jnp.where(jnp.arange(num) < matched, path, _EMPTY)


def _stamp(index: RadixIndex, nodes: Array, count: Array) -> RadixIndex:
    """Stamp nodes[:count] as used, in order (entries past count are ignored)."""
    stamps = index.clock + 1 + jnp.arange(nodes.shape[0], dtype=jnp.int32)
    at = jnp.where(jnp.arange(nodes.shape[0]) < count, nodes, index.capacity + 1)
    return index.replace(last_use=index.last_use.at[at].set(stamps, mode="drop"), clock=index.clock + count)


def match(index: RadixIndex, tokens: Array, length: int | Array) -> tuple[RadixIndex, Array, Array, Array]:
    """Longest cached prefix of tokens[:length], in whole pages.

    Returns (index, num_cached_tokens [] int32, pages [L // page_size] int32 padded with 0,
    node_ids [L // page_size] int32: the matched path root-down, padded with -1). `deepest_node(node_ids)`
    is the node to `lock`. Stamps the matched path's last use; counts a hit if any page matched, else a miss.

    >>> index = create(8, 2)
    >>> index, n, pages, nodes = match(index, jnp.array([1, 2, 3, 4]), 4)
    >>> int(n), pages.tolist(), nodes.tolist()
    (0, [0, 0], [-1, -1])
    """
    pages_tokens, page_hashes = _split_pages(index, tokens)
    num = pages_tokens.shape[0]
    length = jnp.asarray(length, jnp.int32)
    if num == 0:
        index = index.replace(misses=index.misses + 1, queried_tokens=index.queried_tokens + jnp.maximum(length, 0))
        return index, jnp.zeros((), jnp.int32), jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.int32)
    matched, _, path = _walk(index, pages_tokens, page_hashes, jnp.clip(length // index.page_size, 0, num))
    hit = matched > 0
    index = _stamp(index, path, matched).replace(
        hits=index.hits + hit,
        misses=index.misses + ~hit,
        hit_tokens=index.hit_tokens + matched * index.page_size,
        queried_tokens=index.queried_tokens + jnp.maximum(length, 0),
    )
    pages = jnp.where(path >= 0, index.page[jnp.maximum(path, 0)], 0)
    return index, matched * index.page_size, pages, path


def deepest_node(node_ids: Array) -> Array:
    """The last node of a `match` path, or ROOT when nothing matched ([] int32)."""
    count = jnp.sum(node_ids >= 0)
    return jnp.where(count > 0, node_ids[jnp.maximum(count - 1, 0)], ROOT).astype(jnp.int32)


def insert(index: RadixIndex, pool: PagePool, tokens: Array, length: int | Array,
           pages: Array) -> tuple[RadixIndex, PagePool]:
    """Index the full pages of tokens[:length], held in `pages` (the sequence's page-table row).

    Pages whose prefix is already indexed are skipped (the existing node keeps its page); that path is
    stamped as used, then the new nodes in order. Each new node takes a pool reference on its page. When
    too few nodes are free, LRU unlocked leaves (never the node the new pages hang from) are evicted first;
    if that is not enough, only the first pages that fit are indexed. Indexing also stops before a page
    nobody holds (refcount 0): a free page must stay in the free stack's care.

    >>> pool, _ = kv_pool.allocate(kv_pool.create(8, 2, 2, 4), 0, 4)
    >>> index, pool = insert(create(8, 2), pool, jnp.array([1, 2, 3, 4]), 4, pool.page_table[0])
    >>> index, n, pages, _ = match(index, jnp.array([1, 2, 3, 9]), 4)
    >>> int(n), pages.tolist(), pool.refcount[:2].tolist()
    (2, [0, 0], [2, 2])
    """
    pages_tokens, page_hashes = _split_pages(index, tokens)
    num = pages_tokens.shape[0]
    if num == 0:
        return index, pool
    n = index.capacity + 1
    pages = jnp.asarray(pages, jnp.int32)
    # The caller passes its page-table row (max_pages_per_seq long); only the first `num` entries can matter.
    pages = pages[:num] if pages.shape[0] >= num else jnp.pad(pages, (0, num - pages.shape[0]))
    limit = jnp.clip(jnp.asarray(length, jnp.int32) // index.page_size, 0, num)
    matched, node, path = _walk(index, pages_tokens, page_hashes, limit)
    index = _stamp(index, path, matched)

    j = jnp.arange(num, dtype=jnp.int32)
    held = (pages >= 0) & (pages < pool.num_pages) & (pool.refcount[jnp.clip(pages, 0, pool.num_pages - 1)] > 0)
    wanted = jnp.min(jnp.where((j >= matched) & ~held, j, limit)) - matched

    def evict_body(s: tuple[RadixIndex, PagePool, Array]) -> tuple[RadixIndex, PagePool, Array]:
        idx, pl, evicted, _ = _evict_one(s[0], s[1], node, index_only=False)
        return idx, pl, evicted

    index, pool, _ = jax.lax.while_loop(lambda s: (s[0].free_node_count < wanted) & s[2], evict_body,
                                        (index, pool, jnp.asarray(True)))
    count = jnp.maximum(jnp.minimum(wanted, index.free_node_count), 0)

    # The new nodes form a chain under `node`: page j takes the (j - matched)-th node off the free stack.
    t = j - matched
    new = (t >= 0) & (t < count)
    ids = index.free_nodes[jnp.clip(index.free_node_count - 1 - t, 0, n - 1)]
    parents = jnp.where(t == 0, node, jnp.roll(ids, 1))

    def chain(h: Array, x: tuple[Array, Array]) -> tuple[Array, Array]:
        h = jnp.where(x[0], _child_hash(index, h, x[1]), h)
        return h, h

    _, keys = jax.lax.scan(chain, index.prefix_hash[node], (new, page_hashes))
    at = jnp.where(new, ids, n)
    last = jnp.where(new & (t == count - 1), ids, n)
    index = index.replace(
        free_node_count=index.free_node_count - count,
        parent=index.parent.at[at].set(parents, mode="drop"),
        page=index.page.at[at].set(pages, mode="drop"),
        tokens=index.tokens.at[at].set(pages_tokens, mode="drop"),
        prefix_hash=index.prefix_hash.at[at].set(keys, mode="drop"),
        lock_count=index.lock_count.at[at].set(0, mode="drop"),
        num_children=(index.num_children.at[at].set(1, mode="drop").at[last].set(0, mode="drop")
                      .at[node].add((count > 0).astype(jnp.int32))),
        in_use=index.in_use.at[at].set(True, mode="drop"),
    )
    table = jax.lax.fori_loop(0, num, lambda i, tb: _table_put(index, tb, ids[i], keys[i], new[i]), index.table)
    index = _stamp(index.replace(table=table), jnp.roll(ids, -matched), count)
    return index, kv_pool.retain(pool, pages, new)


def insert_many(index: RadixIndex, pool: PagePool, tokens: Array, lengths: Array,
                pages: Array) -> tuple[RadixIndex, PagePool]:
    """`insert` for several sequences in one call, in row order: ``tokens`` [R, L], ``lengths`` [R] (0: a padding
    row, skipped), ``pages`` [R, P] (each sequence's page-table row). The same index and pool as R `insert` calls.

    One call a step's sequences rather than one a sequence: on the host CPU a jitted `insert` of a 384-token
    sequence cost ~130 µs, nearly all of it the call itself, where eight in one call cost ~23 µs each.

    >>> pool, _ = kv_pool.allocate_batch(kv_pool.create(8, 2, 2, 4), jnp.array([0, 1]), jnp.array([4, 2]))
    >>> tokens = jnp.array([[1, 2, 3, 4], [1, 2, 0, 0]])
    >>> index, pool = insert_many(create(8, 2), pool, tokens, jnp.array([4, 2]), pool.page_table)
    >>> int(match(index, jnp.array([1, 2, 3, 4]), 4)[1]), pool.refcount[:3].tolist()
    (4, [2, 2, 1])
    """
    def one(state: tuple[RadixIndex, PagePool], row: tuple[Array, Array, Array]):
        idx, pl = state
        t, length, p = row
        return jax.lax.cond(length > 0, lambda: insert(idx, pl, t, length, p), lambda: (idx, pl)), None

    (index, pool), _ = jax.lax.scan(one, (index, pool), (tokens, jnp.asarray(lengths, jnp.int32), pages))
    return index, pool


def _add_lock(index: RadixIndex, node: int | Array, delta: int) -> RadixIndex:
    node = jnp.asarray(node, jnp.int32)
    valid = (node > ROOT) & (node <= index.capacity)
    start = jnp.where(valid & index.in_use[jnp.clip(node, 0, index.capacity)], node, ROOT)

    def body(s: tuple[Array, Array]) -> tuple[Array, Array]:
        v, locks = s
        return index.parent[v], locks.at[v].set(jnp.maximum(locks[v] + delta, 0))

    _, locks = jax.lax.while_loop(lambda s: s[0] > ROOT, body, (start, index.lock_count))
    return index.replace(lock_count=locks)


def lock(index: RadixIndex, node: int | Array) -> RadixIndex:
    """Pin `node` and its ancestors against eviction (lock count + 1 each). ROOT or -1: no-op.

    >>> index = lock(create(8, 2), ROOT)
    """
    return _add_lock(index, node, 1)


def unlock(index: RadixIndex, node: int | Array) -> RadixIndex:
    """Undo one `lock(index, node)` (lock counts never go below 0). ROOT or -1: no-op.

    >>> index = unlock(create(8, 2), ROOT)
    """
    return _add_lock(index, node, -1)


def unlock_many(index: RadixIndex, nodes: Array) -> RadixIndex:
    """`unlock` of each of ``nodes`` [R] in one call (ROOT or -1: padding, no-op).

    >>> index = unlock_many(create(8, 2), jnp.array([ROOT, -1]))
    """
    return jax.lax.scan(lambda idx, node: (unlock(idx, node), None), index, jnp.asarray(nodes, jnp.int32))[0]


def evict(index: RadixIndex, pool: PagePool, num_pages: int | Array) -> tuple[RadixIndex, PagePool, Array]:
    """Free up to `num_pages` pages by evicting LRU unlocked leaves, repeatedly (parents become leaves).

    Leaves whose page the index alone holds go first: evicting one drops the index's reference and returns
    the page to the free stack. A leaf whose page a sequence still holds frees nothing (and the sequence
    inserts it again when it ends), so it goes only when that is still short and an index-only page lies
    above it: two prompts admitted together that share a first page each compute it, the first one indexed
    keeps it, the other's later pages hang below it, and once the first has ended that page can be freed
    only through them (else the scheduler preempted a running request while a cached page sat unused).
    Returns the number of pages freed ([] int32).

    >>> pool = kv_pool.create(8, 2, 2, 4)
    >>> index, pool, freed = evict(create(8, 2), pool, 4)
    >>> int(freed)
    0
    """
    num_pages = jnp.asarray(num_pages, jnp.int32)

    def until_enough(freed: Array, index: RadixIndex, pool: PagePool):
        def body(s: tuple[Array, Array, RadixIndex, PagePool]) -> tuple[Array, Array, RadixIndex, PagePool]:
            freed, _, idx, pl = s
            idx, pl, evicted, returned = _evict_one(idx, pl, jnp.asarray(-1, jnp.int32), index_only=False,
                                                    freeing=True)
            return freed + returned, evicted, idx, pl

        freed, _, index, pool = jax.lax.while_loop(lambda s: (s[0] < num_pages) & s[1], body,
                                                   (freed, jnp.asarray(True), index, pool))
        return freed, index, pool

    index, pool, freed = _evict_index_only(index, pool, num_pages)
    # A second loop, entered only when the first fell short: each of its evictions makes log2(N) passes
    # over the nodes, too many for the common case.
    freed, index, pool = until_enough(freed, index, pool)
    return index, pool, freed


def clear(index: RadixIndex, pool: PagePool, locked: bool = False) -> tuple[RadixIndex, PagePool]:
    """Drop every unlocked node, releasing its page reference; locked paths stay. ``locked`` (static): drop those
    too (new weights: every cached page holds keys of the old ones); their holders keep their pages through their
    slots' own references, and must not unlock the dropped nodes (`Scheduler.clear_index`).

    >>> index, pool = clear(create(8, 2), kv_pool.create(8, 2, 2, 4))
    """
    n = index.capacity + 1
    ids = jnp.arange(n)
    drop = index.in_use & ((index.lock_count == 0) | locked) & (ids != ROOT)
    pool = kv_pool.release(pool, index.page, drop)
    keep = index.in_use & ~drop
    free_nodes, free_count = _free_node_stack(~keep)
    index = index.replace(
        parent=jnp.where(keep, index.parent, -1),
        in_use=keep,
        lock_count=jnp.where(keep, index.lock_count, 0),
        num_children=jnp.zeros(n, jnp.int32).at[jnp.where(keep & (ids != ROOT), index.parent, n)].add(1, mode="drop"),
        free_nodes=free_nodes,
        free_node_count=free_count,
        table=jnp.full(index.table_size, _EMPTY, jnp.int32),
    )

    def put(v: Array, table: Array) -> Array:
        return _table_put(index, table, v, index.prefix_hash[v], keep[v] & (v != ROOT))

    return index.replace(table=jax.lax.fori_loop(0, n, put, index.table)), pool


def stats(index: RadixIndex) -> dict[str, Array]:
    """Counters, all [] int32: nodes (indexed pages), locked_nodes, hits / misses (match calls with / without
    a matched page), hit_tokens, queried_tokens (sum of match lengths).
    """
    return {
        "nodes": jnp.sum(index.in_use, dtype=jnp.int32) - 1,
        "locked_nodes": jnp.sum(index.in_use & (index.lock_count > 0), dtype=jnp.int32),
        "hits": index.hits,
        "misses": index.misses,
        "hit_tokens": index.hit_tokens,
        "queried_tokens": index.queried_tokens,
    }
