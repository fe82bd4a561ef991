"""Data-parallel replicas' throughput: one engine against `jaxserve.Replicas` over 2..N devices, side by side in
one run, the same prompts (random-weight Qwen2.5-0.5B shape, bf16, random token prompts, greedy, every request
its full output length). Each engine gets ``--rows`` running sequences, so N replicas run N x rows requests at
once: what is measured is how close N devices driven by one host thread come to N times one device's output
tokens/s (the host's work for one replica's step overlaps the others' device calls).

Also, with ``--shared-prefix``, every prompt starts with the same ``--prompt-len`` - 32 tokens: the routed
replicas' prefix hit rate, against one engine's.

    python bench/replicas.py --devices 1 2 --rows 256 --requests 1024        # a 2-GPU machine
    python bench/replicas.py --tiny --cpu-devices 2 --devices 1 2 --rows 4 --requests 16 --output-len 8   # CPU
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
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, default=256, help="running sequences an engine holds")
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--shared-prefix", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    add_cpu_devices_flag(ap)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fake_cpu_devices(args.cpu_devices)  # before jax is imported
    import jax
    import numpy as np

    from bench.throughput import QWEN25_05B, TINY, make_checkpoint, write_lines
    from jaxserve import Engine, EngineConfig, Replicas, SamplingParams
    from jaxserve.config import ModelConfig
    from jaxserve.loading import LoadedModel
    from jaxserve.weights import load_hf_params

    shape = TINY if args.tiny else QWEN25_05B
    path = tempfile.mkdtemp()
    make_checkpoint(shape, path)
    cfg = ModelConfig.from_pretrained(path)
    m = LoadedModel(load_hf_params(path, cfg, "bfloat16"), cfg, None, path, "bench")
    rng = np.random.default_rng(0)
    shared = rng.integers(2, cfg.vocab_size, size=max(0, args.prompt_len - 32)).tolist() if args.shared_prefix else []
    prompts = [shared + rng.integers(2, cfg.vocab_size, size=args.prompt_len - len(shared)).tolist()
               for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    config = EngineConfig(page_size=16, max_running=args.rows, max_tokens_per_step=max(args.rows, 8192),
                          dtype="bfloat16", decode_steps=8, prefix_caching=args.shared_prefix,
                          max_model_len=args.prompt_len + args.output_len + 16,
                          num_pages=args.rows * ((args.prompt_len + args.output_len) // 16 + 2) + 64)
    lines = [f"device: {jax.devices()[0].device_kind} x {len(jax.devices())}; jax {jax.__version__}; "
             f"{'tiny' if args.tiny else 'Qwen2.5-0.5B shape'}, bf16; {args.requests} requests of {args.prompt_len} "
             f"prompt + {args.output_len} output tokens, greedy; {args.rows} running a replica"
             + ("; shared prefix" if args.shared_prefix else ""), "",
             "| replicas | output tok/s | x one engine | wall s | prefix hit rate (warm-up too) | requests a replica |",
             "|---|---|---|---|---|---|"]
    base = None
    for n in args.devices:
        make = (lambda: Engine(m, config)) if n == 1 else (lambda n=n: Replicas(m, config, devices=n))
        with make() as driver:
            # The same run twice first: every shape compiled on every replica's device (the radix index's and the
            # pool's calls too, which compile per device and per token bucket as prefixes hit; on the CPU a second
            # warm run after clearing the prefix cache still compiled one).
            for _ in range(2):
                driver.generate(prompts, params, use_tqdm=False)
                driver.clear_prefix_cache()
            before = driver.stats()
            start = time.perf_counter()
            outs = driver.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
            after = driver.stats()
        tokens = sum(len(o["token_ids"]) for o in outs)
        rate = tokens / wall
        base = base or rate
        per = list(zip(before["replicas"], after["replicas"])) if n > 1 else [(before, after)]
        hits = np.mean([a["prefix_hit_rate"] for _, a in per])
        spread = "/".join(str(round((a["generated_tokens"] - b["generated_tokens"]) / args.output_len)) for b, a in per)
        lines.append(f"| {n} | {rate:,.0f} | {rate / base:.2f} | {wall:.2f} | {hits:.2f} | {spread} |")
        print(lines[-1], flush=True)
    write_lines(args.out, "replicas.md", lines)


if __name__ == "__main__":
    main()
