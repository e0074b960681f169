"""OpenAI dialect: request validation, messages -> prompt, engine jobs -> response and SSE chunk shapes.

Every native Kobold sampler field is accepted too: the request is turned into a native-shaped dict and handed to
the native parser (`Context.make_request`), then the OpenAI-only features (n, logprobs shape, tools, JSON mode,
penalties, hidden role stops) are laid over the GenRequest it returns.
"""
from __future__ import annotations

import base64
import copy
import json
import random
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

from adapters import instruct, tools as toolmod
from adapters.errors import ApiError, BadRequest, Busy
from adapters.sse import event as sse_event

MAX_N = 16
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# OpenAI-only keys that must not leak into the native parser under the same name
_OPENAI_ONLY = ("messages", "n", "stream", "stream_options", "tools", "tool_choice", "response_format", "logprobs",
                "top_logprobs", "echo", "suffix", "best_of", "user", "model", "functions", "function_call",
                "parallel_tool_calls", "max_tokens", "max_completion_tokens", "stop", "seed", "adapter",
                "service_tier", "store", "metadata",
                "modalities", "audio", "prediction", "reasoning_effort", "continue_assistant_turn")


@dataclass
class Context:
    """What the routes hand the adapter: the engine and the server's settings."""
    engine: object
    model_name: str  # the name every response reports
    adapter_name: str = instruct.DEFAULT_NAME
    adapter: dict = field(default_factory=lambda: dict(instruct.DEFAULT_ADAPTER))
    use_jinja: bool = False
    default_max_length: int = 896
    # native-shaped dict -> GenRequest (the native Kobold parser); must apply every native sampler field
    make_request: Optional[Callable] = None
    vision: bool = False
    embed_engine: object = None  # engine for /v1/embeddings when --embeddingsmodel gives a separate one
    log: Callable[[str], None] = print


def new_id(prefix: str) -> str:
    return prefix + "".join(random.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
                            for _ in range(24))


# ---------------------------------------------------------------------------------------------------------
# validation helpers

def _bad(msg, param=None):
    e = BadRequest(msg)
    e.param = param
    return e


def _get_num(body, key, lo=None, hi=None, integer=False, default=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return int(v) if integer else float(v)


def _get_bool(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{key}' must be true or false, got {v!r}", key)
    return v


def _stops(body) -> List[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > 256:
            raise _bad("'stop' may hold at most 256 strings", "stop")
        return [s for s in v if s]
    raise _bad("'stop' must be a string or an array of strings", "stop")


def _max_tokens(body, ctx: Context, adapter: dict) -> int:
    n_ctx = getattr(ctx.engine, "n_ctx", 1 << 30)
    for key in ("max_completion_tokens", "max_tokens"):
        v = _get_num(body, key, integer=True)
        if v is not None:
            if v < 1:
                raise _bad(f"'{key}' must be at least 1, got {v}", key)
            if v >= n_ctx:
                raise _bad(f"'{key}' is {v}, but the model's context is {n_ctx} tokens; ask for fewer", key)
            return v
    if isinstance(body.get("max_length"), int) and not isinstance(body.get("max_length"), bool):
        return body["max_length"]
    return int(adapter.get("max_length") or ctx.default_max_length)


def _response_grammar(body) -> Optional[str]:
    rf = body.get("response_format")
    schema = None
    if rf is None:
        if isinstance(body.get("json_schema"), dict):  # legacy top-level field
            schema = body["json_schema"].get("schema", body["json_schema"])
        else:
            return None
    elif not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")
    elif rf["type"] == "text":
        return None
    elif rf["type"] == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF
        return JSON_GBNF
    else:
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise _bad("'response_format.json_schema' must be an object with a 'schema'", "response_format")
        schema = js.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise _bad("the JSON schema must be an object", "response_format")
    try:
        return toolmod.schema_to_gbnf(schema)
    except Exception as e:  # the converter raises assorted errors on schemas it cannot express
        raise _bad(f"cannot build a grammar from the JSON schema: {e}", "response_format")


def _content_text(content, i, ctx: Context) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _bad(f"messages[{i}].content must be a string or an array of content parts", "messages")
    out = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, dict):
            raise _bad(f"messages[{i}].content parts must be objects", "messages")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            if not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}]: a text part needs a string 'text'", "messages")
            out.append(part["text"])
        elif kind in ("image_url", "input_image", "input_audio", "image", "audio", "file"):
            raise _bad(f"messages[{i}] holds a{'n image' if 'image' in kind else ' media'} part, but the loaded model "
                       f"has no vision/audio projector; send text only", "messages")
        else:
            raise _bad(f"messages[{i}]: unknown content part type {kind!r}", "messages")
    return "".join(out)


