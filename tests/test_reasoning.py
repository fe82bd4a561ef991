"""Reasoning output (`jaxserve.server.reasoning`, vLLM's ``--reasoning-parser deepseek_r1``): a chat answer's text up to
``</think>`` is its ``reasoning_content``, the rest its content, whole and streamed (a tag split across stream pieces
never goes out), tool calls read from the content alone, ``include_reasoning: false`` leaves the reasoning out, and a
server without the parser leaves the text as it is."""

from __future__ import annotations

import json

import httpx
import pytest

from jaxserve import EngineConfig, load
from jaxserve.server import ServerConfig, create_app
from jaxserve.server.reasoning import ReasoningStream, split_reasoning
from tests.test_server import LiveServer, post

ANSWER = "two and two</think>The answer is 4"


@pytest.mark.parametrize("text, want", [
    ("a</think>b", ("a", "b")),
    ("<think>a</think>b", ("a", "b")),
    ("a</think>", ("a", None)),
    ("</think>b", (None, "b")),
    ("cut short", ("cut short", None)),
    ("", (None, None)),
    ("a</think>b</think>c", ("a", "b</think>c")),
    ("a <think> b</think>c", ("a <think> b", "c")),  # only a leading <think> opens the thinking
    ("4.</think>Wrap notes in <think> tags.", ("4.", "Wrap notes in <think> tags.")),
])
def test_split_whole_texts(text, want):
    assert split_reasoning(text) == want


@pytest.mark.parametrize("text", ["a</think>b", "<think>a</think>b", "x</th</think>y", "<thin", "a</thin", "<think>",
                                  "no tags at all", "r</think>c</think>d", "</think>", "a<think>b</think>c<think>d",
                                  "<think><think>a</think>"])
def test_a_stream_split_at_every_point_gives_the_whole_text_s_parts(text):
    want_r, want_c = split_reasoning(text)
    for cut in range(len(text) + 1):
        for step in (1, 2, 3):  # each side of the cut pushed in pieces of this many characters
            stream, reasoning, content = ReasoningStream(), "", ""
            pieces = [side[k:k + step] for side in (text[:cut], text[cut:]) for k in range(0, len(side), step)]
            for piece in pieces + [None]:
                r, c = stream.push(piece) if piece is not None else stream.finish()
                reasoning, content = reasoning + r, content + c
            assert (reasoning, content) == (want_r or "", want_c or ""), (text, cut, step)


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    config = EngineConfig(num_pages=64, max_running=4, max_tokens_per_step=64, batch_buckets=(4,),
                          prefill_buckets=(64,), decode_steps=4, max_model_len=256)
    app = create_app(load(tiny_checkpoint[0]), config, ServerConfig(model_name="r", reasoning_parser="deepseek_r1"))
    with LiveServer(app) as server:
        yield server


def chat(regex: str, **extra) -> dict:
    """A chat request whose answer is ``regex``'s from the first token (its own "after": null), which forces a tiny
    random model to write reasoning tags."""
    return {"model": "r", "messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 200, "temperature": 0,
            "structured_outputs": {"regex": regex, "after": None}, **extra}


