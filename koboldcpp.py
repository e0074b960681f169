#!/usr/bin/env python3
"""koboldcpp.py: a local LLM server for GGUF models (KoboldCpp-compatible API, OpenAI API, built-in web page).

This file holds the command line, config files and the HTTP routes; model work lives in gguf_loader/,
API-dialect translation in adapters/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

VERSION = "1.104"  # the KoboldCpp API level we report; Lite and SillyTavern gate features on it
PROGRAM_VERSION = "0.1.0"
DEFAULT_PORT = 5001


def default_threads() -> int:
    # Measured on the 2-core dev machine: 2 threads decode fastest (README, "Threads").
    # On bigger machines llama.cpp's decode is memory-bound; leave one core for the HTTP side.
    n = os.cpu_count() or 1
    return n if n <= 4 else min(n - 1, 16)


class ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit 2, never a usage dump mid-screen
        raise ArgError(message)


def _int_range(lo, hi, name):
    def conv(s):
        try:
            v = int(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {s!r}")
        if v < lo or v > hi:
            raise argparse.ArgumentTypeError(f"{name} must be between {lo} and {hi}, got {v}")
        return v
    return conv


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="koboldcpp.py", description="Serve a GGUF model with KoboldCpp's API, an OpenAI-compatible API and a web page.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_param", nargs="?", default=None, metavar="MODEL",
                   help="GGUF model file (or a .kcpps config file)")
    p.add_argument("--model", "-m", dest="model", default=None, help="GGUF model file")
    p.add_argument("--port", type=_int_range(1, 65535, "--port"), default=DEFAULT_PORT, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; use 0.0.0.0 for every interface")
    p.add_argument("--contextsize", "-c", "--ctx-size", type=_int_range(256, 262144, "--contextsize"), default=8192,
                   help="context size in tokens (capped to the model's trained context)")
    p.add_argument("--threads", "-t", type=_int_range(-1, 512, "--threads"), default=-1,
                   help=f"CPU threads; -1 = auto ({default_threads()} here)")
    p.add_argument("--batchsize", "-b", "--blasbatchsize", type=_int_range(16, 4096, "--batchsize"), default=512,
                   help="prompt tokens processed per step")
    p.add_argument("--gpulayers", "-ngl", type=_int_range(-1, 999, "--gpulayers"), default=0,
                   help="layers to offload to the GPU (needs a GPU build of llama-cpp-python; -1 = all)")
    p.add_argument("--password", default=None, help="API key clients must send as 'Authorization: Bearer KEY'")
    p.add_argument("--multiuser", type=_int_range(0, 100, "--multiuser"), nargs="?", const=1, default=1,
                   help="queue requests while busy: N>1 queues N-1, 1 queues 6, 0 answers busy (503) at once")
    p.add_argument("--parallelrequests", type=_int_range(1, 32, "--parallelrequests"), default=1,
                   help="sequences decoded together (continuous batching)")
    p.add_argument("--defaultgenamt", type=_int_range(16, 8192, "--defaultgenamt"), default=896,
                   help="tokens generated when a request does not say")
    p.add_argument("--noshift", action="store_true", help="disable ContextShift")
    p.add_argument("--nofastforward", action="store_true", help="disable FastForward prompt reuse (implies --noshift)")
    p.add_argument("--flashattention", "-fa", action="store_true", help="use flash attention")
    p.add_argument("--usemmap", action="store_true", help="memory-map the model file")
    p.add_argument("--usemlock", action="store_true", help="lock the model in RAM")
    p.add_argument("--quiet", action="store_true", help="do not log prompts and generated text")
    p.add_argument("--skiplauncher", action="store_true", help="never show the launcher window")
    p.add_argument("--showgui", action="store_true", help="show the launcher window even when a model is given")
    p.add_argument("--launch", action="store_true", help="open the web page in a browser once the server is ready")
    p.add_argument("--config", default=None, metavar="FILE.kcpps", help="load flags from a .kcpps JSON file (command line wins)")
    p.add_argument("--exportconfig", default=None, metavar="FILE", help="write the flags to a .kcpps file and exit")
    p.add_argument("--chatcompletionsadapter", default=None,
                   help="instruct template for chat: a preset name, a JSON file, or AutoGuess (default Alpaca)")
    p.add_argument("--jinja", action="store_true", help="render chat with the model's own jinja chat template")
    p.add_argument("--embeddingsmodel", default=None, help="separate GGUF model for /v1/embeddings")
    p.add_argument("--sdurl", default=None, help="Automatic1111 server for /v1/images/generations (or SD_WEBUI_URL)")
    p.add_argument("--maxrequestsize", type=_int_range(1, 1024, "--maxrequestsize"), default=32, help="request body limit in MB")
    p.add_argument("--preloadstory", default=None, help="story JSON served at /api/extra/preloadstory")
    p.add_argument("--hordemodelname", default=None, help="model name to report instead of the file name")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


# flags whose values are paths or launch modes, never stored in a config
_NOT_EXPORTED = {"exportconfig", "config", "version", "showgui", "skiplauncher"}


def config_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _NOT_EXPORTED}


def _explicit_dests(parser: argparse.ArgumentParser, argv: list) -> set:
    """Which dests the command line set explicitly (so a config file does not override them)."""
    ns = parser.parse_args(argv, namespace=argparse.Namespace(**{a.dest: _UNSET for a in parser._actions}))
    # an absent optional positional (the model) is still set, to None, by argparse
    return {k for k, v in vars(ns).items() if v is not _UNSET and not (k == "model_param" and v is None)}


_UNSET = object()
_CONFIG_ALIASES = {"blasbatchsize": "batchsize", "model_param_alias": "model"}


def load_config_file(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ArgError(f"config file not found: {path}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArgError(f"config file {path} is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise ArgError(f"config file {path} must hold a JSON object of flags")
    return data


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, data: dict, explicit: set, source: str):
    """Set the config's keys over the defaults, except flags given on the command line; values are checked
    with the same converters the command line uses."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in data.items():
        key = _CONFIG_ALIASES.get(key, key)
        if key in _NOT_EXPORTED or key not in actions or key in explicit:
            continue  # unknown keys (other KoboldCpp versions' flags) are ignored
        act = actions[key]
        if isinstance(value, list) and key in ("model", "model_param"):
            value = value[0] if value else None  # KoboldCpp's configs hold model lists (multi-part files)
        if value is None:
            setattr(args, key, act.default)
            continue
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ArgError(f"{source}: '{key}' must be true or false, got {value!r}")
        elif act.type is not None:
            try:
                value = act.type(str(value) if not isinstance(value, str) else value)
            except argparse.ArgumentTypeError as e:
                raise ArgError(f"{source}: {e}")
        elif not isinstance(value, str):
            raise ArgError(f"{source}: '{key}' must be a string, got {value!r}")
        setattr(args, key, value)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (and a --config file). Raises ArgError with one clear line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ArgError:
        raise
    # a positional .kcpps is a config file, as in KoboldCpp
    if args.model_param and args.model_param.lower().endswith((".kcpps", ".kcppt", ".json")) and not args.config:
        args.config, args.model_param = args.model_param, None
    if args.config:
        explicit = _explicit_dests(parser, argv)
        apply_config(parser, args, load_config_file(args.config), explicit, args.config)
    finalize_args(args)
    if args.showgui and args.skiplauncher:
        raise ArgError("--showgui and --skiplauncher cannot be used together")
    return args


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """What every source of settings (command line, config file, launcher) implies after reading."""
    if args.model_param and not args.model:  # KoboldCpp's configs name the model here
        args.model = args.model_param
    args.model_param = None
    if args.nofastforward:
        args.noshift = True  # ContextShift works on top of FastForward
    return args


