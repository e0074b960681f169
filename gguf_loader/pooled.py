"""Whole-input pooled outputs, each on a one-sequence context of its own, run in the caller's thread under the
context's own lock (they never touch the generation context): embeddings (the main model, or --embeddingsmodel)
and reranking (--rerankmodel). Contexts are made on first use."""
from __future__ import annotations

import os
import threading
from typing import List, Optional

import numpy as np

import llama_cpp as L

from .jobs import InvalidRequest
from .llama_model import ModelLoadError, POOLING, Vocab, load_model, pooling_of, read_meta


def _context(model, pooling: int, n_ctx: int, n_threads: int) -> tuple:
    """A one-sequence context whose output is the pooled vector of a whole input. -> (context or None, its size in
    tokens: n_ctx, capped to what the model was trained for)"""
    n_train = L.llama_model_n_ctx_train(model)
    cp = L.llama_context_default_params()
    cp.n_ctx = min(n_ctx, n_train) if n_train > 0 else n_ctx
    cp.n_batch = cp.n_ctx
    cp.n_ubatch = cp.n_ctx
    cp.n_seq_max = 1
    cp.n_threads = n_threads
    cp.n_threads_batch = n_threads
    cp.embeddings = True
    cp.pooling_type = pooling
    cp.no_perf = True
    return L.llama_init_from_model(model, cp), cp.n_ctx


def _decode(ctx, batch, toks: List[int]):
    """Decode one whole input as sequence 0 (the context emptied first); -> the pointer to its pooled output (NULL
    when the model gave none), or None when llama.cpp refused the decode."""
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    batch.n_tokens = len(toks)
    for i, t in enumerate(toks):
        batch.token[i] = int(t)
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    if L.llama_decode(ctx, batch) != 0:
        return None
    return L.llama_get_embeddings_seq(ctx, 0)


class _Pooled:
    """One model's pooled context: `model_path` loads a model of its own (freed with the context), else `model`
    (the engine's) is used."""

    def __init__(self, model, model_path: Optional[str], n_ctx: int, n_threads: int, n_gpu_layers: int,
                 use_mmap: bool):
        self.lock = threading.Lock()
        self._main, self.path = model, model_path
        self._n_ctx, self._n_threads, self._ngl, self._mmap = n_ctx, n_threads, n_gpu_layers, use_mmap
        self.ctx = self.vocab = None
        self.own_model = None  # the model loaded from model_path (freed with the context)
        self.n_ctx = 0

    @property
    def name(self) -> Optional[str]:
        return os.path.splitext(os.path.basename(self.path))[0] if self.path else None

    def _pooling(self, model, meta) -> int:
        """The context's llama.cpp pooling type; may raise ModelLoadError for a model unfit for the job."""
        raise NotImplementedError

    def _open(self):
        """Make the context (lock held) unless it is made."""
        if self.ctx:
            return
        model = self._main
        if self.path:
            model = self.own_model = load_model(self.path, self._ngl, self._mmap, False)
        try:
            pooling = self._pooling(model, read_meta(model))
            ctx, self.n_ctx = _context(model, pooling, self._n_ctx, self._n_threads)
            if not ctx:
                raise ModelLoadError(f"llama.cpp could not create a context for {self.name or 'the model'}'s "
                                     f"pooled output")
        except BaseException:
            self._free_model()
            raise
        self.ctx, self.vocab = ctx, Vocab(model)

    def _run(self, inputs: List[List[int]], what: str, read) -> list:
        """read(pointer to its pooled output) for each token list, right after its decode (the next one overwrites
        the output). Lock held, context made."""
        batch = L.llama_batch_init(self.n_ctx, 0, 1)
        try:
            out = []
            for toks in inputs:
                ptr = _decode(self.ctx, batch, list(toks)[:self.n_ctx] or [0])
                if ptr is None:
                    raise RuntimeError(f"llama.cpp failed to compute {what}")
                out.append(read(ptr))
            return out
        finally:
            L.llama_batch_free(batch)

    def close(self):
        with self.lock:
            if self.ctx:
                L.llama_free(self.ctx)
                self.ctx = None
            self._free_model()

    def _free_model(self):
        if self.own_model:
            L.llama_model_free(self.own_model)
            self.own_model = None


