"""Instruct adapters: KoboldCpp's role-tag sets that turn chat messages into one prompt string.

An adapter is a dict of tags (chat_start, system_start/_end, user_start/_end, assistant_start/_end, assistant_gen,
tools_start/_end) plus optional sampler defaults (temperature, top_k, top_p, min_p, rep_pen, max_length).
Presets live in adapters/presets/<Name>.json; the preset names are the file stems.
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

# KoboldCpp's built-in tags, used when no --chatcompletionsadapter is given or AutoGuess finds nothing.
DEFAULT_NAME = "Alpaca"
DEFAULT_ADAPTER = {
    "chat_start": "",
    "system_start": "\n### Instruction:\n", "system_end": "",
    "user_start": "\n### Instruction:\n", "user_end": "",
    "assistant_start": "\n### Response:\n", "assistant_end": "",
}

# AutoGuess: the first entry whose every search string occurs in the GGUF chat template wins.
# Order matters: specific families first, generic markers ([/INST], <|im_start|>) last.
AUTOGUESS_TABLE: List[Tuple[str, Tuple[str, ...], str]] = [
    ("ChatML (Phi-4)", ("<|im_start|>assistant", "<|im_end|>", "<|im_sep|>"), "ChatML"),
    ("Gemma", ("<start_of_turn>", "<end_of_turn>"), "Gemma"),
    ("Llama 3.x", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "Llama-3"),
    ("Mistral (Tekken)", ("[SYSTEM_PROMPT]", "[/INST]"), "Mistral-Tekken"),
    ("GLM-4", ("[gMASK]<sop>",), "GLM-4"),
    ("Phi-3", ("<|user|>", "<|assistant|>", "<|end|>"), "Phi-3"),
    ("Command-R", ("<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>"), "Command-R"),
    ("DeepSeek", ("<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"), "DeepSeek"),
    ("Metharme", ("<|user|>", "<|model|>"), "Metharme"),
    ("Llama 2", ("<<SYS>>", "[/INST]"), "Llama-2-Chat"),
    ("Mistral (non-Tekken)", ("[INST]", "[/INST]"), "Mistral-NonTekken"),
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
    return adapter.get(key, DEFAULT_ADAPTER.get(key, ""))


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


def build_chat_prompt(messages: List[dict], adapter: dict, tools_text: str = "", gen_instruction: str = "",
                      continue_assistant: bool = False) -> ChatPrompt:
    """messages: normalised dicts {role, content(str), tool_calls?, tool_call_id?}. tools_text goes into memory (kept
    when the prompt is trimmed); gen_instruction is a system line right before the generation tag."""
    parts = [tag(adapter, "chat_start")]
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
        last = i == len(messages) - 1
        if continue_assistant and last and role == "assistant":
            parts.append(tag(adapter, "assistant_start") + content)
            return _finish(parts, adapter, tools_text)
        parts.append(tag(adapter, f"{key}_start") + content + tag(adapter, f"{key}_end"))
    if gen_instruction:
        parts.append(tag(adapter, "system_start") + gen_instruction + tag(adapter, "system_end"))
    parts.append(tag(adapter, "assistant_gen"))
    return _finish(parts, adapter, tools_text)


def _finish(parts, adapter, tools_text) -> ChatPrompt:
    memory = ""
    if tools_text:
        memory = tag(adapter, "system_start") + tools_text + tag(adapter, "system_end")
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
