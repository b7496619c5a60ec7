"""Many long requests: prefill each alone (or in small groups), join the caches, decode together, drop rows.

CPU, tiny random Llama, compiled with inner="eager" (the same rewritten graphs as Inductor, no code
generation). Each joined row must decode exactly as its request alone (batch 1, same config) and as the
eager oracle (ReferenceSession) for that request.
"""
import pytest
import torch

from adakv_compile import AdaKVCache, AdaKVConfig, StoreError, compile_model
from adakv_compile.cache import cache_kwarg, decode_batch, left_pad_masks
from adakv_compile.reference import ReferenceSession

from .prompts import left_padded as padded
from .test_static_cache import build, twin

STEPS = 6


def prefill(model, ids, mask=None, max_new_tokens=STEPS, backend=None):
    """A cache of ``ids`` (``[b, n]``) prefilled and compressed; returns (cache, first tokens ``[b]``)."""
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=max_new_tokens)
    kw = {} if mask is None else dict(attention_mask=mask)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, **kw, **{cache_kwarg(model): cache}).logits
    return cache, logits[:, -1].argmax(-1)


def prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (1, n), generator=g) for n in lengths]


def test_joined_rows_decode_as_each_request_alone_and_as_the_oracle():
    seed = int(torch.randint(0, 1 << 16, ()))
    cfg = AdaKVConfig(budget=24, window=4)
    model = build(seed=seed)
    ref = ReferenceSession(twin(model), cfg)
    backend = compile_model(model, cfg, inner="eager")
    b = cfg.budget
    reqs = prompts([5 * b + 3, b + 7, 3 * b], seed)  # all longer than the budget: each row is compressed
    oracle = [ref.generate(p, max_new_tokens=STEPS + 1)[:, p.shape[1]:] for p in reqs]

    alone, positions = [], []
    for p in reqs:
        cache, first = prefill(model, p, backend=backend)
        rest = decode_batch(model, cache, first, torch.ones_like(p), STEPS)
        alone.append(torch.cat([first[:, None], rest], 1))
        positions.append([cache.kept_positions(layer)[0] for layer in range(len(cache.layers))])
    for a, o in zip(alone, oracle):
        assert torch.equal(a, o), f"seed={seed}"

    parts = [prefill(model, p, backend=backend) for p in reqs]
    caches, first = [c for c, _ in parts], torch.cat([f for _, f in parts])
    joined = AdaKVCache.join(caches)
    L = max(p.shape[1] for p in reqs)
    mask = left_pad_masks([torch.ones_like(p) for p in reqs])
    assert mask.shape == (3, L) and mask.sum(-1).tolist() == [p.shape[1] for p in reqs]
    assert joined.batch_size == 3 and int(joined.get_seq_length()) == L
    assert joined.max_new_tokens == STEPS and joined.appended == 0
    for lay, parts_lay in zip(joined.layers, zip(*(c.layers for c in caches))):
        assert lay.compressed and lay.slots_per_row == parts_lay[0].slots_per_row  # same sizing, no growth
        for t in lay.tensors():  # new fixed-address tensors that lead the backend to the joined cache
            assert t._adakv_cache() is joined and t._dynamo_static_input_type
            assert all(t.data_ptr() != u.data_ptr() for p in parts_lay for u in p.tensors())
    # the stored positions are those of a left-padded batch: each row shifted by its padding
    for layer in range(len(joined.layers)):
        got = joined.kept_positions(layer)
        for row, (c, p) in enumerate(zip(caches, reqs)):
            for head, want in enumerate(c.kept_positions(layer)[0]):
                assert torch.equal(got[row][head], want + (L - p.shape[1]))

    rest = decode_batch(model, joined, first, mask, STEPS)
    together = torch.cat([first[:, None], rest], 1)
    assert torch.equal(together, torch.cat(alone)), f"seed={seed}"
    assert joined.appended == STEPS and int(joined.get_seq_length()) == L + STEPS
    for layer in range(len(joined.layers)):  # what each row holds after decoding: as alone, shifted
        got = joined.kept_positions(layer)
        for row, p in enumerate(reqs):
            for head, want in enumerate(positions[row][layer]):
                assert torch.equal(got[row][head], want + (L - p.shape[1]))
    for c in caches:  # the inputs were copied, not consumed
        assert c.appended == 0 and all(not bool(lay.lens.eq(0).all()) for lay in c.layers)


def generate_on(model, joined, first, mask, steps):
    """HF generate continuing a joined cache: the past as pad tokens (generate never feeds what the cache has
    seen), the first tokens last; the mask gives each row its position ids (cumsum), as for a left-padded
    batch. Returns the ``[B, 1 + steps]`` tokens from the first ones on."""
    B, L = mask.shape
    ids = torch.cat([torch.zeros(B, L, dtype=torch.long), first[:, None]], 1)
    am = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
    out = model.generate(ids, attention_mask=am, max_new_tokens=steps, do_sample=False,
                         **{cache_kwarg(model): joined})
    return out[:, L:]


