"""`Request.extend` (a decode call's run of tokens at once) against `Request.append` one token
at a time: the same tokens kept, log-probabilities (top ones too, when given), finish reason and
count taken, for any mix of stop ids, EOS, `ignore_eos`, `min_tokens` and `max_tokens`, over
several calls."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.request import Request
from jaxserve.sampling import SamplingParams

VOCAB = 6  # a small vocabulary, so stop ids and EOS turn up often


def make(params: SamplingParams) -> Request:
    return Request("r", [1, 2], params, None, eos_ids=(0,))


@settings(max_examples=300, deadline=None)
@given(max_tokens=st.integers(1, 12), min_tokens=st.integers(0, 6), ignore_eos=st.booleans(),
       stop_ids=st.lists(st.integers(0, VOCAB - 1), max_size=2),
       calls=st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=5), min_size=1, max_size=5),
       with_tops=st.booleans())
def test_extend_equals_one_append_a_token(max_tokens, min_tokens, ignore_eos, stop_ids, calls, with_tops):
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens),
                            ignore_eos=ignore_eos, stop_token_ids=stop_ids)
    one, run = make(params), make(params)
    for tokens in calls:
        logprobs = [-0.5 * t for t in tokens]
        tops = [{t: -0.5 * t, t + 1: -1.0} for t in tokens] if with_tops else None
        taken = 0
        for k, (token, logprob) in enumerate(zip(tokens, logprobs)):
            if one.finish_reason is not None:
                break
            one.append(token, logprob, tops[k] if with_tops else None)
            taken += 1
        assert run.extend(tokens, logprobs, tops) == taken
        assert (run.output_ids, run.output_logprobs, run.top_logprobs, run.finish_reason, run.stop_reason,
                run.new_token_count) == (one.output_ids, one.output_logprobs, one.top_logprobs,
                                         one.finish_reason, one.stop_reason, one.new_token_count)
        assert (run.first_token_time is None) == (one.first_token_time is None)


def test_extend_stops_at_the_first_stop_id_past_min_tokens():
    r = make(SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[4]))
    assert r.extend([4, 3, 4, 5], [0.0] * 4) == 3  # the first 4 is within min_tokens
    assert r.output_ids == [4, 3, 4] and r.finish_reason == "stop"
    assert r.extend([1, 2], [0.0, 0.0]) == 0


def test_extend_with_stop_strings_takes_the_per_token_path():
    # No detokenizer here: stop strings never match, so only max_tokens ends the request.
    r = make(SamplingParams(max_tokens=3, stop=["x"]))
    assert r.extend([1, 2, 3, 4], [0.0] * 4) == 3 and r.finish_reason == "length"


class _CharDetokenizer:
    """Token t is the character chars[t]: stop strings without a real tokenizer."""

    def __init__(self, chars: str) -> None:
        self.chars = chars

    def push(self, token: int) -> str:
        return self.chars[token]

    def flush(self) -> str:
        return ""


def test_a_stop_string_made_within_min_tokens_never_stops_the_request_later():
    # vLLM ignores stop strings until min_tokens and then looks, for each stop string, only where it
    # could end in the new text: the "x" made by the first two tokens must not end the request at the
    # third one just because a longer stop string widens the search window.
    r = Request("r", [1], SamplingParams(max_tokens=4, min_tokens=2, stop=["x", "long stop"]),
                _CharDetokenizer("axbc"), eos_ids=(9,))
    r.extend([0, 1, 2, 3], [0.0] * 4)
    assert (r.text, r.finish_reason) == ("axbc", "length")
    r = Request("r", [1], SamplingParams(max_tokens=4, min_tokens=2, stop=["x", "long stop"]),
                _CharDetokenizer("abxc"), eos_ids=(9,))
    r.extend([0, 1, 2, 3], [0.0] * 4)
    assert (r.text, r.finish_reason) == ("ab", "stop")


def test_stop_reason_names_the_stop_string_or_id_and_not_eos():
    # vLLM's CompletionOutput.stop_reason: the stop string or stop id that ended the request; None
    # for EOS and for every other finish.
    r = make(SamplingParams(max_tokens=10, stop_token_ids=[4]))
    r.extend([3, 4], [0.0, 0.0])
    assert (r.finish_reason, r.stop_reason, r.result()["stop_reason"]) == ("stop", 4, 4)
    r = make(SamplingParams(max_tokens=10, stop_token_ids=[4]))
    r.extend([3, 0], [0.0, 0.0])  # EOS
    assert (r.finish_reason, r.stop_reason) == ("stop", None)
    r = make(SamplingParams(max_tokens=2))
    r.extend([3, 3], [0.0, 0.0])
    assert (r.finish_reason, r.stop_reason) == ("length", None)
    r = Request("r", [1], SamplingParams(max_tokens=9, stop=["cd", "bc"]), _CharDetokenizer("abcdef"), eos_ids=(9,))
    r.extend([0, 1, 2, 3, 4], [0.0] * 5)
    assert (r.text, r.finish_reason, r.stop_reason) == ("a", "stop", "bc")


def test_include_stop_str_in_output_keeps_the_stop_string_and_nothing_after_it():
    params = SamplingParams(max_tokens=9, stop=["cd"], include_stop_str_in_output=True)
    r = Request("r", [1], params, _CharDetokenizer("abcdef"), eos_ids=(9,))
    r.extend([0, 1, 2, 3, 4], [0.0] * 5)
    assert (r.text, r.finish_reason, r.stop_reason) == ("abcd", "stop", "cd")


class _CharDetokenizerMany(_CharDetokenizer):
    """`_CharDetokenizer` with the batch call requests without stop strings make (`Request.sync_text`)."""

    def push_many(self, tokens: list[int]) -> str:
        return "".join(self.chars[t] for t in tokens)


def test_include_stop_str_in_output_keeps_the_stop_token_s_text_too():
    # vLLM's detokenizer leaves out the text of the token that stopped the request (a stop id or EOS) only without
    # include_stop_str_in_output; with it the text is there (a special token's none, under skip_special_tokens).
    for stop in ([], ["zz"]):  # the batch path (text when read) and the per-token one (stop strings)
        for include, text in ((False, "abc"), (True, "abcd")):
            params = SamplingParams(max_tokens=9, stop=stop, stop_token_ids=[3], include_stop_str_in_output=include)
            r = Request("r", [1], params, _CharDetokenizerMany("abcdef"), eos_ids=(4,))
            r.extend([0, 1, 2, 3, 5], [0.0] * 5)
            assert (r.result()["text"], r.finish_reason, r.stop_reason) == (text, "stop", 3)
            r = Request("r", [1], params, _CharDetokenizerMany("abcdef"), eos_ids=(4,))
            r.extend([0, 1, 4, 5], [0.0] * 4)  # EOS: no stop_reason, its text as a stop id's
            assert (r.result()["text"], r.stop_reason) == (text[:2] + "e" * include, None)
    # A stop string the stop token's text completes is the stop_reason (vLLM checks the text after the token).
    params = SamplingParams(max_tokens=9, stop=["cd"], stop_token_ids=[3], include_stop_str_in_output=True)
    r = Request("r", [1], params, _CharDetokenizerMany("abcdef"), eos_ids=(4,))
    r.extend([0, 1, 2, 3, 5], [0.0] * 5)
    assert (r.result()["text"], r.finish_reason, r.stop_reason) == ("abcd", "stop", "cd")


def test_a_stream_holds_back_a_possible_stop_string_s_start_only_where_it_would_be_cut():
    # vLLM's stop_buffer_length: len(longest stop) - 1 characters held back while running, none with
    # include_stop_str_in_output (the stop string is then output, so nothing streamed can turn out to be cut).
    for include, first in ((False, ""), (True, "ab")):
        params = SamplingParams(max_tokens=9, stop=["xyz"], include_stop_str_in_output=include)
        r = Request("r", [1], params, _CharDetokenizer("abxyzf"), eos_ids=(9,))
        r.extend([0, 1], [0.0] * 2)
        assert r.take_delta() == (first, 2)
        r.extend([2, 3, 4, 5], [0.0] * 4)
        assert (first + r.take_delta()[0], r.finish_reason) == ("abxyz" if include else "ab", "stop")


def test_of_stop_strings_a_token_s_text_completes_the_one_that_ends_first_stops_it():
    # vLLM's check_stop_strings: the match that completes earliest in the text, ties to the first listed; as if the
    # text had come a character at a time (a starts-first rule took "abc" here and cut the "a" as well).
    for stop, text, reason in ((["abc", "b"], "a", "b"), (["b", "abc"], "a", "b"), (["ab", "a"], "", "a"),
                               (["a", "xa"], "", "a"), (["bc", "abc"], "a", "bc")):
        r = Request("r", [1], SamplingParams(max_tokens=4, stop=stop), _CharDetokenizer(["abc", "d"]), eos_ids=(9,))
        r.extend([0, 1], [0.0] * 2)
        assert (r.text, r.finish_reason, r.stop_reason) == (text, "stop", reason), stop
    r = Request("r", [1], SamplingParams(max_tokens=4, stop=["abc", "b"], include_stop_str_in_output=True),
                _CharDetokenizer(["abc", "d"]), eos_ids=(9,))
    r.extend([0, 1], [0.0] * 2)
    assert (r.text, r.stop_reason) == ("ab", "b")


def test_only_the_tokenizer_s_eos_ends_a_request_unnamed():
    # vLLM's check_stop tests its EOS (the tokenizer's) before the stop ids: no stop_reason for it even where the
    # request lists it; the model's other EOS ids (generation_config.json's) are stop ids there, named.
    def run(params: SamplingParams, token: int) -> Request:
        r = Request("r", [1], params, None, eos_ids=(0, 5), named_eos=frozenset({5}))
        r.extend([3, token], [0.0, 0.0])
        return r

    assert run(SamplingParams(max_tokens=9), 0).stop_reason is None
    assert run(SamplingParams(max_tokens=9, stop_token_ids=[0]), 0).stop_reason is None
    assert run(SamplingParams(max_tokens=9), 5).stop_reason == 5
    # With ignore_eos no id is vLLM's EOS: a listed one is a stop id like any other, the others stop nothing.
    r = run(SamplingParams(max_tokens=9, stop_token_ids=[0], ignore_eos=True), 0)
    assert (r.finish_reason, r.stop_reason) == ("stop", 0)
    assert run(SamplingParams(max_tokens=9, ignore_eos=True), 5).finish_reason is None
