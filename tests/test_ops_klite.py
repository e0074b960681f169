"""The web page shows a long prompt's progress (return_progress events) before the first token arrives."""
from __future__ import annotations

import pytest

from tests.support import ServerProcess, bundled_model_path
from tests.test_klite import DESKTOP, Watch, browser, set_settings, tid, wait_connected, wait_idle_page  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def slow_prompt_server():
    # small prompt chunks and no prompt reuse, so a 700-token story takes a few seconds to process
    with ServerProcess(bundled_model_path(), "--contextsize", "1024", "--batchsize", "32", "--nofastforward",
                       "--threads", "1") as s:
        yield s


def test_page_shows_prompt_progress(browser, slow_prompt_server):  # noqa: F811
    ctx = browser.new_context(viewport=DESKTOP)
    w = Watch(ctx)
    try:
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        page.goto(slow_prompt_server.url + "/")
        wait_connected(page)
        set_settings(page, max_length=8)
        page.evaluate("""() => {
            window.__status = [];
            const el = document.querySelector('[data-testid=status]');
            new MutationObserver(() => window.__status.push(el.textContent))
                .observe(el, {subtree: true, childList: true, characterData: true});
        }""")
        tid(page, "input").fill(" ".join(["The cat sat on the mat."] * 100))
        tid(page, "send").click()
        wait_idle_page(page, timeout=120_000)
        seen = page.evaluate("window.__status")
        prog = [s for s in seen if s.startswith("Processing prompt:")]
        assert prog, seen
        assert "tokens (" in prog[0] and "Generating…" in seen[seen.index(prog[-1]):]
        assert page.locator(".seg.ai").inner_text().strip()
    finally:
        ctx.close()
    w.check()
