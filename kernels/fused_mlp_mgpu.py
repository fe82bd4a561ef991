"""The decode step's MLP in one Mosaic GPU kernel: gate_up + SwiGLU, then down_proj added into the stream.

Owns: `fused_mlp_mgpu`, `acc + swiglu(x @ w_gate_up.T) @ w_down.T` for up to 64 rows (the MLP of
ACCUMULATE's decode glue, `acc` the float32 residual stream, updated in place), its plan
(`plan_for`) and its jnp reference. Never decides when it runs (`jaxserve.model.FUSED_MLP` does).

Why: at 64 rows the decode step is bound by what each launch costs besides its bytes (start, first
HBM round trip, epilogue: ~2 µs a projection on the H200, bench/results/decode_step.md sessions 19
and 22), and a kernel cannot start early across XLA's command buffers. Run as two kernels, down_proj
(8.7 MB of weights at Qwen2.5-0.5B) starts streaming only when gate_up has finished. Here each program
issues its down_proj weight tiles first, so they stream while gate_up runs; the down product then
waits only for the few gate_up outputs its K range needs (an L2 round trip), not for a launch.

How: one program an SM at most (`programs` <= the SM count: every program is resident at once,
so a program may wait for another without deadlock). Phase 1 is `skinny_matmul_mgpu`'s "swiglu"
tile: gate_up item `i` (weight rows `block_n1` of each half) runs in program `i mod programs`, so
programs below `items1 - programs` run two items; each item's `[M, block_n1]` SwiGLU output goes to
`h` (a bf16 `[M, F]` buffer in global memory) and, once written, counts on its K split's semaphore.
Phase 2: the programs with one gate_up item (the last `items2` of them) each own one down_proj tile
(`block_n2` output columns x `boxes2` 64-wide K boxes): its weights were issued into shared memory at
the kernel's start; it waits until its split's `boxes2 * 64 / block_n1` gate_up items have counted,
copies their `h` columns (L2), multiplies on WGMMA and adds its float32 sums into `acc` by a TMA
reduction, as the "accumulate" epilogue does. Semaphores (`pl.get_global`: they persist between
launches) are returned to zero by each split's first column block, once every reader of the split
has passed, so the next launch finds them at zero.

On the CPU (Mosaic GPU's interpreter runs one program at a time and has no global semaphores) the
two phases run as two kernels over the same bodies: the plan, tiling and copies are checked there;
the waits and counts only compiled (`-m gpu`).

Limits: bf16; M a multiple of 8 up to 64; K a multiple of 128; F a multiple of `block_n1` and of
`boxes2 * 64`; N (hidden) whole blocks of `block_n2`; `programs` at least half the gate_up items.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mgpu_pipeline as ring
from kernels import pallas_compat as compat
from kernels.skinny_matmul import swiglu_sums
from kernels.skinny_matmul_mgpu import _SMEM_BYTES, _transforms

_ROWS = 64  # WGMMA's M granule: the accumulator's rows
_BOX = 64  # a 128-byte swizzled row of bf16: one TMA box of K
MAX_ROWS = 64
# Phase 1's tile: `skinny_matmul_mgpu.TILES["swiglu"]` as measured at 64 rows (session 19: 32 weight
# rows of each half, steps of two boxes, 3 slots).
BLOCK_N1, SLOTS1, BOXES1 = 32, 3, 2
_ACC_REGS = 128  # float32 accumulator registers a thread, at most (beyond, the epilogue spills)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How `fused_mlp_mgpu` splits an `[M, K] -> [M, F] -> [M, N]` MLP over its programs.

    `items1` gate_up items of `block_n1` rows (of each half) over `programs`; `col_blocks2 x splits2`
    down_proj items of `block_n2` columns and `boxes2` K boxes, one each on the last `items2` programs.
    """

    programs: int
    block_n1: int
    slots1: int
    boxes1: int
    block_n2: int
    boxes2: int
    items1: int
    col_blocks2: int
    splits2: int

    @property
    def items2(self) -> int:
        return self.col_blocks2 * self.splits2

    @property
    def items_per_split(self) -> int:
        """gate_up items whose SwiGLU columns one down_proj K split reads."""
        return self.boxes2 * _BOX // self.block_n1

    def smem_bytes(self) -> int:
        """Shared memory a program uses: down_proj's weight tiles for the whole kernel, then phase
        1's ring and output tile or phase 2's h tiles and output tile (scopes that reuse the space)."""
        w2 = self.boxes2 * self.block_n2 * _BOX * 2
        phase1 = self.slots1 * self.boxes1 * (_ROWS + 2 * self.block_n1) * _BOX * 2 + _ROWS * self.block_n1 * 2
        phase2 = self.boxes2 * _ROWS * _BOX * 2 + _ROWS * self.block_n2 * 4
        return w2 + max(phase1, phase2) + 2048  # + barriers and alignment


