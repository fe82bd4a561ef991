"""Structured outputs: the regex -> byte DFA compiler, the vocabulary masks, the sampler's mask and the engine's
constrained requests (the embedded default model, whose byte-level BPE tokenizer the masks walk)."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxserve
from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.sampling import make_batch, sample, unpack_allowed
from jaxserve.structured import (GuideState, StructuredOutputs, TokenGuide, Vocabulary, compile_regex, escape,
                                 unpack_mask, utf8_sequences)

PATTERNS = [r"(?:yes|no)!?", r"[a-z]+@[a-z]+\.com", r"\d{3}-\d{4}", r'[^"]*', r"(ab|cd)*e?", r".{2,4}",
            r"[à-ü]+x", r"[^a-c\d]{1,3}", r"\w+\s\S", r"a{0,3}b{2,}", r"", r"a|", r"x{2}y{1,}?", r"[\u4e00-\u9fff]+",
            r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?$", r"[\]\-a]+", r"(?:\.|[^.])c"]
ALPHABET = "abcdexy@.com0123-! \"\n]éü中文\\"


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


@pytest.mark.parametrize("pattern, what", [(r"(?=a)b", "groups"), (r"(a)\1", "escape"), (r"(?P<n>a)", "groups"),
                                           (r"a{3,1}", "max < min"), (r"(ab", "missing ')'"), (r"ab)", "unbalanced"),
                                           (r"[ab", "missing ']'"), (r"*a", "nothing to repeat"),
                                           (r"a^b", "anchor"), (r"[^\s\S]", "matches nothing")])
def test_unsupported_or_bad_regex_is_refused_naming_it(pattern, what):
    with pytest.raises(ValueError, match=re.escape(what)):
        compile_regex(pattern)


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
                       ({"grammar": "x"}, "unknown structured_outputs"), ("a", "structured_outputs must be")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(structured_outputs=bad)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a+"})
    assert escape('a.b"c') == 'a\\.b\\"c' and compile_regex(escape("1+1=2?")).fullmatch("1+1=2?")


# ----- the engine ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return jaxserve.load()


def _config(**kw) -> EngineConfig:
    base = dict(num_pages=64, page_size=8, max_running=4, max_tokens_per_step=64, decode_steps=4,
                batch_buckets=(4,), prefill_buckets=(16, 64))
    return EngineConfig(**{**base, **kw})


def _all_free(engine: Engine) -> None:
    engine.clear_prefix_cache()
    stats = engine.stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0, stats


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "size": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "size"]}


def _check_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) - {"tags"} == {"name", "size"} and isinstance(value["size"], int)
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert all(t in ("a", "b") for t in value.get("tags", [])) and len(value.get("tags", [])) <= 2


def test_constrained_requests_match_their_constraint_and_free_every_page(model):
    prompts = ["import os", "def main():", "class Point:", "x = "]
    specs = [{"choice": ["True", "False", "None"]}, {"regex": r"[0-9]{2}-[a-z]{3}"}, {"json": SCHEMA},
             {"json_object": True}]
    with Engine(model, _config()) as engine:
        for temperature in (0.0, 1.0):
            params = [SamplingParams(max_tokens=60, temperature=temperature, seed=i, structured_outputs=s)
                      for i, s in enumerate(specs)]
            outs = engine.generate(prompts, params, use_tqdm=False)
            assert [o["finish_reason"] for o in outs] == ["stop"] * 4, outs
            assert outs[0]["text"] in ("True", "False", "None")
            assert re.fullmatch(r"[0-9]{2}-[a-z]{3}", outs[1]["text"])
            _check_schema(outs[2]["text"])
            assert isinstance(json.loads(outs[3]["text"]), dict)
        _all_free(engine)


def test_greedy_constrained_tokens_are_the_best_allowed_ones(model):
    spec = {"regex": r"(?:def|class) [a-z_]{1,12}\((?:self)?\):"}
    params = SamplingParams(max_tokens=30, temperature=0, logprobs=20, structured_outputs=spec)
    with Engine(model, _config()) as engine:
        out = engine.generate(["import os\n\n"], params, use_tqdm=False)[0]
        guide = GuideState(engine._guide(params).guide)
    assert out["finish_reason"] == "stop" and re.fullmatch(spec["regex"], out["text"])
    for token, lp, top in zip(out["token_ids"], out["logprobs"], out["top_logprobs"]):
        allowed = unpack_mask(guide.mask(), model.config.vocab_size)
        assert allowed[token]
        # Log-probabilities are the raw model's (vLLM's default): no allowed token ranks above the chosen one.
        better = [t for t, v in top.items() if v > lp + 1e-6 and allowed[t]]
        assert not better, (token, better)
        guide.advance(out["token_ids"][: guide.consumed + 1])


def test_unconstrained_requests_beside_constrained_ones_keep_their_tokens(model):
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["import sys", "def f(a, b):", "for i in range(10):"]
    with Engine(model, _config()) as engine:
        alone = engine.generate(prompts, plain, use_tqdm=False)
        mixed = engine.generate(prompts + ["y = "], [plain] * 3 + [
            SamplingParams(max_tokens=12, temperature=0, structured_outputs={"regex": "[0-9]+"})], use_tqdm=False)
        assert [o["token_ids"] for o in mixed[:3]] == [o["token_ids"] for o in alone]
        assert re.fullmatch("[0-9]+", mixed[3]["text"]) and mixed[3]["finish_reason"] == "length"
        _all_free(engine)


def test_constrained_requests_survive_preemption_and_prefix_hits(model):
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=i, structured_outputs={"json": SCHEMA})
              for i in range(4)]
    prompt = "# a config record\nrecord = "
    with Engine(model, _config()) as roomy:
        expect = [o["text"] for o in roomy.generate([prompt] * 4, params, use_tqdm=False)]
    with Engine(model, _config(num_pages=10)) as tight:
        outs = tight.generate([prompt] * 4, params, use_tqdm=False)
        assert tight.stats()["preemptions"] > 0
        assert [o["text"] for o in outs] == expect
        for o in outs:
            _check_schema(o["text"])
        _all_free(tight)


def test_a_bad_constraint_is_refused_before_anything_runs(model):
    with Engine(model, _config()) as engine:
        with pytest.raises(ValueError, match=r"structured_outputs\.regex.*lookaround|structured_outputs\.regex"):
            engine.add_request("x", SamplingParams(structured_outputs={"regex": "(?=a)"}))
        with pytest.raises(ValueError, match=r"structured_outputs\.json"):
            engine.add_request("x", SamplingParams(structured_outputs={"json": {"type": "object",
                                                                                 "patternProperties": {}}}))
        out = engine.generate(["x = "], SamplingParams(max_tokens=4, temperature=0,
                                                       structured_outputs={"choice": ["1", "2"]}), use_tqdm=False)
        assert out[0]["text"] in ("1", "2")
        _all_free(engine)
