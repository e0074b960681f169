"""The server object: its state and its route table, built by one function. No module-level mutable state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from adapters import kobold
from adapters.chat import Context
from adapters.responses import ResponseStore

from . import (routes_anthropic, routes_extra, routes_kobold, routes_ollama, routes_openai, routes_ops,
               routes_responses, routes_static)
from .http import RouteTable, Server, Server6
from .ops import RequestMetrics

KOBOLD_API_VERSION = "1.104"  # the KoboldCpp API level we report; Lite and SillyTavern gate features on it


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


def build_routes() -> RouteTable:
    table = RouteTable()
    for group in (routes_kobold, routes_openai, routes_ollama, routes_anthropic, routes_responses, routes_extra,
                  routes_ops, routes_static):
        group.register(table)
    return table


def build_server(host: str, port: int, state: Optional[ServerState] = None) -> Server:
    """Binds the port now (so a port in use is reported before a model loads); the state may come later."""
    cls = Server6 if ":" in host else Server
    srv = cls((host, port), state, build_routes())
    srv.metrics = RequestMetrics()
    return srv
