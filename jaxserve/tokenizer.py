"""Text <-> token ids, through the checkpoint's own tokenizer files.

Owns loading ``tokenizer.json``/``tokenizer_config.json`` (chat template included) with
``transformers`` and incremental detokenization for streaming. It never samples or schedules.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Any, Sequence

from tokenizers import decoders
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The fast tokenizer of a checkpoint folder (no network: ``local_files_only``)."""
    return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]],
                        add_generation_prompt: bool = True,
                        tools: Sequence[dict[str, Any]] | None = None, continue_final_message: bool = False,
                        template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None) -> list[int]:
    """Token ids of a chat, rendered with the checkpoint's chat template.

    ``tools``: OpenAI tool definitions (``{"type": "function", "function": {...}}``), which the
    template renders as it does (Qwen2.5's into the system message; a template that ignores them
    ignores them). ``continue_final_message``: the last message left open, so the model continues
    it (a prefilled assistant answer) instead of starting a new turn. ``template_kwargs``: extra
    variables for the template (vLLM's ``chat_template_kwargs``). ``chat_template``: a Jinja template used
    instead of the checkpoint's.

    Example:
        >>> apply_chat_template(tok, [{"role": "user", "content": "Weather in Paris?"}],
        ...                     tools=[{"type": "function", "function": {"name": "get_weather"}}])  # doctest: +SKIP
    """
    if not chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use a completion prompt instead "
                         "(or give one: chat_template=..., jaxserve serve --chat-template FILE)")
    text = tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                                         continue_final_message=continue_final_message, **(template_kwargs or {}))
    return tokenizer.encode(text, add_special_tokens=False)


Conversation = Sequence[dict[str, Any]]


def chat_prompts(tokenizer: PreTrainedTokenizerBase | None, conversations: Conversation | Sequence[Conversation],
                 **options: Any) -> list[list[int]]:
    """Token ids of one conversation (a list of OpenAI-style messages) or of a list of them, each rendered by
    `apply_chat_template` with ``options`` (its keyword arguments): what `Engine.chat` and `jaxserve.chat` run.
    A message is a dict with ``role`` and ``content`` (a string, or a list of ``{"type": "text", "text": ...}``
    parts, joined, as OpenAI sends them); OpenAI's ``developer`` role is the templates' ``system``. Other keys
    (``tool_calls``, ``tool_call_id``, ``name``) go to the template as they are. ValueError naming ``messages``
    where one is malformed or the template refuses the conversation.

    Example:
        >>> chat_prompts(tok, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        [[151644, 8948, 198, ...]]
    """
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer (its chat template), and this engine has none")
    if options.get("continue_final_message") and options.get("add_generation_prompt", True):
        raise ValueError("continue_final_message needs add_generation_prompt=False (a turn is either continued or "
                         "a new one started)")
    if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("messages must be a conversation (a non-empty list of message dicts) or a list of them")
    out = []
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"messages must be non-empty lists of message dicts; conversation {i} is "
                             f"{conversation!r}")
        messages = [_chat_message(m, i, j) for j, m in enumerate(conversation)]
        try:
            out.append(apply_chat_template(tokenizer, messages, **options))
        except ValueError:
            raise
        except Exception as exc:  # the template's own checks (role order, ...): the conversation's fault
            raise ValueError(f"messages of conversation {i} could not be rendered with the chat template: "
                             f"{exc}") from None
    return out


def _chat_message(message: Any, i: int, j: int) -> dict[str, Any]:
    where = f"conversation {i}, message {j}"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"messages must be dicts with a string role; {where} is {message!r}")
    content = message.get("content")
    if isinstance(content, (list, tuple)):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError(f"messages' content parts must be text parts ({{'type': 'text', 'text': ...}}); "
                             f"{where} has {content!r}")
        content = "".join(p["text"] for p in content)
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"messages' content must be a string or a list of text parts; {where} has {content!r}")
    # Chat templates know "system" only (Qwen2.5's drops a role it does not know, and with it the instructions).
    role = "system" if message["role"] == "developer" else message["role"]
    return {**message, "role": role, "content": content or ""}


