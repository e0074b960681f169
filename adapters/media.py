"""Images and audio sent by clients -> engine Media items: base64 and data: URLs decoded, images checked and
decoded to RGB pixels (Pillow: PNG, JPEG, WebP, GIF first frame, BMP), downscaled to --visionmaxres, audio
passed on as its file bytes (llama.cpp's mtmd decodes WAV/MP3/FLAC). Remote http(s) images only when the server
allows it, with a size limit, a time limit and no address on the local machine or network.

Every problem is a BadRequest naming the field, so each dialect answers a 400 in its own shape."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import List, Optional

from gguf_loader.jobs import MEDIA_MARKER, Media

from .errors import BadRequest

MAX_MEDIA_BYTES = 20 * 1024 * 1024  # one image or audio file, as sent
MAX_PIXELS = 64 * 1024 * 1024  # decoded image area (decompression bombs)
REMOTE_TIMEOUT_S = 10.0


@dataclass
class MediaPolicy:
    """What the server accepts; built at start-up from the projector's capabilities and the flags."""
    vision: bool = False
    audio: bool = False
    max_items: int = 8  # media per request
    max_res: int = 1024  # --visionmaxres: the longest side an image is scaled down to
    allow_remote: bool = False  # --allowremotemedia
    max_bytes: int = MAX_MEDIA_BYTES
    remote_timeout: float = REMOTE_TIMEOUT_S
    private_hosts_ok: bool = False  # no flag sets this: only tests (and embedders on a trusted LAN) fetch locally


def strip_markers(text: str) -> str:
    """User text may not smuggle in the engine's media marker (it would claim an image slot)."""
    return text.replace(MEDIA_MARKER, "") if MEDIA_MARKER in text else text


def _no_projector(kind: str) -> str:
    if kind == "audio":
        return "the loaded model has no audio projector (start with --mmproj FILE of a model that hears audio)"
    return "the loaded model has no vision projector (start with --mmproj FILE)"


def b64decode(data, where: str, param: str) -> bytes:
    if not isinstance(data, str):
        raise BadRequest(f"{where} must be a base64 string", param=param)
    s = "".join(data.split())
    if s.startswith("data:"):
        s = s.split(",", 1)[1] if "," in s else ""
    if len(s) > (MAX_MEDIA_BYTES * 4) // 3 + 8:
        raise BadRequest(f"{where} is larger than the {MAX_MEDIA_BYTES // (1024 * 1024)} MB limit", param=param)
    s = s.replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64", param=param) from None
    if not raw:
        raise BadRequest(f"{where} is empty", param=param)
    return raw


