"""The guide pool: every placed guide's rows hold its own tables (its states shifted by its offset, breaking
steps and EOS sent to row 1), rows 0 and 1 stay free / EOS-only, guides never overlap, the ones a call needs
are never evicted for each other, offsets never move while placed, and the arrays grow only when evicting
cannot make room. Checked against each guide's host tables (numpy walks of the vocabulary)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

import jaxserve.guide_pool as guide_pool
from jaxserve.guide_pool import RESERVED, GuidePool, extent
from jaxserve.structured import TokenGuide, Vocabulary, compile_regex, unpack_mask

PIECES = [b"a", b"b", b"ab", b"ba", b"0", b"1", b"01", b"{", b"}", b'"', b":", b", ", b"x", b"abba", b"10"]
VOCAB = Vocabulary(PIECES + [None])
EOS = len(PIECES)
PATTERNS = ["a+", "(?:ab|ba){1,3}", r'\{"x": ?[01]{1,4}\}', "[ab]{2,9}x", "1(?:0|1){0,20}", "b",
            "(?:a|b|0|1){3}x{0,2}"]


def _guides() -> list[TokenGuide]:
    guides = [TokenGuide(compile_regex(p), VOCAB, eos_ids=(EOS,)) for p in PATTERNS]
    for g in guides:
        g.tables()  # the host's numpy walks: the reference, computed before any device build
    return guides


GUIDES = _guides()


def _pool(rows: int) -> GuidePool:
    return GuidePool(VOCAB.size, (EOS,), max_bytes=rows * (VOCAB.size * 2 + 4))


def _check(pool: GuidePool) -> None:
    masks, nxt = (np.asarray(t) for t in pool.tables())
    assert masks.shape == (pool.rows, 1) and nxt.shape == (pool.rows, VOCAB.size) and nxt.dtype == np.int16
    assert (masks[0] == 0xFFFFFFFF).all() and (nxt[0] == 0).all()
    assert unpack_mask(masks[1], VOCAB.size).tolist() == [t == EOS for t in range(VOCAB.size)] and (nxt[1] == 1).all()
    spans = sorted((o, o + extent(g)) for g, o in pool.placed.items())
    assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:])), spans
    assert not spans or (spans[0][0] >= RESERVED and spans[-1][1] <= pool.rows)
    for g, offset in pool.placed.items():
        g_masks, g_next = g.tables()
        states = g.dfa.sink
        assert (masks[offset: offset + states] == g_masks).all()
        expect = np.where(g_next < states, g_next.astype(np.int32) + offset, 1)
        assert (nxt[offset: offset + states] == expect).all(), (g.dfa, offset)


def test_placed_guides_hold_their_tables_at_their_offsets():
    pool = _pool(256)
    offsets = pool.place(GUIDES[:3])
    assert set(offsets) == set(GUIDES[:3]) and offsets == {g: pool.placed[g] for g in GUIDES[:3]}
    _check(pool)
    writes = pool.writes
    assert pool.place(GUIDES[1:3]) == {g: offsets[g] for g in GUIDES[1:3]}  # already there: nothing written
    assert pool.writes == writes
    assert all(g._device_tables is None for g in GUIDES[:3])  # the pool holds the device's copy


def test_least_recently_used_guides_leave_and_the_call_s_own_stay():
    a, b, c = GUIDES[0], GUIDES[5], GUIDES[6]  # 8 rows each
    pool = _pool(RESERVED + 2 * 8 + 6)  # 24 rows: room for two
    pool.place([a])
    pool.place([b])
    pool.place([a])  # used again: b is now the least recently used
    assert pool.place([a, c]) == {a: RESERVED, c: RESERVED + 8}  # b left; a, which the call needs, stayed
    assert list(pool.placed) == [a, c]
    _check(pool)


def test_the_pool_grows_only_when_eviction_cannot_make_room(monkeypatch):
    monkeypatch.setattr(guide_pool, "FIRST_ROWS", 16)
    a, b, wide = GUIDES[0], GUIDES[5], GUIDES[1]  # 8, 8 and 16 rows
    pool = _pool(1 << 10)
    pool.place([a])
    pool.place([b])  # 16 rows hold one: a leaves rather than the arrays growing
    assert pool.rows == 16 and pool.placed == {b: RESERVED}
    assert pool.place([b, wide]) == {b: RESERVED, wide: RESERVED + 8}  # both needed: grown, b where it was
    assert pool.rows == 32
    _check(pool)


def test_guides_past_the_budget_are_refused():
    pool = _pool(RESERVED + extent(GUIDES[2]) - 1)
    assert not pool.fits([GUIDES[2]]) and pool.place([GUIDES[2]]) is None
    assert _pool(0).place([GUIDES[0]]) is None


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from(range(len(GUIDES))), min_size=1, max_size=4), min_size=1, max_size=8),
       st.sampled_from([48, 64, 96, 160]), st.sampled_from([16, 256]))
def test_random_calls_keep_every_guide_intact(calls, budget, first_rows):
    """A sequence of calls, each placing a random set of guides into a small pool: each call's guides are
    all placed (refused only where they could not fit together in any order), every placed guide's rows stay
    its own, a call whose guides are all placed moves and writes nothing (a chained decode call's states
    point into the pool), and placed guides move only when the gaps between them were too small (then the
    call's guides are all that stay)."""
    pool = _pool(budget)
    pool._ensure(first_rows)  # from 16 rows the arrays grow on the way
    for call in calls:
        guides = [GUIDES[i] for i in call]
        before, writes = dict(pool.placed), pool.writes
        placed = pool.place(guides)
        if placed is None:
            assert not pool.fits(set(guides))
            continue
        assert set(placed) == set(guides) and all(pool.placed[g] == o for g, o in placed.items())
        if set(guides) <= set(before):
            assert dict(pool.placed) == before and pool.writes == writes
        if any(before.get(g, o) != o for g, o in pool.placed.items()):
            assert set(pool.placed) == set(guides)
        _check(pool)


def test_first_rows_are_capped_by_the_budget():
    pool = _pool(16)
    pool.place([GUIDES[5]])
    assert pool.rows == 16
