"""Chat turned into engine jobs, shared by the chat dialects (OpenAI, Ollama): messages -> prompt through the
instruct adapter or the model's Jinja template, tool-call planning, and running a plan's jobs one choice after
another. Each dialect parses its own body into a template GenRequest and normalised messages; this module never
reads a request body."""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

from gguf_loader.jobs import GenRequest, Job, Result

from . import instruct, tools as toolmod
from .errors import BadRequest
from .run import JobRunner, check

MAX_N = 16


@dataclass
class Context:
    """The server's settings every chat dialect needs."""
    engine: object  # gguf_loader.engine.Engine: n_ctx, n_vocab, chat_template, tokenize, detokenize, embed
    model_name: str  # the name every response reports
    adapter_name: str = instruct.DEFAULT_NAME
    adapter: dict = field(default_factory=lambda: dict(instruct.DEFAULT_ADAPTER))
    use_jinja: bool = False
    default_max_length: int = 896
    log: Callable[[str], None] = print
    media: object = None  # adapters.media.MediaPolicy (None: no images/audio accepted)


def new_id(prefix: str) -> str:
    return prefix + "".join(random.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
                            for _ in range(24))


def request_adapter(ctx: Context, override, param: str = "adapter") -> dict:
    """The server's adapter with a request's own `adapter` object laid over it, for that request only."""
    if override is None:
        return ctx.adapter
    try:
        return instruct.merge_adapter(ctx.adapter, override)
    except instruct.AdapterError as e:
        raise BadRequest(str(e), param=param)


@dataclass
class Plan:
    """A parsed request: the jobs to run (one per choice) and what the reply needs to know."""
    kind: str  # "chat" | "completion"
    requests: List[GenRequest]
    model: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    echo: List[str] = field(default_factory=list)  # per choice, completions echo
    tool_names: List[str] = field(default_factory=list)
    tool_mode: str = ""  # "" | "forced" | "auto"
    decide: Optional[Callable] = None  # auto tools: text of the decision -> (mode, requests)


def for_choices(template: GenRequest, prompt: instruct.ChatPrompt, seeds: List[Optional[int]],
                grammar: Optional[str] = None, temperature: Optional[float] = None) -> List[GenRequest]:
    """One request per choice from a dialect's template: the prompt, its role stops, a seed each."""
    out = []
    for s in seeds:
        sp = dataclasses.replace(template.sampling)
        if s is not None:
            sp.seed = s
        if grammar is not None:
            sp.grammar = grammar
        if temperature is not None:
            sp.temperature = temperature
        out.append(dataclasses.replace(template, prompt=prompt.prompt, memory=prompt.memory, sampling=sp,
                                       stop=list(dict.fromkeys(prompt.stop + template.stop))))
    return out


def plan_chat(plan: Plan, ctx: Context, messages: List[dict], adapter: dict, template: GenRequest,
              seeds: List[Optional[int]], tools: list, choice: str, jinja: bool, continue_assistant: bool = False,
              tool_temperature: float = 0.5) -> Plan:
    """Fill plan.requests for a chat: a plain answer, forced tool calls, or (tool_choice auto) a short decision
    job first. `template` carries the dialect's sampling, limits and extra stops."""
    chat_template = ctx.engine.chat_template if jinja else None

    def prompt_for(gen_instruction="", with_tools=False) -> instruct.ChatPrompt:
        if chat_template and not with_tools:
            try:
                text = instruct.render_jinja(chat_template, messages)
                return instruct.ChatPrompt(prompt=text, stop=instruct.chat_stops(adapter))
            except instruct.JinjaError as e:
                ctx.log(f"Jinja chat template failed ({e}); using the {ctx.adapter_name} adapter")
        return instruct.build_chat_prompt(messages, adapter, tools_text=toolmod.tools_text(tools) if with_tools else "",
                                          gen_instruction=gen_instruction, continue_assistant=continue_assistant)

    if choice == "none" or not tools:
        plan.requests = for_choices(template, prompt_for(), seeds)
        return plan
    names = [t["function"]["name"] for t in tools]
    plan.tool_names = names
    call_temp = min(tool_temperature, 1.0)

    def call_requests(chosen):
        g = toolmod.call_grammar(tools, chosen)
        return for_choices(template, prompt_for(toolmod.call_instruction(chosen), with_tools=True), seeds, g,
                           call_temp)

    if choice == "required":
        plan.tool_mode, plan.requests = "forced", call_requests(names)
    elif choice != "auto":
        plan.tool_mode, plan.requests = "forced", call_requests([choice])
    else:
        # the decision runs first (greedy, short); then either forced calls or a plain answer
        plan.tool_mode = "auto"
        dec_template = dataclasses.replace(template, max_length=32, logprobs=False)
        (dec,) = for_choices(dec_template, prompt_for(toolmod.decision_instruction(names), with_tools=True), [1],
                             toolmod.decision_grammar(names), 0.0)
        dec.sampling.top_k = 1
        plain = prompt_for(with_tools=True)

        def decide(text):
            picked = toolmod.parse_decision(text, names)
            if picked:
                return "forced", call_requests([picked])
            return "", for_choices(template, plain, seeds)

        plan.requests = [dec]
        plan.decide = decide
    return plan


# ---------------------------------------------------------------- running a plan

@dataclass
class ChoiceEvent:
    index: int  # the choice
    kind: str  # "start" | "text" | "done"
    mode: str = ""  # "forced": this choice's text is a tool call
    text: str = ""
    logprobs: Optional[list] = None
    result: Optional[Result] = None


def start(plan: Plan, runner: JobRunner) -> Iterator[ChoiceEvent]:
    """Submit the first job now (a full queue is a 503 before any reply is started) and return the event iterator
    over every choice; a failed job raises ApiError before its choice's "done"."""
    return _events(plan, runner, runner.submit(plan.requests[0]))


def _events(plan: Plan, runner: JobRunner, job: Job) -> Iterator[ChoiceEvent]:
    requests, mode = plan.requests, plan.tool_mode
    try:
        if plan.decide:
            r = check(runner.wait(job))
            mode, requests = plan.decide(r.text)
            job = None
        for i, req in enumerate(requests):
            if job is None:
                job = runner.submit(req, wait_s=600)
            yield ChoiceEvent(i, "start", mode)
            for ev in runner.follow(job):
                if ev.kind == "done":
                    yield ChoiceEvent(i, "done", mode, result=check(ev.result))
                else:
                    yield ChoiceEvent(i, "text", mode, ev.text, ev.logprobs)
            job = None
    finally:
        if job is not None and not job.finished.is_set():
            job.abort()


def run(plan: Plan, runner: JobRunner) -> tuple:
    """Run every choice to the end. -> (tool mode, results)"""
    mode, results = plan.tool_mode, []
    for ev in start(plan, runner):
        if ev.kind == "done":
            mode = ev.mode
            results.append(ev.result)
    return mode, results
