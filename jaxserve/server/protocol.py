"""The OpenAI wire format coming in: request schemas and the error body.

Owns the pydantic models of ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``, ``/score``,
``/rerank``, ``/tokenize`` and ``/detokenize`` requests and SGLang's ``/generate`` (strict types, unknown fields
ignored as OpenAI does) and ``APIError``, answered as
``{"error": {"message", "type", "param", "code"}}``. It never reads the engine or formats a
successful response (``responses.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticUndefined

from jaxserve.sampling import SamplingParams


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def bad_params(exc: ValueError, also: tuple[str, ...] = ()) -> APIError:
    """SamplingParams/engine messages start with the field name (the engine's prompt checks with
    "prompt", its priority and cache salt checks with "priority" / "cache_salt"; a route's own checks with the fields
    in ``also``); report it as ``param``."""
    first = str(exc).split(" ", 1)[0]
    return APIError(400, str(exc), param=first if first in _SAMPLING_FIELDS
                    or first in ("prompt", "priority", "cache_salt", *also) else None)


# ----- request schemas -------------------------------------------------------------------------
class Schema(BaseModel):
    """Base of the request models."""

    # strict: "5" is not a number and 1.0 is not an int; unknown fields are ignored, as OpenAI does.
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI documents its optional fields as nullable ("n": null, "stream": null, chat's
        # "logprobs": null...) and clients send explicit nulls: null means the field's default.
        # Required fields (no default) stay null, and so fail as missing values.
        if value is None and info.field_name is not None:
            default = cls.model_fields[info.field_name].default
            if default is not PydanticUndefined:
                return default
        return value


class StreamOptions(Schema):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk also carries its choice's usage so far.
    continuous_usage_stats: bool = False


class SamplingFields(Schema):
    # vLLM's: a body without a model asks for the served base model (app.py fills it in).
    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions, same names.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    bad_words: list[str] | None = None
    # vLLM's: each prompt token's log-probability and rank, with the k best tokens at its position.
    prompt_logprobs: int | None = None
    # vLLM's: each generated token's top logprobs are these tokens' (at most 128), in place of the k best; needs
    # logprobs (a chat's logprobs true).
    logprob_token_ids: list[int] | None = None
    # vLLM's: lower runs first where the server runs with --scheduling-policy priority (elsewhere only 0).
    priority: int = 0
    # vLLM's: at most this many tokens inside a <think> section (one a reasoning model's chat template opens), then
    # </think> is forced (`SamplingParams.thinking_token_budget`).
    thinking_token_budget: int | None = None
    # vLLM's: the answer's id is "cmpl-<request_id>" ("chatcmpl-" for a chat) where given (an X-Request-Id header
    # outranks it, as in vLLM); requests in flight may share one.
    request_id: str | None = None
    # vLLM's beam search: the n best beams of width n become the n choices (`jaxserve.beam_search`).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # vLLM's: logprobs name tokens "token_id:<id>" (exact ids for clients that must not re-tokenize text); null
    # takes the server's --return-tokens-as-token-ids.
    return_tokens_as_token_ids: bool | None = None
    # vLLM's (RL trainers read them to skip re-tokenizing): each choice's generated token ids, and the prompt's
    # (completions: each choice; chat: once, beside the choices); streamed, the prompt's in the first chunk.
    return_token_ids: bool = False
    # vLLM's: prefixes are cached apart from other salts' (multi-tenant servers: no timing of another's prompts).
    cache_salt: str | None = None
    # Structured outputs (app.py `_structured_outputs`): OpenAI's response_format, vLLM's structured_outputs
    # object and its older guided_* fields; at most one of them.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None


class CompletionRequest(SamplingFields):
    # Either may be left out where the other is given (vLLM's): prompts given as embeddings come first.
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    prompt_embeds: str | list[str] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(Schema):
    type: str
    text: str | None = None


class FunctionCall(Schema):
    name: str
    arguments: str  # JSON, as OpenAI sends it; parsed before templating (_chat_prompt)


class ToolCall(Schema):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None where an assistant message holds only tool calls.
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None  # a "tool" message: the call it answers


class FunctionDefinition(Schema):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, handed to the chat template as sent


class Tool(Schema):
    type: Literal["function"]
    function: FunctionDefinition


class ChatTemplateFields(Schema):
    """How a chat's ``messages`` are rendered, the same in ``/v1/chat/completions`` and ``/tokenize``:
    ``tools`` go to the template; vLLM's extensions leave the last turn open for the model to continue
    (a prefilled answer: ``continue_final_message`` with ``add_generation_prompt`` false) and pass
    variables to the template (``chat_template_kwargs``)."""

    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class ChatRequest(SamplingFields, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # "auto" (the default with tools), "none", "required" or {"type": "function", "function": {"name": ...}}:
    # the last two constrain the output to tool-call blocks (app.py `_tool_call_regex`).
    tool_choice: str | dict[str, Any] | None = None
    # OpenAI's: false keeps a reply to one tool call (its first).
    parallel_tool_calls: bool = True
    # vLLM's: with the server's --reasoning-parser, whether the answer carries the reasoning (reasoning_content).
    include_reasoning: bool = True


class TokenizeRequest(ChatTemplateFields):
    """vLLM's ``/tokenize`` body: a completion ``prompt`` or chat ``messages`` (exactly one; app.py
    checks), tokenized as the generation routes tokenize them.

    ``add_special_tokens`` applies to a prompt (the completions route adds none; Qwen2's tokenizer
    has no BOS either way), the template fields to messages, as in the chat route;
    ``return_token_strs`` adds each token's vocabulary string.
    """

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(Schema):
    """vLLM's ``/detokenize`` body: token ids back to text."""

    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(Schema):
    """OpenAI's ``/v1/embeddings`` body, with vLLM's ``truncate_prompt_tokens``, ``normalize`` and ``priority``."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    normalize: bool = True
    priority: int = 0


class ClassificationRequest(Schema):
    """vLLM's ``/classify`` body (a sequence classifier's): each ``input`` item's labels' probabilities (``activation``
    false: the raw logits)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    activation: bool = True
    priority: int = 0


