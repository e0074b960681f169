"""Each family's REAL chat template (tests/templates/*.jinja, provenance in the README there), carried in a tiny GGUF:
AutoGuess on the template read back from the file picks the family's preset, and the preset's prompt equals the
template rendered with jinja2, turn by turn, for several conversations."""
from pathlib import Path

import pytest

from adapters import instruct
from gguf_loader.inspect import inspect
from tests.tinymodel import write_tiny_llama

TEMPLATES = Path(__file__).resolve().parent / "templates"

DS_BOS, DS_EOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
ALL = ("system+user", "user", "history", "multi-turn")
NO_SYSTEM = ("user", "multi-turn")

# fixture stem -> (preset AutoGuess must pick, bos_token, eos_token, conversations compared)
FAMILIES = {
    "Llama-2-Chat": ("Llama-2-Chat", "<s>", "</s>", ALL),
    "Llama-3": ("Llama-3", "<|begin_of_text|>", "<|eot_id|>", ALL),
    "Llama-3.1": ("Llama-3.1", "<|begin_of_text|>", "<|eot_id|>", ALL),
    "Llama-3.2": ("Llama-3.2", "<|begin_of_text|>", "<|eot_id|>", ALL),
    "Llama-3.3": ("Llama-3.1", "<|begin_of_text|>", "<|eot_id|>", ALL),
    "Llama-4": ("Llama-4", "<|begin_of_text|>", "<|eot|>", ALL),
    "Mistral-NonTekken": ("Mistral-NonTekken", "<s>", "</s>", ALL),
    "Mistral-V3": ("Mistral-V3", "<s>", "</s>", ALL),
    "Mistral-V3-Tekken": ("Mistral-V3-Tekken", "<s>", "</s>", ALL),
    "Mistral-V7": ("Mistral-V7", "<s>", "</s>", ALL),
    # Mistral Small 3.2 writes its own long model-specific default system prompt when none is given; the generic
    # Tekken preset does not, so only conversations that carry a system message are compared.
    "Mistral-Tekken": ("Mistral-Tekken", "<s>", "</s>", ("system+user", "history")),
    "Phi-3": ("Phi-3", "", "<|endoftext|>", ALL),
    "Phi-4": ("Phi-4", "", "<|im_end|>", ALL),
    "Phi-4-mini": ("Phi-4-mini", "", "<|endoftext|>", ALL),
    "ChatML": ("ChatML", "", "<|im_end|>", ALL),
    "Qwen2.5": ("Qwen2.5", "", "<|im_end|>", ALL),
    "Qwen3": ("Qwen3", "", "<|im_end|>", ALL + ("reasoning-history",)),
    "QwQ": ("QwQ", "", "<|im_end|>", ALL + ("reasoning-history",)),
    # Gemma 2's template refuses a system message (raise_exception); Gemma 3 folds it into the first user turn
    "Gemma-2": ("Gemma", "<bos>", "<eos>", NO_SYSTEM),
    "Gemma-3": ("Gemma", "<bos>", "<eos>", ALL),
    "DeepSeek-R1": ("DeepSeek-R1", DS_BOS, DS_EOS, ALL + ("reasoning-history",)),
    "Kimi-K2": ("Kimi-K2", "", "<|im_end|>", ALL),
    "GPT-OSS": ("GPT-OSS", "", "<|return|>", ALL),
    "GLM-4": ("GLM-4", "", "<|user|>", ALL),
    "Command-R": ("Command-R", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ALL),
    "Granite": ("Granite", "", "<|end_of_text|>", ALL),
    "Granite-3.0": ("Granite-3.0", "", "<|end_of_text|>", ALL),
    "Vicuna": ("Vicuna", "", "</s>", ALL),
    # Hermes 2 Pro's tool_use template always writes its tool-calling system prompt, tools or not: only AutoGuess
    # is checked (ChatML tags plus the hermes tool format); the tags are compared under the ChatML fixture.
    "Hermes": ("Hermes", "<|begin_of_text|>", "<|im_end|>", ()),
}

