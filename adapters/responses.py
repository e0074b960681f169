"""OpenAI Responses (/v1/responses, GET/DELETE /v1/responses/{id}): `input` (a string or items) and `instructions`
parsed once into normalised chat messages, run through the shared chat pipeline, the turn shaped as output items
(reasoning, message, function_call) or streamed as the response.* event sequence. Finished responses are kept in
memory (bounded, expiring) so `previous_response_id` can continue a conversation."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

from gguf_loader.jobs import BudgetError, GenRequest, token_budget

from . import chat, fields as F, media as mediamod, tools as toolmod, turn
from .chat import Context, Plan, new_id
from .errors import ApiError, BadRequest, NotFound
from .run import JobRunner
from .sse import event as sse_event

MAX_STORED = 512
STORE_TTL_S = 3600.0
MAX_STORED_MEDIA_BYTES = 256 * 1024 * 1024  # decoded images/audio kept for previous_response_id, all responses
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def _bad(msg: str, param: Optional[str] = None) -> BadRequest:
    return BadRequest(msg, param=param)


# ---------------------------------------------------------------- the store

@dataclass
class _Stored:
    response: dict
    messages: List[dict]  # the whole conversation including this response's output, for previous_response_id
    expires: float
    media: list = field(default_factory=list)  # the conversation's images/audio, in the order of their markers

    @property
    def media_bytes(self) -> int:
        return sum(len(m.data) for m in self.media)


class ResponseStore:
    """Finished responses by id: at most `limit`, each for `ttl` seconds, their images and audio at most
    `media_limit` bytes in all; the oldest go first."""

    def __init__(self, limit: int = MAX_STORED, ttl: float = STORE_TTL_S, media_limit: int = MAX_STORED_MEDIA_BYTES):
        self.limit, self.ttl, self.media_limit = limit, ttl, media_limit
        self._items: "OrderedDict[str, _Stored]" = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float):
        media = sum(v.media_bytes for v in self._items.values())
        while self._items:
            k, v = next(iter(self._items.items()))
            if v.expires > now and len(self._items) <= self.limit and media <= self.media_limit:
                break
            media -= v.media_bytes
            del self._items[k]

    def put(self, response: dict, messages: List[dict], media: Optional[list] = None):
        with self._lock:
            now = time.monotonic()
            self._items[response["id"]] = _Stored(response, messages, now + self.ttl, list(media or []))
            self._expire(now)

    def get(self, rid: str) -> Optional[_Stored]:
        with self._lock:
            self._expire(time.monotonic())
            return self._items.get(rid)

    def delete(self, rid: str) -> bool:
        with self._lock:
            return self._items.pop(rid, None) is not None


# ---------------------------------------------------------------- request

@dataclass
class Request:
    """What the reply echoes and what storing it needs, beside the plan."""
    plan: Plan
    messages: List[dict]
    echo: dict
    store: bool
    stops: List[str] = field(default_factory=list)
    media: list = field(default_factory=list)  # the conversation's images/audio (history first)


def _parts_text(content, where: str, media: Optional[list] = None, policy=None) -> str:
    """Content parts as text; input_image / input_audio parts become media markers and their items are appended
    to `media` (None: such parts are refused, as in a function_call_output)."""
    if isinstance(content, str):
        return F.clean_text(mediamod.strip_markers(content))
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or an array of content parts", "input")
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            if not isinstance(p.get("text"), str):
                raise _bad(f"{where}[{j}].text must be a string", "input")
            out.append(F.clean_text(mediamod.strip_markers(p["text"])))
        elif kind == "refusal":
            out.append(p.get("refusal") if isinstance(p.get("refusal"), str) else "")
        elif kind in ("input_image", "input_audio") and media is not None:
            media.append(mediamod.content_part(p, kind, policy, f"{where}[{j}]", "input"))
            mediamod.check_count(len(media), policy or mediamod.MediaPolicy(), "input")
            out.append(mediamod.placeholders(media[-1:]))
        elif kind in ("input_image", "input_file", "input_audio"):
            why = "files are not supported" if kind == "input_file" else "only message content may hold images and audio"
            raise _bad(f"{where}[{j}] is an {kind[6:]} part; {why}", "input")
        else:
            raise _bad(f"{where}[{j}]: unknown content part type {kind!r}", "input")
    return "".join(out)


def parse_input(inp, media: Optional[list] = None, policy=None) -> List[dict]:
    """`input` -> normalised messages. function_call items join the assistant turn before them; their outputs
    become tool messages; reasoning items are dropped (the prompt carries answers only). Images and audio in
    message content are appended to `media`."""
    if isinstance(inp, str):
        return [{"role": "user", "content": F.clean_text(mediamod.strip_markers(inp))}]
    if not isinstance(inp, list) or not inp:
        raise _bad("'input' must be a string or a non-empty array of items", "input")
    out: List[dict] = []
    for i, it in enumerate(inp):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise _bad(f"{where} must be an object", "input")
        kind = it.get("type", "message" if "role" in it else None)
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{where}.role must be user, system, developer or assistant, got {role!r}", "input")
            out.append({"role": role, "content": _parts_text(it.get("content", ""), f"{where}.content", media,
                                                             policy)})
        elif kind == "function_call":
            if not isinstance(it.get("name"), str) or not it["name"] or not isinstance(it.get("call_id"), str):
                raise _bad(f"{where}: a function_call needs string 'call_id' and 'name'", "input")
            args = it.get("arguments", "{}")
            if not isinstance(args, str):
                raise _bad(f"{where}.arguments must be a JSON string", "input")
            call = {"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": args}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(it.get("call_id"), str):
                raise _bad(f"{where}: a function_call_output needs a string 'call_id'", "input")
            out.append({"role": "tool", "content": _parts_text(it.get("output", ""), f"{where}.output"),
                        "tool_call_id": it["call_id"]})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad(f"{where}: item references are not supported; send the item itself or use "
                       f"previous_response_id", "input")
        else:
            raise _bad(f"{where}: unsupported item type {kind!r}", "input")
    return out


def parse_tools(body: dict) -> tuple:
    """Responses-shaped function tools and tool_choice -> the shared validation's (tools, choice)."""
    tools = body.get("tools")
    conv = None
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array of {type: 'function', name, parameters} objects", "tools")
        conv = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else None
                raise _bad(f"tools[{i}] is a {kind!r} tool; this server runs function tools only", "tools")
            if not isinstance(t.get("name"), str) or not t["name"]:
                raise _bad(f"tools[{i}].name must be a non-empty string", "tools")
            fn = {"name": t["name"], "parameters": t.get("parameters") or {"type": "object"}}
            if isinstance(t.get("description"), str):
                fn["description"] = t["description"]
            conv.append({"type": "function", "function": fn})
    tc = body.get("tool_choice")
    if isinstance(tc, dict) and tc.get("type") == "allowed_tools":
        tc = {"type": "allowed_tools", "allowed_tools": {
            "mode": tc.get("mode"), "tools": [{"type": "function", "function": {"name": x.get("name")}}
                                              if isinstance(x, dict) else x for x in tc.get("tools") or []]}}
    elif isinstance(tc, dict) and tc.get("type") == "function":
        tc = {"type": "function", "function": {"name": tc.get("name")}}
    elif isinstance(tc, dict):
        raise _bad("'tool_choice' must be 'none', 'auto', 'required', {type: 'function', name} or "
                   "{type: 'allowed_tools', mode, tools}", "tool_choice")
    return toolmod.validate_tools(conv, tc)


