"""Typed reading of request bodies, shared by every dialect: one reader per field kind, one table of sampler fields.

Two policies, chosen per field by the dialect that owns it:
- strict (OpenAI and Ollama fields): a wrong type or an out-of-range value is a 400 naming the field;
- lenient (KoboldCpp's native fields, on any route): numeric strings are accepted and out-of-range values are
  clamped, as KoboldCpp does, so SillyTavern and Kobold Lite settings keep working.
Either way a value that cannot be a number, a non-finite number or an integer beyond 64 bits is a 400.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import List, Optional

from gguf_loader.jobs import DEFAULT_SAMPLER_ORDER, SamplingParams

from .errors import BadRequest

MISSING = object()
INT_LIMIT = 2 ** 63  # anything larger is a client error, never a 500 from float() or a C integer overflow
C_INT_MAX = 2 ** 31 - 1  # counts handed to llama.cpp as int32
FLOAT_MAX = 1e6  # floats handed to llama.cpp as float32: bounded so none becomes inf there

MAX_STOP_SEQUENCES = 256
MAX_LOGIT_BIAS = 512
MAX_BANNED = 768
MAX_DRY_BREAKERS = 128
MAX_LOGPROBS = 20
MAX_GENKEY = 128


def clean_text(s: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800") that cannot be encoded as UTF-8: make them U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def require_object(body) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f"at least {lo}" if lo is not None else f"at most {hi}"


def number(name: str, v, integer: bool = False, lenient: bool = False):
    """A JSON value as a finite float (or int). Raises BadRequest naming `name`."""
    want = "a whole number" if integer else "a number"
    if isinstance(v, bool):
        if not lenient:
            raise BadRequest(f"'{name}' must be {want}, got {v!r}", param=name)
        v = int(v)
    if isinstance(v, str) and lenient:
        s = v.strip()
        try:
            v = int(s) if s.lstrip("+-").isdigit() and len(s) < 30 else float(s)
        except ValueError:
            raise BadRequest(f"'{name}' must be {want}, got {v!r}", param=name)
    if isinstance(v, int):
        if abs(v) >= INT_LIMIT:
            raise BadRequest(f"'{name}' is out of range ({str(v)[:20]}...)", param=name)
        return v
    if not isinstance(v, float):
        raise BadRequest(f"'{name}' must be {want}, got {type(v).__name__}", param=name)
    if not math.isfinite(v):
        raise BadRequest(f"'{name}' must be a finite number, got {v!r}", param=name)
    if integer:
        if v != int(v):
            raise BadRequest(f"'{name}' must be a whole number, got {v!r}", param=name)
        if abs(v) >= INT_LIMIT:
            raise BadRequest(f"'{name}' is out of range ({v!r})", param=name)
        return int(v)
    return v


def bounded(name: str, v, lo=None, hi=None, integer=False, lenient=False):
    x = number(name, v, integer, lenient)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        if not lenient:
            raise BadRequest(f"'{name}' must be {_range_text(lo, hi)}, got {x}", param=name)
        x = max(lo, x) if lo is not None else x
        x = min(hi, x) if hi is not None else x
    return int(x) if integer else float(x)


def boolean(name: str, v, lenient=False) -> bool:
    if isinstance(v, bool):
        return v
    if lenient:
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return v.strip().lower() in ("true", "1", "yes", "on")
    raise BadRequest(f"'{name}' must be true or false, got {v!r}", param=name)


def token_id(name: str, v, n_vocab: int) -> int:
    try:
        i = number(name, v, integer=True, lenient=isinstance(v, str))
    except BadRequest:
        raise BadRequest(f"'{name}': token ids must be whole numbers, got {v!r}", param=name)
    if i < 0 or (n_vocab and i >= n_vocab):
        limit = f" (the vocabulary has {n_vocab} tokens)" if n_vocab else ""
        raise BadRequest(f"'{name}': token id {i} is out of range{limit}", param=name)
    return i


def token_ids(name: str, v, n_vocab: int) -> List[int]:
    if not isinstance(v, list):
        raise BadRequest(f"'{name}' must be a list of token ids", param=name)
    return [token_id(name, x, n_vocab) for x in v]


class Body:
    """One request body with typed getters. Aliases: the first present, non-null name wins."""

    def __init__(self, body, lenient: bool = False):
        self.data = require_object(body)
        self.lenient = lenient

    def raw(self, *names):
        for n in names:
            v = self.data.get(n)
            if v is not None:
                return v
        return MISSING

    def has(self, *names) -> bool:
        return self.raw(*names) is not MISSING

    def num(self, name, default=None, lo=None, hi=None, integer=False, aliases=(), lenient=None):
        v = self.raw(name, *aliases)
        if v is MISSING:
            return default
        return bounded(name, v, lo, hi, integer, self.lenient if lenient is None else lenient)

    def int(self, name, default=None, lo=None, hi=None, **kw):
        return self.num(name, default, lo, hi, integer=True, **kw)

    def bool(self, name, default=False, aliases=(), lenient=None):
        v = self.raw(name, *aliases)
        return default if v is MISSING else boolean(name, v, self.lenient if lenient is None else lenient)

    def str(self, name, default=""):
        v = self.raw(name)
        if v is MISSING:
            return default
        if not isinstance(v, str):
            raise BadRequest(f"'{name}' must be a string, got {type(v).__name__}", param=name)
        return clean_text(v)

    def strs(self, name, limit: int, aliases=()) -> List[str]:
        """A string or a list of strings; empty strings dropped; at most `limit` kept."""
        v = self.raw(name, *aliases)
        if v is MISSING:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise BadRequest(f"'{name}' must be a list of strings, got {type(v).__name__}", param=name)
        out = []
        for s in v:
            if not isinstance(s, str):
                raise BadRequest(f"'{name}' must be a list of strings; found {type(s).__name__} {s!r}", param=name)
            if s:
                out.append(clean_text(s))
        return out[:limit]


# ---------------------------------------------------------------- sampler fields

@dataclass(frozen=True)
class SamplerField:
    attr: str  # SamplingParams attribute
    names: tuple  # body keys, canonical first
    integer: bool
    lo: Optional[float]
    hi: Optional[float]
    strict: bool = False  # an OpenAI-spec field: strict on OpenAI/Ollama bodies


# KoboldCpp's sampler fields, accepted on every generation route. Ranges are KoboldCpp's clamps, plus upper bounds
# that keep every value meaningful to llama.cpp (int32 counts, float32 factors).
SAMPLER_FIELDS = (
    SamplerField("temperature", ("temperature",), False, 0.0, FLOAT_MAX, strict=True),
    SamplerField("top_k", ("top_k",), True, 0, C_INT_MAX),
    SamplerField("top_p", ("top_p",), False, 0.0, 1.0, strict=True),
    SamplerField("top_a", ("top_a",), False, 0.0, FLOAT_MAX),
    SamplerField("min_p", ("min_p",), False, 0.0, 1.0),
    SamplerField("typical", ("typical", "typical_p"), False, 0.0, 1.0),
    SamplerField("tfs", ("tfs",), False, 0.0, 1.0),
    SamplerField("nsigma", ("nsigma",), False, 0.0, FLOAT_MAX),
    SamplerField("rep_pen_range", ("rep_pen_range",), True, 0, C_INT_MAX),
    SamplerField("rep_pen_slope", ("rep_pen_slope",), False, 0.0, FLOAT_MAX),
    SamplerField("presence_penalty", ("presence_penalty",), False, -2.0, 2.0, strict=True),
    SamplerField("frequency_penalty", ("frequency_penalty",), False, -2.0, 2.0, strict=True),
    SamplerField("mirostat_tau", ("mirostat_tau",), False, 0.0, FLOAT_MAX),
    SamplerField("mirostat_eta", ("mirostat_eta",), False, 0.0, FLOAT_MAX),
    SamplerField("dynatemp_range", ("dynatemp_range",), False, 0.0, FLOAT_MAX),
    SamplerField("dynatemp_exponent", ("dynatemp_exponent",), False, 0.0, FLOAT_MAX),
    SamplerField("smoothing_factor", ("smoothing_factor",), False, 0.0, FLOAT_MAX),
    SamplerField("smoothing_curve", ("smoothing_curve",), False, 0.0, FLOAT_MAX),
    SamplerField("dry_multiplier", ("dry_multiplier",), False, 0.0, FLOAT_MAX),
    SamplerField("dry_base", ("dry_base",), False, 1.0, FLOAT_MAX),
    SamplerField("dry_allowed_length", ("dry_allowed_length",), True, 0, C_INT_MAX),
    SamplerField("dry_penalty_last_n", ("dry_penalty_last_n",), True, -1, C_INT_MAX),
    SamplerField("xtc_threshold", ("xtc_threshold",), False, 0.0, 1.0),
    SamplerField("xtc_probability", ("xtc_probability",), False, 0.0, 1.0),
)
def json_schema_to_grammar(schema, param: str = "grammar") -> str:
    """JSON schema (dict or JSON text) -> GBNF. Raises BadRequest with the converter's reason."""
    from adapters.tools import schema_to_gbnf  # heavy import; only when a schema is sent
    try:
        return schema_to_gbnf(json.loads(schema) if isinstance(schema, str) else schema)
    except RecursionError:
        raise BadRequest("the JSON schema is nested too deeply", param=param)
    except Exception as e:  # the converter raises plain Exceptions/ValueErrors/KeyErrors on bad schemas
        raise BadRequest(f"could not convert the JSON schema to a grammar: {type(e).__name__}: {e}", param=param)


