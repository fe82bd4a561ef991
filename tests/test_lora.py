"""LoRA adapters (vLLM's ``LoRARequest``): a PEFT folder's adapter gives what transformers gives with the adapter merged
into its weights (greedy tokens and log-probabilities), rows of several adapters and of the base model share a
batch and a decode call and each gives what it gives alone, more adapters than slots wait for a slot, prefixes are
cached per adapter, every page and slot is free at the end, and bad adapters are refused by name."""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import jaxserve
from jaxserve import Engine, LoRARequest, SamplingParams
from jaxserve.lora import PART_GROUPS, TARGETS, fold_columns, load_adapter, lora_delta, peft_prefix, per_layer
from tests.test_engine import assert_all_pages_free, hf_greedy, random_prompts, small_config

def make_adapter(path: str, hf, *, r: int = 4, alpha: float = 8.0, targets=TARGETS, seed: int = 0,
                 rslora: bool = False, std: float = 0.3) -> None:
    """Save a random PEFT LoRA adapter for ``hf`` in ``path`` (PEFT's file layout, written by hand: PEFT is not a
    dependency). bench/lora.py makes its adapters here too."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for i, layer in enumerate(hf.model.layers):
        for t in targets:
            lin = getattr(getattr(layer, PART_GROUPS[t]), t)
            prefix = peft_prefix(i, t)
            tensors[f"{prefix}.lora_A.weight"] = (rng.normal(size=(r, lin.in_features)) * std).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.normal(size=(lin.out_features, r)) * std).astype(np.float32)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
                   "bias": "none", "use_rslora": rslora, "task_type": "CAUSAL_LM"}, f)


def merged(hf, path: str):
    """A copy of ``hf`` with the adapter in ``path`` merged into its weights, in ``hf``'s dtype: W + scale * B @ A
    (PEFT's merge)."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    out = copy.deepcopy(hf)
    with torch.no_grad():
        for i, layer in enumerate(out.model.layers):
            for t in cfg["target_modules"]:
                prefix = peft_prefix(i, t)
                delta = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
                getattr(getattr(layer, PART_GROUPS[t]), t).weight.add_(torch.from_numpy(delta * scale))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    path, hf = tiny_checkpoint
    root = tmp_path_factory.mktemp("loras")
    make_adapter(str(root / "all"), hf, seed=1)
    make_adapter(str(root / "attn"), hf, r=8, alpha=4.0, targets=("q_proj", "v_proj", "o_proj"), seed=2, rslora=True)
    make_adapter(str(root / "mlp"), hf, r=2, targets=("gate_proj", "down_proj"), seed=3)
    return jaxserve.load(path), hf, {name: str(root / name) for name in ("all", "attn", "mlp")}


def test_lora_delta_is_each_rows_own_adapter():
    rng = np.random.default_rng()
    a, b = rng.normal(size=(3, 4, 6)).astype(np.float32), rng.normal(size=(3, 4, 5)).astype(np.float32)
    x = rng.normal(size=(4, 2, 6)).astype(np.float32)
    slots = np.array([2, -1, 0, 2])
    got = np.asarray(lora_delta(x, a, b, slots))
    for i, s in enumerate(slots):
        want = np.zeros((2, 5)) if s < 0 else x[i] @ a[s].T @ b[s]
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_slots_keep_the_stacks_as_the_folded_terms_read_them(adapters):
    # LoraSlots(folded=True) (model.LORA_FOLD on Mosaic GPU): every slot write also writes its rows of each layer's
    # [T, in] shrink and its columns of the [out, T] expand, so they always equal fold_columns of the slots' own
    # stacks, reloads included.
    import jax.numpy as jnp

    from jaxserve.lora import LoraSlots

    model, _, paths = adapters
    slots = LoraSlots(model.config, max_loras=2, max_rank=8, dtype=jnp.bfloat16, folded=True)
    assert LoraSlots(model.config, max_loras=2, max_rank=8, dtype=jnp.bfloat16).folded is None

    def check():
        for p, (as_, bs) in slots.weights.items():
            assert len(slots.folded[p][0]) == len(slots.folded[p][1]) == len(bs)
            for a, b, got in zip(as_, bs, zip(*slots.folded[p])):
                for want, have in zip(fold_columns(a, b), got):
                    assert have.shape == want.shape and have.dtype == jnp.bfloat16
                    np.testing.assert_array_equal(np.asarray(have, np.float32), np.asarray(want, np.float32))

    for i, (name, path) in enumerate(paths.items()):
        slots.register(LoRARequest(name, i + 1, path))
    held = [slots.acquire(1), slots.acquire(2)]
    check()
    assert all(np.abs(np.asarray(x[0], np.float32)).max() > 0 for x in slots.folded["o_proj"])
    slots.release(held[0])
    assert slots.acquire(3) == held[0]  # the third adapter into the first's slot
    check()
    assert set(slots.inputs(np.array([0, -1]))) == {"weights", "slots", "folded"}


def test_adapters_match_transformers_with_the_adapter_merged(adapters):
    model, hf, paths = adapters
    prompts = random_prompts(model.config.vocab_size, [3, 9, 17])
    with Engine(model, small_config(max_loras=2)) as engine:
        for name, path in paths.items():
            lora = LoRARequest(name, list(paths).index(name) + 1, path)
            ref = merged(hf, path)
            outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0),
                                   use_tqdm=False, lora_request=lora)
            for p, o in zip(prompts, outs):
                want = hf_greedy(ref, p, 8)
                assert o["token_ids"] == want, name
                with torch.no_grad():
                    lp = torch.log_softmax(ref(torch.tensor([p + want])).logits[0].double(), -1)
                hf_lps = [lp[len(p) - 1 + j, t].item() for j, t in enumerate(want)]
                np.testing.assert_allclose(o["logprobs"], hf_lps, rtol=1e-4, atol=1e-4)
            assert outs != engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                   logprobs=0), use_tqdm=False)  # it changed them
        assert_all_pages_free(engine)
        assert engine.lora.held == [0, 0]
        stats = engine.stats()
        assert (stats["lora_slots"], stats["lora_adapters_loaded"], stats["lora_slots_held"]) == (2, 2, 0)


