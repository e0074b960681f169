"""Incremental text out of token bytes: no broken UTF-8, no stop string (or its start) ever shown early."""
from __future__ import annotations

import codecs
from typing import List, Optional, Tuple


class TextStream:
    def __init__(self, stops: List[str], trim_stop: bool = True):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = [s for s in stops if s]
        self.trim_stop = trim_stop
        self._max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of self.text already handed out
        self.stop_hit: Optional[str] = None
        self.final_len: Optional[int] = None  # set once a stop string ends the text

    def _holdback(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        if not self.stops:
            return 0
        text = self.text
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, piece: bytes) -> Tuple[str, bool]:
        """Add a token's bytes. Returns (text that is now safe to show, whether a stop string was hit)."""
        if self.final_len is not None:
            return "", True
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
        safe = len(self.text) - self._holdback()
        if safe <= self.emitted:
            return "", False
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out, False

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
