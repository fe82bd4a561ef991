"""``jaxserve.load``: a checkpoint folder -> everything ``generate`` needs.

Owns resolving which folder to read (the embedded default model when none is given) and
bundling params, config and tokenizer. It never converts layouts itself (``weights.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
from transformers import PreTrainedTokenizerBase

from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.tokenizer import load_tokenizer
from jaxserve.weights import load_params, read_kv_scales

log = logging.getLogger("jaxserve.loading")

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


@dataclasses.dataclass
class LoadedModel:
    """Params, config and tokenizer of one checkpoint; ``name`` is what the server reports."""

    params: Any
    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    path: str
    name: str

    @classmethod
    def from_params(cls, params: Any, config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                    name: str = "params") -> "LoadedModel":
        """A model of one's own weights, in memory: a params tree of ``config``'s shapes
        (`jaxserve.model.init_params`'s, a training loop's) and, optionally, a tokenizer (without one, prompts are
        token ids). What ``jaxserve.generate(params, prompts)`` needs beside the params; a ValueError names the first
        leaf that does not fit the config.

        Example:
            >>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            ...                   num_attention_heads=2, num_key_value_heads=1)
            >>> from jaxserve.model import init_params
            >>> m = LoadedModel.from_params(init_params(cfg, jax.random.key(0)), cfg)
            >>> outs = jaxserve.generate(m, [[1, 2, 3]], use_tqdm=False)  # doctest: +SKIP
        """
        from jaxserve.model import init_params

        shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
        return cls(shapes, config, tokenizer, "", name).with_params(params)

    def with_params(self, params: Any) -> "LoadedModel":
        """This model with other weights of the same tree and shapes: a fine-tuned copy, or the
        params of a training step to sample from. Engines share their compiled steps by config,
        not by weights, so generating with new params compiles nothing again. Any float dtype
        (the engine casts to its own); a ValueError names the first leaf that does not fit.

        Example:
            >>> m = jaxserve.load()
            >>> tuned = jax.tree_util.tree_map(lambda w: w * 1.01, m.params)  # e.g. after an optax update
            >>> outs = jaxserve.generate(m.with_params(tuned), ["def add(a, b):"], use_tqdm=False)  # doctest: +SKIP
        """
        have = dict(jax.tree_util.tree_flatten_with_path(self.params)[0])
        got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
        for path in have.keys() | got.keys():
            name = jax.tree_util.keystr(path)
            if path not in got:
                raise ValueError(f"params: {name} is missing")
            if path not in have:
                raise ValueError(f"params: {name} is not a parameter of this model")
            if tuple(have[path].shape) != tuple(getattr(got[path], "shape", ())):
                raise ValueError(f"params: {name} has shape {tuple(getattr(got[path], 'shape', ()))}, "
                                 f"the model's is {tuple(have[path].shape)}")
            dtype = getattr(got[path], "dtype", None)
            if jnp.issubdtype(have[path].dtype, jnp.floating) and not (dtype is not None
                                                                        and jnp.issubdtype(dtype, jnp.floating)):
                # the engine's cast would truncate integer weights to whole numbers without a word
                raise ValueError(f"params: {name} must be floating point, got {dtype}")
        return dataclasses.replace(self, params=params)


def load(path: str | os.PathLike | None = None, dtype: Any = "float32",
         rope_scaling: dict[str, Any] | None = None, device: jax.Device | str | None = None) -> LoadedModel:
    """Load a Qwen2 checkpoint folder (Hugging Face or converted), or the embedded default model.

    ``rope_scaling`` replaces config.json's (vLLM's ``--hf-overrides '{"rope_scaling": ...}'``): the
    Qwen2.5 model cards' YaRN for contexts past 32k without editing the checkpoint;
    ``{"rope_type": "default"}`` turns a checkpoint's scaling off. ``device`` (a device, or ``"cpu"`` for host memory)
    is where the weights land (default: JAX's default device); a model too big for one accelerator loads to
    ``"cpu"`` and a tensor-parallel engine moves each device's share there (``Engine`` does so itself given a path).

    Example:
        >>> m = jaxserve.load()                                   # embedded default model
        >>> m = jaxserve.load("/models/Qwen2.5-0.5B-Instruct", dtype="bfloat16")  # doctest: +SKIP
        >>> m = jaxserve.load("/models/Qwen2.5-7B-Instruct", dtype="bfloat16", rope_scaling={
        ...     "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})  # doctest: +SKIP
        >>> m.config.context_length                                                      # doctest: +SKIP
        131072
    """
    path, name = resolve_model_path(path)
    config = ModelConfig.from_pretrained(path)
    if config.kv_scales is None and (kv_scales := read_kv_scales(path, config)) is not None:
        config = dataclasses.replace(config, kv_scales=kv_scales)
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a dict as config.json spells it, got {rope_scaling!r}")
        config = dataclasses.replace(config, rope_scaling=RopeScaling.from_hf_dict(rope_scaling))
    if device == "cpu":
        device = jax.devices("cpu")[0]
    if device is None:
        params = load_params(path, config, dtype)
    else:
        with jax.default_device(device):
            params = load_params(path, config, dtype)
    tokenizer = load_tokenizer(path)
    return LoadedModel(params=params, config=config, tokenizer=tokenizer, path=path, name=name)


# A Hugging Face repo id as vLLM takes one ("Qwen/Qwen2.5-0.5B-Instruct").
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(path: str | os.PathLike | None) -> tuple[str, str]:
    """A model argument as (folder, name): a checkpoint folder (named by its last part), the embedded default model
    for None, or, as vLLM takes them, a Hugging Face repo id found in this machine's Hugging Face cache (named by the
    id; nothing is downloaded). FileNotFoundError saying which of these was tried.

    Example:
        >>> resolve_model_path(None)[1]
        'default_model'
    """
    path = DEFAULT_MODEL_DIR if path is None else os.fspath(path)
    if os.path.isdir(path):
        return path, os.path.basename(os.path.normpath(path))
    if _REPO_ID.fullmatch(path) and not os.path.exists(path):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(repo_id=path, local_files_only=True), path
        except Exception as exc:  # not cached (or a malformed cache): said below, with what was tried
            raise FileNotFoundError(f"model {path!r} is neither a folder nor a Hugging Face repo in the local cache "
                                    f"({type(exc).__name__}); jaxserve downloads nothing: fetch it where there is a "
                                    f"network (huggingface-cli download {path})") from None
    raise FileNotFoundError(f"model path {path!r} is not a folder")


def _generation_config(path: str | os.PathLike) -> tuple[str, dict[str, Any] | None]:
    """``generation_config.json`` in the folder ``path``: (its path, its object), the object None
    where the file is missing or unreadable (warned) or the model has no folder."""
    if not os.fspath(path):  # a LoadedModel built in memory has no folder; "" would read the working directory's
        return "", None
    file = os.path.join(os.fspath(path), "generation_config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except FileNotFoundError:
        return file, None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", file, exc)
        return file, None
    if not isinstance(config, dict):
        log.warning("ignoring %s: not a JSON object", file)
        return file, None
    return file, config


def generation_eos_ids(path: str | os.PathLike) -> tuple[int, ...]:
    """The EOS ids ``generation_config.json`` names (none if it is missing or unreadable).

    Instruct checkpoints list more there than ``config.json`` does (Qwen2.5-Instruct: <|im_end|> in
    config.json, <|im_end|> and <|endoftext|> here); transformers' ``generate`` and vLLM stop at all of them.

    Example:
        >>> generation_eos_ids(DEFAULT_MODEL_DIR)
        (0, 2)
    """
    file, config = _generation_config(path)
    if config is None:
        return ()
    eos = config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
        log.warning("ignoring %s: eos_token_id %r is not a token id or a list of them", file, eos)
        return ()
    return tuple(eos)


# generation_config.json's sampling fields that vLLM takes as a model's defaults (its
# `--generation-config auto`), under SamplingParams' names.
GENERATION_DEFAULT_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_sampling_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """The sampling defaults ``generation_config.json`` sets (``SamplingParams`` field -> value).

    Instruct checkpoints ship the sampling their authors tuned (Qwen2.5-Instruct: temperature 0.7,
    top_p 0.8, top_k 20, repetition_penalty 1.05); vLLM applies them wherever a request leaves a
    field unset, and so does jaxserve. A value ``SamplingParams`` would refuse is skipped with a warning.

    Example:
        >>> generation_sampling_defaults(DEFAULT_MODEL_DIR)  # its generation_config.json sets none
        {}
    """
    from jaxserve.sampling import SamplingParams

    file, config = _generation_config(path)
    if config is None:
        return {}
    defaults = {}
    for key, field in GENERATION_DEFAULT_FIELDS.items():
        if config.get(key) is None:
            continue
        try:
            SamplingParams(**{field: config[key]})
        except ValueError as exc:
            log.warning("ignoring %s's %s: %s", file, key, exc)
            continue
        defaults[field] = config[key]
    return defaults
