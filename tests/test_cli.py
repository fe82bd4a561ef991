"""The ``jaxserve`` command, called in-process through ``cli.main``."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from jaxserve import cli, load

SMALL = ["--max-running", "2", "--num-pages", "32", "--max-tokens-per-step", "32"]


@pytest.mark.parametrize("command", [[], ["generate"], ["serve"], ["convert"], ["bench"]])
def test_help_works_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: jaxserve" in capsys.readouterr().out


def test_generate_json_lines_from_arguments_and_file(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n\n" + "Hello world\n")
    rc = cli.main(["generate", "The quick brown fox", "--file", str(prompts), "--model", path, "--json",
                   "--max-tokens", "4", *SMALL])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["The quick brown fox", "def add(a, b):", "Hello world"]
    assert all(line["completion_tokens"] == 4 and line["finish_reason"] == "length" for line in lines)
    greedy = jax.tree_util.tree_leaves([line["token_ids"] for line in lines])
    assert all(isinstance(t, int) for t in greedy)
    # --top-k reaches the sampler: top-k 1 at temperature 0.9 is the greedy output.
    rc = cli.main(["generate", "The quick brown fox", "--model", path, "--json", "--max-tokens", "4",
                   "--temperature", "0.9", "--top-k", "1", "--min-p", "0.05", *SMALL])
    assert rc == 0 and json.loads(capsys.readouterr().out)["token_ids"] == lines[0]["token_ids"]


def test_generate_flags_left_unset_take_the_checkpoints_generation_config(tiny_checkpoint, tmp_path, capsys):
    import shutil

    path = str(tmp_path / "model")
    shutil.copytree(tiny_checkpoint[0], path)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"max_new_tokens": 3, "temperature": 0.0}, f)
    assert cli.main(["generate", "The quick brown fox", "--model", path, "--json", *SMALL]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] == 3
    assert cli.main(["generate", "The quick brown fox", "--model", path, "--json", "--max-tokens", "2", *SMALL]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] == 2


def test_rope_scaling_flag_overrides_the_checkpoints(tiny_checkpoint, capsys):
    """--rope-scaling (vLLM's --hf-overrides rope_scaling) reaches the model; bad values stop with the field named."""
    yarn = '{"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}'
    rc = cli.main(["generate", "The quick brown fox", "--model", tiny_checkpoint[0], "--json", "--max-tokens", "2",
                   "--rope-scaling", yarn, *SMALL])
    assert rc == 0 and json.loads(capsys.readouterr().out)["completion_tokens"] == 2
    assert load(tiny_checkpoint[0], rope_scaling=json.loads(yarn)).config.context_length == 512
    assert load(tiny_checkpoint[0], rope_scaling={"rope_type": "default"}).config.rope_scaling is None
    with pytest.raises(SystemExit, match="--rope-scaling is not JSON"):
        cli.main(["generate", "x", "--model", tiny_checkpoint[0], "--rope-scaling", "{yarn"])
    assert cli.main(["generate", "x", "--model", tiny_checkpoint[0], "--rope-scaling", '{"type": "dynamic"}']) == 2
    assert "not supported" in capsys.readouterr().err


def test_generate_n_prints_each_sample(tiny_checkpoint, capsys):
    args = ["generate", "The quick brown fox", "--model", tiny_checkpoint[0], "--max-tokens", "3", "-n", "3",
            "--temperature", "1", "--seed", "5", *SMALL]
    assert cli.main(args) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("--- ")] == [
        f"--- The quick brown fox [sample {i}]" for i in range(3)]
    assert cli.main(args + ["--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert [o["completion_tokens"] for o in json.loads(line)["outputs"]] == [3, 3, 3]
    with pytest.raises(SystemExit, match="n must be"):
        cli.main(["generate", "x", "--model", tiny_checkpoint[0], "-n", "0"])


def test_generate_text_streams_prompt_and_completion(tiny_checkpoint, capsys):
    rc = cli.main(["generate", "The quick brown fox", "--model", tiny_checkpoint[0], "--max-tokens", "4", *SMALL])
    assert rc == 0
    assert capsys.readouterr().out.startswith("The quick brown fox")


def test_generate_reports_bad_arguments(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit, match="top_p must be in"):
        cli.main(["generate", "x", "--model", tiny_checkpoint[0], "--top-p", "1.5"])
    with pytest.raises(SystemExit, match="top_k must be"):
        cli.main(["generate", "x", "--model", tiny_checkpoint[0], "--top-k", "-2"])
    with pytest.raises(SystemExit, match="min_p must be in"):
        cli.main(["generate", "x", "--model", tiny_checkpoint[0], "--min-p", "2"])
    assert cli.main(["generate", "x", "--model", "/no/such/folder"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_generate_holds_the_output_to_a_schema_regex_or_choices(tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
    for flags, check in ((["--json-schema", str(schema)], lambda t: isinstance(json.loads(t)["n"], int)),
                         (["--json-schema", schema.read_text()], lambda t: isinstance(json.loads(t)["n"], int)),
                         (["--regex", "[0-9]{3}"], lambda t: re.fullmatch("[0-9]{3}", t)),
                         (["--choice", "yes", "--choice", "no"], lambda t: t in ("yes", "no")),
                         (["--grammar", 'root ::= "v" [0-9] "." [0-9]'], lambda t: re.fullmatch(r"v[0-9]\.[0-9]", t))):
        assert cli.main(["generate", "x = ", "--json", "--max-tokens", "24", *flags, *SMALL]) == 0
        line = json.loads(capsys.readouterr().out)
        assert line["finish_reason"] == "stop" and check(line["text"]), (flags, line)
    with pytest.raises(SystemExit, match="at most one"):
        cli.main(["generate", "x", "--regex", "a", "--json-object"])
    # --bad-word, with speculation on (the engine flags reach generate too): "0" and "1" never come out.
    assert cli.main(["generate", "x = ", "--json", "--max-tokens", "6", "--regex", "[0-3]{6}", "--bad-word", "0",
                     "--bad-word", "1", "--speculative-tokens", "2", *SMALL]) == 0
    assert set(json.loads(capsys.readouterr().out)["text"]) <= set("23")
    with pytest.raises(SystemExit, match="structured_outputs.json"):
        cli.main(["generate", "x", "--json-schema", "{not json"])


def test_convert_writes_a_loadable_checkpoint(tiny_checkpoint, tmp_path):
    src, dst = tiny_checkpoint[0], str(tmp_path / "converted")
    assert cli.main(["convert", src, dst]) == 0
    a, b = load(src), load(dst)
    assert a.config == b.config
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert b.tokenizer.encode("Hello") == a.tokenizer.encode("Hello")


def _parse_serve(flags: list[str]):
    return cli.build_parser().parse_args(["serve", *flags])


def test_engine_flags_reach_the_engine_config():
    args = _parse_serve(["--max-running", "4", "--batch-buckets", "1", "4", "--prefill-buckets", "64", "512",
                         "--max-tokens-per-step", "512", "--memory-fraction", "0.5", "--no-overlap",
                         "--attention-impl", "reference", "--decode-steps", "8", "--policy", "mixed",
                         "--scheduling-policy", "priority"])
    cfg = cli.engine_config_from_args(args)
    assert (cfg.batch_buckets, cfg.prefill_buckets) == ((1, 4), (64, 512))
    assert (cfg.memory_fraction, cfg.overlap, cfg.attention_impl) == (0.5, False, "reference")
    assert (cfg.decode_steps, cfg.policy, cfg.scheduling_policy) == (8, "mixed", "priority")
    assert cli.engine_config_from_args(_parse_serve([])).scheduling_policy == "fcfs"
    with pytest.raises(ValueError, match="prefill bucket"):
        cli.engine_config_from_args(_parse_serve(["--prefill-buckets", "64", "--max-tokens-per-step", "512"]))


def test_vllm_serve_command_lines_work_as_they_are(monkeypatch):
    """A `vllm serve` command line with jaxserve's name: vLLM's spellings of the engine flags, its positional model,
    its speculative config and the flags whose behaviour jaxserve has anyway."""
    args = _parse_serve(["/models/qwq", "--max-num-seqs", "32", "--max-num-batched-tokens", "4096",
                         "--gpu-memory-utilization", "0.9", "--block-size", "32", "--no-enable-prefix-caching",
                         "--enable-lora", "-tp", "2", "--quantization", "fp8", "--speculative-config",
                         '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5, '
                         '"disable_by_batch_size": 8}',
                         "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--trust-remote-code",
                         "--reasoning-parser", "deepseek_r1", "--kv-cache-dtype", "fp8"])
    cfg = cli.engine_config_from_args(args)
    assert cfg.kv_cache_dtype == "fp8" and cfg.kv_dtype() == "float8_e4m3fn"
    assert (cfg.max_running, cfg.max_tokens_per_step, cfg.memory_fraction, cfg.page_size) == (32, 4096, 0.9, 32)
    assert (cfg.prefix_caching, cfg.max_loras, cfg.tensor_parallel_size, cfg.quantization) == (False, 1, 2, "fp8")
    assert (cfg.speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min,
            cfg.speculative_disable_by_batch_size) == (3, 5, 1, 8)
    assert args.model_tag == "/models/qwq" and args.reasoning_parser == "deepseek_r1"
    assert cli.engine_config_from_args(_parse_serve(["--enable-prefix-caching"])).prefix_caching
    for bad in ('{"method": "eagle"}', '{"num_speculative_tokens": 2, "draft_model": "x"}', "{"):
        with pytest.raises(SystemExit, match="speculative-config"):
            cli.engine_config_from_args(_parse_serve(["--speculative-config", bad]))
    # The positional model is --model; two different ones are refused before anything loads.
    seen = {}
    monkeypatch.setattr("jaxserve.server.serve", lambda model, *a, **k: seen.setdefault("model", model))
    assert cli.cmd_serve(_parse_serve(["/models/a", "--num-pages", "16"])) == 0 and seen["model"] == "/models/a"
    with pytest.raises(SystemExit, match="two models given"):
        cli.cmd_serve(_parse_serve(["/models/a", "--model", "/models/b"]))


def test_more_vllm_serve_flags(monkeypatch):
    """vLLM's chunked prefill is the mixed policy, its CORS / root path / TLS / log flags reach the server, and the
    flags of machinery jaxserve has no need of (CUDA graphs, swap space, a second process) are taken as they are;
    values jaxserve cannot honour are refused by argparse."""
    args = _parse_serve(["/models/q", "--enable-chunked-prefill", "--dtype", "auto", "--enforce-eager",
                         "--disable-log-requests", "--disable-log-stats", "--swap-space", "4", "--kv-cache-dtype",
                         "auto", "--pipeline-parallel-size", "1", "--generation-config", "auto",
                         "--allowed-origins", '["https://a.example"]', "--allow-credentials", "--root-path", "/api",
                         "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem", "--uvicorn-log-level", "warning",
                         "--seed", "3", "--max-cpu-loras", "8", "--lora-dtype", "auto"])
    cfg = cli.engine_config_from_args(args)
    assert (cfg.policy, cfg.dtype, cfg.seed) == ("mixed", "auto", 3)
    seen = {}
    monkeypatch.setattr("jaxserve.server.serve", lambda model, e, s, **kw: seen.update(server=s, **kw))
    assert cli.cmd_serve(args) == 0
    server = seen["server"]
    assert (server.allowed_origins, server.allowed_methods, server.allow_credentials) == (("https://a.example",),
                                                                                          ("*",), True)
    assert (server.root_path, server.ssl_keyfile, server.ssl_certfile, seen["log_level"]) == ("/api", "k.pem",
                                                                                              "c.pem", "warning")
    with pytest.raises(SystemExit, match="is --policy mixed"):
        cli.engine_config_from_args(_parse_serve(["--enable-chunked-prefill", "--policy", "time_share"]))
    with pytest.raises(SystemExit, match="JSON list of strings"):
        cli.cmd_serve(_parse_serve(["--allowed-origins", '"*"']))
    for bad in (["--kv-cache-dtype", "int8"], ["--pipeline-parallel-size", "2"], ["--dtype", "float16"],
                ["--lora-dtype", "float32"]):
        with pytest.raises(SystemExit):
            _parse_serve(bad)


def test_vllm_serve_flags_checked_against_what_jaxserve_serves(tiny_checkpoint, tmp_path, monkeypatch):
    """vLLM's --max-logprobs, --enable-log-requests, --tokenizer, --stream-interval reach the server; --task /
    --runner, --hf-overrides and --structured-outputs-config are taken where they say what jaxserve does and refused,
    naming the flag, where they do not; --enable-sleep-mode is taken (the sleep routes are always served)."""
    path = tiny_checkpoint[0]
    seen = {}
    monkeypatch.setattr("jaxserve.server.serve", lambda model, e, s, **kw: seen.update(model=model, server=s))
    args = _parse_serve([path, "--max-logprobs", "5", "--enable-log-requests", "--tokenizer", path,
                         "--stream-interval", "4", "--task", "generate", "--runner", "generate",
                         "--enable-sleep-mode", "--hf-overrides", "{}",
                         "--structured-outputs-config", '{"backend": "auto", "disable_fallback": true}'])
    assert cli.cmd_serve(args) == 0
    server = seen["server"]
    assert (server.max_logprobs, server.log_requests, server.tokenizer, server.stream_interval) == (5, True, path, 4)
    assert server.max_tokens_limit is None  # vLLM's: only the context bounds max_tokens
    # The engine's own process: unset (None) the server decides (a process for a folder), or forced either way.
    assert server.engine_process is None
    for flag, value in (("--engine-process", True), ("--no-engine-process", False)):
        assert cli.cmd_serve(_parse_serve([path, flag])) == 0 and seen["server"].engine_process is value
    assert not _parse_serve(["--enable-log-requests", "--disable-log-requests"]).log_requests
    for flags in (["--task", "embed"], ["--task", "embedding"], ["--task", "score"], ["--runner", "pooling"],
                  ["--structured-outputs-config", '{"backend": "jaxserve"}'], ["--hf-overrides", ""],
                  ["--hf-overrides", '{"rope_scaling": null}']):
        assert cli.cmd_serve(_parse_serve([path, *flags])) == 0, flags
    assert seen["model"] == path  # rope_scaling null: the checkpoint's own (no override loaded), not the text "null"
    # A classifier's config: it classifies and never generates.
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    config = json.loads(open(f"{path}/config.json").read())
    config.update(architectures=["Qwen2ForSequenceClassification"], id2label={"0": "neg", "1": "pos"})
    (classifier / "config.json").write_text(json.dumps(config))
    assert cli.cmd_serve(_parse_serve([str(classifier), "--task", "classify", "--runner", "pooling"])) == 0
    refused = [([path, "--max-logprobs", "21"], "--max-logprobs 21"),
               ([path, "--max-logprobs", "-1"], "--max-logprobs"),
               ([path, "--task", "classify"], "--task classify"),
               ([path, "--task", "embed", "--runner", "generate"], "--task embed is not of --runner generate"),
               ([str(classifier), "--task", "generate"], "--task generate"),
               ([str(classifier), "--runner", "generate"], "--runner generate"),
               ([str(classifier), "--task", "score"], "--task score"),
               ([path, "--hf-overrides", '{"architectures": ["X"]}'], "--hf-overrides"),
               ([path, "--hf-overrides", "[1]"], "--hf-overrides"),
               ([path, "--structured-outputs-config", '{"backend": "xgrammar"}'], "--structured-outputs-config"),
               ([path, "--structured-outputs-config", '{"disable_any_whitespace": true}'],
                "--structured-outputs-config"),
               ([path, "--stream-interval", "0"], "--stream-interval"),
               ([path, "--engine-process", "--rope-scaling", '{"rope_type": "dynamic", "factor": 2.0}'],
                "--rope-scaling")]
    for flags, message in refused:
        with pytest.raises(SystemExit, match=re.escape(message)):
            cli.cmd_serve(_parse_serve(flags))
    for flags in (["--task", "reward"], ["--runner", "draft"]):
        with pytest.raises(SystemExit):
            _parse_serve(flags)
    # --hf-overrides' rope_scaling is --rope-scaling's.
    scaling = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}
    args = _parse_serve([path, "--hf-overrides", json.dumps({"rope_scaling": scaling})])
    cli.engine_config_from_args(args)
    assert json.loads(args.rope_scaling) == scaling


def test_a_hugging_face_repo_id_loads_from_the_local_cache(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`jaxserve generate --model org/name` (as vLLM takes models) reads the snapshot in the Hugging Face cache, named
    by the id; an id that is not cached is an error saying so (nothing is downloaded)."""
    import shutil

    import huggingface_hub.constants

    from jaxserve.loading import load, resolve_model_path

    repo = tmp_path / "hub" / "models--acme--tiny-qwen"
    shutil.copytree(tiny_checkpoint[0], repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # "acme/tiny-qwen" is no folder here
    folder, name = resolve_model_path("acme/tiny-qwen")
    assert folder.endswith("0123abc") and name == "acme/tiny-qwen"
    assert load("acme/tiny-qwen").name == "acme/tiny-qwen"
    assert cli.main(["generate", "The quick", "--model", "acme/tiny-qwen", "--max-tokens", "2"]) == 0
    assert cli.main(["generate", "x", "--model", "acme/not-cached"]) == 2
    assert "nor a Hugging Face repo in the local cache" in capsys.readouterr().err
