"""Attention sinks (gpt-oss) in the Triton kernels: the store attention (``kernels/triton_attend.py``) and the
fused SnapKV scorer (``kernels/triton_score.py``) against the plain path and the eager oracle.

A sink is a per-query-head logit that joins the softmax as a column with no value (docs/algorithm.md,
"Attention sinks"). Runs under Triton's interpreter on a CPU-only machine (tests/triton_device.py); small
shapes. Inputs are fresh random tensors per case (seeded); sinks are drawn large enough (N(0, 2)) that a
kernel ignoring them, or adding them once per split-K piece, fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, interpreter_subprocess_test, needs_device, triton  # noqa: F401
from adakv_compile import reference  # noqa: E402
from adakv_compile.config import AdaKVConfig  # noqa: E402
from adakv_compile.kernels.attend import store_attention  # noqa: E402
from adakv_compile.kernels.score import window_scores  # noqa: E402
from adakv_compile.kernels.triton_attend import _semaphores, store_attention_triton  # noqa: E402
from adakv_compile.kernels.triton_score import window_scores_triton  # noqa: E402

test_in_interpreter_subprocess = interpreter_subprocess_test(__file__)


def _segments(lengths, D, dtype, seed, gap=3):
    """Random flat pools and [B, Hkv] offsets/lengths (int32) of segments with the given used lengths,
    separated by ``gap`` slots of other data (a kernel reading past a segment's end sees wrong values)."""
    g = torch.Generator().manual_seed(seed)
    B, Hkv = len(lengths), len(lengths[0])
    lens = torch.tensor(lengths, dtype=torch.int32)
    seg = lens.reshape(-1) + gap
    off = (torch.cumsum(seg, 0) - seg + gap).to(torch.int32).reshape(B, Hkv)
    slots = int(seg.sum()) + gap
    pool_k = torch.randn(slots, D, generator=g).to(DEVICE, dtype)
    pool_v = torch.randn(slots, D, generator=g).to(DEVICE, dtype)
    return g, pool_k, pool_v, off.to(DEVICE), lens.to(DEVICE)


def _oracle(q, pool_k, pool_v, off, lens, t, scale, softcap, sinks):
    """reference._masked_attention per (row, query head) over the head's segment; query i of the chunk
    sees the segment's slots < length - t + i + 1."""
    B, Hq, _, D = q.shape
    Hkv = off.shape[1]
    out = torch.zeros(B, Hq, t, D)
    for b in range(B):
        for hq in range(Hq):
            h = hq // (Hq // Hkv)
            o, n = int(off[b, h]), int(lens[b, h])
            allowed = torch.arange(n)[None, :] < (n - t + torch.arange(1, t + 1))[:, None]
            out[b, hq] = reference._masked_attention(
                q[b, hq].cpu(), pool_k[o:o + n].cpu(), pool_v[o:o + n].cpu(), allowed, scale,
                softcap or None, float(sinks[hq]))
    return out


def _close(out, ref, dtype):
    assert out.shape == ref.shape and torch.isfinite(out.float()).all()
    if dtype == torch.float32:
        err = (out.float().cpu() - ref.float().cpu()).abs().max() / ref.float().abs().max()
        assert err < 1e-4, f"max error {err:.3g} relative to max |out|"
    else:
        torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=2e-2, atol=2e-2)


# per (row, KV head) used lengths incl. the chunk: 0 and 1 (nothing / only itself to see), partial and
# several BLOCK_N = 64 blocks
LENGTHS = [[0, 1, 70], [130, 5, 64]]


CASES = [(torch.float32, G, t, cap) for G, t in [(1, 1), (3, 1), (2, 4)] for cap in (0.0, 5.0)] + [
    (torch.bfloat16, 3, 1, 0.0), (torch.bfloat16, 2, 4, 5.0)]


@needs_device
@pytest.mark.parametrize("dtype,G,t,softcap", CASES,
                         ids=[f"{str(c[0])[6:]}-G{c[1]}-t{c[2]}-cap{c[3]:g}" for c in CASES])
