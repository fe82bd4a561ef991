"""JSON Schema -> regular expression, for structured-output (guided) decoding.

The regex's full matches are JSON texts valid under the schema; it is compiled to a byte-level DFA
that understands only a small regex subset (literals, a fixed set of escapes, ``.``, classes, groups,
alternation, quantifiers, positive lookahead), so everything here is written in that subset and is also valid for
``re``.

Limits (where the regex accepts fewer texts than the schema allows, or, as marked, more):
  * Whitespace is ``whitespace_pattern`` (default ``[ ]?``), only after ``{ [ , :`` and before ``} ]``.
  * ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum`` hold for ``integer`` (`integer_range_regex`)
    and ``number`` (`number_range_regex`: a bounded number is written without an exponent, compared as the exact
    decimal it spells with the bound's shortest decimal form); more: ``multipleOf`` is ignored.
  * ``pattern`` must fully match the string's JSON-escaped content as-is (leading ``^`` / trailing
    ``$`` stripped), as in outlines, rather than be searched in the decoded string. Its ``.``, negated classes
    and ``\\S`` / ``\\D`` / ``\\W`` leave out ``"``, ``\\`` and control characters, ``\\s`` is a space or a
    whitespace escape (`_json_safe`); a literal or a positive class that names ``"`` or a control character can
    still yield invalid JSON.
  * A string's ``pattern``, supported ``format`` and ``minLength``/``maxLength`` hold together (`_string`: all but
    one as lookaheads). A length counts the decoded string's characters (an escape such as ``\\n`` is one), except
    that a character past U+FFFF written as two ``\\u`` escapes (a surrogate pair) counts two (fewer texts under
    ``maxLength``; more, as marked, under ``minLength``). Lengths are unrolled in the DFA, a pattern's states once a
    character of length: a product past `jaxserve.structured.MAX_DFA_STATES` (``maxLength`` ~2,000 alone, less
    with a pattern) is refused when compiled.
  * More: ``oneOf`` is ``anyOf`` (exclusivity unchecked); ``enum``/``const`` ignore a sibling ``type``.
  * Objects with ``properties`` never get keys beyond them (whatever ``additionalProperties`` says), in
    the schema's order; keys in ``required`` but not in ``properties`` are appended as any-value keys.
  * Free-form values (``{}``, ``true``, bare ``object``/``array``) nest at most ``max_depth`` levels
    counted from the document's top; a ``$ref`` recursion deeper than ``max_depth`` admits nothing at
    that point (an optional property or array item there is left out; if nothing remains, ValueError).
  * Without ``type``, one is inferred from the keywords (``properties`` -> object, ``items`` -> array,
    ``pattern``/``format``/lengths -> string); with none of those the value is free-form.
  * ``integer`` has no fraction or exponent; ``const``/``enum`` numbers must be written as json.dumps does.
  * Tuples hold: draft 2020's ``prefixItems`` (further items under ``items``) and drafts 4-7's list ``items``
    (further items under ``additionalItems``), with ``minItems``/``maxItems``; ``uniqueItems`` is refused.
  * Refused (ValueError) where the regex would pass ``MAX_REGEX_CHARS`` characters (deep nesting, a ``$ref`` used
    many times over) or a numeric bound needs more than ``MAX_BOUND_DIGITS`` digits; keywords of the wrong JSON
    type are refused as a malformed schema.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal

from jaxserve.structured import escape

__all__ = ["JSON_VALUE_DEPTH", "integer_range_regex", "json_object_regex", "json_value_regex", "number_range_regex",
           "schema_to_regex"]

# Four levels of free-form nesting cover typical json_object replies; the regex grows ~4x per level.
JSON_VALUE_DEPTH = 4
# The longest regex a schema may become. Nesting repeats a subschema's regex (an array's item twice a level, a
# `$ref` wherever it is used), so a schema of a few hundred bytes (30 nested arrays) asked for gigabytes of text
# before the DFA's state limits saw any of it, and a server took them. json_object's default regex is ~31k.
MAX_REGEX_CHARS = 1 << 20
# Digits a numeric bound may spell out: a bounded number is written digit by digit (`number_range_regex`, one
# recursion a digit), so 1e-300 asked for a 300-level recursion.
MAX_BOUND_DIGITS = 40

# One space at most by default: unbounded whitespace lets a model loop on spaces/newlines (outlines).
_DEFAULT_WS = r"[ ]?"
_CHAR = r'(?:[^"\\\u0000-\u001f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_STRING = f'"{_CHAR}*"'
_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_NUMBER = _INTEGER + r"(?:\.[0-9]+)?(?:[eE][+\-]?[0-9]+)?"
_BOOLEAN = r"(?:true|false)"
_NULL = "null"
_SCALARS = {"integer": _INTEGER, "number": _NUMBER, "boolean": _BOOLEAN, "null": _NULL}
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_FORMATS = {  # string bodies, without the quotes; offsets are required by RFC 3339's full-time
    "date-time": _DATE + "T" + _TIME,
    "date": _DATE,
    "time": _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[a-zA-Z0-9_%+\-]+(?:\.[a-zA-Z0-9_%+\-]+)*@[a-zA-Z0-9\-]+(?:\.[a-zA-Z0-9\-]+)+",
}
_HANDLED = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems",
            "additionalItems",
            "minItems", "maxItems", "minLength", "maxLength", "pattern", "format",
            "anyOf", "oneOf", "allOf", "$ref"}
# Accepted and ignored: annotations, and numeric bounds that a regex cannot reasonably enforce.
_IGNORED = {"$schema", "$id", "$defs", "definitions", "$comment", "title", "description", "default",
            "examples", "readOnly", "writeOnly", "deprecated",
            "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}  # bounds hold on integer / number
# Escapes the DFA understands, after a backslash, in a user's `pattern`.
_PATTERN_ESCAPES = set("\\.*+?()[]{}|^$/\"-ntrdwsuDWS")
# What a JSON string may not hold raw (`_CHAR`): a pattern's "any character" forms leave these out (`_json_safe`).
_NOT_RAW = r'"\\\u0000-\u001f'


def _err(msg: str) -> ValueError:
    return ValueError(f"structured_outputs.json: {msg}")


def _quantified(unit: str, lo: int, hi: int | None) -> str:
    """`unit` (an atom or group) repeated lo..hi times (hi None: unbounded)."""
    if hi == 0:
        return ""
    if hi is None:
        return unit + ("*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}")
    if lo == hi:
        return unit if lo == 1 else f"{unit}{{{lo}}}"
    return unit + ("?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}")


def _alternation(parts: list[str | None]) -> str | None:
    """Alternation of the non-empty languages; None (no text at all) when there are none."""
    kept = list(dict.fromkeys(p for p in parts if p is not None))
    return None if not kept else kept[0] if len(kept) == 1 else "(?:" + "|".join(kept) + ")"


def _string_literal(s: str) -> str:
    # A non-ASCII character may be written raw or as its \u escape(s); both are the same JSON string.
    escaped = [(c, escape(json.dumps(c)[1:-1])) for c in s]
    return '"' + "".join(e if ord(c) < 128 else f"(?:{c}|{e})" for c, e in escaped) + '"'


def _object(pairs: str | None, ws: str, optional: bool = True) -> str:
    """An object whose members are `pairs` (None: only the empty object), optionally none at all."""
    if not pairs:
        return r"\{" + ws + r"\}"
    return r"\{" + ws + (f"(?:{pairs}{ws})?" if optional else pairs + ws) + r"\}"


def _array(item: str | None, ws: str, lo: int = 0, hi: int | None = None) -> str | None:
    return _tuple([], item, ws, lo, hi)


def _tuple(prefix: list[str | None], rest: str | None, ws: str, lo: int = 0, hi: int | None = None) -> str | None:
    """An array whose k-th item matches ``prefix[k]`` and any further ones ``rest`` (None: no such item), with
    ``lo``..``hi`` items in all; None where no array does. Built from the end: ``tail(k)`` is what may follow k items.

    Example:
        >>> import re; r = _tuple(["1", '"a"'], None, "", lo=1)
        >>> [t for t in ("[]", "[1]", '[1,"a"]', '[1,"a",1]') if re.fullmatch(r, t)]
        ['[1]', '[1,"a"]']
    """
    n = len(prefix)

    def tail(k: int) -> str | None:
        """Items k.. after k items (each after a comma), or None where k items are too few and no more fit."""
        if hi is not None and k >= hi:
            return "" if k >= lo else None
        if k >= n:
            if rest is None:
                return "" if k >= lo else None
            more = _quantified(f"(?:,{ws}{rest})", max(lo - k, 0), None if hi is None else hi - k)
            return more
        follow = tail(k + 1)
        item = prefix[k]
        if item is None or follow is None:
            return "" if k >= lo else None
        step = f",{ws}{item}{follow}"
        return f"(?:{step})?" if k >= lo else step

    if hi is not None and lo > hi:
        return None
    if hi == 0:
        return r"\[" + ws + r"\]" if lo == 0 else None
    follow = tail(1)
    first = prefix[0] if n else rest
    if first is None or follow is None:
        return r"\[" + ws + r"\]" if lo == 0 else None
    body = first + follow + ws
    return r"\[" + ws + (body if lo >= 1 else f"(?:{body})?") + r"\]"


def _free_object(value: str | None, ws: str) -> str:
    pair = f"{_STRING}:{ws}{value}"
    return _object(f"{pair}(?:,{ws}{pair})*" if value is not None else None, ws)


def _ws(whitespace_pattern: str | None) -> str:
    if whitespace_pattern is None:
        return _DEFAULT_WS
    return f"(?:{whitespace_pattern})" if whitespace_pattern else ""


def _any_value(depth: int, ws: str) -> str:
    inner = _any_value(depth - 1, ws) if depth > 0 else None
    containers = [_free_object(inner, ws), _array(inner, ws)] if inner else []
    return "(?:" + "|".join([_STRING, _NUMBER, _BOOLEAN, _NULL] + containers) + ")"


def json_value_regex(depth: int = JSON_VALUE_DEPTH, whitespace_pattern: str | None = None) -> str:
    """Regex for any JSON value with objects/arrays nested at most `depth` levels (0: scalars only).

    >>> bool(re.fullmatch(json_value_regex(1), '[1, "a", null]'))
    True
    """
    return _any_value(depth, _ws(whitespace_pattern))


def json_object_regex(depth: int = JSON_VALUE_DEPTH, whitespace_pattern: str | None = None) -> str:
    """Regex for a JSON object (response_format json_object) nesting at most `depth` levels, itself included.

    >>> bool(re.fullmatch(json_object_regex(2), '{"a": {"b": true}}')), bool(re.fullmatch(json_object_regex(), '[]'))
    (True, False)
    """
    if depth < 1:
        raise _err("json_object depth must be at least 1")
    ws = _ws(whitespace_pattern)
    return _free_object(_any_value(depth - 1, ws), ws)


def _check_pattern(pattern: str) -> None:
    """Refuse constructs outside the DFA's subset: anchors, lookaround, backreferences, flags. (The DFA takes a
    lookahead, but one in a pattern would look past the string's closing quote, into the rest of the document.)"""
    try:
        re.compile(pattern)
    except re.error as e:
        raise _err(f"invalid 'pattern' {pattern!r}: {e}") from None
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1] not in _PATTERN_ESCAPES:
                raise _err(f"unsupported escape in 'pattern' {pattern!r}")
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":  # a leading ^ and then a leading ] belong to the class
            i += 1 + pattern.startswith("^", i + 1)
            i += pattern.startswith("]", i)
            in_class = True
            continue
        elif c in "^$":
            raise _err(f"unsupported anchor in 'pattern' {pattern!r}")
        elif c == "(" and pattern.startswith("(?", i) and not pattern.startswith("(?:", i):
            raise _err(f"unsupported group syntax in 'pattern' {pattern!r}")
        i += 1


