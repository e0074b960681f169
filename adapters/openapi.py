"""The OpenAPI 3.1 document of every route the server registers (/api/openapi.json) and a readable page (/api)."""
from __future__ import annotations

import copy
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
    "/health": ("Server", "Health for load balancers: 503 {status: loading, progress} while the model loads, then "
                          "200 {status: ok, slots_idle, slots_processing}; ?fail_on_no_slot=1 gives 503 when no "
                          "slot is idle"),
    "/slots": ("Server", "Each slot (llama-server shape): id, is_processing, n_cached, prompt_progress, next_token; "
                         "?fail_on_no_slot=1 gives 503 when none is idle"),
    "/props": ("Server", "Server properties (llama-server shape): default_generation_settings, total_slots, "
                         "chat_template, modalities, build_info"),
    "/metrics": ("Server", "Prometheus text format: requests by route and status, tokens, speeds, queue depth, "
                           "busy slots, KV cells used, model load time, AI Horde jobs"),
    "/": ("Server", "Kobold Lite web page"),
    "/klite": ("Server", "Kobold Lite web page"),
    "/api": ("Server", "This API documentation as a web page"),
    "/api/openapi.json": ("Server", "This API documentation as an OpenAPI document"),
    "/v1/chat/completions": ("OpenAI", "Chat completion (messages -> assistant reply); stream with SSE"),
    "/chat/completions": ("OpenAI", "Alias of /v1/chat/completions"),
    "/v1/completions": ("OpenAI", "Text completion (prompt -> text); stream with SSE"),
    "/v1/completion": ("OpenAI", "Alias of /v1/completions"),
    "/completions": ("OpenAI", "Alias of /v1/completions"),
    "/v1/models": ("OpenAI", "List every offered model with its state (status.value: loaded, loading, unloaded)"),
    "/models": ("OpenAI", "Alias of /v1/models"),
    "/v1/models/{model}": ("OpenAI", "Retrieve the loaded model (any id answers with the loaded model)"),
    "/v1/embeddings": ("OpenAI", "Embeddings (pooled as the model says, L2-normalised), float or base64"),
    "/v1/engines": ("OpenAI (legacy)", "List engines (every offered model; ready when loaded)"),
    "/v1/engines/{engine}": ("OpenAI (legacy)", "Retrieve an engine; loads it when it is not loaded (admin key)"),
    "/models/load": ("Models", "Load a model (llama-server router); needs the admin key"),
    "/models/unload": ("Models", "Unload a model (llama-server router); needs the admin key"),
    "/v1/internal/model/load": ("Models", "Load a model (text-generation-webui); needs the admin key"),
    "/api/admin/list_options": ("Models", "Files offered by --modeldir (KoboldCpp admin); needs the admin key"),
    "/api/admin/reload_config": ("Models", "Switch to a model or .kcpps (KoboldCpp admin); needs the admin key"),
    "/v1/engines/{engine}/generate": ("OpenAI (legacy)", "Text completion (same body as /v1/completions)"),
    "/v1/engines/{engine}/completions": ("OpenAI (legacy)", "Text completion (same body as /v1/completions)"),
    "/v1/engines/{engine}/embeddings": ("OpenAI (legacy)", "Embeddings (same body as /v1/embeddings)"),
    "/v1/edits": ("OpenAI (legacy)", "Edit: instruction + input run as one chat turn through the instruct adapter"),
    "/v1/moderations": ("OpenAI (legacy)", "Moderation: no classifier is loaded, so every input is reported as "
                                           "not flagged (all categories false, scores 0)"),
    "/v1/images/generations": ("OpenAI", "Image generation forwarded to an Automatic1111 server (--sdurl or "
                                         "SD_WEBUI_URL); 501 when none is configured"),
    "/api/tags": ("Ollama", "List every offered model"),
    "/api/ps": ("Ollama", "Running models (the loaded ones)"),
    "/api/version": ("Ollama", "Ollama API version"),
    "/api/generate": ("Ollama", "Generate (prompt, system, options); NDJSON stream unless stream is false"),
    "/api/chat": ("Ollama", "Chat (messages, options, tools); NDJSON stream unless stream is false"),
    "/api/show": ("Ollama", "Model info, template, parameters and capabilities of the loaded model"),
    "/api/embed": ("Ollama", "Embeddings of a string or strings (L2-normalised)"),
    "/api/embeddings": ("Ollama (legacy)", "Embedding of one prompt"),
    "/infill": ("Fill-in-the-middle", "llama-server's infill: input_prefix, input_suffix, input_extra around the "
                                      "model's FIM tokens; 400 for a model without them; SSE with stream: true"),
    "/v1/rerank": ("Reranking", "Score documents against a query with --rerankmodel (Jina/Cohere shape); 501 "
                                "without a reranker"),
    "/rerank": ("Reranking", "Alias of /v1/rerank"),
    "/v1/reranking": ("Reranking", "Alias of /v1/rerank"),
    "/reranking": ("Reranking", "Alias of /v1/rerank"),
    "/v1/messages": ("Anthropic", "Messages (system, messages with text/tool_use/tool_result blocks, tools, "
                                  "stop_sequences, max_tokens required); Anthropic's SSE events with stream: true; "
                                  "key as x-api-key or Bearer"),
    "/v1/messages/count_tokens": ("Anthropic", "Count the input tokens a Messages request would use"),
    "/v1/responses": ("OpenAI", "Responses (input, instructions, function tools, previous_response_id, "
                                "max_output_tokens); response.* SSE events with stream: true"),
    "/responses": ("OpenAI", "Alias of /v1/responses"),
    "/v1/responses/input_tokens": ("OpenAI", "Count the input tokens a Responses request would use"),
    "/v1/responses/{response_id}": ("OpenAI", "Retrieve (GET) or delete (DELETE) a stored response (kept one hour, "
                                              "at most 512)"),
}

# ---------------------------------------------------------------- schema helpers

def _obj(props: dict, required=(), **extra) -> dict:
    s = {"type": "object", "properties": props}
    if required:
        s["required"] = list(required)
    s.update(extra)
    return s


def _arr(items: dict, **extra) -> dict:
    return {"type": "array", "items": items, **extra}


def _ref(name: str) -> dict:
    return {"$ref": "#/components/schemas/" + name}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_NULLABLE_STR = {"type": ["string", "null"]}
_NN_INT = {"type": "integer", "minimum": 0}
_UNIT = {"type": "number", "minimum": 0, "maximum": 1}
_PENALTY = {"type": "number", "minimum": -2, "maximum": 2}
_TOKEN_ID = {"type": "integer", "minimum": 0}
_TOKEN_IDS = _arr(_TOKEN_ID, minItems=1)
_STR_LIST = _arr(_STR)
_LOGIT_BIAS = {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
               "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
               "description": "token id -> bias (-100 bans the token)"}
_ADAPTER = {"type": "object", "additionalProperties": True,
            "properties": {k: _STR for k in ("chat_start", "system_start", "system_end", "user_start", "user_end",
                                              "assistant_start", "assistant_end", "assistant_gen")},
            "description": "instruct tags overriding the server's chat adapter for this request only"}