def grammar(b: Body) -> str:
    """`grammar`: GBNF text, or a JSON schema (object or JSON text) converted to GBNF."""
    g = b.raw("grammar")
    if g is MISSING or g == "":
        return ""
    if isinstance(g, dict):
        return json_schema_to_grammar(g)
    if not isinstance(g, str):
        raise BadRequest(f"'grammar' must be a GBNF string or a JSON schema, got {type(g).__name__}", param="grammar")
    s = g.strip()
    if s.startswith("{"):
        try:
            schema = json.loads(s)
        except (ValueError, RecursionError):
            schema = None
        if isinstance(schema, dict):
            return json_schema_to_grammar(schema)
    return clean_text(g)


def logit_bias(b: Body, n_vocab: int, lenient: bool) -> dict:
    v = b.raw("logit_bias")
    if v is MISSING:
        return {}
    if not isinstance(v, dict):
        raise BadRequest("'logit_bias' must be an object like {\"token id\": bias}", param="logit_bias")
    out = {}
    for k, x in list(v.items())[:MAX_LOGIT_BIAS]:
        tid = token_id("logit_bias", k, n_vocab)
        out[tid] = bounded("logit_bias", x, -100.0, 100.0, lenient=lenient)
    return out


def _custom_token_bans(b: Body, n_vocab: int) -> List[int]:
    v = b.raw("custom_token_bans")
    if v is MISSING or v == "":
        return []
    if isinstance(v, str):
        items = [p.strip() for p in v.split(",") if p.strip()]
    elif isinstance(v, list):
        items = v
    else:
        raise BadRequest("'custom_token_bans' must be comma-separated token ids like \"1,2,3\"",
                         param="custom_token_bans")
    return [token_id("custom_token_bans", x, n_vocab) for x in items]


