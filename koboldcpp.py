#!/usr/bin/env python3
"""koboldcpp.py: a local LLM server for GGUF models (KoboldCpp-compatible API, OpenAI API, built-in web page).

This file is the entry point: command line, config files and start-up. The HTTP layer is server/, API-dialect
translation adapters/, model work gguf_loader/."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable

VERSION = "1.104"  # the KoboldCpp API level we report; Lite and SillyTavern gate features on it
PROGRAM_VERSION = "0.1.0"
DEFAULT_PORT = 5001


def default_threads() -> int:
    # Measured on the 2-core dev machine: 2 threads decode fastest (README, "Threads").
    # On bigger machines llama.cpp's decode is memory-bound; leave one core for the HTTP side.
    n = os.cpu_count() or 1
    return n if n <= 4 else min(n - 1, 16)


class ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit 2, never a usage dump mid-screen
        raise ArgError(message)


def _int_range(lo, hi, name):
    def conv(s):
        try:
            v = int(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {s!r}")
        if v < lo or v > hi:
            raise argparse.ArgumentTypeError(f"{name} must be between {lo} and {hi}, got {v}")
        return v
    return conv


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="koboldcpp.py", description="Serve a GGUF model with KoboldCpp's API, an OpenAI-compatible API and a web page.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_param", nargs="?", default=None, metavar="MODEL",
                   help="GGUF model file (or a .kcpps config file)")
    p.add_argument("--model", "-m", dest="model", default=None, help="GGUF model file")
    p.add_argument("--port", type=_int_range(1, 65535, "--port"), default=DEFAULT_PORT, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; use 0.0.0.0 for every interface")
    p.add_argument("--contextsize", "-c", "--ctx-size", type=_int_range(256, 262144, "--contextsize"), default=8192,
                   help="context size in tokens (capped to the model's trained context)")
    p.add_argument("--threads", "-t", type=_int_range(-1, 512, "--threads"), default=-1,
                   help=f"CPU threads; -1 = auto ({default_threads()} here)")
    p.add_argument("--batchsize", "-b", "--blasbatchsize", type=_int_range(16, 4096, "--batchsize"), default=512,
                   help="prompt tokens processed per step")
    p.add_argument("--gpulayers", "-ngl", type=_int_range(-1, 999, "--gpulayers"), default=0,
                   help="layers to offload to the GPU (needs a GPU build of llama-cpp-python; -1 = all)")
    p.add_argument("--password", default=None, help="API key clients must send as 'Authorization: Bearer KEY'")
    p.add_argument("--multiuser", type=_int_range(0, 100, "--multiuser"), nargs="?", const=1, default=1,
                   help="queue requests while busy: N>1 queues N-1, 1 queues 6, 0 answers busy (503) at once")
    p.add_argument("--parallelrequests", type=_int_range(1, 32, "--parallelrequests"), default=1,
                   help="sequences decoded together (continuous batching)")
    p.add_argument("--defaultgenamt", type=_int_range(16, 8192, "--defaultgenamt"), default=896,
                   help="tokens generated when a request does not say")
    p.add_argument("--smartcache", type=_int_range(0, 1024, "--smartcache"), nargs="?", const=8, default=0,
                   help="keep up to N conversations' caches in RAM when their slot is taken over, restored when they "
                        "return (alone: 8; 0 = off)")
    p.add_argument("--smartcachemb", type=_int_range(16, 1048576, "--smartcachemb"), default=1024,
                   help="RAM the SmartCache may use, in MiB")
    p.add_argument("--fastfirsttoken", action="store_true",
                   help="decode a prompt's last token with the prompt: one decode fewer before the first token, "
                        "but the same seed may then give a different text cached, batched or alone")
    p.add_argument("--promptlookup", type=_int_range(0, 16, "--promptlookup"), nargs="?", const=8, default=0,
                   help="speculative decoding for greedy requests: draft up to N tokens from earlier in the context "
                        "and verify them in one decode (alone: 8; 0 = off); the text is unchanged")
    p.add_argument("--noshift", action="store_true", help="disable ContextShift")
    p.add_argument("--nofastforward", action="store_true", help="disable FastForward prompt reuse (implies --noshift)")
    p.add_argument("--flashattention", "-fa", action="store_true", help="use flash attention")
    p.add_argument("--usemmap", action="store_true", help="memory-map the model file")
    p.add_argument("--usemlock", action="store_true", help="lock the model in RAM")
    p.add_argument("--quiet", action="store_true", help="do not log prompts and generated text")
    p.add_argument("--skiplauncher", action="store_true", help="never show the launcher window")
    p.add_argument("--showgui", action="store_true", help="show the launcher window even when a model is given")
    p.add_argument("--launch", action="store_true", help="open the web page in a browser once the server is ready")
    p.add_argument("--config", default=None, metavar="FILE.kcpps", help="load flags from a .kcpps JSON file (command line wins)")
    p.add_argument("--exportconfig", default=None, metavar="FILE", help="write the flags to a .kcpps file and exit")
    p.add_argument("--chatcompletionsadapter", default=None,
                   help="instruct template for chat: a preset name, a JSON file, or AutoGuess (default Alpaca)")
    p.add_argument("--jinja", action="store_true", help="render chat with the model's own jinja chat template")
    p.add_argument("--reasoningformat", choices=("separate", "none", "drop"), default="separate",
                   help="a model's thinking in chat replies: separate (reasoning_content / thinking), none (left in "
                        "the text), drop (removed)")
    p.add_argument("--embeddingsmodel", default=None,
                   help="separate GGUF model for /v1/embeddings (a file, or the name of a model in --modeldir)")
    p.add_argument("--modeldir", default=None, metavar="DIR",
                   help="offer every .gguf and .kcpps in DIR; a request's 'model' picks one (loaded on demand)")
    p.add_argument("--maxloadedmodels", type=_int_range(1, 64, "--maxloadedmodels"), default=1,
                   help="models held loaded at once; past that the least recently used idle one is unloaded")
    p.add_argument("--unloadtimeout", type=_int_range(0, 10**7, "--unloadtimeout"), default=0, metavar="S",
                   help="unload a model idle for S seconds (0: never)")
    p.add_argument("--adminpassword", default=None,
                   help="key for the model load/unload routes (default: --password; with neither they are off)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="LoRA adapter applied at load, with an optional scale (default 1); repeatable")
    p.add_argument("--quantkv", type=_int_range(0, 2, "--quantkv"), default=0,
                   help="KV cache type: 0 f16, 1 q8_0, 2 q4_0 (1 and 2 need --flashattention)")
    p.add_argument("--rerankmodel", default=None, metavar="FILE",
                   help="reranker GGUF (e.g. bge-reranker, Qwen3-Reranker) for /v1/rerank, loaded with rank pooling")
    p.add_argument("--mmproj", default=None, help="vision/audio projector (mmproj GGUF) made for the model")
    p.add_argument("--visionmaxres", type=_int_range(64, 8192, "--visionmaxres"), default=1024,
                   help="scale images down so their longest side is at most this many pixels")
    p.add_argument("--allowremotemedia", action="store_true",
                   help="let clients send http(s) image URLs (fetched with size/time limits, public addresses only)")
    p.add_argument("--sdurl", default=None, help="Automatic1111 server for /v1/images/generations (or SD_WEBUI_URL)")
    p.add_argument("--maxrequestsize", type=_int_range(1, 1024, "--maxrequestsize"), default=32, help="request body limit in MB")
    p.add_argument("--preloadstory", default=None, help="story JSON served at /api/extra/preloadstory")
    p.add_argument("--hordemodelname", default=None, help="model name to report (and to serve on the AI Horde) "
                   "instead of the file name")
    p.add_argument("--hordekey", default=None, metavar="KEY", help="AI Horde API key: also serve text jobs of the "
                   "AI Horde while no local user needs the slot (needs --hordeworkername)")
    p.add_argument("--hordeworkername", default=None, metavar="NAME", help="worker name on the AI Horde")
    p.add_argument("--hordemaxctx", type=_int_range(0, 32768, "--hordemaxctx"), default=0,
                   help="largest context a Horde job may use; 0 = the server's context")
    p.add_argument("--hordegenlen", type=_int_range(0, 1024, "--hordegenlen"), default=0,
                   help="most tokens a Horde job may generate; 0 = --defaultgenamt (at most 1024)")
    p.add_argument("--hordeurl", default=None, metavar="URL",
                   help="AI Horde API base URL (default https://aihorde.net/api)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


# flags whose values are paths or launch modes, never stored in a config
_NOT_EXPORTED = {"exportconfig", "config", "version", "showgui", "skiplauncher"}


def config_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _NOT_EXPORTED}


def _explicit_dests(parser: argparse.ArgumentParser, argv: list) -> set:
    """Which dests the command line set explicitly (so a config file does not override them)."""
    ns = parser.parse_args(argv, namespace=argparse.Namespace(**{a.dest: _UNSET for a in parser._actions}))
    # an absent optional positional (the model) is still set, to None, by argparse
    return {k for k, v in vars(ns).items() if v is not _UNSET and not (k == "model_param" and v is None)}


_UNSET = object()
_CONFIG_ALIASES = {"blasbatchsize": "batchsize", "model_param_alias": "model"}


def read_json_file(path: str, what: str):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArgError(f"{what} not found: {path}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArgError(f"{what} {path} is not valid JSON: {e}")


def load_config_file(path: str) -> dict:
    data = read_json_file(path, "config file")
    if not isinstance(data, dict):
        raise ArgError(f"config file {path} must hold a JSON object of flags")
    return data


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, data: dict, explicit: set, source: str):
    """Set the config's keys over the defaults, except flags given on the command line; values are checked
    with the same converters the command line uses."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in data.items():
        key = _CONFIG_ALIASES.get(key, key)
        if key in _NOT_EXPORTED or key not in actions or key in explicit:
            continue  # unknown keys (other KoboldCpp versions' flags) are ignored
        act = actions[key]
        if isinstance(value, list) and key in ("model", "model_param"):
            value = value[0] if value else None  # KoboldCpp's configs hold model lists (multi-part files)
        if value is None:
            setattr(args, key, act.default)
            continue
        if isinstance(act, argparse._AppendAction):  # repeatable flags (--lora): a list, or one string
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(x, str) for x in items):
                raise ArgError(f"{source}: '{key}' must be a list of strings, got {value!r}")
            value = list(items) or None
        elif isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ArgError(f"{source}: '{key}' must be true or false, got {value!r}")
        elif act.type is not None:
            try:
                value = act.type(str(value) if not isinstance(value, str) else value)
            except argparse.ArgumentTypeError as e:
                raise ArgError(f"{source}: {e}")
        elif not isinstance(value, str):
            raise ArgError(f"{source}: '{key}' must be a string, got {value!r}")
        setattr(args, key, value)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (and a --config file). Raises ArgError with one clear line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ArgError:
        raise
    # a positional .kcpps is a config file, as in KoboldCpp
    if args.model_param and args.model_param.lower().endswith((".kcpps", ".kcppt", ".json")) and not args.config:
        args.config, args.model_param = args.model_param, None
    if args.config:
        explicit = _explicit_dests(parser, argv)
        apply_config(parser, args, load_config_file(args.config), explicit, args.config)
    finalize_args(args)
    if args.quantkv and not args.flashattention:
        raise ArgError(_QUANTKV_NEEDS_FA)
    _parse_loras(args.lora)
    if args.showgui and args.skiplauncher:
        raise ArgError("--showgui and --skiplauncher cannot be used together")
    check_horde_args(args)
    return args


