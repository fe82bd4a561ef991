"""Structured outputs' cost: the same workload unconstrained and constrained, side by side in one run.

A random-weight Qwen2-shaped model (default the 0.5B shape, bf16) with a byte-level tokenizer of Qwen2.5's
vocabulary size (151,643 tokens: the 256 bytes and random ASCII pieces of 2-16 bytes, no merges: no Qwen
tokenizer can be downloaded here, and the masks' cost depends on the vocabulary's size and token lengths, not
on which pieces it holds). For each batch every request generates exactly ``--output-len`` tokens:

- ``none``: unconstrained greedy decoding (the engine's usual multi-step calls);
- ``regex``: ``[a-z0-9 ,.]*`` text (never complete, and EOS's logit is 0 (its output row zeroed), so greedy
  never ends it: every request runs its full length, the masking's own cost, one step a call, a mask a row a step);
- ``json``: a JSON schema (an object of a bounded string, an integer, an enum and a list of numbers), which the
  model completes at its own length; the row reports tokens/s over what it produced.

Reported per batch and constraint, after a warm run, over ``--repeats`` timed runs: the median run's output tokens/s
(with the range), mean TPOT and the engine's decode-call and host seconds; for the constraints the compile time and
the DFA states whose masks were computed, and the step shapes the timed runs had to compile (0 unless their outputs
differed from the warm run's); every constrained output of every timed run is checked against its regex (complete
matches must fully match, cut ones must still be a live prefix).

    python bench/structured.py --batches 1 64 256 --output-len 128
    python bench/structured.py --tiny --batches 2 --output-len 16      # CPU smoke run

``--mixes N``: instead, a server's traffic: rounds of requests whose constraints are random mixes of N regexes of
different sizes (the engine's decode calls once compiled for each size of their guides' combined tables; one guide
pool since): the wall time of each round, and the guided decode shapes compiled.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve import Engine, EngineConfig, SamplingParams  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.loading import LoadedModel  # noqa: E402
from jaxserve.structured import GuideState, StructuredOutputs  # noqa: E402
from jaxserve.weights import load_hf_params  # noqa: E402

from bench.throughput import QWEN25_05B, TINY  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
    "role": {"enum": ["admin", "user", "guest"]},
    "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 6}},
    "required": ["name", "age", "role"]}
TEXT_REGEX = r"[a-z0-9 ,.]*"


def make_checkpoint(shape: dict, path: str, tokens: int) -> int:
    """A random-weight checkpoint and a byte-level tokenizer of ``tokens`` entries + EOS; returns EOS's id."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_char = bytes_to_unicode()
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789{}[]\":,._-\n", np.uint8)
    vocab = {to_char[b]: b for b in range(256)}
    while len(vocab) < tokens:
        piece = bytes(rng.choice(alphabet, size=int(rng.integers(2, 17))))
        vocab.setdefault("".join(to_char[b] for b in piece), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, bos_token_id=eos, eos_token_id=eos, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # EOS's logit 0, below the best of any allowed set: greedy runs every request its length
        model.get_output_embeddings().weight[eos] = 0
    model.save_pretrained(path, safe_serialization=True)
    return eos


def run(engine: Engine, prompts, params) -> tuple[list[dict], float, dict]:
    before, shapes = engine.stats(), len(engine.runner.compiled_shapes)
    t = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    after = engine.stats()
    # "compiled": step shapes this run compiled (none after a warm run of the same requests, unless their outputs,
    # and with them the row counts the decode calls see, came out otherwise: the float32 stream's adds are not
    # bitwise reproducible on the GPU).
    return outs, seconds, dict({k: after[k] - before[k] for k in ("decode_call_s", "host_s")},
                               compiled=len(engine.runner.compiled_shapes) - shapes)


def check(engine: Engine, spec: StructuredOutputs, outs: list[dict]) -> str:
    """Every output against its constraint: complete ones match in full, cut ones are still live prefixes."""
    guide = engine.structured_guide(spec)
    pattern = re.compile(spec.to_regex())
    bad = 0
    for o in outs:
        state = GuideState(guide)
        state.advance(o["token_ids"])
        text_ok = pattern.fullmatch(o["text"]) is not None if o["finish_reason"] == "stop" else True
        bad += state.broken or not text_ok or (o["finish_reason"] == "stop" and not state.final)
    return f"{len(outs) - bad}/{len(outs)} outputs valid"


def time_dispatch(engine: Engine, batch: int, context: int) -> None:
    """Median ms of ``runner.decode``'s return (dispatch) and of the call waited on, per variant."""
    from jaxserve.sampling import make_batch

    rows, width, live = engine.decode_shape(batch, context + 8)
    pos = np.full(rows, context, np.int32)
    limits = np.where(np.arange(rows) < batch, pos + 8, 0).astype(np.int32)
    tables = np.arange(rows * width, dtype=np.int32).reshape(rows, width) % engine.scheduler.num_pages
    words = -(-engine.model.config.vocab_size // 32)
    for steps, masked in ((1, False), (1, True), (8, False)):
        sb = make_batch([], rows, allowed=np.full((rows, words), 0xFFFFFFFF, np.uint32) if masked else None)
        call = (np.zeros(rows, np.int32), pos, limits, tables, sb, np.zeros(rows, np.int32), steps)
        dispatch, whole = [], []
        for i in range(23):
            t = time.perf_counter()
            out = engine.runner.decode(*call, greedy=True, logprobs=False, live_rows=live if live < rows else None)
            d = time.perf_counter() - t
            jax.block_until_ready(out.tokens)
            if i >= 3:
                dispatch.append(d)
                whole.append(time.perf_counter() - t)
        print(f"batch {batch} ({rows} rows), {steps} step(s), mask {masked}: dispatch {np.median(dispatch) * 1e3:.3f} ms, "
              f"call waited on {np.median(whole) * 1e3:.3f} ms", flush=True)


def mixes(engine: Engine, count: int, rounds: int, batch: int, output_len: int, rng) -> list[str]:
    """``rounds`` generate calls of ``batch`` prompts, each constrained by one of a random 1-4 of ``count``
    regexes (``[a-z]{1,k}!`` for k spread over 2..4*count: their DFAs' sizes differ) or unconstrained."""
    specs = [StructuredOutputs(regex=f"[a-z]{{1,{k}}}!") for k in np.linspace(2, 4 * count, count).astype(int)]
    for spec in specs:
        engine.structured_guide(spec)
    lines = ["| round | constraints | wall s | guided decode shapes compiled |", "|---|---|---|---|"]
    walls = []
    for r in range(rounds):
        chosen = rng.choice(count, size=rng.integers(1, min(4, count) + 1), replace=False)
        params = [SamplingParams(max_tokens=output_len, temperature=0.0,
                                 structured_outputs=specs[chosen[i % len(chosen)]] if i % 4 else None)
                  for i in range(batch)]
        t = time.perf_counter()
        engine.generate([[300 + i, 301, 302, 303] for i in range(batch)], params, use_tqdm=False)
        walls.append(time.perf_counter() - t)
        guided = sum(1 for shape in engine.runner.compiled_shapes if "guides" in shape)
        lines.append(f"| {r} | {sorted(chosen.tolist())} | {walls[-1]:.3f} | {guided} |")
        print(lines[-1], flush=True)
    lines.append(f"\n{rounds} rounds: {sum(walls):.2f} s in all, median {np.median(walls):.3f} s, "
                 f"{sum(1 for s in engine.runner.compiled_shapes if 'guides' in s)} guided decode shapes compiled")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dispatch", type=int, default=0,
                    help="instead: at this batch, time one decode call's dispatch (host until it returns) and its "
                         "whole run, 1 step with and without an allowed-token mask and 8 steps without")
    ap.add_argument("--profile", type=int, default=0,
                    help="instead: cProfile one regex-constrained run at this batch (the host's share of a step)")
    ap.add_argument("--mixes", type=int, default=0,
                    help="instead: rounds of random mixes of this many regexes at the first batch (compiles, wall time)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs a row (after a warm one): the table gives the median run's numbers and the range")
    args = ap.parse_args()

    shape = dict(TINY, vocab_size=4096) if args.tiny else QWEN25_05B
    tokens = 4000 if args.tiny else 151_643
    path = tempfile.mkdtemp()
    eos = make_checkpoint(shape, path, tokens)
    from jaxserve.tokenizer import load_tokenizer

    cfg = ModelConfig.from_pretrained(path)
    m = LoadedModel(load_hf_params(path, cfg, "bfloat16"), cfg, load_tokenizer(path), path, "bench")
    lines = [f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; model "
             f"{'tiny' if args.tiny else 'Qwen2.5-0.5B shape'}, vocabulary {cfg.vocab_size} ({tokens} tokens + EOS "
             f"{eos}); prompt {args.prompt_len}, output {args.output_len} tokens, greedy", "",
             "| batch | constraint | output tok/s, median (range) | mean TPOT ms | decode calls s | host s | compile s | "
             "mask states | shapes compiled in the timed runs | check |", "|---|---|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(1)
    if args.profile or args.dispatch:
        args.batches = [args.profile or args.dispatch]
    for batch in args.batches:
        prompts = rng.integers(300, 151_000 if not args.tiny else 4000, size=(batch, args.prompt_len)).tolist()
        config = EngineConfig(page_size=16, max_running=batch, max_tokens_per_step=max(batch, min(8192, batch * args.prompt_len)),
                              dtype="bfloat16", decode_steps=8, prefix_caching=False,
                              max_model_len=args.prompt_len + args.output_len + 16,
                              num_pages=batch * ((args.prompt_len + args.output_len) // 16 + 2) + 64)
        with Engine(m, config) as engine:
            if args.mixes:
                lines[2:] = mixes(engine, args.mixes, args.rounds, batch, args.output_len, rng)
                break
            if args.dispatch:
                time_dispatch(engine, batch, args.prompt_len)
                continue
            cases = [("none", None), ("regex", StructuredOutputs(regex=TEXT_REGEX)), ("json", StructuredOutputs(json=SCHEMA))]
            for name, spec in cases:
                compile_s, states = None, None
                if spec is not None:
                    t = time.perf_counter()
                    guide = engine.structured_guide(spec)
                    compile_s = time.perf_counter() - t
                # The regex rows run their full length as the unconstrained ones (ignore_eos) do: EOS's logit is 0
                # (make_checkpoint), so greedy takes it only where nothing else is allowed (a complete JSON object).
                params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=spec is None,
                                        structured_outputs=spec)
                if args.profile and name != "regex":
                    continue
                if args.profile:
                    import cProfile
                    import pstats

                    run(engine, prompts, params)
                    prof = cProfile.Profile()
                    prof.enable()
                    outs, seconds, split = run(engine, prompts, params)
                    prof.disable()
                    print(f"batch {batch}: {sum(len(o['token_ids']) for o in outs)} tokens in {seconds:.3f} s, {split}")
                    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
                    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                    continue
                run(engine, prompts, params)  # warm: every shape compiled, the masks of the states it visits made
                # A timed run is 0.1-0.5 s on a GPU: one of them read a stall of the host as the row's rate (masked46,
                # session 66), so the row is the median of --repeats runs and their range.
                timed = [run(engine, prompts, params) for _ in range(args.repeats)]
                rates = [sum(len(o["token_ids"]) for o in outs) / seconds for outs, seconds, _ in timed]
                order = np.argsort(rates)
                outs, seconds, split = timed[order[len(order) // 2]]
                tpot = np.mean([o["tpot"] for o in outs if o["tpot"]]) * 1e3
                verdict = "-" if spec is None else min((check(engine, spec, o) for o, _, _ in timed),
                                                      key=lambda v: int(v.split("/")[0]))
                if spec is not None:
                    states = len(guide._masks)
                spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else ""
                lines.append(f"| {batch} | {name} | {np.median(rates):,.0f}{spread} | {tpot:.3f} | "
                             f"{split['decode_call_s']:.3f} | {split['host_s']:.3f} | "
                             f"{'-' if compile_s is None else f'{compile_s:.2f}'} | {'-' if states is None else states} | "
                             f"{sum(t[2]['compiled'] for t in timed)} | {verdict} |")
                print(lines[-1], flush=True)
                if spec is not None:
                    lens = [len(o["token_ids"]) for o in outs]
                    print(f"  {name}: output lengths {min(lens)}-{max(lens)}, finish {sorted({o['finish_reason'] for o in outs})}, "
                          f"first: {outs[0]['text'][:120]!r}", flush=True)
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "structured.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
