"""Run as a script (tests/test_fused_merge.py): what Inductor's mutation analysis of a traced launch
(``identify_accessed_tensors``, the TTIR of the CUDA target, compiled here without a GPU) says each store
attention kernel writes: one pass, split-K with the merge launch, split-K with the fused merge counting on
a ``semaphores`` argument. Prints one JSON line."""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class _TargetOnly:
    """Enough of a driver for TTIR generation: the target (H100/H200 class)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


if not torch.cuda.is_available():
    triton.runtime.driver.set_active(_TargetOnly())

from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors  # noqa: E402

from adakv_compile.kernels import triton_attend as ta  # noqa: E402

launches = []


def _capture(kernel, probe):
    class Grid:
        def __getitem__(self, grid):
            def call(*args, **kw):
                named = dict(zip(kernel.arg_names, args))
                named.update({k: v for k, v in kw.items() if k in kernel.arg_names})
                launches.append((kernel, named))
            return call
    return Grid()


ta.launcher = _capture
ta.is_interpreted = lambda: True  # CPU tensors stand in for the device ones (only dtypes matter here)
ta._interpreting = lambda device: False
B, Hkv, G, D, S, t = 2, 2, 4, 128, 512, 1
q = torch.randn(B, Hkv * G, t, D, dtype=torch.bfloat16)
pool_k = torch.randn(B * S + 1, D, dtype=torch.bfloat16)
pool_v = torch.randn_like(pool_k)
off = torch.zeros(B, Hkv, dtype=torch.int32)
lens = torch.zeros(B, Hkv, dtype=torch.int32)
sem = torch.zeros(64, dtype=torch.int32)
out = {}
for name, kw in (("one-pass", dict(num_splits=1)), ("split", dict(max_len_bound=S, split_tokens=128)),
                 ("split-fused", dict(max_len_bound=S, split_tokens=128, fused_merge=True, semaphores=sem))):
    launches.clear()
    ta.store_attention_triton(q, pool_k, pool_v, off, lens, t, 0.1, **kw)
    for kernel, named in launches:
        missing = set(kernel.arg_names) - set(named)  # a traced launch must name every argument
        writes = identify_accessed_tensors(kernel, named, {}).read_writes.writes
        out[f"{name}/{kernel.fn.__name__}"] = sorted(str(d.name) for d in writes) + sorted(f"missing:{m}" for m in missing)
print(json.dumps(out))
