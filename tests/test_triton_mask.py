"""The Triton causal-mask check (interpreter on CPU) counts exactly the entries that differ from j <= i."""
from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, interpreter_subprocess_test, needs_device

test_in_interpreter_subprocess = interpreter_subprocess_test(__file__)


@needs_device
@pytest.mark.parametrize("shape", [(2, 1, 45, 45), (1, 1, 130, 130), (45, 45), (3, 2, 33, 33)])
def test_mismatch_count_equals_torch(shape):
    from adakv_compile.kernels.triton_mask import causal_mismatches

    g = torch.Generator().manual_seed(sum(shape))
    n = shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril().expand(shape).clone()
    assert int(causal_mismatches(causal.to(DEVICE))) == 0
    flips = torch.rand(shape, generator=g) < 0.01
    noisy = causal ^ flips
    assert int(causal_mismatches(noisy.to(DEVICE))) == int(flips.sum())
    expanded = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(4, 1, n, n)  # stride-0 batch
    assert int(causal_mismatches(expanded.to(DEVICE))) == 0
    sliced = torch.ones(n + 3, n + 3, dtype=torch.bool).tril()[3:, :n]  # strided; diagonal shifted by 3
    want = int((sliced != causal.reshape(-1, n, n)[0]).sum())
    assert want > 0 and int(causal_mismatches(sliced.to(DEVICE))) == want