@dataclass(frozen=True)
class CliHooks:
    """What the launcher window needs from the command line; handed to it so it never imports this file."""
    version: str
    default_threads: Callable[[], int]
    build_parser: Callable[[], argparse.ArgumentParser]
    apply_config: Callable
    load_config_file: Callable[[str], dict]
    export_config: Callable
    finalize: Callable[[argparse.Namespace], argparse.Namespace]
    arg_error: type


def cli_hooks() -> CliHooks:
    return CliHooks(PROGRAM_VERSION, default_threads, build_parser, apply_config, load_config_file, export_config,
                    finalize_args, ArgError)


def export_config(args: argparse.Namespace, path: str):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config_dict(args), f, indent=2)
        f.write("\n")


def has_display() -> bool:
    if sys.platform.startswith("win") or sys.platform == "darwin":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


# =====================================================================================================================
# HTTP server. Routes are registered with @route(method, path); each handler gets the request handler `h` and
# uses its helpers (h.json(), h.send_json(), h.start_sse(), h.write(), h.client_gone(), h.state).
# Data flows one way: route -> adapter (parse, validate) -> engine job -> adapter (shape) -> HTTP.
# =====================================================================================================================

import gzip
import hmac
import mimetypes
import re
import select
import signal
import socket
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field as dc_field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from adapters import kobold
from adapters.errors import (ApiError, BadRequest, Busy, MethodNotAllowed, NotFound, PayloadTooLarge,
                             Unauthorized, error_body)

KOBOLD_UNITED_VERSION = "1.2.5"  # KoboldAI United API level; clients gate stop_sequence and EOS-unban on it
APP_DIR = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parent))
KLITE_DIR = APP_DIR / "klite"
_CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "*"),
    ("Access-Control-Allow-Headers", "*, Accept, Content-Type, Content-Length, Cache-Control, Accept-Encoding, "
                                     "X-CSRF-Token, Client-Agent, X-Fields, Authorization, X-Requested-With, "
                                     "X-HTTP-Method-Override, apikey, genkey"),
    ("Access-Control-Allow-Private-Network", "true"),  # Chrome: public-origin pages calling localhost
)
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                  ".json": "application/json", ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8"}
_DISCONNECT_CHECK_S = 0.25


@dataclass
class Route:
    fn: object
    auth: bool = False
    dialect: str = "kobold"


ROUTES: dict = {}  # (METHOD, path) -> Route


def route(method, path: str, auth: bool = False, dialect: str = "kobold"):
    """Register a handler for METHOD(s) on `path` (exact; also matched as a suffix, as KoboldCpp does).
    auth: needs 'Authorization: Bearer <--password>' when a password is set. dialect: shape of error bodies."""
    methods = [method] if isinstance(method, str) else list(method)

    def deco(fn):
        for m in methods:
            ROUTES[(m.upper(), path)] = Route(fn, auth, dialect)
        return fn
    return deco