def check_horde_args(args: argparse.Namespace):
    """The Horde flags make sense together or not at all (the key itself is never echoed)."""
    if args.hordekey is not None and not args.hordekey.strip():
        raise ArgError("--hordekey is empty")
    if args.hordekey and not (args.hordeworkername or "").strip():
        raise ArgError("--hordekey needs --hordeworkername (the worker's name on the AI Horde)")
    if args.hordeurl and not re.match(r"^https?://[^\s/]+", args.hordeurl):
        raise ArgError(f"--hordeurl must be an http:// or https:// URL, got {args.hordeurl!r}")


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """What every source of settings (command line, config file, launcher) implies after reading."""
    if args.model_param and not args.model:  # KoboldCpp's configs name the model here
        args.model = args.model_param
    args.model_param = None
    if args.nofastforward:
        args.noshift = True  # ContextShift works on top of FastForward
    return args


@dataclass(frozen=True)
class CliHooks:
    """What the launcher window needs from the command line; handed to it so it never imports this file."""
    version: str
    default_threads: Callable[[], int]
    build_parser: Callable[[], argparse.ArgumentParser]
    apply_config: Callable
    load_config_file: Callable[[str], dict]
    export_config: Callable
    finalize: Callable[[argparse.Namespace], argparse.Namespace]
    arg_error: type


