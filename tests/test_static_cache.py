"""The fast path: AdaKVCache (static compacted cache) through the compiled model, against the eager oracle.

CPU, tiny random models. Inductor runs in one test (the triton_op bodies traced, CPU branch); the others
use inner="eager" (the same rewritten graph, no code generation) to stay fast. The GPU run of the same
checks (CUDA graphs, Triton kernels inlined) is bench/e2e.py --check.
"""
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from adakv_compile import AdaKVCache, AdaKVConfig, StoreError, adakv_backend, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded


def build(family="llama", seed=0, layers=2):
    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    m = (LlamaForCausalLM(LlamaConfig(**kw)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw)))
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m.eval()


def twin(model):
    """An independent copy of ``model`` (same weights) for the eager reference."""
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    other.generation_config = model.generation_config
    return other


CASES = [
    ("llama", dict(budget=24, window=4), "eager"),
    ("llama", dict(budget=32, window=8, layer_schedule="pyramid", pooling="avg", alpha=0.5), "eager"),
    ("qwen2", dict(budget=20, window=4, gqa_reduce="max", allocation="uniform"), "eager"),
    ("llama", dict(budget=24, window=4), "inductor"),
]


@pytest.mark.parametrize("family, kwargs, inner", CASES, ids=[f"{c[0]}-{i}-{c[2]}" for i, c in enumerate(CASES)])
def test_generate_equals_reference_generator(family, kwargs, inner):
    cfg = AdaKVConfig(**kwargs)
    b = kwargs["budget"]
    ids, am = left_padded([6 * b, 3 * b, b // 2], seed=b)
    model = build(family, seed=b)
    ref = ReferenceSession(twin(model), cfg, record=True)
    expect = ref.generate(ids, attention_mask=am, max_new_tokens=8)[:, -8:]
    backend = compile_model(model, cfg, inner=inner)
    cache = AdaKVCache(model, backend, batch_size=3, max_new_tokens=8)
    got = model.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False,
                         **{cache_kwarg(model): cache})[:, -8:]
    assert torch.equal(got, expect)
    assert [g["rewritten"] for g in backend.graphs] == [2, 2], backend.report.table()
    assert {r.mode for r in backend.report} == {"static-compress", "static-store"}
    # what each (layer, row, head) holds: the oracle's kept prompt positions, then the 7 appended tokens
    n = ids.shape[1]
    appended = torch.arange(n, n + 7, dtype=torch.int32)
    for layer, per_row in enumerate(ref.kept_positions()):
        held = cache.layers[layer]
        got_pos = cache.kept_positions(layer)
        for row in range(3):
            for head in range(2):
                want = per_row[row][head].to(torch.int32)
                assert torch.equal(got_pos[row][head], want), (layer, row, head)
                assert torch.equal(got_pos[row][head][-7:], appended)
        assert int(held.seen) == n + 7


def test_bare_loop_equals_generate_and_extend_after_compression():
    cfg = AdaKVConfig(budget=16, window=4)
    model = build(seed=3)
    backend = compile_model(model, cfg, inner="eager")
    kw = cache_kwarg(model)
    ids = torch.randint(1, 128, (2, 96))
    question = torch.randint(1, 128, (2, 5))
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=16)
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, **{kw: cache})[:, 96:]
    cache.reset()
    toks = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{kw: cache})
        for _ in range(6):
            tok = out.logits[:, -1:].argmax(-1)
            toks.append(tok)
            out = model(input_ids=tok, use_cache=True, **{kw: cache})
    assert torch.equal(torch.cat(toks, 1), gen)
    # a question after a compressed context: an extend chunk of 5 tokens, then decode — as the oracle does
    cache.reset()
    ref = ReferenceSession(twin(model), cfg)
    ref.prefill(ids)
    want = ref.extend(question)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: cache})
        got = model(input_ids=question, use_cache=True, **{kw: cache}).logits
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)
    assert int(cache.layers[0].seen) == 96 + 5


def test_capacity_and_misuse_are_loud():
    cfg = AdaKVConfig(budget=16, window=4)
    model = build(seed=4)
    kw = cache_kwarg(model)
    ids = torch.randint(1, 128, (1, 64))
    cache = AdaKVCache(model, cfg, batch_size=1, max_new_tokens=3)
    # uncompiled model: the cache's marker op refuses to run
    with pytest.raises(StoreError, match="adakv backend"), torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: cache})
    backend = compile_model(model, cfg, inner="eager")
    with pytest.raises(StoreError, match="max_new_tokens=3"):
        model.generate(ids, max_new_tokens=8, do_sample=False, **{kw: cache})
    with pytest.raises(StoreError, match="64 more do not fit"), torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: cache})  # a second prompt is an extend chunk: too big
    cache.reset()
    other = adakv_backend(AdaKVConfig(budget=24, window=4), inner="eager")
    model2 = build(seed=4)
    model2.forward = torch.compile(model2.forward, backend=other)
    with pytest.raises(StoreError, match="another AdaKVConfig"), torch.no_grad():
        model2(input_ids=ids, use_cache=True, **{kw: cache})
    with pytest.raises(StoreError, match="reorder"):
        cache.reorder_cache(torch.tensor([0]))
    # another backend (plain aot_eager) never reads the store as a dense cache
    model3 = build(seed=4)
    model3.forward = torch.compile(model3.forward, backend="aot_eager")
    with pytest.raises(Exception, match="adakv backend"), torch.no_grad():
        model3(input_ids=ids, use_cache=True, **{kw: AdaKVCache(model3, cfg, batch_size=1, max_new_tokens=3)})
    assert backend.graphs  # the compiled model did compile