SYS = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "Hi there"}
A1 = {"role": "assistant", "content": "Hello! How can I help?"}
U2 = {"role": "user", "content": "Name a color."}
A2 = {"role": "assistant", "content": "Blue."}
U3 = {"role": "user", "content": "Another one?"}
A_THINK = {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"}
CONVERSATIONS = {
    "system+user": [SYS, U1],
    "user": [U1],
    "history": [SYS, U1, A1, U2],
    "multi-turn": [U1, A1, U2, A2, U3],
    # an earlier reply that still carries its reasoning: the reasoning families' templates drop it
    "reasoning-history": [U1, A_THINK, U2],
}


def test_every_fixture_is_listed_with_provenance():
    stems = {p.stem for p in TEMPLATES.glob("*.jinja")}
    assert stems == set(FAMILIES)
    readme = (TEMPLATES / "README.md").read_text(encoding="utf-8")
    for stem in stems:
        assert f"`{stem}.jinja`" in readme


@pytest.fixture(scope="module")
def gguf_templates(tmp_path_factory):
    """Each fixture written into a tiny GGUF and read back: the chat template as the server sees it."""
    d = tmp_path_factory.mktemp("tpl")
    out = {}
    for stem in FAMILIES:
        text = (TEMPLATES / f"{stem}.jinja").read_text(encoding="utf-8")
        path = write_tiny_llama(d / f"{stem}.gguf", n_embd=16, n_layers=1, n_ff=32, n_head=2, n_head_kv=1,
                                chat_template=text)
        out[stem] = inspect(path).chat_template
        assert out[stem] == text
    return out


@pytest.mark.parametrize("stem", sorted(FAMILIES))
def test_autoguess_picks_the_family(stem, gguf_templates):
    logs = []
    name, adapter = instruct.load_adapter("AutoGuess", gguf_templates[stem], log=logs.append)
    assert name == FAMILIES[stem][0]
    assert logs == [f"Chat completion heuristic: {name}"]


CASES = [(stem, conv) for stem in sorted(FAMILIES) for conv in FAMILIES[stem][3]]


@pytest.mark.parametrize("stem,conv", CASES)
def test_preset_reproduces_the_template(stem, conv, gguf_templates):
    preset, bos, eos, _ = FAMILIES[stem]
    _, adapter = instruct.load_adapter(preset)
    messages = CONVERSATIONS[conv]
    rendered = instruct.render_jinja(gguf_templates[stem], messages, bos_token=bos, eos_token=eos)
    # the engine adds BOS when it tokenizes, so the prompt text starts after it
    if bos and rendered.startswith(bos):
        rendered = rendered[len(bos):]
    # Dates (Llama 3.2, Granite, gpt-oss) come from strftime on both sides, so they agree without normalising.
    ours = instruct.build_chat_prompt(messages, adapter).prompt
    assert ours == rendered


def test_family_facts():
    """tool_format / think markers are present exactly where the family's template has them."""
    facts = {n: instruct.load_adapter(n)[1] for n in instruct.list_presets()}
    assert facts["Qwen2.5"]["tool_format"] == facts["Qwen3"]["tool_format"] == facts["QwQ"]["tool_format"] == "hermes"
    assert facts["Llama-3.1"]["tool_format"] == facts["Llama-4"]["tool_format"] == "llama3"
    assert facts["Mistral-Tekken"]["tool_format"] == "mistral"
    assert facts["DeepSeek-R1"]["tool_format"] == "deepseek" and facts["Kimi-K2"]["tool_format"] == "kimi"
    assert facts["GPT-OSS"]["tool_format"] == "harmony" and facts["Granite"]["tool_format"] == "granite"
    assert facts["Phi-4-mini"]["tool_format"] == "phi4mini" and facts["Command-R"]["tool_format"] == "command-r"
    assert facts["GLM-4"]["tool_format"] == "glm4"
    for name in ("Qwen3", "QwQ", "DeepSeek-R1"):
        assert (facts[name]["think_start"], facts[name]["think_end"]) == ("<think>", "</think>")
    # the generation prompt opens <think> for QwQ and R1 (their templates end with it), not for Qwen 3
    assert facts["QwQ"]["think_in_prompt"] and facts["DeepSeek-R1"]["think_in_prompt"]
    assert "think_in_prompt" not in facts["Qwen3"]
    assert facts["QwQ"]["assistant_gen"].endswith("<think>\n")
    assert facts["DeepSeek-R1"]["assistant_gen"].endswith("<think>\n")
    # no tool calls in Llama 3.0's or Mistral 7B v0.1/v0.2's templates
    for name in ("ChatML", "Alpaca", "Vicuna", "Metharme", "Gemma", "Phi-3", "Phi-4", "Llama-3", "Mistral-NonTekken"):
        assert "tool_format" not in facts[name] and "think_start" not in facts[name]
    for ad in facts.values():
        assert ad.get("tool_format", "hermes") in instruct.TOOL_FORMATS


@pytest.mark.parametrize("template,preset", [
    # families without a reachable real template: AutoGuess on their markers (see tests/templates/README.md)
    ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<\uff5cUser\uff5c>{{ m.content }}"
     "{% elif m.role == 'assistant' %}<\uff5cAssistant\uff5c>{{ m.content }}<\uff5cend\u2581of\u2581sentence\uff5c>"
     "{% else %}{{ m.content }}{% endif %}{% endfor %}<\uff5cAssistant\uff5c>", "DeepSeek"),
    ("{% for m in messages %}{% if m.role == 'user' %}<|user|>{% elif m.role == 'system' %}<|system|>{% else %}"
     "<|model|>{% endif %}{{ m.content }}{% endfor %}<|model|>", "Metharme"),
    ("{% for m in messages %}### Instruction:\n{{ m.content }}\n{% endfor %}### Response:\n", "Alpaca"),
])
def test_autoguess_marker_only_families(template, preset):
    assert instruct.autoguess(template) == preset


def test_gaps_named_in_issue_11_are_closed():
    _, nemo = instruct.load_adapter("AutoGuess", (TEMPLATES / "Mistral-V3-Tekken.jinja").read_text(), log=lambda s: 0)
    assert instruct.build_chat_prompt([U1], nemo).prompt == "[INST]Hi there[/INST]"
    _, ds = instruct.load_adapter("DeepSeek")
    assert instruct.build_chat_prompt([SYS, U1], ds).prompt == "You are terse.<\uff5cUser\uff5c>Hi there<\uff5cAssistant\uff5c>"
    _, phi4 = instruct.load_adapter("AutoGuess", (TEMPLATES / "Phi-4.jinja").read_text(), log=lambda s: 0)
    assert "<|im_sep|>" in instruct.build_chat_prompt([U1], phi4).prompt
