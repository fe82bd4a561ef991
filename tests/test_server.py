"""The OpenAI-compatible server, in-process on a free 127.0.0.1 port, driven by the openai client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest
from hypothesis import given, settings, strategies as st

# The GPU machine has no openai client; there the server tests are skipped, not a collection error.
openai = pytest.importorskip("openai")

from jaxserve import EngineConfig, load
from jaxserve.async_engine import EngineDeadError
from jaxserve.server import ServerConfig, build_server, create_app
from jaxserve.tokenizer import token_spellings

API_KEY = "test-key"
MAX_MODEL_LEN = 256
# One batch and one prefill bucket: every request below shares the same two compiled steps
# (plus a logprobs and a penalties variant).
ENGINE_CONFIG = EngineConfig(num_pages=128, max_running=8, max_tokens_per_step=64, batch_buckets=(8,),
                             prefill_buckets=(64,), decode_steps=4, max_model_len=MAX_MODEL_LEN)
PROMPT = "The quick brown fox"


class LiveServer:
    """uvicorn serving ``app`` in a background thread on a socket bound to a free port."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = app
        self.server = build_server(app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def engine_call(self, coro_fn):
        """Run a coroutine on the app's AsyncEngine (any event loop may call it)."""
        return asyncio.run(coro_fn(self.app.state.jaxserve.engine))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load(tiny_checkpoint[0])


@pytest.fixture(scope="module")
def live(model):
    app = create_app(model, ENGINE_CONFIG, ServerConfig(model_name="tiny", api_key=API_KEY, max_tokens_limit=128))
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def pages_freed(live):
    """After the test, every KV page is free once the prefix cache is dropped."""
    yield

    async def check(engine):
        for _ in range(100):  # aborts of closed streams are commands the engine thread runs in order
            await engine.clear_prefix_cache()
            stats = await engine.stats()
            if stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0:
                return stats
            await asyncio.sleep(0.05)
        return stats

    stats = live.engine_call(check)
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0, stats


def post(live, path: str, body, key: str | None = API_KEY, timeout=60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return httpx.post(live.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)


# ----- happy paths ---------------------------------------------------------------------------------
def test_completion_stream_equals_non_stream_for_greedy(client, pages_freed):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.model == "tiny"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_streams_send_one_token_a_chunk_with_its_own_logprobs(client, pages_freed):
    """vLLM streams a chunk a token (--stream-interval 1), though the engine decodes 4 tokens a call here: each chunk
    holds one token and its logprobs, and the chunks add up to the whole answer, completions and chat alike."""
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
                                     extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                                              logprobs=1, stream=True, extra_body={"ignore_eos": True})]
    assert len(chunks) == 12 and all(len(c.logprobs.tokens) == 1 for c in chunks)
    assert "".join(c.text for c in chunks) == full.choices[0].text
    assert [c.logprobs.tokens[0] for c in chunks] == full.choices[0].logprobs.tokens
    assert [c.logprobs.token_logprobs[0] for c in chunks] == pytest.approx(full.choices[0].logprobs.token_logprobs)
    assert [c.logprobs.text_offset[0] for c in chunks] == full.choices[0].logprobs.text_offset
    messages = [{"role": "user", "content": "Hello world!"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"ignore_eos": True})][1:]  # the first: the role
    assert len(chunks) == 10 and all(len(c.logprobs.content) == 1 for c in chunks)
    assert "".join(c.delta.content or "" for c in chunks) == full.choices[0].message.content
    assert [c.logprobs.content[0].token for c in chunks] == [t.token for t in full.choices[0].logprobs.content]
    assert [len(c.logprobs.content[0].top_logprobs) for c in chunks] == [2] * 10


def test_token_chunks_cut_the_engine_s_text_as_one_token_at_a_time_would(model):
    """`TokenChunks` splits a device call's chunk by its tokens' bytes: each token's piece is its own complete
    characters, no later than the detokenizer sends them a token at a time (a character split over tokens goes with
    the one completing it), held-back text with a later token, special tokens no text; a text that is not its
    tokens' passes whole."""
    from jaxserve.tokenizer import token_bytes

    from jaxserve.server.token_chunks import TokenChunks
    from jaxserve.tokenizer import IncrementalDetokenizer

    tok = model.tokenizer
    text = "Hello world! Ünïcödé ☃ text — 日本語."
    ids = tok.encode(text)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = ids[:5] + [eos] + ids[5:]
    one_by_one = IncrementalDetokenizer(tok)
    want = [one_by_one.push(t) for t in ids]
    for run, interval in ((4, 1), (3, 1), (7, 2), (4, 4)):
        detok, pieces, got = IncrementalDetokenizer(tok), TokenChunks(tok, interval), []
        for a in range(0, len(ids), run):
            run_ids = ids[a:a + run]
            chunk = {"text": detok.push_many(run_ids), "token_ids": run_ids, "logprobs": [float(t) for t in run_ids],
                     "top_logprobs": None, "finish_reason": None, "stop_reason": None}
            got += pieces.split(0, chunk)
        assert all(len(c["token_ids"]) <= interval and c["logprobs"] == [float(t) for t in c["token_ids"]]
                   for c in got)
        assert [t for c in got for t in c["token_ids"]] == ids
        if interval == 1:
            for j in range(len(ids)):
                sent = "".join(c["text"] for c in got[:j + 1])
                made = b"".join(token_bytes(tok, t) for t in ids[:j + 1] if t != eos)
                assert "".join(want[:j + 1]) <= sent and made.startswith(sent.encode())  # never later, never ahead
        assert "".join(c["text"] for c in got) == text
    # Text held back (a stop string may begin there) goes out with a later token; the last piece ends the choice.
    pieces = TokenChunks(tok, 1)
    first = pieces.split(0, {"text": "Hello", "token_ids": tok.encode("Hello world"), "finish_reason": None,
                             "stop_reason": None})
    last = pieces.split(0, {"text": " wor", "token_ids": tok.encode("!"), "finish_reason": "stop",
                            "stop_reason": "ld!", "result": {}})
    assert "".join(c["text"] for c in first) == "Hello" and [c["text"] for c in last] == [" wor"]
    assert last[-1]["finish_reason"] == "stop" and "result" in last[-1]
    assert all(c["finish_reason"] is None and "result" not in c for c in first)
    # A text that is not its tokens' (a character the prompt began, U+FFFD for invalid bytes): whole, and after it
    # until a chunk's text is exactly its tokens' bytes, which is split again.
    pieces = TokenChunks(tok, 1)
    odd = {"text": "xyz", "token_ids": tok.encode("Hello world"), "finish_reason": None, "stop_reason": None}
    assert pieces.split(0, odd) == [odd]
    again = {**odd, "text": " world"}
    assert pieces.split(0, again) == [again]
    ids = tok.encode(" the quick fox")
    synced = pieces.split(0, {**odd, "text": " the quick fox", "token_ids": ids})
    assert [c["token_ids"] for c in synced] == [[t] for t in ids]
    assert "".join(c["text"] for c in synced) == " the quick fox"
    held = pieces.split(0, {**odd, "text": "Hel", "token_ids": tok.encode("Hello")})  # "lo" held back: in step
    assert "".join(c["text"] for c in held) == "Hel"


def test_continuous_usage_stats_count_each_choice_s_tokens_so_far(client, pages_freed):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage so far, growing to the
    final count; the usage-only chunk at the end stays the request's."""
    chunks = list(client.completions.create(model="tiny", prompt=[PROMPT, PROMPT + " jumps"], max_tokens=7, n=2,
                                            temperature=1.0, seed=3, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    final = chunks[-1].usage
    per_choice: dict[int, list] = {}
    for c in chunks[:-1]:
        per_choice.setdefault(c.choices[0].index, []).append(c.usage)
    assert sorted(per_choice) == [0, 1, 2, 3]
    for i, seen in per_choice.items():
        counts = [u.completion_tokens for u in seen]
        assert counts == sorted(counts) and counts[-1] == 7
        assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in seen)
    assert per_choice[0][0].prompt_tokens < per_choice[2][0].prompt_tokens  # each choice's own prompt
    assert final.completion_tokens == 28
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=5, temperature=0, stream=True,
                                               stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert [c.usage.completion_tokens for c in chat if c.choices][-1] == 5 == chat[-1].usage.completion_tokens


def test_chat_stream_equals_non_stream_for_greedy(client, pages_freed):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                          temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == full.usage.total_tokens - full.usage.prompt_tokens
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_prompt_is_the_rendered_chat_template(client, live, pages_freed):
    tok = live.app.state.jaxserve.tokenizer
    messages = [{"role": "user", "content": "def add(a, b):"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    comp = client.completions.create(model="tiny", prompt=rendered, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == comp.choices[0].text
    assert chat.usage.prompt_tokens == comp.usage.prompt_tokens


def test_n_choices_with_seed_are_reproducible(client, pages_freed):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({tuple(c.text) for c in a.choices}) > 1  # seeds are offset per choice
    streamed = client.completions.create(**kwargs, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in a.choices]


def test_seeded_choices_of_several_prompts_are_those_of_each_prompt_alone(client, pages_freed):
    """Sample j of every prompt uses seed + j: a prompt's choices do not depend on the prompts sent beside it."""
    kwargs = dict(model="tiny", max_tokens=8, temperature=1.0, seed=11, n=2)
    both = client.completions.create(prompt=[PROMPT, "Another prompt"], **kwargs)
    alone = [client.completions.create(prompt=p, **kwargs) for p in (PROMPT, "Another prompt")]
    assert [c.text for c in both.choices] == [c.text for a in alone for c in a.choices]


def test_seed_minus_one_leaves_every_choice_unseeded():
    """vLLM's seed=-1 means no seed; offset per choice it would become seeds 0, 1, ... for choices 1, 2, ..."""
    from types import SimpleNamespace

    from jaxserve.server.app import _sampling_params
    from jaxserve.server.protocol import CompletionRequest

    req = CompletionRequest(model="tiny", prompt=PROMPT, n=3, seed=-1)
    params = _sampling_params(req, 8, None, 3, SimpleNamespace(config=ServerConfig(), sampling_defaults={}))
    assert [p.seed for p in params] == [None, None, None]


def test_fields_a_request_leaves_unset_take_the_checkpoints_generation_config():
    """vLLM's `--generation-config auto`: Qwen2.5-Instruct's temperature 0.7, top_p 0.8, top_k 20 and
    repetition_penalty 1.05 apply where the request sets none of them; what it sets wins."""
    from types import SimpleNamespace

    from jaxserve.server.app import _sampling_params
    from jaxserve.server.protocol import ChatRequest

    st = SimpleNamespace(config=ServerConfig(), sampling_defaults={"temperature": 0.7, "top_p": 0.8, "top_k": 20})
    messages = [{"role": "user", "content": "hi"}]
    [p] = _sampling_params(ChatRequest(model="tiny", messages=messages), 8, None, 1, st)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.7, 0.8, 20, 8)
    [p] = _sampling_params(ChatRequest(model="tiny", messages=messages, temperature=0, top_k=None), 8, None, 1, st)
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.8, 20)


def test_developer_messages_are_system_messages(model):
    """OpenAI's newer models take instructions as role "developer"; the chat template knows "system"."""
    from types import SimpleNamespace

    from jaxserve.server.app import _chat_prompt
    from jaxserve.server.protocol import ChatRequest

    st = SimpleNamespace(tokenizer=model.tokenizer)
    prompts = [_chat_prompt(ChatRequest(model="tiny", messages=[{"role": role, "content": "Answer in French."},
                                                                {"role": "user", "content": "hi"}]), st)
               for role in ("developer", "system")]
    assert prompts[0] == prompts[1]


def test_chat_logprob_bytes_spell_the_content(client, pages_freed):
    """Each token's `bytes` are its own (not the UTF-8 of U+FFFD where it holds part of a character)."""
    messages = [{"role": "user", "content": "Écris 東京 🙂"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=1.0, seed=5,
                                          logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    choice = chat.choices[0]
    raw = b"".join(bytes(c.bytes) for c in choice.logprobs.content)
    assert raw.decode("utf-8", errors="replace") == choice.message.content
    assert all(c.top_logprobs[0].bytes is not None for c in choice.logprobs.content)


def test_stop_string_ends_the_completion(client, pages_freed):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    stop = full.choices[0].text[3:5]
    if not stop.strip("\ufffd"):
        pytest.skip("greedy text has no usable stop string")
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert out.choices[0].model_extra["stop_reason"] == stop  # vLLM's extension
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    assert streamed[-1].choices[0].model_extra["stop_reason"] == stop
    kept = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == out.choices[0].text + stop


def test_logprobs_and_penalties(client, pages_freed):
    comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                     presence_penalty=0.5, frequency_penalty=0.5)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 and v <= 0 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2, presence_penalty=0.5)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_return_tokens_as_token_ids_names_every_logprob_token_by_its_id(client, live, pages_freed):
    tok = live.app.state.jaxserve.tokenizer
    named = post(live, "/v1/completions", dict(GOOD, max_tokens=5, logprobs=2, return_tokens_as_token_ids=True))
    plain = post(live, "/v1/completions", dict(GOOD, max_tokens=5, logprobs=2)).json()["choices"][0]
    choice = named.json()["choices"][0]
    lp = choice["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    assert all(re.fullmatch(r"token_id:[0-9]+", t) for t in lp["tokens"] + [k for e in lp["top_logprobs"] for k in e])
    assert tok.decode(ids) == choice["text"] == plain["text"]
    assert lp["text_offset"] == plain["logprobs"]["text_offset"]  # offsets still count the text's characters
    assert lp["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    chat = post(live, "/v1/chat/completions", dict(CHAT_BODY, logprobs=True, top_logprobs=2,
                                                   return_tokens_as_token_ids=True)).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert tok.decode([int(c["token"].removeprefix("token_id:")) for c in content]) == chat["message"]["content"]
    assert all(bytes(c["bytes"]).decode() == c["token"] and all(t["token"].startswith("token_id:")
                                                                  for t in c["top_logprobs"]) for c in content)


def test_logprob_token_ids_replace_the_top_logprobs_on_both_routes_as_vllm_s(live, tiny_checkpoint, pages_freed):
    """vLLM's logprob_token_ids: each position's top logprobs are the sampled token's, then the named tokens' in the
    order asked (whatever logprobs / top_logprobs say), transformers' log-softmax; streamed chunks carry the same."""
    from tests.test_engine import hf_log_softmax64

    hf = tiny_checkpoint[1]
    named = [300, 5, 7, 5]
    names = ["token_id:300", "token_id:5", "token_id:7"]
    body = dict(GOOD, max_tokens=4, logprobs=0, logprob_token_ids=named, return_tokens_as_token_ids=True,
                return_token_ids=True)
    r = post(live, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ref = hf_log_softmax64(hf, choice["prompt_token_ids"] + choice["token_ids"])[len(choice["prompt_token_ids"]) - 1:]
    lp = choice["logprobs"]
    for k, (token, top) in enumerate(zip(choice["token_ids"], lp["top_logprobs"])):
        sampled = f"token_id:{token}"
        assert list(top) == [sampled] + [n for n in names if n != sampled]
        assert top[sampled] == pytest.approx(lp["token_logprobs"][k]) == pytest.approx(ref[k, token], abs=1e-4)
        assert [top[n] for n in names] == pytest.approx(ref[k, [300, 5, 7]].tolist(), abs=1e-4)
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={**body, "stream": True}) as streamed:
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    tops = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
            for t in c["choices"][0]["logprobs"]["top_logprobs"]]
    assert [list(t) for t in tops] == [list(t) for t in lp["top_logprobs"]]
    assert [v for t in tops for v in t.values()] == pytest.approx([v for t in lp["top_logprobs"] for v in t.values()])
    chat = post(live, "/v1/chat/completions", dict(CHAT_BODY, logprobs=True, logprob_token_ids=named,
                                                   return_tokens_as_token_ids=True, return_token_ids=True))
    assert chat.status_code == 200, chat.text
    answer = chat.json()
    ids = answer["prompt_token_ids"] + answer["choices"][0]["token_ids"]
    ref = hf_log_softmax64(hf, ids)[len(answer["prompt_token_ids"]) - 1:]
    for k, item in enumerate(answer["choices"][0]["logprobs"]["content"]):
        shown = {t["token"]: t["logprob"] for t in item["top_logprobs"]}
        assert list(shown) == [item["token"]] + [n for n in names if n != item["token"]]
        for name, value in shown.items():
            assert value == pytest.approx(ref[k, int(name.removeprefix("token_id:"))], abs=1e-4)


def test_echo_with_logprobs_scores_the_prompt_as_offline_prompt_logprobs(client, live, model, pages_freed):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs=1, max_tokens 0 or 1."""
    from jaxserve import SamplingParams

    ids = model.tokenizer.encode(PROMPT, add_special_tokens=False)
    offline = live.engine_call(lambda e: e.generate_async(ids, SamplingParams(max_tokens=1, temperature=0,
                                                                               prompt_logprobs=1)))
    want = [None] + [offline["prompt_logprobs"][p][t] for p, t in enumerate(ids) if p]
    for max_tokens in (0, 1):
        comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0, echo=True,
                                         logprobs=1)
        choice, lp = comp.choices[0], comp.choices[0].logprobs
        assert choice.text.startswith(PROMPT) and len(lp.tokens) == len(ids) + max_tokens
        assert comp.usage.completion_tokens == max_tokens and comp.usage.prompt_tokens == len(ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[:len(ids)] == pytest.approx(want, abs=1e-6)
        assert all(lp.tokens[p] in lp.top_logprobs[p] for p in range(1, len(lp.tokens)))
        assert "".join(lp.tokens[:len(ids)]) == PROMPT
        assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(lp.tokens))]
    plain = client.completions.create(model="tiny", prompt=[PROMPT], max_tokens=3, temperature=0)
    echoed = client.completions.create(model="tiny", prompt=[PROMPT], max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text and echoed.choices[0].logprobs is None
    # Streamed: the prompt first, then the same tokens; max_tokens 0 shows the prompt and that it ended.
    for max_tokens, want_text, reason in ((3, echoed.choices[0].text, echoed.choices[0].finish_reason),
                                          (0, PROMPT, "length")):
        events = list(client.completions.create(model="tiny", prompt=[PROMPT], max_tokens=max_tokens, temperature=0,
                                                echo=True, stream=True, stream_options={"include_usage": True}))
        texts = [c.choices[0].text for c in events if c.choices]
        assert texts[0] == PROMPT and "".join(texts) == want_text, texts
        assert [c.choices[0].finish_reason for c in events if c.choices][-1] == reason
        assert events[-1].usage.completion_tokens == (max_tokens and echoed.usage.completion_tokens)
    streamed = post(live, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "echo": True, "stream": True,
                                              "logprobs": 1})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "echo"


def test_return_token_ids_gives_the_prompt_s_and_each_choice_s_ids(client, live, pages_freed):
    """vLLM's return_token_ids: completions' choices carry their prompt's ids and their own tokens (the same ids the
    logprobs name with return_tokens_as_token_ids), chat's response the prompt's once; streamed, every chunk its
    tokens and the prompt's come once (each completion choice's first chunk; chat's first chunk)."""
    tok = live.app.state.jaxserve.tokenizer
    ids = {"return_token_ids": True, "return_tokens_as_token_ids": True}
    comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0.8, seed=3, n=2,
                                     logprobs=0, extra_body=ids).model_dump()
    for choice in comp["choices"]:
        assert choice["prompt_token_ids"] == tok(PROMPT)["input_ids"]
        assert [f"token_id:{t}" for t in choice["token_ids"]] == choice["logprobs"]["tokens"]
        assert len(choice["token_ids"]) == 5
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0.8, seed=3, n=2,
                                         stream=True, extra_body=ids)
    got: dict[int, list[int]] = {0: [], 1: []}
    prompt_ids = {0: 0, 1: 0}
    for chunk in streamed:
        for c in chunk.model_dump()["choices"]:
            got[c["index"]] += c["token_ids"]
            prompt_ids[c["index"]] += c.get("prompt_token_ids") == tok(PROMPT)["input_ids"]
    assert [got[0], got[1]] == [c["token_ids"] for c in comp["choices"]] and prompt_ids == {0: 1, 1: 1}
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, extra_body=ids).model_dump()
    assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"]
    assert tok.decode(chat["prompt_token_ids"]) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=False)
    assert [f"token_id:{t}" for t in chat["choices"][0]["token_ids"]] == [
        e["token"] for e in chat["choices"][0]["logprobs"]["content"]]
    chunks = [c.model_dump() for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0, stream=True, extra_body=ids)]
    assert sum(t for c in chunks for ch in c["choices"] for t in [len(ch.get("token_ids") or [])]) == 4
    assert [c["choices"][0]["token_ids"] for c in chunks if c["choices"]][0] == []  # the role chunk
    assert [c.get("prompt_token_ids") is not None for c in chunks].count(True) == 1
    assert chunks[0]["prompt_token_ids"] == chat["prompt_token_ids"]
    assert sum((ch["token_ids"] for c in chunks for ch in c["choices"]), []) == chat["choices"][0]["token_ids"]


