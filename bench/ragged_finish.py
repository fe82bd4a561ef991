"""Decoding where rows finish at their own lengths, as served requests do (an EOS, a stop string, their own
max_tokens), against the same rows finishing together (issue 8's workload, ignore_eos and one length): output
tokens/s and mean TPOT with `engine.CHAIN_PAST_FINISHES` on and off, side by side in one process (alternating
rounds, medians). Off, every decode call after one in which a row ended waits for the host to read it, schedule
and dispatch the next; on, the chained call goes on with the other rows (`Engine._chain_rows`).

Each request's max_tokens is drawn from [output_len / 4, output_len] (seeded), greedy, ignore_eos: the lengths are
known to the bench, not to the engine's chaining, which sees them as rows ending mid-call.

    python bench/ragged_finish.py --shape 0.5B --batches 64 256       # GPU
    python bench/ragged_finish.py --shape tiny --batches 64 --rounds 3  # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5B", help="Qwen2.5 shape of the random weights (or tiny)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="a folder: ragged_finish.md lands there")
    args = ap.parse_args()

    import jax
    import numpy as np

    from bench.throughput import random_model, write_lines
    from jaxserve import Engine, EngineConfig, SamplingParams
    from jaxserve import engine as engine_module

    gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if gpu else "float32"
    model, _ = random_model(args.shape, dtype, tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    lines = [f"# Rows finishing at their own lengths, {jax.devices()[0].device_kind}", "",
             f"Random-weight Qwen2.5-{args.shape} shape ({dtype}), {args.prompt_len}-token prompts, greedy, "
             f"{args.decode_steps} decode steps a call; medians of {args.rounds} alternating rounds; "
             f"`{' '.join(sys.argv)}`.", "",
             "| batch | output lengths | chain past finishes | output tok/s | mean TPOT ms | decode calls chained "
             "(dropping rows) |", "|---:|:---|:---|---:|---:|---:|"]
    for batch in args.batches:
        prompts = [rng.integers(3, model.config.vocab_size, args.prompt_len).tolist() for _ in range(batch)]
        ragged = rng.integers(args.output_len // 4, args.output_len + 1, batch).tolist()
        cases = {"one length": [args.output_len] * batch, "ragged": ragged}
        config = EngineConfig(page_size=16, max_running=batch, max_tokens_per_step=max(2048, batch),
                              decode_steps=args.decode_steps, prefix_caching=False, dtype=dtype,
                              num_pages=None if gpu else batch * ((args.prompt_len + args.output_len) // 16 + 2) + 64,
                              max_model_len=args.prompt_len + args.output_len + 16)
        with Engine(model, config) as engine:
            for name, lengths in cases.items():
                params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
                results: dict[bool, list] = {True: [], False: []}
                tokens = {}
                for on in (True, False):  # warm: every shape compiled
                    engine_module.CHAIN_PAST_FINISHES = on
                    tokens[on] = [o["token_ids"] for o in engine.generate(prompts, params, use_tqdm=False)]
                for _ in range(args.rounds):
                    for on in (True, False):
                        engine_module.CHAIN_PAST_FINISHES = on
                        before = engine.stats()
                        t = time.perf_counter()
                        outs = engine.generate(prompts, params, use_tqdm=False)
                        seconds = time.perf_counter() - t
                        after = engine.stats()
                        produced = sum(len(o["token_ids"]) for o in outs)
                        tpot = float(np.mean([o["tpot"] for o in outs if o["tpot"]])) * 1e3
                        chained = after["overlapped_decode_calls"] - before["overlapped_decode_calls"]
                        dropping = (after["overlapped_decode_calls_dropping_rows"]
                                    - before["overlapped_decode_calls_dropping_rows"])
                        results[on].append((produced / seconds, tpot, chained, dropping))
                for on in (True, False):
                    rate, tpot = (float(np.median([r[k] for r in results[on]])) for k in (0, 1))
                    chained, dropping = results[on][-1][2:]
                    lines.append(f"| {batch} | {name} | {'on' if on else 'off'} | {rate:,.0f} | {tpot:.3f} | "
                                 f"{chained} ({dropping}) |")
                    print(lines[-1], flush=True)
                if not gpu:  # float32 on the CPU: the same tokens either way
                    assert tokens[True] == tokens[False], "the two settings gave different tokens"
        engine_module.CHAIN_PAST_FINISHES = True
    write_lines(args.out, "ragged_finish.md", lines)


if __name__ == "__main__":
    main()
