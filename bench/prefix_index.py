"""Host cost of radix-index match + insert per request, as the scheduler runs them (CPU backend, jitted).

Workload: `--requests` prompts of `--prompt-len` tokens; each starts with one of `--num-prefixes` shared
system prompts of `--prefix-len` tokens and ends with a unique suffix. Per request: match (timed), attach
the cached pages and allocate the rest (pool ops, timed apart), insert (timed), free the slot. Index and
pool are donated to every call so updates are in place; `--no-donate` shows what copying them costs.

    python bench/prefix_index.py            # writes bench/results/prefix_index.md
    python bench/prefix_index.py --evict-pages 16384 65536   # evict's cost from a full index (printed)
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve import kv_pool, radix_index  # noqa: E402


def make_prompts(args: argparse.Namespace) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    prefixes = rng.integers(100, 150_000, size=(args.num_prefixes, args.prefix_len), dtype=np.int32)
    suffix_len = args.prompt_len - args.prefix_len
    return [np.concatenate([prefixes[i % args.num_prefixes],
                            rng.integers(100, 150_000, size=suffix_len, dtype=np.int32)])
            for i in range(args.requests)]


def run(args: argparse.Namespace, donate: bool) -> dict[str, object]:
    ps, length = args.page_size, args.prompt_len
    pages_per_seq = length // ps
    num_pages = args.num_prefixes * (args.prefix_len // ps) + args.requests * pages_per_seq + pages_per_seq
    slots = 8
    match = jax.jit(radix_index.match, donate_argnums=(0,) if donate else ())
    insert = jax.jit(radix_index.insert, donate_argnums=(0, 1) if donate else ())
    attach = jax.jit(kv_pool.attach, donate_argnums=(0,) if donate else ())
    allocate = jax.jit(kv_pool.allocate, donate_argnums=(0,) if donate else ())
    free = jax.jit(kv_pool.free, donate_argnums=(0,) if donate else ())

    def fresh():
        return (radix_index.create(num_pages, ps),
                kv_pool.create(num_pages, ps, slots, pages_per_seq))

    prompts = make_prompts(args)
    # Compile (and warm) on throwaway state.
    t0 = time.perf_counter()
    index, pool = fresh()
    toks = jnp.asarray(prompts[0])
    index, n, pages, _ = match(index, toks, length)
    pool = attach(pool, 0, pages, n)
    pool, _ = allocate(pool, 0, length - n)
    index, pool = insert(index, pool, toks, length, pool.page_table[0])
    pool = free(pool, 0)
    jax.block_until_ready((index, pool))
    compile_s = time.perf_counter() - t0

    index, pool = fresh()
    jax.block_until_ready((index, pool))
    t_match, t_pool, t_insert = [], [], []
    t_all = time.perf_counter()
    for i, prompt in enumerate(prompts):
        slot = i % slots
        a = time.perf_counter()
        toks = jnp.asarray(prompt)
        index, n, pages, _ = match(index, toks, length)
        n.block_until_ready()
        b = time.perf_counter()
        pool = attach(pool, slot, pages, n)
        pool, ok = allocate(pool, slot, length - n)
        ok.block_until_ready()
        c = time.perf_counter()
        index, pool = insert(index, pool, toks, length, pool.page_table[slot])
        jax.block_until_ready(index)
        d = time.perf_counter()
        pool = free(pool, slot)
        t_match.append(b - a)
        t_pool.append(c - b)
        t_insert.append(d - c)
        assert bool(ok), "pool sized too small"
    jax.block_until_ready(pool)
    total = time.perf_counter() - t_all
    s = {k: int(v) for k, v in radix_index.stats(index).items()}
    us = lambda xs, q: float(np.percentile(np.asarray(xs) * 1e6, q))  # noqa: E731
    both = np.add(t_match, t_insert)
    return {
        "donate": donate, "compile_s": compile_s, "total_s": total, "num_pages": num_pages,
        "match": (us(t_match, 50), us(t_match, 90), us(t_match, 99)),
        "insert": (us(t_insert, 50), us(t_insert, 90), us(t_insert, 99)),
        "both": (us(both, 50), us(both, 90), us(both, 99), float(np.mean(both) * 1e6)),
        "pool": (us(t_pool, 50), us(t_pool, 90), us(t_pool, 99)),
        "hit_rate": s["hit_tokens"] / max(s["queried_tokens"], 1), "nodes": s["nodes"],
    }


def evict_costs(index_pages: list[int], counts: list[int], page_size: int, rounds: int = 5) -> str:
    """`radix_index.evict` from a full index (every page cached, the index its only holder: a server whose cached
    prefixes fill its pool) of each size, jitted and donated as the scheduler calls it: the median wall time of
    ``rounds`` calls a page count. A markdown table."""
    seq_pages, rows = 64, 8
    ins = jax.jit(radix_index.insert_many, donate_argnums=(0, 1))
    alloc = jax.jit(kv_pool.allocate, donate_argnums=(0,))
    free = jax.jit(kv_pool.free, donate_argnums=(0,))
    evict = jax.jit(radix_index.evict, donate_argnums=(0, 1))
    lines = ["| index = pool pages | " + " | ".join(f"evict {k} ms" for k in counts) + " |",
             "|" + "---|" * (len(counts) + 1)]
    rng = np.random.default_rng(0)
    for n in index_pages:
        pool, index = kv_pool.create(n, page_size, rows, seq_pages), radix_index.create(n, page_size)
        for _ in range(n // (seq_pages * rows)):
            for r in range(rows):
                pool, _ = alloc(pool, r, seq_pages * page_size)
            tokens = rng.integers(100, 150_000, size=(rows, seq_pages * page_size), dtype=np.int32)
            index, pool = ins(index, pool, tokens, np.full(rows, seq_pages * page_size, np.int32),
                              np.asarray(pool.page_table)[:, :seq_pages])
            for r in range(rows):
                pool = free(pool, r)
        index, pool, _ = evict(index, pool, 1)  # the compile
        cells = []
        for k in counts:
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                index, pool, freed = evict(index, pool, k)
                freed.block_until_ready()
                times.append(time.perf_counter() - t)
            cells.append(f"{1e3 * float(np.median(times)):.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def commit() -> str:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxserve/radix_index.py", "jaxserve/kv_pool.py",
                            "bench/prefix_index.py"], cwd=root, capture_output=True, text=True).stdout
    return rev.strip() + (" (+uncommitted changes)" if dirty.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--no-donate", action="store_true", help="also run without donating index and pool")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "prefix_index.md"))
    parser.add_argument("--evict-pages", type=int, nargs="+", default=None,
                        help="instead: evict's cost from a full index of these many pages (printed, not written)")
    parser.add_argument("--evict-counts", type=int, nargs="+", default=[16, 128, 512])
    args = parser.parse_args()
    if args.evict_pages:
        print(f"commit {commit()}, {os.cpu_count()} cores, jax {jax.__version__}")
        print(evict_costs(args.evict_pages, args.evict_counts, args.page_size))
        return
    if args.prompt_len % args.page_size or not 0 <= args.prefix_len <= args.prompt_len:
        raise ValueError(f"prompt_len must be a multiple of page_size ({args.page_size}) and >= prefix_len "
                         f"({args.prefix_len}), got {args.prompt_len}")

    results = [run(args, donate=True)] + ([run(args, donate=False)] if args.no_donate else [])
    header = ("| state passed | match p50 / p90 / p99 µs | insert p50 / p90 / p99 µs | match+insert p50 / p90 / p99 "
              f"/ mean µs | pool attach+allocate p50 µs | total s ({args.requests} req) | compile s |")
    lines = [header, "|" + "---|" * 7]
    for r in results:
        m, ins, b, p = r["match"], r["insert"], r["both"], r["pool"]
        lines.append(f"| {'donated' if r['donate'] else 'copied'} | {m[0]:.0f} / {m[1]:.0f} / {m[2]:.0f} "
                     f"| {ins[0]:.0f} / {ins[1]:.0f} / {ins[2]:.0f} "
                     f"| {b[0]:.0f} / {b[1]:.0f} / {b[2]:.0f} / {b[3]:.0f} "
                     f"| {p[0]:.0f} | {r['total_s']:.3f} | {r['compile_s']:.1f} |")
    r0 = results[0]
    table = "\n".join(lines)
    print(table)
    print(f"token hit rate {r0['hit_rate']:.3f}, indexed pages {r0['nodes']}, pool/index size {r0['num_pages']} pages")
    command = "python bench/prefix_index.py " + " ".join(sys.argv[1:])
    report = f"""# Radix index host cost (match + insert per request)

- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
- commit: {commit()}
- command: `{command.strip()}`
- device: host CPU ({os.cpu_count()} cores), jax {jax.__version__}, backend {jax.default_backend()}
- workload: {args.requests} requests x {args.prompt_len} tokens; {args.num_prefixes} shared prefixes of {args.prefix_len} tokens
  + unique suffix; page size {args.page_size}; index capacity = pool = {r0['num_pages']} pages; tokens padded to one
  bucket ({args.prompt_len}), so one compilation per function.
- timings are wall clock per request including the host->device copy of the tokens and `block_until_ready`.

{table}

Token hit rate {r0['hit_rate']:.3f} (the first request of each prefix misses); {r0['nodes']} pages indexed at the end.
"""
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)


if __name__ == "__main__":
    main()
