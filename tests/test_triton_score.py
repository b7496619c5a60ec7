"""Triton SnapKV scores (``kernels/triton_score.py``) against the plain path (``score.window_scores``).

On a CPU-only machine the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is first imported); on a CUDA machine the same comparisons run on the GPU. Shapes are small: the
interpreter executes every block op in numpy. Inputs are fresh random tensors per case (seeded).

Tolerance: fp32 inputs, max |triton - reference| <= 1e-5 x the largest finite reference score (the two
differ only by fp32 rounding: dot and sum order, online softmax); half inputs (bf16), 1e-3 (the Triton
dot multiplies the bf16 values directly, the reference casts them to fp32 first: both exact products, but
accumulated in a different order). The -inf pattern must be identical.
"""
from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, interpreter_subprocess_test, needs_device, triton  # noqa: F401
from adakv_compile.config import AdaKVConfig  # noqa: E402
from adakv_compile.kernels.allocate import keep_mask  # noqa: E402
from adakv_compile.kernels.score import window_scores  # noqa: E402
from adakv_compile.kernels.triton_score import window_scores_triton  # noqa: E402

test_in_interpreter_subprocess = interpreter_subprocess_test(__file__)


def _inputs(seed, B, Hkv, G, n, D, n_real, dtype=torch.float32):
    """Fresh random q [B, Hq, n, D], k [B, Hkv, n, D] and a left-padded valid mask (row b: n_real[b])."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, n, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, n, D, generator=g).to(DEVICE, dtype)
    pos = torch.arange(n)
    valid = (pos[None, :] >= n - torch.tensor(n_real)[:, None]).to(DEVICE)
    return q, k, valid


def _check(out, ref, dtype=torch.float32):
    assert out.shape == ref.shape and out.dtype == torch.float32
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), "the -inf pattern differs"
    assert not torch.isnan(out).any()
    assert (out[~fin] == float("-inf")).all()
    if fin.any():
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        err = ((out - ref)[fin].abs().max() / ref[fin].abs().max()).item()
        assert err <= tol, f"max error {err:.3g} relative to the largest score"


# row 0 whole; row 1 left-padded, candidates left; row 2 shorter than the window: every candidate column
# is padding and so are some window queries (all -inf, as the reference)
MIXES = [  # (reduce, pooling, kernel_size)
    ("mean", "max", 7), ("max", "avg", 1), ("mean", "avg", 143), ("max", "max", 143),
]


@needs_device
@pytest.mark.parametrize("G", [1, 2, 4, 3], ids=["mha", "gqa2", "gqa4", "gqa3"])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "softcap"])
def test_matches_window_scores(G, softcap):
    B, Hkv, n, D, w = 3, 2, 157, 32, 16
    for idx, (reduce, pooling, ks) in enumerate(MIXES):
        q, k, valid = _inputs(100 * G + 10 * idx + bool(softcap), B, Hkv, G, n, D, [n, 90, 11])
        cfg = AdaKVConfig(budget=40, window=w, gqa_reduce=reduce, pooling=pooling, kernel_size=ks)
        scale = D ** -0.5 * 2.0  # sharper than 1/sqrt(D): masking mistakes show
        ref = window_scores(q, k, valid, cfg, scale, softcap)
        out = window_scores_triton(q, k, valid, cfg, scale, softcap)
        _check(out, ref)
        assert torch.isfinite(ref[:2, :, : n - w]).any(dim=-1).all() and not torch.isfinite(ref[2]).any()


@needs_device
@pytest.mark.parametrize("n_extra", [1, 2, 5])
def test_n_barely_above_window(n_extra):
    """m = n - w in {1, 2, 5} candidate columns; kernel 7 is wider than m; one row padded to 1 candidate."""
    w, D, G = 12, 16, 2
    n = w + n_extra
    for reduce, pooling in [("mean", "max"), ("max", "avg")]:
        q, k, valid = _inputs(7 * n_extra + len(reduce), 2, 2, G, n, D, [n, w + 1])
        cfg = AdaKVConfig(budget=w + 1, window=w, gqa_reduce=reduce, pooling=pooling, kernel_size=7)
        _check(window_scores_triton(q, k, valid, cfg, 0.3, 2.5), window_scores(q, k, valid, cfg, 0.3, 2.5))


@needs_device
def test_splits_blocks_and_row_tiles():
    """Pass A cut into key pieces (merge kernel), more pieces than blocks, small BLOCK_N (many blocks),
    and row tiles smaller than a group (several head steps and window chunks, w not a power of two)."""
    B, Hkv, G, n, D, w = 2, 2, 3, 203, 24, 20
    q, k, valid = _inputs(11, B, Hkv, G, n, D, [n, 150])
    cfg = AdaKVConfig(budget=60, window=w, kernel_size=5)
    ref = window_scores(q, k, valid, cfg, D ** -0.5, None)
    for kw in (dict(num_splits=3), dict(num_splits=50, block_n=16), dict(row_tile=16, num_splits=2)):
        _check(window_scores_triton(q, k, valid, cfg, D ** -0.5, None, **kw), ref)
    cfg = AdaKVConfig(budget=60, window=w, kernel_size=5, gqa_reduce="max", pooling="avg")
    ref = window_scores(q, k, valid, cfg, D ** -0.5, 3.0)
    _check(window_scores_triton(q, k, valid, cfg, D ** -0.5, 3.0, row_tile=16, num_splits=4), ref)


@needs_device
def test_strided_inputs_window_only_q_and_bf16():
    """k as a transposed view ([B, n, Hkv, D] storage), q given as only its last w rows (a slice of a
    [B, n, Hq, D] tensor), head_dim not a power of two; then bf16 inputs."""
    B, Hkv, G, n, D, w = 2, 2, 2, 97, 40, 8
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, n, Hkv * G, D, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, n, Hkv, D, generator=g).to(DEVICE).transpose(1, 2)
    valid = torch.ones(B, n, dtype=torch.bool, device=DEVICE)
    valid[1, :30] = False
    cfg = AdaKVConfig(budget=30, window=w)
    ref = window_scores(q, k, valid, cfg, D ** -0.5, None)
    _check(window_scores_triton(q, k, valid, cfg, D ** -0.5, None), ref)
    _check(window_scores_triton(q[:, :, -w:], k, valid, cfg, D ** -0.5, None), ref)
    qb, kb = q.to(torch.bfloat16), k.to(torch.bfloat16)
    _check(window_scores_triton(qb, kb, valid, cfg, D ** -0.5, 20.0),
           window_scores(qb, kb, valid, cfg, D ** -0.5, 20.0), torch.bfloat16)


@needs_device
def test_streaming_and_no_candidates():
    q, k, valid = _inputs(3, 2, 2, 2, 20, 16, [20, 9])
    cfg = AdaKVConfig(budget=10, window=8, scorer="streaming")
    assert torch.equal(window_scores_triton(q, k, valid, cfg, 0.25), window_scores(q, k, valid, cfg, 0.25))
    cfg = AdaKVConfig(budget=30, window=20)  # n == w: no candidate
    out = window_scores_triton(q, k, valid, cfg, 0.25)
    assert out.shape == (2, 2, 20) and (out == float("-inf")).all()


KEEP_CONFIGS = [
    dict(budget=40),  # adaptive, official safeguard, max pooling 7, mean reduce (the defaults)
    dict(budget=24, allocation="uniform", pooling="avg", kernel_size=5),
    dict(compression_ratio=0.6, safeguard="exact-total", gqa_reduce="max"),
    dict(budget=56, safeguard="kvpress", kernel_size=1, alpha=0.5),
]


@needs_device
@pytest.mark.parametrize("ci", range(len(KEEP_CONFIGS)))
def test_same_kept_sets(ci):
    """keep_mask from the Triton scores equals keep_mask from window_scores on fresh random fp32 inputs
    (max-pooling plateaus are exact ties in both: the same pooled source value, broken by index)."""
    B, Hkv, G, n, D, w = 3, 4, 2, 181, 32, 16
    for seed in range(2):
        q, k, valid = _inputs(1000 + 10 * ci + seed, B, Hkv, G, n, D, [n, 120, 70])
        cfg = AdaKVConfig(window=w, **KEEP_CONFIGS[ci])
        scale = D ** -0.5
        ref = window_scores(q, k, valid, cfg, scale, None)
        out = window_scores_triton(q, k, valid, cfg, scale, None)
        _check(out, ref)
        for layer, layers in ((0, 1), (0, 4)):
            a = keep_mask(out, valid, cfg, layer, layers)
            b = keep_mask(ref, valid, cfg, layer, layers)
            assert torch.equal(a, b), f"kept sets differ at {(a != b).nonzero().tolist()[:8]}"
            assert not a[:, :, : n - w].all()  # something was dropped
