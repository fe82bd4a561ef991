"""schema_to_regex / json_value_regex / json_object_regex: full matches are the JSON texts valid under
the schema (compact, or with one space after `,` / `:`), and the regexes stay in the DFA's subset."""

from __future__ import annotations

import functools
import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.json_schema import JSON_VALUE_DEPTH, json_object_regex, json_value_regex, schema_to_regex

_SETTINGS = settings(max_examples=150, deadline=None, database=None)

# Escapes the byte-level DFA accepts after a backslash (\u takes four hex digits).
_DFA_ESCAPES = set("\\.*+?()[]{}|^$/\"-ntrdws")


def in_dfa_subset(regex: str) -> bool:
    """Independent check of the DFA's subset: known escapes only, (?: and (?= as the only (? groups, no anchors."""
    i, in_class = 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            nxt = regex[i + 1 : i + 2]
            if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", regex[i + 2 : i + 6]):
                i += 6
                continue
            if nxt not in _DFA_ESCAPES:
                return False
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 1 + regex.startswith("^", i + 1)
            continue
        elif c in "^$" or (regex.startswith("(?", i) and not regex.startswith(("(?:", "(?="), i)):
            return False
        i += 1
    re.compile(regex)
    return True


def texts(instance) -> list[str]:
    """The instance compact, with json.dumps' default `, `/`: ` separators, and with raw non-ASCII."""
    return [
        json.dumps(instance, separators=(",", ":")),
        json.dumps(instance),
        json.dumps(instance, separators=(",", ":"), ensure_ascii=False),
    ]


def accepts(regex: str, instance) -> bool:
    results = {re.fullmatch(regex, t) is not None for t in texts(instance)}
    assert len(results) == 1, f"separators/escaping change the verdict for {instance!r}"
    return results.pop()


def to_regex(schema, **kw) -> str:
    regex = schema_to_regex(schema, **kw)
    assert in_dfa_subset(regex), regex
    return regex


FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "nothing": {"type": "null"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "kind": {"enum": ["a", "b", 3, None]},
        "meta": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    },
    "required": ["name", "age"],
}
FLAT_VALID = {"name": "Ann \"Q\" \\ \n\u00e9", "age": -12, "score": 1.5e-3, "active": True, "nothing": None,
              "tags": ["x", ""], "kind": 3, "meta": {"x": 0}}


def test_flat_object_valid_and_invalid():
    regex = to_regex(FLAT)
    assert accepts(regex, FLAT_VALID)
    assert accepts(regex, {"name": "", "age": 0})
    assert accepts(regex, {"name": "n", "age": 1, "kind": None, "meta": {"x": 5}})
    invalid = [
        {"age": 1},  # missing required
        {"name": "n"},
        {"name": 1, "age": 1},  # wrong types
        {"name": "n", "age": 1.5},
        {"name": "n", "age": 1, "active": "true"},
        {"name": "n", "age": 1, "tags": [1]},
        {"name": "n", "age": 1, "meta": {}},
        {"name": "n", "age": 1, "kind": "c"},  # enum outside
        {"name": "n", "age": 1, "extra": 1},  # extra key
        {"age": 1, "name": "n"},  # properties come in the schema's order
    ]
    for instance in invalid:
        assert not accepts(regex, instance), instance
    assert not re.fullmatch(regex, '{"name":"n","age":01}')
    assert not re.fullmatch(regex, '{"name":"n","age":1,}')
    assert not re.fullmatch(regex, '{"name":"n",  "age":1}')  # at most one space
    assert not re.fullmatch(regex, '{"name" :"n" ,"age":1}')  # none before ':' or ','


@pytest.mark.parametrize("required", [[], ["a"], ["b"], ["d"], ["a", "c"], ["b", "c", "d"]])
def test_every_subset_of_optional_properties(required):
    props = {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}, "d": {"type": "null"}}
    values = {"a": 7, "b": "s", "c": False, "d": None}
    regex = to_regex({"type": "object", "properties": props, "required": required})
    for n in range(5):
        for keys in itertools.combinations(props, n):
            assert accepts(regex, {k: values[k] for k in keys}) == (set(required) <= set(keys)), keys
    assert not accepts(regex, {**values, "e": 1})
    assert not re.fullmatch(regex, '{"a":7,,"b":"s","c":false,"d":null}')


