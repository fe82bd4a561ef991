"""The OpenAI wire format going out: response bodies, stream chunks, usage, logprobs.

Owns turning the async engine's results and chunks into ``text_completion`` /
``chat.completion`` bodies and their ``*.chunk`` stream events, and into SGLang's ``/generate`` answers. It
never talks to the engine or reads HTTP: the app hands it results and writes what it returns.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from typing import Any

from jaxserve.request import best_first
from jaxserve.server.protocol import ChatRequest, CompletionRequest
from jaxserve.server.reasoning import ReasoningStream, split_reasoning
from jaxserve.server.tool_calls import ToolCallStream, parse_tool_calls
from jaxserve.tokenizer import token_spellings


def _finite(logprob: float) -> float:
    """JSON has no -inf; OpenAI reports impossible tokens as -9999.0."""
    return logprob if math.isfinite(logprob) else -9999.0


def prompt_logprobs(result: dict[str, Any], prompt: list[int], k: int, decode: Any) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs`` of a result whose request asked for at least ``k``: None for the first token
    (nothing comes before it), then, keyed by token id, the prompt token's and the ``k`` best tokens'
    ``{"logprob", "rank", "decoded_token"}`` (a best token's rank: its place among them)."""
    out: list[dict[str, Any] | None] = [None]
    for token, entry, rank in zip(prompt[1:], result["prompt_logprobs"][1:], result["prompt_logprob_ranks"][1:]):
        best = best_first(entry, k)
        shown = {str(token): {"logprob": _finite(entry[token]), "rank": rank, "decoded_token": decode(token)}}
        for place, (t, v) in enumerate(best, 1):
            shown.setdefault(str(t), {"logprob": _finite(v), "rank": place, "decoded_token": decode(t)})
        out.append(shown)
    return out


def usage(results: list[dict[str, Any]], prompt_tokens: int, n: int = 1) -> dict[str, Any]:
    """OpenAI's ``usage`` object; ``prompt_tokens`` counts each distinct prompt once, and so do its
    cached tokens: ``results`` hold ``n`` samples a prompt, side by side, each reporting the prefix
    it found cached (the most of them counts: never more than the prompt)."""
    completion = sum(r["completion_tokens"] for r in results)
    n = max(1, n)
    cached = sum(max(r["cached_tokens"] for r in results[i:i + n]) for i in range(0, len(results), n))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


