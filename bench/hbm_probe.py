"""What HBM bandwidth the roofline should divide by: XLA's read ceiling beside several copies, one process.

bench/throughput.py's roofline (issue 8: weight + KV bytes a decode step over "the HBM bandwidth measured in the same
run") has divided by a copy's bytes read + written since run 1. On the H100 a copy and a read moved bytes at about
the same rate (issue 8's reference: 2.55 against 2.7 TB/s); on the H200 the copy reads ~3.1 TB/s against a read
ceiling of ~4.5, so the choice moves every step / roofline ratio by ~45%. This probe asks whether the copy is slow
because of how it was measured (in place, bf16, an XLA loop) or because the H200 moves mixed read/write traffic
slower, and prints every rate side by side.

    python bench/hbm_probe.py             # GPU: 2 GiB buffers
    python bench/hbm_probe.py --mib 64    # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def _median_s(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_ceiling(n: int, dtype, loops: int) -> float:
    """Bytes a second of an XLA sum over `n` elements, `loops` sums in one jitted loop (a changing addend so none folds)."""
    x = jax.random.normal(jax.random.key(0), (n,), dtype)
    f = jax.jit(lambda x: lax.fori_loop(0, loops, lambda i, s: s + jnp.sum(x + s.astype(dtype), dtype=jnp.float32)
                                        * 1e-9, jnp.float32(0)))
    return x.nbytes * loops / _median_s(f, x)


def copy_in_place(n: int, dtype, loops: int) -> float:
    """throughput.py's copy: `y = -y` in a jitted loop (XLA keeps the carry in one buffer), read + write bytes."""
    x = jax.random.normal(jax.random.key(1), (n,), dtype)
    f = jax.jit(lambda x: lax.fori_loop(0, loops, lambda i, y: -y, x))
    return 2 * x.nbytes * loops / _median_s(f, x)


def copy_ping_pong(n: int, dtype, loops: int) -> float:
    """Two buffers, each iteration writes the negation of one into the other (never reads what it writes)."""
    x = jax.random.normal(jax.random.key(2), (2, n), dtype)

    def body(i, y):
        src = lax.dynamic_index_in_dim(y, i % 2, keepdims=False)
        return lax.dynamic_update_index_in_dim(y, -src, (i + 1) % 2, 0)

    f = jax.jit(lambda y: lax.fori_loop(0, loops, body, y), donate_argnums=0)
    state = {"y": x}

    def run(_):
        state["y"] = f(state["y"])
        return state["y"]

    return 2 * (x.nbytes // 2) * loops / _median_s(run, None)


def copy_calls(n: int, dtype, loops: int) -> float:
    """`-x` into a fresh buffer, `loops` jitted calls from Python (each ~0.5 ms on 2 GiB: dispatch is noise)."""
    x = jax.random.normal(jax.random.key(3), (n,), dtype)
    f = jax.jit(lambda x: -x)

    def run(x):
        for _ in range(loops):
            out = f(x)
        return out

    return 2 * x.nbytes * loops / _median_s(run, x)


def copy_pallas(n: int, dtype, loops: int, block: int, warps: int) -> float:
    """A Pallas Triton copy kernel, `block` elements a program, out of place, `loops` launches in one jitted loop."""
    from jaxserve_kernels import pallas_compat as compat

    x = jax.random.normal(jax.random.key(4), (n,), dtype)
    interpret = jax.default_backend() != "gpu"

    def kernel(x_ref, o_ref):
        o_ref[...] = -x_ref[...]

    call = pl.pallas_call(kernel, grid=(n // block,), in_specs=[pl.BlockSpec((block,), lambda i: (i,))],
                          out_specs=pl.BlockSpec((block,), lambda i: (i,)),
                          out_shape=jax.ShapeDtypeStruct((n,), dtype), interpret=interpret,
                          **({} if interpret else {"compiler_params": compat.CompilerParams(num_warps=warps,
                                                                                           num_stages=1)}))
    f = jax.jit(lambda x: lax.fori_loop(0, loops, lambda i, y: call(y), x))
    return 2 * x.nbytes * loops / _median_s(f, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=2048, help="bytes of each buffer, in MiB (well above the 50 MB L2)")
    ap.add_argument("--loops", type=int, default=10)
    args = ap.parse_args()
    results = []
    for dtype in (jnp.bfloat16, jnp.float32):
        n = args.mib * (1 << 20) // jnp.dtype(dtype).itemsize
        name = jnp.dtype(dtype).name
        results.append((f"read (XLA sum) {name}", read_ceiling(n, dtype, args.loops)))
        results.append((f"copy in place (throughput.py) {name}", copy_in_place(n, dtype, args.loops)))
        results.append((f"copy ping-pong {name}", copy_ping_pong(n, dtype, args.loops)))
        results.append((f"copy, a call each {name}", copy_calls(n, dtype, args.loops)))
        for block, warps in ((4096, 4), (16384, 8)):
            results.append((f"copy Pallas {block} x {warps} warps {name}", copy_pallas(n, dtype, args.loops, block, warps)))
        print("\n".join(f"{k}: {v / 1e12:.3f} TB/s" for k, v in results[-7:]), flush=True)
    print(f"\ndevice {jax.devices()[0].device_kind}; jax {jax.__version__}; {args.mib} MiB buffers, {args.loops} loops\n")
    print("| measurement | TB/s (bytes read + written) |\n|---|---|")
    for k, v in results:
        print(f"| {k} | {v / 1e12:.3f} |")


if __name__ == "__main__":
    main()
