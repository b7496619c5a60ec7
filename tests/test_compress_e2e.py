"""Compression end to end through the compiled model (tiny random Llama, CPU, inner='eager').

The reference-equality tests live in test_reference_equality.py; these check the cache mechanics:
memory, recompiles, deepcopy, bare loops, batch independence, and the registered backend name.
"""
import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from adakv_compile import AdaKVConfig, StoreError, adakv_backend
from adakv_compile.cache import cache_kwarg
from adakv_compile.kernels import store

KW = cache_kwarg(LlamaForCausalLM)  # `cache` on current transformers, `past_key_values` before 5.24


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def compiled(model, config, inner="eager"):
    backend = adakv_backend(config, inner=inner)
    model.forward = torch.compile(model.forward, backend=backend)
    return backend


def test_memory_after_prefill_is_what_is_kept():
    model = tiny_llama()
    cfg = AdaKVConfig(budget=24, window=8, decode_reserve=16)
    compiled(model, cfg)
    ids = torch.randint(1, 128, (2, 160))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **{KW: cache}, use_cache=True)
    D, es = 16, 4
    for layer in cache.layers:
        kept = sum(len(x) for row in store.unpack(layer.keys) for x in row)
        # rows x kv heads x budget, up to the official safeguard's rounding (half a token per head)
        assert abs(kept - 2 * 2 * 24) <= 2 * 1
        kept_bytes = kept * D * 2 * es
        hs = store.header_slots(2, 2, D, torch.float32)
        per_row_head_overhead = (16 + hs) * D * 2 * es  # reserve slots + header, per (row, head) at most
        held = store.store_bytes(layer.keys) + store.store_bytes(layer.values)
        assert held <= 1.10 * kept_bytes + 2 * 2 * per_row_head_overhead
        assert layer.keys.shape[2] == 160  # logical length
    full = 2 * 2 * 160 * D * 2 * es
    assert held < full / 3  # 24 kept + 16 reserve of 160


def test_decode_loop_of_64_steps_compiles_nothing_new_after_warmup():
    model = tiny_llama()
    backend = compiled(model, AdaKVConfig(budget=16, window=4, decode_reserve=8))
    ids = torch.randint(1, 128, (1, 64))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, **{KW: cache}, use_cache=True)
        kept = sum(len(x) for x in store.unpack(cache.layers[0].keys)[0])
        tok = out.logits[:, -1:].argmax(-1)
        for step in range(70):
            if step == 6:
                warm = backend.graphs_compiled
            out = model(input_ids=tok, **{KW: cache}, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
    assert backend.graphs_compiled == warm, backend.report.table()
    assert cache.get_seq_length() == 64 + 70
    lens = [len(x) for x in store.unpack(cache.layers[0].keys)[0]]
    assert sum(lens) == kept + 2 * 70  # grew several times (reserve 8) without losing tokens
    assert abs(kept - 2 * 16) <= 1  # official rounding: at most half a token per head


def test_bare_loop_matches_generate_and_positions_are_logical():
    model = tiny_llama(seed=1)
    compiled(model, AdaKVConfig(budget=20, window=4))
    ids = torch.randint(1, 128, (1, 90))
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)[:, 90:]
    cache = DynamicCache(config=model.config)
    toks = []
    with torch.no_grad():
        out = model(input_ids=ids, **{KW: cache}, use_cache=True)
        for _ in range(8):
            tok = out.logits[:, -1:].argmax(-1)
            toks.append(tok)
            out = model(input_ids=tok, **{KW: cache}, use_cache=True)  # no cache_position given
    assert torch.cat(toks, 1).tolist() == gen.tolist()


