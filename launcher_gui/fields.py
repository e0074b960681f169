"""What the launcher shows and how its text turns into command-line values (no tkinter here, so it is testable
without a display). Numbers go through the same converters as the command line, so the window and
`--config` accept and reject exactly the same values."""
from __future__ import annotations

import argparse
import copy
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_ADAPTER = "Alpaca"
AUTOGUESS = "AutoGuess"


@dataclass(frozen=True)
class Field:
    dest: str          # argparse dest (and .kcpps key)
    label: str
    kind: str          # "int", "text", "bool", "choice"
    invert: bool = False  # a switch shown as "on" when the flag is false (ContextShift = not --noshift)
    choices: tuple = ()
    tip: str = ""


_SPEC = (
    Field("model", "Model file", "text"),
    Field("contextsize", "Context size", "choice",
          choices=("2048", "4096", "8192", "16384", "32768", "65536", "131072")),
    Field("gpulayers", "GPU layers", "int"),
    Field("threads", "Threads", "int"),
    Field("chatcompletionsadapter", "Chat adapter", "choice"),
    Field("launch", "Open browser", "bool"),
    Field("mmproj", "Vision projector", "text"),
    Field("batchsize", "Batch size", "choice",
          choices=("16", "32", "64", "128", "256", "512", "1024", "2048", "4096")),
    Field("flashattention", "Flash attention", "bool"),
    Field("usemmap", "Use mmap", "bool"),
    Field("usemlock", "Use mlock", "bool"),
    Field("host", "Host", "text"),
    Field("port", "Port", "int"),
    Field("password", "Password", "text"),
    Field("multiuser", "Multiuser queue", "int"),
    Field("parallelrequests", "Parallel requests", "int"),
    Field("quiet", "Quiet mode", "bool"),
    Field("defaultgenamt", "Default gen. amount", "int"),
    Field("noshift", "ContextShift", "bool", invert=True),
    Field("nofastforward", "FastForward", "bool", invert=True),
    Field("smartcache", "SmartCache slots", "int"),
    Field("smartcachemb", "SmartCache RAM (MiB)", "int"),
    Field("promptlookup", "Prompt lookup", "int"),
    Field("fastfirsttoken", "Fast first token", "bool"),
    Field("modeldir", "Models folder", "text"),
    Field("maxloadedmodels", "Models loaded at once", "int"),
    Field("unloadtimeout", "Unload idle after (s)", "int"),
    Field("adminpassword", "Admin key", "text"),
    Field("lora", "LoRA adapters", "text"),
    Field("quantkv", "KV cache type", "choice", choices=("0", "1", "2")),
)
_BY_DEST = {f.dest: f for f in _SPEC}


def _tips(threads_auto: int) -> dict:
    return {
        "model": "The GGUF model file to chat with. Press Browse to pick one, or use the small bundled model.",
        "contextsize": "How many tokens (about 3/4 of a word each) the model can see at once: prompt plus reply. "
                       "Bigger needs more memory. It is capped to what the model was trained for.",
        "gpulayers": "How many of the model's layers run on the graphics card. 0 = CPU only, -1 = all. "
                     "Needs a GPU build of llama-cpp-python.",
        "threads": f"CPU threads used for generating text. -1 picks for you ({threads_auto} on this machine).",
        "chatcompletionsadapter": "How chat messages are turned into a prompt for OpenAI-style chat clients. "
                                  "Alpaca is the default; AutoGuess reads the template from the model; "
                                  "or pick a preset or your own JSON adapter file.",
        "launch": "Open the web page in your browser once the model is loaded.",
        "mmproj": "Optional: the mmproj .gguf file made for this model, so it can see images (and hear audio, "
                  "if the projector has an audio encoder). Leave empty for text only.",
        "batchsize": "How many prompt tokens are processed in one step. Larger is faster on long prompts "
                     "but uses more memory.",
        "flashattention": "Use flash attention: less memory for long contexts, sometimes faster.",
        "usemmap": "Map the model file into memory instead of reading it: faster start, memory is shared "
                   "with the file cache.",
        "usemlock": "Keep the whole model in RAM so the system never swaps it out (needs enough free memory).",
        "host": "The network address to listen on. 127.0.0.1 = this computer only; 0.0.0.0 = every network "
                "interface (other devices can connect); empty means the same.",
        "port": "The port the server listens on (1-65535). The web page will be at http://localhost:PORT.",
        "password": "Optional API key. When set, clients must send it as 'Authorization: Bearer KEY'. "
                    "Leave empty for no password.",
        "multiuser": "What happens when a request arrives while the model is busy: 0 = answer 'busy' at once, "
                     "1 = wait in a queue of 6, N = a queue of N-1.",
        "parallelrequests": "How many requests are generated at the same time (1-32). More helps several users "
                            "but each gets less speed.",
        "quiet": "Do not print prompts and generated text in the console.",
        "defaultgenamt": "How many tokens to generate when a client does not say how many (16-8192).",
        "noshift": "ContextShift: when the context is full, drop the oldest tokens instead of re-reading the "
                   "whole prompt. Needs FastForward.",
        "nofastforward": "FastForward: reuse the part of the prompt the model has already read, so only new "
                         "text is processed.",
        "smartcache": "SmartCache: when another user's request takes a conversation's slot, keep that "
                      "conversation's cache in RAM (up to this many) and restore it when it returns, instead of "
                      "re-reading it. 0 = off.",
        "smartcachemb": "The most RAM, in MiB, the SmartCache may hold; the oldest saved conversations go first.",
        "promptlookup": "Speculative decoding for greedy requests: guess up to N tokens by copying from earlier in "
                        "the text and check them in one step. Faster when the reply repeats the prompt (edits, "
                        "quotes, code); the text is unchanged. 0 = off.",
        "fastfirsttoken": "Read a prompt's last token together with the prompt: the first word comes one step "
                          "sooner, but the same seed may then give a different text when run alone or beside "
                          "other requests.",
        "modeldir": "A folder of .gguf models (and .kcpps settings files): clients pick one by name and it is "
                    "loaded on demand. The model file above stays the default; it may be left empty.",
        "maxloadedmodels": "How many models may be loaded at once (1-64); the least recently used idle one is "
                           "unloaded to make room.",
        "unloadtimeout": "Unload a model nobody has used for this many seconds (0 = never).",
        "adminpassword": "Key for loading and unloading models through the API. Empty: the password is used; "
                         "with neither, those routes are off.",
        "lora": "LoRA adapter files applied at load, separated by ';'; add ':SCALE' after a file for a scale "
                "other than 1.",
        "quantkv": "KV cache type: 0 = f16, 1 = q8_0 (about half the memory), 2 = q4_0 (about a third). "
                   "1 and 2 need flash attention.",
    }


