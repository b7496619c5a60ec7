"""Which kernels run: Triton on CUDA unless ``ADAKV_KERNELS=plain`` (or triton is missing).

Its own leaf module so that ``store``, ``attend`` and ``ops`` can all ask without importing each other in a
circle (tests/test_layering.py)."""
from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton() -> bool:
    """Triton kernels on CUDA unless ADAKV_KERNELS=plain (or triton is missing). Called per decode step."""
    return os.environ.get("ADAKV_KERNELS", "triton") != "plain" and _have_triton()


def triton_on(t) -> bool:
    """Whether the Triton kernels run for tensor ``t``: on CUDA (as ``use_triton``), or on any device with
    ADAKV_KERNELS=interpret (tests: CPU tensors through Triton's interpreter, TRITON_INTERPRET=1)."""
    mode = os.environ.get("ADAKV_KERNELS", "triton")
    return _have_triton() and (mode == "interpret" or (mode != "plain" and t.is_cuda))
