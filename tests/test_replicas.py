"""Data-parallel replicas (`jaxserve.replicas`): the checks of tests/replicas_check.py, in a process of its own
with two CPU devices (JAX fixes its device count when it starts, and the rest of the suite runs on one)."""

from __future__ import annotations

import jax
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


def test_replicas_sleep_wake_up_and_take_new_weights():
    """Replicas.sleep / wake_up / update_params run the engines' on every replica (here one device): asleep,
    requests are refused; awake, the same greedy tokens; new weights give an engine's tokens on them."""
    m = jaxserve.load()
    greedy = jaxserve.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tuned = jax.tree_util.tree_map(lambda w: w * 1.2, m.params)
    config = EngineConfig(num_pages=64, max_running=4, max_tokens_per_step=64)
    with Replicas(m, config, devices=1) as replicas:
        before = replicas.generate(["import os"], greedy, use_tqdm=False)[0]["token_ids"]
        replicas.sleep()
        assert replicas.sleeping == 1
        with pytest.raises(ValueError, match="asleep"):
            replicas.add_request("import os", greedy)
        replicas.wake_up()
        assert replicas.generate(["import os"], greedy, use_tqdm=False)[0]["token_ids"] == before
        replicas.update_params(tuned)
        after = replicas.generate(["import os"], greedy, use_tqdm=False)[0]["token_ids"]
    with jaxserve.Engine(m.with_params(tuned), config) as engine:
        assert engine.generate(["import os"], greedy, use_tqdm=False)[0]["token_ids"] == after
