"""The launcher window: pick a model, adjust settings, save/load .kcpps, Launch."""
from __future__ import annotations

import argparse
import copy
import queue
import sys
import threading
import tkinter as tk
import traceback
from pathlib import Path
from tkinter import filedialog

import customtkinter as ctk
from customtkinter.windows.widgets.appearance_mode import AppearanceModeTracker

from . import fields as F
from .tooltip import Tooltip

TITLE = "KoboldCpp Launcher"
TABS = ("Quick Launch", "Hardware", "Network", "Tokens", "Models")
GREEN, GREEN_HOVER = "#2f9e44", "#237a34"
ERROR_COLOR = ("#c92a2a", "#ff6b6b")  # (light, dark)
MUTED = ("gray35", "gray70")


def _follow_system_theme():
    """Light/dark as the desktop says, now and while the window is open."""
    T = AppearanceModeTracker
    ctk.set_appearance_mode("system")
    if sys.platform.startswith("linux"):
        # darkdetect runs `gsettings` per check; customtkinter's 30 ms poll costs a quarter of a core
        T.update_loop_interval = 1000
    # customtkinter detects once at import and polls on its first window only: redo both for a later window
    alive = []
    for app in T.app_list:
        try:
            if app.winfo_exists():
                alive.append(app)
        except tk.TclError:
            pass
    T.app_list = alive
    if not alive:
        T.update_loop_running = False
    T.init_appearance_mode()


