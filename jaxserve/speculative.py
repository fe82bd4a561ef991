"""N-gram speculative decoding (vLLM's ``"method": "ngram"``, prompt lookup decoding): draft tokens from the
request's own text, verified by one model call over all of them.

Owns proposing drafts (`ngram_draft`: the tokens that followed the latest earlier occurrence of the text's last
n tokens) and deciding what a verify call emits (`accepted_tokens`). The engine runs the verify call
(`jaxserve.runner.Runner.verify`: the row's last token and its draft, the model's greedy pick after each) and
hands the emitted tokens to the request; nothing here touches the device.

Why: a decode step reads every weight to produce one token per row; a verify call reads them once for up to k + 1
tokens per row, so where the text repeats itself (code edits, quoting the prompt, extraction) a step yields
several tokens. Greedy rows only: the emitted tokens are exactly those greedy decoding would produce (each
accepted draft token is the model's argmax given the tokens before it, and the first mismatch is replaced by the
argmax there), so speculation changes speed, never text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ngram_draft(ids: Sequence[int], k: int, n_max: int = 4, n_min: int = 1) -> list[int]:
    """Up to ``k`` draft tokens for a text ``ids``: for the longest n in ``n_max..n_min`` whose last n tokens
    occurred earlier, the tokens that followed their latest earlier occurrence; none where no n matches. Where that
    copy reaches the text's end it goes on copying what it has drafted (a text repeating with a period shorter than
    ``k`` drafts ``k`` tokens of the period, not just one period's).

    Example:
        >>> ngram_draft([1, 2, 3, 9, 1, 2], k=3)
        [3, 9, 1]
        >>> ngram_draft([7, 7, 7], k=4)
        [7, 7, 7, 7]
        >>> ngram_draft([5, 6, 7], k=2)
        []
    """
    length = len(ids)
    if k <= 0 or length < 2:
        return []
    arr = np.asarray(ids, np.int64)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = arr[length - n:]
        # Windows that start early enough to be followed by at least one token before the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            draft = arr[start: start + k].tolist()
            while len(draft) < k:  # the copy overlaps its own output, as a repeated text does
                draft.append(draft[start + len(draft) - length])
            return draft
    return []


def accepted_tokens(draft: Sequence[int], predicted: Sequence[int]) -> tuple[list[int], int]:
    """What a verify call emits for a row and how many draft tokens it accepted: the draft's longest prefix
    that the model's greedy picks agree with, then the model's pick after it. ``predicted[j]`` is the pick after
    the row's j-th verified token (its last token, then each draft token).

    Example:
        >>> accepted_tokens([4, 5, 6], [4, 5, 8, 1])
        ([4, 5, 8], 2)
    """
    accepted = 0
    while accepted < len(draft) and draft[accepted] == predicted[accepted]:
        accepted += 1
    return list(draft[:accepted]) + [int(predicted[accepted])], accepted