def _json_safe(pattern: str) -> str:
    r"""``pattern`` (checked by `_check_pattern`) with its "any character" forms kept to what a JSON string holds
    raw: ``.``, negated classes and ``\S`` / ``\D`` / ``\W`` leave out ``"``, ``\`` and control characters (they
    had let a model write a string no JSON parser reads); ``\s`` is a space or a whitespace escape (``\t``, ``\n``,
    ``\r``, ``\f``: the string's own whitespace once read). Literals and positive classes are the user's.

    Example:
        >>> print(_json_safe(r"[^@]+@.\S"))
        [^@"\\\u0000-\u001f]+@[^"\\\u0000-\u001f][^\s"\\\u0000-\u001f]
    """
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            e = pattern[i + 1]
            out.append({"S": rf"[^\s{_NOT_RAW}]", "D": rf"[^\d{_NOT_RAW}]", "W": rf"[^\w{_NOT_RAW}]",
                        "s": r"(?: |\\[tnrf])"}.get(e, c + e))
            i += 2
        elif c == ".":
            out.append(f"[^{_NOT_RAW}]")
            i += 1
        elif c == "[":
            j = i + 1 + pattern.startswith("^", i + 1)
            j += pattern.startswith("]", j)  # a leading ] belongs to the class
            while pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            negated = pattern.startswith("[^", i)
            out.append(pattern[i:j] + (_NOT_RAW if negated else "") + "]")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


