"""Fused row-sparse optimizer updates: SGD (momentum, Nesterov), Adagrad, Adam/AdamW.

Each launch updates the rows ``idx`` of one parameter from the gradient rows ``grad[j, :]`` (for
row ``idx[j]``), together with that parameter's per-element state (same shape as the parameter)
and its per-row step count ``row_step`` (float32, one entry per parameter row). Rows not in
``idx`` are not read or written. The indices must be distinct (a coalesced row-sparse gradient).

Each program owns whole rows (``BLOCK_K`` of them) and walks along them in ``BLOCK_M`` chunks,
so it can read a row's step count once and write it back once: no atomics, no races. Arithmetic
is float32 whatever the storage dtype.
"""

import math

import triton
import triton.language as tl

from ._checks import check_dtypes, check_indices
from ._tuning import TunedKernel, pow2_bucket

_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w)
    for bk, bm, w in ((1, 1024, 4), (4, 512, 4), (1, 2048, 8), (4, 128, 4))
]


def _prune(configs, named_args):
    """Blocks no wider than the row's power-of-two bucket (the narrowest config if none fits)."""
    width = pow2_bucket(named_args["M"])
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(width, 128)]
    return fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


@triton.jit
def _row_sgd_kernel(
    p_ptr,
    idx_ptr,
    g_ptr,
    buf_ptr,
    step_ptr,
    K,
    M,
    lr,
    momentum,
    dampening,
    weight_decay,
    stride_pn,
    stride_pm,
    stride_gk,
    stride_gm,
    stride_bn,
    stride_bm,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    rows = tl.load(idx_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
    step = tl.load(step_ptr + rows, mask=k_mask, other=0.0)
    # A row's first momentum update copies its gradient into the buffer, as torch.optim.SGD does.
    first = (step == 0.0)[:, None]
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask = k_mask[:, None] & (offs_m[None, :] < M)
        p_ptrs = p_ptr + rows[:, None] * stride_pn + offs_m[None, :] * stride_pm
        g = tl.load(
            g_ptr + offs_k[:, None].to(tl.int64) * stride_gk + offs_m[None, :] * stride_gm,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = g + weight_decay * p
        if MOMENTUM:
            buf_ptrs = buf_ptr + rows[:, None] * stride_bn + offs_m[None, :] * stride_bm
            buf = tl.load(buf_ptrs, mask=mask, other=0.0).to(tl.float32)
            buf = tl.where(first, g, momentum * buf + (1.0 - dampening) * g)
            tl.store(buf_ptrs, buf.to(buf_ptr.dtype.element_ty), mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        tl.store(p_ptrs, (p - lr * g).to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(step_ptr + rows, step + 1.0, mask=k_mask)


@triton.jit
def _row_adagrad_kernel(
    p_ptr,
    idx_ptr,
    g_ptr,
    sum_ptr,
    step_ptr,
    K,
    M,
    lr,
    lr_decay,
    weight_decay,
    eps,
    stride_pn,
    stride_pm,
    stride_gk,
    stride_gm,
    stride_sn,
    stride_sm,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    rows = tl.load(idx_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
    step = tl.load(step_ptr + rows, mask=k_mask, other=0.0) + 1.0
    row_lr = (lr / (1.0 + (step - 1.0) * lr_decay))[:, None]
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask = k_mask[:, None] & (offs_m[None, :] < M)
        p_ptrs = p_ptr + rows[:, None] * stride_pn + offs_m[None, :] * stride_pm
        s_ptrs = sum_ptr + rows[:, None] * stride_sn + offs_m[None, :] * stride_sm
        g = tl.load(
            g_ptr + offs_k[:, None].to(tl.int64) * stride_gk + offs_m[None, :] * stride_gm,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = g + weight_decay * p
        s = s + g * g
        tl.store(s_ptrs, s.to(sum_ptr.dtype.element_ty), mask=mask)
        p = p - row_lr * g / (tl.sqrt(s) + eps)
        tl.store(p_ptrs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(step_ptr + rows, step, mask=k_mask)


@triton.jit
def _row_adam_kernel(
    p_ptr,
    idx_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    step_ptr,
    K,
    M,
    lr,
    beta1,
    beta2,
    log2_beta1,
    log2_beta2,
    eps,
    weight_decay,
    stride_pn,
    stride_pm,
    stride_gk,
    stride_gm,
    stride_mn,
    stride_mm,
    stride_vn,
    stride_vm,
    DECOUPLED: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    rows = tl.load(idx_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
    step = tl.load(step_ptr + rows, mask=k_mask, other=0.0) + 1.0
    # Each row is bias-corrected with its own step count.
    step_size = (lr / (1.0 - tl.exp2(step * log2_beta1)))[:, None]
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))[:, None]
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask = k_mask[:, None] & (offs_m[None, :] < M)
        p_ptrs = p_ptr + rows[:, None] * stride_pn + offs_m[None, :] * stride_pm
        m_ptrs = m_ptr + rows[:, None] * stride_mn + offs_m[None, :] * stride_mm
        v_ptrs = v_ptr + rows[:, None] * stride_vn + offs_m[None, :] * stride_vm
        g = tl.load(
            g_ptr + offs_k[:, None].to(tl.int64) * stride_gk + offs_m[None, :] * stride_gm,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
        if DECOUPLED:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(m_ptrs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptrs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(step_ptr + rows, step, mask=k_mask)


# Tuning runs on copies of what the kernels update in place, so each update is applied once.
row_sgd = TunedKernel(
    _row_sgd_kernel, _CONFIGS, key=["M"], prune=_prune, in_place=["p_ptr", "buf_ptr", "step_ptr"]
)
row_adagrad = TunedKernel(
    _row_adagrad_kernel,
    _CONFIGS,
    key=["M"],
    prune=_prune,
    in_place=["p_ptr", "sum_ptr", "step_ptr"],
)
row_adam = TunedKernel(
    _row_adam_kernel,
    _CONFIGS,
    key=["M"],
    prune=_prune,
    in_place=["p_ptr", "m_ptr", "v_ptr", "step_ptr"],
)


def _grid(K):
    return lambda meta: (triton.cdiv(K, meta["BLOCK_K"]),)


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else float("-inf")


def row_sgd_step(
    param, idx, grad, row_step, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov
) -> None:
    """In place on rows ``idx``: SGD with weight decay and (Nesterov) momentum, as torch.optim.SGD.

    ``param``, ``grad`` (K x M) and ``momentum_buffer`` (param's shape, or None without momentum)
    are 2-D; ``row_step`` counts each row's updates (0 means its buffer is not yet initialised).
    """
    check_dtypes("row_sgd_step", param=param, grad=grad, momentum_buffer=momentum_buffer)
    check_indices("row_sgd_step", idx=idx)
    K, M = grad.shape
    if K == 0:
        return
    buf = momentum_buffer if momentum_buffer is not None else param
    row_sgd[_grid(K)](
        param,
        idx,
        grad,
        buf,
        row_step,
        K,
        M,
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        param.stride(0),
        param.stride(1),
        grad.stride(0),
        grad.stride(1),
        buf.stride(0),
        buf.stride(1),
        MOMENTUM=momentum_buffer is not None,
        NESTEROV=bool(nesterov),
    )


def row_adagrad_step(
    param, idx, grad, row_step, state_sum, *, lr, lr_decay, weight_decay, eps
) -> None:
    """In place on rows ``idx``: Adagrad with the learning-rate decay taken per row."""
    check_dtypes("row_adagrad_step", param=param, grad=grad, state_sum=state_sum)
    check_indices("row_adagrad_step", idx=idx)
    K, M = grad.shape
    if K == 0:
        return
    row_adagrad[_grid(K)](
        param,
        idx,
        grad,
        state_sum,
        row_step,
        K,
        M,
        float(lr),
        float(lr_decay),
        float(weight_decay),
        float(eps),
        param.stride(0),
        param.stride(1),
        grad.stride(0),
        grad.stride(1),
        state_sum.stride(0),
        state_sum.stride(1),
    )


def row_adam_step(
    param,
    idx,
    grad,
    row_step,
    exp_avg,
    exp_avg_sq,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
) -> None:
    """In place on rows ``idx``: Adam (AdamW if ``decoupled``) bias-corrected per row."""
    check_dtypes("row_adam_step", param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    check_indices("row_adam_step", idx=idx)
    K, M = grad.shape
    if K == 0:
        return
    row_adam[_grid(K)](
        param,
        idx,
        grad,
        exp_avg,
        exp_avg_sq,
        row_step,
        K,
        M,
        float(lr),
        float(beta1),
        float(beta2),
        _log2(beta1),
        _log2(beta2),
        float(eps),
        float(weight_decay),
        param.stride(0),
        param.stride(1),
        grad.stride(0),
        grad.stride(1),
        exp_avg.stride(0),
        exp_avg.stride(1),
        exp_avg_sq.stride(0),
        exp_avg_sq.stride(1),
        DECOUPLED=bool(decoupled),
    )