def test_cache_salt_shares_cached_prefixes_only_within_a_salt(live, pages_freed):
    """vLLM's cache_salt: a prompt cached under one salt is a hit for the same salt only (completions and chat);
    an empty salt is a 400 naming it."""
    live.engine_call(lambda engine: engine.clear_prefix_cache())
    prompt = "The quick brown fox jumps over the lazy dog, " * 3

    def cached(route: str, body: dict, salt: str) -> int:
        r = post(live, route, {**body, "max_tokens": 2, "temperature": 0, "cache_salt": salt})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    completion = {"model": "tiny", "prompt": prompt}
    first, again, other = (cached("/v1/completions", completion, s) for s in ("a", "a", "b"))
    assert first == 0 and again > 0 and other == 0
    chat = {"model": "tiny", "messages": [{"role": "user", "content": prompt}]}
    assert cached("/v1/chat/completions", chat, "c") == 0 and cached("/v1/chat/completions", chat, "c") > 0
    assert cached("/v1/chat/completions", chat, "d") == 0
    bad = post(live, "/v1/completions", {**completion, "cache_salt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"


def test_a_body_without_model_asks_for_the_served_model(live, pages_freed):
    # vLLM's routes default `model` (OpenAI's API requires it): the served base model answers, and says so.
    completion = post(live, "/v1/completions", {k: v for k, v in GOOD.items() if k != "model"})
    chat = post(live, "/v1/chat/completions", {k: v for k, v in CHAT_BODY.items() if k != "model"})
    named = post(live, "/v1/completions", GOOD)
    for r in (completion, chat):
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
    assert completion.json()["choices"][0]["text"] == named.json()["choices"][0]["text"]
    embedded = post(live, "/v1/embeddings", {"input": PROMPT})
    assert embedded.status_code == 200 and embedded.json()["model"] == "tiny", embedded.text


def test_several_served_names_answer_as_the_first(model):
    # vLLM's --served-model-name a b: requests may name either, responses name the first, /v1/models lists both.
    app = create_app(model, ENGINE_CONFIG, ServerConfig(model_name="tiny", model_aliases=("tiny-alias",),
                                                        api_key=API_KEY, max_tokens_limit=128))
    with LiveServer(app) as server:
        r = post(server, "/v1/completions", {**GOOD, "model": "tiny-alias"})
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
        listed = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert [m["id"] for m in listed["data"]] == ["tiny", "tiny-alias"]
        assert post(server, "/v1/completions", {**GOOD, "model": "other"}).status_code == 404
    with pytest.raises(ValueError, match="model_aliases"):
        ServerConfig(model_aliases="tiny-alias")


def test_logit_bias_forces_a_token(client, live, pages_freed):
    comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0,
                                     logit_bias={"17": 100})
    assert comp.choices[0].text == live.app.state.jaxserve.tokenizer.decode([17] * 4)
    # A special token forced: no text by default, spelled out with vLLM's skip_special_tokens false.
    tok = live.app.state.jaxserve.tokenizer
    special = tok.convert_tokens_to_ids(tok.all_special_tokens[-1])
    for skip in (True, False):
        comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0,
                                         logit_bias={str(special): 100}, extra_body={"skip_special_tokens": skip})
        assert comp.choices[0].text == ("" if skip else tok.all_special_tokens[-1] * 2), comp.choices[0]


def test_token_id_prompts_and_prompt_lists(client, live, pages_freed):
    ids = live.app.state.jaxserve.tokenizer.encode(PROMPT, add_special_tokens=False)
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    both = client.completions.create(model="tiny", prompt=[PROMPT, "Hello"], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == both.choices[0].text
    assert [c.index for c in both.choices] == [0, 1]


# ----- SGLang's /generate ----------------------------------------------------------------------------
GREEDY_12 = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def generate_events(live, body) -> list[dict]:
    """A streamed /generate's events, checked to end with SGLang's ``data: [DONE]``."""
    with httpx.stream("POST", live.url + "/generate", json={**body, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_generate_answers_what_completions_answer_for_text_and_input_ids(client, live, pages_freed):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True}).model_dump()
    r = post(live, "/generate", {"text": PROMPT, "sampling_params": GREEDY_12, "rid": "mine"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"] == full["choices"][0]["text"] and out["output_ids"] == full["choices"][0]["token_ids"]
    meta = out["meta_info"]
    assert meta["id"] == "mine" and meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["prompt_tokens"] == full["usage"]["prompt_tokens"] and meta["completion_tokens"] == 12
    assert 0 <= meta["cached_tokens"] <= meta["prompt_tokens"] and meta["e2e_latency"] > 0
    ids = live.app.state.jaxserve.tokenizer.encode(PROMPT, add_special_tokens=False)
    by_ids = post(live, "/generate", {"input_ids": ids, "sampling_params": GREEDY_12}).json()
    assert by_ids["text"] == out["text"] and by_ids["output_ids"] == out["output_ids"]
    # SGLang's default of 128 new tokens, past what the context leaves after a long prompt: cut, not refused.
    long = post(live, "/generate", {"text": "fox " * 150, "sampling_params": {"ignore_eos": True}}).json()["meta_info"]
    assert long["prompt_tokens"] + 128 > MAX_MODEL_LEN
    assert long["finish_reason"] == {"type": "length", "length": MAX_MODEL_LEN - long["prompt_tokens"]}


def test_generate_batches_answer_a_list_in_order(client, live, pages_freed):
    """A batch answers each prompt as sent alone, in order, each with its own sampling_params and rid; n samples
    of a prompt sit side by side, seeded as the completions route seeds them."""
    alone = [post(live, "/generate", {"text": t, "sampling_params": {**GREEDY_12, "max_new_tokens": k}}).json()
             for t, k in ((PROMPT, 6), ("Hello", 3))]
    batch = post(live, "/generate", {"text": [PROMPT, "Hello"], "rid": "b", "sampling_params": [
        {**GREEDY_12, "max_new_tokens": 6}, {**GREEDY_12, "max_new_tokens": 3}]}).json()
    assert [b["text"] for b in batch] == [a["text"] for a in alone]
    assert [b["meta_info"]["completion_tokens"] for b in batch] == [6, 3]
    assert [b["meta_info"]["id"] for b in batch] == ["b_0", "b_1"]
    sampled = post(live, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0.8,
                                                                           "n": 2, "sampling_seed": 3}}).json()
    comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0.8, seed=3, n=2)
    assert [s["text"] for s in sampled] == [c.text for c in comp.choices]


