"""The engine's host cost per generated token, with the device work taken out.

On an H100 the 0.5B model's decode step is ~1.4-2.3 ms for the whole batch, so at batch 256
every microsecond of Python per token matters: the host has ~9 µs per token to stay under the
device (bench/results/throughput.md). This script measures the host side alone: the Engine
runs as usual (scheduler, page pool and radix index on the host CPU, sampling inputs, stop
rules, detokenization when a tokenizer is given) but its Runner is replaced by a stub that
returns random tokens at once, so what is timed is exactly the work a GPU run has to hide.

    python bench/host_overhead.py --batches 1 64 256 --output-len 128
    python bench/host_overhead.py --batches 256 --profile      # where the time goes
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve import Engine, EngineConfig, SamplingParams  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.loading import LoadedModel  # noqa: E402
from jaxserve.model import init_params  # noqa: E402
from jaxserve.sampling import SampleOutput  # noqa: E402


class StubRunner:
    """Stands in for ``Runner``: same call signatures, instant random tokens as host arrays."""

    def __init__(self, runner, vocab_size: int, seed: int = 0) -> None:
        self.compiled_shapes = runner.compiled_shapes
        self.kv = runner.kv
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)

    def _out(self, shape: tuple[int, ...], num_top: int) -> SampleOutput:
        return SampleOutput(tokens=self.rng.integers(3, self.vocab_size, size=shape, dtype=np.int32),
                            logprobs=np.zeros(shape, np.float32),
                            top_ids=np.zeros((*shape, num_top), np.int32),
                            top_logprobs=np.zeros((*shape, num_top), np.float32),
                            ranks=np.ones(shape, np.int32), id_logprobs=np.zeros((*shape, 0), np.float32),
                            id_ranks=np.zeros((*shape, 0), np.int32))

    def prefill(self, tokens, q_start, lengths, block_tables, batch, steps, counts=None, seen=None, num_top=0,
                greedy=False, logprobs=True, **options):
        return self._out((tokens.shape[0],), num_top)

    def decode(self, tokens, positions, limits, block_tables, batch, steps, num_steps, counts=None, seen=None,
               num_top=0, greedy=False, logprobs=True, return_last=False, **options):
        out = self._out((num_steps, len(positions)), num_top)
        return (out, out.tokens[-1]) if return_last else out


def tiny_model(vocab_size: int, with_tokenizer: bool = False) -> LoadedModel:
    """A 2-layer model (its forward never runs); ``with_tokenizer``: the embedded default
    model's tokenizer and vocabulary, so every generated token is also detokenized."""
    tokenizer = None
    if with_tokenizer:
        from jaxserve.loading import load

        tokenizer = load().tokenizer
        vocab_size = len(tokenizer)
    cfg = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=64,
                                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=4096))
    params = init_params(cfg, jax.random.key(0))
    return LoadedModel(params, cfg, tokenizer, tempfile.gettempdir(), "stub")


def run_streaming(engine: Engine, prompts, params) -> None:
    """What the server's engine thread does: step, then read every request's new text."""
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
        for rid in ids:
            engine.requests[rid].take_delta()
    for rid in ids:
        engine.release(rid)


def measure(m: LoadedModel, batch: int, prompt_len: int, output_len: int, decode_steps: int,
            prefix_caching: bool, profile: bool, stream: bool = False) -> dict[str, float]:
    cfg = EngineConfig(page_size=16, max_running=batch, max_tokens_per_step=max(batch, min(8192, batch * prompt_len)),
                       decode_steps=decode_steps, prefix_caching=prefix_caching,
                       max_model_len=prompt_len + output_len + 16,
                       num_pages=batch * ((prompt_len + output_len) // 16 + 2) + 64)
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, m.config.vocab_size, size=(batch, prompt_len)).tolist()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    with Engine(m, cfg) as engine:
        engine.runner = StubRunner(engine.runner, m.config.vocab_size)
        engine.generate(prompts, params, use_tqdm=False)  # compiles the host-state functions
        gc.collect()  # the previous batch's engine is garbage now: keep its collection out of the timing
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        if stream:
            run_streaming(engine, prompts, params)
        else:
            engine.generate(prompts, params, use_tqdm=False)
        if profiler:
            profiler.disable()
        total = time.perf_counter() - start
    if profiler:
        pstats.Stats(profiler).sort_stats(os.environ.get("HOST_PROFILE_SORT", "tottime")).print_stats(int(os.environ.get("HOST_PROFILE_TOP", "15")))
    tokens = batch * output_len
    return dict(batch=batch, total_s=total, us_per_token=total / tokens * 1e6,
                ms_per_call=total / (output_len / decode_steps) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=151936)
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tokenizer", action="store_true",
                    help="detokenize every token with the default model's tokenizer (what a server pays)")
    ap.add_argument("--stream", action="store_true",
                    help="read every request's new text after each engine step, as the server does")
    args = ap.parse_args()
    m = tiny_model(args.vocab_size, args.tokenizer)
    print(f"host: {os.cpu_count()} cpus; jax {jax.__version__} ({jax.default_backend()}); "
          f"prompt {args.prompt_len}, output {args.output_len}, {args.decode_steps} decode steps per call, "
          f"prefix caching {'on' if args.prefix_caching else 'off'}, "
          f"detokenization {'on' if args.tokenizer else 'off'}, {'streamed' if args.stream else 'generate'}")
    print("| batch | host s per run | host µs per token | host ms per decode call |")
    print("|---|---|---|---|")
    for b in args.batches:
        r = measure(m, b, args.prompt_len, args.output_len, args.decode_steps, args.prefix_caching, args.profile,
                    args.stream)
        print(f"| {b} | {r['total_s']:.3f} | {r['us_per_token']:.2f} | {r['ms_per_call']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