@dataclass
class ServerState:
    args: argparse.Namespace
    engine: object
    model_name: str  # "koboldcpp/<name>"
    password: str | None
    max_body: int
    defaults: kobold.GenDefaults
    preloadstory: object = None
    instruct_tags: dict | None = None  # the chat adapter's tags, for Lite's {{[INPUT]}} placeholders
    extra: dict = dc_field(default_factory=dict)  # free room for the OpenAI/Ollama block


STATE: ServerState | None = None


class ClientGone(Exception):
    pass


def log_line(line: str):
    """Print one log line; never fails on a console that cannot show some characters."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        print(line.encode(enc, "replace").decode(enc, "replace"), flush=True)
    except (OSError, ValueError, LookupError):
        pass


def friendly_model_name(args, model_path: str) -> str:
    if args.hordemodelname:
        n = args.hordemodelname
        return n if n.startswith("koboldcpp/") else "koboldcpp/" + n
    base = os.path.splitext(os.path.basename(model_path))[0]
    return "koboldcpp/" + re.sub(r"[^\w.\-]", "_", base)


def normalize_path(raw: str) -> str:
    path = raw.split("?", 1)[0].split("#", 1)[0] or "/"
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    if "/api/latest/" in path + "/":
        path = (path + "/").replace("/api/latest/", "/api/v1/", 1).rstrip("/")
    return path


def resolve_route(method: str, path: str) -> Route:
    r = ROUTES.get((method, path))
    if r:
        return r
    if method == "GET" and path.startswith("/klite/"):
        rel = path[len("/klite/"):]
        return Route(lambda h: r_klite_file(h, rel))
    # KoboldCpp matches most routes by suffix (so a reverse-proxy prefix works); longest registered path wins
    best = None
    for (m, p), cand in ROUTES.items():
        if len(p) > 1 and path.endswith(p) and (best is None or len(p) > len(best[0])):
            if m == method:
                best = (p, cand)
    if best:
        return best[1]
    allowed = sorted({m for (m, p) in ROUTES if p == path or (len(p) > 1 and path.endswith(p))})
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                               extra={"allow": allowed})
    raise NotFound(f"KoboldCpp HTTP Server is running, but this endpoint does not exist: {path}")


class Handler(BaseHTTPRequestHandler):
    server_version = "KoboldCppServer"
    sys_version = ""
    protocol_version = "HTTP/1.1"  # keep-alive for normal replies; streams close the connection
    timeout = 300  # seconds a socket may sit idle (keep-alive, slow uploads) before the thread gives up

    # ---- plumbing ----

    @property
    def state(self) -> ServerState:
        return STATE

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):  # the stdlib's per-request lines are replaced by ours
        pass

    def _cors(self):
        for k, v in _CORS_HEADERS:
            self.send_header(k, v)

    def send_bytes(self, status: int, data: bytes, content_type: str, headers=()):
        self.status_sent = status
        self.send_response(status)
        self._cors()
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def send_json(self, status: int, obj, headers=()):
        self.send_bytes(status, json.dumps(obj).encode("utf-8"), "application/json", headers)

    def send_error_json(self, err: ApiError, dialect: str):
        headers = []
        if isinstance(err, MethodNotAllowed):
            headers.append(("Allow", ", ".join(err.extra.get("allow", []))))
            err.extra = {}
        self.send_json(err.status, error_body(dialect, err), headers)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (malformed request line, unsupported method, ...) as JSON too."""
        self.close_connection = True
        self.status_sent = code
        msg = message or self.responses.get(code, ("error",))[0]
        err = ApiError(msg, status=code, type="bad_input" if 400 <= code < 500 else "server_error")
        try:
            self.send_bytes(code, json.dumps(error_body("kobold", err)).encode(), "application/json")
        except OSError:
            pass
        log_line(f"{self.client_address[0]} {self.command or '-'} {self.path if hasattr(self, 'path') else '-'} {code}")

    def start_sse(self):
        """200 + event-stream headers; the stream ends when we close the socket (HTTP/1.0 style, as KoboldCpp)."""
        from adapters import sse
        self.status_sent = 200
        self.close_connection = True
        self.send_response(200)
        self._cors()
        for k, v in sse.SSE_HEADERS:
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()

    def write(self, data: bytes):
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionError, OSError) as e:
            raise ClientGone() from e

    def client_gone(self) -> bool:
        """True when the client closed its side (readable with no data). Pipelined bytes count as alive."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _read_body(self) -> bytes:
        limit = self.state.max_body
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            for _ in range(100000):
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    self.close_connection = True
                    raise BadRequest("malformed chunked request body")
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                if len(out) + size > limit:
                    raise PayloadTooLarge(self.state.args.maxrequestsize)
                out += self.rfile.read(size)
                self.rfile.readline(8)
            raise BadRequest("too many chunks in request body")
        cl = self.headers.get("Content-Length")
        if not cl:
            return b""
        try:
            n = int(cl)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"invalid Content-Length {cl!r}")
        if n > limit:
            raise PayloadTooLarge(self.state.args.maxrequestsize)
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise BadRequest("request body ended early")
        return data

    def json(self):
        """The body as JSON; an empty body is {}."""
        raw = self.body
        if not raw.strip():
            return {}
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest("Error parsing input: the body is not UTF-8 text")
        except ValueError as e:
            raise BadRequest(f"Error parsing input: {e}")

    def authorized(self) -> bool:
        pw = self.state.password
        if not pw:
            return True
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), pw.encode())

    def _drain(self, seconds: float = 3.0):
        """After refusing a big upload: stop writing, swallow what the client still sends, so it reads our reply
        instead of a connection reset."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            end = time.monotonic() + seconds
            while time.monotonic() < end and self.connection.recv(65536):
                pass
        except OSError:
            pass

    # ---- dispatch ----

    def handle_expect_100(self):
        try:
            if int(self.headers.get("Content-Length") or 0) > self.state.max_body:
                self.close_connection = True
                self.body = b""
                self.send_error_json(PayloadTooLarge(self.state.args.maxrequestsize), "kobold")
                return False
        except ValueError:
            pass
        return super().handle_expect_100()

    def _dispatch(self):
        t0 = time.monotonic()
        self.status_sent = None
        self.log_extra = ""
        self.body = b""
        method = self.command
        path = normalize_path(self.path)
        dialect = "kobold"
        drain = False
        try:
            try:
                self.body = self._read_body()
            except PayloadTooLarge:
                self.close_connection = True
                drain = True
                raise
            if method in ("OPTIONS", "HEAD") and not (method == "HEAD" and (path == "/" or path.startswith("/klite"))):
                self.send_bytes(200, b"", "text/plain")
                return
            if method == "HEAD":
                method = "GET"
            r = resolve_route(method, path)
            dialect = r.dialect
            if r.auth and not self.authorized():
                raise Unauthorized()
            r.fn(self)
        except ApiError as e:
            if self.status_sent is None:
                self.send_error_json(e, dialect)
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True
        except Exception as e:
            print(f"Error handling {self.command} {path}:", file=sys.stderr)
            traceback.print_exc()
            self.close_connection = True
            if self.status_sent is None:
                try:
                    self.send_error_json(ApiError(f"internal server error ({type(e).__name__})"), dialect)
                except OSError:
                    pass
        finally:
            if drain:
                self._drain()
            ms = (time.monotonic() - t0) * 1000
            status = self.status_sent if self.status_sent is not None else "-"
            log_line(f"{self.client_address[0]} {self.command} {path} {status} {ms:.0f}ms{self.log_extra}")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    allow_reuse_address = not sys.platform.startswith("win")  # on Windows it would let two servers share a port

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
            return  # clients hang up; not worth a traceback
        super().handle_error(request, client_address)


