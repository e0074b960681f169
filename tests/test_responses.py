"""OpenAI Responses end to end with the official `openai` SDK's client.responses on the bundled model: blocking,
streaming (the SDK's stream helper checks the event sequence), instructions, previous_response_id, GET/DELETE by
id, a function-call round trip, max_output_tokens, input_tokens, and OpenAI-shaped 400s and 404s. The model is a
small base model: these tests check mechanics, not answer quality."""
import json

import pytest

openai = pytest.importorskip("openai")

from tests.support import ServerProcess, bundled_model_path, http, smollm2_model_path  # noqa: E402

WEATHER = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(bundled_model_path(), "--contextsize", "2048", "--chatcompletionsadapter", "gemma") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="dummy", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_client():
    """SmolLM2-135M-Instruct, a real chat model (ChatML through its own Jinja template), for tool calls and turns."""
    with ServerProcess(smollm2_model_path(), "--contextsize", "1024", "--jinja") as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0, timeout=120)


def test_blocking_and_stream_agree(client):
    kw = dict(model="gpt-x", input="Name three colours.", instructions="Be brief.", max_output_tokens=12,
              temperature=0)
    r = client.responses.create(**kw)
    assert r.object == "response" and r.id.startswith("resp_") and r.model.startswith("koboldcpp/")
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message"
    assert r.output_text and r.usage.output_tokens <= 12 and r.usage.input_tokens > 5
    assert r.instructions == "Be brief." and r.max_output_tokens == 12
    with client.responses.stream(**kw) as s:  # the SDK's helper accumulates (and checks) the events
        events = list(s)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    # a response cut by max_output_tokens ends with response.incomplete (get_final_response wants "completed")
    final = events[-1].response
    assert events[-1].type == ("response.completed" if r.status == "completed" else "response.incomplete")
    assert deltas == final.output_text == r.output_text
    assert final.usage.output_tokens == r.usage.output_tokens


