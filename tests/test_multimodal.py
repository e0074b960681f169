"""Images in prompts end to end: the bundled Gemma 3 270M with a tiny random-weight gemma3 projector
(tests/tinymmproj.py). Outputs are gibberish; token counts, caching, concurrency and errors are what is checked."""
from __future__ import annotations

import base64
import io
import struct
import time

import pytest

from tests.support import ServerProcess, bundled_model_path, http
from tests.tinymmproj import png_bytes, tiny_mmproj

# 12 ViT layers on 448x448 images: encoding takes a measurable fraction of a second on 2 cores
SLOW = dict(hidden=384, n_layers=12, n_heads=6, ffn=1536, image_size=448, patch=14, scale=4)
N_IMG = 64  # (448/14/4)^2 image tokens


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(bundled_model_path(), "--mmproj", tiny_mmproj(**SLOW), "--parallelrequests", "2",
                      "--contextsize", "2048", "--quiet")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="x")


def _msgs(img: bytes, text="What is in this picture?"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_url(img)}}]}]


def test_capabilities_reported(server):
    st, _, v = http("GET", server.url + "/api/extra/version")
    assert st == 200 and v["vision"] is True and v["audio"] is False
    st, _, m = http("GET", server.url + "/v1/models")
    assert "vision" in m["data"][0]["capabilities"]


def test_openai_sdk_blocking_and_streamed(client):
    r = client.chat.completions.create(model="x", messages=_msgs(png_bytes(seed=11)), max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > N_IMG  # the image's tokens plus the text
    chunks = list(client.chat.completions.create(model="x", messages=_msgs(png_bytes(seed=12)), max_tokens=4,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens > N_IMG
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def _ttft(client, msgs) -> tuple:
    t0 = time.monotonic()
    first = None
    usage = None
    for c in client.chat.completions.create(model="x", messages=msgs, max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
        if first is None and c.choices and (c.choices[0].delta.content or c.choices[0].finish_reason):
            first = time.monotonic() - t0
        if c.usage:
            usage = c.usage
    return first, usage


def test_second_turn_with_the_same_image_is_cached(client):
    img = png_bytes(w=50, h=40, seed=21)
    t1, u1 = _ttft(client, _msgs(img))
    assert u1.prompt_tokens_details.cached_tokens < N_IMG
    # the next turn: same image, the answer and a new question appended
    msgs = _msgs(img) + [{"role": "assistant", "content": "A picture."},
                         {"role": "user", "content": "And the colours?"}]
    t2, u2 = _ttft(client, msgs)
    assert u2.prompt_tokens_details.cached_tokens >= N_IMG + 5, u2
    assert t2 < t1 / 2, (t1, t2)


def test_kobold_images(server):
    body = {"prompt": "Describe the image.", "max_length": 4, "images": [b64(png_bytes(seed=31))], "temperature": 0}
    st, _, r = http("POST", server.url + "/api/v1/generate", body)
    assert st == 200 and isinstance(r["results"][0]["text"], str)
    st, _, perf = http("GET", server.url + "/api/extra/perf")
    assert perf["last_input_count"] > N_IMG and perf["last_media_tokens"] == N_IMG
    assert perf["last_cached_tokens"] < N_IMG and perf["last_encode_time"] > 0
    # the same image again is served from the cache: nothing encoded
    st, _, r = http("POST", server.url + "/api/v1/generate", body)
    st, _, perf = http("GET", server.url + "/api/extra/perf")
    assert st == 200 and perf["last_cached_tokens"] >= N_IMG and perf["last_encode_time"] == 0


def test_ollama_images(server):
    img = b64(png_bytes(seed=41))
    st, _, r = http("POST", server.url + "/api/generate", {"prompt": "What is this?", "images": [img],
                                                          "stream": False, "options": {"num_predict": 3}})
    assert st == 200 and r["prompt_eval_count"] > N_IMG, r
    st, _, r = http("POST", server.url + "/api/chat", {"messages": [{"role": "user", "content": "What is this?",
                                                                     "images": [img]}],
                                                      "stream": False, "options": {"num_predict": 3}})
    assert st == 200 and r["prompt_eval_count"] > N_IMG, r


def _wav() -> bytes:
    pcm = b"\x00\x00" * 1600
    return (b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
            + b"data" + struct.pack("<I", len(pcm)) + pcm)


def test_anthropic_image_blocks_with_the_sdk(server):
    """Claude-style clients send images as base64 content blocks, in user turns and in tool results."""
    import anthropic
    client = anthropic.Anthropic(base_url=server.url, api_key="x")
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                       "data": b64(png_bytes(seed=51))}}
    msgs = [{"role": "user", "content": [img, {"type": "text", "text": "What is in this picture?"}]}]
    m = client.messages.create(model="m", max_tokens=3, messages=msgs)
    assert m.usage.input_tokens > N_IMG
    assert client.messages.count_tokens(model="m", messages=msgs).input_tokens == m.usage.input_tokens
    # a screenshot returned by a tool: the tool result holds the image
    tools = [{"name": "screenshot", "description": "Take a screenshot", "input_schema": {"type": "object"}}]
    follow = [{"role": "user", "content": "Look at the screen."},
              {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "screenshot", "input": {}}]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                            "content": [img, {"type": "text", "text": "the screen"}]}]}]
    assert client.messages.count_tokens(model="m", messages=follow, tools=tools).input_tokens > N_IMG
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=3, system=[img], messages=msgs)
    assert "messages only" in str(e.value)


