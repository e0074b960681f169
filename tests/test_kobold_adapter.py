"""adapters/kobold.py, adapters/errors.py, adapters/sse.py without a model or a server."""
import json

import pytest

from adapters import kobold, sse
from adapters.errors import BadRequest, Busy, PayloadTooLarge, Unauthorized, error_body
from gguf_loader.jobs import DEFAULT_SAMPLER_ORDER, Result, TokenLogprob

D = kobold.GenDefaults(max_length=120, max_context_length=2048, n_vocab=1000)


def parse(**body):
    return kobold.parse_generate(body, D)


def test_defaults_follow_koboldcpp():
    r = parse(prompt="Hello")
    s = r.sampling
    assert r.prompt == "Hello" and r.memory == ""
    assert r.max_length == 120 and r.max_context_length == 2048
    assert (s.temperature, s.top_k, s.top_p, s.top_a, s.min_p, s.typical, s.tfs) == (0.75, 100, 0.92, 0, 0, 1, 1)
    assert (s.rep_pen, s.rep_pen_range, s.rep_pen_slope) == (1.0, 320, 1.0)
    assert s.sampler_order == DEFAULT_SAMPLER_ORDER and s.seed == -1 and s.grammar == "" and not s.ban_eos
    assert (s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n, s.xtc_threshold) == (1.75, 2, 320, 0.2)
    assert r.trim_stop is True and r.stop == [] and r.logprobs is False and r.genkey == ""


def test_values_and_unknown_fields():
    r = parse(prompt="p", memory="m", max_length=32, max_context_length=1024, temperature=0.2, top_k=5,
              sampler_seed=42, genkey="KCPP1234", n=1, quiet=True, use_world_info=False, gui_settings=False,
              singleline=True, trim_stop=False, bypass_eos=True, render_special=True)
    assert (r.memory, r.max_length, r.max_context_length) == ("m", 32, 1024)
    assert (r.sampling.temperature, r.sampling.top_k, r.sampling.seed) == (0.2, 5, 42)
    assert r.genkey == "KCPP1234" and r.trim_stop is False and r.bypass_eos and r.render_special


def test_numeric_strings_and_nulls_are_accepted():
    r = parse(prompt="p", max_length="16", temperature="0.5", top_k=None)
    assert r.max_length == 16 and r.sampling.temperature == 0.5 and r.sampling.top_k == 100


def test_rep_pen_aliases_take_the_max():
    assert parse(rep_pen=1.1, repeat_penalty=1.3, repetition_penalty=1.2).sampling.rep_pen == 1.3
    assert parse(repetition_penalty=1.15).sampling.rep_pen == 1.15
    assert parse(rep_pen=0).sampling.rep_pen == 1.0


def test_ban_eos_alias():
    assert parse(use_default_badwordsids=True).sampling.ban_eos is True
    assert parse(ban_eos_token=False, use_default_badwordsids=True).sampling.ban_eos is False


def test_clamping():
    r = parse(max_context_length=999999, max_length=999999, temperature=-1, top_p=3, top_k=-5, min_p=2,
              xtc_probability=7, mirostat=9, sampler_seed=-77, dry_base=0.1)
    assert r.max_context_length == 2048 and r.max_length == 2048
    s = r.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.xtc_probability, s.mirostat, s.seed) == (0, 1, 0, 1, 1, 0, -1)
    assert s.dry_base == 1.0
    assert parse(max_length=0).max_length == 1
    assert parse(sampler_seed=2**40 + 5).sampling.seed == 5


