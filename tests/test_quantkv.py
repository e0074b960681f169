"""--quantkv: each KV cache type (f16, q8_0, q4_0) loads, generates and context-shifts on the bundled Gemma 3 270M;
a quantized cache without flash attention is refused with a clear message (engine and command line)."""
import subprocess
import sys

import pytest

from gguf_loader.engine import Engine, EngineConfig, ModelLoadError
from gguf_loader.jobs import GenRequest, SamplingParams
from tests.support import KOBOLDCPP, bundled_model_path

GREEDY = SamplingParams(temperature=0)
TURNS = [f"Turn {i}: the weather today is sunny and warm in city number {i}.\n" for i in range(15)]


def run(engine, **kw):
    job = engine.submit(GenRequest(**kw))
    assert job.finished.wait(120)
    assert job.result.error is None, job.result.error
    return job.result


@pytest.mark.parametrize("kv", [0, 1, 2])
def test_each_kv_type_generates_and_context_shifts(kv):
    e = Engine(EngineConfig(bundled_model_path(), n_ctx=512, n_threads=2, flash_attn=True, kv_type=kv,
                            quiet=True))
    try:
        assert e.kv_type_name == ("f16", "q8_0", "q4_0")[kv]
        r = run(e, prompt="The capital of France is", max_length=8, sampling=GREEDY)
        assert r.completion_tokens == 8 and r.text.strip(), r
        assert e.can_shift
        run(e, prompt="A log of the weather.\n" + "".join(TURNS[:12]), max_length=4, sampling=GREEDY)
        r = run(e, prompt="A log of the weather.\n" + "".join(TURNS[3:15]), max_length=4, sampling=GREEDY)
        assert r.prompt_tokens - r.cached_tokens < r.prompt_tokens / 3, (r.prompt_tokens, r.cached_tokens)
        assert r.completion_tokens == 4
    finally:
        e.close()


def test_quantized_kv_needs_flash_attention():
    with pytest.raises(ModelLoadError, match="flash attention"):
        Engine(EngineConfig(bundled_model_path(), n_ctx=256, kv_type=1))
    p = subprocess.run([sys.executable, str(KOBOLDCPP), "--quantkv", "2", "--skiplauncher", "--model", "x.gguf"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--flashattention" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, str(KOBOLDCPP), "--quantkv", "3"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--quantkv must be between 0 and 2" in p.stderr
