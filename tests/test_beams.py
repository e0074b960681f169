"""best_of: candidates generated side by side, the best by mean token log-probability returned."""
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


def test_best_of_on_chat_and_refusals(server):
    msgs = [{"role": "user", "content": "Name a fruit."}]
    st, out = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 6, "best_of": 3, "n": 2,
                                                    "temperature": 1.0, "seed": 1})
    assert st == 200 and [c["index"] for c in out["choices"]] == [0, 1]
    st, out = post(server, "/v1/completions", {"prompt": PROMPT, "n": 3, "best_of": 2})
    assert st == 400 and out["error"]["param"] == "best_of"
    st, out = post(server, "/v1/completions", {"prompt": PROMPT, "best_of": 2, "stream": True})
    assert st == 400 and "stream" in out["error"]["message"]