def cli_hooks() -> CliHooks:
    return CliHooks(PROGRAM_VERSION, default_threads, build_parser, apply_config, load_config_file, export_config,
                    finalize_args, ArgError)


def export_config(args: argparse.Namespace, path: str):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config_dict(args), f, indent=2)
        f.write("\n")


def has_display() -> bool:
    if sys.platform.startswith("win") or sys.platform == "darwin":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


# ---------------------------------------------------------------- serve

def _err(msg: str, code: int = 1) -> int:
    print(f"koboldcpp.py: error: {msg}", file=sys.stderr)
    return code


def friendly_model_name(args, model_path: str) -> str:
    if args.hordemodelname:
        n = args.hordemodelname
        return n if n.startswith("koboldcpp/") else "koboldcpp/" + n
    base = os.path.splitext(os.path.basename(model_path))[0]
    return "koboldcpp/" + re.sub(r"[^\w.\-]", "_", base)


def _model_path(args):
    """-> (path, None) or (None, exit code)."""
    if args.model:
        return os.path.abspath(os.path.expanduser(args.model)), None
    try:
        from gguf_loader.bundled import ensure_default_model
        path = str(ensure_default_model())
    except Exception as e:
        return None, _err(f"no model given and the bundled model is unavailable: {e}")
    print(f"No model given: serving the bundled model (Gemma 3 270M, a small base model) from {path}. "
          f"Pass --model FILE.gguf to serve another.")
    return path, None


