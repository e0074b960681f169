"""adapters/openai.py, tools.py, openapi.py: validation, prompt building, request mapping and chunk shapes.
Generation runs on a real engine with the tiny random model (fast; gibberish text, exact mechanics)."""
import base64
import json
import struct

import pytest

from adapters import instruct, openapi, tools as toolmod
from adapters import openai as oa
from adapters.errors import ApiError, BadRequest
from adapters.run import JobRunner
from gguf_loader.engine import Engine, EngineConfig
from gguf_loader.jobs import TokenLogprob
from tests.tinymodel import CHATML_TEMPLATE, tiny_model_path

MSG = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineConfig(tiny_model_path(chat_template=CHATML_TEMPLATE), n_ctx=512, n_threads=2, max_queue=6))
    yield e
    e.close()


def make_ctx(engine, preset=None, jinja=False):
    name, adapter = instruct.load_adapter(preset)
    return oa.Context(engine=engine, model_name="koboldcpp/tiny", adapter_name=name, adapter=adapter,
                      use_jinja=jinja, default_max_length=32, log=lambda s: None)


@pytest.fixture(scope="module")
def ctx(engine):
    return make_ctx(engine, "ChatML")


def sse_events(chunks):
    raw = b"".join(c for c in chunks if c is not None).decode()
    assert raw.endswith("data: [DONE]\n\n") and "event:" not in raw
    return [json.loads(e[6:]) for e in raw.strip().split("\n\n") if e != "data: [DONE]"]


# ---- request mapping

def test_chat_maps_onto_a_native_request(ctx):
    plan = oa.parse_chat({"messages": MSG, "max_completion_tokens": 7, "stop": "END", "seed": 5, "temperature": 0.3,
                          "top_k": 9, "rep_pen": 1.2, "top_a": 0.1, "mirostat": 2, "presence_penalty": 0.5,
                          "frequency_penalty": 0.25, "model": "gpt-whatever"}, ctx)
    (req,) = plan.requests
    assert req.prompt == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert req.max_length == 7 and req.sampling.seed == 5 and req.sampling.temperature == 0.3
    assert req.sampling.top_k == 9 and req.sampling.rep_pen == 1.2 and req.sampling.top_a == 0.1
    assert req.sampling.mirostat == 2 and req.sampling.presence_penalty == 0.5
    assert req.sampling.frequency_penalty == 0.25
    assert "END" in req.stop and "<|im_start|>user" in req.stop and "<|im_end|>" in req.stop and req.trim_stop
    assert plan.model == "koboldcpp/tiny"


def test_max_tokens_default_and_limits(ctx):
    assert oa.parse_chat({"messages": MSG}, ctx).requests[0].max_length == 32
    assert oa.parse_chat({"messages": MSG, "max_tokens": 5, "max_completion_tokens": 6}, ctx).requests[0].max_length == 6
    for bad in (0, -1, 10**6, "10", 2.5, True):
        with pytest.raises(BadRequest):
            oa.parse_chat({"messages": MSG, "max_tokens": bad}, ctx)


@pytest.mark.parametrize("body,needle", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"), ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"), ({"messages": MSG, "n": 0}, "'n'"),
    ({"messages": MSG, "n": 99}, "'n'"), ({"messages": MSG, "stop": 3}, "stop"),
    ({"messages": MSG, "temperature": "warm"}, "temperature"), ({"messages": MSG, "top_p": 2}, "top_p"),
    ({"messages": MSG, "stream": "yes"}, "stream"), ({"messages": MSG, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": MSG, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": MSG, "tool_choice": "required"}, "tools"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "a"}}],
      "tool_choice": {"type": "function", "function": {"name": "b"}}}, "'b'"),
    ({"messages": MSG, "tools": "all"}, "tools"), ({"messages": MSG, "adapter": {"user_start": 1}}, "user_start"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "vision"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "video"),
    ([1, 2], "object"),
])
def test_bad_chat_bodies_are_400(ctx, body, needle):
    with pytest.raises(BadRequest) as e:
        oa.parse_chat(body, ctx)
    assert e.value.status == 400 and needle.lower() in e.value.msg.lower()


