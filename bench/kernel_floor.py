"""What one kernel of a dependent chain costs on this GPU, as a function of the bytes it streams.

Why: issue 8 asks for the 0.5B decode step within 2x of its byte roofline, and at one row that step is a chain of
~4 dependent kernels a layer (96 a step) that each stream 2-17 MB of weights. If every kernel of such a chain pays a
fixed cost besides its bytes, the step cannot go below `kernels x fixed + bytes / bandwidth`, whatever the kernels
do inside. This measures that line for two chains: for each size, `--matrices` distinct bf16 matrices (together far
beyond the 50 MB L2) in one jitted loop, every kernel taking its input from the one before it as the decode step's
do. "xla": XLA's own matrix-vector product on `[rows, 896]` (a row reduction; it splits some into two kernels, which
the table's kernel count shows). "stream": a Pallas Triton kernel that only streams its bytes (`--stream-rows` rows of
4,096 a program, one sum a program), the least a kernel of our toolchain pays. Reported: µs a kernel (median of
`--rounds`), its bytes over that time, the loop body's kernels in the compiled HLO, and a least-squares line
`µs = fixed + MB / rate` over the sizes. H200, session 42 (bench/results/decode_step.md): stream, 16 KiB programs,
2.62 µs + MB / 3.72 TB/s.

    python bench/kernel_floor.py --chains stream --stream-rows 2 8   # GPU
    python bench/kernel_floor.py --chains stream --pdl --sizes-mb 0.05 2 17.4   # with griddepcontrol too (session 44: no effect)
    python bench/kernel_floor.py --chains stream --loop p528r2s3w4 p1056r2s1w4f   # fixed grids looping over blocks
    python bench/kernel_floor.py --sizes-mb 0.1 0.5 --matrices 4 --reps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

K = 896  # Qwen2.5-0.5B's hidden size: every one-row projection of its step reduces rows of it (or of 4,864)


def launches_per_iteration(compiled_text: str) -> int:
    """Kernels (fusions and custom calls) in the compiled loop's body: one a matrix if XLA kept the chain as meant."""
    comps, name = {}, None
    for line in compiled_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    bodies = [m.group(1) for lines in comps.values() for line in lines
              for m in [re.search(r" while\(.*body=%([\w.\-]+)", line)] if m]
    return sum(1 for body in bodies for line in comps.get(body, [])
               if re.search(r" (fusion|custom-call)\(", line))


def _time_chain(body, v0: jax.Array, mats: list[jax.Array], reps: int, rounds: int) -> tuple[float, int, float]:
    """(µs a kernel, kernels a loop iteration, MB a kernel streams) of `reps` iterations of `body` (one kernel a matrix
    of `mats`) in one jitted loop."""
    f = jax.jit(lambda v: lax.fori_loop(0, reps, body, v)).lower(v0).compile()
    launches = launches_per_iteration(f.as_text())
    jax.block_until_ready(f(v0))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(f(v0))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (reps * len(mats)) * 1e6, launches, mats[0].nbytes / 1e6


def chain_us(size_mb: float, matrices: int, reps: int, rounds: int) -> tuple[float, int, float]:
    """(µs a kernel, kernels a loop iteration, MB a kernel) of a chain of dependent matrix-vector products over
    `size_mb` MB matrices (whole rows of 896)."""
    rows = max(1, int(size_mb * 1e6 / (K * 2)))
    keys = jax.random.split(jax.random.key(0), matrices)
    ws = [jax.random.normal(k, (rows, K), jnp.bfloat16) for k in keys]

    def body(_, v):
        for w in ws:  # unrolled: one product a matrix, each waiting on the one before
            y = jnp.dot(w, v.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
            v = v + 1e-9 * y[0]
        return v

    return _time_chain(body, jnp.ones((K,), jnp.float32), ws, reps, rounds)


def _stream_kernel(prev_ref, x_ref, o_ref):
    # Every program sums its [rows, 4096] block; the previous kernel's output (its first row) joins as a dependency
    # only, read whole so that no slicing kernel runs between two of these.
    block = x_ref[...].astype(jnp.float32)
    o_ref[...] = jnp.full(o_ref.shape, jnp.sum(block), jnp.float32) + prev_ref[...] * 0


def _grid_dependency(x: jax.Array, op: str) -> jax.Array:
    """In-kernel: `griddepcontrol.<op>` (PTX, sm_90+), returning an int32 zero shaped like `x` that the caller must
    use: Pallas's inline assembly is pure to LLVM, so only a use orders it (a zero added into an index or an output).
    "wait": blocks until the kernels this one was launched after have finished and their writes are visible (a
    no-op unless the launch was programmatic); "launch_dependents": lets the next kernel be scheduled early."""
    from jaxserve_kernels import pallas_compat as compat

    [zero] = compat.plgpu.elementwise_inline_asm(f"griddepcontrol.{op}; mov.b32 $0, 0;", args=[x], constraints="=r,r",
                                                 pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)])
    return zero


