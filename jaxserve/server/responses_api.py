"""OpenAI's Responses API (``POST /v1/responses``, as vLLM serves it), stateless: a request is translated into the
chat request it stands for, runs as ``/v1/chat/completions`` runs, and comes back as a ``response`` object or its
stream of typed events.

Owns the translation both ways: ``input`` (a string, or a list of message, ``function_call`` and
``function_call_output`` items) and ``instructions`` to chat messages; function ``tools``, ``tool_choice`` and
``text.format`` to their chat spellings (vLLM's sampling extensions such as ``top_k`` or ``seed`` pass through);
a chat result to output items (``reasoning`` under the server's reasoning parser, ``message`` with ``output_text``,
``function_call``), and the store of finished responses (`ResponseStore`, in memory and bounded, as vLLM's): a
stored response's conversation continues under ``previous_response_id`` and is read back with ``GET
/v1/responses/{id}``. Built-in tools (web search, files) are refused by name.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from jaxserve.server.protocol import APIError, ChatRequest, SamplingFields, Schema
from jaxserve.server.responses import ChatFormat

# Chat request fields a Responses body may carry as they are (vLLM's extensions and OpenAI's own).
_PASSED = tuple(name for name in SamplingFields.model_fields
                if name not in ("model", "n", "stream", "stream_options", "response_format", "use_beam_search",
                                "length_penalty", "prompt_logprobs", "logprobs"))


class ResponsesRequest(Schema):
    """The fields of OpenAI's ``/v1/responses`` body read here (others pass through to the chat request or are
    ignored, as OpenAI ignores unknown fields)."""

    model: str | None = None  # none: the served base model, as the other routes
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    # Each output token's log-probability and this many best tokens; also asked by include's
    # "message.output_text.logprobs" (with none).
    top_logprobs: int | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None


class ResponseStore:
    """Finished responses by id, each with the conversation it ends (chat messages, its instructions left out: OpenAI
    does not carry instructions over to a continuation), the oldest dropped past ``capacity`` (0: none kept).

    Example:
        >>> store = ResponseStore(2)
        >>> store.put({"id": "resp_a"}, [{"role": "user", "content": "Hi"}]); store.conversation("resp_a")
        [{'role': 'user', 'content': 'Hi'}]
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()  # the event loop and the tokenizer thread both finish responses

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[response["id"]] = (response, conversation)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def _get(self, response_id: str, param: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with self._lock:
            found = self._items.get(response_id)
        if found is None:
            raise APIError(404, f"response {response_id!r} not found (responses are kept in memory: the latest "
                                f"{self.capacity}, while the server runs)", param=param, code="not_found")
        return found

    def response(self, response_id: str) -> dict[str, Any]:
        return self._get(response_id, "response_id")[0]

    def conversation(self, response_id: str, param: str = "previous_response_id") -> list[dict[str, Any]]:
        return [dict(m) for m in self._get(response_id, param)[1]]

    def delete(self, response_id: str) -> None:
        self._get(response_id, "response_id")
        with self._lock:
            self._items.pop(response_id, None)


def chat_body(req: ResponsesRequest, raw: dict[str, Any],
              conversation: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body that ``req`` stands for (``raw``: the request's JSON, for the sampling
    fields passed through; ``conversation``: its messages, its instructions apart, where the caller has them, the
    conversation of its ``previous_response_id`` first; default `input_messages`).

    Example:
        >>> r = ResponsesRequest(model="m", input="Hi", instructions="Be brief.", max_output_tokens=8)
        >>> chat_body(r, {})["messages"]
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += [dict(m) for m in (input_messages(req) if conversation is None else conversation)]
    body: dict[str, Any] = {name: raw[name] for name in _PASSED if raw.get(name) is not None}
    body.update(model=req.model, messages=messages, stream=req.stream, max_completion_tokens=req.max_output_tokens,
                parallel_tool_calls=req.parallel_tool_calls)
    if req.top_logprobs is not None or "message.output_text.logprobs" in (req.include or []):
        body.update(logprobs=True, top_logprobs=req.top_logprobs or 0)
    if req.tools:
        body["tools"] = [_tool(t, k) for k, t in enumerate(req.tools)]
    if isinstance(req.tool_choice, dict):
        if req.tool_choice.get("type") != "function" or "name" not in req.tool_choice:
            raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
                           param="tool_choice")
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice["name"]}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    fmt = (req.text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise APIError(400, f"text.format must be an object such as {{'type': 'json_object'}}, got {fmt!r}",
                       param="text")
    if fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.get("type") != "text":
        raise APIError(400, f"text.format.type {fmt.get('type')!r} is not supported (text, json_schema, json_object "
                            "are)", param="text")
    return body


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """``req.input`` as chat messages (its instructions apart)."""
    messages: list[dict[str, Any]] = []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for k, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item.get("content"), f"input[{k}].content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text(item.get("output"), f"input[{k}].output")})
        elif kind != "reasoning":  # an earlier turn's reasoning is not shown to the model again
            raise APIError(400, f"input[{k}].type {kind!r} is not supported (message, function_call, "
                                "function_call_output, reasoning are)", param="input")
    return messages


def output_messages(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A response's output as the assistant turn it adds to the conversation (its text and its tool calls; the
    reasoning is not shown to the model again)."""
    texts = [part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]]
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in response["output"] if item["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _text(content: Any, where: str) -> Any:
    """An item's content as chat takes it: a string as it is, a list of text parts joined."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"{where}: part type {kind!r} is not supported (text parts only)", param="input")
        text = part.get("text") or ""
        if not isinstance(text, str):
            raise APIError(400, f"{where}: a text part's text must be a string, got {text!r}", param="input")
        texts.append(text)
    return "".join(texts)


def _tool(tool: dict[str, Any], k: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise APIError(400, f"tools[{k}].type {tool.get('type')!r} is not supported (function tools only: this server "
                            "runs no built-in tools)", param="tools")
    return {"type": "function", "function": {k2: tool[k2] for k2 in ("name", "description", "parameters")
                                             if tool.get(k2) is not None}}


class ResponsesFormat(ChatFormat):
    """A chat result as a ``response`` object, and the chat stream's deltas as the Responses API's events
    (``response.created`` ... ``response.output_text.delta`` ... ``response.completed``), each with its
    ``sequence_number``."""

    def __init__(self, model_name: str, tokenizer: Any, chat: ChatRequest, prompt: list[int],
                 req: ResponsesRequest, reasoning: bool = False,
                 on_done: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(model_name, tokenizer, chat, prompt, reasoning=reasoning)
        self.responses_req = req
        self.on_done = on_done  # given the finished response (whole or streamed): the store's
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # the stream's output items so far, the open one last
        self._open: str | None = None  # the type of the item still being written
        self._held_logprobs: list[dict[str, Any]] = []  # of tokens whose text is not out yet

    def _envelope(self, status: str, output: list[dict[str, Any]], use: dict[str, Any] | None,
                  reason: str | None = None) -> dict[str, Any]:
        req = self.responses_req
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "error": None, "model": self.model_name, "output": output,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": self.req.temperature, "top_p": self.req.top_p,
            "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls, "text": req.text or {"format": {"type": "text"}},
            "previous_response_id": req.previous_response_id, "store": self.on_done is not None,
            "metadata": req.metadata or {}, "usage": use,
        }

    @staticmethod
    def _usage(results: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
        r = results[0]
        return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": r.get("cached_tokens", 0)},
                "output_tokens": r["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + r["completion_tokens"]}

    @staticmethod
    def _status(reason: str | None) -> str:
        return "completed" if reason in ("stop", "tool_calls") else "incomplete"

    def response(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        message, reason = self._message(results[0])
        output = []
        if message.get("reasoning_content"):
            output.append(_reasoning_item(message["reasoning_content"]))
        if message.get("content"):
            output.append(_message_item(message["content"]))
            logprobs = self._logprobs(results[0]["token_ids"], results[0].get("logprobs"),
                                      results[0].get("top_logprobs"))
            output[-1]["content"][0]["logprobs"] = logprobs["content"] if logprobs else []
        for call in message.get("tool_calls", []):
            output.append(_call_item(call))
        return self._done(self._envelope(self._status(reason), output, self._usage(results, self.prompt_tokens),
                                         reason))

    def _done(self, response: dict[str, Any]) -> dict[str, Any]:
        if self.on_done is not None:
            self.on_done(response)
        return response

    # ----- streaming: the chat deltas become typed events ------------------------------------------------
    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": type_, "sequence_number": self._seq - 1, **fields}

    def stream_start(self, i: int, include_usage: bool) -> list[dict[str, Any]]:
        started = self._envelope("in_progress", [], None)
        return [self._event("response.created", response=started),
                self._event("response.in_progress", response=started)]

    def _close(self) -> list[dict[str, Any]]:
        """Events that finish the open item."""
        if self._open is None:
            return []
        item, index, self._open = self._items[-1], len(self._items) - 1, None
        item["status"] = "completed"
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            part["logprobs"] = part["logprobs"] + self._held_logprobs
            self._held_logprobs = []
            events += [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=part["logprobs"]),
                       self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part)]
        elif item["type"] == "reasoning":
            part = item["content"][0]
            events += [self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"]),
                       self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part)]
        return events + [self._event("response.output_item.done", output_index=index, item=item)]

    def _append(self, kind: str, text: str) -> list[dict[str, Any]]:
        """``text`` added to the open item of ``kind`` (a message or reasoning), opening one where needed; a message's
        delta carries the log-probabilities of the tokens held so far."""
        events = []
        if self._open != kind:
            events += self._close()
            item = _message_item("") if kind == "message" else _reasoning_item("")
            item["status"] = "in_progress"
            self._items.append(item)
            self._open = kind
            index, part = len(self._items) - 1, dict(item["content"][0])
            events += [self._event("response.output_item.added", output_index=index, item=_copy(item)),
                       self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                   content_index=0, part=part)]
        item, index = self._items[-1], len(self._items) - 1
        item["content"][0]["text"] += text
        delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {}
        if kind == "message":
            extra["logprobs"], self._held_logprobs = self._held_logprobs, []
            # Rebound, not extended: the events made so far hold copies of the part that share its list.
            item["content"][0]["logprobs"] = item["content"][0]["logprobs"] + extra["logprobs"]
        return events + [self._event(delta, item_id=item["id"], output_index=index, content_index=0, delta=text,
                                     **extra)]

    def stream_chunk(self, i: int, chunk: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
        events = []
        for chat_chunk in super().stream_chunk(i, chunk, False):
            choice = chat_chunk["choices"][0]
            delta = choice["delta"]
            self._held_logprobs += (choice.get("logprobs") or {}).get("content") or []
            if delta.get("reasoning_content"):
                events += self._append("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                events += self._append("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._close()
                item = _call_item(call)
                self._items.append(item)
                index = len(self._items) - 1
                events += [self._event("response.output_item.added", output_index=index,
                                       item={**item, "arguments": "", "status": "in_progress"}),
                           self._event("response.function_call_arguments.delta", item_id=item["id"],
                                       output_index=index, delta=item["arguments"]),
                           self._event("response.function_call_arguments.done", item_id=item["id"],
                                       output_index=index, arguments=item["arguments"]),
                           self._event("response.output_item.done", output_index=index, item=item)]
        if chunk["finish_reason"] is not None:
            events += self._close()
            reason = chunk["finish_reason"]
            if any(item["type"] == "function_call" for item in self._items) and reason == "stop":
                reason = "tool_calls"
            status = self._status(reason)
            done = self._done(self._envelope(status, self._items, self._usage([chunk["result"]], self.prompt_tokens),
                                             reason))
            events.append(self._event(f"response.{status}", response=done))
        return events


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "content": [dict(part) for part in item["content"]]}


def _message_item(text: str) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "status": "completed", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}
