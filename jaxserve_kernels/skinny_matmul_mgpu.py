"""The skinny matmul of 8-256-row decode steps on Pallas Mosaic GPU (TMA + WGMMA).

Owns: `skinny_matmul_mgpu`, `x [M, K] @ w[N, K].T` for M a multiple of 8 up to 256, with the
Triton skinny matmul's "partials", "swiglu" and "none" epilogues, and "accumulate" (`acc + x @ w.T`
in acc's buffer); optionally plus `t @ bt.T` as K steps after x's (`term`: LoRA's folded decode
terms, H100 session 59: adapter rows 0.63x -> 0.75x of the base tokens/s at 64 rows,
bench/results/lora.md), or ("accumulate", `shrink`) a second product, of the LoRA shrink stack, in column
blocks past w's that add into an accumulator of their own. Its reference is
`jaxserve_kernels.skinny_matmul.skinny_matmul_reference` (for "accumulate": acc plus its "partials" summed).
Never decides when it is used
(`jaxserve.model.SKINNY_BACKEND`, `MGPU_MIN_ROWS`, `MGPU_MAX_ROWS` and `XLA_GATE_UP_ROWS` do:
8-256 rows by default).

Why: at 64 rows the Triton tensor-core path streams the decode step's projections at ~1.3 TB/s
(session 16's profile on the H200: 547 of the step's 948 µs). Nsight Compute reads its programs
as latency-bound: one or two programs an SM, a three-stage `cp.async` pipeline whose every step
waits at a CTA barrier (42% of the stalls for gate_up), the SMs idle 30-57% of each launch. Here
one thread issues each tile's TMA copy straight into swizzled shared memory, `num_slots - 1`
steps ahead behind mbarriers, so a program keeps several weight tiles in flight with almost no
instructions, and the products run on WGMMA.

How: one program (one warpgroup) per block of `block_m` rows, `block_n` weight rows (of each
half, for SwiGLU) and K split; every step copies the activation tile `[rows, 64]` and the weight
tile `[block_n, 64]` (one 128-byte swizzled row each; `boxes` of each a step), then
`acc [R, block_n] += x @ w.T` on WGMMA, R the rows rounded up to WGMMA's M granule of 64: rows
past M in shared memory are never written and their sums never stored (the rows of a product do
not mix). SwiGLU's two halves run as one product where the tile is `joint` (the default): both
halves' weight rows side by side in one tile, one WGMMA of N = 2 x block_n, so each activation
tile is read from shared memory once a box (session 31: what made a 256-row gate_up beat cuBLAS). The accumulator leaves through shared memory by a TMA copy of its rows: float32
partial sums `[splits, M, N]` that the next kernel adds (`jaxserve_kernels.residual_norm.add_rms_norm`),
SwiGLU's `silu(gate) * up` in the activation dtype, or ("accumulate") a TMA reduction that adds
every split's sums into a float32 `[M, N]` buffer in place (the residual stream, or QKV's
accumulator started at its bias: `jaxserve.model.ACCUMULATE`), so no kernel reads partials. A
program re-reads its activation tile from L2 for every `block_n` weight rows it streams, so wide
steps want wide weight blocks.

Experimental, opt-in: `warpgroups=2`, a warp-specialized CTA (`_ws_kernel`,
`plgpu.emit_pipeline_warp_specialized`) whose two compute warpgroups share each step's activation
and weight tiles, so a CTA of 128 rows x 64 weight rows reads ~104 MB from L2 a 256-row gate_up
layer against ~139 MB for the one-warpgroup 64 x 64 tiles. Correct compiled, but no faster (H200,
session 18: gate_up 17.66 against 17.40 µs a layer at 256 rows, every other projection slower;
bench/results/decode_step.md): L2 reads do not bound that product.

Experimental, opt-in: `cluster=2` (or 4), CTAs on adjacent column blocks of the same rows in one cluster,
each activation tile copied from L2 once into all of them (TMA multicast), a cluster barrier a slot before it is
refilled. Correct compiled, but slower (H200, session 35: at 256 rows gate_up 12.07 against 10.76 µs a layer,
down_proj 8.64 against 8.44, the step 1.214-1.247 against 1.198 ms): the same finding, now with half the
activation reads, and a wait a step on the slower CTA of the pair.

Limits: bf16, weights `[N, K]` (the engine's layout), K a multiple of 64, M a multiple of 8 up
to 256 (and of `block_m` above it), N a multiple of `block_n` (SwiGLU's halves and the argmax
head take a ragged last block: `RAGGED_EPILOGUES`), the ring and the output tile within shared
memory. On the CPU it runs in Mosaic GPU's interpreter (the products as plain dots: the
interpreter's WGMMA takes no transposed operand).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxserve_kernels import mgpu_pipeline as ring
from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.greedy_pick import pick_blocks, pick_blocks_reference
from jaxserve_kernels.skinny_matmul import swiglu_sums

_ROWS = 64  # WGMMA's M granule
MAX_ROWS = 256  # a TMA box's rows, and a warpgroup's accumulator registers at block_n 32-64
_SMEM_BYTES = 227 * 1024  # a Hopper block's shared memory
_BLOCK_K = 64  # a 128-byte swizzled row of bf16: one TMA box a step
EPILOGUES = ("none", "partials", "swiglu", "accumulate")
# Tiling by epilogue: weight rows a program (`block_n`, of each half for SwiGLU), steps in flight
# + 1 (`num_slots`), programs wanted (sets the K split; SwiGLU never splits; "none" unsplit adds its
# bias in the kernel, split its partials are summed by XLA). Read at call time. Session 16 on the
# H200 (bench/results/decode_step.md), batch-64 step: 32 rows and 4 slots 0.868 ms, 64 rows and 6
# slots 0.929, 8 slots 1.103 (SMEM for one program an SM: a second wave), Triton 0.919-0.925.
# SwiGLU (gate_up: 14 serial K steps a program, never split) takes steps of two 64-wide boxes with
# 3 slots: session 19, two calls, gate_up 7.59 against 7.95 µs a layer and the 64-row step -1.0% /
# -1.1% (32 rows -0.6%); 5 or 6 slots of one box bought nothing (each step waits on its products as
# long as on its tiles). Past 64 rows (WIDE_TILES) the same ring lost (13.9 against 9.8 µs at 128).
# Since session 30 gate_up's blocks are 40 columns of each half (122 programs, the last ragged: one an
# SM, where 152 blocks of 32 ran two on 20 SMs): 7.49 -> 6.90 µs a layer at 64 rows, GPU busy 731.5 ->
# 715.8 µs a step (24 columns 7.11, 48 7.07; 3 slots 6.93).
# Since session 31 as one joint product (`joint`, N = 80): gate_up 6.86 -> 6.75 µs a layer, GPU busy 713.7 -> 712.1
# µs a step, the step 0.800 -> 0.799 ms (a tie; 32 columns joint 9.55 µs, 48 6.84).
# down_proj ("deep", K >= DEEP_K) the same: 5 steps a program instead of 9, 4.74 against 4.88 µs
# a layer at 64 rows (step -0.7%), 4.56 against 4.62 at 32 (session 19, call 4).
TILES: dict[str, dict[str, int]] = {
    "none": {"block_n": 32, "num_slots": 4, "target_programs": 264},
    "partials": {"block_n": 32, "num_slots": 4, "target_programs": 264},
    "swiglu": {"block_n": 40, "num_slots": 4, "boxes": 2, "joint": 1},
    "deep": {"block_n": 32, "num_slots": 3, "target_programs": 264, "boxes": 2},
}
# The same for steps of more than 64 rows (`block_m`: rows a program, in row blocks that vary
# fastest in the grid; M that is not whole blocks runs in one). Session 17 on the H200, batch 128
# step: row blocks of 64 with the 64-row tiles 1.038-1.043 ms, 64 weight rows 1.054, all rows in one
# program 1.097, cuBLAS 1.097-1.109; at 256 rows cuBLAS's 1.345 against 1.424-1.936 over 13 tilings
# (past 128 rows see WIDEST_TILES). "deep": the K-split products of K >= DEEP_K (down_proj),
# where a table has it: 64 weight rows and 6 slots, down_proj 5.81 vs 7.09 µs at 128 rows.
WIDE_TILES: dict[str, dict[str, int]] = {
    "none": {"block_n": 32, "num_slots": 4, "target_programs": 264, "block_m": 64},
    "partials": {"block_n": 32, "num_slots": 4, "target_programs": 264, "block_m": 64},
    # 40 columns since session 30: 2 x 122 programs, two an SM (32 made 304: a third on 40 SMs); gate_up
    # 9.40 -> 8.34 µs a layer, the 128-row step 0.930 -> 0.901 ms (decode_step.md). One joint product since
    # session 31: 8.32 -> 8.04 µs, step 0.903 -> 0.897 (128 rows a program, joint: 9.23 µs, 0.926).
    "swiglu": {"block_n": 40, "num_slots": 4, "block_m": 64, "joint": 1},
    "deep": {"block_n": 64, "num_slots": 6, "target_programs": 264, "block_m": 64},
}
# The same for steps of more than 128 rows (256 in the engine): 64 weight rows a program. Session 18 on
# the H200, batch-256 step: 1.310 ms against 1.325 with WIDE_TILES (bench/decode_step.py --glue
# mgpu256_xgu / _wt); with ACCUMULATE's glue 1.278 against cuBLAS's 1.327 (session 21). gate_up ran on
# cuBLAS there until session 31 (`jaxserve.model.XLA_GATE_UP_ROWS`): every Mosaic GPU tiling took 14-21 µs a
# layer against cuBLAS's 9.7 + 2.6 for XLA's SwiGLU fusion, until 128 rows a program as one joint product
# (`joint`: N = 80 at 40 columns; 2 x 122 programs, 3 slots, two an SM) took 11.02 µs (decode_step.md).
# "deep" (down_proj, 19 K steps a program) in 128-row programs since session 32: each weight tile read once per
# 128 rows, 3 slots, 2 x 14 x 9 = 252 programs; 8.68 -> 8.52 µs a layer, step 1.213 -> 1.208 ms (session 31), 8.81
# -> 8.51, 1.208 -> 1.203 (session 32, GPU busy -9 µs a step; `--glue widest_deep_bm128` both times). QKV and o
# (2-4 K steps a program) lose in 128-row programs (5.61 / 5.18 against 4.26 / 3.96 µs).
WIDEST_TILES: dict[str, dict[str, int]] = {
    "none": {"block_n": 64, "num_slots": 4, "target_programs": 264, "block_m": 64},
    "partials": {"block_n": 64, "num_slots": 4, "target_programs": 264, "block_m": 64},
    "swiglu": {"block_n": 40, "num_slots": 3, "block_m": 128, "joint": 1},
    "deep": {"block_n": 64, "num_slots": 3, "target_programs": 264, "block_m": 128},
}
_WIDE_ROWS = 128
DEEP_K = 2048
# Epilogues whose N need not be whole blocks of `block_n`: compiled, the last block's TMA copies read
# zeros past the weights' end (SwiGLU's gate half reads the up half's first rows, products whose
# columns the output copy, clipped at the array's end, never stores); interpreted, the weights (each
# half) and the output are padded to whole blocks. A block width that does not divide N lets the grid
# fit the SMs: at 64 rows gate_up's 4,864 columns in blocks of 32 are 152 programs on 132 SMs (20 of
# them run two), in blocks of 40 122 programs (one an SM).
RAGGED_EPILOGUES = ("argmax", "swiglu")
# Programmatic dependent launch (Hopper): the kernel is launched so that it may start before the
# kernel ahead of it in the stream has finished; each program issues its first weight tiles (and
# bias), which no earlier kernel writes, then waits on the grid dependency (`griddepcontrol.wait`:
# the kernel ahead complete, its writes visible) before its first activation copy, and lets the
# kernel after it launch early in turn (the "accumulate" epilogue too: its reduction comes after the
# wait). Off: correct compiled, but XLA's command buffers capture a Mosaic GPU call into a graph
# node of its own, where the early start is lost (session 19 on the H200: the 64-row step 0.858
# against 0.850 ms, about one more early start a step; session 22 with every projection 0.808 against
# 0.791, 0.991 against 0.967 at 128 rows; without command buffers kernels do start early, but the host's
# launches set a 1.24-1.37 ms step; decode_step.md). Read at call time.
PDL = False
# A program's last wait on its output copy (TMA, shared -> global memory): only until the copy has
# read the shared memory (the writes land before the kernel counts as done; JAX's own Hopper matmul
# exits so), or until the writes too (the default). Session 21 on the H200 (bench/decode_step.py
# --glue exit_read_only, decode_step.md): step 0.805 against 0.804 ms at 64 rows, 0.974 against 0.976
# at 128: no gain, off. Read at call time.
EXIT_READ_ONLY = False
# SwiGLU's epilogue with approximate math: `exp` as one `ex2.approx.ftz` after a multiply (Mosaic GPU's
# `approx_math`) and the sigmoid's division as a squared approximate reciprocal square root, in place of
# the accurate `expf` and an IEEE division (each ~10 instructions an element; 16 elements a thread at 64
# rows, one warp a scheduler). Both approximations err by ~2^-22 relative, far under the bf16 rounding
# that follows. H200, session 28 (decode_step.md, one process, alternating rounds): gate_up + SwiGLU 7.62 ->
# 7.49 µs a layer at 64 rows (step 0.749 -> 0.747 ms), 9.74 -> 9.49 at 128 (0.940 -> 0.936). Read at call time.
SWIGLU_APPROX = True
# Diagnosis only (bench/cluster_probe.py): a cluster's CTAs skip waiting for each other before a refill. Racy
# (a multicast may overwrite a slot a peer still reads); it tells a hang in the cluster barrier from one elsewhere.
_CLUSTER_RELEASE = True
_CLUSTER_MULTICAST = True  # diagnosis only: False copies each CTA's activation tile itself (the cluster barrier kept)


def tile_for(m: int, k: int, epilogue: str) -> dict[str, int]:
    """The tiling `skinny_matmul_mgpu` uses by default for an `[m, k]` input: `TILES` or
    `WIDE_TILES` or `WIDEST_TILES` by rows, their "deep" entry (if any) for K-split products of K >= DEEP_K,
    `block_m` one block when M is not whole blocks of it, `boxes` 1 where its steps do not divide K.

    Example:
        >>> tile_for(64, 896, "swiglu")["block_n"], tile_for(96, 896, "partials")["block_m"]
        (40, 128)
    """
    table = TILES if m <= _ROWS else WIDE_TILES if m <= _WIDE_ROWS else WIDEST_TILES
    entry = "partials" if epilogue == "accumulate" else epilogue  # the same K-split products
    tile = dict(table["deep"] if epilogue != "swiglu" and k >= DEEP_K and "deep" in table else table[entry])
    block_m = tile.get("block_m", _ROWS)
    if tile.get("warpgroups", 1) == 1 and not (m <= block_m or m % block_m == 0):
        block_m = pl.cdiv(m, _ROWS) * _ROWS
    tile["block_m"] = block_m
    tile["warpgroups"] = tile.get("warpgroups", 1)
    tile["cluster"] = tile.get("cluster", 1)
    tile["boxes"] = tile.get("boxes", 1) if k % (_BLOCK_K * tile.get("boxes", 1)) == 0 else 1
    return tile


def supports(m: int, k: int, n: int, epilogue: str) -> bool:
    """Whether `skinny_matmul_mgpu` takes an `[m, k] @ [n, k].T` product with this epilogue and
    its default tiling.

    Example:
        >>> supports(64, 896, 9728, "swiglu"), supports(12, 896, 896, "partials")
        (True, False)
    """
    if epilogue not in EPILOGUES or not 8 <= m <= MAX_ROWS:
        return False
    tile = tile_for(m, k, epilogue)
    n_out = n // 2 if epilogue == "swiglu" else n
    return _fits(m, k, n_out, tile["block_n"], tile["boxes"], tile["block_m"], tile["num_slots"], epilogue,
                 tile["warpgroups"], tile["cluster"])


def _row_tile(m: int, block_m: int) -> int:
    """Rows of a program's accumulator: its rows rounded up to WGMMA's granule."""
    return min(block_m, pl.cdiv(m, _ROWS) * _ROWS)


def _smem_bytes(m: int, block_n: int, boxes: int, block_m: int, num_slots: int, epilogue: str,
                warpgroups: int = 1) -> int:
    rows = _row_tile(m, block_m) if warpgroups == 1 else block_m
    halves = 2 if epilogue == "swiglu" else 1
    ring = num_slots * boxes * (rows + halves * block_n) * _BLOCK_K * 2
    # float32 partials or sums; bf16 SwiGLU; argmax's two float32 row vectors
    out = 2 * rows * 4 if epilogue == "argmax" else rows * block_n * (2 if epilogue == "swiglu" else 4)
    return ring + out + 4 * block_n + 1024  # + the bias, barriers and alignment


def _fits(m: int, k: int, n_out: int, block_n: int, boxes: int, block_m: int, num_slots: int,
          epilogue: str, warpgroups: int = 1, cluster: int = 1) -> bool:
    """The shapes and tilings the kernel takes: M a multiple of 8 up to MAX_ROWS, in one block of
    `block_m` rows (a multiple of 64) or whole ones; K whole steps of `boxes` 64-wide TMA boxes; N
    whole blocks of `block_n` (a multiple of 8, WGMMA's N; any N for "argmax", whose padding never
    wins, and "swiglu", whose last block's padding is never stored); the ring in shared memory; at most 128
    accumulator registers a thread (beyond, the epilogue's registers spill). Two warpgroups
    (`_ws_kernel`) take whole blocks of `block_m` rows only, half of them each, one box a step. A cluster
    (one warpgroup, 2 or 4 CTAs) takes column blocks in whole clusters and activation tiles whose rows split
    into whole 8-row swizzle tiles among its CTAs (each copies its share of the multicast)."""
    halves = 2 if epilogue == "swiglu" else 1
    if warpgroups == 2:
        wg_rows = block_m // 2
        shape_ok = (block_m % (2 * _ROWS) == 0 and m % block_m == 0 and boxes == 1 and n_out % block_n == 0
                    and halves * wg_rows * block_n <= 128 * 128)
    else:
        shape_ok = warpgroups == 1 and (m <= block_m or m % block_m == 0) and (
            halves * _row_tile(m, block_m) * block_n <= 128 * 128)
    cluster_ok = cluster == 1 or (cluster in (2, 4) and warpgroups == 1 and epilogue != "argmax"
                                  and pl.cdiv(n_out, block_n) % cluster == 0
                                  and min(m, block_m) % (8 * cluster) == 0)
    return (shape_ok and cluster_ok and 8 <= m <= MAX_ROWS and m % 8 == 0 and block_m % _ROWS == 0 and 0 < block_m <= MAX_ROWS
            and boxes >= 1 and k % (_BLOCK_K * boxes) == 0
            and block_n % 8 == 0 and (epilogue in RAGGED_EPILOGUES or n_out % block_n == 0) and num_slots >= 2
            and _smem_bytes(m, block_n, boxes, block_m, num_slots, epilogue, warpgroups) <= _SMEM_BYTES)


def _pad_halves(w: jax.Array, halves: int, block_n: int) -> jax.Array:
    """`w [halves * n, K]` with each half's rows padded with zeros to whole blocks of `block_n`: a ragged
    last block for the interpreter, which refuses the reads past an array's end that TMA fills with zeros
    (`RAGGED_EPILOGUES`)."""
    n, k = w.shape[0] // halves, w.shape[1]
    return jnp.pad(w.reshape(halves, n, k), ((0, 0), (0, -n % block_n), (0, 0))).reshape(-1, k)


def _transforms(cols: int, dtype) -> tuple:
    """Swizzled tiling of a `[rows, cols]` shared-memory tile, as WGMMA and TMA read it."""
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    if swizzle < 32:  # rows of 16-byte multiples (40 bf16 columns): Mosaic GPU swizzles 32 bytes and up
        return ()
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _out_type(x: jax.Array, n_out: int, epilogue: str, num_splits: int) -> jax.ShapeDtypeStruct:
    """A kernel's output: `[M, n_out]` in x's dtype ("swiglu", "none"), float32 partial sums
    `[num_splits, M, n_out]` ("partials"), or the float32 accumulator `[M, n_out]` ("accumulate")."""
    if epilogue == "partials":
        return jax.ShapeDtypeStruct((num_splits, x.shape[0], n_out), jnp.float32)
    if epilogue == "accumulate":
        return jax.ShapeDtypeStruct((x.shape[0], n_out), jnp.float32)
    return jax.ShapeDtypeStruct((x.shape[0], n_out), x.dtype)


def _kernel(x_ref, w_ref, *refs, epilogue: str, has_bias: bool, block_n: int, num_slots: int, boxes: int,
            rows: int, row_tile: int, steps_per_split: int, k_steps: int, n_out: int, pdl: bool, interpret: bool,
            exit_read_only: bool, swiglu_approx: bool = False, joint: bool = False, cluster: int = 1,
            t_steps: int = 0, s_blocks: int = 0):
    # `t_steps`: the term's steps (`term=(t, bt)`), K steps past x's own that read t and bt in x's and w's place.
    t_ref, bt_ref, refs = (refs[0], refs[1], refs[2:]) if t_steps else (None, None, refs)
    # `s_blocks`: column blocks past w's that stream the shrink stack's rows (`shrink`) and add into its accumulator.
    a_ref, refs = (refs[0], refs[1:]) if s_blocks else (None, refs)
    if cluster > 1:  # the cluster's barrier on each slot's reads, last of the scratch
        *refs, consumed = refs
    if epilogue == "argmax":  # two outputs, two row vectors for them
        max_ref, idx_ref, x_smem, w_smem, max_smem, idx_smem, bars = refs
        o_ref = o_smem = None
    elif has_bias:
        b_ref, o_ref, x_smem, w_smem, o_smem, bars, b_smem, b_bar = refs
    elif s_blocks:
        o_ref, s_out_ref, x_smem, w_smem, o_smem, bars = refs
    else:
        o_ref, x_smem, w_smem, o_smem, bars = refs
    row_block, col_block, split = lax.axis_index("rows"), lax.axis_index("cols"), lax.axis_index("splits")
    w_blocks = n_out // block_n  # column blocks of w; those past them (`s_blocks`) are the shrink's
    if cluster > 1:  # the grid counts clusters; a cluster's CTAs take adjacent column blocks
        col_block = col_block * cluster + lax.axis_index("cluster")
    cols = pl.ds(col_block * block_n, block_n)
    my_rows = pl.ds(row_block * rows, rows)  # `rows` of x a program: all of them, or a block of block_m
    if has_bias:
        plgpu.copy_gmem_to_smem(b_ref.at[cols], b_smem, b_bar)
    halves = (0, n_out) if epilogue == "swiglu" else (0,)
    first = split * steps_per_split
    num_steps = jnp.clip(k_steps + t_steps - first, 0, steps_per_split)

    def k_at(step, b, base=0, wrap=0):  # a step is `boxes` TMA boxes of 64 K-elements an operand
        at = ((first + step - base) * boxes + b) * _BLOCK_K
        return pl.ds(at % wrap if wrap else at, _BLOCK_K)

    def by_source(copy):
        # `copy(x or t, w or bt, base step)`: steps below k_steps read x and w, the term's steps after them t and bt
        # into the same slots, so the products and the ring are the same for both.
        if not t_steps:
            return lambda step, slot: copy(x_ref, w_ref, 0, step, slot)

        def issue(step, slot):
            in_x = first + step < k_steps
            pl.when(in_x)(lambda: copy(x_ref, w_ref, 0, step, slot))
            pl.when(jnp.logical_not(in_x))(lambda: copy(t_ref, bt_ref, k_steps, step, slot))
        return issue

    def copy_w(src, base, step, slot, block):
        for b in range(boxes):
            # t may be several shrinks side by side over one bt (`term`): bt's columns again for each
            at = k_at(step, b, base, bt_ref.shape[1] if base else 0)
            for h, offset in enumerate(halves):
                # joint: both halves' rows side by side in one tile, one product of N = 2 x block_n
                dst = w_smem.at[slot, 0, b, pl.ds(h * block_n, block_n)] if joint else w_smem.at[slot, h, b]
                plgpu.copy_gmem_to_smem(src.at[pl.ds(offset + block * block_n, block_n), at], dst,
                                        bars.at[slot])

    @by_source
    def issue_w(_, src, base, step, slot):
        if not s_blocks:
            copy_w(src, base, step, slot, col_block)
            return
        in_w = col_block < w_blocks
        pl.when(in_w)(lambda: copy_w(src, base, step, slot, col_block))
        pl.when(jnp.logical_not(in_w))(lambda: copy_w(a_ref, base, step, slot, col_block - w_blocks))

    @by_source
    def issue_x(src, _, base, step, slot):
        # In a cluster every CTA holds the same rows and K steps: each copies its share of the tile and
        # multicasts it to all of them, so the cluster reads the activations from L2 once, not once a CTA.
        for b in range(boxes):
            plgpu.copy_gmem_to_smem(src.at[my_rows, k_at(step, b, base)], x_smem.at[slot, b, pl.ds(0, rows)],
                                    bars.at[slot], **({"collective_axes": "cluster"} if cluster > 1 and _CLUSTER_MULTICAST else {}))

    def issue(step, slot):
        issue_w(step, slot)
        issue_x(step, slot)

    def refill(step, slot):
        issue_w(step, slot)
        if cluster > 1 and _CLUSTER_RELEASE:
            # The multicast writes this slot in every CTA: all of them must be done reading it, once it has been
            # read (the first refill, step num_slots - 1, fills the one slot the prime left fresh).
            @pl.when(step >= num_slots)
            def _wait_for_readers():
                plgpu.barrier_wait(consumed.at[slot])
        issue_x(step, slot)

    if pdl:
        # The weights need no earlier kernel: their first tiles stream while the kernel ahead
        # finishes. Every program waits (the empty splits too), so this kernel never completes
        # before the one ahead of it, and a kernel that waits on this one waits on that one too.
        # (The interpreter runs kernels one after another and has no rule for either instruction.)
        ring.prime(issue_w, num_slots, num_steps)
        if not interpret:
            plgpu.griddepcontrol_wait()
        ring.prime(issue_x, num_slots, num_steps)
        if not interpret:
            plgpu.griddepcontrol_launch_dependents()
    else:
        ring.prime(issue, num_slots, num_steps)
    products = 1 if joint else len(halves)
    zeros = jnp.zeros((row_tile, block_n * len(halves) // products), jnp.float32)
    if not interpret:  # register layouts are a compiler matter: the interpreter has no rule for them
        zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)

    def body(step, accs):
        # Step - 1's products are done: run_state below returns their accumulators.
        slot = ring.advance(refill, step, num_slots, num_steps)
        plgpu.barrier_wait(bars.at[slot])
        if interpret:
            return tuple(acc + sum(lax.dot_general(x_smem[slot, b], w_smem[slot, h, b], (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32) for b in range(boxes))
                         for h, acc in enumerate(accs))

        def products(acc_refs):  # all of a step's products (SwiGLU's two halves) in one block: one wait
            for b in range(boxes):
                for h, acc_ref in enumerate(acc_refs):
                    plgpu.wgmma(acc_ref, x_smem.at[slot, b], w_smem.at[slot, h, b].transpose((1, 0)))

        accs = pl.run_state(products)(tuple(plgpu.ACC.init(acc) for acc in accs))
        if cluster > 1 and _CLUSTER_RELEASE:
            # This CTA's products of the slot are done (run_state waited on them). Only slots refilled later
            # are signalled: every arrival is then awaited by every CTA before it leaves, so none lands on a
            # CTA that has exited, and no barrier completes a phase twice unawaited.
            @pl.when(step + num_slots < num_steps)
            def _release():
                plgpu.barrier_arrive(consumed.at[slot])
        return accs

    accs = lax.fori_loop(0, num_steps, body, tuple(zeros for _ in range(products)))
    if epilogue == "argmax":
        _argmax_epilogue(accs[0], max_ref, idx_ref, max_smem, idx_smem, x_ref.dtype, col_block=col_block,
                         block_n=block_n, n_out=n_out, rows=my_rows, count=rows, interpret=interpret)
    elif epilogue == "accumulate" and s_blocks:  # w's blocks add into acc, the shrink's into its accumulator
        def add_into(ref, block):
            at = pl.ds(block * block_n, block_n)
            if interpret:
                ref[my_rows, at] = ref[my_rows, at] + accs[0][:rows]
            else:
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows)], ref.at[my_rows, at], reduction_op="add")

        if not interpret:
            o_smem[...] = accs[0]
            plgpu.commit_smem()
        in_w = col_block < w_blocks
        pl.when(in_w)(lambda: add_into(o_ref, col_block))
        pl.when(jnp.logical_not(in_w))(lambda: add_into(s_out_ref, col_block - w_blocks))
    elif epilogue == "accumulate" and interpret:
        # The interpreter has no TMA reductions; it runs the programs one at a time.
        o_ref[my_rows, cols] = o_ref[my_rows, cols] + accs[0][:rows]
    elif epilogue in ("partials", "accumulate"):  # float32 sums: the split's own, or added where they land
        o_smem[...] = accs[0]
        plgpu.commit_smem()
        add = epilogue == "accumulate"
        dst = o_ref.at[my_rows, cols] if add else o_ref.at[split, my_rows, cols]
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows)], dst, reduction_op="add" if add else None)
    else:  # the result itself, in the activation dtype
        dtype = o_smem.dtype
        if epilogue == "swiglu":
            # The joint product's columns: gate's block, then up's (whole WGMMA register tiles of 8 columns).
            halves_acc = (accs[0][:, :block_n], accs[0][:, block_n:]) if joint else accs
            result = (_swiglu_sums_approx if swiglu_approx else swiglu_sums)(*halves_acc, dtype)
        else:  # "none", one split
            result = accs[0]
            if has_bias:
                plgpu.barrier_wait(b_bar)
                bias = b_smem[...] if interpret else compat.mgpu_load(b_smem, plgpu.Layout.WGMMA.reduce(0))
                result = result + lax.broadcast_in_dim(bias, result.shape, [1])
        o_smem[...] = result.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows)], o_ref.at[my_rows, cols])
    plgpu.wait_smem_to_gmem(0, wait_read_only=exit_read_only)


def _swiglu_sums_approx(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """`swiglu_sums` (Hugging Face's roundings) with the sigmoid as rsqrt(1 + exp(-gate)) ** 2: under
    `approx_math` both are single approximate instructions (`SWIGLU_APPROX`); exp(-gate) = inf gives 0."""
    gate, up = (a.astype(dtype).astype(jnp.float32) for a in (gate, up))
    r = lax.rsqrt(1.0 + jnp.exp(-gate))
    return (gate * (r * r)).astype(dtype).astype(jnp.float32) * up


def _argmax_epilogue(acc, max_ref, idx_ref, max_smem, idx_smem, dtype, *, col_block, block_n: int, n_out: int,
                     rows, count: int, interpret: bool) -> None:
    """Each row's largest product in this program's block of columns, rounded to `dtype` as the
    logits would be, and the first column holding it (a float32 index: exact below 2^24); columns
    past `n_out` (the last block's padding) never win."""
    values = acc.astype(dtype).astype(jnp.float32)
    shape = values.shape
    cols = (lax.broadcasted_iota(jnp.int32, shape, 1) if interpret else
            plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA))
    cols = (cols + col_block * block_n).astype(jnp.float32)
    values = jnp.where(cols < n_out, values, -jnp.inf)
    best = values.max(axis=1)
    # The first column of the maximum, as a max of negated columns (max is the reduction every
    # register layout has).
    first = -jnp.where(values == lax.broadcast_in_dim(best, shape, [0]), -cols, -float(2 ** 24)).max(axis=1)
    max_smem[...] = best
    idx_smem[...] = first
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(max_smem.at[pl.ds(0, count)], max_ref.at[col_block, rows])
    plgpu.copy_smem_to_gmem(idx_smem.at[pl.ds(0, count)], idx_ref.at[col_block, rows])


@functools.partial(jax.jit, static_argnames=("n_out", "block_n", "num_slots", "boxes", "block_m", "interpret", "merge"))
def _argmax_call(x, w, *, n_out: int, block_n: int, num_slots: int, boxes: int, block_m: int, interpret: bool,
                 merge: str):
    m, k = x.shape
    n = n_out
    rows, row_tile = min(m, block_m), _row_tile(m, block_m)
    blocks = pl.cdiv(n, block_n)
    in_tf = _transforms(_BLOCK_K, x.dtype)
    part = jax.ShapeDtypeStruct((blocks, m), jnp.float32)
    maxes, firsts = plgpu.kernel(
        functools.partial(_kernel, epilogue="argmax", has_bias=False, block_n=block_n, num_slots=num_slots,
                          boxes=boxes, rows=rows, row_tile=row_tile, steps_per_split=k // (_BLOCK_K * boxes),
                          k_steps=k // (_BLOCK_K * boxes), n_out=n, pdl=False, interpret=interpret,
                          exit_read_only=False),
        out_type=(part, part),
        scratch_types=[
            plgpu.SMEM((num_slots, boxes, row_tile, _BLOCK_K), x.dtype, transforms=in_tf),
            plgpu.SMEM((num_slots, 1, boxes, block_n, _BLOCK_K), w.dtype, transforms=in_tf),
            plgpu.SMEM((row_tile,), jnp.float32),
            plgpu.SMEM((row_tile,), jnp.float32),
            plgpu.Barrier(num_arrivals=2 * boxes, num_barriers=num_slots),
        ],
        grid=(m // rows, blocks, 1),
        grid_names=("rows", "cols", "splits"),
        kernel_name=f"skinny_mgpu_argmax_{n}x{k}",
        **compat.mgpu_interpret_kwargs(interpret),
    )(x, w)
    # The first block holding a row's maximum has its first column (argmax's rule).
    if merge == "pallas":
        return pick_blocks(maxes, firsts, interpret=interpret)
    return pick_blocks_reference(maxes, firsts)


# Tiling of `argmax_matmul_mgpu`: weight rows a program, slots, boxes a step; rows a program
# (`block_m`) are all of M (one accumulator of up to 256 rows streams the table once, not once per
# 64 rows), with `block_n` cut to keep it within 128 registers a thread past 128 rows. Measured on the
# H200 at 64 rows (session 23, bench/lm_head.py); the wider programs not yet. Read at call time.
ARGMAX_TILE = {"block_n": 128, "num_slots": 4, "boxes": 1}
# How the blocks' maxima become tokens: "pallas" (`jaxserve_kernels.greedy_pick.pick_blocks`, one program a row)
# or "xla" (`greedy_pick.pick_blocks_reference`: column reductions over the blocks). H200, session 25
# (bench/results/decode_step.md, one process, alternating rounds): pick_blocks 4.25 µs in place of 7.47 +
# 2 x 1.48 + 2 x 1.08 µs of XLA's launches, the 64-row greedy step 0.770 against 0.774 ms. That "xla" was a
# plain `jnp.argmax`; since session 26 the reference finds NaNs first (an any and a second argmax more),
# which was not timed. Read at call time.
ARGMAX_MERGE = "pallas"


def argmax_matmul_mgpu(x: jax.Array, w: jax.Array, *, block_n: int | None = None, num_slots: int | None = None,
                       boxes: int | None = None, block_m: int | None = None,
                       interpret: bool | None = None) -> jax.Array:
    """Each row's argmax of `x @ w.T` rounded to x's dtype (the greedy token of a bf16 LM head),
    without writing the products: every program keeps its block's row maxima and their first
    columns, and a small merge picks across blocks (`ARGMAX_MERGE`). Ties go to the first column, as
    `jnp.argmax` on the rounded products.

    Args:
        x: `[M, K]` bf16, M a multiple of 8 up to 256; K a multiple of 64 x boxes.
        w: `[N, K]` bf16, N a multiple of 8 (not of block_n: the last block's padding never wins).
        block_n, num_slots, boxes, block_m: tiling (None: `ARGMAX_TILE`, all rows in one program);
            `block_m` rows a program (a multiple of 64 up to 256; M at most that or whole blocks of it),
            its accumulator `[block_m, block_n]` within 128 registers a thread.
        interpret: Mosaic GPU's interpreter; None picks it on the CPU backend.

    Example:
        >>> x = jnp.ones((8, 64), jnp.bfloat16); w = jnp.eye(200, 64, k=-3, dtype=jnp.bfloat16)
        >>> argmax_matmul_mgpu(x, w, block_n=64)[:2].tolist()
        [3, 3]
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, K] and w [N, K], got {x.shape} and {w.shape}")
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"x and w must be bfloat16 (WGMMA operands), got {x.dtype} and {w.dtype}")
    m, k = x.shape
    tile = dict(ARGMAX_TILE, block_m=min(pl.cdiv(m, _ROWS) * _ROWS, MAX_ROWS))
    tile["block_n"] = min(tile["block_n"], 128 * 128 // tile["block_m"])
    tile.update({name: v for name, v in (("block_n", block_n), ("num_slots", num_slots), ("boxes", boxes),
                                         ("block_m", block_m)) if v is not None})
    n = w.shape[0]
    # The skinny kernel's own limits (its argmax epilogue: any N, two row vectors out).
    if not _fits(m, k, n, tile["block_n"], tile["boxes"], tile["block_m"], tile["num_slots"], "argmax"):
        raise ValueError(f"M must be a multiple of 8 up to {MAX_ROWS} (at most block_m, or whole blocks of it), K of "
                         f"64 x boxes, block_n of 8, block_m of 64, the accumulator within 128 registers a thread and "
                         f"the ring within shared memory; got x {x.shape}, tile {tile}")
    interpret = bool(compat.resolve_interpret(interpret))
    if n % 8 and not interpret:
        raise ValueError(f"w's rows must be a multiple of 8 (a TMA copy's tiling), got {n}")
    if interpret and n % tile["block_n"]:
        w = _pad_halves(w, 1, tile["block_n"])
    return _argmax_call(x, w, n_out=n, interpret=interpret, merge=ARGMAX_MERGE, **tile)


@functools.partial(jax.jit, static_argnames=("epilogue", "block_n", "num_slots", "boxes", "block_m", "num_splits",
                                           "pdl", "interpret", "exit_read_only", "swiglu_approx", "joint", "cluster",
                                           "shrink_cols"))
def _call(x, w, bias, acc, term=None, shrink=None, *, epilogue: str, block_n: int, num_slots: int, boxes: int,
          block_m: int, num_splits: int, pdl: bool, interpret: bool, exit_read_only: bool,
          swiglu_approx: bool = False, joint: bool = False, cluster: int = 1, shrink_cols: int = 0):
    # shrink: (a_cols, s), its `shrink_cols` columns (whole blocks) streamed past w's
    m, k = x.shape
    rows, row_tile = min(m, block_m), _row_tile(m, block_m)
    has_bias = bias is not None
    n_out = w.shape[0] // 2 if epilogue == "swiglu" else w.shape[0]
    k_steps = k // (_BLOCK_K * boxes)
    t_steps = 0 if term is None else term[0].shape[1] // (_BLOCK_K * boxes)
    s_blocks = shrink_cols // block_n
    steps_per_split = pl.cdiv(k_steps + t_steps, num_splits)
    halves = 2 if epilogue == "swiglu" else 1
    out_type = _out_type(x, n_out, epilogue, num_splits)
    in_tf = _transforms(_BLOCK_K, x.dtype)
    scratch = [
        plgpu.SMEM((num_slots, boxes, row_tile, _BLOCK_K), x.dtype, transforms=in_tf),
        plgpu.SMEM((num_slots, 1, boxes, halves * block_n, _BLOCK_K) if joint else
                   (num_slots, halves, boxes, block_n, _BLOCK_K), w.dtype, transforms=in_tf),
        plgpu.SMEM((row_tile, block_n), out_type.dtype, transforms=_transforms(block_n, out_type.dtype)),
        plgpu.Barrier(num_arrivals=boxes * (1 + halves), num_barriers=num_slots),
    ] + ([plgpu.SMEM((block_n,), jnp.float32), plgpu.Barrier()] if has_bias else []) + (
        # one arrival a CTA of the cluster (each CTA is one warpgroup) when it has read a slot
        [plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=1, num_barriers=num_slots)]
        if cluster > 1 else [])
    body = functools.partial(_kernel, epilogue=epilogue, has_bias=has_bias, block_n=block_n, num_slots=num_slots,
                             boxes=boxes, rows=rows, row_tile=row_tile, steps_per_split=steps_per_split,
                             k_steps=k_steps, n_out=n_out, pdl=pdl, interpret=interpret,
                             exit_read_only=exit_read_only, swiglu_approx=swiglu_approx, joint=joint,
                             cluster=cluster, t_steps=t_steps, s_blocks=s_blocks)
    # Row blocks vary fastest: the programs that stream the same weight rows run side by side, so
    # all but the first read them from L2.
    grid = (m // rows, (pl.cdiv(n_out, block_n) + s_blocks) // cluster, num_splits)
    clusters = {"cluster": (cluster,), "cluster_names": ("cluster",)} if cluster > 1 else {}
    # Profiles name each projection (Mosaic GPU calls every unnamed kernel "anonymous").
    name = (f"skinny_mgpu_{epilogue}_{w.shape[0]}x{k}" + (f"_term{term[0].shape[1]}" if term is not None else "")
            + (f"_shrink{shrink_cols}" if shrink is not None else ""))
    if epilogue == "accumulate":
        return _in_place(body, x, w, acc, term, shrink, grid=grid, scratch=scratch, name=name, interpret=interpret,
                         **clusters)
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=("rows", "cols", "splits"),
        **clusters,
        kernel_name=name,
        # approx_math: the approximate exp and rsqrt of `SWIGLU_APPROX` (no other math in these kernels).
        **({"compiler_params": plgpu.CompilerParams(approx_math=True)} if swiglu_approx and not interpret else {}),
        **compat.mgpu_interpret_kwargs(interpret),
    )(x, w, *(term or ()), *([bias] if has_bias else []))


def _in_place(body, x: jax.Array, w: jax.Array, acc: jax.Array, term: tuple | None = None,
              shrink: tuple | None = None, *, grid: tuple[int, ...], scratch: list, name: str, interpret: bool,
              cluster: tuple[int, ...] = (), cluster_names: tuple[str, ...] = ()) -> jax.Array | tuple:
    """`body(x_ref, w_ref, [t_ref, bt_ref,] [a_ref,] acc_ref, [s_ref,] *scratch_refs)` over `grid` with `acc` (and
    the shrink's accumulator, then both come back) as its output, updated in place: `plgpu.kernel` allocates a fresh
    output, while a core_map over refs (discharged by `pl.run_state`) aliases every ref it writes to its input, so
    the K splits can add into a buffer that already holds the residual stream or a bias."""
    mesh = plgpu.Mesh(grid=grid, grid_names=("rows", "cols", "splits"), cluster=cluster, cluster_names=cluster_names,
                      kernel_name=name)

    def stateful(refs):
        @pl.core_map(mesh, name=name, **compat.mgpu_interpret_kwargs(interpret))
        def _():
            pl.run_scoped(functools.partial(body, *refs), *scratch)

    if shrink is None:
        return pl.run_state(stateful)((x, w, *(term or ()), acc))[-1]
    return tuple(pl.run_state(stateful)((x, w, *(term or ()), shrink[0], acc, shrink[1]))[-2:])


def _ws_kernel(x_ref, w_ref, o_ref, o_smem, *, epilogue: str, block_n: int, num_slots: int, block_m: int,
               steps: int, n_out: int, interpret: bool):
    """Two compute warpgroups and a memory warpgroup (`plgpu.emit_pipeline_warp_specialized`): the
    memory warpgroup streams a `[block_m, 64]` activation tile and the `[block_n, 64]` weight tiles
    a step into `num_slots` slots; each compute warpgroup multiplies its half of the rows by the
    shared weight tiles. A CTA thus covers `block_m` rows with one weight read and `block_n` weight
    rows with one activation read, what one warpgroup's registers cannot hold."""
    row_block, col_block, split = lax.axis_index("rows"), lax.axis_index("cols"), lax.axis_index("splits")
    wg_rows = block_m // 2
    k_at = pl.ds(split * steps * _BLOCK_K, steps * _BLOCK_K)
    offsets = (0, n_out) if epilogue == "swiglu" else (0,)
    tf = _transforms(_BLOCK_K, x_ref.dtype)
    in_specs = [plgpu.BlockSpec((block_m, _BLOCK_K), lambda step: (0, step), transforms=tf)] + [
        plgpu.BlockSpec((block_n, _BLOCK_K), lambda step: (0, step), transforms=tf) for _ in offsets]

    def body(_, x_smem, *w_smems_and_accs):
        *w_smems, accs = w_smems_and_accs
        mine = x_smem.at[pl.ds(lax.axis_index("wg") * wg_rows, wg_rows)]
        if interpret:  # the interpreter's WGMMA takes no transposed operand
            return tuple(acc + lax.dot_general(mine[...], w[...], (((1,), (1,)), ((), ())),
                                               preferred_element_type=jnp.float32)
                         for acc, w in zip(accs, w_smems))

        def products(acc_refs):  # returning waits for them: the pipeline then frees the slot
            for acc_ref, w in zip(acc_refs, w_smems):
                plgpu.wgmma(acc_ref, mine, w.transpose((1, 0)))

        return pl.run_state(products)(tuple(plgpu.ACC.init(acc) for acc in accs))

    def compute(run_pipeline):
        zeros = jnp.zeros((wg_rows, block_n), jnp.float32)
        if not interpret:
            zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
        accs = run_pipeline(tuple(zeros for _ in offsets))
        wg = lax.axis_index("wg")
        rows = pl.ds(row_block * block_m + wg * wg_rows, wg_rows)
        cols = pl.ds(col_block * block_n, block_n)
        if epilogue == "swiglu":
            o_smem[wg] = swiglu_sums(*accs, o_smem.dtype).astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[rows, cols])
        else:
            o_smem[wg] = accs[0]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[split, rows, cols])
        plgpu.wait_smem_to_gmem(0)

    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, in_specs=in_specs, max_concurrent_steps=num_slots,
        wg_axis="wg", num_compute_wgs=2, compute_context=compute)
    pipeline(x_ref.at[pl.ds(row_block * block_m, block_m), k_at],
             *(w_ref.at[pl.ds(offset + col_block * block_n, block_n), k_at] for offset in offsets))


@functools.partial(jax.jit, static_argnames=("epilogue", "block_n", "num_slots", "block_m", "num_splits", "interpret"))
def _ws_call(x, w, *, epilogue: str, block_n: int, num_slots: int, block_m: int, num_splits: int, interpret: bool):
    m, k = x.shape
    n_out = w.shape[0] // 2 if epilogue == "swiglu" else w.shape[0]
    out_type = _out_type(x, n_out, epilogue, num_splits)
    return plgpu.kernel(
        functools.partial(_ws_kernel, epilogue=epilogue, block_n=block_n, num_slots=num_slots, block_m=block_m,
                          steps=k // _BLOCK_K // num_splits, n_out=n_out, interpret=interpret),
        out_type=out_type,
        scratch_types=[plgpu.SMEM((2, block_m // 2, block_n), out_type.dtype,
                                  transforms=_transforms(block_n, out_type.dtype))],
        grid=(m // block_m, n_out // block_n, num_splits),
        grid_names=("rows", "cols", "splits"),
        num_threads=3,  # two compute warpgroups, the memory warpgroup last
        thread_name="wg",
        kernel_name=f"skinny_mgpu_ws_{epilogue}_{w.shape[0]}x{k}",
        **compat.mgpu_interpret_kwargs(interpret),
    )(x, w)


def split_count(k: int, n: int, block_n: int, target_programs: int, boxes: int = 1) -> int:
    """K splits so that about `target_programs` programs run, none of them empty (steps of
    `boxes` x 64 K-elements).

    Example:
        >>> split_count(4864, 896, 64, 264), split_count(896, 9728, 64, 264)
        (16, 1)
    """
    k_steps = k // (_BLOCK_K * boxes)
    splits = max(1, min(k_steps, target_programs // max(1, n // block_n)))
    return pl.cdiv(k_steps, pl.cdiv(k_steps, splits))


def skinny_matmul_mgpu(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                       epilogue: str = "none", acc: jax.Array | None = None, block_n: int | None = None,
                       num_slots: int | None = None, num_splits: int | None = None,
                       boxes: int | None = None, block_m: int | None = None, warpgroups: int | None = None,
                       joint: bool | None = None, pdl: bool | None = None, cluster: int | None = None,
                       term: tuple[jax.Array, jax.Array] | None = None,
                       shrink: tuple[jax.Array, jax.Array, int] | None = None,
                       interpret: bool | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`x @ w.T (+ bias)` for 8-256 rows of `x` on Mosaic GPU, float32 accumulation; the same
    contract as `jaxserve_kernels.skinny_matmul.skinny_matmul(..., layout="nk")`.

    Args:
        x: `[M, K]` bf16 activations, M a multiple of 8 up to 256.
        w: `[N, K]` bf16 weights, K a multiple of 64.
        bias: optional `[N]` (epilogue "none" only; added where XLA sums the partials).
        epilogue: "none" (`[M, N]` in x's dtype), "partials" (`[S, M, N]` float32 sums of the K
            splits), "swiglu" (`silu(x @ gate.T) * (x @ up.T)`, `[M, N/2]`; gate the first
            N/2 rows of w) or "accumulate" (`acc + x @ w.T`, float32: each K split adds its sums
            into `acc` by a TMA reduction, in place where `acc` is donated or an intermediate;
            the order of the splits' float32 adds varies from run to run).
        acc: `[M, N]` float32, epilogue "accumulate" only.
        block_n, num_slots, num_splits, block_m: tiling (None: `tile_for(M, K, epilogue)`,
            `split_count`); `block_m` rows a program (a multiple of 64), M at most that or whole
            blocks of it.
        boxes: K-elements a step in 64s (one TMA box of each operand per 64; None: `tile_for`).
        warpgroups: 1, or 2 (experimental, measured no faster): two compute warpgroups share a
            CTA's tiles (`_ws_kernel`), whole blocks of `block_m` rows, K splits that divide its
            steps, no bias inside.
        joint: "swiglu" with one warpgroup only: gate's and up's weight rows side by side in one
            shared-memory tile, one WGMMA of N = 2 x block_n (at most 256) a box instead of one a
            half, so each activation tile is read from shared memory once a box, not twice
            (None: `tile_for`'s "joint", off unless a table sets it).
        pdl: launched as a programmatic dependent launch (one warpgroup only; None: `PDL`).
        cluster: CTAs a cluster (1, 2 or 4; None: `tile_for`'s "cluster", 1 unless a table sets it): a
            cluster's CTAs take adjacent column blocks of the same rows and K steps, and each activation
            tile is copied once into all of them (TMA multicast), so L2 serves it once a cluster. Column
            blocks in whole clusters; one warpgroup, no PDL. The interpreter has no cluster barriers (it runs cluster 1:
            the same products).
        term: `(t [M, T], bt [N, T])` bf16, T a multiple of 64 x boxes: `t @ bt.T` added to the sums before the
            epilogue, as K steps after x's that read t and bt in x's and w's place (the product over
            `concat([x, t], 1)` and `concat([w, bt], 1)`). What LoRA's folded decode steps pass: each row's shrink
            masked to its adapter's columns and the slots' stacked expand (`jaxserve.model.LORA_FOLD`). Any epilogue
            but "argmax" (SwiGLU's bt rows gate's then up's, as w's); one warpgroup, no cluster. t may also be
            `[M, k * T]`, k partial shrinks side by side (the fused attention's, one a KV head), each over bt:
            `t @ concat([bt] * k, 1).T`.
        shrink: `(a_cols [T, K] bf16, s [M, T] float32, C)`, epilogue "accumulate" only, no term: also
            `s[:, :C] + x @ a_cols[:C].T`, the product's LoRA shrink over every slot's columns (C = slots x R),
            streamed as ceil(C / block_n) column blocks past w's and added into s in place (columns past those blocks
            unchanged); then `(acc, s)` come back. What the accumulating glue's down_proj does under
            `jaxserve.model.LORA_DOWN_SHRINK`, its expand left to the next norm (`residual_norm.add_rms_norm`'s
            ``pending``). T at least those blocks' columns.
        interpret: Mosaic GPU's interpreter; None picks it on the CPU backend.

    Example:
        >>> x = jnp.ones((8, 128), jnp.bfloat16); w = jnp.ones((128, 128), jnp.bfloat16)
        >>> skinny_matmul_mgpu(x, w, epilogue="swiglu").shape
        (8, 64)
        >>> skinny_matmul_mgpu(x, w, epilogue="accumulate", acc=jnp.ones((8, 128)))[0, 0].item()
        129.0
        >>> t, bt = jnp.ones((8, 64), jnp.bfloat16), jnp.full((128, 64), 0.5, jnp.bfloat16)
        >>> skinny_matmul_mgpu(x, w, term=(t, bt))[0, 0].item()  # 128 + 64 * 0.5
        160.0
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, K] and w [N, K], got {x.shape} and {w.shape}")
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"x and w must be bfloat16 (WGMMA operands), got {x.dtype} and {w.dtype}")
    n = w.shape[0]
    if bias is not None and (epilogue != "none" or bias.shape != (n,)):
        raise ValueError(f"bias must be [{n}] with epilogue 'none', got {bias.shape} with {epilogue!r}")
    m, k = x.shape
    if (acc is not None) != (epilogue == "accumulate") or (
            acc is not None and (acc.shape != (m, n) or acc.dtype != jnp.float32)):
        raise ValueError(f"acc must be a float32 [{m}, {n}] with epilogue 'accumulate' (and only then), got "
                         f"{None if acc is None else (acc.shape, acc.dtype)} with {epilogue!r}")
    tile = tile_for(m, k, epilogue)
    block_n = block_n or tile["block_n"]
    num_slots = num_slots or tile["num_slots"]
    block_m = block_m or tile["block_m"]
    boxes = boxes or tile["boxes"]
    warpgroups = warpgroups or tile["warpgroups"]
    cluster = cluster or tile["cluster"]
    pdl = PDL if pdl is None else pdl
    if cluster > 1 and (pdl or warpgroups != 1):
        raise ValueError(f"cluster > 1 runs one warpgroup without PDL, got cluster {cluster}, warpgroups "
                         f"{warpgroups}, pdl {pdl}")
    # A table's "joint" is the one-warpgroup kernel's; asked for by name it must apply.
    joint = (bool(tile.get("joint", 0)) and warpgroups == 1 if joint is None else joint) and epilogue == "swiglu"
    if joint and (warpgroups != 1 or 2 * block_n > 256):
        raise ValueError(f"joint runs one warpgroup and a WGMMA of N = 2 x block_n <= 256, got warpgroups "
                         f"{warpgroups}, block_n {block_n}")
    n_out = n // 2 if epilogue == "swiglu" else n
    if not _fits(m, k, n_out, block_n, boxes, block_m, num_slots, epilogue, warpgroups, cluster):
        raise ValueError(f"M must be a multiple of 8 up to {MAX_ROWS} (and of block_m above it), K of {_BLOCK_K} x "
                         f"boxes, N of block_n (a multiple of 8), num_slots >= 2, the ring within shared memory, "
                         f"the accumulator within 128 registers a thread, and a cluster (2 or 4) whole clusters of "
                         f"column blocks and 8 rows a CTA; "
                         f"got x {x.shape}, w {w.shape}, {epilogue!r}, block_n {block_n}, num_slots {num_slots}, "
                         f"boxes {boxes}, block_m {block_m}, warpgroups {warpgroups}, cluster {cluster}")
    width = 0
    if term is not None:
        t, bt = term
        width = t.shape[-1] if t.ndim == 2 else 0
        if (t.ndim != 2 or t.shape[0] != m or bt.ndim != 2 or bt.shape[0] != n or t.dtype != jnp.bfloat16
                or bt.dtype != jnp.bfloat16 or bt.shape[1] == 0 or bt.shape[1] % (_BLOCK_K * boxes)
                or width % bt.shape[1]):
            raise ValueError(f"term must be (t [{m}, k * T], bt [{n}, T]) bfloat16, T a positive multiple of "
                             f"{_BLOCK_K * boxes} (64 x boxes), got {(t.shape, t.dtype)} and {(bt.shape, bt.dtype)}")
        if warpgroups != 1 or cluster != 1:
            raise ValueError(f"term runs with one warpgroup and no cluster, "
                             f"got {epilogue!r}, warpgroups {warpgroups}, cluster {cluster}")
    s_cols = 0
    if shrink is not None:
        a_cols, s_acc, s_cols = shrink
        s_width = pl.cdiv(s_cols, block_n) * block_n if isinstance(s_cols, int) and s_cols > 0 else 0
        if epilogue != "accumulate" or term is not None:
            raise ValueError(f"shrink runs with epilogue 'accumulate' and no term, got {epilogue!r}"
                             f"{' and a term' if term is not None else ''}")
        if not s_width or a_cols.ndim != 2 or a_cols.shape[1] != k or a_cols.shape[0] < s_width or (
                a_cols.dtype != jnp.bfloat16):
            raise ValueError(f"shrink's a_cols must be a bfloat16 [T, {k}] of at least C = {s_cols!r} rounded up "
                             f"to block_n ({block_n}) rows, C a positive int, got {(a_cols.shape, a_cols.dtype)}")
        if s_acc.ndim != 2 or s_acc.shape[0] != m or s_acc.shape[1] < s_width or s_acc.dtype != jnp.float32:
            raise ValueError(f"shrink's s must be a float32 [{m}, >= {s_width}], got {(s_acc.shape, s_acc.dtype)}")
        if warpgroups != 1 or cluster != 1:
            raise ValueError(f"shrink runs with one warpgroup and no cluster, got warpgroups {warpgroups}, "
                             f"cluster {cluster}")
        s_cols = s_width
    row_blocks = pl.cdiv(m, block_m)
    interpret = compat.resolve_interpret(interpret)
    if epilogue == "swiglu" and n_out % block_n and interpret:
        w = _pad_halves(w, 2, block_n)  # the padding's output columns are dropped below
        if term is not None:
            term = (term[0], _pad_halves(term[1], 2, block_n))
    if epilogue == "swiglu":
        num_splits = 1
    elif num_splits is None:
        # The term's steps count as K steps: the splits share them as they share x's.
        num_splits = split_count(k + width, n + s_cols, block_n, max(1, tile["target_programs"] // row_blocks),
                                 boxes)
    if epilogue == "accumulate" and warpgroups == 2:
        raise ValueError(f"epilogue 'accumulate' runs one warpgroup, got warpgroups {warpgroups}")
    if warpgroups == 2:
        k_steps = k // _BLOCK_K
        # Every split the same number of steps (the pipeline's grid is static): the largest divisor.
        num_splits = max(d for d in range(1, num_splits + 1) if k_steps % d == 0)
        # No bias inside: "none" leaves the kernel as partials, summed below.
        kernel_epilogue = "swiglu" if epilogue == "swiglu" else "partials"
        out = _ws_call(x, w, epilogue=kernel_epilogue, block_n=block_n, num_slots=num_slots, block_m=block_m,
                       num_splits=num_splits, interpret=bool(interpret))
    else:
        # "none" in one split leaves the kernel as the product (+ bias); split, as partials summed below.
        kernel_epilogue = "partials" if epilogue == "none" and num_splits > 1 else epilogue
        # The bias goes in as float32: a TMA copy moves a multiple of 128 bytes (32 bf16 would be 64).
        kernel_bias = bias.astype(jnp.float32) if kernel_epilogue == "none" and bias is not None else None
        out = _call(x, w, kernel_bias, acc, term, None if shrink is None else shrink[:2], epilogue=kernel_epilogue,
                    block_n=block_n, num_slots=num_slots, boxes=boxes, shrink_cols=s_cols, block_m=block_m,
                    num_splits=num_splits, pdl=pdl,
                    exit_read_only=EXIT_READ_ONLY, swiglu_approx=SWIGLU_APPROX and epilogue == "swiglu",
                    joint=joint, cluster=1 if interpret else cluster, interpret=bool(interpret))
    if epilogue != "none" or kernel_epilogue == "none":
        return out[:, :n_out] if epilogue == "swiglu" else out
    out = out.sum(axis=0)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)