def _sm_count() -> int | None:
    device = jax.devices()[0]
    return getattr(device, "core_count", None) if device.platform == "gpu" else None


def plan_for(m: int, k: int, inter: int, hidden: int, programs: int | None = None) -> Plan | None:
    """The plan `fused_mlp_mgpu` runs for `x [m, k]`, gate_up `[2 * inter, k]` and down `[hidden,
    inter]`, or None where no plan fits. `programs` defaults to the SM count (on the CPU: one a
    gate_up item). Among the down_proj tilings that fit (items <= the programs with one gate_up item,
    shared memory, accumulator registers) it takes the one with the fewest bytes a program.

    Example:
        >>> p = plan_for(64, 896, 4864, 896, programs=132)
        >>> (p.items1, p.block_n2, p.boxes2, p.items2)
        (152, 224, 4, 76)
    """
    if not (8 <= m <= MAX_ROWS and m % 8 == 0 and k % (_BOX * BOXES1) == 0 and inter % BLOCK_N1 == 0
            and inter % _BOX == 0):
        return None
    items1 = inter // BLOCK_N1
    if programs is None:
        programs = min(_sm_count() or items1, items1)
    programs = min(programs, items1)
    singles = 2 * programs - items1  # programs with one gate_up item
    if singles <= 0:
        return None
    boxes = inter // _BOX
    best = None
    for block_n2 in range(8, min(hidden, 256) + 1, 8):
        if hidden % block_n2 or _ROWS * block_n2 > _ACC_REGS * 128:
            continue
        for boxes2 in range(1, boxes + 1):
            if boxes % boxes2 or (boxes2 * _BOX) % BLOCK_N1:
                continue
            plan = Plan(programs, BLOCK_N1, SLOTS1, BOXES1, block_n2, boxes2, items1, hidden // block_n2,
                        boxes // boxes2)
            if plan.items2 > singles or plan.smem_bytes() > _SMEM_BYTES:
                continue
            cost = boxes2 * (block_n2 + _ROWS)  # K boxes of weights and of h a program reads in phase 2
            if best is None or cost < best[0]:
                best = (cost, plan)
    return None if best is None else best[1]


def fused_mlp_reference(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, acc: jax.Array) -> jax.Array:
    """`acc + swiglu(x @ w_gate_up.T) @ w_down.T` in float32, with the kernels' roundings: the SwiGLU
    output in x's dtype (what gate_up's kernel writes), the down product accumulated in float32.

    Example:
        >>> x = jnp.ones((8, 128), jnp.bfloat16); wgu = jnp.zeros((64, 128), jnp.bfloat16)
        >>> fused_mlp_reference(x, wgu, jnp.zeros((16, 32), jnp.bfloat16), jnp.ones((8, 16))).sum().item()
        128.0
    """
    inter = w_gate_up.shape[0] // 2
    sums = jnp.dot(x.astype(jnp.float32), w_gate_up.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)
    h = swiglu_sums(sums[:, :inter], sums[:, inter:], x.dtype).astype(x.dtype)
    return acc + jnp.dot(h.astype(jnp.float32), w_down.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)


def _gate_up_items(x_ref, wgu_ref, h_ref, sems, x_smem, w_smem, o_smem, bars, *, plan: Plan, k_steps: int,
                   rows: int, row_tile: int, inter: int, interpret: bool):
    """Phase 1: this program's gate_up items, each one's SwiGLU columns written to `h` and counted."""
    pid = lax.axis_index("p")
    num_steps = jnp.int32(k_steps)

    def item_at(item):
        def k_at(step, b):
            return pl.ds((step * plan.boxes1 + b) * _BOX, _BOX)

        def issue(step, slot):
            for b in range(plan.boxes1):
                at = k_at(step, b)
                for half, offset in enumerate((0, inter)):
                    plgpu.copy_gmem_to_smem(wgu_ref.at[pl.ds(offset + item * plan.block_n1, plan.block_n1), at],
                                            w_smem.at[slot, half, b], bars.at[slot])
                plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, rows), at], x_smem.at[slot, b, pl.ds(0, rows)],
                                        bars.at[slot])

        for slot in range(min(plan.slots1 - 1, k_steps)):  # ring.prime, with the step count static
            issue(slot, slot)
        zeros = jnp.zeros((row_tile, plan.block_n1), jnp.float32)
        if not interpret:
            zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)

        def body(step, accs):
            slot = ring.advance(issue, step, plan.slots1, num_steps)
            plgpu.barrier_wait(bars.at[slot])
            if interpret:  # the interpreter's WGMMA takes no transposed operand
                return tuple(acc + sum(lax.dot_general(x_smem[slot, b], w_smem[slot, half, b],
                                                       (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                                       for b in range(plan.boxes1))
                             for half, acc in enumerate(accs))

            def products(acc_refs):
                for b in range(plan.boxes1):
                    for half, acc_ref in enumerate(acc_refs):
                        plgpu.wgmma(acc_ref, x_smem.at[slot, b], w_smem.at[slot, half, b].transpose((1, 0)))

            return pl.run_state(products)(tuple(plgpu.ACC.init(acc) for acc in accs))

        gate, up = lax.fori_loop(0, num_steps, body, (zeros, zeros))
        o_smem[...] = swiglu_sums(gate, up, o_smem.dtype).astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows)], h_ref.at[pl.ds(0, rows), pl.ds(item * plan.block_n1,
                                                                                         plan.block_n1)])
        # The columns must have landed before they count (and before o_smem takes the next item).
        plgpu.wait_smem_to_gmem(0)
        if sems is not None:
            plgpu.semaphore_signal(sems.at[item // plan.items_per_split], 1, memory_scope="gpu")

    for j in range(pl.cdiv(plan.items1, plan.programs)):
        @pl.when(pid + j * plan.programs < plan.items1)
        def _item(j=j):
            item_at(pid + j * plan.programs)


def _down_item(h_ref, acc_ref, sems, w2_smem, w2_bar, h_smem, h_bar, o_smem, *, plan: Plan, rows: int,
               row_tile: int, col: jax.Array, split: jax.Array, interpret: bool):
    """Phase 2: one down_proj tile, once its K split's SwiGLU columns are all in `h`."""
    if sems is not None:
        plgpu.semaphore_wait(sems.at[split], plan.items_per_split, decrement=False, memory_scope="gpu")
        plgpu.semaphore_signal(sems.at[plan.splits2 + split], 1, memory_scope="gpu")  # passed
    for b in range(plan.boxes2):
        plgpu.copy_gmem_to_smem(h_ref.at[pl.ds(0, rows), pl.ds((split * plan.boxes2 + b) * _BOX, _BOX)],
                                h_smem.at[b, pl.ds(0, rows)], h_bar)
    plgpu.barrier_wait(w2_bar)
    plgpu.barrier_wait(h_bar)
    cols = pl.ds(col * plan.block_n2, plan.block_n2)
    if interpret:
        total = sum(lax.dot_general(h_smem[b], w2_smem[b], (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) for b in range(plan.boxes2))
        # The interpreter has no TMA reductions; it runs the programs one at a time.
        acc_ref[pl.ds(0, rows), cols] = acc_ref[pl.ds(0, rows), cols] + total[:rows]
    else:
        zeros = plgpu.layout_cast(jnp.zeros((row_tile, plan.block_n2), jnp.float32), plgpu.Layout.WGMMA)

        def products(acc_ref_):
            for b in range(plan.boxes2):
                plgpu.wgmma(acc_ref_, h_smem.at[b], w2_smem.at[b].transpose((1, 0)))

        o_smem[...] = pl.run_state(products)(plgpu.ACC.init(zeros))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows)], acc_ref.at[pl.ds(0, rows), cols], reduction_op="add")
        plgpu.wait_smem_to_gmem(0)
    if sems is not None:
        # Every reader of the split has passed its wait: back to zero for the next launch.
        @pl.when(col == 0)
        def _reset():
            plgpu.semaphore_wait(sems.at[plan.splits2 + split], plan.col_blocks2, memory_scope="gpu")
            plgpu.semaphore_wait(sems.at[split], plan.items_per_split, memory_scope="gpu")


