"""Native tool calls and reasoning (adapters/parsing.py, adapters/tools.py, the lazy grammar in
gguf_loader/sampling.py): each family's call and thinking format read back blocking and streamed, grammars that
force each format on a real (tiny, random) model, the lazy grammar's trigger, and the OpenAI and Ollama replies over
HTTP read by the official `openai` SDK."""
import json
import random

import pytest

from adapters import tools as toolmod
from adapters.parsing import Delta, FORMATS, OutputParser, OutputSpec
from gguf_loader.engine import Engine, EngineConfig
from gguf_loader.jobs import GenRequest, SamplingParams
from tests.support import ServerProcess
from tests.tinymodel import tiny_model_path

THINK = dict(think_start="<think>", think_end="</think>")
CALLS = [{"id": "x", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": '{"city": "Paris", "days": [1, 2]}'}},
         {"id": "y", "type": "function", "function": {"name": "search", "arguments": '{"q": "a \\"b\\" c"}'}}]
PARALLEL = ("hermes", "mistral", "granite", "phi4mini", "command-r", "deepseek", "kimi", "harmony")


def feed(spec, text, sizes):
    """Feed text in pieces of the given sizes (cycled); -> (accumulated delta, message, number of argument
    pieces per call)."""
    p = OutputParser(spec)
    acc, pieces, i, k = Delta(), {}, 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        k += 1
        d = p.feed(text[i:i + n])
        i += n
        for c in d.calls:
            pieces[c.index] = pieces.get(c.index, 0) + bool(c.arguments)
        acc.add(d)
    acc.add(p.close())
    return acc, p.message, pieces


def joined_calls(delta):
    out = {}
    for c in delta.calls:
        e = out.setdefault(c.index, {"id": None, "name": None, "arguments": ""})
        if c.id:
            assert e["id"] is None, "a call's id and name come once, on its first piece"
            e["id"], e["name"] = c.id, c.name
        e["arguments"] += c.arguments
    return [out[i] for i in sorted(out)]


def family_text(fmt, calls, think="I should look it up.", before=""):
    body = toolmod.render_calls(fmt, calls)
    if fmt == "harmony":
        return f"<|channel|>analysis<|message|>{think}<|end|><|start|>assistant" + body
    return f"<think>{think}</think>\n\n{before}{body}"


@pytest.mark.parametrize("fmt", sorted(FORMATS) + ["harmony"])
def test_each_family_blocking_and_streamed(fmt):
    calls = CALLS if fmt in PARALLEL else CALLS[:1]
    before = "" if fmt in ("json", "llama3", "glm4") else "Let me check. "  # start-only formats: no text first
    text = family_text(fmt, calls, before=before)
    spec = OutputSpec(**THINK, tool_format=fmt, harmony=fmt == "harmony")
    rng = random.Random(fmt)
    results = [feed(spec, text, sizes) for sizes in ([len(text)], [1], [3], [rng.randint(1, 9) for _ in range(50)])]
    for acc, msg, pieces in results:
        assert msg.reasoning == "I should look it up." and acc.reasoning == msg.reasoning
        assert msg.content.strip() == (before.strip() if fmt != "harmony" else "")
        assert acc.content.strip() == msg.content.strip()
        got = [(c.name, json.loads(c.arguments)) for c in msg.tool_calls]
        assert got == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
        streamed = joined_calls(acc)
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == got
        assert [c["id"] for c in streamed] == [c.id for c in msg.tool_calls]
    _, _, pieces = results[1]  # char by char: the arguments arrive in many pieces, as they are generated
    assert all(n > 5 for n in pieces.values()), pieces
    if fmt == "mistral":
        assert all(len(c.id) == 9 and c.id.isalnum() for c in results[0][1].tool_calls)


def test_reasoning_opened_by_the_prompt_and_options():
    text = "Thinking here.</think>\n\nThe answer."
    acc, msg, _ = feed(OutputSpec(**THINK, think_open=True), text, [2])
    assert (msg.reasoning, msg.content) == ("Thinking here.", "The answer.") and acc.reasoning == msg.reasoning
    _, msg, _ = feed(OutputSpec(**THINK, think_open=True, reasoning="none"), text, [2])
    assert msg.content == "<think>" + text and msg.reasoning == ""
    p = OutputParser(OutputSpec(**THINK, reasoning="drop"))
    d = p.feed("<think>secret</think>shown")
    d.add(p.close())
    assert (d.reasoning, d.content, p.message.reasoning, p.dropped) == ("", "shown", "", "secret")
    # only a leading block is reasoning; a tag later in the text is content
    _, msg, _ = feed(OutputSpec(**THINK), "Hi <think>x</think>", [1])
    assert msg.content == "Hi <think>x</think>" and msg.reasoning == ""
    # cut by the token budget inside the block: all of it is reasoning
    _, msg, _ = feed(OutputSpec(**THINK), "<think>still going", [4])
    assert msg.reasoning == "still going" and msg.content == ""


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1',  # cut by the budget
    '<tool_call>\nnot json at all</tool_call> after',  # malformed
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
])
def test_malformed_calls_are_content(text):
    for sizes in ([len(text)], [1]):
        _, msg, _ = feed(OutputSpec(tool_format="hermes"), "Sure. " + text, sizes)
        assert msg.tool_calls == [] and msg.content == "Sure. " + text


