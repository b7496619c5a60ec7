"""``prefill_compiler="untraced"`` (untraced.py, issue 17): the prompt runs through the model's eager forward,
its SDPA calls intercepted to compress each layer; only the decode step is traced and compiled.

Against the eager oracle (tokens, kept positions, pool contents), on fresh random models and left-padded
prompts: no prefill graph is compiled; the compression runs its eager body by default, and the one-layer graph
compiled once for all layers under ``ADAKV_UNTRACED_COMPILED_COMPRESS=1``. A model whose attention is not an
SDPA call falls back to the traced prefill (logged, still equal to the oracle); an error inside the eager
prefill leaves no half-filled cache; ``reconfigure`` applies to the next untraced prefill; serving loops and
many prompt lengths compile one graph; hybrid caches take the traced prefill; grad-enabled calls are refused;
the mask and K/V checks refuse what they do not recognise.
"""
from __future__ import annotations

import logging

import pytest
import torch

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import RequestError
from adakv_compile.cache import cache_kwarg
from adakv_compile import untraced
from adakv_compile.passes import compress_once
from adakv_compile.reference import ReferenceSession
from adakv_compile.untraced import _padding_causal, _repeats
from tests.prompts import left_padded
from tests.test_compress_inductor import _assert_equals_oracle, _prefill, reconfigure_rounds
from tests.test_static_cache import build, twin

CASES = [  # (family, config, inner compiler, ADAKV_UNTRACED_COMPILED_COMPRESS)
    ("llama", dict(budget=24, window=4), "aot_eager", "1"),
    ("qwen2", dict(budget=20, window=4, gqa_reduce="max", allocation="uniform"), "eager", ""),
    ("llama", dict(budget=32, window=8, layer_schedule="pyramid", pooling="avg", alpha=0.5), "inductor", "1"),
    ("llama", dict(budget=24, window=4, head_floor=0), "inductor", ""),
]


def _setup(lengths, layers=3, **fields):
    """A fresh random tiny Llama, a left-padded batch of prompts of ``lengths`` and an untraced config (budget
    20, window 4 unless ``fields`` say otherwise): (seed, model, ids, attention mask, config)."""
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed, layers=layers)
    ids, am = left_padded(lengths, seed=seed)
    return seed, model, ids, am, AdaKVConfig(**{"budget": 20, "window": 4, "prefill_compiler": "untraced", **fields})


def _generate(model, backend, ids, am, new=6):
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=new)
    out = model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False,
                         **{cache_kwarg(model): cache})[:, -new:]
    return out, cache


@pytest.mark.parametrize("family, kwargs, inner, compiled", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'compiled' if c[3] else 'eager'}-compress" for c in CASES])
def test_generate_equals_the_oracle_with_only_the_decode_graph(family, kwargs, inner, compiled, monkeypatch):
    monkeypatch.setenv("ADAKV_UNTRACED_COMPILED_COMPRESS", compiled)
    seed = int(torch.randint(0, 1 << 16, ()))
    cfg = AdaKVConfig(prefill_compiler="untraced", **kwargs)
    b = kwargs["budget"]
    ids, am = left_padded([5 * b, 3 * b, b // 2], seed=seed)
    model = build(family, seed=seed, layers=3)
    ref = ReferenceSession(twin(model), cfg, record=True)
    expect = ref.generate(ids, attention_mask=am, max_new_tokens=6)[:, -6:]
    backend = compile_model(model, cfg, inner=inner)
    got, cache = _generate(model, backend, ids, am)
    assert torch.equal(got, expect), seed
    assert not backend._untraced_off, backend._untraced_off
    # one graph, the decode step's: Dynamo never traced the prefill
    assert [g["rewritten"] for g in backend.graphs] == [3], backend.graphs
    assert {(r.graph == -1, r.mode) for r in backend.report} == {(True, "untraced"), (False, "static-store")}
    assert sorted(r.layer for r in backend.report if r.mode == "untraced") == [0, 1, 2]
    n = ids.shape[1]
    appended = torch.arange(n, n + 5, dtype=torch.int32)
    for layer, per_row in enumerate(ref.kept_positions()):
        got_pos = cache.kept_positions(layer)
        for row, heads in enumerate(per_row):
            for head, want in enumerate(heads):
                assert torch.equal(got_pos[row][head], want.to(torch.int32)), (seed, layer, row, head)
                assert torch.equal(got_pos[row][head][-5:], appended), seed
        assert int(cache.layers[layer].seen) == n + 5
    # compiled compression: the flat schedule's layers share one compile, pyramid's have one each; eager: none
    classes = 0 if not compiled else 3 if kwargs.get("layer_schedule") == "pyramid" else 1
    assert len(compress_once.compiled_graphs(backend._key)) == classes


def test_prefill_equals_the_oracle():
    seed, model, ids, am, cfg = _setup([70, 45, 12])
    backend = compile_model(model, cfg, inner="aot_eager")
    logits, cache = _prefill(model, backend, ids, am)
    assert backend.graphs == [] and not backend._untraced_off, seed
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)


def test_attention_that_is_not_sdpa_falls_back_to_the_traced_prefill(caplog, monkeypatch):
    """Eager (matmul-softmax) attention: the interception sees a layer's update without its SDPA call and
    hands the prefill to the traced path, which rewrites that attention; the result is the oracle's."""
    _, model, ids, am, cfg = _setup([60, 60], layers=2)  # no padding: eager and SDPA differ on masked rows
    model.config._attn_implementation = "eager"
    backend = compile_model(model, cfg, inner="aot_eager")
    with caplog.at_level(logging.WARNING, logger="adakv_compile"):
        logits, cache = _prefill(model, backend, ids, am)
    # caught at layer 0's logits product, before its scores exist
    assert "layer 0's attention over its cache is computed with matmul" in backend._untraced_off, \
        backend._untraced_off
    assert any("untraced" in r.getMessage() for r in caplog.records)
    assert [g["rewritten"] for g in backend.graphs] == [2], backend.graphs  # the traced prefill
    other = twin(model)
    other.config._attn_implementation = "eager"
    _assert_equals_oracle(other, cfg, ids, am, logits, cache)
    # later prefills of this backend go the traced way directly (no second eager attempt)
    cache2 = AdaKVCache(model, backend, batch_size=2, max_new_tokens=4, max_prompt_len=ids.shape[1])
    calls = []
    monkeypatch.setattr(untraced.UntracedPrefill, "__enter__", lambda self: calls.append(self))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, use_cache=True, **{cache_kwarg(model): cache2})
    assert not calls and cache2.holds_prompt()


