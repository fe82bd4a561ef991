"""Fingerprints of the kernels as the GPU would compile them, computed on the CPU.

For each case (the decode step at 1 / 16 / 64 rows, every standalone kernel of
`tests/test_gpu_lowering.py`, the skinny / folded-norm / merge / fused-attention paths at several
tilings) the function is lowered for CUDA with interpret mode off (`jax.export`), so each
`pallas_call` goes through JAX's Triton lowering, and the StableHLO text (Triton IR inside) is
hashed, source locations left out. Two runs that print the same lines lower to the same Triton
programs: a refactor that means to change nothing can be checked without a GPU.

    python scripts/lowering_fingerprint.py /tmp/before.txt   # then edit, rerun, and `cmp` the files
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys

import jax
import jax.numpy as jnp

jax.config.update("jax_traceback_in_locations_limit", 0)  # no file:line in the text
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tests.test_gpu_lowering as t  # noqa: E402
from jaxserve_kernels.decode_attention import fused_decode_attention  # noqa: E402
from jaxserve_kernels.residual_norm import add_rms_norm  # noqa: E402
from jaxserve_kernels.split_combine import combine_splits  # noqa: E402

sm = importlib.import_module("jaxserve_kernels.skinny_matmul")  # `kernels` exports a function of that name
S = t._sds


def fingerprints() -> dict[str, str]:
    """{case: "sha256 length"} of each case's lowered CUDA StableHLO."""
    t.compat.resolve_interpret = lambda interpret: bool(interpret)  # the kernels as the GPU runs them
    out = {}
    for b in (1, 16, 64):
        out[f"step{b}"] = t.decode_step_text(b)
    for name, fn, args in t.STANDALONE:
        out[name] = t.lower_for_cuda(fn, *args)
    i32, f32 = jnp.int32, jnp.float32
    for m in (1, 16, 64, 256):
        for layout in ("nk", "kn"):
            for ep in ("none", "partials", "swiglu"):
                w = S((9728, 896)) if layout == "nk" else S((896, 9728))
                fn = functools.partial(sm.skinny_matmul, epilogue=ep, layout=layout)
                out[f"skinny{m}{layout}{ep}"] = t.lower_for_cuda(fn, S((m, 896)), w)
    out["norm_swiglu"] = t.lower_for_cuda(
        lambda h, p, s, w: sm.skinny_matmul_norm(h, p, s, w, eps=1e-6, epilogue="swiglu"),
        S((1, 896)), S((2, 1, 896), f32), S((896,)), S((9728, 896)))
    out["norm_none"] = t.lower_for_cuda(lambda h, s, w, b: sm.skinny_matmul_norm(h, None, s, w, b, eps=1e-6),
                                        S((1, 896)), S((896,)), S((1152, 896)), S((1152,)))
    out["combine"] = t.lower_for_cuda(combine_splits, S((4, 8, 2, 7, 64)), S((4, 8, 2, 7), f32))
    out["addnorm"] = t.lower_for_cuda(lambda h, p, s: add_rms_norm(h, p, s, eps=1e-6),
                                      S((64, 896)), S((3, 64, 896), f32), S((896,)))
    decode_args = (S((8, 18, 64)), S((8, 64), f32), S((8, 64), f32), t.POOL, t.POOL, S((8, 64), i32),
                   S((8,), i32), S((8,), i32))
    for combine in ("pallas", "inkernel"):
        fn = functools.partial(fused_decode_attention, num_splits=4, combine=combine)
        out[f"fused_split_{combine}"] = t.lower_for_cuda(fn, *decode_args)
    return {k: f"{hashlib.sha256(v.encode()).hexdigest()} {len(v)}" for k, v in out.items()}


if __name__ == "__main__":
    cases = fingerprints()
    with open(sys.argv[1], "w") as f:
        f.writelines(f"{k} {v}\n" for k, v in cases.items())
    print(len(cases), "cases")