# ---------------------------------------------------------------- native KoboldCpp routes

def _submit(req):
    from gguf_loader.jobs import InvalidRequest, QueueFull
    try:
        return STATE.engine.submit(req)
    except QueueFull:
        raise Busy()
    except InvalidRequest as e:
        raise BadRequest(str(e))


def _log_prompt(h, body, req):
    if STATE.args.quiet or (isinstance(body, dict) and body.get("quiet") is True):
        return
    text = req.prompt if isinstance(req.prompt, str) else ""
    preview = text[-60:].replace("\n", "\\n")
    h.log_extra = f" prompt[{len(text)} chars]: ...{preview}" if len(text) > 60 else f" prompt: {preview}"


def _parse_gen(h):
    body = h.json()
    req = kobold.parse_generate(body, STATE.defaults)
    _log_prompt(h, body, req)
    return req


@route("POST", "/api/v1/generate", auth=True)
def r_generate(h):
    req = _parse_gen(h)
    job = _submit(req)
    last_check = time.monotonic()
    try:
        while True:
            result = job.wait(_DISCONNECT_CHECK_S)
            if result is not None:
                break
            if time.monotonic() - last_check >= _DISCONNECT_CHECK_S:
                last_check = time.monotonic()
                if h.client_gone():
                    raise ClientGone()
    except BaseException:
        job.abort()
        raise
    _raise_for_error(result, req)
    h.send_json(200, kobold.generate_response(result))


def _raise_for_error(result, req):
    """A job that failed answers an error instead of KoboldCpp's silent empty 200."""
    if not result.error:
        return
    print(f"Generation error: {result.error}", file=sys.stderr)
    raise ApiError(f"generation failed: {result.error}")


@route("POST", "/api/extra/generate/stream", auth=True)
def r_generate_stream(h):
    req = _parse_gen(h)
    job = _submit(req)
    try:
        # headers go out with the first event, so a job that fails at once still gets a JSON error
        last_check = time.monotonic()
        for ev in job.stream(poll=_DISCONNECT_CHECK_S):
            if ev.kind == "text" and ev.text:
                if h.status_sent is None:
                    h.start_sse()
                h.write(kobold.stream_token(ev.text))
            elif ev.kind == "done":
                if h.status_sent is None:
                    _raise_for_error(ev.result, req)
                    h.start_sse()
                elif ev.result.error:
                    print(f"Generation error: {ev.result.error}", file=sys.stderr)
                h.write(kobold.stream_end(ev.result))
                return
            now = time.monotonic()
            if now - last_check >= _DISCONNECT_CHECK_S:
                last_check = now
                if h.client_gone():
                    raise ClientGone()
    except BaseException:
        job.abort()
        raise


