"""Run each attention kernel of interest a few times, plainly, for Nsight Compute to read.

Not a timer: `ncu` replays each matching launch and reads the hardware counters
(occupancy, registers and shared memory per program, DRAM throughput, stall reasons).
Each case is one call shape of the issue-6 table or of the engine's decode step.

    ncu --clock-control none -k regex:'paged|fused|combine' --section SpeedOfLight \\
        --section Occupancy --section LaunchStats --section WarpStateStats \\
        -o $OUT/probe python3 bench/ncu_probe.py --calls 1 --cases 7b_64x2k fused_256x192

Kernel names in the report: `paged_attention`, `fused_decode_attention`, `split_combine`,
`greedy_pick`, `skinny_matmul_norm_swiglu`, `skinny_matmul` (case gemv_b1: `-k regex:skinny`).
`--set full` (38 passes a kernel) is too slow for more than two or three kernels in one call.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

# ncu saves and restores the device memory a replayed kernel may write. With JAX's default
# preallocation (75% of the GPU) that is ~100 GB; the pool-writing fused decode kernel never
# finished profiling within 200 s in session 7, probably for that reason (ncu warned of the
# backup). Allocating on demand keeps the backup to the probe's own arrays.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxserve_kernels.paged_attention import paged_attention  # noqa: E402

HEADS = {"7b": (28, 4, 128), "05b": (14, 2, 64)}
PAGE = 16


def paged_case(heads: str, batch: int, context: int, pool_dtype=None, **tuning):
    """`pool_dtype`: the pages rounded into it (an fp8 format: `jaxserve_kernels.kv_dtype`)."""
    num_heads, kv_heads, head_dim = HEADS[heads]
    pages_per_seq = context // PAGE
    num_pages = batch * pages_per_seq
    key = jax.random.key(0)
    shape = (kv_heads, num_pages, PAGE, head_dim)
    k = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 2), shape, jnp.bfloat16)
    if pool_dtype is not None:
        from jaxserve_kernels.kv_dtype import to_pool

        k, v = to_pool(k, pool_dtype), to_pool(v, pool_dtype)
    table = jnp.asarray(np.random.default_rng(0).permutation(num_pages).astype(np.int32)
                        .reshape(batch, pages_per_seq))
    lengths = jnp.full((batch,), context, jnp.int32)
    q = jax.random.normal(key, (batch, num_heads, head_dim), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, t, n: paged_attention(q, k, v, t, n, **tuning))
    return lambda: fn(q, k, v, table, lengths)


def fused_case(batch: int, context: int, heads: tuple[int, int, int] = (14, 2, 64)):
    from bench.fused_tune import build
    from jaxserve_kernels.decode_attention import fused_decode_attention
    pools, tables, lengths, slots, cos, sin, qkv, _ = build(batch, context, *heads, 1, None)
    k, v = pools[0]
    fn = jax.jit(lambda *a: fused_decode_attention(*a)[0])
    return lambda: fn(qkv, cos, sin, k, v, tables, lengths, slots)


def fused_o_case(batch: int, context: int):
    """The one-row step's attention as the engine runs it over short tables: RoPE, the cache write, the attention
    and o_proj's partial sums in one launch (`fused_decode_attention_o`, Qwen2.5-0.5B heads and Wo), the kernel
    session 42's chain-cost line found 2.7 µs above it (5.81 µs a launch in the step)."""
    from bench.fused_tune import build
    from jaxserve_kernels.decode_attention import fused_decode_attention_o
    pools, tables, lengths, slots, cos, sin, qkv, _ = build(batch, context, 14, 2, 64, 1, None)
    k, v = pools[0]
    wo = jax.random.normal(jax.random.key(6), (896, 896), jnp.bfloat16)
    fn = jax.jit(lambda *a: fused_decode_attention_o(*a)[0])
    return lambda: fn(qkv, cos, sin, k, v, tables, lengths, slots, wo)


def pick_case(rows: int, logprobs: bool = True):
    """The greedy pick over `[rows, 151936]` bf16 logits; `logprobs=False`: the argmax alone (kernel
    `greedy_argmax`, what a 256-row greedy step runs: 29 µs in its profile, 1.1-1.3 TB/s cold)."""
    from jaxserve_kernels.greedy_pick import greedy_pick
    logits = jax.random.normal(jax.random.key(3), (rows, 151936), jnp.bfloat16)
    fn = jax.jit(functools.partial(greedy_pick, logprobs=logprobs))
    return lambda: fn(logits)


def gemv_case():
    """Batch 1's slow and fast one-row projections at Qwen2.5-0.5B shapes, default tiles: gate_up
    with its norm folded (`skinny_matmul_norm_swiglu`, 7.2 µs for 8.7 MB in session 15) and down
    (`skinny_matmul`, 4.55 µs for the same bytes)."""
    import importlib

    sm = importlib.import_module("jaxserve_kernels.skinny_matmul")
    key = jax.random.key(4)
    hidden = jax.random.normal(key, (1, 896), jnp.bfloat16)
    partials = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, 896), jnp.float32)
    scale = jnp.ones((896,), jnp.bfloat16)
    gate_up = jax.random.normal(jax.random.fold_in(key, 2), (2 * 4864, 896), jnp.bfloat16)
    down = jax.random.normal(jax.random.fold_in(key, 3), (896, 4864), jnp.bfloat16)
    act = jax.random.normal(jax.random.fold_in(key, 4), (1, 4864), jnp.bfloat16)
    up_fn = jax.jit(lambda h, p, s, w: sm.skinny_matmul_norm(h, p, s, w, eps=1e-6, epilogue="swiglu")[1])
    down_fn = jax.jit(lambda x, w: sm.skinny_matmul(x, w, epilogue="partials", layout="nk"))
    return lambda: (up_fn(hidden, partials, scale, gate_up), down_fn(act, down))


