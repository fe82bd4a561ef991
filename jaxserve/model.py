"""The Qwen2 decoder as Flax modules, with attention served either densely or from KV pages.

Owns the numerics of one forward pass: embeddings, RMSNorm, fused QKV projection with bias,
RoPE, grouped-query attention, fused gate/up SwiGLU MLP, final norm, tied or untied LM head.
It never decides which request runs, never allocates pages: the caller hands it the slot
mapping and page tables (``PagedAttention``) and gets the updated KV pages back.

Weights are stored fused (one ``qkv_proj`` and one ``gate_up_proj`` matrix per layer) because
each fused matrix is one kernel launch in the decode step instead of three or two; the
Hugging Face names are restored only at the checkpoint boundary (``weights.py``).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import types
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.lora import lora_delta
from jaxserve.quantization import FP8, SCALE as QUANT_SCALE

KVCache = tuple[tuple[jax.Array, jax.Array], ...]
"""Per layer ``(k_pages, v_pages)``, each ``[kv_heads, num_pages, page_size, head_dim]``."""


@flax.struct.dataclass
class PagedAttention:
    """Where this step's tokens live in the KV pages and what they may attend to.

    Shapes (``B`` rows of ``S`` query tokens, ``S == 1`` for decode):
      slot_mapping ``[B, S]`` physical slot of each new token (negative: padding, not written);
      block_tables ``[B, max_pages]`` pages of each row; lengths ``[B]`` tokens of each row
      after this step (0: padding row); q_start ``[B]`` position of each row's first query token.
    """

    slot_mapping: jax.Array
    block_tables: jax.Array
    lengths: jax.Array
    q_start: jax.Array
    # "pallas": the kernels (compiled on GPU, interpreted on CPU), decode through the fused
    # RoPE + cache write + attention kernel; "pallas-unfused": the same with RoPE, scatter and
    # attention as separate steps (for comparison); "reference": the kernels' jnp twins.
    impl: str = flax.struct.field(pytree_node=False, default="pallas")
    # Decode on the fused kernel: only the first this many rows are real (the rest padding, discarded): their
    # attention alone runs, split as a call of that many rows would be (`fused_decode_attention`'s live_rows).
    # None: every row. The other impls compute every row.
    live_rows: int | None = flax.struct.field(pytree_node=False, default=None)


# How `rope_tables` fills both halves from its half tables: "broadcast" (cos and sin of the half angles
# broadcast into both: XLA runs the two as one loop fusion) or "concat" (the angles concatenated with
# themselves first: two concatenate fusions, 1.4 µs each). Same bits. H200, session 26 (one process,
# bench/results/decode_step.md): one launch fewer a step, GPU busy -2 to -3 µs a step, the 64-row step
# 0.824 against 0.827 ms, 1 and 128 rows a tie. Read when a step is traced.
ROPE_REPEAT = os.environ.get("JAXSERVE_ROPE_REPEAT", "broadcast")


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     max_position_embeddings: int = 32768) -> tuple[np.ndarray, float]:
    """(inverse frequencies ``[head_dim // 2]`` float32, cos/sin factor) of the default RoPE or of
    ``scaling`` ("linear", "yarn"), as Hugging Face's ``modeling_rope_utils`` computes them. Built in
    numpy: constants of the traced step, not kernels of it.

    Example:
        >>> inv, scale = rope_frequencies(8, 10000.0, RopeScaling("yarn", 4.0, 64), 256)
        >>> inv.shape, round(scale, 4)
        ((4,), 1.1386)
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
    pos_freqs = (np.float32(theta) ** exponents).astype(np.float32)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32), 1.0
    factor = scaling.factor
    original = scaling.original_max_position_embeddings or max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.attention_factor
    if attention is None:
        attention = (mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
                     if scaling.mscale and scaling.mscale_all_dim else mscale(factor))

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: the dimension keeps its frequency (extrapolation)
    # In float32 throughout, as transformers: the interpolated frequencies as 1 / (factor * base ** e).
    interpolated = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (interpolated * (1 - keep) + inv_freq * keep).astype(np.float32), float(attention)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None,
                max_position_embeddings: int = 32768) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[..., head_dim]`` in float32, in the half-split layout of Hugging Face's Qwen2;
    with ``scaling`` (a long-context checkpoint's RoPE scaling), its frequencies and factor.

    Example:
        >>> cos, sin = rope_tables(jnp.array([0, 3]), 8, 10000.0)
        >>> cos.shape, float(cos[0, 5]), float(sin[0, 1])
        ((2, 8), 1.0, 0.0)
    """
    inv_np, attention = rope_frequencies(head_dim, theta, scaling, max_position_embeddings)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_np)
    if ROPE_REPEAT == "broadcast":
        def repeat(half: jax.Array) -> jax.Array:
            lead = half.shape[:-1]
            return jnp.broadcast_to(half[..., None, :], (*lead, 2, half.shape[-1])).reshape(*lead, head_dim)

        cos, sin = repeat(jnp.cos(freqs)), repeat(jnp.sin(freqs))
    else:
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention != 1.0:  # YaRN scales q and k both, so the logits by its square
        cos, sin = cos * attention, sin * attention
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, S, heads, D]`` by cos/sin ``[B, S, D]``; computed in float32."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reference attention over the step's own tokens: ``q [B,S,H,D]``, ``k/v [B,S,KVH,D]``.

    Token ``i`` sees tokens ``j <= i`` with ``j < lengths[b]`` (right padding).
    """
    b, s, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, s, kvh, h // kvh, d).astype(jnp.float32)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32)) * (d ** -0.5)
    idx = jnp.arange(s)
    mask = (idx[None, :] <= idx[:, None])[None] & (idx[None, None, :] < lengths[:, None, None])
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.isnan(probs), 0.0, probs)  # fully masked padding rows
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(jnp.float32))
    return out.reshape(b, s, h, d).astype(q.dtype)


ATTENTION_IMPLS = ("pallas", "pallas-unfused", "reference")


def _paged_ops(impl: str):
    """(scatter, decode attention, prefill attention) for ``impl``.

    Imported on first paged use so that dense use (training, parity checks) never loads Pallas.
    """
    from jaxserve_kernels.cache_scatter import cache_scatter, cache_scatter_reference
    from jaxserve_kernels.paged_attention import paged_attention, paged_attention_reference
    from jaxserve_kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_reference

    if impl in ("pallas", "pallas-unfused"):
        return cache_scatter, paged_attention, paged_prefill_attention
    if impl == "reference":
        return cache_scatter_reference, paged_attention_reference, paged_prefill_attention_reference
    raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def _fast_kernels(paged: PagedAttention | None) -> bool:
    """Whether this pass uses the decode-speed kernels (fused attention, skinny matmul)."""
    return paged is not None and paged.impl == "pallas"


# "xla" keeps XLA's fusions for the decode glue: the baseline that bench/decode_step.py's
# `xla_glue` variant measures the glue kernels against, in the same run.
DECODE_GLUE = os.environ.get("JAXSERVE_DECODE_GLUE", "kernels")
# How the fused decode attention merges its flash-decoding splits: "pallas" (one launch at any
# split count) or "xla" (XLA's fusions of the jnp merge), read when a step is traced.
SPLIT_COMBINE = os.environ.get("JAXSERVE_SPLIT_COMBINE", "pallas")
# Skinny-matmul tiling of the decode QKV projection (keyword arguments of
# `jaxserve_kernels.skinny_matmul.skinny_matmul`; empty: its defaults, a 7-way K split whose sum and bias
# are one more launch a layer). Read when a step is traced, so bench/decode_step.py can compare
# tilings in one process (`--glue qkv_unsplit ...`).
QKV_SKINNY_TILING: dict[str, int] = json.loads(os.environ.get("JAXSERVE_QKV_SKINNY_TILING", "{}"))
# Launch settings for the fused decode attention (`num_warps`, `num_stages`, `pages_per_block`,
# `num_splits`) over its defaults, for experiments (bench/decode_step.py --glue attn_*). Read when a
# step is traced.
ATTENTION_TUNING: dict[str, int] = json.loads(os.environ.get("JAXSERVE_ATTENTION_TUNING", "{}"))
# Passes of at most this many rows (decode steps, and prefill chunks under the "pallas" impl) run
# their projections as the skinny-matmul kernel (and decode steps, with DECODE_GLUE "kernels", the
# glue kernels); wider ones XLA's GEMMs. Default
# `jaxserve_kernels.skinny_matmul.MAX_ROWS` (64). Above it the Triton kernel tiles rows in blocks of 64;
# at batch 256 that lost to cuBLAS (session 9 on the H200: launches of 13.7 µs against 10.4 / 10.2
# / 4.7 for gate_up / down / o; bench/decode_step.py --glue skinny256). On Hopper in bf16 the
# Mosaic GPU projections raise the limit to MGPU_MAX_ROWS (`skinny_rows`). Read when a step is traced.
SKINNY_ROWS = int(os.environ.get("JAXSERVE_SKINNY_ROWS", "64"))
# How the decoder layers' projection weights are stored: "nk" (`[out, in]`, Hugging Face's and
# PyTorch's: each output's weights contiguous) or "kn" (`[in, out]`, Flax's Dense). "nk" since
# session 14: a one-row decode projection then streams whole weight rows (the skinny matmul's
# lane-wise path), batch-1 step 0.685 vs 0.755 ms on the H200, and wider steps and prefill (cuBLAS)
# are no slower (bench/results/decode_step.md). Params must match (`convert_weight_layout`;
# `jaxserve.weights` loads and saves in this layout). Read when a step is traced.
WEIGHT_LAYOUTS = ("kn", "nk")
WEIGHT_LAYOUT = os.environ.get("JAXSERVE_WEIGHT_LAYOUT", "nk")
if WEIGHT_LAYOUT not in WEIGHT_LAYOUTS:
    raise ValueError(f"JAXSERVE_WEIGHT_LAYOUT must be one of {WEIGHT_LAYOUTS}, got {WEIGHT_LAYOUT!r}")
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def check_weight_layout(params: dict, config: ModelConfig) -> None:
    """Refuse params whose projections are stored in the other layout than ``WEIGHT_LAYOUT``
    (Flax would name only a shape; this names the fix).

    Example:
        >>> cfg = ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> check_weight_layout({"layers_0": {"mlp": {"gate_up_proj": {"kernel": jnp.zeros((12, 4))}}}}, cfg)
    """
    up = params.get("layers_0", {}).get("mlp", {}).get("gate_up_proj", {}).get("kernel")
    if up is None:
        return
    inter, hidden = 2 * config.intermediate_size, config.hidden_size
    want = (inter, hidden) if WEIGHT_LAYOUT == "nk" else (hidden, inter)
    if tuple(up.shape) != want and tuple(up.shape) == want[::-1] and inter != hidden:
        other = "kn" if WEIGHT_LAYOUT == "nk" else "nk"
        raise ValueError(f"params' projection weights are stored {other!r} (gate_up kernel {tuple(up.shape)}), "
                         f"the model's WEIGHT_LAYOUT is {WEIGHT_LAYOUT!r}: convert them with "
                         f"jaxserve.model.convert_weight_layout(params, {other!r}, {WEIGHT_LAYOUT!r})")


