"""Tests of the eager oracle ``adakv_compile.reference`` (docs/algorithm.md)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from adakv_compile.config import AdaKVConfig, layer_keep
from adakv_compile.reference import ReferenceSession, alpha_floor, head_budgets, select, window_scores

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------------------------------------------
# Random cases
# ----------------------------------------------------------------------------------------------------------------

@st.composite
def selection_cases(draw, scorer=None, allocation=None, schedule=None):
    w = draw(st.integers(1, 4))
    n = draw(st.integers(w + 2, 20))
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2]))                       # MHA and GQA (Hq = 2 * Hkv)
    D = draw(st.sampled_from([4, 8]))
    # mostly long rows (that get compressed), some short or unpadded ones
    n_real = [draw(st.one_of(st.just(n), st.integers(max(1, n - 4), n), st.integers(1, n))) for _ in range(B)]
    if draw(st.booleans()):
        budget = dict(budget=draw(st.one_of(st.integers(w + 1, max(w + 1, n - 2)), st.integers(w + 1, n + 2))))
    else:
        budget = dict(compression_ratio=draw(st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.75, 0.9])))
    num_layers = draw(st.integers(1, 4))
    config = AdaKVConfig(
        window=w,
        pooling=draw(st.sampled_from(["max", "avg"])),
        kernel_size=draw(st.sampled_from([1, 3, 5, 7])),
        alpha=draw(st.sampled_from([0.0, 0.2, 0.29, 0.5, 0.7, 1.0])),
        safeguard=draw(st.sampled_from(["official", "exact-total", "kvpress"])),
        gqa_reduce=draw(st.sampled_from(["mean", "max"])),
        allocation=allocation or draw(st.sampled_from(["adaptive", "uniform"])),
        layer_schedule=schedule or draw(st.sampled_from(["flat", "pyramid"])),
        pyramid_beta=draw(st.sampled_from([1, 4, 20])),
        scorer=scorer or draw(st.sampled_from(["snapkv", "snapkv", "streaming"])),
        sink_tokens=draw(st.integers(0, 3)),
        head_floor=draw(st.sampled_from([0, 0, 4, 192])),
        **budget,
    )
    layer = draw(st.integers(0, num_layers - 1))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    amplitude = draw(st.sampled_from([0.3, 1.0, 3.0]))
    q = torch.randn(B, Hkv * G, n, D, generator=gen) * amplitude
    k = torch.randn(B, Hkv, n, D, generator=gen) * amplitude
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b, n_b in enumerate(n_real):
        valid[b, n - n_b:] = True
    return q, k, valid, config, layer, num_layers


def compressed_rows(valid, config, layer, num_layers):
    """(row, keep_l) for each row the layer compresses (n_b > keep_l)."""
    for b in range(valid.shape[0]):
        n_b = int(valid[b].sum())
        keep_l = layer_keep(config, n_b, layer, num_layers)
        if n_b > keep_l:
            yield b, keep_l


def check_guarantees(q, k, valid, config, layer, num_layers, keep):
    B, Hkv, n = keep.shape
    w = config.window
    assert keep.dtype == torch.bool
    for b in range(B):
        n_b = int(valid[b].sum())
        keep_l = layer_keep(config, n_b, layer, num_layers)
        # padding is never kept
        assert not keep[b][:, ~valid[b]].any()
        if n_b <= keep_l:
            assert torch.equal(keep[b], valid[b][None].expand(Hkv, n))
            continue
        counts = keep[b].sum(-1)
        assert keep[b][:, n - w:].all(), "window must be kept"
        uniform = config.allocation == "uniform" or config.scorer == "streaming"
        if uniform or config.safeguard != "official":
            assert int(counts.sum()) == Hkv * keep_l
        else:
            # official: sum over heads of round(c*(1-alpha) + f) with sum(c) = H*B': within [-1.5H, +0.5H]
            assert Hkv * keep_l - 1.5 * Hkv <= int(counts.sum()) <= Hkv * keep_l + 0.5 * Hkv
        if uniform:
            assert (counts == keep_l).all()
        else:
            f = alpha_floor(config.alpha, keep_l - w)
            assert (counts >= f + w).all()
            assert (counts <= n_b).all()


# ----------------------------------------------------------------------------------------------------------------
# Selection properties
# ----------------------------------------------------------------------------------------------------------------

@SETTINGS
@given(selection_cases())
def test_select_guarantees(case):
    q, k, valid, config, layer, num_layers = case
    keep = select(q, k, valid, config, layer, num_layers, scale=q.shape[-1] ** -0.5)
    check_guarantees(q, k, valid, config, layer, num_layers, keep)


@SETTINGS
@given(selection_cases(scorer="snapkv", allocation="adaptive"))
def test_adaptive_heads_take_their_budgets(case):
    """Adaptive: head h keeps the window plus its own top a[h] candidates, a = head_budgets(...)."""
    q, k, valid, config, layer, num_layers = case
    keep = select(q, k, valid, config, layer, num_layers, scale=0.9)
    check_guarantees(q, k, valid, config, layer, num_layers, keep)
    scores = window_scores(q, k, valid, config, 0.9)
    w, n = config.window, q.shape[2]
    for b, keep_l in compressed_rows(valid, config, layer, num_layers):
        budgets = head_budgets(scores[b, :, : n - w], keep_l - w, config.alpha, config.safeguard,
                               config.head_floor)
        for h in range(k.shape[1]):
            s = scores[b, h, : n - w].tolist()
            order = sorted(range(n - w), key=lambda j: (-s[j], j))
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order[: budgets[h]]] = True
            expected[n - w:] = True
            assert torch.equal(keep[b, h], expected)


@SETTINGS
@given(selection_cases(scorer="snapkv", schedule="pyramid"))
def test_pyramid_totals_every_layer(case):
    q, k, valid, config, _layer, num_layers = case
    for layer in range(num_layers):
        keep = select(q, k, valid, config, layer, num_layers, scale=0.5)
        check_guarantees(q, k, valid, config, layer, num_layers, keep)
        exact_total = config.allocation == "uniform" or config.safeguard != "official"
        for b in range(q.shape[0]):
            n_b = int(valid[b].sum())
            keep_l = layer_keep(config, n_b, layer, num_layers)
            if exact_total or n_b <= keep_l:
                assert int(keep[b].sum()) == k.shape[1] * min(keep_l, n_b)


@SETTINGS
@given(selection_cases(scorer="snapkv"), st.sets(st.integers(0, 3), max_size=2))
def test_skip_layers_keep_everything(case, skip):
    q, k, valid, config, layer, num_layers = case
    config = config.replace(skip_layers=tuple(sorted(skip)))
    keep = select(q, k, valid, config, layer, num_layers, scale=0.5)
    check_guarantees(q, k, valid, config, layer, num_layers, keep)
    if layer in skip:
        assert torch.equal(keep, valid[:, None, :].expand_as(keep))


@SETTINGS
@given(selection_cases(scorer="snapkv", allocation="uniform"))
def test_uniform_is_per_head_topk(case):
    """Uniform: each compressed head keeps the window plus its own top B'_l candidates (ties to lower j)."""
    q, k, valid, config, layer, num_layers = case
    scale = 0.7
    keep = select(q, k, valid, config, layer, num_layers, scale=scale)
    scores = window_scores(q, k, valid, config, scale)
    w = config.window
    n = q.shape[2]
    for b, keep_l in compressed_rows(valid, config, layer, num_layers):
        for h in range(k.shape[1]):
            chosen = keep[b, h, : n - w].nonzero().flatten().tolist()
            assert len(chosen) == keep_l - w
            s = scores[b, h, : n - w]
            worst_chosen = min((float(s[j]), -j) for j in chosen)
            for j in range(n - w):
                if j not in chosen:
                    assert (float(s[j]), -j) < worst_chosen