def _program(x_ref, wgu_ref, wd_ref, acc_ref, h_ref, w2_smem, w2_bar, *, plan: Plan, rows: int, k: int,
             inter: int, phases: tuple[int, ...], interpret: bool):
    pid = lax.axis_index("p")
    row_tile = _ROWS
    first2 = plan.programs - plan.items2
    has2 = pid >= first2
    q = jnp.maximum(pid - first2, 0)
    col, split = q % plan.col_blocks2, q // plan.col_blocks2
    sems = None if interpret else pl.get_global(plgpu.SemaphoreType.REGULAR((2 * plan.splits2,)))
    if 2 in phases:  # down_proj's weights first: they need nothing from phase 1
        @pl.when(has2)
        def _prefetch():
            for b in range(plan.boxes2):
                plgpu.copy_gmem_to_smem(wd_ref.at[pl.ds(col * plan.block_n2, plan.block_n2),
                                                  pl.ds((split * plan.boxes2 + b) * _BOX, _BOX)],
                                        w2_smem.at[b], w2_bar)
    tf = _transforms(_BOX, x_ref.dtype)
    if 1 in phases:
        pl.run_scoped(
            functools.partial(_gate_up_items, x_ref, wgu_ref, h_ref, sems, plan=plan, k_steps=k // (_BOX * plan.boxes1),
                              rows=rows, row_tile=row_tile, inter=inter, interpret=interpret),
            plgpu.SMEM((plan.slots1, plan.boxes1, row_tile, _BOX), x_ref.dtype, transforms=tf),
            plgpu.SMEM((plan.slots1, 2, plan.boxes1, plan.block_n1, _BOX), wgu_ref.dtype, transforms=tf),
            plgpu.SMEM((row_tile, plan.block_n1), h_ref.dtype, transforms=_transforms(plan.block_n1, h_ref.dtype)),
            plgpu.Barrier(num_arrivals=plan.boxes1 * 3, num_barriers=plan.slots1),
        )
    if 2 in phases:
        @pl.when(has2)
        def _phase2():
            pl.run_scoped(
                functools.partial(_down_item, h_ref, acc_ref, sems, w2_smem, w2_bar, plan=plan, rows=rows,
                                  row_tile=row_tile, col=col, split=split, interpret=interpret),
                plgpu.SMEM((plan.boxes2, row_tile, _BOX), h_ref.dtype, transforms=tf),
                plgpu.Barrier(num_arrivals=plan.boxes2),
                plgpu.SMEM((row_tile, plan.block_n2), jnp.float32, transforms=_transforms(plan.block_n2, jnp.float32)),
            )


