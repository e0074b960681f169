"""Ollama dialect (/api/tags, /api/version, /api/generate, /api/chat): bodies are mapped onto the OpenAI chat and
completion parsers, replies are shaped as Ollama objects, streamed as NDJSON (one JSON object per line)."""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Iterator, Optional

from adapters import instruct, openai as oa
from adapters.errors import BadRequest

OLLAMA_VERSION = "0.7.0"

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
                        "digest": format(abs(hash(model_path)), "064x")[:64],
                        "details": {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                                    "parameter_size": "", "quantization_level": ""}}]}


def version() -> dict:
    return {"version": OLLAMA_VERSION}


def _common(body) -> dict:
    """Ollama options -> OpenAI/native fields."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    opts = body.get("options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise BadRequest("'options' must be an object")
    out = {}
    for k, v in opts.items():
        if k in _OPTION_MAP:
            out[_OPTION_MAP[k]] = v
    n = opts.get("num_predict")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise BadRequest("'options.num_predict' must be an integer")
        if n > 0:
            out["max_tokens"] = n
    stop = opts.get("stop", body.get("stop"))
    if stop is not None:
        out["stop"] = stop
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise BadRequest("'format' must be \"json\" or a JSON schema object")
    if body.get("adapter") is not None:
        out["adapter"] = body["adapter"]
    return out


def _images_check(obj, where):
    if obj.get("images"):
        raise BadRequest(f"{where} has images, but the loaded model has no vision projector; send text only")


def parse_generate(body, ctx: oa.Context) -> oa.Plan:
    common = _common(body)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string")
    system = body.get("system") or ""
    if not isinstance(system, str):
        raise BadRequest("'system' must be a string")
    _images_check(body, "the request")
    adapter = ctx.adapter
    if body.get("adapter") is not None:
        try:
            adapter = instruct.merge_adapter(ctx.adapter, body["adapter"])
        except instruct.AdapterError as e:
            raise BadRequest(str(e))
    context = body.get("context") or []
    if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise BadRequest("'context' must be an array of token ids")
    if body.get("raw"):
        text = (ctx.engine.detokenize(context) if context else "") + prompt
    else:
        t = instruct.tag
        text = (t(adapter, "chat_start") + (t(adapter, "system_start") + system + t(adapter, "system_end") if system else "")
                + (ctx.engine.detokenize(context) if context else "")
                + t(adapter, "user_start") + prompt + t(adapter, "user_end") + t(adapter, "assistant_gen"))
        common.setdefault("stop", [])
        if isinstance(common["stop"], str):
            common["stop"] = [common["stop"]]
        common["stop"] = list(common["stop"]) + instruct.chat_stops(adapter)
    cbody = dict(common, prompt=text, stream=bool(body.get("stream", True)))
    cbody.pop("adapter", None)
    return oa.parse_completion(cbody, ctx)


def parse_chat(body, ctx: oa.Context) -> oa.Plan:
    common = _common(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty array")
    converted = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        _images_check(m, f"messages[{i}]")
        mm = {k: v for k, v in m.items() if k in ("role", "content", "tool_call_id", "name")}
        if m.get("tool_calls"):
            mm["tool_calls"] = [{"id": f"call_{j}", "type": "function",
                                 "function": {"name": (c.get("function") or {}).get("name", ""),
                                              "arguments": json.dumps((c.get("function") or {}).get("arguments", {}))}}
                                for j, c in enumerate(m["tool_calls"]) if isinstance(c, dict)]
            mm.setdefault("content", None)
        converted.append(mm)
    cbody = dict(common, messages=converted, stream=bool(body.get("stream", True)))
    if body.get("tools"):
        cbody["tools"] = body["tools"]
    return oa.parse_chat(cbody, ctx)


def _final(plan: oa.Plan, r, extra: dict, started: float, ctx: oa.Context) -> dict:
    total_ns = int((time.monotonic() - started) * 1e9)
    d = {"model": plan.model, "created_at": _now(), **extra, "done": True,
         "done_reason": r.finish_reason if r.finish_reason in ("stop", "length") else "stop",
         "total_duration": total_ns, "load_duration": 0, "prompt_eval_count": r.prompt_tokens,
         "prompt_eval_duration": int(r.process_time * 1e9), "eval_count": r.completion_tokens,
         "eval_duration": int(r.eval_time * 1e9)}
    if plan.kind == "completion":
        prompt = plan.requests[0].prompt
        try:
            ids = prompt if isinstance(prompt, list) else ctx.engine.tokenize(prompt, add_bos=False)
            d["context"] = list(ids) + ctx.engine.tokenize(r.text, add_bos=False, special=False)
        except Exception:
            d["context"] = []
    return d


def run_blocking(plan: oa.Plan, ctx: oa.Context, is_gone=lambda: False) -> dict:
    started = time.monotonic()
    reply = oa.run_blocking(plan, ctx.engine, is_gone)
    c, r = reply["choices"][0], plan.results[0]
    if plan.kind == "completion":
        return _final(plan, r, {"response": c["text"]}, started, ctx)
    msg = {"role": "assistant", "content": c["message"]["content"] or ""}
    if c["message"].get("tool_calls"):
        msg["tool_calls"] = [{"function": {"name": t["function"]["name"],
                                           "arguments": json.loads(t["function"]["arguments"])}}
                             for t in c["message"]["tool_calls"]]
    return _final(plan, r, {"message": msg}, started, ctx)


def _line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def start_stream(plan: oa.Plan, ctx: oa.Context) -> Iterator[Optional[bytes]]:
    """NDJSON: one object per text piece (done false), then the final object. Tool requests are generated whole."""
    if plan.tool_mode or plan.decide:
        reply = run_blocking(plan, ctx)
        return iter([_line(reply)])
    job = oa._submit(ctx.engine, plan.requests[0])
    return _stream(plan, ctx, job)


def _stream(plan, ctx, job):
    started = time.monotonic()
    chat = plan.kind == "chat"
    try:
        for ev in job.stream(poll=0.5):
            if ev.kind == "idle":
                yield None
            elif ev.kind == "text" and ev.text:
                piece = {"message": {"role": "assistant", "content": ev.text}} if chat else {"response": ev.text}
                yield _line({"model": plan.model, "created_at": _now(), **piece, "done": False})
            elif ev.kind == "done":
                r = ev.result
                if r.error:
                    yield _line({"error": f"generation failed: {r.error}"})
                    return
                extra = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
                yield _line(_final(plan, r, extra, started, ctx))
    finally:
        if not job.finished.is_set():
            job.abort()
