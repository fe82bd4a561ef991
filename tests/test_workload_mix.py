"""Every request feature in one random workload: the scheduler must lose nothing when they meet.

Each feature has tests of its own; this one makes them share an engine and its decode calls, as a server's traffic
does: priority scheduling, LoRA adapters (more than there are slots), n-gram speculation, structured outputs,
log-probabilities, min_tokens with stop ids, logit bias, seeded sampling with penalties, twin prompts (the in-batch
prefix sharing that ``n`` uses), prompts that repeat themselves (so speculation drafts), embeddings (pooling
requests), prompts given as embeddings, aborts, and a pool small enough to preempt. Every request must finish with a valid reason, give the
tokens (or embedding) it gives run alone on an engine with none of the scheduling features where it is greedy, and
leave no page or adapter slot held.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from jaxserve import Engine, LoRARequest, PoolingParams, SamplingParams
from tests.conftest import drive_random_workload
from tests.test_engine import assert_all_pages_free, small_config
from tests.test_lora import adapters  # noqa: F401  (fixture)

DIGITS = "[0-9]{2,5}"
# Rows whose features a verify call does not apply (structured outputs) keep speculation off for their whole decode
# call: they are rarer here, so that some calls do speculate.
KINDS = ("greedy", "logprobs", "sampled", "regex", "min_tokens", "bias", "twin", "repeat", "embed", "prompt_embeds")
WEIGHTS = np.array([3, 2, 1, 1, 1, 1, 2, 4, 2, 1]) / 18


@pytest.mark.parametrize("policy,overlap", [("mixed", True), ("prefill_first", True), ("time_share", False)])
def test_random_workload_of_every_request_feature_never_loses_a_request(adapters, policy, overlap):  # noqa: F811
    model, _, paths = adapters
    loras = [None] + [LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(paths.items())]
    seed = int(os.environ.get("JAXSERVE_TEST_SEED") or np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    prefix = rng.integers(3, vocab, size=17).tolist()
    table = np.asarray(model.params["embed_tokens"]["embedding"])
    last: list = []

    def new_request():
        kind = rng.choice(KINDS, p=WEIGHTS)
        if kind == "twin" and last:  # the same prompt, adapter and params again, at once: its prefill is shared
            return last[0]
        n = int(rng.integers(2, 20))
        prompt = prefix[: rng.integers(0, 18)] + rng.integers(3, vocab, size=rng.integers(1, 10)).tolist()
        greedy = dict(max_tokens=n, temperature=0.0, ignore_eos=True)
        params = {
            "greedy": lambda: SamplingParams(**greedy),
            "logprobs": lambda: SamplingParams(**greedy, logprobs=2),
            "sampled": lambda: SamplingParams(max_tokens=n, temperature=0.8, top_k=int(rng.choice([-1, 7])),
                                              top_p=0.9, repetition_penalty=1.1, seed=int(rng.integers(1 << 20)),
                                              ignore_eos=True),
            "regex": lambda: SamplingParams(max_tokens=n, temperature=0.0, structured_outputs={"regex": DIGITS}),
            "min_tokens": lambda: SamplingParams(max_tokens=n, temperature=0.0, min_tokens=2,
                                                 stop_token_ids=tuple(rng.integers(3, vocab, 12).tolist())),
            "bias": lambda: SamplingParams(**greedy, logit_bias={int(rng.integers(3, vocab)): 4.0}),
            "twin": lambda: SamplingParams(**greedy),
            "repeat": lambda: SamplingParams(**greedy),
            "embed": lambda: PoolingParams(pooling_type=str(rng.choice(["last", "mean"]))),
            "prompt_embeds": lambda: SamplingParams(**greedy),
        }[kind]()
        if kind == "prompt_embeds":  # the prompt as its tokens' embedding rows: cached nowhere, recomputed from them
            prompt = {"prompt_embeds": table[prompt]}
        if kind == "repeat":  # a block said twice and begun again: n-gram drafts find its continuation
            block = rng.integers(3, vocab, size=rng.integers(4, 9)).tolist()
            prompt = block * 2 + block[:2]
        request = (prompt, params, {"lora_request": loras[rng.integers(len(loras))],
                                    "priority": int(rng.integers(-1, 2))})
        last[:] = [request]
        return request

    cfg = small_config(num_pages=10, policy=policy, overlap=overlap, prefix_caching=True, max_loras=2,
                       speculative_tokens=3, scheduling_policy="priority")
    with Engine(model, cfg) as engine:
        added, aborted = drive_random_workload(engine, rng, new_request, requests=22, arrival_rate=1.0,
                                               abort_rate=0.05, seed=seed)
        results = {rid: engine.release(rid) for rid in added}
        assert engine.lora.held == [0, 0], f"seed={seed}"
        assert_all_pages_free(engine)

    kept = [rid for rid in added if rid not in aborted]
    for rid in added:
        r, (_, params, _) = results[rid], added[rid]
        if rid in aborted:
            assert r.finish_reason == "abort", f"seed={seed}"
            continue
        assert r.finish_reason in ("stop", "length"), f"{rid}: {r.finish_reason} {r.error}, seed={seed}"
        if isinstance(params, PoolingParams):
            assert r.embedding is not None and not r.output_ids, f"seed={seed}"
            continue
        if r.finish_reason == "length":
            assert len(r.output_ids) == params.max_tokens, f"seed={seed}"
        if params.structured_outputs is not None:
            text = r.result()["text"]
            assert re.fullmatch("[0-9]*", text) and (r.finish_reason == "length" or re.fullmatch(DIGITS, text)), \
                f"{rid}: {text!r}, seed={seed}"
        if params.logprobs:
            assert len(r.output_logprobs) == len(r.top_logprobs) == len(r.output_ids), f"seed={seed}"
            for token, lp, top in zip(r.output_ids, r.output_logprobs, r.top_logprobs):
                # Greedy with no bias: the chosen token is the raw model's most likely one.
                assert max(top.values()) == pytest.approx(lp, abs=1e-5) and top.get(token) == pytest.approx(lp), \
                    f"seed={seed}"

    # Alone, on an engine with no priority, speculation or prefix cache, each request gives the same tokens: greedy
    # ones by definition. (A seeded row draws from its own logits wherever it sits, but under speculation its draws
    # follow its distribution without being the same draws: test_engine's random workload checks those.)
    with Engine(model, small_config(max_loras=3, prefix_caching=False)) as plain:
        for rid in kept:
            prompt, params, kw = added[rid]
            if isinstance(params, SamplingParams) and not params.greedy:
                continue
            alone = plain.generate([prompt], params, use_tqdm=False, lora_request=kw["lora_request"])[0]
            if isinstance(params, PoolingParams):
                np.testing.assert_allclose(results[rid].embedding, alone["embedding"], rtol=1e-4, atol=1e-5,
                                           err_msg=f"{rid} ({params}, {kw}) differs, seed={seed}")
                continue
            assert alone["token_ids"] == results[rid].output_ids, \
                f"{rid} ({params}, {kw}) differs: {results[rid].output_ids} against {alone['token_ids']} alone, seed={seed}"
        assert_all_pages_free(plain)