# Decode projections of at most SKINNY_ROWS rows: "pallas" (the skinny-matmul kernel) or "xla"
# (XLA's dot, with the kernel's epilogues in jnp, so the glue kernels still consume them).
# Experimental (bench/decode_step.py --glue nk_xla_glue). Read when a step is traced.
DECODE_PROJECTIONS = os.environ.get("JAXSERVE_DECODE_PROJECTIONS", "pallas")
# Which kernel runs the skinny projections of decode steps of MGPU_MIN_ROWS to skinny_rows() rows ("nk"
# layout, bf16, rows a multiple of 8): "mgpu" (`jaxserve_kernels.skinny_matmul_mgpu`, TMA copies and WGMMA on
# Mosaic GPU) or "triton" (`jaxserve_kernels.skinny_matmul`'s tensor-core path, which every other row count
# keeps). Session 16 on the H200 (bench/results/decode_step.md): step 0.860 vs 0.916 ms at 64 rows,
# 0.819 vs 0.924 at 32, but 0.794 vs 0.767 at 16 (the partial sums' glue). With ACCUMULATE's glue
# the Mosaic GPU path wins below 32 rows too (session 21): 0.748 vs 0.767 ms at 8 rows, 0.757 vs
# 0.777 at 16, 0.762 vs 0.910 at 24. Read when a step is traced.
SKINNY_BACKENDS = ("triton", "mgpu")
SKINNY_BACKEND = os.environ.get("JAXSERVE_SKINNY_BACKEND", "mgpu")
if SKINNY_BACKEND not in SKINNY_BACKENDS:
    raise ValueError(f"JAXSERVE_SKINNY_BACKEND must be one of {SKINNY_BACKENDS}, got {SKINNY_BACKEND!r}")
MGPU_MIN_ROWS = 8
# Where the Mosaic GPU projections run (SKINNY_BACKEND "mgpu", a Hopper GPU, bf16, "nk" weights), decode
# steps of up to this many rows also take the skinny path (the fused glue, the projections on Mosaic
# GPU with `WIDE_TILES` past 64 rows, `WIDEST_TILES` past 128) instead of cuBLAS GEMMs. Session 17 on
# the H200 (bench/results/decode_step.md, calls 2-4): batch 128 step 1.018-1.043 vs 1.097-1.109 ms.
# At 256 rows with ACCUMULATE's glue (until session 31 with gate_up on cuBLAS, XLA_GATE_UP_ROWS): session 21, step
# 1.278 vs 1.327 ms on cuBLAS and XLA's glue everywhere (1.305 with the partial sums' glue; our gate_up
# alone 17.4 µs a layer against cuBLAS's 10.3 + 2.6 for SwiGLU, session 17). Prefill chunks keep
# SKINNY_ROWS (not measured past it). JAXSERVE_MGPU_MAX_ROWS=128 keeps 256-row steps on cuBLAS, 0 the
# skinny path to SKINNY_ROWS. Read when a step is traced and when a runner is built.
MGPU_MAX_ROWS = int(os.environ.get("JAXSERVE_MGPU_MAX_ROWS", "256"))
# In fused-glue decode steps of more than this many rows, gate_up (+ SwiGLU) runs as XLA's GEMM
# (cuBLAS: Runner.decode_fn gives these steps the wide compile) and one elementwise fusion while QKV,
# o and down stay on the skinny kernels (0: never). Session 18 (bench/results/decode_step.md): at 256
# rows our gate_up took 17.4 µs a layer against cuBLAS's 10.35 + 2.56 for SwiGLU, while our QKV, o
# and down beat cuBLAS's by ~3.3 µs a layer together; with ACCUMULATE's glue the step was -3.7%
# (session 21, above), so this was 128 until session 31, whose joint 128-row gate_up tile
# (`skinny_matmul_mgpu.WIDEST_TILES`) took 11.02 µs against cuBLAS's 9.69 + 2.60. bench/decode_step.py
# --glue gate_up_cublas256 is the route before. Read when a step is traced and when a runner is built.
XLA_GATE_UP_ROWS = int(os.environ.get("JAXSERVE_XLA_GATE_UP_ROWS", "0"))


# JAXSERVE_FP8_SKINNY=1: fp8 projections of at most SKINNY_ROWS rows (decode steps, short chunks) through the skinny
# matmul, which reads the float8 weights as stored and widens them in registers. Off by default: compiled on the H100
# (session 52) it is correct but slower than XLA's product of the upcast weights, which runs when it is off: a 7B
# decode step 5.05 against 3.68 ms at batch 1, 6.66 against 4.62 at 64 (bf16: 5.57 / 5.91;
# bench/results/quantization.md). Read when a step is traced.
FP8_SKINNY = os.environ.get("JAXSERVE_FP8_SKINNY", "0") == "1"


def skinny_rows(dtype: Any) -> int:
    """The most rows of a decode step that runs the skinny path (the fused decode glue, the
    skinny-matmul projections) for a model of this dtype; wider steps use XLA's GEMMs.

    Example:
        >>> skinny_rows(jnp.float32) == SKINNY_ROWS
        True
    """
    if DECODE_PROJECTIONS == "pallas" and _mgpu_runs(dtype):
        return max(SKINNY_ROWS, MGPU_MAX_ROWS)
    return SKINNY_ROWS


# One-row decode steps fold each sublayer's add + RMSNorm into the projection after it (qkv,
# gate_up: `jaxserve_kernels.skinny_matmul.skinny_matmul_norm`): 132 kernels a Qwen2.5-0.5B step instead of
# 180, batch-1 step 0.666 vs 0.685 ms on the H200 (bench/results/decode_step.md, session 14). Needs
# the "nk" layout's one-row path. JAXSERVE_NORM_IN_PROJECTION=0 turns it off. Read when a step is traced.
NORM_IN_PROJECTION = os.environ.get("JAXSERVE_NORM_IN_PROJECTION", "1") == "1"
# With the norms folded, o_proj also runs inside the fused attention kernel for tables of at most
# `jaxserve_kernels.paged_attention.SINGLE_PASS_KEYS` keys (`_fold_o_proj`): batch-1 step 0.604 vs 0.621 ms
# on the H200 (108 kernels, session 15). JAXSERVE_O_IN_ATTENTION=0 turns it off. Read when a step
# is traced.
O_IN_ATTENTION = os.environ.get("JAXSERVE_O_IN_ATTENTION", "1") == "1"
# With o_proj in the attention (`_fold_o_proj`), the norm-folded QKV projection before it also reads the
# layer's key and value pages its tables name (`skinny_matmul_norm(touch_pages=...)`, in programs of their
# own), so the attention's gather, the top stall of that kernel (Nsight Compute, session 42), finds them in
# L2 rather than in HBM, where the step's weights evicted them. H200, session 42 (bench/results/decode_step.md):
# attention 5.84 -> 5.46 µs, QKV 2.60 -> 2.71, batch-1 step 0.553 -> 0.546 ms. JAXSERVE_PREFETCH_KV=0 turns it
# off. Read when a step is traced.
PREFETCH_KV = os.environ.get("JAXSERVE_PREFETCH_KV", "1") == "1"
# Decode steps of up to this many rows take the one-row step's kernels (norms folded into QKV and gate_up,
# o_proj in the attention for short tables, down_proj and o_proj on the lane-wise path), each program
# multiplying the weights it loads by every row (`skinny_matmul_norm`, `skinny_matmul(..., gemv=True)` take
# up to 4 rows). 1 by default: over 4 rows that route lost badly on the H200 (session 38,
# bench/results/decode_step.md: the 4-row step 1.383 against 0.710 ms for the partial sums' glue, 2 rows
# 0.817 against 0.712; per launch the attention with o_proj 19.3 µs, every row's attention redone per block
# of o's rows, against 5.0 + 2.6, gate_up 17.6 against ~5, down_proj 12.5): its per-row lane reductions
# and redone attention cost more than the launches it saves. Kept, tested, as the measured alternative.
# JAXSERVE_FOLD_MAX_ROWS sets it; read when a step is traced.
FOLD_MAX_ROWS = int(os.environ.get("JAXSERVE_FOLD_MAX_ROWS", "1"))


# The norm-folded path's other projections (o_proj where the attention does not take it, down_proj): the
# lane-wise path for all its rows, whose few K splits the next `skinny_matmul_norm` adds.
FOLDED_TILING = {"gemv": True}


def _fold_norms(x: jax.Array) -> bool:
    """Whether this fused-glue step folds its norms into the projections (see NORM_IN_PROJECTION)."""
    sm = importlib.import_module("jaxserve_kernels.skinny_matmul")  # the package exports a function of that name

    rows = x.shape[0] * x.shape[1]
    return (NORM_IN_PROJECTION and WEIGHT_LAYOUT == "nk" and DECODE_PROJECTIONS == "pallas" and sm.NK_GEMV
            and 1 <= rows <= min(FOLD_MAX_ROWS, sm.NORM_GEMV_MAX_ROWS) and x.shape[-1] <= sm.NORM_GEMV_MAX_K)


def _xla_projection(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, epilogue: str,
                    nk: bool, round_product: bool = False) -> jax.Array:
    """``skinny_matmul``'s contract (float32 accumulation, its epilogues and roundings) as XLA ops.

    ``round_product``: the GEMM writes its product in x's dtype (half the bytes of float32 for the
    epilogue's fusion to read); the same values where the epilogue rounds the product first (SwiGLU).
    """
    from jaxserve_kernels.skinny_matmul import apply_epilogue

    y = jax.lax.dot_general(x, kernel, (((1,), (1 if nk else 0,)), ((), ())),
                            preferred_element_type=x.dtype if round_product else jnp.float32)
    return apply_epilogue(y.astype(jnp.float32), x.dtype, bias, epilogue)


@functools.cache
def _wgmma_device() -> bool:
    """Whether the default device runs the Mosaic GPU kernels: a Hopper GPU (compute capability 9.x:
    WGMMA, which Blackwell replaced) or the CPU, where they run in Mosaic GPU's interpreter."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return True
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.split(".")[0] == "9"


def _mgpu_runs(dtype: Any) -> bool:
    """Whether the Mosaic GPU projections serve a model of this dtype: SKINNY_BACKEND "mgpu", "nk"
    weights, bf16 (WGMMA operands), a Hopper GPU or the CPU's interpreter."""
    return (SKINNY_BACKEND == "mgpu" and WEIGHT_LAYOUT == "nk" and jnp.dtype(dtype) == jnp.bfloat16
            and _wgmma_device())


def _mgpu_projection(x: jax.Array, kernel: jax.Array, epilogue: str) -> bool:
    """Whether this skinny projection runs on Mosaic GPU (`_mgpu_runs`, at least MGPU_MIN_ROWS rows
    and a shape it takes); otherwise Triton's path, which runs anywhere."""
    from jaxserve_kernels.skinny_matmul_mgpu import supports

    rows = x.size // x.shape[-1]
    return (rows >= MGPU_MIN_ROWS and _mgpu_runs(x.dtype) and kernel.dtype == jnp.bfloat16
            and supports(rows, x.shape[-1], kernel.shape[0], epilogue))