def parse_messages(messages, ctx: Context) -> List[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        if "content" not in m and not (role == "assistant" and m.get("tool_calls")):
            raise _bad(f"messages[{i}] has no 'content'", "messages")
        if m.get("content") is None and role != "assistant":
            raise _bad(f"messages[{i}].content must not be null", "messages")
        msg = {"role": "tool" if role == "function" else role, "content": _content_text(m.get("content"), i, ctx)}
        if m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list):
                raise _bad(f"messages[{i}].tool_calls must be an array", "messages")
            msg["tool_calls"] = m["tool_calls"]
        if role in ("tool", "function"):
            msg["tool_call_id"] = m.get("tool_call_id") or m.get("name") or ""
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------------------------
# requests -> plan

@dataclass
class Plan:
    kind: str  # "chat" | "completion"
    requests: list  # one GenRequest per choice
    model: str
    id: str
    created: int
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    echo: List[str] = field(default_factory=list)  # per choice, completions echo
    tool_names: List[str] = field(default_factory=list)
    tool_mode: str = ""  # "" | "forced" | "auto"
    decide: Optional[Callable] = None  # auto tools: text of the decision -> (mode, requests)
    results: list = field(default_factory=list)  # filled by run_blocking


def _native_dict(body: dict, adapter: dict, prompt, memory: str, max_length: int, stops: List[str]) -> dict:
    nat = {k: v for k, v in body.items() if k not in _OPENAI_ONLY}
    for key in ("temperature", "top_k", "top_p", "min_p", "rep_pen"):
        if key in adapter and body.get(key) is None:
            nat[key] = adapter[key]
    nat["prompt"] = prompt
    nat["memory"] = memory
    nat["max_length"] = max_length
    nat["stop_sequence"] = stops
    nat["trim_stop"] = True
    if body.get("seed") is not None:
        nat["sampler_seed"] = body["seed"]
    return nat


def _finish_request(req, body, stops, n_logprobs, grammar):
    req.stop = list(dict.fromkeys(list(req.stop or []) + stops))
    req.trim_stop = True
    if grammar:
        req.sampling.grammar = grammar
    if n_logprobs is not None:
        req.logprobs = True
        req.top_logprobs = n_logprobs
    return req


def _check_common(body):
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _get_num(body, "temperature", lo=0)
    _get_num(body, "top_p", lo=0, hi=1)
    _get_num(body, "top_k", integer=True)
    _get_num(body, "min_p", lo=0, hi=1)
    _get_num(body, "presence_penalty", lo=-2, hi=2)
    _get_num(body, "frequency_penalty", lo=-2, hi=2)
    _get_num(body, "seed", integer=True)
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise _bad("'logit_bias' must be an object of token id -> bias", "logit_bias")
        for k, v in lb.items():
            if not str(k).lstrip("-").isdigit() or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _bad("'logit_bias' keys must be token ids and values numbers", "logit_bias")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    n = _get_num(body, "n", lo=1, hi=MAX_N, integer=True, default=1)
    return n


def _seeds(body, n):
    seed = body.get("seed")
    if seed is None or seed < 0:
        return [None] * n
    return [seed + i for i in range(n)]


def _make(ctx: Context, nat: dict):
    if ctx.make_request is None:
        raise ApiError("the server has no native request parser wired", 500)
    return ctx.make_request(nat)


def _request_adapter(body, ctx: Context) -> dict:
    """The server's adapter, with a request's own `adapter` keys over it for this request only."""
    if body.get("adapter") is None:
        return ctx.adapter
    try:
        return instruct.merge_adapter(ctx.adapter, body["adapter"])
    except instruct.AdapterError as e:
        raise _bad(str(e), "adapter")


