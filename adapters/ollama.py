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


# ---------------------------------------------------------------- /api/show, /api/ps, /api/embed(dings)

_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _model_name(body, required: bool = True) -> str:
    b = F.Body(body)
    name = b.raw("model", "name")
    if name is F.MISSING:
        if required:
            raise _bad("'model' is required", "model")
        return ""
    if not isinstance(name, str):
        raise _bad("'model' must be a string", "model")
    return name


def _details(engine, facts: dict) -> dict:
    arch = str(engine.metadata.get("general.architecture", "gguf"))
    words = facts["desc"].split(" ", 2)  # llama.cpp's "<arch> <size> <quantization>"
    n = facts["n_params"]
    size = next((f"{n / d:.2f}{u}" for d, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")) if n >= d), str(n))
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch], "parameter_size": size,
            "quantization_level": words[2] if len(words) > 2 else ""}


def _meta_value(v: str):
    """llama.cpp hands metadata over as text: numbers become numbers again."""
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v, v)


def _go_template(adapter: dict) -> str:
    """The instruct adapter as Ollama's Go-template text (what /api/generate renders)."""
    t = lambda k: instruct.tag(adapter, k)  # noqa: E731
    return (t("chat_start") + "{{ if .System }}" + t("system_start") + "{{ .System }}" + t("system_end") + "{{ end }}"
            + t("user_start") + "{{ .Prompt }}" + t("user_end") + t("assistant_gen") + "{{ .Response }}"
            + t("assistant_end"))


def show(body, ctx: Context, model_path: str) -> dict:
    """Model info, template, parameters and capabilities of the loaded model (any model name answers)."""
    _model_name(body)
    eng = ctx.engine
    facts = eng.model_facts()
    info = {k: _meta_value(v) for k, v in eng.metadata.items()
            if k not in _ARRAY_KEYS and k != "tokenizer.chat_template"}
    info["general.parameter_count"] = facts["n_params"]
    adapter = ctx.adapter
    template = eng.chat_template if ctx.use_jinja and eng.chat_template else _go_template(adapter)
    params = [f"stop {json.dumps(s)}" for s in instruct.chat_stops(adapter)]
    params += [f"{name} {adapter[key]}" for key, name in (("temperature", "temperature"), ("top_k", "top_k"),
                                                         ("top_p", "top_p"), ("min_p", "min_p"),
                                                         ("rep_pen", "repeat_penalty")) if key in adapter]
    params.append(f"num_ctx {eng.n_ctx}")
    caps = ["completion", "tools"]
    tmpl = eng.chat_template or ""
    if adapter.get("think_start") or "<think>" in tmpl or "enable_thinking" in tmpl:
        caps.append("thinking")  # the chat pipeline returns it apart (message.thinking)
    if getattr(eng, "vision", False):  # a --mmproj projector: images in /api/chat and /api/generate
        caps.append("vision")
    if all(k in eng.fim_tokens() for k in ("pre", "suf", "mid")):
        caps.append("insert")
    try:
        mtime = datetime.fromtimestamp(os.stat(model_path).st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    except OSError:
        mtime = _now()
    modelfile = (f"# Modelfile generated by koboldcpp for {ctx.model_name}\nFROM {model_path}\n"
                 f"TEMPLATE \"\"\"{template}\"\"\"\n" + "".join(f"PARAMETER {p}\n" for p in params))
    return {"license": str(eng.metadata.get("general.license", "")), "modelfile": modelfile,
            "parameters": "\n".join(params), "template": template, "details": _details(eng, facts),
            "model_info": info, "capabilities": caps, "modified_at": mtime}


def ps(model_name: str, model_path: str, engine) -> dict:
    """The loaded model with its real memory use: weights plus the KV cache (size_vram: the offloaded share)."""
    facts = engine.model_facts()
    size = facts["weights_bytes"] + facts["kv_bytes"]
    share = facts["gpu_layers"] / facts["n_layer"] if facts["n_layer"] else 0.0
    entry = tags(model_name, model_path, engine.metadata)["models"][0]
    entry.update({"size": size, "size_vram": int(size * share), "details": _details(engine, facts),
                  "expires_at": "2318-08-16T00:00:00Z",  # never unloaded
                  "context_length": engine.n_ctx})
    return {"models": [entry]}


def _embed_ids(ctx: Context, texts: List[str], truncate: bool) -> List[List[int]]:
    eng = ctx.engine
    limit, _ = eng.embed_limits()
    out = []
    for k, x in enumerate(texts):
        t = eng.embed_tokenize(x) or eng.embed_tokenize(" ")
        if len(t) > limit:
            if not truncate:
                raise _bad(f"input {k} has {len(t)} tokens, more than the embedding context length {limit}", "input")
            t = t[:limit]
        out.append(t)
    return out


def embed(body, ctx: Context) -> dict:
    """/api/embed: `input` (a string or strings) -> L2-normalised vectors, one per input."""
    started = time.monotonic()
    name = _model_name(body, required=False)
    b = F.Body(body)
    inp = b.raw("input")
    if inp is F.MISSING:
        inp = []
    if isinstance(inp, str):
        texts = [inp]
    elif isinstance(inp, list) and all(isinstance(x, str) for x in inp) and len(inp) <= 2048:
        texts = list(inp)
    else:
        raise _bad("'input' must be a string or an array of at most 2048 strings", "input")
    dims = b.int("dimensions", None, 1, 1 << 20)
    ids = _embed_ids(ctx, [F.clean_text(x) for x in texts], b.bool("truncate", True))
    vecs = ctx.engine.embed(ids) if ids else []
    if dims:
        cut = []
        for v in vecs:
            v = list(v)[:dims]
            n = sum(x * x for x in v) ** 0.5 or 1.0
            cut.append([x / n for x in v])
        vecs = cut
    return {"model": name or ctx.engine.embed_model_name or ctx.model_name, "embeddings": [list(v) for v in vecs],
            "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": sum(len(t) for t in ids)}


def embeddings_legacy(body, ctx: Context) -> dict:
    """/api/embeddings (older API): `prompt` -> one vector; an empty prompt gives an empty vector, as Ollama."""
    _model_name(body, required=False)
    prompt = F.Body(body).raw("prompt")
    if prompt is F.MISSING or prompt == "":
        return {"embedding": []}
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string", "prompt")
    (vec,) = ctx.engine.embed(_embed_ids(ctx, [F.clean_text(prompt)], True))
    return {"embedding": list(vec)}


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
