"""Triton store attention (``kernels/triton_attend.py``) against the plain path (``attend.store_attention``).

On a CPU-only machine the kernel runs through Triton's interpreter (``TRITON_INTERPRET=1``, set here
before triton is first imported); on a CUDA machine the same comparisons run on the GPU. Shapes are small:
the interpreter executes every block op in numpy.

Triton reads ``TRITON_INTERPRET`` when ``triton`` itself is imported. If another test module imported it
first (in GPU mode) on a CPU-only machine, the in-process tests skip and one test reruns this file in a
fresh interpreter-mode subprocess instead.
"""
from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, interpreter_subprocess_test, needs_device, triton  # noqa: F401
from adakv_compile.kernels import store  # noqa: E402
from adakv_compile.kernels.attend import store_attention  # noqa: E402
from adakv_compile.kernels.triton_attend import (  # noqa: E402
    default_config, is_interpreted, store_attention_triton)

test_in_interpreter_subprocess = interpreter_subprocess_test(__file__)


# kept tokens per (row, KV head) before the chunk: skewed like Ada-KV budgets. With D <= 128 the kernel
# streams BLOCK_N = 64 slots a step: 5 and 33 fit in one partial block, 190 spans three full blocks + a tail.
SKEWED = [[5, 64, 190], [130, 33, 77]]
N_CTX = 200


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


class _Case:
    pass


def _store(kept, D, dtype, t, seed, n_ctx=N_CTX):
    """A store built from fresh random K/V with a random keep mask of the given per-head sizes, plus a chunk.

    ``off``/``lens``: int32 device views of the header, as ``store.append`` returns them (what the op
    passes); ``off64``/``lens64``: int64 copies from ``store.read_layout``; ``max_len``: host bound.
    """
    g = torch.Generator().manual_seed(seed)
    B, Hkv = len(kept), len(kept[0])
    k = _randn(g, B, Hkv, n_ctx, D, dtype=dtype)
    v = _randn(g, B, Hkv, n_ctx, D, dtype=dtype)
    keep = torch.zeros(B, Hkv, n_ctx, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            keep[b, h, torch.randperm(n_ctx, generator=g)[: kept[b][h]]] = True
    kv, vv = store.build(k, v, keep.to(DEVICE), reserve=2)
    k_new = _randn(g, B, Hkv, t, D, dtype=dtype)
    v_new = _randn(g, B, Hkv, t, D, dtype=dtype)
    c = _Case()
    # t = 4 > reserve: also exercises a re-layout
    c.pool_k, c.pool_v, c.off, c.lens, meta = store.append(kv, vv, k_new, v_new)
    c.max_len = meta.max_len
    L = kv.shape[2] + t
    kv = store.make_view(store.pool_of(kv), B, Hkv, L, D)
    _, lay = store.read_layout(kv)
    c.off64, c.lens64 = lay.offsets, lay.lengths
    assert c.lens64.tolist() == [[n + t for n in row] for row in kept] and c.max_len == max(map(max, kept)) + t
    assert c.off.dtype == torch.int32 and c.off.tolist() == c.off64.tolist()
    c.B, c.Hkv, c.g = B, Hkv, g
    return c


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out.float()).all()
    if dtype == torch.float32:
        err = (out - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, f"max error {err:.3g} relative to max |out|"
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 3], ids=["mha", "gqa3"])
@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["nocap", "softcap"])
def test_matches_plain_path(dtype, G, t, softcap):
    D = 64
    c = _store(SKEWED, D, dtype, t, seed=G * 10 + t)
    assert default_config(D, G * t)[1] == 64  # the lengths above are chosen for BLOCK_N = 64
    q = _randn(c.g, c.B, c.Hkv * G, t, D, dtype=dtype)
    scale = D ** -0.5 * 3  # sharper softmax than 1/sqrt(D), so masking mistakes show
    ref = store_attention(q, c.pool_k, c.pool_v, c.off, c.lens, c.max_len, t, scale, softcap)
    out = store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, t, scale, softcap,
                                 max_len_hint=c.max_len)
    _check(out, ref, dtype)
    # split-K (flash-decoding) path: 3 pieces per segment, some empty for the short heads
    out_s = store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, t, scale, softcap, num_splits=3)
    _check(out_s, ref, dtype)
    # fixed-size pieces (the static cache's mode): 64 and 128 tokens a piece, many pieces empty
    for piece in (64, 128):
        out_f = store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, t, scale, softcap,
                                       max_len_bound=c.max_len + 70, split_tokens=piece)
        _check(out_f, ref, dtype)


