"""Structured outputs (guided decoding): a request's text constrained to a regex, a JSON schema, any JSON
object or one of a list of strings, as vLLM's ``structured_outputs`` / OpenAI's ``response_format``.

Owns the constraint's compilation (regex -> minimal byte-level DFA, live states only) and, per DFA state,
which vocabulary tokens keep the text on a path to a full match (a packed bitmask the sampler applies) and
the state each token leads to (`TokenGuide.tables`). It never samples or schedules: the engine hands a
decode call its rows' tables and states, which the call follows on the device for several steps
(`jaxserve.engine.Engine._guide_tables`), or a prefill the masks of its rows' `GuideState`, and the host
follows the tokens that come back.

Why bytes: Qwen's tokenizer is byte-level BPE, so a token may end inside a multi-byte character; a DFA over
UTF-8 bytes takes every token as it is. Why a DFA and not a grammar: every supported constraint is regular
(JSON nesting is bounded, `jaxserve.json_schema`), and a DFA state is a plain int, so a state's mask and next
states are computed once for the whole vocabulary with numpy (~3.5 ms a state for a 151k-token vocabulary on
the CPU machine) and a decode step follows every row with two gathers. Why on the device: a decode call's
dispatch costs the host 1.3-2.1 ms on the H200, so one step a call (masks from the host) ran constrained rows
at 2.7 ms a token against 0.53 unconstrained; followed on the device, 0.565 (bench/results/structured.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_UNICODE = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
# A constraint whose DFA outgrows these is refused: its subset construction alone would take seconds.
MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 50_000


# ----- the constraint a request carries ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must match: exactly one of ``json`` (a JSON schema, dict or JSON text),
    ``regex``, ``choice`` (a list of strings), ``grammar`` (a GBNF grammar, llama.cpp's and xgrammar's
    format; recursion unrolled to at most `jaxserve.grammar.MAX_DEPTH` nestings) or ``json_object=True`` (any JSON
    object). vLLM's ``StructuredOutputsParams`` fields; ``whitespace_pattern`` (a regex) replaces the
    whitespace JSON allows between tokens (default: at most one space). ``after`` (jaxserve's): any text up to and
    including this literal comes first, then the constraint (a reasoning model's ``</think>``: it thinks freely, then
    answers in the form asked, as vLLM's reasoning parser starts structured outputs where the reasoning ends). Bad
    values raise ValueError naming the field.

    Example:
        >>> StructuredOutputs(choice=["yes", "no"]).to_regex()
        '(?:yes|no)'
        >>> StructuredOutputs.from_value({"regex": "[0-9]+"}).regex
        '[0-9]+'
    """

    json: Any = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_pattern: str | None = None
    after: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        given += ["json_object"] * self.json_object
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                             f"got {given or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {schema!r}")
            # Canonical text: the spec stays hashable (guides are cached by it) and round-trips through to_dict.
            object.__setattr__(self, "json", json.dumps(schema, sort_keys=False, separators=(",", ":")))
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {getattr(self, name)!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError(f"structured_outputs.whitespace_pattern must be a string, got {self.whitespace_pattern!r}")
        if self.whitespace_pattern:
            try:  # spliced into the schema's regex between every token: an unbalanced one would unbalance all of it
                re.compile(self.whitespace_pattern)
            except re.error as e:
                raise ValueError(f"structured_outputs.whitespace_pattern {self.whitespace_pattern!r} is not a regex: "
                                 f"{e}") from None
        if self.after is not None and (not isinstance(self.after, str) or not self.after):
            raise ValueError(f"structured_outputs.after must be a non-empty string, got {self.after!r}")

    @classmethod
    def from_value(cls, value: StructuredOutputs | dict[str, Any]) -> StructuredOutputs:
        """From itself or a plain dict of its fields (unknown keys are an error)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be a StructuredOutputs or a dict, got {value!r}")
        value = dict(value)
        # vLLM's switches: disable_any_whitespace is JSON without whitespace; the others already hold here (one
        # backend, so nothing to fall back to; object keys never go beyond a schema's properties).
        for flag in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if flag in value and not isinstance(value[flag], bool):
                raise ValueError(f"{flag} must be true or false, got {value[flag]!r}")
        value.pop("disable_fallback", None)
        value.pop("disable_additional_properties", None)
        if value.pop("disable_any_whitespace", False) and value.get("whitespace_pattern") is None:
            value["whitespace_pattern"] = ""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown structured_outputs field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready fields that are set (``json`` as the schema object)."""
        out: dict[str, Any] = {}
        if self.json is not None:
            out["json"] = json.loads(self.json)
        if self.regex is not None:
            out["regex"] = self.regex
        if self.choice is not None:
            out["choice"] = list(self.choice)
        if self.grammar is not None:
            out["grammar"] = self.grammar
        if self.json_object:
            out["json_object"] = True
        if self.whitespace_pattern is not None:
            out["whitespace_pattern"] = self.whitespace_pattern
        if self.after is not None:
            out["after"] = self.after
        return out

    def to_regex(self) -> str:
        """The regular expression the output must match in full."""
        if self.after is None:
            return self._constraint_regex()
        # Free text, then `after`: a text that holds `after` more than once may take any of them as the start
        # (a DFA does not mind), where a reasoning parser takes the first.
        return r"[\s\S]*" + escape(self.after) + "(?:" + self._constraint_regex() + ")"

    def _constraint_regex(self) -> str:
        from jaxserve import grammar, json_schema

        if self.regex is not None:
            return self.regex
        if self.grammar is not None:
            return grammar.grammar_to_regex(self.grammar)
        if self.choice is not None:
            return "(?:" + "|".join(escape(c) for c in self.choice) + ")"
        if self.json_object:
            return json_schema.json_object_regex(whitespace_pattern=self.whitespace_pattern)
        return json_schema.schema_to_regex(json.loads(self.json), whitespace_pattern=self.whitespace_pattern)

    def field(self) -> str:
        """The field an error about this constraint names."""
        kind = next(n for n in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, n) not in (None, False))
        return f"structured_outputs.{kind}"


