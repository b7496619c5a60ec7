"""Random prompts and inputs for the tests, and the kept-position comparison they share."""
import torch


def left_padded(lengths, seed, vocab: int = 128):
    """A left-padded batch of random prompts of the given lengths: (ids [B, max], attention mask)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, L in enumerate(lengths):
        ids[i, n - L:] = torch.randint(1, vocab, (L,), generator=g)
        am[i, n - L:] = 1
    return ids, am


def scoring_inputs(seed, B, Hq, Hkv, n, D, pad):
    """Random q [B, Hq, n, D], k [B, Hkv, n, D] and the valid-key mask [B, n] with ``pad[b]`` left-padding
    positions in row b (scorer and allocation tests)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, D, generator=g) * 2
    k = torch.randn(B, Hkv, n, D, generator=g) * 2
    valid = torch.ones(B, n, dtype=torch.bool)
    for b, p in enumerate(pad[:B]):
        valid[b, :p] = False
    return q, k, valid


def assert_same_kept(kept, kept_want):
    """Per layer, row and KV head the same kept positions (in any order)."""
    for a, b in zip(kept, kept_want, strict=True):
        for ra, rb in zip(a, b, strict=True):
            for ha, hb in zip(ra, rb, strict=True):
                assert torch.equal(ha.sort().values, hb.sort().values)
