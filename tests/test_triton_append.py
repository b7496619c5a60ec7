"""The Triton append kernel (run by the interpreter on CPU) writes exactly what the plain path writes."""
import copy
import os

import pytest
import torch

from adakv_compile.kernels import store

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or the Triton interpreter (tests/conftest.py sets it on CPU)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3])
def test_append_kernel_matches_plain_path(dtype, t):
    from adakv_compile.kernels.triton_append import append_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(t)
    B, H, n, D = 2, 3, 30, 24
    k = torch.randn(B, H, n, D, generator=g).to(dtype).to(dev)
    v = torch.randn(B, H, n, D, generator=g).to(dtype).to(dev)
    keep = (torch.rand(B, H, n, generator=g) < 0.5).to(dev)
    kv, vv = store.build(k, v, keep, reserve=4)
    kv2, vv2 = copy.deepcopy(kv), copy.deepcopy(vv)
    # a non-contiguous chunk, as the model produces it (a transposed projection)
    k_new = torch.randn(B, t, H, D, generator=g).to(dtype).to(dev).transpose(1, 2)
    v_new = torch.randn(B, t, H, D, generator=g).to(dtype).to(dev).transpose(1, 2)
    os.environ["ADAKV_KERNELS"] = "plain"
    try:
        store.append(kv2, vv2, k_new, v_new)  # plain path
    finally:
        os.environ.pop("ADAKV_KERNELS")
    meta = store.host_meta(kv)
    pool_k, pool_v = store.pool_of(kv), store.pool_of(vv)
    hdr = pool_k[: meta.hs * D].view(torch.int32)
    bh = B * H
    append_triton(pool_k, pool_v, hdr, k_new, v_new, store.H_PER_HEAD, store.H_PER_HEAD + bh,
                  store.H_MINROOM, store.H_LOGICAL, store.positions_of(pool_v, meta.slots, D), meta.logical)
    assert torch.equal(store.pool_of(kv).view(torch.int16 if dtype != torch.float32 else torch.int32),
                       store.pool_of(kv2).view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(store.pool_of(vv), store.pool_of(vv2))