def test_deepcopy_of_a_compressed_cache_serves_two_questions():
    model = tiny_llama(seed=2)
    compiled(model, AdaKVConfig(budget=20, window=4))
    ctx = torch.randint(1, 128, (1, 80))
    questions = [torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 7))]

    def answer(cache, q):
        return model.generate(torch.cat([ctx, q], 1), **{KW: cache}, max_new_tokens=6,
                              do_sample=False)[:, 80 + q.shape[1]:]

    def compressed():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ctx, **{KW: cache}, use_cache=True)
        return cache

    base = compressed()
    copies = [copy.deepcopy(base) for _ in questions]
    via_copies = [answer(c, q) for c, q in zip(copies, questions)]
    via_fresh = [answer(compressed(), q) for q in questions]
    assert [t.tolist() for t in via_copies] == [t.tolist() for t in via_fresh]
    assert base.get_seq_length() == 80  # the original was not touched


def test_rows_of_a_padded_batch_are_independent():
    model = tiny_llama(seed=3)
    compiled(model, AdaKVConfig(budget=16, window=4))
    lengths = [70, 45, 12]
    rows = [torch.randint(1, 128, (1, n)) for n in lengths]
    n = max(lengths)
    ids = torch.zeros(3, n, dtype=torch.long)
    am = torch.zeros(3, n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - r.shape[1]:] = r
        am[i, n - r.shape[1]:] = 1
    batch = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)[:, n:]
    for i, r in enumerate(rows):
        alone = model.generate(r, max_new_tokens=6, do_sample=False)[:, r.shape[1]:]
        assert batch[i].tolist() == alone[0].tolist(), f"row {i}"


def test_sampling_runs_and_respects_the_seed():
    model = tiny_llama(seed=4)
    compiled(model, AdaKVConfig(budget=16, window=4))
    ids = torch.randint(1, 128, (2, 50))
    torch.manual_seed(7)
    a = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
    torch.manual_seed(7)
    b = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
    assert a.tolist() == b.tolist() and a.shape == (2, 56)


def test_reorder_of_a_compressed_cache_is_refused_clearly():
    model = tiny_llama(seed=5)
    compiled(model, AdaKVConfig(budget=16, window=4))
    ids = torch.randint(1, 128, (2, 50))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **{KW: cache}, use_cache=True)
        cache.reorder_cache(torch.tensor([1, 0]))
        with pytest.raises(Exception, match="compacted cache|adakv"):
            model(input_ids=ids[:, :1], **{KW: cache}, use_cache=True)


def test_registered_backend_name():
    model = tiny_llama(seed=6)
    ids = torch.randint(1, 128, (1, 12))
    ref = model(ids).logits
    fn = torch.compile(model.forward, backend="adakv")
    torch.testing.assert_close(fn(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_with_gradients_on_the_cache_is_kept_full_and_says_why():
    model = tiny_llama(seed=7)
    backend = compiled(model, AdaKVConfig(budget=16, window=4))
    ids = torch.randint(1, 128, (1, 40))
    out = model(input_ids=ids, use_cache=True)
    out.logits.sum().backward()
    assert all(r.mode == "exact" and "no_grad" in r.reason for r in backend.report)
    assert not store.is_store_view(getattr(out, KW).layers[0].keys)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dynamic_true_compresses_like_the_default(inner, attn):
    """torch.compile(dynamic=True) lifts float attributes (the attention scale) into SymFloat inputs."""
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(8))
    cfg = AdaKVConfig(budget=16, window=4)
    runs = []
    for dynamic in (None, True):
        torch._dynamo.reset()
        model = tiny_llama(seed=8)
        model.set_attn_implementation(attn)
        backend = adakv_backend(cfg, inner=inner)
        model.forward = torch.compile(model.forward, backend=backend, dynamic=dynamic)
        runs.append(model.generate(ids, max_new_tokens=5, do_sample=False))
        assert {r.mode for r in backend.report} == {"compress", "store"}, backend.report.table()
    assert runs[0].tolist() == runs[1].tolist()


def test_compile_model_shortcut():
    from adakv_compile import compile_model

    model = tiny_llama(seed=9)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(9))
    backend = compile_model(model, AdaKVConfig(budget=16, window=4), inner="eager")
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert {r.mode for r in backend.report} == {"compress", "store"}
    with pytest.raises(TypeError, match="nn.Module"):
        compile_model(lambda x: x)
