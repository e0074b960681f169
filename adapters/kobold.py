"""KoboldCpp native API <-> engine: request parsing/validation and response shaping. Pure functions."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import List, Optional

from gguf_loader.jobs import DEFAULT_SAMPLER_ORDER, GenRequest, Result, SamplingParams

from .errors import BadRequest
from . import sse

# KoboldCpp's own fallback tags (used for {{[INPUT]}}-style placeholders when no adapter is known)
DEFAULT_INSTRUCT_TAGS = {
    "system_start": "\n### Instruction:\n", "system_end": "",
    "user_start": "\n### Instruction:\n", "user_end": "",
    "assistant_start": "\n### Response:\n", "assistant_end": "",
}
_PLACEHOLDERS = (
    ("{{[SYSTEM]}}", "system_start"), ("{{[SYSTEM_END]}}", "system_end"),
    ("{{[INPUT]}}", "user_start"), ("{{[INPUT_END]}}", "user_end"),
    ("{{[OUTPUT]}}", "assistant_start"), ("{{[OUTPUT_END]}}", "assistant_end"),
)

MAX_STOP_SEQUENCES = 256
MAX_LOGIT_BIAS = 512
MAX_BANNED = 768
MAX_DRY_BREAKERS = 128
MAX_LOGPROBS = 20
MAX_GENKEY = 128


@dataclass
class GenDefaults:
    """Server-side values a request falls back on."""
    max_length: int = 896  # --defaultgenamt
    max_context_length: int = 8192  # the server's context
    n_vocab: int = 0  # 0 = unknown: token ids are not range-checked
    instruct_tags: Optional[dict] = None  # server chat adapter tags for placeholders (None: Alpaca-ish default)


# ---------------------------------------------------------------- field readers

_MISSING = object()


def _get(body: dict, *names):
    """First present, non-null value among `names` (aliases), else _MISSING."""
    for n in names:
        v = body.get(n)
        if v is not None:
            return v
    return _MISSING


def _number(name, v) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            raise BadRequest(f"'{name}' must be a number, got {v!r}")
    else:
        raise BadRequest(f"'{name}' must be a number, got {type(v).__name__}")
    if not math.isfinite(f):
        raise BadRequest(f"'{name}' must be a finite number, got {v!r}")
    return f


def _clamp(v, lo, hi):
    if lo is not None:
        v = max(lo, v)
    if hi is not None:
        v = min(hi, v)
    return v


def _float(body, name, default, lo=None, hi=None, aliases=()):
    v = _get(body, name, *aliases)
    if v is _MISSING:
        return default
    return _clamp(_number(name, v), lo, hi)


def _int_value(name, v) -> int:
    f = _number(name, v)
    if f != int(f):
        raise BadRequest(f"'{name}' must be a whole number, got {v!r}")
    return int(f)


def _int(body, name, default, lo=None, hi=None):
    v = _get(body, name)
    if v is _MISSING:
        return default
    return _clamp(_int_value(name, v), lo, hi)


def _bool_value(name, v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return v.strip().lower() in ("true", "1", "yes", "on")
    raise BadRequest(f"'{name}' must be true or false, got {v!r}")


def _bool(body, name, default, aliases=()):
    v = _get(body, name, *aliases)
    return default if v is _MISSING else _bool_value(name, v)


def clean_text(s: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800") that cannot be encoded as UTF-8: make them U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _str(body, name, default=""):
    v = _get(body, name)
    if v is _MISSING:
        return default
    if not isinstance(v, str):
        raise BadRequest(f"'{name}' must be a string, got {type(v).__name__}")
    return clean_text(v)


def _str_list(name, v, limit) -> List[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise BadRequest(f"'{name}' must be a list of strings, got {type(v).__name__}")
    out = []
    for s in v:
        if not isinstance(s, str):
            raise BadRequest(f"'{name}' must be a list of strings; found {type(s).__name__} {s!r}")
        if s:
            out.append(clean_text(s))
    return out[:limit]


def _token_id(name, v, n_vocab) -> int:
    try:
        i = _int_value(name, v)
    except BadRequest:
        raise BadRequest(f"'{name}': token ids must be whole numbers, got {v!r}")
    if i < 0 or (n_vocab and i >= n_vocab):
        limit = f" (vocabulary has {n_vocab} tokens)" if n_vocab else ""
        raise BadRequest(f"'{name}': token id {i} is out of range{limit}")
    return i


# ---------------------------------------------------------------- request

def require_object(body) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def json_schema_to_grammar(schema) -> str:
    """JSON schema (dict or JSON text) -> GBNF. Raises BadRequest with the converter's reason."""
    from adapters.tools import schema_to_gbnf  # heavy import; only when a schema is sent
    try:
        return schema_to_gbnf(json.loads(schema) if isinstance(schema, str) else schema)
    except Exception as e:  # the converter raises plain Exceptions/ValueErrors/KeyErrors on bad schemas
        raise BadRequest(f"could not convert the JSON schema to a grammar: {type(e).__name__}: {e}")


