"""Ollama's API: model list, version, generate and chat (NDJSON streams)."""
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


def register(t):
    o = {"dialect": "ollama"}
    t.add("GET", "/api/tags", routes_models.ollama_tags, **o)
    t.add("GET", "/api/ps", lambda h: routes_models.ollama_tags(h, loaded_only=True), **o)
    t.add("GET", "/api/version", lambda h: h.send_json(200, ollama.version()), **o)
    t.add("POST", "/api/generate", generate, auth=True, **o)
    t.add("POST", "/api/chat", chat, auth=True, **o)
