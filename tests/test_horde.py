"""The AI Horde worker (server/horde.py) against a loopback fake of the Horde's API (tests/fake_horde.py), with a real
engine on a tiny model; and end to end through koboldcpp.py's flags."""
from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from adapters import kobold
from gguf_loader.engine import Engine, EngineConfig
from gguf_loader.jobs import GenRequest, SamplingParams
from server.horde import HordeConfig, HordeWorker
from tests.fake_horde import FakeHorde
from tests.support import ServerProcess, http
from tests.tinymodel import tiny_model_path

KEY = "s3cret-horde-key-0123456789"


def _wait(cond, timeout=60.0, step=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return False


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineConfig(tiny_model_path(big=True), n_ctx=1024, n_threads=1, n_slots=1, max_queue=2))
    yield e
    e.close()


@pytest.fixture
def fake():
    f = FakeHorde(KEY, model="koboldcpp/tiny")
    yield f
    f.close()


def _worker(engine, url, lines, **kw):
    cfg = dict(api_key=KEY, worker_name="test-worker", model_name="koboldcpp/tiny", url=url,
               max_context_length=512, max_length=24, empty_wait=0.1, backoff_min=0.1, backoff_max=0.4,
               slot_wait=0.02, http_timeout=5)
    cfg.update(kw)
    return HordeWorker(HordeConfig(**cfg), engine, kobold.GenDefaults(max_length=24, max_context_length=engine.n_ctx),
                       lines.append)


PAYLOAD = {"prompt": "once upon a time the king", "max_length": 16, "max_context_length": 256, "temperature": 0.7,
           "top_k": 1, "top_p": 0.9, "top_a": 0, "tfs": 1, "typical": 1, "rep_pen": 1.0, "rep_pen_range": 64,
           "rep_pen_slope": 0.7, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "stop_sequence": [], "n": 1,
           "singleline": False, "frmttriminc": False, "use_default_badwordsids": False, "min_p": 0.0,
           "dynatemp_range": 0.0, "smoothing_factor": 0.0}


def test_full_job_cycle(engine, fake):
    jid = fake.add_job(dict(PAYLOAD))
    lines = []
    w = _worker(engine, fake.url, lines)
    w.start()
    try:
        assert _wait(lambda: fake.submits), "no submit arrived"
    finally:
        w.stop()
    assert not w.running
    assert fake.violations == []
    pop = fake.pops[0][1]
    assert pop["name"] == "test-worker" and pop["models"] == ["koboldcpp/tiny"]
    assert pop["max_length"] == 24 and pop["max_context_length"] == 512
    sub = fake.submits[0][1]
    assert sub["id"] == jid and sub["state"] == "ok"
    # the same request run locally (top_k 1: greedy) gives the same text: the Horde's params reached the samplers
    local = engine.submit(GenRequest(prompt=PAYLOAD["prompt"], max_length=16, max_context_length=256,
                                     sampling=SamplingParams(top_k=1, rep_pen_range=64, rep_pen_slope=0.7),
                                     trim_stop=False)).wait(30)
    assert sub["generation"] == local.text and sub["generation"]
    st = w.stats()
    assert st["submitted"] == 1 and st["kudos"] == pytest.approx(10.5)
    assert 0 < st["tokens"] <= 16
    assert any("kudos" in ln and jid[:8] in ln for ln in lines)
    assert all(KEY not in ln for ln in lines)


def test_limits_singleline_and_empty_pops(engine, fake):
    fake.add_job(dict(PAYLOAD, max_length=1000, max_context_length=30000, singleline=True, top_k=1))
    lines = []
    w = _worker(engine, fake.url, lines, max_length=8, empty_wait=0.3)
    w.start()
    try:
        assert _wait(lambda: fake.submits)
        n0 = len(fake.pops)
        time.sleep(1.0)  # every pop from here on finds nothing: at most one every empty_wait
        n1 = len(fake.pops)
    finally:
        w.stop()
    assert fake.violations == []
    assert 1 <= n1 - n0 <= 5
    st = w.stats()
    assert st["tokens"] <= 8 and st["empty_pops"] >= 1
    assert "\n" not in fake.submits[0][1]["generation"].rstrip("\n")


def test_local_users_keep_priority(engine, fake):
    fake.add_job(dict(PAYLOAD))
    local = engine.submit(GenRequest(prompt="hello", max_length=300, sampling=SamplingParams(ban_eos=True)))
    assert _wait(lambda: local.started.is_set(), 10)
    lines = []
    w = _worker(engine, fake.url, lines)
    w.start()
    try:
        res = local.wait(180)
        t_done = time.monotonic()
        assert res is not None and res.completion_tokens == 300
        assert res.eval_time > 0.2, "the local job must be long enough to show anything"
        assert _wait(lambda: fake.submits)
    finally:
        local.abort()
        w.stop()
    # no pop while the only slot was taken by a local user
    assert fake.pops and fake.pops[0][0] >= t_done - 0.05
    assert fake.violations == []


