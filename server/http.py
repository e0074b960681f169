"""The HTTP front: a stdlib ThreadingHTTPServer whose `state` and `routes` are built per server (server/app.py),
and the request handler's plumbing (body reading, JSON, auth, CORS, JSON errors, SSE/NDJSON streams).

Nothing here knows a dialect's fields: routes (server/routes_*.py) parse through adapters/ and hand the engine a job.
"""
from __future__ import annotations

import hmac
import json
import re
import select
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from adapters import sse
from adapters.errors import ApiError, BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, Unauthorized, error_body
from adapters.fields import clean_text
from adapters.run import ClientGone, JobRunner

KEEPALIVE_S = 5.0  # SSE comment interval while a stream waits (load balancers often cut idle streams at 30-60 s)
PROGRESS_S = 0.5  # at most this often a prompt_progress event
LOADING_MAX_BODY = 1 << 20  # bodies read (and refused) while the model loads
MAX_JSON_DEPTH = 128  # deeper bodies are refused before any code walks them recursively
_CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "*"),
    ("Access-Control-Allow-Headers", "*, Accept, Content-Type, Content-Length, Cache-Control, Accept-Encoding, "
                                     "X-CSRF-Token, Client-Agent, X-Fields, Authorization, X-Requested-With, "
                                     "X-HTTP-Method-Override, apikey, genkey, x-api-key, anthropic-version"),
    ("Access-Control-Allow-Private-Network", "true"),  # Chrome: public-origin pages calling localhost
)


