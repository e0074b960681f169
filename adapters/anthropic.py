"""Anthropic Messages (/v1/messages, /v1/messages/count_tokens): the body parsed once into normalised chat
messages and a template request, run through the shared chat pipeline, the turn shaped as content blocks
(thinking, text, tool_use) or streamed as Anthropic's event sequence."""
from __future__ import annotations

import dataclasses
import json
from typing import Iterator, List, Optional

from gguf_loader.jobs import GenRequest

from . import chat, fields as F, media as mediamod, tools as toolmod, turn
from .chat import Context, Plan, new_id
from .errors import ApiError, BadRequest, error_body
from .run import JobRunner
from .sse import event as sse_event

STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens", "stop_sequence": "stop_sequence",
                "stop": "end_turn"}


def _bad(msg: str, param: Optional[str] = None) -> BadRequest:
    return BadRequest(msg, param=param)


def _image(blk: dict, where: str, policy) -> "mediamod.Media":
    """An image block: {"source": {"type": "base64", "media_type", "data"}} or {"source": {"type": "url", "url"}}."""
    src = blk.get("source")
    policy = policy or mediamod.MediaPolicy()
    if not isinstance(src, dict) or src.get("type") not in ("base64", "url"):
        raise _bad(f"{where}.source must be {{type: 'base64', media_type, data}} or {{type: 'url', url}} (files are "
                   f"not supported)", "messages")
    if src["type"] == "url":
        return mediamod.image_url(src.get("url"), policy, where, "messages")
    mime = src.get("media_type")
    if mime is not None and (not isinstance(mime, str) or not mime.startswith("image/")):
        raise _bad(f"{where}.source.media_type must be an image type such as image/png", "messages")
    if not policy.vision:  # before decoding a possibly large payload
        return mediamod.image(b"", policy, where, "messages")
    return mediamod.image(mediamod.b64decode(src.get("data"), f"{where}.source.data", "messages"), policy, where,
                          "messages")


def _blocks(content, where: str, media: Optional[list], policy, start: int = 0) -> List[str]:
    """Text blocks (and image blocks where `media` is given: a media marker each, the item appended to it);
    `start` is the first block's index in `where`."""
    out = []
    for j, blk in enumerate(content, start):
        bw = f"{where}[{j}]"
        kind = blk.get("type") if isinstance(blk, dict) else None
        if kind == "text":
            if not isinstance(blk.get("text"), str):
                raise _bad(f"{bw}.text must be a string")
            out.append(F.clean_text(mediamod.strip_markers(blk["text"])))
        elif kind == "image" and media is not None:
            media.append(_image(blk, bw, policy))
            mediamod.check_count(len(media), policy or mediamod.MediaPolicy(), "messages")
            out.append(mediamod.placeholders(media[-1:]))
        elif kind in ("image", "document"):
            raise _bad(f"{bw} is a{'n image' if kind == 'image' else ' document'} block; "
                       f"{'documents (PDF) are not supported' if kind == 'document' else 'images go in messages only'}")
        else:
            raise _bad(f"{bw} must be a text block")
    return out


def _text_of(content, where: str, media: Optional[list] = None, policy=None) -> str:
    """A string, or text blocks (system; tool_result content, which may hold images too): their text joined."""
    if isinstance(content, str):
        return F.clean_text(mediamod.strip_markers(content))
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or an array of content blocks")
    return "\n".join(_blocks(content, where, media, policy))


