#!/usr/bin/env python3
"""Images in prompts: projector encode time, time to first token with and without the image cached, and how much a
streaming neighbour slot is slowed while another request's image is encoded. Measured in one run, against
baselines from the same run.

    python bench/multimodal.py [--model M.gguf --mmproj P.gguf] [--threads 2] [--runs 3]

Without --mmproj it uses the bundled Gemma 3 270M and a random-weight gemma3 projector (tests/tinymmproj.py) sized
like a small real tower (12 ViT layers, 448x448 images, 64 image tokens).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support import ServerProcess, bundled_model_path  # noqa: E402
from tests.tinymmproj import png_bytes, tiny_mmproj  # noqa: E402

SLOW = dict(hidden=384, n_layers=12, n_heads=6, ffn=1536, image_size=448, patch=14, scale=4)


def post(url, body, timeout=600):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def ttft(base, messages) -> float:
    """Seconds to the first generated text of an OpenAI chat stream."""
    body = {"messages": messages, "max_tokens": 2, "temperature": 0, "stream": True}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.monotonic()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            ch = json.loads(line[6:])["choices"]
            if first is None and ch and (ch[0]["delta"].get("content") or ch[0].get("finish_reason")):
                first = time.monotonic() - t0
    return first


def msgs(img, text="Describe this picture in detail."):
    content = [{"type": "text", "text": text}]
    if img is not None:
        content.append({"type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(img).decode()}})
    return [{"role": "user", "content": content}]


def neighbour_gaps(base, img):
    """Inter-token gaps of a streaming request while (optionally) a second request brings an image."""
    stamps = []
    body = {"prompt": "Once upon a time", "max_length": 120, "temperature": 0, "bypass_eos": True}

    def stream():
        req = urllib.request.Request(base + "/api/extra/generate/stream", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b"data:"):
                    stamps.append(time.monotonic())
    t = threading.Thread(target=stream)
    t.start()
    while len(stamps) < 5:
        time.sleep(0.005)
    t_img = time.monotonic()
    enc = 0.0
    if img is not None:
        post(base + "/api/v1/generate", {"prompt": "Describe.", "max_length": 1, "images": [
            base64.b64encode(img).decode()]})
        enc = get(base + "/api/extra/perf")["last_encode_time"]
    t_done = time.monotonic()
    t.join()
    window = [b - a for a, b in zip(stamps, stamps[1:]) if t_img <= b <= (t_done if img is not None else t_img + 1)]
    return window, enc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    model = a.model or bundled_model_path()
    proj = a.mmproj or tiny_mmproj(**SLOW)
    s = ServerProcess(model, "--mmproj", proj, "--threads", str(a.threads), "--parallelrequests", "2",
                      "--contextsize", "4096", "--quiet")
    try:
        base = s.url
        ttft(base, msgs(None, "warm up"))
        text_only, cold, cached, enc = [], [], [], []
        for i in range(a.runs):
            img = png_bytes(w=320, h=240, seed=1000 + i)
            text_only.append(ttft(base, msgs(None, f"Run {i}: describe this picture in detail.")))
            m = msgs(img, f"Run {i}: describe this picture in detail.")
            cold.append(ttft(base, m))
            enc.append(get(base + "/api/extra/perf")["last_encode_time"])
            m2 = m + [{"role": "assistant", "content": "A picture."}, {"role": "user", "content": "More detail?"}]
            cached.append(ttft(base, m2))
        perf = get(base + "/api/extra/perf")
        med = statistics.median
        base_ttft = med(text_only)
        print(f"projector {os.path.basename(proj)}, model {os.path.basename(model)}, {a.threads} threads, "
              f"median of {a.runs} runs, image tokens {perf['last_media_tokens']}")
        print(f"| figure | value | ratio to baseline |\n|---|---|---|")
        print(f"| TTFT, same chat without the image (baseline) | {base_ttft * 1000:.1f} ms | 1.00x |")
        print(f"| image encode time (projector) | {med(enc) * 1000:.1f} ms | {med(enc) / base_ttft:.2f}x |")
        print(f"| TTFT, new image | {med(cold) * 1000:.1f} ms | {med(cold) / base_ttft:.2f}x |")
        print(f"| TTFT, next turn with the image cached | {med(cached) * 1000:.1f} ms | {med(cached) / base_ttft:.2f}x |")
        print(f"| cached / new image TTFT | | {med(cached) / med(cold):.2f}x |")
        gaps0, _ = neighbour_gaps(base, None)
        gaps1, e1 = neighbour_gaps(base, png_bytes(w=320, h=240, seed=99))
        g0, g1 = med(gaps0), med(gaps1)
        print(f"| neighbour slot inter-token gap, alone | {g0 * 1000:.1f} ms | 1.00x |")
        print(f"| neighbour slot inter-token gap, while an image request runs (encode {e1 * 1000:.0f} ms) | "
              f"{g1 * 1000:.1f} ms (max {max(gaps1) * 1000:.0f} ms) | {g1 / g0:.2f}x |")
    finally:
        s.stop()


if __name__ == "__main__":
    main()
