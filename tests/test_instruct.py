"""Instruct adapters: presets, --chatcompletionsadapter resolution, AutoGuess, prompts, placeholders, jinja."""
import json

import pytest

from adapters import instruct

# the names KoboldCpp users already pass to --chatcompletionsadapter, then the families added for issue 11
REQUIRED_PRESETS = ["Alpaca", "ChatML", "Llama-2-Chat", "Llama-3", "Mistral-Tekken", "Mistral-NonTekken", "Gemma",
                    "Phi-3", "Vicuna", "Metharme", "Command-R", "DeepSeek", "GLM-4",
                    "Llama-3.1", "Llama-3.2", "Llama-4", "Mistral-V3", "Mistral-V3-Tekken", "Mistral-V7", "Phi-4",
                    "Phi-4-mini", "Qwen2.5", "Qwen3", "QwQ", "DeepSeek-R1", "Kimi-K2", "GPT-OSS", "Granite",
                    "Granite-3.0", "Hermes"]

# Short templates written for these tests in each family's style (not copies of real ones).
TEMPLATES = {
    "ChatML": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "Gemma": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
             "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    "Llama-3": "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
               "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "Mistral-Tekken": "{% for m in messages %}{% if m.role == 'system' %}[SYSTEM_PROMPT]{{ m.content }}[/SYSTEM_PROMPT]"
                      "{% elif m.role == 'user' %}[INST]{{ m.content }}[/INST]{% else %}{{ m.content }}</s>{% endif %}"
                      "{% endfor %}",
    "Mistral-NonTekken": "{% for m in messages %}{% if m.role == 'user' %} [INST] {{ m.content }} [/INST]"
                         "{% else %} {{ m.content }}</s>{% endif %}{% endfor %}",
    "Llama-2-Chat": "{% for m in messages %}{% if m.role == 'system' %}<<SYS>>\n{{ m.content }}\n<</SYS>>\n\n"
                    "{% elif m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %} {{ m.content }} </s>"
                    "{% endif %}{% endfor %}",
    "Phi-3": "{% for m in messages %}{% if m.role == 'user' %}<|user|>\n{% else %}<|assistant|>\n{% endif %}"
             "{{ m.content }}<|end|>\n{% endfor %}<|assistant|>\n",
    "GLM-4": "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}<|assistant|>\n",
    "Command-R": "{% for m in messages %}<|START_OF_TURN_TOKEN|>{% if m.role == 'user' %}<|USER_TOKEN|>{% else %}"
                 "<|CHATBOT_TOKEN|>{% endif %}{{ m.content }}<|END_OF_TURN_TOKEN|>{% endfor %}",
    "DeepSeek": "{% for m in messages %}{% if m.role == 'user' %}<\uff5cUser\uff5c>{{ m.content }}{% else %}"
                "<\uff5cAssistant\uff5c>{{ m.content }}{% endif %}{% endfor %}<\uff5cAssistant\uff5c>",
    "Metharme": "{% for m in messages %}{% if m.role == 'user' %}<|user|>{% else %}<|model|>{% endif %}"
                "{{ m.content }}{% endfor %}<|model|>",
    "Vicuna": "{% for m in messages %}{% if m.role == 'user' %}USER: {% else %}ASSISTANT: {% endif %}{{ m.content }}\n"
              "{% endfor %}ASSISTANT:",
    # Phi-4 is ChatML with <|im_sep|>: its own preset, not generic ChatML
    "Phi-4": "{% for m in messages %}<|im_start|>{{ m.role }}<|im_sep|>{{ m.content }}<|im_end|>{% endfor %}"
             "<|im_start|>assistant<|im_sep|>",
}


def test_required_presets_ship_and_load():
    names = instruct.list_presets()
    for n in REQUIRED_PRESETS:
        assert n in names
        name, ad = instruct.load_adapter(n)
        assert name == n
        for key in ("system_start", "user_start", "assistant_start"):
            assert isinstance(ad[key], str)
        assert ad["user_start"] != ad["assistant_start"]


def test_default_is_builtin_alpaca():
    name, ad = instruct.load_adapter(None)
    assert name == "Alpaca"
    assert ad["system_start"] == ad["user_start"] == "\n### Instruction:\n"
    assert ad["assistant_start"] == "\n### Response:\n"
    assert ad["user_end"] == ad["assistant_end"] == ad["system_end"] == ""


def test_preset_name_case_insensitive_and_json_suffix():
    assert instruct.load_adapter("chatml")[0] == "ChatML"
    assert instruct.load_adapter("LLAMA-3.json")[0] == "Llama-3"


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(instruct.AdapterError) as e:
        instruct.load_adapter("NoSuchTemplate")
    assert "NoSuchTemplate" in str(e.value) and "ChatML" in str(e.value)


