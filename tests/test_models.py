"""Several models over real HTTP: the bundled Gemma 3 270M and SmolLM2-135M offered from one --modeldir, requests
routed by their `model`, LRU and idle-timeout unloads with the server's RSS measured, failed loads that leave the
previous model serving, and the admin key on the load/unload routes."""
import json
import os
import threading
import time

import pytest

from tests.support import ServerProcess, bundled_model_path, http, smollm2_model_path
from tests.tinymodel import write_broken_models, write_out

G, S = "koboldcpp/gemma", "koboldcpp/smol"
KEY = {"Authorization": "Bearer admin-key"}
MB = 1024 * 1024


@pytest.fixture(scope="module")
def modeldir(tmp_path_factory):
    import gguf
    import numpy as np
    d = tmp_path_factory.mktemp("models")
    os.symlink(bundled_model_path(), d / "gemma.gguf")
    os.symlink(smollm2_model_path(), d / "smol.gguf")
    broken = write_broken_models(tmp_path_factory.mktemp("broken"))
    os.symlink(broken["not_gguf"], d / "broken.gguf")
    # a GGUF whose header reads fine but whose architecture llama.cpp does not know: fails inside llama.cpp
    w = gguf.GGUFWriter(str(d / "nosuch.gguf"), "nosucharch")
    w.add_name("nosuch")
    w.add_context_length(128)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    write_out(w)
    # a .kcpps carries one model's own settings
    (d / "smolcfg.kcpps").write_text('{"model": "smol.gguf", "contextsize": 320, "defaultgenamt": 20}')
    return d


def rss(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def states(server) -> dict:
    st, _, body = http("GET", server.url + "/v1/models")
    assert st == 200
    return {m["id"]: m["status"]["value"] for m in body["data"]}


def wait_states(server, want: dict, timeout=30.0) -> dict:
    end = time.time() + timeout
    while True:
        now = states(server)
        if all(now.get(k) == v for k, v in want.items()) or time.time() > end:
            return now
        time.sleep(0.2)


def complete(server, model, prompt="The capital of France is", n=8, **extra):
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "top_k": 1, **extra}
    if model is not None:
        body["model"] = model
    return http("POST", server.url + "/v1/completions", body, timeout=180)


@pytest.fixture(scope="module")
def server(modeldir):
    with ServerProcess(None, "--model", str(modeldir / "gemma.gguf"), "--modeldir", str(modeldir),
                       "--contextsize", "512", "--adminpassword", "admin-key") as s:
        yield s


def test_listing_offers_every_model_with_its_state(server):
    assert wait_states(server, {G: "loaded"}) == {
        "koboldcpp/broken": "unloaded", G: "loaded", "koboldcpp/nosuch": "unloaded", S: "unloaded",
        "koboldcpp/smolcfg": "unloaded"}
    st, _, tags = http("GET", server.url + "/api/tags")
    assert st == 200 and {m["name"] for m in tags["models"]} == {"koboldcpp/broken", G, "koboldcpp/nosuch", S,
                                                                 "koboldcpp/smolcfg"}


