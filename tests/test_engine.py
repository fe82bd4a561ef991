"""The engine: continuous batching over the paged pool gives Hugging Face's tokens."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxserve
from jaxserve import Engine, EngineConfig, PoolingParams, SamplingParams
from tests.conftest import drive_random_workload

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, hf = tiny_checkpoint
    return jaxserve.load(path), hf


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def small_config(**kw) -> EngineConfig:
    # float32 on every backend: the tests hold it to transformers' float32 numbers ("auto" is float32 on the CPU
    # alone; on a GPU it is bfloat16, which failed them there, bench/results/f32_parity.md).
    base = dict(num_pages=96, page_size=8, max_running=4, max_tokens_per_step=64, decode_steps=4,
                batch_buckets=(4,), prefill_buckets=(16, 64), dtype="float32")
    base.update(kw)
    return EngineConfig(**base)


def assert_all_pages_free(engine: Engine) -> None:
    engine.clear_prefix_cache()
    stats = engine.stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0, stats


def random_prompts(vocab: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng()
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("policy", ["prefill_first", "time_share", "mixed"])
def test_greedy_batch_matches_transformers_and_running_alone(tiny, policy):
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (3, 9, 17, 30, 41))  # 5 prompts > max_running: queueing
    with Engine(m, small_config(policy=policy)) as engine:
        outs = engine.generate(prompts, GREEDY, use_tqdm=False)
        for p, o in zip(prompts, outs):
            assert o["token_ids"] == hf_greedy(hf, p, 10)
            assert o["finish_reason"] == "length" and o["prompt_tokens"] == len(p)
        alone = engine.generate(prompts[3], GREEDY, use_tqdm=False)[0]
        assert alone["token_ids"] == outs[3]["token_ids"]
        # Bounded by the planned shapes: two prefill buckets and the decode shapes (two table widths of the 4-row
        # bucket on the CPU; a GPU may run small calls padded to 8 rows, shapes of their own).
        assert engine.stats()["compilations"] <= len(engine.config.prefill_buckets) + len(engine._decode_shapes)
        assert_all_pages_free(engine)


def test_yarn_checkpoint_serves_transformers_greedy_tokens_past_its_original_window(tmp_path):
    """A long-context checkpoint (YaRN rope_scaling, as the Qwen2.5 model cards add past 32k) through the paged
    engine: prompts crossing its original 32-position window decode as transformers does."""
    from tests.conftest import make_hf_checkpoint

    path = str(tmp_path / "yarn")
    hf = make_hf_checkpoint(path, max_position_embeddings=256, seed=7,
                            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    m = jaxserve.load(path)
    assert m.config.rope_scaling is not None and m.config.rope_scaling.rope_type == "yarn"
    prompts = random_prompts(m.config.vocab_size, (9, 41))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    assert m.config.context_length == 32 * 4  # vLLM's rule: YaRN's original window times its factor
    with Engine(m, small_config()) as engine:
        assert engine.max_model_len == 128
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert_all_pages_free(engine)
    for p, o in zip(prompts, outs):
        assert o["token_ids"] == hf_greedy(hf, p, 10)
        # The tokens' log-probabilities too: a random model's greedy tokens barely depend on positions.
        want = hf_prompt_logprobs(hf, p + o["token_ids"])[len(p) - 1:-1][np.arange(10), o["token_ids"]]
        np.testing.assert_allclose(np.array(o["logprobs"]), want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("impl", ["pallas", "pallas-unfused"])
def test_pallas_kernels_in_interpret_mode_give_the_same_tokens(tiny, impl, monkeypatch):
    from jaxserve import runner as runner_mod

    monkeypatch.setattr(runner_mod, "GREEDY_PICK_MIN_ROWS", 1)  # the greedy pick kernel at any batch
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 12))
    # logprobs=0: the chosen tokens' log-probabilities, which under "pallas" come from the greedy
    # pick kernel (one pass over the logits) and must equal the jnp path's.
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    with Engine(m, small_config(attention_impl=impl, decode_steps=2)) as engine:
        assert engine.runner.compiled.pick_kernel == (impl == "pallas")
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 4) for p in prompts]
        if impl == "pallas":  # where the pick kernel runs (once: interpret-mode compiles are slow)
            # No request asks for log-probabilities: the steps compiled without them (the pick an
            # argmax alone) give the same tokens, and the results carry none.
            plain = engine.generate(prompts, dataclasses.replace(params, logprobs=None), use_tqdm=False)
            assert [o["token_ids"] for o in plain] == [o["token_ids"] for o in outs]
            assert all("logprobs" not in o for o in plain)
            assert {shape[-1] for shape in engine.runner.compiled_shapes} == {True, False}
        assert_all_pages_free(engine)
    with Engine(m, small_config(attention_impl="reference", decode_steps=2)) as engine:
        ref = engine.generate(prompts, params, use_tqdm=False)
    for o, r in zip(outs, ref):
        np.testing.assert_allclose(o["logprobs"], r["logprobs"], rtol=1e-4, atol=1e-5)


def test_prefix_hit_skips_prefill_and_keeps_output(tiny):
    m, hf = tiny
    shared = random_prompts(m.config.vocab_size, (40,))[0]
    a, b = shared + [5, 6, 7], shared + [8, 9]
    with Engine(m, small_config()) as engine:
        first = engine.generate(a, GREEDY, use_tqdm=False)[0]
        before = engine.stats()["prefill_tokens"]
        second = engine.generate(b, GREEDY, use_tqdm=False)[0]
        computed = engine.stats()["prefill_tokens"] - before
        assert first["cached_tokens"] == 0
        assert second["cached_tokens"] == 40 and computed == len(b) - 40
        assert second["token_ids"] == hf_greedy(hf, b, 10)
        assert engine.stats()["prefix_hit_rate"] > 0
        assert_all_pages_free(engine)
    with Engine(m, small_config(prefix_caching=False)) as engine:
        assert engine.generate(b, GREEDY, use_tqdm=False)[0]["token_ids"] == second["token_ids"]
        assert_all_pages_free(engine)


def test_cache_salt_keeps_prefixes_apart(tiny):
    """vLLM's cache_salt (a prompt dict's key): requests share cached prefixes only with requests of the same salt;
    unsalted ones with unsalted ones; the tokens are the same either way. A salt that is not a non-empty string, or
    an unknown prompt-dict key, is refused by name."""
    m, _ = tiny
    prompt = random_prompts(m.config.vocab_size, (40,))[0]

    def run(engine, salt=None):
        p = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        out = engine.generate([p], GREEDY, use_tqdm=False)[0]
        return out["cached_tokens"], out["token_ids"]

    with Engine(m, small_config()) as engine:
        runs = [run(engine, "tenant-a"), run(engine, "tenant-a"), run(engine, "tenant-b"), run(engine),
                run(engine), run(engine, "tenant-b")]
        assert [cached for cached, _ in runs] == [0, 32, 0, 0, 32, 32]
        assert all(tokens == runs[0][1] for _, tokens in runs)
        for bad, name in (("", "cache_salt"), (5, "cache_salt"), (None, "a prompt dict holds")):
            p = {"prompt_token_ids": prompt, "cache_salt": bad} if bad is not None else {"prompt_token_ids": prompt,
                                                                                        "salt": "x"}
            with pytest.raises(ValueError, match=name):
                engine.add_request(p, GREEDY)
        assert_all_pages_free(engine)


def test_small_pool_preempts_and_outputs_still_match(tiny):
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (20, 22, 25, 27))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # 4 sequences of up to 51 tokens need 28 pages of 8; 14 pages force preemption.
    with Engine(m, small_config(num_pages=14)) as engine:
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert engine.stats()["preemptions"] > 0
        assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 24) for p in prompts]
        assert_all_pages_free(engine)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    m, _ = tiny
    prompts = random_prompts(m.config.vocab_size, (6, 11, 14))
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    with Engine(m, small_config()) as engine:
        batch = engine.generate(prompts, [seeded, GREEDY, seeded], use_tqdm=False)
        alone = engine.generate(prompts[2], seeded, use_tqdm=False)[0]
        assert alone["token_ids"] == batch[2]["token_ids"]
        top1 = SamplingParams(max_tokens=10, temperature=0.7, top_k=1, ignore_eos=True)
        assert engine.generate(prompts[1], top1, use_tqdm=False)[0]["token_ids"] == batch[1]["token_ids"]
        assert_all_pages_free(engine)


def test_an_engine_seed_makes_unseeded_sampling_repeat_run_to_run(tiny):
    """EngineConfig.seed (vLLM's --seed): two engines making the same unseeded requests in the same order sample the
    same tokens; the engine's stream moves on from request to request; a request's own seed is its own."""
    m, _ = tiny
    prompts = random_prompts(m.config.vocab_size, (6, 11, 14))
    free = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    own = SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)

    def run(seed, refused=False):
        with Engine(m, small_config(seed=seed)) as engine:
            first = [o["token_ids"] for o in engine.generate(prompts, free, use_tqdm=False)]
            if refused:  # a batch refused at its last prompt moves no seed of the requests after it
                with pytest.raises(ValueError, match="prompt must not be empty"):
                    engine.generate(prompts + [[]], free, use_tqdm=False)
            second = [o["token_ids"] for o in engine.generate(prompts, free, use_tqdm=False)]
            mine = engine.generate(prompts[0], own, use_tqdm=False)[0]["token_ids"]
            assert_all_pages_free(engine)
        return first, second, mine

    a, b = run(7), run(7, refused=True)
    assert a == b
    assert a[0] != a[1]  # later requests draw later seeds
    assert run(8)[0] != a[0]
    with Engine(m, small_config()) as engine:
        assert engine.generate(prompts[0], own, use_tqdm=False)[0]["token_ids"] == a[2]
    with pytest.raises(ValueError, match="seed must be"):
        EngineConfig(seed=-1)


def test_a_request_no_pool_could_hold_ends_at_once_and_the_next_step_hands_it_out(tiny):
    """A request whose prompt + max_tokens needs more pages than the pool has ends at add_request ("abort", saying
    why); a driver that only reads step() gets it from the next step, once, beside the others' tokens (it never
    came back from step before, a fuzzing pass found), and the engine still sleeps."""
    m, _ = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 6))
    with Engine(m, small_config(num_pages=8, page_size=8)) as engine:  # 64 tokens at most
        fits = engine.add_request(prompts[0], GREEDY)
        huge = engine.add_request(prompts[1], SamplingParams(max_tokens=100, ignore_eos=True))
        assert engine.requests[huge].finish_reason == "abort" and "pool holds" in engine.requests[huge].error
        ends = []
        while engine.has_unfinished():
            ends += [r.request_id for r in engine.step() if r.finish_reason is not None]
        assert sorted(ends) == sorted([fits, huge])
        assert engine.step() == [] and not engine.has_unfinished()
        late = engine.add_request(prompts[1], SamplingParams(max_tokens=100, ignore_eos=True))
        engine.sleep()  # an ended request is no work
        engine.wake_up()
        assert [r.request_id for r in engine.step()] == [late]
        assert_all_pages_free(engine)


def test_params_a_train_step_donated_are_named_and_copy_keeps_the_engine_s_own(tiny):
    """The engine runs update_params' arrays as they are: a train step jitted with donate_argnums then gives their
    buffers away, and generate says so naming params (XLA's error came from inside a step); copy=True keeps copies
    of the engine's own, which a donating step leaves alone."""
    m, _ = tiny
    train_step = jax.jit(lambda p: jax.tree_util.tree_map(lambda w: w * 0.99, p), donate_argnums=0)
    prompts = random_prompts(m.config.vocab_size, (6,))
    with Engine(m, small_config()) as engine:
        params = jax.tree_util.tree_map(jnp.copy, m.params)
        engine.update_params(params)
        want = engine.generate(prompts, GREEDY, use_tqdm=False)[0]["token_ids"]
        stepped = train_step(params)
        with pytest.raises(ValueError, match="^params: an array this engine runs was deleted or donated"):
            engine.generate(prompts, GREEDY, use_tqdm=False)
        fresh = jax.tree_util.tree_map(jnp.copy, m.params)
        engine.update_params(fresh, copy=True)
        train_step(fresh)
        assert all(a.is_deleted() for a in jax.tree_util.tree_leaves(fresh))  # given away, the engine's copies kept
        assert engine.generate(prompts, GREEDY, use_tqdm=False)[0]["token_ids"] == want
        assert_all_pages_free(engine)


@pytest.mark.parametrize("overlap", [False, True])
def test_update_params_while_requests_run_caches_nothing_of_the_old_weights(tiny, overlap):
    """update_params with requests running (an RL loop's weight sync mid-generation): the cached prefix a running
    request holds leaves the cache with the rest, and what running requests computed is never cached, so a later
    request sharing their prompt decodes a fresh engine's tokens on the new weights (it attached the old weights'
    keys and decoded others); after it, the new weights' pages are cached again."""
    m, _ = tiny
    prompt = random_prompts(m.config.vocab_size, (33,))[0]  # four pages of 8 and one token
    later = prompt + [5, 6]
    tuned = jax.tree_util.tree_map(lambda w: w * 1.3, m.params)
    config = small_config(overlap=overlap)
    with Engine(m, config) as engine:
        engine.generate([prompt], GREEDY, use_tqdm=False)  # the prompt's pages cached, of the old weights
        holder = engine.add_request(prompt, GREEDY)  # attaches them: locked while it runs
        engine.add_request(prompt[:25] + [7] * 12, GREEDY)  # shares three of them, its own pages computed next
        engine.step()
        engine.step()
        assert engine.requests[holder].cached_tokens == 32 and engine.has_unfinished()
        engine.update_params(tuned)
        while engine.has_unfinished():
            engine.step()
        got = engine.generate([later], GREEDY, use_tqdm=False)[0]
        again = engine.generate([later], GREEDY, use_tqdm=False)[0]
        assert_all_pages_free(engine)
    with Engine(m.with_params(tuned), config) as fresh:
        want = fresh.generate([later], GREEDY, use_tqdm=False)[0]
    assert got["cached_tokens"] == 0 and got["token_ids"] == want["token_ids"]
    assert again["cached_tokens"] == 32 and again["token_ids"] == want["token_ids"]


def test_sleep_frees_the_pool_and_wake_up_serves_as_before(tiny):
    """Engine.sleep / wake_up / update_params (vLLM's LLM.sleep, wake_up and weight updates, for a training loop
    beside a long-lived engine): asleep, the pool's (level 2: and the weights') arrays are deleted and requests are
    refused; awake, the same greedy tokens with nothing compiled again; new weights give a fresh engine's tokens
    on them; an engine with unfinished requests does not sleep."""
    m, _ = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 17))
    tuned = jax.tree_util.tree_map(lambda w: w * 1.5, m.params)
    with Engine(m, small_config()) as engine:
        before = [o["token_ids"] for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
        compiled = engine.stats()["compilations"]
        pool = jax.tree_util.tree_leaves(engine.runner.kv)
        engine.sleep()
        assert engine.sleeping == 1 and all(leaf.is_deleted() for leaf in pool)
        with pytest.raises(ValueError, match="asleep"):
            engine.add_request(prompts[0], GREEDY)
        engine.wake_up()
        assert [o["token_ids"] for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == before
        assert engine.stats()["compilations"] == compiled
        engine.sleep(level=2)
        assert engine.runner.params is None and engine.runner.kv is None
        assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(m.params))  # the caller's stay
        with pytest.raises(ValueError, match="pass them to wake_up"):
            engine.wake_up()
        engine.wake_up(tuned)
        after = [o["token_ids"] for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
        engine.update_params(m.params)
        assert [o["token_ids"] for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == before
        assert engine.stats()["compilations"] == compiled
        engine.add_request(prompts[0], GREEDY)
        with pytest.raises(ValueError, match="idle engine: 0 request\\(s\\) running and 1 waiting"):
            engine.sleep()
        with pytest.raises(ValueError, match="level must be"):
            engine.sleep(level=3)
        while engine.has_unfinished():
            engine.step()
        assert_all_pages_free(engine)
    with Engine(m.with_params(tuned), small_config()) as fresh:
        assert [o["token_ids"] for o in fresh.generate(prompts, GREEDY, use_tqdm=False)] == after
    assert after != before


def test_sleep_level_2_deletes_the_weights_the_engine_made(tiny):
    """A bf16 engine over float32 weights holds its own cast copies: sleep(level=2) deletes those, and the caller's
    float32 arrays are untouched; wake_up with them gives the engine's tokens before."""
    m, _ = tiny
    prompt = random_prompts(m.config.vocab_size, (9,))[0]
    with Engine(m, small_config(dtype="bfloat16")) as engine:
        before = engine.generate(prompt, GREEDY, use_tqdm=False)[0]["token_ids"]
        copies = jax.tree_util.tree_leaves(engine.runner.params)
        engine.sleep(level=2)
        assert all(leaf.is_deleted() for leaf in copies)
        assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(m.params))
        engine.wake_up(m.params)
        assert engine.generate(prompt, GREEDY, use_tqdm=False)[0]["token_ids"] == before
        assert_all_pages_free(engine)


def test_stop_token_ids_and_stop_strings(tiny):
    m, hf = tiny
    prompt = random_prompts(m.config.vocab_size, (9,))[0]
    ref = hf_greedy(hf, prompt, 10)
    with Engine(m, small_config()) as engine:
        out = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[ref[4]],
                                                     ignore_eos=True), use_tqdm=False)[0]
        assert out["finish_reason"] == "stop" and out["token_ids"] == ref[: ref.index(ref[4]) + 1]
        full = engine.generate(prompt, GREEDY, use_tqdm=False)[0]["text"]
        stop = full[len(full) // 2: len(full) // 2 + 2]
        if stop:
            out = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, stop=[stop],
                                                         ignore_eos=True), use_tqdm=False)[0]
            assert out["finish_reason"] == "stop" and out["text"] == full[: full.index(stop)]
        assert_all_pages_free(engine)


