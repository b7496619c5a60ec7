"""Compile one layer's prefill compression once for all layers (issue 17: a fast start).

Inlined into the prefill graph, ``adakv::prefill_compress`` (scoring, allocation, compaction: a traced
body of Triton launches and aten ops) is lowered, scheduled and code-generated once per *layer* by
AOTAutograd and Inductor; on an H200 at 8 layers that made the prefill graph's compile about twice the decode
graph's (bench/results/start-profile-s11-8L-h200.md). Every layer's call is the same graph on other tensors
(its pools, same shapes) as long as the config does not depend on the layer: ``allocate.row_keep`` reads
the layer only for ``skip_layers`` and a non-flat ``layer_schedule`` (``layer_class``).

This pass replaces each ``prefill_compress`` node by ``adakv::compress_once`` (same arguments; the config
key becomes the backend's key, read at run time). At its first call for a given layer class, config and
input layouts, the op compiles a one-node graph calling ``prefill_compress`` (layer normalised by
``layer_class``) with the backend's compiler, from fake inputs in a fresh shape environment, so that
Inductor's FX-graph and AOTAutograd caches take it on a restart (as chunked regions, backend._compile_region);
every later layer reuses that compiled function. Kernels stay Inductor's (inlined into the one-layer
graph); what runs per layer in Python is the op call and the compiled function's wrapper.

``backend.reconfigure`` needs no recompile of the prefill graph: the op reads the backend's live config and
compiles the one-layer graph for a new config on first use (``inline_config_key`` is part of its key).
When: ``compress_once_on`` (from ``MIN_LAYERS`` compressing layers up, as measured; ``ADAKV_COMPRESS_ONCE``
= 1 / 0 forces it either way).
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..kernels.dispatch import switch
from ..kernels.ops import config_for
from .chunk import input_layouts
from .fake_values import graph_fake_mode, layout_value

log = logging.getLogger("adakv_compile")

# backend key -> (a weak reference to the backend's compile method, compiled functions by key)
_COMPILERS: dict[str, tuple[weakref.WeakMethod, dict]] = {}


# Unset switch: compile once from this many compressing layers of a prefill graph up. H200, torch 2.11, Llama-8B
# shapes, 1 x 8k, one run each: 32 layers 86 s instead of 125 cold (session 11); 8 layers, with the one-layer graph
# compiled with the prefill graph and Inductor's worker pool started at backend creation (session 12,
# bench/results/start-profile-s12-pool-8L-h200.md): 32.4 / 7.5 s cold / warm against 45.4 / 8.0 inlined per layer
# (35.8 / 8.1 in the run before). Not measured below 8 layers, where the inlined copies cost little.
MIN_LAYERS = 8


def compress_once_on(layers: int) -> bool:
    """``ADAKV_COMPRESS_ONCE`` = 1 / 0 forces it; unset: on for prefill graphs compressing ``MIN_LAYERS`` or
    more layers."""
    value = switch("ADAKV_COMPRESS_ONCE")
    return layers >= MIN_LAYERS if value is None else value


def layer_class(config, layer: int, num_layers: int) -> tuple[int, int]:
    """(layer, num_layers) as the compression body reads them: the real ones when the config makes layers
    differ (a skipped layer, a non-flat schedule), else a representative shared by all layers (the smallest
    index the config does not skip, one layer: the flat schedule ignores both)."""
    if layer in config.skip_layers or (config.layer_schedule != "flat" and num_layers > 1):
        return layer, num_layers
    skipped = set(config.skip_layers)
    return next(i for i in range(len(skipped) + 1) if i not in skipped), 1


def register(backend_key: str, compile_method: Callable) -> None:
    """Make a backend's compiler (a bound method, held weakly: the registry keeps no backend alive) reachable
    from its graphs' ``compress_once`` calls."""
    _COMPILERS[backend_key] = entry = (weakref.WeakMethod(compile_method), {})
    weakref.finalize(compile_method.__self__, _forget, backend_key, entry)  # its compiled graphs go with it


def registered(backend_key: str) -> bool:
    """Whether a live backend's compiler is registered under ``backend_key``."""
    return backend_key in _COMPILERS


def compiled_graphs(backend_key: str) -> dict:
    """The one-layer graphs compiled so far for the backend under ``backend_key`` (key -> compiled function;
    empty when none): what reports and benchmarks count, and may clear to force a recompile."""
    return _COMPILERS.get(backend_key, (None, {}))[1]


def _forget(backend_key: str, entry: tuple) -> None:
    if _COMPILERS.get(backend_key) is entry:
        del _COMPILERS[backend_key]


def use_compress_once(gm: fx.GraphModule, backend_key: str) -> int:
    """Point every ``prefill_compress`` node of ``gm`` at ``compress_once`` (where ``compress_once_on`` says);
    returns how many."""
    target = torch.ops.adakv.prefill_compress.default
    nodes = gm.graph.find_nodes(op="call_function", target=target)
    if not compress_once_on(len(nodes)):
        return 0
    for node in nodes:
        args = list(node.args)
        args[8] = backend_key  # the config key: the backend's, whose config is read at run time
        node.args = tuple(args)
        node.target = torch.ops.adakv.compress_once.default
    if nodes:
        gm.recompile()
    return len(nodes)


