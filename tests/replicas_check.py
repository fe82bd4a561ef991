"""Data-parallel replicas on two CPU devices (run by tests/test_replicas.py in a process of its own, since
the device count is fixed when JAX starts): the same greedy tokens as one engine, requests spread over both
replicas, a shared prefix routed to the replica that caches it (an adapter's by its own pages), each replica's
arrays on its own device, aborts, every page free on both at the end, and the server over both."""

from __future__ import annotations

import dataclasses
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxserve  # noqa: E402
from jaxserve import Engine, EngineConfig, Replicas, SamplingParams  # noqa: E402


def config() -> EngineConfig:
    return EngineConfig(num_pages=96, page_size=8, max_running=4, max_tokens_per_step=64, decode_steps=4,
                        batch_buckets=(4,), prefill_buckets=(16, 64))


def all_pages_free(engine: Engine) -> None:
    engine.clear_prefix_cache()
    stats = engine.stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0, stats


def main() -> None:
    assert len(jax.devices()) == 2, jax.devices()
    model = jaxserve.load()
    rng = np.random.default_rng()
    prompts = ["import os", "def f(x):", "class A:", "x = [", "for i in", "# a comment", "while True:", "y = 3"]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    with Engine(model, config()) as one:
        alone = [o["token_ids"] for o in one.generate(prompts, greedy, use_tqdm=False)]
        embeddings_alone = [o["embedding"] for o in one.embed(prompts, use_tqdm=False)]
    with Replicas(model, config(), devices=2, balance_slack=2) as dp:
        # Each replica's weights and KV pool live on its own device.
        for engine, device in zip(dp.engines, jax.devices()):
            leaves = jax.tree_util.tree_leaves((engine.runner.params, engine.runner.kv))
            assert {d for leaf in leaves for d in leaf.devices()} == {device}
        ids = [dp.add_request(p, greedy) for p in prompts]
        routed = [dp.replica_of(i) for i in ids]
        assert sorted(set(routed)) == [0, 1] and abs(routed.count(0) - routed.count(1)) <= 1, routed
        finished = {}
        while dp.has_unfinished():
            for r in dp.step():
                if r.finish_reason is not None:
                    finished[r.request_id] = r
        outs = [dp.release(i).result() for i in ids]
        assert [o["token_ids"] for o in outs] == alone
        assert dp.stats()["routed"] == [0, 0]
        # Embeddings are routed and run as the engines' own (jaxserve.pooling).
        embedded = [o["embedding"] for o in dp.embed(prompts, use_tqdm=False)]
        for got, want in zip(embedded, embeddings_alone):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

        # A long shared prefix goes where it was first sent, and is served from that replica's cache.
        header = "import os\nimport sys\nimport json\n\ndef load(path):\n    with open(path) as f:\n"
        first = dp.add_request(header + "        return f.read()", greedy)
        home = dp.replica_of(first)
        while dp.has_unfinished():
            dp.step()
        dp.release(first)
        followers = [dp.add_request(header + tail, greedy) for tail in ("        x = 1", "        pass")]
        assert [dp.replica_of(f) for f in followers] == [home, home]
        while dp.has_unfinished():
            dp.step()
        results = [dp.release(f).result() for f in followers]
        assert all(r["cached_tokens"] > 0 for r in results), results

        # A replica past balance_slack more requests than the other gets no more of its prefix: load wins.
        crowd = [dp.add_request(header + f"        z = {k}", SamplingParams(max_tokens=4, temperature=0))
                 for k in range(8)]
        spread = [dp.replica_of(c) for c in crowd]
        assert spread[:4] == [home, home, home, 1 - home], spread  # loads 0, 1, 2 there, then 3 > 0 + 2
        victim = crowd[int(rng.integers(len(crowd)))]
        assert dp.abort(victim)
        dp.generate(["z = 1"], greedy, use_tqdm=False)  # generate beside queued requests
        while dp.has_unfinished():
            dp.step()
        reasons = {c: dp.release(c).result()["finish_reason"] for c in crowd}
        assert reasons[victim] == "abort" and all(v in ("stop", "length") for c, v in reasons.items() if c != victim)
        assert dp.stats()["routed"] == [0, 0]
        for engine in dp.engines:
            all_pages_free(engine)
    # A replica whose step raises: only its requests are the failed step's to end; the other's run on.
    with Replicas(model, config(), devices=2, balance_slack=0) as dp:
        ids = [dp.add_request(p, greedy) for p in prompts[:4]]
        broken = dp.engines[1]
        real_step = broken.step

        def failing():
            broken.step = real_step
            raise RuntimeError("injected")

        dp.step()  # both replicas admit and prefill theirs; replica 1's next step raises
        broken.step = failing
        try:
            while dp.has_unfinished():
                dp.step()
            raise AssertionError("the injected failure never came")
        except RuntimeError as exc:
            assert str(exc) == "injected"
        touched = dp.failed_step_requests()
        assert touched and {dp.replica_of(r.request_id) for r in touched} == {1}, touched
        for r in touched:
            dp.abort_after_failure(r)
        while dp.has_unfinished():
            dp.step()
        results = {i: dp.release(i).result() for i in ids}
        ended = {r.request_id for r in touched}
        for i in ids:
            assert (results[i]["finish_reason"] == "abort") == (i in ended), results[i]
        assert len(ended) < len(ids)  # replica 0's requests finished as usual
        for engine in dp.engines:
            all_pages_free(engine)
    outs = jaxserve.generate(model, prompts[:3], greedy, engine_config=config(), use_tqdm=False, data_parallel_size=2)
    assert [o["token_ids"] for o in outs] == alone[:3]
    chats = [[{"role": "user", "content": p}] for p in prompts[:2]]
    with Engine(model, config()) as one:
        expect = [o["token_ids"] for o in one.chat(chats, greedy, use_tqdm=False)]
    outs = jaxserve.chat(model, chats, greedy, engine_config=config(), use_tqdm=False, data_parallel_size=2)
    assert [o["token_ids"] for o in outs] == expect
    beams = jaxserve.BeamSearchParams(beam_width=2, max_tokens=4)
    with Engine(model, config()) as one:
        expect = one.beam_search(prompts[:2], beams, use_tqdm=False)
    outs = jaxserve.beam_search(model, prompts[:2], beams, engine_config=config(), use_tqdm=False,
                                data_parallel_size=2)
    assert [[s["token_ids"] for s in o["sequences"]] for o in outs] == [
        [s["token_ids"] for s in o["sequences"]] for o in expect]
    adapters(model)
    serve(model, prompts, alone)
    print("replicas: ok")


