"""GBNF grammar -> regular expression, for structured-output (guided) decoding with ``guided_grammar``.

Owns reading llama.cpp's GBNF (the format vLLM's ``guided_grammar`` and xgrammar take) and writing the
same language as a regex in the subset `jaxserve.structured.compile_regex` reads (literals, escapes,
classes, ``(?:...)`` groups, alternation, quantifiers), which is also valid for ``re``. It never compiles
the regex nor follows tokens: the engine's byte DFA does that, as for every other constraint.

Why a regex: the engine follows a constraint with a DFA whose state is one int (`jaxserve.structured`),
so a grammar is supported where its language is regular. A recursive rule (one reachable from itself)
is unrolled instead of refused, as `jaxserve.json_schema` bounds JSON nesting: a rule may nest inside
itself at most ``max_depth`` times, and a reference past that admits nothing, so the alternatives that
need it drop out. The regex grows by about the recursion's branching factor per level, hence a cap.

Read as llama.cpp's README describes GBNF, except:
  * Lenient line breaks: a rule's body runs on to the next ``name ::=``, wherever the newlines fall.
  * Escapes ``\\[ \\] \\- \\^`` are accepted in strings as well as in classes; a string or a class
    ends on its line (an unterminated one is reported where it starts).
  * ``[]`` (an empty class) admits nothing; ``[^]`` and ``.`` are any character, newline included.
"""

from __future__ import annotations

import re
from collections import Counter

from jaxserve.structured import escape

__all__ = ["MAX_DEPTH", "MAX_REGEX_CHARS", "grammar_to_regex"]

# How many times a recursive rule may nest inside itself, as json_schema's JSON_VALUE_DEPTH.
MAX_DEPTH = 4
# The longest regex a grammar becomes; by default (max_depth None) recursion nests as deeply as fits in it, at
# most MAX_DEPTH. Its DFA's tables grow with it: llama.cpp's json.gbnf (a whitespace of a newline and up to 20
# indents after every token) is 18.7k characters at 2 nestings (1,273 DFA states, 1.4 s of compile_regex on
# the CPU machine), 76k at 3 (2,669 states, 6.1 s, ~860 MB of tables over Qwen's 151,936 tokens); the JSON
# object regex of json_schema (depth 4) is 31k.
MAX_REGEX_CHARS = 50_000

_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_NUMBER = re.compile(r"[0-9]+")
_SPACE = " \t\r\n"
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_QUANTIFIERS = {"*": (0, None), "+": (1, None), "?": (0, 1)}
# Special inside a class for re or the DFA; & ~ | too, whose doubles re warns may become set operators.
_CLASS_SPECIAL = set("\\]^-[&~|")
_ANY = r"[\s\S]"

# A regex and whether it is one atom (a quantifier may follow it without a group); None admits nothing.
_Re = tuple[str, bool]


def _err(msg: str) -> ValueError:
    return ValueError(f"grammar: {msg}")


class _TooLong(ValueError):
    """The regex outgrew MAX_REGEX_CHARS (fewer nestings may fit)."""

    def __init__(self, msg: str) -> None:
        super().__init__(f"grammar: {msg}")