def _text_format(b: F.Body) -> tuple:
    """`text.format` -> (echo, GBNF or "")."""
    t = b.raw("text")
    if t is F.MISSING:
        return {"type": "text"}, ""
    fmt = t.get("format") if isinstance(t, dict) else None
    if fmt is None and isinstance(t, dict):
        return {"type": "text"}, ""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("'text.format.type' must be 'text', 'json_object' or 'json_schema'", "text")
    if fmt["type"] == "text":
        return fmt, ""
    if fmt["type"] == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF
        return fmt, JSON_GBNF
    if not isinstance(fmt.get("schema"), dict):
        raise _bad("'text.format' of type json_schema needs a 'schema' object", "text")
    return fmt, F.json_schema_to_grammar(fmt["schema"], "text")


def _reasoning(b: F.Body) -> Optional[str]:
    r = b.raw("reasoning")
    if r is F.MISSING:
        return None
    if not isinstance(r, dict):
        raise _bad("'reasoning' must be an object {effort, summary}", "reasoning")
    effort = r.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise _bad(f"'reasoning.effort' must be one of {', '.join(EFFORTS)}", "reasoning")
    return effort


def parse(body, ctx: Context, store: ResponseStore) -> Request:
    b = F.Body(body)
    if b.raw("conversation") is not F.MISSING:
        raise _bad("conversations are not supported here; continue with previous_response_id", "conversation")
    if b.bool("background"):
        raise _bad("background responses are not supported; use stream: true instead", "background")
    eng = ctx.engine
    adapter = ctx.adapter
    prev_id = b.raw("previous_response_id")
    history: List[dict] = []
    if prev_id is not F.MISSING:
        if not isinstance(prev_id, str):
            raise _bad("'previous_response_id' must be a string", "previous_response_id")
        prev = store.get(prev_id)
        if prev is None:
            raise _bad(f"Previous response with id '{prev_id[:100]}' not found (responses are kept for "
                       f"{int(STORE_TTL_S // 60)} minutes, at most {MAX_STORED})", "previous_response_id")
        history = [dict(m) for m in prev.messages]
    media = list(prev.media) if prev_id is not F.MISSING else []
    inp = parse_input(b.data.get("input"), media, getattr(ctx, "media", None))
    instructions = b.raw("instructions")
    if instructions is not F.MISSING and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions")
    conversation = history + inp
    messages = ([{"role": "system", "content": F.clean_text(instructions)}] if instructions not in (F.MISSING, "")
                else []) + conversation
    n = b.int("max_output_tokens", None, 1, None)
    max_new = n if n is not None else int(adapter.get("max_length") or ctx.default_max_length)
    if n is None:  # the server's default must fit; an explicit value is an upper bound (turn.plan_capped)
        try:
            token_budget(eng.n_ctx, None, max_new)
        except BudgetError:
            max_new = eng.n_ctx
    sampling = F.sampling(F.Body({k: b.data[k] for k in ("temperature", "top_p") if b.data.get(k) is not None}),
                          eng.n_vocab, strict=True,
                          defaults={k: adapter[k] for k in ("temperature", "top_k", "top_p", "min_p", "rep_pen")
                                    if k in adapter})
    fmt, grammar = _text_format(b)
    tools, choice = parse_tools(b.data)
    if grammar:
        if tools and choice != "none":
            raise _bad("'text.format' cannot be combined with tool calling; use tool_choice 'none'", "text")
        sampling.grammar = grammar
    effort = _reasoning(b)
    parallel = b.bool("parallel_tool_calls", True)
    meta = b.raw("metadata")
    if meta is not F.MISSING and not isinstance(meta, dict):
        raise _bad("'metadata' must be an object", "metadata")
    opts = _pipeline_options(parallel, effort)
    stream, rid = b.bool("stream"), new_id("resp_")

    def plan_with(max_length: int) -> Plan:
        template = GenRequest(prompt="", max_length=max_length, max_context_length=eng.n_ctx,
                              sampling=dataclasses.replace(sampling), trim_stop=True, media=media)
        plan = Plan("chat", [], ctx.model_name, rid, stream=stream)
        return chat.plan_chat(plan, ctx, messages, adapter, template, [None], tools, choice, jinja=ctx.use_jinja,
                              tool_temperature=sampling.temperature if b.raw("temperature") is not F.MISSING
                              else float(adapter.get("temperature", 0.5)), **opts)
    plan = turn.plan_capped(eng.n_ctx, eng, max_new, plan_with)
    echo = {"instructions": instructions if isinstance(instructions, str) else None, "max_output_tokens": n,
            "previous_response_id": prev_id if isinstance(prev_id, str) else None,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "tools": [{"type": "function", "name": t["function"]["name"],
                       "description": t["function"].get("description"), "parameters": t["function"]["parameters"],
                       "strict": False} for t in tools],
            "tool_choice": choice if choice in ("none", "auto", "required") else {"type": "function", "name": choice},
            "parallel_tool_calls": parallel, "text": {"format": fmt},
            "reasoning": {"effort": effort, "summary": None}, "metadata": meta if isinstance(meta, dict) else {},
            "store": b.bool("store", True), "truncation": "disabled", "user": None}
    return Request(plan, conversation, echo, echo["store"], media=media)


