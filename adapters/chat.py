"""Chat turned into engine jobs, shared by the chat dialects (OpenAI, Ollama): messages -> prompt through the
instruct adapter or the model's Jinja template, tool-call planning, and running a plan's jobs (every choice queued
at once, reported in index order). Each dialect parses its own body into a template GenRequest and normalised
messages; this module never reads a request body."""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

from gguf_loader.jobs import GenRequest, Job, Result

from . import instruct, parsing, tools as toolmod
from .errors import BadRequest
from .parsing import Delta, Message, OutputParser, OutputSpec
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
    reasoning_format: str = "separate"  # --reasoningformat: how chat replies carry a model's thinking
    warned: set = field(default_factory=set)

    def warn_once(self, key: str, msg: str):
        if key not in self.warned:
            self.warned.add(key)
            self.log(msg)


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
    decide: Optional[Callable] = None  # auto tools without a native format: decision text -> (mode, requests, spec)
    output: Optional[OutputSpec] = None  # how each choice's text is read (None: plain text, completions)
    count_tokens: Callable[[str], int] = lambda s: 0
    n: int = 1  # choices returned per prompt
    best_of: int = 0  # > n: candidates generated per prompt, the n with the highest mean token logprob returned


def for_choices(template: GenRequest, prompt: instruct.ChatPrompt, seeds: List[Optional[int]],
                grammar: Optional[str] = None, temperature: Optional[float] = None, triggers: Optional[list] = None,
                render_special: bool = False, drop_stops: tuple = ()) -> List[GenRequest]:
    """One request per choice from a dialect's template: the prompt, its role stops, a seed each."""
    out = []
    stops = [x for x in dict.fromkeys(prompt.stop + template.stop) if x not in drop_stops]
    for s in seeds:
        sp = dataclasses.replace(template.sampling)
        if s is not None:
            sp.seed = s
        if grammar is not None:
            sp.grammar = grammar
            sp.grammar_triggers = list(triggers or [])
        if temperature is not None:
            sp.temperature = temperature
        out.append(dataclasses.replace(template, prompt=prompt.prompt, memory=prompt.memory, sampling=sp,
                                       stop=list(stops), render_special=template.render_special or render_special))
    return out


THINK_TAGS = ("<think>", "</think>")
REASONING_FORMATS = {"separate": "separate", "auto": "separate", "deepseek": "separate", "none": "none",
                     "raw": "none", "drop": "drop", "hidden": "drop"}
# Harmony's own message structure must not end generation: the final answer follows the analysis
_HARMONY_STRUCTURE = ("<|end|>", "<|start|>", "<|start|>assistant", "<|channel|>", "<|message|>")


