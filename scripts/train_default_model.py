"""Train jaxserve's embedded default model: a small Qwen2 on Python standard-library source.

Owns the training loop (JAX + optax, from scratch, wall-clock budget), the held-out
evaluation, writing the Hugging Face checkpoint folder (weights, config, tokenizer,
generation config) and checking that the folder loads through ``jaxserve.load`` and
``transformers`` with the same greedy output. It never builds the corpus
(``build_corpus.py``) and never edits the engine.

Example (the shipped model; run on a GPU, ~5 minutes of training)::

    python scripts/build_corpus.py --out .corpus
    PYTHONPATH=. python scripts/train_default_model.py --corpus .corpus --out jaxserve/default_model --seconds 300

A CPU smoke run of every step with a tiny model: add ``--smoke``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxserve.config import ModelConfig
from jaxserve.model import Qwen2ForCausalLM, init_params, param_count
from jaxserve.weights import save_hf_checkpoint

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    "]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=".corpus")
    p.add_argument("--out", default="jaxserve/default_model")
    p.add_argument("--summary", default=None,
                   help="where the losses, samples and checks go (default: training_summary.json in --corpus)")
    p.add_argument("--seconds", type=float, default=300.0, help="training wall-clock budget (sets the step count)")
    p.add_argument("--steps", type=int, default=0, help="fixed step count instead of --seconds")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--evals", type=int, default=10, help="held-out evaluations during training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--smoke", action="store_true", help="tiny model, 12 steps: checks the whole script on a CPU")
    args = p.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 64, 2, 4, 2, 128
        args.batch, args.seq, args.steps, args.warmup, args.evals = 4, 64, 12, 4, 2
    return args


def lr_at(step: jax.Array, total: jax.Array, peak: float, warmup: int) -> jax.Array:
    """Linear warm-up, then cosine decay to 10% of ``peak`` at ``total`` steps."""
    step = step.astype(jnp.float32)
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1), 0.0, 1.0)
    return peak * jnp.minimum(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + jnp.cos(math.pi * progress)))


def heldout_windows(ids: np.ndarray, seq: int) -> np.ndarray:
    """Non-overlapping ``[n, seq + 1]`` windows covering the held-out stream (the tail shorter than one is dropped)."""
    n = (ids.size - 1) // seq
    return np.stack([ids[i * seq: i * seq + seq + 1] for i in range(n)]).astype(np.int32)


def make_fns(cfg: ModelConfig, args: argparse.Namespace, tx: optax.GradientTransformation):
    train_model = Qwen2ForCausalLM(cfg, jnp.bfloat16)

    def loss_fn(params, batch):
        # float32 master weights; the forward runs in bfloat16 (attention and logits stay float32).
        p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
        logits, _ = train_model.apply({"params": p16}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def train_step(params, opt_state, data, key, step, total):
        starts = jax.random.randint(key, (args.batch,), 0, data.shape[0] - args.seq - 1)
        batch = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (args.seq + 1,)))(starts)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        lr = lr_at(step, total, args.lr, args.warmup)
        params = optax.apply_updates(params, jax.tree_util.tree_map(lambda u: lr * u, updates))
        return params, opt_state, loss, optax.global_norm(grads)

    def eval_sum(params, windows, weights, dtype):
        model = Qwen2ForCausalLM(cfg, dtype)
        p = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
        logits, _ = model.apply({"params": p}, windows[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean(axis=1)
        return jnp.sum(nll * weights)

    return (jax.jit(train_step, donate_argnums=(0, 1)),
            jax.jit(eval_sum, static_argnums=3))


def heldout_loss(eval_sum, params, windows: np.ndarray, batch: int, dtype) -> float:
    """Mean next-token loss over all held-out windows (batches padded with zero-weight rows)."""
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        weights = np.zeros(batch, np.float32)
        weights[:len(chunk)] = 1.0
        chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), chunk.shape[1]), np.int32)])
        total += float(eval_sum(params, jnp.asarray(chunk), jnp.asarray(weights), dtype))
    return total / len(windows)


def greedy(cfg: ModelConfig, params, prompt: list[int], steps: int, temperature: float = 0.0,
           seed: int = 0) -> list[int]:
    """Dense decoding in float32: one fixed-length buffer, the whole sequence recomputed each step."""
    model = Qwen2ForCausalLM(cfg, jnp.float32)
    length = len(prompt) + steps

    @jax.jit
    def next_logits(p, buf, pos):
        return jax.lax.dynamic_index_in_dim(model.apply({"params": p}, buf)[0][0], pos, keepdims=False)

    buf = np.zeros((1, length), np.int32)
    buf[0, :len(prompt)] = prompt
    key = jax.random.key(seed)
    for pos in range(len(prompt) - 1, length - 1):
        logits = next_logits(params, jnp.asarray(buf), pos)
        if temperature > 0:
            key, sub = jax.random.split(key)
            buf[0, pos + 1] = int(jax.random.categorical(sub, logits / temperature))
        else:
            buf[0, pos + 1] = int(jnp.argmax(logits))
    return buf[0, len(prompt):].tolist()


def write_folder(params, cfg: ModelConfig, args: argparse.Namespace, special: dict[str, int]) -> None:
    """Checkpoint + tokenizer + generation config: a folder both jaxserve and transformers load."""
    dtype = jnp.bfloat16 if args.save_dtype == "bfloat16" else jnp.float32
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    save_hf_checkpoint(jax.tree_util.tree_map(lambda x: np.asarray(x.astype(dtype)), params), cfg, args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(args.corpus, "tokenizer", name), os.path.join(args.out, name))
    generation = {"eos_token_id": [special["<|endoftext|>"], special["<|im_end|>"]],
                  "pad_token_id": special["<|endoftext|>"], "do_sample": False}
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)


def check_folder(m, args: argparse.Namespace, windows: np.ndarray) -> dict:
    """Compare the folder as ``jaxserve.load`` read it (``m``) with ``transformers``: logits and greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    window = windows[0, :min(128, args.seq)]
    ours, _ = Qwen2ForCausalLM(m.config).apply({"params": m.params}, jnp.asarray(window[None]))
    with torch.no_grad():
        ref = hf(torch.tensor(window[None].astype(np.int64))).logits.numpy()
    prompt = m.tokenizer.encode("def ", add_special_tokens=False)
    ours_greedy = greedy(m.config, m.params, prompt, 16)
    with torch.no_grad():
        hf_greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    return {"max_abs_logit_diff_vs_transformers": float(np.max(np.abs(np.asarray(ours) - ref))),
            "greedy_def_16_equal": ours_greedy == hf_greedy, "greedy_def_16": m.tokenizer.decode(ours_greedy)}


