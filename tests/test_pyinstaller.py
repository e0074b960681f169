"""The one-file executable (build_spec/): built from a clean copy of the sources, then run with an empty environment
from a folder outside the source tree, the copy deleted first, so nothing can come from the checkout or a venv.

The build takes about a minute on 2 cores; every test here shares it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._launcher_util import Xvfb
from tests.support import ROOT, bundled_model_path, free_port, http, stop_process

SOURCES = ["koboldcpp.py", "gguf_loader", "adapters", "server", "launcher_gui", "klite", "build_spec",
           "requirements.txt", "requirements-build.txt"]


@pytest.fixture(scope="module")
def exe(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("pyinstaller")
    src = top / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    t0 = time.monotonic()
    r = subprocess.run(["bash", "build_spec/build.sh", "--distpath", str(top / "dist"), "--workpath",
                        str(top / "build")], cwd=src, capture_output=True, text=True, timeout=900,
                       env=_build_env())
    assert r.returncode == 0, f"build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    print(f"\nPyInstaller build: {time.monotonic() - t0:.1f}s")
    shutil.rmtree(src)
    shutil.rmtree(top / "build")
    out = top / "dist" / ("koboldcpp.exe" if sys.platform == "win32" else "koboldcpp")
    assert out.is_file()
    print(f"executable: {out.stat().st_size / 1e6:.1f} MB")
    return out


def _build_env() -> dict:
    import os
    env = dict(os.environ)
    env["PYTHON"] = sys.executable  # the interpreter whose packages get bundled
    return env


@pytest.fixture()
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def run(exe: Path, *args: str, home: Path, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], cwd=str(home), env={"HOME": str(home), **env},
                          capture_output=True, text=True, timeout=timeout)


def test_version_and_help(exe, home):
    r = run(exe, "--version", home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("koboldcpp.py ") and "KoboldCpp API" in r.stdout
    r = run(exe, "--help", home=home)
    assert r.returncode == 0, r.stderr
    assert "--model" in r.stdout and "--chatcompletionsadapter" in r.stdout


def test_bad_flag_is_one_line(exe, home):
    r = run(exe, "--port", "notaport", home=home)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_no_model_no_display_says_so(exe, home):
    # The default build does not embed the model: one clear line and exit 1, never a traceback or a hang.
    r = run(exe, home=home)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert "built without the bundled model" in lines[0], lines[0]
    assert not list(home.iterdir()), "nothing should be written for a refused start"


def test_serves_bundled_model(exe, home):
    model = bundled_model_path()
    port = free_port()
    log = home / "server.log"
    t0 = time.monotonic()
    with open(log, "w") as logf:
        proc = subprocess.Popen([str(exe), "--model", model, "--port", str(port), "--skiplauncher",
                                 "--contextsize", "2048", "--chatcompletionsadapter", "Gemma"],
                                cwd=str(home), env={"HOME": str(home)}, stdout=logf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() - t0 < 120, f"not serving after 120s:\n{log.read_text()}"
            try:
                status, _, body = http("GET", url + "/api/v1/model", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        print(f"\nstart-up to /api/v1/model: {time.monotonic() - t0:.2f}s")
        assert body == {"result": "koboldcpp/gemma-3-270m-q4_k_m"}

        status, _, body = http("POST", url + "/api/v1/generate",
                               {"prompt": "The capital of France is", "max_length": 6, "temperature": 0})
        assert status == 200, body
        res = body["results"][0]
        assert isinstance(res["text"], str) and res["text"].strip() and res["completion_tokens"] > 0

        status, _, body = http("POST", url + "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6,
                                "temperature": 0})
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
        assert isinstance(body["choices"][0]["message"]["content"], str)

        # klite/ and adapters/presets/ come from inside the executable.
        status, headers, page = http("GET", url + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<html" in page.lower()
        assert "Chat completions adapter: Gemma" in log.read_text()
    finally:
        stop_process(proc, 20)  # SIGTERM: the one-file bootloader passes it on to the Python process
    assert proc.returncode == 0, log.read_text()


def _xvfb() -> Xvfb:
    if not (shutil.which("Xvfb") and shutil.which("xdotool")):
        pytest.skip("Xvfb and xdotool are needed (tests/run.sh installs them when run as root)")
    return Xvfb()


def test_launcher_opens_on_display(exe, home):
    xvfb = _xvfb()
    display = xvfb.display
    proc = None
    try:
        proc = subprocess.Popen([str(exe)], cwd=str(home), env={"HOME": str(home), "DISPLAY": display},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        found = False
        while time.monotonic() < deadline and not found:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{proc.stdout.read()}"
            found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "^KoboldCpp Launcher$"],
                                   env={"DISPLAY": display}, capture_output=True).returncode == 0
            time.sleep(0.2)
        assert found, "the launcher window did not appear within 60s"
        time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
    finally:
        if proc is not None:
            stop_process(proc)  # SIGTERM: the one-file bootloader passes it on to the Python process
        xvfb.stop()
    out = proc.stdout.read()
    assert "Traceback" not in out and "warning" not in out.lower(), out


def test_serves_images_with_a_projector(exe, home, tmp_path):
    """libmtmd and Pillow are inside the executable: --mmproj loads and an image is decoded and counted."""
    import base64
    from tests.tinymmproj import image_tokens, png_bytes, tiny_mmproj
    proj = tmp_path / "mmproj.gguf"
    shutil.copy2(tiny_mmproj(), proj)
    port = free_port()
    log = home / "server.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([str(exe), "--model", bundled_model_path(), "--mmproj", str(proj), "--port", str(port),
                                 "--skiplauncher", "--contextsize", "1024"],
                                cwd=str(home), env={"HOME": str(home)}, stdout=logf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() - t0 < 120, f"not serving after 120s:\n{log.read_text()}"
            try:
                if http("GET", url + "/api/v1/model", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert http("GET", url + "/api/extra/version")[2]["vision"] is True
        img = base64.b64encode(png_bytes()).decode()
        status, _, body = http("POST", url + "/api/v1/generate", {"prompt": "Describe.", "max_length": 2,
                                                                  "images": [img]})
        assert status == 200, body
        assert http("GET", url + "/api/extra/perf")[2]["last_media_tokens"] == image_tokens()
    finally:
        stop_process(proc, 20)