def test_store_attention_with_sinks(dtype, G, t, softcap):
    D = 32
    g, pool_k, pool_v, off, lens = _segments(LENGTHS, D, dtype, seed=G * 10 + t + int(softcap))
    B, Hkv = off.shape
    q = torch.randn(B, Hkv * G, t, D, generator=g).to(DEVICE, dtype)
    sinks = (torch.randn(Hkv * G, generator=g) * 2.0).to(DEVICE)
    scale = D ** -0.5 * 3  # sharper than 1/sqrt(D): masking and sink mistakes show
    max_len = max(map(max, LENGTHS))
    plain = store_attention(q, pool_k, pool_v, off, lens, max_len, t, scale, softcap, sinks)
    if dtype == torch.float32:
        _close(plain, _oracle(q, pool_k, pool_v, off, lens, t, scale, softcap, sinks), dtype)
    without = store_attention_triton(q, pool_k, pool_v, off, lens, t, scale, softcap)
    assert (without.float() - plain.float()).abs().max() > 0.1  # the sinks matter at these shapes
    runs = {  # one pass; split-K in equal pieces (some empty); fixed pieces of 64 tokens (static cache mode)
        "one-pass": dict(num_splits=1),
        "split3": dict(num_splits=3),
        "fixed64": dict(max_len_bound=max_len + 70, split_tokens=64),
    }
    if dtype == torch.float32:  # the fused merge (benchmarks): the last piece to arrive merges
        runs["split3-fused"] = dict(num_splits=3, fused_merge=True)
        runs["fixed64-fused"] = dict(max_len_bound=max_len + 70, split_tokens=64, fused_merge=True)
        # fewer programs than pieces: each loops over pieces s, s + 2, ... (with and without the fused merge)
        runs["fixed64-grid2"] = dict(max_len_bound=max_len + 70, split_tokens=64, grid_pieces=2)
        runs["fixed64-grid1-fused"] = dict(max_len_bound=max_len + 70, split_tokens=64, grid_pieces=1,
                                           fused_merge=True)
    for name, kw in runs.items():
        out = store_attention_triton(q, pool_k, pool_v, off, lens, t, scale, softcap, sinks=sinks, **kw)
        assert out.dtype == dtype, name
        _close(out, plain, dtype)
    if dtype == torch.float32:
        fused = store_attention_triton(q, pool_k, pool_v, off, lens, t, scale, softcap, num_splits=3,
                                       fused_merge=True)
        _close(fused, without, dtype)
        assert not _semaphores(1, q.device).any()  # the mergers left their arrival counters zeroed


@needs_device
def test_store_attention_sinks_bad_shape():
    g, pool_k, pool_v, off, lens = _segments([[3, 4]], 16, torch.float32, seed=0)
    q = torch.randn(1, 4, 1, 16, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match="sinks"):
        store_attention_triton(q, pool_k, pool_v, off, lens, 1, 0.25, sinks=torch.zeros(2, device=DEVICE))


def _score_inputs(seed, B, Hkv, G, n, D, n_real, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, n, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, n, D, generator=g).to(DEVICE, dtype)
    valid = (torch.arange(n)[None, :] >= n - torch.tensor(n_real)[:, None]).to(DEVICE)
    sinks = (torch.randn(Hkv * G, generator=g) * 2.0 + 2.0).to(DEVICE)
    return q, k, valid, sinks


def _close_scores(out, ref, tol):
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), "the -inf pattern differs"
    assert (out[~fin] == float("-inf")).all()
    err = ((out - ref)[fin].abs().max() / ref[fin].abs().max()).item()
    assert err <= tol, f"max error {err:.3g} relative to the largest score"


@needs_device
@pytest.mark.parametrize("G,softcap,reduce,pooling,splits", [
    (2, None, "mean", "max", 1), (3, 4.0, "max", "avg", 3), (1, None, "mean", "avg", 2),
], ids=["gqa2-nocap", "gqa3-softcap-split", "mha-split"])
def test_fused_scorer_with_sinks(G, softcap, reduce, pooling, splits):
    """Row 0 whole, row 1 left-padded, row 2 shorter than the window (all -inf)."""
    B, Hkv, n, D, w = 3, 2, 97, 32, 8
    q, k, valid, sinks = _score_inputs(G * 7 + splits, B, Hkv, G, n, D, [n, 60, 6])
    cfg = AdaKVConfig(window=w, kernel_size=5, gqa_reduce=reduce, pooling=pooling)
    scale = D ** -0.5 * 2
    plain = window_scores(q, k, valid, cfg, scale, softcap, sinks)
    _close_scores(plain.cpu(), reference.window_scores(q.cpu(), k.cpu(), valid.cpu(), cfg, scale, softcap,
                                                       sinks.cpu()), 1e-5)
    out = window_scores_triton(q, k, valid, cfg, scale, softcap, sinks=sinks, num_splits=splits, block_n=32)
    _close_scores(out, plain, 1e-5)
    without = window_scores_triton(q, k, valid, cfg, scale, softcap, num_splits=splits, block_n=32)
    fin = torch.isfinite(plain)
    assert ((without - plain)[fin].abs().max() / plain[fin].abs().max()) > 1e-2  # the sinks matter here