def main() -> None:
    args = parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 evaluation; bf16 training is unaffected
    from tokenizers import Tokenizer

    with open(os.path.join(args.corpus, "meta.json")) as f:
        meta = json.load(f)
    tok = Tokenizer.from_file(os.path.join(args.corpus, "tokenizer", "tokenizer.json"))
    special = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    train_ids = np.load(os.path.join(args.corpus, "train.npy")).astype(np.int32)
    windows = heldout_windows(np.load(os.path.join(args.corpus, "heldout.npy")), args.seq)
    if args.smoke:
        windows = windows[:6]

    cfg = ModelConfig(vocab_size=meta["vocab_size"], hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
                      max_position_embeddings=args.seq, tie_word_embeddings=True,
                      eos_token_id=special["<|endoftext|>"])
    params = init_params(cfg, jax.random.key(args.seed))
    n_params = int(param_count(params))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1.0, b1=0.9, b2=0.95, weight_decay=args.weight_decay,
                                 mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)))
    opt_state = tx.init(params)
    train_step, eval_sum = make_fns(cfg, args, tx)
    data = jnp.asarray(train_ids)
    device = jax.devices()[0].device_kind
    print(f"device {device}; params {n_params:,}; train tokens {train_ids.size:,}; "
          f"held-out windows {len(windows)} x {args.seq}", flush=True)

    key = jax.random.key(args.seed + 1)
    total = args.steps or 10 ** 9  # replaced by the timed estimate once step time is known
    history, losses, best = [], [], (float("inf"), None, 0)
    eval_every = None
    t_start = time.perf_counter()
    t_probe = None
    step = 0
    while step < total:
        key, sub = jax.random.split(key)
        params, opt_state, loss, gnorm = train_step(params, opt_state, data, sub, jnp.int32(step), jnp.int32(total))
        losses.append(loss)
        step += 1
        if step == 5:
            loss.block_until_ready()
            t_probe = time.perf_counter()
            compile_s = t_probe - t_start
        if step == 35 and not args.steps:
            loss.block_until_ready()
            step_s = (time.perf_counter() - t_probe) / 30
            total = max(step + 1, int((args.seconds - (time.perf_counter() - t_start)) / (step_s * 1.04)) + step)
            print(f"compile {compile_s:.1f}s, step {step_s * 1e3:.1f} ms -> {total} steps", flush=True)
        if eval_every is None and (args.steps or step >= 35):
            eval_every = max(1, total // args.evals)
        if eval_every and (step % eval_every == 0 or step == total):
            ho = heldout_loss(eval_sum, params, windows, args.batch, jnp.bfloat16)
            train_loss = float(np.mean([float(x) for x in losses[-50:]]))
            history.append({"step": step, "tokens": step * args.batch * args.seq, "train_loss": train_loss,
                            "heldout_loss_bf16": ho, "seconds": round(time.perf_counter() - t_start, 1),
                            "grad_norm": float(gnorm)})
            print(json.dumps(history[-1]), flush=True)
            if ho < best[0]:
                best = (ho, jax.tree_util.tree_map(jnp.copy, params), step)
    train_seconds = time.perf_counter() - t_start

    params = best[1]
    final = {
        "heldout_loss_f32": heldout_loss(eval_sum, params, windows, args.batch, jnp.float32),
        "heldout_loss_saved_weights_f32": heldout_loss(
            eval_sum, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
            if args.save_dtype == "bfloat16" else params, windows, args.batch, jnp.float32),
    }
    write_folder(params, cfg, args, special)
    summary = {
        "device": device, "jax": jax.__version__, "params": n_params, "config": cfg.to_hf_dict(),
        "corpus": {k: v for k, v in meta.items() if k != "heldout_files"},
        "args": vars(args), "steps": step, "best_step": best[2],
        "tokens_trained": step * args.batch * args.seq, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(step * args.batch * args.seq / train_seconds),
        "history": history, **final,
        "heldout_windows": int(len(windows)), "heldout_tokens_scored": int(len(windows) * args.seq),
    }
    import jaxserve

    m = jaxserve.load(args.out)  # the shipped weights, as every user gets them
    if dataclasses.replace(m.config, torch_dtype=cfg.torch_dtype) != cfg:
        raise ValueError(f"reloaded config {m.config} differs from the trained one {cfg}")
    summary["check"] = check_folder(m, args, windows)
    n_new = 16 if args.smoke else 64
    summary["samples"] = []
    for prompt in PROMPTS:
        ids = m.tokenizer.encode(prompt, add_special_tokens=False)
        summary["samples"].append({
            "prompt": prompt,
            "greedy": m.tokenizer.decode(greedy(cfg, m.params, ids, n_new)),
            "temperature_0.8_seed_0": m.tokenizer.decode(greedy(cfg, m.params, ids, n_new, temperature=0.8)),
        })
    print(json.dumps({k: summary[k] for k in ("params", "steps", "tokens_trained", "heldout_loss_f32",
                                              "heldout_loss_saved_weights_f32", "check", "samples")}, indent=1))
    with open(args.summary or os.path.join(args.corpus, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