def convert_weight_layout(params: dict, src: str, dst: str) -> dict:
    """The decoder layers' projection kernels transposed from layout ``src`` to ``dst`` (see
    ``WEIGHT_LAYOUT``); every other parameter as it is.

    Example:
        >>> p = {"layers_0": {"mlp": {"down_proj": {"kernel": jnp.zeros((4, 2))}}}}
        >>> convert_weight_layout(p, "kn", "nk")["layers_0"]["mlp"]["down_proj"]["kernel"].shape
        (2, 4)
    """
    for name, layout in (("src", src), ("dst", dst)):
        if layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"{name} must be a weight layout, one of {WEIGHT_LAYOUTS}, got {layout!r}")
    if src == dst:
        return params

    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        return {k: ({**v, "kernel": v["kernel"].T} if k in PROJECTIONS else convert(v))
                for k, v in tree.items()}

    return convert(params)


def _fused_glue(paged: PagedAttention | None, x: jax.Array) -> bool:
    """Whether this pass runs the decode glue as kernels: a decode step (one token a row) of
    at most ``skinny_rows(x.dtype)`` rows under "pallas".

    Then the projections that add into the residual return their K-split partial sums, and
    each sublayer starts with one ``jaxserve_kernels.residual_norm.add_rms_norm`` (sum, residual add,
    RMSNorm) instead of several XLA fusions; the MLP's SwiGLU runs inside the gate_up kernel.
    Wider steps keep XLA's GEMMs, which fold the residual adds into their epilogues.
    """
    if DECODE_GLUE != "kernels" or not _fast_kernels(paged) or x.shape[1] != 1:
        return False
    return x.shape[0] <= skinny_rows(x.dtype)


# Fused-glue decode steps whose every projection runs on Mosaic GPU keep the residual stream in
# float32, and o_proj and down_proj add their K splits straight into it (`skinny_matmul_mgpu`'s
# "accumulate" epilogue: a TMA reduction into the stream, in place); QKV adds its splits into an
# accumulator that its input norm starts at the bias (`add_rms_norm(..., seed=bias)`), which the
# fused attention reads as is. No norm kernel then reads a projection's partial sums, and no launch
# sums QKV's (`_accumulate_glue`). The residual in float32 is more exact than Hugging Face's bf16
# stream; the order of the splits' float32 adds varies from run to run (not bitwise reproducible).
# Session 20 on the H200 (bench/results/decode_step.md): step 0.807 against 0.845 ms at 64 rows,
# 0.770 / 0.802 at 32, 0.982 / 1.010 at 128 (180 kernels a step against 204). Read when a step is
# traced; JAXSERVE_ACCUMULATE=0 turns it off.
ACCUMULATE = os.environ.get("JAXSERVE_ACCUMULATE", "1") == "1"
# Experiment (session 54), off (""): on the accumulating glue (decode steps of 8+ rows), each layer's attention K/V
# pages are read first by a kernel of their own (`jaxserve_kernels.kv_touch.touch_pages`), so that with the command
# buffer's concurrent scheduling it runs beside other kernels and the attention then gathers from L2. "layer": the
# read waits for the layer's input (it may run beside the input norm and QKV: ~6.6 us at 256 rows, too short to
# read 25 MB); "early": for the previous layer's attention output (beside that layer's o_proj, MLP and this one's
# QKV, ~35 us, whose weights may evict part of what it read; layer 0 as "layer"). H100, session 54
# (bench/results/decode_step.md): "layer" cut the 256-row attention 15.0 -> 10.7 us, but its first read-ahead kernel
# took 23 us; session 55, a program reading 4 table entries with every load issued first: 14.3-14.8 us a layer, steps
# still +8-10% (256 rows 1.335 -> 1.445-1.466 ms, "early" 1.707; 64 rows 0.892 -> 0.907-0.938). Stays off.
# JAXSERVE_KV_TOUCH=layer / early; read when a step is traced.
_KV_TOUCH_ENV = os.environ.get("JAXSERVE_KV_TOUCH", "")
KV_TOUCH = {"0": "", "1": "layer"}.get(_KV_TOUCH_ENV, _KV_TOUCH_ENV)
if KV_TOUCH not in ("", "layer", "early"):
    raise ValueError(f"JAXSERVE_KV_TOUCH must be layer, early or empty, got {_KV_TOUCH_ENV!r}")
# Decode steps with LoRA rows take the accumulating glue too (session 55), their adapters' terms added into its
# float32 accumulators: QKV's after its norm seeds it, o_proj's and down_proj's into the stream before the product adds
# there; gate_up, whose SwiGLU needs the term first, runs without its epilogue and SwiGLU follows in XLA. Off: such
# steps run the plain path (separate norms and residual adds; H100, session 54, bench/results/lora.md: adapter rows at
# 0.46-0.50x of the base model's tokens/s). H100, session 55 (lora.md): a tie at 8 / 64 / 256 rows (0.46 / 0.46 / 0.49x
# either way): the adapters' own products are the cost. With the terms folded into its Mosaic GPU products (LORA_FOLD,
# whose shrink is then the cost) the glue wins: H100, session 59, a 64-row one-adapter step 1,502 against 1,616 µs of
# GPU time on the plain path (0.71x / 0.69x of the base tokens/s at 64 / 256 rows against 0.66x / 0.67x), so it is
# on. JAXSERVE_LORA_GLUE=0 turns it off; read when a step is traced.
LORA_GLUE = os.environ.get("JAXSERVE_LORA_GLUE", "1") == "1"
# Adapter terms of decode steps on the Pallas path (the glue's or the plain path's) as one launch each
# (`jaxserve_kernels.lora_matmul`: shrink, slot select and expand added into the projection's output or float32
# accumulator in place; down_proj's wider input two), gate_up's with its SwiGLU, where XLA ran a shrink, a select,
# an expand and an add a projection and SwiGLU apart (about 50 µs a layer at 64 rows on the H100, twice the layer).
# H100, session 56 (bench/results/lora.md): slower, adapter rows 0.36 / 0.41x of the base at 64 / 256 rows on the glue
# against 0.47 / 0.50x as now (each kernel 10-18 µs a launch, a chain of dependent L2 loads, where XLA's small
# products take ~2.9 µs), so it stays off. H200, session 57: with XLA's shrink product first (`lora_matmul.SHRINK`
# "xla") the kernels run 2.4-5.3 µs, but a reduce launch a shrink appears (likely XLA's split-K sum of that
# product): a tie (1,743 against 1,710 µs a 64-row step). JAXSERVE_LORA_KERNELS=1; read when a step is traced.
LORA_KERNELS = os.environ.get("JAXSERVE_LORA_KERNELS", "0") == "1"
# Decode steps of at most LORA_FOLD_ROWS rows add each adapter term inside the projection's own kernel, where XLA ran a
# shrink, a select, an expand and an add a projection. On Mosaic GPU (the engine's `LoraSlots` keep the stacks as the
# kernel reads them, `jaxserve.lora.fold_columns`): XLA's shrink over every slot's columns, written in bf16, and a
# select of the row's own, then the projection runs the expand as K steps after its own (`skinny_matmul_mgpu`'s
# `term`), on the plain path or the accumulating glue (LORA_GLUE). H100, session 59 (bench/results/lora.md), a 64-row
# one-adapter step: 1,616 µs of GPU time on the plain path and 1,502 on the glue against 1,841-1,868 for XLA's terms
# (session 58); 0.66-0.71x of the base tokens/s at 64 and 256 rows against 0.55-0.60x. On by default;
# JAXSERVE_LORA_FOLD=0 turns it off. Not applied under LORA_KERNELS, tensor parallelism or to fp8 weights. Read when a
# step is traced.
LORA_FOLD = os.environ.get("JAXSERVE_LORA_FOLD", "1") == "1"
# Where the stacks are not kept (no Mosaic GPU: another GPU, float32) LORA_FOLD_TRITON folds into Triton's
# `skinny_matmul` instead: one launch writes the rows' shrink over every slot (`skinny_matmul.lora_shrink`), and the
# projection selects each row's slot and expands into its sums. H100, session 58: 240 launches fewer a 64-row step, but
# 1,905 against 1,844-1,868 µs (Triton's projections 0.6-2.7 µs a layer slower than Mosaic GPU's, four shrink launches
# ~10 µs a layer), so it is off. JAXSERVE_LORA_FOLD_TRITON=1; read when a step is traced.
LORA_FOLD_TRITON = os.environ.get("JAXSERVE_LORA_FOLD_TRITON", "0") == "1"
# Wider steps add XLA's terms. (Mosaic GPU's fold wins at 256 rows too, session 59: 0.64x against 0.56x of the base
# tokens/s; session 58's Triton fold lost more there, 0.49x against 0.55x, Triton's gate_up 2.2x Mosaic GPU's.)
LORA_FOLD_ROWS = int(os.environ.get("JAXSERVE_LORA_FOLD_ROWS", "256"))


# Greedy steps of GREEDY_HEAD_MIN_ROWS-GREEDY_HEAD_ROWS rows (a multiple of 8) in which no request
# wants log-probabilities take their tokens from the tied LM head directly
# (`jaxserve_kernels.skinny_matmul_mgpu.argmax_matmul_mgpu`: each program keeps its block's row maxima; no logits
# written, no pick launch). Session 23 on the H200 (bench/results/decode_step.md): the 64-row step
# 0.785 against 0.791 ms (head 68.7 µs against the GEMM's 71.6 + the pick's 6.9); at 32 rows, where
# the logits path ends in XLA's argmax, not the pick kernel, 0.768 against 0.758; at 128 and 256 rows
# (64-row blocks: the 272 MB table streamed once a block) 5-80% slower in bench/lm_head.py. Read when a
# step is traced; JAXSERVE_GREEDY_HEAD=0 turns it off.
GREEDY_HEAD = os.environ.get("JAXSERVE_GREEDY_HEAD", "1") == "1"
GREEDY_HEAD_MIN_ROWS = 64
GREEDY_HEAD_ROWS = 64


def greedy_head_applies(config: ModelConfig, dtype: Any, rows: int) -> bool:
    """Whether a step of ``rows`` rows can take greedy tokens from the LM head (``greedy_tokens=True``):
    GREEDY_HEAD and its row range, tied embeddings (the table is the head's ``[N, K]`` weight, its
    rows a multiple of 8 for TMA), bf16 on Mosaic GPU.

    Example:
        >>> cfg = ModelConfig(64, 64, 128, 1, 2, 1, tie_word_embeddings=True)
        >>> greedy_head_applies(cfg, jnp.float32, 64), greedy_head_applies(cfg, jnp.bfloat16, 12)
        (False, False)
    """
    return (GREEDY_HEAD and config.tie_word_embeddings and not config.num_labels and config.vocab_size % 8 == 0
            and DECODE_PROJECTIONS == "pallas" and _mgpu_runs(dtype)
            and max(8, GREEDY_HEAD_MIN_ROWS) <= rows <= GREEDY_HEAD_ROWS and rows % 8 == 0)


