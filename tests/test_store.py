"""The compacted store: layout, in-place append, growth, deepcopy, memory."""
import copy

import pytest
import torch

from adakv_compile.kernels import store


def _random_store(B=2, H=3, n=40, D=8, reserve=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, n, D, generator=g).to(dtype)
    v = torch.randn(B, H, n, D, generator=g).to(dtype)
    keep = torch.rand(B, H, n, generator=g) < 0.4
    keep[..., -2:] = True
    kv, vv = store.build(k, v, keep, reserve)
    return k, v, keep, kv, vv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_keeps_exactly_the_kept_tokens_in_order(dtype):
    k, v, keep, kv, vv = _random_store(dtype=dtype)
    assert kv.shape == k.shape and kv.stride() == (0, 0, 0, 1)
    ks, vs = store.unpack(kv, vv)
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            torch.testing.assert_close(ks[b][h], k[b, h][keep[b, h]], rtol=0, atol=0)
            torch.testing.assert_close(vs[b][h], v[b, h][keep[b, h]], rtol=0, atol=0)


def test_append_in_place_and_growth_keep_contents():
    k, v, keep, kv, vv = _random_store(reserve=2)
    storage_ptr = kv.untyped_storage()._cdata
    B, H, n, D = k.shape
    added_k, added_v = [], []
    for step in range(9):  # forces several re-layouts
        t = 1 if step % 3 else 3
        nk, nv = torch.randn(B, H, t, D), torch.randn(B, H, t, D)
        store.append(kv, vv, nk, nv)
        added_k.append(nk)
        added_v.append(nv)
        L = kv.shape[2] + t
        kv, vv = store.make_view(store.pool_of(kv), B, H, L, D), store.make_view(store.pool_of(vv), B, H, L, D)
    assert kv.untyped_storage()._cdata == storage_ptr  # same storage object: views stay valid
    ks, vs = store.unpack(kv, vv)
    ak, av = torch.cat(added_k, 2), torch.cat(added_v, 2)
    for b in range(B):
        for h in range(H):
            torch.testing.assert_close(ks[b][h], torch.cat([k[b, h][keep[b, h]], ak[b, h]]), rtol=0, atol=0)
            torch.testing.assert_close(vs[b][h], torch.cat([v[b, h][keep[b, h]], av[b, h]]), rtol=0, atol=0)


def test_deepcopy_is_independent():
    k, v, keep, kv, vv = _random_store()
    ck, cv = copy.deepcopy(kv), copy.deepcopy(vv)
    assert ck.stride() == (0, 0, 0, 1) and ck.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    store.append(ck, cv, torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    _, lay = store.read_layout(kv)
    assert lay.lengths.tolist() == keep.sum(-1).tolist()


def test_memory_is_what_is_kept():
    k, v, keep, kv, vv = _random_store(B=3, H=4, n=200, D=16, reserve=8)
    kept_bytes = int(keep.sum()) * 16 * 2 * 4
    hs = store.header_slots(3, 4, 16, torch.float32)
    overhead = 2 * (3 * 4 * 8 + hs) * 16 * 4
    total = store.store_bytes(kv) + store.store_bytes(vv)
    assert total <= 1.10 * kept_bytes + overhead
    assert total >= kept_bytes


def test_foreign_tensors_are_refused_with_a_clear_error():
    with pytest.raises(store.StoreError, match="compacted cache"):
        store.read_layout(torch.randn(1, 2, 5, 8))
    fake = torch.zeros(64).as_strided((1, 2, 5, 8), (0, 0, 0, 1))
    with pytest.raises(store.StoreError, match="header"):
        store.read_layout(fake)
    k, v, keep, kv, vv = _random_store()
    cropped = store.make_view(store.pool_of(kv), 2, 3, 30, 8)
    with pytest.raises(store.StoreError, match="cropped"):
        store.read_layout(cropped)


def test_positions_are_kept_with_the_tokens_through_appends_and_growth():
    k, v, keep, kv, vv = _random_store(reserve=2)
    B, H, n, D = k.shape
    for step in range(5):  # includes re-layouts
        store.append(kv, vv, torch.randn(B, H, 2, D), torch.randn(B, H, 2, D))
        L = kv.shape[2] + 2
        kv, vv = store.make_view(store.pool_of(kv), B, H, L, D), store.make_view(store.pool_of(vv), B, H, L, D)
    _, _, pos = store.unpack(kv, vv, positions=True)
    for b in range(B):
        for h in range(H):
            expect = torch.cat([keep[b, h].nonzero()[:, 0], torch.arange(n, n + 10)]).to(torch.int32)
            assert torch.equal(pos[b][h], expect)
