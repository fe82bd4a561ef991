"""Tensor parallelism (`jaxserve.tensor_parallel`): the checks of tests/tp_check.py, in a process of its own with
four CPU devices (JAX fixes its device count when it starts, and the rest of the suite runs on one); and what one
device can check: bad sizes refused by name, the CLI's flag."""

from __future__ import annotations

import pytest

import jaxserve
from jaxserve import Engine, EngineConfig
from jaxserve.config import ModelConfig
from jaxserve.tensor_parallel import check_tensor_parallel
from tests.conftest import run_device_check


def test_split_engines_on_four_devices_match_one_device():
    run_device_check("tp_check.py", "tensor parallel: ok")


def test_bad_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs 2 devices, got 1"):
        Engine(jaxserve.load(), EngineConfig(num_pages=16, tensor_parallel_size=2))
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"must divide num_key_value_heads \(3\) or be a multiple of it"):
        check_tensor_parallel(cfg, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 4 must divide num_attention_heads \(6\)"):
        check_tensor_parallel(cfg, 4)
    check_tensor_parallel(cfg, 3)  # one KV head a device
    check_tensor_parallel(cfg, 6)  # each KV head on two devices


def test_cli_flag_sets_the_engine_config():
    from jaxserve.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["generate", "-tp", "2", "hi"])
    assert engine_config_from_args(args).tensor_parallel_size == 2
    assert EngineConfig.from_dict(EngineConfig(tensor_parallel_size=4).to_dict()).tensor_parallel_size == 4
