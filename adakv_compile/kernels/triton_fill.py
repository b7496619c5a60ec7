"""Triton compaction for the static cache's prefill: the segment layout, then only the kept tokens written.

``fill_static``'s plain path sends every dropped token to one trash slot with ``index_copy_``; on a GPU those
hundreds of thousands of writes to one address serialise (~0.75 ms per tensor per layer at 1 x 32k on an
H200, most of the compress op's time). Here program (block of tokens) loads each token's destination and
stores K, V and the position only where the token is kept: no trash writes, no contention.

The destinations come from ``segment_slots``: a kept token's slot is its segment's start plus the number of
kept tokens before it in its (row, head), a prefix count over the prompt. Written as ``torch.cumsum``, Inductor
(torch 2.11, CUDA) lowered that long, few-row int64 scan as a ``SplitScan`` whose code generation failed
(issue 17, failure 1); here one program per (row, head) walks the prompt in blocks with ``tl.cumsum`` inside a
block and a running count between blocks, so the traced body holds no Inductor scan at all. Every int
argument is int32-safe by construction (``triton_args``: issue 17, failure 2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_args import int32, wide_mul, wide_strides


@triton.jit
def _scatter_kept_kernel(K, V, DEST, PK, PV, POS,
                         s_kb_hi, s_kb_lo, s_kh_hi, s_kh_lo, s_kn, s_kd,
                         s_vb_hi, s_vb_lo, s_vh_hi, s_vh_lo, s_vn, s_vd,
                         H, N, TOTAL, D,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    inside = r < TOTAL
    dest = tl.load(DEST + r, mask=inside, other=-1)
    ok = inside & (dest >= 0)
    b = r // (H * N)
    h = (r // N) % H
    i = r % N
    d = tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (d < D)[None, :]
    k_row = wide_mul(b, s_kb_hi, s_kb_lo) + wide_mul(h, s_kh_hi, s_kh_lo) + i * s_kn
    v_row = wide_mul(b, s_vb_hi, s_vb_lo) + wide_mul(h, s_vh_hi, s_vh_lo) + i * s_vn
    k = tl.load(K + k_row[:, None] + d[None, :] * s_kd, mask=m2)
    v = tl.load(V + v_row[:, None] + d[None, :] * s_vd, mask=m2)
    tl.store(PK + dest[:, None] * D + d[None, :], k.to(PK.dtype.element_ty), mask=m2)
    tl.store(PV + dest[:, None] * D + d[None, :], v.to(PV.dtype.element_ty), mask=m2)
    tl.store(POS + dest, i.to(tl.int32), mask=ok)


@triton.jit
def _segment_slots_kernel(KEEP, COUNTS, DEST, START, H, N, ROOM, SLOTS,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row b, head h): START[b, h] = b * SLOTS + sum over heads h' < h of (COUNTS[b, h'] + ROOM);
    DEST[b, h, i] = START[b, h] + (kept tokens before i) where token i is kept, else -1."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    hh = tl.arange(0, BLOCK_H)
    before = hh < h
    c = tl.load(COUNTS + b * H + hh, mask=before, other=0).to(tl.int64)
    start = b * SLOTS + tl.sum(tl.where(before, c + ROOM, 0), 0)
    tl.store(START + pid, start)
    base = pid.to(tl.int64) * N
    run = start - 1  # slot of the last kept token so far
    for s in range(0, N, BLOCK_N):
        i = s + tl.arange(0, BLOCK_N)
        inside = i < N
        kept = tl.load(KEEP + base + i, mask=inside, other=0) != 0
        ones = kept.to(tl.int32)
        tl.store(DEST + base + i, tl.where(kept, run + tl.cumsum(ones, 0), -1), mask=inside)
        run += tl.sum(ones, 0)


def segment_slots(keep: torch.Tensor, counts: torch.Tensor, room: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dest [B*H*n] int64, start [B, H] int64)`` of ``keep`` [B, H, n] bool with ``counts`` = ``keep.sum(-1)``:
    segments laid out per row in head order, each ``counts + room`` slots, row b's from ``b * slots``; ``dest``
    is a kept token's slot (in position order within its segment), -1 for a dropped one."""
    B, H, n = keep.shape
    keep = keep.contiguous()
    counts = counts.contiguous()
    dest = torch.empty((B * H * n,), dtype=torch.int64, device=keep.device)
    start = torch.empty((B, H), dtype=torch.int64, device=keep.device)
    H, n, room, slots = int32(H=H, n=n, room=room, slots=slots)
    block_n = 1024 if keep.is_cuda else 64
    from .triton_attend import launcher  # wrap_triton when traced (prefill_compress's body)

    launcher(_segment_slots_kernel, keep)[(B * H,)](
        keep, counts, dest, start, H, n, room, slots,
        BLOCK_H=max(2, triton.next_power_of_2(H)), BLOCK_N=block_n, num_warps=4)
    return dest, start


def scatter_kept(k: torch.Tensor, v: torch.Tensor, dest: torch.Tensor, pool_k: torch.Tensor,
                 pool_v: torch.Tensor, pos: torch.Tensor) -> None:
    """k/v [B, H, n, D] → pools at ``dest`` [B*H*n] (int64 slot, -1 = dropped); ``pos`` gets the token's index."""
    B, H, n, D = k.shape
    H, n, total, D = int32(H=H, n=n, total=B * H * n, D=D)
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(1, 4096 // block_d)
    from .triton_attend import launcher  # wrap_triton when traced (prefill_compress's body)

    launcher(_scatter_kept_kernel, k)[(triton.cdiv(total, block_r),)](
        k, v, dest, pool_k, pool_v, pos, *wide_strides("k.stride", k.stride()),
        *wide_strides("v.stride", v.stride()), H, n, total, D,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