def test_mixed_batches_equal_each_row_alone_and_more_adapters_than_slots_wait(adapters):
    model, _, paths = adapters
    loras = [None] + [LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(paths.items())]
    prompts = random_prompts(model.config.vocab_size, [5, 12, 7, 20, 3, 9, 14, 6])
    which = [loras[i % 4] for i in range(len(prompts))]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    with Engine(model, small_config(max_loras=2, max_running=4)) as engine:
        alone = [engine.generate([p], greedy, use_tqdm=False, lora_request=lo)[0]["token_ids"]
                 for p, lo in zip(prompts, which)]
        engine.clear_prefix_cache()
        # Three adapters over two slots, four rows a decode call: rows wait for a slot while others run.
        together = engine.generate(prompts, greedy, use_tqdm=False, lora_request=which)
        assert [o["token_ids"] for o in together] == alone
        assert_all_pages_free(engine)
        assert engine.lora.held == [0, 0]


def test_prefixes_are_cached_per_adapter(adapters):
    model, _, paths = adapters
    prompt = random_prompts(model.config.vocab_size, [40])[0]
    a, b = LoRARequest("all", 1, paths["all"]), LoRARequest("mlp", 3, paths["mlp"])
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with Engine(model, small_config(max_loras=2)) as engine:
        first = engine.generate([prompt], greedy, use_tqdm=False, lora_request=a)[0]
        again = engine.generate([prompt], greedy, use_tqdm=False, lora_request=a)[0]
        other = engine.generate([prompt], greedy, use_tqdm=False, lora_request=b)[0]
        base = engine.generate([prompt], greedy, use_tqdm=False)[0]
        assert first["cached_tokens"] == 0 and again["cached_tokens"] == 32
        assert other["cached_tokens"] == 0 and base["cached_tokens"] == 0
        assert again["token_ids"] == first["token_ids"]
        # A cache salt keeps adapters apart too: the same salt under another adapter shares nothing.
        salted = {"prompt_token_ids": prompt, "cache_salt": "s"}
        runs = [engine.generate([salted], greedy, use_tqdm=False, lora_request=lora)[0] for lora in (a, b, a)]
        assert [r["cached_tokens"] for r in runs] == [0, 0, 32] and runs[0]["token_ids"] == first["token_ids"]
        assert_all_pages_free(engine)


def test_one_call_api_and_per_prompt_lists(adapters, tiny_checkpoint):
    model, hf, paths = adapters
    prompt = random_prompts(model.config.vocab_size, [6])[0]
    lora = LoRARequest("all", 1, paths["all"])
    outs = jaxserve.generate(tiny_checkpoint[0], [prompt, prompt], SamplingParams(max_tokens=6, temperature=0,
                                                                                  ignore_eos=True),
                             use_tqdm=False, lora_request=[lora, None])
    assert outs[0]["token_ids"] == hf_greedy(merged(hf, paths["all"]), prompt, 6)
    assert outs[1]["token_ids"] == hf_greedy(hf, prompt, 6)