def _one_layer_graph(literals: tuple, present: tuple[bool, ...]) -> fx.GraphModule:
    """``prefill_compress(q, k, v, mask, *literals, pool_k, ..., seen, sinks, bias)`` as a graph whose
    placeholders are the tensors present (None arguments stay None)."""
    g = fx.Graph()
    names = ("q", "k", "v", "attn_mask", "pool_k", "pool_v", "off", "lens", "pos", "seen", "sinks", "bias")
    ph = [g.placeholder(name) if here else None for name, here in zip(names, present)]
    args = tuple(ph[:4]) + literals + tuple(ph[4:10])
    g.call_function(torch.ops.adakv.prefill_compress.default, args, {"sinks": ph[10], "bias": ph[11]})
    g.output(())
    return fx.GraphModule(torch.nn.Module(), g)


def _compiled_for(q, k, v, attn_mask, scale, softcap, layer, num_layers, backend_key, room, pool_k, pool_v, off,
                  lens, pos, seen, sinks=None, bias=None) -> tuple[Callable, list]:
    """The compiled one-layer graph for these arguments (compiling it on first use) and its tensor inputs.
    Works on real tensors (the op) and on fake ones (``compile_ahead``): both key by ``input_layouts``."""
    from ..kernels.static import inline_config_key

    method, compiled = _COMPILERS.get(backend_key, (lambda: None, {}))
    compile_fn = method()
    if compile_fn is None:
        raise RuntimeError(f"adakv: compress_once: no live backend under {backend_key!r} (the backend that "
                           "compiled this graph was deleted)")
    config = config_for(backend_key)
    layer, num_layers = layer_class(config, layer, num_layers)
    literals = (float(scale), float(softcap), layer, num_layers, inline_config_key(config), int(room))
    tensors = (q, k, v, attn_mask, pool_k, pool_v, off, lens, pos, seen, sinks, bias)
    inputs = [x for x in tensors if x is not None]
    key = (literals, input_layouts(tensors))
    fn = compiled.get(key)
    if fn is None:
        gm = _one_layer_graph(literals, tuple(x is not None for x in tensors))
        fn = compiled[key] = compile_fn(gm, inputs)
        log.debug("adakv: compress_once: compiled the compression for layer class %s (%d compiled)",
                  (layer, num_layers), len(compiled))
    return fn, inputs


def compile_ahead(gm: fx.GraphModule) -> int:
    """Compile, while the backend compiles ``gm``, the one-layer graphs its ``compress_once`` calls will look
    up at run time (with the backend's config as it is now); returns how many calls found theirs ready.

    Why: the compile then belongs to the backend's compile, as the outer graph's does, instead of the first
    prefill's run. (It did not by itself end the one-layer graph's kernels being built one by one in this
    process — 4.7 s cold, 2.3 s warm on an H200 at 8 layers; that was Inductor's worker pool not yet started:
    ``AdaKVBackend.__init__``.) The fake values of the arguments carry the layouts the run-time key reads; a
    call whose arguments have symbolic sizes or no fake value is left to its first run (as is any config set
    by a later reconfigure).
    """
    mode, memo, ready = graph_fake_mode(gm.graph), {}, 0
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.adakv.compress_once.default):
        missing = []

        def value(n):
            v = layout_value(n, memo, mode)
            if v is None or (isinstance(v, torch.Tensor) and not all(
                    isinstance(d, int) for d in (*v.shape, *v.stride()))):
                missing.append(n.name)
            return v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if missing:
            log.info("adakv: compress_once: %s compiles at its first run (no static fake value for %s)",
                     node.name, ", ".join(missing))
            continue
        _compiled_for(*args, **kwargs)
        ready += 1
    return ready


@torch.library.custom_op("adakv::compress_once", mutates_args=("pool_k", "pool_v", "off", "lens", "pos"))
def compress_once(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  scale: float, softcap: float, layer: int, num_layers: int, backend_key: str, room: int,
                  pool_k: torch.Tensor, pool_v: torch.Tensor, off: torch.Tensor, lens: torch.Tensor,
                  pos: torch.Tensor, seen: torch.Tensor, sinks: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None) -> None:
    """``prefill_compress`` through the one-layer graph compiled for its layer class, config and layouts."""
    fn, inputs = _compiled_for(q, k, v, attn_mask, scale, softcap, layer, num_layers, backend_key, room, pool_k,
                               pool_v, off, lens, pos, seen, sinks, bias)
    fn(*inputs)


@compress_once.register_fake
def _(q, k, v, attn_mask, scale, softcap, layer, num_layers, backend_key, room, pool_k, pool_v, off, lens, pos,
      seen, sinks=None, bias=None):
    return None
