"""The Triton kept-token scatter (interpreter on CPU) fills the static pools exactly as ``fill_static``'s plain
path does (every slot but the plain path's trash slot, which the kernel never writes)."""
from __future__ import annotations

import inspect

import pytest
import torch

from adakv_compile.kernels.static import fill_static
from tests.triton_device import DEVICE, interpreter_subprocess_test, needs_device

test_in_interpreter_subprocess = interpreter_subprocess_test(__file__)


@needs_device
@pytest.mark.parametrize("dtype,D", [(torch.float32, 16), (torch.bfloat16, 24)])
def test_scatter_kept_equals_plain_fill(dtype, D):
    from adakv_compile.kernels.triton_fill import scatter_kept

    g = torch.Generator().manual_seed(D)
    B, H, n, room = 2, 3, 37, 2
    k = torch.randn(B, H, n, D, generator=g).to(dtype)
    v = torch.randn(B, H, n, D, generator=g).to(dtype)
    k_strided = torch.randn(B, n, H, D, generator=g).to(dtype).transpose(1, 2)  # HF's layout: not contiguous
    keep = torch.rand(B, H, n, generator=g) < 0.4
    slots = H * n + H * room
    pools = [torch.randn(B * slots + 1, D, generator=g).to(dtype), torch.randn(B * slots + 1, D, generator=g).to(dtype),
             torch.zeros(B, H, dtype=torch.int32), torch.zeros(B, H, dtype=torch.int32),
             torch.randint(0, 99, (B * slots + 1,), generator=g, dtype=torch.int32)]
    for kk in (k, k_strided):
        plain = [t.clone() for t in pools]
        fill_static(kk, v, keep, room, plain[0], plain[1], plain[2], plain[3], plain[4])
        tri = [t.clone().to(DEVICE) for t in pools]
        counts = keep.sum(-1)
        seg = counts + room
        start = torch.cumsum(seg, -1) - seg + torch.arange(B)[:, None] * slots
        dest = torch.where(keep, start[..., None] + torch.cumsum(keep, -1) - 1, -1).reshape(-1)
        scatter_kept(kk.to(DEVICE), v.to(DEVICE), dest.to(DEVICE), tri[0], tri[1], tri[4])
        for a, b in zip((plain[0], plain[1], plain[4]), (tri[0], tri[1], tri[4])):
            assert torch.equal(a[:-1], b[:-1].cpu())
        assert torch.equal(plain[2], start.to(torch.int32)) and torch.equal(plain[3], counts.to(torch.int32))


def _slots_oracle(keep, room, slots):
    """The segment layout as the cumsum formula the body used before issue 17 (independent of both paths)."""
    B, H, n = keep.shape
    counts = keep.sum(-1)
    seg = counts + room
    start = torch.cumsum(seg, -1) - seg + torch.arange(B)[:, None] * slots
    return torch.where(keep, start[..., None] + torch.cumsum(keep, -1) - 1, -1).reshape(-1), start


@needs_device
@pytest.mark.parametrize("B,H,n,room,p", [(1, 1, 1, 0, 0.5), (2, 3, 37, 2, 0.4), (3, 5, 131, 1, 0.7),
                                          (2, 8, 200, 0, 0.05)])
def test_segment_slots_equal_plain_and_cumsum(B, H, n, room, p):
    """The slot kernel (a prefix count over the prompt in blocks, no Inductor scan) and the plain fallback
    (sort-based, also scan-free) against the cumsum formula: odd lengths, several blocks, rows, heads."""
    from adakv_compile.kernels.static import segment_slots_plain
    from adakv_compile.kernels.triton_fill import segment_slots

    seed = int(torch.randint(0, 1 << 16, ()))
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, n, generator=g) < p
    keep[0, 0] = False  # a segment with nothing kept
    slots = H * (n + room) + 3
    want_dest, want_start = _slots_oracle(keep, room, slots)
    counts = keep.sum(-1)
    plain = segment_slots_plain(keep, counts, room, slots)
    tri = segment_slots(keep.to(DEVICE), counts.to(DEVICE), room, slots)
    for got in (plain, tri):
        assert torch.equal(got[0].cpu(), want_dest), seed
        assert torch.equal(got[1].cpu(), want_start), seed


