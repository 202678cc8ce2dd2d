"""The PyTorch-ops backend: the same operations as the Triton kernels, for CPU tensors.

Every function here matches a launcher in ``triton_mebp.kernels`` by name and meaning, except
that indices are int64. No Python loops over rows or examples.
"""
import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


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


def _row_csr(values, idx, n_cols):
    """B x n_cols CSR matrix holding values[b, j] at (b, idx[b, j])."""
    B, K = values.shape
    crow = torch.arange(0, B * K + 1, K, device=values.device)
    return torch.sparse_csr_tensor(crow, idx.reshape(-1), values.reshape(-1), (B, n_cols),
                                   check_invariants=False)


def per_example_input_grad(values, idx, weight):
    return _row_csr(values, idx, weight.shape[0]) @ weight


def per_example_weight_grad(values, idx, x, n_rows, out=None):
    """``(rows, grad_rows)`` of the distinct selected rows, or written into ``out`` if given."""
    B, K = values.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows, counts = torch.unique_consecutive(flat[order], return_counts=True)
    crow = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts, 0, out=crow[1:])
    examples = order // K
    by_row = torch.sparse_csr_tensor(crow, examples, values.reshape(-1)[order], (rows.numel(), B),
                                     check_invariants=False)
    grad_rows = by_row @ x
    if out is None:
        return rows, grad_rows
    out.index_copy_(0, rows, grad_rows)
    return rows, out


def row_sgd_update(weight, idx, rows, lr):
    weight.index_add_(0, idx, rows, alpha=-lr)
