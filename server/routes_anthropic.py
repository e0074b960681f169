"""Anthropic Messages: /v1/messages (blocking or SSE) and /v1/messages/count_tokens. Keys come as x-api-key or
Bearer (server/http.py); errors use Anthropic's shape."""
from __future__ import annotations

from adapters import anthropic


def messages(h):
    ctx = h.state.chat
    plan, stops = anthropic.parse(h.json(), ctx)
    runner = h.runner()
    if plan.stream:
        h.pump(anthropic.start_stream(plan, runner, ctx, stops))
    else:
        h.send_json(200, anthropic.run_blocking(plan, runner, stops))


def register(t):
    o = {"dialect": "anthropic"}
    t.add("POST", "/v1/messages", messages, auth=True, **o)
    t.add("POST", "/v1/messages/count_tokens", lambda h: h.send_json(200, anthropic.count_tokens(h.json(),
                                                                                             h.state.chat)),
          auth=True, **o)
