"""Greedy pick: each row's argmax and that token's log-probability, in one pass over the logits.

Owns: `greedy_pick` (`[B, V]` logits -> the first index of each row's maximum and its
log-softmax value) and its jnp reference. Never decides when it is used (the runner's greedy
path does; the sampler keeps its own jnp code).

Why: a greedy decode step wants the argmax and, for the chosen token's log-probability, the
log-sum-exp (the chosen logit is the maximum, so its log-probability is `max - lse`). XLA runs
those as separate reductions (argmax, max, sum of exp: four to six launches a step), each
reading all of the logits: at batch 256 over a 151,936-token vocabulary that is 78 MB of bf16
a pass, 66 µs of a 1.64 ms Qwen2.5-0.5B step on the H200 (bench/results/decode_step.md).
One online pass reads the logits once. The chosen logit is the maximum m, so its
log-probability is `m - lse = -log(sum(exp(x - m)))`: the running sum alone gives it.

How: one program per row walks the row in blocks, keeping the running maximum, the index of
its first occurrence, and the sum of `exp(x - max)` rescaled whenever the maximum grows (the
online softmax's denominator). Ties keep the lowest index, as `jnp.argmax` does. Logits are
read in their own dtype (bf16 from the LM head) and widened to float32 in registers, so no
float32 copy of the logits is ever written.

Backend: Pallas Triton, like the other kernels (`kernels.paged_attention` says why).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import pallas_compat as compat

# Elements of a row one loop iteration loads: 16 KB of bf16 over 8 warps (32 a thread), and a
# few iterations in flight through the software pipeline (NUM_STAGES).
BLOCK = 8192
NUM_WARPS = 8
NUM_STAGES = 3


def _kernel(x_ref, ids_ref, lp_ref, *, vocab: int, block: int):
    row = pl.program_id(0)
    cols = jnp.arange(block, dtype=jnp.int32)
    big = jnp.int32(jnp.iinfo(jnp.int32).max)

    def body(i, carry):
        m, s, idx = carry
        start = i * block
        ok = start + cols < vocab
        x = compat.load(x_ref.at[row, pl.ds(start, block)], mask=ok, other=-jnp.inf).astype(jnp.float32)
        block_max = jnp.max(x)
        block_idx = jnp.min(jnp.where(x == block_max, start + cols, big))
        new_m = jnp.maximum(m, block_max)
        # A row (or a prefix of it) of -inf leaves new_m at -inf; its terms are zero, not NaN.
        finite = new_m > -jnp.inf
        shift = jnp.where(finite, new_m, 0.0)
        s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift))
        idx = jnp.where(block_max > m, block_idx, idx)  # strictly greater: earlier blocks win ties
        return new_m, s, idx

    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.int32(0))
    m, s, idx = lax.fori_loop(0, pl.cdiv(vocab, block), body, init)
    logprob = jnp.where(s > 0, -jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)
    ids_ref[pl.ds(row, 1)] = jnp.full((1,), idx, jnp.int32)
    lp_ref[pl.ds(row, 1)] = jnp.full((1,), logprob, jnp.float32)


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "num_stages", "interpret"))
def _greedy_pick(logits, *, block: int, num_warps: int, num_stages: int, interpret: bool):
    rows, vocab = logits.shape
    kernel = functools.partial(_kernel, vocab=vocab, block=block)
    return pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=[pl.no_block_spec],
        out_specs=[pl.no_block_spec, pl.no_block_spec],
        out_shape=[jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.float32)],
        interpret=interpret,
        compiler_params=compat.compiler_params(num_warps=num_warps, num_stages=num_stages),
        name="greedy_pick",
    )(logits)


def greedy_pick(logits: jax.Array, *, block: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Each row's argmax (first index of the maximum) and its log-probability (float32), one pass.

    Args:
        logits: `[B, V]` in any float dtype (widened to float32 inside, never copied).
        block: elements a loop iteration loads (a power of two); None: `BLOCK`.
        num_warps, num_stages: Triton launch parameters; None: `NUM_WARPS`, `NUM_STAGES`.
        interpret: Pallas interpret mode; None picks it on the CPU backend.

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
    block = BLOCK if block is None else block
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    # A row shorter than the block needs only the next power of two above it.
    block = min(block, compat.next_pow2(logits.shape[1]))
    return _greedy_pick(logits, block=block, num_warps=NUM_WARPS if num_warps is None else num_warps,
                        num_stages=NUM_STAGES if num_stages is None else num_stages,
                        interpret=compat.resolve_interpret(interpret))


def greedy_pick_reference(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """jnp reference of `greedy_pick` (what XLA runs as separate reductions).

    Example:
        >>> tokens, lps = greedy_pick_reference(jnp.zeros((1, 4)))
        >>> tokens.tolist(), round(float(jnp.exp(lps[0])), 4)
        ([0], 0.25)
    """
    x = logits.astype(jnp.float32)
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    return tokens, jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(x, axis=-1)
