"""The TMA ring of the Mosaic GPU kernels: `num_slots` shared-memory slots, steps issued ahead.

Owns: the schedule of a loop whose step `i` reads slot `i % num_slots`, filled by an `issue(step,
slot)` that starts that step's TMA copies (arriving on the slot's barrier): before the loop the
first `num_slots - 1` steps are issued; at the top of step `i`, step `i + num_slots - 1` goes
into the slot step `i - 1` read. Never waits on a barrier itself (the kernel does, before it
reads the slot), so each kernel keeps its own barriers and products.

Why here: `jaxserve_kernels.paged_attention_mgpu` and `jaxserve_kernels.skinny_matmul_mgpu` run the same ring;
the refill's safety (the slot's previous reader is done) is the same argument for both, written
once.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax
from jax.experimental import pallas as pl


def prime(issue: Callable[[int, int], None], num_slots: int, num_steps: jax.Array) -> None:
    """Issue steps 0 .. num_slots - 2 (those below `num_steps`) into slots of the same number.

    Example (traced inside a Mosaic GPU kernel):
        prime(issue, num_slots=4, num_steps=n)   # before the loop
    """
    for slot in range(num_slots - 1):
        @pl.when(slot < num_steps)
        def _prime(slot=slot):
            issue(slot, slot)


def advance(issue: Callable[[jax.Array, jax.Array], None], step: jax.Array, num_slots: int,
            num_steps: jax.Array) -> jax.Array:
    """At the top of loop step `step`: issue step `step + num_slots - 1` (if below `num_steps`)
    into the slot that step `step - 1` read, whose products the caller has finished (read back
    their results) before this step began; returns `step`'s own slot.

    Example (traced inside a Mosaic GPU kernel):
        slot = advance(issue, step, num_slots, num_steps)
        plgpu.barrier_wait(bars.at[slot])
    """
    slot = lax.rem(step, num_slots)
    ahead = step + num_slots - 1

    @pl.when(ahead < num_steps)
    def _refill():
        issue(ahead, lax.rem(ahead, num_slots))

    return slot