def test_text_parts_stop_list_and_n_seeds(ctx):
    plan = oa.parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}],
                          "stop": ["x", "y"], "n": 3, "seed": 10}, ctx)
    assert len(plan.requests) == 3 and [r.sampling.seed for r in plan.requests] == [10, 11, 12]
    assert "user\nab<|im_end|>" in plan.requests[0].prompt and {"x", "y"} <= set(plan.requests[0].stop)


def test_request_adapter_and_placeholders_in_stops(ctx):
    plan = oa.parse_chat({"messages": MSG, "adapter": {"user_start": "[U]", "assistant_start": "[A]"},
                          "stop": ["{{[INPUT]}}"]}, ctx)
    req = plan.requests[0]
    assert "[U]hello<|im_end|>" in req.prompt and req.prompt.endswith("[A]") and "[U]" in req.stop
    # the server adapter is unchanged afterwards
    assert oa.parse_chat({"messages": MSG}, ctx).requests[0].prompt.endswith("<|im_start|>assistant\n")


def test_adapter_sampler_defaults_apply_unless_the_request_sets_them(engine):
    c = make_ctx(engine, "ChatML")
    c.adapter = dict(c.adapter, temperature=0.1, top_k=3)
    assert oa.parse_chat({"messages": MSG}, c).requests[0].sampling.top_k == 3
    assert oa.parse_chat({"messages": MSG, "top_k": 50}, c).requests[0].sampling.top_k == 50


def test_jinja_mode_uses_the_model_template(engine):
    c = make_ctx(engine, None, jinja=True)
    req = oa.parse_chat({"messages": MSG}, c).requests[0]
    assert req.prompt == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_response_format_builds_grammars(ctx):
    from llama_cpp.llama_grammar import JSON_GBNF
    assert oa.parse_chat({"messages": MSG, "response_format": {"type": "json_object"}}, ctx) \
        .requests[0].sampling.grammar == JSON_GBNF
    g = oa.parse_chat({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"q": {"type": "integer"}}}}}}, ctx) \
        .requests[0].sampling.grammar
    assert "root ::=" in g and '\\"q\\"' in g
    assert not oa.parse_chat({"messages": MSG, "response_format": {"type": "text"}}, ctx).requests[0].sampling.grammar


def test_completion_prompt_forms(ctx):
    p = oa.parse_completion({"prompt": ["one", "two"], "n": 2, "logprobs": 3, "echo": True}, ctx)
    assert [r.prompt for r in p.requests] == ["one", "one", "two", "two"] and p.echo == ["one", "one", "two", "two"]
    assert all(r.logprobs and r.top_logprobs == 3 for r in p.requests)
    p = oa.parse_completion({"prompt": [5, 6, 7]}, ctx)
    assert p.requests[0].prompt == [5, 6, 7]
    p = oa.parse_completion({"prompt": "{{[INPUT]}}hi{{[OUTPUT]}}"}, ctx)
    assert p.requests[0].prompt == "<|im_start|>user\nhi<|im_start|>assistant\n"
    for bad in ({"prompt": 5}, {"prompt": [1, "a"]}, {"prompt": "x", "logprobs": 99}):
        with pytest.raises(BadRequest):
            oa.parse_completion(bad, ctx)


# ---- tools

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "noop"}}]


def test_forced_tool_plan_has_grammar_and_tool_list(ctx):
    plan = oa.parse_chat({"messages": MSG, "tools": TOOLS, "tool_choice": {"type": "function",
                                                                          "function": {"name": "add"}}}, ctx)
    req = plan.requests[0]
    assert plan.tool_mode == "forced" and '\\"add\\"' in req.sampling.grammar and "noop" not in req.sampling.grammar
    assert "### Available Tools:" in req.memory and "Call the function add" in req.prompt


def test_schema_grammars_keep_control_characters_out_of_strings():
    g = toolmod.schema_to_gbnf({"type": "object", "properties": {"s": {"type": "string"}}})
    char = [line for line in g.splitlines() if line.startswith("char ::=")][0]
    assert "\\x00-\\x1F" in char


