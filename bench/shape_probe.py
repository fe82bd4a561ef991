"""Which part of a Qwen-shape decode step hangs: compile and run it under each model knob, each in a
process of its own with a time limit.

Session 33 on the H200 (bench/results/model_shapes.md): the decode step of a two-layer Qwen2.5-1.5B
shape at 1 row and of the 7B shape at 64 rows did not finish in 250-400 s, where 0.5B at 1 / 64 / 256
rows and 7B at 256 took seconds. This runs the step of `tests/test_qwen_shapes.py` (one shape, one
batch) with the default knobs and with each `JAXSERVE_*` switch that changes which kernel runs,
timing `lower`, `compile` and the first run apart; a child past its limit dumps its Python stack
(faulthandler), which says whether it sat in XLA's compile (a kernel's lowering or ptxas) or in the
run (a kernel that never ends).

    python3 bench/shape_probe.py --shape 7B --batch 64 --limit 100
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each variant: environment switches over the defaults (read when the step is traced).
VARIANTS = {
    "default": {},
    "no_early_gather": {"JAXSERVE_EARLY_GATHER": "0"},
    "no_rope_joint": {"JAXSERVE_ROPE_JOINT": "0"},
    "no_early_no_joint": {"JAXSERVE_EARLY_GATHER": "0", "JAXSERVE_ROPE_JOINT": "0"},
    "no_o_in_attention": {"JAXSERVE_O_IN_ATTENTION": "0"},
    "no_norm_in_projection": {"JAXSERVE_NORM_IN_PROJECTION": "0"},
    "no_accumulate": {"JAXSERVE_ACCUMULATE": "0"},
    "skinny_triton": {"JAXSERVE_SKINNY_BACKEND": "triton"},
    "xla_projections": {"JAXSERVE_DECODE_PROJECTIONS": "xla"},
    "xla_glue": {"JAXSERVE_DECODE_GLUE": "xla"},
    # the same step on the kernels' jnp twins (XLA's GEMMs and fusions only), and the default with XLA's
    # GEMM autotuning off: whether the time goes to XLA's compile of the big head product instead
    "reference": {"PROBE_IMPL": "reference"},
    "no_autotune": {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()},
}


def child(shape: str, batch: int, limit: float) -> None:
    faulthandler.dump_traceback_later(limit, exit=True)
    import jax
    import numpy as np

    from tests.test_qwen_shapes import _model, decode_step_case

    t0 = time.perf_counter()
    cfg, params = _model(shape, 0)
    kv, _, step_on = decode_step_case(cfg, params, batch, np.random.default_rng(0))
    impl = os.environ.get("PROBE_IMPL", "pallas")

    def step(kv, params):  # params an argument: closed over, they are compiled in as 3.1 GB of constants (7B)
        return step_on(impl, kv, params)

    times = {"setup_s": time.perf_counter() - t0}
    t = time.perf_counter()
    lowered = jax.jit(step).lower(kv, params)
    times["lower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    times["compile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(compiled(kv, params))
    times["first_run_s"] = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(compiled(kv, params))
    times["second_run_ms"] = (time.perf_counter() - t) * 1e3
    print("RESULT " + json.dumps({k: round(v, 3) for k, v in times.items()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7B")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit", type=float, default=100.0, help="seconds a variant may take")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.shape, args.batch, args.limit)
        return
    print(f"| shape | batch | variant | outcome | setup s | lower s | compile s | first run s | second run ms |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.variants:
        env = dict(os.environ, **VARIANTS[name])
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shape", args.shape,
               "--batch", str(args.batch), "--limit", str(args.limit)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.limit + 30)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out, err, rc = exc.stdout or "", exc.stderr or "", "killed"
            out, err = (out.decode() if isinstance(out, bytes) else out), (err.decode() if isinstance(err, bytes) else err)
        result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
        if result:
            print(f"| {args.shape} | {args.batch} | {name} | ok | {result['setup_s']} | {result['lower_s']} | "
                  f"{result['compile_s']} | {result['first_run_s']} | {result['second_run_ms']} |", flush=True)
        else:
            print(f"| {args.shape} | {args.batch} | {name} | rc={rc} | | | | | |", flush=True)
            # The stack at the time limit (faulthandler) or the error: where it stopped.
            print("\n".join("    " + line for line in err.strip().splitlines()[-40:]), flush=True)


if __name__ == "__main__":
    main()
