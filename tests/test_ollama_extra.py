"""Ollama's model-info and embedding routes with the official `ollama` Python client on the bundled model:
/api/show, /api/ps (real sizes), /api/embed and /api/embeddings; bad input is a 400 in Ollama's error shape."""
import math
import os

import pytest

from tests.support import ServerProcess, bundled_model_path, http as _http

ollama = pytest.importorskip("ollama")
KEY = "sekrit"


def http(method, url, body=None):
    return _http(method, url, body, headers={"Authorization": "Bearer " + KEY})


@pytest.fixture(scope="module")
def server():
    with ServerProcess(bundled_model_path(), "--contextsize", "1024", "--chatcompletionsadapter", "gemma",
                       "--password", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, headers={"Authorization": "Bearer " + KEY})


def test_show(client):
    r = client.show("gemma3:270m")
    assert r.details.format == "gguf" and r.details.family == "gemma3"
    assert r.details.parameter_size.endswith("M") and "Q4_K" in r.details.quantization_level
    assert r.modelinfo["general.architecture"] == "gemma3" and r.modelinfo["gemma3.context_length"] == 32768
    assert r.modelinfo["general.parameter_count"] > 2e8
    assert "<start_of_turn>user" in r.template and "{{ .Prompt }}" in r.template
    assert "num_ctx 1024" in r.parameters and "stop" in r.parameters
    assert r.modelfile.startswith("# Modelfile") and "FROM " in r.modelfile
    assert "completion" in r.capabilities and "insert" not in r.capabilities  # Gemma 3 has no FIM tokens


def test_ps_reports_real_sizes(client, server):
    r = client.ps()
    (m,) = r.models
    weights = os.path.getsize(bundled_model_path())
    # weights plus a KV cache of 1024 positions: more than the file, less than twice it for this small context
    assert weights < m.size < 2 * weights and m.size_vram == 0
    assert m.model.startswith("koboldcpp/") and m.details.format == "gguf"
    st, _, raw = http("GET", server.url + "/api/ps")
    assert st == 200 and raw["models"][0]["context_length"] == 1024


def test_embed_matches_openai_embeddings(client, server):
    r = client.embed(model="x", input=["Hello there.", "The sky is blue."])
    assert len(r.embeddings) == 2 and r.prompt_eval_count > 4
    for v in r.embeddings:
        assert abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4
    st, _, oa = http("POST", server.url + "/v1/embeddings", {"input": ["Hello there.", "The sky is blue."]})
    assert st == 200
    for mine, theirs in zip(r.embeddings, oa["data"]):
        assert max(abs(a - b) for a, b in zip(mine, theirs["embedding"])) < 1e-5
    one = client.embed(model="x", input="Hello there.")
    assert one.embeddings[0] == pytest.approx(r.embeddings[0], abs=1e-5)
    cut = client.embed(model="x", input="Hello there.", dimensions=8)
    assert len(cut.embeddings[0]) == 8


def test_legacy_embeddings(client):
    r = client.embeddings(model="x", prompt="Hello there.")
    e = client.embed(model="x", input="Hello there.").embeddings[0]
    assert r.embedding == pytest.approx(e, abs=1e-5)
    assert client.embeddings(model="x", prompt="").embedding == []


def test_bad_input_is_an_ollama_400(client, server):
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="x", input="word " * 3000, truncate=False)
    assert e.value.status_code == 400 and "context length" in e.value.error
    for path, body in (("/api/embed", {"input": 5}), ("/api/embed", {"input": ["a", 3]}),
                       ("/api/embeddings", {"prompt": ["a"]}), ("/api/show", {}), ("/api/show", {"model": 3}),
                       ("/api/embed", {"input": "a", "dimensions": 0})):
        st, _, r = http("POST", server.url + path, body)
        assert st == 400 and isinstance(r["error"], str), (path, body, r)


def test_embed_needs_the_key(server):
    st, _, r = _http("POST", server.url + "/api/embed", {"input": "a"})
    assert st == 401 and isinstance(r["error"], str)
