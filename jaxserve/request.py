"""One request's host-side state, from arrival to its finish reason.

Owns the token lists, progress counters (how many tokens already have KV in the pool), stop
detection (stop ids, EOS, stop strings on the detokenized text) and timings. It never touches
device arrays or pages: the scheduler assigns it a slot and the runner fills its tokens.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import time
from typing import Any

import numpy as np

from jaxserve.lora import MAX_NAMESPACES, NAMESPACE_STRIDE
from jaxserve.sampling import SamplingParams
from jaxserve.tokenizer import IncrementalDetokenizer


# vLLM's cache_salt: prefixes of different salts must share no cached page (so one tenant cannot time another's
# prompts). A salted request's first SALT_TOKENS index keys carry 13 bits of the salt's hash each: 52 bits apart from
# any other salt's (and from every unsalted prefix past its first token, whose keys are never negative there).
SALT_TOKENS = 4


def cache_salt_keys(salt: str, lora_namespace: int = 0) -> tuple[int, ...]:
    """The namespaces (1..`MAX_NAMESPACES`) a salted request's first index keys move to; ValueError naming
    ``cache_salt`` unless it is a non-empty string.

    Example:
        >>> len(cache_salt_keys("tenant-a")), cache_salt_keys("tenant-a") == cache_salt_keys("tenant-b")
        (4, False)
    """
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    digest = hashlib.sha256(f"{lora_namespace}:{salt}".encode()).digest()
    return tuple(1 + int.from_bytes(digest[4 * j:4 * j + 4], "little") % MAX_NAMESPACES for j in range(SALT_TOKENS))


def best_first(entry: dict[int, float], k: int | None = None) -> list[tuple[int, float]]:
    """A position's ``{token: logprob}`` (a request's ``top_logprobs`` entry) as ``(token, logprob)`` pairs, most
    likely first; the first ``k``.

    Example:
        >>> best_first({3: -2.0, 7: -0.1, 5: -1.0}, 2)
        [(7, -0.1), (5, -1.0)]
    """
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


# The markers of a thinking section (Qwen's reasoning models, QwQ-32B, DeepSeek-R1's Qwen distills): the server's
# reasoning parser splits at them and `ThinkBudget` counts between them.
THINK_START = "<think>"
THINK_END = "</think>"


@dataclasses.dataclass(eq=False)
class ThinkBudget:
    """`SamplingParams.thinking_token_budget` on the host (vLLM's thinking-budget logits processor): inside a thinking
    section (opened by ``start``'s tokens, in the prompt or the output) at most ``budget`` tokens are taken; the
    engine then forces ``end``'s tokens, one a step (`forced`, as an allowed-token mask; what a call of several steps
    sampled past the budget is cut), after which the output goes on freely.

    Example:
        >>> b = ThinkBudget.from_prompt(2, (7,), (8,), [1, 7])  # the prompt opened a section: 2 tokens in it
        >>> b.take([5, 6, 5]), b.forced(), b.take([8, 4]), b.forced()
        (2, 8, 2, None)
    """

    budget: int
    start: tuple[int, ...]
    end: tuple[int, ...]
    thinking: bool = False
    spent: int = 0  # tokens taken in the open section
    pending: list[int] = dataclasses.field(default_factory=list)  # ``end``'s tokens still to force
    tail: list[int] = dataclasses.field(default_factory=list)  # the last tokens, where a marker may end

    @classmethod
    def from_prompt(cls, budget: int, start: tuple[int, ...], end: tuple[int, ...],
                    prompt: list[int]) -> "ThinkBudget":
        """The state after ``prompt``: thinking where its last ``start`` comes after its last ``end``."""
        state = cls(budget, tuple(start), tuple(end), thinking=_last_at(prompt, start) > _last_at(prompt, end))
        state.tail = list(prompt[-max(len(start), len(end)):])
        state._close_if_spent()
        return state

    def forced(self) -> int | None:
        """The token the next step must take (the next of ``end``'s), or None."""
        return self.pending[0] if self.pending else None

    def take(self, tokens: list[int]) -> int:
        """How many of ``tokens`` (sampled in order from the state now) stand; the state moves past them. A cut
        (the budget spent inside a section) leaves ``end``'s tokens to force."""
        for i, token in enumerate(tokens):
            if self.pending:
                if token != self.pending[0]:  # sampled without the forcing mask (past the budget): cut here
                    return i
                self.pending.pop(0)
            elif self.thinking:
                self.spent += 1
            self.tail = (self.tail + [token])[-max(len(self.start), len(self.end)):]
            if _ends_with(self.tail, self.end):
                self.thinking, self.pending = False, []
            elif _ends_with(self.tail, self.start):
                self.thinking, self.spent = True, 0
            self._close_if_spent()
        return len(tokens)

    def _close_if_spent(self) -> None:
        if self.thinking and not self.pending and self.spent >= self.budget:
            self.pending = list(self.end)

    def room(self) -> int | None:
        """Tokens that may still be sampled freely before a cut (None: no limit now, outside a section)."""
        if self.pending:
            return 0
        return self.budget - self.spent if self.thinking else None


def _last_at(ids: list[int], marker: tuple[int, ...]) -> int:
    """Where the last occurrence of ``marker`` in ``ids`` ends (-1: none)."""
    n = len(marker)
    if not n or len(ids) < n:
        return -1
    # Candidates by the marker's first token, found with numpy: a 32k-token prompt scanned in Python took ~10 ms.
    starts = np.flatnonzero(np.asarray(ids[:len(ids) - n + 1]) == marker[0])
    for i in starts[::-1].tolist():
        if tuple(ids[i:i + n]) == marker:
            return i + n
    return -1


def _ends_with(ids: list[int], marker: tuple[int, ...]) -> bool:
    return len(ids) >= len(marker) and tuple(ids[-len(marker):]) == marker


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt being served. ``computed`` counts tokens whose K/V are in the pool.

    Compared by identity: two requests with the same prompt are still two requests.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    eos_ids: tuple[int, ...]
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    priority: int = 0  # lower runs first where EngineConfig.scheduling_policy is "priority" (vLLM's order)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    # Each output token's rank among the vocabulary, kept where log-probabilities were asked for.
    output_ranks: list[int | None] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    # Each output token's ranks of `params.logprob_token_ids` (its ``top_logprobs`` entry's tokens), where asked.
    named_ranks: list[dict[int, int]] = dataclasses.field(default_factory=list)
    text: str = ""
    status: Status = Status.WAITING
    slot: int = -1
    node: int = -1  # deepest radix node locked for this request (-1: none)
    # Its pages hold K/V of weights since replaced (`Engine.update_params` while it ran): never indexed.
    stale_kv: bool = False
    computed: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix index at (first) admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    # What stopped it (vLLM's `stop_reason`): the stop string or the stop id; None for EOS (but `named_eos`) or any
    # other finish.
    stop_reason: str | int | None = None
    # The EOS ids vLLM stops on as stop ids, naming them as stop_reason: the model's EOS ids but the tokenizer's
    # (vLLM's eos_token_id, the only one it reports as plain EOS; generation_config.json's others join the stop ids).
    # Empty: every EOS id ends a request unnamed.
    named_eos: frozenset[int] = frozenset()
    error: str | None = None
    client_error: bool = False  # the error came from the request's own parameters (`finish`)
    first_token_time: float | None = None
    finish_time: float | None = None
    prefill_end: int = 0  # prefill runs until this many tokens have K/V (set at each admission)
    prefill_start: int = 0  # tokens the prefix index supplied at the latest admission
    emitted_chars: int = 0  # text already handed to a stream
    new_token_count: int = 0
    # Without stop strings nothing needs the text while tokens arrive, so it is detokenized
    # when read (``take_delta``/``result``), a run of tokens per decode (two tokenizer calls),
    # not two calls per token: at batch 256 that per-token cost exceeded the GPU's step.
    detok_pushed: int = 0  # output tokens already given to the detokenizer
    # Prompt log-probabilities (``params.prompt_logprobs`` set): one entry a prompt token, the first
    # None. Positions below ``prompt_logprobs_upto`` are covered by a dispatched prefill chunk, so a
    # recompute after preemption neither computes them again nor loses them.
    prompt_lps: list[dict[int, float] | None] = dataclasses.field(default_factory=list, repr=False)
    prompt_logprobs_upto: int = 1
    prompt_ranks: list[int | None] = dataclasses.field(default_factory=list, repr=False)  # each prompt token's rank
    _stops: frozenset[int] | None = dataclasses.field(default=None, repr=False)
    # Structured outputs (`params.structured_outputs`): where the output stands in its constraint
    # (`jaxserve.structured.GuideState`), advanced by the engine as tokens arrive; None without one.
    guide: Any = dataclasses.field(default=None, repr=False)
    # `params.bad_words` as the token sequences they ban (`jaxserve.tokenizer.bad_words_token_ids`).
    bad_word_ids: tuple[tuple[int, ...], ...] = ()
    # `params.thinking_token_budget`'s state (`ThinkBudget`); None without one.
    think: ThinkBudget | None = dataclasses.field(default=None, repr=False)
    # LoRA (`jaxserve.lora`): the adapter's id (0: the base model), its prefix-cache namespace and, while admitted,
    # the device slot holding it (-1: none).
    lora_id: int = 0
    lora_namespace: int = 0
    lora_slot: int = -1
    # vLLM's cache_salt: the namespaces its first index keys move to (`cache_salt_keys`); empty: unsalted.
    salt_keys: tuple[int, ...] = ()
    # A pooling request (`jaxserve.pooling`): prefilled, never decoded; its prompt's final hidden states pooled as
    # chunks arrive (the sum over positions below ``pooled_upto``, for a mean) and, when the last chunk is read,
    # ``embedding``.
    pooling: Any = None
    pool_sum: Any = dataclasses.field(default=None, repr=False)
    pooled_upto: int = 0
    embedding: Any = dataclasses.field(default=None, repr=False)  # a classify request's: its labels' probabilities
    # A prompt given as embeddings (vLLM's ``prompt_embeds``): ``[len(prompt_ids), hidden]`` float32 on the host, fed to
    # the model in place of the token embeddings of the prompt's positions; ``prompt_ids`` are then placeholders (0).
    prompt_embeds: Any = dataclasses.field(default=None, repr=False)
    label: str | None = None  # a classify request's most likely label

    @property
    def all_ids(self) -> list[int]:
        """Prompt plus generated tokens: what a recompute after preemption must prefill."""
        return self.prompt_ids + self.output_ids

    @property
    def known_ids(self) -> list[int]:
        """The tokens it has that are real ids (penalties count them, n-gram drafts read them): `all_ids`, or the
        output's alone where the prompt was given as embeddings."""
        return self.output_ids if self.prompt_embeds is not None else self.all_ids

    @property
    def indexes_prefix(self) -> bool:
        """Whether its pages may be found by token ids (the prefix cache): not where the prompt was given as
        embeddings, whose K/V no ids name."""
        return self.prompt_embeds is None

    @property
    def index_ids(self) -> list[int]:
        """`all_ids` as the prefix index keys them: with an adapter the first token is moved to a negative id of
        the adapter's own (K/V depend on the adapter, so its prefixes must match only its own); with a cache salt
        the first `SALT_TOKENS` are moved to the salt's namespaces (`cache_salt_keys`, which fold the adapter in)."""
        ids = self.all_ids
        if self.salt_keys:
            for j, key in enumerate(self.salt_keys[:len(ids)]):
                ids[j] = -1 - ids[j] - key * NAMESPACE_STRIDE
        elif self.lora_namespace:
            ids[0] = -1 - ids[0] - self.lora_namespace * NAMESPACE_STRIDE
        return ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt log-probabilities asked for and not all computed yet: its prefill must compute
        every prompt position (no cached prefix: those positions would have no logits)."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs_upto < len(self.prompt_ids)

    @property
    def computes_whole_prompt(self) -> bool:
        """Whether its prefill must compute every prompt position, the prefix cache supplying none: prompt
        log-probabilities still owed, a mean over the prompt's hidden states (cached positions have neither), or a
        prompt given as embeddings (`indexes_prefix`)."""
        return (self.wants_prompt_logprobs or (self.pooling is not None and self.pooling.pooling_type == "mean")
                or not self.indexes_prefix)

    @property
    def is_prefilling(self) -> bool:
        return self.computed < self.prefill_end

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def append(self, token: int, logprob: float, top: dict[int, float] | None, rank: int | None = None,
               named_ranks: dict[int, int] | None = None) -> None:
        """Add one sampled token and apply the stop rules; sets ``finish_reason`` when done. ``rank``: the
        token's rank among the vocabulary (None or 0: not computed); ``named_ranks``: those of its
        `logprob_token_ids`, where asked."""
        if self.finish_reason is not None:
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.append(token)
        self.output_logprobs.append(logprob)
        if self.params.logprobs is not None:
            self.output_ranks.append(rank or None)
        if top is not None:
            self.top_logprobs.append(top)
        if named_ranks is not None:
            self.named_ranks.append(named_ranks)
        self.new_token_count += 1
        if token in self._stop_ids() and len(self.output_ids) > self.params.min_tokens:
            if self.params.stop and self.params.include_stop_str_in_output and self.detokenizer is not None:
                # vLLM's: the stop token's own text is the output's with include_stop_str_in_output (none where
                # skip_special_tokens drops it), and a stop string it completes is the stop_reason.
                self._add_text(self.detokenizer.push(token))
            if self.finish_reason is None:
                self._stop_on_id(token)
            return
        if not self.params.stop:
            if len(self.output_ids) >= self.params.max_tokens:
                self.finish("length")
            return
        if self.detokenizer is not None:
            self._add_text(self.detokenizer.push(token))
        if self.finish_reason is None and len(self.output_ids) >= self.params.max_tokens:
            if self.detokenizer is not None:
                self._add_text(self.detokenizer.flush())
            if self.finish_reason is None:
                self.finish("length")

    def extend(self, tokens: list[int], logprobs: list[float],
               tops: list[dict[int, float]] | None = None, ranks: list[int] | None = None,
               named_ranks: list[dict[int, int]] | None = None) -> int:
        """``append`` for a run of tokens, in order (``tops``: each one's top log-probabilities,
        if asked; ``ranks``: each one's rank, 0 where not computed; ``named_ranks``: each one's ranks of its
        `logprob_token_ids`, if asked); returns how many were taken (the rest come after the token that finished the
        request).

        Without stop strings or top log-probabilities nothing is needed per token, so the stop
        rules reduce to the first stop id past ``min_tokens`` and ``max_tokens``: a set test and
        two list extends a decode call, not a Python call a token (at batch 256 that per-token
        cost was most of the host's work between device calls).
        """
        if self.params.stop or tops is not None:
            taken = 0
            for token, logprob, top, rank, named in zip(tokens, logprobs, tops or [None] * len(tokens),
                                                        ranks or [None] * len(tokens),
                                                        named_ranks or [None] * len(tokens)):
                if self.finish_reason is not None:
                    break
                self.append(token, logprob, top, rank, named)
                taken += 1
            return taken
        if self.finish_reason is not None or not tokens:
            return 0
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        done = len(self.output_ids)
        room = max(0, self.params.max_tokens - done)
        take = min(len(tokens), room)
        reason = "length" if take == room else None
        stops = self._stop_ids()
        if not stops.isdisjoint(tokens[:take]):
            for k in range(take):
                if tokens[k] in stops and done + k + 1 > self.params.min_tokens:
                    take, reason = k + 1, "stop"
                    break
        self.output_ids.extend(tokens[:take])
        self.output_logprobs.extend(logprobs[:take])
        if self.params.logprobs is not None:
            self.output_ranks.extend([k or None for k in ranks[:take]] if ranks is not None else [None] * take)
        self.new_token_count += take
        if reason == "stop":
            self._stop_on_id(tokens[take - 1])
        elif reason is not None:
            self.finish(reason)
        return take

    def _stop_on_id(self, token: int) -> None:
        # vLLM's check_stop: its EOS (the tokenizer's, unless ignore_eos) is tested first and names no stop_reason,
        # even where the request lists it among its stop ids; every other id that stops a request is a stop id
        # there (the model's other EOS ids are added to them) and is named.
        self.finish("stop")
        plain_eos = not self.params.ignore_eos and token in self.eos_ids and token not in self.named_eos
        if not plain_eos:
            self.stop_reason = token

    def _stop_ids(self) -> frozenset[int]:
        """The ids that stop this request: its stop ids, and EOS unless ``ignore_eos``."""
        if self._stops is None:
            eos = () if self.params.ignore_eos else self.eos_ids
            self._stops = frozenset(self.params.stop_token_ids) | frozenset(eos)
        return self._stops

    def sync_text(self) -> None:
        """Bring ``text`` up to date with the tokens so far (requests without stop strings)."""
        if self.detokenizer is None or self.params.stop:
            return
        # Without stop strings, "stop" ends on a stop id, which makes no text unless include_stop_str_in_output
        # (vLLM's detokenizer skips the stop token's text only without it), or on the token that completed a
        # structured output's match, which does.
        stop_id = (self.finish_reason == "stop" and not self.params.include_stop_str_in_output
                   and bool(self.output_ids) and self.output_ids[-1] in self._stop_ids())
        text_tokens = len(self.output_ids) - stop_id
        if self.detok_pushed < text_tokens:
            self.text += self.detokenizer.push_many(self.output_ids[self.detok_pushed:text_tokens])
            self.detok_pushed = text_tokens
        if self.finish_reason == "length":
            # The held-back tail belongs to the text once max_tokens is reached; flushing again
            # adds nothing.
            self.text += self.detokenizer.flush()

    def _add_text(self, delta: str) -> None:
        if not delta or self.finish_reason is not None:
            return
        before = len(self.text)
        self.text += delta
        if self.params.stop and len(self.output_ids) > self.params.min_tokens:
            # A stop string may straddle deltas: each is searched from just before the new text, no
            # further back (a longer one's window would find a short one made within min_tokens).
            found = ((self.text.find(s, max(0, before - len(s) + 1)), s) for s in self.params.stop)
            hits = [(i, s) for i, s in found if i >= 0]
            if hits:
                # vLLM's choice among several in one delta: the one that ends first, ties to the first listed (as
                # the text coming a character at a time would have stopped), not the one that starts first.
                at, stop = min(hits, key=lambda hit: hit[0] + len(hit[1]))
                self.text = self.text[:at + len(stop) if self.params.include_stop_str_in_output else at]
                self.finish("stop")
                self.stop_reason = stop

    def finish(self, reason: str, error: str | None = None, client_error: bool = False) -> None:
        """``client_error``: the error is the request's own doing (a server answers it with a 400, not a 500)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.error = error
            self.client_error = client_error
            self.finish_time = time.perf_counter()
        self.status = Status.FINISHED

    def take_delta(self) -> tuple[str, int]:
        """Text and token count produced since the last call (for streaming).

        While running, the last ``len(longest stop string) - 1`` characters are held back: they
        could turn out to be the start of a stop string, which is never returned. With
        ``include_stop_str_in_output`` nothing is (vLLM's): a stop string stays in the text, and the text
        is cut at its end, past everything already handed out.
        """
        self.sync_text()
        end = len(self.text)
        if self.finish_reason is None and self.params.stop and not self.params.include_stop_str_in_output:
            end = max(self.emitted_chars, end - max(len(s) for s in self.params.stop) + 1)
        delta, n = self.text[self.emitted_chars:end], self.new_token_count
        self.emitted_chars, self.new_token_count = end, 0
        return delta, n

    def result(self) -> dict[str, Any]:
        """The plain-dict result ``generate`` returns (a pooling request's: ``embed``'s)."""
        end = self.finish_time or time.perf_counter()
        if self.pooling is not None:
            out = {"request_id": self.request_id, "finish_reason": self.finish_reason,
                   "prompt_tokens": len(self.prompt_ids), "cached_tokens": self.cached_tokens,
                   "total_time": end - self.arrival}
            if self.error:  # ended without pooling (never fits the pool, a failed step): None below, and why
                out["error"] = self.error
            if self.pooling.task == "classify":
                return {**out, "probs": self.embedding, "label": self.label}
            return {**out, "embedding": self.embedding}
        self.sync_text()
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival
        n = len(self.output_ids)
        tpot = None if ttft is None or n < 2 else (end - self.first_token_time) / (n - 1)
        out = {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": list(self.output_ids),
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "prompt_token_ids": list(self.prompt_ids),
            "prompt_tokens": len(self.prompt_ids),
            "cached_tokens": self.cached_tokens,
            "completion_tokens": n,
            "ttft": ttft,
            "tpot": tpot,
            "total_time": end - self.arrival,
        }
        if self.params.logprobs is not None:
            out["logprobs"] = list(self.output_logprobs)
            out["logprob_ranks"] = list(self.output_ranks)
            if self.params.has_top_logprobs:
                out["top_logprobs"] = list(self.top_logprobs)
            if self.params.logprob_token_ids is not None:
                out["top_logprob_ranks"] = list(self.named_ranks)
        if self.params.prompt_logprobs is not None:
            out["prompt_logprobs"] = list(self.prompt_lps) or [None] * len(self.prompt_ids)
            out["prompt_logprob_ranks"] = list(self.prompt_ranks) or [None] * len(self.prompt_ids)
        if self.error:
            out["error"] = self.error
        return out