def _job_for_key(genkey: str):
    """(job, is_running) of the live job with this genkey, else (None, False)."""
    eng = STATE.engine
    jobs = eng.jobs()
    n_running = len(jobs) - eng.queue_length()
    for i, j in enumerate(jobs):
        if j.genkey == genkey:
            return j, i < n_running
    return None, False


def _visible_text(genkey: str):
    """KoboldCpp's genkey rule for check/last_logprobs: with a key, only that job; without one, only when no
    queue exists and the job has no key (so one user never sees another's text). -> (job or None, finished)."""
    eng = STATE.engine
    if genkey:
        job, running = _job_for_key(genkey)
        if job is not None and running:
            return job, False
        if not job and eng.last_genkey == genkey:
            return None, True
        return None, None
    if eng.queue_length() > 0:
        return None, None
    running = eng.jobs()
    if len(running) == 1 and not running[0].genkey:
        return running[0], False
    if not running and not eng.last_genkey:
        return None, True
    return None, None


def _check(h, genkey):
    job, finished = _visible_text(genkey)
    if job is not None:
        text = job.text_so_far
    elif finished and STATE.engine.last_result is not None:
        text = STATE.engine.last_result.text
    else:
        text = ""
    h.send_json(200, kobold.check_response(text))


@route("GET", "/api/extra/generate/check", auth=True)
def r_check_get(h):
    _check(h, "")


@route("POST", "/api/extra/generate/check", auth=True)
def r_check_post(h):
    _check(h, kobold.parse_genkey(h.json()))


@route("POST", "/api/extra/abort", auth=True)
def r_abort(h):
    genkey = kobold.parse_genkey(h.json())
    eng = STATE.engine
    if genkey:
        job, running = _job_for_key(genkey)
        if job is None:
            h.send_json(200, {"success": "false", "done": "false"})
            return
        job.abort()
        if not running:  # still queued: it is dropped when its turn comes
            h.send_json(200, {"success": "true", "done": "false"})
            return
        job.wait(2.0)
        h.send_json(200, {"success": "true", "done": "true"})
        return
    if eng.queue_length() > 0:
        h.send_json(200, {"success": "false", "done": "false"})
        return
    running = eng.jobs()
    targets = running if len(running) == 1 else [j for j in running if not j.genkey]
    for j in targets:
        j.abort()
    for j in targets:
        j.wait(2.0)
    h.send_json(200, {"success": "true" if targets else "false", "done": "true"})


@route(["GET", "POST"], "/api/extra/last_logprobs", auth=True)
def r_last_logprobs(h):
    genkey = kobold.parse_genkey(h.json()) if h.command == "POST" else ""
    job, finished = _visible_text(genkey)
    lp = None
    if finished and STATE.engine.last_result is not None:
        lp = kobold.logprobs_object(STATE.engine.last_result.logprobs)
    h.send_json(200, {"logprobs": lp})


@route("GET", "/api/v1/model")
def r_model(h):
    name = STATE.model_name if h.authorized() else "koboldcpp/protected-model"
    h.send_json(200, {"result": name})


@route("GET", "/api/v1/info/version")
def r_united_version(h):
    h.send_json(200, {"result": KOBOLD_UNITED_VERSION})


@route("GET", "/api/v1/config/max_context_length")
def r_max_ctx(h):
    h.send_json(200, {"value": STATE.defaults.max_context_length})


@route("GET", "/api/extra/true_max_context_length")
def r_true_max_ctx(h):
    h.send_json(200, {"value": STATE.defaults.max_context_length})


@route("GET", "/api/v1/config/max_length")
def r_max_length(h):
    h.send_json(200, {"value": STATE.defaults.max_length})


@route("GET", "/api/v1/config/soft_prompt")
def r_soft_prompt(h):
    h.send_json(200, {"value": ""})


@route("GET", "/api/v1/config/soft_prompts_list")
def r_soft_prompts_list(h):
    h.send_json(200, {"values": []})


@route("GET", "/api/extra/version")
def r_version(h):
    h.send_json(200, {
        "result": "KoboldCpp", "version": VERSION, "protected": bool(STATE.password), "llm": True,
        "txt2img": False, "vision": False, "audio": False, "transcribe": False, "multiplayer": False,
        "websearch": False, "tts": False, "embeddings": True, "savedata": False, "admin": 0, "guidance": False,
        "jinja": bool(STATE.args.jinja),
    })


@route("GET", "/api/extra/perf")
def r_perf(h):
    h.send_json(200, kobold.perf_response(STATE.engine.perf(), STATE.args.quiet))


@route("POST", "/api/extra/tokencount", auth=True)
@route("POST", "/api/extra/tokenize", auth=True)
def r_tokencount(h):
    try:
        body = h.json()
    except BadRequest as e:
        raise BadRequest(e.msg, extra={"value": -1})
    text, special = kobold.parse_tokenize(body)
    ids = STATE.engine.tokenize(text, add_bos=True, special=special)
    h.send_json(200, {"value": len(ids), "ids": ids})


@route("POST", "/api/extra/detokenize", auth=True)
def r_detokenize(h):
    ids, special = kobold.parse_detokenize(h.json(), STATE.engine.n_vocab)
    h.send_json(200, {"result": STATE.engine.detokenize(ids, special=special), "success": True})


