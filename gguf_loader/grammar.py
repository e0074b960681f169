"""GBNF grammars are checked here before llama.cpp sees them: its parser recurses once per nesting level and
segfaults the whole process on deep input (measured: ~20,000 nested groups, 40 KB, on an HTTP thread's stack).

So a grammar is bounded in size and group nesting first, and llama.cpp parses it only on a thread with a large
stack (the engine thread is started the same way, for matching).
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

MAX_GRAMMAR_BYTES = 256 * 1024
MAX_GRAMMAR_DEPTH = 256  # nested ( ) groups; grammars converted from JSON schemas use under 20
BIG_STACK = 256 * 1024 * 1024  # virtual; only the pages a deep parse touches are ever committed

T = TypeVar("T")
_stack_lock = threading.Lock()


class GrammarError(ValueError):
    pass


def nesting_depth(text: str) -> int:
    """Deepest ( ) nesting outside string literals, character classes and comments."""
    depth = best = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "(":
            depth += 1
            best = max(best, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return best


def check(text: str):
    """Raise GrammarError if the grammar is too large or too deeply nested to hand to llama.cpp."""
    size = len(text.encode("utf-8", "replace"))
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted")
    depth = nesting_depth(text)
    if depth > MAX_GRAMMAR_DEPTH:
        raise GrammarError(f"the grammar nests groups {depth} levels deep; at most {MAX_GRAMMAR_DEPTH} are accepted")


def start_thread(target: Callable, name: str) -> threading.Thread:
    """A daemon thread with a large stack (for llama.cpp's recursive grammar code)."""
    with _stack_lock:
        old = threading.stack_size(BIG_STACK)
        try:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
        finally:
            threading.stack_size(old)
    return t


def on_big_stack(fn: Callable[[], T]) -> T:
    """Run fn() on a fresh large-stack thread and return its result (or raise its exception)."""
    box = {}

    def run():
        try:
            box["v"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            box["e"] = e

    start_thread(run, "grammar").join()
    if "e" in box:
        raise box["e"]
    return box["v"]
