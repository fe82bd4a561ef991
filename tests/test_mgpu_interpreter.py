"""tests/test_paged_attention_mgpu.py in a fresh process on the CPU (that file says why)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="on a GPU the file runs compiled, in this process")
def test_mosaic_gpu_decode_kernel_interpreted_in_a_fresh_process():
    root = pathlib.Path(__file__).parent.parent
    env = {**os.environ, "JAXSERVE_MGPU_ISOLATED": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "-m", "not gpu", "tests/test_paged_attention_mgpu.py"], capture_output=True, text=True,
                          timeout=600, cwd=root, env=env)
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert "6 passed" in done.stdout and "skipped" not in done.stdout, tail
