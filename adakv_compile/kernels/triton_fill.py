"""Triton compaction for the static cache's prefill: write only the kept tokens into the pools.

``fill_static``'s plain path sends every dropped token to one trash slot with ``index_copy_``; on a GPU those
hundreds of thousands of writes to one address serialise (~0.75 ms per tensor per layer at 1 x 32k on an
H200, most of the compress op's time). Here program (block of tokens) loads each token's destination and
stores K, V and the position only where the token is kept: no trash writes, no contention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scatter_kept_kernel(K, V, DEST, PK, PV, POS,
                         s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                         H, N, TOTAL, D,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    inside = r < TOTAL
    dest = tl.load(DEST + r, mask=inside, other=-1)
    ok = inside & (dest >= 0)
    b = r // (H * N)
    h = (r // N) % H
    i = r % N
    d = tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (d < D)[None, :]
    k = tl.load(K + b[:, None] * s_kb + h[:, None] * s_kh + i[:, None] * s_kn + d[None, :] * s_kd, mask=m2)
    v = tl.load(V + b[:, None] * s_vb + h[:, None] * s_vh + i[:, None] * s_vn + d[None, :] * s_vd, mask=m2)
    tl.store(PK + dest[:, None] * D + d[None, :], k.to(PK.dtype.element_ty), mask=m2)
    tl.store(PV + dest[:, None] * D + d[None, :], v.to(PV.dtype.element_ty), mask=m2)
    tl.store(POS + dest, i.to(tl.int32), mask=ok)


def scatter_kept(k: torch.Tensor, v: torch.Tensor, dest: torch.Tensor, pool_k: torch.Tensor,
                 pool_v: torch.Tensor, pos: torch.Tensor) -> None:
    """k/v [B, H, n, D] → pools at ``dest`` [B*H*n] (int64 slot, -1 = dropped); ``pos`` gets the token's index."""
    B, H, n, D = k.shape
    total = B * H * n
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(1, 4096 // block_d)
    from .triton_attend import launcher  # wrap_triton when traced (prefill_compress's body)

    launcher(_scatter_kept_kernel, k)[(triton.cdiv(total, block_r),)](
        k, v, dest, pool_k, pool_v, pos, *k.stride(), *v.stride(), H, n, total, D,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
