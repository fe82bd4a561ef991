"""The one-pass greedy pick (argmax + its log-probability) against its jnp reference on fresh
random logits: rows 1..many, vocabularies that are not multiples of the block, ties (lowest
index wins), -inf entries, bf16 and float32 inputs. The tokens must match exactly; the
log-probabilities (always float32, over the input's own values) within 1e-5 relative to the
log-sum-exp they are computed from (`max - lse`: near zero, a log-probability's own relative
error is the rounding of a sum close to 1, not the kernel's accuracy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels.greedy_pick import greedy_pick, greedy_pick_reference, pick_blocks, pick_blocks_reference
from tests.test_kernels import MODES, fresh_rng


def logprob_error(lp, ref_lp, logits) -> float:
    """Largest |lp - ref| over the rows, relative to each row's log-sum-exp (at least 1)."""
    lse = np.asarray(jax.nn.logsumexp(jnp.asarray(logits, jnp.float32), axis=-1))
    return float((np.abs(np.asarray(lp) - np.asarray(ref_lp)) / np.maximum(np.abs(lse), 1.0)).max())

CASES = [  # (rows, vocab, block, chunks, dtype); chunks None: the default (rows x chunks ~ 528)
    (1, 1000, 256, None, jnp.bfloat16),    # 4 blocks, the last one partial, one a chunk
    (5, 151936 // 16, 2048, 1, jnp.float32),  # one program walks the whole row
    (3, 7, 8192, None, jnp.bfloat16),      # vocab below one block
    (17, 4096, 512, 3, jnp.bfloat16),      # 8 blocks in 3 chunks of 3, 3 and 2
    (2, 5000, 256, 4, jnp.float32),        # 20 blocks, 4 chunks of 5
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("logprobs", [True, False])
@pytest.mark.parametrize("rows,vocab,block,chunks,dtype", CASES)
def test_greedy_pick_matches_reference(interpret, logprobs, rows, vocab, block, chunks, dtype):
    rng, seed = fresh_rng()
    logits = jnp.asarray(rng.standard_normal((rows, vocab)) * 4, dtype)
    ids, lp = greedy_pick(logits, block=block, chunks=chunks, interpret=interpret, logprobs=logprobs)
    ref_ids, ref_lp = greedy_pick_reference(logits)
    assert ids.shape == (rows,) and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids), err_msg=f"seed={seed}")
    if not logprobs:  # the argmax alone
        assert lp is None
        return
    assert lp.dtype == jnp.float32
    assert not np.isnan(np.asarray(lp)).any(), f"seed={seed}"
    assert logprob_error(lp, ref_lp, logits) <= 1e-5, f"seed={seed}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("chunks,logprobs", [(1, True), (3, True), (3, False)])
def test_ties_pick_the_lowest_index_across_blocks(interpret, chunks, logprobs):
    # The maximum appears in several blocks and twice inside one: jnp.argmax's first index.
    rng, seed = fresh_rng()
    rows, vocab, block = 4, 1024, 128
    x = rng.standard_normal((rows, vocab)).astype(np.float32)
    for r in range(rows):
        where = np.sort(rng.choice(vocab, size=3, replace=False))
        x[r, where] = 10.0
    # Row 0: a tie inside one block (two adjacent positions) and another in a later block.
    x[0, :] = 0.0
    x[0, [130, 131, 700]] = 5.0
    logits = jnp.asarray(x, jnp.bfloat16)
    ids, _ = greedy_pick(logits, block=block, chunks=chunks, interpret=interpret, logprobs=logprobs)
    np.testing.assert_array_equal(np.asarray(ids), np.argmax(np.asarray(logits, np.float32), axis=-1),
                                  err_msg=f"seed={seed}")
    assert int(ids[0]) == 130


