"""Model configuration read from a Hugging Face ``config.json``.

Owns the translation of Qwen2/Qwen2.5 hyper-parameters into one frozen, hashable dataclass
that is checked once and then trusted everywhere (it is a static argument of every jitted
function). It never touches weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from jaxserve.packed_weights import PACKED_QUANTIZATIONS, PackedScheme, packed_scheme

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification")
CLASSIFIER = "Qwen2ForSequenceClassification"
SUPPORTED_MODEL_TYPES = ("qwen2",)
# Checkpoints quantized ahead (config.json's quantization_config) that load: float8 e4m3 projection weights with a scale
# per output channel or per tensor, which are `jaxserve.quantization`'s fp8 weights, kept as they are; AWQ and GPTQ's
# packed integers, dequantized as they are read (`jaxserve.packed_weights`).
CHECKPOINT_QUANTIZATIONS = ("compressed-tensors", "fbgemm_fp8", *PACKED_QUANTIZATIONS)


def checkpoint_quantization(qc: dict[str, Any] | None) -> str | None:
    """What a checkpoint's ``quantization_config`` holds: "fp8" (an ``EngineConfig.quantization`` name: the weights
    load as float8), "awq" or "gptq" (packed integers, dequantized at load: `jaxserve.packed_weights`), or None where
    there is none; any other scheme is refused by name.

    Taken: llm-compressor's "compressed-tensors" float-quantized 8-bit weights of ``channel`` or ``tensor`` strategy
    (its FP8 and FP8_DYNAMIC schemes: vLLM's usual fp8 checkpoints, e.g. RedHatAI's Qwen2.5 FP8-dynamic),
    "fbgemm_fp8", AutoAWQ's 4-bit "gemm" and GPTQ's 4- and 8-bit checkpoints (Qwen's own -AWQ and -GPTQ-Int4/Int8).
    Activations run in the model's dtype (weight-only), so a dynamic or static activation scheme is not applied: the
    products are the dequantized weights' at full activation precision.

    Example:
        >>> checkpoint_quantization({"quant_method": "fbgemm_fp8"})
        'fp8'
        >>> checkpoint_quantization({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"})
        'awq'
        >>> checkpoint_quantization({"quant_method": "bitsandbytes"})
        Traceback (most recent call last):
        ...
        ValueError: quantization_config: quant_method 'bitsandbytes' is not supported (checkpoints of ('compressed-tensors', 'fbgemm_fp8', 'awq', 'gptq') are)
    """
    if not qc:
        return None
    method = qc.get("quant_method")
    if method not in CHECKPOINT_QUANTIZATIONS:
        raise ValueError(f"quantization_config: quant_method {method!r} is not supported (checkpoints of "
                         f"{CHECKPOINT_QUANTIZATIONS} are)")
    if method in PACKED_QUANTIZATIONS:
        return packed_scheme(qc).method
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if not groups and qc.get("kv_cache_scheme"):
            return None  # KV scales alone (`ModelConfig.kv_scales`): the weights are plain
        if not groups:
            raise ValueError("quantization_config: compressed-tensors without config_groups")
        for name, group in groups.items():
            w = group.get("weights") or {}
            if (w.get("type"), w.get("num_bits")) != ("float", 8) or w.get("strategy") not in ("channel", "tensor"):
                raise ValueError(f"quantization_config: config_groups.{name}.weights must be 8-bit float of channel or "
                                 f"tensor strategy (fp8), got type={w.get('type')!r} num_bits={w.get('num_bits')!r} "
                                 f"strategy={w.get('strategy')!r}")
    return "fp8"


ROPE_TYPES = ("linear", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling of a long-context checkpoint: ``config.json``'s ``rope_scaling`` (or, as
    transformers 5 writes it, ``rope_parameters``), with Hugging Face's defaults.

    ``"linear"``: positions divided by ``factor``. ``"yarn"`` (what the Qwen2.5 model cards add
    for contexts past 32k, as vLLM applies it: static, whatever the sequence's length): the
    frequencies of the dimensions that turn fewer than ``beta_slow`` times over
    ``original_max_position_embeddings`` are divided by ``factor``, those that turn more than
    ``beta_fast`` times are kept, a linear ramp between; cos and sin are multiplied by
    ``attention_factor`` (default ``0.1 ln(factor) + 1``). ``original_max_position_embeddings``
    None: the model's ``max_position_embeddings``, as transformers does.

    Example:
        >>> RopeScaling.from_hf_dict({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
        RopeScaling(rope_type='yarn', factor=4.0, original_max_position_embeddings=32768, beta_fast=32.0, beta_slow=1.0, attention_factor=None, mscale=None, mscale_all_dim=None, truncate=True)
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; jaxserve supports "
                             f"{ROPE_TYPES} (and the default RoPE)")
        if not isinstance(self.factor, (int, float)) or self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be > 0, got {self.factor!r}")
        omax = self.original_max_position_embeddings
        if omax is not None and (not isinstance(omax, int) or omax < 1):
            raise ValueError(f"rope_scaling original_max_position_embeddings must be a positive integer, got {omax!r}")
        if self.beta_fast <= 0 or self.beta_slow <= 0:
            raise ValueError(f"rope_scaling beta_fast and beta_slow must be > 0, got {self.beta_fast}, {self.beta_slow}")
        object.__setattr__(self, "factor", float(self.factor))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any] | None) -> "RopeScaling | None":
        """None for the default RoPE (no dict, or type "default"); a ValueError for types not supported."""
        if not d:
            return None
        kind = d.get("rope_type", d.get("type"))
        if kind in (None, "default"):
            return None
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling {d!r} is not supported; jaxserve supports the default RoPE and "
                             f"{ROPE_TYPES}")
        if d.get("factor") is None:
            raise ValueError(f"rope_scaling {d!r} has no factor")
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        # null in config.json is the default (transformers reads `get(...) or default` for the betas).
        return cls(rope_type=kind, **{k: v for k, v in d.items() if k in fields and v is not None})

    def to_hf_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Qwen2 hyper-parameters.

    Example:
        >>> cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> cfg.head_dim, cfg.q_per_kv
        (16, 2)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads, as Hugging Face does
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    torch_dtype: str = "float32"
    rope_scaling: RopeScaling | None = None  # None: the default RoPE; a dict (config.json's spelling) is converted
    # A sequence classifier (Hugging Face's Qwen2ForSequenceClassification, `jaxserve.pooling`): its labels' names in id
    # order, its head a ``score`` matrix of that many outputs instead of the LM head. Empty: a causal LM.
    labels: tuple[str, ...] = ()
    # "fp8": the checkpoint holds its projections quantized (`checkpoint_quantization`); "awq" / "gptq": packed
    # integers, read as floats (`packing` says how); None: full precision.
    quantization: str | None = None
    packing: PackedScheme | None = None
    # A calibrated checkpoint's KV-cache scales, one ``(k_scale, v_scale)`` a layer (llm-compressor's
    # ``kv_cache_scheme`` tensors, `jaxserve.weights.read_kv_scales`; in config.json as ``kv_cache_scales``): over an fp8
    # pool K is stored as K / k_scale and V as V / v_scale (vLLM's meaning). None: scale 1. Unused over other pools.
    kv_scales: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim < 1 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even integer (RoPE rotates pairs), got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if isinstance(self.rope_scaling, dict):  # as config.json spells it
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf_dict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if self.kv_scales is not None:
            scales = tuple((float(k), float(v)) for k, v in self.kv_scales)
            if len(scales) != self.num_hidden_layers or not all(
                    math.isfinite(x) and x > 0 for pair in scales for x in pair):
                raise ValueError(f"kv_scales must be {self.num_hidden_layers} (k_scale, v_scale) pairs of positive "
                                 f"finite numbers, got {self.kv_scales!r}")
            object.__setattr__(self, "kv_scales", scales)

    @property
    def num_labels(self) -> int:
        """A classifier's outputs (0: a causal LM)."""
        return len(self.labels)

    @property
    def context_length(self) -> int:
        """The longest sequence the checkpoint is made for: ``max_position_embeddings``, times the RoPE
        scaling factor where one is set (YaRN: of ``original_max_position_embeddings``), as vLLM derives
        its default ``max_model_len`` (a Qwen2.5 card's YaRN factor 4 over 32,768: 131,072).

        Example:
            >>> ModelConfig(8, 8, 8, 1, 1, 1, max_position_embeddings=32768,
            ...             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
            ...             ).context_length
            131072
        """
        scaling = self.rope_scaling
        if scaling is None:
            return self.max_position_embeddings
        base = (scaling.original_max_position_embeddings or self.max_position_embeddings
                if scaling.rope_type == "yarn" else self.max_position_embeddings)
        return int(base * scaling.factor)

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head (the GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids as a tuple (Hugging Face allows one id or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json``; refuses non-Qwen2 models."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs!r}; "
                f"jaxserve supports {SUPPORTED_ARCHITECTURES} (model_type 'qwen2')")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported (Qwen2.5 checkpoints ship it off)")
        # transformers 4 writes `rope_scaling` beside `rope_theta`; transformers 5 both in `rope_parameters`.
        rope_scaling = RopeScaling.from_hf_dict(d.get("rope_scaling") or d.get("rope_parameters"))
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 moved it into rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        labels: tuple[str, ...] = ()
        if CLASSIFIER in archs:  # transformers keeps num_labels as id2label (two labels where none is written)
            id2label = d.get("id2label") or {str(i): f"LABEL_{i}" for i in range(d.get("num_labels", 2))}
            labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label)))
        qc = d.get("quantization_config")
        quantization = checkpoint_quantization(qc)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            torch_dtype=str(dtype),
            rope_scaling=rope_scaling,
            labels=labels,
            quantization=quantization,
            packing=packed_scheme(qc) if quantization in PACKED_QUANTIZATIONS else None,
            kv_scales=d.get("kv_cache_scales"),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read ``path/config.json``."""
        config_file = os.path.join(path, "config.json")
        if not os.path.exists(config_file):
            raise FileNotFoundError(f"no config.json in {path}")
        with open(config_file) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this configuration."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d["rope_scaling"] = self.rope_scaling.to_hf_dict() if self.rope_scaling is not None else None
        # A packed checkpoint's weights are floats once loaded: what is saved from them is a plain checkpoint.
        del d["labels"], d["quantization"], d["packing"], d["kv_scales"]
        if self.kv_scales is not None:  # jaxserve's own key: a converted checkpoint keeps what the tensors said
            d["kv_cache_scales"] = [list(pair) for pair in self.kv_scales]
        if self.quantization == "fp8":  # as llm-compressor writes weight-only fp8 (`weights.to_hf_tensors`)
            d["quantization_config"] = {
                "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False}}}}
        d.update(architectures=[CLASSIFIER if self.labels else "Qwen2ForCausalLM"], model_type="qwen2",
                 hidden_act="silu", use_sliding_window=False, attention_dropout=0.0, use_cache=True)
        if self.labels:
            d.update(id2label={str(i): label for i, label in enumerate(self.labels)},
                     label2id={label: i for i, label in enumerate(self.labels)})
        return d


# The Qwen2.5 model cards' shapes (Hugging Face config.json values), for tests and benchmarks that build random-weight
# models of a real size: `ModelConfig(**QWEN25_SHAPES["7B"], rope_theta=1e6)`.
QWEN25_SHAPES: dict[str, dict[str, Any]] = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "14B": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "32B": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "72B": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
