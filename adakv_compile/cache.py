"""AdaKVCache: the fast path's cache — preallocated, static addresses, graph-replayable decode.

HF's own fast path needs ``StaticCache``; ours needs this one (one line in user code)::

    backend = adakv_compile.compile_model(model, AdaKVConfig(budget=1024))
    cache = AdaKVCache(model, backend, batch_size=8, max_new_tokens=256)
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=256)  # past_key_values= < 5.24

Each layer holds fixed-size tensors (``kernels/static.py`` has the layout): nothing is allocated,
moved or resized after construction, so the compiled decode step replays as one CUDA graph. The pools are
sized from the config: per row, every KV head's kept tokens (window included, with the official
safeguard's rounding slack) plus ``max_new_tokens`` free slots per head for the tokens appended after the
prompt (generated tokens, or a question after a compressed context). Appending more raises
``StoreError`` before the step runs.

``update`` (traced by Dynamo inside the model) calls the ``adakv::cache_slot`` marker, which the
backend's pass rewrites into compress (prefill) or append + attend (decode). Without that rewrite —
uncompiled model, another backend — the marker raises: a compacted cache never reaches code that would
read it as a dense one.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import AdaKVConfig, alpha_floor, keep_for_row
from .kernels import static as _static  # noqa: F401  (registers torch.ops.adakv.cache_slot & co)
from .kernels.store import StoreError
from .sizing import kept_per_head_bound, rank_kept_bound  # noqa: F401  (moved; re-exported here)

# fused-merge counters per (row, KV head): blocks of up to 64 query rows (triton_attend.merge_counters)
MERGE_BLOCKS = 8


class RequestError(StoreError, ValueError):
    """A call the compiled model refuses before tracing (wrong batch, empty prompt, a used cache, ...).

    Raised in plain Python outside the graph, so Dynamo never sees a failing trace and later calls run as
    if the bad one had never happened. A ValueError (bad input) and a StoreError (what such calls raised
    before)."""


def _cache_bytes(shapes: list, batch_size: int) -> int:
    """Bytes of an AdaKVCache of ``batch_size`` rows with these per-layer shapes (as ``nbytes()`` counts)."""
    total = 0
    for shape in shapes:
        if shape[0] == "window":  # a sliding-window ring (hybrid.AdaKVWindowLayer): K, V and positions
            _, heads, head_dim, window, dtype, _ = shape
            esize = torch.empty((), dtype=dtype).element_size()
            total += batch_size * window * (2 * heads * head_dim * esize + 4)
            continue
        if shape[0] == "state":  # transformers' own static state layer: allocated by it, not counted
            continue
        heads, head_dim, kept, room, dtype, _ = shape
        slots = heads * kept + (heads + 1) // 2 + heads * room          # AdaKVLayer.slots_per_row
        n = batch_size * slots + 1
        esize = torch.empty((), dtype=dtype).element_size()
        total += 2 * n * head_dim * esize + 2 * batch_size * heads * 4 + n * 4 + 8
    return total


def _free_bytes(device: torch.device) -> int:
    """Memory an allocation on ``device`` can use now (CUDA: free + cached by PyTorch; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return 1 << 62  # unknown (meta, other accelerators): do not refuse
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _check_fits(shapes: list, batch_size: int, what: str) -> None:
    """Raise MemoryError naming the bytes a cache needs when its device cannot hold it (before allocating)."""
    for device in {torch.device(s[-1]) for s in shapes}:
        on = [s for s in shapes if torch.device(s[-1]) == device]
        need, free = _cache_bytes(on, batch_size), _free_bytes(device)
        if need > free:
            row = _cache_bytes(on, 1) - _cache_bytes(on, 0)
            fit = max(0, (free - _cache_bytes(on, 0)) // row)
            raise MemoryError(f"{what} needs {need} bytes ({need / 2**30:.2f} GiB) on {device}, but only {free} "
                              f"bytes ({free / 2**30:.2f} GiB) are free: {fit} rows of {row} bytes fit "
                              "(AdaKVCache.max_batch); use fewer rows, a smaller budget or max_new_tokens")


class AdaKVLayer(CacheLayerMixin):
    """One attention layer's static compacted store (tensors laid out as in ``kernels/static.py``)."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "AdaKVCache", batch_size: int, heads: int, head_dim: int, kept_per_head: int,
                 room: int, dtype: torch.dtype, device: torch.device, seen: Optional[torch.Tensor] = None):
        super().__init__()
        # slack (heads + 1) // 2: the official safeguard rounds each head's budget (sum may exceed by 1/2 a head)
        self.slots_per_row = heads * kept_per_head + (heads + 1) // 2 + heads * room
        self.batch_size, self.num_heads, self.head_dim, self.room = batch_size, heads, head_dim, room
        self.kept_per_head = kept_per_head
        n = batch_size * self.slots_per_row + 1
        self.pool_k = torch.zeros(n, head_dim, dtype=dtype, device=device)
        self.pool_v = torch.zeros(n, head_dim, dtype=dtype, device=device)
        self.off = torch.zeros(batch_size, heads, dtype=torch.int32, device=device)
        self.lens = torch.zeros(batch_size, heads, dtype=torch.int32, device=device)
        self.pos = torch.zeros(n, dtype=torch.int32, device=device)
        # shared by the cache's layers on one device; advanced between graph calls (AdaKVCache.advance)
        self.seen = torch.zeros((), dtype=torch.int64, device=device) if seen is None else seen
        # the fused split-K merge's arrival counters (ADAKV_FUSED_MERGE, on for CUDA; zero between launches: the
        # kernel leaves them so; reset() re-zeroes them after an aborted launch). MERGE_BLOCKS blocks of
        # query rows per (row, KV head): a longer chunk falls back to the merge launch.
        self.sem = torch.zeros(batch_size * heads * MERGE_BLOCKS, dtype=torch.int32, device=device)
        self.device = device
        ref = weakref.ref(owner)
        for t in self.tensors() + (self.sem,):
            torch._dynamo.mark_static_address(t)
            t._adakv_cache = ref  # lets the backend's wrapper find the cache from a graph input
        self.compressed = False
        self.is_initialized = True
        self._untraced = None  # an untraced prefill filling this layer (untraced.py), set while it runs

    def shape(self) -> tuple:
        """(heads, head_dim, kept_per_head, room, dtype, device): this layer's AdaKVLayer arguments."""
        return (self.num_heads, self.head_dim, self.kept_per_head, self.room, self.pool_k.dtype,
                self.pool_k.device)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.pool_k, self.pool_v, self.off, self.lens, self.pos, self.seen

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != self.batch_size or key_states.shape[1] != self.num_heads:
            raise StoreError(f"AdaKVCache was built for batch {self.batch_size} x {self.num_heads} KV heads, got "
                             f"K/V of shape {tuple(key_states.shape)}")
        if not torch.compiler.is_compiling() and self._untraced is not None:  # (constant False when traced)
            return self._untraced.layer_update(self, key_states, value_states)
        k, v = torch.ops.adakv.cache_slot(key_states, value_states, self.pool_k, self.pool_v, self.off,
                                          self.lens, self.pos, self.seen, self.room, self.compressed, self.sem)
        self.compressed = True
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The rewritten attention ignores the model's mask after prefill (the store holds no padding);
        # a chunk-sized mask keeps shapes static and consistent with the K/V the marker returns.
        return query_length, 0

    def get_seq_length(self):
        return self.seen  # a 0-d device tensor, like HF's StaticLayer: positions are computed in-graph

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.lens.zero_()
        self.off.zero_()
        self.seen.zero_()
        self.sem.zero_()
        self.compressed = False

    def _unsupported(self, *args, **kwargs):
        raise StoreError("AdaKVCache does not support this cache operation (beam-search reorder, crop, batch "
                         "repeat/select, offloading): its per-head segments cannot be reindexed in place")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = offload = prefetch = _unsupported


class AdaKVCache(Cache):
    """A preallocated compacted KV cache for ``batch_size`` rows and ``max_new_tokens`` appended tokens.

    model: the HF model (or its config; then pass ``device`` and ``dtype``).
    config: the AdaKVConfig, or the backend (its config is used; the backend checks they match).
    max_prompt_len: needed only when the kept count depends on the prompt (compression_ratio, skip_layers).
    tp_size: tensor-parallel ranks sharing the KV heads (default: ``model.tp_size``); this rank holds
        ``heads / tp_size`` of them.
    tp_reserve: under tensor parallelism with ``tp_allocation="global"``, what each rank reserves per row,
        in times its even share of the kept tokens. None (default): the most the global top-k can give the
        rank's heads — the selection is always the one-GPU selection (1.8x the even share at 2 ranks, 6.4x at
        8 with one KV head each). A smaller reserve (e.g. 1.25) saves that memory; a row whose global
        allocation gives this rank more keeps its window and best-scored chosen tokens up to the reserve
        (``tp_trimmed()`` counts what was dropped). Without tensor parallelism it has no effect.
    """

    def __init__(self, model, config, batch_size: int, max_new_tokens: int,
                 max_prompt_len: Optional[int] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, tp_size: Optional[int] = None,
                 tp_reserve: Optional[float] = None):
        config, shapes = self._plan(model, config, batch_size, max_new_tokens, max_prompt_len, device, dtype,
                                    tp_size, tp_reserve)
        _check_fits(shapes, batch_size, f"AdaKVCache(batch_size={batch_size}, max_new_tokens={max_new_tokens})")
        self._setup(config, batch_size, shapes, max_new_tokens, 0)
        self.max_prompt_len = max_prompt_len

    @classmethod
    def _plan(cls, model, config, batch_size, max_new_tokens, max_prompt_len=None, device=None, dtype=None,
              tp_size=None, tp_reserve=None) -> tuple:
        """(config, per-layer AdaKVLayer shapes) of a cache, checked, without allocating anything."""
        if isinstance(getattr(config, "config", None), AdaKVConfig):  # an adakv backend (not imported: a cycle)
            config = config.config
        if not isinstance(config, AdaKVConfig):
            raise TypeError(f"AdaKVCache(config=...) needs an AdaKVConfig or an adakv backend, got "
                            f"{type(config).__name__}")
        if not config.compresses:
            raise ValueError("AdaKVCache(config=...): the config keeps every token (no budget or "
                             "compression_ratio); use a DynamicCache or StaticCache for exact mode")
        for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AdaKVCache({name}={value!r}): must be an integer >= 1")
        if max_prompt_len is not None and (not isinstance(max_prompt_len, int) or max_prompt_len < 1):
            raise ValueError(f"AdaKVCache(max_prompt_len={max_prompt_len!r}): must be an integer >= 1")
        if isinstance(model, torch.nn.Module):
            p = next(model.parameters())
            device = p.device if device is None else torch.device(device)
            dtype = p.dtype if dtype is None else dtype
            mconf = model.config
        else:
            mconf = model
            if device is None or dtype is None:
                raise ValueError("AdaKVCache(model=<config>): pass device= and dtype= with a config")
            device = torch.device(device)
        text = mconf.get_text_config() if hasattr(mconf, "get_text_config") else mconf
        from .hybrid import check_supported, layer_specs

        specs = layer_specs(text)  # hybrid models: per layer its type, heads and head_dim (hybrid.py)
        check_supported(specs)
        full = [h for t, _, h, _ in specs if t == "full_attention"]
        heads = full[0] if full else specs[0][2]
        if tp_size is None:  # a transformers model sharded with tp_plan: this rank holds heads / tp_size
            tp_size = getattr(model, "tp_size", None) or 1 if isinstance(model, torch.nn.Module) else 1
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1 or heads % tp_size \
                or any(h % tp_size for _, _, h, _ in specs):
            raise ValueError(f"AdaKVCache(tp_size={tp_size!r}): must be an integer >= 1 dividing the model's "
                             f"{heads} KV heads")
        if tp_size > 1 and any(t != "full_attention" for t, _, _, _ in specs):
            raise ValueError(f"AdaKVCache(tp_size={tp_size}): tensor parallelism with sliding-window or "
                             "linear-attention layers is not supported on the fast path; use a DynamicCache")
        # attention layers in order (the index compress sees, for skip_layers and the pyramid schedule)
        attn = [i for i, (t, _, _, _) in enumerate(specs) if t in ("full_attention", "sliding_attention")]
        kept = {i: kept_per_head_bound(config, max_prompt_len, a) for a, i in enumerate(attn)}
        if tp_reserve is not None and (isinstance(tp_reserve, bool) or not isinstance(tp_reserve, (int, float))
                                       or not tp_reserve >= 1):
            raise ValueError(f"AdaKVCache(tp_reserve={tp_reserve!r}): must be a number >= 1 (times this rank's "
                             "even share of the kept tokens), or None for the worst case")
        if tp_size > 1:
            local = heads // tp_size
            worst = {i: -(-rank_kept_bound(config, heads, local, k, max_prompt_len) // local)
                     for i, k in kept.items()}
            kept = worst if tp_reserve is None else {i: min(w, math.ceil(tp_reserve * kept[i]))
                                                     for i, w in worst.items()}
        shapes = []
        for i, (t, kw, h, d) in enumerate(specs):
            if t == "full_attention":
                shapes.append((h // tp_size, d, kept[i], max_new_tokens, dtype, device))
            elif t == "sliding_attention":
                shapes.append(("window", h, d, int(kw["sliding_window"]), dtype, device))
            else:
                shapes.append(("state", t, kw, device))
        return config, shapes

    @classmethod
    def bytes_per_row(cls, model, config, max_new_tokens: int, **kwargs) -> int:
        """Bytes one more row costs (all layers), for a cache built with the same arguments; nothing is
        allocated. ``kwargs``: AdaKVCache's max_prompt_len, device, dtype, tp_size, tp_reserve."""
        _, shapes = cls._plan(model, config, 1, max_new_tokens, **kwargs)
        return _cache_bytes(shapes, 1) - _cache_bytes(shapes, 0)

    @classmethod
    def max_batch(cls, model, config, max_new_tokens: int, free_bytes: Optional[int] = None, **kwargs) -> int:
        """How many rows an AdaKVCache of these arguments can hold, before allocating it.

        free_bytes: a byte budget for the whole cache; None: the memory free now on the cache's device (CUDA:
        free device memory plus what PyTorch's allocator holds unused; CPU: MemAvailable). 0 if not even one
        row fits. ``kwargs``: AdaKVCache's max_prompt_len, device, dtype, tp_size, tp_reserve."""
        _, shapes = cls._plan(model, config, 1, max_new_tokens, **kwargs)
        row, fixed = _cache_bytes(shapes, 1) - _cache_bytes(shapes, 0), _cache_bytes(shapes, 0)
        if free_bytes is None:
            free_bytes = min(_free_bytes(d) for d in {torch.device(s[-1]) for s in shapes})
        elif isinstance(free_bytes, bool) or not isinstance(free_bytes, int) or free_bytes < 0:
            raise ValueError(f"AdaKVCache.max_batch(free_bytes={free_bytes!r}): must be an integer >= 0")
        return max(0, (free_bytes - fixed) // row)

    def _setup(self, config: AdaKVConfig, batch_size: int, shapes: list, max_new_tokens: int,
               appended: int) -> None:
        """Fresh zeroed layers; ``shapes``: per layer the AdaKVLayer arguments (``AdaKVLayer.shape()``)."""
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.appended = appended  # tokens appended since the prefill (the backend's wrapper counts them)
        seen: dict = {}  # one `seen` per device: the wrapper advances each once per step
        for shape in shapes:
            device = torch.device(shape[-1])
            seen.setdefault(device, torch.zeros((), dtype=torch.int64, device=device))
        self._seen = list(seen.values())
        super().__init__(layers=[self._layer(batch_size, shape, seen[torch.device(shape[-1])]) for shape in shapes])
        self.max_prompt_len = None
        # fixed-slot serving (load_rows / free_rows): per row, tokens appended since it was loaded or freed;
        # ``_free`` is None until the cache is used in slots, then the set of rows holding no request
        self._row_appended = [0] * batch_size
        self._free: Optional[set] = None


    def _layer(self, batch_size: int, shape: tuple, seen: torch.Tensor):
        """A layer from its ``shape``: AdaKVLayer arguments, ("window", heads, head_dim, W, dtype, device) or
        ("state", layer type, HF kwargs, device) (hybrid.py)."""
        from .hybrid import AdaKVWindowLayer, state_layer

        if shape[0] == "window":
            return AdaKVWindowLayer(self, batch_size, *shape[1:], seen=seen)
        if shape[0] == "state":
            return state_layer(shape[1], shape[2])
        return AdaKVLayer(self, batch_size, *shape, seen=seen)

    def _full_attention_only(self, what: str) -> None:
        if len(self.compressed_layers) != len(self.layers):
            raise ValueError(f"AdaKVCache.{what}: not supported for hybrid models (sliding-window or "
                             "linear-attention layers) yet; prefill such requests as one batch")

    def holds_prompt(self) -> bool:
        """Whether a prompt was prefilled (every compacted store and sliding ring filled; state layers have
        no such flag)."""
        return all(getattr(layer, "compressed", getattr(layer, "filled", True)) for layer in self.layers)

    @property
    def compressed_layers(self) -> list:
        """The layers holding a compacted store (full attention); a hybrid model has others beside them."""
        return [layer for layer in self.layers if isinstance(layer, AdaKVLayer)]

    def get_seq_length(self, layer_idx: int = 0):
        return self._seen[0]  # one count for every layer type (a 0-d tensor: positions computed in-graph)

    def reset(self):
        super().reset()
        self.appended = 0
        self._row_appended = [0] * len(self._row_appended)
        self._free = None

    # called by the backend's wrapper around each compiled graph that reads this cache
    def before_prefill(self, config: AdaKVConfig) -> None:
        if config.key() != self.config.key():
            raise StoreError("AdaKVCache was sized for another AdaKVConfig than the backend compresses with "
                             f"(cache: {self.config}, backend: {config}); build it from the backend: "
                             "AdaKVCache(model, backend, ...)")
        if any(getattr(layer, "compressed", False) or getattr(layer, "filled", False) for layer in self.layers):
            raise StoreError("AdaKVCache already holds a compressed prompt; call cache.reset() (or make a new "
                             "cache) before prefilling another one")
        self.appended = 0

    def before_append(self, t: int) -> None:
        if self._free is not None:
            self._slot_append(t)
            return
        if self.appended + t > self.max_new_tokens:
            raise StoreError(f"AdaKVCache(max_new_tokens={self.max_new_tokens}) is full: {self.appended} tokens "
                             f"were appended after the prompt and {t} more do not fit; size the cache for all "
                             "tokens generated or appended after the prefill")
        if self.appended == 0:
            from .hybrid import mark_states_static
            mark_states_static(self.layers)
        self.appended += t

    # -- fixed-slot serving: one cache of max-batch rows for the server's life, rows filled and freed in place ---
    # Same tensors, same addresses, same batch size: the compiled decode step (and its CUDA graph) serves
    # every request; nothing is compiled or recorded again when requests come and go.

    def _slot_list(self, slots, what: str) -> list[int]:
        self._full_attention_only(what)
        B = self.batch_size
        out = [int(r) for r in torch.as_tensor(slots, dtype=torch.int64).reshape(-1).tolist()]
        bad = [r for r in out if not 0 <= r < B]
        if bad:
            raise IndexError(f"AdaKVCache.{what}(slots={bad}): out of range for a cache of {B} rows")
        if len(set(out)) != len(out):
            raise ValueError(f"AdaKVCache.{what}(slots={out}): a slot is named twice")
        return out

    def _enter_slots(self, loading=()) -> None:
        if self._free is None:  # first use in slots: every other row becomes a free row with its own room
            self._free = set()
            rest = [r for r in range(self.batch_size) if r not in set(loading)]
            if rest:
                self.free_rows(rest)
            for layer in self.layers:
                layer.compressed = True  # the decode graph reads this cache from now on

    def free_rows(self, slots) -> None:
        """Empty ``slots`` in place (finished requests out). A free row keeps being decoded with the others
        (its tokens are ignored) inside room of its own, recycled here when used up; no tensor changes
        address or size."""
        slots = self._slot_list(slots, "free_rows")
        self._enter_slots()
        if not slots:
            return
        for layer in self.layers:
            S, H = layer.slots_per_row, layer.num_heads
            idx = torch.tensor(slots, device=layer.off.device)
            base = idx[:, None] * S + torch.arange(H, device=idx.device) * (S // H)  # each head: S // H >= room
            layer.off[idx] = base.to(layer.off.dtype)
            layer.lens[idx] = 0
        for r in slots:
            self._row_appended[r] = 0
            self._free.add(r)

    def load_rows(self, slots, src: "AdaKVCache") -> None:
        """Copy the rows of ``src`` (a prefilled cache of ``len(slots)`` rows, e.g. one request's batch-1
        prefill) into rows ``slots`` of this cache, in place: same tensors and addresses, so the compiled
        decode step and its CUDA graph stay valid. Each row then has ``max_new_tokens`` of room of its own and
        decodes at the position ids its caller gives (its own count of tokens). ``src`` is not modified
        (reset and reuse it for the next prefill)."""
        slots = self._slot_list(slots, "load_rows")
        if not isinstance(src, AdaKVCache):
            raise TypeError(f"AdaKVCache.load_rows(src=...) needs an AdaKVCache, got {type(src).__name__}")
        n = src.batch_size
        if len(slots) != n:
            raise ValueError(f"AdaKVCache.load_rows: {len(slots)} slots for a source cache of {n} rows")
        _check_compatible(src, self, "AdaKVCache.load_rows: src", "this cache")
        if not all(layer.compressed for layer in src.layers):
            raise StoreError("AdaKVCache.load_rows: src holds no prefilled prompt (run the compiled model on "
                             "its prompt first)")
        self._enter_slots(loading=slots)
        for j, (dst, old) in enumerate(zip(self.layers, src.layers)):
            dev, S, room = dst.pool_k.device, dst.slots_per_row, dst.room
            lens = old.lens.to(torch.int64)                                            # [n, H]
            need = int((lens.sum(-1) + dst.num_heads * room).max())
            if need > S:
                raise StoreError(f"AdaKVCache.load_rows: a row of src holds {need - dst.num_heads * room} tokens "
                                 f"in layer {j}; this cache's rows hold {S - dst.num_heads * room} (build both "
                                 "caches with the same arguments)")
            idx = torch.tensor(slots, device=dev)
            seg = lens + room
            off = torch.cumsum(seg, -1) - seg + idx[:, None] * S
            width = int(lens.max())
            if width:
                k = torch.arange(width, device=dev)
                valid = k < lens[..., None]
                s_idx = (old.off.to(torch.int64)[..., None] + k)[valid]
                d_idx = (off[..., None] + k)[valid]
                dst.pool_k.index_copy_(0, d_idx, old.pool_k.index_select(0, s_idx))
                dst.pool_v.index_copy_(0, d_idx, old.pool_v.index_select(0, s_idx))
                dst.pos.index_copy_(0, d_idx, old.pos.index_select(0, s_idx))
            dst.off[idx] = off.to(dst.off.dtype)
            dst.lens[idx] = lens.to(dst.lens.dtype)
        for r in slots:
            self._row_appended[r] = 0
            self._free.discard(r)

    def live_rows(self) -> list[int]:
        """Rows holding a request (fixed-slot use); every row before the cache is used in slots."""
        rows = range(self.batch_size)
        return list(rows) if self._free is None else [r for r in rows if r not in self._free]

    def room_left(self) -> int:
        """Tokens every row holding a request can still append."""
        if self._free is None:
            return self.max_new_tokens - self.appended
        live = [self._row_appended[r] for r in self.live_rows()]
        return self.max_new_tokens - max(live, default=0)

    def _slot_append(self, t: int) -> None:
        full = [r for r in self.live_rows() if self._row_appended[r] + t > self.max_new_tokens]
        if full:
            raise StoreError(f"AdaKVCache(max_new_tokens={self.max_new_tokens}): rows {full} are full ("
                             f"{max(self._row_appended[r] for r in full)} tokens appended since they were "
                             f"loaded, {t} more do not fit); free them (free_rows) or size the cache larger")
        spent = [r for r in self._free if self._row_appended[r] + t > self.max_new_tokens]
        if spent:  # idle rows start over in their own room (in place, outside the graph)
            self.free_rows(spent)
        self._row_appended = [a + t for a in self._row_appended]
        self.appended = max((self._row_appended[r] for r in self.live_rows()), default=0)

    def advance(self, t: int) -> None:
        """Count ``t`` more tokens seen (a prefill's prompt or an appended chunk), after the graph that added
        them ran. The graphs only read ``seen``: written inside one, Inductor could schedule a fused read of
        it (the model's positions) after the write."""
        for seen in self._seen:
            seen.add_(t)

    def tp_trimmed(self) -> int:
        """Tokens the last prefill dropped on this rank because the global allocation gave its heads more
        than ``tp_reserve`` (0 with the default reserve, or without tensor parallelism). Reads the device."""
        return int(sum(int(layer.pos[-1]) for layer in self.compressed_layers))

    def kept_positions(self, layer: int) -> list[list[torch.Tensor]]:
        """Per row and KV head, the positions (in the padded prompt + appended tokens) a layer holds."""
        lay = self.layers[layer]
        off, lens = lay.off.tolist(), lay.lens.tolist()
        return [[lay.pos[o:o + n].clone() for o, n in zip(orow, nrow)] for orow, nrow in zip(off, lens)]

    def nbytes(self) -> int:
        """Bytes held by all layers' tensors (what the cache costs, independent of what is used)."""
        total = 0
        for layer in self.layers:
            if hasattr(layer, "tensors"):
                ts = layer.tensors()
            else:  # a linear-attention / conv layer: the model's own states
                ts = [t for d in (getattr(layer, "conv_states", None) or {}, getattr(layer, "recurrent_states",
                                                                                    None) or {})
                      for t in d.values() if isinstance(t, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in ts)
        return total

    # -- many long requests: prefill apart, decode together, drop finished rows ------------------------------
    # New caches (load_rows / free_rows above edit rows in place instead, for a server's one cache): every
    # tensor of a cache keeps its address for its whole life (what
    # Dynamo's static-address marks and CUDA graph replay rely on). A new cache is a new batch size and new
    # addresses: the compiled decode step is specialised (or recorded as a CUDA graph) again for it.

    @classmethod
    def _blank(cls, config: AdaKVConfig, batch_size: int, shapes: list, max_new_tokens: int,
               appended: int) -> "AdaKVCache":
        """An AdaKVCache with fresh zeroed layers of the given shapes (see ``_setup``)."""
        obj = cls.__new__(cls)
        obj._setup(config, batch_size, shapes, max_new_tokens, appended)
        return obj

    @classmethod
    def join(cls, caches, max_new_tokens: Optional[int] = None) -> "AdaKVCache":
        """One batched cache whose rows are the rows of ``caches`` (prefilled, compressed), in order.

        Each cache may come from a prompt of its own length (or a left-padded group of prompts), and may have
        had tokens appended already. The result is a left-padded batch of logical length ``L`` = the largest
        ``get_seq_length()`` of the inputs: the rows of a cache that has seen ``n`` tokens are treated as
        left-padded by ``L - n`` (their stored positions shift by that much; the K/V, with the RoPE positions
        the prompts were run at, are copied as they are). Decode the result with position ids that continue
        each row's own count of real tokens — ``decode_batch`` does, and so does ``model.generate`` given the
        joined attention mask (``left_pad_masks``).

        Every segment gets ``max_new_tokens`` free slots (default: the most any input has left); the new cache
        counts appended tokens from zero. The inputs are not modified (drop them to free their memory).
        """
        caches = list(caches) if not isinstance(caches, AdaKVCache) else [caches]
        if not caches:
            raise ValueError("AdaKVCache.join(caches=[]): give at least one cache")
        for i, c in enumerate(caches):
            if not isinstance(c, AdaKVCache):
                raise TypeError(f"AdaKVCache.join: caches[{i}] is a {type(c).__name__}, not an AdaKVCache")
        first = caches[0]
        L0 = first.layers
        for c in caches:
            c._full_attention_only("join")
        for i, c in enumerate(caches):
            _check_compatible(c, first, f"AdaKVCache.join: caches[{i}]", "caches[0]")
            if not all(layer.compressed for layer in c.layers):
                raise StoreError(f"AdaKVCache.join: caches[{i}] holds no prefilled prompt (run the compiled "
                                 "model on its prompt first)")
            seen = {int(layer.seen) for layer in c.layers}
            if len(seen) != 1:
                raise StoreError(f"AdaKVCache.join: caches[{i}]'s layers disagree on the tokens seen ({seen})")
        if max_new_tokens is None:
            max_new_tokens = max(max(c.max_new_tokens - c.appended, 1) for c in caches)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"AdaKVCache.join(max_new_tokens={max_new_tokens!r}): must be an integer >= 1")
        seen = [int(c.layers[0].seen) for c in caches]
        L = max(seen)
        B = sum(c.batch_size for c in caches)
        room = max_new_tokens
        shapes = []
        for j, lay in enumerate(L0):
            H = lay.num_heads
            slack = (H + 1) // 2
            # kept part of a row (slack included): as large as any input's (so a reset + prefill fits as
            # well), and at least what any row holds now (its appended tokens become kept ones)
            need = max(max(c.layers[j].slots_per_row - H * c.layers[j].room for c in caches),
                       max(int(c.layers[j].lens.sum(-1).max()) for c in caches))
            kept = max(0, -(-(need - slack) // H))
            shapes.append((H, lay.head_dim, kept, room, lay.pool_k.dtype, lay.pool_k.device))
        out = cls._blank(first.config, B, shapes, max_new_tokens, 0)
        for j, new in enumerate(out.layers):
            dev = new.pool_k.device
            lens = torch.cat([c.layers[j].lens for c in caches]).to(torch.int64)          # [B, H]
            seg = lens + room
            off = (torch.cumsum(seg, -1) - seg
                   + torch.arange(B, device=dev)[:, None] * new.slots_per_row)             # [B, H]
            r0 = 0
            for c, n in zip(caches, seen):
                old = c.layers[j]
                b = old.batch_size
                ln = old.lens.to(torch.int64)
                width = int(ln.max()) if ln.numel() else 0
                if width:
                    k = torch.arange(width, device=dev)
                    valid = k < ln[..., None]
                    src = (old.off.to(torch.int64)[..., None] + k)[valid]
                    dst = (off[r0:r0 + b, :, None] + k)[valid]
                    new.pool_k.index_copy_(0, dst, old.pool_k.index_select(0, src))
                    new.pool_v.index_copy_(0, dst, old.pool_v.index_select(0, src))
                    new.pos.index_copy_(0, dst, old.pos.index_select(0, src) + (L - n))
                r0 += b
            new.off.copy_(off)
            new.lens.copy_(lens)
            new.seen.fill_(L)
            new.compressed = True
        return out

    def select_rows(self, rows) -> "AdaKVCache":
        """A new cache holding only ``rows`` (indices in the order given, negatives from the end; or a boolean
        mask over the rows).

        Same sizes per row, same logical length and appended count: the kept rows decode on exactly as
        before (select the same rows of the attention mask / position ids). ``self`` is not modified."""
        self._full_attention_only("select_rows")
        B = self.batch_size
        idx = torch.as_tensor(rows).reshape(-1).cpu()
        if idx.dtype == torch.bool:
            if idx.numel() != B:
                raise ValueError(f"AdaKVCache.select_rows: a boolean mask of {idx.numel()} entries for {B} rows")
            idx = idx.nonzero().reshape(-1)
        idx = idx.to(torch.int64)
        if idx.numel() == 0:
            raise ValueError("AdaKVCache.select_rows: no rows selected (a cache has at least one row)")
        if bool(((idx < -B) | (idx >= B)).any()):
            raise IndexError(f"AdaKVCache.select_rows: rows {idx.tolist()} out of range for a cache of {B} rows")
        idx = idx % B
        out = self._blank(self.config, int(idx.numel()), [lay.shape() for lay in self.layers],
                          self.max_new_tokens, self.appended)
        for old, new in zip(self.layers, out.layers):
            S = old.slots_per_row
            assert new.slots_per_row == S
            i = idx.to(old.pool_k.device)
            src = (i[:, None] * S + torch.arange(S, device=i.device)).reshape(-1)
            n = src.numel()
            new.pool_k[:n].copy_(old.pool_k.index_select(0, src))
            new.pool_v[:n].copy_(old.pool_v.index_select(0, src))
            new.pos[:n].copy_(old.pos.index_select(0, src))
            shift = (torch.arange(i.numel(), device=i.device) - i) * S
            new.off.copy_(old.off.index_select(0, i) + shift[:, None].to(old.off.dtype))
            new.lens.copy_(old.lens.index_select(0, i))
            new.seen.copy_(old.seen)
            new.compressed = old.compressed
        return out

    def drop_rows(self, rows) -> "AdaKVCache":
        """A new cache without ``rows`` (e.g. finished requests); the others keep their order."""
        B = self.batch_size
        drop = {int(r) for r in torch.as_tensor(rows, dtype=torch.int64).reshape(-1).tolist()}
        bad = sorted(r for r in drop if not -B <= r < B)
        if bad:
            raise IndexError(f"AdaKVCache.drop_rows: rows {bad} out of range for a cache of {B} rows")
        drop = {r % B for r in drop}
        keep = [r for r in range(B) if r not in drop]
        if not keep:
            raise ValueError(f"AdaKVCache.drop_rows: dropping all {B} rows leaves an empty cache")
        return self.select_rows(keep)


def _check_compatible(c: AdaKVCache, first: AdaKVCache, name: str, other: str) -> None:
    """ValueError naming what differs between two caches whose rows are to be copied into one."""
    if c.config.key() != first.config.key():
        raise ValueError(f"{name} was built for another AdaKVConfig than {other} ({c.config} vs {first.config}); "
                         "use caches of one backend")
    if len(c.layers) != len(first.layers):
        raise ValueError(f"{name} has {len(c.layers)} layers, {other} has {len(first.layers)} (caches of "
                         "different models)")
    for j, (a, b) in enumerate(zip(c.layers, first.layers)):
        for what, x, y in (("KV heads", a.num_heads, b.num_heads), ("head_dim", a.head_dim, b.head_dim),
                           ("dtype", a.pool_k.dtype, b.pool_k.dtype), ("device", a.pool_k.device, b.pool_k.device)):
            if x != y:
                raise ValueError(f"{name} layer {j} has {what} {x}, {other} has {y}")


def cache_kwarg(model) -> str:
    """The name under which ``model`` (and its ``generate``) takes a cache: ``cache`` on transformers that
    renamed it (5.24+: ``past_key_values`` warns there), ``past_key_values`` before."""
    import inspect

    fn = getattr(model, "forward", model)
    fn = getattr(fn, "_torchdynamo_orig_callable", fn)
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def left_pad_masks(masks) -> torch.Tensor:
    """The attention mask of ``AdaKVCache.join(caches)``: each cache's 2-D mask (``[rows, n]``, ones for a
    prompt without padding; appended tokens included) left-padded with zeros to the longest, rows stacked."""
    masks = [torch.as_tensor(m) for m in masks]
    if not masks or any(m.dim() != 2 for m in masks):
        raise ValueError("left_pad_masks: give one 2-D [rows, length] attention mask per cache")
    L = max(m.shape[1] for m in masks)
    return torch.cat([torch.nn.functional.pad(m.long(), (L - m.shape[1], 0)) for m in masks])


def decode_batch(model, cache: AdaKVCache, first_tokens: torch.Tensor, attention_mask: torch.Tensor,
                 steps: int) -> torch.Tensor:
    """Greedy decoding of ``steps`` tokens per row on a prefilled (e.g. joined) cache, with a bare loop.

    first_tokens: ``[B]`` or ``[B, 1]``, the token each row feeds next (after a prefill: the argmax of the
        row's last prefill logits — each request's own). attention_mask: ``[B, cache.get_seq_length()]``, the
        mask of what the cache has seen (``left_pad_masks`` for a joined cache); it gives each row its next
        position id (its count of real tokens). Runs ``steps`` forward passes (the cache needs room for
        ``steps`` appended tokens) and returns the ``[B, steps]`` tokens that follow ``first_tokens``. To go on
        afterwards: ``first_tokens = out[:, -1]``, ``attention_mask = cat([attention_mask, ones(B, steps)], 1)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"decode_batch(steps={steps!r}): must be an integer >= 1")
    lay = next(layer for layer in cache.layers if hasattr(layer, "seen"))  # hybrid: any layer with a count
    B = lay.batch_size
    tok = torch.as_tensor(first_tokens).reshape(-1, 1)
    seen = int(lay.seen)
    if tok.shape[0] != B:
        raise ValueError(f"decode_batch: {tok.shape[0]} first tokens for a cache of {B} rows")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, seen):
        raise ValueError(f"decode_batch: attention_mask of shape {tuple(attention_mask.shape)}, expected "
                         f"({B}, {seen}) (rows x tokens the cache has seen)")
    device = lay.seen.device
    tok = tok.to(device)
    # The compressed attention never reads the mask after the prefill; only the position ids matter (each
    # row continues its own count, as HF generate's cumsum of the mask gives). No mask is passed, so every
    # step has the same input shapes (one compiled graph / CUDA graph for the whole loop).
    position = attention_mask.to(device).long().sum(-1, keepdim=True)
    kw = cache_kwarg(model)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=tok, position_ids=position, use_cache=True, **{kw: cache}).logits
            tok = logits[:, -1:].argmax(-1)
            out.append(tok)
            position = position + 1
    return torch.cat(out, 1)
