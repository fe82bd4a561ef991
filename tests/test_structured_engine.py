"""Structured outputs through the engine: constrained requests on the embedded default model (whose byte-level
BPE tokenizer the masks walk) match their constraint, take the best allowed tokens, leave unconstrained rows alone,
survive preemption and free every page. No hypothesis here: the GPU machine runs this file compiled."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

import jaxserve
from jaxserve import Engine, SamplingParams
from jaxserve.structured import GuideState, unpack_mask
from tests.conftest import drive_random_workload
from tests.test_engine import assert_all_pages_free, small_config


@pytest.fixture(scope="module")
def model():
    return jaxserve.load()


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
    prompts = ["import os", "def main():", "class Point:", "x = ", "args = "]
    grammar = 'root ::= "(" pair ("," ws pair){0,2} ")"\npair ::= [a-c] "=" [0-9]\nws ::= " "?'
    specs = [{"choice": ["True", "False", "None"]}, {"regex": r"[0-9]{2}-[a-z]{3}"}, {"json": SCHEMA},
             {"json_object": True}, {"grammar": grammar}]
    with Engine(model, small_config()) as engine:
        for temperature in (0.0, 1.0):
            params = [SamplingParams(max_tokens=60, temperature=temperature, seed=i, structured_outputs=s)
                      for i, s in enumerate(specs)]
            outs = engine.generate(prompts, params, use_tqdm=False)
            assert [o["finish_reason"] for o in outs] == ["stop"] * 5, outs
            assert outs[0]["text"] in ("True", "False", "None")
            assert re.fullmatch(r"[0-9]{2}-[a-z]{3}", outs[1]["text"])
            _check_schema(outs[2]["text"])
            assert isinstance(json.loads(outs[3]["text"]), dict)
            assert re.fullmatch(r"\([a-c]=[0-9](?:, ?[a-c]=[0-9]){0,2}\)", outs[4]["text"]), outs[4]["text"]
        assert_all_pages_free(engine)


def test_greedy_constrained_tokens_are_the_best_allowed_ones(model):
    spec = {"regex": r"(?:def|class) [a-z_]{1,12}\((?:self)?\):"}
    params = SamplingParams(max_tokens=30, temperature=0, logprobs=20, structured_outputs=spec)
    with Engine(model, small_config()) as engine:
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


def _char_ids(model, chars: str) -> list[int]:
    """The ids of the one-character tokens of ``chars`` (byte-level BPE: a space is "Ġ")."""
    return model.tokenizer.convert_tokens_to_ids([c.replace(" ", "\u0120") for c in chars])


def test_allowed_token_ids_hold_every_token_alone_and_with_a_constraint(model):
    letters = _char_ids(model, "abcdefghijklmnopqrstuvwxyz ")
    digits, eos = _char_ids(model, "0123"), model.tokenizer.eos_token_id
    params = [SamplingParams(max_tokens=16, temperature=0, logprobs=20, allowed_token_ids=letters),
              SamplingParams(max_tokens=16, temperature=1.0, seed=3, allowed_token_ids=letters),
              SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0, allowed_token_ids=digits + [eos],
                             structured_outputs={"regex": "[0-9]{3,6}"})]
    prompts = ["import os", "x = ", "def f():", "n = "]
    with Engine(model, small_config()) as engine:
        outs = engine.generate(prompts, params, use_tqdm=False)
        alone = engine.generate(prompts[2:3], params[2], use_tqdm=False)[0]
        with pytest.raises(ValueError, match="allowed_token_ids"):
            engine.add_request("x", SamplingParams(allowed_token_ids=[model.config.vocab_size]))
        assert_all_pages_free(engine)
    for out in outs[:2]:  # EOS is not among them: every row runs to max_tokens
        assert set(out["token_ids"]) <= set(letters) and out["finish_reason"] == "length", out
    # Greedy takes the best allowed token (log-probabilities stay the raw model's).
    for token, lp, top in zip(outs[0]["token_ids"], outs[0]["logprobs"], outs[0]["top_logprobs"]):
        assert not [t for t, v in top.items() if v > lp + 1e-6 and t in letters], token
    assert outs[2]["token_ids"] == alone["token_ids"]  # a row without them is untouched beside them
    assert outs[3]["finish_reason"] == "stop" and re.fullmatch("[0-3]{3,6}", outs[3]["text"]), outs[3]
    assert set(outs[3]["token_ids"]) <= set(digits + [eos])


def test_unconstrained_requests_beside_constrained_ones_keep_their_tokens(model):
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["import sys", "def f(a, b):", "for i in range(10):"]
    with Engine(model, small_config()) as engine:
        alone = engine.generate(prompts, plain, use_tqdm=False)
        mixed = engine.generate(prompts + ["y = "], [plain] * 3 + [
            SamplingParams(max_tokens=12, temperature=0, structured_outputs={"regex": "[0-9]+"})], use_tqdm=False)
        assert [o["token_ids"] for o in mixed[:3]] == [o["token_ids"] for o in alone]
        assert re.fullmatch("[0-9]+", mixed[3]["text"]) and mixed[3]["finish_reason"] == "length"
        assert_all_pages_free(engine)


def test_constrained_requests_survive_preemption_and_prefix_hits(model):
    params = [SamplingParams(max_tokens=48, temperature=0.8, seed=i, structured_outputs={"json": SCHEMA})
              for i in range(4)]
    prompt = "# a config record\nrecord = "
    with Engine(model, small_config()) as roomy:
        expect = [o["text"] for o in roomy.generate([prompt] * 4, params, use_tqdm=False)]
    with Engine(model, small_config(num_pages=10)) as tight:
        outs = tight.generate([prompt] * 4, params, use_tqdm=False)
        assert tight.stats()["preemptions"] > 0
        assert [o["text"] for o in outs] == expect
        # A sampled integer may run on to max_tokens; every output that ended is a record of the schema.
        assert sum(o["finish_reason"] == "stop" for o in outs) >= 2, outs
        for o in outs:
            if o["finish_reason"] == "stop":
                _check_schema(o["text"])
        assert_all_pages_free(tight)


def test_a_pattern_with_lengths_holds_through_the_engine(model):
    """A string under both a pattern and lengths (Pydantic's ``Field(pattern=..., max_length=...)``, written as a
    lookahead that the DFA compiles to a product): greedy and sampled outputs are JSON whose string meets both."""
    code = {"type": "string", "pattern": "^[a-z]+(?:-[a-z]+)*$", "minLength": 3, "maxLength": 7}
    schema = {"type": "object", "properties": {"code": code, "ok": {"type": "boolean"}}, "required": ["code", "ok"]}
    prompts = ["import os", "x = ", "def main():", "# config\n"]
    params = [SamplingParams(max_tokens=40, temperature=t, seed=i, structured_outputs={"json": schema})
              for i, t in enumerate((0.0, 1.0, 1.0, 1.0))]
    with Engine(model, small_config()) as engine:
        outs = engine.generate(prompts, params, use_tqdm=False)
        for o in outs:
            assert o["finish_reason"] == "stop", o
            value = json.loads(o["text"])
            assert re.fullmatch(code["pattern"], value["code"]) and 3 <= len(value["code"]) <= 7, o["text"]
            assert isinstance(value["ok"], bool), o["text"]
        assert_all_pages_free(engine)


def test_min_tokens_hold_under_a_constraint_until_only_its_end_is_left(model):
    """min_tokens with structured outputs (vLLM takes both): EOS stays banned while the constraint allows some other
    token, so an open-ended pattern runs to min_tokens before it may end; where the constraint allows nothing but
    its end (a complete choice), the constraint wins and the request stops short of min_tokens, inside it. A bias
    on EOS makes it every row's pick wherever it is allowed."""
    digits = {"regex": "[0-9]{1,30}"}
    with Engine(model, small_config()) as engine:
        eos = {int(t): 30.0 for t in engine.eos_ids}

        def run(**kw) -> list[dict]:
            return engine.generate(["x = "] * 3, [SamplingParams(max_tokens=40, temperature=t, seed=i, logit_bias=eos,
                                                                 structured_outputs=digits, **kw)
                                                  for i, t in enumerate((0.0, 1.0, 1.0))], use_tqdm=False)

        # A digit, then EOS as soon as the pattern allows it.
        assert [(len(o["token_ids"]), o["token_ids"][-1] in eos) for o in run()] == [(2, True)] * 3
        for o in run(min_tokens=12):  # twelve digits, then EOS
            assert o["finish_reason"] == "stop" and len(o["token_ids"]) == 13 and o["token_ids"][-1] in eos, o
            assert re.fullmatch("[0-9]{12}", o["text"]), o["text"]
        choice = engine.generate(["x = "], SamplingParams(max_tokens=40, temperature=0, min_tokens=20,
                                                          structured_outputs={"choice": ["True", "False"]}),
                                 use_tqdm=False)[0]
        assert choice["text"] in ("True", "False") and choice["finish_reason"] == "stop", choice
        assert_all_pages_free(engine)