def test_control_characters_and_odd_escapes_never_raise():
    """Found by fuzzing: a raw control character inside the name made the parser raise (a 500)."""
    for text in ('{"na\x01me": "f", "arguments": {}}', '{"name": "f\x01x", "arguments": {"a": "b\x02"}}',
                 '{"name": "\\u12", "arguments": {}}', '{"name": "\\ud800", "arguments": "\\x"}'):
        for sizes in ([len(text)], [1]):
            _, msg, _ = feed(OutputSpec(tool_format="json"), text, sizes)
            assert msg.tool_calls or msg.content == text


def test_text_around_calls_and_a_call_then_text():
    text = 'Checking.<tool_call>{"name": "f", "arguments": {}}</tool_call> Done.'
    _, msg, _ = feed(OutputSpec(tool_format="hermes"), text, [1])
    assert msg.content == "Checking. Done." and [(c.name, c.arguments) for c in msg.tool_calls] == [("f", "{}")]
    # arguments sent as a JSON string are decoded into the arguments text
    _, msg, _ = feed(OutputSpec(tool_format="json"), '{"name": "f", "arguments": "{\\"a\\": 2}"}', [1])
    assert msg.tool_calls[0].arguments == '{"a": 2}'
    # llama3's bare JSON counts only at the start: JSON inside an answer is text
    _, msg, _ = feed(OutputSpec(tool_format="llama3"), 'Use {"name": "f", "parameters": {}} like this', [1])
    assert msg.tool_calls == []


def test_detect_format_from_templates():
    assert toolmod.detect_format("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert toolmod.detect_format("[TOOL_CALLS] [INST]") == "mistral"
    assert toolmod.detect_format("<|start|>assistant<|channel|>final") == "harmony"
    assert toolmod.detect_format("<|tool_call|>x<|/tool_call|>") == "phi4mini"
    assert toolmod.detect_format("plain {{ messages }}") == ""


# ---------------------------------------------------------------- grammars on a real model

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "metric": {"type": "boolean"}},
    "required": ["city", "metric"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"q": {"enum": ["cats", "dogs"]}}, "required": ["q"]}}}]


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineConfig(tiny_model_path(), n_ctx=512, n_threads=2, max_queue=8))
    yield e
    e.close()


def gen(engine, grammar, triggers=(), max_length=320, seed=1, think=None):
    sp = SamplingParams(temperature=0.0, top_k=1, grammar=grammar, grammar_triggers=list(triggers), seed=seed,
                        grammar_trigger_think=think)
    return engine.submit(GenRequest(prompt="once upon a time", max_length=max_length, sampling=sp,
                                    render_special=True)).wait(60)


@pytest.mark.parametrize("fmt", sorted(toolmod.NATIVE_FORMATS))
def test_forced_grammar_makes_a_valid_call_in_each_format(engine, fmt):
    names = ["get_weather", "search"]
    g = toolmod.format_grammar(TOOLS, names, fmt, parallel=False)
    engine.check_grammar(g)
    r = gen(engine, g)
    assert r.finish_reason == "stop", r.text
    p = OutputParser(OutputSpec(tool_format=fmt, harmony=fmt == "harmony"))
    p.feed(r.text)
    p.close()
    (call,) = p.message.tool_calls
    args = json.loads(call.arguments)
    if call.name == "get_weather":
        assert args["city"] in ("Paris", "Rome") and isinstance(args["metric"], bool)
    else:
        assert call.name == "search" and args["q"] in ("cats", "dogs")
    # a named choice forces that function
    r = gen(engine, toolmod.format_grammar(TOOLS, ["search"], fmt, parallel=False))
    p = OutputParser(OutputSpec(tool_format=fmt, harmony=fmt == "harmony"))
    p.feed(r.text)
    p.close()
    assert [c.name for c in p.message.tool_calls] == ["search"]


def test_forced_call_after_an_opened_reasoning_block(engine):
    g = toolmod.format_grammar(TOOLS, ["search"], "hermes", after="</think>")
    r = gen(engine, g, toolmod.format_triggers("hermes", ["search"], after="</think>"), max_length=60)
    # the tiny model never writes </think> by itself: free text, no constraint yet
    assert "<tool_call>" not in r.text


