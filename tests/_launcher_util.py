"""Helpers for the launcher window tests: a private Xvfb display and window screenshots."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.support import stop_process

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "launcher"


class Xvfb:
    """Xvfb on the first free display number from :90 up; `display` is the DISPLAY value."""

    def __init__(self, size: str = "1280x800x24"):
        if shutil.which("Xvfb") is None:
            raise RuntimeError("Xvfb is not installed (Debian: apt-get install xvfb)")
        for n in range(90, 190):
            if Path(f"/tmp/.X{n}-lock").exists() or Path(f"/tmp/.X11-unix/X{n}").exists():
                continue
            self.display = f":{n}"
            self.proc = subprocess.Popen(["Xvfb", self.display, "-screen", "0", size, "-nolisten", "tcp"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + 10
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    break  # lost a race for this number; try the next
                if Path(f"/tmp/.X11-unix/X{n}").exists():
                    return
                time.sleep(0.05)
            self.stop()
        raise RuntimeError("could not start Xvfb on any display from :90 to :189")

    def stop(self):
        stop_process(self.proc, 5)


def screenshot(widget, name: str) -> Path:
    """Grab the window holding `widget` from the X server into tests/artifacts/launcher/NAME.png."""
    from PIL import ImageGrab

    top = widget.winfo_toplevel()
    top.update()
    x, y = top.winfo_rootx(), top.winfo_rooty()
    w, h = top.winfo_width(), top.winfo_height()
    img = ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=os.environ["DISPLAY"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / f"{name}.png"
    img.save(out)
    return out


def pump(app, until=None, timeout: float = 5.0, step: float = 0.02) -> bool:
    """Run the window's event loop (timers, redraws, X events) until `until()` is true or `timeout` passes."""
    deadline = time.time() + timeout
    while True:
        app.update()
        if until is not None and until():
            return True
        if time.time() >= deadline:
            return until is None
        time.sleep(step)


def grab(display: str, bbox=None):
    """A PIL image of the screen of `display` (or the box x0, y0, x1, y1 of it)."""
    from PIL import ImageGrab

    return ImageGrab.grab(bbox=bbox, xdisplay=display)


def find_color_box(img, rgb, tolerance: int = 6):
    """Bounding box (x0, y0, x1, y1) of the pixels within `tolerance` of `rgb`, or None."""
    from PIL import ImageChops

    lo = tuple(max(0, c - tolerance) for c in rgb)
    hi = tuple(min(255, c + tolerance) for c in rgb)
    bands = []
    for band, a, b in zip(img.convert("RGB").split(), lo, hi):
        bands.append(band.point(lambda v, a=a, b=b: 255 if a <= v <= b else 0))
    mask = ImageChops.multiply(ImageChops.multiply(bands[0], bands[1]), bands[2])
    return mask.getbbox()


def xdotool(*args: str, display: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, DISPLAY=display)
    return subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=timeout)
