"""The greedy pick kernel (argmax + the token's log-probability, one pass) vs XLA's reductions.

Times `jaxserve_kernels.greedy_pick.greedy_pick` under several (block, warps, target programs) against the jnp
reference jitted by XLA (what the runner ran before: argmax and log-softmax, several
reductions), on bf16 logits of a Qwen2.5 vocabulary (151,936) at batch 1 / 64 / 256. Each
timed call is one of `--calls` inside a jitted `fori_loop` with a static trip count, 8 calls an
iteration (a loop iteration costs ~10 µs of its own on the H200: bench/results/kernel_notes.md,
session 7), reading
from `--buffers` logits arrays in turn (at batch 256 four of them are 311 MB, past the 50 MB
L2; at batch 1 a row is 0.3 MB and stays in L2, as in the decode step, where the LM head has
just written it), each call's tokens folded into the carry so none is dropped. Median of
`--repeats` runs, per call.

    python bench/greedy_pick_tune.py --batches 1 64 256
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--targets", type=int, nargs="+", default=[264, 528, 1056],
                    help="programs to aim for (rows x chunks; greedy_pick.TARGET_PROGRAMS)")
    ap.add_argument("--stages", type=int, nargs="+", default=[2], help="Triton pipeline stages")
    ap.add_argument("--argmax-only", action="store_true",
                    help="the argmax alone (logprobs=False: a step where no request asked for them)")
    ap.add_argument("--calls", type=int, default=64, help="a multiple of 8")
    ap.add_argument("--buffers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.bandwidth import timed as timed_loop
    from bench.throughput import write_lines
    from jaxserve_kernels.greedy_pick import greedy_pick, greedy_pick_reference

    unroll = 8

    def timed(fn, bufs) -> float:
        """µs a call: `unroll` calls a loop iteration, each on the next buffer, folded into the carry."""
        def step(carry, bufs):
            i, acc = carry
            for j in range(unroll):
                tokens, lps = fn(bufs[(i * unroll + j) % bufs.shape[0]])
                acc = acc + tokens.sum() + (0 if lps is None else lps.sum().astype(jnp.int32))
            return i + 1, acc

        seconds, _ = timed_loop(step, (jnp.int32(0), jnp.int32(0)), (bufs,), repeats=args.repeats,
                                count=args.calls // unroll)
        return seconds / unroll * 1e6

    lines = [f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; vocab {args.vocab}, bf16 logits, "
             f"{args.calls} calls a jitted loop over {args.buffers} buffers, median of {args.repeats}"
             + ("; the argmax alone (logprobs=False)" if args.argmax_only else ""), "",
             "| batch | config | µs a call | GB/s (logits read once) | tokens equal XLA's |", "|---|---|---|---|---|"]
    xla_argmax = lambda x: (jnp.argmax(x.astype(jnp.float32), axis=-1).astype(jnp.int32), None)  # noqa: E731
    rng = np.random.default_rng(0)
    for batch in args.batches:
        bufs = jnp.asarray(rng.standard_normal((args.buffers, batch, args.vocab), np.float32), jnp.bfloat16)
        nbytes = batch * args.vocab * 2
        want = np.asarray(jax.jit(greedy_pick_reference)(bufs[0])[0])
        rows = [("xla (argmax)", xla_argmax, True) if args.argmax_only else
                ("xla (argmax + log-softmax)", greedy_pick_reference, True)]
        for block, warps, stages, target in itertools.product(args.blocks, args.warps, args.stages, args.targets):
            chunks = -(-target // batch)
            fn = lambda x, b=block, w=warps, st=stages, c=chunks: greedy_pick(
                x, block=b, num_warps=w, num_stages=st, chunks=c, logprobs=not args.argmax_only)
            same = bool((np.asarray(jax.jit(fn)(bufs[0])[0]) == want).all())
            rows.append((f"kernel block {block} warps {warps} stages {stages} chunks {chunks}", fn, same))
        for name, fn, same in rows:
            us = timed(fn, bufs)
            lines.append(f"| {batch} | {name} | {us:.2f} | {nbytes / us / 1e3:.0f} | {same} |")
            print(lines[-1], flush=True)
        del bufs
    write_lines(args.out, "greedy_pick.md", lines)


if __name__ == "__main__":
    main()
