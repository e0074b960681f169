"""The web page with a vision projector: attach an image to a chat and an instruct turn in headless Chromium; the
thumbnail shows, the image reaches the server in `images`, and the server decodes it (its tokens are counted)."""
from __future__ import annotations

import pytest

from tests.support import ServerProcess, bundled_model_path, http
from tests.tinymmproj import image_tokens, png_bytes, tiny_mmproj

klite = pytest.importorskip("tests.test_klite")  # skips without playwright or Chromium
from tests.test_klite import (DESKTOP, Watch, both_widths, browser, capture_generations, set_settings, tid,  # noqa: E402
                              wait_connected, wait_idle_page)

N_IMG = image_tokens()


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(bundled_model_path(), "--mmproj", tiny_mmproj(), "--contextsize", "2048")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain_server():
    s = ServerProcess(bundled_model_path(), "--contextsize", "1024")
    yield s
    s.stop()


@pytest.fixture
def page_on(browser):
    made = []

    def _open(srv):
        ctx = browser.new_context(viewport=DESKTOP)
        w = Watch(ctx)
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        made.append((ctx, w))
        page.goto(srv.url + "/")
        wait_connected(page)
        return page
    yield _open
    for ctx, w in made:
        ctx.close()
        w.check()


@pytest.mark.parametrize("mode", ["chat", "instruct"])
def test_attach_an_image_to_a_turn(page_on, server, tmp_path, mode):
    img = tmp_path / "photo.png"
    img.write_bytes(png_bytes(w=48, h=36, seed=7))
    page = page_on(server)
    set_settings(page, max_length=4, sampler_seed=5)
    sent = capture_generations(page)
    tid(page, "mode").select_option(mode)
    tid(page, "attach").wait_for(state="visible")
    tid(page, "attach-file").set_input_files(str(img))
    tid(page, "attach-preview").locator("img").wait_for(state="visible")
    tid(page, "input").fill("What is in this picture?")
    tid(page, "input").press("Enter")
    wait_idle_page(page)
    assert tid(page, "error").is_hidden(), tid(page, "error").inner_text()
    assert tid(page, "attach-preview").is_hidden()  # sent with the message
    user = page.locator(".msg.user").first
    thumb = user.locator("img.thumb")
    assert thumb.count() == 1 and thumb.evaluate("i => i.complete && i.naturalWidth") == 48
    assert len(sent) == 1 and len(sent[0]["images"]) == 1
    st, _, perf = http("GET", server.url + "/api/extra/perf")
    assert perf["last_media_tokens"] == N_IMG and perf["last_input_count"] > N_IMG
    # the next turn resends the image; the server has it cached
    tid(page, "input").fill("And the colours?")
    tid(page, "input").press("Enter")
    wait_idle_page(page)
    assert len(sent) == 2 and sent[1]["images"] == sent[0]["images"]
    st, _, perf = http("GET", server.url + "/api/extra/perf")
    assert perf["last_cached_tokens"] > N_IMG and perf["last_encode_time"] == 0
    both_widths(page, f"{mode}-image")


def test_no_attach_button_without_a_projector(page_on, plain_server):
    page = page_on(plain_server)
    tid(page, "mode").select_option("chat")
    assert tid(page, "attach").is_hidden()
