"""The engine: one thread owns the llama.cpp model and context and runs every generation.

HTTP threads `submit()` a GenRequest and read Events from the returned Job. The context holds N sequences (slots);
each step decodes the next token of every generating slot in one llama_batch (continuous batching), then a chunk of
each waiting prompt, each alone. A new job takes the idle slot whose cached tokens share the longest prefix with its
prompt, so only the new suffix is decoded (FastForward), or, with nothing worth reusing, an idle slot next to the
busy ones (_place).

With a projector (--mmproj), a prompt may hold images/audio. Each one stands in the token lists as a run of
negative stand-in ids derived from a hash of its bytes (_pseudo), so FastForward and ContextShift compare them like
tokens and an identical image is a cached prefix. Media are encoded by the projector on its own thread while the
other slots keep generating; the embeddings are then decoded into the job's own sequence. No cut (trimming,
FastForward, ContextShift) ever falls inside an image: cuts snap to its first stand-in id (_snap).
"""
from __future__ import annotations

import ctypes
import functools
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import llama_cpp as L

from . import grammar as gbnf, llama_model
from .llama_model import ModelLoadError, Vocab, init_backend, load_model, read_meta  # noqa: F401 (re-exported)
from .jobs import (MEDIA_MARKER, Event, GenRequest, InvalidRequest, Job, QueueFull, Result,  # noqa: F401
                   TokenLogprob, token_budget)
from .mtmd import MediaChunk, Projector, ProjectorError  # noqa: F401 (re-exported)
from .pooled import Embedder, Reranker
from .sampling import GrammarDone, SamplerChain
from .textstream import TextStream


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
    rerank_model_path: Optional[str] = None  # a reranker GGUF (rank pooling) for /v1/rerank
    mmproj_path: Optional[str] = None  # vision/audio projector (llama.cpp mtmd)
    on_load_progress: Optional[Callable[[float], bool]] = None  # 0..1 while loading; False cancels the load
    loras: List[Tuple[str, float]] = field(default_factory=list)  # (adapter file, scale), applied at load
    kv_type: int = 0  # --quantkv: 0 f16, 1 q8_0, 2 q4_0 (K and V; V quantized needs flash attention)
    smartcache: int = 0  # conversations kept in host memory when their slot is taken over (0: off)
    smartcache_mb: int = 1024  # and at most this many MiB of them
    fast_first_token: bool = False  # decode the last prompt token with the prompt (faster, not reproducible)
    prompt_lookup: int = 0  # > 0: draft this many tokens from earlier context for greedy requests (speculative)


KV_TYPES = {0: ("f16", L.GGML_TYPE_F16), 1: ("q8_0", L.GGML_TYPE_Q8_0), 2: ("q4_0", L.GGML_TYPE_Q4_0)}
_MEDIA_BITS = 20  # stand-in ids: -(1 + (ident << 20) + i) for token i of a media chunk


def _pseudo(chunk: MediaChunk) -> List[int]:
    base = 1 + (chunk.ident << _MEDIA_BITS)
    return [-(base + i) for i in range(chunk.n_tokens)]


def _media_index(t: int) -> int:
    """Index of a stand-in id inside its media chunk (-1 for a real token)."""
    return (-t - 1) & ((1 << _MEDIA_BITS) - 1) if t < 0 else -1


def _snap(seq: List[int], k: int) -> int:
    """Move a cut at k back to the start of the media chunk it would split."""
    if 0 <= k < len(seq) and seq[k] < 0:
        k -= _media_index(seq[k])
    return max(k, 0)


def _media_ident(t: int) -> int:
    return (-t - 1) >> _MEDIA_BITS


