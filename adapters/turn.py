"""One assistant turn of a chat plan as dialect-neutral pieces and an outcome, for the dialects that shape
content blocks or output items (Anthropic Messages, OpenAI Responses): text, reasoning and tool calls, each
streamed as it comes and summed up at the end. The only place those dialects read chat.start's events."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Union

from gguf_loader.jobs import Result

from . import chat
from .chat import Plan
from .run import JobRunner


@dataclass
class Piece:
    """A streamed bit of the turn: "text" or "reasoning" (text in `text`), or a tool call's "call" (its first
    piece: id and name) and "args" (more of its JSON arguments); `call` is the call's number in this turn."""
    kind: str
    text: str = ""
    call: int = 0
    id: str = ""
    name: str = ""


@dataclass
class Call:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class Outcome:
    result: Result
    content: str = ""
    reasoning: str = ""
    calls: List[Call] = field(default_factory=list)
    reasoning_tokens: int = 0


def start(plan: Plan, runner: JobRunner) -> Iterator[Union[Piece, Outcome]]:
    """Submit now (a full queue is a 503 before any reply starts); the iterator yields Pieces, then the Outcome.
    Only the first choice is used (these dialects have no `n`)."""
    return _pieces(chat.start(plan, runner))


def run(plan: Plan, runner: JobRunner) -> Outcome:
    out = None
    for x in start(plan, runner):
        if isinstance(x, Outcome):
            out = x
    return out


def _pieces(events) -> Iterator[Union[Piece, Outcome]]:
    for ev in events:
        if ev.index != 0:
            continue
        if ev.kind == "text" and ev.delta:
            d = ev.delta
            if d.reasoning:
                yield Piece("reasoning", d.reasoning)
            if d.content:
                yield Piece("text", d.content)
            for c in d.calls:
                if c.id is not None or c.name is not None:
                    yield Piece("call", call=c.index, id=c.id or "", name=c.name or "")
                if c.arguments:
                    yield Piece("args", c.arguments, call=c.index)
        elif ev.kind == "done":
            m = ev.message
            yield Outcome(ev.result, m.content, m.reasoning, [Call(c.id, c.name, c.arguments) for c in m.tool_calls],
                          m.reasoning_tokens)


def finish(outcome: Outcome, user_stops: List[str]) -> tuple:
    """(why it ended: "tool_calls" | "length" | "stop_sequence" | "stop", the user's stop string or None)."""
    r = outcome.result
    if outcome.calls:
        return "tool_calls", None
    if r.finish_reason == "length":
        return "length", None
    if r.stop_string and r.stop_string in user_stops:
        return "stop_sequence", r.stop_string
    return "stop", None
