"""The incremental detokenizer against transformers' one-shot decode of the same ids."""

from __future__ import annotations

import numpy as np

from jaxserve.loading import load
from jaxserve.tokenizer import IncrementalDetokenizer, token_bytes


def test_incremental_text_equals_one_shot_decode_with_and_without_the_rust_fast_path():
    tokenizer = load().tokenizer  # the embedded default model's byte-level BPE
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    # Random ids split multi-byte characters across tokens and include special tokens.
    ids = rng.integers(0, len(tokenizer), 400).tolist()
    ids += tokenizer.encode("naïve café — 東京 🙂 done", add_special_tokens=False)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    fast = IncrementalDetokenizer(tokenizer)
    slow = IncrementalDetokenizer(tokenizer)
    slow._decode = lambda window: tokenizer.decode(window, skip_special_tokens=True)
    for detok in (fast, slow):
        text = "".join(detok.push(t) for t in ids) + detok.flush()
        assert text == expected, f"seed={seed}"


def test_special_tokens_are_spelled_out_where_they_are_not_skipped():
    """vLLM's skip_special_tokens=False: <|im_start|> and friends in the text, through the detokenizer and a
    request the engine runs (a logit bias forces one)."""
    import jaxserve
    from jaxserve import SamplingParams

    model = load()
    tokenizer = model.tokenizer
    ids = tokenizer.encode("a<|im_start|>b", add_special_tokens=False)
    for skip, expected in ((True, "ab"), (False, "a<|im_start|>b")):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        assert "".join(detok.push(t) for t in ids) + detok.flush() == expected
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for skip in (True, False):
        params = SamplingParams(max_tokens=3, temperature=0, logit_bias={start: 100}, skip_special_tokens=skip)
        out = jaxserve.generate(model, ["x = "], params, use_tqdm=False)[0]
        assert out["token_ids"] == [start] * 3 and out["text"] == ("" if skip else "<|im_start|>" * 3), out


