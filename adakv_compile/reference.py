"""Eager reference ORACLE of the Ada-KV selection algorithm (docs/algorithm.md) and a reference generator.

Written for clarity, not speed: Python loops over rows and heads, explicit ``sorted(..., key=...)`` orderings
so that the tie rules of the spec are visibly followed. Nothing here depends on the compiler code of this
package; the only import from ``adakv_compile`` is the config.

Public API
----------
- :func:`window_scores` -- per-KV-head pooled candidate scores (steps 1-6 of the spec).
- :func:`head_budgets` -- adaptive head budgets of one row (the three safeguards: official, exact-total, kvpress).
- :func:`select` -- the keep mask of one layer (window included).
- :class:`ReferenceSession` -- runs a HuggingFace causal LM eagerly with a per-(row, KV head) ragged cache.
- :func:`biased_decode_attention` -- decode attention over kept tokens plus the model's bias at their positions.
- :class:`InlineReferenceSession` -- the same generator for models with inline attention (ALiBi: bloom, mpt,
  falcon), through their softmax logits.

Conventions (decisions where docs/algorithm.md leaves room; see also the module's tests):
- ``floor(alpha * B')`` is computed exactly with ``alpha`` read as the fraction
  ``Fraction(alpha).limit_denominator(1 << 20)`` (the same convention as ``AdaKVConfig.ratio_fraction``),
  so ``alpha=0.29, B'=100`` gives 29, not the 28 that float ``math.floor(0.29 * 100)`` gives.
- The official head budget ``round(c * (1 - alpha) + f)`` is computed on the same exact fraction and rounded
  half to even (``torch.round``'s rule) with Python's ``round`` of a ``Fraction``: no float fuzz at .5.
- The streaming scorer always allocates uniformly (the spec: "Allocation is uniform for streaming"),
  whatever ``config.allocation`` says. Its sinks are the first ``sink_tokens`` valid positions of the row
  that are candidates (positions inside the window are kept anyway).
- Exact mode (a config with neither budget nor ratio) keeps every valid token.
- Prompts must be left padded (the valid tokens of a row are a suffix); anything else raises ValueError.
"""
from __future__ import annotations

import contextvars
import math
from fractions import Fraction
from typing import List, Optional

import torch
import torch.nn.functional as F

from adakv_compile.cache import cache_kwarg
from adakv_compile.config import AdaKVConfig, layer_keep

__all__ = [
    "window_scores",
    "head_budgets",
    "select",
    "alpha_floor",
    "ReferenceSession",
    "InlineReferenceSession",
    "biased_decode_attention",
    "ATTN_IMPLEMENTATION",
]

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------

def _check_left_padded(valid: torch.Tensor) -> None:
    """Raise unless every row's valid tokens are a suffix ``[n - n_b, n)`` (left padding)."""
    B, n = valid.shape
    for b in range(B):
        n_b = int(valid[b].sum())
        expected = torch.zeros(n, dtype=torch.bool, device=valid.device)
        expected[n - n_b:] = True
        if not torch.equal(valid[b].bool(), expected):
            raise ValueError(f"row {b}: only left padding is supported (valid tokens must be a suffix)")


