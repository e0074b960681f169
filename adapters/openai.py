"""OpenAI dialect: /v1 bodies parsed once into typed engine requests, and engine results shaped as OpenAI replies
and SSE chunks.

OpenAI's own fields are checked strictly (a wrong type or range is a 400 naming the field in `param`). KoboldCpp's
native sampler fields are accepted on these bodies too (SillyTavern sends them), read from the declared list in
adapters/fields.py with KoboldCpp's lenient rules. Message content is never expanded as a Kobold placeholder.
"""
from __future__ import annotations

import base64
import copy
import json
import struct
import time
from typing import Iterator, List, Optional

from gguf_loader.jobs import BudgetError, GenRequest, token_budget

from . import chat, fields as F, fim, instruct, media as mediamod, tools as toolmod
from .chat import MAX_N, Context, Plan, new_id  # noqa: F401 (Context is part of this module's interface)
from .errors import ApiError, BadRequest, error_body
from .logprobs import chat_logprobs, completion_logprobs
from .run import JobRunner, finish_reason
from .sse import event as sse_event

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SYSTEM_FINGERPRINT = "fp_koboldcpp"


def _bad(msg, param=None):
    return BadRequest(msg, param=param)


# ---------------------------------------------------------------------------------------------------------
# request fields

def _stops(b: F.Body, adapter: dict) -> List[str]:
    """`stop` (a string or up to 256 strings) plus native `stop_sequence`; Kobold placeholders become the adapter's
    tags, as in KoboldCpp."""
    v = b.raw("stop")
    if v is F.MISSING:
        stops = []
    elif isinstance(v, str):
        stops = [v]
    elif isinstance(v, list) and all(isinstance(x, str) for x in v):
        if len(v) > F.MAX_STOP_SEQUENCES:
            raise _bad(f"'stop' may hold at most {F.MAX_STOP_SEQUENCES} strings", "stop")
        stops = list(v)
    else:
        raise _bad("'stop' must be a string or an array of strings", "stop")
    stops = [F.clean_text(x) for x in stops] + b.strs("stop_sequence", F.MAX_STOP_SEQUENCES)
    return [s for s in (instruct.replace_placeholders(x, adapter) for x in stops) if s]


def _max_tokens(b: F.Body, ctx: Context, adapter: dict) -> tuple:
    """(max_context_length or None, tokens to generate), decided by the one budget rule."""
    n_ctx = ctx.engine.n_ctx
    mcl = b.int("max_context_length", None, 1, n_ctx, lenient=True)
    for key in ("max_completion_tokens", "max_tokens"):
        v = b.int(key)
        if v is not None:
            break
    else:
        key = "max_length"
        v = b.int("max_length", None, lenient=True)
        if v is None:
            v = int(adapter.get("max_length") or ctx.default_max_length)
    try:
        token_budget(n_ctx, mcl, v)
    except BudgetError as e:
        raise _bad(e.describe(key), key)
    return mcl, v


def _response_grammar(body: dict) -> Optional[str]:
    rf = body.get("response_format")
    schema = None
    if rf is None:
        js = body.get("json_schema")
        if not isinstance(js, dict):  # legacy top-level field
            return None
        schema = js.get("schema", js)
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
    return F.json_schema_to_grammar(schema, "response_format")


def _template(b: F.Body, ctx: Context, adapter: dict, lp: Optional[int]) -> GenRequest:
    """Everything a choice shares: sampling (OpenAI fields strict, native ones lenient), budget, stops, extras."""
    mcl, max_len = _max_tokens(b, ctx, adapter)
    b.int("seed")  # checked strictly here; per-choice seeds are set from it
    sampling = F.sampling(b, ctx.engine.n_vocab, strict=True,
                          defaults={k: adapter[k] for k in ("temperature", "top_k", "top_p", "min_p", "rep_pen")
                                    if k in adapter})
    grammar = _response_grammar(b.data)
    if grammar:
        sampling.grammar = grammar
    return GenRequest(prompt="", max_length=max_len, max_context_length=mcl or ctx.engine.n_ctx, sampling=sampling,
                      stop=_stops(b, adapter), banned_phrases=F.banned_phrases(b),
                      trim_stop=True, bypass_eos=b.bool("bypass_eos", lenient=True),
                      render_special=b.bool("render_special", lenient=True), logprobs=lp is not None,
                      top_logprobs=lp or 0, genkey=F.genkey(b),
                      lora=F.lora(b, len(getattr(ctx.engine, "loras", ()))), **_beams(b))


