"""Smoke tests for the tiny model zoo (no compile; a few seconds on CPU)."""

import pytest
import torch

from tests.zoo import ATTN_IMPLS, FAMILIES, HEAD_DIM, TinyGPT, build, tinygpt_generate

CASES = [(f, a) for f in FAMILIES for a in ATTN_IMPLS[f]]


@pytest.mark.parametrize("family,attn", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_build_and_forward(family, attn):
    model = build(family, attn)
    assert not model.training
    assert model.config._attn_implementation == attn
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, 12, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_build_is_deterministic():
    a, b = build("llama"), build("llama")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_unsupported_attn_rejected():
    with pytest.raises(ValueError):
        build("gemma2", "sdpa")


def test_eager_matches_sdpa():
    ids = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e = build("llama", "eager")(ids).logits
        s = build("llama", "sdpa")(ids).logits
    torch.testing.assert_close(e, s, atol=1e-5, rtol=1e-5)


def test_generate_runs():
    model = build("llama")
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)


def test_tinygpt_generate_matches_no_cache():
    model = TinyGPT()
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(3))
    out = tinygpt_generate(model, ids, 5)
    assert out.shape == (2, 12)
    # recompute every step without a cache
    ref = ids
    with torch.no_grad():
        for _ in range(5):
            logits, _ = model(ref)
            ref = torch.cat([ref, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ref)
    _, present = model(ids)
    assert len(present) == 2
    k, v = present[0]
    assert k.shape == v.shape == (2, 2, 7, HEAD_DIM)
