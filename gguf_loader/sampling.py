"""Per-request llama.cpp sampler chains, plus numpy passes for the samplers llama.cpp lacks.

The numpy passes (top-a, tail-free, repetition-penalty slope, smoothing) run as llama.cpp custom samplers over the
candidate array, only when a request asks for them; everything else stays in C.
"""
from __future__ import annotations

import ctypes
import re as _re
from typing import List, Optional, Sequence

import numpy as np

import llama_cpp as L

from .jobs import SamplingParams

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(L.llama_token_data)
NEG_INF = np.float32(-np.inf)


def _candidates(cur_p) -> np.ndarray:
    arr = cur_p.contents
    n = int(arr.size)
    if n == 0:
        return np.empty(0, dtype=_TOKEN_DATA)
    buf = (ctypes.c_char * (n * _TOKEN_DATA.itemsize)).from_address(ctypes.addressof(arr.data.contents))
    return np.frombuffer(buf, dtype=_TOKEN_DATA, count=n)


def _probs(logits: np.ndarray) -> np.ndarray:
    finite = np.isfinite(logits)
    if not finite.any():
        return np.zeros_like(logits)
    m = logits[finite].max()
    e = np.where(finite, np.exp(logits - m), 0.0)
    return e / e.sum()


# --- numpy samplers: each takes the candidate record array and edits logits in place ---

def top_a(c: np.ndarray, a: float):
    p = _probs(c["logit"])
    if len(p):
        c["logit"][p < a * p.max() ** 2] = NEG_INF


def tail_free(c: np.ndarray, z: float):
    if len(c) < 3:
        return
    logits = c["logit"]
    order = np.argsort(-logits, kind="stable")
    p = _probs(logits[order])
    d2 = np.abs(np.diff(p, n=2))
    total = d2.sum()
    if total <= 0:
        return
    cum = np.cumsum(d2 / total)
    keep = int(np.searchsorted(cum, z, side="right")) + 1  # first index past z, plus one as in the TFS paper
    keep = max(1, min(keep, len(order)))
    logits[order[keep:]] = NEG_INF


def top_p_full(c: np.ndarray, p: float):
    """Exact top-p over a full, unsorted candidate array without sorting it: the tokens within `d` of the top logit
    are a top set, so once their mass reaches p the nucleus lies inside them and only they are sorted.
    Returns the new candidate count (the kept tokens are moved to the front, sorted by logit)."""
    logits = c["logit"]
    m = logits.max()
    if not np.isfinite(m):
        return None
    e = np.exp((logits - m).astype(np.float64))
    target = p * e.sum()
    for d in (8.0, 16.0, 32.0, np.inf):
        sel = np.flatnonzero(logits >= m - d)
        if e[sel].sum() >= target or d == np.inf:
            break
    order = sel[np.argsort(-logits[sel], kind="stable")]
    keep = min(int(np.searchsorted(np.cumsum(e[order]), target)) + 1, len(order))
    c[:keep] = c[order[:keep]].copy()
    return keep


def smoothing(c: np.ndarray, factor: float, curve: float):
    """Quadratic (and cubic, by curve) smoothing around the top logit."""
    logits = c["logit"]
    finite = np.isfinite(logits)
    if not finite.any():
        return
    h = logits[finite].max()
    d = logits[finite] - h
    k = (3.0 - curve) / 2.0
    s = (curve - 1.0) / 2.0
    logits[finite] = (-(k * factor * d * d) + (s * factor * d * d * d) + h).astype(np.float32)


def sloped_rep_pen(c: np.ndarray, history: Sequence[int], pen: float, rng: int, slope: float, presence: float):
    """Repetition penalty over the last `rng` tokens; the older half of the window gets `slope` of the penalty."""
    window = list(history[-rng:]) if rng > 0 else list(history)
    if not window or (pen == 1.0 and presence == 0.0):
        return
    half = len(window) // 2
    weights = {}
    for i, tok in enumerate(window):
        w = 1.0 if i >= half else slope
        if w > weights.get(tok, -1.0):
            weights[tok] = w
    ids = c["id"]
    if len(ids) and ids[-1] == len(ids) - 1 and ids[0] == 0:  # untouched full-vocab array: index == id
        toks = np.fromiter(weights.keys(), dtype=np.int64)
        toks = toks[toks < len(ids)]
        idx = toks
    else:
        pos = {int(t): i for i, t in enumerate(ids)}
        idx = np.array([pos[t] for t in weights if t in pos], dtype=np.int64)
    if not len(idx):
        return
    w = np.array([weights[int(ids[i])] for i in idx], dtype=np.float32)
    p = 1.0 + (pen - 1.0) * w
    lg = c["logit"][idx]
    lg = np.where(lg > 0, lg / p, lg * p) - presence
    c["logit"][idx] = lg.astype(np.float32)


