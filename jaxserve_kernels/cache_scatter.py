"""Cache scatter: write new tokens' K/V rows into their pages of the paged KV pool, in place.

Owns: the Pallas kernel that vLLM calls `reshape_and_cache`, and its jnp reference.
Never allocates pages or decides slots (the KV pool does); never copies the pool.

Pool layout (shared interface): `k_pages`, `v_pages` are `[kv_heads, num_pages, page_size,
head_dim]`; a token's slot is `page * page_size + offset`. The kernel views the pool as
`[kv_heads, num_pages * page_size, head_dim]` (a free reshape) so a slot is a row index,
and each program copies one token's rows (all KV heads) to its slot.
The pools are aliased to the outputs (`input_output_aliases`); with the caller donating
them under `jax.jit`, the update is in place and costs O(tokens), not O(pool).

Backend: Pallas Triton lowering (see `jaxserve_kernels.pallas_compat` for why), interpret mode on
the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxserve_kernels import pallas_compat as compat
from jaxserve_kernels.kv_dtype import to_pool


def _check_shapes(k_pages, v_pages, k, v, slot_mapping) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "k_pages and v_pages must both be [kv_heads, num_pages, page_size, head_dim], "
            f"got {k_pages.shape} and {v_pages.shape}")
    kv_heads, _, _, head_dim = k_pages.shape
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != (kv_heads, head_dim):
        raise ValueError(
            f"k and v must be [tokens, {kv_heads}, {head_dim}], got {k.shape} and {v.shape}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {slot_mapping.shape}")


def cache_scatter_reference(k_pages, v_pages, k, v, slot_mapping):
    """jnp reference of `cache_scatter` (XLA scatter; in place only if XLA chooses).

    Example:
        >>> kp = vp = jnp.zeros((2, 4, 8, 64))
        >>> kv = jnp.ones((3, 2, 64))
        >>> kp, vp = cache_scatter_reference(kp, vp, kv, kv, jnp.array([0, 9, -1]))
    """
    _check_shapes(k_pages, v_pages, k, v, slot_mapping)
    kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_slots = num_pages * page_size
    slots = slot_mapping.astype(jnp.int32)
    # Negative or out-of-pool slots go to an out-of-bounds row, which mode="drop" skips.
    rows = jnp.where((slots >= 0) & (slots < num_slots), slots, num_slots)
    if rows.shape[0] == 1:
        # XLA turns a one-row scatter into a dynamic-update-slice, which inside the decode
        # loop it then copies, the whole pool once per layer and step (a batch-1 CPU step grew
        # from 5 to 250 ms with a 268 MB pool). A second, dropped row keeps it a scatter.
        rows = jnp.concatenate([rows, jnp.full((1,), num_slots, rows.dtype)])
        k = jnp.concatenate([k, jnp.zeros_like(k)])
        v = jnp.concatenate([v, jnp.zeros_like(v)])

    def scatter(pages, new):
        flat = pages.reshape(kv_heads, num_slots, head_dim)
        flat = flat.at[:, rows].set(to_pool(jnp.swapaxes(new, 0, 1), pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return scatter(k_pages, k), scatter(v_pages, v)


def _scatter_kernel(slot_ref, k_ref, v_ref, _k_pool_in, _v_pool_in, k_pool_ref, v_pool_ref,
                    *, num_slots: int):
    # One program per token: a token's rows are contiguous `head_dim` runs, and a scalar
    # branch on its slot skips padding without a masked scatter (whose masked-off lanes
    # would still need a harmless address).
    token = pl.program_id(0)
    slot = slot_ref[token]

    @pl.when((slot >= 0) & (slot < num_slots))
    def _write():
        for head in range(k_ref.shape[1]):
            k_pool_ref[head, slot, :] = to_pool(k_ref[token, head, :], k_pool_ref.dtype)
            v_pool_ref[head, slot, :] = to_pool(v_ref[token, head, :], v_pool_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps"))
def _cache_scatter(k_pages, v_pages, k, v, slot_mapping, *, interpret: bool, num_warps: int):
    kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_slots = num_pages * page_size
    flat_shape = (kv_heads, num_slots, head_dim)
    k_out, v_out = compat.triton_call(
        functools.partial(_scatter_kernel, num_slots=num_slots),
        slot_mapping.astype(jnp.int32), k, v, k_pages.reshape(flat_shape), v_pages.reshape(flat_shape),
        grid=(k.shape[0],),
        out_shape=[jax.ShapeDtypeStruct(flat_shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(flat_shape, v_pages.dtype)],
        input_output_aliases={3: 0, 4: 1}, interpret=interpret, num_warps=num_warps, name="cache_scatter")
    return k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)


def cache_scatter(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                  slot_mapping: jax.Array, *, interpret: bool | None = None,
                  num_warps: int = 1) -> tuple[jax.Array, jax.Array]:
    """Write `k[t]`, `v[t]` into pool slot `slot_mapping[t]` for every token, in place.

    Args:
        k_pages, v_pages: `[kv_heads, num_pages, page_size, head_dim]` pools; donate them
            (`jax.jit(..., donate_argnums=...)`) so the update does not copy the pool.
        k, v: `[tokens, kv_heads, head_dim]`, cast to the pool dtype (`jaxserve_kernels.kv_dtype.to_pool`:
            saturated into an fp8 pool).
        slot_mapping: `[tokens]` int32, `page * page_size + offset`; a negative (padding)
            or out-of-pool slot writes nothing. Each slot may appear at most once.
        interpret: Pallas interpret mode; None picks it on the CPU backend.
        num_warps: warps per program (one program per token).

    Returns:
        The updated `(k_pages, v_pages)`.

    Example:
        >>> kp = vp = jnp.zeros((2, 4, 16, 64), jnp.bfloat16)
        >>> new = jnp.ones((2, 2, 64), jnp.bfloat16)
        >>> kp, vp = cache_scatter(kp, vp, new, new, jnp.array([17, -1], jnp.int32))
    """
    _check_shapes(k_pages, v_pages, k, v, slot_mapping)
    if k.shape[0] == 0:
        return k_pages, v_pages
    return _cache_scatter(k_pages, v_pages, k, v, slot_mapping,
                          interpret=compat.resolve_interpret(interpret),
                          num_warps=num_warps)