def _accumulate_glue(paged: PagedAttention | None, x: jax.Array, cfg: ModelConfig, dtype: Any) -> bool:
    """Whether this pass runs ACCUMULATE's glue: a fused-glue decode step (``x`` the residual
    stream, ``dtype`` the model's) of MGPU_MIN_ROWS or more rows whose QKV, o and down the Mosaic
    GPU kernel takes, and gate_up too unless it runs on XLA (XLA_GATE_UP_ROWS); norms not folded."""
    from jaxserve_kernels.skinny_matmul_mgpu import supports

    rows = x.shape[0] * x.shape[1]
    if not (ACCUMULATE and DECODE_PROJECTIONS == "pallas" and _fused_glue(paged, jax.ShapeDtypeStruct(x.shape, dtype))
            and rows >= MGPU_MIN_ROWS and _mgpu_runs(dtype)):
        return False
    hidden, inter, attn = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim
    qkv = attn + 2 * cfg.num_key_value_heads * cfg.head_dim
    return (supports(rows, hidden, qkv, "accumulate") and supports(rows, attn, hidden, "accumulate")
            and (0 < XLA_GATE_UP_ROWS < rows or supports(rows, hidden, 2 * inter, "swiglu"))
            and supports(rows, inter, hidden, "accumulate"))


# Decode steps of 2 to MGPU_MIN_ROWS - 1 rows, and one-row steps whose norms do not fold into their projections
# (hidden > NORM_GEMV_MAX_K: Qwen2.5-1.5B and up), run padded to MGPU_MIN_ROWS rows (`decode_rows`; the engine
# pads the batch), on the Mosaic GPU projections with ACCUMULATE's glue, instead of on Triton's one-row or
# tensor-core path with the partial sums' glue. H200, session 39 (bench/results/decode_step.md): at 1024 keys the
# 8-row step is faster than the 1-row one at 1.5B (1.468 vs 1.615 ms), 3B (2.584 vs 2.675) and 7B (3.731 vs
# 4.141, 24 layers), and at 0.5B than 2 / 4 rows (0.715 vs 0.738 / 0.747 ms at 192 keys, session 38), while
# 0.5B's one-row step, norms folded, stays ahead (0.594); end to end (throughput.md run 45) -13% a step at 1.5B
# batch 1, -7 to -8% at 0.5B batch 2 / 4. Over long contexts, where padding would cut its rows' attention splits,
# a padded call runs its real rows' attention alone (PAD_LIVE_ROWS, run 47). A one-row step with adapter rows pads
# too where they take the glue with their terms folded (LORA_GLUE, LORA_FOLD): there the terms go inside its
# projections, where 0.5B's one-row path adds them as XLA's products (H100, session 60, bench/results/lora.md:
# 1,472 -> 1,062 µs of GPU time a token, one-adapter rows 681 -> 859 tokens/s). GPU only.
# JAXSERVE_PAD_SMALL_DECODE=0 turns it off; read when an engine is built.
PAD_SMALL_DECODE = os.environ.get("JAXSERVE_PAD_SMALL_DECODE", "1") == "1"
# Where padding would cut the rows' attention splits (long contexts), a padded call runs the attention of its real
# rows alone (their batch bucket's rows, split as their own call would be: `PagedAttention.live_rows`) instead of
# running unpadded (`Engine.decode_shape`). H200, 16k keys (bench/results/throughput.md run 47): 1.5B batch 1
# 1.556 against 1.710 ms a step unpadded, 0.5B batch 2 0.858 against 0.882. JAXSERVE_PAD_LIVE_ROWS=0 turns it off;
# read when an engine is built.
PAD_LIVE_ROWS = os.environ.get("JAXSERVE_PAD_LIVE_ROWS", "1") == "1"


def decode_rows(rows: int, cfg: ModelConfig, dtype: Any, impl: str = "pallas", adapters: bool = False) -> int:
    """The rows a decode step of ``rows`` sequences should run as (see PAD_SMALL_DECODE): ``rows``, or
    MGPU_MIN_ROWS where a small step is faster padded to it on the GPU; ``adapters``: a step with adapter rows.

    Example:
        >>> cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> decode_rows(3, cfg, jnp.float32)   # float32 (or the CPU): never padded
        3
    """
    if not (PAD_SMALL_DECODE and impl == "pallas" and 1 <= rows < MGPU_MIN_ROWS
            and jax.default_backend() == "gpu"):
        return rows
    glued_adapters = adapters and LORA_GLUE and lora_folds_on_mgpu(dtype)  # the route session 60 measured
    if rows == 1 and not glued_adapters and _fold_norms(jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), dtype)):
        return rows
    stream = jax.ShapeDtypeStruct((MGPU_MIN_ROWS, 1, cfg.hidden_size), jnp.float32)
    return MGPU_MIN_ROWS if _accumulate_glue(types.SimpleNamespace(impl=impl), stream, cfg, dtype) else rows


def _norm_stream(x: jax.Array, norm: tuple, dtype: Any, seed: jax.Array | None = None,
                 shrink: tuple | None = None, pending: PendingTerm | None = None,
                 zeros: int = 0) -> tuple[jax.Array, ...]:
    """The float32 stream ``x [B, S, N]`` (plus ``pending``, the down_proj term the layer before left: then in a new
    buffer) and it normed into ``dtype`` (``norm``: the folded RMSNorm's ``(None, scale, eps)``), and with ``seed``
    also QKV's float32 accumulator ``[B, S, N2]`` started at it (ACCUMULATE's glue); with ``shrink``
    (`_kernel_shrink`) the rows' own-slot LoRA shrink ``[B, S, T]`` of the normed rows; with ``zeros`` last a float32
    ``[B * S, zeros]`` of zeros (LORA_DOWN_SHRINK's accumulator)."""
    from jaxserve_kernels.residual_norm import add_rms_norm

    _, scale, eps = norm
    out = list(add_rms_norm(x.reshape(-1, x.shape[-1]), None, scale, eps=eps, out_dtype=dtype, seed=seed,
                            shrink=shrink, pending=None if pending is None else tuple(pending), zeros=zeros))
    zeroed = [out.pop()] if zeros else []  # rows as the down_proj kernel takes them
    return (*(o.reshape(*x.shape[:-1], -1) for o in out), *zeroed)


def _accumulate(x: jax.Array, kernel: jax.Array, acc: jax.Array, lora: LayerLora | None = None,
                projection: str = "", shrunk: jax.Array | None = None,
                leave: jax.Array | None = None) -> jax.Array | tuple[jax.Array, PendingTerm]:
    """``acc + x @ kernel.T`` (float32, in acc's buffer) on Mosaic GPU; ``x [B, 1, K]``, ``acc [B, 1, N]``. With
    ``lora`` (the accumulating glue's adapters, LORA_GLUE) each row's term of ``projection`` too: inside the kernel
    where the layer folds its terms with the stacks kept (`_glue_term`; ``shrunk``: its shrink, made by the norm
    before, `_kernel_shrink`), else XLA's (or LORA_KERNELS') added first. With ``leave`` (LORA_DOWN_SHRINK: a
    float32 ``[B, T]`` of zeros) the kernel adds only the shrink, into ``leave``, and ``(acc, the PendingTerm
    for the next norm)`` comes back."""
    from jaxserve_kernels.skinny_matmul_mgpu import skinny_matmul_mgpu

    rows = x.shape[0] * x.shape[1]
    if leave is not None:
        a, b = lora.weights[projection]
        columns = a.shape[0] * a.shape[1]
        out, t = skinny_matmul_mgpu(x.reshape(rows, x.shape[-1]), kernel, epilogue="accumulate",
                                    acc=acc.reshape(rows, acc.shape[-1]),
                                    shrink=(lora.folded[projection][0].astype(x.dtype), leave, columns))
        return out.reshape(*acc.shape), PendingTerm(t, b.reshape(columns, -1).astype(x.dtype), lora.slots, a.shape[1])
    term = _glue_term(x, lora, projection, shrunk)
    if term is None:
        acc = _add_lora(acc, x, lora, projection)
    out = skinny_matmul_mgpu(x.reshape(rows, x.shape[-1]), kernel, epilogue="accumulate",
                             acc=acc.reshape(rows, acc.shape[-1]), term=term)
    return out.reshape(*acc.shape)


class Linear(nn.Module):
    """``nn.Dense``'s math (its kernel stored as ``WEIGHT_LAYOUT`` says) that can run as the skinny-matmul kernel.

    ``fast=True`` (a pass under the "pallas" impl) sends inputs of at most ``SKINNY_ROWS`` rows
    (decode steps: ``skinny_rows(dtype)``) to the Pallas kernel: XLA streams the weights of
    a few-row product at a fraction of the HBM bandwidth (see that module). ``epilogue``
    ("partials", "swiglu"; see ``jaxserve_kernels.skinny_matmul.skinny_matmul``) is for the fused decode
    glue only, which guarantees the kernel runs; ``tiling`` overrides the kernel's tiling
    (``block_n``, ``block_k``, ``num_splits``, ...). With ``norm`` (_fold_norms) ``touch_pages`` goes to
    ``skinny_matmul_norm`` (PREFETCH_KV). ``lora`` (``(a, b, slots, folded, shrunk)``, LORA_FOLD's decode steps): each
    row's adapter term added inside the projection's kernel (`_folded_lora_projection`).
    """

    features: int
    use_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, fast: bool = False, epilogue: str = "none",
                 tiling: dict[str, int] | None = None, norm: tuple | None = None,
                 fused: Callable[[jax.Array], Any] | None = None, touch_pages: tuple | None = None,
                 lora: tuple | None = None):
        nk = WEIGHT_LAYOUT == "nk"
        shape = (self.features, x.shape[-1]) if nk else (x.shape[-1], self.features)
        # lecun_normal's fan-in is the kernel's second-to-last axis: `[in, out]`'s in.
        init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2) if nk else nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, shape, self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype) if self.use_bias else None
        if kernel.dtype == FP8:  # weight-only fp8 (`jaxserve.quantization`): the plain product, scaled per column
            if fused is not None or norm is not None or epilogue != "none":
                raise ValueError("quantized projections run the plain path (no fused decode glue)")
            scale = self.param(QUANT_SCALE, nn.initializers.ones, (self.features,), jnp.float32)
            x = x.astype(self.dtype)
            rows = x.size // x.shape[-1]
            if fast and FP8_SKINNY and DECODE_PROJECTIONS != "xla" and rows <= SKINNY_ROWS:
                from jaxserve_kernels.skinny_matmul import skinny_matmul

                out = skinny_matmul(x.reshape(rows, x.shape[-1]), kernel, bias, scale=scale, layout=WEIGHT_LAYOUT)
                return out.reshape(*x.shape[:-1], out.shape[-1])
            out = jax.lax.dot_general(x, kernel.astype(self.dtype), (((x.ndim - 1,), (1 if nk else 0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
            out = (out * scale).astype(self.dtype)
            return out if bias is None else out + bias
        if fused is not None:  # a kernel that does this product inside another; x gives only the shape
            return fused(kernel, bias)
        x = x.astype(self.dtype)
        rows = x.size // x.shape[-1]
        if lora is not None:  # (a, b, slots, folded, shrunk): each row's term inside the product (`_lora_folds`)
            return _folded_lora_projection(x, kernel, bias, epilogue, *lora)
        if norm is not None:  # x is the residual stream; see _fold_norms
            from jaxserve_kernels.skinny_matmul import skinny_matmul_norm

            partials, scale, eps = norm
            h, out = skinny_matmul_norm(x.reshape(rows, x.shape[-1]), partials, scale, kernel, bias, eps=eps,
                                        epilogue=epilogue, touch_pages=touch_pages)
            return h.reshape(x.shape), out.reshape(*x.shape[:-1], out.shape[-1])
        if fast:
            from jaxserve_kernels.skinny_matmul import skinny_matmul

            # Prefill chunks keep SKINNY_ROWS: the Mosaic GPU rows past it were measured on decode steps.
            decode = x.ndim >= 3 and x.shape[-2] == 1
            if rows <= (skinny_rows(self.dtype) if decode else SKINNY_ROWS):
                if DECODE_PROJECTIONS == "xla":
                    out = _xla_projection(x.reshape(rows, x.shape[-1]), kernel, bias, epilogue, nk)
                elif epilogue == "swiglu" and 0 < XLA_GATE_UP_ROWS < rows:
                    out = _xla_projection(x.reshape(rows, x.shape[-1]), kernel, bias, epilogue, nk,
                                          round_product=True)
                elif _mgpu_projection(x, kernel, epilogue):
                    from jaxserve_kernels.skinny_matmul_mgpu import skinny_matmul_mgpu

                    out = skinny_matmul_mgpu(x.reshape(rows, x.shape[-1]), kernel, bias, epilogue=epilogue)
                else:
                    out = skinny_matmul(x.reshape(rows, x.shape[-1]), kernel, bias, epilogue=epilogue,
                                        layout=WEIGHT_LAYOUT, **(tiling or {}))
                if epilogue == "partials":
                    return out
                return out.reshape(*x.shape[:-1], out.shape[-1])
        if epilogue != "none":
            raise ValueError(f"epilogue {epilogue!r} needs the skinny-matmul kernel (fast, rows <= skinny_rows(dtype))")
        out = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1 if nk else 0,)), ((), ())))
        return out if bias is None else out + bias


