"""`jaxserve.chat` / `Engine.chat` (vLLM's ``LLM.chat``): conversations rendered with the chat template run as
`generate` runs their token ids; OpenAI's message forms (text parts, the developer role), a template of one's
own, a continued final message, and bad conversations refused by name before anything runs."""

from __future__ import annotations

import dataclasses

import pytest

import jaxserve
from jaxserve import Engine, SamplingParams
from tests.test_engine import assert_all_pages_free, small_config

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return jaxserve.load()


def _ids(model, messages, **kw) -> list[int]:
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    return model.tokenizer.encode(text, add_special_tokens=False)


def test_chat_runs_the_rendered_conversation_as_generate_runs_its_ids(model):
    first = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "def add(a, b):"}]
    second = [{"role": "user", "content": "import os"}, {"role": "assistant", "content": "import sys"},
              {"role": "user", "content": "class Point:"}]
    with Engine(model, small_config()) as engine:
        expect = engine.generate([_ids(model, first, add_generation_prompt=True),
                                  _ids(model, second, add_generation_prompt=True)], GREEDY, use_tqdm=False)
        outs = engine.chat([first, second], GREEDY, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in expect]
        assert [o["prompt_tokens"] for o in outs] == [o["prompt_tokens"] for o in expect]
        # One conversation alone is a list of messages, and gives a list of one result.
        [alone] = engine.chat(second, GREEDY, use_tqdm=False)
        assert alone["token_ids"] == expect[1]["token_ids"]
        # OpenAI's text parts are joined, and its developer role is the templates' system.
        parts = [{"role": "developer", "content": [{"type": "text", "text": "Write "}, {"type": "text",
                                                                                      "text": "Python."}]},
                 {"role": "user", "content": "def add(a, b):"}]
        [same] = engine.chat(parts, GREEDY, use_tqdm=False)
        assert same["token_ids"] == expect[0]["token_ids"]
        assert_all_pages_free(engine)
    [top] = jaxserve.chat(model, first, GREEDY, engine_config=small_config(), use_tqdm=False)
    assert top["token_ids"] == expect[0]["token_ids"]


def test_chat_takes_a_template_of_one_s_own_and_continues_a_final_message(model):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    conversation = [{"role": "user", "content": "a list"}, {"role": "assistant", "content": "x = ["}]
    with Engine(model, small_config()) as engine:
        [own] = engine.chat(conversation, GREEDY, use_tqdm=False, chat_template=template)
        assert own["prompt_tokens"] == len(model.tokenizer.encode("<user>a list\n<assistant>x = [\n"))
        [kept] = engine.chat(conversation, GREEDY, use_tqdm=False, add_generation_prompt=False,
                             continue_final_message=True)
        ids = _ids(model, conversation, add_generation_prompt=False, continue_final_message=True)
        assert model.tokenizer.decode(ids).endswith("x = [")  # the assistant's turn left open
        [expect] = engine.generate([ids], GREEDY, use_tqdm=False)
        assert kept["token_ids"] == expect["token_ids"]
        assert_all_pages_free(engine)


@pytest.mark.parametrize("messages,match", [
    ([], "messages"),
    ([{"content": "no role"}], "messages"),
    (["just text"], "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages"),
    ([{"role": "user", "content": 5}], "messages"),
    ([[{"role": "user", "content": "fine"}], []], "messages"),
])
def test_bad_conversations_are_refused_by_name_before_anything_runs(model, messages, match):
    with Engine(model, small_config()) as engine:
        with pytest.raises(ValueError, match=match):
            engine.chat(messages, GREEDY, use_tqdm=False)
        assert not engine.requests and not engine.has_unfinished()


def test_chat_options_that_contradict_or_lack_a_template_are_refused(model):
    conversation = [{"role": "user", "content": "x"}]
    with Engine(model, small_config()) as engine:
        with pytest.raises(ValueError, match="continue_final_message"):
            engine.chat(conversation, GREEDY, use_tqdm=False, continue_final_message=True)
        with pytest.raises(ValueError, match="messages"):  # the template's own check (Jinja raise_exception)
            engine.chat(conversation, GREEDY, use_tqdm=False,
                        chat_template="{{ raise_exception('roles must alternate') }}")
    with Engine(dataclasses.replace(model, tokenizer=None), small_config()) as bare:
        with pytest.raises(ValueError, match="tokenizer"):
            bare.chat(conversation, GREEDY, use_tqdm=False)
