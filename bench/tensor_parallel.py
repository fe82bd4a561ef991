"""Tensor parallelism's and fp8 weights' throughput: one engine over 1, 2, ... devices
(`EngineConfig.tensor_parallel_size`) with bf16 or fp8 projection weights (`EngineConfig.quantization`), side by side in
one run, the same prompts (random-weight Qwen2.5 shape, bf16, random token prompts, greedy, every request its full
output length). What is measured: output tokens/s and the wall time a decode step takes at each batch (a split step
reads 1/n of the weights on each device and adds two all-reduces a layer; fp8 reads half the projections' bytes), and
whether each engine's greedy tokens are the first row's (bf16 partial sums added in another order can flip near-ties,
and fp8 weights are other weights: the share of requests whose tokens all match is printed, not asserted).

    python bench/tensor_parallel.py --shape 7B --tp 1 2 --batches 1 64          # a 2-GPU machine
    python bench/tensor_parallel.py --shape 7B --tp 1 --quantization none fp8 --batches 1 64 256   # one GPU
    python bench/tensor_parallel.py --shape tiny --cpu-devices 2 --tp 1 2 --batches 2 --output-len 8   # CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.fake_devices import add_cpu_devices_flag, fake_cpu_devices  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7B", help="tiny, 0.5B, 7B... (bench/throughput.py's shapes)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "fp8"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    add_cpu_devices_flag(ap)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fake_cpu_devices(args.cpu_devices)  # before jax is imported
    import jax
    import numpy as np

    from bench.throughput import random_model, write_lines
    from jaxserve import Engine, EngineConfig, SamplingParams

    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    m, _ = random_model(args.shape, dtype, tempfile.mkdtemp())
    cfg = m.config
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    lines = [f"device: {jax.devices()[0].device_kind} x {len(jax.devices())}; jax {jax.__version__}; Qwen2.5 "
             f"{args.shape} shape ({cfg.num_attention_heads} q / {cfg.num_key_value_heads} KV heads), {dtype}; "
             f"{args.prompt_len} prompt + {args.output_len} output tokens a request, greedy, all requests at once", "",
             "| batch | tp | weights | output tok/s | x first row | ms a decode step | requests with the first row's "
             "tokens |", "|---|---|---|---|---|---|---|"]
    for batch in args.batches:
        prompts = [rng.integers(2, cfg.vocab_size, size=args.prompt_len).tolist() for _ in range(batch)]
        base = expect = None
        for tp, quant in ((tp, q) for tp in args.tp for q in args.quantization):
            config = EngineConfig(page_size=16, max_running=batch, max_tokens_per_step=max(batch, 2048), dtype=dtype,
                                  decode_steps=8, prefix_caching=False, tensor_parallel_size=tp,
                                  quantization=None if quant == "none" else quant,
                                  max_model_len=args.prompt_len + args.output_len + 16,
                                  num_pages=batch * ((args.prompt_len + args.output_len) // 16 + 2) + 64)
            with Engine(m, config) as engine:
                engine.generate(prompts, params, use_tqdm=False)  # every shape compiled
                start = time.perf_counter()
                outs = engine.generate(prompts, params, use_tqdm=False)
                wall = time.perf_counter() - start
                # The decode steps alone: the same requests with one output token are the prefill's share.
                one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
                engine.generate(prompts, one, use_tqdm=False)
                start = time.perf_counter()
                engine.generate(prompts, one, use_tqdm=False)
                prefill = time.perf_counter() - start
            tokens = [o["token_ids"] for o in outs]
            rate = sum(len(t) for t in tokens) / wall
            base = base or rate
            expect = expect or tokens
            step_ms = 1e3 * max(wall - prefill, 0.0) / max(args.output_len - 1, 1)
            match = sum(a == b for a, b in zip(expect, tokens))
            lines.append(f"| {batch} | {tp} | {'bf16' if quant == 'none' else quant} | {rate:,.0f} | {rate / base:.2f} "
                         f"| {step_ms:.3f} | {match}/{batch} |")
            print(lines[-1], flush=True)
    write_lines(args.out, "tensor_parallel.md", lines)


if __name__ == "__main__":
    main()
