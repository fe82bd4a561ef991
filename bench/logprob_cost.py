"""What a decode step's log-probabilities cost on top of its token pick, by part.

A step that some request asked log-probabilities for runs, after the LM head, the log-softmax at the chosen
tokens (`sampling.token_logprobs`: a logsumexp over the vocabulary), the top-K tokens where asked, and the
chosen tokens' vocabulary ranks (`sampling.token_ranks`, vLLM's ``Logprob.rank``: one more compare-and-count
over the vocabulary). Timed here on bf16 logits ``[rows, 151936]`` (Qwen2's vocabulary), one process:

- `argmax`: the pick alone (what a step without log-probabilities runs);
- `logprobs`: the pick, then `token_logprobs` (K = 0);
- `logprobs+ranks`: the pick, then `sampling.scored` (K = 0): what a step runs now;
- `top5` / `top5+ranks`: the same with the five best tokens.

Each is ``--reps`` calls inside one jitted loop over ``--buffers`` distinct logits arrays (at 64+ rows their
bytes pass the 50 MB L2; at 1 row they fit it, which the table marks), each call's logits depending on the
previous call's output so that XLA cannot hoist or merge calls; the differences between variants are the
point (all of them read the logits the same way); median of ``--rounds`` loops, per call.

    python bench/logprob_cost.py --rows 1 64 256
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.sampler_cost import timed_loop  # noqa: E402
from jaxserve.sampling import scored, token_logprobs  # noqa: E402

VOCAB = 151936
L2_BYTES = 50 * 2**20


def _variant(name: str):
    top = 5 if name.startswith("top5") else 0

    def run(logits):
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if name == "argmax":
            return tokens.astype(jnp.float32)
        if name.endswith("+ranks"):
            out = scored(logits, tokens, top)
            return out.logprobs + out.ranks + out.top_logprobs.sum(-1)
        chosen, _, top_lps = token_logprobs(logits, tokens, top)
        return chosen + top_lps.sum(-1)

    return run


def time_variant(name: str, rows: int, buffers: int, reps: int, rounds: int, seed: int = 0) -> float:
    """Median µs a call of ``name`` over ``rows`` rows."""
    keys = jax.random.split(jax.random.key(seed), buffers)
    pool = jnp.stack([jax.random.normal(k, (rows, VOCAB), jnp.float32).astype(jnp.bfloat16) for k in keys])
    body = _variant(name)
    return timed_loop(lambda logits, i: body(logits), pool, rows, reps, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--variants", nargs="+", default=["argmax", "logprobs", "logprobs+ranks", "top5", "top5+ranks"])
    ap.add_argument("--buffers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; jax {jax.__version__}; vocab {VOCAB}, bf16 logits, {args.buffers} buffers, "
          f"{args.reps} calls a loop, median of {args.rounds} loops")
    print("| rows | logits MB | " + " | ".join(f"{v} µs" for v in args.variants) + " | ranks cost µs (K=0 / K=5) |")
    print("|---|---|" + "---|" * len(args.variants) + "---|")
    for rows in args.rows:
        t = {v: time_variant(v, rows, args.buffers, args.reps, args.rounds) for v in args.variants}
        mb = rows * VOCAB * 2 / 1e6
        fits = " (in L2)" if args.buffers * rows * VOCAB * 2 <= L2_BYTES else ""
        cost = []
        for base in ("logprobs", "top5"):
            cost.append(f"{t[base + '+ranks'] - t[base]:+.1f}" if base in t and base + "+ranks" in t else "-")
        print(f"| {rows} | {mb:.1f}{fits} | " + " | ".join(f"{t[v]:.1f}" for v in args.variants)
              + f" | {' / '.join(cost)} |")


if __name__ == "__main__":
    main()
