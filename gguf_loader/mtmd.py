"""llama.cpp's multimodal library (libmtmd) for the engine: a projector file turns an image or audio clip into
embeddings that are decoded into a slot's own sequence like prompt tokens.

Thread use: `tokenize` (image preprocessing) and `encode` (the vision/audio tower) take the projector's lock and
run outside the engine thread; `decode` runs on the engine thread (it only reads the projector's settings)."""
from __future__ import annotations

import ctypes
import threading
from typing import List, Tuple, Union

import numpy as np

import llama_cpp as L

from .jobs import InvalidRequest, Media


class ProjectorError(Exception):
    """A projector file that cannot be used (one line naming the file)."""


_TEXT, _IMAGE, _AUDIO = 0, 1, 2


class MediaChunk:
    """One image's or audio clip's embedding slot in a prompt: an owned mtmd chunk plus its identity."""

    def __init__(self, M, ptr, kind: str, key: str):
        self._M = M
        self.ptr = ptr
        self.kind = kind
        self.key = key
        self.n_tokens = int(M.mtmd_input_chunk_get_n_tokens(ptr))
        self.n_pos = int(M.mtmd_input_chunk_get_n_pos(ptr))
        # 40 bits of the hash: the engine's stand-in token ids for this chunk (see engine._pseudo)
        self.ident = int(key[:10], 16) if key else 0

    def __del__(self):
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            try:
                self._M.mtmd_input_chunk_free(ptr)
            except Exception:  # interpreter shutdown
                pass


Piece = Union[List[int], MediaChunk]


class Projector:
    def __init__(self, path: str, model, n_threads: int, use_gpu: bool = False, log_cb=None):
        try:
            import llama_cpp.mtmd_cpp as M
        except (ImportError, OSError) as e:
            raise ProjectorError(f"this llama-cpp-python has no multimodal library (libmtmd): {e}") from None
        self.M = M
        if log_cb is not None:
            M.mtmd_helper_log_set(log_cb, None)
            M.mtmd_log_set(log_cb, None)
        p = M.mtmd_context_params_default()
        p.use_gpu = bool(use_gpu)
        p.n_threads = max(1, n_threads)
        p.print_timings = False
        self.ctx = M.mtmd_init_from_file(path.encode("utf-8"), model, p)
        if not self.ctx:
            raise ProjectorError(f"llama.cpp could not load the projector {path} (see the llama.cpp error above; "
                                 f"is it the mmproj file made for this model?)")
        self.path = path
        self.vision = bool(M.mtmd_support_vision(self.ctx))
        self.audio = bool(M.mtmd_support_audio(self.ctx))
        self.mrope = bool(M.mtmd_decode_use_mrope(self.ctx))
        self.marker = M.mtmd_get_marker(self.ctx) or M.mtmd_default_marker()
        self.n_embd = int(L.llama_model_n_embd_inp(model))
        self.lock = threading.Lock()

    def close(self):
        with self.lock:
            if self.ctx:
                self.M.mtmd_free(self.ctx)
                self.ctx = None

    def tokenize(self, media: Media, special: bool = True) -> List[Piece]:
        """One media item -> its pieces: text token lists (the projector's wrapper, e.g. <start_of_image>) and
        the media chunk. Raises InvalidRequest for media this projector cannot take."""
        M = self.M
        if media.kind == "image" and not self.vision:
            raise InvalidRequest("an image was given, but the loaded projector only takes audio")
        if media.kind == "audio" and not self.audio:
            raise InvalidRequest("audio was given, but the loaded projector only takes images (vision)")
        with self.lock:
            if media.kind == "image":
                n = media.width * media.height * 3
                if media.width <= 0 or media.height <= 0 or len(media.data) != n:
                    raise InvalidRequest("an image's pixel data does not match its size")
                buf = (ctypes.c_uint8 * n).from_buffer_copy(media.data)
                bm = M.mtmd_bitmap_init(media.width, media.height, buf)
            else:
                buf = (ctypes.c_uint8 * len(media.data)).from_buffer_copy(media.data)
                bm = M.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(media.data), False)
            if not bm:
                raise InvalidRequest(f"the {media.kind} could not be decoded by llama.cpp")
            chunks = M.mtmd_input_chunks_init()
            try:
                M.mtmd_bitmap_set_id(bm, media.key.encode("ascii"))
                text = M.mtmd_input_text()
                text.text = self.marker
                text.text_len = len(self.marker)
                text.add_special = False
                text.parse_special = special
                arr = (ctypes.c_void_p * 1)(bm)
                rc = M.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), arr, 1)
                if rc != 0:
                    raise InvalidRequest(f"llama.cpp could not prepare the {media.kind} (error {rc})")
                out: List[Piece] = []
                for i in range(M.mtmd_input_chunks_size(chunks)):
                    c = M.mtmd_input_chunks_get(chunks, i)
                    if M.mtmd_input_chunk_get_type(c) == _TEXT:
                        n_tok = ctypes.c_size_t()
                        ptr = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n_tok))
                        out.append([int(t) for t in ptr[:n_tok.value]])
                    else:
                        out.append(MediaChunk(M, M.mtmd_input_chunk_copy(c), media.kind, media.key))
                return out
            finally:
                M.mtmd_input_chunks_free(chunks)
                M.mtmd_bitmap_free(bm)

    def non_causal(self, chunk: MediaChunk) -> bool:
        return bool(self.M.mtmd_decode_use_non_causal(self.ctx, chunk.ptr))

    def encode(self, chunk: MediaChunk) -> np.ndarray:
        """The chunk's embeddings (n_tokens x n_embd float32), computed by the projector's tower."""
        with self.lock:
            rc = self.M.mtmd_encode_chunk(self.ctx, chunk.ptr)
            if rc != 0:
                raise RuntimeError(f"the projector failed to encode the {chunk.kind} (error {rc})")
            ptr = self.M.mtmd_get_output_embd(self.ctx)
            return np.ctypeslib.as_array(ptr, shape=(chunk.n_tokens * self.n_embd,)).copy()

    def decode(self, lctx, chunk: MediaChunk, embd: np.ndarray, n_past: int, seq: int, n_batch: int) -> int:
        """Decode encoded embeddings into sequence `seq` at position n_past (non-causal attention and M-RoPE
        positions as llama.cpp's helper does them). -> llama.cpp's status (0 = done)."""
        new_n_past = L.llama_pos(0)
        data = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        return int(self.M.mtmd_helper_decode_image_chunk(self.ctx, lctx, chunk.ptr, data, n_past, seq, n_batch,
                                                         ctypes.byref(new_n_past), self.M.mtmd_helper_post_decode_callback(),
                                                         None))


def caps(path: str) -> Tuple[bool, bool]:
    """(vision, audio) of a projector file without loading it."""
    import llama_cpp.mtmd_cpp as M
    c = M.mtmd_get_cap_from_file(path.encode("utf-8"))
    return bool(c.inp_vision), bool(c.inp_audio)