def _dry_breakers(b: Body) -> List[str]:
    v = b.raw("dry_sequence_breakers")
    if isinstance(v, str):
        try:
            parsed = json.loads(v)
        except (ValueError, RecursionError):
            parsed = [v]  # a single breaker given as plain text
        return Body({"dry_sequence_breakers": parsed}).strs("dry_sequence_breakers", MAX_DRY_BREAKERS)
    return b.strs("dry_sequence_breakers", MAX_DRY_BREAKERS)


def _sampler_order(b: Body) -> List[int]:
    v = b.raw("sampler_order")
    if v is MISSING:
        return list(DEFAULT_SAMPLER_ORDER)
    if not isinstance(v, list):
        raise BadRequest("'sampler_order' must be a list of sampler ids 0-6", param="sampler_order")
    out = []
    for x in v:
        i = number("sampler_order", x, integer=True, lenient=True)
        if not 0 <= i <= 6:
            raise BadRequest(f"'sampler_order' ids must be 0-6, got {i}", param="sampler_order")
        if i not in out:
            out.append(i)
    return out[:7] or list(DEFAULT_SAMPLER_ORDER)


def seed(b: Body, names=("sampler_seed", "seed"), lenient=True) -> int:
    """-1 (random) or a uint32 seed, as llama.cpp takes it."""
    v = b.raw(*names)
    if v is MISSING:
        return -1
    s = number(names[0] if b.raw(names[0]) is not MISSING else names[-1], v, integer=True, lenient=lenient)
    return -1 if s < 0 else s & 0xFFFFFFFF


