"""Shared fixtures: tiny random Qwen2 checkpoints made with transformers, saved with save_pretrained."""

from __future__ import annotations

import collections
import os

import jax
import pytest

# Tests compare against float32 references; keep XLA on exact float32 matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

_XLA_CACHE_ENV = "JAXSERVE_TEST_XLA_CACHE"

# XLA's CPU compiles are most of the suite's time: the interpreted kernels, the references and the
# engines' steps are compiled many times and each run briefly. LLVM at -O0 and XLA's elemental IR
# emitters (its older CPU fusion codegen) compile them 2-5x faster and run them up to ~5x slower; the
# same HLO at IEEE semantics (no fast math either way), and the tests that compare two programs bit for
# bit compile both under the same flags. The suite's CPU time went 779 -> 399 s on a 2-core machine.
# Only where XLA compiles for the CPU alone (no accelerator plugin installed): a GPU's programs keep
# XLA's defaults. JAXSERVE_TEST_XLA_DEFAULTS=1 runs the suite under XLA's defaults. One codegen thread a
# compile: two xdist workers fill both cores already (a step's compile + run 5.2 -> 5.0 s, session 67).
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                       "--xla_cpu_parallel_codegen_split_count=1")
_FLAGS_CHECKED_ENV = "JAXSERVE_TEST_XLA_FLAGS_CHECKED"


def _cpu_only() -> bool:
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return True
    import importlib.util
    import pkgutil

    try:
        import jax_plugins
    except ImportError:
        plugins = []
    else:
        plugins = list(pkgutil.iter_modules(jax_plugins.__path__))
    return not plugins and not any(importlib.util.find_spec(name) for name in
                                   ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu"))


def _use_fast_compile_flags() -> None:
    """Add the flags to XLA_FLAGS for this process and the ones it starts (xdist's workers, the tests'
    subprocesses), once a child process has compiled under them: XLA aborts on a flag it does not know,
    and a later jaxlib may drop the emitters' flag (then -O0 alone is tried)."""
    import subprocess
    import sys

    if os.environ.get(_FLAGS_CHECKED_ENV) or os.environ.get("JAXSERVE_TEST_XLA_DEFAULTS") == "1" or not _cpu_only():
        return
    os.environ[_FLAGS_CHECKED_ENV] = "1"
    user = os.environ.get("XLA_FLAGS", "")
    for flags in (_FAST_COMPILE_FLAGS, _FAST_COMPILE_FLAGS[:1]):
        wanted = " ".join([user] + [f for f in flags if f.split("=")[0] not in user]).strip()
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1).block_until_ready()"],
                               env={**os.environ, "XLA_FLAGS": wanted}, capture_output=True, timeout=120)
        if probe.returncode == 0:
            os.environ["XLA_FLAGS"] = wanted
            return


# Tracing and lowering make millions of short-lived objects; at Python's default thresholds (700, 10, 10) the
# collector ran ~2,000 times in a minute of test_speculative.py and took ~4% of its CPU time, ~1.4% at these.
# Reference cycles still go: a collection every 50,000 net allocations.
_GC_THRESHOLDS = (50_000, 20, 100)
# Programs that compile in less than this are not written to the run's persistent cache: retrieving one took
# longer than compiling it (the suite's compile-time-saved total came out negative with every program cached),
# and each write serializes and compresses the executable.
_CACHE_MIN_COMPILE_S = 0.1


def pytest_configure(config: pytest.Config) -> None:
    import gc

    gc.set_threshold(*_GC_THRESHOLDS)
    # Before anything in this process compiles, and before xdist starts the workers (which inherit it).
    _use_fast_compile_flags()
    # XLA's compiles of interpret-mode kernels are a good part of the suite's time, and many tests
    # build the same programs again (every Engine jits its own steps, both xdist workers compile the
    # shared kernels): one persistent cache for the run lets the later ones load them (~13% of
    # test_engine.py on the 2-core CI machine). The controller makes the directory before xdist
    # starts its workers, which inherit the variable; a run-local directory keeps runs independent.
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return  # the user's own cache
    if not hasattr(config, "workerinput") and _XLA_CACHE_ENV not in os.environ:
        import tempfile

        os.environ[_XLA_CACHE_ENV] = tempfile.mkdtemp(prefix="jaxserve-test-xla-cache-")
        config._jaxserve_xla_cache = os.environ[_XLA_CACHE_ENV]
    from jaxserve.runner import enable_compile_cache

    enable_compile_cache(os.environ[_XLA_CACHE_ENV], min_compile_time_s=_CACHE_MIN_COMPILE_S)