class RMSNorm(nn.Module):
    """RMSNorm; with ``fused=True`` it first adds ``partials`` (a projection's float32 K-split
    sums, ``[S, B, N]``) into ``x [B, 1, N]`` and returns ``(new residual, normed)`` from one
    kernel (``jaxserve_kernels.residual_norm``)."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, partials: jax.Array | None = None, fused: bool = False,
                 folded: bool = False):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        if folded:  # the projection after the norm computes it (_fold_norms): hand it what it needs
            return partials, scale, self.eps
        if fused:
            from jaxserve_kernels.residual_norm import add_rms_norm

            b, s, n = x.shape
            # A float32 stream (ACCUMULATE) is normed into the model's dtype.
            hidden, normed = add_rms_norm(x.reshape(b * s, n), partials, scale, eps=self.eps, out_dtype=self.dtype)
            return hidden.reshape(x.shape), normed.reshape(x.shape)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the activation dtype before the weight multiply; match it for parity.
        return scale * xf.astype(x.dtype)


def _attend_fused_decode(qkv, cos, sin, kv, paged: PagedAttention, cfg: ModelConfig, wo: jax.Array | None = None,
                         out_dtype: Any = None, after: jax.Array | None = None, shrink: tuple | None = None):
    """Decode: RoPE, the cache write and attention in one kernel, not six a layer; with ``wo``
    (_fold_o_proj) o_proj too, whose per-KV-head partials ``[kv_heads, B, hidden]`` it returns. ``after``: an
    array the attention waits for (KV_TOUCH's read-ahead; without o_proj only). ``shrink`` (`_kernel_shrink`;
    without o_proj only): o_proj's LoRA shrink too, a third result (None where the kernel cannot make it)."""
    from jaxserve_kernels.decode_attention import fused_decode_attention, fused_decode_attention_o

    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b = qkv.shape[0]
    args = (qkv.reshape(b, h + 2 * kvh, d), cos[:, 0], sin[:, 0], kv[0], kv[1], paged.block_tables,
            paged.lengths, paged.slot_mapping[:, 0])
    if wo is not None:
        out, k_pages, v_pages = fused_decode_attention_o(*args, wo)
    else:
        out, k_pages, v_pages, *t = fused_decode_attention(
            *args, combine=SPLIT_COMBINE, out_dtype=out_dtype, live_rows=paged.live_rows, after=after,
            shrink=shrink, **ATTENTION_TUNING)
        if shrink is not None:
            return out, (k_pages, v_pages), t[0]
    return out, (k_pages, v_pages)


def _touch_kv(x, kv, paged: PagedAttention) -> jax.Array | None:
    """KV_TOUCH's read-ahead of the pages ``kv`` (`touch_pages`), made to wait for ``x`` (a layer's input, or under
    "early" the layer before's attention output); None where the pool's shape does not suit the kernel."""
    from jaxserve_kernels.kv_touch import supports, touch_pages

    if not supports(kv[0]):
        return None
    return touch_pages(kv[0], kv[1], paged.block_tables, paged.lengths, after=x)


def _fold_o_proj(paged: PagedAttention, kv) -> bool:
    """Whether a norm-folded decode step (_fold_norms, so the "nk" layout) also runs o_proj
    inside the fused attention kernel (O_IN_ATTENTION): short tables only, since every block of o's
    rows redoes the attention (`jaxserve_kernels.decode_attention.fused_decode_attention_o`)."""
    from jaxserve_kernels.paged_attention import SINGLE_PASS_KEYS

    page_size = kv[0].shape[2]
    return O_IN_ATTENTION and paged.block_tables.shape[1] * page_size <= SINGLE_PASS_KEYS


def _attend(qkv, cos, sin, lengths, kv, paged: PagedAttention | None, cfg: ModelConfig):
    """RoPE, then dense attention over the step's own tokens, or scatter + paged attention."""
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b, s, _ = qkv.shape
    q = qkv[..., : h * d].reshape(b, s, h, d)
    k = qkv[..., h * d: (h + kvh) * d].reshape(b, s, kvh, d)
    v = qkv[..., (h + kvh) * d:].reshape(b, s, kvh, d)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if paged is None:
        return dense_causal_attention(q, k, v, lengths), kv
    scatter, decode, prefill = _paged_ops(paged.impl)
    from jaxserve_kernels.kv_dtype import to_pool

    # Saturated into an fp8 pool (`to_pool`): XLA's plain conversion would make an outlier NaN.
    k_pages, v_pages = scatter(kv[0], kv[1], to_pool(k.reshape(b * s, kvh, d), kv[0].dtype),
                               to_pool(v.reshape(b * s, kvh, d), kv[1].dtype), paged.slot_mapping.reshape(b * s))
    if s == 1:
        out = decode(q[:, 0], k_pages, v_pages, paged.block_tables, paged.lengths)[:, None]
    else:
        out = prefill(q, k_pages, v_pages, paged.block_tables, paged.q_start, paged.lengths)
    return out, (k_pages, v_pages)


def _kv_scales(cfg: ModelConfig, layer: int, kv) -> tuple[float, float] | None:
    """This layer's checkpoint KV scales where they apply: a paged pass over an fp8 pool (`ModelConfig.kv_scales`)."""
    if kv is None or cfg.kv_scales is None:
        return None
    from jaxserve_kernels.kv_dtype import is_fp8

    return cfg.kv_scales[layer] if is_fp8(kv[0].dtype) else None


def _scale_qkv(qkv: jax.Array, scales: tuple[float, float], cfg: ModelConfig) -> jax.Array:
    """QKV for a pool that stores K / k_scale and V / v_scale: K and V divided so, and q times k_scale, so that q . K
    over the stored keys is the logit q . K; the attention output then comes out divided by v_scale (`_unscale`).
    RoPE is linear, so scaling before it is scaling after it. In float32, back in qkv's dtype."""
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    k_scale, v_scale = scales
    column = np.concatenate([np.full(h * d, k_scale), np.full(kvh * d, 1 / k_scale),
                             np.full(kvh * d, 1 / v_scale)]).astype(np.float32)
    return (qkv.astype(jnp.float32) * column).astype(qkv.dtype)


def _unscale(out: jax.Array, scales: tuple[float, float] | None) -> jax.Array:
    return out if scales is None else (out.astype(jnp.float32) * scales[1]).astype(out.dtype)


