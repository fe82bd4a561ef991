"""What a decode step's sampler costs after the LM head, by sampling setting, and what top-k selection costs.

`sampling.sample` over bf16 logits ``[rows, 151936]`` (Qwen2's vocabulary), every row with the same setting:

- `greedy` (temperature 0: the argmax), `temp` (temperature 0.8: the Gumbel draw over the whole row),
  `top_p` (0.8 + top-p 0.9), `top_k` (0.8 + top-k 50), `min_p` (0.8 + min-p 0.05), `top_p+logprobs5`.

The logits are shaped like a language model's, not flat noise: a random row of N(0, 1) plus a decaying boost on
~2,000 random tokens, so that top-p 0.9's nucleus lies inside the sampler's 1,024 candidates as it usually does
with a trained model (with flat noise every row would fall back to the full sort).

Then top-k selection alone (`--top-k`, e.g. 5 20 1024): `jax.lax.top_k` against a two-stage top-k (each chunk of
``--chunk`` tokens' top k, then the top k of those), which gives the same values.

Each is ``--reps`` calls inside one jitted loop over ``--buffers`` distinct logits arrays (each call's buffer chosen
by the previous call's result so calls neither hoist nor merge); median of ``--rounds`` loops, per call.

    python bench/sampler_cost.py --rows 1 64 256
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxserve.sampling import SamplingParams, make_batch, sample  # noqa: E402

VOCAB = 151936
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temp": dict(temperature=0.8),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_k": dict(temperature=0.8, top_k=50),
    "min_p": dict(temperature=0.8, min_p=0.05),
    "top_p+logprobs5": dict(temperature=0.8, top_p=0.9, logprobs=5),
}


def lm_like_logits(key: jax.Array, rows: int) -> jax.Array:
    base, perm_key = jax.random.split(key)
    x = jax.random.normal(base, (rows, VOCAB), jnp.float32)
    boosted = jax.vmap(lambda k: jax.random.permutation(k, VOCAB)[:2048])(jax.random.split(perm_key, rows))
    boost = 16.0 - 2.0 * jnp.log1p(jnp.arange(2048, dtype=jnp.float32))
    x = x.at[jnp.arange(rows)[:, None], boosted].add(boost[None, :])
    return x.astype(jnp.bfloat16)


def two_stage_top_k(x: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """The top k of each row of ``x`` [B, V] as the top k of each ``chunk`` of tokens' top k (exact: a row's top k
    lie among its chunks' top k). The vocabulary is padded to whole chunks with -inf."""
    b, v = x.shape
    chunks = -(-v // chunk)
    padded = jnp.pad(x, ((0, 0), (0, chunks * chunk - v)), constant_values=-jnp.inf)
    vals, idx = jax.lax.top_k(padded.reshape(b, chunks, chunk), min(k, chunk))
    idx = idx + (jnp.arange(chunks) * chunk)[None, :, None]
    vals, at = jax.lax.top_k(vals.reshape(b, -1), k)
    return vals, jnp.take_along_axis(idx.reshape(b, -1), at, axis=-1)


def timed_loop(body, pool: jax.Array, rows: int, reps: int, rounds: int, profile: str | None = None) -> float:
    """Median µs a call of ``body(logits, i) -> f32 [rows]`` over ``reps`` calls in one jitted loop, each call's buffer
    of ``pool`` ([buffers, rows, V]) picked through the call before's result (times zero), so that calls neither
    hoist nor merge and the logits are read in place, as a step reads the LM head's output; ``profile``: also
    trace one loop there and print its GPU time per kernel."""
    buffers = pool.shape[0]

    @jax.jit
    def loop(pool):
        def step(i, acc):
            at = (i + (acc[0] * 0).astype(jnp.int32)) % buffers
            return acc + body(jax.lax.dynamic_index_in_dim(pool, at, keepdims=False), i)

        return jax.lax.fori_loop(0, reps, step, jnp.zeros((rows,), jnp.float32))

    loop(pool).block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        loop(pool).block_until_ready()
        times.append((time.perf_counter() - start) / reps * 1e6)
    if profile:  # GPU time per kernel of one loop, per call, biggest first
        from bench.decode_step import gpu_kernel_times, grouped_kernel_times

        with jax.profiler.trace(profile, create_perfetto_trace=True):
            loop(pool).block_until_ready()
        for name, (n, t) in grouped_kernel_times(gpu_kernel_times(profile))[:12]:
            print(f"   {t / reps:8.1f} µs/call {n / reps:5.1f} launches/call  {name[:90]}", flush=True)
    return float(np.median(times))


def sampler_body(setting: str, rows: int):
    options = dict(SETTINGS[setting])
    top = options.pop("logprobs", 0)
    batch = make_batch([SamplingParams(seed=r, **options) for r in range(rows)], rows)
    logprobs = bool(top)

    def body(logits, i):
        out = sample(logits, batch, jnp.full((rows,), i, jnp.int32), num_top_logprobs=top, logprobs=logprobs)
        extra = out.logprobs + out.top_logprobs.sum(-1) if logprobs else 0.0
        return out.tokens.astype(jnp.float32) + extra

    return body


def top_k_body(k: int, chunk: int | None):
    def body(logits, i):
        vals, ids = (jax.lax.top_k(logits, k) if chunk is None else two_stage_top_k(logits, k, chunk))
        return vals.astype(jnp.float32).sum(-1) + ids[:, -1]

    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--top-k", type=int, nargs="*", default=[5, 20, 1024], help="none: no top-k table")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--profile", default=None, help="trace each setting at the largest row count here, print per kernel")
    ap.add_argument("--buffers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from jaxserve import sampling

    print(f"sampling.CANDIDATE_CHUNKS {sampling.CANDIDATE_CHUNKS} x CHUNK_TOKENS {sampling.CHUNK_TOKENS}")
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; vocab {VOCAB}, bf16 logits, "
          f"{args.buffers} buffers, {args.reps} calls a loop, median of {args.rounds} loops; µs a call")
    print("\n| rows | " + " | ".join(args.settings) + " |")
    print("|---|" + "---|" * len(args.settings))
    pools = {}
    for rows in args.rows:
        keys = jax.random.split(jax.random.key(rows), args.buffers)
        pools[rows] = jnp.stack([lm_like_logits(k, rows) for k in keys])
        t = [timed_loop(sampler_body(s, rows), pools[rows], rows, args.reps, args.rounds,
                    os.path.join(args.profile, f"{s}_{rows}") if args.profile and rows == max(args.rows) else None)
             for s in args.settings]
        print(f"| {rows} | " + " | ".join(f"{v:.1f}" for v in t) + " |", flush=True)
    if not args.top_k:
        return
    forms = [("lax.top_k", None)] + [(f"two-stage {c}", c) for c in args.chunks]
    print("\n| rows | k | " + " | ".join(name for name, _ in forms) + " | same values |")
    print("|---|---|" + "---|" * len(forms) + "---|")
    for rows in args.rows:
        for k in args.top_k:
            # A chunk no wider than k selects nothing in its first stage: not timed.
            t = [timed_loop(top_k_body(k, c), pools[rows], rows, args.reps, args.rounds) if c is None or c > k else None
                 for _, c in forms]
            x = pools[rows][0]
            want = jax.lax.top_k(x, k)[0]
            same = all(bool((two_stage_top_k(x, k, c)[0] == want).all()) for _, c in forms[1:] if c > k)
            print(f"| {rows} | {k} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in t) + f" | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()
