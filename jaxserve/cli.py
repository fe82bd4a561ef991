"""The ``jaxserve`` command: ``generate``, ``serve``, ``convert`` and ``bench``.

Owns argument parsing and turning arguments into ``EngineConfig``/``ServerConfig``/
``SamplingParams``. It never implements serving or generation itself: ``generate`` drives an
``Engine``, ``serve`` calls ``server.serve`` (imported only then, so the server's optional
dependencies are not needed to generate), ``convert`` calls ``weights.save_converted``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

from jaxserve.engine_config import ATTENTION_IMPLS, DTYPES, KV_CACHE_DTYPES, POLICIES, SCHEDULING_POLICIES
from jaxserve.pooling import POOLING_TYPES
from jaxserve.quantization import QUANTIZATIONS
from jaxserve.sampling import MAX_LOGPROBS

# CPU defaults keep the first run quick (few pages to allocate, few batch shapes to compile);
# on an accelerator the pool is sized from free memory instead.
CPU_NUM_PAGES = 256
CPU_MAX_RUNNING = 8
CPU_MAX_TOKENS_PER_STEP = 512


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint folder (Hugging Face or converted); default: the embedded default model")
    g.add_argument("--rope-scaling", default=None, metavar="JSON",
                   help="replaces config.json's rope_scaling, e.g. the Qwen2.5 cards' YaRN past 32k: "
                        "'{\"type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}'")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default auto: bfloat16 on an accelerator, float32 on the CPU)")
    g.add_argument("--num-pages", type=int, default=None,
                   help=f"KV pages in the pool (default: from free accelerator memory; {CPU_NUM_PAGES} on the CPU)")
    g.add_argument("--page-size", "--block-size", type=int, default=16,
                   help="tokens per KV page, a power of two (default 16)")
    g.add_argument("--max-running", "--max-num-seqs", type=int, default=None,
                   help=f"sequences decoded together (default 64; {CPU_MAX_RUNNING} on the CPU)")
    g.add_argument("--max-tokens-per-step", "--max-num-batched-tokens", type=int, default=None,
                   help=f"prefill token budget per step (default 2048; {CPU_MAX_TOKENS_PER_STEP} on the CPU)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion (default: the model's context length, "
                        "max_position_embeddings times a RoPE scaling factor where config.json sets one)")
    g.add_argument("--policy", choices=POLICIES, default=None,
                   help="how prefill and decode steps share the device (default prefill_first)")
    g.add_argument("--enable-chunked-prefill", action="store_true",
                   help="vLLM's chunked prefill: --policy mixed (decodes and chunks of prompts in one step)")
    g.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                   help="admission and preemption order: arrival (fcfs, the default) or each request's priority "
                        "(lower first; vLLM's)")
    g.add_argument("--decode-steps", type=int, default=8, help="decode steps per device call (default 8)")
    g.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="n-gram speculative decoding (vLLM's ngram method): greedy rows draft up to K tokens from "
                        "their own text and one call verifies them (default 0: off)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="vLLM's: '{\"method\": \"ngram\", \"num_speculative_tokens\": K, \"prompt_lookup_max\": N, "
                        "\"prompt_lookup_min\": M, \"disable_by_batch_size\": B}' (sets the four flags here)")
    g.add_argument("--prompt-lookup-max", type=int, default=4, metavar="N",
                   help="longest n-gram a draft is looked up by (default 4)")
    g.add_argument("--prompt-lookup-min", type=int, default=1, metavar="N",
                   help="shortest n-gram a draft is looked up by (default 1)")
    g.add_argument("--speculative-disable-by-batch-size", type=int, default=0, metavar="N",
                   help="no speculation while N or more rows decode (vLLM's disable_by_batch_size; default 0: none)")
    g.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", action="store_true",
                   help="turn the radix prefix cache off")
    g.add_argument("--enable-prefix-caching", action="store_false", dest="no_prefix_caching",
                   help="the radix prefix cache (on by default)")
    g.add_argument("--batch-buckets", type=int, nargs="+", default=None, metavar="N",
                   help="batch sizes steps are padded to, ascending (default: powers of two up to --max-running)")
    g.add_argument("--prefill-buckets", type=int, nargs="+", default=None, metavar="N",
                   help="prefill chunk lengths steps are padded to, ascending, the last >= --max-tokens-per-step")
    g.add_argument("--memory-fraction", "--gpu-memory-utilization", type=float, default=0.6,
                   help="share of free accelerator memory for KV pages when --num-pages is not given (default 0.6)")
    g.add_argument("--no-overlap", action="store_true",
                   help="read each decode or prefill call's tokens before starting the next (default: overlap them)")
    g.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto",
                   help="paged attention: Pallas kernels, their jnp references, or auto (Pallas on a GPU)")
    g.add_argument("--max-loras", type=int, default=None, metavar="N",
                   help="LoRA adapters held on the device at once (default 0: none; serve: as many as --lora-modules, "
                        "up to 8)")
    g.add_argument("--max-lora-rank", type=int, default=16, metavar="R", help="largest adapter rank (default 16)")
    g.add_argument("--enable-lora", action="store_true",
                   help="serve adapters (vLLM's; implied by --max-loras or --lora-modules): at least one slot")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model by attention head over N devices of this host (default 1)")
    g.add_argument("--quantization", "-q", choices=(*QUANTIZATIONS, *CHECKPOINT_SCHEMES), default=None,
                   help="fp8: hold the layers' projection weights as fp8 with a scale per output channel; "
                        f"{', '.join(CHECKPOINT_SCHEMES)}: vLLM's names for a checkpoint's own scheme, which loads "
                        "as it is anyway (checked against its config.json) (default: none)")
    g.add_argument("--kv-cache-dtype", choices=tuple(KV_CACHE_DTYPES), default="auto",
                   help="KV pages' dtype (vLLM's): auto (the compute dtype) or fp8 / fp8_e4m3 / fp8_e5m2, half the "
                        "bytes a page (twice the tokens in the same memory), values saturated, scale 1")
    g.add_argument("--compile-cache-dir", default=os.environ.get("JAXSERVE_COMPILE_CACHE_DIR"), metavar="PATH",
                   help="keep compiled steps here so a restart skips most of the warm-up "
                        "(default: $JAXSERVE_COMPILE_CACHE_DIR, else off)")


# vLLM's --quantization names for the scheme a checkpoint was quantized with ahead, and what `ModelConfig.quantization`
# says of such a checkpoint: jaxserve reads each from config.json with no flag, so the flag is checked, not applied
# (a `vllm serve Qwen/Qwen2.5-7B-Instruct-AWQ -q awq` line works as it is).
CHECKPOINT_SCHEMES = {"awq": "awq", "awq_marlin": "awq", "gptq": "gptq", "gptq_marlin": "gptq",
                      "compressed-tensors": "fp8", "fbgemm_fp8": "fp8"}


def _checkpoint_scheme(args: argparse.Namespace) -> None:
    """``--quantization`` naming a checkpoint's own scheme: refused unless the checkpoint holds it."""
    scheme = CHECKPOINT_SCHEMES.get(args.quantization)
    if scheme is None:
        return
    from jaxserve.config import ModelConfig
    from jaxserve.loading import resolve_model_path

    model = getattr(args, "model", None)
    held = ModelConfig.from_pretrained(resolve_model_path(model)[0]).quantization if model else None
    if held != scheme:
        raise SystemExit(f"error: --quantization {args.quantization}: the checkpoint {model or '(embedded default)'} "
                         f"holds {held or 'no quantized weights'}")


