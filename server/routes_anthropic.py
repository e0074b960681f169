"""Anthropic Messages: /v1/messages (blocking or SSE) and /v1/messages/count_tokens. Keys come as x-api-key or
Bearer (server/http.py); errors use Anthropic's shape."""
from __future__ import annotations

from adapters import anthropic


def _ctx(h, body):
    """The named model's chat Context (unknown names: the current model)."""
    return h.state.chat_for(body.get("model") if isinstance(body, dict) else None)


def messages(h):
    body = h.json()
    ctx = _ctx(h, body)
    plan, stops = anthropic.parse(body, ctx)
    runner = h.runner()
    if plan.stream:
        h.pump(anthropic.start_stream(plan, runner, ctx, stops))
    else:
        h.send_json(200, anthropic.run_blocking(plan, runner, stops))


def count_tokens(h):
    body = h.json()
    h.send_json(200, anthropic.count_tokens(body, _ctx(h, body)))


def register(t):
    o = {"dialect": "anthropic"}
    t.add("POST", "/v1/messages", messages, auth=True, **o)
    t.add("POST", "/v1/messages/count_tokens", count_tokens, auth=True, **o)