def test_an_error_inside_the_eager_prefill_leaves_no_half_filled_cache():
    _, model, ids, am, cfg = _setup([50, 31])
    backend = compile_model(model, cfg, inner="aot_eager")
    mlp = model.model.layers[2].mlp
    original = mlp.forward

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    mlp.forward = broken
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=4, max_prompt_len=ids.shape[1])
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated"):
        model(input_ids=ids, attention_mask=am, use_cache=True, **{cache_kwarg(model): cache})
    assert not cache.holds_prompt() and not any(layer.compressed for layer in cache.layers)
    assert int(cache.layers[0].seen) == 0 and int(cache.layers[0].lens.sum()) == 0
    mlp.forward = original
    position_ids = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    with torch.no_grad():  # the same cache serves the next request as if the failed one never happened
        logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids, use_cache=True,
                       **{cache_kwarg(model): cache}).logits
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)
    assert not backend._untraced_off and backend.graphs == []


def test_reconfigure_applies_to_the_next_untraced_prefill():
    _, model, ids, am, first = _setup([64, 40], layers=2, budget=24)
    second = first.replace(budget=16, allocation="uniform")
    backend = compile_model(model, first, inner="aot_eager")
    kept, graphs = reconfigure_rounds(model, twin(model), backend, ids, am, (first, second),
                                      lambda: len(backend.graphs))
    sizes = {c: [len(pos) for layer in k for row in layer for pos in row] for c, k in kept.items()}
    assert sizes[first] != sizes[second] and graphs == [0, 0]


@pytest.mark.parametrize("rows", [3, 2048])  # checked in blocks of query rows
def test_padding_causal_mask_check(rows, monkeypatch):
    monkeypatch.setattr(untraced, "_ROWS", rows)
    n = int(torch.randint(5, 12, ()))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, : int(torch.randint(1, n - 1, ()))] = False
    boolean = (causal & pad[:, None, :])[:, None]
    assert _padding_causal(boolean)
    additive = torch.zeros(2, 1, n, n).masked_fill(~boolean, torch.finfo(torch.float32).min)
    assert _padding_causal(additive) and _padding_causal(additive.to(torch.bfloat16))
    biased = additive + torch.randn(2, 1, n, n).abs().neg() * boolean  # ALiBi-like terms where attended
    assert not _padding_causal(biased)
    assert not _padding_causal(torch.ones(2, 1, n, n, dtype=torch.bool))  # bidirectional
    window = (causal & ~torch.ones(n, n, dtype=torch.bool).tril(-3))[None, None]  # sliding window of 3
    assert not _padding_causal(window) and not _padding_causal(window & boolean)
    padded_rows = boolean.clone()
    padded_rows[1, 0, ~pad[1]] = True  # what a padding query attends is not read
    assert _padding_causal(padded_rows)
    assert not _padding_causal(boolean.expand(2, 3, n, n))  # per-head masks are not a padding mask


def test_repeats_checks_values_not_only_shapes():
    k = torch.randn(2, 3, 7, 4)
    rep = k[:, :, None].expand(2, 3, 2, 7, 4).reshape(2, 6, 7, 4)
    assert _repeats(rep, k)
    other = rep.clone()
    other[1, 5, 3, 0] += 1.0
    assert not _repeats(other, k)
    assert not _repeats(k.repeat(1, 2, 1, 1), k)  # tiled, not repeated per group
    assert not _repeats(rep[:, :, :6], k)


