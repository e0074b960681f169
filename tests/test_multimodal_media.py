"""adapters/media.py: decoding and checking images/audio from clients, and remote fetches with their limits.
No model needed: a local HTTP server stands in for remote image hosts."""
from __future__ import annotations

import base64
import http.server
import io
import threading
import time

import pytest
from PIL import Image

from adapters import media as M
from adapters.errors import BadRequest
from gguf_loader.jobs import MEDIA_MARKER

VISION = M.MediaPolicy(vision=True)


def encoded(fmt: str, size=(40, 30), **kw) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", size, (200, 30, 90))
    if fmt == "GIF":
        frames = [im, Image.new("RGB", size, (0, 0, 255))]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    else:
        im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_format_decodes_to_rgb_pixels(fmt):
    m = M.image(encoded(fmt), VISION, "img", "images")
    assert (m.kind, m.width, m.height, len(m.data)) == ("image", 40, 30, 40 * 30 * 3)
    r, g, b = m.data[:3]
    assert (r > 150 and b > 40) if fmt != "GIF" else (r > 150)  # GIF: the first frame, not the blue second one


def test_visionmaxres_scales_the_longest_side_and_changes_the_key():
    raw = encoded("PNG", (900, 300))
    small = M.image(raw, M.MediaPolicy(vision=True, max_res=300), "img", "images")
    assert (small.width, small.height) == (300, 100)
    full = M.image(raw, M.MediaPolicy(vision=True, max_res=1024), "img", "images")
    assert (full.width, full.height) == (900, 300) and full.key != small.key
    assert M.image(raw, VISION, "img", "images").key == full.key  # same bytes, same settings: same cache key


def test_data_urls_and_base64_variants():
    png = encoded("PNG")
    std = base64.b64encode(png).decode()
    for s in (std, std.rstrip("="), "\n".join(std[i:i + 60] for i in range(0, len(std), 60)),
              base64.urlsafe_b64encode(png).decode(), "data:image/png;base64," + std):
        assert M.b64decode(s, "x", "images") == png
    mime, raw = M.data_url("data:image/png;base64," + std, "x", "p")
    assert mime == "image/png" and raw == png
    assert M.image_url("data:image/png;base64," + std, VISION, "x", "p").width == 40
    with pytest.raises(BadRequest, match="not an image"):
        M.image_url("data:text/plain;base64,aGVsbG8=", VISION, "x", "p")
    with pytest.raises(BadRequest, match="base64"):
        M.b64decode("@@@@", "x", "p")
    with pytest.raises(BadRequest, match="empty"):
        M.b64decode("", "x", "p")


def test_bad_images_name_the_problem():
    with pytest.raises(BadRequest, match="not an image"):
        M.image(b"plain text", VISION, "images[0]", "images")
    with pytest.raises(BadRequest, match="damaged|not an image"):
        M.image(encoded("PNG")[:60], VISION, "images[0]", "images")
    with pytest.raises(BadRequest, match="byte limit"):
        M.image(encoded("PNG"), M.MediaPolicy(vision=True, max_bytes=50), "images[0]", "images")
    with pytest.raises(BadRequest, match="no vision projector"):
        M.image(encoded("PNG"), M.MediaPolicy(), "images[0]", "images")
    with pytest.raises(BadRequest, match="too many"):
        M.base64_list(["a"] * 9, VISION, "image", "images")


def test_audio_is_checked_against_the_projector():
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 24
    with pytest.raises(BadRequest, match="no audio projector"):
        M.audio(wav, VISION, "audio[0]", "audio")
    both = M.MediaPolicy(vision=True, audio=True)
    assert M.audio(wav, both, "audio[0]", "audio").kind == "audio"
    with pytest.raises(BadRequest, match="WAV, MP3 or FLAC"):
        M.audio(b"not audio at all", both, "audio[0]", "audio")


def test_user_text_cannot_claim_a_media_slot():
    assert M.strip_markers(f"a{MEDIA_MARKER}b") == "ab"


# ------------------------------------------------------------------ remote fetches

class _Host(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def log_message(self, *a):
        pass

    def do_GET(self):
        kind, payload = self.routes.get(self.path, ("404", b""))
        if kind == "404":
            self.send_response(404)
            self.end_headers()
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", payload)
            self.end_headers()
        elif kind == "trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x" * 10)
                self.wfile.flush()
                time.sleep(0.1)
        elif kind == "nolength":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(payload)
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)


@pytest.fixture(scope="module")
def host():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Host)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    _Host.routes = {"/ok.png": ("ok", encoded("PNG")), "/big": ("ok", b"x" * 5000),
                    "/big-nolength": ("nolength", b"x" * 5000), "/slow": ("trickle", b""),
                    "/to-ok": ("redirect", url + "/ok.png")}
    yield url
    srv.shutdown()


LAN = M.MediaPolicy(vision=True, allow_remote=True, private_hosts_ok=True, max_bytes=4000, remote_timeout=1.0)


def test_remote_fetch_with_limits(host):
    assert M.image_url(host + "/ok.png", LAN, "x", "p").width == 40
    assert M.image_url(host + "/to-ok", LAN, "x", "p").width == 40  # redirects are followed (and checked)
    for path, needle in (("/big", "byte limit"), ("/big-nolength", "byte limit"), ("/missing", "answered 404")):
        with pytest.raises(BadRequest, match=needle):
            M.image_url(host + path, LAN, "x", "p")
    t0 = time.monotonic()
    with pytest.raises(BadRequest, match="longer than|within"):
        M.image_url(host + "/slow", LAN, "x", "p")
    assert time.monotonic() - t0 < 3


def test_remote_fetch_refuses_local_addresses_and_needs_the_flag(host):
    public_only = M.MediaPolicy(vision=True, allow_remote=True)
    for url in (host + "/ok.png", "http://10.1.2.3/a.png", "http://[::1]/a.png", "http://169.254.169.254/latest"):
        with pytest.raises(BadRequest, match="local or private"):
            M.image_url(url, public_only, "x", "p")
    with pytest.raises(BadRequest, match="allowremotemedia"):
        M.image_url(host + "/ok.png", VISION, "x", "p")
    with pytest.raises(BadRequest, match="data: URL"):
        M.image_url("file:///etc/passwd", VISION, "x", "p")
