"""Negative control of tests/test_fp8_kv.py's GPU check of checkpoint KV scales: with the attention output's V scale
left out (``model._unscale`` made the identity), the compiled decode paths must fail the test's bound.

    python3 bench/kv_scale_mutation.py --batches 4 64
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxserve.model as model_module  # noqa: E402
from jaxserve.loading import load  # noqa: E402
from tests import test_fp8_kv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 64])
    args = ap.parse_args()
    base = load()
    model_module._unscale = lambda out, scales: out  # both engines of the check run the mutated model
    for batch in args.batches:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                test_fp8_kv.test_checkpoint_kv_scales_through_the_compiled_decode_paths(base, pathlib.Path(tmp), batch)
            except AssertionError as error:
                print(f"batch {batch}: V scale left out -> the test fails, as it must ({str(error)[:120]})")
            else:
                print(f"batch {batch}: V scale left out and the test still PASSES: it is not sensitive enough")


if __name__ == "__main__":
    main()