def _beams(b: F.Body) -> dict:
    """Beam search (`num_beams` > 1): one deterministic sequence per prompt, known at the end."""
    kw = F.beam_search(b)
    if kw["beams"]:
        if b.bool("stream", lenient=True):
            raise _bad("beam search ('num_beams' > 1) cannot be streamed: the best beam is known at the end; "
                       "send stream: false", "num_beams")
        if b.int("n", 1) > 1 or (b.int("best_of") or 1) > 1:
            raise _bad("beam search ('num_beams' > 1) returns one sequence per prompt: leave 'n' and 'best_of' "
                       "at 1", "num_beams")
    return kw


def _include_usage(b: F.Body) -> bool:
    so = b.raw("stream_options")
    if so is F.MISSING:
        return False
    if not isinstance(so, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    return F.Body(so).bool("include_usage")


def _content_text(content, i: int, media=None, policy=None) -> str:
    """Message content as text; image/audio parts become media markers and their items are appended to
    `media` (None: media parts are refused)."""
    if content is None or isinstance(content, str):
        return F.clean_text(mediamod.strip_markers(content or ""))
    if not isinstance(content, list):
        raise _bad(f"messages[{i}].content must be a string or an array of content parts", "messages")
    out = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            out.append(mediamod.strip_markers(part))
            continue
        if not isinstance(part, dict):
            raise _bad(f"messages[{i}].content parts must be objects", "messages")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            if not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}]: a text part needs a string 'text'", "messages")
            out.append(mediamod.strip_markers(part["text"]))
        elif kind == "refusal":
            out.append(part.get("refusal") if isinstance(part.get("refusal"), str) else "")
        elif kind in ("image_url", "input_image", "input_audio", "image", "audio", "file"):
            if media is None:
                raise _bad(f"messages[{i}] holds a{'n image' if 'image' in kind else ' media'} part, but the loaded "
                           f"model has no vision/audio projector; send text only", "messages")
            media.append(mediamod.content_part(part, kind, policy, f"messages[{i}].content[{j}]", "messages"))
            mediamod.check_count(len(media), policy or mediamod.MediaPolicy(), "messages")
            out.append(mediamod.placeholders(media[-1:]))
        else:
            raise _bad(f"messages[{i}]: unknown content part type {kind!r}", "messages")
    return F.clean_text("".join(out))


