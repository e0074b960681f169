"""Server-sent event framing shared by the streaming routes."""
from __future__ import annotations

import json

# headers every SSE response sends; the stream ends when the server closes the socket
SSE_HEADERS = (
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),  # stop reverse proxies (nginx) from buffering the stream
)


def event(data, name: str | None = None) -> bytes:
    """One SSE event: optional `event:` line, one `data:` line (JSON unless already a str), blank line."""
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {payload}\n\n".encode("utf-8")


def comment(text: str = "") -> bytes:
    """An SSE comment line; clients ignore it (keep-alive ping)."""
    return f": {text}\n\n".encode("utf-8")


KEEPALIVE = b": keep-alive\n\n"


def progress_event(progress: dict, envelope: dict | None = None, name: str | None = None) -> bytes:
    """llama-server's `return_progress`: a chunk carrying `prompt_progress` {total, cache, processed, time_ms}.
    With an OpenAI envelope (id, object, created, model) it is a chunk with no choices; else a named event."""
    body = {**envelope, "choices": [], "prompt_progress": progress} if envelope else {"prompt_progress": progress}
    return event(body, name)