# ---------------------------------------------------------------- response shapes (components/schemas)

_TOP_LOGPROB = _obj({"token": _STR, "logprob": _NUM, "bytes": {"type": ["array", "null"], "items": _INT}},
                    ["token", "logprob"])
_TOKEN_LOGPROB = _obj({**_TOP_LOGPROB["properties"], "top_logprobs": _arr(_TOP_LOGPROB)},
                      ["token", "logprob", "top_logprobs"])
_COMPLETION_LOGPROBS = _obj({
    "tokens": _arr(_STR), "token_logprobs": _arr(_NUM),
    "top_logprobs": _arr({"type": ["object", "null"], "additionalProperties": _NUM}),
    "text_offset": _arr(_INT)})
_USAGE = _obj({"prompt_tokens": _NN_INT, "completion_tokens": _NN_INT, "total_tokens": _NN_INT,
               "prompt_tokens_details": {"type": ["object", "null"], "properties": {"cached_tokens": _NN_INT}},
               "completion_tokens_details": {"type": ["object", "null"],
                                             "properties": {"reasoning_tokens": _NN_INT}}},
              ["prompt_tokens", "completion_tokens", "total_tokens"])
_TOOL_CALL = _obj({"id": _STR, "type": {"const": "function"},
                   "function": _obj({"name": _STR, "arguments": {"type": "string", "description": "JSON text"}},
                                    ["name", "arguments"])}, ["id", "type", "function"])