def _grammar(body) -> str:
    g = _get(body, "grammar")
    if g is _MISSING or g == "":
        return ""
    if isinstance(g, dict):
        return json_schema_to_grammar(g)
    if not isinstance(g, str):
        raise BadRequest(f"'grammar' must be a GBNF string or a JSON schema, got {type(g).__name__}")
    s = g.strip()
    if s.startswith("{"):
        try:
            schema = json.loads(s)
        except ValueError:
            schema = None
        if isinstance(schema, dict):
            return json_schema_to_grammar(schema)
    return g


def _logit_bias(body, n_vocab) -> dict:
    v = _get(body, "logit_bias")
    if v is _MISSING:
        return {}
    if not isinstance(v, dict):
        raise BadRequest("'logit_bias' must be an object like {\"token id\": bias}")
    out = {}
    for k, b in list(v.items())[:MAX_LOGIT_BIAS]:
        tid = _token_id("logit_bias", k, n_vocab)
        out[tid] = max(-100.0, min(100.0, _number(f"logit_bias[{k}]", b)))
    return out


def _custom_token_bans(body, n_vocab) -> List[int]:
    v = _get(body, "custom_token_bans")
    if v is _MISSING or v == "":
        return []
    if isinstance(v, str):
        items = [p.strip() for p in v.split(",") if p.strip()]
    elif isinstance(v, list):
        items = v
    else:
        raise BadRequest("'custom_token_bans' must be comma-separated token ids like \"1,2,3\"")
    return [_token_id("custom_token_bans", x, n_vocab) for x in items]


def _dry_breakers(body) -> List[str]:
    v = _get(body, "dry_sequence_breakers")
    if v is _MISSING:
        return []
    if isinstance(v, str):
        try:
            parsed = json.loads(v)
        except ValueError:
            parsed = [v]  # a single breaker given as plain text
        v = parsed
    return _str_list("dry_sequence_breakers", v, MAX_DRY_BREAKERS)


def _sampler_order(body) -> List[int]:
    v = _get(body, "sampler_order")
    if v is _MISSING:
        return list(DEFAULT_SAMPLER_ORDER)
    if not isinstance(v, list):
        raise BadRequest("'sampler_order' must be a list of sampler ids 0-6")
    out = []
    for x in v:
        i = _int_value("sampler_order", x)
        if not 0 <= i <= 6:
            raise BadRequest(f"'sampler_order' ids must be 0-6, got {i}")
        if i not in out:
            out.append(i)
    return out[:7] or list(DEFAULT_SAMPLER_ORDER)


def _seed(body) -> int:
    v = _get(body, "sampler_seed", "seed")
    if v is _MISSING:
        return -1
    s = _int_value("sampler_seed", v)
    return -1 if s < 0 else s & 0xFFFFFFFF  # llama.cpp seeds are uint32


def _instruct_tags(body, defaults: GenDefaults) -> dict:
    tags = dict(DEFAULT_INSTRUCT_TAGS)
    tags.update(defaults.instruct_tags or {})
    adapter = body.get("adapter")
    if adapter is not None:
        if not isinstance(adapter, dict):
            raise BadRequest("'adapter' must be an object of instruct tags")
        for key in tags:
            if key in adapter:
                if not isinstance(adapter[key], str):
                    raise BadRequest(f"'adapter.{key}' must be a string")
                tags[key] = clean_text(adapter[key])
    return tags


def replace_placeholders(text: str, tags: dict) -> str:
    if "{{[" not in text:
        return text
    for ph, key in _PLACEHOLDERS:
        text = text.replace(ph, tags.get(key, ""))
    return text


