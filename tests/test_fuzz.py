"""Fuzzing the HTTP API on the tiny model: schemathesis over our own /api/openapi.json, hypothesis bodies built from
the request types the official `openai` SDK publishes, and hostile values for every documented body field.

No request may get a 5xx the document does not declare (501 for unconfigured image generation is declared), the
replies must match the document's response schemas, and the server must stay up. Generation is derandomized, so a
run is reproducible; sizes are bounded so the module stays well under three minutes on two cores.
A failure lists every distinct problem with the request that shows it and the server's traceback line.
"""
from __future__ import annotations

import collections.abc
import copy
import fractions
import json
import math
import os
import re
import time
import typing

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("openai")

import requests  # noqa: E402  (a dependency of schemathesis)
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests.support import ROOT, ServerProcess  # noqa: E402
from tests.tinymodel import tiny_model_path  # noqa: E402

pytestmark = pytest.mark.fuzz

GEN_CAP = 32  # generated max_tokens & co: keeps every request a few milliseconds on the tiny model
REQUEST_TIMEOUT = 30
SCHEMATHESIS_EXAMPLES = 10  # per operation and generation mode (positive, negative)
OPENAI_EXAMPLES = 60  # per OpenAI request type


# ---------------------------------------------------------------- the server and what went wrong


@pytest.fixture(scope="module")
def server():
    with ServerProcess(tiny_model_path(), "--contextsize", "256", "--defaultgenamt", "16") as s:
        yield s


def _trace(log_text: str) -> str:
    """'path:line in func: Exception: message' of the last traceback in a slice of the server log ('' if none):
    the innermost frame in this project, so one bug reached through many routes reads the same."""
    i = log_text.rfind("Traceback (most recent call last):")
    if i < 0:
        return ""
    frames, exc = [], ""
    for line in log_text[i:].splitlines()[1:]:
        m = re.match(r'\s+File "(.+?)", line (\d+), in (.+)', line)
        if m:
            frames.append(m.groups())
        elif line and not line[0].isspace():
            exc = line.strip()
            break
    ours = [f for f in frames if f[0].startswith(str(ROOT))] or frames
    if not ours:
        return exc
    path, line, func = ours[-1]
    return f"{os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else path}:{line} in {func}: {exc}"


def _short(data, n=300) -> str:
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("utf-8", "backslashreplace")
    text = data if isinstance(data, str) else json.dumps(data)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


class Findings:
    """Distinct problems, each with the first request that showed it and how often it recurred."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.items: dict = {}
        self.requests = 0

    def log_mark(self) -> int:
        try:
            return os.path.getsize(self.server.log_path)
        except OSError:
            return 0

    def log_since(self, mark: int) -> str:
        with open(self.server.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", "replace")

    def add(self, kind: str, key, method: str, path: str, body, status, response, detail: str = ""):
        k = (kind,) + tuple(key)
        if k in self.items:
            self.items[k]["count"] += 1
            self.items[k]["paths"].add(path.split("?")[0])
            return
        self.items[k] = {"kind": kind, "method": method, "path": path, "body": _short(body or ""),
                         "status": status, "response": _short(response or "", 200), "detail": detail,
                         "count": 1, "paths": {path.split("?")[0]}}

    def server_error(self, method, path, body, status, response, mark, template=None):
        """Record a 5xx (or no answer at all) with the server's traceback line, deduplicated by that line."""
        trace = _trace(self.log_since(mark)) if mark is not None else ""
        key = (status, trace) if trace else (status, template or path, _short(response or "", 80))
        self.add("5xx" if isinstance(status, int) else "no answer", key, method, path, body, status, response,
                 trace)

    def report(self, title: str) -> str:
        lines = [f"{title}: {len(self.items)} distinct problem(s) in {self.requests} requests "
                 f"(server log: {self.server.log_path})"]
        for it in sorted(self.items.values(), key=lambda i: (i["kind"] != "5xx", i["path"])):
            also = sorted(it["paths"] - {it["path"].split("?")[0]})
            lines.append(f"\n[{it['kind']}] {it['method']} {it['path']} -> {it['status']}"
                         f"  (seen {it['count']}x{'; also on ' + ', '.join(also[:6]) if also else ''})")
            if it["detail"]:
                lines.append(f"  {'server' if it['kind'] != 'schema' else 'check'}: {it['detail']}")
            lines.append(f"  body: {it['body']}")
            lines.append(f"  response: {it['response']}")
        return "\n".join(lines)

    def check(self, title: str):
        """Fail with the report if anything was found; in any case the server must still be up."""
        alive = self.server.proc.poll() is None
        answer = None
        if alive:
            try:
                answer = requests.get(self.server.url + "/api/v1/model", timeout=10)
            except requests.RequestException as e:
                answer = e
        ok = alive and isinstance(answer, requests.Response) and answer.status_code == 200 and \
            "result" in answer.json()
        msg = self.report(title) if self.items else ""
        if not ok:
            tail = self.server.log()[-3000:]
            msg = (f"the server did not survive the fuzzing (exit code {self.server.proc.poll()}, "
                   f"/api/v1/model: {answer!r}); log tail:\n{tail}\n\n" + msg)
        assert ok and not self.items, msg


