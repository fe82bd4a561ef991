"""grammar_to_regex: GBNF -> a regex whose full matches are the grammar's texts, recursive rules nested at
most max_depth times; every regex is checked with re.fullmatch and with the engine's byte DFA, which agree."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.grammar import MAX_DEPTH, MAX_REGEX_CHARS, grammar_to_regex
from jaxserve.structured import compile_regex


def check(grammar: str, yes: list[str], no: list[str], **kw) -> str:
    regex = grammar_to_regex(grammar, **kw)
    dfa = compile_regex(regex)
    for s in yes:
        assert re.fullmatch(regex, s), (s, regex)
    for s in no:
        assert not re.fullmatch(regex, s), (s, regex)
    for s in yes + no:
        assert dfa.fullmatch(s) == bool(re.fullmatch(regex, s)), (s, regex)
    return regex


CASES = [
    ('root ::= "hello world"', ["hello world"], ["hello", "hello world!", "", "Hello world"]),
    (r'root ::= "a.b*c+(d)[e]{f}|g^$\\h/-\"&~"', ['a.b*c+(d)[e]{f}|g^$\\h/-"&~'], ["aXb*c+(d)[e]{f}|g^$\\h/-\"&~"]),
    (r'root ::= "\n\t\r\x41\u00e9\U0001F600 \[\]"', ["\n\t\rAé😀 []"], ["\n\t\rA\\u00e9😀 []"]),
    ('root ::= "αβ→" [α-ω]+', ["αβ→γ", "αβ→ωω"], ["αβ→", "αβ→a"]),
    ('root ::= [a-z0-9_]+', ["abc_09", "z"], ["", "A", "a-b", "a b"]),
    (r'root ::= "\"" [^"\\\n]* "\""', ['"abc"', '""', '"é x]"'], ['"a"b"', '"a\\"', '"a\nb"', '"a']),
    (r'root ::= [\]\-\^\[\\]', ["]", "-", "^", "[", "\\"], ["a", "", "]]"]),
    (r'root ::= [\^a] [a\]]', ["^]", "aa", "a]"], ["b]", "^b", "]a"]),
    ('root ::= [-a] [b-] [^^]', ["-b!", "a-x", "ab\n"], ["bb!", "-c!", "ab^"]),
    (r'root ::= [\x00-\x1f&~|]{2}', ["\x00\x1f", "&&", "~|"], ["  ", "&", "a&"]),
    ('root ::= "<" . ">" [^]', ["<a>b", "<\n>\n", "<é>😀", "<😀>]"], ["<>x", "<ab>x", "<a>"]),
    ('root ::= ("ab" | "c") ("d" | "e" "f")', ["abd", "cef", "cd"], ["abe", "ab", "abcd", "cdef"]),
    ('root ::= "a"+? "b"', ["b", "ab", "aab"], ["a", "bb"]),
    ('root ::= "x" (("y")) ()', ["xy"], ["x", "xyy"]),
    ('root ::= "a" | ', ["a", ""], ["aa"]),
    ('root ::= ""', [""], ["a"]),
    ('root ::= "a" ( | "b" | "" )', ["a", "ab"], ["b", "abb"]),
    ('root ::= ("a" | "a" | "b")', ["a", "b"], ["", "ab"]),
    ('root ::= first-part second_part\nfirst-part ::= "x"\nsecond_part ::= "y" | Z9\nZ9 ::= "9"',
     ["xy", "x9"], ["x", "y", "xz"]),
    ("""# a list of items
root ::= item ("," item)*   # comma-separated
item ::=
    "apple"
  | "banana"  # a fruit
  | "cherry-pie" # "quoted # in a comment"
