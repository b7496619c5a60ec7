"""The kernels' selection (score → allocate, vectorised) equals the eager oracle, index for index."""
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv_compile import AdaKVConfig, reference
from adakv_compile.config import layer_keep
from adakv_compile.kernels.allocate import head_budgets, keep_mask, row_keep
from adakv_compile.kernels.score import window_scores


from tests.prompts import scoring_inputs as _inputs


SETTINGS = [
    dict(budget=12, window=4, kernel_size=3),
    dict(budget=20, window=8, kernel_size=7, pooling="avg"),
    dict(budget=16, window=4, allocation="uniform"),
    dict(budget=16, window=4, alpha=0.5, gqa_reduce="max"),
    dict(budget=24, window=4, layer_schedule="pyramid"),
    dict(budget=24, window=4, layer_schedule="pyramid", allocation="uniform"),
    dict(compression_ratio=0.75, window=4),
    dict(budget=16, window=4, scorer="streaming", sink_tokens=3),
    dict(budget=16, window=4, skip_layers=(1,)),
    dict(budget=14, window=2, alpha=0.0, kernel_size=1),
    dict(budget=16, window=4, alpha=0.5, safeguard="kvpress"),
    dict(budget=16, window=4, alpha=0.5, safeguard="exact-total"),
    dict(budget=24, window=4, alpha=0.2, safeguard="exact-total", layer_schedule="pyramid"),
    dict(compression_ratio=0.6, window=4, alpha=0.7, gqa_reduce="max", pooling="avg"),
    dict(budget=20, window=4, alpha=0.2, safeguard="kvpress", layer_schedule="pyramid"),
]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_selection_equals_reference(kwargs, heads):
    cfg = AdaKVConfig(**kwargs)
    Hq, Hkv = heads
    for seed, layer in ((0, 0), (1, 1), (2, 3)):
        q, k, valid = _inputs(seed, 3, Hq, Hkv, 72, 8, pad=(0, 20, 60))
        scale = 8 ** -0.5
        ref_keep = reference.select(q, k, valid, cfg, layer, 4, scale)
        ref_scores = reference.window_scores(q, k, valid, cfg, scale)
        ours_scores = window_scores(q, k, valid, cfg, scale)
        finite = torch.isfinite(ref_scores) & valid[:, None, :]
        torch.testing.assert_close(ours_scores[finite], ref_scores[finite], rtol=1e-5, atol=1e-7)
        ours = keep_mask(ours_scores, valid, cfg, layer, 4)
        assert torch.equal(ours, ref_keep), f"seed {seed} layer {layer}"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(20, 90), Hkv=st.integers(1, 3), G=st.integers(1, 2),
       budget=st.integers(6, 40), window=st.integers(1, 5), alpha=st.sampled_from([0.0, 0.2, 0.29, 0.5, 0.7, 1.0]),
       pooling=st.sampled_from(["max", "avg"]), alloc=st.sampled_from(["adaptive", "uniform"]),
       safeguard=st.sampled_from(["official", "exact-total", "kvpress"]))
