"""N-gram speculative decoding (vLLM's ``"method": "ngram"``, prompt lookup decoding): draft tokens from the
request's own text, verified by one model call over all of them.

Owns proposing drafts (`ngram_draft`: the tokens that followed the latest earlier occurrence of the text's last
n tokens) and deciding what a verify call emits: for greedy rows on the host (`accepted_tokens`), for rows that
sample on the device (`rejection_sample`). The engine runs the verify call (`jaxserve.runner.Runner.verify`: the
row's last token and its draft, the model's distribution after each) and hands the emitted tokens to the request.

Why: a decode step reads every weight to produce one token per row; a verify call reads them once for up to k + 1
tokens per row, so where the text repeats itself (code edits, quoting the prompt, extraction) a step yields
several tokens. Greedy rows: the emitted tokens are exactly those greedy decoding would produce (each accepted
draft token is the model's argmax given the tokens before it, and the first mismatch is replaced by the argmax
there), so speculation changes speed, never text. Rows that sample: speculative sampling (Leviathan et al., 2023;
vLLM's rejection sampler) with the n-gram draft as a one-token proposal, so each emitted token is drawn from the
request's own distribution (temperature, top-k/p, min-p), though not the same draw as without speculation.
Each position's target takes the row's masks, logit bias, min_tokens ban at its own step, bad words (their last
tokens with the drafts before it shifted in, `draft_recent`) and penalties (repetition, presence, frequency) with
the drafts before it counted (`draft_history`): what a decode step would see after taking them
(`sampling.processed_logits`), and structured outputs the mask of the guide's state after those drafts
(`draft_states`); greedy rows with any of those go through the rejection sampler, whose target for them is that
argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import sampling


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


def rejection_sample(logp: jax.Array, tokens: jax.Array, draft_lens: jax.Array,
                     keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling of a verify call's rows (inside a jit): ``(emitted [B, S], count [B])``, each row's new
    tokens in its first ``count`` entries.

    ``logp``: f32 ``[B, S, V]``, the row's target distribution after each verified position (`sampling.
    target_logprobs`); ``tokens``: i32 ``[B, S]``, the row's last token then its draft (``draft_lens[b]`` tokens);
    ``keys``: ``[B, S]`` PRNG keys, position j's the row's key at the step of its j-th new token. Draft token j is
    kept with probability p_j(d_j) (the proposal is certain of it: min(1, p / q) with q = 1); at the first refusal
    the token is drawn from p_j without d_j (renormalised: max(0, p - q)), and after a fully kept draft from the next
    position's p. So every emitted token has the target's distribution given the tokens before it; a greedy row's
    target is its argmax, which makes this greedy decoding's rule.

    Example:
        >>> logp = jnp.log(jnp.array([[[0.0, 1.0], [1.0, 0.0]]]))             # position 0 certain of 1, then of 0
        >>> keys = jax.random.split(jax.random.key(0), 2)[None]
        >>> [x.tolist() for x in rejection_sample(logp, jnp.array([[5, 1]]), jnp.array([1]), keys)]
        [[[1, 0]], [2]]
    """
    b, s, v = logp.shape
    draft = tokens[:, 1:]
    pos = jnp.arange(s - 1)[None, :]
    p_draft = jnp.exp(jnp.take_along_axis(logp[:, :-1], draft[..., None], axis=-1)[..., 0])
    uniforms = jax.vmap(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1))))(keys[:, :-1])
    kept = (uniforms < p_draft) & (pos < draft_lens[:, None])
    accepted = jnp.sum(jnp.cumprod(kept.astype(jnp.int32), axis=1), axis=1)
    rows = jnp.arange(b)
    at_logp = logp[rows, accepted]
    refused = accepted < draft_lens
    refused_token = jnp.take_along_axis(tokens, jnp.minimum(accepted + 1, s - 1)[:, None], axis=1)[:, 0]
    at_logp = jnp.where(refused[:, None] & (jnp.arange(v)[None, :] == refused_token[:, None]), -jnp.inf, at_logp)
    at_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys[rows, accepted])
    nxt = jnp.argmax(at_logp + sampling.vocab_gumbel(at_keys, v), axis=-1).astype(jnp.int32)
    full = jnp.arange(s)[None, :]
    shifted = jnp.concatenate([draft, jnp.zeros((b, 1), draft.dtype)], axis=1)
    emitted = jnp.where(full < accepted[:, None], shifted, jnp.where(full == accepted[:, None], nxt[:, None], 0))
    return emitted.astype(jnp.int32), accepted + 1