def test_anthropic_images_are_listed_in_prompt_order():
    """A tool result goes before its turn's text in the prompt; its image must come first in the media list too."""
    from adapters import anthropic
    from adapters.media import MEDIA_MARKER, MediaPolicy

    def img(seed):
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": b64(png_bytes(w=8 + seed, h=8, seed=seed))}}
    media = []
    msgs = anthropic.parse_messages({"messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "shot", "input": {}}]},
        {"role": "user", "content": [img(1), {"type": "text", "text": "see"},
                                     {"type": "tool_result", "tool_use_id": "t", "content": [img(2)]}]}]},
        media, MediaPolicy(vision=True))
    assert [m["role"] for m in msgs] == ["assistant", "tool", "user"]
    assert msgs[1]["content"] == MEDIA_MARKER and msgs[2]["content"] == MEDIA_MARKER + "see"
    assert [m.width for m in media] == [10, 9]  # the tool's image, then the user's


def test_responses_input_image_and_the_next_turn_keeps_it(client):
    img = data_url(png_bytes(seed=61))
    first = client.responses.create(model="x", max_output_tokens=3, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Describe this."},
                                     {"type": "input_image", "image_url": img}]}])
    assert first.usage.input_tokens > N_IMG
    again = client.responses.create(model="x", max_output_tokens=3, previous_response_id=first.id,
                                    input="And the colours?")
    # the stored conversation still holds the image, and its cache is reused
    assert again.usage.input_tokens > first.usage.input_tokens
    assert again.usage.input_tokens_details.cached_tokens >= N_IMG
    st, _, r = http("POST", client.base_url.__str__().rstrip("/") + "/responses", {
        "model": "x", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]})
    assert st == 400 and "file_id" in r["error"]["message"]


def _huge_png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (9000, 8000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("route,body,needle", [
    ("/api/v1/generate", {"prompt": "x", "images": ["!!not base64!!"]}, "base64"),
    ("/api/v1/generate", {"prompt": "x", "images": [b64(b"hello, not an image")]}, "not an image"),
    ("/api/v1/generate", {"prompt": "x", "images": [b64(png_bytes(seed=i)) for i in range(9)]}, "too many"),
    ("/api/v1/generate", {"prompt": "x", "images": "abc"}, "array"),
    ("/api/v1/generate", {"prompt": "x", "audio": [b64(_wav())]}, "no audio projector"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": b64(_wav()), "format": "wav"}}]}]}, "no audio projector"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, "base64"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]}, "allowremotemedia"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"GIF89a broken", "image/gif")}}]}]}, "image"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["@@@"]}]}, "base64"),
    ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "%%%"}}]}]}, "base64"),
    ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}, "files are not supported"),
    ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "AAAA"}}]}]},
     "documents"),
    ("/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,%%%"}]}]}, "base64"),
])
def test_bad_media_is_a_400_naming_the_problem(server, route, body, needle):
    st, _, r = http("POST", server.url + route, body)
    msg = r["error"]["message"] if isinstance(r.get("error"), dict) else r.get("error") or r.get("detail", {}).get("msg")
    assert st == 400 and needle.lower() in str(msg).lower(), (st, r)


def test_image_over_the_pixel_limit_is_a_400(server):
    st, _, r = http("POST", server.url + "/api/v1/generate", {"prompt": "x", "images": [b64(_huge_png())]})
    assert st == 400 and "pixel limit" in str(r).lower(), r


