"""The multi-instance recipe (README, "Several instances"): two real servers on loopback behind LiteLLM's Router.
Requests spread over both; killing one mid-run loses no request (the router retries on the other)."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
litellm = pytest.importorskip("litellm")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.support import ServerProcess, bundled_model_path, http  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # litellm's pydantic serializer noise

N_REQUESTS = 16
MSG = [{"role": "user", "content": "Write one short sentence about the sea."}]


def router_for(urls, **kw):
    """The README's recipe: one model group, one deployment per instance, retries and cooldown on failure."""
    model_list = [{"model_name": "local", "litellm_params": {"model": "openai/local", "api_base": u + "/v1",
                                                             "api_key": "none", "timeout": 60}} for u in urls]
    return litellm.Router(model_list=model_list, num_retries=3, retry_after=0, allowed_fails=0, cooldown_time=60,
                          timeout=60, **kw)


def healthy(urls):
    """The recipe's health check: instances whose /health says ok (loading ones answer 503, dead ones nothing)."""
    out = []
    for u in urls:
        try:
            if http("GET", u + "/health", timeout=2)[0] == 200:
                out.append(u)
        except OSError:
            pass
    return out


def served(url) -> int:
    """Chat completions this instance answered with 200 (its /metrics)."""
    st, _, raw = http("GET", url + "/metrics", timeout=10)
    for fam in text_string_to_metric_families(raw.decode()):
        for s in fam.samples:
            if (s.name == "kcpp_requests_total" and s.labels.get("route") == "/v1/chat/completions"
                    and s.labels.get("status") == "200"):
                return int(s.value)
    return 0


@pytest.fixture
def two():
    m = bundled_model_path()
    a = ServerProcess(m, "--contextsize", "512", "--threads", "1")
    try:
        b = ServerProcess(m, "--contextsize", "512", "--threads", "1")
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def _ask(router, i):
    r = router.completion(model="local", messages=MSG, max_tokens=6, temperature=0.7, seed=i)
    assert r.choices[0].message.content is not None
    return r


def test_router_health_spread_and_failover(two):
    a, b = two
    # the health check: only instances whose /health answers 200 become deployments
    router = router_for(healthy([a.url, b.url, "http://127.0.0.1:9"]))
    assert len(router.model_list) == 2
    base_a, base_b = served(a.url), served(b.url)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: _ask(router, i), range(N_REQUESTS)))
    assert len(results) == N_REQUESTS
    na, nb = served(a.url) - base_a, served(b.url) - base_b
    assert na + nb == N_REQUESTS and na > 0 and nb > 0, (na, nb)

    # kill b while requests are in flight: every request still gets an answer (from a)
    done = []
    lock = threading.Lock()

    def ask(i):
        r = _ask(router, 100 + i)
        with lock:
            done.append(r)
        return r
    before_a = served(a.url)
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(ask, i) for i in range(N_REQUESTS)]
        end = time.monotonic() + 60
        while len(done) < 3 and time.monotonic() < end:
            time.sleep(0.02)
        b.proc.kill()
        results = [f.result(timeout=120) for f in futs]
    assert len(results) == N_REQUESTS and all(r.choices[0].message.content is not None for r in results)
    assert served(a.url) - before_a >= N_REQUESTS - 4  # at most the requests b had finished before it died
    assert healthy([a.url, b.url]) == [a.url]
