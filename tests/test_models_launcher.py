"""The launcher's Models tab: a models folder (alone, without a model file), models loaded at once, idle unload,
admin key, LoRA files with scales and the KV cache type become the same flags the command line takes, and bad
values are refused naming the field."""
import pytest

import koboldcpp
from launcher_gui import fields as F
from tests.tinymodel import tiny_model_path


def collect(tmp_path, **values):
    base = koboldcpp.parse_args([])
    shown = F.to_display(base)
    shown.update(values)
    return F.collect(base, shown, koboldcpp.cli_hooks())


def test_models_tab_values_become_flags(tmp_path):
    lora = tmp_path / "a.gguf"
    lora.write_bytes(b"x")
    ns = collect(tmp_path, model="", modeldir=str(tmp_path), maxloadedmodels="2", unloadtimeout="60",
                 adminpassword="k", lora=f"{lora}:0.5; {lora}", quantkv="1", flashattention=True)
    assert (ns.model, ns.modeldir, ns.maxloadedmodels, ns.unloadtimeout, ns.adminpassword) == \
        (None, str(tmp_path), 2, 60, "k")
    assert ns.lora == [f"{lora}:0.5", str(lora)] and ns.quantkv == 1
    assert F.to_display(ns)["lora"] == f"{lora}:0.5; {lora}"
    # the flags round-trip through a .kcpps as the command line reads it
    koboldcpp.export_config(ns, str(tmp_path / "m.kcpps"))
    back = koboldcpp.parse_args(["--config", str(tmp_path / "m.kcpps")])
    assert (back.modeldir, back.lora, back.quantkv, back.maxloadedmodels) == (str(tmp_path), ns.lora, 1, 2)


@pytest.mark.parametrize("values, dest, words", [
    ({"modeldir": "/nonexistent/dir"}, "modeldir", "not a folder"),
    ({"lora": "/nonexistent/l.gguf:1"}, "lora", "file not found"),
    ({"quantkv": "2", "flashattention": False}, "quantkv", "flash attention"),
    ({"quantkv": "7"}, "quantkv", "between 0 and 2"),
    ({"maxloadedmodels": "0"}, "maxloadedmodels", "between 1 and 64"),
])
def test_bad_values_name_the_field(tmp_path, values, dest, words):
    with pytest.raises(F.FieldError) as e:
        collect(tmp_path, model=tiny_model_path(), **values)
    assert e.value.dest == dest and words in str(e.value)