def test_bad_inputs_raise_clear_errors_and_engine_keeps_serving(tiny):
    m, hf = tiny
    with Engine(m, small_config()) as engine:
        with pytest.raises(ValueError, match="prompt must not be empty"):
            engine.generate([[]], GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 320\)"):
            engine.generate([[1, 2, 999]], GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="exceeds max_model_len"):
            engine.generate([[5] * 600], GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=-1)
        with pytest.raises(ValueError, match="top_p"):
            SamplingParams(top_p=1.5)
        with pytest.raises(ValueError, match="top_k"):
            SamplingParams(top_k=-2)
        # 16 stop ids fit a row's banned ids, but not with the model's EOS id added (min_tokens bans both):
        # refused by the engine when the request is made, not by the step (which would fail every row).
        stop_ids = [i for i in range(40) if i not in engine.eos_ids][:16]
        with pytest.raises(ValueError, match="stop_token_ids"):
            engine.generate([7, 8, 9], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=stop_ids),
                            use_tqdm=False)
        prompt = [7, 8, 9]
        assert engine.generate(prompt, GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(hf, prompt, 10)
        assert_all_pages_free(engine)


def test_min_tokens_keeps_eos_out_of_the_first_tokens_with_ignore_eos_too(tiny):
    # vLLM's min_tokens bans its all_stop_token_ids, which hold EOS whatever ignore_eos says: a run that ignores
    # EOS and asks for min_tokens gets no EOS among those first tokens, only after them.
    m, _ = tiny
    with Engine(m, small_config()) as engine:
        (eos,) = engine.eos_ids
        params = SamplingParams(max_tokens=8, min_tokens=5, temperature=0, ignore_eos=True, logit_bias={eos: 50.0})
        (out,) = engine.generate([[7, 8, 9]], params, use_tqdm=False)
        assert eos not in out["token_ids"][:5] and out["token_ids"][5:] == [eos] * 3
        assert out["finish_reason"] == "length"
        # The ids it bans count EOS with ignore_eos too: 16 stop ids plus EOS are refused when the request is made.
        stop_ids = [i for i in range(40) if i != eos][:16]
        with pytest.raises(ValueError, match="stop_token_ids"):
            engine.generate([7, 8, 9], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=stop_ids,
                                                      ignore_eos=True), use_tqdm=False)
        assert_all_pages_free(engine)


def test_stop_strings_on_an_engine_without_a_tokenizer_are_refused(tiny):
    # With no tokenizer there is no text to search: the stop strings would silently never match.
    m, _ = tiny
    with Engine(dataclasses.replace(m, tokenizer=None), small_config()) as engine:
        with pytest.raises(ValueError, match="^stop strings"):
            engine.make_request([7, 8, 9], SamplingParams(stop=["x"]))
        assert engine.make_request([7, 8, 9], SamplingParams(stop_token_ids=[5])).detokenizer is None


def test_a_failed_step_does_not_leave_generate_s_requests_behind(tiny, monkeypatch):
    # Whatever makes a step raise, generate() raises it and ends its own requests: the next call
    # runs on a clean engine with every page free.
    from jaxserve import engine as engine_module

    m, hf = tiny
    real = engine_module.make_batch
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected step failure")
        return real(*args, **kwargs)

    prompt = [7, 8, 9]
    with Engine(m, small_config()) as engine:
        monkeypatch.setattr(engine_module, "make_batch", failing_once)
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate([prompt, [4, 5]], GREEDY, use_tqdm=False)
        assert not engine.has_unfinished() and not engine.requests
        assert engine.generate(prompt, GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(hf, prompt, 10)
        assert_all_pages_free(engine)


def test_logit_bias_steers_its_request_and_leaves_the_others(tiny):
    m, hf = tiny
    vocab = m.config.vocab_size
    prompts = random_prompts(vocab, (7, 12))
    forced = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={"17": 100})
    banned_ref = hf_greedy(hf, prompts[1], 6)
    # Ban the plain run's first token: the biased request must take another one there.
    banned = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={banned_ref[0]: -100})
    with Engine(m, small_config()) as engine:
        out = engine.generate(prompts + [prompts[1]], [forced, GREEDY, banned], use_tqdm=False)
        assert out[0]["token_ids"] == [17] * 6
        assert out[1]["token_ids"] == hf_greedy(hf, prompts[1], 10)  # a row without a bias is unchanged
        assert out[2]["token_ids"][0] != banned_ref[0]
        with pytest.raises(ValueError, match=rf"logit_bias keys must be token ids in \[0, {vocab}\)"):
            engine.generate(prompts[0], SamplingParams(logit_bias={vocab: 1.0}), use_tqdm=False)
        assert engine.generate(prompts[1], GREEDY, use_tqdm=False)[0]["token_ids"] == out[1]["token_ids"]
        assert_all_pages_free(engine)


def test_generation_config_sampling_is_the_default_for_requests_without_their_own(tiny, tmp_path):
    """vLLM takes a checkpoint's generation_config.json sampling (Qwen2.5-Instruct: temperature 0.7,
    top_p 0.8, top_k 20, repetition_penalty 1.05) as the default of requests that set none."""
    import json

    m, hf = tiny
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"temperature": 0.0, "max_new_tokens": 6, "top_k": 20, "top_p": 0.0, "do_sample": True}, f)
    prompt = list(range(5, 14))
    with Engine(dataclasses.replace(m, path=str(tmp_path)), small_config()) as engine:
        # top_p 0 is refused by SamplingParams, so skipped; do_sample is not a sampling field.
        assert engine.sampling_defaults == {"temperature": 0.0, "max_tokens": 6, "top_k": 20}
        assert engine.default_sampling_params(max_tokens=3).max_tokens == 3
        out = engine.generate(prompt, use_tqdm=False)[0]
        explicit = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, top_k=20), use_tqdm=False)[0]
        assert out["token_ids"] == explicit["token_ids"] == hf_greedy(hf, prompt, 6)[:len(out["token_ids"])]
        assert_all_pages_free(engine)


