"""The engine: one thread owns the llama.cpp model and context and runs every generation.

HTTP threads `submit()` a GenRequest and read Events from the returned Job. The context holds N sequences (slots);
each step puts the next token of every generating slot and a chunk of any pending prompt into one llama_batch and
decodes it once (continuous batching). A new job takes the idle slot whose cached tokens share the longest prefix
with its prompt, so only the new suffix is decoded (FastForward).
"""
from __future__ import annotations

import ctypes
import functools
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

import llama_cpp as L

from . import grammar as gbnf
from .jobs import (Event, GenRequest, InvalidRequest, Job, QueueFull, Result, TokenLogprob,  # noqa: F401 (re-exported)
                   token_budget)
from .sampling import SamplerChain
from .textstream import TextStream


class ModelLoadError(Exception):
    pass


@dataclass
class EngineConfig:
    model_path: str
    n_ctx: int = 8192
    n_threads: int = 2
    n_batch: int = 512
    n_gpu_layers: int = 0
    flash_attn: bool = False
    use_mmap: bool = False
    use_mlock: bool = False
    n_slots: int = 1
    max_queue: int = 6
    fastforward: bool = True
    contextshift: bool = True
    quiet: bool = False
    embedding_model_path: Optional[str] = None
    smartcache: int = 0  # conversations kept in host memory when their slot is taken over (0: off)
    smartcache_mb: int = 1024  # and at most this many MiB of them
    fast_first_token: bool = False  # decode the last prompt token with the prompt (faster, not reproducible)
    prompt_lookup: int = 0  # > 0: draft this many tokens from earlier context for greedy requests (speculative)


_backend_lock = threading.Lock()
_backend_ready = False
_LOG_CB = None


def _init_backend():
    global _backend_ready, _LOG_CB
    with _backend_lock:
        if _backend_ready:
            return

        def log(level, text, user):  # keep llama.cpp quiet except for errors
            if level == 4 and text:
                try:
                    os.write(2, b"llama.cpp: " + text)
                except OSError:
                    pass

        _LOG_CB = L.llama_log_callback(log)
        L.llama_log_set(_LOG_CB, None)
        L.llama_backend_init()
        _backend_ready = True


def _load_model(path: str, n_gpu_layers: int, use_mmap: bool, use_mlock: bool):
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 999 if n_gpu_layers < 0 else n_gpu_layers
    mp.use_mmap = use_mmap
    mp.use_mlock = use_mlock
    # No CPU weight repacking: measured here it makes logits depend on batch shape (so a cached prefix or a
    # neighbour slot changed sampled text) and halved prompt speed (352 vs 686 tok/s); decode speed is equal.
    mp.use_extra_bufts = bool(os.environ.get('KCPP_REPACK'))
    model = L.llama_model_load_from_file(path.encode("utf-8"), mp)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load the model {path}")
    return model


def _meta(model) -> Dict[str, str]:
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


class _Vocab:
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


class _Slot:
    def __init__(self, seq_id: int):
        self.seq = seq_id
        self.cache: List[int] = []  # tokens whose K/V sit in this sequence
        self.shifted_at: Optional[int] = None  # cache entries from here on were moved by ContextShift
        self.job: Optional[Job] = None
        self.last_used = 0.0
        self.reset_job()

    def reset_job(self):
        self.prompt: List[int] = []
        self.n_prompt_done = 0
        self.sampler: Optional[SamplerChain] = None
        self.pending: Optional[int] = None  # sampled token not yet decoded
        self.generated: List[int] = []
        self.stream: Optional[TextStream] = None
        self.logprobs: List[TokenLogprob] = []
        self.max_new = 0
        self.seed = 0
        self.t_start = 0.0
        self.t_first = 0.0
        self.cached = 0
        self.bans: Dict[int, set] = {}  # generated position -> tokens banned there (phrase bans)
        self.backtracks = 0
        self.donor: Optional["_Slot"] = None  # a slot whose prefill this one waits for, to copy its cache
        self.donor_job: Optional[Job] = None
        self.donate_n = 0
        self.token_lps: List[float] = []  # GenRequest.score: each generated token's log-probability
        self.beams: Optional[List[_Beam]] = None  # beam search, on the job's first slot
        self.helpers: List["_Slot"] = []  # the job's other slots (one sequence per beam)
        self.beam_of: Optional["_Slot"] = None  # on a helper: the slot driving its beam search
        self.finished_beams: List[tuple] = []  # (normalised score, raw score, tokens, text)
        self.draft: List[int] = []  # --promptlookup: draft tokens in the current decode

    @property
    def prefilling(self) -> bool:
        """Prompt tokens before the last one still to decode (the last is decoded with the generated ones)."""
        return self.job is not None and self.donor is None and self.n_prompt_done < len(self.prompt) - 1


@dataclass
class _Beam:
    slot: "_Slot"
    tokens: List[int]
    score: float  # summed log-probability
    next_tok: int  # to decode at this beam's next step


@dataclass
class _Saved:
    """A sequence's KV state kept in host memory (SmartCache)."""
    tokens: List[int]
    data: bytes
    used: float


