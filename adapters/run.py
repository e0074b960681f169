"""Running engine jobs for any route and dialect: submit with one error mapping, follow a job to its end while
checking for a vanished client at one interval, and abort the job whenever the follower stops early."""
from __future__ import annotations

import time
from typing import Callable, Iterator, List, Optional

from gguf_loader.jobs import Event, GenRequest, InvalidRequest, Job, QueueFull, Result

from .errors import ApiError, BadRequest, Busy

POLL_S = 0.25  # how often a waiting route looks for a client that hung up


class ClientGone(Exception):
    """The client closed its connection: the route stops and its job is aborted."""


class JobRunner:
    """`on_wait(job)` is called at every poll while a followed job sends nothing (queued, or processing its
    prompt): the HTTP layer writes keep-alive lines and prompt progress from it."""

    def __init__(self, engine, is_gone: Callable[[], bool] = lambda: False, poll: float = POLL_S,
                 on_wait: Optional[Callable[[Job], None]] = None):
        self.engine = engine
        self.is_gone = is_gone
        self.poll = poll
        self.on_wait = on_wait

    def progress(self, job: Job) -> Optional[dict]:
        """The job's prompt progress ({total, cache, processed, time_ms}), None while it is queued."""
        fn = getattr(self.engine, "job_progress", None)
        return fn(job) if fn else None

    def submit(self, req: GenRequest, wait_s: float = 0.0) -> Job:
        """Queue a job. A full queue is a 503 (retried for `wait_s` seconds: later choices of one request); a request
        that can never run (bad grammar, token ids outside the vocabulary, no room in the context) is a 400."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.engine.submit(req)
            except InvalidRequest as e:
                raise BadRequest(str(e))
            except QueueFull:
                if time.monotonic() >= deadline or self.is_gone():
                    raise Busy()
                time.sleep(0.2)

    def submit_all(self, requests: List[GenRequest]) -> List[Job]:
        """Every request queued together (the n choices or best_of candidates of one request), so they decode side
        by side in free slots and a shared prompt is processed once; later ones wait for room in a full queue."""
        jobs: List[Job] = []
        try:
            for i, req in enumerate(requests):
                jobs.append(self.submit(req, wait_s=600 if i else 0))
        except BaseException:
            for j in jobs:
                j.abort()
            raise
        return jobs

    def wait_all(self, jobs: List[Job]) -> List[Result]:
        try:
            return [self.wait(j) for j in jobs]
        finally:
            for j in jobs:
                if not j.finished.is_set():
                    j.abort()

    def follow(self, job: Job, live: bool = True) -> Iterator[Event]:
        """The job's "text" events, then its "done" event. Raises ClientGone when the client hangs up; the job is
        aborted if the follower is closed before the job ends. `live=False` (a reply sent whole) waits for the end
        and then hands over every event at once: a thread woken for each token of each request takes CPU from
        llama.cpp's threads, which wait for each other (8 clients: 8 wake-ups a step)."""
        last = time.monotonic()
        try:
            while not live and not job.finished.wait(self.poll):
                if self.on_wait is not None:
                    self.on_wait(job)
                if self.is_gone():
                    raise ClientGone()
            for ev in job.stream(poll=self.poll):
                if ev.kind != "idle":
                    yield ev
                    if ev.kind == "done":
                        return
                elif self.on_wait is not None:
                    self.on_wait(job)
                now = time.monotonic()
                if now - last >= self.poll:
                    last = now
                    if self.is_gone():
                        raise ClientGone()
        finally:
            if not job.finished.is_set():
                job.abort()

    def wait(self, job: Job) -> Result:
        for ev in self.follow(job, live=False):
            if ev.kind == "done":
                return ev.result
        raise ApiError("the job ended without a result")  # unreachable: follow always ends with "done"


def check(result: Result) -> Result:
    """A job that failed inside the engine (llama.cpp refused a decode) answers an error, not an empty reply."""
    if result.error:
        raise ApiError(f"generation failed: {result.error}", 500, "server_error")
    return result


def finish_reason(result: Result) -> str:
    """OpenAI and Ollama's reason: "length" when the token budget ran out, else "stop" (EOS, stop string, abort)."""
    return "length" if result.finish_reason == "length" else "stop"