class Attention(nn.Module):
    config: ModelConfig
    dtype: Any
    layer: int = 0  # this layer's index (its `ModelConfig.kv_scales`)

    @nn.compact
    def __call__(self, x, cos, sin, lengths, kv, paged: PagedAttention | None, glue: bool = False,
                 norm: tuple | None = None, accumulate: tuple | None = None, lora: tuple | None = None,
                 touched: jax.Array | None = None, pending: PendingTerm | None = None):
        """The attention sublayer's output ``[B, S, hidden]``, or with ``glue`` the o_proj's
        K-split partial sums ``[splits, B, hidden]``; and the KV pages. With ``norm`` (the input
        norm's ``(partials, scale, eps)``, _fold_norms) ``x`` is the residual stream before that
        norm, and the new residual comes back third. With ``accumulate`` (the input norm's
        ``(None, scale, eps)``, _accumulate_glue) ``x`` is the float32 residual stream before the
        norm, and ``(x + attention, kv)`` comes back. ``lora`` (`_layer_lora`; the plain path, or the accumulating
        glue under LORA_GLUE): each row's adapter terms added to QKV's and o_proj's outputs. ``touched``: KV_TOUCH's
        read-ahead of these pages, made earlier (the accumulating glue's attention waits for it). ``pending``: the
        layer before's down_proj term (LORA_DOWN_SHRINK), added by the input norm."""
        cfg = self.config
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, s, _ = x.shape
        fast = _fast_kernels(paged)
        qkv_proj = Linear((h + 2 * kvh) * d, True, self.dtype, name="qkv_proj")
        if accumulate is not None:
            def qkv_of(kernel, bias):  # the norm starts QKV's float32 accumulator at the bias
                nonlocal x  # with a pending term the stream comes back in a new buffer, o_proj's to add into
                x, normed, acc, *shrunk = _norm_stream(x, accumulate, self.dtype, seed=bias,
                                                       shrink=_kernel_shrink(lora, "qkv_proj", LORA_NORM_SHRINK),
                                                       pending=pending)
                return _accumulate(normed, kernel, acc, lora, "qkv_proj", *shrunk)

            scales = _kv_scales(cfg, self.layer, kv)
            if touched is None and KV_TOUCH:  # "layer", or layer 0 under "early"
                touched = _touch_kv(x, kv, paged)
            qkv = qkv_proj(x, fused=qkv_of)
            if scales is not None:
                qkv = _scale_qkv(qkv, scales, cfg)
            # With scaled pools the kernel's output is scaled after it: the shrink is XLA's, of the unscaled one.
            shrink = _kernel_shrink(lora, "o_proj", LORA_ATTENTION_SHRINK) if scales is None else None
            out, kv, *shrunk = _attend_fused_decode(qkv, cos, sin, kv, paged, cfg, out_dtype=self.dtype,
                                                    after=touched, shrink=shrink)
            out = _unscale(out, scales).reshape(b, s, h * d)
            o_proj = Linear(cfg.hidden_size, False, self.dtype, name="o_proj")
            return o_proj(out, fused=lambda kernel, _: _accumulate(out, kernel, x, lora, "o_proj", *shrunk)), kv
        fold_o = norm is not None and _fold_o_proj(paged, kv)
        if norm is not None:
            touch = (kv[0], kv[1], paged.block_tables) if PREFETCH_KV and fold_o else None
            x, qkv = qkv_proj(x, fast, norm=norm, touch_pages=touch)
        elif (folded := _fold(lora, "qkv_proj")) is not None:
            qkv = qkv_proj(x, fast, lora=folded)
        else:
            qkv = qkv_proj(x, fast, tiling=QKV_SKINNY_TILING)
            if lora is not None:
                qkv = _plus_lora(qkv, x.astype(self.dtype), lora, "qkv_proj", fast)
        scales = _kv_scales(cfg, self.layer, kv)
        if scales is not None:
            qkv = _scale_qkv(qkv, scales, cfg)
        o_proj = Linear(cfg.hidden_size, False, self.dtype, name="o_proj")
        if fold_o:
            # o_proj inside the attention kernel; its per-KV-head partials go to the next norm (o_proj is linear,
            # so the V scale multiplies the partials).
            partials, kv = o_proj(jax.ShapeDtypeStruct((b, s, h * d), self.dtype),
                                  fused=lambda wo, _: _attend_fused_decode(qkv, cos, sin, kv, paged, cfg, wo))
            return _unscale(partials, scales), kv, x
        if fast and s == 1:
            out, kv = _attend_fused_decode(qkv, cos, sin, kv, paged, cfg)
        else:
            out, kv = _attend(qkv, cos, sin, lengths, kv, paged, cfg)
        out = _unscale(out, scales).reshape(b, s, h * d).astype(self.dtype)
        if (folded := _fold(lora, "o_proj")) is not None:
            return o_proj(out, fast, lora=folded), kv
        if lora is not None:
            return _plus_lora(o_proj(out, fast), out, lora, "o_proj", fast), kv
        out = o_proj(out, fast, "partials" if glue else "none", tiling=FOLDED_TILING if norm is not None else None)
        return (out, kv, x) if norm is not None else (out, kv)


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, fast: bool = False, glue: bool = False, norm: tuple | None = None,
                 accumulate: tuple | None = None, lora: tuple | None = None):
        """``[B, S, hidden]``, or with ``glue`` the down_proj's K-split partials (see Attention;
        with ``norm``, ``(new residual, partials)``; with ``accumulate``, ``x + mlp`` in float32, and where down_proj
        leaves its adapters' term to the next norm (LORA_DOWN_SHRINK) ``(x + mlp without it, PendingTerm)``)."""
        inter = self.config.intermediate_size
        gate_up = Linear(2 * inter, False, self.dtype, name="gate_up_proj")
        down = Linear(self.config.hidden_size, False, self.dtype, name="down_proj")
        if accumulate is not None:
            zeros = lora.folded["down_proj"][0].shape[0] if _leaves_down_term(lora) else 0
            _, normed, *shrunk = _norm_stream(x, accumulate, self.dtype,
                                              shrink=_kernel_shrink(lora, "gate_up_proj", LORA_NORM_SHRINK),
                                              zeros=zeros)
            leave = shrunk.pop() if zeros else None  # the zeros down_proj's shrink adds into
            if lora is None:
                act = gate_up(normed, True, "swiglu")
            elif _glue_folds(lora):  # the term inside the kernel, before SwiGLU
                act = gate_up(normed, True, "swiglu", lora=_fold(lora, "gate_up_proj", *shrunk))
            elif LORA_KERNELS:  # the term, then SwiGLU, in one launch after gate_up's product
                act = _lora_swiglu_kernel(gate_up(normed, True), normed, lora)
            else:  # the adapters' term goes in before SwiGLU, which the kernel's epilogue would apply first
                h = gate_up(normed, True) + lora_delta(normed, *lora[0]["gate_up_proj"], lora[1])
                act = nn.silu(h[..., :inter]) * h[..., inter:]
            return down(act, fused=lambda kernel, _: _accumulate(act, kernel, x, lora, "down_proj", leave=leave))
        if norm is not None:
            x, act = gate_up(x, fast, "swiglu", norm=norm)
            return x, down(act, fast, "partials", tiling=FOLDED_TILING)
        if glue:
            return down(gate_up(x, fast, "swiglu"), fast, "partials")
        if (folded := _fold(lora, "gate_up_proj")) is not None:
            act = gate_up(x, fast, "swiglu", lora=folded)
            return down(act, fast, lora=_fold(lora, "down_proj"))
        h = gate_up(x, fast)
        if lora is not None and _lora_kernels(h, fast):
            act = _lora_swiglu_kernel(h, x.astype(self.dtype), lora)
        else:
            if lora is not None:
                h = h + lora_delta(x.astype(self.dtype), *lora[0]["gate_up_proj"], lora[1])
            act = nn.silu(h[..., :inter]) * h[..., inter:]
        if lora is not None:
            return _plus_lora(down(act, fast), act, lora, "down_proj", fast)
        return down(act, fast)


class DecoderLayer(nn.Module):
    """One decoder layer: ``(x, pending, kv) -> (x, pending, kv)``.

    ``pending`` is None except in the fused decode glue (``_fused_glue``), where the residual
    add of a layer's MLP is left to the next layer's (or the final) norm kernel: ``x`` is the
    residual stream before it, ``pending`` the down_proj's partial sums. Under ACCUMULATE's glue
    (``_accumulate_glue``) ``x`` is the float32 stream, complete (the projections add into it).
    """

    config: ModelConfig
    dtype: Any
    tp_axis: str | None = None  # see Qwen2ForCausalLM
    quantized: bool = False
    layer: int = 0  # this layer's index (its `ModelConfig.kv_scales`)

    @nn.compact
    def __call__(self, x, cos, sin, lengths, kv, paged, pending=None, lora=None, next_kv=None):
        """One decoder layer: ``(x, pending, kv)`` back, ``pending`` what the next layer takes (the glue's deferred
        partial sums; on the accumulating glue with KV_TOUCH "early", the read-ahead of ``next_kv``'s pages)."""
        eps = self.config.rms_norm_eps
        attn = Attention(self.config, self.dtype, self.layer, name="self_attn")
        mlp = MLP(self.config, self.dtype, name="mlp")
        input_norm = RMSNorm(eps, self.dtype, name="input_layernorm")
        post_norm = RMSNorm(eps, self.dtype, name="post_attention_layernorm")
        # Adapters' terms go between the plain path's products (or into the accumulating glue's sums: LORA_GLUE);
        # under tensor parallelism each sublayer's output is a partial sum the devices add before the residual add,
        # which the glue's deferred adds leave no room for.
        glue = lora is None and self.tp_axis is None and not self.quantized
        if _lora_glue(lora, self.tp_axis, self.quantized) and _accumulate_glue(paged, x, self.config, self.dtype):
            # x: the float32 stream; pending: KV_TOUCH "early"'s read-ahead of these pages, or the layer before's
            # down_proj term (LORA_DOWN_SHRINK), which the input norm adds
            term = pending if isinstance(pending, PendingTerm) else None
            x, kv = attn(x, cos, sin, lengths, kv, paged, accumulate=input_norm(x, folded=True),
                         touched=None if term is not None else pending, lora=lora, pending=term)
            x = mlp(x, accumulate=post_norm(x, folded=True), lora=lora)
            if isinstance(x, tuple):  # down_proj left its term to the next norm
                return *x, kv
            early = KV_TOUCH == "early" and next_kv is not None
            return x, _touch_kv(x, next_kv, paged) if early else None, kv
        if glue and _fused_glue(paged, x) and _fold_norms(x):
            partials, kv, x = attn(x, cos, sin, lengths, kv, paged, glue=True,
                                   norm=input_norm(x, pending, folded=True))
            x, pending = mlp(x, True, glue=True, norm=post_norm(x, partials, folded=True))
            return x, pending, kv
        if glue and _fused_glue(paged, x):
            x, h = input_norm(x, pending, fused=True)
            partials, kv = attn(h, cos, sin, lengths, kv, paged, glue=True)
            x, h = post_norm(x, partials, fused=True)
            return x, mlp(h, True, glue=True), kv
        attn_out, kv = attn(input_norm(x), cos, sin, lengths, kv, paged, lora=lora)
        x = x + self._all_reduce(attn_out)
        x = x + self._all_reduce(mlp(post_norm(x), _fast_kernels(paged), lora=lora))
        return x, None, kv

    def _all_reduce(self, partial: jax.Array) -> jax.Array:
        # o_proj and down_proj read only this device's heads / MLP columns (`jaxserve.tensor_parallel`).
        return partial if self.tp_axis is None else jax.lax.psum(partial, self.tp_axis)