@pytest.mark.parametrize("bad, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(config=AdaKVConfig()), "keeps every token"),
    (dict(config=AdaKVConfig(compression_ratio=0.5)), "max_prompt_len"),
])
def test_constructor_errors_name_the_parameter(bad, match):
    model = build(layers=1)
    kw = dict(config=AdaKVConfig(budget=16, window=4), batch_size=1, max_new_tokens=4)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        AdaKVCache(model, **kw)


def test_memory_is_sized_by_the_budget_not_the_prompt():
    model = build(layers=1)
    cache = AdaKVCache(model, AdaKVConfig(budget=64, window=8), batch_size=2, max_new_tokens=32)
    layer = cache.layers[0]
    # per row: 2 heads x 64 kept + 1 slot of rounding slack + 2 heads x 32 reserved
    assert layer.slots_per_row == 2 * 64 + 1 + 2 * 32
    assert layer.pool_k.shape == (2 * layer.slots_per_row + 1, 16)


def test_static_append_kernel_matches_plain_path():
    """The Triton append kernel (interpreter on CPU) writes what the plain path writes."""
    pytest.importorskip("triton")
    from adakv_compile.kernels.triton_append import static_append_triton

    g = torch.Generator().manual_seed(5)
    B, H, D, S, t = 3, 2, 16, 40, 3
    lens = torch.randint(0, 10, (B, H), generator=g, dtype=torch.int32)
    lens[1, 0] = 0  # an empty head
    off = (torch.arange(B)[:, None] * S + torch.tensor([0, 20])).to(torch.int32)
    k_new = torch.randn(B, H, t, D, generator=g)
    v_new = torch.randn(B, H, t, D, generator=g)
    state = [torch.randn(B * S + 1, D, generator=g), torch.randn(B * S + 1, D, generator=g),
             lens.clone(), torch.randint(0, 99, (B * S + 1,), generator=g, dtype=torch.int32),
             torch.tensor(57)]
    plain = [x.clone() for x in state]
    torch.ops.adakv.static_append(k_new, v_new, plain[0], plain[1], off, plain[2], plain[3], plain[4])
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter (tests/conftest.py sets it on CPU)")
    tri = [x.clone().to(dev) for x in state]
    static_append_triton(tri[0], tri[1], off.to(dev), tri[2], tri[3], tri[4], k_new.to(dev), v_new.to(dev))
    # neither advances `seen` (the backend's wrapper does, between graph calls)
    for a, b in zip(plain, tri):
        assert torch.equal(a, b.cpu())
    assert torch.equal(plain[2], lens + t)


def test_sampling_on_the_fast_path_equals_the_general_path():
    """Same algorithm, same logits: with the same RNG seed, sampling draws the same tokens on both paths."""
    cfg = AdaKVConfig(budget=20, window=4)
    ids, am = left_padded([120, 70], seed=11)
    fast, general = build(seed=11), build(seed=11)
    backend = compile_model(fast, cfg, inner="eager")
    compile_model(general, cfg, inner="eager")
    cache = AdaKVCache(fast, backend, batch_size=2, max_new_tokens=10)
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(123)
    a = fast.generate(ids, **kw, **{cache_kwarg(fast): cache})
    torch.manual_seed(123)
    b = general.generate(ids, **kw)
    assert torch.equal(a, b)


def test_attention_over_one_token_segments_with_fixed_pieces():
    """Segments of 1 token (an uncompressed 0-token head plus the new token) and long ones, fixed pieces."""
    pytest.importorskip("triton")
    from adakv_compile.kernels.attend import store_attention
    from adakv_compile.kernels.triton_attend import store_attention_triton

    g = torch.Generator().manual_seed(9)
    B, H, G, D, S = 2, 3, 2, 16, 96
    lens = torch.tensor([[1, 1, 70], [60, 1, 33]], dtype=torch.int32)
    off = torch.tensor([[0, 1, 2], [S, S + 60, S + 61]], dtype=torch.int32)  # inside each row's S slots
    pool_k = torch.randn(B * S + 1, D, generator=g)
    pool_v = torch.randn(B * S + 1, D, generator=g)
    q = torch.randn(B, H * G, 1, D, generator=g)
    ref = store_attention(q, pool_k.reshape(-1), pool_v.reshape(-1), off, lens, S, 1, D ** -0.5, 0.0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter (tests/conftest.py sets it on CPU)")
    tol = 1e-4 if dev == "cpu" else 2e-3  # fp32 dots run as tf32 on the GPU
    for piece in (16, 32):
        out = store_attention_triton(q.to(dev), pool_k.to(dev), pool_v.to(dev), off.to(dev), lens.to(dev), 1,
                                     D ** -0.5, 0.0, max_len_bound=S, split_tokens=piece, block_n=16)
        torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)
