"""Routes for load balancers and monitoring (/health, /slots, /props, /metrics), the port serving while the model
loads, SSE keep-alive lines during a queued wait, and prompt progress (return_progress, console lines)."""
from __future__ import annotations

import http.client as httpclient
import json
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import KOBOLDCPP, ROOT, ServerProcess, bundled_model_path, free_port, http


def _metrics(url) -> dict:
    st, h, raw = http("GET", url + "/metrics")
    assert st == 200 and h["Content-Type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(raw.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _one(m, name, **labels):
    vals = [v for lab, v in m.get(name, []) if all(lab.get(k) == v2 for k, v2 in labels.items())]
    assert len(vals) == 1, (name, labels, m.get(name))
    return vals[0]


# ---------------------------------------------------------------- loading

def test_health_and_api_answer_503_while_loading():
    """In-process: a server with no state yet (the model loads) answers /health 503 with progress, the API and the
    page 503, then 200 once the state is set."""
    from server.app import build_server
    from server.ops import LoadStatus
    srv = build_server("127.0.0.1", 0)
    srv.load = LoadStatus("m.gguf", quiet_console=True)
    srv.load.update(0.42)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        st, h, body = http("GET", url + "/health")
        assert st == 503 and body["status"] == "loading" and body["progress"] == pytest.approx(0.42)
        assert h.get("Retry-After")
        st, _, body = http("GET", url + "/api/v1/model")
        assert st == 503 and body["status"] == "loading" and "42%" in body["detail"]["msg"]
        st, _, body = http("POST", url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert st == 503 and body["error"]["message"].startswith("Loading model")
        st, h, page = http("GET", url + "/")
        assert st == 503 and b"Loading the model: 42%" in page and b"refresh" in page
        st, _, _ = http("POST", url + "/api/v1/generate", b"x" * (2 << 20))
        assert st == 413
    finally:
        srv.shutdown()
        srv.server_close()


def test_port_opens_before_the_model_loads():
    """End to end: the first answers come while loading (503, progress between 0 and 1), then 200; a test client
    waiting on /api/v1/model (tests/support.py) sees 503, never a refused connection once the port is open."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(KOBOLDCPP), "--model", bundled_model_path(), "--port", str(port),
                             "--skiplauncher", "--contextsize", "1024"], cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        end = time.monotonic() + 90
        while time.monotonic() < end:
            try:
                st, _, body = http("GET", f"http://127.0.0.1:{port}/health", timeout=5)
            except OSError:
                assert not seen, "the port closed again after it opened"
                time.sleep(0.01)
                continue
            seen.append((st, body))
            if st == 200:
                break
            time.sleep(0.01)
        assert seen and seen[-1][0] == 200 and seen[-1][1]["status"] == "ok"
        for st, body in seen[:-1]:
            assert st == 503 and body["status"] == "loading" and 0 <= body["progress"] <= 1
        assert any(st == 503 for st, _ in seen), "no answer during the load (it took %d polls)" % len(seen)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "Loading model: 100%" in out
    assert proc.returncode == 0


# ---------------------------------------------------------------- slots, props, metrics

@pytest.fixture(scope="module")
def two_slots():
    with ServerProcess(bundled_model_path(), "--contextsize", "1024", "--parallelrequests", "2",
                       "--batchsize", "64", "--threads", "1") as s:
        yield s


def _long_gen(url, n=300, genkey="K1"):
    return http("POST", url + "/api/v1/generate", {"prompt": "Once upon a time", "max_length": n,
                                                   "ban_eos_token": True, "genkey": genkey})


def test_slots_health_props_metrics(two_slots):
    url = two_slots.url
    st, _, props = http("GET", url + "/props")
    assert st == 200 and props["total_slots"] == 2
    assert props["default_generation_settings"]["n_ctx"] == 1024
    assert props["modalities"] == {"vision": False, "audio": False}
    assert isinstance(props["chat_template"], str) and props["build_info"]
    st, _, body = http("GET", url + "/health")
    assert st == 200 and body == {"status": "ok", "slots_idle": 2, "slots_processing": 0}

    out = {}  # a long job, aborted once the checks are done (so the test takes the same time on any machine)
    t = threading.Thread(target=lambda: out.setdefault("r", _long_gen(url, n=900, genkey="SLOTS")))
    t.start()
    try:
        busy = None
        for _ in range(200):
            st, _, slots = http("GET", url + "/slots")
            busy = [s for s in slots if s["is_processing"]]
            if busy and busy[0]["next_token"]["n_decoded"] > 5:
                break
            time.sleep(0.05)
        assert len(slots) == 2 and len(busy) == 1
        b = busy[0]
        assert b["id_task"] > 0 and b["n_cached"] > 0 and b["n_ctx"] == 1024
        assert b["prompt_progress"]["processed"] == b["prompt_progress"]["total"]
        assert b["next_token"]["n_remain"] + b["next_token"]["n_decoded"] == 900
        st, _, body = http("GET", url + "/health?fail_on_no_slot=1")
        assert st == 200 and body["slots_idle"] == 1 and body["slots_processing"] == 1
        assert http("GET", url + "/slots?fail_on_no_slot=1")[0] == 200
        m = _metrics(url)
        assert _one(m, "kcpp_slots_busy") == 1 and _one(m, "kcpp_slots_total") == 2
        assert _one(m, "kcpp_kv_cache_cells_used") > 5
        decoded = b["next_token"]["n_decoded"]
    finally:
        http("POST", url + "/api/extra/abort", {"genkey": "SLOTS"})
        t.join(60)
    assert out["r"][0] == 200

    st, _, _ = http("POST", url + "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert st == 200
    http("POST", url + "/v1/completions", {"prompt": 5})  # a 400
    m = _metrics(url)
    assert _one(m, "kcpp_requests_total", route="/v1/completions", method="POST", status="200") >= 1
    assert _one(m, "kcpp_requests_total", route="/v1/completions", method="POST", status="400") >= 1
    assert _one(m, "kcpp_requests_total", route="/api/v1/generate", method="POST", status="200") >= 1
    assert _one(m, "kcpp_generated_tokens_total") >= decoded + 4
    assert _one(m, "kcpp_prompt_tokens_total") > 0
    assert _one(m, "kcpp_generation_tokens_per_second") > 1
    assert _one(m, "kcpp_model_load_seconds") > 0
    assert _one(m, "kcpp_queue_depth") == 0 and _one(m, "kcpp_model_loaded") == 1
    # arbitrary paths never become labels (bounded cardinality)
    http("GET", url + "/no/such/route/123")
    assert not any("123" in lab.get("route", "") for lab, _ in _metrics(url)["kcpp_requests_total"])


def test_fail_on_no_slot_and_password():
    with ServerProcess(bundled_model_path(), "--contextsize", "1024", "--password", "pw", "--threads", "1") as s:
        auth = {"Authorization": "Bearer pw"}
        assert http("GET", s.url + "/health")[0] == 200  # probes need no key
        for p in ("/slots", "/props", "/metrics"):
            assert http("GET", s.url + p)[0] == 401
            assert http("GET", s.url + p, headers=auth)[0] == 200
        t = threading.Thread(target=lambda: http("POST", s.url + "/api/v1/generate", {
            "prompt": "Once", "max_length": 900, "ban_eos_token": True, "genkey": "BUSY"}, headers=auth))
        t.start()
        try:
            for _ in range(200):
                if http("GET", s.url + "/health")[2]["slots_processing"] == 1:
                    break
                time.sleep(0.05)
            st, _, body = http("GET", s.url + "/health?fail_on_no_slot=1")
            assert st == 503 and body["error"]["message"] == "no slot available"
            assert http("GET", s.url + "/slots?fail_on_no_slot=1", headers=auth)[0] == 503
        finally:
            http("POST", s.url + "/api/extra/abort", {"genkey": "BUSY"}, headers=auth)
            t.join(60)


# ---------------------------------------------------------------- keep-alive and progress

def _open_stream(port, path, body):
    c = httpclient.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return c


def test_keepalive_lines_while_queued():
    """One slot, busy with a long job: queued SSE streams (Kobold and OpenAI) get `: keep-alive` comments within
    the interval; a queued NDJSON stream (Ollama) gets nothing that is not JSON; all finish once the slot frees."""
    with ServerProcess(bundled_model_path(), "--contextsize", "2048", "--threads", "1") as s:
        blocker = threading.Thread(target=lambda: _long_gen(s.url, n=1500, genkey="BLOCK"))
        blocker.start()
        for _ in range(100):
            if http("GET", s.url + "/health")[2]["slots_processing"] == 1:
                break
            time.sleep(0.05)
        kob = _open_stream(s.port, "/api/extra/generate/stream", {"prompt": "Hi", "max_length": 4})
        oai = _open_stream(s.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 4, "stream": True})
        oll = _open_stream(s.port, "/api/generate", {"prompt": "Hi", "options": {"num_predict": 4}})
        t0 = time.monotonic()
        rk, ro = kob.getresponse(), oai.getresponse()  # headers come with the first keep-alive
        assert rk.status == 200 and ro.status == 200
        first_k = rk.fp.readline()
        waited = time.monotonic() - t0
        assert first_k == b": keep-alive\n" and waited < 10
        # the OpenAI stream sends its role chunk at once, then waits
        for _ in range(5):
            ln = ro.fp.readline()
            if ln == b": keep-alive\n":
                break
            assert ln == b"\n" or ln.startswith(b"data: {")
        assert ln == b": keep-alive\n" and time.monotonic() - t0 < 10
        assert http("GET", s.url + "/api/extra/perf")[2]["queue"] == 3
        http("POST", s.url + "/api/extra/abort", {"genkey": "BLOCK"})
        blocker.join(30)
        rest_k = rk.read().decode()
        rest_o = ro.read().decode()
        assert '"finish_reason": "length"' in rest_k or '"finish_reason": "stop"' in rest_k
        assert rest_o.rstrip().endswith("data: [DONE]")
        for block in rest_o.strip().split("\n\n"):
            assert block == ": keep-alive" or block.startswith("data: ")
        rl = oll.getresponse()
        assert rl.status == 200
        lines = [ln for ln in rl.read().decode().splitlines() if ln.strip()]
        assert lines and all(json.loads(ln) is not None for ln in lines)
        assert json.loads(lines[-1])["done"] is True


def test_prompt_progress_stream_and_console():
    """A long prompt (about 720 tokens, processed in 32-token chunks): return_progress gives prompt_progress
    chunks (OpenAI: no choices) with growing `processed`; without it none; the console prints progress lines."""
    prompt = " ".join(["the cat sat on the mat"] * 120)
    short = " ".join(["the cat sat on the mat"] * 30)
    with ServerProcess(bundled_model_path(), "--contextsize", "1024", "--batchsize", "32", "--nofastforward",
                       "--threads", "1") as s:
        c = _open_stream(s.port, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "stream": True,
                                                     "return_progress": True})
        r = c.getresponse()
        assert r.status == 200
        chunks = [json.loads(b[6:]) for b in r.read().decode().strip().split("\n\n")
                  if b.startswith("data: {")]
        prog = [ch["prompt_progress"] for ch in chunks if "prompt_progress" in ch]
        assert len(prog) >= 2, chunks[:3]
        assert all(ch["choices"] == [] and ch["object"] == "text_completion" for ch in chunks
                   if "prompt_progress" in ch)
        done = [p["processed"] for p in prog]
        assert done == sorted(done) and done[0] < prog[0]["total"] and prog[0]["total"] > 600
        assert any(ch.get("choices") for ch in chunks)
        # Kobold stream: `event: progress`
        c = _open_stream(s.port, "/api/extra/generate/stream", {"prompt": short, "max_length": 3,
                                                               "return_progress": True})
        text = c.getresponse().read().decode()
        assert "event: progress\ndata: {\"prompt_progress\"" in text and "event: message" in text
        # no return_progress: no progress chunks
        c = _open_stream(s.port, "/v1/completions", {"prompt": short, "max_tokens": 3, "stream": True})
        assert "prompt_progress" not in c.getresponse().read().decode()
        log = s.log()
    assert "[slot 0] prompt " in log