def test_lazy_grammar_takes_over_at_its_trigger(engine):
    free = gen(engine, "", max_length=40).text
    k = free.find("e")
    assert k >= 0, free
    # the trigger "e..." begins inside free text: from there on the grammar decides
    g = 'root ::= "e" [a-z]* " END"'
    r = gen(engine, g, [r"(e[a-z]*)"], max_length=80)
    assert r.text.startswith(free[:k]) and r.text[k:].endswith(" END"), (free, r.text)
    assert r.text[k:-4].isalpha() and r.finish_reason == "stop"
    # text after the trigger that the grammar refuses leaves generation free (never a crash)
    r = gen(engine, 'root ::= "eQQQ"', [r"(e)"], max_length=40)
    assert r.text == free
    # a trigger inside a leading reasoning block does not count
    r = gen(engine, g, [r"(e[a-z]*)"], max_length=40, think=("<think>", "</think>", True))
    assert r.text == free


# ---------------------------------------------------------------- over HTTP, read by the official SDKs

@pytest.fixture(scope="module")
def server():
    with ServerProcess(tiny_model_path(), "--contextsize", "512", "--chatcompletionsadapter", "ChatML") as s:
        yield s


def forced(text: str) -> str:
    return "root ::= " + toolmod.gbnf_literal(text)


@pytest.mark.parametrize("fmt", sorted(set(toolmod.NATIVE_FORMATS) - {"json"}))
def test_openai_sdk_reads_native_calls_and_reasoning(server, fmt):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="x")
    calls = CALLS if fmt in PARALLEL else CALLS[:1]
    text = family_text(fmt, calls)
    body = dict(model="m", messages=[{"role": "user", "content": "weather?"}], max_tokens=400,
                tools=[{"type": "function", "function": {"name": c["function"]["name"],
                                                        "parameters": {"type": "object"}}} for c in CALLS],
                extra_body={"grammar": forced(text), "adapter": {"tool_format": fmt}, "temperature": 0})
    r = client.chat.completions.create(**body)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert ch.message.model_extra["reasoning_content"] == "I should look it up."
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    # streamed: reasoning pieces, then calls whose arguments arrive in pieces
    reasoning, calls_seen, finish = "", {}, None
    for chunk in client.chat.completions.create(**body, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        for tc in d.tool_calls or []:
            e = calls_seen.setdefault(tc.index, {"name": None, "args": "", "pieces": 0})
            if tc.function.name:
                e["name"] = tc.function.name
            if tc.function.arguments:
                e["args"] += tc.function.arguments
                e["pieces"] += 1
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning == "I should look it up." and finish == "tool_calls"
    assert [(e["name"], json.loads(e["args"])) for e in calls_seen.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls]
    assert all(e["pieces"] > 1 for e in calls_seen.values()), calls_seen


def test_ollama_chat_reads_calls_and_thinking(engine):
    """Ollama has no grammar field: the plan parsed from its body gets the forcing grammar, then runs on the real
    engine and is shaped by the Ollama adapter (blocking and NDJSON)."""
    from adapters import instruct, ollama
    from adapters.chat import Context
    from adapters.run import JobRunner
    name, adapter = instruct.load_adapter("ChatML")
    ctx = Context(engine=engine, model_name="koboldcpp/tiny", adapter_name=name, adapter=adapter, log=lambda s: None)
    text = family_text("hermes", CALLS[:1])
    body = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "stream": False,
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "adapter": {"tool_format": "hermes"}, "options": {"num_predict": 300, "temperature": 0}}

    def plan(**extra):
        p = ollama.parse_chat(dict(body, **extra), ctx)
        p.requests[0].sampling.grammar = forced(text)
        p.requests[0].sampling.grammar_triggers = []
        return p
    m = ollama.run_blocking(plan(), JobRunner(engine), ctx)["message"]
    assert m["thinking"] == "I should look it up."
    assert m["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}}]
    lines = [json.loads(x) for x in b"".join(ollama.start_stream(plan(stream=True), JobRunner(engine), ctx))
             .decode().splitlines()]
    assert "".join(x["message"].get("thinking", "") for x in lines) == "I should look it up."
    assert lines[-1]["done"] and lines[-1]["message"]["tool_calls"] == m["tool_calls"]
    # think: false drops the thinking
    m = ollama.run_blocking(plan(think=False), JobRunner(engine), ctx)["message"]
    assert "thinking" not in m and m["tool_calls"]


def test_no_tools_no_calls_and_reasoning_format_none(server):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="x")
    text = family_text("hermes", CALLS[:1])
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=300,
                                       extra_body={"grammar": forced(text), "adapter": {"tool_format": "hermes"},
                                                   "reasoning_format": "none"})
    msg = r.choices[0].message
    assert msg.content == text and not msg.tool_calls and r.choices[0].finish_reason == "stop"