def data_url(url: str, where: str, param: str) -> tuple:
    """'data:[mime][;base64],payload' -> (mime, bytes)."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise BadRequest(f"{where} is a data: URL with no ',' before its data", param=param)
    mime = head[5:].split(";")[0].strip().lower()
    if ";base64" not in head.lower():
        raw = urllib.parse.unquote_to_bytes(payload)
        if not raw:
            raise BadRequest(f"{where} is empty", param=param)
        return mime, raw
    return mime, b64decode(payload, where, param)


def image(raw: bytes, policy: MediaPolicy, where: str, param: str) -> Media:
    """Image file bytes -> an RGB Media item (BadRequest when no projector sees images or the bytes are not one)."""
    if not policy.vision:
        raise BadRequest(f"{where} is an image, but {_no_projector('image')}", param=param)
    if len(raw) > policy.max_bytes:
        raise BadRequest(f"{where} is {len(raw)} bytes, over the {policy.max_bytes} byte limit", param=param)
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadRequest(f"{where} is {im.width}x{im.height} pixels, over the {MAX_PIXELS} pixel limit",
                                 param=param)
            im.seek(0)  # GIF/WebP animations: the first frame
            if policy.max_res > 0 and im.format == "JPEG":
                im.draft("RGB", (policy.max_res, policy.max_res))  # decode big JPEGs at 1/2..1/8 scale
            rgb = im.convert("RGB")
    except BadRequest:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise BadRequest(f"{where} is not an image this server can read (PNG, JPEG, WebP, GIF or BMP expected)",
                         param=param) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadRequest(f"{where} is a damaged image ({' '.join(str(e).split()) or type(e).__name__})",
                         param=param) from None
    if policy.max_res > 0 and max(rgb.size) > policy.max_res:
        rgb.thumbnail((policy.max_res, policy.max_res), Image.Resampling.BICUBIC)
    key = hashlib.sha256(raw + b"|%d" % policy.max_res).hexdigest()
    return Media("image", rgb.tobytes(), rgb.width, rgb.height, key)


_AUDIO_MAGIC = ((b"RIFF", 0), (b"fLaC", 0), (b"ID3", 0), (b"OggS", 0))


def audio(raw: bytes, policy: MediaPolicy, where: str, param: str) -> Media:
    if not policy.audio:
        raise BadRequest(f"{where} is audio, but {_no_projector('audio')}", param=param)
    if len(raw) > policy.max_bytes:
        raise BadRequest(f"{where} is {len(raw)} bytes, over the {policy.max_bytes} byte limit", param=param)
    is_wav = raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    is_mp3 = raw[:3] == b"ID3" or (len(raw) > 1 and raw[0] == 0xFF and raw[1] & 0xE0 == 0xE0)
    if not (is_wav or is_mp3 or raw[:4] == b"fLaC"):
        raise BadRequest(f"{where} is not WAV, MP3 or FLAC audio", param=param)
    return Media("audio", raw, 0, 0, hashlib.sha256(raw).hexdigest())


def _public_host(host: str, where: str, param: str, policy: MediaPolicy):
    if policy.private_hosts_ok:
        return
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError, OSError):
        raise BadRequest(f"{where}: cannot resolve the host {host!r}", param=param) from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise BadRequest(f"{where}: {host!r} is a local or private address; remote media must be on the "
                             f"public internet", param=param)


class _CheckRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, where, param, policy):
        self.where, self.param, self.policy = where, param, policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        u = urllib.parse.urlsplit(newurl)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise BadRequest(f"{self.where}: redirected to a non-http URL", param=self.param)
        _public_host(u.hostname, self.where, self.param, self.policy)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, policy: MediaPolicy, where: str, param: str) -> bytes:
    """GET a public http(s) URL: at most policy.max_bytes, within policy.remote_timeout, only public addresses
    (every redirect is checked again)."""
    if not policy.allow_remote:
        raise BadRequest(f"{where} is a remote URL, but this server only takes data: URLs (start it with "
                         f"--allowremotemedia to fetch http(s) images)", param=param)
    u = urllib.parse.urlsplit(url)
    if not u.hostname:
        raise BadRequest(f"{where} has no host", param=param)
    _public_host(u.hostname, where, param, policy)
    opener = urllib.request.build_opener(_CheckRedirects(where, param, policy))
    deadline = time.monotonic() + policy.remote_timeout
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "koboldcpp.py"}),
                         timeout=policy.remote_timeout) as r:
            n = r.headers.get("Content-Length")
            if n and n.isdigit() and int(n) > policy.max_bytes:
                raise BadRequest(f"{where} is {n} bytes, over the {policy.max_bytes} byte limit", param=param)
            parts, got = [], 0
            while got <= policy.max_bytes:  # a slow trickle must not hold the request past the deadline
                if time.monotonic() > deadline:
                    raise BadRequest(f"{where}: the download took longer than {policy.remote_timeout:g} s",
                                     param=param)
                b = r.read1(min(65536, policy.max_bytes + 1 - got))  # what has arrived, not a full buffer
                if not b:
                    break
                parts.append(b)
                got += len(b)
            data = b"".join(parts)
    except BadRequest:
        raise
    except TimeoutError:
        raise BadRequest(f"{where}: the server did not answer within {policy.remote_timeout:g} s",
                         param=param) from None
    except urllib.error.HTTPError as e:
        raise BadRequest(f"{where}: the server answered {e.code}", param=param) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BadRequest(f"{where}: cannot fetch it ({getattr(e, 'reason', e)})", param=param) from None
    if len(data) > policy.max_bytes:
        raise BadRequest(f"{where} is over the {policy.max_bytes} byte limit", param=param)
    return data


def image_url(url, policy: MediaPolicy, where: str, param: str) -> Media:
    """An OpenAI image_url: a data: URL, or http(s) when allowed."""
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where} needs a 'url' string", param=param)
    if not policy.vision:
        raise BadRequest(f"{where} is an image, but {_no_projector('image')}", param=param)
    if url.startswith("data:"):
        mime, raw = data_url(url, where, param)
        if mime and not mime.startswith("image/"):
            raise BadRequest(f"{where} is a data: URL of type {mime!r}, not an image", param=param)
        return image(raw, policy, where, param)
    if url.lower().startswith(("http://", "https://")):
        return image(fetch(url, policy, where, param), policy, where, param)
    raise BadRequest(f"{where} must be a data: URL (or http(s) with --allowremotemedia)", param=param)


def content_part(part: dict, kind: str, policy: Optional[MediaPolicy], where: str, param: str) -> Media:
    """An OpenAI content part (chat's image_url / input_audio, the Responses API's input_image / input_audio) ->
    a Media item (BadRequest naming the part)."""
    policy = policy or MediaPolicy()
    if kind in ("image_url", "input_image", "image"):
        if kind == "input_image" and part.get("file_id") is not None and part.get("image_url") is None:
            raise BadRequest(f"{where}: file_id images are not supported (no file store); send image_url as a "
                             f"data: URL", param=param)
        v = part.get("image_url", part.get("image"))
        url = v.get("url") if isinstance(v, dict) else v
        return image_url(url, policy, where, param)
    if kind in ("input_audio", "audio"):
        v = part.get("input_audio", part.get("audio"))
        if not isinstance(v, dict) or not isinstance(v.get("data"), str):
            raise BadRequest(f"{where}: an input_audio part needs {{'data': base64, 'format': 'wav'|'mp3'}}",
                             param=param)
        if not policy.audio:
            return audio(b"", policy, where, param)
        return audio(b64decode(v["data"], where, param), policy, where, param)
    raise BadRequest(f"{where}: file parts are not supported; send images as image_url data: URLs", param=param)


def base64_list(value, policy: MediaPolicy, kind: str, field: str) -> List[Media]:
    """Kobold/Ollama `images` / `audio`: a list of base64 strings (data: URLs accepted)."""
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"'{field}' must be an array of base64 strings", param=field)
    check_count(len(value), policy, field)
    out = []
    for i, v in enumerate(value):
        where = f"{field}[{i}]"
        if kind == "image" and not policy.vision:
            raise BadRequest(f"{where} is an image, but {_no_projector('image')}", param=field)
        if kind == "audio" and not policy.audio:
            raise BadRequest(f"{where} is audio, but {_no_projector('audio')}", param=field)
        raw = b64decode(v, where, field)
        out.append(image(raw, policy, where, field) if kind == "image" else audio(raw, policy, where, field))
    return out


def check_count(n: int, policy: MediaPolicy, field: str):
    if n > policy.max_items:
        raise BadRequest(f"too many images/audio clips: {n} given, at most {policy.max_items} per request",
                         param=field)


def placeholders(items: List[Media]) -> str:
    return "".join(MEDIA_MARKER for _ in items)


def describe(policy: Optional[MediaPolicy]) -> dict:
    return {"vision": bool(policy and policy.vision), "audio": bool(policy and policy.audio)}
