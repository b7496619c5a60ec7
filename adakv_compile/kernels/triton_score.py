"""Triton SnapKV window scores (same result as ``score.window_scores``, docs/algorithm.md, Scores).

``window_scores`` builds the fp32 logits ``[B, Hkv, G*w, n]`` of the window queries against every key
(plus a fp32 copy of K, the mask and the softmax output, all of that size). This module never
materialises them: the scores are computed block by block from Q and K as they are stored.

Kernel design
-------------
Notation: ``m = n - w`` candidate columns; the ``R = G * w`` window queries of a KV group are its rows
(row ``g * w + i`` = query head ``h * G + g``, window query ``i`` at key position ``m + i``).

* Rows are tiled ``[HB heads, WB window queries]`` (powers of two; ``HB * WB`` rows, at least 16 for
  ``tl.dot``), so one ``tl.dot`` scores a tile of the group's rows against a block of keys; K is read as
  ``[B, Hkv, n, D]`` and never repeated to the query heads. Rows past ``G`` / ``w`` are masked.
* Pass A (``_score_stats``), grid ``(B * Hkv, row tiles, splits)``: the softmax statistics of every row
  over all keys: running max and sum of ``exp`` (online softmax over ``BLOCK_N``-key blocks, natural
  ``exp`` as the reference). Keys are cut into ``splits`` ``BLOCK_N``-aligned pieces when there are few
  (row, head) programs; ``_score_merge`` then merges the pieces' (max, sum) per row. Masks: padding keys,
  causal inside the window (query ``m + i`` sees keys ``j <= m + i``), soft-capping before masking.
* Pass B (``_score_reduce``), grid ``(B * Hkv, cdiv(m, BLOCK_N))``: one block of candidate keys (causal is
  always satisfied there), loaded once; for every row tile the logits are recomputed,
  ``p = exp(x - max) / sum`` (0 on padding keys), summed over the window queries of each head and
  divided by ``w`` (the window mean), then reduced over the ``G`` heads: mean or max. Writes the reduced
  scores ``[B, Hkv, m]`` (fp32). Attention sinks (optional ``sinks`` [Hq], gpt-oss): the head's sink logit
  joins each row's (max, sum) here, once per row (pass A and the merge are unchanged), so the
  probabilities are those the model computes, sink column included (docs/algorithm.md).
* ``_score_pool``, grid ``(B * Hkv, cdiv(n, BLOCK))``: the pooling of the reduced scores (as
  ``max_pool1d`` / ``avg_pool1d`` in ``window_scores``: stride 1, padding ``kernel_size // 2``, -inf /
  zero padding, ``count_include_pad``), then -inf on padding and window columns, written as the output.

Memory: the reduced and output scores (about ``2 * B * Hkv * n`` fp32) and the statistics
(``2 * B * Hq * w * (splits + 1)`` fp32), against ``window_scores``'s several ``B * Hq * w * n`` fp32 tensors
(logits, mask, probabilities) plus the fp32 copy of K (``B * Hkv * n * D``) for half inputs.

Numerics: fp32 inputs use ``FP32_DOT`` dot products on the GPU (tf32x3) and exact fp32 in the interpreter;
bf16/fp16 inputs use the native dot with fp32 accumulation
(bf16 products are exact in fp32, as in the reference's cast-then-matmul). The result equals
``window_scores`` up to fp32 rounding (summation order of the dot, the online softmax and the means).
No host synchronisation: everything is launched from host-known sizes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import AdaKVConfig
from .score import scores_without_attention
from .triton_args import int32, wide_mul, wide_strides
from .triton_attend import _interpreting, _sm_count, checked_sinks, is_interpreted, launcher


@triton.jit
def _tanh_acc(x):
    """tanh with a small relative error everywhere (interpreter-friendly, no libdevice): an odd Taylor
    polynomial for |x| < 1/8, ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` elsewhere."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _logits(q, kt, scale, softcap, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    if DOT_F32:  # interpreter: bf16 tl.dot is unsupported there (triton-lang/triton#11584)
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, kt, input_precision=DOT_PREC)
    s = s * scale
    if SOFTCAP:
        s = _tanh_acc(s / softcap) * softcap
    return s


@triton.jit
def _score_stats(
    Q, K, VALID, WS_M, WS_L,
    sqb_hi, sqb_lo, sqh_hi, sqh_lo, sqn, sqd,
    skb_hi, skb_lo, skh_hi, skh_lo, skn, skd,
    svb, svn,
    HKV, G, W, N, M_CAND, Q_OFF, R, N_WC, NUM_SPLITS, PER_SPLIT,
    scale, softcap,
    D: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    hs = pid_t // N_WC
    wc = pid_t % N_WC

    r = tl.arange(0, HB * WB)
    g = hs * HB + r // WB
    i = wc * WB + r % WB
    row_ok = (g < G) & (i < W)
    qpos = M_CAND + i  # the window query's key position
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_ptrs = (Q + wide_mul(b, sqb_hi, sqb_lo) + wide_mul((h * G + g.to(tl.int64))[:, None], sqh_hi, sqh_lo)
              + (Q_OFF + i.to(tl.int64))[:, None] * sqn + d[None, :] * sqd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64 scalars
    softcap = tl.cast(softcap, tl.float32)
    lo = pid_s * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, N)
    m_i = tl.full([HB * WB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB * WB], tl.float32)
    k_head = K + wide_mul(b, skb_hi, skb_lo) + wide_mul(h, skh_hi, skh_lo)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        kt = tl.load(k_head + j[None, :].to(tl.int64) * skn + d[:, None] * skd,
                     mask=d_ok[:, None] & j_ok[None, :], other=0.0)
        vld = tl.load(VALID + b * svb + j.to(tl.int64) * svn, mask=j_ok, other=0) != 0
        s = _logits(q, kt, scale, softcap, SOFTCAP, DOT_PREC, DOT_F32)
        vis = (j[None, :] <= qpos[:, None]) & vld[None, :] & row_ok[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), 1)
        m_i = m_new

    ws = (pid_bh * NUM_SPLITS + pid_s).to(tl.int64) * R + g * W + i
    tl.store(WS_M + ws, m_i, mask=row_ok)
    tl.store(WS_L + ws, l_i, mask=row_ok)


@triton.jit
def _score_merge(WS_M, WS_L, ST_M, ST_L, R, NUM_SPLITS, BLOCK_R: tl.constexpr):
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_R], tl.float32)
    for s in range(0, NUM_SPLITS):
        ws = (pid_bh * NUM_SPLITS + s).to(tl.int64) * R + rows
        m_s = tl.load(WS_M + ws, mask=ok, other=float("-inf"))
        l_s = tl.load(WS_L + ws, mask=ok, other=0.0)
        m_new = tl.maximum(m_t, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_t = l_t * tl.exp(m_t - m_use) + l_s * tl.exp(m_s - m_use)
        m_t = m_new
    out = pid_bh.to(tl.int64) * R + rows
    tl.store(ST_M + out, m_t, mask=ok)
    tl.store(ST_L + out, l_t, mask=ok)


@triton.jit
def _score_reduce(
    Q, K, VALID, ST_M, ST_L, RED, SINKS,
    sqb_hi, sqb_lo, sqh_hi, sqh_lo, sqn, sqd,
    skb_hi, skb_lo, skh_hi, skh_lo, skn, skd,
    svb, svn,
    HKV, G, W, M_CAND, Q_OFF, R, N_HS, N_WC,
    scale, softcap,
    D: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, GQA_MAX: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    HAS_SINK: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < M_CAND  # candidate columns only: every window query sees them (causal holds)
    kt = tl.load(K + wide_mul(b, skb_hi, skb_lo) + wide_mul(h, skh_hi, skh_lo) + j[None, :].to(tl.int64) * skn
                 + d[:, None] * skd, mask=d_ok[:, None] & j_ok[None, :], other=0.0)
    vld = tl.load(VALID + b * svb + j.to(tl.int64) * svn, mask=j_ok, other=0) != 0

    scale = tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    r = tl.arange(0, HB * WB)
    red = tl.zeros([BLOCK_N], tl.float32)
    for hs in range(0, N_HS):
        hsum = tl.zeros([HB, BLOCK_N], tl.float32)
        for wc in range(0, N_WC):
            g = hs * HB + r // WB
            i = wc * WB + r % WB
            row_ok = (g < G) & (i < W)
            q_ptrs = (Q + wide_mul(b, sqb_hi, sqb_lo) + wide_mul((h * G + g.to(tl.int64))[:, None], sqh_hi, sqh_lo)
                      + (Q_OFF + i.to(tl.int64))[:, None] * sqn + d[None, :] * sqd)
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            st = pid_bh.to(tl.int64) * R + g * W + i
            m_r = tl.load(ST_M + st, mask=row_ok, other=float("-inf"))
            l_r = tl.load(ST_L + st, mask=row_ok, other=0.0)
            if HAS_SINK:  # the head's sink logit joins each row's softmax: one more column, never a score
                sk = tl.load(SINKS + h * G + g.to(tl.int64), mask=row_ok, other=0.0).to(tl.float32)
                m_s = tl.maximum(m_r, sk)
                m_su = tl.where(m_s == float("-inf"), 0.0, m_s)
                l_r = l_r * tl.exp(m_r - m_su) + tl.exp(sk - m_su)
                m_r = m_s
            # rows with no visible key (max -inf, sum 0) exist only in rows without valid candidates
            m_r = tl.where(m_r == float("-inf"), 0.0, m_r)
            l_r = tl.where(l_r == 0.0, 1.0, l_r)
            s = _logits(q, kt, scale, softcap, SOFTCAP, DOT_PREC, DOT_F32)
            p = tl.exp(s - m_r[:, None]) / l_r[:, None]
            p = tl.where(row_ok[:, None] & vld[None, :], p, 0.0)
            hsum += tl.sum(tl.reshape(p, [HB, WB, BLOCK_N]), 1)
        hmean = hsum / W  # window mean per head; heads past G are 0 (scores are >= 0: neutral for max)
        if GQA_MAX:
            red = tl.maximum(red, tl.max(hmean, 0))
        else:
            red += tl.sum(hmean, 0)
    if not GQA_MAX:
        red = red / G
    tl.store(RED + pid_bh.to(tl.int64) * M_CAND + j, red, mask=j_ok)


@triton.jit
def _score_pool(RED, VALID, OUT, HKV, N, M_CAND, svb, svn, KS, PAD,
                MAX_POOL: tl.constexpr, BLOCK: tl.constexpr):
    """``max_pool1d`` / ``avg_pool1d`` (stride 1, padding PAD, count_include_pad) of the reduced scores
    [B*Hkv, m], summed in window order as PyTorch does; -inf on padding and window columns; [B*Hkv, n]."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cand = j < M_CAND
    base = RED + pid_bh.to(tl.int64) * M_CAND
    if MAX_POOL:
        acc = tl.full([BLOCK], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
    for t in range(0, KS):
        src = j - PAD + t
        ok = cand & (src >= 0) & (src < M_CAND)
        if MAX_POOL:
            acc = tl.maximum(acc, tl.load(base + src, mask=ok, other=float("-inf")))
        else:
            acc += tl.load(base + src, mask=ok, other=0.0)
    if not MAX_POOL:
        acc = acc / KS
    vld = tl.load(VALID + b * svb + j.to(tl.int64) * svn, mask=cand, other=0) != 0
    tl.store(OUT + pid_bh.to(tl.int64) * N + j, tl.where(cand & vld, acc, float("-inf")), mask=j < N)


# input_precision of fp32 dots on the GPU: "tf32x3" (three TF32 products, ~fp32 accuracy: 8e-7 relative
# error on the scores and the same kept sets at 2x8k on an H200, 34x faster than "ieee", which is exact
# fp32 FMA without tensor cores). The interpreter always does exact fp32 dots.
FP32_DOT = "tf32x3"


def tiles(G: int, w: int, max_rows: int = 128) -> tuple[int, int]:
    """(HB, WB): heads and window queries per row tile (powers of two, HB * WB in [16, max_rows])."""
    wb = min(triton.next_power_of_2(w), max_rows)
    hb = max(1, min(triton.next_power_of_2(G), max_rows // wb))
    if hb * wb < 16:
        wb = 16 // hb
    return hb, wb


def default_config(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of both passes."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    return block_n, 4, 2  # H200 sweep (bench/score_kernel.py --sweep): 4 warps beat 8 at 1x32k..8x32k


def choose_splits(programs: int, n: int, block_n: int, device: torch.device, min_keys: int = 512) -> int:
    """Key pieces of pass A: about two programs per SM, pieces of at least ``min_keys`` keys."""
    sms = _sm_count(device)
    if sms <= 1:
        return 1
    want = math.ceil(2 * sms / max(1, programs))
    return int(max(1, min(want, n // max(min_keys, block_n))))


def window_scores_triton(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig,
                         scale: float, softcap: float | None = None, *, block_n: int | None = None,
                         num_warps: int | None = None, num_stages: int | None = None,
                         num_splits: int | None = None, row_tile: int = 128,
                         sinks: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV scores [B, Hkv, n] (fp32), as ``score.window_scores``, without the [B, Hq, w, n] logits.

    ``q`` [B, Hq, tq, D] with ``tq >= window``: its last ``window`` rows are the window queries (the full
    prompt's q, as ``window_scores`` takes, or just ``q[:, :, -window:]``); ``k`` [B, Hkv, n, D] (any
    strides); ``valid`` [B, n] bool. ``block_n`` / ``num_warps`` / ``num_stages`` / ``num_splits`` /
    ``row_tile`` (most query rows per ``tl.dot`` tile) override the heuristics (tests, benchmarks).
    ``sinks`` (optional [Hq] logits, gpt-oss): each window query's softmax gets its head's sink column
    (not scaled, not soft-capped), dropped before the mean (docs/algorithm.md, "Attention sinks"); it
    enters pass B only, as one more term of each row's (max, sum). No host synchronisation.
    """
    B, Hq, tq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    w = config.window
    m = n - w
    fixed = scores_without_attention(valid, config, Hkv, n)
    if fixed is not None:
        return fixed
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if tq < w:
        raise ValueError(f"q has {tq} rows, fewer than the window ({w})")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported by the Triton scorer")
    if q.device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "window_scores_triton got CPU tensors but its kernels were compiled for the GPU: set "
            "TRITON_INTERPRET=1 before triton is first imported to run them on CPU")
    G = Hq // Hkv
    sinks = checked_sinks(sinks, Hq, q)
    R = G * w
    n_bh = B * Hkv
    dev = q.device
    # valid goes to the kernels as it is: Triton loads bool pointers (a uint8 view would not lower in Inductor)

    hb, wb = tiles(G, w, row_tile)
    n_hs, n_wc = triton.cdiv(G, hb), triton.cdiv(w, wb)
    block_d = max(16, triton.next_power_of_2(D))
    bn, nw, ns = default_config(D, dev)
    block_n = block_n or bn
    num_warps = num_warps or nw
    num_stages = num_stages or ns
    interp = _interpreting(dev)
    dot_prec = FP32_DOT if k.dtype == torch.float32 else "tf32"  # (ignored for half inputs)
    cap = float(softcap) if softcap else 1.0
    common = dict(D=D, HB=hb, WB=wb, BLOCK_N=block_n, BLOCK_D=block_d, SOFTCAP=bool(softcap),
                  DOT_PREC=dot_prec, DOT_F32=interp)
    # int arguments Inductor can type (triton_args: batch/head strides as int32 halves, the rest checked)
    strides = (*wide_strides("q.stride", q.stride()), *wide_strides("k.stride", k.stride()),
               *int32(valid_stride0=valid.stride(0), valid_stride1=valid.stride(1)))
    int32(n=n, R=R, tq=tq, n_bh=n_bh)

    # pass A: per-row softmax statistics over all keys
    if num_splits is None:
        num_splits = choose_splits(n_bh * n_hs * n_wc, n, block_n, dev)
    per = triton.cdiv(triton.cdiv(n, max(1, int(num_splits))), block_n) * block_n
    num_splits = triton.cdiv(n, per)
    ws_m = torch.empty((n_bh * num_splits * R,), dtype=torch.float32, device=dev)
    ws_l = torch.empty_like(ws_m)
    launcher(_score_stats, q)[(n_bh, n_hs * n_wc, num_splits)](
        q, k, valid, ws_m, ws_l, *strides,
        Hkv, G, w, n, m, tq - w, R, n_wc, num_splits, per,
        float(scale), cap, **common, num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        st_m = torch.empty((n_bh * R,), dtype=torch.float32, device=dev)
        st_l = torch.empty_like(st_m)
        block_r = min(1024, max(16, triton.next_power_of_2(R)))
        launcher(_score_merge, q)[(n_bh, triton.cdiv(R, block_r))](
            ws_m, ws_l, st_m, st_l, R, num_splits, BLOCK_R=block_r, num_warps=4)
    else:
        st_m, st_l = ws_m, ws_l

    # pass B: normalised probabilities of the candidate columns, window mean, GQA reduction
    red = torch.empty((B, Hkv, m), dtype=torch.float32, device=dev)
    launcher(_score_reduce, q)[(n_bh, triton.cdiv(m, block_n))](
        q, k, valid, st_m, st_l, red, q if sinks is None else sinks, *strides,
        Hkv, G, w, m, tq - w, R, n_hs, n_wc,
        float(scale), cap, GQA_MAX=config.gqa_reduce == "max", HAS_SINK=sinks is not None, **common,
        num_warps=num_warps, num_stages=num_stages,
    )

    # pooling of the reduced scores, -inf on padding and window columns: one pass writing the output
    out = torch.empty((B, Hkv, n), dtype=torch.float32, device=dev)
    block_p = 1024 if dev.type == "cuda" else 256
    launcher(_score_pool, q)[(n_bh, triton.cdiv(n, block_p))](
        red, valid, out, Hkv, n, m, valid.stride(0), valid.stride(1),
        config.kernel_size, config.kernel_size // 2,
        MAX_POOL=config.pooling == "max", BLOCK=block_p, num_warps=4,
    )
    return out
