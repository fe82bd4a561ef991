"""Embeddings from the same model and engine (vLLM's ``LLM.embed`` / ``PoolingParams``, the server's
``/v1/embeddings``).

A pooling request is a prompt that is prefilled and never decoded: the engine schedules its chunks as any prompt's
(the prefix cache, preemption, LoRA adapters and batching with generation all apply) and the prefill call that
finishes it hands back the final hidden state (after the last RMSNorm, the LM head's input) pooled over its tokens.
``"last"`` takes the last token's (what decoder embedding models such as gte-Qwen2 use, and vLLM's default for a
generative model run as an embedder); ``"mean"`` averages every prompt token's, so such a request computes its whole
prompt (a cached prefix has no hidden states) and sums each chunk's share (`pool_hidden`). ``normalize`` (default
on) scales the vector to unit length.

A sequence classifier (Hugging Face's ``Qwen2ForSequenceClassification``, vLLM's ``LLM.classify`` and ``/classify``)
runs the same way: ``task="classify"`` takes the pooled hidden state (the last token's, as transformers pools) through
the checkpoint's ``score`` head into its labels' logits, and ``activation`` (default on) makes them probabilities:
softmax over two or more labels, sigmoid for one (`finish_classification`). A one-label classifier scores text pairs
as a cross-encoder (vLLM's ``score`` for such a model): the pair's texts one after the other, classified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

POOLING_TYPES = ("last", "mean")
TASKS = ("embed", "classify")


@dataclasses.dataclass(frozen=True)
class PoolingParams:
    """How a pooling request turns its prompt into one vector: ``pooling_type`` (``"last"`` or ``"mean"``, vLLM's
    pooler types of those names), ``normalize`` (unit L2 norm) and ``truncate_prompt_tokens`` (keep the prompt's
    last k tokens, as SamplingParams'). ``task`` ``"classify"`` (a classifier's; vLLM's) puts the pooled vector through
    the model's ``score`` head and, with ``activation``, softmax (sigmoid for one label) instead of normalizing it.
    Bad values raise ValueError naming the field.

    Example:
        >>> PoolingParams(pooling_type="mean").normalize
        True
        >>> PoolingParams(pooling_type="cls")
        Traceback (most recent call last):
        ...
        ValueError: pooling_type must be one of ('last', 'mean'), got 'cls'
    """

    pooling_type: str = "last"
    normalize: bool = True
    truncate_prompt_tokens: int | None = None
    task: str = "embed"
    activation: bool = True
    # vLLM's newer name of `activation` (None: not given).
    use_activation: bool | None = None
    # vLLM's matryoshka cut: only the model's own width here (Qwen2's hidden states have no shorter prefix that means
    # anything), checked against it when the request is made (`Engine._pooling_request`), as vLLM refuses it.
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.use_activation is not None:
            if not isinstance(self.use_activation, (bool, np.bool_)):
                raise ValueError(f"use_activation must be a bool, got {self.use_activation!r}")
            object.__setattr__(self, "activation", bool(self.use_activation))
            object.__setattr__(self, "use_activation", None)
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("normalize", "activation"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.dimensions is not None and (not isinstance(self.dimensions, (int, np.integer))
                                            or isinstance(self.dimensions, bool) or self.dimensions < 1):
            raise ValueError(f"dimensions must be None or an int >= 1, got {self.dimensions!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or (k < 1 and k != -1)):
            raise ValueError(f"truncate_prompt_tokens must be None, -1 (the model's length) or an int >= 1, got {k!r}")


def pool_hidden(hidden: jax.Array, positions: jax.Array, pool_from: jax.Array, lengths: jax.Array,
                last_at: jax.Array) -> jax.Array:
    """A prefill chunk's pooling shares ``[2, B, H]`` (float32): ``[0]`` the hidden state at column ``last_at[b]``
    (the row's last token where the chunk ends its prompt) and ``[1]`` the sum over the positions in
    ``[pool_from[b], lengths[b])`` (``hidden [B, S, H]`` at ``positions [B, S]``), which the host adds up across
    chunks for a mean.

    Example:
        >>> h = jnp.arange(6.0).reshape(1, 3, 2)
        >>> pool_hidden(h, jnp.arange(3)[None], jnp.array([1]), jnp.array([3]), jnp.array([2]))[:, 0]
        Array([[4., 5.],
               [6., 8.]], dtype=float32)
    """
    h = hidden.astype(jnp.float32)
    last = jnp.take_along_axis(h, last_at[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    inside = (positions >= pool_from[:, None]) & (positions < lengths[:, None])
    return jnp.stack([last, jnp.sum(jnp.where(inside[..., None], h, 0.0), axis=1)])


def finish_embedding(vector: np.ndarray, params: PoolingParams, count: int) -> np.ndarray:
    """The request's embedding from its pooled vector (the last token's, or the sum over ``count`` tokens)."""
    out = np.asarray(vector, np.float32)
    if params.pooling_type == "mean":
        out = out / max(count, 1)
    if params.normalize:
        out = out / max(float(np.linalg.norm(out)), 1e-12)  # torch.nn.functional.normalize's floor
    return out


def finish_classification(vector: np.ndarray, params: PoolingParams, count: int, head: np.ndarray) -> np.ndarray:
    """A classify request's output from its pooled vector: the labels' logits (``vector @ head``, ``head`` the score
    kernel ``[hidden, labels]``), as probabilities with ``params.activation`` (softmax; sigmoid for one label).

    Example:
        >>> p = PoolingParams(task="classify")
        >>> finish_classification(np.array([1.0, 0.0]), p, 1, np.array([[0.0, 2.0], [1.0, 1.0]])).round(4)
        array([0.1192, 0.8808], dtype=float32)
    """
    v = np.asarray(vector, np.float64)
    if params.pooling_type == "mean":
        v = v / max(count, 1)
    logits = v @ np.asarray(head, np.float64)
    if params.activation:
        if logits.shape[-1] == 1:
            logits = 1.0 / (1.0 + np.exp(-logits))
        else:
            logits = np.exp(logits - logits.max())
            logits = logits / logits.sum()
    return logits.astype(np.float32)


def score_pairs(text_1: Any, text_2: Any) -> list[tuple[Any, Any]]:
    """The pairs vLLM's ``score`` compares: one item with one, one with each of a list, or two lists of one length
    item by item. An item is a string or a list of token ids. ValueError naming ``text_1`` / ``text_2`` otherwise.

    Example:
        >>> score_pairs("q", ["a", "b"])
        [('q', 'a'), ('q', 'b')]
    """
    def one(value: Any) -> bool:  # a text or a non-empty list of token ids
        return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value))

    def items(value: Any, name: str) -> list:
        if one(value):
            return [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{name} must be a non-empty string, list of token ids, or list of those, got {value!r}")
        for item in value:  # a None or a dict failed deep in the engine
            if not one(item):
                raise ValueError(f"{name}'s items must be strings or lists of token ids, got {item!r:.100}")
        return list(value)

    first, second = items(text_1, "text_1"), items(text_2, "text_2")
    if len(first) == 1:
        return [(first[0], t) for t in second]
    if len(first) != len(second):
        raise ValueError(f"text_1 must hold one item or as many as text_2 ({len(second)}), got {len(first)}")
    return list(zip(first, second))


def check_pooling_params(params: Any) -> None:
    """ValueError unless ``params`` is None, a `PoolingParams` or a list of them (None entries: the defaults). A
    `SamplingParams` here ran a generation and answered it as an embedding (found by fuzzing the API)."""
    items = params if isinstance(params, Sequence) and not isinstance(params, str) else [params]
    bad = [p for p in items if p is not None and not isinstance(p, PoolingParams)]
    if bad:
        raise ValueError(f"pooling_params must be PoolingParams (or a list of them), got {type(bad[0]).__name__}: "
                         "pooling samples nothing")


def embed_params(params: "PoolingParams | Sequence[PoolingParams] | None") -> Any:
    """``params`` (one, a list, or None: the defaults), checked: what ``embed`` runs."""
    check_pooling_params(params)
    return params or PoolingParams()


def classify_params(params: "PoolingParams | Sequence[PoolingParams] | None") -> Any:
    """``params`` (one, a list, or None: the defaults), checked, with ``task="classify"``: what ``classify`` runs."""
    check_pooling_params(params)
    if params is None:
        return PoolingParams(task="classify")
    if isinstance(params, PoolingParams):
        return dataclasses.replace(params, task="classify")
    return [classify_params(p) for p in params]


def cross_encoder_prompt(tokenizer: Any, text_1: Any, text_2: Any) -> list[int]:
    """A pair as a one-label classifier scores it (vLLM's cross-encoder score): the first text's tokens, then the
    second's (a Qwen2 tokenizer's pair encoding adds nothing between them). A text is a string or token ids.

    Example:
        >>> cross_encoder_prompt(None, [1, 2], [3])
        [1, 2, 3]
    """
    ids = []
    for text in (text_1, text_2):
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("text_1 / text_2 are text but this engine has no tokenizer; pass token ids")
            ids += tokenizer.encode(text, add_special_tokens=False)
        else:
            ids += [int(t) for t in text]
    return ids


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (vLLM's score for an embedding model)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def text_key(text: Any) -> Any:
    """A score text (a string or token ids) as a dict key: each distinct text is embedded once."""
    return text if isinstance(text, str) else tuple(int(t) for t in text)


def pair_scores(pairs: list[tuple[Any, Any]], embedded: dict[Any, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair's ``score`` (the cosine of its texts' embeddings) and ``prompt_tokens`` (both texts'), from
    ``embedded``: `text_key` -> the text's embedding result (`Engine.embed`'s dict).

    Example:
        >>> done = {"a": {"embedding": np.array([1.0, 0.0]), "prompt_tokens": 1},
        ...         "b": {"embedding": np.array([0.0, 2.0]), "prompt_tokens": 2}}
        >>> pair_scores([("a", "b"), ("a", "a")], done)
        [{'score': 0.0, 'prompt_tokens': 3}, {'score': 1.0, 'prompt_tokens': 2}]
    """
    out = []
    for a, b in pairs:
        ea, eb = embedded[text_key(a)], embedded[text_key(b)]
        out.append({"score": cosine(ea["embedding"], eb["embedding"]),
                    "prompt_tokens": ea["prompt_tokens"] + eb["prompt_tokens"]})
    return out
