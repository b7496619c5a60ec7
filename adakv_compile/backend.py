"""The Dynamo backend: rewrite attention in the graph, then hand it to the inner compiler (Inductor).

    backend = adakv_backend(AdaKVConfig(budget=512))
    model.forward = torch.compile(model.forward, backend=backend)   # or model.compile(backend=backend)

The rewrite happens on the Dynamo graph *before* ``compile_fx``, so it is part of what Inductor caches.
"""
from __future__ import annotations

import itertools
import logging
from typing import Callable, Optional

import torch
import torch.fx as fx

from .config import AdaKVConfig
from .kernels.ops import register_config
from .kernels.store import StoreError, has_store_header, is_store_view
from .passes import run_passes
from .passes.cache_key import PASS_KEY, config_key
from .passes.compress_once import compile_ahead, register as register_compress_once, use_compress_once
from .passes.gemv import gemv_wanted, replace_gemv
from .passes.merge_linears import merge_linears
from .passes.opaque import opaque_wanted, twins, use_opaque
from .prewarm import op_calls, prewarm_wanted, start as start_prewarm
from .report import Report, RewriteRecord

log = logging.getLogger("adakv_compile")
_graph_ids = itertools.count()
_key_counts: dict[str, int] = {}


def _backend_key(config: AdaKVConfig) -> str:
    """The name under which a backend's config is registered (a constant of its graphs): sha256 of the
    config's fields + how many backends of that config this process made before. The same in a restarted
    process, so Inductor's caches hit (a process counter alone changed with unrelated earlier backends)."""
    digest = config_key(config)
    n = _key_counts.get(digest, 0)
    _key_counts[digest] = n + 1
    return f"adakv-{digest}-{n}"

INNER = ("inductor", "eager", "aot_eager")


