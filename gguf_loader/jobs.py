"""What the engine takes in and gives back. Plain data: no llama.cpp, no HTTP, no JSON dialects."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Union

# Where a media item goes in a prompt or memory text: the n-th marker is the n-th item of GenRequest.media.
MEDIA_MARKER = "<__media__>"

# KoboldCpp's sampler ids: 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen
DEFAULT_SAMPLER_ORDER = [6, 0, 1, 3, 4, 2, 5]


@dataclass
class SamplingParams:
    temperature: float = 0.75
    top_k: int = 100
    top_p: float = 0.92
    top_a: float = 0.0
    min_p: float = 0.0
    typical: float = 1.0
    tfs: float = 1.0
    nsigma: float = 0.0
    rep_pen: float = 1.0
    rep_pen_range: int = 320
    rep_pen_slope: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    sampler_order: List[int] = field(default_factory=lambda: list(DEFAULT_SAMPLER_ORDER))
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 320
    dry_sequence_breakers: List[str] = field(default_factory=list)
    xtc_threshold: float = 0.2
    xtc_probability: float = 0.0
    seed: int = -1  # < 0: random
    grammar: str = ""  # GBNF
    # lazy grammar: free text until one of these Python regexes is found in the output (group 1 starts the text
    # the grammar then constrains); the server's own tool-call triggers only, never a client's
    grammar_triggers: List[str] = field(default_factory=list)
    grammar_trigger_think: Optional[tuple] = None  # (start, end, opened): triggers inside reasoning do not count
    logit_bias: dict = field(default_factory=dict)  # {token_id(int): bias(float)}
    ban_eos: bool = False


@dataclass
class Media:
    """An image (RGB pixels, width*height*3 bytes) or audio clip (its WAV/MP3/FLAC file bytes) for a prompt."""
    kind: str  # "image" | "audio"
    data: bytes
    width: int = 0
    height: int = 0
    key: str = ""  # a hash of the bytes the client sent: identical media share cached KV (FastForward)


@dataclass
class GenRequest:
    """One text generation. `prompt` is text (tokenized with BOS by the engine) or token ids."""
    prompt: Union[str, List[int]] = ""
    memory: str = ""  # kept at the front while the prompt is trimmed from the front
    max_length: int = 896
    max_context_length: int = 8192  # clamped by the engine to its context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: List[str] = field(default_factory=list)
    banned_phrases: List[str] = field(default_factory=list)  # never produced (case-insensitive), by backtracking
    trim_stop: bool = True
    bypass_eos: bool = False  # EOS may be sampled but does not end generation
    render_special: bool = False
    logprobs: bool = False  # report each generated token's logprob
    top_logprobs: int = 5  # alternatives per token when logprobs is on (0-20)
    genkey: str = ""
    add_bos: bool = True
    score: bool = False  # sum each generated token's log-probability into Result.logprob_sum (best_of)
    beams: int = 0  # > 0: beam search of this width (deterministic; sampling settings unused), on forked slots
    length_penalty: float = 1.0  # beam score = summed logprob / length ** length_penalty
    early_stopping: bool = False  # stop once `beams` hypotheses have finished
    tokenize_special: bool = True  # parse special-token text (e.g. "<start_of_turn>") in the prompt
    media: List[Media] = field(default_factory=list)  # one per MEDIA_MARKER in memory + prompt, in order
    lora: Optional[Dict[int, float]] = None  # LoRA adapter index -> scale for this request (others: their default)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: List[int]
    top: List[tuple]  # [(token_text, logprob, bytes), ...]


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length" (token budget), "abort"
    stop_reason: int  # why it ended: 0 token budget, 1 end-of-generation token, 2 stop string, -1 aborted/failed
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the KV cache (media tokens included)
    media_tokens: int = 0  # prompt tokens that are image/audio embeddings
    cached_media_tokens: int = 0  # of those, served from the KV cache
    encode_time: float = 0.0  # seconds the projector spent encoding this request's media
    stop_string: Optional[str] = None
    logprobs: Optional[List[TokenLogprob]] = None
    seed: int = 0
    process_time: float = 0.0  # seconds spent on the prompt
    eval_time: float = 0.0  # seconds spent generating
    error: Optional[str] = None
    logprob_sum: Optional[float] = None  # GenRequest.score: the generated tokens' summed log-probability

    @property
    def mean_logprob(self) -> float:
        return (self.logprob_sum or 0.0) / max(1, self.completion_tokens)


@dataclass
class Event:
    kind: str  # "text" | "done" | "idle" (Job.stream only: nothing arrived within its poll interval)
    text: str = ""
    logprobs: Optional[List[TokenLogprob]] = None
    result: Optional[Result] = None


class QueueFull(Exception):
    """The engine's wait queue is at its cap (HTTP routes answer 503)."""


