"""Token selection: per-request sampling parameters and the batched, jit-friendly sampler.

This module owns how one next token per row is chosen from a `[B, V]` logits array:
`SamplingParams` (one request's knobs, validated once), `SamplingBatch` (the same knobs as
per-row device arrays), `sample` (penalties -> temperature -> min-p -> top-k -> top-p ->
draw), the token-history arrays the penalties read (`seen_from_prompts`, `update_counts`)
and log-probabilities of the chosen tokens (and of the tokens a request names, `logprob_token_ids`).

It never decides when a request stops (stop strings, EOS, `max_tokens` are the scheduler's
business; only `min_tokens`, which changes which token may be drawn, is enforced here),
never detokenizes and never touches the model or the KV pool.

Randomness: row b's key at a step is derived from (seed_b, step_b) alone, so a seeded
request yields the same tokens whatever else shares the batch and wherever it sits in it,
given the same logits: on a Hopper GPU in bf16, decode steps of 8-256 rows add float32 K-split
sums in an order that varies from run to run (`jaxserve.model.ACCUMULATE`; JAXSERVE_ACCUMULATE=0
for bitwise-repeatable steps), and other batch sizes round differently, so a near-tie may go
either way there.
Draws use the Gumbel-max trick (argmax of logits plus Gumbel noise), which samples exactly
from softmax(logits) without normalising or a cumulative sum over the vocabulary.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# vLLM treats temperatures below this as greedy: dividing by them overflows float32 logits.
_GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
# Rows with min_tokens > 0 carry their stop ids (stop_token_ids plus EOS) in a fixed-width
# array, so the batch's shapes, and hence the compiled step, do not depend on the requests.
MAX_BANNED_IDS = 16
_INT32_MAX = 2**31 - 1  # stop ids and top_k travel as int32
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # temperature, top-p/min-p and penalties travel as float32
# logit_bias: at most this many tokens a request, each biased by a value in this range (OpenAI's).
# A batch in which some row has a bias carries [B, MAX_LOGIT_BIAS] ids and values (none: width 0),
# so the step compiles for two widths at most.
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_RANGE = 100.0
# bad_words: a request's words become at most this many token sequences (a word may give two: with and without
# a leading space), each of at most MAX_BAD_WORD_TOKENS tokens. A batch in which some row has one carries
# [B, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS] ids (none: width 0), so the step compiles for two widths at most.
MAX_BAD_WORDS = 64
MAX_BAD_WORD_TOKENS = 8
# Samples of one prompt (`n`): each is a request of its own, and a bound keeps one prompt from queueing millions.
MAX_N = 1024
# logprob_token_ids (vLLM's, and its bound): the tokens whose log-probabilities a request gets in place of its top-k.
# A batch in which some row names tokens carries [B, W] of them, W the first of these widths that holds the longest
# row's (none: width 0), so the step compiles for four widths at most. Each named token's rank is a count over its
# row's logits, a pass over the vocabulary a column: a label set of a few tokens (yes / no, A-D) pays four, not 128.
MAX_LOGPROB_TOKEN_IDS = 128
LOGPROB_ID_WIDTHS = (4, 16, MAX_LOGPROB_TOKEN_IDS)
# Top-k/top-p first look at this many best tokens per row (one partial sort) and fall back
# to a full sort only when some row's answer is not decided inside them; both paths are exact.
DEFAULT_TOP_CANDIDATES = 1024
# Before those, the tokens of the CANDIDATE_CHUNKS chunks of CHUNK_TOKENS tokens with the largest maxima (sorted: a
# few thousand values a row), which hold every token above the largest value outside them: exact wherever a row's
# cut lies above that value, as it does for top-k up to CANDIDATE_CHUNKS and the nucleus of a peaked distribution.
# XLA's top-k of 1,024 over a 151,936-token vocabulary cost ~1.5 ms a step at 256 rows on an H100, the whole
# sampler 1.9 ms; with this tier 0.77 ms (chunks of 64 tokens: 9-13% under 128 or 32 at 256 rows, a tie at 64;
# bench/results/sampler.md).
CHUNK_TOKENS = int(os.environ.get("JAXSERVE_CHUNK_TOKENS", "64"))
CANDIDATE_CHUNKS = int(os.environ.get("JAXSERVE_CANDIDATE_CHUNKS", "64"))  # 0: this tier off (A/B runs)
# The draw's Gumbel noise from a hash of (row key, token id) (`token_gumbel`) rather than jax.random.gumbel's threefry:
# on an H100 the temperature-only sampler 86 µs instead of 109 at 64 rows, 251 instead of 394 at 256; top-p 640
# instead of 758 at 256 rows (bench/results/sampler.md, session 71). JAXSERVE_HASH_NOISE=0 draws threefry's noise
# (another stream of draws for a seed, as jaxserve drew before session 71).
HASH_NOISE = os.environ.get("JAXSERVE_HASH_NOISE", "1") == "1"


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


class RequestOutputKind(enum.IntEnum):
    """vLLM's: what each output of a streamed request holds, as `jaxserve.LLMEngine.step` gives them (CUMULATIVE: all
    so far, DELTA: what is new, FINAL_ONLY: the end alone). `LLM.generate` answers once a request ends, and
    `Engine.step` hands out deltas, whatever it says."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass
