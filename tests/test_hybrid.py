"""Hybrid models on the fast path (AdaKVCache): sliding-window rings, linear-attention / conv states.

Tiny random configs, CPU. Full-attention layers are compressed and must equal the eager oracle
(``ReferenceSession``, which keeps sliding-window layers exact); sliding-window layers are exact rings;
linear-attention / conv layers keep the model's own state (compared with the general path, which leaves
them to the model). The compiled models are shared per module (module-scoped fixtures) to keep CPU time low.
"""
import pytest
import torch
import transformers as T

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.hybrid import AdaKVWindowLayer
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded

W = 8  # sliding window of the tiny models


def gemma3(seed=0, attn="sdpa"):
    torch.manual_seed(seed)
    cfg = T.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=W,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                             max_position_embeddings=512)
    cfg._attn_implementation = attn
    m = T.Gemma3ForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def twin(model):
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    other.generation_config = model.generation_config
    return other


CFG = AdaKVConfig(budget=12, window=4)


@pytest.fixture(scope="module")
def compiled():
    """One compiled tiny Gemma-3 (2 sliding + 1 global layer) and its backend, shared by the tests."""
    torch._dynamo.reset()
    model = gemma3(seed=1)
    ref = twin(model)
    backend = compile_model(model, CFG, inner="eager")
    return model, ref, backend


def test_gemma3_generate_equals_oracle_and_layers_are_right(compiled):
    model, ref_model, backend = compiled
    ids, am = left_padded([40, 27, 6], seed=5)
    n = ids.shape[1]
    ref = ReferenceSession(ref_model, CFG, record=True)
    want = ref.generate(ids, attention_mask=am, max_new_tokens=6)[:, n:]
    cache = AdaKVCache(model, backend, batch_size=3, max_new_tokens=6)
    got = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False,
                         **{cache_kwarg(model): cache})[:, n:]
    assert torch.equal(got, want)
    modes = {(r.layer, r.mode) for r in backend.report}
    assert {(0, "window-fill"), (1, "window-fill"), (2, "static-compress"),
            (0, "window-attend"), (1, "window-attend"), (2, "static-store")} <= modes, backend.report.table()
    # the global layer holds the oracle's kept positions, then the 5 appended tokens
    for row in range(3):
        for head in range(2):
            assert torch.equal(cache.kept_positions(2)[row][head],
                               ref.kept_positions()[2][row][head].to(torch.int32)), (row, head)
    # the sliding layers' rings hold the last W positions (padding excluded)
    seen = n + 5
    assert int(cache.get_seq_length()) == seen
    for layer in cache.layers[:2]:
        assert isinstance(layer, AdaKVWindowLayer)
        for row, length in enumerate([40, 27, 6]):
            held = sorted(p for p in layer.wpos[row].tolist() if p >= 0)
            assert held == [p for p in range(seen - W, seen) if p >= n - length], (row, held)
    assert len(cache.compressed_layers) == 1


def test_gemma3_extend_after_compression(compiled):
    """A question of 5 tokens after a compressed context (the chunk wraps the ring) equals the oracle's
    extend."""
    model, ref_model, backend = compiled
    kw = cache_kwarg(model)
    ids = torch.randint(1, 128, (2, 30))
    question = torch.randint(1, 128, (2, 5))
    ref = ReferenceSession(ref_model, CFG)
    ref.prefill(ids)
    want = ref.extend(question)
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=8)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: cache})
        got = model(input_ids=question, use_cache=True, **{kw: cache}).logits
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)


def _state_model(family):
    torch.manual_seed(0)
    if family == "qwen3_next":
        cfg = T.Qwen3NextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, max_position_embeddings=512)
        m = T.Qwen3NextForCausalLM(cfg)
    else:
        cfg = T.Lfm2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                           max_position_embeddings=512)
        m = T.Lfm2ForCausalLM(cfg)
    m = m.eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.mark.parametrize("family", ["lfm2"])  # qwen3_next (gated delta net) holds the same layer class:
def test_state_layers_keep_the_models_own_state(family):  # checked by hand, too slow for CI
    """Linear-attention / conv layers: transformers' own static layer; the full-attention layer compressed.
    Greedy tokens equal the general path (DynamicCache), which leaves those layers to the model too."""
    torch._dynamo.reset()
    model = _state_model(family)
    general = twin(model)
    ids = torch.randint(1, 128, (1, 40))
    compile_model(general, CFG, inner="eager")
    want = general.generate(ids, max_new_tokens=4, do_sample=False)[:, 40:]
    backend = compile_model(model, CFG, inner="eager")
    cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=4)
    got = model.generate(ids, max_new_tokens=4, do_sample=False, **{cache_kwarg(model): cache})[:, 40:]
    assert torch.equal(got, want)
    assert {r.mode for r in backend.report} == {"static-compress", "static-store"}, backend.report.table()
    assert len(cache.compressed_layers) == 1 and int(cache.compressed_layers[0].lens.max()) < 40


def test_unsupported_layer_types_and_join_are_refused():
    cfg = T.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=W,
                             layer_types=["sliding_attention", "full_attention"])
    cache = AdaKVCache(cfg, CFG, batch_size=1, max_new_tokens=4, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="hybrid"):
        cache.select_rows([0])
    cfg = T.Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             layer_types=["chunked_attention", "full_attention"], attention_chunk_size=8)
    with pytest.raises(ValueError, match="chunked_attention"):
        AdaKVCache(cfg, CFG, batch_size=1, max_new_tokens=4, device="cpu", dtype=torch.float32)
