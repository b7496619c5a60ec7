"""What keys Inductor's caches on this project's code: a stable pass uuid.

The rewrite runs before ``compile_fx``, so the rewritten graph is already part of the FX-graph and
AOTAutograd cache keys; but the *Python* bodies of our ops (launch logic, fallbacks) are not. A no-op
``CustomGraphPass`` whose ``uuid()`` is ``PASS_UUID`` + a hash of the package's source goes into Inductor's
config for our compiles, so a code change misses the cache and an unchanged install hits it on a restart.
Nothing process-specific (ids, addresses, counters) goes into it. The ``ADAKV_*`` switches do: some change
what an op does without changing the graph that is keyed (``ADAKV_HEADS_LAST``: the prompt attention ops'
output strides, asserted by the compiled code; ``ADAKV_KERNELS``: the body a ``triton_op`` traces), so a
restart under another setting must miss.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from torch._inductor.custom_graph_pass import CustomGraphPass

PASS_UUID = "adakv-passes-v2"
# environment switches read by the passes or the ops (each validated where it is read)
SWITCHES = ("ADAKV_COMPRESS_ONCE", "ADAKV_DECODE_OPAQUE", "ADAKV_FUSED_MERGE", "ADAKV_HEADS_LAST", "ADAKV_INLINE_COMPRESS",
            "ADAKV_KERNELS", "ADAKV_PREWARM", "ADAKV_UNTRACED_COMPILED_COMPRESS")
_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def source_hash() -> str:
    """sha256 over the package's ``.py`` files (relative path + bytes), computed once per process."""
    h = hashlib.sha256()
    for path in sorted(_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class PassKey(CustomGraphPass):
    """Does nothing to the graph; only names our code in Inductor's cache keys."""

    def __call__(self, graph) -> None:
        return None

    def uuid(self) -> str:
        switches = ",".join(f"{k}={os.environ.get(k, '').strip()}" for k in SWITCHES)
        return f"{PASS_UUID}-{source_hash()}-{hashlib.sha256(switches.encode()).hexdigest()[:16]}"


PASS_KEY = PassKey()


def config_key(config) -> str:
    """A stable name for a config's fields (sha256 of ``config.key()``), the same in every process."""
    return hashlib.sha256(config.key().encode()).hexdigest()[:16]
