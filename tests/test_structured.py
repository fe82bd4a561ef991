"""Structured outputs: the regex -> byte DFA compiler, the vocabulary masks, the sampler's mask and the
constraint's parameters (the engine's constrained requests: test_structured_engine.py)."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve import SamplingParams
from jaxserve.sampling import make_batch, sample, unpack_allowed
from jaxserve.structured import (GuideState, StructuredOutputs, TokenGuide, Vocabulary, compile_regex, escape,
                                 unpack_mask, utf8_sequences)

PATTERNS = [r"(?:yes|no)!?", r"[a-z]+@[a-z]+\.com", r"\d{3}-\d{4}", r'[^"]*', r"(ab|cd)*e?", r".{2,4}",
            r"[à-ü]+x", r"[^a-c\d]{1,3}", r"\w+\s\S", r"a{0,3}b{2,}", r"", r"a|", r"x{2}y{1,}?", r"[\u4e00-\u9fff]+",
            r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?$", r"[\]\-a]+", r"(?:\.|[^.])c", r"a{,2}b", r"c{,}x{}",
            # Lookaheads: decided within their group (a product with it), past it (owed on), at the text's end,
            # nested, repeated, in alternatives.
            r'"(?=[a-e]{1,3}")[a-c]+"x?', r"(?=\w*\d)\w{2,4}", r"(?:(?=ab)a|(?=a.c)ab)c", r"(?:(?=ab)a)b",
            r"x(?=.*y)(?:.*c)?.*", r"(?=.*\d)(?=.*[a-e]).{2,5}", r"(?=a(?=bc))ab.", r"(?:a|(?=b)..)+", r"a(?=)b"]
ALPHABET = "abcdexy@.com0123-! \"\n]éü中文\\{},"


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=8))
def test_dfa_matches_what_python_re_fully_matches(pattern, text):
    dfa = _dfa(pattern)
    assert dfa.fullmatch(text) == bool(re.fullmatch(pattern, text, re.ASCII))


_DFAS: dict[str, object] = {}


def _dfa(pattern):
    if pattern not in _DFAS:
        _DFAS[pattern] = compile_regex(pattern)
    return _DFAS[pattern]


def test_dfa_is_minimal_on_a_repeat_and_keeps_only_live_states():
    # Six states: "", "x", "xx" (accepting) ... up to four; plus the sink, which maps to itself.
    dfa = compile_regex(r"x{2,4}")
    assert dfa.table.shape == (6, 256)
    assert (dfa.table[-1] == dfa.sink).all() and not dfa.accepting[-1]
    assert dfa.run(b"xy") == dfa.sink  # a dead end goes straight to the sink, never to a state with no way out


@settings(max_examples=200, deadline=None)
@given(lo=st.integers(0, 0x10FFFF), span=st.integers(0, 5000))
def test_utf8_sequences_match_exactly_the_ranges_characters(lo, span):
    hi = min(0x10FFFF, lo + span)
    seqs = utf8_sequences(lo, hi)
    rng = np.random.default_rng(lo)
    probes = {lo, hi, *rng.integers(max(0, lo - 70), min(0x10FFFF, hi + 70) + 1, size=60).tolist()}
    for cp in probes:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        data = chr(cp).encode()
        hits = sum(len(s) == len(data) and all(a <= b <= c for (a, c), b in zip(s, data)) for s in seqs)
        assert hits == (1 if lo <= cp <= hi else 0), (hex(cp), seqs)


@pytest.mark.parametrize("pattern, what", [(r"(?!a)b", "groups"), (r"(?<=a)b", "groups"), (r"(?P<n>a)", "groups"),
                                           (r"(?=a)b", "matches nothing"), (r"(?:(?=x)x(?=b))b", "looks past"),
                                           (r"(a)\1", "escape"), (r"a{3,1}", "max < min"), (r"(ab", "missing ')'"),
                                           (r"ab)", "unbalanced"),
                                           (r"[ab", "missing ']'"), (r"*a", "nothing to repeat"),
                                           (r"a^b", "anchor"), (r"[^\s\S]", "matches nothing")])
def test_unsupported_or_bad_regex_is_refused_naming_it(pattern, what):
    with pytest.raises(ValueError, match=re.escape(what)):
        compile_regex(pattern)


def test_minimized_dfas_are_the_same_through_the_row_hash_and_the_row_sort(monkeypatch):
    """`_minimize` tells rows apart by a hash, checked row by row; the slow path sorts the rows themselves. Both give
    the same DFA; a literal longer than `MINIMIZE_ROUNDS` (one round a character) is left as built, and right."""
    from jaxserve import structured
    from jaxserve.json_schema import json_object_regex, schema_to_regex

    patterns = [r"x{2,4}", r"(?:ab|cd)*e?[0-9]{1,3}", json_object_regex(2),
                schema_to_regex({"type": "object", "properties": {"a": {"type": "string", "maxLength": 12},
                                                                  "b": {"enum": [1, 2, "x"]}}})]
    hashed = [compile_regex(p) for p in patterns]
    monkeypatch.setattr(structured, "_ROW_HASH", structured._ROW_HASH[:0])  # every row set past the hash's width
    for pattern, dfa in zip(patterns, hashed):
        slow = compile_regex(pattern)
        assert np.array_equal(dfa.table, slow.table) and np.array_equal(dfa.accepting, slow.accepting), pattern
    n = structured.MINIMIZE_ROUNDS + 44
    pattern = "ab" * (n // 2) + "(?:c|d)"
    dfa = compile_regex(pattern)
    # n + 1 states along the literal, one past "c" and one past "d" (as built; merged they are one), the sink.
    assert dfa.table.shape[0] == n + 4
    assert dfa.fullmatch("ab" * (n // 2) + "d") and not dfa.fullmatch("ab" * (n // 2))
    monkeypatch.setattr(structured, "MINIMIZE_ROUNDS", n + 8)
    assert compile_regex(pattern).table.shape[0] == n + 3


def test_groups_nested_past_the_parser_s_recursion_are_refused():
    with pytest.raises(ValueError, match="nests its groups too deeply"):
        compile_regex("(" * 2000 + "a" + ")" * 2000)
    with pytest.raises(ValueError, match="structured_outputs.whitespace_pattern"):
        StructuredOutputs(json_object=True, whitespace_pattern="(")


def test_masks_allow_exactly_the_tokens_that_keep_a_match_reachable():
    rng = np.random.default_rng()
    pieces = [bytes(rng.choice(list(b"ab{}\":, 0123x"), size=rng.integers(1, 5))) for _ in range(300)]
    vocab = Vocabulary(pieces + [None, "é".encode(), "é".encode()[:1], "é".encode()[1:]])
    eos = vocab.size - 4  # the None token stands for EOS here
    dfa = compile_regex(r'\{"a": ?[0-9]{1,3}(?:, ?"b": ?"[ax]*")?\}|é+')
    guide = TokenGuide(dfa, vocab, eos_ids=(eos,))
    for state in range(dfa.sink):
        allowed = unpack_mask(guide.mask(state), vocab.size)
        for t in range(vocab.size):
            expect = (t == eos and bool(dfa.accepting[state])) or (
                bool(vocab.token_bytes[t]) and dfa.run(vocab.token_bytes[t], state) != dfa.sink)
            assert allowed[t] == expect, (state, t, vocab.token_bytes[t])
    # A split multi-byte character is walked byte by byte: its first byte leads on, the second finishes it.
    mid = guide.next_state(0, vocab.size - 2)
    assert mid != dfa.sink and dfa.accepting[guide.next_state(mid, vocab.size - 1)]


def test_guide_state_follows_tokens_to_a_final_match():
    vocab = Vocabulary([b"y", b"es", b"yes", b"n", b"o", b"no!", None])
    guide = TokenGuide(compile_regex(r"(?:yes|no)!?"), vocab, eos_ids=(6,))
    state = GuideState(guide)
    state.advance([0, 1])  # "y" "es": a full match, which "!" could still extend
    assert not state.final and not state.broken
    assert unpack_mask(state.mask(), 7).tolist() == [False] * 6 + [True]  # "yes" then only EOS ("!" is no token)
    state.advance([0, 1, 6])
    assert state.final and unpack_mask(state.mask(), 7).tolist() == [False] * 6 + [True]
    other = GuideState(guide)
    other.advance([5])
    assert other.final
    broken = GuideState(guide)
    broken.advance([4])
    assert broken.broken and not broken.final
    # A call's tokens past a complete match (or an EOS taken at one) are not taken; the ones counted are.
    run = GuideState(guide)
    assert run.until_final([], [0, 1, 6, 6]) == 3 and run.eos and run.consumed == 3
    assert GuideState(guide).until_final([0], [1, 2]) == 2  # "y" "es" "yes": "yesyes" breaks it, all taken
    done = GuideState(guide)
    assert done.until_final([], [5, 6, 6]) == 1 and done.final and done.consumed == 1
    # Complete already (its last token came from another call of the step: a recompute's prefill), a verify or
    # decode call's EOS after it is not taken (it was, in the random workload's seed 334128238).
    assert GuideState(guide).until_final([5], [6]) == 0


def test_sampler_draws_only_allowed_tokens_and_greedy_takes_the_best_allowed():
    v = 70
    rng = np.random.default_rng()
    allowed = rng.random((4, v)) < 0.2
    allowed[:, 5] = True
    packed = np.stack([np.packbits(np.pad(a, (0, 96 - v)), bitorder="little").view("<u4") for a in allowed])
    assert (np.asarray(unpack_allowed(jnp.asarray(packed), v)) == allowed).all()
    assert (unpack_mask(packed, v) == allowed).all()
    logits = jnp.asarray(rng.normal(size=(4, v)) * 3, jnp.float32)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, seed=3), SamplingParams(temperature=0),
              SamplingParams(temperature=2.0, top_p=0.9, seed=4)]
    batch = make_batch(params, 4, allowed=packed)
    for step in range(20):
        tokens = np.asarray(sample(logits, batch, jnp.full(4, step, jnp.int32)).tokens)
        assert allowed[np.arange(4), tokens].all()
    best = np.where(allowed, np.asarray(logits), -np.inf).argmax(-1)
    assert tokens[0] == best[0] and tokens[2] == best[2]


def test_structured_outputs_params_validate_and_round_trip():
    p = SamplingParams(max_tokens=8, structured_outputs={"json": '{"type": "integer"}'})
    assert p.structured_outputs == StructuredOutputs(json={"type": "integer"})
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert json.loads(json.dumps(p.to_dict()))["structured_outputs"] == {"json": {"type": "integer"}}
    for bad, field in [({"regex": "a", "choice": ["b"]}, "exactly one"), ({}, "exactly one"),
                       ({"choice": []}, "structured_outputs.choice"), ({"json": "{bad"}, "structured_outputs.json"),
                       ({"grammar": 5}, "structured_outputs.grammar"), ({"grammars": "x"}, "unknown structured_outputs"),
                       ("a", "structured_outputs must be"),
                       ({"json_object": True, "disable_fallback": "yes"}, "disable_fallback must be true or false")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(structured_outputs=bad)
    # vLLM's switches: disable_any_whitespace is JSON without whitespace; the other two hold here already.
    tight = StructuredOutputs.from_value({"json": {"type": "object"}, "disable_any_whitespace": True,
                                          "disable_fallback": True, "disable_additional_properties": True})
    assert tight == StructuredOutputs(json={"type": "object"}, whitespace_pattern="")
    assert StructuredOutputs.from_value({"json_object": True, "disable_any_whitespace": False}).whitespace_pattern is None
    assert escape('a.b"c') == 'a\\.b\\"c' and compile_regex(escape("1+1=2?")).fullmatch("1+1=2?")


def test_device_tables_equal_the_host_walks():
    rng = np.random.default_rng()
    pieces = [bytes(rng.choice(list(b'ab{}":, 0123x'), size=rng.integers(1, 9))) for _ in range(500)]
    vocab = Vocabulary(pieces + [None, "é".encode(), "é".encode()[:1]])
    guide = TokenGuide(compile_regex(r'\{"a": ?[0-9]{1,3}(?:, ?"b": ?"[ax]*")?\}|é+'), vocab, eos_ids=(500,))
    host_masks, host_next = guide.tables()
    masks, nxt = (np.asarray(t) for t in guide.device_tables())
    assert nxt.dtype == host_next.dtype == np.int16
    assert (masks == host_masks).all() and (nxt == host_next).all()
    # EOS leads to "EOS taken" (states + 1) exactly where the text so far is a full match.
    assert set(np.flatnonzero(host_next[:, 500] == guide.dfa.sink + 1)) == set(np.flatnonzero(guide.dfa.accepting[:-1]))