class _PySampler:
    """A llama.cpp sampler whose `apply` is a Python function over the candidate array."""

    def __init__(self, fn, accept=None):
        self._fn = fn
        self._accept_fn = accept

        def apply(smpl, cur_p):
            try:
                size = fn(_candidates(cur_p))
                if size is not None:  # the function kept the first `size` candidates, sorted
                    cur_p.contents.size = size
                    cur_p.contents.sorted = True
            except Exception:  # never let a Python error unwind through C
                pass

        def accept(smpl, tok):
            if self._accept_fn:
                self._accept_fn(int(tok))

        iface = L.llama_sampler_i()
        self._apply = L.llama_sampler_i_apply(apply)
        self._acc = L.llama_sampler_i_accept(accept)
        iface.apply = self._apply
        iface.accept = self._acc
        self._iface = iface
        self.ptr = L.llama_sampler_init(ctypes.pointer(iface), None)


class GrammarDone(Exception):
    """The grammar allows no further token: generation ends here."""


class _LazyGrammar:
    """Watches the generated text for a trigger (SamplingParams.grammar_triggers, Python regexes; group 1 starts
    the constrained text), ignoring a leading reasoning block; then builds the grammar and feeds it the text from
    the trigger on, each token checked before it is accepted. Text the grammar refuses leaves generation free."""

    def __init__(self, vocab, p: SamplingParams, text_tools):
        self.vocab, self.grammar_text = vocab, p.grammar
        self.piece, self.tokenize = text_tools  # (token -> bytes with specials), (text -> exact ids or None)
        self.triggers = [_re.compile(t.encode("utf-8")) for t in p.grammar_triggers]  # on bytes: a character
        # may be split between tokens
        self.think = p.grammar_trigger_think  # (start, end, opened by the prompt) or None
        if self.think:
            self.think = (self.think[0].encode("utf-8"), self.think[1].encode("utf-8"), self.think[2])
        self.text = b""
        self.dead = False

    def _region(self) -> Optional[int]:
        """Where triggers may match: after a leading reasoning block (None while it is still open)."""
        if not self.think:
            return 0
        start, end, opened = self.think
        if not opened and not self.text.lstrip().startswith(start):
            if start.startswith(self.text.lstrip()):
                return None  # may still be opening
            return 0
        k = self.text.find(end)
        return None if k < 0 else k + len(end)

    def after(self, tok: int, fits):
        """-> the grammar sampler once it has taken over, else None."""
        if self.dead:
            return None
        self.text += self.piece(tok)
        at = self._region()
        if at is None:
            return None
        region = self.text[at:]  # "^" in a trigger means the start of the answer
        for rx in self.triggers:
            m = rx.search(region)
            if m:
                break
        else:
            return None
        self.dead = True  # one try: from here on the grammar rules or nothing does
        begin = m.start(1) if m.re.groups else m.start()
        g = L.llama_sampler_init_grammar(self.vocab, self.grammar_text.encode("utf-8"), b"root")
        if not g:
            return None
        for t in self.tokenize(region[begin:]) or [-1]:
            if t < 0 or not fits(g, t):
                L.llama_sampler_free(g)
                return None
            L.llama_sampler_accept(g, t)
        return g