@pytest.mark.parametrize("body, word", [
    ({"max_length": "abc"}, "max_length"),
    ({"prompt": 5}, "prompt"),
    ({"temperature": [1]}, "temperature"),
    ({"top_k": 1.5}, "top_k"),
    ({"trim_stop": "maybe"}, "trim_stop"),
    ({"stop_sequence": [1, 2]}, "stop_sequence"),
    ({"stop_sequence": {"a": 1}}, "stop_sequence"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5000": 1}}, "out of range"),
    ({"custom_token_bans": "1,x"}, "custom_token_bans"),
    ({"sampler_order": [6, 9]}, "sampler_order"),
    ({"sampler_order": "6,0"}, "sampler_order"),
    ({"memory": {}}, "memory"),
    ({"genkey": 5}, "genkey"),
    ({"grammar": 5}, "grammar"),
    ({"adapter": "x"}, "adapter"),
])
def test_wrong_types_are_clear_bad_requests(body, word):
    with pytest.raises(BadRequest) as e:
        kobold.parse_generate(body, D)
    assert word in e.value.msg and e.value.status == 400


@pytest.mark.parametrize("body", [[1, 2], "text", 5, None])
def test_non_object_body(body):
    with pytest.raises(BadRequest, match="JSON object"):
        kobold.parse_generate(body, D)


def test_non_finite_numbers_rejected():
    with pytest.raises(BadRequest, match="finite"):
        kobold.parse_generate(json.loads('{"temperature": NaN}'), D)
    with pytest.raises(BadRequest, match="finite"):
        parse(top_p="inf")


def test_stop_sequences():
    assert parse(stop_sequence="\n").stop == ["\n"]
    assert parse(stop_sequence=["a", "", "b"]).stop == ["a", "b"]
    assert len(parse(stop_sequence=[str(i) for i in range(300)]).stop) == 256


def test_logit_bias_and_token_bans():
    s = parse(logit_bias={"5": 250, "7": -3.5}, custom_token_bans="1, 2,3").sampling
    assert s.logit_bias == {5: 100.0, 7: -3.5, 1: -100.0, 2: -100.0, 3: -100.0}
    assert parse(custom_token_bans=[4]).sampling.logit_bias == {4: -100.0}


def test_banned_phrases_go_to_the_engine():
    r = kobold.parse_generate({"banned_strings": ["cat", "big dog", " "]}, kobold.GenDefaults())
    assert r.banned_phrases == ["cat", "big dog"] and r.sampling.logit_bias == {}
    assert kobold.parse_generate({"banned_tokens": ["cat"]}, kobold.GenDefaults()).banned_phrases == ["cat"]
    with pytest.raises(kobold.BadRequest):
        kobold.parse_generate({"banned_tokens": 5}, kobold.GenDefaults())


def test_dry_sequence_breakers_array_or_json_string():
    assert parse(dry_sequence_breakers=["\n", ":"]).sampling.dry_sequence_breakers == ["\n", ":"]
    assert parse(dry_sequence_breakers='["\\n", "*"]').sampling.dry_sequence_breakers == ["\n", "*"]


def test_sampler_order_dedup():
    assert parse(sampler_order=[6, 0, 0, 5]).sampling.sampler_order == [6, 0, 5]


def test_logprobs_flag_and_count():
    r = parse(logprobs=True)
    assert r.logprobs and r.top_logprobs == 5
    r = parse(logprobs=3)
    assert r.logprobs and r.top_logprobs == 3
    assert parse(logprobs=0).logprobs is False
    assert parse(logprobs=99).top_logprobs == 20


def test_grammar_gbnf_kept_and_json_schema_converted():
    g = 'root ::= "yes" | "no"'
    assert parse(grammar=g).sampling.grammar == g
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    gbnf = parse(grammar=json.dumps(schema)).sampling.grammar
    assert "root ::=" in gbnf and "age" in gbnf
    assert "root ::=" in kobold.parse_json_to_grammar({"schema": schema})
    assert "root ::=" in kobold.parse_json_to_grammar(schema)
    with pytest.raises(BadRequest):
        kobold.parse_json_to_grammar({"schema": 5})


def test_instruct_placeholders():
    r = parse(prompt="{{[INPUT]}}Hi{{[OUTPUT]}}", stop_sequence=["{{[INPUT]}}"])
    assert r.prompt == "\n### Instruction:\nHi\n### Response:\n" and r.stop == ["\n### Instruction:\n"]
    r = parse(prompt="{{[INPUT]}}Hi{{[INPUT_END]}}{{[OUTPUT]}}",
              adapter={"user_start": "<u>", "user_end": "</u>", "assistant_start": "<a>"})
    assert r.prompt == "<u>Hi</u><a>"
    d = kobold.GenDefaults(instruct_tags={"user_start": "U:", "assistant_start": "A:"})
    assert kobold.parse_generate({"prompt": "{{[INPUT]}}x{{[OUTPUT]}}"}, d).prompt == "U:xA:"
    assert parse(prompt="{{[INPUT]}}", replace_instruct_placeholders=False).prompt == "{{[INPUT]}}"


def _result(**kw):
    base = dict(text="Hi there", finish_reason="stop", stop_reason=1, prompt_tokens=4, completion_tokens=2)
    base.update(kw)
    return Result(**base)


def test_generate_response_shape():
    out = kobold.generate_response(_result())
    assert out == {"results": [{"text": "Hi there", "finish_reason": "stop", "logprobs": None, "prompt_tokens": 4,
                                "completion_tokens": 2, "tool_calls": []}]}
    assert kobold.generate_response(_result(finish_reason="length"))["results"][0]["finish_reason"] == "length"
    # aborted: 200 with the text so far and "stop" (KoboldCpp); a stop string also "stop"
    assert kobold.generate_response(_result(finish_reason="abort"))["results"][0]["finish_reason"] == "stop"


def test_logprobs_combined_shape():
    lps = [TokenLogprob("Hi", -0.5, [72, 105], [("Hi", -0.5, [72, 105]), ("Ho", -1.5, [72, 111])]),
           TokenLogprob(" there", float("-inf"), [32], [(" there", float("-inf"), [32])])]
    obj = kobold.generate_response(_result(logprobs=lps))["results"][0]["logprobs"]
    json.dumps(obj, allow_nan=False)  # strictly valid JSON
    assert obj["tokens"] == ["Hi", " there"] and obj["token_logprobs"] == [-0.5, -9999.0]
    assert obj["text_offset"] == [0, 2]
    assert obj["top_logprobs"][0] == {"Hi": -0.5, "Ho": -1.5}
    c = obj["content"][0]
    assert c["token"] == "Hi" and c["bytes"] == [72, 105] and c["top_logprobs"][1] == {"token": "Ho", "logprob": -1.5,
                                                                                    "bytes": [72, 111]}


def test_sse_framing_is_koboldcpp_exact():
    assert kobold.stream_token("Hé") == b'event: message\ndata: {"token": "H\\u00e9", "finish_reason": null}\n\n'
    assert kobold.stream_end(_result(finish_reason="length")) == \
        b'event: message\ndata: {"token": "", "finish_reason": "length"}\n\n'
    assert sse.event({"a": 1}) == b'data: {"a": 1}\n\n'
    assert sse.event("[DONE]") == b"data: [DONE]\n\n"


def test_error_bodies():
    assert error_body("kobold", Unauthorized()) == {"detail": {"error": "Unauthorized",
                                                               "msg": "Authentication key is missing or invalid.",
                                                               "type": "unauthorized"}}
    assert error_body("kobold", Busy()) == {"detail": {"msg": "Server is busy; please try again later.",
                                                       "type": "service_unavailable"}}
    assert error_body("kobold", PayloadTooLarge(32))["detail"]["msg"] == "Payload is too big. Max payload size is 32MB."
    o = error_body("openai", BadRequest("bad"))["error"]
    assert o["message"] == "bad" and o["type"] == "invalid_request_error"
    assert error_body("ollama", BadRequest("bad")) == {"error": "bad"}


def test_tokenize_detokenize_genkey_parsers():
    assert kobold.parse_tokenize({"prompt": "abc"}) == ("abc", True)
    assert kobold.parse_tokenize({"prompt": "abc", "special": False}) == ("abc", False)
    with pytest.raises(BadRequest) as e:
        kobold.parse_tokenize({"prompt": 3})
    assert error_body("kobold", e.value)["value"] == -1
    assert kobold.parse_detokenize({"ids": [1, 2]}, 1000) == ([1, 2], False)
    with pytest.raises(BadRequest):
        kobold.parse_detokenize({"ids": [1, 5000]}, 1000)
    with pytest.raises(BadRequest):
        kobold.parse_detokenize({"ids": "1,2"}, 1000)
    assert kobold.parse_genkey({"genkey": "KCPP1"}) == "KCPP1" and kobold.parse_genkey({}) == ""


def test_perf_response_adds_missing_keys():
    p = kobold.perf_response({"queue": 0, "idle": 1}, quiet=True)
    assert p["queue"] == 0 and p["quiet"] is True and p["total_img_gens"] == 0


def test_lone_surrogates_become_replacement_chars():
    body = json.loads('{"prompt": "a\\ud800b", "memory": "\\udc00", "stop_sequence": ["x\\ud800"]}')
    r = kobold.parse_generate(body, D)
    assert r.prompt == "a\ufffdb" and r.memory == "\ufffd" and r.stop == ["x\ufffd"]
    r.prompt.encode("utf-8")
    assert kobold.parse_tokenize(json.loads('{"prompt": "\\ud83d\\ude00"}'))[0] == "\U0001F600"  # a real pair
