"""Memory-bandwidth benchmark of the paging kernels on the GPU, side by side with baselines.

Owns: timing of our paged decode kernel against XLA attention over a contiguous cache,
JAX's bundled Pallas `paged_attention` (best of a small tuning sweep), the HBM read and
copy ceilings; the cache scatter for one decode step and one 32k-token prefill at two
pool sizes; prefill attention throughput. Prints one markdown table per part and writes
them to `$OUT/bandwidth.md` (or `--out`). Never asserts correctness (tests do that).

Timing: each measured call runs many times inside one jitted `lax.fori_loop` with a
static trip count whose output feeds the next call (nothing hoisted, no Python dispatch,
no host round trip between iterations: see `timed`); the median of several repeats,
divided by the count. Working sets under 4x the L2 rotate among several caches (distinct
pages) inside each loop step, so reads come from HBM; every decode loop step makes at least 8
calls, so the loop's own cost per iteration is spread thin.

    PYTHONPATH=. python3 bench/bandwidth.py [--sweep] [--quick] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib
import json
import math
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve_kernels import cache_scatter, cache_scatter_reference, paged_attention
from jaxserve_kernels.prefill_attention import (paged_prefill_attention,
                                       paged_prefill_attention_reference)

# HBM bandwidth by the vendors' datasheets; the targets are fractions of the H100's.
# `jaxserve_kernels.paged_attention` is the function (the package re-exports it); this is the module.
paged_attention_module = importlib.import_module("jaxserve_kernels.paged_attention")
SPEC_BY_DEVICE = {"H100": 3.35e12, "H200": 4.8e12}


def _spec_bytes_per_s() -> float:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in SPEC_BY_DEVICE.items() if k in kind), SPEC_BY_DEVICE["H100"])


SPEC_BYTES_PER_S = _spec_bytes_per_s()
SPEC_LABEL = f"{SPEC_BYTES_PER_S / 1e12:.2f}"
# H100 50 MB; H200 reports 60 MB. The larger keeps both honest (rotation past 4x L2).
L2_BYTES = 60e6
# Decode calls per timed loop iteration (--calls-per-iteration).
MIN_CALLS = 8
PAGE = 16
DTYPE = jnp.bfloat16
HEADS = {"0.5B 14q/2kv/64": (14, 2, 64), "7B 28q/4kv/128": (28, 4, 128)}

# (heads, batch, context): the representative subset the table reports.
DECODE_SHAPES = [
    ("7B 28q/4kv/128", 1, 512), ("7B 28q/4kv/128", 1, 8192), ("7B 28q/4kv/128", 1, 32768),
    ("7B 28q/4kv/128", 8, 2048), ("7B 28q/4kv/128", 8, 32768),
    ("7B 28q/4kv/128", 64, 2048), ("7B 28q/4kv/128", 64, 4096),
    ("7B 28q/4kv/128", 64, 8192), ("7B 28q/4kv/128", 256, 2048),
    ("7B 28q/4kv/128", 256, 8192),
    ("0.5B 14q/2kv/64", 1, 512), ("0.5B 14q/2kv/64", 1, 32768), ("0.5B 14q/2kv/64", 8, 32768),
    ("0.5B 14q/2kv/64", 64, 2048), ("0.5B 14q/2kv/64", 64, 8192),
    ("0.5B 14q/2kv/64", 256, 2048), ("0.5B 14q/2kv/64", 256, 8192),
]
QUICK_SHAPES = [DECODE_SHAPES[i] for i in (2, 5, 7, 11, 14)]
# --fp8-only: KV pools in float8_e4m3fn against bf16 ones (EngineConfig.kv_cache_dtype="fp8").
FP8_SHAPES = [DECODE_SHAPES[i] for i in (2, 4, 5, 7, 9, 12, 13, 14, 16)]
# --mosaic-only: the quick shapes and the ones still short of the targets.
MOSAIC_SHAPES = [DECODE_SHAPES[i] for i in (2, 3, 4, 5, 7, 8, 11, 12, 13, 14, 15)]
# The Mosaic GPU kernel's knobs: keys a step, blocks in flight, splits (x2: twice the default).
MOSAIC_CONFIGS = {"ppb=4": dict(pages_per_block=4), "ppb=8": dict(pages_per_block=8),
                  "ppb=4 slots=3": dict(pages_per_block=4, num_slots=3),
                  "ppb=4 splits x2": dict(pages_per_block=4, splits_x=2)}
# Session 7, after the timing fix: the shapes still short of the targets (small
# batches, 0.5B heads, 7B 8 x 2k against XLA), the split count relative to the default ("xN"),
# keys per iteration, and the split merge inside the attention kernel ("inkernel": no second
# launch).
_T = {"splits x2": "x2", "splits x4": "x4", "ppb=4": dict(pages_per_block=4),
      "ppb=16": dict(pages_per_block=16), "ppb=16 warps=8": dict(pages_per_block=16, num_warps=8),
      "merge in kernel": dict(combine="inkernel"), "merge in kernel, splits x2": "x2 inkernel"}
# Session 13: the 7B shapes a point or two short (64 x 8k at 87% of spec for 88%, 8 x 2k behind
# XLA): pipeline depth and warps of the default tiling, and the split count.
_T7B = {"stages=3": dict(num_stages=3), "stages=4": dict(num_stages=4), "warps=8": dict(num_warps=8),
        "ppb=4 stages=4": dict(pages_per_block=4, num_stages=4), "splits x2": "x2"}
# Session 24: batch 1 x 32k (57% / 29% of spec for issue 6's 70%). 7B: the default 128 splits x 4
# KV heads are 512 programs at 3 an SM (396 resident), 1.3 waves; 64 or 96 splits fit one wave.
# 0.5B: 256 splits of one iteration each against 128 of two.
_T24 = {"splits=64": dict(num_splits=64), "splits=96": dict(num_splits=96),
        "splits=96 stages=3": dict(num_splits=96, num_stages=3), "splits=128": dict(num_splits=128),
        "splits=128 ppb=16": dict(num_splits=128, pages_per_block=16)}
# Session 24: 0.5B 64 x 2k (60% of spec for 66%): session 19's ncu had it latency-bound at 108
# registers (4 programs an SM, one wave of 512); warps and stages were swept there at 7B heads only.
_T24B = {"warps=8": dict(num_warps=8), "warps=2": dict(num_warps=2), "stages=1": dict(num_stages=1),
         "stages=3": dict(num_stages=3), "splits=8 warps=8": dict(num_splits=8, num_warps=8),
         "splits=8 stages=3": dict(num_splits=8, num_stages=3)}
# Session 28: the softmax's instruction cuts (jaxserve_kernels.paged_attention.FTZ_EXP2 / LEAN_SOFTMAX), at every
# sweep shape (`--sweep-configs ftz lean "lean ftz"`).
_T28 = {"ftz": dict(ftz_exp2=True), "lean": dict(lean_softmax=True),
        "lean ftz": dict(ftz_exp2=True, lean_softmax=True)}
# Session 29: 7B 8 x 2k, the one shape of >= 2k context where XLA's contiguous attention is ahead (15.3 against
# 16.1 µs), and the batch-1 rows: the split merge as XLA's fusions of the jnp merge (`combine="xla"`) rather than
# `jaxserve_kernels.split_combine`'s launch (3.6-4.4 µs for ~1 µs of work under ncu, session 7), and fewer splits with it.
_T29 = {"combine=xla": dict(combine="xla"), "splits=4": dict(num_splits=4),
        "splits=4 combine=xla": dict(num_splits=4, combine="xla"),
        "splits=16 combine=xla": dict(num_splits=16, combine="xla"),
        # 8 splits are 256 programs at 3 an SM (396 resident): 10-12 fill the wave more evenly.
        "splits=6": dict(num_splits=6), "splits=10": dict(num_splits=10), "splits=12": dict(num_splits=12)}
_T29_1 = {"combine=xla": _T29["combine=xla"]}
# Session 36: fewer, longer programs with deeper pipelines. The short rows' time is a fixed cost (launch, the
# first block's round trip, the merge launch) on top of a loop that streams near 75% of spec: fewer splits drop
# or shrink the merge, and more stages keep a lone program's loads in flight. Every earlier sweep moved splits
# or stages one at a time from the defaults; these move both.
_T36_05 = {"splits=2 stages=3": dict(num_splits=2, num_stages=3), "splits=2 stages=4": dict(num_splits=2, num_stages=4),
           "splits=1 stages=4": dict(num_splits=1, num_stages=4),
           "splits=1 stages=4 warps=8": dict(num_splits=1, num_stages=4, num_warps=8),
           "splits=2 stages=3 warps=8": dict(num_splits=2, num_stages=3, num_warps=8),
           "ppb=4 stages=3": dict(pages_per_block=4, num_stages=3), "ppb=4 stages=4": dict(pages_per_block=4, num_stages=4),
           "splits=2 ppb=4 stages=4": dict(num_splits=2, pages_per_block=4, num_stages=4)}
_T36_7B = {"splits=4 stages=3": dict(num_splits=4, num_stages=3), "warps=2": dict(num_warps=2),
           "ppb=4 stages=3": dict(pages_per_block=4, num_stages=3),
           "splits=16 ppb=4 stages=3": dict(num_splits=16, pages_per_block=4, num_stages=3),
           "splits=4 ppb=4 stages=4": dict(num_splits=4, pages_per_block=4, num_stages=4)}
_T36_1 = {"splits=32 stages=3": dict(num_splits=32, num_stages=3), "splits=64 stages=3": dict(num_splits=64, num_stages=3),
          "splits=32 ppb=4 stages=4": dict(num_splits=32, pages_per_block=4, num_stages=4)}
# Session 36, after "splits=16 ppb=4 stages=3" read 15.4 µs at 7B 8 x 2k (default 16.1, XLA contiguous 15.3 in
# session 29): around it, with the baselines in the same process (`--sweep-baselines`). "xN k=v ...": N times the
# default split count with those knobs.
_T36B = {"splits=16 ppb=4": dict(num_splits=16, pages_per_block=4),
         "splits=16 ppb=4 stages=3": dict(num_splits=16, pages_per_block=4, num_stages=3),
         "splits=16 ppb=4 stages=4": dict(num_splits=16, pages_per_block=4, num_stages=4),
         "splits=16 ppb=4 stages=3 warps=8": dict(num_splits=16, pages_per_block=4, num_stages=3, num_warps=8),
         "splits=32 ppb=4 stages=3": dict(num_splits=32, pages_per_block=4, num_stages=3),
         "splits=16 ppb=8": dict(num_splits=16, pages_per_block=8),
         "splits=16 ppb=2 stages=3": dict(num_splits=16, pages_per_block=2, num_stages=3),
         "splits=12 ppb=4 stages=3": dict(num_splits=12, pages_per_block=4, num_stages=3)}
_T36X = {"x2 ppb=4 stages=3": "x2 ppb=4 stages=3"}
# Session 36, from bench/triton_registers.py: at 0.5B heads 64-key blocks hold 71 registers a thread against the
# default's 98 (6-7 programs an SM instead of 4-5 by registers, two stages' 32 KiB of shared memory each), so more
# splits of them can all be resident at once.
_T36C = {f"splits={n} ppb=4": dict(num_splits=n, pages_per_block=4) for n in (6, 7, 8, 12)}
# Session 52: every default above was tuned on the H200 (sessions 6-50); issue 6's targets are written for the
# H100, whose memory is 1.43x slower behind the same 132 SMs, so a fixed cost weighs less there and more programs
# or stages may no longer pay. The four shapes short on the H100 (session 51), knobs around their defaults.
_T52_64X8K = {"h100 splits=2": dict(num_splits=2), "h100 splits=2 stages=3": dict(num_splits=2, num_stages=3),
              "h100 stages=3": dict(num_stages=3), "h100 stages=1": dict(num_stages=1),
              "h100 ppb=16": dict(pages_per_block=16)}
_T52_8X2K = {"h100 splits=8 ppb=8": dict(num_splits=8, pages_per_block=8),
             "h100 splits=16 ppb=4 stages=3": dict(num_splits=16, pages_per_block=4, num_stages=3),
             "h100 splits=12 ppb=4": dict(num_splits=12, pages_per_block=4),
             "h100 splits=8 ppb=4 stages=3": dict(num_splits=8, pages_per_block=4, num_stages=3),
             "h100 splits=16 ppb=4 warps=2": dict(num_splits=16, pages_per_block=4, num_warps=2),
             "h100 combine=xla": dict(combine="xla")}
# Session 52, after three stages won at 7B 64 x 8k (now the default for loops of >= 32 blocks at head_dim 128,
# `paged_attention.LONG_LOOP_BLOCKS`): the two stages of before, beside it, at every shape the rule changes.
_T52_STAGES2 = {"h100 stages=2": dict(num_stages=2)}
_T52_1X32K = {f"h100 splits={n}": dict(num_splits=n) for n in (32, 64, 128, 256)} | {
    "h100 splits=64 stages=3": dict(num_splits=64, num_stages=3),
    "h100 splits=128 ppb=4": dict(num_splits=128, pages_per_block=4)}
SWEEP = [
    (("7B 28q/4kv/128", 64, 8192), {**_T7B, **_T28}),
    (("7B 28q/4kv/128", 8, 2048), {**_T, **_T7B, **_T28, **_T29, **_T36_7B, **_T36B}),
    (("0.5B 14q/2kv/64", 64, 2048), {**_T, **_T24B, **_T28, **_T29_1, **_T36_05, **_T36X, **_T36C}),
    (("0.5B 14q/2kv/64", 64, 8192), {**_T, **_T28}),
    (("7B 28q/4kv/128", 1, 32768), {**_T, **_T24, **_T28, **_T29_1, **_T36_1, **_T36X}),
    (("0.5B 14q/2kv/64", 1, 32768), {**_T, **_T24, **_T28, **_T29_1, **_T36_1, **_T36X}),
    (("0.5B 14q/2kv/64", 8, 32768), {**_T, **_T28, **_T36X}),
    (("7B 28q/4kv/128", 1, 8192), _T36X),
    (("7B 28q/4kv/128", 8, 32768), _T36X),
    (("0.5B 14q/2kv/64", 256, 2048), _T28),
    (("7B 28q/4kv/128", 64, 2048), _T28),
    (("7B 28q/4kv/128", 64, 8192), {**_T52_64X8K, **_T52_STAGES2}),
    (("7B 28q/4kv/128", 64, 4096), _T52_STAGES2),
    (("7B 28q/4kv/128", 256, 8192), _T52_STAGES2),
    (("7B 28q/4kv/128", 8, 32768), _T52_STAGES2),
    (("7B 28q/4kv/128", 8, 2048), _T52_8X2K),
    (("7B 28q/4kv/128", 1, 32768), _T52_1X32K),
    (("0.5B 14q/2kv/64", 1, 32768), _T52_1X32K),
]


class Budget:
    """Wall-clock guard: measurements past the budget are skipped, not started."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> bool:
        return time.perf_counter() < self.end