def test_generate_streams_what_it_answers_whole(live, pages_freed):
    """SGLang streams each sample's text, ids and logprobs so far (not deltas), a token a chunk here, ending with
    the unstreamed answer; a batch's events carry their sample's index."""
    body = {"text": PROMPT, "sampling_params": GREEDY_12, "return_logprob": True, "top_logprobs_num": 2}
    whole = post(live, "/generate", body).json()
    events = generate_events(live, body)
    assert [e["meta_info"]["completion_tokens"] for e in events] == list(range(1, 13))
    assert all(b["text"].startswith(a["text"]) and b["output_ids"][:-1] == a["output_ids"]
               for a, b in zip(events, events[1:]))
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    last = events[-1]
    assert last["text"] == whole["text"] and last["output_ids"] == whole["output_ids"]
    assert last["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
    for key in ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs"):
        assert json.dumps(last["meta_info"][key]) == json.dumps(whole["meta_info"][key]), key
    batch = {"text": [PROMPT, "Hello"], "sampling_params": GREEDY_12}
    answers = post(live, "/generate", batch).json()
    finals = {e["index"]: e for e in generate_events(live, batch) if e["meta_info"]["finish_reason"]}
    assert [finals[i]["text"] for i in range(2)] == [a["text"] for a in answers]


def test_generate_finish_reasons_take_sglang_s_forms(live, pages_freed):
    full = post(live, "/generate", {"text": PROMPT, "sampling_params": GREEDY_12}).json()
    stop_id = full["output_ids"][3]
    by_id = post(live, "/generate", {"text": PROMPT, "sampling_params": {**GREEDY_12, "stop_token_ids": [stop_id]}})
    at = full["output_ids"].index(stop_id)
    assert by_id.json()["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert by_id.json()["output_ids"] == full["output_ids"][:at + 1]
    stop = full["text"][3:5]
    if stop.strip("\ufffd"):
        by_str = post(live, "/generate", {"text": PROMPT, "sampling_params": {**GREEDY_12, "stop": [stop]}}).json()
        assert by_str["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert by_str["text"] == full["text"][:full["text"].index(stop)]
        kept = post(live, "/generate", {"text": PROMPT, "sampling_params": {**GREEDY_12, "stop": stop,
                                                                            "no_stop_trim": True}}).json()
        assert kept["text"] == by_str["text"] + stop
    # max_new_tokens 0: the prompt alone (scored where logprobs are asked), no token shown.
    none = post(live, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 0}}).json()
    assert (none["text"], none["output_ids"]) == ("", [])
    assert none["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert none["meta_info"]["completion_tokens"] == 0


def test_generate_logprobs_are_the_completions_route_s(client, live, pages_freed):
    """SGLang's [logprob, token id, text or null] triples hold the completions route's numbers: the output's, the k
    best at each position, and from logprob_start_len the prompt's (the first null, as SGLang pads it)."""
    tok = live.app.state.jaxserve.tokenizer
    ids = tok.encode(PROMPT, add_special_tokens=False)
    comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True, "prompt_logprobs": 2,
                                                 "return_token_ids": True}).model_dump()["choices"][0]
    body = {"text": PROMPT, "sampling_params": {**GREEDY_12, "max_new_tokens": 6}, "return_logprob": True,
            "top_logprobs_num": 2, "return_text_in_logprobs": True}
    meta = post(live, "/generate", body).json()["meta_info"]
    out = meta["output_token_logprobs"]
    assert [t for _, t, _ in out] == comp["token_ids"] and [s for _, _, s in out] == comp["logprobs"]["tokens"]
    assert [v for v, _, _ in out] == pytest.approx(comp["logprobs"]["token_logprobs"])
    assert meta["input_token_logprobs"] == [[None, ids[-1], tok.decode([ids[-1]])]]
    assert meta["input_top_logprobs"] == [None]
    for tops, want in zip(meta["output_top_logprobs"], comp["logprobs"]["top_logprobs"]):
        assert {s: v for v, _, s in tops} == pytest.approx(dict(list(want.items())[:2]))
    scored = post(live, "/generate", {**body, "logprob_start_len": 0, "return_text_in_logprobs": False,
                                      "sampling_params": {"max_new_tokens": 0}}).json()["meta_info"]
    assert [t for _, t, _ in scored["input_token_logprobs"]] == ids and scored["output_token_logprobs"] == []
    assert scored["input_token_logprobs"][0] == [None, ids[0], None] and scored["input_top_logprobs"][0] is None
    want = [p[str(t)]["logprob"] for p, t in zip(comp["prompt_logprobs"][1:], ids[1:])]
    assert [v for v, _, _ in scored["input_token_logprobs"][1:]] == pytest.approx(want)
    assert all(len(t) == 2 for t in scored["input_top_logprobs"][1:])


def test_generate_errors_rename_the_field_but_not_a_server_flag():
    from jaxserve.server.app import _sglang_named
    from jaxserve.server.protocol import APIError

    exc = _sglang_named(APIError(400, "logprobs must be in [0, 20] (the server's --max-logprobs), got -1",
                                 param="logprobs"), "text")
    assert exc.param == "top_logprobs_num"
    assert exc.message == "top_logprobs_num must be in [0, 20] (the server's --max-logprobs), got -1"


def test_generate_client_disconnect_aborts(live, pages_freed, monkeypatch):
    slow_decodes(live, monkeypatch, 0.05)  # keeps the request running well past the client's timeout
    before = abort_count(live)
    with pytest.raises(httpx.ReadTimeout):
        post(live, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 128, "ignore_eos": True}},
             timeout=httpx.Timeout(60, read=0.3))
    seconds_until_aborted(live, before, time.time())


