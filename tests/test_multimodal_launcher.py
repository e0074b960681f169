"""The launcher's vision projector field, on a private Xvfb display (fixtures from tests/test_launcher.py)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("tests.test_launcher")  # skips without tkinter, customtkinter, Xvfb or xdotool
import koboldcpp  # noqa: E402
from tests.support import bundled_model_path, free_port  # noqa: E402
from tests.test_launcher import alive, display, is_error_color, make_app, pump, status  # noqa: E402,F401
from tests.tinymmproj import tiny_mmproj  # noqa: E402


def test_pick_a_projector_save_it_and_launch_with_it(make_app, tmp_path):
    model = bundled_model_path()
    app = make_app(["--model", model])
    proj = tiny_mmproj()
    app.ask_path = lambda kind: proj if kind == "mmproj" else ""
    app.mmproj_button.invoke()
    pump(app, timeout=0.05)
    assert app.get_values()["mmproj"] == proj and status(app).startswith("Vision projector: ")

    target = tmp_path / "vision.kcpps"
    app.ask_path = lambda kind: str(target) if kind == "save_config" else ""
    app.save_button.invoke()
    assert json.loads(target.read_text())["mmproj"] == proj
    assert koboldcpp.parse_args(["--config", str(target)]).mmproj == proj

    app.set_values({"port": str(free_port())})
    app.launch_button.invoke()
    assert app.result is not None and app.result.mmproj == proj and not alive(app)


def test_a_projector_for_another_model_is_refused(make_app, tmp_path):
    app = make_app(["--model", bundled_model_path()])
    wrong = tiny_mmproj(n_embd_text=512)
    app.ask_path = lambda kind: wrong if kind == "mmproj" else ""
    app.mmproj_button.invoke()
    pump(app, timeout=0.05)
    assert "projects to 512 dimensions" in status(app) and status(app).startswith("Vision projector: ")
    assert is_error_color(app, app.status.cget("text_color"))
    app.launch_button.invoke()  # Launch refuses it too
    assert alive(app) and app.result is None and "projects to 512" in status(app)
    app.set_values({"mmproj": str(tmp_path / "missing.gguf")})
    app.launch_button.invoke()
    assert alive(app) and "not found" in status(app)
