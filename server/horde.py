"""AI Horde worker: pops text jobs from the Horde, runs them through the engine like any local request, and submits
the results. Request and response shapes follow the Horde's published API (v2 `generate/text/pop` and
`generate/text/submit`, models GenerationPayloadKobold / PopInputKobold / SubmitInput).

Local users keep priority: a job is popped only while a slot is free and nobody waits in the queue. The key is sent
only in the `apikey` header and never printed."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from typing import Callable, Optional

from adapters import kobold
from adapters.errors import ApiError
from adapters.run import JobRunner
from gguf_loader.jobs import InvalidRequest, QueueFull

DEFAULT_URL = "https://aihorde.net/api"
BRIDGE_AGENT = "koboldcpp.py:{version}:https://github.com/LostRuins/koboldcpp"
HORDE_MAX_LENGTH = 1024  # the Horde's own limits on a job's max_length and max_context_length
HORDE_MAX_CONTEXT = 32768


@dataclass
class HordeConfig:
    api_key: str
    worker_name: str
    model_name: str  # as the Horde lists it, e.g. "koboldcpp/mymodel"
    url: str = DEFAULT_URL  # API base, without /v2
    max_context_length: int = 2048
    max_length: int = 512
    version: str = "0"
    nsfw: bool = True
    http_timeout: float = 30.0
    empty_wait: float = 2.0  # seconds between pops that found nothing
    backoff_min: float = 2.0  # first wait after an error; doubles up to backoff_max
    backoff_max: float = 60.0
    slot_wait: float = 0.5  # how often a busy server is checked for a free slot
    submit_tries: int = 3  # tries of a submit that failed for a network or 5xx reason
    job_wait: float = 120.0  # how long a popped job may wait for a slot a local user took


class HordeError(Exception):
    def __init__(self, msg: str, status: int = 0):
        super().__init__(msg)
        self.status = status


class HordeWorker:
    def __init__(self, cfg: HordeConfig, engine, defaults: kobold.GenDefaults, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.engine = engine
        self.defaults = defaults
        self.log = log
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._stats = {"popped": 0, "submitted": 0, "faulted": 0, "rejected": 0, "tokens": 0, "kudos": 0.0,
                       "errors": 0, "empty_pops": 0, "last_error": ""}

    # ---- lifecycle

    def start(self):
        self.log(f"Horde worker '{self.cfg.worker_name}' serving {self.cfg.model_name} to {self.cfg.url} "
                 f"(max context {self.cfg.max_context_length}, max length {self.cfg.max_length})")
        self._thread = threading.Thread(target=self._run, name="horde-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        """Stops popping; a job in progress is aborted (the Horde reassigns jobs that are never submitted)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def _count(self, **kw):
        with self._lock:
            for k, v in kw.items():
                if k == "last_error":
                    self._stats[k] = v
                else:
                    self._stats[k] += v

    # ---- HTTP

    def _call(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.cfg.url.rstrip("/") + path, data=json.dumps(body).encode("utf-8"), method="POST",
            headers={"apikey": self.cfg.api_key, "Content-Type": "application/json", "Accept": "application/json",
                     "Client-Agent": BRIDGE_AGENT.format(version=self.cfg.version)})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.http_timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw).get("message") or ""
            except (ValueError, AttributeError):
                msg = ""
            raise HordeError(f"HTTP {e.code}: {msg or e.reason}"[:300], e.code)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise HordeError(f"cannot reach the Horde: {reason}"[:300])
        try:
            data = json.loads(raw)
        except ValueError:
            raise HordeError("the Horde answered something that is not JSON")
        if not isinstance(data, dict):
            raise HordeError("the Horde answered JSON that is not an object")
        return data

    def pop_body(self) -> dict:
        c = self.cfg
        return {"name": c.worker_name, "models": [c.model_name], "max_length": c.max_length,
                "max_context_length": c.max_context_length, "priority_usernames": [], "softprompts": [],
                "bridge_agent": BRIDGE_AGENT.format(version=c.version), "threads": max(1, self.engine.n_slots),
                "nsfw": c.nsfw, "require_upfront_kudos": False, "amount": 1}

    # ---- the loop

    def _slot_free(self) -> bool:
        """Local users first: a slot is free and no request waits for one."""
        return self.engine.queue_length() == 0 and len(self.engine.jobs()) < self.engine.n_slots

    def _run(self):
        backoff = self.cfg.backoff_min
        while not self._stop.is_set():
            if not self._slot_free():
                self._stop.wait(self.cfg.slot_wait)
                continue
            try:
                pop = self._call("/v2/generate/text/pop", self.pop_body())
            except HordeError as e:
                self._count(errors=1, last_error=str(e))
                self.log(f"Horde: pop failed ({e}); retrying in {backoff:g} s")
                self._stop.wait(backoff)
                backoff = min(self.cfg.backoff_max, backoff * 2)
                continue
            backoff = self.cfg.backoff_min
            if not pop.get("id") or not isinstance(pop.get("payload"), dict):
                self._count(empty_pops=1)
                self._stop.wait(self.cfg.empty_wait)
                continue
            self._count(popped=1)
            try:
                self._do_job(pop)
            except Exception as e:  # a bug in one job must not end the worker
                self._count(errors=1, last_error=f"{type(e).__name__}: {e}")
                self.log(f"Horde: job {str(pop.get('id'))[:8]} failed: {type(e).__name__}: {e}")

    def request_for(self, payload: dict):
        """The job's payload (KoboldAI generate fields) as our GenRequest, within this worker's limits. The Horde
        returns stop sequences as part of the text (trim_stop false); `singleline` stops at the first newline."""
        body = dict(payload)
        ctx = min(self.cfg.max_context_length, self.defaults.max_context_length)
        body["max_context_length"] = min(_int(body.get("max_context_length"), ctx), ctx)
        body["max_length"] = min(_int(body.get("max_length"), 80), self.cfg.max_length, body["max_context_length"] - 1)
        body["trim_stop"] = False
        if body.get("singleline") is True:
            stops = body.get("stop_sequence") if isinstance(body.get("stop_sequence"), list) else []
            body["stop_sequence"] = stops + ["\n"]
        for k in ("genkey", "grammar", "logprobs"):  # a Horde client may not steer our server beyond sampling
            body.pop(k, None)
        return kobold.parse_generate(body, replace(self.defaults, max_context_length=ctx))

    def _do_job(self, pop: dict):
        job_id = str(pop["id"])
        short = job_id[:8]
        t0 = time.monotonic()
        text, state, seed, tokens = "", "ok", 0, 0
        try:
            req = self.request_for(pop["payload"])
            result = self._generate(req)
            if result is None:
                return  # stopping: the Horde reassigns the job after its ttl
            if result.error:
                raise ApiError(result.error)
            text, seed, tokens = result.text, result.seed, result.completion_tokens
        except (ApiError, InvalidRequest, QueueFull) as e:
            msg = e.msg if isinstance(e, ApiError) else str(e)
            state = "faulted"
            self.log(f"Horde: job {short} failed ({msg}); reporting it as faulted")
        body = {"id": job_id, "generation": text, "state": state, "seed": int(seed) & 0x7FFFFFFF}
        reward = self._submit(body, short)
        if reward is None:
            return
        if state == "ok":
            self._count(submitted=1, tokens=tokens, kudos=reward)
            st = self.stats()
            self.log(f"Horde: job {short} done: {tokens} tokens in {time.monotonic() - t0:.1f} s, "
                     f"+{reward:g} kudos (jobs {st['submitted']}, tokens {st['tokens']}, kudos {st['kudos']:g})")
        else:
            self._count(faulted=1)

    def _generate(self, req):
        """Runs the request as a local job would; waits (bounded) for a slot if a local user took it meanwhile."""
        runner = JobRunner(self.engine, is_gone=self._stop.is_set)
        deadline = time.monotonic() + self.cfg.job_wait
        while True:
            try:
                job = self.engine.submit(req)
                break
            except QueueFull:
                if self._stop.is_set():
                    return None
                if time.monotonic() >= deadline:
                    raise
                self._stop.wait(self.cfg.slot_wait)
        try:
            return runner.wait(job)
        except Exception:
            if self._stop.is_set():
                return None
            raise

    def _submit(self, body: dict, short: str) -> Optional[float]:
        """-> kudos awarded, or None when the Horde refused the result or could not be reached."""
        wait = self.cfg.backoff_min
        for attempt in range(self.cfg.submit_tries):
            try:
                res = self._call("/v2/generate/text/submit", body)
                reward = res.get("reward", 0)
                return float(reward) if isinstance(reward, (int, float)) else 0.0
            except HordeError as e:
                if 400 <= e.status < 500:  # refused (stale job, duplicate, bad key): retrying cannot help
                    self._count(rejected=1, last_error=str(e))
                    self.log(f"Horde: submit of job {short} refused ({e})")
                    return None
                self._count(errors=1, last_error=str(e))
                if attempt + 1 < self.cfg.submit_tries and not self._stop.is_set():
                    self.log(f"Horde: submit of job {short} failed ({e}); retrying in {wait:g} s")
                    self._stop.wait(wait)
                    wait = min(self.cfg.backoff_max, wait * 2)
        self._count(rejected=1)
        self.log(f"Horde: gave up submitting job {short}")
        return None


def _int(v, default: int) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e9 else default
