"""Where a folded LoRA projection's time goes (model.LORA_FOLD), one projection shape at a time, on the GPU.

For each Qwen2.5-0.5B projection at the given row counts, 24 calls (one per layer, each on its own weights, so L2
holds no layer's weights for the next) of:
  mgpu      the base model's projection as the step runs it (`skinny_matmul_mgpu`, Mosaic GPU)
  triton    Triton's `skinny_matmul` alone (the path the fold moves the projection to)
  shrink sN `lora_shrink` alone (the fold's first launch) with at most N K splits (`LORA_SHRINK_SPLITS`)
  folded sN `skinny_matmul` with the rows' `lora` term (the fold's second launch) over that shrink's parts
  folded1   the same with the shrink's partial sums added beforehand (one part to load)
  xla       the projection on Mosaic GPU plus XLA's adapter term (`lora_delta`) and add, as the plain path does
Each variant is its own jitted function, profiled (`jax.profiler`): GPU µs a layer (all its launches) and launches
a layer. `python3 bench/lora_fold.py --rows 64 256`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode_step import gpu_kernel_times  # noqa: E402
from jaxserve.lora import lora_delta  # noqa: E402
sm = importlib.import_module("jaxserve_kernels.skinny_matmul")  # the package exports a function of that name
from jaxserve_kernels.skinny_matmul import LoraTerm, lora_shrink, skinny_matmul  # noqa: E402
from jaxserve_kernels.skinny_matmul_mgpu import skinny_matmul_mgpu  # noqa: E402

# (name, K, N, epilogue, bias): Qwen2.5-0.5B's decode projections, weights [N, K].
PROJECTIONS = [("qkv", 896, 1152, "none", True), ("o", 896, 896, "none", False),
               ("gate_up", 896, 2 * 4864, "swiglu", False), ("down", 4864, 896, "none", False)]


def with_splits(splits: int, fn, *args):
    """``fn(*args)`` traced with `skinny_matmul.LORA_SHRINK_SPLITS` at ``splits``."""
    saved, sm.LORA_SHRINK_SPLITS = sm.LORA_SHRINK_SPLITS, splits
    try:
        return fn(*args)
    finally:
        sm.LORA_SHRINK_SPLITS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shrink-splits", type=int, nargs="+", default=[8, 2, 1],
                    help="skinny_matmul.LORA_SHRINK_SPLITS values to time (shrink and folded columns each)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    dt = jnp.bfloat16

    def rand(shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, dt)

    print(f"# {jax.devices()[0].device_kind}: GPU µs a layer (launches a layer), {args.layers} layers, "
          f"{args.slots} slots of rank {args.rank}")
    header = True
    for m in args.rows:
        slots = jnp.asarray(rng.integers(-1, args.slots, m), jnp.int32)
        for name, k, n, epilogue, has_bias in PROJECTIONS:
            layers = args.layers
            x = rand((m, k))
            ws = [rand((n, k), k ** -0.5) for _ in range(layers)]
            bias = rand((n,)) if has_bias else None
            a = [rand((args.slots, args.rank, k), k ** -0.5) for _ in range(layers)]
            b = [rand((args.slots, args.rank, n), 0.1) for _ in range(layers)]
            flat_a = [v.reshape(-1, k) for v in a]
            flat_b = [v.reshape(-1, n) for v in b]
            shrinks = {s: [with_splits(s, lora_shrink, x, v) for v in flat_a] for s in args.shrink_splits}
            summed = [v.sum(0) for v in shrinks[args.shrink_splits[0]]]
            mgpu_epilogue = "swiglu" if epilogue == "swiglu" else "none"

            def xla_term(i):
                y = skinny_matmul_mgpu(x, ws[i], bias, epilogue="none")
                y = y + lora_delta(x[:, None], a[i], b[i], slots)[:, 0]
                if epilogue == "swiglu":
                    y = jax.nn.silu(y[:, : n // 2]) * y[:, n // 2:]
                return y

            variants = {
                "mgpu": lambda i: skinny_matmul_mgpu(x, ws[i], bias, epilogue=mgpu_epilogue),
                "triton": lambda i: skinny_matmul(x, ws[i], bias, epilogue=epilogue, layout="nk"),
            }
            for s in args.shrink_splits:
                variants[f"shrink s{s}"] = lambda i, s=s: with_splits(s, lora_shrink, x, flat_a[i])
                variants[f"folded s{s}"] = lambda i, s=s: skinny_matmul(
                    x, ws[i], bias, epilogue=epilogue, layout="nk",
                    lora=LoraTerm(shrinks[s][i], flat_b[i], slots, args.rank))
            variants |= {
                "folded1": lambda i: skinny_matmul(x, ws[i], bias, epilogue=epilogue, layout="nk",
                                                   lora=LoraTerm(summed[i], flat_b[i], slots, args.rank)),
            "xla": xla_term,
            }
            if header:
                print("| rows | projection | " + " | ".join(variants) + " |")
                print("|---:|:---|" + "---:|" * len(variants))
                header = False
            cells = []
            for label, fn in variants.items():
                run = jax.jit(lambda fn=fn: [fn(i) for i in range(layers)])
                try:
                    jax.block_until_ready(run())
                    jax.block_until_ready(run())
                    with tempfile.TemporaryDirectory() as d:
                        with jax.profiler.trace(d):
                            jax.block_until_ready(run())
                        times = gpu_kernel_times(d)
                    launches = sum(c for c, _ in times.values()) / layers
                    busy = sum(t for _, t in times.values()) / layers
                    cells.append(f"{busy:.2f} ({launches:.0f})")
                except Exception as e:  # noqa: BLE001 (a shape a kernel does not take: say so, time the rest)
                    cells.append(f"n/a: {type(e).__name__}")
            print(f"| {m} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
