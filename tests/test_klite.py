"""The built-in web page (klite/) driven in headless Chromium against the real server on the bundled model.

Needs `pip install playwright` and Debian's `chromium` (never `playwright install`). Screenshots of every mode at
phone (360 px) and desktop (1280 px) width go to tests/artifacts/klite/.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.support import ServerProcess, bundled_model_path, http

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")

CHROMIUM = os.environ.get("KCPP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ART = Path(__file__).resolve().parent / "artifacts" / "klite"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}
CTX = 2048

if not Path(CHROMIUM).exists():
    pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    with ServerProcess(bundled_model_path(), "--contextsize", str(CTX)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watch:
    """Console errors, page exceptions and any request that is not for the serving host."""

    def __init__(self, context, host="127.0.0.1"):
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.allowed_errors: list[str] = []  # substrings a test expects (e.g. the 401 of a wrong key)
        self.host = host
        context.on("request", self._request)
        context.on("page", self.attach)

    def attach(self, page):
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def _request(self, req):
        u = urlparse(req.url)
        if u.scheme in ("data", "blob"):
            return
        if u.hostname != self.host:
            self.foreign.append(req.url)

    def check(self):
        unexpected = [e for e in self.errors if not any(a in e for a in self.allowed_errors)]
        assert not unexpected, f"console errors: {unexpected}"
        assert not self.foreign, f"requests left the host: {self.foreign}"


@pytest.fixture
def open_page(browser, server):
    """open_page(viewport=DESKTOP, srv=server) -> (page, watch); checks the watch when the test ends."""
    made = []

    def _open(viewport=DESKTOP, srv=None, path="/", connected=True):
        srv = srv or server
        ctx = browser.new_context(viewport=viewport, accept_downloads=True)
        w = Watch(ctx)
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        made.append((ctx, w))
        page.goto(srv.url + path)
        if connected:
            wait_connected(page)
        return page, w

    yield _open
    for ctx, w in made:
        ctx.close()
    for ctx, w in made:
        w.check()


def wait_connected(page):
    page.wait_for_function("document.querySelector('#conn-dot').classList.contains('ok')")


def tid(page, name):
    return page.get_by_test_id(name)


def set_settings(page, **values):
    tid(page, "settings-open").click()
    for k, v in values.items():
        box = tid(page, f"setting-{k}")
        box.fill(str(v))
        box.dispatch_event("change")
    tid(page, "settings-close").click()


def wait_idle_page(page, timeout=60_000):
    page.wait_for_selector("[data-testid=send]:not([hidden])", timeout=timeout)


def shot(page, name):
    ART.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ART / f"{name}.png"))


def both_widths(page, name):
    """Screenshots at desktop and phone width, light and dark; at phone width nothing may stick out sideways."""
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        suffix = "" if scheme == "light" else "-dark"
        page.set_viewport_size(DESKTOP)
        shot(page, f"{name}-desktop{suffix}")
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(100)
        overflow = page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= PHONE["width"], f"page is {overflow}px wide at phone width"
        shot(page, f"{name}-phone{suffix}")
    page.emulate_media(color_scheme="light")
    page.set_viewport_size(DESKTOP)


def capture_generations(page):
    """The JSON bodies the page posts to the streaming endpoint, in order."""
    bodies = []
    page.on("request", lambda r: r.url.endswith("/api/extra/generate/stream") and bodies.append(r.post_data_json))
    return bodies


def stored_session(page):
    page.wait_for_timeout(400)  # autosave is debounced
    return json.loads(page.evaluate("localStorage.getItem('kcpp.session.v1')"))


def perf(server):
    st, _, body = http("GET", server.url + "/api/extra/perf")
    assert st == 200
    return body


# ---------------------------------------------------------------------------------------------------------------

def test_page_loads_offline_clean_and_shows_the_server(open_page, server):
    page, w = open_page()
    assert "gemma-3-270m" in tid(page, "model-name").inner_text()
    assert tid(page, "model-ctx").inner_text() == "2,048 ctx"
    assert tid(page, "server-version").inner_text() == "KoboldCpp 1.104"
    assert tid(page, "setting-max_context_length").input_value() == str(CTX)  # clamped to the server's context
    # the page and its assets come gzip-compressed to a browser that accepts it
    with page.expect_response(lambda r: r.url.endswith("/klite/app.js")) as js:
        resp = page.reload()
    assert resp.headers.get("content-encoding") == "gzip"
    assert js.value.headers.get("content-encoding") == "gzip"
    wait_connected(page)
    page2, _ = open_page(path="/klite")
    assert tid(page2, "send").is_enabled()
    shot(page, "empty-story-desktop")


def test_story_streams_into_the_output(open_page, server):
    page, w = open_page()
    set_settings(page, max_length=24, sampler_seed=7)
    # every distinct length of the growing reply, as the browser renders it
    page.evaluate("""() => {
        window.__lens = new Set();
        new MutationObserver(() => {
            const live = document.querySelector('.seg.live');
            if (live) window.__lens.add(live.textContent.length);
        }).observe(document.getElementById('output'), {subtree: true, childList: true, characterData: true});
    }""")
    tid(page, "input").fill("Once upon a time, in a quiet village by the sea,")
    tid(page, "send").click()
    tid(page, "stop").wait_for(state="visible")
    wait_idle_page(page)
    lens = page.evaluate("[...window.__lens].filter(n => n > 0).length")
    assert lens >= 3, f"text did not stream in pieces ({lens} updates)"
    text = tid(page, "output").inner_text()
    assert text.startswith("Once upon a time, in a quiet village by the sea,")
    ai = page.locator(".seg.ai").inner_text()
    assert ai.strip(), "no generated text"
    assert "T/s" in tid(page, "perf").inner_text()
    assert tid(page, "context-use").inner_text().endswith(f"/ {CTX:,} tokens")
    assert tid(page, "error").is_hidden()
    # Continue adds to the story; Undo takes it back
    before = tid(page, "output").inner_text()
    tid(page, "continue").click()
    tid(page, "stop").wait_for(state="visible")
    wait_idle_page(page)
    assert page.locator(".seg.ai").count() == 2
    tid(page, "undo").click()
    assert tid(page, "output").inner_text() == before
    both_widths(page, "story")
    # edit the generated text in place, with a new line at its end
    ai_text = stored_session(page)["turns"][1]["text"]
    page.locator(".seg.ai").click()
    page.keyboard.press("Control+End")
    page.keyboard.type(" EDIT")
    page.keyboard.press("Enter")
    page.keyboard.type("More.")
    tid(page, "input").click()
    assert stored_session(page)["turns"][1]["text"] == ai_text + " EDIT\nMore."


def test_stop_ends_a_long_generation_within_a_second(open_page, server):
    page, w = open_page()
    set_settings(page, max_length=1500)
    tid(page, "input").fill("Chapter one. The long road north began at dawn, and")
    tid(page, "send").click()
    page.wait_for_function("(document.querySelector('.seg.live') || {textContent: ''}).textContent.length > 30")
    assert perf(server)["idle"] == 0
    t0 = time.monotonic()
    tid(page, "stop").click()
    wait_idle_page(page, timeout=5_000)
    took = time.monotonic() - t0
    assert took < 1.0, f"Stop took {took:.2f}s"
    assert tid(page, "status").inner_text() == "Stopped."
    p = perf(server)
    assert p["idle"] == 1 and p["queue"] == 0, p
    assert p["last_token_count"] < 1500
    assert page.locator(".seg.ai").inner_text().strip()
    # and the server takes the next request at once
    st, _, body = http("POST", server.url + "/api/v1/generate", {"prompt": "Hi", "max_length": 2}, timeout=10)
    assert st == 200 and "results" in body


def test_chat_keeps_turns_and_edits_in_place(open_page, server):
    page, w = open_page()
    set_settings(page, max_length=16, sampler_seed=3)
    sent = capture_generations(page)
    tid(page, "mode").select_option("chat")
    tid(page, "user-name").fill("Alice")
    tid(page, "bot-name").fill("Bob")
    box = tid(page, "input")
    box.fill("Hi Bob, how are you today?")
    box.press("Enter")
    wait_idle_page(page)
    box.type("Tell me about the sea.")
    box.press("Shift+Enter")
    box.type("Keep it short.")
    assert box.input_value() == "Tell me about the sea.\nKeep it short."  # Shift+Enter is a new line, not send
    box.press("Enter")
    tid(page, "stop").wait_for(state="visible")
    wait_idle_page(page)
    msgs = page.locator(".msg")
    assert msgs.count() == 4
    roles = [msgs.nth(i).get_attribute("class").split()[1] for i in range(4)]
    assert roles == ["user", "ai", "user", "ai"]
    assert msgs.nth(0).locator(".name").inner_text() == "Alice"
    assert msgs.nth(1).locator(".name").inner_text() == "Bob"
    assert msgs.nth(2).locator(".body").inner_text() == "Tell me about the sea.\nKeep it short."
    for i in (1, 3):
        reply = msgs.nth(i).locator(".body").inner_text()
        assert "Alice:" not in reply and "\nBob:" not in reply, reply  # names are stop sequences
    sess = stored_session(page)
    assert [t["role"] for t in sess["turns"]] == ["user", "ai", "user", "ai"]
    # the transcript goes out as "Name: text" lines ending with the bot's name, both names as stop sequences
    body = sent[1]
    first_reply = sess["turns"][1]["text"]
    assert body["prompt"] == (f"Alice: Hi Bob, how are you today?\nBob: {first_reply}\n"
                              "Alice: Tell me about the sea.\nKeep it short.\nBob:")
    assert "\nAlice:" in body["stop_sequence"] and "\nBob:" in body["stop_sequence"]
    assert body["max_length"] == 16 and body["sampler_seed"] == 3 and body["trim_stop"] is True
    assert body["genkey"].startswith("KCPP") and body["genkey"][4:].isdigit()
    # Retry regenerates only the last reply; Undo brings the old one back
    last = sess["turns"][3]["text"]
    tid(page, "retry").click()
    tid(page, "stop").wait_for(state="visible")
    wait_idle_page(page)
    assert page.locator(".msg").count() == 4
    tid(page, "undo").click()
    assert stored_session(page)["turns"][3]["text"] == last
    # edit the first reply in place
    body = msgs.nth(1).locator(".body")
    body.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("I am fine, thanks.")
    page.locator("body").click(position={"x": 5, "y": 5})
    sess = stored_session(page)
    assert sess["turns"][1]["text"] == "I am fine, thanks."
    assert len(sess["turns"]) == 4
    both_widths(page, "chat")
    tid(page, "undo").click()  # undoes the edit
    assert stored_session(page)["turns"][1]["text"] != "I am fine, thanks."


def test_instruct_mode_uses_the_server_adapter(open_page, server):
    page, w = open_page()
    set_settings(page, max_length=16, sampler_seed=11)
    sent = capture_generations(page)
    tid(page, "mode").select_option("instruct")
    tid(page, "system-prompt").fill("You are a terse assistant.")
    tid(page, "input").fill("Name three colours.")
    tid(page, "input").press("Enter")
    tid(page, "stop").wait_for(state="visible")
    wait_idle_page(page)
    msgs = page.locator(".msg")
    assert msgs.count() == 2
    reply = msgs.nth(1).locator(".body").inner_text()
    assert reply.strip()
    for leak in ("{{[", "<start_of_turn>", "<end_of_turn>"):
        assert leak not in reply
    assert tid(page, "error").is_hidden()
    # the server's adapter fills in the placeholders; the system prompt rides in memory so it is never trimmed
    assert sent[0]["memory"] == "{{[SYSTEM]}}You are a terse assistant.{{[SYSTEM_END]}}"
    assert sent[0]["prompt"] == "{{[INPUT]}}Name three colours.{{[INPUT_END]}}{{[OUTPUT]}}"
    assert "{{[INPUT]}}" in sent[0]["stop_sequence"]
    both_widths(page, "instruct")


def test_settings_survive_a_reload_and_bad_values_are_refused(open_page, server):
    page, w = open_page()
    tid(page, "settings-open").click()
    for k, v in {"temperature": "0.42", "top_k": "7", "min_p": "0.05", "rep_pen_range": "128", "sampler_seed": "1234"}.items():
        tid(page, f"setting-{k}").fill(v)
        tid(page, f"setting-{k}").dispatch_event("change")
    stops = tid(page, "setting-stop_sequence")
    stops.fill("THE END\n\\n\\n")
    stops.dispatch_event("change")
    page.get_by_role("button", name="Move Temperature up").click()
    order = [int(x) for x in page.locator("#sampler-order li").evaluate_all("els => els.map(e => e.dataset.sampler)")]
    assert order == [6, 0, 1, 3, 4, 5, 2]
    # a value out of range is refused with a message and not saved
    tid(page, "setting-top_p").fill("7")
    tid(page, "setting-top_p").dispatch_event("change")
    assert "between 0 and 1" in page.locator(".field.invalid .field-error").inner_text()
    tid(page, "memory").fill("The hero is called Ada.")
    both_widths(page, "settings")
    page.reload()
    wait_connected(page)
    tid(page, "settings-open").click()
    assert tid(page, "setting-temperature").input_value() == "0.42"
    assert tid(page, "setting-top_k").input_value() == "7"
    assert tid(page, "setting-min_p").input_value() == "0.05"
    assert tid(page, "setting-rep_pen_range").input_value() == "128"
    assert tid(page, "setting-sampler_seed").input_value() == "1234"
    assert tid(page, "setting-top_p").input_value() == "0.92"
    assert tid(page, "setting-stop_sequence").input_value() == "THE END\n\\n\\n"
    order = [int(x) for x in page.locator("#sampler-order li").evaluate_all("els => els.map(e => e.dataset.sampler)")]
    assert order == [6, 0, 1, 3, 4, 5, 2]
    assert tid(page, "memory").input_value() == "The hero is called Ada."


def test_save_then_load_restores_the_session(open_page, server, tmp_path):
    page, w = open_page()
    set_settings(page, max_length=8, temperature=0.3)
    tid(page, "settings-open").click()
    tid(page, "memory").fill("Setting: a lighthouse.")
    tid(page, "authors-note").fill("Keep a calm tone.")
    tid(page, "settings-close").click()
    sent = capture_generations(page)
    tid(page, "input").fill("The keeper climbed the stairs")
    tid(page, "send").click()
    wait_idle_page(page)
    story = tid(page, "output").inner_text()
    assert sent[0]["memory"] == "Setting: a lighthouse.\n"
    assert sent[0]["prompt"] == "[Author's note: Keep a calm tone.]\nThe keeper climbed the stairs"
    assert sent[0]["temperature"] == 0.3 and sent[0]["max_length"] == 8
    with page.expect_download() as dl:
        tid(page, "save").click()
    saved = tmp_path / "session.json"
    dl.value.save_as(saved)
    data = json.loads(saved.read_text())
    assert data["session"]["memory"] == "Setting: a lighthouse."
    assert "".join(t["text"] for t in data["session"]["turns"]) == story
    # a new session clears everything, a changed setting is overwritten by the file
    tid(page, "new-session").click()
    assert page.locator(".seg").count() == 0
    set_settings(page, temperature=1.5)
    with page.expect_file_chooser() as fc:
        tid(page, "load").click()
    fc.value.set_files(str(saved))
    page.wait_for_function("document.querySelectorAll('.seg').length === 2")
    assert tid(page, "output").inner_text() == story
    tid(page, "settings-open").click()
    assert tid(page, "memory").input_value() == "Setting: a lighthouse."
    assert tid(page, "authors-note").input_value() == "Keep a calm tone."
    assert tid(page, "setting-temperature").input_value() == "0.3"
    tid(page, "settings-close").click()
    # a file that is not a session gives a readable message and leaves the session alone
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with page.expect_file_chooser() as fc:
        tid(page, "load").click()
    fc.value.set_files(str(bad))
    tid(page, "error").wait_for(state="visible")
    assert "not a saved session" in tid(page, "error").inner_text()
    assert tid(page, "output").inner_text() == story
    # autosave: a reload keeps the session
    page.reload()
    wait_connected(page)
    assert tid(page, "output").inner_text() == story


def test_protected_server_asks_for_the_key_and_busy_is_shown(browser, open_page):
    with ServerProcess(bundled_model_path(), "--contextsize", str(CTX), "--password", "s3cret", "--multiuser", "0") as srv:
        page, w = open_page(srv=srv, connected=False)
        w.allowed_errors += ["status of 401", "status of 503"]  # the browser logs refused requests itself
        tid(page, "apikey").wait_for(state="visible")
        shot(page, "key-dialog-desktop")
        tid(page, "apikey").fill("wrong")
        tid(page, "apikey-submit").click()
        page.wait_for_function("document.querySelector('[data-testid=apikey-error]').textContent.includes('wrong')")
        tid(page, "apikey").fill("s3cret")
        tid(page, "apikey-submit").click()
        wait_connected(page)
        assert "gemma-3-270m" in tid(page, "model-name").inner_text()
        set_settings(page, max_length=6)
        tid(page, "input").fill("Hello")
        tid(page, "send").click()
        wait_idle_page(page)
        assert page.locator(".seg.ai").count() == 1  # the Bearer key went with the generation
        # someone else is generating: the page says the server is busy
        auth = {"Authorization": "Bearer s3cret"}
        other = threading.Thread(target=http, args=("POST", srv.url + "/api/v1/generate",
                                                    {"prompt": "Once", "max_length": 400, "genkey": "KCPP9999"}, auth))
        other.start()
        try:
            deadline = time.time() + 10
            while perf(srv)["idle"] == 1 and time.time() < deadline:
                time.sleep(0.05)
            tid(page, "continue").click()
            tid(page, "error").wait_for(state="visible")
            assert "busy" in tid(page, "error").inner_text().lower()
            shot(page, "busy-error-desktop")
        finally:
            http("POST", srv.url + "/api/extra/abort", {"genkey": "KCPP9999"}, auth)
            other.join(20)


def test_long_story_is_trimmed_from_the_front_keeping_memory(open_page, server, tmp_path):
    page, w = open_page()
    set_settings(page, max_context_length=256, max_length=16)
    lines = [f"Line {i}: the tide came in and went out again over the grey stones." for i in range(60)]
    f = tmp_path / "long.json"
    f.write_text(json.dumps({"format": "koboldcpp-py-session", "version": 1, "session": {
        "mode": "story", "memory": "MEMORY: the keeper is called Ada.", "turns": [{"role": "user", "text": "\n".join(lines)}]}}))
    with page.expect_file_chooser() as fc:
        tid(page, "load").click()
    fc.value.set_files(str(f))
    page.wait_for_function("document.querySelector('[data-testid=context-use]').textContent.includes('trimmed')")
    sent = capture_generations(page)
    tid(page, "continue").click()
    wait_idle_page(page)
    body = sent[0]
    assert body["memory"] == "MEMORY: the keeper is called Ada.\n"
    assert body["prompt"].endswith(lines[-1]) and body["prompt"].startswith("Line ")
    assert len(body["prompt"]) < len("\n".join(lines)) / 2
    st, _, n = http("POST", server.url + "/api/extra/tokencount", {"prompt": body["memory"] + body["prompt"]})
    assert n["value"] <= 256 - 16
    assert "trimmed" in tid(page, "context-use").inner_text()
    assert page.locator(".seg.ai").count() == 1


def test_thinking_is_shown_apart_and_collapsed(open_page, server):
    """A reasoning model's <think> block streams into a collapsed "Thoughts" box above the answer; the turn keeps
    the block, and editing the answer keeps it too. The model's output is forced by adding a grammar to the
    page's own request on its way to the real server."""
    page, w = open_page()
    forced = 'root ::= "<think>Colours are light.</think>\\n\\nRed, green, blue."'

    def add_grammar(route):
        body = route.request.post_data_json
        body.update(grammar=forced, max_length=64)
        route.continue_(post_data=json.dumps(body))

    page.route("**/api/extra/generate/stream", add_grammar)
    tid(page, "mode").select_option("instruct")
    tid(page, "input").fill("Name three colours.")
    tid(page, "input").press("Enter")
    wait_idle_page(page)
    ai = page.locator(".msg.ai")
    think = ai.locator("details.think")
    assert think.count() == 1 and think.get_attribute("open") is None  # collapsed
    assert think.locator("summary").inner_text() == "Thoughts"
    assert think.locator(".think-body").text_content() == "Colours are light."
    assert ai.locator(".body").inner_text() == "Red, green, blue."
    assert stored_session(page)["turns"][1]["text"] == "<think>Colours are light.</think>\n\nRed, green, blue."
    think.locator("summary").click()
    assert think.locator(".think-body").is_visible()
    both_widths(page, "thinking")
    body = ai.locator(".body")
    body.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("Cyan.")
    page.locator("body").click(position={"x": 5, "y": 5})
    assert stored_session(page)["turns"][1]["text"] == "<think>Colours are light.</think>\n\nCyan."
