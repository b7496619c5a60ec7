"""Triton append into the compacted store: one launch writes a chunk of new K/V per (row, KV head).

Same effect as the plain path in ``store.append`` (after the room check): program (b, h) reads the
segment's offset and length from the device header, writes the ``t`` new tokens at slots
``offset + length + i``, and bumps the length; program 0 also updates the header's min-room and logical
length. Only program (b, h) touches segment (b, h), so no ordering between programs is needed.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _write_chunk(PK, PV, KN, VN, POS, b, h, first_slot, first_pos,
                 skb, skh, skt, skd, svb, svh, svt, svd, T, D, BLOCK_D: tl.constexpr):
    """Token i of (b, h)'s chunk → pool slot ``first_slot + i``, position ``first_pos + i`` (both kernels)."""
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    for i in range(T):
        k = tl.load(KN + b * skb + h * skh + i * skt + d * skd, mask=dm)
        v = tl.load(VN + b * svb + h * svh + i * svt + d * svd, mask=dm)
        slot = first_slot + i
        tl.store(PK + slot * D + d, k.to(PK.dtype.element_ty), mask=dm)
        tl.store(PV + slot * D + d, v.to(PV.dtype.element_ty), mask=dm)
        tl.store(POS + slot, (first_pos + i).to(tl.int32))


@triton.jit
def _append_kernel(
    PK, PV, KN, VN, HDR, POS,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    HKV, T, OFF0, LEN0, MINROOM, LOGICAL, FIRST_POS,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    off = tl.load(HDR + OFF0 + pid).to(tl.int64)
    length = tl.load(HDR + LEN0 + pid).to(tl.int64)
    _write_chunk(PK, PV, KN, VN, POS, pid // HKV, pid % HKV, off + length, FIRST_POS,
                 skb, skh, skt, skd, svb, svh, svt, svd, T, D, BLOCK_D)
    tl.store(HDR + LEN0 + pid, (length + T).to(tl.int32))
    if pid == 0:
        tl.store(HDR + MINROOM, tl.load(HDR + MINROOM) - T)
        tl.store(HDR + LOGICAL, tl.load(HDR + LOGICAL) + T)


def append_triton(pool_k, pool_v, hdr, k_new, v_new, off0: int, len0: int, minroom: int, logical: int,
                  pos, first_pos: int):
    """Launch the append. ``hdr``: the int32 view of the keys pool's header; ``pos``: the int32 slot
    positions of the values pool; k_new/v_new [B, Hkv, t, D]; new tokens get positions first_pos + i."""
    B, H, t, D = k_new.shape
    block_d = max(16, triton.next_power_of_2(D))
    _append_kernel[(B * H,)](
        pool_k, pool_v, k_new, v_new, hdr, pos,
        *k_new.stride(), *v_new.stride(),
        H, t, off0, len0, minroom, logical, first_pos,
        D=D, BLOCK_D=block_d, num_warps=1,
    )


@triton.jit
def _static_append_kernel(
    PK, PV, KN, VN, OFF, LEN, POS, SEEN,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    HKV, T,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Static cache (cache.py): segment (b, h) starts at slot OFF[b, h] and holds LEN[b, h] tokens."""
    pid = tl.program_id(0)
    off = tl.load(OFF + pid).to(tl.int64)
    length = tl.load(LEN + pid).to(tl.int64)
    _write_chunk(PK, PV, KN, VN, POS, pid // HKV, pid % HKV, off + length, tl.load(SEEN),
                 skb, skh, skt, skd, svb, svh, svt, svd, T, D, BLOCK_D)
    tl.store(LEN + pid, (length + T).to(tl.int32))


def static_append_triton(pool_k, pool_v, off, lens, pos, seen, k_new, v_new):
    """Append k_new/v_new [B, Hkv, t, D] at the end of every segment of a static store; bumps ``lens``.

    ``seen`` (0-d int64, tokens seen before this chunk) gives the new tokens' positions; the caller
    advances it. Launched through ``wrap_triton`` so a ``triton_op`` body that calls it is traceable.
    """
    from .triton_attend import launcher

    B, H, t, D = k_new.shape
    block_d = max(16, triton.next_power_of_2(D))
    launcher(_static_append_kernel, k_new)[(B * H,)](
        pool_k, pool_v, k_new, v_new, off, lens, pos, seen,
        k_new.stride(0), k_new.stride(1), k_new.stride(2), k_new.stride(3),
        v_new.stride(0), v_new.stride(1), v_new.stride(2), v_new.stride(3),
        H, t,
        D=D, BLOCK_D=block_d, num_warps=1,
    )
