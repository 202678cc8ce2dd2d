"""Row-gathered weight update: ``W[idx[j], :] -= lr * rows[j, :]`` without a dense gradient.

The indices must be distinct (a coalesced row-sparse gradient); each program owns whole rows, so
no two programs write the same element.
"""
import torch
import triton
import triton.language as tl

from ._checks import check_dtypes, check_indices
from ._tuning import TunedKernel


@triton.jit
def _row_sgd_kernel(w_ptr, idx_ptr, rows_ptr, K, M, lr,
                    stride_wn, stride_wm, stride_rk, stride_rm,
                    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (offs_k[:, None] < K) & (offs_m[None, :] < M)
    targets = tl.load(idx_ptr + offs_k, mask=offs_k < K, other=0).to(tl.int64)
    w_ptrs = w_ptr + targets[:, None] * stride_wn + offs_m[None, :] * stride_wm
    grad = tl.load(rows_ptr + offs_k[:, None].to(tl.int64) * stride_rk + offs_m[None, :] * stride_rm,
                   mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w - lr * grad).to(w_ptr.dtype.element_ty), mask=mask)


row_sgd = TunedKernel(
    _row_sgd_kernel,
    [triton.Config({"BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w)
     for bk, bm, w in ((4, 512, 4), (8, 256, 4), (1, 1024, 4), (16, 512, 8))],
    key=["M"], restore_value=["w_ptr"])


def row_sgd_update(weight: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, lr: float) -> None:
    """In place: ``weight[idx] -= lr * rows`` for distinct ``idx``."""
    check_dtypes("row_sgd_update", weight=weight, rows=rows)
    check_indices("row_sgd_update", idx=idx)
    K, M = rows.shape
    if K == 0:
        return
    row_sgd[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(M, meta["BLOCK_M"]))](
        weight, idx, rows, K, M, float(lr),
        weight.stride(0), weight.stride(1), rows.stride(0), rows.stride(1))
