"""gguf_loader.inspect on real files: the tiny test model, the bundled Gemma model, and every broken case."""
import hashlib
import os
import random
import tempfile
import time
from pathlib import Path

import pytest

import gguf_loader
from gguf_loader import GGUFError, ModelInfo
from tests.support import bundled_model_path
from tests.tinymodel import CHATML_TEMPLATE, tiny_model_path, write_broken_models, write_tiny_llama


def test_tiny_model_metadata():
    path = tiny_model_path()
    assert tiny_model_path() == path  # written once per session
    info = gguf_loader.inspect(path)
    assert isinstance(info, ModelInfo)
    assert info.path == path and info.file_size == os.path.getsize(path)
    assert info.architecture == "llama" and info.name == "tiny-llama"
    assert info.context_length == 512 and info.n_layers == 2 and info.n_embd == 64
    assert info.quantization == "F32"
    assert info.bos_token_id == 1 and info.eos_token_id == 2
    assert info.chat_template is None and not info.has_chat_template
    # 571 tokens; embeddings + output (2 * vocab * 64), 2 norms per layer + output norm, 7 matrices per layer.
    n_vocab = info.n_vocab
    assert n_vocab > 259
    per_layer = 2 * 64 + 64 * 64 * 2 + 2 * (32 * 64) + 3 * 128 * 64
    assert info.n_params == 2 * n_vocab * 64 + 64 + 2 * per_layer
    assert info.metadata["llama.attention.head_count"] == 4
    assert "tokenizer.ggml.tokens" not in info.metadata  # big arrays are skipped
    assert all(not isinstance(v, list) or len(v) <= 256 for v in info.metadata.values())
    d = info.describe()
    assert "tiny-llama" in d and "F32" in d and "trained context 512" in d and "no chat template" in d


def test_chat_template_and_name_fallback(tmp_path):
    p = write_tiny_llama(tmp_path / "my-model.gguf", chat_template=CHATML_TEMPLATE, name="")
    info = gguf_loader.inspect(p)
    assert info.chat_template == CHATML_TEMPLATE and info.has_chat_template
    assert info.name == "my-model"  # general.name empty -> file name without .gguf
    assert "has a chat template" in info.describe()


def test_tiny_model_is_deterministic_fast_and_loads(tmp_path):
    t0 = time.perf_counter()
    a = write_tiny_llama(tmp_path / "a.gguf", seed=3)
    elapsed = time.perf_counter() - t0
    b = write_tiny_llama(tmp_path / "b.gguf", seed=3)
    c = write_tiny_llama(tmp_path / "c.gguf", seed=4)
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b) != digest(c)
    assert elapsed < 1.0, elapsed

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(a), n_ctx=256, verbose=False)
    # Byte fallback: any text, even emoji, tokenizes and round-trips.
    text = "Once upon a time, the dragon said: h\u00e9llo \U0001F600"
    ids = llm.tokenize(text.encode())
    assert llm.detokenize(ids).decode().strip() == text
    outs = [llm.create_completion("Once upon a time", max_tokens=6, temperature=0.0) for _ in range(2)]
    assert outs[0]["usage"]["completion_tokens"] >= 1
    assert outs[0]["choices"][0]["text"] == outs[1]["choices"][0]["text"]


def test_bundled_gemma_metadata():
    t0 = time.perf_counter()
    info = gguf_loader.inspect(bundled_model_path())
    # The stock GGUFReader needs ~10 s for Gemma's 262k-token vocabulary; ours skips it.
    assert time.perf_counter() - t0 < 3.0
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 32768
    assert info.n_vocab == 262144 and info.n_layers == 18 and info.n_embd == 640
    assert not info.has_chat_template
    assert info.bos_token_id == 2 and info.eos_token_id == 1
    assert 260_000_000 < info.n_params < 280_000_000
    assert info.file_size == os.path.getsize(info.path)
    d = info.describe()
    assert "Q4_K_M" in d and "253 MB" in d and "32768" in d and "no chat template" in d


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_broken_models(tmp_path_factory.mktemp("broken"))


EXPECTED_WORDS = {
    "missing": "not found",
    "directory": "directory",
    "empty": "empty",
    "not_gguf": "not a GGUF",
    "html_page": "web page",
    "too_short": "truncated",
    "bad_version": "version 99",
    "truncated_header": "truncated",
    "truncated_metadata": "truncated",
    "truncated_tensor_data": "truncated",
    "tensor_data_one_byte_short": "truncated",
    "bad_tensor_type": "unknown type",
    "no_architecture": "general.architecture",
    "no_tensors": "no tensors",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_WORDS))
def test_broken_file_gives_one_line_error(broken, case):
    path = broken[case]
    with pytest.raises(GGUFError) as ei:
        gguf_loader.inspect(path)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg
    assert EXPECTED_WORDS[case].lower() in msg.lower(), msg


def test_every_broken_case_is_covered(broken):
    assert set(broken) == set(EXPECTED_WORDS)


def test_unreadable_file():
    src = Path(tiny_model_path())
    gguf_loader.inspect(src)  # import gguf before any fork
    d = tempfile.mkdtemp(prefix="kcpp-perm-")
    try:
        os.chmod(d, 0o755)
        p = Path(d) / "locked.gguf"
        p.write_bytes(src.read_bytes())
        os.chmod(p, 0)
        if os.geteuid() != 0:
            with pytest.raises(GGUFError, match="permission denied") as ei:
                gguf_loader.inspect(p)
            assert str(p) in str(ei.value)
            return
        # Root reads anything: check as an unprivileged user in a forked child.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    gguf_loader.inspect(p)
                    out = "no error"
                except GGUFError as e:
                    out = "GGUFError:" + str(e)
                except BaseException as e:
                    out = f"{type(e).__name__}:{e}"
                os.write(w, out.encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        os.waitpid(pid, 0)
        assert out.startswith("GGUFError:") and "permission denied" in out and str(p) in out, out
    finally:
        for root, dirs, files in os.walk(d, topdown=False):
            for n in files:
                os.unlink(os.path.join(root, n))
        os.rmdir(d)


def test_random_corruption_only_raises_gguf_error(tmp_path):
    """Flipped bytes anywhere in the header/metadata: a result or a GGUFError, never another exception."""
    raw = Path(tiny_model_path()).read_bytes()
    rng = random.Random(7)
    p = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(4, 7000)] = rng.randrange(256)
        if rng.random() < 0.3:
            b = b[:rng.randrange(4, len(b))]
        p.write_bytes(bytes(b))
        try:
            gguf_loader.inspect(p)
            outcomes["ok"] += 1
        except GGUFError as e:
            assert str(p) in str(e) and "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 50


def test_package_import_needs_no_llama_cpp():
    import subprocess
    import sys
    code = ("import sys; sys.modules['llama_cpp'] = None; import gguf_loader, gguf_loader.bundled; "
            "print(gguf_loader.inspect.__name__)")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "inspect"
