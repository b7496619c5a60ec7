import logging
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels are tested on the CPU through the interpreter; it must be chosen before triton is
    # first imported (any test module may import it), so it is set here, at collection start.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo caches per code object and caps recompiles."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("adakv_compile").setLevel(logging.ERROR)
    yield
