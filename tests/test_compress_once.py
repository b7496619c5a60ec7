"""One layer's prefill compression compiled once for all layers (passes/compress_once.py, issue 17).

Against the eager oracle (kept positions, pool contents, logits), on fresh random models and prompts:
- flat schedule: every layer shares one compile, made while the backend compiles the prefill graph (under
  the key the run looks up); Inductor's prefill code calls ``compress_once`` and inlines no compression, and
  the one-layer graph writes the pools in place (no copy of a pool);
- ``skip_layers`` and the pyramid schedule: one compile per layer class (as ``layer_class`` says);
- ``backend.reconfigure``: no Dynamo retrace and no prefill-graph recompile; the one-layer graph is compiled
  once per config, and going back reuses the first;
- ``ADAKV_COMPRESS_ONCE=0`` keeps the compression inlined per layer, unset follows ``MIN_LAYERS``; a bad
  value names the variable.
"""
from __future__ import annotations

import re

import pytest
import torch

from adakv_compile import AdaKVConfig, compile_model
from adakv_compile.passes import compress_once
from tests.prompts import left_padded
from tests.test_compress_inductor import _assert_equals_oracle, _prefill, reconfigure_rounds
from tests.test_static_cache import build, twin


@pytest.fixture(autouse=True)
def _inline_compress(monkeypatch):
    """The inlined compression (the CUDA default) is what compress_once takes over; force it on the CPU."""
    monkeypatch.setenv("ADAKV_INLINE_COMPRESS", "1")
    monkeypatch.setenv("ADAKV_COMPRESS_ONCE", "1")  # these models have fewer than MIN_LAYERS layers


def _compiled(backend) -> int:
    return len(compress_once.compiled_graphs(backend._key))


def test_layers_share_one_compile_under_inductor():
    from torch._inductor.utils import run_and_get_code

    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed, layers=3)
    ids, am = left_padded([70, 45, 12], seed=seed)
    cfg = AdaKVConfig(budget=20, window=4)
    backend = compile_model(model, cfg, inner="inductor")
    (logits, cache), codes = run_and_get_code(lambda: _prefill(model, backend, ids, am))
    # compiled with the outer graph (compile_ahead), under the key the run then looks up: no second compile
    assert backend.graphs[0]["compress_once"] == 3 and backend.graphs[0]["compress_once_ahead"] == 3, seed
    assert _compiled(backend) == 1, (seed, backend.graphs)
    outer = [c for c in codes if "adakv.compress_once" in c]
    assert len(outer) == 1 and len(re.findall(r"torch\.ops\.adakv\.compress_once\.default\(", outer[0])) == 3
    body = [c for c in codes if c not in outer]
    assert body and not any(re.search(r"torch\.ops\.adakv\.\w*compress", c) for c in body), seed
    # the pools are written where they are: no kernel copies a whole pool into a buffer and back
    assert not any(re.search(r"\.copy_\(arg", c) for c in body), seed
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)


@pytest.mark.parametrize("prefill_compiler", ["eager", "regions"])
def test_other_prefill_compilers_share_the_compile(prefill_compiler):
    """The eager prefill (the graph runs as traced) and the regions mode also compress through the one-layer
    graph, compiled with the prefill graph, not at its first run."""
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed, layers=3)
    ids, am = left_padded([70, 45, 12], seed=seed)
    cfg = AdaKVConfig(budget=20, window=4, prefill_compiler=prefill_compiler)
    backend = compile_model(model, cfg, inner="aot_eager")
    logits, cache = _prefill(model, backend, ids, am)
    graph = backend.graphs[0]
    assert graph["compress_once"] == graph["compress_once_ahead"] == 3 and _compiled(backend) == 1, (seed, graph)
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)