SCHEMAS = {
    # errors, one shape per dialect
    "KoboldError": _obj({"detail": _obj({"msg": _STR, "type": _STR, "error": _STR}, ["msg", "type"])}, ["detail"]),
    "OpenAIError": _obj({"error": _obj({"message": _STR, "type": _STR, "param": _NULLABLE_STR,
                                        "code": _NULLABLE_STR}, ["message", "type", "param", "code"])}, ["error"]),
    "OllamaError": _obj({"error": _STR}, ["error"]),
    # native KoboldCpp
    "KoboldLogprobs": _obj({"content": _arr(_TOKEN_LOGPROB), **_COMPLETION_LOGPROBS["properties"]},
                           description="chat- and completions-style logprobs in one object, as KoboldCpp"),
    "GenerateResponse": _obj({"results": _arr(_obj({
        "text": _STR, "finish_reason": {"enum": ["stop", "length"]},
        "logprobs": {"anyOf": [_ref("KoboldLogprobs"), {"type": "null"}]},
        "prompt_tokens": _NN_INT, "completion_tokens": _NN_INT, "tool_calls": {"type": "array"},
        "reasoning_content": _STR},
        ["text", "finish_reason"]), minItems=1)}, ["results"]),
    "CheckResponse": _obj({"results": _arr(_obj({"text": _STR}, ["text"]), minItems=1)}, ["results"]),
    "AbortResponse": _obj({"success": {"enum": ["true", "false"]}, "done": {"enum": ["true", "false"]}},
                          ["success", "done"]),
    "LastLogprobs": _obj({"logprobs": {"anyOf": [_ref("KoboldLogprobs"), {"type": "null"}]}}, ["logprobs"]),
    "Result": _obj({"result": _STR}, ["result"]),
    "IntValue": _obj({"value": _INT}, ["value"]),
    "StrValue": _obj({"value": _STR}, ["value"]),
    "Values": _obj({"values": {"type": "array"}}, ["values"]),
    "Version": _obj({"result": {"const": "KoboldCpp"}, "version": _STR, "protected": _BOOL, "llm": _BOOL,
                     "txt2img": _BOOL, "vision": _BOOL, "audio": _BOOL, "transcribe": _BOOL, "multiplayer": _BOOL,
                     "websearch": _BOOL, "tts": _BOOL, "embeddings": _BOOL, "savedata": _BOOL, "admin": _INT,
                     "guidance": _BOOL, "jinja": _BOOL}, ["result", "version"]),
    "Perf": _obj({"last_process": _NUM, "last_eval": _NUM, "last_token_count": _NN_INT,
                  "last_input_count": _NN_INT, "last_process_time": _NUM, "last_eval_time": _NUM,
                  "last_process_speed": _NUM, "last_eval_speed": _NUM, "last_seed": _INT,
                  "last_cached_tokens": _NN_INT, "total_gens": _NN_INT,
                  "stop_reason": {"type": "integer", "description": "-1 none yet, 0 out of tokens, 1 EOS, "
                                                                  "2 stop sequence"},
                  "queue": _NN_INT, "idle": {"enum": [0, 1]}, "uptime": _NUM, "idletime": _NUM, "quiet": _BOOL,
                  "hordeexitcounter": _INT, "last_draft_success": _INT, "last_draft_failed": _INT,
                  "total_img_gens": _INT, "total_tts_gens": _INT, "total_transcribe_gens": _INT},
                 ["last_process", "last_eval", "last_token_count", "total_gens", "stop_reason", "queue", "idle"]),
    "TokenCount": _obj({"value": _NN_INT, "ids": _arr(_INT)}, ["value", "ids"]),
    "Detokenized": _obj({"result": _STR, "success": _BOOL}, ["result", "success"]),
    "Grammar": _obj({"result": _STR, "success": _BOOL, "error": _STR}, ["result", "success"]),
    "Health": _obj({"status": _STR}, ["status"]),
    "HealthDetail": _obj({"status": {"enum": ["ok", "loading"]}, "slots_idle": _NN_INT,
                          "slots_processing": _NN_INT, "progress": _NUM}, ["status"]),
    "Unavailable": _obj({"error": _obj({"code": _INT, "message": _STR, "type": _STR}, ["message"]),
                         "status": _STR, "progress": _NUM}, ["error"]),
    "Slots": _arr(_obj({"id": _NN_INT, "id_task": _INT, "n_ctx": _NN_INT, "is_processing": _BOOL,
                        "n_cached": _NN_INT,
                        "prompt_progress": {"anyOf": [{"type": "null"}, _obj({
                            "total": _NN_INT, "cache": _NN_INT, "processed": _NN_INT, "time_ms": _NUM})]},
                        "next_token": _obj({"has_next_token": _BOOL, "n_remain": _INT, "n_decoded": _NN_INT})},
                       ["id", "is_processing"])),
    "Props": _obj({"default_generation_settings": _obj({"n_ctx": _NN_INT, "params": {"type": "object"}}),
                   "total_slots": _NN_INT, "chat_template": _STR, "model_path": _STR,
                   "modalities": _obj({"vision": _BOOL, "audio": _BOOL}), "build_info": _STR},
                  ["default_generation_settings", "total_slots", "chat_template", "modalities"]),
    "OpenAPIDocument": _obj({"openapi": _STR, "info": {"type": "object"}, "paths": {"type": "object"}},
                            ["openapi", "info", "paths"]),
    # OpenAI
    "ChatCompletion": _obj({
        "id": _STR, "object": {"const": "chat.completion"}, "created": _INT, "model": _STR,
        "system_fingerprint": _STR,
        "choices": _arr(_obj({
            "index": _NN_INT,
            "message": _obj({"role": {"const": "assistant"}, "content": _NULLABLE_STR,
                             "refusal": _NULLABLE_STR, "tool_calls": _arr(_TOOL_CALL),
                             "reasoning_content": _STR}, ["role", "content"]),
            "finish_reason": {"enum": ["stop", "length", "tool_calls", "content_filter", "function_call"]},
            "logprobs": {"anyOf": [{"type": "null"}, _obj({
                "content": {"type": ["array", "null"], "items": _TOKEN_LOGPROB},
                "refusal": {"type": ["array", "null"], "items": _TOKEN_LOGPROB}})]}},
            ["index", "message", "finish_reason", "logprobs"]), minItems=1),
        "usage": _USAGE}, ["id", "object", "created", "model", "choices", "usage"]),
    "TextCompletion": _obj({
        "id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR,
        "system_fingerprint": _STR,
        "choices": _arr(_obj({
            "index": _NN_INT, "text": _STR, "finish_reason": {"enum": ["stop", "length", "content_filter"]},
            "logprobs": {"anyOf": [{"type": "null"}, _COMPLETION_LOGPROBS]}},
            ["index", "text", "finish_reason", "logprobs"]), minItems=1),
        "usage": _USAGE}, ["id", "object", "created", "model", "choices", "usage"]),
    "Model": _obj({"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR,
                   "status": _obj({"value": {"enum": ["loaded", "loading", "unloaded"]}})},
                  ["id", "object", "created", "owned_by"]),
    "ModelList": _obj({"object": {"const": "list"}, "data": _arr(_ref("Model"))}, ["object", "data"]),
    "Engine": _obj({"id": _STR, "object": {"const": "engine"}, "owner": _STR, "ready": _BOOL},
                   ["id", "object", "owner", "ready"]),
    "EngineList": _obj({"object": {"const": "list"}, "data": _arr(_ref("Engine"))}, ["object", "data"]),
    "Embeddings": _obj({
        "object": {"const": "list"}, "model": _STR,
        "data": _arr(_obj({"object": {"const": "embedding"}, "index": _NN_INT,
                           "embedding": {"anyOf": [_arr(_NUM), {"type": "string", "description": "base64 of "
                                                                "little-endian float32"}]}},
                          ["object", "index", "embedding"])),
        "usage": _obj({"prompt_tokens": _NN_INT, "total_tokens": _NN_INT}, ["prompt_tokens", "total_tokens"])},
        ["object", "data", "model", "usage"]),
    "Edit": _obj({"object": {"const": "edit"}, "created": _INT,
                  "choices": _arr(_obj({"text": _STR, "index": _NN_INT}, ["text", "index"])), "usage": _USAGE},
                 ["object", "created", "choices", "usage"]),
    "Moderation": _obj({"id": _STR, "model": _STR, "results": _arr(_obj({
        "flagged": _BOOL, "categories": {"type": "object", "additionalProperties": _BOOL},
        "category_scores": {"type": "object", "additionalProperties": _NUM}},
        ["flagged", "categories", "category_scores"]))}, ["id", "model", "results"]),
    "Images": _obj({"created": _INT, "data": _arr(_obj({"b64_json": _STR, "revised_prompt": _STR}, ["b64_json"]))},
                   ["created", "data"]),
    # Ollama
    "OllamaTags": _obj({"models": _arr(_obj({
        "name": _STR, "model": _STR, "modified_at": _STR, "size": _NN_INT, "digest": _STR,
        "details": {"type": "object"}}, ["name", "model", "modified_at", "size", "digest"]))}, ["models"]),
    "OllamaVersion": _obj({"version": _STR}, ["version"]),
    "OllamaShow": _obj({"license": _STR, "modelfile": _STR, "parameters": _STR, "template": _STR,
                        "details": {"type": "object"}, "model_info": {"type": "object"},
                        "capabilities": _arr({"enum": ["completion", "tools", "insert", "vision", "embedding",
                                                       "thinking"]}), "modified_at": _STR},
                       ["modelfile", "parameters", "template", "details", "model_info", "capabilities"]),
    "OllamaPs": _obj({"models": _arr(_obj({
        "name": _STR, "model": _STR, "size": _NN_INT, "size_vram": _NN_INT, "digest": _STR, "expires_at": _STR,
        "context_length": _NN_INT, "details": {"type": "object"}}, ["name", "model", "size", "size_vram"]))},
        ["models"]),
    "OllamaEmbed": _obj({"model": _STR, "embeddings": _arr(_arr(_NUM)), "total_duration": _NN_INT,
                         "load_duration": _NN_INT, "prompt_eval_count": _NN_INT}, ["model", "embeddings"]),
    "OllamaEmbedding": _obj({"embedding": _arr(_NUM)}, ["embedding"]),
    "Infill": _obj({"content": _STR, "stop": _BOOL, "model": _STR, "tokens_predicted": _NN_INT,
                    "tokens_evaluated": _NN_INT, "tokens_cached": _NN_INT, "truncated": _BOOL,
                    "stop_type": {"enum": ["eos", "limit", "word"]}, "stopping_word": _STR,
                    "timings": {"type": "object"}}, ["content", "stop"]),
    "AnthropicError": _obj({"type": {"const": "error"}, "error": _obj({"type": _STR, "message": _STR},
                                                                       ["type", "message"])}, ["type", "error"]),
    "AnthropicMessage": _obj({
        "id": _STR, "type": {"const": "message"}, "role": {"const": "assistant"}, "model": _STR,
        "content": _arr({"anyOf": [
            _obj({"type": {"const": "text"}, "text": _STR}, ["type", "text"]),
            _obj({"type": {"const": "thinking"}, "thinking": _STR, "signature": _STR}, ["type", "thinking"]),
            _obj({"type": {"const": "tool_use"}, "id": _STR, "name": _STR, "input": {"type": "object"}},
                 ["type", "id", "name", "input"])]}),
        "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        "stop_sequence": _NULLABLE_STR,
        "usage": _obj({"input_tokens": _NN_INT, "output_tokens": _NN_INT}, ["input_tokens", "output_tokens"])},
        ["id", "type", "role", "model", "content", "stop_reason", "usage"]),
    "AnthropicTokenCount": _obj({"input_tokens": _NN_INT}, ["input_tokens"]),
    "Response": _obj({
        "id": _STR, "object": {"const": "response"}, "created_at": _INT,
        "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]}, "model": _STR,
        "output": _arr({"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["message", "function_call", "reasoning"]}}}),
        "usage": {"type": ["object", "null"]}, "incomplete_details": {"type": ["object", "null"]},
        "previous_response_id": _NULLABLE_STR},
        ["id", "object", "created_at", "status", "model", "output"]),
    "ResponseDeleted": _obj({"id": _STR, "object": {"const": "response.deleted"}, "deleted": _BOOL},
                            ["id", "object", "deleted"]),
    "ResponseInputTokens": _obj({"object": _STR, "input_tokens": _NN_INT}, ["input_tokens"]),
    "Rerank": _obj({"id": _STR, "object": {"const": "list"}, "model": _STR, "results": _arr(_obj({
        "index": _NN_INT, "relevance_score": _NUM, "document": _obj({"text": _STR}, ["text"])},
        ["index", "relevance_score"])), "usage": _obj({"prompt_tokens": _NN_INT, "total_tokens": _NN_INT})},
        ["results"]),
}
_OLLAMA_FINAL = {"model": _STR, "created_at": _STR, "done": _BOOL, "done_reason": _STR,
                 "total_duration": _NN_INT, "load_duration": _NN_INT, "prompt_eval_count": _NN_INT,
                 "prompt_eval_duration": _NN_INT, "eval_count": _NN_INT, "eval_duration": _NN_INT}
SCHEMAS["OllamaGenerate"] = _obj({**_OLLAMA_FINAL, "response": _STR, "context": _arr(_INT)},
                                 ["model", "created_at", "response", "done"])
SCHEMAS["OllamaChat"] = _obj({**_OLLAMA_FINAL, "message": _obj({
    "role": {"const": "assistant"}, "content": _STR, "thinking": _STR,
    "tool_calls": _arr(_obj({"function": _obj({"name": _STR, "arguments": {"type": "object"}},
                                              ["name", "arguments"])}, ["function"]))}, ["role", "content"])},
    ["model", "created_at", "message", "done"])

# ---------------------------------------------------------------- request bodies

_STOP = {"anyOf": [_STR, _arr(_STR, maxItems=256)]}
_BEAMS = {
    "num_beams": {"type": "integer", "minimum": 1, "maximum": 16,
                  "description": "> 1: beam search of that width (needs as many free slots; not streamed)"},
    "length_penalty": {"type": "number", "minimum": -10, "maximum": 10,
                       "description": "beam score = sum of token logprobs / length ** length_penalty"},
    "early_stopping": {"type": "boolean", "description": "end the search once num_beams sequences have finished"}}
_NATIVE = {
    "prompt": _STR, "memory": _STR,
    "max_length": {"type": "integer", "minimum": 1, "description": "tokens to generate (capped to the context)"},
    "max_context_length": {"type": "integer", "minimum": 1, "description": "capped to the server's context"},
    "temperature": {"type": "number", "minimum": 0}, "top_k": _NN_INT, "top_p": _UNIT,
    "top_a": {"type": "number", "minimum": 0}, "min_p": _UNIT, "typical": _UNIT, "tfs": _UNIT,
    "nsigma": {"type": "number", "minimum": 0},
    "rep_pen": _NUM, "rep_pen_range": _NN_INT, "rep_pen_slope": {"type": "number", "minimum": 0},
    "presence_penalty": _PENALTY, "frequency_penalty": _PENALTY,
    "sampler_order": _arr({"type": "integer", "minimum": 0, "maximum": 6}, maxItems=7),
    "mirostat": {"enum": [0, 1, 2]}, "mirostat_tau": {"type": "number", "minimum": 0},
    "mirostat_eta": {"type": "number", "minimum": 0},
    "dynatemp_range": {"type": "number", "minimum": 0}, "dynatemp_exponent": {"type": "number", "minimum": 0},
    "smoothing_factor": {"type": "number", "minimum": 0}, "smoothing_curve": {"type": "number", "minimum": 0},
    "dry_multiplier": {"type": "number", "minimum": 0}, "dry_base": {"type": "number", "minimum": 1},
    "dry_allowed_length": _NN_INT, "dry_penalty_last_n": {"type": "integer", "minimum": -1},
    "dry_sequence_breakers": _arr(_STR, maxItems=128),
    "xtc_threshold": _UNIT, "xtc_probability": _UNIT,
    "sampler_seed": {"type": "integer", "description": "-1 = random"},
    "grammar": {"type": "string", "description": "GBNF, or a JSON schema as text"},
    "logit_bias": _LOGIT_BIAS, "custom_token_bans": {"type": "string", "description": "comma-separated token ids"},
    "banned_tokens": _arr(_STR, maxItems=768), "ban_eos_token": _BOOL, "bypass_eos": _BOOL,
    "stop_sequence": _arr(_STR, maxItems=256), "trim_stop": _BOOL, "render_special": _BOOL,
    "replace_instruct_placeholders": _BOOL, "adapter": _ADAPTER,
    "reasoning_format": {"enum": ["none", "separate", "drop"],
                         "description": "separate: a leading <think> block goes to reasoning_content"},
    "logprobs": {"anyOf": [_BOOL, {"type": "integer", "minimum": 0, "maximum": 20}]},
    "genkey": {"type": "string", "maxLength": 128}, "quiet": _BOOL, **_BEAMS,
    "best_of": {"type": "integer", "minimum": 1, "maximum": 16,
                "description": "candidates generated; the one with the highest mean token logprob is returned "
                               "(not streamed, not with num_beams)"},
}
_GENKEY_BODY = _obj({"genkey": {"type": "string", "maxLength": 128}})

_CONTENT = {"anyOf": [_STR, _arr(_obj({"type": {"const": "text"}, "text": _STR}, ["type", "text"]))]}
# content may be null only on an assistant turn (one that carries tool_calls)
_MESSAGE = {"anyOf": [
    _obj({"role": {"enum": ["system", "developer", "user", "tool", "function"]}, "content": _CONTENT,
          "name": _STR, "tool_call_id": _STR}, ["role", "content"]),
    _obj({"role": {"const": "assistant"}, "content": {"anyOf": [_CONTENT, {"type": "null"}]}, "name": _STR,
          "tool_calls": _arr(_TOOL_CALL)}, ["role"])]}
_TOOL = _obj({"type": {"const": "function"}, "function": _obj({
    "name": {"type": "string", "minLength": 1}, "description": _STR,
    "parameters": {"type": "object", "description": "JSON schema of the arguments"}}, ["name"])},
    ["type", "function"])
_RESPONSE_FORMAT = {"anyOf": [
    _obj({"type": {"enum": ["text", "json_object"]}}, ["type"]),
    _obj({"type": {"const": "json_schema"}, "json_schema": _obj({
        "name": _STR, "schema": {"type": "object"}, "strict": {"type": ["boolean", "null"]}})},
        ["type", "json_schema"])]}
_OPENAI_SAMPLING = {
    "model": {"type": "string", "description": "ignored: the loaded model answers"},
    "max_tokens": {"type": "integer", "minimum": 1, "description": "must be below the context size"},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "description": "must be below the context size"},
    "temperature": {"type": "number", "minimum": 0}, "top_p": _UNIT, "top_k": _INT, "min_p": _UNIT,
    "seed": _INT, "presence_penalty": _PENALTY, "frequency_penalty": _PENALTY, "stop": _STOP,
    "n": {"type": "integer", "minimum": 1, "maximum": 16}, "stream": _BOOL,
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": _BOOL}},
    "logit_bias": _LOGIT_BIAS, "response_format": _RESPONSE_FORMAT, "user": _STR, "adapter": _ADAPTER,
    "best_of": {"type": "integer", "minimum": 1, "description": "candidates per prompt (>= n); the n with the "
                "highest mean token logprob are returned; not streamed"}, **_BEAMS,
}
_CHAT_BODY = _obj({
    "messages": _arr(_MESSAGE, minItems=1), **_OPENAI_SAMPLING,
    "logprobs": _BOOL, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "tools": _arr(_TOOL),
    "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]},
                              _obj({"type": {"const": "function"}, "function": _obj({"name": _STR}, ["name"])},
                                   ["function"])]},
    "continue_assistant_turn": _BOOL, "parallel_tool_calls": _BOOL,
    "reasoning_effort": {"enum": ["none", "minimal", "low", "medium", "high", None]},
    "chat_template_kwargs": {"type": ["object", "null"], "description": "variables for the model's template (--jinja)"},
    "reasoning_format": {"enum": ["separate", "auto", "deepseek", "none", "raw", "drop", "hidden", None]}},
    ["messages"], description="Every native KoboldCpp sampler field is accepted too.")
