"""Two half-batch decode chains on two GPU streams: what the 256-row step would gain from running its halves
side by side (issue 8's last 13% to the 2x roofline).

Why: at 256 rows every kernel of the decode step is latency-bound (20-50% of the GPU) and the GPU is busy
98.8% of the step (bench/results/kernel_notes.md, session 36), so no single kernel is left to speed up by
much; two independent chains whose kernels run concurrently could fill each other's gaps. This measures the
upper bound before the engine is restructured for it: each half (128 rows) has its own KV pool here, so the
halves share only the weights (the engine's one pool would chain their attention kernels layer by layer).

How: one jitted call of `--decode-steps` steps; each step runs half A's `Steps.decode_one` and half B's, and
in the `streams` mode each half is wrapped in `jax.experimental.compute_on(compute_type="gpu_stream:N")`, so
XLA launches the halves as async regions on computation streams 1 and 2 (checked offline with the deviceless
compile: both regions start before either is awaited, with the latency-hiding scheduler on). Two obstacles
and their work-arounds, for the experiment only: a nested `jax.jit` inside a stream-annotated region fails
XLA's compile ("No ExecutionStreamId found for %call-start"), so every jit made after this module's import is
inlined (the kernel wrappers) and each half is traced under `jax.disable_jit()` (JAX's own jitted helpers
such as `jnp.take`'s). Modes, timed in one process in alternating rounds (median): `full` (the engine's
256-row call), `serial` (the two halves one after the other, same code and pools as `streams`), `streams`.
The tokens of `serial` and `streams` must be equal (same kernels on the same data).

    python3 bench/half_streams.py --batch 256 --profile /tmp/hs     # on the GPU
    python3 bench/half_streams.py --tiny --batch 8 --modes full serial  # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

_JIT = jax.jit


def _inline_jit(fun=None, **kwargs):
    kwargs.setdefault("inline", True)
    return _JIT(fun, **kwargs) if fun is not None else functools.partial(_inline_jit, **kwargs)


# Before jaxserve is imported: its kernel wrappers are jitted at import (see the module docstring).
jax.jit = _inline_jit

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def build(args):
    from bench.throughput import QWEN25_05B, TINY
    from jaxserve.config import ModelConfig
    from jaxserve.model import init_params, new_kv_cache
    from jaxserve.runner import Runner, default_attention_impl
    from jaxserve.sampling import SamplingParams, make_batch

    cfg = ModelConfig.from_hf_dict(dict(TINY if args.tiny else QWEN25_05B, model_type="qwen2"))
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.asarray((rng.standard_normal(s.shape, np.float32) * 0.02).astype(s.dtype)),
                          shapes)
    batch, half, steps = args.batch, args.batch // 2, args.decode_steps
    width = (args.context + steps) // 16 + 2
    impl = default_attention_impl()
    table = np.random.default_rng(batch).permutation(batch * width).reshape(batch, width).astype(np.int32)
    pos = np.full(batch, args.context, np.int32)
    tokens = rng.integers(2, cfg.vocab_size, size=batch).astype(np.int32)
    runner = Runner(cfg, params, num_pages=batch * width + 8, page_size=16, attention_impl=impl)
    sb = make_batch([SamplingParams(temperature=0.0)] * batch, batch)
    full_call = (tokens, pos, pos + steps, table, sb, np.zeros(batch, np.int32), steps)
    # Each half indexes a pool of its own: its rows' page ids renumbered by rank, so they stay distinct and scattered.
    half_pages = half * width + 8
    halves = []
    for lo in (0, half):
        rows = slice(lo, lo + half)
        halves.append(dict(tokens=jnp.asarray(tokens[rows]), pos=jnp.asarray(pos[rows]),
                            limits=jnp.asarray(pos[rows] + steps),
                            table=jnp.asarray(np.argsort(np.argsort(table[rows].ravel())).reshape(half, width)
                                              .astype(np.int32)),
                            sb=make_batch([SamplingParams(temperature=0.0)] * half, half),
                            steps=jnp.zeros(half, jnp.int32)))
    pools = [new_kv_cache(cfg, half_pages, 16, jnp.bfloat16) for _ in range(2)]
    return runner, full_call, halves, pools


def two_half_call(runner, halves, num_steps: int, streams: bool):
    """The jitted call: `num_steps` steps, each half A's `decode_one` then half B's (on streams 2 and 1
    with `streams`); `(pool_a, pool_b, tokens [steps, batch])`, the pools donated."""
    from jax.experimental.compute_on import compute_on

    steps_obj = runner.compiled
    zeros = jnp.zeros((1, 1), jnp.int32)
    options = dict(num_top=0, penalties=False, greedy=True, logprobs=False)

    def half_step(h):
        def run(params, kv, tokens, k):
            with jax.disable_jit():
                (kv, tokens, _, _), out = steps_obj.decode_one(
                    params, (kv, tokens, zeros, zeros), k, h["pos"], h["limits"], h["table"], h["sb"], h["steps"],
                    **options)
            return kv, tokens, out
        return run

    step_a, step_b = half_step(halves[0]), half_step(halves[1])
    if streams:
        step_a = compute_on(compute_type="gpu_stream:2", out_memory_spaces=jax.memory.Space.Device)(step_a)
        step_b = compute_on(compute_type="gpu_stream:1", out_memory_spaces=jax.memory.Space.Device)(step_b)

    def call(params, pool_a, pool_b, tokens_a, tokens_b):
        def one(carry, k):
            pool_a, pool_b, tokens_a, tokens_b = carry
            pool_a, tokens_a, out_a = step_a(params, pool_a, tokens_a, k)
            pool_b, tokens_b, out_b = step_b(params, pool_b, tokens_b, k)
            return (pool_a, pool_b, tokens_a, tokens_b), jnp.concatenate([out_a, out_b])

        (pool_a, pool_b, _, _), outs = jax.lax.scan(one, (pool_a, pool_b, tokens_a, tokens_b),
                                                    jnp.arange(num_steps, dtype=jnp.int32))
        return pool_a, pool_b, outs

    # The wide decode's options (cuBLAS for XLA's GEMMs) and the latency-hiding scheduler, which overlaps
    # the two async regions.
    from jaxserve import runner as runner_module

    compiler_options = dict(runner_module.WIDE_DECODE_OPTIONS)
    if streams:
        compiler_options["xla_gpu_enable_latency_hiding_scheduler"] = True
    return _JIT(call, donate_argnums=(1, 2), compiler_options=compiler_options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["full", "serial", "streams"], choices=["full", "serial", "streams"])
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--profile", default=None, help="trace two calls of each mode here: kernels that overlap")
    args = ap.parse_args()
    t0 = time.perf_counter()
    runner, full_call, halves, pools = build(args)
    steps = args.decode_steps
    state = {"pools": pools}
    calls = {m: two_half_call(runner, halves, steps, m == "streams") for m in args.modes if m != "full"}

    def run(mode):
        if mode == "full":
            return runner.decode(*full_call, greedy=True, logprobs=False).tokens
        pool_a, pool_b, outs = calls[mode](runner.params, *state["pools"], halves[0]["tokens"], halves[1]["tokens"])
        state["pools"] = [pool_a, pool_b]
        return outs

    tokens = {}
    for mode in args.modes:
        tokens[mode] = np.asarray(jax.block_until_ready(run(mode)))
        print(f"{mode}: compiled and ran {time.perf_counter() - t0:.1f} s", flush=True)
    for a, b in (("serial", "streams"), ("full", "serial")):  # the second: 128- against 256-row kernels
        if a in tokens and b in tokens:
            print(f"{a} and {b} tokens equal: {bool((tokens[a] == tokens[b]).all())}", flush=True)
    times = {m: [] for m in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            s = time.perf_counter()
            for _ in range(args.reps):
                out = run(mode)
            jax.block_until_ready(out)
            times[mode].append((time.perf_counter() - s) / (args.reps * steps) * 1e3)
    for mode in args.modes:
        print(json.dumps(dict(mode=mode, batch=args.batch, step_ms=round(float(np.median(times[mode])), 4),
                              rounds=[round(t, 4) for t in times[mode]])), flush=True)
    if args.profile:
        from bench.decode_step import gpu_stream_events, grouped_kernel_times, gpu_kernel_times, kernel_overlaps

        for mode in args.modes:
            trace_dir = os.path.join(args.profile, mode)
            jax.block_until_ready(run(mode))
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(2):
                    out = run(mode)
                jax.block_until_ready(out)
            kernels, events = gpu_stream_events(trace_dir)
            names = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
                     if e.get("ph") == "M" and e.get("name") == "thread_name"}
            per_stream: dict[str, int] = {}
            for e in kernels:
                key = names.get((e["pid"], e.get("tid")), str(e.get("tid")))
                per_stream[key] = per_stream.get(key, 0) + 1
            print(f"profile {mode}: kernels by stream {per_stream}", flush=True)
            span, overlapping, overlap = kernel_overlaps(kernels)
            busy = sum(float(e["dur"]) for e in kernels)
            n = 2 * steps
            print(f"profile {mode}: kernels {len(kernels) / n:.0f} a step, summed {busy / n:.1f} µs a step, first "
                  f"start to last end {span / n:.1f} µs a step; {overlapping / n:.1f} kernels a step start before "
                  f"the one ahead ended, overlapping {overlap / n:.1f} µs a step", flush=True)
            for key, (count, total) in grouped_kernel_times(gpu_kernel_times(trace_dir, kernels))[:12]:
                print(f"   {total / n:8.1f} µs/step {count / n:6.1f} launches/step  {key[:80]}", flush=True)


if __name__ == "__main__":
    main()