@pytest.mark.parametrize("kwargs, classes", [
    (dict(budget=20, window=4, skip_layers=(1,)), 2),          # layers 0 and 2 share; 1 keeps its full cache
    (dict(budget=24, window=4, layer_schedule="pyramid"), 3),  # every layer its own budget
    (dict(compression_ratio=0.5, window=4, skip_layers=(0,)), 2),  # the representative is not layer 0
])
def test_one_compile_per_layer_class(kwargs, classes):
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed, layers=3)
    ids, am = left_padded([70, 45, 12], seed=seed)
    cfg = AdaKVConfig(**kwargs)
    backend = compile_model(model, cfg, inner="aot_eager")
    logits, cache = _prefill(model, backend, ids, am)
    assert _compiled(backend) == classes, (seed, kwargs)
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)


def test_reconfigure_compiles_the_one_layer_graph_per_config():
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed, layers=2)
    other = twin(model)
    ids, am = left_padded([70, 45, 12], seed=seed)
    first = AdaKVConfig(budget=20, window=4)
    second = AdaKVConfig(budget=20, window=4, pooling="avg", kernel_size=3, alpha=0.5)  # same cache sizes
    backend = compile_model(model, first, inner="aot_eager")
    kept, counts = reconfigure_rounds(model, other, backend, ids, am, (first, second, first, second),
                                      lambda: _compiled(backend))
    assert kept[first] != kept[second], seed
    assert backend.graphs_compiled == 1 and counts == [1, 2, 2, 2], counts


def test_switch_off_inlines_per_layer(monkeypatch):
    monkeypatch.setenv("ADAKV_COMPRESS_ONCE", "0")
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed, layers=2)
    ids, am = left_padded([40, 33], seed=seed)
    cfg = AdaKVConfig(budget=16, window=4)
    backend = compile_model(model, cfg, inner="aot_eager")
    logits, cache = _prefill(model, backend, ids, am)
    assert "compress_once" not in backend.graphs[0] and _compiled(backend) == 0
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)
    monkeypatch.setenv("ADAKV_COMPRESS_ONCE", "yes")
    with pytest.raises(ValueError, match="ADAKV_COMPRESS_ONCE"):
        compress_once.compress_once_on(32)


def test_unset_switch_follows_the_layer_count(monkeypatch):
    """Unset: inlined per layer below ``MIN_LAYERS`` compressing layers, compiled once from there up."""
    monkeypatch.delenv("ADAKV_COMPRESS_ONCE")
    monkeypatch.setattr(compress_once, "MIN_LAYERS", 3)
    seed = int(torch.randint(0, 1 << 16, ()))
    ids, am = left_padded([40, 33], seed=seed)
    cfg = AdaKVConfig(budget=16, window=4)
    for layers, once in ((2, 0), (3, 3)):
        model = build("llama", seed=seed, layers=layers)
        backend = compile_model(model, cfg, inner="aot_eager")
        logits, cache = _prefill(model, backend, ids, am)
        assert backend.graphs[0].get("compress_once", 0) == once, (seed, layers, backend.graphs)
        _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)


def test_layer_class():
    flat = AdaKVConfig(budget=20, window=4, skip_layers=(0, 2))
    assert compress_once.layer_class(flat, 3, 8) == compress_once.layer_class(flat, 5, 8) == (1, 1)
    assert compress_once.layer_class(flat, 2, 8) == (2, 8)
    pyramid = AdaKVConfig(budget=20, window=4, layer_schedule="pyramid")
    assert compress_once.layer_class(pyramid, 3, 8) == (3, 8)
    assert compress_once.layer_class(pyramid, 0, 1) == (0, 1)


def test_a_deleted_backend_takes_its_compiled_graphs_along():
    import gc

    model = build("llama", seed=int(torch.randint(0, 1 << 16, ())), layers=2)
    backend = compile_model(model, AdaKVConfig(budget=16, window=4), inner="aot_eager")
    key = backend._key
    assert compress_once.registered(key)
    torch._dynamo.reset()  # Dynamo's compiled frames hold the backend
    del backend, model
    gc.collect()
    assert not compress_once.registered(key)