def test_a_bad_constraint_is_refused_before_anything_runs(model):
    with Engine(model, small_config()) as engine:
        with pytest.raises(ValueError, match=r"structured_outputs\.regex.*lookaround|structured_outputs\.regex"):
            engine.add_request("x", SamplingParams(structured_outputs={"regex": "(?<=a)b"}))
        with pytest.raises(ValueError, match=r"structured_outputs\.json"):
            engine.add_request("x", SamplingParams(structured_outputs={"json": {"type": "object",
                                                                                 "patternProperties": {}}}))
        out = engine.generate(["x = "], SamplingParams(max_tokens=4, temperature=0,
                                                       structured_outputs={"choice": ["1", "2"]}), use_tqdm=False)
        assert out[0]["text"] in ("1", "2")
        assert_all_pages_free(engine)


def test_device_followed_constraints_give_the_host_paths_tokens(model, monkeypatch):
    """Decode calls follow the constraints on the device for several steps (`Engine._guide_tables`); with
    that off (DEVICE_GUIDE_BYTES 0) each step's masks come from the host. Same tokens, greedy and seeded."""
    import jaxserve.engine as engine_module

    prompts = ["import os", "def main():", "class Point:", "x = ", "# config\n", "y = "]
    specs = [{"json": SCHEMA}, {"regex": r"[a-z_]+\([0-9, ]*\)"}, {"choice": ["alpha", "beta"]}, None,
             {"json_object": True}, {"regex": "[0-9]{1,3}"}]
    # The last with ignore_eos and EOS pushed up: it takes EOS once one digit is a match, and both paths end it
    # there (on the device only EOS could follow it, for the rest of the call).
    eos = {model.tokenizer.eos_token_id: 10.0}
    # allowed_token_ids too: beside a constraint (row 1, both apply) and alone in a constrained batch (row 3).
    chars = _char_ids(model, "abcdefghijklmnopqrstuvwxyz_()0123456789, ")
    allowed = {1: chars, 3: chars[:26]}
    params = [SamplingParams(max_tokens=40, temperature=t, seed=i, structured_outputs=s, ignore_eos=i == 5,
                             logit_bias=eos if i == 5 else None, allowed_token_ids=allowed.get(i))
              for i, (t, s) in enumerate(zip((0.0, 1.0, 0.0, 0.0, 1.0, 0.0), specs))]
    results = {}
    for device in (True, False):
        monkeypatch.setattr(engine_module, "DEVICE_GUIDE_BYTES", 1 << 30 if device else 0)
        with Engine(model, small_config(max_running=8, batch_buckets=(8,))) as engine:
            calls = []
            decode = engine.runner.decode

            def recording(tokens, *args, **kw):
                calls.append((isinstance(tokens, jax.Array), kw.get("guides") is not None))
                return decode(tokens, *args, **kw)

            monkeypatch.setattr(engine.runner, "decode", recording)
            results[device] = engine.generate(prompts, params, use_tqdm=False)
            # On the device, a decode call over the same rows (or those left when some finished) continues the one
            # in flight (their states too), and the first one starts from the prefill's first tokens before the host
            # reads them; off, no call takes guides.
            assert ((True, True) in calls) == device and any(guided for _, guided in calls) == device, calls
            assert (engine.stats()["decode_calls_after_prefill"] > 0) == device
            assert_all_pages_free(engine)
    assert [o["token_ids"] for o in results[True]] == [o["token_ids"] for o in results[False]]
    assert [o["finish_reason"] for o in results[True]] == [o["finish_reason"] for o in results[False]]
    assert results[True][5]["token_ids"][-1] == model.tokenizer.eos_token_id and len(results[True][5]["token_ids"]) == 2
    _check_schema(results[True][0]["text"])
    assert re.fullmatch(r"[a-z_]+\([0-9, ]*\)", results[True][1]["text"]) or results[True][1]["finish_reason"] == "length"
    assert set(results[True][1]["token_ids"]) <= set(chars) and set(results[True][3]["token_ids"]) <= set(chars[:26])