def test_bad_adapters_and_requests_are_refused_by_name(adapters, tmp_path):
    model, hf, paths = adapters
    with pytest.raises(ValueError, match="^lora_int_id must be"):
        LoRARequest("x", 0, paths["all"])
    with pytest.raises(ValueError, match="^lora_path must name"):
        LoRARequest("x", 1)
    assert LoRARequest("x", 1, paths["all"], lora_local_path="/elsewhere").lora_path == paths["all"]  # vLLM's
    # vLLM's older keyword and its note of the base model
    assert LoRARequest("x", 1, lora_local_path=paths["all"], base_model_name="Qwen/Qwen2.5-0.5B").lora_path == \
        paths["all"]
    with Engine(model, small_config()) as engine:
        with pytest.raises(ValueError, match="max_loras"):
            engine.add_request([5, 6], lora_request=LoRARequest("all", 1, paths["all"]))
    with Engine(model, small_config(max_loras=1, max_lora_rank=4)) as engine:
        with pytest.raises(ValueError, match="no adapter_config.json"):
            engine.add_request([5, 6], lora_request=LoRARequest("none", 9, str(tmp_path)))
        with pytest.raises(ValueError, match="rank r must be"):
            engine.add_request([5, 6], lora_request=LoRARequest("attn", 2, paths["attn"]))  # r 8 > 4
        engine.add_request([5, 6], SamplingParams(max_tokens=2), lora_request=LoRARequest("all", 1, paths["all"]))
        with pytest.raises(ValueError, match="lora_int_id 1 is already"):
            engine.add_request([5, 6], lora_request=LoRARequest("mlp", 1, paths["mlp"]))
        with pytest.raises(ValueError, match="lora_request must be"):
            engine.add_request([5, 6], lora_request="all")
        while engine.has_unfinished():
            engine.step()
        assert_all_pages_free(engine)
    bad = tmp_path / "embed"
    make_adapter(str(bad), hf, targets=("q_proj",))
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "embed_tokens"]}))
    with pytest.raises(ValueError, match="target_modules \\['embed_tokens'\\] are not supported"):
        load_adapter(str(bad), model.config, 16)


