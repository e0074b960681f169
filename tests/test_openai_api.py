"""End to end: the official `openai` SDK against the real server on the bundled model (one server per module).

The model is a small base model, so these tests check mechanics (shapes, counts, determinism, grammar-valid JSON),
not the quality of the answers.
"""
import asyncio
import base64
import json
import struct

import pytest

openai = pytest.importorskip("openai")

from tests.support import ServerProcess, bundled_model_path, http  # noqa: E402

MSG = [{"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(bundled_model_path(), "--contextsize", "2048") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="dummy", max_retries=0, timeout=120)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert len(models.data) == 1
    mid = models.data[0].id
    assert mid.startswith("koboldcpp/") and models.data[0].owned_by and isinstance(models.data[0].created, int)
    assert client.models.retrieve("gpt-4o").id == mid  # any name answers with the loaded model


def test_chat_blocking_and_stream_agree(client):
    kw = dict(model="anything", messages=MSG, max_tokens=16, seed=7, temperature=0.8)
    # warm the prompt cache first: the engine's cold and cached runs differ slightly with one seed (reported)
    client.chat.completions.create(**dict(kw, max_tokens=1))
    full = client.chat.completions.create(**kw)
    c = full.choices[0]
    assert full.object == "chat.completion" and full.model.startswith("koboldcpp/")
    assert c.message.role == "assistant" and c.message.content and c.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 10 and 0 < full.usage.completion_tokens <= 16
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == c.finish_reason
    assert len({ch.id for ch in chunks}) == 1
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == c.message.content


def test_stream_include_usage_and_raw_framing(server):
    body = {"model": "x", "messages": MSG, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    st, hdrs, raw = http("POST", server.url + "/v1/chat/completions", body)
    assert st == 200 and hdrs["Content-Type"].startswith("text/event-stream")
    text = raw.decode()
    assert "event:" not in text and text.endswith("data: [DONE]\n\n")
    # ": keep-alive" comments may come while the job waits (a loaded machine)
    events = [json.loads(e[6:]) for e in text.strip().split("\n\n") if e not in ("data: [DONE]", ": keep-alive")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert all(e["usage"] is None for e in events[:-1])


def test_completions_blocking_stream_logprobs_echo(client):
    kw = dict(model="m", prompt="The capital of France is", max_tokens=8, seed=3)
    client.completions.create(**dict(kw, max_tokens=1))  # warm the prompt cache (see above)
    full = client.completions.create(logprobs=2, echo=True, **kw)
    ch = full.choices[0]
    assert ch.text.startswith("The capital of France is")
    assert len(ch.logprobs.tokens) == full.usage.completion_tokens
    assert all(len(t) <= 2 for t in ch.logprobs.top_logprobs) and all(lp <= 0 for lp in ch.logprobs.token_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert "The capital of France is" + streamed == ch.text


def test_n2_and_chat_logprobs(client):
    r = client.chat.completions.create(model="m", messages=MSG, max_tokens=6, n=2, seed=11, logprobs=True,
                                       top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        lp = c.logprobs.content
        assert lp and all(len(t.top_logprobs) == 3 and t.logprob <= 0 and isinstance(t.bytes, list) for t in lp)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_per_request_adapter_changes_the_prompt(client, server):
    from adapters import instruct
    tags = {"system_start": "<<<SYSTEM INSTRUCTIONS FOLLOW>>> ", "user_start": "<<<THE USER SAYS>>> ",
            "assistant_start": "<<<THE ASSISTANT ANSWERS>>> "}
    counts = {}
    for name, extra in (("default", {}), ("custom", {"adapter": tags})):
        r = client.chat.completions.create(model="m", messages=MSG, max_tokens=1, extra_body=extra)
        adapter = instruct.merge_adapter(instruct.DEFAULT_ADAPTER, extra.get("adapter"))
        prompt = instruct.build_chat_prompt(MSG, adapter).prompt
        st, _, tc = http("POST", server.url + "/api/extra/tokencount", {"prompt": prompt})
        assert r.usage.prompt_tokens == tc["value"], name  # exactly the prompt the adapter builds
        counts[name] = r.usage.prompt_tokens
    assert counts["custom"] > counts["default"] + 5


def test_json_mode_and_schema(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12},
                                               "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}
    r = client.chat.completions.create(model="m", messages=MSG, max_tokens=40, seed=1, response_format={
        "type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"colour", "count"} and isinstance(obj["count"], int)
    r = client.chat.completions.create(model="m", max_tokens=24, seed=1, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": 'Reply with {"ok": true}'}])
    if r.choices[0].finish_reason == "stop":  # a base model may ramble past the budget; when it closes, it parses
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.lstrip().startswith("{")


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}]


def test_forced_tool_call_blocking_and_streamed(client):
    tc = {"type": "function", "function": {"name": "get_weather"}}
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=WEATHER, tool_choice=tc, max_tokens=40, seed=2)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit")

    chunks = list(client.chat.completions.create(model="m", messages=msgs, tools=WEATHER, tool_choice=tc,
                                                 max_tokens=40, seed=2, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    name, argtext = "", ""
    for ch in chunks:
        for d in ch.choices[0].delta.tool_calls or []:
            assert d.index == 0
            name += (d.function.name or "") if d.function else ""
            argtext += (d.function.arguments or "") if d.function else ""
    assert name == "get_weather" and json.loads(argtext) == args


def test_auto_tool_choice_gives_a_call_or_an_answer(client):
    r = client.chat.completions.create(model="m", tools=WEATHER, max_tokens=30, seed=5,
                                       messages=[{"role": "user", "content": "What is the weather in Rome?"}])
    c = r.choices[0]
    if c.finish_reason == "tool_calls":
        assert c.message.tool_calls[0].function.name == "get_weather"
        json.loads(c.message.tool_calls[0].function.arguments)
    else:
        assert c.message.content is not None and not c.message.tool_calls


# a prompt that makes the model reach the "#" stop soon, so the test stays short at max_tokens=250
NPC = [{"role": "system", "content": "You are Lydia, a Nord housecarl in Skyrim."},
       {"role": "user", "content": "Write a short markdown note with a # heading about Whiterun."}]


def test_mantella_pattern_two_at_once(server):
    async def one(i):
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="abc123", max_retries=0) as c:
            stream = await c.chat.completions.create(
                model=f"some-user-typed-model-{i}", messages=NPC, stream=True, max_tokens=250, stop=["#"],
                extra_headers={"HTTP-Referer": "https://example.invalid/mantella", "X-Title": "Mantella"},
                temperature=0.7, seed=i)
            parts, reasons = [], []
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    reasons.append(chunk.choices[0].finish_reason)
            return "".join(parts), reasons

    async def both():
        return await asyncio.gather(one(1), one(2))

    results = asyncio.run(both())
    for text, reasons in results:
        assert "#" not in text
        assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])


def test_async_blocking_chat_and_completion(server):
    async def go():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as c:
            a = await c.chat.completions.create(model="m", messages=MSG, max_tokens=4)
            b = await c.completions.create(model="m", prompt="Hello", max_tokens=4)
            return a, b
    a, b = asyncio.run(go())
    assert a.choices[0].message.content is not None and b.choices[0].text is not None


def test_embeddings_single_batch_base64(client):
    one = client.embeddings.create(model="m", input="hello world", encoding_format="float")
    v = one.data[0].embedding
    assert len(v) > 100 and abs(sum(x * x for x in v) - 1.0) < 1e-3
    assert one.usage.prompt_tokens > 0
    batch = client.embeddings.create(model="m", input=["hello world", "a cat sat on the mat"])  # SDK asks base64
    assert [d.index for d in batch.data] == [0, 1]
    assert max(abs(a - b) for a, b in zip(batch.data[0].embedding, v)) < 1e-5
    ids = client.embeddings.create(model="m", input=[[9259, 2134], [9259]], encoding_format="float")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 3


def test_embeddings_base64_wire_format(server):
    st, _, body = http("POST", server.url + "/v1/embeddings", {"input": "hi", "encoding_format": "base64"})
    raw = base64.b64decode(body["data"][0]["embedding"])
    vec = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert st == 200 and abs(sum(x * x for x in vec) - 1.0) < 1e-3


def test_errors_are_openai_shaped(client, server):
    for bad in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": MSG, "n": 0}, {"messages": MSG, "max_tokens": -5}, {"messages": MSG, "temperature": "hot"},
                {"messages": "hello"}, {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}):
        st, _, b = http("POST", server.url + "/v1/chat/completions", bad)
        assert st == 400, bad
        assert set(b["error"]) >= {"message", "type", "param", "code"} and b["error"]["message"]
    st, _, b = http("POST", server.url + "/v1/chat/completions", b"{broken")
    assert st == 400 and "error" in b
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[], max_tokens=3)


def test_legacy_routes(server):
    u = server.url
    assert http("GET", u + "/v1/engines")[2]["data"][0]["object"] == "engine"
    st, _, b = http("POST", u + "/v1/engines/davinci/generate", {"prompt": "Hi", "max_tokens": 3})
    assert st == 200 and b["object"] == "text_completion"
    st, _, b = http("POST", u + "/v1/edits", {"instruction": "Fix the spelling", "input": "helo", "max_tokens": 4})
    assert st == 200 and b["object"] == "edit" and isinstance(b["choices"][0]["text"], str)
    st, _, b = http("POST", u + "/v1/moderations", {"input": ["a", "b"]})
    assert st == 200 and [r["flagged"] for r in b["results"]] == [False, False]
    st, _, b = http("POST", u + "/v1/images/generations", {"prompt": "a cat"})
    assert st == 501 and "--sdurl" in b["error"]["message"]
    st, _, b = http("POST", u + "/v1/engines/x/embeddings", {"input": "hi"})
    assert st == 200 and b["data"][0]["object"] == "embedding"


def test_openapi_document_and_page(server):
    st, _, doc = http("GET", server.url + "/api/openapi.json")
    assert st == 200 and doc["openapi"].startswith("3.")
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/api/v1/generate",
              "/api/chat", "/v1/models/{model}"):
        assert p in doc["paths"], p
    st, hdrs, page = http("GET", server.url + "/api")
    assert st == 200 and hdrs["Content-Type"].startswith("text/html") and b"/v1/chat/completions" in page


OPENAI_NODE = "7.55.0"
NODE_SCRIPT = r"""
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: "dummy", maxRetries: 0 });
const out = {};
out.model = (await client.models.list()).data[0].id;
const msgs = [{ role: "user", content: "Hi" }];
const chat = await client.chat.completions.create({ model: "gpt-x", messages: msgs, max_tokens: 5, seed: 1 });
out.chat = chat.choices[0].message.content;
const stream = await client.chat.completions.create({ model: "gpt-x", messages: msgs, max_tokens: 5, seed: 1,
  stream: true, stream_options: { include_usage: true } });
out.text = ""; out.reasons = []; out.usage = null;
for await (const ch of stream) {
  if (ch.choices.length) { out.text += ch.choices[0].delta.content ?? ""; out.reasons.push(ch.choices[0].finish_reason); }
  if (ch.usage) out.usage = ch.usage;
}
const emb = await client.embeddings.create({ model: "x", input: ["a", "b"] });
out.emb = [emb.data.length, emb.data[0].embedding.length];
try { await client.chat.completions.create({ model: "x", messages: [] }); } catch (e) { out.err = [e.status, e.message]; }
console.log(JSON.stringify(out));
"""


def test_openai_node_sdk(server, tmp_path):
    """openai-node, unchanged, against the same server (installed with npm into ~/.cache on first use)."""
    import os
    import shutil
    import subprocess
    from pathlib import Path
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node/npm not installed")
    home = Path.home() / ".cache" / f"kcpp-openai-node-{OPENAI_NODE}"
    if not (home / "node_modules" / "openai" / "package.json").is_file():
        home.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(home), f"openai@{OPENAI_NODE}"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"npm could not install openai@{OPENAI_NODE}: {r.stderr[-300:]}")
    script = home / "check.mjs"  # next to node_modules so the import resolves
    script.write_text(NODE_SCRIPT)
    r = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, BASE_URL=server.url + "/v1"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["model"].startswith("koboldcpp/") and isinstance(out["chat"], str)
    assert out["reasons"][-1] in ("stop", "length") and all(x is None for x in out["reasons"][:-1])
    assert 0 < out["usage"]["completion_tokens"] <= 5
    assert out["emb"][0] == 2 and out["emb"][1] > 100
    assert out["err"][0] == 400 and "messages" in out["err"][1]


def test_bad_adapter_flag_is_a_clear_startup_error():
    import subprocess
    import sys
    from tests.support import KOBOLDCPP, free_port
    r = subprocess.run([sys.executable, str(KOBOLDCPP), "--model", bundled_model_path(), "--skiplauncher",
                        "--port", str(free_port()), "--chatcompletionsadapter", "NoSuchPreset"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "NoSuchPreset" in r.stderr and "Traceback" not in r.stderr


def test_autoguess_and_jinja_on_a_model_with_a_chat_template():
    """Tiny model with a ChatML template: AutoGuess picks ChatML and says so; --jinja renders the template."""
    from tests.tinymodel import CHATML_TEMPLATE, tiny_model_path
    model = tiny_model_path(chat_template=CHATML_TEMPLATE)
    msgs = [{"role": "user", "content": "Hi there"}]
    want = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    for flags in (["--chatcompletionsadapter", "AutoGuess"], ["--jinja"]):
        with ServerProcess(model, "--contextsize", "512", *flags) as s:
            st, _, r = http("POST", s.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
            n = http("POST", s.url + "/api/extra/tokencount", {"prompt": want})[2]["value"]
            assert st == 200 and r["usage"]["prompt_tokens"] == n, flags
            if "AutoGuess" in flags:
                assert "Chat completion heuristic: ChatML" in s.log()
            else:
                assert "model's own template" in s.log()


def test_bad_grammar_and_out_of_vocabulary_tokens_are_400(server):
    for body in ({"prompt": "hi", "max_tokens": 4, "grammar": "root ::= ("},
                 {"prompt": [1, 10 ** 9], "max_tokens": 4}):
        st, _, out = http("POST", server.url + "/v1/completions", body)
        assert st == 400 and out["error"]["type"] == "invalid_request_error", (st, out)
