"""Routes for load balancers and monitoring, in llama-server's shapes: /health, /slots, /props, /metrics."""
from __future__ import annotations

import time
import urllib.parse

from gguf_loader.jobs import SamplingParams

BUILD_INFO = "koboldcpp.py"


def _query(h) -> dict:
    q = urllib.parse.parse_qs(h.path.split("?", 1)[1] if "?" in h.path else "")
    return {k: v[-1] for k, v in q.items()}


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def _slot_counts(engine) -> tuple:
    slots = engine.slots_info()
    busy = sum(1 for s in slots if s["busy"])
    return len(slots) - busy, busy


def _no_slot(h):
    err = {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}
    h.send_json(503, err, [("Retry-After", "1")])


def health(h):
    if h.server.state is None:
        load = h.server.load
        p = round(load.progress, 4) if load else 0.0
        h.send_json(503, {"status": "loading", "progress": p,
                          "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                     [("Retry-After", "2")])
        return
    e = h.state.current_engine()
    if e is None:  # unloaded while idle (--unloadtimeout): the next request loads it again
        h.send_json(200, {"status": "ok", "slots_idle": 0, "slots_processing": 0, "model_loaded": False})
        return
    idle, busy = _slot_counts(e)
    if idle == 0 and _truthy(_query(h).get("fail_on_no_slot", "")):
        _no_slot(h)
        return
    h.send_json(200, {"status": "ok", "slots_idle": idle, "slots_processing": busy})


def slots(h):
    e = h.state.current_engine()
    info = e.slots_info() if e is not None else []
    if _truthy(_query(h).get("fail_on_no_slot", "")) and info and all(s["busy"] for s in info):
        _no_slot(h)
        return
    out = []
    for s in info:
        item = {"id": s["id"], "id_task": s["job_id"], "n_ctx": e.n_ctx, "speculative": False,
                "is_processing": s["busy"], "n_cached": s["n_cached"], "prompt_progress": s["progress"],
                "next_token": {"has_next_token": s["busy"], "has_new_line": False,
                               "n_remain": s.get("n_remain", -1), "n_decoded": s.get("n_decoded", 0),
                               "stopping_word": ""}}
        out.append(item)
    h.send_json(200, out)


def _default_params(state) -> dict:
    sp = SamplingParams()
    return {"n_predict": state.defaults.max_length, "temperature": sp.temperature, "top_k": sp.top_k,
            "top_p": sp.top_p, "min_p": sp.min_p, "typical_p": sp.typical, "tfs_z": sp.tfs,
            "repeat_penalty": sp.rep_pen, "repeat_last_n": sp.rep_pen_range, "presence_penalty": sp.presence_penalty,
            "frequency_penalty": sp.frequency_penalty, "mirostat": sp.mirostat, "mirostat_tau": sp.mirostat_tau,
            "mirostat_eta": sp.mirostat_eta, "dry_multiplier": sp.dry_multiplier, "dry_base": sp.dry_base,
            "dry_allowed_length": sp.dry_allowed_length, "xtc_probability": sp.xtc_probability,
            "xtc_threshold": sp.xtc_threshold, "seed": sp.seed, "stop": [], "stream": False}


def props(h):
    s = h.state
    e = s.current_engine()
    if e is None:  # never load a model just to describe it
        h.send_json(200, {"model_alias": s.model_name, "model_loaded": False, "total_slots": 0,
                          "build_info": f"{BUILD_INFO} {s.program_version}"})
        return
    tmpl = e.chat_template or ""
    bos = e.metadata.get("tokenizer.ggml.bos_token_id")
    eos = e.metadata.get("tokenizer.ggml.eos_token_id")

    def piece(tid):
        try:
            return e.detokenize([int(tid)], special=True) if tid is not None else ""
        except (TypeError, ValueError):
            return ""
    h.send_json(200, {
        "default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": e.n_ctx, "speculative": False,
                                        "is_processing": False, "params": _default_params(s)},
        "total_slots": e.n_slots,
        "model_path": e.model_path,
        "model_alias": s.model_name,
        "chat_template": tmpl,
        "chat_adapter": s.chat.adapter_name,
        "modalities": {"vision": bool(e.vision), "audio": bool(e.audio)},
        "bos_token": piece(bos),
        "eos_token": piece(eos),
        "build_info": f"{BUILD_INFO} {s.program_version}",
    })


# ---------------------------------------------------------------- Prometheus text format

def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Doc:
    def __init__(self):
        self.lines = []

    def metric(self, name: str, kind: str, help_: str, samples):
        """samples: [(labels dict, value)] or a single value."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        if not isinstance(samples, list):
            samples = [({}, samples)]
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {float(value)!r}" if lab else f"{name} {float(value)!r}")

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode("utf-8")


def metrics_text(server) -> bytes:
    d = _Doc()
    m = server.metrics
    snap = m.snapshot() if m else {}
    d.metric("kcpp_requests_total", "counter", "HTTP requests by route, method and status.",
             [({"route": r, "method": meth, "status": st}, c) for (r, meth, st), (c, _) in sorted(snap.items())])
    d.metric("kcpp_request_seconds_total", "counter", "Seconds spent answering HTTP requests, by route.",
             [({"route": r, "method": meth, "status": st}, t) for (r, meth, st), (_, t) in sorted(snap.items())])
    state = server.state
    engine = state.current_engine() if state is not None else None
    if engine is not None:
        c = engine.totals()
        d.metric("kcpp_prompt_tokens_total", "counter", "Prompt tokens processed (cached tokens excluded).",
                 c["prompt_tokens"])
        d.metric("kcpp_generated_tokens_total", "counter", "Tokens generated.", c["generated_tokens"])
        d.metric("kcpp_prompt_seconds_total", "counter", "Seconds spent processing prompts.", c["prompt_seconds"])
        d.metric("kcpp_generation_seconds_total", "counter", "Seconds spent generating tokens.", c["eval_seconds"])
        d.metric("kcpp_prompt_tokens_per_second", "gauge", "Average prompt processing speed since start.",
                 c["prompt_tokens"] / c["prompt_seconds"] if c["prompt_seconds"] > 0 else 0.0)
        d.metric("kcpp_generation_tokens_per_second", "gauge", "Average generation speed since start.",
                 c["generated_tokens"] / c["eval_seconds"] if c["eval_seconds"] > 0 else 0.0)
        d.metric("kcpp_generations_total", "counter", "Finished generation jobs.", c["gens"])
        d.metric("kcpp_queue_depth", "gauge", "Requests waiting for a slot.", c["queue"])
        d.metric("kcpp_slots_busy", "gauge", "Slots running a request.", c["busy_slots"])
        d.metric("kcpp_slots_total", "gauge", "Slots (--parallelrequests).", c["slots"])
        d.metric("kcpp_kv_cache_cells_used", "gauge", "KV cache cells holding tokens, all slots.", c["kv_cells_used"])
        d.metric("kcpp_kv_cache_cells_total", "gauge", "KV cache cells, all slots.", c["kv_cells_total"])
        d.metric("kcpp_model_load_seconds", "gauge", "Seconds the model took to load.", c["load_seconds"])
    d.metric("kcpp_model_loaded", "gauge", "1 once the model is loaded and requests are served.",
             1 if state is not None else 0)
    d.metric("kcpp_uptime_seconds", "gauge", "Seconds since the server started.",
             time.time() - (m.started if m else time.time()))
    horde = server.extras.get("horde")
    if horde is not None:
        st = horde.stats()
        d.metric("kcpp_horde_jobs_total", "counter", "AI Horde jobs by outcome.",
                 [({"outcome": k}, st[k]) for k in ("submitted", "faulted", "rejected")])
        d.metric("kcpp_horde_tokens_total", "counter", "Tokens generated for the AI Horde.", st["tokens"])
        d.metric("kcpp_horde_kudos_total", "counter", "Kudos the AI Horde awarded.", st["kudos"])
        d.metric("kcpp_horde_errors_total", "counter", "Failed calls to the AI Horde.", st["errors"])
    return d.text()


def metrics(h):
    h.send_bytes(200, metrics_text(h.server), "text/plain; version=0.0.4; charset=utf-8")


def register(t):
    t.add("GET", "/health", health, while_loading=True)
    t.add("GET", "/slots", slots, auth=True)
    t.add("GET", "/props", props, auth=True)
    t.add("GET", "/metrics", metrics, auth=True)