class _Slot:
    def __init__(self, seq_id: int):
        self.seq = seq_id
        self.cache: List[int] = []  # tokens whose K/V sit in this sequence
        self.pos_gap = 0  # M-RoPE: cache entries minus positions used (media take fewer positions than embeddings)
        self.shifted_at: Optional[int] = None  # cache entries from here on were moved by ContextShift
        self.lora: tuple = ()  # the adapter scales this sequence's cache was computed with
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
        self.media: Dict[int, MediaChunk] = {}  # prompt index -> the media chunk starting there
        self.embd: Dict[int, object] = {}  # prompt index -> encoded embeddings (numpy), or an Exception
        self.cur_media = None  # (start, chunk, embeddings) of a causal media chunk decoded n_batch at a time
        self.encode_time = 0.0
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

    @property
    def ready(self) -> bool:
        """Prefilling and not waiting for the projector to encode the media chunk that comes next."""
        if not self.prefilling:
            return False
        i = self.n_prompt_done
        return self.cur_media is not None or i not in self.media or i in self.embd


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
        init_backend()
        self.cfg = cfg
        self.model_path = cfg.model_path
        self.model_name = os.path.splitext(os.path.basename(cfg.model_path))[0]
        t0 = time.monotonic()
        self.model = load_model(cfg.model_path, cfg.n_gpu_layers, cfg.use_mmap, cfg.use_mlock, cfg.on_load_progress)
        self.load_time = time.monotonic() - t0
        self.tok = Vocab(self.model)
        self.vocab = self.tok.vocab
        self.n_vocab = self.tok.n_vocab
        self.metadata = read_meta(self.model)
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
        if cfg.kv_type not in KV_TYPES:
            L.llama_model_free(self.model)
            raise ModelLoadError(f"unknown KV cache type {cfg.kv_type} (0 f16, 1 q8_0, 2 q4_0)")
        if cfg.kv_type and not cfg.flash_attn:  # llama.cpp refuses a quantized V cache without flash attention
            L.llama_model_free(self.model)
            raise ModelLoadError("a quantized KV cache (--quantkv 1 or 2) needs flash attention (--flashattention)")
        self.kv_type_name = KV_TYPES[cfg.kv_type][0]
        cp.type_k = cp.type_v = KV_TYPES[cfg.kv_type][1]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise ModelLoadError(f"llama.cpp could not create a context of {cp.n_ctx} tokens for {cfg.model_path}")
        self.loras = []  # (name, adapter pointer, default scale); freed with the model
        self._lora_set = None  # the (pointer, scale) set last given to the context
        for path, scale in cfg.loras:
            ad = L.llama_adapter_lora_init(self.model, path.encode("utf-8"))
            if not ad:
                L.llama_free(self.ctx)
                L.llama_model_free(self.model)
                raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {path} for {cfg.model_path}")
            self.loras.append((os.path.basename(path), ad, float(scale)))
        self.mem = L.llama_get_memory(self.ctx)
        self.can_shift = bool(L.llama_memory_can_shift(self.mem))
        if cfg.contextshift and cfg.fastforward and not self.can_shift:
            print("ContextShift: this model's cache cannot be shifted; trimmed chats are reprocessed instead.",
                  flush=True)
        self.batch = L.llama_batch_init(max(self.n_batch, self.n_slots), 0, 1)

        self.projector: Optional[Projector] = None
        if cfg.mmproj_path:
            try:
                self.projector = Projector(cfg.mmproj_path, self.model, cfg.n_threads, cfg.n_gpu_layers != 0,
                                           llama_model.LOG_CB)
            except ProjectorError:
                L.llama_batch_free(self.batch)
                L.llama_free(self.ctx)
                L.llama_model_free(self.model)
                raise
        self._encode_q: "queue.Queue" = queue.Queue()
        self._embd_cache: Dict[str, object] = {}  # media key -> embeddings, most recent last (a few)
        self._pos_gaps: Dict[int, int] = {}  # M-RoPE: media ident -> embeddings minus positions it takes
        self._embd_batch = None  # llama_batch of embeddings for causal media pieces (made on first use)

        self.slots = [_Slot(i) for i in range(self.n_slots)]
        self._lock = threading.Condition()
        self._waiting: List[Job] = []
        self._running: List[Job] = []
        self._stop = False
        self.embedder = Embedder(self.model, cfg.embedding_model_path, self.n_ctx, cfg.n_threads, cfg.n_gpu_layers,
                                 cfg.use_mmap)
        self.reranker = Reranker(None, cfg.rerank_model_path, self.n_ctx, cfg.n_threads, cfg.n_gpu_layers,
                                 cfg.use_mmap)

        self.started_at = time.time()
        self.idle_since = time.time()
        self.total_gens = 0
        self.total_prompt_tokens = 0  # decoded (not cached) prompt tokens, all jobs
        self.total_generated_tokens = 0
        self.total_prompt_time = 0.0
        self.total_eval_time = 0.0
        self.last_result: Optional[Result] = None
        self.last_genkey = ""
        # tokens decoded from prompts, copied between slots, restored from the SmartCache (tests and /perf)
        self.counters = {"prompt_decoded": 0, "prompt_copied": 0, "prompt_restored": 0, "saved": 0, "restored": 0,
                         "decodes": 0, "drafted": 0, "draft_accepted": 0}
        self._saved: List[_Saved] = []  # SmartCache, engine thread only

        self._thread = gbnf.start_thread(self._loop, "engine")  # llama.cpp's grammar matching recurses
        self._encoder = None
        if self.projector:
            self._encoder = threading.Thread(target=self._encode_loop, name="mtmd-encoder", daemon=True)
            self._encoder.start()

    @property
    def vision(self) -> bool:
        return bool(self.projector and self.projector.vision)

    @property
    def audio(self) -> bool:
        return bool(self.projector and self.projector.audio)

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
        for i, sc in (req.lora or {}).items():
            if not (isinstance(i, int) and 0 <= i < len(self.loras)):
                raise InvalidRequest(f"LoRA adapter id {i!r} does not exist (this model has {len(self.loras)})")
            if not (isinstance(sc, (int, float)) and -100.0 <= sc <= 100.0):
                raise InvalidRequest(f"LoRA scale {sc!r} must be a number between -100 and 100")
        if req.beams > self.n_slots:
            raise InvalidRequest(f"beam search of width {req.beams} needs as many parallel slots; this server has "
                                 f"{self.n_slots} (--parallelrequests)")
        if req.beams and (req.sampling.grammar or req.banned_phrases):
            raise InvalidRequest("beam search cannot be combined with a grammar or banned phrases")
        if req.beams < 0 or req.beams > 32:
            raise InvalidRequest("the beam width must be between 1 and 32")
        if req.sampling.grammar:
            self.check_grammar(req.sampling.grammar)
        if req.media:
            if not self.projector:
                raise InvalidRequest(f"the request has {len(req.media)} image(s)/audio clip(s), but no projector is "
                                     f"loaded (start with --mmproj FILE)")
            if isinstance(req.prompt, list):
                raise InvalidRequest("images/audio need a text prompt, not token ids")
            n = req.memory.count(MEDIA_MARKER) + req.prompt.count(MEDIA_MARKER)
            if n != len(req.media):
                raise InvalidRequest(f"the prompt has {n} media marker(s) for {len(req.media)} image(s)/audio clip(s)")

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
        if req.media:
            # image preprocessing runs here, on the caller's thread, not on the engine's
            pieces = [self.projector.tokenize(m, req.tokenize_special) for m in req.media]
            for p in pieces:
                for c in p:
                    if isinstance(c, MediaChunk) and c.n_tokens > self.n_batch and self.projector.non_causal(c):
                        raise InvalidRequest(f"an image needs {c.n_tokens} tokens, more than the batch size "
                                             f"({self.n_batch}); start with --batchsize {c.n_tokens} or more")
            job.media_pieces = pieces
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
            "last_media_tokens": r.media_tokens if r else 0,
            "last_encode_time": r.encode_time if r else 0.0,
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

    def slots_info(self) -> List[dict]:
        """Each slot's state, read without stopping the engine thread (values may be one step old)."""
        out = []
        for s in self.slots:
            job = s.job
            info = {"id": s.seq, "busy": job is not None, "job_id": job.id if job else -1, "n_cached": len(s.cache),
                    "progress": None}
            if job is not None:
                info["progress"] = self._progress_of(s)
                info["n_decoded"] = len(s.generated)
                info["n_remain"] = max(0, s.max_new - len(s.generated))
            out.append(info)
        return out

    @staticmethod
    def _progress_of(s: "_Slot") -> dict:
        total, done = len(s.prompt), s.n_prompt_done
        return {"total": total, "cache": s.cached, "processed": min(done, total),
                "time_ms": round((time.monotonic() - s.t_start) * 1000, 1) if s.t_start else 0.0}

    def job_progress(self, job: Job) -> Optional[dict]:
        """Prompt progress of a running job ({total, cache, processed, time_ms}); None while it waits."""
        for s in self.slots:
            if s.job is job:
                return self._progress_of(s)
        return None

    def totals(self) -> dict:
        """Totals since start, for /metrics."""
        with self._lock:
            busy = len(self._running)
            q = len(self._waiting)
        return {"prompt_tokens": self.total_prompt_tokens, "generated_tokens": self.total_generated_tokens,
                "prompt_seconds": self.total_prompt_time, "eval_seconds": self.total_eval_time,
                "gens": self.total_gens, "queue": q, "busy_slots": busy, "slots": self.n_slots,
                "kv_cells_used": sum(len(s.cache) for s in self.slots), "kv_cells_total": self.n_ctx * self.n_slots,
                "load_seconds": self.load_time}

    def close(self):
        with self._lock:
            self._stop = True
            for j in self._waiting + self._running:
                j.abort()
            self._lock.notify_all()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            return  # the engine thread is stuck in llama.cpp; leave the memory to the OS
        if self._encoder:
            self._encode_q.put(None)
            self._encoder.join(timeout=30)
            if self._encoder.is_alive():
                return
        for s in self.slots:
            s.media, s.embd = {}, {}
        if self.projector:
            self.projector.close()
        if self._embd_batch is not None:
            L.llama_batch_free(self._embd_batch)
        for s in self.slots:
            if s.sampler:
                s.sampler.close()
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
        self.embedder.close()
        self.reranker.close()

    # ---------- embeddings and reranking (gguf_loader/pooled.py: own contexts, caller's thread) ----------

    @property
    def embed_model_name(self) -> Optional[str]:
        """The --embeddingsmodel file's name (None: the main model embeds)."""
        return self.embedder.name

    @property
    def embed_pooling(self) -> str:
        return self.embedder.pooling

    def embed_limits(self) -> tuple:
        """(tokens per input, vocabulary size) of the embedding model."""
        return self.embedder.limits()

    def embed_tokenize(self, text: str) -> List[int]:
        return self.embedder.tokenize(text)

    def embed(self, inputs: List[List[int]]) -> List[List[float]]:
        """One L2-normalised vector per token list (cut to the context); InvalidRequest for ids outside the
        vocabulary."""
        return self.embedder.embed(inputs)

    @property
    def rerank_model_name(self) -> Optional[str]:
        return self.reranker.name

    def load_reranker(self):
        """Load the --rerankmodel now (start-up), so a bad file is reported before the server answers."""
        self.reranker.load()

    def rerank(self, query: str, documents: List[str]) -> tuple:
        """-> (one relevance score per document, tokens read)."""
        return self.reranker.rerank(query, documents)

    # ---------- facts about the loaded model (Ollama's /api/show and /api/ps) ----------

    def model_facts(self) -> dict:
        """Parameter count, weight bytes, the KV cache's bytes (f16, every slot), layers and offloaded layers."""
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, buf, len(buf))
        arch = self.metadata.get("general.architecture", "")
        n_layer = L.llama_model_n_layer(self.model)
        n_head = max(1, L.llama_model_n_head(self.model))
        n_head_kv = L.llama_model_n_head_kv(self.model) or n_head

        def meta_int(key, default):
            try:
                return int(self.metadata.get(key, default))
            except ValueError:
                return default
        k_len = meta_int(f"{arch}.attention.key_length", L.llama_model_n_embd(self.model) // n_head)
        v_len = meta_int(f"{arch}.attention.value_length", k_len)
        gpu = 0
        if self.cfg.n_gpu_layers and L.llama_supports_gpu_offload():
            gpu = n_layer if self.cfg.n_gpu_layers < 0 else min(self.cfg.n_gpu_layers, n_layer)
        return {"desc": buf.value.decode("utf-8", "replace"), "n_params": int(L.llama_model_n_params(self.model)),
                "weights_bytes": int(L.llama_model_size(self.model)),
                "kv_bytes": self.n_ctx * self.n_slots * n_layer * n_head_kv * (k_len + v_len) * 2,
                "n_layer": n_layer, "gpu_layers": gpu}

    # ---------- fill-in-the-middle tokens ----------

    def fim_tokens(self) -> Dict[str, int]:
        """The vocabulary's FIM special tokens, name -> id; a name the model lacks is absent."""
        out = {}
        for name in ("pre", "suf", "mid", "pad", "rep", "sep"):
            t = getattr(L, f"llama_vocab_fim_{name}")(self.vocab)
            if 0 <= t < self.n_vocab:
                out[name] = int(t)
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
                if not self._step():
                    with self._lock:  # every job waits for the projector: sleep until it hands something over
                        if not self._stop:
                            self._lock.wait(0.05)
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
            chunks: Dict[int, MediaChunk] = {}
            try:
                prompt = self._build_prompt(job.request, job.media_pieces, chunks)
                _, max_new = self.budget(job.request)
            except Exception as e:
                job.finish(Result(text="", finish_reason="stop", stop_reason=-1, prompt_tokens=0,
                                  completion_tokens=0, error=str(e)))
                continue
            slot = self._place(free, prompt)
            self._running.append(job)
            try:
                self._start(slot, job, prompt, max_new, chunks)
                if job.request.beams:
                    helpers = sorted((s for s in free if s is not slot), key=lambda s: abs(s.seq - slot.seq))
                    self._start_beams(slot, sorted(helpers[:job.request.beams - 1], key=lambda s: s.seq))
            except Exception as e:
                self._running.remove(job)
                slot.job = None
                job.finish(Result(text="", finish_reason="stop", stop_reason=-1, prompt_tokens=len(prompt),
                                  completion_tokens=0, error=str(e)))

    _MIN_REUSE = 64  # cached prompt tokens that outweigh a slot next to the busy ones (shorter: a whole prompt)

    def _place(self, free: List[_Slot], prompt: List[int]) -> _Slot:
        """The free slot for a new job: the one whose cache holds the longest prefix of the prompt, when that saves
        real work; otherwise one next to the busy slots (llama.cpp decodes a batch of split KV streams in one pass
        only over consecutive sequence ids: four busy slots spread over eight took four passes a step), the least
        recently used of those."""
        prefix = {s.seq: self._common_prefix(s.cache, prompt) for s in free}
        best = max(free, key=lambda s: (prefix[s.seq], -s.last_used))
        if prefix[best.seq] >= min(self._MIN_REUSE, len(prompt) - 1):  # a long prefix, or all that can be reused
            return best
        busy = {s.seq for s in self.slots if s.job is not None}

        def runs(seq: int) -> int:  # groups of consecutive busy sequence ids once this one is busy too
            ids = sorted(busy | {seq})
            return 1 + sum(1 for a, b in zip(ids, ids[1:]) if b != a + 1)
        return min(free, key=lambda s: (runs(s.seq), s.last_used))

    def _gap(self, seq: List[int], k: int) -> int:
        """M-RoPE: entries minus positions of the media chunks in seq[:k] (0 for every other model)."""
        if not self._pos_gaps:
            return 0
        return sum(self._pos_gaps.get(_media_ident(t), 0) for t in seq[:k] if t < 0 and _media_index(t) == 0)

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

    def count_prompt(self, req: GenRequest) -> int:
        """Tokens the request's prompt takes before any trimming, images and audio at the projector's count (the
        token-counting routes). Raises InvalidRequest for what could never run."""
        self.validate(req)
        pieces = [self.projector.tokenize(m, req.tokenize_special) for m in req.media] if req.media else None
        return sum(len(part) for part in self._untrimmed(req, pieces, {}))

    def _tokenize_media(self, text: str, pieces, special: bool, chunks: Dict[int, MediaChunk]) -> List[int]:
        """Text with media markers -> tokens with each media item's pieces (stand-in ids for its chunk)."""
        out: List[int] = []
        parts = text.split(MEDIA_MARKER)
        for i, part in enumerate(parts):
            if part:
                out += self.tokenize(part, add_bos=False, special=special)
            if i < len(parts) - 1:
                for piece in next(pieces):
                    if isinstance(piece, MediaChunk):
                        chunks[piece.ident] = piece
                        out += _pseudo(piece)
                    else:
                        out += piece
        return out

    def _untrimmed(self, req: GenRequest, media_pieces, chunks: Dict[int, MediaChunk]) -> tuple:
        """(BOS, memory, body) token lists of the whole prompt. A text prompt with no media is tokenized with its
        memory as one text (memory then comes back empty: it is split off only when trimming needs it)."""
        special = req.tokenize_special
        if isinstance(req.prompt, list):  # ids were checked by validate()
            return [], self.tokenize(req.memory, False, special) if req.memory else [], list(req.prompt)
        add_bos = req.add_bos and L.llama_vocab_get_add_bos(self.vocab)
        bos = [L.llama_vocab_bos(self.vocab)] if add_bos else []
        if req.media and media_pieces is not None:
            it = iter(media_pieces)
            mem = self._tokenize_media(req.memory, it, special, chunks) if req.memory else []
            body = self._tokenize_media(req.prompt, it, special, chunks)
            if body and body[-1] < 0:  # the last prompt token gives the first logits: it must be text
                body += self.tokenize("\n", add_bos=False, special=False)
            return bos, mem, body
        text = req.memory + req.prompt
        return bos, [], self.tokenize(text, add_bos=False, special=special) if text else []

    def _build_prompt(self, req: GenRequest, media_pieces=None, chunks: Optional[Dict[int, MediaChunk]] = None
                      ) -> List[int]:
        """The prompt tokens, trimmed from the front to fit the budget, keeping BOS and memory; memory and prompt
        are tokenized as one text when they fit. Media chunks are never cut: a trim inside one drops all of it."""
        n_ctx, max_new = self.budget(req)
        chunks = {} if chunks is None else chunks
        bos, mem, body = self._untrimmed(req, media_pieces, chunks)
        if req.media and media_pieces is not None:
            for c in chunks.values():
                if c.n_pos != c.n_tokens and len(self._pos_gaps) < 100_000:
                    self._pos_gaps[c.ident] = c.n_tokens - c.n_pos
            room = n_ctx - max_new - len(bos)
            if len(mem) > room:
                mem = mem[len(mem) - room:] if room > 0 else []
                while mem and mem[0] < 0 and _media_index(mem[0]) > 0:
                    mem.pop(0)
            room -= len(mem)
            if len(body) > room:
                body = body[len(body) - room:] if room > 0 else []
                k = 0
                while k < len(body) and body[k] < 0 and _media_index(body[k]) > 0:
                    k += 1
                body = body[k:]
            return (bos + mem + body) or [L.llama_vocab_bos(self.vocab)]
        if not isinstance(req.prompt, list) and req.memory and len(bos) + len(body) > n_ctx - max_new:
            special = req.tokenize_special
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

    def _start(self, slot: _Slot, job: Job, prompt: List[int], max_new: int,
               chunks: Optional[Dict[int, MediaChunk]] = None):
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

        scales = self._lora_scales(req)
        if scales != slot.lora:  # a cache computed under other adapters cannot be reused
            slot.shifted_at = None
            keep_ok = False
        else:
            keep_ok = self.cfg.fastforward
        slot.lora = scales
        keep = self._common_prefix(slot.cache, prompt) if keep_ok else 0
        if keep >= len(prompt):
            keep = len(prompt) - 1  # re-decode the last prompt token to get fresh logits
        keep = _snap(prompt, keep)
        if self.cfg.fastforward and not chunks:  # (prompts with media reuse only their own slot's cache)
            keep = self._borrow(slot, prompt, keep)
        if slot.donor is not None:  # the cache comes from another slot at the next step
            job.started.set()
            return
        # Entries moved by ContextShift differ slightly from freshly computed ones. The request that shifts uses
        # them, and so may a request at the context's edge (the next turn of a long chat); any other request
        # reprocesses from the first moved entry, so it gets exactly a cold run's text (README, "Reproducible").
        at_edge = len(slot.cache) + len(prompt) - keep + max_new > self.budget(req)[0]  # the client's context
        shifted = keep
        if self.cfg.fastforward and self.cfg.contextshift and self.can_shift and not slot.pos_gap:
            shifted = self._context_shift(slot, prompt, keep)  # (M-RoPE media positions are not shifted)
        shifted = _snap(prompt, shifted)
        if shifted > keep:
            slot.shifted_at = keep if slot.shifted_at is None else min(keep, slot.shifted_at)
            keep = shifted
        elif slot.shifted_at is not None and keep > slot.shifted_at and not at_edge:
            keep = _snap(prompt, slot.shifted_at)
        if keep < len(slot.cache):
            self._save(slot, keep)
            gap = self._gap(slot.cache, keep)
            if not L.llama_memory_seq_rm(self.mem, slot.seq, keep - gap, -1):
                L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                keep, gap = 0, 0
            del slot.cache[keep:]
            slot.pos_gap = gap
        if slot.shifted_at is not None and slot.shifted_at >= len(slot.cache):
            slot.shifted_at = None
        slot.n_prompt_done = keep
        slot.cached = keep
        if chunks:
            i = keep
            while i < len(prompt):
                t = prompt[i]
                if t < 0 and _media_index(t) == 0:
                    c = chunks[_media_ident(t)]
                    slot.media[i] = c
                    hit = self._embd_cache.get(c.key)
                    if hit is not None:
                        slot.embd[i] = hit
                    else:
                        self._encode_q.put((slot, job, i, c))
                    i += c.n_tokens
                else:
                    i += 1
        job.started.set()

    def _lora_scales(self, req: GenRequest) -> tuple:
        """The scale of every adapter for a request (its own where it set one, else the adapter's default)."""
        own = req.lora or {}
        return tuple(float(own.get(i, d)) for i, (_, _, d) in enumerate(self.loras))

    def _use_lora(self, scales: tuple):
        """Give the context this adapter set (adapters at scale 0 left out: exactly the base model)."""
        if scales == self._lora_set:
            return
        on = [(ad, sc) for (_, ad, _), sc in zip(self.loras, scales) if sc != 0.0]
        arr = (L.llama_adapter_lora_p_ctypes * max(1, len(on)))(*[a for a, _ in on])
        sc = (ctypes.c_float * max(1, len(on)))(*[x for _, x in on])
        if L.llama_set_adapters_lora(self.ctx, arr if on else None, len(on), sc if on else None) != 0:
            raise RuntimeError("llama.cpp refused the LoRA adapter set")
        self._lora_set = scales

    # ---------- prefixes held elsewhere: other slots (copied) and the SmartCache (restored) ----------

    _MIN_BORROW = 16  # tokens a copy or a restore must gain over the slot's own cache
    _MIN_SAVE = 64  # tokens a slot must be about to lose for the SmartCache to keep them

    def _borrow(self, slot: _Slot, prompt: List[int], keep: int) -> int:
        """A longer prefix of `prompt` held elsewhere than in `slot`'s own cache: another slot's cache (copied with
        llama_memory_seq_cp at the next step, after waiting for that slot's prefill when it is still processing
        the same prompt: the n choices of one request), or a SmartCache entry restored into `slot` now.
        -> the tokens of `slot`'s cache kept (0 while a copy is pending). Off with LoRA adapters loaded: a cache
        is only valid under the adapter set it was computed with."""
        if self.loras:
            return keep
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
        slot.cache, slot.shifted_at, slot.pos_gap = [], None, 0
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
            L.llama_memory_seq_rm(self.mem, s.seq, n, -1)  # (the prefix holds no media: no position gap)
            s.cache, s.pos_gap = d.cache[:n], 0
            self.counters["prompt_copied"] += n
        else:
            n = 0
        s.n_prompt_done = s.cached = n

    def _save(self, slot: _Slot, keep: int):
        """Keep the slot's cache in host memory before it loses the tokens from `keep` on (SmartCache)."""
        if not self.cfg.smartcache or self.loras or len(slot.cache) - keep < self._MIN_SAVE \
                or slot.shifted_at is not None or slot.pos_gap or any(t < 0 for t in slot.cache):  # (media: no)
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
                L.llama_memory_seq_rm(self.mem, s.seq, base + i - s.pos_gap, -1)
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
                slot.cache, slot.pos_gap = list(beam.slot.cache), beam.slot.pos_gap
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
        prompt = [t for t in slot.prompt if t >= 0] if slot.media or min(slot.prompt, default=0) < 0 else slot.prompt
        return SamplerChain(self.vocab, self.n_vocab, self.n_ctx_train, eog, req.sampling, prompt,
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
        L.llama_memory_seq_rm(self.mem, s.seq, keep - s.pos_gap, -1)  # every media chunk is before keep
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
            if start == keep or cache[start:start + len(probe)] != probe or _snap(cache, start) != start:
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

    def _step(self) -> bool:
        """One decode of every generating slot's next token, then prompt chunks of waiting slots, oldest first, up
        to n_batch tokens in all (a long prompt goes one chunk per step; short ones start together).

        Rows of the same kind are never mixed (llama.cpp's CPU kernels compute a row slightly differently depending
        on the batch around it): decode rows share small batches, and each prompt is prefilled alone in chunks
        aligned to fixed positions, so a request gives the same text whether it runs alone or beside others.
        Slots under different LoRA adapter sets are decoded in separate batches."""
        for s in self.slots:
            if s.job is not None and s.donor is not None:
                self._take_donation(s)
        entries = []  # (LoRA set, slot, token or None for a beam search)
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
                entries.append((s.lora, s, None))
                continue
            if s.pending is not None:
                tok, s.pending = s.pending, None
            elif s.n_prompt_done == len(s.prompt) - 1:
                tok = s.prompt[-1]  # the last prompt token gives the first logits, decoded like a generated one
                s.n_prompt_done += 1
                self.counters["prompt_decoded"] += 1
            else:
                continue
            entries.append((s.lora, s, tok))
        b = self.batch
        groups: Dict[tuple, list] = {}
        for scales, s, tok in entries:
            groups.setdefault(scales, []).append((s, tok))
        decoded = False
        for scales, members in groups.items():
            if self.loras:
                self._use_lora(scales)
            n = 0
            rows = []  # (slot, batch index) to sample after the decode
            beam_rows = []  # (main slot, [(beam, batch index)])
            for s, tok in members:
                if tok is None:
                    mine = []
                    for beam in s.beams:
                        self._put(b, n, beam.next_tok, len(beam.slot.cache) - beam.slot.pos_gap, beam.slot.seq,
                                  True)
                        beam.slot.cache.append(beam.next_tok)
                        mine.append((beam, n))
                        n += 1
                    beam_rows.append((s, mine))
                    continue
                self._put(b, n, tok, len(s.cache) - s.pos_gap, s.seq, True)
                s.cache.append(tok)
                rows.append((s, n))
                n += 1
                s.draft = self._draft(s, self.n_batch - n - self.n_slots)
                for d in s.draft:  # verified in this same decode
                    self._put(b, n, d, len(s.cache) - s.pos_gap, s.seq, True)
                    s.cache.append(d)
                    n += 1
            decoded = decoded or n > 0
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
        waiting = sorted((s for s in self.slots if s.ready), key=lambda x: x.job.submitted)
        budget = self.n_batch  # prompt tokens per step: several short prompts start together, a long one alone
        for s in waiting:
            if s.job is None:
                continue
            start = s.n_prompt_done
            media = s.cur_media is not None or start in s.media
            end = min(len(s.prompt) - 1, (start // self.n_batch + 1) * self.n_batch)
            nxt = [i for i in s.media if start < i < end]
            if nxt:
                end = min(nxt)
            if budget < self.n_batch and (media or end - start > budget):
                break  # chunks keep their fixed positions: the next one waits for the next step
            if self.loras:
                self._use_lora(s.lora)
            if media:
                self._decode_media(s)
                break
            budget -= end - start
            self._prefill(s, start, end)
        return bool(decoded or waiting)

    def _prefill(self, s: _Slot, start: int, end: int):
        """Decode s.prompt[start:end] alone (one llama_decode, no logits)."""
        b = self.batch
        for i, t in enumerate(s.prompt[start:end]):
            self._put(b, i, t, len(s.cache) - s.pos_gap, s.seq, False)
            s.cache.append(t)
        s.n_prompt_done = end
        self.counters["prompt_decoded"] += end - start
        cnt = end - start
        # --fastfirsttoken: the last prompt token rides with the final chunk (one decode fewer before the first
        # token; its logits then depend on the chunk, so the text may differ from a cached or batched run)
        last = self.cfg.fast_first_token and end == len(s.prompt) - 1 and cnt < self.n_batch and s.beams is None
        if last:
            self._put(b, cnt, s.prompt[-1], len(s.cache) - s.pos_gap, s.seq, True)
            s.cache.append(s.prompt[-1])
            s.n_prompt_done += 1
            self.counters["prompt_decoded"] += 1
            cnt += 1
        if self._decode(cnt) and last and s.job is not None:
            self._sample(s, cnt - 1)

    def _decode_media(self, s: _Slot):
        """Decode a media chunk's encoded embeddings into the slot's own sequence. Causal chunks go n_batch
        embeddings per step, so neighbours keep generating between the pieces; non-causal (the whole chunk must
        see itself) and M-RoPE chunks go at once through llama.cpp's helper."""
        if s.cur_media is None:
            start = s.n_prompt_done
            chunk, embd = s.media.pop(start), s.embd.pop(start)
            if isinstance(embd, Exception):
                self._finish(s, "stop", -1, error=str(embd))
                return
            if chunk.n_tokens > self.n_batch and not self.projector.mrope and not self.projector.non_causal(chunk):
                s.cur_media = (start, chunk, embd)
        if s.cur_media is not None:
            self._decode_media_piece(s)
            return
        rc = self.projector.decode(self.ctx, chunk, embd, len(s.cache) - s.pos_gap, s.seq, self.n_batch)
        if rc != 0:
            L.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
            s.cache, s.pos_gap = [], 0
            self._finish(s, "stop", -1, error=f"llama.cpp failed to decode the {chunk.kind} ({rc})")
            return
        s.cache += s.prompt[start:start + chunk.n_tokens]
        s.pos_gap += chunk.n_tokens - chunk.n_pos  # M-RoPE: the chunk took n_pos positions, as in llama.cpp
        s.n_prompt_done = start + chunk.n_tokens

    def _decode_media_piece(self, s: _Slot):
        start, chunk, embd = s.cur_media
        off = s.n_prompt_done - start
        n = min(self.n_batch, chunk.n_tokens - off)
        d = self.projector.n_embd
        if self._embd_batch is None:
            self._embd_batch = L.llama_batch_init(self.n_batch, d, 1)
        b = self._embd_batch
        part = np.ascontiguousarray(embd[off * d:(off + n) * d], dtype=np.float32)
        ctypes.memmove(b.embd, part.ctypes.data, part.nbytes)
        pos0 = len(s.cache) - s.pos_gap
        for i in range(n):
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s.seq
            b.logits[i] = 0
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            L.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
            s.cache, s.pos_gap = [], 0
            self._finish(s, "stop", -1, error=f"llama.cpp failed to decode the {chunk.kind} ({rc})")
            return
        s.cache += s.prompt[start + off:start + off + n]
        s.n_prompt_done += n
        if off + n == chunk.n_tokens:
            s.cur_media = None

    _EMBD_CACHE_BYTES = 64 * 1024 * 1024  # recent encodings kept for images whose KV cache was evicted

    def _encode_loop(self):
        """The projector's thread: encode media for waiting slots, in submission order."""
        while True:
            item = self._encode_q.get()
            if item is None:
                return
            slot, job, i, chunk = item
            if job.aborted.is_set() or slot.job is not job:
                continue
            t0 = time.monotonic()
            embd = self._embd_cache.get(chunk.key)  # a neighbour slot may have just encoded the same image
            if embd is None:
                try:
                    embd = self.projector.encode(chunk)
                except Exception as e:
                    embd = e
            dt = time.monotonic() - t0
            with self._lock:
                if slot.job is job and i in slot.media:
                    slot.embd[i] = embd
                    slot.encode_time += dt
                if not isinstance(embd, Exception):
                    self._embd_cache.pop(chunk.key, None)
                    self._embd_cache[chunk.key] = embd
                    while len(self._embd_cache) > 8 or (len(self._embd_cache) > 1 and sum(
                            e.nbytes for e in self._embd_cache.values()) > self._EMBD_CACHE_BYTES):
                        self._embd_cache.pop(next(iter(self._embd_cache)))
                self._lock.notify_all()

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
                s.cache, s.pos_gap = [], 0
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
        try:
            tok = s.sampler.sample(self.ctx, idx)
        except GrammarDone:
            job.emit_text(s.stream.flush())
            self._finish(s, "stop", 1)
            return
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
            media_tokens=sum(1 for t in s.prompt if t < 0),
            cached_media_tokens=sum(1 for t in s.prompt[:s.cached] if t < 0),
            encode_time=s.encode_time,
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
            self.total_prompt_tokens += max(0, res.prompt_tokens - res.cached_tokens)
            self.total_generated_tokens += res.completion_tokens
            self.total_prompt_time += res.process_time
            self.total_eval_time += res.eval_time
            self.last_result = res
            self.last_genkey = job.genkey
            if not self._running and not self._waiting:
                self.idle_since = time.time()
        job.finish(res)