def _send(sess: requests.Session, findings: Findings, method: str, url_path: str, data: bytes | None,
          template: str | None = None, declared_5xx=()):
    """One raw request; a 5xx that is not declared, no answer, or a non-JSON error body is recorded."""
    findings.requests += 1
    mark = findings.log_mark()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        r = sess.request(method, findings.server.url + url_path, data=data, headers=headers,
                         timeout=REQUEST_TIMEOUT)
    except requests.RequestException as e:
        findings.server_error(method, url_path, data, f"no answer ({type(e).__name__})", str(e), mark, template)
        sess.close()  # a dropped connection must not poison the next request
        return None
    if r.status_code >= 500 and r.status_code not in declared_5xx:
        findings.server_error(method, url_path, data, r.status_code, r.content, mark, template)
    return r


# ---------------------------------------------------------------- a. schemathesis over /api/openapi.json

_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_length", "num_predict")


def _cap_lengths(node):
    """Positive bodies ask for at most GEN_CAP tokens (negative ones still send any number)."""
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            for name in _LENGTH_FIELDS:
                if isinstance(props.get(name), dict) and props[name].get("type") == "integer":
                    props[name]["maximum"] = GEN_CAP
        for v in node.values():
            _cap_lengths(v)
    elif isinstance(node, list):
        for v in node:
            _cap_lengths(v)


@pytest.fixture(scope="module")
def openapi_doc(server):
    r = requests.get(server.url + "/api/openapi.json", timeout=30)
    assert r.status_code == 200
    return r.json()


def test_openapi_document_is_valid_and_declares_replies(openapi_doc):
    from schemathesis.core.errors import InvalidSchema

    try:
        from openapi_spec_validator import validate
    except ImportError:
        validate = None
    if validate:
        validate(copy.deepcopy(openapi_doc))
    schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi_doc))
    ops = []
    for result in schema.get_all_operations():
        op = result.ok()  # raises on an operation schemathesis cannot load
        assert not isinstance(op, InvalidSchema)
        ops.append(op)
    assert len(ops) >= 40
    for path, methods in openapi_doc["paths"].items():
        for method, op in methods.items():
            ok = op["responses"].get("200", {}).get("content")
            assert ok, f"{method.upper()} {path}: no schema for its 200 reply"
            errors = [c for c in op["responses"] if c.startswith("4")]
            assert errors, f"{method.upper()} {path}: no error replies declared"


def _failure_key(f) -> tuple:
    where = "/".join(str(p) for p in getattr(f, "instance_path", []) or [])
    first = (f.message or "").strip().splitlines()[0] if f.message else ""
    return (f.title, where, first[:120])


def test_schemathesis_openapi(server, openapi_doc):
    from schemathesis import GenerationMode
    from schemathesis.checks import content_type_conformance, response_schema_conformance
    from schemathesis.core.failures import Failure, FailureGroup

    doc = copy.deepcopy(openapi_doc)
    _cap_lengths(doc)
    schema = schemathesis.openapi.from_dict(doc)
    findings = Findings(server)
    sess = requests.Session()
    started = time.monotonic()

    for result in schema.get_all_operations():
        op = result.ok()
        declared_5xx = {int(c) for c in op.definition.raw.get("responses", {}) if c.isdigit() and c[0] == "5"}
        has_input = bool(op.definition.raw.get("requestBody") or op.definition.raw.get("parameters"))
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_input else [])
        for mode in modes:

            @settings(max_examples=SCHEMATHESIS_EXAMPLES, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):  # called at once, so the loop variables are current
                findings.requests += 1
                mark = findings.log_mark()
                try:
                    r = case.call(base_url=server.url, session=sess, timeout=REQUEST_TIMEOUT)
                except requests.RequestException as e:
                    findings.server_error(case.method, case.formatted_path, case.body, "no answer", str(e), mark,
                                          op.path)
                    sess.close()
                    return
                body = r.request.body if r.request is not None else None
                path = r.request.path_url if r.request is not None else case.formatted_path
                if r.status_code >= 500 and r.status_code not in declared_5xx:
                    findings.server_error(case.method, path, body, r.status_code, r.content, mark, op.path)
                    return
                try:
                    case.validate_response(r, checks=[response_schema_conformance, content_type_conformance])
                except (Failure, FailureGroup) as e:
                    for f in (e.exceptions if isinstance(e, FailureGroup) else [e]):
                        findings.add("schema", (op.label,) + _failure_key(f), case.method, path, body,
                                     r.status_code, r.content,
                                     f"{f.title}: " + " ".join((f.message or "").split())[:300])

            try:
                run()
            except Unsatisfiable:  # nothing to vary in this mode
                pass
    print(f"schemathesis: {findings.requests} requests in {time.monotonic() - started:.1f}s")
    findings.check("schemathesis over /api/openapi.json")