def parse_messages(messages, media=None, policy=None) -> List[dict]:
    """OpenAI messages -> normalised {role, content, tool_calls?, tool_call_id?, name?}. A `message` key is taken
    as the content (the Chinese-LLaMA-Alpaca server's clients send it). Image/audio parts are appended to `media`
    and leave a media marker in the content."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        content = m.get("content", m.get("message"))
        if content is None and role not in ("assistant", "function"):
            raise _bad(f"messages[{i}] has no 'content'" if "content" not in m else
                       f"messages[{i}].content must not be null", "messages")
        msg = {"role": "tool" if role == "function" else role, "content": _content_text(content, i, media, policy)}
        if m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list):
                raise _bad(f"messages[{i}].tool_calls must be an array", "messages")
            msg["tool_calls"] = m["tool_calls"]
        if role in ("tool", "function"):
            tid = m.get("tool_call_id") or m.get("name") or ""
            msg["tool_call_id"] = tid if isinstance(tid, str) else ""
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------------------------
# requests -> plan

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


def reasoning_options(b: F.Body) -> dict:
    """The thinking and template fields chat dialects share: reasoning_effort, chat_template_kwargs (llama-server's
    way to reach the model's template, e.g. {"enable_thinking": false}) and reasoning_format."""
    effort = b.raw("reasoning_effort")
    if effort is F.MISSING or effort is None:
        effort = None
    elif effort not in REASONING_EFFORTS:
        raise _bad(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
    kw = b.raw("chat_template_kwargs")
    if kw is F.MISSING or kw is None:
        kw = None
    elif not isinstance(kw, dict):
        raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    rf = b.raw("reasoning_format")
    if rf is F.MISSING or rf is None:
        rf = None
    elif not isinstance(rf, str) or rf not in chat.REASONING_FORMATS:
        raise _bad("'reasoning_format' must be one of " + ", ".join(chat.REASONING_FORMATS), "reasoning_format")
    return {"reasoning_effort": effort, "template_kwargs": kw, "reasoning_format": rf}


def _best_of(b: F.Body, n: int, prompts: int, stream: bool) -> int:
    """Candidates per prompt: `best_of` (at least n; the n best by mean token logprob are returned) or n."""
    k = b.int("best_of", None, 1, MAX_N)
    if k is None:
        return n
    if k < n:
        raise _bad(f"'best_of' ({k}) must be at least 'n' ({n})", "best_of")
    if prompts * k > MAX_N:
        raise _bad(f"at most {MAX_N} candidates per request (prompts x best_of)", "best_of")
    if stream and k > n:
        raise _bad("'best_of' greater than 'n' cannot be streamed (the best are known at the end); "
                   "send stream: false", "best_of")
    return k


def parse_chat(body, ctx: Context) -> Plan:
    b = F.Body(body)
    n = b.int("n", 1, 1, MAX_N)
    best_of = _best_of(b, n, 1, b.bool("stream"))
    media: list = []
    messages = parse_messages(b.data.get("messages"), media, getattr(ctx, "media", None))
    adapter = chat.request_adapter(ctx, b.data.get("adapter"))
    stream = b.bool("stream")
    logprobs = b.bool("logprobs")
    top_lp = b.int("top_logprobs", 0, 0, F.MAX_LOGPROBS)
    template = _template(b, ctx, adapter, top_lp if logprobs else None)
    template.media = media
    tools, choice = toolmod.validate_tools(b.data.get("tools"), b.data.get("tool_choice"))
    if choice != "none" and tools and b.data.get("response_format") is not None and template.sampling.grammar:
        raise _bad("'response_format' cannot be combined with tool calling; use tool_choice 'none'", "response_format")
    plan = Plan("chat", [], ctx.model_name, new_id("chatcmpl-"), stream=stream, include_usage=_include_usage(b),
                logprobs=logprobs)
    explicit_temp = b.raw("temperature")
    plan.n, plan.best_of = n, best_of
    if best_of > n:
        template.score = True
    return chat.plan_chat(plan, ctx, messages, adapter, template, F.choice_seeds(b.int("seed"), best_of), tools, choice,
                          jinja=ctx.use_jinja and b.data.get("adapter") is None,
                          continue_assistant=b.bool("continue_assistant_turn"),
                          tool_temperature=template.sampling.temperature if explicit_temp is not F.MISSING
                          else float(adapter.get("temperature", 0.5)),
                          parallel_tool_calls=b.bool("parallel_tool_calls", True), **reasoning_options(b))


def _prompts(body: dict, n_vocab: int) -> list:
    """`prompt`: a string, token ids, or an array of either (an empty array is one empty prompt)."""
    p = body.get("prompt")
    if p is None or p == []:
        return [""]
    if isinstance(p, str):
        return [F.clean_text(p)]
    if isinstance(p, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return [F.token_ids("prompt", p, n_vocab)]
    if isinstance(p, list) and all(isinstance(x, str) for x in p):
        return [F.clean_text(x) for x in p]
    if isinstance(p, list) and all(isinstance(x, list) and x for x in p):
        return [F.token_ids("prompt", x, n_vocab) for x in p]
    raise _bad("'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of "
               "token ids", "prompt")


def parse_completion(body, ctx: Context) -> Plan:
    b = F.Body(body)
    n = b.int("n", 1, 1, MAX_N)
    prompts = _prompts(b.data, ctx.engine.n_vocab)
    if len(prompts) * n > MAX_N:
        raise _bad(f"at most {MAX_N} choices per request (prompts x n)", "n")
    best_of = _best_of(b, n, len(prompts), b.bool("stream"))
    suffix = b.raw("suffix")
    if suffix is not F.MISSING and not isinstance(suffix, str):
        raise _bad("'suffix' must be a string", "suffix")
    if suffix is not F.MISSING and suffix != "":
        fim.fim_ids(ctx.engine, "suffix")  # a model without FIM tokens is a 400 before anything else
    lp = b.raw("logprobs")
    if lp is True:
        lp = 5
    elif lp is False or lp is F.MISSING:
        lp = None
    else:
        lp = b.int("logprobs", None, 0, F.MAX_LOGPROBS)
    echo = b.bool("echo")
    adapter = chat.request_adapter(ctx, b.data.get("adapter"))
    template = _template(b, ctx, adapter, lp)
    memory = instruct.replace_placeholders(b.str("memory"), adapter)
    plan = Plan("completion", [], ctx.model_name, new_id("cmpl-"), stream=b.bool("stream"),
                include_usage=_include_usage(b), logprobs=lp is not None)
    plan.n, plan.best_of = n, best_of
    template.score = best_of > n
    seeds = F.choice_seeds(b.int("seed"), best_of)
    for p in prompts:
        # a native-style text prompt may carry Kobold Lite's placeholders (this is not chat message content)
        text = instruct.replace_placeholders(p, adapter) if isinstance(p, str) else p
        if suffix not in (F.MISSING, ""):  # fill-in-the-middle: the prompt is the prefix
            ids = fim.suffix_prompt(ctx.engine, text, suffix, template.max_length, template.max_context_length)
            plan.requests += chat.for_choices(template, instruct.ChatPrompt(prompt=ids), seeds)
        else:
            plan.requests += chat.for_choices(template, instruct.ChatPrompt(prompt=text, memory=memory), seeds)
        if echo:
            plan.echo += [text if isinstance(text, str) else ctx.engine.detokenize(text)] * n
    return plan


# ---------------------------------------------------------------------------------------------------------
# shapes

def usage(done) -> dict:
    """Usage of a plan's finished choices ("done" events)."""
    if not done:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
    pt = done[0].result.prompt_tokens
    ct = sum(d.result.completion_tokens for d in done)
    return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
            "prompt_tokens_details": {"cached_tokens": done[0].result.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": sum(d.message.reasoning_tokens for d in done)}}


def _envelope(plan: Plan, chunk: bool) -> dict:
    if plan.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {"id": plan.id, "object": obj, "created": plan.created, "model": plan.model,
            "system_fingerprint": SYSTEM_FINGERPRINT}


def _chat_finish(ev) -> str:
    return "tool_calls" if ev.message.tool_calls else finish_reason(ev.result)


def chat_message(m) -> dict:
    """An assistant turn (adapters.parsing.Message) as OpenAI's message object."""
    msg = {"role": "assistant", "content": m.content, "refusal": None}
    if m.reasoning:
        msg["reasoning_content"] = m.reasoning
    if m.tool_calls:
        msg["content"] = m.content or None
        msg["tool_calls"] = [c.openai() for c in m.tool_calls]
    return msg


def reply(plan: Plan, done) -> dict:
    """The blocking reply for a plan's finished choices."""
    choices = []
    for i, ev in enumerate(done):
        r = ev.result
        if plan.kind == "chat":
            choices.append({"index": i, "message": chat_message(ev.message),
                            "logprobs": chat_logprobs(r.logprobs) if plan.logprobs else None,
                            "finish_reason": _chat_finish(ev)})
        else:
            pre = plan.echo[i] if plan.echo else ""
            choices.append({"index": i, "text": pre + r.text, "finish_reason": finish_reason(r),
                            "logprobs": completion_logprobs(r.logprobs, len(pre)) if plan.logprobs else None})
    return {**_envelope(plan, False), "choices": choices, "usage": usage(done)}


def run_blocking(plan: Plan, runner: JobRunner) -> dict:
    return reply(plan, chat.run(plan, runner))


def _chunk(plan: Plan, choices, usage_=None, with_usage_key=False) -> bytes:
    obj = {**_envelope(plan, True), "choices": choices}
    if usage_ is not None or with_usage_key:
        obj["usage"] = usage_
    return sse_event(obj)


def start_stream(plan: Plan, runner: JobRunner) -> Iterator[bytes]:
    """SSE chunks. The first job is submitted before anything is yielded (a full queue is a 503, not a stream)."""
    return _stream(plan, chat.start(plan, runner))


def _stream(plan: Plan, events) -> Iterator[bytes]:
    """A job that fails after the stream started ends it with an OpenAI error event (the SDKs raise on it)."""
    sent = False
    try:
        for c in _chunks(plan, events):
            sent = True
            yield c
    except ApiError as e:
        if not sent:
            raise
        yield sse_event(error_body("openai", e))


def chat_delta(d) -> dict:
    """A parsed piece (adapters.parsing.Delta) as OpenAI's delta: content, reasoning_content, tool_calls pieces
    (id, type and name on a call's first piece; arguments text as it is generated)."""
    out = {}
    if d.content:
        out["content"] = d.content
    if d.reasoning:
        out["reasoning_content"] = d.reasoning
    if d.calls:
        calls = []
        for c in d.calls:
            if c.id is not None:
                calls.append({"index": c.index, "id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}})
            elif calls and calls[-1]["index"] == c.index:  # pieces of one call within one delta are joined
                calls[-1]["function"]["arguments"] += c.arguments
            else:
                calls.append({"index": c.index, "function": {"arguments": c.arguments}})
        out["tool_calls"] = calls
    return out


def _chunks(plan: Plan, events) -> Iterator[bytes]:
    chat_kind = plan.kind == "chat"
    iu = plan.include_usage
    done = []
    offset = 0
    for ev in events:
        i = ev.index
        if ev.kind == "start":
            offset = len(plan.echo[i]) if plan.echo else 0
            if chat_kind:
                yield _chunk(plan, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}], with_usage_key=iu)
            elif plan.echo:
                yield _chunk(plan, [{"index": i, "text": plan.echo[i], "logprobs": None, "finish_reason": None}],
                             with_usage_key=iu)
        elif ev.kind == "text":
            lp = None
            if plan.logprobs and ev.logprobs:
                lp = chat_logprobs(ev.logprobs) if chat_kind else completion_logprobs(ev.logprobs, offset)
            offset += len(ev.text)
            if chat_kind:
                delta = chat_delta(ev.delta)
                if not delta and lp is None:
                    continue  # held back by the parser (a tag that may be starting)
                c = {"index": i, "delta": delta}
            else:
                c = {"index": i, "text": ev.text}
            yield _chunk(plan, [{**c, "logprobs": lp, "finish_reason": None}], with_usage_key=iu)
        elif ev.kind == "done":
            done.append(ev)
            last = {"index": i, "delta": {}} if chat_kind else {"index": i, "text": ""}
            fr = _chat_finish(ev) if chat_kind else finish_reason(ev.result)
            yield _chunk(plan, [{**last, "logprobs": None, "finish_reason": fr}], with_usage_key=iu)
    if iu:
        yield _chunk(plan, [], usage_=usage(done))
    yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------
# models, embeddings, edits, moderations, images

def models_list(model_name: str, media=None) -> dict:
    return {"object": "list", "data": [model_card(model_name, media)]}


def model_card(model_name: str, media=None) -> dict:
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "koboldcpp",
            "permission": [], "root": "koboldcpp"}
    caps = [k for k, on in mediamod.describe(media).items() if on]
    if caps:  # only with a projector, so text-only servers keep OpenAI's exact card
        card["capabilities"] = ["completion"] + caps
    return card


def engines_list(model_name: str) -> dict:
    return {"object": "list", "data": [engine_card(model_name)]}


def engine_card(model_name: str) -> dict:
    return {"id": model_name, "object": "engine", "owner": "koboldcpp", "ready": True}


def parse_embeddings(body, n_vocab: int):
    """-> (inputs: list of str or token-id lists, encoding_format, dimensions, truncate)."""
    b = F.Body(body)
    inp = b.data.get("input")
    if isinstance(inp, str):
        inputs = [F.clean_text(inp)]
    elif isinstance(inp, list) and inp:
        if all(isinstance(x, str) for x in inp):
            inputs = [F.clean_text(x) for x in inp]
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in inp):
            inputs = [F.token_ids("input", inp, n_vocab)]
        elif all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
                 for x in inp):
            inputs = [F.token_ids("input", x, n_vocab) for x in inp]
        else:
            raise _bad("'input' must be a string, an array of strings, an array of token ids or an array of arrays "
                       "of token ids", "input")
    else:
        raise _bad("'input' must be a non-empty string or array", "input")
    if len(inputs) > 2048:
        raise _bad("at most 2048 inputs per request", "input")
    fmt = b.raw("encoding_format")
    if fmt is F.MISSING:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    return inputs, fmt, b.int("dimensions", None, 1, 1 << 20), b.bool("truncate", True)


def run_embeddings(body, ctx: Context) -> dict:
    eng = ctx.engine
    limit, n_vocab = eng.embed_limits()
    inputs, fmt, dims, truncate = parse_embeddings(body, n_vocab)
    ids = []
    for k, x in enumerate(inputs):
        t = eng.embed_tokenize(x) if isinstance(x, str) else x
        if not t:
            raise _bad(f"input {k} is empty", "input")
        if len(t) > limit:
            if not truncate:
                raise _bad(f"input {k} has {len(t)} tokens; the embedding context holds {limit}", "input")
            t = t[:limit]
        ids.append(t)
    vecs = eng.embed(ids)
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
    return {"object": "list", "data": data, "model": eng.embed_model_name or ctx.model_name,
            "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}


def parse_edit(body, ctx: Context) -> Plan:
    """Legacy /v1/edits: instruction + input become one user turn through the adapter."""
    body = F.require_object(body)
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
    body = F.require_object(body)
    """No classifier is loaded: every input is reported as not flagged (documented in the README and OpenAPI)."""
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
    b = F.Body(body)
    prompt = b.str("prompt")
    if not prompt:
        raise _bad("'prompt' must be a non-empty string", "prompt")
    n = b.int("n", 1, 1, 10)
    size = b.str("size") or "512x512"
    try:
        w, h = (int(x) for x in size.lower().split("x"))
        assert 64 <= w <= 2048 and 64 <= h <= 2048
    except (ValueError, AssertionError):
        raise _bad("'size' must look like '512x512' (64-2048 each side)", "size")
    if b.raw("response_format") not in ("b64_json", F.MISSING):
        raise _bad("only response_format 'b64_json' is supported (no image hosting here)", "response_format")
    payload = {"prompt": prompt, "negative_prompt": b.str("negative_prompt"), "width": w, "height": h,
               "batch_size": n, "steps": b.int("steps", 20, 1, 500), "cfg_scale": b.num("cfg_scale", 7.0, 0, 100),
               "seed": b.int("seed", -1)}
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
