"""Prefill call time of the engine's Runner under several XLA compiler options, side by side.

A prefill chunk's projections are XLA GEMMs of thousands of rows (the skinny matmul is for
decode). Which GEMM backend XLA picks (its Triton GEMMs or cuBLAS, whose epilogues also take
the residual adds) is a compiler option of the prefill jit (``Runner(prefill_options=...)``,
``jaxserve.runner.PREFILL_OPTIONS``). Each option gets its own Runner in this one process, and
their calls are timed in alternating rounds (the same code reads +-10% between processes on
the device), greedy, random Qwen2.5-0.5B-shaped weights in bf16, a fresh prompt each shape.

    python bench/prefill_step.py --shapes 64x128 8x1024 --options default cublas
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OPTIONS = {
    "default": {},  # XLA's own defaults (its Triton GEMMs), not the runner's PREFILL_OPTIONS
    "cublas": {"xla_gpu_enable_triton_gemm": False},
    # cuBLASLt's algorithms (more tilings, split-K) for the same GEMMs.
    "cublaslt": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": True},
}
# "<option>_nk": the same options with the projection weights stored [out, in]
# (jaxserve.model.WEIGHT_LAYOUT "nk"; the params converted once).
OPTIONS.update({f"{name}_nk": opts for name, opts in list(OPTIONS.items())})


def profile_prefill(runner, call: tuple, trace_dir: str, calls: int = 5) -> None:
    """Per-kernel GPU time of a prefill call (mean of `calls`), biggest first."""
    import jax

    from bench.decode_step import gpu_kernel_times, grouped_kernel_times

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(runner.prefill(*call, greedy=True).tokens)
    groups = grouped_kernel_times(gpu_kernel_times(trace_dir))
    total = sum(t for _, (_, t) in groups)
    print(f"profile {os.path.basename(trace_dir)}: GPU busy {total / calls / 1e3:.3f} ms a call", flush=True)
    for key, (n, t) in groups[:20]:
        print(f"   {t / calls:9.1f} µs/call {n / calls:6.1f} launches  {key[:90]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["64x128", "8x1024"], help="rows x tokens a prefill call")
    ap.add_argument("--options", nargs="+", default=["default", "cublas"], choices=list(OPTIONS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--out", default=None, help="write the table (markdown) here")
    ap.add_argument("--profile", default=None,
                    help="also trace 5 calls of each runner into this directory and print GPU time per kernel")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.throughput import QWEN25_05B, TINY, write_lines
    from jaxserve.config import ModelConfig
    from jaxserve import model as model_module
    from jaxserve.model import convert_weight_layout, init_params
    from jaxserve.runner import Runner, default_attention_impl
    from jaxserve.sampling import SamplingParams, make_batch

    cfg = ModelConfig.from_hf_dict(dict(TINY if args.tiny else QWEN25_05B, model_type="qwen2"))
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.asarray((rng.standard_normal(s.shape, np.float32) * 0.02).astype(s.dtype)),
                          shapes)
    # Matmul flops a prompt token costs (2 x the non-embedding weights; the LM head runs on one
    # position per row and attention at these lengths is a few percent).
    layer_params = sum(x.size for k, x in params.items() if k.startswith("layers_") for x in jax.tree.leaves(x))
    layouts = {"kn": params}
    if any(name.endswith("_nk") for name in args.options):
        layouts["nk"] = convert_weight_layout(params, "kn", "nk")
    default_layout = model_module.WEIGHT_LAYOUT
    lines = [f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; "
             f"model {'tiny' if args.tiny else 'Qwen2.5-0.5B shape'}, bf16", "",
             "| rows x tokens | options | call ms (median of rounds) | rounds ms | prompt tok/s | layer TFLOP/s |",
             "|---|---|---|---|---|---|"]
    for shape in args.shapes:
        rows, length = (int(x) for x in shape.split("x"))
        pages = -(-length // 16) + 1
        table = rng.permutation(rows * pages).reshape(rows, pages).astype(np.int32)
        tokens = rng.integers(2, cfg.vocab_size, size=(rows, length)).astype(np.int32)
        zeros = np.zeros(rows, np.int32)
        lengths = np.full(rows, length, np.int32)
        sb = make_batch([SamplingParams(temperature=0.0)] * rows, rows)
        call = (tokens, zeros, lengths, table, sb, zeros)
        runners = {}
        for name in args.options:
            layout = "nk" if name.endswith("_nk") else "kn"
            model_module.WEIGHT_LAYOUT = layout  # read when the runner first traces, just below
            runners[name] = Runner(cfg, layouts[layout], num_pages=rows * pages + 8, page_size=16,
                                   attention_impl=default_attention_impl(), prefill_options=OPTIONS[name])
            jax.block_until_ready(runners[name].prefill(*call, greedy=True).tokens)
        model_module.WEIGHT_LAYOUT = default_layout
        rounds: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                t = time.perf_counter()
                for _ in range(args.reps):
                    out = runner.prefill(*call, greedy=True)
                jax.block_until_ready(out.tokens)
                rounds[name].append((time.perf_counter() - t) / args.reps * 1e3)
        if args.profile:
            for name, runner in runners.items():
                profile_prefill(runner, call, os.path.join(args.profile, f"{shape}_{name}"))
        for name, ms in rounds.items():
            med = float(np.median(ms))
            tflops = 2 * layer_params * rows * length / (med * 1e-3) / 1e12
            lines.append(f"| {shape} | {name} | {med:.3f} | {' '.join(f'{x:.2f}' for x in ms)} | "
                         f"{rows * length / med * 1e3:,.0f} | {tflops:.0f} |")
            print(lines[-1], flush=True)
        del runners
    write_lines(args.out, "prefill_step.md", lines)


if __name__ == "__main__":
    main()