def fields(threads_auto: int) -> dict:
    """dest -> Field with its tooltip; `threads_auto` is what -1 threads means on this machine."""
    tips = _tips(threads_auto)
    return {f.dest: replace(f, tip=tips[f.dest]) for f in _SPEC}


def preset_names() -> list:
    """The chat adapter presets the server knows (read at run time), less the two shown first."""
    from adapters.instruct import list_presets
    return [n for n in list_presets() if n not in (DEFAULT_ADAPTER, AUTOGUESS)]


def adapter_choices() -> list:
    return [DEFAULT_ADAPTER, AUTOGUESS, *preset_names()]


class FieldError(Exception):
    def __init__(self, dest: str, label: str, message: str):
        super().__init__(f"{label}: {message}")
        self.dest = dest
        self.label = label


def _flag_free(message: str) -> str:
    # the command line's messages name the flag ("--port must be ..."); the window names the field instead
    return re.sub(r"^--[\w-]+ ", "", message)


def to_display(args: argparse.Namespace) -> dict:
    """Namespace -> widget values (strings for entries, bools for switches)."""
    out = {}
    for dest, f in _BY_DEST.items():
        v = getattr(args, dest, None)
        if f.kind == "bool":
            out[dest] = (not bool(v)) if f.invert else bool(v)
        elif dest == "chatcompletionsadapter":
            out[dest] = DEFAULT_ADAPTER if v in (None, "") else str(v)
        elif dest == "lora":
            out[dest] = "; ".join(v or [])
        else:
            out[dest] = "" if v is None else str(v)
    return out


def _resolve_adapter(text: str) -> str | None:
    """Check the choice with the server's own resolver, so the window refuses what the server would refuse."""
    text = text.strip()
    if not text or text.lower() == DEFAULT_ADAPTER.lower():
        return None  # the server's default
    if text.lower() == AUTOGUESS.lower():
        return AUTOGUESS
    from adapters.instruct import AdapterError, load_adapter
    spec = str(Path(text).expanduser()) if text.startswith("~") else text
    try:
        name, _ = load_adapter(spec, None, log=lambda _msg: None)
    except AdapterError as e:
        raise ValueError(str(e).replace("--chatcompletionsadapter ", ""))
    return spec if Path(spec).is_file() else name