def timed(step, carry, consts, *, donate: bool = False, target_s: float = 0.04,
          repeats: int = 5, static_count: bool = True,
          count: int | None = None) -> tuple[float, object]:
    """Median seconds per `carry = step(carry, *consts)`, looped on device.

    The loop's trip count is a compile-time constant: XLA:GPU runs a while loop whose
    count it cannot see by copying the predicate to the host after every iteration, and
    that round trip (~32 µs on the H200, `loop_overhead`) was timed with every call until
    session 7. So a measurement compiles twice, a short loop for an estimate and then the
    counted one, unless the caller knows a `count` (one compile). `static_count=False` keeps
    the old loop, for `loop_overhead` only.
    """
    def compiled(n):
        if static_count:
            return jax.jit(lambda c, *k: lax.fori_loop(0, n, lambda i, c: step(c, *k), c),
                           donate_argnums=(0,) if donate else ())
        loop = jax.jit(lambda c, m, *k: lax.fori_loop(0, m, lambda i, c: step(c, *k), c),
                       donate_argnums=(0,) if donate else ())
        return lambda c, *k: loop(c, n, *k)

    if count is None:
        short = compiled(4)
        carry = jax.block_until_ready(short(carry, *consts))
        start = time.perf_counter()
        carry = jax.block_until_ready(short(carry, *consts))
        estimate = (time.perf_counter() - start) / 4
        count = int(min(4096, max(4, 2 ** round(math.log2(max(target_s / max(estimate, 1e-7), 1))))))
        loop = compiled(count) if count != 4 else short
    else:
        loop = compiled(count)
    carry = jax.block_until_ready(loop(carry, *consts))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(loop(carry, *consts))
        times.append((time.perf_counter() - start) / count)
    return statistics.median(times), carry


