"""Token logprobs in the two shapes OpenAI uses (chat `content` entries, completions parallel lists)."""
from __future__ import annotations

import math


def _lp(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # JSON has no -Infinity


def chat_logprobs(lps) -> dict:
    return {"content": [{"token": t.token, "logprob": _lp(t.logprob), "bytes": list(t.bytes),
                         "top_logprobs": [{"token": a[0], "logprob": _lp(a[1]), "bytes": list(a[2])} for a in t.top]}
                        for t in (lps or [])], "refusal": None}


def completion_logprobs(lps, offset: int = 0) -> dict:
    tokens, tlp, top, offs = [], [], [], []
    for t in lps or []:
        tokens.append(t.token)
        tlp.append(_lp(t.logprob))
        top.append({a[0]: _lp(a[1]) for a in t.top})
        offs.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": tlp, "top_logprobs": top, "text_offset": offs}
