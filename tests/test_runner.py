"""adapters/run.py JobRunner: how a route follows a job (no model: the engine side is played by a thread)."""
import threading
import time

import pytest

from adapters.run import ClientGone, JobRunner
from gguf_loader.jobs import GenRequest, Job, Result


def _produce(job, n, gap):
    for i in range(n):
        time.sleep(gap)
        job.emit_text(f"t{i} ")
    job.finish(Result(text=job.text_so_far, finish_reason="length", stop_reason=0, prompt_tokens=1,
                      completion_tokens=n))


@pytest.mark.parametrize("live", [True, False])
def test_follow_live_gets_each_token_as_it_comes_and_whole_replies_wait_for_the_end(live):
    job = Job(GenRequest())
    threading.Thread(target=_produce, args=(job, 5, 0.05), daemon=True).start()
    seen = []  # (event kind, job finished when the follower got it)
    for ev in JobRunner(None, poll=0.02).follow(job, live=live):
        seen.append((ev.kind, job.finished.is_set()))
    assert [k for k, _ in seen] == ["text"] * 5 + ["done"]
    if live:
        assert not seen[0][1]  # the first token arrived while the job was still running
    else:
        assert all(done for _, done in seen)  # one wake-up at the end, not one per token


def test_a_whole_reply_still_notices_a_client_that_hung_up_and_aborts_the_job():
    job = Job(GenRequest())
    gone = threading.Event()
    threading.Timer(0.1, gone.set).start()
    with pytest.raises(ClientGone):
        JobRunner(None, is_gone=gone.is_set, poll=0.02).wait(job)
    assert job.aborted.is_set()
