"""Ollama dialect (/api/tags, /api/version, /api/generate, /api/chat): bodies parsed into engine requests, replies
shaped as Ollama objects from the engine's results, streamed as NDJSON (one JSON object per line)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone
from typing import Iterator, List, Optional

from gguf_loader.jobs import BudgetError, GenRequest, token_budget

from . import chat, fields as F, instruct, media as mediamod, tools as toolmod
from .chat import Context, Plan
from .errors import ApiError, BadRequest
from .run import JobRunner, finish_reason

OLLAMA_VERSION = "0.7.0"

# Ollama option -> the sampler field it sets (fields.SAMPLER_FIELDS names)
_OPTION_MAP = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
               "repeat_penalty": "rep_pen", "repeat_last_n": "rep_pen_range", "typical_p": "typical",
               "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def tags(model_name: str, model_path: str = "", metadata: Optional[dict] = None) -> dict:
    meta = metadata or {}
    arch = str(meta.get("general.architecture", "gguf"))
    try:
        st = os.stat(model_path)
        size, mtime = st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    except OSError:
        size, mtime = 0, _now()
    return {"models": [{"name": model_name, "model": model_name + ":latest", "modified_at": mtime, "size": size,
                        "digest": hashlib.sha256(model_path.encode("utf-8", "replace")).hexdigest(),
                        "details": {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                                    "parameter_size": "", "quantization_level": ""}}]}


def version() -> dict:
    return {"version": OLLAMA_VERSION}


def _bad(msg: str, param: Optional[str] = None) -> BadRequest:
    return BadRequest(msg, param=param)


def _template(b: F.Body, ctx: Context, adapter: dict, extra_stops: List[str]) -> GenRequest:
    """options + format -> the request every choice shares (Ollama's options are checked strictly)."""
    opts = b.raw("options")
    if opts is F.MISSING:
        opts = {}
    if not isinstance(opts, dict):
        raise _bad("'options' must be an object", "options")
    o = F.Body(opts)
    mapped = F.Body({_OPTION_MAP[k]: v for k, v in opts.items() if k in _OPTION_MAP})
    sampling = F.sampling(mapped, ctx.engine.n_vocab, strict=True,
                          defaults={k: adapter[k] for k in ("temperature", "top_k", "top_p", "min_p", "rep_pen")
                                    if k in adapter})
    n = o.int("num_predict")
    max_len = n if n is not None and n > 0 else int(adapter.get("max_length") or ctx.default_max_length)
    try:
        token_budget(ctx.engine.n_ctx, None, max_len)
    except BudgetError as e:
        raise _bad(e.describe("options.num_predict"), "options.num_predict")
    stop = opts.get("stop", b.data.get("stop"))
    stops = F.Body({"stop": stop}).strs("stop", F.MAX_STOP_SEQUENCES)
    fmt = b.data.get("format")
    if fmt == "json":
        from llama_cpp.llama_grammar import JSON_GBNF
        sampling.grammar = JSON_GBNF
    elif isinstance(fmt, dict):
        sampling.grammar = F.json_schema_to_grammar(fmt, "format")
    elif fmt not in (None, ""):
        raise _bad("'format' must be \"json\" or a JSON schema object", "format")
    return GenRequest(prompt="", max_length=max_len, max_context_length=ctx.engine.n_ctx, sampling=sampling,
                      stop=stops + extra_stops, trim_stop=True)


def _images(obj: dict, where: str, ctx: Context, media: list) -> str:
    """`images` (base64 strings) -> media items appended to `media`; returns their markers for the text."""
    v = obj.get("images")
    if not v:
        return ""
    policy = getattr(ctx, "media", None) or mediamod.MediaPolicy()
    if not isinstance(v, list):
        raise _bad(f"{where}: 'images' must be an array of base64 strings", "images")
    items = mediamod.base64_list(v, policy, "image", "images")
    media += items
    mediamod.check_count(len(media), policy, "images")
    return mediamod.placeholders(items)


def parse_generate(body, ctx: Context) -> Plan:
    b = F.Body(body)
    prompt, system = mediamod.strip_markers(b.str("prompt")), mediamod.strip_markers(b.str("system"))
    media: list = []
    prompt = _images(b.data, "the request", ctx, media) + prompt
    adapter = chat.request_adapter(ctx, b.data.get("adapter"))
    context = F.token_ids("context", b.data.get("context") or [], ctx.engine.n_vocab)
    history = ctx.engine.detokenize(context) if context else ""
    raw = b.bool("raw")
    if raw:
        text, stops = history + prompt, []
    else:
        t = instruct.tag
        text = (t(adapter, "chat_start") + (t(adapter, "system_start") + system + t(adapter, "system_end") if system
                                            else "")
                + history + t(adapter, "user_start") + prompt + t(adapter, "user_end") + t(adapter, "assistant_gen"))
        stops = instruct.chat_stops(adapter)
    template = _template(b, ctx, adapter, stops)
    template.media = media
    plan = Plan("completion", [], ctx.model_name, "", stream=b.bool("stream", True))
    plan.requests = chat.for_choices(template, instruct.ChatPrompt(prompt=text), [None])
    return plan


def _messages(msgs, ctx: Context = None, media: list = None) -> List[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise _bad(f"messages[{i}].role must be system, user, assistant or tool, got {role!r}", "messages")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string", "messages")
        marks = _images(m, f"messages[{i}]", ctx, media if media is not None else [])
        mm = {"role": role, "content": marks + F.clean_text(mediamod.strip_markers(content or ""))}
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls must be an array", "messages")
            mm["tool_calls"] = [{"id": f"call_{j}", "type": "function",
                                 "function": {"name": (c.get("function") or {}).get("name", ""),
                                              "arguments": json.dumps((c.get("function") or {}).get("arguments", {}))}}
                                for j, c in enumerate(calls) if isinstance(c, dict)]
        name = m.get("tool_name", m.get("name"))
        if role == "tool":
            mm["tool_call_id"] = name if isinstance(name, str) else ""
        out.append(mm)
    return out


def _think(b: F.Body) -> dict:
    """Ollama's `think`: true/false, or "low"/"medium"/"high" (gpt-oss) -> the chat pipeline's reasoning options.
    Thinking is always returned apart (message.thinking); false asks the template not to think and drops any."""
    v = b.raw("think")
    if v is F.MISSING or v is None:
        return {}
    if v is True:
        return {"enable_thinking": True}
    if v is False:
        return {"enable_thinking": False, "reasoning_format": "drop"}
    if v in ("low", "medium", "high"):
        return {"enable_thinking": True, "reasoning_effort": v}
    raise _bad("'think' must be true, false, \"low\", \"medium\" or \"high\"", "think")


def parse_chat(body, ctx: Context) -> Plan:
    b = F.Body(body)
    media: list = []
    messages = _messages(b.data.get("messages"), ctx, media)
    adapter = chat.request_adapter(ctx, b.data.get("adapter"))
    tools, choice = toolmod.validate_tools(b.data.get("tools") or None, None)
    template = _template(b, ctx, adapter, [])
    template.media = media
    plan = Plan("chat", [], ctx.model_name, "", stream=b.bool("stream", True))
    return chat.plan_chat(plan, ctx, messages, adapter, template, [None], tools, choice,
                          jinja=ctx.use_jinja and b.data.get("adapter") is None, **_think(b))


# ---------------------------------------------------------------- replies

def _final(plan: Plan, r, piece: dict, started: float, ctx: Context) -> dict:
    d = {"model": plan.model, "created_at": _now(), **piece, "done": True, "done_reason": finish_reason(r),
         "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
         "prompt_eval_count": r.prompt_tokens, "prompt_eval_duration": int(r.process_time * 1e9),
         "eval_count": r.completion_tokens, "eval_duration": int(r.eval_time * 1e9)}
    if plan.kind == "completion":
        prompt = plan.requests[0].prompt
        ids = prompt if isinstance(prompt, list) else ctx.engine.tokenize(prompt, add_bos=False)
        d["context"] = list(ids) + ctx.engine.tokenize(r.text, add_bos=False, special=False)
    return d


def _message(m) -> dict:
    """An assistant turn (adapters.parsing.Message) as Ollama's message: thinking apart, tool calls with their
    arguments as objects."""
    msg = {"role": "assistant", "content": m.content}
    if m.reasoning:
        msg["thinking"] = m.reasoning
    if m.tool_calls:
        msg["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments_value()}} for c in m.tool_calls]
    return msg


def _piece(plan: Plan, ev) -> dict:
    return {"message": _message(ev.message)} if plan.kind == "chat" else {"response": ev.result.text}


def run_blocking(plan: Plan, runner: JobRunner, ctx: Context) -> dict:
    started = time.monotonic()
    (done,) = chat.run(plan, runner)
    return _final(plan, done.result, _piece(plan, done), started, ctx)


def _line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def start_stream(plan: Plan, runner: JobRunner, ctx: Context) -> Iterator[bytes]:
    """NDJSON: one object per text piece (done false), then the final one. A tool call comes whole in the final
    object. The first job is submitted before anything is yielded (a full queue is a 503)."""
    return _stream(plan, chat.start(plan, runner), ctx)


def _stream(plan: Plan, events, ctx: Context) -> Iterator[bytes]:
    """Content and thinking stream as they come; tool calls are sent whole in the final line (Ollama's clients
    read `message.tool_calls` from any line)."""
    started = time.monotonic()
    is_chat = plan.kind == "chat"
    sent = False
    try:
        for ev in events:
            if ev.kind == "text" and is_chat:
                d = ev.delta
                msg = {"role": "assistant", "content": d.content}
                if d.reasoning:
                    msg["thinking"] = d.reasoning
                if d.content or d.reasoning:
                    sent = True
                    yield _line({"model": plan.model, "created_at": _now(), "message": msg, "done": False})
            elif ev.kind == "text" and ev.text:
                sent = True
                yield _line({"model": plan.model, "created_at": _now(), "response": ev.text, "done": False})
            elif ev.kind == "done":
                if is_chat:
                    calls = ev.message.tool_calls
                    piece = {"message": {"role": "assistant", "content": ""}}
                    if calls:
                        piece["message"]["tool_calls"] = [{"function": {"name": c.name,
                                                                        "arguments": c.arguments_value()}}
                                                          for c in calls]
                else:
                    piece = {"response": ""}
                sent = True
                yield _line(_final(plan, ev.result, piece, started, ctx))
    except ApiError as e:
        if not sent:
            raise
        yield _line({"error": e.msg})
