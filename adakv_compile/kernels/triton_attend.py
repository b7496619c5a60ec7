"""Triton attention over the compacted store (same semantics as ``attend.store_attention``).

Layout read (``kernels/store.py``): ``pool_k`` / ``pool_v`` are flat pools of ``D``-element slots; the
(row b, KV head h) segment starts at slot ``offsets[b, h]`` and holds ``lengths[b, h]`` used slots, the
last ``t`` of which are the chunk just appended. Query ``i`` of the chunk (0..t-1) sees the slots
``[0, length - t + i + 1)`` of its segment (causal inside the chunk).

Kernel design
-------------
* One program per (row, KV head) x (block of query rows) x (split of the segment); grid
  ``(B * Hkv, cdiv(G * t, BLOCK_M), num_splits)``.
* GQA: the ``G`` query heads of a KV head and the ``t`` chunk queries are flattened into ``G * t`` rows
  (row ``r`` = query head ``h * G + r // t``, chunk position ``r % t``), so each K/V block is loaded once for
  the whole group and used by one ``tl.dot`` of ``[BLOCK_M, BLOCK_D] x [BLOCK_D, BLOCK_N]``.
* The segment is streamed in ``BLOCK_N``-slot blocks with an online softmax (fp32 ``m``, ``l``, ``acc``,
  base-2 exponentials); the per-row causal limit masks the chunk's own tail.
* Split-K (flash-decoding): with few (row, head) programs and long segments, each segment is cut into
  ``num_splits`` equal, ``BLOCK_N``-aligned pieces (per segment, from its own length, read on the device);
  each piece writes unnormalised ``acc`` plus ``m``, ``l`` to an fp32 workspace, and a second kernel merges
  the pieces. ``num_splits == 1`` is the one-pass path that writes the output directly.
* No host read of the lengths: loop bounds come from the device-side lengths. The split heuristic uses
  only host-known sizes (the pool's slot count, or an optional ``max_len_hint``).
* ``D`` is padded to a power of two (>= 16) with masks; fp32 inputs use IEEE dot products (no TF32).
* Attention sinks (gpt-oss; optional ``sinks`` [Hq], constexpr ``HAS_SINK``): the query head's sink logit
  joins each row's (max, sum) once, after the whole segment: at the end of the one-pass path or after the
  split-K merge, never per piece (``_join_sink``). It is not scaled or soft-capped, as
  ``attend.store_attention``; a row that sees no slot then outputs 0, as there.
* Options (constexpr, so they cost nothing when off): ``fused_merge`` — the last piece of a (row, head) to
  finish merges the pieces (an arrival counter per program row) instead of a second launch (the compiled
  path's default on CUDA, ``ADAKV_FUSED_MERGE``: the counters are then the cache layer's ``sem`` buffer,
  docs/design.md "Fused split-K merge"); benchmarks only (bench/attend_sweep.py): ``grid_pieces`` — with
  fixed pieces, fewer programs than pieces,
  each looping over its head's pieces (a static cache's row bound leaves most pieces empty).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

@triton.jit
def _tanh(x):
    # tanh without libdevice (portable, interpreter-friendly); saturates correctly for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _join_sink(SINKS, qh, row_ok, m_i, l_i, acc):
    """Add the query head's sink logit (gpt-oss) to a row's online-softmax state (base-2 units): one more
    softmax column with no value, so it grows the denominator only. The logit is neither scaled nor
    soft-capped (as ``attend.store_attention``). Called once per row: after the single pass, or after the
    split-K merge — never per piece."""
    sk = tl.load(SINKS + qh, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_new = tl.maximum(m_i, sk)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.exp2(sk - m_use)
    acc = acc * alpha[:, None]
    return m_new, l_i, acc


@triton.jit
def _store_rows(OUT, acc, l_i, b, qh, i, d, row_ok, d_ok, sob, soh, sot, sod):
    """A row block's output: the accumulator over its softmax denominator (an empty row, l = 0, writes 0),
    stored at [b, query head, query, d]. The single pass and the split-K merge end here."""
    l_use = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_use[:, None]
    o_ptrs = (OUT + b.to(tl.int64) * sob + qh[:, None] * soh + i[:, None].to(tl.int64) * sot
              + d[None, :] * sod)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _store_attn_fwd(
    Q, K, V, OFF, LEN, OUT, WS_ACC, WS_M, WS_L, SINKS, SEM,
    sqb, sqh, sqt, sqd,
    sob, soh, sot, sod,
    HKV, G, T, ROWS,
    scale, softcap,
    NUM_SPLITS,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    CHUNK: tl.constexpr = 0, HAS_SINK: tl.constexpr = False, FUSED_MERGE: tl.constexpr = False,
    STRIDED: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV

    off = tl.load(OFF + pid_bh).to(tl.int64)
    length = tl.load(LEN + pid_bh).to(tl.int32)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # flattened (group head, chunk query)
    row_ok = rows < ROWS
    g = rows // T
    i = rows % T
    # query i of the chunk sees slots < length - T + i + 1; padded rows see nothing
    limit = tl.where(row_ok, length - T + i + 1, 0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qh = (h * G + g).to(tl.int64)
    q_ptrs = Q + b.to(tl.int64) * sqb + qh[:, None] * sqh + i[:, None].to(tl.int64) * sqt + d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(K.dtype.element_ty)

    # Inductor passes Python floats as fp64 scalars: compute in fp32 whatever the caller's typing
    scale = tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    kv_base = off * D

    if STRIDED:  # fixed pieces, fewer programs than pieces: program s takes pieces s, s + P, ... of its head
        n_cover = tl.maximum(1, tl.minimum(NUM_SPLITS, tl.cdiv(length, CHUNK)))
        for ps in range(pid_s, n_cover, tl.num_programs(2)):
            lo = ps * CHUNK
            hi = tl.minimum(lo + CHUNK, length)
            m_i, l_i, acc = _attend_range(q, K, V, kv_base, lo, hi, limit, d, d_ok, scale, softcap,
                                          D, BLOCK_M, BLOCK_N, BLOCK_D, SOFTCAP, DOT_PREC, DOT_F32)
            _write_piece(WS_ACC, WS_M, WS_L, OUT, LEN, SINKS, SEM, pid_bh, pid_m, ps, hi - lo, length,
                         m_i, l_i, acc, rows, row_ok, b, h, g, i, d, d_ok, sob, soh, sot, sod, G, ROWS, NUM_SPLITS,
                         D, BLOCK_M, BLOCK_D, CHUNK, HAS_SINK, FUSED_MERGE)
    else:
        # this program's piece of the segment (BLOCK_N-aligned; the whole segment when not split)
        if SPLIT:
            if CHUNK > 0:  # fixed-size pieces: every program the same work, whatever the head's length
                per = CHUNK
            else:
                per = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
            lo = pid_s * per
            hi = tl.minimum(lo + per, length)
        else:
            lo = 0
            hi = length
        m_i, l_i, acc = _attend_range(q, K, V, kv_base, lo, hi, limit, d, d_ok, scale, softcap,
                                      D, BLOCK_M, BLOCK_N, BLOCK_D, SOFTCAP, DOT_PREC, DOT_F32)
        if SPLIT:
            _write_piece(WS_ACC, WS_M, WS_L, OUT, LEN, SINKS, SEM, pid_bh, pid_m, pid_s, hi - lo, length,
                         m_i, l_i, acc, rows, row_ok, b, h, g, i, d, d_ok, sob, soh, sot, sod, G, ROWS, NUM_SPLITS,
                         D, BLOCK_M, BLOCK_D, CHUNK, HAS_SINK, FUSED_MERGE)
        else:
            if HAS_SINK:
                m_i, l_i, acc = _join_sink(SINKS, qh, row_ok, m_i, l_i, acc)
            _store_rows(OUT, acc, l_i, b, qh, i, d, row_ok, d_ok, sob, soh, sot, sod)


@triton.jit
def _attend_range(q, K, V, kv_base, lo, hi, limit, d, d_ok, scale, softcap,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """Online softmax of the rows over slots [lo, hi) of the segment: (max, sum, unnormalised acc), base 2."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        kt_ptrs = K + kv_base + n[None, :].to(tl.int64) * D + d[:, None]          # [BLOCK_D, BLOCK_N]
        kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:  # interpreter: bf16 tl.dot is unsupported there (triton-lang/triton#11584)
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt, input_precision=DOT_PREC)
        if SOFTCAP:
            s = _tanh(s * (scale / softcap)) * (softcap * 1.4426950408889634)
        else:
            s = s * qk_scale
        s = tl.where(n[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + kv_base + n[:, None].to(tl.int64) * D + d[None, :]           # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        p_lo = p.to(v.dtype)  # P rounded to the storage dtype, as on the GPU path
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p_lo.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p_lo, v, input_precision=DOT_PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _write_piece(WS_ACC, WS_M, WS_L, OUT, LEN, SINKS, SEM, pid_bh, pid_m, ps, n_tokens, length,
                 m_i, l_i, acc, rows, row_ok, b, h, g, i, d, d_ok, sob, soh, sot, sod, G, ROWS, NUM_SPLITS,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                 HAS_SINK: tl.constexpr, FUSED_MERGE: tl.constexpr):
    """Piece ``ps``'s (max, sum, acc) to the split-K workspace; with ``FUSED_MERGE``, the last piece of the
    (row, head) x row block to arrive merges them all."""
    ws_row = (pid_bh * NUM_SPLITS + ps).to(tl.int64) * ROWS + rows
    # with fixed pieces the merge reads only the pieces that hold tokens: empty ones write nothing
    if CHUNK > 0:
        ws_ok = row_ok & ((tl.zeros([BLOCK_M], tl.int32) + n_tokens) > 0)
    else:
        ws_ok = row_ok
    tl.store(WS_M + ws_row, m_i, mask=ws_ok)
    tl.store(WS_L + ws_row, l_i, mask=ws_ok)
    tl.store(WS_ACC + ws_row[:, None] * D + d[None, :], acc, mask=ws_ok[:, None] & d_ok[None, :])
    if FUSED_MERGE:
        # arrivals are counted on SEM (zero between launches: the merger resets it). Pieces that hold
        # tokens take part, and piece 0 always (an empty head's output is still written).
        n_pieces = NUM_SPLITS
        if CHUNK > 0:
            n_pieces = tl.maximum(1, tl.minimum(NUM_SPLITS, tl.cdiv(length, CHUNK)))
        if ps < n_pieces:
            sem = SEM + pid_bh * tl.num_programs(1) + pid_m
            tl.debug_barrier()  # every thread's workspace stores are issued before the arrival
            arrived = tl.atomic_add(sem, 1, sem="acq_rel")
            if arrived == n_pieces - 1:
                tl.atomic_xchg(sem, 0)
                _merge_pieces(WS_ACC, WS_M, WS_L, OUT, length, SINKS, pid_bh, rows, row_ok, b, h, g, i, d,
                              d_ok, sob, soh, sot, sod, G, ROWS, NUM_SPLITS, D, BLOCK_M, BLOCK_D, CHUNK,
                              HAS_SINK, 0)


@triton.jit
def _merge_one(WS_ACC, WS_M, WS_L, pid_bh, s, rows, row_ok, d, d_ok, ROWS, NUM_SPLITS, D: tl.constexpr,
               m_t, l_t, acc):
    """Fold piece ``s`` of the split-K workspace into the running (max, sum, acc) of the merge."""
    ws_row = (pid_bh * NUM_SPLITS + s).to(tl.int64) * ROWS + rows
    m_s = tl.load(WS_M + ws_row, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(WS_L + ws_row, mask=row_ok, other=0.0, cache_modifier=".cg")
    a_s = tl.load(WS_ACC + ws_row[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                  other=0.0, cache_modifier=".cg")
    m_new = tl.maximum(m_t, m_s)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_t - m_use)
    beta = tl.exp2(m_s - m_use)
    return m_new, l_t * alpha + l_s * beta, acc * alpha[:, None] + a_s * beta[:, None]


@triton.jit
def _merge_pieces(WS_ACC, WS_M, WS_L, OUT, length, SINKS, pid_bh, rows, row_ok, b, h, g, i, d, d_ok,
                  sob, soh, sot, sod, G, ROWS, NUM_SPLITS,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                  HAS_SINK: tl.constexpr, MERGE_STAGES: tl.constexpr):
    """Merge the split-K pieces of one (row, KV head) x row block and write the output (``.cg`` loads: in
    the fused merge the pieces were written by other programs, so they are read from L2, not L1)."""
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_pieces = NUM_SPLITS
    if CHUNK > 0:  # only the pieces that hold tokens of this head
        n_pieces = tl.minimum(NUM_SPLITS, tl.cdiv(length, CHUNK))
    if MERGE_STAGES > 0:  # software-pipelined loads of the pieces (DEFAULT_MERGE_STAGES)
        for s in tl.range(0, n_pieces, num_stages=MERGE_STAGES):
            m_t, l_t, acc = _merge_one(WS_ACC, WS_M, WS_L, pid_bh, s, rows, row_ok, d, d_ok, ROWS, NUM_SPLITS, D,
                                       m_t, l_t, acc)
    else:
        for s in range(0, n_pieces):
            m_t, l_t, acc = _merge_one(WS_ACC, WS_M, WS_L, pid_bh, s, rows, row_ok, d, d_ok, ROWS, NUM_SPLITS, D,
                                       m_t, l_t, acc)

    qh = (h * G + g).to(tl.int64)
    if HAS_SINK:  # once per row, after all pieces
        m_t, l_t, acc = _join_sink(SINKS, qh, row_ok, m_t, l_t, acc)
    _store_rows(OUT, acc, l_t, b, qh, i, d, row_ok, d_ok, sob, soh, sot, sod)


@triton.jit
def _store_attn_merge(
    WS_ACC, WS_M, WS_L, OUT, LEN, SINKS,
    sob, soh, sot, sod,
    HKV, G, T, ROWS, NUM_SPLITS,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr = 0,
    HAS_SINK: tl.constexpr = False, MERGE_STAGES: tl.constexpr = 0,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    g = rows // T
    i = rows % T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    length = tl.load(LEN + pid_bh).to(tl.int32)
    _merge_pieces(WS_ACC, WS_M, WS_L, OUT, length, SINKS, pid_bh, rows, row_ok, b, h, g, i, d, d_ok,
                  sob, soh, sot, sod, G, ROWS, NUM_SPLITS, D, BLOCK_M, BLOCK_D, CHUNK, HAS_SINK, MERGE_STAGES)


_SM_COUNT: dict[int, int] = {}
# Without a max_len_hint the longest segment is assumed to be SKEW x the mean (Ada-KV head budgets are skewed)
SKEW = 4.0
MIN_PIECE = 256  # tokens: the smallest fixed-size split-K piece (choose_chunk)
# The merge launch's pipelined loads of the pieces: faster than the plain loop (0) in every H200 sweep, e.g.
# batch 1 23.2 -> 15.9 us, batch 8 34.0 -> 30.8, batch 32 79.6 -> 78.8 (bench/results/attend-sweep-s10-*.json)
DEFAULT_MERGE_STAGES = 3


_SEMAPHORES: dict[str, torch.Tensor] = {}


def _semaphores(n: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per program row for the fused merge, kept per device (the kernel leaves it
    zeroed). Eager use only: a tensor made outside the traced graph (not for the triton_op path)."""
    key = str(device)
    buf = _SEMAPHORES.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _SEMAPHORES[key] = buf
    return buf


def merge_counters(batch: int, kv_heads: int, q_heads: int, t: int, head_dim: int) -> int:
    """How many fused-merge arrival counters a launch needs: one per (row, KV head) x block of query rows."""
    block_m = default_config(head_dim, (q_heads // kv_heads) * t)[0]
    return batch * kv_heads * triton.cdiv((q_heads // kv_heads) * t, block_m)


def _check_semaphores(sem: torch.Tensor, q: torch.Tensor) -> None:
    if sem.dtype != torch.int32 or sem.dim() != 1 or sem.device != q.device:
        raise ValueError(f"semaphores must be a flat int32 tensor on {q.device}, got {sem.dtype} "
                         f"{tuple(sem.shape)} on {sem.device}")


def launcher(kernel, probe: torch.Tensor):
    """``kernel`` itself on real tensors; ``wrap_triton(kernel)`` while traced (fake / functional tensors,
    i.e. inside a ``triton_op`` body that Inductor traces, where the launch must become a graph node).
    ``wrap_triton``'s eager path costs ~0.2 ms a launch (seen on an H200), so it is kept out of eager use."""
    return kernel if type(probe) is torch.Tensor else wrap_triton(kernel)


def checked_sinks(sinks, Hq: int, q: torch.Tensor):
    """The kernels' ``sinks`` argument: None, or one logit per query head on q's device, flat and contiguous."""
    if sinks is None:
        return None
    if sinks.numel() != Hq:
        raise ValueError(f"sinks must hold one logit per query head ({Hq}), got shape {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks are on {sinks.device} but q is on {q.device}")
    return sinks.reshape(-1).contiguous()


def is_interpreted() -> bool:
    """Whether this module's kernels were built by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_store_attn_fwd).__name__ == "InterpretedFunction"


def _interpreting(device: torch.device) -> bool:
    """Running under ``TRITON_INTERPRET=1`` (CPU tensors): dots are done in fp32 there."""
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_config(head_dim: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``rows`` = G * t query rows per KV head."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = 64 if block_d <= 128 else 32
    num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    return block_m, block_n, num_warps, 2


def choose_splits(n_programs: int, mean_len: float, max_len: float, device: torch.device,
                  min_tokens_per_split: int = 128, max_splits: int = 64) -> int:
    """Split-K factor (pieces per segment), from host-known sizes only.

    Every segment is cut into the same number of pieces, so a piece of the longest segment is
    ``max_len / S`` slots while the whole job is ``n_programs * mean_len`` slots. The GPU stays balanced
    when the longest piece is at most half of one SM's share of the job:
    ``S >= 2 * SMs * max_len / (n_programs * mean_len)``; pieces keep at least ``min_tokens_per_split``
    slots (the merge and the per-program set-up are not free).
    """
    sms = _sm_count(device)
    if sms <= 1 or max_len < 2 * min_tokens_per_split:
        return 1
    want = math.ceil(2 * sms * max_len / max(1.0, n_programs * mean_len))
    cap = int(max_len // min_tokens_per_split)
    return int(max(1, min(want, cap, max_splits)))


def choose_chunk(total_tokens: float, device: torch.device, block_n: int, pieces_per_sm: int = 2) -> int:
    """Tokens per piece for fixed-size split-K: about ``pieces_per_sm`` pieces per SM over the whole job
    (a power of two, at least one K/V block and ``MIN_PIECE`` tokens, at most 2048). Two per SM matched the
    best graph-timed piece size of a sweep on an H200 (bench/results/kernels-h200.json) at batch 8 and 32;
    below ``MIN_PIECE`` the pieces only multiply empty programs and merge work (batch 1, session 10)."""
    want = total_tokens / max(1, pieces_per_sm * _sm_count(device))
    chunk = triton.next_power_of_2(max(1, math.ceil(want)))
    return int(min(2048, max(chunk, block_n, MIN_PIECE)))


def fixed_piece_tiles(chunk: int, fused: bool) -> tuple[int, int]:
    """(BLOCK_N, num_stages) of the fixed-piece split-K launch (a static cache's row bound) for pieces of
    ``chunk`` tokens. From the H200 sweeps at ~1k and ~2k kept tokens per head (bench/results/
    attend-sweep-s10-h200.json, attend-sweep-s10-2k-h200.json; docs/design.md "Fixed pieces at small batch"):
    with the fused merge, BLOCK_N 128 and 2 stages for pieces of 128-512 tokens (batch 8 at 2k: 31.4 -> 30.4 us
    = 86.6 % of a same-size copy; batch 1's 256-token pieces: 9.9 us); above that, and always with the merge
    launch, BLOCK_N 64 and 3 stages (batch 32; BLOCK_N 128 with 3 stages and the merge launch was 35 % slower
    at batch 8). The piece size itself is ``choose_chunk``'s (at least ``MIN_PIECE``: batch 1 16.7 -> 9.9 us)."""
    if fused and 128 <= chunk <= 512:
        return 128, 2
    return 64, 3


def store_attention_triton(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                           offsets: torch.Tensor, lengths: torch.Tensor, t: int, scale: float,
                           softcap: float = 0.0, max_len_hint: int | None = None,
                           num_splits: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           max_len_bound: int | None = None, split_tokens: int | None = None,
                           sinks: torch.Tensor | None = None, fused_merge: bool = False,
                           grid_pieces: int | None = None,
                           semaphores: torch.Tensor | None = None,
                           merge_stages: int = DEFAULT_MERGE_STAGES) -> torch.Tensor:
    """Attention of ``q`` [B, Hq, t, D] over the store after the chunk's ``t`` tokens were appended.

    ``offsets`` / ``lengths``: [B, Hkv] int32/int64 device tensors (first slot, used length incl. the
    chunk). ``max_len_hint`` (optional host int, an upper bound of the longest segment: pass the store's
    ``HostMeta.max_len`` from ``store.append``) only steers the split-K heuristic; without it the longest
    segment is taken as ``SKEW`` x the mean capacity (pool slots / (B*Hkv)). No device-to-host read
    either way: the kernel's loop bounds come from the device-side lengths.
    ``num_splits`` / ``block_n`` / ``num_warps`` / ``num_stages`` override the heuristics (benchmarks).
    ``max_len_bound`` (a host int no segment can exceed, e.g. a static cache's slots per row) switches to
    fixed-size pieces of ``split_tokens`` tokens (default: ``choose_chunk``): every program then does the
    same work however skewed the head lengths are, and empty pieces cost only their launch.
    ``sinks`` (optional [Hq] logits, gpt-oss): a per-query-head softmax column with no value, not scaled
    (docs/algorithm.md, "Attention sinks"); None compiles the kernels without it (no cost).
    ``fused_merge``: with split-K, the last piece of each (row, head) x row block to finish merges the
    pieces (an arrival counter per program row, zero between launches: the merger resets it) instead of a
    second kernel launch. The counters are ``semaphores`` (int32, contiguous, zeroed; written in place: the
    compiled path passes the cache layer's ``sem``, ``static.static_attend_merged``) or, without it, a
    zeroed buffer cached per device (eager launches only: a traced launch needs it as an argument). A
    ``semaphores`` smaller than ``merge_counters`` needs falls back to the merge launch.
    ``grid_pieces`` (benchmarks; fixed pieces only): launch at most this many programs per (row, head) x row
    block, each looping over the pieces ``s, s + grid_pieces, ...`` of its head, instead of one program per
    piece of ``max_len_bound`` (which for a static cache's row bound are mostly empty).
    ``merge_stages`` (the merge launch only; default ``DEFAULT_MERGE_STAGES``): > 0 software-pipelines the
    merge's loads of the pieces (``tl.range(num_stages=)``), 0 is a plain loop, one dependent load after another.
    """
    if isinstance(merge_stages, bool) or not isinstance(merge_stages, int) or merge_stages < 0:
        raise ValueError(f"merge_stages must be an integer >= 0, got {merge_stages!r}")
    B, Hq, tq, D = q.shape
    if tq != t:
        raise ValueError(f"q has {tq} queries but t={t}")
    Hkv = offsets.shape[-1]
    if offsets.shape != (B, Hkv) or lengths.shape != (B, Hkv):
        raise ValueError(f"offsets/lengths must be [B, Hkv] = [{B}, {Hkv}], got {tuple(offsets.shape)}, "
                         f"{tuple(lengths.shape)}")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported by the Triton store attention")
    G = Hq // Hkv
    sinks = checked_sinks(sinks, Hq, q)
    if q.device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "store_attention_triton got CPU tensors but its kernels were compiled for the GPU: set "
            "TRITON_INTERPRET=1 before adakv_compile.kernels.triton_attend is first imported to run them on CPU")
    out = torch.empty((B, Hq, t, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    pool_k = pool_k.reshape(-1)
    pool_v = pool_v.reshape(-1)
    offsets = offsets.contiguous()
    lengths = lengths.contiguous()

    rows = G * t
    block_d = max(16, triton.next_power_of_2(D))
    block_m, bn, nw, ns = default_config(D, rows)
    fixed = max_len_bound is not None and num_splits is None
    n_mblk = triton.cdiv(rows, block_m)
    n_bh = B * Hkv
    # the fused merge runs where its counters fit, else the merge launch does: the tiles follow what launches
    counters_fit = semaphores is None or semaphores.numel() >= n_bh * n_mblk
    chunk = 0
    if fixed:  # fixed pieces: size, BLOCK_N and stages from the H200 sweeps (choose_chunk, fixed_piece_tiles)
        mean_len = (pool_k.numel() // D) / max(1, n_bh)
        chunk = split_tokens or choose_chunk(n_bh * n_mblk * mean_len, q.device, 64)
        bn, ns = fixed_piece_tiles(chunk, bool(fused_merge) and counters_fit)
    block_n = min(block_n or bn, max(16, 16384 // block_d))  # K/V tiles of <= 16K elements (shared memory)
    num_warps = num_warps or nw
    num_stages = num_stages or ns
    if fixed:
        chunk = triton.cdiv(chunk, block_n) * block_n
        num_splits = max(1, triton.cdiv(int(max_len_bound), chunk))
        if num_splits == 1:
            chunk = 0
    if num_splits is None:
        # mean segment capacity (kept + free room) from the pool size: no device read
        mean_len = (pool_k.numel() // D) / max(1, n_bh)
        max_len = max_len_hint if max_len_hint is not None else SKEW * mean_len
        num_splits = choose_splits(n_bh * n_mblk, mean_len, max(mean_len, max_len), q.device)
    num_splits = max(1, int(num_splits))
    dot_prec = "ieee" if pool_k.dtype == torch.float32 else "tf32"
    softcap = float(softcap or 0.0)

    split = num_splits > 1
    if split:
        ws_acc = torch.empty((n_bh * num_splits * rows, D), dtype=torch.float32, device=q.device)
        ws_m = torch.empty((n_bh * num_splits * rows,), dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
    else:
        ws_acc = ws_m = ws_l = out  # unused
    fused = split and bool(fused_merge)
    if fused and semaphores is not None:
        _check_semaphores(semaphores, q)
        fused = counters_fit  # else: the merge launch
        sem = semaphores
    elif fused:
        if type(q) is not torch.Tensor:
            raise ValueError("fused_merge in a traced launch needs its counters as the semaphores argument")
        sem = _semaphores(n_bh * n_mblk, q.device)
    else:
        sem = out  # unused
    grid_s = num_splits
    if chunk and grid_pieces is not None:
        grid_s = max(1, min(num_splits, int(grid_pieces)))
    launcher(_store_attn_fwd, q)[(n_bh, n_mblk, grid_s)](
        q, pool_k, pool_v, offsets, lengths, out, ws_acc, ws_m, ws_l, q if sinks is None else sinks, sem,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        Hkv, G, t, rows,
        float(scale), softcap if softcap else 1.0,
        num_splits,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        SOFTCAP=bool(softcap), SPLIT=split, DOT_PREC=dot_prec, DOT_F32=_interpreting(q.device), CHUNK=chunk,
        HAS_SINK=sinks is not None, FUSED_MERGE=fused, STRIDED=grid_s < num_splits,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split and not fused:
        launcher(_store_attn_merge, q)[(n_bh, n_mblk)](
            ws_acc, ws_m, ws_l, out, lengths, q if sinks is None else sinks,
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            Hkv, G, t, rows, num_splits,
            D=D, BLOCK_M=block_m, BLOCK_D=block_d, CHUNK=chunk, HAS_SINK=sinks is not None,
            MERGE_STAGES=merge_stages, num_warps=4,
        )
    return out
