"""Hugging Face Qwen2 checkpoints <-> the Flax params pytree of ``jaxserve.model``.

Owns the name and layout mapping (HF ``[out, in]`` matrices stay ``[out, in]`` under the
model's default ``WEIGHT_LAYOUT`` "nk", or become Flax ``[in, out]`` kernels under "kn"; q/k/v
and gate/up are fused), checkpoint validation and the converted on-disk format (which notes
its layout, so a file saved under one loads under the other). It never runs the model.

Tensors are read one at a time from memory-mapped safetensors shards and placed on the
device in the target dtype straight away, so the host never holds a second full copy of
the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax

from jaxserve.config import ModelConfig
from jaxserve.packed_weights import PACKED_SUFFIXES, dequantize_packed
from jaxserve.quantization import FP8, SCALE, dequantize, is_quantized

CONVERTED_FILE = "jaxserve_params.safetensors"
# Tensors a quantized checkpoint keeps beside a projection's weight: its scales (weight_scale, read) and the
# activation scales of a static W8A8 scheme (read by no one: jaxserve's products are weight-only).
_QUANT_SUFFIXES = (".weight_scale", ".input_scale", ".input_scale_ub")
# A calibrated checkpoint's KV-cache scales (llm-compressor's kv_cache_scheme): per layer, under
# ``model.layers.N.self_attn.``, one of these spellings for K and V (vLLM reads both); read by `read_kv_scales`. The
# query and probability scales of fp8 attention are taken and not used (jaxserve's attention multiplies in 16 bits).
_KV_SCALE_NAMES = {"k": ("k_scale", "k_proj.output_scale"), "v": ("v_scale", "v_proj.output_scale")}
_UNUSED_ATTENTION_SCALES = ("q_scale", "q_proj.output_scale", "prob_scale", "prob_output_scale")
_KV_SCALE_RE = re.compile(r"model\.layers\.\d+\.self_attn\.(" + "|".join(
    re.escape(n) for n in (*_KV_SCALE_NAMES["k"], *_KV_SCALE_NAMES["v"], *_UNUSED_ATTENTION_SCALES)) + ")")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
    """``"bfloat16"``/``jnp.bfloat16``/``None`` (float32) -> a jnp dtype; anything else is refused."""
    if dtype is None:
        return jnp.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type


def _shard_files(path: str) -> list[str]:
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(path, name)):
                raise FileNotFoundError(f"checkpoint shard {name} listed in model.safetensors.index.json is missing from {path}")
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _tensor_locations(path: str) -> dict[str, "_Shard"]:
    """Each tensor name of a Hugging Face checkpoint folder, and the shard that holds it."""
    return {name: shard for shard in (_Shard(f) for f in _shard_files(path)) for name in shard.keys()}


class _Shard:
    """One safetensors file, read tensor by tensor. safetensors' own readers hand float8 tensors to numpy, which
    has no float8 type, so those are read here from the file's header offsets, memory-mapped, as ml_dtypes'
    (JAX's) float8 types."""

    _RAW = {"F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2}

    def __init__(self, file: str):
        import struct

        self.file = file
        self.handle = safetensors.safe_open(file, framework="flax")
        self.numpy_handle = None
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        self.data_start = 8 + size
        self.raw = {name: info for name, info in header.items()
                    if name != "__metadata__" and info["dtype"] in self._RAW}

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def get_numpy(self, name: str) -> np.ndarray:
        """A tensor safetensors' numpy reader can give (no float8), kept on the host: a packed checkpoint's integers
        are unpacked there, not sent to the accelerator and back."""
        if self.numpy_handle is None:
            self.numpy_handle = safetensors.safe_open(self.file, framework="numpy")
        return self.numpy_handle.get_tensor(name)

    def get_tensor(self, name: str) -> jax.Array:
        info = self.raw.get(name)
        if info is None:
            return self.handle.get_tensor(name)
        start, end = info["data_offsets"]
        data = np.memmap(self.file, np.uint8, "r", offset=self.data_start + start, shape=(end - start,))
        return jnp.asarray(data.view(self._RAW[info["dtype"]]).reshape(info["shape"]))


def _expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
              "model.norm.weight": (cfg.hidden_size,)}
    if cfg.num_labels:  # a classifier's head (Qwen2ForSequenceClassification's `score`) replaces the LM head
        shapes["score.weight"] = (cfg.num_labels, cfg.hidden_size)
    elif not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (cfg.hidden_size,),
            p + "post_attention_layernorm.weight": (cfg.hidden_size,),
            p + "self_attn.q_proj.weight": (h * d, cfg.hidden_size),
            p + "self_attn.q_proj.bias": (h * d,),
            p + "self_attn.k_proj.weight": (kvh * d, cfg.hidden_size),
            p + "self_attn.k_proj.bias": (kvh * d,),
            p + "self_attn.v_proj.weight": (kvh * d, cfg.hidden_size),
            p + "self_attn.v_proj.bias": (kvh * d,),
            p + "self_attn.o_proj.weight": (cfg.hidden_size, h * d),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
            p + "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
        })
    return shapes


