"""Fill-in-the-middle (/infill, llama-server's shape) and reranking (/v1/rerank, /rerank)."""
from __future__ import annotations

from adapters import fim, rerank


def infill(h):
    req, stream = fim.parse_infill(h.json(), h.state.chat)
    runner = h.runner()
    if stream:
        h.pump(fim.start_stream(req, runner, h.state.model_name))
    else:
        h.send_json(200, fim.run_blocking(req, runner, h.state.model_name))


def register(t):
    o = {"dialect": "openai"}
    t.add("POST", "/infill", infill, auth=True, **o)
    t.add("POST", ["/v1/rerank", "/rerank", "/v1/reranking", "/reranking"],
          lambda h: h.send_json(200, rerank.run(h.json(), h.state.chat)), auth=True, **o)