def parse_chat(body, ctx: Context) -> Plan:
    n = _check_common(body)
    messages = parse_messages(body.get("messages"), ctx)
    adapter = _request_adapter(body, ctx)
    stream = _get_bool(body, "stream")
    logprobs = _get_bool(body, "logprobs")
    top_lp = _get_num(body, "top_logprobs", lo=0, hi=20, integer=True, default=0)
    n_logprobs = top_lp if logprobs else None
    max_len = _max_tokens(body, ctx, adapter)
    user_stops = [instruct.replace_placeholders(s, adapter) for s in _stops(body)]
    grammar = _response_grammar(body)
    tools, choice = toolmod.validate_tools(body.get("tools"), body.get("tool_choice"))
    cont = _get_bool(body, "continue_assistant_turn")
    if choice != "none" and grammar:
        raise _bad("'response_format' cannot be combined with tool calling; use tool_choice 'none'", "response_format")

    def prompt_for(gen_instruction="", with_tools=False):
        use_jinja = ctx.use_jinja and body.get("adapter") is None and not with_tools \
            and getattr(ctx.engine, "chat_template", None)
        if use_jinja:
            try:
                text = instruct.render_jinja(ctx.engine.chat_template, messages)
                return instruct.ChatPrompt(prompt=text, stop=instruct.chat_stops(adapter))
            except instruct.JinjaError as e:
                ctx.log(f"Jinja chat template failed ({e}); using the {ctx.adapter_name} adapter")
        return instruct.build_chat_prompt(messages, adapter, tools_text=toolmod.tools_text(tools) if with_tools else "",
                                          gen_instruction=gen_instruction, continue_assistant=cont)

    def build(cp, max_length, seed, grammar_, extra_stops=(), temp_cap=None):
        stops = cp.stop + user_stops + list(extra_stops)
        nat = _native_dict(body, adapter, cp.prompt, cp.memory, max_length, stops)
        if seed is not None:
            nat["sampler_seed"] = seed
        if temp_cap is not None:
            t = body.get("temperature", adapter.get("temperature"))
            nat["temperature"] = min(float(t) if t is not None else 0.5, temp_cap)
        req = _make(ctx, nat)
        return _finish_request(req, body, stops, n_logprobs, grammar_)

    seeds = _seeds(body, n)
    plan = Plan("chat", [], ctx.model_name, new_id("chatcmpl-"), int(time.time()), stream=stream,
                include_usage=bool((body.get("stream_options") or {}).get("include_usage")), logprobs=logprobs)
    if choice == "none" or not tools:
        cp = prompt_for()
        plan.requests = [build(cp, max_len, s, grammar) for s in seeds]
        return plan
    names = [t["function"]["name"] for t in tools]

    def call_requests(chosen):
        cp = prompt_for(toolmod.call_instruction(chosen), with_tools=True)
        g = toolmod.call_grammar(tools, chosen)
        return [build(cp, max_len, s, g, temp_cap=1.0) for s in seeds]

    plan.tool_names = names
    if choice == "required":
        plan.tool_mode, plan.requests = "forced", call_requests(names)
    elif choice != "auto":
        plan.tool_mode, plan.requests = "forced", call_requests([choice])
    else:
        # the decision runs first (greedy, short); then either forced calls or a plain answer
        plan.tool_mode = "auto"
        cp = prompt_for(toolmod.decision_instruction(names), with_tools=True)
        dec = build(cp, 32, 1, toolmod.decision_grammar(names))
        dec.sampling.temperature, dec.sampling.top_k, dec.logprobs = 0.0, 1, False
        plain_cp = prompt_for(with_tools=True)

        def decide(text):
            picked = toolmod.parse_decision(text, names)
            if picked:
                return "forced", call_requests([picked])
            return "", [build(plain_cp, max_len, s, None) for s in seeds]

        plan.requests = [dec]
        plan.decide = decide
    # build the grammar now so schema errors are 400s, not mid-stream failures
    return plan


def _prompt_value(p, what="prompt"):
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise _bad(f"'{what}' must be a string, an array of strings, an array of token ids or an array of arrays of "
               f"token ids", "prompt")