class Engine:
    def __init__(self, cfg: EngineConfig):
        _init_backend()
        self.cfg = cfg
        self.model_path = cfg.model_path
        self.model_name = os.path.splitext(os.path.basename(cfg.model_path))[0]
        t0 = time.monotonic()
        self.model = _load_model(cfg.model_path, cfg.n_gpu_layers, cfg.use_mmap, cfg.use_mlock)
        self.load_time = time.monotonic() - t0
        self.tok = _Vocab(self.model)
        self.vocab = self.tok.vocab
        self.n_vocab = self.tok.n_vocab
        self.metadata = _meta(self.model)
        self.chat_template = self.metadata.get("tokenizer.chat_template")
        self.n_ctx_train = L.llama_model_n_ctx_train(self.model)
        self.n_ctx = max(256, min(cfg.n_ctx, self.n_ctx_train)) if self.n_ctx_train > 0 else cfg.n_ctx
        self.n_slots = max(1, cfg.n_slots)
        self.n_batch = max(16, cfg.n_batch)

        cp = L.llama_context_default_params()
        cp.n_ctx = self.n_ctx * self.n_slots
        cp.n_batch = self.n_batch
        cp.n_ubatch = self.n_batch
        cp.n_seq_max = self.n_slots
        cp.n_threads = cfg.n_threads
        cp.n_threads_batch = cfg.n_threads
        # Off unless asked: measured here, flash attention made row results depend more on batch shape.
        cp.flash_attn_type = 1 if cfg.flash_attn else 0
        cp.no_perf = True
        cp.swa_full = True  # keep the whole window of SWA layers so cached prefixes stay reusable
        cp.kv_unified = False  # each slot gets its own n_ctx
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise ModelLoadError(f"llama.cpp could not create a context of {cp.n_ctx} tokens for {cfg.model_path}")
        self.mem = L.llama_get_memory(self.ctx)
        self.can_shift = bool(L.llama_memory_can_shift(self.mem))
        if cfg.contextshift and cfg.fastforward and not self.can_shift:
            print("ContextShift: this model's cache cannot be shifted; trimmed chats are reprocessed instead.",
                  flush=True)
        self.batch = L.llama_batch_init(max(self.n_batch, self.n_slots), 0, 1)

        self.slots = [_Slot(i) for i in range(self.n_slots)]
        self._lock = threading.Condition()
        self._waiting: List[Job] = []
        self._running: List[Job] = []
        self._stop = False
        self._embed_lock = threading.Lock()
        self._embed_ctx = None
        self._embed_model = None
        self._embed_vocab = None

        self.started_at = time.time()
        self.idle_since = time.time()
        self.total_gens = 0
        self.last_result: Optional[Result] = None
        self.last_genkey = ""
        # tokens decoded from prompts, copied between slots, restored from the SmartCache (tests and /perf)
        self.counters = {"prompt_decoded": 0, "prompt_copied": 0, "prompt_restored": 0, "saved": 0, "restored": 0,
                         "decodes": 0, "drafted": 0, "draft_accepted": 0}
        self._saved: List[_Saved] = []  # SmartCache, engine thread only

        self._thread = gbnf.start_thread(self._loop, "engine")  # llama.cpp's grammar matching recurses

    # ---------- public API (any thread) ----------

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> List[int]:
        return self.tok.tokenize(text, add_bos, special)

    def detokenize(self, ids: List[int], special: bool = False) -> str:
        return self.tok.detokenize(ids, special)

    def validate(self, req: GenRequest):
        """Raise InvalidRequest for what can never run, before the request takes a place in the queue: token ids
        outside the vocabulary, a generation length with no room for a prompt, a grammar llama.cpp refuses."""
        if isinstance(req.prompt, list):
            bad = [t for t in req.prompt if not (isinstance(t, int) and 0 <= t < self.n_vocab)]
            if bad:
                raise InvalidRequest(f"token id {bad[0]!r} is outside the vocabulary (0..{self.n_vocab - 1})")
        self.budget(req)
        if req.beams > self.n_slots:
            raise InvalidRequest(f"beam search of width {req.beams} needs as many parallel slots; this server has "
                                 f"{self.n_slots} (--parallelrequests)")
        if req.beams and (req.sampling.grammar or req.banned_phrases):
            raise InvalidRequest("beam search cannot be combined with a grammar or banned phrases")
        if req.beams < 0 or req.beams > 32:
            raise InvalidRequest("the beam width must be between 1 and 32")
        if req.sampling.grammar:
            self.check_grammar(req.sampling.grammar)

    def check_grammar(self, text: str):
        try:
            gbnf.check(text)
        except gbnf.GrammarError as e:
            raise InvalidRequest(str(e))

        def parse():
            g = L.llama_sampler_init_grammar(self.vocab, text.encode("utf-8", "replace"), b"root")
            if g:
                L.llama_sampler_free(g)
            return bool(g)
        if not gbnf.on_big_stack(parse):
            raise InvalidRequest("the grammar could not be parsed (GBNF with a 'root' rule expected)")

    @functools.cached_property
    def eog_ids(self) -> List[int]:
        """Every end-of-generation token (a scan of the vocabulary: 0.1 s on 262k tokens, so only when asked)."""
        return [t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t)]

    def submit(self, req: GenRequest) -> Job:
        """Queue a generation. Raises InvalidRequest or QueueFull; never blocks."""
        self.validate(req)
        job = Job(req)
        with self._lock:
            if self._stop:
                raise QueueFull("the engine is shutting down")
            free = self.n_slots - len(self._running)
            if len(self._waiting) >= free + self.cfg.max_queue:
                raise QueueFull("Server is busy; please try again later.")
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def jobs(self) -> List[Job]:
        with self._lock:
            return list(self._running) + list(self._waiting)

    def queue_length(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._running or self._waiting)

    def perf(self) -> dict:
        """Counters about the last generation and the queue (dialect-neutral; the routes shape them)."""
        r = self.last_result
        with self._lock:
            q, idle = len(self._waiting), not (self._running or self._waiting)
        now = time.time()
        return {
            "last_prompt_tokens": r.prompt_tokens if r else 0,
            "last_cached_tokens": r.cached_tokens if r else 0,
            "last_completion_tokens": r.completion_tokens if r else 0,
            "last_process_time": r.process_time if r else 0.0,
            "last_eval_time": r.eval_time if r else 0.0,
            "last_seed": r.seed if r else 0,
            "last_stop_reason": r.stop_reason if r else -1,
            "total_gens": self.total_gens,
            "queue": q,
            "idle": 1 if idle else 0,
            "uptime": round(now - self.started_at, 2),
            "idletime": round(now - self.idle_since, 2) if idle else 0,
        }

    def close(self):
        with self._lock:
            self._stop = True
            for j in self._waiting + self._running:
                j.abort()
            self._lock.notify_all()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            return  # the engine thread is stuck in llama.cpp; leave the memory to the OS
        for s in self.slots:
            if s.sampler:
                s.sampler.close()
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
        with self._embed_lock:
            if self._embed_ctx:
                L.llama_free(self._embed_ctx)
                self._embed_ctx = None
            if self._embed_model:
                L.llama_model_free(self._embed_model)
                self._embed_model = None

    # ---------- embeddings (own context, caller's thread) ----------

    @property
    def embed_model_name(self) -> Optional[str]:
        """The --embeddingsmodel file's name (None: the main model embeds)."""
        p = self.cfg.embedding_model_path
        return os.path.splitext(os.path.basename(p))[0] if p else None

    def embed_limits(self) -> tuple:
        """(tokens per input, vocabulary size) of the embedding model."""
        with self._embed_lock:
            self._ensure_embed_ctx()
            return self._embed_nctx, self._embed_vocab.n_vocab

    def embed_tokenize(self, text: str) -> List[int]:
        with self._embed_lock:
            self._ensure_embed_ctx()
            return self._embed_vocab.tokenize(text, True, False)

    def _ensure_embed_ctx(self):
        if self._embed_ctx:
            return
        model = self.model
        if self.cfg.embedding_model_path:
            self._embed_model = _load_model(self.cfg.embedding_model_path, self.cfg.n_gpu_layers, self.cfg.use_mmap, False)
            model = self._embed_model
        n_train = L.llama_model_n_ctx_train(model)
        cp = L.llama_context_default_params()
        cp.n_ctx = min(self.n_ctx, n_train) if n_train > 0 else self.n_ctx
        cp.n_batch = cp.n_ctx
        cp.n_ubatch = cp.n_ctx
        cp.n_seq_max = 1
        cp.n_threads = self.cfg.n_threads
        cp.n_threads_batch = self.cfg.n_threads
        cp.embeddings = True
        cp.pooling_type = 1  # mean
        cp.no_perf = True
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise ModelLoadError("llama.cpp could not create an embeddings context")
        self._embed_ctx = ctx
        self._embed_vocab = _Vocab(model)
        self._embed_nctx = cp.n_ctx
        self._embed_dim = L.llama_model_n_embd(model)

    def embed(self, inputs: List[List[int]]) -> List[List[float]]:
        """One mean-pooled, L2-normalised vector per token list (lists longer than the context are cut).
        Raises InvalidRequest for token ids outside the embedding model's vocabulary."""
        out = []
        with self._embed_lock:
            self._ensure_embed_ctx()
            n_vocab = self._embed_vocab.n_vocab
            for toks in inputs:
                bad = [t for t in toks if not (isinstance(t, int) and 0 <= t < n_vocab)]
                if bad:
                    raise InvalidRequest(f"token id {bad[0]!r} is outside the vocabulary (0..{n_vocab - 1})")
            ctx = self._embed_ctx
            mem = L.llama_get_memory(ctx)
            batch = L.llama_batch_init(self._embed_nctx, 0, 1)
            try:
                for toks in inputs:
                    toks = list(toks)[: self._embed_nctx] or [0]
                    L.llama_memory_clear(mem, True)
                    batch.n_tokens = len(toks)
                    for i, t in enumerate(toks):
                        batch.token[i] = int(t)
                        batch.pos[i] = i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = 1
                    if L.llama_decode(ctx, batch) != 0:
                        raise RuntimeError("llama.cpp failed to compute the embedding")
                    ptr = L.llama_get_embeddings_seq(ctx, 0)
                    v = np.array(np.ctypeslib.as_array(ptr, shape=(self._embed_dim,)), dtype=np.float64)
                    n = np.linalg.norm(v)
                    out.append((v / n if n > 0 else v).tolist())
            finally:
                L.llama_batch_free(batch)
        return out

    # ---------- engine thread ----------

    def _loop(self):
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not any(s.job for s in self.slots):
                    self._lock.wait()
                if self._stop and not any(s.job for s in self.slots):
                    for j in self._waiting:
                        j.finish(self._result_for_unstarted(j))
                    self._waiting.clear()
                    return
                self._assign_waiting()
            try:
                self._step()
            except Exception as e:  # a failed step ends the jobs in it, never the engine
                import traceback
                traceback.print_exc()
                for s in self.slots:
                    if s.job:
                        self._finish(s, "stop", -1, error=f"generation failed: {e}")

    def _result_for_unstarted(self, job: Job) -> Result:
        return Result(text="", finish_reason="abort", stop_reason=-1, prompt_tokens=0, completion_tokens=0)

    def _assign_waiting(self):
        """Move waiting jobs into free slots (called with the lock held)."""
        while self._waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            if len(free) < max(1, self._waiting[0].request.beams) and not self._waiting[0].aborted.is_set():
                return  # a beam search waits for its slots (first come, first served)
            job = self._waiting.pop(0)
            if job.aborted.is_set():
                job.finish(self._result_for_unstarted(job))
                continue
            try:
                prompt = self._build_prompt(job.request)
                _, max_new = self.budget(job.request)
            except Exception as e:
                job.finish(Result(text="", finish_reason="stop", stop_reason=-1, prompt_tokens=0,
                                  completion_tokens=0, error=str(e)))
                continue
            slot = max(free, key=lambda s: (self._common_prefix(s.cache, prompt), -s.last_used))
            self._running.append(job)
            try:
                self._start(slot, job, prompt, max_new)
                if job.request.beams:
                    self._start_beams(slot, [s for s in free if s is not slot][:job.request.beams - 1])
            except Exception as e:
                self._running.remove(job)
                slot.job = None
                job.finish(Result(text="", finish_reason="stop", stop_reason=-1, prompt_tokens=len(prompt),
                                  completion_tokens=0, error=str(e)))

    @staticmethod
    def _common_prefix(a: List[int], b: List[int]) -> int:
        n = min(len(a), len(b))
        if n == 0:
            return 0
        aa = np.asarray(a[:n], dtype=np.int64)
        bb = np.asarray(b[:n], dtype=np.int64)
        diff = np.flatnonzero(aa != bb)
        return int(diff[0]) if len(diff) else n

    def budget(self, req: GenRequest) -> tuple:
        """(context, tokens to generate) for a request: jobs.token_budget on this engine's context."""
        return token_budget(self.n_ctx, req.max_context_length, req.max_length)

    def _build_prompt(self, req: GenRequest) -> List[int]:
        """The prompt tokens, trimmed from the front to fit the budget, keeping BOS and memory; memory and prompt
        are tokenized as one text when they fit."""
        n_ctx, max_new = self.budget(req)
        special = req.tokenize_special
        if isinstance(req.prompt, list):  # ids were checked by validate()
            bos, mem, body = [], self.tokenize(req.memory, False, special) if req.memory else [], list(req.prompt)
        else:
            add_bos = req.add_bos and L.llama_vocab_get_add_bos(self.vocab)
            bos = [L.llama_vocab_bos(self.vocab)] if add_bos else []
            text = req.memory + req.prompt
            whole = self.tokenize(text, add_bos=False, special=special) if text else []
            mem, body = [], whole
            if req.memory and len(bos) + len(whole) > n_ctx - max_new:
                mem = self.tokenize(req.memory, add_bos=False, special=special)
                body = self.tokenize(req.prompt, add_bos=False, special=special) if req.prompt else []
        room = n_ctx - max_new - len(bos)
        if len(mem) > room:
            mem = mem[len(mem) - room:] if room > 0 else []
        room -= len(mem)
        if len(body) > room:
            body = body[len(body) - room:] if room > 0 else []
        prompt = bos + mem + body
        if not prompt:  # an empty prompt still needs one token to start from
            prompt = [L.llama_vocab_bos(self.vocab)]
        return prompt

    def _start(self, slot: _Slot, job: Job, prompt: List[int], max_new: int):
        req = job.request
        slot.reset_job()
        slot.job = job
        slot.prompt = prompt
        slot.t_start = time.monotonic()
        slot.max_new = max_new
        seed = req.sampling.seed
        slot.seed = seed if seed is not None and seed >= 0 else random.randint(0, 2**31 - 1)
        slot.stream = TextStream(req.stop, req.trim_stop, req.banned_phrases)
        slot.sampler = self._new_chain(slot)

        keep = self._common_prefix(slot.cache, prompt) if self.cfg.fastforward else 0
        if keep >= len(prompt):
            keep = len(prompt) - 1  # re-decode the last prompt token to get fresh logits
        if self.cfg.fastforward:
            keep = self._borrow(slot, prompt, keep)
        if slot.donor is not None:  # the cache comes from another slot at the next step
            job.started.set()
            return
        # Entries moved by ContextShift differ slightly from freshly computed ones. The request that shifts uses
        # them, and so may a request at the context's edge (the next turn of a long chat); any other request
        # reprocesses from the first moved entry, so it gets exactly a cold run's text (README, "Reproducible").
        at_edge = len(slot.cache) + len(prompt) - keep + max_new > self.budget(req)[0]  # the client's context
        shifted = keep
        if self.cfg.fastforward and self.cfg.contextshift and self.can_shift:
            shifted = self._context_shift(slot, prompt, keep)
        if shifted > keep:
            slot.shifted_at = keep if slot.shifted_at is None else min(keep, slot.shifted_at)
            keep = shifted
        elif slot.shifted_at is not None and keep > slot.shifted_at and not at_edge:
            keep = slot.shifted_at
        if keep < len(slot.cache):
            self._save(slot, keep)
            if not L.llama_memory_seq_rm(self.mem, slot.seq, keep, -1):
                L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                keep = 0
            del slot.cache[keep:]
        if slot.shifted_at is not None and slot.shifted_at >= len(slot.cache):
            slot.shifted_at = None
        slot.n_prompt_done = keep
        slot.cached = keep
        job.started.set()

    # ---------- prefixes held elsewhere: other slots (copied) and the SmartCache (restored) ----------

    _MIN_BORROW = 16  # tokens a copy or a restore must gain over the slot's own cache
    _MIN_SAVE = 64  # tokens a slot must be about to lose for the SmartCache to keep them

    def _borrow(self, slot: _Slot, prompt: List[int], keep: int) -> int:
        """A longer prefix of `prompt` held elsewhere than in `slot`'s own cache: another slot's cache (copied with
        llama_memory_seq_cp at the next step, after waiting for that slot's prefill when it is still processing
        the same prompt: the n choices of one request), or a SmartCache entry restored into `slot` now.
        -> the tokens of `slot`'s cache kept (0 while a copy is pending)."""
        limit = len(prompt) - 1
        best, best_n = None, keep + self._MIN_BORROW - 1
        for d in self.slots:
            if d is slot or d.donor is not None:
                continue
            n = self._common_prefix(d.cache, prompt)
            if d.prefilling:
                n = max(n, self._common_prefix(d.prompt, prompt))
            n = min(n, limit, d.shifted_at if d.shifted_at is not None else n)
            if n > best_n:
                best, best_n = d, n
        entry = None
        for e in self._saved:
            n = min(self._common_prefix(e.tokens, prompt), limit)
            if n > best_n:
                entry, best_n = e, n
        if best is None and entry is None:
            return keep
        self._save(slot, 0)
        L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        slot.cache, slot.shifted_at = [], None
        if entry is not None:
            return self._restore(slot, entry, best_n)
        slot.donor, slot.donor_job, slot.donate_n = best, best.job, best_n
        return 0

    def _take_donation(self, s: _Slot):
        """Copy the donor's cache into `s` once it holds the promised prefix (engine thread, at the top of a step:
        the copy itself happens at the next llama_decode, which this step always makes)."""
        d = s.donor
        if d.job is not None and d.job is s.donor_job and d.prefilling and d.n_prompt_done < s.donate_n:
            return  # still prefilling: wait
        n = min(s.donate_n, self._common_prefix(d.cache, s.prompt))
        if d.shifted_at is not None:
            n = min(n, d.shifted_at)
        s.donor = s.donor_job = None
        if n >= self._MIN_BORROW:
            L.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
            L.llama_memory_seq_cp(self.mem, d.seq, s.seq, -1, -1)  # whole sequences only across streams
            L.llama_memory_seq_rm(self.mem, s.seq, n, -1)
            s.cache = d.cache[:n]
            self.counters["prompt_copied"] += n
        else:
            n = 0
        s.n_prompt_done = s.cached = n

    def _save(self, slot: _Slot, keep: int):
        """Keep the slot's cache in host memory before it loses the tokens from `keep` on (SmartCache)."""
        if not self.cfg.smartcache or len(slot.cache) - keep < self._MIN_SAVE or slot.shifted_at is not None:
            return
        cap = self.cfg.smartcache_mb * 1024 * 1024
        size = L.llama_state_seq_get_size(self.ctx, slot.seq)
        if not size or size > cap:
            return
        buf = (ctypes.c_uint8 * size)()
        n = L.llama_state_seq_get_data(self.ctx, buf, size, slot.seq)
        if not n:
            return
        if n < size:
            buf = (ctypes.c_uint8 * n).from_buffer_copy(buf)
        tokens = list(slot.cache)
        # an entry that is a prefix of this one is superseded by it
        self._saved = [e for e in self._saved if self._common_prefix(e.tokens, tokens) < len(e.tokens)]
        self._saved.append(_Saved(tokens, buf, time.monotonic()))
        self.counters["saved"] += 1
        self._saved.sort(key=lambda e: e.used)
        while len(self._saved) > self.cfg.smartcache or self.smartcache_bytes() > cap:
            self._saved.pop(0)

    def _restore(self, slot: _Slot, e: _Saved, n: int) -> int:
        self._saved.remove(e)
        if not L.llama_state_seq_set_data(self.ctx, e.data, len(e.data), slot.seq):
            L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            return 0
        slot.cache = list(e.tokens)
        self.counters["restored"] += 1
        self.counters["prompt_restored"] += n
        if not self.cfg.quiet:
            print(f"[SmartCache: restored {len(e.tokens)} tokens, {n} reused]", flush=True)
        return n

    def smartcache_bytes(self) -> int:
        return sum(len(e.data) for e in self._saved)

    # ---------- prompt-lookup speculative decoding (--promptlookup N) ----------

    def _draft(self, s: _Slot, room: int) -> List[int]:
        """Up to N tokens that followed the latest earlier occurrence of the context's last 3 (else 2) tokens: a
        guess, checked in the same decode. Greedy requests only, so the text is what plain decoding gives."""
        if not self.cfg.prompt_lookup:
            return []
        k = min(self.cfg.prompt_lookup, room, s.max_new - len(s.generated) - 1, self.n_ctx - len(s.cache) - 2)
        req = s.job.request
        if k < 1 or not s.sampler or not s.sampler.greedy or req.banned_phrases or req.sampling.grammar or s.beams:
            return []
        ctx = np.asarray(s.prompt + s.generated, dtype=np.int64)
        for size in (3, 2):
            if len(ctx) <= size:
                continue
            key = ctx[-size:]
            hits = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(ctx[:-1], size) == key, axis=1))
            if len(hits):
                start = int(hits[-1]) + size
                out = []
                for t in ctx[start:start + k]:
                    if t < 0:  # never a non-token id (media stand-ins on the multimodal branch)
                        break
                    out.append(int(t))
                return out
        return []

    def _sample_draft(self, s: _Slot, idx: int):
        """Sample the rows of a decoded draft in order while each sampled token is the next draft token; the cache
        entries after the first miss are dropped."""
        draft, s.draft = s.draft, []
        base = len(s.cache) - len(draft)  # position of the first draft token
        self.counters["drafted"] += len(draft)
        for i in range(len(draft) + 1):
            self._sample(s, idx + i)
            if s.job is None:
                return  # finished: entries past the end are valid KV for the tokens they hold
            if i < len(draft) and s.pending == draft[i]:
                s.pending = None  # already in the cache
                self.counters["draft_accepted"] += 1
                continue
            if base + i < len(s.cache):
                L.llama_memory_seq_rm(self.mem, s.seq, base + i, -1)
                del s.cache[base + i:]
            return

    # ---------- beam search ----------

    def _start_beams(self, slot: _Slot, helpers: List[_Slot]):
        """The job's first slot prefills the prompt; its helpers hold the other beams' sequences (copies)."""
        for h in helpers:
            h.reset_job()
            h.job, h.beam_of = slot.job, slot
            self._save(h, 0)
        slot.helpers = helpers
        slot.beams = [_Beam(slot, [], 0.0, slot.prompt[-1])]

    def _log_softmax(self, idx: int) -> np.ndarray:
        ptr = L.llama_get_logits_ith(self.ctx, idx)
        x = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = x.max()
        return x - (m + np.log(np.exp(x - m).sum()))

    def _beam_select(self, s: _Slot, rows: list):
        """One step of beam search: every beam's best continuations ranked by summed log-probability; an
        end-of-generation token or a stop string finishes a hypothesis (scored by length ** length_penalty);
        the best `beams` others continue, forking sequences (llama_memory_seq_cp) where a beam has several."""
        job = s.job
        req = job.request
        width = req.beams
        if not s.t_first:
            s.t_first = time.monotonic()
        eog = self.eog_ids if req.sampling.ban_eos else []
        cands = []
        for beam, idx in rows:
            lp = self._log_softmax(idx)
            if eog:
                lp[eog] = -np.inf
            k = min(2 * width, self.n_vocab)
            top = np.argpartition(-lp, k - 1)[:k]
            for t in top:
                if np.isfinite(lp[t]):
                    cands.append((beam.score + float(lp[t]), beam, int(t)))
        cands.sort(key=lambda c: -c[0])
        cur_len = len(s.beams[0].tokens) + 1
        alive = []
        for score, beam, t in cands:
            toks = beam.tokens + [t]
            if L.llama_vocab_is_eog(self.vocab, t) and not req.bypass_eos:
                self._beam_done(s, toks, score, 1)
            else:
                text = self.detokenize(toks, req.render_special)
                if req.stop and any(x in text for x in req.stop):
                    self._beam_done(s, toks, score, 2)
                else:
                    alive.append((score, beam, t))
            if len(alive) == width:
                break
        penalty = max(cur_len, 1) ** req.length_penalty
        out_of_room = cur_len >= s.max_new or len(s.prompt) + cur_len + 1 >= self.n_ctx
        full = len(s.finished_beams) >= width
        if out_of_room or not alive or (full and (req.early_stopping or
                                                  s.finished_beams[width - 1][0] >= alive[0][0] / penalty)):
            if out_of_room:
                for score, beam, t in alive:
                    self._beam_done(s, beam.tokens + [t], score, 0)
            self._beam_finish(s)
            return
        # sequences: a beam's first child keeps its parent's sequence, other children get copies
        parents = {id(beam) for _, beam, _ in alive}
        spare = [b.slot for b in s.beams if id(b) not in parents]
        spare += [h for h in s.helpers if all(b.slot is not h for b in s.beams)]
        used, beams = set(), []
        for score, beam, t in alive:
            if id(beam) not in used:
                used.add(id(beam))
                slot = beam.slot
            else:
                slot = spare.pop()
                L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                L.llama_memory_seq_cp(self.mem, beam.slot.seq, slot.seq, -1, -1)  # done at the next decode
                slot.cache = list(beam.slot.cache)
            beams.append(_Beam(slot, beam.tokens + [t], score, t))
        s.beams = beams

    def _beam_done(self, s: _Slot, toks: List[int], score: float, why: int):
        n = len(toks)
        s.finished_beams.append((score / max(n, 1) ** s.job.request.length_penalty, score, toks, why))
        s.finished_beams.sort(key=lambda f: -f[0])
        del s.finished_beams[s.job.request.beams:]

    def _beam_finish(self, s: _Slot):
        req = s.job.request
        _, score, toks, why = s.finished_beams[0]
        s.generated = list(toks)
        s.token_lps = [score]  # Result.logprob_sum: the hypothesis' summed log-probability
        text = ""
        for t in toks:
            eog = L.llama_vocab_is_eog(self.vocab, t)
            piece = b"" if (eog and not req.render_special) else self.tok.piece(t, req.render_special)
            got, stopped = s.stream.feed(piece)
            text += got
            if stopped:
                break
        text += s.stream.flush()
        s.job.emit_text(text)
        self._finish(s, "length" if why == 0 else "stop", why)

    def _new_chain(self, slot: _Slot) -> SamplerChain:
        req = slot.job.request
        banned_now = (lambda: slot.bans.get(len(slot.generated))) if req.banned_phrases else None
        eog = self.eog_ids if req.sampling.ban_eos else []
        return SamplerChain(self.vocab, self.n_vocab, self.n_ctx_train, eog, req.sampling, slot.prompt,
                            slot.seed, banned_now, (lambda t: self.tok.piece(t, True), self.tok.spell))

    _MAX_BANS_PER_POSITION = 16
    _MAX_BACKTRACKS = 256

    def _backtrack(self, s: _Slot, char_at: int) -> bool:
        """A banned phrase starts at text offset `char_at`: take back the tokens from the one that starts it, ban
        that token at that position and sample again. False when the ban budget is spent (the phrase stays)."""
        k = max(i for i, start in enumerate(s.stream.token_starts) if start <= char_at) if char_at > 0 else 0
        bans = s.bans.setdefault(k, set())
        if len(bans) >= self._MAX_BANS_PER_POSITION or s.backtracks >= self._MAX_BACKTRACKS:
            return False
        bans.add(s.generated[k])
        s.backtracks += 1
        req = s.job.request
        emitted = s.stream.emitted
        kept = s.generated[:k]
        s.generated = kept
        del s.logprobs[k:]
        del s.token_lps[k:]
        s.stream = TextStream(req.stop, req.trim_stop, req.banned_phrases)
        for t in kept:
            s.stream.feed(self.tok.piece(t, req.render_special))
        s.stream.emitted = min(emitted, len(s.stream.text))
        s.sampler.close()
        s.sampler = self._new_chain(s)
        for t in kept:  # grammar, penalties and DRY see the kept tokens again
            s.sampler.accept(t)
        seq = s.prompt + kept
        keep = len(seq) - 1  # re-decode the last kept token to get the logits for position k
        L.llama_memory_seq_rm(self.mem, s.seq, keep, -1)
        del s.cache[keep:]
        s.pending = seq[-1]
        return True

    def _context_shift(self, slot: _Slot, prompt: List[int], keep: int) -> int:
        """If the new prompt is the cached one with a span removed right after the common prefix (a chat client
        dropping its oldest turns), delete that span from the KV cache and shift the rest down."""
        cache = slot.cache
        tail = prompt[keep:]
        if len(tail) < 32 or len(cache) - keep < 32:
            return keep
        probe = tail[:16]
        arr = np.asarray(cache, dtype=np.int64)
        first = np.flatnonzero(arr[keep:] == probe[0]) + keep
        for start in first:
            start = int(start)
            if start == keep or cache[start:start + len(probe)] != probe:
                continue
            run = self._common_prefix(cache[start:], tail)
            if run < 32:
                continue
            erased = start - keep
            if not L.llama_memory_seq_rm(self.mem, slot.seq, keep, start):
                return keep
            L.llama_memory_seq_add(self.mem, slot.seq, start, -1, -erased)
            del cache[keep:start]
            if not self.cfg.quiet:
                print(f"[ContextShift: erased {erased} tokens, kept {run} cached]", flush=True)
            return min(keep + run, len(prompt) - 1)
        return keep

    def _step(self):
        """One decode of every generating slot's next token, then one prompt chunk of one slot.

        Rows of the same kind are never mixed (llama.cpp's CPU kernels compute a row slightly differently depending
        on the batch around it): decode rows share small batches, and each prompt is prefilled alone in chunks
        aligned to fixed positions, so a request gives the same text whether it runs alone or beside others."""
        b = self.batch
        n = 0
        rows = []  # (slot, batch index) to sample after the decode
        for s in self.slots:
            if s.job is not None and s.donor is not None:
                self._take_donation(s)
        beam_rows = []  # (main slot, [(beam, batch index)])
        for s in self.slots:
            if s.job is None or s.beam_of is not None:
                continue
            if s.job.aborted.is_set():
                self._finish(s, "abort", -1)
                continue
            if s.beams is not None:
                if s.n_prompt_done == len(s.prompt) - 1:  # the last prompt token starts the search
                    s.n_prompt_done += 1
                    self.counters["prompt_decoded"] += 1
                elif s.n_prompt_done < len(s.prompt) - 1:
                    continue
                mine = []
                for beam in s.beams:
                    self._put(b, n, beam.next_tok, len(beam.slot.cache), beam.slot.seq, True)
                    beam.slot.cache.append(beam.next_tok)
                    mine.append((beam, n))
                    n += 1
                beam_rows.append((s, mine))
                continue
            if s.pending is not None:
                tok, s.pending = s.pending, None
            elif s.n_prompt_done == len(s.prompt) - 1:
                tok = s.prompt[-1]  # the last prompt token gives the first logits, decoded like a generated one
                s.n_prompt_done += 1
                self.counters["prompt_decoded"] += 1
            else:
                continue
            self._put(b, n, tok, len(s.cache), s.seq, True)
            s.cache.append(tok)
            rows.append((s, n))
            n += 1
            s.draft = self._draft(s, self.n_batch - n - self.n_slots)
            for d in s.draft:  # verified in this same decode
                self._put(b, n, d, len(s.cache), s.seq, True)
                s.cache.append(d)
                n += 1
        if n and self._decode(n):
            for s, idx in rows:
                if s.job is not None:
                    if s.draft:
                        self._sample_draft(s, idx)
                    else:
                        self._sample(s, idx)
            for s, mine in beam_rows:
                if s.job is not None:
                    self._beam_select(s, mine)
        waiting = [s for s in self.slots if s.prefilling]
        if waiting:
            s = min(waiting, key=lambda x: x.job.submitted)
            start = s.n_prompt_done
            end = min(len(s.prompt) - 1, (start // self.n_batch + 1) * self.n_batch)
            for i, t in enumerate(s.prompt[start:end]):
                self._put(b, i, t, len(s.cache), s.seq, False)
                s.cache.append(t)
            s.n_prompt_done = end
            self.counters["prompt_decoded"] += end - start
            n = end - start
            # --fastfirsttoken: the last prompt token rides with the final chunk (one decode fewer before the first
            # token; its logits then depend on the chunk, so the text may differ from a cached or batched run)
            last = self.cfg.fast_first_token and end == len(s.prompt) - 1 and n < self.n_batch and s.beams is None
            if last:
                self._put(b, n, s.prompt[-1], len(s.cache), s.seq, True)
                s.cache.append(s.prompt[-1])
                s.n_prompt_done += 1
                self.counters["prompt_decoded"] += 1
                n += 1
            if self._decode(n) and last and s.job is not None:
                self._sample(s, n - 1)

    def _decode(self, n: int) -> bool:
        self.batch.n_tokens = n
        self.counters["decodes"] += 1
        rc = L.llama_decode(self.ctx, self.batch)
        if rc == 0:
            return True
        for s in self.slots:
            if s.job:
                # the cache no longer matches what we think: start these sequences over next time
                L.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
                s.cache = []
                self._finish(s, "stop", -1, error=f"llama_decode failed ({rc})")
        return False

    @staticmethod
    def _put(b, i, tok, pos, seq, logits):
        b.token[i] = tok
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = 1 if logits else 0

    def _sample(self, s: _Slot, idx: int):
        job = s.job
        req = job.request
        if not s.generated and not s.t_first:
            s.t_first = time.monotonic()
        if job.aborted.is_set():
            self._finish(s, "abort", -1)
            return
        tok = s.sampler.sample(self.ctx, idx)
        lp = self._logprob(idx, tok, req.top_logprobs) if req.logprobs else None
        if req.score:
            s.token_lps.append((lp or self._logprob(idx, tok, 0)).logprob)
        s.generated.append(tok)
        is_eog = L.llama_vocab_is_eog(self.vocab, tok)
        if is_eog and not req.bypass_eos:
            if lp is not None:
                s.logprobs.append(lp)
            tail = s.stream.flush()
            job.emit_text(tail)
            self._finish(s, "stop", 1)
            return
        piece = b"" if (is_eog and not req.render_special) else self.tok.piece(tok, req.render_special)
        text, stopped = s.stream.feed(piece)
        if req.banned_phrases and not stopped:
            hit = s.stream.find_banned()
            if hit and self._backtrack(s, hit[0]):
                return
            if hit:  # ban budget spent: let the phrase through rather than loop
                s.stream.banned = []
                text = s.stream.release()
        if lp is not None:
            s.logprobs.append(lp)
        job.emit_text(text, [lp] if lp is not None else None)
        if stopped:
            self._finish(s, "stop", 2)
            return
        if len(s.generated) >= s.max_new or len(s.cache) + 1 >= self.n_ctx:
            job.emit_text(s.stream.flush())
            self._finish(s, "length", 0)
            return
        s.pending = tok

    def _logprob(self, idx: int, tok: int, top: int) -> TokenLogprob:
        ptr = L.llama_get_logits_ith(self.ctx, idx)
        x = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = x.max()
        lse = m + np.log(np.exp(x - m).sum())
        alts = []
        if top > 0:
            k = min(top, self.n_vocab)
            cand = np.argpartition(-x, k - 1)[:k]
            cand = cand[np.argsort(-x[cand], kind="stable")]
            for c in cand:
                pb = self.tok.piece(int(c), True)
                alts.append((pb.decode("utf-8", "replace"), float(x[c] - lse), list(pb)))
        pb = self.tok.piece(tok, True)
        return TokenLogprob(token=pb.decode("utf-8", "replace"), logprob=float(x[tok] - lse), bytes=list(pb), top=alts)

    def _finish(self, s: _Slot, reason: str, stop_reason: int, error: Optional[str] = None):
        job = s.job
        if job is None or s.beam_of is not None:  # a beam search ends through its first slot
            return
        now = time.monotonic()
        t_first = s.t_first or now
        res = Result(
            text=s.stream.result_text if s.stream else "",
            finish_reason=reason,
            stop_reason=stop_reason,
            prompt_tokens=len(s.prompt),
            completion_tokens=len(s.generated),
            cached_tokens=s.cached,
            stop_string=s.stream.stop_hit if s.stream else None,
            logprobs=s.logprobs if job.request.logprobs else None,
            seed=s.seed,
            process_time=t_first - s.t_start,
            eval_time=now - t_first,
            error=error,
            logprob_sum=float(sum(s.token_lps)) if (job.request.score or job.request.beams) else None,
        )
        if s.sampler:
            s.sampler.close()
        for h in s.helpers:
            h.job = None
            h.last_used = now
            h.reset_job()
        s.job = None
        s.last_used = now
        s.reset_job()
        with self._lock:
            if job in self._running:
                self._running.remove(job)
            self.total_gens += 1
            self.last_result = res
            self.last_genkey = job.genkey
            if not self._running and not self._waiting:
                self.idle_since = time.time()
        job.finish(res)
