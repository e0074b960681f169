#!/usr/bin/env python3
"""Issue 16's figures in one run: our server against llama-server (built by bench/build_llama.sh from the llama.cpp
sources vendored in the pinned llama-cpp-python), and our own features against their baselines.

    python bench/throughput.py [--model M.gguf] [--threads 2] [--tokens 96] [--rounds 6] [--skip-peer]

- single stream, time to first token (short and ~1,500-token prompts), 4 and 8 concurrent clients: ours and
  llama-server alternately, `--parallelrequests` equal to llama-server's `-np`, greedy, EOS ignored;
- llama-batched-bench's aggregate at 1, 4 and 8 sequences (the limit for the model on this machine);
- n=4 choices against n=1 (one request, same server);
- SmartCache: a returning ~1,500-token conversation after its slot was taken, against its cold time to first token.
Every figure is printed with its baseline from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.run import aggregate_tps  # noqa: E402
from tests.support import (ServerProcess, bundled_model_path, free_port, stop_process,  # noqa: E402
                           wait_until_up)

BIN = os.path.join(ROOT, "bench", ".llama-build", "build", "bin")


def post(url, body, timeout=900):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def ttft(base, prompt, n_tokens=4):
    """Seconds from sending a streamed /v1/completions to its first data chunk."""
    body = {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "top_k": 1, "stream": True,
            "ignore_eos": True, "bypass_eos": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            if first is None and line.startswith(b"data:") and b'"text"' in line:
                first = time.perf_counter() - t
    return first


def greedy(prompt, n_tokens, **kw):
    return {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "top_k": 1, "ignore_eos": True,
            "bypass_eos": True, **kw}


def aggregate(base, n_tokens, clients, tag):
    """Every client sends one request at once; total completion tokens per wall second."""
    counts = []

    def one(i):
        r = post(base + "/v1/completions", greedy(f"{tag} story {i}: once upon a time, in a city by the sea,",
                                                  n_tokens))
        counts.append(r["usage"]["completion_tokens"])

    return aggregate_tps(one, counts, clients)


def long_prompt(tag, n_words=1150):
    words = ("the river runs past the old mill and the town square where people meet to talk about the weather "
             "and the harvest").split()
    return f"[{tag}] " + " ".join(words[i % len(words)] for i in range(n_words))


class LlamaServer:
    def __init__(self, model, threads, n_par, n_ctx):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [os.path.join(BIN, "llama-server"), "-m", model, "-t", str(threads), "-tb", str(threads),
               "-np", str(n_par), "-c", str(n_ctx * n_par), "--port", str(self.port), "--host", "127.0.0.1",
               "-fa", "off"]
        self.log = open(f"/tmp/llama-server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        if wait_until_up(self.proc, self.url + "/health", 180, 0.3):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {self.log.name}")
        raise RuntimeError("llama-server did not come up")

    def stop(self):
        stop_process(self.proc)
        self.log.close()


def batched_bench(model, threads, n_tokens):
    exe = os.path.join(BIN, "llama-batched-bench")
    out = subprocess.run([exe, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", "4096", "-b", "512",
                          "-ub", "512", "-npp", "32", "-ntg", str(n_tokens), "-npl", "1,4,8", "-fa", "off"],
                         capture_output=True, text=True, timeout=900).stdout
    res = {}
    for line in out.splitlines():  # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |...
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[2] or ""):
            res[int(cells[2])] = float(cells[7])
    return res


FIGURES = ("single", "ttft short", "ttft 1500", "agg 4", "agg 8")


def figure(fig, name, base, n_tokens):
    tag = f"{name} {time.time()}"
    if fig == "single":
        return aggregate(base, n_tokens, 1, tag)
    if fig == "ttft short":
        return statistics.median(ttft(base, f"[{tag} {i}] Hello, how are you?") for i in range(3))
    if fig == "ttft 1500":
        return ttft(base, long_prompt(tag))
    return aggregate(base, n_tokens, int(fig.split()[1]), tag)


def peer_rounds(servers, n_tokens, rounds, results):
    """Each figure on each server in turn, the order flipped every round, so drift hits both alike."""
    for r in range(rounds):
        for fig in FIGURES:
            for name, base in (servers if r % 2 == 0 else servers[::-1]):
                results.setdefault((name, fig), []).append(figure(fig, name, base, n_tokens))


def n_choices(model, threads, n_tokens):
    with ServerProcess(model, "--threads", str(threads), "--parallelrequests", "4", "--contextsize", "2048",
                       "--quiet") as s:
        body = {"prompt": "Write a short story about a lighthouse keeper. " * 20, "max_tokens": n_tokens,
                "temperature": 1.0, "seed": 3, "bypass_eos": True}
        post(s.url + "/v1/completions", dict(body, max_tokens=1))  # warm: the prompt is cached for both below
        t1, t4 = [], []
        for _ in range(2):
            t = time.perf_counter()
            post(s.url + "/v1/completions", dict(body, n=1))
            t1.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = post(s.url + "/v1/completions", dict(body, n=4))
            t4.append(time.perf_counter() - t)
            assert r["usage"]["completion_tokens"] == 4 * n_tokens
        # a new 1,500-token prompt each time: n=4 against n=1
        c1, c4 = [], []
        for r in range(2):
            for n, out in ((1, c1), (4, c4)):
                t = time.perf_counter()
                post(s.url + "/v1/completions", dict(body, prompt=long_prompt(f"n{n} {r}"), n=n))
                out.append(time.perf_counter() - t)
    return min(t1), min(t4), min(c1), min(c4)


def smartcache(model, threads):
    with ServerProcess(model, "--threads", str(threads), "--parallelrequests", "1", "--contextsize", "4096",
                       "--smartcache", "4", "--quiet") as s:
        a, b, c = long_prompt("conversation A"), long_prompt("conversation B"), long_prompt("conversation C")
        cold = ttft(s.url, a)
        ttft(s.url, b)  # takes the only slot: A is saved to host memory
        back = ttft(s.url, a + " and then the bell rang")
        cold2 = ttft(s.url, c)
    return (cold + cold2) / 2, back


def fast_first_token(model, threads, reps=5):
    """Time to first token of new short prompts, default against --fastfirsttoken (servers alternated)."""
    a = ServerProcess(model, "--threads", str(threads), "--parallelrequests", "4", "--contextsize", "2048", "--quiet")
    b = ServerProcess(model, "--threads", str(threads), "--parallelrequests", "4", "--contextsize", "2048", "--quiet",
                      "--fastfirsttoken")
    try:
        ta, tb = [], []
        for i in range(reps):
            ta.append(ttft(a.url, f"[{i} a {time.time()}] Hello, how are you today? Tell me about the weather."))
            tb.append(ttft(b.url, f"[{i} b {time.time()}] Hello, how are you today? Tell me about the weather."))
    finally:
        a.stop()
        b.stop()
    return statistics.median(ta), statistics.median(tb)


def prompt_lookup(model, threads, n_tokens):
    """Greedy copy of a given text: default against --promptlookup 8 (servers alternated, prompt cached)."""
    text = ("The old lighthouse stood on the rocks at the end of the harbour. Every night the keeper climbed the "
            "ninety steps, lit the lamp and watched the ships pass by until the sun came up over the sea. ") * 2
    prompt = f"Copy the text exactly.\nText: {text}\nCopy: {text}\n\nText: {text}\nCopy:"
    servers = [ServerProcess(model, "--threads", str(threads), "--contextsize", "2048", "--quiet", *extra)
               for extra in ((), ("--promptlookup", "8"))]
    try:
        times, texts = [[], []], [None, None]
        for s in servers:
            post(s.url + "/v1/completions", greedy(prompt, 1))
        for _ in range(2):
            for i, s in enumerate(servers):
                t = time.perf_counter()
                texts[i] = post(s.url + "/v1/completions", greedy(prompt, n_tokens))["choices"][0]["text"]
                times[i].append(time.perf_counter() - t)
    finally:
        for s in servers:
            s.stop()
    return min(times[0]), min(times[1]), texts[0] == texts[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--skip-peer", action="store_true", help="no llama-server comparison")
    ap.add_argument("--only", default="", help="comma list of: peer,batched,n,smartcache,ttft,lookup")
    a = ap.parse_args()
    model = a.model or bundled_model_path()
    only = set(a.only.split(",")) if a.only else {"peer", "batched", "n", "smartcache", "ttft", "lookup"}
    have_peer = os.path.exists(os.path.join(BIN, "llama-server")) and not a.skip_peer
    print(f"model {os.path.basename(model)}, {a.threads} threads, {a.tokens} tokens per request, greedy, EOS ignored;"
          f" load average at start {os.getloadavg()[0]:.1f}")

    bb = {}
    if "batched" in only and have_peer and os.path.exists(os.path.join(BIN, "llama-batched-bench")):
        bb = batched_bench(model, a.threads, a.tokens)
        print("llama-batched-bench S_TG t/s: " + ", ".join(f"{k} seq {v:.1f}" for k, v in sorted(bb.items())))
    if "n" in only:
        t1, t4, c1, c4 = n_choices(model, a.threads, a.tokens)
        print(f"n=1: {t1 * 1000:.0f} ms   n=4: {t4 * 1000:.0f} ms   ratio {t4 / t1:.2f}x (cached prompt)")
        print(f"n=1: {c1 * 1000:.0f} ms   n=4: {c4 * 1000:.0f} ms   ratio {c4 / c1:.2f}x (new 1,500-token prompt, "
              f"{a.tokens} tokens each)")
        if bb.get(1) and bb.get(4):
            print(f"  the limit for a decode-bound n=4: llama-batched-bench's 4-sequence step costs "
                  f"{4 * bb[1] / bb[4]:.2f}x its 1-sequence step")
    if "ttft" in only:
        ta, tb = fast_first_token(model, a.threads)
        print(f"TTFT short new prompt: default {ta * 1000:.0f} ms, --fastfirsttoken {tb * 1000:.0f} ms: "
              f"{tb / ta:.2f}x")
    if "lookup" in only:
        t0, t1, same = prompt_lookup(model, a.threads, a.tokens)
        print(f"extractive task, {a.tokens} greedy tokens: plain {t0 * 1000:.0f} ms, --promptlookup 8 "
              f"{t1 * 1000:.0f} ms: {t0 / t1:.2f}x speed-up, same text: {same}")
    if "smartcache" in only:
        cold, back = smartcache(model, a.threads)
        print(f"SmartCache: cold TTFT (1,500 tokens) {cold * 1000:.0f} ms, returning after eviction "
              f"{back * 1000:.0f} ms: {back / cold:.3f}x")
    if "peer" not in only:
        return
    results = {}
    n_par = 8  # -np equal to our --parallelrequests
    ours = ServerProcess(model, "--threads", str(a.threads), "--parallelrequests", str(n_par), "--contextsize",
                         "2048", "--quiet")
    peer = LlamaServer(model, a.threads, n_par, 2048) if have_peer else None
    try:
        for base in [ours.url] + ([peer.url] if peer else []):
            aggregate(base, 8, 8, "warm")
        peer_rounds([("ours", ours.url)] + ([("llama-server", peer.url)] if peer else []), a.tokens, a.rounds,
                    results)
    finally:
        ours.stop()
        if peer:
            peer.stop()
    print(f"\n{'figure':<12}{'ours (median)':>16}{'llama-server':>16}{'ratio':>8}   per-round ratios")
    for fig in FIGURES:
        o = results.get(("ours", fig), [])
        p = results.get(("llama-server", fig), [])
        ms = fig.startswith("ttft")
        show = (lambda x: f"{x * 1000:.0f} ms") if ms else (lambda x: f"{x:.1f} tok/s")
        ratio = statistics.median(o) / statistics.median(p) if o and p else float("nan")
        each = " ".join(f"{x / y:.2f}" for x, y in zip(o, p))
        print(f"{fig:<12}{show(statistics.median(o)):>16}{show(statistics.median(p)) if p else '-':>16}"
              f"{ratio:>7.2f}x   {each}")
    for c in (4, 8):
        if bb.get(c) and results.get(("ours", f"agg {c}")):
            print(f"agg {c} ours / llama-batched-bench S_TG at {c} sequences (the limit; it counts no prefill): "
                  f"{statistics.median(results[('ours', f'agg {c}')]) / bb[c]:.2f}")
    print("(ttft: lower is better, a ratio below 1 means ours is faster; tok/s: above 1 means ours is faster)")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
