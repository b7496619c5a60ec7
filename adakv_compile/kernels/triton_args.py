"""Integer arguments of our Triton kernels that Inductor can always compile (issue 17, failure 2).

Inductor (torch 2.11) types a user kernel's plain ``int`` argument in ``define_user_defined_triton_kernel``
→ ``signature_of`` → ``expr_fits_within_32bit(arg)``: a value <= 2**31 - 1 passes its static check and
becomes ``i32``; a larger one falls through to ``shape_env.has_hint(arg)``, which calls
``safe_expand(arg).xreplace(...)`` on the Python int and raises ``AttributeError: 'int' object has no
attribute 'xreplace'``. At Llama-8B shapes and a 512k prompt the query's batch stride is
32 heads x 524288 x 128 = 2**31: that argument broke the prefill graph. So every int a kernel launched in
a traced body gets is at most 2**31 - 1, by construction:
- strides of the outer (batch, head) dims, which grow with the prompt, travel as two int32 halves
  (``wide``) and are rebuilt in int64 inside the kernel (``wide_mul``);
- every other int (extents, counts, inner strides) is checked (``int32``): it is bounded by one row or one
  head of one tensor, so exceeding it means a tensor that cannot fit a GPU; the error names the argument.
"""
from __future__ import annotations

import triton
import triton.language as tl

INT32_MAX = 2**31 - 1
_SHIFT = 20  # hi * 2**20 + lo: hi stays below 2**31 for any stride below 2**51 elements


def wide(name: str, value: int) -> tuple[int, int]:
    """``value`` (a stride that may exceed int32) as ``(hi, lo)``, both int32-safe; ``wide_mul`` rebuilds it."""
    value = int(value)
    if value < 0 or value >> _SHIFT > INT32_MAX:
        raise ValueError(f"kernel argument {name}={value} is negative or beyond 2**51")
    return value >> _SHIFT, value & ((1 << _SHIFT) - 1)


def wide_strides(prefix: str, strides, outer: int = 2) -> tuple[int, ...]:
    """The first ``outer`` strides as ``wide`` pairs (hi, lo, hi, lo, ...), the rest checked int32."""
    out: list[int] = []
    for i, s in enumerate(strides):
        out.extend(wide(f"{prefix}{i}", s) if i < outer else int32(**{f"{prefix}{i}": s}))
    return tuple(out)


def int32(**values: int) -> tuple[int, ...]:
    """The values as they are, after checking each fits int32 (ValueError naming the argument otherwise)."""
    for name, v in values.items():
        if not -INT32_MAX <= int(v) <= INT32_MAX:
            raise ValueError(f"kernel argument {name}={int(v)} does not fit int32 (tensor too large for the "
                             f"adakv Triton kernels)")
    return tuple(int(v) for v in values.values())


@triton.jit
def wide_mul(i, hi, lo):
    """``i * (hi * 2**20 + lo)`` in int64 (``i`` an int64 index): the offset of a ``wide`` stride."""
    i = i.to(tl.int64)
    return i * hi * 1048576 + i * lo
