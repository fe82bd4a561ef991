"""Streamed chunks of a few tokens each (vLLM's ``--stream-interval``; one token a chunk by default).

Owns splitting the async engine's chunks, which carry a whole device call's tokens (``decode_steps`` of them, or a
speculative call's), into chunks of at most ``interval`` tokens, each with the text its tokens made and their
logprobs: what vLLM streams, and what clients that count tokens or time tokens by chunks (vLLM's benchmark_serving's
inter-token latency) expect. It never detokenizes again: the engine's text is cut, never remade, so stop strings,
held-back text and UTF-8 stay the engine's.

How the text is cut: a byte-level BPE token stands for fixed bytes (`jaxserve.tokenizer.token_bytes`; a special
token skipped from the text for none), and a request's text is those bytes decoded, in order, less what the engine
still holds back (a character not yet complete, the tail that may open a stop string) and less what a stop cut off.
So a chunk's text is the bytes held back from earlier tokens, then a prefix of its own tokens' bytes; each token's
share ends where its bytes end, moved back to the character's start where that is inside one (a character split over
tokens goes with the one that completes it, as the detokenizer sends it). Where a chunk's text is not such a prefix
(a character the prompt began, a tokenizer that is not byte-level or cleans up spaces, an invalid byte shown as
U+FFFD) the choice's chunks go out whole: never a wrong split, at worst the old granularity. They are split again
from the first later chunk whose text is exactly its tokens' bytes: nothing held back before or after it, so the
count of held bytes is known again (zero).
"""

from __future__ import annotations

from typing import Any

from jaxserve.tokenizer import token_spellings


class TokenChunks:
    """Splits each choice's engine chunks into chunks of at most ``interval`` tokens.

    Example:
        >>> chunks = TokenChunks(tokenizer, interval=1)                                        # doctest: +SKIP
        >>> [c["text"] for c in chunks.split(0, {"text": " the fox", "token_ids": [279, 38835],
        ...                                      "finish_reason": None, "stop_reason": None})]  # doctest: +SKIP
        [' the', ' fox']
    """

    def __init__(self, tokenizer: Any, interval: int = 1, skip_special_tokens: bool = True) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = interval
        added = getattr(tokenizer, "added_tokens_decoder", {})
        skipped = {i for i, t in added.items() if t.special} if skip_special_tokens else set()
        spell = token_spellings(tokenizer).bytes
        self._bytes = (lambda t: b"" if t in skipped else spell(t)) if skipped else spell
        self._held: dict[int, int] = {}  # by choice: bytes of tokens already sent whose text is still held back
        self._whole: set[int] = set()  # choices whose text stopped lining up with their tokens, until it does again

    def split(self, i: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Choice ``i``'s engine chunk as chunks of at most ``interval`` tokens (itself where it has no more), in
        order; the finish reason, stop reason and result on the last."""
        tokens = chunk["token_ids"]
        text = chunk["text"].encode()
        parts = [self._bytes(int(t)) for t in tokens]
        made = b"".join(parts)
        if i in self._whole:
            if text != made:
                return [chunk]
            self._whole.discard(i)
            self._held[i] = 0
        held = self._held.get(i, 0)
        own = text[held:]
        if not made.startswith(own):
            self._whole.add(i)
            return [chunk]
        self._held[i] = held + len(made) - len(text)
        if len(tokens) <= self.interval:
            return [chunk]
        cuts, end, cut = [], held, 0
        for k, part in enumerate(parts):
            end += len(part)
            if (k + 1) % self.interval == 0 and k + 1 < len(tokens):
                prev, cut = cut, max(cut, min(end, len(text)))
                while cut > prev and cut < len(text) and text[cut] & 0xC0 == 0x80:  # a character goes with the
                    cut -= 1                                                         # token that completes it
                cuts.append((k + 1, cut))
        cuts.append((len(tokens), len(text)))
        out, start, at = [], 0, 0
        for stop, cut in cuts:
            piece = {**chunk, "text": text[at:cut].decode(), "token_ids": tokens[start:stop]}
            for name in ("logprobs", "top_logprobs"):
                if chunk.get(name) is not None:
                    piece[name] = chunk[name][start:stop]
            if stop < len(tokens):
                piece.update(finish_reason=None, stop_reason=None)
                piece.pop("result", None)
            out.append(piece)
            start, at = stop, cut
        return out
