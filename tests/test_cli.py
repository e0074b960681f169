"""The command line: version/help, bad flags, config round trip, broken model files, port in use."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.support import KOBOLDCPP, ROOT, ServerProcess, free_port, http
from tests.tinymodel import tiny_model_path, write_broken_models


def run(*args, timeout=60):
    env = dict(os.environ)
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    p = subprocess.run([sys.executable, str(KOBOLDCPP), *args], cwd=str(ROOT), capture_output=True, text=True,
                       timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def test_version():
    rc, out, err = run("--version")
    assert rc == 0 and "koboldcpp.py" in out and "1.104" in out and err == ""


def test_help():
    rc, out, _ = run("--help")
    assert rc == 0
    for flag in ("--model", "--port", "--contextsize", "--password", "--multiuser", "--exportconfig", "--config"):
        assert flag in out


@pytest.mark.parametrize("args", [("--bogus",), ("--contextsize", "abc"), ("--port", "70000"),
                                  ("--threads", "-5"), ("--showgui", "--skiplauncher"),
                                  ("--config", "/nonexistent/x.kcpps")])
def test_bad_flags_one_line_exit_2(args):
    rc, out, err = run(*args)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("koboldcpp.py: error:"), err
    assert "Traceback" not in out + err


def test_exportconfig_then_config_round_trip(tmp_path):
    model = tiny_model_path(n_ctx=4096)
    cfg = tmp_path / "my.kcpps"
    rc, out, err = run("--exportconfig", str(cfg), "--model", model, "--contextsize", "1024", "--defaultgenamt", "77",
                       "--port", "1")
    assert rc == 0, err
    data = json.loads(cfg.read_text())
    assert data["model"] == model and data["contextsize"] == 1024 and data["defaultgenamt"] == 77
    # the model and gen amount come from the file; the command line wins for context size and port
    with ServerProcess(None, "--config", str(cfg), "--contextsize", "2048") as srv:
        assert http("GET", srv.url + "/api/v1/config/max_context_length")[2] == {"value": 2048}
        assert http("GET", srv.url + "/api/v1/config/max_length")[2] == {"value": 77}
        assert http("GET", srv.url + "/api/v1/model")[2]["result"] == "koboldcpp/" + os.path.basename(model)[:-5]


def test_broken_config_file(tmp_path):
    bad = tmp_path / "bad.kcpps"
    bad.write_text("{not json")
    rc, _, err = run("--config", str(bad))
    assert rc == 2 and "bad.kcpps" in err and len(err.strip().splitlines()) == 1
    bad.write_text(json.dumps({"contextsize": "huge"}))
    rc, _, err = run("--config", str(bad))
    assert rc == 2 and "contextsize" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_broken_models(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "not_gguf", "html_page", "bad_version",
                                  "truncated_header", "truncated_metadata", "truncated_tensor_data",
                                  "bad_tensor_type"])
def test_broken_model_file_one_clear_line(broken, case):
    path = str(broken[case])
    rc, out, err = run("--model", path, "--skiplauncher", "--port", str(free_port()))
    assert rc != 0
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and os.path.basename(path) in lines[0], err


def test_port_in_use_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc, out, err = run("--model", tiny_model_path(), "--skiplauncher", "--port", str(port))
    assert rc == 1 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "in use" in lines[0]


def test_missing_preloadstory_one_line(tmp_path):
    rc, out, err = run("--model", tiny_model_path(), "--skiplauncher", "--port", str(free_port()),
                       "--preloadstory", str(tmp_path / "nope.json"))
    assert rc == 1 and "nope.json" in err and len(err.strip().splitlines()) == 1


def test_sigterm_shuts_down_cleanly():
    srv = ServerProcess(tiny_model_path())
    srv.proc.terminate()
    assert srv.proc.wait(10) == 0
    log = srv.log()
    srv.stop()
    assert "Shutting down" in log and "Traceback" not in log


def test_koboldcpp_style_config_with_model_list(tmp_path):
    import koboldcpp
    cfg = tmp_path / "k.kcpps"
    cfg.write_text(json.dumps({"model": [], "model_param": "/models/x.gguf", "contextsize": 4096,
                               "usecuda": None, "unknownflag": 3}))
    args = koboldcpp.parse_args(["--config", str(cfg)])
    assert args.model == "/models/x.gguf" and args.contextsize == 4096
    cfg.write_text(json.dumps({"model": ["/models/a.gguf", "/models/b.gguf"]}))
    assert koboldcpp.parse_args(["--config", str(cfg)]).model == "/models/a.gguf"