def loop_overhead() -> dict[str, float]:
    """Seconds per iteration of a trivial loop body, trip count dynamic vs static."""
    step = lambda c: c * 1.0001 + 1.0  # noqa: E731  (one tiny kernel a call)
    x = jnp.zeros((1024,), jnp.float32)
    return {"dynamic": timed(step, x, (), static_count=False)[0], "static": timed(step, x, ())[0]}


def rotations(kv_bytes: float) -> int:
    return max(1, min(8, math.ceil(4 * L2_BYTES / kv_bytes)))


def make_paged(key, batch, context, kv_heads, head_dim, copies, page: int = PAGE):
    """One pool of `page`-token pages holding `copies` disjoint sets of pages; random non-contiguous tables."""
    pages_per_seq = context // page
    num_pages = copies * batch * pages_per_seq
    k1, k2, k3, k4 = jax.random.split(key, 4)
    shape = (kv_heads, num_pages, page, head_dim)
    k_pages = jax.random.normal(k1, shape, DTYPE)
    v_pages = jax.random.normal(k2, shape, DTYPE)
    tables = jax.random.permutation(k3, num_pages).astype(jnp.int32)
    tables = tables.reshape(copies, batch, pages_per_seq)
    lengths = jnp.full((batch,), context, jnp.int32)
    return k_pages, v_pages, tables, lengths, k4