def test_failed_job_is_reported_faulted(engine, fake):
    fake.add_job(dict(PAYLOAD, prompt=12345))  # a payload we cannot run
    lines = []
    w = _worker(engine, fake.url, lines)
    w.start()
    try:
        assert _wait(lambda: fake.submits)
    finally:
        w.stop()
    sub = fake.submits[0][1]
    assert sub["state"] == "faulted" and sub["generation"] == ""
    assert w.stats()["faulted"] == 1 and w.stats()["submitted"] == 0
    assert fake.violations == []


def test_rejected_submit_is_not_retried_and_work_goes_on(engine, fake):
    fake.submit_status = 404
    fake.add_job(dict(PAYLOAD))
    fake.add_job(dict(PAYLOAD, prompt="the dragon"))
    lines = []
    w = _worker(engine, fake.url, lines)
    w.start()
    try:
        assert _wait(lambda: len(fake.submits) >= 2)
        time.sleep(0.3)
    finally:
        w.stop()
    assert len(fake.submits) == 2  # one each, never retried
    st = w.stats()
    assert st["rejected"] == 2 and st["submitted"] == 0 and st["kudos"] == 0
    assert any("refused" in ln for ln in lines)


def test_submit_5xx_is_retried(engine, fake):
    fake.submit_fail_times = 2
    fake.add_job(dict(PAYLOAD))
    lines = []
    w = _worker(engine, fake.url, lines, submit_tries=3)
    w.start()
    try:
        assert _wait(lambda: w.stats()["submitted"] == 1)
    finally:
        w.stop()
    assert len(fake.submits) == 3 and w.stats()["errors"] == 2
    assert fake.violations == []


def test_unreachable_horde_backs_off_and_stops_cleanly(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    lines = []
    w = _worker(engine, f"http://127.0.0.1:{port}/api", lines, backoff_min=0.1, backoff_max=0.4)
    w.start()
    time.sleep(1.6)
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 2 and not w.running
    st = w.stats()
    # waits 0.1, 0.2, 0.4, 0.4...: about 5 tries in 1.6 s, never a busy loop
    assert 3 <= st["errors"] <= 8
    assert "cannot reach" in st["last_error"]
    assert all(KEY not in ln for ln in lines)


def test_wrong_key_is_an_error_not_a_crash(engine, fake):
    lines = []
    w = _worker(engine, fake.url, lines, api_key="wrong-key-000")
    w.start()
    try:
        assert _wait(lambda: w.stats()["errors"] >= 2, 5)
    finally:
        w.stop()
    assert "401" in w.stats()["last_error"]
    assert all("wrong-key-000" not in ln for ln in lines)


def test_stop_during_a_job(engine, fake):
    fake.add_job(dict(PAYLOAD, max_length=900))
    lines = []
    w = _worker(engine, fake.url, lines, max_length=900)
    w.start()
    assert _wait(lambda: engine.jobs(), 10)
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 3 and not w.running
    assert _wait(lambda: not engine.jobs(), 5)  # the job was aborted, not left running


# ---------------------------------------------------------------- end to end

def test_flags_end_to_end():
    f = FakeHorde(KEY)
    try:
        f.add_job(dict(PAYLOAD))
        with ServerProcess(tiny_model_path(), "--hordekey", KEY, "--hordeworkername", "e2e-worker",
                           "--hordeurl", f.url, "--hordemaxctx", "256", "--hordegenlen", "12",
                           "--contextsize", "512") as s:
            assert _wait(lambda: f.submits, 30)
            assert _wait(lambda: http("GET", s.url + "/api/extra/perf")[2].get("horde", {}).get("submitted") == 1, 10)
            perf = http("GET", s.url + "/api/extra/perf")[2]
            assert perf["horde"]["kudos"] == pytest.approx(10.5) and perf["horde"]["tokens"] <= 12
            st, _, text = http("GET", s.url + "/metrics")
            assert b'kcpp_horde_jobs_total{outcome="submitted"} 1.0' in text
            pop = f.pops[0][1]
            assert pop["name"] == "e2e-worker" and pop["max_context_length"] == 256 and pop["max_length"] == 12
            assert pop["models"][0].startswith("koboldcpp/")
            s.proc.send_signal(signal.SIGTERM)
            assert s.proc.wait(15) == 0
            log = s.log()
        assert f.violations == []
        assert KEY not in log
        assert "Horde: job" in log and "kudos" in log
    finally:
        f.close()


def test_flag_errors():
    import sys
    from tests.support import KOBOLDCPP
    for extra, msg in ((["--hordekey", KEY], "--hordeworkername"), (["--hordekey", KEY, "--hordeworkername", "w",
                                                                    "--hordeurl", "ftp://x"], "--hordeurl"),
                       (["--hordegenlen", "5000"], "--hordegenlen")):
        p = subprocess.run([sys.executable, str(KOBOLDCPP), "--skiplauncher", *extra], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2 and msg in p.stderr
        assert KEY not in p.stderr + p.stdout
