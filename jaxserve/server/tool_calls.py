"""Tool calls in generated text: Qwen2.5's Hermes format, as vLLM's ``--tool-call-parser hermes``.

Owns reading ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks out of a choice's
text into OpenAI ``tool_calls``, and, for streams, deciding how much of the text so far may go out
as content before the whole choice is known. It never reads HTTP or the engine, and never decides
whether a request wants tool calls parsed (``responses.py`` does).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# The last block may lack its end tag: the model may stop (EOS) right after the JSON. vLLM's
# hermes parser takes such a block too.
_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END) + "|"
                    + re.escape(TOOL_CALL_START) + r"(.*)\Z", re.DOTALL)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _tool_call(body: str) -> dict[str, Any] | None:
    try:  # strict JSON: Python's parser also takes NaN and Infinity, which no client's JSON parser does
        call = json.loads(body, parse_constant=_not_json)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    # OpenAI's `arguments` is a JSON string. A model that wrote the arguments as a string already
    # (the JSON of an object, usually) meant that string; dumping it again would quote it twice.
    if not isinstance(arguments, str):
        arguments = _raw_arguments(body, arguments)
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


_ARGUMENTS_KEY = re.compile(r'"arguments"\s*:\s*')


def _raw_arguments(body: str, parsed: Any) -> str:
    """The arguments' JSON as the model wrote it in ``body``, as OpenAI returns it: dumping the parsed value again
    rewrites numbers (``1e999`` came back as ``Infinity``, not JSON; ``0.10`` as ``0.1``). Dumped only where no
    ``"arguments":`` in the text decodes to the parsed value."""
    decoder = json.JSONDecoder(parse_constant=_not_json)
    for m in _ARGUMENTS_KEY.finditer(body):
        try:
            value, end = decoder.raw_decode(body, m.end())
        except ValueError:
            continue
        if value == parsed:
            return body[m.end():end]
    return json.dumps(parsed, ensure_ascii=False)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A choice's ``(content, tool_calls)``.

    With at least one block that parses (JSON with a string ``name``), content is the text before
    the first block as it is (vLLM's hermes parser's; a stream has sent it so, whitespace and all), or None where
    that is empty; blocks that do not parse are dropped.
    With none, the whole text is the content and there are no tool calls.

    Example:
        >>> text = 'Let me look.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>'
        >>> content, calls = parse_tool_calls(text)
        >>> content, calls[0]["function"]
        ('Let me look.\\n', {'name': 'f', 'arguments': '{"x": 1}'})
    """
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return text, []
    calls = [call for m in _BLOCK.finditer(text, start)
             if (call := _tool_call((m.group(1) if m.group(1) is not None else m.group(2)).strip()))]
    if not calls:
        return text, []
    return text[:start] or None, calls


def content_prefix_len(text: str, start: int = 0) -> int:
    """How much of a stream's text may go out as content: all of it up to the first ``<tool_call>``,
    less a tail that could still become one (``"<tool"``), so the tag never leaks into a content
    delta. ``start``: where to search from, when the text before it is known to hold no tag.

    Example:
        >>> content_prefix_len("Sure.<tool"), content_prefix_len("Sure.<tool_call>{"), content_prefix_len("a < b")
        (5, 5, 5)
    """
    at = text.find(TOOL_CALL_START, start)
    if at >= 0:
        return at
    for k in range(min(len(TOOL_CALL_START) - 1, len(text) - start), 0, -1):
        if text.endswith(TOOL_CALL_START[:k]):
            return len(text) - k
    return len(text)


class ToolCallStream:
    """One streamed choice's text: the content that may go out now, and at the end its tool calls.

    Content flows until the text reaches a ``<tool_call>``; from there it is held back, and at the
    end either parses into tool calls or, when no block parses, goes out as content after all.

    Example:
        >>> s = ToolCallStream()
        >>> s.push("Hi <tool"), s.push('_call>{"name": "f", "arguments": {}}</tool_call>')
        ('Hi ', '')
        >>> rest, calls = s.finish(); rest, calls[0]["function"]["name"]
        ('', 'f')
    """

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # text[:sent] went out as content, and holds no tag

    def push(self, delta: str) -> str:
        """Add new text; return the part of the text that may go out as content now."""
        self.text += delta
        upto = max(self.sent, content_prefix_len(self.text, self.sent))
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """``(content still to send, tool_calls)`` once the choice's text is complete."""
        _, calls = parse_tool_calls(self.text)
        rest = "" if calls else self.text[self.sent:]
        self.sent = len(self.text)
        return rest, calls