def test_native_api_reasoning_format(server):
    from tests.support import http
    text = "<think>Plan it.</think>\n\nThe answer."
    body = {"prompt": "Q:", "max_length": 120, "grammar": forced(text), "temperature": 0}
    st, _, out = http("POST", server.url + "/api/v1/generate", body)
    assert st == 200 and out["results"][0]["text"] == text and "reasoning_content" not in out["results"][0]
    st, _, out = http("POST", server.url + "/api/v1/generate", dict(body, reasoning_format="separate"))
    assert (out["results"][0]["text"], out["results"][0]["reasoning_content"]) == ("The answer.", "Plan it.")
    st, _, out = http("POST", server.url + "/api/v1/generate", dict(body, reasoning_format="drop"))
    assert out["results"][0]["text"] == "The answer." and out["results"][0]["reasoning_content"] == ""
    st, _, out = http("POST", server.url + "/api/v1/generate", dict(body, reasoning_format="bogus"))
    assert st == 400 and "reasoning_format" in json.dumps(out)
    import requests
    raw = requests.post(server.url + "/api/extra/generate/stream", json=dict(body, reasoning_format="separate"),
                        timeout=60).text
    events = [json.loads(line[5:]) for line in raw.splitlines() if line.startswith("data:")]
    assert "".join(e.get("reasoning_content", "") for e in events) == "Plan it."
    assert "".join(e["token"] for e in events) == "The answer."


# ---------------------------------------------------------------- --jinja: tools and template kwargs reach the template

TEMPLATES = __import__("pathlib").Path(__file__).resolve().parent / "templates"


def jinja_ctx(name):
    from adapters import instruct
    from adapters.chat import Context
    template = (TEMPLATES / f"{name}.jinja").read_text()
    eng = Engine(EngineConfig(tiny_model_path(chat_template=template), n_ctx=512, n_threads=1, max_queue=2))
    logs = []
    aname, adapter = instruct.load_adapter("AutoGuess", template, log=lambda s: None)
    return eng, Context(engine=eng, model_name="m", adapter_name=aname, adapter=adapter, use_jinja=True,
                        default_max_length=64, log=logs.append), logs


def test_jinja_gets_tools_and_template_kwargs():
    from adapters import openai as oa
    eng, ctx, logs = jinja_ctx("Qwen3")
    try:
        msgs = [{"role": "user", "content": "weather in Paris?"}]
        plan = oa.parse_chat({"messages": msgs, "tools": TOOLS}, ctx)
        (req,) = plan.requests
        assert "<tools>" in req.prompt and '"get_weather"' in req.prompt  # the template's own tool section
        assert plan.output.tool_format == "hermes" and req.sampling.grammar_triggers == ["(<tool_call>)"]
        assert req.sampling.grammar_trigger_think == ("<think>", "</think>", False)
        assert req.prompt.endswith("<|im_start|>assistant\n") and not plan.output.think_open
        plan = oa.parse_chat({"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}}, ctx)
        assert plan.requests[0].prompt.endswith("<think>\n\n</think>\n\n")
        plan = oa.parse_chat({"messages": msgs, "tools": TOOLS, "tool_choice": "required"}, ctx)
        assert plan.tool_mode == "forced" and plan.requests[0].sampling.grammar.startswith("root ::= \"<tool_call>")
        # tool history goes back to the template with object arguments and the tool result
        hist = msgs + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        req = oa.parse_chat({"messages": hist, "tools": TOOLS}, ctx).requests[0]
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in req.prompt and "sunny" in req.prompt
        assert not logs
    finally:
        eng.close()
    eng, ctx, logs = jinja_ctx("QwQ")
    try:
        plan = oa.parse_chat({"messages": [{"role": "user", "content": "hi"}]}, ctx)
        assert plan.output.think_open  # this template opens the reasoning block itself
    finally:
        eng.close()
    eng, ctx, logs = jinja_ctx("GPT-OSS")
    try:
        plan = oa.parse_chat({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high"}, ctx)
        assert "Reasoning: high" in plan.requests[0].prompt and plan.output.harmony
        assert plan.requests[0].render_special and "<|end|>" not in plan.requests[0].stop
    finally:
        eng.close()


def test_jinja_template_without_tools_says_so_once_and_uses_the_adapter():
    from adapters import openai as oa
    eng, ctx, logs = jinja_ctx("Gemma-3")
    try:
        for _ in range(2):
            req = oa.parse_chat({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}, ctx).requests[0]
            assert "get_weather" in req.prompt + req.memory and "<start_of_turn>" in req.prompt
        assert len([x for x in logs if "does not take tools" in x]) == 1
    finally:
        eng.close()