def jinja_messages(messages: List[dict]) -> List[dict]:
    """Normalised messages as chat templates expect them: tool-call arguments as objects (templates apply
    `tojson` to them), and the reasoning of earlier turns left out."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                if not isinstance(c, dict):
                    continue
                fn = dict(c.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args)
                    except ValueError:
                        pass
                calls.append({**c, "function": fn, "name": fn.get("name"), "arguments": fn.get("arguments")})
            m["tool_calls"] = calls
        out.append(m)
    return out


def _takes_tools(template: str) -> bool:
    return "tools" in template


def _think_tags(adapter: dict) -> tuple:
    """The reasoning block's tags: the adapter's (presets state them), else <think></think>."""
    if adapter.get("think_start") or adapter.get("think_end"):
        return adapter.get("think_start", ""), adapter.get("think_end", "")
    return THINK_TAGS


def plan_chat(plan: Plan, ctx: Context, messages: List[dict], adapter: dict, template: GenRequest,
              seeds: List[Optional[int]], tools: list, choice: str, jinja: bool, continue_assistant: bool = False,
              tool_temperature: float = 0.5, parallel_tool_calls: bool = True, reasoning_effort: Optional[str] = None,
              template_kwargs: Optional[dict] = None, reasoning_format: Optional[str] = None,
              enable_thinking: Optional[bool] = None) -> Plan:
    """Fill plan.requests and plan.output for a chat: a plain answer, or tool calls in the model's own format
    (free choice constrained by a lazy grammar once a call starts, or forced), or, for a model without a native
    format, grammar-forced JSON calls (with a short decision job first for tool_choice "auto").
    `template` carries the dialect's sampling, limits and extra stops."""
    chat_template = ctx.engine.chat_template if jinja else None
    kwargs = dict(template_kwargs or {})
    if reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", reasoning_effort)
        if reasoning_effort == "none":
            enable_thinking = False if enable_thinking is None else enable_thinking
    if enable_thinking is not None:
        kwargs.setdefault("enable_thinking", enable_thinking)
    elif isinstance(kwargs.get("enable_thinking"), bool):
        enable_thinking = kwargs["enable_thinking"]
    offered = bool(tools) and choice != "none"
    use_template = chat_template
    if use_template and offered and not _takes_tools(use_template):
        ctx.warn_once("jinja-tools", "The model's chat template does not take tools: tool requests use the "
                      f"{ctx.adapter_name} adapter's tags instead")
        use_template = None
    fmt = toolmod.detect_format(use_template) if use_template else str(adapter.get("tool_format") or "")
    if fmt not in toolmod.NATIVE_FORMATS or fmt == "json":
        fmt = ""
    think_start, think_end = _think_tags(adapter)
    harmony = fmt == "harmony" or bool(use_template and "<|channel|>" in use_template) or \
        adapter.get("tool_format") == "harmony"
    spec = OutputSpec(think_start=think_start, think_end=think_end,
                      reasoning=REASONING_FORMATS.get(reasoning_format or ctx.reasoning_format, "separate"),
                      harmony=harmony)
    special = harmony or (fmt in parsing.FORMATS and parsing.FORMATS[fmt].special)
    drop_stops = _HARMONY_STRUCTURE if harmony else ()

    def prompt_for(gen_instruction="", with_tools=False, native=False) -> instruct.ChatPrompt:
        if use_template:
            try:
                text = instruct.render_jinja(use_template, jinja_messages(messages),
                                             tools=tools if with_tools else None, extra=kwargs)
                return _thinking(instruct.ChatPrompt(prompt=text, stop=instruct.chat_stops(adapter)), False)
            except instruct.JinjaError as e:
                ctx.log(f"Jinja chat template failed ({e}); using the {ctx.adapter_name} adapter")
        msgs = messages
        if native:  # earlier calls written the way the model writes them
            msgs = [dict(m, content=(m.get("content") or "") + toolmod.render_calls(fmt, m["tool_calls"]))
                    if m.get("role") == "assistant" and m.get("tool_calls") else m for m in messages]
        text = ""
        if with_tools:
            text = toolmod.native_tools_text(tools, fmt) if native else toolmod.tools_text(tools)
        p = instruct.build_chat_prompt(msgs, adapter, tools_text=text, gen_instruction=gen_instruction,
                                       continue_assistant=continue_assistant)
        return _thinking(p, True)

    def _thinking(p: instruct.ChatPrompt, own: bool) -> instruct.ChatPrompt:
        """Whether the prompt opened a reasoning block; thinking turned off closes it empty (as Qwen 3's template
        does) when the prompt is ours to write."""
        tail = p.prompt.rstrip()
        opened = bool(think_start) and tail.endswith(think_start)
        if enable_thinking is False and own and think_start and think_end and not continue_assistant:
            p.prompt += ("\n\n" if opened else think_start + "\n\n") + think_end + "\n\n"
            opened = False
        spec.think_open = opened
        return p

    plan.output = spec
    plan.count_tokens = lambda s: len(ctx.engine.tokenize(s, add_bos=False)) if s else 0
    if not offered:
        plan.requests = for_choices(template, prompt_for(), seeds, render_special=special, drop_stops=drop_stops)
        return plan
    names = [t["function"]["name"] for t in tools]
    plan.tool_names = names
    if fmt:
        return _plan_native(plan, template, seeds, tools, names, choice, fmt, spec, prompt_for(with_tools=True,
                            native=not use_template), parallel_tool_calls, special, drop_stops)

    call_temp = min(tool_temperature, 1.0)
    json_spec = dataclasses.replace(spec, tool_format="json")

    def call_requests(chosen):
        g = toolmod.call_grammar(tools, chosen)
        return for_choices(template, prompt_for(toolmod.call_instruction(chosen), with_tools=True), seeds, g,
                           call_temp)

    if choice == "required":
        plan.tool_mode, plan.requests, plan.output = "forced", call_requests(names), json_spec
    elif choice != "auto":
        plan.tool_mode, plan.requests, plan.output = "forced", call_requests([choice]), json_spec
    else:
        # the decision runs first (greedy, short); then either forced calls or a plain answer
        plan.tool_mode = "auto"
        dec_template = dataclasses.replace(template, max_length=32, logprobs=False)
        (dec,) = for_choices(dec_template, prompt_for(toolmod.decision_instruction(names), with_tools=True), [1],
                             toolmod.decision_grammar(names), 0.0)
        dec.sampling.top_k = 1
        plain = prompt_for(with_tools=True)
        plain_spec = dataclasses.replace(spec)

        def decide(text):
            picked = toolmod.parse_decision(text, names)
            if picked:
                return "forced", call_requests([picked]), json_spec
            return "", for_choices(template, plain, seeds), plain_spec

        plan.requests = [dec]
        plan.decide = decide
    return plan


