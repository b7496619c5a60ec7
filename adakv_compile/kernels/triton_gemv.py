"""Triton GEMV for the decode step's projections: ``y[M, N] = x[M, K] @ W[N, K]^T (+ b)`` for M = 1..8.

Why: at batch 1 a decode step is a chain of GEMVs that only has to read the weights once; cuBLAS runs them at
~82 % of copy bandwidth on an H200 (issue 17). A GEMV is pure weight streaming, so the kernel is built for
that: each program reads a ``BLOCK_N x K`` (or ``BLOCK_N x K/SPLIT``) strip of ``W`` in ``BLOCK_K``-wide,
K-contiguous tiles (16-byte loads), and the grid is sized from N, K and the SM count so that every SM has
several strips in flight.

Two inner products (a ``DOT`` constexpr):
- M == 1 (``DOT=False``): an fp32 ``[BLOCK_N, BLOCK_K]`` accumulator of elementwise products, reduced over K
  once after the loop (no per-tile reduction);
- any M <= 16 (``DOT=True``): ``tl.dot(W tile, x tile^T)`` with x padded to 16 rows (tensor cores; fp32 inputs
  use ``input_precision="ieee"``, so fp32 results are fp32-exact in order, not TF32).
fp32 accumulation always. Split-K (``SPLIT > 1``) writes fp32 partials ``[SPLIT, M, N]`` that a second small
kernel sums in a fixed order, adding the bias and casting: deterministic, no atomics (one extra launch; the
heuristic only splits when N alone gives too few programs — bench/gemv.py measures whether it pays).

``gemv_triton`` launches through ``launcher`` so that inside the ``adakv::gemv`` triton_op (kernels/gemv.py)
Inductor sees a ``wrap_triton`` launch and inlines it into its generated code (and CUDA graph).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .triton_attend import _interpreting, _sm_count, launcher


@triton.jit
def _gemv_kernel(X, W, B, OUT, M, N, K, K_PER_SPLIT,
                 sxm, swn, sos, som, son,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                 EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    w_ptr = W + offs_n[:, None].to(tl.int64) * swn
    if DOT:
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            if EVEN_K and EVEN_N:
                w = tl.load(w_ptr + kk[None, :])
            else:
                w = tl.load(w_ptr + kk[None, :], mask=n_ok[:, None] & (kk[None, :] < k_hi), other=0.0)
            x = tl.load(X + offs_m[None, :] * sxm + kk[:, None],
                        mask=m_ok[None, :] & (kk[:, None] < k_hi), other=0.0)   # [BLOCK_K, BLOCK_M]
            if DOT_F32:  # interpreter: bf16 tl.dot is unsupported there (triton-lang/triton#11584)
                acc = tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(w, x, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, x, acc)
        acc = tl.trans(acc)                                                     # [BLOCK_M, BLOCK_N]
        out_ptr = OUT + pid_k * sos + offs_m[:, None] * som + offs_n[None, :] * son
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr, acc, mask=mask)
    else:  # M == 1: elementwise products, one reduction over K after the loop
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # tl.range: software-pipelined loads (the default pipeliner only takes loops with a dot)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            kk = k0 + offs_k
            if EVEN_K and EVEN_N:
                w = tl.load(w_ptr + kk[None, :])
                x = tl.load(X + kk)
            else:
                k_ok = kk < k_hi
                w = tl.load(w_ptr + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(X + kk, mask=k_ok, other=0.0)
            acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc1 = tl.sum(acc2, 1)                                                  # [BLOCK_N]
        out_ptr = OUT + pid_k * sos + offs_n * son
        if SPLIT == 1:
            if HAS_BIAS:
                acc1 += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr, acc1.to(OUT.dtype.element_ty), mask=n_ok)
        else:
            tl.store(out_ptr, acc1, mask=n_ok)


@triton.jit
def _split_sum_kernel(WS, B, OUT, MN, N, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[i] = sum over s of WS[s, i] (s in order: deterministic) + bias, cast: split-K's merge, one launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(WS + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


class GemvConfig(NamedTuple):
    """One launch configuration (bench/gemv.py sweeps these; ``choose_config`` picks one)."""
    block_n: int
    block_k: int
    num_warps: int
    split: int = 1
    dot: bool = False
    num_stages: int = 3

    def short(self) -> str:
        return (f"n{self.block_n}k{self.block_k}w{self.num_warps}s{self.split}"
                f"{'d' if self.dot else 'r'}st{self.num_stages}")


# Best configs of bench/gemv.py's sweep on an H200 (sm_90, 16-bit weights; bench/results/gemv-h200.md), keyed by
# (M == 1, N, K) for the Llama-3.1-8B decode shapes: the heuristic below is 2-9 % slower on four of them (the
# 32-layer chain at M = 1: 3.92 ms with the heuristic, 3.66 ms with these = the copy floor, cuBLAS 4.00 ms).
_MEASURED_SM90 = {
    (True, 6144, 4096): GemvConfig(8, 256, 4, 1, False), (True, 4096, 4096): GemvConfig(16, 512, 4, 1, False),
    (True, 28672, 4096): GemvConfig(8, 256, 4, 1, False), (True, 4096, 14336): GemvConfig(16, 512, 4, 1, False),
    (True, 128256, 4096): GemvConfig(32, 256, 8, 1, False),
    (False, 6144, 4096): GemvConfig(32, 256, 4, 1, True), (False, 4096, 4096): GemvConfig(32, 256, 4, 2, True),
    (False, 28672, 4096): GemvConfig(32, 128, 4, 1, True), (False, 4096, 14336): GemvConfig(32, 256, 4, 2, True),
    (False, 128256, 4096): GemvConfig(64, 128, 4, 1, True),
}


def _measured(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> Optional[GemvConfig]:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or M > 8:
        return None
    if torch.cuda.get_device_capability(device) != (9, 0):
        return None
    return _MEASURED_SM90.get((M == 1, N, K))


def choose_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> GemvConfig:
    """A measured config where the sweep covered the shape (``_MEASURED_SM90``), else the heuristic:
    ``BLOCK_K`` = 512 bytes of a weight row, ``BLOCK_N`` as large as keeps >= 4 programs per SM (more bytes per
    program, fewer x re-reads), split-K only when even the smallest ``BLOCK_N`` leaves fewer than 2 programs
    per SM. The reduction path for M == 1, tensor cores above."""
    tuned = _measured(M, N, K, dtype, device)
    if tuned is not None:
        return tuned
    sms = _sm_count(device)
    elem = torch.empty((), dtype=dtype).element_size()
    block_k = max(32, 512 // elem)
    dot = M > 1
    smallest = 16 if dot else 8
    block_n = smallest
    for bn in (64, 32, 16, 8):
        if bn >= smallest and triton.cdiv(N, bn) >= 4 * sms:
            block_n = bn
            break
    if not dot:
        block_n = min(block_n, max(8, 8192 // block_k))   # acc2 [BLOCK_N, BLOCK_K] stays in registers
    split = 1
    programs = triton.cdiv(N, block_n)
    if programs < 2 * sms:
        split = max(1, min(triton.cdiv(2 * sms, programs), K // (4 * block_k)))
    warps = 8 if not dot and block_n * block_k >= 8192 else 4   # [32, 256] fp32 products: 122 -> 80 registers
    return GemvConfig(block_n, block_k, warps, split, dot)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                config: Optional[GemvConfig] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [M, K] (M <= 16), weight [N, K], by the Triton kernel.

    x, weight (and bias) share one floating dtype; the result has it too. ``config``: a launch configuration
    (default: ``choose_config``).
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv_triton: x must be [M, K] and weight [N, K], got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if M > 16:
        raise ValueError(f"gemv_triton: x has M={M} rows; the kernel is for M <= 16")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"gemv_triton: bias must be [N={N}], got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"gemv_triton: x, weight and bias must share one dtype, got x {x.dtype}, weight "
                         f"{weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else ""))
    cfg = config or choose_config(M, N, K, weight.dtype, weight.device)
    dot = cfg.dot or M > 1
    if dot and cfg.block_n < 16:
        raise ValueError(f"gemv_triton: config={cfg}: the tensor-core path (M > 1 or dot=True) needs block_n >= 16")
    if weight.stride(1) != 1:  # K is the unit-stride dimension of both operands (vector loads)
        weight = weight.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(K, k_per_split)
    if split > 1:
        out = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        so = out.stride()
    else:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        so = (0,) + tuple(out.stride())
    grid = (triton.cdiv(N, cfg.block_n), split)
    launcher(_gemv_kernel, x)[grid](
        x, weight, bias if bias is not None else x, out, M, N, K, k_per_split,
        x.stride(0), weight.stride(0), *so,
        HAS_BIAS=bias is not None, SPLIT=split, DOT=dot, IEEE=x.dtype == torch.float32, DOT_F32=_interpreting(x.device),
        EVEN_K=K % cfg.block_k == 0 and k_per_split % cfg.block_k == 0, EVEN_N=N % cfg.block_n == 0,
        BLOCK_M=16 if dot else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split == 1:
        return out
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    launcher(_split_sum_kernel, x)[(triton.cdiv(M * N, 1024),)](
        out, bias if bias is not None else x, y, M * N, N,
        HAS_BIAS=bias is not None, SPLIT=split, BLOCK=1024, num_warps=4)
    return y
