"""Each defect found by fuzzing the HTTP API, reproduced on a real server: a 4xx in the dialect's shape, never a
5xx, a crash or a reply without a status line; the server stays up."""
import json
import socket

import pytest

from tests.support import ServerProcess, http
from tests.tinymodel import CHATML_TEMPLATE, tiny_model_path

BIG = "1" + "0" * 400  # an integer beyond float range


@pytest.fixture(scope="module")
def srv():
    with ServerProcess(tiny_model_path(chat_template=CHATML_TEMPLATE), "--contextsize", "512", "--quiet",
                       "--defaultgenamt", "16") as s:
        yield s


def raw_post(srv, path, data: bytes, headers=None):
    return http("POST", srv.url + path, data, headers)


def alive(srv):
    assert srv.proc.poll() is None, srv.log()
    assert http("GET", srv.url + "/api/v1/model")[0] == 200


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def deep_grammar(levels=20000):
    return 'root ::= ' + "(" * levels + '"a"' + ")" * levels


@pytest.mark.parametrize("path, body", [
    ("/api/v1/generate", {"prompt": "x", "max_length": 2, "grammar": deep_grammar()}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "grammar": deep_grammar()}),
    ("/v1/chat/completions", dict(CHAT, grammar=deep_grammar())),
])
def test_deeply_nested_grammar_is_a_400_and_the_server_survives(srv, path, body):
    st, _, out = http("POST", srv.url + path, body)
    assert st == 400 and "nests" in json.dumps(out), out
    alive(srv)


def test_a_long_rule_chain_parses_on_a_big_stack(srv):
    rules = "\n".join(f"r{i} ::= r{i + 1}" for i in range(3000)) + '\nr3000 ::= "a"'
    st, _, out = http("POST", srv.url + "/api/v1/generate", {"prompt": "x", "max_length": 1,
                                                             "grammar": "root ::= r0\n" + rules})
    assert st == 200, out
    alive(srv)


@pytest.mark.parametrize("path", ["/api/v1/generate", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                  "/api/chat", "/api/extra/tokencount", "/api/extra/json_to_grammar"])
def test_json_nested_10000_deep_is_a_400(srv, path):
    st, _, out = raw_post(srv, path, b"[" * 10000 + b"]" * 10000)
    assert st == 400 and "nested" in json.dumps(out), out
    st, _, out = raw_post(srv, path, b'{"a":' * 10000 + b"1" + b"}" * 10000)
    assert st == 400, out


@pytest.mark.parametrize("path, field, base", [
    ("/api/v1/generate", "max_length", {"prompt": "x"}),
    ("/api/v1/generate", "temperature", {"prompt": "x", "max_length": 2}),
    ("/api/v1/generate", "sampler_seed", {"prompt": "x", "max_length": 2}),
    ("/v1/chat/completions", "max_tokens", CHAT),
    ("/v1/chat/completions", "seed", CHAT),
    ("/v1/chat/completions", "n", CHAT),
    ("/v1/completions", "top_k", {"prompt": "x", "max_tokens": 2}),
    ("/v1/embeddings", "dimensions", {"input": "x"}),
])
def test_integers_beyond_float_range_are_400s(srv, path, field, base):
    body = json.dumps(base)[:-1] + f', "{field}": {BIG}}}'
    st, _, out = raw_post(srv, path, body.encode())
    assert st == 400 and field in json.dumps(out), out
    if path.startswith("/v1/"):
        assert out["error"]["param"] == field


def test_huge_integers_in_ollama_options_and_detokenize(srv):
    st, _, out = raw_post(srv, "/api/generate",
                          ('{"prompt": "x", "stream": false, "options": {"num_predict": %s}}' % BIG).encode())
    assert st == 400 and "num_predict" in out["error"], out
    st, _, out = raw_post(srv, "/api/extra/detokenize", ('{"ids": [%s]}' % BIG).encode())
    assert st == 400, out


def test_lone_surrogates_never_500(srv):
    st, _, out = raw_post(srv, "/v1/embeddings", b'{"input": "a\\ud800b"}')
    assert st == 200 and len(out["data"]) == 1, out
    st, _, out = raw_post(srv, "/api/v1/generate", b'{"prompt": "x", "max_length": 2, "grammar": "root ::= \\"\\ud800\\""}')
    assert st in (200, 400), out
    alive(srv)


def test_embedding_token_ids_are_range_checked(srv):
    for ids in ([-1, 5], [2 ** 32 + 5], [10 ** 6]):
        st, _, out = http("POST", srv.url + "/v1/embeddings", {"input": [ids]})
        assert st == 400 and out["error"]["param"] == "input", (ids, out)
    st, _, out = http("POST", srv.url + "/v1/embeddings", {"input": [[5, 6]]})
    assert st == 200


