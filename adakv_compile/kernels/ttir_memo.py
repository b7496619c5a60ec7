"""An in-process memo of torch's access analysis of a traced Triton launch, for our kernels only.

Why: every ``wrap_triton`` launch traced by torch.compile has its kernel's TTIR generated and walked by
``torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors`` (``identify_mutated_tensors`` in older
torch) -- from AOT functionalization (``get_mutated_tensors``) and again from Inductor (``UserDefinedTritonKernel``),
per launch per layer: ~25 ms a call on a CPU core, so seconds of a model's first compile. Our kernels are launched
with the same argument kinds in every layer, so one analysis per distinct launch serves them all.

Key (everything ``generate_ttir`` reads; see docs/design.md "TTIR analysis memo"): the kernel object (a
``JITFunction``: identity, and its hash is its source hash), Triton's active target, and per argument, in the
caller's order, its name and its kind -- a tensor is its dtype and 16-byte alignment (fake tensors and Inductor's
``TensorBox`` are replaced by torch with an aligned ``torch.empty(2, dtype)``); a SymInt/SymFloat/SymBool/sympy
expression is the constant 2 torch substitutes; any other value is its exact (type, value). Launches with TMA
metadata, kernels outside ``adakv_compile`` and arguments of other kinds go to torch untouched. An ``Autotuner``
(Dynamo wraps a launch given ``num_warps`` in a fresh one per trace) is keyed as its ``JITFunction`` plus the
first config's kwargs, which is all ``generate_ttir`` reads of it.

The result names kernel *argument names* (``StarDep(name)``), never buffers, so it is shareable between launches
with equal keys; each caller gets its own copy. ``uninstall()`` puts torch's functions back (benchmarks compare).
Not an environment switch: the memo changes no compiled output, so it stays out of the cache key (passes/cache_key).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
import time

import torch

log = logging.getLogger(__name__)

_FUNCS = ("identify_accessed_tensors", "identify_mutated_tensors")  # torch >= 2.12-ish, older
_PARAMS = ["kernel", "kwargs", "tma_descriptor_metadata"]
_PREFIX = "adakv_compile"

_memo: dict = {}
_torch_fn: dict = {}  # name -> the function the memo calls on a miss (torch's, or a timing wrapper of it)
_installed: dict = {}  # name -> our wrapper, as set on torch's module
_original: dict = {}  # name -> torch's function, as found there
_module: dict = {}  # name -> the module patched
_stats = dict(hits=0, misses=0, foreign=0, bypass=0, torch_calls=0, torch_s=0.0)


class _NoKey(Exception):
    """An argument the memo does not understand: the call goes to torch, unmemoised."""


def _ours(kernel) -> bool:
    fn = getattr(kernel, "fn", None)
    return callable(fn) and str(getattr(fn, "__module__", "")).startswith(_PREFIX)


def _arg_kind(v):
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym",)
    sympy = sys.modules.get("sympy")
    if sympy is not None and isinstance(v, sympy.Expr):
        return ("sym",)
    fake = sys.modules.get("torch._subclasses.fake_tensor")
    ir = sys.modules.get("torch._inductor.ir")
    if (fake is not None and isinstance(v, fake.FakeTensor)) or (ir is not None and isinstance(v, ir.TensorBox)):
        return ("tensor", v.dtype, True)  # torch substitutes torch.empty(2, dtype): aligned
    if type(v) is torch.Tensor or type(v) is torch.nn.Parameter:
        return ("tensor", v.dtype, v.data_ptr() % 16 == 0)  # passed to Triton as is: dtype + alignment
    if v is None or type(v) in (bool, int, str, torch.dtype):
        return (type(v), v)
    if type(v) is float and v == v:  # nan != nan: never a hit
        return (float, v.hex())  # hex: -0.0 and 0.0 apart
    raise _NoKey(type(v).__name__)


def _key(kernel, kwargs, tma, api):
    if tma:
        raise _NoKey("TMA metadata")
    import triton.runtime
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    extra = ()
    if type(kernel) is Autotuner:
        # Dynamo wraps every launch given num_warps/num_stages in a new one-config Autotuner (call_triton_kernel);
        # generate_ttir then analyses ``kernel.fn`` with the first config's kwargs added (num_warps & co. are not
        # read): those kwargs join the key
        if kernel.configs:
            extra = tuple((name, _arg_kind(v)) for name, v in kernel.configs[0].kwargs.items())
        kernel = kernel.fn
    if type(kernel) is not JITFunction:  # Heuristics and other wrappers
        raise _NoKey(type(kernel).__name__)
    target = triton.runtime.driver.active.get_current_target()
    args = tuple((name, _arg_kind(v)) for name, v in kwargs.items())
    if api == "identify_mutated_tensors":  # its failure path names only torch.Tensor values (not TensorBoxes)
        args += (tuple(isinstance(v, torch.Tensor) for v in kwargs.values()),)
    return (kernel, target, args, extra)


_RESULT_FIELDS = {"read_writes", "can_fuse_epilogue"}  # TensorAccesses, as of torch 2.13
_RW_FIELDS = {"reads", "writes", "index_exprs", "range_vars", "var_ranges"}  # ReadWrites


def _copy(result):
    """A copy the caller may mutate without touching the memo; None for a result we do not know to be
    launch-independent (then it is not memoised): another type, other fields, or index expressions (those
    would be in terms of one launch's sizes)."""
    if isinstance(result, list) and all(isinstance(x, str) for x in result):  # identify_mutated_tensors
        return list(result)
    rw = getattr(result, "read_writes", None)
    if not (dataclasses.is_dataclass(result) and dataclasses.is_dataclass(rw)):
        return None
    if ({f.name for f in dataclasses.fields(result)} != _RESULT_FIELDS
            or {f.name for f in dataclasses.fields(rw)} != _RW_FIELDS
            or rw.index_exprs or rw.range_vars or rw.var_ranges):
        return None
    # deps are frozen dataclasses naming kernel arguments: new sets of the same deps are a full copy
    return dataclasses.replace(result, read_writes=dataclasses.replace(
        rw, reads=type(rw.reads)(rw.reads), writes=type(rw.writes)(rw.writes),
        index_exprs=type(rw.index_exprs)()))


def _make_wrapper(name: str, orig):
    @functools.wraps(orig)
    def analysis(kernel, kwargs, tma_descriptor_metadata):
        if not _ours(kernel):
            _stats["foreign"] += 1
            return _call_torch(name, kernel, kwargs, tma_descriptor_metadata)
        try:
            key = _key(kernel, kwargs, tma_descriptor_metadata, name)
            hash(key)
        except Exception as e:  # noqa: BLE001 - anything unexpected: torch decides, unmemoised
            log.debug("ttir_memo: %s not memoised (%s)", getattr(kernel, "__name__", kernel), e)
            _stats["bypass"] += 1
            return _call_torch(name, kernel, kwargs, tma_descriptor_metadata)
        hit = _memo.get(key)
        if hit is not None:
            _stats["hits"] += 1
            return _copy(hit)
        result = _call_torch(name, kernel, kwargs, tma_descriptor_metadata)
        stored = _copy(result)
        if stored is None:
            log.debug("ttir_memo: %s returned %r; not memoised", name, result)
            _stats["bypass"] += 1
        else:
            _stats["misses"] += 1
            _memo[key] = stored
        return result
    analysis._adakv_ttir_memo = True
    return analysis


def _call_torch(name, kernel, kwargs, tma):
    t0 = time.perf_counter()
    try:
        return _torch_fn[name](kernel, kwargs, tma)
    finally:
        _stats["torch_calls"] += 1
        _stats["torch_s"] += time.perf_counter() - t0


def install() -> bool:
    """Put the memo in front of torch's analysis function(s); idempotent. False (and a debug log saying why)
    where torch's API is not the one this module understands."""
    if _installed:
        return True
    try:
        from torch._higher_order_ops import triton_kernel_wrap as tkw
    except Exception as e:  # noqa: BLE001
        log.debug("ttir_memo: not installed, torch's triton_kernel_wrap does not import (%s)", e)
        return False
    return bool(_install_into(tkw))


def _install_into(tkw) -> dict:
    """Wrap the analysis function(s) found in module ``tkw`` whose signature is the one we know."""
    found = {n: getattr(tkw, n) for n in _FUNCS if callable(getattr(tkw, n, None))}
    if not found:
        log.debug("ttir_memo: not installed, torch has none of %s", _FUNCS)
    done = {}
    for n, fn in found.items():
        if getattr(fn, "_adakv_ttir_memo", False):
            continue  # a second copy of this module (reload): already wrapped
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            params = None
        if params != _PARAMS:
            log.debug("ttir_memo: torch's %s takes %s, not %s; not patched", n, params, _PARAMS)
            continue
        _torch_fn[n] = _original[n] = fn
        done[n] = _make_wrapper(n, fn)
        setattr(tkw, n, done[n])
    _installed.update(done)
    _module.update((n, tkw) for n in done)
    return done


def uninstall() -> None:
    """Put torch's function(s) back where the memo stands in for them (a later ``wrap_torch`` then wraps them
    in torch's module); the memo is forgotten."""
    for n, wrapper in list(_installed.items()):
        if getattr(_module[n], n, None) is wrapper:
            setattr(_module[n], n, _original[n])
        _installed.pop(n)
        _torch_fn.pop(n, None)
    _memo.clear()


def installed() -> bool:
    return bool(_installed)


def wrap_torch(wrap) -> None:
    """Wrap torch's analysis function(s) with ``wrap(fn) -> fn`` (a benchmark's timer): behind the memo where
    it is installed (then only misses and unmemoised calls reach the wrapper), else in torch's module."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    for n in _FUNCS:
        if n in _torch_fn:
            _torch_fn[n] = wrap(_torch_fn[n])
        elif callable(getattr(tkw, n, None)):
            setattr(tkw, n, wrap(getattr(tkw, n)))


def stats() -> dict:
    """Counters: hits, misses (computed by torch, then memoised), foreign (not our kernel), bypass (ours, not
    memoisable: an unknown argument kind or result shape), torch_calls / torch_s (calls into torch's analysis through the memo and their seconds),
    entries, installed."""
    return dict(_stats, entries=len(_memo), installed=installed())


def reset() -> None:
    """Forget the memo and zero the counters (tests, benchmarks)."""
    _memo.clear()
    for k in _stats:
        _stats[k] = 0.0 if k == "torch_s" else 0
