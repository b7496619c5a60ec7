"""The memo of torch's per-launch TTIR access analysis (kernels/ttir_memo.py): it answers as torch does for every
launch of our kernels, a repeat (any layer, fake or real tensors, a fresh Dynamo-made Autotuner) is a hit that
does not call torch, a changed constexpr / dtype / int specialisation is a miss, foreign kernels go to torch, and
an Inductor compile of two decode layers makes one analysis per distinct launch instead of four per launch.

The analysis runs in a subprocess (tests/ttir_memo_check.py) that swaps Triton's driver for a stand-in target."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import pytest

from adakv_compile.kernels import ttir_memo

SCRIPT = os.path.join(os.path.dirname(__file__), "ttir_memo_check.py")


def _run(*part: str) -> dict:
    pytest.importorskip("triton.backends.nvidia")
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SCRIPT, *part], capture_output=True, text=True, env=e, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "assuming every input is mutated" not in run.stderr, run.stderr[-3000:]
    sys.stderr.write(run.stderr[run.stderr.find("per launch"):] if "per launch" in run.stderr else "")
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_memo_answers_as_torch_for_every_launch_of_ours():
    got = _run("unit")
    kernels = {label.split("/")[0] for label in got["launches"]}
    assert kernels == {"one-pass", "split", "split-fused", "append", "score", "fill", "gemv"}, kernels
    for label, r in got["launches"].items():
        assert r["want"]["writes"], (label, r)  # every kernel of ours writes something
        assert r["first"] and r["first_hit"] == 0 and r["first_calls"] == 1, (label, r)
        assert r["repeat"] and r["repeat_hit"] == 1 and r["repeat_calls"] == 0, (label, r)
        assert r["fake"] and r["fake_hit"] == 1 and r["fake_calls"] == 0, (label, r)  # AOT's fake args: shared
        assert r["names_are_args"] and r["bypass"] == 0, (label, r)
    for name, r in got["variants"].items():
        assert r["equal"], (name, r)
        if name in ("autotuner", "autotuner again"):  # a fresh one-config Autotuner (num_warps): still a hit
            assert r["hit"] == 1 and r["calls"] == 0, (name, r)
        else:  # constexpr / dtype / int value (1, divisibility by 16) / a config overriding a constexpr
            assert r["hit"] == 0 and r["calls"] == 1, (name, r)
    assert got["after_mutation"], "a caller's mutation of its result reached the memo"
    old = got["old_api"]  # torch's older identify_mutated_tensors (a list of names): same memo, list copies
    assert old["list"] and old["writes"] == old["want"] and (old["hits"], old["misses"]) == (1, 1), old
    assert got["foreign"] == dict(calls=2, foreign=2, entries=0, writes=["Y"], same=True), got["foreign"]


def test_two_layer_compile_analyses_each_distinct_launch_once():
    on, off = _run("compile"), _run("compile", "off")
    print(f"analysis calls reaching torch, 2-layer decode compile: {off['analysis_calls']} without the memo "
          f"({off['analysis_s']:.2f} s of {off['compile_s']:.2f} s), {on['analysis_calls']} with it "
          f"({on['analysis_s']:.2f} s of {on['compile_s']:.2f} s; {on['hits']} hits)")
    assert not off["installed"] and on["installed"]
    assert on["lowered"] == off["lowered"] == 1  # Inductor lowered the graph (its own analysis calls included)
    assert on["bypass"] == 0 and on["foreign"] == 0
    assert on["analysis_calls"] == on["misses"] == on["entries"] > 0
    assert on["hits"] + on["misses"] == off["analysis_calls"] > on["analysis_calls"]


def test_unknown_api_shape_is_left_alone(caplog):
    def identify_accessed_tensors(kernel, kwargs):  # not torch's signature
        return []
    fake = types.SimpleNamespace(identify_accessed_tensors=identify_accessed_tensors)
    with caplog.at_level(logging.DEBUG, logger=ttir_memo.__name__):
        assert ttir_memo._install_into(fake) == {}
        assert ttir_memo._install_into(types.SimpleNamespace()) == {}
    assert fake.identify_accessed_tensors is identify_accessed_tensors
    assert "not patched" in caplog.text and "has none of" in caplog.text


def test_install_is_idempotent():
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if not ttir_memo.installed():
        pytest.skip("memo not installed in this process (another torch API)")
    before = {n: getattr(tkw, n) for n in ttir_memo._installed}
    assert ttir_memo.install()
    assert {n: getattr(tkw, n) for n in ttir_memo._installed} == before
    assert all(getattr(f, "_adakv_ttir_memo", False) for f in before.values())
    s = ttir_memo.stats()
    assert {"hits", "misses", "foreign", "bypass", "torch_calls", "torch_s", "entries", "installed"} <= set(s)


def test_results_are_copied_and_launch_specific_ones_not_kept():
    torch = pytest.importorskip("torch")
    from torch._higher_order_ops.triton_kernel_wrap import TensorAccesses
    from torch._inductor.dependencies import ReadWrites, StarDep
    from torch.utils._ordered_set import OrderedSet

    acc = TensorAccesses(ReadWrites(OrderedSet([StarDep("X")]), OrderedSet([StarDep("OUT")]), OrderedSet()), True)
    c = ttir_memo._copy(acc)
    assert c == acc and c.read_writes.writes is not acc.read_writes.writes
    c.read_writes.writes.clear()
    assert [d.name for d in acc.read_writes.writes] == ["OUT"]
    names = ["OUT"]  # the older API's answer
    assert ttir_memo._copy(names) == names and ttir_memo._copy(names) is not names
    import sympy
    with_index = TensorAccesses(ReadWrites(OrderedSet(), OrderedSet([StarDep("OUT")]),
                                           OrderedSet([sympy.Symbol("s0")])), False)
    assert ttir_memo._copy(with_index) is None  # index expressions: in terms of one launch's sizes
    assert ttir_memo._copy(object()) is None and ttir_memo._copy(torch.zeros(1)) is None


def test_uninstall_puts_torch_back_and_install_returns():
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if not ttir_memo.installed():
        pytest.skip("memo not installed in this process (another torch API)")
    names = list(ttir_memo._installed)
    try:
        ttir_memo.uninstall()
        assert not ttir_memo.installed()
        assert all(getattr(tkw, n) is ttir_memo._original[n] for n in names)
    finally:
        assert ttir_memo.install()
    assert all(getattr(getattr(tkw, n), "_adakv_ttir_memo", False) for n in names)
