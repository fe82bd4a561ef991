"""Admission of waiting prompts (the scheduler's prefill planning) on the host-state page pool:
one batched allocation a step must admit exactly what one-by-one admission did, in queue order,
stop at the first prompt that does not fit, evict cached prefixes before giving up, and leave
every page accounted for."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from jaxserve.engine_config import EngineConfig
from jaxserve.request import Request, Status
from jaxserve.sampling import SamplingParams
from jaxserve.scheduler import Scheduler


def make_scheduler(num_pages: int, prefix_caching: bool = False, scheduling_policy: str = "fcfs") -> Scheduler:
    cfg = EngineConfig(num_pages=num_pages, page_size=8, max_running=8, max_tokens_per_step=256,
                       decode_steps=4, batch_buckets=(8,), prefill_buckets=(16, 64, 256), prefix_caching=prefix_caching,
                       scheduling_policy=scheduling_policy)
    return Scheduler(cfg, num_pages, max_model_len=256)


def request(rid: str, prompt: list[int], priority: int = 0) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=4), None, (), priority=priority)


def pages_held(s: Scheduler) -> int:
    return s.num_pages - s._free_pages()


def test_batched_admission_stops_at_the_first_prompt_that_does_not_fit():
    rng = np.random.default_rng()
    s = make_scheduler(num_pages=10)
    # 3 + 4 + 2 pages fit in 10; the 4th (3 pages) does not, and the 5th (1 page) must wait
    # behind it, as one-by-one admission would have left it.
    lengths = [24, 30, 16, 20, 5]
    reqs = [request(f"r{i}", rng.integers(3, 100, size=n).tolist()) for i, n in enumerate(lengths)]
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    assert [(r.request_id, a, b) for r, a, b in plan.prefill] == [("r0", 0, 24), ("r1", 0, 30), ("r2", 0, 16)]
    assert [r.request_id for r in s.running] == ["r0", "r1", "r2"]
    assert all(r.status is Status.RUNNING and r.slot >= 0 for r in s.running)
    assert [r.request_id for r in s.waiting] == ["r3", "r4"]
    assert all(r.slot == -1 and r.computed == 0 and r.prefill_end == 0 for r in s.waiting)
    assert pages_held(s) == 3 + 4 + 2
    assert len(s.free_slots) == 8 - 3
    for r in list(s.running):
        s.remove(r)
    assert pages_held(s) == 0 and sorted(s.free_slots) == list(range(8))


def test_admission_evicts_cached_prefixes_before_giving_up():
    # A finished request's prompt stays in the prefix index, holding its pages; a new prompt
    # that needs them gets them by eviction (the per-request fallback after the batched call).
    rng = np.random.default_rng()
    s = make_scheduler(num_pages=8, prefix_caching=True)
    first = request("a", rng.integers(3, 100, size=48).tolist())  # 6 pages
    s.add(first)
    s.schedule()
    first.computed = first.prefill_end
    s.remove(first)  # inserted into the index: its 6 pages stay held
    assert pages_held(s) == 6
    second = request("b", rng.integers(3, 100, size=40).tolist())  # 5 pages: 2 free, 3 to evict
    third = request("c", rng.integers(3, 100, size=8).tolist())  # would fit only after "b" fails
    s.add(second)
    s.add(third)
    plan = s.schedule()
    assert [r.request_id for r, _, _ in plan.prefill] == ["b", "c"]
    assert pages_held(s) <= 8
    for r in list(s.running):
        s.remove(r)
    s.clear_index()
    assert pages_held(s) == 0


def test_prompts_sharing_a_cached_prefix_are_admitted_together():
    # The claimed rows attach their cached pages before the batched allocation: each allocates
    # only its uncached tail, and the prefix pages are shared, not copied.
    rng = np.random.default_rng()
    s = make_scheduler(num_pages=12, prefix_caching=True)
    prefix = rng.integers(3, 100, size=32).tolist()  # 4 pages
    seed = request("seed", prefix + [7])
    s.add(seed)
    s.schedule()
    seed.computed = seed.prefill_end
    s.remove(seed)
    held = pages_held(s)
    reqs = [request(f"r{i}", prefix + rng.integers(3, 100, size=9).tolist()) for i in range(3)]
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    assert [(r.request_id, a) for r, a, _ in plan.prefill] == [("r0", 32), ("r1", 32), ("r2", 32)]
    assert all(r.cached_tokens == 32 for r in reqs)
    assert pages_held(s) == held + 3 * 2  # each: a 41-token prompt, 4 shared pages + 2 of its own
    for r in reqs:
        s.remove(r)
    s.clear_index()
    assert pages_held(s) == 0


def test_batched_allocations_compile_one_shape_per_power_of_two():
    # Admission and decode reservation pad their rows to a power of two, so the host-side
    # allocation compiles a handful of shapes, not one per count of rows (~0.5 s each, mid-serving).
    rng = np.random.default_rng()
    s = make_scheduler(num_pages=200)
    # Jits of one function share a cache across schedulers: count what this test adds.
    before = s.state._allocate_batch._cache_size()
    for count in (1, 2, 3, 5, 6, 7):
        for i in range(count):
            s.add(request(f"r{count}-{i}", rng.integers(3, 100, size=int(rng.integers(2, 12))).tolist()))
        plan = s.schedule()
        assert len(plan.prefill) == count
        for r in list(s.running):
            s.remove(r)
    assert s.state._allocate_batch._cache_size() - before <= 4  # counts 1, 2, 3, 5-7 -> lengths 1, 2, 4, 8
    assert pages_held(s) == 0


def test_decode_growth_evicts_a_cached_page_that_a_running_request_s_pages_hang_below():
    # X and Y share their first page and are admitted together, so each computes it into a page
    # of its own (Y is owed prompt log-probabilities, so it computes its whole prompt rather than wait
    # for X's); X's prompt is indexed first, so Y's later pages hang below X's first page.
    # Once X is gone that page is held by the index alone but is no leaf: the entries of Y's own
    # pages below it must go (Y keeps the pages) so that it can be freed, rather than Z preempted.
    rng = np.random.default_rng()
    s = make_scheduler(num_pages=8, prefix_caching=True)
    shared = rng.integers(3, 100, size=8).tolist()
    x = request("x", shared + [7])  # 2 pages
    y = Request("y", shared + rng.integers(3, 100, size=16).tolist(), SamplingParams(max_tokens=4, prompt_logprobs=0),
                None, ())  # 3 full pages
    z = request("z", rng.integers(3, 100, size=24).tolist())  # 3 full pages
    for r in (x, y, z):
        s.add(r)
    assert [r.request_id for r, _, _ in s.schedule().prefill] == ["x", "y", "z"]
    assert pages_held(s) == 8
    for r in (x, y, z):
        r.computed = r.prefill_end
        s.after_prefill(r)
    s.remove(x)  # its second page returns; its first stays cached, with Y's pages 2 and 3 below it
    plan = s.schedule()  # 4 decode steps: Y takes the free page, Z needs the cached one
    assert plan.decode == [y, z] and s.num_preemptions == 0
    assert pages_held(s) == 8
    for r in (y, z):
        s.remove(r)
    s.clear_index()
    assert pages_held(s) == 0 and sorted(s.free_slots) == list(range(8))


def test_decode_rows_short_of_pages_take_them_from_cached_prefixes_in_one_eviction(monkeypatch):
    # A server's steady state: finished prompts' pages fill the pool, cached, and every decode call's rows that
    # cross a page boundary need one. One eviction for all of them, then one batched allocation; the one-by-one
    # path (`_grow`: a pool query, an eviction and an allocation a row) is left for rows that still find none.
    rng = np.random.default_rng()
    s = make_scheduler(num_pages=24, prefix_caching=True)
    cached = [request(f"c{i}", rng.integers(3, 100, size=32).tolist()) for i in range(3)]  # 4 full pages each
    running = [request(f"r{i}", rng.integers(3, 100, size=24).tolist()) for i in range(4)]  # 3 full pages each
    for group in (cached, running):
        for r in group:
            s.add(r)
        assert len(s.schedule().prefill) == len(group)
        for r in group:
            r.computed = r.prefill_end
            s.after_prefill(r)
    for r in cached:
        s.remove(r)
    assert s._free_pages() == 0 and pages_held(s) == 24  # 12 cached, 12 running
    grows = []
    monkeypatch.setattr(s, "_grow", lambda *args: grows.append(args) or False)
    plan = s.schedule()  # four decode steps: a fourth page for each running request
    assert plan.decode == running and not grows and s.num_preemptions == 0
    assert pages_held(s) == 24  # the running requests' 16, and 8 of the cached pages
    for r in running:
        s.remove(r)
    s.clear_index()
    assert pages_held(s) == 0 and sorted(s.free_slots) == list(range(8))


def test_waiting_prompts_shorten_decode_calls_only_while_one_could_start():
    # mixed / time_share run one-step decode calls while prompts wait, so a prompt starts as soon as
    # it can; with every slot taken none can until a running request ends, and full calls are run
    # unless a running request's token limit ends it inside one.
    for policy in ("mixed", "time_share"):
        cfg = EngineConfig(num_pages=32, page_size=8, max_running=2, max_tokens_per_step=256, decode_steps=4,
                           batch_buckets=(2,), prefill_buckets=(16, 256), policy=policy, time_share_ratio=1)
        s = Scheduler(cfg, 32, max_model_len=256)
        a, b, c = (Request(rid, [5, 6, 7], SamplingParams(max_tokens=20), None, ()) for rid in "abc")
        s.add(a)
        s.schedule()  # a's prefill
        a.computed = a.prefill_end
        s.add(b)  # a slot is free: b can start, so a decode call meanwhile is one step
        while b.status is not Status.RUNNING:
            plan = s.schedule()
            assert not plan.decode or plan.decode_steps == 1, policy
        b.computed = b.prefill_end
        s.add(c)  # both slots taken, nothing mid-prefill: c cannot start before a or b ends
        plan = s.schedule()
        assert plan.decode == [a, b] and plan.decode_steps == 4 and not plan.prefill, policy
        b.output_ids.extend([1] * 17)  # b ends within 3 tokens: a shorter call frees its slot sooner
        assert s.schedule().decode_steps == 1, policy
        for r in list(s.running):
            s.remove(r)


def test_priority_scheduling_admits_by_priority_then_arrival():
    rng = np.random.default_rng()
    s = make_scheduler(num_pages=6, scheduling_policy="priority")  # room for three prompts of two pages
    priorities = [2, 0, 1, 0, 1]
    reqs = [request(f"r{i}", rng.integers(3, 100, size=16).tolist(), p) for i, p in enumerate(priorities)]
    for r in reqs:
        s.add(r)
    assert [r.request_id for r in s.waiting] == ["r1", "r3", "r2", "r4", "r0"]
    assert [r.request_id for r, _, _ in s.schedule().prefill] == ["r1", "r3", "r2"]
    assert [r.request_id for r in s.waiting] == ["r4", "r0"]
    fcfs = make_scheduler(num_pages=6)
    for r in [request(f"r{i}", r.prompt_ids, p) for i, (r, p) in enumerate(zip(reqs, priorities))]:
        fcfs.add(r)
    assert [r.request_id for r, _, _ in fcfs.schedule().prefill] == ["r0", "r1", "r2"]


def test_priority_scheduling_preempts_the_lowest_priority_where_fcfs_preempts_the_newest():
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 100, size=16).tolist() for _ in range(2)]  # two pages each
    for policy, victim in (("priority", "low"), ("fcfs", "high")):
        s = make_scheduler(num_pages=5, scheduling_policy=policy)
        low, high = request("low", prompts[0], priority=5 if policy == "priority" else 0), request("high", prompts[1])
        s.add(low)  # running alone first; the more urgent one arrives later
        s.schedule()
        low.computed = low.prefill_end
        s.add(high)
        assert [r for r, _, _ in s.schedule().prefill] == [high]
        high.computed = high.prefill_end
        plan = s.schedule()  # 4 decode steps: each needs a third page, and one is free
        assert s.num_preemptions == 1 and [r.request_id for r in s.waiting] == [victim], policy
        assert [r.request_id for r in plan.decode] == [{"low": "high", "high": "low"}[victim]]
        assert s.waiting[0].status is Status.WAITING and s.waiting[0].computed == 0
        for r in list(s.running) + list(s.waiting):
            s.remove(r)
        assert pages_held(s) == 0


def test_the_host_state_stays_on_its_cpu_beside_another_default_device():
    # The scheduler's jitted updates take numpy arguments without a device_put: the committed pool and index decide
    # where they run. With another default device (an accelerator on a GPU machine; a second CPU device here) every
    # update must still run on, and leave the state on, the scheduler's CPU device.
    code = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
from tests.test_scheduler import make_scheduler, request, pages_held
s = make_scheduler(num_pages=8, prefix_caching=True)
home = s.state.cpu
rng = np.random.default_rng()
with jax.default_device(jax.devices("cpu")[1]):
    first = request("a", rng.integers(3, 100, size=48).tolist())
    s.add(first)
    s.schedule()
    first.computed = first.prefill_end
    s.after_prefill(first)
    s.remove(first)
    second = request("b", rng.integers(3, 100, size=40).tolist())
    s.add(second)
    s.schedule()
    s.remove(second)
leaves = jax.tree_util.tree_leaves((s.state.pool, s.state.index))
assert all(x.devices() == {home} for x in leaves), {d for x in leaves for d in x.devices()}
assert home != jax.devices("cpu")[1]
print("ok", pages_held(s))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
