"""KoboldCpp native API <-> engine: request parsing/validation and response shaping. Pure functions."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional

from gguf_loader.jobs import GenRequest, Job, Result

from . import fields as F, instruct, media as mediamod, sse
from .logprobs import chat_logprobs, completion_logprobs
from .errors import BadRequest
from .parsing import OutputParser, OutputSpec
from .run import JobRunner, check, finish_reason


@dataclass
class GenDefaults:
    """Server-side values a request falls back on."""
    max_length: int = 896  # --defaultgenamt
    max_context_length: int = 8192  # the server's context
    n_vocab: int = 0  # 0 = unknown: token ids are not range-checked
    instruct_tags: Optional[dict] = None  # server chat adapter tags for placeholders (None: Alpaca)
    media: Optional[object] = None  # adapters.media.MediaPolicy (None: no images/audio accepted)


def _instruct_tags(b: F.Body, defaults: GenDefaults) -> dict:
    try:
        return instruct.merge_adapter(defaults.instruct_tags or instruct.DEFAULT_ADAPTER, b.data.get("adapter"))
    except instruct.AdapterError as e:
        raise BadRequest(str(e), param="adapter")


def _logprobs(b: F.Body) -> tuple:
    """`logprobs`: true/false, or an OpenAI-style count of alternatives. -> (on, alternatives)"""
    lp = b.raw("logprobs")
    if lp is F.MISSING:
        return False, 5
    if isinstance(lp, (bool, str)):
        return F.boolean("logprobs", lp, lenient=True), 5
    n = F.number("logprobs", lp, integer=True, lenient=True)
    return n > 0, max(1, min(F.MAX_LOGPROBS, n))


def parse_generate(body, defaults: GenDefaults) -> GenRequest:
    """A native generate body (/api/v1/generate, /api/extra/generate/stream) -> GenRequest.
    Unknown fields are ignored; wrong types raise BadRequest; out-of-range values are clamped (KoboldCpp)."""
    b = F.Body(body, lenient=True)
    prompt = b.str("prompt")
    memory = b.str("memory")
    ctx = defaults.max_context_length
    max_context_length = b.int("max_context_length", ctx, 1, ctx)
    max_length = b.int("max_length", defaults.max_length, 1, max(1, max_context_length))
    stops = b.strs("stop_sequence", F.MAX_STOP_SEQUENCES)
    if b.bool("replace_instruct_placeholders", True):
        tags = _instruct_tags(b, defaults)
        prompt = instruct.replace_placeholders(prompt, tags)
        memory = instruct.replace_placeholders(memory, tags)
        stops = [s for s in (instruct.replace_placeholders(s, tags) for s in stops) if s]
    logprobs, top = _logprobs(b)
    policy = defaults.media or mediamod.MediaPolicy()
    media = mediamod.base64_list(b.data.get("images"), policy, "image", "images")
    media += mediamod.base64_list(b.data.get("audio"), policy, "audio", "audio")
    mediamod.check_count(len(media), policy, "images")
    # as in KoboldCpp, media go right after memory, before the story text
    prompt = mediamod.placeholders(media) + mediamod.strip_markers(prompt)
    return GenRequest(
        prompt=prompt,
        memory=mediamod.strip_markers(memory),
        media=media,
        max_length=max_length,
        max_context_length=max_context_length,
        sampling=F.sampling(b, defaults.n_vocab),
        stop=stops,
        banned_phrases=F.banned_phrases(b),
        trim_stop=b.bool("trim_stop", True),
        bypass_eos=b.bool("bypass_eos", False),
        render_special=b.bool("render_special", False),
        logprobs=logprobs,
        top_logprobs=top,
        genkey=F.genkey(b),
        **F.beam_search(b),
    )


MAX_BEST_OF = 16


def best_of(body, stream: bool = False) -> int:
    """`best_of` (our extension, OpenAI's meaning): candidates generated side by side, the one with the highest mean
    token log-probability returned. Clamped to 1-16 like the other native numbers; not with a stream (the best is
    known at the end) or with beam search (which returns its own best sequence)."""
    b = F.Body(body, lenient=True)
    k = b.int("best_of", 1, 1, MAX_BEST_OF)
    if k > 1 and stream:
        raise BadRequest("'best_of' cannot be streamed (the best candidate is known at the end); use "
                         "/api/v1/generate", param="best_of")
    if k > 1 and b.int("num_beams", 1) > 1:
        raise BadRequest("'best_of' and 'num_beams' cannot be combined: beam search returns its best sequence",
                         param="best_of")
    return k


def candidates(req: GenRequest, k: int) -> List[GenRequest]:
    """best_of: k copies of the request, each scoring its tokens, seeds following the request's (random if none)."""
    if k <= 1:
        return [req]
    return [replace(req, score=True, sampling=replace(req.sampling, seed=-1 if s is None else s))
            for s in F.choice_seeds(req.sampling.seed, k)]


def best(results: List[Result]) -> Result:
    return max(results, key=lambda r: r.mean_logprob)  # the first of equals


def parse_genkey(body) -> str:
    """genkey of an abort/check/last_logprobs body ('' when absent)."""
    if not isinstance(body, dict):
        return ""
    return F.genkey(F.Body(body))


def parse_tokenize(body) -> tuple:
    """-> (text, special). Body: {"prompt": str, "special": bool}. Errors carry KoboldCpp's "value": -1."""
    try:
        b = F.Body(body, lenient=True)
        text = b.str("prompt") if b.has("prompt") else b.str("content")
        return text, b.bool("special", True)
    except BadRequest as e:
        raise BadRequest(e.msg, extra={"value": -1}, param=e.param)


def parse_detokenize(body, n_vocab: int = 0) -> tuple:
    """-> (ids, special). Body: {"ids": [int], "special": bool}."""
    b = F.Body(body, lenient=True)
    return F.token_ids("ids", b.data.get("ids", []), n_vocab), b.bool("special", False)


def parse_json_to_grammar(body) -> str:
    """Body {"schema": {...}} or the schema itself -> GBNF."""
    body = F.require_object(body)
    schema = body.get("schema", body)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError):
            raise BadRequest("'schema' is not valid JSON", param="schema")
    if not isinstance(schema, dict):
        raise BadRequest("'schema' must be a JSON schema object", param="schema")
    return F.json_schema_to_grammar(schema, "schema")


