"""The greedy LM head of a decode step: XLA's GEMM + the greedy pick against one Mosaic GPU kernel.

Qwen2.5-0.5B's tied embedding (151,936 x 896 bf16, 272 MB: more than the 50 MB L2) times `rows`
normed hidden states, then each row's argmax. Compared in one process:

- `xla+pick`: XLA's dot writing bf16 logits, then `jaxserve_kernels.greedy_pick` (the engine's greedy path);
- `xla+argmax`: the same dot, then `jnp.argmax`;
- `mgpu none+pick`: `skinny_matmul_mgpu` writing the logits (does our kernel stream the head as fast?);
- `argmax b<block_n> s<slots> x<boxes> m<block_m>`: `skinny_matmul_mgpu.argmax_matmul_mgpu`, no logits
  written (`block_m` rows a program: past 64, one accumulator over more rows streams the table once).

Each is timed as `--reps` calls inside one jitted loop (a static trip count; each call's x depends on
the previous tokens), median of `--rounds` loops, per call. The tokens of every variant are checked
against `xla+argmax`'s.

    python bench/lm_head.py --rows 64 128 256
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

from jaxserve_kernels.greedy_pick import greedy_pick  # noqa: E402
from jaxserve_kernels.skinny_matmul_mgpu import argmax_matmul_mgpu, skinny_matmul_mgpu  # noqa: E402

VOCAB, HIDDEN = 151936, 896


def variants(tiles: list[tuple[int, ...]]) -> dict:
    def logits_xla(x, e):
        return jnp.dot(x, e.T, preferred_element_type=jnp.bfloat16)

    out = {
        "xla+pick": lambda x, e: greedy_pick(logits_xla(x, e), logprobs=False)[0],
        "xla+argmax": lambda x, e: jnp.argmax(logits_xla(x, e), axis=-1).astype(jnp.int32),
        "mgpu none+pick": lambda x, e: greedy_pick(skinny_matmul_mgpu(x, e, block_n=128, num_slots=4),
                                                   logprobs=False)[0],
    }
    for block_n, slots, boxes, *block_m in tiles:
        bm = block_m[0] if block_m else 64
        out[f"argmax b{block_n} s{slots} x{boxes} m{bm}"] = (
            lambda x, e, b=block_n, s=slots, bx=boxes, bm=bm: argmax_matmul_mgpu(x, e, block_n=b, num_slots=s,
                                                                                   boxes=bx, block_m=bm))
    return out


def time_variant(fn, x, e, reps: int, rounds: int) -> tuple[float, np.ndarray]:
    def loop(x, e):
        def body(_, carry):
            x, tok = carry
            tok = fn(x, e)
            # A select XLA cannot fold: each call's input depends on the previous call's tokens.
            return jnp.where(tok[0] < 0, x * 2, x), tok

        return jax.lax.fori_loop(0, reps, body, (x, jnp.zeros((x.shape[0],), jnp.int32)))[1]

    run = jax.jit(loop)
    tok = jax.block_until_ready(run(x, e))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(run(x, e))
        times.append((time.perf_counter() - start) / reps)
    return float(np.median(times)) * 1e6, np.asarray(tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--tiles", nargs="+", default=["128x4x1", "64x4x1", "128x4x1x128", "64x4x1x128", "64x3x1x256",
                                                   "32x4x1x256"],
                    help="argmax kernel tiles BLOCK_NxSLOTSxBOXES[xBLOCK_M] (rows a program; default 64); "
                         "a tile that does not fit the rows is reported as failed")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--vocab", type=int, default=VOCAB, help="rows of the embedding (smaller for a CPU smoke run)")
    args = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles]
    rng = np.random.default_rng(0)
    e = jnp.asarray(rng.standard_normal((args.vocab, HIDDEN), np.float32) * 0.02, jnp.bfloat16)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| rows | variant | µs a call | tokens as xla+argmax |")
    print("|---|---|---|---|")
    for rows in args.rows:
        x = jnp.asarray(rng.standard_normal((rows, HIDDEN), np.float32), jnp.bfloat16)
        results = {}
        for name, fn in variants(tiles).items():
            try:
                results[name] = time_variant(fn, x, e, args.reps, args.rounds)
            except Exception as err:  # noqa: BLE001 - a tile that does not compile is reported, not fatal
                print(f"| {rows} | {name} | failed: {type(err).__name__}: {str(err)[:120]} | |")
        want = results.get("xla+argmax", (0, None))[1]
        for name, (us, tok) in results.items():
            same = "yes" if want is not None and np.array_equal(tok, want) else "NO"
            print(f"| {rows} | {name} | {us:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