def test_guides_stay_in_the_pool_and_decode_calls_compile_once_for_any_mix(model):
    """Requests with different constraints, alone and together, decode through one guide pool: each guide is
    written there once and kept for later requests, and every guided decode call takes the pool's rows (one
    compile a decode shape, where tables sized by each call's own guides compiled one a mix)."""
    specs = [{"regex": r"[a-z]{1,6}!"}, {"choice": ["north", "south"]}, {"json": SCHEMA}, {"regex": "[0-9]{2,4}"}]
    with Engine(model, small_config()) as engine:
        guides = [engine.structured_guide(SamplingParams(structured_outputs=s).structured_outputs) for s in specs]
        mixes = [[0], [1], [2], [3], [0, 1, 2, 3], [3, 1], [2, None, 0]]
        for mix in mixes:
            params = [SamplingParams(max_tokens=12, temperature=0, structured_outputs=None if i is None else specs[i])
                      for i in mix]
            outs = engine.generate(["x = "] * len(mix), params, use_tqdm=False)
            assert all(o["finish_reason"] in ("stop", "length") for o in outs), outs
        assert set(engine.guide_pool.placed) == set(guides) and engine.guide_pool.writes == len(specs)
        guided = {shape[-1] for shape in engine.runner.compiled_shapes if "guides" in shape}
        assert guided == {engine.guide_pool.rows}, engine.runner.compiled_shapes
        assert_all_pages_free(engine)