class LauncherApp(ctk.CTk):
    """Build with the parsed args and koboldcpp.cli_hooks() (handed in: koboldcpp imports us, never the reverse);
    `result` is the namespace to serve after Launch, None if closed."""

    def __init__(self, args: argparse.Namespace, hooks):
        _follow_system_theme()
        ctk.set_default_color_theme("blue")
        super().__init__()
        self.title(TITLE)
        self.geometry("1024x700")
        self.minsize(880, 620)  # below this the Quick Launch rows would be cut off
        self.protocol("WM_DELETE_WINDOW", self.close)
        self.report_callback_exception = self._callback_error
        self.result = None
        self.hooks = hooks
        self.threads_auto = hooks.default_threads()
        self.base = copy.copy(args)
        self.ask_path = None  # tests replace the native file dialogs: fn(kind) -> path or ""
        self.fields = F.fields(self.threads_auto)
        self.vars: dict = {}
        self.inputs: dict = {}  # dest -> [(tab, widget)]
        self.tips: dict = {}    # dest -> [Tooltip]
        self.tab_frames: dict = {}
        self.tab_buttons: dict = {}
        self.current_tab = None
        self.facts_rows: dict = {}
        self._facts_after = None
        self._bundled_q: queue.Queue | None = None
        self.bundled_cache_dir = None  # None = the default cache; tests point it elsewhere to watch a first use
        self.bundled_progress: list = []  # bytes done, one entry per progress report

        for dest, f in self.fields.items():
            self.vars[dest] = tk.BooleanVar(self) if f.kind == "bool" else tk.StringVar(self)
        self._build()
        self.set_values(F.to_display(self.base))
        self.vars["model"].trace_add("write", lambda *_: self._model_changed())
        self.vars["nofastforward"].trace_add("write", lambda *_: self._sync_switches())
        self._sync_switches()
        self.refresh_facts()
        self.show_tab(TABS[0])
        self.bind_all("<Control-Return>", lambda e: self.launch_button.invoke())

    # ---------- layout ----------
    def _build(self):
        self.grid_columnconfigure(1, weight=1)
        self.grid_rowconfigure(0, weight=1)

        side = ctk.CTkFrame(self, width=190, corner_radius=0)
        side.grid(row=0, column=0, rowspan=3, sticky="nsw")
        side.grid_propagate(False)
        ctk.CTkLabel(side, text="KoboldCpp", font=ctk.CTkFont(size=22, weight="bold")).pack(padx=16, pady=(22, 0), anchor="w")
        ctk.CTkLabel(side, text="koboldcpp.py " + self.hooks.version, text_color=MUTED).pack(padx=16, pady=(0, 18), anchor="w")
        for name in TABS:
            b = ctk.CTkButton(side, text=name, anchor="w", height=36, corner_radius=6, fg_color="transparent",
                              text_color=("gray10", "gray90"), hover_color=("gray75", "gray30"),
                              command=lambda n=name: self.show_tab(n))
            b.pack(fill="x", padx=10, pady=3)
            self.tab_buttons[name] = b

        for name in TABS:
            frame = ctk.CTkFrame(self, fg_color="transparent")
            frame.grid(row=0, column=1, sticky="nsew", padx=22, pady=(18, 4))
            frame.grid_columnconfigure(2, weight=1)  # spare width goes right of the hints, not between
            self.tab_frames[name] = frame
        self._build_quick(self.tab_frames["Quick Launch"])
        self._build_hardware(self.tab_frames["Hardware"])
        self._build_tokens(self.tab_frames["Tokens"])
        self._build_network(self.tab_frames["Network"])
        self._build_models(self.tab_frames["Models"])

        self.status = ctk.CTkLabel(self, text="", anchor="w", justify="left", wraplength=780)
        self.status.grid(row=1, column=1, sticky="ew", padx=22, pady=(0, 2))
        bar = ctk.CTkFrame(self, fg_color="transparent")
        bar.grid(row=2, column=1, sticky="ew", padx=22, pady=(4, 16))
        self.load_button = ctk.CTkButton(bar, text="Load Config", width=120, command=self.load_config)
        self.load_button.pack(side="left")
        self.save_button = ctk.CTkButton(bar, text="Save Config", width=120, command=self.save_config)
        self.save_button.pack(side="left", padx=(10, 0))
        self.launch_button = ctk.CTkButton(bar, text="Launch", width=160, height=38, fg_color=GREEN,
                                           hover_color=GREEN_HOVER, font=ctk.CTkFont(size=15, weight="bold"),
                                           command=self.launch)
        self.launch_button.pack(side="right")
        Tooltip("Read settings from a .kcpps file (one saved here or made with --exportconfig).", self.load_button)
        Tooltip("Write these settings to a .kcpps file; start it later with: koboldcpp.py --config FILE",
                self.save_button)
        Tooltip("Check the settings, close this window and start the server (Ctrl+Enter).", self.launch_button)

    def _heading(self, parent, row, text, top=0):
        ctk.CTkLabel(parent, text=text, font=ctk.CTkFont(size=17, weight="bold")).grid(
            row=row, column=0, columnspan=3, sticky="w", pady=(top, 8))

    def _row(self, parent, tab, row, dest, extra=None, hint=None):
        """Label + input for one field on one tab; several tabs share the same variable."""
        f = self.fields[dest]
        label = ctk.CTkLabel(parent, text=f.label, anchor="w", width=150)
        label.grid(row=row, column=0, sticky="w", pady=5)
        var = self.vars[dest]
        if f.kind == "bool":
            w = ctk.CTkSwitch(parent, text="", variable=var, onvalue=True, offvalue=False)
            w.grid(row=row, column=1, sticky="w", pady=5)
            label.bind("<Button-1>", lambda e, w=w: w.toggle() if str(w.cget("state")) != "disabled" else None)
        elif f.kind == "choice":
            values = F.adapter_choices() if dest == "chatcompletionsadapter" else list(f.choices)
            w = ctk.CTkComboBox(parent, variable=var, values=values, width=260)
            w.grid(row=row, column=1, sticky="w", pady=5)
        else:
            w = ctk.CTkEntry(parent, textvariable=var, width=260)
            w.grid(row=row, column=1, sticky="w" if dest != "model" else "ew", pady=5)
        side = None
        if extra is not None:
            side = extra(parent)
            side.grid(row=row, column=2, sticky="w", padx=(10, 0), pady=5)
        if hint:
            side = ctk.CTkLabel(parent, text=hint, text_color=MUTED, anchor="w")
            side.grid(row=row, column=2, sticky="w", padx=(10, 0), pady=5)
        self.inputs.setdefault(dest, []).append((tab, w))
        self.tips.setdefault(dest, []).append(Tooltip(f.tip, label, w))
        return w

    def _build_quick(self, p):
        tab = "Quick Launch"
        self._heading(p, 0, "Model")
        f = self.fields["model"]
        ctk.CTkLabel(p, text=f.label, anchor="w", width=150).grid(row=1, column=0, sticky="w", pady=5)
        mrow = ctk.CTkFrame(p, fg_color="transparent")
        mrow.grid(row=1, column=1, columnspan=2, sticky="ew", pady=5)
        mrow.grid_columnconfigure(0, weight=1)
        self.model_entry = ctk.CTkEntry(mrow, textvariable=self.vars["model"],
                                        placeholder_text="choose a .gguf model file")
        self.model_entry.grid(row=0, column=0, sticky="ew")
        self.browse_button = ctk.CTkButton(mrow, text="Browse…", width=90, command=self.pick_model)
        self.browse_button.grid(row=0, column=1, padx=(8, 0))
        self.bundled_button = ctk.CTkButton(mrow, text="Use bundled model", width=150, command=self.use_bundled,
                                            fg_color="transparent", border_width=1,
                                            text_color=("gray10", "gray90"))
        self.bundled_button.grid(row=0, column=2, padx=(8, 0))
        self.inputs["model"] = [(tab, self.model_entry)]
        self.tips["model"] = [Tooltip(f.tip, self.model_entry, self.browse_button)]
        Tooltip("Use the small Gemma 3 270M model that comes with koboldcpp.py: good for trying things out.",
                self.bundled_button)

        facts = ctk.CTkFrame(p, corner_radius=8)
        facts.grid(row=2, column=0, columnspan=3, sticky="ew", pady=(6, 14))
        for c in (1, 3):
            facts.grid_columnconfigure(c, weight=1)
        self.facts_frame = facts
        self.facts_message = ctk.CTkLabel(facts, text="", anchor="w", justify="left", wraplength=720)
        self.facts_message.grid(row=0, column=0, columnspan=4, sticky="w", padx=14, pady=(8, 0))
        labels = ("Name", "Architecture", "Parameters", "Quantization", "File size", "Trained context", "Chat template")
        for i, name in enumerate(labels):
            r, c = 1 + i // 2, (i % 2) * 2
            ctk.CTkLabel(facts, text=name, text_color=MUTED, anchor="w", width=110).grid(
                row=r, column=c, sticky="w", padx=(14, 4), pady=1)
            v = ctk.CTkLabel(facts, text="–", anchor="w", justify="left")
            v.grid(row=r, column=c + 1, sticky="w", padx=(0, 10), pady=1)
            self.facts_rows[name] = v
        ctk.CTkFrame(facts, height=8, fg_color="transparent").grid(row=5, column=0)  # bottom padding

        self._heading(p, 3, "Settings")
        self._row(p, tab, 4, "contextsize", hint="tokens")
        self._row(p, tab, 5, "gpulayers", hint=self._gpu_hint())
        self._row(p, tab, 6, "threads", hint=f"-1 = auto ({self.threads_auto} here)")
        self.adapter_box = self._row(p, tab, 7, "chatcompletionsadapter", extra=self._adapter_button)
        self._row(p, tab, 8, "launch")
        self.mmproj_entry = self._row(p, tab, 9, "mmproj", extra=self._mmproj_button)

    def _mmproj_button(self, parent):
        self.mmproj_button = ctk.CTkButton(parent, text="File…", width=70, command=self.pick_mmproj)
        Tooltip("Pick the vision projector (mmproj .gguf) that belongs to the model.", self.mmproj_button)
        return self.mmproj_button

    def _adapter_button(self, parent):
        self.adapter_button = ctk.CTkButton(parent, text="File…", width=70, command=self.pick_adapter)
        Tooltip("Use your own chat adapter JSON file (the same format as KoboldCpp's adapters).", self.adapter_button)
        return self.adapter_button

    def _gpu_hint(self) -> str:
        try:
            import llama_cpp
            if not llama_cpp.llama_supports_gpu_offload():
                return "this build runs on the CPU only"
        except Exception:  # a missing or broken llama_cpp is reported when the server starts
            return ""
        return "0 = CPU only, -1 = all"

    def _build_hardware(self, p):
        tab = "Hardware"
        self._heading(p, 0, "Hardware")
        self._row(p, tab, 1, "threads", hint=f"-1 = auto ({self.threads_auto} here)")
        self._row(p, tab, 2, "batchsize", hint="tokens per step")
        self._row(p, tab, 3, "gpulayers", hint=self._gpu_hint())
        self._row(p, tab, 4, "flashattention")
        self._row(p, tab, 5, "usemmap")
        self._row(p, tab, 6, "usemlock")

    def _build_tokens(self, p):
        tab = "Tokens"
        self._heading(p, 0, "Tokens")
        self._row(p, tab, 1, "contextsize", hint="tokens")
        self._row(p, tab, 2, "defaultgenamt", hint="tokens")
        self.shift_switch = self._row(p, tab, 3, "noshift")
        self._row(p, tab, 4, "nofastforward")
        self._heading(p, 5, "Speed", top=10)
        self._row(p, tab, 6, "smartcache", hint="conversations kept in RAM; 0 = off")
        self._row(p, tab, 7, "smartcachemb", hint="MiB")
        self._row(p, tab, 8, "promptlookup", hint="draft tokens; 0 = off")
        self._row(p, tab, 9, "fastfirsttoken")

    def _build_network(self, p):
        tab = "Network"
        self._heading(p, 0, "Network")
        self._row(p, tab, 1, "host", hint="127.0.0.1 = this computer only")
        self._row(p, tab, 2, "port")
        self._row(p, tab, 3, "password", hint="optional API key")
        self._row(p, tab, 4, "multiuser", hint="0 = busy reply, 1 = queue of 6")
        self._row(p, tab, 5, "parallelrequests")
        self._row(p, tab, 6, "quiet")

    def _build_models(self, p):
        tab = "Models"
        self._heading(p, 0, "Several models")
        self._row(p, tab, 1, "modeldir", hint="optional folder of .gguf / .kcpps")
        self._row(p, tab, 2, "maxloadedmodels")
        self._row(p, tab, 3, "unloadtimeout", hint="0 = never")
        self._row(p, tab, 4, "adminpassword", hint="for load/unload routes")
        self._heading(p, 5, "This model", top=10)
        self._row(p, tab, 6, "lora", hint="FILE[:SCALE]; FILE2 ...")
        self._row(p, tab, 7, "quantkv", hint="0 f16, 1 q8_0, 2 q4_0")

    # ---------- state ----------
    def show_tab(self, name: str):
        self.tab_frames[name].tkraise()
        for n, b in self.tab_buttons.items():
            b.configure(fg_color=("gray75", "gray30") if n == name else "transparent")
        self.current_tab = name

    def set_values(self, values: dict):
        for dest, v in values.items():
            if dest in self.vars:
                self.vars[dest].set(v)

    def get_values(self) -> dict:
        return {dest: var.get() for dest, var in self.vars.items()}

    def _sync_switches(self):
        # ContextShift works on top of FastForward, so it cannot be on without it
        ff_on = bool(self.vars["nofastforward"].get())
        if not ff_on:
            self.vars["noshift"].set(False)
        self.shift_switch.configure(state="normal" if ff_on else "disabled")

    def set_status(self, text: str, error: bool = False):
        self.status.configure(text=text, text_color=ERROR_COLOR if error else ("gray10", "gray90"))

    def _mark(self, dest: str | None):
        for d, items in self.inputs.items():
            for _, w in items:
                color = ERROR_COLOR if d == dest else ctk.ThemeManager.theme[
                    "CTkComboBox" if isinstance(w, ctk.CTkComboBox) else "CTkEntry"]["border_color"]
                if isinstance(w, (ctk.CTkEntry, ctk.CTkComboBox)):
                    w.configure(border_color=color)

    def show_error(self, err: F.FieldError | str):
        if isinstance(err, F.FieldError):
            self._mark(err.dest)
            tabs = [t for t, _ in self.inputs.get(err.dest, [])]
            if tabs and self.current_tab not in tabs:
                self.show_tab(tabs[0])
            self.set_status(str(err), error=True)
        else:
            self._mark(None)
            self.set_status(str(err), error=True)

    def _callback_error(self, exc, val, tb):
        # a bug in a button handler must show up in the window, not kill it or vanish into the console
        traceback.print_exception(exc, val, tb, file=sys.stderr)
        try:
            self.show_error(f"Unexpected error: {val}")
        except tk.TclError:
            pass

    # ---------- model facts ----------
    def _model_changed(self):
        if self._facts_after is not None:
            self.after_cancel(self._facts_after)
        self._facts_after = self.after(350, self.refresh_facts)  # wait until typing stops

    def refresh_facts(self):
        self._facts_after = None
        path = self.vars["model"].get().strip()
        for v in self.facts_rows.values():
            v.configure(text="–")
        self.model_info = None
        if not path:
            self.facts_message.configure(text="Pick a GGUF model to see what it is.", text_color=MUTED)
            return
        p = Path(path).expanduser()
        if not p.is_file():
            self.facts_message.configure(text=f"File not found: {path}", text_color=ERROR_COLOR)
            return
        from gguf_loader import GGUFError, inspect
        try:
            info = inspect(str(p))
        except GGUFError as e:
            self.facts_message.configure(text=f"Not a usable model: {e}", text_color=ERROR_COLOR)
            return
        except OSError as e:
            self.facts_message.configure(text=f"Cannot read {p.name}: {e.strerror or e}", text_color=ERROR_COLOR)
            return
        self.model_info = info
        for name, value in F.model_facts(info):
            self.facts_rows[name].configure(text=value)
        note = p.name
        try:
            ctx = int(self.vars["contextsize"].get())
            if info.context_length and ctx > info.context_length:
                note += f"   (context size {ctx} will be capped to {info.context_length})"
        except ValueError:
            pass
        self.facts_message.configure(text=note, text_color=("gray10", "gray90"))

    # ---------- dialogs ----------
    def _ask(self, kind: str) -> str:
        if self.ask_path is not None:
            return self.ask_path(kind) or ""
        start = Path(self.vars["model"].get().strip() or ".").expanduser()
        initial = str(start.parent if start.is_file() else Path.cwd())
        if kind == "model":
            return filedialog.askopenfilename(parent=self, title="Choose a GGUF model", initialdir=initial,
                                              filetypes=[("GGUF models", "*.gguf"), ("All files", "*")]) or ""
        if kind == "mmproj":
            return filedialog.askopenfilename(parent=self, title="Choose a vision projector (mmproj)",
                                              initialdir=initial,
                                              filetypes=[("GGUF projectors", "*.gguf"), ("All files", "*")]) or ""
        if kind == "adapter":
            return filedialog.askopenfilename(parent=self, title="Choose a chat adapter",
                                              filetypes=[("Adapter JSON", "*.json"), ("All files", "*")]) or ""
        if kind == "load_config":
            return filedialog.askopenfilename(parent=self, title="Load settings",
                                              filetypes=[("KoboldCpp settings", "*.kcpps *.kcppt *.json"),
                                                         ("All files", "*")]) or ""
        if kind == "save_config":
            return filedialog.asksaveasfilename(parent=self, title="Save settings", defaultextension=".kcpps",
                                                filetypes=[("KoboldCpp settings", "*.kcpps")]) or ""
        raise ValueError(kind)

    def pick_model(self):
        path = self._ask("model")
        if not path:
            return
        self.vars["model"].set(path)
        self.refresh_facts()  # at once, not after the typing delay
        if self.model_info is not None:
            self._mark(None)
            self.set_status(f"Model: {Path(path).name}")
        else:
            self.show_error(F.FieldError("model", self.fields["model"].label, self.facts_message.cget("text")))

    def pick_mmproj(self):
        path = self._ask("mmproj")
        if not path:
            return
        self.vars["mmproj"].set(path)
        try:
            F.check_projector_file(path, self.vars["model"].get().strip() or None)
        except F.FieldError as e:
            self.show_error(e)
            return
        self._mark(None)
        self.set_status(f"Vision projector: {Path(path).name}")

    def pick_adapter(self):
        path = self._ask("adapter")
        if path:
            self.vars["chatcompletionsadapter"].set(path)

    def use_bundled(self):
        """Assemble the bundled model (first time: a few seconds) in a thread, keeping the window alive."""
        if self._bundled_q is not None:
            return
        self._bundled_q = queue.Queue()
        self.bundled_button.configure(state="disabled")
        self.set_status("Preparing the bundled model…")

        def work(q=self._bundled_q, cache_dir=self.bundled_cache_dir):
            try:
                from gguf_loader.bundled import ensure_default_model
                path = ensure_default_model(progress=lambda done, total: q.put(("progress", done, total)),
                                            cache_dir=cache_dir)
                q.put(("ok", str(path)))
            except Exception as e:  # shown in the window
                q.put(("error", f"The bundled model is not available: {e}"))

        threading.Thread(target=work, daemon=True).start()
        self.after(100, self._bundled_poll)

    def _bundled_poll(self):
        while True:
            try:
                msg = self._bundled_q.get_nowait()
            except queue.Empty:
                self.after(100, self._bundled_poll)
                return
            if msg[0] != "progress":
                break
            done, total = msg[1], msg[2]
            self.bundled_progress.append(done)
            pct = f" {100 * done // total}%" if total else ""
            self.set_status(f"Preparing the bundled model (first use only):{pct}")
        self._bundled_q = None
        self.bundled_button.configure(state="normal")
        if msg[0] == "ok":
            self.vars["model"].set(msg[1])
            self.refresh_facts()
            self._mark(None)
            self.set_status(f"Using the bundled model (Gemma 3 270M): {msg[1]}")
        else:
            self.show_error(msg[1])

    # ---------- config files ----------
    def save_config(self):
        try:
            ns = F.collect(self.base, self.get_values(), self.hooks, check_model=False)
        except F.FieldError as e:
            self.show_error(e)
            return
        path = self._ask("save_config")
        if not path:
            return
        if not Path(path).suffix:
            path += ".kcpps"
        try:
            self.hooks.export_config(ns, path)
        except OSError as e:
            self.show_error(f"Could not save {path}: {e.strerror or e}")
            return
        self._mark(None)
        self.set_status(f"Saved settings to {path}")

    def load_config(self):
        path = self._ask("load_config")
        if not path:
            return
        h = self.hooks
        ns = copy.copy(self.base)
        try:
            h.apply_config(h.build_parser(), ns, h.load_config_file(path), explicit=set(), source=Path(path).name)
        except h.arg_error as e:
            self.show_error(f"Could not load settings: {e}")
            return
        self.base = h.finalize(ns)  # keys the window does not show (e.g. jinja) come from the file too
        self.set_values(F.to_display(ns))
        self._sync_switches()
        self.refresh_facts()
        self._mark(None)
        self.set_status(f"Loaded settings from {path}")

    # ---------- launch / close ----------
    def launch(self):
        try:
            ns = F.collect(self.base, self.get_values(), self.hooks, check_model=True)
            F.check_port_free(ns.host, ns.port)
        except F.FieldError as e:
            self.show_error(e)
            return
        self.result = ns
        self.destroy()

    def close(self):
        self.result = None
        self.destroy()

    def destroy(self):
        if self._facts_after is not None:  # else Tk prints "invalid command name" once the window is gone
            self.after_cancel(self._facts_after)
            self._facts_after = None
        super().destroy()


def run_launcher(args: argparse.Namespace, hooks, on_ready=None) -> argparse.Namespace | None:
    """Show the window; return the chosen settings on Launch, None when closed.
    `hooks` is koboldcpp.cli_hooks(); `on_ready(app)` runs once the window is up (tests use it)."""
    try:
        app = LauncherApp(args, hooks)
    except tk.TclError as e:  # DISPLAY is set but no X server answers
        if getattr(args, "showgui", False):
            print(f"koboldcpp.py: error: cannot open the launcher window: {e}", file=sys.stderr)
            raise SystemExit(2)
        print(f"Launcher window unavailable ({e}); serving the bundled model instead.")
        return copy.copy(args)
    if on_ready is not None:
        app.after(50, lambda: on_ready(app))
    app.mainloop()
    if app.result is not None:
        print(f"Launcher: starting {app.result.model} on http://{app.result.host}:{app.result.port}", flush=True)
    return app.result
