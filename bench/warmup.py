"""Engine start-up with and without a filled compile cache (`EngineConfig.compile_cache_dir`).

Each measurement is a fresh process (JAX keeps compiled steps in memory otherwise): build an
Engine on the embedded default model (or `--model`), then `Engine.warmup()`, which compiles
every bucketed step shape. Runs: no cache; an empty cache (filled by this run); the same
cache again (what a restarted server sees).

`--generate-twice`: instead, one process calls `jaxserve.generate` twice on the same prompts
(engines alike share their compiled steps, `jaxserve.runner.steps_for`): the first call's
seconds include compiling, the second's should not.

    python bench/warmup.py --max-running 8 --max-tokens-per-step 256
    python bench/warmup.py --generate-twice
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

_GENERATE_CHILD = """
import json, sys, time
import jaxserve
from jaxserve import EngineConfig, SamplingParams
a = json.loads(sys.argv[1])
model = jaxserve.load(a["model"])
prompts = [f"def f{i}(x):" for i in range(a["prompts"])]
params = SamplingParams(max_tokens=a["max_tokens"], temperature=0.0, ignore_eos=True)
cfg = EngineConfig(max_running=a["max_running"], max_tokens_per_step=a["per_step"], num_pages=a["pages"])
times, outs = [], []
for _ in range(2):
    t = time.perf_counter()
    outs.append([o["token_ids"] for o in jaxserve.generate(model, prompts, params, engine_config=cfg, use_tqdm=False)])
    times.append(time.perf_counter() - t)
print(json.dumps({"first_s": times[0], "second_s": times[1], "same_tokens": outs[0] == outs[1]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--max-tokens-per-step", type=int, default=256)
    ap.add_argument("--num-pages", type=int, default=256)
    ap.add_argument("--generate-twice", action="store_true",
                    help="time two jaxserve.generate calls in one process instead (see above)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts a generate call (--generate-twice)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens a prompt (--generate-twice)")
    args = ap.parse_args()
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    if args.generate_twice:
        child = {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens,
                 "max_running": args.max_running, "per_step": args.max_tokens_per_step, "pages": args.num_pages}
        done = subprocess.run([sys.executable, "-c", _GENERATE_CHILD, json.dumps(child)], capture_output=True,
                              text=True, env=env, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print("| prompts x tokens | first generate s | second generate s | same tokens |\n|---|---|---|---|")
        print(f"| {args.prompts} x {args.max_tokens} | {r['first_s']:.2f} | {r['second_s']:.2f} | "
              f"{r['same_tokens']} |", flush=True)
        return
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
