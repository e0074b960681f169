"""Fill-in-the-middle end to end: /infill (llama-server's body and reply) and `suffix` on /v1/completions, on a
tiny random-weight llama GGUF that has FIM tokens, and the 400 a model without them gets."""
import json

import pytest

from tests.support import ServerProcess, http
from tests.tinymodel import FIM_REPO_TOKENS, FIM_TOKENS, tiny_model_path

GREEDY = {"temperature": 0, "top_k": 1, "seed": 1}
PREFIX, SUFFIX = "def hello world(", " return the dog"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(tiny_model_path(fim=True, n_ctx=256), "--contextsize", "256") as s:
        yield s


@pytest.fixture(scope="module")
def repo():
    with ServerProcess(tiny_model_path(fim="repo", n_ctx=256), "--contextsize", "256") as s:
        yield s


@pytest.fixture(scope="module")
def plain():
    with ServerProcess(tiny_model_path(), "--contextsize", "256") as s:
        yield s


def ids(server, text):
    st, _, r = http("POST", server.url + "/api/extra/tokencount", {"prompt": text, "special": False})
    assert st == 200 and r["ids"][0] == 1  # BOS first
    return r["ids"][1:]


def fim_ids(server):
    """The FIM tokens' ids, read back through the detokenizer (special pieces shown)."""
    st, _, r = http("POST", server.url + "/api/extra/tokencount", {"prompt": "".join(FIM_TOKENS), "special": True})
    assert st == 200 and len(r["ids"]) == 4
    return r["ids"][1:]


def expected_prompt(server, prefix, suffix, start=""):
    pre, suf, mid = fim_ids(server)
    return [1, pre] + ids(server, prefix) + [suf] + ids(server, suffix) + [mid] + (ids(server, start) if start else [])


def test_infill_uses_the_fim_layout(server):
    """/infill's text equals a plain completion of exactly [BOS] PRE prefix SUF suffix MID."""
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, **GREEDY}
    st, _, r = http("POST", server.url + "/infill", body)
    assert st == 200, r
    assert r["stop"] is True and r["tokens_predicted"] == 8 and r["stop_type"] == "limit"
    prompt = expected_prompt(server, PREFIX, SUFFIX)
    assert r["tokens_evaluated"] == len(prompt)
    st, _, ref = http("POST", server.url + "/v1/completions", {"prompt": prompt, "max_tokens": 8, **GREEDY})
    assert st == 200 and r["content"] == ref["choices"][0]["text"] and r["content"]


def test_infill_prompt_continues_the_middle(server):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "once upon", "n_predict": 6, **GREEDY}
    st, _, r = http("POST", server.url + "/infill", body)
    prompt = expected_prompt(server, PREFIX, SUFFIX, "once upon")
    assert st == 200 and r["tokens_evaluated"] == len(prompt)
    ref = http("POST", server.url + "/v1/completions", {"prompt": prompt, "max_tokens": 6, **GREEDY})[2]
    assert r["content"] == ref["choices"][0]["text"]


def test_infill_extra_files_go_first(server):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, **GREEDY,
            "input_extra": [{"filename": "a.py", "text": "the king"}, {"text": "the cat"}]}
    st, _, r = http("POST", server.url + "/infill", body)
    base = http("POST", server.url + "/infill", dict(body, input_extra=[]))[2]
    assert st == 200 and r["tokens_evaluated"] > base["tokens_evaluated"]
    # no repo/separator tokens in this vocabulary: the files come as plain text before the prefix
    pre, suf, mid = fim_ids(server)
    prompt = [1] + ids(server, "a.py\nthe king\n") + ids(server, "the cat\n") + expected_prompt(server, PREFIX,
                                                                                                 SUFFIX)[1:]
    assert r["tokens_evaluated"] == len(prompt)


def test_infill_extra_files_with_repo_tokens(repo):
    """A model with repository/file-separator tokens gets [REP] project [SEP] file ... before the FIM part, and the
    text matches a plain completion of exactly that prompt."""
    st, _, r = http("POST", repo.url + "/api/extra/tokencount", {"prompt": "".join(FIM_REPO_TOKENS), "special": True})
    rep, sep = r["ids"][1:]
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 6, **GREEDY,
            "input_extra": [{"filename": "a.py", "text": "the king"}]}
    st, _, r = http("POST", repo.url + "/infill", body)
    prompt = ([1, rep] + ids(repo, "project\n") + [sep] + ids(repo, "a.py\nthe king")
              + expected_prompt(repo, PREFIX, SUFFIX)[1:])
    assert st == 200 and r["tokens_evaluated"] == len(prompt)
    ref = http("POST", repo.url + "/v1/completions", {"prompt": prompt, "max_tokens": 6, **GREEDY})[2]
    assert r["content"] == ref["choices"][0]["text"]


def test_infill_stream_matches_blocking(server):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, **GREEDY}
    full = http("POST", server.url + "/infill", body)[2]
    st, hdrs, raw = http("POST", server.url + "/infill", dict(body, stream=True))
    assert st == 200 and hdrs["Content-Type"] == "text/event-stream"
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == full["content"]


def test_long_prefix_and_suffix_are_cut_to_fit(server):
    body = {"input_prefix": "the dog " * 300, "input_suffix": "the cat " * 300, "n_predict": 16, **GREEDY}
    st, _, r = http("POST", server.url + "/infill", body)
    assert st == 200 and r["tokens_evaluated"] + 16 <= 256


def test_completions_suffix_is_fill_in_the_middle(server):
    st, _, r = http("POST", server.url + "/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8,
                                                            **GREEDY})
    assert st == 200, r
    inf = http("POST", server.url + "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8,
                                                **GREEDY})[2]
    assert r["choices"][0]["text"] == inf["content"]
    assert r["usage"]["prompt_tokens"] == len(expected_prompt(server, PREFIX, SUFFIX))


@pytest.mark.parametrize("body,param", [
    ({"input_prefix": 5}, "input_prefix"),
    ({"input_prefix": "a", "input_extra": "x"}, "input_extra"),
    ({"input_prefix": "a", "input_extra": [{"filename": "a"}]}, "input_extra"),
    ({"input_prefix": "a", "n_predict": 10 ** 6}, "n_predict"),
    ({"input_prefix": "a", "stop": 3}, "stop"),
    ({"input_prefix": "a", "temperature": "hot"}, "temperature"),
])
def test_infill_bad_input(server, body, param):
    st, _, r = http("POST", server.url + "/infill", body)
    assert st == 400 and r["error"]["param"] == param, r


def test_model_without_fim_tokens_is_a_400(plain):
    st, _, r = http("POST", plain.url + "/infill", {"input_prefix": "a", "input_suffix": "b"})
    assert st == 400 and "fill-in-the-middle" in r["error"]["message"]
    st, _, r = http("POST", plain.url + "/v1/completions", {"prompt": "a", "suffix": "b", "max_tokens": 2})
    assert st == 400 and r["error"]["param"] == "suffix" and "fill-in-the-middle" in r["error"]["message"]
    # an empty suffix is no suffix (clients send it by default)
    st, _, r = http("POST", plain.url + "/v1/completions", {"prompt": "a", "suffix": "", "max_tokens": 2})
    assert st == 200
