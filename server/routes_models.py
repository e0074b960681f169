"""The model set over HTTP: listings with each offered model's state (OpenAI /v1/models, Ollama /api/tags), and the
load/unload routes of KoboldCpp's admin mode, llama-server's router, text-generation-webui and the OpenAI seed's
/v1/engines/{id}. Load and unload need the admin key (--adminpassword, else --password); with neither they are off."""
from __future__ import annotations

import hmac
import os
from urllib.parse import unquote

from adapters import ollama
from adapters import openai as oa
from adapters.errors import ApiError, BadRequest, NotFound, Unauthorized


def _offered(state):
    """[(id, path, state)] of every offered model."""
    models = state.models
    if models is None:
        return [(state.model_name, getattr(state.engine, "model_path", ""), "loaded")]
    return [(s.id, s.config or s.path, st) for s, st in models.listing()]


def _with_status(card: dict, st: str) -> dict:
    card["status"] = {"value": st}  # llama-server router's field
    return card


def _media_of(state, model_id):
    """A loaded model's media settings (its capabilities), without loading anything."""
    models = state.models
    if models is None:
        return state.chat.media
    for served in models.loaded_values():
        if served.model_name == model_id:
            return served.chat.media
    return None


def openai_models(h):
    h.send_json(200, {"object": "list", "data": [_with_status(oa.model_card(i, _media_of(h.state, i)), st)
                                                 for i, _, st in _offered(h.state)]})


def openai_engines(h):
    data = [dict(oa.engine_card(i), ready=st == "loaded") for i, _, st in _offered(h.state)]
    h.send_json(200, {"object": "list", "data": data})


def ollama_tags(h, loaded_only: bool = False):
    out = []
    for i, path, st in _offered(h.state):
        if loaded_only and st != "loaded":
            continue
        meta = {}
        if st == "loaded" and h.state.models is not None:
            meta = {"general.architecture": _arch(h.state, i)}
        out += ollama.tags(i, path, meta)["models"]
    h.send_json(200, {"models": out})


def _arch(state, model_id):
    for served in state.models.loaded_values():
        if served.model_name == model_id:
            return served.engine.metadata.get("general.architecture", "gguf")
    return "gguf"


# ---------------------------------------------------------------- admin

def _admin(h):
    """The admin key check: 403 when loading through the API is off, 401 for a wrong key."""
    key = h.state.admin_password or h.state.password
    if not key:
        raise ApiError("loading models through the API is off: start the server with --adminpassword (or "
                       "--password)", 403, "forbidden")
    auth = h.headers.get("Authorization") or ""
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode("utf-8", "replace"), key.encode("utf-8", "replace")):
        raise Unauthorized("the admin key is missing or wrong (Authorization: Bearer <--adminpassword>)")
    if h.state.models is None:
        raise ApiError("this server has no model set", 501, "not_implemented")
    return h.state.models


def _name(h, *fields) -> str:
    b = h.json()
    if not isinstance(b, dict):
        raise BadRequest("the body must be a JSON object")
    for f in fields:
        v = b.get(f)
        if isinstance(v, str) and v.strip():
            return v
    raise BadRequest(f"'{fields[0]}' must name a model (see /v1/models)", param=fields[0])


def _load(models, name):
    from gguf_loader.models import LoadFailed, UnknownModel
    try:
        models.load(name).release()
    except UnknownModel as e:
        raise NotFound(str(e))
    except LoadFailed as e:
        raise ApiError(str(e), 503, "service_unavailable")
    return models.find(name)


def load_route(*fields, reply=lambda spec: {"success": True, "model": spec.id}):
    def run(h):
        models = _admin(h)
        spec = _load(models, _name(h, *fields))
        h.send_json(200, reply(spec))
    return run


def unload(h):
    from gguf_loader.models import UnknownModel
    models = _admin(h)
    try:
        was = models.unload(_name(h, "model"))
    except UnknownModel as e:
        raise NotFound(str(e))
    h.send_json(200, {"success": True, "unloaded": was})


def engine_load(h):
    """GET /v1/engines/{id}: the seed's way to load a model. A loaded model answers its card to anyone; loading
    another needs the admin key."""
    name = unquote(h.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
    models = h.state.models
    if models is None:
        h.send_json(200, oa.engine_card(h.state.model_name))
        return
    spec = models.find(name)
    if spec is None:
        raise NotFound(f"no model named {name!r} is offered (see /v1/models)")
    if models.state_of(spec.id) != "loaded":
        _load(_admin(h), name)
    h.send_json(200, oa.engine_card(spec.id))


def list_options(h):
    models = _admin(h)
    h.send_json(200, [os.path.basename(s.config or s.path) for s in models.specs.values()])


def register(t):
    k, o = {"dialect": "kobold"}, {"dialect": "openai"}
    t.add("GET", "/api/admin/list_options", list_options, **k)
    t.add("POST", "/api/admin/reload_config", load_route("filename", "model"), **k)
    t.add("POST", "/models/load", load_route("model"), **o)
    t.add("POST", "/models/unload", unload, **o)
    t.add("POST", "/v1/internal/model/load", load_route("model_name", "model", reply=lambda spec: "OK"), **o)
