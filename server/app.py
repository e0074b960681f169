"""The server object: its state and its route table, built by one function. No module-level mutable state."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from adapters import kobold
from adapters.chat import Context
from adapters.errors import ApiError
from adapters.responses import ResponseStore

from . import (routes_anthropic, routes_extra, routes_kobold, routes_models, routes_ollama, routes_openai,
               routes_ops, routes_responses, routes_static)
from .http import RouteTable, Server, Server6
from .ops import RequestMetrics

KOBOLD_API_VERSION = "1.104"  # the KoboldCpp API level we report; Lite and SillyTavern gate features on it


@dataclass
class Served:
    """One loaded model as routes see it (the value a ModelManager holds per loaded model)."""
    engine: object
    model_name: str
    chat: Context
    defaults: kobold.GenDefaults


_PER_MODEL = frozenset(("engine", "chat", "defaults"))


@dataclass
class ServerState:
    engine: object  # gguf_loader.engine.Engine
    model_name: str  # "koboldcpp/<name>"
    password: Optional[str]
    max_body: int  # bytes
    quiet: bool  # never log prompt text
    defaults: kobold.GenDefaults  # native requests' fallbacks (and the adapter's tags for placeholders)
    chat: Context  # the chat dialects' settings
    program_version: str
    preloadstory: object = None
    sdurl: Optional[str] = None  # Automatic1111 server for /v1/images/generations
    api_version: str = KOBOLD_API_VERSION
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses kept for previous_response_id
    # Several models (--modeldir, or any run with the model set): engine/chat/defaults then name the model this
    # request runs on, leased on first use for the rest of the request (see serve()).
    models: object = None  # gguf_loader.models.ModelManager whose values are Served
    admin_password: Optional[str] = None  # load/unload routes; None: --password, and with neither they are off
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __getattribute__(self, name):
        if name in _PER_MODEL and object.__getattribute__(self, "models") is not None:
            return getattr(object.__getattribute__(self, "served")(), name)
        if name == "model_name" and object.__getattribute__(self, "models") is not None:
            lease = getattr(object.__getattribute__(self, "_local"), "lease", None)
            return lease.value.model_name if lease is not None else self.models.current  # no load just to name it
        return object.__getattribute__(self, name)

    def served(self, name=None, waiting=None) -> Served:
        """The model this request runs on. The first call of a request leases it: the model `name` names, else the
        current one (loading it if needed, waiting while it loads); later calls return the same one. `waiting()` is
        called every KEEPALIVE_S while a load is awaited (streams send keep-alives); it may raise to give up."""
        models = object.__getattribute__(self, "models")
        if models is None:
            return Served(self.engine, self.model_name, self.chat, self.defaults)
        loc = object.__getattribute__(self, "_local")
        lease = getattr(loc, "lease", None)
        if lease is None:
            from gguf_loader.models import LoadFailed
            try:
                if waiting is not None and not models.is_loaded(name):
                    lease = _acquire_while(models, name, waiting)
                else:
                    lease = models.acquire(name)
            except LoadFailed as e:
                raise ApiError(str(e), 503, "service_unavailable")
            loc.lease = lease
        return lease.value

    def uses_jinja(self) -> bool:
        """--jinja on the current model, without loading it (status routes that clients poll)."""
        models = object.__getattribute__(self, "models")
        if models is None:
            return bool(self.chat.use_jinja)
        served = models.peek(models.current)
        return bool(served.chat.use_jinja) if served is not None else False

    def chat_for(self, name) -> Context:
        """The chat Context of the model a request's `model` field names (unknown names: the current model)."""
        return self.served(name if isinstance(name, str) else None).chat

    def current_engine(self):
        """The current model's engine when it is loaded, else None; never loads or leases it (status routes that
        clients poll: /health, /slots, /props, /metrics)."""
        models = object.__getattribute__(self, "models")
        if models is None:
            return object.__getattribute__(self, "engine")
        served = models.peek(models.current)
        return served.engine if served is not None else None

    def end_request(self):
        """Release the request's model lease (called once per request, after the reply)."""
        loc = object.__getattribute__(self, "_local")
        lease = getattr(loc, "lease", None)
        if lease is not None:
            loc.lease = None
            lease.release()


KEEPALIVE_S = 2.0


def _acquire_while(models, name, waiting):
    """models.acquire(name) on a helper thread, calling waiting() every KEEPALIVE_S until it returns; a lease that
    arrives after the caller gave up is released at once."""
    box, lock, done = {}, threading.Lock(), threading.Event()

    def run():
        try:
            r = models.acquire(name)
        except Exception as e:  # handed to the caller
            r = e
        with lock:
            if box.get("abandoned") and not isinstance(r, Exception):
                r.release()
            box["result"] = r
        done.set()
    threading.Thread(target=run, name="model-wait", daemon=True).start()
    try:
        while not done.wait(KEEPALIVE_S):
            waiting()
    except BaseException:
        with lock:
            box["abandoned"] = True
            r = box.get("result")
            if r is not None and not isinstance(r, Exception):
                r.release()
        raise
    r = box["result"]
    if isinstance(r, Exception):
        raise r
    return r


def build_routes() -> RouteTable:
    table = RouteTable()
    for group in (routes_kobold, routes_openai, routes_ollama, routes_anthropic, routes_responses, routes_extra,
                  routes_models, routes_ops, routes_static):
        group.register(table)
    _release_after(table)
    return table


def _release_after(table: RouteTable):
    """Every route ends by releasing the model its request leased (streams too: they run inside the route)."""
    def wrap(fn):
        def run(h, *a):
            try:
                return fn(h, *a)
            finally:
                st = h.server.state
                if st is not None:
                    st.end_request()
        return run
    for r in table.exact.values():
        r.fn = wrap(r.fn)
    for _, _, _, r in table.patterns:
        r.fn = wrap(r.fn)
    table.prefixes[:] = [(m, p, wrap(fn), r) for m, p, fn, r in table.prefixes]


def build_server(host: str, port: int, state: Optional[ServerState] = None) -> Server:
    """Binds the port now (so a port in use is reported before a model loads); the state may come later."""
    cls = Server6 if ":" in host else Server
    srv = cls((host, port), state, build_routes())
    srv.metrics = RequestMetrics()
    return srv
