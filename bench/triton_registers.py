"""Registers a thread of the decode kernels' Pallas Triton programs on Hopper, measured on a CPU machine.

Why: a Triton program's register count decides how many programs share an SM, and at head_dim 128 the
fused decode attention holds 190 (two programs an SM: bench/results/bandwidth.md, session 36), which device
time alone would take calls to iterate on. Here the kernel is lowered for CUDA on the CPU (JAX's Pallas
Triton lowering, with the same arguments the engine passes), its Triton IR compiled by pip's Triton for
sm_90a, and ptxas reports registers, spills and shared memory. XLA's own Triton pipeline on the device can
differ in detail (its Triton is not pip's), so device numbers stay the reference; this is for comparing
variants of one kernel.

Set-up: the test venv plus `pip install triton==3.9.0` (a CPU wheel carrying its own ptxas).

    python bench/triton_registers.py --heads 28/4/128 --batch 8 --context 2048
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


@contextlib.contextmanager
def capture_triton_modules(out_dir: str) -> Iterator[list[dict]]:
    """Within the block, JAX's Pallas Triton lowering also writes each kernel's Triton IR (text) under `out_dir`;
    the list it yields gets one `{"path": ...}` a kernel lowered. The lowering is restored on exit."""
    registration = importlib.import_module("jax._src.pallas.triton.pallas_call_registration")
    lowering = registration.lowering
    original = lowering.lower_jaxpr_to_triton_module
    seen: list[dict] = []

    def record(*args, **kwargs):
        result = original(*args, **kwargs)
        path = os.path.join(out_dir, f"kernel{len(seen)}.ttir")
        with open(path, "w") as f:
            f.write(result.module.operation.get_asm(enable_debug_info=False))
        seen.append({"path": path})
        return result

    lowering.lower_jaxpr_to_triton_module = record
    try:
        yield seen
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def ptxas_report(ttir: str, num_warps: int, num_stages: int) -> str:
    """Compiles Triton IR for sm_90a with pip's Triton and returns ptxas's resource line."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(ttir, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    # Triton writes PTX of a version only its newer ptxas (shipped for Blackwell) reads; sm_90a is still a target.
    ptxas = max(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")),
                key=lambda p: p.endswith("blackwell"))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    lines = [line.split("info    : ")[-1] for line in run.stderr.splitlines()
             if "registers" in line or "spill" in line]
    return "; ".join(lines) or run.stderr[-400:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="28/4/128", help="query heads / kv heads / head_dim")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--kernel", default="fused", choices=["fused", "paged"])
    ap.add_argument("--tuning", default="", help="knobs as k=v,k=v (pages_per_block, num_splits, num_warps, "
                                                   "num_stages)")
    args = ap.parse_args()
    compat = importlib.import_module("jaxserve_kernels.pallas_compat")
    compat.resolve_interpret = lambda interpret: bool(interpret)  # compile for the GPU, never interpret
    h, kvh, d = map(int, args.heads.split("/"))
    tune = {k: int(v) for k, v in (kv.split("=") for kv in args.tuning.split(",") if kv)}
    page = 16
    width = -(-(args.context + 1) // page)
    pages = args.batch * width + 1
    sds = jax.ShapeDtypeStruct
    pool = sds((kvh, pages, page, d), jnp.bfloat16)
    tables, lengths = sds((args.batch, width), jnp.int32), sds((args.batch,), jnp.int32)
    with tempfile.TemporaryDirectory() as tmp, capture_triton_modules(tmp) as seen:
        if args.kernel == "fused":
            from jaxserve_kernels.decode_attention import fused_decode_attention
            fn = jax.jit(lambda qkv, cos, sin, k, v, t, n, s: fused_decode_attention(qkv, cos, sin, k, v, t, n, s,
                                                                                     **tune))
            call = (sds((args.batch, h + 2 * kvh, d), jnp.bfloat16), sds((args.batch, d), jnp.float32),
                    sds((args.batch, d), jnp.float32), pool, pool, tables, lengths, sds((args.batch,), jnp.int32))
        else:
            from jaxserve_kernels.paged_attention import paged_attention
            fn = jax.jit(lambda q, k, v, t, n: paged_attention(q, k, v, t, n, **tune))
            call = (sds((args.batch, h, d), jnp.bfloat16), pool, pool, tables, lengths)
        text = fn.trace(*call).lower(lowering_platforms=("cuda",)).as_text()
        # The launch parameters of each Triton call, in lowering order.
        launches = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)
        names = re.findall(r'name = "([^"]+)", num_stages', text)
        for i, rec in enumerate(seen):
            stages, warps = map(int, launches[i]) if i < len(launches) else (2, 4)
            name = names[i] if i < len(names) else f"kernel{i}"
            print(f"{name}: warps {warps}, stages {stages}: "
                  f"{ptxas_report(rec['path'], warps, stages)}", flush=True)


if __name__ == "__main__":
    main()