def test_request_larger_than_pool_aborts_with_reason(tiny):
    m, hf = tiny
    with Engine(m, small_config(num_pages=4)) as engine:
        out = engine.generate([[5] * 20], SamplingParams(max_tokens=40), use_tqdm=False)[0]
        assert out["finish_reason"] == "abort" and "KV pages" in out["error"]
        # 20 + 13 tokens, but the last sampled token is never fed back: 32 tokens of K/V, 4 pages.
        prompt = random_prompts(m.config.vocab_size, (20,))[0]
        out = engine.generate([prompt], SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True),
                              use_tqdm=False)[0]
        assert out["finish_reason"] == "length" and out["token_ids"] == hf_greedy(hf, prompt, 13)
        assert_all_pages_free(engine)


def test_generation_config_eos_ids_end_requests_too(tiny, tmp_path):
    """Qwen2.5-Instruct's config.json names one EOS id (<|im_end|>) and its generation_config.json two
    (<|endoftext|> too); transformers and vLLM stop at either, so the engine must as well. vLLM names the one that
    is not the tokenizer's EOS as stop_reason (it joins the stop ids), and the tokenizer's not."""
    import json

    m, hf = tiny
    prompt = list(range(5, 14))
    ref = hf_greedy(hf, prompt, 10)
    extra = ref[3]
    assert not set(ref[:4]) & set(m.config.eos_token_ids)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [*m.config.eos_token_ids, extra]}, f)
    with Engine(dataclasses.replace(m, path=str(tmp_path)), small_config()) as engine:
        assert extra in engine.eos_ids
        out = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)[0]
        assert out["finish_reason"] == "stop" and out["token_ids"] == ref[: ref.index(extra) + 1]
        assert out["stop_reason"] == extra
        (eos,) = m.config.eos_token_ids
        assert m.tokenizer.eos_token_id == eos
        out = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, logit_bias={eos: 100.0},
                                                     stop_token_ids=[eos]), use_tqdm=False)[0]
        assert (out["token_ids"], out["finish_reason"], out["stop_reason"]) == ([eos], "stop", None)
        out = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                              use_tqdm=False)[0]
        assert out["finish_reason"] == "length" and out["token_ids"] == ref
        assert_all_pages_free(engine)
    # A model built in memory (path "") reads no generation_config.json, not even the working directory's.
    from jaxserve.loading import generation_eos_ids

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert generation_eos_ids("") == ()
    finally:
        os.chdir(cwd)


def test_abort_frees_pages(tiny):
    m, _ = tiny
    with Engine(m, small_config()) as engine:
        rid = engine.add_request([4, 5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        engine.step()
        assert engine.stats()["pages_used"] > 0
        assert engine.abort(rid)
        assert engine.release(rid).finish_reason == "abort"
        assert_all_pages_free(engine)


def test_decode_step_donates_the_kv_pool(tiny):
    m, _ = tiny
    with Engine(m, small_config()) as engine:
        engine.add_request([4, 5, 6], SamplingParams(max_tokens=20, ignore_eos=True))
        engine.step()  # prefill
        before = engine.runner.kv[0][0]
        engine.step()  # decode
        assert before.is_deleted(), "the decode step must reuse (donate) the KV pages, not copy them"
        engine.close()


@pytest.mark.parametrize("batch", [1, 4])
def test_compiled_decode_loop_never_copies_the_kv_pages(tiny, batch):
    """Donation alone does not prove it: XLA may still copy a carried buffer inside the loop.

    (At batch 1 the reference scatter once became a dynamic-update-slice that XLA copied, the
    whole pool per layer and step.) The same check on the GPU's compiled HLO, with the Pallas
    kernels, is in bench/results/decode_step.md.
    """
    import re

    import jax.numpy as jnp

    from jaxserve.runner import Runner
    from jaxserve.sampling import make_batch

    m, _ = tiny
    runner = Runner(m.config, m.params, num_pages=64, page_size=8, attention_impl="reference")
    pool_shape = ",".join(map(str, runner.kv[0][0].shape))
    table = np.arange(batch * 4, dtype=np.int32).reshape(batch, 4)
    pos = np.full(batch, 5, np.int32)
    zeros = jnp.zeros((1, 1), jnp.int32)
    hlo = runner.compiled.decode.lower(runner.params, runner.kv, jnp.zeros(batch, jnp.int32), jnp.asarray(pos),
                               jnp.asarray(pos + 4), jnp.asarray(table), make_batch([GREEDY] * batch, batch),
                               jnp.zeros(batch, jnp.int32), zeros, zeros, num_steps=4, num_top=0,
                               penalties=False, greedy=True).compile().as_text()
    # The multi-step loop is there (unless JAXSERVE_DECODE_UNROLL unrolls it whole), so the check below
    # looks inside it.
    from jaxserve import runner as runner_module

    assert "while" in hlo or runner_module.DECODE_UNROLL >= 4
    copies = re.findall(r"= \w+\[%s\]\{[\d,]+\} copy\(" % pool_shape, hlo)
    assert not copies, f"{len(copies)} copies of a KV page array [{pool_shape}] in the compiled decode step"


def test_engine_config_validates_and_round_trips():
    cfg = EngineConfig(page_size=16, max_running=8, policy="mixed", num_pages=100)
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    assert EngineConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ValueError, match="policy must be one of"):
        EngineConfig(policy="fastest")
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        EngineConfig(page_size=12)
    # Typos, not choices: a page of 2**20 tokens (a prefill asked for 36 GB), 100,000 steps a decode call.
    with pytest.raises(ValueError, match="page_size must be a power of two up to"):
        EngineConfig(page_size=2**20)
    with pytest.raises(ValueError, match="decode_steps must be at most"):
        EngineConfig(decode_steps=100_000)
    with pytest.raises(ValueError, match="compile_cache_dir"):
        EngineConfig(compile_cache_dir="")
    cached = EngineConfig(compile_cache_dir="/tmp/xla-cache")
    assert EngineConfig.from_yaml(cached.to_yaml()) == cached
    with pytest.raises(ValueError, match="memory_fraction"):
        EngineConfig(memory_fraction=2.0)
    # Wrong types name their field rather than failing inside a comparison (or, for "false", reading as on).
    for field, value in (("memory_fraction", "0.5"), ("kv_cache_dtype", []), ("batch_buckets", 5),
                         ("batch_buckets", "16"), ("prefill_buckets", (16.5, 32)), ("prefix_caching", "false"),
                         ("overlap", None), ("policy", ["mixed"])):
        with pytest.raises(ValueError, match=field):
            EngineConfig(**{field: value})
    assert EngineConfig(batch_buckets=[np.int64(64)], memory_fraction=np.float32(0.5)).batch_buckets == (64,)
    # "auto" (the default) computes in bfloat16 on an accelerator, float32 on the CPU.
    assert cfg.dtype == "auto" and cfg.compute_dtype() == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    assert EngineConfig(dtype="bfloat16").compute_dtype() == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig(dtype="float16")
    with pytest.raises(ValueError, match="unknown EngineConfig field"):
        EngineConfig.from_dict({"pages": 3})
    # A dict's or YAML's wrong types name their field as the constructor does; a document that is no mapping is refused.
    for source, field in ((lambda: EngineConfig.from_dict({"batch_buckets": 64}), "batch_buckets"),
                          (lambda: EngineConfig.from_yaml("prefill_buckets: 2048"), "prefill_buckets"),
                          (lambda: EngineConfig.from_yaml("memory_fraction: 5e-1"), "memory_fraction"),
                          (lambda: EngineConfig.from_yaml("5"), "mapping of its fields")):
        with pytest.raises(ValueError, match=field):
            source()
    assert EngineConfig.from_yaml("batch_buckets: [4, 8]\nmax_running: 8").batch_buckets == (4, 8)
    assert EngineConfig(num_pages=np.int64(5), max_running=np.int32(4)) == EngineConfig(num_pages=5, max_running=4)


def test_step_hands_back_each_finished_request_once_and_a_reused_id_gets_its_own(tiny):
    """Overlapped decode calls chain over rows that finished in the call before: step() hands a finished request
    back once (again, an AsyncEngine consumer who reused the id got the old request's end)."""
    m, _ = tiny
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with Engine(m, small_config()) as engine:
        # A stop id the host cannot foresee (a length it can: such rows leave the chain): a token of a prompt's
        # greedy output, from its 2nd on (a decode call's), not seen before it; fresh prompts until one has one.
        for _ in range(20):
            prompts = random_prompts(m.config.vocab_size, (9, 12, 7, 10))
            outs = [o["token_ids"] for o in engine.generate(prompts, greedy, use_tqdm=False)]
            found = [(i, t) for i, out in enumerate(outs) for k, t in enumerate(out) if k >= 1 and t not in out[:k]]
            if found:
                break
        row, stop = found[0]
        prompts.insert(0, prompts.pop(row))
        ragged = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[stop])] + [
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 9, 30)]
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, ragged)]
        handed: dict[int, int] = {}
        reused = None
        while engine.has_unfinished():
            for r in engine.step():
                if r.finish_reason is not None:
                    handed[id(r)] = handed.get(id(r), 0) + 1
                    if r.request_id == ids[0] and reused is None:  # free the id and use it again at once
                        engine.release(r.request_id)
                        reused = engine.add_request(prompts[2], SamplingParams(max_tokens=4, temperature=0.0),
                                                    request_id=ids[0])
        assert engine.chained_calls > 0 and sorted(handed.values()) == [1] * 5
        assert engine.requests[ids[0]].prompt_ids == prompts[2] and len(engine.requests[ids[0]].output_ids) == 4
        assert_all_pages_free(engine)


def test_warmup_compiles_every_shape_the_scheduler_uses(tiny):
    m, _ = tiny
    cfg = small_config(batch_buckets=(1, 2, 4), prefill_buckets=(16, 32, 64), max_tokens_per_step=64)
    with Engine(m, cfg) as engine:
        assert engine.warmup(sampling=False) > 0
        compiled = engine.stats()["compilations"]
        assert engine.stats()["pages_used"] == 0
        prompts = random_prompts(m.config.vocab_size, (3, 20, 50, 64, 9, 33))
        engine.generate(prompts, GREEDY, use_tqdm=False)
        assert engine.stats()["compilations"] == compiled
        # Rows ending at their own lengths drop out of chained calls, which gather the others' tokens: warmed too.
        from jaxserve import engine as engine_module

        gathers = engine_module._gather_rows._cache_size()
        ragged = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 7, 11, 15)]
        engine.generate(prompts[:4], ragged, use_tqdm=False)
        assert engine.stats()["overlapped_decode_calls_dropping_rows"] > 0
        assert engine_module._gather_rows._cache_size() == gathers and engine.stats()["compilations"] == compiled
        assert_all_pages_free(engine)


