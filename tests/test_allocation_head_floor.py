"""The head floor (AdaKVConfig.head_floor, docs/algorithm.md "Head floor"): kernels == oracle, and the
floor's defining properties (no lm-eval needed: this is the allocation logic itself)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv_compile import AdaKVConfig, reference
from adakv_compile.config import alpha_floor, head_floor_tokens
from adakv_compile.kernels.allocate import adaptive_budgets, head_budgets, keep_mask
from adakv_compile.kernels.score import window_scores


from tests.prompts import scoring_inputs as _inputs


def test_default_and_official():
    assert AdaKVConfig().head_floor == 192
    off = AdaKVConfig.official(budget=128)
    assert off.head_floor == 0 and off.budget == 128 and off.alpha == AdaKVConfig().alpha
    with pytest.raises(ValueError, match="head_floor"):
        AdaKVConfig(head_floor=-1)
    with pytest.raises(ValueError, match="head_floor"):
        AdaKVConfig(head_floor=1.5)
    cfg = AdaKVConfig(budget=64, head_floor=10)
    assert head_floor_tokens(cfg, 8) == 8 and head_floor_tokens(cfg, 40) == 10
    assert head_floor_tokens(cfg, 100) == max(alpha_floor(0.2, 100), 10) == 20


@settings(max_examples=60, deadline=None, derandomize=True)
@given(H=st.integers(1, 5), m=st.integers(1, 14), bp_frac=st.floats(0, 1),
       alpha=st.sampled_from([0.0, 0.2, 0.29, 0.5, 1.0]), levels=st.sampled_from([2, 3, 1000]),
       pad=st.integers(0, 3), safeguard=st.sampled_from(["official", "exact-total", "kvpress"]),
       head_floor=st.integers(0, 16), seed=st.integers(0, 2 ** 31 - 1))
def test_head_budgets_with_floor_equal_reference(H, m, bp_frac, alpha, levels, pad, safeguard, head_floor, seed):
    """Batched budgets (integer rounding) == the oracle's (Fractions) with a head floor; each head gets at
    least the floor (capped by its candidates); a floor >= B' is uniform allocation."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(1, levels + 1, (H, m), generator=gen).float() / levels
    pad = min(pad, m - 1)
    scores[:, :pad] = float("-inf")
    bp = int(bp_frac * (m - pad - 1))
    ours = head_budgets(scores, bp, alpha, safeguard, head_floor).tolist()
    assert ours == reference.head_budgets(scores, bp, alpha, safeguard, head_floor)
    floor = max(alpha_floor(alpha, bp), min(head_floor, bp))
    assert all(a >= min(floor, m - pad) for a in ours)
    if head_floor >= bp:
        assert ours == [bp] * H
    if H == 1 and min(head_floor, bp) > alpha_floor(alpha, bp):   # one KV head (Gemma-3): SnapKV exactly
        assert ours == [bp]
    if head_floor <= alpha_floor(alpha, bp):          # the floor changes nothing
        assert ours == reference.head_budgets(scores, bp, alpha, safeguard)


def test_batched_rows_take_their_own_floor():
    """Rows of one batch with different B' (left padding / compression_ratio): per-row floors, no loop."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4, 50, generator=g)
    scores[1, 2:] *= 0.01                               # heads 2, 3 of row 1 lose the global top-k
    bp = torch.tensor([10, 30, 45])
    got = adaptive_budgets(scores, bp, 0.2, "official", head_floor=20)
    for b in range(3):
        assert got[b].tolist() == reference.head_budgets(scores[b], int(bp[b]), 0.2, "official", 20)
    assert got[0].tolist() == [10] * 4                  # floor >= B': uniform
    assert (got[1] >= 20).all() and got[1, 2] < got[1, 0]


SETTINGS = [
    dict(budget=24, window=4, head_floor=8),
    dict(budget=24, window=4, head_floor=8, safeguard="kvpress"),
    dict(budget=24, window=4, head_floor=8, safeguard="exact-total", pooling="avg"),
    dict(budget=40, window=4, head_floor=12, layer_schedule="pyramid"),
    dict(compression_ratio=0.6, window=4, head_floor=10),
    dict(budget=20, window=4),                          # the default floor (192) >= B': uniform
]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_selection_with_floor_equals_reference(kwargs):
    cfg = AdaKVConfig(**kwargs)
    for seed, layer in ((0, 0), (1, 2)):
        q, k, valid = _inputs(seed, 3, 6, 3, 80, 8, pad=(0, 15, 50))
        scale = 8 ** -0.5
        ours = keep_mask(window_scores(q, k, valid, cfg, scale), valid, cfg, layer, 4)
        assert torch.equal(ours, reference.select(q, k, valid, cfg, layer, 4, scale)), (seed, layer)
        if cfg.budget is not None and cfg.layer_schedule == "flat":
            bp = cfg.budget - cfg.window
            per_head = ours[0, :, :80 - cfg.window].sum(-1)
            assert (per_head >= head_floor_tokens(cfg, bp)).all()


def test_default_floor_equals_snapkv_at_tight_budgets():
    """B' <= head_floor: the default adaptive selection is exactly SnapKV's (uniform); official differs."""
    q, k, valid = _inputs(3, 1, 6, 3, 400, 8, pad=(0,))
    scale = 8 ** -0.5
    for budget in (64, 128, 224):
        default = AdaKVConfig(budget=budget, window=32)
        snap = default.replace(allocation="uniform")
        s = window_scores(q, k, valid, default, scale)
        assert torch.equal(keep_mask(s, valid, default, 0, 1), keep_mask(s, valid, snap, 0, 1))
    off = AdaKVConfig.official(budget=128, window=32)
    s = window_scores(q, k, valid, off, scale)
    assert not torch.equal(keep_mask(s, valid, off, 0, 1), keep_mask(s, valid, off.replace(allocation="uniform"), 0, 1))
