"""Compile a decode graph's Triton kernels in a helper process while Inductor compiles the graph.

Why: with the decode graph's ops opaque (passes/opaque.py, the default for CUDA-graphed decode) their Triton
kernels JIT-compile on the first decode step, one after another in this process (H200, 8 layers cold: the
``run`` phase of the first ``generate`` grew 5.4 -> 9.0 s when the ops went opaque,
bench/results/start-profile-s14-8L-decode-opaque-h200.md). Their arguments' shapes, strides and dtypes are
known when the backend receives the graph, seconds before the first step, so a helper process calls each
distinct op once on zero tensors of those layouts with every Triton launch turned into ``warmup`` (compile, no
launch). It fills Triton's on-disk cache (``TRITON_CACHE_DIR``, inherited); this process's JIT then loads
instead of compiling, or compiles itself what the helper has not reached yet (same result, same cache key).

Measured (H200, session 14, 8 layers, 1 x 8192 + 16, untraced prefill; bench/results/start-profile-s14-8L-prewarm*-h200.md
and the helpers' logs next to them): no gain shown. With one helper per call, each needed 8.5-11 s to import torch
beside the compile and finished its kernel 9.4-12.3 s after the spawn, while the first decode step came ~8 s
after it (the decode graph's AOT + Inductor time); cold first ``generate`` 15.5 s with two helpers vs 15.2 s without (HF static 12.2 s, same run), 19.3 s
with one helper per call vs 21.6 s without (HF 14.8 s, another lease): inside the run-to-run spread. So it is
**off** unless ``ADAKV_PREWARM=1``. What would make it pay: a helper started early (at ``compile_model``, paying its
import while Dynamo traces) and fed the calls when the decode graph arrives. Nothing the helper does can change a
result: it shares no memory with this process, and a failure in it is only logged.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import torch
import torch.fx as fx

from .kernels.dispatch import switch

log = logging.getLogger("adakv_compile")

_HELPERS: list[subprocess.Popen] = []
MAX_CALL_BYTES = 1 << 30  # a call whose zero tensors would take more is left to the first step (GPU memory)


def _layout(value: Any) -> Any:
    """A picklable stand-in for one argument: a tensor's layout, or the value itself. A symbolic size raises."""
    if isinstance(value, torch.Tensor):
        sizes = (*value.shape, *value.stride(), value.storage_offset())
        if not all(isinstance(d, int) for d in sizes):
            raise TypeError("a symbolic size")
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.storage_offset(),
                str(value.dtype).removeprefix("torch."), value.device.type)
    if isinstance(value, (list, tuple)):
        return type(value)(_layout(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"no layout for {type(value).__name__}")


def op_calls(gm: fx.GraphModule, example_inputs, targets) -> list[tuple[str, tuple, dict]]:
    """The distinct calls of ``targets`` in ``gm``: (qualified op name, argument layouts, keyword layouts), the
    layouts as in the graph as rewritten (``fake_values.layout_value``: merged q/k/v are views of one output)
    and the graph's inputs as given. Calls with an argument of no known layout (a symbolic size, a node without
    a value) are left out: those kernels compile at the first step, as without the helpers."""
    from .passes.fake_values import graph_fake_mode, layout_value  # here: the helper process imports this module

    inputs = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
    mode, memo = graph_fake_mode(gm.graph), {}

    def value(node: fx.Node):
        v = inputs[node] if node in inputs else layout_value(node, memo, mode)
        if v is None:
            raise TypeError(f"no value for {node.name}")
        return v

    calls, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        try:
            args = _layout(fx.node.map_arg(node.args, value))
            kwargs = {k: _layout(v) for k, v in fx.node.map_arg(node.kwargs, value).items()}
        except TypeError as err:
            log.debug("adakv: prewarm skips %s: %s", node.name, err)
            continue
        call = (node.target.name(), args, kwargs)
        if repr(call) not in seen:
            seen.add(repr(call))
            calls.append(call)
    return calls


def prewarm_wanted() -> bool:
    """``ADAKV_PREWARM=1`` (also on the CPU, where the helpers run the plain bodies: tests); off otherwise, as
    it has not been shown to pay."""
    return bool(switch("ADAKV_PREWARM"))


# the helper imports the kernels alone: the package's __init__ (backend, passes, transformers) would add seconds
_HELPER = ("import sys, types; package = types.ModuleType('adakv_compile'); "
           f"package.__path__ = [{os.path.dirname(os.path.abspath(__file__))!r}]; "
           "sys.modules['adakv_compile'] = package; from adakv_compile.prewarm import main; main()")


def start(calls: list, helpers: int = 8) -> list[subprocess.Popen]:
    """Start up to ``helpers`` processes compiling ``calls`` (round robin); returns them (not waited for).
    One call each where it can: the decode graph's compile leaves ~8 s (8 layers, H200) before the first step
    needs the kernels, and a helper spent 8.5-11 s of it importing torch beside that compile (module docstring)."""
    procs = []
    for i in range(min(helpers, len(calls))):
        share = calls[i::helpers]
        logfile = os.path.join(tempfile.gettempdir(), f"adakv-prewarm-{os.getpid()}-{len(_HELPERS) + i}.log")
        with open(logfile, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", _HELPER], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ))
        proc.logfile = logfile
        proc.stdin.write(pickle.dumps((time.time(), share)))
        proc.stdin.close()
        procs.append(proc)
    log.info("adakv: %d prewarm helper(s) compiling %d decode op call(s); logs %s", len(procs), len(calls),
             ", ".join(p.logfile for p in procs))
    _HELPERS.extend(procs)
    return procs


@atexit.register
def _stop_helpers() -> None:
    for proc in _HELPERS:
        if proc.poll() is None:
            proc.kill()


def _is_tensor(layout: Any) -> bool:
    return isinstance(layout, tuple) and bool(layout) and layout[0] == "tensor"


def _tensor_layouts(layout: Any):
    """The tensor layouts inside ``layout`` (arguments, nested lists and tuples)."""
    if _is_tensor(layout):
        yield layout
    elif isinstance(layout, (list, tuple)):
        for v in layout:
            yield from _tensor_layouts(v)


def _span(layout: tuple) -> int:
    _, shape, stride, offset, _, _ = layout
    return offset + sum((s - 1) * st for s, st in zip(shape, stride)) + 1 if all(shape) else offset


def _make(layout: Any) -> Any:
    if _is_tensor(layout):
        _, shape, stride, offset, dtype, device = layout
        storage = torch.zeros(max(_span(layout), 1), dtype=getattr(torch, dtype), device=device)
        return storage.as_strided(shape, stride, offset)
    if isinstance(layout, (list, tuple)):
        return type(layout)(_make(v) for v in layout)
    return layout


def compile_only() -> None:
    """Turn every ``kernel[grid](...)`` launch of this process into ``warmup`` (compile, do not launch)."""
    from triton.runtime.jit import KernelInterface

    KernelInterface.__getitem__ = lambda self, grid: (
        lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs))


def run(calls: list, t0: Optional[float] = None) -> int:
    """Call each op once on zero tensors of the recorded layouts; returns how many ran."""
    import adakv_compile.kernels.gemv  # noqa: F401  (registers the ops)
    import adakv_compile.kernels.static  # noqa: F401

    done = 0
    for name, args, kwargs in calls:
        namespace, op = name.split("::")
        tensors = list(_tensor_layouts([args, list(kwargs.values())]))
        if sum(_span(t) * getattr(torch, t[4]).itemsize for t in tensors) > MAX_CALL_BYTES:
            print(f"adakv prewarm: {name}: skipped, over {MAX_CALL_BYTES} bytes", file=sys.stderr)
            continue
        try:
            getattr(getattr(torch.ops, namespace), op).default(*_make(args), **_make(kwargs))
            done += 1
            if t0 is not None:
                print(f"adakv prewarm: {name} compiled at +{time.time() - t0:.2f} s", file=sys.stderr)
        except Exception as err:  # noqa: BLE001  (a helper: the main process compiles what is left)
            print(f"adakv prewarm: {name}: {type(err).__name__}: {err}", file=sys.stderr)
    return done


def main() -> None:
    t0, calls = pickle.loads(sys.stdin.buffer.read())
    print(f"adakv prewarm: torch imported at +{time.time() - t0:.2f} s (from the spawn)", file=sys.stderr)
    if any(t[-1] == "cuda" for t in _tensor_layouts([(args, list(kwargs.values())) for _, args, kwargs in calls])):
        compile_only()
    done = run(calls, t0)
    print(f"adakv prewarm: {done} of {len(calls)} calls, done at +{time.time() - t0:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