""", ["apple", "banana,apple", "cherry-pie,cherry-pie,banana"], ["", "apple,", "apple,,banana", "pear"]),
    # Newlines after '|', inside parentheses, and (lenient) anywhere before the next `name ::=`.
    ('root ::= ("a" |\n "b")\n  "c"\n "d" |\n "e"\nnext ::= "n"', ["acd", "bcd", "e"], ["ac", "n", "acdn"]),
    ('root::="a"{ 1 , 2 }b\nb::="b"', ["ab", "aab"], ["b", "aaab"]),
]


@pytest.mark.parametrize("grammar,yes,no", CASES)
def test_matches(grammar, yes, no):
    check(grammar, yes, no)


@pytest.mark.parametrize("suffix,lo,hi", [
    ("*", 0, None), ("+", 1, None), ("?", 0, 1), ("{2}", 2, 2), ("{2,}", 2, None), ("{1,3}", 1, 3),
    ("{0,2}", 0, 2), ("{0}", 0, 0), ("{0,0}", 0, 0), ("{1}", 1, 1), ("{ 1 , 2 }", 1, 2),
])
@pytest.mark.parametrize("unit,text", [('"ab"', "ab"), ("[x]", "x"), ('("a" | "b")', "a"), ('"a"?', "a")])
def test_repetition(suffix, lo, hi, unit, text):
    if unit == '"a"?':  # a unit that may be empty: fewer than lo copies too
        lo = 0
    counts = {n for n in range(6) if lo <= n and (hi is None or n <= hi)}
    check(f'root ::= {unit}{suffix} "!"', [text * n + "!" for n in counts],
          [text * n + "!" for n in set(range(6)) - counts])


def test_exact_output():
    assert grammar_to_regex('root ::= "yes" | "no"') == "(?:yes|no)"
    assert grammar_to_regex('root ::= x x\nx ::= [a-c]') == "[a-c][a-c]"
    assert grammar_to_regex('root ::= ("ab")+ x*\nx ::= "a" | "b"') == "(?:ab)+(?:a|b)*"
    assert grammar_to_regex('root ::= "a-b" [\\]-]') == r"a\-b[\]\-]"


def nested(open_: str, inner: str, close: str, k: int) -> str:
    return open_ * k + inner + close * k


@pytest.mark.parametrize("max_depth", [0, 1, 2, MAX_DEPTH])
def test_recursion_depth(max_depth):
    # Content at nesting k of a rule inside itself (the outermost expansion is k=0) exists for k <= max_depth.
    parens = 'root ::= "(" root ")" | ""'
    check(parens, [nested("(", "", ")", k) for k in range(max_depth + 1)],
          [nested("(", "", ")", max_depth + 1), "(()", "())", ")("], max_depth=max_depth)
    array = 'root ::= value\nvalue ::= "[" (value ("," value)*)? "]" | [0-9]+'
    yes = [nested("[", "1", "]", k) for k in range(max_depth + 1)] + ["[]", "7"]
    check(array, yes + (["[1,[2,3],[]]", "[[1],[2]]"] if max_depth >= 2 else []),
          [nested("[", "1", "]", max_depth + 1), "[1,]", "[,]", "[1", ""], max_depth=max_depth)
    mutual = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9] | "(" expr ")"'
    check(mutual, [nested("(", "1+2", ")", k) for k in range(max_depth + 1)],
          [nested("(", "1", ")", max_depth + 1), "1+", "(1"], max_depth=max_depth)


def test_impossible_references_drop_out():
    loop = '\nloop ::= "a" loop'  # no finite derivation at all
    assert grammar_to_regex('root ::= "x" loop* | "y"' + loop) == "(?:x|y)"
    assert grammar_to_regex('root ::= "x" loop? "z"{0,3} loop{0,2}' + loop) == "xz{0,3}"
    assert grammar_to_regex('root ::= "x" loop+ | "y" loop{2,} | "w"' + loop) == "w"
    assert grammar_to_regex('root ::= "x" | [] | "y" []*') == "(?:x|y)"
    with pytest.raises(ValueError, match=r"^grammar: rule 'root' has no finite derivation within max_depth=4"):
        grammar_to_regex('root ::= "a" root')
    with pytest.raises(ValueError, match=r"^grammar: .*'start'.*max_depth=2"):
        grammar_to_regex('start ::= "x" loop' + loop, root="start", max_depth=2)


ARITHMETIC = """
root   ::= ws expr ws
expr   ::= term (ws [-+] ws term)*
term   ::= factor (ws [*/] ws factor)*
factor ::= number | "(" ws expr ws ")" | "-" factor
number ::= [0-9]+ ("." [0-9]+)?
ws     ::= [ \\t]*
"""


def test_realistic_grammar():
    check(ARITHMETIC, ["1", " 1 + 2*(3 - 4.5) ", "-(1)/--2", "((1))", "1\t*\t2"],
          ["", "1 +", "(1", "1 2", "1.", "+1", "((((((1))))))"], max_depth=2)


# llama.cpp's grammars/json.gbnf, as it is.
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""


def test_llama_cpp_json_grammar():
    yes = ['{"a": [1, -2.5e3, "x\\n\\u00e9", true]}', "{}", '{"k":{}}', '{\n  "a" : null }', '{"é": "\\""}']
    check(JSON_GBNF, yes, ['{"a": [[1]]}', "[]", '{"a": 01}', '{"a": "\n"}', '{"a"}', '{"a": 1,}'], max_depth=1)


def test_recursion_nests_as_deep_as_the_regex_cap_allows_by_default():
    # json.gbnf: 2 nestings of value fit MAX_REGEX_CHARS (3 would not): a list in a list in an object, not one more.
    assert grammar_to_regex(JSON_GBNF) == grammar_to_regex(JSON_GBNF, max_depth=2)
    check(JSON_GBNF, ['{"a": [[1]]}', '{"a": {"b": {"c": 1}}}'], ['{"a": [[[1]]]}', '{"a": {"b": {"c": {"d": 1}}}}'])
    assert grammar_to_regex('root ::= "(" root ")" | "x"') == grammar_to_regex('root ::= "(" root ")" | "x"',
                                                                            max_depth=MAX_DEPTH)
    with pytest.raises(ValueError, match=r"^grammar: .*MAX_REGEX_CHARS"):  # too long even without recursion
        grammar_to_regex("root ::= " + " ".join(f'"{i:05d}"' for i in range(MAX_REGEX_CHARS // 5 + 1)))


def test_limits():
    with pytest.raises(ValueError, match=rf"^grammar: .*MAX_REGEX_CHARS \({MAX_REGEX_CHARS}.*max_depth"):
        grammar_to_regex('root ::= "(" root root root root ")" | "x"', max_depth=10)
    with pytest.raises(ValueError, match=r"^grammar: .*MAX_REGEX_CHARS"):  # ~4x the characters a level
        grammar_to_regex(JSON_GBNF, max_depth=MAX_DEPTH)
    with pytest.raises(ValueError, match=r"^grammar: nested too deeply"):
        grammar_to_regex('root ::= "(" root ")" | "x"', max_depth=100_000)
    # Acyclic rules expand once however often they are referenced: 2**40 references, an empty regex.
    chain = "\n".join(f"r{i} ::= r{i + 1} r{i + 1}" for i in range(40))
    assert grammar_to_regex(chain + '\nr40 ::= ""', root="r0") == ""


ERRORS = [
    ('root ::= foo', r"undefined rule 'foo' referenced in rule 'root' at line 1, column 10"),
    ('root ::= "a"\nx ::= y-z', r"undefined rule 'y-z' referenced in rule 'x' at line 2, column 7"),
    ('root ::= "a"\nroot ::= "b"', r"rule 'root' is defined twice, at line 1, column 1 and line 2, column 1"),
    ('item ::= "a"', r"no rule 'root' \(the start rule\)"),
    ('root ::= "abc', r"unterminated string at line 1, column 10"),
    ('root ::= "abc\n"', r"unterminated string at line 1, column 10"),
    ('root ::= "a" [a-z', r"unterminated character class at line 1, column 14"),
    ('root ::= [\\]', r"unterminated character class"),
    ('root ::= "\\q"', r"bad escape '\\\\q' at line 1, column 11"),
    ('root ::= "\\x4g"', r"bad escape '\\\\x4g'"),
    ('root ::= "\\u12"', r"bad escape '\\\\u12\"'"),
    ('root ::= "\\U00110000"', r"bad escape '\\\\U00110000'"),
    ('root ::= [\\d]', r"bad escape '\\\\d'"),
    ('root ::= [\\uD800-\\uDFFF]', r"bad escape '\\\\uD800'"),
    ('root ::= [z-a]', r"bad character range .* at line 1, column 11"),
    ('root ::= "a"{3,1}', r"bad repetition bounds \{3,1\} \(max < min\) at line 1, column 13"),
    ('root ::= "a"{x}', r"expected a number in the repetition"),
    ('root ::= "a"{,2}', r"expected a number in the repetition"),
    ('root ::= "a"{2', r"expected '\}'"),
    ('root ::= "a" @', r"unexpected character '@' at line 1, column 14"),
    ('root ::= "a")', r"unexpected character '\)'"),
    ('root ::= ("a" "b"\nx ::= "c"', r"expected '\)' to close the '\(' at line 1, column 10"),
    ('root ::= *"a"', r"'\*' has nothing to repeat"),
    ('root ::= "a" | +', r"'\+' has nothing to repeat"),
    ('root = "a"', r"expected '::=' after the rule name 'root'"),
    ('"a"', r"expected a rule name, found '\"' at line 1, column 1"),
    ("", r"the grammar is empty"),
    ("  # only a comment\n\n", r"the grammar is empty"),
]


@pytest.mark.parametrize("grammar,message", ERRORS)
def test_errors(grammar, message):
    with pytest.raises(ValueError, match="^grammar: " + message):
        grammar_to_regex(grammar)


def test_argument_errors():
    for value in (None, b'root ::= "a"', ["root ::= 'a'"]):
        with pytest.raises(ValueError, match=r"^grammar: expected the grammar as a string"):
            grammar_to_regex(value)
    for depth in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"^grammar: max_depth must be a non-negative integer"):
            grammar_to_regex('root ::= "a"', max_depth=depth)
    assert grammar_to_regex('start ::= "a"', root="start") == "a"
    with pytest.raises(ValueError, match=r"^grammar: no rule 'main'"):
        grammar_to_regex('root ::= "a"', root="main")


# ----- random non-recursive grammars, rendered as GBNF, and random derivations of them -----------------------
POOL = list("az0 \"\\][-^.*()|#{}&~/$\n\t") + ["é", "😀", "\x01"]


def gbnf_char(c: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "]": "\\]", "[": "\\[", "-": "\\-", "^": "\\^"}
    return escapes.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x20 else c)


@st.composite
def nodes(draw, depth: int, refs: list[int]):
    kinds = ["lit", "set", "any"] + ["ref"] * bool(refs) + ["seq", "alt", "rep"] * (depth > 0)
    kind = draw(st.sampled_from(kinds))
    if kind == "lit":
        return ("lit", "".join(draw(st.lists(st.sampled_from(POOL), max_size=3))))
    if kind == "set":
        ends = draw(st.lists(st.tuples(st.sampled_from(POOL), st.sampled_from(POOL)), min_size=1, max_size=3))
        return ("set", draw(st.booleans()), [tuple(sorted(pair, key=ord)) for pair in ends])
    if kind == "any":
        return ("any",)
    if kind == "ref":
        return ("ref", draw(st.sampled_from(refs)))
    if kind == "rep":
        lo = draw(st.integers(0, 2))
        hi = draw(st.sampled_from([None, lo, lo + 1, lo + 2]))
        return ("rep", draw(nodes(depth - 1, refs)), lo, hi)
    return (kind, draw(st.lists(nodes(depth - 1, refs), min_size=kind == "alt", max_size=3)))


def render(node) -> str:
    kind = node[0]
    if kind == "lit":
        return '"' + "".join(map(gbnf_char, node[1])) + '"'
    if kind == "set":
        return "[" + "^" * node[1] + "".join(gbnf_char(a) + ("-" + gbnf_char(b)) * (a != b) for a, b in node[2]) + "]"
    if kind == "any":
        return "."
    if kind == "ref":
        return f"rule-{node[1]}"
    if kind == "rep":
        lo, hi = node[2], node[3]
        suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi)) or (
            f"{{{lo}}}" if lo == hi else f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}")
        return f"({render(node[1])}){suffix}"
    if kind == "seq":
        return " ".join(f"({render(n)})" if n[0] == "alt" else render(n) for n in node[1])
    return " |\n  ".join(f"({render(n)})" if n[0] == "alt" else render(n) for n in node[1])


def derive(data, node, rules) -> str:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "set":
        inside = [c for c in POOL if any(a <= c <= b for a, b in node[2])]
        # NUL is below every range's start: a negated class always leaves it.
        return data.draw(st.sampled_from([c for c in POOL + ["\x00"] if c not in inside] if node[1] else inside))
    if kind == "any":
        return data.draw(st.sampled_from(POOL))
    if kind == "ref":
        return derive(data, rules[node[1]], rules)
    if kind == "rep":
        count = data.draw(st.integers(node[2], node[3] if node[3] is not None else node[2] + 2))
        return "".join(derive(data, node[1], rules) for _ in range(count))
    if kind == "seq":
        return "".join(derive(data, n, rules) for n in node[1])
    return derive(data, data.draw(st.sampled_from(node[1])), rules)


@st.composite
def grammars(draw):
    n = draw(st.integers(1, 3))
    rules = [None] * n
    for i in reversed(range(n)):  # rule i references only later rules: no recursion
        rules[i] = draw(nodes(2, list(range(i + 1, n))))
    return rules


@settings(max_examples=120, deadline=None, database=None)
@given(grammars(), st.data())
def test_random_derivations_match(rules, data):
    text = "\n".join(f"rule-{i} ::= {render(r)}  # rule {i}" for i, r in enumerate(rules))
    regex = grammar_to_regex(text, root="rule-0")
    dfa = compile_regex(regex)
    s = derive(data, rules[0], rules)
    assert re.fullmatch(regex, s), (text, regex, s)
    assert dfa.fullmatch(s)
    for other in (s + "\x02", s[:-1]):
        assert dfa.fullmatch(other) == bool(re.fullmatch(regex, other)), (text, regex, other)