@SETTINGS
@given(selection_cases(scorer="streaming"))
def test_streaming_keeps_sinks_and_recent(case):
    q, k, valid, config, layer, num_layers = case
    keep = select(q, k, valid, config, layer, num_layers, scale=1.0)
    w, n = config.window, q.shape[2]
    for b, keep_l in compressed_rows(valid, config, layer, num_layers):
        Bp = keep_l - w
        candidates = list(range(n - int(valid[b].sum()), n - w))
        sinks = candidates[: min(config.sink_tokens, Bp)]
        rest = [j for j in candidates if j not in sinks]
        n_recent = Bp - len(sinks)
        recent = rest[len(rest) - n_recent:] if n_recent > 0 else []
        expected = torch.zeros(n, dtype=torch.bool)
        expected[sinks + recent] = True
        expected[n - w:] = True
        for h in range(k.shape[1]):
            assert torch.equal(keep[b, h], expected)


def test_streaming_is_uniform_even_if_adaptive_requested():
    # identical scores on every head; adaptive allocation would give all sinks (ties) to head 0
    q = torch.randn(1, 2, 16, 4)
    k = torch.randn(1, 2, 16, 4)
    valid = torch.ones(1, 16, dtype=torch.bool)
    config = AdaKVConfig(budget=5, window=2, scorer="streaming", sink_tokens=4, allocation="adaptive", alpha=0.0)
    keep = select(q, k, valid, config, 0, 1, 0.5)
    expected = torch.zeros(16, dtype=torch.bool)
    expected[[0, 1, 2, 14, 15]] = True          # B' = 3: three sinks, then the window
    assert torch.equal(keep[0, 0], expected) and torch.equal(keep[0, 1], expected)


