"""Offline throughput: jaxserve vs transformers (eager, static+compile) vs a plain JAX static decoder.

One run, side by side, on one random-weight Qwen2-shaped model (default: Qwen2.5-0.5B shape,
bf16). For each batch size every prompt has the same length and every request generates
exactly ``--output-len`` tokens (ignore_eos), so all systems do the same work.

Reported per system and batch: output tokens/s (prefill included), mean TTFT, mean TPOT,
and for jaxserve also the decode step time (one device call of ``decode_steps`` steps over
the whole batch, divided by the steps), kernels per decode step (from the compiled HLO) and
the roofline: weight bytes + KV bytes read per step over an HBM rate measured here, twice: over the copy
bandwidth (bytes read + written by a copy; every run since run 1 quoted this one) and over the read
ceiling (an XLA sum: a step's traffic is almost all reads, so this is the stricter roofline; on the
H200 the copy moves bytes ~30% slower than the sum reads them, bench/hbm_probe.py).

    python bench/throughput.py --batches 1 64 256 --prompt-len 128 --output-len 128
    python bench/throughput.py --tiny --batches 2 --no-hf-compile      # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve import Engine, EngineConfig, SamplingParams  # noqa: E402
from jaxserve.config import QWEN25_SHAPES, ModelConfig  # noqa: E402
from jaxserve.loading import LoadedModel  # noqa: E402
from jaxserve.model import apply_rope, rope_tables  # noqa: E402
from jaxserve.weights import load_hf_params  # noqa: E402


def qwen25_shape(name: str) -> dict:
    """A Qwen2.5 size's config values (`jaxserve.config.QWEN25_SHAPES`) with its context and RoPE base."""
    return dict(QWEN25_SHAPES[name], max_position_embeddings=32768, rope_theta=1000000.0)


QWEN25_05B = qwen25_shape("0.5B")
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            max_position_embeddings=2048, rope_theta=10000.0)


@dataclasses.dataclass
class Row:
    system: str
    batch: int
    prompt_len: int
    output_len: int
    tokens_per_s: float
    ttft_ms: float
    tpot_ms: float
    step_ms: float | None = None
    kernels_per_step: int | None = None
    roofline_ms: float | None = None
    roofline_read_ms: float | None = None
    note: str = ""


def write_lines(out_dir: str | None, name: str, lines: list[str]) -> None:
    """Print a report's lines, and with ``out_dir`` also write them to ``out_dir/name``."""
    print("\n".join(lines))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("\n".join(lines) + "\n")


