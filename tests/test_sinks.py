"""Attention sinks (gpt-oss): a per-head logit joins the softmax as an extra column, dropped after it.

Detected by meaning, exact in exact mode, compressed with the probabilities the model computes (sink
included) on the general path (DynamicCache) and the fast path (AdaKVCache, with a sliding-window ring),
against the eager oracle. Tiny random gpt-oss (1 sliding + 1 full layer), inner="eager" to stay fast.
"""
import pytest
import torch
import torch.nn as nn
import transformers as T

from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.passes import run_passes
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded

CFG = AdaKVConfig(budget=12, window=4)


def gpt_oss():
    torch.manual_seed(0)
    cfg = T.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=512)
    cfg._attn_implementation = "eager"
    m = T.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # large sinks, so that a scorer ignoring them would choose other tokens
        for layer in m.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(scope="module")
def oracle():
    """The oracle's greedy tokens and kept positions for one left-padded batch (shared by the tests)."""
    ids, am = left_padded([30, 20], seed=3)
    ref = ReferenceSession(gpt_oss(), CFG)
    want = ref.generate(ids, attention_mask=am, max_new_tokens=5)[:, 30:]
    return ids, am, want, ref.kept_positions()


def test_exact_mode_equals_the_model_and_sinks_are_recognised():
    torch._dynamo.reset()
    model, plain = gpt_oss(), gpt_oss()
    ids, am = left_padded([30, 20], seed=3)
    backend = adakv_backend(inner="eager")
    f = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        got, want = f(input_ids=ids, attention_mask=am).logits, plain(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(got[am.bool()], want[am.bool()], rtol=1e-5, atol=1e-5)
    assert [r.pattern for r in backend.report] == ["eager+sink+repeat_kv"] * 2, backend.report.table()
    assert all(r.action == "rewritten" for r in backend.report)


def test_general_path_compresses_sink_layers_like_the_oracle(oracle):
    torch._dynamo.reset()
    ids, am, want, _ = oracle
    model = gpt_oss()
    backend = compile_model(model, CFG, inner="eager")
    got = model.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False)[:, 30:]
    assert torch.equal(got, want)
    assert {(r.layer, r.mode) for r in backend.report if r.phase == "prefill"} == {(0, "exact"), (1, "compress")}


def test_fast_path_compresses_sink_layers_like_the_oracle(oracle):
    torch._dynamo.reset()
    ids, am, want, kept = oracle
    model = gpt_oss()
    backend = compile_model(model, CFG, inner="eager")
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=5)
    got = model.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False,
                         **{cache_kwarg(model): cache})[:, 30:]
    assert torch.equal(got, want)
    assert {r.mode for r in backend.report} == {"window-fill", "static-compress", "window-attend", "static-store"}
    for row in range(2):
        for head in range(2):  # the full layer holds the oracle's selection (sink-aware scores)
            assert torch.equal(cache.kept_positions(1)[row][head], kept[1][row][head].to(torch.int32))


class _Sinky(nn.Module):
    """Hand-written sink attention; ``drop`` False keeps the sink column (then it is not attention)."""

    def __init__(self, drop=True, shift=True):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(4))
        self.drop, self.shift = drop, shift

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        s = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)], dim=-1)
        if self.shift:
            s = s - s.max(dim=-1, keepdim=True).values
        p = torch.softmax(s, dim=-1)
        p = p[..., :-1] if self.drop else p[..., 1:]
        return torch.matmul(p, v)


@pytest.mark.parametrize("drop, shift, found", [(True, True, True), (True, False, True), (False, True, False)])
def test_handwritten_sinks_rewritten_or_left_alone(drop, shift, found):
    torch._dynamo.reset()
    mod = _Sinky(drop, shift).eval()
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    seen = {}

    def backend(gm, example):
        seen["result"] = run_passes(gm, AdaKVConfig())
        return gm.forward

    with torch.no_grad():
        got = torch.compile(mod, backend=backend)(q, k, v)
        torch.testing.assert_close(got, mod(q, k, v), rtol=1e-5, atol=1e-5)
    planned = seen["result"].planned
    assert (len(planned) == 1 and planned[0].action == "rewritten") == found, [p.reason for p in planned]
