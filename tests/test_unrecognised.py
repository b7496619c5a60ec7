"""A model whose attention the pass does not recognise runs as plain torch.compile (issue 10 §4).

- The attention is not found at all (a hand-written softmax: ``exp / sum``): the model compiles and runs
  like plain ``torch.compile``, with exactly one warning on the ``adakv_compile`` logger, and the
  number of graphs over 20 random prompt lengths and batch sizes stays bounded (the same as plain
  ``torch.compile``'s).
- The attention is found but left alone (its weights pass through a head mask): same results, the
  report gives the reason for every layer and graph.
"""
from __future__ import annotations

import logging
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adakv_compile import AdaKVConfig, adakv_backend

HID, HEADS, KV, D, LAYERS, VOCAB = 32, 4, 2, 8, 2, 64


class _Block(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.q = nn.Linear(HID, HEADS * D)
        self.kv = nn.Linear(HID, 2 * KV * D)
        self.o = nn.Linear(HEADS * D, HID)
        self.register_buffer("head_mask", torch.linspace(0.5, 1.0, HEADS)[None, :, None, None])

    def forward(self, x, past):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, HEADS, D).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, KV, D).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        S = k.shape[2]
        kk = k.repeat_interleave(HEADS // KV, dim=1)
        vv = v.repeat_interleave(HEADS // KV, dim=1)
        s = q @ kk.transpose(-1, -2) / math.sqrt(D)
        allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        s = s.masked_fill(~allowed, float("-inf"))
        if self.form == "manual":      # softmax written out: not recognised as attention at all
            e = torch.exp(s - s.amax(-1, keepdim=True))
            w = e / e.sum(-1, keepdim=True)
        else:                          # found, but the weights are rescaled per head: left alone
            w = F.softmax(s, dim=-1) * self.head_mask
        o = (w @ vv).transpose(1, 2).reshape(B, T, HEADS * D)
        return x + self.o(o), (k, v)


class Model(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, HID)
        self.blocks = nn.ModuleList(_Block(form) for _ in range(LAYERS))
        self.head = nn.Linear(HID, VOCAB)

    def forward(self, ids, past=None):
        x = self.emb(ids)
        present = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if past is None else past[i])
            present.append(kv)
        return self.head(x), tuple(present)


@pytest.fixture
def adakv_warnings():
    """Warnings of the ``adakv_compile`` logger (conftest quiets it to ERROR for other tests)."""
    records = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record)

    log, trace_log = logging.getLogger("adakv_compile"), logging.getLogger("torch.__trace")
    levels = log.level, trace_log.level
    handler = H(logging.WARNING)
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    trace_log.setLevel(logging.WARNING)    # torch's structured trace at DEBUG slows compiles under pytest
    yield records
    log.removeHandler(handler)
    log.setLevel(levels[0])
    trace_log.setLevel(levels[1])


def _prompts(n=20, seed=0):
    rng = random.Random(seed)
    return [torch.randint(0, VOCAB, (rng.randint(1, 4), rng.randint(2, 40)),
                          generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _run(fn, prompts):
    outs = []
    with torch.no_grad():
        for ids in prompts:
            logits, past = fn(ids)
            nxt = logits[:, -1:].argmax(-1)
            logits2, _ = fn(nxt, past)            # one decode step on the prompt's cache
            outs.append((logits, logits2))
    return outs


def _plain_graphs(model, prompts) -> tuple[int, list]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    outs = _run(torch.compile(model, backend="eager"), prompts)
    n = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return n, outs


@pytest.mark.parametrize("config", [AdaKVConfig(), AdaKVConfig(budget=16, window=4)],
                         ids=["exact", "compress"])
def test_unrecognised_attention_runs_as_plain_compile_with_one_warning(config, adakv_warnings):
    model = Model("manual").eval()
    prompts = _prompts()
    plain_n, plain = _plain_graphs(model, prompts)
    backend = adakv_backend(config, inner="eager")
    ours = _run(torch.compile(model, backend=backend), prompts)
    ref = _run(model, prompts)
    for (a1, a2), (b1, b2), (c1, c2) in zip(ours, plain, ref):
        torch.testing.assert_close(a1, b1, rtol=0, atol=0)
        torch.testing.assert_close(a2, b2, rtol=0, atol=0)
        torch.testing.assert_close(a1, c1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a2, c2, rtol=1e-5, atol=1e-5)
    warnings = adakv_warnings
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "no attention found" in warnings[0].getMessage()
    assert len(backend.report) == 0
    # 20 prompt lengths and batch sizes, prefill + decode each: a handful of graphs, as plain compile
    assert backend.graphs_compiled == plain_n, (backend.graphs_compiled, plain_n)
    assert backend.graphs_compiled <= 6, backend.graphs


def test_skipped_attention_runs_unchanged_with_reasons(adakv_warnings):
    model = Model("head_mask").eval()
    prompts = _prompts(seed=1)
    plain_n, plain = _plain_graphs(model, prompts)
    backend = adakv_backend(AdaKVConfig(budget=16, window=4), inner="eager")
    ours = _run(torch.compile(model, backend=backend), prompts)
    for (a1, a2), (b1, b2) in zip(ours, plain):
        torch.testing.assert_close(a1, b1, rtol=0, atol=0)
        torch.testing.assert_close(a2, b2, rtol=0, atol=0)
    assert backend.graphs_compiled == plain_n <= 6, (backend.graphs_compiled, plain_n)
    recs = list(backend.report)
    assert len(recs) == LAYERS * backend.graphs_compiled
    assert all(r.action == "skipped" and "attention weights pass through mul" in r.reason for r in recs)
    warnings = adakv_warnings
    assert warnings and all("left untouched" in r.getMessage() for r in warnings)


def test_skipped_attention_warns_once(adakv_warnings):
    model = Model("head_mask").eval()
    backend = adakv_backend(AdaKVConfig(), inner="eager")
    _run(torch.compile(model, backend=backend), _prompts(n=4))
    warnings = adakv_warnings
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


class _InPlace(nn.Module):
    """No attention; in-place statements whose results are not used (``y.add_(1)``)."""

    def forward(self, x):
        y = x * 2.0
        y.add_(1.0)
        y.masked_fill_(y > 2.5, 0.0)
        return y


def test_in_place_statements_survive():
    x = torch.linspace(0, 2, 8)
    backend = adakv_backend(AdaKVConfig(), inner="eager")
    torch.testing.assert_close(torch.compile(_InPlace(), backend=backend)(x), _InPlace()(x))
