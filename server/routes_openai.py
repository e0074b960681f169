"""The OpenAI-compatible API under /v1 (and KoboldCpp's aliases of it)."""
from __future__ import annotations

from contextlib import contextmanager

from adapters import openai as oa
from adapters import sse
from adapters.errors import ApiError, error_body

from . import routes_models


def _run(h, plan):
    runner = h.runner()
    if plan.stream:
        # return_progress: llama-server's prompt_progress chunks (no choices) while the prompt is processed
        env = {"id": plan.id, "object": "chat.completion.chunk" if plan.kind == "chat" else "text_completion",
               "created": plan.created, "model": plan.model}
        h.pump(oa.start_stream(plan, runner), progress=lambda p: sse.progress_event(p, env))
    else:
        h.send_json(200, oa.run_blocking(plan, runner))


def _ctx(h, body):
    """The chat Context of the model the body's `model` names (unknown or absent: the current model). A stream
    waiting for its model to load gets SSE keep-alive comments meanwhile."""
    name = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
    if isinstance(body, dict) and body.get("stream") is True:
        h.state.served(name, waiting=lambda: _keep_alive(h))
    return h.state.chat_for(name)


def _keep_alive(h):
    if h.status_sent is None:
        h._start_stream(sse.SSE_HEADERS)
    h.write(sse.comment("loading the model"))


@contextmanager
def _stream_errors(h):
    """Errors after keep-alives started the stream end it with an OpenAI error event (the SDKs raise on it)."""
    try:
        yield
    except ApiError as e:
        if h.status_sent is None:
            raise
        h.write(sse.event(error_body("openai", e)))


def chat(h):
    b = h.json()
    with _stream_errors(h):
        _run(h, oa.parse_chat(b, _ctx(h, b)))


def completions(h):
    b = h.json()
    with _stream_errors(h):
        _run(h, oa.parse_completion(b, _ctx(h, b)))


def embeddings(h):
    b = h.json()
    h.send_json(200, oa.run_embeddings(b, _ctx(h, b)))


def edits(h):
    b = h.json()
    plan = oa.parse_edit(b, _ctx(h, b))
    h.send_json(200, oa.edit_response(oa.run_blocking(plan, h.runner())))


def register(t):
    o = {"dialect": "openai"}
    t.add("POST", ["/v1/chat/completions", "/chat/completions"], chat, auth=True, **o)
    t.add("POST", ["/v1/completions", "/v1/completion", "/completions"], completions, auth=True, **o)
    t.add("GET", ["/v1/models", "/models"], routes_models.openai_models, **o)
    t.add("GET", "/v1/engines", routes_models.openai_engines, **o)
    t.add("POST", ["/v1/embeddings", "/api/extra/embeddings"], embeddings, auth=True, **o)
    t.add("POST", "/v1/edits", edits, auth=True, **o)
    t.add("POST", "/v1/moderations", lambda h: h.send_json(200, oa.moderation(h.json(), h.state.chat)), auth=True, **o)
    t.add("POST", ["/v1/images/generations", "/images/generations"],
          lambda h: h.send_json(200, oa.image_generation(h.json(), h.state.sdurl)), auth=True, **o)
    # routes with an id in the path; any id answers with the loaded model
    t.add_pattern("GET", r"(?:/v1)?/models/[^/]+", "/v1/models/{model}",
                  lambda h: h.send_json(200, oa.model_card(h.state.model_name, h.state.chat.media)), **o)
    t.add_pattern("GET", r"/v1/engines/[^/]+", "/v1/engines/{engine}", routes_models.engine_load, **o)
    for action in ("generate", "completions"):
        t.add_pattern("POST", rf"/v1/engines/[^/]+/{action}", f"/v1/engines/{{engine}}/{action}", completions,
                      auth=True, **o)
    t.add_pattern("POST", r"/v1/engines/[^/]+/embeddings", "/v1/engines/{engine}/embeddings", embeddings, auth=True,
                  **o)
