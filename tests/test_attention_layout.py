"""The prompt attention ops' output layout (``kernels/attend.heads_last``): on CUDA they return [B, H, n, D] in
heads-last memory, as flash / cuDNN SDPA write it, so neither the op nor the model's ``transpose(1, 2).reshape``
copies. The rule is switched on here for CPU tensors (monkeypatched) to check what the GPU relies on: the real
output's strides equal the fake's exactly (Inductor asserts them), values are unchanged, and a compiled
fast-path ``generate`` (Inductor, left padding: the op's concatenating branch) gives the oracle's tokens."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.kernels import attend
from tests.prompts import left_padded
from tests.test_static_cache import build


def _inputs(seed, B=2, H=4, n=37, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g) for _ in range(3)]


@pytest.mark.parametrize("plan", [[0, 0], [0, 5, 1]])  # no padding; left padding of 0 and 5 rows
def test_real_and_fake_strides_agree(monkeypatch, plan):
    q, k, v = _inputs(1)
    plan = torch.tensor(plan)
    pad = None if plan[-1] == 0 else (torch.arange(q.shape[2])[None] >= plan[:-1, None]).to(torch.int64)
    args = (q, k, v, pad, plan, q.shape[-1] ** -0.5, 0.0)
    want = torch.ops.adakv.attention_proven(*args)  # the contiguous layout (rule off on CPU)
    assert want.is_contiguous()
    monkeypatch.setattr(attend, "heads_last", lambda device: True)
    got = torch.ops.adakv.attention_proven(*args)
    B, H, n, D = got.shape
    assert got.stride() == (n * H * D, D, H * D, 1)
    assert torch.equal(got, want)
    assert got.transpose(1, 2).is_contiguous()  # the model's transpose + reshape: a view
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.adakv.attention_proven(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                                                  for x in args])
    assert fake.stride() == got.stride() and fake.shape == got.shape
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    exact = torch.ops.adakv.attention(q, k, v, mask, q.shape[-1] ** -0.5, False, 0.0)
    assert exact.stride() == got.stride()
    assert torch.allclose(exact.float(), torch.ops.adakv.attention(q, k, v, None, q.shape[-1] ** -0.5, True,
                                                                   0.0).float(), atol=1e-6)


def test_switches_are_validated(monkeypatch):
    monkeypatch.setenv("ADAKV_HEADS_LAST", "yes")
    with pytest.raises(ValueError, match="ADAKV_HEADS_LAST must be 0 or 1"):
        attend.heads_last(torch.device("cuda"))
    monkeypatch.setenv("ADAKV_HEADS_LAST", "0")
    assert not attend.heads_last(torch.device("cuda"))
    monkeypatch.delenv("ADAKV_HEADS_LAST")
    assert attend.heads_last(torch.device("cuda")) and not attend.heads_last(torch.device("cpu"))
    from adakv_compile.kernels.dispatch import kernel_mode, use_triton

    monkeypatch.setenv("ADAKV_KERNELS", "plian")
    with pytest.raises(ValueError, match="ADAKV_KERNELS must be one of triton, plain, interpret"):
        use_triton()
    monkeypatch.setenv("ADAKV_KERNELS", "")
    assert kernel_mode() == "triton"


def _compiled_generate(monkeypatch, cfg, ids, am, new, layout_on: bool):
    # our monkeypatch is not in any cache key (the env switch is: test below): compile without the caches
    if layout_on:
        monkeypatch.setattr(attend, "heads_last", lambda device: True)
    torch._dynamo.reset()
    model = build(seed=31)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        backend = compile_model(model, cfg)
        cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=new)
        out = model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **{cache_kwarg(model): cache})
    monkeypatch.undo()
    assert any(r.action == "rewritten" and r.phase == "prefill" for r in backend.report)
    return out.sequences[:, -new:], torch.stack(out.logits)


def test_compiled_generate_with_heads_last_equals_contiguous(monkeypatch):
    """Inductor compiles the prefill with the op's heads-last fake and asserts the real strides at run time;
    logits and tokens match the contiguous layout's (a fresh random prompt with left padding)."""
    cfg = AdaKVConfig(budget=48, window=4)
    ids, am = left_padded([90, 60], seed=torch.randint(0, 10**6, ()).item())
    want_tokens, want_logits = _compiled_generate(monkeypatch, cfg, ids, am, 3, False)
    tokens, logits = _compiled_generate(monkeypatch, cfg, ids, am, 3, True)
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens[:, :1], want_tokens[:, :1])  # later tokens may flip on a near tie


def test_switches_are_in_the_cache_key(monkeypatch):
    """Every ADAKV_* environment switch the package reads is in the pass uuid (a restart under another
    setting must miss Inductor's caches: ADAKV_HEADS_LAST changes strides the compiled code asserts)."""
    import re
    from pathlib import Path

    import adakv_compile
    from adakv_compile.passes.cache_key import PASS_KEY, SWITCHES

    root = Path(adakv_compile.__file__).parent
    read = {m for p in root.rglob("*.py") for m in re.findall(r"ADAKV_[A-Z_]+", p.read_text())}
    assert read == set(SWITCHES)
    monkeypatch.delenv("ADAKV_HEADS_LAST", raising=False)
    before = PASS_KEY.uuid()
    monkeypatch.setenv("ADAKV_HEADS_LAST", "0")
    assert PASS_KEY.uuid() != before