class _Parser:
    """Recursive descent over GBNF; nodes are tuples: ("lit", text), ("set", negated, [(lo, hi)]),
    ("any",), ("ref", name), ("seq", [nodes]), ("alt", [nodes]), ("rep", node, lo, hi or None)."""

    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0
        self.refs: list[tuple[str, int]] = []  # the current rule's references and where, checked later

    def where(self, i: int) -> str:
        line, column = self.text.count("\n", 0, i) + 1, i - self.text.rfind("\n", 0, i)
        return f"line {line}, column {column}"

    def error(self, what: str, at: int | None = None) -> ValueError:
        return _err(f"{what} at {self.where(self.i if at is None else at)}")

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def space(self) -> None:
        while (c := self.peek()) is not None and (c in _SPACE or c == "#"):
            if c == "#":
                end = self.text.find("\n", self.i)
                self.i = len(self.text) if end < 0 else end
            else:
                self.i += 1

    def at_rule_start(self) -> bool:
        start, m = self.i, _NAME.match(self.text, self.i)
        if m is None:
            return False
        self.i = m.end()
        self.space()
        found = self.text.startswith("::=", self.i)
        self.i = start
        return found

    def parse(self) -> dict[str, tuple[tuple, list[tuple[str, int]], int]]:
        """Each rule's name -> (body, its references with their offsets, the rule's offset)."""
        rules: dict[str, tuple[tuple, list[tuple[str, int]], int]] = {}
        self.space()
        while self.i < len(self.text):
            start, m = self.i, _NAME.match(self.text, self.i)
            if m is None:
                raise self.error(f"expected a rule name, found {self.peek()!r}")
            self.i = m.end()
            self.space()
            if not self.text.startswith("::=", self.i):
                raise self.error(f"expected '::=' after the rule name {m[0]!r}")
            if m[0] in rules:
                raise _err(f"rule {m[0]!r} is defined twice, at {self.where(rules[m[0]][2])} and {self.where(start)}")
            self.i += 3
            self.refs = []
            body = self.alternation()
            rules[m[0]] = (body, self.refs, start)
            if self.i < len(self.text) and not self.at_rule_start():
                raise self.error(f"unexpected character {self.peek()!r}")
        return rules

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self) -> tuple:
        items: list[tuple] = []
        while True:
            self.space()
            c = self.peek()
            if c is not None and c in "*+?{":
                if not items:
                    raise self.error(f"{c!r} has nothing to repeat")
                items[-1] = ("rep", items[-1], *self.repetition())
            elif c == '"':
                items.append(("lit", self.literal()))
            elif c == "[":
                items.append(self.char_class())
            elif c == ".":
                self.i += 1
                items.append(("any",))
            elif c == "(":
                opened = self.i
                self.i += 1
                items.append(self.alternation())
                if self.peek() != ")":
                    raise self.error(f"expected ')' to close the '(' at {self.where(opened)}")
                self.i += 1
            elif c is not None and _NAME.match(c) and not self.at_rule_start():
                m = _NAME.match(self.text, self.i)
                self.refs.append((m[0], self.i))
                self.i = m.end()
                items.append(("ref", m[0]))
            else:
                return items[0] if len(items) == 1 else ("seq", items)

    def repetition(self) -> tuple[int, int | None]:
        start, c = self.i, self.text[self.i]
        self.i += 1
        if c in _QUANTIFIERS:
            return _QUANTIFIERS[c]
        lo = hi = self.number()
        if self.peek() == ",":
            self.i += 1
            self.space()
            hi = self.number() if _NUMBER.match(self.text, self.i) else None
        if self.peek() != "}":
            raise self.error("expected '}' to close the repetition '{'")
        self.i += 1
        if hi is not None and hi < lo:
            raise self.error(f"bad repetition bounds {{{lo},{hi}}} (max < min)", start)
        return lo, hi

    def number(self) -> int:
        self.space()
        m = _NUMBER.match(self.text, self.i)
        if m is None:
            raise self.error("expected a number in the repetition '{...}'")
        self.i = m.end()
        self.space()
        return int(m[0])

    def literal(self) -> str:
        start = self.i
        self.i += 1
        out = []
        while (c := self.peek()) != '"':
            if c is None or c == "\n":
                raise self.error("unterminated string", start)
            out.append(self.char())
        self.i += 1
        return "".join(out)

    def char_class(self) -> tuple:
        start = self.i
        self.i += 1
        negated = self.peek() == "^"
        self.i += negated
        ranges = []
        while (c := self.peek()) != "]":
            if c is None or c == "\n":
                raise self.error("unterminated character class", start)
            at, lo = self.i, ord(self.char())
            hi = lo
            if self.peek() == "-" and self.text[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = ord(self.char())
                if hi < lo:
                    raise self.error("bad character range (end before start)", at)
            ranges.append((lo, hi))
        self.i += 1
        return ("set", negated, ranges)

    def char(self) -> str:
        """One character of a string or class, escapes decoded."""
        c = self.text[self.i]
        self.i += 1
        if c != "\\":
            return c
        at, e = self.i - 1, self.peek()
        self.i += 1
        if e in _ESCAPES:
            return _ESCAPES[e]
        n = _HEX_DIGITS.get(e or "", 0)
        digits = self.text[self.i:self.i + n]
        cp = int(digits, 16) if n and re.fullmatch(f"[0-9a-fA-F]{{{n}}}", digits) else -1
        if 0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF:  # a surrogate is no character of a text
            self.i += n
            return chr(cp)
        raise self.error(f"bad escape {self.text[at:at + 2 + n]!r}", at)


def _char(cp: int, special: set[str] | None = None) -> str:
    """Code point `cp` for the regex: controls as \\uXXXX, specials escaped (in a class, `special`)."""
    if cp < 0x20 or cp == 0x7F:
        return f"\\u{cp:04x}"
    c = chr(cp)
    if special is None:
        return escape(c)
    return "\\" + c if c in special else c


def _repeat(unit: _Re | None, lo: int, hi: int | None) -> _Re | None:
    if unit is None:  # no text: only zero repetitions remain
        return ("", False) if lo == 0 else None
    text, atom = unit
    if not text or hi == 0:
        return ("", False)
    if lo == hi == 1:
        return unit
    q = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi))
    q = q or (f"{{{lo}}}" if lo == hi else f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}")
    return (text if atom else f"(?:{text})") + q, False