class CompletionFormat:
    """``/v1/completions`` bodies: choice ``i`` is prompt ``i // n``, sample ``i % n``."""

    def __init__(self, model_name: str, tokenizer: Any, req: CompletionRequest, prompts: list[list[int]],
                 echo_texts: list[str] | None = None, prompt_only: bool = False,
                 token_ids_as_names: bool = False) -> None:
        self.model_name, self.tokenizer, self.req = model_name, tokenizer, req
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts = prompts
        self.echo_texts = echo_texts  # with ``echo``: each prompt's text, put before its choices' text
        # echo with max_tokens 0: the engine ran max_tokens 1 (prompt log-probabilities need a step);
        # the answer leaves that token out.
        self.prompt_only = prompt_only
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.offsets: dict[int, int] = {}
        self._prompt_ids_sent: set[int] = set()  # streamed choices whose prompt's ids went out (return_token_ids)
        # 64 choices' top-20 logprobs spell out ~170k tokens, far fewer of them distinct; and streamed responses
        # spell out every token they send: looked up once a process (`token_spellings`), not once a response.
        self._decode = token_spellings(tokenizer).text
        # How logprobs name a token (vLLM's return_tokens_as_token_ids: "token_id:<id>"); text offsets still
        # count the text's characters.
        self._name = (lambda t: f"token_id:{t}") if token_ids_as_names else self._decode

    def _prompt_index(self, i: int) -> int:
        """The prompt of choice ``i`` (its ``n`` samples are neighbouring choices)."""
        return i // max(1, self.req.n)

    def _echoed_logprobs(self, i: int, result: dict[str, Any]) -> dict[str, Any] | None:
        """Choice ``i``'s logprobs block with ``echo``: its prompt's tokens first (the first one's
        logprob and top logprobs null: nothing comes before it), then the completion's."""
        if self.req.logprobs is None:
            return None
        prompt = self.prompts[self._prompt_index(i)]
        # The engine scored the prompt's k best for the larger of logprobs and prompt_logprobs.
        scored = [None] + [{t: entry[t], **dict(best_first(entry, self.req.logprobs))}
                           for t, entry in zip(prompt[1:], result["prompt_logprobs"][1:])]
        lps = [None] + [entry[t] for t, entry in zip(prompt[1:], scored[1:])]
        head = self._logprobs(i, prompt, lps, [None] + scored[1:])
        tail = self._logprobs(i, result["token_ids"], result.get("logprobs"), result.get("top_logprobs"))
        # top_logprobs is null in both (logprobs=0) or a list in both.
        return {k: None if head[k] is None else head[k] + (tail[k] or []) for k in head}

    def _logprobs(self, i: int, token_ids: list[int], logprobs: list[float | None] | None,
                  tops: list[dict[int, float] | None] | None) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        decode = self._name
        tokens = [decode(t) for t in token_ids]
        offsets = []
        for t in token_ids:
            offsets.append(self.offsets.get(i, 0))
            self.offsets[i] = offsets[-1] + len(self._decode(t))
        top = None
        named = self.req.logprob_token_ids is not None
        if (self.req.logprobs > 0 or named) and tops is not None:
            top = []
            for tok, lp, t in zip(tokens, logprobs or [], tops):
                if t is None:  # an echoed prompt's first token
                    top.append(None)
                    continue
                entry: dict[str, float] = {}
                if named:  # vLLM's: the sampled token, then logprob_token_ids in the order asked
                    entry[tok] = _finite(lp)
                # Best first (or as asked), and a text's first logprob kept: the byte tokens of a split character
                # all decode to U+FFFD, and a later one must not overwrite it.
                for k, v in (t.items() if named else best_first(t)):
                    entry.setdefault(decode(k), _finite(v))
                # OpenAI: "the API will always return the logprob of the sampled token".
                entry.setdefault(tok, _finite(lp))
                top.append(entry)
        return {"tokens": tokens, "token_logprobs": [None if v is None else _finite(v) for v in logprobs or []],
                "top_logprobs": top, "text_offset": offsets}

    def _shown(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The results as the answer tells them: with ``prompt_only``, without the token the engine made."""
        if not self.prompt_only:
            return results
        return [{**r, "text": "", "token_ids": [], "logprobs": [], "top_logprobs": [], "completion_tokens": 0,
                 "finish_reason": "length", "stop_reason": None} for r in results]

    def response(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        # stop_reason: vLLM's extension, the stop string or id that ended the choice (None for the tokenizer's EOS).
        results = self._shown(results)
        echo = self.echo_texts is not None
        choices = [{"index": i, "text": (self.echo_texts[self._prompt_index(i)] if echo else "") + r["text"],
                    "finish_reason": r["finish_reason"], "stop_reason": r.get("stop_reason"),
                    "logprobs": self._echoed_logprobs(i, r) if echo else
                    self._logprobs(i, r["token_ids"], r.get("logprobs"), r.get("top_logprobs"))}
                   for i, r in enumerate(results)]
        if self.req.prompt_logprobs is not None:  # vLLM's: each choice holds its prompt's
            for i, (choice, r) in enumerate(zip(choices, results)):
                choice["prompt_logprobs"] = prompt_logprobs(r, self.prompts[self._prompt_index(i)],
                                                            self.req.prompt_logprobs, self._decode)
        if self.req.return_token_ids:
            for i, (choice, r) in enumerate(zip(choices, results)):
                choice.update(prompt_token_ids=self.prompts[self._prompt_index(i)], token_ids=r["token_ids"])
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name,
                "choices": choices, "usage": usage(results, self.prompt_tokens, self.req.n)}

    def _chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name,
               "choices": choices}
        if include_usage:
            out["usage"] = None
        return out

    def stream_start(self, i: int, include_usage: bool) -> list[dict[str, Any]]:
        """With ``echo`` (and no logprobs: the prompt's come with the whole result), the prompt's text first."""
        if self.echo_texts is None:
            return []
        return [self._chunk([self._with_ids(i, {"index": i, "text": self.echo_texts[self._prompt_index(i)],
                                                "logprobs": None, "finish_reason": None, "stop_reason": None}, [])],
                            include_usage)]

    def _with_ids(self, i: int, choice: dict[str, Any], token_ids: list[int]) -> dict[str, Any]:
        """A streamed choice with ``return_token_ids``: its tokens, and its prompt's in its first chunk."""
        if not self.req.return_token_ids:
            return choice
        if i not in self._prompt_ids_sent:
            self._prompt_ids_sent.add(i)
            choice["prompt_token_ids"] = self.prompts[self._prompt_index(i)]
        choice["token_ids"] = list(token_ids)
        return choice

    def stream_chunk(self, i: int, chunk: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
        """The events for choice ``i``'s next engine chunk (none where it carries nothing to send)."""
        if self.prompt_only:  # the engine's one token is not shown: only that the choice ended
            if chunk["finish_reason"] is None:
                return []
            chunk = self._shown([chunk])[0]
        has_tokens = (self.req.logprobs is not None or self.req.return_token_ids) and chunk["token_ids"]
        if not chunk["text"] and chunk["finish_reason"] is None and not has_tokens:
            return []
        lp = self._logprobs(i, chunk["token_ids"], chunk.get("logprobs"), chunk.get("top_logprobs"))
        return [self._chunk([self._with_ids(i, {"index": i, "text": chunk["text"], "logprobs": lp,
                                                "finish_reason": chunk["finish_reason"],
                                                "stop_reason": chunk.get("stop_reason")}, chunk["token_ids"])],
                            include_usage)]

    def usage_chunk(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        out = self._chunk([], True)
        out["usage"] = usage(self._shown(results), self.prompt_tokens, self.req.n)
        return out

    def prompt_tokens_of(self, i: int) -> int:
        """Choice ``i``'s prompt's tokens (vLLM's continuous usage counts each choice's own)."""
        return len(self.prompts[self._prompt_index(i)])


def _reason_with_calls(reason: str, tool_choice: Any = None) -> str:
    """A choice's finish reason once its text held tool calls: "tool_calls" where it stopped, the
    reason itself otherwise ("length": the text was cut). A call forced by name stays "stop", as OpenAI and vLLM
    answer it ("tool_calls" is theirs for calls the model chose: auto, required)."""
    return "tool_calls" if reason == "stop" and not isinstance(tool_choice, dict) else reason


class ChatFormat:
    """``/v1/chat/completions`` bodies and ``chat.completion.chunk`` stream events.

    With ``tools`` (and ``tool_choice`` not "none") each choice's text is read for Hermes-style
    tool calls (``tool_calls.py``): found, they are the message's ``tool_calls`` and the finish
    reason "tool_calls" where it was "stop" ("length" stays: the text was cut). With ``reasoning`` (the server's
    ``--reasoning-parser``) the text up to ``</think>`` is the message's ``reasoning_content`` (``reasoning.py``;
    left out where the request's ``include_reasoning`` is false) and tool calls are read from the rest.
    """

    def __init__(self, model_name: str, tokenizer: Any, req: ChatRequest, prompt: list[int],
                 token_ids_as_names: bool = False, reasoning: bool = False) -> None:
        self.model_name, self.tokenizer, self.req = model_name, tokenizer, req
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.parse_tools = bool(req.tools) and req.tool_choice != "none"
        self._tool_streams: dict[int, ToolCallStream] = {}  # by choice index, while streaming
        self.reasoning = reasoning
        self._reasoning_streams: dict[int, ReasoningStream] = {}
        self._prompt_ids_sent = False  # return_token_ids, streamed: the prompt's ids go out once, first
        # 64 choices' top-20 logprobs spell out ~170k tokens, far fewer of them distinct.
        spellings = token_spellings(tokenizer)
        self._spell = functools.cache(lambda t: (spellings.text(t), list(spellings.bytes(t))))
        self._name = ((lambda t: (f"token_id:{t}", list(f"token_id:{t}".encode()))) if token_ids_as_names
                      else self._spell)

    def _logprobs(self, token_ids: list[int], logprobs: list[float] | None,
                  tops: list[dict[int, float]] | None) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None

        def entry(tid: int, lp: float) -> dict[str, Any]:
            # The token's own bytes: its text is U+FFFD where it holds part of a character.
            tok, raw = self._name(tid)
            return {"token": tok, "logprob": _finite(lp), "bytes": raw}

        named = self.req.logprob_token_ids is not None
        content = []
        for k, (tid, lp) in enumerate(zip(token_ids, logprobs or [])):
            item = entry(tid, lp)
            top = tops[k] if tops else {}
            if named:  # vLLM's: the sampled token, then logprob_token_ids in the order asked
                shown = [(tid, lp)] + [(t, v) for t, v in top.items() if t != tid]
            else:
                shown = best_first(top)
            item["top_logprobs"] = [entry(t, v) for t, v in shown]
            content.append(item)
        return {"content": content}

    def _message(self, result: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """A choice's ``message`` and finish reason."""
        message: dict[str, Any] = {"role": "assistant"}
        text = result["text"]
        if self.reasoning:
            reasoning, text = split_reasoning(text)
            if self.req.include_reasoning:
                message["reasoning_content"] = reasoning
        calls: list[dict[str, Any]] = []
        if self.parse_tools and text is not None:
            text, calls = parse_tool_calls(text)
            calls = calls if self.req.parallel_tool_calls else calls[:1]
        message["content"] = text
        if not calls:
            return message, result["finish_reason"]
        message["tool_calls"] = calls
        return message, _reason_with_calls(result["finish_reason"], self.req.tool_choice)

    def response(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            message, reason = self._message(r)
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "stop_reason": r.get("stop_reason"),
                            "logprobs": self._logprobs(r["token_ids"], r.get("logprobs"), r.get("top_logprobs"))})
        # n samples of one prompt: OpenAI counts the prompt once.
        out = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
               "choices": choices, "usage": usage(results, self.prompt_tokens, self.req.n)}
        if self.req.prompt_logprobs is not None:  # vLLM's: once, beside the choices (one prompt)
            out["prompt_logprobs"] = prompt_logprobs(results[0], self.prompt, self.req.prompt_logprobs,
                                                     lambda t: self._spell(t)[0])
        if self.req.return_token_ids:
            out["prompt_token_ids"] = self.prompt
            for choice, r in zip(choices, results):
                choice["token_ids"] = r["token_ids"]
        return out

    def _with_ids(self, events: list[dict[str, Any]], token_ids: list[int]) -> list[dict[str, Any]]:
        """Streamed events with ``return_token_ids``: the chunk's tokens on the first event's choice (none on the
        rest), and the prompt's ids on the stream's first chunk."""
        if not self.req.return_token_ids:
            return events
        for k, event in enumerate(events):
            event["choices"][0]["token_ids"] = list(token_ids) if k == 0 else []
        if events and not self._prompt_ids_sent:
            self._prompt_ids_sent = True
            events[0]["prompt_token_ids"] = self.prompt
        return events

    def _chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model_name, "choices": choices}
        if include_usage:
            out["usage"] = None
        return out

    def stream_start(self, i: int, include_usage: bool) -> list[dict[str, Any]]:
        return self._with_ids([self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], include_usage)], [])

    def stream_chunk(self, i: int, chunk: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
        """The events for choice ``i``'s next engine chunk (none where it carries nothing to send).

        Parsing tool calls, text from a ``<tool_call>`` on is held back; at the end its calls go
        out as one ``tool_calls`` delta before the finishing chunk, or, where none parses, the
        held text goes out as content.
        """
        text, reason, calls, reasoning = chunk["text"], chunk["finish_reason"], [], ""
        if self.reasoning:
            split = self._reasoning_streams.setdefault(i, ReasoningStream())
            reasoning, text = split.push(text)
            if reason is not None:
                more, rest = split.finish()
                reasoning, text = reasoning + more, text + rest
                del self._reasoning_streams[i]
            if not self.req.include_reasoning:
                reasoning = ""
        if self.parse_tools:
            stream = self._tool_streams.setdefault(i, ToolCallStream())
            text = stream.push(text)
            if reason is not None:
                rest, calls = stream.finish()
                calls = calls if self.req.parallel_tool_calls else calls[:1]
                text += rest
                del self._tool_streams[i]
        has_tokens = (self.req.logprobs or self.req.return_token_ids) and chunk["token_ids"]
        if not text and not reasoning and reason is None and not has_tokens:
            return []
        return self._with_ids(self._events(i, chunk, text, reason, calls, reasoning, has_tokens, include_usage),
                              chunk["token_ids"])

    def _events(self, i: int, chunk: dict[str, Any], text: str, reason: str | None, calls: list[dict[str, Any]],
                reasoning: str, has_tokens: Any, include_usage: bool) -> list[dict[str, Any]]:
        """`stream_chunk`'s events once its text is split: one chunk, or with tool calls found at the end the
        text, the calls and the finish."""
        lp = self._logprobs(chunk["token_ids"], chunk.get("logprobs"), chunk.get("top_logprobs"))
        stop_reason = chunk.get("stop_reason")
        thought = {"reasoning_content": reasoning} if reasoning else {}
        if not calls:
            delta = {**thought, "content": text} if text or (reason is None and not reasoning) else thought
            return [self._chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason,
                                  "stop_reason": stop_reason}], include_usage)]
        events = []
        if text or reasoning or has_tokens:
            events.append(self._chunk([{"index": i, "delta": {**thought, "content": text}, "logprobs": lp,
                                        "finish_reason": None, "stop_reason": None}], include_usage))
        deltas = [{"index": k, **call} for k, call in enumerate(calls)]
        events.append(self._chunk([{"index": i, "delta": {"tool_calls": deltas}, "logprobs": None,
                                    "finish_reason": None, "stop_reason": None}], include_usage))
        events.append(self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                    "finish_reason": _reason_with_calls(reason, self.req.tool_choice),
                                    "stop_reason": stop_reason}], include_usage))
        return events

    def usage_chunk(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        out = self._chunk([], True)
        out["usage"] = usage(results, self.prompt_tokens, self.req.n)
        return out

    def prompt_tokens_of(self, i: int) -> int:
        return self.prompt_tokens


class GenerateFormat:
    """SGLang's ``/generate`` answers: a ``{"text", "output_ids", "meta_info"}`` object a sample, or a list of them
    for a batch or ``n`` > 1 (prompt ``i``'s ``n`` samples side by side), as SGLang answers. Streamed, each event
    holds its sample's text, ids and logprobs so far, not a delta (SGLang's default), and in a list-answer its
    ``index``. ``logprobs[i]`` is prompt ``i``'s ``(logprob_start_len, top_logprobs_num)``, None where it asked for
    none; ``scored_only[i]``: its ``max_new_tokens`` was 0, so the one token the engine ran is not shown.

    Example:
        >>> fmt = GenerateFormat(tokenizer, [[9707, 11]], 1, ["r1"], single=True, logprobs=[(1, 0)])  # doctest: +SKIP
        >>> fmt.response([result])["meta_info"]["output_token_logprobs"][0]                           # doctest: +SKIP
        [-0.31, 1879, None]
    """

    def __init__(self, tokenizer: Any, prompts: list[list[int]], n: int, rids: list[str], single: bool,
                 logprobs: list[tuple[int, int] | None], text_in_logprobs: bool = False,
                 scored_only: list[bool] | None = None) -> None:
        self.id = f"generate-{uuid.uuid4().hex}"
        self.prompts, self.n, self.rids, self.single = prompts, n, rids, single
        self.logprobs, self.text_in_logprobs = logprobs, text_in_logprobs
        self.scored_only = scored_only or [False] * len(prompts)
        self._decode = token_spellings(tokenizer).text
        self._so_far: dict[int, dict[str, Any]] = {}  # streamed samples' text, ids and logprobs so far

    def response(self, results: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
        out = [self._answer(i, r["text"], r["token_ids"], r.get("logprobs"), r.get("top_logprobs"), r)
               for i, r in enumerate(results)]
        return out[0] if self.single else out

    def stream_start(self, i: int, include_usage: bool) -> list[dict[str, Any]]:
        return []

    def stream_chunk(self, i: int, chunk: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
        """Sample ``i``'s answer so far, with this chunk."""
        done = chunk["finish_reason"] is not None
        if self.scored_only[i // self.n] and not done:
            return []
        so_far = self._so_far.setdefault(i, {"text": "", "ids": [], "logprobs": [], "tops": []})
        so_far["text"] += chunk["text"]
        so_far["ids"] += chunk["token_ids"]
        so_far["logprobs"] += chunk.get("logprobs") or []
        so_far["tops"] += chunk.get("top_logprobs") or []
        out = self._answer(i, so_far["text"], so_far["ids"], so_far["logprobs"], so_far["tops"],
                           chunk["result"] if done else None)
        if not self.single:
            out["index"] = i
        return [out]

    def _answer(self, i: int, text: str, ids: list[int], logprobs: list[float] | None,
                tops: list[dict[int, float]] | None, result: dict[str, Any] | None) -> dict[str, Any]:
        """Sample ``i``'s object; ``result`` the engine's once it ended (None while it runs)."""
        p = i // self.n
        prompt = self.prompts[p]
        if self.scored_only[p]:
            text, ids, logprobs, tops = "", [], [], []
        meta: dict[str, Any] = {"id": self.rids[i], "finish_reason": None, "prompt_tokens": len(prompt),
                                "completion_tokens": len(ids), "weight_version": "default"}
        if result is not None:
            meta["finish_reason"] = ({"type": "length", "length": 0} if self.scored_only[p]
                                     else _sglang_finish_reason(result, ids))
            meta["cached_tokens"] = result["cached_tokens"]
            meta["e2e_latency"] = result["total_time"]
        if self.logprobs[p] is not None:
            meta.update(self._logprob_info(prompt, *self.logprobs[p], ids, logprobs or [], tops or [], result))
        return {"text": text, "output_ids": list(ids), "meta_info": meta}

    def _logprob_info(self, prompt: list[int], start: int, k: int, ids: list[int], logprobs: list[float],
                      tops: list[dict[int, float]], result: dict[str, Any] | None) -> dict[str, Any]:
        """SGLang's logprob fields: ``[logprob, token id, text or None]`` triples, the input's from the prompt token
        at ``start`` (whose logprob is always null there, as SGLang pads it), with the ``k`` best at each position."""
        def triple(logprob: float | None, token: int) -> list[Any]:
            return [None if logprob is None else _finite(logprob), token,
                    self._decode(token) if self.text_in_logprobs else None]

        def best(entry: dict[int, float]) -> list[list[Any]]:
            return [triple(v, t) for t, v in best_first(entry, k)]

        # The prompt's logprobs past `start`: computed (prompt_logprobs) only where there are any, and never
        # streamed (app.py refuses that), so the result holds them.
        scored = list(zip(prompt[start + 1:], result["prompt_logprobs"][start + 1:])) if start + 1 < len(prompt) else []
        info = {"input_token_logprobs": [triple(None, prompt[start])] + [triple(e[t], t) for t, e in scored],
                "output_token_logprobs": [triple(v, t) for v, t in zip(logprobs, ids)]}
        if k > 0:
            info["input_top_logprobs"] = [None] + [best(e) for _, e in scored]
            info["output_top_logprobs"] = [best(e) for e in tops]
        return info


def _sglang_finish_reason(result: dict[str, Any], ids: list[int]) -> dict[str, Any]:
    """SGLang's finish reason of an ended request: ``length`` with the tokens made, ``stop`` with what ``matched``
    (the stop string or stop id; otherwise the last token: the EOS id, as SGLang names it, or the token that
    completed a structured output, where SGLang's grammar would go on to EOS), or ``abort``."""
    reason = result["finish_reason"]
    if reason == "length":
        return {"type": "length", "length": len(ids)}
    if reason == "stop":
        matched = result.get("stop_reason")
        return {"type": "stop", "matched": matched if matched is not None else (ids[-1] if ids else None)}
    return {"type": "abort", "message": result.get("error") or "aborted"}
