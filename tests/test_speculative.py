"""N-gram speculative decoding (`jaxserve.speculative`, EngineConfig.speculative_tokens): drafts are the tokens
after the latest earlier occurrence of the text's last n tokens (against a brute-force statement of that rule),
and through the engine greedy rows produce exactly greedy decoding's tokens, with several tokens a verify call
where the text repeats, under stop rules, length limits, penalties, preemption, prefix hits and beside rows that
sample."""

from __future__ import annotations

import re
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxserve
from jaxserve import Engine, EngineConfig, SamplingParams, sampling
from jaxserve.speculative import accepted_tokens, ngram_draft, rejection_sample
from tests.test_sampling import chi_square, chi_square_limit
from tests.test_engine import assert_all_pages_free, small_config

PROMPTS = ["import os\nimport sys\nimport os\nimport sys\n",
           "def f(self):\n    return self.x\n\ndef g(self):\n    return self.",
           "class A:\n    pass\n", "x = 1\ny = 2\nx = 1\ny = "]
GREEDY = SamplingParams(max_tokens=37, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return jaxserve.load()


def _reference_draft(ids, k, n_max, n_min):
    for n in range(min(n_max, len(ids) - 1), n_min - 1, -1):
        starts = [i for i in range(len(ids) - n) if ids[i:i + n] == ids[len(ids) - n:]]
        if starts:
            text = list(ids)  # copy on from the match, into what the copy itself appends
            for j in range(k):
                text.append(text[starts[-1] + n + j])
            return text[len(ids):]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.integers(0, 6), st.integers(1, 5), st.integers(1, 5))
def test_a_draft_follows_the_latest_earlier_occurrence_of_the_longest_matching_suffix(ids, k, n_max, n_min):
    # (continuing past the text's end into its own copy: a period shorter than k still drafts k tokens)
    n_min = min(n_min, n_max)
    assert ngram_draft(ids, k, n_max, n_min) == _reference_draft(ids, k, n_max, n_min)


def test_a_verify_call_emits_the_agreeing_drafts_and_the_model_s_next_token():
    assert accepted_tokens([], [7]) == ([7], 0)
    assert accepted_tokens([1, 2], [1, 2, 3]) == ([1, 2, 3], 2)
    assert accepted_tokens([1, 2], [5, 2, 3]) == ([5], 0)


def _run(model, config, prompts, params):
    with Engine(model, config) as engine:
        outs = engine.generate(prompts, params, use_tqdm=False)
        stats = engine.stats()
        assert_all_pages_free(engine)
    return outs, stats


@pytest.mark.parametrize("k", [1, 4])
def test_speculation_gives_greedy_decoding_s_tokens_in_fewer_calls(model, k):
    plain, _ = _run(model, small_config(), PROMPTS, GREEDY)
    outs, stats = _run(model, small_config(speculative_tokens=k), PROMPTS, GREEDY)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in plain]
    assert all(o["finish_reason"] == "length" and len(o["token_ids"]) == 37 for o in outs)
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_verify_calls"] > 0
    # Every verify call gives each of its rows one token and each accepted draft one more.
    assert stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"] <= k * len(PROMPTS) * stats["spec_verify_calls"]