@route("POST", "/api/extra/json_to_grammar", auth=True)
def r_json_to_grammar(h):
    body = h.json()
    try:
        gbnf = kobold.parse_json_to_grammar(body)
    except BadRequest as e:
        if isinstance(body, dict):  # a schema the converter rejects: KoboldCpp answers success false
            h.send_json(200, {"result": "", "success": False, "error": e.msg})
            return
        raise
    h.send_json(200, {"result": gbnf, "success": True})


@route("GET", "/api/extra/preloadstory")
def r_preloadstory(h):
    h.send_json(200, STATE.preloadstory if STATE.preloadstory is not None else {})


@route("GET", "/ping")
def r_ping(h):
    h.send_json(200, {"status": "healthy"})


# ---------------------------------------------------------------- web page

_NO_PAGE = (b"<!DOCTYPE html><html><head><meta charset='utf-8'><title>KoboldCpp</title></head><body>"
            b"<h1>KoboldCpp is running</h1><p>The web page is not installed (klite/index.html is missing). "
            b"The API is available at <code>/api/v1/generate</code> and <code>/v1/chat/completions</code>.</p>"
            b"</body></html>")


def _send_static(h, data: bytes, ctype: str):
    compressible = ctype.startswith(("text/", "application/json", "image/svg"))
    if compressible and "gzip" in (h.headers.get("Accept-Encoding") or "").lower() and len(data) > 512:
        h.send_bytes(200, gzip.compress(data, 6), ctype, [("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")])
    else:
        h.send_bytes(200, data, ctype)


def _klite_file(rel: str):
    base = KLITE_DIR.resolve()
    rel = urllib.parse.unquote(rel)
    if "\x00" in rel or any(part in ("..", "") for part in rel.split("/")) or "\\" in rel:
        return None
    p = (base / rel).resolve()
    if base not in p.parents or not p.is_file():
        return None
    return p


@route("GET", "/")
@route("GET", "/klite")
def r_index(h):
    p = KLITE_DIR / "index.html"
    if p.is_file():
        _send_static(h, p.read_bytes(), _CONTENT_TYPES[".html"])
    else:
        h.send_bytes(200, _NO_PAGE, _CONTENT_TYPES[".html"])


def r_klite_file(h, rel: str):
    p = _klite_file(rel)
    if p is None:
        raise NotFound(f"no such file in the web page: /klite/{rel}")
    ctype = _CONTENT_TYPES.get(p.suffix.lower()) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    _send_static(h, p.read_bytes(), ctype)


# ==== OpenAI / Ollama routes (begin) ====
# Thin handlers: parsing, prompts and shapes live in adapters/openai.py, ollama.py, instruct.py, openapi.py.
from adapters import ollama as ollama_api, openai as openai_api, openapi as openapi_doc


def openai_setup(args, engine):
    """Resolve the chat adapter (printing the choice) and build the OpenAI context. -> error message or None."""
    import dataclasses
    from adapters import instruct
    try:
        name, adapter = instruct.load_adapter(args.chatcompletionsadapter, engine.chat_template)
    except instruct.AdapterError as e:
        return f"--chatcompletionsadapter: {e}"
    jinja = bool(args.jinja and engine.chat_template)
    if args.jinja and not jinja:
        print("--jinja: the model has no chat template; using the instruct adapter instead.")
    print(f"Chat completions adapter: {name}" + (" (--jinja: chat uses the model's own template)" if jinja else ""))

    def make_request(native: dict):
        return kobold.parse_generate(native, dataclasses.replace(STATE.defaults, instruct_tags=adapter))

    STATE.instruct_tags = STATE.defaults.instruct_tags = adapter
    STATE.extra["openai"] = openai_api.Context(
        engine=engine, model_name=STATE.model_name, adapter_name=name, adapter=adapter, use_jinja=jinja,
        default_max_length=args.defaultgenamt, make_request=make_request)
    STATE.extra["sdurl"] = args.sdurl or os.environ.get("SD_WEBUI_URL") or None
    return None


def _oa():
    return STATE.extra["openai"]


def _pump(h, chunks, ndjson=False):
    """Write an adapter's chunk iterator; None items are idle ticks where we look for a vanished client."""
    if ndjson:
        h.status_sent = 200
        h.close_connection = True
        h.send_response(200)
        h._cors()
        h.send_header("Content-Type", "application/x-ndjson")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")
        h.end_headers()
    else:
        h.start_sse()
    try:
        for c in chunks:
            if c is None:
                if h.client_gone():
                    raise ClientGone()
            else:
                h.write(c)
    finally:
        getattr(chunks, "close", lambda: None)()


def _run_plan(h, plan):
    if plan.stream:
        _pump(h, openai_api.start_stream(plan, STATE.engine))
    else:
        h.send_json(200, openai_api.run_blocking(plan, STATE.engine, h.client_gone))


@route("POST", "/v1/chat/completions", auth=True, dialect="openai")
@route("POST", "/chat/completions", auth=True, dialect="openai")
def r_oa_chat(h):
    _run_plan(h, openai_api.parse_chat(h.json(), _oa()))


@route("POST", "/v1/completions", auth=True, dialect="openai")
@route("POST", "/v1/completion", auth=True, dialect="openai")
@route("POST", "/completions", auth=True, dialect="openai")
def r_oa_completions(h):
    _run_plan(h, openai_api.parse_completion(h.json(), _oa()))


