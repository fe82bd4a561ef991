"""The Mosaic GPU decode kernel (experimental) against the paged-attention reference.

On the CPU it runs in Mosaic GPU's interpreter (TMA copies, barriers and shared memory
simulated; the two products as plain dots, since the interpreter's WGMMA takes no
transposed operand); `-m gpu` compiles it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve_kernels.paged_attention_mgpu import paged_attention_mgpu
# The reference jitted whole (tests.test_kernels says why).
from tests.test_kernels import (MODES, TOLERANCE, fresh_rng, make_pool, make_sequences, paged_attention_reference,
                                poison_unowned, ragged_lengths, relative_error)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,page_size,ppb,slots,splits", [
    (14, 2, 64, 16, 4, 2, 1),     # Qwen2.5-0.5B heads, unsplit
    (14, 2, 64, 16, 4, 2, None),  # the default split count (4 here)
    (28, 4, 128, 16, 8, 2, 3),    # Qwen2.5-7B heads; splits of one 8-page block, some empty
    (8, 1, 64, 32, 2, 3, 5),
])
def test_mgpu_decode_matches_reference_on_ragged_paged_batch(interpret, num_heads, kv_heads,
                                                             head_dim, page_size, ppb, slots,
                                                             splits):
    rng, seed = fresh_rng()
    batch, table_pages = 6, 13
    num_pages = batch * table_pages + 3
    k_pages, v_pages = make_pool(rng, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size,
                                 num_pages=num_pages, dtype=jnp.bfloat16)
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages,
                                    lengths=ragged_lengths(rng, batch, page_size,
                                                           table_pages * page_size))
    k_pages = poison_unowned(k_pages, table, lengths, page_size)
    v_pages = poison_unowned(v_pages, table, lengths, page_size)
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), jnp.bfloat16)

    out = paged_attention_mgpu(q, k_pages, v_pages, table, lengths, pages_per_block=ppb,
                               num_slots=slots, num_splits=splits,
                               interpret=interpret)
    ref = paged_attention_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                    v_pages.astype(jnp.float32), table, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0,
                                  err_msg=f"length-0 row not zero, seed={seed}")


def test_mgpu_decode_refuses_what_it_cannot_run():
    q = jnp.ones((1, 4, 64), jnp.float32)
    pages = jnp.ones((2, 4, 16, 64), jnp.float32)
    table, lengths = jnp.zeros((1, 4), jnp.int32), jnp.ones(1, jnp.int32)
    with pytest.raises(ValueError, match="bfloat16"):
        paged_attention_mgpu(q, pages, pages, table, lengths)
    with pytest.raises(ValueError, match="multiple of 64"):
        paged_attention_mgpu(q.astype(jnp.bfloat16), pages.astype(jnp.bfloat16),
                             pages.astype(jnp.bfloat16), table, lengths, pages_per_block=3)


@pytest.mark.parametrize("interpret", MODES)
def test_mgpu_decode_reads_a_table_wider_than_one_meta_row(interpret):
    """A row's page ids past entry 127 come from the second row of the staged [rows, 128] meta."""
    rng, seed = fresh_rng()
    batch, table_pages, page_size = 2, 140, 8
    num_pages = batch * table_pages
    k_pages, v_pages = make_pool(rng, kv_heads=1, head_dim=64, page_size=page_size,
                                 num_pages=num_pages, dtype=jnp.bfloat16)
    lengths = [table_pages * page_size, int(rng.integers(129 * page_size, 139 * page_size))]
    table, lengths = make_sequences(rng, batch=batch, page_size=page_size,
                                    table_pages=table_pages, num_pages=num_pages, lengths=lengths)
    k_pages = poison_unowned(k_pages, table, lengths, page_size)
    v_pages = poison_unowned(v_pages, table, lengths, page_size)
    q = jnp.asarray(rng.standard_normal((batch, 8, 64)), jnp.bfloat16)

    out = paged_attention_mgpu(q, k_pages, v_pages, table, lengths, pages_per_block=8,
                               num_splits=4, interpret=interpret)
    ref = paged_attention_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                    v_pages.astype(jnp.float32), table, lengths)
    assert not np.isnan(np.asarray(out, np.float32)).any(), f"NaN in output, seed={seed}"
    assert relative_error(out, ref) <= TOLERANCE[jnp.bfloat16], f"seed={seed}"
