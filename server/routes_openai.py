"""The OpenAI-compatible API under /v1 (and KoboldCpp's aliases of it)."""
from __future__ import annotations

from adapters import openai as oa, sse


def _run(h, plan):
    runner = h.runner()
    if plan.stream:
        # return_progress: llama-server's prompt_progress chunks (no choices) while the prompt is processed
        env = {"id": plan.id, "object": "chat.completion.chunk" if plan.kind == "chat" else "text_completion",
               "created": plan.created, "model": plan.model}
        h.pump(oa.start_stream(plan, runner), progress=lambda p: sse.progress_event(p, env))
    else:
        h.send_json(200, oa.run_blocking(plan, runner))


def chat(h):
    _run(h, oa.parse_chat(h.json(), h.state.chat))


def completions(h):
    _run(h, oa.parse_completion(h.json(), h.state.chat))


def embeddings(h):
    h.send_json(200, oa.run_embeddings(h.json(), h.state.chat))


def edits(h):
    plan = oa.parse_edit(h.json(), h.state.chat)
    h.send_json(200, oa.edit_response(oa.run_blocking(plan, h.runner())))


def register(t):
    o = {"dialect": "openai"}
    t.add("POST", ["/v1/chat/completions", "/chat/completions"], chat, auth=True, **o)
    t.add("POST", ["/v1/completions", "/v1/completion", "/completions"], completions, auth=True, **o)
    t.add("GET", ["/v1/models", "/models"], lambda h: h.send_json(200, oa.models_list(h.state.model_name, h.state.chat.media)),
          **o)
    t.add("GET", "/v1/engines", lambda h: h.send_json(200, oa.engines_list(h.state.model_name)), **o)
    t.add("POST", ["/v1/embeddings", "/api/extra/embeddings"], embeddings, auth=True, **o)
    t.add("POST", "/v1/edits", edits, auth=True, **o)
    t.add("POST", "/v1/moderations", lambda h: h.send_json(200, oa.moderation(h.json(), h.state.chat)), auth=True, **o)
    t.add("POST", ["/v1/images/generations", "/images/generations"],
          lambda h: h.send_json(200, oa.image_generation(h.json(), h.state.sdurl)), auth=True, **o)
    # routes with an id in the path; any id answers with the loaded model
    t.add_pattern("GET", r"(?:/v1)?/models/[^/]+", "/v1/models/{model}",
                  lambda h: h.send_json(200, oa.model_card(h.state.model_name, h.state.chat.media)), **o)
    t.add_pattern("GET", r"/v1/engines/[^/]+", "/v1/engines/{engine}",
                  lambda h: h.send_json(200, oa.engine_card(h.state.model_name)), **o)
    for action in ("generate", "completions"):
        t.add_pattern("POST", rf"/v1/engines/[^/]+/{action}", f"/v1/engines/{{engine}}/{action}", completions,
                      auth=True, **o)
    t.add_pattern("POST", r"/v1/engines/[^/]+/embeddings", "/v1/engines/{engine}/embeddings", embeddings, auth=True,
                  **o)
