"""AdaKVConfig: what to keep, validated once at construction.

A config with neither ``budget`` nor ``compression_ratio`` is *exact mode*: every attention is still
rewritten into the project's op, but nothing is dropped and caches stay plain tensors.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Tuple

_POOLINGS = ("max", "avg")
_GQA = ("mean", "max")
_TP_ALLOC = ("global", "per-rank")
_PREFILL_COMPILERS = ("inductor", "regions", "eager", "untraced")
_ALLOC = ("adaptive", "uniform")
_SCHEDULES = ("flat", "pyramid")
_SCORERS = ("snapkv", "streaming", "critical")
_SAFEGUARDS = ("official", "exact-total", "kvpress")


def _fail(field_name: str, value, why: str):
    raise ValueError(f"AdaKVConfig.{field_name}={value!r}: {why}")


@dataclass(frozen=True)
class AdaKVConfig:
    """Ada-KV compression settings (see docs/algorithm.md for the exact semantics).

    budget: tokens kept per KV head on average, the observation window included.
    compression_ratio: alternative to ``budget``: the fraction of each prompt dropped (0 <= r < 1).
    window: the last ``window`` prompt tokens score the rest and are always kept.
    pooling, kernel_size: 1-D pooling of the scores (SnapKV).
    alpha: safeguard; every head keeps at least ``floor(alpha * (budget - window))`` chosen tokens.
    safeguard: how alpha is applied (docs/algorithm.md, Allocation):
        "official" (FFY0/AdaKV ``update_kv_gqa``: head h keeps ``round(c[h] * (1 - alpha) + floor(alpha * B'))``
        tokens, c[h] = its share of the layer's global top-k, rounded half to even; the layer total may
        differ from ``H * B'`` by a few tokens);
        "exact-total" (the same blend apportioned by largest remainder, so the total is exactly ``H * B'``);
        "kvpress" (NVIDIA kvpress AdaKVPress: each head's top floor tokens are forced, the rest of the
        layer's budget goes to the best remaining scores of all heads).
    gqa_reduce: how query-head scores are reduced per KV group.
    allocation: "adaptive" (Ada-KV, one top-k over the layer's heads) or "uniform" (SnapKV).
    layer_schedule: "flat" (same budget every layer) or "pyramid" (PyramidKV, beta = ``pyramid_beta``).
    skip_layers: attention-layer indices (0-based, graph order) that keep their full cache.
    scorer: "snapkv" (window attention), "critical" (value-aware SnapKV, CriticalKV-like:
        kernels/score_critical.py) or "streaming" (StreamingLLM: sinks + most recent).
    sink_tokens: sinks kept by the streaming scorer.
    decode_reserve: free slots reserved per (row, KV head) for new tokens before the store must grow.
    tp_allocation: with tensor parallelism (KV heads sharded over ranks), "global" (default: the layer's
        one top-k sees every rank's scores — the same allocation as on one GPU) or "per-rank" (each rank
        allocates ``local heads x B'`` over its own heads: no collective, equal memory per rank, a
        different selection; docs/design.md "Tensor parallelism").
    merge_linears: merge linears that read the same input (q/k/v, gate/up) into one GEMM in the graph, the
        weights concatenated once at compile time and the parameters re-pointed to slices of the result
        (passes/merge_linears.py). Exact; False keeps the model's own GEMMs.
    head_floor: adaptive allocation only: every head keeps at least ``min(head_floor, B')`` chosen tokens
        (the safeguard floor becomes ``max(floor(alpha * B'), min(head_floor, B'))``, docs/algorithm.md
        "Head floor"). The default 192 departs from the paper: with few KV heads per layer (SmolLM2: 3) the
        paper's alpha floor at tight budgets starves heads the answer needs (issue 19); 0 = the paper's
        semantics (``AdaKVConfig.official()``).
    prefill_chunk: rows per chunk of the prefill's position-wise regions (norms, projections, RoPE, the MLP:
        passes/chunk.py), so their intermediates are O(chunk) and not O(prompt). None (default): chosen from
        the shapes and free memory (~4 GiB of intermediates, at most free/16); 0: off.
    gemv: decode graphs only: linears/mm/addmm of 1..8 rows become the Triton GEMV ``adakv::gemv`` (inlined by
        Inductor; passes/gemv.py), after ``merge_linears``; exact up to fp32 accumulation order. None (default):
        on for graphs on a CUDA card of compute capability 9.0 (H100/H200: there it beats cuBLAS, 32 layers
        1 x 8k 4.67 vs 5.06 ms per token, tokens equal to the eager reference, bench/results/
        e2e-32L-check-h200.md), off elsewhere (not measured); True / False: always / never.
    prefill_compiler: how the backend compiles a prefill graph (the one that fills the cache from the prompt)
        after the rewrite: "inductor" (default: Inductor fuses norms, RoPE and the MLP's elementwise ops);
        "regions" (the same, but the position-wise regions between attentions are cut out also when the prompt
        needs no chunking, and the regions of equal structure — one per layer — share one compile); "eager"
        (the rewritten graph and its chunked regions run as traced, without Inductor: the same proven-mask
        attention, chunking and compression ops, no prefill compile: a faster first ``generate``, a slower
        prefill on long prompts); or "untraced" (``compile_model`` only: Dynamo never traces the prefill; the
        prompt runs through the model's own eager forward, as HF's static cache runs it, and each layer's
        scaled_dot_product_attention call is intercepted to compress its K/V: one whole-model compile, the
        decode step's; a prefill at HF eager speed and memory, unchunked, so ``prefill_chunk`` must stay None
        or 0. Attention it does not recognise falls back to the traced prefill, logged; untraced.py). Decode
        graphs always use the backend's compiler.
    """

    budget: Optional[int] = None
    compression_ratio: Optional[float] = None
    window: int = 32
    pooling: str = "max"
    kernel_size: int = 7
    alpha: float = 0.2
    safeguard: str = "official"
    gqa_reduce: str = "mean"
    allocation: str = "adaptive"
    layer_schedule: str = "flat"
    pyramid_beta: int = 20
    skip_layers: Tuple[int, ...] = field(default_factory=tuple)
    scorer: str = "snapkv"
    sink_tokens: int = 4
    decode_reserve: int = 16
    tp_allocation: str = "global"
    merge_linears: bool = True
    head_floor: int = 192
    prefill_chunk: Optional[int] = None
    gemv: bool | None = None
    prefill_compiler: str = "inductor"

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if self.budget is not None and self.compression_ratio is not None:
            _fail("budget", self.budget, "give either budget or compression_ratio, not both")
        if not is_int(self.window) or self.window < 1:
            _fail("window", self.window, "must be an integer >= 1")
        if self.budget is not None:
            if not is_int(self.budget):
                _fail("budget", self.budget, "must be an integer number of tokens per KV head")
            if self.budget <= self.window:
                _fail("budget", self.budget,
                      f"must be larger than window={self.window} (the budget includes the window)")
        if self.compression_ratio is not None:
            r = self.compression_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0 <= r < 1:
                _fail("compression_ratio", r, "must be a number in [0, 1) (the fraction dropped)")
        if self.pooling not in _POOLINGS:
            _fail("pooling", self.pooling, f"must be one of {_POOLINGS}")
        if not is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            _fail("kernel_size", self.kernel_size, "must be an odd integer >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            _fail("alpha", self.alpha, "must be a number in [0, 1]")
        if self.safeguard not in _SAFEGUARDS:
            _fail("safeguard", self.safeguard, f"must be one of {_SAFEGUARDS}")
        if self.gqa_reduce not in _GQA:
            _fail("gqa_reduce", self.gqa_reduce, f"must be one of {_GQA}")
        if self.allocation not in _ALLOC:
            _fail("allocation", self.allocation, f"must be one of {_ALLOC}")
        if self.layer_schedule not in _SCHEDULES:
            _fail("layer_schedule", self.layer_schedule, f"must be one of {_SCHEDULES}")
        if not is_int(self.pyramid_beta) or self.pyramid_beta < 1:
            _fail("pyramid_beta", self.pyramid_beta, "must be an integer >= 1")
        if self.scorer not in _SCORERS:
            _fail("scorer", self.scorer, f"must be one of {_SCORERS}")
        if not is_int(self.sink_tokens) or self.sink_tokens < 0:
            _fail("sink_tokens", self.sink_tokens, "must be an integer >= 0")
        if not is_int(self.decode_reserve) or self.decode_reserve < 1:
            _fail("decode_reserve", self.decode_reserve, "must be an integer >= 1")
        if self.tp_allocation not in _TP_ALLOC:
            _fail("tp_allocation", self.tp_allocation, f"must be one of {_TP_ALLOC}")
        if not isinstance(self.merge_linears, bool):
            _fail("merge_linears", self.merge_linears, "must be True or False")
        if not is_int(self.head_floor) or self.head_floor < 0:
            _fail("head_floor", self.head_floor, "must be an integer >= 0 (tokens per KV head)")
        if self.prefill_chunk is not None and (not is_int(self.prefill_chunk) or self.prefill_chunk < 0):
            _fail("prefill_chunk", self.prefill_chunk, "must be None (automatic), 0 (off) or rows >= 1")
        if self.gemv is not None and not isinstance(self.gemv, bool):
            _fail("gemv", self.gemv, "must be True, False or None (on where measured)")
        if self.prefill_compiler not in _PREFILL_COMPILERS:
            _fail("prefill_compiler", self.prefill_compiler, f"must be one of {_PREFILL_COMPILERS}")
        if self.prefill_compiler == "untraced" and self.prefill_chunk:
            _fail("prefill_chunk", self.prefill_chunk, 'is not applied by prefill_compiler="untraced" (the prompt '
                  "runs through the model's eager forward, unchunked): leave it None or use another prefill_compiler")
        skip = self.skip_layers
        if isinstance(skip, (list, set, frozenset, range)):
            skip = tuple(sorted(skip))
            object.__setattr__(self, "skip_layers", skip)
        if not isinstance(skip, tuple) or not all(is_int(i) and i >= 0 for i in skip):
            _fail("skip_layers", self.skip_layers, "must be a collection of layer indices >= 0")

    @classmethod
    def official(cls, **changes) -> "AdaKVConfig":
        """The paper's / official FFY0/AdaKV semantics (no head floor beyond alpha), other fields as given."""
        return cls(**{"head_floor": 0, **changes})

    @property
    def compresses(self) -> bool:
        """False in exact mode (no budget, no ratio)."""
        return self.budget is not None or self.compression_ratio is not None

    @property
    def ratio_fraction(self) -> Optional[Fraction]:
        """The compression ratio as an exact fraction, so kept counts are integer arithmetic."""
        if self.compression_ratio is None:
            return None
        return Fraction(self.compression_ratio).limit_denominator(1 << 20)

    def replace(self, **changes) -> "AdaKVConfig":
        return dataclasses.replace(self, **changes)

    def key(self) -> str:
        """A stable string naming this config (used in cache keys and reports)."""
        return repr(dataclasses.astuple(self))


def alpha_floor(alpha: float, selectable: int) -> int:
    """``floor(alpha * B')`` computed exactly (alpha read as a fraction, denominator <= 2**20).

    Exact so that e.g. alpha=0.29, B'=100 gives 29 (float arithmetic gives 28).
    """
    a = Fraction(alpha).limit_denominator(1 << 20)
    return (a.numerator * selectable) // a.denominator


def head_floor_tokens(config: AdaKVConfig, selectable: int) -> int:
    """The safeguard floor of every head, in chosen tokens: ``max(floor(alpha * B'), min(head_floor, B'))``."""
    return max(alpha_floor(config.alpha, selectable), min(config.head_floor, selectable))


def keep_for_row(config: AdaKVConfig, n_real: int) -> int:
    """Tokens per KV head (window included) a row of ``n_real`` valid tokens keeps on the flat schedule."""
    if config.budget is not None:
        return config.budget
    r = config.ratio_fraction
    kept = n_real - (n_real * r.numerator) // r.denominator
    return max(kept, config.window + 1)


def layer_keep(config: AdaKVConfig, n_real: int, layer: int, num_layers: int) -> int:
    """Tokens per KV head (window included) kept at ``layer`` for a row of ``n_real`` valid tokens.

    Returns a number >= n_real when the row is not compressed at that layer.
    """
    if layer in config.skip_layers:
        return n_real
    w = config.window
    keep = keep_for_row(config, n_real)
    if config.layer_schedule == "flat" or num_layers <= 1:
        return keep
    base = keep - w
    lo = base // config.pyramid_beta
    hi = 2 * base - lo
    if hi >= n_real - w:
        hi = n_real - w
        lo = 2 * base - hi
    steps = (hi - lo) // (num_layers - 1)
    return hi - layer * steps + w