class Qwen2ForCausalLM(nn.Module):
    """Qwen2 causal LM. ``dtype`` is both the parameter and the activation dtype.

    Dense use (training, reference, tests)::

        model = Qwen2ForCausalLM(cfg)
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        logits, _ = model.apply({"params": params}, tokens)        # [B, S, vocab]

    Paged use (the engine): pass ``positions``, the ``kv`` pages of every layer and a
    ``PagedAttention``; the new K/V are scattered into the pages, which come back updated.
    ``logits_at [B]`` projects only one position per row (the last prompt token in prefill).
    Logits come back in float32 unless ``logits_dtype`` says otherwise (None: the activation dtype).
    ``greedy_tokens=True`` (where ``greedy_head_applies``): each position's argmax token ``[B, S]``
    int32 instead, from the LM head itself. ``hidden_states=True``: ``(logits, hidden)`` in logits' place,
    ``hidden [B, S, hidden_size]`` the final norm's output at every position (the LM head's input;
    `jaxserve.pooling`). ``lora``: ``{"weights": {projection: (a, b)}, "slots": [B]}``, LoRA adapters and each
    row's slot (-1: none; `jaxserve.lora`): ``a`` and ``b`` each layer's ``[n, R, in]`` and ``[n, R, out]`` (a
    sequence of L arrays, as `LoraSlots` keeps them; one ``[L, ...]`` array works too, but the GPU then copies each
    layer's slice).
    ``input_embeds``: ``(embeds [B, S, hidden], where [B, S] bool)``, embeddings that replace the token embeddings where
    ``where`` is set (a prompt given as embeddings, vLLM's ``prompt_embeds``).

    Tensor parallelism (`jaxserve.tensor_parallel`): inside `jax.shard_map` over mesh axis ``tp_axis`` of
    ``tp_size`` devices, ``config`` is one device's share (`TensorParallel.local_config`) and so are the params;
    the sublayers' outputs are summed over the axis and the LM head's vocabulary slices gathered, so the logits
    come back whole on every device.
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    tp_axis: str | None = None
    tp_size: int = 1
    quantized: bool = False  # fp8 projection weights (`jaxserve.quantization`): the plain path

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                 lengths: jax.Array | None = None, kv: KVCache | None = None,
                 paged: PagedAttention | None = None,
                 logits_at: jax.Array | None = None,
                 logits_dtype: Any = jnp.float32,
                 greedy_tokens: bool = False, lora: dict | None = None,
                 hidden_states: bool = False,
                 input_embeds: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if lengths is None:
            lengths = jnp.full((b,), s, jnp.int32)
        if (kv is None) != (paged is None):
            raise ValueError("kv and paged must be given together")
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        x = embed(tokens)
        if input_embeds is not None:  # (embeds [B, S, hidden], where [B, S]): given embeddings replace the tokens'
            given, where = input_embeds
            x = jnp.where(where[..., None], given.astype(x.dtype), x)
        fused_glue, accumulate = _fused_glue(paged, x), _accumulate_glue(paged, x, cfg, self.dtype)
        if lora is not None or self.tp_axis is not None or self.quantized:  # the plain path (DecoderLayer's glue)
            fused_glue = False
            accumulate = accumulate and _lora_glue(lora, self.tp_axis, self.quantized)
        if accumulate:
            x = x.astype(jnp.float32)
        # Adapter terms inside the projection kernels (LORA_FOLD): Mosaic GPU's where the folded stacks are kept and the
        # step has its rows (the plain path's or the accumulating glue's projections), else Triton's only if asked.
        mgpu_fold = lora is not None and lora.get("folded") is not None and b >= MGPU_MIN_ROWS
        fold_lora = (lora is not None and self.tp_axis is None and not self.quantized and _lora_folds(x, paged)
                     and (mgpu_fold or (LORA_FOLD_TRITON and not accumulate)))
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        new_kv = []
        pending = None
        for i in range(cfg.num_hidden_layers):
            next_kv = None if kv is None or i + 1 == cfg.num_hidden_layers else kv[i + 1]
            x, pending, layer_kv = DecoderLayer(cfg, self.dtype, self.tp_axis, self.quantized, i, name=f"layers_{i}")(
                x, cos, sin, lengths, None if kv is None else kv[i], paged, pending,
                _layer_lora(lora, i, fold_lora), next_kv)
            new_kv.append(layer_kv)
        if isinstance(pending, PendingTerm):  # the last down_proj's term (LORA_DOWN_SHRINK)
            x = add_pending_term(x, pending)
        final_norm = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")
        hidden = None
        if fused_glue:  # one token a row: logits_at can only pick it
            _, x = final_norm(x, pending, fused=True)
            hidden = x
        elif hidden_states:  # every position normed (the norm is per position, so picking after it is the same)
            hidden = final_norm(x)
            x = hidden if logits_at is None else jnp.take_along_axis(
                hidden, logits_at[:, None, None].astype(jnp.int32), axis=1)
        else:
            if logits_at is not None:
                x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
            x = final_norm(x)
        new_kv = None if kv is None else tuple(new_kv)
        if self.tp_axis is not None and not cfg.num_labels:  # a classifier's few-label head is replicated: below
            return self._sharded_head(x, embed, hidden, hidden_states, logits_dtype, greedy_tokens), new_kv
        if greedy_tokens and _fast_kernels(paged):  # the caller checked greedy_head_applies: each row's argmax
            from jaxserve_kernels.skinny_matmul_mgpu import argmax_matmul_mgpu

            tokens = argmax_matmul_mgpu(x.reshape(-1, x.shape[-1]).astype(self.dtype), embed.embedding)
            return tokens.reshape(x.shape[:-1]), new_kv
        if cfg.num_labels:  # a classifier: its labels' logits (`jaxserve.pooling`)
            logits = nn.Dense(cfg.num_labels, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name="score")(x)
        elif cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                              name="lm_head")(x)
        # The "reference" impl runs no kernel: the argmax of the activation-dtype logits (the CPU's default engine ran
        # the head's kernel in Mosaic GPU's interpreter, 420 against 4 ms a 64-row step: structured.md session 55).
        if greedy_tokens:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), new_kv
        # ``logits_dtype=None`` keeps the activation dtype: the engine's greedy pick reads bf16
        # logits (half the bytes of a float32 copy, which a kernel's input would materialise).
        logits = logits if logits_dtype is None else logits.astype(logits_dtype)
        return ((logits, hidden) if hidden_states else logits), new_kv

    def _sharded_head(self, x, embed, hidden, hidden_states: bool, logits_dtype, greedy_tokens: bool):
        """The LM head under tensor parallelism: this device's vocabulary slice of the logits, gathered whole; with
        ``greedy_tokens`` each slice's best token and its logit, gathered (B x devices pairs, not B x vocab logits)."""
        cfg = self.config
        local = cfg.vocab_size // self.tp_size
        if cfg.tie_word_embeddings:  # the replicated embedding's rows of this device's slice
            rows = jax.lax.dynamic_slice_in_dim(embed.embedding, jax.lax.axis_index(self.tp_axis) * local, local)
            logits = jnp.dot(x.astype(self.dtype), rows.T.astype(self.dtype))
        else:
            logits = nn.Dense(local, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name="lm_head")(x)
        if greedy_tokens:
            best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            top = jnp.take_along_axis(logits, best[..., None], axis=-1)[..., 0]
            tops = jax.lax.all_gather(top, self.tp_axis)  # [devices, B, S]
            bests = jax.lax.all_gather(best + jax.lax.axis_index(self.tp_axis) * local, self.tp_axis)
            # The first device holding the maximum: its slice's tokens come first, so ties go to the lowest id, as
            # one argmax over the whole vocabulary.
            return jnp.take_along_axis(bests, jnp.argmax(tops, axis=0)[None], axis=0)[0]
        logits = jax.lax.all_gather(logits, self.tp_axis, axis=logits.ndim - 1, tiled=True)
        logits = logits if logits_dtype is None else logits.astype(logits_dtype)
        return (logits, hidden) if hidden_states else logits


def _lora_glue(lora: tuple | dict | None, tp_axis: str | None, quantized: bool) -> bool:
    """Whether a pass may take the accumulating glue: no tensor parallelism or fp8 weights, and no adapters unless
    LORA_GLUE (their terms go into its accumulators)."""
    return tp_axis is None and not quantized and (lora is None or LORA_GLUE)


def _add_lora(acc: jax.Array, x: jax.Array, lora: tuple | None, projection: str) -> jax.Array:
    """``acc`` (a float32 accumulator or stream) plus each row's adapter term of ``projection`` for input ``x``."""
    if lora is None:
        return acc
    if LORA_KERNELS:
        return _lora_add_kernel(acc, x, lora, projection)
    return acc + lora_delta(x, *lora[0][projection], lora[1], out_dtype=jnp.float32).reshape(acc.shape)


def _glue_folds(lora: LayerLora | None) -> bool:
    """Whether the accumulating glue adds this layer's adapter terms inside its Mosaic GPU projections: the layer
    folds them (`LayerLora.fold`) and has the stacks as the kernels read them (`LayerLora.folded`)."""
    return lora is not None and lora.fold and lora.folded is not None


def _glue_term(x: jax.Array, lora: LayerLora | None, projection: str,
               shrunk: jax.Array | None = None) -> tuple[jax.Array, jax.Array] | None:
    """The accumulating glue's folded term of ``projection`` for input ``x [B, 1, K]``: ``(t, bt)`` for
    `skinny_matmul_mgpu`'s ``term`` where `_glue_folds` (``t`` is ``shrunk`` where the norm made it), else None."""
    if not _glue_folds(lora):
        return None
    return _term_operands(x.reshape(-1, x.shape[-1]), lora.folded[projection], lora.slots,
                          lora.weights[projection][0].shape[1], shrunk)


def _lora_kernels(y: jax.Array, fast: bool) -> bool:
    """Whether the plain path's adapter terms for output ``y [B, S, N]`` run as LORA_KERNELS' launches: decode
    steps (one token a row: ``slots`` has a row each) on the Pallas path."""
    return LORA_KERNELS and fast and y.shape[1] == 1


def _plus_lora(y: jax.Array, x: jax.Array, lora: tuple, projection: str, fast: bool) -> jax.Array:
    """``y`` (the plain path's output of ``projection`` for input ``x``) plus each row's adapter term, in ``y``'s
    dtype."""
    if _lora_kernels(y, fast):
        return _lora_add_kernel(y, x, lora, projection)
    return y + lora_delta(x, *lora[0][projection], lora[1])


class LayerLora(NamedTuple):
    """A layer's adapters as its sublayers take them (`_layer_lora`): ``{projection: (a, b)}``, the rows' slots,
    whether the terms go inside the projections' kernels (`_lora_folds`), and ``{projection: (a_cols [T, in],
    bt [out, T])}``, the stacks as the Mosaic GPU projections' terms take them (`jaxserve.lora.fold_columns`; None
    where not kept)."""
    weights: dict
    slots: jax.Array
    fold: bool = False
    folded: dict | None = None


def lora_folds_on_mgpu(dtype: Any) -> bool:
    """Whether an engine of this dtype folds its decode steps' adapter terms into the Mosaic GPU projections
    (LORA_FOLD, where `_mgpu_runs`): its `jaxserve.lora.LoraSlots` then keeps the stacks as they read them."""
    return LORA_FOLD and not LORA_KERNELS and _mgpu_runs(dtype)


def _lora_folds(x: jax.Array, paged: PagedAttention | None) -> bool:
    """Whether a plain-path pass over ``x [B, S, hidden]`` adds its adapter terms inside the projections' kernels
    (LORA_FOLD): decode steps (one token a row) of at most LORA_FOLD_ROWS rows on the Pallas path."""
    return (LORA_FOLD and not LORA_KERNELS and _fast_kernels(paged) and x.shape[1] == 1
            and x.shape[0] <= LORA_FOLD_ROWS)


def _fold(lora: LayerLora | None, projection: str, shrunk: jax.Array | None = None) -> tuple | None:
    """``(a, b, slots, folded, shrunk)`` of ``projection`` for `Linear` where the layer folds its terms
    (`LayerLora.fold`; ``folded`` its `LayerLora.folded` pair, None where not kept; ``shrunk`` the rows' shrink where
    the norm before made it, `_kernel_shrink`)."""
    if lora is None or not lora.fold:
        return None
    return (*lora.weights[projection], lora.slots, None if lora.folded is None else lora.folded[projection], shrunk)


# The accumulating glue's norm kernels also write the next projection's LoRA shrink (QKV's after the input norm,
# gate_up's after the post-attention norm): programs beside the norm's, each a row and 16 rows of its own slot's
# folded stack, norm the row again and multiply (`jaxserve_kernels.residual_norm.add_rms_norm`'s ``shrink``), where
# XLA ran a product over every slot's columns and a select, two launches a projection. H100, session 60
# (bench/results/lora.md, side by side): GPU busy a 64-row adapter step 1,512 -> 1,428 µs (96 launches fewer; the two
# norms 1.7 µs a launch slower), at 256 rows 2,949 -> 2,864. JAXSERVE_LORA_NORM_SHRINK=0 turns it off; read when a
# step is traced.
LORA_NORM_SHRINK = os.environ.get("JAXSERVE_LORA_NORM_SHRINK", "1") == "1"