def test_warmup_compiles_on_threads_and_requests_then_run_from_the_cache(tiny):
    import logging
    import threading

    import jax.monitoring

    m, hf = tiny
    # Prefill buckets no other test here compiles (the steps are shared within the process): some shapes are new.
    cfg = small_config(max_running=3, batch_buckets=(1, 3), prefill_buckets=(24, 48), max_tokens_per_step=48)
    compiled_on: list[str] = []  # the thread of every XLA compile
    lowered: list[str] = []  # the steps traced and lowered: a call JAX's cache did not answer

    def on_event(name: str, _secs: float, **_kw) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            compiled_on.append(threading.current_thread().name)

    class Lowerings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(("Compiling jit(_decode_impl)", "Compiling jit(_prefill_impl)")):
                lowered.append(message[:30])

    handler = Lowerings()
    logging.getLogger("jax").addHandler(handler)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        with jax.log_compiles(True), Engine(m, cfg) as engine:
            shapes = engine.warmup(sampling=False, compile_threads=2)
            ahead = [name for name in compiled_on if name.startswith("jaxserve-compile")]
            # Each shape new to the process lowered once (the second pass found them all), compiled on the threads.
            assert shapes == len(engine.runner.compiled_shapes) and len(lowered) == len(ahead) >= 4
            lowered.clear()
            prompts = random_prompts(m.config.vocab_size, (3, 30, 47))
            outs = engine.generate(prompts, GREEDY, use_tqdm=False)
            assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 10) for p in prompts]
            assert lowered == [] and engine.stats()["compilations"] == shapes
            with pytest.raises(ValueError, match="compile_threads"):
                engine.warmup(compile_threads=0)
            assert_all_pages_free(engine)
    finally:
        logging.getLogger("jax").removeHandler(handler)
        jax.monitoring.unregister_event_duration_listener(on_event)


@pytest.mark.parametrize("policy", ["prefill_first", "mixed"])
def test_long_prompts_are_prefilled_in_chunks_with_the_same_tokens(tiny, policy):
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (250, 97, 7))  # > max_tokens_per_step (64): 4 and 2 chunks
    # The default pool (96 pages, the 50 these need): the steps and pool ops the tests above compiled for it.
    with Engine(m, small_config(policy=policy)) as engine:
        outs = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 10) for p in prompts]
        assert engine.stats()["prefill_tokens"] == sum(map(len, prompts))
        # The tiny model's 512 positions at page 8 are 64-page tables; decode calls whose rows fit
        # in 256 keys (the kernels' single-pass width) get 32 pages, and the first prompt's decode
        # crosses that.
        assert engine.decode_table_widths == (32, 64)
        widths = {shape[2][1] for shape in engine.runner.compiled_shapes if shape[0] == "decode"}
        assert widths == {32, 64}
        assert_all_pages_free(engine)


def test_identical_prompts_together_and_single_token_requests(tiny):
    m, hf = tiny
    prompt = random_prompts(m.config.vocab_size, (37,))[0]
    with Engine(m, small_config()) as engine:
        outs = engine.generate([prompt] * 3, GREEDY, use_tqdm=False)
        assert all(o["token_ids"] == hf_greedy(hf, prompt, 10) for o in outs)
        one = engine.generate([prompt, prompt[:5]], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        assert [o["token_ids"] for o in one] == [hf_greedy(hf, prompt, 1), hf_greedy(hf, prompt[:5], 1)]
        assert all(o["finish_reason"] in ("length", "stop") for o in one)
        assert one[0]["cached_tokens"] == 32  # the full pages of the earlier identical prompts
        assert_all_pages_free(engine)


def test_overlapped_decode_gives_the_same_tokens_as_synchronous(tiny):
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 13, 21))
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=30, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
    results = {}
    for overlap in (True, False):
        with Engine(m, small_config(overlap=overlap, decode_steps=3)) as engine:
            results[overlap] = engine.generate(prompts, [greedy, seeded, greedy], use_tqdm=False)
            assert (engine.stats()["overlapped_decode_calls"] > 0) == overlap
            assert_all_pages_free(engine)
    assert [o["token_ids"] for o in results[True]] == [o["token_ids"] for o in results[False]]
    assert results[True][0]["token_ids"] == hf_greedy(hf, prompts[0], 30)


def test_chained_decode_calls_go_on_past_rows_that_finish(tiny):
    # Rows that end at their own lengths (a stop id the engine cannot foresee, different max_tokens) drop out of
    # the chained calls, whose other rows continue from their tokens on the device (gathered), instead of ending
    # the chain, while they fill the same batch bucket (8 rows here, then 4): the tokens are Hugging Face's and
    # the synchronous engine's, a seeded row's too.
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 9, 13, 7, 11, 6, 8, 10))
    ref = hf_greedy(hf, prompts[0], 30)
    at = ref.index(ref[9])  # where the stop id first comes (the random model repeats itself: maybe earlier)
    lengths = (9, 12, 15, 17, 20, 26)
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[ref[at]])]
    params += [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    params += [SamplingParams(max_tokens=21, temperature=0.9, top_k=20, seed=11, ignore_eos=True)]
    results = {}
    for overlap in (True, False):
        with Engine(m, small_config(overlap=overlap, decode_steps=3, max_running=8, batch_buckets=(4, 8),
                                    num_pages=160)) as e:
            results[overlap] = e.generate(prompts, params, use_tqdm=False)
            assert (e.stats()["overlapped_decode_calls_dropping_rows"] > 0) == overlap, e.stats()
            assert_all_pages_free(e)
    assert [o["token_ids"] for o in results[True]] == [o["token_ids"] for o in results[False]]
    outs = results[True]
    assert outs[0]["token_ids"] == ref[: at + 1] and outs[0]["finish_reason"] == "stop"
    for p, o, n in zip(prompts[1:7], outs[1:7], lengths):
        assert o["token_ids"] == hf_greedy(hf, p, n) and o["finish_reason"] == "length"


def test_prompts_arriving_mid_decode_are_prefilled_behind_the_decode_in_flight(tiny):
    # prefill_first with overlap: a prompt that arrives while a decode call runs is prefilled by a call dispatched
    # behind it, before the host reads it (`Engine._prefill_behind`); every request gets Hugging Face's tokens.
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (6, 11, 9, 14))
    with Engine(m, small_config(decode_steps=2)) as engine:
        ids = [engine.add_request(p, GREEDY) for p in prompts[:2]]
        for _ in range(3):
            engine.step()
        ids += [engine.add_request(p, GREEDY) for p in prompts[2:]]
        while engine.has_unfinished():
            engine.step()
        assert engine.stats()["prefill_calls_behind_decode"] > 0
        for rid, p in zip(ids, prompts):
            assert engine.requests[rid].output_ids == hf_greedy(hf, p, 10)
        assert_all_pages_free(engine)


@pytest.mark.parametrize("policy", ["prefill_first", "time_share", "mixed"])
def test_overlapped_prefill_gives_the_same_tokens_as_synchronous(tiny, policy):
    """Prefill calls dispatched before the previous one's first tokens are read (overlap on)
    against each read at once (off): prompts over
    several steps, a prompt in chunks, prefixes shared across steps (indexed at dispatch, so
    the hits are the same), a request that its first token stops, and one of a single token."""
    m, hf = tiny
    shared = random_prompts(m.config.vocab_size, (24,))[0]
    tails = random_prompts(m.config.vocab_size, (3, 9, 14, 6, 11, 70))
    prompts = [shared + t for t in tails[:3]] + tails[3:5] + [shared + tails[5]]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=6, temperature=0.9, top_k=20, seed=3, ignore_eos=True)
    first = hf_greedy(hf, prompts[3], 1)[0]
    stop_first = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[first])
    one_token = SamplingParams(max_tokens=1, temperature=0.0)
    params = [greedy, seeded, greedy, stop_first, one_token, greedy]
    results, stats = {}, {}
    for overlap in (True, False):
        cfg = small_config(overlap=overlap, policy=policy, max_tokens_per_step=32, prefix_caching=True)
        with Engine(m, cfg) as engine:
            results[overlap] = engine.generate(prompts, params, use_tqdm=False)
            stats[overlap] = engine.stats()
            assert_all_pages_free(engine)
    keys = ("token_ids", "finish_reason", "cached_tokens")
    assert [[o[k] for k in keys] for o in results[True]] == [[o[k] for k in keys] for o in results[False]]
    # mixed puts decodes in every step once a row decodes, so its prefills rarely follow each other.
    assert stats[True]["overlapped_prefill_calls"] > 0 or policy == "mixed"
    assert stats[False]["overlapped_prefill_calls"] == 0
    assert results[True][3]["token_ids"] == [first] and results[True][3]["finish_reason"] == "stop"
    assert results[True][0]["token_ids"] == hf_greedy(hf, prompts[0], 6)
    assert sum(o["cached_tokens"] for o in results[True]) > 0


def test_decode_following_a_prefill_gives_the_same_tokens_as_synchronous(tiny):
    """With overlap, the first decode call after the last prefill starts from that prefill's
    first tokens on the device (Engine._can_follow_prefill), before the host reads them: the
    same tokens as reading them first, including a row its first token stops (it decodes for
    nothing, then its pages are free) and sampled rows (their step counts include the pending
    first token). Penalties, greedy rows' too, need the first tokens on the host, so they never
    follow a prefill."""
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (9, 30, 17, 40))
    first = hf_greedy(hf, prompts[3], 1)[0]
    greedy = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=9, temperature=0.9, top_k=20, seed=5, ignore_eos=True)
    stop_first = SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=[first])
    penalized = SamplingParams(max_tokens=9, temperature=0.9, seed=2, repetition_penalty=1.3, ignore_eos=True)
    greedy_penalized = SamplingParams(max_tokens=9, temperature=0.0, presence_penalty=1.5, ignore_eos=True)
    cases = {"plain": [greedy, seeded, greedy, stop_first], "penalties": [greedy, penalized, greedy, greedy],
             "greedy penalties": [greedy, greedy, greedy, greedy_penalized]}
    for name, params in cases.items():
        results, follows = {}, {}
        for overlap in (True, False):
            # 32 tokens a step: the four prompts take three prefill calls, the last one holding the
            # longest prompt's final chunk.
            with Engine(m, small_config(overlap=overlap, max_tokens_per_step=32, decode_steps=3)) as engine:
                results[overlap] = engine.generate(prompts, params, use_tqdm=False)
                follows[overlap] = engine.stats()["decode_calls_after_prefill"]
                assert_all_pages_free(engine)
        keys = ("token_ids", "finish_reason")
        assert [[o[k] for k in keys] for o in results[True]] == [[o[k] for k in keys] for o in results[False]], name
        assert follows[False] == 0
        assert follows[True] == (1 if name == "plain" else 0), name
    assert results[True][0]["token_ids"] == hf_greedy(hf, prompts[0], 9)


def test_sampling_batch_is_built_once_per_set_of_rows(tiny, monkeypatch):
    """Decode calls over the same rows reuse the stacked sampling parameters; a new set of
    rows (prefill, or a row finishing) builds them again. Outputs stay reproducible."""
    m, _ = tiny
    import jaxserve.engine as engine_module

    calls = []
    real = engine_module.make_batch
    monkeypatch.setattr(engine_module, "make_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    prompts = random_prompts(m.config.vocab_size, (5, 9, 7))
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    with Engine(m, small_config(decode_steps=2, overlap=False)) as engine:
        outs = engine.generate(prompts, params, use_tqdm=False)
        again = engine.generate(prompts, params, use_tqdm=False)
        assert_all_pages_free(engine)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in again]
    # 3 rows x 11 decoded tokens at 2 steps a call: >= 6 decode calls per generate; the
    # parameters are stacked once for the prefill and once for the decoding rows.
    assert len(calls) <= 2 * 2, f"make_batch ran {len(calls)} times"


def test_wide_decode_batches_compile_with_their_own_options(tiny):
    # Batches past the skinny matmul's rows project through XLA GEMMs, compiled with
    # runner.WIDE_DECODE_OPTIONS; narrower ones keep the default compile.
    from jaxserve import model as model_mod
    from jaxserve import runner as runner_mod

    m, _ = tiny
    rows = model_mod.SKINNY_ROWS
    with Engine(m, small_config()) as engine:
        r = engine.runner
        assert r.decode_fn(rows) is r.compiled.decode and r.decode_fn(rows + 1) is r.compiled.decode_wide
        assert r.compiled.decode_wide is not r.compiled.decode
        # A runner keeps the row limit it was built (and traced) under: bench/decode_step.py
        # builds runners under several values of the global in one process.
        saved = model_mod.SKINNY_ROWS
        try:
            model_mod.SKINNY_ROWS = 4 * rows
            assert r.decode_fn(rows + 1) is r.compiled.decode_wide
        finally:
            model_mod.SKINNY_ROWS = saved
    # Steps whose gate_up runs as XLA's GEMM (model.XLA_GATE_UP_ROWS, set when the runner is
    # built) take the wide compile too, whose options give that GEMM to cuBLAS.
    saved = model_mod.XLA_GATE_UP_ROWS
    try:
        model_mod.XLA_GATE_UP_ROWS = 2
        with Engine(m, small_config()) as engine:
            r = engine.runner
            assert r.decode_fn(2) is r.compiled.decode and r.decode_fn(3) is r.compiled.decode_wide
    finally:
        model_mod.XLA_GATE_UP_ROWS = saved
    if "JAXSERVE_WIDE_DECODE_OPTIONS" not in os.environ:
        assert runner_mod.WIDE_DECODE_OPTIONS == {"xla_gpu_enable_triton_gemm": False}


