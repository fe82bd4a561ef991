"""Integer-quantized checkpoints (AWQ, GPTQ): their packed 4- and 8-bit projection weights read back into floats.

Why: Qwen publishes its instruct models as ``Qwen2.5-*-Instruct-AWQ`` and ``-GPTQ-Int4`` / ``-Int8`` too, and a vLLM
user points the server at whichever they downloaded. jaxserve has no integer product kernels, so the weights are
dequantized once, on the host, as each tensor is read: ``(q - zero) * scale`` per group of input rows, exactly what
the integers stand for. The model then runs at its dtype's bytes; ``EngineConfig(quantization="fp8")`` on top
requantizes the projections per output channel to float8 for half of them (`jaxserve.quantization`).

The layouts (int32 words, the lowest bits first; ``G`` the group size, ``p = 32 // bits`` values a word):

- AWQ (AutoAWQ's "gemm" version, 4 bits, with zero points): ``qweight [in, out / p]`` and ``qzeros [in / G, out / p]``
  packed along the outputs with AutoAWQ's interleave (the word's field ``i`` holds column ``[0, 2, 4, 6, 1, 3, 5,
  7][i]`` of its eight), ``scales [in / G, out]``.
- GPTQ (AutoGPTQ / GPTQModel, 4 or 8 bits): ``qweight [in / p, out]`` packed along the inputs, ``qzeros [groups, out
  / p]`` packed along the outputs, ``scales [groups, out]``, ``g_idx [in]`` (each input row's group; absent: ``k //
  G``, and ``desc_act`` checkpoints permute it). The original "gptq" checkpoint format stores each zero point minus
  one ("gptq_v2" does not).

Example:
    >>> scheme = packed_scheme({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False})
    >>> scheme.method, scheme.bits, scheme.zero_offset
    ('gptq', 4, 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

PACKED_QUANTIZATIONS = ("awq", "gptq")
# Tensors that stand for a projection's `.weight` in a packed checkpoint.
PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
# AutoAWQ's field -> column interleave, inverted: column j of a word is field _AWQ_FIELD[j].
_AWQ_FIELD = np.array([0, 4, 1, 5, 2, 6, 3, 7])


@dataclasses.dataclass(frozen=True)
class PackedScheme:
    """What a checkpoint's ``quantization_config`` says of its packed integer weights."""

    method: str  # "awq" or "gptq"
    bits: int
    group_size: int  # input rows a scale and zero point cover; -1: all of them
    zero_offset: int  # added to each stored zero point (GPTQ's original format stores zero - 1)


def packed_scheme(qc: dict[str, Any]) -> PackedScheme:
    """A ``quantization_config`` of ``quant_method`` "awq" or "gptq" checked and read; anything this loader cannot
    unpack is refused with a ``ValueError`` naming the field.

    Example:
        >>> packed_scheme({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True})
        PackedScheme(method='awq', bits=4, group_size=128, zero_offset=0)
    """
    method = qc.get("quant_method")
    group = qc.get("group_size", 128)  # AutoAWQ's, AutoGPTQ's and GPTQModel's default
    if not isinstance(group, int) or isinstance(group, bool) or not (group > 0 or group == -1):
        raise ValueError(f"quantization_config: group_size must be a positive integer or -1, got {group!r}")
    if method == "awq":
        if qc.get("bits", qc.get("w_bit", 4)) != 4:
            raise ValueError(f"quantization_config: bits must be 4 for awq, got {qc.get('bits')!r}")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config: version {qc.get('version')!r} is not supported for awq (gemm is)")
        if qc.get("zero_point", True) is not True:
            raise ValueError("quantization_config: zero_point must be true for awq (AutoAWQ's gemm layout)")
        return PackedScheme("awq", 4, group, 0)
    if method == "gptq":
        bits = qc.get("bits")
        if bits not in (4, 8):
            raise ValueError(f"quantization_config: bits must be 4 or 8 for gptq, got {bits!r}")
        if qc.get("is_marlin_format"):
            raise ValueError("quantization_config: is_marlin_format gptq checkpoints are not supported")
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config: checkpoint_format {fmt!r} is not supported for gptq "
                             "('gptq' and 'gptq_v2' are)")
        return PackedScheme("gptq", bits, group, 1 if fmt == "gptq" else 0)
    raise ValueError(f"quantization_config: quant_method {method!r} is not a packed integer scheme "
                     f"{PACKED_QUANTIZATIONS}")


def _fields(words: np.ndarray, bits: int) -> np.ndarray:
    """Each int32 word's ``32 // bits`` unsigned fields, the lowest first, along a new last axis."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    return (words.astype(np.int32).view(np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)


def dequantize_packed(read: Callable[[str], np.ndarray], prefix: str, out_features: int, in_features: int,
                      scheme: PackedScheme) -> np.ndarray:
    """The float32 ``[out_features, in_features]`` weight (Hugging Face's Linear layout) of the projection at
    ``prefix``, from the packed tensors ``read(prefix + suffix)`` returns (None where absent); shapes are checked
    and a mismatch names the tensor."""
    per_word = 32 // scheme.bits
    group = in_features if scheme.group_size == -1 else scheme.group_size
    groups = -(-in_features // group)

    def tensor(suffix: str, shape: tuple[int, ...] | None, optional: bool = False) -> np.ndarray | None:
        t = read(prefix + suffix)
        if t is None:
            if optional:
                return None
            raise ValueError(f"tensor {prefix}{suffix} is missing ({scheme.method} checkpoint)")
        t = np.asarray(t)
        if shape is not None and t.shape != shape:
            raise ValueError(f"tensor {prefix}{suffix} has shape {t.shape}, expected {shape} "
                             f"({scheme.method}, {scheme.bits} bits, group size {scheme.group_size})")
        return t

    if out_features % per_word or (scheme.method == "gptq" and in_features % per_word):
        raise ValueError(f"{prefix}: {out_features} x {in_features} does not pack into {scheme.bits}-bit words")
    scales = tensor(".scales", (groups, out_features)).astype(np.float32)
    if scheme.method == "awq":
        q = _fields(tensor(".qweight", (in_features, out_features // per_word)), 4)[..., _AWQ_FIELD]
        z = _fields(tensor(".qzeros", (groups, out_features // per_word)), 4)[..., _AWQ_FIELD]
        of_row = np.arange(in_features) // group
    else:
        q = np.swapaxes(_fields(tensor(".qweight", (in_features // per_word, out_features)), scheme.bits), 1, 2)
        z = _fields(tensor(".qzeros", (groups, out_features // per_word)), scheme.bits)
        g_idx = tensor(".g_idx", (in_features,), optional=True)
        of_row = np.arange(in_features) // group if g_idx is None else g_idx.astype(np.int64)
        if of_row.min() < 0 or of_row.max() >= groups:
            raise ValueError(f"tensor {prefix}.g_idx holds groups outside [0, {groups})")
    q = q.reshape(in_features, out_features).astype(np.float32)
    z = z.reshape(groups, out_features).astype(np.float32) + scheme.zero_offset
    return ((q - z[of_row]) * scales[of_row]).T
