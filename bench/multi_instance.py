#!/usr/bin/env python3
"""Aggregate throughput of two instances behind LiteLLM's Router against one instance behind the same router,
measured in one run (the README's multi-instance recipe).

    python bench/multi_instance.py [--model M.gguf] [--threads 1] [--tokens 32] [--requests 12] [--clients 4] [--rounds 2]

Each instance gets --threads threads (default 1). The baseline is one of the two instances alone behind a
one-deployment router; the setups alternate for --rounds rounds and each keeps its best round.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")
import litellm  # noqa: E402

from tests.support import ServerProcess, bundled_model_path  # noqa: E402

MSG = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


def run(urls, n_requests, clients, tokens) -> tuple:
    """-> (generated tokens per second over the whole run, requests per instance url)."""
    router = litellm.Router(model_list=[{"model_name": "local", "litellm_params": {
        "model": "openai/local", "api_base": u + "/v1", "api_key": "none", "timeout": 600}} for u in urls],
        num_retries=2, retry_after=0)

    def one(i):
        r = router.completion(model="local", messages=MSG, max_tokens=tokens, temperature=0.8, seed=i,
                              extra_body={"ban_eos_token": True})
        return r.usage.completion_tokens, r._hidden_params.get("api_base", "")
    router.completion(model="local", messages=MSG, max_tokens=2)  # warm-up
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(n_requests)))
    dt = time.monotonic() - t0
    per = {}
    for _, base in out:
        per[base] = per.get(base, 0) + 1
    return sum(n for n, _ in out) / dt, per


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    model = a.model or bundled_model_path()
    common = ["--contextsize", "512"]
    # all servers start first (idle ones cost no CPU); the setups then alternate for --rounds rounds and each keeps
    # its best round, so a noisy neighbour on the machine hurts every setup alike
    with ServerProcess(model, *common, "--threads", str(a.threads)) as s1, \
            ServerProcess(model, *common, "--threads", str(a.threads)) as s2:
        setups = [(f"one instance, {a.threads} thread(s), behind the router", [s1.url]),
                  (f"two instances x {a.threads} thread(s) behind the router", [s1.url, s2.url])]
        best = {}
        for r in range(a.rounds):
            for name, urls in setups:
                tps, per = run(urls, a.requests, a.clients, a.tokens)
                print(f"round {r + 1}: {name}: {tps:.1f} tok/s", flush=True)
                if name not in best or tps > best[name][0]:
                    best[name] = (tps, per if len(urls) > 1 else None)
    base = best[setups[0][0]][0]
    print(f"{a.requests} chat requests, {a.tokens} tokens each, {a.clients} concurrent clients, "
          f"{os.cpu_count()} cores, best of {a.rounds} alternating rounds")
    print("| setup | aggregate tok/s | ratio to one instance |")
    print("|---|---|---|")
    for name, _ in setups:
        tps, per = best[name]
        extra = f" (requests per instance: {sorted(per.values())})" if per else ""
        print(f"| {name}{extra} | {tps:.1f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
