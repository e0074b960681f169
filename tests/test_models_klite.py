"""The web page's model picker, in headless Chromium against a real server offering two models: shown only when
several models are offered, and a generation from the page runs on the picked model (the server loads it)."""
import os

import pytest

from tests.support import ServerProcess, bundled_model_path, http, smollm2_model_path
from tests.test_klite import browser, open_page, server, set_settings, tid, wait_idle_page  # noqa: F401


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("picker")
    os.symlink(bundled_model_path(), d / "gemma.gguf")
    os.symlink(smollm2_model_path(), d / "smol.gguf")
    with ServerProcess(None, "--model", str(d / "gemma.gguf"), "--modeldir", str(d), "--contextsize", "512") as s:
        yield s


def states(s):
    return {m["id"]: m["status"]["value"] for m in http("GET", s.url + "/v1/models")[2]["data"]}


def test_picker_appears_with_several_models_and_generation_uses_the_pick(open_page, two_models):
    page, _ = open_page(srv=two_models)
    pick = tid(page, "model-pick")
    assert pick.is_visible()
    assert pick.locator("option").all_inner_texts() == ["gemma", "smol"]
    assert pick.input_value() == "koboldcpp/gemma" and tid(page, "model-name").inner_text() == "gemma"
    bodies = []
    page.on("request", lambda r: r.url.endswith("/api/extra/generate/stream") and bodies.append(r.post_data_json))
    set_settings(page, max_length=8)
    pick.select_option("koboldcpp/smol")
    assert tid(page, "model-name").inner_text() == "smol"
    tid(page, "input").fill("Once upon a time")
    tid(page, "send").click()
    wait_idle_page(page, timeout=180_000)
    assert bodies and bodies[-1]["model"] == "koboldcpp/smol"
    assert states(two_models)["koboldcpp/smol"] == "loaded" and states(two_models)["koboldcpp/gemma"] == "unloaded"


def test_no_picker_with_one_model(open_page):
    page, _ = open_page()
    assert not tid(page, "model-pick").is_visible()
