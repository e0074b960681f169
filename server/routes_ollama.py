"""Ollama's API: model list, running models, model info, version, generate and chat (NDJSON streams),
embeddings."""
from __future__ import annotations

from adapters import ollama

from . import routes_models


def _run(h, plan):
    runner, ctx = h.runner(), h.state.chat
    if plan.stream:
        h.pump(ollama.start_stream(plan, runner, ctx), ndjson=True)
    else:
        h.send_json(200, ollama.run_blocking(plan, runner, ctx))


def _ctx(h, body):
    return h.state.chat_for(body.get("model") if isinstance(body, dict) else None)


def generate(h):
    b = h.json()
    _run(h, ollama.parse_generate(b, _ctx(h, b)))


def chat(h):
    b = h.json()
    _run(h, ollama.parse_chat(b, _ctx(h, b)))


def _body_route(h, fn):
    b = h.json()
    h.send_json(200, fn(b, _ctx(h, b)))


def show(h):
    b = h.json()
    ctx = _ctx(h, b)
    h.send_json(200, ollama.show(b, ctx, ctx.engine.model_path))


def ps(h):
    """Every loaded model with its real memory use (never loads one)."""
    models = h.state.models
    served = models.loaded_values() if models is not None else [h.state.served()]
    out = []
    for v in served:
        out += ollama.ps(v.model_name, v.engine.model_path, v.engine)["models"]
    h.send_json(200, {"models": out})


def register(t):
    o = {"dialect": "ollama"}
    t.add("GET", "/api/tags", routes_models.ollama_tags, **o)
    t.add("GET", "/api/ps", ps, **o)
    t.add("POST", "/api/show", show, **o)
    t.add("POST", "/api/embed", lambda h: _body_route(h, ollama.embed), auth=True, **o)
    t.add("POST", "/api/embeddings", lambda h: _body_route(h, ollama.embeddings_legacy), auth=True, **o)
    t.add("GET", "/api/version", lambda h: h.send_json(200, ollama.version()), **o)
    t.add("POST", "/api/generate", generate, auth=True, **o)
    t.add("POST", "/api/chat", chat, auth=True, **o)
