// Built-in web page for koboldcpp.py: talks to the serving host through the native Kobold API only.
"use strict";

(() => {
  const LS_SETTINGS = "kcpp.settings.v1";
  const LS_SESSION = "kcpp.session.v1";
  const LS_KEY = "kcpp.apikey";
  const SESSION_FORMAT = "koboldcpp-py-session";

  const SAMPLER_NAMES = { 0: "Top-k", 1: "Top-a", 2: "Top-p", 3: "Tail-free", 4: "Typical", 5: "Temperature", 6: "Repetition penalty" };
  const DEFAULT_ORDER = [6, 0, 1, 3, 4, 2, 5];

  // key = native API field; the page shows one input per entry with data-testid="setting-<key>"
  const FIELDS = [
    { key: "max_context_length", label: "Max context", hint: "tokens", kind: "int", min: 256, max: 262144, def: 4096 },
    { key: "max_length", label: "Amount to generate", hint: "tokens", kind: "int", min: 1, max: 8192, def: 200 },
    { key: "temperature", label: "Temperature", kind: "float", min: 0, max: 5, step: 0.01, def: 0.75, slider: [0, 2] },
    { key: "top_p", label: "Top-p", kind: "float", min: 0, max: 1, step: 0.01, def: 0.92, slider: [0, 1] },
    { key: "top_k", label: "Top-k", hint: "0 = off", kind: "int", min: 0, max: 1000, def: 100 },
    { key: "min_p", label: "Min-p", kind: "float", min: 0, max: 1, step: 0.01, def: 0, slider: [0, 1] },
    { key: "rep_pen", label: "Repetition penalty", kind: "float", min: 0.1, max: 5, step: 0.01, def: 1.07, slider: [1, 2] },
    { key: "rep_pen_range", label: "Rep. penalty range", hint: "tokens", kind: "int", min: 0, max: 262144, def: 360 },
    { key: "sampler_seed", label: "Seed", hint: "-1 = random", kind: "int", min: -1, max: 2147483647, def: -1 },
    { key: "stop_sequence", label: "Stop sequences", hint: "one per line; \\n = newline", kind: "lines", def: [] },
  ];

  const $ = (id) => document.getElementById(id);
  const el = {};
  for (const id of ["app", "mode", "output", "output-wrap", "input", "btn-send", "btn-stop", "btn-retry", "btn-continue",
    "btn-undo", "btn-new", "btn-save", "btn-load", "load-file", "btn-settings", "settings", "settings-close",
    "setting-fields", "sampler-order", "settings-reset", "memory", "note", "note-depth", "user-name", "bot-name",
    "system-prompt", "error", "error-text", "error-action", "error-close", "status", "perf", "ctx-fill", "ctx-text",
    "ctx-meter", "model-name", "model-ctx", "server-version", "conn-dot", "key-dialog", "key-form", "key-input",
    "key-error", "btn-attach", "attach-file", "attach-preview"]) {
    el[id] = $(id);
  }

  // ---------- state ----------
  const server = { connected: false, protected: false, maxCtx: 0, model: "", version: "", vision: false };
  const MAX_IMAGES = 8; // the server's per-request limit
  const IMAGE_SIDE = 1024; // attached images are scaled to fit this (keeps sessions small)
  let pendingImage = null; // data: URL attached to the next user message
  let settings = loadSettings();
  let session = loadSession();
  let undoStack = [];
  let gen = null; // the running generation: {genkey, ctrl, stopping}
  let lastGen = null; // what the last generation added: {idx, prevLen, created, kind}
  let editSnapshotPending = false;
  // plaintext-only keeps pasted formatting out; browsers without it get plain "true"
  const EDITABLE = (() => {
    try { document.createElement("span").contentEditable = "plaintext-only"; return "plaintext-only"; } catch (e) { return "true"; }
  })();

  function freshSession() {
    return {
      mode: "story", turns: [], memory: "", note: "", noteDepth: 3,
      userName: "You", botName: "KoboldAI", system: "You are a helpful assistant.", draft: "",
    };
  }

  function defaultSettings() {
    const s = {};
    for (const f of FIELDS) s[f.key] = Array.isArray(f.def) ? [...f.def] : f.def;
    s.sampler_order = [...DEFAULT_ORDER];
    return s;
  }

  function readJSON(key) {
    try {
      const raw = localStorage.getItem(key);
      return raw ? JSON.parse(raw) : null;
    } catch (e) {
      return null; // unreadable storage is the same as none
    }
  }

  function loadSettings() {
    return cleanSettings(readJSON(LS_SETTINGS) || {}).settings;
  }

  // Accepts partial or foreign data; keeps only valid values, reports the rest.
  function cleanSettings(obj) {
    const out = defaultSettings();
    const bad = [];
    if (!obj || typeof obj !== "object") return { settings: out, bad };
    for (const f of FIELDS) {
      if (!(f.key in obj)) continue;
      const v = validateField(f, obj[f.key]);
      if (v.error) bad.push(`${f.label}: ${v.error}`);
      else out[f.key] = v.value;
    }
    if ("sampler_order" in obj) {
      const v = validateOrder(obj.sampler_order);
      if (v.error) bad.push(`Sampler order: ${v.error}`);
      else out.sampler_order = v.value;
    }
    return { settings: out, bad };
  }

  function validateField(f, raw) {
    if (f.kind === "lines") {
      if (!Array.isArray(raw) || raw.some((x) => typeof x !== "string")) return { error: "must be a list of strings" };
      return { value: raw.filter((x) => x.length > 0).slice(0, 64) };
    }
    const n = typeof raw === "number" ? raw : (typeof raw === "string" && raw.trim() !== "" ? Number(raw) : NaN);
    if (!Number.isFinite(n)) return { error: "must be a number" };
    if (f.kind === "int" && !Number.isInteger(n)) return { error: "must be a whole number" };
    if (n < f.min || n > f.max) return { error: `must be between ${f.min} and ${f.max}` };
    return { value: n };
  }

  function validateOrder(v) {
    if (!Array.isArray(v) || v.length < 1 || v.length > 7) return { error: "must list 1 to 7 samplers" };
    if (v.some((x) => !Number.isInteger(x) || x < 0 || x > 6)) return { error: "ids must be 0 to 6" };
    if (new Set(v).size !== v.length) return { error: "ids must not repeat" };
    return { value: [...v] };
  }

  function saveSettings() {
    try { localStorage.setItem(LS_SETTINGS, JSON.stringify(settings)); } catch (e) { showError("Could not save settings in this browser: " + e.message); }
  }

  function loadSession() {
    const r = cleanSession(readJSON(LS_SESSION));
    return r.error ? freshSession() : r.session;
  }

  function cleanSession(obj) {
    if (!obj || typeof obj !== "object" || Array.isArray(obj)) return { error: "not a session object" };
    const s = freshSession();
    if (obj.mode !== undefined) {
      if (!["story", "chat", "instruct"].includes(obj.mode)) return { error: `unknown mode ${JSON.stringify(obj.mode)}` };
      s.mode = obj.mode;
    }
    if (obj.turns !== undefined) {
      if (!Array.isArray(obj.turns)) return { error: "'turns' must be a list" };
      for (const t of obj.turns) {
        if (!t || typeof t.text !== "string" || !["user", "ai"].includes(t.role)) return { error: "each turn needs a role (user or ai) and a text" };
      }
      for (const t of obj.turns) {
        if (t.images !== undefined && (!Array.isArray(t.images) || !t.images.every((u) => typeof u === "string" && u.startsWith("data:image/")))) {
          return { error: "a turn's 'images' must be a list of data:image URLs" };
        }
      }
      s.turns = obj.turns.map((t) => (t.images && t.images.length ? { role: t.role, text: t.text, images: [...t.images] } : { role: t.role, text: t.text }));
    }
    for (const k of ["memory", "note", "userName", "botName", "system", "draft"]) {
      if (obj[k] === undefined) continue;
      if (typeof obj[k] !== "string") return { error: `'${k}' must be text` };
      s[k] = obj[k];
    }
    if (obj.noteDepth !== undefined) {
      if (!Number.isInteger(obj.noteDepth) || obj.noteDepth < 0 || obj.noteDepth > 50) return { error: "'noteDepth' must be 0 to 50" };
      s.noteDepth = obj.noteDepth;
    }
    if (!s.userName.trim()) s.userName = "You";
    if (!s.botName.trim()) s.botName = "KoboldAI";
    return { session: s };
  }

  let saveTimer = 0;
  function autosave() {
    clearTimeout(saveTimer);
    saveTimer = setTimeout(saveSessionNow, 250);
  }
  function saveSessionNow() {
    clearTimeout(saveTimer);
    try { localStorage.setItem(LS_SESSION, JSON.stringify(session)); } catch (e) { showError("Autosave failed: " + e.message); }
  }

  function snapshot() {
    undoStack.push(JSON.stringify({ session, lastGen }));
    if (undoStack.length > 100) undoStack.shift();
    updateButtons();
  }

  // ---------- server calls ----------
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = localStorage.getItem(LS_KEY);
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  async function errorFrom(res) {
    let body = null;
    let text = "";
    try { text = await res.text(); body = JSON.parse(text); } catch (e) { /* not JSON */ }
    let msg = "";
    if (body && typeof body === "object") {
      const d = body.detail;
      if (d && typeof d === "object") msg = d.msg || d.error || "";
      else if (typeof d === "string") msg = d;
      if (!msg && body.error) msg = typeof body.error === "string" ? body.error : (body.error.message || "");
    }
    if (!msg) msg = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 200);
    if (res.status === 401) msg = "The server refused the API key" + (msg ? ` (${msg})` : ".");
    else if (res.status === 503) msg = /busy/i.test(msg) ? msg : "The server is busy" + (msg ? `: ${msg}` : "; try again in a moment.");
    else msg = `Server error ${res.status}: ${msg || res.statusText}`;
    return new ApiError(res.status, msg);
  }

  async function call(path, body, opts = {}) {
    let res;
    try {
      res = await fetch(path, {
        method: body === undefined ? "GET" : "POST",
        headers: headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: opts.signal,
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "Cannot reach the server. Is koboldcpp.py still running?");
    }
    if (!res.ok) {
      const err = await errorFrom(res);
      if (err.status === 401) onUnauthorized();
      throw err;
    }
    try { return await res.json(); } catch (e) { throw new ApiError(res.status, `The server sent an unreadable answer for ${path}.`); }
  }

  // ---------- connection ----------
  async function connect() {
    setStatus("Connecting…");
    el["conn-dot"].className = "dot";
    try {
      const ver = await call("/api/extra/version");
      server.protected = !!ver.protected;
      server.version = `${ver.result || "KoboldCpp"} ${ver.version || ""}`.trim();
      server.vision = ver.vision === true;
      el["server-version"].textContent = server.version;
      if (server.protected && !(await keyWorks())) {
        askKey("");
        return;
      }
      const [model, ctx] = await Promise.all([
        call("/api/v1/model"),
        call("/api/extra/true_max_context_length").catch(() => call("/api/v1/config/max_context_length")),
      ]);
      server.model = String(model.result || "").replace(/^koboldcpp\//, "") || "(no model)";
      server.maxCtx = Number(ctx.value) || 0;
      server.connected = true;
      el["model-name"].textContent = server.model;
      el["model-name"].title = String(model.result || "");
      el["model-ctx"].textContent = server.maxCtx ? `${server.maxCtx.toLocaleString("en-US")} ctx` : "";
      el["conn-dot"].className = "dot ok";
      if (server.maxCtx && settings.max_context_length > server.maxCtx) {
        settings.max_context_length = server.maxCtx;
        saveSettings();
        renderSettings();
      }
      setStatus("Ready.");
      hideError();
      updateButtons();
      scheduleCount(0);
    } catch (e) {
      server.connected = false;
      el["conn-dot"].className = "dot bad";
      el["model-name"].textContent = "not connected";
      showError(e.message, "Retry", connect);
      setStatus("Not connected.");
      updateButtons();
    }
  }

  async function keyWorks() {
    if (!localStorage.getItem(LS_KEY)) return false;
    try {
      await rawAuthCheck();
      return true;
    } catch (e) {
      if (e.status === 401) return false;
      throw e;
    }
  }

  // tokencount is key-protected, cheap, and does not log a request as a generation
  async function rawAuthCheck() {
    const res = await fetch("/api/extra/tokencount", { method: "POST", headers: headers(true), body: JSON.stringify({ prompt: "" }) });
    if (!res.ok) throw await errorFrom(res);
  }

  function askKey(message) {
    setStatus("This server needs a key.");
    el["model-name"].textContent = "locked";
    el["key-error"].textContent = message || "";
    el["key-dialog"].hidden = false;
    el["key-input"].value = "";
    el["key-input"].focus();
  }

  function onUnauthorized() {
    if (server.protected) {
      localStorage.removeItem(LS_KEY);
      askKey("The key was not accepted. Enter it again.");
    }
  }

  el["key-form"].addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = el["key-input"].value.trim();
    if (!key) { el["key-error"].textContent = "Please enter a key."; return; }
    localStorage.setItem(LS_KEY, key);
    try {
      await rawAuthCheck();
    } catch (e) {
      if (e.status === 401) {
        localStorage.removeItem(LS_KEY);
        el["key-error"].textContent = "That key is wrong. Try again.";
        return;
      }
      el["key-error"].textContent = e.message;
      return;
    }
    el["key-dialog"].hidden = true;
    connect();
  });

  // ---------- prompt building ----------
  function nameOf(t) { return t.role === "user" ? session.userName.trim() : session.botName.trim(); }

  // Blocks are the units the page trims by (lines in a story, turns otherwise); the last block is always kept.
  function buildPrompt(tailIdx) {
    const mode = session.mode;
    const turns = session.turns;
    const before = tailIdx === null ? turns : turns.slice(0, tailIdx);
    const tailText = tailIdx === null ? "" : turns[tailIdx].text;
    let blocks;
    let joiner;
    const stop = [];
    if (mode === "story") {
      joiner = "\n";
      blocks = (before.map((t) => t.text).join("") + tailText).split("\n");
    } else if (mode === "chat") {
      joiner = "\n";
      blocks = before.map((t) => `${nameOf(t)}: ${t.text.trim()}`);
      blocks.push(`${session.botName.trim()}:` + (tailText ? " " + tailText.replace(/^\s+/, "") : ""));
      stop.push(`\n${session.userName.trim()}:`, `\n${session.botName.trim()}:`);
    } else {
      joiner = "";
      blocks = before.map((t) => t.role === "user" ? `{{[INPUT]}}${t.text}{{[INPUT_END]}}` : `{{[OUTPUT]}}${t.text}{{[OUTPUT_END]}}`);
      blocks.push("{{[OUTPUT]}}" + tailText);
      stop.push("{{[INPUT]}}");
    }
    const note = session.note.trim();
    if (note) {
      const at = Math.max(0, blocks.length - Math.max(1, session.noteDepth));
      const noteBlock = mode === "instruct" ? `{{[SYSTEM]}}[Author's note: ${note}]{{[SYSTEM_END]}}` : `[Author's note: ${note}]`;
      blocks.splice(at, 0, noteBlock);
    }
    let memory = session.memory;
    if (memory && !/\s$/.test(memory)) memory += "\n";
    if (mode === "instruct" && session.system.trim()) memory = `{{[SYSTEM]}}${session.system.trim()}{{[SYSTEM_END]}}` + memory;
    for (const s of settings.stop_sequence) stop.push(s.replace(/\\n/g, "\n"));
    // images of the turns before the reply, oldest first; the server puts them after memory (as KoboldCpp does)
    const images = mode === "story" ? [] : before.flatMap((t) => t.images || []).slice(-MAX_IMAGES);
    return { blocks, joiner, memory, stop, images };
  }

  async function countTokens(text, signal) {
    const r = await call("/api/extra/tokencount", { prompt: text, special: true }, { signal });
    const n = Number(r.value);
    if (!Number.isFinite(n) || n < 0) throw new ApiError(0, "The server could not count tokens.");
    return n;
  }

  function effectiveCtx() {
    return server.maxCtx ? Math.min(settings.max_context_length, server.maxCtx) : settings.max_context_length;
  }

  // Like the server: drop text from the front until memory + prompt fit max_context - max_length; memory stays.
  // We cut at block edges so a turn is never half-sent; the server still makes the final token-exact cut.
  async function fitPrompt(p) {
    const budget = Math.max(16, effectiveCtx() - settings.max_length);
    let blocks = p.blocks;
    let dropped = 0;
    let used = 0;
    for (let round = 0; ; round++) {
      const text = blocks.join(p.joiner);
      used = await countTokens(p.memory + text);
      if (used <= budget || blocks.length <= 1 || round === 4) break;
      const memTokens = p.memory ? await countTokens(p.memory) : 0;
      const room = Math.max(1, budget - memTokens);
      const promptTokens = Math.max(1, used - memTokens);
      // remove a little more than the overflow's share of characters, then measure again
      let toDrop = Math.ceil(text.length * (1 - room / promptTokens) * 1.05);
      let n = 0;
      while (n < blocks.length - 1 && toDrop > 0) { toDrop -= blocks[n].length + p.joiner.length; n++; }
      n = Math.max(1, n);
      blocks = blocks.slice(n);
      dropped += n;
    }
    return { prompt: blocks.join(p.joiner), used, budget, dropped };
  }

  function showContextUse(used, dropped) {
    const ctx = effectiveCtx();
    const total = used + settings.max_length;
    const pct = Math.min(100, Math.round((total / ctx) * 100));
    el["ctx-fill"].style.width = pct + "%";
    el["ctx-meter"].classList.toggle("full", total > ctx);
    el["ctx-text"].textContent = `${used.toLocaleString("en-US")} + ${settings.max_length} / ${ctx.toLocaleString("en-US")}`;
    const unit = document.createElement("span");
    unit.className = "unit";
    unit.textContent = " tokens" + (dropped ? " · oldest text trimmed" : "");
    el["ctx-text"].appendChild(unit);
    el["ctx-meter"].title = `The text uses ${used} tokens, ${settings.max_length} are kept free for the reply, the context holds ${ctx}.` +
      (dropped || total > ctx ? " The oldest part of the text no longer fits and is left out." : "");
  }

  let countTimer = 0;
  let countCtrl = null;
  function scheduleCount(delay = 700) {
    clearTimeout(countTimer);
    countTimer = setTimeout(refreshCount, delay);
  }
  async function refreshCount() {
    if (!server.connected || gen) return;
    if (countCtrl) countCtrl.abort();
    countCtrl = new AbortController();
    const p = buildPrompt(null);
    const draft = el.input.value;
    if (draft && session.mode === "story") p.blocks[p.blocks.length - 1] += draft;
    try {
      const used = await countTokens(p.memory + p.blocks.join(p.joiner), countCtrl.signal);
      const budget = effectiveCtx() - settings.max_length;
      showContextUse(used, used > budget);
    } catch (e) {
      if (e.name !== "AbortError") el["ctx-text"].textContent = "–";
    }
  }

  // ---------- generation ----------
  function newGenkey() { return "KCPP" + String(Math.floor(1000 + Math.random() * 9000)); }

  function payload(prompt, memory, stop, genkey, images) {
    const body = {
      prompt, memory, genkey,
      max_context_length: effectiveCtx(),
      max_length: settings.max_length,
      temperature: settings.temperature,
      top_p: settings.top_p,
      top_k: settings.top_k,
      min_p: settings.min_p,
      rep_pen: settings.rep_pen,
      rep_pen_range: settings.rep_pen_range,
      sampler_seed: settings.sampler_seed,
      sampler_order: settings.sampler_order,
      stop_sequence: stop,
      trim_stop: true,
      return_progress: true,
    };
    if (images && images.length) body.images = images.map((u) => u.slice(u.indexOf(",") + 1));
    return body;
  }

  // Reads Kobold SSE: "event: message\ndata: {token, finish_reason}\n\n" until the server closes the socket.
  // With return_progress the server also sends "event: progress" frames ({prompt_progress}) while the prompt is processed.
  async function streamInto(body, signal, onToken, onProgress) {
    let res;
    try {
      res = await fetch("/api/extra/generate/stream", { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
    } catch (e) {
      if (e.name === "AbortError") return null;
      throw new ApiError(0, "Cannot reach the server. Is koboldcpp.py still running?");
    }
    if (!res.ok) {
      const err = await errorFrom(res);
      if (err.status === 401) onUnauthorized();
      throw err;
    }
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    let finish = null;
    const handle = (frame) => {
      const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) return;
      let obj;
      try { obj = JSON.parse(data); } catch (e) { throw new ApiError(0, "The server sent a broken stream event."); }
      if (obj.error) throw new ApiError(0, "Generation failed: " + (obj.error.message || obj.error.msg || JSON.stringify(obj.error)));
      if (obj.prompt_progress) { if (onProgress) onProgress(obj.prompt_progress); return; }
      if (typeof obj.token === "string" && obj.token) onToken(obj.token);
      if (obj.finish_reason) finish = obj.finish_reason;
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, i);
          buf = buf.slice(i + 2);
          handle(frame);
        }
      }
      if (buf.trim()) handle(buf);
    } catch (e) {
      if (e.name === "AbortError") return finish;
      if (e instanceof ApiError) throw e;
      throw new ApiError(0, "The connection to the server broke during generation.");
    }
    return finish;
  }

  // kind: "send" | "continue" | "retry"
  async function generate(kind) {
    if (gen || !server.connected) return;
    hideError();
    const turns = session.turns;
    let idx;
    let created = false;
    const last = turns[turns.length - 1];
    const extend = kind === "continue" && session.mode !== "story" && last && last.role === "ai";
    if (extend) {
      idx = turns.length - 1;
    } else {
      turns.push({ role: "ai", text: "" });
      idx = turns.length - 1;
      created = true;
    }
    const prevLen = turns[idx].text.length;
    // story: the new segment is just more text; otherwise the reply turn is the prompt's open tail
    const p = buildPrompt(session.mode === "story" ? null : idx);
    const genkey = newGenkey();
    gen = { genkey, ctrl: new AbortController(), stopping: false };
    lastGen = { idx, prevLen, created, kind: kind === "retry" ? (lastGen && lastGen.kind) || "send" : kind };
    render();
    updateButtons();
    setStatus("Generating…");
    el.perf.textContent = "";
    const node = el.output.querySelector(`.msg[data-idx="${idx}"], .seg[data-idx="${idx}"]`);
    const isChat = session.mode === "chat";
    let raw = "";
    try {
      const fit = await fitPrompt(p);
      showContextUse(fit.used, fit.dropped);
      if (gen.stopping) throw Object.assign(new Error("stopped"), { name: "AbortError" });
      let started = false;
      const finish = await streamInto(payload(fit.prompt, p.memory, p.stop, genkey, server.vision ? p.images : []), gen.ctrl.signal, (tok) => {
        if (!started) { started = true; setStatus("Generating…"); }
        raw += tok;
        let shown = raw;
        if (isChat && prevLen === 0) shown = shown.replace(/^\s+/, "");
        turns[idx].text = turns[idx].text.slice(0, prevLen) + shown;
        if (node && node.classList.contains("msg")) fillTurn(node, turns[idx].text, turns[idx].role);
        else if (node) node.textContent = turns[idx].text;
        stickToBottom();
      }, (pp) => {
        if (started) return;
        const todo = Math.max(1, pp.total - pp.cache);
        const pct = Math.min(100, Math.round((100 * (pp.processed - pp.cache)) / todo));
        setStatus(`Processing prompt: ${pp.processed}/${pp.total} tokens (${pct}%)…`);
      });
      finishText(idx, prevLen);
      setStatus(gen.stopping ? "Stopped." : finishMessage(finish));
      showPerf();
    } catch (e) {
      finishText(idx, prevLen);
      if (e.name === "AbortError") setStatus("Stopped.");
      else { showError(e.message); setStatus("Generation failed."); }
    } finally {
      if (created && !turns[idx].text) {
        turns.splice(idx, 1);
        lastGen = null;
      }
      gen = null;
      render();
      updateButtons();
      autosave();
      scheduleCount(50);
    }
  }

  function finishText(idx, prevLen) {
    const t = session.turns[idx];
    if (!t) return;
    if (session.mode === "chat") {
      // a model that ignores the stop strings may still start the next speaker's line
      const added = t.text.slice(prevLen);
      const cut = cutAtSpeaker(added);
      t.text = (t.text.slice(0, prevLen) + cut).replace(/\s+$/, "");
    } else if (session.mode === "instruct") {
      t.text = t.text.replace(/\s+$/, "");
    }
  }

  function cutAtSpeaker(text) {
    let end = text.length;
    for (const nm of [session.userName.trim(), session.botName.trim()]) {
      const i = text.indexOf("\n" + nm + ":");
      if (i >= 0 && i < end) end = i;
    }
    return text.slice(0, end);
  }

  function finishMessage(reason) {
    return reason === "length" ? "Done: reached the amount to generate." : "Done.";
  }

  async function showPerf() {
    try {
      const p = await call("/api/extra/perf");
      const parts = [];
      if (Number.isFinite(p.last_token_count)) {
        parts.push(`${p.last_token_count} tokens` + (Number(p.last_eval_speed) > 0 ? ` at ${Number(p.last_eval_speed).toFixed(1)} T/s` : ""));
      }
      if (Number.isFinite(p.last_input_count) && Number(p.last_process_speed) > 0) {
        parts.push(`prompt ${p.last_input_count} at ${Number(p.last_process_speed).toFixed(0)} T/s`);
      }
      el.perf.textContent = parts.join(" · ");
    } catch (e) {
      el.perf.textContent = "";
    }
  }

  async function stopGeneration() {
    if (!gen || gen.stopping) return;
    const g = gen;
    g.stopping = true;
    setStatus("Stopping…");
    updateButtons();
    try {
      await call("/api/extra/abort", { genkey: g.genkey });
    } catch (e) {
      showError("Stop failed: " + e.message);
    }
    // the server ends the stream itself after an abort; drop the connection if it does not
    setTimeout(() => { if (gen === g) g.ctrl.abort(); }, 1500);
  }

  function send() {
    if (gen) return;
    if (!server.connected) { showError("Not connected to the server yet.", "Retry", connect); return; }
    const text = el.input.value;
    snapshot();
    const img = session.mode !== "story" ? pendingImage : null;
    if (text.trim() || img) {
      if (session.mode === "story") session.turns.push({ role: "user", text });
      else session.turns.push(img ? { role: "user", text: text.trim(), images: [img] } : { role: "user", text: text.trim() });
    }
    if (img) setAttachment(null);
    el.input.value = "";
    session.draft = "";
    render();
    generate("send");
  }

  function continueGen() {
    if (gen || !server.connected) return;
    snapshot();
    generate("continue");
  }

  function retry() {
    if (gen || !server.connected) return;
    const turns = session.turns;
    let kind = "send";
    if (lastGen && turns[lastGen.idx] && lastGen.idx === turns.length - 1) {
      snapshot();
      kind = lastGen.kind === "continue" ? "continue" : "send";
      if (lastGen.created) turns.splice(lastGen.idx, 1);
      else turns[lastGen.idx].text = turns[lastGen.idx].text.slice(0, lastGen.prevLen);
    } else if (turns.length && turns[turns.length - 1].role === "ai") {
      snapshot();
      turns.pop();
    } else {
      showError("Nothing to retry yet: send something first.");
      return;
    }
    render();
    generate(kind === "continue" ? "continue" : "retry");
  }

  function undo() {
    if (gen || !undoStack.length) return;
    const prev = JSON.parse(undoStack.pop());
    session = prev.session;
    lastGen = prev.lastGen;
    editSnapshotPending = false;
    applySessionToInputs();
    render();
    updateButtons();
    autosave();
    scheduleCount(50);
    setStatus("Undone.");
  }

  function newSession() {
    if (gen) return;
    snapshot();
    const keep = session;
    session = freshSession();
    // a new session keeps who you are and how you like to work
    session.mode = keep.mode;
    session.userName = keep.userName;
    session.botName = keep.botName;
    session.system = keep.system;
    lastGen = null;
    el.input.value = "";
    applySessionToInputs();
    render();
    updateButtons();
    saveSessionNow();
    scheduleCount(50);
    setStatus("New session. Undo brings the previous one back.");
  }

  // ---------- save / load ----------
  function saveFile() {
    session.draft = el.input.value;
    const data = { format: SESSION_FORMAT, version: 1, saved: new Date().toISOString(), session, settings };
    const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
    const a = document.createElement("a");
    const d = new Date();
    const pad = (n) => String(n).padStart(2, "0");
    a.download = `kobold-session-${d.getFullYear()}${pad(d.getMonth() + 1)}${pad(d.getDate())}-${pad(d.getHours())}${pad(d.getMinutes())}.json`;
    a.href = URL.createObjectURL(blob);
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 5000);
    setStatus("Session saved to " + a.download + ".");
  }

  async function loadFile(file) {
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch (e) {
      showError(`${file.name} is not a JSON file this page can read.`);
      return;
    }
    if (!data || data.format !== SESSION_FORMAT || typeof data.session !== "object") {
      showError(`${file.name} is not a saved session from this page.`);
      return;
    }
    const r = cleanSession(data.session);
    if (r.error) { showError(`${file.name}: ${r.error}.`); return; }
    let warn = "";
    if (data.settings !== undefined) {
      const c = cleanSettings(data.settings);
      settings = c.settings;
      if (server.maxCtx) settings.max_context_length = Math.min(settings.max_context_length, server.maxCtx);
      if (c.bad.length) warn = " Some settings were invalid and kept their defaults: " + c.bad.join("; ");
      saveSettings();
      renderSettings();
    }
    snapshot();
    session = r.session;
    lastGen = null;
    el.input.value = session.draft || "";
    applySessionToInputs();
    render();
    updateButtons();
    saveSessionNow();
    scheduleCount(50);
    if (warn) showError(`Loaded ${file.name}.` + warn);
    else setStatus(`Loaded ${file.name}.`);
  }

  // ---------- rendering ----------
  // A reasoning model's leading <think>...</think> block is shown apart, collapsed; the turn's text keeps it (it is
  // what the model wrote), and an edit of the answer keeps it too.
  function splitThinking(text) {
    const lead = text.length - text.replace(/^\s+/, "").length;
    if (!text.startsWith("<think>", lead)) return null;
    const close = text.indexOf("</think>", lead);
    if (close < 0) return { think: text.slice(lead + 7), prefix: text, rest: "", open: true };
    const after = close + 8;
    const rest = text.slice(after).replace(/^\s+/, "");
    return { think: text.slice(lead + 7, close).trim(), prefix: text.slice(0, text.length - rest.length), rest, open: false };
  }

  function fillTurn(m, text, role) {
    const b = m.querySelector(".body");
    const split = role === "ai" ? splitThinking(text) : null;
    let d = m.querySelector(".think");
    if (!split) {
      if (d) d.remove();
      delete m.dataset.thinkPrefix;
      b.textContent = text;
      return;
    }
    if (!d) {
      d = document.createElement("details");
      d.className = "think";
      d.append(document.createElement("summary"), document.createElement("div"));
      d.lastChild.className = "think-body";
      m.insertBefore(d, b);
    }
    d.firstChild.textContent = split.open ? "Thinking…" : "Thoughts";
    d.lastChild.textContent = split.think;
    m.dataset.thinkPrefix = split.prefix;
    b.textContent = split.rest;
  }

  function render() {
    const out = el.output;
    out.textContent = "";
    out.className = "output mode-" + session.mode;
    el.app.dataset.mode = session.mode;
    const editable = gen ? "false" : EDITABLE;
    if (!session.turns.length) {
      const empty = document.createElement("div");
      empty.className = "empty";
      empty.textContent = {
        story: "Start a story below. The model continues whatever you write.",
        chat: `Say hello to ${session.botName.trim() || "the bot"}. Enter sends, Shift+Enter starts a new line.`,
        instruct: "Ask for something below. The server wraps it in the model's instruction format.",
      }[session.mode];
      out.appendChild(empty);
      return;
    }
    if (session.mode === "story") {
      const p = document.createElement("div");
      p.className = "story";
      session.turns.forEach((t, i) => {
        const s = document.createElement("span");
        s.className = "seg " + t.role;
        s.dataset.idx = i;
        s.textContent = t.text;
        s.contentEditable = editable;
        s.spellcheck = false;
        p.appendChild(s);
      });
      out.appendChild(p);
    } else {
      session.turns.forEach((t, i) => {
        const m = document.createElement("div");
        m.className = "msg " + t.role;
        m.dataset.idx = i;
        const n = document.createElement("div");
        n.className = "name";
        n.textContent = session.mode === "chat" ? nameOf(t) : (t.role === "user" ? "You" : "AI");
        const b = document.createElement("div");
        b.className = "body";
        b.contentEditable = editable;
        b.spellcheck = false;
        m.append(n);
        for (const u of t.images || []) {
          const im = document.createElement("img");
          im.className = "thumb";
          im.dataset.testid = "thumb";
          im.alt = "attached image";
          im.src = u;
          m.append(im);
        }
        m.append(b);
        fillTurn(m, t.text, t.role);
        out.appendChild(m);
      });
    }
    if (gen) {
      const live = out.querySelector(`[data-idx="${lastGen.idx}"]`);
      if (live) live.classList.add("live");
    }
    stickToBottom(true);
  }

  let followOutput = true;
  el["output-wrap"].addEventListener("scroll", () => {
    const w = el["output-wrap"];
    followOutput = w.scrollHeight - w.scrollTop - w.clientHeight < 60;
  });
  function stickToBottom(force) {
    const w = el["output-wrap"];
    if (force || followOutput) w.scrollTop = w.scrollHeight;
  }

  // edits in place: the DOM is the source while typing; a re-render would move the caret
  let editStart = null; // {idx, text} of the part being edited
  el.output.addEventListener("focusin", (ev) => {
    editSnapshotPending = true;
    const node = ev.target.closest("[data-idx]");
    const t = node && session.turns[Number(node.dataset.idx)];
    editStart = t ? { idx: Number(node.dataset.idx), text: t.text } : null;
  });
  el.output.addEventListener("input", (ev) => {
    if (gen) return;
    const node = ev.target.closest("[data-idx]");
    if (!node) return;
    const idx = Number(node.dataset.idx);
    const target = node.classList.contains("seg") ? node : node.querySelector(".body");
    if (!session.turns[idx] || !target) return;
    if (editSnapshotPending) { snapshot(); editSnapshotPending = false; }
    session.turns[idx].text = (node.dataset.thinkPrefix || "") + target.innerText.replace(/\u00a0/g, " ");
    lastGen = null; // an edited reply is no longer the model's to retry piecewise
    autosave();
    scheduleCount();
  });
  el.output.addEventListener("focusout", () => {
    if (gen) return;
    let changed = false;
    // Chromium adds a placeholder newline after Enter at the end of an editable element
    const t = editStart && session.turns[editStart.idx];
    if (t && t.text !== editStart.text && t.text.endsWith("\n") && !editStart.text.endsWith("\n")) {
      t.text = t.text.slice(0, -1);
      changed = true;
    }
    editStart = null;
    const before = session.turns.length;
    session.turns = session.turns.filter((x) => x.text.length > 0);
    if (changed || session.turns.length !== before) { render(); autosave(); }
  });

  function applySessionToInputs() {
    el.mode.value = session.mode;
    el.memory.value = session.memory;
    el.note.value = session.note;
    el["note-depth"].value = session.noteDepth;
    el["user-name"].value = session.userName;
    el["bot-name"].value = session.botName;
    el["system-prompt"].value = session.system;
    autoGrow(el["system-prompt"]);
    el.input.placeholder = { story: "Write the beginning, or what happens next…", chat: "Message… (Enter sends, Shift+Enter new line)", instruct: "Instruction… (Enter sends, Shift+Enter new line)" }[session.mode];
  }

  function updateButtons() {
    const busy = !!gen;
    el["btn-attach"].hidden = !server.vision || session.mode === "story";
    el["btn-attach"].disabled = busy;
    el["btn-send"].hidden = busy;
    el["btn-stop"].hidden = !busy;
    el["btn-stop"].disabled = busy && gen.stopping;
    el["btn-send"].disabled = !server.connected;
    const hasAi = session.turns.some((t) => t.role === "ai");
    el["btn-retry"].disabled = busy || !server.connected || !hasAi;
    el["btn-continue"].disabled = busy || !server.connected || !session.turns.length;
    el["btn-undo"].disabled = busy || !undoStack.length;
    for (const b of [el["btn-new"], el["btn-load"], el.mode]) b.disabled = busy;
  }

  function setStatus(text) { el.status.textContent = text; }

  function showError(text, actionLabel, action) {
    el["error-text"].textContent = text;
    el.error.hidden = false;
    const btn = el["error-action"];
    if (actionLabel) {
      btn.hidden = false;
      btn.textContent = actionLabel;
      btn.onclick = () => { hideError(); action(); };
    } else {
      btn.hidden = true;
      btn.onclick = null;
    }
  }
  function hideError() { el.error.hidden = true; }
  el["error-close"].addEventListener("click", hideError);

  function autoGrow(ta) {
    ta.style.height = "auto";
    ta.style.height = Math.min(ta.scrollHeight + 2, 200) + "px";
  }

  // ---------- settings panel ----------
  function renderSettings() {
    const box = el["setting-fields"];
    box.textContent = "";
    for (const f of FIELDS) {
      const wrap = document.createElement("div");
      wrap.className = "field" + (f.kind === "lines" ? " wide" : "");
      const id = "set-" + f.key;
      const lab = document.createElement("label");
      lab.className = "field-label";
      lab.htmlFor = id;
      lab.textContent = f.label + " ";
      if (f.hint) {
        const sm = document.createElement("small");
        sm.textContent = f.hint;
        lab.appendChild(sm);
      }
      let input;
      if (f.kind === "lines") {
        input = document.createElement("textarea");
        input.rows = 3;
        input.spellcheck = false;
        input.value = settings[f.key].map((s) => s.replace(/\n/g, "\\n")).join("\n");
      } else {
        input = document.createElement("input");
        input.type = "number";
        input.inputMode = f.kind === "int" ? "numeric" : "decimal";
        input.min = f.min;
        input.max = f.key === "max_context_length" && server.maxCtx ? server.maxCtx : f.max;
        input.step = f.step || 1;
        input.value = settings[f.key];
      }
      input.id = id;
      input.dataset.testid = "setting-" + f.key;
      input.setAttribute("data-testid", "setting-" + f.key);
      const err = document.createElement("div");
      err.className = "field-error";
      err.setAttribute("role", "alert");
      const controls = document.createElement("div");
      controls.className = "controls";
      let slider = null;
      if (f.slider) {
        slider = document.createElement("input");
        slider.type = "range";
        slider.min = f.slider[0];
        slider.max = f.slider[1];
        slider.step = f.step;
        slider.value = settings[f.key];
        slider.tabIndex = -1;
        slider.setAttribute("aria-hidden", "true");
        slider.addEventListener("input", () => { input.value = slider.value; commit(); });
        controls.appendChild(slider);
      }
      controls.appendChild(input);
      const commit = () => {
        let raw = input.value;
        if (f.kind === "lines") raw = raw.split("\n").filter((s) => s.length);
        if (f.key === "max_context_length" && server.maxCtx && Number(raw) > server.maxCtx) {
          err.textContent = `The server's context is ${server.maxCtx} tokens.`;
          wrap.classList.add("invalid");
          return;
        }
        const v = validateField(f, raw);
        if (v.error) {
          err.textContent = `${f.label} ${v.error}.`;
          wrap.classList.add("invalid");
          return;
        }
        err.textContent = "";
        wrap.classList.remove("invalid");
        settings[f.key] = v.value;
        if (slider && document.activeElement !== slider) slider.value = v.value;
        saveSettings();
        scheduleCount();
      };
      input.addEventListener("change", commit);
      input.addEventListener("input", () => { if (f.kind !== "lines") commit(); });
      wrap.append(lab, controls, err);
      box.appendChild(wrap);
    }
    renderOrder();
  }

  function renderOrder() {
    const ol = el["sampler-order"];
    ol.textContent = "";
    settings.sampler_order.forEach((id, i) => {
      const li = document.createElement("li");
      li.dataset.sampler = id;
      const name = document.createElement("span");
      name.textContent = SAMPLER_NAMES[id] || `Sampler ${id}`;
      const up = document.createElement("button");
      up.type = "button";
      up.className = "mini";
      up.textContent = "↑";
      up.title = "Run earlier";
      up.setAttribute("aria-label", `Move ${name.textContent} up`);
      up.disabled = i === 0;
      up.addEventListener("click", () => moveSampler(i, -1));
      const down = document.createElement("button");
      down.type = "button";
      down.className = "mini";
      down.textContent = "↓";
      down.title = "Run later";
      down.setAttribute("aria-label", `Move ${name.textContent} down`);
      down.disabled = i === settings.sampler_order.length - 1;
      down.addEventListener("click", () => moveSampler(i, 1));
      li.append(name, up, down);
      ol.appendChild(li);
    });
  }

  function moveSampler(i, d) {
    const o = settings.sampler_order;
    const j = i + d;
    if (j < 0 || j >= o.length) return;
    [o[i], o[j]] = [o[j], o[i]];
    saveSettings();
    renderOrder();
    const btn = el["sampler-order"].children[j].querySelectorAll("button")[d < 0 ? 0 : 1];
    if (btn && !btn.disabled) btn.focus();
  }

  function openSettings(open) {
    el.settings.hidden = !open;
    $("scrim").hidden = !open;
    el["btn-settings"].setAttribute("aria-expanded", String(open));
    document.body.classList.toggle("drawer-open", open);
    if (open) el["settings-close"].focus();
  }

  // ---------- wiring ----------
  el["btn-send"].addEventListener("click", send);
  el["btn-stop"].addEventListener("click", stopGeneration);
  el["btn-retry"].addEventListener("click", retry);
  el["btn-continue"].addEventListener("click", continueGen);
  el["btn-undo"].addEventListener("click", undo);
  el["btn-new"].addEventListener("click", newSession);
  el["btn-save"].addEventListener("click", saveFile);
  el["btn-load"].addEventListener("click", () => el["load-file"].click());
  el["load-file"].addEventListener("change", () => {
    const f = el["load-file"].files[0];
    el["load-file"].value = "";
    if (f) loadFile(f);
  });
  el["btn-settings"].addEventListener("click", () => openSettings(el.settings.hidden));
  el["settings-close"].addEventListener("click", () => openSettings(false));
  $("scrim").addEventListener("click", () => openSettings(false));
  el["settings-reset"].addEventListener("click", () => {
    settings = defaultSettings();
    if (server.maxCtx) settings.max_context_length = Math.min(settings.max_context_length, server.maxCtx);
    saveSettings();
    renderSettings();
    scheduleCount();
    setStatus("Settings reset to defaults.");
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") {
      if (!el.settings.hidden) openSettings(false);
      else if (gen) stopGeneration();
    }
  });

  el.mode.addEventListener("change", () => {
    session.mode = el.mode.value;
    lastGen = null;
    applySessionToInputs();
    render();
    updateButtons();
    autosave();
    scheduleCount(50);
  });

  el.input.addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter" || ev.isComposing) return;
    const enterSends = session.mode !== "story";
    if ((enterSends && !ev.shiftKey) || ev.ctrlKey || ev.metaKey) {
      ev.preventDefault();
      send();
    }
  });
  el.input.addEventListener("input", () => {
    session.draft = el.input.value;
    autosave();
    scheduleCount(900);
  });

  const bindText = (node, key, after) => node.addEventListener("input", () => {
    session[key] = node.value;
    if (after) after();
    autosave();
    scheduleCount();
  });
  bindText(el.memory, "memory");
  bindText(el.note, "note");
  bindText(el["system-prompt"], "system", () => autoGrow(el["system-prompt"]));
  bindText(el["user-name"], "userName", render);
  bindText(el["bot-name"], "botName", render);
  for (const k of ["user-name", "bot-name"]) {
    el[k].addEventListener("change", () => {
      if (!el[k].value.trim()) {
        el[k].value = k === "user-name" ? "You" : "KoboldAI";
        session[k === "user-name" ? "userName" : "botName"] = el[k].value;
        render();
        autosave();
      }
    });
  }
  el["note-depth"].addEventListener("change", () => {
    const n = Number(el["note-depth"].value);
    if (!Number.isInteger(n) || n < 0 || n > 50) {
      showError("Note depth must be a whole number from 0 to 50.");
      el["note-depth"].value = session.noteDepth;
      return;
    }
    session.noteDepth = n;
    autosave();
  });

  // ---------- image attachments (servers started with --mmproj) ----------
  function setAttachment(url) {
    pendingImage = url;
    const box = el["attach-preview"];
    box.textContent = "";
    box.hidden = !url;
    if (!url) return;
    const im = document.createElement("img");
    im.className = "thumb";
    im.alt = "image to send";
    im.src = url;
    const x = document.createElement("button");
    x.type = "button";
    x.className = "close-btn";
    x.dataset.testid = "attach-remove";
    x.title = "Remove the image";
    x.textContent = "✕";
    x.addEventListener("click", () => setAttachment(null));
    box.append(im, x);
  }

  // Any browser-readable image becomes a PNG/JPEG data: URL no larger than IMAGE_SIDE per side.
  function readImage(file) {
    return new Promise((resolve, reject) => {
      const url = URL.createObjectURL(file);
      const im = new Image();
      im.onload = () => {
        const k = Math.min(1, IMAGE_SIDE / Math.max(im.naturalWidth, im.naturalHeight));
        const c = document.createElement("canvas");
        c.width = Math.max(1, Math.round(im.naturalWidth * k));
        c.height = Math.max(1, Math.round(im.naturalHeight * k));
        c.getContext("2d").drawImage(im, 0, 0, c.width, c.height);
        URL.revokeObjectURL(url);
        resolve(c.toDataURL(file.type === "image/png" ? "image/png" : "image/jpeg", 0.9));
      };
      im.onerror = () => { URL.revokeObjectURL(url); reject(new Error(`${file.name} is not an image this browser can read.`)); };
      im.src = url;
    });
  }

  el["btn-attach"].addEventListener("click", () => el["attach-file"].click());
  el["attach-file"].addEventListener("change", async () => {
    const f = el["attach-file"].files[0];
    el["attach-file"].value = "";
    if (!f) return;
    try {
      setAttachment(await readImage(f));
      setStatus(`Image attached: ${f.name}`);
    } catch (e) {
      showError(e.message);
    }
  });

  window.addEventListener("beforeunload", () => { session.draft = el.input.value; saveSessionNow(); });

  el.input.value = session.draft || "";
  applySessionToInputs();
  renderSettings();
  render();
  updateButtons();
  connect();
})();
