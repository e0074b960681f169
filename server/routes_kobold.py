"""KoboldCpp's native API: generate (blocking and SSE), check/abort by genkey, tokenizer, info routes."""
from __future__ import annotations

from adapters import kobold, sse
from adapters.errors import BadRequest
from adapters.run import check

from .http import log_line


def _log_prompt(h, body, req):
    if h.state.quiet or (isinstance(body, dict) and body.get("quiet") is True):
        return
    text = req.prompt if isinstance(req.prompt, str) else ""
    preview = text[-60:].replace("\n", "\\n")
    h.log_extra = f" prompt[{len(text)} chars]: ...{preview}" if len(text) > 60 else f" prompt: {preview}"


def _parse_gen(h):
    body = h.json()
    req = kobold.parse_generate(body, h.state.defaults)
    spec = kobold.output_spec(body, h.state.defaults)
    _log_prompt(h, body, req)
    return req, spec


def _pick_model(h, body):
    """Our extension: a native request may name an offered model (the web page's picker); else the current one."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        h.state.served(body["model"])


def generate(h):
    _pick_model(h, h.json())
    runner = h.runner()
    req, spec = _parse_gen(h)
    k = kobold.best_of(h.json())
    result = kobold.best(runner.wait_all(runner.submit_all(kobold.candidates(req, k))))
    if result.error:
        log_line(f"Generation error: {result.error}")
    h.send_json(200, kobold.generate_response(check(result), spec))


def generate_stream(h):
    _pick_model(h, h.json())
    runner = h.runner()
    req, spec = _parse_gen(h)
    kobold.best_of(h.json(), stream=True)
    # return_progress: `event: progress` lines ({"prompt_progress": ...}) while the prompt is processed
    h.pump(kobold.stream(runner, runner.submit(req), spec), progress=lambda p: sse.progress_event(p, name="progress"))


def _job_for_key(engine, genkey: str):
    """(job, is_running) of the live job with this genkey, else (None, False)."""
    jobs = engine.jobs()
    n_running = len(jobs) - engine.queue_length()
    for i, j in enumerate(jobs):
        if j.genkey == genkey:
            return j, i < n_running
    return None, False


def _visible_text(engine, genkey: str):
    """KoboldCpp's genkey rule for check/last_logprobs: with a key, only that job; without one, only when no
    queue exists and the job has no key (so one user never sees another's text). -> (job or None, finished)."""
    if genkey:
        job, running = _job_for_key(engine, genkey)
        if job is not None and running:
            return job, False
        if not job and engine.last_genkey == genkey:
            return None, True
        return None, None
    if engine.queue_length() > 0:
        return None, None
    running = engine.jobs()
    if len(running) == 1 and not running[0].genkey:
        return running[0], False
    if not running and not engine.last_genkey:
        return None, True
    return None, None


def _check(h, genkey):
    engine = h.state.engine
    job, finished = _visible_text(engine, genkey)
    if job is not None:
        text = job.text_so_far
    elif finished and engine.last_result is not None:
        text = engine.last_result.text
    else:
        text = ""
    h.send_json(200, kobold.check_response(text))


def abort(h):
    genkey = kobold.parse_genkey(h.json())
    eng = h.state.engine
    if genkey:
        job, running = _job_for_key(eng, genkey)
        if job is None:
            h.send_json(200, {"success": "false", "done": "false"})
            return
        job.abort()
        if not running:  # still queued: it is dropped when its turn comes
            h.send_json(200, {"success": "true", "done": "false"})
            return
        job.wait(2.0)
        h.send_json(200, {"success": "true", "done": "true"})
        return
    if eng.queue_length() > 0:
        h.send_json(200, {"success": "false", "done": "false"})
        return
    running = eng.jobs()
    targets = running if len(running) == 1 else [j for j in running if not j.genkey]
    for j in targets:
        j.abort()
    for j in targets:
        j.wait(2.0)
    h.send_json(200, {"success": "true" if targets else "false", "done": "true"})


def last_logprobs(h):
    genkey = kobold.parse_genkey(h.json()) if h.command == "POST" else ""
    engine = h.state.engine
    _, finished = _visible_text(engine, genkey)
    lp = None
    if finished and engine.last_result is not None:
        lp = kobold.logprobs_object(engine.last_result.logprobs)
    h.send_json(200, {"logprobs": lp})


def model(h):
    h.send_json(200, {"result": h.state.model_name if h.authorized() else "koboldcpp/protected-model"})


def version(h):
    s = h.state
    e = s.current_engine()  # polled by clients: never loads a model (an unloaded one reports no media)
    h.send_json(200, {
        "result": "KoboldCpp", "version": s.api_version, "protected": bool(s.password), "llm": True,
        "txt2img": False, "vision": bool(e is not None and e.vision),
        "audio": bool(e is not None and e.audio), "transcribe": False, "multiplayer": False,
        "websearch": False, "tts": False, "embeddings": True, "savedata": False, "admin": 0, "guidance": False,
        "jinja": s.uses_jinja(),  # polled by clients: never loads a model
    })


def perf(h):
    out = kobold.perf_response(h.state.engine.perf(), h.state.quiet)
    horde = h.server.extras.get("horde")
    if horde is not None:  # the AI Horde worker's jobs, tokens and kudos (--hordekey)
        out["horde"] = horde.stats()
    h.send_json(200, out)


def tokencount(h):
    try:
        body = h.json()
    except BadRequest as e:
        raise BadRequest(e.msg, extra={"value": -1})
    text, special = kobold.parse_tokenize(body)
    _pick_model(h, body)
    ids = h.state.engine.tokenize(text, add_bos=True, special=special)
    h.send_json(200, {"value": len(ids), "ids": ids})


def detokenize(h):
    ids, special = kobold.parse_detokenize(h.json(), h.state.engine.n_vocab)
    h.send_json(200, {"result": h.state.engine.detokenize(ids, special=special), "success": True})


def json_to_grammar(h):
    body = h.json()
    try:
        gbnf = kobold.parse_json_to_grammar(body)
    except BadRequest as e:
        if isinstance(body, dict):  # a schema the converter rejects: KoboldCpp answers success false
            h.send_json(200, {"result": "", "success": False, "error": e.msg})
            return
        raise
    h.send_json(200, {"result": gbnf, "success": True})


KOBOLD_UNITED_VERSION = "1.2.5"  # KoboldAI United API level; clients gate stop_sequence and EOS-unban on it


def register(t):
    t.add("POST", "/api/v1/generate", generate, auth=True)
    t.add("POST", "/api/extra/generate/stream", generate_stream, auth=True)
    t.add("GET", "/api/extra/generate/check", lambda h: _check(h, ""), auth=True)
    t.add("POST", "/api/extra/generate/check", lambda h: _check(h, kobold.parse_genkey(h.json())), auth=True)
    t.add("POST", "/api/extra/abort", abort, auth=True)
    t.add(["GET", "POST"], "/api/extra/last_logprobs", last_logprobs, auth=True)
    t.add("GET", "/api/v1/model", model)
    t.add("GET", "/api/v1/info/version", lambda h: h.send_json(200, {"result": KOBOLD_UNITED_VERSION}))
    t.add("GET", ["/api/v1/config/max_context_length", "/api/extra/true_max_context_length"],
          lambda h: h.send_json(200, {"value": h.state.defaults.max_context_length}))
    t.add("GET", "/api/v1/config/max_length", lambda h: h.send_json(200, {"value": h.state.defaults.max_length}))
    t.add("GET", "/api/v1/config/soft_prompt", lambda h: h.send_json(200, {"value": ""}))
    t.add("GET", "/api/v1/config/soft_prompts_list", lambda h: h.send_json(200, {"values": []}))
    t.add("GET", "/api/extra/version", version)
    t.add("GET", "/api/extra/perf", perf)
    t.add("POST", ["/api/extra/tokencount", "/api/extra/tokenize"], tokencount, auth=True)
    t.add("POST", "/api/extra/detokenize", detokenize, auth=True)
    t.add("POST", "/api/extra/json_to_grammar", json_to_grammar, auth=True)
    t.add("GET", "/api/extra/preloadstory",
          lambda h: h.send_json(200, h.state.preloadstory if h.state.preloadstory is not None else {}))
    t.add("GET", "/ping", lambda h: h.send_json(200, {"status": "healthy"}))