def log_line(line: str):
    """Print one log line; never fails on a console that cannot show some characters."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        print(line.encode(enc, "replace").decode(enc, "replace"), flush=True)
    except (OSError, ValueError, LookupError):
        pass


# ---------------------------------------------------------------- routes

@dataclass
class Route:
    fn: Callable  # fn(handler)
    auth: bool = False  # needs 'Authorization: Bearer <--password>' (or x-api-key) when a password is set
    dialect: str = "kobold"  # shape of error bodies: "kobold" | "openai" | "ollama"
    path: str = ""  # the registered path (the /metrics label: never the raw request path)
    while_loading: bool = False  # answers before the model is loaded (health checks); the rest answer 503


@dataclass
class RouteTable:
    """Exact paths (also matched as a suffix, as KoboldCpp does, so a reverse-proxy prefix works), paths with an
    id in them (regexes), and path prefixes (static files)."""
    exact: Dict[Tuple[str, str], Route] = field(default_factory=dict)
    patterns: List[Tuple[str, "re.Pattern", str, Route]] = field(default_factory=list)  # method, regex, doc path
    prefixes: List[Tuple[str, str, Callable, Route]] = field(default_factory=list)  # method, prefix, fn(h, rest)

    def add(self, methods, paths, fn, auth=False, dialect="kobold", while_loading=False):
        for m in [methods] if isinstance(methods, str) else methods:
            for p in [paths] if isinstance(paths, str) else paths:
                self.exact[(m.upper(), p)] = Route(fn, auth, dialect, p, while_loading)

    def add_pattern(self, method: str, regex: str, doc_path: str, fn, auth=False, dialect="kobold"):
        self.patterns.append((method, re.compile(regex), doc_path, Route(fn, auth, dialect, doc_path)))

    def add_prefix(self, method: str, prefix: str, fn, dialect="kobold"):
        self.prefixes.append((method, prefix, fn, Route(fn, False, dialect, prefix + "*")))

    def described(self) -> List[Tuple[str, str, bool, str]]:
        """(METHOD, path, auth, dialect) of every route, for the OpenAPI document."""
        out = [(m, p, r.auth, r.dialect) for (m, p), r in self.exact.items()]
        return out + [(m, doc, r.auth, r.dialect) for m, _, doc, r in self.patterns]

    def resolve(self, method: str, path: str) -> Route:
        r = self.exact.get((method, path))
        if r:
            return r
        for m, rx, _, route in self.patterns:
            if m == method and rx.fullmatch(path):
                return route
        for m, prefix, fn, route in self.prefixes:
            if m == method and path.startswith(prefix):
                rest = path[len(prefix):]
                return Route(lambda h, fn=fn, rest=rest: fn(h, rest), route.auth, route.dialect, route.path)
        best = None  # suffix match: the longest registered path wins
        for (m, p), cand in self.exact.items():
            if m == method and len(p) > 1 and path.endswith(p) and (best is None or len(p) > len(best[0])):
                best = (p, cand)
        if best:
            return best[1]
        allowed = sorted({m for (m, p) in self.exact if p == path or (len(p) > 1 and path.endswith(p))})
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                                   extra={"allow": allowed})
        raise NotFound(f"KoboldCpp HTTP Server is running, but this endpoint does not exist: {path}")


def normalize_path(raw: str) -> str:
    path = raw.split("?", 1)[0].split("#", 1)[0] or "/"
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    if "/api/latest/" in path + "/":
        path = (path + "/").replace("/api/latest/", "/api/v1/", 1).rstrip("/")
    return path


# ---------------------------------------------------------------- JSON bodies

def _depth_and_clean(obj):
    """Depth check (iterative, so a deep body cannot exhaust the stack) and lone surrogates -> U+FFFD, in place."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_JSON_DEPTH:
            raise BadRequest(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(o, dict):
            for k in list(o):
                v = o[k]
                if isinstance(v, str):
                    o[k] = clean_text(v)
                elif isinstance(v, (dict, list)):
                    stack.append((v, d + 1))
                ck = clean_text(k)
                if ck is not k:
                    o[ck] = o.pop(k)
        elif isinstance(o, list):
            for i, v in enumerate(o):
                if isinstance(v, str):
                    o[i] = clean_text(v)
                elif isinstance(v, (dict, list)):
                    stack.append((v, d + 1))
    return obj


def parse_json(raw: bytes):
    """A request body as JSON (empty: {}): strict UTF-8, bounded nesting, lone surrogates replaced everywhere."""
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Error parsing input: the body is not UTF-8 text")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise BadRequest(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
    except ValueError as e:
        raise BadRequest(f"Error parsing input: {e}")
    if isinstance(obj, str):
        return clean_text(obj)
    return _depth_and_clean(obj) if isinstance(obj, (dict, list)) else obj


# ---------------------------------------------------------------- handler

@dataclass
class _StreamState:
    headers: tuple
    progress: Optional[Callable[[dict], bytes]]
    last_write: float = field(default_factory=time.monotonic)
    last_progress: float = 0.0
    last_processed: int = -1


class Handler(BaseHTTPRequestHandler):
    server_version = "KoboldCppServer"
    sys_version = ""
    protocol_version = "HTTP/1.1"  # keep-alive for normal replies; streams close the connection
    timeout = 300  # seconds a socket may sit idle (keep-alive, slow uploads) before the thread gives up

    # ---- plumbing ----

    @property
    def state(self):
        return self.server.state

    @property
    def max_body(self) -> int:
        st = self.server.state
        return st.max_body if st is not None else LOADING_MAX_BODY

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
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD" and data:
            self._headers_buffer.append(data)  # headers and body in one write: one packet for small replies
        self.flush_headers()

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
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # garbage or TLS bytes: still answer with a status line
        if not hasattr(self, "command"):
            self.command = None
        msg = message or self.responses.get(code, ("error",))[0]
        err = ApiError(msg, status=code, type="bad_input" if 400 <= code < 500 else "server_error")
        try:
            self.send_bytes(code, json.dumps(error_body("kobold", err)).encode(), "application/json")
        except OSError:
            pass
        path = getattr(self, "path", "-")
        log_line(f"{self.client_address[0]} {self.command or '-'} {path[:200]!r} {code}")

    def _start_stream(self, headers):
        """200 + stream headers; the stream ends when we close the socket (HTTP/1.0 style, as KoboldCpp)."""
        self.status_sent = 200
        self.close_connection = True
        self.send_response(200)
        self._cors()
        for k, v in headers:
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

    def pump(self, chunks: Iterator[bytes], ndjson: bool = False, progress: Optional[Callable[[dict], bytes]] = None):
        """Write a stream. Headers go out with the first chunk, so an error raised before it is still a JSON
        reply with its status; closing the iterator (always) aborts whatever job it follows.

        While the job waits (queued, or processing a long prompt) an SSE stream gets a `: keep-alive` comment every
        KEEPALIVE_S seconds, and, when the body asked for `return_progress`, `progress(prompt_progress)` events.
        NDJSON has no comment syntax: it gets nothing extra."""
        headers = (("Content-Type", "application/x-ndjson"), ("Cache-Control", "no-cache")) if ndjson \
            else sse.SSE_HEADERS
        body = self.json() if progress is not None and self.body else {}
        want_progress = progress is not None and isinstance(body, dict) and body.get("return_progress") is True
        self._stream = None if ndjson else _StreamState(headers, progress if want_progress else None)
        try:
            for c in chunks:
                if self.status_sent is None:
                    self._start_stream(headers)
                self.write(c)
                if self._stream:
                    self._stream.last_write = time.monotonic()
            if self.status_sent is None:
                self._start_stream(headers)
        except ApiError as e:
            if self.status_sent is None or ndjson:
                raise
            # the stream already started (keep-alive lines): the error can only be an event now
            self.write(sse.event(error_body(self.dialect, e)))
        finally:
            self._stream = None
            getattr(chunks, "close", lambda: None)()

    def _on_wait(self, job):
        """Called by the JobRunner while a job sends nothing (same thread as pump)."""
        st = getattr(self, "_stream", None)
        if st is None:
            return
        now = time.monotonic()
        if st.progress is not None:
            p = self.state.engine.job_progress(job) if hasattr(self.state.engine, "job_progress") else None
            if p is not None and p["processed"] != st.last_processed and now - st.last_progress >= PROGRESS_S:
                st.last_processed, st.last_progress = p["processed"], now
                self._stream_write(st, st.progress(p))
                return
        if now - st.last_write >= self.server.keepalive_s:
            self._stream_write(st, sse.KEEPALIVE)

    def _stream_write(self, st, data: bytes):
        if self.status_sent is None:
            self._start_stream(st.headers)
        self.write(data)
        st.last_write = time.monotonic()

    def client_gone(self) -> bool:
        """True when the client closed its side (readable with no data). Pipelined bytes count as alive."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def runner(self) -> JobRunner:
        """Runs jobs for this request, aborting them when this client hangs up."""
        return JobRunner(self.state.engine, self.client_gone, on_wait=self._on_wait)

    def _content_length(self) -> Optional[int]:
        values = self.headers.get_all("Content-Length") or []
        # RFC 9112: differing lengths (or a length beside chunked coding) must be refused: a smuggling risk
        parts = {p.strip() for v in values for p in v.split(",")}
        if len(parts) > 1:
            self.close_connection = True
            raise BadRequest("conflicting Content-Length headers")
        if not parts:
            return None
        (cl,) = parts
        if not cl.isdigit() or len(cl) > 15:
            self.close_connection = True
            raise BadRequest(f"invalid Content-Length {cl[:40]!r}")
        return int(cl)

    def _read_body(self) -> bytes:
        limit = self.max_body
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        cl = self._content_length()
        if "chunked" in te:
            if cl is not None:
                self.close_connection = True
                raise BadRequest("a request may not have both Content-Length and Transfer-Encoding: chunked")
            return self._read_chunked(limit)
        if cl is None:
            return b""
        if cl > limit:
            raise PayloadTooLarge(self.max_body // (1024 * 1024))
        data = self.rfile.read(cl)
        if len(data) < cl:
            self.close_connection = True
            raise BadRequest("request body ended early")
        return data

    def _read_chunked(self, limit: int) -> bytes:
        out = bytearray()
        for _ in range(100000):
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip() or b"x", 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise BadRequest("malformed chunked request body")
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            if len(out) + size > limit:
                raise PayloadTooLarge(self.max_body // (1024 * 1024))
            out += self.rfile.read(size)
            self.rfile.readline(8)
        self.close_connection = True
        raise BadRequest("too many chunks in request body")

    def json(self):
        """The body as JSON; an empty body is {}."""
        return parse_json(self.body)

    def authorized(self) -> bool:
        pw = self.state.password
        if not pw:
            return True
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:  # Anthropic's SDKs send the key as x-api-key
            token = (self.headers.get("x-api-key") or "").strip()
        # header values arrive decoded as Latin-1; the key is compared as the UTF-8 bytes the client sent
        raw = token.encode("latin-1", "replace")
        return hmac.compare_digest(raw, pw.encode("utf-8")) or hmac.compare_digest(raw, pw.encode("latin-1", "replace"))

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
            if (self._content_length() or 0) > self.max_body:
                self.close_connection = True
                self.body = b""
                self.status_sent = None
                self.send_error_json(PayloadTooLarge(self.max_body // (1024 * 1024)), "kobold")
                return False
        except BadRequest:
            pass  # answered by _dispatch
        return super().handle_expect_100()

    def _dispatch(self):
        t0 = time.monotonic()
        self.status_sent = None
        self.log_extra = ""
        self.body = b""
        method = self.command
        path = normalize_path(self.path)
        dialect = "kobold"
        self.dialect = dialect
        self._stream = None
        label = "other"
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
            r = self.server.routes.resolve(method, path)
            dialect = self.dialect = r.dialect
            label = r.path or path
            if self.server.state is None and not r.while_loading:
                self._answer_loading(path, dialect)
                return
            if r.auth and not self.authorized():
                raise Unauthorized()
            r.fn(self)
        except ApiError as e:
            if self.status_sent is None:
                self.send_error_json(e, dialect)
        except (ClientGone, BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
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
            if self.server.metrics is not None:
                self.server.metrics.record(label, self.command or "-", status, ms / 1000)
            log_line(f"{self.client_address[0]} {self.command} {path} {status} {ms:.0f}ms{self.log_extra}")

    def _answer_loading(self, path: str, dialect: str):
        """503 with the load progress while the model loads; the web page reloads itself until it is ready."""
        load = self.server.load
        pct = round(load.progress * 100) if load else 0
        hdrs = [("Retry-After", "2")]
        if path == "/" or path.startswith("/klite"):
            page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
                    f"<title>KoboldCpp: loading</title></head><body><h1>Loading the model: {pct}%</h1>"
                    f"<p>This page reloads itself when the server is ready.</p></body></html>")
            self.send_bytes(503, page.encode("utf-8"), "text/html; charset=utf-8", hdrs)
            return
        err = ApiError(f"Loading model ({pct}%)", 503, "unavailable_error",
                       extra={"status": "loading", "progress": load.progress if load else 0.0})
        self.send_json(503, error_body(dialect, err), hdrs)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    allow_reuse_address = not sys.platform.startswith("win")  # on Windows it would let two servers share a port

    def __init__(self, address, state, routes: RouteTable, handler=Handler):
        self.state = state  # None while the model loads: only while_loading routes answer
        self.routes = routes
        self.load = None  # server.ops.LoadStatus while loading
        self.metrics = None  # server.ops.RequestMetrics
        self.keepalive_s = KEEPALIVE_S
        self.extras: dict = {}  # optional parts (the Horde worker) that routes report on
        super().__init__(address, handler)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
            return  # clients hang up; not worth a traceback
        super().handle_error(request, client_address)


class Server6(Server):
    address_family = socket.AF_INET6