# vLLM's --task and --runner values jaxserve takes (any other is refused by argparse or `_check_task`).
TASKS = ("auto", "generate", "embed", "embedding", "classify", "score")
RUNNERS = ("auto", "generate", "pooling")


def _check_task(args: argparse.Namespace) -> None:
    """``--task`` / ``--runner`` checked against the checkpoint: a causal LM generates, embeds and scores (its
    embeddings' cosines); a sequence classifier classifies, embeds and, with one label, scores, and never generates."""
    task, runner = args.task, args.runner
    if task == "auto" and runner == "auto":
        return
    if runner == "generate" and task not in ("auto", "generate") or runner == "pooling" and task == "generate":
        raise SystemExit(f"error: --task {task} is not of --runner {runner}")
    from jaxserve.config import ModelConfig
    from jaxserve.loading import resolve_model_path

    labels = ModelConfig.from_pretrained(resolve_model_path(args.model)[0]).labels
    kind = f"a sequence classifier of {len(labels)} labels" if labels else "a causal LM"
    model = args.model or "(embedded default)"
    if labels and "generate" in (task, runner):
        raise SystemExit(f"error: --{'task' if task == 'generate' else 'runner'} generate: the checkpoint {model} is "
                         f"{kind} (no language-model head); it classifies and embeds (--task classify or embed)")
    if task == "classify" and not labels:
        raise SystemExit(f"error: --task classify: the checkpoint {model} is {kind}, not a "
                         f"Qwen2ForSequenceClassification; it generates, embeds and scores (--task generate, embed or "
                         f"score)")
    if task == "score" and len(labels) > 1:
        raise SystemExit(f"error: --task score: the checkpoint {model} is {kind}; scores need an embedding model or "
                         f"a classifier of one label (a cross-encoder)")


