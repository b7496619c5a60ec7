"""A prefill Dynamo never traces: ``AdaKVConfig(prefill_compiler="untraced")`` (issue 17: a fast start).

Why: HF's static cache compiles one frame, the decode step; its prefill runs eagerly. Our traced prefill is a
second whole-model frame — Dynamo's trace, AOTAutograd and Inductor once more — and on an H200 at 32 layers
it is half of the first ``generate``'s compile (bench/results/start-profile-s12-32L-h200.md: bytecode tracing
13.4 s for our two frames against 4.9 s for HF's one, on a warm restart). Here the prompt runs through the
model's own eager forward, as HF's does, and only what compression needs is intercepted:

- ``AdaKVLayer.update`` hands the layer's new K/V back unchanged and records them (``layer_update``);
- the next ``scaled_dot_product_attention`` call (a ``TorchFunctionMode``) must be that layer's attention
  over them (its K the recorded K, or the recorded K repeated per query group as transformers 5.17's
  ``repeat_kv`` makes it, checked on the values); it runs as the model called it, then the layer's prompt
  is scored, allocated and compacted into its store, with the valid keys read from the call's mask as the
  traced prefill reads them, by the compression's eager body (``adakv::static_compress``: its Triton kernels
  launched from Python, the config read at run time). ``ADAKV_UNTRACED_COMPILED_COMPRESS=1`` calls
  ``adakv::compress_once`` instead (the one-layer graph compiled by Inductor once for all layers).

  Why eager by default (H200, 32 layers, 1 x 8k, bench/results/start-profile-s13-32L-variants-h200.md and
  profile-prefill-s13-32L-8k-h200.txt): it saves the one-layer graph's compile and cache load — first
  ``generate`` 37.5 / 7.6 s cold / warm against 38.6 / 9.2 compiled, HF static 28.7 / 6.7 — for 6.4 ms of
  host time per prefill (262.0 against 255.6 ms; HF's eager prefill 252.6, the traced prefill 220.6). This
  mode is the one that trades prefill speed for a fast start.

Decode steps still run the compiled graph (the only frame Dynamo traces). What the interception does not
recognise — attention that is not an SDPA call (eager matmul-softmax, caught at its logits product; sinks,
softcapping), a mask that is not exactly causal + padding (a sliding window, an additive bias such as
ALiBi), a non-causal prompt — is not guessed at: the prefill is redone through the traced, compiled forward
(the cache reset first) and the reason logged once; later prefills of that backend go the traced way
directly. Hybrid caches (sliding-window or state layers), tensor parallelism and fixed-slot caches are not
attempted (``untraced_reason``).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from .cache import AdaKVCache, AdaKVLayer, RequestError
from .kernels.dispatch import switch
from .kernels.ops import attended, register_config
from .report import RewriteRecord

log = logging.getLogger("adakv_compile")

_SDPA = torch.nn.functional.scaled_dot_product_attention
UNTRACED_GRAPH = -1  # the ``graph`` of backend.report's records for the untraced prefill (no compiled graph)
_PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
             torch.baddbmm, torch.einsum)


class Unrecognised(Exception):
    """The eager prefill met something the interception does not understand; the traced prefill takes over."""


def untraced_reason(cache, model) -> str:
    """Why this prefill into ``cache`` (an AdaKVCache) cannot run untraced ("" when it can)."""
    if not all(type(layer) is AdaKVLayer for layer in cache.layers):
        return "the cache has sliding-window or state layers (hybrid model)"
    if cache._free is not None:
        return "the cache is used in fixed slots (serving)"
    if getattr(model, "tp_size", None) not in (None, 1) or len({layer.device for layer in cache.layers}) != 1:
        return "tensor parallel or multi-device cache"
    return ""


class UntracedPrefill(TorchFunctionMode):
    """Runs while the model's eager forward fills ``cache`` from a prompt (see the module docstring)."""

    def __init__(self, cache: AdaKVCache, compress: Callable):
        super().__init__()
        self.cache, self.compress = cache, compress
        self.pending: Optional[tuple] = None  # (layer, its index, K, V) between its update and its attention
        self.done = 0
        self.tokens = 0
        self._masks: dict = {}  # id(mask) -> (mask, its check) : HF passes one mask to every layer

    def __enter__(self):
        for layer in self.cache.layers:
            layer._untraced = self
        return super().__enter__()

    def __exit__(self, *exc):
        for layer in self.cache.layers:
            layer._untraced = None
        return super().__exit__(*exc)

    def layer_update(self, layer: AdaKVLayer, k: torch.Tensor, v: torch.Tensor):
        """``AdaKVLayer.update`` at an untraced prefill: the K/V come back unchanged, remembered for the
        attention that follows."""
        if self.pending is not None:
            raise Unrecognised(f"layer {self.pending[1]}'s attention over its cache is not a "
                               "scaled_dot_product_attention call")
        if layer.compressed:
            raise Unrecognised("a layer was updated twice in one forward")
        if self.tokens and k.shape[-2] != self.tokens:
            raise Unrecognised("layers saw prompts of different lengths")
        self.tokens = int(k.shape[-2])
        self.pending = (layer, self.cache.layers.index(layer), k, v)
        return k, v

    def finish(self) -> int:
        """After the forward: every layer compressed; returns the prompt length."""
        if self.pending is not None or self.done != len(self.cache.layers):
            which = self.pending[1] if self.pending is not None else self.done
            raise Unrecognised(f"layer {which}'s attention over its cache is not a scaled_dot_product_attention "
                               "call")
        return self.tokens

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending is not None and func in _PRODUCTS and self._scores_by_hand(func, args):
            # eager (matmul-softmax) attention: stop before its n x n scores are allocated (a long prompt's
            # could exceed memory the traced prefill, which rewrites that attention, does not need)
            raise Unrecognised(f"layer {self.pending[1]}'s attention over its cache is computed with "
                               f"{getattr(func, '__name__', func)}, not a scaled_dot_product_attention call")
        if func is not _SDPA or self.pending is None:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self._compress(*args, **kwargs)
        return out

    def _scores_by_hand(self, func, args) -> bool:
        """Whether this product reads the pending layer's keys as attention logits do: an operand laid out as
        K transposed ([..., D, n]), or for einsum two operands laid out as [..., n, D] (queries and keys)."""
        n, D = self.pending[2].shape[-2:]
        tensors = [a for a in (args[1:] if func is torch.einsum else args) if isinstance(a, torch.Tensor)]
        if func is torch.einsum:
            return sum(t.dim() >= 3 and tuple(t.shape[-2:]) == (n, D) for t in tensors) >= 2
        return any(t.dim() >= 3 and tuple(t.shape[-2:]) == (D, n) for t in tensors)

    def _compress(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        layer, index, k_new, v_new = self.pending
        n, D = k_new.shape[-2:]
        if q.shape[-2] != n or k.shape[-2] != n or q.dim() != 4:
            raise Unrecognised(f"layer {index}: the attention's query or key length is not the prompt's")
        if dropout_p:
            raise Unrecognised(f"layer {index}: attention dropout {dropout_p}")
        if k is not k_new and not _repeats(k, k_new) or v is not v_new and not _repeats(v, v_new):
            raise Unrecognised(f"layer {index}: the attention's K/V are not the layer's cache update")
        mask = self._mask(attn_mask, is_causal, index)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        self.compress(q, k_new, v_new, mask, scale, index, len(self.cache.layers), layer)
        layer.compressed = True
        self.pending = None
        self.done += 1

    def _mask(self, attn_mask, is_causal: bool, index: int) -> Optional[torch.Tensor]:
        """The mask as the compression reads it (valid keys from its last row): None for a plain causal call;
        a boolean or 0 / -inf padding + causal mask as given. Anything else is not a prompt's mask."""
        if attn_mask is None:
            if not is_causal:
                raise Unrecognised(f"layer {index}: attention without a mask and not causal (bidirectional)")
            return None
        memo = self._masks.get(id(attn_mask))
        if memo is None or memo[0] is not attn_mask:
            memo = self._masks[id(attn_mask)] = (attn_mask, _padding_causal(attn_mask))
        if not memo[1]:
            raise Unrecognised(f"layer {index}: the attention mask is not causal + padding (an additive bias?)")
        return attn_mask


def _repeats(x: torch.Tensor, base: torch.Tensor) -> bool:
    """``x`` is ``base`` with each KV head repeated for its query group (``repeat_kv``), value for value."""
    if x.dim() != 4 or x.shape[0] != base.shape[0] or x.shape[2:] != base.shape[2:] or \
            x.shape[1] % base.shape[1]:
        return False
    g = x.shape[1] // base.shape[1]
    return bool(torch.equal(x.unflatten(1, (base.shape[1], g)), base.unsqueeze(2).expand(-1, -1, g, -1, -1)))


def _padding_causal(mask: torch.Tensor) -> bool:
    """Whether ``mask`` [B|1, 1, n, n] is exactly causal with padded keys masked — boolean, or additive with 0
    where attended and a very negative value elsewhere: every non-padding query attends exactly the valid keys
    up to itself, the valid keys being those the last query attends (what ``valid_from_mask`` reads). A sliding
    window, a prefix-LM or chunked mask, and any additive bias fail it. Padding queries' rows are not read."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != mask.shape[-2]:
        return False
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return False
    n = mask.shape[-1]
    valid = attended(mask[:, 0, -1, :])                                         # [B, n]
    keys = torch.arange(n, device=mask.device)
    for start in range(0, n, _ROWS):  # blocks of query rows: O(block x n) temporaries, not O(n^2)
        rows = mask[:, 0, start:start + _ROWS, :]
        if mask.dtype != torch.bool and bool(((rows != 0) & attended(rows)).any()):
            return False  # an additive term where attended: a bias, not a mask
        queries = keys[start:start + rows.shape[1], None]
        expected = (keys[None, :] <= queries)[None] & valid[:, None, :]          # [B, block, n]
        if not bool(((attended(rows) == expected) | ~valid[:, start:start + rows.shape[1], None]).all()):
            return False
    return True


_ROWS = 2048


def untraced_forward(forward: Callable, compiled: Callable, backend, model) -> Callable:
    """``compiled`` (the traced forward), with prefills into an ``AdaKVCache`` run by ``forward`` (the model's
    eager one) under ``UntracedPrefill`` when ``backend.config.prefill_compiler == "untraced"``. Whatever the
    mode, an AdaKVCache call with grad enabled and trainable parameters is refused here, in plain Python (the
    traced prefill failed inside the backend compile; the untraced one would have run)."""

    def compress(q, k, v, mask, scale, layer, num_layers, store):
        pool_k, pool_v, off, lens, pos, seen = store.tensors()
        args = (q, k, v, mask, scale, 0.0, layer, num_layers, backend._key, store.room,
                pool_k, pool_v, off, lens, pos, seen)
        if backend.inner != "eager" and switch("ADAKV_UNTRACED_COMPILED_COMPRESS"):
            torch.ops.adakv.compress_once(*args)  # compiled once for all layers (a compile at the first prefill)
        else:
            torch.ops.adakv.static_compress(*args)  # the eager body: its kernels launched from Python

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, AdaKVCache) and torch.is_grad_enabled() and any(
                p.requires_grad for p in model.parameters()):  # (either prefill: no autograd through the store)
            raise RequestError("cache: an AdaKVCache is for inference; call the model under torch.no_grad() or "
                               "torch.inference_mode() (grad is enabled and the model has parameters that "
                               "require grad)")
        if backend.config.prefill_compiler != "untraced" or not isinstance(cache, AdaKVCache) \
                or cache.holds_prompt() or backend._untraced_off:
            return compiled(*args, **kwargs)
        why = untraced_reason(cache, model)
        if why:
            log.info("adakv: this prefill is traced and compiled (prefill_compiler='untraced' skipped: %s)", why)
            return compiled(*args, **kwargs)
        cache.before_prefill(backend.config)
        register_config(backend.config, backend._key)  # what compress reads (a traced graph registers it so)
        try:
            with UntracedPrefill(cache, compress) as prefill:
                out = forward(*args, **kwargs)
                t = prefill.finish()
        except Unrecognised as e:
            backend._untraced_off = str(e)
            log.warning("adakv: prefill_compiler='untraced' does not recognise this model (%s): its prefills "
                        "are traced and compiled instead", e)
            cache.reset()
            return compiled(*args, **kwargs)
        except BaseException:
            cache.reset()  # no half-filled store left behind
            raise
        cache.advance(t)
        if not any(r.graph == UNTRACED_GRAPH for r in backend.report):  # every attention once, as for a graph
            for layer in range(len(cache.layers)):
                backend.report.append(RewriteRecord(UNTRACED_GRAPH, layer, "sdpa", "prefill", "intercepted",
                                                    "untraced", f"layers[{layer}]", "eager prefill, compressed "
                                                    "at its scaled_dot_product_attention call"))
        return out

    return run
