"""Several fake CPU devices for a bench script's multi-device smoke run on the CPU (replicas, tensor parallelism).

XLA fixes its device count when JAX starts, so a script calls `fake_cpu_devices` before it imports jax.
"""

from __future__ import annotations

import argparse
import os


def add_cpu_devices_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cpu-devices", type=int, default=0, help="CPU only: fake this many devices")


def fake_cpu_devices(count: int) -> None:
    """Have the CPU backend show ``count`` devices (0: leave XLA's flags alone)."""
    if count:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
