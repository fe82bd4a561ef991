"""Embeddings (`jaxserve.pooling`) end to end: prompts embedded (last-token and mean pooling) against the same prompts
prefilled for one greedy token, side by side in one run on one engine; prompts/s, prompt tokens/s and the ratio.
An embedding is a prefill whose call also returns the pooled final hidden states, so the ratio says what the pooled
variant costs over the plain prefill (its hidden states kept for every position, the float32 pooling sums).

    python bench/embed.py --shape 0.5B --batch 64 256 --prompt-len 128 512 --out bench/results/embed   # GPU
    python bench/embed.py --shape tiny --batch 8 --prompt-len 64                                       # CPU
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
    ap.add_argument("--batch", type=int, nargs="+", default=[8], help="prompts a run")
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[128])
    ap.add_argument("--rounds", type=int, default=3, help="timed runs a case (the median is reported)")
    ap.add_argument("--out", default=None, help="a folder: embed.md lands there")
    args = ap.parse_args()
    import jax
    import numpy as np

    from bench.throughput import random_model, write_lines
    from jaxserve import Engine, EngineConfig, PoolingParams, SamplingParams

    gpu = jax.default_backend() != "cpu"
    dtype = "bfloat16" if gpu else "float32"
    model, _ = random_model(args.shape, dtype, tempfile.mkdtemp())
    cfg = model.config
    rng = np.random.default_rng(0)
    lines = [f"# Embeddings against prefill, {jax.devices()[0].device_kind}", "",
             f"Qwen2.5-{args.shape} shape, random weights, {dtype}, prefix caching off; `{' '.join(sys.argv)}`; "
             f"median of {args.rounds} timed runs after a warm-up run of each.", "",
             "| prompts | tokens each | case | prompts/s | prompt tokens/s | vs prefill |",
             "|---:|---:|---|---:|---:|---:|"]
    one_token = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    cases = [("prefill + 1 token", one_token), ("embed, last token", PoolingParams()),
             ("embed, mean", PoolingParams(pooling_type="mean"))]
    for batch in args.batch:
        for length in args.prompt_len:
            prompts = [rng.integers(2, cfg.vocab_size, size=length).tolist() for _ in range(batch)]
            config = EngineConfig(page_size=16, num_pages=None if gpu else 4096, max_running=min(batch, 256),
                                  max_tokens_per_step=max(2048, length), prefix_caching=False, dtype=dtype,
                                  max_model_len=length + 64)
            base = None
            with Engine(model, config) as engine:
                for name, params in cases:
                    engine.generate(prompts, params, use_tqdm=False)  # compiles what the timed runs take
                    times = []
                    for _ in range(args.rounds):
                        start = time.perf_counter()
                        outs = engine.generate(prompts, params, use_tqdm=False)
                        times.append(time.perf_counter() - start)
                    rate = batch / float(np.median(times))
                    base = base or rate
                    if isinstance(params, PoolingParams):  # every prompt embedded, at unit length
                        norms = [float(np.linalg.norm(o["embedding"])) for o in outs]
                        assert all(abs(n - 1) < 1e-2 for n in norms), norms
                    lines.append(f"| {batch} | {length} | {name} | {rate:,.1f} | {rate * length:,.0f} | "
                                 f"{rate / base:.2f}x |")
                    print(lines[-1], flush=True)
    write_lines(args.out, "embed.md", lines)


if __name__ == "__main__":
    main()