_PROMPT = {"anyOf": [_STR, _arr(_STR, minItems=1), _TOKEN_IDS, _arr(_TOKEN_IDS, minItems=1)]}
_COMPLETION_BODY = _obj({
    "prompt": _PROMPT, **_OPENAI_SAMPLING,
    "n": {"type": "integer", "minimum": 1, "maximum": 16, "description": "prompts x n is at most 16"},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}, "echo": _BOOL, "suffix": _NULLABLE_STR,
    "memory": _STR},
    description="Every native KoboldCpp sampler field is accepted too.")
_EMBEDDINGS_BODY = _obj({
    "input": {"anyOf": [_STR, _arr(_STR, minItems=1, maxItems=2048), _TOKEN_IDS,
                        _arr(_TOKEN_IDS, minItems=1, maxItems=2048)]},
    "model": _STR, "encoding_format": {"enum": ["float", "base64"]}, "dimensions": {"type": "integer", "minimum": 1},
    "truncate": {"type": "boolean", "description": "cut inputs longer than the context (default true)"},
    "user": _STR}, ["input"])
_EDIT_BODY = _obj({"instruction": {"type": "string", "minLength": 1}, "input": _STR,
                   **{k: v for k, v in _OPENAI_SAMPLING.items() if k != "stream"}}, ["instruction"])
