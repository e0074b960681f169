"""The request pipeline without HTTP: one token budget for every dialect, reproducible output after ContextShift,
chat content never expanded as a placeholder, typed parsing of the bodies clients send."""
import pytest

from adapters import instruct, kobold, ollama, openai as oa
from adapters.errors import BadRequest
from gguf_loader.engine import Engine, EngineConfig
from gguf_loader.jobs import BudgetError, GenRequest, InvalidRequest, SamplingParams, token_budget
from tests.tinymodel import CHATML_TEMPLATE, tiny_model_path

N_CTX = 512
GREEDY = SamplingParams(temperature=0, ban_eos=True)


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineConfig(tiny_model_path(chat_template=CHATML_TEMPLATE), n_ctx=N_CTX, n_threads=2, n_slots=1))
    yield e
    e.close()


@pytest.fixture(scope="module")
def ctx(engine):
    name, adapter = instruct.load_adapter("ChatML")
    return oa.Context(engine=engine, model_name="koboldcpp/tiny", adapter_name=name, adapter=adapter,
                      default_max_length=16, log=lambda s: None)


def run(engine, prompt, n, **kw):
    return engine.submit(GenRequest(prompt=prompt, max_length=n, sampling=GREEDY, **kw)).wait(120)


def test_token_budget_rule():
    assert token_budget(512, None, 511) == (512, 511)
    assert token_budget(512, 100, 99) == (100, 99)
    assert token_budget(512, 9999, 500) == (512, 500)  # a larger client context is the server's
    for bad in (512, 513, 0, -3):
        with pytest.raises(BudgetError):
            token_budget(512, None, bad)
    with pytest.raises(BudgetError) as e:
        token_budget(512, 100, 100)
    assert "100" in e.value.describe("max_tokens") and "at most 99" in e.value.describe("max_tokens")


@pytest.mark.parametrize("extra, kept", [(-1, 0), (0, 0), (1, 1)])
def test_prompt_plus_max_at_the_context_edge(engine, extra, kept):
    """prompt + max = n_ctx - 1 and n_ctx keep the whole prompt; n_ctx + 1 trims one token from its front; the
    request always gets every token it asked for."""
    prompt = [1] + [10 + i % 400 for i in range(99)]
    n = N_CTX - len(prompt) + extra
    r = run(engine, prompt, n)
    assert r.error is None and r.completion_tokens == n and r.finish_reason == "length"
    assert r.prompt_tokens == len(prompt) - kept


def test_max_length_without_room_for_a_prompt_is_refused(engine):
    with pytest.raises(InvalidRequest, match="512"):
        engine.submit(GenRequest(prompt="hi", max_length=N_CTX))


def test_openai_max_tokens_is_honoured_not_capped(ctx, engine):
    """Was: max_tokens 450 in a 512 context was silently cut to 410 with finish_reason "length"."""
    from adapters.run import JobRunner
    plan = oa.parse_completion({"prompt": "once upon a time", "max_tokens": 450, "ban_eos_token": True}, ctx)
    out = oa.run_blocking(plan, JobRunner(engine))
    assert out["usage"]["completion_tokens"] == 450 and out["choices"][0]["finish_reason"] == "length"
    for key, v in (("max_tokens", 512), ("max_completion_tokens", 513)):
        with pytest.raises(BadRequest) as e:
            oa.parse_chat({"messages": [{"role": "user", "content": "hi"}], key: v}, ctx)
        assert e.value.param == key and str(v) in e.value.msg and "511" in e.value.msg
    with pytest.raises(BadRequest) as e:  # a native max_context_length is the budget's context too
        oa.parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
                       "max_context_length": 100}, ctx)
    assert "100" in e.value.msg
    with pytest.raises(BadRequest) as e:
        ollama.parse_generate({"prompt": "x", "options": {"num_predict": 600}}, ctx)
    assert e.value.param == "options.num_predict"


def test_native_max_length_beyond_the_context_is_a_400_at_submit(engine):
    req = kobold.parse_generate({"prompt": "x", "max_length": 10 ** 9}, kobold.GenDefaults(max_context_length=N_CTX))
    with pytest.raises(InvalidRequest):
        engine.submit(req)


