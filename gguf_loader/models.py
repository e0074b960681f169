"""A set of offered models, loaded on demand: each loaded model is whatever `load(spec)` builds (the server's
per-model bundle around one Engine). At most `max_loaded` are held; past that the least recently used idle one is
unloaded, and `unload_timeout` unloads a model idle that long. A lease (reference count) keeps a model loaded while a
request uses it, so a switch waits for running generations instead of cutting them.

Knows nothing of HTTP: callers map LoadFailed / UnknownModel to their own errors."""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


class UnknownModel(Exception):
    pass


class LoadFailed(Exception):
    pass


@dataclass
class ModelSpec:
    id: str  # stable id: "koboldcpp/<file stem>" (or --hordemodelname for --model)
    path: str  # the .gguf file (or the .kcpps naming one)
    config: Optional[str] = None  # the .kcpps carrying this model's own settings
    aliases: List[str] = field(default_factory=list)  # other names that select it (stem, file name)


def model_id(path: str) -> str:
    base = os.path.splitext(os.path.basename(path))[0]
    return "koboldcpp/" + re.sub(r"[^\w.\-]", "_", base)


def scan_dir(directory: str) -> List[ModelSpec]:
    """Every .gguf and .kcpps directly in `directory`, sorted by name; a .kcpps wins over a .gguf of the same stem.
    Multi-part GGUFs are offered by their first part only."""
    found: Dict[str, ModelSpec] = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        low = name.lower()
        if not os.path.isfile(full) or not low.endswith((".gguf", ".kcpps")):
            continue
        part = re.search(r"-(\d{5})-of-\d{5}\.gguf$", low)
        if part and part.group(1) != "00001":
            continue
        spec = ModelSpec(model_id(full), full, full if low.endswith(".kcpps") else None,
                         [os.path.splitext(name)[0], name])
        if spec.id not in found or spec.config:
            found[spec.id] = spec
    return list(found.values())


@dataclass
class _Loaded:
    spec: ModelSpec
    value: object = None  # what load() built; None while loading
    error: Optional[str] = None
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)


