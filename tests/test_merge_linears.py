"""passes/merge_linears.py: q/k/v and gate/up merged into one GEMM each, exactly, with no second weight copy.

Compared against the eager model, plain ``torch.compile`` (Inductor) and the same backend with
``merge_linears=False``; fast inner compilers (aot_eager) except where Inductor itself is the point.
"""
from __future__ import annotations

import pytest
import torch

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg
from tests.zoo import build

PROMPT = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _weights_bytes(model) -> int:
    seen = {}
    for p in model.parameters():
        seen[_storage(p)] = p.untyped_storage().nbytes()
    return sum(seen.values())


def test_merged_equals_eager(family="qwen2"):  # qwen2: q/k/v with biases
    eager = build(family, num_hidden_layers=1)
    with torch.no_grad():
        ref = eager(PROMPT).logits
        ref_tokens = eager.generate(PROMPT, max_new_tokens=3, do_sample=False)
    model = build(family, num_hidden_layers=1)
    before = _weights_bytes(model)
    backend = compile_model(model, AdaKVConfig(), inner="aot_eager")
    with torch.no_grad():
        got = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    merged = backend.graphs[0]["merged_linears"]
    assert merged == [3, 2] * model.config.num_hidden_layers, merged
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)
    attn = model.model.layers[0].self_attn
    # the parameters are slices of one buffer: no second copy of the weights
    assert _storage(attn.q_proj.weight) == _storage(attn.k_proj.weight) == _storage(attn.v_proj.weight)
    assert _weights_bytes(model) == before
    # and the model without the compiler reads the same weights
    eager_again = model.forward._torchdynamo_orig_callable
    with torch.no_grad():
        torch.testing.assert_close(eager_again(PROMPT).logits, ref, rtol=1e-5, atol=1e-5)


def test_compressed_fast_path_same_tokens_as_unmerged():
    cfg = AdaKVConfig(budget=24, window=8)
    outs, graphs = [], []
    for merge in (True, False):
        model = build("llama", num_hidden_layers=1)
        backend = compile_model(model, cfg.replace(merge_linears=merge), inner="aot_eager")
        cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=6)
        with torch.no_grad():
            outs.append(model.generate(PROMPT, max_new_tokens=6, do_sample=False, **{cache_kwarg(model): cache}))
        assert all(bool(g["merged_linears"]) == merge for g in backend.graphs)
        graphs.append(backend.graphs_compiled)
    assert torch.equal(outs[0], outs[1])
    assert graphs[0] == graphs[1]  # the merge adds no recompile


def test_inductor_matches_plain_compile():
    plain = build("llama", num_hidden_layers=1)
    plain.forward = torch.compile(plain.forward)
    model = build("llama", num_hidden_layers=1)
    backend = compile_model(model, AdaKVConfig())
    with torch.no_grad():
        want, got = plain(PROMPT).logits, model(PROMPT).logits
    assert backend.graphs[0]["merged_linears"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weight_updates_in_place_seen_replaced_refused():
    model = build("llama", num_hidden_layers=1)
    compile_model(model, AdaKVConfig(), inner="aot_eager")
    other = build("llama", seed=1, num_hidden_layers=1)
    with torch.no_grad():
        model(PROMPT)
        model.load_state_dict(other.state_dict())  # copies into the merged buffers' slices
        torch.testing.assert_close(model(PROMPT).logits, other(PROMPT).logits, rtol=1e-5, atol=1e-5)
        q = model.model.layers[0].self_attn.q_proj.weight
        q.data = q.data.clone()  # a new tensor the compiled graph would not read: refused
        with pytest.raises(RuntimeError, match="merge_linears"):
            model(PROMPT)


def test_off_and_with_grad_leave_linears_alone():
    model = build("llama", num_hidden_layers=1)
    backend = compile_model(model, AdaKVConfig(merge_linears=False), inner="aot_eager")
    with torch.no_grad():
        model(PROMPT)
    assert backend.graphs[0]["merged_linears"] == []
    model = build("llama", num_hidden_layers=1).train()
    backend = compile_model(model, AdaKVConfig(), inner="aot_eager")
    model(PROMPT).logits.sum().backward()  # gradients reach every parameter: nothing was re-pointed
    assert backend.graphs[0]["merged_linears"] == []
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None


def test_config_field():
    assert AdaKVConfig().merge_linears is True
    with pytest.raises(ValueError, match="merge_linears"):
        AdaKVConfig(merge_linears=1)
