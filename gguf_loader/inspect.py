"""Read a GGUF file's metadata (never its tensor data) and turn every way a file can be broken into one
clear GGUFError, so the server can refuse a bad model before llama.cpp crashes on it."""
from __future__ import annotations

import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional


class GGUFError(Exception):
    """A model file that cannot be used. str(e) is one line that names the file."""


# Arrays longer than this (token lists, scores, merges) are skipped, not decoded.
_SMALL_ARRAY = 256
_SUPPORTED_VERSIONS = (2, 3)


@dataclass
class ModelInfo:
    path: str
    file_size: int
    architecture: str
    name: str
    context_length: Optional[int] = None
    chat_template: Optional[str] = None
    quantization: str = "unknown"
    n_params: int = 0
    n_layers: Optional[int] = None
    n_embd: Optional[int] = None
    n_vocab: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    metadata: Dict[str, Any] = field(default_factory=dict, repr=False)
    gguf_version: int = 3
    n_tensors: int = 0

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template and self.chat_template.strip())

    def describe(self) -> str:
        arch = self.architecture.capitalize() if self.architecture else "?"
        lines = [f"{self.name} ({arch}, {_human_count(self.n_params)} parameters), {self.quantization}, "
                 f"{_human_bytes(self.file_size)}"]
        ctx = f"trained context {self.context_length}" if self.context_length else "trained context unknown"
        parts = [ctx]
        if self.n_layers:
            parts.append(f"{self.n_layers} layers")
        if self.n_vocab:
            parts.append(f"vocabulary {self.n_vocab}")
        parts.append("has a chat template" if self.has_chat_template else "no chat template")
        lines.append(", ".join(parts))
        return "\n".join(lines)


def _human_count(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.1f}{suffix}" if v < 10 else f"{v:.0f}{suffix}"
    return str(n)


def _human_bytes(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.0f} KB"
    return f"{n} byte" if n == 1 else f"{n} bytes"


class _Truncated(Exception):
    def __init__(self, offset: int):
        self.offset = offset


_reader_class = None