def parse_completion(body, ctx: Context) -> Plan:
    n = _check_common(body)
    prompt = body.get("prompt", "")
    if prompt is None:
        prompt = ""
    if isinstance(prompt, list) and prompt and all(isinstance(x, (str, list)) for x in prompt):
        prompts = [_prompt_value(p) for p in prompt]
    else:
        prompts = [_prompt_value(prompt) if prompt != "" else ""]
    if len(prompts) * n > MAX_N:
        raise _bad(f"at most {MAX_N} choices per request (prompts x n)", "n")
    stream = _get_bool(body, "stream")
    echo = _get_bool(body, "echo")
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 20):
        if lp is True:
            lp = 5
        elif lp is False:
            lp = None
        else:
            raise _bad("'logprobs' must be an integer from 0 to 20", "logprobs")
    adapter = _request_adapter(body, ctx)
    max_len = _max_tokens(body, ctx, {})
    stops = [instruct.replace_placeholders(s, adapter) for s in _stops(body)]
    grammar = _response_grammar(body)
    plan = Plan("completion", [], ctx.model_name, new_id("cmpl-"), int(time.time()), stream=stream,
                include_usage=bool((body.get("stream_options") or {}).get("include_usage")), logprobs=lp is not None)
    for p in prompts:
        text_prompt = instruct.replace_placeholders(p, adapter) if isinstance(p, str) else p
        for s in _seeds(body, n):
            nat = _native_dict(body, adapter, text_prompt if isinstance(text_prompt, str) else "",
                               instruct.replace_placeholders(body.get("memory", ""), adapter)
                               if isinstance(body.get("memory"), str) else "", max_len, stops)
            if s is not None:
                nat["sampler_seed"] = s
            req = _make(ctx, nat)
            if isinstance(text_prompt, list):
                req.prompt = text_prompt
            plan.requests.append(_finish_request(req, body, stops, lp, grammar))
            if echo:
                plan.echo.append(text_prompt if isinstance(text_prompt, str)
                                 else ctx.engine.detokenize(text_prompt))
    return plan


# ---------------------------------------------------------------------------------------------------------
# shapes

def usage(results) -> dict:
    if not results:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}}
    pt = results[0].prompt_tokens
    ct = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def chat_logprobs(lps) -> dict:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
                         "top_logprobs": [{"token": a[0], "logprob": a[1], "bytes": list(a[2])} for a in t.top]}
                        for t in (lps or [])], "refusal": None}


def completion_logprobs(lps, offset=0) -> dict:
    tokens, tlp, top, offs = [], [], [], []
    for t in lps or []:
        tokens.append(t.token)
        tlp.append(t.logprob)
        top.append({a[0]: a[1] for a in t.top})
        offs.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": tlp, "top_logprobs": top, "text_offset": offs}


def _finish_reason(r) -> str:
    return r.finish_reason if r.finish_reason in ("stop", "length") else "stop"


def _chunk(plan: Plan, choices, usage_=None, with_usage_key=False) -> bytes:
    obj = {"id": plan.id, "object": "chat.completion.chunk" if plan.kind == "chat" else "text_completion",
           "created": plan.created, "model": plan.model, "system_fingerprint": None, "choices": choices}
    if usage_ is not None or with_usage_key:
        obj["usage"] = usage_
    return sse_event(obj)


# ---------------------------------------------------------------------------------------------------------
# running

def _submit(engine, req, wait_s: float = 0.0):
    """Submit, turning a full queue into 503 and a request that can never run (bad grammar, token ids outside the
    vocabulary) into 400; with wait_s, retry a full queue for that long (later choices of one request)."""
    from gguf_loader.jobs import InvalidRequest, QueueFull
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return engine.submit(req)
        except InvalidRequest as e:
            raise _bad(str(e))
        except QueueFull:
            if time.monotonic() >= deadline:
                raise Busy()
            time.sleep(0.2)


def _check_error(r):
    if r is not None and r.error:
        raise ApiError(f"generation failed: {r.error}", 500)


