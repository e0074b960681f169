#!/usr/bin/env python3
"""Speed of our engine and server against a bare llama.cpp loop and llama-cpp-python, measured in one run.

    python bench/run.py [--model M.gguf] [--threads 2] [--tokens 128] [--quick]

Every figure is printed next to its baseline from the same run, as a ratio (these machines are noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import llama_cpp as L  # noqa: E402

from gguf_loader.engine import Engine, EngineConfig  # noqa: E402
from gguf_loader.llama_model import init_backend  # noqa: E402
from gguf_loader.jobs import GenRequest, SamplingParams  # noqa: E402
from tests.support import ServerProcess  # noqa: E402

PROMPT = "The history of the city of Paris begins"
GREEDY = SamplingParams(temperature=0)


def bare_loop(model_path, threads, n_tokens, prompt_len=512):
    """Greedy decode with llama-cpp-python's low-level calls only: the limit."""
    init_backend()  # the same quiet logging the engine uses
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False  # the engine's model settings
    mp.use_mmap = False
    model = L.llama_model_load_from_file(model_path.encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 2048, 512, 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.swa_full = True
    cp.flash_attn_type = 0  # the engine's context settings, so both run the same kernels
    cp.kv_unified = False
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    smpl = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(smpl, L.llama_sampler_init_greedy())
    batch = L.llama_batch_init(512, 0, 1)

    def decode(tokens, start):
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        assert L.llama_decode(ctx, batch) == 0

    buf = (L.llama_token * 64)()
    n = L.llama_tokenize(vocab, PROMPT.encode(), len(PROMPT.encode()), buf, 64, True, False)
    toks = list(buf[:n])
    decode(toks, 0)
    t = time.perf_counter()
    pos = len(toks)
    for _ in range(n_tokens):
        tok = L.llama_sampler_sample(smpl, ctx, -1)
        decode([tok], pos)
        pos += 1
    decode_tps = n_tokens / (time.perf_counter() - t)
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    long = [2] + [1000 + (i % 5000) for i in range(prompt_len - 1)]
    t = time.perf_counter()
    decode(long, 0)
    pp_tps = prompt_len / (time.perf_counter() - t)
    L.llama_batch_free(batch)
    L.llama_sampler_free(smpl)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return decode_tps, pp_tps


def create_completion(model_path, threads, n_tokens):
    llm = L.Llama(model_path=model_path, n_ctx=2048, n_threads=threads, verbose=False)
    llm.create_completion(PROMPT, max_tokens=4, temperature=0)
    t = time.perf_counter()
    out = llm.create_completion(PROMPT + " ", max_tokens=n_tokens, temperature=0, top_k=1)
    dt = time.perf_counter() - t
    n = out["usage"]["completion_tokens"]
    del llm
    return n / dt


def engine_direct(model_path, threads, n_tokens):
    e = Engine(EngineConfig(model_path, n_ctx=2048, n_threads=threads, quiet=True))
    e.submit(GenRequest(prompt="warm up", max_length=2)).wait()
    r = e.submit(GenRequest(prompt=PROMPT, max_length=n_tokens, sampling=GREEDY)).wait()
    long = [2] + [1000 + (i % 5000) for i in range(511)]
    r2 = e.submit(GenRequest(prompt=long, max_length=1, sampling=GREEDY)).wait()
    e.close()
    return r.completion_tokens / r.eval_time, (r2.prompt_tokens - r2.cached_tokens) / r2.process_time


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def stream_ttft(url, body):
    """Kobold SSE stream: (seconds to the first token event, number of token events, total seconds)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    first, n = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data:"):
                d = json.loads(line[5:])
                if d.get("token"):
                    n += 1
                    if first is None:
                        first = time.perf_counter() - t
    return first, n, time.perf_counter() - t


def oa_stream_timing(base, n_tokens, prompt=PROMPT):
    """/v1/completions streamed: (time to first token s, decode tok/s after the first token, completion tokens)."""
    body = {"model": "m", "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "top_k": 1}
    n = post(base + "/v1/completions", body)["usage"]["completion_tokens"]
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    first = last = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data:") and b"[DONE]" not in line:
                d = json.loads(line[5:])
                if d.get("choices") and d["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
    return first - t, (n - 1) / (last - first) if last > first else 0.0, n


class PeerServer:
    """llama-cpp-python's own server (python -m llama_cpp.server), the peer for the HTTP figures."""

    def __init__(self, model_path, threads, n_ctx=2048):
        from tests.support import free_port
        import subprocess
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model_path,
                                      "--n_threads", str(threads), "--n_ctx", str(n_ctx), "--port", str(self.port),
                                      "--verbose", "False"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("llama_cpp.server did not start")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(20)


def peer_figures(model_path, threads, n_tokens):
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None  # pip install -r requirements-bench.txt
    with PeerServer(model_path, threads) as p:
        post(p.url + "/v1/completions", {"prompt": "warm", "max_tokens": 2})
        ttft, dec, _ = oa_stream_timing(p.url, n_tokens)
        agg = concurrent_oa(p.url, 64)
    return {"ttft_ms": ttft * 1000, "decode_tps": dec, "agg4": agg}


def concurrent_oa(base, n_tokens, clients=4):
    counts = []

    def one(i):
        r = post(base + "/v1/completions", {"prompt": f"Story number {i}: once upon a time", "max_tokens": n_tokens,
                                            "temperature": 0, "top_k": 1})
        counts.append(r["usage"]["completion_tokens"])

    return aggregate_tps(one, counts, clients)


def aggregate_tps(one, counts, clients):
    """Run one(i) for each client at once; total tokens (appended to `counts` by one) per second."""
    ths = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return sum(counts) / (time.perf_counter() - t)


def rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int([line for line in f if line.startswith("VmRSS")][0].split()[1]) / 1024


def chat_turns(model_path, threads, extra, turns=10):
    """A 10-turn chat over a ~1,500-token history: time to first token per turn."""
    history = "".join(f"User: Tell me fact number {i} about the sea.\nBot: Fact {i}: the sea is large, deep and "
                      f"full of life of many kinds.\n" for i in range(50))
    out = []
    with ServerProcess(model_path, "--threads", str(threads), "--contextsize", "4096", "--quiet", *extra) as s:
        post(s.url + "/api/v1/generate", {"prompt": "warm", "max_length": 2})
        for t in range(turns):
            history += f"User: and what about fact {100 + t}?\nBot:"
            ttft, _, _ = stream_ttft(s.url + "/api/extra/generate/stream", {"prompt": history, "max_length": 12,
                                                                          "temperature": 0})
            r = post(s.url + "/api/v1/generate", {"prompt": history, "max_length": 12, "temperature": 0})
            history += r["results"][0]["text"] + "\n"
            out.append(ttft * 1000)
    return out


def overflow_turns(model_path, threads, extra, turns=6):
    """A chat that overflows a 1024-token context, dropping its oldest turns like a chat client: prompt tokens
    processed per turn (read from /api/extra/perf)."""
    system = "A chat log about the weather in many towns.\n"
    lines = [f"User: weather in town {i}?\nBot: In town {i} it is sunny, {10 + i % 20} degrees, light wind.\n"
             for i in range(200)]
    out = []
    with ServerProcess(model_path, "--threads", str(threads), "--contextsize", "1024", "--quiet", *extra) as s:
        start = 0
        for t in range(turns + 1):
            end = 22 + 3 * t
            while len((system + "".join(lines[start:end])).split()) > 600:  # keep under the context, as clients do
                start += 1
            post(s.url + "/api/v1/generate", {"prompt": system + "".join(lines[start:end]), "max_length": 8,
                                              "temperature": 0})
            perf = json.loads(urllib.request.urlopen(s.url + "/api/extra/perf").read())
            if t:
                out.append(perf["last_input_count"] - perf["last_cached_tokens"])
    return out


def server_figures(model_path, threads, n_tokens, quick):
    out = {}
    with ServerProcess(model_path, "--threads", str(threads), "--contextsize", "4096", "--quiet") as s:
        gen = s.url + "/api/v1/generate"
        out["rss_load_mb"] = rss_mb(s.proc.pid)
        post(gen, {"prompt": "warm", "max_length": 2})
        out["oa_ttft_ms"], out["oa_decode_tps"], _ = (lambda a: (a[0] * 1000, a[1], a[2]))(oa_stream_timing(s.url, n_tokens))
        t = time.perf_counter()
        r = post(gen, {"prompt": PROMPT, "max_length": n_tokens, "temperature": 0, "top_k": 1})
        wall = time.perf_counter() - t
        perf = json.loads(urllib.request.urlopen(s.url + "/api/extra/perf").read())
        out["http_decode_tps"] = perf["last_eval_speed"]
        out["http_wall_tps"] = r["results"][0].get("completion_tokens", n_tokens) / wall
        # per-request overhead of a 1-token request: wall time minus the engine's own time
        over = []
        for i in range(5 if quick else 20):
            t = time.perf_counter()
            post(gen, {"prompt": f"Hello {i}", "max_length": 1, "temperature": 0})
            wall = time.perf_counter() - t
            perf = json.loads(urllib.request.urlopen(s.url + "/api/extra/perf").read())
            over.append(wall - perf["last_process_time"] - perf["last_eval_time"])
        over.sort()
        out["overhead_ms"] = over[len(over) // 2] * 1000
        # chat with a ~1,500-token history: time to first token, cold vs. reused cache
        history = "".join(f"User: Tell me fact number {i} about the sea.\nBot: Fact {i}: the sea is large, deep and "
                          f"full of life of many kinds.\n" for i in range(50))
        cold = stream_ttft(s.url + "/api/extra/generate/stream", {"prompt": "Z " + history, "max_length": 4,
                                                                   "temperature": 0})[0]
        stream_ttft(s.url + "/api/extra/generate/stream", {"prompt": history, "max_length": 4, "temperature": 0})
        warm = stream_ttft(s.url + "/api/extra/generate/stream", {"prompt": history + "User: and more?\nBot:",
                                                                   "max_length": 4, "temperature": 0})[0]
        out["ttft_cold_ms"], out["ttft_warm_ms"] = cold * 1000, warm * 1000
        out["rss_before_100_mb"] = rss_mb(s.proc.pid)
        for i in range(100):
            post(gen, {"prompt": f"Request {i}: the weather today", "max_length": 4, "temperature": 0.7})
        out["rss_mb"] = rss_mb(s.proc.pid)
    return out


def concurrent(model_path, threads, n_tokens, slots, clients=4):
    with ServerProcess(model_path, "--threads", str(threads), "--parallelrequests", str(slots), "--quiet",
                       "--contextsize", "2048") as s:
        gen = s.url + "/api/v1/generate"
        post(gen, {"prompt": "warm", "max_length": 2})
        counts = []

        def one(i):
            r = post(gen, {"prompt": f"Story number {i}: once upon a time", "max_length": n_tokens,
                           "temperature": 0, "ban_eos_token": True})
            counts.append(r["results"][0]["completion_tokens"])

        return aggregate_tps(one, counts, clients)


PARTS = {"bare": bare_loop, "cc": create_completion, "engine": engine_direct}


def part(name, a):
    """Run one in-process figure in a process of its own: llama.cpp's OpenMP worker teams of an earlier context
    in the same process (a different calling thread) measurably slow the next one on 2 cores."""
    import subprocess
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--part", name, "--model", a.model,
                          "--threads", str(a.threads), "--tokens", str(a.tokens)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not a.model:
        from gguf_loader.bundled import ensure_default_model
        a.model = str(ensure_default_model(quiet=True))
    if a.part:
        print(json.dumps(PARTS[a.part](a.model, a.threads, a.tokens)))
        return
    print(f"model {os.path.basename(a.model)}, {a.threads} threads, {a.tokens} tokens greedy, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs", flush=True)
    bare1 = part("bare", a)
    cc = part("cc", a)
    eng_dec, eng_pp = part("engine", a)
    srv = server_figures(a.model, a.threads, a.tokens, a.quick)
    peer = peer_figures(a.model, a.threads, a.tokens)
    agg1 = concurrent(a.model, a.threads, 64, 1)
    agg4 = concurrent(a.model, a.threads, 64, 4)
    reuse = chat_turns(a.model, a.threads, [], 4 if a.quick else 10)
    noreuse = chat_turns(a.model, a.threads, ["--nofastforward"], 4 if a.quick else 10)
    shift = overflow_turns(a.model, a.threads, [])
    noshift = overflow_turns(a.model, a.threads, ["--noshift"])
    bare2 = part("bare", a)  # the limit again at the end: the baseline is the mean of both
    bare_dec, bare_pp = (bare1[0] + bare2[0]) / 2, (bare1[1] + bare2[1]) / 2
    print(f"bare loop at start {bare1[0]:.1f} tok/s decode, {bare1[1]:.1f} prompt; at end {bare2[0]:.1f}, "
          f"{bare2[1]:.1f} (machine drift)")
    model_mb = os.path.getsize(a.model) / 2 ** 20
    rows = [
        ("decode, bare llama.cpp loop (limit)", bare_dec, "tok/s", bare_dec),
        ("decode, Llama.create_completion (peer)", cc, "tok/s", bare_dec),
        ("decode, our engine direct", eng_dec, "tok/s", bare_dec),
        ("decode over HTTP, our server (/v1/completions stream)", srv["oa_decode_tps"], "tok/s", bare_dec),
        ("decode over HTTP, our server (engine time, native API)", srv["http_decode_tps"], "tok/s", bare_dec),
    ]
    if peer:
        rows.append(("decode over HTTP, llama_cpp.server (peer)", peer["decode_tps"], "tok/s", bare_dec))
    rows += [
        ("prompt 512 tokens, bare loop (limit)", bare_pp, "tok/s", bare_pp),
        ("prompt 512 tokens, our engine", eng_pp, "tok/s", bare_pp),
        ("time to first token, our server (short prompt)", srv["oa_ttft_ms"], "ms", srv["oa_ttft_ms"]),
    ]
    if peer:
        rows.append(("time to first token, llama_cpp.server", peer["ttft_ms"], "ms", srv["oa_ttft_ms"]))
    rows += [
        ("1-token request overhead beyond engine time", srv["overhead_ms"], "ms", None),
        ("RSS after load (model file %.0f MB)" % model_mb, srv["rss_load_mb"], "MB", None),
        ("RSS before 100 requests", srv["rss_before_100_mb"], "MB", None),
        ("RSS after 100 requests", srv["rss_mb"], "MB", srv["rss_before_100_mb"]),
        ("4 clients aggregate, ours --parallelrequests 1", agg1, "tok/s", agg1),
        ("4 clients aggregate, ours --parallelrequests 4", agg4, "tok/s", agg1),
    ]
    if peer:
        rows.append(("4 clients aggregate, llama_cpp.server (peer)", peer["agg4"], "tok/s", agg1))
    rows += [
        ("chat TTFT, 1,500-token history, cold", srv["ttft_cold_ms"], "ms", srv["ttft_cold_ms"]),
        ("chat TTFT, 1,500-token history, cached", srv["ttft_warm_ms"], "ms", srv["ttft_cold_ms"]),
        ("10-turn chat, mean TTFT per turn, no reuse (--nofastforward)", sum(noreuse) / len(noreuse), "ms",
         sum(noreuse) / len(noreuse)),
        ("10-turn chat, mean TTFT per turn, with reuse", sum(reuse) / len(reuse), "ms", sum(noreuse) / len(noreuse)),
        ("context overflow, prompt tokens processed per turn, --noshift", sum(noshift) / len(noshift), "tok",
         sum(noshift) / len(noshift)),
        ("context overflow, prompt tokens processed per turn, ContextShift", sum(shift) / len(shift), "tok",
         sum(noshift) / len(noshift)),
    ]
    print(f"\n| figure | value | ratio to baseline |\n|---|---|---|")
    for name, v, unit, base in rows:
        ratio = f"{v / base:.2f}x" if base else "-"
        print(f"| {name} | {v:.1f} {unit} | {ratio} |")
    print("\nTTFT per turn (ms), with reuse:", " ".join(f"{x:.0f}" for x in reuse))
    print("TTFT per turn (ms), no reuse:  ", " ".join(f"{x:.0f}" for x in noreuse))
    print("prompt tokens processed per overflow turn, ContextShift:", shift, " --noshift:", noshift)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n(bench process peak RSS {peak:.0f} MB)")


if __name__ == "__main__":
    main()