def _chat_context(args, engine, model_name):
    """The chat adapter (the choice is printed) and --jinja. -> chat Context; raises ArgError."""
    from adapters import chat, instruct
    try:
        name, adapter = instruct.load_adapter(args.chatcompletionsadapter, engine.chat_template)
    except instruct.AdapterError as e:
        raise ArgError(f"--chatcompletionsadapter: {e}")
    jinja = bool(args.jinja and engine.chat_template)
    if args.jinja and not jinja:
        print("--jinja: the model has no chat template; using the instruct adapter instead.")
    print(f"Chat completions adapter: {name}" + (" (--jinja: chat uses the model's own template)" if jinja else ""))
    return chat.Context(engine=engine, model_name=model_name, adapter_name=name, adapter=adapter, use_jinja=jinja,
                        default_max_length=args.defaultgenamt, reasoning_format=args.reasoningformat)


def _banner(args, state, url, host, threads, max_queue, model_path):
    e, rule = state.engine, "=" * 72
    lines = [rule, f"Model:    {state.served().model_name}  ({model_path})",
             f"Context:  {e.n_ctx} tokens (trained {e.n_ctx_train}), threads {threads}, slots {e.n_slots}, "
             f"queue {max_queue}",
             f"Serving:  {url}   (web page at {url}/ , KoboldCpp API at {url}/api , OpenAI API at {url}/v1)"]
    if host in ("127.0.0.1", "localhost", "::1"):
        lines.append("Only this computer can connect; use --host 0.0.0.0 to listen on all interfaces.")
    if args.password:
        lines.append("API key required (Authorization: Bearer <password>).")
    print("\n".join(lines + ["Press Ctrl+C to stop.", rule]), flush=True)


def _offered_models(args):
    """-> (specs, default id) or raises ArgError. --model (or the bundled model) and every model in --modeldir."""
    from gguf_loader.models import ModelSpec, model_id, scan_dir
    specs = []
    if args.modeldir:
        d = os.path.abspath(os.path.expanduser(args.modeldir))
        if not os.path.isdir(d):
            raise ArgError(f"--modeldir {args.modeldir}: not a folder")
        specs = scan_dir(d)
        if not specs and not args.model:
            raise ArgError(f"--modeldir {args.modeldir}: no .gguf or .kcpps files in it")
    default = None
    if args.model or not specs:
        path, rc = _model_path(args)
        if rc is not None:
            raise ArgError("no model")
        mid = friendly_model_name(args, path)
        stem = os.path.splitext(os.path.basename(path))[0]
        specs = [s for s in specs if s.id != mid]
        specs.insert(0, ModelSpec(mid, path, None, [stem, os.path.basename(path), model_id(path)]))
        default = mid
    return specs, default or specs[0].id