def test_speculation_stops_at_the_batch_size_that_disables_it(model):
    """With ``speculative_disable_by_batch_size`` 3, four rows decode plainly until two are left (the short ones end
    at 5 tokens), then speculate: no verify call holds 3 rows or more, and the greedy tokens are unchanged."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (5, 37, 5, 37)]
    plain, _ = _run(model, small_config(), PROMPTS, params)
    with Engine(model, small_config(speculative_tokens=4, speculative_disable_by_batch_size=3)) as engine:
        rows, verify = [], engine._verify
        engine._verify = lambda reqs, drafts: (rows.append(len(reqs)), verify(reqs, drafts))  # noqa: E731
        outs = engine.generate(PROMPTS, params, use_tqdm=False)
        assert_all_pages_free(engine)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in plain]
    assert rows and max(rows) < 3


def test_speculation_keeps_stop_rules_and_limits(model):
    plain_params = [SamplingParams(max_tokens=40, temperature=0, stop=["sys\nimport"]),
                    SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                    SamplingParams(max_tokens=40, temperature=0),
                    SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[model.tokenizer.encode("\n")[0]])]
    plain, _ = _run(model, small_config(), PROMPTS, plain_params)
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, plain_params)
    for o, p in zip(outs, plain):
        assert (o["token_ids"], o["text"], o["finish_reason"], o["stop_reason"]) == (
            p["token_ids"], p["text"], p["finish_reason"], p["stop_reason"])


def test_speculation_survives_preemption_and_feeds_the_prefix_cache(model):
    plain, _ = _run(model, small_config(), PROMPTS, GREEDY)
    with Engine(model, small_config(num_pages=18, speculative_tokens=4)) as tight:
        outs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert tight.stats()["preemptions"] > 0 and tight.stats()["spec_accepted_tokens"] > 0
        assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in plain]
        assert_all_pages_free(tight)
    with Engine(model, small_config(speculative_tokens=4)) as engine:
        first = engine.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
        assert first["token_ids"] == plain[0]["token_ids"] and engine.stats()["spec_accepted_tokens"] > 0
        # A prompt that runs on into the verified tokens finds their pages cached, and continues as before.
        prompt = list(engine.request_ids(PROMPTS[0], GREEDY)) + plain[0]["token_ids"][:24]
        again = engine.generate([prompt], SamplingParams(max_tokens=13, temperature=0, ignore_eos=True),
                                use_tqdm=False)[0]
        assert again["cached_tokens"] >= len(prompt) - 8 - 1, (again["cached_tokens"], len(prompt))
        assert again["token_ids"] == plain[0]["token_ids"][24:]
        assert_all_pages_free(engine)


def test_greedy_rows_with_bias_min_tokens_or_allowed_tokens_speculate_and_keep_their_tokens(model):
    newline = model.tokenizer.encode("\n")[0]
    params = [SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, logit_bias={newline: -3.0}),
              SamplingParams(max_tokens=37, temperature=0, min_tokens=20, stop_token_ids=[newline]),
              SamplingParams(max_tokens=37, temperature=0, ignore_eos=True,
                             allowed_token_ids=sorted(set(model.tokenizer.encode(PROMPTS[2] * 3)))),
              SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, logit_bias={newline: 2.0}, min_tokens=5)]
    plain, _ = _run(model, small_config(), PROMPTS, params)
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    for o, p in zip(outs, plain):
        assert (o["token_ids"], o["finish_reason"], o["stop_reason"]) == (
            p["token_ids"], p["finish_reason"], p["stop_reason"])
    assert stats["spec_verify_calls"] > 0 and stats["spec_accepted_tokens"] > 0
    assert newline not in plain[1]["token_ids"][:20] and set(plain[2]["token_ids"]) <= set(params[2].allowed_token_ids)


def test_greedy_rows_with_penalties_speculate_and_keep_their_tokens(model):
    """A verify call penalizes each position with the drafts before it counted (`speculative.draft_history`), as
    the decode step would after taking them: greedy rows with repetition, presence and frequency penalties (the
    Qwen2.5-Instruct checkpoints' defaults carry a repetition penalty) give greedy decoding's tokens, beside a row
    asking for log-probabilities."""
    # (Row 0's penalty is light enough that its drafts are often kept, and moves a near-tie within one: with the
    # drafts left out of the history its text differs.)
    params = [SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, frequency_penalty=0.1),
              SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, presence_penalty=1.5,
                             repetition_penalty=1.05),
              SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, logprobs=1)]
    plain, _ = _run(model, small_config(), PROMPTS, params)
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in plain]
    assert stats["spec_verify_calls"] > 0 and stats["spec_accepted_tokens"] > 0
    assert outs[3]["logprobs"] == pytest.approx(plain[3]["logprobs"], abs=1e-5)
    assert plain[0]["token_ids"] != _run(model, small_config(), PROMPTS[:1], GREEDY)[0][0]["token_ids"]  # it bites


def test_a_draft_s_tokens_count_toward_the_penalties_of_the_positions_after_them():
    from jaxserve.speculative import draft_history

    rng = np.random.default_rng()
    b, s, v = 3, 5, 11
    counts = jnp.asarray(rng.integers(0, 3, (b, v)), jnp.int32)
    seen = jnp.asarray(rng.random((b, v)) < 0.3)
    tokens = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    draft_lens = jnp.array([4, 2, 0])
    got_counts, got_seen = draft_history(counts, seen, tokens, draft_lens)
    for i in range(b):
        for j in range(s):
            want_c, want_s = np.array(counts[i]), np.array(seen[i])
            for k in range(1, min(j, int(draft_lens[i])) + 1):
                want_c[int(tokens[i, k])] += 1
                want_s[int(tokens[i, k])] = True
            assert got_counts[i * s + j].tolist() == want_c.tolist()
            assert got_seen[i * s + j].tolist() == want_s.tolist()


def _rejection_draws(probs, tokens, n):
    """n independent verify rows of one target ``probs [S, V]`` and one draft: what each emitted."""
    s = probs.shape[0]
    logp = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, *probs.shape))
    keys = jax.random.split(jax.random.key(np.random.default_rng().integers(2**31)), n * s).reshape(n, s)
    # A fresh function each call, so that a changed noise source (`sampling.HASH_NOISE`) is traced again.
    emitted, count = jax.jit(lambda *args: rejection_sample(*args))(
        logp, jnp.broadcast_to(jnp.asarray(tokens), (n, s)), jnp.full(n, s - 1), keys)
    return np.asarray(emitted), np.asarray(count)


@pytest.mark.parametrize("hash_noise", [False, True], ids=["threefry", "hash_noise"])
def test_rejection_sampling_draws_every_emitted_token_from_the_target_distribution(hash_noise, monkeypatch):
    # The draft's tokens are likely (2), unlikely (3) and impossible (4) at their positions: each emitted token
    # must still follow the target given the tokens before it, whatever the draft proposed; under either source
    # of the drawn token's noise (`sampling.HASH_NOISE`).
    monkeypatch.setattr(sampling, "HASH_NOISE", hash_noise)
    probs = np.array([[0.1, 0.2, 0.5, 0.2, 0.0, 0.0], [0.3, 0.0, 0.1, 0.05, 0.0, 0.55],
                      [0.25, 0.25, 0.0, 0.5, 0.0, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4, 0.0]])
    n = 20000
    emitted, count = _rejection_draws(probs, [0, 2, 3, 4], n)
    limit = chi_square_limit
    stat, dof = chi_square(emitted[:, 0], probs[0])
    assert stat < limit(dof), (stat, dof)
    after = emitted[:, 0] == 2  # the first draft token kept: the second token follows position 1's target
    stat, dof = chi_square(emitted[after, 1], probs[1])
    assert stat < limit(dof), (stat, dof)
    both = after & (emitted[:, 1] == 3)  # both kept; the third draft token (4) is impossible there
    assert np.all(count[both] == 3) and np.all(emitted[both, 2] != 4)
    stat, dof = chi_square(emitted[both, 2], probs[2])  # the refused token had no mass to take out
    assert stat < limit(dof), (stat, dof)
    assert np.all(count == 1 + (emitted[:, 0] == 2) + ((emitted[:, 0] == 2) & (emitted[:, 1] == 3)))
    # A certain target is greedy decoding: every draft token it agrees with is kept, then its pick.
    certain = np.eye(6)[[2, 3, 1, 5]]
    emitted, count = _rejection_draws(certain, [0, 2, 3, 4], 64)
    assert np.all(count == 3) and np.all(emitted[:, :3] == [2, 3, 1])


def test_rows_that_sample_speculate_and_greedy_rows_beside_them_keep_greedy_tokens(model):
    params = [GREEDY, SamplingParams(max_tokens=37, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True), GREEDY,
              SamplingParams(max_tokens=37, temperature=1.0, top_k=5, seed=6, ignore_eos=True, logprobs=5)]
    plain, _ = _run(model, small_config(), PROMPTS, params)
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    again, _ = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    assert stats["spec_verify_calls"] > 0 and stats["spec_accepted_tokens"] > 0
    assert [outs[i]["token_ids"] for i in (0, 2)] == [plain[i]["token_ids"] for i in (0, 2)]
    assert [o["token_ids"] for o in again] == [o["token_ids"] for o in outs]  # seeded: the same draws again
    for o in outs[1], outs[3]:
        assert len(o["token_ids"]) == 37 and o["finish_reason"] == "length"
    # top_k=5: every token the row emitted (drafts kept or drawn) is one of the 5 most likely there, which its
    # top log-probabilities list.
    for token, lp, top, rank in zip(outs[3]["token_ids"], outs[3]["logprobs"], outs[3]["top_logprobs"],
                                    outs[3]["logprob_ranks"]):
        assert token in top and top[token] == pytest.approx(lp, abs=1e-5)
        assert rank == sum(v >= top[token] for v in top.values())  # its rank from the verify call


def test_speculation_settings_are_checked():
    for bad in (dict(speculative_tokens=-1), dict(speculative_tokens=33), dict(speculative_tokens=True),
                dict(prompt_lookup_max=0), dict(prompt_lookup_min=3, prompt_lookup_max=2),
                dict(speculative_disable_by_batch_size=-1)):
        with pytest.raises(ValueError, match=next(iter(bad)) if "min" not in str(bad) else "prompt_lookup_min"):
            EngineConfig(**bad)
    assert EngineConfig.from_dict(EngineConfig(speculative_tokens=3).to_dict()).speculative_tokens == 3


def test_greedy_rows_with_log_probabilities_speculate_and_keep_them(model):
    params = [SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, logprobs=k) for k in (0, 3, 0, 1)]
    plain, _ = _run(model, small_config(), PROMPTS, params)
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    assert stats["spec_accepted_tokens"] > 0
    for o, p in zip(outs, plain):
        assert o["token_ids"] == p["token_ids"]
        assert o["logprobs"] == pytest.approx(p["logprobs"], abs=1e-4)
        assert o["logprob_ranks"] == p["logprob_ranks"] == [1] * 37  # greedy: each token its step's likeliest
        for got, want in zip(o.get("top_logprobs", []), p.get("top_logprobs", [])):
            assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), abs=1e-4)


@pytest.mark.parametrize("sampled", [False, True])
def test_rows_with_logprob_token_ids_speculate_and_score_them_as_transformers(model, sampled):
    """A verify call scores each row's logprob_token_ids at every position it emits (greedy calls take them apart
    from the sampling batch they go without): transformers' float64 log-softmax, as without speculation."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxserve.loading import DEFAULT_MODEL_DIR
    from tests.test_engine import assert_named_logprobs, hf_log_softmax64

    named = model.tokenizer.encode(" os sys self x = 1", add_special_tokens=False)
    asks = SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, logprobs=1, logprob_token_ids=named)
    draws = SamplingParams(max_tokens=37, temperature=0.8, seed=5, ignore_eos=True, logprobs=0,
                           logprob_token_ids=named[::-1])
    params = [asks, GREEDY, draws if sampled else asks, SamplingParams(max_tokens=37, temperature=0, logprobs=2)]
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    assert stats["spec_accepted_tokens"] > 0
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    for out, p in zip(outs[:3:2], params[:3:2]):
        ids = out["prompt_token_ids"] + out["token_ids"]
        assert_named_logprobs(out, out["prompt_token_ids"], list(p.logprob_token_ids), hf_log_softmax64(hf, ids))
    assert all(len(top) == 2 for top in outs[3]["top_logprobs"]) and "top_logprobs" not in outs[1]