class SamplerChain:
    """Owns a llama.cpp sampler chain for one request."""

    def __init__(self, vocab, n_vocab: int, n_ctx_train: int, eog_ids: List[int], params: SamplingParams,
                 prompt_tokens: Sequence[int], seed: int, banned_now=None, text_tools=None):
        self.chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._py: List[_PySampler] = []  # keeps the Python callbacks alive as long as the chain
        self._keep = []  # ctypes buffers that must outlive the chain
        self.history: List[int] = list(prompt_tokens)
        self.n_vocab = n_vocab
        self.greedy = params.temperature <= 0 or params.top_k == 1
        self._argmax = False
        p = params

        if banned_now is not None:  # tokens banned at the current position (phrase bans), first in the chain
            def ban(c):
                toks = banned_now()
                if toks and len(c) and c["id"][0] == 0 and c["id"][-1] == len(c) - 1:
                    c["logit"][np.fromiter(toks, dtype=np.int64)] = NEG_INF
            self._add_py(ban)

        bias = {}
        for tok, b in (p.logit_bias or {}).items():
            if 0 <= int(tok) < n_vocab:
                bias[int(tok)] = float(b)
        if p.ban_eos:
            for t in eog_ids:
                bias[t] = float("-inf")
        if bias:
            arr = (L.llama_logit_bias * len(bias))()
            for i, (tok, b) in enumerate(bias.items()):
                arr[i].token = tok
                arr[i].bias = b
            self._keep.append(arr)
            self._add(L.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))

        # The grammar stays out of the chain: checking one sampled token is cheap, masking all 262k is not.
        self.grammar = None
        self._lazy = None
        if p.grammar and p.grammar_triggers:
            # Lazy: free text until a trigger shows up. llama.cpp's own lazy grammar hands the text after the
            # trigger to the grammar unchecked and aborts the process when it does not fit, so the trigger is
            # watched here and that text is checked token by token before the grammar takes over.
            self._lazy = _LazyGrammar(vocab, p, text_tools)
        elif p.grammar:
            self.grammar = L.llama_sampler_init_grammar(vocab, p.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                self.grammar = None
                self.close()
                raise ValueError("the grammar could not be parsed")
        if p.grammar:
            self._cand = (L.llama_token_data * n_vocab)()
            raw = (ctypes.c_char * ctypes.sizeof(self._cand)).from_address(ctypes.addressof(self._cand))
            self._cand_np = np.frombuffer(raw, dtype=_TOKEN_DATA, count=n_vocab)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._one = (L.llama_token_data * 1)()

        def add_rep_pen():
            if p.rep_pen_slope not in (0.0, 1.0) and p.rep_pen != 1.0:
                self._add_py(lambda c: sloped_rep_pen(c, self.history, p.rep_pen, p.rep_pen_range, p.rep_pen_slope,
                                                      p.presence_penalty))
                if p.frequency_penalty:
                    self._add_penalties(0, 1.0, p.frequency_penalty, 0.0, prompt_tokens)
            elif p.rep_pen != 1.0 or p.presence_penalty or p.frequency_penalty:
                rng = p.rep_pen_range if p.rep_pen_range > 0 else n_ctx_train
                self._add_penalties(rng, p.rep_pen, p.frequency_penalty, p.presence_penalty, prompt_tokens)
            if p.dry_multiplier > 0:
                breakers = [b.encode("utf-8") for b in p.dry_sequence_breakers if isinstance(b, str)]
                carr = (ctypes.c_char_p * len(breakers))(*breakers) if breakers else None
                self._keep.append(carr)
                dry = L.llama_sampler_init_dry(vocab, p.dry_multiplier, p.dry_base,
                                               p.dry_allowed_length, p.dry_penalty_last_n, carr, len(breakers))
                for t in prompt_tokens[-max(p.dry_penalty_last_n, 0) or None:]:
                    L.llama_sampler_accept(dry, t)
                self._add(dry)

        if self.greedy:
            add_rep_pen()
            self._add(L.llama_sampler_init_greedy())
            # greedy alone: the first highest logit, read in place (llama.cpp would copy all 262k candidates first)
            self._argmax = L.llama_sampler_chain_n(self.chain) == 1 and self._lazy is None and self.grammar is None
            return
        if p.mirostat in (1, 2):
            add_rep_pen()
            self._add(L.llama_sampler_init_temp(max(p.temperature, 1e-4)))
            if p.mirostat == 1:
                self._add(L.llama_sampler_init_mirostat(n_vocab, seed, p.mirostat_tau, p.mirostat_eta, 100))
            else:
                self._add(L.llama_sampler_init_mirostat_v2(seed, p.mirostat_tau, p.mirostat_eta))
            return

        order = [i for i in p.sampler_order if isinstance(i, int) and 0 <= i <= 6]
        seen = []
        for i in order + [6, 0, 1, 3, 4, 2, 5]:  # anything the client left out still runs, in the default order
            if i not in seen:
                seen.append(i)
        for sid in seen:
            if sid == 6:
                add_rep_pen()
            elif sid == 0 and p.top_k > 0:
                self._add(L.llama_sampler_init_top_k(p.top_k))
            elif sid == 1 and p.top_a > 0:
                self._add_py(lambda c: top_a(c, p.top_a))
            elif sid == 2:
                if 0 < p.top_p < 1 and (p.top_k <= 0 or p.top_k > 1000):
                    # llama.cpp's top-p sorts all 262k candidates each token here (measured 25% slower)
                    self._add_py(lambda c: top_p_full(c, p.top_p))
                elif 0 < p.top_p < 1:
                    self._add(L.llama_sampler_init_top_p(p.top_p, 1))
                if p.min_p > 0:
                    self._add(L.llama_sampler_init_min_p(p.min_p, 1))
            elif sid == 3 and 0 < p.tfs < 1:
                self._add_py(lambda c: tail_free(c, p.tfs))
            elif sid == 4 and 0 < p.typical < 1:
                self._add(L.llama_sampler_init_typical(p.typical, 1))
            elif sid == 5:
                if p.nsigma > 0:
                    self._add(L.llama_sampler_init_top_n_sigma(p.nsigma))
                if p.smoothing_factor > 0:
                    self._add_py(lambda c: smoothing(c, p.smoothing_factor, p.smoothing_curve))
                if p.dynatemp_range > 0:
                    self._add(L.llama_sampler_init_temp_ext(p.temperature, p.dynatemp_range, p.dynatemp_exponent))
                elif p.temperature != 1.0:
                    self._add(L.llama_sampler_init_temp(p.temperature))
        if p.xtc_probability > 0:
            self._add(L.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, 1, seed))
        self._add(L.llama_sampler_init_dist(seed))

    def _add(self, smpl):
        L.llama_sampler_chain_add(self.chain, smpl)

    def _add_penalties(self, last_n, repeat, freq, present, prompt_tokens):
        pen = L.llama_sampler_init_penalties(self.n_vocab, last_n, repeat, freq, present)
        window = prompt_tokens[-last_n:] if last_n > 0 else prompt_tokens
        for t in window:
            L.llama_sampler_accept(pen, t)
        self._add(pen)

    def _add_py(self, fn):
        s = _PySampler(fn)
        self._py.append(s)
        self._add(s.ptr)

    def sample(self, ctx, idx: int) -> int:
        if self._argmax:
            tok = int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))))
        elif self.grammar is None:
            tok = L.llama_sampler_sample(self.chain, ctx, idx)
        else:
            tok = self._sample_with_grammar(ctx, idx)
        self.history.append(tok)
        if self._lazy is not None and self.grammar is None:
            self.grammar = self._lazy.after(tok, self._fits)
        return tok

    def _fits(self, grammar, tok: int) -> bool:
        """Does the grammar accept this token next? (its apply on a one-token candidate list)"""
        one = self._one
        one[0].id, one[0].logit, one[0].p = tok, 1.0, 0.0
        single = L.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        L.llama_sampler_apply(grammar, ctypes.byref(single))
        return bool(np.isfinite(one[0].logit))

    def _candidates_from(self, ctx, idx: int):
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        c = self._cand_np
        c["id"] = self._ids
        c["logit"] = logits
        c["p"] = 0.0
        return L.llama_token_data_array(data=self._cand, size=self.n_vocab, selected=-1, sorted=False)

    def _sample_with_grammar(self, ctx, idx: int) -> int:
        arr = self._candidates_from(ctx, idx)
        L.llama_sampler_apply(self.chain, ctypes.byref(arr))
        tok = int(self._cand[arr.selected].id)
        one = self._one
        one[0].id, one[0].logit, one[0].p = tok, 1.0, 0.0
        single = L.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        L.llama_sampler_apply(self.grammar, ctypes.byref(single))
        if not np.isfinite(one[0].logit):  # the grammar refuses it: mask everything, then sample again
            arr = self._candidates_from(ctx, idx)
            L.llama_sampler_apply(self.grammar, ctypes.byref(arr))
            L.llama_sampler_apply(self.chain, ctypes.byref(arr))
            if arr.selected < 0 or not np.isfinite(self._cand[arr.selected].logit):
                # nothing the grammar allows is left (it is complete and the end of text is banned, or every
                # allowed token is banned): accepting any token would abort llama.cpp
                raise GrammarDone()
            tok = int(self._cand[arr.selected].id)
        L.llama_sampler_accept(self.grammar, tok)
        L.llama_sampler_accept(self.chain, tok)
        return tok

    def accept(self, tok: int):
        """Replay a token already in the output (after a backtrack)."""
        L.llama_sampler_accept(self.chain, tok)
        if self.grammar is not None:
            L.llama_sampler_accept(self.grammar, tok)
        elif self._lazy is not None:
            self.grammar = self._lazy.after(tok, self._fits)
        self.history.append(tok)

    def close(self):
        if self.chain is not None:
            # custom samplers came from llama_sampler_init with no free(): the chain frees their structs
            L.llama_sampler_free(self.chain)
            if self.grammar is not None:
                L.llama_sampler_free(self.grammar)
                self.grammar = None
            self.chain = None
            self._py.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
