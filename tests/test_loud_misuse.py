"""A compacted cache never reaches code that would read it as a dense one (issue 10 §4, hostile user)."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from adakv_compile import AdaKVConfig, StoreError, compile_model
from adakv_compile.cache import cache_kwarg


def tiny(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def test_uncompiled_model_refuses_a_compacted_dynamic_cache():
    model = tiny(0)
    kw = cache_kwarg(model)
    compile_model(model, AdaKVConfig(budget=16, window=4), inner="eager")
    ids = torch.randint(1, 128, (2, 80))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: cache})          # compressed by the compiled forward
        uncompiled = type(model).forward.__get__(model)
        with pytest.raises(StoreError, match="running uncompiled"):
            uncompiled(input_ids=ids[:, -1:], use_cache=True, **{kw: cache})
    # the wrapper torch.compile(model) returns runs the uncompiled forward inside .generate: loud too
    wrapped = torch.compile(tiny(0), backend="eager")
    with pytest.raises(StoreError, match="running uncompiled"):
        wrapped.generate(ids, max_new_tokens=2, do_sample=False, **{kw: cache})


def test_dense_caches_in_eager_are_untouched_by_the_guard():
    model, twin = tiny(1), tiny(1)
    kw = cache_kwarg(model)
    compile_model(twin, AdaKVConfig(budget=16, window=4), inner="eager")
    ids = torch.randint(1, 128, (1, 60))
    with torch.no_grad():
        twin(input_ids=ids, use_cache=True, **{kw: DynamicCache(config=twin.config)})  # installs the guard
        a = model.generate(ids, max_new_tokens=4, do_sample=False)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{kw: cache})
        toks = [out.logits[:, -1:].argmax(-1)]
        for _ in range(3):
            toks.append(model(input_ids=toks[-1], use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1))
    assert torch.equal(a[:, 60:], torch.cat(toks, 1))
