"""Incremental text out of token bytes: no broken UTF-8, no stop string (or its start) ever shown early."""
from __future__ import annotations

import codecs
from typing import List, Optional, Tuple


class TextStream:
    """`banned` phrases (case-insensitive) are held back like stop strings, at token granularity, so the engine can
    take back the tokens of a banned phrase before any of them was shown."""

    def __init__(self, stops: List[str], trim_stop: bool = True, banned: Optional[List[str]] = None):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = [s for s in stops if s]
        self.trim_stop = trim_stop
        self._max_stop = max((len(s) for s in self.stops), default=0)
        self.banned = [b.lower() for b in (banned or []) if b]
        self.token_starts: List[int] = []  # char offset where each fed token's text begins
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of self.text already handed out
        self.stop_hit: Optional[str] = None
        self.final_len: Optional[int] = None  # set once a stop string ends the text

    @staticmethod
    def _tail_prefix(text: str, strings: List[str]) -> int:
        """Length of the longest tail of `text` that is a proper prefix of one of `strings`."""
        best = 0
        for s in strings:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _safe_end(self) -> int:
        safe = len(self.text) - self._tail_prefix(self.text, self.stops)
        if self.banned:
            cut = len(self.text) - self._tail_prefix(self.text.lower(), self.banned)
            # never show part of a token that may have to be taken back
            starts = [t for t in self.token_starts if t <= cut]
            if cut < len(self.text) and starts:
                cut = starts[-1]
            safe = min(safe, cut)
        return safe

    def find_banned(self):
        """(char offset, phrase) of the first banned phrase in the text not yet shown, or None."""
        low = self.text.lower()
        best = None
        for b in self.banned:
            i = low.find(b, self.emitted)
            if i != -1 and (best is None or i < best[0]):
                best = (i, b)
        return best

    def feed(self, piece: bytes) -> Tuple[str, bool]:
        """Add a token's bytes. Returns (text that is now safe to show, whether a stop string was hit)."""
        if self.final_len is not None:
            return "", True
        self.token_starts.append(len(self.text))
        new = self._decoder.decode(piece)
        if not new:
            return "", False
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += new
        if self.stops:
            hit_at, hit = -1, None
            for s in self.stops:
                i = self.text.find(s, start)
                if i != -1 and (hit_at == -1 or i < hit_at):
                    hit_at, hit = i, s
            if hit is not None:
                self.stop_hit = hit
                self.final_len = hit_at if self.trim_stop else hit_at + len(hit)
                out = self.text[self.emitted:self.final_len] if self.final_len > self.emitted else ""
                self.emitted = max(self.emitted, self.final_len)
                return out, True
        if self.banned and self.find_banned():
            return "", False  # the engine takes these tokens back
        return self.release(), False

    def release(self) -> str:
        """Hand out whatever can no longer turn into a stop string or a banned phrase."""
        safe = self._safe_end()
        if safe <= self.emitted:
            return ""
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out

    def flush(self) -> str:
        """End of generation: whatever is held back (an unfinished stop prefix, a cut UTF-8 tail) goes out."""
        if self.final_len is not None:
            return ""
        self.text += self._decoder.decode(b"", final=True)
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    @property
    def result_text(self) -> str:
        return self.text[: self.final_len] if self.final_len is not None else self.text
