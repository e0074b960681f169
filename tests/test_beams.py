"""best_of (candidates side by side, the best by mean token log-probability) and beam search (forked slots)."""
import pytest

from tests.support import ServerProcess, bundled_model_path, http

PROMPT = "Here is a list of the largest cities in France:"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(bundled_model_path(), "--parallelrequests", "4", "--contextsize", "512",
                       "--threads", "2") as srv:
        yield srv


def post(srv, path, body):
    st, _, out = http("POST", srv.url + path, body)
    return st, out


def mean_lp(choice):
    lps = choice["logprobs"]["token_logprobs"]
    return sum(lps) / len(lps)


def test_best_of_returns_the_candidate_with_the_highest_mean_logprob(server):
    base = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.2, "seed": 5, "logprobs": 0}
    st, four = post(server, "/v1/completions", dict(base, n=4))
    assert st == 200, four
    st, best = post(server, "/v1/completions", dict(base, n=1, best_of=4))
    assert st == 200, best
    (choice,) = best["choices"]
    scores = [mean_lp(c) for c in four["choices"]]
    # the same four candidates (same seeds), and the returned one is the best of them
    assert choice["text"] == four["choices"][scores.index(max(scores))]["text"]
    assert mean_lp(choice) == pytest.approx(max(scores), abs=1e-6)
    st, two = post(server, "/v1/completions", dict(base, n=2, best_of=4))
    assert [c["text"] for c in two["choices"]] == [four["choices"][i]["text"] for i in
                                                   sorted(range(4), key=lambda i: -scores[i])[:2]]


def test_best_of_on_the_native_api(server):
    base = {"prompt": PROMPT, "max_length": 8, "temperature": 1.2, "logprobs": True}
    singles = []
    for i in range(3):
        st, out = post(server, "/api/v1/generate", dict(base, sampler_seed=11 + i))
        assert st == 200, out
        r = out["results"][0]
        lps = r["logprobs"]["token_logprobs"]
        singles.append((sum(lps) / len(lps), r["text"]))
    assert len({t for _, t in singles}) > 1
    st, out = post(server, "/api/v1/generate", dict(base, sampler_seed=11, best_of=3))
    assert st == 200, out
    assert out["results"][0]["text"] == max(singles, key=lambda x: x[0])[1]
    st, out = post(server, "/api/extra/generate/stream", dict(base, best_of=2))
    assert st == 400 and "streamed" in out["detail"]["msg"]
    st, out = post(server, "/api/v1/generate", dict(base, best_of=2, num_beams=2))
    assert st == 400


def test_best_of_on_chat_and_refusals(server):
    msgs = [{"role": "user", "content": "Name a fruit."}]
    st, out = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 6, "best_of": 3, "n": 2,
                                                    "temperature": 1.0, "seed": 1})
    assert st == 200 and [c["index"] for c in out["choices"]] == [0, 1]
    st, out = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "n": 3, "best_of": 2})
    assert st == 400 and out["error"]["param"] == "best_of"
    st, out = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "best_of": 2, "stream": True})
    assert st == 400 and "stream" in out["error"]["message"]


# ---------------------------------------------------------------- beam search

BEAM_PROMPT = "The three most important inventions of the nineteenth century were"


def test_beam_width_1_is_greedy_and_width_4_scores_at_least_greedy():
    from gguf_loader.engine import Engine, EngineConfig
    from gguf_loader.jobs import GenRequest, SamplingParams
    e = Engine(EngineConfig(bundled_model_path(), n_ctx=512, n_threads=2, n_slots=4, quiet=True))
    try:
        def go(**kw):
            return e.submit(GenRequest(prompt=BEAM_PROMPT, max_length=12, bypass_eos=True, **kw)).wait(300)
        greedy = go(sampling=SamplingParams(temperature=0), score=True)
        one = go(beams=1, length_penalty=0.0)
        four = go(beams=4, length_penalty=0.0)
        assert one.text == greedy.text and one.completion_tokens == 12
        assert one.logprob_sum == pytest.approx(greedy.logprob_sum, abs=1e-6)
        assert four.completion_tokens == 12 and four.finish_reason == "length"
        assert four.logprob_sum >= greedy.logprob_sum - 1e-6
        # the slots the search borrowed are free again: four plain jobs run at once
        jobs = [e.submit(GenRequest(prompt=f"{i}", max_length=2, sampling=SamplingParams(temperature=0)))
                for i in range(4)]
        assert all(j.wait(120).completion_tokens == 2 for j in jobs)
    finally:
        e.close()


def test_num_beams_on_every_api_and_refusals(server):
    st, out = post(server, "/v1/completions", {"prompt": BEAM_PROMPT, "max_tokens": 6, "num_beams": 3})
    assert st == 200 and len(out["choices"]) == 1 and out["usage"]["completion_tokens"] >= 1
    st, chat_out = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 6, "num_beams": 2, "early_stopping": True})
    assert st == 200 and chat_out["choices"][0]["message"]["role"] == "assistant"
    st, native = post(server, "/api/v1/generate", {"prompt": BEAM_PROMPT, "max_length": 6, "num_beams": 3})
    assert st == 200 and native["results"][0]["text"] == out["choices"][0]["text"]
    st, out = post(server, "/v1/completions", {"prompt": BEAM_PROMPT, "max_tokens": 4, "num_beams": 2, "stream": True})
    assert st == 400 and out["error"]["param"] == "num_beams"
    st, out = post(server, "/v1/completions", {"prompt": BEAM_PROMPT, "max_tokens": 4, "num_beams": 8})
    assert st == 400 and "--parallelrequests" in out["error"]["message"]
    st, out = post(server, "/api/v1/generate", {"prompt": BEAM_PROMPT, "max_length": 4, "num_beams": 2,
                                                "grammar": "root ::= \"a\""})
    assert st == 400
