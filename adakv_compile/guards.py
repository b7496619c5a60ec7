"""Loud failure where a compacted cache would reach code that reads it as a dense cache.

On the general path the compacted store sits in an HF ``DynamicLayer`` as a zero-stride view (see
``kernels/store.py``). Only the rewritten graph understands it: the *uncompiled* model — e.g. the module
returned by ``torch.compile(model)``, whose ``.generate`` calls the uncompiled forward — would
``torch.cat`` the view with new K/V and attend over the store's first slot repeated, returning finite,
wrong logits. The guard below turns that into a ``StoreError``. It wraps ``DynamicLayer.update`` once,
the first time a compacted store is built; under Dynamo tracing it is a no-op (``is_compiling``), so the
compiled path traces HF's own code, and on dense caches it costs one stride check per layer.
Other ways a store can leave the model (reorder/index_select, crop, device moves, a cat outside the
model) materialise or reshape the view, and the next compiled call then raises from ``store.pool_of`` /
``store.read_layout``.
"""
from __future__ import annotations

import functools

import torch

from .kernels.store import BUILD_HOOKS, StoreError, is_store_view

_INSTALLED = False


def install_dynamic_layer_guard() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # no transformers: nothing to guard
        _INSTALLED = True
        return

    original = DynamicLayer.update

    @functools.wraps(original)
    def update(self, key_states, value_states, *args, **kwargs):
        if not torch.compiler.is_compiling():
            keys = getattr(self, "keys", None)
            if isinstance(keys, torch.Tensor) and is_store_view(keys):
                raise StoreError(
                    "this cache holds an adakv compacted store, but the model is running uncompiled (or "
                    "compiled by another backend): only the adakv-compiled forward can read it. Call the "
                    "model whose forward was compiled with the adakv backend (e.g. compile_model(model, "
                    "...)); note that torch.compile(model).generate runs the uncompiled forward.")
        return original(self, key_states, value_states, *args, **kwargs)

    DynamicLayer.update = update
    _INSTALLED = True


if install_dynamic_layer_guard not in BUILD_HOOKS:
    BUILD_HOOKS.append(install_dynamic_layer_guard)  # store.build installs it on first use