def run_blocking(plan: Plan, engine, is_gone: Callable[[], bool] = lambda: False) -> dict:
    """Runs the plan's jobs one after another (the engine queues them anyway) and shapes the reply."""
    requests = plan.requests
    mode = plan.tool_mode
    if plan.decide:
        r = _wait(_submit(engine, requests[0]), is_gone)
        _check_error(r)
        mode, requests = plan.decide(r.text)
    results = []
    for i, req in enumerate(requests):
        results.append(_wait(_submit(engine, req, wait_s=0 if i == 0 and not plan.decide else 600), is_gone))
        _check_error(results[-1])
        if results[-1].finish_reason == "abort" and is_gone():
            break  # nobody is left to read the other choices
    plan.results = results
    choices = []
    for i, r in enumerate(results):
        if plan.kind == "chat":
            msg = {"role": "assistant", "content": r.text, "refusal": None}
            fr = _finish_reason(r)
            calls = toolmod.parse_call(r.text) if mode == "forced" else None
            if calls:
                msg["content"], msg["tool_calls"], fr = None, calls, "tool_calls"
            choices.append({"index": i, "message": msg, "logprobs": chat_logprobs(r.logprobs) if plan.logprobs else None,
                            "finish_reason": fr})
        else:
            pre = plan.echo[i] if plan.echo else ""
            choices.append({"index": i, "text": pre + r.text, "finish_reason": _finish_reason(r),
                            "logprobs": completion_logprobs(r.logprobs, len(pre)) if plan.logprobs else None})
    return {"id": plan.id, "object": "chat.completion" if plan.kind == "chat" else "text_completion",
            "created": plan.created, "model": plan.model, "system_fingerprint": None, "choices": choices,
            "usage": usage(results)}


def _wait(job, is_gone):
    """Wait for the job, aborting it if the client hangs up (checked every half second, busy or not)."""
    last = time.monotonic()
    try:
        for ev in job.stream(poll=0.5):
            if ev.kind == "done":
                return ev.result
            now = time.monotonic()
            if now - last >= 0.5:
                last = now
                if is_gone():
                    job.abort()
    except BaseException:
        job.abort()
        raise
    return job.result


def start_stream(plan: Plan, engine) -> Iterator[Optional[bytes]]:
    """Submits the first job now (so a full queue is a 503 before any header) and returns the chunk iterator.
    The iterator yields SSE bytes, or None while waiting (the caller checks its socket then); closing it aborts."""
    first = _submit(engine, plan.requests[0])
    return _stream(plan, engine, first)


