"""Fill-in-the-middle: llama-server's /infill (input_prefix, input_suffix, input_extra) and `suffix` on
/v1/completions. The prompt is built as token ids around the model's own FIM tokens (prefix-suffix-middle order);
a model without them is refused with a 400, never silently answered as a plain completion."""
from __future__ import annotations

from typing import Iterator, List, Optional

from gguf_loader.jobs import BudgetError, GenRequest, token_budget

from . import fields as F
from .chat import Context, new_id
from .errors import ApiError, BadRequest
from .run import JobRunner, check
from .sse import event as sse_event

MAX_EXTRA_CHUNKS = 256


def _bad(msg: str, param: Optional[str] = None) -> BadRequest:
    return BadRequest(msg, param=param)


def fim_ids(engine, param: str) -> dict:
    """The model's FIM tokens; a 400 naming `param` when it has no prefix/suffix/middle tokens."""
    ids = engine.fim_tokens()
    missing = [n for n in ("pre", "suf", "mid") if n not in ids]
    if missing:
        raise _bad(f"the loaded model has no fill-in-the-middle tokens (missing FIM {', '.join(missing)}); "
                   f"'{param}' needs a code model trained for infill (e.g. Qwen2.5-Coder, CodeLlama, StarCoder)",
                   param)
    return ids


def parse_extra(v) -> List[dict]:
    """`input_extra`: [{filename?, text}] (other files of the project, given as context)."""
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > MAX_EXTRA_CHUNKS:
        raise _bad(f"'input_extra' must be an array of at most {MAX_EXTRA_CHUNKS} {{filename, text}} objects",
                   "input_extra")
    out = []
    for i, c in enumerate(v):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str) \
                or not isinstance(c.get("filename", ""), str):
            raise _bad(f"input_extra[{i}] must be an object with a string 'text' (and optional string 'filename')",
                       "input_extra")
        out.append({"filename": F.clean_text(c.get("filename", "")), "text": F.clean_text(c["text"])})
    return out


