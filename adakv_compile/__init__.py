"""adakv-compile: a torch.compile backend that gives any transformer an Ada-KV compressed KV cache."""
from .backend import AdaKVBackend, adakv_backend, compile_model
from .cache import AdaKVCache, RequestError
from .config import AdaKVConfig
from . import guards  # noqa: F401  (registers the dynamic-layer guard in kernels.store.BUILD_HOOKS)
from .kernels.store import StoreError
from .report import Report, RewriteRecord

__all__ = ["AdaKVConfig", "AdaKVCache", "adakv_backend", "compile_model", "AdaKVBackend", "StoreError", "RequestError", "Report", "RewriteRecord"]
__version__ = "0.2.0"
