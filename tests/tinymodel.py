"""Tiny random-weight llama GGUF models for tests, plus deliberately broken GGUF files.

The weights are random, so the text is gibberish, but greedy decoding is deterministic and loading takes
milliseconds: good enough for API, streaming, batching and caching tests.
"""
from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

# A ChatML-style template, for tests that need a model with a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
FIM_REPO_TOKENS = ("<repo_name>", "<file_sep>")  # with fim="repo": project-level context (Qwen2.5-Coder style)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by but "
    "not what all were we when your can said there use an each which she do how their if will up other about out "
    "many then them these so some her would make like him into time has look two more write go see number no way "
    "could people my than first water been call who oil its now find long down day did get come made may part "
    "hello world story once upon a king dragon cat dog"
).split()


def _vocab():
    """SentencePiece-style vocab: <unk>, <s>, </s>, 256 byte-fallback tokens, then scored pieces."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581"]
    pieces += [ch for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\":;-()"]
    pieces += ["\u2581" + ch for ch in "abcdefghijklmnopqrstuvwxyz"]
    # Every prefix of a word, so SPM's pairwise merges can build the whole word.
    pieces += ["\u2581" + w[:k] for w in _WORDS for k in range(2, len(w) + 1)]
    seen = set(tokens)
    pieces = [p for p in dict.fromkeys(pieces) if p not in seen]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # Longer pieces score higher so the SPM merger prefers whole words.
    scores = [0.0] * (3 + 256) + [-1000.0 + 10.0 * len(p) - i * 0.001 for i, p in enumerate(pieces)]
    return tokens, scores, [int(t) for t in types]


def _add_vocab(w, tokens, scores, types):
    """The tiny SentencePiece vocabulary's tokenizer metadata: <s> adds BOS, </s> ends, <unk> unknown."""
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