def test_a_run_ending_inside_a_character_still_releases_the_text_before_it():
    tokenizer = load().tokenizer
    ids = tokenizer.encode("the cat 🙂", add_special_tokens=False)
    split = next(i for i in range(len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer)
    # Pushed one by one, everything before the split character comes out; so must a run.
    before = tokenizer.decode(ids[:split - 1])
    assert detok.push_many(ids[:split]) == before
    assert detok.push_many(ids[split:]) + detok.flush() == tokenizer.decode(ids)[len(before):]


def test_a_character_split_between_prompt_and_output_leaves_no_replacement_character():
    """A token-id prompt may end inside a character that the output completes: decoded after the
    prompt's last tokens (vLLM's rule), the character stays with the prompt, and the output's text
    starts after it instead of with U+FFFD for its orphaned bytes."""
    tokenizer = load().tokenizer
    ids = tokenizer.encode("the cat 東京 🙂 done", add_special_tokens=False)
    split = next(i for i in range(len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=ids[:split])
    assert "".join(detok.push(t) for t in ids[split:]) + detok.flush() == "京 🙂 done"
    whole = tokenizer.encode("the cat", add_special_tokens=False)  # a prompt of whole characters: no change
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=whole)
    assert detok.push_many(ids[len(whole):]) + detok.flush() == tokenizer.decode(ids[len(whole):])


def test_request_text_is_the_same_read_lazily_or_per_token():
    """Without stop strings a request detokenizes when its text is read; the text (and
    every streamed delta joined) equals what per-token detokenization gives."""
    from jaxserve.request import Request
    from jaxserve.sampling import SamplingParams
    from jaxserve.tokenizer import IncrementalDetokenizer, token_bytes

    tokenizer = load().tokenizer
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    eos = (int(rng.integers(10, len(tokenizer))),)
    for case in range(20):
        ids = rng.integers(0, len(tokenizer), int(rng.integers(1, 60))).tolist()
        if case % 3 == 0:
            ids[len(ids) // 2] = eos[0]  # finishes by a stop id mid-way
        max_tokens = int(rng.integers(1, 70))
        params = SamplingParams(max_tokens=max_tokens, min_tokens=int(rng.integers(0, min(3, max_tokens + 1))))
        lazy = Request("lazy", [1], params, IncrementalDetokenizer(tokenizer), eos)
        # The per-token reference: the eager path, as taken by requests with stop strings.
        expected, detok, text_ids = "", IncrementalDetokenizer(tokenizer), []
        streamed = ""
        for i, t in enumerate(ids):
            lazy.append(t, 0.0, None)
            if i % 7 == 3:
                streamed += lazy.take_delta()[0]
        streamed += lazy.take_delta()[0]
        for t in lazy.output_ids:
            stop = t in eos and len(text_ids) + 1 > params.min_tokens
            if stop:
                break
            text_ids.append(t)
            expected += detok.push(t)
        if lazy.finish_reason == "length":
            expected += detok.flush()
        assert lazy.result()["text"] == expected == streamed, f"seed={seed} case={case}"


def test_token_bytes_are_the_tokens_own_bytes_even_inside_a_character():
    tokenizer = load().tokenizer
    text = "naïve café — 東京 🙂 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.decode([t]) == "\ufffd" for t in ids)  # some token holds part of a character
    assert b"".join(token_bytes(tokenizer, t) for t in ids) == text.encode("utf-8")
    special = next(iter(tokenizer.added_tokens_decoder.items()))  # plain text, not mapped bytes
    assert token_bytes(tokenizer, special[0]) == special[1].content.encode("utf-8")


def test_tool_call_tags_added_as_plain_tokens_survive_the_detokenizer():
    """Qwen2.5's tokenizer has `<tool_call>` and `</tool_call>` as added tokens marked special=False:
    the detokenizer's skip_special_tokens drops only special ones, so the server's tool-call parser
    sees the tags. (Marked special they would vanish from the text.)"""
    from jaxserve.loading import DEFAULT_MODEL_DIR
    from jaxserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)  # a copy of its own: adding tokens changes it
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in ids
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(t) for t in ids) + detok.flush() == text


def test_vocabulary_bytes_give_plain_added_tokens_their_text_and_special_ones_none():
    """What structured outputs walk: Qwen2.5's `<tool_call>` (an added token, not special) is text a constraint may
    allow as one token; EOS and other special tokens are no text; ids past the tokenizer have none either."""
    from jaxserve.loading import DEFAULT_MODEL_DIR
    from jaxserve.tokenizer import load_tokenizer, vocabulary_bytes

    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    tokenizer.add_tokens(["<tool_call>"])
    tag = tokenizer.convert_tokens_to_ids("<tool_call>")
    table = vocabulary_bytes(tokenizer, len(tokenizer) + 3)
    assert table[tag] == b"<tool_call>"
    assert all(table[i] is None for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    assert table[-3:] == [None] * 3
    ids = tokenizer.encode("def f(x): return 'é'", add_special_tokens=False)
    assert b"".join(table[t] for t in ids) == "def f(x): return 'é'".encode()


def test_token_spellings_are_one_table_a_tokenizer_matching_decode_and_token_bytes():
    from jaxserve.tokenizer import token_spellings

    tokenizer = load().tokenizer
    spellings = token_spellings(tokenizer)
    assert token_spellings(tokenizer) is spellings
    # Another tokenizer object (the server's copy) gets its own table, never the first one's entries.
    other = load().tokenizer
    assert token_spellings(other) is not spellings
    ids = tokenizer.encode("naïve café — 東京 🙂", add_special_tokens=False) + [tokenizer.eos_token_id]
    for t in ids * 2:  # the second pass reads the table
        assert spellings.text(t) == tokenizer.decode([t])
        assert spellings.bytes(t) == token_bytes(tokenizer, t)
    assert b"".join(spellings.bytes(t) for t in ids[:-1]).decode() == "naïve café — 東京 🙂"