def test_warmup_compiles_the_steps_of_constrained_requests(model):
    # (and the gathers of chained calls that rows dropped out of, their guide states with them: the choice row ends
    # first)
    import jaxserve.engine as engine_module

    # One prefill bucket and a short model length (one decode table width): fewer shapes, the same kinds.
    with Engine(model, small_config(batch_buckets=(1, 4), prefill_buckets=(64,), max_model_len=128)) as engine:
        engine.warmup(sampling=False, structured=True)
        compiled, gathers = engine.stats()["compilations"], engine_module._gather_rows._cache_size()
        params = [SamplingParams(max_tokens=10, temperature=0, structured_outputs=s)
                  for s in ({"json": SCHEMA}, None, {"choice": ["yes", "no"]})]
        engine.generate(["import os", "x = ", "y = "], params, use_tqdm=False)
        engine.generate(["import os"], params[0], use_tqdm=False)
        assert engine.stats()["compilations"] == compiled
        assert engine_module._gather_rows._cache_size() == gathers
        assert_all_pages_free(engine)


@pytest.mark.parametrize("pool", ["roomy", "tight", "tight_with_schema"])
def test_random_constrained_workload_never_loses_a_request(pool, monkeypatch):
    """Constrained and unconstrained requests arrive between steps, share prefixes, get aborted and overflow a
    small pool (preemption, chained calls): every one finishes with a valid reason, its text within its
    constraint (and its allowed_token_ids), seeded ones as the same requests give in a roomy engine, and no page
    stays allocated. "tight": the guide pool holds two to four of the small guides, so guides leave it, come back
    and move (the gaps too small), and some calls' guides do not fit together (masks from the host); with the
    schema, whose guide never fits, most calls take masks from the host between device-followed ones."""
    import jaxserve.engine as engine_module
    from jaxserve.guide_pool import extent

    model = jaxserve.load()
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    specs = [None, {"regex": r"[a-z]{2,5}(?:, [a-z]{2,5}){0,3}\."}, {"choice": ["left", "right", "up"]},
             {"json": SCHEMA}, None, {"regex": "[0-9]{1,4}(?:px|em)"}, {"grammar": 'root ::= "v" [0-9] ("." [0-9])?'}]
    letters = _char_ids(model, "abcdefghijklmnopqrstuvwxyz ,.")
    if pool == "tight":
        specs = [s for s in specs if s != {"json": SCHEMA}] + [{"regex": "[a-c]{3}"}, {"choice": ["yes!", "no!"]},
                                                                {"regex": "x[0-9]{2}"}]
    if pool != "roomy":
        with Engine(model, small_config()) as probe:
            guides = [probe.structured_guide(SamplingParams(structured_outputs=s).structured_outputs) for s in specs if s]
            small = sorted(extent(g) for g in guides if g.dfa.sink < 100)
            rows = -(-(2 + small[-1] + small[0]) // 8) * 8  # the largest small guide and one of the smallest
            monkeypatch.setattr(engine_module, "DEVICE_GUIDE_BYTES", rows * probe.guide_pool.row_bytes)
    prefixes = ["import os\nimport sys\n\n", "class Config:\n    def __init__(self):\n"]

    def new_request():
        spec = specs[rng.integers(len(specs))]
        prompt = prefixes[rng.integers(2)] + "xyz"[: rng.integers(0, 4)]
        allowed = letters if spec == specs[1] and rng.random() < 0.5 else None
        return prompt, SamplingParams(max_tokens=int(rng.integers(4, 40)), temperature=float(rng.choice([0.0, 0.9])),
                                      seed=int(rng.integers(1 << 20)), structured_outputs=spec,
                                      allowed_token_ids=allowed)

    with Engine(model, small_config(num_pages=12, prefix_caching=True)) as engine:
        added, aborted = drive_random_workload(engine, rng, new_request, requests=16, arrival_rate=0.7,
                                               abort_rate=0.04, seed=seed)
        results = {rid: engine.release(rid).result() for rid in added}
        assert_all_pages_free(engine)
    kept = [rid for rid in added if rid not in aborted]
    for rid in kept:
        (_, params), r = added[rid], results[rid]
        assert r["finish_reason"] in ("stop", "length"), f"{rid}: {r}, seed={seed}"
        spec = params.structured_outputs
        if spec is not None and r["finish_reason"] == "stop":
            assert re.fullmatch(spec.to_regex(), r["text"]), f"{rid}: {r['text']!r}, seed={seed}"
        if params.allowed_token_ids is not None:
            assert set(r["token_ids"]) <= set(letters), f"{rid}: {r['token_ids']}, seed={seed}"
    with Engine(model, small_config()) as roomy:
        again = roomy.generate([added[rid][0] for rid in kept], [added[rid][1] for rid in kept], use_tqdm=False)
        assert_all_pages_free(roomy)
    for rid, out in zip(kept, again):
        assert out["token_ids"] == results[rid]["token_ids"], f"{rid} differs from a roomy engine's, seed={seed}"