def test_tool_call_parsing():
    from adapters.parsing import OutputParser, OutputSpec
    p = OutputParser(OutputSpec(tool_format="json"))
    p.feed('{"name": "add", "arguments": {"a": 1, "b": 2}}')
    p.close()
    (call,) = [c.openai() for c in p.message.tool_calls]
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'} and call["id"].startswith("call_")
    p = OutputParser(OutputSpec(tool_format="json"))
    p.feed('{"name": "add", "argu')
    p.close()
    assert not p.message.tool_calls and p.message.content == '{"name": "add", "argu'
    assert toolmod.parse_decision('{"tool": "add"}', ["add"]) == "add"
    assert toolmod.parse_decision('{"tool": "none"}', ["add"]) is None


# ---- running on the tiny engine

def test_blocking_shapes_n_and_logprobs(ctx):
    plan = oa.parse_chat({"messages": MSG, "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 2,
                          "temperature": 0, "ban_eos_token": True}, ctx)
    out = oa.run_blocking(plan, JobRunner(ctx.engine))
    assert out["object"] == "chat.completion" and [c["index"] for c in out["choices"]] == [0, 1]
    for c in out["choices"]:
        assert c["finish_reason"] == "length" and len(c["logprobs"]["content"]) == 4
        assert all(len(t["top_logprobs"]) == 2 for t in c["logprobs"]["content"])
    assert out["usage"]["completion_tokens"] == 8
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 8


def test_stream_matches_blocking_and_frames(ctx):
    body = {"messages": MSG, "max_tokens": 6, "seed": 3, "temperature": 0.9, "ban_eos_token": True}
    full = oa.run_blocking(oa.parse_chat(body, ctx), JobRunner(ctx.engine))
    plan = oa.parse_chat(dict(body, stream=True, stream_options={"include_usage": True}), ctx)
    ev = sse_events(oa.start_stream(plan, JobRunner(ctx.engine)))
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in ev if e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert [e["choices"][0]["finish_reason"] for e in ev[:-1]][-1] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in ev[:-2])
    assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] == 6
    assert len({e["id"] for e in ev}) == 1 and all(e["object"] == "chat.completion.chunk" for e in ev)


