"""Random prompts for the end-to-end tests."""
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