def choice_seeds(seed: Optional[int], n: int) -> List[Optional[int]]:
    """Seeds of a request's n choices or candidates: seed, seed + 1, ... as uint32, each the text that seed gives
    alone; None each (random) when the request sets none."""
    if seed is None or seed < 0:
        return [None] * n
    return [(seed + i) & 0xFFFFFFFF for i in range(n)]


def sampling(b: Body, n_vocab: int, strict: bool = False, defaults: Optional[dict] = None) -> SamplingParams:
    """Every KoboldCpp sampler field of a body. strict: OpenAI-spec fields (marked in the table) reject
    out-of-range values; the rest stay KoboldCpp-lenient. defaults: values used when the body has none (an
    instruct adapter's sampler settings)."""
    base = SamplingParams()
    kw = {}
    for f in SAMPLER_FIELDS:
        fallback = (defaults or {}).get(f.attr, getattr(base, f.attr))
        lenient = not (strict and f.strict)
        kw[f.attr] = b.num(f.names[0], fallback, f.lo, f.hi, integer=f.integer, aliases=f.names[1:], lenient=lenient)
    pens = [b.num(n, None, 0.0, FLOAT_MAX, lenient=True) for n in ("rep_pen", "repeat_penalty", "repetition_penalty")]
    pens = [p for p in pens if p is not None]
    rep_pen = max(pens) if pens else float((defaults or {}).get("rep_pen", 1.0))
    if rep_pen <= 0:
        rep_pen = 1.0  # 0 or less would divide by zero in the penalty; treat as off
    bias = logit_bias(b, n_vocab, lenient=not strict)
    for tid in _custom_token_bans(b, n_vocab):
        bias[tid] = -100.0
    mirostat = b.int("mirostat", 0, lenient=True)
    return SamplingParams(
        rep_pen=rep_pen, sampler_order=_sampler_order(b), mirostat=mirostat if mirostat in (1, 2) else 0,
        dry_sequence_breakers=_dry_breakers(b), seed=seed(b), grammar=grammar(b), logit_bias=bias,
        ban_eos=b.bool("ban_eos_token", False, aliases=("use_default_badwordsids",), lenient=True), **kw)


def banned_phrases(b: Body) -> List[str]:
    """Phrases the engine must never produce (it backtracks when one appears)."""
    return [p for p in b.strs("banned_tokens", MAX_BANNED, aliases=("banned_strings",)) if p.strip()]


MAX_BEAMS = 16


def beam_search(b: Body) -> dict:
    """`num_beams` (> 1: beam search of that width), `length_penalty`, `early_stopping` -> GenRequest fields."""
    beams = b.int("num_beams", 1, 1, MAX_BEAMS)
    return {"beams": beams if beams > 1 else 0,
            "length_penalty": b.num("length_penalty", 1.0, -10.0, 10.0),
            "early_stopping": b.bool("early_stopping", False)}


def genkey(b: Body) -> str:
    return b.str("genkey")[:MAX_GENKEY]


def lora(b: Body, n_adapters: int):
    """llama-server's per-request adapter scales `lora: [{"id": N, "scale": X}]` -> {id: scale} (None: absent)."""
    v = b.data.get("lora")
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > 64:
        raise BadRequest("'lora' must be a list of {\"id\": N, \"scale\": X} objects", param="lora")
    if v and n_adapters == 0:
        raise BadRequest("this model was loaded with no LoRA adapters (--lora)", param="lora")
    out = {}
    for item in v:
        if not isinstance(item, dict):
            raise BadRequest("'lora' must be a list of {\"id\": N, \"scale\": X} objects", param="lora")
        i = bounded("lora id", item.get("id"), 0, max(0, n_adapters - 1), integer=True)
        out[int(i)] = float(bounded("lora scale", item.get("scale", 1.0), -100.0, 100.0))
    return out