def bad_words_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[tuple[int, ...]]:
    """The token sequences `SamplingParams.bad_words` ban, by vLLM's rule: each word (leading spaces
    stripped) as it tokenizes at the start of a text, and with a leading space where that gives another
    first token and as many tokens (the word inside a sentence, for byte-level BPE); duplicates once.

    Example:
        >>> bad_words_token_ids(tok, ["import"])  # doctest: +SKIP
        [(474,), (1159,)]
    """
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        for seq in (plain, spaced) if spaced[:1] != plain[:1] and len(spaced) == len(plain) else (plain,):
            if seq and seq not in out:
                out.append(seq)
    return out


@functools.lru_cache(maxsize=8)
def _byte_level_table(tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, int], frozenset[int]] | None:
    """GPT-2's printable-character -> byte map when the tokenizer decodes byte-level BPE (Qwen2's
    does), with the ids of added tokens (``<|im_end|>``...), which are plain text, not mapped bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    added = frozenset(getattr(tokenizer, "added_tokens_decoder", {}))
    return {c: b for b, c in bytes_to_unicode().items()}, added


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The bytes one token stands for, as OpenAI's logprobs ``bytes`` field reports them.

    A byte-level BPE token may hold part of a multi-byte character: ``decode([id])`` gives U+FFFD
    for it, whose UTF-8 is not the token's bytes. Concatenated over a completion, these bytes are
    its text's UTF-8. Tokenizers that are not byte-level fall back to the decoded text's UTF-8.

    Example:
        >>> b"".join(token_bytes(tok, t) for t in tok.encode("日本")).decode()  # doctest: +SKIP
        '日本'
    """
    table = _byte_level_table(tokenizer)
    if table is not None and token_id not in table[1]:
        data = _piece_bytes(tokenizer.convert_ids_to_tokens(int(token_id)), table[0])
        if data is not None:
            return data
    return tokenizer.decode([int(token_id)]).encode("utf-8")


