"""ALiBi layers compressed: the model's own bias gathered at the kept positions (issue 18).

The kernels against the oracle's loops (scores with the bias's window rows; decode attention over kept
tokens with ``bias[b, h, i, pos]``, both stores), then tiny random bloom / mpt / falcon(alibi) compressed
on the general path against ``reference.InlineReferenceSession`` (the uncompiled model, its softmax
logits restricted to the oracle's kept tokens): same greedy tokens, same kept positions, a left-padded
batch. Weights at initializer_range 0.3 so that compression changes the tokens (the oracle then
discriminates). The fast path (AdaKVCache) leaves these layers alone with the reason (plan.BIAS_REASON).
"""
import pytest
import torch
import transformers as T

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile import reference as ref
from adakv_compile.cache import cache_kwarg
from adakv_compile.kernels import ops
from adakv_compile.kernels import store as kv_store
from adakv_compile.kernels.score import window_scores
from adakv_compile.kernels.static import fill_static, static_append, static_attend
from adakv_compile.passes.plan import BIAS_REASON
from tests.prompts import assert_same_kept, left_padded, scoring_inputs

CFG = AdaKVConfig(budget=8, window=2)


def build(family):
    torch.manual_seed(0)
    r = 0.3
    if family == "bloom":
        m = T.BloomForCausalLM(T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, initializer_range=r))
    elif family == "mpt":
        m = T.MptForCausalLM(T.MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=128,
                                         initializer_range=r))
    else:
        m = T.FalconForCausalLM(T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, alibi=True, new_decoder_architecture=False,
                                               multi_query=False, initializer_range=r))
    m = m.eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def _bias(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


@pytest.mark.parametrize("bias_shape", [(2, 4, 20, 20), (4, 1, 20), (1, 4, 1, 20)])
def test_scores_add_the_bias_window_rows_like_the_oracle(bias_shape):
    q, k, valid = scoring_inputs(0, 2, 4, 2, 20, 8, pad=[0, 5])
    bias = _bias(bias_shape, 1)
    cfg = AdaKVConfig(budget=8, window=3)
    got = window_scores(q, k, valid, cfg, 0.3, None, None, bias)
    want = ref.window_scores(q, k, valid, cfg, 0.3, None, None, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, window_scores(q, k, valid, cfg, 0.3))  # the bias matters
    # the oracle from the model's logits (bias included) gives the same scores
    full = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3 + bias.reshape(
        (1,) * (4 - len(bias_shape)) + bias_shape)
    logits = full.expand(2, 4, 20, 20)[:, :, 17:]
    torch.testing.assert_close(ref.window_scores(q, k, valid, cfg, 1.0, logits=logits), want, rtol=1e-5, atol=1e-6)


def _kept(B, H, n, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, n, generator=g) < 0.5
    keep[..., -2:] = True
    return keep


@pytest.mark.parametrize("t", [1, 3])
def test_decode_attention_gathers_the_bias_at_kept_positions(t):
    """Both stores (general: ``adakv::attend_append``; static: ``static_append`` + ``static_attend``) against
    ``reference.biased_decode_attention`` over the same kept tokens."""
    B, Hq, Hkv, n, D = 2, 4, 2, 12, 8
    g = torch.Generator().manual_seed(t)
    k, v = torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    kn, vn = torch.randn(B, Hkv, t, D, generator=g), torch.randn(B, Hkv, t, D, generator=g)
    q = torch.randn(B, Hq, t, D, generator=g)
    keep = _kept(B, Hkv, n, t)
    bias = _bias((B, Hq, t if t > 1 else 1, n + t), t)
    want = torch.stack([ref.biased_decode_attention(
        q[b], [torch.cat([k[b, h][keep[b, h]], kn[b, h]]) for h in range(Hkv)],
        [torch.cat([v[b, h][keep[b, h]], vn[b, h]]) for h in range(Hkv)],
        [torch.cat([torch.nonzero(keep[b, h])[:, 0], torch.arange(n, n + t)]) for h in range(Hkv)],
        bias[b], 0.35) for b in range(B)])

    vk, vv = kv_store.build(k, v, keep, reserve=4)
    got = ops.attend_append(q, kn, vn, vk, vv, 0.35, 0.0, None, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ops.attend_append(q, kn, vn, *kv_store.build(k, v, keep, 4), 0.35, 0.0))

    slots = 2 * n + 8
    pool_k, pool_v = torch.zeros(B * slots + 1, D), torch.zeros(B * slots + 1, D)
    off, lens = torch.zeros(B, Hkv, dtype=torch.int32), torch.zeros(B, Hkv, dtype=torch.int32)
    pos, seen = torch.zeros(B * slots + 1, dtype=torch.int32), torch.tensor(n)
    fill_static(k, v, keep, t, pool_k, pool_v, off, lens, pos)
    static_append(kn, vn, pool_k, pool_v, off, lens, pos, seen)
    got = static_attend(q, pool_k, pool_v, off, lens, 0.35, 0.0, n + t, None, bias, pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_bias_shorter_than_the_cache_is_refused():
    k = torch.randn(1, 2, 6, 8)
    vk, vv = kv_store.build(k, k, torch.ones(1, 2, 6, dtype=torch.bool), reserve=2)
    with pytest.raises(kv_store.StoreError, match="bias covers 6 key positions but the cache has seen 7"):
        ops.attend_append(torch.randn(1, 2, 1, 8), k[:, :, :1], k[:, :, :1], vk, vv, 0.3, 0.0, None,
                          torch.zeros(1, 2, 1, 6))


def _greedy(model, ids, am, steps):
    """Greedy decoding by hand (mpt's generate on transformers 5.24 feeds the whole sequence each step:
    its output carries no cache); returns (tokens, cache)."""
    kwarg, seq, cache = cache_kwarg(model), ids, None
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids if cache is None else seq[:, -1:], attention_mask=am, use_cache=True,
                        **({} if cache is None else {kwarg: cache}))
            cache = out.past_key_values
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1)[:, None]], -1)
            am = torch.cat([am, am.new_ones(am.shape[0], 1)], -1)
    return seq, cache


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_general_path_compresses_alibi_like_the_oracle(family):
    torch._dynamo.reset()
    ids, am = left_padded([30, 20], seed=1)
    oracle = ref.InlineReferenceSession(build(family), CFG)
    want = oracle.generate(ids, am, max_new_tokens=6)
    plain = build(family)
    with torch.no_grad():  # compression changes the tokens here: the comparison below has teeth
        full = plain.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)
    assert not torch.equal(full, want)
    model = build(family)
    backend = compile_model(model, CFG, inner="eager")
    if family == "mpt":
        got, cache = _greedy(model, ids, am, 6)
    else:  # the user's path
        out = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True)
        got, cache = out.sequences, out.past_key_values
    assert torch.equal(got, want)
    kept = [kv_store.unpack(layer.keys, layer.values, positions=True)[2] for layer in cache.layers]
    assert_same_kept(kept, oracle.kept_positions())
    modes = {(r.phase, r.mode) for r in backend.report}
    assert modes == {("prefill", "compress"), ("decode", "store")}, backend.report.table()
    assert all("+bias" in r.pattern for r in backend.report)


def test_fast_path_leaves_alibi_layers_alone_with_the_reason():
    torch._dynamo.reset()
    ids, am = left_padded([30, 20], seed=1)
    model = build("bloom")
    backend = compile_model(model, CFG, inner="eager")
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=3)
    # transformers 5.24: the layers are left alone (reason in the report) and the marker raises when run;
    # 5.17 fails earlier inside the model (bloom's build_alibi_tensor gets the 4-D mask of a static cache)
    with pytest.raises((kv_store.StoreError, ValueError)) as err:
        model.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False, **{cache_kwarg(model): cache})
    assert backend.report or err.type is ValueError
    assert all(r.mode == "none" and r.reason == BIAS_REASON for r in backend.report), backend.report.table()
