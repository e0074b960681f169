"""A tiny random-weight vision projector (`clip` GGUF, projector type gemma3) for the bundled Gemma 3 270M.

llama.cpp's gemma3 projector is a SigLIP-style ViT (patch embedding, position embedding, pre-norm blocks, post
norm), then an average pool by `scale_factor` per side, an RMS norm scaled by `mm.soft_emb_norm.weight` and a
linear projection to the text model's embedding size. With the defaults below a 128x128 image is 16x16 patches,
pooled to 8x8 = 64 image tokens. Outputs are gibberish; token counts, caching and errors are what tests check.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from tests.tinymodel import write_out


def _add_encoder(wr, w, prefix: str, n_layers: int, hidden: int, ffn: int, no_bias=()):
    """Pre-norm transformer blocks and the post norm of a ViT / Whisper-style tower (`v` or `a` tensors); the
    projections named in `no_bias` have no bias."""
    for i in range(n_layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                            ("attn_out", (hidden, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            wr.add_tensor(f"{prefix}.blk.{i}.{name}.weight", w(*shape))
            if name not in no_bias:
                wr.add_tensor(f"{prefix}.blk.{i}.{name}.bias", w(shape[0]))
        for ln in ("ln1", "ln2"):
            wr.add_tensor(f"{prefix}.blk.{i}.{ln}.weight", np.ones(hidden, np.float32))
            wr.add_tensor(f"{prefix}.blk.{i}.{ln}.bias", np.zeros(hidden, np.float32))
    wr.add_tensor(f"{prefix}.post_ln.weight", np.ones(hidden, np.float32))
    wr.add_tensor(f"{prefix}.post_ln.bias", np.zeros(hidden, np.float32))


def write_mmproj(path, n_embd_text: int = 640, *, hidden: int = 64, n_layers: int = 2, n_heads: int = 2,
                 ffn: int = 128, image_size: int = 128, patch: int = 8, scale: int = 2, seed: int = 0,
                 projector_type: str = "gemma3") -> str:
    import gguf

    rng = np.random.default_rng(seed)

    def w(*shape, scale_=0.05):
        return (rng.standard_normal(shape) * scale_).astype(np.float32)

    n_pos = (image_size // patch) ** 2
    wr = gguf.GGUFWriter(str(path), "clip")
    wr.add_string("general.name", "tiny-mmproj")
    wr.add_string("clip.projector_type", projector_type)
    wr.add_bool("clip.has_vision_encoder", True)
    wr.add_bool("clip.has_text_encoder", False)
    wr.add_uint32("clip.vision.image_size", image_size)
    wr.add_uint32("clip.vision.patch_size", patch)
    wr.add_uint32("clip.vision.embedding_length", hidden)
    wr.add_uint32("clip.vision.feed_forward_length", ffn)
    wr.add_uint32("clip.vision.projection_dim", n_embd_text)
    wr.add_uint32("clip.vision.block_count", n_layers)
    wr.add_uint32("clip.vision.attention.head_count", n_heads)
    wr.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    wr.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    wr.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    wr.add_bool("clip.use_gelu", True)
    wr.add_uint32("clip.vision.projector.scale_factor", scale)

    # numpy shapes are (rows, cols): the writer stores them reversed, as ggml's ne order expects
    wr.add_tensor("v.patch_embd.weight", w(hidden, 3, patch, patch))
    wr.add_tensor("v.patch_embd.bias", w(hidden))
    wr.add_tensor("v.position_embd.weight", w(n_pos, hidden))
    _add_encoder(wr, w, "v", n_layers, hidden, ffn)
    wr.add_tensor("mm.input_projection.weight", w(hidden, n_embd_text))
    wr.add_tensor("mm.soft_emb_norm.weight", np.ones(hidden, np.float32))
    write_out(wr)
    return str(path)


def write_audio_mmproj(path, n_embd_text: int = 640, *, hidden: int = 32, n_layers: int = 1, n_heads: int = 2,
                       ffn: int = 64, n_mel: int = 128, seed: int = 0) -> str:
    """A tiny Whisper-style audio encoder with a `qwen2a` projection (llama.cpp decodes WAV/MP3/FLAC, computes
    the log-mel itself and pads each clip to a 30 s window: 3000 frames -> 1500 positions -> 750 audio tokens)."""
    import gguf

    rng = np.random.default_rng(seed)

    def w(*shape, scale_=0.05):
        return (rng.standard_normal(shape) * scale_).astype(np.float32)

    wr = gguf.GGUFWriter(str(path), "clip")
    wr.add_string("general.name", "tiny-audio-mmproj")
    wr.add_string("clip.projector_type", "qwen2a")
    wr.add_bool("clip.has_audio_encoder", True)
    wr.add_bool("clip.has_vision_encoder", False)
    wr.add_uint32("clip.audio.num_mel_bins", n_mel)
    wr.add_uint32("clip.audio.embedding_length", hidden)
    wr.add_uint32("clip.audio.feed_forward_length", ffn)
    wr.add_uint32("clip.audio.projection_dim", n_embd_text)
    wr.add_uint32("clip.audio.block_count", n_layers)
    wr.add_uint32("clip.audio.attention.head_count", n_heads)
    wr.add_float32("clip.audio.attention.layer_norm_epsilon", 1e-5)
    wr.add_bool("clip.use_gelu", True)
    wr.add_tensor("a.conv1d.1.weight", w(hidden, n_mel, 3))
    wr.add_tensor("a.conv1d.1.bias", w(hidden, 1))
    wr.add_tensor("a.conv1d.2.weight", w(hidden, hidden, 3))
    wr.add_tensor("a.conv1d.2.bias", w(hidden, 1))
    wr.add_tensor("a.position_embd.weight", w(1500, hidden))
    _add_encoder(wr, w, "a", n_layers, hidden, ffn, no_bias=("attn_k",))
    wr.add_tensor("mm.a.fc.weight", w(n_embd_text, hidden))
    wr.add_tensor("mm.a.fc.bias", w(n_embd_text))
    write_out(wr)
    return str(path)


def tiny_audio_mmproj(n_embd_text: int = 640) -> str:
    d = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / f"kcpp-mmproj-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"tiny-audio-{n_embd_text}.gguf"
    if not p.exists():
        write_audio_mmproj(p, n_embd_text)
    return str(p)


def wav_bytes(seconds: float = 0.5, rate: int = 16000, seed: int = 0) -> bytes:
    """A mono 16-bit WAV of noise."""
    import io
    import wave
    rng = np.random.default_rng(seed)
    pcm = (rng.standard_normal(int(seconds * rate)) * 3000).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm)
    return buf.getvalue()


def image_tokens(image_size: int = 128, patch: int = 8, scale: int = 2) -> int:
    """Image tokens the defaults give per image (llama.cpp resizes every image to image_size)."""
    return (image_size // patch // scale) ** 2


def tiny_mmproj(n_embd_text: int = 640, **kw) -> str:
    """A projector file in a temp dir (cached per process and settings)."""
    key = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
    d = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / f"kcpp-mmproj-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"tiny-{n_embd_text}{key}.gguf"
    if not p.exists():
        write_mmproj(p, n_embd_text, **kw)
    return str(p)


def png_bytes(w: int = 32, h: int = 24, seed: int = 1) -> bytes:
    """A small random RGB PNG, written with zlib only (no imaging library needed)."""
    import struct
    import zlib
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