def adapters(model) -> None:
    """An adapter's prompt is routed by its own cached pages, not by the base model's of the same text (the prefix
    index keeps them apart), and gives what one engine gives with that adapter."""
    import tempfile
    from types import SimpleNamespace

    from jaxserve.lora import PROJECTION_PARTS, _in_out
    from tests.test_lora import make_adapter

    dims = _in_out(model.config)  # make_adapter reads a transformers model's layer shapes: these stand in for it
    layer = {group: SimpleNamespace(**{p: SimpleNamespace(in_features=dims[p][0], out_features=dims[p][1])
                                       for g, parts in PROJECTION_PARTS.values() if g == group for p in parts})
             for group in ("self_attn", "mlp")}
    path = tempfile.mkdtemp()
    make_adapter(path, SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(**layer)]
                                                             * model.config.num_hidden_layers)), r=2, std=0.05)
    lora = jaxserve.LoRARequest("a", 1, path)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    header = "import os\nimport sys\nimport json\n\ndef load(path):\n    with open(path) as f:\n"
    with Engine(model, dataclasses.replace(config(), max_loras=1)) as one:
        expect = one.generate([header + "        x = 2"], greedy, use_tqdm=False, lora_request=lora)[0]["token_ids"]
    with Replicas(model, dataclasses.replace(config(), max_loras=1), devices=2, balance_slack=2) as dp:
        base = dp.add_request(header + "        x = 1", greedy)  # left queued: its replica is the busier one
        tuned = dp.add_request(header + "        x = 2", greedy, lora_request=lora)
        assert dp.replica_of(tuned) != dp.replica_of(base)  # the base pages would not serve it
        again = dp.add_request(header + "        x = 3", greedy, lora_request=lora)
        assert dp.replica_of(again) == dp.replica_of(tuned)
        while dp.has_unfinished():
            dp.step()
        assert dp.release(tuned).result()["token_ids"] == expect
        assert dp.release(again).result()["cached_tokens"] > 0
        dp.release(base)
        for engine in dp.engines:
            all_pages_free(engine)


def serve(model, prompts, alone) -> None:
    """The server over two replicas: greedy answers as one engine's, a structured output, metrics, the cache."""
    import concurrent.futures
    import re

    from fastapi.testclient import TestClient

    from jaxserve.server import ServerConfig, create_app

    app = create_app(model, config(), ServerConfig(model_name="tiny", data_parallel_size=2))
    with TestClient(app) as client:
        def complete(prompt: str) -> dict:
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = [c["text"] for c in pool.map(complete, prompts)]
        assert texts == [model.tokenizer.decode(ids) for ids in alone], texts
        dp = app.state.jaxserve.engine.engine
        assert isinstance(dp, Replicas) and all(e.stats()["generated_tokens"] > 0 for e in dp.engines)
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x = ", "max_tokens": 8,
                                                 "temperature": 0, "guided_regex": "[0-9]{3}"})
        assert r.status_code == 200 and re.fullmatch("[0-9]{3}", r.json()["choices"][0]["text"]), r.text
        assert client.get("/metrics").status_code == 200 and client.post("/flush_cache").status_code == 200
        for engine in dp.engines:
            all_pages_free(engine)


if __name__ == "__main__":
    main()
