"""A model's chat output split, as it streams, into content, reasoning (thinking) and tool calls.

Every chat dialect feeds the generated text through an OutputParser piece by piece and gets Deltas back: content
text, reasoning text, and tool-call pieces (a call's id and name first, then its arguments as they are generated).
At the end the parser's Message holds the whole turn. Formats:
- reasoning: a leading `<think>...</think>` block (the tags come from the template; the generation prompt may have
  opened the block already), or gpt-oss's Harmony channels (analysis = reasoning, final = content);
- tool calls, one grammar per family (`FORMATS`): Hermes/Qwen `<tool_call>{json}</tool_call>`, Llama 3.x JSON,
  Mistral `[TOOL_CALLS]`, DeepSeek, Kimi K2, Granite, Phi-4-mini, Command-R, GLM-4, Harmony commentary calls, and
  "json": the bare `{"name", "arguments"}` object our own grammar forces for models without a native format.
A call that does not complete (malformed, or cut by the token budget) is returned as content, never an error.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import List, Optional

import regex

ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class CallDelta:
    index: int  # the call's position in this turn
    id: Optional[str] = None  # set on a call's first piece only
    name: Optional[str] = None  # set on a call's first piece only
    arguments: str = ""


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    calls: List[CallDelta] = field(default_factory=list)

    def __bool__(self):
        return bool(self.content or self.reasoning or self.calls)

    def add(self, other: "Delta"):
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls += other.calls


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def arguments_value(self):
        """The arguments as a JSON value (Ollama sends objects), or the text itself when it does not parse."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments


@dataclass
class Message:
    content: str = ""
    reasoning: str = ""
    tool_calls: List[ToolCall] = field(default_factory=list)
    reasoning_tokens: int = 0


@dataclass
class OutputSpec:
    """How one request's output is read."""
    think_start: str = ""  # "" = no reasoning block
    think_end: str = ""
    think_open: bool = False  # the generation prompt already opened the reasoning block
    reasoning: str = "separate"  # "separate" | "none" (left in content) | "drop"
    tool_format: str = ""  # a FORMATS key, "harmony", or "" (no tool calls are read)
    harmony: bool = False  # gpt-oss channels (reasoning and tool calls)


def new_call_id(fmt: str = "") -> str:
    if fmt == "mistral":  # Mistral's templates accept only 9-character alphanumeric ids in the history
        return "".join(random.choice(ALNUM) for _ in range(9))
    return "call_" + "".join(random.choice(ALNUM) for _ in range(24))


# ---------------------------------------------------------------------------------------------------------
# tool-call grammars

@dataclass(frozen=True)
class Format:
    """A family's tool-call section. `starts`: (regex, only at the start of the output, the match is consumed).
    Each call: `open` (first call) / `next` (later calls; default: `open`) anchored regexes, which may capture the
    function's `name` (then the body is the arguments' JSON value, else a JSON object holding name and arguments),
    then `close`; `end` closes the section (optional)."""
    starts: tuple
    open: str
    next: str = ""
    close: str = ""
    end: str = ""
    special: bool = False  # markers are special tokens: the text must render them


