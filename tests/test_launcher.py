"""The launcher window (launcher_gui/), shown for real on a private Xvfb display and driven through its widgets.

The native file dialogs are replaced through `app.ask_path` (the same code runs after the pick); everything else is
the real window: real clicks and pointer moves with xdotool, real screenshots, real config files and a real server
started by pressing Launch. Screenshots of each tab go to tests/artifacts/launcher/.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("tkinter", reason="needs tkinter (Debian: python3-tk, or a Python built with Tk)")
pytest.importorskip("customtkinter", reason="needs customtkinter (pip install -r requirements.txt)")
pytest.importorskip("PIL.ImageGrab", reason="needs Pillow for the screenshots (pip install -r requirements-test.txt)")
if shutil.which("Xvfb") is None:
    pytest.skip("needs Xvfb (apt-get install xvfb)", allow_module_level=True)
if shutil.which("xdotool") is None:
    pytest.skip("needs xdotool (apt-get install xdotool)", allow_module_level=True)

import koboldcpp  # noqa: E402
from tests._launcher_util import ARTIFACTS, Xvfb, find_color_box, grab, pump, screenshot, xdotool  # noqa: E402
from tests.support import KOBOLDCPP, ROOT, free_port, stop_process  # noqa: E402
from tests.tinymodel import CHATML_TEMPLATE, tiny_model_path  # noqa: E402

TAB_SHOTS = {"Quick Launch": "quick_launch", "Hardware": "hardware", "Network": "network", "Tokens": "tokens",
             "Models": "models"}


@pytest.fixture(scope="session")  # Tk keeps its X connection: stopping the display mid-session kills the process
def display(tmp_path_factory):
    """A private X display, and a private GSettings store so the system light/dark setting is ours to flip."""
    saved = {k: os.environ.get(k) for k in ("DISPLAY", "XDG_CONFIG_HOME", "GSETTINGS_BACKEND")}
    xvfb = Xvfb()
    os.environ["DISPLAY"] = xvfb.display
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg"))
    os.environ["GSETTINGS_BACKEND"] = "keyfile"  # a plain file under XDG_CONFIG_HOME, no dconf daemon
    yield xvfb.display
    xvfb.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def make_app(display):
    from launcher_gui import LauncherApp

    apps = []

    def make(argv=()):
        app = LauncherApp(koboldcpp.parse_args(list(argv)), koboldcpp.cli_hooks())
        apps.append(app)
        pump(app, timeout=0.1)
        return app
    yield make
    for app in apps:
        if alive(app):
            app.destroy()


def alive(app) -> bool:
    import tkinter

    try:
        return bool(app.winfo_exists())
    except tkinter.TclError:  # the window was destroyed (Launch)
        return False


def fact(app, name):
    return app.facts_rows[name].cget("text")


def status(app):
    return app.status.cget("text")


def is_error_color(app, widget_or_color):
    color = widget_or_color if isinstance(widget_or_color, (str, tuple)) else widget_or_color.cget("border_color")
    from launcher_gui.app import ERROR_COLOR
    return color == ERROR_COLOR


def test_importing_the_launcher_does_not_import_koboldcpp():
    """koboldcpp imports launcher_gui and hands it cli_hooks(); an import back would be a cycle."""
    code = "import launcher_gui.fields, launcher_gui.app, sys; assert 'koboldcpp' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_pick_model_fills_the_facts_and_every_tab_fits(make_app):
    app = make_app()
    assert fact(app, "Name") == "–" and "Pick a GGUF model" in app.facts_message.cget("text")
    assert app.launch_button.winfo_ismapped()

    tiny = tiny_model_path()
    app.ask_path = lambda kind: tiny if kind == "model" else ""
    app.browse_button.invoke()
    assert app.vars["model"].get() == tiny
    assert fact(app, "Name") == "tiny-llama"
    assert fact(app, "Architecture") == "llama"
    assert fact(app, "Quantization") == "F32"
    assert fact(app, "Trained context") == "512 tokens"
    assert fact(app, "Parameters").endswith("K") and fact(app, "File size").endswith("KB")
    assert fact(app, "Chat template").startswith("no")
    assert "capped to 512" in app.facts_message.cget("text")  # the default 8192 is more than it was trained for

    # every tab at 1024x700: each field's input is shown whole inside the window, and each has a tooltip
    assert (app.winfo_width(), app.winfo_height()) == (1024, 700)
    right, bottom = app.winfo_rootx() + app.winfo_width(), app.winfo_rooty() + app.winfo_height()
    seen = set()
    for tab, shot in TAB_SHOTS.items():
        app.show_tab(tab)
        pump(app, timeout=0.1)
        for dest, items in app.inputs.items():
            for t, w in items:
                if t != tab:
                    continue
                seen.add(dest)
                assert w.winfo_ismapped(), (tab, dest)
                assert w.winfo_rootx() + w.winfo_width() <= right and w.winfo_rooty() + w.winfo_height() <= bottom, \
                    (tab, dest, "cut off at 1024x700")
        screenshot(app, shot)
    assert seen == set(app.fields), set(app.fields) - seen
    assert all(t.text.strip() for tips in app.tips.values() for t in tips)
    assert set(app.tips) == set(app.fields)
    # a model with a chat template says so
    chat = tiny_model_path(chat_template=CHATML_TEMPLATE)
    app.ask_path = lambda kind: chat
    app.browse_button.invoke()
    assert fact(app, "Chat template").startswith("yes")


def test_a_file_that_is_not_a_model_is_refused_in_the_window(make_app, tmp_path):
    app = make_app()
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model")
    app.ask_path = lambda kind: str(bad)
    app.browse_button.invoke()
    assert fact(app, "Name") == "–"
    assert "Not a usable model" in app.facts_message.cget("text")
    assert status(app).startswith("Model file:") and is_error_color(app, app.model_entry)
    app.launch_button.invoke()
    assert alive(app) and app.result is None


def test_tooltip_appears_when_the_pointer_rests_on_a_field(make_app, display):
    app = make_app()
    app.show_tab("Network")
    pump(app, timeout=0.2)
    _, entry = app.inputs["port"][0]
    x = entry.winfo_rootx() + entry.winfo_width() // 2
    y = entry.winfo_rooty() + entry.winfo_height() // 2
    assert xdotool("mousemove", str(x), str(y), display=display).returncode == 0
    tip = app.tips["port"][0]
    assert pump(app, lambda: tip.tip is not None, timeout=3), "no tooltip after resting on the Port field"
    label = tip.tip.winfo_children()[0]
    assert "port" in label.cget("text").lower() and label.cget("text") == app.fields["port"].tip
    pump(app, timeout=0.1)
    # the tooltip is its own window: grab the screen around both
    img = grab(display, (app.winfo_rootx(), app.winfo_rooty(), app.winfo_rootx() + 1024, app.winfo_rooty() + 700))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    img.save(ARTIFACTS / "tooltip.png")
    xdotool("mousemove", "5", "5", display=display)
    assert pump(app, lambda: tip.tip is None, timeout=3), "tooltip stayed after the pointer left"


def test_chat_adapter_choices_presets_autoguess_and_a_file(make_app, tmp_path):
    from adapters.instruct import list_presets
    from launcher_gui import fields as F

    app = make_app(["--model", tiny_model_path()])
    values = app.adapter_box.cget("values")
    assert values[:2] == ["Alpaca", "AutoGuess"]
    assert sorted(values[2:]) == sorted(n for n in list_presets() if n != "Alpaca") and len(values) > 5
    assert app.vars["chatcompletionsadapter"].get() == "Alpaca"

    def chosen():
        return F.collect(app.base, app.get_values(), app.hooks).chatcompletionsadapter

    assert chosen() is None  # Alpaca = the server's default
    app.adapter_box.set("ChatML")
    assert chosen() == "ChatML"
    app.adapter_box.set("AutoGuess")
    assert chosen() == "AutoGuess"
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"user_start": "<u>", "assistant_start": "<a>"}))
    app.ask_path = lambda kind: str(own) if kind == "adapter" else ""
    app.adapter_button.invoke()
    assert chosen() == str(own)
    app.adapter_box.set("NoSuchPreset")
    app.launch_button.invoke()
    assert alive(app) and app.result is None
    assert status(app).startswith("Chat adapter: unknown chat adapter 'NoSuchPreset'")
    assert is_error_color(app, app.adapter_box)


def test_save_writes_a_kcpps_that_the_command_line_accepts(make_app, tmp_path):
    app = make_app()
    tiny = tiny_model_path()
    app.set_values({"model": tiny, "port": "5123", "contextsize": "4096", "threads": "2", "batchsize": "256",
                    "password": "sekrit", "chatcompletionsadapter": "ChatML", "flashattention": True,
                    "launch": True, "multiuser": "3", "defaultgenamt": "300", "noshift": False,
                    "smartcache": "4", "smartcachemb": "256", "promptlookup": "6", "fastfirsttoken": True})
    target = tmp_path / "mine"  # no suffix: .kcpps is added
    app.ask_path = lambda kind: str(target) if kind == "save_config" else ""
    app.save_button.invoke()
    saved = tmp_path / "mine.kcpps"
    assert status(app) == f"Saved settings to {saved}", status(app)
    data = json.loads(saved.read_text())
    assert data["model"] == tiny and data["port"] == 5123 and data["noshift"] is True

    args = koboldcpp.parse_args(["--config", str(saved)])
    assert (args.model, args.port, args.contextsize, args.threads, args.batchsize) == (tiny, 5123, 4096, 2, 256)
    assert (args.password, args.chatcompletionsadapter, args.multiuser, args.defaultgenamt) == \
           ("sekrit", "ChatML", 3, 300)
    assert args.flashattention and args.launch and args.noshift and not args.nofastforward
    assert (args.smartcache, args.smartcachemb, args.promptlookup, args.fastfirsttoken) == (4, 256, 6, True)

    out = tmp_path / "again.kcpps"
    r = subprocess.run([sys.executable, str(KOBOLDCPP), "--config", str(saved), "--exportconfig", str(out)],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == data

    # a bad value is not saved
    app.set_values({"batchsize": "lots"})
    app.ask_path = lambda kind: str(tmp_path / "bad.kcpps")
    app.save_button.invoke()
    assert not (tmp_path / "bad.kcpps").exists()
    assert status(app) == "Batch size: must be a whole number, got 'lots'"
    assert app.current_tab == "Hardware"  # the field's tab is brought into view


def test_load_fills_the_fields_from_an_exported_config(make_app, tmp_path):
    tiny = tiny_model_path()
    exported = tmp_path / "cli.kcpps"
    r = subprocess.run([sys.executable, str(KOBOLDCPP), "--model", tiny, "--port", "6123", "--contextsize", "2048",
                        "--nofastforward", "--password", "pw", "--chatcompletionsadapter", "Llama-3",
                        "--multiuser", "0", "--parallelrequests", "2", "--defaultgenamt", "300", "--usemlock",
                        "--host", "0.0.0.0", "--threads", "1", "--exportconfig", str(exported)],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    app = make_app()
    app.ask_path = lambda kind: str(exported) if kind == "load_config" else ""
    app.load_button.invoke()
    assert status(app) == f"Loaded settings from {exported}"
    v = app.get_values()
    assert (v["model"], v["port"], v["contextsize"], v["host"], v["threads"]) == (tiny, "6123", "2048", "0.0.0.0", "1")
    assert (v["password"], v["chatcompletionsadapter"], v["multiuser"], v["parallelrequests"], v["defaultgenamt"]) \
        == ("pw", "Llama-3", "0", "2", "300")
    assert v["usemlock"] is True and v["nofastforward"] is False and v["noshift"] is False  # both switches off
    assert str(app.shift_switch.cget("state")) == "disabled"  # ContextShift needs FastForward
    assert fact(app, "Name") == "tiny-llama"

    # a config with a bad value: a clear message, fields unchanged
    bad = tmp_path / "bad.kcpps"
    bad.write_text(json.dumps({"port": 5009, "contextsize": "big"}))
    app.ask_path = lambda kind: str(bad)
    app.load_button.invoke()
    assert status(app).startswith("Could not load settings: bad.kcpps: --contextsize must be a whole number")
    assert is_error_color(app, app.status.cget("text_color"))
    assert app.vars["port"].get() == "6123"
    # KoboldCpp's own key names: the model as model_param, blasbatchsize, an empty host (every interface)
    theirs = tmp_path / "theirs.kcpps"
    theirs.write_text(json.dumps({"model_param": tiny, "blasbatchsize": 128, "host": "", "usecuda": None}))
    app.set_values({"model": ""})
    app.ask_path = lambda kind: str(theirs)
    app.load_button.invoke()
    v = app.get_values()
    assert (v["model"], v["batchsize"], v["host"]) == (tiny, "128", ""), status(app)
    from launcher_gui import fields as F
    assert F.collect(app.base, v, app.hooks).host == ""
    broken = tmp_path / "broken.kcpps"
    broken.write_text("{not json")
    app.ask_path = lambda kind: str(broken)
    app.load_button.invoke()
    assert "is not valid JSON" in status(app)


def test_invalid_input_is_shown_in_the_window_and_launch_refuses(make_app, tmp_path):
    app = make_app(["--model", tiny_model_path()])
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    busy_port = busy.getsockname()[1]
    cases = [
        ({"port": "abc"}, "Network", "port", "Port: must be a whole number, got 'abc'"),
        ({"port": "70000"}, "Network", "port", "Port: must be between 1 and 65535, got 70000"),
        ({"threads": "9999"}, "Hardware", "threads", "Threads: must be between -1 and 512, got 9999"),
        ({"contextsize": "100"}, "Tokens", "contextsize", "Context size: must be between 256 and 262144, got 100"),
        ({"defaultgenamt": ""}, "Tokens", "defaultgenamt", "Default gen. amount: enter a number"),
        ({"host": "203.0.113.7"}, "Network", "host",  # a documentation address no machine here has
         "Host: cannot listen on 203.0.113.7: Cannot assign requested address"),
        ({"model": ""}, "Quick Launch", "model", "Model file: no model chosen: press Browse, or 'Use bundled model'"),
        ({"model": str(tmp_path / "gone.gguf")}, "Quick Launch", "model",
         f"Model file: file not found: {tmp_path / 'gone.gguf'}"),
        ({"port": str(busy_port)}, "Network", "port",
         f"Port: {busy_port} is already in use on 127.0.0.1; choose another port"),
    ]
    good = app.get_values()
    try:
        for i, (change, start_tab, dest, message) in enumerate(cases):
            app.set_values(good)
            app.set_values(change)
            app.show_tab("Tokens" if start_tab != "Tokens" else "Network")  # the error must bring its field into view
            app.launch_button.invoke()
            pump(app, timeout=0.05)
            assert alive(app) and app.result is None, change
            assert status(app) == message, (change, status(app))
            assert is_error_color(app, app.status.cget("text_color"))
            tabs = [t for t, _ in app.inputs[dest]]
            assert app.current_tab in tabs, (change, app.current_tab)
            widget = dict(app.inputs[dest])[app.current_tab]
            assert is_error_color(app, widget), change
            if dest == "port" and "in use" in message:
                screenshot(app, "error_port_in_use")
        # fixed: Launch closes the window and hands back the chosen settings
        app.set_values(good)
        port = free_port()
        app.set_values({"port": str(port), "contextsize": "1024", "nofastforward": False})
        app.launch_button.invoke()
        assert app.result is not None and not alive(app)
        ns = app.result
        assert (ns.port, ns.contextsize, ns.model, ns.nofastforward, ns.noshift) == \
               (port, 1024, tiny_model_path(), True, True)
        assert ns.skiplauncher is False and ns.exportconfig is None  # the rest is the original namespace
    finally:
        busy.close()


def test_use_bundled_model_shows_progress_then_its_facts(make_app, tmp_path):
    app = make_app()
    app.bundled_cache_dir = tmp_path / "cache"  # a first use, so the assembling progress is real
    app.bundled_button.invoke()
    assert str(app.bundled_button.cget("state")) == "disabled"
    assert pump(app, lambda: app._bundled_q is None, timeout=60), "bundled model not ready in 60 s"
    assert app.bundled_progress and app.bundled_progress == sorted(app.bundled_progress)
    assert app.vars["model"].get().startswith(str(tmp_path / "cache"))
    assert status(app).startswith("Using the bundled model"), status(app)
    assert fact(app, "Architecture") == "gemma3" and fact(app, "Quantization") == "Q4_K_M"
    assert str(app.bundled_button.cget("state")) == "normal"


def test_window_follows_the_system_light_and_dark_mode(make_app):
    """On Linux the system setting is GNOME's color-scheme, which darkdetect reads with `gsettings`."""
    import customtkinter as ctk

    if shutil.which("gsettings") is None or subprocess.run(
            ["gsettings", "get", "org.gnome.desktop.interface", "color-scheme"], capture_output=True).returncode:
        pytest.skip("needs gsettings with the GNOME interface schema (Debian: libglib2.0-bin and "
                    "gsettings-desktop-schemas) to flip the system light/dark setting")
    def system(scheme):
        subprocess.run(["gsettings", "set", "org.gnome.desktop.interface", "color-scheme", scheme], check=True)

    system("prefer-dark")
    try:
        app = make_app(["--model", tiny_model_path()])
        assert ctk.get_appearance_mode() == "Dark"
        pump(app, timeout=0.2)
        screenshot(app, "quick_launch_dark")
        system("default")
        assert pump(app, lambda: ctk.get_appearance_mode() == "Light", timeout=5), "did not follow the system"
    finally:
        system("default")


