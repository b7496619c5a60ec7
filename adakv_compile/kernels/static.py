"""The static compacted cache: fixed shapes, fixed addresses, every write declared (the fast path).

``AdaKVCache`` (``adakv_compile/cache.py``) preallocates, per layer:

    pool_k, pool_v  [B*S + 1, D]  token slots; row b owns slots [b*S, (b+1)*S); the last slot is a trash
                                  slot that absorbs the writes of dropped tokens (no boolean indexing)
    off, lens       [B, Hkv] int32  first slot (global) and used length of each (row, KV head) segment
    pos             [B*S + 1] int32  position (index in the padded sequence) of the token in each slot; its
                              last entry (the trash slot's) counts the tokens the last prefill trimmed
                              (tensor parallelism with a tp_reserve below the worst case; else 0)
    seen            [] int64  tokens seen so far (prompt incl. padding + appended): HF's sequence length.
                              One tensor shared by all layers, read by the ops and by the model (positions)
                              and advanced only *between* graph calls by the backend's wrapper: a graph that
                              wrote it would let Inductor move a model read of it past the write (it did:
                              fused RoPE kernels recomputed positions after layer 0's compress).

At prefill each segment gets the head's kept tokens followed by ``room`` free slots (the tokens the
cache was sized to append), so decode appends in place and nothing ever moves or grows. S is chosen
by the cache so that every allocation fits (``cache.slots_per_row``).

The ops (registered here; the graph pass inserts them, users never call them):
- ``adakv::cache_slot``       what ``AdaKVLayer.update`` traces to: a marker carrying the new K/V and the
                              layer's tensors to the pass. It has no meaning of its own; run un-rewritten
                              (eager, or compiled by another backend) it raises.
- ``adakv::prefill_compress`` prefill: score, allocate, write the kept K/V into the pools (mutates them); a
                              ``triton_op`` Inductor inlines (config values are graph constants).
- ``adakv::static_compress``  the same as an opaque custom op (config read at run time): tensor parallelism,
                              dynamic shapes.
- ``adakv::static_append``    decode/extend: write the chunk at the end of each segment (mutates them).
- ``adakv::static_attend``    attention of the chunk's queries over the segments (pure).
- ``adakv::static_attend_merged`` ``static_attend`` with the split-K merge done inside the attention launch,
                              counting arrivals on the layer's ``sem`` buffer (CUDA default; ``ADAKV_FUSED_MERGE=0`` off).
``static_append`` and ``static_attend`` are ``triton_op``s: under Inductor their Triton kernels are
inlined into the generated code and the decode step replays as one CUDA graph. Each has an opaque twin
(``*_opaque``, same body) that passes/opaque.py swaps in where the decode graph is replayed as a CUDA graph
(there an inlined launch saves nothing and costs compile time; ``ADAKV_DECODE_OPAQUE`` forces either way).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Optional

import torch
from torch.library import triton_op

from .shard import cap_rows, keep_mask_tp, worst_rank_share
from .attend import store_attention
from .dispatch import triton_on
from .ops import config_for, prompt_scores, register_config, use_triton, valid_from_mask
from .store import StoreError

_EAGER_MESSAGE = (
    "an AdaKVCache is filled and read only by a model compiled with the adakv backend (this attention "
    "layer ran without the adakv rewrite: the model is running uncompiled, was compiled with another "
    "backend — e.g. HF generate's own auto-compile: pass generation_config.disable_compile=True or use "
    "adakv_compile.compile_model — or the attention was not recognised; see backend.report; or Dynamo stopped "
    "compiling the frame and ran it eagerly, e.g. after torch._dynamo.config.recompile_limit variants: a model "
    "compiled with compile_model names that cause)")


@torch.library.custom_op("adakv::cache_slot", mutates_args=())
def cache_slot(k_new: torch.Tensor, v_new: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
               off: torch.Tensor, lens: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor, room: int,
               compressed: bool, sem: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Marker: (k_new, v_new) as the attention's K/V, and the layer's static tensors for the pass.

    ``room``: free slots each segment gets after its kept tokens; ``compressed``: False at prefill;
    ``sem``: the layer's fused-merge counters (``static_attend_merged``)."""
    raise StoreError(_EAGER_MESSAGE)