def _kernel_shrink(lora: LayerLora | None, projection: str, on: bool) -> tuple | None:
    """The ``shrink`` operand of a kernel before ``projection`` on the accumulating glue that writes its LoRA shrink
    (``add_rms_norm``'s under LORA_NORM_SHRINK, ``fused_decode_attention``'s under LORA_ATTENTION_SHRINK: ``on``):
    where ``on`` and the layer folds its terms with the stacks kept (`_glue_folds`), ``(a_cols, slots, R)``; else
    None."""
    if not (on and _glue_folds(lora)):
        return None
    return lora.folded[projection][0], lora.slots, lora.weights[projection][0].shape[1]


# o_proj's LoRA shrink on the accumulating glue written by the fused attention kernel before it
# (`fused_decode_attention(..., shrink=...)`): each program multiplies its KV head's query rows by the row's own slot's
# stack rows and writes that part (zero outside the slot's columns), and o_proj's Mosaic GPU term reads the parts side
# by side over one expand stack, where XLA ran a product over every slot's columns and a select (two launches a
# layer). Unsplit attention calls only (split, its rows are merged after the kernel): at 256 rows always, at 64 rows
# tables of up to 256 keys. H100, session 61 (bench/results/lora.md, side by side): GPU busy a 64-row adapter step
# 1,428.9 -> 1,373.5 µs (48 launches fewer; the attention 6.87 -> 7.82 µs a launch), one-adapter tokens/s +3%.
# JAXSERVE_LORA_ATTENTION_SHRINK=0 turns it off; read when a step is traced.
LORA_ATTENTION_SHRINK = os.environ.get("JAXSERVE_LORA_ATTENTION_SHRINK", "1") == "1"


# down_proj's LoRA term on the accumulating glue split across the kernels around it: down_proj's Mosaic GPU kernel
# also streams the folded shrink stack's rows as column blocks past its weight's and adds each row's shrink (every
# slot's columns, float32) into an accumulator the post-attention norm zeroed (`skinny_matmul_mgpu`'s ``shrink``), and
# the next norm adds each row's own slot's columns, rounded, times that slot's expand rows to the stream before it
# norms it (`add_rms_norm`'s ``pending``; after the last layer XLA adds it before the final norm). In its place XLA
# ran the shrink over every slot's columns (a split-K product and its reduce, down_proj's input being 4,864 wide) and a
# select, and down_proj's kernel took the expand as K steps. H100, session 62 (bench/results/lora.md, side by side):
# GPU busy a 64-row adapter step 1,362.7 -> 1,248.7 µs (70 launches fewer: XLA's 24 products, their reduces and
# selects; the two norms 3.3 -> 4.06 µs a launch, down_proj 5.44 -> 5.55). JAXSERVE_LORA_DOWN_SHRINK=0 turns it off;
# read when a step is traced.
LORA_DOWN_SHRINK = os.environ.get("JAXSERVE_LORA_DOWN_SHRINK", "1") == "1"


class PendingTerm(NamedTuple):
    """A projection's LoRA term left for the next norm to add (LORA_DOWN_SHRINK; `add_rms_norm`'s ``pending``):
    the float32 shrink sums ``t [B, T]`` over every slot's columns, the expand ``b_rows [n * R, out]`` (slot s's rows
    s*R..s*R+R-1), the rows' slots and R."""
    t: jax.Array
    b_rows: jax.Array
    slots: jax.Array
    rank: int


def _leaves_down_term(lora: LayerLora | None) -> bool:
    """Whether the accumulating glue's down_proj leaves its adapters' term to the next norm (LORA_DOWN_SHRINK): the
    layer folds its terms with the stacks kept, and KV_TOUCH's "early" read-ahead (which carries the layers' other
    pending value) is off."""
    return LORA_DOWN_SHRINK and KV_TOUCH != "early" and _glue_folds(lora)


def add_pending_term(x: jax.Array, pending: PendingTerm) -> jax.Array:
    """The float32 stream ``x [B, S, N]`` plus ``pending`` (the last layer's down_proj term, before the final norm):
    `jaxserve_kernels.residual_norm.pending_term_reference`'s arithmetic, in XLA."""
    from jaxserve_kernels.residual_norm import pending_term_reference

    return x + pending_term_reference(*pending).reshape(x.shape)


# Folded LoRA shrinks of inputs at most this wide as one Triton launch that keeps each row's own slot's columns
# (`skinny_matmul(..., own_slot=...)`), in place of XLA's product and a select (1.37 µs a launch, 95 a 64-row step of
# Qwen2.5-0.5B). H100, session 59 (bench/results/lora.md): the launch takes 5.5 µs where XLA's product takes ~2.5
# (its one K split is a serial chain of 7 tiles), the 64-row step 1,647 against 1,508 µs of GPU time, so it is off
# (0: XLA's always). JAXSERVE_LORA_SHRINK_MAX_K=1024 turns it on for 0.5B's 896-wide inputs; read when a step is
# traced.
LORA_SHRINK_MAX_K = int(os.environ.get("JAXSERVE_LORA_SHRINK_MAX_K", "0"))


def _lora_shrink_columns(rows: jax.Array, a_cols: jax.Array, slots: jax.Array, rank: int) -> jax.Array:
    """Each row's shrink ``rows [M, in] @ a_cols.T`` (`jaxserve.lora.fold_columns`' ``[T, in]``) kept in its own
    slot's ``rank`` columns, the others zero: the Mosaic GPU term's ``t``, accumulated in float32 and rounded once to
    the rows' dtype, as `jaxserve.lora.lora_delta` rounds its shrink: one XLA product written in the rows' dtype and a
    select (a float32 product, its rounding and a pad were three launches more a projection: H100, session 59), or
    for inputs up to LORA_SHRINK_MAX_K wide one Triton launch (XLA's product as a multiply and a sum over K, the
    select its epilogue, lost too: H100, session 61)."""
    from jaxserve_kernels.skinny_matmul import own_slot_columns, skinny_matmul

    if rows.shape[-1] <= LORA_SHRINK_MAX_K:
        return skinny_matmul(rows, a_cols.astype(rows.dtype), layout="nk", own_slot=(slots, rank))
    t = jnp.dot(rows, a_cols.astype(rows.dtype).T, preferred_element_type=rows.dtype)
    return own_slot_columns(t, rank, slots, rows.dtype)


def _term_operands(rows: jax.Array, folded: tuple, slots: jax.Array, rank: int,
                   shrunk: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`skinny_matmul_mgpu`'s ``term`` for ``rows [M, in]`` from a projection's folded stacks ``(a_cols, bt)``: the
    rows' own-slot shrink (``shrunk`` where the norm made it, else `_lora_shrink_columns`) and the expand in the rows'
    dtype."""
    a_cols, bt = folded
    t = _lora_shrink_columns(rows, a_cols, slots, rank) if shrunk is None else shrunk.reshape(rows.shape[0], -1)
    return t, bt.astype(rows.dtype)


def _folded_lora_projection(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, epilogue: str,
                            a: jax.Array, b: jax.Array, slots: jax.Array, folded: tuple | None = None,
                            shrunk: jax.Array | None = None) -> jax.Array:
    """``x [B, 1, in] @ kernel (+ bias)`` with each row's adapter term added in the product's kernel (LORA_FOLD);
    ``epilogue`` "none" or "swiglu". Where the Mosaic GPU projection runs and ``folded`` (``(a_cols, bt)``,
    `jaxserve.lora.fold_columns`) is kept: XLA's shrink, masked (`_lora_shrink_columns`; or ``shrunk``, the norm's),
    as the kernel's extra K steps over ``bt``.
    Otherwise the shrink over every slot (``a [n, R, in]``) in one launch, then `skinny_matmul` with that shrink and
    the stacked expand (``b [n, R, out]``)."""
    from jaxserve_kernels.skinny_matmul import LoraTerm, lora_shrink, skinny_matmul

    if kernel.dtype == FP8:
        raise ValueError("adapter terms fold into bf16 / float32 projections only")
    n, r, _ = a.shape
    rows = x.reshape(-1, x.shape[-1])
    if folded is not None and _mgpu_projection(x, kernel, epilogue):
        from jaxserve_kernels.skinny_matmul_mgpu import skinny_matmul_mgpu

        term = _term_operands(rows, folded, slots, r, shrunk)
        out = skinny_matmul_mgpu(rows, kernel, bias, epilogue=epilogue, term=term)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    term = LoraTerm(lora_shrink(rows, a.reshape(n * r, -1).astype(x.dtype)), b.reshape(n * r, -1).astype(x.dtype),
                    slots, r)
    out = skinny_matmul(rows, kernel, bias, epilogue=epilogue, layout=WEIGHT_LAYOUT, lora=term)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _lora_add_kernel(y: jax.Array, x: jax.Array, lora: tuple, projection: str) -> jax.Array:
    """``y [B, 1, N]`` plus each row's adapter term of ``projection`` for input ``x``, by `lora_matmul.lora_add`
    (LORA_KERNELS), in ``y``'s dtype."""
    from jaxserve_kernels.lora_matmul import lora_add

    a, b = lora[0][projection]
    return lora_add(x.reshape(-1, x.shape[-1]), a, b, lora[1], y.reshape(-1, y.shape[-1])).reshape(y.shape)


def _lora_swiglu_kernel(h: jax.Array, x: jax.Array, lora: tuple) -> jax.Array:
    """SwiGLU of gate_up's output ``h [B, 1, 2I]`` with each row's adapter term for input ``x`` added first, by
    `lora_matmul.lora_swiglu` (LORA_KERNELS): ``[B, 1, I]``."""
    from jaxserve_kernels.lora_matmul import lora_swiglu

    out = lora_swiglu(x.reshape(-1, x.shape[-1]), *lora[0]["gate_up_proj"], lora[1], h.reshape(-1, h.shape[-1]))
    return out.reshape(*h.shape[:-1], -1)


def _layer_lora(lora: dict | None, layer: int, fold: bool = False) -> LayerLora | None:
    """Layer ``layer``'s adapter weights and the rows' slots, as the sublayers take them."""
    if lora is None:
        return None
    folded = lora.get("folded")
    return LayerLora({p: (a[layer], b[layer]) for p, (a, b) in lora["weights"].items()}, lora["slots"], fold,
                     None if folded is None else {p: (ac[layer], bt[layer]) for p, (ac, bt) in folded.items()})


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Random parameters with the model's tree structure (for tests and training from scratch)."""
    return Qwen2ForCausalLM(config, dtype).init(key, jnp.zeros((1, 2), jnp.int32))["params"]


def new_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype: Any) -> KVCache:
    """Zeroed KV pages for every layer, in ``dtype`` (the activations', or an fp8 format: `EngineConfig.kv_cache_dtype`)."""
    shape = (config.num_key_value_heads, num_pages, page_size, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers))


def param_count(params: Any) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


__all__ = ("Qwen2ForCausalLM", "PagedAttention", "KVCache", "init_params", "new_kv_cache",
                          "dense_causal_attention", "rope_tables", "rope_frequencies", "apply_rope", "param_count")