def _json_object_flag(value: str | None, flag: str) -> dict | None:
    """A flag's JSON object (vLLM's config flags), None where the flag is absent or blank; anything else stops the
    start naming the flag."""
    if value is None or not value.strip():
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise SystemExit(f"error: {flag} is not JSON: {exc}")
    if not isinstance(parsed, dict):
        raise SystemExit(f"error: {flag} must be a JSON object, got {value!r}")
    return parsed


def _hf_overrides(args: argparse.Namespace) -> None:
    """vLLM's ``--hf-overrides`` JSON: nothing, or ``rope_scaling`` (onto ``--rope-scaling``); any other key of
    config.json is refused, naming the flag (jaxserve reads its architecture from the checkpoint alone)."""
    overrides = _json_object_flag(getattr(args, "hf_overrides", None), "--hf-overrides")
    if overrides is None:
        return
    unknown = sorted(set(overrides) - {"rope_scaling"})
    if unknown:
        raise SystemExit(f"error: --hf-overrides: jaxserve overrides no config.json key but rope_scaling (as "
                         f"--rope-scaling), got {unknown}")
    if "rope_scaling" in overrides:
        if args.rope_scaling is not None and json.loads(args.rope_scaling) != overrides["rope_scaling"]:
            raise SystemExit("error: --hf-overrides' rope_scaling and --rope-scaling differ")
        # null: the checkpoint's own (no --rope-scaling), not the JSON text "null"
        args.rope_scaling = None if overrides["rope_scaling"] is None else json.dumps(overrides["rope_scaling"])


# vLLM's --structured-outputs-config backends jaxserve answers to: "auto" (vLLM's default) and its own.
STRUCTURED_BACKENDS = ("auto", "jaxserve")


def _structured_outputs_config(args: argparse.Namespace) -> None:
    """vLLM's ``--structured-outputs-config`` JSON, checked: the backend "auto" or jaxserve's own (the one here), the
    switches that hold already; anything that would change the output is refused, naming the flag."""
    config = _json_object_flag(getattr(args, "structured_outputs_config", None), "--structured-outputs-config")
    if config is None:
        return
    backend = config.pop("backend", "auto")
    if backend not in STRUCTURED_BACKENDS:
        raise SystemExit(f"error: --structured-outputs-config: backend {backend!r} is not served; jaxserve compiles "
                         f"constraints with its own (backend one of {list(STRUCTURED_BACKENDS)})")
    # No fallback backend to turn off, and object keys never go beyond a schema's properties here.
    for flag in ("disable_fallback", "disable_additional_properties"):
        if not isinstance(config.pop(flag, False), bool):
            raise SystemExit(f"error: --structured-outputs-config: {flag} must be true or false")
    if config:
        raise SystemExit(f"error: --structured-outputs-config: keys jaxserve does not take {sorted(config)} (a "
                         f"request's structured_outputs.disable_any_whitespace is per request)")


def _policy(args: argparse.Namespace) -> str:
    if args.enable_chunked_prefill and args.policy not in (None, "mixed"):
        raise SystemExit(f"error: --enable-chunked-prefill is --policy mixed, not {args.policy!r}")
    return args.policy or ("mixed" if args.enable_chunked_prefill else "prefill_first")


def engine_config_from_args(args: argparse.Namespace) -> "Any":
    """An ``EngineConfig`` from the engine arguments, with small defaults on the CPU."""
    import jax

    from jaxserve.engine_config import EngineConfig

    cpu = jax.default_backend() == "cpu"
    _speculative_config(args)
    _hf_overrides(args)
    _checkpoint_scheme(args)
    max_running = args.max_running or (CPU_MAX_RUNNING if cpu else 64)
    per_step = args.max_tokens_per_step or (CPU_MAX_TOKENS_PER_STEP if cpu else 2048)
    return EngineConfig(
        page_size=args.page_size, num_pages=args.num_pages or (CPU_NUM_PAGES if cpu else None),
        max_running=max_running, max_tokens_per_step=max(per_step, max_running),
        max_model_len=args.max_model_len, prefix_caching=not args.no_prefix_caching,
        dtype=args.dtype or "auto", policy=_policy(args), scheduling_policy=args.scheduling_policy,
        seed=getattr(args, "engine_seed", None),
        decode_steps=args.decode_steps, speculative_tokens=args.speculative_tokens,
        prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
        speculative_disable_by_batch_size=args.speculative_disable_by_batch_size,
        batch_buckets=tuple(args.batch_buckets) if args.batch_buckets else None,
        prefill_buckets=tuple(args.prefill_buckets) if args.prefill_buckets else None,
        memory_fraction=args.memory_fraction, overlap=not args.no_overlap, attention_impl=args.attention_impl,
        compile_cache_dir=args.compile_cache_dir, max_loras=args.max_loras or int(args.enable_lora),
        max_lora_rank=args.max_lora_rank,
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization if args.quantization in QUANTIZATIONS else None,
        kv_cache_dtype=args.kv_cache_dtype)


