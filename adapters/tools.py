"""Tool (function) calling: validation, and the grammars and prompt text of each tool-call format.

Models with a native format (the family's own call syntax; adapters/parsing.py reads it back) get tools described
by their template, and their calls constrained by a grammar: forced for tool_choice "required" or a named function,
lazy for "auto" (free text until the model starts a call). Models without one get grammar-forced JSON calls; for
"auto" a short grammar-constrained question (which tool, or none) comes first, as KoboldCpp does.
"""
from __future__ import annotations

import json
import re
from typing import List, Optional

from adapters.errors import BadRequest

JSON_OBJECT_SCHEMA = {"type": "object"}


def _bad(msg: str, param: str) -> BadRequest:
    return BadRequest(msg, param=param)


def _choice_name(tool_choice: dict) -> str:
    """A named choice: {"type": "function", "function": {"name"}} (Chat) or {"type": "function", "name"}."""
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
    if not isinstance(name, str):
        raise _bad("'tool_choice.function.name' must be a string", "tool_choice")
    return name


def validate_tools(tools, tool_choice):
    """-> (tools list, choice) where choice is "none" | "auto" | "required" | a function name.
    tool_choice shapes: a string, a named function, or {"type": "allowed_tools", "allowed_tools": {"mode",
    "tools"}} (which narrows the tools offered)."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array of {type: 'function', function: {...}} objects", "tools")
    names = []
    for i, t in enumerate(tools):
        if isinstance(t, dict) and t.get("type") == "custom":
            raise _bad(f"tools[{i}] is a custom tool; this server supports function tools only", "tools")
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].function.name must be a non-empty string", "tools")
        params = fn.get("parameters", JSON_OBJECT_SCHEMA)
        if params is not None and not isinstance(params, dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        names.append(name)
    if tool_choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {type: 'function', function: {name}}",
                       "tool_choice")
        choice = tool_choice
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        allowed = tool_choice.get("allowed_tools")
        if not isinstance(allowed, dict) or allowed.get("mode") not in ("auto", "required") \
                or not isinstance(allowed.get("tools"), list):
            raise _bad("'tool_choice.allowed_tools' must be {mode: 'auto' | 'required', tools: [...]}", "tool_choice")
        keep = set()
        for t in allowed["tools"]:
            if not isinstance(t, dict):
                raise _bad("'tool_choice.allowed_tools.tools' must hold {type: 'function', function: {name}}",
                           "tool_choice")
            keep.add(_choice_name(t))
        unknown = sorted(keep - set(names))
        if unknown:
            raise _bad(f"'tool_choice.allowed_tools' names {unknown[0]!r}, which is not in 'tools'", "tool_choice")
        tools = [t for t in tools if t["function"]["name"] in keep]
        names = [n for n in names if n in keep]
        choice = allowed["mode"]
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "custom":
        raise _bad("'tool_choice' names a custom tool; this server supports function tools only", "tool_choice")
    elif isinstance(tool_choice, dict):
        choice = _choice_name(tool_choice)
    else:
        raise _bad("'tool_choice' must be a string or an object", "tool_choice")
    if choice not in ("none", "auto") and not tools:
        raise _bad("'tool_choice' needs a non-empty 'tools' list", "tool_choice")
    if choice not in ("none", "auto", "required") and choice not in names:
        raise _bad(f"'tool_choice' names the function {choice!r}, which is not in 'tools'", "tool_choice")
    return tools, choice


def tool_schema(tool: dict) -> dict:
    return tool["function"].get("parameters") or JSON_OBJECT_SCHEMA


def tools_text(tools: List[dict]) -> str:
    """The tool list as the model sees it (kept in memory so trimming never drops it)."""
    lines = ["### Available Tools:"]
    for t in tools:
        fn = t["function"]
        lines.append(json.dumps({"name": fn["name"], "description": fn.get("description", ""),
                                 "parameters": tool_schema(t)}, ensure_ascii=False))
    return "\n".join(lines)


def call_instruction(names: List[str]) -> str:
    if len(names) == 1:
        return (f"Call the function {names[0]}. Reply only with JSON: "
                f'{{"name": "{names[0]}", "arguments": {{...}}}}')
    return ("Call one of the functions " + ", ".join(names) + '. Reply only with JSON: {"name": ..., "arguments": {...}}')


def schema_to_gbnf(schema: dict, prop_order=None) -> str:
    """llama-cpp-python's converter, with JSON strings kept free of raw control characters (its `char` rule
    allows them, and a raw newline inside a string is invalid JSON)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    g = json_schema_to_gbnf(json.dumps(schema), prop_order=prop_order)
    return g.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')


