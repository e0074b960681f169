"""Operational state of one server: model-load progress, request counters for /metrics, and the console's progress
lines for long prompts. Everything here belongs to one Server object (no module-level mutable state)."""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Optional, Tuple

from .http import log_line


class LoadStatus:
    """Progress of the model load (0..1), fed by llama.cpp's progress callback; prints a line every 10%."""

    def __init__(self, what: str, quiet_console: bool = False, cancelled: Callable[[], bool] = lambda: False):
        self.what = what
        self.progress = 0.0
        self.started = time.monotonic()
        self._shown = -1
        self._quiet = quiet_console
        self._cancelled = cancelled

    def update(self, p: float) -> bool:
        """The llama.cpp callback: returns False to cancel the load (the server is stopping)."""
        self.progress = max(0.0, min(1.0, p))
        step = int(self.progress * 10)
        if step != self._shown and not self._quiet:
            self._shown = step
            log_line(f"Loading model: {step * 10:3d}%  ({time.monotonic() - self.started:.1f} s)")
        return not self._cancelled()


class RequestMetrics:
    """Requests by (route, method, status) with their total seconds; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, str, str], list] = {}
        self.started = time.time()

    def record(self, route: str, method: str, status, seconds: float):
        key = (route, method, str(status))
        with self._lock:
            c = self.requests.setdefault(key, [0, 0.0])
            c[0] += 1
            c[1] += seconds

    def snapshot(self) -> Dict[Tuple[str, str, str], tuple]:
        with self._lock:
            return {k: (v[0], v[1]) for k, v in self.requests.items()}


class PromptProgressLog:
    """A background thread printing one console line per second for each prompt of more than `min_tokens`
    uncached tokens while it is processed (the engine has no idea of consoles; it is read through slots_info)."""

    def __init__(self, engine, min_tokens: int = 512, interval: float = 1.0):
        self.engine = engine
        self.min_tokens = min_tokens
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="prompt-progress", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def _run(self):
        shown: Dict[int, int] = {}  # job id -> processed count last printed
        while not self._stop.wait(self.interval):
            try:
                slots = self.engine.slots_info()
            except Exception:
                continue
            live = set()
            for s in slots:
                p = s.get("progress")
                if not s["busy"] or not p:
                    continue
                live.add(s["job_id"])
                todo = p["total"] - p["cache"]
                if todo < self.min_tokens or shown.get(s["job_id"]) == p["processed"]:
                    continue
                shown[s["job_id"]] = p["processed"]
                pct = 100 * (p["processed"] - p["cache"]) / max(1, todo)
                log_line(f"[slot {s['id']}] prompt {p['processed']}/{p['total']} tokens "
                         f"({min(100.0, pct):.0f}%, {p['time_ms'] / 1000:.1f} s)")
            for k in list(shown):
                if k not in live:
                    del shown[k]