@pytest.mark.parametrize("policy,overlap", [("prefill_first", True), ("time_share", False), ("mixed", True)])
def test_random_workload_never_loses_a_request(tiny, policy, overlap):
    # Requests arrive between steps with mixed parameters (greedy, seeded sampling with
    # penalties, stop ids), share prompt prefixes, get aborted mid-flight, and overflow a small
    # pool (preemption): every one must finish with a valid reason, greedy outputs must equal
    # transformers', seeded ones must equal the same requests run together in a fresh engine,
    # and no page may stay allocated.
    m, hf = tiny
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    vocab = m.config.vocab_size
    prefixes = [rng.integers(3, vocab, size=n).tolist() for n in (9, 17)]

    def new_request():
        prompt = prefixes[rng.integers(2)][: rng.integers(4, 18)] + rng.integers(3, vocab, size=rng.integers(1, 12)).tolist()
        kind = rng.choice(["greedy", "sampled", "stop"])
        n = int(rng.integers(1, 13))
        if kind == "greedy":
            return prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        if kind == "sampled":
            return prompt, SamplingParams(max_tokens=n, temperature=0.8, top_k=int(rng.choice([-1, 5, 40])), top_p=0.9,
                                          repetition_penalty=1.1, seed=int(rng.integers(1 << 20)), ignore_eos=True)
        return prompt, SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=tuple(rng.integers(3, vocab, 40)))

    cfg = small_config(num_pages=9, policy=policy, overlap=overlap, prefix_caching=True)
    with Engine(m, cfg) as engine:
        added, aborted = drive_random_workload(engine, rng, new_request, requests=24, arrival_rate=1.0,
                                               abort_rate=0.05, seed=seed)
        results = {rid: engine.release(rid) for rid in added}
        assert engine.stats()["prefix_hit_rate"] > 0, f"no prefix was shared, seed={seed}"
        assert_all_pages_free(engine)

    seeded = [rid for rid, (_, p) in added.items() if p.seed is not None and rid not in aborted]
    for rid, (prompt, params) in added.items():
        r = results[rid]
        assert r.finish_reason in ("stop", "length", "abort"), f"{rid}: {r.finish_reason}, seed={seed}"
        if rid in aborted:
            assert r.finish_reason == "abort", f"seed={seed}"
            continue
        assert r.finish_reason != "abort", f"{rid} aborted without being asked: {r.error}, seed={seed}"
        if r.finish_reason == "length":
            assert len(r.output_ids) == params.max_tokens, f"seed={seed}"
        if params.temperature == 0.0:
            ref = hf_greedy(hf, prompt, params.max_tokens)
            if params.stop_token_ids:  # the reference up to and including the first stop id
                cut = next((i for i, t in enumerate(ref) if t in params.stop_token_ids), len(ref) - 1)
                ref = ref[: cut + 1]
            assert r.output_ids == ref, f"{rid} greedy output differs, seed={seed}"
    if seeded:
        with Engine(m, small_config()) as fresh:
            again = fresh.generate([added[rid][0] for rid in seeded], [added[rid][1] for rid in seeded],
                                   use_tqdm=False)
            assert_all_pages_free(fresh)
        for rid, out in zip(seeded, again):
            assert out["token_ids"] == results[rid].output_ids, f"{rid} seeded output differs, seed={seed}"


_RESTART = """
import sys, jax, jaxserve
from jaxserve import Engine, EngineConfig, SamplingParams
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
cfg = EngineConfig(num_pages=32, page_size=8, max_running=1, max_tokens_per_step=16, decode_steps=1,
                   batch_buckets=(1,), prefill_buckets=(16,), compile_cache_dir=sys.argv[2])
with Engine(sys.argv[1], cfg) as engine:
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                          use_tqdm=False)
print("TOKENS", out[0]["token_ids"], "HITS", len(hits))
"""


def test_compile_cache_dir_lets_a_restarted_engine_load_its_steps(tiny_checkpoint, tmp_path):
    """Two processes with the same compile_cache_dir: the first fills it, the second compiles
    nothing new (cache hits, no new entries) and gives the same tokens."""
    import subprocess
    import sys

    path, _ = tiny_checkpoint
    cache = tmp_path / "xla"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", _RESTART, path, str(cache)], capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    first = run()
    entries = sorted(os.listdir(cache))
    assert entries, "nothing was written to the compile cache"
    second = run()
    assert second.split(" HITS")[0] == first.split(" HITS")[0]
    assert int(second.split("HITS ")[1]) > 0, second
    assert sorted(os.listdir(cache)) == entries, "the restart compiled new entries"


def test_bf16_engine_at_32_rows_adds_into_a_float32_stream(tiny_checkpoint, monkeypatch):
    # A bf16 engine whose decode steps hold 32 rows runs the Mosaic GPU projections (the CPU runs
    # them in its interpreter) and so ACCUMULATE's glue: every request completes, every page comes
    # back, and its greedy tokens are the partial-sums glue's up to near-ties: bf16 rounds the two
    # glues differently, so where a row's tokens part, each run must rank the other's token among its
    # top five within a hair of its own (a random tiny model's logits are flat: ties are common).
    from jaxserve import model as model_module
    from tests.test_skinny_matmul_mgpu import _count_mgpu_calls

    m = jaxserve.load(tiny_checkpoint[0], dtype="bfloat16")
    epilogues = _count_mgpu_calls(monkeypatch, lambda a, k: k["epilogue"])
    prompts = random_prompts(m.config.vocab_size, np.random.default_rng().integers(2, 20, 32))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=5)
    cfg = small_config(num_pages=256, max_running=32, max_tokens_per_step=512, decode_steps=2, batch_buckets=(32,),
                       prefill_buckets=(64, 512), dtype="bfloat16", attention_impl="pallas")
    runs = {}
    for accumulate in (True, False):
        monkeypatch.setattr(model_module, "ACCUMULATE", accumulate)
        epilogues.clear()
        with Engine(m, cfg) as engine:
            runs[accumulate] = engine.generate(prompts, params, use_tqdm=False)
            assert all(o["finish_reason"] == "length" and len(o["token_ids"]) == 4 for o in runs[accumulate])
            assert_all_pages_free(engine)
        assert ("accumulate" in epilogues) == accumulate and "swiglu" in epilogues, epilogues
    for a, b in zip(runs[True], runs[False]):
        parted = [j for j, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y]
        if parted:  # the same context up to step j: a near-tie there
            j = parted[0]
            x, y = a["token_ids"][j], b["token_ids"][j]
            for top in (a["top_logprobs"][j], b["top_logprobs"][j]):
                assert {x, y} <= set(top) and abs(top[x] - top[y]) < 0.1, (j, x, y, top)


def test_bf16_tied_engine_takes_greedy_tokens_from_the_lm_head(tmp_path, monkeypatch):
    # model.GREEDY_HEAD: greedy steps that want no log-probabilities take their tokens from the LM
    # head's argmax kernel (no logits). Every request completes, every page comes back, and the tokens
    # are the logits path's up to near-ties (bf16 rounds the two differently), which the logits run's
    # top-5 log-probabilities show.
    import importlib

    from jaxserve import model as model_module
    from tests.conftest import make_hf_checkpoint

    make_hf_checkpoint(str(tmp_path), vocab_size=320, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, hidden_size=64, tie_word_embeddings=True)
    m = jaxserve.load(str(tmp_path), dtype="bfloat16")
    mg = importlib.import_module("jaxserve_kernels.skinny_matmul_mgpu")
    heads = []
    monkeypatch.setattr(mg, "argmax_matmul_mgpu",
                        lambda *a, _f=mg.argmax_matmul_mgpu, **k: heads.append(1) or _f(*a, **k))
    prompts = random_prompts(m.config.vocab_size, np.random.default_rng().integers(2, 20, 16))
    cfg = small_config(num_pages=128, max_running=16, max_tokens_per_step=512, decode_steps=2, batch_buckets=(16,),
                       prefill_buckets=(64, 512), dtype="bfloat16", attention_impl="pallas")
    runs = {}
    monkeypatch.setattr(model_module, "GREEDY_HEAD_MIN_ROWS", 16)  # the default's 64 rows, at 16 here
    for head, logprobs in ((True, None), (False, 5)):
        monkeypatch.setattr(model_module, "GREEDY_HEAD", head)
        heads.clear()
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=logprobs)
        with Engine(m, cfg) as engine:
            runs[head] = engine.generate(prompts, params, use_tqdm=False)
            assert all(o["finish_reason"] == "length" and len(o["token_ids"]) == 4 for o in runs[head])
            assert_all_pages_free(engine)
        assert bool(heads) == head
    for a, b in zip(runs[True], runs[False]):
        parted = [j for j, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y]
        if parted:  # the same context up to step j: a near-tie there
            j = parted[0]
            x, y = a["token_ids"][j], b["token_ids"][j]
            top = b["top_logprobs"][j]
            assert x in top and abs(top[x] - top[y]) < 0.1, (j, x, y, top)

    # The CPU's default impl, "reference", runs no kernel at all: its greedy steps take XLA's argmax (the head's
    # kernel interpreted cost ~100x: 64 rows, 420 against 4 ms a step before session 55's fix). Every step it
    # traced is searched for a Pallas call, which both kernels' jaxprs show.
    monkeypatch.setattr(model_module, "GREEDY_HEAD", True)
    probe = jnp.zeros((16, m.config.hidden_size), jnp.bfloat16)
    assert "pallas_call[" in str(jax.make_jaxpr(mg.argmax_matmul_mgpu)(probe, probe[:8]))
    heads.clear()
    with Engine(m, dataclasses.replace(cfg, attention_impl="reference")) as engine:
        steps, traced = engine.runner.compiled, []

        def tracing(f):
            return lambda *a, **k: traced.append(str(f.trace(*a, **k).jaxpr)) or f(*a, **k)

        monkeypatch.setattr(steps, "decode_fn", lambda rows, _f=steps.decode_fn: tracing(_f(rows)))
        monkeypatch.setattr(steps, "prefill", tracing(steps.prefill))
        outs = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
        assert all(o["finish_reason"] == "length" and len(o["token_ids"]) == 4 for o in outs)
        assert_all_pages_free(engine)
    assert not heads and traced and not any("pallas_call[" in t for t in traced)