def _model_args(args, spec):
    """The settings one model loads with: the server's, with its .kcpps laid over them. -> (args, gguf path)."""
    import copy
    margs = copy.copy(args)
    if not spec.config:
        return margs, spec.path
    parser = build_parser()
    data = load_config_file(spec.config)
    apply_config(parser, margs, data, set(), spec.config)
    model = data.get("model") or data.get("model_param")
    if isinstance(model, list):
        model = model[0] if model else None
    if not isinstance(model, str) or not model:
        raise ArgError(f"{spec.config} names no model file")
    here = os.path.dirname(spec.config)

    def near(p):  # a .kcpps names files relative to itself
        p = os.path.expanduser(p)
        return os.path.abspath(p if os.path.isabs(p) else os.path.join(here, p))
    if "lora" in data and margs.lora:
        margs.lora = [near(x) for x in margs.lora]
    if data.get("mmproj") and margs.mmproj:
        margs.mmproj = near(margs.mmproj)
    return margs, near(model)


def _parse_loras(items):
    """--lora FILE[:SCALE] values -> [(path, scale)]; raises ArgError."""
    out = []
    for item in items or []:
        path, scale = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head and re.fullmatch(r"[-+]?\d+(\.\d*)?|[-+]?\.\d+", tail):
            path, scale = head, float(tail)
        if not os.path.isfile(path):
            raise ArgError(f"--lora {item}: file not found")
        if not -100.0 <= scale <= 100.0:
            raise ArgError(f"--lora {item}: scale must be between -100 and 100")
        out.append((os.path.abspath(path), scale))
    return out


def _check_model(args, spec):
    """Read a model's GGUF header (and its own settings) before anything is unloaded for it; raises.
    -> (its settings, its GGUF path, what the header says)"""
    import gguf_loader
    margs, path = _model_args(args, spec)
    info = gguf_loader.inspect(path)
    _parse_loras(margs.lora)
    if margs.quantkv and not margs.flashattention:
        raise ArgError(_QUANTKV_NEEDS_FA)
    return margs, path, info


_QUANTKV_NEEDS_FA = "--quantkv 1 and 2 quantize the V cache, which llama.cpp allows only with --flashattention"


def _load_served(args, spec, embeddings_path, max_queue, threads, own_mmproj: bool, on_progress=None):
    """Build one offered model: engine + chat context + native defaults (the ModelManager's load function).
    The server's --mmproj belongs to the --model model (`own_mmproj`); a .kcpps may name its model's own."""
    from adapters import kobold
    from adapters.media import MediaPolicy
    from gguf_loader.engine import Engine, EngineConfig, ModelLoadError
    from server.app import Served
    margs, path, info = _check_model(args, spec)
    n_ctx = margs.contextsize
    if info.context_length and n_ctx > info.context_length:
        print(f"Context size {n_ctx} is larger than the model's trained context {info.context_length}; "
              f"using {info.context_length}.")
        n_ctx = info.context_length
    mmproj = margs.mmproj if (own_mmproj or spec.config) else None
    cfg = EngineConfig(path, n_ctx=n_ctx, n_threads=threads, n_batch=margs.batchsize,
                       n_gpu_layers=margs.gpulayers, flash_attn=margs.flashattention, use_mmap=margs.usemmap,
                       use_mlock=margs.usemlock, n_slots=margs.parallelrequests, max_queue=max_queue,
                       fastforward=not margs.nofastforward, contextshift=not margs.noshift, quiet=margs.quiet,
                       embedding_model_path=embeddings_path, rerank_model_path=args.rerankmodel,
                       mmproj_path=mmproj, on_load_progress=on_progress, loras=_parse_loras(margs.lora),
                       kv_type=margs.quantkv, smartcache=margs.smartcache, smartcache_mb=margs.smartcachemb,
                       fast_first_token=margs.fastfirsttoken, prompt_lookup=margs.promptlookup)
    engine = Engine(cfg)
    try:
        if args.rerankmodel:
            try:
                engine.load_reranker()
            except ModelLoadError as e:
                raise ArgError(f"--rerankmodel: {e}")
        chat = _chat_context(margs, engine, spec.id)
    except ArgError:
        engine.close()
        raise
    media = MediaPolicy(vision=engine.vision, audio=engine.audio, max_res=margs.visionmaxres,
                        allow_remote=margs.allowremotemedia,
                        max_bytes=min(margs.maxrequestsize * 1024 * 1024, 20 * 1024 * 1024))
    chat.media = media
    defaults = kobold.GenDefaults(max_length=margs.defaultgenamt, max_context_length=engine.n_ctx,
                                  n_vocab=engine.n_vocab, instruct_tags=chat.adapter, media=media)
    return Served(engine, spec.id, chat, defaults)


