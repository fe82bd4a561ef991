"""``EngineConfig``: the serving knobs, checked once at construction.

Owns sizes (pages, batch, tokens per step, model length), bucket sizes and the scheduling
policy. It never holds state; the engine reads it and trusts it.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import yaml

from jaxserve.quantization import QUANTIZATIONS

POLICIES = ("prefill_first", "time_share", "mixed")
SCHEDULING_POLICIES = ("fcfs", "priority")
ATTENTION_IMPLS = ("auto", "pallas", "pallas-unfused", "reference")
DTYPES = ("auto", "float32", "bfloat16")
# Bounds past which a config is a typo, not a choice: a page larger than any context (2**20 tokens a page asked a
# prefill for 36 GB), and decode calls so long that a short request waits for thousands of steps it does not use.
MAX_PAGE_SIZE = 4096
MAX_DECODE_STEPS = 1024
# vLLM's ``--kv-cache-dtype`` values this engine stores (its "fp8" is e4m3): the pool's dtype for each.
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return tuple(out) + (hi,)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine sizes its pool and shapes its steps.

    ``num_pages=None`` sizes the KV pool from ``memory_fraction`` of the accelerator's free
    memory (1024 pages on the CPU). Batch and prefill-length buckets default to powers of two,
    so the number of compiled step shapes is ``len(batch_buckets) * (widths + len(prefill_buckets))``
    at most (decode steps take two to four block-table widths, three for a 32k model,
    ``Engine.decode_table_widths``).
    ``overlap`` lets a decode call run while the host reads the previous one's tokens (steady decoding, rows that
    finish dropping out of it), and a prefill call (or, after the last one, the first decode call) start before the
    host reads the previous prefill's first tokens; outputs are the same either way. ``compile_cache_dir`` keeps the
    compiled steps on disk (JAX's persistent cache, process-wide), so a restart skips most of the warm-up.
    ``decode_steps`` (8) decode steps run in one device call: at 4 the host's work a call no longer hid behind the
    device's at batch 64 (H200, Qwen2.5-0.5B: 45.7k against 58.9k tokens/s; batch 1 1.13k against 1.25k;
    bench/results/throughput.md, run 23); 16 gave +4.8% at batch 64 and -1.1% at 256 (run 28) and makes new requests
    wait longer for a call.
    ``scheduling_policy`` (vLLM's): which waiting request is admitted first and which running one is preempted
    when pages run out: "fcfs", arrival order (the newest preempted); "priority", each request's ``priority``
    (lower first, vLLM's order; ties by arrival), the lowest priority preempted. (``policy`` is another question:
    how prefill and decode calls share the device.)
    ``speculative_tokens`` > 0 turns on n-gram speculative decoding (vLLM's ``ngram`` method, `jaxserve.speculative`):
    with any sampling parameters and structured outputs (unless the guide pool cannot hold every running row's guide),
    each row drafts up to that many tokens from its own text (the tokens after the latest earlier occurrence of its last
    ``prompt_lookup_max``..``prompt_lookup_min`` tokens) and one call verifies them all: greedy rows' text is greedy
    decoding's either way (in bf16 on a GPU up to near-ties the verify call and the decode step round apart); rows that sample keep drafts by rejection sampling (each token from the row's own
    distribution, though not the same draws as without speculation). Off (0) by default.
    ``speculative_disable_by_batch_size`` > 0 (vLLM's ``disable_by_batch_size``): no verify call while that many rows
    or more decode, since a verify call is one model step against a decode call's several: on an H100, n-gram drafts
    of Python at 8 rows ran 0.37-0.60x of plain decoding, at 1 row 0.56-1.30x (bench/results/speculative.md). 0: none.
    ``max_loras`` > 0 serves LoRA adapters (vLLM's ``--max-loras``; `jaxserve.lora`): that many on the device at once,
    each of rank at most ``max_lora_rank`` (16); requests name theirs with a ``jaxserve.LoRARequest``. 0: none.
    ``tensor_parallel_size`` > 1 (vLLM's) splits the model and its KV pages by attention head over that many devices
    of the host (`jaxserve.tensor_parallel`): the first ones, or the group given as ``Engine(device=[...])``.
    ``quantization="fp8"`` (vLLM's, for a bf16 checkpoint) holds every layer's projection weights as float8 e4m3 with a
    scale per output channel (`jaxserve.quantization`): half their bytes; None keeps the checkpoint's precision.
    ``seed`` (vLLM's ``--seed``): requests that set no seed of their own draw one from a generator seeded with it when
    they are made, so a run that makes the same requests in the same order samples the same tokens; None: fresh
    randomness for each.
    ``kv_cache_dtype`` (vLLM's ``--kv-cache-dtype``): "auto" keeps K and V in the compute dtype; "fp8" (= "fp8_e4m3")
    or "fp8_e5m2" stores them as 8-bit floats with scale 1, saturated at the format's largest value
    (`jaxserve_kernels.kv_dtype`): a page holds half the bytes, so a memory fraction holds twice the tokens and a
    decode step reads half the KV bytes; attention still multiplies in the compute dtype.

    Example:
        >>> cfg = EngineConfig(page_size=16, max_running=32, policy="mixed")
        >>> EngineConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    page_size: int = 16
    num_pages: int | None = None
    memory_fraction: float = 0.6
    max_running: int = 64
    max_tokens_per_step: int = 2048
    max_model_len: int | None = None
    batch_buckets: tuple[int, ...] | None = None
    prefill_buckets: tuple[int, ...] | None = None
    prefix_caching: bool = True
    dtype: str = "auto"
    policy: str = "prefill_first"
    time_share_ratio: int = 4
    scheduling_policy: str = "fcfs"
    speculative_tokens: int = 0
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    speculative_disable_by_batch_size: int = 0
    decode_steps: int = 8
    overlap: bool = True
    attention_impl: str = "auto"
    index_capacity: int | None = None
    compile_cache_dir: str | None = None
    max_loras: int = 0
    max_lora_rank: int = 16
    tensor_parallel_size: int = 1
    quantization: str | None = None
    seed: int | None = None
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy integers (a size computed with numpy) as the ints they are
            v = getattr(self, f.name)
            if isinstance(v, numbers.Integral) and not isinstance(v, (int, bool)):
                object.__setattr__(self, f.name, int(v))

        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("page_size", "max_running", "max_tokens_per_step", "time_share_ratio", "decode_steps",
                     "tensor_parallel_size"):
            positive(name)
        if not isinstance(self.speculative_tokens, int) or isinstance(self.speculative_tokens, bool) or not (
                0 <= self.speculative_tokens <= 32):
            raise ValueError(f"speculative_tokens must be an int in [0, 32], got {self.speculative_tokens!r}")
        for name in ("prompt_lookup_max", "prompt_lookup_min", "max_lora_rank"):
            positive(name)
        v = self.speculative_disable_by_batch_size
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"speculative_disable_by_batch_size must be an int >= 0, got {v!r}")
        if not isinstance(self.max_loras, int) or isinstance(self.max_loras, bool) or not 0 <= self.max_loras <= 64:
            raise ValueError(f"max_loras must be an int in [0, 64], got {self.max_loras!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        for name in ("num_pages", "max_model_len", "index_capacity"):
            if getattr(self, name) is not None:
                positive(name)
        if self.page_size & (self.page_size - 1) or self.page_size > MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be a power of two up to {MAX_PAGE_SIZE}, got {self.page_size}")
        if self.decode_steps > MAX_DECODE_STEPS:
            # A decode call runs all its steps whatever its rows' max_tokens: 100,000 held a 6-token request.
            raise ValueError(f"decode_steps must be at most {MAX_DECODE_STEPS}, got {self.decode_steps}")
        for name in ("prefix_caching", "overlap"):
            if not isinstance(getattr(self, name), bool):  # the string "false" would read as on
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("policy", "scheduling_policy", "attention_impl", "dtype", "kv_cache_dtype"):
            if not isinstance(getattr(self, name), str):  # a list is unhashable in the lookups below
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if (not isinstance(self.memory_fraction, numbers.Real) or isinstance(self.memory_fraction, bool)
                or not 0.0 < self.memory_fraction <= 0.95):
            raise ValueError(f"memory_fraction must be in (0, 0.95], got {self.memory_fraction!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.compile_cache_dir is not None and (not isinstance(self.compile_cache_dir, str)
                                                   or not self.compile_cache_dir):
            raise ValueError(f"compile_cache_dir must be a non-empty path string or None, "
                             f"got {self.compile_cache_dir!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.max_tokens_per_step < self.max_running:
            raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= max_running "
                             f"({self.max_running}): a mixed step holds one token of every running sequence")
        for name, default in (("batch_buckets", _pow2_buckets(1, self.max_running)),
                              ("prefill_buckets", _pow2_buckets(min(16, self.max_tokens_per_step),
                                                                self.max_tokens_per_step))):
            buckets = getattr(self, name)
            if buckets is not None and (isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__")
                                        or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in buckets)):
                # "16" would iterate as (1, 6); 16.5 would round down.
                raise ValueError(f"{name} must be a sequence of positive integers, got {buckets!r}")
            buckets = default if buckets is None else tuple(sorted(set(int(b) for b in buckets)))
            if not buckets or buckets[0] < 1:
                raise ValueError(f"{name} must be positive integers, got {getattr(self, name)!r}")
            object.__setattr__(self, name, buckets)
        if self.batch_buckets[-1] < self.max_running:
            raise ValueError(f"the largest batch bucket ({self.batch_buckets[-1]}) must be >= max_running ({self.max_running})")
        if self.prefill_buckets[-1] < self.max_tokens_per_step:
            raise ValueError(f"the largest prefill bucket ({self.prefill_buckets[-1]}) must be >= "
                             f"max_tokens_per_step ({self.max_tokens_per_step})")

    @property
    def loads_on_host(self) -> bool:
        """Whether a checkpoint path loads to host memory first (``jaxserve.load(device="cpu")``): a split engine's
        devices then each receive only their share, a quantized one's only the quantized weights."""
        return self.tensor_parallel_size > 1 or self.quantization is not None

    def compute_dtype(self) -> str:
        """The dtype the engine computes in: ``dtype``, where "auto" (the default) is bfloat16 on
        an accelerator, as vLLM runs a bfloat16 checkpoint such as Qwen2.5, and float32 on the CPU,
        where bfloat16 arithmetic is emulated and slower.

        Example:
            >>> EngineConfig(dtype="bfloat16").compute_dtype()
            'bfloat16'
        """
        if self.dtype != "auto":
            return self.dtype
        import jax

        return "float32" if jax.default_backend() == "cpu" else "bfloat16"

    def kv_dtype(self) -> str:
        """The KV pool's dtype: ``compute_dtype()`` for "auto", else the fp8 format ``kv_cache_dtype`` names.

        Example:
            >>> EngineConfig(dtype="bfloat16", kv_cache_dtype="fp8").kv_dtype()
            'float8_e4m3fn'
        """
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or self.compute_dtype()

    @staticmethod
    def bucket(buckets: tuple[int, ...], n: int) -> int:
        """The smallest bucket >= n."""
        for b in buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["batch_buckets"] = list(self.batch_buckets)
        d["prefill_buckets"] = list(self.prefill_buckets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineConfig":
        if not isinstance(d, Mapping):  # a YAML document of one scalar, say
            raise ValueError(f"an EngineConfig must be given as a mapping of its fields, got {d!r:.200}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown EngineConfig field(s): {sorted(unknown)}")
        return cls(**d)  # it checks each field's type and value (a YAML list of buckets becomes a tuple there)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "EngineConfig":
        return cls.from_dict(yaml.safe_load(text) or {})
