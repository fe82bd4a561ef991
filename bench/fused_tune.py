"""Launch-parameter sweep of the fused decode-attention kernel at the engine's decode shapes.

One timed function is one decode step's attention: the kernel over 24 distinct KV pools
(one per layer, as in the model, so the pools do not sit in the 50 MB L2 together),
each call's output feeding the next call's query so nothing is hoisted. Reported: the
median time per layer-call and its K/V bytes over that time.

    python bench/fused_tune.py --cases 256x192 64x192 1x192
    python bench/fused_tune.py --cases 256x192 --same-pool   # every call over one pool: its pages warm in L2
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxserve.model import rope_tables  # noqa: E402
from jaxserve_kernels.decode_attention import fused_decode_attention  # noqa: E402


def build(batch: int, ctx: int, heads: int, kv_heads: int, head_dim: int, layers: int, table_pages: int | None,
          page_size: int = 16):
    """Inputs of `layers` calls: pools, a random non-contiguous block table, lengths = ctx + 1."""
    width = table_pages or -(-(ctx + 1) // page_size)
    num_pages = batch * width + 1
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    pools = [(jax.random.normal(jax.random.fold_in(key, 2 * i), (kv_heads, num_pages, page_size, head_dim),
                                jnp.bfloat16),
              jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (kv_heads, num_pages, page_size, head_dim),
                                jnp.bfloat16)) for i in range(layers)]
    tables = jnp.asarray(rng.permutation(num_pages - 1)[: batch * width].reshape(batch, width).astype(np.int32))
    lengths = jnp.full((batch,), ctx + 1, jnp.int32)
    slots = tables[:, ctx // page_size] * page_size + ctx % page_size
    cos, sin = rope_tables(jnp.full((batch,), ctx), head_dim, 1e6)
    qkv = jax.random.normal(key, (batch, heads + 2 * kv_heads, head_dim), jnp.bfloat16)
    kv_bytes = batch * kv_heads * ctx * head_dim * 2 * 2
    return pools, tables, lengths, slots, cos, sin, qkv, kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["256x192", "64x192", "1x192", "256x1024"],
                    help="BATCHxCONTEXT")
    ap.add_argument("--heads", default="14/2/64", help="query heads / kv heads / head_dim")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4, help="decode steps (x layers calls) per timed device call")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median over them)")
    ap.add_argument("--table-pages", type=int, default=None)
    ap.add_argument("--ppb", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--splits", type=int, nargs="+", default=[0], help="0: the kernel's default")
    ap.add_argument("--same-pool", action="store_true",
                    help="all --layers calls over one pool (what the kernel costs with its pages in L2, against "
                         "the cold default: how much a read-ahead of the pages could win)")
    args = ap.parse_args()
    h, kvh, d = map(int, args.heads.split("/"))
    print(f"device {jax.devices()[0].device_kind}; heads {args.heads}; {args.layers} layers a call", flush=True)
    for case in args.cases:
        batch, ctx = map(int, case.split("x"))
        pools, tables, lengths, slots, cos, sin, qkv, kv_bytes = build(
            batch, ctx, h, kvh, d, 1 if args.same_pool else args.layers, args.table_pages)
        # Every configuration is compiled first, then all are timed in alternating rounds, the
        # pools threaded from one to the next: one-config-after-another timing read the first
        # configuration up to ~15% fast (session 4) and repeats of one config ~10% apart
        # (session 8); interleaving spreads such drift over all of them.
        configs = [None] + list(itertools.product(args.ppb, args.warps, args.stages, args.splits))
        steps = {}
        state = (qkv, pools)
        for cfgt in configs:
            tune = {} if cfgt is None else dict(pages_per_block=cfgt[0], num_warps=cfgt[1], num_stages=cfgt[2],
                                                num_splits=cfgt[3] or None)

            def one_step(_, carry, tune=tune):
                x, pools = carry
                new = list(pools)
                # Call i over pool i, or with --same-pool over the one pool, threaded (each call writes its slot again).
                for i in range(args.layers):
                    kp, vp = new[i % len(new)]
                    out, kp, vp = fused_decode_attention(x, cos, sin, kp, vp, tables, lengths, slots, **tune)
                    new[i % len(new)] = (kp, vp)
                    # The next layer's query depends on this output: no call can be hoisted or skipped.
                    x = x.at[:, :h].set(out.reshape(batch, h, d).astype(x.dtype))
                return x, new

            # The pools are donated and carried, as in the engine: the in-place cache write
            # must not turn into a copy of every pool per call.
            step = jax.jit(lambda x, pools, one_step=one_step: jax.lax.fori_loop(
                0, args.steps, one_step, (x, pools)), donate_argnums=1)
            label = "default" if cfgt is None else f"ppb{cfgt[0]} w{cfgt[1]} st{cfgt[2]} s{cfgt[3] or 'def'}"
            try:
                for _ in range(2):  # compile, then one warm call
                    state = step(*state)
                jax.block_until_ready(state[0])
            except Exception as e:  # a configuration Triton cannot compile is skipped (before donating)
                print(f"  {case} {label}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            steps[label] = step
        rounds = {label: [] for label in steps}
        for _ in range(args.rounds):
            for label, step in steps.items():
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    state = step(*state)
                    jax.block_until_ready(state[0])
                    times.append(time.perf_counter() - t0)
                rounds[label].append(float(np.median(times)) / (args.steps * args.layers))
        results = []
        for label, per_round in rounds.items():
            t = float(np.median(per_round))
            results.append((t, label))
            print(f"  {case} {label:18s} {t * 1e6:7.2f} µs/layer {kv_bytes / t / 1e12:5.2f} TB/s "
                  f"(rounds {min(per_round) * 1e6:.2f}-{max(per_round) * 1e6:.2f})", flush=True)
        best = min(results)
        default = dict((lab, t) for t, lab in results).get("default")
        print(f"BEST {case}: {best[1]} {best[0] * 1e6:.2f} µs vs default "
              f"{'-' if default is None else f'{default * 1e6:.2f}'} µs", flush=True)


if __name__ == "__main__":
    main()
