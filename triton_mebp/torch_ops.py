"""The PyTorch-ops backend: the same operations as the Triton kernels, for CPU tensors.

Every function here matches a launcher in ``triton_mebp.kernels`` by name and meaning, except
that indices are int64. No Python loops over rows or examples.
"""
import torch
import torch.nn.functional as F


def unified_select(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """Batch-shared top-k columns by ``sum_b |dy[b, n]|``: ``(idx ascending, dy[:, idx])``."""
    scores = dy.abs().sum(0, dtype=torch.float32)
    idx = torch.topk(scores, k, sorted=False).indices.sort().values
    if hits is not None:
        hits.index_add_(0, idx, torch.full_like(idx, dy.shape[0]))
    return idx, dy.index_select(1, idx)


def per_example_select(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """Per-row top-k of ``|dy|``: ``(values, idx)``, B x k, idx ascending within each row."""
    idx = torch.topk(dy.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
    if hits is not None:
        hits += torch.bincount(idx.reshape(-1), minlength=hits.shape[0])
    return dy.gather(1, idx), idx


def gathered_input_grad(dy_c, weight, idx):
    return dy_c @ weight.index_select(0, idx)


def gathered_weight_grad(dy_c, x, idx, out=None):
    rows = dy_c.t() @ x
    if out is None:
        return rows
    return out.index_copy_(0, idx, rows)


def per_example_input_grad(values, idx, weight):
    """``dx[b] = sum_j values[b, j] * weight[idx[b, j]]``: a weighted bag of rows per example."""
    return F.embedding_bag(idx, weight, per_sample_weights=values, mode="sum")


def per_example_weight_grad(values, idx, x, n_rows, dense=False):
    """``(rows, grad)``: the distinct selected rows ascending and their gradient rows, or with
    ``dense=True`` the whole n_rows x M gradient (zero rows where nothing was selected).

    The (example, slot) pairs are sorted by row once; each row's gradient is then a weighted bag
    of the input rows of the examples that selected it (an empty bag sums to zero).
    """
    B, K = values.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows, counts = torch.unique_consecutive(flat[order], return_counts=True)
    if dense:
        counts = torch.zeros(n_rows, dtype=torch.int64, device=x.device).index_put_((rows,), counts)
    starts = torch.zeros(counts.numel(), dtype=torch.int64, device=x.device)
    torch.cumsum(counts[:-1], 0, out=starts[1:])
    grad = F.embedding_bag(order // K, x, starts, per_sample_weights=values.reshape(-1)[order],
                           mode="sum")
    return rows, grad


def row_sgd_update(weight, idx, rows, lr):
    weight.index_add_(0, idx, rows, alpha=-lr)
