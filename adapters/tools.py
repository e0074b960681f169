"""Tool (function) calling for models without native tool tags: grammar-forced JSON calls.

Forced calls (tool_choice names a function, or "required") generate under a GBNF grammar built from the tools'
parameter schemas, so the arguments always parse and match the schema. "auto" first asks the model a short
grammar-constrained question (which tool, or none), as KoboldCpp does, then forces that call or answers normally.
"""
from __future__ import annotations

import json
import random
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


def new_call_id() -> str:
    return "call_" + "".join(random.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(24))


def parse_calls(text: str) -> Optional[List[dict]]:
    """Generated JSON -> [{"name", "arguments" (a JSON value)}], or None if it did not complete."""
    try:
        obj = json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return None
    calls = obj if isinstance(obj, list) else [obj]
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            return None
        out.append({"name": c["name"], "arguments": c.get("arguments", {})})
    return out


def parse_call(text: str) -> Optional[List[dict]]:
    """Generated JSON -> OpenAI tool_calls (arguments as a JSON string, a fresh call id each), or None."""
    calls = parse_calls(text)
    return None if calls is None else [{"id": new_call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]
