"""The compacted KV store: one flat pool per cache tensor, shown to the model as a zero-stride view.

Why this shape (docs/design.md has the full decision):
- The tensor that sits in the model's cache (an HF ``DynamicLayer.keys`` or a hand-written tuple) is a
  *logical view* ``[B, Hkv, L, D]`` with strides ``(0, 0, 0, 1)``: ``L`` is the number of tokens the model
  has seen, so ``get_seq_length()``, positions and mask sizes stay right, and ``torch.cat`` with new K/V
  still type-checks when Dynamo traces the model. The view reads nothing meaningful; its *storage* is
  the pool.
- The pool is a flat run of token *slots* of ``D`` elements. Slots ``[0, hs)`` hold an int32 header;
  each (row, KV head) owns one contiguous segment ``[off, off + cap)`` of which ``len`` slots are used.
  Memory is what is kept plus ``decode_reserve`` free slots per (row, head) plus the header.
- ``copy.deepcopy`` copies the storage and keeps the view's strides, so a copied cache is independent.
- New tokens are written in place into each segment's free slots (O(new tokens)). When a segment is full
  the whole pool is re-laid out with more room and the *same storage object* is resized, so every view
  of it stays valid and the model never sees a new shape (amortised: room grows with the cache).

The values pool has the same slot numbering (its header slots stay zero) plus, after its data slots, one
int32 per slot: the position (index in the model's padded sequence) of the token in that slot, so one
can tell which prompt tokens each head kept (``unpack(..., positions=True)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAGIC = 0x41444B56  # "ADKV"
VERSION = 1
# header fields (int32 index)
H_MAGIC, H_VERSION, H_B, H_HKV, H_HS, H_SLOTS, H_USED, H_MINROOM, H_LOGICAL, H_RESERVE = range(10)
H_PER_HEAD = 16  # offsets start here; then lengths, then capacities, each B*Hkv int32


class StoreError(RuntimeError):
    """A cache tensor is not an adakv store, or was changed in a way the store cannot follow."""


def header_ints(rows: int, heads: int) -> int:
    return H_PER_HEAD + 3 * rows * heads


def header_slots(rows: int, heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Slots the header needs; a whole number of int32 words."""
    slot_bytes = head_dim * torch.empty((), dtype=dtype).element_size()
    hs = math.ceil(header_ints(rows, heads) * 4 / slot_bytes)
    while (hs * slot_bytes) % 4:
        hs += 1
    return hs


def is_store_view(t: torch.Tensor) -> bool:
    """True for the zero-stride views this module hands out (cheap: metadata only)."""
    return t.dim() == 4 and t.stride() == (0, 0, 0, 1)


def has_store_header(t: torch.Tensor) -> bool:
    """A store view whose storage starts with the adakv magic (reads one word: not for hot paths)."""
    if not is_store_view(t) or t.untyped_storage().nbytes() < 8:
        return False
    head = torch.empty(0, dtype=torch.int32, device=t.device).set_(t.untyped_storage(), 0, (2,), (1,))
    return int(head[0]) == MAGIC


def pool_of(view: torch.Tensor) -> torch.Tensor:
    """The flat pool behind a store view (all of its storage), as a 1-D tensor."""
    if not is_store_view(view):
        raise StoreError(
            "expected an adakv compacted cache (a zero-stride view made by the adakv backend), got a tensor "
            f"of shape {tuple(view.shape)} and strides {view.stride()}. The cache was either not produced "
            "by an adakv-compiled prefill, or changed by an operation the compacted layout does not support "
            "(e.g. beam-search reorder_cache / index_select, crop, or concatenation outside the model)."
        )
    st = view.untyped_storage()
    numel = st.nbytes() // view.element_size()
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(st, 0, (numel,), (1,))


