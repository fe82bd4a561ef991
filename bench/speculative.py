"""N-gram speculative decoding (`jaxserve.speculative`) end to end: the same greedy requests through one engine
without speculation and with k = ``--k`` draft tokens, side by side in one run; output tokens/s, verify calls,
draft tokens accepted, and whether the tokens are the same (they must be: speculation is greedy decoding's text).

Workloads: ``--workload code`` (the embedded default model, which writes Python, on prompts cut from the standard
library's style: its greedy text repeats itself as code does) or ``--workload repeat`` (random-weight Qwen2.5 shape,
bf16: each prompt a random block said twice and begun a third time, so a draft is the block's continuation, and
the rest of the text is whatever the random model writes). Each engine is warmed on the same prompts first, so
the timed pass compiles nothing.

    python bench/speculative.py --workload repeat --shape 0.5B --k 2 4 8 --batch 1 8 64 --out bench/results/spec   # GPU
    python bench/speculative.py --workload code --k 4 --batch 1 4 --output-len 64                                   # CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CODE_PROMPTS = ["import os\nimport sys\n", "def __init__(self, name, value):\n    self.name = name\n",
                "class Point:\n    def __init__(self, x, y):\n", "for i in range(10):\n    print(i)\n",
                "    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n",
                "if __name__ == '__main__':\n", "try:\n    import _thread\nexcept ImportError:\n",
                "def main():\n    parser = argparse.ArgumentParser()\n"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("code", "repeat"), default="code")
    ap.add_argument("--shape", default="0.5B", help="Qwen2.5 shape of --workload repeat's random weights (or tiny)")
    ap.add_argument("--k", type=int, nargs="+", default=[4], help="draft tokens a verify call")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="requests run together")
    ap.add_argument("--prompt-len", type=int, default=96, help="--workload repeat: prompt tokens")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="a folder: speculative.md lands there")
    args = ap.parse_args()
    import jax
    import numpy as np

    from bench.throughput import random_model, write_lines
    from jaxserve import Engine, EngineConfig, SamplingParams
    from jaxserve.loading import load

    gpu = jax.default_backend() != "cpu"
    if args.workload == "code":
        model = load()
        make_prompts = lambda n: [model.tokenizer.encode(CODE_PROMPTS[i % len(CODE_PROMPTS)]) for i in range(n)]
        what = "embedded default model, Python prompts"
    else:
        model, _ = random_model(args.shape, "bfloat16", tempfile.mkdtemp())
        cfg = model.config
        rng = np.random.default_rng(0)

        def make_prompts(n):
            third = args.prompt_len // 3
            blocks = [rng.integers(2, cfg.vocab_size, size=third).tolist() for _ in range(n)]
            return [b + b + b[: args.prompt_len - 2 * third] for b in blocks]

        what = (f"random-weight Qwen2.5-{args.shape} shape ({'bf16' if gpu else 'float32'}), prompts: a random "
                "block twice and begun again")
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    lines = [f"# Speculative decoding (n-gram), {jax.devices()[0].device_kind}", "",
             f"Workload: {what}; {args.output_len} greedy tokens a request; `{' '.join(sys.argv)}`.", "",
             "| batch | k | tokens/s | vs k=0 | verify calls | drafted | accepted | accepted a verified row | same tokens |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for batch in args.batch:
        prompts = make_prompts(batch)
        base_tokens = None
        base_rate = None
        for k in [0] + list(args.k):
            config = EngineConfig(page_size=16, num_pages=None if gpu else 1024, max_running=batch,
                                  max_tokens_per_step=max(2048, batch), decode_steps=8, prefix_caching=False,
                                  speculative_tokens=k, dtype="bfloat16" if gpu else "float32",
                                  max_model_len=args.prompt_len + args.output_len + 64 if args.workload == "repeat"
                                  else None)
            with Engine(model, config) as engine:
                engine.generate(prompts, params, use_tqdm=False)  # compiles every shape the timed pass takes
                before = engine.stats()
                start = time.perf_counter()
                outs = engine.generate(prompts, params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                after = engine.stats()
            tokens = [o["token_ids"] for o in outs]
            rate = sum(len(t) for t in tokens) / elapsed
            if k == 0:
                base_tokens, base_rate = tokens, rate
            calls = after["spec_verify_calls"] - before["spec_verify_calls"]
            drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
            accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
            per_row = accepted / max(1, calls * batch)
            lines.append(f"| {batch} | {k} | {rate:,.0f} | {rate / base_rate:.2f}x | {calls if k else '-'} | "
                         f"{drafted} | {accepted} | {per_row:.2f} | "
                         f"{'yes' if tokens == base_tokens else 'NO'} |")
            print(lines[-1], flush=True)  # a part cut by its time limit still shows the rows it finished
    write_lines(args.out, "speculative.md", lines)


if __name__ == "__main__":
    main()
