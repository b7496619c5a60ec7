"""Numerics of scoring and selection with fp16 / bf16 inputs on CPU (issue 10, section 4, first bullet).

No NaN/inf in the candidates' scores, a sane selection (no padding kept, the window kept, uncompressed rows
whole) equal to the oracle's, over the edge cases: all-padding rows, 1-token prompts, prompts of exactly
``window`` and exactly ``budget`` tokens, huge budgets, ``kernel_size`` 1 and larger than the prompt.
"""
from __future__ import annotations

import pytest
import torch

from adakv_compile import AdaKVConfig, reference
from adakv_compile.config import layer_keep
from adakv_compile.kernels.allocate import keep_mask
from adakv_compile.kernels.score import window_scores

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(params=DTYPES, ids=["fp16", "bf16"])
def dtype(request):
    dt = request.param
    try:  # the ops our scoring runs on these inputs (a cast, then fp32 math)
        x = torch.ones(1, 1, 4, 2, dtype=dt)
        window_scores(x, x, torch.ones(1, 4, dtype=torch.bool), AdaKVConfig(budget=2, window=1), 1.0)
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"{dt} not supported on CPU here: {e}")
    return dt


def _inputs(lengths, Hq, Hkv, D, dtype, seed=0, amplitude=2.0):
    g = torch.Generator().manual_seed(seed)
    n = max(max(lengths), 1)
    q = (torch.randn(len(lengths), Hq, n, D, generator=g) * amplitude).to(dtype)
    k = (torch.randn(len(lengths), Hkv, n, D, generator=g) * amplitude).to(dtype)
    valid = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, L in enumerate(lengths):
        valid[b, n - L:] = True
    return q, k, valid


def _check(q, k, valid, cfg, layer=0, num_layers=1, softcap=None):
    scale = q.shape[-1] ** -0.5
    scores = window_scores(q, k, valid, cfg, scale, softcap)
    assert scores.dtype == torch.float32
    assert not torch.isnan(scores).any()
    B, H, n = scores.shape
    w = cfg.window
    m = n - w
    n_real = valid.sum(-1)
    for b in range(B):
        if int(n_real[b]) > w and m > 0:                    # rows with candidates: all finite
            cand = scores[b, :, :m][:, valid[b, :m]]
            assert torch.isfinite(cand).all(), f"row {b}"
    # non-candidates are -inf
    assert torch.isneginf(scores[..., max(m, 0):]).all()
    assert torch.isneginf(scores.masked_select(~valid[:, None, :].expand_as(scores))).all()

    keep = keep_mask(scores, valid, cfg, layer, num_layers)
    assert keep.dtype == torch.bool and keep.shape == (B, H, n)
    assert not (keep & ~valid[:, None, :]).any(), "padding kept"
    for b in range(B):
        nb = int(n_real[b])
        keep_l = layer_keep(cfg, nb, layer, num_layers)
        if nb <= keep_l:
            assert torch.equal(keep[b], valid[b].expand(H, n))
        else:
            assert keep[b, :, n - w:].all()
    ref = reference.select(q, k, valid, cfg, layer, num_layers, scale, softcap)
    assert torch.equal(keep, ref)
    return scores, keep


CONFIGS = {
    "default": dict(budget=16, window=4),
    "avg-max": dict(budget=16, window=4, pooling="avg", gqa_reduce="max", alpha=0.5),
    "exact-total": dict(budget=12, window=4, safeguard="exact-total"),
    "kvpress": dict(budget=12, window=4, safeguard="kvpress"),
    "pyramid": dict(budget=20, window=4, layer_schedule="pyramid"),
    "ratio": dict(compression_ratio=0.7, window=4),
    "uniform": dict(budget=16, window=4, allocation="uniform"),
    "streaming": dict(budget=16, window=4, scorer="streaming"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
def test_edge_lengths(dtype, name, heads):
    """One batch holding every edge length: all padding, 1 token, window, budget, budget + 1, long."""
    cfg = AdaKVConfig(**CONFIGS[name])
    w = cfg.window
    budget = cfg.budget or 16
    lengths = [0, 1, w, w + 1, budget, budget + 1, 40]
    q, k, valid = _inputs(lengths, *heads, D=16, dtype=dtype)
    for layer in (0, 2):
        _check(q, k, valid, cfg, layer, 3)


@pytest.mark.parametrize("n", [1, 4, 5, 16])
def test_short_prompts_alone(dtype, n):
    """Prompts of 1 token, exactly the window, window + 1, exactly the budget: nothing dropped, no NaN."""
    cfg = AdaKVConfig(budget=16, window=4)
    q, k, valid = _inputs([n], 4, 2, D=8, dtype=dtype)
    _, keep = _check(q, k, valid, cfg)
    assert keep.all()


def test_all_padding_batch(dtype):
    q = torch.zeros(2, 4, 10, 8, dtype=dtype)
    k = torch.zeros(2, 2, 10, 8, dtype=dtype)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    _, keep = _check(q, k, valid, AdaKVConfig(budget=6, window=2))
    assert not keep.any()


@pytest.mark.parametrize("budget", [10 ** 6, 2 ** 40])
def test_huge_budgets(dtype, budget):
    q, k, valid = _inputs([50, 30], 4, 2, D=8, dtype=dtype)
    for extra in (dict(), dict(layer_schedule="pyramid")):
        _, keep = _check(q, k, valid, AdaKVConfig(budget=budget, window=4, **extra), 1, 4)
        assert torch.equal(keep, valid[:, None].expand_as(keep))


@pytest.mark.parametrize("kernel_size", [1, 3, 41, 99])
def test_kernel_sizes(dtype, kernel_size):
    """kernel_size 1 (no pooling) and larger than the prompt (every column sees the whole row)."""
    for pooling in ("max", "avg"):
        cfg = AdaKVConfig(budget=10, window=4, kernel_size=kernel_size, pooling=pooling)
        q, k, valid = _inputs([30, 20, 11], 4, 2, D=8, dtype=dtype)
        _check(q, k, valid, cfg)


def test_large_logits_and_softcap(dtype):
    """Large activations (fp16 has a small range; the logits are computed in fp32) and soft-capping."""
    q, k, valid = _inputs([40, 25], 8, 2, D=16, dtype=dtype, amplitude=60.0)
    assert torch.isfinite(q.float()).all()
    cfg = AdaKVConfig(budget=12, window=4)
    scores, _ = _check(q, k, valid, cfg)
    _check(q, k, valid, cfg, softcap=30.0)
    # logits this large make the softmax one-hot: scores are still probabilities
    finite = scores[torch.isfinite(scores)]
    assert (finite >= 0).all() and (finite <= 1).all()


def test_half_inputs_score_like_their_fp32_copy(dtype):
    """Scoring casts to fp32 first: half inputs give exactly the scores of their fp32 copy."""
    q, k, valid = _inputs([48, 30], 8, 2, D=16, dtype=dtype)
    cfg = AdaKVConfig(budget=16, window=4)
    a = window_scores(q, k, valid, cfg, 0.25)
    b = window_scores(q.float(), k.float(), valid, cfg, 0.25)
    assert torch.equal(a, b)