def _plan_native(plan: Plan, template: GenRequest, seeds, tools, names, choice, fmt, spec: OutputSpec,
                 prompt: instruct.ChatPrompt, parallel: bool, special: bool, drop_stops) -> Plan:
    """Tool calls in the model's own format. "auto": the model writes freely, and a lazy grammar takes over once
    it starts a call (its trigger); "required"/a name: the grammar forces the call (after the reasoning block when
    the prompt opened one). A grammar the request brought itself wins over the tool grammar."""
    spec.tool_format = fmt
    plan.output = spec
    chosen = names if choice in ("auto", "required") else [choice]
    grammar = triggers = None
    think = None
    if not template.sampling.grammar:
        after = spec.think_end if (spec.think_open and choice != "auto") else ""
        grammar = toolmod.format_grammar(tools, chosen, fmt, parallel=parallel, after=after)
        if choice == "auto" or after:
            triggers = toolmod.format_triggers(fmt, chosen, after)
        if choice == "auto" and spec.think_start and spec.think_end and not spec.harmony:
            think = (spec.think_start, spec.think_end, spec.think_open)
    plan.tool_mode = "auto" if choice == "auto" else "forced"
    plan.requests = for_choices(template, prompt, seeds, grammar, None, triggers, special, drop_stops)
    for r in plan.requests:
        r.sampling.grammar_trigger_think = think
    return plan


# ---------------------------------------------------------------- running a plan

@dataclass
class ChoiceEvent:
    index: int  # the choice
    kind: str  # "start" | "text" | "done"
    mode: str = ""  # "forced": this choice was made to call a tool
    text: str = ""  # the raw generated text of this piece
    logprobs: Optional[list] = None
    result: Optional[Result] = None
    delta: Optional[Delta] = None  # "text": the piece read as content / reasoning / tool-call pieces
    message: Optional[Message] = None  # "done": the whole turn


def start(plan: Plan, runner: JobRunner, live: bool = True) -> Iterator[ChoiceEvent]:
    """Submit the jobs now (a full queue is a 503 before any reply is started) and return the event iterator over
    every choice; a failed job raises ApiError before its choice's "done". `live=False`: each choice's events
    come when it has ended (a reply sent whole)."""
    if plan.decide:
        return _events(plan, runner, [runner.submit(plan.requests[0])], live)
    return _events(plan, runner, runner.submit_all(plan.requests), live)


def _events(plan: Plan, runner: JobRunner, jobs: List[Job], live: bool) -> Iterator[ChoiceEvent]:
    mode, spec = plan.tool_mode, plan.output
    try:
        if plan.decide:
            r = check(runner.wait(jobs[0]))
            mode, requests, spec = plan.decide(r.text)
            jobs = runner.submit_all(requests)
        # choices in index order; the later ones run meanwhile and their events wait in their jobs' queues
        for i, job in enumerate(jobs):
            parser = OutputParser(spec) if spec is not None else None
            yield ChoiceEvent(i, "start", mode)
            for ev in runner.follow(job, live):
                if ev.kind != "done":
                    delta = parser.feed(ev.text) if parser else Delta(content=ev.text)
                    yield ChoiceEvent(i, "text", mode, ev.text, ev.logprobs, delta=delta)
                    continue
                result = check(ev.result)
                if parser:
                    tail = parser.close()
                    if tail:
                        yield ChoiceEvent(i, "text", mode, "", None, delta=tail)
                    message = parser.message
                    message.reasoning_tokens = plan.count_tokens(message.reasoning + parser.dropped)
                else:
                    message = Message(content=result.text)
                yield ChoiceEvent(i, "done", mode, result=result, message=message)
    finally:
        for job in jobs:
            if not job.finished.is_set():
                job.abort()


def run(plan: Plan, runner: JobRunner) -> List[ChoiceEvent]:
    """Run every choice to the end. -> the "done" event of each choice (its result and message); with best_of, the
    best n of each prompt's candidates."""
    done = [ev for ev in start(plan, runner, live=False) if ev.kind == "done"]
    if plan.best_of > plan.n:
        done = pick_best(done, plan.best_of, plan.n)
    return done


def pick_best(done: List[ChoiceEvent], best_of: int, n: int) -> List[ChoiceEvent]:
    """OpenAI's best_of: of each prompt's `best_of` candidates (consecutive), the `n` with the highest mean token
    log-probability, best first, renumbered."""
    out = []
    for g in range(0, len(done), best_of):
        group = sorted(done[g:g + best_of], key=lambda ev: -ev.result.mean_logprob)
        out += group[:n]
    return [dataclasses.replace(ev, index=i) for i, ev in enumerate(out)]

