"""The incremental detokenizer against transformers' one-shot decode of the same ids."""

from __future__ import annotations

import numpy as np

from jaxserve.loading import load
from jaxserve.tokenizer import IncrementalDetokenizer


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
