"""The Triton kept-token scatter (interpreter on CPU) fills the static pools exactly as ``fill_static``'s plain
path does (every slot but the plain path's trash slot, which the kernel never writes)."""
from __future__ import annotations

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
