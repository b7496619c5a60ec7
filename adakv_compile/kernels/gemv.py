"""``adakv::gemv``: a linear for the decode step's few rows (M <= 8), as a ``triton_op`` Inductor inlines.

Why: a batch-1 decode projection is a GEMV, bound by reading the weight once; the Triton kernel
(kernels/triton_gemv.py) is built for that. The decode-graph pass (passes/gemv.py, ``AdaKVConfig.gemv``) puts
this op where the graph had ``linear``/``mm``/``addmm``. As a ``triton_op`` its body is traced by Inductor: the
kernel launch becomes a ``wrap_triton`` node in the generated code (and in the CUDA graph of the decode step),
no Python launch at run time. Off CUDA (or ``ADAKV_KERNELS=plain``, or shapes it does not cover) the body is
``F.linear``: the same result to fp32 accumulation order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op

from .dispatch import triton_on

MAX_ROWS = 8            # rows (prod of x's leading dims) the pass gives the op
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def covered(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> str:
    """Why the Triton kernel does NOT cover these operands ("" when it does). Shapes must be static ints."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return f"shapes x {tuple(x.shape)} / weight {tuple(weight.shape)} are not a linear's"
    if x.dtype not in DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"dtypes differ or are not float16/bfloat16/float32 (x {x.dtype}, weight {weight.dtype})"
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        return "operands on different devices"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        return f"bias of shape {tuple(bias.shape)} is not [N]"
    rows = 1
    for s in x.shape[:-1]:
        if not isinstance(s, int):
            return "a dynamic number of rows"
        rows *= s
    if any(not isinstance(s, int) for s in weight.shape):
        return "a dynamic weight shape"
    if rows > MAX_ROWS or rows < 1:
        return f"{rows} rows (the kernel is for 1..{MAX_ROWS})"
    if weight.stride(1) != 1:
        return "the weight's rows are not contiguous"
    return ""


@triton_op("adakv::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., K] with at most ``MAX_ROWS`` rows, weight [N, K], bias [N]."""
    return _gemv(x, weight, bias)


@torch.library.custom_op("adakv::gemv_opaque", mutates_args=())
def gemv_opaque(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``adakv::gemv`` as an opaque op: Inductor calls it (an extern call) instead of tracing its launch.

    Why it pays: in a decode graph replayed as a CUDA graph the launch's Python runs only at capture, while
    every inlined launch costs compile time (32 layers: ~130 ``wrap_triton`` nodes through the joint-graph
    pattern passes and ``decompose_triton_kernel_wrapper_functional``, ~4.6 s of a cold H200 start by the
    ``gemv=False`` row of start-profile-s13-32L-variants-h200.md). Used by passes/opaque.py in decode graphs
    replayed as CUDA graphs (the default since session 14: same step time, 32-layer cold start 53.9 -> 34.8 s)."""
    return _gemv(x, weight, bias)


@gemv_opaque.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if triton_on(x) and not covered(x, weight, bias):
        from .triton_gemv import gemv_triton
        lead = x.shape[:-1]
        y = gemv_triton(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.reshape(*lead, weight.shape[0])
    return F.linear(x, weight, bias)