def test_media_without_a_projector_is_refused():
    from adapters import kobold
    from adapters.errors import BadRequest
    with pytest.raises(BadRequest) as e:
        kobold.parse_generate({"prompt": "x", "images": [b64(png_bytes())]}, kobold.GenDefaults())
    assert "no vision projector" in e.value.msg
    from adapters import anthropic, responses
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(png_bytes())}}
    with pytest.raises(BadRequest) as e:
        anthropic.parse_messages({"messages": [{"role": "user", "content": [img]}]}, [], None)
    assert "no vision projector" in e.value.msg
    with pytest.raises(BadRequest) as e:
        responses.parse_input([{"role": "user", "content": [{"type": "input_image", "image_url": data_url(png_bytes())}]}],
                              [], None)
    assert "no vision projector" in e.value.msg


def test_markers_in_user_text_are_plain_text(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a <__media__> b"}],
                                       max_tokens=2)
    assert r.usage.prompt_tokens < N_IMG


def test_mismatched_projector_is_one_clear_line(tmp_path):
    import subprocess
    import sys
    from tests.support import KOBOLDCPP
    bad = tiny_mmproj(n_embd_text=512)
    p = subprocess.run([sys.executable, str(KOBOLDCPP), "--model", bundled_model_path(), "--mmproj", bad,
                        "--skiplauncher", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "projects to 512 dimensions" in p.stderr and "Traceback" not in p.stderr
    missing = str(tmp_path / "nope.gguf")
    p = subprocess.run([sys.executable, str(KOBOLDCPP), "--model", bundled_model_path(), "--mmproj", missing,
                        "--skiplauncher", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "--mmproj" in p.stderr and "not found" in p.stderr
    p = subprocess.run([sys.executable, str(KOBOLDCPP), "--model", bundled_model_path(), "--mmproj",
                        bundled_model_path(), "--skiplauncher", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "is not a vision/audio projector" in p.stderr and "Traceback" not in p.stderr
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(tiny_mmproj(), "rb").read()[:5000])
    p = subprocess.run([sys.executable, str(KOBOLDCPP), "--model", bundled_model_path(), "--mmproj", str(cut),
                        "--skiplauncher", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "truncated" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_other_slot_keeps_streaming_while_an_image_is_encoded():
    """Engine level: slot A streams text; slot B's image is encoded on the projector's thread meanwhile."""
    from adapters.media import MediaPolicy, image
    from gguf_loader.engine import Engine, EngineConfig
    from gguf_loader.jobs import MEDIA_MARKER, GenRequest, SamplingParams
    e = Engine(EngineConfig(bundled_model_path(), n_ctx=1024, mmproj_path=tiny_mmproj(**SLOW), n_slots=2,
                            quiet=True))
    try:
        greedy = SamplingParams(temperature=0, top_k=1)
        a = e.submit(GenRequest(prompt="Once upon a time", max_length=400, sampling=greedy, bypass_eos=True))
        stamps = []
        it = a.stream(poll=0.05)
        while len(stamps) < 3:  # A is generating
            ev = next(it)
            if ev.kind == "text":
                stamps.append(time.monotonic())
        m = image(png_bytes(seed=51), MediaPolicy(vision=True), "img", "images")
        b = e.submit(GenRequest(prompt=f"{MEDIA_MARKER}Describe.", max_length=2, media=[m], sampling=greedy))
        t_b = time.monotonic()
        while not b.finished.is_set():
            ev = next(it)
            if ev.kind == "text":
                stamps.append(time.monotonic())
        rb = b.result
        a.abort()
        assert rb.error is None and rb.media_tokens == N_IMG and rb.encode_time > 0.2, rb
        during = [t for t in stamps if t_b <= t <= t_b + rb.encode_time]
        # A kept producing tokens while B's image was encoded (a blocking encode would leave none)
        assert len(during) >= 3, (len(during), rb.encode_time)
    finally:
        e.close()


def test_audio_projector_end_to_end():
    """A tiny Whisper-style qwen2a projector: input_audio parts and Kobold `audio`; images are then refused."""
    from tests.tinymmproj import tiny_audio_mmproj, wav_bytes
    from openai import OpenAI
    s = ServerProcess(bundled_model_path(), "--mmproj", tiny_audio_mmproj(), "--contextsize", "2048", "--quiet")
    try:
        st, _, v = http("GET", s.url + "/api/extra/version")
        assert v["audio"] is True and v["vision"] is False
        client = OpenAI(base_url=s.url + "/v1", api_key="x")
        msgs = [{"role": "user", "content": [{"type": "text", "text": "Transcribe this."}, {
            "type": "input_audio", "input_audio": {"data": b64(wav_bytes(seed=3)), "format": "wav"}}]}]
        r = client.chat.completions.create(model="x", messages=msgs, max_tokens=2)
        assert r.usage.prompt_tokens > 750  # a clip is padded to a 30 s window: 750 audio tokens
        r = client.chat.completions.create(model="x", messages=msgs, max_tokens=2)
        assert r.usage.prompt_tokens_details.cached_tokens > 750
        st, _, r = http("POST", s.url + "/api/v1/generate", {"prompt": "Transcribe.", "max_length": 2,
                                                            "audio": [b64(wav_bytes(seed=4))]})
        assert st == 200
        st, _, perf = http("GET", s.url + "/api/extra/perf")
        assert perf["last_media_tokens"] == 750
        st, _, r = http("POST", s.url + "/api/v1/generate", {"prompt": "x", "images": [b64(png_bytes())]})
        assert st == 400 and "no vision projector" in str(r)
    finally:
        s.stop()


def test_trimming_and_contextshift_never_cut_an_image():
    """Engine level: a front trim that would land inside an image drops all of it; a chat that drops its oldest
    turn keeps the image's cached KV through ContextShift (nothing re-encoded)."""
    from adapters.media import MediaPolicy, image
    from gguf_loader.engine import Engine, EngineConfig
    from gguf_loader.jobs import MEDIA_MARKER, GenRequest, SamplingParams
    n_img = 64  # tiny_mmproj() defaults: 128x128 -> 64 tokens
    e = Engine(EngineConfig(bundled_model_path(), n_ctx=512, mmproj_path=tiny_mmproj(), quiet=True))
    try:
        greedy = SamplingParams(temperature=0, top_k=1)
        m = image(png_bytes(seed=61), MediaPolicy(vision=True), "img", "images")

        def run(prompt, ctx=None, n=2):
            r = e.submit(GenRequest(prompt=prompt, media=[m] if MEDIA_MARKER in prompt else [], max_length=n,
                                    max_context_length=ctx or 512, sampling=greedy)).wait(120)
            assert r.error is None, r.error
            return r

        tail = " and the rest of the story goes on from here for a while" * 2
        whole = run("Some words first. " + MEDIA_MARKER + tail)
        assert whole.media_tokens == n_img
        n_tail = whole.prompt_tokens - n_img - 10  # roughly the text after the image
        # a context that leaves room for the tail and part of the image: the image goes, never half of it
        cut = run("Some words first. " + MEDIA_MARKER + tail, ctx=n_tail + n_img // 2 + 2)
        assert cut.media_tokens == 0 and 0 < cut.prompt_tokens < n_tail + n_img // 2

        a = "An old turn that the client will drop later, with enough words to be worth shifting away. " * 2
        b = " What do you see in this picture? Tell me everything about its colours and shapes please. " * 2
        first = run(a + MEDIA_MARKER + b)
        second = run(MEDIA_MARKER + b + " And now a new question.")
        assert second.cached_media_tokens == n_img and second.encode_time == 0, second
        assert second.cached_tokens >= n_img + 30, (first, second)
    finally:
        e.close()


def test_causal_media_decoded_in_pieces_between_neighbour_tokens():
    """Engine level, audio (causal, 750 embeddings): with --batchsize 256 the clip goes in 3 pieces with a
    neighbour's tokens in between, and gives the same text as decoding it in one piece (batch 1024)."""
    from adapters.media import MediaPolicy, audio
    from gguf_loader.engine import Engine, EngineConfig
    from gguf_loader.jobs import MEDIA_MARKER, GenRequest, SamplingParams
    from tests.tinymmproj import tiny_audio_mmproj, wav_bytes
    greedy = SamplingParams(temperature=0, top_k=1)
    clip = audio(wav_bytes(seed=71), MediaPolicy(audio=True), "a", "audio")
    texts = {}
    for nb in (1024, 256):
        e = Engine(EngineConfig(bundled_model_path(), n_ctx=1024, n_batch=nb, n_slots=2,
                                mmproj_path=tiny_audio_mmproj(), quiet=True))
        try:
            a = e.submit(GenRequest(prompt="Once upon a time", max_length=300, sampling=greedy, bypass_eos=True))
            it = a.stream(poll=0.05)
            while next(it).kind != "text":
                pass
            b = e.submit(GenRequest(prompt=f"{MEDIA_MARKER}Transcribe.", max_length=4, media=[clip],
                                    sampling=greedy))
            t0, stamps = time.monotonic(), []
            while not b.finished.is_set():
                ev = next(it)
                if ev.kind == "text":
                    stamps.append(time.monotonic())
            a.abort()
            r = b.result
            assert r.error is None and r.media_tokens == 750, r
            texts[nb] = r.text
            if nb == 256:  # A's tokens arrived between the pieces, while B's audio was being decoded
                during = [t for t in stamps if t0 + r.encode_time < t < t0 + r.process_time]
                assert len(during) >= 2, (len(during), r.encode_time, r.process_time)
        finally:
            e.close()
    assert texts[256] == texts[1024]