def test_event_sequence(client):
    events = list(client.responses.create(model="m", input="Hello", max_output_tokens=5, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          kinds[-1]] and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.status == ("completed" if kinds[-1] == "response.completed" else "incomplete")


def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(model="m", input="Tell me a long story about a dragon.", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_previous_response_id_and_retrieve(client, server):
    first = client.responses.create(model="m", input="My name is Ada.", max_output_tokens=8, temperature=0)
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    second = client.responses.create(model="m", input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    alone = http("POST", server.url + "/v1/responses/input_tokens", {"input": "What is my name?"})[2]
    # the earlier turn (and its answer) is part of the prompt
    assert second.usage.input_tokens > alone["input_tokens"] + 5
    assert second.previous_response_id == first.id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="x", previous_response_id=first.id, max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id"


def test_store_false_is_not_kept(client):
    r = client.responses.create(model="m", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_function_call_round_trip(chat_client):
    client = chat_client
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.responses.create(model="m", input=ask, tools=WEATHER, max_output_tokens=40,
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    # streamed: arguments arrive as deltas and add up to the final item's
    with client.responses.stream(model="m", input=ask, tools=WEATHER, max_output_tokens=40,
                                 tool_choice="required") as s:
        args = "".join(e.delta for e in s if e.type == "response.function_call_arguments.delta")
        final = s.get_final_response()
    (scall,) = [o for o in final.output if o.type == "function_call"]
    assert json.loads(args) == json.loads(scall.arguments) and scall.name == "get_weather"
    # the client runs the tool and sends its output: a plain answer follows, by items and by previous_response_id
    follow = ask + [call.model_dump(exclude_none=True),
                    {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"}]
    a = client.responses.create(model="m", input=follow, tools=WEATHER, tool_choice="none", max_output_tokens=8,
                                temperature=0)
    b = client.responses.create(model="m", previous_response_id=r.id, tools=WEATHER, tool_choice="none",
                                max_output_tokens=8, temperature=0,
                                input=[{"type": "function_call_output", "call_id": call.call_id,
                                        "output": "18 degrees and sunny"}])
    assert a.output[0].type == "message" and a.output_text
    assert a.usage.input_tokens == b.usage.input_tokens and a.output_text == b.output_text


def test_input_tokens(client, server):
    st, _, r = http("POST", server.url + "/v1/responses/input_tokens", {"input": "Name three colours."})
    full = client.responses.create(model="m", input="Name three colours.", max_output_tokens=1)
    assert st == 200 and r["input_tokens"] == full.usage.input_tokens


@pytest.mark.parametrize("body,param", [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": WEATHER, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": "hot"}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text"),
    ({"input": "x", "reasoning": {"effort": "enormous"}}, "reasoning"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
])
def test_bad_input_is_an_openai_400(server, body, param):
    st, _, r = http("POST", server.url + "/v1/responses", body)
    assert st == 400 and r["error"]["param"] == param and r["error"]["type"] == "invalid_request_error", r


def test_json_schema_format(client):
    r = client.responses.create(model="m", input="Give me a city.", max_output_tokens=40, text={"format": {
        "type": "json_schema", "name": "city", "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}})
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text)["city"], str)


def test_chat_model_completes_and_continues(chat_client):
    """A real chat model: the answer ends by itself (status completed), streamed = blocking, and
    previous_response_id carries the conversation to the next turn."""
    c = chat_client
    kw = dict(model="m", instructions="Answer in one short sentence.", temperature=0,
              input="What is the capital of France?", max_output_tokens=80)
    first = c.responses.create(**kw)
    assert first.status == "completed" and "Paris" in first.output_text
    with c.responses.stream(**kw) as st:
        assert st.get_final_response().output_text == first.output_text
    second = c.responses.create(model="m", previous_response_id=first.id, temperature=0, max_output_tokens=40,
                                input="And of Italy?")
    assert second.status in ("completed", "incomplete") and second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_reasoning_item():
    """A preset whose generation prompt opens <think> (DeepSeek-R1) makes everything the tiny model writes
    reasoning: a reasoning item, blocking and streamed alike, and reasoning items in `input` are accepted."""
    from tests.tinymodel import tiny_model_path
    with ServerProcess(tiny_model_path(), "--contextsize", "256", "--chatcompletionsadapter", "DeepSeek-R1") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0)
        kw = dict(model="m", input="Hi", max_output_tokens=8, temperature=0, reasoning={"effort": "high"})
        r = c.responses.create(**kw)
        assert [o.type for o in r.output] == ["reasoning"] and r.output[0].content[0].text
        assert 0 < r.usage.output_tokens_details.reasoning_tokens <= r.usage.output_tokens
        with c.responses.stream(**kw) as st:
            events = list(st)
        final = events[-1].response
        assert [o.type for o in final.output] == ["reasoning"]
        assert final.output[0].content[0].text == r.output[0].content[0].text
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
            r.output[0].content[0].text
        # an upper bound far beyond the 256-token context: the reply fills what the prompt leaves
        big = c.responses.create(model="m", input="Hi", max_output_tokens=10 ** 6, reasoning={"effort": "none"},
                                 temperature=0)  # greedy: a sampled end of text or stop string would end it early
        assert big.status == "incomplete" and big.usage.input_tokens + big.usage.output_tokens == 256
        again = c.responses.create(model="m", max_output_tokens=2, input=[
            {"role": "user", "content": "Hi"}, r.output[0].model_dump(exclude_none=True),
            {"role": "user", "content": "More?"}])
        assert again.object == "response"


def test_the_store_bounds_the_images_it_keeps():
    from adapters.responses import ResponseStore
    from gguf_loader.jobs import Media
    store = ResponseStore(media_limit=1000)
    store.put({"id": "a"}, [], [Media("image", b"x" * 600)])
    store.put({"id": "b"}, [], [Media("image", b"x" * 600)])  # 1,200 bytes: the oldest goes
    assert store.get("a") is None and store.get("b").media[0].data == b"x" * 600
    store.put({"id": "c"}, [])
    assert store.get("b") is not None and store.get("c") is not None