@needs_device
@pytest.mark.parametrize("fused", [False, True], ids=["merge", "fused"])
def test_launcher_default_pieces_on_a_many_sm_card(monkeypatch, fused):
    """The static cache's launch (a row bound, no overrides) as it runs on a 132-SM card: pieces of
    ``MIN_PIECE`` tokens (``fixed_piece_tiles``; BLOCK_N 128 with the fused merge, 64 with the merge
    launch), heads spanning 1-3 pieces and most pieces of the row bound empty; the output equals the plain
    path with and without the fused merge."""
    from adakv_compile.kernels import triton_attend
    import tests.sm90_target as sm90

    monkeypatch.setattr(triton_attend, "_sm_count", lambda device: 132)
    t, G, D = 1, 4, 64
    c = _store([[300, 5, 590], [130, 520, 77]], D, torch.float32, t, seed=77, n_ctx=600)
    q = _randn(c.g, c.B, c.Hkv * G, t, D)
    scale = D ** -0.5 * 3
    bound = 3 * 600
    ref = store_attention(q, c.pool_k, c.pool_v, c.off, c.lens, c.max_len, t, scale, 0.0)
    sem = torch.zeros(triton_attend.merge_counters(c.B, c.Hkv, c.Hkv * G, t, D), dtype=torch.int32, device=DEVICE)
    kw = dict(fused_merge=True, semaphores=sem) if fused else {}
    out = store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, t, scale, 0.0, max_len_bound=bound, **kw)
    _check(out, ref, torch.float32)
    assert not sem.any()  # the fused merge leaves its counters zeroed for the next launch
    launches = []
    monkeypatch.setattr(triton_attend, "launcher", sm90.capturing_launcher(launches))
    store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, t, scale, 0.0, max_len_bound=bound, **kw)
    args = launches[0][1]
    assert (args["CHUNK"], args["BLOCK_N"]) == (triton_attend.MIN_PIECE, 128 if fused else 64)
    assert args["NUM_SPLITS"] == -(-bound // triton_attend.MIN_PIECE) and args["FUSED_MERGE"] == fused
    assert len(launches) == (1 if fused else 2)


def _captured_launches(monkeypatch, seed: int, **kw) -> list:
    """The kernel launches (kernel, {argument: value}) of one fixed-piece call (row bound 2048) on a 132-SM
    card, captured instead of run."""
    from adakv_compile.kernels import triton_attend
    import tests.sm90_target as sm90

    monkeypatch.setattr(triton_attend, "_sm_count", lambda device: 132)
    launches = []
    monkeypatch.setattr(triton_attend, "launcher", sm90.capturing_launcher(launches))
    c = _store(SKEWED, 64, torch.float32, 1, seed=seed)
    q = _randn(c.g, c.B, c.Hkv * 2, 1, 64)
    store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, 1, 0.125, max_len_bound=2048, **kw)
    return launches


@needs_device
def test_tiles_follow_the_merge_that_launches(monkeypatch):
    """``fused_merge`` asked for with counters too small for the launch: the merge launch runs, with the
    merge launch's tiles (BLOCK_N 64), not the fused merge's."""
    from adakv_compile.kernels.triton_attend import MIN_PIECE

    too_few = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    launches = _captured_launches(monkeypatch, 6, fused_merge=True, semaphores=too_few)
    assert len(launches) == 2 and not launches[0][1]["FUSED_MERGE"]
    assert (launches[0][1]["CHUNK"], launches[0][1]["BLOCK_N"]) == (MIN_PIECE, 64)