def test_adapter_file_and_bad_files(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"user_start": "<U>", "assistant_start": "<A>", "temperature": 0.3}))
    name, ad = instruct.load_adapter(str(f))
    assert name == "mine" and ad["user_start"] == "<U>" and ad["temperature"] == 0.3
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(instruct.AdapterError, match="not valid JSON"):
        instruct.load_adapter(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"user_start": 5}))
    with pytest.raises(instruct.AdapterError, match="user_start"):
        instruct.load_adapter(str(wrong))


def test_autoguess_table_file(tmp_path):
    f = tmp_path / "guess.json"
    f.write_text(json.dumps([{"search": ["<X>"], "name": "X-style", "adapter": {"user_start": "<X>"}}]))
    logs = []
    assert instruct.load_adapter(str(f), "abc <X> def", log=logs.append) == ("X-style", {"user_start": "<X>"})
    assert instruct.load_adapter(str(f), "nothing", log=logs.append)[0] == "Alpaca"
    assert any("X-style" in line for line in logs)


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_autoguess_families(family):
    logs = []
    name, ad = instruct.load_adapter("AutoGuess", TEMPLATES[family], log=logs.append)
    assert name == family
    assert logs == [f"Chat completion heuristic: {family}"]


def test_autoguess_falls_back_to_alpaca_and_says_so():
    logs = []
    assert instruct.load_adapter("autoguess", None, log=logs.append)[0] == "Alpaca"
    assert instruct.load_adapter("AutoGuess", "{{ messages }}", log=logs.append)[0] == "Alpaca"
    assert len(logs) == 2 and "Alpaca" in logs[0]


def test_chat_prompt_chatml():
    _, ad = instruct.load_adapter("ChatML")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    cp = instruct.build_chat_prompt(msgs, ad)
    assert cp.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                         "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert "<|im_start|>user" in cp.stop and "<|im_end|>" in cp.stop


def test_chat_prompt_default_alpaca_and_tools_roles():
    _, ad = instruct.load_adapter(None)
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    cp = instruct.build_chat_prompt(msgs, ad, tools_text="### Available Tools:\n{}", gen_instruction="Answer.")
    assert cp.prompt.startswith("\n### Instruction:\nWeather?")
    assert "(Made a function call call_1 to weather with arguments={\"city\": \"Oslo\"})" in cp.prompt
    assert "Received results of function call call_1:\nsunny" in cp.prompt
    assert cp.prompt.endswith("\n### Instruction:\nAnswer.\n### Response:\n")
    assert cp.memory == "\n### Instruction:\n### Available Tools:\n{}"
    assert cp.stop == ["### Instruction:", "### Response:"]


def test_continue_assistant_turn_and_assistant_gen():
    _, ad = instruct.load_adapter("Vicuna")
    cp = instruct.build_chat_prompt([{"role": "user", "content": "Hi"}], ad)
    assert cp.prompt.endswith("USER: Hi\nASSISTANT:")  # assistant_gen has no trailing space
    cp = instruct.build_chat_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}],
                                    ad, continue_assistant=True)
    assert cp.prompt.endswith("ASSISTANT: Well,")


def test_merge_adapter_overrides_for_one_request():
    _, base = instruct.load_adapter("ChatML")
    merged = instruct.merge_adapter(base, {"user_start": "<<U>>", "top_k": 5})
    assert merged["user_start"] == "<<U>>" and merged["assistant_start"] == base["assistant_start"]
    assert base["user_start"] == "<|im_start|>user\n"
    with pytest.raises(instruct.AdapterError):
        instruct.merge_adapter(base, {"user_start": ["x"]})
    with pytest.raises(instruct.AdapterError):
        instruct.merge_adapter(base, "ChatML")


def test_replace_placeholders():
    _, ad = instruct.load_adapter("ChatML")
    text = "{{[SYSTEM]}}S{{[SYSTEM_END]}}{{[INPUT]}}U{{[INPUT_END]}}{{[OUTPUT]}}"
    assert instruct.replace_placeholders(text, ad) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert instruct.replace_placeholders("no tags {{x}}", ad) == "no tags {{x}}"
    assert instruct.replace_placeholders(None, ad) is None


