"""Instruct adapters: KoboldCpp's role-tag sets that turn chat messages into one prompt string.

An adapter is a dict of tags (chat_start, system_start/_end, user_start/_end, assistant_start/_end, assistant_gen,
tools_start/_end) plus optional sampler defaults (temperature, top_k, top_p, min_p, rep_pen, max_length).
Presets live in adapters/presets/<Name>.json; the preset names are the file stems.

Optional keys for families one set of tags cannot express (all absent = KoboldCpp's plain behaviour):
  system_fold      the family has no system turn: system text is merged into a user message with this format,
                   "{system}" and "{content}" are replaced (Llama 2: "<<SYS>>\n{system}\n<</SYS>>\n\n{content}").
  system_fold_at   "first" (default) or "last": which user message gets the folded system text (Mistral v3 and
                   Tekken put it into the last one).
  default_system   system text used when the conversation has none (Qwen 2.5, Kimi K2, Granite); "" still emits
                   an empty system turn (Llama 3.1 always writes its system header).
  system_prefix    text written at the start of every system turn's content (Llama 3.1's knowledge/date lines).
  date_format      strftime format; "{date}" in any tag, default_system and system_prefix becomes today's date.
  trim_content     true: message text is stripped of surrounding whitespace, as the template's trim/strip does.
  strip_think_history  "split": earlier assistant turns keep only the text after the last think_end, as the
                   template drops their reasoning (DeepSeek R1); "split_lstrip": the same without the newlines that
                   start that text (Qwen 3, QwQ).
  stops            the strings that mean the model has started a new turn, replacing the ones derived from the
                   role tags (gpt-oss ends its analysis with <|end|> and goes on in the same reply).

Facts about the family for the parsers of model output (not used to build prompts):
  tool_format      how the model writes tool calls: "hermes" (<tool_call>\n{json}\n</tool_call>), "llama3"
                   ({"name", "parameters"} JSON, optionally after <|python_tag|>), "mistral" ([TOOL_CALLS]...),
                   "deepseek" (<｜tool▁calls▁begin｜>...), "kimi" (<|tool_calls_section_begin|>...), "harmony"
                   (<|channel|>commentary to=functions.NAME ... <|call|>), "granite" (<|tool_call|>[...]),
                   "phi4mini" (<|tool_call|>[...]<|/tool_call|>), "command-r", "glm4".
  think_start, think_end  the markers around the model's reasoning (e.g. <think> and </think>).
  think_in_prompt  true when the generation prompt itself opens the thinking block (QwQ, DeepSeek R1): the output
                   starts inside the reasoning and the first think_end closes it.
"""
from __future__ import annotations

import ast
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

PRESET_DIR = Path(__file__).resolve().parent / "presets"

TAG_KEYS = ("chat_start", "system_start", "system_end", "user_start", "user_end", "assistant_start",
            "assistant_end", "assistant_gen", "tools_start", "tools_end")
SAMPLER_KEYS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "rep_pen": float,
                "max_length": int}
# the optional keys of the module docstring, by type
STR_KEYS = ("system_fold", "system_prefix", "default_system", "date_format", "tool_format", "think_start",
            "think_end")
BOOL_KEYS = ("trim_content", "think_in_prompt")
TOOL_FORMATS = ("hermes", "llama3", "mistral", "deepseek", "kimi", "harmony", "granite", "phi4mini", "command-r",
                "glm4")

# KoboldCpp's built-in tags, used when no --chatcompletionsadapter is given or AutoGuess finds nothing.
DEFAULT_NAME = "Alpaca"
DEFAULT_ADAPTER = {
    "chat_start": "",
    "system_start": "\n### Instruction:\n", "system_end": "",
    "user_start": "\n### Instruction:\n", "user_end": "",
    "assistant_start": "\n### Response:\n", "assistant_end": "",
}