def load_hf_params(path: str | os.PathLike, config: ModelConfig | None = None, dtype: Any = None) -> dict:
    """Read a Hugging Face Qwen2 safetensors checkpoint folder into Flax params.

    Example:
        >>> params = load_hf_params("/models/Qwen2.5-0.5B", dtype="bfloat16")  # doctest: +SKIP
    """
    path = os.fspath(path)
    cfg = config or ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    expected = _expected_hf_shapes(cfg)
    location = _tensor_locations(path)
    # Tied checkpoints sometimes still carry lm_head.weight; it duplicates the embedding and is ignored.
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings or cfg.num_labels else set()
    # A quantized checkpoint's scales sit beside the weights they scale; activation scales are not applied (weight-only).
    # A packed one holds a projection's integers and scales where its `.weight` would be (a module it left out of
    # quantization keeps its `.weight`).
    packing = cfg.packing
    scales = PACKED_SUFFIXES if packing else _QUANT_SUFFIXES if cfg.quantization else ()
    packed = {n.rsplit(".", 1)[0] + ".weight" for n in location if n.endswith(".qweight")} if packing else set()
    # Some GPTQ exports write a bias for every quantized Linear, zeros where the model has none (vLLM's loaders skip
    # them): taken when all zero, refused by name otherwise.
    extra_biases = sorted(n for n in location if n.endswith(".bias") and n not in expected
                          and n[:-len(".bias")] + ".weight" in packed)
    unexpected = sorted(n for n in location if n not in expected and n not in ignorable
                        and not n.endswith("rotary_emb.inv_freq") and n not in extra_biases
                        and not _KV_SCALE_RE.fullmatch(n)
                        and not (n.endswith(scales) and n.rsplit(".", 1)[0] + ".weight" in expected))
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in checkpoint {path}: {', '.join(unexpected[:5])}")
    for name in extra_biases:
        if np.any(location[name].get_numpy(name)):
            raise ValueError(f"tensor {name} is not zero, and the model has no bias there")
    missing = sorted(n for n in expected if n not in location and n not in packed)
    if missing:
        raise ValueError(f"missing tensor(s) in checkpoint {path}: {', '.join(missing[:5])}")

    def read(name: str) -> np.ndarray | None:
        return location[name].get_numpy(name) if name in location else None

    def tensor(name: str) -> jax.Array:
        if name in packed and name not in location:
            out, inp = expected[name]
            return jnp.asarray(dequantize_packed(read, name[:-len(".weight")], out, inp, packing))
        t = location[name].get_tensor(name)
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, expected {expected[name]}")
        return t

    def get(name: str) -> jax.Array:
        return tensor(name).astype(dtype)

    from jaxserve.model import WEIGHT_LAYOUT

    def proj(w: jax.Array) -> jax.Array:
        """A projection's Hugging Face `[out, in]` weight in the model's layout."""
        return w if WEIGHT_LAYOUT == "nk" else w.T

    def fused(prefixes: list[str]) -> dict[str, jax.Array]:
        """Hugging Face projections fused along their outputs: ``kernel`` in the model's layout, float8 with its
        ``kernel_scale`` per output where the checkpoint holds every part so (`jaxserve.quantization`), else in
        ``dtype`` (a part left out of quantization, in the checkpoint's ``ignore`` list, takes its fused partners
        dequantized: exactly what they stand for)."""
        weights = [tensor(p + ".weight") for p in prefixes]
        per_output = []
        for p, w in zip(prefixes, weights):
            if w.dtype != FP8:
                per_output.append(None)
                continue
            if p + ".weight_scale" not in location:
                raise ValueError(f"tensor {p}.weight is float8 but the checkpoint has no {p}.weight_scale")
            scale = location[p + ".weight_scale"].get_tensor(p + ".weight_scale").astype(jnp.float32)
            if scale.shape not in ((), (1,), (1, 1), (w.shape[0],), (w.shape[0], 1)):
                raise ValueError(f"tensor {p}.weight_scale has shape {tuple(scale.shape)}, expected one scale or "
                                 f"({w.shape[0]}, 1) (a tensor's or each output channel's)")
            per_output.append(jnp.broadcast_to(scale.reshape(-1), (w.shape[0],)))
        if all(s is not None for s in per_output):
            return {"kernel": proj(jnp.concatenate(weights, axis=0)), SCALE: jnp.concatenate(per_output)}
        parts = [w.astype(dtype) if s is None else dequantize(w, s, axis=0, dtype=dtype)
                 for w, s in zip(weights, per_output)]
        return {"kernel": proj(jnp.concatenate(parts, axis=0))}

    params: dict[str, Any] = {"embed_tokens": {"embedding": get("model.embed_tokens.weight")},
                              "norm": {"scale": get("model.norm.weight")}}
    if cfg.num_labels:
        params["score"] = {"kernel": get("score.weight").T}
    elif not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        params[f"layers_{i}"] = {
            "input_layernorm": {"scale": get(p + "input_layernorm.weight")},
            "post_attention_layernorm": {"scale": get(p + "post_attention_layernorm.weight")},
            "self_attn": {
                "qkv_proj": {
                    **fused([attn + f"{n}_proj" for n in "qkv"]),
                    "bias": jnp.concatenate([get(attn + f"{n}_proj.bias") for n in "qkv"], axis=0),
                },
                "o_proj": fused([attn + "o_proj"]),
            },
            "mlp": {
                "gate_up_proj": fused([p + "mlp.gate_proj", p + "mlp.up_proj"]),
                "down_proj": fused([p + "mlp.down_proj"]),
            },
        }
    return params


