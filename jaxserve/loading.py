"""``jaxserve.load``: a checkpoint folder -> everything ``generate`` needs.

Owns resolving which folder to read (the embedded default model when none is given) and
bundling params, config and tokenizer. It never converts layouts itself (``weights.py``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from transformers import PreTrainedTokenizerBase

from jaxserve.config import ModelConfig
from jaxserve.tokenizer import load_tokenizer
from jaxserve.weights import load_params

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


@dataclasses.dataclass
class LoadedModel:
    """Params, config and tokenizer of one checkpoint; ``name`` is what the server reports."""

    params: Any
    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    path: str
    name: str


def load(path: str | os.PathLike | None = None, dtype: Any = "float32") -> LoadedModel:
    """Load a Qwen2 checkpoint folder (Hugging Face or converted), or the embedded default model.

    Example:
        >>> m = jaxserve.load()                                   # embedded default model
        >>> m = jaxserve.load("/models/Qwen2.5-0.5B-Instruct", dtype="bfloat16")  # doctest: +SKIP
    """
    path = DEFAULT_MODEL_DIR if path is None else os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a folder")
    config = ModelConfig.from_pretrained(path)
    params = load_params(path, config, dtype)
    tokenizer = load_tokenizer(path)
    return LoadedModel(params=params, config=config, tokenizer=tokenizer, path=path,
                       name=os.path.basename(os.path.normpath(path)))