def test_generate_continues_a_joined_cache():
    seed = int(torch.randint(0, 1 << 16, ()))
    cfg = AdaKVConfig(budget=20, window=4)
    model = build(seed=seed)
    backend = compile_model(model, cfg, inner="eager")
    kw = cache_kwarg(model)
    reqs = prompts([90, 27, 51], seed)
    alone = []
    for p in reqs:
        cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=STEPS)
        alone.append(model.generate(p, max_new_tokens=STEPS + 1, do_sample=False, **{kw: cache})[:, p.shape[1]:])
    parts = [prefill(model, p, backend=backend) for p in reqs]
    caches, first = [c for c, _ in parts], torch.cat([f for _, f in parts])
    mask = left_pad_masks([torch.ones_like(p) for p in reqs])
    assert torch.equal(generate_on(model, AdaKVCache.join(caches), first, mask, STEPS), torch.cat(alone)), \
        f"seed={seed}"
    two = AdaKVCache.join(caches).drop_rows([1])  # another batch size: the batch dim goes dynamic
    assert torch.equal(generate_on(model, two, first[[0, 2]], mask[[0, 2]], STEPS), torch.cat(alone)[[0, 2]])


def test_generate_after_bare_loop_decodes_of_two_batch_sizes():
    cfg = AdaKVConfig(budget=20, window=4)
    model = build(seed=5)
    backend = compile_model(model, cfg, inner="eager")
    reqs = prompts([60, 33], seed=5)
    parts = [prefill(model, p, backend=backend) for p in reqs]
    c, f = parts[0]
    decode_batch(model, c, f, torch.ones_like(reqs[0]), 2)          # bare loop at batch 1
    caches, first = [c for c, _ in parts[1:]] * 2, torch.cat([parts[1][1]] * 2)
    mask = left_pad_masks([torch.ones_like(reqs[1])] * 2)
    decode_batch(model, AdaKVCache.join(caches), first, mask, 2)    # ... and at batch 2: dynamic batch
    generate_on(model, AdaKVCache.join(caches), first, mask, 2)     # generate: layer 0 left un-rewritten


def test_dropping_finished_rows_leaves_the_others_unchanged():
    seed = int(torch.randint(0, 1 << 16, ()))
    cfg = AdaKVConfig(budget=16, window=4, layer_schedule="pyramid")
    model = build(seed=seed)
    backend = compile_model(model, cfg, inner="eager")
    reqs = prompts([70, 23, 41, 55], seed)
    parts = [prefill(model, p, backend=backend) for p in reqs]
    caches, first = [c for c, _ in parts], torch.cat([f for _, f in parts])
    mask = left_pad_masks([torch.ones_like(p) for p in reqs])
    full = decode_batch(model, AdaKVCache.join(caches), first, mask, STEPS)

    joined = AdaKVCache.join(caches)
    head = decode_batch(model, joined, first, mask, 2)
    mask = torch.cat([mask, torch.ones(4, 2, dtype=torch.long)], 1)
    # row 1 finished: drop it; then row 3 (now row 2): drop by boolean mask via select_rows
    smaller = joined.drop_rows([1])
    assert smaller.batch_size == 3 and smaller.appended == 2 and joined.batch_size == 4
    keep = [0, 2, 3]
    mid = decode_batch(model, smaller, head[keep, -1], mask[keep], 2)
    mask = torch.cat([mask[keep], torch.ones(3, 2, dtype=torch.long)], 1)
    last = smaller.select_rows(torch.tensor([True, True, False]))
    for layer in range(len(last.layers)):  # the kept rows' contents moved with them
        got, want = last.kept_positions(layer), smaller.kept_positions(layer)[:2]
        assert all(torch.equal(a, b) for g, w in zip(got, want) for a, b in zip(g, w))
    tail = decode_batch(model, last, mid[:2, -1], mask[:2], 2)
    assert torch.equal(torch.cat([head[keep], mid], 1), full[keep, :4]), f"seed={seed}"
    assert torch.equal(torch.cat([head[[0, 2]], mid[:2], tail], 1), full[[0, 2]]), f"seed={seed}"
    with pytest.raises(StoreError, match="max_new_tokens=6"):  # the appended count carried over
        decode_batch(model, last, tail[:, -1], torch.cat([mask[:2], torch.ones(2, 2, dtype=torch.long)], 1), 1)