def parse_messages(body: dict, media: Optional[list] = None, policy=None) -> List[dict]:
    """system + messages -> normalised {role, content, tool_calls?, tool_call_id?}. A user turn's tool_result
    blocks become tool messages (before its text); an assistant turn's tool_use blocks become tool calls and its
    thinking blocks are dropped (the prompt carries the answers only). Image blocks of user turns (and of their
    tool results) are appended to `media`, a marker each in the text."""
    out = []
    system = body.get("system")
    if system is not None:
        text = _text_of(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty array of {role, content} objects")
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise _bad(f"{where}.role must be 'user' or 'assistant', got {role!r}")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": F.clean_text(mediamod.strip_markers(content))})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or an array of content blocks")
        texts, calls, results = [], [], []
        # tool results go before the turn's text in the prompt, so their images come first too
        text_media, result_media = ([], []) if media is not None else (None, None)
        for j, blk in enumerate(content):
            bw = f"{where}.content[{j}]"
            kind = blk.get("type") if isinstance(blk, dict) else None
            if kind == "text" or (kind == "image" and role == "user"):
                texts += _blocks([blk], f"{where}.content", text_media, policy, j)
            elif kind in ("image", "document"):
                raise _bad(f"{bw} is a{'n image' if kind == 'image' else ' document'} block; "
                           f"{'documents (PDF) are not supported' if kind == 'document' else 'images go in user turns'}")
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(blk.get("name"), str) or not blk["name"] or not isinstance(blk.get("id"), str):
                    raise _bad(f"{bw}: a tool_use block needs a string 'id' and 'name'")
                calls.append({"id": blk["id"], "type": "function",
                              "function": {"name": blk["name"],
                                           "arguments": json.dumps(blk.get("input") or {}, ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(blk.get("tool_use_id"), str):
                    raise _bad(f"{bw}: a tool_result block needs a string 'tool_use_id'")
                text = _text_of(blk.get("content", ""), f"{bw}.tool_result content", result_media, policy)
                if blk.get("is_error") is True:
                    text = "Error: " + text
                results.append({"role": "tool", "content": text, "tool_call_id": blk["tool_use_id"]})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue
            else:
                raise _bad(f"{bw}: unsupported content block type {kind!r} in a{'n' if role == 'assistant' else ''} "
                           f"{role} message")
        if media is not None:
            media += result_media + text_media
            mediamod.check_count(len(media), policy or mediamod.MediaPolicy(), "messages")
        out += results
        if texts or calls or not results:
            msg = {"role": role, "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def parse_tools(body: dict) -> tuple:
    """Anthropic tools and tool_choice -> (OpenAI-shaped tools, choice) through the shared validation."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array of {name, description, input_schema} objects", "tools")
        conv = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type", "custom") not in ("custom", None):
                raise _bad(f"tools[{i}] is a server tool ({t.get('type') if isinstance(t, dict) else t!r}); this "
                           f"server runs client tools only ({{name, description, input_schema}})", "tools")
            if not isinstance(t.get("name"), str) or not t["name"]:
                raise _bad(f"tools[{i}].name must be a non-empty string", "tools")
            schema = t.get("input_schema", {"type": "object"})
            if not isinstance(schema, dict):
                raise _bad(f"tools[{i}].input_schema must be a JSON schema object", "tools")
            desc = t.get("description", "")
            conv.append({"type": "function", "function": {"name": t["name"], "description": desc
                                                          if isinstance(desc, str) else "", "parameters": schema}})
        tools = conv
    tc = body.get("tool_choice")
    choice = None
    if tc is not None:
        if not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none"):
            raise _bad("'tool_choice' must be {type: 'auto' | 'any' | 'tool' | 'none'}", "tool_choice")
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(tc["type"])
        if tc["type"] == "tool":
            if not isinstance(tc.get("name"), str):
                raise _bad("'tool_choice' of type 'tool' needs a string 'name'", "tool_choice")
            choice = {"type": "function", "function": {"name": tc["name"]}}
    parallel = not (isinstance(tc, dict) and tc.get("disable_parallel_tool_use") is True)
    tools, choice = toolmod.validate_tools(tools, choice)
    return tools, choice, parallel


def _stop_sequences(b: F.Body) -> List[str]:
    v = b.raw("stop_sequences")
    if v is F.MISSING:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or len(v) > F.MAX_STOP_SEQUENCES:
        raise _bad(f"'stop_sequences' must be an array of at most {F.MAX_STOP_SEQUENCES} strings", "stop_sequences")
    return [F.clean_text(x) for x in v if x]


def _thinking(b: F.Body) -> Optional[dict]:
    v = b.raw("thinking")
    if v is F.MISSING:
        return None
    if not isinstance(v, dict) or v.get("type") not in ("enabled", "disabled", "adaptive", "between_tools"):
        raise _bad("'thinking' must be {type: 'enabled', budget_tokens}, {type: 'adaptive'} or {type: 'disabled'}",
                   "thinking")
    if v["type"] == "enabled":
        F.Body(v).int("budget_tokens", None, 1, None)
    return v


def _output_config(b: F.Body) -> tuple:
    """output_config: {effort, format: {type: 'json_schema', schema}} -> (effort or None, GBNF or "")."""
    v = b.raw("output_config")
    if v is F.MISSING:
        return None, ""
    if not isinstance(v, dict):
        raise _bad("'output_config' must be an object", "output_config")
    effort = v.get("effort")
    if effort is not None and effort not in ("low", "medium", "high", "xhigh", "max"):
        raise _bad("'output_config.effort' must be low, medium, high, xhigh or max", "output_config")
    fmt = v.get("format")
    if fmt is None:
        return effort, ""
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _bad("'output_config.format' must be {type: 'json_schema', schema: {...}}", "output_config")
    return effort, F.json_schema_to_grammar(fmt["schema"], "output_config")


def parse(body, ctx: Context, count_only: bool = False) -> tuple:
    """-> (Plan, the user's stop sequences). count_only: /v1/messages/count_tokens (max_tokens not needed)."""
    b = F.Body(body)
    eng = ctx.engine
    max_tokens = b.int("max_tokens", None, 1, None)
    if max_tokens is None:
        if not count_only:
            raise _bad("'max_tokens' is required", "max_tokens")
        max_tokens = 1
    media: list = []
    messages = parse_messages(b.data, media, getattr(ctx, "media", None))
    tools, choice, parallel = parse_tools(b.data)
    thinking = _thinking(b)
    adapter = ctx.adapter
    picked = {k: b.data[k] for k in ("temperature", "top_p", "top_k") if b.data.get(k) is not None}
    if "temperature" in picked:
        F.bounded("temperature", picked["temperature"], 0, 2)
    sampling = F.sampling(F.Body(picked), eng.n_vocab, strict=True,
                          defaults={k: adapter[k] for k in ("temperature", "top_k", "top_p", "min_p", "rep_pen")
                                    if k in adapter})
    stops = _stop_sequences(b)
    effort, grammar = _output_config(b)
    if grammar:
        if tools and choice != "none":
            raise _bad("'output_config.format' cannot be combined with tool use; use tool_choice none",
                       "output_config")
        sampling.grammar = grammar
    opts = _pipeline_options(parallel, thinking, effort)
    stream, rid = b.bool("stream"), new_id("msg_")

    def plan_with(max_new: int) -> Plan:
        template = GenRequest(prompt="", max_length=max_new, max_context_length=eng.n_ctx,
                              sampling=dataclasses.replace(sampling), stop=stops, trim_stop=True, media=media)
        plan = Plan("chat", [], ctx.model_name, rid, stream=stream)
        return chat.plan_chat(plan, ctx, messages, adapter, template, [None], tools, choice, jinja=ctx.use_jinja,
                              tool_temperature=sampling.temperature if "temperature" in picked
                              else float(adapter.get("temperature", 0.5)), **opts)
    return turn.plan_capped(eng.n_ctx, eng, max_tokens, plan_with), stops


def _pipeline_options(parallel: bool, thinking: Optional[dict], effort: Optional[str]) -> dict:
    """thinking / output_config.effort / disable_parallel_tool_use as the chat pipeline's options; thinking comes
    back as its own content blocks (reasoning kept separate)."""
    opts = {"parallel_tool_calls": parallel, "reasoning_format": "separate"}
    if thinking is not None and thinking["type"] == "disabled":
        opts["reasoning_effort"] = "none"
    elif thinking is not None and thinking["type"] == "enabled":
        opts["enable_thinking"] = True
    if effort is not None and "reasoning_effort" not in opts:
        opts["reasoning_effort"] = "high" if effort in ("xhigh", "max") else effort
    return opts


def count_tokens(body, ctx: Context) -> dict:
    plan, _ = parse(body, ctx, count_only=True)
    return {"input_tokens": turn.count_prompt(ctx.engine, plan.requests[0])}


# ---------------------------------------------------------------- replies

def _usage(r) -> dict:
    return {"input_tokens": r.prompt_tokens, "output_tokens": r.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": r.cached_tokens}


def _input_json(arguments: str):
    try:
        v = json.loads(arguments)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {"value": v}


def _signature(text: str) -> str:
    """Thinking blocks carry a signature clients echo back; ours is only a checksum of the text."""
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def message(plan: Plan, out: turn.Outcome, stops: List[str]) -> dict:
    blocks = []
    if out.reasoning:
        blocks.append({"type": "thinking", "thinking": out.reasoning, "signature": _signature(out.reasoning)})
    if out.content or not (out.calls or out.reasoning):
        blocks.append({"type": "text", "text": out.content})
    for c in out.calls:
        blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": _input_json(c.arguments)})
    why, seq = turn.finish(out, stops)
    return {"id": plan.id, "type": "message", "role": "assistant", "model": plan.model, "content": blocks,
            "stop_reason": STOP_REASONS[why], "stop_sequence": seq, "usage": _usage(out.result)}


def run_blocking(plan: Plan, runner: JobRunner, stops: List[str]) -> dict:
    return message(plan, turn.run(plan, runner), stops)


def _ev(name: str, data: dict) -> bytes:
    return sse_event({"type": name, **data}, name)


def start_stream(plan: Plan, runner: JobRunner, ctx: Context, stops: List[str]) -> Iterator[bytes]:
    """Anthropic's event sequence; the job is queued before anything is yielded (a full queue is a 503)."""
    pieces = turn.start(plan, runner)
    req = plan.requests[0]
    n_in = len(req.prompt) if isinstance(req.prompt, list) else len(ctx.engine.tokenize(req.memory + req.prompt))
    return _stream(plan, pieces, stops, n_in)


def _stream(plan: Plan, pieces, stops: List[str], n_in: int) -> Iterator[bytes]:
    started = False
    state = {"open": None, "index": -1, "kind": None, "text": ""}

    def close():
        out = []
        if state["open"] is not None:
            if state["kind"] == "thinking":
                out.append(_ev("content_block_delta", {"index": state["index"], "delta": {
                    "type": "signature_delta", "signature": _signature(state["text"])}}))
            out.append(_ev("content_block_stop", {"index": state["index"]}))
            state["open"] = None
        return out

    def open_block(kind: str, key, block: dict):
        out = close()
        state["index"] += 1
        state.update(open=key, kind=kind, text="")
        out.append(_ev("content_block_start", {"index": state["index"], "content_block": block}))
        return out

    try:
        yield _ev("message_start", {"message": {
            "id": plan.id, "type": "message", "role": "assistant", "model": plan.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": 0}}})
        started = True
        yield _ev("ping", {})
        for p in pieces:
            if isinstance(p, turn.Outcome):
                if state["index"] < 0:  # an empty answer is still one (empty) text block
                    yield from open_block("text", "text", {"type": "text", "text": ""})
                yield from close()
                why, seq = turn.finish(p, stops)
                yield _ev("message_delta", {"delta": {"stop_reason": STOP_REASONS[why], "stop_sequence": seq},
                                            "usage": _usage(p.result)})
                yield _ev("message_stop", {})
                return
            if p.kind == "reasoning":
                if state["open"] != "thinking":
                    yield from open_block("thinking", "thinking", {"type": "thinking", "thinking": "",
                                                                   "signature": ""})
                state["text"] += p.text
                yield _ev("content_block_delta", {"index": state["index"],
                                                  "delta": {"type": "thinking_delta", "thinking": p.text}})
            elif p.kind == "text":
                if state["open"] != "text":
                    yield from open_block("text", "text", {"type": "text", "text": ""})
                yield _ev("content_block_delta", {"index": state["index"],
                                                  "delta": {"type": "text_delta", "text": p.text}})
            elif p.kind == "call":
                yield from open_block("tool_use", ("call", p.call), {"type": "tool_use", "id": p.id, "name": p.name,
                                                                     "input": {}})
            elif p.kind == "args":
                yield _ev("content_block_delta", {"index": state["index"],
                                                  "delta": {"type": "input_json_delta", "partial_json": p.text}})
    except ApiError as e:
        if not started:
            raise
        yield sse_event(error_body("anthropic", e), "error")
