"""Where the Triton kernel tests run: the GPU, or Triton's interpreter on a CPU-only machine.

Triton reads ``TRITON_INTERPRET`` when ``triton`` itself is imported (tests/conftest.py sets it at
collection start on CPU-only machines). If triton was nevertheless imported in GPU mode first, the
in-process kernel tests skip (``needs_device``) and ``interpreter_subprocess_test(__file__)`` reruns the
test file in a fresh interpreter-mode subprocess instead.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from adakv_compile.kernels.triton_attend import is_interpreted  # noqa: E402

if is_interpreted():
    DEVICE = "cpu"
elif _CUDA:
    DEVICE = "cuda"
else:
    DEVICE = None  # triton was imported in GPU mode before: see interpreter_subprocess_test

needs_device = pytest.mark.skipif(
    DEVICE is None, reason="triton was imported before TRITON_INTERPRET=1 could be set on this CPU-only "
                           "machine; these cases run in test_in_interpreter_subprocess instead")


def interpreter_subprocess_test(path: str):
    """A test that reruns the test file ``path`` under the interpreter when in-process cases cannot run."""
    @pytest.mark.skipif(DEVICE is not None, reason="in-process cases run (interpreter or CUDA)")
    def test_in_interpreter_subprocess():
        env = dict(os.environ, TRITON_INTERPRET="1")
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                             env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        passed = re.search(r"(\d+) passed", res.stdout)
        assert passed and int(passed.group(1)) > 1, res.stdout[-2000:]
    return test_in_interpreter_subprocess