def _scores_vectorized(q, k, valid, config, scale):
    """An independent, batched formulation of steps 1-6 (snapkv) for cross-checking the loops:
    window mean per query head, GQA reduce, then pooling."""
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    w = config.window
    kk = k.repeat_interleave(G, dim=1).float()
    logits = torch.einsum("bhid,bhjd->bhij", q[:, :, n - w:].float(), kk) * scale
    causal = torch.arange(n)[None, :] <= torch.arange(n - w, n)[:, None]
    allowed = causal[None, None] & valid[:, None, None, :]
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    s = p.mean(2)[..., : n - w].reshape(B, Hkv, G, n - w)
    s = s.mean(2) if config.gqa_reduce == "mean" else s.amax(2)   # GQA reduce first (official order)
    s = s.reshape(B * Hkv, 1, n - w)
    pad = config.kernel_size // 2
    if config.pooling == "max":
        s = F.max_pool1d(s, config.kernel_size, 1, pad)           # then pool the reduced scores
    else:
        s = F.avg_pool1d(s, config.kernel_size, 1, pad, count_include_pad=True)
    s = s.reshape(B, Hkv, n - w)
    s = s.masked_fill(~valid[:, None, : n - w], float("-inf"))
    out = torch.full((B, Hkv, n), float("-inf"))
    out[..., : n - w] = s
    n_real = valid.sum(-1)
    out[n_real <= w] = float("-inf")
    return out


@SETTINGS
@given(selection_cases(scorer="snapkv"))
def test_window_scores_match_batched_formula(case):
    q, k, valid, config, _, _ = case
    ours = window_scores(q, k, valid, config, 0.37)
    ref = _scores_vectorized(q, k, valid, config, 0.37)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    w = config.window
    assert torch.isneginf(ours[..., q.shape[2] - w:]).all()


def test_softcap_changes_scores_like_the_model():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 10, 4, generator=gen) * 4
    k = torch.randn(1, 2, 10, 4, generator=gen) * 4
    valid = torch.ones(1, 10, dtype=torch.bool)
    config = AdaKVConfig(budget=5, window=2, kernel_size=1)
    capped = window_scores(q, k, valid, config, 1.0, softcap=2.0)
    # softcap is equivalent to pre-capping the logits: check against a hand computation for head 0
    logits = (q[0, 0, 8:] @ k[0, 0].T)
    logits = 2.0 * torch.tanh(logits / 2.0)
    logits[0, 9] = float("-inf")
    expected = logits.softmax(-1).mean(0)[:8]
    torch.testing.assert_close(capped[0, 0, :8], expected)


# ----------------------------------------------------------------------------------------------------------------
# head_budgets against a brute-force implementation
# ----------------------------------------------------------------------------------------------------------------