_HEX_NAME = r"[^\s\[\]{}<>\"]+"
FORMATS = {
    "json": Format(starts=((r"\{", True, False),), open=r"\s*", next=r"\s*[;,]?\s*"),
    "llama3": Format(starts=((r"<\|python_tag\|>", False, True), (r"\{", True, False)), open=r"\s*",
                     next=r"\s*;?\s*(?:<\|python_tag\|>)?\s*", special=True),
    "hermes": Format(starts=((r"<tool_call>", False, True),), open=r"\s*", next=r"\s*<tool_call>\s*",
                     close=r"\s*</tool_call>"),
    "mistral": Format(starts=((r"\[TOOL_CALLS\]", False, True),),
                      open=rf"\s*(?:\[\s*|(?P<name>{_HEX_NAME})(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\])",
                      next=rf"\s*(?:,\s*|\[TOOL_CALLS\]\s*(?P<name>{_HEX_NAME})(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\])",
                      end=r"\s*\]", special=True),
    "deepseek": Format(starts=((r"<｜tool▁calls▁begin｜>", False, True),),
                       open=r"\s*<｜tool▁call▁begin｜>(?:function<｜tool▁sep｜>(?P<name>[^\n<]+)\n```(?:json)?\n"
                            r"|(?!function<)(?P<name>[^<\n]+)<｜tool▁sep｜>)",
                       close=r"(?:\s*```)?\s*<｜tool▁call▁end｜>", end=r"\s*<｜tool▁calls▁end｜>", special=True),
    "kimi": Format(starts=((r"<\|tool_calls_section_begin\|>", False, True),),
                   open=r"\s*<\|tool_call_begin\|>\s*(?:functions\.)?(?P<name>[^:<\s]+)(?::\d+)?\s*"
                        r"<\|tool_call_argument_begin\|>",
                   close=r"\s*<\|tool_call_end\|>", end=r"\s*<\|tool_calls_section_end\|>", special=True),
    "granite": Format(starts=((r"<\|tool_call\|>", False, True),), open=r"\s*\[\s*", next=r"\s*,\s*",
                      end=r"\s*\]", special=True),
    "phi4mini": Format(starts=((r"<\|tool_call\|>", False, True),), open=r"\s*\[?\s*", next=r"\s*,\s*",
                       end=r"\s*\]?\s*<\|/tool_call\|>", special=True),
    "command-r": Format(starts=((r"Action:\s*```", False, True), (r"<\|START_ACTION\|>", False, True)),
                        open=r"\s*(?:json)?\s*\[\s*", next=r"\s*,\s*", end=r"\s*\]\s*(?:```|<\|END_ACTION\|>)", special=True),
    "glm4": Format(starts=((r"[A-Za-z_][\w.\-]*\n\{", True, False),), open=r"(?P<name>[A-Za-z_][\w.\-]*)\n",
                   next=r"(?!)"),
}
NAME_KEYS = ("name", "tool_name")
ARG_KEYS = ("arguments", "parameters")


class _Partial:
    partial = True


_PARTIAL = _Partial()


class _Fail(Exception):
    """The text cannot be this format's call."""


class _Scan:
    """Scans one JSON value from the start of a text, incrementally. In "object" mode the value is a call object:
    its name key gives the function, and its arguments value is passed on as it arrives; in "args" mode the whole
    value is the arguments. A JSON string given as arguments is held and decoded at the end."""

    def __init__(self, mode: str):
        self.mode = mode
        self.base = 1 if mode == "object" else 0  # the depth at which the values we care about sit
        self.i = 0  # next char to look at, relative to the body's start
        self.depth = 0
        self.in_str = self.esc = False
        self.started = self.done = False
        self.expect = "open" if mode == "object" else "value"
        self.key = None
        self.tok_start = -1
        self.cap = False  # inside the arguments value
        self.kind = None  # the value being read: "container" | "string" | "scalar"
        self.name: Optional[str] = None
        self.parts: List[str] = []
        self.args_string = False
        self.string_raw: List[str] = []

    def _out(self, c: str):
        (self.string_raw if self.args_string else self.parts).append(c)

    @staticmethod
    def _string(raw: str) -> str:
        try:
            v = json.loads(raw, strict=False)  # models do write raw control characters inside strings
        except ValueError:
            raise _Fail()
        if not isinstance(v, str):
            raise _Fail()
        return v

    def _end_value(self, text: str, end: int):
        if self.mode == "object" and self.key in NAME_KEYS and self.kind == "string":
            self.name = self._string(text[self.tok_start:end])
        self.cap, self.kind = False, None
        if self.mode == "args":
            self.done = True
        else:
            self.expect = "comma"

    def feed(self, text: str) -> int:
        """Scan text[self.i:]; -> index just past the value when it completed, else -1. Raises _Fail."""
        while self.i < len(text):
            i = self.i
            c = text[i]
            self.i += 1
            if self.in_str:
                if self.cap:
                    self._out(c)
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == self.base:
                        if self.expect == "key_str":
                            self.key, self.expect = self._string(text[self.tok_start:i + 1]), "colon"
                        elif self.kind == "string":
                            self._end_value(text, i + 1)
                            if self.done:
                                return self.i
                continue
            if self.kind == "scalar":
                if not (c.isspace() or c in ",}]" or (self.mode == "args" and c in ";<")):
                    if self.cap:
                        self._out(c)
                    continue
                self._end_value(text, i)
                if self.done:
                    self.i = i
                    return i
            if c.isspace():
                if self.cap:
                    self._out(c)
                continue
            if self.expect == "open":
                if c != "{":
                    raise _Fail()
                self.depth, self.expect, self.started = 1, "key", True
                continue
            if self.depth > self.base:  # inside a container value
                if self.cap:
                    self._out(c)
                if c == '"':
                    self.in_str = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    if self.depth == self.base:
                        self._end_value(text, i + 1)
                        if self.done:
                            return self.i
                continue
            if self.expect == "value":
                self.started, self.tok_start = True, i
                self.cap = self.mode == "args" or self.key in ARG_KEYS
                if c in "{[":
                    self.kind, self.depth = "container", self.depth + 1
                elif c == '"':
                    self.kind, self.in_str = "string", True
                    self.args_string = self.cap
                elif c in "-0123456789tfn":
                    self.kind = "scalar"
                else:
                    raise _Fail()
                if self.cap:
                    self._out(c)
                continue
            if self.expect == "key" and c == '"':
                self.in_str, self.tok_start, self.expect = True, i, "key_str"
            elif self.expect == "colon" and c == ":":
                self.expect = "value"
            elif self.expect == "comma" and c == ",":
                self.expect, self.key = "key", None
            elif self.expect in ("comma", "key") and c == "}":
                self.depth, self.done = 0, True
                return self.i
            else:
                raise _Fail()
        return -1

    def take_args(self) -> str:
        out = "".join(self.parts)
        self.parts = []
        return out

    def final_args(self) -> Optional[str]:
        """Arguments that came as a JSON string, decoded (None when they did not)."""
        if not self.args_string:
            return None
        try:
            v = json.loads("".join(self.string_raw), strict=False)
        except ValueError:
            raise _Fail()
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------
# the parser

