"""The web page (klite/) and the API documentation (/api, /api/openapi.json)."""
from __future__ import annotations

import gzip
import mimetypes
import sys
import urllib.parse
from pathlib import Path

from adapters import openapi
from adapters.errors import NotFound

APP_DIR = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parent.parent))
KLITE_DIR = APP_DIR / "klite"
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                  ".json": "application/json", ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8"}
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


def index(h):
    p = KLITE_DIR / "index.html"
    if p.is_file():
        _send_static(h, p.read_bytes(), _CONTENT_TYPES[".html"])
    else:
        h.send_bytes(200, _NO_PAGE, _CONTENT_TYPES[".html"])


def klite_file(h, rel: str):
    p = _klite_file(rel)
    if p is None:
        raise NotFound(f"no such file in the web page: /klite/{rel}")
    ctype = _CONTENT_TYPES.get(p.suffix.lower()) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    _send_static(h, p.read_bytes(), ctype)


def _doc(h) -> dict:
    return openapi.build(h.server.routes.described(), h.state.program_version)


def register(t):
    t.add("GET", ["/", "/klite"], index)
    t.add_prefix("GET", "/klite/", klite_file)
    t.add("GET", "/api/openapi.json", lambda h: h.send_json(200, _doc(h)))
    t.add("GET", "/api", lambda h: h.send_bytes(200, openapi.render_html(_doc(h)).encode("utf-8"),
                                                "text/html; charset=utf-8"))