class _Converter:
    def __init__(self, root: dict | bool, ws: str, max_depth: int):
        self.root, self.ws, self.max_depth = root, ws, max_depth
        self.refs: list[str] = []  # the $ref chain being expanded, to bound recursion

    def convert(self, schema: dict | bool, nesting: int) -> str | None:
        """Regex for `schema` at `nesting` levels of objects/arrays; None when it admits nothing."""
        regex = self._convert(schema, nesting)
        if regex is not None and len(regex) > MAX_REGEX_CHARS:
            raise _err(f"the schema's regex passes {MAX_REGEX_CHARS:,} characters (subschemas nested or "
                       "referenced too many times)")
        return regex

    def _convert(self, schema: dict | bool, nesting: int) -> str | None:
        if schema is True:
            return _any_value(self.max_depth - nesting, self.ws)
        if schema is False:
            return None
        if not isinstance(schema, dict):
            raise _err(f"a schema must be an object or a boolean, got {schema!r}")
        unknown = sorted(set(schema) - _HANDLED - _IGNORED)
        if unknown:
            raise _err("unsupported keyword(s) " + ", ".join(repr(k) for k in unknown))
        rest = dict(schema)
        if "$ref" in rest:
            return self._ref(rest.pop("$ref"), rest, nesting)
        if "allOf" in rest:
            parts = rest.pop("allOf")
            if not isinstance(parts, list) or len(parts) != 1:
                raise _err("'allOf' is supported with exactly one schema")
            return self.convert(_merge(rest, parts[0]), nesting)
        if "anyOf" in rest and "oneOf" in rest:
            raise _err("'anyOf' together with 'oneOf' is not supported")
        for key in ("anyOf", "oneOf", "enum"):
            if not isinstance(rest.get(key, []), list):
                raise _err(f"{key!r} must be a list")
        for key in ("anyOf", "oneOf"):  # oneOf as anyOf: exclusivity is not enforced
            if key in rest:
                branches = rest.pop(key)
                return _alternation([self.convert(_merge(rest, b), nesting) for b in branches])
        if "const" in rest:
            return self._literal(rest["const"])
        if "enum" in rest:
            return _alternation([self._literal(v) for v in rest["enum"]])
        types = rest.get("type", _infer_type(rest))
        if types is None:
            return _any_value(self.max_depth - nesting, self.ws)
        if isinstance(types, str):
            types = [types]
        return _alternation([self._typed(t, rest, nesting) for t in types])

    def _ref(self, ref: str, siblings: dict, nesting: int) -> str | None:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _err(f"only local '$ref' ('#/$defs/...') is supported, got {ref!r}")
        target = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise _err(f"'$ref' {ref!r} does not resolve")
            target = target[part]
        if self.refs.count(ref) >= self.max_depth:
            return None  # recursion cut off here; callers drop what needs this
        self.refs.append(ref)
        try:
            return self.convert(_merge(siblings, target) if siblings else target, nesting)
        finally:
            self.refs.pop()

    def _literal(self, value: object) -> str:
        ws = self.ws
        if isinstance(value, str):
            return _string_literal(value)
        if isinstance(value, dict):
            pairs = f",{ws}".join(f"{_string_literal(k)}:{ws}{self._literal(v)}" for k, v in value.items())
            return _object(pairs or None, ws, optional=False)
        if isinstance(value, list):
            return r"\[" + ws + (f",{ws}".join(map(self._literal, value)) + ws if value else "") + r"\]"
        return escape(json.dumps(value))

    def _typed(self, t: str, schema: dict, nesting: int) -> str | None:
        if t == "string":
            return _string(schema)
        if t == "integer" and any(k in schema for k in _INT_BOUNDS):
            return integer_range_regex(*_integer_bounds(schema))
        if t == "number" and any(k in schema for k in _INT_BOUNDS):
            return number_range_regex(*_number_bounds(schema))
        if t in _SCALARS:
            return _SCALARS[t]
        if t == "object":
            return self._object(schema, nesting + 1)
        if t == "array":
            lo, hi = _bound(schema, "minItems", 0), _bound(schema, "maxItems", None)
            # Tuples: draft 2020's prefixItems (the rest under `items`), or drafts 4-7's list `items` (the rest
            # under `additionalItems`); a rest left unsaid may be any values.
            prefix, rest = schema.get("prefixItems"), schema.get("items", True)
            if isinstance(rest, list):
                if prefix is not None:
                    raise _err("'prefixItems' with a list 'items': give the tuple once")
                prefix, rest = rest, schema.get("additionalItems", True)
            if prefix is not None:
                if not isinstance(prefix, list):
                    raise _err("'prefixItems' must be a list of schemas")
                if not isinstance(rest, (dict, bool)):
                    raise _err("the items after a tuple's must be one schema")
                return _tuple([self.convert(p, nesting + 1) for p in prefix], self.convert(rest, nesting + 1),
                              self.ws, lo, hi)
            if not isinstance(rest, (dict, bool)):
                raise _err("'items' must be a schema or a list of schemas")
            return _array(self.convert(rest, nesting + 1), self.ws, lo, hi)
        raise _err(f"unsupported 'type' {t!r}")

    def _object(self, schema: dict, nesting: int) -> str | None:
        ws, props = self.ws, schema.get("properties")
        required = list(schema.get("required", []))
        if props is None and not required:
            extra = schema.get("additionalProperties", True)
            return _free_object(self.convert(extra, nesting), ws)
        props = dict(props or {})
        props.update({k: True for k in required if k not in props})
        pairs = []  # (regex of `"key": value`, required?)
        for key, sub in props.items():
            value = self.convert(sub, nesting)
            if value is None:
                if key in required:
                    return None
                continue
            pairs.append((f"{_string_literal(key)}:{ws}{value}", key in required))
        if not pairs:
            return _object(None, ws)
        sep = f",{ws}"
        last_req = max((i for i, (_, req) in enumerate(pairs) if req), default=None)
        if last_req is not None:
            # Everything before the last required pair is followed by a comma, everything after it preceded.
            body = "".join(p + sep if req else f"(?:{p}{sep})?" for p, req in pairs[:last_req])
            body += pairs[last_req][0] + "".join(f"(?:{sep}{p})?" for p, _ in pairs[last_req + 1:])
            return _object(body, ws, optional=False)
        # All optional: L_i = nonempty ordered subset of pairs i.. = (p_i,)? L_{i+1} | p_i. Each pair
        # appears twice, so the size is linear in the number of properties (outlines' is quadratic).
        body = pairs[-1][0]
        for p, _ in reversed(pairs[:-1]):
            body = f"(?:(?:{p}{sep})?{body}|{p})"
        return _object(body, ws)