def _speculative_config(args: argparse.Namespace) -> None:
    """vLLM's ``--speculative-config`` JSON onto the n-gram flags (the one method jaxserve has)."""
    if args.speculative_config is None:
        return
    try:
        spec = json.loads(args.speculative_config)
    except ValueError as exc:
        raise SystemExit(f"error: --speculative-config is not JSON: {exc}")
    if not isinstance(spec, dict) or spec.get("method", "ngram") != "ngram":
        raise SystemExit(f"error: --speculative-config: only method 'ngram' is served, got {spec!r}")
    unknown = set(spec) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                           "disable_by_batch_size"}
    if unknown:
        raise SystemExit(f"error: --speculative-config: unknown keys {sorted(unknown)}")
    args.speculative_tokens = spec.get("num_speculative_tokens", args.speculative_tokens)
    args.prompt_lookup_max = spec.get("prompt_lookup_max", args.prompt_lookup_max)
    args.prompt_lookup_min = spec.get("prompt_lookup_min", args.prompt_lookup_min)
    args.speculative_disable_by_batch_size = spec.get("disable_by_batch_size",
                                                      args.speculative_disable_by_batch_size)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        with open(args.file, encoding="utf-8") if args.file != "-" else sys.stdin as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise SystemExit(f"{args.file}:{n}: a JSONL line needs a \"prompt\" field ({exc})")
                else:
                    prompts.append(line)
    if not prompts:
        raise SystemExit("no prompts: pass them as arguments or with --file")
    return prompts


# `jaxserve generate`'s sampling where neither a flag nor the checkpoint's generation_config.json sets it.
GENERATE_FALLBACK = {"max_tokens": 64, "temperature": 0.0}


def _model_from_args(args: argparse.Namespace, engine_config: Any) -> Any:
    """``--model`` as a path, or loaded here when ``--rope-scaling`` overrides its config."""
    if args.rope_scaling is None:
        return args.model
    from jaxserve.loading import load

    try:
        scaling = json.loads(args.rope_scaling)
    except ValueError as exc:
        raise SystemExit(f"error: --rope-scaling is not JSON: {exc}")
    return load(args.model, dtype=engine_config.compute_dtype(), rope_scaling=scaling,
                device="cpu" if engine_config.loads_on_host else None)


def _structured_from_args(args: argparse.Namespace) -> dict | None:
    """``--json-schema`` (a file or the schema's JSON text), ``--regex``, ``--choice``, ``--grammar`` (a file or
    the GBNF text) or ``--json-object`` as `SamplingParams.structured_outputs`; at most one."""
    given = [(name, value) for name, value in (("json", args.json_schema), ("regex", args.regex),
                                                ("choice", args.choice), ("grammar", args.grammar),
                                                ("json_object", args.json_object or None))
             if value is not None]
    if len(given) > 1:
        raise SystemExit("error: give at most one of --json-schema, --regex, --choice, --grammar, --json-object")
    if not given:
        return None
    name, value = given[0]
    if name in ("json", "grammar") and os.path.isfile(value):
        with open(value) as f:
            value = f.read()
    return {name: value}


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxserve.engine import Engine
    from jaxserve.sampling import SamplingParams

    prompts = _read_prompts(args)
    given = {k: v for k, v in dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                   top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                                   repetition_penalty=args.repetition_penalty, bad_words=args.bad_word, n=args.n,
                                   structured_outputs=_structured_from_args(args)).items() if v is not None}
    try:
        SamplingParams(**{**GENERATE_FALLBACK, **given})  # bad flags fail before the model loads
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    engine_config = engine_config_from_args(args)
    lora = None
    if args.lora is not None:
        from jaxserve.lora import LoRARequest

        lora = LoRARequest("cli", 1, args.lora)
        engine_config = dataclasses.replace(engine_config, max_loras=max(1, engine_config.max_loras))
    with Engine(_model_from_args(args, engine_config), engine_config) as engine:
        # Flags left unset take the checkpoint's generation_config.json sampling, as the server's
        # requests do, then the CLI's own fallback (greedy, 64 tokens).
        params = SamplingParams(**{**GENERATE_FALLBACK, **engine.sampling_defaults, **given})
        try:
            if len(prompts) == 1 and params.n == 1 and not args.json:
                return _stream_one(engine, prompts[0], params, lora)
            results = engine.generate(prompts, params, use_tqdm=not args.json and len(prompts) * params.n > 1,
                                      lora_request=lora)
        except ValueError as exc:  # a bad adapter folder
            raise SystemExit(f"error: {exc}")
    for prompt, result in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, **result}, ensure_ascii=False), flush=True)
        else:
            for i, sample in enumerate(result.get("outputs", [result])):
                print(f"--- {prompt}" + (f" [sample {i}]" if params.n > 1 else "") + f"\n{sample['text']}", flush=True)
    return 0


