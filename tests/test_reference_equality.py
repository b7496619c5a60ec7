"""Greedy tokens of the compiled model == the eager reference generator (same config), prompts 4-8x the
budget, a batch of 3 rows of different lengths (left padding)."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from adakv_compile import AdaKVConfig, adakv_backend
from adakv_compile.cache import cache_kwarg
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded


def build(family, seed=0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        m = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        m = Qwen2ForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=1024)
        m = GPT2LMHeadModel(cfg)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m.eval()


CASES = [
    ("llama", dict(budget=24, window=4)),
    ("llama", dict(budget=24, window=4, allocation="uniform")),
    ("llama", dict(budget=32, window=8, layer_schedule="pyramid", pooling="avg")),
    ("qwen2", dict(budget=24, window=4, alpha=0.5, gqa_reduce="max")),
    ("gpt2", dict(budget=24, window=4)),
    ("gpt2", dict(budget=20, window=4, scorer="streaming")),
]


@pytest.mark.parametrize("family, kwargs", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_compiled_equals_reference_generator(family, kwargs):
    cfg = AdaKVConfig(**kwargs)
    budget = kwargs["budget"]
    ids, am = left_padded([8 * budget, 5 * budget, budget // 2], seed=budget)
    ref_model = build(family)
    ref = ReferenceSession(ref_model, cfg).generate(ids, attention_mask=am, max_new_tokens=8)
    model = build(family)
    backend = adakv_backend(cfg, inner="eager")
    model.forward = torch.compile(model.forward, backend=backend)
    got = model.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
    assert got.tolist() == ref.tolist()
    assert {r.mode for r in backend.report} == {"compress", "store"}, backend.report.table()


def test_compiled_equals_reference_with_inductor():
    cfg = AdaKVConfig(budget=24, window=4)
    ids, am = left_padded([150, 96, 40], seed=1)
    ref = ReferenceSession(build("llama"), cfg).generate(ids, attention_mask=am, max_new_tokens=6)
    model = build("llama")
    model.forward = torch.compile(model.forward, backend=adakv_backend(cfg, inner="inductor"))
    got = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)
    assert got.tolist() == ref.tolist()


def test_question_after_compressed_context_equals_reference_extend():
    cfg = AdaKVConfig(budget=24, window=4)
    ctx, _ = left_padded([160], seed=2)
    question = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    ref_session = ReferenceSession(build("llama"), cfg)
    ref_session.prefill(ctx)
    ref_logits = ref_session.extend(question)
    model = build("llama")
    model.forward = torch.compile(model.forward, backend=adakv_backend(cfg, inner="eager"))
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ctx, use_cache=True, **{cache_kwarg(model): cache})
        logits = model(input_ids=question, use_cache=True, **{cache_kwarg(model): cache}).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, kwargs", [("llama", dict(budget=24, window=4)),
                                            ("qwen2", dict(budget=32, window=8, layer_schedule="pyramid")),
                                            ("gpt2", dict(budget=24, window=4, safeguard="kvpress"))])
def test_kept_positions_equal_the_oracle_selection(family, kwargs):
    """Indices, not just tokens: per layer, row and KV head, the store holds exactly the positions the
    oracle selects (padded batch of 3)."""
    from transformers import DynamicCache

    from adakv_compile.kernels import store

    cfg = AdaKVConfig(**kwargs)
    ids, am = left_padded([6 * cfg.budget, 4 * cfg.budget, cfg.budget // 2], seed=5)
    session = ReferenceSession(build(family), cfg, record=True)
    session.prefill(ids, attention_mask=am)
    model = build(family)
    model.forward = torch.compile(model.forward, backend=adakv_backend(cfg, inner="eager"))
    cache = DynamicCache(config=model.config)
    positions = (am.cumsum(-1) - 1).clamp(min=0)  # as generate does (GPT-2's positions are absolute)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=positions, use_cache=True,
              **{cache_kwarg(model): cache})
    for layer, rec in enumerate(session.prefill_records):
        _, _, pos = store.unpack(cache.layers[layer].keys, cache.layers[layer].values, positions=True)
        for b in range(ids.shape[0]):
            for h in range(rec["keep"].shape[1]):
                expect = rec["keep"][b, h].nonzero()[:, 0].to(torch.int32)
                assert torch.equal(pos[b][h].cpu(), expect), (layer, b, h)