def test_ten_optional_properties_stay_small():
    props = {f"p{i}": {"type": ["string", "integer", "null"]} for i in range(10)}
    regex = to_regex({"type": "object", "properties": props})
    assert len(regex) < 20_000
    for keys in itertools.combinations(props, 3):
        assert accepts(regex, {k: i for i, k in enumerate(keys)})
    assert accepts(regex, {}) and accepts(regex, {k: "v" for k in props})
    assert not accepts(regex, {"p1": 1, "p0": 1})


def test_nested_object_and_arrays():
    schema = {
        "type": "object",
        "properties": {
            "points": {"type": "array", "items": {"type": "object", "properties": {
                "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}, "minItems": 1},
            "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        },
        "required": ["points"],
    }
    regex = to_regex(schema)
    assert accepts(regex, {"points": [{"x": 1, "y": -2.5}], "grid": [[1, 2], [], [3]]})
    assert not accepts(regex, {"points": []})
    assert not accepts(regex, {"points": [{"x": 1}]})
    assert not accepts(regex, {"points": [{"x": 1, "y": 2}], "grid": [1]})


@pytest.mark.parametrize("lo,hi", [(0, None), (0, 0), (0, 1), (1, 3), (2, 2), (3, None)])
def test_array_min_max_items(lo, hi):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": lo}
    if hi is not None:
        schema["maxItems"] = hi
    regex = to_regex(schema)
    for n in range(6):
        assert accepts(regex, list(range(n))) == (lo <= n and (hi is None or n <= hi)), n
    assert not accepts(regex, ["x"] * max(lo, 1))


def test_enum_and_const():
    regex = to_regex({"enum": ["red", "café", 1.5, True, None, {"a": [1, 2]}, "a.b*"]})
    for v in ["red", "café", 1.5, True, None, {"a": [1, 2]}, "a.b*"]:
        assert accepts(regex, v), v
    for v in ["Red", "cafe", 1, False, "", {"a": [1]}, "aXb*", "a.bbb"]:
        assert not accepts(regex, v), v
    const = to_regex({"const": {"k": "v", "n": [None]}})
    assert accepts(const, {"k": "v", "n": [None]}) and not accepts(const, {"k": "v", "n": []}) and not accepts(const, {})


def test_any_of_one_of_type_lists_and_siblings():
    regex = to_regex({"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1}]})
    assert accepts(regex, 5) and accepts(regex, ["a"]) and not accepts(regex, ["a", "b"]) and not accepts(regex, "5")
    optional = to_regex({"oneOf": [{"type": "string", "maxLength": 2}, {"type": "null"}], "title": "T", "default": None})
    assert accepts(optional, "ab") and accepts(optional, None) and not accepts(optional, "abc")
    listed = to_regex({"type": ["boolean", "null", "string"], "minLength": 1})
    assert all(accepts(listed, v) for v in [True, None, "x"]) and not accepts(listed, "") and not accepts(listed, 0)
    merged = to_regex({"type": "object", "properties": {"a": {"type": "integer"}},
                       "anyOf": [{"required": ["a"]}, {"properties": {"a": {"type": "integer"}}}]})
    assert accepts(merged, {"a": 1}) and accepts(merged, {})
    assert accepts(to_regex({"allOf": [{"type": "integer"}], "description": "d"}), 3)


def test_ref_defs_definitions_and_json_string():
    schema = {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"$ref": "#/definitions/Coord"}}, "required": ["x"]}},
        "definitions": {"Coord": {"type": "integer"}},
        "type": "array", "items": {"$ref": "#/$defs/Point"},
    }
    for s in (schema, json.dumps(schema)):
        regex = to_regex(s)
        assert accepts(regex, [{"x": 1}, {"x": 2}]) and not accepts(regex, [{"x": "1"}])


def test_recursive_ref_is_cut_off_at_max_depth():
    tree = {"$defs": {"Node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}, "required": ["v"]}},
        "$ref": "#/$defs/Node"}

    def chain(depth):
        return {"v": depth} if depth == 1 else {"v": depth, "kids": [chain(depth - 1)]}

    regex = to_regex(tree, max_depth=3)
    assert accepts(regex, chain(3)) and accepts(regex, {"v": 1, "kids": []})
    assert not accepts(regex, chain(4))
    with pytest.raises(ValueError, match="^structured_outputs.json:.*recursion"):
        schema_to_regex({"$defs": {"L": {"type": "object", "properties": {"next": {"$ref": "#/$defs/L"}},
                                          "required": ["next"]}}, "$ref": "#/$defs/L"})


def test_strings_lengths_patterns_formats():
    regex = to_regex({"type": "string", "minLength": 2, "maxLength": 3})
    for s, ok in [("a", False), ("ab", True), ('\\"\n', True), ("\u00e9\u00e9", True), ("abcd", False)]:
        assert accepts(regex, s) == ok, s
    pattern = to_regex({"type": "string", "pattern": r"^[A-Z]{2}-\d+$"})
    assert accepts(pattern, "AB-12") and not accepts(pattern, "ab-12") and not accepts(pattern, "xAB-1")
    formats = {
        "date-time": ("2024-02-29T23:59:59.123Z", "2024-13-01T00:00:00Z"),
        "date": ("1999-12-31", "1999-12-32"),
        "time": ("08:30:00.5+02:00", "24:00:00Z"),
        "uuid": ("123e4567-e89b-12d3-a456-426614174000", "123e4567e89b12d3a456426614174000"),
        "email": ("a.b+c@ex-ample.co.uk", "not-an-email"),
    }
    # A pattern's "any character" forms stay inside what a JSON string holds raw: a negated class or "." had let a
    # model write raw quotes and control characters (no JSON parser reads those strings); \S \D \W are taken.
    email = to_regex({"type": "string", "pattern": "^[^@]{1,6}@[^@.]{1,6}$"})
    assert accepts(email, "ab@cd") and accepts(email, "a.b@cd")
    for raw in ('"a"b@cd"', '"a\x19b@cd"', '"ab@c\\d"', '"a\nb@cd"'):
        assert re.fullmatch(email, raw) is None, raw
    assert re.fullmatch(to_regex({"type": "string", "pattern": "^.+$"}), '"a\x01"') is None
    shorthands = to_regex({"type": "string", "pattern": r"^\S+@\D{2}\W\s$"})
    assert accepts(shorthands, "x@ab! ") and accepts(shorthands, "x@ab!\t") and not accepts(shorthands, "x@a1! ")
    assert re.fullmatch(shorthands, '"x"@ab! "') is None
    for fmt, (good, bad) in formats.items():
        regex = to_regex({"type": "string", "format": fmt})
        assert accepts(regex, good) and not accepts(regex, bad), fmt
    assert accepts(to_regex({"type": "string", "format": "hostname"}), "anything")


# Pydantic's Field(pattern=..., max_length=...): the pattern, on the JSON-escaped content as it is alone, and the
# lengths, in decoded characters, hold together. A top-level '|', an escaped '"' and a raw 'é' among them.
_PATTERNS_WITH_LENGTHS = [r"^[ab]*$", r"a[ab\-]*b", r"(?:ab|-|é)+", r'^(?:[ab]|\\")*$', r"[ab]{2,4}|-+"]
_SHORT_STRINGS = ["".join(chars) for n in range(6) for chars in itertools.product('ab-"é', repeat=n)]


@pytest.mark.parametrize("pattern", _PATTERNS_WITH_LENGTHS)
@settings(max_examples=8, deadline=None, database=None)
@given(lo=st.integers(0, 3), span=st.none() | st.integers(0, 2))
def test_a_pattern_with_lengths_takes_exactly_the_strings_that_meet_both(pattern, lo, span):
    """Every string of up to 5 characters over a small alphabet: through the regex (`re`) and the compiled DFA,
    accepted exactly where the pattern fully matches its escaped content and its length is within the bounds."""
    from jaxserve.structured import compile_regex

    hi = None if span is None else lo + span
    regex = to_regex({"type": "string", "pattern": pattern, "minLength": lo, **({"maxLength": hi} if span is not None
                                                                                 else {})})
    try:
        dfa = compile_regex(regex)
    except ValueError as e:  # the pattern's strings are all too long (or short): then no string below is taken
        assert "matches nothing" in str(e) and hi is not None
        dfa = None
    body = pattern.removeprefix("^").removesuffix("$")
    for s in _SHORT_STRINGS:
        text = json.dumps(s, ensure_ascii=False)
        want = re.fullmatch(body, text[1:-1]) is not None and lo <= len(s) and (hi is None or len(s) <= hi)
        assert (re.fullmatch(regex, text) is not None) == want, (pattern, lo, hi, text)
        assert (dfa is not None and dfa.fullmatch(text)) == want, (pattern, lo, hi, text)


def test_lengths_beside_a_pattern_or_format_count_decoded_characters():
    # An escape is one character: \s is a space or a whitespace escape, and \u00e9 is é.
    spaced = to_regex({"type": "string", "pattern": r"^\S\s\S$", "maxLength": 3})
    assert accepts(spaced, "a\tb") and accepts(spaced, "a b") and not accepts(spaced, "ab")
    newlines = to_regex({"type": "string", "pattern": r"^(?:\w|\\n)+$", "minLength": 2, "maxLength": 2})
    assert accepts(newlines, "a\n") and accepts(newlines, "\n\n")
    assert not accepts(newlines, "ab\n") and not accepts(newlines, "\n")
    accents = to_regex({"type": "string", "pattern": r"^(?:é|\\u00e9)+$", "maxLength": 2})
    assert accepts(accents, "éé") and not accepts(accents, "ééé")
    stamp = to_regex({"type": "string", "format": "date-time", "maxLength": 20})
    assert accepts(stamp, "2024-02-29T23:59:59Z") and not accepts(stamp, "2024-02-29T23:59:59.5Z")
    assert not accepts(stamp, "2024-02-29T23:59Z")  # short, but not a date-time
    email = to_regex({"type": "string", "format": "email", "minLength": 8})
    assert accepts(email, "ab@cd.ef") and not accepts(email, "a@b.cd")
    both = to_regex({"type": "string", "format": "email", "pattern": r"^.*@example\.com$", "maxLength": 16})
    assert accepts(both, "ann@example.com") and not accepts(both, "ann@example.org")
    assert not accepts(both, "annabel@example.com") and not accepts(both, "a b@example.com")
    # Bounds no string meets: an optional property is left out, as with lengths alone.
    never = to_regex({"type": "object", "properties": {
        "a": {"type": "string", "pattern": "a+", "minLength": 3, "maxLength": 2}, "b": {"type": "integer"}}})
    assert accepts(never, {"b": 1}) and not accepts(never, {"a": "aaa"})


def test_a_pattern_times_a_length_past_the_dfa_limit_is_refused(monkeypatch):
    """The product of a pattern's DFA (here ~2^7 states: the 7th character from the end is remembered) and the
    length's is bounded by the DFA's state limit, lowered here so that it trips at a small length: a ValueError, not
    a compile without end (a schema of the size that trips the real limit is refused within seconds)."""
    from jaxserve import structured

    regex = to_regex({"type": "string", "pattern": r"^[ab]*a[ab]{6}$", "maxLength": 20})
    dfa = structured.compile_regex(regex)
    assert dfa.fullmatch('"' + "b" * 13 + 'abbbbbb"') and not dfa.fullmatch('"' + "b" * 14 + 'abbbbbb"')
    monkeypatch.setattr(structured, "MAX_DFA_STATES", 1000)
    with pytest.raises(ValueError, match="too complex .* lookahead's product"):
        structured.compile_regex(regex)


def test_free_form_values_and_json_object():
    value = json_value_regex(2)
    obj = json_object_regex(2)
    assert in_dfa_subset(value) and in_dfa_subset(obj) and in_dfa_subset(json_value_regex())
    for v in [1, -0.5, "s", None, True, [], {}, [1, {"a": 2}], {"a": {"b": 1}}, {"a": [1, "x"]}]:
        assert accepts(value, v), v
        assert accepts(obj, v) == isinstance(v, dict), v
    assert not accepts(value, [[[1]]]) and not accepts(obj, {"a": {"b": [1]}})
    assert accepts(json_object_regex(), {"a": {"b": [{"c": 1}]}})
    assert schema_to_regex({}) == schema_to_regex(True) == json_value_regex(JSON_VALUE_DEPTH)
    assert schema_to_regex({"type": "object"}) == json_object_regex(JSON_VALUE_DEPTH)
    extra = to_regex({"type": "object", "additionalProperties": {"type": "integer"}})
    assert accepts(extra, {}) and accepts(extra, {"a": 1, "b": 2}) and not accepts(extra, {"a": "1"})
    assert accepts(to_regex({"type": "object", "additionalProperties": False}), {})
    required_only = to_regex({"type": "object", "required": ["a"]})  # an undeclared required key takes any value
    assert accepts(required_only, {"a": [1]}) and not accepts(required_only, {}) and not accepts(required_only, {"b": 1})
    assert not accepts(to_regex({"type": "object", "additionalProperties": False}), {"a": 1})


def test_whitespace_pattern():
    regex = to_regex(FLAT, whitespace_pattern=r"[ \n]*")
    assert re.fullmatch(regex, json.dumps(FLAT_VALID, indent=2))
    compact = to_regex(FLAT, whitespace_pattern="")
    assert re.fullmatch(compact, json.dumps(FLAT_VALID, separators=(",", ":")))
    assert not re.fullmatch(compact, json.dumps(FLAT_VALID))


@pytest.mark.parametrize("bounds", [dict(minimum=0, maximum=120), dict(minimum=-7), dict(maximum=-3),
                                    dict(minimum=-15, maximum=999), dict(exclusiveMinimum=9, exclusiveMaximum=1000),
                                    dict(minimum=1.5, maximum=12.5),
                                    dict(minimum=3, exclusiveMinimum=True, maximum=9, exclusiveMaximum=True),  # draft 4
                                    dict(minimum=-100, maximum=100, exclusiveMinimum=-101)])
def test_integer_bounds_hold_in_the_regex_and_the_dfa(bounds):
    from jaxserve.structured import compile_regex

    schema = {"type": "object", "properties": {"n": {"type": "integer", **bounds}}, "required": ["n"]}
    regex = to_regex(schema)
    dfa = compile_regex(regex)
    inf = float("inf")
    lo = max(bounds.get("minimum", -inf) + (1 if bounds.get("exclusiveMinimum") is True else 0),
             bounds["exclusiveMinimum"] + 1 if type(bounds.get("exclusiveMinimum")) is int else -inf)
    hi = bounds.get("maximum", inf) - (1 if bounds.get("exclusiveMaximum") is True else 0)
    hi = min(hi, bounds["exclusiveMaximum"] - 1 if type(bounds.get("exclusiveMaximum")) is int else inf)
    for n in list(range(-1200, 1200)) + [10 ** 6, -(10 ** 6), 10 ** 12]:
        want = lo <= n <= hi
        assert accepts(regex, {"n": n}) == want, (bounds, n)
        assert dfa.fullmatch(json.dumps({"n": n}, separators=(",", ":"))) == want, (bounds, n)
    for text in ('{"n":-0}', '{"n":01}', '{"n":1.0}', '{"n":1e2}'):
        assert not dfa.fullmatch(text)


def test_integer_bounds_that_admit_nothing_are_refused():
    with pytest.raises(ValueError, match="no integer lies within"):
        schema_to_regex({"type": "integer", "minimum": 5, "maximum": 4})
    with pytest.raises(ValueError, match="no integer lies within"):
        schema_to_regex({"type": "integer", "minimum": 1.2, "maximum": 1.8})
    with pytest.raises(ValueError, match="no integer lies within"):
        schema_to_regex({"type": "integer", "minimum": 3, "exclusiveMinimum": True, "maximum": 3})
    with pytest.raises(ValueError, match="'minimum' must be a finite number"):
        schema_to_regex({"type": "integer", "minimum": "1"})


_NUMBER_TEXTS = [f"{sign}{whole}{frac}" for sign in ("", "-") for whole in range(0, 14)
                 for frac in ("", ".0", ".00", ".05", ".050", ".1", ".2", ".25", ".249", ".2500", ".251", ".5", ".9",
                              ".99", ".999")] + ["1e2", "0.5E0", "-0", "01", "1.", ".5"]


@pytest.mark.parametrize("bounds", [dict(minimum=0, maximum=1), dict(minimum=0.25, exclusiveMaximum=3.5),
                                    dict(exclusiveMinimum=-1.25, maximum=12), dict(maximum=-0.05), dict(minimum=-0.05),
                                    dict(exclusiveMinimum=0), dict(exclusiveMaximum=0), dict(minimum=0.1, maximum=0.1),
                                    dict(minimum=-12.999, maximum=-0.25), dict(minimum=0.249, maximum=0.251),
                                    dict(minimum=2, exclusiveMinimum=True, maximum=5, exclusiveMaximum=True),  # draft 4
                                    dict(minimum=1, exclusiveMinimum=1.5, maximum=9.9, exclusiveMaximum=9.5)])
def test_number_bounds_hold_in_the_regex_and_the_dfa(bounds):
    """Every text of a grid of decimals is accepted exactly when its exact value lies within the bounds (checked
    against Decimal comparisons); exponents, -0, leading zeros and bare points are refused under bounds."""
    from decimal import Decimal

    from jaxserve.structured import compile_regex

    schema = {"type": "object", "properties": {"x": {"type": "number", **bounds}}, "required": ["x"]}
    regex = to_regex(schema)
    dfa = compile_regex(regex)

    def bound(key: str, strict_key: str):
        value = bounds.get(key)
        return None if value is None else (Decimal(repr(value)), bounds.get(strict_key) is True)

    lows = [b for b in (bound("minimum", "exclusiveMinimum"),
                        (Decimal(repr(bounds["exclusiveMinimum"])), True)
                        if type(bounds.get("exclusiveMinimum")) in (int, float) else None) if b]
    highs = [b for b in (bound("maximum", "exclusiveMaximum"),
                         (Decimal(repr(bounds["exclusiveMaximum"])), True)
                         if type(bounds.get("exclusiveMaximum")) in (int, float) else None) if b]
    for text in _NUMBER_TEXTS:
        plain = re.fullmatch(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?", text) is not None
        value = Decimal(text) if plain else None
        want = plain and not (text.startswith("-") and value == 0) \
            and all(value > v if strict else value >= v for v, strict in lows) \
            and all(value < v if strict else value <= v for v, strict in highs)
        doc = '{"x":' + text + "}"
        assert (re.fullmatch(regex, doc) is not None) == want, (bounds, text)
        assert dfa.fullmatch(doc) == want, (bounds, text)


def test_number_bounds_that_admit_nothing_are_refused():
    with pytest.raises(ValueError, match="no number lies within"):
        schema_to_regex({"type": "number", "minimum": 1.5, "maximum": 1.25})
    with pytest.raises(ValueError, match="no number lies within"):
        schema_to_regex({"type": "number", "minimum": 2, "exclusiveMaximum": 2})
    with pytest.raises(ValueError, match="'maximum' must be a finite number"):
        schema_to_regex({"type": "number", "maximum": float("inf")})


@pytest.mark.parametrize("schema", [
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 1}],
     "minItems": 2, "maxItems": 2},                                      # pydantic's Tuple[int, str]
    {"type": "array", "prefixItems": [{"type": "integer"}, {"enum": ["a", "b"]}], "items": False},
    {"type": "array", "prefixItems": [{"const": 1}, {"const": 2}], "items": {"type": "boolean"}, "minItems": 1,
     "maxItems": 4},
    {"type": "array", "prefixItems": [{"type": "integer"}, False], "items": {"type": "null"}},
    {"type": "array", "prefixItems": [], "items": {"type": "integer"}, "minItems": 1},
    {"type": "array", "items": [{"type": "null"}, {"type": "boolean"}], "additionalItems": False},  # draft 7
    {"type": "array", "items": [{"type": "integer"}], "minItems": 3, "maxItems": 3},  # the rest: any values
])
def test_tuples_hold_in_the_regex_as_jsonschema_checks_them(schema):
    """prefixItems (draft 2020) and list items + additionalItems (draft 7): every array of up to 5 items drawn from a
    few values is accepted exactly when jsonschema validates it, through the regex and the compiled DFA."""
    jsonschema = pytest.importorskip("jsonschema")
    from jaxserve.structured import compile_regex

    validator = (jsonschema.Draft7Validator if isinstance(schema.get("items"), list)
                 else jsonschema.Draft202012Validator)(schema)
    regex = to_regex(schema)
    dfa = compile_regex(regex)
    values = [1, 2, "a", True, None]
    seen = set()
    for size in range(6):
        for items in itertools.product(values, repeat=size):
            want = validator.is_valid(list(items))
            seen.add(want)
            assert accepts(regex, list(items)) == want, (schema, items)
            assert dfa.fullmatch(json.dumps(list(items), separators=(",", ":"))) == want, (schema, items)
    assert seen == {True, False}


@pytest.mark.parametrize("schema,name", [
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
    ({"type": "array", "prefixItems": [{}], "items": [{}]}, "prefixItems"),
    ({"type": "array", "prefixItems": {}}, "prefixItems"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "null"}}, "not"),
    ({"if": {}, "then": {}}, "if"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "allOf"),
    ({"$ref": "http://example.com/s.json"}, "$ref"),
    ({"$ref": "#/$defs/Missing"}, "$ref"),
    ({"type": "decimal"}, "decimal"),
    ({"type": "string", "pattern": "(?=a)b"}, "pattern"),
    ({"type": "string", "pattern": r"\bx"}, "pattern"),
    ({"type": "string", "pattern": "a", "minLength": 3, "maxLength": 2}, "admits no value"),
    ({"type": "integer", "anyOf": [{"type": "string"}]}, "type"),
    ({"type": "string", "minLength": -1}, "minLength"),
    (False, "admits no value"),
    ({"enum": []}, "admits no value"),
    ("{not json", "not valid JSON"),
    # Keywords of the wrong JSON type fail where they are used: said as the schema's fault (a server's 400).
    ({"type": "object", "properties": 5}, "malformed schema"),
    ({"type": "object", "required": [[1]]}, "malformed schema"),
    ({"type": 5}, "malformed schema"),
    ({"format": {}}, "malformed schema"),
    ({"allOf": [5], "type": "object"}, "malformed schema"),
    ({"$ref": "#/$defs/a", "$defs": {"a": 5}}, "malformed schema"),
    # Bounds written with hundreds of digits (one recursion a digit), and regexes that would take gigabytes:
    # nesting repeats a subschema (30 arrays; a $ref used twice a level, 25 levels).
    ({"type": "integer", "minimum": 10**400}, "digits"),
    ({"type": "number", "minimum": 1e-300, "maximum": 1e-299}, "digits"),
    ({"type": "number", "minimum": 5e-324, "maximum": 1e308}, "digits"),
    (functools.reduce(lambda s, _: {"type": "array", "items": s}, range(30), {"type": "integer"}), "characters"),
    ({"$ref": "#/$defs/d0", "$defs": {**{f"d{i}": {"type": "object", "properties": {
        "x": {"$ref": f"#/$defs/d{i + 1}"}, "y": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(25)},
        "d25": {"type": "integer"}}}, "characters"),
])
def test_unsupported_raise(schema, name):
    with pytest.raises(ValueError, match=r"^structured_outputs\.json:") as info:
        schema_to_regex(schema)
    assert name in str(info.value)


# Random instances of FLAT, and random JSON values checked against jsonschema where it matches.
_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(list(FLAT["properties"]) + ["x", "zz"]) | st.text(max_size=3), inner, max_size=4), max_leaves=10)
_flat_instance = st.fixed_dictionaries(
    {"name": st.text(), "age": st.integers()},
    optional={"score": st.floats(allow_nan=False, allow_infinity=False) | st.integers(), "active": st.booleans(),
              "nothing": st.none(), "tags": st.lists(st.text(max_size=5), max_size=4),
              "kind": st.sampled_from(["a", "b", 3, None]), "meta": st.builds(lambda x: {"x": x}, st.integers())},
).map(lambda d: {k: d[k] for k in FLAT["properties"] if k in d})
_FLAT_REGEX = schema_to_regex(FLAT)


@_SETTINGS
@given(_flat_instance)
def test_random_valid_instances_match(instance):
    assert accepts(_FLAT_REGEX, instance)


def _nesting(value) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(_nesting, children), default=0)


_CHECKED = [(s, schema_to_regex(s)) for s in
            (FLAT, FLAT["properties"]["tags"], {"type": ["integer", "null"]}, {"enum": ["a", 3, None]})]
_VALUE_2, _OBJECT_2 = json_value_regex(2), json_object_regex(2)


@_SETTINGS
@given(_json)
def test_random_values_match_only_if_valid(value):
    jsonschema = pytest.importorskip("jsonschema")
    for schema, regex in _CHECKED:
        if accepts(regex, value):
            jsonschema.validate(value, schema)
    assert accepts(_VALUE_2, value) == (_nesting(value) <= 2)
    assert accepts(_OBJECT_2, value) == (isinstance(value, dict) and _nesting(value) <= 2)
