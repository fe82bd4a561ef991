"""Reasoning in generated text: the ``<think>...</think>`` of reasoning models on the Qwen2 architecture (QwQ-32B,
DeepSeek-R1-Distill-Qwen), as vLLM's ``--reasoning-parser deepseek_r1``.

Owns splitting a choice's text into ``reasoning_content`` and ``content``, and, for streams, routing each new piece of
text to one or the other as it comes. Those models' chat templates open the thinking in the prompt (the generation
prompt ends with ``<think>\\n``), so the output starts inside it: everything up to the first ``</think>`` is
reasoning, everything after it content; a ``<think>`` the model writes first itself is dropped; an output that never
closes its thinking (cut by max_tokens) is all reasoning. It never reads HTTP or the engine (``responses.py`` asks).
"""

from __future__ import annotations

from jaxserve.request import THINK_END, THINK_START  # noqa: F401  (the markers, the engine's too)

REASONING_PARSERS = ("deepseek_r1",)


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """``(reasoning_content, content)`` of a whole choice's text (vLLM's deepseek_r1 parser: None for an empty part).

    Example:
        >>> split_reasoning("2 + 2 is 4.</think>\\n\\nIt is 4.")
        ('2 + 2 is 4.', '\\n\\nIt is 4.')
        >>> split_reasoning("<think>still thinking")
        ('still thinking', None)
    """
    # Only a leading <think> is the model opening its thinking: one written later is text (as `ReasoningStream`).
    if text.startswith(THINK_START):
        text = text[len(THINK_START):]
    reasoning, end, content = text.partition(THINK_END)
    if not end:
        return text or None, None
    return reasoning or None, content or None


def _held(text: str, tag: str) -> int:
    """How many of ``text``'s last characters could begin ``tag`` (kept back until the next piece decides)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """One streamed choice's text routed as it comes: ``push`` returns ``(reasoning delta, content delta)``.

    A piece that might be the start of a ``</think>`` (or of the leading ``<think>``) is held back until the next
    one settles it, so neither tag ever goes out.

    Example:
        >>> s = ReasoningStream()
        >>> s.push("Let me think</th"), s.push("ink>The answer"), s.finish()
        (('Let me think', ''), ('', 'The answer'), ('', ''))
    """

    def __init__(self) -> None:
        self.pending = ""  # text not yet routed
        self.started = False  # past a possible leading <think>
        self.thinking = True

    def push(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        if not self.started:
            if THINK_START.startswith(self.pending) and len(self.pending) < len(THINK_START):
                return "", ""  # may still become the leading <think>
            if self.pending.startswith(THINK_START):
                self.pending = self.pending[len(THINK_START):]
            self.started = True
        if not self.thinking:
            out, self.pending = self.pending, ""
            return "", out
        reasoning, end, content = self.pending.partition(THINK_END)
        if end:
            self.thinking, self.pending = False, ""
            return reasoning, content
        keep = _held(self.pending, THINK_END)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, ""

    def finish(self) -> tuple[str, str]:
        """What is still held back once the choice's text is complete (a partial tag is text after all)."""
        out, self.pending, self.started = self.pending, "", True
        return (out, "") if self.thinking else ("", out)