@functools.partial(jax.jit, static_argnames=("plan", "interpret"))
def _call(x, w_gate_up, w_down, acc, h, *, plan: Plan, interpret: bool):
    m, k = x.shape
    inter = w_gate_up.shape[0] // 2
    # One kernel compiled; the interpreter runs the phases as two (it has no global semaphores and
    # runs one program at a time, so a program could not wait for a later one).
    launches = ((1,), (2,)) if interpret else ((1, 2),)

    def stateful(refs):
        x_ref, wgu_ref, wd_ref, acc_ref, h_ref = refs
        for phases in launches:
            name = f"fused_mlp_mgpu_{2 * inter}x{k}" + ("" if len(phases) == 2 else f"_phase{phases[0]}")
            mesh = plgpu.Mesh(grid=(plan.programs,), grid_names=("p",), kernel_name=name)

            @pl.core_map(mesh, name=name, **compat.mgpu_interpret_kwargs(interpret))
            def _(phases=phases):
                pl.run_scoped(
                    functools.partial(_program, x_ref, wgu_ref, wd_ref, acc_ref, h_ref, plan=plan, rows=m, k=k,
                                      inter=inter, phases=phases, interpret=interpret),
                    plgpu.SMEM((plan.boxes2, plan.block_n2, _BOX), w_down.dtype, transforms=_transforms(_BOX, w_down.dtype)),
                    plgpu.Barrier(num_arrivals=plan.boxes2),
                )

    _, _, _, acc, h = pl.run_state(stateful)((x, w_gate_up, w_down, acc, h))
    return acc, h


