"""``find_tp_group``: the TP group is read from the sum all-reduces an attention's output flows into;
collectives the attention does not reach, or several groups, make the sharding unknown (no compression)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from adakv_compile.passes.shard import find_tp_group

AR = torch.ops._c10d_functional.all_reduce.default


def graph(reduce_after: list[str], reduce_before: list[str] = ()):
    g = fx.Graph()
    x = g.placeholder("x")
    for name in reduce_before:  # e.g. a vocab-parallel embedding, upstream of attention
        x = g.call_function(AR, (x, "sum", name))
    att = g.call_function(F.scaled_dot_product_attention, (x, x, x))
    y = att
    for name in reduce_after:  # row-parallel o_proj
        y = g.call_function(AR, (g.call_function(torch.matmul, (y, x)), "sum", name))
    g.output(y)
    return g, att


def test_group_from_the_reduce_after_attention():
    g, att = graph(["3"], ["3"])
    assert find_tp_group(g, [att]) == ("3", "")


def test_no_collectives_no_group():
    g, att = graph([])
    assert find_tp_group(g, [att]) == ("", "")


def test_collectives_the_attention_does_not_reach_are_refused():
    g, att = graph([], ["3"])
    group, why = find_tp_group(g, [att])
    assert group == "" and "reaches none" in why


def test_several_groups_are_refused():
    g, att = graph(["3", "5"])
    group, why = find_tp_group(g, [att])
    assert group == "" and "several process groups" in why