@pytest.mark.parametrize("interpret", MODES)
def test_minus_infinity_entries_and_rows(interpret):
    # Banned tokens are -inf; a row of only -inf gives log-probability -inf and token 0, never NaN.
    rng, seed = fresh_rng()
    x = rng.standard_normal((3, 600)).astype(np.float32)
    x[0, : 400] = -np.inf          # whole leading blocks of -inf before the first finite one
    x[1, rng.choice(600, size=100, replace=False)] = -np.inf
    x[2, :] = -np.inf
    ids, lp = greedy_pick(jnp.asarray(x), block=128, chunks=2, interpret=interpret)
    ref_ids, ref_lp = greedy_pick_reference(jnp.asarray(x[:2]))
    np.testing.assert_array_equal(np.asarray(ids[:2]), np.asarray(ref_ids), err_msg=f"seed={seed}")
    assert logprob_error(lp[:2], ref_lp, x[:2]) <= 1e-5, f"seed={seed}"
    assert int(ids[2]) == 0 and float(lp[2]) == -np.inf
    ids, _ = greedy_pick(jnp.asarray(x), block=128, chunks=2, interpret=interpret, logprobs=False)
    np.testing.assert_array_equal(np.asarray(ids), [*np.asarray(ref_ids), 0], err_msg=f"seed={seed}")


@pytest.mark.parametrize("interpret", MODES)
def test_lowest_finite_float32_logits(interpret):
    # The kernel measures a lane still at -inf from float32's lowest value: logits at exactly
    # that value must still count (exp(0) each) and be found at their own position.
    low = np.finfo(np.float32).min
    x = np.full((2, 300), -np.inf, np.float32)
    x[0, [77, 200]] = low          # only the lowest value, twice: the first is the argmax
    x[1, 5] = low
    x[1, 250] = -1.0
    ids, lp = greedy_pick(jnp.asarray(x), block=64, chunks=2, interpret=interpret)
    assert ids.tolist() == [77, 250]
    np.testing.assert_allclose(np.asarray(lp), [-np.log(2.0), 0.0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("rows,vocab,block,chunks,dtype", CASES)
def test_masked_pick_is_the_argmax_of_the_allowed_tokens(interpret, rows, vocab, block, chunks, dtype):
    """Random packed masks, dense and sparse rows, a row allowing nothing (token 0, as jnp.argmax of -inf) and
    one allowing everything; the allowed maximum placed below a masked larger one."""
    rng, seed = fresh_rng()
    x = rng.standard_normal((rows, vocab)) * 4
    keep = rng.random((rows, vocab)) < rng.choice([0.002, 0.3, 0.9], size=(rows, 1))
    keep[0] = False
    if rows > 1:
        keep[1] = True
    for r in range(2, rows):  # the row's largest logit masked out, its second kept
        order = np.argsort(x[r])
        keep[r, order[-1]], keep[r, order[-2]] = False, True
    words = -(-vocab // 32)
    bits = np.zeros((rows, words * 32), bool)
    bits[:, :vocab] = keep
    allowed = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view("<u4").reshape(rows, words))
    logits = jnp.asarray(x, dtype)
    ids, lp = greedy_pick(logits, allowed, block=block, chunks=chunks, interpret=interpret, logprobs=False)
    ref_ids, _ = greedy_pick_reference(logits, allowed)
    assert lp is None
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids), err_msg=f"seed={seed}")
    assert int(ids[0]) == 0 and all(keep[r, int(ids[r])] for r in range(1, rows)), f"seed={seed}"