_MODERATION_BODY = _obj({"input": {"anyOf": [_STR, _arr(_STR, minItems=1)]}, "model": _STR}, ["input"])
_IMAGES_BODY = _obj({"prompt": {"type": "string", "minLength": 1}, "n": {"type": "integer", "minimum": 1,
                                                                        "maximum": 10},
                     "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$", "description": "64-2048 each side"},
                     "response_format": {"const": "b64_json"}, "negative_prompt": _STR, "steps": _INT,
                     "cfg_scale": _NUM, "seed": _INT}, ["prompt"])
_OLLAMA_OPTIONS = _obj({
    "num_predict": {"type": "integer", "description": "tokens to generate; 0 or less = the server's default"},
    "temperature": {"type": "number", "minimum": 0}, "top_k": _INT, "top_p": _UNIT, "min_p": _UNIT,
    "seed": _INT, "presence_penalty": _PENALTY, "frequency_penalty": _PENALTY, "repeat_penalty": _NUM,
    "repeat_last_n": _NN_INT, "typical_p": _UNIT, "mirostat": {"enum": [0, 1, 2]},
    "mirostat_tau": {"type": "number", "minimum": 0}, "mirostat_eta": {"type": "number", "minimum": 0},
    "stop": _STOP})
_OLLAMA_COMMON = {"model": _STR, "stream": {"type": "boolean", "description": "default true (NDJSON)"},
                  "format": {"anyOf": [{"enum": ["json", ""]}, {"type": "object", "description": "JSON schema"}]},
                  "options": _OLLAMA_OPTIONS, "keep_alive": {"type": ["string", "number"]}, "adapter": _ADAPTER}
_OLLAMA_GENERATE_BODY = _obj({"prompt": _STR, "system": _STR, "raw": _BOOL, "context": _arr(_TOKEN_ID),
                              **_OLLAMA_COMMON})
_OLLAMA_CHAT_BODY = _obj({"messages": _arr(_obj({
    "role": {"enum": ["system", "user", "assistant", "tool"]}, "content": _STR,
    "tool_calls": _arr(_obj({"function": _obj({"name": _STR, "arguments": {"type": "object"}}, ["name"])},
                            ["function"]))}, ["role", "content"]), minItems=1),
    "tools": _arr(_TOOL), "think": {"anyOf": [_BOOL, {"enum": ["low", "medium", "high"]}]}, **_OLLAMA_COMMON},
    ["messages"])

_OLLAMA_MODEL = {"model": _STR, "name": {"type": "string", "description": "older name of 'model'"}}
_OLLAMA_SHOW_BODY = _obj({**_OLLAMA_MODEL, "verbose": _BOOL})
_OLLAMA_EMBED_BODY = _obj({**_OLLAMA_MODEL, "input": {"anyOf": [_STR, _arr(_STR, maxItems=2048)]},
                           "truncate": {"type": "boolean", "description": "cut inputs longer than the context "
                                                                          "(default true)"},
                           "dimensions": {"type": "integer", "minimum": 1}, "options": {"type": "object"},
                           "keep_alive": {"type": ["string", "number"]}})
_OLLAMA_EMBEDDINGS_BODY = _obj({**_OLLAMA_MODEL, "prompt": _STR, "options": {"type": "object"},
                                "keep_alive": {"type": ["string", "number"]}})
_INFILL_BODY = _obj({
    "input_prefix": _STR, "input_suffix": _STR,
    "input_extra": _arr(_obj({"filename": _STR, "text": _STR}, ["text"]), maxItems=256),
    "prompt": {"type": "string", "description": "the start of the middle, continued by the model"},
    "n_predict": {"type": "integer", "description": "tokens to generate; unset or -1: the server's default"},
    "stop": _STOP, "stream": _BOOL, "temperature": {"type": "number", "minimum": 0}, "top_k": _INT,
    "top_p": _UNIT, "min_p": _UNIT, "seed": _INT},
    description="Every native KoboldCpp sampler field is accepted too.")
_RERANK_BODY = _obj({
    "model": _STR, "query": {"type": "string", "minLength": 1},
    "documents": _arr({"anyOf": [_STR, _obj({"text": _STR}, ["text"])]}, minItems=1, maxItems=1024),
    "top_n": {"type": "integer", "minimum": 1}, "return_documents": _BOOL}, ["query", "documents"])

_A_TEXT = _obj({"type": {"const": "text"}, "text": _STR}, ["type", "text"])
_A_BLOCK = {"anyOf": [
    _A_TEXT,
    _obj({"type": {"const": "tool_use"}, "id": _STR, "name": {"type": "string", "minLength": 1},
          "input": {"type": "object"}}, ["type", "id", "name"]),
    _obj({"type": {"const": "tool_result"}, "tool_use_id": _STR,
          "content": {"anyOf": [_STR, _arr(_A_TEXT)]}, "is_error": _BOOL}, ["type", "tool_use_id"]),
    _obj({"type": {"enum": ["thinking", "redacted_thinking"]}}, ["type"])]}