class TokenSpellings:
    """One tokenizer's single tokens spelled out: as text (``decode([id])``) and as bytes (`token_bytes`), each
    worked out once a process (`token_spellings` hands out the tokenizer's one instance).

    A streamed response names every token it sends (logprobs' tokens and text offsets, `TokenChunks`'s cuts); a
    cache per response missed on most of them, at ~6 µs a miss each, on the event loop every request shares.
    At most one entry a vocabulary id in each table.

    Example:
        >>> spell, the = token_spellings(tok), tok.convert_tokens_to_ids("Ġthe")  # doctest: +SKIP
        >>> spell.text(the), spell.bytes(the)                                     # doctest: +SKIP
        (' the', b' the')
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        # Weak: the instance lives in a table keyed by the tokenizer, which a strong reference would keep forever.
        self._tokenizer = weakref.ref(tokenizer) if tokenizer is not None else (lambda: None)
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def text(self, token_id: int) -> str:
        """``decode([token_id])``."""
        try:
            return self._texts[token_id]
        except KeyError:
            text = self._texts[token_id] = self._tokenizer().decode([int(token_id)])
            return text

    def bytes(self, token_id: int) -> bytes:
        """`token_bytes` of ``token_id``."""
        try:
            return self._bytes[token_id]
        except KeyError:
            data = self._bytes[token_id] = token_bytes(self._tokenizer(), token_id)
            return data


_SPELLINGS: "weakref.WeakKeyDictionary[Any, TokenSpellings]" = weakref.WeakKeyDictionary()
_SPELLINGS_LOCK = threading.Lock()


def token_spellings(tokenizer: PreTrainedTokenizerBase) -> TokenSpellings:
    """The tokenizer's `TokenSpellings`, shared by every caller in the process.

    Example:
        >>> token_spellings(tok) is token_spellings(tok)  # doctest: +SKIP
        True
    """
    if tokenizer is None:  # a format built without one (token ids in, token ids out) spells no token
        return TokenSpellings(None)
    with _SPELLINGS_LOCK:  # requests start on several threads (the event loop, the tokenizer thread)
        spellings = _SPELLINGS.get(tokenizer)
        if spellings is None:
            spellings = _SPELLINGS[tokenizer] = TokenSpellings(tokenizer)
        return spellings


def _piece_bytes(piece: Any, chars: dict[str, int]) -> bytes | None:
    """A byte-level BPE piece's bytes through GPT-2's character map; None where it is not such a piece."""
    if isinstance(piece, str) and all(c in chars for c in piece):
        return bytes(chars[c] for c in piece)
    return None


def vocabulary_bytes(tokenizer: PreTrainedTokenizerBase, size: int) -> list[bytes | None]:
    """Every token's bytes (`token_bytes`) for ids ``0..size-1`` (the model's vocabulary, which may be padded
    past the tokenizer's): ``None`` for special tokens (``<|im_end|>``...: control tokens, never text a
    constraint allows) and ids the tokenizer does not have; an added token that is not special, its content.
    One batched lookup for byte-level BPE.

    Example:
        >>> vocabulary_bytes(tok, 151936)[tok.convert_tokens_to_ids("Ġthe")]  # doctest: +SKIP
        b' the'
    """
    known = len(tokenizer)
    table = _byte_level_table(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    out: list[bytes | None] = [None] * size
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(size, known))))
    for i, piece in enumerate(pieces):
        if i in added:
            # Added tokens that are text (Qwen2.5's <tool_call> and </tool_call>, which decoding keeps) stand for
            # their content; special ones (<|im_end|>, EOS) for no text at all.
            out[i] = None if added[i].special else added[i].content.encode()
            continue
        if piece is None:
            continue
        data = None if table is None else _piece_bytes(piece, table[0])
        out[i] = data if data is not None else token_bytes(tokenizer, i)
    return out


_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character.

    Byte-level BPE can put half of a multi-byte character in one token; such a tail decodes to
    U+FFFD and is held back until the next token completes it. ``prompt_ids``: the prompt, whose
    last tokens are decoded before the output's (vLLM's rule), so a character that the prompt
    starts and the output completes stays with the prompt instead of opening the text with U+FFFD.
    ``skip_special_tokens`` (vLLM's, default on): special tokens (``<|im_start|>``...) leave no text.

    Example:
        >>> detok = IncrementalDetokenizer(tokenizer, prompt_ids)  # doctest: +SKIP
        >>> "".join(detok.push(t) for t in ids) + detok.flush()    # doctest: +SKIP
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A fast tokenizer's Rust decoder directly: transformers' wrapper around it costs more
        # than the decode itself, twice per generated token (~26 ms of host time per 8-step call
        # at batch 256; bench/results/host_overhead.md). Its output is the same unless the
        # wrapper's clean-up of tokenization spaces is on.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._decode = functools.partial(backend.decode, skip_special_tokens=skip_special_tokens)
        # Decode only a short window (vLLM's prefix/read offsets) so streaming stays O(tokens). It
        # opens on the prompt's last tokens: more than a split character's (at most 3 of its 4
        # bytes), as many as vLLM's first window.
        self.ids: list[int] = [int(t) for t in list(prompt_ids)[max(0, len(prompt_ids) - _PROMPT_CONTEXT):]]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new, complete text since the last call."""
        self.ids.append(int(token_id))
        return self._emit()

    def push_many(self, token_ids: Sequence[int]) -> str:
        """Add several tokens at once: the same text as pushing them one by one, usually for
        two decodes instead of two per token."""
        start = len(self.ids)
        self.ids.extend(int(t) for t in token_ids)
        text = self._emit()
        if text or len(token_ids) <= 1:
            return text
        # The run was held back whole, e.g. for a character split at its very end; one token
        # at a time would have released the complete text before it, so redo it that way (a
        # request ending by a stop id is never flushed and would otherwise lose that text).
        del self.ids[start:]
        return "".join(self.push(t) for t in token_ids)

    def _emit(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (a truly invalid byte sequence comes out as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]