def write_out(w):
    """Write a GGUFWriter's header, metadata and tensors, and close it (closing again is harmless)."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_blocks(w, rand, n_layers: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, qk_norm: bool = False):
    """The transformer blocks of a llama-style model (Qwen3 adds RMS norms on q and k)."""
    head_dim = n_embd // n_head
    ones = np.ones(n_embd, dtype=np.float32)
    for i in range(n_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones.copy())
        w.add_tensor(b + "attn_q.weight", rand(n_head * head_dim, n_embd))
        w.add_tensor(b + "attn_k.weight", rand(n_head_kv * head_dim, n_embd))
        w.add_tensor(b + "attn_v.weight", rand(n_head_kv * head_dim, n_embd))
        w.add_tensor(b + "attn_output.weight", rand(n_embd, n_head * head_dim))
        if qk_norm:
            w.add_tensor(b + "attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            w.add_tensor(b + "attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
        w.add_tensor(b + "ffn_norm.weight", ones.copy())
        w.add_tensor(b + "ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(b + "ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(b + "ffn_down.weight", rand(n_embd, n_ff))


def write_tiny_llama(path, n_embd: int = 64, n_layers: int = 2, n_ff: int = 128, n_head: int = 4,
                     n_head_kv: int = 2, n_ctx: int = 512, seed: int = 0, chat_template: str | None = None,
                     big: bool = False, name: str = "tiny-llama", fim=False) -> Path:
    """Write a random-weight llama GGUF (F32) to `path` and return it as a Path.

    big=True gives the timing-sized variant (n_embd 512, 8 layers, ff 1536, 8 heads / 4 kv heads, ctx >= 2048,
    about 100 MB) regardless of the size arguments. fim=True adds fill-in-the-middle control tokens
    (<fim_prefix>, <fim_suffix>, <fim_middle>) and names them in the tokenizer metadata; fim="repo" adds the
    repository-name and file-separator tokens too.
    """
    import gguf

    if big:
        n_embd, n_layers, n_ff, n_head, n_head_kv = 512, 8, 1536, 8, 4
        n_ctx = max(n_ctx, 2048)
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    head_dim = n_embd // n_head
    tokens, scores, types = _vocab()
    fim_ids = []
    if fim:
        for t in FIM_TOKENS + (FIM_REPO_TOKENS if fim == "repo" else ()):
            fim_ids.append(len(tokens))
            tokens.append(t)
            scores.append(0.0)
            types.append(int(gguf.TokenType.CONTROL))
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    try:
        w.add_name(name)
        w.add_context_length(n_ctx)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)  # llama.cpp refuses the file without it
        w.add_vocab_size(n_vocab)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_vocab(w, tokens, scores, types)
        w.add_add_eos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)
        for key, tid in zip((gguf.Keys.Tokenizer.FIM_PRE_ID, gguf.Keys.Tokenizer.FIM_SUF_ID,
                             gguf.Keys.Tokenizer.FIM_MID_ID, gguf.Keys.Tokenizer.FIM_REP_ID,
                             gguf.Keys.Tokenizer.FIM_SEP_ID), fim_ids):
            w.add_uint32(key, tid)

        w.add_tensor("token_embd.weight", rand(n_vocab, n_embd))
        w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor("output.weight", rand(n_vocab, n_embd))
        _add_blocks(w, rand, n_layers, n_embd, n_head, n_head_kv, n_ff)
        write_out(w)
    finally:
        w.close()
    return path


def write_tiny_reranker(path, n_embd: int = 64, n_layers: int = 2, n_ff: int = 128, n_head: int = 4,
                        n_head_kv: int = 2, n_ctx: int = 512, seed: int = 0) -> Path:
    """A random-weight Qwen3-style reranker GGUF: rank pooling on the last token, a two-label ("yes"/"no")
    classification head, the tiny SentencePiece vocabulary."""
    import gguf

    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "qwen3")
    try:
        w.add_name("tiny-reranker")
        w.add_context_length(n_ctx)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_pooling_type(gguf.PoolingType.RANK)
        w.add_classifier_output_labels(["yes", "no"])
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_vocab(w, tokens, scores, types)
        w.add_tensor("token_embd.weight", rand(n_vocab, n_embd, scale=1.0))
        w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor("cls.output.weight", rand(2, n_embd, scale=0.1))
        _add_blocks(w, rand, n_layers, n_embd, n_head, n_head_kv, n_ff, qk_norm=True)
        write_out(w)
    finally:
        w.close()
    return path


def _data_offset(path: Path) -> int:
    import gguf
    return int(gguf.GGUFReader(str(path)).data_offset)


def write_broken_models(directory) -> dict:
    """Write one broken "model" per failure case into `directory`; returns {case name: path}.

    Every path (including "missing", which is not created, and "directory", which is a folder) must make
    gguf_loader.inspect raise GGUFError.
    """
    import gguf

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    good = write_tiny_llama(d / "_good.gguf")
    raw = good.read_bytes()
    data_off = _data_offset(good)
    out = {}

    def put(name, data: bytes):
        p = d / f"{name}.gguf"
        p.write_bytes(data)
        out[name] = p

    out["missing"] = d / "missing.gguf"
    (d / "directory.gguf").mkdir(exist_ok=True)
    out["directory"] = d / "directory.gguf"
    put("empty", b"")
    put("not_gguf", b"This is a text file, not a model.\n" * 20)
    put("html_page", b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>nope</body></html>\n")
    put("too_short", b"GGU")
    put("bad_version", raw[:4] + struct.pack("<I", 99) + raw[8:])
    put("truncated_header", raw[:14])  # magic, version, half of the tensor count
    put("truncated_metadata", raw[:data_off // 2])
    put("truncated_tensor_data", raw[:data_off + (len(raw) - data_off) // 2])
    put("tensor_data_one_byte_short", raw[:-1])
    # A tensor type id that does not exist (the type field of the first tensor info record).
    r = gguf.GGUFReader(str(good))
    t0 = r.tensors[0].field
    type_off = t0.offset + sum(int(p.nbytes) for p in t0.parts[:4])
    bad = bytearray(raw)
    bad[type_off:type_off + 4] = struct.pack("<I", 9999)
    put("bad_tensor_type", bytes(bad))
    del r

    # Valid GGUF without general.architecture.
    p = d / "no_architecture.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    del w.kv_data[0][gguf.Keys.General.ARCHITECTURE]
    w.add_name("no arch")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    write_out(w)
    out["no_architecture"] = p

    # Valid GGUF with metadata only (as a vocab-only file would be), no tensors.
    p = d / "no_tensors.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_name("no tensors")
    w.add_context_length(128)
    write_out(w)
    out["no_tensors"] = p

    good.unlink()
    return out


_cache_dir: str | None = None
_cache: dict = {}


def tiny_model_path(**kwargs) -> str:
    """Path of a tiny model written once per process (per distinct kwargs) into a temp dir removed at exit."""
    global _cache_dir
    key = tuple(sorted(kwargs.items()))
    if key in _cache and os.path.exists(_cache[key]):
        return _cache[key]
    if _cache_dir is None:
        _cache_dir = tempfile.mkdtemp(prefix="kcpp-tiny-")
        atexit.register(shutil.rmtree, _cache_dir, True)
    path = Path(_cache_dir) / f"tiny-{len(_cache)}.gguf"
    write_tiny_llama(path, **kwargs)
    _cache[key] = str(path)
    return str(path)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a tiny random llama GGUF.")
    ap.add_argument("path")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chatml", action="store_true", help="embed a ChatML chat template")
    a = ap.parse_args()
    print(write_tiny_llama(a.path, seed=a.seed, big=a.big, chat_template=CHATML_TEMPLATE if a.chatml else None))