# ---------------------------------------------------------------- responses
# finish_reason: an aborted job answers like a normal stop (as KoboldCpp does); a stop string is "stop", not
# KoboldCpp's "length"

def logprobs_object(lps) -> Optional[dict]:
    """Engine TokenLogprobs -> both chat- and completions-style shapes in one object (as KoboldCpp)."""
    if lps is None:
        return None
    return {"content": chat_logprobs(lps)["content"], **completion_logprobs(lps)}


def output_spec(body, defaults: GenDefaults) -> Optional[OutputSpec]:
    """`reasoning_format` on native bodies: absent or "none" leaves the text as generated (KoboldCpp's clients,
    Kobold Lite and SillyTavern, handle a <think> block themselves); "separate" moves a leading reasoning block to
    `reasoning_content`, "drop" removes it. The tags are the server adapter's (else <think></think>)."""
    if not isinstance(body, dict) or body.get("reasoning_format") in (None, "none"):
        return None
    rf = body["reasoning_format"]
    if rf not in ("separate", "drop"):
        raise BadRequest("'reasoning_format' must be \"none\", \"separate\" or \"drop\"", param="reasoning_format")
    tags = defaults.instruct_tags or {}
    start, end = (tags.get("think_start"), tags.get("think_end")) if tags.get("think_start") else ("<think>",
                                                                                                 "</think>")
    return OutputSpec(think_start=start, think_end=end, reasoning=rf,
                      think_open=bool(body.get("prompt", "")) and str(body.get("prompt")).rstrip().endswith(start))


def generate_response(result: Result, spec: Optional[OutputSpec] = None) -> dict:
    out = {
        "text": result.text,
        "finish_reason": finish_reason(result),
        "logprobs": logprobs_object(result.logprobs),
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "tool_calls": [],
    }
    if spec is not None:
        p = OutputParser(spec)
        p.feed(result.text)
        p.close()
        out["text"] = p.message.content
        out["reasoning_content"] = p.message.reasoning
    return {"results": [out]}


def stream_token(text: str) -> bytes:
    return sse.event({"token": text, "finish_reason": None}, "message")


def stream_end(result: Result) -> bytes:
    return sse.event({"token": "", "finish_reason": finish_reason(result)}, "message")


def stream(runner: JobRunner, job: Job, spec: Optional[OutputSpec] = None) -> Iterator[bytes]:
    """KoboldCpp's SSE stream. Nothing is yielded before the first event, so a job that fails at once still
    answers a JSON error instead of an empty stream. With a reasoning spec, reasoning pieces come as
    {"token": "", "reasoning_content": ...} events."""
    sent = False
    parser = OutputParser(spec) if spec is not None else None

    def pieces(d):
        if d.reasoning:
            yield sse.event({"token": "", "reasoning_content": d.reasoning, "finish_reason": None}, "message")
        if d.content:
            yield stream_token(d.content)

    for ev in runner.follow(job):
        if ev.kind == "text" and ev.text:
            sent = True
            if parser is None:
                yield stream_token(ev.text)
            else:
                yield from pieces(parser.feed(ev.text))
        elif ev.kind == "done":
            if not sent:
                check(ev.result)
            if parser is not None:
                yield from pieces(parser.close())
            yield stream_end(ev.result)


def check_response(text: str) -> dict:
    return {"results": [{"text": text}]}


def perf_response(perf: dict, quiet: bool) -> dict:
    """The engine's neutral counters in KoboldCpp's /api/extra/perf shape (features we lack are truthfully 0)."""
    g = perf.get
    pt, et = g("last_process_time", 0.0), g("last_eval_time", 0.0)
    n_in = g("last_prompt_tokens", 0) - g("last_cached_tokens", 0)
    n_out = g("last_completion_tokens", 0)
    return {
        "last_process": round(pt * 1000 / n_in, 3) if n_in else 0,
        "last_eval": round(et * 1000 / n_out, 3) if n_out else 0,
        "last_token_count": n_out,
        "last_input_count": g("last_prompt_tokens", 0),
        "last_process_time": round(pt, 4),
        "last_eval_time": round(et, 4),
        "last_process_speed": round(n_in / pt, 2) if pt > 0 else 0,
        "last_eval_speed": round(n_out / et, 2) if et > 0 else 0,
        "last_seed": g("last_seed", 0),
        "last_cached_tokens": g("last_cached_tokens", 0),
        "last_media_tokens": g("last_media_tokens", 0),  # image/audio embeddings among the input tokens
        "last_encode_time": round(g("last_encode_time", 0.0), 4),  # seconds the projector encoded media
        "last_draft_success": 0,
        "last_draft_failed": 0,
        "total_gens": g("total_gens", 0),
        "stop_reason": g("last_stop_reason", -1),
        "total_img_gens": 0,
        "total_tts_gens": 0,
        "total_transcribe_gens": 0,
        "queue": g("queue", 0),
        "idle": g("idle", 1),
        "hordeexitcounter": 0,
        "uptime": g("uptime", 0),
        "idletime": g("idletime", 0),
        "quiet": bool(quiet),
    }
