"""Reranking end to end: --rerankmodel with a tiny random-weight Qwen3-style reranker GGUF (rank pooling, a
two-label head). Random weights give meaningless scores, so the tests check the mechanics: one score per document,
sorted, top_n, both route names, the scores equal the engine's own, errors."""
import pytest

from tests.support import ServerProcess, http
from tests.tinymodel import tiny_model_path, write_tiny_reranker

DOCS = ["hello world", "the cat and the dog", "once upon a time there was a king", "hello world"]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    return str(write_tiny_reranker(tmp_path_factory.mktemp("rr") / "tiny-reranker.gguf"))


@pytest.fixture(scope="module")
def server(reranker):
    with ServerProcess(tiny_model_path(), "--contextsize", "256", "--rerankmodel", reranker) as s:
        yield s


def test_rerank_scores_and_order(server, reranker):
    st, _, r = http("POST", server.url + "/v1/rerank", {"model": "x", "query": "hello world", "documents": DOCS})
    assert st == 200, r
    res = r["results"]
    assert sorted(x["index"] for x in res) == [0, 1, 2, 3]
    scores = [x["relevance_score"] for x in res]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)  # softmax over yes/no
    by_index = {x["index"]: x["relevance_score"] for x in res}
    assert by_index[0] == by_index[3]  # the same pair scores the same
    assert len(set(by_index.values())) == 3  # different documents score differently
    assert r["model"] == "tiny-reranker" and r["usage"]["prompt_tokens"] > 0
    # the same scores as the engine computes directly
    from gguf_loader.engine import Engine, EngineConfig
    eng = Engine(EngineConfig(tiny_model_path(), n_ctx=256, rerank_model_path=reranker))
    try:
        direct, _ = eng.rerank("hello world", DOCS)
    finally:
        eng.close()
    assert [round(by_index[i], 5) for i in range(4)] == [round(s, 5) for s in direct]


def test_rerank_top_n_documents_and_alias(server):
    body = {"query": "the king", "documents": [{"text": d} for d in DOCS], "top_n": 2, "return_documents": True}
    st, _, r = http("POST", server.url + "/rerank", body)
    assert st == 200 and len(r["results"]) == 2
    for x in r["results"]:
        assert x["document"]["text"] == DOCS[x["index"]]
    full = http("POST", server.url + "/v1/rerank", dict(body, top_n=None))[2]["results"]
    assert [x["index"] for x in full[:2]] == [x["index"] for x in r["results"]]


def test_long_document_is_cut_not_refused(server):
    st, _, r = http("POST", server.url + "/v1/rerank", {"query": "dog", "documents": ["the dog " * 400]})
    assert st == 200 and len(r["results"]) == 1


@pytest.mark.parametrize("body,param", [
    ({"documents": ["a"]}, "query"),
    ({"query": "", "documents": ["a"]}, "query"),
    ({"query": "a"}, "documents"),
    ({"query": "a", "documents": []}, "documents"),
    ({"query": "a", "documents": [3]}, "documents"),
    ({"query": "a", "documents": ["b"] * 1025}, "documents"),
    ({"query": "a", "documents": ["b"], "top_n": 0}, "top_n"),
])
def test_rerank_bad_input(server, body, param):
    st, _, r = http("POST", server.url + "/v1/rerank", body)
    assert st == 400 and r["error"]["param"] == param, r


def test_without_rerankmodel_is_a_501():
    with ServerProcess(tiny_model_path(), "--contextsize", "256") as s:
        st, _, r = http("POST", s.url + "/v1/rerank", {"query": "a", "documents": ["b"]})
    assert st == 501 and "--rerankmodel" in r["error"]["message"]


@pytest.mark.parametrize("kind", ["not_gguf", "not_a_reranker"])
def test_bad_rerankmodel_is_one_error_line(tmp_path, kind):
    import subprocess
    import sys
    from tests.support import KOBOLDCPP, free_port
    bad = tmp_path / "bad.gguf"
    if kind == "not_gguf":
        bad.write_bytes(b"not a model")
    else:
        bad = tiny_model_path()  # a loadable GGUF without rank pooling
    p = subprocess.run([sys.executable, str(KOBOLDCPP), "--model", tiny_model_path(), "--rerankmodel", str(bad),
                        "--skiplauncher", "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    err = [x for x in (p.stderr + p.stdout).splitlines() if "--rerankmodel" in x]
    assert p.returncode == 1 and err, p.stderr + p.stdout  # as a bad --model or --embeddingsmodel
    assert "not a reranker" in err[0] if kind == "not_a_reranker" else True