@needs_device
@pytest.mark.parametrize("piece", [64, 256, 1024])
def test_given_piece_size_is_kept(monkeypatch, piece):
    """A caller's ``split_tokens`` is the piece size launched (the tiles follow it: a 64-token piece is not
    rounded up to a 128-slot block), with the fused merge and the launcher's other choices."""
    sem = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    args = _captured_launches(monkeypatch, 5, split_tokens=piece, fused_merge=True, semaphores=sem)[0][1]
    assert args["CHUNK"] == piece and args["NUM_SPLITS"] == 2048 // piece
    assert piece % args["BLOCK_N"] == 0


@needs_device
@pytest.mark.parametrize("merge_stages", [0, 2, 3])
def test_pipelined_merge_matches_plain_path(merge_stages):
    """``merge_stages`` only changes how the merge launch loads the pieces, never what it computes."""
    t, G, D = 1, 4, 64
    c = _store(SKEWED, D, torch.float32, t, seed=40 + merge_stages)
    q = _randn(c.g, c.B, c.Hkv * G, t, D)
    ref = store_attention(q, c.pool_k, c.pool_v, c.off, c.lens, c.max_len, t, D ** -0.5 * 3, 0.0)
    for kw in (dict(num_splits=3), dict(max_len_bound=c.max_len + 70, split_tokens=64)):
        out = store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, t, D ** -0.5 * 3, 0.0,
                                     merge_stages=merge_stages, **kw)
        _check(out, ref, torch.float32)


def test_merge_stages_must_be_a_count():
    q = torch.randn(1, 2, 1, 16)
    z = torch.zeros(1, 1, dtype=torch.int32)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="merge_stages"):
            store_attention_triton(q, torch.randn(4, 16), torch.randn(4, 16), z, z, 1, 0.25, merge_stages=bad)


@needs_device
@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_head_dims_int64_layout_strided_q(D):
    t, G = 2, 3
    c = _store([[9, 70, 40], [3, 21, 100]], D, torch.float32, t, seed=D)
    q = _randn(c.g, c.B, t, c.Hkv * G, D).transpose(1, 2)  # [B, Hq, t, D], not contiguous
    ref = store_attention(q, c.pool_k, c.pool_v, c.off, c.lens, c.max_len, t, D ** -0.5, 0.0)
    out = store_attention_triton(q, c.pool_k, c.pool_v, c.off64, c.lens64, t, D ** -0.5, 0.0,
                                 num_splits=2 if D == 80 else 1)
    _check(out, ref, torch.float32)


@needs_device
def test_more_splits_than_blocks_and_large_group():
    """Many empty split pieces; G * t = 24 rows (more than one 16-row MMA tile, still one row block)."""
    t, G, D = 4, 6, 64
    c = _store([[2, 17]], D, torch.float32, t, seed=7)
    q = _randn(c.g, 1, 2 * G, t, D)
    ref = store_attention(q, c.pool_k, c.pool_v, c.off, c.lens, c.max_len, t, 0.2, 30.0)
    out = store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, t, 0.2, 30.0, num_splits=6)
    _check(out, ref, torch.float32)


@needs_device
def test_several_row_blocks():
    """G * t = 80 rows > BLOCK_M = 64: rows are tiled over the grid's second axis."""
    t, G, D = 20, 4, 16
    c = _store([[30], [3]], D, torch.float32, t, seed=3)
    q = _randn(c.g, 2, G, t, D)
    ref = store_attention(q, c.pool_k, c.pool_v, c.off, c.lens, c.max_len, t, 0.3, 0.0)
    out = store_attention_triton(q, c.pool_k, c.pool_v, c.off, c.lens, t, 0.3, 0.0)
    _check(out, ref, torch.float32)
