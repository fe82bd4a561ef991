"""The adapter norms of a LoRA decode step, per-row programs against row blocks (`residual_norm.BLOCK_MIN_ROWS`).

Qwen2.5-0.5B's two norms a layer as an adapter step runs them on the accumulating glue: the input norm adds down_proj's
pending term (rank 16, 4 slots) and writes QKV's shrink (48 columns a slot) and its bias-seeded accumulator; the
post-attention norm writes gate_up's shrink (32 a slot) and down's zeroed accumulator. 24 layers chained in one jitted
call (each norm reads the stream the one before wrote), GPU time a launch from a profile of a few calls. Each variant's
outputs are checked against the jnp reference first.

    python3 bench/norm_blocks.py --rows 64 128 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve_kernels import residual_norm  # noqa: E402
from jaxserve_kernels.residual_norm import add_rms_norm, add_rms_norm_reference  # noqa: E402

HIDDEN, LAYERS, SLOTS, RANK = 896, 24, 4, 16
QKV_RANK, GATE_UP_RANK = 3 * RANK, 2 * RANK  # q, k, v (gate, up) side by side in the folded stacks
VARIANTS = {  # name: (blocked, warps, stages, unroll)
    "rows": (False, 4, 1, False),
    "blocks w4": (True, 4, 1, False),
    "blocks w4 stages2": (True, 4, 2, False),
    "blocks w4 stages3": (True, 4, 3, False),
    "blocks w4 unrolled": (True, 4, 1, True),
    "blocks w8": (True, 8, 1, False),
}


def fold_width(columns: int) -> int:
    return -(-columns // 128) * 128


def inputs(rows: int, slots: np.ndarray, rng: np.random.Generator) -> dict:
    def arr(shape, scale, dtype):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    return dict(hidden=arr((rows, HIDDEN), 3, jnp.float32), scale=jnp.asarray(rng.uniform(0.5, 1.5, HIDDEN), jnp.bfloat16),
                bias=arr(((14 + 4) * 64,), 1, jnp.bfloat16), slots=jnp.asarray(slots, jnp.int32),
                a_qkv=arr((fold_width(SLOTS * QKV_RANK), HIDDEN), 0.05, jnp.bfloat16),
                a_gate_up=arr((fold_width(SLOTS * GATE_UP_RANK), HIDDEN), 0.05, jnp.bfloat16),
                t=arr((rows, fold_width(SLOTS * RANK)), 1, jnp.float32), b_down=arr((SLOTS * RANK, HIDDEN), 0.05, jnp.bfloat16))


def norms(x: dict, hidden, t, blocked: bool, ref: bool = False):
    """The layer's input norm then its post-attention norm: (new stream, QKV shrink, down's zeroed accumulator)."""
    fn = add_rms_norm_reference if ref else functools_partial(add_rms_norm, blocked=blocked)
    first = fn(hidden, None, x["scale"], eps=1e-6, out_dtype=jnp.bfloat16, seed=x["bias"],
               shrink=(x["a_qkv"], x["slots"], QKV_RANK), pending=(t, x["b_down"], x["slots"], RANK))
    second = fn(first[0], None, x["scale"], eps=1e-6, out_dtype=jnp.bfloat16,
                shrink=(x["a_gate_up"], x["slots"], GATE_UP_RANK), zeros=t.shape[1])
    return first, second


def functools_partial(fn, **kw):
    return lambda *a, **k: fn(*a, **kw, **k)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main() -> None:
    from bench.decode_step import gpu_kernel_times

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"device {jax.devices()[0].device_kind}; {LAYERS} layers of Qwen2.5-0.5B's two adapter norms a call, "
          f"{SLOTS} slots of rank {RANK}; µs a launch (GPU time, profiled)")
    print("| rows | slots | variant | µs a layer (two norms) | µs a launch | vs rows | max rel. err |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for rows in args.rows:
        for label, slots in (("one adapter", np.zeros(rows)), ("4 spread", np.arange(rows) % SLOTS),
                             ("half none", np.where(np.arange(rows) % 2, 0, -1))):
            x = inputs(rows, slots, rng)
            ref_first, ref_second = norms(x, x["hidden"], x["t"], False, ref=True)
            base = None
            for name in args.variants:
                blocked, warps, stages, unroll = VARIANTS[name]
                residual_norm.BLOCK_WARPS, residual_norm.BLOCK_STAGES, residual_norm.BLOCK_UNROLL = warps, stages, unroll
                first, second = norms(x, x["hidden"], x["t"], blocked)
                err = max(relative_error(a, b) for a, b in zip((*first, *second), (*ref_first, *ref_second)))

                def chain(x, hidden, t, blocked=blocked):
                    for _ in range(LAYERS):
                        first, second = norms(x, hidden, t, blocked)
                        hidden, t = first[0], second[-1]
                    return hidden, t

                step = jax.jit(chain)
                jax.block_until_ready(step(x, x["hidden"], x["t"]))
                with tempfile.TemporaryDirectory() as trace:
                    with jax.profiler.trace(trace, create_perfetto_trace=True):
                        for _ in range(args.calls):
                            jax.block_until_ready(step(x, x["hidden"], x["t"]))
                    times = gpu_kernel_times(trace) if jax.default_backend() == "gpu" else {}
                launches = [(n, t) for k, (n, t) in times.items() if "rms_norm" in k.lower()]
                if times and not launches:
                    print("no norm kernel among", sorted(times)[:12])
                n_all = sum(n for n, _ in launches)
                total = sum(t for _, t in launches) / (args.calls * LAYERS)
                base = base or total
                print(f"| {rows} | {label} | {name} | {total:.2f} | {total * args.calls * LAYERS / max(n_all, 1):.2f} | "
                      f"{total / base if base else 0:.2f}x | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