def xla_contiguous_attention(q, k, v, lengths):
    """Plain XLA decode attention over `[batch, kv_heads, T, D]` caches."""
    batch, num_heads, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    qg = q.reshape(batch, kv_heads, num_heads // kv_heads, head_dim)
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k, preferred_element_type=jnp.float32)
    s = s * head_dim ** -0.5
    s = jnp.where(jnp.arange(keys)[None, None, None] < lengths[:, None, None, None], s,
                  -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgt,bhtd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(q.shape).astype(q.dtype)


def xla_contiguous_step(key, copies: int, unroll: int, shape: tuple[int, int, int, int]):
    """(step, caches): `copies` pairs of random contiguous K / V caches of `shape` `[batch, kv_heads, keys, D]` and a
    loop body calling `xla_contiguous_attention` over each pair `unroll` times, its output fed back."""
    keys = jax.random.split(key, 2 * copies)
    caches = tuple(jax.random.normal(keys[i], shape, DTYPE) for i in range(2 * copies))

    def step(q, caches, lengths):
        for _ in range(unroll):
            for j in range(copies):
                q = xla_contiguous_attention(q, caches[2 * j], caches[2 * j + 1], lengths)
        return q
    return step, caches


def bundled_kernel():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as bundled
    return bundled.paged_attention


def ceilings(elements: int = 2**31) -> dict[str, float]:
    """HBM read ceiling (XLA sum over 4 GiB) and copy bandwidth (negate 2 GiB in place)."""
    x = jax.random.normal(jax.random.key(0), (elements,), DTYPE)
    read_s, _ = timed(lambda s, x: jnp.sum(x + s.astype(DTYPE), dtype=jnp.float32) * 1e-9,
                      jnp.float32(0), (x,))
    del x
    y = jax.random.normal(jax.random.key(1), (elements // 2,), DTYPE)
    copy_s, _ = timed(lambda y: -y, y, (), donate=True)
    return {"read": 2 * elements / read_s, "copy": 2 * elements / copy_s}


@dataclasses.dataclass(frozen=True)
class DecodeLoop:
    """How a decode row's calls are timed: `copies` disjoint page sets (rotated past the L2), each called `unroll`
    times a loop iteration, the output fed back, the loop run `calls` times."""

    copies: int
    unroll: int
    calls: int

    @classmethod
    def plan(cls, io_bytes: float, copies: int, min_calls: int) -> "DecodeLoop":
        # At least `min_calls` calls a loop iteration, so the static loop's own ~10 µs an iteration
        # (bandwidth.md, session 7) is ~1 µs a call; rotation already gives 8 to small rows.
        unroll = -(-max(1, min_calls) // copies)
        # One compile: the count from the bytes at ~3 TB/s, not from a timed estimate.
        return cls(copies, unroll, int(min(4096, max(2, 0.04 * 3e12 / (io_bytes * copies * unroll)))))

    @property
    def per_iteration(self) -> int:
        return self.copies * self.unroll

    def paged_step(self, attend):
        """The loop body calling `attend(q, k_pages, v_pages, table, lengths)` over each copy's table."""
        def step(q, k_pages, v_pages, tables, lengths):
            for _ in range(self.unroll):
                for j in range(self.copies):
                    q = attend(q, k_pages, v_pages, tables[j], lengths)
            return q
        return step

    def measure(self, results: dict, budget, label: str, step, carry, consts) -> None:
        """`results[label]`: seconds a call, or why there is none (the budget, or a config that does not compile)."""
        if not budget.left():
            results[label] = "skipped (time budget)"
            return
        try:
            seconds, _ = timed(step, carry, consts, count=self.calls)
            results[label] = seconds / self.per_iteration
        except Exception as error:  # a config that does not compile is a result too
            results[label] = f"error: {type(error).__name__}: {str(error)[:160]}"


def default_split_count(name: str, batch: int, context: int) -> int:
    """Our decode kernel's default split count at a shape (page 16): what `relative_config`'s "xN" multiplies."""
    kv_heads, head_dim = HEADS[name][1], HEADS[name][2]
    return paged_attention_module.resolve_tuning(
        PAGE, context // PAGE, batch * kv_heads, None, None, False, paged_attention_module.DECODE_BLOCK_KEYS,
        head_dim=head_dim)[1]


def decode_row(name, batch, context, read_ceiling, budget, *, with_baselines=True,
               our_configs=None, min_calls: int = MIN_CALLS, mosaic: bool = False, page: int = PAGE):
    """Times ours (default or each of `our_configs`), XLA contiguous and the bundled kernel, over
    pages of `page` tokens."""
    num_heads, kv_heads, head_dim = HEADS[name]
    kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
    io_bytes = kv_bytes + 2 * batch * num_heads * head_dim * 2
    copies = rotations(kv_bytes)
    k_pages, v_pages, tables, lengths, key = make_paged(
        jax.random.key(batch * 7 + context), batch, context, kv_heads, head_dim, copies, page)
    q = jax.random.normal(key, (batch, num_heads, head_dim), DTYPE)
    results = {}
    loop = DecodeLoop.plan(io_bytes, copies, min_calls)
    paged_step, measure = loop.paged_step, functools.partial(loop.measure, results, budget)

    for label, config in (our_configs or {"ours": {}}).items():
        measure(label, paged_step(functools.partial(paged_attention, **config)), q,
                (k_pages, v_pages, tables, lengths))
    if mosaic:  # the experimental Mosaic GPU kernel, beside the Triton one
        from jaxserve_kernels.paged_attention_mgpu import default_mgpu_splits, paged_attention_mgpu
        for label, config in MOSAIC_CONFIGS.items():
            config = dict(config)
            if config.pop("splits_x", 1) != 1:
                config["num_splits"] = 2 * default_mgpu_splits(
                    batch, kv_heads, context // page, config["pages_per_block"])
            measure(f"mosaic {label}", paged_step(functools.partial(paged_attention_mgpu, **config)),
                    q, (k_pages, v_pages, tables, lengths))
    if with_baselines:
        bundled = bundled_kernel()
        pages_per_seq = context // page
        for splits, per_block in ((1, 8), (4, 8), (16, 8), (16, 4), (4, 16)):
            if pages_per_seq % splits or (pages_per_seq // splits) % per_block:
                continue
            measure(f"bundled k_splits={splits} ppcb={per_block}",
                    paged_step(functools.partial(bundled, k_splits=splits,
                                                 pages_per_compute_block=per_block)),
                    q, (k_pages, v_pages, tables, lengths))
        del k_pages, v_pages
        gc.collect()
        xla_step, caches = xla_contiguous_step(key, copies, loop.unroll, (batch, kv_heads, context, head_dim))
        measure("xla contiguous", xla_step, q, (caches, lengths))
        del caches
    gc.collect()
    row = {"heads": name, "batch": batch, "context": context, "kv_bytes": kv_bytes,
           "io_bytes": io_bytes, "copies": copies, "calls_per_iteration": loop.per_iteration,
           "results": results}
    return row


def fp8_row(name, batch, context, read_ceiling, budget, min_calls: int = MIN_CALLS,
            configs: tuple[str, ...] = ()) -> dict:
    """Our decode kernel over the same random K/V held in bf16 pages and in float8_e4m3fn pages (one process, the
    two timed back to back), and XLA's contiguous bf16 attention. An fp8 call reads half the KV bytes. `configs`:
    knob sets (`relative_config`'s specs) also timed over the fp8 pages, as "fp8 <spec>"."""
    from jaxserve_kernels.kv_dtype import to_pool

    num_heads, kv_heads, head_dim = HEADS[name]
    kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
    qo_bytes = 2 * batch * num_heads * head_dim * 2
    copies = rotations(kv_bytes / 2)  # the fp8 working set must not fit the L2 either
    k_pages, v_pages, tables, lengths, key = make_paged(
        jax.random.key(batch * 7 + context), batch, context, kv_heads, head_dim, copies)
    q = jax.random.normal(key, (batch, num_heads, head_dim), DTYPE)
    loop = DecodeLoop.plan(kv_bytes + qo_bytes, copies, min_calls)
    splits = default_split_count(name, batch, context)
    results = {}
    runs = [("bf16 pages", {}), ("fp8 pages", {})] + [(f"fp8 {c}", relative_config(c, splits)) for c in configs]
    for label, config in runs:
        if label == "fp8 pages":
            k_pages, v_pages = to_pool(k_pages, jnp.float8_e4m3fn), to_pool(v_pages, jnp.float8_e4m3fn)
            gc.collect()
        loop.measure(results, budget, label, loop.paged_step(functools.partial(paged_attention, **config)), q,
                     (k_pages, v_pages, tables, lengths))
    del k_pages, v_pages
    gc.collect()
    if budget.left():
        xla_step, caches = xla_contiguous_step(key, copies, loop.unroll, (batch, kv_heads, context, head_dim))
        loop.measure(results, budget, "xla contiguous", xla_step, q, (caches, lengths))
        del caches
        gc.collect()
    return {"heads": name, "batch": batch, "context": context, "kv_bytes": kv_bytes, "qo_bytes": qo_bytes,
            "copies": copies, "results": results}


def fp8_table(rows, read_ceiling) -> str:
    lines = ["| heads | batch | ctx | bf16 KV MB | bf16 pages µs | TB/s (% read / % " + SPEC_LABEL + ") | fp8 pages µs "
             "| fp8 TB/s of its bytes | bf16 / fp8 time | XLA contiguous bf16 µs | XLA / fp8 time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["results"]
        bf, f8, x = r.get("bf16 pages"), r.get("fp8 pages"), r.get("xla contiguous")
        ratio = lambda a, b: f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"  # noqa: E731
        lines.append(
            f"| {row['heads']} | {row['batch']} | {row['context']} | {row['kv_bytes'] / 1e6:.0f} | {fmt_time(bf)} "
            f"| {fmt_bw(row['kv_bytes'] + row['qo_bytes'], bf, read_ceiling)} | {fmt_time(f8)} "
            f"| {fmt_bw(row['kv_bytes'] / 2 + row['qo_bytes'], f8, read_ceiling)} | {ratio(bf, f8)} | {fmt_time(x)} "
            f"| {ratio(x, f8)} |")
        lines += failure_lines(r)
        for label, value in r.items():
            if isinstance(value, float) and label.startswith("fp8 ") and label != "fp8 pages":
                lines.append(f"|  | | | | {label} | | {fmt_time(value)} "
                             f"| {fmt_bw(row['kv_bytes'] / 2 + row['qo_bytes'], value, read_ceiling)} "
                             f"| {ratio(bf, value)} | | |")
    return "\n".join(lines)


def best_bundled(results):
    timed_ = {k: v for k, v in results.items() if k.startswith("bundled") and isinstance(v, float)}
    if not timed_:
        return None, None
    label = min(timed_, key=timed_.get)
    return timed_[label], label.removeprefix("bundled ")


def fmt_time(seconds) -> str:
    return f"{seconds * 1e6:.1f}" if isinstance(seconds, float) else "-"


def fmt_bw(io_bytes, seconds, read_ceiling) -> str:
    if not isinstance(seconds, float):
        return "-"
    bw = io_bytes / seconds
    return f"{bw / 1e12:.2f} ({100 * bw / read_ceiling:.0f}% / {100 * bw / SPEC_BYTES_PER_S:.0f}%)"


def decode_table(rows, read_ceiling) -> str:
    lines = [
        "| heads | batch | ctx | KV MB | ours µs | ours TB/s (% read ceiling / % " + SPEC_LABEL + ") "
        "| bundled best µs | bundled TB/s | bundled cfg | XLA contiguous µs | XLA TB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["results"]
        ours = r.get("ours")
        b_s, b_cfg = best_bundled(r)
        x = r.get("xla contiguous")
        lines.append(
            f"| {row['heads']} | {row['batch']} | {row['context']} | {row['kv_bytes'] / 1e6:.0f} "
            f"| {fmt_time(ours)} | {fmt_bw(row['io_bytes'], ours, read_ceiling)} "
            f"| {fmt_time(b_s)} | {fmt_bw(row['io_bytes'], b_s, read_ceiling)} | {b_cfg or '-'} "
            f"| {fmt_time(x)} | {fmt_bw(row['io_bytes'], x, read_ceiling)} |")
        lines += failure_lines(r)
    return "\n".join(lines)


def failure_lines(results: dict) -> list[str]:
    """A table row of each timing that did not happen (skipped by the budget, or a config that does not compile)."""
    return [f"|  | | | | {label}: {value} | | | | | | |" for label, value in results.items() if isinstance(value, str)]


def mosaic_table(rows, read_ceiling) -> str:
    """Our Triton kernel against the experimental Mosaic GPU one, row by row, every config."""
    labels = [f"mosaic {label}" for label in MOSAIC_CONFIGS]
    lines = ["| heads | batch | ctx | Triton (ours) µs | " + " | ".join(f"{l} µs" for l in labels)
             + " | Mosaic best TB/s (% read / % " + SPEC_LABEL + ") | ours / Mosaic best |",
             "|---|---|---|---|" + "---|" * len(labels) + "---|---|"]
    for row in rows:
        r = row["results"]
        timed_ = {k: r[k] for k in labels if isinstance(r.get(k), float)}
        best = min(timed_.values()) if timed_ else None
        ours = r.get("ours")
        ratio = f"{ours / best:.2f}" if best and isinstance(ours, float) else "-"
        cells = [fmt_time(r[k]) if isinstance(r.get(k), float) else str(r.get(k, "-"))[:60]
                 for k in labels]
        lines.append(f"| {row['heads']} | {row['batch']} | {row['context']} | {fmt_time(ours)} | "
                     + " | ".join(cells) + f" | {fmt_bw(row['io_bytes'], best, read_ceiling)} | {ratio} |")
    return "\n".join(lines)


_KNOB_NAMES = {"ppb": "pages_per_block", "stages": "num_stages", "warps": "num_warps", "splits": "num_splits"}


def relative_config(spec: str, default_splits: int) -> dict:
    """"x2 ppb=4 stages=3" -> twice the shape's default split count with those knobs; "inkernel": the merge in
    the kernel."""
    first, *rest = spec.split()
    config = {"num_splits": default_splits * int(first[1:])}
    for token in rest:
        if token == "inkernel":
            config["combine"] = "inkernel"
        elif token.startswith("vmask="):
            config["v_mask"] = token.split("=")[1]
        else:
            name, value = token.split("=")
            config[_KNOB_NAMES[name]] = int(value)
    return config


def sweep(budget, read_ceiling, only: tuple[str, ...] = (),
          min_calls: int = MIN_CALLS, baselines: bool = False) -> tuple[str, list]:
    """Our kernel's knobs on a few key shapes, one at a time from the defaults (`only`: the
    knob sets whose label is one of these)."""
    lines = ["| heads | batch | ctx | config | µs | TB/s (% read / % " + SPEC_LABEL + ") |",
             "|---|---|---|---|---|---|"]
    raw = []
    for (name, batch, context), configs in SWEEP:
        default_splits = default_split_count(name, batch, context)
        # "xN": N times the default split count at this shape; "xN inkernel": and merged in the kernel.
        configs = {label: (c if isinstance(c, dict) else relative_config(c, default_splits))
                   for label, c in configs.items() if not only or any(
                       label == o or (o.endswith("*") and label.startswith(o[:-1])) for o in only)}
        if only and not configs:  # none of the asked knob sets is tried at this shape
            continue
        row = decode_row(name, batch, context, read_ceiling, budget, with_baselines=baselines,
                         min_calls=min_calls,
                         our_configs={"default": {}, **configs})
        raw.append(row)
        for label, seconds in row["results"].items():
            shown = (fmt_bw(row["io_bytes"], seconds, read_ceiling)
                     if isinstance(seconds, float) else seconds)
            lines.append(f"| {name} | {batch} | {context} | {label} | {fmt_time(seconds)} "
                         f"| {shown} |")
            print(lines[-1], flush=True)
    return "\n".join(lines), raw


# Session 22: the shapes short of issue 6's targets, at page 16 (the table's) and 32 (half the
# gathers a key; the issue lets the page size be ours).
PAGE_SWEEP_SHAPES = [DECODE_SHAPES[i] for i in (2, 4, 5, 6, 7, 11, 12, 13, 14, 15)]


def page_sweep(budget, read_ceiling, page_sizes=(16, 32), min_calls: int = MIN_CALLS) -> tuple[str, list]:
    """Our kernel (its default tuning for the page size) at each of `page_sizes`, shape by shape."""
    lines = ["| heads | batch | ctx | page | µs | TB/s (% read / % " + SPEC_LABEL + ") |",
             "|---|---|---|---|---|---|"]
    raw = []
    for name, batch, context in PAGE_SWEEP_SHAPES:
        for page in page_sizes:
            row = decode_row(name, batch, context, read_ceiling, budget, with_baselines=baselines,
                             min_calls=min_calls, page=page)
            row["page"] = page
            raw.append(row)
            seconds = row["results"]["ours"]
            shown = fmt_bw(row["io_bytes"], seconds, read_ceiling) if isinstance(seconds, float) else seconds
            lines.append(f"| {name} | {batch} | {context} | {page} | {fmt_time(seconds)} | {shown} |")
            print(lines[-1], flush=True)
    return "\n".join(lines), raw


def scatter_table(budget, layers=24, token_counts=(256, 32768),
                  pool_pages=(4096, 65536)) -> str:
    """24 layers of the 0.5B shape: one decode step (256 tokens) and a 32k prefill."""
    kv_heads, head_dim = 2, 64
    lines = ["| tokens/layer | pool pages/layer | pool GB (24 layers, K+V) "
             "| kernel µs (24 layers) | kernel GB/s (read+write) | XLA scatter µs | XLA GB/s |",
             "|---|---|---|---|---|---|---|"]
    for tokens in token_counts:
        for pages in pool_pages:
            if not budget.left():
                lines.append(f"| {tokens} | {pages} | skipped (time budget) | | | | |")
                continue
            key = jax.random.key(tokens + pages)
            shape = (kv_heads, pages, PAGE, head_dim)
            # The pool's contents are never read by a scatter, so zeros cost nothing.
            pools = tuple(jnp.zeros(shape, DTYPE) for _ in range(2 * layers))
            k = jax.random.normal(key, (tokens, kv_heads, head_dim), DTYPE)
            page_ids = jax.random.permutation(key, pages).astype(jnp.int32)
            decode = tokens <= 256
            if decode:  # one token per sequence, each in its own page, walking the page
                base = page_ids[:tokens] * PAGE
            else:       # whole pages of one long prompt
                base = (page_ids[: tokens // PAGE, None] * PAGE + jnp.arange(PAGE)).reshape(-1)
            moved = 2 * layers * 2 * tokens * kv_heads * head_dim * 2  # K+V, read + write
            row = [str(tokens), str(pages), f"{2 * layers * math.prod(shape) * 2 / 1e9:.1f}"]
            for scatter in (cache_scatter, cache_scatter_reference):
                def step(carry, k, base, scatter=scatter, decode=decode):
                    pools, i = carry
                    slots = base + (i % PAGE if decode else 0)
                    new = []
                    for layer in range(layers):
                        new.extend(scatter(pools[2 * layer], pools[2 * layer + 1], k, k, slots))
                    return tuple(new), i + 1
                try:
                    seconds, (pools, _) = timed(step, (pools, jnp.int32(0)), (k, base),
                                                donate=True, target_s=0.02, repeats=3)
                    row += [f"{seconds * 1e6:.1f}", f"{moved / seconds / 1e9:.0f}"]
                except Exception as error:
                    row += [f"error: {type(error).__name__}: {str(error)[:120]}", "-"]
                    pools = tuple(jnp.zeros(shape, DTYPE) for _ in range(2 * layers))
            lines.append("| " + " | ".join(row) + " |")
            del pools
            gc.collect()
    return "\n".join(lines)


PREFILL_CASES = (("0.5B 14q/2kv/64", 4096, 0), ("7B 28q/4kv/128", 2048, 14336))
PREFILL_CONFIGS = {
    "default": {}, "block_rows=64": dict(block_rows=64), "block_rows=128": dict(block_rows=128),
    "block_rows=128 warps=8": dict(block_rows=128, num_warps=8),
    "jnp reference (XLA)": None,
}


def prefill_table(budget, cases=PREFILL_CASES) -> str:
    """Prefill attention over pages: a fresh 4k prompt and a 2k chunk after a 14k prefix."""
    lines = ["| heads | q_len | prefix | config | µs | TFLOP/s (causal) |",
             "|---|---|---|---|---|---|"]
    for name, q_len, prefix in cases:
        num_heads, kv_heads, head_dim = HEADS[name]
        context = prefix + q_len
        k_pages, v_pages, tables, lengths, key = make_paged(
            jax.random.key(context), 1, context, kv_heads, head_dim, 1)
        q = jax.random.normal(key, (1, q_len, num_heads, head_dim), DTYPE)
        q_start = jnp.array([prefix], jnp.int32)
        keys_seen = q_len * prefix + q_len * (q_len + 1) / 2
        flops = 4 * num_heads * head_dim * keys_seen
        for label, config in PREFILL_CONFIGS.items():
            if not budget.left():
                lines.append(f"| {name} | {q_len} | {prefix} | {label} | skipped | |")
                continue
            step = (_prefill_reference_step if config is None else
                    functools.partial(_prefill_step, **config))
            try:
                seconds, _ = timed(step, q, (k_pages, v_pages, tables[0], q_start, lengths),
                                   repeats=3)
                lines.append(f"| {name} | {q_len} | {prefix} | {label} "
                             f"| {seconds * 1e6:.0f} | {flops / seconds / 1e12:.1f} |")
            except Exception as error:
                lines.append(f"| {name} | {q_len} | {prefix} | {label} "
                             f"| error: {type(error).__name__}: {str(error)[:120]} | |")
        del k_pages, v_pages
        gc.collect()
    return "\n".join(lines)


def _prefill_reference_step(q, k_pages, v_pages, table, q_start, lengths):
    return paged_prefill_attention_reference(q, k_pages, v_pages, table, q_start, lengths)


def _prefill_step(q, k_pages, v_pages, table, q_start, lengths, **config):
    return paged_prefill_attention(q, k_pages, v_pages, table, q_start, lengths, **config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also tune our kernel's knobs")
    parser.add_argument("--sweep-only", action="store_true", help="the knob sweep alone (no tables)")
    parser.add_argument("--sweep-baselines", action="store_true",
                        help="the sweep's shapes also time the bundled kernel and XLA contiguous")
    parser.add_argument("--sweep-configs", nargs="+", default=(),
                        help="sweep only these knob sets (labels of _T; 'h100*': every label starting so), "
                             "beside the default")
    parser.add_argument("--mosaic", action="store_true",
                        help="also time the experimental Mosaic GPU decode kernel (jaxserve_kernels.paged_attention_mgpu)")
    parser.add_argument("--mosaic-only", action="store_true",
                        help="ours against the Mosaic GPU kernel on MOSAIC_SHAPES, nothing else")
    parser.add_argument("--calls-per-iteration", type=int, default=MIN_CALLS,
                        help="decode calls per timed loop iteration (1: as measured in session 7)")
    parser.add_argument("--quick", action="store_true", help="five decode shapes only")
    parser.add_argument("--page-sweep", action="store_true",
                        help="our kernel alone at pages of 16 and 32 on PAGE_SWEEP_SHAPES, nothing else")
    parser.add_argument("--fp8-only", action="store_true",
                        help="our kernel over fp8 (e4m3) against bf16 pages on FP8_SHAPES, and XLA, nothing else")
    parser.add_argument("--fp8-configs", nargs="+", default=(),
                        help="--fp8-only: knob sets also timed over the fp8 pages ('x1 ppb=16 stages=3': the default "
                             "split count times 1, 16 pages an iteration, 3 stages)")
    parser.add_argument("--fp8-shapes", type=int, nargs="+", default=None,
                        help="--fp8-only: indices into FP8_SHAPES (default: all)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    budget = Budget(args.budget_s)
    device = jax.devices()[0]
    header = [
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit: {os.environ.get('COMMIT', 'unknown')}",
        f"command: PYTHONPATH=. python3 bench/bandwidth.py {' '.join(sys.argv[1:])}",
    ]
    ceil = ceilings()
    header.append(f"HBM read ceiling (XLA sum, 4 GiB): {ceil['read'] / 1e12:.2f} TB/s; "
                  f"copy (read+write, 2 GiB): {ceil['copy'] / 1e12:.2f} TB/s; spec {SPEC_LABEL} TB/s")
    over = loop_overhead()
    header.append(f"jitted-loop cost of one iteration of a trivial body: {over['dynamic'] * 1e6:.1f} µs with a "
                  f"dynamic trip count (host round trip), {over['static'] * 1e6:.1f} µs with a static one (used)")
    print("\n".join(header), flush=True)
    sections = []
    raw = {"ceilings": ceil}
    rows = []
    args.mosaic |= args.mosaic_only
    if args.fp8_only:
        fp8_rows = []
        for name, batch, context in [FP8_SHAPES[i] for i in (args.fp8_shapes or range(len(FP8_SHAPES)))]:
            fp8_rows.append(fp8_row(name, batch, context, ceil["read"], budget, args.calls_per_iteration,
                                    tuple(args.fp8_configs)))
            print(fp8_table(fp8_rows[-1:], ceil["read"]).splitlines()[-1], flush=True)
        raw["fp8"] = fp8_rows
        sections.append("## Paged decode attention over fp8 (e4m3) pages against bf16 pages (page 16, full context)\n\n"
                        "Effective bandwidth = (K + V bytes read + q + out) / time; an fp8 call reads half the KV "
                        "bytes.\n\n" + fp8_table(fp8_rows, ceil["read"]))
    shapes = ([] if args.sweep_only or args.page_sweep or args.fp8_only else MOSAIC_SHAPES if args.mosaic_only
              else QUICK_SHAPES if args.quick else DECODE_SHAPES)
    for name, batch, context in shapes:
        rows.append(decode_row(name, batch, context, ceil["read"], budget,
                               with_baselines=not args.mosaic_only,
                               min_calls=args.calls_per_iteration, mosaic=args.mosaic))
        print(decode_table(rows[-1:], ceil["read"]).splitlines()[-1], flush=True)
    raw["decode"] = rows
    if rows:
        sections.append("## Paged decode attention (bf16, page 16, all rows at full context)\n\n"
                        "Effective bandwidth = (K + V bytes read + q + out) / time.\n\n"
                        + decode_table(rows, ceil["read"]))
    print(sections[-1] if sections else "", flush=True)
    if args.mosaic:
        sections.append("## Mosaic GPU decode kernel (experimental) vs ours\n\n" + mosaic_table(rows, ceil["read"]))
        print(sections[-1], flush=True)
    if args.page_sweep:
        text, raw["page_sweep"] = page_sweep(budget, ceil["read"], min_calls=args.calls_per_iteration)
        sections.append("## Our kernel at pages of 16 and 32\n\n" + text)
    if not (args.sweep_only or args.mosaic_only or args.page_sweep or args.fp8_only):
        sections.append("## Cache scatter (0.5B shape: 24 layers, 2 kv heads, head_dim 64, bf16)\n\n"
                        + scatter_table(budget))
        print(sections[-1], flush=True)
        sections.append("## Prefill attention over pages (bf16, batch 1)\n\n" + prefill_table(budget))
        print(sections[-1], flush=True)
    if args.sweep or args.sweep_only:
        text, raw["sweep"] = sweep(budget, ceil["read"], tuple(args.sweep_configs),
                                   args.calls_per_iteration, baselines=args.sweep_baselines)
        sections.append("## Our kernel's knobs\n\n" + text)
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bandwidth.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "bandwidth.json"), "w") as f:
        json.dump(raw, f, default=str, indent=1)


if __name__ == "__main__":
    main()