def test_server_serves_adapters_by_model_name(adapters, tiny_checkpoint):
    """vLLM's --lora-modules: /v1/models lists each adapter (its parent the model), a request whose model is an
    adapter's name runs with it (transformers with it merged gives the same greedy tokens), an unknown name is 404."""
    import httpx

    from jaxserve.server import ServerConfig, create_app
    from tests.test_server import LiveServer

    model, hf, paths = adapters
    prompt = random_prompts(model.config.vocab_size, [7])[0]
    app = create_app(model, small_config(), ServerConfig(model_name="tiny", lora_modules={"sql": paths["all"]}))
    with LiveServer(app) as live:
        cards = httpx.get(live.url + "/v1/models").json()["data"]
        assert [(c["id"], c["parent"]) for c in cards] == [("tiny", None), ("sql", "tiny")]
        by_name = {}
        for name, ref in (("sql", merged(hf, paths["all"])), ("tiny", hf)):
            r = httpx.post(live.url + "/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 6,
                                                             "temperature": 0, "ignore_eos": True, "logprobs": 0,
                                                             "return_tokens_as_token_ids": True}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name
            tokens = by_name[name] = r.json()["choices"][0]["logprobs"]["tokens"]
            assert [int(t.removeprefix("token_id:")) for t in tokens] == hf_greedy(ref, prompt, 6)
        # SGLang's /generate names the adapter by lora_path: its name, or its folder.
        for lora_path in ("sql", paths["all"]):
            greedy = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
            r = httpx.post(live.url + "/generate", json={"input_ids": prompt, "lora_path": lora_path,
                                                         "sampling_params": greedy}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == [int(t.removeprefix("token_id:")) for t in by_name["sql"]]
        r = httpx.post(live.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert "jaxserve_lora_adapters_loaded 1.0" in httpx.get(live.url + "/metrics").text
    with pytest.raises(ValueError, match="lora_modules must have distinct"):
        ServerConfig(model_name="tiny", lora_modules={"tiny": paths["all"]})


def test_half_batch_decode_chains_give_each_half_its_rows_adapters(adapters, monkeypatch):
    from jaxserve import runner

    model, _, paths = adapters
    loras = [None, LoRARequest("all", 1, paths["all"]), LoRARequest("mlp", 3, paths["mlp"]), None]
    prompts = random_prompts(model.config.vocab_size, [5, 9, 4, 11])
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with Engine(model, small_config(max_loras=2)) as engine:
        alone = [engine.generate([p], greedy, use_tqdm=False, lora_request=lo)[0]["token_ids"]
                 for p, lo in zip(prompts, loras)]
    monkeypatch.setattr(runner, "HALF_BATCH_ROWS", 2)  # every even batch decodes as two half-batch chains
    with Engine(model, small_config(max_loras=2)) as engine:
        assert [o["token_ids"] for o in engine.generate(prompts, greedy, use_tqdm=False, lora_request=loras)] == alone


def test_cli_generate_with_an_adapter(adapters, tiny_checkpoint, capsys):
    from jaxserve import cli
    from tests.test_cli import SMALL

    model, hf, paths = adapters
    args = ["generate", "The quick brown fox", "--model", tiny_checkpoint[0], "--json", "--max-tokens", "5",
            "--temperature", "0", *SMALL]
    assert cli.main(args + ["--lora", paths["all"]]) == 0
    got = json.loads(capsys.readouterr().out)["token_ids"]
    ids = model.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    assert got and got == hf_greedy(merged(hf, paths["all"]), ids, 5)[: len(got)]
    with pytest.raises(SystemExit, match="no adapter_config.json"):
        cli.main(args + ["--lora", os.path.dirname(paths["all"])])


def test_warmup_compiles_the_adapter_variants(adapters):
    model, _, paths = adapters
    cfg = small_config(max_loras=2, batch_buckets=(1, 4), prefill_buckets=(16, 64))
    with Engine(model, cfg) as engine:
        plain = engine.warmup(sampling=False, lora=False)
        assert engine.warmup(sampling=False) == plain  # the adapter variants: each shape once more
        shapes = set(engine.runner.compiled_shapes)
        prompts = random_prompts(model.config.vocab_size, [5, 12, 30])
        engine.generate(prompts, SamplingParams(max_tokens=9, temperature=0, ignore_eos=True), use_tqdm=False,
                        lora_request=[None, LoRARequest("all", 1, paths["all"]), LoRARequest("mlp", 3, paths["mlp"])])
        assert set(engine.runner.compiled_shapes) == shapes
        assert_all_pages_free(engine)
    with Engine(model, small_config()) as engine, pytest.raises(ValueError, match="max_loras"):
        engine.warmup(lora=True)


def test_adapter_rows_run_padded_where_the_model_pads_their_calls(adapters, monkeypatch):
    # model.decode_rows' ``adapters`` (GPU only: a one-row call with adapter rows pads to 8 rows, onto the accumulating
    # glue that adds their terms inside its projections, where a base row keeps the one-row path). A stand-in pads
    # only adapter calls of 1-3 rows to 4 here: an adapter row alone decodes at 4 rows, a base row alone at 1; pages
    # free (padding rows' tokens: the mixed-batch tests above). Where a GPU would split long tables, such a call runs
    # shapes no base call takes (its live rows' attention): warm-up compiles those with the adapters' inputs.
    from jaxserve import engine as engine_module
    from tests.test_engine import gpu_like_tuning, record_decode_calls

    model, _, paths = adapters
    lora = LoRARequest("all", 1, paths["all"])
    prompt = random_prompts(model.config.vocab_size, [7])
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    monkeypatch.setattr(engine_module, "decode_rows",
                        lambda n, cfg, dtype, impl="pallas", adapters=False: 4 if adapters and n < 4 else n)
    cfg = small_config(max_loras=2, batch_buckets=(1, 4), prefill_buckets=(16,), max_tokens_per_step=16)
    with monkeypatch.context() as m:  # a GPU's splits: long tables make live-rows shapes only adapter calls take
        m.setattr(engine_module, "_decode_tuning", gpu_like_tuning)
        with Engine(model, small_config(max_loras=2, batch_buckets=(1, 4), attention_impl="pallas")) as engine:
            for rows, limit in itertools.product((1, 2, 3), (8, 32, 200)):
                assert engine.decode_shape(rows, limit) in engine._decode_shapes
                assert engine.decode_shape(rows, limit, adapters=True) in (  # warm-up compiles them all
                    set(engine._decode_shapes) | set(engine._adapter_decode_shapes))
            assert engine.decode_shape(1, 200, adapters=True) in engine._adapter_decode_shapes
    with Engine(model, cfg) as engine:
        assert (engine.decode_batch(1), engine.decode_batch(1, adapters=True)) == (1, 4)
        calls = record_decode_calls(engine)
        outs = {}
        for lo, batch in ((None, 1), (lora, 4)):
            calls.clear()
            outs[lo] = engine.generate(prompt, greedy, use_tqdm=False, lora_request=lo)[0]["token_ids"]
            assert calls and {b for b, _ in calls} == {batch}, (lo, calls)
        assert outs[None] != outs[lora] and len(outs[lora]) == 6
        assert_all_pages_free(engine)


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_server_loads_and_unloads_adapters_at_runtime(adapters, tiny_checkpoint, engine_process, tmp_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING): off by default
    (404); on, an adapter loaded under a name serves requests naming it, a bad folder or a taken name is 400, an
    unloaded name is 404 again. The same with the engine in its own process (the adapters cross the pipe)."""
    import httpx

    from jaxserve.server import ServerConfig, create_app
    from tests.test_server import LiveServer

    model, hf, paths = adapters
    prompt = random_prompts(model.config.vocab_size, [7])[0]
    body = {"model": "mlp", "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}
    if not engine_process:
        with LiveServer(create_app(model, small_config(), ServerConfig(model_name="tiny"))) as live:
            r = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": "mlp", "lora_path": paths["mlp"]})
            assert r.status_code == 404
    app = create_app(tiny_checkpoint[0] if engine_process else model, small_config(),
                     ServerConfig(model_name="tiny", allow_runtime_lora_updating=True, engine_process=engine_process))
    with LiveServer(app) as live:
        post = lambda path, json: httpx.post(live.url + path, json=json, timeout=60)
        assert post("/v1/completions", body).status_code == 404
        r = post("/v1/load_lora_adapter", {"lora_name": "mlp", "lora_path": paths["mlp"]})
        assert r.status_code == 200, r.text
        r = post("/v1/completions", body)
        assert r.status_code == 200, r.text
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        assert [int(t.removeprefix("token_id:")) for t in tokens] == hf_greedy(merged(hf, paths["mlp"]), prompt, 5)
        assert [c["id"] for c in httpx.get(live.url + "/v1/models").json()["data"]] == ["tiny", "mlp"]
        assert post("/v1/load_lora_adapter", {"lora_name": "mlp", "lora_path": paths["all"]}).status_code == 400
        r = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "/no/such/folder"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        # A folder whose weights file is not safetensors: a 400 naming the path, as vLLM's (was a 500).
        corrupt = tmp_path / "corrupt"
        corrupt.mkdir()
        shutil.copy(os.path.join(paths["mlp"], "adapter_config.json"), corrupt)
        (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        r = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(corrupt)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
        assert post("/v1/unload_lora_adapter", {"lora_name": "mlp"}).status_code == 200
        assert post("/v1/completions", body).status_code == 404
        assert post("/v1/unload_lora_adapter", {"lora_name": "mlp"}).status_code == 404
        # The name back with another folder (its id too): its own weights and its own cached prefixes.
        assert post("/v1/load_lora_adapter", {"lora_name": "mlp", "lora_path": paths["all"]}).status_code == 200
        tokens = post("/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"]
        assert [int(t.removeprefix("token_id:")) for t in tokens] == hf_greedy(merged(hf, paths["all"]), prompt, 5)


def test_concurrent_loads_of_one_name_register_one_adapter(adapters):
    """Loads of one name at once: one succeeds, the others are 400 (the name is taken), and the engine holds the one
    adapter, which the unload frees. Each load had passed the name check before any registered: all answered
    success, and the engine kept adapters that no name served and no unload could free."""
    import asyncio

    import httpx

    from jaxserve.server import ServerConfig, create_app
    from tests.test_server import LiveServer

    model, _, paths = adapters
    app = create_app(model, small_config(), ServerConfig(model_name="tiny", allow_runtime_lora_updating=True))
    with LiveServer(app) as live:
        async def loads():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/load_lora_adapter", json={
                    "lora_name": "x", "lora_path": paths["mlp"]}) for _ in range(4)))

        codes = sorted(r.status_code for r in asyncio.run(loads()))
        assert codes == [200, 400, 400, 400], codes
        slots = app.state.jaxserve.engine.engine.lora
        assert len(slots.requests) == 1 and len(slots.host) == 1, slots.requests
        assert httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
        assert not slots.requests and not slots.host


def test_chat_with_an_adapter(adapters, tiny_checkpoint):
    model, hf, paths = adapters
    lora = LoRARequest("all", 1, paths["all"])
    chat = [{"role": "user", "content": "The quick brown fox"}]
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    (out,) = jaxserve.chat(tiny_checkpoint[0], [chat], greedy, use_tqdm=False, lora_request=lora)
    ids = model.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert out["token_ids"] == hf_greedy(merged(hf, paths["all"]), list(ids), 5)


def test_adapters_under_speculative_decoding_and_structured_outputs(adapters):
    """The verify call and the guided decode call carry the rows' adapters too: speculation keeps an adapter row's
    greedy text, and a constrained adapter row matches its constraint."""
    model, _, paths = adapters
    lora = LoRARequest("all", 1, paths["all"])
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with Engine(model, small_config(max_loras=1)) as plain, \
            Engine(model, small_config(max_loras=1, speculative_tokens=4)) as engine:
        # A draft needs the text's last token to have come before: random prompts of 80 tokens over a vocabulary
        # of 320 give one within a few tries.
        for _ in range(8):
            prompts = [b * 2 for b in random_prompts(model.config.vocab_size, [40, 40])]
            want = [o["token_ids"] for o in plain.generate(prompts, greedy, use_tqdm=False, lora_request=lora)]
            got = engine.generate(prompts, greedy, use_tqdm=False, lora_request=lora)
            assert [o["token_ids"] for o in got] == want
            if engine.stats()["spec_verify_calls"]:
                break
        assert engine.stats()["spec_verify_calls"] > 0
        out = engine.generate(["The quick"], SamplingParams(max_tokens=8, structured_outputs={"regex": "[0-9]{3}"}),
                              use_tqdm=False, lora_request=lora)[0]
        assert out["text"].isdigit() and len(out["text"]) == 3
        assert_all_pages_free(engine)


def test_preempted_adapter_rows_resume_on_their_adapter(adapters):
    """A pool too small for the batch preempts rows; each comes back (recomputed) with its own adapter, perhaps in
    another slot, and ends as it would alone."""
    model, _, paths = adapters
    loras = [LoRARequest("all", 1, paths["all"]), LoRARequest("attn", 2, paths["attn"]),
             LoRARequest("mlp", 3, paths["mlp"]), None]
    prompts = random_prompts(model.config.vocab_size, [20, 18, 22, 19])
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with Engine(model, small_config(max_loras=2)) as engine:
        alone = [engine.generate([p], greedy, use_tqdm=False, lora_request=lo)[0]["token_ids"]
                 for p, lo in zip(prompts, loras)]
    with Engine(model, small_config(max_loras=3, num_pages=14, prefix_caching=False)) as engine:
        outs = engine.generate(prompts, greedy, use_tqdm=False, lora_request=loras)
        assert engine.stats()["preemptions"] > 0
        assert [o["token_ids"] for o in outs] == alone
        assert engine.lora.held == [0, 0, 0]
        assert_all_pages_free(engine)


def test_async_engine_streams_and_runs_adapter_requests(adapters):
    """vLLM's AsyncLLM.generate takes a lora_request: AsyncEngine's stream and generate_async do too."""
    import asyncio

    from jaxserve.async_engine import AsyncEngine

    model, _, paths = adapters
    lora = LoRARequest("all", 1, paths["all"])
    [prompt] = random_prompts(model.config.vocab_size, [12])
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with Engine(model, small_config(max_loras=1)) as engine:
        want = engine.generate([prompt], greedy, use_tqdm=False, lora_request=lora)[0]["token_ids"]
        base = engine.generate([prompt], greedy, use_tqdm=False)[0]["token_ids"]
    assert want != base

    async def run():
        engine = AsyncEngine(Engine(model, small_config(max_loras=1)))
        try:
            whole = await engine.generate_async(prompt, greedy, lora_request=lora)
            streamed = [t async for chunk in engine.stream(prompt, greedy, lora_request=lora)
                        for t in chunk["token_ids"]]
            return whole["token_ids"], streamed
        finally:
            await engine.shutdown()

    whole, streamed = asyncio.run(run())
    assert whole == streamed == want


def test_an_unloaded_adapter_s_queued_requests_finish_with_it_and_its_id_can_name_another(adapters):
    """vLLM's unload drops a name, not the requests made with it: a request queued behind a full batch when its
    adapter was forgotten, and one preempted after, finish with that adapter's weights (a KeyError in `step` had
    failed the whole batch and leaked sequence slots), even once the same id names another folder; then the
    forgotten adapter's host copy and slot are freed."""
    model, _, paths = adapters
    prompts = random_prompts(model.config.vocab_size, [20, 18, 22, 19, 21])
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    first, second = LoRARequest("all", 1, paths["all"]), LoRARequest("mlp", 1, paths["mlp"])
    with Engine(model, small_config(max_loras=2)) as engine:
        want = [engine.generate([p], greedy, use_tqdm=False, lora_request=first)[0]["token_ids"] for p in prompts]
        engine.forget_lora(1)
        want_second = engine.generate([prompts[0]], greedy, use_tqdm=False, lora_request=second)[0]["token_ids"]
    assert want_second != want[0]
    with Engine(model, small_config(max_loras=2, num_pages=14, prefix_caching=False)) as engine:
        ids = [engine.add_request(p, greedy, lora_request=first) for p in prompts]  # 4 run, 1 waits
        engine.step()
        engine.forget_lora(1)
        engine.register_lora(second)
        ids.append(engine.add_request(prompts[0], greedy, lora_request=second))
        while engine.has_unfinished():
            engine.step()
        outs = [engine.requests[i].result()["token_ids"] for i in ids]
        assert engine.stats()["preemptions"] > 0
        assert outs == want + [want_second]
        assert engine.lora.held == [0, 0] and len(engine.scheduler.free_slots) == 4
        engine.forget_lora(1)
        assert engine.lora.host == {} and engine.lora.slot_of == {}
        assert_all_pages_free(engine)


@pytest.mark.parametrize("glue,kernels,fold", [(True, False, False), (True, True, False), (False, True, False),
                                               (False, False, True), (False, False, "mgpu"), (True, False, "mgpu"),
                                               (True, False, "mgpu_xla_shrink")])
def test_adapter_rows_on_the_accumulating_glue_give_the_float32_models_logits(monkeypatch, glue, kernels, fold):
    # model.LORA_GLUE: a bf16 decode step of 8 rows (some on each of two adapters, some on none) takes the accumulating
    # glue with the adapters' terms added into its float32 accumulators (off: the plain path, no accumulating
    # product); its logits are the float32 model's (a whole bf16 step's tolerance, STEP_TOLERANCE_BF16; 0.6-1.9% in
    # 100 seeds). The adapters move the logits far more than that, and base rows keep the base model's.
    # `kernels` (model.LORA_KERNELS): the terms by jaxserve_kernels.lora_matmul's launches, gate_up's with SwiGLU;
    # without `glue`, on the plain path. `fold` (model.LORA_FOLD_TRITON): on the plain path, each term inside its
    # projection's skinny_matmul after one shrink launch (four a layer), gate_up's before its SwiGLU; "mgpu": with the
    # folded stacks kept (`LoraSlots(folded=True)`), each term as the Mosaic GPU projection's extra K
    # steps after XLA's masked shrink (on the glue too: into its accumulating products, QKV's and gate_up's shrinks
    # made by the norm kernels before them, model.LORA_NORM_SHRINK, o_proj's by the fused attention,
    # model.LORA_ATTENTION_SHRINK, down_proj's by its own kernel into an accumulator with its expand left to the next
    # norm, model.LORA_DOWN_SHRINK; "mgpu_xla_shrink": those off, XLA's; the opt-in one-launch shrink,
    # model.LORA_SHRINK_MAX_K, is checked by its kernel and lowering tests).
    import jax
    import jax.numpy as jnp

    from jaxserve import model as model_module
    from tests.test_kernels import STEP_TOLERANCE_BF16, TOLERANCE, fresh_rng, relative_error
    from tests.test_skinny_matmul_mgpu import _count_mgpu_calls, _tiny_bf16_decode_step

    rng, seed = fresh_rng()
    batch, n, r = 8, 2, 4
    cfg, run = _tiny_bf16_decode_step(rng, batch)
    h, kvh, d, hidden, inter = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                                cfg.intermediate_size)
    dims = {"qkv_proj": (hidden, (h + 2 * kvh) * d), "o_proj": (h * d, hidden), "gate_up_proj": (hidden, 2 * inter),
            "down_proj": (inter, hidden)}
    layers = cfg.num_hidden_layers

    def weights(shape):
        return jnp.asarray(rng.normal(size=shape) * 0.15, jnp.bfloat16)

    slots = rng.permutation([0, 0, 0, 1, 1, 1, -1, -1])
    lora = {"weights": {p: (per_layer(weights((layers, n, r, i))), per_layer(weights((layers, n, r, o))))
                        for p, (i, o) in dims.items()}, "slots": jnp.asarray(slots, jnp.int32)}  # `LoraSlots`' form
    mgpu = fold in ("mgpu", "mgpu_xla_shrink")
    if mgpu:
        lora["folded"] = {p: tuple(zip(*(fold_columns(a, b) for a, b in zip(*ab))))
                          for p, ab in lora["weights"].items()}
    epilogues = _count_mgpu_calls(monkeypatch, lambda a, k: k.get("epilogue"))
    terms = _count_mgpu_calls(monkeypatch, lambda a, k: k.get("term") is not None)
    leaves = _count_mgpu_calls(monkeypatch, lambda a, k: k.get("shrink") is not None)
    monkeypatch.setattr(model_module, "LORA_GLUE", False)
    jax.eval_shape(lambda: run(lora=lora))  # traced only: which route
    assert epilogues and "accumulate" not in epilogues, epilogues
    monkeypatch.setattr(model_module, "LORA_GLUE", glue)
    monkeypatch.setattr(model_module, "LORA_KERNELS", kernels)
    monkeypatch.setattr(model_module, "LORA_FOLD", bool(fold))
    monkeypatch.setattr(model_module, "LORA_FOLD_TRITON", fold is True)
    monkeypatch.setattr(model_module, "LORA_NORM_SHRINK", fold == "mgpu")
    monkeypatch.setattr(model_module, "LORA_ATTENTION_SHRINK", fold == "mgpu")
    monkeypatch.setattr(model_module, "LORA_DOWN_SHRINK", fold == "mgpu")
    da = importlib.import_module("jaxserve_kernels.decode_attention")
    attention_shrinks = []  # a call each: whether it was asked for o_proj's shrink and made it

    def attention(*a, _f=da.fused_decode_attention, **k):
        out = _f(*a, **k)
        attention_shrinks.append(k.get("shrink") is not None and out[3] is not None)
        return out

    monkeypatch.setattr(da, "fused_decode_attention", attention)
    rn = importlib.import_module("jaxserve_kernels.residual_norm")
    norm_shrinks, norm_pending = [], []
    monkeypatch.setattr(rn, "add_rms_norm", lambda *a, _f=rn.add_rms_norm, **k: norm_shrinks.append(
        k.get("shrink") is not None) or norm_pending.append(k.get("pending") is not None) or _f(*a, **k))
    sm = importlib.import_module("jaxserve_kernels.skinny_matmul")  # the package exports a function of that name
    shrinks = []
    monkeypatch.setattr(sm, "lora_shrink", lambda *a, _f=sm.lora_shrink, **k: shrinks.append(1) or _f(*a, **k))
    own = []
    monkeypatch.setattr(sm, "skinny_matmul",
                        lambda *a, _f=sm.skinny_matmul, **k: own.append("own_slot" in k) or _f(*a, **k))
    epilogues.clear()
    terms.clear()
    leaves.clear()
    step = jax.jit(lambda: run(lora=lora))
    calls = set(re.findall(r"\blora_(?:add|swiglu)\b", str(jax.make_jaxpr(lambda: run(lora=lora))())))
    assert calls == ({"lora_add", "lora_swiglu"} if kernels else set()), calls
    assert len(shrinks) == (4 * layers if fold is True else 0), len(shrinks)
    logits = np.asarray(step()[:, 0], np.float32)
    assert ("accumulate" in epilogues) == glue, epilogues
    assert fold is not True or not epilogues, epilogues  # folded: every projection on Triton's skinny_matmul
    # "mgpu": every projection on Mosaic GPU with its term (and only then a term), but on the glue's folded route
    # down_proj, which makes its shrink instead and leaves its expand to the next norm (the last one's to XLA) (four
    # projections a layer, once a trace)
    down_left = glue and fold == "mgpu"
    assert (terms and len(terms) % (4 * layers) == 0 and 4 * sum(terms) == (3 if down_left else 4) * len(terms)
            if mgpu else not any(terms)), terms
    assert sum(leaves) % layers == 0 and bool(sum(leaves)) == down_left, leaves
    assert sum(norm_pending) % (layers - 1) == 0 and bool(sum(norm_pending)) == down_left, norm_pending
    assert not any(own), own  # XLA's shrink: the one-launch form is opt-in
    # the norms' shrinks: QKV's and gate_up's, two a layer, on the glue's folded route only (once a trace)
    assert sum(norm_shrinks) % (2 * layers) == 0 and bool(sum(norm_shrinks)) == (glue and fold == "mgpu"), \
        norm_shrinks
    # ... and o_proj's by the attention, one a layer
    assert sum(attention_shrinks) % layers == 0 and bool(sum(attention_shrinks)) == (glue and fold == "mgpu"), \
        attention_shrinks
    exact = np.asarray(jax.jit(lambda: run(lora=lora, reference=True))()[:, 0])
    base = np.asarray(jax.jit(lambda: run(reference=True))()[:, 0])
    assert not np.isnan(logits).any()
    assert relative_error(logits, exact) <= STEP_TOLERANCE_BF16, f"seed={seed}"
    mine, others = slots >= 0, slots < 0
    assert relative_error(logits[others], base[others]) <= STEP_TOLERANCE_BF16, f"seed={seed}"
    assert relative_error(logits[mine], base[mine]) > 10 * TOLERANCE[jnp.bfloat16], f"seed={seed}"