def test_jinja_renders_in_sandbox():
    out = instruct.render_jinja(TEMPLATES["ChatML"], [{"role": "user", "content": "Hi"}])
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # the sandbox blocks attribute escapes; that is a clear JinjaError, not a crash
    with pytest.raises(instruct.JinjaError):
        instruct.render_jinja("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(instruct.JinjaError, match="refused"):
        instruct.render_jinja("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(instruct.JinjaError, match="does not parse"):
        instruct.render_jinja("{% for %}", [])
    # the messages object is immutable inside the template
    with pytest.raises(instruct.JinjaError):
        instruct.render_jinja("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


def test_optional_keys_are_validated():
    with pytest.raises(instruct.AdapterError, match="system_fold"):
        instruct.validate_adapter({"system_fold": "{system} only"})
    with pytest.raises(instruct.AdapterError, match="system_fold_at"):
        instruct.validate_adapter({"system_fold": "{content}", "system_fold_at": "middle"})
    with pytest.raises(instruct.AdapterError, match="trim_content"):
        instruct.validate_adapter({"trim_content": "yes"})
    with pytest.raises(instruct.AdapterError, match="tool_format"):
        instruct.validate_adapter({"tool_format": "xml"})
    with pytest.raises(instruct.AdapterError, match="strip_think_history"):
        instruct.validate_adapter({"strip_think_history": True})
    with pytest.raises(instruct.AdapterError, match="default_system"):
        instruct.validate_adapter({"default_system": 3})
    for bad in ("%Y\x00", "%Y" * 40, 5):
        with pytest.raises(instruct.AdapterError, match="date_format"):
            instruct.validate_adapter({"date_format": bad})
    ad = instruct.validate_adapter({"tool_format": "hermes", "think_in_prompt": True, "date_format": "%Y"})
    assert ad == {"tool_format": "hermes", "think_in_prompt": True, "date_format": "%Y"}


def test_system_fold_first_and_last():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    base = {"user_start": "<u>", "user_end": "</u>", "assistant_start": "<a>", "assistant_end": "</a>",
            "system_fold": "[{system}]{content}"}
    assert instruct.build_chat_prompt(msgs, base).prompt == "<u>[S]a</u><a>b</a><u>c</u><a>"
    last = dict(base, system_fold_at="last")
    assert instruct.build_chat_prompt(msgs, last).prompt == "<u>a</u><a>b</a><u>[S]c</u><a>"
    # no user message at all: the system text still reaches the model, as a user turn
    assert instruct.build_chat_prompt(msgs[:1], base).prompt == "<u>S</u><a>"
    # server-added instructions use user tags where the family has no system role
    cp = instruct.build_chat_prompt(msgs[1:2], base, tools_text="T", gen_instruction="G")
    assert cp.memory == "<u>T</u>" and cp.prompt == "<u>a</u><u>G</u><a>"


def test_default_system_prefix_date_trim_and_think_history():
    ad = {"system_start": "<s>", "system_end": "</s>", "user_start": "<u>", "user_end": "</u>",
          "assistant_start": "<a>", "assistant_end": "</a>", "default_system": "Day {date}.",
          "system_prefix": "P:", "date_format": "%Y", "trim_content": True,
          "think_end": "</think>", "strip_think_history": "split"}
    year = __import__("time").strftime("%Y")
    msgs = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "<think>x</think>ok"},
            {"role": "user", "content": "more"}]
    assert instruct.build_chat_prompt(msgs, ad).prompt == (f"<s>P:Day {year}.</s><u>hi</u><a>ok</a><u>more</u><a>")
    # a given system message replaces the default; the prefix stays
    msgs = [{"role": "system", "content": "Mine"}, {"role": "user", "content": "hi"}]
    assert instruct.build_chat_prompt(msgs, ad).prompt == "<s>P:Mine</s><u>hi</u><a>"
    # the turn being continued keeps its text as is
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think> Well,"}]
    cp = instruct.build_chat_prompt(msgs, ad, continue_assistant=True)
    assert cp.prompt.endswith("<a><think>x</think> Well,")


@pytest.mark.parametrize("name", ["Mistral-V3-Tekken", "Llama-2-Chat", "GPT-OSS", "Qwen2.5", "Gemma"])
def test_placeholders_follow_new_presets(name):
    """Kobold Lite's {{[INPUT]}}-style placeholders map to each preset's own tags."""
    _, ad = instruct.load_adapter(name)
    text = "{{[SYSTEM]}}{{[SYSTEM_END]}}{{[INPUT]}}{{[INPUT_END]}}{{[OUTPUT]}}{{[OUTPUT_END]}}"
    want = "".join(instruct.tag(ad, k) for k in ("system_start", "system_end", "user_start", "user_end",
                                                  "assistant_start", "assistant_end"))
    assert instruct.replace_placeholders(text, ad) == want
    assert "{{[" not in want and "{date}" not in want


def test_explicit_stops_replace_the_role_tag_stops():
    _, harmony = instruct.load_adapter("GPT-OSS")
    # the analysis channel ends with <|end|> and the final answer follows in the same reply: not a stop
    assert instruct.chat_stops(harmony) == ["<|start|>user", "<|start|>developer", "<|start|>system"]
    _, chatml = instruct.load_adapter("ChatML")
    assert "<|im_end|>" in instruct.chat_stops(chatml)
    for bad in ("<|end|>", [""], [1], ["x"] * 17):
        with pytest.raises(instruct.AdapterError, match="stops"):
            instruct.validate_adapter({"stops": bad})
