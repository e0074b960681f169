"""Embedding pooling comes from the model's GGUF ({arch}.pooling_type), not forced to mean: on the tiny random llama
(causal attention) a CLS-pooled vector is the first token's state, so inputs sharing their first token embed the same,
while mean- and last-pooled vectors depend on every token; one-token inputs pool the same under all three."""
import numpy as np
import pytest

from gguf_loader.engine import Engine, EngineConfig
from tests.tinymodel import write_tiny_llama


def tiny_with_pooling(path, pooling):
    import gguf
    real = gguf.GGUFWriter.add_name

    def add_name(self, name):  # one extra key in write_tiny_llama's header
        real(self, name)
        if pooling is not None:
            self.add_uint32("llama.pooling_type", pooling)
    gguf.GGUFWriter.add_name = add_name
    try:
        return str(write_tiny_llama(path))
    finally:
        gguf.GGUFWriter.add_name = real


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    inputs = [[1, 40, 41, 42], [1, 50, 51, 52], [1]]
    out = {}
    for name, pooling in (("none", None), ("mean", 1), ("cls", 2), ("last", 3)):
        e = Engine(EngineConfig(tiny_with_pooling(d / f"{name}.gguf", pooling), n_ctx=256, quiet=True))
        try:
            out[name] = [np.array(v) for v in e.embed(inputs)]
            assert e.embed_pooling == ("mean" if name == "none" else name)
        finally:
            e.close()
    return out


def test_cls_pooling_is_the_first_tokens_state(vectors):
    cls = vectors["cls"]
    assert np.allclose(cls[0], cls[1], atol=1e-5) and np.allclose(cls[0], cls[2], atol=1e-5)


def test_mean_and_last_pooling_depend_on_every_token(vectors):
    for name in ("mean", "last"):
        v = vectors[name]
        assert not np.allclose(v[0], v[1], atol=1e-3), name
        assert not np.allclose(v[0], vectors["cls"][0], atol=1e-3), name
    assert not np.allclose(vectors["mean"][0], vectors["last"][0], atol=1e-3)
    # a model naming no pooling is mean-pooled
    assert np.allclose(vectors["none"][0], vectors["mean"][0], atol=1e-5)


def test_one_token_pools_the_same_every_way(vectors):
    for name in ("mean", "last"):
        assert np.allclose(vectors[name][2], vectors["cls"][2], atol=1e-5), name
