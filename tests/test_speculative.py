"""--promptlookup: draft tokens copied from earlier in the context, verified in one decode; greedy text unchanged."""
import pytest

from gguf_loader.engine import Engine, EngineConfig
from gguf_loader.jobs import GenRequest, SamplingParams
from tests.support import bundled_model_path

TEXT = ("The old lighthouse stood on the rocks at the end of the harbour. Every night the keeper climbed the "
        "ninety steps, lit the lamp and watched the ships pass by until the sun came up over the sea.")
PROMPT = f"Copy the text exactly.\nText: {TEXT}\nCopy: {TEXT}\n\nText: {TEXT}\nCopy:"
GREEDY = SamplingParams(temperature=0)


def generate(look, prompt=PROMPT, n=48, **kw):
    e = Engine(EngineConfig(bundled_model_path(), n_ctx=1024, n_threads=2, n_slots=1, prompt_lookup=look,
                            quiet=True))
    try:
        e.submit(GenRequest(prompt=prompt, max_length=1, sampling=GREEDY)).wait(300)  # prompt cached for both
        d0 = e.counters["decodes"]
        r = e.submit(GenRequest(prompt=prompt, max_length=n, sampling=GREEDY, bypass_eos=True, **kw)).wait(300)
        return r, e.counters["decodes"] - d0, dict(e.counters)
    finally:
        e.close()


@pytest.fixture(scope="module")
def plain():
    return generate(0)


def test_greedy_text_identical_with_fewer_decodes(plain):
    ref, plain_decodes, _ = plain
    r, decodes, counters = generate(8)
    assert r.text == ref.text and r.completion_tokens == ref.completion_tokens == 48
    assert counters["draft_accepted"] > 20 and decodes < plain_decodes / 2, (decodes, plain_decodes, counters)
    # some drafts were wrong (the copy ends, the model goes on differently) and were dropped
    assert counters["drafted"] > counters["draft_accepted"], counters


def test_rejected_drafts_and_stop_strings_keep_the_text(plain):
    ref, _, _ = plain
    stop = ref.text.split()[5]
    a, _, _ = generate(0, stop=[stop], logprobs=True)
    b, _, counters = generate(8, stop=[stop], logprobs=True)
    assert a.text == b.text and a.finish_reason == b.finish_reason == "stop"
    assert [x.token for x in a.logprobs] == [x.token for x in b.logprobs]
    assert [round(x.logprob, 3) for x in a.logprobs] == pytest.approx([round(x.logprob, 3) for x in b.logprobs],
                                                                        abs=0.02)
    # a list the model extends: the text is still plain greedy's
    other = "List of rivers: the Seine, the Loire, the Rhine, the Danube, the Seine, the"
    c, _, _ = generate(0, prompt=other, n=16)
    d, _, counters = generate(8, prompt=other, n=16)
    assert c.text == d.text and counters["drafted"] > 0