def test_abort_request_ends_a_generate_request_by_rid_and_abort_all_ends_every_one(live, pages_freed, monkeypatch):
    """SGLang's /abort_request: the /generate request of a rid ends with finish reason abort, its answer still given
    (whole, or as the stream's last event) and its pages freed; a rid in flight is refused to a second request;
    an unknown rid is a no-op; abort_all ends every running request, /v1 ones included, and the server goes on."""
    slow_decodes(live, monkeypatch, 0.1)  # keeps requests running (seconds) while the abort comes
    long = {"max_new_tokens": 128, "ignore_eos": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def generating() -> dict:
        return live.app.state.jaxserve.generating

    def wait_for(rids) -> None:
        deadline = time.time() + 30
        while not all(generating().get(r) is not None for r in rids) and time.time() < deadline:
            time.sleep(0.02)
        assert all(generating().get(r) is not None for r in rids)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        whole = pool.submit(post, live, "/generate", {"text": PROMPT, "sampling_params": long, "rid": "whole-1"})
        streamed = pool.submit(generate_events, live, {"text": PROMPT, "sampling_params": long, "rid": "stream-1"})
        wait_for(["whole-1", "stream-1"])
        dup = post(live, "/generate", {"text": PROMPT, "sampling_params": long, "rid": "whole-1"})
        assert dup.status_code == 400 and dup.json()["error"]["param"] == "rid"
        assert httpx.post(live.url + "/abort_request", json={"rid": "nobody"}, headers=headers).status_code == 200
        for rid in ("whole-1", "stream-1"):
            r = httpx.post(live.url + "/abort_request", json={"rid": rid}, headers=headers)
            assert r.status_code == 200 and r.content == b""
        answer = whole.result(timeout=60).json()
        events = streamed.result(timeout=60)
    for meta, rid in ((answer["meta_info"], "whole-1"), (events[-1]["meta_info"], "stream-1")):
        assert meta["id"] == rid and meta["finish_reason"]["type"] == "abort"
        assert meta["completion_tokens"] < 128
    assert not generating()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batch = pool.submit(post, live, "/generate", {"text": [PROMPT, "Hello"], "sampling_params": long, "rid": "b"})
        completion = pool.submit(post, live, "/v1/completions", {**GOOD, "max_tokens": 128, "ignore_eos": True})
        wait_for(["b_0", "b_1"])
        deadline = time.time() + 30
        while live.engine_call(lambda e: e.stats())["running"] < 3 and time.time() < deadline:
            time.sleep(0.02)
        r = httpx.post(live.url + "/abort_request", json={"abort_all": True}, headers=headers)
        assert r.status_code == 200
        assert [a["meta_info"]["finish_reason"]["type"] for a in batch.result(timeout=60).json()] == ["abort"] * 2
        assert completion.result(timeout=60).json()["choices"][0]["finish_reason"] == "abort"
    assert not generating()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # a batch's rid ends each of its requests (a prefix)
        batch = pool.submit(post, live, "/generate", {"text": [PROMPT, "Hello"], "sampling_params": long, "rid": "p"})
        other = pool.submit(post, live, "/generate", {"text": PROMPT, "sampling_params": GREEDY_12, "rid": "q"})
        wait_for(["p_0", "p_1"])
        assert httpx.post(live.url + "/abort_request", json={"rid": "p"}, headers=headers).status_code == 200
        assert [a["meta_info"]["finish_reason"]["type"] for a in batch.result(timeout=60).json()] == ["abort"] * 2
        assert other.result(timeout=60).json()["meta_info"]["finish_reason"]["type"] == "length"
    assert not generating()
    monkeypatch.undo()
    again = post(live, "/generate", {"text": PROMPT, "sampling_params": GREEDY_12, "rid": "whole-1"}).json()
    assert again["meta_info"]["finish_reason"]["type"] == "length"  # the rid is free again, the engine serves
    assert httpx.post(live.url + "/abort_request", json={"rid": "x"}).status_code == 401  # behind the API key


def test_abort_request_reaches_a_batch_still_being_submitted(live, pages_freed, monkeypatch):
    """An /abort_request for a rid whose batch is still being submitted (each submit waits for the engine's next
    look at its commands: a step, in an engine process) ends each of its requests once submitted. It was dropped
    (the rid held no handle yet), and the batch ran to its end."""
    engine = live.app.state.jaxserve.engine
    submitting, go_on = threading.Event(), threading.Event()
    real_submit = engine.submit

    async def held_submit(*args, **kwargs):
        handle = await real_submit(*args, **kwargs)
        submitting.set()  # the batch's first request is in, the second not yet
        await asyncio.to_thread(go_on.wait, 30)
        return handle

    monkeypatch.setattr(engine, "submit", held_submit)
    slow_decodes(live, monkeypatch, 0.05)  # the first request runs 128 tokens in seconds, well past the abort
    long = {"max_new_tokens": 128, "ignore_eos": True, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batch = pool.submit(post, live, "/generate", {"text": [PROMPT, "Hello"], "sampling_params": long, "rid": "s"})
        assert submitting.wait(30)
        r = httpx.post(live.url + "/abort_request", json={"rid": "s"}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200
        go_on.set()
        metas = [a["meta_info"] for a in batch.result(timeout=60).json()]
    assert [m["finish_reason"]["type"] for m in metas] == ["abort"] * 2, metas
    assert all(m["completion_tokens"] < 128 for m in metas)
    assert not live.app.state.jaxserve.generating and not live.app.state.jaxserve.aborted


def test_a_request_s_choices_are_submitted_together(live, pages_freed, monkeypatch):
    """A request's n choices go to the engine at once, not one engine step after another (each submit waits for the
    engine's next look at its commands); one refused still fails the request, whose other choices are aborted."""
    engine = live.app.state.jaxserve.engine
    real_submit = engine.submit
    waiting, most = 0, 0

    async def counted_submit(*args, **kwargs):
        nonlocal waiting, most
        waiting += 1
        most = max(most, waiting)
        try:
            return await real_submit(*args, **kwargs)
        finally:
            waiting -= 1

    monkeypatch.setattr(engine, "submit", counted_submit)
    r = post(live, "/v1/completions", {**GOOD, "n": 4, "temperature": 0.8, "seed": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text
    assert most == 4
    before = abort_count(live)
    r = post(live, "/v1/completions", {**GOOD, "prompt": [[5, 6], [5, 10**6], [7]], "max_tokens": 100,
                                       "ignore_eos": True})
    assert r.status_code == 400 and "[0, 320)" in r.json()["error"]["message"], r.text
    deadline = time.time() + 30
    while abort_count(live) < before + 2 and time.time() < deadline:  # the two accepted prompts, aborted
        time.sleep(0.05)
    assert abort_count(live) == before + 2


def test_sglang_model_info_and_health_generate(live, pages_freed):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for path in ("/get_model_info", "/model_info"):
        info = httpx.get(live.url + path, headers=headers).json()
        assert info["model_path"] == "tiny" and info["is_generation"] is True
        assert httpx.get(live.url + path).status_code == 401
    assert httpx.get(live.url + "/health_generate").json() == {"status": "ok"}  # open, as /health is
    for path in ("/get_server_info", "/server_info"):
        info = httpx.get(live.url + path, headers=headers).json()
        assert info["model_path"] == "tiny" and info["context_length"] > 0 and info["max_running_requests"] > 0
        assert info["max_total_num_tokens"] == info["internal_states"][0]["memory_usage"]["kv_pages_total"] * info[
            "page_size"] > 0
        assert httpx.get(live.url + path).status_code == 401
    assert httpx.post(live.url + "/sleep?level=1", headers=headers).json() == {"status": "ok"}
    try:  # an engine that cannot generate: 503, where /health still answers 200
        assert httpx.get(live.url + "/health_generate").status_code == 503
    finally:
        assert httpx.post(live.url + "/wake_up", headers=headers).json() == {"status": "ok"}


# ----- concurrency and cancellation ------------------------------------------------------------------
def test_32_concurrent_streams_match_their_solo_runs(client, live, pages_freed):
    prompts = [f"{PROMPT} {i}" for i in range(32)]
    solo = {p: client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text
            for p in prompts}

    async def run():
        aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def one(p):
            stream = await aclient.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0,
                                                      stream=True)
            text, reason = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    start = time.time()
    results = asyncio.run(run())
    # 32 requests through 8 slots: the burst queues and still finishes in bounded time.
    assert time.time() - start < 90
    assert all(reason == "length" for _, reason in results)
    assert [text for text, _ in results] == [solo[p] for p in prompts]


def test_closing_a_stream_aborts_the_request_and_frees_pages(client, live, pages_freed):
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=120, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()

    async def wait_idle(engine):
        for _ in range(200):
            stats = await engine.stats()
            if stats["running"] == 0 and stats["waiting"] == 0:
                return stats
            await asyncio.sleep(0.05)
        return stats

    stats = live.engine_call(wait_idle)
    assert stats["running"] == 0 and stats["waiting"] == 0
    metrics = httpx.get(live.url + "/metrics").text
    assert 'jaxserve_requests_total{finish_reason="abort"}' in metrics


def test_embeddings_are_the_engine_s_as_floats_and_as_base64(client, live, model, pages_freed):
    import numpy as np

    import jaxserve

    want = [o["embedding"] for o in jaxserve.embed(model, [PROMPT, "jumps", [5, 6, 7]], use_tqdm=False)]
    # The openai client asks for base64 and decodes it itself.
    got = client.embeddings.create(model="tiny", input=[PROMPT, "jumps"]).data
    got += client.embeddings.create(model="tiny", input=[[5, 6, 7]]).data
    assert [d.index for d in got] == [0, 1, 0]
    for d, w in zip(got, want):
        np.testing.assert_allclose(d.embedding, w, rtol=1e-5, atol=1e-6)
    r = post(live, "/v1/embeddings", {"model": "tiny", "input": PROMPT, "encoding_format": "float",
                                      "normalize": False, "truncate_prompt_tokens": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["usage"]["prompt_tokens"] == 2
    (item,) = body["data"]
    want = jaxserve.embed(model, [model.tokenizer.encode(PROMPT)[-2:]], jaxserve.PoolingParams(normalize=False),
                          use_tqdm=False)[0]["embedding"]
    np.testing.assert_allclose(item["embedding"], want, rtol=1e-5, atol=1e-6)
    assert abs(np.linalg.norm(item["embedding"]) - 1) > 1e-3  # not normalized, as asked
    # vLLM's /pooling (its openai_pooling_client example): a causal LM's pooled output is its embedding
    pooled = post(live, "/pooling", {"model": "tiny", "input": [PROMPT, "jumps"]}).json()
    assert [(d["index"], d["object"]) for d in pooled["data"]] == [(0, "pooling"), (1, "pooling")]
    for d, w in zip(pooled["data"], [o["embedding"] for o in jaxserve.embed(model, [PROMPT, "jumps"],
                                                                           use_tqdm=False)]):
        np.testing.assert_allclose(d["data"], w, rtol=1e-5, atol=1e-6)
    assert pooled["usage"]["prompt_tokens"] == sum(len(model.tokenizer.encode(t)) for t in (PROMPT, "jumps"))
    bad = post(live, "/pooling", {"model": "tiny", "input": "x", "dimensions": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"


def test_score_and_rerank_are_the_embeddings_cosines(live, model, pages_freed):
    import jaxserve

    docs = ["The quick brown fox", "jumps over", "the lazy dog", "The quick brown"]
    want = [o["score"] for o in jaxserve.score(model, PROMPT, docs, use_tqdm=False)]
    r = post(live, "/score", {"model": "tiny", "text_1": PROMPT, "text_2": docs})
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1, 2, 3]
    assert [d["score"] for d in r.json()["data"]] == pytest.approx(want, abs=1e-5)
    assert want[0] == pytest.approx(1.0)  # the same text
    pairs = post(live, "/v1/score", {"model": "tiny", "text_1": docs[:2], "text_2": docs[2:]}).json()["data"]
    assert [d["score"] for d in pairs] == pytest.approx(
        [o["score"] for o in jaxserve.score(model, docs[:2], docs[2:], use_tqdm=False)], abs=1e-5)
    r = post(live, "/rerank", {"model": "tiny", "query": PROMPT, "documents": docs, "top_n": 3})
    assert r.status_code == 200, r.text
    ranked = r.json()["results"]
    assert [x["index"] for x in ranked] == sorted(range(4), key=lambda i: -want[i])[:3]
    assert ranked[0]["document"]["text"] == docs[0] and ranked[0]["relevance_score"] == pytest.approx(1.0)
    assert r.json()["usage"]["total_tokens"] > 0


def test_score_takes_vllm_s_newer_names_of_its_two_sides(live, pages_freed):
    """vLLM's current /score spells text_1 / text_2 as data_1 / data_2 (its cross-encoder example), queries /
    documents or queries / items: the same scores; two spellings of one side, or of two pairs, are a 400 naming them."""
    docs = ["The quick brown fox", "the lazy dog"]
    want = post(live, "/score", {"model": "tiny", "text_1": PROMPT, "text_2": docs}).json()["data"]
    for first, second in (("data_1", "data_2"), ("queries", "documents"), ("queries", "items")):
        r = post(live, "/score", {"model": "tiny", first: PROMPT, second: docs})
        assert r.status_code == 200, r.text
        assert [d["score"] for d in r.json()["data"]] == pytest.approx([d["score"] for d in want])
    for body, param in (({"text_1": PROMPT, "data_1": PROMPT, "text_2": docs}, "data_1"),
                        ({"data_1": PROMPT, "data_2": docs, "text_2": docs}, "text_2"),
                        ({"data_1": PROMPT, "text_2": docs}, "text_2"), ({"data_1": PROMPT}, "data_2"),
                        ({"data_2": docs}, "text_1"), ({"data_1": [], "data_2": docs}, "data_1"),
                        ({"data_1": ["a", "b"], "data_2": ["c"]}, "data_1")):
        r = post(live, "/score", {"model": "tiny", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    rerank = post(live, "/rerank", {"model": "tiny", "query": PROMPT, "documents": docs}).json()
    assert rerank["usage"]["prompt_tokens"] == rerank["usage"]["total_tokens"] > 0  # vLLM's RerankUsage


def test_vllm_serve_options_reach_the_routes(model, tiny_checkpoint, tmp_path, caplog):
    """A server as `vllm serve` starts by default has no max_tokens cap but the context (a chat without max_tokens
    runs to it); --max-logprobs bounds every logprobs field; --enable-log-requests logs each request's id and params,
    never the prompt; --tokenizer's folder is the one the routes use; --stream-interval 3 streams 3 tokens a chunk."""
    import logging
    import shutil

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_checkpoint[0], tokenizer, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    template = "{% for m in messages %}{{ m['content'] }}!{% endfor %}"
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    if (tokenizer / "chat_template.jinja").exists():  # newer transformers keep the template there
        (tokenizer / "chat_template.jinja").write_text(template)
    caplog.set_level(logging.INFO, logger="jaxserve.server")
    app = create_app(model, ENGINE_CONFIG, ServerConfig(model_name="tiny", api_key=API_KEY, max_logprobs=3,
                                                        log_requests=True, tokenizer=str(tokenizer),
                                                        stream_interval=3))
    with LiveServer(app) as server:
        ids = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        assert ids == model.tokenizer.encode("hi!")  # --tokenizer's template
        long = post(server, "/v1/completions", {**GOOD, "prompt": "fox", "max_tokens": 200, "ignore_eos": True})
        assert long.status_code == 200 and long.json()["usage"]["completion_tokens"] == 200, long.text
        chat = post(server, "/v1/chat/completions", {**CHAT_BODY, "max_tokens": None, "ignore_eos": True})
        usage = chat.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN, chat.text
        assert post(server, "/v1/completions", {**GOOD, "max_tokens": None}).json()["usage"]["completion_tokens"] <= 16
        for path, body, param in (("/v1/completions", {**GOOD, "logprobs": 4}, "logprobs"),
                                  ("/v1/completions", {**GOOD, "prompt_logprobs": 4}, "prompt_logprobs"),
                                  ("/v1/chat/completions", {**CHAT_BODY, "logprobs": True, "top_logprobs": 4},
                                   "top_logprobs")):
            r = post(server, path, body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "--max-logprobs" in r.json()["error"]["message"]
        assert post(server, "/v1/completions", {**GOOD, "logprobs": 3}).status_code == 200
        with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={**GOOD, "max_tokens": 7, "logprobs": 0, "stream": True, "ignore_eos": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        # The prefill's token, a 4-token call's cut at 3, the last call's 2.
        assert [len(e["choices"][0]["logprobs"]["tokens"]) for e in events] == [1, 3, 1, 2]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Received request")]
    assert any(line.startswith("Received request cmpl-") and "params: SamplingParams(max_tokens=200" in line
               for line in logged), logged
    assert PROMPT not in caplog.text and "hi!" not in caplog.text
    with pytest.raises(ValueError, match="max_logprobs"):
        ServerConfig(max_logprobs=21)


# ----- bad input ---------------------------------------------------------------------------------------
GOOD = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
CHAT_BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
# A bounded string: a tiny random model sampling a free one may run to max_tokens before the call closes.
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time"}}]


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", {**GOOD, "model": "nope"}, 404, "model", "model_not_found"),
    ("/v1/completions", '{"model": "tiny", "prompt": ', 400, None, None),
    ("/v1/completions", "[1, 2]", 400, None, None),
    ("/v1/completions", {**GOOD, "max_tokens": "3"}, 400, "max_tokens", None),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {**GOOD, "prompt": 5}, 400, "prompt", None),
    ("/v1/completions", {**GOOD, "n": 1.5}, 400, "n", None),
    ("/v1/completions", {**GOOD, "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/completions", {k: v for k, v in GOOD.items() if k != "prompt"}, 400, "prompt", None),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {**GOOD, "presence_penalty": 3}, 400, "presence_penalty", None),
    # top_k travels as int32: past it, the step that batches it raised and failed every running request.
    ("/v1/completions", {**GOOD, "temperature": 1.0, "top_k": 2**31}, 400, "top_k", None),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {**GOOD, "max_tokens": 129}, 400, "max_tokens", None),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n", None),
    ("/v1/completions", {**GOOD, "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "stop", None),
    ("/v1/completions", {**GOOD, "stop_token_ids": [2**40]}, 400, "stop_token_ids", None),
    ("/v1/completions", {**GOOD, "min_tokens": 1, "stop_token_ids": list(range(3, 20))}, 400, "stop_token_ids", None),
    ("/v1/completions", {**GOOD, "logit_bias": {"x": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {**GOOD, "logit_bias": {"5": 101}}, 400, "logit_bias", None),
    ("/v1/completions", {**GOOD, "logit_bias": {"99999": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {**GOOD, "prompt": [1, 2, 99999]}, 400, "prompt", None),
    ("/v1/completions", {**GOOD, "prompt": [[1, 2], [-1]]}, 400, "prompt", None),
    ("/v1/completions", {**GOOD, "prompt": "fox " * 200, "max_tokens": 100}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "fox " * 300}]}, 400,
     "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found"),
    ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "function"}]}, 400, "tools", None),
    ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "function", "function": {"name": 5}}]}, 400,
     "tools", None),
    ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, 400,
     "tools", None),
    ("/v1/chat/completions", {**CHAT_BODY, "tools": {"type": "function", "function": {"name": "f"}}}, 400,
     "tools", None),
    # Output constraints: bad ones, and more than one.
    ("/v1/chat/completions", {**CHAT_BODY, "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "get_time_zone"}}}, 400,
     "tool_choice", None),
    ("/v1/chat/completions", {**CHAT_BODY, "tools": TOOLS, "tool_choice": "sometimes"}, 400, "tool_choice", None),
    ("/v1/chat/completions", {**CHAT_BODY, "tool_choice": "required"}, 400, "tool_choice", None),
    ("/v1/chat/completions", {**CHAT_BODY, "response_format": {"type": "xml"}}, 400, "response_format", None),
    ("/v1/chat/completions", {**CHAT_BODY, "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
     400, "response_format", None),
    ("/v1/completions", {**GOOD, "guided_grammar": "root ::= item"}, 400, "guided_grammar", None),
    ("/v1/completions", {**GOOD, "allowed_token_ids": [10**7]}, 400, "allowed_token_ids", None),
    ("/v1/completions", {**GOOD, "allowed_token_ids": []}, 400, "allowed_token_ids", None),
    # logprob_token_ids: without logprobs (a chat's false), more than 128, past the vocabulary, none, bools, beams.
    ("/v1/completions", {**GOOD, "logprob_token_ids": [5]}, 400, "logprob_token_ids", None),
    ("/v1/chat/completions", {**CHAT_BODY, "logprob_token_ids": [5]}, 400, "logprob_token_ids", None),
    ("/v1/completions", {**GOOD, "logprobs": 0, "logprob_token_ids": list(range(129))}, 400, "logprob_token_ids",
     None),
    ("/v1/completions", {**GOOD, "logprobs": 0, "logprob_token_ids": [5, 320]}, 400, "logprob_token_ids", None),
    ("/v1/completions", {**GOOD, "logprobs": 0, "logprob_token_ids": []}, 400, "logprob_token_ids", None),
    ("/v1/completions", {**GOOD, "logprobs": 0, "logprob_token_ids": [True]}, 400, "logprob_token_ids", None),
    ("/v1/completions", {**GOOD, "n": 2, "use_beam_search": True, "logprob_token_ids": [5]}, 400,
     "logprob_token_ids", None),
    ("/v1/completions", {**GOOD, "bad_words": [" "]}, 400, "bad_words", None),
    ("/v1/completions", {**GOOD, "priority": 3}, 400, "priority", None),  # the server runs fcfs
    ("/v1/chat/completions", {**CHAT_BODY, "bad_words": ["abcdefghij" * 10]}, 400, "bad_words", None),
    ("/classify", {"model": "tiny", "input": "hi"}, 400, "model", None),  # a causal LM has no labels
    ("/v1/embeddings", {"model": "tiny", "input": []}, 400, "input", None),
    ("/v1/embeddings", {"model": "tiny", "input": ["a", ""]}, 400, "input", None),
    ("/v1/embeddings", {"model": "tiny", "input": [1, 2, 99999]}, 400, "input", None),
    ("/v1/embeddings", {"model": "tiny", "input": "fox " * 300}, 400, "input", "context_length_exceeded"),
    ("/v1/embeddings", {"model": "tiny", "input": "fox", "dimensions": 5}, 400, "dimensions", None),
    ("/v1/embeddings", {"model": "tiny", "input": "fox", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens",
     None),
    ("/v1/embeddings", {"model": "tiny", "input": "fox", "encoding_format": "int8"}, 400, "encoding_format", None),
    ("/v1/embeddings", {"model": "nope", "input": "fox"}, 404, "model", "model_not_found"),
    ("/score", {"model": "tiny", "text_1": [], "text_2": "fox"}, 400, "text_1", None),
    ("/score", {"model": "tiny", "text_1": ["a", "b"], "text_2": ["c"]}, 400, "text_1", None),
    ("/v1/score", {"model": "tiny", "text_1": "fox", "text_2": ["a", ""]}, 400, "text_2", None),
    ("/rerank", {"model": "tiny", "query": "fox", "documents": []}, 400, "documents", None),
    ("/v1/rerank", {"model": "tiny", "query": "", "documents": ["a"]}, 400, "query", None),
    ("/v2/rerank", {"model": "tiny", "query": "fox", "documents": ["a"], "top_n": -1}, 400, "top_n", None),
    ("/v1/completions", {**GOOD, "guided_regex": "(?<=a)b"}, 400, "guided_regex", None),
    ("/v1/completions", {**GOOD, "guided_choice": []}, 400, "guided_choice", None),
    ("/v1/completions", {**GOOD, "guided_json": {"type": "object", "patternProperties": {}}}, 400, "guided_json",
     None),
    # Malformed schemas (a keyword of the wrong JSON type, a bound past its digits, a regex of gigabytes: 30 nested
    # arrays) and a regex nesting past the parser's recursion: 400s, not 500s, the last without eating the memory.
    ("/v1/completions", {**GOOD, "guided_json": {"type": "object", "properties": 5}}, 400, "guided_json", None),
    ("/v1/completions", {**GOOD, "guided_json": {"allOf": [5], "type": "object"}}, 400, "guided_json", None),
    ("/v1/completions", {**GOOD, "guided_json": {"type": "number", "minimum": 1e-300, "maximum": 1e-299}}, 400,
     "guided_json", None),
    ("/v1/completions", {**GOOD, "guided_json": functools.reduce(lambda s, _: {"type": "array", "items": s},
                                                                 range(30), {"type": "integer"})},
     400, "guided_json", None),
    ("/v1/completions", {**GOOD, "guided_regex": "(" * 300 + "a" + ")" * 300}, 400, "guided_regex", None),
    ("/v1/completions", {**GOOD, "structured_outputs": {"json_object": True, "whitespace_pattern": "("}}, 400,
     "structured_outputs", None),
    ("/v1/chat/completions", {**CHAT_BODY, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": [[1]]}}}]},
     400, "tools", None),
    ("/v1/completions", {**GOOD, "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "structured_outputs",
     None),
    ("/v1/chat/completions", {**CHAT_BODY, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400,
     "guided_regex", None),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{city"}}]}]},
     400, "messages", None),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"arguments": "{}"}}]}]},
     400, "messages", None),
    # SGLang's /generate: errors name its own fields.
    ("/generate", {"sampling_params": {}}, 400, "text", None),
    ("/generate", {"text": PROMPT, "sampling_params": {"temperature": "hot"}}, 400, "sampling_params.temperature",
     None),
    ("/generate", {"text": PROMPT, "sampling_params": {"top_p": 1.5}}, 400, "sampling_params.top_p", None),
    ("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": -1}}, 400, "sampling_params.max_new_tokens",
     None),
    ("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 129}}, 400,
     "sampling_params.max_new_tokens", None),
    ("/generate", {"text": PROMPT, "sampling_params": {"max_tokens": 5}}, 400, "sampling_params.max_tokens", None),
    ("/generate", {"text": PROMPT, "sampling_params": {"regex": "(?=a)b"}}, 400, "sampling_params.regex", None),
    ("/generate", {"text": [PROMPT, "a"], "sampling_params": [{}]}, 400, "sampling_params", None),
    ("/generate", {"text": [PROMPT, "a"], "sampling_params": [{"n": 2}, {}]}, 400, "sampling_params.n", None),
    ("/generate", {"input_ids": [1, 2, 99999]}, 400, "input_ids", None),
    ("/generate", {"input_ids": []}, 400, "input_ids", None),
    ("/generate", {"text": "fox " * 300}, 400, "text", "context_length_exceeded"),
    ("/generate", {"text": PROMPT, "return_logprob": True, "top_logprobs_num": 21}, 400, "top_logprobs_num", None),
    ("/generate", {"text": PROMPT, "return_logprob": True, "logprob_start_len": 99}, 400, "logprob_start_len", None),
    ("/generate", {"text": PROMPT, "return_logprob": True, "logprob_start_len": 0, "stream": True}, 400,
     "logprob_start_len", None),
    ("/generate", {"text": [PROMPT, "a"], "return_logprob": [True]}, 400, "return_logprob", None),
    ("/generate", {"text": [PROMPT, "a"], "rid": ["x", "x"]}, 400, "rid", None),
    ("/generate", {"text": PROMPT, "lora_path": "nope"}, 400, "lora_path", None),
    ("/generate", {"text": PROMPT, "image_data": "cat.png"}, 400, "image_data", None),
])
def test_bad_request_gets_openai_error_and_server_keeps_serving(live, path, body, status, param, code):
    r = post(live, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    assert post(live, "/v1/completions", GOOD).status_code == 200


def test_huge_body_is_413(live):
    r = post(live, "/v1/completions", {**GOOD, "prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert post(live, "/v1/completions", GOOD).status_code == 200


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_api_key_is_401(live, key):
    r = post(live, "/v1/completions", GOOD, key=key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert post(live, "/v1/completions", GOOD).status_code == 200


def test_sleep_and_wake_up_routes(live, pages_freed):
    """vLLM's sleep-mode routes: /sleep frees the KV pool (level 1) or the weights too (level 2), requests get 400s
    meanwhile, /is_sleeping says so, /wake_up (after level 2 reading the checkpoint again) serves the same greedy
    text; other levels are refused."""
    body = {**GOOD, "max_tokens": 6, "temperature": 0}
    before = post(live, "/v1/completions", body).json()["choices"][0]["text"]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    bad = httpx.post(live.url + "/sleep?level=3", headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "level"
    for level in ("1", "2"):
        assert httpx.post(live.url + f"/sleep?level={level}", headers=auth).json() == {"status": "ok"}
        try:
            assert httpx.get(live.url + "/is_sleeping").json() == {"is_sleeping": True}
            asleep = post(live, "/v1/completions", body)
            assert asleep.status_code == 400 and "asleep" in asleep.json()["error"]["message"]
        finally:
            assert httpx.post(live.url + "/wake_up", headers=auth).json() == {"status": "ok"}
        assert httpx.get(live.url + "/is_sleeping").json() == {"is_sleeping": False}
        assert post(live, "/v1/completions", body).json()["choices"][0]["text"] == before
    assert httpx.post(live.url + "/sleep").status_code == 401  # the API key, as the other admin routes


def test_a_server_of_params_refuses_a_level_2_sleep(tiny_checkpoint):
    """A model given as params (with its tokenizer) is served, and has no checkpoint to read its weights from again:
    level 2 is refused by name, level 1 served."""
    from jaxserve import LoadedModel

    m = load(tiny_checkpoint[0])
    app = create_app(LoadedModel.from_params(m.params, m.config, m.tokenizer, name="tiny"), ENGINE_CONFIG,
                     ServerConfig())
    with LiveServer(app) as server:
        assert post(server, "/v1/completions", GOOD, key=None).json()["choices"][0]["text"]
        r = httpx.post(server.url + "/sleep?level=2")
        assert r.status_code == 400 and "no checkpoint" in r.json()["error"]["message"]
        assert httpx.post(server.url + "/sleep?level=1").json() == {"status": "ok"}
        assert httpx.post(server.url + "/wake_up").json() == {"status": "ok"}


def test_request_ids_name_the_answer_as_vllm_s_do(live, model, pages_freed):
    """vLLM's request ids: the body's request_id names the answer ("cmpl-<id>", "chatcmpl-<id>", streamed events
    too), an X-Request-Id header outranks it, two requests in flight may share one; --enable-request-id-headers puts
    X-Request-Id on every answer (the request's, or a new one)."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert post(live, "/v1/completions", {**GOOD, "request_id": "job-7"}).json()["id"] == "cmpl-job-7"
    assert post(live, "/v1/chat/completions", {**CHAT_BODY, "request_id": "job-8"}).json()["id"] == "chatcmpl-job-8"
    r = httpx.post(live.url + "/v1/completions", json={**GOOD, "request_id": "body"},
                   headers={**auth, "X-Request-Id": "header"}, timeout=60)
    assert r.json()["id"] == "cmpl-header" and "x-request-id" not in r.headers  # the flag is off here
    with httpx.stream("POST", live.url + "/v1/completions", json={**GOOD, "request_id": "s1", "stream": True},
                      headers=auth, timeout=60) as r:
        ids = {json.loads(line[6:])["id"] for line in r.iter_lines() if line.startswith("data: {")}
    assert ids == {"cmpl-s1"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        same = list(pool.map(lambda _: post(live, "/v1/completions", {**GOOD, "max_tokens": 8, "request_id": "dup"}),
                             range(4)))
    assert [r.status_code for r in same] == [200] * 4 and {r.json()["id"] for r in same} == {"cmpl-dup"}
    assert post(live, "/v1/completions", {**GOOD, "request_id": 7}).status_code == 400  # a string, as vLLM's
    app = create_app(model, ENGINE_CONFIG, ServerConfig(model_name="tiny", enable_request_id_headers=True))
    with LiveServer(app) as server:
        r = httpx.post(server.url + "/v1/completions", json=GOOD, headers={"X-Request-Id": "abc"}, timeout=60)
        assert r.headers["x-request-id"] == "abc" and r.json()["id"] == "cmpl-abc"
        assert len(httpx.get(server.url + "/health").headers["x-request-id"]) == 32  # a new one


def test_cors_preflights_are_answered_as_vllm_answers_them(live):
    """vLLM's default CORS (any origin, method and header): a browser's preflight gets its allow headers, and a
    cross-origin request its allow-origin."""
    r = httpx.options(live.url + "/v1/chat/completions", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    got = httpx.get(live.url + "/v1/models", headers={"Origin": "https://ui.example",
                                                      "Authorization": f"Bearer {API_KEY}"})
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == "*"


def test_unknown_route_is_openai_style_404(live):
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("method, path, body", [
    ("encode", "/v1/completions", GOOD),
    ("encode", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    # Penalties too: the step variant test_logprobs_and_penalties compiled.
    ("decode", "/v1/completions", {**GOOD, "logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": 0.5}),
])
def test_tokenizer_work_leaves_the_server_answering(live, monkeypatch, method, path, body):
    """Tokenizing a megabyte of prompt text, or spelling out 64 choices' top-20 logprobs, takes
    seconds; on the event loop that stalled every open stream and /health meanwhile. Here the
    server's tokenizer is held in that work until /health has answered."""
    tok = live.app.state.jaxserve.tokenizer
    real = getattr(tok, method)
    entered, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(tok, method, held)
    # Tokens earlier tests spelled out are read from the process's table (token_spellings) without decoding.
    monkeypatch.setattr(token_spellings(tok), "_texts", {})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, live, path, body)
        assert entered.wait(10)
        try:
            health = httpx.get(live.url + "/health", timeout=1.5)
        finally:
            release.set()
        assert health.status_code == 200
        assert slow.result().status_code == 200


def test_a_slow_constraint_compile_leaves_other_requests_answered(live, monkeypatch):
    """A large schema or grammar compiles for seconds; it runs on a thread of its own, so a plain request
    tokenizes, runs and answers while a constrained one is still compiling, and so does another constrained one
    (the constraint threads are several)."""
    engine = live.app.state.jaxserve.engine.engine
    real = engine.structured_guide
    entered, release = threading.Event(), threading.Event()

    def held(spec):
        if spec.regex == "[0-9]{2}":
            entered.set()
            release.wait(30)
        return real(spec)

    monkeypatch.setattr(engine, "structured_guide", held)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, live, "/v1/completions", {**GOOD, "max_tokens": 4, "guided_regex": "[0-9]{2}"})
        assert entered.wait(10)
        try:
            plain = post(live, "/v1/completions", {**GOOD, "max_tokens": 4}, timeout=10)
            other = post(live, "/v1/completions", {**GOOD, "max_tokens": 3, "guided_regex": "[a-z]{3}"}, timeout=10)
            assert not slow.done()  # answered while the constraint still compiles
        finally:
            release.set()
        assert plain.status_code == 200
        assert other.status_code == 200 and re.fullmatch("[a-z]{3}", other.json()["choices"][0]["text"])
        answer = slow.result()
        assert answer.status_code == 200 and re.fullmatch("[0-9]{2}", answer.json()["choices"][0]["text"])


def test_routes_answer_503_while_the_engine_is_gone(live, monkeypatch):
    """During shutdown the engine thread refuses calls; /flush_cache and /metrics answered 500 "internal error"."""
    async def gone(*args):
        raise EngineDeadError("the engine thread is not running")

    engine = live.app.state.jaxserve.engine
    monkeypatch.setattr(engine, "clear_prefix_cache", gone)
    monkeypatch.setattr(engine, "stats", gone)
    for r in (post(live, "/flush_cache", {}), httpx.get(live.url + "/metrics")):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable"


# ----- health, models, metrics ------------------------------------------------------------------------
def test_health_models_and_metrics(client, live):
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    assert httpx.get(live.url + "/ping").json() == httpx.post(live.url + "/ping").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    r = httpx.get(live.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ('jaxserve_requests_total{finish_reason="length"}', "jaxserve_prompt_tokens_total",
                 "jaxserve_generation_tokens_total", "jaxserve_time_to_first_token_seconds_bucket",
                 "jaxserve_time_per_output_token_seconds_bucket", "jaxserve_requests_running",
                 "jaxserve_requests_waiting", "jaxserve_kv_pages_used", "jaxserve_prefix_cache_hit_rate"):
        assert name in text, name
    generated = [line for line in text.splitlines() if line.startswith("jaxserve_generation_tokens_total")]
    assert float(generated[0].split()[-1]) >= 4


def test_version_and_model_retrieval(live):
    assert isinstance(httpx.get(live.url + "/version").json()["version"], str)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    card = httpx.get(live.url + "/v1/models/tiny", headers=headers)
    assert card.status_code == 200 and card.json()["id"] == "tiny" and card.json()["max_model_len"] == MAX_MODEL_LEN
    missing = httpx.get(live.url + "/v1/models/org/nope", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(live.url + "/v1/models/tiny").status_code == 401


def test_tokenize_counts_what_the_generation_routes_count(client, live, pages_freed):
    """/tokenize (vLLM's) gives the ids the completions and chat routes feed the model: its count is their
    usage.prompt_tokens; /detokenize spells them back."""
    comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    r = post(live, "/tokenize", {"model": "tiny", "prompt": PROMPT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == comp.usage.prompt_tokens
    assert body["max_model_len"] == MAX_MODEL_LEN and len(body["token_strs"]) == body["count"]
    assert body["tokens"] == live.app.state.jaxserve.tokenizer.encode(PROMPT, add_special_tokens=False)
    back = post(live, "/detokenize", {"tokens": body["tokens"]})  # the model may be left out, as in vLLM
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}

    messages = [{"role": "user", "content": "def add(a, b):"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    r = post(live, "/tokenize", {"model": "tiny", "messages": messages})
    assert r.status_code == 200 and r.json()["count"] == chat.usage.prompt_tokens
    assert r.json()["token_strs"] is None
    bare = post(live, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < chat.usage.prompt_tokens  # without the assistant turn's opening


def test_truncate_prompt_tokens_serves_a_prompt_past_the_context(live, pages_freed):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens are what the context check, the usage and echo
    see; 0 is refused by name."""
    ids = list(range(10, 10 + 50)) * 6  # 300 tokens > MAX_MODEL_LEN
    body = {"model": "tiny", "prompt": ids, "max_tokens": 2, "temperature": 0, "truncate_prompt_tokens": 16}
    r = post(live, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 16
    alone = post(live, "/v1/completions", {**body, "prompt": ids[-16:], "truncate_prompt_tokens": None}).json()
    assert r.json()["choices"][0]["text"] == alone["choices"][0]["text"]
    chat = post(live, "/v1/chat/completions", {**CHAT_BODY, "truncate_prompt_tokens": 4})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 4
    bad = post(live, "/v1/completions", {**body, "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"
    # vLLM's -1 (the model's length): a short prompt whole (its first token was once cut), a long one's end that
    # leaves room for max_tokens; an embedding's up to one token short of the context
    short = post(live, "/v1/completions", {**body, "prompt": ids[:8], "truncate_prompt_tokens": -1, "echo": True,
                                           "logprobs": 0}).json()
    assert short["usage"]["prompt_tokens"] == 8 and len(short["choices"][0]["logprobs"]["tokens"]) == 10
    whole = post(live, "/v1/completions", {**body, "truncate_prompt_tokens": -1})
    assert whole.status_code == 200 and whole.json()["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 2, whole.text
    embedded = post(live, "/v1/embeddings", {"model": "tiny", "input": ids, "truncate_prompt_tokens": -1}).json()
    assert embedded["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 1
    assert post(live, "/v1/embeddings", {"model": "tiny", "input": ids[:8], "truncate_prompt_tokens": -1}).json()[
        "usage"]["prompt_tokens"] == 8


def test_continue_final_message_leaves_the_assistant_turn_open(client, live, pages_freed):
    """vLLM's continue_final_message: the last (assistant) message is rendered open, so the model continues a
    prefilled answer; the chat route and /tokenize render it alike."""
    tok = live.app.state.jaxserve.tokenizer
    messages = [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "The quick"}]
    want = tok.encode(tok.apply_chat_template(messages, tokenize=False, continue_final_message=True),
                      add_special_tokens=False)
    body = {"model": "tiny", "messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    r = post(live, "/tokenize", body)
    assert r.status_code == 200 and r.json()["tokens"] == want
    assert tok.decode(want).endswith("The quick")
    closed = post(live, "/tokenize", {**body, "continue_final_message": False}).json()["tokens"]
    assert closed != want and closed[:len(want)] == want  # the closed turn only adds its end after the text
    chat = post(live, "/v1/chat/completions", {**body, "max_tokens": 3, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(want)


def test_server_chat_template_replaces_the_checkpoints(model, tmp_path):
    """--chat-template (a file or the template itself) replaces the checkpoint's; chat_template_kwargs reach it."""
    from jaxserve.server.app import resolve_chat_template

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if shout %}!{% endif %}"
    app = create_app(model, ENGINE_CONFIG, ServerConfig(model_name="tiny", chat_template=template))
    with LiveServer(app) as server:
        tok = server.app.state.jaxserve.tokenizer
        messages = [{"role": "user", "content": "hi"}]
        plain = post(server, "/tokenize", {"messages": messages}, key=None).json()["tokens"]
        assert plain == tok.encode("[user] hi\n", add_special_tokens=False)
        shout = post(server, "/tokenize", {"messages": messages, "chat_template_kwargs": {"shout": True}}, key=None)
        assert shout.json()["tokens"] == tok.encode("[user] hi\n!", add_special_tokens=False)
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        resolve_chat_template("/no/such/template.jinja")
    (tmp_path / "t.jinja").write_text(template)
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == template


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/tokenize", {"model": "tiny"}, 400, "prompt", None),
    ("/tokenize", {"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400,
     "prompt", None),
    ("/tokenize", {"model": "tiny", "messages": []}, 400, "messages", None),
    ("/tokenize", {"model": "tiny", "prompt": 5}, 400, "prompt", None),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/detokenize", {"model": "tiny", "tokens": [1, -1]}, 400, "tokens", None),
    ("/detokenize", {"model": "tiny", "tokens": [10 ** 9]}, 400, "tokens", None),
    ("/detokenize", {"model": "tiny"}, 400, "tokens", None),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
     "continue_final_message", None),
    ("/v1/chat/completions", {**CHAT_BODY, "continue_final_message": True}, 400, "continue_final_message", None),
    ("/v1/chat/completions", {**CHAT_BODY, "chat_template_kwargs": {"tokenize": True}}, 400, "chat_template_kwargs",
     None),
])
def test_bad_tokenizer_requests_get_openai_errors(live, path, body, status, param, code):
    r = post(live, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["message"]
    assert post(live, path, body, key=None).status_code == 401
    assert post(live, "/tokenize", {"prompt": "x"}).status_code == 200


def scrape(live) -> dict[str, float]:
    """Every /metrics sample by name and labels, e.g. 'x_total{part="host"}' -> 0.5."""
    samples = {}
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


ENGINE_COUNTERS = ['jaxserve_engine_step_seconds_total{part="prefill_call"}',
                   'jaxserve_engine_step_seconds_total{part="decode_wait"}',
                   'jaxserve_engine_step_seconds_total{part="host"}', "jaxserve_engine_prefix_index_seconds_total",
                   "jaxserve_engine_overlapped_decode_calls_total", "jaxserve_engine_overlapped_prefill_calls_total",
                   "jaxserve_engine_decode_calls_after_prefill_total", "jaxserve_engine_generated_tokens_total",
                   "jaxserve_engine_prefill_tokens_total", "jaxserve_engine_spec_verify_calls_total",
                   "jaxserve_engine_spec_draft_tokens_total", "jaxserve_engine_spec_accepted_tokens_total"]


def test_metrics_expose_the_engine_time_split_and_totals(client, live):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    first = scrape(live)
    step = {part: first[f'jaxserve_engine_step_seconds_total{{part="{part}"}}']
            for part in ("prefill_call", "decode_wait", "host")}
    assert step["prefill_call"] > 0 and step["host"] > 0 and step["decode_wait"] >= 0, step
    assert 0 <= first["jaxserve_engine_prefix_index_seconds_total"] < step["host"]
    assert first["jaxserve_compiled_step_shapes"] >= 1
    assert first["jaxserve_engine_generated_tokens_total"] >= 8
    assert first["jaxserve_engine_prefill_tokens_total"] >= 1
    assert first["jaxserve_engine_overlapped_decode_calls_total"] >= 0

    client.completions.create(model="tiny", prompt=PROMPT + " again", max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    second = scrape(live)
    assert all(second[name] >= first[name] for name in ENGINE_COUNTERS), "engine totals only grow"
    assert second["jaxserve_engine_generated_tokens_total"] >= first["jaxserve_engine_generated_tokens_total"] + 8
    assert second['jaxserve_engine_step_seconds_total{part="host"}'] > step["host"]


def test_null_max_tokens_is_the_default_and_cached_tokens_never_exceed_the_prompt(live, pages_freed):
    # OpenAI documents completions' max_tokens as nullable, default 16. With n samples of a prompt each
    # finds its prefix cached; usage counts the prompt once, and so its cached tokens.
    r = post(live, "/v1/completions", {**GOOD, "max_tokens": None, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16
    prompt = "You are a helpful assistant. " * 6
    body = {**GOOD, "prompt": prompt, "max_tokens": 2}
    assert post(live, "/v1/completions", body).status_code == 200  # the prefix is now cached
    usage = post(live, "/v1/completions", {**body, "n": 4, "temperature": 1.0, "seed": 3}).json()["usage"]
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"], usage


def test_prefix_cache_hits_show_in_usage_and_metrics(client, live, pages_freed):
    system = "You are a helpful assistant. " * 6  # several full pages of shared prefix
    first = client.completions.create(model="tiny", prompt=system + "Question one?", max_tokens=2, temperature=0)
    second = client.completions.create(model="tiny", prompt=system + "Question two?", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0 or first.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    hit = [line for line in httpx.get(live.url + "/metrics").text.splitlines()
           if line.startswith("jaxserve_prefix_cache_hit_rate")]
    assert float(hit[0].split()[-1]) > 0


def test_flush_cache_empties_the_prefix_cache(client, live, pages_freed):
    system = "You are a helpful assistant. " * 6
    client.completions.create(model="tiny", prompt=system + "Question?", max_tokens=2, temperature=0)
    assert scrape(live)["jaxserve_kv_pages_used"] > 0  # the finished request's prefix stays cached
    assert post(live, "/flush_cache", {}, key=None).status_code == 401
    r = post(live, "/flush_cache", {})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert scrape(live)["jaxserve_kv_pages_used"] == 0


def abort_count(live) -> float:
    lines = [line for line in httpx.get(live.url + "/metrics").text.splitlines()
             if line.startswith('jaxserve_requests_total{finish_reason="abort"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


def slow_decodes(live, monkeypatch, seconds: float) -> None:
    """Every decode call of the live engine sleeps first, so a request runs well past a client's exit."""
    runner = live.app.state.jaxserve.engine.engine.runner
    real_decode = runner.decode

    def slow_decode(*args, **kwargs):
        time.sleep(seconds)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(runner, "decode", slow_decode)


def seconds_until_aborted(live, before: float, since: float) -> float:
    """Waits (at most 30 s) for one more aborted request than `before`; the seconds from `since`."""
    while abort_count(live) == before and time.time() < since + 30:
        time.sleep(0.05)
    assert abort_count(live) == before + 1
    return time.time() - since


def test_non_streaming_client_disconnect_aborts(live, pages_freed, monkeypatch):
    slow_decodes(live, monkeypatch, 0.05)  # keeps the request running well past the client's timeout
    before = abort_count(live)
    with pytest.raises(httpx.ReadTimeout):
        post(live, "/v1/completions", {**GOOD, "max_tokens": 128, "ignore_eos": True},
             timeout=httpx.Timeout(60, read=0.3))
    seconds_until_aborted(live, before, time.time())


def finished_count(live) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(live.url + "/metrics").text.splitlines()
               if line.startswith("jaxserve_requests_total{"))


def test_beam_search_stops_when_its_client_disconnects(live, pages_freed):
    # Each beam step is a set of one-token requests that ends well inside the disconnect poll's period: the
    # search must check its client between steps, or it runs to the end unobserved (~100 steps here).
    body = {**GOOD, "max_tokens": 100, "n": 4, "use_beam_search": True, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(live, "/v1/completions", body, timeout=httpx.Timeout(60, read=0.3))
    time.sleep(1.5)
    settled = finished_count(live)
    time.sleep(1.5)
    assert finished_count(live) == settled


def test_streaming_client_disconnect_aborts_before_the_next_token(live, pages_freed, monkeypatch):
    """Closing a stream aborts its request while the engine is still working on it (Starlette
    listens for the disconnect beside the stream), not only when the next chunk fails to send."""
    slow_decodes(live, monkeypatch, 0.25)  # 128 tokens at >= 0.25 s a 4-step call: ~8 s to finish
    before = abort_count(live)
    body = {**GOOD, "max_tokens": 128, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first token is out: the request runs
        closed = time.time()
    assert seconds_until_aborted(live, before, closed) < 4  # far less than the remaining ~120 tokens take


def test_stream_whose_client_left_before_it_started_is_aborted(live, pages_freed, monkeypatch):
    """A client that sends a streaming request and hangs up at once: its request is aborted, not
    run to the end unobserved. (Where the stream's generator is cancelled before its body runs, its
    `finally` never aborts: the response's background task does. Here the generator usually starts
    first, so this checks the outcome, not that race.)"""
    slow_decodes(live, monkeypatch, 0.25)  # 128 tokens at >= 0.25 s a 4-step call: ~8 s to finish
    before = abort_count(live)
    body = json.dumps({**GOOD, "max_tokens": 128, "ignore_eos": True, "stream": True}).encode()
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert seconds_until_aborted(live, before, time.time()) < 5


def test_graceful_shutdown_ends_open_streams(model):
    app = create_app(model, ENGINE_CONFIG, ServerConfig(model_name="tiny", drain_s=0.0))
    server = LiveServer(app).__enter__()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=120, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    server.__exit__()  # what SIGINT/SIGTERM trigger: should_exit, then the server's shutdown
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]  # the stream ends cleanly
    assert reasons[-1] in ("abort", "length")
    assert not server.thread.is_alive()
    assert not app.state.jaxserve.engine.is_running and app.state.jaxserve.engine.engine.closed


def test_bench_load_generator_smoke(live):
    from bench import serving

    args = serving.parse_args(["--url", live.url, "--num-requests", "6", "--rate", "20", "--input-len", "24",
                               "--output-len", "6", "--shared-prefix-len", "32", "--shared-prefix-share", "0.5"])
    items = serving.make_workload(args, vocab=320, seed=0)
    before = serving.scrape_engine(live.url)
    outcomes, duration = asyncio.run(serving.run_load(live.url, "tiny", items, args.rate, API_KEY, 0, 60))
    row = serving.summarize(outcomes, duration)
    row.update(serving.engine_fields(before, serving.scrape_engine(live.url)))
    assert row["success_rate"] == 1.0, row["errors"]
    assert row["output_tok_per_s"] > 0 and row["ttft_p50_ms"] > 0 and row["tpot_p99_ms"] >= row["tpot_p50_ms"]
    assert row["host_s"] > 0 and row["engine_generated_tokens"] >= sum(i.max_tokens for i in items)
    assert "| success |" in serving.table([row]) and "| engine host s |" in serving.table([row])


def test_bench_warm_up_prefixes_differ_from_the_measured_ones():
    from bench import serving

    args = serving.parse_args(["--url", "http://unused", "--num-requests", "4", "--shared-prefix-len", "32",
                               "--shared-prefix-share", "1"])
    measured = serving.make_workload(args, vocab=320, seed=0)
    warm = serving.make_workload(args, vocab=320, seed=1, prefix_seed=f"warm-up {args.seed}")
    assert len({tuple(i.prompt[:32]) for i in measured}) == 1  # one shared prefix...
    assert {tuple(i.prompt[:32]) for i in measured}.isdisjoint(tuple(i.prompt[:32]) for i in warm)  # ...not the warm-up's


def test_bench_server_process_answers_then_stops_on_sigterm(tiny_checkpoint):
    from bench import serving

    args = serving.parse_args(["--model", tiny_checkpoint[0], "--num-pages", "64", "--max-running", "2",
                               "--max-tokens-per-step", "32", "--batch-buckets", "2", "--prefill-buckets", "32",
                               "--max-model-len", "128", "--compilation-cache", "", "--server-start-timeout", "300"])
    with serving.ServerProcess(args, prefix_caching=True) as server:
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        assert server.engine_config["batch_buckets"] == [2] and server.device.startswith("cpu")
        proc = server.proc
        start = time.monotonic()
    # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is a clean stop, -SIGKILL
    # would mean stop() had to kill it.
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - start < server.stop_timeout


def test_failing_step_answers_500_and_error_event_then_recovers(client, live, pages_freed, monkeypatch):
    runner = live.app.state.jaxserve.engine.engine.runner
    real_decode = runner.decode

    def failing_decode(*args, **kwargs):
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(runner, "decode", failing_decode)
    r = post(live, "/v1/completions", GOOD)
    assert r.status_code == 500 and "injected device failure" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    with pytest.raises(openai.APIError, match="injected device failure"):
        list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    monkeypatch.setattr(runner, "decode", real_decode)
    assert post(live, "/v1/completions", GOOD).status_code == 200


@pytest.mark.parametrize("structured", [False, True])
def test_warmup_server_answers_without_compiling(model, structured):
    config = EngineConfig(num_pages=64, max_running=2, max_tokens_per_step=32, batch_buckets=(2,),
                          prefill_buckets=(32,), decode_steps=2, max_model_len=128)
    app = create_app(model, config, ServerConfig(model_name="tiny", warmup=True, warmup_structured=structured))
    with LiveServer(app) as server:
        before = server.engine_call(lambda engine: engine.stats())["compilations"]
        assert before > 0
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        if structured:
            out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                            extra_body={"structured_outputs": {"regex": "[0-9]{1,3}"}})
            assert out.choices[0].finish_reason in ("stop", "length") and out.choices[0].text.isdigit()
        assert server.engine_call(lambda engine: engine.stats())["compilations"] == before


class _ScriptedHandle:
    """A RequestHandle stand-in that yields one finished chunk after ``delay`` seconds."""

    def __init__(self, delay: float, cached: int) -> None:
        self.delay, self.cached = delay, cached

    async def _chunks(self):
        await asyncio.sleep(self.delay)
        result = {"text": "x", "token_ids": [5], "finish_reason": "stop", "prompt_tokens": 10,
                  "cached_tokens": self.cached, "completion_tokens": 1}
        yield {"text": "x", "token_ids": [5], "finish_reason": "stop", "result": result}

    def __aiter__(self):
        return self._chunks()

    def abort(self) -> None:
        pass


def test_streamed_usage_counts_each_prompt_s_cached_tokens_whatever_order_choices_finish_in():
    """Two prompts x n=2 (choices 0-1 the first prompt, 8 tokens cached; 2-3 the second, none): choices
    finishing 0, 2, 1, 3 must report 8 cached tokens, as the non-streamed body does, not 8 + 8."""
    from jaxserve.server.app import _sse
    from jaxserve.server.protocol import CompletionRequest
    from jaxserve.server.responses import CompletionFormat

    req = CompletionRequest(model="tiny", prompt=["a", "b"], n=2, stream=True)
    fmt = CompletionFormat("tiny", None, req, [[1] * 10, [2] * 10])
    handles = [_ScriptedHandle(delay, cached) for delay, cached in ((0.0, 8), (0.02, 8), (0.01, 0), (0.03, 0))]

    async def run():
        return [event async for event in _sse(handles, fmt, include_usage=True)]

    events = asyncio.run(run())
    usage = json.loads(events[-2].removeprefix("data: "))["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 8, usage
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] == 20


def test_completion_top_logprobs_hold_the_chosen_token_and_each_text_s_best_logprob(tiny_checkpoint):
    """OpenAI's completions logprobs: "the API will always return the logprob of the sampled token, so
    there may be up to logprobs+1 elements". Tokens that decode to the same text (bytes of a split
    character all read U+FFFD) share one key, which keeps the likeliest one's logprob."""
    from jaxserve.server.protocol import CompletionRequest
    from jaxserve.server.responses import CompletionFormat
    from jaxserve.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint[0])
    split = [t for t in range(tok.vocab_size) if tok.decode([t]) == "\ufffd"][:2]
    plain = [t for t in range(tok.vocab_size) if tok.decode([t]) in ("X", "Y")]
    assert len(split) == 2 and len(plain) == 2
    chosen, other = plain
    req = CompletionRequest(model="tiny", prompt="a", logprobs=3)
    fmt = CompletionFormat("tiny", tok, req, [[1]])
    result = {"text": "X", "token_ids": [chosen], "finish_reason": "length", "prompt_tokens": 1,
              "cached_tokens": 0, "completion_tokens": 1, "logprobs": [-4.0],
              "top_logprobs": [{split[0]: -1.0, other: -1.5, split[1]: -2.0}]}
    top = fmt.response([result])["choices"][0]["logprobs"]["top_logprobs"][0]
    assert top == {"\ufffd": -1.0, "Y": -1.5, "X": -4.0}
    assert list(top) == ["\ufffd", "Y", "X"]


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {**GOOD, "n": None}),
    ("/v1/completions", {**GOOD, "stream": None}),
    ("/v1/completions", {**GOOD, "echo": None, "best_of": None, "suffix": None, "user": None}),
    ("/v1/completions", {**GOOD, "stream": True, "stream_options": {"include_usage": None}}),
    ("/v1/chat/completions", {**CHAT, "logprobs": None, "top_logprobs": None}),
    ("/v1/chat/completions", {**CHAT, "n": None, "stream": None, "tools": None, "response_format": None}),
])
def test_null_means_the_default_where_openai_documents_a_field_as_nullable(live, path, body):
    """OpenAI's reference marks these "or null" and clients send explicit nulls: the default, never a 400."""
    r = post(live, path, body)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        assert len(r.json()["choices"]) == 1


# ----- tool calls ---------------------------------------------------------------------------------------
def test_tool_call_blocks_parse_into_openai_tool_calls():
    from jaxserve.server.tool_calls import parse_tool_calls

    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(one)
    assert content is None and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("chatcmpl-tool-")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    two = f'Checking both.\n\n{one}\n<tool_call>\n{{"name": "get_time", "arguments": {{"tz": "東京"}}}}\n</tool_call>'
    content, calls = parse_tool_calls(two)
    assert content == "Checking both.\n\n"  # the text before the first block as it is (a stream sent it so)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert calls[1]["function"]["arguments"] == '{"tz": "東京"}'  # not \\u-escaped
    assert calls[0]["id"] != calls[1]["id"]
    # The model may stop (EOS) right after the JSON, before the end tag.
    content, calls = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {}}\n')
    assert content is None and calls[0]["function"] == {"name": "get_time", "arguments": "{}"}
    # The arguments as written (OpenAI's): parsed and dumped again, 1e999 came back as Infinity (not JSON).
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1e999, "y": 0.10}}</tool_call>')
    assert calls[0]["function"]["arguments"] == '{"x": 1e999, "y": 0.10}'
    _, calls = parse_tool_calls('<tool_call>{"name": "\\"arguments\\": 5", "arguments": {"q": 3}}</tool_call>')
    assert calls[0]["function"]["arguments"] == '{"q": 3}'


@pytest.mark.parametrize("text", [
    "No tools needed: 2 < 3.",
    "",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',  # cut JSON
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n["get_weather"]\n</tool_call>',
    'Hmm <tool_call>not json</tool_call> done',
    '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',  # Python's json takes it; JSON does not
])
def test_text_without_a_parsable_tool_call_stays_content(text):
    from jaxserve.server.tool_calls import parse_tool_calls

    assert parse_tool_calls(text) == (text, [])


def test_a_malformed_block_beside_a_good_one_is_dropped():
    from jaxserve.server.tool_calls import parse_tool_calls

    text = '<tool_call>{oops</tool_call><tool_call>{"name": "f", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content is None and [c["function"]["name"] for c in calls] == ["f"]


def test_streamed_content_holds_back_what_may_become_a_tool_call_tag():
    from jaxserve.server.tool_calls import ToolCallStream, content_prefix_len

    assert content_prefix_len("abc<") == 3 and content_prefix_len("abc<tool_call") == 3
    assert content_prefix_len("abc<tool_call>{") == 3 and content_prefix_len("a <b") == 4
    assert content_prefix_len("x" * 20, start=15) == 20
    # Character by character, no piece of the tag ever goes out as content.
    text = 'Let me see <b>.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    stream = ToolCallStream()
    sent = "".join(stream.push(c) for c in text)
    assert sent == "Let me see <b>.\n"
    rest, calls = stream.finish()
    assert rest == "" and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    # A held tail that never became a call goes out at the end, and so does a block that does not parse.
    for text, before_end in (("2 <tool", "2 "), ("a <tool_call> b", "a ")):
        stream = ToolCallStream()
        assert stream.push(text) == before_end
        assert stream.finish() == (text[len(before_end):], [])


def test_tool_calls_keep_length_and_tool_choice_none_leaves_text_alone():
    from jaxserve.server.protocol import ChatRequest
    from jaxserve.server.responses import ChatFormat

    text = 'Sure.<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    result = {"text": text, "token_ids": [5], "finish_reason": "length", "stop_reason": None, "prompt_tokens": 3,
              "cached_tokens": 0, "completion_tokens": 1}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    auto = ChatFormat("tiny", None, ChatRequest.model_validate(body), [1, 2, 3]).response([result])["choices"][0]
    assert auto["finish_reason"] == "length" and auto["message"]["content"] == "Sure."
    assert auto["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    none = ChatRequest.model_validate({**body, "tool_choice": "none"})
    choice = ChatFormat("tiny", None, none, [1, 2, 3]).response([{**result, "finish_reason": "stop"}])["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call_whole_and_streamed():
    from jaxserve.server.protocol import ChatRequest
    from jaxserve.server.responses import ChatFormat

    text = ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    result = {"text": text, "token_ids": [5], "finish_reason": "stop", "stop_reason": None, "prompt_tokens": 3,
              "cached_tokens": 0, "completion_tokens": 1}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    for parallel, names in ((True, ["get_time", "get_weather"]), (False, ["get_time"])):
        req = ChatRequest.model_validate({**body, "parallel_tool_calls": parallel})
        whole = ChatFormat("tiny", None, req, [1, 2, 3]).response([result])["choices"][0]["message"]
        assert [c["function"]["name"] for c in whole["tool_calls"]] == names
        events = ChatFormat("tiny", None, req, [1, 2, 3]).stream_chunk(0, {**result, "result": result}, False)
        streamed = [d["function"]["name"] for e in events for d in e["choices"][0]["delta"].get("tool_calls", [])]
        assert streamed == names


# Renders the tools, the calls (arguments as `tojson`, as Qwen2.5's does) and what a tool message answers.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HISTORY = [{"role": "user", "content": "Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
               "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


def test_tools_and_tool_messages_are_rendered_with_the_chat_template(tiny_checkpoint):
    from types import SimpleNamespace

    from jaxserve.server.app import _chat_prompt
    from jaxserve.server.protocol import ChatRequest
    from jaxserve.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint[0])
    tok.chat_template = TOOLS_TEMPLATE
    req = ChatRequest.model_validate_json(json.dumps({"model": "tiny", "messages": HISTORY, "tools": TOOLS}))
    text = tok.decode(_chat_prompt(req, SimpleNamespace(tokenizer=tok)))
    assert "Tools: get_weather get_time<|im_end|>" in text
    # The arguments reach the template parsed: `tojson` of OpenAI's string would quote it again.
    assert '<|im_start|>assistant\n<tool_call>get_weather {"city": "Paris"}</tool_call><|im_end|>' in text
    assert "<|im_start|>tool\nsunny (for c1)<|im_end|>" in text


class ScriptedDetokenizer:
    """Stands in for the engine's detokenizer: output token k reads as the script's k-th piece,
    whatever the model sampled, so the tiny random model "writes" a chosen text."""

    def __init__(self, text: str) -> None:
        self.pieces = [text[k:k + 3] for k in range(0, len(text), 3)]  # the tag split across tokens

    def push(self, token: int) -> str:
        return self.pieces.pop(0) if self.pieces else ""

    def push_many(self, tokens) -> str:
        return "".join(self.push(t) for t in tokens)

    def flush(self) -> str:
        return ""


END = "@END@"  # each script ends with this stop string: the model's own "stop", at a chosen place


def script_outputs(monkeypatch, *texts: str) -> None:
    """The engine's next requests, in submission order, write ``texts``."""
    import jaxserve.engine

    scripts = list(texts)
    monkeypatch.setattr(jaxserve.engine, "IncrementalDetokenizer",
                        lambda tokenizer, prompt_ids=(), skip_special_tokens=True: ScriptedDetokenizer((scripts.pop(0) if scripts else "") + END))


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_chat_answers_tool_calls_rendered_and_parsed(live, monkeypatch, pages_freed):
    tok = live.app.state.jaxserve.tokenizer
    body = {"model": "tiny", "messages": HISTORY, "tools": TOOLS, "max_tokens": 48, "temperature": 0,
            "stop": [END], "ignore_eos": True}
    # The checkpoint's template ignores tools: its business, not an error.
    assert post(live, "/v1/chat/completions", body).status_code == 200
    monkeypatch.setattr(tok, "chat_template", TOOLS_TEMPLATE)
    script_outputs(monkeypatch, "Let me check.\n" + CALL, "Let me check.\n" + CALL)
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    messages = [{**m, "content": m["content"] or ""} for m in HISTORY]
    messages[1]["tool_calls"] = [{**messages[1]["tool_calls"][0], "function": {"name": "get_weather",
                                                                              "arguments": {"city": "Paris"}}}]
    rendered = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["stop_reason"] == END
    assert choice["message"]["content"] == "Let me check.\n"  # as streamed (vLLM keeps it too)
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    none = post(live, "/v1/chat/completions", {**body, "tool_choice": "none"}).json()["choices"][0]
    assert none["message"] == {"role": "assistant", "content": "Let me check.\n" + CALL}
    assert none["finish_reason"] == "stop"


def test_streamed_tool_calls_come_as_one_delta_before_the_finish(live, client, monkeypatch, pages_freed):
    """n=3: a call, plain text with a '<' the stream holds back and then releases, and a block
    that does not parse (its held text comes out as content at the end)."""
    plain, broken = "2 <tools> 3 <tool", "Hi <tool_call>{nope</tool_call>"
    script_outputs(monkeypatch, "Let me check.\n" + CALL, plain, broken)
    stream = client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, n=3, max_tokens=48,
                                            temperature=0, stop=[END], stream=True, extra_body={"ignore_eos": True})
    content, calls, reasons, call_deltas = ["", "", ""], [[], [], []], [None] * 3, [0, 0, 0]
    for chunk in stream:
        for c in chunk.choices:
            assert reasons[c.index] is None, "nothing after a choice's finish"
            content[c.index] += c.delta.content or ""
            calls[c.index] += c.delta.tool_calls or []
            reasons[c.index] = c.finish_reason
            if c.delta.tool_calls:
                call_deltas[c.index] += 1
    assert content == ["Let me check.\n", plain, broken]
    assert reasons == ["tool_calls", "stop", "stop"]
    assert call_deltas == [1, 0, 0]  # one delta with every call
    [call] = calls[0]
    assert call.index == 0 and call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris"}'
    assert calls[1:] == [[], []]


# ----- structured outputs ------------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_structured_outputs_hold_the_text_to_the_schema_regex_or_choices(client, live, pages_freed):
    messages = [{"role": "user", "content": "Who?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, temperature=1.0, seed=1, n=3,
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "person", "schema": PERSON}})
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        person = json.loads(choice.message.content)
        assert set(person) == {"name", "age"} and isinstance(person["age"], int) and len(person["name"]) <= 6
    # A random model's strings run on: bias the quote and the brace so that the object ends within max_tokens.
    closing = live.app.state.jaxserve.tokenizer.convert_tokens_to_ids(['"', "}"])
    anything = client.chat.completions.create(model="tiny", messages=messages, max_tokens=80, temperature=0,
                                              logit_bias={str(t): 8 for t in closing},
                                              response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    choice = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=4,
                                       extra_body={"guided_choice": ["red", "green", "blue"]})
    assert {c.text for c in choice.choices} <= {"red", "green", "blue"}
    # The request's own rules leaving its constraint no token: a 400 (was a 500), or with bad_words banning the
    # one choice's last token an EOS after the break finished it "stop" with 'ab'.
    tok = live.app.state.jaxserve.tokenizer
    for extra in ({"guided_choice": ["red", "green"], "allowed_token_ids": tok.encode("zz", add_special_tokens=False)},
                  {"guided_choice": ["abc"], "bad_words": ["abc"]}):
        for stream in (False, True):
            r = post(live, "/v1/completions", {**GOOD, "max_tokens": 8, "stream": stream, **extra})
            if not stream:
                assert r.status_code == 400 and "structured output constraint" in r.json()["error"]["message"], r.text
            else:
                assert '"code": 400' in r.text.replace('"code":400', '"code": 400') or "invalid_request" in r.text
    regex = post(live, "/v1/completions", {**GOOD, "max_tokens": 12, "structured_outputs": {"regex": "[0-9]{4}"}})
    assert regex.status_code == 200 and re.fullmatch("[0-9]{4}", regex.json()["choices"][0]["text"])
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"guided_regex": "(?:ab|cd){2,3}!"})
    assert re.fullmatch("(?:ab|cd){2,3}!", "".join(c.choices[0].text for c in stream))
    gbnf = 'root ::= item ("," item){1,2} # two or three\nitem ::= [a-c] [0-9]'
    listed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.8, seed=2,
                                       extra_body={"guided_grammar": gbnf})
    assert re.fullmatch("[a-c][0-9](?:,[a-c][0-9]){1,2}", listed.choices[0].text), listed.choices[0].text
    abc = live.app.state.jaxserve.tokenizer.convert_tokens_to_ids(list("abc"))
    only = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=4,
                                     extra_body={"allowed_token_ids": abc})
    assert set(only.choices[0].text) <= set("abc") and len(only.choices[0].text) == 6, only.choices[0].text
    free = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    word = next(t for t in free.choices[0].logprobs.tokens if t.strip())  # vLLM refuses a blank word
    banned = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                       extra_body={"bad_words": [word]})
    assert word not in banned.choices[0].logprobs.tokens, (word, banned.choices[0].logprobs.tokens)
    assert banned.choices[0].text != free.choices[0].text