_ANTHROPIC_BODY = _obj({
    "model": _STR, "max_tokens": {"type": "integer", "minimum": 1, "description": "required; an upper bound (capped to "
                                                                    "what the context leaves after the prompt)"},
    "system": {"anyOf": [_STR, _arr(_A_TEXT)]},
    "messages": _arr(_obj({"role": {"enum": ["user", "assistant"]},
                           "content": {"anyOf": [_STR, _arr(_A_BLOCK)]}}, ["role", "content"]), minItems=1),
    "tools": _arr(_obj({"name": {"type": "string", "minLength": 1}, "description": _STR,
                        "input_schema": {"type": "object"}}, ["name"])),
    "tool_choice": _obj({"type": {"enum": ["auto", "any", "tool", "none"]}, "name": _STR,
                         "disable_parallel_tool_use": _BOOL}, ["type"]),
    "stop_sequences": _arr(_STR, maxItems=256), "stream": _BOOL,
    "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "top_p": _UNIT, "top_k": _NN_INT,
    "thinking": _obj({"type": {"enum": ["enabled", "disabled", "adaptive", "between_tools"]},
                      "budget_tokens": {"type": "integer", "minimum": 1}}, ["type"]),
    "output_config": _obj({"effort": {"enum": ["low", "medium", "high", "xhigh", "max"]},
                           "format": _obj({"type": {"const": "json_schema"}, "schema": {"type": "object"}},
                                          ["type", "schema"])}),
    "metadata": {"type": "object"}}, ["max_tokens", "messages"])
_ANTHROPIC_COUNT_BODY = {**_ANTHROPIC_BODY, "required": ["messages"]}
_R_PART = _obj({"type": {"enum": ["input_text", "output_text", "text"]}, "text": _STR}, ["type", "text"])
_R_ITEM = {"anyOf": [
    _obj({"type": {"const": "message"}, "role": {"enum": ["user", "system", "developer", "assistant"]},
          "content": {"anyOf": [_STR, _arr(_R_PART)]}}, ["role", "content"]),
    _obj({"type": {"const": "function_call"}, "call_id": _STR, "name": {"type": "string", "minLength": 1},
          "arguments": {"type": "string", "description": "JSON text"}}, ["type", "call_id", "name"]),
    _obj({"type": {"const": "function_call_output"}, "call_id": _STR, "output": {"anyOf": [_STR, _arr(_R_PART)]}},
         ["type", "call_id"]),
    _obj({"type": {"const": "reasoning"}}, ["type"])]}
_RESPONSES_BODY = _obj({
    "model": _STR, "input": {"anyOf": [_STR, _arr(_R_ITEM, minItems=1)]}, "instructions": _STR,
    "max_output_tokens": {"type": "integer", "minimum": 1, "description": "an upper bound (capped to what the "
                                                                          "context leaves after the prompt)"},
    "temperature": {"type": "number", "minimum": 0}, "top_p": _UNIT, "stream": _BOOL, "store": _BOOL,
    "previous_response_id": _STR,
    "tools": _arr(_obj({"type": {"const": "function"}, "name": {"type": "string", "minLength": 1},
                        "description": _STR, "parameters": {"type": "object"}, "strict": _BOOL},
                       ["type", "name"])),
    "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]},
                              _obj({"type": {"const": "function"}, "name": _STR}, ["type", "name"])]},
    "parallel_tool_calls": _BOOL, "metadata": {"type": "object"},
    "text": _obj({"format": _obj({"type": {"enum": ["text", "json_object", "json_schema"]}, "name": _STR,
                                  "schema": {"type": "object"}}, ["type"])}),
    "reasoning": _obj({"effort": {"enum": ["none", "minimal", "low", "medium", "high", "xhigh"]},
                       "summary": _NULLABLE_STR})}, ["input"])

BODIES = {
    "/v1/messages": _ANTHROPIC_BODY,
    "/v1/messages/count_tokens": _ANTHROPIC_COUNT_BODY,
    "/v1/responses": _RESPONSES_BODY,
    "/responses": _RESPONSES_BODY,
    "/v1/responses/input_tokens": _RESPONSES_BODY,
    "/api/show": _OLLAMA_SHOW_BODY,
    "/api/embed": _OLLAMA_EMBED_BODY,
    "/api/embeddings": _OLLAMA_EMBEDDINGS_BODY,
    "/infill": _INFILL_BODY,
    "/v1/rerank": _RERANK_BODY,
    "/v1/chat/completions": _CHAT_BODY,
    "/v1/completions": _COMPLETION_BODY,
    "/v1/embeddings": _EMBEDDINGS_BODY,
    "/v1/edits": _EDIT_BODY,
    "/v1/moderations": _MODERATION_BODY,
    "/v1/images/generations": _IMAGES_BODY,
    "/api/v1/generate": _obj(_NATIVE, description="Unknown fields are ignored; out-of-range samplers are clamped."),
    "/api/extra/generate/check": _GENKEY_BODY,
    "/api/extra/abort": _GENKEY_BODY,
    "/api/extra/last_logprobs": _GENKEY_BODY,
    "/api/extra/tokencount": _obj({"prompt": _STR, "special": {"type": "boolean", "description": "default true"}}),
    "/api/extra/detokenize": _obj({"ids": _arr(_TOKEN_ID, description="ids below the vocabulary size"),
                                   "special": _BOOL}),
    "/api/extra/json_to_grammar": _obj({"schema": {"anyOf": [{"type": "object"}, {"type": "string"}]}},
                                       description="{\"schema\": {...}} or the schema itself"),
    "/api/generate": _OLLAMA_GENERATE_BODY,
    "/api/chat": _OLLAMA_CHAT_BODY,
}
_MODEL_NAME = {"type": "string", "description": "a model id from /v1/models, its file stem or file name"}
BODIES["/models/load"] = BODIES["/models/unload"] = _obj({"model": _MODEL_NAME}, ["model"])
BODIES["/v1/internal/model/load"] = _obj({"model_name": _MODEL_NAME}, ["model_name"])
BODIES["/api/admin/reload_config"] = _obj({"filename": _MODEL_NAME}, ["filename"])
BODIES["/chat/completions"] = BODIES["/v1/chat/completions"]
for _p in ("/v1/completion", "/completions", "/v1/engines/{engine}/generate", "/v1/engines/{engine}/completions"):
    BODIES[_p] = BODIES["/v1/completions"]
BODIES["/v1/engines/{engine}/embeddings"] = BODIES["/api/extra/embeddings"] = BODIES["/v1/embeddings"]
BODIES["/api/extra/generate/stream"] = BODIES["/api/v1/generate"]
BODIES["/api/extra/tokenize"] = BODIES["/api/extra/tokencount"]
BODIES["/images/generations"] = BODIES["/v1/images/generations"]
for _p in ("/rerank", "/v1/reranking", "/reranking"):
    BODIES[_p] = BODIES["/v1/rerank"]