def fused_mlp_mgpu(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, acc: jax.Array, *,
                   h: jax.Array | None = None, programs: int | None = None,
                   interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """`acc + swiglu(x @ w_gate_up.T) @ w_down.T` (float32, in acc's buffer) in one launch; see the module.

    Args:
        x: `[M, K]` bf16, M a multiple of 8 up to 64 (the normed stream).
        w_gate_up: `[2F, K]` bf16, gate's rows first.
        w_down: `[N, F]` bf16.
        acc: `[M, N]` float32 (the residual stream), updated in place where donated or an intermediate.
        h: the `[M, F]` bf16 buffer the SwiGLU output passes through (None: a new one); returned, so a
            caller running several MLPs can hand the same buffer to each.
        programs: programs launched (None: the SM count; on the CPU one a gate_up item).
        interpret: Mosaic GPU's interpreter; None picks it on the CPU backend.

    Returns:
        `(acc + mlp, h)`.

    Example:
        >>> x = jnp.ones((8, 128), jnp.bfloat16); wgu = jnp.zeros((128, 128), jnp.bfloat16)
        >>> out, _ = fused_mlp_mgpu(x, wgu, jnp.zeros((64, 64), jnp.bfloat16), jnp.ones((8, 64)))
        >>> out.sum().item()
        512.0
    """
    if x.ndim != 2 or w_gate_up.ndim != 2 or w_down.ndim != 2 or w_gate_up.shape[1] != x.shape[1] \
            or w_down.shape[1] * 2 != w_gate_up.shape[0]:
        raise ValueError(f"x must be [M, K], w_gate_up [2F, K] and w_down [N, F], got {x.shape}, "
                         f"{w_gate_up.shape} and {w_down.shape}")
    if not all(a.dtype == jnp.bfloat16 for a in (x, w_gate_up, w_down)):
        raise ValueError(f"x, w_gate_up and w_down must be bfloat16, got {x.dtype}, {w_gate_up.dtype}, "
                         f"{w_down.dtype}")
    m, k = x.shape
    inter, hidden = w_down.shape[1], w_down.shape[0]
    if acc.shape != (m, hidden) or acc.dtype != jnp.float32:
        raise ValueError(f"acc must be float32 [{m}, {hidden}], got {acc.dtype} {acc.shape}")
    interpret = compat.resolve_interpret(interpret)
    plan = plan_for(m, k, inter, hidden, programs)
    if plan is None:
        raise ValueError(f"no fused MLP plan for x {x.shape}, w_gate_up {w_gate_up.shape}, w_down {w_down.shape} "
                         f"over {programs} programs: M a multiple of 8 up to {MAX_ROWS}, K of {_BOX * BOXES1}, "
                         f"F of {BLOCK_N1} and {_BOX}, programs at least half of F / {BLOCK_N1}")
    sms = None if interpret else _sm_count()
    if sms is not None and plan.programs > sms:
        # A program waits for others' outputs: all of them must be resident at once.
        raise ValueError(f"programs must be at most the GPU's {sms} SMs, got {plan.programs}")
    if h is None:
        h = jnp.zeros((m, inter), x.dtype)
    if h.shape != (m, inter) or h.dtype != x.dtype:
        raise ValueError(f"h must be {x.dtype} [{m}, {inter}], got {h.dtype} {h.shape}")
    return _call(x, w_gate_up, w_down, acc, h, plan=plan, interpret=bool(interpret))


def supports(m: int, k: int, inter: int, hidden: int) -> bool:
    """Whether `fused_mlp_mgpu` takes this MLP with its default programs.

    Example:
        >>> supports(64, 896, 4864, 896), supports(12, 896, 4864, 896)
        (True, False)
    """
    return plan_for(m, k, inter, hidden) is not None