# ---------------------------------------------------------------- b. bodies from the OpenAI SDK's request types

_EXTREME_INTS = (0, -1, 2**31, 2**63, -2**63 - 1, 2**64, 10**400, -10**400)
_ODD_STRINGS = ("", "\ud800", "a\udfffb", "\x00", "\ufeff", "{{[INPUT]}}", "</s>", "<|im_end|>")


def _iterable(t):
    args = typing.get_args(t)
    return st.lists(st.from_type(args[0]) if args else st.none(), max_size=3)


class _registered:
    """Temporarily register type strategies: the SDK's Iterable[...] fields become lists (JSON arrays), and
    ints and strings include the values that break servers (huge integers, lone surrogates)."""

    STRATEGIES = {
        collections.abc.Iterable: _iterable,
        int: st.one_of(st.integers(), st.sampled_from(_EXTREME_INTS)),
        str: st.one_of(st.text(max_size=24), st.sampled_from(_ODD_STRINGS)),
    }

    def __enter__(self):
        from hypothesis.strategies._internal import types as ht
        self.lookup = ht._global_type_lookup
        self.saved = {t: self.lookup[t] for t in self.STRATEGIES if t in self.lookup}
        for t, s in self.STRATEGIES.items():
            st.register_type_strategy(t, s)

    def __exit__(self, *exc):
        for t in self.STRATEGIES:
            self.lookup.pop(t, None)
        self.lookup.update(self.saved)
        getattr(st.from_type, "__clear_cache")()  # hypothesis caches resolved strategies