class SamplingParams:
    """vLLM-like per-request sampling parameters, validated at construction and at every assignment (vLLM's scripts
    set fields of ``llm.get_default_sampling_params()``; a bad value raises and leaves the object as it was).

    Every bad value raises ValueError naming the field and its allowed range. `stop` accepts
    a string or a list of strings and `stop_token_ids` a list; both are stored as tuples.
    `logit_bias` maps token ids (ints, or their decimal strings as JSON keys are) to a value in
    [-100, 100] added to their logits before penalties and sampling (OpenAI's and vLLM's meaning);
    it is stored as sorted `(id, bias)` pairs. Unseeded requests (`seed` None, or -1 as in vLLM)
    get a fresh random seed in `make_batch`, so they differ from each other. A stop string ends the
    text before it unless `include_stop_str_in_output` (vLLM's), and is the result's `stop_reason`; so does the
    text of a stop id or EOS that ends the request (with it, theirs is there unless `skip_special_tokens` drops it).
    `prompt_logprobs=k` (vLLM's): the result's `prompt_logprobs` holds, for every prompt token after
    the first, its log-probability given the tokens before it and the k most likely tokens there.
    `max_tokens=None` (vLLM's): as many as the model's length (or a smaller KV pool) leaves after the prompt
    (`Engine.make_request` sets it).
    `truncate_prompt_tokens=k` (vLLM's): only the prompt's last k tokens are used (a long chat's
    oldest turns dropped instead of the request refused).
    `structured_outputs` (vLLM's; a `jaxserve.structured.StructuredOutputs` or a dict of its fields: a JSON
    schema, a regex, a list of choices or any JSON object): the output is constrained to match it, and ends
    once it is a complete match (or at EOS where the match may go on).
    `skip_special_tokens` (vLLM's, default True): special tokens (``<|im_start|>``...) add no text.
    `allowed_token_ids` (vLLM's): the only tokens the request may produce (EOS too only where listed); stored
    sorted. With `structured_outputs`, a token must be allowed by both.
    `bad_words` (vLLM's): words the output must not contain. Each word's last token is banned wherever the
    tokens generated just before it spell the rest of the word (the word's tokens with and without a leading
    space, as vLLM tokenizes them; `jaxserve.tokenizer.bad_words_token_ids`), so a word never appears as those
    tokens, though the model may still spell it another way (in other pieces).
    `n` (vLLM's): `generate` and `chat` run that many samples of the prompt (the prompt's pages computed once
    and shared, `jaxserve.scheduler`) and return them in the result's ``outputs``; sample i of a seeded
    request uses ``sample_seed(seed, i)`` (``seed + i``). `Engine.add_request` queues one sample (n must be 1 there).
    `detokenize=False` (vLLM's): no text, token ids alone (stop strings need the text, so they are refused with it).
    `truncate_prompt_tokens=-1` (vLLM's "the model's length"): the longest end of the prompt that leaves room for
    max_tokens within max_model_len.
    `thinking_token_budget=k` (vLLM's): at most k tokens inside a ``<think>`` section (one the prompt opened, as a
    reasoning model's chat template does, or one the model opens); the k+1st is ``</think>``, forced
    (`jaxserve.request.ThinkBudget`).
    `logprob_token_ids` (vLLM's): each generated token's log-probabilities of exactly these tokens (at most
    `MAX_LOGPROB_TOKEN_IDS`, kept in the order given, repeats dropped), in place of the `logprobs` best ones, with
    their ranks; scoring a fixed label set without asking for the whole vocabulary. It needs `logprobs` set (any
    value: the ids replace its top-k, as in vLLM), leaves `prompt_logprobs` as they are (the k best), and the values
    are those of the raw model output, as every log-probability here.
    `output_kind` (`RequestOutputKind`): what `jaxserve.LLMEngine.step` outputs. Taken for vLLM's scripts and
    changing nothing here: `spaces_between_special_tokens` (Qwen2's fast tokenizer decodes the same either way),
    `extra_args` (vLLM's plugins' arguments; kept).

    Example:
        >>> p = SamplingParams(temperature=0.7, top_p=0.9, stop="\\n", seed=0)
        >>> p.stop, p.greedy
        (('\\n',), False)
        >>> SamplingParams.from_dict(p.to_dict()) == p
        True
        >>> SamplingParams(temperature=0, logit_bias={"42": -100}).logit_bias
        ((42, -100.0),)
        >>> SamplingParams(prompt_logprobs=1).prompt_logprobs
        1
        >>> SamplingParams(structured_outputs={"choice": ["yes", "no"]}).structured_outputs.choice
        ('yes', 'no')
        >>> SamplingParams(logprobs=0, logprob_token_ids=[9454, 2753, 9454]).logprob_token_ids
        (9454, 2753)
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: Any = ()
    allowed_token_ids: tuple[int, ...] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: Any = None
    bad_words: tuple[str, ...] = ()
    n: int = 1
    # vLLM's older name of structured_outputs (until 0.10), for its scripts: moved there, then None.
    guided_decoding: Any = None
    detokenize: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    thinking_token_budget: int | None = None
    logprob_token_ids: tuple[int, ...] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if "_checked" not in self.__dict__:  # the constructor's own assignments, checked by __post_init__
            object.__setattr__(self, name, value)
            return
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"SamplingParams has no field {name!r}")
        # Checked as the constructor checks (on a copy: a bad value leaves this one as it was), and normalized the
        # same way (a stop string becomes a tuple of one).
        checked = dataclasses.replace(self, **{name: value})
        self.__dict__.update({f: getattr(checked, f) for f in self.__dataclass_fields__})

    def clone(self) -> SamplingParams:
        """vLLM's: an independent copy (fields a request may change, such as a drawn seed, stay this one's)."""
        return dataclasses.replace(self)

    @classmethod
    def from_optional(cls, **fields: Any) -> SamplingParams:
        """vLLM's: the fields given as None take their defaults.

        Example:
            >>> SamplingParams.from_optional(temperature=None, max_tokens=4).temperature
            1.0
        """
        return cls(**{name: value for name, value in fields.items() if value is not None})

    def __post_init__(self) -> None:
        self._check()
        object.__setattr__(self, "_checked", True)

    def _check(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def check_int(name: str, ok: bool, allowed: str) -> None:
            value = getattr(self, name)
            if not _is_int(value) or not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
            set_(name, int(value))

        def check_real(name: str, lo: float, hi: float, allowed: str, lo_open: bool = False) -> None:
            value = getattr(self, name)
            if not _is_real(value):
                raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
            value = float(value)
            above = value > lo if lo_open else value >= lo
            # Also rejects NaN, and infinity where `hi` is: an infinite temperature or penalty makes
            # NaN logits (-inf / inf), and argmax over NaN picks a banned token. The values travel as
            # float32, where 1e39 is infinite too.
            if not (above and value <= hi and math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
                raise ValueError(f"{name} must be in {allowed}, got {value!r}")
            set_(name, value)

        if self.max_tokens is not None:  # None (vLLM's): up to the model's length, set when the request is made
            check_int("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "None or an int >= 1")
        check_int("n", _is_int(self.n) and 1 <= self.n <= MAX_N, f"an int in [1, {MAX_N}]")
        check_real("temperature", 0.0, math.inf, "[0, inf)")
        check_real("top_p", 0.0, 1.0, "(0, 1]", lo_open=True)
        check_int("top_k", _is_int(self.top_k) and -1 <= self.top_k <= _INT32_MAX,
                  "-1 or 0 (off) or an int in [1, 2**31 - 1]")
        if self.top_k == 0:  # vLLM's and OpenAI-compatible clients' other spelling of "off"
            set_("top_k", -1)
        check_real("min_p", 0.0, 1.0, "[0, 1]")
        check_real("repetition_penalty", 0.0, math.inf, "(0, inf)", lo_open=True)
        check_real("presence_penalty", -2.0, 2.0, "[-2, 2]")
        check_real("frequency_penalty", -2.0, 2.0, "[-2, 2]")
        if self.seed is not None:
            check_int("seed", True, "None or an int")
            if self.seed == -1:  # vLLM's spelling of "no seed", which UIs send for "random"
                set_("seed", None)
        if isinstance(self.stop, str):
            set_("stop", (self.stop,))
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        set_("stop", tuple(self.stop))
        if isinstance(self.bad_words, str):
            set_("bad_words", (self.bad_words,))
        if not isinstance(self.bad_words, (list, tuple)) or not all(
                isinstance(w, str) and w.strip() for w in self.bad_words):
            raise ValueError(f"bad_words must be a list of non-blank strings, got {self.bad_words!r}")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words must hold at most {MAX_BAD_WORDS} words, got {len(self.bad_words)}")
        set_("bad_words", tuple(self.bad_words))
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and 0 <= t <= _INT32_MAX for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of ints in [0, 2**31 - 1], got {self.stop_token_ids!r}")
        set_("stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
            set_(name, bool(getattr(self, name)))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is True:  # vLLM's: True asks for one top token, as OpenAI's boolean logprobs
                set_(name, 1)
            if getattr(self, name) is not None:
                check_int(name, _is_int(getattr(self, name)) and 0 <= getattr(self, name) <= MAX_LOGPROBS,
                          f"None or an int in [0, {MAX_LOGPROBS}]")
        if self.logprob_token_ids is not None:
            set_("logprob_token_ids", _logprob_token_ids(self.logprob_token_ids, self.logprobs))
        if self.truncate_prompt_tokens is not None:
            check_int("truncate_prompt_tokens", _is_int(self.truncate_prompt_tokens)
                      and (self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1),
                      "None, -1 (the model's length) or an int >= 1")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are matched in the text, and detokenize=False makes none: use "
                             "stop_token_ids")
        try:
            set_("output_kind", RequestOutputKind(self.output_kind))
        except ValueError:
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}") from None
        if self.extra_args is not None and not isinstance(self.extra_args, Mapping):
            raise ValueError(f"extra_args must be None or a dict, got {self.extra_args!r}")
        most = math.inf if self.max_tokens is None else self.max_tokens
        if self.thinking_token_budget is not None:
            check_int("thinking_token_budget", _is_int(self.thinking_token_budget) and self.thinking_token_budget >= 0,
                      "None or an int >= 0")
        check_int("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens <= most,
                  f"an int in [0, max_tokens={self.max_tokens}]")
        if self.min_tokens > 0:  # the ids banned until min_tokens are a fixed-width row of the step's batch
            check_banned_ids(self.stop_token_ids, ())
        set_("logit_bias", _logit_bias_pairs(self.logit_bias))
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if (not isinstance(ids, (list, tuple)) or not ids
                    or not all(_is_int(t) and 0 <= t <= _INT32_MAX for t in ids)):
                raise ValueError(f"allowed_token_ids must be None or a non-empty list of ints in [0, 2**31 - 1], "
                                 f"got {ids!r}")
            set_("allowed_token_ids", tuple(sorted({int(t) for t in ids})))
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("guided_decoding is vLLM's older name of structured_outputs: give one of them")
            set_("structured_outputs", self.guided_decoding)
            set_("guided_decoding", None)
        if self.structured_outputs is not None:
            from jaxserve.structured import StructuredOutputs

            set_("structured_outputs", StructuredOutputs.from_value(self.structured_outputs))

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax of the (penalised) logits: temperature == 0 (below
        1e-5, vLLM's greedy threshold, since dividing by it overflows float32) or top_k == 1. Unlike
        vLLM, temperatures in [1e-5, 0.01) are used as given, not raised to 0.01: the sampler works
        in float32, where they neither overflow nor give NaN."""
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def top_logprob_count(self) -> int:
        """How many most likely tokens a step finds for this request: ``logprobs``, none where `logprob_token_ids`
        name its tokens instead."""
        return 0 if self.logprob_token_ids is not None else self.logprobs or 0

    @property
    def has_top_logprobs(self) -> bool:
        """Whether each generated token's result has a ``top_logprobs`` entry: its ``logprobs`` best tokens (k > 0)
        or its `logprob_token_ids`."""
        return self.top_logprob_count > 0 or self.logprob_token_ids is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict (tuples become lists, `logit_bias` a dict); `from_dict` inverts it."""
        out = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
               for f in dataclasses.fields(self)}
        out["logit_bias"] = dict(self.logit_bias)
        out["output_kind"] = int(self.output_kind)
        if self.structured_outputs is not None:
            out["structured_outputs"] = self.structured_outputs.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Build from a plain dict; unknown keys are an error, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)


def check_banned_ids(stop_token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> list[int]:
    """The ids a row bans until its ``min_tokens``: its stop ids and the model's EOS ids, ``ignore_eos`` or
    not (vLLM's ``all_stop_token_ids``: min_tokens keeps EOS out of the first tokens even where EOS would not end
    the request), distinct, in order. ValueError naming ``stop_token_ids`` past MAX_BANNED_IDS,
    so that a request is refused where it is made, never in the middle of a step.

    Example:
        >>> check_banned_ids([5, 7], [7, 2])
        [5, 7, 2]
    """
    ids = list(dict.fromkeys(tuple(stop_token_ids) + tuple(eos_token_ids)))
    if len(ids) > MAX_BANNED_IDS:
        raise ValueError(f"stop_token_ids plus the model's EOS ids must number at most {MAX_BANNED_IDS} "
                         f"when min_tokens > 0, got {len(ids)}")
    return ids


def _logprob_token_ids(ids: Any, logprobs: int | None) -> tuple[int, ...]:
    """`logprob_token_ids` as distinct ids in the order given; ValueError naming it (the engine checks the ids against
    the vocabulary)."""
    if (not isinstance(ids, (list, tuple)) or not ids
            or not all(_is_int(t) and 0 <= t <= _INT32_MAX for t in ids)):
        raise ValueError(f"logprob_token_ids must be None or a non-empty list of token ids (ints >= 0), got {ids!r}")
    if len(ids) > MAX_LOGPROB_TOKEN_IDS:
        raise ValueError(f"logprob_token_ids must hold at most {MAX_LOGPROB_TOKEN_IDS} ids, got {len(ids)}")
    if logprobs is None:
        # vLLM's server refuses it without logprobs too: nothing would return the log-probabilities.
        raise ValueError(f"logprob_token_ids needs logprobs set (any of 0..{MAX_LOGPROBS}: these ids replace its top-k "
                         f"tokens)")
    return tuple(dict.fromkeys(int(t) for t in ids))


def _logit_bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as sorted `(token id, bias)` pairs, from a mapping or pairs; ValueError naming it."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in value):
        items = [tuple(x) for x in value]
    else:
        raise ValueError(f"logit_bias must map token ids to numbers, got {value!r}")
    pairs = {}
    for key, bias in items:
        # ASCII digits only: str.isdigit() also accepts digits int() refuses ("\u00b2"), whose ValueError
        # would not name the field.
        if isinstance(key, str) and key.strip().isascii() and key.strip().isdigit():
            key = int(key)
        if not _is_int(key) or key < 0:
            raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {key!r}")
        if not _is_real(bias) or not -LOGIT_BIAS_RANGE <= float(bias) <= LOGIT_BIAS_RANGE:
            raise ValueError(f"logit_bias values must be numbers in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                             f"got {bias!r} for token {key}")
        pairs[int(key)] = float(bias)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias must hold at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}")
    return tuple(sorted(pairs.items()))


@flax.struct.dataclass
class SamplingBatch:
    """Per-row sampling parameters of a batch as device arrays (all leading dim B).

    temperature: f32, 0 for greedy rows; top_p: f32 (1 = off); top_k: i32 (-1 = off);
    min_p: f32 (0 = off); repetition_penalty / presence_penalty / frequency_penalty: f32;
    seeds: u32 [B, 2] (high and low 32 bits of the row's 64-bit seed; the row's key at a step
    is fold_in(fold_in(fold_in(key(0), high), low), step));
    min_tokens: i32; banned_ids: i32 [B, MAX_BANNED_IDS], ids masked while
    step < min_tokens, -1 padded; bias_ids: i32 [B, W] and bias_values: f32 [B, W], each row's
    `logit_bias` (W = MAX_LOGIT_BIAS when some row has one, else 0; ids past the vocabulary pad);
    allowed: u32 [B, ceil(V / 32)] or [B, 0], the tokens each row may take (bit t % 32 of word t // 32;
    `jaxserve.structured`), width 0 when no row is constrained; bad_words: i32 [B, W, L], each row's
    `bad_words` token sequences right-aligned in L = MAX_BAD_WORD_TOKENS columns, -1 before a sequence and in
    unused entries (W = MAX_BAD_WORDS when some row has one, else 0); recent: i32 [B, L - 1] (width 0 with
    W), each row's last generated tokens right-aligned, -1 where it has fewer: a sequence's last token is banned
    where the tokens before it end `recent` (`bad_word_bans`); logprob_ids: i32 [B, W], each row's
    `logprob_token_ids` left-aligned, 0 after them (W from `LOGPROB_ID_WIDTHS` when some row has them, else 0: a
    step without them computes nothing for them). Build it with `make_batch`.
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seeds: jax.Array
    min_tokens: jax.Array
    banned_ids: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array
    allowed: jax.Array
    bad_words: jax.Array
    recent: jax.Array
    logprob_ids: jax.Array