# Files of few tests that run long (subprocesses over 2-4 CPU devices, bench smoke runs): handed out to the xdist
# workers first. xdist's own order (files by test count, `--loadscope-reorder`, off in pyproject's addopts) put the
# 3-test file with the ~130 s four-device check near the end, where one worker ran it alone while the other idled.
# Session 60, a 2-core machine, the same commit back to back: 1,128 s in xdist's order, 1,011 s in this one.
_LONG_FILES = ("test_tensor_parallel.py", "test_replicas.py", "test_bench_scripts.py", "test_fp8_kv.py",
               "test_workload_mix.py", "test_speculative.py", "test_structured_engine.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The same order on every worker (xdist checks the collections agree): _LONG_FILES first, then the rest by test
    # count as xdist would order them; each file's tests keep their own order.
    counts = collections.Counter(item.nodeid.split("::")[0] for item in items)

    def rank(item: pytest.Item) -> tuple:
        path = item.nodeid.split("::")[0]
        name = os.path.basename(path)
        first = _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)
        return first, -counts[path], path

    items.sort(key=rank)


def pytest_unconfigure(config: pytest.Config) -> None:
    path = getattr(config, "_jaxserve_xla_cache", None)
    if path:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(_XLA_CACHE_ENV, None)


def make_hf_checkpoint(path: str, *, vocab_size: int = 320, hidden_size: int = 64, intermediate_size: int = 128,
                       num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                       head_dim: int | None = None, rope_theta: float = 10000.0, tie_word_embeddings: bool = False,
                       max_shard_size: str | None = None, seed: int = 0, with_tokenizer: bool = True,
                       max_position_embeddings: int = 512, rope_scaling: dict | None = None):
    """Save a random ``Qwen2ForCausalLM`` (and a small byte-level tokenizer) to ``path``; return the torch model."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_key_value_heads, rope_theta=rope_theta,
                  tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
                  bos_token_id=1, eos_token_id=2)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope_scaling is not None:  # transformers 5 holds theta and the scaling in one dict
        kwargs["rope_parameters"] = {"rope_theta": kwargs.pop("rope_theta"), **rope_scaling}
    config = Qwen2Config(**kwargs)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases too (HF initialises them to zero), so the bias path is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    if with_tokenizer:
        save_test_tokenizer(path, vocab_size)
    return model


def save_test_tokenizer(path: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "def add(a, b):\n    return a + b\n",
            "Hello world! Ünïcödé ☃ text — 日本語."]
    tok.train_from_iterator(text, trainer)
    chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=chat_template)
    fast.save_pretrained(path)


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs_after_each_file():
    """Free the file's compiled programs when it ends. Why: every XLA CPU executable keeps a few memory maps,
    and an xdist worker that compiled most of the suite came within 530 of the kernel's 65,530 maps a process
    (vm.max_map_count; session 47, 65,001 in one worker), past which XLA's CPU compiler segfaults mid-compile. A
    later file that needs a program again loads it from the run's persistent compile cache."""
    yield
    import gc

    from jaxserve import runner

    with runner._steps_lock:
        runner._steps_cache.clear()
    jax.clear_caches()
    gc.collect()


# The `tiny_checkpoint` fixture's shape (bench/f32_parity.py builds the same).
TINY_CHECKPOINT = dict(vocab_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       hidden_size=64)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small untied GQA checkpoint shared by the engine and server tests: (path, torch model)."""
    path = str(tmp_path_factory.mktemp("tiny"))
    model = make_hf_checkpoint(path, **TINY_CHECKPOINT)
    return path, model


def files(path: str) -> list[str]:
    return sorted(os.listdir(path))


def run_device_check(script: str, marker: str, timeout: int = 900) -> None:
    """Run tests/``script`` in a process of its own (it fakes several CPU devices: JAX fixes its device count when
    it starts, and the rest of the suite runs on one) and assert it printed ``marker``."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "tests" / script)], capture_output=True, text=True,
                          timeout=timeout, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert marker in done.stdout


def drive_random_workload(engine, rng, new_request, *, requests: int, arrival_rate: float, abort_rate: float,
                          seed: int, steps: int = 400) -> tuple[dict, set]:
    """Step ``engine`` while requests from ``new_request()`` (a ``(prompt, SamplingParams)``, or with a third item,
    a dict of `Engine.add_request`'s other keywords) arrive between steps (Poisson, ``arrival_rate`` a step,
    ``requests`` in all) and running ones are aborted (``abort_rate`` a step), until all have finished. Returns
    ``({request_id: what new_request gave}, aborted ids)``; ``seed`` names the run in failures."""
    added: dict = {}
    aborted: set = set()
    for _ in range(steps):
        for _ in range(rng.poisson(arrival_rate) if len(added) < requests else 0):
            request = new_request()
            added[engine.add_request(*request[:2], **(request[2] if len(request) > 2 else {}))] = request
        live = [rid for rid in added if rid not in aborted and engine.requests[rid].finish_reason is None]
        if live and rng.random() < abort_rate:
            rid = live[rng.integers(len(live))]
            assert engine.abort(rid), f"seed={seed}"
            aborted.add(rid)
        if engine.has_unfinished():
            engine.step()
        elif len(added) >= requests:
            break
    assert not engine.has_unfinished(), f"requests left unfinished after {steps} steps, seed={seed}"
    return added, aborted
