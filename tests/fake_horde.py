"""A loopback fake of the AI Horde's text-worker routes (v2 generate/text/pop and generate/text/submit).

Every request it receives is checked against the Horde's published API models (PopInputKobold, SubmitInput: field
names, types, ranges, the apikey header); a request that breaks the shape is answered 400 as the Horde would and
recorded in `violations`, which tests assert empty."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# PopInputKobold: field -> accepted types
POP_FIELDS = {"name": str, "priority_usernames": list, "nsfw": bool, "models": list, "bridge_agent": str,
              "threads": int, "require_upfront_kudos": bool, "amount": int, "extra_slow_worker": bool,
              "max_length": int, "max_context_length": int, "softprompts": list}
SUBMIT_FIELDS = {"id": str, "generation": str, "state": str, "seed": int, "gen_metadata": list}
SUBMIT_STATES = {"ok", "censored", "faulted", "csam"}


def check_pop(body) -> list:
    errs = []
    if not isinstance(body, dict):
        return ["pop body is not an object"]
    for k, v in body.items():
        t = POP_FIELDS.get(k)
        if t is None:
            errs.append(f"pop: unknown field {k}")
        elif not isinstance(v, t) or (t is int and isinstance(v, bool)):
            errs.append(f"pop: {k} should be {t.__name__}, got {v!r}")
    if not isinstance(body.get("name"), str) or not body.get("name"):
        errs.append("pop: name is required")
    if isinstance(body.get("bridge_agent"), str) and (len(body["bridge_agent"]) > 1000
                                                      or body["bridge_agent"].count(":") < 2):
        errs.append("pop: bridge_agent must be name:version:url, at most 1000 characters")
    for k in ("models", "priority_usernames", "softprompts"):
        if isinstance(body.get(k), list) and not all(isinstance(x, str) for x in body[k]):
            errs.append(f"pop: {k} must hold strings")
    for k in ("threads", "amount", "max_length", "max_context_length"):
        if isinstance(body.get(k), int) and body[k] < 1:
            errs.append(f"pop: {k} must be positive")
    return errs


def check_submit(body) -> list:
    errs = []
    if not isinstance(body, dict):
        return ["submit body is not an object"]
    for k, v in body.items():
        t = SUBMIT_FIELDS.get(k)
        if t is None:
            errs.append(f"submit: unknown field {k}")
        elif not isinstance(v, t) or (t is int and isinstance(v, bool)):
            errs.append(f"submit: {k} should be {t.__name__}, got {v!r}")
    for k in ("id", "generation"):
        if k not in body:
            errs.append(f"submit: {k} is required")
    if "state" in body and body["state"] not in SUBMIT_STATES:
        errs.append(f"submit: state {body['state']!r} is not one of {sorted(SUBMIT_STATES)}")
    return errs


class FakeHorde:
    def __init__(self, api_key: str, model: str | None = None):
        self.api_key = api_key
        self.model = model
        self.jobs = []  # payloads still to hand out
        self.handed = {}  # job id -> payload
        self.pops = []  # (time, body)
        self.submits = []  # (time, body)
        self.violations = []
        self.submit_status = 200  # or an error status to refuse submits with
        self.submit_fail_times = 0  # answer 503 to this many submits first
        self.reward = 10.5
        self.lock = threading.Lock()
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                self._send(*fake.handle(self.path, self.headers, body))

            def do_GET(self):
                with fake.lock:
                    fake.violations.append(f"GET {self.path}: the worker only POSTs")
                self._send(405, {"message": "method not allowed"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def add_job(self, payload: dict) -> str:
        jid = str(uuid.uuid4())
        with self.lock:
            self.jobs.append((jid, payload))
        return jid

    def handle(self, path, headers, body):
        now = time.monotonic()
        with self.lock:
            if headers.get("apikey") != self.api_key:
                self.violations.append(f"{path}: wrong or missing apikey header")
                return 401, {"message": "Invalid API Key", "rc": "InvalidAPIKey"}
            if "application/json" not in (headers.get("Content-Type") or ""):
                self.violations.append(f"{path}: Content-Type is not JSON")
            if path == "/api/v2/generate/text/pop":
                errs = check_pop(body)
                self.pops.append((now, body))
                if errs:
                    self.violations += errs
                    return 400, {"message": "; ".join(errs), "rc": "BadRequest"}
                if self.model and self.model not in body.get("models", []):
                    self.violations.append(f"pop: models {body.get('models')} lack {self.model}")
                if not self.jobs:
                    return 200, {"id": None, "ids": [], "skipped": {"max_context_length": 0, "max_length": 0}}
                jid, payload = self.jobs.pop(0)
                self.handed[jid] = payload
                return 200, {"payload": payload, "id": jid, "ids": [jid], "ttl": 150, "skipped": {},
                             "model": (body.get("models") or [""])[0]}
            if path == "/api/v2/generate/text/submit":
                errs = check_submit(body)
                self.submits.append((now, body))
                if errs:
                    self.violations += errs
                    return 400, {"message": "; ".join(errs), "rc": "BadRequest"}
                if body["id"] not in self.handed:
                    self.violations.append(f"submit: unknown job id {body['id']}")
                    return 404, {"message": "Processing Generation does not exist", "rc": "InvalidJobID"}
                if self.submit_fail_times > 0:
                    self.submit_fail_times -= 1
                    return 503, {"message": "Service unavailable", "rc": "ServiceUnavailable"}
                if self.submit_status != 200:
                    return self.submit_status, {"message": "Processing Generation is stale", "rc": "AbortedGen"}
                return 200, {"reward": self.reward}
            self.violations.append(f"POST {path}: not a worker route")
            return 404, {"message": "not found"}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