def _meta_reader_class():
    """A GGUFReader that stops at the end of the file, skips big arrays and never maps tensor data.

    Stock GGUFReader builds one numpy view per array element: about 10 s for a 262k-token vocabulary."""
    global _reader_class
    if _reader_class is not None:
        return _reader_class
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

    class _MetaReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + int(np.dtype(dtype).itemsize) * int(count)
            if end > len(self.data):
                raise _Truncated(int(offset))
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs, raw_type):
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype = GGUFValueType(raw_itype[0])
            n = int(alen[0])
            if n <= _SMALL_ARRAY or itype == GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            offs = orig_offs + 12
            size = len(self.data)
            if itype == GGUFValueType.STRING:
                buf = memoryview(self.data)
                fmt = "<Q" if (self.byte_order == "I") == (struct.pack("=I", 1) == struct.pack("<I", 1)) else ">Q"
                unpack = struct.Struct(fmt).unpack_from
                for _ in range(n):
                    if offs + 8 > size:
                        raise _Truncated(offs)
                    offs += 8 + unpack(buf, offs)[0]
                if offs > size:
                    raise _Truncated(size)
            else:
                nptype = self.gguf_scalar_to_np.get(itype)
                if nptype is None:
                    raise ValueError(f"unknown array element type {int(itype)}")
                offs += np.dtype(nptype).itemsize * n
                if offs > size:
                    raise _Truncated(size)
            # No data indexes: the elements were skipped, only the count (parts[1]) is kept.
            return offs - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, itype]

        def _build_tensors(self, start_offs, fields):
            tensors = []
            names = set()
            for f in fields:
                _nl, name_data, _nd, dims, raw_dtype, offset_tensor = f.parts
                name = bytes(name_data).decode("utf-8", "replace")
                if name in names:
                    raise ValueError(f"duplicate tensor {name!r}")
                names.add(name)
                try:
                    ttype = GGMLQuantizationType(int(raw_dtype[0]))
                    block, type_size = GGML_QUANT_SIZES[ttype]
                except (ValueError, KeyError):
                    raise ValueError(f"tensor {name!r} has unknown type {int(raw_dtype[0])} "
                                     f"(damaged file, or made for a newer llama.cpp)") from None
                n_elem = 1
                for d in dims.tolist():
                    n_elem *= int(d)
                tensors.append((name, ttype, [int(d) for d in dims.tolist()], n_elem,
                                n_elem * type_size // block, int(start_offs) + int(offset_tensor[0])))
            self.tensors = tensors

    _reader_class = _MetaReader
    return _MetaReader


def _value(f):
    """A ReaderField's value as plain Python, or None for a skipped big array."""
    from gguf import GGUFValueType

    def one(part, t):
        if t == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", "replace")
        v = part.tolist()[0]
        return bool(v) if t == GGUFValueType.BOOL else v

    if not f.types:
        return None
    if f.types[0] == GGUFValueType.ARRAY:
        if len(f.types) < 2:
            return []
        if not f.data and int(f.parts[4][0]) > 0:
            return None
        return [one(f.parts[i], f.types[-1]) for i in f.data]
    return one(f.parts[-1], f.types[0])


def _array_len(f) -> int:
    return int(f.parts[4][0])


def _quant_name(file_type, tensors) -> str:
    from gguf import LlamaFileType
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        try:
            ft = LlamaFileType(file_type)
            if ft != LlamaFileType.GUESSED:
                return ft.name.replace("MOSTLY_", "").replace("ALL_", "")
        except ValueError:
            pass
    # Weights only: the 1-D norm/bias tensors are F32 in every quantization.
    c = Counter()
    for _name, ttype, dims, n_elem, _nb, _off in tensors:
        if sum(1 for d in dims if d > 1) >= 2:
            c[ttype.name] += n_elem
    if not c:
        for t in tensors:
            c[t[1].name] += t[3]
    return c.most_common(1)[0][0] if c else "unknown"


def _sniff(head: bytes) -> str:
    """Why a file that does not start with the GGUF magic is not a GGUF, in words."""
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggmf", b"ggjt"):
        return "it is an old GGML-format model; convert it to GGUF or download a GGUF version"
    if head[:2] == b"PK":
        return "it is a zip archive (a PyTorch checkpoint?); download a .gguf file instead"
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
        return "it is a web page, not a model (the download probably failed)"
    if len(head) >= 9 and head[8:9] == b"{":
        return "it looks like a safetensors file; download a .gguf file instead"
    if low.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model itself; download the real file"
    return "it does not start with the GGUF magic bytes"


def inspect(path) -> ModelInfo:
    """Metadata of the GGUF model at `path`. Raises GGUFError (one line naming the file) if it is unusable."""
    p = Path(os.fspath(path)).expanduser()
    where = str(p)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise GGUFError(f"model file not found: {where}") from None
    except PermissionError:
        raise GGUFError(f"cannot read model file {where}: permission denied") from None
    except OSError as e:
        raise GGUFError(f"cannot read model file {where}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError(f"{where} is a directory, not a GGUF model file")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError(f"{where} is not a regular file")
    size = st.st_size
    if size == 0:
        raise GGUFError(f"model file {where} is empty (0 bytes)")
    try:
        with open(p, "rb") as fh:
            head = fh.read(64)
    except PermissionError:
        raise GGUFError(f"cannot read model file {where}: permission denied") from None
    except OSError as e:
        raise GGUFError(f"cannot read model file {where}: {e.strerror or e}") from None
    if head[:4] != b"GGUF":
        if len(head) < 4 and b"GGUF".startswith(head):
            raise GGUFError(f"model file {where} is truncated ({size} bytes; the GGUF header is cut off)")
        raise GGUFError(f"{where} is not a GGUF model file: {_sniff(head)}")
    if len(head) < 8:
        raise GGUFError(f"model file {where} is truncated ({size} bytes; the GGUF header is cut off)")
    version = struct.unpack("<I", head[4:8])[0]
    if version & 0xFFFF == 0:  # written on the other byte order
        version = struct.unpack(">I", head[4:8])[0]
    if version not in _SUPPORTED_VERSIONS:
        hint = "too old; re-convert the model" if version < 2 else "made by a newer tool than this program reads"
        raise GGUFError(f"model file {where} has unsupported GGUF version {version} ({hint})")

    try:
        reader = _meta_reader_class()(str(p), "r")
    except _Truncated as e:
        raise GGUFError(f"model file {where} is truncated or damaged: its metadata runs past the end of the "
                        f"file ({size} bytes, needed beyond offset {e.offset}); download it again") from None
    except PermissionError:
        raise GGUFError(f"cannot read model file {where}: permission denied") from None
    except OSError as e:
        raise GGUFError(f"cannot read model file {where}: {e.strerror or e}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the gguf package raises ValueError/KeyError/numpy errors on damaged files
        msg = " ".join(str(e).split()) or type(e).__name__
        raise GGUFError(f"model file {where} has damaged GGUF metadata: {msg}") from None

    try:
        return _build_info(reader, p, size, version)
    finally:
        del reader


def _build_info(reader, p: Path, size: int, version: int) -> ModelInfo:
    where = str(p)
    metadata: Dict[str, Any] = {}
    array_lens: Dict[str, int] = {}
    from gguf import GGUFValueType
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            array_lens[key] = _array_len(f)
        v = _value(f)
        if v is not None:
            metadata[key] = v

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch.strip():
        raise GGUFError(f"model file {where} has no general.architecture in its metadata; it is not a model "
                        f"llama.cpp can load")
    tensors = reader.tensors
    if not tensors:
        raise GGUFError(f"model file {where} contains no tensors (a vocabulary-only file?); it is not a "
                        f"model that can be loaded")
    end = max(off + nb for _n, _t, _d, _ne, nb, off in tensors)
    if end > size:
        missing = end - size
        raise GGUFError(f"model file {where} is truncated: its tensors need {end} bytes but the file has "
                        f"{size} ({_human_bytes(missing)} missing; an incomplete download?)")

    def num(key):
        v = metadata.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    n_vocab = array_lens.get("tokenizer.ggml.tokens") or num(f"{arch}.vocab_size")
    name = metadata.get("general.name")
    if not isinstance(name, str) or not name.strip():
        name = p.name[:-5] if p.name.lower().endswith(".gguf") else p.name
    tmpl = metadata.get("tokenizer.chat_template")
    return ModelInfo(
        path=where,
        file_size=size,
        architecture=arch,
        name=name.strip(),
        context_length=num(f"{arch}.context_length"),
        chat_template=tmpl if isinstance(tmpl, str) else None,
        quantization=_quant_name(metadata.get("general.file_type"), tensors),
        n_params=sum(t[3] for t in tensors),
        n_layers=num(f"{arch}.block_count"),
        n_embd=num(f"{arch}.embedding_length"),
        n_vocab=n_vocab,
        bos_token_id=num("tokenizer.ggml.bos_token_id"),
        eos_token_id=num("tokenizer.ggml.eos_token_id"),
        metadata=metadata,
        gguf_version=version,
        n_tensors=len(tensors),
    )


@dataclass
class ProjectorInfo:
    path: str
    projector_type: str
    vision: bool
    audio: bool
    projection_dim: Optional[int]

    def describe(self) -> str:
        what = " and ".join(k for k, on in (("images", self.vision), ("audio", self.audio)) if on) or "nothing"
        return f"projector {self.projector_type or '?'} for {what}, projecting to {self.projection_dim or '?'} dims"


def inspect_projector(path, n_embd: Optional[int] = None) -> ProjectorInfo:
    """Metadata of an mmproj file; GGUFError (one line) if it is not a projector or does not fit a model whose
    embeddings have `n_embd` dimensions."""
    info = inspect(path)
    md = info.metadata
    if info.architecture != "clip":
        raise GGUFError(f"{info.path} is not a vision/audio projector (mmproj) file: its architecture is "
                        f"'{info.architecture}' (a model?), expected 'clip'")
    ptype = md.get("clip.projector_type") or md.get("clip.vision.projector_type") or md.get("clip.audio.projector_type")
    vision = bool(md.get("clip.has_vision_encoder"))
    audio = bool(md.get("clip.has_audio_encoder"))
    if not (vision or audio):
        raise GGUFError(f"projector {info.path} has neither a vision nor an audio encoder")
    dims = [md.get(f"clip.{k}.projection_dim") for k in ("vision", "audio")]
    dims = [d for d in dims if isinstance(d, int) and not isinstance(d, bool)]
    if n_embd and dims and any(d != n_embd for d in dims):
        raise GGUFError(f"projector {info.path} projects to {dims[0]} dimensions but the model's embeddings have "
                        f"{n_embd}: it was made for another model")
    return ProjectorInfo(info.path, ptype if isinstance(ptype, str) else "", vision, audio, dims[0] if dims else None)