def _stream(plan: Plan, engine, first_job) -> Iterator[Optional[bytes]]:
    job = first_job
    results = []
    chat = plan.kind == "chat"
    iu = plan.include_usage
    try:
        requests, mode = plan.requests, plan.tool_mode
        if plan.decide:
            r = yield from _drain(job)
            _check_error(r)
            mode, requests = plan.decide(r.text)
            job = None
        for i, req in enumerate(requests):
            if job is None:
                job = _submit(engine, req, wait_s=600)
            if chat:
                yield _chunk(plan, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}], with_usage_key=iu)
            elif plan.echo:
                yield _chunk(plan, [{"index": i, "text": plan.echo[i], "logprobs": None, "finish_reason": None}],
                             with_usage_key=iu)
            if mode == "forced":
                # tool calls are only known once the JSON is complete: generate, then send them as deltas
                r = yield from _drain(job)
                _check_error(r)
                results.append(r)
                yield from _tool_chunks(plan, i, r)
                job = None
                continue
            offset = len(plan.echo[i]) if plan.echo else 0
            r = None
            for ev in job.stream(poll=0.5):
                if ev.kind == "idle":
                    yield None
                elif ev.kind == "text":
                    lp = None
                    if plan.logprobs and ev.logprobs:
                        lp = chat_logprobs(ev.logprobs) if chat else completion_logprobs(ev.logprobs, offset)
                    offset += len(ev.text)
                    if chat:
                        c = {"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}
                    else:
                        c = {"index": i, "text": ev.text, "logprobs": lp, "finish_reason": None}
                    yield _chunk(plan, [c], with_usage_key=iu)
                elif ev.kind == "done":
                    r = ev.result
            job = None
            if r is not None and r.error:
                yield sse_event({"error": {"message": f"generation failed: {r.error}", "type": "server_error",
                                           "param": None, "code": None}})
                return
            results.append(r)
            last = {"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(r)} if chat else \
                {"index": i, "text": "", "logprobs": None, "finish_reason": _finish_reason(r)}
            yield _chunk(plan, [last], with_usage_key=iu)
        if iu:
            yield _chunk(plan, [], usage_=usage(results))
        yield b"data: [DONE]\n\n"
    finally:
        if job is not None and not job.finished.is_set():
            job.abort()


def _drain(job):
    """Run a job to the end without sending text; every event is a tick for the disconnect check."""
    r = None
    for ev in job.stream(poll=0.5):
        if ev.kind in ("idle", "text"):
            yield None
        elif ev.kind == "done":
            r = ev.result
    return r


def _tool_chunks(plan: Plan, i: int, r):
    iu = plan.include_usage
    calls = toolmod.parse_call(r.text)
    if not calls:  # ran out of tokens before the JSON closed: send the text as it is
        yield _chunk(plan, [{"index": i, "delta": {"content": r.text}, "logprobs": None, "finish_reason": None}],
                     with_usage_key=iu)
        yield _chunk(plan, [{"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(r)}],
                     with_usage_key=iu)
        return
    for k, c in enumerate(calls):
        yield _chunk(plan, [{"index": i, "delta": {"tool_calls": [
            {"index": k, "id": c["id"], "type": "function", "function": {"name": c["function"]["name"],
                                                                          "arguments": ""}}]},
            "logprobs": None, "finish_reason": None}], with_usage_key=iu)
        yield _chunk(plan, [{"index": i, "delta": {"tool_calls": [
            {"index": k, "function": {"arguments": c["function"]["arguments"]}}]},
            "logprobs": None, "finish_reason": None}], with_usage_key=iu)
    yield _chunk(plan, [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}],
                 with_usage_key=iu)


# ---------------------------------------------------------------------------------------------------------
# models, embeddings, edits, moderations, images

def models_list(model_name: str) -> dict:
    return {"object": "list", "data": [model_card(model_name)]}


def model_card(model_name: str) -> dict:
    return {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "koboldcpp",
            "permission": [], "root": "koboldcpp"}


def engines_list(model_name: str) -> dict:
    return {"object": "list", "data": [engine_card(model_name)]}


def engine_card(model_name: str) -> dict:
    return {"id": model_name, "object": "engine", "owner": "koboldcpp", "ready": True}


def parse_embeddings(body, ctx: Context):
    """-> (inputs: list of str or token-id lists, encoding_format)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    inp = body.get("input")
    if isinstance(inp, str):
        inputs = [inp]
    elif isinstance(inp, list) and inp:
        if all(isinstance(x, str) for x in inp):
            inputs = list(inp)
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in inp):
            inputs = [list(inp)]
        elif all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
                 for x in inp):
            inputs = [list(x) for x in inp]
        else:
            raise _bad("'input' must be a string, an array of strings, an array of token ids or an array of arrays "
                       "of token ids", "input")
    else:
        raise _bad("'input' must be a non-empty string or array", "input")
    if len(inputs) > 2048:
        raise _bad("at most 2048 inputs per request", "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dims = _get_num(body, "dimensions", lo=1, integer=True)
    return inputs, fmt, dims


def run_embeddings(body, ctx: Context) -> dict:
    inputs, fmt, dims = parse_embeddings(body, ctx)
    eng = ctx.embed_engine or ctx.engine
    tok = getattr(eng, "embed_tokenize", None) or (lambda text: eng.tokenize(text, add_bos=True, special=False))
    limit = getattr(eng, "embed_n_ctx", None) or getattr(eng, "n_ctx", 1 << 30)
    truncate = body.get("truncate", True) is not False
    ids = []
    for k, x in enumerate(inputs):
        t = tok(x) if isinstance(x, str) else x
        if not t:
            raise _bad(f"input {k} is empty", "input")
        if len(t) > limit:
            if not truncate:
                raise _bad(f"input {k} has {len(t)} tokens; the embedding context holds {limit}", "input")
            t = t[:limit]
        ids.append(t)
    try:
        vecs = eng.embed(ids)
    except ValueError as e:
        raise _bad(str(e), "input")
    data = []
    for i, v in enumerate(vecs):
        v = list(v)
        if dims and dims < len(v):  # Matryoshka-style cut, renormalised like OpenAI's `dimensions`
            v = v[:dims]
            norm = sum(x * x for x in v) ** 0.5 or 1.0
            v = [x / norm for x in v]
        emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if fmt == "base64" else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n_tok = sum(len(t) for t in ids)
    return {"object": "list", "data": data, "model": ctx.model_name,
            "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}


def parse_edit(body, ctx: Context) -> Plan:
    """Legacy /v1/edits: instruction + input become one user turn through the adapter."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    instr, inp = body.get("instruction"), body.get("input", "")
    if not isinstance(instr, str) or not instr:
        raise _bad("'instruction' must be a non-empty string", "instruction")
    if not isinstance(inp, str):
        raise _bad("'input' must be a string", "input")
    chat_body = {k: v for k, v in body.items() if k not in ("instruction", "input", "stream")}
    chat_body["messages"] = [{"role": "user", "content": instr + ("\n\n" + inp if inp else "")}]
    return parse_chat(chat_body, ctx)


def edit_response(reply: dict) -> dict:
    return {"object": "edit", "created": reply["created"],
            "choices": [{"text": c["message"]["content"] or "", "index": c["index"]} for c in reply["choices"]],
            "usage": reply["usage"]}


MODERATION_CATEGORIES = ("sexual", "hate", "harassment", "self-harm", "sexual/minors", "hate/threatening",
                         "violence/graphic", "self-harm/intent", "self-harm/instructions", "harassment/threatening",
                         "violence")


def moderation(body, ctx: Context) -> dict:
    """No classifier is loaded: every input is reported as not flagged (documented in the README and OpenAPI)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    inp = body.get("input")
    if isinstance(inp, str):
        items = [inp]
    elif isinstance(inp, list) and inp:
        items = inp
    else:
        raise _bad("'input' must be a string or a non-empty array", "input")
    res = {"flagged": False, "categories": {c: False for c in MODERATION_CATEGORIES},
           "category_scores": {c: 0.0 for c in MODERATION_CATEGORIES}}
    return {"id": new_id("modr-"), "model": ctx.model_name, "results": [copy.deepcopy(res) for _ in items]}


def image_generation(body, sd_url: Optional[str], timeout: float = 600) -> dict:
    """Forward to an Automatic1111-compatible server (`--sdurl` / SD_WEBUI_URL) and return b64_json images."""
    import urllib.error
    import urllib.request
    if not sd_url:
        raise ApiError("image generation is not configured: start with --sdurl http://host:7860 (an Automatic1111 "
                       "server) or set SD_WEBUI_URL", 501, "not_implemented")
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string", "prompt")
    n = _get_num(body, "n", lo=1, hi=10, integer=True, default=1)
    size = body.get("size") or "512x512"
    try:
        w, h = (int(x) for x in str(size).lower().split("x"))
        assert 64 <= w <= 2048 and 64 <= h <= 2048
    except (ValueError, AssertionError):
        raise _bad("'size' must look like '512x512' (64-2048 each side)", "size")
    if body.get("response_format", "b64_json") not in ("b64_json", None):
        raise _bad("only response_format 'b64_json' is supported (no image hosting here)", "response_format")
    payload = {"prompt": prompt, "negative_prompt": body.get("negative_prompt", ""), "width": w, "height": h,
               "batch_size": n, "steps": int(body.get("steps", 20)), "cfg_scale": float(body.get("cfg_scale", 7)),
               "seed": int(body.get("seed", -1))}
    req = urllib.request.Request(sd_url.rstrip("/") + "/sdapi/v1/txt2img", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ApiError(f"the image server at {sd_url} answered {e.code}", 502, "bad_gateway")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(f"cannot reach the image server at {sd_url}: {e}", 502, "bad_gateway")
    images = out.get("images") if isinstance(out, dict) else None
    if not isinstance(images, list):
        raise ApiError(f"the image server at {sd_url} sent no images", 502, "bad_gateway")
    return {"created": int(time.time()), "data": [{"b64_json": im, "revised_prompt": prompt} for im in images[:n]]}