class AdaKVBackend:
    """Callable Dynamo backend; ``report`` lists what was rewritten in every graph compiled so far."""

    def __init__(self, config: Optional[AdaKVConfig] = None, inner: str = "inductor",
                 cudagraphs: Optional[bool] = None):
        if config is None:
            config = AdaKVConfig()
        if not isinstance(config, AdaKVConfig):
            raise TypeError(f"adakv_backend(config=...) needs an AdaKVConfig, got {type(config).__name__}")
        if inner not in INNER:
            raise ValueError(f"adakv_backend(inner={inner!r}): must be one of {INNER}")
        if cudagraphs is not None and not isinstance(cudagraphs, bool):
            raise TypeError(f"adakv_backend(cudagraphs={cudagraphs!r}): must be True, False or None (auto)")
        self.cudagraphs = cudagraphs
        self.config = config
        self.inner = inner
        self.report = Report()
        self.graphs: list[dict] = []  # one summary per compiled graph, also those without attention
        self._warned_none = False
        self._warned_reasons: set[str] = set()  # one warning per distinct reason a site is skipped
        self._key = _backend_key(config)
        self._untraced_off = ""  # why prefill_compiler="untraced" fell back to tracing for this backend
        self._untraced_wrapped = False  # compile_model put untraced.untraced_forward around the compiled forward
        self._region_fns: dict = {}  # chunked regions of equal structure share one compile (chunk.structure_key)
        register_compress_once(self._key, self._compile_compress)  # passes/compress_once.py
        if inner == "inductor":
            # Start Inductor's compile-worker pool now, while Dynamo traces, as torch.compile(backend="inductor")
            # does when it looks its backend up: a backend that calls compile_fx itself skips that, and the
            # first graphs' Triton kernels were then built one by one in this process until the pool came up
            # (H200, 8 layers: async_compile.precompile 4.7 s cold, 2.3 s on a warm restart; docs/design.md)
            from torch._inductor.async_compile import maybe_warm_pool
            maybe_warm_pool()

    @property
    def graphs_compiled(self) -> int:
        return len(self.graphs)

    def reconfigure(self, config: AdaKVConfig) -> None:
        """Switch compression settings for graphs already compiled, without recompiling them.

        Allowed between configs that both compress (the graphs' structure is the same); the new
        settings apply from the next prefill. Budget sweeps use this. An AdaKVCache prefill graph, whose
        compression Inductor inlines with the config's values as constants, is compiled once more for
        each new config, on its first prefill (docs/design.md, "Compression through Inductor").
        """
        if not isinstance(config, AdaKVConfig):
            raise TypeError(f"reconfigure(config=...) needs an AdaKVConfig, got {type(config).__name__}")
        if config.compresses != self.config.compresses:
            raise ValueError("reconfigure(config=...): cannot switch between exact mode and compression "
                             "without recompiling; make a new backend")
        if config.prefill_compiler != self.config.prefill_compiler:
            raise ValueError(f"reconfigure(config=...): prefill_compiler={config.prefill_compiler!r} differs "
                             f"from the backend's {self.config.prefill_compiler!r}, which compiled its graphs; "
                             "make a new backend")
        self.config = config
        register_config(config, self._key)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        graph_id = next(_graph_ids)
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
        result = run_passes(gm, self.config, self._key, needs_grad)
        for p in result.planned:
            rec = RewriteRecord(graph_id, p.layer, p.site.pattern, p.phase, p.action, p.mode,
                                p.site.anchor.name, p.reason)
            self.report.append(rec)
            if p.action == "skipped":
                level = logging.INFO if p.reason in self._warned_reasons else logging.WARNING
                self._warned_reasons.add(p.reason)
                log.log(level, "adakv: attention %s in graph %d left untouched: %s", p.site.anchor.name,
                        graph_id, p.reason)
            elif p.reason:
                log.info("adakv: %s", rec)
        self.graphs.append({"graph": graph_id, "attention": len(result.planned),
                            "rewritten": result.rewritten})
        if not result.planned:
            log.info("adakv: graph %d has no attention", graph_id)
            if not self.report and not self._warned_none:
                self._warned_none = True
                log.warning(
                    "adakv: no attention found in graph %d (nor in any graph before it): nothing is "
                    "rewritten or compressed. Check that the model computes attention with "
                    "scaled_dot_product_attention or matmul-softmax-matmul inside the compiled function "
                    "(`adakv explain` shows what the pass sees).", graph_id)
        graphed = self._replay_as_cuda_graph(result, example_inputs)
        self.graphs[-1]["cudagraphs"] = graphed
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        unread = self._unread_stores(result, names, example_inputs)
        if unread:
            why = "; ".join(sorted({p.reason for p in result.planned if p.reason})) or "no attention reads it"
            message = (f"graph {graph_id} receives an adakv compacted cache ({', '.join(unread)}) but no "
                       f"rewritten attention of it reads that cache ({why}): running it would read the "
                       "store as a dense cache. See backend.report.")
            log.error("adakv: %s", message)

            def refuse(*args):
                raise StoreError(message)
            return refuse
        inner = self._inner
        if self.config.prefill_compiler == "untraced" and not self._untraced_wrapped and self._is_prefill(result) \
                and "untraced" not in self._warned_reasons:
            self._warned_reasons.add("untraced")
            log.warning("adakv: prefill_compiler='untraced' takes effect through adakv_compile.compile_model (its "
                        "forward wrapper runs the prefill eagerly); this model.forward was compiled directly, so "
                        "graph %d, a prefill, is traced and compiled with Inductor", graph_id)
        if self.config.prefill_compiler == "eager" and self._is_prefill(result):
            inner = self._eager  # the rewritten graph and its regions run as traced (AdaKVConfig.prefill_compiler)
            self.graphs[-1]["compiler"] = "eager"
        if not needs_grad:  # chunk first: linears inside chunked prefill regions stay unmerged (compute-bound)
            self._chunked(gm, result, inner)
        if self.inner != "eager" and result.static is not None and result.static.phase == "prefill":
            # one Inductor compile for all layers (passes/compress_once.py), also under prefill_compiler="eager"
            once = use_compress_once(gm, self._key)
            if once:
                self.graphs[-1]["compress_once"] = once
        merged = merge_linears(gm, example_inputs, self.config.merge_linears and not needs_grad)
        if gemv_wanted(self.config.gemv, example_inputs) and not needs_grad:  # decode graphs only; after the merge
            self.graphs[-1]["gemv"] = replace_gemv(merged.gm, [p.phase for p in result.planned]).rewritten
        if opaque_wanted(graphed) and result.static is not None and result.static.phase == "append":
            self.graphs[-1]["opaque"] = use_opaque(merged.gm)  # passes/opaque.py (after the GEMV pass)
            if self.graphs[-1]["opaque"] and prewarm_wanted():  # their kernels, while Inductor compiles
                calls = op_calls(merged.gm, merged.inputs(example_inputs), set(twins().values()))
                start_prewarm(calls)
                self.graphs[-1]["prewarm"] = len(calls)
        if self.graphs[-1].get("compress_once"):  # after the merge: it changes the layouts of q, k, v
            self.graphs[-1]["compress_once_ahead"] = compile_ahead(merged.gm)
        variants = self._config_variants(gm, merged, example_inputs, result, inner)  # before inner changes merged.gm
        compiled = merged.wrap(inner(merged.gm, merged.inputs(example_inputs), graphed))
        self.graphs[-1]["merged_linears"] = merged.merged
        dense_idx = [names.index(n) for n in result.dense_cache_inputs if n in names]
        links = result.store_links
        if result.static is not None:
            return self._static_wrapper(compiled, result.static, variants)
        if not dense_idx and not links:
            return compiled

        def run(*args):
            for i in dense_idx:
                if isinstance(args[i], torch.Tensor) and is_store_view(args[i]):
                    raise StoreError(
                        f"graph {graph_id} keeps the cache input {names[i]!r} as a full cache, but it holds "
                        "an adakv compacted store. The layer was compressed by one compiled graph but "
                        "not recognised in this one; see backend.report for the reason.")
            outs = compiled(*args)
            for oi, ai in links:  # carry the host-side store metadata to the new cache views
                meta = getattr(args[ai], "_adakv_meta", None)
                if meta is not None:
                    outs[oi]._adakv_meta = meta
            return outs

        return run

    @staticmethod
    def _unread_stores(result, names, example_inputs) -> list[str]:
        """Graph inputs that are compacted stores but are not read by an adakv op of this graph."""
        read = {n.name for p in result.planned if p.mode == "store" for n in (p.flow.k_past, p.flow.v_past)}
        return [name for name, x in zip(names, example_inputs)  # at compile time: the header read is fine
                if isinstance(x, torch.Tensor) and name not in read and has_store_header(x)]

    def _replay_as_cuda_graph(self, result, example_inputs) -> bool:
        """CUDA graphs for the decode graphs of an AdaKVCache (static shapes and addresses, declared
        writes): on by default on CUDA with Inductor. The general path's hidden in-place store writes
        are incompatible with graph replay, so graphs using it are never graphed."""
        if self.cudagraphs is False or self.inner != "inductor":
            return False
        static_only = result.static is not None and result.static.phase == "append" and all(
            p.mode in ("static-store", "window-attend", "exact", "none") for p in result.planned)
        on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
        return bool(static_only and on_cuda)

    @staticmethod
    def _is_prefill(result) -> bool:
        """The graph fills a cache from the prompt (AdaKVCache prefill, or a general-path prefill site)."""
        if result.static is not None:
            return result.static.phase == "prefill"
        return any(p.phase == "prefill" for p in result.planned)

    @staticmethod
    def _eager(gm, example_inputs, cudagraphs: bool = False) -> Callable:
        return gm.forward

    def _config_variants(self, gm, merged, example_inputs, result, inner: Callable) -> Optional[Callable]:
        """For a prefill graph whose compression Inductor inlines (``adakv::prefill_compress``: the config's
        values are constants of the compiled code): ``variant(config)``, the graph compiled for ``config``,
        compiled on first use after a ``reconfigure`` from a copy of the rewritten graph retargeted to the
        config and Dynamo's fake inputs (no real tensor is kept). None for other graphs."""
        from .kernels.static import inline_config_key, retarget_config
        from .passes.merge_linears import _copy

        target = torch.ops.adakv.prefill_compress.default
        if result.static is None or result.static.phase != "prefill" or not merged.gm.graph.find_nodes(
                op="call_function", target=target):
            return None
        template = _copy(merged.gm)
        placeholders = gm.graph.find_nodes(op="placeholder")
        fakes = [ph.meta.get("example_value", ph.meta.get("val", x)) if len(placeholders) == len(example_inputs)
                 else x for ph, x in zip(placeholders, example_inputs)]
        recompilable = not any(type(x) is torch.Tensor and not isinstance(x, torch.nn.Parameter) for x in fakes)
        if not recompilable:
            fakes = None
        compiled = {inline_config_key(self.config): None}  # None: the graph compiled by __call__

        def variant(config: AdaKVConfig):
            key = inline_config_key(config)
            if key not in compiled:
                if not recompilable:  # no fake of an input: keeping the real one (a cache) alive is no option
                    raise StoreError("adakv: this prefill graph was compiled for another AdaKVConfig and cannot "
                                     "be recompiled for the reconfigured one; make a new backend")
                from torch._guards import TracingContext, detect_fake_mode, tracing
                copy_gm = _copy(template)
                retarget_config(copy_gm, config)
                inputs = merged.inputs(fakes)
                with tracing(TracingContext(detect_fake_mode(inputs))):
                    compiled[key] = merged.wrap(inner(copy_gm, inputs))
                log.info("adakv: prefill graph recompiled for the reconfigured %s", config)
            return compiled[key]

        return variant

    def _static_wrapper(self, compiled: Callable, use, variants: Optional[Callable] = None) -> Callable:
        """Keep the AdaKVCache's host-side count of appended tokens (capacity errors before the step) and
        advance its ``seen`` tensor after the step (outside the graph: see AdaKVCache.advance). ``variants``
        (a prefill with inlined compression): the graph compiled for the backend's current config."""
        index, phase, chunk = use.cache_input, use.phase, use.chunk

        def run(*args):
            ref = getattr(args[index], "_adakv_cache", None)
            cache = ref() if ref is not None else None
            if cache is None:
                raise StoreError("adakv: a graph compiled for an AdaKVCache got a cache tensor of no live "
                                 "AdaKVCache")
            if isinstance(chunk, int):
                t = chunk
            elif chunk[0] == "input":
                t = int(args[chunk[1]])
            else:
                t = int(args[chunk[1]].shape[chunk[2]])
            run_graph = compiled
            if phase == "prefill":
                cache.before_prefill(self.config)
                if variants is not None:
                    run_graph = variants(self.config) or compiled
            else:
                cache.before_append(t)
            outs = run_graph(*args)
            cache.advance(t)
            return outs

        return run

    def _chunked(self, gm, result, inner: Callable) -> None:
        """Run the prefill's position-wise regions over sequence chunks (passes/chunk.py), each region
        compiled by the inner compiler for a chunk's rows."""
        from .passes.chunk import chunk_regions
        from .passes.detect import val

        lengths = [(val(p.site.q).shape[2], val(p.site.k).shape[2]) for p in result.planned
                   if p.mode in ("exact", "compress", "static-compress") and val(p.site.q) is not None
                   and val(p.site.k) is not None]
        static = {q for q, k in lengths if isinstance(q, int) and isinstance(k, int) and q == k}
        n = static.pop() if len(static) == 1 and len(lengths) == sum(q == k for q, k in lengths
                                                                       if isinstance(q, int)) else None
        regions = chunk_regions(gm, n, self.config.prefill_chunk, lambda g, ex: self._compile_region(g, ex, inner),
                                self._region_fns if inner == self._inner else None,
                                whole=self.config.prefill_compiler == "regions")
        self.graphs[-1]["chunked_regions"] = len(regions)

    def _compile_region(self, gm, args, inner) -> Callable:
        """A chunked region is compiled at its first run, outside Dynamo: from fake copies of its inputs in a
        fresh fake mode with a shape environment, as Dynamo would hand them over, so that Inductor's FX-graph
        and AOTAutograd caches take it (with real tensors and no shape env both bypass: "No shape env")."""
        if inner == self._eager or self.inner == "eager":
            return inner(gm, args)
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        from .passes.fake_values import fill_fake_values

        mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in args]
        placeholders = iter(fakes)
        for node in gm.graph.nodes:  # the cut region's nodes carry the outer graph's values (n rows, its mode)
            node.meta.pop("val", None)
            node.meta.pop("example_value", None)
            if node.op == "placeholder":
                node.meta["example_value"] = next(placeholders)
        fill_fake_values(gm.graph)  # AOTAutograd's cache refuses method calls on nodes without one
        with tracing(TracingContext(mode)):
            return inner(gm, fakes)

    def _compile_compress(self, gm, args) -> Callable:
        """The one-layer compression graph of ``adakv::compress_once``, compiled as a region is."""
        return self._compile_region(gm, args, self._inner)

    def _inner(self, gm, example_inputs, cudagraphs: bool = False) -> Callable:
        if self.inner == "eager":
            return self._eager(gm, example_inputs)
        if self.inner == "aot_eager":
            from torch._dynamo.backends.registry import lookup_backend
            return lookup_backend("aot_eager")(gm, example_inputs)
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        patches = {"triton.cudagraphs": True} if cudagraphs else {}
        if inductor_config.post_grad_custom_pre_pass is None:  # our code in the cache keys (cache_key.py)
            patches["post_grad_custom_pre_pass"] = PASS_KEY
        return compile_fx(gm, example_inputs, config_patches=patches)