def _stream_one(engine: Any, prompt: str, params: Any, lora: Any = None) -> int:
    """Print the prompt, then the completion as it is generated."""
    rid = engine.add_request(prompt, params, lora_request=lora)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    request = engine.requests[rid]
    while engine.has_unfinished():
        engine.step()
        text, _ = request.take_delta()
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
    text, _ = request.take_delta()
    sys.stdout.write(text + "\n")
    if request.error:
        print(f"error: {request.error}", file=sys.stderr)
        return 1
    return 0


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"error: --lora-modules takes NAME=PATH, got {text!r}")
    return name, path


def _strings(value: Any, flag: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SystemExit(f'error: {flag} takes a JSON list of strings, e.g. \'["*"]\', got {value!r}')
    return tuple(value)


def _log_to_stderr(level: str) -> None:
    """jaxserve's own log lines (the pool it sized, --enable-log-requests') on stderr beside uvicorn's, at its
    level: without a handler Python showed only warnings."""
    import logging

    logger = logging.getLogger("jaxserve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if level == "trace" else level.upper())


def cmd_serve(args: argparse.Namespace) -> int:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise SystemExit(f"error: two models given: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    try:
        from jaxserve.server import ServerConfig, serve
    except ImportError as exc:
        raise SystemExit(f"the server needs its extras: pip install 'jaxserve[server]' ({exc})")
    if not 0 <= args.max_logprobs <= MAX_LOGPROBS:
        raise SystemExit(f"error: --max-logprobs {args.max_logprobs}: jaxserve returns at most {MAX_LOGPROBS} "
                         f"log-probabilities a token (vLLM's -1, the whole vocabulary, is not served)")
    if args.stream_interval < 1:
        raise SystemExit(f"error: --stream-interval must be >= 1, got {args.stream_interval}")
    if args.api_server_count < 1:
        raise SystemExit(f"error: --api-server-count must be >= 1, got {args.api_server_count}")
    if args.api_server_count > 1 and (args.engine_process is False or args.rope_scaling is not None):
        thread = "--no-engine-process" if args.engine_process is False else "--rope-scaling (it loads the model here)"
        raise SystemExit(f"error: --api-server-count > 1 needs the engine in its own process, which the server "
                         f"processes share; {thread} runs it on a thread here")
    _structured_outputs_config(args)
    _check_task(args)
    _log_to_stderr(args.log_level)
    names = args.served_model_name or [None]
    server_config = ServerConfig(model_name=names[0], model_aliases=tuple(names[1:]), api_key=args.api_key or None,
                                 max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                                 drain_s=args.drain_s, warmup=args.warmup,
                                 warmup_structured=args.warmup_structured, chat_template=args.chat_template,
                                 data_parallel_size=args.data_parallel_size,
                                 return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                                 lora_modules=tuple(_lora_module(m) for m in args.lora_modules or ()),
                                 allow_runtime_lora_updating=args.allow_runtime_lora_updating or os.environ.get(
                                     "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
                                 pooling_type=args.pooling_type, enable_prompt_embeds=args.enable_prompt_embeds,
                                 reasoning_parser=args.reasoning_parser,
                                 allowed_origins=_strings(args.allowed_origins, "--allowed-origins"),
                                 allowed_methods=_strings(args.allowed_methods, "--allowed-methods"),
                                 allowed_headers=_strings(args.allowed_headers, "--allowed-headers"),
                                 allow_credentials=args.allow_credentials, root_path=args.root_path,
                                 max_stored_responses=args.max_stored_responses,
                                 ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                                 max_logprobs=args.max_logprobs, log_requests=args.log_requests,
                                 tokenizer=args.tokenizer, stream_interval=args.stream_interval,
                                 engine_process=args.engine_process, api_server_count=args.api_server_count,
                                 enable_request_id_headers=args.enable_request_id_headers)
    if args.engine_process and args.rope_scaling is not None:  # (unset, the engine thread serves the model loaded here)
        raise SystemExit("error: --engine-process loads the checkpoint in the engine's process as it is; "
                         "--rope-scaling needs it loaded here (leave one of them out)")
    engine_config = engine_config_from_args(args)
    serve(_model_from_args(args, engine_config), engine_config, server_config, host=args.host, port=args.port,
          log_level=args.log_level)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxserve.loading import load
    from jaxserve.weights import save_converted

    model = load(args.src, dtype=args.dtype)
    save_converted(model.params, model.config, args.dst, extra_files_from=args.src)
    print(f"converted {args.src} -> {args.dst} ({args.dtype})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "serving.py")
    if not os.path.exists(script):
        raise SystemExit("bench/serving.py is not here: run `jaxserve bench` from a source checkout")
    import runpy

    sys.argv = [script, *args.bench_args]
    runpy.run_path(script, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description="JAX/Pallas inference engine for Qwen2/Qwen2.5.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete prompts and print the text",
                         description="Complete prompts with a model (the embedded default model unless --model). "
                                     "One prompt streams its completion; several run batched.",
                         epilog='example: jaxserve generate --repetition-penalty 1.2 "import os"')
    gen.add_argument("prompts", nargs="*", help="prompt texts")
    gen.add_argument("--file", help="more prompts: one per line, or JSONL lines with a \"prompt\" field ('-': stdin)")
    gen.add_argument("--max-tokens", type=int, default=None,
                     help="tokens to generate per prompt (default: the model's max_new_tokens, else 64)")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 is greedy (default: the model's generation_config.json, else 0)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the model's, else 1)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample among the k most likely tokens (default: the model's, else -1: off)")
    gen.add_argument("--min-p", type=float, default=None,
                     help="drop tokens below this fraction of the best one's probability (default: the model's, else 0: off)")
    gen.add_argument("--repetition-penalty", type=float, default=None,
                     help="> 1 discourages tokens already in the prompt or output (default: the model's, else 1: off); "
                          "small models loop without it")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampled (temperature > 0) output")
    gen.add_argument("--lora", default=None, metavar="PATH", help="a LoRA adapter (PEFT folder) to generate with")
    gen.add_argument("-n", "--n", type=int, default=None,
                     help="samples a prompt (default 1; the prompt is computed once; sample i seeded seed + i)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--bad-word", action="append", metavar="WORD",
                     help="a word the output must not contain as its tokens (vLLM's bad_words; repeatable)")
    out = gen.add_argument_group("structured outputs (at most one)")
    out.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON",
                     help="hold the output to this JSON schema (a file, or the schema's JSON text)")
    out.add_argument("--regex", default=None, help="hold the output to a full match of this regular expression")
    out.add_argument("--choice", action="append", default=None, help="one of these strings (repeatable)")
    out.add_argument("--grammar", default=None, metavar="FILE_OR_GBNF",
                     help="a GBNF grammar (llama.cpp's format; start rule 'root'), a file or the text")
    out.add_argument("--json-object", action="store_true", help="any JSON object")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt (prompt, text, token_ids, finish_reason, usage, timings)")
    _engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                         description="Serve /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, "
                                     "/health, /version and /metrics. SIGINT/SIGTERM drain running requests, "
                                     "then stop.",
                         epilog="example: jaxserve serve --model /models/Qwen2.5-0.5B-Instruct --port 8000")
    srv.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                     help="checkpoint folder, as vLLM's `vllm serve MODEL` (or --model)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", default=os.environ.get("JAXSERVE_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $JAXSERVE_API_KEY, else none)")
    srv.add_argument("--served-model-name", nargs="+", default=None,
                     help="model id clients send (default: folder name); several, as vLLM's: any of them, "
                          "responses naming the first")
    srv.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                     help="largest max_tokens a request may ask (default: none beyond the context, as vLLM's: "
                          "max_model_len minus the prompt)")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    srv.add_argument("--drain-s", type=float, default=5.0,
                     help="on shutdown, seconds running requests get to finish before they are aborted (default 5)")
    srv.add_argument("--warmup", action="store_true",
                     help="compile every batch/length bucket before answering (slower start, no compile stalls)")
    srv.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                     help="serve N engines on N devices (N x --tensor-parallel-size) behind a prefix-aware router "
                          "(default 1)")
    srv.add_argument("--enable-request-id-headers", action="store_true",
                     help="every answer carries an X-Request-Id header (the request's own, or a new one), as vLLM's")
    srv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                     help="the engine in a process of its own (vLLM V1's engine core; the default, but where "
                          "--rope-scaling loads the model here): its host work no longer shares the HTTP side's "
                          "GIL, which bounds streamed serving at many requests; --no-engine-process: a thread of "
                          "the server's process")
    srv.add_argument("--api-server-count", type=int, default=1, metavar="N",
                     help="N HTTP server processes on the one port, over the one engine process (vLLM's; default 1): "
                          "when one process's event loop bounds streamed serving. Needs the engine process; runtime "
                          "LoRA loading is refused")
    srv.add_argument("--warmup-structured", action="store_true",
                     help="--warmup, and the steps of requests with structured outputs (response_format, "
                          "guided_*) too")
    srv.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                     help="a Jinja chat template (a file, or the template itself) replacing the checkpoint's")
    srv.add_argument("--return-tokens-as-token-ids", action="store_true",
                     help="logprobs name tokens 'token_id:<id>' (vLLM's; a request's return_tokens_as_token_ids "
                          "overrides it)")
    srv.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                     help="LoRA adapters (PEFT folders) served beside the model; a request's model field picks one "
                          "by NAME (vLLM's)")
    srv.add_argument("--allow-runtime-lora-updating", action="store_true",
                     help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's; also "
                          "$VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)")
    srv.add_argument("--reasoning-parser", choices=("deepseek_r1",), default=None,
                     help="chat answers' text up to </think> goes in reasoning_content (QwQ, DeepSeek-R1-Distill-Qwen)")
    srv.add_argument("--enable-prompt-embeds", action="store_true",
                     help="take /v1/completions' prompt_embeds (base64 of torch.save of a [tokens, hidden] tensor, "
                          "vLLM's; read with torch.load(weights_only=True))")
    srv.add_argument("--pooling-type", default="last", choices=POOLING_TYPES,
                     help="how /v1/embeddings pools the final hidden states: the last token's (gte-Qwen2's, vLLM's "
                          "default) or their mean")
    srv.add_argument("--log-level", "--uvicorn-log-level", default="info",
                     choices=("critical", "error", "warning", "info", "debug", "trace"))
    srv.add_argument("--allowed-origins", type=json.loads, default=["*"], metavar="JSON",
                     help='CORS: origins a browser page may call from (vLLM\'s; default ["*"])')
    srv.add_argument("--allowed-methods", type=json.loads, default=["*"], metavar="JSON",
                     help='CORS: methods (default ["*"])')
    srv.add_argument("--allowed-headers", type=json.loads, default=["*"], metavar="JSON",
                     help='CORS: headers (default ["*"])')
    srv.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    srv.add_argument("--root-path", default="", help="the path prefix a proxy serves the API under")
    srv.add_argument("--max-stored-responses", type=int, default=1024, metavar="N",
                     help="finished /v1/responses kept in memory for previous_response_id (default 1024; 0: none)")
    srv.add_argument("--seed", type=int, default=None, dest="engine_seed",
                     help="requests that send no seed draw one from a generator seeded with this (vLLM's; default: "
                          "fresh randomness)")
    srv.add_argument("--ssl-keyfile", default=None, help="HTTPS: the key file (with --ssl-certfile)")
    srv.add_argument("--ssl-certfile", default=None, help="HTTPS: the certificate file")
    vllm = srv.add_argument_group("vLLM flags taken as they are (jaxserve's behaviour already)")
    vllm.add_argument("--enable-auto-tool-choice", action="store_true",
                      help="tool calls are parsed wherever a request has tools and tool_choice is not 'none'")
    vllm.add_argument("--tool-call-parser", choices=("hermes",), default="hermes",
                      help="Qwen2.5's <tool_call> blocks (the only format)")
    vllm.add_argument("--trust-remote-code", action="store_true", help="Qwen2 checkpoints need no remote code")
    vllm.add_argument("--enforce-eager", action="store_true",
                      help="no CUDA graphs to turn off: XLA compiles each step shape once (warm-up: --warmup)")
    vllm.add_argument("--disable-log-stats", action="store_true", help="stats are served on /metrics, not logged")
    vllm.add_argument("--disable-frontend-multiprocessing", action="store_true",
                      help="the HTTP server and the engine share one process (their own threads)")
    vllm.add_argument("--swap-space", type=float, default=None, metavar="GiB",
                      help="no KV swap space: preempted sequences are recomputed from their tokens")
    vllm.add_argument("--max-seq-len-to-capture", type=int, default=None, metavar="N", help="no CUDA graphs")
    vllm.add_argument("--pipeline-parallel-size", "-pp", type=int, choices=(1,), default=1,
                      help="no pipeline parallelism (--tensor-parallel-size splits a model over GPUs)")
    vllm.add_argument("--generation-config", choices=("auto",), default="auto",
                      help="the checkpoint's generation_config.json gives a request's unset sampling fields")
    vllm.add_argument("--load-format", choices=("auto", "safetensors"), default="auto",
                      help="safetensors checkpoints (Hugging Face's, or jaxserve convert's)")
    vllm.add_argument("--max-cpu-loras", type=int, default=None, metavar="N",
                      help="each registered adapter's host copy is kept until it is unloaded")
    vllm.add_argument("--lora-dtype", choices=("auto",), default="auto", help="adapters are held in the model's dtype")
    vllm.add_argument("--enable-sleep-mode", action="store_true",
                      help="POST /sleep, /wake_up and GET /is_sleeping are always served (vLLM needs this flag and "
                           "VLLM_SERVER_DEV_MODE for them)")
    vllm.add_argument("--hf-overrides", default=None, metavar="JSON",
                      help="'{}', or '{\"rope_scaling\": {...}}' (as --rope-scaling); other config.json overrides "
                           "are refused")
    vllm.add_argument("--structured-outputs-config", default=None, metavar="JSON",
                      help="'{\"backend\": \"auto\"}' (or \"jaxserve\": its own, the one backend); "
                           "disable_fallback and disable_additional_properties hold already")
    checked = srv.add_argument_group("vLLM flags checked against what jaxserve serves")
    checked.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS, metavar="N",
                         help=f"most logprobs / top_logprobs / prompt_logprobs a request may ask (default and most: "
                              f"{MAX_LOGPROBS})")
    checked.add_argument("--enable-log-requests", action="store_true", dest="log_requests",
                         help="log each request's id, sampling params and adapter at INFO (the prompt's length at "
                              "DEBUG; never its text)")
    checked.add_argument("--disable-log-requests", action="store_false", dest="log_requests",
                         help="requests are not logged (the default)")
    checked.add_argument("--tokenizer", default=None, metavar="PATH",
                         help="a tokenizer folder other than the model's, for the engine and the routes")
    checked.add_argument("--task", choices=TASKS, default="auto",
                         help="auto / generate (a causal LM), embed / embedding / score (any model here), classify "
                              "(a Qwen2ForSequenceClassification): every route is served whatever the task; the "
                              "flag is checked against the checkpoint")
    checked.add_argument("--runner", choices=RUNNERS, default="auto",
                         help="auto, generate (a causal LM) or pooling (any model: embeddings; a classifier's "
                              "classes): checked as --task")
    checked.add_argument("--stream-interval", type=int, default=1, metavar="N",
                         help="tokens per streamed chunk (vLLM's; default 1: one chunk a token); a device call's "
                              "tokens are never held for the next call's")
    _engine_args(srv)
    srv.set_defaults(func=cmd_serve)

    conv = sub.add_parser("convert", help="convert a Hugging Face checkpoint to jaxserve's Flax format",
                          description="Load a Hugging Face Qwen2 checkpoint folder and save its params in the "
                                      "converted layout (faster to load), with config and tokenizer files.",
                          epilog="example: jaxserve convert /models/Qwen2.5-0.5B /models/qwen-0.5b-jax --dtype bfloat16")
    conv.add_argument("src", help="Hugging Face checkpoint folder")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--dtype", choices=[d for d in DTYPES if d != "auto"], default="float32",
                      help="saved dtype (default float32)")
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="run bench/serving.py (source checkout only)",
                           description="Forward the remaining arguments to bench/serving.py.",
                           epilog="example: jaxserve bench -- --model /models/qwen --num-requests 200 --rate 8")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for bench/serving.py")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxserve`` command."""
    args = build_parser().parse_args(argv)
    if getattr(args, "bench_args", None) and args.bench_args[0] == "--":
        args.bench_args = args.bench_args[1:]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