# vLLM's spellings of /score's two sides, each first field with the second fields it goes with: its older text_1 /
# text_2, and its current data_1 / data_2, queries / documents and queries / items (the same meaning).
SCORE_FIELDS = {"text_1": ("text_2",), "data_1": ("data_2",), "queries": ("documents", "items")}


class ScoreRequest(Schema):
    """vLLM's ``/score`` body: ``text_1`` against ``text_2`` (one against one or each, or two lists item by item),
    or the same under vLLM's other names (`SCORE_FIELDS`); `sides` says which were given.

    Example:
        >>> ScoreRequest(data_1="q", data_2=["a", "b"]).sides()
        (('data_1', 'q'), ('data_2', ['a', 'b']))
    """

    model: str | None = None
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0

    def sides(self) -> tuple[tuple[str, Any], tuple[str, Any]]:
        """The two sides as ``(field, value)``: exactly one spelling of each, and of one pair (APIError 400 naming
        the fields otherwise)."""
        firsts = [name for name in SCORE_FIELDS if getattr(self, name) is not None]
        seconds = [name for pair in SCORE_FIELDS.values() for name in pair if getattr(self, name) is not None]
        if not firsts:
            raise APIError(400, "text_1: Field required (or vLLM's data_1, queries)", param="text_1")
        if len(firsts) > 1:
            raise APIError(400, f"give one of {firsts}, not several (they are one field)", param=firsts[1])
        first, allowed = firsts[0], SCORE_FIELDS[firsts[0]]
        if not seconds:
            raise APIError(400, f"{allowed[0]}: Field required (with {first})", param=allowed[0])
        if len(seconds) > 1 or seconds[0] not in allowed:
            raise APIError(400, f"{first} goes with {' or '.join(allowed)} alone, got {seconds}",
                           param=next((n for n in seconds if n not in allowed), seconds[-1]))
        return (first, getattr(self, first)), (seconds[0], getattr(self, seconds[0]))


class RerankRequest(Schema):
    """vLLM's (Jina's and Cohere's) ``/rerank`` body: ``documents`` ranked by relevance to ``query``, the best
    ``top_n`` (0: all)."""

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int = 0
    truncate_prompt_tokens: int | None = None
    priority: int = 0


class LoadLoraRequest(Schema):
    """vLLM's ``/v1/load_lora_adapter`` body: an adapter's name and PEFT folder."""

    lora_name: str
    lora_path: str


class UnloadLoraRequest(Schema):
    """vLLM's ``/v1/unload_lora_adapter`` body."""

    lora_name: str


class GenerateRequest(Schema):
    """SGLang's ``/generate`` body (its ``GenerateReqInput``): ``text`` or ``input_ids`` (one prompt, or a batch),
    ``sampling_params`` in SGLang's names (one dict, or one per prompt; app.py translates them to a completion
    request's), and per prompt or for all, ``return_logprob``, ``top_logprobs_num`` and ``logprob_start_len`` (-1:
    from the prompt's last token).

    Example:
        >>> GenerateRequest(text=["a", "b"], sampling_params={"max_new_tokens": 8}).top_logprobs_num
        0
    """

    # Fields SGLang takes that this server does not serve are kept, so that one set is refused by name instead of
    # ignored (app.py `_SGLANG_UNSERVED`).
    model_config = ConfigDict(strict=True, extra="allow")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    # An adapter the server serves, by its name or its folder; one for the whole request.
    lora_path: str | list[str | None] | None = None


class AbortRequest(Schema):
    """SGLang's ``/abort_request`` body (its ``AbortReq``): a ``rid`` prefix of the ``/generate`` requests in flight to
    end (one request's rid, or a batch's, which ends its ``rid_0``, ``rid_1``, ...), or ``abort_all`` for every
    request the server runs.

    Example:
        >>> AbortRequest(rid="r1").abort_all
        False
    """

    rid: str = ""
    abort_all: bool = False