def _budgets_brute_force(values, Bp, alpha, safeguard):
    H, m = len(values), len(values[0])
    T = H * Bp
    a_frac = Fraction(alpha).limit_denominator(1 << 20)
    f = math.floor(a_frac * Bp)
    if T == 0:
        return [0] * H

    def beats(a, b):  # entry a ranks before entry b
        (ha, ja), (hb, jb) = a, b
        va, vb = values[ha][ja], values[hb][jb]
        return va > vb or (va == vb and ha * m + ja < hb * m + jb)

    entries = [(h, j) for h in range(H) for j in range(m)]
    c = [0] * H
    for e in entries:
        if sum(beats(o, e) for o in entries) < T:
            c[e[0]] += 1
    if safeguard == "official":                             # round(c * (1 - alpha) + f), halves to even
        out = []
        for h in range(H):
            x = c[h] * (1 - a_frac) + f                     # exact
            lo = math.floor(x)
            frac = x - lo
            half = Fraction(1, 2)
            nearest = lo + 1 if frac > half else lo if frac < half else lo + (lo % 2)
            out.append(min(nearest, sum(v != float("-inf") for v in values[h])))
        return out
    free = T - H * f                                        # exact-total: largest remainder
    floors = [c[h] * free // T for h in range(H)]
    remainders = [c[h] * free % T for h in range(H)]        # fractional part * T
    left = free - sum(floors)
    a = [f + floors[h] for h in range(H)]
    for _ in range(left):                                   # hand out one unit at a time
        best = max(range(H), key=lambda h: (remainders[h], -h))
        a[best] += 1
        remainders[best] = -1
    return a


@SETTINGS
@given(
    H=st.integers(1, 4),
    m=st.integers(1, 7),
    bp_frac=st.floats(0, 1),
    alpha=st.sampled_from([0.0, 0.1, 0.2, 0.29, 0.5, 0.7, 1.0]),
    levels=st.sampled_from([2, 3, 1000]),            # few levels force ties
    neg_inf=st.booleans(),
    safeguard=st.sampled_from(["official", "exact-total"]),
    seed=st.integers(0, 2 ** 31 - 1),
)
def test_head_budgets_brute_force(H, m, bp_frac, alpha, levels, neg_inf, safeguard, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(1, levels + 1, (H, m), generator=gen).float() / levels
    valid_cols = m
    if neg_inf and m > 1:
        valid_cols = m - 1
        scores[:, 0] = float("-inf")                  # a padding column
    Bp = int(bp_frac * (valid_cols - 1)) if valid_cols > 1 else 0
    ours = head_budgets(scores, Bp, alpha, safeguard)
    ref = _budgets_brute_force(scores.tolist(), Bp, alpha, safeguard)
    assert ours == ref
    if safeguard == "exact-total":
        assert sum(ours) == H * Bp
    else:
        assert H * Bp - 1.5 * H <= sum(ours) <= H * Bp + 0.5 * H
    assert all(a >= alpha_floor(alpha, Bp) for a in ours)
    assert all(a <= valid_cols for a in ours)


def test_head_budgets_examples():
    # all mass on head 0: c = [4, 0], T = 4, f = 1
    s = torch.tensor([[9.0, 8, 7, 6], [1, 1, 1, 1]])
    assert head_budgets(s, 2, 0.5, "exact-total") == [3, 1]   # free = 2, all to head 0
    assert head_budgets(s, 2, 0.5) == [3, 1]                  # round(4 * 0.5 + 1) = 3, round(0 + 1) = 1
    # equal scores: ties to the lower flat index -> head 0 wins all of the top T
    s = torch.ones(2, 4)
    assert head_budgets(s, 2, 0.0, "exact-total") == [4, 0]
    assert head_budgets(s, 2, 0.0) == [4, 0]
    # one top entry per head
    s = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0]])
    assert head_budgets(s, 1, 0.0) == [1, 1, 1]
    # c = [3, 3, 0], f = 1: exact-total gives the spare unit of quotas 1.5, 1.5, 0 to head 0;
    # official: round(3 * 0.5 + 1) = round(2.5) = 2 (half to even) -> [2, 2, 1], total 5 instead of 6
    s = torch.tensor([[9.0, 9, 9, 0], [9, 9, 9, 0], [1, 1, 1, 1]])
    assert head_budgets(s, 2, 0.5, "exact-total") == [3, 2, 1]
    assert head_budgets(s, 2, 0.5) == [2, 2, 1]
    # c = [3, 1], f = 1: round(1.5 + 1) = 2 and round(0.5 + 1) = 2 (both halves to even) -> total 4 = T
    s = torch.tensor([[9.0, 9, 9, 0], [9, 0, 0, 0]])
    assert head_budgets(s, 2, 0.5) == [2, 2]
    # the official budget is clamped to the head's candidates (-inf = padding)
    # (only reachable when B' exceeds them): T = 6 takes every entry, c = [3, 3] -> [2, 1]
    s = torch.tensor([[9.0, 9, float("-inf")], [1, float("-inf"), float("-inf")]])
    assert head_budgets(s, 3, 0.0) == [2, 1]
    assert alpha_floor(0.29, 100) == 29
    assert alpha_floor(0.2, 7) == 1