def test_engines_alike_share_their_compiled_steps_and_a_changed_knob_does_not(tiny, monkeypatch):
    # A second engine (or jaxserve.generate call) in one process reuses the steps the first traced
    # and compiled; one built under another value of a module knob the trace reads, or with a
    # function swapped in, gets steps of its own.
    from jaxserve import model as model_module

    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 21))
    with Engine(m, small_config()) as first:
        outs = first.generate(prompts, GREEDY, use_tqdm=False)
        steps = first.runner.compiled
        compiled = steps.decode._cache_size() + steps.prefill._cache_size()
    with Engine(m, small_config()) as second:
        assert second.runner.compiled is steps  # (a pool of another size too, but its shapes compile anew)
        again = second.generate(prompts, GREEDY, use_tqdm=False)
        assert [o["token_ids"] for o in again] == [o["token_ids"] for o in outs]
        assert_all_pages_free(second)
    assert steps.decode._cache_size() + steps.prefill._cache_size() == compiled  # nothing traced again
    assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 10) for p in prompts]

    monkeypatch.setattr(model_module, "MGPU_MAX_ROWS", model_module.MGPU_MAX_ROWS + 1)
    with Engine(m, small_config()) as third:
        assert third.runner.compiled is not steps
    seen = [steps]
    for _ in range(2):  # CPython may give the second function the first one's freed id
        monkeypatch.setattr(model_module, "_a_test_hook", lambda: None, raising=False)
        with Engine(m, small_config()) as engine:
            assert all(engine.runner.compiled is not s for s in seen)
            seen.append(engine.runner.compiled)


def test_truncate_prompt_tokens_keeps_the_prompts_end(tiny):
    """vLLM's truncate_prompt_tokens: the last k prompt tokens, as if sent alone; a prompt past the model's length
    is served instead of refused."""
    m, hf = tiny
    [prompt] = random_prompts(m.config.vocab_size, (30,))
    cut = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, truncate_prompt_tokens=8)
    with Engine(m, small_config(max_model_len=64)) as engine:
        out = engine.generate([prompt], cut, use_tqdm=False)[0]
        assert out["prompt_tokens"] == 8 and out["token_ids"] == hf_greedy(hf, prompt[-8:], 10)
        long = engine.generate([prompt * 3], cut, use_tqdm=False)[0]  # 90 tokens > max_model_len 64
        assert long["prompt_tokens"] == 8 and long["token_ids"] == out["token_ids"]
        with pytest.raises(ValueError, match="exceeds max_model_len"):
            engine.generate([prompt * 3], GREEDY, use_tqdm=False)
        # vLLM's -1, the model's length: here the prompt's end that leaves room for max_tokens (54 of 64 for 10)
        longest = engine.generate([prompt * 3], dataclasses.replace(cut, truncate_prompt_tokens=-1),
                                  use_tqdm=False)[0]
        assert longest["prompt_tokens"] == 54 and longest["token_ids"] == hf_greedy(hf, (prompt * 3)[-54:], 10)
        whole = engine.embed([prompt * 3], PoolingParams(truncate_prompt_tokens=-1), use_tqdm=False)[0]
        end = engine.embed([(prompt * 3)[-63:]], use_tqdm=False)[0]
        assert whole["prompt_tokens"] == 63
        np.testing.assert_allclose(whole["embedding"], end["embedding"], rtol=1e-5, atol=1e-6)
        assert_all_pages_free(engine)


def test_max_tokens_none_runs_to_the_model_s_length(tiny):
    """vLLM's max_tokens=None: as many tokens as max_model_len leaves after the prompt (the greedy tokens of a
    request asking for exactly that many), or a smaller pool holds; a prompt that fills the length is refused
    naming it."""
    m, _ = tiny
    [prompt] = random_prompts(m.config.vocab_size, (20,))
    with pytest.raises(ValueError, match=r"max_model_len \(100000\) is larger than the model's context length"):
        Engine(m, small_config(max_model_len=100_000))  # vLLM refuses it too (it was cut to the model's silently)
    with Engine(m, small_config(max_model_len=40)) as engine:
        out = engine.generate([prompt], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True),
                              use_tqdm=False)[0]
        want = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)[0]
        assert out["finish_reason"] == "length" and out["token_ids"] == want["token_ids"]
        with pytest.raises(ValueError, match="max_model_len"):
            engine.generate([prompt * 2], SamplingParams(max_tokens=None), use_tqdm=False)
        assert_all_pages_free(engine)
    with Engine(m, small_config(max_model_len=64, num_pages=4)) as engine:  # 32 tokens of pool: what it holds
        out = engine.generate([prompt], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True),
                              use_tqdm=False)[0]
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == 4 * 8 - 20
        assert_all_pages_free(engine)


def test_new_params_generate_without_compiling_again(tiny):
    """LoadedModel.with_params: a training step's (or a fine-tune's) weights through the same compiled steps; the
    engine uses them (a zero final norm makes every logit 0, so greedy picks token 0); wrong trees are refused."""
    m, _ = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 21))
    with Engine(m, small_config()) as engine:
        before = [o["token_ids"] for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
        steps = engine.runner.compiled
        compiled = steps.decode._cache_size() + steps.prefill._cache_size()
    silenced = jax.tree_util.tree_map(lambda x: x, m.params)
    silenced["norm"]["scale"] = jnp.zeros_like(m.params["norm"]["scale"])
    with Engine(m.with_params(silenced), small_config()) as engine:
        assert engine.runner.compiled is steps
        outs = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert_all_pages_free(engine)
    assert steps.decode._cache_size() + steps.prefill._cache_size() == compiled  # nothing traced again
    assert all(o["token_ids"] == [0] * 10 for o in outs) and before != [o["token_ids"] for o in outs]
    assert m.with_params(m.params).params is m.params
    with pytest.raises(ValueError, match=r"params: \['norm'\]\['scale'\] has shape \(3,\)"):
        m.with_params({**m.params, "norm": {"scale": jnp.zeros(3)}})
    with pytest.raises(ValueError, match=r"params: \['norm'\]\['scale'\] is missing"):
        m.with_params({**m.params, "norm": {}})
    scale = m.params["norm"]["scale"]  # integer weights: the engine's cast truncated them without a word
    with pytest.raises(ValueError, match=r"params: \['norm'\]\['scale'\] must be floating point, got int32"):
        m.with_params({**m.params, "norm": {"scale": jnp.zeros(scale.shape, jnp.int32)}})
    assert m.with_params({**m.params, "norm": {"scale": scale.astype(jnp.bfloat16)}}).params["norm"]["scale"].dtype \
        == jnp.bfloat16


def hf_prompt_logprobs(hf, prompt: list[int]) -> np.ndarray:
    """log_softmax (float32) of Hugging Face's logits: row p-1 scores prompt token p."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_prompt_logprobs_match_transformers_through_chunks_and_a_cached_prefix(tiny):
    m, hf = tiny
    shared = random_prompts(m.config.vocab_size, (40,))[0]
    # 70 tokens > max_tokens_per_step=64: prefilled in two chunks; one token: nothing to score.
    prompts = random_prompts(m.config.vocab_size, (5, 23, 70)) + [shared + [7, 8, 9], [11]]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    with Engine(m, small_config()) as engine:
        outs = engine.generate(prompts, params, use_tqdm=False)
        # The shared prefix is cached now: a request asking for prompt logprobs computes it all the same.
        again = engine.generate(shared + [5], params, use_tqdm=False)[0]
        assert again["cached_tokens"] == 0
        plain = engine.generate(shared + [5], GREEDY, use_tqdm=False)[0]
        assert plain["cached_tokens"] == 40 and "prompt_logprobs" not in plain
        # Only batches that ask run the prompt-logprobs variant (its key carries one more field).
        prefills = {len(shape) for shape in engine.runner.compiled_shapes if shape[0] == "prefill"}
        assert prefills == {9, 10}
        assert_all_pages_free(engine)
    for prompt, out in zip(prompts + [shared + [5]], outs + [again]):
        assert out["token_ids"] == hf_greedy(hf, prompt, 3)
        ref = hf_prompt_logprobs(hf, prompt)
        plp, ranks = out["prompt_logprobs"], out["prompt_logprob_ranks"]
        assert len(plp) == len(ranks) == len(prompt) and plp[0] is None and ranks[0] is None
        for p in range(1, len(prompt)):
            entry, want = plp[p], ref[p - 1]
            assert prompt[p] in entry and len(entry) in (2, 3)
            best = np.argsort(-want)[:2]
            assert set(best.tolist()) <= set(entry)
            for token, lp in entry.items():
                assert abs(lp - want[token]) < 1e-4, (p, token, lp, want[token])
            # vLLM's rank: the tokens at least as likely as the prompt token, itself included (ties within float
            # error of it may fall either way).
            # The gaps are taken exactly (float64): `want > want[t] + 1e-4` rounded the bound in float32, and a
            # token 1.0014e-4 above (210 float32 steps at -5.8) was then neither above nor near (3 runs in 60).
            gap = want.astype(np.float64) - want[prompt[p]]
            above, near = np.sum(gap > 1e-4), np.sum(np.abs(gap) <= 1e-4)
            assert above + 1 <= ranks[p] <= above + near, (p, ranks[p], above, near)


def test_prompt_logprobs_survive_preemption_once_and_leave_other_requests_alone(tiny):
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (30, 26, 35))
    asks = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    # 3 sequences of up to 51 tokens need 18 pages of 8; 14 pages force preemption.
    with Engine(m, small_config(num_pages=14)) as engine:
        victims = []
        preempt = engine.scheduler.preempt
        engine.scheduler.preempt = lambda r: (victims.append(r.params), preempt(r))
        outs = engine.generate(prompts, [asks, GREEDY, asks], use_tqdm=False)
        assert asks in victims  # recomputed from prompt + output: its prompt logprobs not again
        assert_all_pages_free(engine)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf, prompt, len(out["token_ids"]))
    assert "prompt_logprobs" not in outs[1]
    for i in (0, 2):
        ref = hf_prompt_logprobs(hf, prompts[i])
        plp = outs[i]["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(prompts[i])
        got = [plp[p][prompts[i][p]] for p in range(1, len(prompts[i]))]
        assert all(len(plp[p]) == 1 for p in range(1, len(prompts[i])))
        np.testing.assert_allclose(got, [ref[p - 1, prompts[i][p]] for p in range(1, len(prompts[i]))], atol=1e-4)


def hf_log_softmax64(hf, ids: list[int]) -> np.ndarray:
    """float64 log_softmax of Hugging Face's logits over ``ids``: row p scores the token after position p."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def assert_named_logprobs(out: dict, prompt: list[int], named: list[int], ref: np.ndarray) -> None:
    """``out``'s every generated position holds exactly ``named`` (in order, repeats dropped) at ``ref``'s values
    (`hf_log_softmax64` of prompt + output) and vLLM's ranks, beside the sampled token's own."""
    named = list(dict.fromkeys(named))
    n = len(out["token_ids"])
    assert len(out["top_logprobs"]) == len(out["top_logprob_ranks"]) == len(out["logprob_ranks"]) == n
    for k, (token, lp, top, ranks) in enumerate(zip(out["token_ids"], out["logprobs"], out["top_logprobs"],
                                                    out["top_logprob_ranks"])):
        want = ref[len(prompt) - 1 + k]
        assert list(top) == list(ranks) == named
        assert lp == pytest.approx(want[token], abs=1e-4)
        for t in named:
            assert top[t] == pytest.approx(want[t], abs=1e-4), (k, t)
            # vLLM's rank, the tokens at least as likely; ties within float error of it may fall either way.
            gap = want - want[t]
            above, near = np.sum(gap > 1e-4), np.sum(np.abs(gap) <= 1e-4)
            assert above + 1 <= ranks[t] <= above + near, (k, t, ranks[t], above, near)
        if token in top:  # the sampled token named too: one value, one rank
            assert top[token] == lp and ranks[token] == out["logprob_ranks"][k]


def test_logprob_token_ids_match_transformers_beside_rows_without_them(tiny):
    """Rows naming tokens (greedy, and n = 2 seeded samples) get transformers' float64 log-softmax of those tokens
    at every generated position, through the prefill's first token and multi-step decode calls; a row asking for
    top-k beside them keeps its k best and a row asking for nothing gets none."""
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 12, 20))
    named = [319, 0, 5, 77, 5]
    params = [SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, logprobs=3, logprob_token_ids=named),
              SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=7, temperature=0.9, seed=4, n=2, ignore_eos=True, logprobs=0,
                             logprob_token_ids=list(range(40, 60))),
              GREEDY]
    with Engine(m, small_config(max_running=8, batch_buckets=(8,))) as engine:
        outs = engine.generate(prompts + [prompts[0]], params, use_tqdm=False)
        widths = {mark for shape in engine.runner.compiled_shapes for mark in shape
                  if isinstance(mark, tuple) and mark[:1] == ("logprob_ids",)}
        # 4 ids in one row, 20 in two: a call is padded to its widest row's width
        assert ("logprob_ids", 128) in widths and widths <= {("logprob_ids", 4), ("logprob_ids", 128)}
        assert_all_pages_free(engine)
    assert outs[0]["token_ids"] == hf_greedy(hf, prompts[0], 7) == outs[3]["token_ids"][:7]
    assert_named_logprobs(outs[0], prompts[0], named, hf_log_softmax64(hf, prompts[0] + outs[0]["token_ids"]))
    for sample in outs[2]["outputs"]:
        ref = hf_log_softmax64(hf, prompts[2] + sample["token_ids"])
        assert_named_logprobs(sample, prompts[2], list(range(40, 60)), ref)
    assert outs[2]["outputs"][0]["token_ids"] != outs[2]["outputs"][1]["token_ids"]
    assert all(len(top) == 2 for top in outs[1]["top_logprobs"]) and "top_logprob_ranks" not in outs[1]
    assert "logprobs" not in outs[3] and "top_logprobs" not in outs[3]


