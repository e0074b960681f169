"""The OpenAPI 3.1 document of every route the server registers (/api/openapi.json) and a readable page (/api)."""
from __future__ import annotations

import html
from typing import Iterable, Tuple

# path -> (tag, summary). Routes not listed here still appear, with a generic summary.
DESCRIPTIONS = {
    "/api/v1/generate": ("KoboldCpp", "Generate text from a prompt (blocking). Body: prompt, max_length, samplers..."),
    "/api/extra/generate/stream": ("KoboldCpp", "Generate text as server-sent events (event: message, data: {token})"),
    "/api/extra/generate/check": ("KoboldCpp", "Text generated so far by the running job (polled streaming)"),
    "/api/extra/abort": ("KoboldCpp", "Abort the running generation (optional genkey)"),
    "/api/extra/last_logprobs": ("KoboldCpp", "Logprobs of the last finished generation"),
    "/api/v1/model": ("KoboldCpp", "Loaded model name"),
    "/api/v1/info/version": ("KoboldCpp", "KoboldAI United API version"),
    "/api/v1/config/max_context_length": ("KoboldCpp", "Context size"),
    "/api/v1/config/max_length": ("KoboldCpp", "Default generation length"),
    "/api/v1/config/soft_prompt": ("KoboldCpp", "Soft prompt (always empty)"),
    "/api/v1/config/soft_prompts_list": ("KoboldCpp", "Soft prompts (always empty)"),
    "/api/extra/true_max_context_length": ("KoboldCpp", "Real context size"),
    "/api/extra/version": ("KoboldCpp", "Server version and capabilities"),
    "/api/extra/perf": ("KoboldCpp", "Last generation statistics and queue state"),
    "/api/extra/tokencount": ("KoboldCpp", "Count and list the tokens of a prompt"),
    "/api/extra/tokenize": ("KoboldCpp", "Same as tokencount"),
    "/api/extra/detokenize": ("KoboldCpp", "Token ids to text"),
    "/api/extra/json_to_grammar": ("KoboldCpp", "JSON schema to GBNF grammar"),
    "/api/extra/preloadstory": ("KoboldCpp", "Story preloaded with --preloadstory"),
    "/api/extra/embeddings": ("KoboldCpp", "Embeddings (same as /v1/embeddings)"),
    "/ping": ("Server", "Health check"),
    "/": ("Server", "Kobold Lite web page"),
    "/klite": ("Server", "Kobold Lite web page"),
    "/api": ("Server", "This API documentation as a web page"),
    "/api/openapi.json": ("Server", "This API documentation as an OpenAPI document"),
    "/v1/chat/completions": ("OpenAI", "Chat completion (messages -> assistant reply); stream with SSE"),
    "/chat/completions": ("OpenAI", "Alias of /v1/chat/completions"),
    "/v1/completions": ("OpenAI", "Text completion (prompt -> text); stream with SSE"),
    "/v1/completion": ("OpenAI", "Alias of /v1/completions"),
    "/completions": ("OpenAI", "Alias of /v1/completions"),
    "/v1/models": ("OpenAI", "List the loaded model"),
    "/models": ("OpenAI", "Alias of /v1/models"),
    "/v1/models/{model}": ("OpenAI", "Retrieve the loaded model (any id answers with the loaded model)"),
    "/v1/embeddings": ("OpenAI", "Embeddings (mean-pooled, L2-normalised), float or base64"),
    "/v1/engines": ("OpenAI (legacy)", "List engines (the loaded model)"),
    "/v1/engines/{engine}": ("OpenAI (legacy)", "Retrieve an engine"),
    "/v1/engines/{engine}/generate": ("OpenAI (legacy)", "Text completion (same body as /v1/completions)"),
    "/v1/engines/{engine}/completions": ("OpenAI (legacy)", "Text completion (same body as /v1/completions)"),
    "/v1/engines/{engine}/embeddings": ("OpenAI (legacy)", "Embeddings (same body as /v1/embeddings)"),
    "/v1/edits": ("OpenAI (legacy)", "Edit: instruction + input run as one chat turn through the instruct adapter"),
    "/v1/moderations": ("OpenAI (legacy)", "Moderation: no classifier is loaded, so every input is reported as "
                                           "not flagged (all categories false, scores 0)"),
    "/v1/images/generations": ("OpenAI", "Image generation forwarded to an Automatic1111 server (--sdurl or "
                                         "SD_WEBUI_URL); 501 when none is configured"),
    "/api/tags": ("Ollama", "List the loaded model"),
    "/api/version": ("Ollama", "Ollama API version"),
    "/api/generate": ("Ollama", "Generate (prompt, system, options); NDJSON stream unless stream is false"),
    "/api/chat": ("Ollama", "Chat (messages, options, tools); NDJSON stream unless stream is false"),
}

_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}

_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
    "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"}}}

