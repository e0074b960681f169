"""One assistant turn of a chat plan as dialect-neutral pieces and an outcome, for the dialects that shape
content blocks or output items (Anthropic Messages, OpenAI Responses): text, reasoning and tool calls, each
streamed as it comes and summed up at the end. The only place those dialects read chat.start's events."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Union

from gguf_loader.jobs import GenRequest, InvalidRequest, Result

from . import chat
from .chat import Plan
from .errors import BadRequest
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


def prompt_tokens(engine, req) -> int:
    return len(req.prompt) if isinstance(req.prompt, list) else len(engine.tokenize(req.memory + req.prompt))


def plan_capped(n_ctx: int, engine, requested: int, plan_with: Callable[[int], Plan]) -> Plan:
    """Anthropic's max_tokens and Responses' max_output_tokens are upper bounds, and agents send large ones
    (Claude Code asks for 32000 whatever the context): a request that cannot fit gets what the context leaves
    after its prompt (a quarter of the context when the prompt leaves less; the prompt is then trimmed from the
    front). A request that fits gets exactly what it asked for, as in every other dialect."""
    if requested < n_ctx:
        return plan_with(requested)
    plan = plan_with(max(1, n_ctx // 4))  # any size that fits, to measure the prompt
    room = n_ctx - max(prompt_tokens(engine, r) for r in plan.requests)
    return plan_with(room if room >= 64 else max(1, n_ctx // 4))


def count_prompt(engine, req: GenRequest) -> int:
    """The request's prompt tokens (the token-counting routes); a request the engine can never run is a 400."""
    try:
        return engine.count_prompt(req)
    except InvalidRequest as e:
        raise BadRequest(str(e))


def start(plan: Plan, runner: JobRunner, live: bool = True) -> Iterator[Union[Piece, Outcome]]:
    """Submit now (a full queue is a 503 before any reply starts); the iterator yields Pieces, then the Outcome.
    Only the first choice is used (these dialects have no `n`)."""
    return _pieces(chat.start(plan, runner, live))


def run(plan: Plan, runner: JobRunner) -> Outcome:
    out = None
    for x in start(plan, runner, live=False):
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
