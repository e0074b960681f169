"""llama.cpp model files: the backend's one-time set-up, loading a model, its metadata and its vocabulary. Shared by
the engine and the pooled-output contexts (embeddings, reranking)."""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Dict, List, Optional

import llama_cpp as L


class ModelLoadError(Exception):
    pass


_backend_lock = threading.Lock()
_backend_ready = False
LOG_CB = None  # llama.cpp's log callback (kept referenced; the projector takes it too)


def init_backend():
    global _backend_ready, LOG_CB
    with _backend_lock:
        if _backend_ready:
            return

        def log(level, text, user):  # keep llama.cpp quiet except for errors
            if level == 4 and text:
                try:
                    os.write(2, b"llama.cpp: " + text)
                except OSError:
                    pass

        LOG_CB = L.llama_log_callback(log)
        L.llama_log_set(LOG_CB, None)
        L.llama_backend_init()
        _backend_ready = True


def load_model(path: str, n_gpu_layers: int, use_mmap: bool, use_mlock: bool, on_progress=None):
    mp = L.llama_model_default_params()
    cb = None
    if on_progress is not None:
        def cb_fn(progress, user):
            try:
                return bool(on_progress(float(progress)))
            except Exception:
                return True
        cb = L.llama_progress_callback(cb_fn)  # kept referenced until the load returns
        mp.progress_callback = cb
    mp.n_gpu_layers = 999 if n_gpu_layers < 0 else n_gpu_layers
    mp.use_mmap = use_mmap
    mp.use_mlock = use_mlock
    # No CPU weight repacking: measured here it makes logits depend on batch shape (so a cached prefix or a
    # neighbour slot changed sampled text) and halved prompt speed (352 vs 686 tok/s); decode speed is equal.
    mp.use_extra_bufts = bool(os.environ.get('KCPP_REPACK'))
    model = L.llama_model_load_from_file(path.encode("utf-8"), mp)
    del cb
    if not model:
        raise ModelLoadError(f"llama.cpp could not load the model {path}")
    return model


def read_meta(model) -> Dict[str, str]:
    out = {}
    buf = ctypes.create_string_buffer(4096)
    for i in range(L.llama_model_meta_count(model)):
        if L.llama_model_meta_key_by_index(model, i, buf, len(buf)) < 0:
            continue
        key = buf.value.decode("utf-8", "replace")
        n = L.llama_model_meta_val_str_by_index(model, i, None, 0)
        if n < 0:
            continue
        vbuf = ctypes.create_string_buffer(n + 1)
        L.llama_model_meta_val_str_by_index(model, i, vbuf, n + 1)
        out[key] = vbuf.value.decode("utf-8", "replace")
    return out


POOLING = {"mean": L.LLAMA_POOLING_TYPE_MEAN, "cls": L.LLAMA_POOLING_TYPE_CLS, "last": L.LLAMA_POOLING_TYPE_LAST}


def pooling_of(meta: Dict[str, str]) -> str:
    """The pooling an embedding model was trained with ({arch}.pooling_type: 1 mean, 2 CLS, 3 last); models that
    name none (or none usable here: rank, which scores pairs) are mean-pooled."""
    v = meta.get(f"{meta.get('general.architecture', '')}.pooling_type")
    try:
        n = int(v) if v is not None else 1
    except ValueError:
        n = 1
    return {L.LLAMA_POOLING_TYPE_CLS: "cls", L.LLAMA_POOLING_TYPE_LAST: "last"}.get(n, "mean")


class Vocab:
    """Tokenizer helpers bound to one model (thread-safe: the vocab is read-only)."""

    def __init__(self, model):
        self.model = model
        self.vocab = L.llama_model_get_vocab(model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self._pieces: Dict[int, bytes] = {}
        self._pieces_special: Dict[int, bytes] = {}

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> List[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        while True:
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n

    def piece(self, tok: int, special: bool = False) -> bytes:
        cache = self._pieces_special if special else self._pieces
        p = cache.get(tok)
        if p is None:
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self.vocab, tok, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self.vocab, tok, buf, -n, 0, special)
            p = buf.raw[:max(n, 0)]
            cache[tok] = p
        return p

    def detokenize(self, ids: List[int], special: bool = False) -> str:
        return b"".join(self.piece(int(t), special) for t in ids if 0 <= int(t) < self.n_vocab).decode("utf-8", "replace")

    @functools.cached_property
    def _by_piece(self) -> Dict[bytes, int]:
        out: Dict[bytes, int] = {}
        for t in range(self.n_vocab):
            p = self.piece(t, True)
            if p and p not in out:
                out[p] = t
        return out

    def spell(self, data: bytes) -> Optional[List[int]]:
        """Token ids whose pieces are exactly `data` (longest piece first), or None. Unlike tokenize, no prefix
        space is added and any substring works: for feeding a grammar text that is already in the output."""
        table, out, i = self._by_piece, [], 0
        longest = 64
        while i < len(data):
            for n in range(min(longest, len(data) - i), 0, -1):
                t = table.get(data[i:i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                return None
        return out

