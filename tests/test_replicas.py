"""Data-parallel replicas (`jaxserve.replicas`): the checks of tests/replicas_check.py, in a process of its own
with two CPU devices (JAX fixes its device count when it starts, and the rest of the suite runs on one)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import jaxserve
from jaxserve import EngineConfig, Replicas


def test_replicas_on_two_devices_match_one_engine_and_route_by_prefix_and_load():
    root = pathlib.Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "tests" / "replicas_check.py")], capture_output=True,
                          text=True, timeout=600, cwd=root, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "replicas: ok" in done.stdout


def test_bad_replica_counts_are_refused():
    with pytest.raises(ValueError, match="devices must be in"):
        Replicas(jaxserve.load(), EngineConfig(num_pages=16), devices=99)
    with pytest.raises(ValueError, match="balance_slack"):
        Replicas(jaxserve.load(), EngineConfig(num_pages=16), devices=1, balance_slack=-1)