def _raw(srv, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_conflicting_content_lengths_are_refused(srv):
    body = b'{"prompt": "x", "max_length": 1}'
    out = _raw(srv, b"POST /api/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: 5\r\n\r\n"
               % len(body) + body)
    assert out.startswith(b"HTTP/1.1 400") and b"Content-Length" in out
    out = _raw(srv, b"POST /api/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" % len(body) + body)
    assert out.startswith(b"HTTP/1.1 400")
    out = _raw(srv, b"POST /api/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: %d\r\n"
               b"Connection: close\r\n\r\n" % (len(body), len(body)) + body)
    assert out.startswith(b"HTTP/1.1 200")  # the same length twice is one length


@pytest.mark.parametrize("junk", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",
                                  b"GARBAGE\r\n\r\n", b"GET\r\n\r\n"])
def test_garbage_and_tls_bytes_get_a_status_line(srv, junk):
    out = _raw(srv, junk)
    assert out.startswith(b"HTTP/1.1 400"), out[:80]
    alive(srv)


def test_non_ascii_password_sent_as_utf8():
    with ServerProcess(tiny_model_path(), "--password", "pässwörd", "--quiet") as s:
        key = "pässwörd".encode("utf-8").decode("latin-1")  # how http.client puts UTF-8 bytes on the wire
        st, _, _ = http("POST", s.url + "/api/extra/tokencount", {"prompt": "a"}, {"Authorization": "Bearer " + key})
        assert st == 200
        st, _, _ = http("POST", s.url + "/api/extra/tokencount", {"prompt": "a"}, {"Authorization": "Bearer nope"})
        assert st == 401


def test_openai_shapes_fingerprint_and_param(srv):
    st, _, out = http("POST", srv.url + "/v1/chat/completions", CHAT)
    assert st == 200 and isinstance(out["system_fingerprint"], str)
    st, _, out = http("POST", srv.url + "/v1/chat/completions", dict(CHAT, top_logprobs=99, logprobs=True))
    assert st == 400 and out["error"]["param"] == "top_logprobs"


def test_chinese_llama_alpaca_message_field(srv):
    st, _, out = http("POST", srv.url + "/v1/chat/completions",
                      {"messages": [{"role": "user", "message": "hello"}], "max_tokens": 2})
    assert st == 200 and out["usage"]["prompt_tokens"] > 3, out


def test_max_tokens_edges_over_http(srv):
    st, _, out = http("POST", srv.url + "/v1/completions", {"prompt": "x", "max_tokens": 450, "ban_eos_token": True})
    assert st == 200 and out["usage"]["completion_tokens"] == 450 and out["choices"][0]["finish_reason"] == "length"
    st, _, out = http("POST", srv.url + "/v1/completions", {"prompt": "x", "max_tokens": 512})
    assert st == 400 and out["error"]["param"] == "max_tokens" and "511" in out["error"]["message"]
    st, _, out = http("POST", srv.url + "/api/v1/generate", {"prompt": "x", "max_length": 512})
    assert st == 400 and "512" in out["detail"]["msg"]


@pytest.mark.parametrize("path, body", [
    ("/api/v1/generate", {"prompt": "x", "max_length": 8}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8}),
    ("/v1/chat/completions", dict(CHAT, max_tokens=8)),
    ("/api/chat", {"messages": CHAT["messages"], "stream": False, "options": {"num_predict": 8}}),
])
@pytest.mark.parametrize("pressure", [{"ban_eos_token": True}, {"bypass_eos": True}, {"banned_tokens": ["1"]},
                                      {"stop_sequence": ["1"]}, {"logit_bias": {"2": -100}}])
def test_a_finished_grammar_with_the_end_banned_ends_cleanly(srv, path, body, pressure):
    """A grammar that allows exactly "1", with the end of text banned (or "1" itself banned): once nothing is
    allowed, llama.cpp would abort the process on the next token; generation must end instead."""
    grammar = {"format": {"const": 1}} if path == "/api/chat" else {"grammar": 'root ::= "1"'}
    st, _, out = http("POST", srv.url + path, dict(body, **grammar, **pressure))
    assert st == 200, out
    text = json.dumps(out)
    assert "1" in text or '""' in text
    alive(srv)


@pytest.mark.parametrize("value", [{}, [], 1, None, "bogus"])
def test_reasoning_format_of_any_type_is_a_clean_answer(srv, value):
    st, _, out = http("POST", srv.url + "/v1/chat/completions", dict(CHAT, reasoning_format=value))
    assert st == (200 if value is None else 400), out
    alive(srv)
