"""Run as a script (tests/test_fused_merge.py): what Inductor's mutation analysis of a traced launch
(``identify_accessed_tensors``, the TTIR of the CUDA target, compiled here without a GPU) says each store
attention kernel writes: one pass, split-K with the merge launch, split-K with the fused merge counting on
a ``semaphores`` argument. Then the graph Inductor would lower for one decode layer (``static_append`` then
``static_attend`` or ``static_attend_merged``, after its reinplacing pass; the append takes its plain path on
CPU): the kernels launched and the tensors copied or cloned. Prints one JSON line."""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tests.sm90_target import capturing_launcher, use_sm90_target  # noqa: E402

use_sm90_target()

from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors  # noqa: E402

from adakv_compile.kernels import triton_attend as ta  # noqa: E402

launches = []


_capture = capturing_launcher(launches)


real_launcher = ta.launcher
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
        out[f"{name}/{kernel.fn.__name__}"] = (sorted(str(d.name) for d in writes)
                                               + sorted(f"missing:{m}" for m in missing))

# -- the post-grad graph of one decode layer (what Inductor lowers: user kernels, copies, clones) --------------
import torch._inductor.fx_passes.post_grad as post_grad  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from adakv_compile.kernels import static  # noqa: E402,F401  (registers the ops)

os.environ["ADAKV_KERNELS"] = "interpret"  # the ops' Triton branch on CPU tensors (traced, never run)
ta.launcher = real_launcher
ta._sm_count = lambda device: 132  # pieces sized as on an H200: the attention splits


class _Stop(Exception):
    pass


graphs = []
_decompose = post_grad.decompose_auto_functionalized


def _last_pass(graph):  # the last post-grad pass: the graph as Inductor lowers it
    _decompose(graph)
    graphs.append(graph)
    raise _Stop


post_grad.decompose_auto_functionalized = _last_pass
S = 600
state = dict(pool_k=torch.zeros(B * S + 1, D, dtype=torch.bfloat16),
             pool_v=torch.zeros(B * S + 1, D, dtype=torch.bfloat16),
             off=off, lens=lens, pos=torch.zeros(B * S + 1, dtype=torch.int32), seen=torch.zeros((), dtype=torch.int64),
             sem=torch.zeros(64, dtype=torch.int32))
k_new, v_new = torch.randn(B, Hkv, t, D, dtype=torch.bfloat16), torch.randn(B, Hkv, t, D, dtype=torch.bfloat16)
for x in state.values():
    torch._dynamo.mark_static_address(x)
for merged in (False, True):
    def layer(q, k_new, v_new):
        st = state
        torch.ops.adakv.static_append(k_new, v_new, st["pool_k"], st["pool_v"], st["off"], st["lens"], st["pos"],
                                      st["seen"])
        if merged:
            return torch.ops.adakv.static_attend_merged(q, st["pool_k"], st["pool_v"], st["off"], st["lens"], 0.1,
                                                        0.0, S, st["sem"])
        return torch.ops.adakv.static_attend(q, st["pool_k"], st["pool_v"], st["off"], st["lens"], 0.1, 0.0, S)

    graphs.clear()
    torch._dynamo.reset()
    try:
        torch.compile(layer, backend="inductor", fullgraph=True)(q, k_new, v_new)
    except Exception:  # noqa: BLE001 - _Stop, wrapped by Dynamo
        if not graphs:
            raise
    g = graphs[-1]
    launches, copied = [], []
    for n in g.nodes:
        if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation:
            launches.append(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__)
        elif n.target in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default):
            copied.append(str(n.target).split(".")[1] + ":" + n.args[0].name)
    sem_arg = next((n.kwargs["kwargs"]["SEM"] for n in g.nodes
                    if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation
                    and "SEM" in n.kwargs["kwargs"]), None)
    out[f"layer/{'merged' if merged else 'default'}"] = dict(
        launches=launches, copied=copied, sem_is_input=sem_arg is not None and sem_arg.op == "placeholder")
print(json.dumps(out))