def test_greedy_rows_with_bad_words_speculate_and_keep_their_tokens(model):
    """A bad word's ban reads the tokens before each verified position, the drafts before it shifted in
    (`speculative.draft_recent`): texts that would repeat a banned phrase come out as without speculation."""
    words = [["import tempfile"], ["self.try"], ["of a"], ["y = 4"]]  # each in the row's text without bans
    params = [SamplingParams(max_tokens=37, temperature=0, ignore_eos=True, bad_words=w) for w in words]
    plain, _ = _run(model, small_config(), PROMPTS, params)
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in plain]
    assert stats["spec_verify_calls"] > 0 and stats["spec_accepted_tokens"] > 0
    free, _ = _run(model, small_config(), PROMPTS, GREEDY)
    for w, o, f in zip(words, plain, free):
        assert w[0] in f["text"] and w[0] not in o["text"]


def test_rows_with_structured_outputs_speculate_and_keep_their_tokens(model):
    """Position j of a guided row takes the mask of its guide's state after the first j draft tokens
    (`speculative.draft_states`): greedy constrained rows give the text they give without speculation, and it
    matches their constraint."""
    regexes = [r"(import [a-z]+\n)+", r"[a-z\n ():.]+", r"( *def [a-z]+\(self\):\n)+", r"(y = [0-9]\n)+"]
    params = [SamplingParams(max_tokens=30, temperature=0, structured_outputs={"regex": r}) for r in regexes]
    plain, _ = _run(model, small_config(), PROMPTS, params)
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in plain]
    assert stats["spec_verify_calls"] > 0 and stats["spec_accepted_tokens"] > 0
    for o, r in zip(outs, regexes):
        assert re.fullmatch(r, o["text"]) or (o["finish_reason"] == "length" and re.match(r, o["text"])), o["text"]