# ---------------------------------------------------------------- 200 replies: path -> {media type: schema}

_JSON = "application/json"
_HTML = {"text/html": {"type": "string"}}
_FINISH = {"enum": ["stop", "length", "tool_calls", "content_filter", "function_call", None]}


def _sse(data_schema: dict, description: str, event: str | None = None, done: bool = False) -> dict:
    """One server-sent event (OpenAPI 3.1 convention: the schema of an event stream describes each event);
    `data` is JSON text described by contentSchema, or the terminating [DONE]."""
    data = {"type": "string", "contentMediaType": _JSON, "contentSchema": data_schema}
    if done:  # if/else rather than anyOf, so a bad chunk is reported field by field
        data = {"type": "string", "if": {"const": "[DONE]"}, "else": data}
    props = {"data": data}
    if event:
        props["event"] = {"const": event}
    return _obj(props, ["data"], description=description)


def _or_error(schema: dict) -> dict:
    return {"if": {"type": "object", "required": ["error"]}, "then": _STREAM_ERROR, "else": schema}


_STREAM_ERROR = _obj({"error": SCHEMAS["OpenAIError"]["properties"]["error"]}, ["error"],
                     description="a generation that fails mid-stream")
SCHEMAS["ChatCompletionChunk"] = _obj({
    "id": _STR, "object": {"const": "chat.completion.chunk"}, "created": _INT, "model": _STR,
    "system_fingerprint": _STR,
    "choices": _arr(_obj({
        "index": _NN_INT,
        "delta": _obj({"role": {"const": "assistant"}, "content": _NULLABLE_STR, "refusal": _NULLABLE_STR,
                       "reasoning_content": _STR,
                       "tool_calls": _arr(_obj({"index": _NN_INT, "id": _STR, "type": {"const": "function"},
                                                "function": _obj({"name": _STR, "arguments": _STR})},
                                               ["index"]))}),
        "logprobs": SCHEMAS["ChatCompletion"]["properties"]["choices"]["items"]["properties"]["logprobs"],
        "finish_reason": _FINISH}, ["index", "delta"])),
    "usage": {"anyOf": [{"type": "null"}, _USAGE]}}, ["id", "object", "created", "model", "choices"])
SCHEMAS["TextCompletionChunk"] = _obj({
    "id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR,
    "system_fingerprint": _STR,
    "choices": _arr(_obj({"index": _NN_INT, "text": _STR, "finish_reason": _FINISH,
                          "logprobs": {"anyOf": [{"type": "null"}, _COMPLETION_LOGPROBS]}}, ["index", "text"])),
    "usage": {"anyOf": [{"type": "null"}, _USAGE]}}, ["id", "object", "created", "model", "choices"])
SCHEMAS["KoboldStreamEvent"] = _sse(
    _obj({"token": _STR, "finish_reason": {"enum": ["stop", "length", None]}, "reasoning_content": _STR},
         ["token", "finish_reason"]),
    "event: message; the last event has finish_reason set", event="message")
SCHEMAS["ChatCompletionEvent"] = _sse(_or_error(_ref("ChatCompletionChunk")),
                                      "with stream: true; data: [DONE] ends the stream", done=True)
SCHEMAS["TextCompletionEvent"] = _sse(_or_error(_ref("TextCompletionChunk")),
                                      "with stream: true; data: [DONE] ends the stream", done=True)
_CHAT_REPLY = {_JSON: _ref("ChatCompletion"), "text/event-stream": _ref("ChatCompletionEvent")}
_COMPLETION_REPLY = {_JSON: _ref("TextCompletion"), "text/event-stream": _ref("TextCompletionEvent")}
_NDJSON = {"type": "string", "description": "with stream true (the default): one JSON object per line, the "
                                            "last with done: true (or {\"error\": str} if generation fails)"}

REPLIES = {
    "/api/v1/generate": {_JSON: _ref("GenerateResponse")},
    "/api/extra/generate/stream": {"text/event-stream": _ref("KoboldStreamEvent")},
    "/api/extra/generate/check": {_JSON: _ref("CheckResponse")},
    "/api/extra/abort": {_JSON: _ref("AbortResponse")},
    "/api/extra/last_logprobs": {_JSON: _ref("LastLogprobs")},
    "/api/v1/model": {_JSON: _ref("Result")},
    "/api/v1/info/version": {_JSON: _ref("Result")},
    "/api/v1/config/max_context_length": {_JSON: _ref("IntValue")},
    "/api/v1/config/max_length": {_JSON: _ref("IntValue")},
    "/api/extra/true_max_context_length": {_JSON: _ref("IntValue")},
    "/api/v1/config/soft_prompt": {_JSON: _ref("StrValue")},
    "/api/v1/config/soft_prompts_list": {_JSON: _ref("Values")},
    "/api/extra/version": {_JSON: _ref("Version")},
    "/api/extra/perf": {_JSON: _ref("Perf")},
    "/api/extra/tokencount": {_JSON: _ref("TokenCount")},
    "/api/extra/tokenize": {_JSON: _ref("TokenCount")},
    "/api/extra/detokenize": {_JSON: _ref("Detokenized")},
    "/api/extra/json_to_grammar": {_JSON: _ref("Grammar")},
    "/api/extra/preloadstory": {_JSON: {"type": "object", "description": "the story JSON, or {} when none"}},
    "/api/extra/embeddings": {_JSON: _ref("Embeddings")},
    "/ping": {_JSON: _ref("Health")},
    "/health": {_JSON: _ref("HealthDetail")},
    "/slots": {_JSON: _ref("Slots")},
    "/props": {_JSON: _ref("Props")},
    "/metrics": {"text/plain": {"type": "string", "description": "Prometheus text exposition format 0.0.4"}},
    "/": _HTML, "/klite": _HTML, "/api": _HTML,
    "/api/openapi.json": {_JSON: _ref("OpenAPIDocument")},
    "/v1/chat/completions": _CHAT_REPLY, "/chat/completions": _CHAT_REPLY,
    "/v1/completions": _COMPLETION_REPLY, "/v1/completion": _COMPLETION_REPLY, "/completions": _COMPLETION_REPLY,
    "/v1/engines/{engine}/generate": _COMPLETION_REPLY, "/v1/engines/{engine}/completions": _COMPLETION_REPLY,
    "/v1/models": {_JSON: _ref("ModelList")}, "/models": {_JSON: _ref("ModelList")},
    "/v1/models/{model}": {_JSON: _ref("Model")},
    "/v1/engines": {_JSON: _ref("EngineList")}, "/v1/engines/{engine}": {_JSON: _ref("Engine")},
    "/v1/embeddings": {_JSON: _ref("Embeddings")}, "/v1/engines/{engine}/embeddings": {_JSON: _ref("Embeddings")},
    "/v1/edits": {_JSON: _ref("Edit")},
    "/v1/moderations": {_JSON: _ref("Moderation")},
    "/v1/images/generations": {_JSON: _ref("Images")}, "/images/generations": {_JSON: _ref("Images")},
    "/api/tags": {_JSON: _ref("OllamaTags")}, "/api/ps": {_JSON: _ref("OllamaPs")},
    "/api/show": {_JSON: _ref("OllamaShow")}, "/api/embed": {_JSON: _ref("OllamaEmbed")},
    "/api/embeddings": {_JSON: _ref("OllamaEmbedding")},
    "/infill": {_JSON: _ref("Infill"), "text/event-stream": _sse(
        _obj({"content": _STR, "stop": _BOOL}, ["content", "stop"]),
        "with stream: true; the last event has stop: true")},
    **{p: {_JSON: _ref("Rerank")} for p in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking")},
    "/v1/messages": {_JSON: _ref("AnthropicMessage"), "text/event-stream": _sse(
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": [
            "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
            "message_stop", "ping", "error"]}}},
        "with stream: true; `event:` names the data's type", event=None)},
    "/v1/messages/count_tokens": {_JSON: _ref("AnthropicTokenCount")},
    **{p: {_JSON: _ref("Response"), "text/event-stream": _sse(
        {"type": "object", "required": ["type", "sequence_number"],
         "properties": {"type": _STR, "sequence_number": _NN_INT}},
        "with stream: true; response.created ... response.completed (or response.incomplete)")}
       for p in ("/v1/responses", "/responses")},
    "/v1/responses/input_tokens": {_JSON: _ref("ResponseInputTokens")},
    "/v1/responses/{response_id}": {_JSON: {"anyOf": [_ref("Response"), _ref("ResponseDeleted")]}},
    "/api/version": {_JSON: _ref("OllamaVersion")},
    "/models/load": {_JSON: _obj({"success": _BOOL, "model": _STR})},
    "/api/admin/reload_config": {_JSON: _obj({"success": _BOOL, "model": _STR})},
    "/models/unload": {_JSON: _obj({"success": _BOOL, "unloaded": _BOOL})},
    "/v1/internal/model/load": {_JSON: {"const": "OK"}},
    "/api/admin/list_options": {_JSON: _arr(_STR)},
    "/api/generate": {_JSON: dict(_ref("OllamaGenerate"), description="with stream: false"),
                      "application/x-ndjson": _NDJSON},
    "/api/chat": {_JSON: dict(_ref("OllamaChat"), description="with stream: false"),
                  "application/x-ndjson": _NDJSON},
}