@cache_slot.register_fake
def _(k_new, v_new, pool_k, pool_v, off, lens, pos, seen, room, compressed, sem=None):
    return torch.empty_like(k_new), torch.empty_like(v_new)


def _check_room(ok: torch.Tensor, what: str) -> None:
    """A capacity check that never syncs on the GPU (device assert) and raises plainly on the CPU; traced
    (inside ``prefill_compress``'s body) it becomes an ``_assert_async`` node Inductor lowers to a device
    assert."""
    if type(ok) is torch.Tensor and ok.device.type == "cpu":
        if not bool(ok.all()):
            raise StoreError(what)
    else:
        torch._assert_async(ok.all(), what)


def _compress(q, k, v, attn_mask, scale, softcap, layer, num_layers, config, room, pool_k, pool_v, off, lens,
              pos, tp_group="", sinks=None, bias=None) -> None:
    """Score, allocate, compact: the body of both compress ops (one place for new arguments).
    ``bias``: the model's per-head additive term over the prompt (ALiBi), added to the scores' logits."""
    B, H, n, D = k.shape
    valid = valid_from_mask(attn_mask, B, n, k.device)
    scores = prompt_scores(q, k, valid, config, scale, softcap or None, v, layer, num_layers, sinks, bias)
    keep = keep_mask_tp(scores, valid, config, layer, num_layers, tp_group)  # [B, H, n]
    cap = (pool_k.shape[0] - 1) // B - H * room                        # kept tokens a row's segments hold
    trimmed = None
    if tp_group and cap < worst_rank_share(config, tp_group, H, n, layer):  # a tp_reserve below the worst case
        keep, trimmed = cap_rows(keep, scores, cap, config.window)
    fill_static(k, v, keep, room, pool_k, pool_v, off, lens, pos)
    if trimmed is None:
        pos[-1:].zero_()
    else:
        pos[-1:].copy_(trimmed.reshape(1))


@torch.library.custom_op("adakv::static_compress",
                         mutates_args=("pool_k", "pool_v", "off", "lens", "pos"))