def _pipeline_options(parallel: bool, effort: Optional[str]) -> dict:
    """parallel_tool_calls and reasoning.effort as the chat pipeline's options; reasoning comes back as its own
    output item (kept separate)."""
    opts = {"parallel_tool_calls": parallel, "reasoning_format": "separate"}
    if effort is not None:
        opts["reasoning_effort"] = "high" if effort == "xhigh" else effort  # templates know none..high
    return opts


# ---------------------------------------------------------------- replies

def _usage(out: turn.Outcome) -> dict:
    r = out.result
    return {"input_tokens": r.prompt_tokens, "input_tokens_details": {"cached_tokens": r.cached_tokens},
            "output_tokens": r.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": min(out.reasoning_tokens, r.completion_tokens)},
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def _reasoning_item(rid: str, text: str, status: str = "completed") -> dict:
    return {"type": "reasoning", "id": rid, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if text else [], "status": status}


def _message_item(mid: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": mid, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status ==
            "completed" else []}


def _call_item(fid: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": fid, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _envelope(req: Request, status: str, output: list, usage: Optional[dict], incomplete: Optional[str] = None):
    return {"id": req.plan.id, "object": "response", "created_at": req.plan.created, "status": status,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "model": req.plan.model, "output": output, "usage": usage, **req.echo}


def _status(out: turn.Outcome) -> tuple:
    why, _ = turn.finish(out, [])
    return ("incomplete", "max_output_tokens") if why == "length" else ("completed", None)


def _conversation(req: Request, out: turn.Outcome) -> List[dict]:
    msg = {"role": "assistant", "content": out.content}
    if out.calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in out.calls]
    return req.messages + [msg]


def _finish(req: Request, out: turn.Outcome, output: list, store: ResponseStore) -> dict:
    status, why = _status(out)
    resp = _envelope(req, status, output, _usage(out), why)
    if req.store:
        store.put(json.loads(json.dumps(resp)), _conversation(req, out), req.media)
    return resp


def run_blocking(req: Request, runner: JobRunner, store: ResponseStore) -> dict:
    out = turn.run(req.plan, runner)
    output = []
    if out.reasoning:
        output.append(_reasoning_item(new_id("rs_"), out.reasoning))
    if out.content or not (out.calls or out.reasoning):  # as streamed: no empty message after reasoning or calls
        output.append(_message_item(new_id("msg_"), out.content))
    for c in out.calls:
        output.append(_call_item(new_id("fc_"), c.id, c.name, c.arguments))
    return _finish(req, out, output, store)


def start_stream(req: Request, runner: JobRunner, store: ResponseStore) -> Iterator[bytes]:
    """The response.* events; the job is queued before anything is yielded (a full queue is a 503)."""
    return _Streamer(req, store).run(turn.start(req.plan, runner))


class _Streamer:
    def __init__(self, req: Request, store: ResponseStore):
        self.req, self.store = req, store
        self.seq = 0
        self.output: List[dict] = []
        self.open: Optional[dict] = None  # the item being streamed
        self.key = None
        self.text = ""

    def ev(self, kind: str, **data) -> bytes:
        obj = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse_event(obj, kind)

    def close(self) -> Iterator[bytes]:
        it = self.open
        if it is None:
            return
        i = len(self.output)
        if it["type"] == "message":
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
            yield self.ev("response.output_text.done", item_id=it["id"], output_index=i, content_index=0,
                          text=self.text, logprobs=[])
            yield self.ev("response.content_part.done", item_id=it["id"], output_index=i, content_index=0, part=part)
            done = _message_item(it["id"], self.text)
        elif it["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": self.text}
            yield self.ev("response.reasoning_text.done", item_id=it["id"], output_index=i, content_index=0,
                          text=self.text)
            yield self.ev("response.content_part.done", item_id=it["id"], output_index=i, content_index=0, part=part)
            done = _reasoning_item(it["id"], self.text)
        else:
            yield self.ev("response.function_call_arguments.done", item_id=it["id"], output_index=i,
                          arguments=self.text, name=it["name"])
            done = _call_item(it["id"], it["call_id"], it["name"], self.text)
        yield self.ev("response.output_item.done", output_index=i, item=done)
        self.output.append(done)
        self.open = None

    def begin(self, key, item: dict) -> Iterator[bytes]:
        yield from self.close()
        self.open, self.key, self.text = item, key, ""
        i = len(self.output)
        yield self.ev("response.output_item.added", output_index=i, item=item)
        if item["type"] == "message":
            yield self.ev("response.content_part.added", item_id=item["id"], output_index=i, content_index=0,
                          part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        elif item["type"] == "reasoning":
            yield self.ev("response.content_part.added", item_id=item["id"], output_index=i, content_index=0,
                          part={"type": "reasoning_text", "text": ""})

    def run(self, pieces) -> Iterator[bytes]:
        req = self.req
        started = False
        try:
            yield self.ev("response.created", response=_envelope(req, "in_progress", [], None))
            started = True
            yield self.ev("response.in_progress", response=_envelope(req, "in_progress", [], None))
            for p in pieces:
                i = len(self.output)
                if isinstance(p, turn.Outcome):
                    if self.open is None and not self.output:  # an empty answer is still one message
                        yield from self.begin("text", _message_item(new_id("msg_"), "", "in_progress"))
                    yield from self.close()
                    resp = _finish(req, p, self.output, self.store)
                    name = "response.completed" if resp["status"] == "completed" else "response.incomplete"
                    yield self.ev(name, response=resp)
                    return
                if p.kind == "reasoning":
                    if self.key != "reasoning" or self.open is None:
                        yield from self.begin("reasoning", _reasoning_item(new_id("rs_"), "", "in_progress"))
                        i = len(self.output)
                    self.text += p.text
                    yield self.ev("response.reasoning_text.delta", item_id=self.open["id"], output_index=i,
                                  content_index=0, delta=p.text)
                elif p.kind == "text":
                    if self.key != "text" or self.open is None:
                        yield from self.begin("text", _message_item(new_id("msg_"), "", "in_progress"))
                        i = len(self.output)
                    self.text += p.text
                    yield self.ev("response.output_text.delta", item_id=self.open["id"], output_index=i,
                                  content_index=0, delta=p.text, logprobs=[])
                elif p.kind == "call":
                    yield from self.begin(("call", p.call), _call_item(new_id("fc_"), p.id, p.name, "",
                                                                       "in_progress"))
                elif p.kind == "args" and self.open is not None:
                    self.text += p.text
                    yield self.ev("response.function_call_arguments.delta", item_id=self.open["id"],
                                  output_index=i, delta=p.text)
        except ApiError as e:
            if not started:
                raise
            yield self.ev("error", code=e.type, message=e.msg, param=e.param)


def input_tokens(body, ctx: Context, store: ResponseStore) -> dict:
    """POST /v1/responses/input_tokens: the prompt the request would run, counted."""
    return {"object": "response.input_tokens",
            "input_tokens": turn.count_prompt(ctx.engine, parse(body, ctx, store).plan.requests[0])}


# ---------------------------------------------------------------- stored responses

def retrieve(store: ResponseStore, rid: str) -> dict:
    s = store.get(rid)
    if s is None:
        raise NotFound(f"No response with id '{rid[:100]}' found (responses are kept for {int(STORE_TTL_S // 60)} "
                       f"minutes, at most {MAX_STORED}, and only with store: true)")
    return s.response


def delete(store: ResponseStore, rid: str) -> dict:
    if not store.delete(rid):
        retrieve(store, rid)  # raises the 404
    return {"id": rid, "object": "response.deleted", "deleted": True}