def test_selection_equals_reference_property(seed, n, Hkv, G, budget, window, alpha, pooling, alloc,
                                             safeguard):
    if budget <= window:
        budget = window + 1
    cfg = AdaKVConfig(budget=budget, window=window, alpha=alpha, pooling=pooling, allocation=alloc,
                      kernel_size=5, safeguard=safeguard)
    q, k, valid = _inputs(seed, 2, Hkv * G, Hkv, n, 4, pad=(0, seed % n))
    keep = keep_mask(window_scores(q, k, valid, cfg, 0.5), valid, cfg, 0, 1)
    assert torch.equal(keep, reference.select(q, k, valid, cfg, 0, 1, 0.5))
    # the guarantees, checked on the kernels' output directly
    assert not (keep & ~valid[:, None, :]).any()
    bp = budget - window
    floor = int(Fraction(alpha).limit_denominator(1 << 20) * bp)
    for b in range(2):
        n_b = int(valid[b].sum())
        if n_b > budget:
            total = int(keep[b].sum())
            if alloc == "uniform" or safeguard != "official":
                assert total == Hkv * budget
            else:  # official rounding: sum of round(c*(1-alpha) + f) over heads, sum(c) = H*B'
                assert Hkv * budget - 1.5 * Hkv <= total <= Hkv * budget + 0.5 * Hkv
            assert keep[b, :, n - window:].all()
            assert (keep[b].sum(-1) >= floor + window).all()
        else:
            assert torch.equal(keep[b], valid[b].expand(Hkv, n))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(H=st.integers(1, 5), m=st.integers(1, 12), bp_frac=st.floats(0, 1),
       alpha=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.29, 0.5, 0.7, 1.0]), levels=st.sampled_from([2, 3, 1000]),
       pad=st.integers(0, 3), safeguard=st.sampled_from(["official", "exact-total", "kvpress"]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_head_budgets_equal_reference(H, m, bp_frac, alpha, levels, pad, safeguard, seed):
    """The batched budgets (exact integer rounding) == the oracle's (Fractions), ties and padding included."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(1, levels + 1, (H, m), generator=gen).float() / levels
    pad = min(pad, m - 1)
    scores[:, :pad] = float("-inf")
    bp = int(bp_frac * (m - pad - 1))
    ours = head_budgets(scores, bp, alpha, safeguard).tolist()
    assert ours == reference.head_budgets(scores, bp, alpha, safeguard)


def test_official_rounding_is_exact_half_to_even():
    """alpha = 0.7, B' = 42 (f = 29), c = 325: 325 * 0.3 + 29 = 126.5 exactly -> 126 (half to even);
    the official float32 ``torch.round(c * (1 - alpha) + f)`` gives 127."""
    assert float(torch.round(torch.tensor([325]) * (1 - 0.7) + 29)) == 127.0   # the float fuzz we avoid
    H, m, bp = 8, 330, 42
    scores = torch.zeros(H, m)
    scores[0, :325] = 1.0
    scores[1:, :2] = 0.9                     # T = 336: head 0's 325, then 11 of these (lower heads first)
    expected_c = [325, 2, 2, 2, 2, 2, 1, 0]
    expected = [round(Fraction(c) * Fraction(3, 10) + 29) for c in expected_c]
    assert expected[0] == 126
    assert head_budgets(scores, bp, 0.7, "official").tolist() == expected
    assert reference.head_budgets(scores, bp, 0.7, "official") == expected


@pytest.mark.parametrize("kwargs", [dict(budget=24, window=4), dict(budget=40, window=8, layer_schedule="pyramid"),
                                    dict(budget=24, window=4, layer_schedule="pyramid", pyramid_beta=3),
                                    dict(compression_ratio=0.7, window=4),
                                    dict(compression_ratio=0.29, window=2, layer_schedule="pyramid"),
                                    dict(budget=16, window=4, skip_layers=(2,))])
def test_row_keep_equals_layer_keep(kwargs):
    """The tensor per-row budgets == config.layer_keep (the Python spec), every length and layer."""
    cfg = AdaKVConfig(**kwargs)
    n_real = torch.arange(0, 300)
    for num_layers in (1, 2, 5):
        for layer in range(num_layers):
            got = row_keep(cfg, n_real, layer, num_layers).tolist()
            assert got == [layer_keep(cfg, int(x), layer, num_layers) for x in n_real], (layer, num_layers)


@pytest.mark.parametrize("kwargs", [dict(budget=16, window=4), dict(budget=16, window=4, layer_schedule="pyramid"),
                                    dict(compression_ratio=0.5, window=4), dict(budget=16, window=4, safeguard="kvpress"),
                                    dict(budget=16, window=4, safeguard="exact-total"),
                                    dict(budget=16, window=4, allocation="uniform"),
                                    dict(budget=16, window=4, scorer="streaming")])
def test_no_host_sync(kwargs):
    """Scoring and selection run on the meta device: no .item(), nonzero, boolean-mask indexing or other
    data-dependent host synchronisation (those fail on meta tensors)."""
    cfg = AdaKVConfig(**kwargs)
    q = torch.empty(3, 8, 64, 16, device="meta")
    k = torch.empty(3, 2, 64, 16, device="meta")
    valid = torch.empty(3, 64, dtype=torch.bool, device="meta")
    keep = keep_mask(window_scores(q, k, valid, cfg, 0.25), valid, cfg, 1, 4)
    assert keep.shape == (3, 2, 64) and keep.dtype == torch.bool and keep.device.type == "meta"