def call_grammar(tools: List[dict], names: List[str]) -> str:
    """GBNF for one call object {"name": <one of names>, "arguments": <that tool's parameters>}."""
    by_name = {t["function"]["name"]: t for t in tools}
    variants = [{"type": "object", "properties": {"name": {"const": n}, "arguments": tool_schema(by_name[n])},
                 "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    schema = variants[0] if len(variants) == 1 else {"oneOf": variants}
    try:
        return schema_to_gbnf(schema, prop_order=["name", "arguments"])
    except Exception as e:  # the converter raises assorted errors (RecursionError too) on schemas it cannot express
        raise _bad(f"cannot build a grammar from the tool parameters: {type(e).__name__}: {e}", "tools")


def decision_grammar(names: List[str]) -> str:
    schema = {"type": "object", "properties": {"tool": {"enum": list(names) + ["none"]}},
              "required": ["tool"], "additionalProperties": False}
    return schema_to_gbnf(schema)


def decision_instruction(names: List[str]) -> str:
    return ("Decide whether answering the last message needs one of the tools (" + ", ".join(names) +
            '). Reply only with JSON: {"tool": "<tool name>"} or {"tool": "none"}.')


def parse_decision(text: str, names: List[str]) -> Optional[str]:
    try:
        v = json.loads(text, strict=False).get("tool")
    except (ValueError, AttributeError):
        return None
    return v if v in names else None


# ---------------------------------------------------------------------------------------------------------
# native tool-call formats: grammars that force or (lazily) constrain a family's call syntax, the calls of a
# history turn written in that syntax, and how the tools are described when no chat template describes them

def gbnf_literal(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out) + '"'


# per format: the call object's keys ("" = named format: the name is literal text and the body is the arguments)
_OBJ_KEYS = {"json": ("name", "arguments"), "llama3": ("name", "parameters"), "hermes": ("name", "arguments"),
             "mistral": ("name", "arguments"), "granite": ("name", "arguments"), "phi4mini": ("name", "arguments"),
             "command-r": ("tool_name", "parameters")}
# (section grammar, @C@ = one call object, @N@ = one named call; the text that starts a section)
_SECTIONS = {
    "json": ('@C@', None),
    "llama3": ('"<|python_tag|>"? @C@', None),
    "hermes": ('"<tool_call>\\n" @C@ "\\n</tool_call>" ("\\n<tool_call>\\n" @C@ "\\n</tool_call>")*', "<tool_call>"),
    "mistral": ('"[TOOL_CALLS][" @C@ ("," space @C@)* "]"', "[TOOL_CALLS]"),
    "granite": ('"<|tool_call|>[" @C@ ("," space @C@)* "]"', "<|tool_call|>"),
    "phi4mini": ('"<|tool_call|>[" @C@ ("," space @C@)* "]<|/tool_call|>"', "<|tool_call|>"),
    "command-r": ('"Action: ```json\\n[" @C@ ("," space @C@)* "]\\n```"', "Action:"),
    "deepseek": ('"<｜tool▁calls▁begin｜>" @N@+ "<｜tool▁calls▁end｜>"', "<｜tool▁calls▁begin｜>"),
    "kimi": ('"<|tool_calls_section_begin|>" @N@+ "<|tool_calls_section_end|>"', "<|tool_calls_section_begin|>"),
    "glm4": ("@N@", None),
    "harmony": ("@N@", "<|channel|>commentary to="),
}
# named formats: one call of function NAME with arguments ARGS
_NAMED = {
    "deepseek": ('"<｜tool▁call▁begin｜>function<｜tool▁sep｜>" NAME "\\n```json\\n" ARGS "\\n```<｜tool▁call▁end｜>"'),
    "kimi": ('"<|tool_call_begin|>functions." NAME ":" [0-9] "<|tool_call_argument_begin|>" ARGS "<|tool_call_end|>"'),
    "glm4": ('NAME "\\n" ARGS'),
    "harmony": ('"<|channel|>commentary to=functions." NAME " <|constrain|>json<|message|>" ARGS'),
}
NATIVE_FORMATS = tuple(_SECTIONS)


def format_grammar(tools: List[dict], names: List[str], fmt: str, parallel: bool = True,
                   after: str = "") -> str:
    """GBNF for a section of calls to `names` in format `fmt` (several calls when `parallel` and the format
    allows). `after`: text the section must follow (the end of a reasoning block that the prompt opened)."""
    from llama_cpp.llama_grammar import SchemaConverter
    by_name = {t["function"]["name"]: t for t in tools}
    conv = SchemaConverter(prop_order={"name": 0, "tool_name": 0, "arguments": 1, "parameters": 1},
                           allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        rules = []
        if fmt in _NAMED:
            for i, n in enumerate(names):
                args = conv.visit(conv.resolve_refs(tool_schema(by_name[n]), "tool"), f"args{i}")
                rules.append(_NAMED[fmt].replace("NAME", gbnf_literal(n)).replace("ARGS", args))
            body = {"@N@": "ncall"}
            extra = ["ncall ::= " + " | ".join(f"( {r} )" for r in rules)]
        else:
            kn, ka = _OBJ_KEYS[fmt]
            for i, n in enumerate(names):
                schema = {"type": "object", "properties": {kn: {"const": n}, ka: tool_schema(by_name[n])},
                          "required": [kn, ka], "additionalProperties": False}
                rules.append(conv.visit(conv.resolve_refs(schema, "tool"), f"call{i}"))
            body = {"@C@": "call"}
            extra = ["call ::= " + " | ".join(rules)]
        conv.visit({"type": "null"}, "")  # defines the shared `space` rule
        section = _SECTIONS[fmt][0]
        if not parallel:  # exactly one call
            section = {"hermes": '"<tool_call>\\n" @C@ "\\n</tool_call>"', "mistral": '"[TOOL_CALLS][" @C@ "]"',
                       "granite": '"<|tool_call|>[" @C@ "]"', "phi4mini": '"<|tool_call|>[" @C@ "]<|/tool_call|>"',
                       "command-r": '"Action: ```json\\n[" @C@ "]\\n```"'}.get(fmt, section).replace("@N@+", "@N@")
        for k, v in body.items():
            section = section.replace(k, v)
        grammar = conv.format_grammar()
    except Exception as e:  # the converter raises assorted errors (RecursionError too) on schemas it cannot express
        raise _bad(f"cannot build a grammar from the tool parameters: {type(e).__name__}: {e}", "tools")
    lines = [ln for ln in grammar.splitlines() if not ln.startswith("root ::=")]
    root = f"root ::= {gbnf_literal(after)} [ \\t\\n]* {section}" if after else f"root ::= {section}"
    return "\n".join([root] + extra + lines) + "\n"


def format_triggers(fmt: str, names: List[str], after: str = "") -> List[str]:
    """Python regexes (group 1 starts the constrained text) that start a lazy tool grammar, for "auto" calls."""
    if after:
        return ["(" + re.escape(after) + ")"]
    if fmt == "llama3":
        return [r"(<\|python_tag\|>)", r"^\s*(\{\s*\"name\")"]
    if fmt == "glm4":
        return [r"^\s*((?:" + "|".join(re.escape(n) for n in names) + r")\n)"]
    trigger = _SECTIONS[fmt][1]
    if trigger is None:
        return [r"^\s*(\{)"]
    return ["(" + re.escape(trigger) + ")"]


def _args_text(call: dict) -> str:
    a = (call.get("function") or {}).get("arguments", "{}")
    return a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)


def render_calls(fmt: str, calls: List[dict]) -> str:
    """A history turn's tool calls (OpenAI shape) written the way the family writes them."""
    items = [((c.get("function") or {}).get("name", ""), _args_text(c)) for c in calls if isinstance(c, dict)]
    if fmt in _OBJ_KEYS:
        kn, ka = _OBJ_KEYS[fmt]
        objs = [f'{{"{kn}": {json.dumps(n, ensure_ascii=False)}, "{ka}": {a}}}' for n, a in items]
        if fmt == "hermes":
            return "\n".join(f"<tool_call>\n{o}\n</tool_call>" for o in objs)
        if fmt in ("json", "llama3"):
            return "; ".join(objs)
        lst = "[" + ", ".join(objs) + "]"
        return {"mistral": "[TOOL_CALLS]" + lst, "granite": "<|tool_call|>" + lst,
                "phi4mini": "<|tool_call|>" + lst + "<|/tool_call|>",
                "command-r": "Action: ```json\n" + lst + "\n```"}[fmt]
    if fmt == "deepseek":
        return "<｜tool▁calls▁begin｜>" + "".join(
            f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{a}\n```<｜tool▁call▁end｜>" for n, a in items) \
            + "<｜tool▁calls▁end｜>"
    if fmt == "kimi":
        return "<|tool_calls_section_begin|>" + "".join(
            f"<|tool_call_begin|>functions.{n}:{i}<|tool_call_argument_begin|>{a}<|tool_call_end|>"
            for i, (n, a) in enumerate(items)) + "<|tool_calls_section_end|>"
    if fmt == "glm4":
        return "\n".join(f"{n}\n{a}" for n, a in items)
    if fmt == "harmony":
        return "".join(f"<|channel|>commentary to=functions.{n} <|constrain|>json<|message|>{a}<|call|>"
                       for n, a in items)
    return "\n".join(json.dumps({"name": n, "arguments": json.loads(a) if _is_json(a) else a}, ensure_ascii=False)
                     for n, a in items)


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


def native_tools_text(tools: List[dict], fmt: str) -> str:
    """The tool list and the family's call syntax, for prompts built from an adapter (no template to do it)."""
    example = render_calls(fmt, [{"function": {"name": "<function name>", "arguments": '{"<argument>": "<value>"}'}}])
    return (tools_text(tools) + "\nTo call a function, reply with exactly this (nothing else):\n" + example +
            ("\nSeveral calls may follow one another." if fmt in ("hermes", "mistral", "granite", "phi4mini",
                                                                 "command-r", "deepseek", "kimi") else ""))


def detect_format(chat_template: str) -> str:
    """The tool-call format a model's own chat template teaches, or "" when it has none we read."""
    t = chat_template or ""
    if "<|channel|>" in t:
        return "harmony"
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "tool▁calls▁begin" in t:
        return "deepseek"
    if "<|tool_calls_section_begin|>" in t:
        return "kimi"
    if "<|tool_call|>" in t:
        return "phi4mini" if "<|/tool_call|>" in t else "granite"
    if "<|START_ACTION|>" in t or ("Action:" in t and "tool_name" in t):
        return "command-r"
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and '"parameters"' in t) or \
            ("<|header_start|>" in t and "parameters" in t):
        return "llama3"
    if "[gMASK]" in t and "tools" in t:
        return "glm4"
    return ""