def _banned_phrases(body) -> List[str]:
    """Phrases the engine must never produce (it backtracks when one appears)."""
    v = _get(body, "banned_tokens", "banned_strings")
    if v is _MISSING:
        return []
    return [p for p in _str_list("banned_tokens", v, MAX_BANNED) if p.strip()]


def parse_generate(body, defaults: GenDefaults) -> GenRequest:
    """A native generate body (/api/v1/generate, /api/extra/generate/stream) -> GenRequest.
    Unknown fields are ignored; wrong types raise BadRequest; out-of-range values are clamped."""
    body = require_object(body)
    prompt = _str(body, "prompt")
    memory = _str(body, "memory")
    ctx = defaults.max_context_length
    max_context_length = _int(body, "max_context_length", ctx, lo=1, hi=ctx)
    max_length = _int(body, "max_length", defaults.max_length, lo=1, hi=max(1, max_context_length))

    rep_pen = max(_float(body, n, 1.0) for n in ("rep_pen", "repeat_penalty", "repetition_penalty"))
    if rep_pen <= 0:
        rep_pen = 1.0  # 0 or less would divide by zero in the penalty; treat as off

    bias = _logit_bias(body, defaults.n_vocab)
    for tid in _custom_token_bans(body, defaults.n_vocab):
        bias[tid] = -100.0

    mirostat = _int(body, "mirostat", 0)
    sampling = SamplingParams(
        temperature=_float(body, "temperature", 0.75, lo=0.0),
        top_k=_int(body, "top_k", 100, lo=0),
        top_p=_float(body, "top_p", 0.92, lo=0.0, hi=1.0),
        top_a=_float(body, "top_a", 0.0, lo=0.0),
        min_p=_float(body, "min_p", 0.0, lo=0.0, hi=1.0),
        typical=_float(body, "typical", 1.0, lo=0.0, hi=1.0),
        tfs=_float(body, "tfs", 1.0, lo=0.0, hi=1.0),
        nsigma=_float(body, "nsigma", 0.0, lo=0.0),
        rep_pen=rep_pen,
        rep_pen_range=_int(body, "rep_pen_range", 320, lo=0),
        rep_pen_slope=_float(body, "rep_pen_slope", 1.0, lo=0.0),
        presence_penalty=_float(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
        sampler_order=_sampler_order(body),
        mirostat=mirostat if mirostat in (1, 2) else 0,
        mirostat_tau=_float(body, "mirostat_tau", 5.0, lo=0.0),
        mirostat_eta=_float(body, "mirostat_eta", 0.1, lo=0.0),
        dynatemp_range=_float(body, "dynatemp_range", 0.0, lo=0.0),
        dynatemp_exponent=_float(body, "dynatemp_exponent", 1.0, lo=0.0),
        smoothing_factor=_float(body, "smoothing_factor", 0.0, lo=0.0),
        smoothing_curve=_float(body, "smoothing_curve", 1.0, lo=0.0),
        dry_multiplier=_float(body, "dry_multiplier", 0.0, lo=0.0),
        dry_base=_float(body, "dry_base", 1.75, lo=1.0),
        dry_allowed_length=_int(body, "dry_allowed_length", 2, lo=0),
        dry_penalty_last_n=_int(body, "dry_penalty_last_n", 320, lo=-1),
        dry_sequence_breakers=_dry_breakers(body),
        xtc_threshold=_float(body, "xtc_threshold", 0.2, lo=0.0, hi=1.0),
        xtc_probability=_float(body, "xtc_probability", 0.0, lo=0.0, hi=1.0),
        seed=_seed(body),
        grammar=_grammar(body),
        logit_bias=bias,
        ban_eos=_bool(body, "ban_eos_token", False, aliases=("use_default_badwordsids",)),
    )

    stops = []
    v = _get(body, "stop_sequence")
    if v is not _MISSING:
        stops = _str_list("stop_sequence", v, MAX_STOP_SEQUENCES)

    if _bool(body, "replace_instruct_placeholders", True):
        tags = _instruct_tags(body, defaults)
        prompt = replace_placeholders(prompt, tags)
        memory = replace_placeholders(memory, tags)
        stops = [s for s in (replace_placeholders(s, tags) for s in stops) if s]

    lp = _get(body, "logprobs")
    logprobs, top = False, 5
    if lp is not _MISSING:
        if isinstance(lp, bool) or isinstance(lp, str):
            logprobs = _bool_value("logprobs", lp)
        else:
            n = _int_value("logprobs", lp)  # OpenAI-style count
            logprobs, top = n > 0, max(1, min(MAX_LOGPROBS, n))

    genkey = _str(body, "genkey")[:MAX_GENKEY]

    return GenRequest(
        prompt=prompt,
        memory=memory,
        max_length=max_length,
        max_context_length=max_context_length,
        sampling=sampling,
        stop=stops,
        banned_phrases=_banned_phrases(body),
        trim_stop=_bool(body, "trim_stop", True),
        bypass_eos=_bool(body, "bypass_eos", False),
        render_special=_bool(body, "render_special", False),
        logprobs=logprobs,
        top_logprobs=top,
        genkey=genkey,
    )


def parse_genkey(body) -> str:
    """genkey of an abort/check/last_logprobs body ('' when absent)."""
    if not isinstance(body, dict):
        return ""
    v = body.get("genkey")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise BadRequest("'genkey' must be a string")
    return v[:MAX_GENKEY]


def parse_tokenize(body) -> tuple:
    """-> (text, special). Body: {"prompt": str, "special": bool}."""
    body = require_object(body)
    v = body.get("prompt", body.get("content"))
    if v is None:
        v = ""
    if not isinstance(v, str):
        raise BadRequest(f"'prompt' must be a string, got {type(v).__name__}", extra={"value": -1})
    v = clean_text(v)
    try:
        special = _bool(body, "special", True)
    except BadRequest as e:
        raise BadRequest(e.msg, extra={"value": -1})
    return v, special


def parse_detokenize(body, n_vocab: int = 0) -> tuple:
    """-> (ids, special). Body: {"ids": [int], "special": bool}."""
    body = require_object(body)
    ids = body.get("ids", [])
    if not isinstance(ids, list):
        raise BadRequest("'ids' must be a list of token ids")
    return [_token_id("ids", x, n_vocab) for x in ids], _bool(body, "special", False)


def parse_json_to_grammar(body) -> str:
    """Body {"schema": {...}} or the schema itself -> GBNF."""
    body = require_object(body)
    schema = body.get("schema", body)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise BadRequest("'schema' is not valid JSON")
    if not isinstance(schema, dict):
        raise BadRequest("'schema' must be a JSON schema object")
    return json_schema_to_grammar(schema)


# ---------------------------------------------------------------- responses

def finish_reason(result: Result) -> str:
    # an aborted job answers like a normal stop (as KoboldCpp does); a stop string is "stop", not KoboldCpp's "length"
    return "length" if result.finish_reason == "length" else "stop"


def _lp(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # JSON has no -Infinity


def logprobs_object(lps) -> Optional[dict]:
    """Engine TokenLogprobs -> both chat- and completions-style shapes in one object (as KoboldCpp)."""
    if lps is None:
        return None
    content, tokens, token_lps, tops, offsets = [], [], [], [], []
    offset = 0
    for t in lps:
        top = [{"token": tt, "logprob": _lp(tl), "bytes": list(tb)} for tt, tl, tb in t.top]
        content.append({"token": t.token, "logprob": _lp(t.logprob), "bytes": list(t.bytes), "top_logprobs": top})
        tokens.append(t.token)
        token_lps.append(_lp(t.logprob))
        tops.append({tt: _lp(tl) for tt, tl, _ in t.top})
        offsets.append(offset)
        offset += len(t.token)
    return {"content": content, "tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def generate_response(result: Result) -> dict:
    return {"results": [{
        "text": result.text,
        "finish_reason": finish_reason(result),
        "logprobs": logprobs_object(result.logprobs),
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "tool_calls": [],
    }]}


def stream_token(text: str) -> bytes:
    return sse.event({"token": text, "finish_reason": None}, "message")


def stream_end(result: Result) -> bytes:
    return sse.event({"token": "", "finish_reason": finish_reason(result)}, "message")


def check_response(text: str) -> dict:
    return {"results": [{"text": text}]}


def perf_response(perf: dict, quiet: bool) -> dict:
    """engine.perf() plus KoboldCpp's keys for features we do not have (truthfully zero)."""
    out = {"last_draft_success": 0, "last_draft_failed": 0, "total_img_gens": 0, "total_tts_gens": 0,
           "total_transcribe_gens": 0, "hordeexitcounter": 0}
    out.update(perf)
    out["quiet"] = bool(quiet)
    return out
