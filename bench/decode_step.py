"""Decode step time of the engine's jitted multi-step call vs a plain JAX static decoder, per XLA setting.

The decode step of a 0.5B model is bound by kernel launches more than by bytes (~330-420
kernels a step against a 0.37 ms roofline), so how XLA issues those kernels matters as much as
the kernels themselves. This script times, for each ``--variant`` (a set of XLA flags, each in
its own process because XLA reads its flags once), at each batch:

- ``jaxserve``: ``Runner.decode`` (the engine's device call: ``--decode-steps`` steps of the
  paged model, Pallas kernels, greedy) at context ``--context``, per step;
- ``static``: the hand-written contiguous-cache decoder of ``bench/throughput.py`` (one
  ``fori_loop`` over the steps), per step;
- the kernel count of the compiled loop body and how many CUDA-graph (command buffer)
  regions XLA formed.

    python bench/decode_step.py --batches 1 64 256 --variants default graphs nographs
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxserve.config import QWEN25_SHAPES  # noqa: E402  (after the path is set)

# model.KV_TOUCH's read-ahead (session 54): its mode ("layer": after the layer's input; "early": after the layer
# before's attention) and its kernel's settings (jaxserve_kernels.kv_touch); the "_cc" ones with the command
# buffer's concurrent scheduling.
KV_TOUCH_TUNINGS = {"kv_touch": ("layer", {}), "kv_touch_cc": ("layer", {}), "kv_touch_cc_e2": ("layer", {"ENTRIES": 2}),
                    "kv_touch_cc_e8": ("layer", {"ENTRIES": 8}), "kv_touch_cc_w4": ("layer", {"NUM_WARPS": 4}),
                    "kv_touch_early_cc": ("early", {}), "kv_touch_early": ("early", {})}
# Compile options of the --glue settings that change how XLA schedules the step's command buffer.
CB_OPTIONS = {"cb_serialize": {"xla_gpu_command_buffer_scheduling_mode": "SERIALIZE"},
              "cb_concurrent": {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"},
              "cb_lhs": {"xla_gpu_command_buffer_scheduling_mode": "LHS"},
              "xla_pdl_off": {"xla_gpu_enable_pdl": False},
              # two half-batch chains a step (runner.HALF_BATCH_ROWS) in a command buffer built from the data
              # dependencies, so the halves' kernels may run side by side
              "halves_cc": {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"},
              "halves_lhs": {"xla_gpu_command_buffer_scheduling_mode": "LHS"}}

# What each variant changes in the child process: a string is added to XLA_FLAGS (the whole
# process), a dict is set as environment variables. "graphs" also captures while loops and
# custom calls (the Pallas kernels) into CUDA graphs, and forms a graph from a single op.
# The "graphs" variant's XLA flags; as one compile's options too (--glue while_graphs, session 22:
# compared with the default in one process).
WHILE_GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
                "xla_gpu_graph_min_graph_size": 1}
VARIANTS = {
    "default": "",
    "graphs": " ".join(f"--{flag}={value}" for flag, value in WHILE_GRAPHS.items()),
    "graphs_nowhile": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN "
                      "--xla_gpu_graph_min_graph_size=1",
    "nographs": "--xla_gpu_enable_command_buffer=",
    # GEMMs XLA would emit as Triton fusions go to cuBLAS (or cuBLASLt) instead.
    "cublas": "--xla_gpu_enable_triton_gemm=false",
    "cublaslt": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true",
    # The decode glue (residual adds, norms, SwiGLU) as XLA fusions instead of kernels.
    "xla_glue": {"JAXSERVE_DECODE_GLUE": "xla"},
    # Only the wide (> skinny MAX_ROWS) decode compile gets these, through jit's compiler_options.
    "wide_xla_default": {"JAXSERVE_WIDE_DECODE_OPTIONS": "{}"},
    "wide_cublas": {"JAXSERVE_WIDE_DECODE_OPTIONS": '{"xla_gpu_enable_triton_gemm": false}'},
    "wide_cublas_graphs": {"JAXSERVE_WIDE_DECODE_OPTIONS":
                           '{"xla_gpu_enable_triton_gemm": false, "xla_gpu_graph_min_graph_size": 1, '
                           '"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}'},
    # XLA's programmatic dependent launches off (its own kernels', and custom calls asking for one).
    "nopdl": "--xla_gpu_enable_pdl=false",
    "cublas_graphs": "--xla_gpu_enable_triton_gemm=false "
                     "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL "
                     "--xla_gpu_graph_min_graph_size=1",
}

# --glue choices that retile the decode QKV projection (jaxserve.model.QKV_SKINNY_TILING): unsplit
# (its bias added in the kernel, so the default 7-way K split's sum, one launch a layer, goes) or
# split in two.
QKV_TILINGS = {"qkv_unsplit": {"num_splits": 1}, "qkv_unsplit_n32": {"num_splits": 1, "block_n": 32},
               "qkv_split2": {"num_splits": 2}}
# --glue choices with o_proj inside the fused decode attention at one row (model.O_IN_ATTENTION),
# with these jaxserve_kernels.decode_attention settings: Wo rows a program, Wo loaded before the attention.
# "no_o_attn": o_proj apart (its own skinny matmul launch).
O_TUNINGS = {"o_attn": {}, "o_attn_pf": {"O_ROWS": 8, "O_PREFETCH_WO": True}, "o_attn_r4": {"O_ROWS": 4, "O_PREFETCH_WO": False},
             "o_attn_r16": {"O_ROWS": 16, "O_PREFETCH_WO": False}, "o_attn_r32": {"O_ROWS": 32, "O_PREFETCH_WO": False},
             "o_attn_r16_pf": {"O_ROWS": 16, "O_PREFETCH_WO": True},
             **{f"o_attn_r{r}_pf_w{w}": {"O_ROWS": r, "O_PREFETCH_WO": True, "O_NUM_WARPS": w}
                for r, w in ((32, 4), (8, 8), (16, 8), (32, 8), (64, 8))}}
# --glue choices with the fused decode attention launched otherwise (model.ATTENTION_TUNING).
ATTENTION_TUNINGS = {"attn_w2": {"num_warps": 2}, "attn_w8": {"num_warps": 8},
                     "attn_st2": {"num_stages": 2},
                     # session 16: pages gathered an iteration (16: a short table's 256 keys in one)
                     "attn_ppb16": {"pages_per_block": 16}, "attn_ppb4": {"pages_per_block": 4},
                     "attn_split2": {"num_splits": 2}, "attn_ppb16_w8": {"pages_per_block": 16, "num_warps": 8},
                     "attn_ppb16_w2": {"pages_per_block": 16, "num_warps": 2}, "attn_st3": {"num_stages": 3},
                     # session 25: one stage at 128-256 rows, where EARLY_GATHER then applies
                     "attn_st1": {"num_stages": 1},
                     # session 36: 192 keys as three whole 64-key blocks (no half-masked second block of 128),
                     # two or three of them in flight
                     "attn_ppb4_st3": {"pages_per_block": 4, "num_stages": 3},
                     "attn_ppb4_st4": {"pages_per_block": 4, "num_stages": 4}}
# --glue choices that run the 8-64-row projections on Mosaic GPU (model.SKINNY_BACKEND "mgpu",
# `jaxserve_kernels.skinny_matmul_mgpu`) with these whole TILES (n = weight rows a program, s = slots: steps
# in flight + 1, t = programs wanted; "none" is the QKV projection, as "partials" unless given).
def _mg(n=64, s=6, t=264, gn=32, gs=6, none=None, b=1, gb=1):
    partials = {"block_n": n, "num_slots": s, "target_programs": t, "boxes": b}
    return {"partials": partials, "none": none or dict(partials),
            "swiglu": {"block_n": gn, "num_slots": gs, "boxes": gb}}


MGPU_TILINGS = {
    # session 16, calls 2 and 3 (the kernel's first defaults: n64 s6 t264, gate_up n32 s6)
    "mgpu_v0": _mg(), "mgpu_s4": _mg(s=4, gs=4), "mgpu_s8": _mg(s=8, gs=8), "mgpu_t132": _mg(t=132),
    "mgpu_t528": _mg(t=528), "mgpu_n32": _mg(n=32), "mgpu_g16": _mg(gn=16), "mgpu_g64": _mg(gn=64),
    "mgpu_n32_s4": _mg(n=32, s=4, gs=4), "mgpu_n32_t132": _mg(n=32, t=132),
    "mgpu_n32_s4_t132": _mg(n=32, s=4, t=132, gs=4), "mgpu_n32_s3": _mg(n=32, s=3, gs=3),
    "mgpu_n32_g64_s4": _mg(n=32, gn=64, gs=4), "mgpu_n128_t132": _mg(n=128, t=132),
    # call 4: the defaults since call 3 (n32 s4, gate_up n32 s4), and around them; "qkv1": the QKV
    # projection unsplit, its bias in the kernel (no sum launch)
    "mgpu": {}, "mgpu_qkv1": _mg(n=32, s=4, gs=4, none={"block_n": 32, "num_slots": 4, "target_programs": 1}),
    "mgpu_s5": _mg(n=32, s=5, gs=5), "mgpu_gs3": _mg(n=32, s=4, gs=3), "mgpu_ps3": _mg(n=32, s=3, gs=4),
    "mgpu_t200": _mg(n=32, s=4, t=200, gs=4),
    # call 5: steps of two 64-wide boxes (b2: every projection, gb2: gate_up only), fewer slots
    "mgpu_b2_s3": _mg(n=32, s=3, gs=3, b=2, gb=2), "mgpu_b2_s2": _mg(n=32, s=2, gs=2, b=2, gb=2),
    "mgpu_gb2_s3": _mg(n=32, s=4, gs=3, gb=2),
    # session 17: down_proj (K >= DEEP_K) with 64 weight rows and 6 slots (its best at 128 rows)
    "mgpu_deep": dict(_mg(n=32, s=4, gs=4), deep={"block_n": 64, "num_slots": 6, "target_programs": 264}),
    # session 19: gate_up (152 programs of 14 steps at 64 rows) with more steps in flight
    "mgpu_gs5": _mg(n=32, s=4, gs=5), "mgpu_gs6": _mg(n=32, s=4, gs=6),
    # session 19, after gate_up's two-box steps won: the same for down_proj alone ("deep", K >= DEEP_K:
    # 9 steps a program -> 5), and for every K-split product (o and down; QKV keeps one box)
    # (from here on only the epilogues named differ from the defaults: apply_glue lays them over TILES)
    "mgpu_deep_b2": {"deep": {"block_n": 32, "num_slots": 3, "target_programs": 264, "boxes": 2}},
    # gate_up over 16 rows of each half a program (304 programs, one-box steps, 4 slots: four fit an SM),
    # or two-box steps over 64 (76 programs, one an SM)
    "mgpu_g16_s4": {"swiglu": {"block_n": 16, "num_slots": 4}},
    "mgpu_g64_b2": {"swiglu": {"block_n": 64, "num_slots": 3, "boxes": 2}},
    # the 8-64-row default before down_proj's two-box steps (its "deep" tile as "partials")
    "mgpu_deep_b1": {"deep": {"block_n": 32, "num_slots": 4, "target_programs": 264}},
    "mgpu_pb2": {"partials": {"block_n": 32, "num_slots": 3, "target_programs": 264, "boxes": 2}},
    # session 20, the K splits adding into one buffer (model.ACCUMULATE): fewer splits, fewer adds to
    # each element (QKV 7 -> 3 splits, o 7 -> 4; down 8 -> 4)
    "mgpu_p132": {"partials": {"block_n": 32, "num_slots": 4, "target_programs": 132}},
    "mgpu_deep_t132": {"deep": {"block_n": 32, "num_slots": 3, "target_programs": 132, "boxes": 2}},
    # session 30: gate_up's grid against the 132 SMs (4,864 columns a half: blocks of 32 are 152 programs, so 20
    # SMs run two; 40 -> 122 programs and 48 -> 102, one an SM, the last block ragged; 24 -> 203)
    **{f"mgpu_g{n}": {"swiglu": {"block_n": n, "num_slots": 3, "boxes": 2}} for n in (24, 40, 48)},
    "mgpu_g40_s4": {"swiglu": {"block_n": 40, "num_slots": 4, "boxes": 2}},  # two products (joint: default since 31)
    "mgpu_g32": {"swiglu": {"block_n": 32, "num_slots": 3, "boxes": 2}},  # the default before session 30
    # down_proj over 56 columns a program: 16 x 8 splits = 128 programs, one an SM (the default's 28 x 8 = 224 run
    # two on 92 SMs), or 16 x 13 = 208 of 3 steps
    "mgpu_deep_n56": {"deep": {"block_n": 56, "num_slots": 3, "target_programs": 132, "boxes": 2}},
    "mgpu_deep_n56_t264": {"deep": {"block_n": 56, "num_slots": 3, "target_programs": 264, "boxes": 2}},
    # all K-split products in one-step programs (QKV 504, o 392: o's 196 programs ran two on 64 SMs)
    "mgpu_p528": {"partials": {"block_n": 32, "num_slots": 4, "target_programs": 528}},
    # session 31: gate_up's two halves as one WGMMA of N = 2 x block_n ("joint": each activation tile read from
    # shared memory once a box, not once a half)
    **{f"mgpu_j{n}": {"swiglu": {"block_n": n, "num_slots": 4, "boxes": 2, "joint": 1}} for n in (32, 40, 48)},
    "mgpu_j40_s3": {"swiglu": {"block_n": 40, "num_slots": 3, "boxes": 2, "joint": 1}},
    # session 35: the default tiles in clusters of two CTAs sharing each activation tile (TMA multicast: L2 serves
    # it once a cluster); c2 every projection, c2_gu gate_up only
    "mgpu_c2": {"partials": {"block_n": 32, "num_slots": 4, "target_programs": 264, "cluster": 2},
                "none": {"block_n": 32, "num_slots": 4, "target_programs": 264, "cluster": 2},
                "swiglu": {"block_n": 40, "num_slots": 4, "boxes": 2, "joint": 1, "cluster": 2},
                "deep": {"block_n": 32, "num_slots": 3, "target_programs": 264, "boxes": 2, "cluster": 2}},
    "mgpu_c2_gu": {"swiglu": {"block_n": 40, "num_slots": 4, "boxes": 2, "joint": 1, "cluster": 2}},
}
# --glue choices that run steps of 65-256 rows through the fused glue (SKINNY_ROWS 256, like
# "skinny256") with their projections on Mosaic GPU, `jaxserve_kernels.skinny_matmul_mgpu.WIDE_TILES` these
# (bm = rows a program: 256 all of them, 128 / 64 row blocks; gbm the same for gate_up).
# "deep" (K >= DEEP_K: down_proj) as "partials" unless given.
# wg / gwg: warpgroups a CTA (2: the experimental warp-specialized kernel, `_ws_kernel`).
def _mw(n=32, s=4, t=264, gn=32, gs=4, bm=256, gbm=256, deep=None, wg=1, gwg=1):
    partials = {"block_n": n, "num_slots": s, "target_programs": t, "block_m": bm, "warpgroups": wg}
    return {"partials": partials, "none": dict(partials), "deep": deep or dict(partials),
            "swiglu": {"block_n": gn, "num_slots": gs, "block_m": gbm, "warpgroups": gwg}}


MGPU_WIDE_TILINGS = {
    # session 17, call 1: the 64-row tiles with every row in one program, then wider weight blocks
    # (fewer L2 re-reads of the activations), row blocks, fewer programs
    "mgpu256": _mw(), "mgpu256_n64": _mw(n=64, s=3), "mgpu256_bm128": _mw(bm=128, gbm=128),
    "mgpu256_bm128_n64": _mw(n=64, bm=128, gn=64, gbm=128), "mgpu256_t132": _mw(t=132),
    "mgpu256_g16": _mw(gn=16, gs=6), "mgpu256_bm64": _mw(n=64, bm=64, gn=64, gbm=64),
    # call 2: around call 1's best (row blocks of 64, 64 weight rows of each half)
    "mgpu256_bm64_n32": _mw(n=32, bm=64, gn=32, gbm=64), "mgpu256_bm64_t132": _mw(n=64, t=132, bm=64, gn=64, gbm=64),
    "mgpu256_bm64_n128": _mw(n=128, bm=64, gn=64, gbm=64),
    "mgpu256_bm64_s6": _mw(n=64, s=6, bm=64, gn=64, gs=6, gbm=64),
    "mgpu256_bm64_g128": _mw(n=64, bm=64, gn=128, gs=3, gbm=64),
    # call 3, at 128 rows: gate_up in one row block (call 2: 9.58 vs 11.22 µs in two), 6 slots for
    # the partials (down at 256 rows: 8.8 vs 11.2 µs)
    "mgpu256_g1": _mw(bm=64, gbm=128), "mgpu256_g1_s6": _mw(s=6, bm=64, gbm=128),
    "mgpu256_g1_n64s6": _mw(n=64, s=6, bm=64, gbm=128), "mgpu256_s6": _mw(s=6, bm=64, gbm=64),
    # call 4: the defaults before "deep" (down_proj as the other K-split products)
    "mgpu256_nodeep": _mw(bm=64, gbm=64),
    # session 17, run in session 18 (call 1: none beat mgpu256_bm64 or cuBLAS): two compute warpgroups a CTA
    # sharing its tiles (ws128: 2 x 64 rows, ws256: 2 x 128), everywhere or for gate_up only (ws_g*,
    # the other projections as mgpu256_bm64)
    "mgpu256_ws128": _mw(bm=128, gbm=128, wg=2, gwg=2),
    "mgpu256_ws128_n64": _mw(n=64, s=3, bm=128, gn=64, gs=3, gbm=128, wg=2, gwg=2),
    "mgpu256_ws256": _mw(s=3, gs=3, wg=2, gwg=2),
    "mgpu256_ws_g": _mw(n=64, bm=64, gn=64, gs=3, gbm=128, gwg=2),
    "mgpu256_ws_g256": _mw(n=64, bm=64, gs=3, gwg=2),
    # the same with 2 slots: shared memory for two CTAs an SM, so all 152 of gate_up's run at once
    "mgpu256_ws_g_s2": _mw(n=64, bm=64, gn=64, gs=2, gbm=128, gwg=2),
    "mgpu256_ws_g256_s2": _mw(n=64, bm=64, gs=2, gwg=2),
    # session 18: QKV, o and down as mgpu256_bm64 (down also with 6 slots: "deep"), gate_up + SwiGLU
    # on cuBLAS and one XLA fusion (model.XLA_GATE_UP_ROWS 128)
    "mgpu256_xgu": _mw(n=64, bm=64, gn=64, gbm=64),
    "mgpu256_xgu_wt": {},  # the default WIDE_TILES
    # session 20: mgpu256_xgu adds QKV, o and down into the float32 stream (model.ACCUMULATE, the default
    # since); this one keeps their partial sums (the route as session 18 measured it)
    "mgpu256_xgu_partials": _mw(n=64, bm=64, gn=64, gbm=64),
    "mgpu256_xgu_deep": _mw(n=64, bm=64, gn=64, gbm=64, deep={"block_n": 64, "num_slots": 6,
                                                              "target_programs": 264, "block_m": 64}),
    # session 19 (only the epilogues named differ from WIDE_TILES, which apply_glue lays them over): gate_up of
    # 65-128-row steps in steps of two 64-wide boxes, 3 slots (its best at 64 rows)
    "mgpu256_gb2": {"swiglu": {"block_n": 32, "num_slots": 3, "block_m": 64, "boxes": 2}},
    # session 30: gate_up's 128-row programs over 40 columns (2 x 122 = 244 programs, two an SM; 32 columns
    # made 304, a third program on 40 SMs)
    "mgpu256_g40": {"swiglu": {"block_n": 40, "num_slots": 4, "block_m": 64}},
    # session 31: the same as one WGMMA of N = 2 x block_n ("joint"); row blocks of 64 or 128
    "mgpu256_j40": {"swiglu": {"block_n": 40, "num_slots": 4, "block_m": 64, "joint": 1}},
    "mgpu256_j64": {"swiglu": {"block_n": 64, "num_slots": 4, "block_m": 64, "joint": 1}},
    "mgpu256_j40_bm128": {"swiglu": {"block_n": 40, "num_slots": 3, "block_m": 128, "joint": 1}},
    "mgpu256_j64_bm128": {"swiglu": {"block_n": 64, "num_slots": 3, "block_m": 128, "joint": 1}},
    # down_proj ("deep") of 65-128-row steps in two-box steps, 3 slots (the same shared memory as its 6
    # one-box slots); "pb2": QKV, o and down so
    "mgpu256_deep_b2": {"deep": {"block_n": 64, "num_slots": 3, "target_programs": 264, "block_m": 64, "boxes": 2}},
    "mgpu256_pb2": {"partials": {"block_n": 32, "num_slots": 3, "target_programs": 264, "block_m": 64, "boxes": 2},
                    "none": {"block_n": 32, "num_slots": 3, "target_programs": 264, "block_m": 64, "boxes": 2},
                    "deep": {"block_n": 64, "num_slots": 3, "target_programs": 264, "block_m": 64, "boxes": 2}},
}
# --glue choices (session 31) laid over WIDE_TILES (65-128 rows) or WIDEST_TILES (129-256 rows), the other
# epilogues' tiles kept; a 129-256-row "swiglu" tile takes those steps' gate_up off cuBLAS. "joint": gate's and
# up's weight rows as one WGMMA of N = 2 x block_n; block_m 128: the weights' tiles read once a 128-row block.
WIDE_OVERRIDES = {
    "wide_j40": {"swiglu": {"block_n": 40, "num_slots": 4, "block_m": 64, "joint": 1}},
    "wide_j40_bm128": {"swiglu": {"block_n": 40, "num_slots": 3, "block_m": 128, "joint": 1}},
    "wide_j40_bm128_s4": {"swiglu": {"block_n": 40, "num_slots": 4, "block_m": 128, "joint": 1}},
    # session 33: one WGMMA of N = 160 a 64-row block (61 x 2 programs, one an SM)
    "wide_j80_bm64": {"swiglu": {"block_n": 80, "num_slots": 3, "block_m": 64, "joint": 1}},
    # session 35: the default tiles in clusters of two CTAs sharing each activation tile (TMA multicast)
    "wide_c2": {"partials": {"block_n": 32, "num_slots": 4, "target_programs": 264, "block_m": 64, "cluster": 2},
                "none": {"block_n": 32, "num_slots": 4, "target_programs": 264, "block_m": 64, "cluster": 2},
                "swiglu": {"block_n": 40, "num_slots": 4, "block_m": 64, "joint": 1, "cluster": 2},
                "deep": {"block_n": 64, "num_slots": 6, "target_programs": 264, "block_m": 64, "cluster": 2}},
}
WIDEST_OVERRIDES = {
    "widest_j40": {"swiglu": {"block_n": 40, "num_slots": 3, "block_m": 128, "joint": 1}},
    "widest_j48": {"swiglu": {"block_n": 48, "num_slots": 3, "block_m": 128, "joint": 1}},
    "widest_j56": {"swiglu": {"block_n": 56, "num_slots": 3, "block_m": 128, "joint": 1}},
    # two slots: three programs an SM fit (32 columns: 304 programs in one wave of 396; 40: 244)
    "widest_j32_s2": {"swiglu": {"block_n": 32, "num_slots": 2, "block_m": 128, "joint": 1}},
    "widest_j40_s2": {"swiglu": {"block_n": 40, "num_slots": 2, "block_m": 128, "joint": 1}},
    # the K-split products in 128-row programs: down_proj ("deep") alone, or QKV and o ("partials")
    "widest_deep_bm128": {"deep": {"block_n": 64, "num_slots": 3, "target_programs": 264, "block_m": 128}},
    "widest_p_bm128": {"partials": {"block_n": 64, "num_slots": 3, "target_programs": 264, "block_m": 128}},
    # down_proj in 64-row programs, as "partials" (the 256-row default until session 32)
    "widest_deep_bm64": {"deep": {"block_n": 64, "num_slots": 4, "target_programs": 264, "block_m": 64}},
    # session 33: wider products in 64-row blocks. A WGMMA reads its A tile (64 x 16) from shared memory
    # for every instruction, so N = 160 moves 7 KiB a 16-deep step for twice the math of N = 80's 4.5 KiB
    # (the 128-row program of N = 80 reads 9 KiB for the same math): 4 x 61 = 244 programs, two an SM.
    # j64_s2: N = 128, two slots, 4 x 76 = 304 programs, three an SM. Both lose (H200, decode_step.md session 33:
    # 11.23 and 12.96 against 10.70 µs a layer; at 128 rows wide_j80_bm64 9.44 against 7.92).
    "widest_j80_bm64": {"swiglu": {"block_n": 80, "num_slots": 3, "block_m": 64, "joint": 1}},
    "widest_j64_bm64_s2": {"swiglu": {"block_n": 64, "num_slots": 2, "block_m": 64, "joint": 1}},
    # session 35: clusters of two CTAs on adjacent column blocks, each activation tile copied once into both
    # (TMA multicast). At 256 rows gate_up's 244 programs read ~56 MB of activations from L2 a layer beside 17 MB of
    # weights (~8.5 TB/s at 10.7 µs), down_proj's 252 ~37 + 19 MB: if L2 bounds them, halving the activation reads
    # should show. gu: gate_up only; deep: down_proj; p: QKV and o; c2: all four.
    "widest_c2_gu": {"swiglu": {"block_n": 40, "num_slots": 3, "block_m": 128, "joint": 1, "cluster": 2}},
    "widest_c2_deep": {"deep": {"block_n": 64, "num_slots": 3, "target_programs": 264, "block_m": 128,
                                "cluster": 2}},
    "widest_c2_p": {"partials": {"block_n": 64, "num_slots": 4, "target_programs": 264, "block_m": 64, "cluster": 2},
                    "none": {"block_n": 64, "num_slots": 4, "target_programs": 264, "block_m": 64, "cluster": 2}},
    "widest_c2": {"swiglu": {"block_n": 40, "num_slots": 3, "block_m": 128, "joint": 1, "cluster": 2},
                  "deep": {"block_n": 64, "num_slots": 3, "target_programs": 264, "block_m": 128, "cluster": 2},
                  "partials": {"block_n": 64, "num_slots": 4, "target_programs": 264, "block_m": 64, "cluster": 2},
                  "none": {"block_n": 64, "num_slots": 4, "target_programs": 264, "block_m": 64, "cluster": 2}},
}
# --glue choices that store the projection weights [out, in] (jaxserve.model.WEIGHT_LAYOUT "nk";
# the params converted once), each with these `jaxserve_kernels.skinny_matmul` settings over its defaults:
# the tensor-core path's tile (NK_BLOCK_N x NK_BLOCK_K), the one-row lane-wise path (NK_GEMV, its
# tile, warps, programs wanted: NK_GEMV_TARGET_PROGRAMS). "nk_xla": XLA's dots and glue fusions on
# that layout; "nk_xla_glue": XLA's dots feeding the glue kernels.
_MMA = {"NK_GEMV": False}
FOLD_BEST = {"none": dict(block_n=4), "swiglu": dict(block_n=2, num_programs=528)}


def _b2(none=None, swiglu=None, **gemv):
    """Call 2's best: QKV 4 rows a block, gate_up 2 rows over 528 programs (8 warps each), the o and
    down projections 4 rows a block with the next K block loaded ahead, ~528 programs; overrides."""
    tiles = {"none": none or dict(block_n=4, num_warps=8),
             "swiglu": swiglu or dict(block_n=2, num_programs=528, num_warps=8)}
    return dict(dict(NK_GEMV_BLOCK_N=4, NK_GEMV_PREFETCH=True, NK_GEMV_TARGET_PROGRAMS=528), NORM_GEMV_TILES=tiles,
                **gemv)


NK_TILINGS = {
    "nk": {}, "nk_xla": {}, "nk_xla_glue": {},
    "nk_mma_n16": dict(_MMA, NK_BLOCK_N=16), "nk_mma_n32": dict(_MMA), "nk_mma_n16_k128": dict(_MMA, NK_BLOCK_N=16, NK_BLOCK_K=128),
    "nk_n32_k128": {"NK_BLOCK_K": 128}, "nk_n64": {"NK_BLOCK_N": 64},
    "gemv_n16_k256_w4": {"NK_GEMV_BLOCK_N": 16, "NK_GEMV_BLOCK_K": 256, "NK_GEMV_WARPS": 4},
    "gemv_n4": {"NK_GEMV_BLOCK_N": 4}, "gemv_n4_w4": {"NK_GEMV_BLOCK_N": 4, "NK_GEMV_WARPS": 4},
    "gemv_n16": {"NK_GEMV_BLOCK_N": 16}, "gemv_t1k": {"NK_GEMV_TARGET_PROGRAMS": 1056},
    "gemv_k2048": {"NK_GEMV_BLOCK_K": 2048}, "gemv_w16": {"NK_GEMV_WARPS": 16}, "nk_k256": {"NK_BLOCK_K": 256},
    "nk_k64": {"NK_BLOCK_K": 64}, "nk_n64_k128": {"NK_BLOCK_N": 64, "NK_BLOCK_K": 128},
    "nk_n16_k128": {"NK_BLOCK_N": 16, "NK_BLOCK_K": 128},
    # session 15: the folded-norm kernel's tiling by epilogue (NORM_GEMV_TILES): "sw" the gate_up
    # projection (SwiGLU: gate and up rows a block), "qkv" the QKV; n = rows a block, w = warps,
    # p = programs (each looping over blocks, the next block's rows loaded ahead)
    **{f"fold_sw_{name}": {"NORM_GEMV_TILES": {"none": {}, "swiglu": tile}} for name, tile in {
        "n4": dict(block_n=4), "n2": dict(block_n=2), "w16": dict(num_warps=16),
        "n4_w4": dict(block_n=4, num_warps=4), "n4_p264": dict(block_n=4, num_programs=264),
        "n2_p264": dict(block_n=2, num_programs=264), "n4_p528": dict(block_n=4, num_programs=528),
        "n2_p528": dict(block_n=2, num_programs=528), "n4_p132": dict(block_n=4, num_programs=132)}.items()},
    "fold_qkv_n4": {"NORM_GEMV_TILES": {"none": dict(block_n=4), "swiglu": {}}},
    "fold_n4": {"NORM_GEMV_TILES": {"none": dict(block_n=4), "swiglu": dict(block_n=4)}},
    **{f"fold_sw_{name}": {"NORM_GEMV_TILES": {"none": {}, "swiglu": tile}} for name, tile in {
        "n2_p792": dict(block_n=2, num_programs=792), "n2_p1056": dict(block_n=2, num_programs=1056),
        "n1_p528": dict(block_n=1, num_programs=528), "n1_p1056": dict(block_n=1, num_programs=1056),
        "n4_p1056": dict(block_n=4, num_programs=1056)}.items()},
    # session 15, call 2: the best of call 1 (gate_up 2 rows a block over 528 programs, QKV 4 rows a
    # block) and, over it, QKV retiled, or the down / o projections' one-row tiles (the down
    # projection's K loop with the next block loaded ahead: NK_GEMV_PREFETCH)
    "fold_best": {"NORM_GEMV_TILES": FOLD_BEST},
    **{f"fold_qkv_{name}": {"NORM_GEMV_TILES": {"none": tile, "swiglu": FOLD_BEST["swiglu"]}} for name, tile in {
        "n2": dict(block_n=2), "n2_p264": dict(block_n=2, num_programs=264),
        "n4_p144": dict(block_n=4, num_programs=144)}.items()},
    **{f"down_{name}": dict(tile, NORM_GEMV_TILES=FOLD_BEST) for name, tile in {
        "pf": dict(NK_GEMV_PREFETCH=True), "t528": dict(NK_GEMV_TARGET_PROGRAMS=528),
        "t1056": dict(NK_GEMV_TARGET_PROGRAMS=1056),
        "n4_pf": dict(NK_GEMV_BLOCK_N=4, NK_GEMV_PREFETCH=True),
        "n4_pf_t528": dict(NK_GEMV_BLOCK_N=4, NK_GEMV_PREFETCH=True, NK_GEMV_TARGET_PROGRAMS=528),
        "n2_pf_t896": dict(NK_GEMV_BLOCK_N=2, NK_GEMV_PREFETCH=True, NK_GEMV_TARGET_PROGRAMS=896)}.items()},
    # session 15, call 3: call 2's best ("b2": fold_best + down_n4_pf_t528) with one projection's
    # tile changed: sw_nN_wW_pP = gate_up N rows a block over W warps and P programs, qkv_nN_wW,
    # gemv_nN_wW = the o / down projections' one-row tile
    "b2": _b2(),
    **{f"b2_sw_n{n}_w{w}_p{p}": _b2(swiglu=dict(block_n=n, num_warps=w, num_programs=p)) for n, w, p in (
        (2, 2, 528), (2, 2, 1056), (2, 4, 528), (4, 4, 528), (4, 4, 264), (1, 1, 1056), (1, 2, 1056),
        (2, 4, 1056))},
    **{f"b2_qkv_n{n}_w{w}": _b2(none=dict(block_n=n, num_warps=w)) for n, w in ((4, 4), (2, 2), (2, 4))},
    **{f"b2_gemv_n{n}_w{w}": _b2(NK_GEMV_BLOCK_N=n, NK_GEMV_WARPS=w) for n, w in ((4, 4), (2, 2), (8, 8))},
}


def gpu_stream_events(trace_dir: str) -> tuple[list[dict], list[dict]]:
    """(kernel events on the GPU's streams, every event) of the newest Perfetto trace
    `jax.profiler` wrote under `trace_dir`; ([], []) when there is none.

    Only events on the GPU's streams count as kernels (process names holding "GPU" or
    "/device:"), so host-side XLA ops and Python are left out.
    """
    import glob
    import gzip

    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True) + \
        glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return [], []
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and any(k in str(e.get("args", {}).get("name", "")) for k in ("GPU", "/device:"))}
    # The device's "XLA Ops"/"XLA Modules" rows repeat the kernels at op level: count streams.
    threads = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    streams = {k for k, name in threads.items() if "Stream" in name} or set(threads)
    kernels = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams and "dur" in e]
    return kernels, events


def gpu_kernel_times(trace_dir: str, kernels: list[dict] | None = None) -> dict[str, tuple[int, float]]:
    """{kernel name: (launches, total µs)} from the Perfetto trace `jax.profiler` wrote (or from
    its `gpu_stream_events` kernels, when the caller has read them already)."""
    out: dict[str, tuple[int, float]] = {}
    for e in gpu_stream_events(trace_dir)[0] if kernels is None else kernels:
        n, t = out.get(e["name"], (0, 0.0))
        out[e["name"]] = (n + 1, t + float(e["dur"]))
    return out


def kernel_overlaps(kernels: list[dict]) -> tuple[float, int, float]:
    """(span µs: first kernel's start to last kernel's end, kernels that start before the one
    ahead of them ended, µs of such overlap) over `gpu_stream_events`' kernels: what programmatic
    dependent launches show (without them a stream runs its kernels one after another)."""
    if not kernels:
        return 0.0, 0, 0.0
    ordered = sorted(kernels, key=lambda e: float(e["ts"]))
    end = float(ordered[0]["ts"]) + float(ordered[0]["dur"])
    count, overlap = 0, 0.0
    for e in ordered[1:]:
        start = float(e["ts"])
        if start < end:
            count, overlap = count + 1, overlap + min(end, start + float(e["dur"])) - start
        end = max(end, start + float(e["dur"]))
    return end - float(ordered[0]["ts"]), count, overlap


def grouped_kernel_times(times: dict[str, tuple[int, float]]) -> list[tuple[str, tuple[int, float]]]:
    """`gpu_kernel_times` with names that differ only by a numeric suffix (one fusion per layer)
    summed: `[(name, (launches, total µs))]`, biggest first."""
    groups: dict[str, list[float]] = {}
    for name, (n, t) in times.items():
        g = groups.setdefault(re.sub(r"[._]\d+$", "", name), [0, 0.0])
        g[0] += n
        g[1] += t
    return sorted(((k, (int(n), t)) for k, (n, t) in groups.items()), key=lambda kv: -kv[1][1])


def profile_decode(runner, call: tuple, out_dir: str, tag: str, calls: int = 5, logprobs: bool = False) -> None:
    """Per-kernel GPU time of `calls` decode calls, printed per step, biggest first."""
    import jax

    trace_dir = os.path.join(out_dir, tag)
    jax.block_until_ready(runner.decode(*call, greedy=True, logprobs=logprobs).tokens)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(runner.decode(*call, greedy=True, logprobs=logprobs).tokens)
    kernels = gpu_stream_events(trace_dir)[0]  # the trace read once, for both summaries below
    times = gpu_kernel_times(trace_dir, kernels)
    steps = calls * call[6]
    total = sum(t for _, t in times.values())
    print(f"profile {tag}: GPU busy {total / steps:.1f} µs a step over {len(times)} kernel names", flush=True)
    span, overlapping, overlap = kernel_overlaps(kernels)
    print(f"profile {tag}: first start to last end {span / steps:.1f} µs a step; {overlapping / steps:.1f} kernels "
          f"a step start before the one ahead ended, overlapping {overlap / steps:.1f} µs a step", flush=True)
    for key, (n, t) in grouped_kernel_times(times)[:30]:
        print(f"   {t / steps:8.1f} µs/step {n / steps:6.1f} launches/step  {t / max(n, 1):7.2f} µs each  {key[:90]}",
              flush=True)


def run_variant(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.throughput import TINY, decode_hlo, loop_body_histogram, qwen25_shape, static_decoder, time_decode_call
    from jaxserve import model as model_module
    from jaxserve import runner as runner_module
    paged_attention_module = importlib.import_module("jaxserve_kernels.paged_attention")  # jaxserve_kernels.paged_attention is also a function
    residual_norm_module = importlib.import_module("jaxserve_kernels.residual_norm")
    skinny_module = importlib.import_module("jaxserve_kernels.skinny_matmul")
    decode_attention_module = importlib.import_module("jaxserve_kernels.decode_attention")
    mgpu_module = importlib.import_module("jaxserve_kernels.skinny_matmul_mgpu")
    o_defaults = {name: getattr(decode_attention_module, name) for name in ("O_ROWS", "O_PREFETCH_WO", "O_NUM_WARPS")}
    from jaxserve.config import ModelConfig
    from jaxserve.model import init_params
    from jaxserve.runner import Runner, default_attention_impl
    from jaxserve.sampling import SamplingParams, make_batch

    shape = dict(TINY if args.tiny else qwen25_shape(args.shape), model_type="qwen2")
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cfg = ModelConfig.from_hf_dict(shape)
    t0 = time.perf_counter()
    shapes = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    if args.shape != "0.5B":  # too many weights to draw on the host: one jitted normal draw per leaf on the device
        leaves, tree = jax.tree.flatten(shapes)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        params = jax.tree.unflatten(tree, [jax.jit(lambda k, s=s: (jax.random.normal(k, s.shape, jnp.float32) * 0.02)
                                                   .astype(s.dtype))(key) for key, s in zip(keys, leaves)])
    else:
        # Random weights drawn on the host: jitting Flax's init for 0.5B costs ~40 s on the GPU machine.
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda s: jnp.asarray((rng.standard_normal(s.shape, np.float32) * 0.02).astype(s.dtype)),
                              shapes)
    jax.block_until_ready(params)
    print(f"params ready {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    single_pass_keys = paged_attention_module.SINGLE_PASS_KEYS
    skinny_rows = model_module.SKINNY_ROWS
    mgpu_max_rows = model_module.MGPU_MAX_ROWS
    xla_gate_up_rows = model_module.XLA_GATE_UP_ROWS
    norm_warps = residual_norm_module.NUM_WARPS
    skinny_backend = model_module.SKINNY_BACKEND
    mgpu_defaults = {ep: dict(tile) for ep, tile in mgpu_module.TILES.items()}
    mgpu_pdl = mgpu_module.PDL
    accumulate = model_module.ACCUMULATE
    greedy_head = (model_module.GREEDY_HEAD, model_module.GREEDY_HEAD_ROWS)
    exit_read_only = mgpu_module.EXIT_READ_ONLY
    rope_joint = decode_attention_module.ROPE_JOINT
    early_gather = decode_attention_module.EARLY_GATHER
    rope_repeat = model_module.ROPE_REPEAT
    argmax_merge = mgpu_module.ARGMAX_MERGE
    argmax_tile = dict(mgpu_module.ARGMAX_TILE)
    scale_first = residual_norm_module.SCALE_FIRST
    norm_gemv_hoist = skinny_module.NORM_GEMV_HOIST
    combine_module = importlib.import_module("jaxserve_kernels.split_combine")
    early_partials = combine_module.EARLY_PARTIALS
    ftz_exp2, lean_softmax = paged_attention_module.FTZ_EXP2, paged_attention_module.LEAN_SOFTMAX
    swiglu_approx = mgpu_module.SWIGLU_APPROX
    greedy_pick_module = importlib.import_module("jaxserve_kernels.greedy_pick")
    pick_wave_fit = greedy_pick_module.WAVE_FIT
    mgpu_min_rows = model_module.MGPU_MIN_ROWS
    seed_programs = residual_norm_module.SEED_PROGRAMS
    mgpu_wide_defaults = {ep: dict(tile) for ep, tile in mgpu_module.WIDE_TILES.items()}
    mgpu_widest_defaults = {ep: dict(tile) for ep, tile in mgpu_module.WIDEST_TILES.items()}
    greedy_pick = runner_module.GREEDY_PICK
    wide_options = runner_module.WIDE_DECODE_OPTIONS
    decode_options = runner_module.DECODE_OPTIONS
    decode_unroll = runner_module.DECODE_UNROLL
    half_batch_rows = runner_module.HALF_BATCH_ROWS
    split_two_stage_blocks = decode_attention_module.SPLIT_TWO_STAGE_BLOCKS
    fold_max_rows = model_module.FOLD_MAX_ROWS
    # The random params come in the model's default layout; the other is converted once if asked.
    default_layout = model_module.WEIGHT_LAYOUT
    norm_fold = model_module.NORM_IN_PROJECTION
    o_in_attention = model_module.O_IN_ATTENTION
    prefetch_kv = model_module.PREFETCH_KV
    kv_touch = model_module.KV_TOUCH
    kv_touch_module = importlib.import_module("jaxserve_kernels.kv_touch")
    kv_touch_defaults = {name: getattr(kv_touch_module, name) for name in ("ENTRIES", "NUM_WARPS")}
    layouts = {glue: "kn" if glue == "kn" else "nk" if glue in NK_TILINGS else default_layout
               for glue in args.glue}
    by_layout = {layout: model_module.convert_weight_layout(params, default_layout, layout)
                 for layout in set(layouts.values())}
    static_layout, params = next(iter(by_layout.items()))  # the static decoder's (it converts to [in, out])
    nk_defaults = {name: getattr(skinny_module, name) for name in
                   ("NK_BLOCK_N", "NK_BLOCK_K", "NK_GEMV", "NK_GEMV_BLOCK_N", "NK_GEMV_BLOCK_K",
                    "NK_GEMV_WARPS", "NK_TARGET_PROGRAMS", "NK_GEMV_TARGET_PROGRAMS", "NORM_GEMV_TILES",
                    "NK_GEMV_PREFETCH")}
    for batch in args.batches:
        steps = args.decode_steps
        width = args.table_pages or (args.context + steps) // 16 + 2
        impl = args.impl or default_attention_impl()
        bt = np.random.default_rng(batch).permutation(batch * width).reshape(batch, width).astype(np.int32)
        pos = np.full(batch, args.context, np.int32)
        sb = make_batch([SamplingParams(temperature=0.0)] * batch, batch)
        call = (np.zeros(batch, np.int32), pos, pos + steps, bt, sb, np.zeros(batch, np.int32), steps)
        # "table2048": the same rows in a server-wide block table (2048 pages: a 32k max_model_len
        # at page 16, what an engine with the model's default length hands every decode call);
        # the entries past the live pages are never read.
        wide_bt = np.pad(bt, ((0, 0), (0, max(0, 2048 - width))))
        calls = {glue: call if glue != "table2048" else call[:3] + (wide_bt,) + call[4:]
                 for glue in args.glue}
        # One runner per glue setting in this process (the model reads DECODE_GLUE when a runner
        # first traces), timed in alternating rounds: the same code reads +-10% from one process
        # to the next on the device, so only an interleaved comparison resolves a few percent.
        runners, logprobs = {}, {}
        def apply_glue(glue: str) -> None:
            """Set the module knobs a --glue setting changes (read when a runner traces)."""
            # "xla_combine": the glue kernels, but XLA's fusions for the attention's split merge;
            # "inkernel_combine": the merge inside the fused attention kernel (one launch);
            # "split_short": short tables split as long ones (no single-pass rule; before session 8).
            model_module.DECODE_GLUE = "xla" if glue == "xla" else "kernels"
            paged_attention_module.SINGLE_PASS_KEYS = 0 if glue == "split_short" else single_pass_keys
            # "qkv_*": the QKV projection's skinny matmul tiled otherwise (QKV_TILINGS).
            model_module.QKV_SKINNY_TILING = QKV_TILINGS.get(glue, {})
            # "attn_*": the fused decode attention's launch settings (ATTENTION_TUNINGS).
            model_module.ATTENTION_TUNING = ATTENTION_TUNINGS.get(glue, {})
            # "o_attn*": o_proj inside the fused attention (O_TUNINGS).
            model_module.O_IN_ATTENTION = {"no_o_attn": False}.get(glue, glue in O_TUNINGS or o_in_attention)
            for name, value in dict(o_defaults, **O_TUNINGS.get(glue, {})).items():
                setattr(decode_attention_module, name, value)
            model_module.SPLIT_COMBINE = {"xla_combine": "xla", "inkernel_combine": "inkernel"}.get(glue, "pallas")
            # "skinny256": steps of up to 256 rows through the skinny matmul and glue kernels
            # (row blocks of 64) instead of cuBLAS GEMMs and XLA's glue fusions.
            model_module.SKINNY_ROWS = {"skinny256": 256, "nk_xla": 0, **dict.fromkeys(MGPU_WIDE_TILINGS, 256)}.get(
                glue, skinny_rows)
            # "cublas128": steps of 65-128 rows on cuBLAS's GEMMs and XLA's glue (the route before
            # session 17), not the Mosaic GPU projections (model.MGPU_MAX_ROWS).
            # "cublas256": steps of 129-256 rows so (the default before session 21).
            # "before21": session 20's defaults (also Triton's path below 32 rows, the seed from each row's program).
            model_module.MGPU_MAX_ROWS = {"cublas128": 0, "nk_xla": 0, "cublas256": 128, "before21": 128}.get(
                glue, mgpu_max_rows)
            # "mgpu256_xgu*": gate_up + SwiGLU of steps past 128 rows on cuBLAS and XLA (model.XLA_GATE_UP_ROWS).
            # The other MGPU_WIDE_TILINGS: gate_up on Mosaic GPU at every row count (as they were measured).
            # "xgu64": also the 65-128-row steps' gate_up on cuBLAS.
            # "gate_up_cublas256": the 256-row steps' gate_up on cuBLAS (the default before session 31).
            model_module.XLA_GATE_UP_ROWS = (128 if glue.startswith("mgpu256_xgu") or glue == "gate_up_cublas256"
                                             else 0 if glue in MGPU_WIDE_TILINGS
                                             else 64 if glue == "xgu64" else xla_gate_up_rows)
            # "norm_warps1" ... "norm_warps8": the add + RMSNorm kernel's one program a row runs 1-8 warps.
            residual_norm_module.NUM_WARPS = {"norm_warps1": 1, "norm_warps2": 2, "norm_warps4": 4,
                                              "norm_warps8": 8}.get(glue, norm_warps)
            # "xla_pick": greedy tokens by XLA's argmax + log-softmax, not the greedy_pick kernel.
            runner_module.GREEDY_PICK = "xla" if glue == "xla_pick" else greedy_pick
            # "unroll<N>": N decode steps unrolled in the call's loop (runner.DECODE_UNROLL)
            runner_module.DECODE_UNROLL = int(glue[6:]) if glue.startswith("unroll") else decode_unroll
            # "halves", "halves_cc", "halves_lhs": each step as two half-batch chains (runner.HALF_BATCH_ROWS),
            # in XLA's default command-buffer order, its concurrent one or the latency-hiding scheduler's.
            runner_module.HALF_BATCH_ROWS = 2 if glue.startswith("halves") else half_batch_rows
            # "split_one_stage": split fused attention below TWO_STAGE_ROWS on one pipeline stage, whatever its
            # blocks a split (jaxserve_kernels.decode_attention.SPLIT_TWO_STAGE_BLOCKS 0: the rule before session 37).
            decode_attention_module.SPLIT_TWO_STAGE_BLOCKS = 0 if glue == "split_one_stage" else split_two_stage_blocks
            # "fold1" / "fold4": steps of up to 1 / 4 rows take the norm-folded kernels (model.FOLD_MAX_ROWS; 1, the
            # default, leaves 2-4-row steps on the partial sums' glue).
            model_module.FOLD_MAX_ROWS = {"fold1": 1, "fold4": 4}.get(glue, fold_max_rows)
            # "prefetch_kv" / "no_prefetch_kv": the one-row QKV projection reads the attention's pages ahead of it
            # (model.PREFETCH_KV), or not.
            model_module.PREFETCH_KV = {"prefetch_kv": True, "no_prefetch_kv": False}.get(glue, prefetch_kv)
            # "kv_touch*": each layer of the accumulating glue reads its attention's pages first, in a kernel that
            # depends only on the layer's input (model.KV_TOUCH); "_cc": with the command buffer's concurrent
            # scheduling (so it may run beside the norm and QKV); "_e2" / "_e8" / "_w4": the read-ahead kernel's
            # table entries a program / warps; "kv_touch_early*": read after the layer before's attention
            # (KV_TOUCH_TUNINGS, jaxserve_kernels.kv_touch).
            touch_mode, touch_settings = KV_TOUCH_TUNINGS.get(glue, (kv_touch, {}))
            model_module.KV_TOUCH = touch_mode
            for name, value in dict(kv_touch_defaults, **touch_settings).items():
                setattr(kv_touch_module, name, value)
            # "wide_cublaslt": the wide (cuBLAS) decode compile with cuBLASLt's algorithms too.
            # "cb_*": how XLA orders a command buffer's kernels (xla_gpu_command_buffer_scheduling_mode:
            # serialized, concurrent where the data allows, or the latency-hiding scheduler's order);
            # "xla_pdl_off": XLA's programmatic dependent launches off. Both compiles get them.
            concurrent = glue in KV_TOUCH_TUNINGS and "_cc" in glue
            cb_options = CB_OPTIONS.get("cb_concurrent" if concurrent else glue, {})
            runner_module.WIDE_DECODE_OPTIONS = (dict(wide_options, xla_gpu_enable_cublaslt=True)
                                                 if glue == "wide_cublaslt" else
                                                 dict(wide_options, **WHILE_GRAPHS) if glue == "while_graphs"
                                                 else dict(wide_options, **cb_options))
            # "while_graphs": XLA's command buffers also over the decode loop itself (one graph a call,
            # not one a step) and over graphs of any size (runner.DECODE_OPTIONS, WIDE_DECODE_OPTIONS).
            runner_module.DECODE_OPTIONS = (WHILE_GRAPHS if glue == "while_graphs"
                                            else dict(decode_options, **cb_options))
            # "with_logprobs": the chosen tokens' log-probabilities computed (a request asked;
            # the greedy pick then sums an exponential an element), before session 12 the only step.
            logprobs[glue] = glue == "with_logprobs"
            # "nk*": projection weights [out, in] through the skinny matmul's [N, K] tiles; "kn":
            # [in, out] (the default before session 14); the rest: the model's default layout.
            model_module.WEIGHT_LAYOUT = layouts[glue]
            # "norm_fold" / "no_norm_fold": one-row steps fold each add + RMSNorm into the
            # projection after it (model.NORM_IN_PROJECTION), or not.
            model_module.NORM_IN_PROJECTION = {"norm_fold": True, "no_norm_fold": False}.get(glue, norm_fold)
            for name, value in dict(nk_defaults, **NK_TILINGS.get(glue, {})).items():
                setattr(skinny_module, name, value)
            model_module.DECODE_PROJECTIONS = "xla" if glue == "nk_xla_glue" else "pallas"
            # "skinny_triton": the 32-64-row projections on Triton's tensor-core path (the default
            # before session 16's call 5).
            model_module.SKINNY_BACKEND = ("mgpu" if glue in MGPU_TILINGS or glue in MGPU_WIDE_TILINGS
                                           else "triton" if glue == "skinny_triton" else skinny_backend)
            mgpu_module.TILES = {ep: dict(tile) for ep, tile in {**mgpu_defaults, **MGPU_TILINGS.get(glue, {})}.items()}
            # "pdl" / "no_pdl": the Mosaic GPU projections as programmatic dependent launches, or not
            # (jaxserve_kernels.skinny_matmul_mgpu.PDL).
            mgpu_module.PDL = {"pdl": True, "no_pdl": False}.get(glue, mgpu_pdl)
            # "accumulate" / "no_accumulate": o, down and QKV add their K splits into a float32
            # residual stream / QKV accumulator in place (model.ACCUMULATE), or write partial sums.
            model_module.ACCUMULATE = {"accumulate": True, "no_accumulate": False,
                                       "mgpu256_xgu_partials": False}.get(glue, accumulate)
            # "greedy_head" / "no_greedy_head": greedy steps' tokens from the LM head's argmax kernel, no
            # logits (model.GREEDY_HEAD, session 23), or XLA's GEMM + the greedy pick; "greedy_head256": the
            # head up to 256 rows (model.GREEDY_HEAD_ROWS; all rows in one program a weight block).
            model_module.GREEDY_HEAD, model_module.GREEDY_HEAD_ROWS = {
                "greedy_head": (True, greedy_head[1]), "no_greedy_head": (False, greedy_head[1]),
                "greedy_head256": (True, 256)}.get(glue, greedy_head)
            # "head_b<N>": the greedy LM head's programs over N vocabulary rows (skinny_matmul_mgpu.ARGMAX_TILE)
            mgpu_module.ARGMAX_TILE = dict(argmax_tile, **({"block_n": int(glue[6:])} if glue.startswith("head_b")
                                                           else {}))
            # "exit_read_only": each Mosaic GPU projection waits only for its output copy's shared-memory
            # reads before it exits, not for the writes (jaxserve_kernels.skinny_matmul_mgpu.EXIT_READ_ONLY).
            mgpu_module.EXIT_READ_ONLY = True if glue == "exit_read_only" else exit_read_only
            # "rope_joint" / "rope_default": the fused attention's RoPE with its matrix loaded and the new key
            # rotated in the queries' product (jaxserve_kernels.decode_attention.ROPE_JOINT, session 24: the default
            # below TWO_STAGE_ROWS), or the matrix built in each program and two products.
            decode_attention_module.ROPE_JOINT = {"rope_joint": True, "rope_default": False}.get(glue, rope_joint)
            # "early_gather" / "no_early_gather": the fused attention's first key block gathered before its QKV
            # loads, RoPE and cache write (jaxserve_kernels.decode_attention.EARLY_GATHER), or in the loop after them.
            decode_attention_module.EARLY_GATHER = {"early_gather": True, "no_early_gather": False}.get(
                glue, early_gather)
            # "rope_broadcast" / "rope_concat": how the RoPE tables fill both halves (jaxserve.model.ROPE_REPEAT).
            model_module.ROPE_REPEAT = {"rope_broadcast": "broadcast", "rope_concat": "concat"}.get(glue, rope_repeat)
            # "argmax_merge" / "argmax_merge_xla": the greedy head's block maxima merged by
            # jaxserve_kernels.greedy_pick.pick_blocks or by XLA's argmax (jaxserve_kernels.skinny_matmul_mgpu.ARGMAX_MERGE).
            mgpu_module.ARGMAX_MERGE = {"argmax_merge": "pallas", "argmax_merge_xla": "xla"}.get(glue, argmax_merge)
            # "norm_scale_first" / "norm_scale_late": the add + RMSNorm kernel loads its weight before the row
            # or after the mean square (jaxserve_kernels.residual_norm.SCALE_FIRST).
            residual_norm_module.SCALE_FIRST = {"norm_scale_first": True, "norm_scale_late": False}.get(glue, scale_first)
            # "gemv_hoist" / "no_gemv_hoist": the one-row folded-norm projections load the norm's weight and
            # bias with their weight rows (jaxserve_kernels.skinny_matmul.NORM_GEMV_HOIST), or after the norm / products.
            skinny_module.NORM_GEMV_HOIST = {"gemv_hoist": True, "no_gemv_hoist": False}.get(glue, norm_gemv_hoist)
            # "early_partials": the split merge loads its partials with the lse's (jaxserve_kernels.split_combine.EARLY_PARTIALS).
            combine_module.EARLY_PARTIALS = {"early_partials": True, "no_early_partials": False}.get(glue, early_partials)
            # "ftz_exp2" / "lean_softmax" / "lean_ftz" / "no_lean_ftz": the decode kernels' softmax with one
            # ex2.approx.ftz an exponential, without the logit multiply and the select after the exponential,
            # both, or neither (jaxserve_kernels.paged_attention.FTZ_EXP2, LEAN_SOFTMAX; session 28).
            paged_attention_module.FTZ_EXP2 = {"ftz_exp2": True, "lean_ftz": True, "lean_softmax": False,
                                               "no_lean_ftz": False}.get(glue, ftz_exp2)
            paged_attention_module.LEAN_SOFTMAX = {"lean_softmax": True, "lean_ftz": True, "ftz_exp2": False,
                                                   "no_lean_ftz": False}.get(glue, lean_softmax)
            # "swiglu_approx" / "swiglu_exact": the Mosaic GPU gate_up's SwiGLU with approximate exp and
            # rsqrt or the accurate ones (jaxserve_kernels.skinny_matmul_mgpu.SWIGLU_APPROX; session 28).
            mgpu_module.SWIGLU_APPROX = {"swiglu_approx": True, "swiglu_exact": False}.get(glue, swiglu_approx)
            # "pick_wave_fit" / "pick_ceil": the greedy pick's chunks a row within, or just past, its programs
            # wanted (jaxserve_kernels.greedy_pick.WAVE_FIT; session 32).
            greedy_pick_module.WAVE_FIT = {"pick_wave_fit": True, "pick_ceil": False}.get(glue, pick_wave_fit)
            # "mgpu_min8" / "mgpu_min32": steps of 8-31 rows on the Mosaic GPU projections (model.MGPU_MIN_ROWS,
            # so with ACCUMULATE's glue; the default since session 21) or on Triton's path.
            model_module.MGPU_MIN_ROWS = {"mgpu_min8": 8, "mgpu_min32": 32, "before21": 32}.get(glue, mgpu_min_rows)
            # "seed_programs" / "no_seed_programs": the seeded norm writes QKV's accumulator from programs of
            # its own (jaxserve_kernels.residual_norm.SEED_PROGRAMS, the default since session 21) or from each row's.
            residual_norm_module.SEED_PROGRAMS = {"seed_programs": True, "no_seed_programs": False,
                                                  "before21": False}.get(glue, seed_programs)
            mgpu_module.WIDE_TILES = {ep: dict(tile) for ep, tile in
                                      {**mgpu_wide_defaults, **MGPU_WIDE_TILINGS.get(glue, {})}.items()}
            # The MGPU_WIDE_TILINGS name tiles for every step past 64 rows, laid over WIDE_TILES (as before
            # session 21's WIDEST_TILES for steps past 128).
            mgpu_module.WIDEST_TILES = (dict(mgpu_module.WIDE_TILES) if glue in MGPU_WIDE_TILINGS else
                                        {ep: dict(tile) for ep, tile in mgpu_widest_defaults.items()})
            # WIDE_OVERRIDES / WIDEST_OVERRIDES: single epilogues' tiles past 64 / 128 rows (session 31).
            for table, overrides in ((mgpu_module.WIDE_TILES, WIDE_OVERRIDES),
                                     (mgpu_module.WIDEST_TILES, WIDEST_OVERRIDES)):
                table.update({ep: dict(tile) for ep, tile in overrides.get(glue, {}).items()})
            if "swiglu" in WIDEST_OVERRIDES.get(glue, {}):
                model_module.XLA_GATE_UP_ROWS = 0

        for glue in args.glue:
            apply_glue(glue)
            runners[glue] = Runner(cfg, by_layout[layouts[glue]],
                                   num_pages=batch * width + 8, page_size=16, attention_impl=impl)
            time_decode_call(runners[glue], calls[glue], 2, logprobs[glue], args.blocked)
        rounds = {glue: [] for glue in args.glue}
        for _ in range(args.rounds):
            for glue, runner in runners.items():
                rounds[glue].append(time_decode_call(runner, calls[glue], args.reps, logprobs[glue], args.blocked))
        print(f"batch {batch}: engine decode compiled and timed {time.perf_counter() - t0:.1f} s", flush=True)
        for glue, runner in runners.items():
            apply_glue(glue)  # a profile or the HLO may trace the runner again
            tag = f"{impl}_b{batch}" + ("" if len(runners) == 1 else f"_{glue}")
            if args.profile:
                profile_decode(runner, calls[glue], args.profile, tag, logprobs=logprobs[glue])
            hlo = decode_hlo(runner, calls[glue], logprobs[glue])
            hist = loop_body_histogram(hlo)
            if args.dump_hlo:
                os.makedirs(args.dump_hlo, exist_ok=True)
                with open(os.path.join(args.dump_hlo, f"decode_{tag}.hlo.txt"), "w") as f:
                    f.write(hlo)
            system = f"jaxserve[{impl}]" + ("" if len(runners) == 1 else f"[glue={glue}]")
            rows.append(dict(system=system, batch=batch, step_ms=float(np.median(rounds[glue])),
                             rounds=[round(x, 4) for x in rounds[glue]], kernels=sum(hist.values()),
                             graphs=hlo.count("command_buffer"), hist=hist))
            print(json.dumps(rows[-1]), flush=True)
        del runners, runner

        if args.no_static:
            continue
        prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, size=(batch, args.context)).astype(np.int32)
        out_len = steps * 8
        model_module.WEIGHT_LAYOUT = static_layout
        prefill, decode = static_decoder(cfg, params, prompts, out_len)
        tok, caches = prefill(jnp.asarray(prompts))
        jax.block_until_ready(decode(tok, caches))
        print(f"batch {batch}: static decoder compiled {time.perf_counter() - t0:.1f} s", flush=True)
        times = []
        for _ in range(max(3, args.reps // 3)):
            t = time.perf_counter()
            jax.block_until_ready(decode(tok, caches))
            times.append(time.perf_counter() - t)
        hlo = decode.lower(tok, caches).compile().as_text()
        hist = loop_body_histogram(hlo)
        rows.append(dict(system="static", batch=batch, step_ms=float(np.median(times)) / (out_len - 1) * 1e3,
                         kernels=sum(hist.values()), graphs=hlo.count("command_buffer"), hist=hist))
        print(json.dumps(rows[-1]), flush=True)
        del caches, tok
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--variants", nargs="+", default=["default", "graphs"], choices=sorted(VARIANTS))
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternating timing rounds of the --glue runners (the step is their median)")
    ap.add_argument("--blocked", action="store_true",
                    help="wait on every call (the timing before session 13: adds a call's dispatch and "
                         "result transfer to its steps); default: calls back to back, one wait")
    ap.add_argument("--glue", nargs="+", default=["kernels"], choices=["kernels", "xla", "xla_combine", "inkernel_combine",
                                                             "split_short", "skinny256", "norm_warps1", "norm_warps2", "norm_warps4", "norm_warps8", "xla_pick",
                                                             "wide_cublaslt", "with_logprobs", "table2048", *QKV_TILINGS,
                                                             *ATTENTION_TUNINGS, *O_TUNINGS, "no_o_attn",
                                                             "kn", "norm_fold", "no_norm_fold", *NK_TILINGS, *MGPU_TILINGS, *MGPU_WIDE_TILINGS, *WIDE_OVERRIDES, *WIDEST_OVERRIDES, "gate_up_cublas256", "cublas128",
                                                             "skinny_triton", "pdl", "no_pdl", "accumulate",
                                                             "no_accumulate", "exit_read_only", "seed_programs",
                                                             "no_seed_programs", "mgpu_min8", "mgpu_min32", "cublas256",
                                                             "before21", "xgu64", "while_graphs", "greedy_head", "no_greedy_head",
                                                             "greedy_head256", "rope_joint", "rope_default",
                                                             "early_gather", "no_early_gather", "argmax_merge",
                                                             "argmax_merge_xla", "norm_scale_first", "norm_scale_late",
                                                             "gemv_hoist", "no_gemv_hoist", "early_partials",
                                                             "no_early_partials", "rope_broadcast", "rope_concat",
                                                             "ftz_exp2", "lean_softmax", "lean_ftz", "no_lean_ftz",
                                                             "swiglu_approx", "swiglu_exact", "pick_wave_fit", "pick_ceil", *CB_OPTIONS,
                                                             "head_b112", "head_b120", "head_b136", "head_b192", "head_b256",
                                                             "unroll2", "unroll4", "unroll8", "halves", "split_one_stage", "fold1", "fold4", "prefetch_kv",
                                                             "no_prefetch_kv", *KV_TOUCH_TUNINGS],
                    help="decode glue settings compared in one process (jaxserve.model.DECODE_GLUE)")
    ap.add_argument("--impl", default=None, choices=["pallas", "pallas-unfused", "reference"],
                    help="attention/scatter implementation of the engine (default: pallas on GPU)")
    ap.add_argument("--no-static", action="store_true", help="time the engine only (the static decoder compiles slowly)")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--shape", default="0.5B", choices=list(QWEN25_SHAPES),
                    help="the model's layer shapes (Qwen2.5)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--table-pages", type=int, default=None,
                    help="block-table width in pages (default: just the context); a server's max_model_len sets it")
    ap.add_argument("--profile", default=None, help="trace the engine's decode calls here and print GPU time per kernel")
    ap.add_argument("--dump-hlo", default=None, help="write each engine decode call's compiled HLO text here")
    args = ap.parse_args()
    if args.child:
        run_variant(args)
        return
    results = []
    for v in args.variants:
        extra = VARIANTS[v]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra if isinstance(extra, dict) else {}))
        if isinstance(extra, str):
            env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batches", *map(str, args.batches),
               "--context", str(args.context), "--decode-steps", str(args.decode_steps), "--reps", str(args.reps),
               "--rounds", str(args.rounds), "--glue", *args.glue, "--shape", args.shape, "--layers", str(args.layers)] \
            + (["--tiny"] if args.tiny else []) + (["--no-static"] if args.no_static else []) \
            + (["--impl", args.impl] if args.impl else []) \
            + (["--dump-hlo", args.dump_hlo] if args.dump_hlo else []) \
            + (["--table-pages", str(args.table_pages)] if args.table_pages else []) \
            + (["--blocked"] if args.blocked else []) \
            + (["--profile", args.profile] if args.profile else [])
        print(f"== variant {v}: {extra!r}", flush=True)
        # Relay the child's lines as they come: a variant that hangs must still show how far it got.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if not line.startswith('{"'):  # a result; a jaxpr in a traceback starts with "{ lambda"
                print("   ", line.rstrip()[:300], flush=True)
                continue
            results.append(dict(json.loads(line), variant=v))
            r = results[-1]
            print(f"{v:16s} {r['system']:18s} batch {r['batch']:4d} step {r['step_ms']:.3f} ms "
                  f"kernels {r['kernels']} graphs {r['graphs']}", flush=True)
            print("   ", json.dumps(dict(sorted(r["hist"].items(), key=lambda kv: -kv[1]))), flush=True)
        proc.wait()
    lines = ["| variant | system | batch | step ms | kernels in loop body | command_buffer mentions |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['system']} | {r['batch']} | {r['step_ms']:.3f} | {r['kernels']} | {r['graphs']} |"
              for r in results]
    print("\n".join(lines))
    for r in results:
        print(r["variant"], r["system"], r["batch"], json.dumps(dict(sorted(r["hist"].items(), key=lambda kv: -kv[1]))))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_step.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