def gemm_case(rows: int):
    """The decode step's projections at ``rows`` rows as the model calls them (Qwen2.5-0.5B shapes,
    "nk" weights, the tensor-core skinny path, default tiles): QKV with its bias, o and down leaving
    K-split partials, gate_up with SwiGLU; and the add + RMSNorm between them."""
    import importlib

    sm = importlib.import_module("jaxserve_kernels.skinny_matmul")
    from jaxserve_kernels.residual_norm import add_rms_norm

    key = jax.random.key(5)
    rnd = lambda i, shape, dt=jnp.bfloat16: jax.random.normal(jax.random.fold_in(key, i), shape, dt)  # noqa: E731
    x, act = rnd(0, (rows, 896)), rnd(1, (rows, 4864))
    w = {"qkv": rnd(2, (1152, 896)), "o": rnd(3, (896, 896)), "gate_up": rnd(4, (2 * 4864, 896)),
         "down": rnd(5, (896, 4864))}
    bias = rnd(6, (1152,))
    resid, partials, scale = rnd(7, (rows, 896)), rnd(8, (2, rows, 896), jnp.float32), jnp.ones((896,), jnp.bfloat16)
    mm = jax.jit(lambda x, w, b, epilogue: sm.skinny_matmul(x, w, b, epilogue=epilogue, layout="nk"),
                 static_argnames="epilogue")
    norm = jax.jit(lambda r, p, s: add_rms_norm(r, p, s, eps=1e-6))
    return lambda: (mm(x, w["qkv"], bias, "none"), mm(x, w["o"], None, "partials"),
                    mm(x, w["gate_up"], None, "swiglu"), mm(act, w["down"], None, "partials"),
                    norm(resid, partials, scale))


def mgpu_case(rows: int, partials_block_n: int | None = None):
    """`gemm_case`'s four projections on Mosaic GPU (`jaxserve_kernels.skinny_matmul_mgpu`, default TILES;
    `partials_block_n` retiles o / down / QKV). Its kernels are all named
    `anonymous_mosaic_gpu_kernel`, in the order QKV, o, gate_up, down."""
    from jaxserve_kernels.skinny_matmul_mgpu import skinny_matmul_mgpu

    key = jax.random.key(5)
    rnd = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16)  # noqa: E731
    x, act = rnd(0, (rows, 896)), rnd(1, (rows, 4864))
    w = {"qkv": rnd(2, (1152, 896)), "o": rnd(3, (896, 896)), "gate_up": rnd(4, (2 * 4864, 896)),
         "down": rnd(5, (896, 4864))}
    bn = {"block_n": partials_block_n} if partials_block_n else {}
    mm = jax.jit(lambda x, w, epilogue, bn: skinny_matmul_mgpu(x, w, epilogue=epilogue, **dict(bn)),
                 static_argnames=("epilogue", "bn"))
    pb = tuple(bn.items())
    return lambda: (mm(x, w["qkv"], "partials", pb), mm(x, w["o"], "partials", pb),
                    mm(x, w["gate_up"], "swiglu", ()), mm(act, w["down"], "partials", pb))


CASES = {
    "7b_64x2k": lambda: paged_case("7b", 64, 2048),
    "7b_64x8k": lambda: paged_case("7b", 64, 8192),
    "7b_1x32k": lambda: paged_case("7b", 1, 32768),
    "05b_1x32k": lambda: paged_case("05b", 1, 32768),
    "05b_64x2k": lambda: paged_case("05b", 64, 2048),
    "fused_256x192": lambda: fused_case(256, 192),
    "fused_1x192": lambda: fused_case(1, 192),
    "fused_o_1x192": lambda: fused_o_case(1, 192),
    "fused_64x192": lambda: fused_case(64, 192),
    # session 36: the engine's fused kernel at 7B heads, 8 x 2k, beside `paged_attention` there
    "fused7b_8x2k": lambda: fused_case(8, 2048, (28, 4, 128)),
    "7b_8x2k": lambda: paged_case("7b", 8, 2048),
    # session 53: fp8 pages read ~1.7-2.1 TB/s of their bytes at 0.5B heads, 2.3-2.6 at 7B heads (bandwidth.md)
    "05b_64x8k": lambda: paged_case("05b", 64, 8192),
    "05b_64x8k_fp8": lambda: paged_case("05b", 64, 8192, jnp.float8_e4m3fn),
    "7b_64x8k_fp8": lambda: paged_case("7b", 64, 8192, jnp.float8_e4m3fn),
    "pick_256": lambda: pick_case(256),
    "argmax_256": lambda: pick_case(256, logprobs=False),
    "gemv_b1": gemv_case,
    "gemm_b64": lambda: gemm_case(64),
    "mgpu_b64": lambda: mgpu_case(64),
    "mgpu_b64_n32": lambda: mgpu_case(64, 32),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args()
    for name in args.cases:
        call = CASES[name]()
        for _ in range(args.calls):
            jax.block_until_ready(call())
        print(f"ran {name}", flush=True)


if __name__ == "__main__":
    main()
