"""The benchmark scripts run only on the GPU machine, so CI would not notice one that no
longer parses; compiling each catches that much here."""

from __future__ import annotations

import pathlib
import py_compile

import pytest

BENCH = sorted((pathlib.Path(__file__).parent.parent / "bench").glob("*.py"))


@pytest.mark.parametrize("script", BENCH, ids=[p.name for p in BENCH])
def test_bench_script_compiles(script, tmp_path):
    py_compile.compile(str(script), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_engine_timeline_attributes_idle_gaps_to_host_phases():
    """The timeline's arithmetic on a made-up trace: busy time is the union of overlapping
    kernels, and each gap goes to the innermost engine phase open when it began."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    from bench.engine_timeline import summarize

    kernels = [dict(ts=0, dur=100, name="a"), dict(ts=50, dur=100, name="b"),  # overlap: busy 0-150
               dict(ts=400, dur=100, name="c"), dict(ts=503, dur=97, name="d")]  # 250 µs gap, then 3 µs
    host = [dict(ph="X", ts=0, dur=1000, name="engine.step"),
            dict(ph="X", ts=140, dur=300, name="engine.collect_decode")]
    lines = summarize(kernels, host, wall_s=1e-3, min_gap_us=5)
    text = "\n".join(lines)
    assert "GPU busy 0.3 ms (4 kernels)" in text
    assert "1 gaps of >= 5 µs, 0.25 ms" in text and "shorter gaps 0.00 ms" in text
    assert "| collect_decode | 1 | 0.25 | 250 |" in text
    assert "| 0.15 | 250 | collect_decode | b | c |" in text
