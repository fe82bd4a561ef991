"""LoRA serving (`jaxserve.lora`) end to end: the same greedy requests with no adapter, every row on one adapter, and
rows spread over four adapters (one batch, one decode call), side by side in one run; output tokens/s against the
base model's. And a check on the device's own arithmetic: an adapter's rows against an engine whose weights have
the adapter merged in (transformers-style W + scale B A, saved as a checkpoint of its own): the share of rows whose
greedy tokens agree and the largest gap of their first token's log-probability.

    python bench/lora.py --shape 0.5B --batch 1 64 256 --out bench/results/lora   # GPU
    python bench/lora.py --shape tiny --batch 1 8                                  # CPU
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
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--check-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="dtype of the check against the merged weights (default float32: in bf16 a random model's "
                         "near-ties flip greedy tokens between any two roundings, H200 session 48: 0/16 rows alike)")
    ap.add_argument("--out", default=None, help="a folder: lora.md lands there")
    ap.add_argument("--profile", default=None,
                    help="a folder: trace the base and one-adapter runs at --profile-batch there and print GPU time "
                         "per kernel a generated token (which launches the adapters add)")
    ap.add_argument("--profile-batch", type=int, default=64)
    ap.add_argument("--profile-top", type=int, default=25, help="kernel groups the profile prints")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the merged weights")
    args = ap.parse_args()
    import jax
    import numpy as np
    import torch

    from bench.throughput import random_model, write_lines
    from jaxserve import Engine, EngineConfig, LoRARequest, SamplingParams
    from jaxserve import model as model_module
    from jaxserve.config import ModelConfig
    from jaxserve.loading import LoadedModel
    from jaxserve.weights import load_hf_params
    from tests.test_lora import make_adapter, merged

    gpu = jax.default_backend() != "cpu"
    dtype = "bfloat16" if gpu else "float32"
    root = tempfile.mkdtemp()
    model, hf = random_model(args.shape, dtype, os.path.join(root, "base"))
    cfg = model.config
    # std gives each adapter's term about a tenth of its projection's output: enough to change the text.
    std = 0.6 / np.sqrt(args.rank) ** 0.5 / cfg.hidden_size ** 0.25
    adapters = []
    for i in range(4):
        path = os.path.join(root, f"lora{i}")
        make_adapter(path, hf, r=args.rank, alpha=2 * args.rank, seed=i, std=std)
        adapters.append(LoRARequest(f"lora{i}", i + 1, path))
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True, logprobs=0)

    def profile(e: Engine, prompts: list, lora, trace_dir: str) -> None:
        # A generate call's kernels over its output tokens: prefill is in it, a fraction at 128 prompt tokens.
        from bench.decode_step import gpu_kernel_times, grouped_kernel_times

        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            e.generate(prompts, params, use_tqdm=False, lora_request=lora)
        times = gpu_kernel_times(trace_dir)
        steps = args.output_len
        print(f"profile {trace_dir}: GPU busy {sum(t for _, t in times.values()) / steps:.1f} µs a generated token, "
              f"{sum(n for n, _ in times.values()) / steps:.1f} launches", flush=True)
        for key, (n, t) in grouped_kernel_times(times)[:args.profile_top]:
            print(f"   {t / steps:8.1f} µs/tok {n / steps:6.1f} launches/tok  {t / max(n, 1):7.2f} µs each  {key[:90]}",
                  flush=True)

    def engine(max_loras: int) -> Engine:
        return Engine(model, EngineConfig(page_size=16, num_pages=None if gpu else 1024, max_running=max(args.batch),
                                          max_tokens_per_step=max(2048, max(args.batch)), decode_steps=8,
                                          prefix_caching=False, dtype=dtype, max_loras=max_loras,
                                          max_lora_rank=args.rank,
                                          max_model_len=args.prompt_len + args.output_len + 64))

    lines = [f"# LoRA serving, {jax.devices()[0].device_kind}", "",
             f"Random-weight Qwen2.5-{args.shape} shape ({dtype}), rank-{args.rank} adapters on every projection, "
             f"{args.prompt_len} prompt / {args.output_len} greedy output tokens a request; `{' '.join(sys.argv)}`; "
             f"adapter rows on the accumulating glue (model.LORA_GLUE): {model_module.LORA_GLUE}; adapter terms as "
             f"lora_matmul launches (model.LORA_KERNELS): {model_module.LORA_KERNELS}; inside the projections' "
             f"kernels (model.LORA_FOLD, up to {model_module.LORA_FOLD_ROWS} rows): {model_module.LORA_FOLD}.", "",
             "| batch | rows | tokens/s | vs base |", "|---:|:---|---:|---:|"]
    with engine(4) as eng, engine(0) as base_eng:
        for batch in args.batch:
            prompts = [rng.integers(2, cfg.vocab_size, size=args.prompt_len).tolist() for _ in range(batch)]
            base_rate = None
            cases = [("base model, an engine without LoRA", base_eng, None),
                     ("base model, an engine serving 4 adapters", eng, None),
                     ("one adapter", eng, adapters[0]),
                     ("4 adapters, rows spread", eng, [adapters[i % 4] for i in range(batch)])]
            for name, e, lora in cases:
                e.generate(prompts, params, use_tqdm=False, lora_request=lora)  # compiles what the timed pass takes
                start = time.perf_counter()
                outs = e.generate(prompts, params, use_tqdm=False, lora_request=lora)
                rate = sum(len(o["token_ids"]) for o in outs) / (time.perf_counter() - start)
                base_rate = base_rate or rate
                lines.append(f"| {batch} | {name} | {rate:,.0f} | {rate / base_rate:.2f}x |")
                if args.profile and gpu and batch == args.profile_batch and name in ("base model, an engine without LoRA", "one adapter"):
                    profile(e, prompts, lora, os.path.join(args.profile, f"b{batch}_{'base' if lora is None else 'lora'}"))
        if args.no_check:
            write_lines(args.out, "lora.md", lines)
            return
        # The check: adapter 0's rows against its weights merged in (in float32: the base model is not used again).
        merged_model = merged(hf.float(), adapters[0].lora_path)
        cd = args.check_dtype
        merged_model.to(torch.float32 if cd == "float32" else torch.bfloat16).save_pretrained(
            os.path.join(root, "merged"), safe_serialization=True)
        mcfg = ModelConfig.from_pretrained(os.path.join(root, "merged"))
        mmodel = LoadedModel(load_hf_params(os.path.join(root, "merged"), mcfg, cd), mcfg, None,
                             os.path.join(root, "merged"), "merged")
        # The base model's weights as the checkpoint holds them (bf16), computed in the check's dtype.
        cmodel = LoadedModel(load_hf_params(os.path.join(root, "base"), cfg, cd), cfg, None,
                             os.path.join(root, "base"), "check")
        prompts = [rng.integers(2, cfg.vocab_size, size=args.prompt_len).tolist() for _ in range(16)]
        check = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
        small = dict(page_size=16, num_pages=None if gpu else 1024, max_running=16, dtype=cd,
                     max_model_len=args.prompt_len + 80)
        with Engine(mmodel, EngineConfig(**small)) as m_eng:
            want = m_eng.generate(prompts, check, use_tqdm=False)
        with Engine(cmodel, EngineConfig(**small, max_loras=1, max_lora_rank=args.rank)) as c_eng:
            got = c_eng.generate(prompts, check, use_tqdm=False, lora_request=adapters[0])
            plain = c_eng.generate(prompts, check, use_tqdm=False)
    same = sum(g["token_ids"] == w["token_ids"] for g, w in zip(got, want))
    unchanged = sum(g["token_ids"] == p["token_ids"] for g, p in zip(got, plain))
    gap = max(abs(g["logprobs"][0] - w["logprobs"][0]) for g, w in zip(got, want))
    lines += ["", f"Check against the merged weights ({args.check_dtype}, 16 prompts x 16 greedy tokens): {same}/16 rows the same "
                  f"tokens, first token's log-probability within {gap:.2e}; {unchanged}/16 rows equal to the base "
                  f"model's (the adapter changes the text)."]
    write_lines(args.out, "lora.md", lines)


if __name__ == "__main__":
    main()
