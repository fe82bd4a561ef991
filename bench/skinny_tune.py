"""Tiling sweep of the skinny-matmul kernel against XLA's dot on Qwen2.5-0.5B's projections.

Each timed function runs one projection shape over 24 distinct weight matrices (one per
layer, ~50-420 MB in all, so the 50 MB L2 cannot hold them) inside one jit, every product
an output; reported is the median time per matrix and its weight bytes over that time.
(Session 3's and 4's tables in bench/results/decode_step.md were taken with an accumulating
add per matrix in the timed function, which weighs on the 128- and 256-row times.)

    python bench/skinny_tune.py --rows 1 64
    python bench/skinny_tune.py --rows 256 --block-n 64 --block-k 64 128   # row blocks vs cuBLAS
    python bench/skinny_tune.py --rows 256 --shapes gate_up --epilogue swiglu --block-m 64 128
        # gate_up + SwiGLU in one kernel vs cuBLAS gate_up and XLA's SwiGLU fusion
    python bench/skinny_tune.py --rows 1 --layouts kn nk --block-n 16 32 64 --block-k 128 256 512
        # weights [K, N] (Flax) against [N, K] (Hugging Face), XLA's dot on each too
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

from jaxserve.runner import WIDE_DECODE_OPTIONS  # noqa: E402
from jaxserve_kernels.skinny_matmul import MAX_ROWS, skinny_matmul, split_count  # noqa: E402

SHAPES = {"qkv": (896, 1152), "o": (896, 896), "gate_up": (896, 9728), "down": (4864, 896)}


def time_fn(fn, *args, reps: int = 30) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--shapes", nargs="+", default=["gate_up", "down", "qkv", "o"])
    ap.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--block-k", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--stages-warps", nargs="+", default=["3x4", "4x4", "4x8"], help="STAGESxWARPS")
    ap.add_argument("--targets", type=int, nargs="+", default=[264, 528], help="programs wanted (sets the K split)")
    ap.add_argument("--block-m", type=int, nargs="+", default=[64], help="rows a program")
    ap.add_argument("--layouts", nargs="+", default=["kn"], choices=["kn", "nk"],
                    help="weight layouts timed: kn = [K, N], nk = [N, K] (each with XLA's dot)")
    ap.add_argument("--epilogue", default="none", choices=["none", "swiglu"],
                    help="swiglu: silu(gate) * up from the fused gate_up weight (never split), "
                         "against XLA's dot and its SwiGLU fusion")
    args = ap.parse_args()
    stages_warps = [tuple(map(int, sw.split("x"))) for sw in args.stages_warps]
    key = jax.random.key(0)
    print(f"device {jax.devices()[0].device_kind}", flush=True)
    for name, layout in itertools.product(args.shapes, args.layouts):
        k, n = SHAPES[name]
        shape = (n, k) if layout == "nk" else (k, n)
        ws = [jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) * 0.02 for i in range(args.layers)]
        nbytes = k * n * 2
        for m in args.rows:
            x = jax.random.normal(key, (m, k), jnp.bfloat16)

            def run(tile):
                # Every product is an output, so none is dead code, and nothing but the products
                # runs (an accumulating add per matrix, as before, dominated the 256-row times).
                def xla(x, w):
                    y = jnp.dot(x, w.T if layout == "nk" else w)
                    if args.epilogue == "swiglu":
                        half = y.shape[1] // 2
                        y = jax.nn.silu(y[:, :half]) * y[:, half:]
                    return y

                def f(x, ws):
                    return tuple(xla(x, w) if tile is None
                                 else skinny_matmul(x, w, epilogue=args.epilogue, layout=layout, **tile)
                                 for w in ws)
                if tile is None and m > MAX_ROWS:
                    # XLA as the engine compiles steps this wide (cuBLAS: runner.WIDE_DECODE_OPTIONS).
                    return jax.jit(f).lower(x, ws).compile(WIDE_DECODE_OPTIONS or None)
                return jax.jit(f)

            rows = [("xla", None)]
            for bm, bn, bk, (st, wp), target in itertools.product(
                    args.block_m, args.block_n, args.block_k, stages_warps, args.targets):
                splits = 1 if args.epilogue == "swiglu" else split_count(m, k, n, bn, bk, target, bm)
                rows.append((f"bm{bm} bn{bn} bk{bk} st{st} w{wp} s{splits}",
                             dict(block_m=bm, block_n=bn, block_k=bk, num_stages=st, num_warps=wp,
                                  num_splits=splits)))
            seen = set()
            results = []
            for label, tile in rows:
                if label in seen:
                    continue
                seen.add(label)
                try:
                    t = time_fn(run(tile), x, ws) / args.layers
                except Exception as e:  # a tiling Triton cannot compile (shared memory) is skipped
                    print(f"  {name} {layout} M={m} {label}: failed {type(e).__name__}", flush=True)
                    continue
                results.append((t, label))
            xla = next(t for t, label in results if label == "xla")
            print(f"{name} [{k}x{n}] {layout} M={m}: XLA {xla * 1e6:.2f} µs {nbytes / xla / 1e12:.2f} TB/s", flush=True)
            for t, label in sorted(results)[:6]:
                print(f"   {t * 1e6:7.2f} µs {nbytes / t / 1e12:5.2f} TB/s  {label}", flush=True)

if __name__ == "__main__":
    main()