def draft_history(counts: jax.Array, seen: jax.Array, tokens: jax.Array,
                  draft_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A verify call's penalty history at each position (inside a jit): ``(counts, seen)`` of shape ``[B * S, V]``,
    position j of row b holding the row's ``counts [B, V]`` (output-token counts) and ``seen [B, V]`` (prompt and
    output tokens) with its first j draft tokens added (``tokens [B, S]``: the last token, then ``draft_lens[b]``
    draft tokens): the history the token after position j is chosen with once those drafts are kept, as a decode
    step would see it.

    Example:
        >>> c, s = draft_history(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), bool), jnp.array([[0, 2, 2]]),
        ...                      jnp.array([2]))
        >>> c.tolist()
        [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0]]
    """
    b, s = tokens.shape
    v = counts.shape[1]
    j = jnp.arange(s)[None, :, None]  # the position
    k = jnp.arange(1, s)[None, None, :]  # a draft token's index in tokens
    ids = jnp.where((k <= j) & (k <= draft_lens[:, None, None]), tokens[:, None, 1:], v)  # v: dropped
    rows = jnp.broadcast_to(jnp.arange(b * s).reshape(b, s, 1), ids.shape).reshape(-1)
    counts = jnp.repeat(counts, s, axis=0).at[rows, ids.reshape(-1)].add(jnp.ones((), counts.dtype), mode="drop")
    seen = jnp.repeat(seen, s, axis=0).at[rows, ids.reshape(-1)].set(True, mode="drop")
    return counts, seen


def draft_recent(recent: jax.Array, tokens: jax.Array) -> jax.Array:
    """A verify call's `SamplingBatch.recent` at each position (inside a jit): ``[B * S, R]``, position j of row b the
    row's last R generated tokens (``recent [B, R]``) with its first j draft tokens (``tokens [B, S]``: the last
    token, then the draft) shifted in: what a bad word's ban reads there once those drafts are kept.

    Example:
        >>> draft_recent(jnp.array([[-1, 4]]), jnp.array([[4, 7, 8]])).tolist()
        [[-1, 4], [4, 7], [7, 8]]
    """
    b, s = tokens.shape
    r = recent.shape[1]
    extended = jnp.concatenate([recent, tokens[:, 1:].astype(recent.dtype)], axis=1)
    return extended[:, jnp.arange(s)[:, None] + jnp.arange(r)[None, :]].reshape(b * s, r)


def draft_states(next_states: jax.Array, states: jax.Array, tokens: jax.Array) -> jax.Array:
    """A verify call's structured-output states at each position (inside a jit): i32 ``[B * S]``, position j of row b
    the state of its guide (`jaxserve.guide_pool`'s ``next [G, V]`` table, ``states [B]`` at the row's last token)
    after its first j draft tokens (``tokens [B, S]``: the last token, then the draft). A draft token its state
    forbids leads wherever the table says; that position's mask refuses the token, so nothing after it is kept.

    Example:
        >>> nxt = jnp.array([[0, 1], [1, 0]])        # token 1 flips between states 0 and 1
        >>> draft_states(nxt, jnp.array([0]), jnp.array([[5, 1, 1]])).tolist()
        [0, 1, 0]
    """
    def one(state, token):
        state = next_states[state, token].astype(jnp.int32)
        return state, state

    start = states.astype(jnp.int32)
    _, after = jax.lax.scan(one, start, tokens[:, 1:].T)  # [S - 1, B]: the state after each draft token
    return jnp.concatenate([start[:, None], after.T], axis=1).reshape(-1)
