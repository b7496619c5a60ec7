"""The Triton GEMV (kernels/triton_gemv.py) against ``F.linear``, and the decode-graph pass (passes/gemv.py).

On a CPU-only machine the kernel runs through Triton's interpreter (tests/triton_device.py). The pass is
checked on the rewritten FX graph of a tiny Llama's decode step (not by timing): ``adakv.gemv`` is there,
and the tokens equal ``gemv=False`` and the eager oracle.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.triton_device import DEVICE, interpreter_subprocess_test, needs_device

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402
from adakv_compile.reference import ReferenceSession  # noqa: E402
from tests.prompts import left_padded  # noqa: E402

test_in_interpreter_subprocess = interpreter_subprocess_test(__file__)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _case(M, N, K, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, w, b


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, bias", [(1, 37, 100, False), (1, 70, 300, True), (3, 45, 130, True),
                                           (8, 33, 257, False), (5, 64, 512, False)])
def test_kernel_matches_linear(dtype, M, N, K, bias):
    from adakv_compile.kernels.triton_gemv import gemv_triton

    x, w, b = _case(M, N, K, dtype, bias, seed=M * 1000 + N)
    want = F.linear(x.float(), w.float(), b.float() if b is not None else None)
    got = gemv_triton(x, w, b)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    assert torch.equal(gemv_triton(x, w, b), got)  # deterministic (no atomics)


@needs_device
@pytest.mark.parametrize("M", [1, 2])
def test_split_k_and_explicit_configs(M):
    """Split-K partials summed in a fixed order, the reduction and the tensor-core paths, odd tails."""
    from adakv_compile.kernels.triton_gemv import GemvConfig, gemv_triton

    x, w, b = _case(M, 29, 333, torch.float32, True, seed=7 + M)
    want = F.linear(x, w, b)
    for cfg in (GemvConfig(16, 32, 2, split=4, dot=M > 1), GemvConfig(8 if M == 1 else 16, 64, 1, split=1, dot=False),
                GemvConfig(16, 64, 4, split=2, dot=True)):
        torch.testing.assert_close(gemv_triton(x, w, b, cfg), want, **TOL[torch.float32])


def test_op_falls_back_to_linear_off_cuda_and_names_bad_input():
    x, w, b = torch.randn(2, 1, 24), torch.randn(10, 24), torch.randn(10)
    prev = os.environ.pop("ADAKV_KERNELS", None)
    try:
        got = torch.ops.adakv.gemv(x, w, b)
    finally:
        if prev is not None:
            os.environ["ADAKV_KERNELS"] = prev
    assert torch.equal(got, F.linear(x, w, b))
    from adakv_compile.kernels.triton_gemv import gemv_triton
    with pytest.raises(ValueError, match="bias"):
        gemv_triton(x[:, 0], w, torch.randn(3))
    with pytest.raises(ValueError, match="dtype"):
        gemv_triton(x[:, 0], w.double())
    with pytest.raises(ValueError, match="gemv"):
        AdaKVConfig(gemv=1)


def _tiny_llama(seed=3):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m.eval()


def _generate(model, cfg, ids, am, new, spy):
    backend = compile_model(model, cfg, inner="eager")
    inner = backend._inner

    def record(gm, example_inputs, cudagraphs=False):
        spy.append(gm)
        return inner(gm, example_inputs, cudagraphs)

    backend._inner = record
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=new)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False,
                             **{cache_kwarg(model): cache})
    return out[:, -new:], backend


def _gemv_nodes(gm) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=torch.ops.adakv.gemv.default))


def test_pass_rewrites_decode_projections_only():
    """gemv=True: the decode graph's projections (merged q/k/v, o, merged gate/up, down, LM head) are
    ``adakv.gemv``, the prefill graph has none; tokens equal gemv=False and the eager oracle. On a CPU-only
    machine the Triton kernel itself runs (Triton's interpreter, ADAKV_KERNELS=interpret) in the decode step."""
    kernels = "interpret" if DEVICE == "cpu" else "triton"
    cfg = AdaKVConfig(budget=12, window=4)
    ids, am = left_padded([30, 18], seed=5, vocab=96)
    new = 4
    ref = ReferenceSession(_tiny_llama(), cfg)
    expect = ref.generate(ids, attention_mask=am, max_new_tokens=new)[:, -new:]
    off_spy, on_spy = [], []
    off, _ = _generate(_tiny_llama(), cfg, ids, am, new, off_spy)
    prev = os.environ.get("ADAKV_KERNELS")
    os.environ["ADAKV_KERNELS"] = kernels
    try:
        on, backend = _generate(_tiny_llama(), cfg.replace(gemv=True), ids, am, new, on_spy)
    finally:
        if prev is None:
            os.environ.pop("ADAKV_KERNELS")
        else:
            os.environ["ADAKV_KERNELS"] = prev
    assert torch.equal(on, off)
    assert torch.equal(on, expect)
    assert len(on_spy) == 2, backend.graphs  # prefill, decode
    prefill, decode = on_spy
    assert _gemv_nodes(prefill) == 0
    layers = 2
    assert _gemv_nodes(decode) == 4 * layers + 1, decode.code  # qkv, o, gate/up, down per layer + LM head
    assert [g.get("gemv") for g in backend.graphs] == [0, 4 * layers + 1]
    assert all(_gemv_nodes(g) == 0 for g in off_spy)


def test_pass_takes_linear_mm_addmm_of_few_rows_in_decode_graphs_only():
    """On a Dynamo graph: linear / mm(x, W.t()) / addmm(b, x, W.t()) of <= 8 rows become adakv.gemv in a
    decode graph; 9 rows, a weight computed in the graph and a prefill graph are left alone."""
    from adakv_compile.passes.gemv import replace_gemv

    def f(x, w, b, big):
        return (F.linear(x, w, b) + torch.mm(x, w.t()) + torch.addmm(b, x, w.t()) + F.linear(x, w * 2),
                F.linear(big, w))

    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    args = (torch.randn(3, 16), torch.randn(10, 16), torch.randn(10), torch.randn(9, 16))
    torch.compile(f, backend=grab, fullgraph=True)(*args)
    gm = graphs[0]
    assert replace_gemv(gm, ["prefill"]).rewritten == 0
    want = f(*args)
    res = replace_gemv(gm, ["decode", "decode"])
    assert res.rewritten == 3, gm.code
    assert {why for _, why in res.skipped} == {"9 rows (the kernel is for 1..8)"}, res.skipped
    got = gm(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_gemv_default_follows_the_card(monkeypatch):
    """``AdaKVConfig.gemv`` None: on for CUDA graphs of a measured capability only; True / False as given;
    anything else names the field."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from adakv_compile.passes.gemv import gemv_wanted

    cpu = [torch.randn(2, 3), 4]
    assert not gemv_wanted(None, cpu) and gemv_wanted(True, cpu) and not gemv_wanted(False, cpu)
    with FakeTensorMode():
        cuda = [3, torch.empty(2, 3, device="cuda")]
    for cap, want in (((9, 0), True), ((8, 0), False), ((10, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert gemv_wanted(None, cuda) is want
        assert not gemv_wanted(False, cuda)
    with pytest.raises(ValueError, match="gemv"):
        AdaKVConfig(budget=64, gemv="yes")
