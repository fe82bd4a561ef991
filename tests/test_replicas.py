"""Data-parallel replicas (`jaxserve.replicas`): the checks of tests/replicas_check.py, in a process of its own
with two CPU devices (JAX fixes its device count when it starts, and the rest of the suite runs on one)."""

from __future__ import annotations

import pytest

import jaxserve
from jaxserve import EngineConfig, Replicas
from tests.conftest import run_device_check


def test_replicas_on_two_devices_match_one_engine_and_route_by_prefix_and_load():
    run_device_check("replicas_check.py", "replicas: ok", timeout=600)


def test_bad_replica_counts_are_refused():
    with pytest.raises(ValueError, match="devices must be in"):
        Replicas(jaxserve.load(), EngineConfig(num_pages=16), devices=99)
    with pytest.raises(ValueError, match="balance_slack"):
        Replicas(jaxserve.load(), EngineConfig(num_pages=16), devices=1, balance_slack=-1)
