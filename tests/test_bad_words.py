"""vLLM's `bad_words` through the engine, on the embedded default model: a word's tokens never appear in the
output, greedy rows take the best token the rule leaves them at every step (checked against the raw model's top
log-probabilities and a plain-Python statement of the rule), rows without bad words beside them keep their tokens,
and preemption, prefix hits, multi-step and chained decode calls and structured outputs all keep the rule."""

from __future__ import annotations

import dataclasses
import re

import pytest

import jaxserve
from jaxserve import Engine, SamplingParams
from jaxserve.sampling import MAX_BAD_WORD_TOKENS
from jaxserve.tokenizer import bad_words_token_ids
from tests.test_engine import assert_all_pages_free, small_config

PROMPTS = ["import os", "def main():", "class Point:", "for i in range(10):"]


@pytest.fixture(scope="module")
def model():
    return jaxserve.load()


def _bans(seqs, outputs) -> set[int]:
    """vLLM's rule: a sequence's last token is banned where the generated tokens end with the rest of it."""
    return {seq[-1] for seq in seqs
            if len(outputs) >= len(seq) - 1 and list(outputs[len(outputs) - len(seq) + 1:]) == list(seq[:-1])}


def _occurs(seqs, ids) -> list[tuple[int, ...]]:
    return [s for s in seqs for i in range(len(ids) - len(s) + 1) if tuple(ids[i:i + len(s)]) == s]


def _words_from(model, outs) -> list[str]:
    """Words the unconstrained greedy outputs contain: pieces of two and three tokens and one token of each, so
    that the bans bite (several-token words where the model would otherwise write them)."""
    words = []
    for o in outs:
        ids = o["token_ids"]
        for lo, n in ((2, 2), (6, 3), (10, 1)):
            text = model.tokenizer.decode(ids[lo:lo + n])
            if text.strip():
                words.append(text)
    return words


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_greedy_rows_take_the_best_token_the_bad_words_leave(model, decode_steps):
    # One step a call: every word's tokens cross from one call into the next (chained calls must not start
    # before the host has the tokens the bans read).
    greedy = dict(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.0)
    with Engine(model, small_config(decode_steps=decode_steps)) as engine:
        base = engine.generate(PROMPTS, SamplingParams(**greedy), use_tqdm=False)
        words = _words_from(model, base)
        seqs = bad_words_token_ids(model.tokenizer, words)
        assert any(len(s) > 1 for s in seqs) and any(len(s) == 1 for s in seqs), seqs
        params = SamplingParams(**greedy, logprobs=20, bad_words=words)
        outs = engine.generate(PROMPTS, params, use_tqdm=False)
        assert_all_pages_free(engine)
    bit = 0
    for o, b in zip(outs, base):
        ids = o["token_ids"]
        assert not _occurs(seqs, ids), (words, o["text"])
        for k, (token, lp, top) in enumerate(zip(ids, o["logprobs"], o["top_logprobs"])):
            banned = _bans(seqs, ids[:k])
            assert token not in banned
            better = [t for t, v in top.items() if v > lp + 1e-5]
            assert set(better) <= banned, (k, token, better, banned)  # every token above it is banned now
            bit += bool(better)
        assert ids != b["token_ids"]
    assert bit  # some ban changed a greedy pick


def test_bad_words_hold_under_sampling_preemption_prefix_hits_and_beside_other_rows(model):
    plain = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompt = "# a long shared prefix of several pages, so that later requests hit the cache\nimport "
    with Engine(model, small_config()) as roomy:
        base = roomy.generate([prompt] * 2, plain, use_tqdm=False)
        words = _words_from(model, base) + ["sys", "self."]
        seqs = bad_words_token_ids(model.tokenizer, words)
        params = [SamplingParams(max_tokens=40, temperature=t, seed=i, ignore_eos=True, bad_words=words)
                  for i, t in enumerate((0.0, 0.7, 1.0, 1.3))]
        expect = roomy.generate([prompt] * 4, params, use_tqdm=False)
        mixed = roomy.generate([prompt] * 2, [plain, params[0]], use_tqdm=False)
        assert mixed[0]["token_ids"] == base[0]["token_ids"]  # a row without bad words keeps its tokens
        assert mixed[1]["token_ids"] == expect[0]["token_ids"]
        assert_all_pages_free(roomy)
    with Engine(model, small_config(num_pages=12)) as tight:  # a seeded request draws the same tokens anyway
        outs = tight.generate([prompt] * 4, params, use_tqdm=False)
        assert tight.stats()["preemptions"] > 0
        assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in expect]
        assert_all_pages_free(tight)
    for o in expect:
        assert not _occurs(seqs, o["token_ids"]), (words, o["text"])


def test_single_token_bad_words_keep_decode_calls_chained(model):
    # A one-token word bans its token whatever came before: the step needs no tokens from the host, so calls
    # still chain (overlap); longer words need the host's last tokens and do not.
    words = ["(", "self", "import"]
    seqs = bad_words_token_ids(model.tokenizer, words)
    assert all(len(s) == 1 for s in seqs), seqs
    with Engine(model, small_config(decode_steps=2)) as engine:
        out = engine.generate(["import os"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                            bad_words=words), use_tqdm=False)[0]
        assert engine.stats()["overlapped_decode_calls"] > 0
        assert not set(out["token_ids"]) & {s[0] for s in seqs}, out["text"]
        assert_all_pages_free(engine)


def test_bad_words_with_structured_outputs_on_the_device(model):
    spec = {"regex": r"[a-z]{3,8}( [a-z]{3,8}){2,5}"}
    with Engine(model, small_config()) as engine:
        free = engine.generate(["x = "], SamplingParams(max_tokens=40, temperature=0, structured_outputs=spec),
                               use_tqdm=False)[0]
        words = _words_from(model, [free])
        seqs = bad_words_token_ids(model.tokenizer, words)
        out = engine.generate(["x = "], SamplingParams(max_tokens=40, temperature=0, structured_outputs=spec,
                                                       bad_words=words), use_tqdm=False)[0]
        assert_all_pages_free(engine)
    assert re.fullmatch(spec["regex"], out["text"]), out["text"]
    assert not _occurs(seqs, out["token_ids"]) and out["token_ids"] != free["token_ids"]


def test_bad_words_past_what_a_row_carries_are_refused_by_name(model):
    with Engine(model, small_config()) as engine:
        with pytest.raises(ValueError, match="bad_words"):
            engine.add_request("x", SamplingParams(bad_words=["abcdefghij" * 10]))  # more tokens than a row holds
        assert len(bad_words_token_ids(model.tokenizer, ["abcdefghij" * 10])[0]) > MAX_BAD_WORD_TOKENS
        assert_all_pages_free(engine)
    with Engine(dataclasses.replace(model, tokenizer=None), small_config()) as engine:
        with pytest.raises(ValueError, match="bad_words need a tokenizer"):
            engine.add_request([5, 6], SamplingParams(bad_words=["x"]))
