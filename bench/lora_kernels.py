"""The LoRA term kernels (`jaxserve_kernels.lora_matmul`) against XLA's `lora_delta` + add, per projection of a
Qwen2.5 shape, side by side in one run: µs a call, each call's output fed to the next inside one jitted loop (as a
decode step's chain of layers does), median of several timed loops. Tilings swept: the output block, and for
each input width the inline shrink against the split one at a few split widths, and XLA's shrink product before the
kernel's select and expand (`shrink="xla"`) at a few output and row blocks. Session 57 (H200): this loop put the
xla-shrink kernels at 15-29 µs a projection where the decode step's profile put them at 2.4-5.3 (+ XLA's shrink):
check a result here against `bench/lora.py --profile` before trusting it.

    python bench/lora_kernels.py --rows 64 256            # GPU
    python bench/lora_kernels.py --rows 8 --iters 2 --reps 1 --shape tiny   # CPU smoke run (interpreted)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5B", help="Qwen2.5 shape (or tiny)")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=48, help="calls a timed loop")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", nargs="*", default=None,
                    help="time only the kernel configs whose label holds one of these strings (e.g. xla)")
    args = ap.parse_args()
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.throughput import write_lines
    from jaxserve.config import QWEN25_SHAPES
    from jaxserve.lora import lora_delta
    from jaxserve_kernels.lora_matmul import lora_add, lora_swiglu

    if args.shape == "tiny":
        hidden, inter, heads, kv_heads, head_dim = 64, 128, 4, 2, 16
    else:
        s = QWEN25_SHAPES[args.shape]
        hidden, inter = s["hidden_size"], s["intermediate_size"]
        heads, kv_heads = s["num_attention_heads"], s["num_key_value_heads"]
        head_dim = hidden // heads
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    qkv = (heads + 2 * kv_heads) * head_dim
    projections = {  # name: (in, out, parts (rank multiple), swiglu)
        "qkv_proj": (hidden, qkv, 3, False), "o_proj": (heads * head_dim, hidden, 1, False),
        "gate_up_proj": (hidden, 2 * inter, 2, True), "down_proj": (inter, hidden, 1, False)}
    rng = np.random.default_rng(0)

    def timed(fn, *operands) -> float:
        def body(i, carry):
            # The barrier ties the input to the loop's carry, so XLA cannot hoist a term that does not read the
            # accumulator out of the loop; it launches nothing.
            x, c = jax.lax.optimization_barrier(carry)
            return x, fn(x, *operands[1:-1], c)

        def loop(*ops):
            return jax.lax.fori_loop(0, args.iters, body, (ops[0], ops[-1]))[1]

        run = jax.jit(loop)
        jax.block_until_ready(run(*operands))
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            jax.block_until_ready(run(*operands))
            times.append((time.perf_counter() - start) / args.iters * 1e6)
        return statistics.median(times)

    lines = [f"# LoRA term kernels, {jax.devices()[0].device_kind}", "",
             f"Qwen2.5-{args.shape} projections, {args.slots} slots of rank {args.rank} (fused parts side by side), "
             f"{jnp.dtype(dtype).name}; µs a call in a chain of {args.iters}, median of {args.reps}; "
             f"`{' '.join(sys.argv)}`", "",
             "| rows | projection | config | µs | vs XLA |", "|---:|:---|:---|---:|---:|"]
    for rows in args.rows:
        slots = jnp.asarray(rng.integers(-1, args.slots, rows), jnp.int32)
        for name, (k, n, parts, swiglu) in projections.items():
            r = parts * args.rank
            x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
            a = jnp.asarray(rng.standard_normal((args.slots, r, k)) / np.sqrt(k), dtype)
            b = jnp.asarray(rng.standard_normal((args.slots, r, n)) * 0.01, dtype)
            if swiglu:
                h = jnp.asarray(rng.standard_normal((rows, n)), dtype)

                def xla(x, a, b, s, h):  # the glue's path without LORA_KERNELS; h's first half carried
                    hh = h + lora_delta(x[:, None], a, b, s)[:, 0]
                    act = jax.nn.silu(hh[:, : n // 2]) * hh[:, n // 2:]
                    return jnp.concatenate([act, h[:, n // 2:]], axis=1)

                def kern(x, a, b, s, h, **kw):
                    return jnp.concatenate([lora_swiglu(x, a, b, s, h, **kw), h[:, n // 2:]], axis=1)
                carry = h
            else:
                def xla(x, a, b, s, acc):
                    return acc + lora_delta(x[:, None], a, b, s, out_dtype=jnp.float32)[:, 0]

                kern = lora_add
                carry = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
            base = timed(xla, x, a, b, slots, carry)
            lines.append(f"| {rows} | {name} | XLA lora_delta + add{' + SwiGLU' if swiglu else ''} | {base:.2f} | 1.00x |")
            configs = [("default", {})] + [(f"block_n={bn}", {"block_n": bn}) for bn in (32, 128)]
            if k > 1024:
                configs += [(f"split_k={sk}", {"split_k": sk}) for sk in (256, 1024, 2048)]
                configs += [("inline shrink", {"inline_k": k})]
            else:
                configs += [(f"split shrink, split_k={sk}", {"inline_k": 1, "split_k": sk}) for sk in (256, 512)]
            configs += [(f"xla shrink, block_n={bn}", {"shrink": "xla", "block_n": bn}) for bn in (16, 32, 64)]
            configs += [(f"xla shrink, block_m={bm}, block_n={bn}", {"shrink": "xla", "block_m": bm, "block_n": bn})
                        for bm, bn in ((16, 64), (32, 32)) if bm < rows]
            configs += [("xla shrink, block_n=32, 2 warps", {"shrink": "xla", "block_n": 32, "num_warps": 2})]
            if args.configs:
                configs = [(label, kw) for label, kw in configs if any(c in label for c in args.configs)]
            for label, kw in configs:
                t = timed(functools.partial(kern, **kw), x, a, b, slots, carry)
                lines.append(f"| {rows} | {name} | {label} | {t:.2f} | {base / t:.2f}x |")
            print("\n".join(lines[-len(configs) - 1:]), flush=True)
    write_lines(args.out, "lora_kernels.md", lines)


if __name__ == "__main__":
    main()