def static_compress(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    scale: float, softcap: float, layer: int, num_layers: int, config_key: str, room: int,
                    pool_k: torch.Tensor, pool_v: torch.Tensor, off: torch.Tensor, lens: torch.Tensor,
                    pos: torch.Tensor, seen: torch.Tensor, tp_group: str = "",
                    sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> None:
    """Opaque (an extern call under Inductor; reads the config at run time). The rewrite uses it for
    - the tensor-parallel prefill, whose allocation all-gathers the ranks' scores with a plain collective
      (kernels/shard.py);
    - a prefill graph with dynamic shapes (a server's, or the second prompt length Dynamo saw): traced,
      the body would specialise the graph on the prompt length (the Triton scorer picks its split count
      from it on the host), so every new length would recompile, up to Dynamo's recompile limit."""
    _compress(q, k, v, attn_mask, scale, softcap, layer, num_layers, config_for(config_key), room, pool_k,
              pool_v, off, lens, pos, tp_group, sinks, bias)


@triton_op("adakv::prefill_compress", mutates_args=("pool_k", "pool_v", "off", "lens", "pos"))
def prefill_compress(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                     scale: float, softcap: float, layer: int, num_layers: int, config_key: str, room: int,
                     pool_k: torch.Tensor, pool_v: torch.Tensor, off: torch.Tensor, lens: torch.Tensor,
                     pos: torch.Tensor, seen: torch.Tensor, sinks: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> None:
    """``static_compress`` on one GPU, as a ``triton_op``: Inductor traces this body (the fused scorer's and
    the compaction's Triton kernels as ``wrap_triton`` launches, the allocation as aten ops) into the
    prefill graph, so no Python runs per layer at run time. The config is read when the body is traced:
    its values are constants of the compiled graph, and ``config_key`` names the config's content
    (``inline_config_key``), so another config is another graph (docs/design.md, "Compression through
    Inductor")."""
    _compress(q, k, v, attn_mask, scale, softcap, layer, num_layers, config_for(config_key), room, pool_k,
              pool_v, off, lens, pos, "", sinks, bias)


def inline_config_key(config) -> str:
    """The key ``prefill_compress`` nodes carry: a hash of the config's fields, registered to the config
    (the same in every process, so Inductor's caches hit on a restart and miss for another config)."""
    return register_config(config, _inline_key(config))


@functools.lru_cache(maxsize=256)
def _inline_key(config) -> str:
    """(Memoised: ``compress_once`` asks once per layer per prefill; configs are frozen, hashable.)"""
    digest = hashlib.sha256(config.key().encode()).hexdigest()[:16]  # as passes/cache_key.config_key
    return f"adakv-config-{digest}"


def retarget_config(gm: torch.fx.GraphModule, config) -> int:
    """Point every ``prefill_compress`` of ``gm`` at ``config`` (backend.reconfigure's recompile); returns
    how many nodes changed."""
    key = inline_config_key(config)
    changed = 0
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.adakv.prefill_compress.default):
        args = list(node.args)
        if args[8] != key:
            args[8] = key
            node.args = tuple(args)
            changed += 1
    if changed:
        gm.recompile()
    return changed


def fill_static(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, room: int, pool_k: torch.Tensor,
                pool_v: torch.Tensor, off: torch.Tensor, lens: torch.Tensor, pos: torch.Tensor) -> None:
    """Write the kept tokens of k/v [B, H, n, D] (``keep`` [B, H, n]) into the static pools, in position
    order per segment, each segment followed by ``room`` free slots. No host synchronisation (traceable:
    the Triton kernels launch through ``launcher``) and no scan op for Inductor to lower: the slots come from
    our own kernel on the GPU (``triton_fill.segment_slots``; Inductor's split scan of a ``cumsum`` over the
    prompt failed on torch 2.11, issue 17) and from ``segment_slots_plain`` elsewhere."""
    B, H, n, D = k.shape
    slots = (pool_k.shape[0] - 1) // B
    trash = B * slots
    counts = keep.sum(-1)                                                  # [B, H]
    _check_room((counts + room).sum(-1) <= slots,
                f"adakv: a row keeps more tokens than its {slots} static slots (cache sized too small)")
    if triton_on(k):  # kept tokens only (one trash address for all dropped ones serialises)
        from .triton_fill import scatter_kept, segment_slots
        dest, start = segment_slots(keep, counts, room, slots)
        scatter_kept(k, v, dest, pool_k, pool_v, pos)
    else:
        dest, start = segment_slots_plain(keep, counts, room, slots)
        dest = torch.where(dest >= 0, dest, trash)                         # dropped tokens → trash slot
        pool_k.index_copy_(0, dest, k.reshape(-1, D).to(pool_k.dtype))
        pool_v.index_copy_(0, dest, v.reshape(-1, D).to(pool_v.dtype))
        positions = torch.arange(n, device=k.device, dtype=torch.int32).expand(B, H, n).reshape(-1)
        pos.index_copy_(0, dest, positions)
    off.copy_(start)
    lens.copy_(counts)


def segment_slots_plain(keep: torch.Tensor, counts: torch.Tensor, room: int,
                        slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_fill.segment_slots`` in plain torch, scan-free as well (it is what Inductor traces on the CPU):
    the heads before each head are summed through a [H, H] triangle, and a kept token's rank among its
    segment's kept tokens is its place in a stable sort of ``~keep`` (kept tokens first, in position order)."""
    B, H, n = keep.shape
    seg = counts + room                                                    # [B, H]
    before = torch.ones(H, H, dtype=torch.bool, device=keep.device).triu(1)  # [h', h]: h' < h
    start = (seg[:, :, None] * before).sum(1) + torch.arange(B, device=keep.device)[:, None] * slots
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices  # kept first, position order
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=keep.device).expand(B, H, n))
    dest = torch.where(keep, start[..., None] + rank, -1).reshape(-1)
    return dest, start


@triton_op("adakv::static_append", mutates_args=("pool_k", "pool_v", "lens", "pos"))
def static_append(k_new: torch.Tensor, v_new: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                  off: torch.Tensor, lens: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor) -> None:
    B, H, t, D = k_new.shape
    if k_new.device.type == "cuda" and use_triton():
        from .triton_append import static_append_triton
        static_append_triton(pool_k, pool_v, off, lens, pos, seen, k_new, v_new)
    else:
        slot = ((off + lens).to(torch.int64)[:, :, None]
                + torch.arange(t, device=k_new.device)).reshape(-1)        # [B*H*t]
        pool_k.index_copy_(0, slot, k_new.reshape(-1, D).to(pool_k.dtype))
        pool_v.index_copy_(0, slot, v_new.reshape(-1, D).to(pool_v.dtype))
        new_pos = (seen + torch.arange(t, device=k_new.device)).to(torch.int32)
        pos.index_copy_(0, slot, new_pos.expand(B, H, t).reshape(-1))
        lens.add_(t)