class Lease:
    """A loaded model held for one request; release() (or leaving the `with`) lets it be unloaded again."""

    def __init__(self, manager: "ModelManager", entry: _Loaded):
        self._m, self._e = manager, entry
        self.value = entry.value
        self.spec = entry.spec

    def release(self):
        if self._e is not None:
            self._m._release(self._e)
            self._e = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class ModelManager:
    def __init__(self, specs: List[ModelSpec], load: Callable[[ModelSpec], object], unload: Callable[[object], None],
                 busy: Callable[[object], bool], check: Callable[[ModelSpec], None] = lambda s: None,
                 default: Optional[str] = None, max_loaded: int = 1,
                 unload_timeout: float = 0.0, log: Callable[[str], None] = print):
        if not specs:
            raise ValueError("no models offered")
        self.specs = {s.id: s for s in specs}
        self._load, self._unload, self._busy, self._check, self._log = load, unload, busy, check, log
        self._checked: set = set()  # ids whose files passed check() (it runs before the first load only)
        self.max_loaded = max(1, max_loaded)
        self.unload_timeout = unload_timeout
        self.current = default if default in self.specs else specs[0].id
        self._cond = threading.Condition()
        self._loaded: Dict[str, _Loaded] = {}  # includes those loading
        self._closing = 0  # unloads in progress (their memory is not free yet)
        self._stop = False
        self.switches = 0
        if unload_timeout > 0:
            threading.Thread(target=self._reaper, name="model-reaper", daemon=True).start()

    # ---- names ----

    def find(self, name) -> Optional[ModelSpec]:
        """The offered model a request's `model` names (id, file stem or file name, any case, Ollama's ':latest'
        tag ignored), or None."""
        if not isinstance(name, str) or not name.strip():
            return None
        n = name.strip()
        if n.lower().endswith(":latest"):
            n = n[:-7]
        low = n.lower()
        for s in self.specs.values():
            if low == s.id.lower() or low in (a.lower() for a in s.aliases):
                return s
        return None

    def state_of(self, model_id: str) -> str:
        with self._cond:
            e = self._loaded.get(model_id)
            return "unloaded" if e is None else ("loaded" if e.value is not None else "loading")

    def listing(self) -> List[tuple]:
        """(spec, state) of every offered model, in offer order."""
        return [(s, self.state_of(s.id)) for s in self.specs.values()]

    def is_loaded(self, name=None) -> bool:
        """Whether the model `name` selects (unknown: the current one) is loaded now."""
        spec = self.find(name) or self.specs[self.current]
        return self.state_of(spec.id) == "loaded"

    def peek(self, model_id: str):
        """The loaded value of a model without leasing or loading it (None when not loaded): for reading plain
        settings only, never the engine (it may be unloaded at any moment)."""
        with self._cond:
            e = self._loaded.get(model_id)
            return e.value if e is not None else None

    def loaded_values(self) -> List[object]:
        with self._cond:
            return [e.value for e in self._loaded.values() if e.value is not None]

    # ---- leases ----

    def acquire(self, name=None, make_current: bool = False) -> Lease:
        """A lease on the model `name` names (None or no match: the current model), loading it if needed; blocks
        while it loads or while room is made. Raises LoadFailed."""
        spec = self.find(name) or self.specs[self.current]
        with self._cond:
            while True:
                if self._stop:
                    raise LoadFailed("the server is shutting down")
                e = self._loaded.get(spec.id)
                if e is not None and e.value is not None:
                    e.refs += 1
                    e.last_used = time.monotonic()
                    if make_current or name is not None:
                        self.current = spec.id
                    return Lease(self, e)
                if e is None:
                    if spec.id not in self._checked:
                        try:  # a file that cannot load is refused before anything is unloaded
                            self._check(spec)
                        except Exception as ex:
                            raise LoadFailed(f"could not load {spec.id}: {ex}")
                        self._checked.add(spec.id)
                    if not self._make_room():
                        self._cond.wait(0.5)
                        continue
                    e = self._start_load(spec)
                while e.value is None and e.error is None and not self._stop:
                    self._cond.wait(0.5)
                if e.error is not None:
                    raise LoadFailed(f"could not load {spec.id}: {e.error}")

    def load(self, name) -> Lease:
        """An explicit load (admin routes): unknown names raise UnknownModel; the model becomes the current one."""
        if self.find(name) is None:
            raise UnknownModel(f"no model named {name!r} is offered")
        return self.acquire(name, make_current=True)

    def unload(self, name) -> bool:
        """Unload a model now (waiting for its requests to finish). False when it was not loaded."""
        spec = self.find(name)
        if spec is None:
            raise UnknownModel(f"no model named {name!r} is offered")
        with self._cond:
            while True:
                e = self._loaded.get(spec.id)
                if e is None:
                    return False
                if e.value is not None and e.refs == 0 and not self._busy(e.value):
                    self._evict(e)
                    return True
                self._cond.wait(0.5)

    def _release(self, e: _Loaded):
        with self._cond:
            e.refs -= 1
            e.last_used = time.monotonic()
            self._cond.notify_all()

    # ---- loading and unloading (lock held unless said) ----

    def _make_room(self) -> bool:
        """True when one more model may start loading; unloads the least recently used idle model if needed."""
        while len(self._loaded) + self._closing >= self.max_loaded:
            idle = [e for e in self._loaded.values()
                    if e.value is not None and e.refs == 0 and not self._busy(e.value)]
            if not idle:
                return False
            self._evict(min(idle, key=lambda e: e.last_used))
        return True

    def _evict(self, e: _Loaded):
        del self._loaded[e.spec.id]
        self._closing += 1
        self._log(f"Unloading {e.spec.id}")
        self._cond.release()
        try:
            self._unload(e.value)
        finally:
            self._cond.acquire()
            self._closing -= 1
            self._cond.notify_all()

    def _start_load(self, spec: ModelSpec):
        e = _Loaded(spec)
        self._loaded[spec.id] = e
        self.switches += 1
        threading.Thread(target=self._load_thread, args=(e,), name="model-load", daemon=True).start()
        return e

    def _load_thread(self, e: _Loaded):
        self._log(f"Loading {e.spec.id} ({e.spec.path})")
        try:
            value, error = self._load(e.spec), None
        except Exception as ex:  # any failure of one model's load is that model's error, never the server's
            value, error = None, str(ex) or type(ex).__name__
        with self._cond:
            if error is None:
                e.value = value
                e.last_used = time.monotonic()
            else:
                self._log(f"Loading {e.spec.id} failed: {error}")
                e.error = error
                del self._loaded[e.spec.id]
                self._checked.discard(e.spec.id)
                # the model it was to replace serves again
                if self.current != e.spec.id and self.current not in self._loaded and not self._stop \
                        and self._make_room():
                    self._start_load(self.specs[self.current])
            self._cond.notify_all()

    def wait_loaded(self, name=None) -> None:
        """Load (if needed) without keeping a lease. Raises LoadFailed with the load's error."""
        self.acquire(name, make_current=True).release()

    def _reaper(self):
        with self._cond:
            while not self._stop:
                self._cond.wait(min(1.0, self.unload_timeout / 2))
                now = time.monotonic()
                for e in list(self._loaded.values()):
                    if (e.value is not None and e.refs == 0 and now - e.last_used >= self.unload_timeout
                            and not self._busy(e.value)):
                        self._log(f"{e.spec.id} idle for {self.unload_timeout:g}s")
                        self._evict(e)

    def close(self):
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            entries = [e for e in self._loaded.values() if e.value is not None]
            self._loaded.clear()
        for e in entries:
            self._unload(e.value)