# AutoGuess: the first entry whose every search string occurs in the GGUF chat template wins.
# Order matters: specific families first, generic markers ([INST], <|im_start|>) last. The needles are
# written as they appear in the template source (a "\\n" needle is the two characters backslash and n).
AUTOGUESS_TABLE: List[Tuple[str, Tuple[str, ...], str]] = [
    ("gpt-oss (Harmony)", ("<|start|>", "<|channel|>", "<|message|>"), "GPT-OSS"),
    ("Kimi K2", ("<|im_assistant|>assistant<|im_middle|>",), "Kimi-K2"),
    ("Phi-4", ("<|im_start|>", "<|im_sep|>"), "Phi-4"),
    ("Phi-4-mini", ("<|/tool|>", "<|end|>", "<|assistant|>"), "Phi-4-mini"),
    ("Gemma 2/3", ("<start_of_turn>", "<end_of_turn>"), "Gemma"),
    ("Llama 4", ("<|header_start|>", "<|header_end|>", "<|eot|>"), "Llama-4"),
    ("Llama 3.2", ("<|start_header_id|>", "<|eot_id|>", "Cutting Knowledge Date", "strftime_now"), "Llama-3.2"),
    ("Llama 3.1/3.3", ("<|start_header_id|>", "<|eot_id|>", "Cutting Knowledge Date"), "Llama-3.1"),
    ("Llama 3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "Llama-3"),
    ("Granite 3.2/3.3", ("<|start_of_role|>", "<|end_of_role|>", "Knowledge Cutoff Date"), "Granite"),
    ("Granite 3.0/3.1", ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"), "Granite-3.0"),
    ("Command-R", ("<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>"), "Command-R"),
    ("GLM-4", ("[gMASK]<sop>",), "GLM-4"),
    ("Phi-3/3.5", ("<|user|>", "<|assistant|>", "<|end|>"), "Phi-3"),
    ("DeepSeek R1", ("<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c><think>"), "DeepSeek-R1"),
    ("DeepSeek V2.5/V3", ("<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"), "DeepSeek"),
    ("Metharme", ("<|user|>", "<|model|>"), "Metharme"),
    ("Mistral v7", ("[SYSTEM_PROMPT] ", "[INST] "), "Mistral-V7"),
    ("Mistral v7 Tekken", ("[SYSTEM_PROMPT]", "[INST]"), "Mistral-Tekken"),
    ("Llama 2", ("<<SYS>>", "[/INST]"), "Llama-2-Chat"),
    ("Mistral v3 Tekken (Nemo)", ('"[INST]" +', "[/INST]"), "Mistral-V3-Tekken"),
    ("Mistral v3 Tekken (Nemo)", ("'[INST]' +", "[/INST]"), "Mistral-V3-Tekken"),
    ("Mistral v3", ('"[INST] " +', "[/INST]"), "Mistral-V3"),
    ("Mistral v3", ("'[INST] ' +", "+ '[/INST]'"), "Mistral-V3"),
    ("Mistral v1", ("[INST]", "[/INST]"), "Mistral-NonTekken"),
    ("QwQ", ("<|im_start|>assistant\\n<think>\\n",), "QwQ"),
    ("Qwen 3", ("<|im_start|>", "<think>", "enable_thinking"), "Qwen3"),
    ("Qwen 2.5", ("<|im_start|>", "You are Qwen, created by Alibaba Cloud"), "Qwen2.5"),
    ("ChatML with Hermes tool calls", ("<|im_start|>", "<|im_end|>", "<tool_call>"), "Hermes"),
    ("ChatML", ("<|im_start|>", "<|im_end|>"), "ChatML"),
    ("Vicuna", ("USER:", "ASSISTANT:"), "Vicuna"),
    ("Alpaca", ("### Instruction", "### Response"), "Alpaca"),
]


class AdapterError(ValueError):
    """A bad adapter spec or object; the message is meant for the user."""


def list_presets() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def validate_adapter(obj, source: str = "adapter") -> dict:
    """Check types; unknown keys (image-gen extras of other versions) are kept but ignored."""
    if not isinstance(obj, dict):
        raise AdapterError(f"{source} must be a JSON object of tags, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if k in TAG_KEYS:
            if v is None:
                continue
            if not isinstance(v, str):
                raise AdapterError(f"{source}: '{k}' must be a string")
            out[k] = v
        elif k in SAMPLER_KEYS:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise AdapterError(f"{source}: '{k}' must be a number")
            out[k] = SAMPLER_KEYS[k](v)
        elif k in STR_KEYS:
            if not isinstance(v, str):
                raise AdapterError(f"{source}: '{k}' must be a string")
            if k == "tool_format" and v not in TOOL_FORMATS:
                raise AdapterError(f"{source}: 'tool_format' must be one of {', '.join(TOOL_FORMATS)}")
            if k == "date_format":
                try:
                    ok = len(v) <= 64 and isinstance(time.strftime(v), str)
                except (ValueError, UnicodeError):  # a NUL byte, an unencodable character
                    ok = False
                if not ok:
                    raise AdapterError(f"{source}: 'date_format' must be a strftime format of at most 64 characters")
            if k == "system_fold" and "{content}" not in v:
                raise AdapterError(f"{source}: 'system_fold' must contain {{content}} (and usually {{system}})")
            out[k] = v
        elif k == "stops":
            if (not isinstance(v, list) or len(v) > 16
                    or not all(isinstance(x, str) and x.strip() and len(x) <= 200 for x in v)):
                raise AdapterError(f"{source}: 'stops' must be a list of at most 16 non-empty strings")
            out[k] = list(v)
        elif k == "strip_think_history":
            if v not in ("split", "split_lstrip"):
                raise AdapterError(f"{source}: 'strip_think_history' must be \"split\" or \"split_lstrip\"")
            out[k] = v
        elif k == "system_fold_at":
            if v not in ("first", "last"):
                raise AdapterError(f"{source}: 'system_fold_at' must be \"first\" or \"last\"")
            out[k] = v
        elif k in BOOL_KEYS:
            if not isinstance(v, bool):
                raise AdapterError(f"{source}: '{k}' must be true or false")
            out[k] = v
        else:
            out[k] = v
    return out


def merge_adapter(base: dict, override) -> dict:
    """The active adapter with a request's `adapter` object laid over it (for that request only)."""
    if override is None:
        return dict(base)
    merged = dict(base)
    merged.update(validate_adapter(override, "adapter"))
    return merged


def tag(adapter: dict, key: str) -> str:
    if key == "assistant_gen":
        v = adapter.get("assistant_gen")
        return adapter.get("assistant_start", DEFAULT_ADAPTER["assistant_start"]) if v is None else v
    if key in ("tools_start", "tools_end") and key not in adapter:
        return adapter.get("user_start" if key == "tools_start" else "user_end", "")
    return _expand(adapter, adapter.get(key, DEFAULT_ADAPTER.get(key, "")))


def _instruction_tags(adapter: dict) -> Tuple[str, str]:
    """Tags for text the server adds (tool lists, instructions): a system turn, or a user turn where the family
    has no system role."""
    key = "user" if adapter.get("system_fold") else "system"
    return tag(adapter, f"{key}_start"), tag(adapter, f"{key}_end")


def autoguess(chat_template: Optional[str], table=None) -> Optional[str]:
    """Preset name for a GGUF chat template, or None."""
    if not chat_template:
        return None
    for entry in (table or AUTOGUESS_TABLE):
        label, needles, preset = entry
        if all(n in chat_template for n in needles):
            return preset
    return None


def _load_preset(name: str) -> Optional[Tuple[str, dict]]:
    want = name[:-5] if name.lower().endswith(".json") else name
    for stem in list_presets():
        if stem.lower() == want.lower():
            with open(PRESET_DIR / f"{stem}.json", encoding="utf-8") as f:
                return stem, validate_adapter(json.load(f), f"preset {stem}")
    return None


def _guess(chat_template, table, log) -> Tuple[str, dict]:
    preset = None
    if isinstance(table, list) and table and isinstance(table[0], dict):
        # a KoboldCpp-style AutoGuess JSON: [{"search": [...], "name": ..., "adapter": {...}}, ...]
        for entry in table:
            needles = entry.get("search") or []
            if chat_template and needles and all(n in chat_template for n in needles):
                name = entry.get("name", "custom")
                log(f"Chat completion heuristic: {name}")
                return name, validate_adapter(entry.get("adapter", {}), f"AutoGuess entry {name}")
    else:
        preset = autoguess(chat_template)
    if preset:
        log(f"Chat completion heuristic: {preset}")
        return _load_preset(preset)
    log(f"Chat completion heuristic: no match for the model's chat template; using {DEFAULT_NAME}")
    return DEFAULT_NAME, dict(DEFAULT_ADAPTER)


def load_adapter(spec, chat_template: Optional[str] = None, log: Callable[[str], None] = print) -> Tuple[str, dict]:
    """Resolve --chatcompletionsadapter: None/"" -> built-in Alpaca; "AutoGuess"; a preset name (any case,
    ".json" optional); a JSON file (an object of tags, or a list = AutoGuess table); a JSON/dict literal."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return DEFAULT_NAME, dict(DEFAULT_ADAPTER)
    if isinstance(spec, dict):
        return "custom", validate_adapter(spec)
    if not isinstance(spec, str):
        raise AdapterError(f"--chatcompletionsadapter must be a name or a file, got {spec!r}")
    s = spec.strip()
    if s.lower() == "autoguess":
        return _guess(chat_template, None, log)
    if os.path.isfile(s):
        try:
            with open(s, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterError(f"adapter file {s} is not valid JSON: {e}")
        if isinstance(data, list):
            return _guess(chat_template, data, log)
        return Path(s).stem, validate_adapter(data, f"adapter file {s}")
    found = _load_preset(s)
    if found:
        return found
    if s.startswith("{"):
        try:
            data = json.loads(s)
        except json.JSONDecodeError:
            try:
                data = ast.literal_eval(s)
            except (ValueError, SyntaxError) as e:
                raise AdapterError(f"adapter is not a valid JSON object: {e}")
        return "custom", validate_adapter(data)
    raise AdapterError(f"unknown chat adapter {spec!r}: not a file, not AutoGuess, and not one of the presets "
                       f"({', '.join(list_presets())})")


# ---- prompts ----

PLACEHOLDERS = {
    "{{[SYSTEM]}}": "system_start", "{{[SYSTEM_END]}}": "system_end",
    "{{[INPUT]}}": "user_start", "{{[INPUT_END]}}": "user_end",
    "{{[OUTPUT]}}": "assistant_start", "{{[OUTPUT_END]}}": "assistant_end",
}


def replace_placeholders(text, adapter: dict):
    """Kobold Lite's instruct placeholders -> the active adapter's tags (strings pass through untouched otherwise)."""
    if not isinstance(text, str) or "{{[" not in text:
        return text
    for ph, key in PLACEHOLDERS.items():
        if ph in text:
            text = text.replace(ph, tag(adapter, key))
    return text


def chat_stops(adapter: dict) -> List[str]:
    """Role tags that mean the model has started a new turn: hidden stop strings for chat."""
    if "stops" in adapter:
        return list(adapter["stops"])
    out = []
    for key in ("user_start", "assistant_start", "system_start", "assistant_end"):
        s = tag(adapter, key).strip()
        if s and s not in out:
            out.append(s)
    return out


@dataclass
class ChatPrompt:
    prompt: str
    memory: str = ""
    stop: List[str] = field(default_factory=list)


def _expand(adapter: dict, text: str) -> str:
    fmt = adapter.get("date_format")
    if fmt and "{date}" in text:
        text = text.replace("{date}", time.strftime(fmt))
    return text


def _turns(messages: List[dict], adapter: dict, continue_assistant: bool) -> List[Tuple[str, str]]:
    """(tag key, content) per turn after the family's rules: tool-call text, trimming, dropped reasoning, the
    default system prompt, the system prefix and system folding."""
    trim = adapter.get("trim_content")
    strip_think = adapter.get("strip_think_history")
    think_end = adapter.get("think_end") if strip_think else None
    turns = []
    for i, m in enumerate(messages):
        role = m["role"]
        content = m.get("content") or ""
        if role == "assistant" and not content and m.get("tool_calls"):
            content = "\n".join(
                f"(Made a function call {c.get('id', '')} to {c.get('function', {}).get('name', '')} with arguments="
                f"{c.get('function', {}).get('arguments', '')})" for c in m["tool_calls"])
        if role == "tool":
            content = f"\nReceived results of function call {m.get('tool_call_id') or ''}:\n{content}"
            key = "tools"
        elif role in ("system", "developer"):
            key = "system"
        else:
            key = role
        continuing = continue_assistant and i == len(messages) - 1 and role == "assistant"
        if think_end and key == "assistant" and not continuing and think_end in content:
            content = content.split(think_end)[-1]
            if strip_think == "split_lstrip":
                content = content.lstrip("\n")
        if trim and not continuing:
            content = content.strip()
        turns.append((key, content))
    if "default_system" in adapter and not any(k == "system" for k, _ in turns):
        turns.insert(0, ("system", _expand(adapter, adapter["default_system"])))
    prefix = _expand(adapter, adapter.get("system_prefix", ""))
    if prefix:
        turns = [(k, prefix + c if k == "system" else c) for k, c in turns]
    fold = adapter.get("system_fold")
    if fold:
        system = "\n\n".join(c for k, c in turns if k == "system")
        turns = [(k, c) for k, c in turns if k != "system"]
        if system:
            users = [i for i, (k, _) in enumerate(turns) if k == "user"]
            if users:
                at = users[-1] if adapter.get("system_fold_at") == "last" else users[0]
                turns[at] = ("user", fold.replace("{system}", system).replace("{content}", turns[at][1]))
            else:
                turns.insert(0, ("user", system))
    return turns


def build_chat_prompt(messages: List[dict], adapter: dict, tools_text: str = "", gen_instruction: str = "",
                      continue_assistant: bool = False) -> ChatPrompt:
    """messages: normalised dicts {role, content(str), tool_calls?, tool_call_id?}. tools_text goes into memory (kept
    when the prompt is trimmed); gen_instruction is a system line right before the generation tag."""
    parts = [tag(adapter, "chat_start")]
    turns = _turns(messages, adapter, continue_assistant)
    for i, (key, content) in enumerate(turns):
        if continue_assistant and i == len(turns) - 1 and key == "assistant":
            parts.append(tag(adapter, "assistant_start") + content)
            return _finish(parts, adapter, tools_text)
        parts.append(tag(adapter, f"{key}_start") + content + tag(adapter, f"{key}_end"))
    if gen_instruction:
        start, end = _instruction_tags(adapter)
        parts.append(start + gen_instruction + end)
    parts.append(tag(adapter, "assistant_gen"))
    return _finish(parts, adapter, tools_text)


def _finish(parts, adapter, tools_text) -> ChatPrompt:
    memory = ""
    if tools_text:
        start, end = _instruction_tags(adapter)
        memory = start + tools_text + end
    return ChatPrompt(prompt="".join(parts), memory=memory, stop=chat_stops(adapter))


# ---- jinja (the model's own chat template) ----

class JinjaError(ValueError):
    pass


_jinja_cache = {}


def render_jinja(template: str, messages: List[dict], tools=None, add_generation_prompt: bool = True,
                 bos_token: str = "", eos_token: str = "", extra: Optional[dict] = None) -> str:
    """Render a GGUF chat template in a sandbox. BOS is left out: the engine adds it when tokenizing. `extra`:
    further template variables (a request's chat_template_kwargs, e.g. enable_thinking, reasoning_effort)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise JinjaError(f"--jinja needs the jinja2 package ({e})")
    tpl = _jinja_cache.get(template)
    if tpl is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise JinjaError(f"chat template refused the messages: {msg}")

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        try:
            tpl = env.from_string(template)
        except TemplateError as e:
            raise JinjaError(f"the model's chat template does not parse: {e}")
        _jinja_cache[template] = tpl
    kwargs = {k: v for k, v in (extra or {}).items() if isinstance(k, str)}
    kwargs.update(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                  eos_token=eos_token)
    if tools:
        kwargs["tools"] = tools
    try:
        return tpl.render(**kwargs)
    except JinjaError:
        raise
    except Exception as e:  # sandbox violations, undefined attributes, template bugs
        raise JinjaError(f"the model's chat template failed: {type(e).__name__}: {e}")