@pytest.mark.parametrize("prefill_compiler", ["untraced", "inductor"])
def test_a_call_with_grad_enabled_is_refused_naming_the_fix(prefill_compiler):
    """Both prefills refuse it in plain Python (the traced one used to fail inside the backend compile)."""
    _, model, ids, am, cfg = _setup([40, 23], layers=2, prefill_compiler=prefill_compiler)
    backend = compile_model(model, cfg, inner="aot_eager")
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=4)
    with pytest.raises(RequestError, match="torch.no_grad"):
        model(input_ids=ids, attention_mask=am, use_cache=True, **{cache_kwarg(model): cache})
    assert backend.graphs == [] and not cache.holds_prompt()
    logits, cache = _prefill(model, backend, ids, am)  # then the same backend serves a proper call
    _assert_equals_oracle(twin(model), backend.config, ids, am, logits, cache)


def test_serving_loop_compiles_only_the_decode_graph():
    """Server (fixed slots, prompts of every length): the prefill is never traced, so the loop has one
    compiled graph; each request decodes as it does alone, greedy ones as the eager oracle."""
    from adakv_compile.serve import Server
    from tests.test_serving import requests

    seed = int(torch.randint(0, 1 << 16, ()))
    model = build(seed=seed)
    cfg = AdaKVConfig(budget=24, window=4, prefill_compiler="untraced")
    backend = compile_model(model, cfg, inner="eager")
    server = Server(model, backend, max_batch=3, max_new_tokens=8, eos_token_id=None)
    reqs = requests(7, seed, lo=30, hi=150, max_new=(2, 8))
    server.run(reqs)
    assert all(r.done for r in reqs) and backend.graphs_compiled == 1, backend.graphs
    assert not backend._untraced_off
    ref = ReferenceSession(twin(model), cfg)
    for r in reqs:
        assert server.generate_alone(r).tokens == r.tokens, f"seed={seed} request {r.id}"
        if r.temperature == 0:
            want = ref.generate(r.prompt[None], max_new_tokens=len(r.tokens))[0, r.prompt.numel():].tolist()
            assert r.tokens == want, f"seed={seed} request {r.id}"


def test_prompts_of_many_lengths_never_recompile():
    """One cache reset between prompts of eleven lengths: no prefill graph at all, one decode graph."""
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed, layers=2)
    cfg = AdaKVConfig(budget=20, window=4, prefill_compiler="untraced")
    backend = compile_model(model, cfg, inner="eager")
    ref = ReferenceSession(twin(model), cfg)
    cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=3)
    g = torch.Generator().manual_seed(seed)
    for n in torch.randint(2, 200, (11,), generator=g).tolist():
        ids = torch.randint(1, 128, (1, n), generator=g)
        cache.reset()
        got = model.generate(ids, max_new_tokens=3, do_sample=False, **{cache_kwarg(model): cache})[:, n:]
        assert torch.equal(got, ref.generate(ids, max_new_tokens=3)[:, n:]), (seed, n)
    assert backend.graphs_compiled == 1, backend.graphs


def test_a_hybrid_cache_takes_the_traced_prefill(caplog):
    """Sliding-window layers (Gemma-3) are not intercepted: the prefill is traced as without the option
    (logged), and generate equals the oracle."""
    from tests.test_hybrid import CFG, gemma3
    from tests.test_hybrid import twin as hybrid_twin

    seed = int(torch.randint(0, 1 << 16, ()))
    model = gemma3(seed=seed)
    cfg = CFG.replace(prefill_compiler="untraced")
    ids, am = left_padded([40, 27, 6], seed=seed)
    n = ids.shape[1]
    want = ReferenceSession(hybrid_twin(model), cfg).generate(ids, attention_mask=am, max_new_tokens=4)[:, n:]
    backend = compile_model(model, cfg, inner="eager")
    cache = AdaKVCache(model, backend, batch_size=3, max_new_tokens=4)
    with caplog.at_level(logging.INFO, logger="adakv_compile"):
        got = model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False,
                             **{cache_kwarg(model): cache})[:, n:]
    assert torch.equal(got, want), seed
    assert any("sliding-window or state layers" in r.getMessage() for r in caplog.records)
    assert {"window-fill", "static-compress"} <= {r.mode for r in backend.report}


def test_untraced_without_compile_model_says_so(caplog):
    """``torch.compile(model.forward, backend=...)`` has no wrapper to run the prefill eagerly: the prefill is
    traced (still equal to the oracle), with one warning naming compile_model."""
    from adakv_compile import adakv_backend

    _, model, ids, am, cfg = _setup([50, 29], layers=2)
    backend = adakv_backend(cfg, inner="aot_eager")
    model.forward = torch.compile(model.forward, backend=backend)
    with caplog.at_level(logging.WARNING, logger="adakv_compile"):
        logits, cache = _prefill(model, backend, ids, am)
    assert [g["rewritten"] for g in backend.graphs] == [2]
    assert sum("compile_model" in r.getMessage() for r in caplog.records) == 1
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)