def serve(args: argparse.Namespace) -> int:
    import gguf_loader
    from gguf_loader.models import LoadFailed, ModelManager
    from server.app import ServerState, build_server
    from server.http import log_line
    from server.ops import LoadStatus, PromptProgressLog

    try:
        check_horde_args(args)  # the launcher's settings skip parse_args
        if args.hordekey and args.modeldir:
            raise ArgError("--hordekey serves one model: use it with --model, not --modeldir")
    except ArgError as e:
        return _err(str(e), 2)
    try:
        specs, default = _offered_models(args)
    except ArgError as e:
        return _err(str(e)) if str(e) != "no model" else 1
    try:
        embeddings_path = None
        if args.embeddingsmodel:
            named = next((s for s in specs if args.embeddingsmodel in [s.id] + s.aliases), None)
            embeddings_path = os.path.abspath(named.path if named and not named.config else args.embeddingsmodel)
            try:
                gguf_loader.inspect(embeddings_path)
            except gguf_loader.GGUFError as e:
                raise gguf_loader.GGUFError(f"--embeddingsmodel: {e}")
        if args.rerankmodel:
            try:
                gguf_loader.inspect(args.rerankmodel)
            except gguf_loader.GGUFError as e:
                raise gguf_loader.GGUFError(f"--rerankmodel: {e}")
        preload = read_json_file(args.preloadstory, "--preloadstory file") if args.preloadstory else None
        default_spec = next(s for s in specs if s.id == default)
        margs, default_path, default_info = _check_model(args, default_spec)
        own_mmproj = bool(args.model or not args.modeldir)
        if margs.mmproj and (own_mmproj or default_spec.config):
            from gguf_loader.inspect import inspect_projector
            try:
                proj = inspect_projector(margs.mmproj, default_info.n_embd)
            except gguf_loader.GGUFError as e:
                raise gguf_loader.GGUFError(f"--mmproj: {e}")
            print(f"Projector: {proj.describe()}")
    except Exception as e:  # GGUFError, ArgError: the first model is checked before the port opens
        return _err(str(e))

    host = args.host or ""
    try:
        httpd = build_server(host, args.port)
    except OSError as e:
        if e.errno in (98, 48, 10048) or "in use" in str(e).lower():
            return _err(f"port {args.port} is already in use (another server running?); pick another with --port")
        return _err(f"cannot listen on {host or '*'}:{args.port}: {e.strerror or e}")

    threads = args.threads if args.threads > 0 else default_threads()
    max_queue = args.multiuser - 1 if args.multiuser > 1 else (6 if args.multiuser == 1 else 0)

    # The port serves while the first model loads: /health says "loading" (with progress), everything else 503.
    stopping = threading.Event()
    httpd.load = LoadStatus(default_path, cancelled=stopping.is_set)
    server_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="http",
                                     daemon=True)
    server_thread.start()

    def stop_server():
        stopping.set()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    def on_term(signum, frame):
        stop_server()
    try:
        signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):  # not the main thread (embedded use)
        pass

    def progress(p: float) -> bool:
        load = httpd.load
        return load.update(p) if load is not None else not stopping.is_set()

    def close_served(served):
        served.engine.close()
    models = ModelManager(specs, lambda spec: _load_served(args, spec, embeddings_path, max_queue, threads,
                                                           spec.id == default and own_mmproj, progress),
                          close_served, lambda served: served.engine.busy,
                          check=lambda spec: _check_model(args, spec), default=default,
                          max_loaded=args.maxloadedmodels, unload_timeout=args.unloadtimeout)
    print(f"Loading {default_spec.path} ...", flush=True)

    def close_http():
        stop_server()
        server_thread.join(5)
        httpd.server_close()
    try:
        models.wait_loaded(default)
    except KeyboardInterrupt:
        close_http()
        models.close()
        return _err("interrupted while loading the model", 130)
    except LoadFailed as e:
        stopped = stopping.is_set()
        close_http()
        models.close()
        if stopped:
            return _err("stopped while loading the model", 130)
        return _err(str(e))

    state = ServerState(
        engine=None, model_name=default, password=args.password or None,
        max_body=args.maxrequestsize * 1024 * 1024, quiet=args.quiet, defaults=None, chat=None,
        program_version=PROGRAM_VERSION, preloadstory=preload,
        sdurl=args.sdurl or os.environ.get("SD_WEBUI_URL") or None, api_version=VERSION, models=models,
        admin_password=args.adminpassword or None)

    shown_host = "localhost" if host in ("", "0.0.0.0", "::", "127.0.0.1", "::1") else host
    url = f"http://{shown_host if ':' not in shown_host else '[' + shown_host + ']'}:{args.port}"
    _banner(args, state, url, host, threads, max_queue, default_spec.path)
    state.end_request()
    if len(specs) > 1:
        print(f"Models offered ({len(specs)}, up to {args.maxloadedmodels} loaded at once): "
              + ", ".join(s.id for s in specs), flush=True)
    progress_log = PromptProgressLog(lambda: [v.engine for v in models.loaded_values()])
    progress_log.start()
    horde_lease = None
    horde = None
    if args.hordekey:  # the Horde worker keeps its (only) model loaded for as long as it runs
        horde_lease = models.acquire(default)
        served = horde_lease.value
        horde = _start_horde(args, served.engine, served.defaults, served.model_name, log_line)
        httpd.extras["horde"] = horde
    httpd.state = state  # from here on every route answers
    httpd.load = None

    if args.launch:
        import webbrowser
        threading.Timer(1.0, lambda: webbrowser.open(url + "/")).start()
    try:
        while server_thread.is_alive():
            server_thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("Shutting down.", flush=True)
        if horde:
            horde.stop()
        if horde_lease:
            horde_lease.release()
        progress_log.stop()
        close_http()
        models.close()
    return 0