def streamed(live, body: dict) -> list[dict]:
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_the_answer_splits_whole_and_streamed(live):
    r = post(live, "/v1/chat/completions", chat(ANSWER), key=None)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "two and two" and message["content"] == "The answer is 4"
    deltas = [c["choices"][0]["delta"] for c in streamed(live, chat(ANSWER)) if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "two and two"
    assert "".join(d.get("content") or "" for d in deltas) == "The answer is 4"
    assert not any("think>" in (d.get("content") or "") + d.get("reasoning_content", "") for d in deltas)
    hidden = post(live, "/v1/chat/completions", chat(ANSWER, include_reasoning=False), key=None).json()
    assert "reasoning_content" not in hidden["choices"][0]["message"]
    assert hidden["choices"][0]["message"]["content"] == "The answer is 4"


def test_tool_calls_are_read_from_the_content_alone(live):
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    body = chat("I should call get_time</think>" + call, tools=tools)
    r = post(live, "/v1/chat/completions", body, key=None).json()["choices"][0]
    assert r["message"]["reasoning_content"] == "I should call get_time"
    assert r["message"]["tool_calls"][0]["function"]["name"] == "get_time" and r["finish_reason"] == "tool_calls"
    chunks = [c["choices"][0] for c in streamed(live, body) if c["choices"]]
    assert "".join(c["delta"].get("reasoning_content", "") for c in chunks) == "I should call get_time"
    assert [c["delta"]["tool_calls"][0]["function"]["name"] for c in chunks if "tool_calls" in c["delta"]] == \
        ["get_time"]


def test_the_responses_api_gives_a_reasoning_item_before_the_message(live):
    body = {"model": "r", "input": "2 + 2?", "max_output_tokens": 200, "temperature": 0,
            "structured_outputs": {"regex": ANSWER, "after": None}}
    r = post(live, "/v1/responses", body, key=None)
    assert r.status_code == 200, r.text
    reasoning, message = r.json()["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"][0]["text"] == "two and two"
    assert message["type"] == "message" and message["content"][0]["text"] == "The answer is 4"
    with httpx.stream("POST", live.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "two and two"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "The answer is 4"
    assert events[-1]["response"]["output"] == [{**reasoning, "id": events[-1]["response"]["output"][0]["id"]},
                                                {**message, "id": events[-1]["response"]["output"][1]["id"]}]


def test_structured_outputs_start_where_the_reasoning_ends(live):
    """The server's parser makes a constraint start after ``</think>``: a tiny random model writes no ``</think>`` in
    8 tokens, so its answer is free reasoning cut at max_tokens, where from the first token it would be 3 digits."""
    body = {"model": "r", "messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 8, "temperature": 0,
            "guided_regex": "[0-9]{3}"}
    r = post(live, "/v1/chat/completions", body, key=None).json()["choices"][0]
    assert r["finish_reason"] == "length" and r["message"]["content"] is None and r["message"]["reasoning_content"]
    forced = post(live, "/v1/chat/completions", {**body, "guided_regex": None, "structured_outputs": {
        "regex": "[0-9]{3}", "after": None}}, key=None).json()["choices"][0]
    assert forced["finish_reason"] == "stop" and len(forced["message"]["reasoning_content"]) == 3


def test_a_constraint_after_a_literal_admits_any_text_before_it():
    from jaxserve.structured import StructuredOutputs, compile_regex

    spec = StructuredOutputs(json={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                             after="</think>")
    dfa = compile_regex(spec.to_regex())
    assert dfa.fullmatch('any\nthing é</think>{"n": 3}') and dfa.fullmatch('</think>{"n":3}')
    assert not dfa.fullmatch('{"n": 3}') and not dfa.fullmatch('x</think>{"n": "3"}')
    assert StructuredOutputs.from_value(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="structured_outputs.after must be a non-empty string"):
        StructuredOutputs(regex="a", after="")


def test_without_the_parser_the_text_is_content(tiny_checkpoint):
    config = EngineConfig(num_pages=64, max_running=4, max_tokens_per_step=64, batch_buckets=(4,),
                          prefill_buckets=(64,), decode_steps=4, max_model_len=256)
    with LiveServer(create_app(load(tiny_checkpoint[0]), config, ServerConfig(model_name="r"))) as live:
        message = post(live, "/v1/chat/completions", chat(ANSWER), key=None).json()["choices"][0]["message"]
        digits = post(live, "/v1/chat/completions", {**chat(ANSWER), "structured_outputs": None,
                                                     "guided_regex": "[0-9]{3}"}, key=None).json()["choices"][0]
    assert message["content"] == ANSWER and "reasoning_content" not in message
    assert len(digits["message"]["content"]) == 3  # no parser: the constraint holds from the first token
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        ServerConfig(reasoning_parser="qwen9")