# vLLM's GuidedDecodingParams field with no counterpart here, which changes no output this engine gives: the backend
# it picks (jaxserve has one). Its disable_* switches are `StructuredOutputs.from_value`'s.
_GUIDED_IGNORED = ("backend",)


def GuidedDecodingParams(**fields: Any) -> StructuredOutputs:  # noqa: N802 (vLLM's class name, for its scripts)
    """vLLM's older spelling (until 0.10: ``SamplingParams(guided_decoding=GuidedDecodingParams(json=...))``) of
    `StructuredOutputs`: the same fields, ``backend`` taken and ignored (one backend here), the ``disable_*`` switches
    as `StructuredOutputs.from_value` reads them; any other field this engine lacks is a ValueError naming it.

    Example:
        >>> GuidedDecodingParams(choice=["yes", "no"], backend="xgrammar").choice
        ('yes', 'no')
    """
    return StructuredOutputs.from_value({k: v for k, v in fields.items() if k not in _GUIDED_IGNORED})


def StructuredOutputsParams(**fields: Any) -> StructuredOutputs:  # noqa: N802 (vLLM's class name, for its scripts)
    """vLLM's name (``from vllm.sampling_params import StructuredOutputsParams``) of `StructuredOutputs`, with its
    ``disable_*`` switches and ``backend`` taken as `GuidedDecodingParams` takes them.

    Example:
        >>> StructuredOutputsParams(regex="[0-9]+", disable_any_whitespace=True).regex
        '[0-9]+'
    """
    return GuidedDecodingParams(**fields)


def escape(text: str) -> str:
    """``text`` as a regex matching it literally (in the syntax `compile_regex` reads).

    Example:
        >>> print(escape('{"a": 1}'))
        \\{\\"a\\": 1\\}
    """
    return "".join("\\" + c if c in _SPECIAL else c for c in text)


_SPECIAL = set("\\.^$*+?()[]{}|/-\"")


