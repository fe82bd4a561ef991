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