def test_shifted_cache_never_changes_a_later_request(engine):
    """Was: after another request shared a run of 32+ tokens, ContextShift left shifted entries in the cache and the
    same greedy request then got different logits (different text on a near-tie prompt)."""
    S, A, B = [1] + list(range(10, 30)), list(range(100, 140)), list(range(150, 230))
    C, D = list(range(240, 260)), list(range(270, 280))

    def lp(prompt):
        r = engine.submit(GenRequest(prompt=prompt, max_length=8, sampling=GREEDY, logprobs=True,
                                     top_logprobs=1)).wait(60)
        return r, [t.logprob for t in r.logprobs]

    cold, cold_lp = lp(S + B + D)
    lp(S + A + B)
    shifted, _ = lp(S + B + C)  # drops A: served by ContextShift
    assert shifted.cached_tokens >= len(S) + len(B) - 1
    again, again_lp = lp(S + B + D)
    assert again.text == cold.text and again_lp == cold_lp  # bitwise: fresh values, not shifted ones


def test_chat_content_is_never_expanded_as_a_placeholder(ctx):
    msgs = [{"role": "user", "content": "literal {{[INPUT]}} and {{[OUTPUT]}} here"}]
    p = oa.parse_chat({"messages": msgs}, ctx).requests[0].prompt
    assert "literal {{[INPUT]}} and {{[OUTPUT]}} here" in p
    p = ollama.parse_chat({"messages": msgs}, ctx).requests[0].prompt
    assert "literal {{[INPUT]}} and {{[OUTPUT]}} here" in p
    p = ollama.parse_generate({"prompt": "keep {{[SYSTEM]}} as typed"}, ctx).requests[0].prompt
    assert "keep {{[SYSTEM]}} as typed" in p


def test_valid_openai_bodies_are_accepted(ctx):
    assert oa.parse_completion({"prompt": []}, ctx).requests[0].prompt == ""
    msgs = [{"role": "user", "content": "what is 2+2?"},
            {"role": "assistant", "content": None, "function_call": {"name": "add", "arguments": "{}"}},
            {"role": "function", "name": "add", "content": None},
            {"role": "assistant"},
            {"role": "user", "message": "and 3+3?"}]  # Chinese-LLaMA-Alpaca clients send `message`
    req = oa.parse_chat({"messages": msgs}, ctx).requests[0]
    assert "and 3+3?" in req.prompt
    tools = [{"type": "function", "function": {"name": "add"}}, {"type": "function", "function": {"name": "sub"}}]
    plan = oa.parse_chat({"messages": msgs[:1], "tools": tools, "tool_choice": {
        "type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
            {"type": "function", "function": {"name": "sub"}}]}}}, ctx)
    assert plan.tool_mode == "forced" and plan.tool_names == ["sub"]
    with pytest.raises(BadRequest) as e:
        oa.parse_chat({"messages": msgs[:1], "tools": [{"type": "custom", "custom": {"name": "x"}}]}, ctx)
    assert e.value.param == "tools"


@pytest.mark.parametrize("field", ["max_tokens", "temperature", "seed", "n", "top_k", "logit_bias"])
def test_huge_integers_are_400s_naming_the_field(ctx, field):
    big = 10 ** 400
    body = {"messages": [{"role": "user", "content": "x"}], field: {"5": big} if field == "logit_bias" else big}
    with pytest.raises(BadRequest) as e:
        oa.parse_chat(body, ctx)
    assert field in e.value.msg and e.value.param == field


def test_native_fields_on_openai_bodies_use_the_declared_list(ctx):
    req = oa.parse_chat({"messages": [{"role": "user", "content": "x"}], "rep_pen": "1.1", "top_a": 0.2,
                         "banned_tokens": ["zzz"], "sampler_order": [6, 5, 0], "mirostat": 2}, ctx).requests[0]
    assert req.sampling.rep_pen == 1.1 and req.sampling.top_a == 0.2 and req.banned_phrases == ["zzz"]
    assert req.sampling.sampler_order == [6, 5, 0] and req.sampling.mirostat == 2