# ----- regex -> code-point sets, sequences, alternations, repeats ---------------------------------------------
def _normalize(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _complement(ranges: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out, at = [], 0
    for lo, hi in _normalize(list(ranges)):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= MAX_UNICODE:
        out.append((at, MAX_UNICODE))
    return _normalize(out)


_DIGIT = ((0x30, 0x39),)
_WORD = _normalize([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])  # ASCII \w, as JSON schemas mean it
_SPACE = _normalize([(0x09, 0x0D), (0x20, 0x20)])
_CLASS_ESCAPES = {"d": _DIGIT, "w": _WORD, "s": _SPACE,
                  "D": _complement(_DIGIT), "W": _complement(_WORD), "S": _complement(_SPACE)}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


class _Parser:
    """Recursive descent over Python `re` syntax's regular subset; nodes are tuples:
    ("set", ranges) one character, ("cat", [nodes]), ("alt", [nodes]), ("rep", node, lo, hi or None),
    ("look", node) a positive lookahead."""

    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"regex {self.p!r}: {what} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> tuple:
        if self.peek() == "^":  # whole-output match either way
            self.i += 1
        node = self.alt()
        if self.i != len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alt(self) -> tuple:
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self) -> tuple:
        items = []
        while self.peek() not in (None, "|", ")"):
            if self.p[self.i] == "$" and self.i == len(self.p) - 1:
                self.i += 1
                break
            items.append(self.quantified())
        return items[0] if len(items) == 1 else ("cat", items)

    def quantified(self) -> tuple:
        node = self.atom()
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                node = ("rep", node, 1 if c == "+" else 0, 1 if c == "?" else None)
            elif c == "{" and (bounds := self.bounds()) is not None:
                node = ("rep", node, *bounds)
            else:
                return node
            if self.peek() == "?":  # lazy: the same language
                self.i += 1

    def bounds(self) -> tuple[int, int | None] | None:
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end > 0 else ""
        lo, comma, hi = body.partition(",")
        if not (lo.isdigit() or (comma and not lo)) or (hi and not hi.isdigit()):
            return None  # Python reads such a brace as a literal ("{}", "{x}")
        self.i = end + 1
        lo_n = int(lo) if lo else 0  # "{,n}" and "{,}" start at none, as in Python's re
        hi_n = None if comma and not hi else int(hi) if hi else lo_n
        if hi_n is not None and hi_n < lo_n:
            raise self.error(f"repeat {{{body}}} has max < min")
        return lo_n, hi_n

    def atom(self) -> tuple:
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            look = self.p.startswith("?=", self.i)
            if self.p.startswith("?:", self.i) or look:
                self.i += 2
            elif self.peek() == "?":
                raise self.error("only (...), (?:...) and (?=...) groups are supported")
            node = self.alt()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return ("look", node) if look else node
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", _complement([(0x0A, 0x0A)]))
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?":
            raise self.error(f"nothing to repeat before {c!r}")
        if c in "^$":
            raise self.error(f"anchor {c!r} inside a pattern (only at its ends)")
        return ("set", ((ord(c), ord(c)),))

    def escape(self, in_class: bool) -> tuple[tuple[int, int], ...]:
        if self.i >= len(self.p):
            raise self.error("pattern ends with '\\'")
        c = self.p[self.i]
        self.i += 1
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c]
        if c in _CHAR_ESCAPES:
            return ((ord(_CHAR_ESCAPES[c]),) * 2,)
        if c in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{c} needs {n} hex digits")
            self.i += n
            return ((int(digits, 16),) * 2,)
        if c == "b" and in_class:
            return ((8, 8),)
        if c.isalnum():
            raise self.error(f"unsupported escape \\{c}")
        return ((ord(c), ord(c)),)

    def char_class(self) -> tuple[tuple[int, int], ...]:
        negate = self.peek() == "^"
        self.i += negate
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("missing ']'")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\" and self.p[self.i + 1:self.i + 2] in _CLASS_ESCAPES:
                ranges.extend(_CLASS_ESCAPES[self.p[self.i + 1]])
                self.i += 2
                continue
            lo = self.class_char()
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("", "]"):
                self.i += 1
                hi = self.class_char()
                if hi < lo:
                    raise self.error("bad character range")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return _complement(ranges) if negate else _normalize(ranges)

    def class_char(self) -> int:
        c = self.p[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        if self.p[self.i:self.i + 1] in _CLASS_ESCAPES:
            raise self.error("a class escape cannot bound a range")
        return self.escape(in_class=True)[0][0]


# ----- code points -> UTF-8 byte ranges -> NFA -> DFA ---------------------------------------------------------
def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The code points ``lo..hi`` (surrogates left out) as byte-range sequences: a character's UTF-8 is
    matched by exactly one sequence, byte by byte (the split regex-automata's `Utf8Sequences` makes).

    Example:
        >>> utf8_sequences(0x61, 0x7A), utf8_sequences(0xE9, 0xE9)
        ([[(97, 122)]], [[(195, 195), (169, 169)]])
    """
    out, stack = [], [(lo, hi)]
    while stack:
        lo, hi = stack.pop()
        if lo <= _SURROGATES[1] and hi >= _SURROGATES[0]:
            stack += [(lo, _SURROGATES[0] - 1)] * (lo < _SURROGATES[0]) + [(_SURROGATES[1] + 1, hi)] * (hi > _SURROGATES[1])
            continue
        boundary = next((b for b in (0x7F, 0x7FF, 0xFFFF) if lo <= b < hi), None)
        if boundary is not None:  # one encoded length per piece
            stack += [(lo, boundary), (boundary + 1, hi)]
            continue
        n = len(chr(lo).encode())
        for i in range(1, n):
            m = (1 << (6 * i)) - 1  # the low continuation bytes: a range must span them whole to be byte-wise
            if lo & ~m != hi & ~m:
                if lo & m:
                    stack += [(lo, lo | m), ((lo | m) + 1, hi)]
                    break
                if hi & m != m:
                    stack += [(lo, (hi & ~m) - 1), (hi & ~m, hi)]
                    break
        else:
            out.append(list(zip(chr(lo).encode(), chr(hi).encode())))
    return sorted(out)


def _byte_mask(lo: int, hi: int) -> int:
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


class _NFA:
    """Thompson NFA over bytes: per state its epsilon targets and (256-bit byte mask, target) edges, and its open
    lookaheads: (k, x, target), an epsilon move that leaves owed a lookahead whose DFA, ``lookaheads[k]``, has read
    the text so far up to state ``x`` and must still reach an accepting state on the text that follows."""

    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []
        self.looks: list[list[tuple[int, int, int]]] = []
        self.lookaheads: list[DFA] = []

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ValueError(f"too complex (over {MAX_NFA_STATES} NFA states)")
        self.eps.append([])
        self.edges.append([])
        self.looks.append([])
        return len(self.eps) - 1

    def build(self, node: tuple, at_end: bool = False) -> tuple[int, int]:
        """``node``'s fragment, (start, end) states; ``at_end``: nothing can follow its match (the text ends)."""
        kind = node[0]
        if kind == "look":  # alone (not in a sequence): it reads only what follows its group
            return self.lookahead(node[1], ("cat", []), at_end)
        if kind == "set":
            s, e = self.new(), self.new()
            ascii_mask = 0
            for lo, hi in node[1]:
                for seq in utf8_sequences(lo, hi):
                    if len(seq) == 1:
                        ascii_mask |= _byte_mask(*seq[0])
                        continue
                    prev = s
                    for k, (blo, bhi) in enumerate(seq):
                        nxt = e if k == len(seq) - 1 else self.new()
                        self.edges[prev].append((_byte_mask(blo, bhi), nxt))
                        prev = nxt
            if ascii_mask:
                self.edges[s].append((ascii_mask, e))
            return s, e
        if kind == "cat":
            s = cur = self.new()
            for i, item in enumerate(node[1]):
                if item[0] == "look":  # it reads the rest of the sequence: one fragment with it
                    a, b = self.lookahead(item[1], ("cat", node[1][i + 1:]), at_end)
                    self.eps[cur].append(a)
                    return s, b
                a, b = self.build(item, at_end and i == len(node[1]) - 1)
                self.eps[cur].append(a)
                cur = b
            return s, cur
        if kind == "alt":
            s, e = self.new(), self.new()
            for item in node[1]:
                a, b = self.build(item, at_end)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        _, item, lo, hi = node
        s = cur = self.new()
        for _ in range(lo):
            a, b = self.build(item)
            self.eps[cur].append(a)
            cur = b
        if hi is None:
            loop = self.new()
            a, b = self.build(item)
            self.eps[cur] += [loop]
            self.eps[loop] += [a]
            self.eps[b] += [loop]
            return s, loop
        e = self.new()
        for _ in range(hi - lo):  # each optional copy may skip straight to the end: closures stay small
            a, b = self.build(item)
            self.eps[cur] += [a, e]
            cur = b
        self.eps[cur].append(e)
        return s, e

    def lookahead(self, body: tuple, rest: tuple, at_end: bool) -> tuple[int, int]:
        """``(?=body)`` and then ``rest``, as one fragment: the product of the minimal DFAs of ``body`` (as
        ``body[\\s\\S]*``: once it accepts, the lookahead holds) and of ``rest``, each reading the same text. Minimal
        first: a string's 28-state pattern times its maxLength 300 (`jaxserve.json_schema`) is 14k pairs, where
        the lookahead owed through the subset construction met the pattern's unminimized subsets and passed
        `MAX_DFA_STATES`. Where ``rest`` ends with the lookahead's DFA still open (it looks past its group), the end
        leaves the lookahead owed from there (`looks`); ``at_end``, it is no match there."""
        look = _compile(("cat", [body, ("rep", ("set", ((0, MAX_UNICODE),)), 0, None)]), None)
        then = _compile(rest, None, continued=not at_end)
        s, e = self.new(), self.new()
        if not look.sink or not then.sink:  # either matches nothing: nor does the fragment
            return s, e
        done = -1  # the lookahead's state once it holds
        start = (0, done if look.accepting[0] else 0)
        ids, todo, k = {start: s}, [start], None
        while todo:
            a, b = pair = todo.pop()
            q = ids[pair]
            if then.accepting[a]:
                if b == done:
                    self.eps[q].append(e)
                elif not at_end:
                    if k is None:
                        k = len(self.lookaheads)
                        self.lookaheads.append(look)
                    self.looks[q].append((k, b, e))
            nxt_a = then.table[a].astype(np.int64)
            nxt_b = np.full(256, done, np.int64) if b == done else look.table[b].astype(np.int64)
            alive = (nxt_a != then.sink) & (nxt_b != look.sink)
            nxt_b[look.accepting[np.maximum(nxt_b, 0)] & (nxt_b >= 0)] = done
            keys = nxt_a * (look.sink + 2) + nxt_b + 1
            for key in np.unique(keys[alive]).tolist():
                target = (key // (look.sink + 2), key % (look.sink + 2) - 1)
                if target not in ids:
                    if len(ids) >= MAX_DFA_STATES:
                        raise ValueError(f"too complex (over {MAX_DFA_STATES} DFA states in a lookahead's product)")
                    ids[target] = self.new()
                    todo.append(target)
                mask = int.from_bytes(np.packbits(alive & (keys == key), bitorder="little").tobytes(), "little")
                self.edges[q].append((mask, ids[target]))
        return s, e


@dataclasses.dataclass(frozen=True)
class DFA:
    """A byte DFA of live states only: ``table[s, byte]`` is the next state, ``sink`` (== the number of
    live states, whose row maps to itself) where no full match stays reachable; state 0 starts."""

    table: np.ndarray  # int32 [states + 1, 256]
    accepting: np.ndarray  # bool [states + 1]

    @property
    def sink(self) -> int:
        return self.table.shape[0] - 1

    def run(self, data: bytes, state: int = 0) -> int:
        """The state after ``data`` from ``state`` (the sink if it left every match)."""
        table, sink = self.table, self.sink
        for byte in data:
            state = table[state, byte]
            if state == sink:
                break
        return int(state)

    def fullmatch(self, text: str | bytes) -> bool:
        """Whether the whole of ``text`` matches (its UTF-8, for a str)."""
        return bool(self.accepting[self.run(text.encode() if isinstance(text, str) else text)])


def compile_regex(pattern: str) -> DFA:
    """A `DFA` of ``pattern`` (Python `re`'s regular subset: classes, ``.``, escapes ``\\d\\w\\s`` and their
    negations, ``\\uXXXX``, groups, ``|``, ``* + ? {m,n}``, positive lookahead ``(?=...)``; anchors only at the
    ends), matching the UTF-8 of the strings it fully matches. ``\\w`` and ``\\d`` are ASCII. ValueError on other
    syntax or a pattern that matches nothing.

    A lookahead means what it means to `re`: the text from there to the end (past the group it sits in) starts with
    a match of it. So ``(?=X")(?:Y)"`` is the texts of ``Y`` that are also texts of ``X``, where ``"`` ends both and
    neither holds one: an intersection, which `jaxserve.json_schema` writes for a string's ``pattern`` and lengths.

    Example:
        >>> dfa = compile_regex(r"(?:yes|no)!?")
        >>> dfa.fullmatch("no!"), dfa.fullmatch("nope")
        (True, False)
        >>> both = compile_regex(r'(?=[a-z]{2,3}")[a-c]+"')
        >>> [t for t in ('a"', 'ab"', 'abc"', 'abcd"', 'ad"') if both.fullmatch(t)]
        ['ab"', 'abc"']
    """
    try:
        return _compile(_Parser(pattern).parse(), f"regex {pattern!r}")
    except RecursionError:  # the parser and the NFA's builder recurse once a group
        raise ValueError("the regex nests its groups too deeply") from None


_NOTHING_OWED: frozenset[tuple[int, int]] = frozenset()


def _compile(node: tuple, what: str | None, continued: bool = False) -> DFA:
    """The minimal live-state `DFA` of a parsed regex; where it matches nothing, a ValueError naming ``what`` or, with
    ``what`` None, a DFA of the sink alone (a lookahead no text satisfies). ``continued``: text follows
    the match (a lookahead's group, `_NFA.lookahead`), so a lookahead in it still owed at its end is refused: a DFA
    has no way to hand it on.

    The subset construction's items are NFA states (ints) or, past an open lookahead (`_NFA.looks`), ``(state,
    owed)``: ``owed`` the lookaheads still to be matched, each ``(k, state of lookaheads[k])``. An owed lookahead is
    dropped once its DFA accepts (the text has started with one of its matches) and kills the item where its DFA
    reaches its sink; an item accepts only with nothing owed. Without open lookaheads every item is an int."""
    nfa = _NFA()
    start, accept = nfa.build(node, at_end=not continued)
    # Byte classes: bytes no edge tells apart (nor any lookahead's DFA) move every NFA state alike, so the subset
    # construction runs once per class instead of once per byte.
    masks = sorted({m for edges in nfa.edges for m, _ in edges})
    signature = [0] * 256
    for j, m in enumerate(masks):
        for b in range(256):
            if m >> b & 1:
                signature[b] |= 1 << j
    look_columns = [np.unique(d.table.T, axis=0, return_inverse=True)[1].reshape(-1).tolist() for d in nfa.lookaheads]
    class_ids: dict[tuple[int, ...], int] = {}
    class_of = np.array([class_ids.setdefault(key, len(class_ids)) for key in zip(signature, *look_columns)], np.int32)
    reps = [int(np.argmax(class_of == c)) for c in range(len(class_ids))]
    classes_of_mask = {m: [c for c, r in enumerate(reps) if m >> r & 1] for m in masks}

    closures: dict[int, frozenset] = {}
    plain = not nfa.lookaheads  # every item an int: no type checks on the way (~5% of a long string's compile)

    def reach(q: int) -> frozenset:
        """What ``q`` reaches by epsilon moves, with the lookaheads passed on the way as owed."""
        if q in closures:
            return closures[q]
        if plain:  # ints alone: pairs here cost ~10% of json_object's compile
            seen_q, todo_q = {q}, [q]
            while todo_q:
                for t in nfa.eps[todo_q.pop()]:
                    if t not in seen_q:
                        seen_q.add(t)
                        todo_q.append(t)
            closures[q] = frozenset(seen_q)
            return closures[q]
        seen, todo = {(q, _NOTHING_OWED)}, [(q, _NOTHING_OWED)]
        while todo:
            s, owed = todo.pop()
            for move in [(t, owed) for t in nfa.eps[s]] + [(t, owed | {(k, x)}) for k, x, t in nfa.looks[s]]:
                if move not in seen:
                    seen.add(move)
                    todo.append(move)
        closures[q] = frozenset(s if not owed else (s, owed) for s, owed in seen)
        return closures[q]

    def closure(items) -> frozenset:
        out: set = set()
        for item in items:
            if plain or type(item) is int:
                out |= reach(item)
            else:
                q, owed = item
                out.update((r, owed) if type(r) is int else (r[0], owed | r[1]) for r in reach(q))
        return frozenset(out)

    advanced: dict[tuple[frozenset, int], frozenset | None] = {}

    def advance(owed: frozenset, c: int) -> frozenset | None:
        """``owed`` after a byte of class ``c``; None where a lookahead can no longer match."""
        key = (owed, c)
        if key not in advanced:
            left: set[tuple[int, int]] | None = set()
            for k, x in owed:
                look = nfa.lookaheads[k]
                y = int(look.table[x, reps[c]])
                if y == look.sink:
                    left = None
                    break
                if not look.accepting[y]:
                    left.add((k, y))
            advanced[key] = None if left is None else frozenset(left)
        return advanced[key]

    first = closure([start])
    ids, sets, rows = {first: 0}, [first], []
    while len(rows) < len(sets):
        targets: list[set] = [set() for _ in reps]
        for item in sets[len(rows)]:
            if plain or type(item) is int:
                for m, t in nfa.edges[item]:
                    for c in classes_of_mask[m]:
                        targets[c].add(t)
                continue
            q, owed = item
            for m, t in nfa.edges[q]:
                for c in classes_of_mask[m]:
                    left = advance(owed, c)
                    if left is not None:
                        targets[c].add((t, left) if left else t)
        row = []
        for tset in targets:
            if not tset:
                row.append(-1)
                continue
            key = closure(tset)
            if key not in ids:
                if len(sets) >= MAX_DFA_STATES:
                    raise ValueError(f"too complex (over {MAX_DFA_STATES} DFA states)")
                ids[key] = len(sets)
                sets.append(key)
            row.append(ids[key])
        rows.append(row)
    if continued and not plain and any(type(i) is tuple and i[0] == accept for items in sets for i in items):
        raise ValueError("a lookahead that looks past the end of another lookahead's group is not supported")
    by_class = np.array(rows, np.int32)
    accepting = np.array([accept in s for s in sets])  # the int: the end with nothing owed
    # Live states: those from which an accepting state is reachable; the rest collapse into the sink, so
    # a mask never lets a token into a state with no way out.
    live = accepting.copy()
    reverse: list[list[int]] = [[] for _ in sets]
    for s, row in enumerate(rows):
        for t in set(row) - {-1}:
            reverse[t].append(s)
    todo = list(np.flatnonzero(live))
    while todo:
        for s in reverse[todo.pop()]:
            if not live[s]:
                live[s] = True
                todo.append(s)
    if not live[0]:
        if what is None:
            return DFA(table=np.zeros((1, 256), np.int32), accepting=np.zeros(1, bool))
        raise ValueError(f"{what} matches nothing")
    n = int(live.sum())
    renum = np.full(len(sets) + 1, n, np.int32)  # index -1 (no edge) and dead states -> the sink
    renum[np.flatnonzero(live)] = np.arange(n, dtype=np.int32)
    compact = np.full((n + 1, len(reps)), n, np.int32)  # per byte class, the sink last
    compact[:n] = renum[by_class[live]]
    compact, accepting = _minimize(compact, np.append(accepting[live], False))
    return DFA(table=np.ascontiguousarray(compact[:, class_of]), accepting=accepting)


# Rounds of Moore's refinement before `_minimize` leaves a DFA as built: a round tells apart states one more
# character from a difference, so a literal of n characters takes n rounds (a 3,000-character tool name took 6.5 s
# of rounds, quadratic in n). The DFA it leaves is as correct, only with states that could have been merged. Typical
# constraints converge well under it (json_object 11, bench/structured.py's schema with a 32-character string 36).
MINIMIZE_ROUNDS = 256
_ROW_HASH = np.random.default_rng(0).integers(1, 1 << 62, size=4096, dtype=np.int64).astype(np.uint64) | np.uint64(1)


def _row_classes(keys: np.ndarray) -> np.ndarray:
    """Ids ``[n]`` of the rows of ``keys`` (equal ids for equal rows and only for them), from a hash of each row;
    a collision, checked row by row, falls back to sorting the rows themselves (``np.unique(axis=0)``, ~10x
    slower: json_object's rounds took 0.2 s each that way)."""
    if keys.shape[1] <= len(_ROW_HASH):
        h = (keys.astype(np.uint64) * _ROW_HASH[:keys.shape[1]]).sum(axis=1)
        _, first, ids = np.unique(h, return_index=True, return_inverse=True)
        ids = ids.reshape(-1)
        if np.array_equal(keys, keys[first[ids]]):
            return ids
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


def _minimize(table: np.ndarray, accepting: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moore's partition refinement of a DFA whose last state is the sink: equivalent states merged (the
    subset construction leaves copies, e.g. one per unrolled repeat), so fewer masks are computed. Keeps
    state 0 the start and the sink last. Past `MINIMIZE_ROUNDS` rounds the DFA is returned as it came."""
    block = accepting.astype(np.int64)
    block[-1] = 2  # the sink apart from every live state, so it stays the only state with no way out
    for _ in range(MINIMIZE_ROUNDS):
        new = _row_classes(np.concatenate([block[:, None], block[table]], axis=1))
        if new.max() == block.max() and len(np.unique(new)) == len(np.unique(block)):
            break
        block = new
    else:
        return table.astype(np.int32), accepting
    # Number blocks by first appearance: the start's block is 0, the sink's (alone) the last.
    _, first = np.unique(block, return_index=True)
    order = np.argsort(first)
    renum = np.empty_like(order)
    renum[order] = np.arange(len(order))
    reps = first[order]
    return renum[block][table[reps]].astype(np.int32), accepting[reps]


# ----- vocabulary masks ---------------------------------------------------------------------------------------
class Vocabulary:
    """Each token's bytes, laid out so one DFA state's next states for the whole vocabulary are a few numpy
    gathers (one per byte position, over the tokens at least that long). ``None`` or empty: a token no
    constraint ever allows (special tokens, ids past the tokenizer).

    Example:
        >>> v = Vocabulary([b"a", b"bc", None])
        >>> v.size, v.token_bytes[1]
        (3, b'bc')
    """

    def __init__(self, token_bytes: Sequence[bytes | None]) -> None:
        self.token_bytes = [b or b"" for b in token_bytes]
        self.size = len(self.token_bytes)
        lengths = np.array([len(b) for b in self.token_bytes], np.int64)
        order = np.argsort(lengths, kind="stable")
        self.order = order[lengths[order] > 0]
        lens = lengths[self.order]
        flat = np.frombuffer(b"".join(self.token_bytes[i] for i in self.order), np.uint8)
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        self.columns = []
        for j in range(int(lens[-1]) if len(lens) else 0):
            start = int(np.searchsorted(lens, j, side="right"))  # the first token longer than j bytes
            self.columns.append((start, flat[offsets[start:] + j]))

    def device_bytes(self) -> tuple[jax.Array, jax.Array]:
        """The tokens' bytes on the default device, ``[max length, size]`` uint8 (zero past a token's end), and
        their lengths ``[size]`` (`TokenGuide.device_tables` walks them)."""
        if getattr(self, "_device_bytes", None) is None:
            lens = np.array([len(b) for b in self.token_bytes], np.int32)
            cols = np.zeros((max(1, int(lens.max())), self.size), np.uint8)
            for t in self.order:
                data = self.token_bytes[t]
                cols[: len(data), t] = np.frombuffer(data, np.uint8)
            self._device_bytes = (jnp.asarray(cols), jnp.asarray(lens))
        return self._device_bytes

    def walk(self, dfa: DFA, state: int) -> np.ndarray:
        """The state each token leads to from ``state`` (``[size]``, the sink for tokens of no bytes)."""
        cur = np.full(len(self.order), state, np.int32)
        for start, col in self.columns:
            cur[start:] = dfa.table[cur[start:], col]
        out = np.full(self.size, dfa.sink, np.int32)
        out[self.order] = cur
        return out


class TokenGuide:
    """A compiled constraint over one vocabulary: per DFA state, the packed mask of the tokens that keep a
    full match reachable (plus the EOS ids where the text so far is a full match), cached.

    Example:
        >>> g = TokenGuide(compile_regex("ab"), Vocabulary([b"a", b"b", b"ab", None]), eos_ids=(3,))
        >>> unpack_mask(g.mask(0), 4).tolist(), unpack_mask(g.mask(g.next_state(0, 2)), 4).tolist()
        ([True, False, True, False], [False, False, False, True])
    """

    def __init__(self, dfa: DFA, vocab: Vocabulary, eos_ids: Sequence[int]) -> None:
        self.dfa, self.vocab = dfa, vocab
        self.eos_ids = np.array(sorted({int(t) for t in eos_ids if 0 <= t < vocab.size}), np.int64)
        self.eos_set = frozenset(self.eos_ids.tolist())
        self.words = -(-vocab.size // 32)
        self._final = dfa.accepting & (dfa.table == dfa.sink).all(axis=1)
        self._masks: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()  # a server's tokenizer thread and the engine's may both build them
        self._device_tables: tuple[jax.Array, jax.Array] | None = None
        self._tables: tuple[np.ndarray, np.ndarray] | None = None  # `tables`, once computed (host or device)
        allowed = np.zeros(vocab.size, bool)
        allowed[self.eos_ids] = True
        self.eos_mask = pack_mask(allowed)

    def mask(self, state: int) -> np.ndarray:
        """uint32 ``[ceil(V / 32)]``: bit t of word t // 32 set where token t may come next."""
        mask = self._masks.get(state)
        if mask is None:
            allowed = self.vocab.walk(self.dfa, state) != self.dfa.sink
            if self.dfa.accepting[state]:
                allowed[self.eos_ids] = True
            mask = pack_mask(allowed)
            with self._lock:
                self._masks[state] = mask
        return mask

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Every state's packed mask (uint32 ``[S, ceil(V / 32)]``) and next state per token (``[S, V]``: the
        state a token leads to, ``S`` where it breaks the constraint, ``S + 1`` for an EOS id where the text is
        a full match; int16 where that fits, int32 past it), S the live states: what a decode call needs to
        follow the constraint on the device for several steps. Computed once (S walks of the vocabulary)."""
        if self._tables is None:
            states = self.dfa.sink
            nxt = np.empty((states, self.vocab.size), _state_dtype(states + 1))
            masks = np.empty((states, self.words), np.uint32)
            for s in range(states):
                nxt[s] = self.vocab.walk(self.dfa, s)
                if self.dfa.accepting[s]:
                    nxt[s, self.eos_ids] = states + 1
                masks[s] = self.mask(s)
            self._tables = (masks, nxt)
        return self._tables

    def device_tables(self, padded: bool = False) -> tuple[jax.Array, jax.Array]:
        """`tables` computed on the default JAX device (one gather a byte position over every state and token:
        a few ms on the H200 for a schema's ~400 states, where the host's walks took ~11 s), and kept there
        until `drop_device_tables`. ``padded``: with the rows past the live states that the computation pads
        to (a power of two from 8, breaking every token), as `jaxserve.guide_pool` copies them."""
        with self._build_lock:
            if self._device_tables is None:
                cols, lens = self.vocab.device_bytes()
                states = self.dfa.sink
                rows = max(8, 1 << states.bit_length())  # padded (to the sink) so that schemas share compiles
                table = np.full((rows, 256), states, np.int32)
                table[: states + 1] = self.dfa.table
                accepting = np.zeros(rows, bool)
                accepting[:states] = self.dfa.accepting[:states]
                eos = np.zeros(self.vocab.size, bool)
                eos[self.eos_ids] = True
                self._device_tables = _walk_all(jnp.asarray(table), cols, lens, jnp.asarray(accepting),
                                                jnp.asarray(eos), sink=states, words=self.words,
                                                dtype=_state_dtype(states + 1))
                if self._tables is None:
                    # A host copy too: the host follows every decoded token, by lookup in it rather than a walk
                    # of the token's bytes (at 256 rows on the H200 the walks cost 25% of the constrained tokens/s).
                    self._tables = tuple(np.asarray(t[:states]) for t in self._device_tables)
            tables = self._device_tables
        return tables if padded else tuple(t[: self.dfa.sink] for t in tables)

    def prepare_host_tables(self) -> None:
        """Compute the host's copy of `tables` on the device where it is missing, keeping no device copy (for
        `next_state`'s lookups; `jaxserve.guide_pool` writes the device's where a decode call needs them)."""
        if self._tables is None:
            self.device_tables(padded=True)
            self.drop_device_tables()

    def drop_device_tables(self) -> None:
        """Free `device_tables`' device memory (the host copy stays); the next call builds them again."""
        with self._build_lock:
            self._device_tables = None

    def next_state(self, state: int, token: int) -> int:
        """The state after ``token`` (the sink if it breaks the constraint)."""
        if not 0 <= token < self.vocab.size:
            return self.dfa.sink
        tables = self._tables
        if tables is not None:  # one lookup, not a walk of the token's bytes (the host follows every row's tokens)
            nxt = int(tables[1][state, token])
            return nxt if nxt < self.dfa.sink else self.dfa.sink
        data = self.vocab.token_bytes[token]
        return self.dfa.run(data, state) if data else self.dfa.sink

    def is_final(self, state: int) -> bool:
        """A full match from which no byte can continue: the output is complete."""
        return bool(self._final[state])