def test_join_groups_and_caches_that_already_decoded():
    """A left-padded group and a request that already decoded tokens join a fresh request: each row still
    decodes as it would have gone on alone; the joined room is the largest left by any input."""
    seed = int(torch.randint(0, 1 << 16, ()))
    cfg = AdaKVConfig(budget=20, window=4, allocation="uniform")
    model = build(seed=seed)
    backend = compile_model(model, cfg, inner="eager")
    ga, gb, c = prompts([64, 45, 33], seed)
    group_ids, group_mask = padded([64, 45], seed + 1)
    group_ids[0, :], group_ids[1, -45:] = ga[0], gb[0]

    alone = []
    for p in (ga, gb, c):
        cache, f = prefill(model, p, max_new_tokens=STEPS + 3, backend=backend)
        alone.append(torch.cat([f[:, None], decode_batch(model, cache, f, torch.ones_like(p), STEPS + 3)], 1))
    alone = torch.cat(alone)

    group, gfirst = prefill(model, group_ids, group_mask, max_new_tokens=STEPS, backend=backend)
    early, cfirst = prefill(model, c, max_new_tokens=STEPS + 3, backend=backend)
    done = decode_batch(model, early, cfirst, torch.ones_like(c), 3)  # 3 tokens decoded before the join
    joined = AdaKVCache.join([group, early])
    assert joined.max_new_tokens == STEPS and joined.appended == 0
    assert int(joined.get_seq_length()) == 64
    mask = left_pad_masks([group_mask, torch.ones(1, 33 + 3, dtype=torch.long)])
    first = torch.cat([gfirst, done[:, -1]])
    rest = decode_batch(model, joined, first, mask, STEPS)
    assert torch.equal(torch.cat([first[:2, None], rest[:2]], 1), alone[:2, :STEPS + 1]), f"seed={seed}"
    assert torch.equal(torch.cat([cfirst[:, None], done, rest[2:]], 1), alone[2:, :STEPS + 4]), f"seed={seed}"
    with pytest.raises(StoreError, match="max_new_tokens=6"):
        decode_batch(model, joined, rest[:, -1], torch.cat([mask, torch.ones(3, STEPS, dtype=torch.long)], 1), 1)


def test_mismatched_caches_and_bad_rows_are_refused_clearly():
    cfg = AdaKVConfig(budget=16, window=4)
    model = build(seed=1)
    backend = compile_model(model, cfg, inner="eager")
    ok, _ = prefill(model, torch.randint(1, 128, (1, 40)), backend=backend)
    mc = model.config

    def blank(config=cfg, model_config=mc, **kw):
        args = dict(device="cpu", dtype=torch.float32)
        args.update(kw)
        return AdaKVCache(model_config, config, batch_size=1, max_new_tokens=STEPS, **args)

    fewer = type(mc).from_dict({**mc.to_dict(), "num_hidden_layers": 1})
    more_heads = type(mc).from_dict({**mc.to_dict(), "num_key_value_heads": 4})
    wider = type(mc).from_dict({**mc.to_dict(), "head_dim": 32})
    cases = [
        ([], ValueError, "at least one cache"),
        ([ok, "cache"], TypeError, r"caches\[1\] is a str"),
        ([ok, blank(AdaKVConfig(budget=24, window=4))], ValueError, r"caches\[1\] was built for another AdaKVConfig"),
        ([ok, blank(model_config=fewer)], ValueError, r"caches\[1\] has 1 layers"),
        ([ok, blank(model_config=more_heads)], ValueError, "KV heads 4"),
        ([ok, blank(model_config=wider)], ValueError, "head_dim 32"),
        ([ok, blank(dtype=torch.float64)], ValueError, "dtype torch.float64"),
        ([ok, blank(device="meta")], ValueError, "device meta"),
        ([ok, blank()], StoreError, r"caches\[1\] holds no prefilled prompt"),
    ]
    for caches, exc, match in cases:
        with pytest.raises(exc, match=match):
            AdaKVCache.join(caches)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        AdaKVCache.join([ok], max_new_tokens=0)
    two = AdaKVCache.join([ok, ok], max_new_tokens=3)
    assert two.max_new_tokens == 3 and two.batch_size == 2
    with pytest.raises(IndexError, match="out of range"):
        two.select_rows([2])
    with pytest.raises(IndexError, match="out of range"):
        two.drop_rows([5])
    with pytest.raises(ValueError, match="empty cache"):
        two.drop_rows([0, 1])
    with pytest.raises(ValueError, match="no rows selected"):
        two.select_rows([])
    with pytest.raises(ValueError, match="boolean mask of 3"):
        two.select_rows(torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"expected \(2, 40\)"):
        decode_batch(model, two, torch.tensor([1, 2]), torch.ones(2, 39), 1)
    with pytest.raises(ValueError, match="3 first tokens"):
        decode_batch(model, two, torch.tensor([1, 2, 3]), torch.ones(2, 40), 1)