@route("GET", "/v1/models", dialect="openai")
@route("GET", "/models", dialect="openai")
def r_oa_models(h):
    h.send_json(200, openai_api.models_list(STATE.model_name))


@route("GET", "/v1/engines", dialect="openai")
def r_oa_engines(h):
    h.send_json(200, openai_api.engines_list(STATE.model_name))


@route("POST", "/v1/embeddings", auth=True, dialect="openai")
@route("POST", "/api/extra/embeddings", auth=True, dialect="openai")
def r_oa_embeddings(h):
    h.send_json(200, openai_api.run_embeddings(h.json(), _oa()))


@route("POST", "/v1/edits", auth=True, dialect="openai")
def r_oa_edits(h):
    plan = openai_api.parse_edit(h.json(), _oa())
    h.send_json(200, openai_api.edit_response(openai_api.run_blocking(plan, STATE.engine, h.client_gone)))


@route("POST", "/v1/moderations", auth=True, dialect="openai")
def r_oa_moderations(h):
    h.send_json(200, openai_api.moderation(h.json(), _oa()))


@route("POST", "/v1/images/generations", auth=True, dialect="openai")
@route("POST", "/images/generations", auth=True, dialect="openai")
def r_oa_images(h):
    h.send_json(200, openai_api.image_generation(h.json(), STATE.extra.get("sdurl")))


@route("GET", "/api/tags", dialect="ollama")
@route("GET", "/api/ps", dialect="ollama")
def r_ollama_tags(h):
    h.send_json(200, ollama_api.tags(STATE.model_name, STATE.engine.model_path, STATE.engine.metadata))


@route("GET", "/api/version", dialect="ollama")
def r_ollama_version(h):
    h.send_json(200, ollama_api.version())


def _ollama_run(h, plan):
    if plan.stream:
        _pump(h, ollama_api.start_stream(plan, _oa()), ndjson=True)
    else:
        h.send_json(200, ollama_api.run_blocking(plan, _oa(), h.client_gone))


@route("POST", "/api/generate", auth=True, dialect="ollama")
def r_ollama_generate(h):
    _ollama_run(h, ollama_api.parse_generate(h.json(), _oa()))


@route("POST", "/api/chat", auth=True, dialect="ollama")
def r_ollama_chat(h):
    _ollama_run(h, ollama_api.parse_chat(h.json(), _oa()))


def _openapi():
    routes = [(m, p, r.auth, r.dialect) for (m, p), r in ROUTES.items()]
    routes += [("GET", "/v1/models/{model}", False, "openai"), ("GET", "/v1/engines/{engine}", False, "openai"),
               ("POST", "/v1/engines/{engine}/generate", True, "openai"),
               ("POST", "/v1/engines/{engine}/completions", True, "openai"),
               ("POST", "/v1/engines/{engine}/embeddings", True, "openai")]
    return openapi_doc.build(routes, PROGRAM_VERSION)


@route("GET", "/api/openapi.json")
def r_openapi_json(h):
    h.send_json(200, _openapi())


@route("GET", "/api")
def r_api_page(h):
    h.send_bytes(200, openapi_doc.render_html(_openapi()).encode("utf-8"), "text/html; charset=utf-8")


_DYNAMIC_OA = (  # (method, regex, handler, auth): routes with an id in the path
    ("GET", re.compile(r"(?:/v1)?/models/[^/]+"), lambda h: h.send_json(200, openai_api.model_card(STATE.model_name)), False),
    ("GET", re.compile(r"/v1/engines/[^/]+"), lambda h: h.send_json(200, openai_api.engine_card(STATE.model_name)), False),
    ("POST", re.compile(r"/v1/engines/[^/]+/(?:generate|completions)"), r_oa_completions, True),
    ("POST", re.compile(r"/v1/engines/[^/]+/embeddings"), r_oa_embeddings, True),
)
_resolve_before_openai = resolve_route


def resolve_route(method: str, path: str) -> Route:  # noqa: F811 (adds the OpenAI routes with ids in the path)
    for m, rx, fn, auth in _DYNAMIC_OA:
        if m == method and rx.fullmatch(path):
            return Route(fn, auth, "openai")
    return _resolve_before_openai(method, path)
# ==== OpenAI / Ollama routes (end) ====


# ---------------------------------------------------------------- serve

