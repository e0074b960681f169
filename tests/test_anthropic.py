"""Anthropic Messages end to end with the official `anthropic` SDK on the bundled model: blocking, streaming (the
SDK's own accumulator checks the event sequence), stop sequences, tools and a tool_result round trip,
count_tokens, x-api-key and Bearer keys, and errors in Anthropic's shape. The model is a small base model: these
tests check mechanics, not answer quality."""
import json

import pytest

anthropic = pytest.importorskip("anthropic")

from tests.support import ServerProcess, bundled_model_path, http, smollm2_model_path  # noqa: E402

KEY = "sekrit"
ASK = [{"role": "user", "content": "Name three colours."}]
WEATHER = [{"name": "get_weather", "description": "Current weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                              "unit": {"enum": ["celsius", "fahrenheit"]}},
                             "required": ["city", "unit"]}}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(bundled_model_path(), "--contextsize", "2048", "--chatcompletionsadapter", "gemma",
                       "--password", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_server():
    """SmolLM2-135M-Instruct, a real chat model (ChatML through its own Jinja template), for tool use and turns."""
    with ServerProcess(smollm2_model_path(), "--contextsize", "1024", "--jinja") as s:
        yield s


@pytest.fixture(scope="module")
def chat_client(chat_server):
    return anthropic.Anthropic(base_url=chat_server.url, api_key="k", max_retries=0, timeout=120)


def test_blocking_and_stream_agree(client):
    # temperature/top_p/top_k left the newest SDK's signature; older clients (and Claude Code) still send them
    kw = dict(model="claude-x", max_tokens=12, system="Be brief.", messages=ASK,
              extra_body={"temperature": 0.7, "top_k": 40})
    client.messages.create(**dict(kw, max_tokens=1))  # warm the prompt cache (cold and cached runs may differ)
    m = client.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.model.startswith("koboldcpp/") and m.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.usage.output_tokens <= 12 and m.usage.input_tokens > 5
    with client.messages.stream(**kw) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert final.content[0].text == streamed
    assert final.usage.output_tokens == m.usage.output_tokens and final.stop_reason == m.stop_reason
    # greedy is reproducible: the same text both ways
    g = dict(kw, extra_body={"temperature": 0.0})
    a = client.messages.create(**g).content[0].text
    with client.messages.stream(**g) as s:
        assert "".join(s.text_stream) == a


def sse_events(raw: bytes):
    """[(event name, data)] of an SSE body; the name must equal the data's type."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            data = json.loads(lines["data"])
            assert lines["event"] == data["type"]
            out.append((lines["event"], data))
    return out


def test_raw_event_sequence(client, server):
    st, hdrs, raw = http("POST", server.url + "/v1/messages", {"max_tokens": 6, "messages": ASK, "stream": True},
                         headers={"x-api-key": KEY})
    assert st == 200 and hdrs["Content-Type"] == "text/event-stream"
    assert [k for k, _ in sse_events(raw)][:2] == ["message_start", "ping"]  # the SDK hides pings
    events = list(client.messages.create(model="m", max_tokens=6, messages=ASK, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    i, j = kinds.index("content_block_start"), kinds.index("content_block_stop")
    assert all(k == "content_block_delta" for k in kinds[i + 1:j])
    assert events[0].message.usage.input_tokens > 5 and events[-2].usage.output_tokens <= 6


def test_stop_sequences(client):
    m = client.messages.create(model="m", max_tokens=40, messages=ASK, stop_sequences=[" "],
                               extra_body={"temperature": 0})
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == " " and " " not in m.content[0].text
    n = client.messages.create(model="m", max_tokens=3, messages=ASK)
    assert n.stop_reason == "max_tokens" and n.stop_sequence is None


def test_forced_tool_use_and_round_trip(chat_client):
    client = chat_client
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = client.messages.create(model="m", max_tokens=60, messages=ask, tools=WEATHER,
                               tool_choice={"type": "tool", "name": "get_weather"})
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input["city"], str)
    assert use.input["unit"] in ("celsius", "fahrenheit")
    # streamed: the SDK rebuilds `input` from the input_json_delta pieces
    with client.messages.stream(model="m", max_tokens=60, messages=ask, tools=WEATHER,
                                tool_choice={"type": "any"}) as s:
        final = s.get_final_message()
    (suse,) = [b for b in final.content if b.type == "tool_use"]
    assert suse.name == "get_weather" and final.stop_reason == "tool_use" and "city" in suse.input
    # the client runs the tool and sends the result back: a plain answer follows
    follow = ask + [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                  "content": "18 degrees and sunny"}]}]
    r = client.messages.create(model="m", max_tokens=8, messages=follow, tools=WEATHER,
                               tool_choice={"type": "none"})
    assert r.stop_reason in ("end_turn", "max_tokens") and r.content[0].type == "text"
    # the tool result reached the prompt: it counts
    with_result = client.messages.count_tokens(model="m", messages=follow, tools=WEATHER).input_tokens
    without = client.messages.count_tokens(model="m", messages=follow[:2], tools=WEATHER).input_tokens
    assert with_result > without


def test_max_tokens_beyond_the_context_is_a_cap(client):
    """Agents send max_tokens far above a local context (Claude Code: 32000): the reply may use what the context
    leaves after the prompt instead of a 400."""
    m = client.messages.create(model="m", max_tokens=100000, messages=ASK, stop_sequences=[" "],
                               extra_body={"temperature": 0})
    assert m.stop_reason == "stop_sequence"


def test_count_tokens_matches_usage(client):
    n = client.messages.count_tokens(model="m", system="Be brief.", messages=ASK).input_tokens
    m = client.messages.create(model="m", max_tokens=1, system="Be brief.", messages=ASK)
    assert n == m.usage.input_tokens > 5


def test_keys(server):
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model="m", max_tokens=1, messages=ASK).type == "message"
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="m", max_tokens=1, messages=ASK)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("body,words", [
    ({"messages": ASK}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "no vision projector"),
    ({"max_tokens": 5, "messages": ASK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "server tool"),
    ({"max_tokens": 5, "messages": ASK, "tools": WEATHER, "tool_choice": {"type": "tool", "name": "nope"}},
     "nope"),
    ({"max_tokens": 5, "messages": ASK, "stop_sequences": "x"}, "stop_sequences"),
    ({"max_tokens": 0, "messages": ASK}, "max_tokens"),
    ({"max_tokens": 5, "messages": ASK, "temperature": 9}, "temperature"),
    ({"max_tokens": 5, "messages": ASK, "thinking": {"type": "maybe"}}, "thinking"),
])
def test_bad_input_is_an_anthropic_400(server, body, words):
    st, _, r = http("POST", server.url + "/v1/messages", body, headers={"x-api-key": KEY})
    assert st == 400 and r["type"] == "error" and r["error"]["type"] == "invalid_request_error", r
    assert words in r["error"]["message"]


def test_sdk_raises_bad_request(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}])
    assert "document" in e.value.body["error"]["message"]


def test_json_body_shape(server):
    st, _, r = http("POST", server.url + "/v1/messages", {"max_tokens": 2, "messages": ASK},
                    headers={"x-api-key": KEY})
    assert st == 200 and set(r) >= {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    json.dumps(r)


def test_chat_model_ends_its_turn(chat_client):
    """A real chat model answers and stops by itself: end_turn, in both the blocking and the streamed reply."""
    c = chat_client
    kw = dict(model="m", max_tokens=80, system="You are a helpful assistant. Answer in one short sentence.",
              messages=[{"role": "user", "content": "What is the capital of France?"}],
              extra_body={"temperature": 0})
    m = c.messages.create(**kw)
    assert m.stop_reason == "end_turn" and "Paris" in m.content[0].text
    with c.messages.stream(**kw) as st:
        final = st.get_final_message()
    assert final.content[0].text == m.content[0].text and final.stop_reason == "end_turn"


def test_reasoning_becomes_thinking_blocks():
    """A preset whose generation prompt opens <think> (DeepSeek-R1) makes everything the tiny model writes
    reasoning: it comes back as a thinking block (with a signature), blocking and streamed alike."""
    from tests.tinymodel import tiny_model_path
    with ServerProcess(tiny_model_path(), "--contextsize", "256", "--chatcompletionsadapter", "DeepSeek-R1") as s:
        c = anthropic.Anthropic(base_url=s.url, api_key="k", max_retries=0)
        kw = dict(model="m", max_tokens=8, messages=ASK, extra_body={"temperature": 0, "top_k": 1})
        m = c.messages.create(**kw)
        assert [b.type for b in m.content] == ["thinking"] and m.content[0].thinking and m.content[0].signature
        with c.messages.stream(**kw) as st:
            final = st.get_final_message()
        assert final.content[0].type == "thinking" and final.content[0].thinking == m.content[0].thinking
        assert final.content[0].signature == m.content[0].signature
        # thinking blocks sent back in the history are accepted (and left out of the prompt)
        follow = ASK + [{"role": "assistant", "content": [b.model_dump() for b in m.content] + [
            {"type": "text", "text": "Red, green, blue."}]}, {"role": "user", "content": "More?"}]
        assert c.messages.create(model="m", max_tokens=2, messages=follow).type == "message"