def _start_horde(args, engine, defaults, model_name, log):
    """The AI Horde worker when --hordekey is given; its limits default to the server's."""
    if not args.hordekey:
        return None
    from server.horde import DEFAULT_URL, HORDE_MAX_LENGTH, HordeConfig, HordeWorker
    max_ctx = min(args.hordemaxctx or engine.n_ctx, engine.n_ctx)
    gen = min(args.hordegenlen or args.defaultgenamt, HORDE_MAX_LENGTH, max_ctx - 1)
    worker = HordeWorker(HordeConfig(api_key=args.hordekey, worker_name=args.hordeworkername,
                                     model_name=model_name, url=args.hordeurl or DEFAULT_URL,
                                     max_context_length=max_ctx, max_length=gen, version=PROGRAM_VERSION),
                         engine, defaults, log)
    worker.start()
    return worker


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ArgError as e:
        return _err(str(e), 2)
    if args.version:
        print(f"koboldcpp.py {PROGRAM_VERSION} (KoboldCpp API {VERSION})")
        return 0
    if args.exportconfig:
        try:
            export_config(args, args.exportconfig)
        except OSError as e:
            return _err(f"cannot write {args.exportconfig}: {e}", 2)
        print(f"Wrote config to {args.exportconfig}")
        return 0
    if args.showgui or (not args.model and not args.skiplauncher and has_display()):
        try:
            from launcher_gui import run_launcher
        except ImportError as e:
            if args.showgui:
                return _err(f"the launcher window needs customtkinter and tkinter ({e})", 2)
            print(f"Launcher window unavailable ({e}); serving the bundled model instead.")
        else:
            chosen = run_launcher(args, cli_hooks())
            if chosen is None:
                print("Launcher closed without launching.")
                return 0
            args = chosen
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
