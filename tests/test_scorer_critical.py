"""scorer="critical" (kernels/score_critical.py): kernels == the eager oracle (index for index), on the scorer,
the general path and the static fast path; and what the value weighting changes."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend, compile_model, reference
from adakv_compile.cache import cache_kwarg
from adakv_compile.kernels.allocate import keep_mask
from adakv_compile.kernels.ops import prompt_scores
from adakv_compile.kernels.score_critical import critical_scores
from adakv_compile.kernels.shard import needs_gather
from tests.prompts import left_padded


def _inputs(seed, B, Hq, Hkv, n, D, pad):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, D, generator=g) * 2
    k = torch.randn(B, Hkv, n, D, generator=g) * 2
    v = torch.randn(B, Hkv, n, D, generator=g) * torch.rand(B, Hkv, n, 1, generator=g) * 3
    valid = torch.ones(B, n, dtype=torch.bool)
    for b, p in enumerate(pad[:B]):
        valid[b, :p] = False
    return q, k, v, valid


SETTINGS = [
    dict(budget=24, window=4, scorer="critical", head_floor=0),
    dict(budget=24, window=4, scorer="critical"),                       # default floor: uniform here
    dict(budget=24, window=4, scorer="critical", head_floor=6, safeguard="kvpress"),
    dict(budget=20, window=4, scorer="critical", allocation="uniform", pooling="avg"),
    dict(budget=32, window=4, scorer="critical", layer_schedule="pyramid", head_floor=0),
    dict(compression_ratio=0.7, window=4, scorer="critical", head_floor=0, gqa_reduce="max"),
]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_selection_equals_reference(kwargs):
    cfg = AdaKVConfig(**kwargs)
    for seed, layer in ((0, 0), (1, 2)):
        q, k, v, valid = _inputs(seed, 3, 6, 3, 90, 8, pad=(0, 20, 70))
        scale = 8 ** -0.5
        scores = prompt_scores(q, k, valid, cfg, scale, None, v, layer, 4)
        torch.testing.assert_close(scores, critical_scores(q, k, v, valid, cfg, scale, None, layer, 4))
        ours = keep_mask(scores, valid, cfg, layer, 4)
        assert torch.equal(ours, reference.select(q, k, valid, cfg, layer, 4, scale, v=v)), (seed, layer)


def test_value_weighting_and_stage_one():
    """Stage 1 (floor(B'/2) per head) goes by attention alone; the rest by attention x ||v||_1: a token with
    a large value beats one with more attention and a tiny value; the oracle needs v."""
    cfg = AdaKVConfig(budget=8, window=2, scorer="critical", allocation="uniform", kernel_size=1)
    n = 40
    q, k, v, valid = _inputs(3, 1, 2, 2, n, 8, pad=(0,))
    snap = keep_mask(prompt_scores(q, k, valid, cfg.replace(scorer="snapkv"), 0.3, None), valid,
                     cfg.replace(scorer="snapkv"), 0, 1)
    base = prompt_scores(q, k, valid, cfg.replace(scorer="snapkv"), 0.3, None)[0, 0, :n - 2]
    order = torch.sort(base, descending=True, stable=True).indices
    v[0, 0] = 0.01
    v[0, 0, order[-1]] = 100.0                                          # the least attended token, huge value
    crit = keep_mask(prompt_scores(q, k, valid, cfg, 0.3, None, v, 0, 1), valid, cfg, 0, 1)
    assert crit[0, 0, order[:3]].all()                                  # stage 1: floor(6 / 2) = 3 by attention
    assert crit[0, 0, order[-1]] and not snap[0, 0, order[-1]]
    assert int(crit[0, 0].sum()) == 8
    with pytest.raises(ValueError, match="pass v"):
        reference.select(q, k, valid, cfg, 0, 1, 0.3)
    assert needs_gather(AdaKVConfig(budget=8, window=2, scorer="critical"), "tp")


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.mark.parametrize("fast", [False, True], ids=["general", "fast-path"])
def test_generate_equals_reference_generator(fast):
    cfg = AdaKVConfig(budget=24, window=4, scorer="critical", head_floor=0)
    ids, am = left_padded([150, 80, 12], seed=4)
    ref = reference.ReferenceSession(_model(), cfg, record=True)
    expect = ref.generate(ids, attention_mask=am, max_new_tokens=6)
    model = _model()
    if fast:
        backend = compile_model(model, cfg, inner="eager")
        cache = AdaKVCache(model, backend, batch_size=3, max_new_tokens=6)
        got = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False,
                             **{cache_kwarg(model): cache})
        for layer, per_row in enumerate(ref.kept_positions()):
            held = cache.kept_positions(layer)
            for row in range(3):
                for head in range(2):
                    want = per_row[row][head].to(torch.int32)
                    assert torch.equal(held[row][head], want), (layer, row, head)
    else:
        model.forward = torch.compile(model.forward, backend=adakv_backend(cfg, inner="eager"))
        got = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)
    assert got.tolist() == expect.tolist()
