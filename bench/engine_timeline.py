"""Where an offline engine run's wall time goes: the GPU's busy time and its idle gaps, each gap
named by the host work that was running when it opened.

`bench/throughput.py` times the batch-256 run at ~250 ms (H200, session 17) against ~215 ms of
device work (the decode step alone times 1.41 ms x 128 steps, plus the prefill): this script
traces one warm run of the same workload with `jax.profiler`, marks the engine's host phases
(scheduling, dispatching and collecting prefill and decode calls) as trace annotations, and
reports the device's busy time (the union of its kernels), its idle time split by the host phase
open at each gap's start, and the longest gaps with the kernels on either side.

    python bench/engine_timeline.py --batch 256 --out /tmp/timeline
    python bench/engine_timeline.py --tiny --batch 4 --output-len 16   # CPU smoke run (no GPU streams)
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode_step import gpu_stream_events  # noqa: E402
from bench.throughput import QWEN25_05B, TINY, engine_config, make_checkpoint, write_lines  # noqa: E402
from jaxserve import Engine, SamplingParams  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.loading import LoadedModel  # noqa: E402
from jaxserve.weights import load_hf_params  # noqa: E402

# The engine's host phases (owner path from the engine, method), innermost last where they nest:
# a dispatch or collect runs inside step, the runner's call and the sampling inputs inside a dispatch.
PHASES = (("", "step"), ("scheduler", "schedule"), ("", "_dispatch_prefill"), ("", "_collect_prefill"),
          ("", "_dispatch_decode"), ("", "_collect_decode"), ("", "_chain_rows"), ("", "_sampling_inputs"),
          ("scheduler", "page_table"), ("scheduler", "capacities"), ("scheduler", "reserve"),
          ("scheduler", "after_prefill"), ("scheduler", "remove_many"), ("runner", "decode"), ("runner", "prefill"))


def phase_name(owner: str, attr: str) -> str:
    return f"{owner + '.' if owner else ''}{attr.lstrip('_')}"


def annotate(engine: Engine, spans: list[tuple[str, float, float]]) -> None:
    """Wrap the engine's phases (on this instance and its scheduler and runner only) and
    `jax.device_get` (the host's waits for the device) in `jax.profiler.TraceAnnotation`s named
    ``engine.<phase>``, so a trace shows them on the host's clock beside the kernels; every call
    also appends ``(phase, start s, end s)`` to ``spans`` (perf_counter), traced or not."""
    def wrap(owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                with jax.profiler.TraceAnnotation(f"engine.{name}"):
                    return fn(*a, **k)
            finally:
                spans.append((name, t0, time.perf_counter()))
        setattr(owner, attr, functools.wraps(fn)(timed))

    for owner_path, attr in PHASES:
        wrap(getattr(engine, owner_path) if owner_path else engine, attr, phase_name(owner_path, attr))
    wrap(jax, "device_get", "device_get")


def host_summary(spans: list[tuple[str, float, float]], start: float, wall_s: float) -> list[str]:
    """Markdown lines for an untraced run from its phase spans: where the host's time went, how
    long it waited on the device (`device_get`), and the stretches where the device cannot have
    been busy because the host had not yet sent, or had already read back, all of its work."""
    def first(name: str, key=lambda s: s[1]):
        xs = [s for s in spans if s[0] == name]
        return min(xs, key=key) if xs else None

    end = start + wall_s
    waits = [s for s in spans if s[0] == "device_get"]
    lines = [f"- untraced run: wall {wall_s * 1e3:.1f} ms, host waiting on the device (device_get) "
             f"{sum(e - s for _, s, e in waits) * 1e3:.1f} ms in {len(waits)} reads"]
    first_call = first("runner.prefill")
    if first_call:
        lines.append(f"- generate's start to the first prefill call's dispatch returning: "
                     f"{(first_call[2] - start) * 1e3:.1f} ms; the last read of the device's results to "
                     f"generate's end: {(end - max(e for _, _, e in waits)) * 1e3:.1f} ms" if waits else "")
    prefill_reads = [s for s in spans if s[0] == "collect_prefill"]
    decodes = [s for s in spans if s[0] == "runner.decode"]
    if prefill_reads and decodes:
        last_prefill = max(prefill_reads, key=lambda s: s[1])
        after = [d for d in decodes if d[1] >= last_prefill[1]]
        if after:
            lines.append(f"- the last prefill call's collect starting to the next decode call's dispatch "
                         f"returning: {(after[0][2] - last_prefill[1]) * 1e3:.1f} ms")
    return lines + [""] + phase_table("host phase (untraced)", ((name, (e - s) * 1e6) for name, s, e in spans))


def phase_table(heading: str, durations_us) -> list[str]:
    """Markdown table of `(phase, µs)` pairs: calls, total ms and mean µs a phase, biggest first."""
    totals: dict[str, list[float]] = {}
    for name, us in durations_us:
        totals.setdefault(name, []).append(us)
    return [f"| {heading} | calls | ms | mean µs |", "|---|---|---|---|"] + [
        f"| {name} | {len(ds)} | {sum(ds) / 1e3:.2f} | {np.mean(ds):.0f} |"
        for name, ds in sorted(totals.items(), key=lambda kv: -sum(kv[1]))]


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals, sorted and disjoint."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def host_phase_at(t: float, spans: list[tuple[float, float, str]]) -> str:
    """The innermost engine phase open at time t (the latest-starting span holding it), or
    "outside step" (the caller's own loop, `generate`'s bookkeeping)."""
    best = None
    for s, e, name in spans:
        if s <= t < e and (best is None or s >= best[0]):
            best = (s, e, name)
    return best[2] if best else "outside step"


def summarize(kernels: list[dict], events: list[dict], wall_s: float, min_gap_us: float = 5.0,
              top: int = 12) -> list[str]:
    """Markdown lines: busy / idle split of the traced run, idle by host phase, longest gaps."""
    if not kernels:
        return ["no GPU stream events in the trace (CPU run?): nothing to summarize"]
    ks = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in kernels)
    busy = merge([(s, e) for s, e, _ in ks])
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"][len("engine."):]) for e in events
             if e.get("ph") == "X" and str(e.get("name", "")).startswith("engine.") and "dur" in e]
    first, last = busy[0][0], busy[-1][1]
    busy_us = sum(e - s for s, e in busy)
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1) if busy[i + 1][0] - busy[i][1] >= min_gap_us]
    small_us = (last - first) - busy_us - sum(e - s for s, e in gaps)
    by_phase: dict[str, list[float]] = {}
    for s, e in gaps:
        by_phase.setdefault(host_phase_at(s, spans), []).append(e - s)
    steps = [s for s in spans if s[2] == "step"]
    run = [s for s in spans if s[2] == "generate"]
    lines = [f"- wall of the run {wall_s * 1e3:.1f} ms; first to last kernel {(last - first) / 1e3:.1f} ms; "
             f"GPU busy {busy_us / 1e3:.1f} ms ({len(ks)} kernels); engine.step calls {len(steps)}, "
             f"host time in them {sum(e - s for s, e, _ in steps) / 1e3:.1f} ms",
             f"- idle between kernels: {len(gaps)} gaps of >= {min_gap_us:g} µs, {sum(e - s for s, e in gaps) / 1e3:.2f} ms; "
             f"shorter gaps {small_us / 1e3:.2f} ms; before the first kernel / after the last (run's wall, host "
             f"clock) {(wall_s * 1e6 - (last - first)) / 1e3:.1f} ms"
             + (f" ({(first - run[0][0]) / 1e3:.1f} / {(run[0][1] - last) / 1e3:.1f} ms of engine.generate)" if run else ""),
             ""] + phase_table("host phase", ((name, e - s) for s, e, name in spans))
    lines += ["",
             "| host phase open when the gap began | gaps | idle ms | longest µs |", "|---|---|---|---|"]
    for phase, ds in sorted(by_phase.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {phase} | {len(ds)} | {sum(ds) / 1e3:.2f} | {max(ds):.0f} |")
    lines += ["", f"Longest {top} gaps (offset from the first kernel):", "",
              "| at ms | idle µs | host phase | kernel before | kernel after |", "|---|---|---|---|---|"]
    names = {s: n for s, _, n in ks}
    ends = {}
    for s, e, n in ks:
        ends[e] = n
    ends_sorted = sorted(ends)
    for s, e in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        before = ends[ends_sorted[int(np.searchsorted(ends_sorted, s, side="right")) - 1]]
        after = names.get(e, "?")
        lines.append(f"| {(s - first) / 1e3:.2f} | {e - s:.0f} | {host_phase_at(s, spans)} | {before[:60]} | "
                     f"{after[:60]} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--impl", default="pallas")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--cprofile", type=int, default=0, help="also profile one more run with cProfile: top N functions")
    ap.add_argument("--cpu-as-device", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write timeline.md here (the trace stays in a temp folder)")
    args = ap.parse_args()

    shape = TINY if args.tiny else QWEN25_05B
    path = tempfile.mkdtemp()
    make_checkpoint(shape, path)
    cfg = ModelConfig.from_pretrained(path)
    m = LoadedModel(load_hf_params(path, cfg, "bfloat16"), cfg, None, path, "bench")
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, size=(args.batch, args.prompt_len)).tolist()
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    engine = Engine(m, engine_config(args.batch, args.prompt_len, args.output_len, args.decode_steps, args.impl))
    for _ in range(2):  # warm every shape the run takes, then once more untraced
        engine.generate(prompts, params, use_tqdm=False)
    spans: list[tuple[str, float, float]] = []
    annotate(engine, spans)
    t = time.perf_counter()
    engine.generate(prompts, params, use_tqdm=False)
    untraced = host_summary(spans, t, time.perf_counter() - t)
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t = time.perf_counter()
        with jax.profiler.TraceAnnotation("engine.generate"):
            outs = engine.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
    assert all(len(o["token_ids"]) == args.output_len for o in outs)
    profile_lines = []
    if args.cprofile:  # Python's view of the same run (untraced; cProfile slows Python ~1.5-2x)
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.runcall(engine.generate, prompts, params, use_tqdm=False)
        stream = io.StringIO()
        pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(args.cprofile)
        profile_lines = ["", f"cProfile of one more run ({time.perf_counter() - t:.3f} s profiled), by own time:", "",
                         "```", *[ln for ln in stream.getvalue().splitlines() if ln.strip()][-(args.cprofile + 1):], "```"]
    engine.close()
    kernels, events = gpu_stream_events(trace_dir)
    if args.cpu_as_device:  # smoke-test the summary on a CPU trace: XLA's host ops stand in for kernels
        kernels = [e for e in events if e.get("ph") == "X" and "dur" in e and not str(e.get("name", "")).startswith("engine.")
                   and e.get("name", "").startswith(("fusion", "jit_", "custom-call", "dot", "while"))]
    lines = [f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; batch {args.batch}, prompt "
             f"{args.prompt_len}, output {args.output_len}, {args.decode_steps} decode steps a call; "
             f"{args.batch * args.output_len / wall:,.0f} output tokens/s in the traced run", ""]
    lines += untraced + ["", "Traced run:", ""] + summarize(kernels, events, wall) + profile_lines
    write_lines(args.out, "timeline.md", lines)


if __name__ == "__main__":
    main()