class _Expander:
    def __init__(self, rules: dict[str, tuple], max_depth: int) -> None:
        self.rules, self.max_depth = rules, max_depth
        self.depth: Counter[str] = Counter()  # how many times each rule is on the expansion stack
        self.memo: dict[tuple, _Re | None] = {}
        self.cycle = _cycles({name: {r for r, _ in refs} for name, (_, refs, _) in rules.items()})

    def rule(self, name: str) -> _Re | None:
        if self.depth[name] > self.max_depth:
            return None  # recursion cut off here; the alternatives that need it drop out
        # Only the rules of its own cycle can be on the stack when a rule starts (any other ancestor
        # would be on the cycle too), so their counts decide its expansion: acyclic rules expand once.
        key = (name, tuple(self.depth[r] for r in self.cycle[name]))
        if key not in self.memo:
            self.depth[name] += 1
            out = self.expand(self.rules[name][0])
            self.depth[name] -= 1
            if out is not None and len(out[0]) > MAX_REGEX_CHARS:
                raise _TooLong(f"the regex grows past MAX_REGEX_CHARS ({MAX_REGEX_CHARS} characters) at rule "
                           f"{name!r}; allow fewer nestings of recursive rules (a smaller max_depth)")
            self.memo[key] = out
        return self.memo[key]

    def expand(self, node: tuple) -> _Re | None:
        kind = node[0]
        if kind == "lit":
            return "".join(_char(ord(c)) for c in node[1]), len(node[1]) == 1
        if kind == "set":
            _, negated, ranges = node
            if not ranges:
                return (_ANY, True) if negated else None
            body = "".join(_char(lo, _CLASS_SPECIAL) + (f"-{_char(hi, _CLASS_SPECIAL)}" if hi > lo else "")
                           for lo, hi in ranges)
            return f"[{'^' * negated}{body}]", True
        if kind == "any":
            return _ANY, True
        if kind == "ref":
            return self.rule(node[1])
        if kind == "rep":
            return _repeat(self.expand(node[1]), node[2], node[3])
        if kind == "seq":
            parts = []
            for item in node[1]:
                part = self.expand(item)
                if part is None:
                    return None
                if part[0]:
                    parts.append(part)
            return parts[0] if len(parts) == 1 else ("".join(p[0] for p in parts), False)
        # Alternation: always grouped, so that sequences concatenate it as it is.
        kept = dict(p for p in map(self.expand, node[1]) if p is not None)  # regex -> atom, deduplicated
        if not kept:
            return None
        texts = [t for t in kept if t]
        if not texts:
            return "", False
        out = (texts[0], kept[texts[0]]) if len(texts) == 1 else ("(?:" + "|".join(texts) + ")", True)
        return _repeat(out, 0, 1) if "" in kept else out


def _cycles(edges: dict[str, set[str]]) -> dict[str, tuple[str, ...]]:
    """Each rule's strongly connected component: itself and the rules that reach it and it reaches."""
    reach = {}
    for name in edges:
        seen, todo = set(), [name]
        while todo:
            for r in edges[todo.pop()] - seen:
                seen.add(r)
                todo.append(r)
        reach[name] = seen
    return {n: tuple(sorted({n} | {m for m in reach[n] if n in reach[m]})) for n in edges}


def grammar_to_regex(grammar: str, root: str = "root", max_depth: int | None = None) -> str:
    """Regex whose full matches are the texts `grammar` (GBNF) derives from rule `root`, with every
    recursive rule nested inside itself at most `max_depth` times (None: the most, up to MAX_DEPTH, whose
    regex fits MAX_REGEX_CHARS). Bad grammars, and those with no derivation within `max_depth` or a regex
    over MAX_REGEX_CHARS, raise ValueError ("grammar: ...").

    >>> grammar_to_regex('root ::= "yes" | "no"')
    '(?:yes|no)'
    >>> grammar_to_regex('root ::= "(" root ")" | ""', max_depth=1)
    '(?:\\\\(\\\\))?'
    """
    if not isinstance(grammar, str):
        raise _err(f"expected the grammar as a string, got {type(grammar).__name__}")
    if max_depth is not None and (not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < 0):
        raise _err(f"max_depth must be a non-negative integer, got {max_depth!r}")
    parser = _Parser(grammar)
    try:
        rules = parser.parse()
        if not rules:
            raise _err("the grammar is empty (no rules)")
        for name, (_, refs, _) in rules.items():
            for ref, at in refs:
                if ref not in rules:
                    raise _err(f"undefined rule {ref!r} referenced in rule {name!r} at {parser.where(at)}")
        if root not in rules:
            raise _err(f"no rule {root!r} (the start rule) is defined")
        for depth in range(MAX_DEPTH, -1, -1) if max_depth is None else (max_depth,):
            try:
                out = _Expander(rules, depth).rule(root)
                break
            except _TooLong:
                if max_depth is not None or depth == 0:
                    raise
    except RecursionError:
        raise _err("nested too deeply to convert (parentheses, a chain of rules, or max_depth)") from None
    if out is None:
        raise _err(f"rule {root!r} has no finite derivation within max_depth={depth} nestings")
    return out[0]
