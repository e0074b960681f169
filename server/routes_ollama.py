"""Ollama's API: model list, running models, model info, version, generate and chat (NDJSON streams),
embeddings."""
from __future__ import annotations

from adapters import ollama


def _run(h, plan):
    runner, ctx = h.runner(), h.state.chat
    if plan.stream:
        h.pump(ollama.start_stream(plan, runner, ctx), ndjson=True)
    else:
        h.send_json(200, ollama.run_blocking(plan, runner, ctx))


def register(t):
    o = {"dialect": "ollama"}
    t.add("GET", "/api/tags", lambda h: h.send_json(200, ollama.tags(
        h.state.model_name, h.state.engine.model_path, h.state.engine.metadata)), **o)
    t.add("GET", "/api/ps", lambda h: h.send_json(200, ollama.ps(
        h.state.model_name, h.state.engine.model_path, h.state.engine)), **o)
    t.add("POST", "/api/show", lambda h: h.send_json(200, ollama.show(h.json(), h.state.chat,
                                                                      h.state.engine.model_path)), **o)
    t.add("POST", "/api/embed", lambda h: h.send_json(200, ollama.embed(h.json(), h.state.chat)), auth=True, **o)
    t.add("POST", "/api/embeddings", lambda h: h.send_json(200, ollama.embeddings_legacy(h.json(), h.state.chat)),
          auth=True, **o)
    t.add("GET", "/api/version", lambda h: h.send_json(200, ollama.version()), **o)
    t.add("POST", "/api/generate", lambda h: _run(h, ollama.parse_generate(h.json(), h.state.chat)), auth=True, **o)
    t.add("POST", "/api/chat", lambda h: _run(h, ollama.parse_chat(h.json(), h.state.chat)), auth=True, **o)