def _load_preloadstory(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArgError(f"--preloadstory file not found: {path}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArgError(f"--preloadstory file {path} is not valid JSON: {e}")


def _bind(host: str, port: int) -> Server:
    cls = Server
    if ":" in host:
        cls = type("Server6", (Server,), {"address_family": socket.AF_INET6})
    return cls((host, port), Handler)


def _err(msg: str) -> int:
    print(f"koboldcpp.py: error: {msg}", file=sys.stderr)
    return 1


def serve(args: argparse.Namespace) -> int:
    global STATE
    import gguf_loader

    if args.model:
        model_path = os.path.abspath(os.path.expanduser(args.model))
    else:
        try:
            from gguf_loader.bundled import ensure_default_model
            model_path = str(ensure_default_model())
            print(f"No model given: serving the bundled model (Gemma 3 270M, a small base model) from {model_path}. "
                  f"Pass --model FILE.gguf to serve another.")
        except Exception as e:
            return _err(f"no model given and the bundled model is unavailable: {e}")
    try:
        info = gguf_loader.inspect(model_path)
    except gguf_loader.GGUFError as e:
        return _err(str(e))
    preload = None
    if args.preloadstory:
        try:
            preload = _load_preloadstory(args.preloadstory)
        except ArgError as e:
            return _err(str(e))
    if args.embeddingsmodel:
        try:
            gguf_loader.inspect(args.embeddingsmodel)
        except gguf_loader.GGUFError as e:
            return _err(f"--embeddingsmodel: {e}")

    host = args.host or ""
    try:
        httpd = _bind(host, args.port)
    except OSError as e:
        if e.errno in (98, 48, 10048) or "in use" in str(e).lower():
            return _err(f"port {args.port} is already in use (another server running?); pick another with --port")
        return _err(f"cannot listen on {host or '*'}:{args.port}: {e.strerror or e}")

    n_ctx = args.contextsize
    if info.context_length and n_ctx > info.context_length:
        print(f"Context size {n_ctx} is larger than the model's trained context {info.context_length}; "
              f"using {info.context_length}.")
        n_ctx = info.context_length
    threads = args.threads if args.threads > 0 else default_threads()
    max_queue = args.multiuser - 1 if args.multiuser > 1 else (6 if args.multiuser == 1 else 0)

    from gguf_loader.engine import Engine, EngineConfig, ModelLoadError
    cfg = EngineConfig(model_path, n_ctx=n_ctx, n_threads=threads, n_batch=args.batchsize,
                       n_gpu_layers=args.gpulayers, flash_attn=args.flashattention, use_mmap=args.usemmap,
                       use_mlock=args.usemlock, n_slots=args.parallelrequests, max_queue=max_queue,
                       fastforward=not args.nofastforward, contextshift=not args.noshift, quiet=args.quiet,
                       embedding_model_path=args.embeddingsmodel)
    print(f"Loading {model_path} ...", flush=True)
    try:
        engine = Engine(cfg)
    except ModelLoadError as e:
        httpd.server_close()
        return _err(str(e))
    except KeyboardInterrupt:
        httpd.server_close()
        print("Interrupted while loading the model.", file=sys.stderr)
        return 130
    except Exception as e:
        httpd.server_close()
        return _err(f"could not load {model_path}: {type(e).__name__}: {e}")

    defaults = kobold.GenDefaults(max_length=args.defaultgenamt, max_context_length=engine.n_ctx,
                                  n_vocab=engine.n_vocab)
    STATE = ServerState(args=args, engine=engine, model_name=friendly_model_name(args, model_path),
                        password=args.password or None, max_body=args.maxrequestsize * 1024 * 1024,
                        defaults=defaults, preloadstory=preload)
    oa_error = openai_setup(args, engine)  # the chat adapter, for chat routes and native placeholders
    if oa_error:
        httpd.server_close()
        engine.close()
        return _err(oa_error)

    shown_host = "localhost" if host in ("", "0.0.0.0", "::", "127.0.0.1", "::1") else host
    url = f"http://{shown_host if ':' not in shown_host else '[' + shown_host + ']'}:{args.port}"
    print("=" * 72)
    print(f"Model:    {STATE.model_name}  ({model_path})")
    print(f"Context:  {engine.n_ctx} tokens (trained {engine.n_ctx_train}), threads {threads}, "
          f"slots {engine.n_slots}, queue {max_queue}")
    print(f"Serving:  {url}   (web page at {url}/ , KoboldCpp API at {url}/api , OpenAI API at {url}/v1)")
    if host in ("127.0.0.1", "localhost", "::1"):
        print("Only this computer can connect; use --host 0.0.0.0 to listen on all interfaces.")
    if args.password:
        print("API key required (Authorization: Bearer <password>).")
    print("Press Ctrl+C to stop.")
    print("=" * 72, flush=True)

    def on_term(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()
    try:
        signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):  # not the main thread (embedded use)
        pass
    if args.launch:
        import webbrowser
        threading.Timer(1.0, lambda: webbrowser.open(url + "/")).start()
    try:
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("Shutting down.", flush=True)
        httpd.server_close()
        engine.close()
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ArgError as e:
        print(f"koboldcpp.py: error: {e}", file=sys.stderr)
        return 2
    if args.version:
        print(f"koboldcpp.py {PROGRAM_VERSION} (KoboldCpp API {VERSION})")
        return 0
    if args.exportconfig:
        try:
            export_config(args, args.exportconfig)
        except OSError as e:
            print(f"koboldcpp.py: error: cannot write {args.exportconfig}: {e}", file=sys.stderr)
            return 2
        print(f"Wrote config to {args.exportconfig}")
        return 0
    if args.showgui or (not args.model and not args.skiplauncher and has_display()):
        try:
            from launcher_gui import run_launcher
        except ImportError as e:
            if args.showgui:
                print(f"koboldcpp.py: error: the launcher window needs customtkinter and tkinter ({e})", file=sys.stderr)
                return 2
            print(f"Launcher window unavailable ({e}); serving the bundled model instead.")
        else:
            chosen = run_launcher(args, cli_hooks())
            if chosen is None:
                print("Launcher closed without launching.")
                return 0
            args = chosen
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
