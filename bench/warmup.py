"""Engine start-up with and without a filled compile cache (`EngineConfig.compile_cache_dir`).

Each measurement is a fresh process (JAX keeps compiled steps in memory otherwise): build an
Engine on the embedded default model (or `--model`), then `Engine.warmup()`, which compiles
every bucketed step shape. Runs: no cache; an empty cache (filled by this run); the same
cache again (what a restarted server sees).

    python bench/warmup.py --max-running 8 --max-tokens-per-step 256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from jaxserve import Engine, EngineConfig
a = json.loads(sys.argv[1])
cfg = EngineConfig(max_running=a["max_running"], max_tokens_per_step=a["per_step"], num_pages=a["pages"],
                   compile_cache_dir=a["cache"])
t1 = time.perf_counter()
engine = Engine(a["model"], cfg)
t2 = time.perf_counter()
shapes = engine.warmup()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "engine_s": t2 - t1, "warmup_s": t3 - t2, "shapes": shapes}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--max-tokens-per-step", type=int, default=256)
    ap.add_argument("--num-pages", type=int, default=256)
    args = ap.parse_args()
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cache = tempfile.mkdtemp(prefix="jaxserve-xla-")
    print("| run | engine s | warm-up s | shapes |\n|---|---|---|---|")
    for label, cache_dir in (("no cache", None), ("empty cache", cache), ("filled cache (restart)", cache)):
        child = {"model": args.model, "max_running": args.max_running, "per_step": args.max_tokens_per_step,
                 "pages": args.num_pages, "cache": cache_dir}
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(child)], capture_output=True, text=True,
                              env=env, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {label} | {r['engine_s']:.1f} | {r['warmup_s']:.1f} | {r['shapes']} |", flush=True)


if __name__ == "__main__":
    main()