def _snapkv_row_scores(q_row: torch.Tensor, k_row: torch.Tensor, valid_row: torch.Tensor,
                       config: AdaKVConfig, scale: float, softcap: Optional[float],
                       sinks: Optional[torch.Tensor] = None, bias_row: Optional[torch.Tensor] = None,
                       logits_row: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SnapKV scores of one row, steps 1-6. ``q_row [Hq, n, D]``, ``k_row [Hkv, n, D]`` -> ``[Hkv, n]``.

    The order is the official ``calcul_attn_sore``: window mean per query head, then the GQA reduction
    over each KV group, then the pooling of the reduced scores. ``bias_row [Hq, w, n]``: the model's
    additive per-head term of the window queries (ALiBi), added to their logits. ``logits_row [Hq, w, n]``
    (q_row/k_row then only give shapes): the window logits exactly as the model computed them.
    """
    Hq, n, D = q_row.shape
    Hkv = k_row.shape[0]
    G = Hq // Hkv
    w = config.window
    m = n - w  # candidate columns [0, m)

    out = torch.full((Hkv, n), NEG_INF, dtype=torch.float32)
    reduced = torch.empty(Hkv, m, dtype=torch.float32)
    query_pos = torch.arange(n - w, n)[:, None]                   # [w, 1]
    key_pos = torch.arange(n)[None, :]                            # [1, n]
    visible = valid_row.cpu()[None, :] & (key_pos <= query_pos)   # key j visible to window query i
    for hk in range(Hkv):
        keys = k_row[hk].float().cpu() if logits_row is None else None  # [n, D]
        group = torch.empty(G, m, dtype=torch.float32)
        for g in range(G):
            h = hk * G + g
            # 1. the last w query positions; 2. logits in fp32 against every key of the KV head.
            if logits_row is not None:
                logits = logits_row[h].float().cpu()
            else:
                q_win = q_row[h, n - w:, :].float().cpu()         # [w, D]
                logits = (q_win @ keys.T) * scale                 # [w, n]
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                if bias_row is not None:                          # ALiBi: the model's bias, after the cap
                    logits = logits + bias_row[h].float().cpu()
            logits = logits.masked_fill(~visible, NEG_INF)
            # 3. softmax over keys, mean over the w window queries (with a sink: its logit joins the
            #    softmax and its column is dropped — the probabilities the model computes).
            if sinks is not None:
                sink = torch.full((w, 1), float(sinks[h]), dtype=torch.float32)
                p = torch.softmax(torch.cat([logits, sink], 1), dim=-1)[:, :n]
            else:
                p = torch.softmax(logits, dim=-1)                 # [w, n]
            s = p.mean(dim=0)                                     # [n]
            # 4. candidates only (invalid columns are exactly 0 here).
            group[g] = s[:m]
        # 5. GQA reduce over the G query heads of the KV head.
        if config.gqa_reduce == "mean":
            reduced[hk] = group.mean(dim=0)
        else:
            reduced[hk] = group.max(dim=0).values

    # 6. pooling of the reduced scores along j, stride 1, padding kernel_size // 2.
    ks = config.kernel_size
    if config.pooling == "max":
        pooled = F.max_pool1d(reduced[:, None, :], kernel_size=ks, stride=1, padding=ks // 2)[:, 0, :]
    else:
        pooled = F.avg_pool1d(reduced[:, None, :], kernel_size=ks, stride=1, padding=ks // 2,
                              count_include_pad=True)[:, 0, :]
    for j in range(m):
        if not bool(valid_row[j]):
            pooled[:, j] = NEG_INF
    out[:, :m] = pooled
    return out


def _streaming_row_scores(n: int, Hkv: int, valid_row: torch.Tensor, config: AdaKVConfig) -> torch.Tensor:
    """StreamingLLM scores of one row: 2 for sinks, j / n for other candidates, -inf otherwise."""
    w = config.window
    m = n - w
    out = torch.full((Hkv, n), NEG_INF, dtype=torch.float32)
    valid_candidates = [j for j in range(m) if bool(valid_row[j])]
    sinks = set(valid_candidates[:config.sink_tokens])
    for j in valid_candidates:
        out[:, j] = 2.0 if j in sinks else j / n
    return out


# scorer = "critical" (docs/algorithm.md, "Scorer critical"): stage 1 keeps floor(B' * 1/2) tokens per head by
# attention (score 1e6 * (1 + s)), the rest are ranked by (s + 1e-4) * ||v||_1.
CRITICAL_EPS = 1e-4
CRITICAL_STAGE1 = 1e6


def critical_row_scores(scores_row: torch.Tensor, v_row: torch.Tensor, Bp: int) -> torch.Tensor:
    """Value-aware scores of one row from its SnapKV candidate scores ``scores_row [Hkv, m]`` (-inf for
    non-candidates), values ``v_row [Hkv, n, Dv]`` and selectable budget ``Bp``."""
    H, m = scores_row.shape
    out = torch.full((H, m), NEG_INF, dtype=torch.float32)
    k1 = Bp // 2
    for h in range(H):
        s = scores_row[h].tolist()
        order = sorted(range(m), key=lambda j: (-s[j], j))
        first = set(order[:k1])
        norms = v_row[h, :m].float().cpu().abs().sum(-1)                       # [m] ||v_j||_1
        for j in range(m):
            if s[j] == NEG_INF:
                continue
            sj = scores_row[h, j]
            if j in first:
                out[h, j] = CRITICAL_STAGE1 * (1 + sj)
            else:
                out[h, j] = (sj.clamp(min=0) + CRITICAL_EPS) * norms[j]
    return out


def window_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig,
                  scale: float, softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-KV-head pooled candidate scores ``[B, Hkv, n]`` (float32) of docs/algorithm.md, steps 1-6.

    ``q [B, Hq, n, D]`` (after RoPE), ``k [B, Hkv, n, D]``, ``valid [B, n]`` bool (left padding).
    Non-candidates (padding, the last ``window`` positions) are -inf; rows with ``n_b <= window`` are all -inf.
    ``bias``: a per-head additive term (ALiBi) broadcastable to ``[B, Hq, n or 1, n]``, added to the window
    logits (docs/algorithm.md, "Per-head additive biases"). ``logits [B, Hq, w, n]``: the window logits as
    a model computed them (bias included; q/k then only give the shapes).
    """
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    valid = valid.bool()
    _check_left_padded(valid)
    w = config.window
    out = torch.full((B, Hkv, n), NEG_INF, dtype=torch.float32)
    for b in range(B):
        n_b = int(valid[b].sum())
        if n_b <= w:
            continue
        if config.scorer == "streaming":
            out[b] = _streaming_row_scores(n, Hkv, valid[b], config)
        else:
            out[b] = _snapkv_row_scores(q[b], k[b], valid[b], config, scale, softcap, sinks,
                                        _bias_window(bias, b, Hq, n, w),
                                        None if logits is None else logits[b])
    return out.to(q.device)


def _bias_window(bias: Optional[torch.Tensor], b: int, Hq: int, n: int, w: int) -> Optional[torch.Tensor]:
    """Row ``b`` of a broadcastable bias [.., n or 1, n], its window query rows: ``[Hq, w, n]``."""
    if bias is None:
        return None
    x = bias.float().cpu()
    while x.dim() < 4:
        x = x[None]
    x = x[b if x.shape[0] > 1 else 0]
    rows = x[:, n - w:, :] if x.shape[1] == n else x[:, :1, :].expand(x.shape[0], w, x.shape[2])
    return rows.expand(Hq, w, rows.shape[2])


def biased_decode_attention(q: torch.Tensor, keys: List[torch.Tensor], values: List[torch.Tensor],
                            positions: List[torch.Tensor], bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one row's ``q [Hq, t, D]`` over each KV head's kept tokens ``keys[h], values[h] [L_h, D]``
    at ``positions[h]`` (the last t of them the chunk's), each logit plus the model's bias at that key's
    position: ``bias[h, i, positions[h][j]]`` (``bias [Hq or 1, t or 1, S]``, S = every position seen).
    The chunk is causal within itself. Returns fp32 ``[Hq, t, Dv]``."""
    Hq, t, D = q.shape
    G = Hq // len(keys)
    out = torch.zeros(Hq, t, values[0].shape[-1], dtype=torch.float32)
    for h in range(Hq):
        k, v, pos = keys[h // G].float().cpu(), values[h // G].float().cpu(), positions[h // G].cpu()
        s = k.shape[0]
        for i in range(t):
            row = bias[h if bias.shape[0] > 1 else 0, i if bias.shape[1] > 1 else 0].float().cpu()
            logits = torch.tensor([float(q[h, i].float().cpu() @ k[j]) * scale + float(row[int(pos[j])])
                                   for j in range(s - t + i + 1)])
            out[h, i] = torch.softmax(logits, 0) @ v[: s - t + i + 1]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Allocation
# ----------------------------------------------------------------------------------------------------------------

def alpha_floor(alpha: float, selectable: int) -> int:
    """``floor(alpha * B')`` computed exactly, with alpha read as a fraction of denominator <= 2**20."""
    a = Fraction(alpha).limit_denominator(1 << 20)
    return (a.numerator * selectable) // a.denominator


def _round_half_even(x: Fraction) -> int:
    """``torch.round`` on an exact number: to the nearest integer, halves to the even one."""
    return round(x)  # Fraction.__round__ without ndigits rounds half to even


def head_budgets(scores_row: torch.Tensor, Bp: int, alpha: float, safeguard: str = "official",
                 head_floor: int = 0) -> List[int]:
    """Adaptive head budgets of one row: how many candidates each of the H heads keeps.

    ``scores_row [H, m]``: candidate scores (-inf for non-candidates). ``f = floor(alpha * Bp)``, raised to
    ``max(f, min(head_floor, Bp))`` when the head floor is above it (then the blend below uses
    ``alpha' = f / Bp``: the same formula with the floor's own share); ``c[h]`` is
    the number of the global top ``T = H * Bp`` entries (higher score first, ties to the lower flat index
    ``h * m + j``) that belong to head h.

    - ``"official"`` (FFY0/AdaKV ``update_kv_gqa``): ``a[h] = round(c[h] * (1 - alpha) + f)``, rounded half
      to even like ``torch.round`` but computed exactly (alpha as a fraction, so no float fuzz at .5), then
      clamped to the head's number of candidates. ``sum(a)`` may differ from T by a few tokens.
    - ``"exact-total"``: ``a[h] = f + share[h]``, ``share`` the largest-remainder apportionment of
      ``T - H*f`` proportional to ``c``. ``sum(a) == T``.
    - ``"kvpress"``: each head's own top f are forced in; the other ``T - H*f`` slots go to the best remaining
      entries of all heads. ``sum(a) == T``.
    """
    H, m = scores_row.shape
    T = H * Bp
    f = alpha_floor(alpha, Bp)
    a_frac = Fraction(alpha).limit_denominator(1 << 20)
    if min(head_floor, Bp) > f:                      # the head floor (docs/algorithm.md, Head floor)
        f = min(head_floor, Bp)
        a_frac = Fraction(f, Bp)
    if T == 0:
        return [0] * H
    values = scores_row.tolist()

    if safeguard == "kvpress":
        # kvpress AdaKVPress: each head's own top f are forced in; the other T - H*f slots go to the best
        # remaining entries of all heads (same global order as below).
        forced = {(h, j) for h in range(H) for j in _top_positions(values[h], f)} if f else set()
        rest = sorted(((h, j) for h in range(H) for j in range(m) if (h, j) not in forced),
                      key=lambda e: (-values[e[0]][e[1]], e[0] * m + e[1]))
        a = [f] * H
        for h, _j in rest[:T - H * f]:
            a[h] += 1
        return a

    # Global top T: entries ordered by (higher score first, lower flat index first).
    entries = [(h, j) for h in range(H) for j in range(m)]
    ranked = sorted(entries, key=lambda e: (-values[e[0]][e[1]], e[0] * m + e[1]))
    c = [0] * H
    for h, _j in ranked[:T]:
        c[h] += 1

    if safeguard == "official":
        candidates = [sum(1 for v in values[h] if v != NEG_INF) for h in range(H)]
        return [min(_round_half_even(c[h] * (1 - a_frac) + f), candidates[h]) for h in range(H)]

    # "exact-total": largest remainder apportionment of the T - H*f free slots, proportional to c.
    free = T - H * f
    quota = [Fraction(c[h] * free, T) for h in range(H)]
    share = [math.floor(qh) for qh in quota]
    left = free - sum(share)
    by_remainder = sorted(range(H), key=lambda h: (-(quota[h] - share[h]), h))
    for h in by_remainder[:left]:
        share[h] += 1
    return [f + share[h] for h in range(H)]


def _top_positions(head_scores: List[float], count: int) -> List[int]:
    """The ``count`` best positions of one head: higher score first, ties to the lower position."""
    order = sorted(range(len(head_scores)), key=lambda j: (-head_scores[j], j))
    chosen = order[:count]
    if any(head_scores[j] == NEG_INF for j in chosen):
        raise AssertionError("selection reached a non-candidate; the budget exceeds the valid candidates")
    return chosen


def select(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig, layer: int,
           num_layers: int, scale: float, softcap: Optional[float] = None, v: Optional[torch.Tensor] = None,
           sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
           logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The keep mask ``[B, Hkv, n]`` bool of attention layer ``layer`` (of ``num_layers``), window included.

    Rows with ``n_b <= keep_l`` (and every row in exact mode or in a skipped layer) keep exactly their valid
    tokens. Other rows keep, per KV head, the window plus the head's top ``a[h]`` candidates, where
    ``a[h] = keep_l - window`` (uniform allocation, or the streaming scorer) or :func:`head_budgets` (adaptive).
    ``scorer="critical"`` needs the values ``v [B, Hkv, n, Dv]`` (:func:`critical_row_scores`).
    ``bias`` / ``logits``: as :func:`window_scores` (ALiBi: the model's bias, or its window logits).
    """
    if config.scorer == "critical" and v is None:
        raise ValueError("select(v=None): scorer='critical' weighs the scores by the values; pass v")
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    valid = valid.bool()
    _check_left_padded(valid)
    w = config.window
    keep = torch.zeros(B, Hkv, n, dtype=torch.bool)
    scores = None
    for b in range(B):
        n_b = int(valid[b].sum())
        keep_l = layer_keep(config, n_b, layer, num_layers) if config.compresses else n_b
        if n_b <= keep_l:
            keep[b] = valid[b].cpu()[None, :].expand(Hkv, n)
            continue
        if scores is None:
            scores = window_scores(q, k, valid, config, scale, softcap, sinks, bias, logits)
        m = n - w
        Bp = keep_l - w
        row = scores[b, :, :m]                                   # [Hkv, m]
        if config.scorer == "critical":
            row = critical_row_scores(row, v[b], Bp)
        if config.allocation == "uniform" or config.scorer == "streaming":
            budgets = [Bp] * Hkv
        else:
            budgets = head_budgets(row, Bp, config.alpha, config.safeguard, config.head_floor)
        for h in range(Hkv):
            for j in _top_positions(row[h].tolist(), budgets[h]):
                keep[b, h, j] = True
            keep[b, h, n - w:] = True                            # the window, always
    return keep.to(q.device)


# ----------------------------------------------------------------------------------------------------------------
# Reference generator
# ----------------------------------------------------------------------------------------------------------------

ATTN_IMPLEMENTATION = "adakv_reference"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("adakv_reference_session", default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry point: delegates to the active :class:`ReferenceSession`."""
    session = _ACTIVE.get()
    if session is None:
        raise RuntimeError(f"attention implementation {ATTN_IMPLEMENTATION!r} used outside a ReferenceSession")
    return session._attend(module, query, key, value, scaling, kwargs)


def _register() -> None:
    import transformers

    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    transformers.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, transformers.masking_utils.sdpa_mask)


def _make_cache(num_layers: int):
    """A transformers Cache whose layers only count logical tokens; the K/V live in the session."""
    from transformers.cache_utils import Cache, DynamicLayer

    class _LogicalLayer(DynamicLayer):
        is_croppable = False

        def __init__(self):
            super().__init__()
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.length += key_states.shape[-2]
            return key_states, value_states      # the chunk only; the session holds the past

        def get_seq_length(self):
            return self.length

        def get_mask_sizes(self, query_length):
            return self.length + query_length, 0

        def reset(self):
            self.length = 0

    return Cache(layers=[_LogicalLayer() for _ in range(num_layers)])


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                      softcap: Optional[float], sink: Optional[float] = None) -> torch.Tensor:
    """Attention of ``q [t, D]`` over ``k, v [s, D]`` with ``allowed [t, s]``; fp32; all-masked rows give 0.
    ``sink``: the head's sink logit (gpt-oss), a softmax column that is dropped."""
    logits = (q.float() @ k.float().T) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~allowed, NEG_INF)
    if sink is not None:
        col = torch.full((logits.shape[0], 1), sink, dtype=torch.float32, device=logits.device)
        p = torch.softmax(torch.cat([logits, col], 1), dim=-1)[:, :-1]
    else:
        p = torch.softmax(logits, dim=-1)
    p = torch.where(allowed.any(dim=-1, keepdim=True), p, torch.zeros_like(p))
    return p @ v.float()


class ReferenceSession:
    """Runs a HuggingFace causal LM eagerly with a compressed, ragged per-(row, KV head) cache.

    ``prefill`` runs exact attention over the prompt, then compresses each layer's K/V with :func:`select`
    (that layer's q, k; validity from the attention mask). ``extend`` feeds new tokens: a new query attends
    to its head's kept tokens plus the chunk's tokens 0..i. ``generate`` is greedy.

    With ``record=True`` the session keeps, per layer, the prefill inputs of the selection in
    ``self.prefill_records[l] = dict(q=, k=, valid=, scale=, softcap=, keep=)`` (for tests).
    """

    def __init__(self, model, config: AdaKVConfig, record: bool = False):
        self.model = model
        self.config = config
        self.record = record
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = int(text_config.num_hidden_layers)
        _register()
        self._reset()

    # -- state ---------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._keys: List[Optional[List[List[torch.Tensor]]]] = [None] * self.num_layers    # [l][b][h] [len, D]
        self._values: List[Optional[List[List[torch.Tensor]]]] = [None] * self.num_layers
        self._positions: List[Optional[List[List[torch.Tensor]]]] = [None] * self.num_layers
        self.prefill_records: List[Optional[dict]] = [None] * self.num_layers
        self._cache = None
        self._next_position: Optional[torch.Tensor] = None   # [B] position id of the next token
        self._length = 0                                     # logical length (prompt incl. padding + generated)
        self._mode: Optional[str] = None
        self._valid: Optional[torch.Tensor] = None
        self._attention_mask: Optional[torch.Tensor] = None  # [B, logical length] 2-D mask, HF style

    def kept_counts(self) -> List[torch.Tensor]:
        """Per layer, ``[B, Hkv]`` long: tokens currently in the cache of each (row, KV head)."""
        out = []
        for per_row in self._keys:
            if per_row is None:
                raise RuntimeError("no prefill yet")
            out.append(torch.tensor([[kh.shape[0] for kh in heads] for heads in per_row], dtype=torch.long))
        return out

    def kept_positions(self) -> List[List[List[torch.Tensor]]]:
        """Per layer, row and KV head: the logical slots held (prompt index, or n + i for generated token i),
        increasing."""
        return [[[p.clone() for p in heads] for heads in per_row] for per_row in self._positions]

    # -- running the model ---------------------------------------------------------------------------------
    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mode: str) -> torch.Tensor:
        # The HF mask (built from the 2-D mask over the logical length) is not used by our attention; it is
        # passed so that the model sees the same inputs as under HF generate.
        model = self.model
        previous = model.config._attn_implementation
        token = _ACTIVE.set(self)
        self._mode = mode
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
            with torch.no_grad():
                out = model(input_ids=input_ids, attention_mask=self._attention_mask, position_ids=position_ids,
                            use_cache=True, **{cache_kwarg(model): self._cache})
        finally:
            model.set_attn_implementation(previous)
            _ACTIVE.reset(token)
            self._mode = None
        return out.logits

    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the prompt (exact attention), compress every layer; returns logits ``[B, n, V]``."""
        self._reset()
        B, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, n, dtype=torch.long, device=input_ids.device)
        valid = attention_mask.bool()
        _check_left_padded(valid)
        mask_long = attention_mask.long()
        position_ids = (mask_long.cumsum(-1) - 1).masked_fill(mask_long == 0, 0)
        self._valid = valid
        self._attention_mask = mask_long
        self._cache = _make_cache(self.num_layers)
        logits = self._run(input_ids, position_ids, "prefill")
        self._length = n
        self._next_position = position_ids[:, -1] + 1
        return logits

    def extend(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``t >= 1`` new tokens per row (no padding); returns logits ``[B, t, V]``."""
        if self._next_position is None:
            raise RuntimeError("extend() before prefill()")
        B, t = input_ids.shape
        position_ids = self._next_position[:, None] + torch.arange(t, device=input_ids.device)[None, :]
        self._attention_mask = torch.cat([self._attention_mask, self._attention_mask.new_ones(B, t)], dim=-1)
        logits = self._run(input_ids, position_ids, "extend")
        self._length += t
        self._next_position = self._next_position + t
        return logits

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 16, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding; returns ``[B, n + new]``. With ``eos_token_id``, finished rows get ``pad_token_id``
        (default: eos) and decoding stops once every row has finished (as HF generate does)."""
        logits = self.prefill(input_ids, attention_mask)
        sequences = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        for step in range(max_new_tokens):
            next_token = logits[:, -1, :].argmax(dim=-1)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
                finished = finished | (next_token == eos_token_id)
            sequences = torch.cat([sequences, next_token[:, None]], dim=-1)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            logits = self.extend(next_token[:, None])
        return sequences

    # -- the attention function ----------------------------------------------------------------------------
    def _attend(self, module, query, key, value, scaling, kwargs):
        layer = module.layer_idx
        window = kwargs.get("sliding_window")  # a sliding-window layer: exact, every valid token kept
        softcap = kwargs.get("softcap")
        sinks = kwargs.get("s_aux")  # gpt-oss: one sink logit per query head
        sinks = None if sinks is None else sinks.detach().float().cpu()

        def sink(h):
            return None if sinks is None else float(sinks[h])
        B, Hq, t, D = query.shape
        Hkv = key.shape[1]
        G = Hq // Hkv
        scale = float(scaling) if scaling is not None else D ** -0.5
        out = torch.zeros(B, t, Hq, value.shape[-1], dtype=torch.float32, device=query.device)

        if self._mode == "prefill":
            n = t
            valid = self._valid
            causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            if window is not None:  # HF's sliding mask: kv_idx > q_idx - W
                idx = torch.arange(n, device=query.device)
                causal = causal & (idx[None, :] > idx[:, None] - int(window))
            for b in range(B):
                allowed = causal & valid[b][None, :]
                for h in range(Hq):
                    out[b, :, h] = _masked_attention(query[b, h], key[b, h // G], value[b, h // G], allowed,
                                                     scale, softcap, sink(h))
            if window is not None:
                keep = valid[:, None, :].expand(B, Hkv, n)
            else:
                keep = select(query, key, valid, self.config, layer, self.num_layers, scale, softcap, v=value,
                              sinks=sinks)
            positions = torch.arange(n, device=query.device)
            self._keys[layer] = [[key[b, h][keep[b, h]].clone() for h in range(Hkv)] for b in range(B)]
            self._values[layer] = [[value[b, h][keep[b, h]].clone() for h in range(Hkv)] for b in range(B)]
            self._positions[layer] = [[positions[keep[b, h]].clone() for h in range(Hkv)] for b in range(B)]
            if self.record:
                self.prefill_records[layer] = dict(q=query.detach().clone(), k=key.detach().clone(),
                                                   valid=valid.clone(), scale=scale, softcap=softcap,
                                                   keep=keep.clone())
        elif self._mode == "extend":
            new_positions = torch.arange(self._length, self._length + t, device=query.device)
            for b in range(B):
                for hk in range(Hkv):
                    past_k = self._keys[layer][b][hk]
                    past_v = self._values[layer][b][hk]
                    all_k = torch.cat([past_k, key[b, hk]], dim=0)
                    all_v = torch.cat([past_v, value[b, hk]], dim=0)
                    s = past_k.shape[0]
                    allowed = torch.ones(t, s + t, dtype=torch.bool, device=query.device)
                    allowed[:, s:] = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
                    if window is not None:
                        kpos = torch.cat([self._positions[layer][b][hk], new_positions])
                        allowed &= kpos[None, :] > new_positions[:, None] - int(window)
                    for g in range(G):
                        h = hk * G + g
                        out[b, :, h] = _masked_attention(query[b, h], all_k, all_v, allowed, scale, softcap,
                                                         sink(h))
                    self._keys[layer][b][hk] = all_k
                    self._values[layer][b][hk] = all_v
                    self._positions[layer][b][hk] = torch.cat([self._positions[layer][b][hk], new_positions])
        else:
            raise RuntimeError("attention called outside prefill/extend")
        return out.to(query.dtype), None


# ----------------------------------------------------------------------------------------------------------------
# Reference generator for models that compute attention inline (ALiBi: bloom, mpt, falcon)
# ----------------------------------------------------------------------------------------------------------------

class InlineReferenceSession:
    """Greedy generation of a model whose attention is written inline (no AttentionInterface: bloom, mpt,
    falcon with ALiBi), compressed as Ada-KV keeps it, computed the dense way.

    The model runs uncompiled with its own full cache. A ``TorchFunctionMode`` sees every attention softmax
    (``softmax`` over the last dim of ``[B, H, t, S]`` logits, or SDPA, then computed as logits + mask) in
    call order, one per layer. At the prefill it returns them unchanged (exact attention) and selects the
    kept tokens of layer l with :func:`select` from the window rows of *the logits the model computed* (bias
    and mask included). At each later step it sets the logits of the dropped prompt positions to -inf:
    softmax over the remaining columns is attention over the kept tokens with the model's own bias at their
    positions — what the compressed cache must compute, obtained without gathering anything.
    ``kv_heads``: KV heads per layer (the logits show only the query heads; default: as many).
    """

    def __init__(self, model, config: AdaKVConfig, kv_heads: Optional[int] = None):
        self.model, self.config, self.kv_heads = model, config, kv_heads
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = int(text_config.num_hidden_layers)
        self._keep: List[torch.Tensor] = []     # per layer [B, Hkv, n] bool
        self._mode: Optional[str] = None
        self._layer = 0
        self._valid: Optional[torch.Tensor] = None
        self._length = 0

    def kept_positions(self) -> List[List[List[torch.Tensor]]]:
        """Per layer, row and KV head: the positions in the cache (kept prompt tokens, then every appended
        one), increasing."""
        n = self._valid.shape[1]
        extra = torch.arange(n, self._length)
        return [[[torch.cat([torch.nonzero(keep[b, h])[:, 0], extra]) for h in range(keep.shape[1])]
                 for b in range(keep.shape[0])] for keep in self._keep]

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 16) -> torch.Tensor:
        from torch.overrides import TorchFunctionMode

        session = self

        class _Softmaxes(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is F.scaled_dot_product_attention:
                    return session._sdpa(*args, **kwargs)
                if func in (F.softmax, torch.softmax, torch.Tensor.softmax):
                    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                    if args[0].dim() == 4 and dim in (-1, 3):
                        return func(session._logits(args[0]), *args[1:], **kwargs)
                return func(*args, **kwargs)

        B, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, n, dtype=torch.long, device=input_ids.device)
        self._valid = attention_mask.bool()
        _check_left_padded(self._valid)
        self._keep, self._length = [], n
        kwarg = cache_kwarg(self.model)
        seq, cache = input_ids, None
        with torch.no_grad(), _Softmaxes():
            for step in range(max_new_tokens):
                self._mode, self._layer = ("prefill" if cache is None else "extend"), 0
                ids = input_ids if cache is None else seq[:, -1:]
                extra = {} if cache is None else {kwarg: cache}
                out = self.model(input_ids=ids, attention_mask=attention_mask, use_cache=True, **extra)
                cache = out.past_key_values
                if step:
                    self._length += 1
                seq = torch.cat([seq, out.logits[:, -1].argmax(-1)[:, None]], dim=-1)
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=-1)
        self._mode = None
        return seq

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """One layer's attention logits [B, H, t, S] (bias and mask included): select, or drop."""
        layer, self._layer = self._layer, self._layer + 1
        B, H, t, S = x.shape
        Hkv = self.kv_heads or H
        if self._mode == "prefill":
            w = min(self.config.window, t)
            shape_q, shape_k = torch.zeros(B, H, t, 1), torch.zeros(B, Hkv, t, 1)
            self._keep.append(select(shape_q, shape_k, self._valid, self.config, layer, self.num_layers, 1.0,
                                     logits=x[:, :, t - w:, :].detach().float().cpu()))
            return x
        keep = self._keep[layer]                                              # [B, Hkv, n]
        n = keep.shape[-1]
        allowed = torch.ones(B, H, t, S, dtype=torch.bool)
        allowed[..., :n] = keep.repeat_interleave(H // Hkv, dim=1)[:, :, None, :]
        return x.masked_fill(~allowed.to(x.device), NEG_INF)

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """SDPA as logits + mask → :meth:`_logits` → softmax (fp32) → · V."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale
        t, S = logits.shape[-2:]
        if is_causal:
            logits = logits.masked_fill(~torch.ones(t, S, dtype=torch.bool).tril(S - t), NEG_INF)
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, NEG_INF) if attn_mask.dtype == torch.bool \
                else logits + attn_mask.float()
        p = torch.softmax(self._logits(logits), dim=-1)
        return (p @ v.float()).to(q.dtype)