@functools.partial(jax.jit, static_argnames=("sink", "words", "dtype"))
def _walk_all(table, cols, lens, accepting, eos, *, sink: int, words: int, dtype):
    cur = jnp.broadcast_to(jnp.arange(table.shape[0], dtype=jnp.int32)[:, None], (table.shape[0], cols.shape[1]))

    def step(j, cur):
        return jnp.where(j < lens[None, :], table[cur, cols[j].astype(jnp.int32)[None, :]], cur)

    cur = jax.lax.fori_loop(0, cols.shape[0], step, cur)
    cur = jnp.where(lens[None, :] > 0, cur, sink)
    nxt = jnp.where(accepting[:, None] & eos[None, :], sink + 1, cur)
    allowed = jnp.pad(nxt != sink, ((0, 0), (0, words * 32 - nxt.shape[1])))
    bits = allowed.reshape(allowed.shape[0], words, 32).astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32)
    return jnp.sum(bits, axis=-1, dtype=jnp.uint32), nxt.astype(dtype)


def _state_dtype(largest: int) -> type:
    # Half the bytes of the [states, vocabulary] next-state tables where the states allow it.
    return np.int16 if largest <= np.iinfo(np.int16).max else np.int32


def pack_mask(allowed: np.ndarray) -> np.ndarray:
    """Packed uint32 ``[ceil(V / 32)]`` from bool ``[V]``: bit t of word t // 32 set where ``allowed[t]``
    (`unpack_mask` inverts it).

    Example:
        >>> pack_mask(np.array([True, False, True])).tolist()
        [5]
    """
    packed = np.zeros(-(-len(allowed) // 32) * 4, np.uint8)
    bits = np.packbits(allowed, bitorder="little")
    packed[: len(bits)] = bits
    return packed.view("<u4")


def unpack_mask(words: np.ndarray, size: int) -> np.ndarray:
    """Bool ``[..., size]`` from packed uint32 ``[..., ceil(size / 32)]`` masks (little-endian bit order).

    Example:
        >>> unpack_mask(np.array([0b101], np.uint32), 3).tolist()
        [True, False, True]
    """
    as_bytes = np.ascontiguousarray(words, dtype="<u4").view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :size].astype(bool)


class GuideState:
    """One request's progress through its `TokenGuide`: advanced over the output tokens as they arrive.

    ``eos`` is set once an EOS id is taken (only EOS may follow); ``broken`` if a token left the constraint
    (a mask the sampler did not apply); ``final`` once the output is a complete match nothing can extend.

    Example:
        >>> st = GuideState(g)            # doctest: +SKIP
        >>> st.advance([2]); st.final     # doctest: +SKIP
        True
    """

    def __init__(self, guide: TokenGuide) -> None:
        self.guide = guide
        self.state = 0
        self.consumed = 0
        self.eos = False
        self.broken = False

    def advance(self, output_ids: Sequence[int]) -> None:
        """Take the tokens of ``output_ids`` past those already taken."""
        for token in output_ids[self.consumed:]:
            self._take(token)

    def _take(self, token: int) -> None:
        self.consumed += 1
        if self.eos or self.broken:
            return
        if token in self.guide.eos_set and self.guide.dfa.accepting[self.state]:
            self.eos = True
            return
        self.state = self.guide.next_state(self.state, token)
        self.broken = self.state == self.guide.dfa.sink

    def until_final(self, output_ids: Sequence[int], new_tokens: Sequence[int]) -> int:
        """How many of ``new_tokens`` (arriving after ``output_ids``) to take: up to the one that makes the output
        a complete match nothing can extend, or an EOS where it is a match, all of them if none does; none where the
        output is such a match already. What a call that ran on past that point on the device produced beyond it is
        dropped, as if the host had stopped the request there. The tokens counted are taken here: the caller appends
        exactly those to ``output_ids`` (fewer only where the request finishes, after which nothing follows its
        guide)."""
        self.advance(output_ids)
        if self.eos or self.broken:
            return len(new_tokens)
        if self.final:  # complete already (a token taken from another call of the same step): nothing more, no EOS
            return 0
        for k, token in enumerate(new_tokens):
            self._take(token)
            if self.final or self.broken:  # a complete match, an EOS taken where it was one, or a token off the
                # constraint (`_end_guided` aborts the request there: an EOS after it must not finish it as "stop")
                return k + 1
        return len(new_tokens)

    @property
    def final(self) -> bool:
        return not self.broken and (self.eos or self.guide.is_final(self.state))

    def mask(self) -> np.ndarray:
        """The packed mask of the next token."""
        if self.eos or self.broken:
            return self.guide.eos_mask
        return self.guide.mask(self.state)


# A guide may hold its tables (`TokenGuide.tables`: ~130 MB at int16 for bench/structured.py's 437-state schema over
# Qwen2.5's vocabulary), so few are kept.
@functools.lru_cache(maxsize=16)
def compile_guide(spec: StructuredOutputs, vocab: Vocabulary, eos_ids: tuple[int, ...]) -> TokenGuide:
    """The `TokenGuide` of ``spec`` over ``vocab`` (cached: the same schema on many requests compiles once).
    ValueError naming the spec's field when it cannot be compiled.

    Example:
        >>> g = compile_guide(StructuredOutputs(choice=["ab"]), Vocabulary([b"a", b"b", None]), (2,))
        >>> unpack_mask(g.mask(0), 3).tolist()
        [True, False, False]
    """
    try:
        return TokenGuide(compile_regex(spec.to_regex()), vocab, eos_ids)
    except ValueError as e:
        field = spec.field()
        raise ValueError(str(e) if str(e).startswith(field) else f"{field}: {e}") from None
