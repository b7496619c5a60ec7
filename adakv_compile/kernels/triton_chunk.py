"""The chunk write of the append kernels (``triton_append``). (It was shared with a fused append in the
store attention, removed in issue 17: it lost on the H200, docs/design.md "Fused append".)"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _write_chunk(PK, PV, KN, VN, POS, b, h, first_slot, first_pos,
                 skb, skh, skt, skd, svb, svh, svt, svd, T, D, BLOCK_D: tl.constexpr):
    """Token i of (b, h)'s chunk → pool slot ``first_slot + i``, position ``first_pos + i``."""
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    for i in range(T):
        k = tl.load(KN + b * skb + h * skh + i * skt + d * skd, mask=dm)
        v = tl.load(VN + b * svb + h * svh + i * svt + d * svd, mask=dm)
        slot = first_slot + i
        tl.store(PK + slot * D + d, k.to(PK.dtype.element_ty), mask=dm)
        tl.store(PV + slot * D + d, v.to(PV.dtype.element_ty), mask=dm)
        tl.store(POS + slot, (first_pos + i).to(tl.int32))