def test_stream_n2_sends_each_choice_with_its_index(ctx):
    plan = oa.parse_chat({"messages": MSG, "max_tokens": 3, "n": 2, "stream": True, "ban_eos_token": True}, ctx)
    ev = sse_events(oa.start_stream(plan, JobRunner(ctx.engine)))
    for i in (0, 1):
        mine = [e["choices"][0] for e in ev if e["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_stop_string_is_never_shown(ctx):
    base = oa.run_blocking(oa.parse_completion({"prompt": "once upon a", "max_tokens": 12, "temperature": 0,
                                                "ban_eos_token": True}, ctx), JobRunner(ctx.engine))
    text = base["choices"][0]["text"]
    stop = text[len(text) // 2:][:3]
    assert stop.strip()
    again = oa.run_blocking(oa.parse_completion({"prompt": "once upon a", "max_tokens": 12, "temperature": 0,
                                                 "ban_eos_token": True, "stop": [stop]}, ctx), JobRunner(ctx.engine))
    c = again["choices"][0]
    assert stop not in c["text"] and c["finish_reason"] == "stop" and text.startswith(c["text"])
    ev = sse_events(oa.start_stream(oa.parse_completion({"prompt": "once upon a", "max_tokens": 12, "temperature": 0,
                                                         "ban_eos_token": True, "stop": stop, "stream": True}, ctx),
                                    JobRunner(ctx.engine)))
    assert "".join(e["choices"][0]["text"] for e in ev) == c["text"]


def test_forced_tool_call_runs_and_streams(ctx):
    body = {"messages": MSG, "tools": TOOLS, "tool_choice": "required", "max_tokens": 60, "temperature": 0}
    out = oa.run_blocking(oa.parse_chat(body, ctx), JobRunner(ctx.engine))
    c = out["choices"][0]
    if c["finish_reason"] == "tool_calls":  # random weights may wander inside a string until the budget ends
        call = c["message"]["tool_calls"][0]
        assert call["function"]["name"] in ("add", "noop") and c["message"]["content"] is None
        json.loads(call["function"]["arguments"])
    ev = sse_events(oa.start_stream(oa.parse_chat(dict(body, stream=True), ctx), JobRunner(ctx.engine)))
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    fr = ev[-1]["choices"][0]["finish_reason"]
    deltas = [d for e in ev for d in e["choices"][0]["delta"].get("tool_calls", [])]
    if fr == "tool_calls":
        assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["arguments"] == ""
        json.loads("".join(d["function"]["arguments"] for d in deltas))
    else:
        assert fr == "length" and not deltas


def test_queue_full_is_503(engine):
    c = make_ctx(engine)
    plan = oa.parse_completion({"prompt": "x", "max_tokens": 200, "ban_eos_token": True, "n": 1}, c)
    jobs = []
    from gguf_loader.jobs import QueueFull
    try:
        for _ in range(20):
            jobs.append(engine.submit(plan.requests[0]))
    except QueueFull:
        pass
    try:
        with pytest.raises(ApiError) as e:
            oa.start_stream(plan, JobRunner(engine))
        assert e.value.status == 503
    finally:
        for j in jobs:
            j.abort()
        for j in jobs:
            j.wait(30)


# ---- embeddings and shapes

def test_embeddings_inputs_and_base64(ctx):
    out = oa.run_embeddings({"input": ["hello", "world"], "encoding_format": "base64"}, ctx)
    assert [d["index"] for d in out["data"]] == [0, 1]
    vec = struct.unpack(f"<{len(base64.b64decode(out['data'][0]['embedding'])) // 4}f",
                        base64.b64decode(out["data"][0]["embedding"]))
    assert abs(sum(x * x for x in vec) - 1) < 1e-4
    out = oa.run_embeddings({"input": [[5, 6], [7]], "dimensions": 8}, ctx)
    assert len(out["data"][1]["embedding"]) == 8 and out["usage"]["prompt_tokens"] == 3
    for bad in ({}, {"input": []}, {"input": [1, "a"]}, {"input": "x", "encoding_format": "hex"}, {"input": 5}):
        with pytest.raises(BadRequest):
            oa.run_embeddings(bad, ctx)


def test_logprob_shapes():
    lps = [TokenLogprob("Hi", -0.5, [72, 105], [("Hi", -0.5, [72, 105]), ("Yo", -1.5, [89, 111])]),
           TokenLogprob("!", -0.1, [33], [("!", -0.1, [33])])]
    chat = oa.chat_logprobs(lps)
    assert chat["content"][0] == {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]}
    comp = oa.completion_logprobs(lps, offset=4)
    assert comp == {"tokens": ["Hi", "!"], "token_logprobs": [-0.5, -0.1],
                    "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}, {"!": -0.1}], "text_offset": [4, 6]}


def test_moderation_and_images_without_server(ctx):
    m = oa.moderation({"input": "x"}, ctx)
    assert m["results"][0]["flagged"] is False and not any(m["results"][0]["categories"].values())
    with pytest.raises(ApiError) as e:
        oa.image_generation({"prompt": "cat"}, None)
    assert e.value.status == 501
    with pytest.raises(ApiError) as e:
        oa.image_generation({"prompt": "cat"}, "http://127.0.0.1:9")  # nothing listens: a clear 502
    assert e.value.status == 502


def test_images_forwarded_to_an_a1111_server():
    import http.server
    import threading
    seen = {}

    class A1111(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen["path"] = self.path
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps({"images": ["aW1n"] * seen["body"]["batch_size"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), A1111)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = oa.image_generation({"prompt": "a cat", "n": 2, "size": "256x128"},
                                  f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()
    assert seen["path"] == "/sdapi/v1/txt2img" and seen["body"]["width"] == 256 and seen["body"]["height"] == 128
    assert [d["b64_json"] for d in out["data"]] == ["aW1n", "aW1n"]


def test_openapi_lists_routes():
    doc = openapi.build([("POST", "/v1/chat/completions", True, "openai"), ("GET", "/v1/models", False, "openai"),
                         ("GET", "/unlisted", False, "kobold")], "1.0")
    op = doc["paths"]["/v1/chat/completions"]["post"]
    assert op["security"] and "messages" in op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert doc["paths"]["/unlisted"]["get"]["summary"] == "GET /unlisted"
    assert "/v1/chat/completions" in openapi.render_html(doc)
