"""A stand-in Triton driver for the scripts that compile our kernels' TTIR on a machine without a GPU
(tests/attend_writes.py, tests/ttir_memo_check.py): enough of a driver for TTIR generation, the target of an
H100/H200-class card. Run those scripts with ``TRITON_INTERPRET`` unset (the real compiler)."""
import torch
import triton
import triton.runtime
from triton.backends.compiler import GPUTarget


class TargetOnly:
    """The current target (sm_90) and the torch device the launches' tensors live on (CPU)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def use_sm90_target() -> None:
    """Make the stand-in the active driver, unless a real GPU is there."""
    if not torch.cuda.is_available():
        triton.runtime.driver.set_active(TargetOnly())


def capturing_launcher(launches: list):
    """A stand-in for the kernels' ``launcher``: each launch is recorded as (kernel, {argument name: value}),
    nothing runs (what torch's TTIR analysis of a traced launch is given)."""
    def launcher(kernel, probe):
        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kw):
                    named = dict(zip(kernel.arg_names, args))
                    named.update({k: v for k, v in kw.items() if k in kernel.arg_names})
                    launches.append((kernel, named))
                return call
        return Grid()
    return launcher
