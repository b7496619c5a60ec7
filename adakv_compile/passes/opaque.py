"""Decode graphs replayed as CUDA graphs: our Triton ops as opaque twins (default; ``ADAKV_DECODE_OPAQUE``).

Why: Inductor inlines a ``triton_op``'s launches (``wrap_triton``), so no Python runs per launch — but a decode
graph on CUDA is replayed as a CUDA graph, where Python runs only at capture anyway, while every inlined launch
costs compile time: at 32 layers ~130 GEMVs + 32 appends + 32 attentions go through the joint-graph pattern
passes, ``decompose_triton_kernel_wrapper_functional`` and the TTIR mutation analysis (H200, cold: joint-graph
passes 5.2 s against HF static's 2.1, the decomposition 1.9 s, and ``gemv=False`` alone took 4.6 s off the start;
bench/results/start-profile-s13-32L-variants-h200.md). An opaque custom op is one extern call for Inductor.

The pass swaps each op for its twin (same schema, same body: kernels/gemv.py, kernels/static.py), so it is exact;
what it changes is where the launch is written (the op's Python at capture instead of Inductor's code).
Measured (H200, session 14, bench/results/start-profile-s14-32L-decode-opaque-h200.md, e2e-32L-s14-decode-opaque-h200):
32 layers, first ``generate`` of 1 x 8192 + 16 with the untraced prefill, cold 53.9 -> 34.8 s (HF static 39.7 s),
warm restart 9.5 -> 10.6 s (HF 10.4); the decode step 4.48 -> 4.47 ms/token (floor 3.82), tokens equal to the
eager reference. So it is the default for decode graphs replayed as CUDA graphs; elsewhere (CPU, ``cudagraphs=False``)
an inlined launch saves Python per step and stays. ``ADAKV_DECODE_OPAQUE=1`` forces it in every decode graph (CPU
tests), ``0`` keeps every launch inlined.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels.dispatch import switch


def twins() -> dict:
    """Each inlined op and its opaque twin."""
    ops = torch.ops.adakv
    return {ops.gemv.default: ops.gemv_opaque.default,
            ops.static_append.default: ops.static_append_opaque.default,
            ops.static_attend.default: ops.static_attend_opaque.default,
            ops.static_attend_merged.default: ops.static_attend_merged_opaque.default}


def opaque_wanted(graphed: bool) -> bool:
    """Whether a decode graph gets the twins: ``ADAKV_DECODE_OPAQUE`` if set, else when it is replayed as a CUDA graph."""
    forced = switch("ADAKV_DECODE_OPAQUE")
    return graphed if forced is None else forced


def use_opaque(gm: fx.GraphModule) -> int:
    """Retarget ``gm``'s inlined ops to their twins (in place); returns how many nodes changed."""
    pairs, count = twins(), 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in pairs:
            node.target = pairs[node.target]
            count += 1
    if count:
        gm.recompile()
    return count
