"""n choices decoded side by side: the prompt is processed once and its cache copied to the other slots."""
import pytest

from gguf_loader.engine import Engine, EngineConfig
from gguf_loader.jobs import GenRequest, SamplingParams
from tests.support import ServerProcess, bundled_model_path, http

PROMPT = "The history of the city of Paris begins with a small fishing village on an island in the river. " * 6


def sampled(seed):
    return SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=seed)


@pytest.fixture(scope="module")
def gemma4():
    e = Engine(EngineConfig(bundled_model_path(), n_ctx=1024, n_threads=2, n_slots=4))
    yield e
    e.close()


def test_n_choices_process_the_prompt_once(gemma4):
    e = gemma4
    n_prompt = len(e.tokenize(PROMPT))
    before = dict(e.counters)
    jobs = [e.submit(GenRequest(prompt=PROMPT, max_length=12, sampling=sampled(7 + i), bypass_eos=True))
            for i in range(4)]
    together = [j.wait(120) for j in jobs]
    decoded = e.counters["prompt_decoded"] - before["prompt_decoded"]
    copied = e.counters["prompt_copied"] - before["prompt_copied"]
    # once the whole prompt, then the last prompt token of each other choice (it gives that choice's logits)
    assert decoded == n_prompt + 3, (decoded, n_prompt)
    assert copied == 3 * (n_prompt - 1)
    assert [r.cached_tokens for r in together[1:]] == [n_prompt - 1] * 3
    assert len({r.text for r in together}) > 1  # four different seeds
    # each choice is the text its seed gives alone, with a cold cache
    e2 = Engine(EngineConfig(bundled_model_path(), n_ctx=1024, n_threads=2, n_slots=1, fastforward=False))
    try:
        for i in (0, 3):
            alone = e2.submit(GenRequest(prompt=PROMPT, max_length=12, sampling=sampled(7 + i),
                                         bypass_eos=True)).wait(120)
            assert alone.text == together[i].text
    finally:
        e2.close()


def test_short_prompts_arriving_together_start_generating_together(gemma4):
    """Prompts waiting at the same step are all prefilled in it (each in a decode of its own), so their first tokens
    share one decode instead of joining one step apart; each text is still what its prompt gives alone."""
    e = gemma4
    prompts = [f"Request {i} {e.counters['decodes']}: a short story about a cat named {name}."
               for i, name in enumerate(("Tom", "Mia", "Leo", "Ada"))]
    greedy = SamplingParams(temperature=0)
    before = e.counters["decodes"]
    with e._lock:  # the engine thread sees all four at its next step
        jobs = [e.submit(GenRequest(prompt=p, max_length=10, sampling=greedy, bypass_eos=True)) for p in prompts]
    together = [j.wait(120).text for j in jobs]
    # four prefills, then 10 decodes of four rows (the last prompt tokens, then 9 generated tokens)
    assert e.counters["decodes"] - before == 4 + 10
    alone = [e.submit(GenRequest(prompt=p, max_length=10, sampling=greedy, bypass_eos=True)).wait(120).text
             for p in prompts]
    assert together == alone


def test_new_prompts_take_slots_next_to_the_busy_ones():
    """Split KV streams: llama.cpp decodes a batch in one pass only over consecutive sequence ids, so a request
    with nothing cached goes next to the busy slots (not to the least recently used one); a long cached prefix
    still wins."""
    e = Engine(EngineConfig(bundled_model_path(), n_ctx=512, n_threads=2, n_slots=6))
    greedy = SamplingParams(temperature=0)

    def run(prompt, n=2):
        return e.submit(GenRequest(prompt=prompt, max_length=n, sampling=greedy, bypass_eos=True))

    def holder(prompt):
        toks = e.tokenize(prompt)
        return [s.seq for s in e.slots if s.cache[:len(toks)] == toks]

    try:
        firsts = ["Apples", "Bridges", "Clouds", "Dragons", "Engines", "Forests"]
        prompts = [f"{w} are the topic of this long text, written to fill the cache with many tokens. " * 5
                   for w in firsts]
        for p in prompts:  # one per slot, in slot order
            run(p).wait(60)
        assert [holder(p) for p in prompts] == [[i] for i in range(6)]
        run(prompts[1]).wait(60)  # slot 1 is now the most recently used
        slow = run("Zebras: count from one to forty.", 40)  # the least recently used: slot 0
        assert slow.started.wait(60)
        new = "Quiet questions about quails."
        run(new).wait(60)
        assert holder(new) == [1]  # next to slot 0 (least recently used would be slot 2)
        back = prompts[4] + " And then?"
        run(back).wait(60)
        assert holder(back) == [4]  # its cached prefix
        slow.abort()
    finally:
        e.close()


def test_a_choice_aborted_while_waiting_for_the_copy_leaves_the_others_alone(gemma4):
    e = gemma4
    p = "A different prompt about the rivers of Europe and their bridges. " * 8
    jobs = [e.submit(GenRequest(prompt=p, max_length=8, sampling=sampled(i), bypass_eos=True)) for i in range(3)]
    jobs[0].abort()  # the slot the others wait for
    res = [j.wait(120) for j in jobs]
    assert res[0].finish_reason == "abort"
    assert all(r.finish_reason == "length" and r.completion_tokens == 8 for r in res[1:])


def test_n4_over_http_shares_the_prompt_and_keeps_each_seeds_text():
    """Speed is measured by bench/throughput.py (timing asserts would be flaky on the shared test machine)."""
    with ServerProcess(bundled_model_path(), "--parallelrequests", "4", "--contextsize", "1024",
                       "--threads", "2") as srv:
        def ask(n):
            body = {"prompt": PROMPT, "max_tokens": 8, "n": n, "seed": 11, "temperature": 1.0,
                    "bypass_eos": True}
            st, _, out = http("POST", srv.url + "/v1/completions", body)
            assert st == 200, out
            return out
        one = ask(1)
        four = ask(4)
        assert [c["index"] for c in four["choices"]] == [0, 1, 2, 3]
        assert four["choices"][0]["text"] == one["choices"][0]["text"]  # seed 11 alone or beside others
        assert len({c["text"] for c in four["choices"]}) > 1
        assert four["usage"]["completion_tokens"] == 4 * 8
        assert four["usage"]["prompt_tokens_details"]["cached_tokens"] >= four["usage"]["prompt_tokens"] - 1


def test_fast_first_token_saves_a_decode():
    """--fastfirsttoken: a new prompt's first token comes from one llama_decode instead of two."""
    for fast, decodes in ((False, 2), (True, 1)):
        e = Engine(EngineConfig(bundled_model_path(), n_ctx=512, n_threads=2, n_slots=2, fast_first_token=fast))
        try:
            before = e.counters["decodes"]
            r = e.submit(GenRequest(prompt="The capital of France is", max_length=1,
                                    sampling=SamplingParams(temperature=0))).wait(120)
            assert r.completion_tokens == 1 and r.text.strip()
            assert e.counters["decodes"] - before == decodes
            r = e.submit(GenRequest(prompt="Once upon a time, in a land far away,", max_length=6,
                                    sampling=SamplingParams(temperature=0))).wait(120)
            assert r.completion_tokens == 6
        finally:
            e.close()