def test_select_rejects_right_padding():
    q = torch.randn(1, 1, 6, 4)
    k = torch.randn(1, 1, 6, 4)
    valid = torch.tensor([[True, True, True, True, False, False]])
    with pytest.raises(ValueError):
        select(q, k, valid, AdaKVConfig(budget=3, window=1), 0, 1, 0.5)


def test_exact_mode_keeps_everything():
    q = torch.randn(2, 2, 6, 4)
    k = torch.randn(2, 2, 6, 4)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    keep = select(q, k, valid, AdaKVConfig(window=2), 0, 1, 0.5)
    assert torch.equal(keep, valid[:, None].expand(2, 2, 6))


# ----------------------------------------------------------------------------------------------------------------
# The reference generator
# ----------------------------------------------------------------------------------------------------------------

def _tiny_models():
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=128, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(1234)
    models = {
        "llama": LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256, **common)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256, **common)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)),
    }
    for model in models.values():
        model.eval()
    return models


@pytest.fixture(scope="module")
def tiny_models():
    return _tiny_models()


def _prompt(batch, n, seed, pad=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, n), generator=gen)
    mask = torch.ones(batch, n, dtype=torch.long)
    if batch > 1:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_matches_hf_without_compression(tiny_models, name, batch):
    model = tiny_models[name]
    ids, mask = _prompt(batch, 12, seed=batch)
    before = model.config._attn_implementation
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    session = ReferenceSession(model, AdaKVConfig(budget=64, window=4))
    ours = session.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(ours, hf)
    assert model.config._attn_implementation == before
    # nothing dropped: each head holds the valid prompt tokens plus the 7 generated tokens fed back
    n_real = mask.sum(-1)
    for counts in session.kept_counts():
        assert torch.equal(counts, (n_real + 7)[:, None].expand_as(counts))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prefill_and_chunk_match_full_forward(tiny_models, name):
    """Exact mode: prefill + a 3-token extend gives the logits of one full forward over the whole sequence."""
    model = tiny_models[name]
    ids, mask = _prompt(2, 10, seed=7)
    gen = torch.Generator().manual_seed(8)
    more = torch.randint(1, 128, (2, 3), generator=gen)
    session = ReferenceSession(model, AdaKVConfig(window=4))
    logits_prompt = session.prefill(ids, mask)
    logits_more = session.extend(more)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], -1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, more], -1), attention_mask=full_mask,
                     position_ids=position_ids).logits
    torch.testing.assert_close(logits_prompt[full_mask[:, :10].bool()], full[:, :10][full_mask[:, :10].bool()],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_more, full[:, 10:], rtol=1e-4, atol=1e-4)