def _merge(base: dict, extra: dict | bool) -> dict | bool:
    """`extra` with `base`'s keywords added (siblings of $ref/anyOf/allOf); conflicting ones refused."""
    if isinstance(extra, bool) or not base:
        return extra if extra is not True else dict(base)
    out = dict(base)
    for k, v in extra.items():
        if k in out and out[k] != v and k not in _IGNORED:
            raise _err(f"cannot combine differing {k!r} from a subschema with its parent's")
        out[k] = v
    return out


def _infer_type(schema: dict) -> str | None:
    if any(k in schema for k in ("properties", "required", "additionalProperties")):
        return "object"
    if any(k in schema for k in ("items", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("pattern", "format", "minLength", "maxLength")):
        return "string"
    return None


def _bound(schema: dict, key: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise _err(f"{key!r} must be a non-negative integer, got {value!r}")
    return value


def _string(schema: dict) -> str | None:
    """A string's regex: its content matches each of the lengths, a supported ``format`` and ``pattern`` given (all
    of them; with none, any content). One is written as the content, the others as lookaheads up to the closing
    quote, ``"(?=X")Y"``: `re` and `jaxserve.structured.compile_regex` both read that as content in ``Y`` and in
    ``X``, an intersection the regex subset has no other way to say (Pydantic writes ``Field(pattern=...,
    max_length=...)`` as both). X (lengths, a format) matches JSON string content only, so the quote it ends with
    is Y's closing one, where Y's text is JSON string content too (a pattern that names a raw ``"`` or ends on a
    lone ``\\`` makes invalid JSON, with lengths or without). A length counts ``_CHAR``s, the decoded string's
    characters (``\\n`` is one).

    Example:
        >>> r = _string({"pattern": "^[a-z]+$", "maxLength": 3})
        >>> [t for t in ('"ab"', '"abc"', '"abcd"', '"a1"') if re.fullmatch(r, t)]
        ['"ab"', '"abc"']
    """
    lo, hi = _bound(schema, "minLength", 0), _bound(schema, "maxLength", None)
    fmt = schema.get("format") if schema.get("format") in _FORMATS else None
    pattern = schema.get("pattern")
    contents = []  # the last, the most particular, is the content; the others lookaheads
    if lo > 0 or hi is not None or (pattern is None and fmt is None):
        contents.append(_quantified(_CHAR, lo, hi))
    if fmt is not None:
        contents.append(_FORMATS[fmt])
    if pattern is not None:
        if not isinstance(pattern, str):
            raise _err(f"'pattern' must be a string, got {pattern!r}")
        body = pattern[1:] if pattern.startswith("^") else pattern
        if body.endswith("$") and not body.endswith("\\$"):
            body = body[:-1]
        _check_pattern(body)
        contents.append(f"(?:{_json_safe(body)})")  # grouped: its own top-level '|' stays inside the quotes
    if hi is not None and lo > hi:
        return None
    *looks, content = contents
    return '"' + "".join(f'(?={look}")' for look in looks) + content + '"'


_INT_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _bound_value(schema: dict, key: str) -> int | float | None:
    """A numeric bound's value; None where absent or a draft-4 boolean."""
    import math

    value = schema.get(key)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) >= 10**MAX_BOUND_DIGITS:
        raise _err(f"{key!r} has more than {MAX_BOUND_DIGITS} digits")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(f"{key!r} must be a finite number, got {value!r}")
    if isinstance(value, float) and value and not -MAX_BOUND_DIGITS < math.log10(abs(value)) < MAX_BOUND_DIGITS:
        raise _err(f"{key!r} {value!r} would be written with more than {MAX_BOUND_DIGITS} digits")
    return value


def _integer_bounds(schema: dict) -> tuple[int | None, int | None]:
    """An integer schema's inclusive ``(lowest, highest)`` (None: unbounded), from draft 2020's numeric exclusive
    bounds or draft 4's boolean ones."""
    import math

    lo, hi = _bound_value(schema, "minimum"), _bound_value(schema, "maximum")
    lo = None if lo is None else math.ceil(lo)
    hi = None if hi is None else math.floor(hi)
    if schema.get("exclusiveMinimum") is True and lo is not None:  # draft 4: minimum itself excluded
        lo = lo + 1 if lo == schema["minimum"] else lo
    if schema.get("exclusiveMaximum") is True and hi is not None:
        hi = hi - 1 if hi == schema["maximum"] else hi
    ex_lo, ex_hi = _bound_value(schema, "exclusiveMinimum"), _bound_value(schema, "exclusiveMaximum")
    if ex_lo is not None:
        lo = max(lo if lo is not None else -math.inf, math.floor(ex_lo) + 1)
    if ex_hi is not None:
        hi = min(hi if hi is not None else math.inf, math.ceil(ex_hi) - 1)
    if lo is not None and hi is not None and lo > hi:
        raise _err(f"no integer lies within the bounds {lo}..{hi}")
    return lo, hi


_Bound = tuple[Decimal, bool] | None  # (value, inclusive); None: unbounded


def _number_bounds(schema: dict) -> tuple[_Bound, _Bound]:
    """A number schema's ``(lower, upper)`` bounds as exact decimals with their inclusiveness. A float bound is taken
    as its shortest decimal (``0.1`` is 0.1, as a validator comparing parsed floats sees it)."""

    def decimal(value: int | float) -> Decimal:
        return Decimal(value) if isinstance(value, int) else Decimal(repr(value))

    def tighter(a: _Bound, b: _Bound, upper: bool) -> _Bound:
        if a is None or b is None:
            return a or b
        if a[0] != b[0]:
            return a if (a[0] < b[0]) == upper else b
        return a if not a[1] else b  # equal values: the exclusive one

    lower = upper = None
    for key, is_upper in (("minimum", False), ("maximum", True)):
        value = _bound_value(schema, key)
        if value is not None:  # draft 4 marks the bound itself exclusive with a boolean
            inclusive = schema.get("exclusiveMaximum" if is_upper else "exclusiveMinimum") is not True
            bound = (decimal(value), inclusive)
            lower, upper = (lower, bound) if is_upper else (bound, upper)
    ex_lo, ex_hi = _bound_value(schema, "exclusiveMinimum"), _bound_value(schema, "exclusiveMaximum")
    if ex_lo is not None:
        lower = tighter(lower, (decimal(ex_lo), False), upper=False)
    if ex_hi is not None:
        upper = tighter(upper, (decimal(ex_hi), False), upper=True)
    if lower and upper and (lower[0] > upper[0] or (lower[0] == upper[0] and not (lower[1] and upper[1]))):
        raise _err(f"no number lies within the bounds {lower[0]}..{upper[0]}")
    return lower, upper


def number_range_regex(lower: _Bound, upper: _Bound) -> str:
    """A regex whose full matches are the JSON numbers without an exponent (``-0`` excluded) between ``lower`` and
    ``upper``, each ``(Decimal value, inclusive)`` or None for an unbounded side. Trailing zeros of a fraction are
    allowed (``0.50`` is 0.5), as JSON allows them.

    Example:
        >>> from decimal import Decimal
        >>> regex = number_range_regex((Decimal(0), True), (Decimal(1), False))
        >>> import re; [t for t in ("0", "0.999", "1", "1.0", "-0.5", "0.5e1") if re.fullmatch(regex, t)]
        ['0', '0.999']
    """
    parts = []
    if upper is None or upper[0] > 0 or (upper[0] == 0 and upper[1]):  # the non-negative part
        parts += _unsigned_range(lower if lower is not None and lower[0] >= 0 else (Decimal(0), True), upper)
    if lower is None or lower[0] < 0:  # "-" and magnitudes in (0 or -upper, -lower]: -0 belongs to the part above
        floor = (-upper[0], upper[1]) if upper is not None and upper[0] < 0 else (Decimal(0), False)
        magnitudes = _unsigned_range(floor, None if lower is None else (-lower[0], lower[1]))
        parts += ["-" + (p if "|" not in p else f"(?:{p})") for p in magnitudes]
    return "(?:" + "|".join(parts) + ")"


def _digits(value: Decimal) -> tuple[int, str]:
    """A non-negative decimal's integer part and its fraction's digits without trailing zeros."""
    whole, _, fraction = format(value, "f").partition(".")
    return int(whole), fraction.rstrip("0")


_ANY_FRACTION = r"(?:\.[0-9]+)?"


def _unsigned_range(lower: tuple[Decimal, bool], upper: _Bound) -> list[str]:
    """Alternatives matching the unsigned decimals (integer part without leading zeros, optional fraction) in the
    range; ``lower`` is at least 0."""
    low_int, low_frac = _digits(lower[0])
    high_int, high_frac = (None, None) if upper is None else _digits(upper[0])
    out = []

    def whole(integer: int, fractions: tuple[bool, list[str]]) -> None:
        empty_ok, alts = fractions
        if alts:
            out.append(str(integer) + r"(?:\.(?:" + "|".join(alts) + "))" + ("?" if empty_ok else ""))
        elif empty_ok:
            out.append(str(integer))

    if low_int == high_int:
        whole(low_int, _fractions(low_frac, lower[1], high_frac, upper[1]))
        return out
    whole(low_int, _fractions(low_frac, lower[1], None, True))
    if high_int is None or low_int + 1 <= high_int - 1:
        middle = _magnitudes(low_int + 1, None if high_int is None else high_int - 1)
        out.append((middle[0] if len(middle) == 1 else "(?:" + "|".join(middle) + ")") + _ANY_FRACTION)
    if high_int is not None:
        whole(high_int, _fractions("", True, high_frac, upper[1]))
    return out


def _fractions(low: str, low_inclusive: bool, high: str | None, high_inclusive: bool) -> tuple[bool, list[str]]:
    """The digit strings S after a decimal point (S empty: no point) whose value 0.S lies between 0.low and 0.high
    (None: below 1, unbounded within the integer): whether S may be empty, and alternatives for non-empty S. ``low``
    and ``high`` have no trailing zeros; each step fixes one digit of S, so the recursion is as deep as the longer."""
    if high is None and not low:
        return (True, ["[0-9]+"]) if low_inclusive else (False, ["0*[1-9][0-9]*"])
    if high == "":  # value 0 above: only zeros, if 0 itself is in the range
        return (True, ["0+"]) if not low and low_inclusive and high_inclusive else (False, [])
    low_digit = int(low[0]) if low else 0
    high_digit = int(high[0]) if high is not None else 9
    runs: list[tuple[tuple, list[int]]] = []  # consecutive digits that share what may follow them
    for d in range(low_digit, high_digit + 1):
        low_tight = d == low_digit and (bool(low) or not low_inclusive)
        high_tight = high is not None and d == high_digit
        empty_ok, rest = _fractions(low[1:] if low_tight else "", low_inclusive if low_tight else True,
                                    high[1:] if high_tight else None, high_inclusive)
        if runs and runs[-1][0] == (empty_ok, tuple(rest)):
            runs[-1][1].append(d)
        else:
            runs.append(((empty_ok, tuple(rest)), [d]))
    alts = []
    for (empty_ok, rest), ds in runs:
        digit = str(ds[0]) if len(ds) == 1 else f"[{ds[0]}-{ds[-1]}]"
        if rest == ("[0-9]+",) and empty_ok:
            alts.append(digit + "[0-9]*")
        elif rest:
            alts.append(digit + "(?:" + "|".join(rest) + ")" + ("?" if empty_ok else ""))
        elif empty_ok:
            alts.append(digit)
    return (not low and low_inclusive), alts


def integer_range_regex(lo: int | None, hi: int | None) -> str:
    """A regex whose full matches are the JSON integers (no leading zeros, ``-0`` excluded) in ``[lo, hi]``; None
    for an unbounded side.

    Example:
        >>> integer_range_regex(0, 120)
        '(?:[0-9]|[1-9][0-9]|1[0-1][0-9]|120)'
        >>> import re; [n for n in range(-30, 30) if re.fullmatch(integer_range_regex(-12, 7), str(n))] == list(range(-12, 8))
        True
    """
    parts = []
    if hi is None or hi >= 0:  # the non-negative part
        parts += _magnitudes(max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:  # the negative part: "-" and the magnitudes of [lo, min(hi, -1)]
        top = -lo if lo is not None else None
        bottom = 1 if hi is None or hi >= 0 else -hi
        parts += ["-" + (p if "|" not in p else f"(?:{p})") for p in _magnitudes(bottom, top)]
    return "(?:" + "|".join(parts) + ")"


def _magnitudes(lo: int, hi: int | None) -> list[str]:
    """Alternatives whose full matches are the decimal numbers without leading zeros in ``[lo, hi]`` (``lo >= 0``;
    None: unbounded)."""
    out = []
    top = len(str(lo)) if hi is None else len(str(hi))
    for digits in range(len(str(lo)), top + 1):
        a = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
        b = 10 ** digits - 1 if hi is None else min(hi, 10 ** digits - 1)
        if a <= b:
            out += _same_length(str(a), str(b))
    if hi is None:  # every longer number
        out.append(f"[1-9][0-9]{{{top},}}")
    return out


def _same_length(lo: str, hi: str) -> list[str]:
    """Alternatives matching the digit strings of one length from ``lo`` to ``hi`` (``lo <= hi``)."""
    if not lo:
        return [""]
    if lo[0] == hi[0]:
        return [lo[0] + rest for rest in _same_length(lo[1:], hi[1:])]
    n = len(lo) - 1
    out, first, last = [], int(lo[0]), int(hi[0])
    if lo[1:] != "0" * n:  # lo's first digit with the rest from lo's up: its own alternatives
        out += [lo[0] + rest for rest in _same_length(lo[1:], "9" * n)]
        first += 1
    whole_last = hi[1:] == "9" * n  # hi's first digit takes every rest: it joins the middle digits
    middle = last if whole_last else last - 1
    if first <= middle:
        digit = str(first) if first == middle else f"[{first}-{middle}]"
        out.append(digit + ("" if n == 0 else "[0-9]" if n == 1 else f"[0-9]{{{n}}}"))
    if not whole_last:
        out += [hi[0] + rest for rest in _same_length("0" * n, hi[1:])]
    return out


def schema_to_regex(schema: dict | bool | str, whitespace_pattern: str | None = None, max_depth: int = 4) -> str:
    """Regex whose full matches are the JSON texts valid under `schema` (a dict, bool or JSON string).

    `whitespace_pattern` is the whitespace allowed between tokens (default: at most one space);
    `max_depth` bounds free-form nesting and `$ref` recursion. Unsupported schemas raise ValueError
    with a message starting "structured_outputs.json:".

    >>> r = schema_to_regex({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    >>> bool(re.fullmatch(r, '{"n": 3}')), bool(re.fullmatch(r, '{}'))
    (True, False)
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise _err(f"schema is not valid JSON: {e}") from None
    try:
        regex = _Converter(schema, _ws(whitespace_pattern), max_depth).convert(schema, 0)
    except RecursionError:
        raise _err("the schema nests too deeply") from None
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
        # A keyword of the wrong JSON type ('properties': 5, 'required': [[1]], 'allOf': [5]) fails where it is
        # used; said as the schema's fault, not the server's.
        raise _err(f"malformed schema ({type(e).__name__}: {e})") from None
    if regex is None:
        raise _err("the schema admits no value (false schema, empty enum, or $ref recursion past max_depth)")
    return regex
