"""Version shim for the Pallas Triton API: one import point for JAX 0.10.x and 0.11.x.

Owns: where `dot`, `load`, `store` and `CompilerParams` of the Pallas Triton backend
live, the rule for picking interpret mode, `next_pow2` (Triton block shapes must be
powers of two, so every kernel pads to one), and `triton_call`, the `pallas_call` every kernel
makes; for the Mosaic GPU kernels, `mgpu_load` (a whole ref into registers on either JAX) and
`mgpu_interpret_kwargs` (the interpreter's keyword). Never holds kernel logic.

JAX 0.10.2 moved `pl.dot` into `jax.experimental.pallas.triton`; 0.11 deprecates the
Triton backend as a whole (it still works on 0.11.2, the GPU machine's version) and
warns on import. Kernels import from here so that the move and the warning are handled
once.
"""

from __future__ import annotations

import inspect
import warnings

import jax
from jax.experimental import pallas as pl

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plgpu

dot = getattr(plgpu, "dot", None) or pl.dot
load = plgpu.load
store = plgpu.store
atomic_add = plgpu.atomic_add
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def mgpu_load(ref, layout):
    """A whole shared-memory ref loaded into registers of `layout` (Mosaic GPU): jax 0.11 takes the
    ref alone (an index beside it is deprecated); 0.10 requires the index.

    Example (traced inside a Mosaic GPU kernel):
        bias = mgpu_load(b_smem, plgpu.Layout.WGMMA.reduce(0))
    """
    from jax.experimental.pallas import mosaic_gpu

    if inspect.signature(mosaic_gpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return mosaic_gpu.load(ref, (), layout=layout)
    return mosaic_gpu.load(ref, layout=layout)


def resolve_interpret(interpret: bool | None) -> bool:
    """Interpret mode when asked, or by default when JAX runs on the CPU.

    Example:
        >>> resolve_interpret(None) == (jax.default_backend() == "cpu")
        True
    """
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): a Triton block dimension.

    Example:
        >>> next_pow2(7), next_pow2(16), next_pow2(1)
        (8, 16, 1)
    """
    return 1 << max(0, (n - 1).bit_length())


def compiler_params(num_warps: int, num_stages: int):
    """Triton launch parameters (warps per program, software-pipeline depth)."""
    return CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_call(kernel, *operands, grid: tuple[int, ...], out_shape, name: str, interpret: bool,
                num_warps: int, num_stages: int = 1, in_specs=None, out_specs=None,
                input_output_aliases: dict[int, int] | None = None):
    """`pl.pallas_call(kernel, ...)(*operands)` as the kernels here make it: every ref the whole
    array (the kernels index refs themselves; no scalar prefetch on Triton) unless specs are
    given, Triton launch parameters, a name for profiles.

    Example:
        >>> import jax.numpy as jnp
        >>> def double(x_ref, o_ref):
        ...     o_ref[...] = 2 * x_ref[...]
        >>> triton_call(double, jnp.ones(8), grid=(1,), out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
        ...             name="double", interpret=True, num_warps=1).tolist()[:2]
        [2.0, 2.0]
    """
    whole = pl.no_block_spec
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole] * len(operands) if in_specs is None else in_specs,
        out_specs=jax.tree.map(lambda _: whole, out_shape) if out_specs is None else out_specs,
        out_shape=out_shape,
        input_output_aliases=input_output_aliases or {},
        interpret=interpret,
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        name=name,
    )(*operands)


def barrier(interpret: bool) -> None:
    """A program-wide barrier (bar.sync) between its threads' memory operations; nothing in
    interpret mode, where a program is sequential and the primitive has no rule."""
    if not interpret:
        plgpu.debug_barrier()


def exp2(x: jax.Array, *, ftz: bool, interpret: bool) -> jax.Array:
    """In-kernel float32 `2 ** x`; with `ftz`, compiled, one `ex2.approx.ftz.f32` (a single
    MUFU.EX2) in place of libdevice's `__nv_exp2f`, which Triton lowers to the same approximation
    wrapped in a denormal guard (a compare and two predicated multiplies an element: Nsight
    Compute on the H200, session 28). Results below 2^-126 flush to zero, which a softmax
    never misses. Interpreted (no inline assembly there): `jnp.exp2`.

    Example (traced inside a Triton kernel):
        p = exp2(s - m[:, None], ftz=True, interpret=False)
    """
    import jax.numpy as jnp

    if not ftz or interpret or x.dtype != jnp.float32:
        return jnp.exp2(x)
    [out] = plgpu.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return out


def mgpu_interpret_kwargs(interpret: bool) -> dict:
    """`plgpu.kernel`'s keyword for Mosaic GPU's interpreter (CPU runs), empty when compiled: its
    parameters class lives in a private module on both jax versions.

    Example:
        >>> mgpu_interpret_kwargs(False)
        {}
    """
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return {"interpret": InterpretGPUParams()}