def make_checkpoint(shape: dict, path: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return model


def random_model(shape_name: str, dtype: str, path: str):
    """A random-weight Qwen2.5 checkpoint of ``shape_name`` ("tiny", "0.5B", "7B"...) saved in ``path`` and loaded
    in ``dtype`` without a tokenizer: ``(LoadedModel, the transformers model)``, what the engine benches run on."""
    from jaxserve.config import ModelConfig
    from jaxserve.loading import LoadedModel
    from jaxserve.weights import load_hf_params

    shape = TINY if shape_name == "tiny" else qwen25_shape(shape_name)
    hf = make_checkpoint(shape, path)
    cfg = ModelConfig.from_pretrained(path)
    return LoadedModel(load_hf_params(path, cfg, dtype), cfg, None, path, "bench"), hf


def copy_bandwidth() -> float:
    """Bytes read + written per second by an XLA copy of 2 GiB (well above the 50 MB L2)."""
    n = (1 << 30) // 2 if jax.default_backend() == "gpu" else 1 << 22
    x = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
    reps = 20

    @jax.jit
    def loop(x):
        return jax.lax.fori_loop(0, reps, lambda i, y: -y, x)  # a negation XLA cannot fold away

    return 2 * x.nbytes * reps / _median_s(loop, x)


def read_bandwidth() -> float:
    """Bytes read per second by an XLA sum over 2 GiB (well above the 50 MB L2), as bench/bandwidth.py's read ceiling."""
    n = 1 << 30 if jax.default_backend() == "gpu" else 1 << 22
    x = jax.random.normal(jax.random.key(2), (n,), jnp.bfloat16)
    reps = 20

    @jax.jit
    def loop(x):  # the addend changes every sum, so XLA cannot hoist one sum out of the loop
        return jax.lax.fori_loop(0, reps, lambda i, s: s + jnp.sum(x + s.astype(x.dtype), dtype=jnp.float32) * 1e-9,
                                 jnp.float32(0))

    return x.nbytes * reps / _median_s(loop, x)


def _median_s(loop, x) -> float:
    """Median seconds of three calls of the jitted `loop(x)`, after one that compiles it."""
    loop(x).block_until_ready()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        loop(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def loop_body_histogram(hlo_text: str) -> dict[str, int]:
    """Kernels per step by kind: instructions of the largest while-loop body of the compiled HLO.

    On the GPU each top-level instruction of the body (a fusion, a custom call such as a GEMM
    or a Pallas kernel, a copy) is one kernel; bookkeeping opcodes are not counted. Fusions are
    keyed by kind, custom calls by target and copies by shape (a copy of the KV pages in the
    loop would be a bug).
    """
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"^(%[\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S)}
    bodies = re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo_text)
    if not bodies:
        return {}
    body = max((blocks.get(b, "") for b in bodies), key=len)
    skip = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id")
    hist: dict[str, int] = {}
    for line in body.split("\n"):
        m = re.search(r"=\s.*?\s([a-z][a-z\-]*)\(", line)
        if not m or m.group(1) in skip:
            continue
        kind = m.group(1)
        if kind == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', line)
            kind = f"custom-call:{t.group(1) if t else '?'}"
        elif kind == "fusion":
            k = re.search(r"kind=(k\w+)", line)
            kind = f"fusion:{k.group(1) if k else '?'}"
        elif kind == "copy":
            shape = re.search(r"=\s*(\S+)\s", line)
            kind = f"copy:{shape.group(1) if shape else '?'}"
        hist[kind] = hist.get(kind, 0) + 1
    return hist


def count_kernels(hlo_text: str) -> int:
    """Launches per step (see ``loop_body_histogram``)."""
    return sum(loop_body_histogram(hlo_text).values())


def time_decode_call(runner, call: tuple, reps: int, logprobs: bool = False, blocked: bool = False,
                     live_rows: int | None = None) -> float:
    """Ms per decode step of ``runner.decode(*call, greedy=True)``, after a warm-up call.

    ``reps`` calls dispatched back to back, then one wait: the host's dispatch of a call overlaps
    the device's previous one, as in the engine (which chains its decode calls), so what is
    timed is the device's steady state. ``blocked=True``: the median of ``reps`` calls each
    waited on, which adds a call's dispatch and result transfer to every ``num_steps`` steps
    (the only timing before session 13: ~0.15 ms a step more at batch 1 on the H200).
    Without log-probabilities by default, as the engine runs the benchmark's requests (none
    asks for them; since session 12).

    ``call`` is ``(tokens, positions, limits, block_tables, sampling_batch, steps, num_steps)``; ``live_rows``
    as `Runner.decode`'s.
    """
    decode = functools.partial(runner.decode, greedy=True, logprobs=logprobs, live_rows=live_rows)
    jax.block_until_ready(decode(*call).tokens)
    if not blocked:
        s = time.perf_counter()
        for _ in range(reps):
            out = decode(*call)
        jax.block_until_ready(out.tokens)
        return (time.perf_counter() - s) / (reps * call[6]) * 1e3
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        jax.block_until_ready(decode(*call).tokens)
        times.append(time.perf_counter() - s)
    return float(np.median(times)) / call[6] * 1e3


def decode_hlo(runner, call: tuple, logprobs: bool = False, live_rows: int | None = None) -> str:
    """The compiled HLO text of the decode call ``time_decode_call`` times."""
    zeros = jnp.zeros((1, 1), jnp.int32)
    decode = runner.decode_fn(len(call[0]))  # the compile that batch width actually uses
    return decode.lower(runner.params, runner.kv, *[jnp.asarray(a) for a in call[:4]], call[4],
                        jnp.asarray(call[5]), zeros, zeros, num_steps=call[6], num_top=0,
                        penalties=False, greedy=True, logprobs=logprobs,
                        live_rows=None if live_rows == len(call[0]) else live_rows).compile().as_text()


def engine_config(batch: int, prompt_len: int, out_len: int, decode_steps: int, attention_impl: str,
                  max_model_len: int | None = None, kv_cache_dtype: str = "auto") -> EngineConfig:
    """The engine set-up every jaxserve row of this benchmark runs: the whole batch admitted at
    once, prefill calls of up to 8192 tokens, pages for every row's prompt and output."""
    return EngineConfig(page_size=16, max_running=batch, max_tokens_per_step=max(batch, min(8192, batch * prompt_len)),
                        dtype="bfloat16", decode_steps=decode_steps, prefix_caching=False,
                        max_model_len=max_model_len or prompt_len + out_len + 16, attention_impl=attention_impl,
                        num_pages=batch * ((prompt_len + out_len) // 16 + 2) + 64, kv_cache_dtype=kv_cache_dtype)


def bench_jaxserve(m: LoadedModel, batch: int, prompts: list[list[int]], out_len: int, decode_steps: int,
                   attention_impl: str, first: bool, runs: int = 1,
                   max_model_len: int | None = None, kv_cache_dtype: str = "auto") -> tuple[Row, float | None]:
    cfg = engine_config(batch, len(prompts[0]), out_len, decode_steps, attention_impl, max_model_len, kv_cache_dtype)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine = Engine(m, cfg)
    first_token = None
    if first:  # cold: compilation included, as a user sees it
        engine.add_request(prompts[0], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished():
            # A step may return with its call still on the device (EngineConfig.overlap): the
            # first token counts once a request holds it.
            if any(r.output_ids for r in engine.step()) and first_token is None:
                first_token = time.perf_counter() - t0
    engine.generate(prompts, params, use_tqdm=False)  # warm every shape
    split = ("prefill_call_s", "decode_call_s", "host_s")
    timed = []  # (seconds, outputs, stats before, stats after) of each run; the median run reports
    for _ in range(runs):
        before = engine.stats()
        t = time.perf_counter()
        outs = engine.generate(prompts, params, use_tqdm=False)
        timed.append((time.perf_counter() - t, outs, before, engine.stats()))
        assert all(len(o["token_ids"]) == out_len for o in outs)
    total, outs, before, after = median_run(timed)
    note = "of the run: " + ", ".join(f"{k[:-2].replace('_', ' ')} {after[k] - before[k]:.3f} s" for k in split)
    note += f", overlapped prefill calls {after['overlapped_prefill_calls'] - before['overlapped_prefill_calls']}"
    note = "; ".join(x for x in (note, runs_note(batch * out_len, [t[0] for t in timed])) if x)
    # Decode step time: the multi-step call alone, timed with the batch fully running, as the engine runs it
    # (padded where it pads, engine.decode_shape: padding rows have no keys and write nothing), the block
    # table as wide as the engine makes it for these rows.
    middle = len(prompts[0]) + out_len // 2
    rows, table_w, live = engine.decode_shape(batch, middle + decode_steps)
    pos = np.zeros(rows, np.int32)
    pos[:batch] = middle
    limits = np.where(np.arange(rows) < batch, pos + decode_steps, 0).astype(np.int32)
    bt = np.arange(rows * table_w, dtype=np.int32).reshape(rows, table_w) % engine.scheduler.num_pages
    from jaxserve.sampling import make_batch
    sb = make_batch([params] * batch, rows)
    call = (np.zeros(rows, np.int32), pos, limits, bt, sb, np.zeros(rows, np.int32), decode_steps)
    # Median of 7 rounds of 10 back-to-back calls (until session 30 one round: runs of the same code read
    # 0.748-0.792 ms at batch 64).
    step_ms = float(np.median([time_decode_call(engine.runner, call, reps=10, live_rows=live) for _ in range(7)]))
    kernels = None
    try:
        kernels = count_kernels(decode_hlo(engine.runner, call, live_rows=live))
    except Exception as exc:  # the count is informative only
        print("kernel count failed:", exc)
    ttft = float(np.mean([o["ttft"] for o in outs])) * 1e3
    tpot = float(np.mean([o["tpot"] for o in outs if o["tpot"]])) * 1e3
    engine.close()
    # The step's shape, so a row shows whether the engine padded it (a run that sets max_running to a batch under 8
    # once timed no padding at all, session 40).
    note += f"; decode step timed as {rows} rows x {table_w} pages" + (f", attention of {live}" if live < rows else "")
    name = attention_impl if kv_cache_dtype == "auto" else f"{attention_impl}, kv {kv_cache_dtype}"
    row = Row(f"jaxserve[{name}]", batch, len(prompts[0]), out_len, batch * out_len / total, ttft, tpot,
              step_ms, kernels, note=note)
    return row, first_token


def median_run(timed: list[tuple]) -> tuple:
    """The run (a tuple led by its seconds) at the median time: the upper median of an even count."""
    return sorted(timed, key=lambda t: t[0])[len(timed) // 2]


def runs_note(tokens: int, seconds: list[float]) -> str:
    """"median of N runs (lo-hi tok/s)" for a row timed more than once, else ""."""
    if len(seconds) < 2:
        return ""
    rates = sorted(tokens / t for t in seconds)
    return f"median of {len(seconds)} runs ({rates[0]:,.0f}-{rates[-1]:,.0f} tok/s)"


def bench_hf(model, batch: int, prompts: list[list[int]], out_len: int, compiled: bool, runs: int = 1) -> Row:
    import torch

    ids = torch.tensor(prompts, device="cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    if compiled:
        kw["cache_implementation"] = "static"
    note = ""
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(ids, **kw)  # warm-up (and compilation)
        if compiled:
            # reduce-overhead records its CUDA graphs on the calls after the compiling one.
            model.generate(ids, **kw)
            note = f"compile+two warm-up runs {time.perf_counter() - t:.0f} s"
        if ids.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids[:, :], max_new_tokens=1, min_new_tokens=1, do_sample=False, eos_token_id=None,
                       pad_token_id=0, **({"cache_implementation": "static"} if compiled else {}))
        if ids.is_cuda:
            torch.cuda.synchronize()
        ttft = time.perf_counter() - t
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model.generate(ids, **kw)
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        total = median_run([(t,) for t in times])[0]
        note = "; ".join(x for x in (note, runs_note(batch * out_len, times)) if x)
    name = "transformers static+compile" if compiled else "transformers eager"
    return Row(name, batch, len(prompts[0]), out_len, batch * out_len / total, ttft * 1e3,
               (total - ttft) / max(out_len - 1, 1) * 1e3, note=note)


def static_decoder(cfg: ModelConfig, params, prompts: np.ndarray, out_len: int):
    """What a researcher writes by hand: contiguous static cache, dense prefill, greedy decode in one fori_loop."""
    b, s = prompts.shape
    h, kvh, d, n_layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    max_len = s + out_len
    from jaxserve.model import WEIGHT_LAYOUT, convert_weight_layout

    # Written against Flax's [in, out] kernels, as a researcher would; the engine's layout may differ.
    params = convert_weight_layout(params, WEIGHT_LAYOUT, "kn")
    layers = [params[f"layers_{i}"] for i in range(n_layers)]
    emb = params["embed_tokens"]["embedding"]

    def norm(x, w):
        xf = x.astype(jnp.float32)
        return w * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + cfg.rms_norm_eps)).astype(x.dtype)

    def forward(tokens, start, caches):
        t = tokens.shape[1]
        x = emb[tokens]
        pos = start + jnp.arange(t)
        cos, sin = rope_tables(jnp.broadcast_to(pos, (b, t)), d, cfg.rope_theta)
        new_caches = []
        for lp, (kc, vc) in zip(layers, caches):
            y = norm(x, lp["input_layernorm"]["scale"])
            qkv = y @ lp["self_attn"]["qkv_proj"]["kernel"] + lp["self_attn"]["qkv_proj"]["bias"]
            q = apply_rope(qkv[..., : h * d].reshape(b, t, h, d), cos, sin)
            k = apply_rope(qkv[..., h * d:(h + kvh) * d].reshape(b, t, kvh, d), cos, sin)
            v = qkv[..., (h + kvh) * d:].reshape(b, t, kvh, d)
            kc = jax.lax.dynamic_update_slice(kc, k, (0, start, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, v, (0, start, 0, 0))
            qg = q.reshape(b, t, kvh, h // kvh, d)
            sc = jnp.einsum("btkgd,bskd->bkgts", qg, kc, preferred_element_type=jnp.float32) * d ** -0.5
            keypos = jnp.arange(max_len)
            sc = jnp.where(keypos[None, None, None, None, :] <= pos[None, None, None, :, None], sc, -1e30)
            p = jax.nn.softmax(sc, axis=-1).astype(x.dtype)
            o = jnp.einsum("bkgts,bskd->btkgd", p, vc).reshape(b, t, h * d)
            x = x + o @ lp["self_attn"]["o_proj"]["kernel"]
            y = norm(x, lp["post_attention_layernorm"]["scale"])
            gu = y @ lp["mlp"]["gate_up_proj"]["kernel"]
            inter = cfg.intermediate_size
            x = x + (jax.nn.silu(gu[..., :inter]) * gu[..., inter:]) @ lp["mlp"]["down_proj"]["kernel"]
            new_caches.append((kc, vc))
        x = norm(x[:, -1], params["norm"]["scale"])
        return jnp.argmax((x @ emb.T).astype(jnp.float32), -1).astype(jnp.int32), new_caches

    def empty():
        return [(jnp.zeros((b, max_len, kvh, d), emb.dtype), jnp.zeros((b, max_len, kvh, d), emb.dtype))
                for _ in range(n_layers)]

    @jax.jit
    def prefill(tokens):
        return forward(tokens, 0, empty())

    @jax.jit
    def decode(tok, caches):
        def body(i, carry):
            tok, caches, out = carry
            nxt, caches = forward(tok[:, None], s + i, caches)
            return nxt, caches, out.at[:, i].set(nxt)
        return jax.lax.fori_loop(0, out_len - 1, body, (tok, caches, jnp.zeros((b, out_len - 1), jnp.int32)))

    return prefill, decode


def bench_static(cfg: ModelConfig, params, prompts: list[list[int]], out_len: int) -> Row:
    tokens = jnp.asarray(prompts, jnp.int32)
    prefill, decode = static_decoder(cfg, params, np.asarray(prompts), out_len)
    tok, caches = prefill(tokens)
    jax.block_until_ready(decode(tok, caches))
    t = time.perf_counter()
    tok, caches = prefill(tokens)
    tok.block_until_ready()
    ttft = time.perf_counter() - t
    _, _, out = decode(tok, caches)
    out.block_until_ready()
    total = time.perf_counter() - t
    b = len(prompts)
    row = Row("plain JAX static", b, len(prompts[0]), out_len, b * out_len / total, ttft * 1e3,
              (total - ttft) / (out_len - 1) * 1e3, step_ms=(total - ttft) / (out_len - 1) * 1e3)
    return row


def _open_loop(engine: Engine, prompts, arrivals, params) -> tuple[list[dict], dict[str, float], float]:
    ids, gaps, last = [], {}, {}
    start = time.perf_counter()
    nxt = 0
    while nxt < len(prompts) or engine.has_unfinished():
        now = time.perf_counter() - start
        while nxt < len(prompts) and arrivals[nxt] <= now:
            ids.append(engine.add_request(prompts[nxt], params))
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(arrivals[nxt] - now, 0.01)))
            continue
        for r in engine.step():
            t = time.perf_counter()
            if r.request_id in last:
                gaps[r.request_id] = max(gaps.get(r.request_id, 0.0), t - last[r.request_id])
            last[r.request_id] = t
    total = time.perf_counter() - start
    return [engine.release(i).result() for i in ids], gaps, total


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    """Requests whose tokens equal the reference's, and the earliest position where any differs."""
    same = sum(a == b for a, b in zip(tokens, reference))
    if same == len(reference):
        return f"{same}/{len(reference)}"
    first = min(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                for a, b in zip(tokens, reference) if a != b)
    return f"{same}/{len(reference)} (first difference at token {first})"


def bench_policies(m: LoadedModel, num_requests: int, max_running: int, rate: float, out_len: int,
                   max_prompt: int, decode_steps: int, attention_impl: str, dtype: str = "bfloat16",
                   warmup: bool = True) -> list[str]:
    """The same open-loop workload under each scheduling policy: TTFT vs token-gap trade-off.

    Requests arrive as a Poisson process (wall clock) with prompt lengths uniform in
    [8, max_prompt]. Greedy outputs are compared with prefill_first's: in float32 they should
    agree; in bf16 the policies' different batch buckets and chunking change rounding, and a
    random-weight model's near-tied logits can flip (bench/results/policies_h200.md).
    ``warmup=False`` compiles shapes as they come (the last column counts them): the timings then
    include compilation, but a float32 token check finishes where warming every bucket did not.
    """
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, m.config.vocab_size, size=int(n)).tolist()
               for n in rng.integers(8, max_prompt + 1, size=num_requests)]
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    lines = [f"open loop: {num_requests} requests at {rate}/s, prompts 8-{max_prompt} tokens, {out_len} out, "
             f"max_running {max_running}, {decode_steps} decode steps per call when no prompt waits, {dtype}", "",
             "| policy | out tok/s | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | max token gap p90 ms | requests with prefill_first's tokens | shapes compiled in measured pass |",
             "|---|---|---|---|---|---|---|---|"]
    reference = None
    for policy in ("prefill_first", "time_share", "mixed"):
        cfg = EngineConfig(page_size=16, max_running=max_running, max_tokens_per_step=max(512, max_running),
                           decode_steps=decode_steps, policy=policy, attention_impl=attention_impl,
                           max_model_len=max_prompt + out_len + 16, prefix_caching=False,
                           num_pages=max_running * ((max_prompt + out_len) // 16 + 2) + 64, dtype=dtype)
        with Engine(m, cfg) as engine:
            if warmup:
                engine.warmup(sampling=False)
            compiled = engine.stats()["compilations"]
            results, gaps, total = _open_loop(engine, prompts, arrivals, params)
            new_shapes = engine.stats()["compilations"] - compiled
        tokens = [r["token_ids"] for r in results]
        reference = reference or tokens
        ttft = np.array([r["ttft"] for r in results]) * 1e3
        tpot = np.array([r["tpot"] for r in results if r["tpot"]]) * 1e3
        gap = np.array(list(gaps.values())) * 1e3
        lines.append(f"| {policy} | {num_requests * out_len / total:.0f} | {np.percentile(ttft, 50):.1f} | "
                     f"{np.percentile(ttft, 90):.1f} | {np.percentile(tpot, 50):.2f} | {np.percentile(gap, 90):.1f} | "
                     f"{_agreement(tokens, reference)} | {new_shapes} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--long-prompt", type=int, default=1024, help="extra case: this prompt length at --long-batch")
    ap.add_argument("--long-batch", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3,
                    help="timed runs of each workload, jaxserve's and transformers eager's (the median reports): "
                         "one run of either moved by 10-15%% from one device call to the next")
    ap.add_argument("--impls", nargs="+", default=["pallas"], help="jaxserve attention impls to time")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], choices=["auto", "fp8", "fp8_e5m2"],
                    help="each jaxserve row at each of these KV pool dtypes (EngineConfig.kv_cache_dtype)")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--shape", default="0.5B", choices=list(QWEN25_SHAPES),
                    help="the Qwen2.5 size whose shapes the random-weight model takes (past 1.5B the transformers "
                         "checkpoint takes minutes to build on the host; with --no-hf only the engine is timed)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="the engine's max_model_len (default: the workload's prompt + output + 16; "
                         "the model's 32768 is what a default engine uses, and sets the block table's width)")
    ap.add_argument("--no-static", action="store_true", help="skip the plain JAX static decoder (slow to compile)")
    ap.add_argument("--no-hf-compile", action="store_true")
    ap.add_argument("--hf-compile-batches", type=int, nargs="+", default=[256])
    ap.add_argument("--out", default=None, help="write the table (markdown) and rows (json) here")
    ap.add_argument("--policies", action="store_true",
                    help="instead: compare the scheduling policies on one open-loop workload")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=8.0, help="arrivals per second (--policies)")
    ap.add_argument("--max-running", type=int, default=16, help="(--policies)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="--policies: weights and KV pool (float32 checks that the policies agree token for token)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="--policies: compile shapes on first use instead of every bucket up front (timings then "
                         "include compilation; for the float32 token check)")
    args = ap.parse_args()

    shape = TINY if args.tiny else qwen25_shape(args.shape)
    model_name = "tiny" if args.tiny else f"Qwen2.5-{args.shape} shape"
    path = tempfile.mkdtemp()
    hf = make_checkpoint(shape, path)
    cfg = ModelConfig.from_pretrained(path)
    params = load_hf_params(path, cfg, args.dtype if args.policies else "bfloat16")
    m = LoadedModel(params, cfg, None, path, "bench")
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    if args.policies:
        lines = [f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; model {model_name}"]
        lines += bench_policies(m, args.num_requests, args.max_running, args.rate, args.output_len,
                                args.prompt_len, args.decode_steps, args.impls[0], args.dtype,
                                warmup=not args.no_warmup)
        write_lines(args.out, "policies.md", lines)
        return
    bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"device {jax.devices()[0].device_kind}; weights {weight_bytes / 1e9:.3f} GB; copy bandwidth "
          f"{bw / 1e12:.3f} TB/s; read ceiling {read_bw / 1e12:.3f} TB/s")
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    cases = [(b, args.prompt_len) for b in args.batches] + ([(args.long_batch, args.long_prompt)] if args.long_prompt else [])
    first_token_s = None
    for batch, plen in cases:
        prompts = rng.integers(2, cfg.vocab_size, size=(batch, plen)).tolist()
        if not args.no_static:
            rows.append(bench_static(cfg, params, prompts, args.output_len))
            print(rows[-1], flush=True)
        for impl, kv_dtype in [(i, d) for i in args.impls for d in args.kv_cache_dtypes]:
            try:
                row, ft = bench_jaxserve(m, batch, prompts, args.output_len, args.decode_steps, impl,
                                         first=first_token_s is None, runs=args.runs,
                                         max_model_len=args.max_model_len, kv_cache_dtype=kv_dtype)
            except Exception as exc:  # keep the other systems' numbers; the failure is reported
                print(f"jaxserve[{impl}, kv {kv_dtype}] batch {batch} failed: {exc!r}", flush=True)
                continue
            first_token_s = first_token_s or ft
            # The pool's dtype as bench_jaxserve's engine has it (bf16 activations; "auto" pages are theirs).
            kv_itemsize = jnp.dtype(EngineConfig(dtype="bfloat16", kv_cache_dtype=kv_dtype).kv_dtype()).itemsize
            kv_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * kv_itemsize * batch
                        * (plen + args.output_len // 2))
            # bw counts a copy's reads + writes: the rate HBM moves bytes, which a step's reads share.
            row.roofline_ms = (weight_bytes + kv_bytes) / bw * 1e3
            row.roofline_read_ms = (weight_bytes + kv_bytes) / read_bw * 1e3
            rows.append(row)
            print(row, flush=True)
        if not args.no_hf:
            hf_dev = hf.to("cuda") if jax.default_backend() == "gpu" else hf
            rows.append(bench_hf(hf_dev, batch, prompts, args.output_len, compiled=False, runs=args.runs))
            print(rows[-1], flush=True)
            if not args.no_hf_compile and batch in args.hf_compile_batches:
                # transformers compiles the decoding forward itself (torch.compile, mode
                # "reduce-overhead") when generate runs a static cache on a GPU: its documented
                # fastest path. Wrapping forward by hand as well would compile prefill too.
                rows.append(bench_hf(hf_dev, batch, prompts, args.output_len, compiled=True))
                print(rows[-1], flush=True)
    lines = [f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; weights {weight_bytes / 1e9:.3f} GB; "
             f"copy bandwidth {bw / 1e12:.3f} TB/s (read+write); read ceiling {read_bw / 1e12:.3f} TB/s; "
             f"first token of first request "
             f"(compilation included): {first_token_s or float('nan'):.1f} s", "",
             ("| system | batch | prompt | output | out tok/s | TTFT ms | TPOT ms | decode step ms | kernels/step | "
              "roofline ms (copy) | step / roofline (copy) | roofline ms (read) | step / roofline (read) | note |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def ratio(step, roof):
        return "" if step is None or roof is None else f"{step / roof:.2f}x"

    for r in rows:
        f = lambda v, p=2: "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(f"| {r.system} | {r.batch} | {r.prompt_len} | {r.output_len} | {r.tokens_per_s:.0f} | "
                     f"{f(r.ttft_ms, 1)} | {f(r.tpot_ms)} | {f(r.step_ms, 3)} | {f(r.kernels_per_step)} | "
                     f"{f(r.roofline_ms, 3)} | {ratio(r.step_ms, r.roofline_ms)} | {f(r.roofline_read_ms, 3)} | "
                     f"{ratio(r.step_ms, r.roofline_read_ms)} | {r.note} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "throughput.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "throughput.json"), "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
