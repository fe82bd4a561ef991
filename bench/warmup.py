"""Engine start-up with and without a filled compile cache (`EngineConfig.compile_cache_dir`).

Each measurement is a fresh process (JAX keeps compiled steps in memory otherwise): build an
Engine on the embedded default model (or `--model`), then `Engine.warmup()`, which compiles
every bucketed step shape. Runs: no cache; an empty cache (filled by this run); the same
cache again (what a restarted server sees).

`--threads 1 8`: instead, one fresh process an entry, no cache, `Engine.warmup(compile_threads=N)` (compiles side by
side on N threads), then a timed `generate` of `--prompts` prompts (greedy, `--max-tokens` each) twice: its step shapes
should all be warm (the compiles it still made are counted), and its tokens/s (the second) shows whether compiles run
side by side chose worse kernels (XLA's autotuning times candidates on the device while other compiles run).

`--generate-twice`: instead, one process calls `jaxserve.generate` twice on the same prompts
(engines alike share their compiled steps, `jaxserve.runner.steps_for`): the first call's
seconds include compiling, the second's should not.

    python bench/warmup.py --max-running 8 --max-tokens-per-step 256
    python bench/warmup.py --generate-twice
    python bench/warmup.py --model /tmp/q05 --threads 1 8 --batch-buckets 1 8 64 256 --max-running 256 \
        --max-tokens-per-step 2048 --num-pages 16384 --decode-steps 8 --prompts 256 --max-tokens 64
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

_THREADS_CHILD = """
import json, sys, time
import jax.monitoring
t0 = time.perf_counter()
from jaxserve import Engine, EngineConfig, SamplingParams
a = json.loads(sys.argv[1])
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: compiles.append(secs) if name == "/jax/core/compile/backend_compile_duration" else None)
cfg = EngineConfig(max_running=a["max_running"], max_tokens_per_step=a["per_step"], num_pages=a["pages"],
                   decode_steps=a["decode_steps"], **({"batch_buckets": a["buckets"]} if a["buckets"] else {}))
t1 = time.perf_counter()
engine = Engine(a["model"], cfg)
t2 = time.perf_counter()
shapes = engine.warmup(sampling=a["sampling"], logprobs=a["logprobs"], compile_threads=a["threads"])
t3 = time.perf_counter()
warm_compiles, warm_compile_s = len(compiles), sum(compiles)
prompts = [[(7 * i + j) % 1000 + 10 for j in range(64 + i % 64)] for i in range(a["prompts"])]
params = SamplingParams(max_tokens=a["max_tokens"], temperature=0.0, ignore_eos=True)
runs = []
for _ in range(2):
    before, t = len(compiles), time.perf_counter()
    engine.generate(prompts, params, use_tqdm=False)
    runs.append((time.perf_counter() - t, len(compiles) - before))
print(json.dumps({"engine_s": t2 - t1, "warmup_s": t3 - t2, "shapes": shapes, "warm_compiles": warm_compiles,
                  "warm_compile_s": warm_compile_s, "gen_s": [r[0] for r in runs], "gen_compiles": [r[1] for r in runs],
                  "tokens": a["prompts"] * a["max_tokens"]}))
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
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="compile threads of each run (see above); without it, the cache runs")
    ap.add_argument("--batch-buckets", type=int, nargs="+", default=None)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--greedy-only", action="store_true", help="warm only the greedy steps (warmup(sampling=False))")
    ap.add_argument("--logprobs", action="store_true", help="warm the log-probability steps too, as a server does")
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
    if args.threads:
        print("| compile threads | warm-up s | shapes | XLA compiles (s summed) | generate s (1st / 2nd) | compiles in "
              "generate | out tok/s (2nd) |\n|---|---|---|---|---|---|---|", flush=True)
        for threads in args.threads:
            child = {"model": args.model, "max_running": args.max_running, "per_step": args.max_tokens_per_step,
                     "pages": args.num_pages, "decode_steps": args.decode_steps, "buckets": args.batch_buckets,
                     "threads": threads, "sampling": not args.greedy_only, "logprobs": args.logprobs,
                     "prompts": args.prompts, "max_tokens": args.max_tokens}
            done = subprocess.run([sys.executable, "-c", _THREADS_CHILD, json.dumps(child)], capture_output=True,
                                  text=True, env=env)
            if done.returncode:
                print(f"| {threads} | failed: {done.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {threads} | {r['warmup_s']:.1f} | {r['shapes']} | {r['warm_compiles']} "
                  f"({r['warm_compile_s']:.0f}) | {r['gen_s'][0]:.2f} / {r['gen_s'][1]:.2f} | "
                  f"{r['gen_compiles'][0]} / {r['gen_compiles'][1]} | {r['tokens'] / r['gen_s'][1]:,.0f} |", flush=True)
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
