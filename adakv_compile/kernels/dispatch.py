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


def switch(name: str) -> bool | None:
    """An on/off environment variable: "1" / "0", None when unset or empty; anything else names it."""
    value = os.environ.get(name, "").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return None if value == "" else value == "1"


KERNEL_MODES = ("triton", "plain", "interpret")


def kernel_mode() -> str:
    """``ADAKV_KERNELS``: "triton" (default, also when empty), "plain" or "interpret"; anything else names it."""
    mode = os.environ.get("ADAKV_KERNELS", "").strip() or "triton"
    if mode not in KERNEL_MODES:
        raise ValueError(f"ADAKV_KERNELS must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    return mode


def use_triton() -> bool:
    """Triton kernels on CUDA unless ADAKV_KERNELS=plain (or triton is missing). Called per decode step."""
    return kernel_mode() != "plain" and _have_triton()


def triton_on(t) -> bool:
    """Whether the Triton kernels run for tensor ``t``: on CUDA (as ``use_triton``), or on any device with
    ADAKV_KERNELS=interpret (tests: CPU tensors through Triton's interpreter, TRITON_INTERPRET=1)."""
    mode = kernel_mode()
    return _have_triton() and (mode == "interpret" or (mode != "plain" and t.is_cuda))