def collect(base: argparse.Namespace, values: dict, hooks, check_model: bool = True) -> argparse.Namespace:
    """Widget values -> a copy of `base` with the chosen settings. Raises FieldError for the first bad field.
    `hooks` is koboldcpp's CliHooks: numbers go through its apply_config, so they meet the --config checks."""
    parser = hooks.build_parser()
    ns = copy.copy(base)
    for dest, f in _BY_DEST.items():
        if dest not in values:
            continue
        raw = values[dest]
        if f.kind == "bool":
            setattr(ns, dest, (not raw) if f.invert else bool(raw))
            continue
        text = str(raw).strip()
        if dest in ("model", "mmproj"):
            setattr(ns, dest, text or None)
            continue
        if dest == "chatcompletionsadapter":
            try:
                ns.chatcompletionsadapter = _resolve_adapter(text)
            except ValueError as e:
                raise FieldError(dest, f.label, str(e))
            continue
        if dest in ("password", "adminpassword"):
            setattr(ns, dest, str(raw) or None)  # spaces may be part of a key; only empty means none
            continue
        if dest == "modeldir":
            if text and not Path(text).expanduser().is_dir():
                raise FieldError(dest, f.label, f"not a folder: {text}")
            ns.modeldir = text or None
            continue
        if dest == "lora":
            ns.lora = [x.strip() for x in text.split(";") if x.strip()] or None
            for item in ns.lora or []:
                path = item.rsplit(":", 1)[0] if re.search(r":[-+]?[\d.]+$", item) else item
                if not Path(path).expanduser().is_file():
                    raise FieldError(dest, f.label, f"file not found: {path}")
            continue
        if dest == "host":
            ns.host = text  # empty = every interface, as on the command line
            continue
        if not text:
            raise FieldError(dest, f.label, "enter a number")
        try:
            hooks.apply_config(parser, ns, {dest: text}, explicit=set(), source=f.label)
        except hooks.arg_error as e:
            raise FieldError(dest, f.label, _flag_free(str(e).removeprefix(f.label + ": ")))
    hooks.finalize(ns)
    if getattr(ns, "quantkv", 0) and not ns.flashattention:
        raise FieldError("quantkv", _BY_DEST["quantkv"].label, "types 1 and 2 need flash attention (Hardware tab)")
    if check_model and (ns.model or not ns.modeldir):  # a models folder alone is enough
        check_model_file(ns.model)
        if getattr(ns, "mmproj", None):
            check_projector_file(ns.mmproj, ns.model)
    return ns


def check_projector_file(path: str, model: str | None):
    """The projector must be a clip GGUF whose projection fits the model's embedding size."""
    label = _BY_DEST["mmproj"].label
    from gguf_loader import GGUFError, inspect
    from gguf_loader.inspect import inspect_projector
    n_embd = None
    if model:
        try:
            n_embd = inspect(str(Path(model).expanduser())).n_embd
        except (GGUFError, OSError):
            pass
    try:
        inspect_projector(str(Path(path).expanduser()), n_embd)
    except GGUFError as e:
        raise FieldError("mmproj", label, str(e))
    except OSError as e:
        raise FieldError("mmproj", label, f"cannot read {path}: {e.strerror or e}")


def check_model_file(model: str | None):
    label = _BY_DEST["model"].label
    if not model:
        raise FieldError("model", label, "no model chosen: press Browse, or 'Use bundled model'")
    p = Path(model).expanduser()
    if not p.exists():
        raise FieldError("model", label, f"file not found: {model}")
    if not p.is_file():
        raise FieldError("model", label, f"not a file: {model}")
    from gguf_loader import GGUFError, inspect
    try:
        inspect(str(p))
    except GGUFError as e:
        raise FieldError("model", label, str(e))
    except OSError as e:
        raise FieldError("model", label, f"cannot read {model}: {e.strerror or e}")


def check_port_free(host: str, port: int):
    """Bind the way the server will (SO_REUSEADDR, as http.server does) so only a real listener blocks it."""
    host = host or "0.0.0.0"  # the server binds "" as IPv4 all-interfaces
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FieldError("host", _BY_DEST["host"].label, f"unknown address {host!r} ({e.strerror})")
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except PermissionError:
            raise FieldError("port", _BY_DEST["port"].label,
                             f"no permission to use {port} (ports below 1024 need admin rights)")
        except OSError as e:
            if e.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                raise FieldError("port", _BY_DEST["port"].label,
                                 f"{port} is already in use on {host}; choose another port")
            raise FieldError("host", _BY_DEST["host"].label, f"cannot listen on {host}: {e.strerror or e}")


def human_size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def human_count(n) -> str:
    if not n:
        return "unknown"
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suf}".replace(".0" + suf, suf)
    return str(n)


def model_facts(info) -> list:
    """ModelInfo -> (label, value) rows for the facts panel."""
    tmpl = "yes (used by AutoGuess)" if info.has_chat_template else "no (chat uses the chosen adapter)"
    return [
        ("Name", info.name or Path(info.path).stem),
        ("Architecture", info.architecture or "unknown"),
        ("Parameters", human_count(info.n_params)),
        ("Quantization", info.quantization or "unknown"),
        ("File size", human_size(info.file_size)),
        ("Trained context", f"{info.context_length} tokens" if info.context_length else "unknown"),
        ("Chat template", tmpl),
    ]
