"""Which clustered skinny-matmul launch hangs on the GPU (session 35): each case in a process of its own under a
time limit, its result printed as soon as it is known.

    python3 bench/cluster_probe.py --limit 45
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {
    # JAX's documented multicast: two CTAs, one 128-float copy
    "doc_multicast": None,
    # ours, cluster 2: no refill (2 steps, 4 slots), then refills, with and without the cluster barrier
    "p_norefill": ("partials", 64, 128, 128, dict(block_n=32, num_slots=4, num_splits=1)),
    "p_refill_norelease": ("partials", 64, 1024, 128, dict(block_n=32, num_slots=3, num_splits=1)),
    "p_refill_nomulticast": ("partials", 64, 1024, 128, dict(block_n=32, num_slots=3, num_splits=1)),
    "p_refill": ("partials", 64, 1024, 128, dict(block_n=32, num_slots=3, num_splits=1)),
    "acc_down256": ("accumulate", 256, 4864, 896, dict(block_n=64, num_slots=3, block_m=128)),
    "swiglu256": ("swiglu", 256, 896, 800, dict(block_n=40, num_slots=3, block_m=128, joint=True)),
}


def run_case(name: str) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    if name == "doc_multicast":
        from jax.experimental.pallas import mosaic_gpu as plgpu

        @functools.partial(plgpu.kernel, out_shape=jax.ShapeDtypeStruct((2, 128), jnp.float32),
                           scratch_shapes=[plgpu.SMEM((128,), jnp.float32), plgpu.Barrier()],
                           cluster=(2,), cluster_names=("cluster",))
        def kernel(x_ref, y_ref, smem_ref, barrier_ref):
            plgpu.copy_gmem_to_smem(x_ref, smem_ref, barrier_ref, collective_axes="cluster")
            plgpu.barrier_wait(barrier_ref)
            plgpu.copy_smem_to_gmem(smem_ref, y_ref.at[jax.lax.axis_index("cluster")])
            plgpu.wait_smem_to_gmem(0)

        x = jnp.arange(128, dtype=jnp.float32)
        y = np.asarray(kernel(x))
        return "ok" if (y == np.stack([x, x])).all() else "WRONG"
    import jaxserve_kernels.skinny_matmul_mgpu as mod
    from jaxserve_kernels.skinny_matmul import skinny_matmul_reference
    epilogue, m, k, n, tiling = CASES[name]
    if name.endswith("norelease"):
        mod._CLUSTER_RELEASE = False
    if name.endswith("nomulticast"):
        mod._CLUSTER_MULTICAST = False
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.bfloat16)
    acc = jnp.zeros((m, n), jnp.float32) if epilogue == "accumulate" else None
    out = mod.skinny_matmul_mgpu(x, w, epilogue=epilogue, acc=acc, cluster=2, interpret=False, **tiling)
    out = np.asarray(out.astype(jnp.float32))
    ref = skinny_matmul_reference(x, w, None, epilogue="partials" if epilogue == "accumulate" else epilogue,
                                  layout="nk")
    ref = np.asarray(ref.astype(jnp.float32))
    if epilogue in ("partials", "accumulate"):
        ref = ref.sum(0)
        out = out.sum(0) if epilogue == "partials" else out
    err = float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-9))
    return f"ok, max relative error {err:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=45.0)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(run_case(args.one), flush=True)
        return
    for name in args.cases:
        start = time.time()
        try:
            done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                  timeout=args.limit)
            tail = (done.stdout.strip().splitlines() or [""])[-1] if done.returncode == 0 else \
                f"rc {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:])
        except subprocess.TimeoutExpired:
            tail = f"HUNG (killed after {args.limit:.0f} s)"
        print(f"{name}: {tail} [{time.time() - start:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
