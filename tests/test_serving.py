"""A serving loop that survives (issue 16): fixed-slot continuous batching without recompiles, bad calls
refused before tracing, the cache's capacity helper.

CPU, tiny random Llama, inner="eager" (the same rewritten graphs as Inductor, no code generation).
Greedy requests are checked against the eager oracle (ReferenceSession); every request against itself
decoded alone (batch 1, no slots), sampled ones included (per-request generators).
"""
import pytest
import torch

from adakv_compile import AdaKVCache, AdaKVConfig, RequestError, StoreError, compile_model
from adakv_compile.cache import _cache_bytes, cache_kwarg, decode_batch
from adakv_compile.reference import ReferenceSession
from adakv_compile.serve import Request, Server

from .test_static_cache import build, twin

CFG = AdaKVConfig(budget=24, window=4)


def requests(count, seed, lo=60, hi=300, max_new=(3, 12), eos=None):
    """Mixed lengths and sampling settings: even ones greedy, odd ones sampled (top-k / top-p / both)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        sampled = i % 2 == 1
        out.append(Request(prompt=torch.randint(1, 128, (n,), generator=g),
                           max_new_tokens=int(torch.randint(max_new[0], max_new[1] + 1, (), generator=g)),
                           temperature=0.9 if sampled else 0.0, top_k=16 if i % 4 == 1 else 0,
                           top_p=0.8 if i % 4 == 3 else 1.0, seed=1000 + i, eos_token_id=eos, id=i))
    return out


def test_serving_loop_has_two_graphs_and_every_request_decodes_as_alone():
    """The issue's loop (14 requests of 60-300 tokens, 4 decoded together, finished rows out, new ones in),
    then 10 more through the same server: still the same two graphs, Dynamo's limit never near (the
    soak below runs a few hundred more, bad calls mixed in)."""
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build(seed=seed)
    ref = ReferenceSession(twin(model), CFG)
    backend = compile_model(model, CFG, inner="eager")
    server = Server(model, backend, max_batch=4, max_new_tokens=12, eos_token_id=None)
    first = requests(14, seed, eos=5)
    done = server.run(first)
    assert sorted(r.id for r in done) == list(range(14)) and all(r.done for r in first)
    assert backend.graphs_compiled == 2, backend.graphs  # one prefill (dynamic length), one decode
    more = requests(10, seed + 1, lo=20, hi=160, max_new=(1, 12))
    for r in more:  # submitted while others run: continuous batching
        server.submit(r)
        server.step()
    server.run()
    assert all(r.done for r in more) and backend.graphs_compiled == 2, backend.graphs
    assert server.cache.live_rows() == []
    for r in first + more:
        assert len(r.tokens) == r.max_new_tokens or r.finish_reason == "eos"
        alone = server.generate_alone(r)
        assert alone.tokens == r.tokens, f"seed={seed} request {r.id}"
    assert backend.graphs_compiled == 3  # alone: the batch-1 decode graph
    for r in [r for r in first if r.temperature == 0][:3]:  # greedy: the eager oracle's tokens
        want = ref.generate(r.prompt[None], max_new_tokens=len(r.tokens))[0, r.prompt.numel():].tolist()
        assert r.tokens == want, f"seed={seed} request {r.id}"


def test_bad_calls_between_good_ones_change_nothing():
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build(seed=seed)
    ref = ReferenceSession(twin(model), CFG)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 128, (1, n), generator=g) for n in (90, 41)]
    clean = [ref.generate(p, max_new_tokens=5)[:, p.shape[1]:] for p in prompts]  # a clean process's tokens
    backend = compile_model(model, CFG, inner="eager")
    kw = cache_kwarg(model)
    cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=4)

    def good(p):
        cache.reset()
        with torch.no_grad():
            first = model(input_ids=p, use_cache=True, **{kw: cache}).logits[:, -1].argmax(-1)
        return torch.cat([first[:, None], decode_batch(model, cache, first, torch.ones_like(p), 4)], 1)

    def bad(**call):
        with pytest.raises(RequestError, match=call.pop("match")) as e, torch.no_grad():
            model(use_cache=True, **call)
        assert isinstance(e.value, ValueError) and isinstance(e.value, StoreError)

    for p, want in zip(prompts, clean):  # warm-up: the second prompt length makes the prefill dynamic
        assert torch.equal(good(p), want), f"seed={seed}"
    graphs = backend.graphs_compiled
    other = AdaKVCache(model, AdaKVConfig(budget=32, window=4), batch_size=1, max_new_tokens=4)
    for _ in range(2):
        bad(input_ids=prompts[0].repeat(2, 1), **{kw: cache}, match=r"input_ids: batch 2.*batch_size=1")
        bad(input_ids=prompts[0][:, :0], **{kw: cache}, match="empty prompt")
        bad(input_ids=prompts[1], **{kw: cache}, match=r"call cache\.reset\(\)")  # cache still holds a prompt
        bad(input_ids=prompts[1], **{kw: other}, match="another AdaKVConfig")
        bad(input_ids=prompts[1], attention_mask=torch.ones(3, 41, dtype=torch.long), **{kw: cache},
            match="attention_mask: batch 3")
        assert torch.equal(good(prompts[1]), clean[1]), f"seed={seed}"
        bad(input_ids=prompts[0][:, :5], **{kw: cache}, match=r"max_new_tokens=4.*5 more do not fit")  # full
        assert torch.equal(good(prompts[0]), clean[0]), f"seed={seed}"
    assert backend.graphs_compiled == graphs  # nothing bad was traced
    # the server refuses bad requests by parameter, before anything runs
    server = Server(model, backend, max_batch=2, max_new_tokens=4)
    for kwargs, match in [(dict(prompt=torch.ones(0, dtype=torch.long)), "empty prompt"),
                          (dict(prompt=torch.ones(2, 3, dtype=torch.long)), r"prompt=.*\[1, n\]"),
                          (dict(prompt=torch.tensor([1, 999])), "vocabulary"),
                          (dict(max_new_tokens=6), "max_new_tokens=6"), (dict(temperature=-1.0), "temperature"),
                          (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k")]:
        with pytest.raises(RequestError, match=match):
            server.submit(Request(**{"prompt": prompts[1][0], "max_new_tokens": 3, **kwargs}))
    assert not server.queue
    (r,) = server.run([Request(prompt=prompts[1][0], max_new_tokens=5)])
    # + the server's prefill (logits_to_keep=1) and its 2-row decode
    assert r.tokens == clean[1][0].tolist() and backend.graphs_compiled == graphs + 2


def test_eager_fallback_says_recompile_limit():
    model = build(seed=2)
    backend = compile_model(model, CFG, inner="eager")
    kw = cache_kwarg(model)
    ids = torch.randint(1, 128, (1, 50))
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: AdaKVCache(model, backend, batch_size=1, max_new_tokens=4)})
        with pytest.raises(StoreError, match=r"fell back to eager.*recompile_limit"):
            model(input_ids=ids.repeat(2, 1), use_cache=True,   # another batch size: a second variant
                  **{kw: AdaKVCache(model, backend, batch_size=2, max_new_tokens=4)})


def test_capacity_helper_and_its_error():
    model = build(layers=2)
    cfg = AdaKVConfig(budget=16, window=4)
    row = AdaKVCache.bytes_per_row(model, cfg, max_new_tokens=8)
    fixed = _cache_bytes(AdaKVCache._plan(model, cfg, 1, 8)[1], 0)
    for b in (1, 3):
        assert AdaKVCache(model, cfg, batch_size=b, max_new_tokens=8).nbytes() == fixed + b * row
    assert AdaKVCache.max_batch(model, cfg, 8, free_bytes=fixed + 3 * row) == 3
    assert AdaKVCache.max_batch(model, cfg, 8, free_bytes=fixed + 3 * row - 1) == 2
    assert AdaKVCache.max_batch(model, cfg, 8, free_bytes=0) == 0
    assert AdaKVCache.max_batch(model, cfg, 8) >= 1  # from the free memory now
    assert AdaKVCache.bytes_per_row(model, cfg, max_new_tokens=16) > row
    with pytest.raises(ValueError, match="free_bytes"):
        AdaKVCache.max_batch(model, cfg, 8, free_bytes=-1)
    huge = 1 << 40
    with pytest.raises(MemoryError, match=f"needs {fixed + huge * row} bytes"):
        AdaKVCache(model, cfg, batch_size=huge, max_new_tokens=8)  # refused before allocating


def test_slots_refuse_what_does_not_fit():
    model = build(seed=3)
    backend = compile_model(model, CFG, inner="eager")
    small = AdaKVCache(model, backend, batch_size=1, max_new_tokens=2)
    big = AdaKVCache(model, backend, batch_size=2, max_new_tokens=2)
    with pytest.raises(StoreError, match="holds no prefilled prompt"):
        big.load_rows([0], small)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 128, (1, 40)), use_cache=True, **{cache_kwarg(model): small})
    for slots, exc, match in [([2], IndexError, "out of range"), ([0, 1], ValueError, "2 slots"),
                              ([1, 1], ValueError, "named twice")]:
        with pytest.raises(exc, match=match):
            big.load_rows(slots, small)
    with pytest.raises(ValueError, match="another AdaKVConfig"):
        big.load_rows([0], AdaKVCache(model, AdaKVConfig(budget=8, window=4), batch_size=1, max_new_tokens=2))
    big.load_rows([1], small)
    assert big.live_rows() == [1] and big.room_left() == 2
    big.before_append(2)
    big.load_rows([1], small)  # a new request in row 1: room of its own again
    big.before_append(1)  # the idle row 0 had used up its room: recycled in place
    assert big._row_appended == [1, 1] and big.live_rows() == [1]
    big.before_append(1)
    with pytest.raises(StoreError, match=r"rows \[1\] are full"):
        big.before_append(1)


def test_soak_short(tmp_path):
    """bench/soak.py's CPU version: requests of 8-200 tokens, bad calls mixed in, nothing compiled after
    warm-up, every checked request equal to itself alone."""
    from bench.soak import main

    out = tmp_path / "soak.json"
    res = main(["--small", "--device", "cpu", "--requests", "20", "--min-steps", "30", "--max-batch", "3",
                "--max-new", "8", "--prompt-min", "8", "--prompt-max", "200", "--budget", "24", "--window", "4",
                "--check-every", "4", "--bad-every", "8", "--out", str(out)])
    assert res == __import__("json").loads(out.read_text())
    assert res["complete"] and res["requests"] >= 20 and res["steps"] >= 30
    assert res["recompiles_after_warmup"] == 0 and res["checked"] >= 5 and res["equal_to_alone"] == 1.0
    assert set(res["bad_calls_refused"]) == {"wrong_batch", "empty_prompt", "used_cache", "other_config",
                                             "too_many_new", "bad_sampling"}
    assert res["device"].startswith("CPU")