@flax.struct.dataclass
class SampleOutput:
    """tokens: i32 [B]; logprobs: f32 [B], log-softmax of the unmodified logits at the token;
    top_ids: i32 [B, K] and top_logprobs: f32 [B, K], the K most likely tokens (K = num_top_logprobs);
    ranks: i32 [B], the token's rank among the vocabulary (`token_ranks`: vLLM's ``Logprob.rank`` of a sampled
    token, which may lie outside the top K), 0 where log-probabilities were not computed; id_logprobs: f32 [B, W]
    and id_ranks: i32 [B, W], the same two at each row's `SamplingBatch.logprob_ids` (W = 0 where no row names
    any)."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    ranks: jax.Array
    id_logprobs: jax.Array
    id_ranks: jax.Array


@flax.struct.dataclass
class PromptLogprobs:
    """A prefill chunk's prompt log-probabilities: logprobs f32 [B, S], log-softmax of the raw logits
    at each position, taken at the token that follows it; top_ids i32 [B, S, K] and top_logprobs
    f32 [B, S, K], each position's K most likely next tokens; ranks i32 [B, S], the following token's rank
    among the vocabulary there (`token_ranks`: vLLM's ``Logprob.rank``)."""

    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    ranks: jax.Array


def allowed_masks(params: Sequence[SamplingParams | None], batch_size: int, vocab_size: int) -> np.ndarray | None:
    """Packed uint32 ``[batch_size, ceil(vocab_size / 32)]`` masks of the rows' `allowed_token_ids` (every
    token for the other rows), as `SamplingBatch.allowed` takes them; None where no row has any. Ids past
    ``vocab_size`` are dropped (the engine refuses them first).

    Example:
        >>> allowed_masks([SamplingParams(allowed_token_ids=[0, 2]), None], 2, 3).tolist()
        [[5], [4294967295]]
    """
    from jaxserve.structured import pack_mask

    if not any(p is not None and p.allowed_token_ids is not None for p in params):
        return None
    masks = np.full((batch_size, -(-vocab_size // 32)), 0xFFFFFFFF, np.uint32)
    for i, p in enumerate(params):
        if p is not None and p.allowed_token_ids is not None:
            allowed = np.zeros(vocab_size, bool)
            allowed[[t for t in p.allowed_token_ids if t < vocab_size]] = True
            masks[i] = pack_mask(allowed)
    return masks


def sample_seed(seed: int | None, i: int) -> int | None:
    """The seed of sample ``i`` of a request seeded ``seed`` with n > 1 (vLLM's rule, ``seed + i``), counting down
    from a negative seed: counting up from -2 reached -1, "no seed", and left that sample unseeded.

    Example:
        >>> [sample_seed(7, i) for i in range(3)], [sample_seed(-2, i) for i in range(3)], sample_seed(None, 1)
        ([7, 8, 9], [-2, -3, -4], None)
    """
    if seed is None:
        return None
    return seed + i if seed >= 0 else seed - i


def make_batch(
    params: Sequence[SamplingParams | None], batch_size: int, *, eos_token_ids: Sequence[int] = (),
    allowed: np.ndarray | None = None, bad_words: Sequence[Sequence[Sequence[int]]] | None = None,
) -> SamplingBatch:
    """Stack per-request parameters into a `SamplingBatch` of `batch_size` rows.

    `None` entries and padding rows past `len(params)` are greedy with no penalties.
    Unseeded requests draw a 64-bit seed from the OS here. `eos_token_ids` are banned,
    together with the request's `stop_token_ids`, while it has produced fewer than
    `min_tokens` tokens (`ignore_eos` too, as vLLM's). `allowed`: uint32 ``[batch_size, ceil(V / 32)]`` packed token
    masks (`SamplingBatch.allowed`: `allowed_masks`, and the engine's structured-output rows), None for none.
    `bad_words`: each row's banned token sequences (`jaxserve.tokenizer.bad_words_token_ids`), None for none;
    the batch's `recent` tokens start empty (`recent_tokens` fills them).

    Example:
        >>> b = make_batch([SamplingParams(temperature=0.8, seed=1), None], 4)
        >>> b.temperature.shape
        (4,)
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if len(params) > batch_size:
        raise ValueError(f"params has {len(params)} entries, more than batch_size={batch_size}")
    temperature = np.zeros(batch_size, np.float32)
    top_p = np.ones(batch_size, np.float32)
    top_k = np.full(batch_size, -1, np.int32)
    min_p = np.zeros(batch_size, np.float32)
    repetition = np.ones(batch_size, np.float32)
    presence = np.zeros(batch_size, np.float32)
    frequency = np.zeros(batch_size, np.float32)
    seeds = np.zeros((batch_size, 2), np.uint32)
    min_tokens = np.zeros(batch_size, np.int32)
    banned = np.full((batch_size, MAX_BANNED_IDS), -1, np.int32)
    width = MAX_LOGIT_BIAS if any(p is not None and p.logit_bias for p in params) else 0
    # Padding ids are past any vocabulary (int32 max), so the scatter drops them.
    bias_ids = np.full((batch_size, width), np.iinfo(np.int32).max, np.int32)
    bias_values = np.zeros((batch_size, width), np.float32)
    for i, p in enumerate(params):
        if p is None:
            continue
        if not p.greedy:
            # Greedy rows keep top-k/top-p/min-p off so they never trigger the sort path.
            temperature[i], top_p[i], top_k[i], min_p[i] = p.temperature, p.top_p, p.top_k, p.min_p
        repetition[i], presence[i], frequency[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        seed = (p.seed if p.seed is not None else secrets.randbits(64)) % (1 << 64)
        seeds[i] = (seed >> 32, seed & 0xFFFFFFFF)
        if p.min_tokens > 0:
            ids = check_banned_ids(p.stop_token_ids, eos_token_ids)
            min_tokens[i] = p.min_tokens
            banned[i, : len(ids)] = ids
        if p.logit_bias:
            bias_ids[i, : len(p.logit_bias)], bias_values[i, : len(p.logit_bias)] = zip(*p.logit_bias)
    banned_words = _bad_words_array(bad_words or [], batch_size)
    # One batched transfer: ten jnp.asarray calls cost ~1 ms of host time per engine step.
    return jax.device_put(SamplingBatch(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition,
        presence_penalty=presence, frequency_penalty=frequency, seeds=seeds, min_tokens=min_tokens,
        banned_ids=banned, bias_ids=bias_ids, bias_values=bias_values,
        allowed=np.zeros((batch_size, 0), np.uint32) if allowed is None else np.asarray(allowed, np.uint32),
        bad_words=banned_words, recent=np.full((batch_size, (MAX_BAD_WORD_TOKENS - 1) * bool(banned_words.shape[1])),
                                               -1, np.int32),
        logprob_ids=logprob_id_array(params, batch_size),
    ))


def logprob_id_array(params: Sequence[SamplingParams | None], batch_size: int) -> np.ndarray:
    """`SamplingBatch.logprob_ids` of these rows: each row's `logprob_token_ids` left-aligned in the first width of
    `LOGPROB_ID_WIDTHS` that holds the longest, 0 padded (columns past a row's own ids are never read); width 0 where
    no row has any.

    Example:
        >>> logprob_id_array([SamplingParams(logprobs=0, logprob_token_ids=[7, 3]), None], 2).tolist()
        [[7, 3, 0, 0], [0, 0, 0, 0]]
    """
    longest = max((len(p.logprob_token_ids) for p in params if p is not None and p.logprob_token_ids is not None),
                  default=0)
    width = next((w for w in LOGPROB_ID_WIDTHS if w >= longest), longest) if longest else 0
    out = np.zeros((batch_size, width), np.int32)
    for i, p in enumerate(params):
        if p is not None and p.logprob_token_ids is not None:
            out[i, : len(p.logprob_token_ids)] = p.logprob_token_ids
    return out


def check_bad_word_ids(seqs: Sequence[Sequence[int]]) -> None:
    """ValueError naming ``bad_words`` where a row's token sequences do not fit the fixed-width rows of a step's
    batch (`SamplingBatch.bad_words`): more than MAX_BAD_WORDS, or one outside 1..MAX_BAD_WORD_TOKENS tokens. The
    engine calls it where a request is made, so nothing is refused in the middle of a step.

    Example:
        >>> check_bad_word_ids([(1, 2), (3,)])
    """
    if len(seqs) > MAX_BAD_WORDS:
        raise ValueError(f"bad_words must give at most {MAX_BAD_WORDS} token sequences (a word gives one or two), "
                         f"got {len(seqs)}")
    for seq in seqs:
        if not 1 <= len(seq) <= MAX_BAD_WORD_TOKENS:
            raise ValueError(f"bad_words must be 1 to {MAX_BAD_WORD_TOKENS} tokens each, got {len(seq)} tokens "
                             f"{list(seq)}")


def _bad_words_array(rows: Sequence[Sequence[Sequence[int]] | None], batch_size: int) -> np.ndarray:
    width = MAX_BAD_WORDS if any(rows) else 0
    out = np.full((batch_size, width, MAX_BAD_WORD_TOKENS), -1, np.int32)
    for i, seqs in enumerate(rows):
        check_bad_word_ids(seqs or ())
        for j, seq in enumerate(seqs or ()):
            out[i, j, MAX_BAD_WORD_TOKENS - len(seq):] = seq
    return out


def needs_history(bad_words: Sequence[Sequence[int]]) -> bool:
    """Whether a row's bans depend on its last tokens (some bad word is longer than one token): each call
    then needs its tokens so far from the host (`recent_tokens`), as penalties need their counts.

    Example:
        >>> needs_history([(5,)]), needs_history([(5,), (7, 8)])
        (False, True)
    """
    return any(len(seq) > 1 for seq in bad_words)


def recent_tokens(outputs: Sequence[Sequence[int]], batch_size: int) -> np.ndarray:
    """`SamplingBatch.recent` of rows that generated ``outputs`` so far: the last MAX_BAD_WORD_TOKENS - 1
    tokens of each, right-aligned, -1 padded.

    Example:
        >>> recent_tokens([[1, 2]], 2)[:, -3:].tolist()
        [[-1, 1, 2], [-1, -1, -1]]
    """
    keep = MAX_BAD_WORD_TOKENS - 1
    out = np.full((batch_size, keep), -1, np.int32)
    for i, ids in enumerate(outputs):
        tail = list(ids[-keep:])
        if tail:
            out[i, keep - len(tail):] = tail
    return out


def bad_word_bans(bad_words: jax.Array, recent: jax.Array) -> jax.Array:
    """i32 ``[B, W]``: the token each bad-word sequence bans now, int32 max (dropped by a scatter) where it
    bans nothing: its last token where the tokens before it end ``recent`` (vLLM's rule: only generated tokens
    count). `SamplingBatch` has the layouts.

    Example:
        >>> words = jnp.array([[[-1, 7], [3, 4]]])                       # the words [7] and [3, 4]
        >>> bad_word_bans(words, jnp.array([[3]])).tolist(), bad_word_bans(words, jnp.array([[5]])).tolist()
        ([[7, 4]], [[7, 2147483647]])
    """
    prefix, last = bad_words[..., :-1], bad_words[..., -1]
    match = jnp.all((prefix < 0) | (prefix == recent[:, None, :]), axis=-1) & (last >= 0)
    return jnp.where(match, last, _INT32_MAX)


def ban_bad_words(x: jax.Array, batch: SamplingBatch) -> jax.Array:
    """``x`` ([B, V] logits) with each row's banned bad-word tokens (`bad_word_bans`) at -inf; unchanged where
    no row has bad words (the width is static)."""
    if not batch.bad_words.shape[1]:
        return x
    ids = bad_word_bans(batch.bad_words, batch.recent)
    return x.at[jnp.arange(x.shape[0])[:, None], ids].set(-jnp.inf, mode="drop")


def push_recent(recent: jax.Array, tokens: jax.Array, active: jax.Array) -> jax.Array:
    """`SamplingBatch.recent` after a decode step: the active rows' ``tokens`` shifted in at the right."""
    shifted = jnp.concatenate([recent[:, 1:], tokens[:, None].astype(recent.dtype)], axis=1)
    return jnp.where(active[:, None], shifted, recent)


def needs_penalties(params: Sequence[SamplingParams | None]) -> bool:
    """Whether some row asks for a repetition, presence or frequency penalty (greedy rows too):
    then a step needs each row's token counts, built on the host from its tokens so far.

    Example:
        >>> needs_penalties([SamplingParams(temperature=0, presence_penalty=0.5), None])
        True
    """
    return any(p is not None and _has_penalty(p) for p in params)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def needs_sampling(params: Sequence[SamplingParams | None]) -> bool:
    """False when `jnp.argmax(logits, -1)` picks exactly the tokens `sample` would.

    That holds when every row is greedy, has no penalty, no `min_tokens` and no `logit_bias`; the
    allowed-token masks of `structured_outputs` rows apply to the argmax as to the sampler
    (`jaxserve.runner.choose_tokens`).
    Log-probs are a separate question: `token_logprobs` computes them for any tokens.

    Example:
        >>> needs_sampling([SamplingParams(temperature=0), None])
        False
    """
    return any(p is not None and (not p.greedy or _has_penalty(p) or p.min_tokens > 0 or bool(p.logit_bias))
               for p in params)


def seen_from_prompts(prompt_tokens: jax.Array, prompt_lens: jax.Array, vocab_size: int) -> jax.Array:
    """Bool `[B, V]` mask of the tokens in each row's prompt (for the repetition penalty).

    prompt_tokens: i32 [B, L], right-padded; prompt_lens: i32 [B], only the first
    prompt_lens[b] tokens of row b count.

    Example:
        >>> seen_from_prompts(jnp.array([[1, 2, 0]]), jnp.array([2]), 4).astype(int).tolist()
        [[0, 1, 1, 0]]
    """
    b, length = prompt_tokens.shape
    valid = jnp.arange(length)[None, :] < prompt_lens[:, None]
    # Index vocab_size is out of bounds, so mode="drop" writes nothing for padding.
    ids = jnp.where(valid, prompt_tokens, vocab_size)
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, vocab_size), jnp.bool_).at[rows, ids].set(True, mode="drop")


def update_counts(
    counts: jax.Array, seen: jax.Array, tokens: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Record this step's tokens: counts[b, tokens[b]] += 1 and seen[b, tokens[b]] = True.

    counts: int [B, V] output-token counts; seen: bool [B, V]; tokens: i32 [B];
    mask: optional bool [B], rows where it is False (padding) are left unchanged.

    Example:
        >>> c, s = update_counts(jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), bool), jnp.array([2]))
        >>> c.tolist(), s.tolist()
        ([[0, 0, 1]], [[False, False, True]])
    """
    b, v = counts.shape
    ids = tokens if mask is None else jnp.where(mask, tokens, v)
    rows = jnp.arange(b)
    counts = counts.at[rows, ids].add(jnp.ones((), counts.dtype), mode="drop")
    seen = seen.at[rows, ids].set(True, mode="drop")
    return counts, seen


def apply_penalties(
    logits: jax.Array, batch: SamplingBatch, counts: jax.Array | None = None, seen: jax.Array | None = None
) -> jax.Array:
    """Repetition, frequency and presence penalties, in vLLM's order, as float32 logits.

    Repetition (HF/vLLM): for tokens in `seen` (prompt or output), positive logits are divided
    by the penalty and negative ones multiplied. Then (OpenAI) logits -= frequency * count +
    presence * (count > 0), with `counts` the output-token counts. A missing array means no
    history, so the penalties that read it do nothing.

    Example:
        >>> b = make_batch([SamplingParams(repetition_penalty=2.0)], 1)
        >>> apply_penalties(jnp.array([[2.0, -2.0]]), b, seen=jnp.array([[True, True]])).tolist()
        [[1.0, -4.0]]
    """
    x = logits.astype(jnp.float32)
    if seen is not None:
        r = batch.repetition_penalty[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
    if counts is not None:
        x = (x - batch.frequency_penalty[:, None] * counts.astype(jnp.float32)
             - batch.presence_penalty[:, None] * (counts > 0).astype(jnp.float32))
    return x


def token_logprobs(
    logits: jax.Array, tokens: jax.Array, num_top_logprobs: int = 0, lse: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-softmax of `logits` at `tokens` ([B]) and the `num_top_logprobs` best (ids, logprobs); ``lse`` ([B]):
    the rows' log-sum-exp where the caller has it.

    Example:
        >>> lp, ids, top = token_logprobs(jnp.log(jnp.array([[0.25, 0.75]])), jnp.array([0]), 1)
        >>> round(float(jnp.exp(lp[0])), 3), ids.tolist()
        (0.25, [[1]])
    """
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1) if lse is None else lse
    chosen = jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - lse
    if num_top_logprobs == 0:
        b = x.shape[0]
        return chosen, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
    top_vals, top_ids = top_k_exact(x, num_top_logprobs)
    return chosen, top_ids.astype(jnp.int32), top_vals - lse[:, None]


def top_k_exact(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` of each row of ``x`` [N, V] (values, ids), taken from the ``k`` chunks of `CHUNK_TOKENS` tokens
    with the largest maxima, which hold a row's k best: XLA's top-k over a 151,936-token row cost 0.36 ms a step
    at 256 rows and k = 5 on an H100 (bench/results/sampler.md), the chunks' a pass and two small top-ks.

    Example:
        >>> top_k_exact(jnp.array([[0.0, 5.0, 1.0, 2.0, 7.0, 3.0]]), 2)[1].tolist()
        [[4, 1]]
    """
    if not CANDIDATE_CHUNKS or k * CHUNK_TOKENS >= x.shape[-1]:
        return jax.lax.top_k(x, k)
    values, ids, _ = _chunk_candidates(x, chunks=k)
    best, at = jax.lax.top_k(values, k)
    return best, jnp.take_along_axis(ids, at, axis=-1)


def token_ranks(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Each row's rank of its token in `logits` ([N, V], tokens [N]): the tokens whose logits are at least its own,
    itself included, so a tie takes the worse rank (vLLM's ``Logprob.rank``, its ``(x >= value).sum(-1)``).

    Example:
        >>> token_ranks(jnp.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]]), jnp.array([0, 0])).tolist()
        [3, 2]
    """
    at = jnp.take_along_axis(logits, tokens[:, None], axis=-1)
    return jnp.sum(logits >= at, axis=-1, dtype=jnp.int32)


def scored(logits: jax.Array, tokens: jax.Array, num_top_logprobs: int = 0,
           logprob_ids: jax.Array | None = None) -> SampleOutput:
    """The chosen `tokens` ([N]) as a `SampleOutput` with their log-probabilities, ranks and the
    `num_top_logprobs` best tokens of `logits` ([N, V]), and those of each row's `logprob_ids` ([N, W],
    `SamplingBatch.logprob_ids`; None or width 0: none): what a step returns when a request asked for
    log-probabilities.

    Example:
        >>> out = scored(jnp.log(jnp.array([[0.25, 0.75]])), jnp.array([0]), 1, jnp.array([[1, 0]]))
        >>> round(float(jnp.exp(out.logprobs[0])), 3), out.ranks.tolist(), out.top_ids.tolist()
        (0.25, [2], [[1]])
        >>> np.round(np.exp(out.id_logprobs), 3).tolist(), out.id_ranks.tolist()
        ([[0.75, 0.25]], [[1, 2]])
    """
    n = tokens.shape[0]
    if logprob_ids is None or not logprob_ids.shape[1]:
        chosen, top_ids, top_lps = token_logprobs(logits, tokens, num_top_logprobs)
        id_lps, id_ranks = jnp.zeros((n, 0), jnp.float32), jnp.zeros((n, 0), jnp.int32)
    else:  # one log-sum-exp for both (XLA computed it twice, a pass over the logits each)
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        chosen, top_ids, top_lps = token_logprobs(logits, tokens, num_top_logprobs, lse)
        id_lps, id_ranks = named_logprobs(logits, logprob_ids, lse)
    return SampleOutput(tokens=tokens, logprobs=chosen, top_ids=top_ids, top_logprobs=top_lps,
                        ranks=token_ranks(logits, tokens), id_logprobs=id_lps, id_ranks=id_ranks)


def named_logprobs(logits: jax.Array, ids: jax.Array,
                   lse: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Log-softmax of each row of ``logits`` ([N, V], any float dtype; float32 here) at its ``ids`` ([N, W]), and
    each one's rank there (`token_ranks`' count: the tokens at least as likely, itself included); ``lse`` ([N]): the
    rows' log-sum-exp where the caller has it. A gather, and a count over the row a column for the ranks: no
    ``[N, V]`` log-probabilities are written.

    Example:
        >>> lps, ranks = named_logprobs(jnp.log(jnp.array([[0.125, 0.5, 0.375]])), jnp.array([[2, 0]]))
        >>> np.round(np.exp(lps), 3).tolist(), ranks.tolist()
        ([[0.375, 0.125]], [[2, 3]])
    """
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1) if lse is None else lse
    at = jnp.take_along_axis(x, ids, axis=-1)
    ranks = jnp.sum(x[:, None, :] >= at[:, :, None], axis=-1, dtype=jnp.int32)
    return at - lse[:, None], ranks


def _thresholds(
    x: jax.Array, sorted_vals: jax.Array, top_k: jax.Array, top_p: jax.Array, bound: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-row keep-threshold (keep x >= it) for top-k then top-p, from the C best values.

    sorted_vals: [B, C] the C largest entries of each row of x, descending; or, with ``bound`` [B], C entries of
    the row that include every entry above ``bound`` (`_chunk_candidates`), so that only those above it are
    sure to be the row's best. Returns the thresholds and whether each row's answer is decided inside the
    values known (always true when C == V). Ties with the threshold value are kept, as in vLLM.
    """
    v = x.shape[-1]
    c = sorted_vals.shape[-1]
    k_on = (top_k > 0) & (top_k < v)
    kth = jnp.take_along_axis(sorted_vals, (jnp.clip(top_k, 1, c) - 1)[:, None], axis=-1)[:, 0]
    k_thresh = jnp.where(k_on, kth, -jnp.inf)
    # Top-p acts on the distribution renormalised after top-k, over the whole row.
    lse = jax.nn.logsumexp(jnp.where(x >= k_thresh[:, None], x, -jnp.inf), axis=-1)
    probs = jnp.where(sorted_vals >= k_thresh[:, None], jnp.exp(sorted_vals - lse[:, None]), 0.0)
    cum = jnp.cumsum(probs, axis=-1)
    # A token stays in the nucleus while the mass ranked strictly above it is below top_p.
    n_keep = jnp.sum((cum - probs) < top_p[:, None], axis=-1)
    p_thresh = jnp.take_along_axis(sorted_vals, (jnp.maximum(n_keep, 1) - 1)[:, None], axis=-1)[:, 0]
    p_on = top_p < 1.0
    thresh = jnp.where(p_on, jnp.maximum(p_thresh, k_thresh), k_thresh)
    decided = (~k_on | (top_k <= c)) & (~p_on | (cum[:, -1] >= top_p))
    if bound is not None:
        # The k-th value is the row's own from bound up (no entry outside lies above it); the nucleus is decided
        # where it closes strictly above bound, on masses that are the row's own there.
        decided &= (~k_on | (kth >= bound)) & (~p_on | (p_thresh > bound))
    return thresh, decided


def _chunk_candidates(x: jax.Array, chunks: int | None = None,
                      chunk: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(values [B, chunks * chunk], token ids, bound [B])``: the entries of each row's ``chunks`` chunks of
    ``chunk`` tokens with the largest maxima, and the largest entry outside them (-inf if none). Every entry above
    ``bound`` is among the values, so the row's best values down to ``bound`` are the values' own. One pass over
    ``x`` (the chunk maxima), a top-k over those and a gather: no pass sorts the vocabulary.

    Example:
        >>> vals, ids, bound = _chunk_candidates(jnp.array([[0.0, 5.0, 1.0, 2.0, 7.0, 3.0]]), chunks=2, chunk=2)
        >>> vals.tolist(), ids.tolist(), bound.tolist()
        ([[0.0, 5.0, 7.0, 3.0]], [[0, 1, 4, 5]], [2.0])
    """
    chunks = CANDIDATE_CHUNKS if chunks is None else chunks
    chunk = CHUNK_TOKENS if chunk is None else chunk
    b, v = x.shape
    n = -(-v // chunk)
    if n * chunk != v:
        x = jnp.pad(x, ((0, 0), (0, n * chunk - v)), constant_values=-jnp.inf)
    blocks = x.reshape(b, n, chunk)
    maxima = blocks.max(axis=-1)
    if chunks >= n:
        top, bound = jnp.broadcast_to(jnp.arange(n), (b, n)), jnp.full((b,), -jnp.inf, x.dtype)
    else:
        best, top = jax.lax.top_k(maxima, chunks + 1)
        # In token order, so that a top-k of the values breaks ties by the lower id, as one over the row does.
        top, bound = jnp.sort(top[:, :chunks], axis=-1), best[:, chunks]
    values = jnp.take_along_axis(blocks, top[:, :, None], axis=1).reshape(b, -1)
    ids = (top[:, :, None] * chunk + jnp.arange(chunk)[None, None, :]).reshape(b, -1)
    return values, jnp.minimum(ids, v - 1), bound


def _chunk_tier_on(v: int) -> bool:
    return 0 < CANDIDATE_CHUNKS * CHUNK_TOKENS < v


def _top_k_top_p_floor(x: jax.Array, top_k: jax.Array, top_p: jax.Array, candidates: int) -> jax.Array:
    """Each row's least value kept by top-k then top-p (ties with it kept), through the tiers above."""
    v = x.shape[-1]

    def full_sort() -> jax.Array:
        return _thresholds(x, -jnp.sort(-x, axis=-1), top_k, top_p)[0]

    if candidates >= v:
        thresh = full_sort()
    else:
        def partial_sort() -> jax.Array:
            thresh, decided = _thresholds(x, jax.lax.top_k(x, candidates)[0], top_k, top_p)
            return jax.lax.cond(jnp.all(decided), lambda: thresh, full_sort)

        if _chunk_tier_on(v):
            values, _, bound = _chunk_candidates(x)
            fast, decided = _thresholds(x, -jnp.sort(-values, axis=-1), top_k, top_p, bound)
            thresh = jax.lax.cond(jnp.all(decided), lambda: fast, partial_sort)
        else:
            thresh = partial_sort()
    return thresh


def _fmix32(h: jax.Array) -> jax.Array:
    # MurmurHash3's finalizer: every input bit flips each output bit with probability ~1/2.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def token_gumbel(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """Gumbel noise ``[B, N]`` for each row's key (``[B]``, `row_keys`) at token ids (``[N]`` or ``[B, N]``): a hash
    of (key, token id) alone, so a token's noise is the same whichever tokens are drawn beside it, and ~10 integer
    operations a token where `jax.random.gumbel`'s threefry over the vocabulary took ~0.29 ms a step at 256 rows
    of 151,936 on an H100 (bench/results/sampler.md). Uniforms of 23 bits, the largest 1 - 2**-24 (24 bits' top
    one rounds to 1.0 in float32: +inf noise, which drew masked tokens): the noise is cut at ~16.6, which a Gumbel
    variable passes with probability 6e-8.

    Example:
        >>> keys = row_keys(jnp.array([[0, 7]], jnp.uint32), jnp.array([3]))
        >>> a, b = token_gumbel(keys, jnp.arange(5)), token_gumbel(keys, jnp.array([4, 2]))
        >>> bool((a[0, jnp.array([4, 2])] == b[0]).all())
        True
    """
    data = jax.random.key_data(keys).astype(jnp.uint32).reshape(keys.shape[0], -1)
    ids = ids.astype(jnp.uint32)
    ids = ids[None, :] if ids.ndim == 1 else ids
    h = _fmix32(ids * jnp.uint32(0x9E3779B9) + data[:, :1])
    h = _fmix32(h ^ data[:, -1:])
    return -jnp.log(-jnp.log(_unit(h)))


def vocab_gumbel(keys: jax.Array, vocab_size: int) -> jax.Array:
    """Gumbel noise ``[B, vocab_size]`` for each row's key: from `token_gumbel` (`HASH_NOISE`, the default) or
    `jax.random.gumbel`'s threefry; what every draw over the vocabulary adds to its logits before the argmax.

    Example:
        >>> vocab_gumbel(row_keys(jnp.array([[0, 7]], jnp.uint32), jnp.array([3])), 5).shape
        (1, 5)
    """
    if HASH_NOISE:
        return token_gumbel(keys, jnp.arange(vocab_size, dtype=jnp.uint32))
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), jnp.float32))(keys)


def _unit(h: jax.Array) -> jax.Array:
    """uint32 hashes as uniforms in (0, 1): 23 bits, exact in float32 at both ends."""
    return ((h >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))


def row_keys(seeds: jax.Array, step: jax.Array) -> jax.Array:
    """Each row's PRNG key at ``step`` (`SamplingBatch.seeds`: a seeded request's randomness is fixed by its seed
    and step alone)."""
    base = jax.random.key(0)

    def one(hi: jax.Array, lo: jax.Array, s: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, hi), lo), s)

    return jax.vmap(one)(seeds[:, 0], seeds[:, 1], step.astype(jnp.uint32))


def _ban_until_min_tokens(x: jax.Array, batch: SamplingBatch, step: jax.Array) -> jax.Array:
    b, v = x.shape
    active = (step < batch.min_tokens)[:, None] & (batch.banned_ids >= 0)
    ids = jnp.where(active, batch.banned_ids, v)  # out of bounds: dropped
    banned = x.at[jnp.arange(b)[:, None], ids].set(-jnp.inf, mode="drop")
    # A row whose masks left only stop ids (a structured output's complete match, allowed_token_ids of EOS alone)
    # keeps them: its constraint outranks min_tokens, where vLLM would draw from a row of -inf (token 0).
    return jnp.where(jnp.any(banned > -jnp.inf, axis=-1, keepdims=True), banned, x)


def processed_logits(logits: jax.Array, batch: SamplingBatch, step: jax.Array, counts: jax.Array | None = None,
                     seen: jax.Array | None = None) -> jax.Array:
    """Float32 ``[B, V]`` logits after every rule that moves them before temperature (`sample`'s order, vLLM v1's):
    allowed-token masks, bad words, logit bias, the min_tokens ban (``step``: i32 ``[B]``, tokens generated before)
    and penalties (``counts`` / ``seen``, as `apply_penalties` takes them). What a greedy row takes the argmax of.

    Example:
        >>> b = make_batch([SamplingParams(temperature=0.0, logit_bias={0: 5.0})], 1)
        >>> processed_logits(jnp.array([[0.0, 1.0]]), b, jnp.zeros(1, jnp.int32)).tolist()
        [[5.0, 1.0]]
    """
    b, v = logits.shape
    x = logits.astype(jnp.float32)
    if batch.allowed.shape[1]:  # some row is constrained (the width is static)
        x = jnp.where(unpack_allowed(batch.allowed, v), x, -jnp.inf)
    x = ban_bad_words(x, batch)
    if batch.bias_ids.shape[1]:  # some row has a logit_bias (the width is static)
        x = x.at[jnp.arange(b)[:, None], batch.bias_ids].add(batch.bias_values, mode="drop")
    x = jax.lax.cond(jnp.any(step < batch.min_tokens), _ban_until_min_tokens, lambda x, *_: x, x, batch, step)
    if counts is not None or seen is not None:
        any_penalty = jnp.any((batch.repetition_penalty != 1.0) | (batch.presence_penalty != 0.0)
                              | (batch.frequency_penalty != 0.0))
        x = jax.lax.cond(any_penalty, lambda x: apply_penalties(x, batch, counts, seen), lambda x: x, x)
    return x


@partial(jax.jit, static_argnames=("num_top_logprobs", "top_candidates", "logprobs"))
def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    step: jax.Array,
    *,
    counts: jax.Array | None = None,
    seen: jax.Array | None = None,
    num_top_logprobs: int = 0,
    top_candidates: int = DEFAULT_TOP_CANDIDATES,
    logprobs: bool = True,
) -> SampleOutput:
    """Choose one token per row. Jitted; safe to call inside a larger jitted step.

    logits: [B, V]; step: i32 [B], tokens row b generated before (with the row's seed it
    alone fixes the row's randomness); counts: int [B, V] output-token counts (presence and
    frequency penalties); seen: bool [B, V] tokens in prompt or output (repetition penalty).
    Order as vLLM v1: allowed-token masks (allowed_token_ids, structured outputs) -> bad words -> logit bias -> min_tokens ban -> penalties -> temperature -> min-p -> top-k ->
    top-p -> draw (min-p before top-p: the nucleus is of the distribution min-p left). Greedy rows take the argmax of the penalised logits. Each stage runs only if some
    row needs it. Top-k and top-p are exact: they look at the `top_candidates` best tokens
    per row and sort the whole row only when that does not decide some row's cut-off.
    Log-probs are of the unmodified logits, like vLLM's default; with ``logprobs=False`` (and no
    top log-probs) they are not computed, NaN in their place (`no_logprobs`), a pass over the
    logits saved.

    Example:
        >>> b = make_batch([SamplingParams(temperature=0.0), SamplingParams(seed=3)], 2)
        >>> out = sample(jnp.array([[0.0, 1.0, 0.5]] * 2), b, jnp.zeros(2, jnp.int32))
        >>> int(out.tokens[0]), out.tokens.shape
        (1, (2,))
    """
    if num_top_logprobs < 0:
        raise ValueError(f"num_top_logprobs must be >= 0, got {num_top_logprobs}")
    if top_candidates < 1:
        raise ValueError(f"top_candidates must be >= 1, got {top_candidates}")
    v = logits.shape[-1]
    x = processed_logits(logits, batch, step, counts, seen)
    greedy_rows = batch.temperature == 0.0
    greedy_tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def draw(x: jax.Array) -> jax.Array:
        x = _scaled(x, batch)
        keys = row_keys(batch.seeds, step)
        floor = _floor(x, batch, top_candidates)
        drawn = jnp.argmax(jnp.where(x >= floor[:, None], x, -jnp.inf) + vocab_gumbel(keys, v), axis=-1)
        drawn = drawn.astype(jnp.int32)
        return jnp.where(greedy_rows, greedy_tokens, drawn)

    tokens = jax.lax.cond(jnp.all(greedy_rows), lambda x: greedy_tokens, draw, x)
    if not logprobs and num_top_logprobs == 0:
        return no_logprobs(tokens)
    return scored(logits, tokens, num_top_logprobs, batch.logprob_ids)


def _truncated(x: jax.Array, batch: SamplingBatch, top_candidates: int) -> jax.Array:
    """Float32 logits ``x`` (penalised) divided by each row's temperature (greedy rows' left as they are), then
    min-p, top-k and top-p: -inf outside what a row may draw. What `sample` draws from."""
    x = _scaled(x, batch)
    return jnp.where(x >= _floor(x, batch, top_candidates)[:, None], x, -jnp.inf)


def _scaled(x: jax.Array, batch: SamplingBatch) -> jax.Array:
    return x / jnp.where(batch.temperature == 0.0, 1.0, batch.temperature)[:, None]


def _cuts(batch: SamplingBatch, v: int) -> jax.Array:
    """Whether some row cuts by top-k or top-p."""
    return jnp.any(((batch.top_k > 0) & (batch.top_k < v)) | (batch.top_p < 1.0))


def _floor(x: jax.Array, batch: SamplingBatch, top_candidates: int) -> jax.Array:
    """Each row's least value of scaled logits ``x`` kept by min-p, top-k and top-p (-inf: no cut)."""
    # Per-row floors, not cut copies of x: a [B, V] result of a cond is written out whole (~0.1 ms a cut at 256
    # rows of 151,936), where the one `where` of the caller fuses into what reads it (the draw).
    no_floor = jnp.full(x.shape[:1], -jnp.inf, x.dtype)
    # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p); no softmax needed (log(0) = -inf: no cut).
    floor = jax.lax.cond(jnp.any(batch.min_p > 0.0), lambda: jnp.max(x, axis=-1) + jnp.log(batch.min_p),
                         lambda: no_floor)

    def cut() -> jax.Array:
        return jnp.maximum(floor, _top_k_top_p_floor(jnp.where(x >= floor[:, None], x, -jnp.inf), batch.top_k,
                                                     batch.top_p, top_candidates))

    return jax.lax.cond(_cuts(batch, x.shape[-1]), cut, lambda: floor)


def target_logprobs(logits: jax.Array, batch: SamplingBatch,
                    top_candidates: int = DEFAULT_TOP_CANDIDATES) -> jax.Array:
    """Float32 ``[B, V]`` log-probabilities of the distribution `sample` draws each row's token from (rows without
    penalties, bias, masks or min_tokens): softmax after temperature, min-p, top-k and top-p; a greedy row's is all
    its mass on its argmax. What speculative decoding's rejection sampling checks a draft against.

    Example:
        >>> b = make_batch([SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=2)], 2)
        >>> np.round(np.exp(target_logprobs(jnp.log(jnp.array([[0.2, 0.5, 0.3]] * 2)), b)), 3).tolist()
        [[0.0, 1.0, 0.0], [0.0, 0.625, 0.375]]
    """
    x = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(_truncated(x, batch, top_candidates), axis=-1)
    greedy = jnp.arange(x.shape[-1])[None, :] == jnp.argmax(x, axis=-1)[:, None]
    return jnp.where((batch.temperature == 0.0)[:, None], jnp.where(greedy, 0.0, -jnp.inf), logp)


def unpack_allowed(allowed: jax.Array, vocab_size: int) -> jax.Array:
    """Bool ``[B, vocab_size]`` from packed uint32 masks ``[B, ceil(vocab_size / 32)]`` (`SamplingBatch.allowed`).

    Example:
        >>> unpack_allowed(jnp.array([[0b101]], jnp.uint32), 3).tolist()
        [[True, False, True]]
    """
    ids = jnp.arange(vocab_size, dtype=jnp.uint32)
    words = allowed[:, ids // 32]
    return ((words >> (ids % 32)[None, :]) & 1).astype(jnp.bool_)


def no_logprobs(tokens: jax.Array) -> SampleOutput:
    """The chosen `tokens` (`[B]`, or `[steps, B]` of a multi-step call) as a `SampleOutput` whose
    log-probabilities were not asked for: NaN, with no top tokens (a step where no request wants them
    skips the log-softmax).

    Example:
        >>> out = no_logprobs(jnp.array([3, 1], jnp.int32))
        >>> out.tokens.tolist(), bool(jnp.isnan(out.logprobs).all()), out.top_ids.shape
        ([3, 1], True, (2, 0))
    """
    shape = tokens.shape
    return SampleOutput(tokens=tokens, logprobs=jnp.full(shape, jnp.nan, jnp.float32),
                        top_ids=jnp.zeros(shape + (0,), jnp.int32), top_logprobs=jnp.zeros(shape + (0,), jnp.float32),
                        ranks=jnp.zeros(shape, jnp.int32), id_logprobs=jnp.zeros(shape + (0,), jnp.float32),
                        id_ranks=jnp.zeros(shape + (0,), jnp.int32))