class OutputParser:
    def __init__(self, spec: OutputSpec):
        self.spec = spec
        self.fmt: Optional[Format] = FORMATS.get(spec.tool_format)
        self.buf = ""
        self.pos = 0  # text before this is handled
        think = spec.think_start and spec.reasoning != "none"
        if spec.think_open and spec.think_start and spec.reasoning == "none":
            self.buf = spec.think_start  # left in the content as the model "wrote" it
        self.state = "think" if (think and spec.think_open) else ("start" if think else "content")
        if spec.harmony:  # the channels carry the reasoning
            self.state = "content"
        self.origin = 0  # where content began (start-only tool formats look here)
        self.message = Message()
        self.dropped = ""
        self.calls_index = 0
        # section state
        self.phase = ""
        self.call_start = 0
        self.scan: Optional[_Scan] = None
        self.call_name: Optional[str] = None
        self.call_args: List[str] = []
        self.call_announced = False
        self._cur_id = ""

    # public
    def feed(self, text: str) -> Delta:
        self.buf += text
        return self._run(False)

    def close(self) -> Delta:
        return self._run(True)

    # helpers
    def _content(self, d: Delta, text: str):
        if text:
            d.content += text
            self.message.content += text

    def _reasoning(self, d: Delta, text: str):
        if self.spec.reasoning == "drop":
            self.dropped += text  # counted, never sent
        elif self.spec.reasoning == "none":  # Harmony's analysis channel, asked to stay in the content
            self._content(d, text)
        else:
            d.reasoning += text
            self.message.reasoning += text

    def _run(self, final: bool) -> Delta:
        d = Delta()
        while True:
            before = (self.state, self.pos, self.phase)
            getattr(self, "_st_" + self.state)(d, final)
            if (self.state, self.pos, self.phase) == before:
                break
        return d

    def _hold(self, marker: str, text: str) -> int:
        """Length of text's tail that could be the start of marker (held back while streaming)."""
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-k:]):
                return k
        return 0

    def _st_start(self, d: Delta, final: bool):
        rest = self.buf[self.pos:]
        stripped = rest.lstrip()
        ts = self.spec.think_start
        if stripped.startswith(ts):
            self.pos += len(rest) - len(stripped) + len(ts)
            self.state = "think"
        elif not final and ts.startswith(stripped):
            return  # could still become the tag
        else:
            self.state = "content"

    def _st_think(self, d: Delta, final: bool):
        rest = self.buf[self.pos:]
        end = self.spec.think_end
        k = rest.find(end) if end else -1
        if k >= 0:
            self._reasoning(d, rest[:k])
            self.pos += k + len(end)
            self.state = "after_think"
            return
        keep = 0 if final else self._hold(end, rest)
        self._reasoning(d, rest[:len(rest) - keep])
        self.pos += len(rest) - keep

    def _st_after_think(self, d: Delta, final: bool):
        rest = self.buf[self.pos:]
        stripped = rest.lstrip()
        self.pos += len(rest) - len(stripped)
        if stripped or final:
            self.origin = self.pos
            self.state = "content"

    def _st_raw(self, d: Delta, final: bool):
        self._content(d, self.buf[self.pos:])
        self.pos = len(self.buf)

    def _st_content(self, d: Delta, final: bool):
        rest_start = self.pos
        rest = self.buf[rest_start:]
        if self.spec.harmony:
            self.state = "harmony"
            return
        if not self.fmt or not rest:
            self._content(d, rest)
            self.pos = len(self.buf)
            return
        best = None  # (start, end, consumed, partial)
        at_origin = not self.buf[self.origin:rest_start].strip()
        for pat, start_only, consumes in self.fmt.starts:
            if start_only:
                lead = len(rest) - len(rest.lstrip())
                if not at_origin:
                    continue
                m = regex.match(pat, rest, pos=lead, partial=not final)
            else:
                m = regex.search(pat, rest, partial=not final)
            if m and (best is None or m.start() < best[0]):
                best = (m.start(), m.end(), consumes, m.partial or (not final and m.end() == len(rest)))
        if best is None:
            self._content(d, rest)
            self.pos = len(self.buf)
            return
        start, end, consumes, partial = best
        self._content(d, rest[:start])
        self.pos = rest_start + start
        if partial:
            return  # wait for more text to decide
        self.call_start = self.pos
        self.pos = rest_start + (end if consumes else start)
        self.state, self.phase = "section", "open"

    def _malformed(self, d: Delta):
        """The text from the current call's start is not a call after all: it is content, and so is the rest."""
        self.pos = self.call_start
        self.state, self.phase, self.scan = "raw", "", None

    def _match(self, pat: str, final: bool):
        """An anchored match at pos; one that reaches the end of the text counts as partial while streaming (more
        text might extend it, e.g. an optional bracket)."""
        m = regex.match(pat, self.buf, pos=self.pos, partial=not final)
        if m is not None and not final and m.end() == len(self.buf):
            return _PARTIAL
        return m

    def _st_section(self, d: Delta, final: bool):
        fmt = self.fmt
        try:
            if self.phase in ("open", "next"):
                if self.phase == "next" and final and not self.buf[self.pos:].strip():
                    self.pos = len(self.buf)
                    self._end_section()
                    return
                if self.phase == "next" and fmt.end:
                    m = self._match(fmt.end, final)
                    if m and not m.partial:
                        self.pos = m.end()
                        self._end_section()
                        return
                    if m and m.partial and not final:
                        return
                pat = fmt.open if self.phase == "open" else (fmt.next or fmt.open)
                m = self._match(pat, final) if pat else None
                if m and m.partial:
                    return
                if not m:
                    if self.phase == "next":
                        self._end_section()
                        return
                    raise _Fail()
                if self.phase == "next":
                    self.call_start = self.pos
                self.pos = m.end()
                self.call_name = m.groupdict().get("name")
                if self.call_name is not None:
                    self.call_name = self.call_name.strip()
                self.scan = _Scan("args" if self.call_name is not None else "object")
                self.call_args, self.call_announced = [], False
                self.phase = "body"
            if self.phase == "body":
                body = self.buf[self.pos:]
                end = self.scan.feed(body)
                if self.scan.mode == "object" and self.scan.name is not None:
                    self.call_name = self.scan.name
                self._emit_call_piece(d)
                if end < 0:
                    if final:
                        if self.scan.mode == "args" and self.scan.started and not fmt.close \
                                and self._try_json(body):  # a bare value that ended with the text
                            self.pos = len(self.buf)
                            self._finish_call(d)
                            self.phase = "next"
                            return
                        raise _Fail()
                    return
                self.pos += end
                self.phase = "close"
            if self.phase == "close":
                if fmt.close:
                    m = self._match(fmt.close, final)
                    if m and m.partial:
                        return
                    if not m:
                        raise _Fail()
                    self.pos = m.end()
                self._finish_call(d)
                self.phase = "next"
        except _Fail:
            # what was sent of this call stays sent; the message keeps completed calls only
            self._malformed(d)

    def _try_json(self, body: str) -> bool:
        try:
            json.loads(body)
            return True
        except ValueError:
            return False

    def _end_section(self):
        self.state, self.phase, self.scan = "content", "", None
        self.origin = self.pos

    def _emit_call_piece(self, d: Delta):
        """Send what is new of the current call: its id and name once the name is known, then argument text (held
        until then when the arguments come before the name)."""
        piece = self.scan.take_args()
        if self.call_name is None:
            self.call_args.append(piece)
            return
        if not self.call_announced:
            self._cur_id = new_call_id(self.spec.tool_format)
            d.calls.append(CallDelta(self.calls_index, self._cur_id, self.call_name, ""))
            self.call_announced = True
            piece = "".join(self.call_args) + piece
            self.call_args = []
        if piece:
            d.calls.append(CallDelta(self.calls_index, arguments=piece))
            self.call_args.append(piece)

    def _finish_call(self, d: Delta):
        if self.call_name is None:
            raise _Fail()
        self._emit_call_piece(d)
        args = "".join(self.call_args)
        decoded = self.scan.final_args()
        if decoded is not None:  # arguments came as a JSON string: sent once, decoded
            d.calls.append(CallDelta(self.calls_index, arguments=decoded))
            args = decoded
        if not args.strip():
            args = "{}"
            d.calls.append(CallDelta(self.calls_index, arguments=args))
        self.message.tool_calls.append(ToolCall(self._cur_id, self.call_name, args))
        self.calls_index += 1
        self.scan, self.call_name, self.call_args, self.call_announced = None, None, [], False

    # ---- gpt-oss Harmony: <|channel|>NAME[ to=functions.X][ <|constrain|>json]<|message|>BODY<|end|> ...
    _H_HEAD = regex.compile(r"\s*(?:<\|start\|>assistant)?(?P<pre>[^<]*)<\|channel\|>(?P<chan>[^<]*?)"
                            r"(?:<\|constrain\|>[^<]*)?<\|message\|>")
    _H_ENDS = ("<|end|>", "<|call|>", "<|return|>")

    def _st_harmony(self, d: Delta, final: bool):
        if self.phase == "":
            m = self._H_HEAD.match(self.buf, pos=self.pos, partial=not final)
            if m and m.partial:
                return
            if not m:
                self.state = "raw"
                return
            self.pos = m.end()
            head = m.group("pre") + " " + m.group("chan")
            chan = m.group("chan").split()[0] if m.group("chan").split() else ""
            to = regex.search(r"to=(?:functions\.)?(\S+)", head)
            self.call_start = m.start()
            if to and chan in ("commentary", "analysis"):
                self.phase, self.call_name, self.call_args = "h_call", to.group(1), []
                self._cur_id = new_call_id()
                d.calls.append(CallDelta(self.calls_index, self._cur_id, self.call_name, ""))
            else:
                self.phase = "h_think" if chan == "analysis" else "h_text"
            return
        rest = self.buf[self.pos:]
        k, end = min(((rest.find(e), e) for e in self._H_ENDS if e in rest), default=(-1, ""))
        body = rest if k < 0 else rest[:k]
        keep = 0
        if k < 0 and not final:
            keep = max(self._hold(e, rest) for e in self._H_ENDS)
            body = rest[:len(rest) - keep]
        if self.phase == "h_think":
            self._reasoning(d, body)
        elif self.phase == "h_text":
            self._content(d, body)
        elif body:
            d.calls.append(CallDelta(self.calls_index, arguments=body))
            self.call_args.append(body)
        self.pos += len(body)
        if k >= 0 or final:
            if k >= 0:
                self.pos += len(end)
            if self.phase == "h_call":
                args = "".join(self.call_args).strip() or "{}"
                self.message.tool_calls.append(ToolCall(self._cur_id, self.call_name, args))
                self.calls_index += 1
            self.phase = ""