def build_prompt(engine, ids: dict, prefix: str, suffix: str, extra: List[dict], start: str, n_ctx: int,
                 max_new: int) -> List[int]:
    """[BOS] [extra files] PRE prefix SUF suffix MID start, cut to fit `n_ctx - max_new`: the end of the prefix
    and the start of the suffix are kept (the suffix gets at most a quarter when both are long); extra files go
    first and are dropped before any of the prefix is."""
    tok = lambda s: engine.tokenize(s, add_bos=False, special=False) if s else []  # noqa: E731
    bos = engine.tokenize("", add_bos=True, special=False)[:1]
    extra_ids: List[int] = []
    if extra:
        if "rep" in ids and "sep" in ids:
            extra_ids = [ids["rep"]] + tok("project\n")
            for c in extra:
                extra_ids += [ids["sep"]] + tok(c["filename"] + "\n" + c["text"])
        else:
            for c in extra:
                extra_ids += tok((c["filename"] + "\n" if c["filename"] else "") + c["text"] + "\n")
    pre, suf, mid = tok(prefix), tok(suffix), tok(start)
    room = n_ctx - max_new - len(bos) - 3 - len(mid)
    if room <= 0:
        raise _bad(f"no room for the prompt: {max_new} tokens to generate leave none of the {n_ctx}-token context",
                   "n_predict")
    take_suf = min(len(suf), max(room // 4, room - len(pre)))
    take_pre = min(len(pre), room - take_suf)
    pre, suf = pre[len(pre) - take_pre:] if take_pre else [], suf[:take_suf]
    left = room - take_pre - take_suf
    extra_ids = extra_ids[len(extra_ids) - left:] if 0 < left < len(extra_ids) else (extra_ids if left > 0 else [])
    return bos + extra_ids + [ids["pre"]] + pre + [ids["suf"]] + suf + [ids["mid"]] + mid


def _stops(b: F.Body) -> List[str]:
    v = b.raw("stop")
    if v is F.MISSING:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or len(v) > F.MAX_STOP_SEQUENCES:
        raise _bad(f"'stop' must be a string or an array of at most {F.MAX_STOP_SEQUENCES} strings", "stop")
    return [F.clean_text(x) for x in v if x]


def parse_infill(body, ctx: Context) -> tuple:
    """-> (GenRequest, stream). llama-server's body: input_prefix, input_suffix, input_extra, prompt (the start of
    the middle), n_predict (or max_tokens), stop, the usual samplers, stream."""
    b = F.Body(body)
    eng = ctx.engine
    ids = fim_ids(eng, "input_prefix")
    for k in ("input_prefix", "input_suffix", "prompt"):
        if b.raw(k) is not F.MISSING and not isinstance(b.raw(k), str):
            raise _bad(f"'{k}' must be a string", k)
    extra = parse_extra(b.data.get("input_extra"))
    n = b.int("n_predict", None, aliases=("max_tokens",))
    # unset (or llama-server's -1): the server's default, but never more than half the context
    max_new = n if n is not None and n > 0 else min(ctx.default_max_length, eng.n_ctx // 2)
    try:
        token_budget(eng.n_ctx, None, max_new)
    except BudgetError as e:
        raise _bad(e.describe("n_predict"), "n_predict")
    sampling = F.sampling(b, eng.n_vocab, strict=True)
    prompt = build_prompt(eng, ids, b.str("input_prefix"), b.str("input_suffix"), extra, b.str("prompt"),
                          eng.n_ctx, max_new)
    req = GenRequest(prompt=prompt, max_length=max_new, max_context_length=eng.n_ctx, sampling=sampling,
                     stop=_stops(b), trim_stop=True)
    return req, b.bool("stream")


def suffix_prompt(engine, prompt, suffix: str, max_new: int, n_ctx: int) -> List[int]:
    """/v1/completions with `suffix`: the prompt is the prefix of a fill-in-the-middle request."""
    ids = fim_ids(engine, "suffix")
    if not isinstance(prompt, str):
        raise _bad("'suffix' needs a text prompt (not token ids)", "suffix")
    return build_prompt(engine, ids, prompt, F.clean_text(suffix), [], "", n_ctx, max_new)


# ---------------------------------------------------------------- replies (llama-server's /completion shape)

def _stop_type(r) -> str:
    return {2: "word", 0: "limit"}.get(r.stop_reason, "eos")


def _final(r, model: str, rid: str, content: str) -> dict:
    return {"id": rid, "index": 0, "content": content, "stop": True, "model": model,
            "tokens_predicted": r.completion_tokens, "tokens_evaluated": r.prompt_tokens,
            "tokens_cached": r.cached_tokens, "truncated": False, "stop_type": _stop_type(r),
            "stopping_word": r.stop_string or "",
            "timings": {"prompt_n": r.prompt_tokens - r.cached_tokens, "prompt_ms": r.process_time * 1000,
                        "predicted_n": r.completion_tokens, "predicted_ms": r.eval_time * 1000}}


def run_blocking(req: GenRequest, runner: JobRunner, model: str) -> dict:
    r = check(runner.wait(runner.submit(req)))
    return _final(r, model, new_id("infill-"), r.text)


def start_stream(req: GenRequest, runner: JobRunner, model: str) -> Iterator[bytes]:
    """SSE: {"content": piece, "stop": false} per piece, then the final object (content "") with stop true. The
    job is queued before anything is yielded (a full queue is a 503)."""
    return _stream(runner, runner.submit(req), model)


def _stream(runner: JobRunner, job, model: str) -> Iterator[bytes]:
    rid = new_id("infill-")
    sent = False
    try:
        for ev in runner.follow(job):
            if ev.kind == "done":
                yield sse_event(_final(check(ev.result), model, rid, ""))
            elif ev.text:
                sent = True
                yield sse_event({"id": rid, "index": 0, "content": ev.text, "stop": False})
    except ApiError as e:
        if not sent:
            raise
        yield sse_event({"error": {"code": e.status, "message": e.msg, "type": "server_error"}})