def test_requests_switch_by_name_and_concurrent_ones_get_the_model_they_named(server):
    ref = {}
    for m in (G, S):
        st, _, r = complete(server, m)
        assert st == 200 and r["model"] == m, r
        ref[m] = r["choices"][0]["text"]
    assert ref[G] != ref[S]
    # the stem, Ollama's :latest tag and the file name select a model too
    st, _, r = complete(server, "gemma")
    assert r["model"] == G and r["choices"][0]["text"] == ref[G]
    st, _, r = http("POST", server.url + "/api/generate", {"model": "koboldcpp/smol:latest", "prompt": "The capital "
                    "of France is", "raw": True, "stream": False, "options": {"temperature": 0, "top_k": 1,
                                                                              "num_predict": 8}}, timeout=180)
    assert st == 200 and r["model"].startswith(S), r

    results, errors = {}, []

    def one(i, m):
        try:
            results[i] = (m, complete(server, m))
        except Exception as e:  # reported below
            errors.append(e)
    order = [G, S, G, S]
    threads = [threading.Thread(target=one, args=(i, m)) for i, m in enumerate(order)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(300)
    assert not errors and len(results) == len(order)
    for m, (st, _, r) in results.values():
        assert st == 200, r
        assert r["model"] == m and r["choices"][0]["text"] == ref[m]


def test_unknown_name_runs_on_the_current_model(server):
    complete(server, S)
    st, _, r = complete(server, "gpt-4o-mini")
    assert st == 200 and r["model"] == S
    st, _, r = complete(server, None)
    assert st == 200 and r["model"] == S


def test_lru_unload_returns_the_memory(server):
    assert complete(server, G)[0] == 200
    assert wait_states(server, {G: "loaded", S: "unloaded"})[S] == "unloaded"
    rss_gemma = rss(server)
    assert complete(server, S)[0] == 200
    assert wait_states(server, {G: "unloaded", S: "loaded"})[G] == "unloaded"
    rss_smol = rss(server)
    assert complete(server, G)[0] == 200
    rss_gemma2 = rss(server)
    # Gemma's weights are 253 MB, SmolLM2's 98 MB: holding one at a time, RSS follows the one loaded
    assert rss_smol < rss_gemma - 80 * MB, (rss_gemma / MB, rss_smol / MB)
    assert rss_gemma2 < rss_gemma + 40 * MB, (rss_gemma / MB, rss_gemma2 / MB)


def test_a_model_that_cannot_load_leaves_the_previous_one_serving(server):
    assert complete(server, G)[0] == 200
    # refused from its header: nothing is unloaded
    st, _, r = http("POST", server.url + "/models/load", {"model": "broken"}, KEY)
    assert st == 503 and "koboldcpp/broken" in r["error"]["message"], r
    assert states(server)[G] == "loaded"
    # fails inside llama.cpp after Gemma made room for it: Gemma is loaded again
    st, _, r = http("POST", server.url + "/models/load", {"model": "nosuch"}, KEY, timeout=180)
    assert st == 503 and "koboldcpp/nosuch" in r["error"]["message"], r
    assert wait_states(server, {G: "loaded"})[G] == "loaded"
    st, _, r = complete(server, None)
    assert st == 200 and r["model"] == G
    # a generation request naming it answers the error in its dialect, and the server keeps serving
    st, _, r = complete(server, "broken")
    assert st == 503 and r["error"]["type"] == "server_error"
    st, _, r = http("POST", server.url + "/api/generate", {"model": "broken", "prompt": "x", "stream": False})
    assert st == 503 and "broken" in r["error"]
    assert complete(server, None)[0] == 200


def test_admin_routes_need_the_admin_key(server):
    for path, body in (("/models/load", {"model": "smol"}), ("/models/unload", {"model": "smol"}),
                       ("/v1/internal/model/load", {"model_name": "smol"}),
                       ("/api/admin/reload_config", {"filename": "smol.gguf"})):
        for hdrs in ({}, {"Authorization": "Bearer wrong"}):
            st, _, r = http("POST", server.url + path, body, hdrs)
            assert st == 401, (path, st, r)
    st, _, r = http("GET", server.url + "/api/admin/list_options")
    assert st == 401
    st, _, r = http("GET", server.url + "/api/admin/list_options", headers=KEY)
    assert st == 200 and sorted(r) == ["broken.gguf", "gemma.gguf", "nosuch.gguf", "smol.gguf", "smolcfg.kcpps"]
    # unknown names are 404 in each route's dialect
    st, _, r = http("POST", server.url + "/models/load", {"model": "nope"}, KEY)
    assert st == 404 and r["error"]["type"] == "not_found_error"
    st, _, r = http("POST", server.url + "/api/admin/reload_config", {"filename": "nope.kcpps"}, KEY)
    assert st == 404 and r["detail"]["type"] == "not_found"
    st, _, r = http("GET", server.url + "/v1/engines/nope")
    assert st == 404
    # the seed's /v1/engines/{id}: loading needs the key, a loaded model's card does not
    complete(server, G)
    st, _, r = http("GET", server.url + "/v1/engines/smol")
    assert st == 401
    st, _, r = http("GET", server.url + "/v1/engines/smol", headers=KEY, timeout=180)
    assert st == 200 and r["id"] == S and states(server)[S] == "loaded"
    st, _, r = http("GET", server.url + "/v1/engines/smol")
    assert st == 200 and r["id"] == S
    # explicit loads make the model the current one: unnamed requests follow
    st, _, r = http("POST", server.url + "/api/admin/reload_config", {"filename": "gemma.gguf"}, KEY, timeout=180)
    assert st == 200 and r["success"] is True
    assert complete(server, None)[2]["model"] == G
    st, _, r = http("POST", server.url + "/models/unload", {"model": "gemma"}, KEY, timeout=60)
    assert st == 200 and r["unloaded"] is True and states(server)[G] == "unloaded"
    st, _, r = http("POST", server.url + "/v1/internal/model/load", {"model_name": "gemma"}, KEY, timeout=180)
    assert st == 200 and r == "OK" and states(server)[G] == "loaded"


def test_a_kcpps_loads_its_model_with_its_own_settings(server):
    st, _, r = http("POST", server.url + "/api/admin/reload_config", {"filename": "smolcfg.kcpps"}, KEY, timeout=180)
    assert st == 200 and r["model"] == "koboldcpp/smolcfg"
    assert http("GET", server.url + "/api/extra/true_max_context_length")[2]["value"] == 320
    assert http("GET", server.url + "/api/v1/config/max_length")[2]["value"] == 20
    assert http("GET", server.url + "/api/v1/model")[2]["result"] == "koboldcpp/smolcfg"
    st, _, r = complete(server, "smolcfg", n=4)
    assert st == 200 and r["model"] == "koboldcpp/smolcfg"
    # the other models keep the server's settings
    complete(server, G, n=1)
    assert http("GET", server.url + "/api/extra/true_max_context_length")[2]["value"] == 512


def test_load_routes_are_off_without_any_key(modeldir):
    with ServerProcess(None, "--model", str(modeldir / "smol.gguf"), "--modeldir", str(modeldir),
                       "--contextsize", "256") as s:
        st, _, r = http("POST", s.url + "/models/load", {"model": "gemma"})
        assert st == 403 and "--adminpassword" in r["error"]["message"]
        st, _, r = http("POST", s.url + "/api/admin/reload_config", {"filename": "gemma.gguf"})
        assert st == 403 and "--adminpassword" in r["detail"]["msg"]
        # --password stands in for the admin key when no admin key is set
    with ServerProcess(None, "--model", str(modeldir / "smol.gguf"), "--modeldir", str(modeldir),
                       "--contextsize", "256", "--password", "pw", "--embeddingsmodel", "gemma") as s:
        pw = {"Authorization": "Bearer pw"}
        # --embeddingsmodel may name an offered model; replies name the embeddings model
        st, _, r = http("POST", s.url + "/v1/embeddings", {"input": "hello"}, pw)
        assert st == 200 and r["model"] == "gemma" and len(r["data"][0]["embedding"]) == 640
        st, _, r = http("POST", s.url + "/models/unload", {"model": "smol"}, pw)
        assert st == 200 and r["unloaded"] is True


def test_idle_timeout_and_maxloadedmodels_2(modeldir):
    with ServerProcess(None, "--model", str(modeldir / "gemma.gguf"), "--modeldir", str(modeldir),
                       "--contextsize", "512", "--maxloadedmodels", "2", "--unloadtimeout", "3") as s:
        assert complete(s, S)[0] == 200
        assert complete(s, G)[0] == 200
        both = states(s)
        rss_both = rss(s)
        assert both[G] == "loaded" and both[S] == "loaded"
        after = wait_states(s, {G: "unloaded", S: "unloaded"}, timeout=30)
        assert after[G] == "unloaded" and after[S] == "unloaded"
        rss_none = rss(s)
        assert rss_none < rss_both - 250 * MB, (rss_both / MB, rss_none / MB)
        # what clients poll does not load a model back
        for path in ("/api/v1/model", "/api/extra/version", "/v1/models", "/api/tags"):
            assert http("GET", s.url + path)[0] == 200
        assert states(s) == after
        # the next request loads the current model again
        st, _, r = complete(s, None)
        assert st == 200 and r["model"] == G


def test_a_stream_waiting_for_its_model_gets_keep_alives(server):
    import http.client
    complete(server, G, n=1)
    assert wait_states(server, {S: "unloaded"})[S] == "unloaded"
    # make loading slow enough to see: a long generation on Gemma holds the switch until it ends
    # (300 tokens with the end of text ignored: several seconds even on a quiet machine, past the 2 s keep-alive)
    hold = threading.Thread(target=complete, args=(server, G), kwargs={"n": 300, "prompt": "Once",
                                                                      "bypass_eos": True})
    hold.start()
    time.sleep(1.0)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    conn.request("POST", "/v1/completions", json.dumps({"model": "smol", "prompt": "Hi", "max_tokens": 3,
                                                         "stream": True, "temperature": 0}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    raw = resp.read().decode()
    conn.close()
    hold.join(300)
    assert raw.startswith(": loading the model\n\n"), raw[:200]
    events = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: {")]
    assert events and all(e["model"] == S for e in events) and raw.rstrip().endswith("data: [DONE]")