_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0}, "top_p": {"type": "number"}, "top_k": {"type": "integer"},
    "min_p": {"type": "number"}, "seed": {"type": "integer"}, "presence_penalty": {"type": "number"},
    "frequency_penalty": {"type": "number"}, "stop": {"oneOf": [{"type": "string"}, {"type": "array"}]},
    "n": {"type": "integer", "minimum": 1, "maximum": 16}, "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "logit_bias": {"type": "object"}, "response_format": {"type": "object"},
    "adapter": {"type": "object", "description": "instruct tags overriding the server's adapter for this request"},
}

BODIES = {
    "/v1/chat/completions": {"type": "object", "required": ["messages"], "properties": {
        "model": {"type": "string", "description": "ignored: the loaded model answers"},
        "messages": {"type": "array", "items": _MESSAGE}, **_SAMPLING,
        "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "tools": {"type": "array"}, "tool_choice": {"oneOf": [{"type": "string"}, {"type": "object"}]}},
        "additionalProperties": True, "description": "Every native KoboldCpp sampler field is accepted too."},
    "/v1/completions": {"type": "object", "properties": {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array"}]}, **_SAMPLING,
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}, "echo": {"type": "boolean"}},
        "additionalProperties": True},
    "/v1/embeddings": {"type": "object", "required": ["input"], "properties": {
        "input": {"oneOf": [{"type": "string"}, {"type": "array"}]},
        "encoding_format": {"enum": ["float", "base64"]}, "dimensions": {"type": "integer"}}},
    "/api/v1/generate": {"type": "object", "properties": {
        "prompt": {"type": "string"}, "memory": {"type": "string"}, "max_length": {"type": "integer"},
        "max_context_length": {"type": "integer"}, "temperature": {"type": "number"},
        "stop_sequence": {"type": "array", "items": {"type": "string"}}, "sampler_seed": {"type": "integer"}},
        "additionalProperties": True},
}
BODIES["/chat/completions"] = BODIES["/v1/chat/completions"]
for _p in ("/v1/completion", "/completions", "/v1/engines/{engine}/generate", "/v1/engines/{engine}/completions"):
    BODIES[_p] = BODIES["/v1/completions"]
BODIES["/v1/engines/{engine}/embeddings"] = BODIES["/api/extra/embeddings"] = BODIES["/v1/embeddings"]
BODIES["/api/extra/generate/stream"] = BODIES["/api/v1/generate"]


def build(routes: Iterable[Tuple[str, str, bool, str]], version: str, title: str = "KoboldCpp-compatible server") -> dict:
    """routes: (METHOD, path, needs_auth, dialect)."""
    paths: dict = {}
    for method, path, auth, dialect in sorted(routes, key=lambda r: (r[1], r[0])):
        tag, summary = DESCRIPTIONS.get(path, ("Other", f"{method} {path}"))
        op = {"tags": [tag], "summary": summary, "operationId": (method.lower() + path.replace("/", "_")
                                                                  .replace("{", "").replace("}", "")),
              "responses": {"200": {"description": "OK"}}}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in ("model", "engine") if "{" + n + "}" in path]
        if params:
            op["parameters"] = params
        if method in ("POST", "PUT", "PATCH"):
            op["requestBody"] = {"required": False, "content": {"application/json": {
                "schema": BODIES.get(path, {"type": "object"})}}}
            op["responses"]["400"] = {"description": "invalid body", "content": {"application/json": {
                "schema": _ERROR if dialect == "openai" else {"type": "object"}}}}
        if auth:
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = {"description": "missing or wrong API key (--password)"}
        if path in ("/v1/chat/completions", "/v1/completions", "/api/v1/generate", "/api/generate", "/api/chat"):
            op["responses"]["503"] = {"description": "the request queue is full"}
        paths.setdefault(path, {})[method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": title, "version": version,
                     "description": "KoboldCpp native API, an OpenAI-compatible API under /v1 and Ollama routes."},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "paths": paths}


def render_html(doc: dict) -> str:
    rows = []
    by_tag: dict = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            by_tag.setdefault(op["tags"][0], []).append((path, method.upper(), op))
    for tag in sorted(by_tag):
        rows.append(f"<h2>{html.escape(tag)}</h2><table>")
        for path, method, op in sorted(by_tag[tag]):
            lock = " &#128274;" if op.get("security") else ""
            rows.append(f"<tr><td class=m>{method}</td><td><code>{html.escape(path)}</code>{lock}</td>"
                        f"<td>{html.escape(op['summary'])}</td></tr>")
        rows.append("</table>")
    e = html.escape
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>API</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;width:100%}td{border-bottom:1px solid #ddd;padding:4px 8px;"
            "vertical-align:top}td.m{font-weight:bold;width:4em}code{font-size:95%}</style></head><body>"
            f"<h1>{e(doc['info']['title'])} <small>{e(doc['info']['version'])}</small></h1>"
            f"<p>{e(doc['info']['description'])} Machine-readable: <a href='/api/openapi.json'>/api/openapi.json</a>. "
            "&#128274; = needs <code>Authorization: Bearer &lt;password&gt;</code> when the server has a password. "
            "OpenAI SDKs: use base URL <code>http://HOST:PORT/v1</code> and any API key.</p>"
            + "".join(rows) + "</body></html>")