def to_hf_tensors(params: dict, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` pairs: the inverse of ``load_hf_params`` (fused weights split; a float8 projection
    as its weight and a ``weight_scale`` of shape ``[out, 1]``, as llm-compressor writes them)."""
    from jaxserve.model import WEIGHT_LAYOUT, convert_weight_layout

    params = convert_weight_layout(params, WEIGHT_LAYOUT, "kn")  # the code below reads [in, out]
    h, kvh, d, inter = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size

    def split(proj: dict, names: list[str], bounds: tuple[int, ...]) -> Iterator[tuple[str, np.ndarray]]:
        """A fused projection's parts, named by ``names``, over the output ranges between ``bounds``."""
        for j, part in enumerate(names):
            yield part + ".weight", proj["kernel"][:, bounds[j]:bounds[j + 1]].T
            if SCALE in proj:
                yield part + ".weight_scale", proj[SCALE][bounds[j]:bounds[j + 1], None]

    yield "model.embed_tokens.weight", params["embed_tokens"]["embedding"]
    yield "model.norm.weight", params["norm"]["scale"]
    if config.num_labels:
        yield "score.weight", params["score"]["kernel"].T
    elif not config.tie_word_embeddings:
        yield "lm_head.weight", params["lm_head"]["kernel"].T
    for i in range(config.num_hidden_layers):
        layer, p = params[f"layers_{i}"], f"model.layers.{i}."
        qkv = layer["self_attn"]["qkv_proj"]
        splits = (0, h * d, (h + kvh) * d, (h + 2 * kvh) * d)
        yield from split(qkv, [p + f"self_attn.{n}_proj" for n in "qkv"], splits)
        for j, n in enumerate("qkv"):
            yield p + f"self_attn.{n}_proj.bias", qkv["bias"][splits[j]:splits[j + 1]]
        yield from split(layer["self_attn"]["o_proj"], [p + "self_attn.o_proj"], (0, config.hidden_size))
        yield from split(layer["mlp"]["gate_up_proj"], [p + "mlp.gate_proj", p + "mlp.up_proj"], (0, inter, 2 * inter))
        yield from split(layer["mlp"]["down_proj"], [p + "mlp.down_proj"], (0, config.hidden_size))
        yield p + "input_layernorm.weight", layer["input_layernorm"]["scale"]
        yield p + "post_attention_layernorm.weight", layer["post_attention_layernorm"]["scale"]


def read_kv_scales(path: str | os.PathLike, config: ModelConfig) -> tuple[tuple[float, float], ...] | None:
    """A Hugging Face checkpoint's KV-cache scales, ``(k_scale, v_scale)`` a layer (`ModelConfig.kv_scales`), or None
    if it has none; a checkpoint with some layers' scales and not others' is refused by name.

    Example:
        >>> from jaxserve.loading import DEFAULT_MODEL_DIR, load
        >>> read_kv_scales(DEFAULT_MODEL_DIR, load().config) is None
        True
    """
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, CONVERTED_FILE)):
        return None  # a converted checkpoint keeps them in its config.json
    location = _tensor_locations(path)
    if not any(_KV_SCALE_RE.fullmatch(n) for n in location):
        return None
    scales = []
    for i in range(config.num_hidden_layers):
        pair = []
        for part, spellings in _KV_SCALE_NAMES.items():
            names = [n for n in (f"model.layers.{i}.self_attn.{s}" for s in spellings) if n in location]
            if not names:
                raise ValueError(f"checkpoint {path} has KV-cache scales but none for layer {i}'s {part.upper()} "
                                 f"(model.layers.{i}.self_attn.{spellings[0]})")
            value = np.asarray(location[names[0]].get_numpy(names[0]), np.float32).reshape(-1)
            if value.size != 1:
                raise ValueError(f"tensor {names[0]} holds {value.size} values; jaxserve takes one scale a layer "
                                 "(strategy 'tensor')")
            pair.append(float(value[0]))
        scales.append(tuple(pair))
    return tuple(scales)


def save_hf_checkpoint(params: dict, config: ModelConfig, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers`` can load (tokenizer not included)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {name: jnp.asarray(t) for name, t in to_hf_tensors(params, config)}
    dtype_name = str(next(iter(tensors.values())).dtype)
    safetensors.flax.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if is_quantized(params):  # config.json says so, or a reader would take the float8 weights at face value
        config = dataclasses.replace(config, quantization="fp8")
    hf = config.to_hf_dict()
    hf["torch_dtype"] = dtype_name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def _flatten(tree: dict, prefix: str = "") -> dict[str, jax.Array]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _unflatten(flat: dict[str, jax.Array]) -> dict:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save_converted(params: dict, config: ModelConfig, path: str | os.PathLike,
                   extra_files_from: str | os.PathLike | None = None) -> None:
    """Save converted Flax params (one safetensors file in our own layout) with ``config.json``.

    Tokenizer files are copied from ``extra_files_from`` (the source checkpoint) so the folder
    loads with ``jaxserve.load`` on its own.
    """
    import shutil

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    from jaxserve.model import WEIGHT_LAYOUT

    safetensors.flax.save_file(_flatten(params), os.path.join(path, CONVERTED_FILE),
                               metadata={"weight_layout": WEIGHT_LAYOUT})
    if is_quantized(params):
        config = dataclasses.replace(config, quantization="fp8")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    if extra_files_from is not None:
        for name in os.listdir(extra_files_from):
            if name.startswith(("tokenizer", "generation_config", "special_tokens", "vocab", "merges",
                                "added_tokens", "chat_template")):
                shutil.copy(os.path.join(extra_files_from, name), os.path.join(path, name))


def load_converted(path: str | os.PathLike, dtype: Any = None) -> dict:
    """Load params written by ``save_converted``; ``dtype`` casts on load (None keeps the saved dtype).

    Projection weights come back in the model's layout (``jaxserve.model.WEIGHT_LAYOUT``) whatever
    layout they were saved in (files without the note predate it: ``[in, out]``)."""
    from jaxserve.model import WEIGHT_LAYOUT, convert_weight_layout

    file = os.path.join(os.fspath(path), CONVERTED_FILE)
    with safetensors.safe_open(file, framework="flax") as handle:
        saved_layout = (handle.metadata() or {}).get("weight_layout", "kn")
    shard = _Shard(file)
    flat = {name: shard.get_tensor(name) for name in shard.keys()}
    if dtype is not None:
        target = resolve_dtype(dtype)
        flat = {k: v if v.dtype == FP8 or k.endswith("/" + SCALE) else v.astype(target) for k, v in flat.items()}
    return convert_weight_layout(_unflatten(flat), saved_layout, WEIGHT_LAYOUT)


def load_params(path: str | os.PathLike, config: ModelConfig | None = None, dtype: Any = None) -> dict:
    """Params from either a converted folder or a Hugging Face checkpoint folder."""
    if os.path.exists(os.path.join(os.fspath(path), CONVERTED_FILE)):
        return load_converted(path, dtype)
    return load_hf_params(path, config, dtype)