def _jsonable(x):
    """What the SDK would put on the wire: iterables as arrays, bytes as text, other objects as strings."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x  # NaN/Infinity go out as Python's json writes them
    if isinstance(x, (fractions.Fraction,)) or hasattr(x, "__float__"):
        return float(x)
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("latin-1")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, collections.abc.Iterable):
        return [_jsonable(v) for v in x]
    return str(x)


def _bound(body: dict) -> dict:
    """Requests stay short: a token budget between GEN_CAP and the context is cut to GEN_CAP (values the server
    must refuse, such as 0, negatives or 10**400, go out unchanged)."""
    for key in _LENGTH_FIELDS:
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and GEN_CAP < v < 4096:
            body[key] = GEN_CAP
    return body


def _openai_types():
    from openai.types import completion_create_params, embedding_create_params, moderation_create_params
    from openai.types.chat import completion_create_params as chat_params
    return [
        ("/v1/chat/completions", chat_params.CompletionCreateParamsNonStreaming),
        ("/v1/completions", completion_create_params.CompletionCreateParamsNonStreaming),
        ("/v1/embeddings", embedding_create_params.EmbeddingCreateParams),
        ("/v1/moderations", moderation_create_params.ModerationCreateParams),
    ]


def test_openai_sdk_request_types(server):
    findings = Findings(server)
    sess = requests.Session()
    started = time.monotonic()
    with _registered():
        for path, typed_dict in _openai_types():

            @settings(max_examples=OPENAI_EXAMPLES, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(body=st.from_type(typed_dict))
            def run(body):  # called at once, so `path` is current
                data = json.dumps(_bound(_jsonable(body))).encode("utf-8")
                r = _send(sess, findings, "POST", path, data)
                if r is None or r.status_code >= 500:
                    return
                try:
                    json.loads(r.content)
                    is_json = r.headers.get("Content-Type", "").startswith("application/json")
                except ValueError:
                    is_json = False
                if not is_json:
                    findings.add("not JSON", (path, r.status_code, r.headers.get("Content-Type")), "POST", path,
                                 data, r.status_code, r.content)

            run()
    print(f"openai types: {findings.requests} requests in {time.monotonic() - started:.1f}s")
    findings.check("hypothesis bodies from the openai SDK's request types")


# ---------------------------------------------------------------- hostile values in every documented body field

# Whole bodies no schema describes: parser limits (nesting, number size, encodings)
_RAW_BODIES = (
    b"[" * 100000 + b"]" * 100000,
    b'{"a":' * 50000 + b"1" + b"}" * 50000,
    b"1e400", b"-1e400", b"9" * 5000, b"NaN", b"null", b"[]", b'"text"', b"true",
    b'{"prompt": "\\ud800"}', b'{"prompt": "\xff\xfe"}', b"\xef\xbb\xbf{}", b"{", b'{"a": 1,}',
)
# Field values, by JSON text: a literal such as 1e400 cannot be written from Python
_HOSTILE = ("1e400", "-1e400", "1" + "0" * 400, "-" + "1" + "0" * 400, "18446744073709551617", "-1", "0", "0.5",
            "NaN", "Infinity", "-Infinity", '"\\ud800"', '"x\\udc00y"', '""', '"1e400"', "true", "null", "{}", "[]",
            '[null]', '[[]]', '{"": null}', "[" * 3000 + "]" * 3000)
# A body each route accepts, to which one hostile field is added
_BASE = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"prompt": "hi", "max_tokens": 4},
    "/v1/embeddings": {"input": "hi"},
    "/v1/edits": {"instruction": "hi", "max_tokens": 4},
    "/v1/moderations": {"input": "hi"},
    "/v1/images/generations": {"prompt": "hi"},
    "/api/v1/generate": {"prompt": "hi", "max_length": 4},
    "/api/extra/generate/stream": {"prompt": "hi", "max_length": 4},
    "/api/generate": {"prompt": "hi", "stream": False, "options": {"num_predict": 4}},
    "/api/chat": {"messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {"num_predict": 4}},
}
# Hostile values inside these objects too
_NESTED = ("options", "stream_options", "response_format", "adapter")


def _with_field(base: dict, dotted: str, literal: str) -> bytes:
    body = copy.deepcopy(base)
    parent, name = body, dotted
    if "." in dotted:
        outer, name = dotted.split(".", 1)
        if not isinstance(body.get(outer), dict):
            body[outer] = {}
        parent = body[outer]
    parent[name] = "@@HOSTILE@@"
    return json.dumps(body).replace('"@@HOSTILE@@"', literal).encode("utf-8")


def _body_routes(doc: dict):
    """(path, body schema) of one route per distinct body (aliases share their canonical route's body)."""
    seen, out = set(), []
    for path, methods in sorted(doc["paths"].items(), key=lambda p: (p[0].count("{"), len(p[0]), p[0])):
        op = methods.get("post")
        if not op or "requestBody" not in op:
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        key = json.dumps(schema, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append((path, schema, {int(c) for c in op["responses"] if c.isdigit() and c[0] == "5"}))
    return out


def test_hostile_values(server, openapi_doc):
    findings = Findings(server)
    sess = requests.Session()
    started = time.monotonic()
    routes = _body_routes(openapi_doc)
    assert len(routes) >= 10
    for path, schema, declared_5xx in routes:
        for raw in _RAW_BODIES:
            _send(sess, findings, "POST", path, raw, declared_5xx=declared_5xx)
        base = _BASE.get(path, {})
        fields = list(schema.get("properties", {}))
        for outer in _NESTED:
            sub = schema.get("properties", {}).get(outer, {})
            fields += [f"{outer}.{k}" for k in (sub.get("properties") or {}) if isinstance(sub, dict)]
        for field in fields:
            for literal in _HOSTILE:
                _send(sess, findings, "POST", path, _with_field(base, field, literal), declared_5xx=declared_5xx)
    # methods nobody routes must be refused, not crash the handler: RFC 9110's 501 for an unrecognized method
    for method in ("TRACE", "QUERY", "PROPFIND"):
        r = _send(sess, findings, method, "/v1/chat/completions", None, declared_5xx=(501,))
        assert r is not None and r.status_code == 501 and "Unsupported method" in r.json()["detail"]["msg"]
    print(f"hostile values: {findings.requests} requests in {time.monotonic() - started:.1f}s")
    findings.check("hostile values in documented body fields")