COMPRESSED = {
    "adaptive": AdaKVConfig(budget=8, window=4, kernel_size=3),
    "pyramid": AdaKVConfig(budget=8, window=4, allocation="uniform", layer_schedule="pyramid", pyramid_beta=4),
    "skip": AdaKVConfig(budget=8, window=4, pooling="avg", gqa_reduce="max", skip_layers=(1,)),
    "streaming": AdaKVConfig(compression_ratio=0.75, window=4, scorer="streaming", sink_tokens=2),
}
COMPRESSED_CASES = [("llama", c) for c in COMPRESSED] + [
    ("qwen2", "adaptive"), ("qwen2", "pyramid"), ("gpt2", "adaptive"), ("gpt2", "streaming")]


@pytest.mark.parametrize("name,config_name", COMPRESSED_CASES)
def test_compressed_session_matches_select(tiny_models, name, config_name):
    model = tiny_models[name]
    config = COMPRESSED[config_name]
    n, new = 32, 5                                      # prompt = 4x the budget
    ids, mask = _prompt(2, n, seed=11, pad=2)
    session = ReferenceSession(model, config, record=True)
    out = session.generate(ids, attention_mask=mask, max_new_tokens=new)
    assert out.shape == (2, n + new)
    n_real = mask.sum(-1).tolist()
    num_layers = session.num_layers
    counts = session.kept_counts()
    positions = session.kept_positions()
    for layer in range(num_layers):
        rec = session.prefill_records[layer]
        keep = select(rec["q"], rec["k"], rec["valid"], config, layer, num_layers, rec["scale"], rec["softcap"])
        assert torch.equal(keep, rec["keep"])
        check_guarantees(rec["q"], rec["k"], rec["valid"], config, layer, num_layers, keep)
        # cache length per head == kept prompt tokens + the generated tokens fed back (new - 1)
        assert torch.equal(counts[layer], keep.sum(-1) + (new - 1))
        for b in range(2):
            keep_l = layer_keep(config, n_real[b], layer, num_layers)
            if config.allocation == "uniform" or config.scorer == "streaming" or config.safeguard != "official":
                assert int(keep[b].sum()) == keep.shape[1] * min(keep_l, n_real[b])
            for h in range(keep.shape[1]):
                pos = positions[layer][b][h]
                expected = torch.cat([keep[b, h].nonzero().flatten(), torch.arange(n, n + new - 1)])
                assert torch.equal(pos, expected)
    if config.skip_layers:
        expected = (torch.tensor(n_real) + new - 1)[:, None].expand_as(counts[1])
        assert torch.equal(counts[1], expected)
    # q is recorded after RoPE with the model's query heads; GQA for llama/qwen2
    if name != "gpt2":
        assert session.prefill_records[0]["q"].shape[1] == 2 * session.prefill_records[0]["k"].shape[1]


def test_chunked_extend_equals_token_by_token(tiny_models):
    model = tiny_models["llama"]
    config = AdaKVConfig(budget=8, window=4)
    ids, mask = _prompt(2, 32, seed=5)
    more = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(6))
    a = ReferenceSession(model, config)
    a.prefill(ids, mask)
    chunk = a.extend(more)
    b = ReferenceSession(model, config)
    b.prefill(ids, mask)
    steps = torch.cat([b.extend(more[:, i:i + 1]) for i in range(4)], dim=1)
    torch.testing.assert_close(chunk, steps, rtol=1e-5, atol=1e-5)
    for ca, cb in zip(a.kept_counts(), b.kept_counts()):
        assert torch.equal(ca, cb)


def test_compression_changes_decoding_inputs(tiny_models):
    """Sanity: with a small budget the cache is really smaller and the logits differ from exact decoding."""
    model = tiny_models["llama"]
    ids, mask = _prompt(1, 32, seed=9)
    exact = ReferenceSession(model, AdaKVConfig(window=4))
    small = ReferenceSession(model, AdaKVConfig(budget=8, window=4, safeguard="exact-total"))
    le = exact.prefill(ids, mask)
    ls = small.prefill(ids, mask)
    torch.testing.assert_close(le, ls)                   # prefill attention is exact in both
    tok = le[:, -1].argmax(-1, keepdim=True)
    assert not torch.allclose(exact.extend(tok), small.extend(tok))
    for counts in small.kept_counts():                   # Hkv * budget kept, plus one decoded token per head
        assert int(counts.sum()) == 2 * (8 + 1)          # (exact-total: the official total may differ)
