"""Greedy pick: each row's argmax and that token's log-probability, in one pass over the logits.

Owns: `greedy_pick` (`[B, V]` logits -> the first index of each row's maximum and its
log-softmax value), `pick_blocks` (per-block maxima of an LM head that writes no logits -> each
row's token) and their jnp references. Never decides when it is used (the runner's greedy
path does; the sampler keeps its own jnp code).

Why: a greedy decode step wants the argmax and, for the chosen token's log-probability, the
log-sum-exp (the chosen logit is the maximum, so its log-probability is `max - lse`). XLA runs
those as separate reductions (argmax, max, sum of exp: four to six launches a step), each
reading all of the logits: at batch 256 over a 151,936-token vocabulary that is 78 MB of bf16
a pass, 66 µs of a 1.64 ms Qwen2.5-0.5B step on the H200 (bench/results/decode_step.md).
One online pass reads the logits once. The chosen logit is the maximum m, so its
log-probability is `m - lse = -log(sum(exp(x - m)))`: the running sum alone gives it.

How: the vocabulary is cut into chunks, so rows x chunks programs fill the GPU (one program a
row measured 730 GB/s at batch 256 on the H200, and one program for batch 1's whole row is a
long serial walk). A program walks its chunk in blocks keeping per-lane running maxima, the
position of each lane's first maximum and each lane's sum of `exp(x - max)` (rescaled when the
lane's maximum grows; one `exp2` an element serves both cases): no cross-lane reduction inside
the loop for the loads to wait on. At the end
it reduces its lanes to one (max, first index, sum) per chunk; a few XLA ops merge the chunks
(the first chunk holding the maximum gives the index, as `jnp.argmax`'s first-index rule).
Logits are read in their own dtype (bf16 from the LM head) and widened to float32 in registers,
so no float32 copy of the logits is written.

Measured (H200, bench/results/decode_step.md, sessions 10-11): the kernel is bound by instruction
issue, not bytes (ncu: 69% SM, 30% DRAM with two accurate `exp` an element); one `exp2` an element
took it from 92 to 76 µs alone at 256 rows (XLA's passes: 60-67 µs in that loop). Inside the decode
step it beats XLA's reductions from 128 rows (-1.3% to -2.9% a step), where the logits outgrow the
L2 and XLA's later passes miss it; at 64 rows the two-exp kernel lost (+0.7%, +3.1%) and the
one-exp kernel won twice (-1.1%, -0.9%), so the runner uses it from 64 (`runner.GREEDY_PICK_MIN_ROWS`).
With `logprobs=False` (no request in the step asked for them; session 12) it is an argmax alone: 29 µs
at 256 rows in the step's profile, against ~56 µs with the log-sum-exp.

Backend: Pallas Triton, like the other kernels (`jaxserve_kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.paged_attention import LOG2E

# Elements one loop iteration loads (8 KB of bf16 over 8 warps: 16 a thread), pipeline depth,
# and how many programs (rows x chunks) to aim for: 4 an SM of the H100/H200's 132.
BLOCK = 4096
NUM_WARPS = 8
NUM_STAGES = 2
TARGET_PROGRAMS = 528
# Chunks a row so that rows x chunks stays within TARGET_PROGRAMS (one wave where it is the slots an SM
# holds: 59 registers a thread at 8 warps fit 4 programs an SM), or the least reaching it (before
# session 32). Nsight Compute on the H200 (session 32): 256 rows x 3 chunks = 768 programs ran as 1.45
# waves of 528 at 3.06 TB/s (26.2 µs cold); 2 chunks are 512 programs in one wave. In the step (one process,
# 9 alternating rounds, `bench/decode_step.py --glue pick_wave_fit`): 256 rows 29.24 -> 25.44 µs, step 1.202 ->
# 1.196 ms; 128 rows (4 chunks, not 5) 14.64 -> 12.54 µs, 0.898 -> 0.896 ms. Read at call time.
WAVE_FIT = True
_LOWEST = float(jnp.finfo(jnp.float32).min)


def _kernel(x_ref, *refs, vocab: int, block: int, blocks_per_chunk: int, chunks: int, logprobs: bool,
            masked: bool):
    allowed_ref, refs = (refs[0], refs[1:]) if masked else (None, refs)
    m_ref, s_ref, idx_ref = refs if logprobs else (refs[0], None, refs[1])
    row, chunk = pl.program_id(0), pl.program_id(1)
    lanes = jnp.arange(block, dtype=jnp.int32)
    first = chunk * blocks_per_chunk
    num_blocks = jnp.minimum(blocks_per_chunk, pl.cdiv(vocab, block) - first)
    words = pl.cdiv(vocab, 32)

    def load(i):
        start = (first + i) * block
        pos = start + lanes
        real = pos < vocab
        x = compat.load(x_ref.at[row, pl.ds(start, block)], mask=real, other=-jnp.inf).astype(jnp.float32)
        if masked:
            # Each lane gathers its token's word of the packed mask (32 lanes share one: a broadcast read),
            # so the masked logits are never written out as XLA's select before an argmax writes them.
            word = compat.load(allowed_ref.at[row * words + jnp.minimum(pos // 32, words - 1)], mask=real, other=0)
            bit = (word >> (pos % 32).astype(jnp.uint32)) & jnp.uint32(1)
            x = jnp.where(bit != 0, x, -jnp.inf)
        return x, pos

    def argmax_body(i, carry):  # the argmax alone: a compare and two selects an element
        m, idx = carry
        x, pos = load(i)
        up = x > m  # strictly greater: a lane keeps its first maximum
        return jnp.where(up, x, m), jnp.where(up, pos, idx)

    def body(i, carry):
        m, s, idx = carry
        x, pos = load(i)
        up = x > m
        # One exp an element serves both branches: a new maximum rescales the sum by
        # exp(m - x) and adds 1, anything else adds exp(x - m). Against a lane still at -inf
        # the difference is taken from float32's lowest value, so -inf - -inf never makes NaN
        # (exp2(-inf) = 0 adds nothing). Base 2: `exp` lowers to libdevice's accurate expf,
        # `exp2` to about one ex2.approx; the kernel is bound by instruction issue, not bytes.
        d = x - jnp.maximum(m, _LOWEST)
        e = jnp.exp2(jnp.abs(d) * -LOG2E)
        s = jnp.where(up, s * e + 1.0, s + e)
        return jnp.where(up, x, m), s, jnp.where(up, pos, idx)

    m0 = jnp.full((block,), -jnp.inf, jnp.float32)
    idx0 = jnp.full((block,), first * block, jnp.int32)
    if logprobs:
        m, s, idx = lax.fori_loop(0, num_blocks, body, (m0, jnp.zeros((block,), jnp.float32), idx0))
    else:
        m, idx = lax.fori_loop(0, num_blocks, argmax_body, (m0, idx0))
    chunk_max = jnp.max(m)
    # Lowest position among the lanes at the chunk's maximum; a chunk of only -inf: its start.
    chunk_idx = jnp.min(jnp.where(m == chunk_max, idx, jnp.int32(jnp.iinfo(jnp.int32).max)))
    out = pl.ds(row * chunks + chunk, 1)
    m_ref[out] = jnp.full((1,), chunk_max, jnp.float32)
    idx_ref[out] = jnp.full((1,), chunk_idx, jnp.int32)
    if logprobs:
        shift = jnp.where(chunk_max > -jnp.inf, chunk_max, 0.0)
        chunk_sum = jnp.sum(jnp.where(m > -jnp.inf, s * jnp.exp(m - shift), 0.0))
        s_ref[out] = jnp.full((1,), chunk_sum, jnp.float32)


@functools.partial(jax.jit, static_argnames=("block", "chunks", "num_warps", "num_stages", "interpret",
                                             "logprobs"))
def _greedy_pick(logits, allowed, *, block: int, chunks: int, num_warps: int, num_stages: int, interpret: bool,
                 logprobs: bool):
    rows, vocab = logits.shape
    total_blocks = pl.cdiv(vocab, block)
    blocks_per_chunk = pl.cdiv(total_blocks, chunks)
    chunks = pl.cdiv(total_blocks, blocks_per_chunk)  # no chunk without a block
    masked = allowed is not None
    kernel = functools.partial(_kernel, vocab=vocab, block=block, blocks_per_chunk=blocks_per_chunk, chunks=chunks,
                               logprobs=logprobs, masked=masked)
    flat = rows * chunks
    maxima = jax.ShapeDtypeStruct((flat,), jnp.float32)
    out_shape = [maxima, maxima, jax.ShapeDtypeStruct((flat,), jnp.int32)]
    if not logprobs:
        del out_shape[1]
    operands = (logits, allowed.reshape(-1)) if masked else (logits,)
    outs = compat.triton_call(kernel, *operands, grid=(rows, chunks), out_shape=out_shape, interpret=interpret,
                              num_warps=num_warps, num_stages=num_stages,
                              name="greedy_pick" if logprobs else "greedy_argmax_masked" if masked else "greedy_argmax")
    m, idx = outs[0].reshape(rows, chunks), outs[-1].reshape(rows, chunks)
    best = jnp.argmax(m, axis=-1)  # first chunk at the maximum: the lowest index
    tokens = jnp.take_along_axis(idx, best[:, None], axis=-1)[:, 0]
    if not logprobs:
        return tokens, None
    s = outs[1].reshape(rows, chunks)
    row_max = m.max(axis=-1, keepdims=True)
    shift = jnp.where(row_max > -jnp.inf, row_max, 0.0)
    total = jnp.sum(jnp.where(m > -jnp.inf, s * jnp.exp(m - shift), 0.0), axis=-1)
    # The chosen logit is the row's maximum: its log-probability is -log(sum exp(x - max)).
    logprobs = jnp.where(total > 0, -jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return tokens, logprobs


def greedy_pick(logits: jax.Array, allowed: jax.Array | None = None, *, block: int | None = None,
                chunks: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                interpret: bool | None = None, logprobs: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Each row's argmax (first index of the maximum) and its log-probability (float32), one pass.

    Args:
        logits: `[B, V]` in any float dtype (widened to float32 inside, never copied).
        allowed: uint32 `[B, ceil(V / 32)]` packed masks (bit t % 32 of word t // 32 set where token t may be
            picked: `jaxserve.sampling.SamplingBatch.allowed`), or None; with it, each row's argmax over its
            allowed tokens (a row allowing none picks 0), the argmax alone (``logprobs=False`` required: a
            structured-output row's log-probability is the raw model's, which this pass does not compute).
        block: elements a loop iteration loads (a power of two); None: `BLOCK`.
        chunks: programs a row (fewer if the row has fewer blocks); None: the most that keep rows x
            chunks within `TARGET_PROGRAMS`, at least one (`WAVE_FIT`; off: the least reaching it).
        num_warps, num_stages: Triton launch parameters; None: `NUM_WARPS`, `NUM_STAGES`.
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        logprobs: False: the argmax alone (no exponential an element; None in place of the
            log-probabilities), for a step where no request asked for them.

    Returns:
        `(tokens [B] int32, logprobs [B] float32)`: `logprobs[b] = log_softmax(logits[b])[tokens[b]]`
        (-inf for a row of only -inf, whose token is 0).

    Example:
        >>> tokens, lps = greedy_pick(jnp.log(jnp.array([[0.25, 0.75], [0.5, 0.5]])) + 1.0)
        >>> tokens.tolist(), [round(x, 4) for x in jnp.exp(lps).tolist()]
        ([1, 0], [0.75, 0.5])
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if allowed is not None:
        expect = (logits.shape[0], -(-logits.shape[1] // 32))
        if allowed.shape != expect or allowed.dtype != jnp.uint32:
            raise ValueError(f"allowed must be uint32 {list(expect)}, got {allowed.dtype} {list(allowed.shape)}")
        if logprobs:
            raise ValueError("allowed (a masked pick) needs logprobs=False: it is the argmax alone")
    block = BLOCK if block is None else block
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    # A row shorter than the block needs only the next power of two above it.
    rows, vocab = logits.shape
    block = min(block, compat.next_pow2(vocab))
    if chunks is None:
        rows_ = max(rows, 1)
        chunks = max(1, TARGET_PROGRAMS // rows_) if WAVE_FIT else -(-TARGET_PROGRAMS // rows_)
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    chunks = min(chunks, -(-vocab // block))
    return _greedy_pick(logits, allowed, block=block, chunks=chunks,
                        num_warps=NUM_WARPS if num_warps is None else num_warps,
                        num_stages=NUM_STAGES if num_stages is None else num_stages,
                        interpret=compat.resolve_interpret(interpret), logprobs=bool(logprobs))


def _blocks_kernel(maxes_ref, firsts_ref, out_ref, *, blocks: int, padded: int):
    row = pl.program_id(0)
    idx = jnp.arange(padded, dtype=jnp.int32)
    ok = idx < blocks
    # Row `row`'s column of the block maxima: strided, but a few KB from L2 a program.
    v = compat.load(maxes_ref.at[pl.ds(0, padded), row], mask=ok, other=-jnp.inf)
    # Not `v != v`: Triton lowers a float `!=` to an ordered compare, false for NaN.
    nan = jnp.logical_not(v == v)
    key = jnp.where(nan, jnp.inf, v)
    # `jnp.argmax`'s rules: a NaN is the maximum (its first), ties go to the first block, and a row
    # of only -inf picks block 0.
    any_nan = jnp.max(nan.astype(jnp.int32)) > 0
    hit = jnp.where(any_nan, nan, key == jnp.max(key)) & ok
    block = jnp.min(jnp.where(hit, idx, padded))
    block = jnp.minimum(block, blocks - 1)
    first = compat.load(firsts_ref.at[pl.ds(block, 1), row])
    out_ref[pl.ds(row, 1)] = first.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _pick_blocks(maxes, firsts, *, interpret: bool):
    blocks, rows = maxes.shape
    kernel = functools.partial(_blocks_kernel, blocks=blocks, padded=compat.next_pow2(blocks))
    return compat.triton_call(kernel, maxes, firsts, grid=(rows,), out_shape=jax.ShapeDtypeStruct((rows,), jnp.int32),
                              interpret=interpret, num_warps=4, name="pick_blocks")


def pick_blocks(maxes: jax.Array, firsts: jax.Array, *, interpret: bool | None = None) -> jax.Array:
    """Each row's token from per-block maxima: `firsts[b, row]` of the first block `b` holding the
    row's maximum of `maxes[:, row]` (`jnp.argmax`'s rules across blocks), one program a row.

    Why: an LM head that keeps each weight block's row maxima (`jaxserve_kernels.skinny_matmul_mgpu.
    argmax_matmul_mgpu`) leaves them as `[blocks, rows]`; XLA's argmax over that leading axis is a
    column reduction of 64 columns, which its emitter runs on a couple of thread blocks walking the
    1,187 blocks in turn (7.5 µs at 64 rows on the H200, session 25), plus two small fusions to take
    the column. Here each row's program loads its column at once.

    Args:
        maxes: `[blocks, rows]` float32 maxima.
        firsts: `[blocks, rows]` the column of each maximum (any dtype holding integers exactly).
        interpret: Pallas interpret mode; None picks it on the CPU backend.

    Example:
        >>> maxes = jnp.array([[1.0, 5.0], [3.0, 5.0]]); firsts = jnp.array([[7, 8], [9, 10]])
        >>> pick_blocks(maxes, firsts).tolist()
        [9, 8]
    """
    if maxes.ndim != 2 or firsts.shape != maxes.shape:
        raise ValueError(f"maxes and firsts must both be [blocks, rows], got {maxes.shape} and {firsts.shape}")
    return _pick_blocks(maxes.astype(jnp.float32), firsts, interpret=compat.resolve_interpret(interpret))


def pick_blocks_reference(maxes: jax.Array, firsts: jax.Array) -> jax.Array:
    """jnp reference of `pick_blocks`.

    A row's NaNs are found first: `jnp.argmax` itself keeps whichever NaN its reduction meets last, and
    XLA's GPU column reduction meets them out of order (H200, session 26: block 605 of a column with
    NaNs at 239 and 605), where NumPy's rule, and `pick_blocks`'s, is the first.

    Example:
        >>> pick_blocks_reference(jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])).tolist()
        [6]
    """
    nan = jnp.isnan(maxes)
    # argmax over booleans and over NaN-free values: ties go to the first index on every backend.
    block = jnp.where(nan.any(axis=0), jnp.argmax(nan, axis=0), jnp.argmax(jnp.where(nan, 0.0, maxes), axis=0))
    return jnp.take_along_axis(firsts, block[None, :], axis=0)[0].astype(jnp.int32)


def greedy_pick_reference(logits: jax.Array, allowed: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """jnp reference of `greedy_pick` (what XLA runs as separate reductions); with ``allowed``, the argmax
    over each row's allowed tokens (its log-probabilities are then not `greedy_pick`'s: it returns None).

    Example:
        >>> tokens, lps = greedy_pick_reference(jnp.zeros((1, 4)))
        >>> tokens.tolist(), round(float(jnp.exp(lps[0])), 4)
        ([0], 0.25)
        >>> greedy_pick_reference(jnp.arange(4.0)[None], jnp.array([[0b0110]], jnp.uint32))[0].tolist()
        [2]
    """
    x = logits.astype(jnp.float32)
    if allowed is not None:
        ids = jnp.arange(x.shape[-1], dtype=jnp.uint32)
        bits = (allowed[:, ids // 32] >> (ids % 32)[None, :]) & 1
        x = jnp.where(bits != 0, x, -jnp.inf)
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    return tokens, jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(x, axis=-1)
