"""What keys Inductor's caches on this project's code: a stable pass uuid.

The rewrite runs before ``compile_fx``, so the rewritten graph is already part of the FX-graph and
AOTAutograd cache keys; but the *Python* bodies of our ops (launch logic, fallbacks) are not. A no-op
``CustomGraphPass`` whose ``uuid()`` is ``PASS_UUID`` + a hash of the package's source goes into Inductor's
config for our compiles, so a code change misses the cache and an unchanged install hits it on a restart.
Nothing process-specific (ids, addresses, counters) goes into it.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from torch._inductor.custom_graph_pass import CustomGraphPass

PASS_UUID = "adakv-passes-v2"
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
        return f"{PASS_UUID}-{source_hash()}"


PASS_KEY = PassKey()


def config_key(config) -> str:
    """A stable name for a config's fields (sha256 of ``config.key()``), the same in every process."""
    return hashlib.sha256(config.key().encode()).hexdigest()[:16]
