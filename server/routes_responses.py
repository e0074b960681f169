"""OpenAI Responses: POST /v1/responses (blocking or SSE), GET and DELETE /v1/responses/{id}, and
/v1/responses/input_tokens."""
from __future__ import annotations

from adapters import responses
from .http import normalize_path


def create(h):
    store = h.state.responses
    req = responses.parse(h.json(), h.state.chat, store)
    runner = h.runner()
    if req.plan.stream:
        h.pump(responses.start_stream(req, runner, store))
    else:
        h.send_json(200, responses.run_blocking(req, runner, store))


def _id(h) -> str:
    return normalize_path(h.path).rsplit("/", 1)[1]


def register(t):
    o = {"dialect": "openai"}
    t.add("POST", ["/v1/responses", "/responses"], create, auth=True, **o)
    t.add("POST", "/v1/responses/input_tokens", lambda h: h.send_json(200, responses.input_tokens(
        h.json(), h.state.chat, h.state.responses)), auth=True, **o)
    t.add_pattern("GET", r"(?:/v1)?/responses/[^/]+", "/v1/responses/{response_id}",
                  lambda h: h.send_json(200, responses.retrieve(h.state.responses, _id(h))), auth=True, **o)
    t.add_pattern("DELETE", r"(?:/v1)?/responses/[^/]+", "/v1/responses/{response_id}",
                  lambda h: h.send_json(200, responses.delete(h.state.responses, _id(h))), auth=True, **o)