# routes that queue a generation: 503 when the queue is full
_GENERATING = {"/api/v1/generate", "/api/extra/generate/stream", "/v1/chat/completions", "/chat/completions",
               "/v1/completions", "/v1/completion", "/completions", "/v1/engines/{engine}/generate",
               "/v1/engines/{engine}/completions", "/v1/edits", "/api/generate", "/api/chat", "/infill",
               "/v1/messages", "/v1/responses", "/responses"}
_NEEDS_MODEL = {"/v1/rerank", "/rerank", "/v1/reranking", "/reranking"}  # 501 without --rerankmodel
_ERROR_SCHEMA = {"openai": "OpenAIError", "ollama": "OllamaError", "kobold": "KoboldError",
                 "anthropic": "AnthropicError"}
# routes that load models: the admin key, and a model that cannot load
_ADMIN = {"/models/load", "/models/unload", "/v1/internal/model/load", "/api/admin/list_options",
          "/api/admin/reload_config", "/v1/engines/{engine}"}
_ERROR_TEXT = {400: "invalid body or parameter", 401: "missing or wrong API key (--password)",
               404: "no such route", 405: "method not allowed on this path (the Allow header lists the right ones)",
               403: "loading models through the API is off (no --adminpassword or --password)",
               413: "body larger than --maxrequestsize", 501: "not configured", 502: "the upstream server failed",
               503: "the request queue is full (retry later), the model it names could not load, or (/health, "
                    "/slots with fail_on_no_slot) no slot is idle"}


def _error(status: int, dialect: str) -> dict:
    return {"$ref": f"#/components/responses/{_ERROR_SCHEMA.get(dialect, 'KoboldError')}{status}"}


def _error_responses() -> dict:
    out = {}
    for schema in _ERROR_SCHEMA.values():
        for status, text in _ERROR_TEXT.items():
            out[f"{schema}{status}"] = {"description": text, "content": {_JSON: {"schema": _ref(schema)}}}
    return out


def _slug(method: str, path: str) -> str:
    return method.lower() + path.replace("/", "_").replace("{", "").replace("}", "")


def build(routes: Iterable[Tuple[str, str, bool, str]], version: str, title: str = "KoboldCpp-compatible server") -> dict:
    """routes: (METHOD, path, needs_auth, dialect)."""
    paths: dict = {}
    for method, path, auth, dialect in sorted(set(routes), key=lambda r: (r[1], r[0])):
        tag, summary = DESCRIPTIONS.get(path, ("Other", f"{method} {path}"))
        reply = REPLIES.get(path, {_JSON: {"type": "object"}})
        op = {"tags": [tag], "summary": summary, "operationId": _slug(method, path),
              "responses": {"200": {"description": "OK",
                                    "content": {mt: {"schema": s} for mt, s in reply.items()}}}}
        # an id in the path is echoed nowhere: any model/engine name answers with the loaded model
        params = [{"name": n, "in": "path", "required": True,
                   "schema": {"type": "string", "pattern": "^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$"}}
                  for n in ("model", "engine", "response_id") if "{" + n + "}" in path]
        if params:
            op["parameters"] = params
        codes = [404, 405]  # (GET /v1/responses/{id}: an unknown id is a 404 too)
        if method in ("POST", "PUT", "PATCH"):
            body = BODIES.get(path, {"type": "object"})
            # no body reads as {}: only a body with required fields must be sent
            op["requestBody"] = {"required": bool(body.get("required")), "content": {_JSON: {"schema": body}}}
            codes += [400, 413]
        if auth:
            op["security"] = [{"bearer": []}]
            codes.append(401)
        if path in _GENERATING or path in ("/health", "/slots"):
            codes.append(503)
        if path in _ADMIN:
            op["security"] = [{"bearer": []}]
            codes += [401, 403, 503]
        if "images/generations" in path:
            codes += [501, 502]
        if path in _NEEDS_MODEL:
            codes.append(501)
        for c in sorted(set(codes)):
            op["responses"][str(c)] = _error(c, dialect)
        if path in ("/health", "/slots"):  # llama-server's unavailable shape, not the dialect's error
            op["responses"]["503"] = {"description": "loading, or no idle slot with fail_on_no_slot",
                                      "content": {_JSON: {"schema": _ref("Unavailable")}}}
        paths.setdefault(path, {})[method.lower()] = op
    return copy.deepcopy({"openapi": "3.1.0",
            "info": {"title": title, "version": version,
                     "description": "KoboldCpp native API, an OpenAI-compatible API under /v1 (Chat Completions and "
                                    "Responses), Anthropic Messages, Ollama routes, fill-in-the-middle and "
                                    "reranking."},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                           "schemas": SCHEMAS, "responses": _error_responses()},
            "paths": paths})  # callers get no references into the module's tables


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
