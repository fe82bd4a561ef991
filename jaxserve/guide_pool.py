"""The device's tables of every structured-output guide that decode calls follow: one pair of arrays, each guide
at a fixed row offset, so a decode call takes the same arrays whatever mix of constraints its rows carry.

Owns the placement of guides' tables on the device (first fit, least recently used ones leave under pressure,
the arrays double up to a byte budget) and their writes there. It never decides which rows decode or what a
row's state is: the engine asks `place` for its call's guides and adds each row's state to its guide's offset.

Why one pool and not a concatenation a call: a decode call compiles for the row count of its guide tables, so
tables sized by each call's own guides (padded to powers of two) compiled a new decode variant for every new
size a server met (seconds on a GPU, every running stream stalled meanwhile), and every change of the batch's
set of guides copied all their tables again. The pool's rows change only when it grows (a handful of sizes,
which `Engine.warmup(structured=True)` compiles up front), and a guide's tables are written once per residency.

Row 0 lets every token through and stays there (unconstrained rows); row 1 allows only the EOS ids and stays
there (a complete match, or EOS taken); a guide's next-state table is written with its local states shifted
by its offset, and its breaking steps (masked: never taken) and EOS sent to row 1.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.structured import TokenGuide, pack_mask

# Rows a guide's extent is rounded up to: `TokenGuide.device_tables(padded=True)` pads the live states to a power
# of two from 8 above them, so the live states rounded up to CHUNK never pass its rows and every copy is a whole
# chunk of the source.
CHUNK = 8
# Rows of a pool's first arrays: ~83 MB at Qwen's 151,936-token vocabulary, a few regexes or a mid-sized schema.
FIRST_ROWS = 256
RESERVED = 2  # rows 0 (free) and 1 (EOS only)


def extent(guide: TokenGuide) -> int:
    """Rows ``guide`` takes in a pool: its live states, rounded up to `CHUNK`."""
    return -(-guide.dfa.sink // CHUNK) * CHUNK


class GuidePool:
    """Guides' masks ``[rows, ceil(V / 32)]`` (uint32) and next states ``[rows, V]`` (int16, pool rows) on the
    device, at most ``max_bytes`` of them; built at the first `place`.

    Example:
        >>> pool = GuidePool(vocab_size=guide.vocab.size, eos_ids=guide.eos_ids, max_bytes=1 << 30)  # doctest: +SKIP
        >>> offsets = pool.place([guide])                                                           # doctest: +SKIP
        >>> masks, nxt = pool.tables()  # a row in local state s of guide is at pool row offsets[guide] + s
    """

    def __init__(self, vocab_size: int, eos_ids: Sequence[int], max_bytes: int) -> None:
        self.vocab_size = vocab_size
        allowed = np.zeros(vocab_size, bool)
        allowed[[t for t in eos_ids if 0 <= t < vocab_size]] = True
        self.eos_mask = pack_mask(allowed)
        self.words = self.eos_mask.shape[0]
        self.row_bytes = vocab_size * 2 + self.words * 4
        # int16 next states: the pool's rows stay below 2^15.
        self.max_rows = min(max_bytes // self.row_bytes, np.iinfo(np.int16).max) // CHUNK * CHUNK
        self.rows = 0
        self._masks: jax.Array | None = None
        self._next: jax.Array | None = None
        self.placed: collections.OrderedDict[TokenGuide, int] = collections.OrderedDict()  # offsets, LRU first
        self.writes = 0  # guides written (a rebuild after an eviction counts again)

    def fits(self, guides: Collection[TokenGuide]) -> bool:
        """Whether ``guides`` could share the pool at its largest (whatever else is placed)."""
        return RESERVED + sum(extent(g) for g in guides) <= self.max_rows

    def tables(self) -> tuple[jax.Array, jax.Array]:
        """The pool's masks and next states, as a decode call takes them (`Runner.decode`'s ``guides``)."""
        self._ensure(FIRST_ROWS)
        return self._masks, self._next

    def place(self, guides: Sequence[TokenGuide]) -> dict[TokenGuide, int] | None:
        """Each of ``guides``' row offset, writing those not in the pool (others, least recently used first,
        leave for them; the arrays grow where they must). None where ``guides`` cannot all be there at once
        (`fits`): the caller then takes masks from the host. Call it only while no decode call that follows
        guides is in flight (a guide that leaves is overwritten in place), or for the guides of the one in
        flight (all placed: nothing moves)."""
        guides = list(dict.fromkeys(guides))
        if not self.fits(guides):
            return None
        self._ensure(FIRST_ROWS)
        for g in guides:
            if g in self.placed:
                self.placed.move_to_end(g)
        for g in guides:
            if g in self.placed:
                continue
            offset = self._gap(extent(g))
            while offset is None:
                victim = next((v for v in self.placed if v not in guides), None)
                if victim is not None:
                    del self.placed[victim]
                elif self.rows < self.max_rows:
                    self._grow()
                else:
                    # Their extents fit the pool but not the gaps between the ones placed: written again from
                    # the start. No decode call is in flight (above), and a chained one places nothing new.
                    self.placed.clear()
                    return self.place(guides)
                offset = self._gap(extent(g))
            self._write(g, offset)
            self.placed[g] = offset
        return {g: self.placed[g] for g in guides}

    def _gap(self, size: int) -> int | None:
        """The first offset where ``size`` free rows start (first fit among the placed extents)."""
        start = RESERVED
        for offset, guide in sorted((o, g) for g, o in self.placed.items()):
            if offset - start >= size:
                return start
            start = max(start, offset + extent(guide))
        return start if self.rows - start >= size else None

    def _ensure(self, rows: int) -> None:
        if self._masks is not None:
            return
        self.rows = min(rows, self.max_rows)
        masks = np.zeros((self.rows, self.words), np.uint32)
        masks[0], masks[1] = 0xFFFFFFFF, self.eos_mask
        nxt = np.zeros((self.rows, self.vocab_size), np.int16)
        nxt[1] = 1
        self._masks, self._next = jnp.asarray(masks), jnp.asarray(nxt)

    def _grow(self) -> None:
        """Double the rows (to the budget at most); placed guides keep their offsets. Decode calls compile
        again for the new size, so this comes last, after evictions."""
        rows = min(2 * self.rows, self.max_rows)
        self._masks, self._next = _grown(self._masks, self._next, rows=rows)
        self.rows = rows

    def _write(self, guide: TokenGuide, offset: int) -> None:
        masks, nxt = guide.device_tables(padded=True)
        self._masks, self._next = _write_rows(self._masks, self._next, masks, nxt, offset, extent(guide),
                                              guide.dfa.sink)
        # The pool holds them now; the guide's own copy would double the device memory.
        guide.drop_device_tables()
        self.writes += 1


@functools.partial(jax.jit, static_argnames=("rows",))
def _grown(masks: jax.Array, nxt: jax.Array, *, rows: int) -> tuple[jax.Array, jax.Array]:
    pad = rows - masks.shape[0]
    return jnp.pad(masks, ((0, pad), (0, 0))), jnp.pad(nxt, ((0, pad), (0, 0)))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_rows(pool_masks: jax.Array, pool_next: jax.Array, masks: jax.Array, nxt: jax.Array, offset: jax.Array,
                count: jax.Array, sink: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows ``[0, count)`` of a guide's padded tables into the pool at ``offset``, `CHUNK` rows a copy (one
    compile per pool and source size, not per guide); local states shift by ``offset``, the sink (a breaking
    token) and the EOS state past it go to row 1."""

    def chunk(i, pools):
        pm, pn = pools
        src = i * CHUNK
        n = jax.lax.dynamic_slice_in_dim(nxt, src, CHUNK).astype(jnp.int32)
        n = jnp.where(n < sink, n + offset, 1).astype(pn.dtype)
        return (jax.lax.dynamic_update_slice_in_dim(pm, jax.lax.dynamic_slice_in_dim(masks, src, CHUNK), offset + src, 0),
                jax.lax.dynamic_update_slice_in_dim(pn, n, offset + src, 0))

    return jax.lax.fori_loop(0, count // CHUNK, chunk, (pool_masks, pool_next))

