"""The OpenAI-compatible API under /v1 (and KoboldCpp's aliases of it)."""
from __future__ import annotations

from adapters import openai as oa

from . import routes_models


def _run(h, plan):
    runner = h.runner()
    if plan.stream:
        h.pump(oa.start_stream(plan, runner))
    else:
        h.send_json(200, oa.run_blocking(plan, runner))


def _ctx(h, body):
    """The chat Context of the model the body's `model` names (unknown or absent: the current model)."""
    return h.state.chat_for(body.get("model") if isinstance(body, dict) else None)


def chat(h):
    b = h.json()
    _run(h, oa.parse_chat(b, _ctx(h, b)))


def completions(h):
    b = h.json()
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
                  lambda h: h.send_json(200, oa.model_card(h.state.model_name)), **o)
    t.add_pattern("GET", r"/v1/engines/[^/]+", "/v1/engines/{engine}", routes_models.engine_load, **o)
    for action in ("generate", "completions"):
        t.add_pattern("POST", rf"/v1/engines/[^/]+/{action}", f"/v1/engines/{{engine}}/{action}", completions,
                      auth=True, **o)
    t.add_pattern("POST", r"/v1/engines/[^/]+/embeddings", "/v1/engines/{engine}/embeddings", embeddings, auth=True,
                  **o)