def test_logprob_token_ids_outside_the_vocabulary_are_refused_naming_the_field(tiny):
    m, hf = tiny
    with Engine(m, small_config()) as engine:
        with pytest.raises(ValueError, match=r"^logprob_token_ids must be token ids in \[0, 320\), got \[320\]"):
            engine.generate([7, 8], SamplingParams(logprobs=0, logprob_token_ids=[3, 320]), use_tqdm=False)
        assert engine.generate([7, 8], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(hf, [7, 8], 10)
        assert_all_pages_free(engine)


@pytest.mark.parametrize("bad", [-1, 21, 1.5, False])  # True is vLLM's 1 (`test_logprobs_true_asks_for_one_as_vllm_s`)
def test_bad_prompt_logprobs_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="^prompt_logprobs must be"):
        SamplingParams(prompt_logprobs=bad)


def test_half_batch_decode_gives_the_same_tokens(tiny, monkeypatch):
    """`runner.HALF_BATCH_ROWS`: a decode call run as two half-batch chains a step (sharing the pool) gives
    every row the tokens of the one-chain call, greedy and seeded rows alike, and frees every page."""
    from jaxserve import runner as runner_module

    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (5, 13, 21, 9))
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=11, ignore_eos=True)
    params = [greedy, seeded, greedy, seeded]
    traced = []
    halves = runner_module.Steps._decode_halves
    monkeypatch.setattr(runner_module.Steps, "_decode_halves",
                        lambda self, *a, **kw: traced.append(a[2].shape[0]) or halves(self, *a, **kw))
    results = {}
    for rows in (0, 4):
        monkeypatch.setattr(runner_module, "HALF_BATCH_ROWS", rows)
        with Engine(m, small_config(decode_steps=3)) as engine:
            results[rows] = engine.generate(prompts, params, use_tqdm=False)
            assert_all_pages_free(engine)
    assert traced and set(traced) == {4}  # the 4-row decode calls took the two-chain path
    assert [o["token_ids"] for o in results[4]] == [o["token_ids"] for o in results[0]]
    assert results[4][0]["token_ids"] == hf_greedy(hf, prompts[0], 12)


def test_decode_table_widths_grow_geometrically_to_the_model_length():
    """A decode call's block table is the narrowest of a few widths that holds its pages: the kernels'
    single-pass width, then 16x steps kept under half the full table, then the full table."""
    from jaxserve.engine import _decode_table_widths

    assert _decode_table_widths(16, 2048) == (16, 256, 2048)        # a 32k model at page 16
    assert _decode_table_widths(16, 8192) == (16, 256, 4096, 8192)  # 128k
    assert _decode_table_widths(16, 300) == (16, 300)               # no width within 2x of the full one
    assert _decode_table_widths(8, 64) == (32, 64)
    assert _decode_table_widths(16, 10) == (10,)


def test_a_middle_decode_table_is_kept_only_where_it_changes_the_kernels_split_count(monkeypatch):
    """Per batch bucket: the 256-page table of a 32k model splits a batch-1 call of Qwen2.5-0.5B heads into 32
    instead of 256, but a batch-8 call into the same 32 as the full table (the programs wanted cap it), so only
    the small buckets compile it; interpreted (the CPU), nothing splits and no middle width is kept."""
    import functools

    from jaxserve.engine import _decode_table_widths, _decode_tuning
    from jaxserve_kernels import pallas_compat

    def splits(head_dim, kv_heads, rows, width):
        return _decode_tuning(16, head_dim, kv_heads, rows, width)[1]

    def widths(rows, head_dim=64, kv_heads=2):
        return _decode_table_widths(16, 2048, functools.partial(splits, head_dim, kv_heads, rows))

    assert widths(1) == (16, 2048) and widths(8) == (16, 2048)  # the CPU: interpreted, one split
    monkeypatch.setattr(pallas_compat, "resolve_interpret", lambda interpret: False)  # as compiled on a GPU
    assert splits(64, 2, 1, 256) == 32 and splits(64, 2, 1, 2048) == 256
    assert widths(1) == widths(4) == (16, 256, 2048)
    assert widths(8) == widths(256) == (16, 2048)
    assert widths(1, 128, 4) == (16, 256, 2048)  # 7B
    assert widths(2, 128, 4) == (16, 2048)


def test_a_decode_call_takes_its_batch_buckets_narrowest_table(tiny):
    """The engine's per-bucket widths reach the decode call: with a middle width for the 4-row bucket (as a GPU
    engine gets where it changes the split count), rows past 32 pages decode through a 48-page table, with
    Hugging Face's tokens and every page free after."""
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (300, 20))  # 38 + 1 pages of 8: past 32, within 48
    with Engine(m, small_config(max_tokens_per_step=512, prefill_buckets=(16, 64, 512))) as engine:
        engine._decode_widths = {4: (32, 48, 64)}
        assert engine.decode_table_width(300, 4) == 48 and engine.decode_table_width(300) == 64
        outs = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 10) for p in prompts]
        widths = {shape[2][1] for shape in engine.runner.compiled_shapes if shape[0] == "decode"}
        assert 48 in widths
        assert_all_pages_free(engine)


def pad_under_4(n: int, *_) -> int:
    """Stand-in for `model.decode_rows`, which never pads on the CPU: calls of 1-3 rows run as 4."""
    return 4 if n < 4 else n


def gpu_like_tuning(page_size: int, head_dim: int, kv_heads: int, rows: int, width: int) -> tuple[int, int]:
    """Stand-in for `engine._decode_tuning` (the CPU's interpreted kernels never split): a table of W pages split
    min(W, 16 // rows) ways, as a GPU caps splits by a batch's programs, one page a loop iteration."""
    return 1, min(width, 16 // rows)


def padding_config(**kw) -> EngineConfig:
    """Two streams in a 256-token model, prompts of up to 250 tokens prefilled in one call."""
    return small_config(max_running=2, batch_buckets=(1, 2), decode_steps=2, max_model_len=256,
                        max_tokens_per_step=256, prefill_buckets=(16, 64, 256), **kw)


def record_decode_calls(engine: Engine) -> list[tuple[int, int | None]]:
    """``(batch, live_rows)`` of every decode call the engine makes from now on."""
    decode, calls = engine.runner.decode, []

    def recording(tokens, *args, live_rows=None, **kw):
        calls.append((len(tokens), live_rows))
        return decode(tokens, *args, live_rows=live_rows, **kw)

    engine.runner.decode = recording
    return calls


def test_small_decode_steps_run_padded_where_the_model_says_so(tiny, monkeypatch):
    """`model.decode_rows` (on the GPU: steps under 8 rows padded to 8 where that is faster): the engine runs a decode
    call of n rows at the bucket holding decode_rows(n), compiles no decode shape for the buckets it skips, and the
    padded rows change no output. On the CPU the rule never pads, so a stand-in pads 1-3 rows to 4 here."""
    from jaxserve import engine as engine_module

    monkeypatch.setattr(engine_module, "decode_rows", pad_under_4)
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (6, 14))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(m, small_config(batch_buckets=(1, 2, 4), decode_steps=2)) as engine:
        assert engine.decode_buckets == (4,)
        outs = engine.generate(prompts, params, use_tqdm=False)
        decode_batches = {shape[2][0] for shape in engine.runner.compiled_shapes if shape[0] == "decode"}
        assert decode_batches == {4}, decode_batches
        assert_all_pages_free(engine)
    assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 6) for p in prompts]


def test_a_padded_decode_width_past_the_largest_bucket_runs_as_a_decode_only_shape(tiny, monkeypatch):
    """max_running under the padded width (on the GPU: a 1.5B engine serving one or two streams, padded to 8): the
    decode call runs at the padded width anyway, as a shape only decode compiles (warm-up included, no prefill of
    that batch), max_running still bounds the sequences, and the tokens are Hugging Face's with every page free."""
    from jaxserve import engine as engine_module

    monkeypatch.setattr(engine_module, "decode_rows", pad_under_4)
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (6, 14, 9))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(m, small_config(max_running=2, batch_buckets=(1, 2), decode_steps=2)) as engine:
        assert engine.decode_buckets == (4,) and engine.decode_batch(1) == engine.decode_batch(2) == 4
        engine.warmup(sampling=False)
        shapes = set(engine.runner.compiled_shapes)
        assert {s[2][0] for s in shapes if s[0] == "decode"} == {4}
        assert {s[2][0] for s in shapes if s[0] == "prefill"} == {1, 2}
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert engine.runner.compiled_shapes == shapes  # nothing compiled past the warm-up
        assert engine.stats()["running"] == 0
        assert_all_pages_free(engine)
    assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 6) for p in prompts]


def test_padding_never_leaves_the_real_rows_fewer_attention_splits(tiny, monkeypatch):
    """`Engine.decode_shape`: a padded call's split count is capped by its padded batch's programs, so over long
    contexts the real rows' keys would go to fewer programs (H200, 16k keys: up to 11% slower steps); those calls
    run in the rows' own bucket, warm-up compiles that shape too, and the tokens are Hugging Face's either way.
    On the CPU the kernels never split, so stand-ins pad 1-3 rows to 4 and split as a GPU would (gpu_like_tuning).
    With live rows off (their rule: the next test)."""
    from jaxserve import engine as engine_module
    from jaxserve import model as model_module

    monkeypatch.setattr(model_module, "PAD_LIVE_ROWS", False)
    monkeypatch.setattr(engine_module, "decode_rows", pad_under_4)
    monkeypatch.setattr(engine_module, "_decode_tuning", gpu_like_tuning)
    m, hf = tiny
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(m, padding_config()) as engine:
        # 4 pages or fewer: as many splits used either way (padded); 5 and up: fewer of four rows' 4 splits.
        assert [engine.decode_shape(1, limit)[0] for limit in (8, 32, 33, 200)] == [4, 4, 1, 1]
        assert [engine.decode_shape(2, limit)[0] for limit in (8, 32, 33, 200)] == [4, 4, 2, 2]
        engine.warmup(sampling=False)
        shapes = set(engine.runner.compiled_shapes)
        assert {s[2][0] for s in shapes if s[0] == "decode"} == {1, 2, 4}
        calls = record_decode_calls(engine)
        for lengths, expected in (((6, 9), {4}), ((100, 150), {2})):  # short: padded; long: unpadded
            calls.clear()
            prompts = random_prompts(m.config.vocab_size, lengths)
            outs = engine.generate(prompts, params, use_tqdm=False)
            assert {batch for batch, _ in calls} == expected, (lengths, calls)
            assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 6) for p in prompts]
            assert_all_pages_free(engine)
        assert engine.runner.compiled_shapes == shapes  # every call's shape was warmed up