@torch.library.custom_op("adakv::static_append_opaque", mutates_args=("pool_k", "pool_v", "lens", "pos"))
def static_append_opaque(k_new: torch.Tensor, v_new: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                         off: torch.Tensor, lens: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor) -> None:
    """``static_append`` as an opaque op (passes/opaque.py: decode graphs replayed as CUDA graphs)."""
    static_append(k_new, v_new, pool_k, pool_v, off, lens, pos, seen)


@static_append_opaque.register_fake
def _(k_new, v_new, pool_k, pool_v, off, lens, pos, seen):
    return None


@triton_op("adakv::static_attend", mutates_args=())
def static_attend(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, off: torch.Tensor,
                  lens: torch.Tensor, scale: float, softcap: float, max_len: int,
                  sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of q [B, Hq, t, D] over each head's segment (which already holds the chunk's t tokens).

    ``max_len`` bounds every segment's length (static: the cache's per-head capacity); it steers the
    split-K choice and the plain path's padding, never the result. ``bias`` (ALiBi, over every position
    seen) is gathered at the slots' positions ``pos``: plain path (the Triton kernel has no bias input).
    """
    return _attend(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sinks, bias, pos)


def _attend(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sinks=None, bias=None, pos=None, sem=None):
    """``static_attend``'s body (and ``static_attend_merged``'s, with its counters ``sem``)."""
    t = q.shape[2]
    if bias is not None:
        return store_attention(q, pool_k.reshape(-1), pool_v.reshape(-1), off, lens, max_len, t, scale, softcap,
                               sinks, bias, pos)
    if triton_on(q):  # CUDA (or ADAKV_KERNELS=interpret: CPU tensors through the interpreter, tests)
        from .triton_attend import store_attention_triton
        return store_attention_triton(q, pool_k, pool_v, off, lens, t, scale, softcap, max_len_bound=max_len,
                                      sinks=sinks, fused_merge=sem is not None, semaphores=sem)
    return store_attention(q, pool_k.reshape(-1), pool_v.reshape(-1), off, lens, max_len, t, scale, softcap,
                           sinks)


@triton_op("adakv::static_attend_merged", mutates_args=("sem",))
def static_attend_merged(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, off: torch.Tensor,
                         lens: torch.Tensor, scale: float, softcap: float, max_len: int, sem: torch.Tensor,
                         sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``static_attend`` (same output) whose split-K pieces are merged by the last piece of each (row, head)
    to finish, not by a second launch (``triton_attend``, ``fused_merge``): one kernel per layer instead of
    two. ``sem`` (the cache layer's int32 counters, zero between launches: the kernel leaves them so) is
    the only tensor written; a separate op so that ``static_attend`` stays pure. The rewrite uses it where
    ``passes/rewrite.fused_merge`` says so (CUDA by default) and there is no ALiBi bias (docs/design.md,
    "Fused split-K merge")."""
    return _attend(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sinks, sem=sem)


@torch.library.custom_op("adakv::static_attend_opaque", mutates_args=())
def static_attend_opaque(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, off: torch.Tensor,
                         lens: torch.Tensor, scale: float, softcap: float, max_len: int,
                         sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                         pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``static_attend`` as an opaque op (passes/opaque.py)."""
    return _attend(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sinks, bias, pos)


@static_attend_opaque.register_fake
def _(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sinks=None, bias=None, pos=None):
    return static_attend(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sinks, bias, pos)  # its layout


@torch.library.custom_op("adakv::static_attend_merged_opaque", mutates_args=("sem",))
def static_attend_merged_opaque(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, off: torch.Tensor,
                                lens: torch.Tensor, scale: float, softcap: float, max_len: int, sem: torch.Tensor,
                                sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``static_attend_merged`` as an opaque op (passes/opaque.py)."""
    return _attend(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sinks, sem=sem)


@static_attend_merged_opaque.register_fake
def _(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sem, sinks=None):
    return static_attend(q, pool_k, pool_v, off, lens, scale, softcap, max_len, sinks)  # its layout