class Embedder(_Pooled):
    """L2-normalised embeddings, pooled as the model was trained (mean, CLS or last)."""

    pooling = "mean"  # what the model was trained with, known once the context is made

    def _pooling(self, model, meta) -> int:
        self.pooling = pooling_of(meta)
        self.dim = L.llama_model_n_embd(model)
        return POOLING[self.pooling]

    def limits(self) -> tuple:
        """(tokens per input, vocabulary size)."""
        with self.lock:
            self._open()
            return self.n_ctx, self.vocab.n_vocab

    def tokenize(self, text: str) -> List[int]:
        with self.lock:
            self._open()
            return self.vocab.tokenize(text, True, False)

    def embed(self, inputs: List[List[int]]) -> List[List[float]]:
        """One vector per token list; lists longer than the context are cut. Raises InvalidRequest for token ids
        outside the vocabulary."""
        with self.lock:
            self._open()
            n_vocab = self.vocab.n_vocab
            for toks in inputs:
                bad = [t for t in toks if not (isinstance(t, int) and 0 <= t < n_vocab)]
                if bad:
                    raise InvalidRequest(f"token id {bad[0]!r} is outside the vocabulary (0..{n_vocab - 1})")
            return self._run(inputs, "the embedding", self._vector)

    def _vector(self, ptr) -> List[float]:
        v = np.array(np.ctypeslib.as_array(ptr, shape=(self.dim,)), dtype=np.float64)
        n = np.linalg.norm(v)
        return (v / n if n > 0 else v).tolist()


class Reranker(_Pooled):
    """Relevance scores of (query, document) pairs from a rank-pooling model (bge-reranker, Qwen3-Reranker)."""

    def _pooling(self, model, meta) -> int:
        if meta.get(meta.get("general.architecture", "") + ".pooling_type") != str(L.LLAMA_POOLING_TYPE_RANK):
            raise ModelLoadError(f"{self.path} is not a reranker: its GGUF does not declare rank pooling (use a "
                                 f"reranker such as bge-reranker-v2-m3 or Qwen3-Reranker)")
        self.template = meta.get("tokenizer.chat_template.rerank")
        return L.LLAMA_POOLING_TYPE_RANK

    def load(self):
        """Load now (start-up), so a bad file is reported before the server answers."""
        with self.lock:
            self._ensure()

    def _ensure(self):
        if not self.path:
            raise ModelLoadError("no reranking model is loaded (start with --rerankmodel FILE)")
        self._open()

    def _tokens(self, query: str, doc: str) -> List[int]:
        """One pair's input: the model's own rerank template when its GGUF carries one, else
        [BOS] query [EOS] [SEP] document [EOS] (tokens the vocabulary lacks are left out), as llama-server."""
        v = self.vocab
        if self.template:
            text = self.template.replace("{query}", query).replace("{document}", doc)
            return v.tokenize(text, add_bos=bool(L.llama_vocab_get_add_bos(v.vocab)), special=True)
        bos, eos, sep = (L.llama_vocab_bos(v.vocab), L.llama_vocab_eos(v.vocab), L.llama_vocab_sep(v.vocab))
        out = [t for t in (bos,) if t >= 0]
        out += v.tokenize(query, add_bos=False, special=False)
        out += [t for t in (eos, sep) if t >= 0]
        out += v.tokenize(doc, add_bos=False, special=False)
        out += [t for t in (eos,) if t >= 0]
        return out

    def rerank(self, query: str, documents: List[str]) -> tuple:
        """-> (one relevance score per document, tokens read). Pairs longer than the context are cut at the end."""
        with self.lock:
            self._ensure()
            pairs = [self._tokens(query, doc)[:self.n_ctx] or [0] for doc in documents]
            scores = self._run(pairs, "a document's score", self._score)
            return scores, sum(len(t) for t in pairs)

    @staticmethod
    def _score(ptr) -> float:
        if not ptr:
            raise RuntimeError("the reranking model gave no score (is it a reranker?)")
        return float(ptr[0])