def test_padded_calls_with_live_rows_run_only_the_real_rows_attention(tiny, monkeypatch):
    """`model.PAD_LIVE_ROWS`: where padding would cut the rows' attention splits (long contexts), a padded call runs
    the attention of its rows' own bucket alone (the kernels' grid over those rows, split as their own call), at that
    bucket's table widths; elsewhere the whole padded batch's. The padding rows' outputs are never read. Stand-ins as
    in the test above; tokens are Hugging Face's, every shape warmed up, pages free."""
    from jaxserve import engine as engine_module
    from jaxserve import model as model_module

    monkeypatch.setattr(model_module, "PAD_LIVE_ROWS", True)
    monkeypatch.setattr(engine_module, "decode_rows", pad_under_4)
    monkeypatch.setattr(engine_module, "_decode_tuning", gpu_like_tuning)
    m, hf = tiny
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(m, padding_config(attention_impl="pallas")) as engine:  # the kernels, interpreted
        # 4 pages or fewer: as many splits either way, the whole padded batch; 5 and up: the real rows alone.
        assert [engine.decode_shape(1, limit)[::2] for limit in (8, 32, 33, 200)] == [(4, 4), (4, 4), (4, 1), (4, 1)]
        assert [engine.decode_shape(2, limit)[::2] for limit in (8, 32, 33, 200)] == [(4, 4), (4, 4), (4, 2), (4, 2)]
        assert engine.decode_shape(1, 200).width == engine.decode_table_width(200, 1)  # the row's own bucket's
        engine.warmup(sampling=False)
        shapes = set(engine.runner.compiled_shapes)
        # A shape's live rows (past its tenth field) are named only where they are fewer than its rows.
        assert {(s[2][0], s[10:]) for s in shapes if s[0] == "decode"} == {(4, ()), (4, (1,)), (4, (2,))}
        calls = record_decode_calls(engine)
        for lengths, expected in (((6, 9), {(4, 4)}), ((100, 150), {(4, 2)}), ((120,), {(4, 1)})):
            calls.clear()
            prompts = random_prompts(m.config.vocab_size, lengths)
            outs = engine.generate(prompts, params, use_tqdm=False)
            assert set(calls) == expected, (lengths, calls)
            assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 6) for p in prompts]
            assert_all_pages_free(engine)
        assert engine.runner.compiled_shapes == shapes


def test_live_rows_padding_changes_no_sampled_token(tiny, monkeypatch):
    """Seeded sampling with penalties and log-probabilities, through padded calls whose padding rows' attention never
    runs (their garbage stays in their own rows): the same tokens as the unpadded engine."""
    from jaxserve import engine as engine_module
    from jaxserve import model as model_module

    m, _ = tiny
    prompts = random_prompts(m.config.vocab_size, (7, 40, 90))
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=s, repetition_penalty=1.3,
                             presence_penalty=0.2, logprobs=2, ignore_eos=True) for s in (1, 2, 3)]
    outs = {}
    for live in (False, True):
        monkeypatch.setattr(model_module, "PAD_LIVE_ROWS", live)
        monkeypatch.setattr(engine_module, "decode_rows", pad_under_4 if live else (lambda n, *_: n))
        monkeypatch.setattr(engine_module, "_decode_tuning", gpu_like_tuning)
        with Engine(m, padding_config(attention_impl="pallas")) as engine:
            assert engine.decode_shape(1, 100).live == 1 and engine.decode_shape(1, 100).batch == (4 if live else 1)
            outs[live] = engine.generate(prompts, params, use_tqdm=False)
            assert_all_pages_free(engine)
    for a, b in zip(outs[False], outs[True]):
        # Log-probabilities within float32 rounding: a 4-row product may round otherwise than a 1-row one.
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-5, atol=1e-6)


def test_decode_rows_pads_small_steps_to_the_mosaic_gpu_path_only_where_measured_faster(monkeypatch):
    """`model.decode_rows`' rule, with JAX's backend reported as a GPU (the Mosaic GPU path counts the CPU's interpreter
    as its device): bf16 steps of 2-7 rows run as 8; one row stays one where its norms fold (hidden <= 1024, the
    0.5B shape) and runs as 8 where they cannot (1.5B); float32, the reference kernels and the switch leave it."""
    import jax.numpy as jnp

    from jaxserve import model as model_module
    from jaxserve.config import QWEN25_SHAPES, ModelConfig

    monkeypatch.setattr(model_module.jax, "default_backend", lambda: "gpu")
    small, large = (ModelConfig(**QWEN25_SHAPES[name]) for name in ("0.5B", "1.5B"))
    rows = range(1, 13)
    assert [model_module.decode_rows(n, small, jnp.bfloat16) for n in rows] == [1] + [8] * 7 + [9, 10, 11, 12]
    assert [model_module.decode_rows(n, large, jnp.bfloat16) for n in rows] == [8] * 8 + [9, 10, 11, 12]
    assert [model_module.decode_rows(n, large, jnp.float32) for n in rows] == list(rows)
    assert [model_module.decode_rows(n, large, jnp.bfloat16, "reference") for n in rows] == list(rows)
    monkeypatch.setattr(model_module, "PAD_SMALL_DECODE", False)
    assert [model_module.decode_rows(n, large, jnp.bfloat16) for n in rows] == list(rows)


def test_priority_scheduling_runs_the_most_urgent_first_and_fcfs_refuses_a_priority(tiny):
    m, hf = tiny
    prompts = random_prompts(m.config.vocab_size, (12, 9, 15, 7))
    priorities = [3, 1, 2, 0]
    one_at_a_time = dict(max_running=1, batch_buckets=(1,), scheduling_policy="priority")
    with Engine(m, small_config(**one_at_a_time)) as engine:
        ids = [engine.add_request(p, GREEDY, priority=k) for p, k in zip(prompts, priorities)]
        finished = []
        while engine.has_unfinished():
            finished += [r.request_id for r in engine.step() if r.finish_reason is not None]
        assert finished == [ids[i] for i in np.argsort(priorities)]
        outs = [engine.release(i).result() for i in ids]
        assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
        # generate takes one priority a prompt
        again = engine.generate(prompts[:2], GREEDY, use_tqdm=False, priority=[1, 0])
        assert [o["token_ids"] for o in again] == [o["token_ids"] for o in outs[:2]]
        with pytest.raises(ValueError, match="priority"):
            engine.generate(prompts[:2], GREEDY, use_tqdm=False, priority=[1])
        with pytest.raises(ValueError, match="priority"):
            engine.add_request(prompts[0], GREEDY, priority=1.5)
        assert_all_pages_free(engine)
    with Engine(m, small_config()) as fcfs:
        with pytest.raises(ValueError, match="priority must be 0"):
            fcfs.add_request(prompts[0], GREEDY, priority=1)
        assert not fcfs.requests
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lifo")


def test_a_params_tree_of_one_s_own_runs_through_loaded_model_from_params(tiny):
    """`jaxserve.generate(params, prompts)` for a researcher's own weights: a params tree with its config (the
    tokenizer optional) is a model; the tree alone is refused with the way to wrap it."""
    m, _ = tiny
    prompts = random_prompts(m.config.vocab_size, (4, 11))
    want = [o["token_ids"] for o in jaxserve.generate(m, prompts, GREEDY, use_tqdm=False)]
    own = jaxserve.LoadedModel.from_params(jax.tree_util.tree_map(np.asarray, m.params), m.config)
    assert [o["token_ids"] for o in jaxserve.generate(own, prompts, GREEDY, use_tqdm=False)] == want
    with pytest.raises(ValueError, match="from_params"):
        jaxserve.generate(m.params, prompts, use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        jaxserve.generate(own, "text needs a tokenizer", use_tqdm=False)
    with pytest.raises(ValueError, match="layers_2"):  # a tree of 2 layers is not one of 3
        jaxserve.LoadedModel.from_params(m.params, dataclasses.replace(m.config, num_hidden_layers=3))


def test_caller_ids_numpy_prompts_negative_seeds_and_embed_params(tiny):
    """Found by fuzzing the API: generate's own ids skip ones a caller chose ("req-1"), token ids come as numpy
    arrays ([T] one prompt, [B, T] a batch), a negative seed's n samples all seeded (seed + i would reach -1, "no
    seed"), and embed refuses SamplingParams before running anything."""
    engine = Engine(tiny[0], small_config())
    mine = [engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), request_id=f"req-{i}") for i in range(3)]
    outs = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert outs[0]["finish_reason"] == "length" and mine == ["req-0", "req-1", "req-2"]
    ids = engine.generate(np.array([[1, 2, 3], [4, 5, 6]]), SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert [o["token_ids"] for o in ids] == [o["token_ids"] for o in engine.generate(
        [[1, 2, 3], [4, 5, 6]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)]
    assert len(engine.generate(np.array([1, 2, 3]), SamplingParams(max_tokens=1), use_tqdm=False)) == 1
    seeded = SamplingParams(max_tokens=4, temperature=1.0, seed=-2, n=3)
    runs = [[s["token_ids"] for s in engine.generate([[1, 2, 3]], seeded, use_tqdm=False)[0]["outputs"]]
            for _ in range(2)]
    alone = [engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=1.0, seed=-2 - i),
                             use_tqdm=False)[0]["token_ids"] for i in range(3)]
    assert runs[0] == runs[1] == alone
    with pytest.raises(ValueError, match="pooling_params must be PoolingParams"):
        engine.embed([[1, 2, 3]], SamplingParams())
    with pytest.raises(ValueError, match="pooling_params must be PoolingParams"):
        engine.classify([[1, 2, 3]], [SamplingParams()])
    # Ids that only int() would take (1.7, "3") and a dict of sampling parameters (iterated, its keys) are refused.
    for bad in ([1.7, 2], ["3", 4], [None], b"\x01\x02"):
        with pytest.raises(ValueError, match="integer token ids"):
            engine.generate([bad], SamplingParams(max_tokens=1), use_tqdm=False)
    for bad in ([True, 2], ({"prompt_token_ids": (3, False)})):  # bools pass operator.index
        with pytest.raises(ValueError, match="ints, not bools"):
            engine.generate([bad], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids must be token ids"):  # not a text prompt
        engine.generate([{"prompt_token_ids": "abc"}], SamplingParams(max_tokens=1), use_tqdm=False)
    for bad in (None, 5):
        with pytest.raises(ValueError, match="prompts must be"):
            engine.generate(bad, SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
        engine.generate([[1, 2]], {"max_tokens": 1}, use_tqdm=False)
    with pytest.raises(ValueError, match="entries must be SamplingParams"):
        engine.generate([[1, 2]], ["max_tokens"], use_tqdm=False)
    for field, value in (("priority", 5), ("lora_request", 5)):  # were TypeErrors from list(5)
        with pytest.raises(ValueError, match=f"{field} must be"):
            engine.generate([[1, 2]], SamplingParams(max_tokens=1), use_tqdm=False, **{field: value})
    while engine.has_unfinished():
        engine.step()
    assert_all_pages_free(engine)


def test_new_step_shapes_are_logged_once_and_quietly_inside_warmup(caplog):
    # A compile while serving stalls every stream: its shape is named at INFO; a shape seen again is not; inside
    # Engine.warmup (quiet) at DEBUG only.
    import logging

    from jaxserve.runner import StepShapes

    shapes = StepShapes()
    with caplog.at_level(logging.DEBUG, logger="jaxserve.runner"):
        shapes.add(("decode", (8, 1)))
        shapes.add(("decode", (8, 1)))
        shapes.quiet = True
        shapes.add(("prefill", (1, 256)))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "new step shape (1 so far): ('decode', (8, 1))"),
        (logging.DEBUG, "new step shape (2 so far): ('prefill', (1, 256))")]
    assert len(shapes) == 2
