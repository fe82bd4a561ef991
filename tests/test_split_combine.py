"""The one-launch flash-decoding merge against its jnp reference on fresh random inputs: split
counts from 2 to past the engine's 128 (not powers of two), GQA groups 1/7/8, head_dim 64/128,
empty splits (lse = -inf, their partials NaN-poisoned: they must not be read into the sum) and
rows whose every split is empty (zeros). The attention kernels' own tests run it end to end.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels import split_combine
from jaxserve_kernels.split_combine import combine_splits, combine_splits_reference
from tests.test_kernels import MODES, TOLERANCE, fresh_rng, relative_error

CASES = [  # (splits, batch, kv_heads, group, head_dim, dtype)
    (2, 3, 2, 7, 64, jnp.bfloat16),
    (5, 2, 4, 1, 128, jnp.float32),
    (132, 1, 2, 7, 64, jnp.bfloat16),  # Qwen2.5-0.5B at batch 1, a 2048-page table
    (33, 2, 1, 8, 128, jnp.float32),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("splits,batch,kv_heads,group,head_dim,dtype", CASES)
def test_combine_matches_reference_and_skips_empty_splits(interpret, splits, batch, kv_heads, group,
                                                          head_dim, dtype, monkeypatch):
    rng, seed = fresh_rng()
    o = rng.standard_normal((splits, batch, kv_heads, group, head_dim))
    lse = rng.standard_normal((splits, batch, kv_heads, group)) * 4
    # The in-kernel split sizing leaves the tail splits of a short row empty.
    for b in range(batch):
        used = int(rng.integers(1, splits + 1))
        lse[used:, b] = -np.inf
    lse[:, 0, 0, 0] = -np.inf  # a row with no key at all
    o = np.where(np.isinf(lse)[..., None], np.nan, o)
    o, lse = jnp.asarray(o, dtype), jnp.asarray(lse, jnp.float32)

    out = combine_splits(o, lse, interpret=interpret)
    ref = combine_splits_reference(o.astype(jnp.float32), lse)
    # EARLY_PARTIALS loads the (NaN-poisoned) empty partials and drops them by a select: the same bits.
    monkeypatch.setattr(split_combine, "EARLY_PARTIALS", not split_combine.EARLY_PARTIALS)
    np.testing.assert_array_equal(np.asarray(combine_splits(o, lse, interpret=interpret), np.float32),
                                  np.asarray(out, np.float32), err_msg=f"EARLY_PARTIALS, seed={seed}")

    assert out.shape == (batch, kv_heads, group, head_dim) and out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[dtype], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[0, 0, 0], np.float32), 0.0,
                                  err_msg=f"empty row not zero, seed={seed}")


def test_combine_errors_name_the_field():
    o = jnp.zeros((3, 1, 2, 7, 64))
    with pytest.raises(ValueError, match="lse"):
        combine_splits(o, jnp.zeros((3, 1, 2)))
    with pytest.raises(ValueError, match="^o must"):
        combine_splits(o[0], jnp.zeros((1, 2, 7)))
    with pytest.raises(ValueError, match="head_dim"):
        combine_splits(jnp.zeros((3, 1, 2, 7, 48)), jnp.zeros((3, 1, 2, 7)))