def test_the_runner_s_masked_greedy_pick_takes_the_same_tokens_through_the_kernel(monkeypatch):
    """`runner.choose_tokens` with allowed-token masks: the kernel path (MASKED_PICK) against XLA's select and
    argmax, on the same logits and masks."""
    from jaxserve import runner
    from jaxserve.sampling import make_batch

    rng, seed = fresh_rng()
    rows, vocab = 8, 1000
    logits = jnp.asarray(rng.standard_normal((rows, vocab)) * 3, jnp.bfloat16)
    allowed = jnp.asarray(rng.integers(0, 1 << 32, size=(rows, -(-vocab // 32)), dtype=np.uint32))
    batch = make_batch([], rows, allowed=allowed)
    picked = {}
    for on in (False, True):
        monkeypatch.setattr(runner, "MASKED_PICK", on)
        out = runner.choose_tokens(logits, batch, jnp.zeros(rows, jnp.int32), None, None, num_top=0, greedy=True,
                                   pick_kernel=True, logprobs=False)
        picked[on] = np.asarray(out.tokens)
    np.testing.assert_array_equal(picked[True], picked[False], err_msg=f"seed={seed}")
    np.testing.assert_array_equal(picked[True], np.asarray(greedy_pick_reference(logits, allowed)[0]))


def test_the_runner_s_greedy_pick_with_logprobs_ranks_its_tokens_first():
    """The kernel path of `runner.choose_tokens` with log-probabilities: the tokens, log-probabilities and vLLM
    ranks (each token its row's maximum: 1, or its ties' count) of XLA's path, on the same logits with ties."""
    from jaxserve import runner
    from jaxserve.sampling import make_batch, token_ranks

    rng, seed = fresh_rng()
    rows, vocab = 8, 1000
    logits = jnp.asarray(np.round(rng.standard_normal((rows, vocab)) * 3), jnp.bfloat16)  # rounded: tied maxima
    batch = make_batch([], rows)
    outs = [runner.choose_tokens(logits, batch, jnp.zeros(rows, jnp.int32), None, None, num_top=0, greedy=True,
                                 pick_kernel=kernel, logprobs=True) for kernel in (False, True)]
    np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens, err_msg=f"seed={seed}")
    np.testing.assert_allclose(outs[1].logprobs, outs[0].logprobs, rtol=1e-5, atol=1e-5, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(outs[1].ranks, outs[0].ranks)
    x = np.asarray(logits, np.float32)
    np.testing.assert_array_equal(outs[1].ranks, (x == x.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_array_equal(outs[0].ranks, token_ranks(logits, outs[1].tokens))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="allowed"):
        greedy_pick(jnp.zeros((2, 40)), jnp.zeros((2, 1), jnp.uint32), logprobs=False)
    with pytest.raises(ValueError, match="logprobs=False"):
        greedy_pick(jnp.zeros((2, 40)), jnp.zeros((2, 2), jnp.uint32))
    with pytest.raises(ValueError, match="logits"):
        greedy_pick(jnp.zeros((4,)))
    with pytest.raises(ValueError, match="logits"):
        greedy_pick(jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="block"):
        greedy_pick(jnp.zeros((2, 4)), block=100)
    with pytest.raises(ValueError, match="chunks"):
        greedy_pick(jnp.zeros((2, 4)), chunks=0)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("blocks,rows", [(1187, 64), (5, 8), (1, 3)])
def test_pick_blocks_matches_argmax_over_the_blocks(interpret, blocks, rows):
    """Per-block maxima to tokens as `jnp.argmax` over the blocks: few distinct values (ties across
    blocks: the first wins), a row of only -inf (block 0), a row with NaNs (the first NaN)."""
    rng, seed = fresh_rng()
    maxes = rng.integers(-3, 3, (blocks, rows)).astype(np.float32)
    maxes[:, 0] = -np.inf
    if rows > 1:  # one NaN or two: the first wins
        maxes[rng.integers(0, blocks, 2), 1] = np.nan
    firsts = rng.permutation(blocks * rows).reshape(blocks, rows).astype(np.float32)
    got = pick_blocks(jnp.asarray(maxes), jnp.asarray(firsts), interpret=interpret)
    want = pick_blocks_reference(jnp.asarray(maxes), jnp.asarray(firsts))
    assert got.dtype == jnp.int32 and got.shape == (rows,)
    assert np.array_equal(np.asarray(got), np.asarray(want)), f"seed={seed}"
    # NumPy's argmax on the host: the rule itself, whatever the backend's reductions do with two NaNs.
    host = np.take_along_axis(firsts, np.argmax(maxes, axis=0)[None, :], axis=0)[0].astype(np.int32)
    assert np.array_equal(np.asarray(want), host), f"reference, seed={seed}"