def test_required_tool_calls_are_one_call_without_parallel_tool_calls():
    from jaxserve.server.app import _tool_call_regex
    from jaxserve.server.protocol import ChatRequest

    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"}
    many = _tool_call_regex(ChatRequest.model_validate(body))
    one = _tool_call_regex(ChatRequest.model_validate({**body, "parallel_tool_calls": False}))
    assert re.fullmatch(many, call) and re.fullmatch(many, call + "\n" + call)
    assert re.fullmatch(one, call) and not re.fullmatch(one, call + "\n" + call)


def test_forced_tool_arguments_are_an_object_whatever_the_schema_leaves_open():
    # OpenAI's arguments are a JSON object: a tool of no parameters schema, {}, or properties without a type
    # (which alone allow any value: 'true' came back) is held to an object.
    from jaxserve.server.app import _arguments_regex

    for parameters in (None, {}, {"properties": {"a": {"type": "integer"}}}):
        pattern = _arguments_regex(parameters)
        assert re.fullmatch(pattern, '{"a": 1}') and re.fullmatch(pattern, "{}")
        assert not any(re.fullmatch(pattern, v) for v in ("true", "Infinity", '"hello"', "[1]", "3"))
    assert not re.fullmatch(_arguments_regex({"properties": {"a": {"type": "integer"}}}), '{"a": "x"}')