def _stream_kernel_pdl(prev_ref, x_ref, o_ref):
    # As _stream_kernel, written for a programmatic dependent launch: the block (which no earlier kernel writes) is
    # loaded and summed first, the next kernel may be scheduled from then on, and the previous kernel's output is read
    # only after the grid-dependency wait (its index carries the wait's zero).
    block = x_ref[...].astype(jnp.float32)
    total = jnp.sum(block)
    ready = _grid_dependency(jnp.zeros((1,), jnp.int32), "launch_dependents")
    waited = _grid_dependency(jnp.zeros((1,), jnp.int32), "wait")
    prev = prev_ref[pl.ds(waited[0], 1), :]
    o_ref[...] = jnp.full(o_ref.shape, total, jnp.float32) + prev * 0 + ready[0].astype(jnp.float32)


def stream_call(kernel, blocks: int, rows: int, width: int, interpret: bool):
    """`pallas_call` of a streaming kernel (`_stream_kernel` or `_stream_kernel_pdl`): `(prev [blocks, 16] float32,
    x [blocks * rows, width] bf16) -> [blocks, 16]`, one `[rows, width]` block of x a program, 4 warps."""
    from jaxserve_kernels import pallas_compat as compat

    return pl.pallas_call(kernel, grid=(blocks,),
                          in_specs=[pl.BlockSpec((1, 16), lambda i: (0, 0)), pl.BlockSpec((rows, width), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((1, 16), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct((blocks, 16), jnp.float32), interpret=interpret,
                          compiler_params=None if interpret else compat.compiler_params(4, 1), name="stream")


def _stream_loop_kernel(prev_ref, x_ref, o_ref, *, rows: int, programs: int, iters: int, prefetch: bool):
    # Program p sums blocks p, p + P, p + 2P, ... of x (P programs, `iters` blocks each, all in range). `prefetch`:
    # the next block is loaded into registers before this one is summed, as the one-row gate_up does; otherwise the
    # loop is left to Triton's software pipeline (`num_stages`).
    from jaxserve_kernels import pallas_compat as compat

    pid = pl.program_id(0)
    width = x_ref.shape[1]

    def block(i, ok=None):
        at = x_ref.at[pl.ds((pid + i * programs) * rows, rows), :]
        if ok is None:
            return at[...]
        return compat.load(at, mask=jnp.full((rows, width), ok), other=0)

    if prefetch:
        def body(i, carry):
            total, cur = carry
            nxt = block(i + 1, i + 1 < iters)
            return total + jnp.sum(cur.astype(jnp.float32)), nxt

        total, _ = lax.fori_loop(0, iters, body, (jnp.float32(0), block(0)))
    else:
        total = lax.fori_loop(0, iters, lambda i, t: t + jnp.sum(block(i).astype(jnp.float32)), jnp.float32(0))
    o_ref[...] = jnp.full(o_ref.shape, total, jnp.float32) + prev_ref[...] * 0


def loop_call(programs: int, rows: int, iters: int, stages: int, warps: int, prefetch: bool, interpret: bool):
    """`pallas_call` of `_stream_loop_kernel`: `(prev [programs, 16] float32, x [programs * iters * rows, 4096] bf16)
    -> [programs, 16]`, each output row program p's sum of its blocks."""
    from jaxserve_kernels import pallas_compat as compat

    kernel = functools.partial(_stream_loop_kernel, rows=rows, programs=programs, iters=iters, prefetch=prefetch)
    return pl.pallas_call(kernel, grid=(programs,),
                          in_specs=[pl.BlockSpec((1, 16), lambda i: (0, 0)), pl.no_block_spec],
                          out_specs=pl.BlockSpec((1, 16), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct((programs, 16), jnp.float32), interpret=interpret,
                          compiler_params=None if interpret else compat.compiler_params(warps, stages),
                          name="stream_loop")


def loop_chain_us(size_mb: float, matrices: int, reps: int, rounds: int, programs: int = 528, rows: int = 2,
                  stages: int = 1, warps: int = 4, prefetch: bool = False) -> tuple[float, int, float]:
    """The streaming chain with a fixed grid: `programs` programs, each looping over its share of `[rows, 4096]`
    blocks (the size rounded to a whole number of blocks a program). Where the one-shot grid's programs each pay
    the first load's latency, these keep loads in flight across blocks (Triton's pipeline at `stages` > 1, or the
    register prefetch of `prefetch`)."""
    from jaxserve_kernels import pallas_compat as compat

    width = 4096
    iters = max(1, round(size_mb * 1e6 / (programs * rows * width * 2)))
    keys = jax.random.split(jax.random.key(2), matrices)
    xs = [jax.random.normal(k, (programs * iters * rows, width), jnp.bfloat16) for k in keys]
    call = loop_call(programs, rows, iters, stages, warps, prefetch, compat.resolve_interpret(None))

    def body(_, v):
        for x in xs:
            v = call(v, x)
        return v

    return _time_chain(body, jnp.zeros((programs, 16), jnp.float32), xs, reps, rounds)


LOOP_FORM = re.compile(r"p(\d+)r(\d+)s(\d+)w(\d+)(f?)$")


def parse_loop_form(form: str) -> dict:
    """`--loop` form `p<programs>r<rows>s<stages>w<warps>[f]` (f: register prefetch) as `loop_chain_us` keywords.

    Example:
        >>> parse_loop_form("p528r2s3w4")
        {'programs': 528, 'rows': 2, 'stages': 3, 'warps': 4, 'prefetch': False}
    """
    m = LOOP_FORM.match(form)
    if m is None:
        raise ValueError(f"--loop form {form!r} is not p<programs>r<rows>s<stages>w<warps>[f]")
    programs, rows, stages, warps = map(int, m.groups()[:4])
    return dict(programs=programs, rows=rows, stages=stages, warps=warps, prefetch=m.group(5) == "f")


def stream_chain_us(size_mb: float, matrices: int, reps: int, rounds: int, rows: int = 2,
                    pdl: bool = False) -> tuple[float, int, float]:
    """The same chain with a Pallas Triton kernel that only streams its bytes (`rows` x 8 KiB a program, one sum a
    program): what a kernel of our own toolchain pays at the least, besides its bytes. `pdl`: each kernel waits on
    the one before with `griddepcontrol` (compiled only), which overlaps the chain where XLA launches it
    programmatically."""
    from jaxserve_kernels import pallas_compat as compat

    width = 4096
    blocks = max(1, int(size_mb * 1e6 / (rows * width * 2)))
    keys = jax.random.split(jax.random.key(1), matrices)
    xs = [jax.random.normal(k, (blocks * rows, width), jnp.bfloat16) for k in keys]
    interpret = compat.resolve_interpret(None)
    call = stream_call(_stream_kernel_pdl if pdl and not interpret else _stream_kernel, blocks, rows, width, interpret)

    def body(_, v):
        for x in xs:
            v = call(v, x)
        return v

    return _time_chain(body, jnp.zeros((blocks, 16), jnp.float32), xs, reps, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[0.05, 0.5, 1.0, 2.0, 4.0, 8.7, 17.4, 35.0])
    ap.add_argument("--matrices", type=int, default=24, help="distinct matrices a loop iteration (one per layer)")
    ap.add_argument("--reps", type=int, default=20, help="loop iterations a timed call")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chains", nargs="+", default=["xla", "stream"], choices=["xla", "stream"])
    ap.add_argument("--stream-rows", type=int, nargs="+", default=[2], help="8 KiB rows a streaming program")
    ap.add_argument("--pdl", action="store_true", help="the stream chains also with griddepcontrol in each kernel")
    ap.add_argument("--loop", nargs="+", default=[], metavar="FORM",
                    help="looped streaming chains, each p<programs>r<rows>s<stages>w<warps>[f] (f: register prefetch)")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    chains = [("xla", "XLA matrix-vector products ([rows, 896] bf16)", chain_us)]
    for rows in args.stream_rows:
        for pdl in (False, True) if args.pdl else (False,):
            chains.append(("stream", f"Pallas Triton streaming sums ({rows * 8} KiB a program"
                           f"{', griddepcontrol wait / launch_dependents' if pdl else ''})",
                           functools.partial(stream_chain_us, rows=rows, pdl=pdl)))
    for form in args.loop:
        chains.append(("stream", f"Pallas Triton streaming sums, fixed grid {form} ({parse_loop_form(form)})",
                       functools.partial(loop_chain_us, **parse_loop_form(form))))
    for chain, name, timer in chains:
        if chain not in args.chains:
            continue
        print(f"\n{name}\n")
        print("| MB a kernel | µs a kernel | GB/s | kernels a loop iteration |")
        print("|---|---|---|---|")
        xs, ys = [], []
        for mb in args.sizes_mb:
            us, launches, real_mb = timer(mb, args.matrices, args.reps, args.rounds)
            xs.append(real_mb)
            ys.append(us)
            print(f"| {real_mb:.2f} | {us:.2f} | {real_mb * 1e3 / us:.0f} | {launches} |", flush=True)
        if len(xs) >= 2:
            slope, fixed = np.polyfit(np.array(xs), np.array(ys), 1)
            print(f"least squares: µs = {fixed:.2f} + MB x {slope:.4f} (fixed {fixed:.2f} µs a kernel, "
                  f"{1 / slope:.2f} TB/s on the bytes)")


if __name__ == "__main__":
    main()
