"""LoRA adapters (--lora FILE[:SCALE], per-request llama-server `lora` scales) on the tiny random llama with a random
rank-4 adapter written with the gguf writer: scale 0 gives exactly the base model's text, scale 1 differs, slots
with different adapter sets decoded side by side give what each gives alone, and bad input is refused."""
import subprocess
import sys

import numpy as np
import pytest

from gguf_loader.engine import Engine, EngineConfig, ModelLoadError
from gguf_loader.jobs import GenRequest, InvalidRequest, SamplingParams
from tests.support import KOBOLDCPP, ServerProcess, http
from tests.tinymodel import tiny_model_path, write_out

GREEDY = SamplingParams(temperature=0)
PROMPT = "hello world"


def write_tiny_lora(path, n_layers=2, n_embd=64, n_ff=128, rank=4, alpha=4.0, seed=1) -> str:
    """A random LoRA for tests/tinymodel.py's llama: attn_q and ffn_up of every block."""
    import gguf
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)
    for i in range(n_layers):  # numpy shapes are ggml's reversed: lora_a [n_in, rank], lora_b [rank, n_out]
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_a", rand(rank, n_embd))
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_b", rand(n_embd, rank))
        w.add_tensor(f"blk.{i}.ffn_up.weight.lora_a", rand(rank, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight.lora_b", rand(n_ff, rank))
    write_out(w)
    return str(path)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny-lora.gguf")


@pytest.fixture(scope="module")
def engines(lora):
    base = Engine(EngineConfig(tiny_model_path(), n_ctx=256, quiet=True))
    with_lora = Engine(EngineConfig(tiny_model_path(), n_ctx=256, n_slots=2, quiet=True, loras=[(lora, 1.0)]))
    yield base, with_lora
    base.close()
    with_lora.close()


def run(e, lora=None, prompt=PROMPT):
    return e.submit(GenRequest(prompt=prompt, max_length=16, sampling=GREEDY, lora=lora)).wait(60)


def test_scale_zero_is_the_base_model_and_scale_one_differs(engines):
    base, e = engines
    ref = run(base).text
    assert run(e, {0: 0.0}).text == ref
    one = run(e).text  # the adapter's own scale (1) when the request says nothing
    assert one != ref and run(e, {0: 1.0}).text == one
    assert run(e, {0: 0.5}).text not in (ref, one)
    # the cache of a prompt computed under another adapter set is not reused
    assert run(e, {0: 0.0}).text == ref and run(e).text == one


def test_slots_with_different_adapters_are_not_batched_together(engines):
    base, e = engines
    alone = {s: run(e, {0: s}, "The quick brown fox").text for s in (0.0, 1.0)}
    jobs = {s: e.submit(GenRequest(prompt="The quick brown fox", max_length=16, sampling=GREEDY, lora={0: s}))
            for s in (0.0, 1.0)}
    assert {s: j.wait(60).text for s, j in jobs.items()} == alone


def test_bad_adapters_and_ids_are_refused(engines, tmp_path):
    _, e = engines
    with pytest.raises(InvalidRequest, match="LoRA adapter id 3"):
        e.submit(GenRequest(prompt="x", max_length=4, lora={3: 1.0}))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a lora")
    with pytest.raises(ModelLoadError, match="LoRA"):
        Engine(EngineConfig(tiny_model_path(), n_ctx=256, loras=[(str(bad), 1.0)]))
    p = subprocess.run([sys.executable, str(KOBOLDCPP), "--skiplauncher", "--lora", str(tmp_path / "none.gguf")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--lora" in p.stderr and "not found" in p.stderr


def test_request_scales_over_http(lora, engines):
    base, e = engines
    ref, one = run(base).text, run(e).text
    with ServerProcess(tiny_model_path(), "--contextsize", "256", "--lora", f"{lora}:1") as s:
        def text(**extra):
            st, _, r = http("POST", s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 16,
                                                                 "temperature": 0, **extra})
            assert st == 200, r
            return r["choices"][0]["text"]
        assert text() == one
        assert text(lora=[{"id": 0, "scale": 0}]) == ref
        for bad in ([{"id": 1, "scale": 1}], [{"id": 0, "scale": "x"}], {"id": 0}, [{"id": 0, "scale": 1e9}]):
            st, _, r = http("POST", s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "lora": bad})
            assert st == 400 and r["error"]["param"] in ("lora", "lora id", "lora scale"), (bad, r)