def test_tool_choice_required_or_named_makes_the_model_call_a_tool(client, live, monkeypatch, pages_freed):
    tok = live.app.state.jaxserve.tokenizer
    monkeypatch.setattr(tok, "chat_template", TOOLS_TEMPLATE)
    body = dict(model="tiny", messages=[{"role": "user", "content": "Paris?"}], tools=TOOLS, max_tokens=120,
                temperature=0.7, seed=3)
    named = client.chat.completions.create(**body, tool_choice={"type": "function",
                                                                "function": {"name": "get_weather"}})
    [call] = named.choices[0].message.tool_calls
    # A call forced by name finishes "stop", as OpenAI's and vLLM's do ("tool_calls" is for calls the model chose).
    assert call.function.name == "get_weather" and named.choices[0].finish_reason == "stop"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict) and set(arguments) <= {"city"}
    required = client.chat.completions.create(**body, tool_choice="required")
    assert required.choices[0].finish_reason in ("tool_calls", "length")
    if required.choices[0].finish_reason == "tool_calls":
        assert {c.function.name for c in required.choices[0].message.tool_calls} <= {"get_weather", "get_time"}


def test_prompt_logprobs_give_each_prompt_token_s_logprob_rank_and_best_tokens(client, live, model, pages_freed):
    """vLLM's prompt_logprobs: per completion choice, once beside a chat's choices; None first, then keyed by
    token id the prompt token's and the k best tokens' logprob, rank and text; with echo the larger k is run."""
    from jaxserve import SamplingParams

    ids = model.tokenizer.encode(PROMPT, add_special_tokens=False)
    offline = live.engine_call(lambda e: e.generate_async(ids, SamplingParams(max_tokens=1, temperature=0,
                                                                               prompt_logprobs=20)))

    def check(plp, prompt, k):
        assert len(plp) == len(prompt) and plp[0] is None
        for p in range(1, len(prompt)):
            entry, want = plp[p], offline["prompt_logprobs"][p] if prompt is ids else None
            token = str(prompt[p])
            assert token in entry and len(entry) in (k, k + 1)
            assert entry[token]["decoded_token"] == model.tokenizer.decode([prompt[p]])
            if len(entry) == k:  # the prompt token is one of the k best, ranked 1..k
                assert sorted(v["rank"] for v in entry.values()) == list(range(1, k + 1))
            else:
                assert sorted(v["rank"] for t, v in entry.items() if t != token) == list(range(1, k + 1))
                assert entry[token]["rank"] > k
            if want is not None:
                assert entry[token]["logprob"] == pytest.approx(want[prompt[p]], abs=1e-5)
                assert entry[token]["rank"] == offline["prompt_logprob_ranks"][p]

    body = dict(GOOD, prompt_logprobs=2, n=2, temperature=1.0, seed=3)
    comp = post(live, "/v1/completions", body)
    assert comp.status_code == 200, comp.text
    for choice in comp.json()["choices"]:
        check(choice["prompt_logprobs"], ids, 2)
    # With echo, logprobs=1 asks one best token of the echoed prompt, prompt_logprobs=3 three.
    echoed = post(live, "/v1/completions", dict(GOOD, echo=True, logprobs=1, prompt_logprobs=3)).json()["choices"][0]
    check(echoed["prompt_logprobs"], ids, 3)
    assert all(len(t) <= 2 for t in echoed["logprobs"]["top_logprobs"][1:])
    chat = post(live, "/v1/chat/completions", dict(CHAT_BODY, prompt_logprobs=0)).json()
    assert "prompt_logprobs" not in chat["choices"][0] and chat["prompt_logprobs"][0] is None
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in chat["prompt_logprobs"][1:])
    for bad in (dict(GOOD, prompt_logprobs=-1), dict(GOOD, prompt_logprobs=21), dict(GOOD, prompt_logprobs=1,
                                                                                      stream=True)):
        r = post(live, "/v1/completions", bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


# ----- the Responses API ---------------------------------------------------------------------------------
def test_responses_answer_as_the_chat_route_does_whole_and_streamed(client, live, pages_freed):
    """/v1/responses (OpenAI's SDK, `client.responses`): the same greedy text as the chat route on the conversation
    it stands for, as a response object and as typed events (sequence numbered, text deltas adding up, the last
    event's response whole); string input, message items and text parts give one prompt."""
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": "Hello world!"}],
                                          max_completion_tokens=10, temperature=0)
    resp = client.responses.create(model="tiny", instructions="Be brief.", input="Hello world!", max_output_tokens=10,
                                   temperature=0)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == "tiny"
    assert resp.output_text == chat.choices[0].message.content
    [item] = resp.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert (resp.status, resp.incomplete_details.reason) == ("incomplete", "max_output_tokens")  # 10 tokens, cut
    assert resp.usage.input_tokens == chat.usage.prompt_tokens and resp.usage.output_tokens == 10
    assert resp.usage.total_tokens == resp.usage.input_tokens + 10
    items = client.responses.create(model="tiny", max_output_tokens=10, temperature=0, input=[
        {"role": "system", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello "},
                                                         {"type": "input_text", "text": "world!"}]}])
    assert items.output_text == resp.output_text and items.usage.input_tokens == resp.usage.input_tokens
    events = list(client.responses.create(model="tiny", instructions="Be brief.", input="Hello world!",
                                          max_output_tokens=10, temperature=0, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == resp.output_text
    assert [e.type for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done", "response.incomplete"]
    assert events[-1].response.output_text == resp.output_text and events[-1].response.usage.output_tokens == 10


def test_responses_give_output_token_logprobs_whole_and_streamed(client, pages_freed):
    """top_logprobs (or include's message.output_text.logprobs): the output text's tokens with their log-probabilities
    and k best, the chat route's; streamed, the deltas' logprobs add up to the whole's."""
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    want = [(t.token, t.logprob, len(t.top_logprobs)) for t in chat.choices[0].logprobs.content]
    resp = client.responses.create(model="tiny", input="Hello", max_output_tokens=6, temperature=0, top_logprobs=2)
    part = resp.output[0].content[0]
    assert [(t.token, t.logprob, len(t.top_logprobs)) for t in part.logprobs] == want
    asked = client.responses.create(model="tiny", input="Hello", max_output_tokens=6, temperature=0,
                                    include=["message.output_text.logprobs"])
    assert [(t.token, t.logprob) for t in asked.output[0].content[0].logprobs] == [w[:2] for w in want]
    events = list(client.responses.create(model="tiny", input="Hello", max_output_tokens=6, temperature=0,
                                          top_logprobs=2, stream=True))
    streamed = [(t.token, t.logprob, len(t.top_logprobs)) for e in events if e.type == "response.output_text.delta"
                for t in e.logprobs]
    done = [e for e in events if e.type == "response.output_text.done"][0]
    assert streamed == want == [(t.token, t.logprob, len(t.top_logprobs)) for t in done.logprobs]
    plain = client.responses.create(model="tiny", input="Hello", max_output_tokens=2, temperature=0)
    assert plain.output[0].content[0].logprobs == []


def test_responses_carry_tool_calls_and_their_outputs(client, live, monkeypatch, pages_freed):
    """Function tools in the Responses spelling: a named tool_choice makes a function_call item (call id, name,
    JSON arguments), streamed as its own item; function_call / function_call_output input items render as the chat
    route renders the assistant's tool calls and the tool's answer."""
    tok = live.app.state.jaxserve.tokenizer
    monkeypatch.setattr(tok, "chat_template", TOOLS_TEMPLATE)
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    body = dict(model="tiny", input="Paris?", tools=tools, max_output_tokens=120, temperature=0.7,
                tool_choice={"type": "function", "name": "get_weather"}, extra_body={"seed": 3})
    resp = client.responses.create(**body)
    [call] = [o for o in resp.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and resp.status == "completed"
    assert set(json.loads(call.arguments)) <= {"city"}
    streamed = list(client.responses.create(**body, stream=True))
    done = [e.item for e in streamed if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [(c.name, c.arguments) for c in done] == [(call.name, call.arguments)]
    assert streamed[-1].type == "response.completed"
    history = [{"type": "message", "role": "user", "content": "Paris?"},
               {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
               {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
    answer = client.responses.create(model="tiny", input=history, tools=tools, max_output_tokens=4, temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, max_tokens=4, temperature=0)
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_responses_text_format_holds_the_json_schema(client, pages_freed):
    resp = client.responses.create(model="tiny", input="Who?", max_output_tokens=60, temperature=1.0,
                                   text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
                                   extra_body={"seed": 1})
    person = json.loads(resp.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and len(person["name"]) <= 6


def test_stored_responses_continue_under_previous_response_id(client, live, pages_freed):
    """A response is stored (OpenAI's default): a request naming it continues its conversation (the prompt is the
    chat route's for the whole conversation, the earlier instructions left out), whole or streamed; GET gives it
    back, DELETE forgets it, and a response made with store: false cannot be continued."""
    first = client.responses.create(model="tiny", instructions="Be brief.", input="Hello world!",
                                    max_output_tokens=6, temperature=0)
    assert first.store
    second = client.responses.create(model="tiny", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    chat = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens and second.output_text == \
        chat.choices[0].message.content
    events = list(client.responses.create(model="tiny", input="And then?", previous_response_id=first.id,
                                          max_output_tokens=6, temperature=0, stream=True))
    streamed = events[-1].response
    assert streamed.usage.input_tokens == chat.usage.prompt_tokens
    third = client.responses.create(model="tiny", input="More.", previous_response_id=streamed.id,
                                    max_output_tokens=2, temperature=0)
    assert third.usage.input_tokens > streamed.usage.input_tokens + streamed.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    assert client.responses.delete(first.id) is None
    gone = post(live, "/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": first.id})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "previous_response_id"
    assert httpx.get(f"{live.url}/v1/responses/{first.id}", headers={"Authorization": f"Bearer {API_KEY}"}
                     ).status_code == 404
    unstored = client.responses.create(model="tiny", input="hi", max_output_tokens=2, store=False)
    assert not unstored.store
    assert post(live, "/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": unstored.id}
                ).status_code == 404


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "input": "hi", "previous_response_id": "resp_1"}, 404, "previous_response_id"),
    ({"model": "tiny", "input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input"),
    ({"model": "tiny", "input": [{"type": "item_reference", "id": "x"}]}, 400, "input"),
    ({"model": "tiny", "input": "hi", "max_output_tokens": 10 ** 6}, 400, "max_output_tokens"),
    ({"model": "tiny", "input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "text"),
    ({"model": "tiny", "input": "hi", "tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ({"model": "nope", "input": "hi"}, 404, "model"),
    ({"model": "tiny"}, 400, "input"),
    ({"model": "tiny", "input": ["hi"]}, 400, "input"),
    ({"model": "tiny", "input": [{"role": "robot", "content": "hi"}]}, 400, "input"),
    ({"model": "tiny", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, 400, "input"),
    ({"model": "tiny", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": 5}}}, 400,
     "text"),
    ({"model": "tiny", "input": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "input": "hi", "text": {"format": "json_object"}}, 400, "text"),
    ({"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, 400, "input"),
])
def test_bad_responses_requests_get_openai_errors(live, body, status, param):
    r = post(live, "/v1/responses", body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert post(live, "/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 2}).status_code == 200


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@given(_json_values)
@settings(max_examples=300, deadline=None)
def test_sse_events_encode_as_json_dumps_does(value):
    # The events' one encoder (made once, for its cost a streamed token) writes what json.dumps(ensure_ascii=False)
    # writes: NaN / Infinity, unicode, escapes, nesting.
    from jaxserve.server.app import _dumps

    assert _dumps(value) == json.dumps(value, ensure_ascii=False)