class _LaunchSpy:
    """``launcher`` that records every int argument a kernel launch gets (what Inductor would type)."""

    def __init__(self, real):
        self.real, self.ints = real, []

    def __call__(self, kernel, probe):
        launch = self.real(kernel, probe)
        spy = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    fn = getattr(kernel, "fn", kernel)  # JITFunction / InterpretedFunction
                    params = list(inspect.signature(fn).parameters.values())
                    consts = {p.name for p in params if "constexpr" in str(p.annotation)}
                    named = [(p.name, a) for p, a in zip(params, args)] + list(kwargs.items())
                    spy.ints += [(fn.__name__, k, a) for k, a in named if type(a) is int and k not in consts]
                    return launch[grid](*args, **kwargs)
                return run
        return _Grid()


@needs_device
def test_kernel_int_args_fit_int32(monkeypatch):
    """Issue 17, failure 2: Inductor (torch 2.11) cannot type a user kernel's int argument above 2**31 - 1.
    Batch and head strides beyond it (a 512k prompt's q has batch stride 2**31 at Llama-8B shapes) reach the
    scorer and compaction kernels as int32 halves: every int they get fits, and the results equal those of
    the same tensors with small strides."""
    from adakv_compile import AdaKVConfig
    from adakv_compile.kernels import triton_attend, triton_score
    from adakv_compile.kernels.triton_args import INT32_MAX
    from adakv_compile.kernels.triton_fill import scatter_kept, segment_slots
    from adakv_compile.kernels.triton_score import window_scores_triton

    spy = _LaunchSpy(triton_attend.launcher)
    monkeypatch.setattr(triton_attend, "launcher", spy)
    monkeypatch.setattr(triton_score, "launcher", spy)
    g = torch.Generator().manual_seed(7)
    n, D, room = 41, 16, 2
    huge = (2**31 + 16, 2**33 + 48)  # batch and head strides of a size-1 dim: never stepped, only passed

    def strided(t):
        return torch.as_strided(t, (1, 1, n, D), (*huge, D, 1))
    q, k, v = (torch.randn(n * D, generator=g).to(DEVICE) for _ in range(3))
    valid = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
    cfg = AdaKVConfig(budget=12, window=4)
    s_big = window_scores_triton(strided(q), strided(k), valid, cfg, 0.25)
    s_small = window_scores_triton(q.view(1, 1, n, D), k.view(1, 1, n, D), valid, cfg, 0.25)
    assert torch.equal(s_big, s_small)
    keep = (torch.rand(1, 1, n, generator=g) < 0.5).to(DEVICE)
    dest, _ = segment_slots(keep, keep.sum(-1), room, n + room)
    pools = [torch.zeros(n + room + 1, D, device=DEVICE), torch.zeros(n + room + 1, D, device=DEVICE),
             torch.full((n + room + 1,), -1, dtype=torch.int32, device=DEVICE)]
    big = [t.clone() for t in pools]
    scatter_kept(strided(k), strided(v), dest, *big)
    scatter_kept(k.view(1, 1, n, D), v.view(1, 1, n, D), dest, *pools)
    assert all(torch.equal(a, b) for a, b in zip(big, pools))
    kernels = {name for name, _, _ in spy.ints}
    assert {"_score_stats", "_score_reduce", "_score_pool", "_segment_slots_kernel",
            "_scatter_kept_kernel"} <= kernels, kernels
    too_big = [(name, arg, val) for name, arg, val in spy.ints if not -INT32_MAX <= val <= INT32_MAX]
    assert not too_big, too_big