def test_run_launcher_close_returns_none_and_no_x_server_is_a_clear_error(display, capsys):
    from launcher_gui import run_launcher

    args = koboldcpp.parse_args([])
    hooks = koboldcpp.cli_hooks()
    assert run_launcher(args, hooks, on_ready=lambda app: app.close()) is None

    os.environ["DISPLAY"] = ":4242"  # nothing listens there
    try:
        with pytest.raises(SystemExit) as e:
            run_launcher(koboldcpp.parse_args(["--showgui"]), hooks)
        assert e.value.code == 2
        assert "cannot open the launcher window" in capsys.readouterr().err
        fallback = run_launcher(args, hooks)  # no --showgui: serve the bundled model instead, and say so
        assert fallback is not None and fallback.model is None
        assert "serving the bundled model instead" in capsys.readouterr().out
    finally:
        os.environ["DISPLAY"] = display


def test_launch_button_starts_a_server_that_answers(display, tmp_path):
    """`koboldcpp.py --showgui --config FILE` in its own process; the Launch button is clicked with xdotool."""
    port = free_port()
    cfg = tmp_path / "tiny.kcpps"
    cfg.write_text(json.dumps({"model": tiny_model_path(), "port": port, "contextsize": 512, "quiet": True}))
    env = dict(os.environ, DISPLAY=display, PYTHONUNBUFFERED="1")
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, str(KOBOLDCPP), "--showgui", "--config", str(cfg)], cwd=str(ROOT),
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        found = xdotool("search", "--sync", "--onlyvisible", "--name", "^KoboldCpp Launcher$", display=display,
                        timeout=60)
        assert found.returncode == 0 and found.stdout.split(), found.stderr
        win = found.stdout.split()[0]
        deadline = time.time() + 20
        while True:  # Tk may map the window before its final size
            geo = xdotool("getwindowgeometry", "--shell", win, display=display).stdout
            g = dict(line.split("=", 1) for line in geo.split())
            x, y, w, h = (int(g[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
            if (w, h) == (1024, 700) or time.time() > deadline:
                break
            time.sleep(0.1)
        assert (w, h) == (1024, 700)
        # wait until the window has drawn its facts (the model from the config), then find the green button
        from launcher_gui.app import GREEN
        rgb = tuple(int(GREEN[i:i + 2], 16) for i in (1, 3, 5))
        deadline = time.time() + 30
        box = None
        while time.time() < deadline and box is None:
            img = grab(display, (x, y, x + w, y + h))
            box = find_color_box(img, rgb)
            time.sleep(0.1)
        assert box is not None, "no Launch button on screen"
        assert proc.poll() is None, "the window closed before Launch"
        time.sleep(0.3)
        grab(display, (x, y, x + w, y + h)).save(ARTIFACTS / "e2e_before_launch.png")
        cx, cy = x + (box[0] + box[2]) // 2, y + (box[1] + box[3]) // 2
        assert xdotool("mousemove", str(cx), str(cy), "click", "1", display=display).returncode == 0

        url = f"http://127.0.0.1:{port}/api/v1/model"
        deadline = time.time() + 60
        answer = None
        while time.time() < deadline and answer is None:
            assert proc.poll() is None, f"server exited:\n{(tmp_path / 'server.log').read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert answer is not None, f"no answer on {url}:\n{(tmp_path / 'server.log').read_text()}"
        assert answer["result"] == "koboldcpp/" + os.path.basename(tiny_model_path())[:-5]
        out = (tmp_path / "server.log").read_text()
        assert f"Launcher: starting {tiny_model_path()} on http://127.0.0.1:{port}" in out
        assert "Loading " in out  # model-loading progress in the console
        assert xdotool("search", "--onlyvisible", "--name", "^KoboldCpp Launcher$",
                       display=display).stdout.strip() == "", "the window is still open"
    finally:
        stop_process(proc, 15)
        log.close()
