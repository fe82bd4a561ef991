"""Beam search over the engine (vLLM's ``LLM.beam_search``).

Each step runs every live beam of every prompt as a one-token request asking for the 2 x beam_width most likely
next tokens (raw log-probabilities), extends each beam by each of them, and keeps a prompt's beam_width best
extensions by score; an extension ending in an EOS id (unless ``ignore_eos``) is finished and set aside. At the end
a prompt's finished and live beams are ranked together and its beam_width best returned. The score is vLLM's:
cumulative log-probability over ``len(prompt + tokens) ** length_penalty``, an ending EOS not counted.

A beam's request shares all of its parent's whole pages through the prefix index (the parent's request indexed
them when it finished), so a step computes each beam's last partial page and new token, not its whole text; the
beams of one step sharing pages that are not yet indexed wait for one another's prefill (`jaxserve.scheduler`).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import numpy as np

from jaxserve.sampling import SamplingParams

# Top log-probabilities a request can return (`jaxserve.engine.MAX_TOP_LOGPROBS`) over the 2 x beam_width a step
# asks for.
MAX_BEAM_WIDTH = 10


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's ``BeamSearchParams``, validated at construction (ValueError naming the field).

    ``beam_width`` beams a prompt (at most 10), ``max_tokens`` new tokens at most, ``ignore_eos`` (EOS is a token
    like any other, no beam finishes early), ``length_penalty`` (the score divides the cumulative log-probability by
    the length to this power: above 1 favours longer sequences, 0 ranks by log-probability alone). Taken for vLLM's
    scripts and changing nothing here: ``temperature`` (vLLM v1 scores beams by raw log-probabilities, before
    temperature, as here) and ``include_stop_str_in_output`` (beams stop at EOS alone, no stop strings).

    Example:
        >>> BeamSearchParams(beam_width=4, max_tokens=16).length_penalty
        1.0
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    temperature: float = 0.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

        if not is_int(self.beam_width) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be an int in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        t = self.temperature
        if (not isinstance(t, (int, float, np.integer, np.floating)) or isinstance(t, (bool, np.bool_))
                or not math.isfinite(t) or t < 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        lp = self.length_penalty
        if (not isinstance(lp, (int, float, np.integer, np.floating)) or isinstance(lp, (bool, np.bool_))
                or not math.isfinite(lp)):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        object.__setattr__(self, "beam_width", int(self.beam_width))
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))
        object.__setattr__(self, "length_penalty", float(lp))


@dataclasses.dataclass
class _Beam:
    tokens: list[int]  # prompt + generated
    logprobs: list[float]  # each generated token's
    cum_logprob: float
    finished: bool = False


def beam_score(tokens: Sequence[int], cum_logprob: float, eos_ids: Sequence[int], length_penalty: float) -> float:
    """vLLM's ``get_beam_search_score``: ``cum_logprob / len ** length_penalty``, ``len`` the prompt and generated
    tokens, less an ending EOS.

    Example:
        >>> beam_score([5, 6, 2], -3.0, eos_ids=[2], length_penalty=1.0)
        -1.5
    """
    n = len(tokens) - (1 if tokens and tokens[-1] in eos_ids else 0)
    return cum_logprob / (n ** length_penalty)


def step_params(params: BeamSearchParams) -> SamplingParams:
    """A search step's request for one beam: one token, the 2 x beam_width best raw log-probabilities."""
    return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=2 * params.beam_width)


def best_next(result: dict[str, Any], k: int) -> dict[int, float]:
    """A step request's ``k`` best next tokens: the chosen token's log-probability is listed beside the k best
    (vLLM's rule), so keep the k best. ValueError with the engine's reason where the step was refused (a beam that
    outgrew the KV pool)."""
    if not result.get("top_logprobs"):
        raise ValueError(f"beam search step not run: {result.get('error') or result.get('finish_reason')}")
    return dict(heapq.nlargest(k, result["top_logprobs"][0].items(), key=lambda kv: kv[1]))


def search(next_logprobs: Callable[[list[list[int]], int], list[dict[int, float]]], prompts: list[list[int]],
           params: BeamSearchParams, eos_ids: Sequence[int],
           on_step: Callable[[], None] | None = None) -> list[list[_Beam]]:
    """The search itself over any ``next_logprobs(sequences, k)`` (each sequence's k most likely next tokens and
    their log-probabilities); each prompt's beams, best first."""
    eos = frozenset(eos_ids)
    width, k = params.beam_width, 2 * params.beam_width

    def score(b: _Beam) -> float:
        return beam_score(b.tokens, b.cum_logprob, eos, params.length_penalty)

    live = [[_Beam(list(p), [], 0.0)] for p in prompts]
    done: list[list[_Beam]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        flat = [b for beams in live for b in beams]
        if not flat:
            break
        tops = iter(next_logprobs([b.tokens for b in flat], k))
        for i, beams in enumerate(live):
            grown = []
            for b in beams:
                for token, lp in next(tops).items():
                    child = _Beam(b.tokens + [token], b.logprobs + [lp], b.cum_logprob + lp)
                    if token in eos and not params.ignore_eos:
                        child.finished = True
                        done[i].append(child)
                    else:
                        grown.append(child)
            live[i] = heapq.nlargest(width, grown, key=score)
        if on_step is not None:
            on_step()
    return [heapq.nlargest(width, done[i] + live[i], key=score) for i in range(len(prompts))]


def run_beam_search(driver: Any, prompts: Any, params: BeamSearchParams, use_tqdm: bool = True) -> list[dict]:
    """`Engine.beam_search` over any driver with the Engine's batch API (an `Engine`, `jaxserve.Replicas`): one
    dict a prompt, ``{"sequences": [...]}``, its beams best first, each with ``text``, ``token_ids`` (generated),
    ``logprobs`` (each token's), ``cum_logprob``, ``score`` and ``finish_reason`` (``stop`` at EOS, else
    ``length``). Every prompt is checked before anything runs: ValueError naming what is wrong."""
    from jaxserve.engine import prompt_list, run_to_completion

    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    prompts = prompt_list(prompts)
    if any(isinstance(p, Mapping) and "prompt_embeds" in p for p in prompts):
        # Each step's beams are prompts of token ids attaching their parent's cached pages: embeddings have neither.
        raise ValueError("prompt_embeds: beam search takes prompts of text or token ids")
    probe = SamplingParams(max_tokens=1)
    ids = [driver.request_ids(p, probe) for p in prompts]
    for p in ids:
        if len(p) + params.max_tokens > driver.max_model_len:
            raise ValueError(f"prompt ({len(p)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({driver.max_model_len})")
    step = step_params(params)

    def next_logprobs(seqs: list[list[int]], k: int) -> list[dict[int, float]]:
        return [best_next(o, k) for o in run_to_completion(driver, seqs, step, use_tqdm=False)]

    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm
        bar = tqdm(total=params.max_tokens, desc="beam search", unit="token")
    try:
        found = search(next_logprobs, ids, params, driver.eos_ids, on_step=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    tok = driver.tokenizer
    results = []
    for prompt, beams in zip(ids, found):
        seqs = []
        for b in beams:
            new = b.tokens[len(prompt):]
            seqs.append({"text": tok.decode(new, skip_special_tokens=True) if tok is not None else "",
                         "token_ids": new, "logprobs": b.logprobs, "cum_logprob": b.cum_logprob,
                         "score": beam_score(b.tokens, b.cum_logprob, driver.eos_ids, params.length_penalty),
                         "finish_reason": "stop" if b.finished else "length"})
        results.append({"prompt_tokens": len(prompt), "prompt_token_ids": list(prompt), "sequences": seqs})
    return results
