"""Independent references for the tests: masked-dense meProp in float64, and test data whose
top-k is unambiguous (scores separated by construction, so every correct selection agrees)."""

import torch


def separated_grad(B, N, mode, dtype=torch.float32, device="cpu"):
    """A B x N output gradient whose top-k by the mode's score is unique for every k.

    unified: column n has |dy|-sum equal to a distinct value in [1, 2];
    per_example: each row holds a permutation of distinct magnitudes in [1, 2] with random signs.
    """
    levels = torch.linspace(1.0, 2.0, N, dtype=torch.float64)
    if mode == "unified":
        base = torch.randn(B, N, dtype=torch.float64)
        base = base / base.abs().sum(0, keepdim=True)
        dy = base * levels[torch.randperm(N)]
    else:
        magnitudes = (
            torch.stack([levels[torch.randperm(N)] for _ in range(B)])
            if B
            else levels[:0].expand(0, N)
        )
        signs = torch.where(torch.rand(B, N) < 0.5, -1.0, 1.0).to(torch.float64)
        dy = magnitudes * signs
    return dy.to(dtype).to(device)


def selection_mask(dy, k, mode):
    """Boolean B x N mask of the kept entries, chosen in float64."""
    dy = dy.double()
    mask = torch.zeros_like(dy, dtype=torch.bool)
    if mode == "unified":
        idx = dy.abs().sum(0).topk(k).indices
        mask[:, idx] = True
    else:
        idx = dy.abs().topk(k, dim=1).indices
        mask.scatter_(1, idx, True)
    return mask


def mebp_reference(x, weight, dy, k, mode):
    """(dx, dW, db) of meProp in float64: dense products on the masked gradient."""
    x, weight, dy = x.double(), weight.double(), dy.double()
    kept = torch.where(selection_mask(dy, k, mode), dy, torch.zeros_like(dy))
    return kept @ weight, kept.t() @ x, dy.sum(0)


def is_valid_topk(scores, idx, k, rel=1e-5):
    """True if idx (ascending, distinct, k of them) holds k largest scores, up to rounding."""
    scores = scores.double()
    idx = idx.long()
    if idx.numel() != k or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
        return False
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[idx.cpu()] = True
    scores = scores.cpu()
    if chosen.all():
        return True
    smallest_kept = scores[chosen].nan_to_num(nan=float("inf")).min()
    largest_left = scores[~chosen].nan_to_num(nan=float("inf")).max()
    return bool(smallest_kept >= largest_left - rel * largest_left.abs())