def make_view(pool: torch.Tensor, rows: int, heads: int, length: int, head_dim: int) -> torch.Tensor:
    """A fresh (non-view) tensor sharing ``pool``'s storage, shaped like a cache of ``length`` tokens."""
    return torch.empty(0, dtype=pool.dtype, device=pool.device).set_(
        pool.untyped_storage(), 0, (rows, heads, length, head_dim), (0, 0, 0, 1))


@dataclass
class Layout:
    """Host copy of the header: everything an op needs to address the pool."""
    rows: int
    heads: int
    hs: int
    slots: int
    logical: int
    reserve: int
    offsets: torch.Tensor  # [B, Hkv] int64, on the pool's device
    lengths: torch.Tensor
    caps: torch.Tensor
    min_room: int


def read_layout(view_k: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    """Check the magic and read the header of the keys store (one small device-to-host copy)."""
    pool = pool_of(view_k)
    d = view_k.shape[-1]
    words = H_PER_HEAD * 4 // view_k.element_size()
    if pool.numel() < words:
        raise StoreError("cache storage too small to be an adakv store")
    fixed = pool[:words].view(torch.int32).tolist()
    if not fixed or fixed[H_MAGIC] != MAGIC or fixed[H_VERSION] != VERSION:
        raise StoreError("cache tensor has the compacted-view shape but no adakv header (magic mismatch)")
    rows, heads, hs = fixed[H_B], fixed[H_HKV], fixed[H_HS]
    if (rows, heads) != (view_k.shape[0], view_k.shape[1]):
        raise StoreError(
            f"adakv store holds {rows} rows x {heads} KV heads but the cache view is "
            f"{tuple(view_k.shape[:2])}: batch-changing cache operations are not supported")
    if fixed[H_LOGICAL] != view_k.shape[2]:
        raise StoreError(
            f"adakv store has seen {fixed[H_LOGICAL]} tokens but the cache view says {view_k.shape[2]}: the "
            "cache was cropped or sliced outside the model, which a compacted cache cannot follow")
    hdr = pool[: hs * d].view(torch.int32)
    bh = rows * heads
    per = hdr[H_PER_HEAD: H_PER_HEAD + 3 * bh].to(torch.int64).view(3, rows, heads)
    lay = Layout(rows, heads, hs, fixed[H_SLOTS], fixed[H_LOGICAL], fixed[H_RESERVE],
                 per[0], per[1], per[2], fixed[H_MINROOM])
    return pool, lay


@dataclass
class HostMeta:
    """What the host must know to append without reading the device: kept as ``view._adakv_meta``.

    The backend's wrapper moves it from each cache input view to the output view of the same store;
    a copied tensor carries it in ``__dict__``. When it is missing or does not match the view, the
    header is read once (one device-to-host copy).
    """
    rows: int
    heads: int
    hs: int
    slots: int
    logical: int
    min_room: int
    max_len: int
    reserve: int
    nbytes: int
    _views: object = None  # cached tensor views of the pools (not copied by deepcopy)

    def __deepcopy__(self, memo):
        return HostMeta(self.rows, self.heads, self.hs, self.slots, self.logical, self.min_room,
                        self.max_len, self.reserve, self.nbytes)


def host_meta(view: torch.Tensor) -> HostMeta:
    meta = view.__dict__.get("_adakv_meta")
    if meta is not None and meta.logical == view.shape[2] and meta.nbytes == view.untyped_storage().nbytes():
        return meta
    _, lay = read_layout(view)
    meta = HostMeta(lay.rows, lay.heads, lay.hs, lay.slots, lay.logical, lay.min_room,
                    int(lay.lengths.max()) if lay.lengths.numel() else 0, lay.reserve,
                    view.untyped_storage().nbytes())
    view._adakv_meta = meta
    return meta


def device_lengths(pool: torch.Tensor, meta: HostMeta, head_dim: int):
    """Offsets and lengths [B, Hkv] (int32 views into the device header; no host read)."""
    hdr = pool[: meta.hs * head_dim].view(torch.int32)
    bh = meta.rows * meta.heads
    off = hdr[H_PER_HEAD: H_PER_HEAD + bh].view(meta.rows, meta.heads)
    lens = hdr[H_PER_HEAD + bh: H_PER_HEAD + 2 * bh].view(meta.rows, meta.heads)
    return off, lens


def _pos_region(slots: int, d: int, elem: int) -> tuple[int, int]:
    """(first element, total elements) of the positions region at the tail of a values pool."""
    start = slots * d
    while (start * elem) % 4:
        start += 1
    return start, start + math.ceil(slots * 4 / elem)


def positions_of(pool_v: torch.Tensor, slots: int, d: int) -> torch.Tensor:
    """The int32 positions of every slot (a view into the values pool)."""
    start, end = _pos_region(slots, d, pool_v.element_size())
    return pool_v[start:end].view(torch.int32)[:slots]


def _write_header(pool: torch.Tensor, d: int, hs: int, rows: int, heads: int, slots: int,
                  logical: int, reserve: int, offsets, lengths, caps) -> None:
    hdr = pool[: hs * d].view(torch.int32)
    min_room = int((caps - lengths).min()) if caps.numel() else 0
    fixed = torch.tensor([MAGIC, VERSION, rows, heads, hs, slots, slots, min_room, logical, reserve],
                         dtype=torch.int32)
    hdr[: len(fixed)] = fixed.to(pool.device)
    bh = rows * heads
    hdr[H_PER_HEAD: H_PER_HEAD + bh] = offsets.reshape(-1).to(torch.int32)
    hdr[H_PER_HEAD + bh: H_PER_HEAD + 2 * bh] = lengths.reshape(-1).to(torch.int32)
    hdr[H_PER_HEAD + 2 * bh: H_PER_HEAD + 3 * bh] = caps.reshape(-1).to(torch.int32)


def _segment_slots(offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Slot index of every used slot, segment by segment ([sum(counts)] int64)."""
    counts = counts.reshape(-1)
    total = int(counts.sum())
    starts = offsets.reshape(-1).repeat_interleave(counts)
    first = torch.cumsum(counts, 0) - counts
    within = torch.arange(total, device=counts.device) - first.repeat_interleave(counts)
    return starts + within


# Called (no arguments) before every store is built. ``guards.py`` registers the dynamic-layer guard here,
# so that this module needs nothing from above ``kernels/`` (tests/test_layering.py).
BUILD_HOOKS: list = []


def build(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, reserve: int,
          logical: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the kept tokens of ``k``/``v`` [B, Hkv, n, D] (``keep`` [B, Hkv, n] bool) into new stores.

    Returns the two cache views ``[B, Hkv, logical, D]`` (``logical`` defaults to n).
    """
    for hook in BUILD_HOOKS:  # guards.py: from now on the uncompiled model refuses compacted caches
        hook()
    rows, heads, n, d = k.shape
    logical = n if logical is None else logical
    counts = keep.sum(-1)  # [B, Hkv]
    caps = counts + reserve
    hs = header_slots(rows, heads, d, k.dtype)
    offsets = hs + torch.cumsum(caps.reshape(-1), 0) - caps.reshape(-1)
    slots = hs + int(caps.sum())
    pool_k = torch.zeros(slots * d, dtype=k.dtype, device=k.device)
    pool_v = torch.zeros(_pos_region(slots, d, v.element_size())[1], dtype=v.dtype, device=v.device)
    dest = _segment_slots(offsets, counts)
    pool_k.view(slots, d)[dest] = k[keep]
    pool_v[: slots * d].view(slots, d)[dest] = v[keep]
    positions_of(pool_v, slots, d)[dest] = torch.arange(n, device=k.device, dtype=torch.int32).expand(
        rows, heads, n)[keep]
    _write_header(pool_k, d, hs, rows, heads, slots, logical, reserve,
                  offsets.view(rows, heads), counts, caps)
    vk, vv = make_view(pool_k, rows, heads, logical, d), make_view(pool_v, rows, heads, logical, d)
    max_len = int(counts.max()) if counts.numel() else 0
    meta = HostMeta(rows, heads, hs, slots, logical, reserve, max_len, reserve,
                    vk.untyped_storage().nbytes())
    vk._adakv_meta = vv._adakv_meta = meta
    return vk, vv


def _regrow(view_k: torch.Tensor, view_v: torch.Tensor, pool_k, pool_v, lay: Layout, need: int) -> Layout:
    """Re-lay out both pools with room for ``need`` more tokens per segment; resize storage in place."""
    d = view_k.shape[-1]
    room = max(lay.reserve, math.ceil(int(lay.lengths.max()) / 8), need)
    new_caps = lay.lengths + room
    new_off = lay.hs + torch.cumsum(new_caps.reshape(-1), 0) - new_caps.reshape(-1)
    slots = lay.hs + int(new_caps.sum())
    src = _segment_slots(lay.offsets, lay.lengths)
    dst = _segment_slots(new_off, lay.lengths)
    moved_pos = positions_of(pool_v, lay.slots, d)[src].clone()
    for pool, view in ((pool_k, view_k), (pool_v, view_v)):
        moved = pool[: lay.slots * d].view(-1, d)[src].clone()
        hdr = pool[: lay.hs * d].clone()
        st = view.untyped_storage()
        numel = slots * d if pool is pool_k else _pos_region(slots, d, view.element_size())[1]
        st.resize_(numel * view.element_size())
        fresh = torch.empty(0, dtype=view.dtype, device=view.device).set_(st, 0, (numel,), (1,))
        fresh.zero_()
        fresh[: lay.hs * d] = hdr
        fresh[: slots * d].view(slots, d)[dst] = moved
        if pool is pool_k:
            new_pool_k = fresh
        else:
            positions_of(fresh, slots, d)[dst] = moved_pos
    _write_header(new_pool_k, d, lay.hs, lay.rows, lay.heads, slots, lay.logical, lay.reserve,
                  new_off.view(lay.rows, lay.heads), lay.lengths, new_caps)
    return Layout(lay.rows, lay.heads, lay.hs, slots, lay.logical, lay.reserve,
                  new_off.view(lay.rows, lay.heads), lay.lengths, new_caps.view(lay.rows, lay.heads),
                  room)


_SMALL: dict = {}


def _triton_ok() -> bool:
    from .dispatch import use_triton
    return use_triton()


def _cached_views(view_k, view_v, meta: "HostMeta", d: int):
    """Pools, header and offset/length views of a store, made once per layout (views are cheap to keep,
    costly to rebuild every decode step)."""
    key = (view_k.untyped_storage().data_ptr(), view_v.untyped_storage().data_ptr(), meta.slots)
    cached = meta._views
    if cached is None or cached[0] != key:
        pool_k, pool_v = pool_of(view_k), pool_of(view_v)
        off, lens = device_lengths(pool_k, meta, d)
        hdr = pool_k[: meta.hs * d].view(torch.int32)
        pos = positions_of(pool_v, meta.slots, d)
        cached = meta._views = (key, (pool_k, pool_v, off, lens, hdr, pos))
    return cached[1]


def _small(kind: str, t: int, device) -> torch.Tensor:
    """Tiny per-(t, device) constants for the decode step, made once (no host-to-device copy per step)."""
    key = (kind, t, str(device))
    x = _SMALL.get(key)
    if x is None:
        x = (torch.arange(t, device=device) if kind == "arange"
             else torch.tensor([-t, t], dtype=torch.int32, device=device))
        _SMALL[key] = x
    return x


def append(view_k: torch.Tensor, view_v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
    """Write ``t`` new tokens [B, Hkv, t, D] at the end of every segment, in place.

    Returns ``(pool_k, pool_v, offsets, lengths, meta)`` *after* the append; offsets/lengths are
    device int32 views of the header. No device-to-host read unless the store must grow.
    """
    if not is_store_view(view_v):
        pool_of(view_v)  # raises the explanatory StoreError
    meta = host_meta(view_k)
    t = k_new.shape[2]
    d = view_k.shape[-1]
    if meta.min_room < t:
        pool_k, lay = read_layout(view_k)
        pool_v = pool_of(view_v)
        if pool_v.numel() != _pos_region(lay.slots, d, view_v.element_size())[1]:
            raise StoreError("keys and values stores of one layer disagree in size")
        lay = _regrow(view_k, view_v, pool_k, pool_v, lay, t)
        meta.slots, meta.min_room = lay.slots, lay.min_room
        meta.nbytes = view_k.untyped_storage().nbytes()
    pool_k, pool_v, off, lens, hdr, pos = _cached_views(view_k, view_v, meta, d)
    if k_new.is_cuda and _triton_ok():
        from .triton_append import append_triton
        bh = meta.rows * meta.heads
        append_triton(pool_k, pool_v, hdr, k_new, v_new, H_PER_HEAD, H_PER_HEAD + bh, H_MINROOM, H_LOGICAL,
                      pos, meta.logical)
    else:
        arange = _small("arange", t, k_new.device)
        slot = (off + lens).to(torch.int64)[:, :, None] + arange  # [B,H,t]
        slot = slot.reshape(-1)
        pool_k.view(-1, d).index_copy_(0, slot, k_new.reshape(-1, d).to(pool_k.dtype))
        pool_v[: meta.slots * d].view(-1, d).index_copy_(0, slot, v_new.reshape(-1, d).to(pool_v.dtype))
        pos.index_copy_(0, slot, (meta.logical + arange).to(torch.int32).expand(
            meta.rows, meta.heads, t).reshape(-1))
        lens += t
        hdr[H_MINROOM: H_LOGICAL + 1] += _small("delta", t, hdr.device)
    meta.logical += t
    meta.min_room -= t
    meta.max_len += t
    view_v.__dict__["_adakv_meta"] = meta
    return pool_k, pool_v, off, lens, meta


def gather_padded(pool: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, max_len: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments as a padded [B, Hkv, max_len, D] tensor and a [B, Hkv, max_len] validity mask."""
    idx = torch.arange(max_len, device=pool.device)
    valid = idx < lengths[:, :, None]
    slot = torch.where(valid, offsets.to(torch.int64)[:, :, None] + idx, 0)
    data = pool[: (pool.numel() // head_dim) * head_dim]
    return data.view(-1, head_dim)[slot], valid


def unpack(view_k: torch.Tensor, view_v: torch.Tensor | None = None, positions: bool = False):
    """Per (row, head) kept K (and V, and positions) as nested lists of tensors — for tests and tools.

    ``unpack(k)`` → K lists; ``unpack(k, v)`` → (K, V); ``positions=True`` (needs ``view_v``) appends the
    int32 positions (index in the model's padded sequence) of the kept tokens.
    """
    pool_k, lay = read_layout(view_k)
    d = view_k.shape[-1]
    if positions and view_v is None:
        raise ValueError("unpack(positions=True) needs the values view (positions live in its store)")
    pools = [pool_k[: lay.slots * d]]
    if view_v is not None:
        pool_v = pool_of(view_v)
        pools.append(pool_v[: lay.slots * d])
        if positions:
            pools.append(positions_of(pool_v, lay.slots, d)[:, None])
    out = []
    for pool in pools:
        flat = pool if pool.dim() == 2 else pool.view(-1, d)
        out.append([[flat[int(lay.offsets[b, h]): int(lay.offsets[b, h] + lay.lengths[b, h])]
                     for h in range(lay.heads)] for b in range(lay.rows)])
    if positions:
        out[-1] = [[p[:, 0] for p in row] for row in out[-1]]
    return tuple(out) if view_v is not None else out[0]


def store_bytes(view: torch.Tensor) -> int:
    """Bytes held by the storage behind a cache tensor (view or plain tensor)."""
    return view.untyped_storage().nbytes()
