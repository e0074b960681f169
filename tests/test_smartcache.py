"""SmartCache: a conversation that lost its slot is restored from host memory when it returns."""
import pytest

from gguf_loader.engine import Engine, EngineConfig
from gguf_loader.jobs import GenRequest, SamplingParams
from tests.support import bundled_model_path

GREEDY = SamplingParams(temperature=0)


def chat(topic, turns=6):
    return "".join(f"User: tell me about {topic}, part {i}.\nBot: {topic} is a long story, part {i}.\n"
                   for i in range(turns))


@pytest.fixture(scope="module")
def gemma():
    e = Engine(EngineConfig(bundled_model_path(), n_ctx=1024, n_threads=2, n_slots=1, smartcache=2,
                            smartcache_mb=64, quiet=True))
    yield e
    e.close()


def run(e, prompt, n=8):
    return e.submit(GenRequest(prompt=prompt, max_length=n, sampling=GREEDY, bypass_eos=True)).wait(120)


def test_returning_conversation_is_restored_not_reprocessed(gemma):
    e = gemma
    a = chat("Paris")
    run(e, a)
    run(e, chat("the sea"))  # takes the only slot: conversation a goes to the SmartCache
    assert e.counters["saved"] >= 1
    follow_up = a + "User: and then?\nBot:"
    before = dict(e.counters)
    r = run(e, follow_up)
    n_a = len(e.tokenize(a))
    assert e.counters["restored"] == before["restored"] + 1
    decoded = e.counters["prompt_decoded"] - before["prompt_decoded"]
    assert decoded == len(e.tokenize(follow_up)) - r.cached_tokens
    assert r.cached_tokens >= n_a - 2 and decoded < 20
    # the same text as a cold run
    cold = Engine(EngineConfig(bundled_model_path(), n_ctx=1024, n_threads=2, n_slots=1, fastforward=False))
    try:
        assert run(cold, follow_up).text == r.text
    finally:
        cold.close()


def test_bounds_entries_and_memory(gemma):
    e = gemma
    for topic in ("rivers", "mountains", "forests", "deserts"):
        run(e, chat(topic), 2)
    assert len(e._saved) == 2  # --smartcache 2: the two most recent
    assert 0 < e.smartcache_bytes() <= 64 * 1024 * 1024
    one = max(len(s.data) for s in e._saved)
    # a memory bound that holds one entry but not two: one kept, the bound respected
    e.cfg.smartcache, e.cfg.smartcache_mb = 8, -(-one * 3 // 2 // (1024 * 1024))
    try:
        for topic in ("lakes", "islands", "valleys"):
            run(e, chat(topic), 2)
        assert len(e._saved) == 1 and e.smartcache_bytes() <= e.cfg.smartcache_mb * 1024 * 1024
    finally:
        e.cfg.smartcache, e.cfg.smartcache_mb = 2, 64