def adakv_backend(config: Optional[AdaKVConfig] = None, inner: str = "inductor",
                  cudagraphs: Optional[bool] = None, **fields) -> AdaKVBackend:
    """Make a Dynamo backend. ``fields`` are AdaKVConfig fields, e.g. ``adakv_backend(budget=512)``.

    ``cudagraphs``: replay AdaKVCache decode graphs as CUDA graphs (None = on for CUDA inputs).
    """
    if fields:
        config = (config or AdaKVConfig()).replace(**fields)
    return AdaKVBackend(config, inner=inner, cudagraphs=cudagraphs)


def compile_model(model: torch.nn.Module, config: Optional[AdaKVConfig] = None, inner: str = "inductor",
                  cudagraphs: Optional[bool] = None, **compile_kwargs) -> AdaKVBackend:
    """Compile ``model.forward`` in place with an adakv backend and return the backend (for its report).

    This is the form under which HF ``model.generate`` runs the compiled forward; the module returned by
    ``torch.compile(model, ...)`` keeps calling the uncompiled forward from ``.generate``. Each call is first
    checked in plain Python (``serve.check_call``): a bad one raises ``RequestError`` naming the parameter.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_model(model=...) needs a torch.nn.Module, got {type(model).__name__}")
    from .serve import checked_forward
    from .untraced import untraced_forward

    backend = adakv_backend(config, inner=inner, cudagraphs=cudagraphs)
    # bad calls (wrong batch, empty prompt, used or foreign cache) are refused in plain Python before Dynamo
    # traces them: a trace that raised would leave the frame running eagerly for every later call
    compiled = torch.compile(model.forward, backend=backend, **compile_kwargs)
    model.forward = checked_forward(untraced_forward(model.forward, compiled, backend, model), backend)
    backend._untraced_wrapped = True
    gen = getattr(model, "generation_config", None)
    if gen is not None:  # HF generate would re-compile forward with Inductor for a compileable cache
        gen.disable_compile = True
    return backend


def registered_backend(gm: fx.GraphModule, example_inputs):
    """Entry point for ``torch.compile(backend="adakv")``: the default config (exact mode).

    Pass settings with ``torch.compile(model, backend="adakv", options={...})`` is not supported by
    Dynamo for third-party backends; use ``adakv_backend(AdaKVConfig(...))`` for compression.
    """
    return _DEFAULT(gm, example_inputs)


_DEFAULT = AdaKVBackend()