class InvalidRequest(ValueError):
    """The request can never run (a grammar that does not parse, token ids outside the vocabulary): a client error."""


class BudgetError(InvalidRequest):
    """A generation length that cannot fit the context; `asked` and `context` let each dialect name its field."""

    def __init__(self, asked: int, context: int):
        self.asked, self.context = asked, context
        super().__init__(self.describe("max_length"))

    def describe(self, field: str) -> str:
        if self.asked < 1:
            return f"'{field}' must be at least 1, got {self.asked}"
        return (f"'{field}' is {self.asked}, but the context holds {self.context} tokens and the prompt needs at "
                f"least one: ask for at most {self.context - 1}")


def token_budget(n_ctx: int, max_context_length: Optional[int], max_length: int) -> tuple:
    """The one rule for every dialect: -> (context, tokens to generate).

    The context is the server's, or the request's max_context_length when smaller. A request gets exactly the
    tokens it asks for, or BudgetError (a 400) when they leave no room for a prompt. The prompt is then trimmed
    from the front to context - max_length tokens, keeping BOS and memory (KoboldCpp's behaviour), so prompt plus
    generation always fit and generation ends at max_length, never earlier for lack of room."""
    ctx = n_ctx if not max_context_length else max(1, min(int(max_context_length), n_ctx))
    if max_length < 1 or max_length >= ctx:
        raise BudgetError(int(max_length), ctx)
    return ctx, int(max_length)


class Job:
    """Handle shared by the submitting thread and the engine thread."""

    _ids = 0
    _ids_lock = threading.Lock()

    def __init__(self, request: GenRequest):
        with Job._ids_lock:
            Job._ids += 1
            self.id = Job._ids
        self.request = request
        self.genkey = request.genkey or ""
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.submitted = time.monotonic()
        self.started = threading.Event()
        self.finished = threading.Event()
        self.aborted = threading.Event()
        self.result: Optional[Result] = None
        self.media_pieces: list = []  # the engine's prepared media (gguf_loader.mtmd pieces), one list per item
        self._text_parts: List[str] = []

    # engine side
    def emit_text(self, text: str, logprobs=None):
        if text or logprobs:
            self._text_parts.append(text)
            self.events.put(Event("text", text=text, logprobs=logprobs))

    def finish(self, result: Result):
        self.result = result
        self.finished.set()
        self.events.put(Event("done", result=result))

    # client side
    def abort(self):
        self.aborted.set()

    @property
    def text_so_far(self) -> str:
        return "".join(self._text_parts)

    def stream(self, poll: float = 0.5) -> Iterator[Event]:
        """Yield events until the final one. `poll` bounds each wait so callers can notice disconnects."""
        while True:
            try:
                ev = self.events.get(timeout=poll)
            except queue.Empty:
                yield Event("idle")
                continue
            yield ev
            if ev.kind == "done":
                return

    def wait(self, timeout: Optional[float] = None) -> Optional[Result]:
        self.finished.wait(timeout)
        return self.result
