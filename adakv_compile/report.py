"""The rewrite report: one record per attention per compiled graph."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RewriteRecord:
    graph: int
    layer: int
    pattern: str
    phase: str       # prefill | decode | extend | no-cache | unknown
    action: str      # rewritten | skipped
    mode: str        # exact | compress | store | none
    node: str
    reason: str = ""

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (f"graph {self.graph} layer {self.layer:>2} {self.pattern:<22} {self.phase:<8} "
                f"{self.action:<9} {self.mode:<8} {self.node}{why}")

    def as_dict(self) -> dict:
        return asdict(self)


class Report(list):
    """A list of RewriteRecord with a table view."""

    def table(self) -> str:
        head = f"{'graph':>5} {'layer':>5}  {'pattern':<22} {'phase':<8} {'action':<9} {'mode':<15} reason"
        rows = [f"{r.graph:>5} {r.layer:>5}  {r.pattern:<22} {r.phase:<8} {r.action:<9} {r.mode:<15} {r.reason}"
                for r in self]
        return "\n".join([head, *rows])

    def for_graph(self, graph: int) -> "Report":
        return Report(r for r in self if r.graph == graph)

    @property
    def graphs(self) -> list[int]:
        return sorted({r.graph for r in self})