def test_a_guided_row_ends_at_its_complete_match_within_a_verify_call(model):
    """A draft that runs on past the point where a constraint's match is complete: the verify call's targets there
    allow only EOS, which the request must not take (it ends "stop" at the match, as without speculation)."""
    params = [SamplingParams(max_tokens=40, temperature=0, structured_outputs={"regex": r"(import [a-z]+\n){3}"}),
              GREEDY, GREEDY, SamplingParams(max_tokens=40, temperature=0, structured_outputs={"regex": r"(y = 2\n){2}"})]
    plain, _ = _run(model, small_config(), PROMPTS, params)
    outs, stats = _run(model, small_config(speculative_tokens=4), PROMPTS, params)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in plain]
    assert stats["spec_accepted_tokens"] > 0
    for o in (outs[0], outs[3]):
        assert o["finish_reason"] == "stop" and model.tokenizer.eos_token_id not in o["token_ids"]
    assert outs[0]["text"].count("\n") == 3


def test_warmup_compiles_the_verify_calls(model):
    # One batch bucket, one prefill bucket and a short model length (one decode table width): warm-up compiles every
    # shape, and only the verify calls' are this test's (tests/test_engine.py's warm-up test has several buckets).
    config = small_config(speculative_tokens=3, batch_buckets=(4,), prefill_buckets=(64,), max_model_len=128)
    params = [GREEDY, SamplingParams(max_tokens=37, temperature=0.7, seed=1, ignore_eos=True)]
    with Engine(model, config) as engine:
        engine.warmup()
        compiled = {s for s in engine.runner.compiled_shapes if s[0] == "verify"}
        assert {s[1][0] for s in compiled} == {4} and {s[5] for s in compiled} == {False, True}  # batch given
        engine.generate(PROMPTS[:1], GREEDY, use_tqdm=False)  # one row, greedy
        engine.generate(PROMPTS, params * 2, use_tqdm=False)  # batch 4, rows that sample
        assert engine.stats()["spec_verify_calls"] > 0
        assert {s for s in engine.runner.compiled_shapes if s[0] == "verify"} == compiled
        assert_all_pages_free(engine)
