"""Row-gathered products of meProp's backward pass.

Unified layout (one index set ``idx`` of k rows for the batch, ``dy_c = dy[:, idx]``):
  ``dx = dy_c @ W[idx, :]``  the rows of W are gathered inside the kernel, never copied;
  ``dW[idx, :] = dy_c.T @ x`` written straight into the rows of a dense gradient, or as k rows.

Per-example layout (values ``v`` and indices ``i``, both B x k):
  ``dx[b] = sum_j v[b, j] * W[i[b, j], :]``
  ``dW[r, :] = sum over (b, j) with i[b, j] == r of v[b, j] * x[b, :]``, by sorted segments: the
  (b, j) pairs are sorted by row once, then each program sums one row's segment in a fixed order.
  No atomics, so the result is deterministic.

Mixed precision (autocast with float32 master weights): the operands may differ in dtype. The
matrix products cast each loaded tile of the second operand (the gathered rows of W, the tiles
of x) to the dtype of the first (``dy_c``) before ``tl.dot``, so they multiply in bf16/fp16 and
accumulate in float32; W and x are never copied whole. The per-example kernels widen both
operands to float32. Outputs take the dtype of the tensor written (``dtype=``, ``out``).
"""

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..backend import interpreting
from ._checks import check_dtypes, check_indices
from ._tiles import grouped_tile, padded_width
from ._tuning import (
    SMEM_LIMIT,
    TunedKernel,
    input_precision,
    pow2_bucket,
    product_route,
    tma_enabled,
)


@triton.jit
def _weight_rows_tile(w_ptr, idx_ptr, offs_k, K_VALID, offs_m, mask_m, stride_wn, stride_wm):
    """Rows ``idx[offs_k]`` of ``w`` at columns ``offs_m``; zero from K_VALID on and past M."""
    valid_k = offs_k < K_VALID
    rows = tl.load(idx_ptr + offs_k, mask=valid_k, other=0).to(tl.int64)
    return tl.load(
        w_ptr + rows[:, None] * stride_wn + offs_m[None, :] * stride_wm,
        mask=valid_k[:, None] & mask_m[None, :],
        other=0.0,
    )


@triton.jit
def _store_tile(c_ptr, acc, offs_b, mask_b, offs_m, mask_m, stride_cb, stride_cm):
    c_ptrs = c_ptr + offs_b[:, None].to(tl.int64) * stride_cb + offs_m[None, :] * stride_cm
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_m[None, :])


@triton.jit
def _store_weight_rows(
    out_ptr,
    idx_ptr,
    acc,
    offs_k,
    K_VALID,
    offs_m,
    mask_m,
    stride_on,
    stride_om,
    SCATTER: tl.constexpr,
):
    """Rows ``j < K_VALID`` of ``acc`` at ``out[idx[j]]`` (SCATTER) or ``out[j]``."""
    valid_k = offs_k < K_VALID
    if SCATTER:
        out_rows = tl.load(idx_ptr + offs_k, mask=valid_k, other=0).to(tl.int64)
    else:
        out_rows = offs_k.to(tl.int64)
    out_ptrs = out_ptr + out_rows[:, None] * stride_on + offs_m[None, :] * stride_om
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid_k[:, None] & mask_m[None, :])


@triton.jit
def _gathered_rows_matmul_kernel(
    a_ptr,
    w_ptr,
    idx_ptr,
    c_ptr,
    B,
    M,
    K,
    K_VALID,
    B_BUCKET,
    stride_ab,
    stride_ak,
    stride_wn,
    stride_wm,
    stride_cb,
    stride_cm,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_B: tl.constexpr,
):
    """c[B, M] = a[B, K] @ w[idx[K], M]; columns K_VALID <= j < K of ``a`` are zero padding."""
    pid_b, pid_m = grouped_tile(tl.program_id(0), B, M, BLOCK_B, BLOCK_M, GROUP_B)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_b = offs_b < B
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_b[:, None].to(tl.int64) * stride_ab + offs_k[None, :] * stride_ak,
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = _weight_rows_tile(w_ptr, idx_ptr, offs_k, K_VALID, offs_m, mask_m, stride_wn, stride_wm)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    _store_tile(c_ptr, acc, offs_b, mask_b, offs_m, mask_m, stride_cb, stride_cm)


@triton.jit
def _transposed_matmul_rows_kernel(
    a_ptr,
    x_ptr,
    idx_ptr,
    out_ptr,
    B,
    M,
    K,
    K_VALID,
    B_BUCKET,
    stride_ab,
    stride_ak,
    stride_xb,
    stride_xm,
    stride_on,
    stride_om,
    SCATTER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """rows[K, M] = a[B, K].T @ x[B, M], stored at out[idx[j]] (SCATTER) or out[j] for
    j < K_VALID; columns K_VALID <= j < K of ``a`` are zero padding, loaded but not stored."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        a_t = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_b[None, :].to(tl.int64) * stride_ab,
            mask=mask_k[:, None] & mask_b[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_b[:, None].to(tl.int64) * stride_xb + offs_m[None, :] * stride_xm,
            mask=mask_b[:, None] & mask_m[None, :],
            other=0.0,
        )
        acc = tl.dot(a_t, x.to(a_t.dtype), acc, input_precision=INPUT_PRECISION)
    _store_weight_rows(
        out_ptr, idx_ptr, acc, offs_k, K_VALID, offs_m, mask_m, stride_on, stride_om, SCATTER
    )


# TMA variants (Hopper): the dense operands (dy_c; x in the dW product) come through tensor
# descriptors, one bulk copy per tile, out-of-bounds parts zero-filled; the gathered rows of W and
# the stored rows of dW stay on pointers (TMA cannot gather rows by an index list). The launchers
# take them where ``_tma_readable`` allows, else the pointer kernels above.


@triton.jit
def _gathered_rows_matmul_tma_kernel(
    a_desc,
    w_ptr,
    idx_ptr,
    c_ptr,
    B,
    M,
    K,
    K_VALID,
    B_BUCKET,
    stride_wn,
    stride_wm,
    stride_cb,
    stride_cm,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_B: tl.constexpr,
):
    """``_gathered_rows_matmul_kernel`` with ``a`` (B x K) read through ``a_desc``."""
    pid_b, pid_m = grouped_tile(tl.program_id(0), B, M, BLOCK_B, BLOCK_M, GROUP_B)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_b = offs_b < B
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        a = a_desc.load([pid_b * BLOCK_B, start])
        w = _weight_rows_tile(w_ptr, idx_ptr, offs_k, K_VALID, offs_m, mask_m, stride_wn, stride_wm)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    _store_tile(c_ptr, acc, offs_b, mask_b, offs_m, mask_m, stride_cb, stride_cm)


@triton.jit
def _transposed_matmul_rows_tma_kernel(
    a_desc,
    x_desc,
    idx_ptr,
    out_ptr,
    B,
    M,
    K,
    K_VALID,
    B_BUCKET,
    stride_on,
    stride_om,
    SCATTER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """``_transposed_matmul_rows_kernel`` with ``a`` (B x K) and ``x`` (B x M) read through
    ``a_desc`` and ``x_desc``."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        a = a_desc.load([start, pid_k * BLOCK_K])
        x = x_desc.load([start, pid_m * BLOCK_M])
        acc = tl.dot(a.T, x.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    _store_weight_rows(
        out_ptr, idx_ptr, acc, offs_k, K_VALID, offs_m, mask_m, stride_on, stride_om, SCATTER
    )


@triton.jit
def _per_example_dx_kernel(
    v_ptr,
    i_ptr,
    w_ptr,
    dx_ptr,
    M,
    K,
    stride_wn,
    stride_wm,
    stride_xb,
    stride_xm,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dx[b, :] = sum_j v[b, j] * w[i[b, j], :] (v, i contiguous B x K)."""
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        v = tl.load(v_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        rows = tl.load(i_ptr + b * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        w = tl.load(
            w_ptr + rows[:, None] * stride_wn + offs_m[None, :] * stride_wm,
            mask=mask_k[:, None] & mask_m[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(v[:, None] * w, axis=0)
    tl.store(
        dx_ptr + b * stride_xb + offs_m * stride_xm, acc.to(dx_ptr.dtype.element_ty), mask=mask_m
    )


@triton.jit
def _segment_rows_kernel(
    seg_ptr,
    example_ptr,
    value_ptr,
    x_ptr,
    out_ptr,
    M,
    stride_xb,
    stride_xm,
    stride_on,
    stride_om,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[u] = sum_{t in segment u} value[t] * x[example[t], :], the segment
    seg[u] <= t < seg[u + 1] (an empty one writes a zero row)."""
    u = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    seg_start = tl.load(seg_ptr + u)
    seg_end = tl.load(seg_ptr + u + 1)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(seg_start, seg_end, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        mask_t = offs_t < seg_end
        examples = tl.load(example_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        v = tl.load(value_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
        x = tl.load(
            x_ptr + examples[:, None] * stride_xb + offs_m[None, :] * stride_xm,
            mask=mask_t[:, None] & mask_m[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(v[:, None] * x, axis=0)
    tl.store(
        out_ptr + u.to(tl.int64) * stride_on + offs_m * stride_om,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m,
    )


def _dot_smem_bytes(a_block, a_bytes, b_block, b_bytes, stages):
    """Shared memory of a pipelined product whose operand tiles are loaded in their own dtypes."""
    return (a_block * a_bytes + b_block * b_bytes) * stages


def _prune_dx(configs, named_args):
    a_bytes, w_bytes = named_args["a_ptr"].element_size(), named_args["w_ptr"].element_size()
    fitting = [
        c
        for c in configs
        if _dot_smem_bytes(
            c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_K"],
            a_bytes,
            c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_M"],
            w_bytes,
            c.num_stages,
        )
        <= SMEM_LIMIT
        and (c.kwargs["BLOCK_K"] <= max(pow2_bucket(named_args["K"]), 32))
    ]
    return fitting or configs[-1:]


def _prune_dw(configs, named_args):
    a_bytes, x_bytes = named_args["a_ptr"].element_size(), named_args["x_ptr"].element_size()
    fitting = [
        c
        for c in configs
        if _dot_smem_bytes(
            c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_B"],
            a_bytes,
            c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_M"],
            x_bytes,
            c.num_stages,
        )
        <= SMEM_LIMIT
        and c.kwargs["BLOCK_K"] <= max(pow2_bucket(named_args["K"]), 32)
    ]
    return fitting or configs[-1:]


def _mm_configs(first, second, third):
    shapes = [
        (128, 128, 64, 4, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (128, 256, 64, 3, 8),
        (32, 64, 32, 4, 4),
    ]
    return [
        triton.Config({first: a, second: b, third: c}, num_stages=s, num_warps=w)
        for a, b, c, s, w in shapes
    ]


gathered_rows_matmul = TunedKernel(
    _gathered_rows_matmul_kernel,
    [
        triton.Config({**c.kwargs, "GROUP_B": 8}, num_stages=c.num_stages, num_warps=c.num_warps)
        for c in _mm_configs("BLOCK_B", "BLOCK_M", "BLOCK_K")
    ],
    key=["B_BUCKET", "M", "K"],
    prune=_prune_dx,
)
transposed_matmul_rows = TunedKernel(
    _transposed_matmul_rows_kernel,
    _mm_configs("BLOCK_K", "BLOCK_M", "BLOCK_B"),
    key=["B_BUCKET", "M", "K"],
    prune=_prune_dw,
)


def _tma_blocks_dx(nargs):
    nargs["a_desc"].block_shape = [nargs["BLOCK_B"], nargs["BLOCK_K"]]


def _tma_blocks_dw(nargs):
    nargs["a_desc"].block_shape = [nargs["BLOCK_B"], nargs["BLOCK_K"]]
    nargs["x_desc"].block_shape = [nargs["BLOCK_B"], nargs["BLOCK_M"]]


def _with_pointers(named_args):
    """The arguments of a TMA launch under the pointer kernel's names, for its pruner."""
    named = dict(named_args)
    for name in ("a", "x"):
        if f"{name}_desc" in named:
            named[f"{name}_ptr"] = named.pop(f"{name}_desc").base
    return named


def _tma_configs(configs, pre_hook):
    """``configs`` whose pre_hook gives the descriptors the config's block shape."""
    return [
        triton.Config(c.kwargs, num_stages=c.num_stages, num_warps=c.num_warps, pre_hook=pre_hook)
        for c in configs
    ]


gathered_rows_matmul_tma = TunedKernel(
    _gathered_rows_matmul_tma_kernel,
    _tma_configs(gathered_rows_matmul.configs, _tma_blocks_dx),
    key=["B_BUCKET", "M", "K"],
    prune=lambda configs, named_args: _prune_dx(configs, _with_pointers(named_args)),
)
transposed_matmul_rows_tma = TunedKernel(
    _transposed_matmul_rows_tma_kernel,
    _tma_configs(transposed_matmul_rows.configs, _tma_blocks_dw),
    key=["B_BUCKET", "M", "K"],
    prune=lambda configs, named_args: _prune_dw(configs, _with_pointers(named_args)),
)
per_example_dx = TunedKernel(
    _per_example_dx_kernel,
    [
        triton.Config({"BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w)
        for bk, bm, w in ((16, 256, 4), (32, 128, 4), (16, 512, 8), (64, 64, 4))
    ],
    key=["M", "K"],
)
segment_rows = TunedKernel(
    _segment_rows_kernel,
    [
        triton.Config({"BLOCK_T": bt, "BLOCK_M": bm}, num_warps=w)
        for bt, bm, w in ((16, 256, 4), (32, 128, 4), (16, 512, 8), (64, 64, 4))
    ],
    key=["M"],
)


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_readable(dy_c: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a product may read ``dy_c`` and ``others`` (2-D) through TMA descriptors: on a
    GPU with TMA (Hopper or newer; also the interpreter and the static report's meta tensors),
    ``dy_c`` in 16 bits (tensor-core products; in float32 the dx variant spills), each operand
    with contiguous rows, a 16-byte aligned start and a row stride of a multiple of 16 bytes,
    and ``TRITON_MEBP_TMA`` not "0"."""
    if not tma_enabled() or dy_c.element_size() != 2:
        return False
    tensors = (dy_c, *others)
    device = dy_c.device
    if device.type == "cuda":
        if not _has_tma(device.index if device.index is not None else torch.cuda.current_device()):
            return False
    elif not (interpreting() or device.type == "meta"):
        return False
    return all(
        t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
        for t in tensors
    )


class _Descriptor(TensorDescriptor):
    """A TMA descriptor that shows its tensor's dtype, as the autotuning keys (Triton's and
    ``TunedKernel``'s) take the dtypes of the arguments: a float32 ``x`` (autocast) must not get
    the config tuned for a bf16 one, whose shared memory it would overflow."""

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype


def _descriptor(rows: torch.Tensor, width: int) -> TensorDescriptor:
    """A TMA descriptor over the first ``width`` columns of the rows of ``rows`` (which may run
    past its own columns, into zero padding); its block shape comes from the config's pre_hook."""
    return _Descriptor(rows, [rows.shape[0], width], [rows.stride(0), 1], [1, 1])


# PyTorch's GEMM with a float32 result straight from the accumulator of fp16/bf16 operands (CUDA)
_MM_OUT_DTYPE = any(
    schema.overload_name == "dtype" for schema in torch._C._jit_get_schemas_for_operator("aten::mm")
)


def _library_product(a, b, dtype):
    """``a @ b`` by cuBLAS (the ``TRITON_MEBP_PRODUCTS`` route) as the kernels compute it: ``b``
    cast to ``a``'s dtype, float32 accumulation, the result in ``dtype``."""
    b = b.to(a.dtype)
    if dtype == a.dtype:
        return torch.matmul(a, b)
    if _MM_OUT_DTYPE and a.is_cuda and dtype == torch.float32 and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=dtype)
    wide = torch.promote_types(dtype, torch.float32)  # products of the rounded operands are exact
    return torch.matmul(a.to(wide), b.to(wide)).to(dtype)


def gathered_input_grad(
    dy_c: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """``dy_c @ weight[idx]`` (B x M), in ``dy_c``'s dtype; the gathered rows are cast to it
    (float32 accumulation).

    The Triton kernel gathers the rows of ``weight`` inside (a ``dy_c`` from ``unified_select``
    (v2) is read whole tiles at a time from its zero padding); the cuBLAS route
    (``TRITON_MEBP_PRODUCTS``, ``_tuning.product_route``) copies them out first."""
    check_dtypes("gathered_input_grad", dy_c=dy_c, weight=weight)
    check_indices("gathered_input_grad", idx=idx)
    if product_route("dx") == "cublas":
        return _library_product(dy_c, weight.index_select(0, idx), dy_c.dtype)
    B, K = dy_c.shape
    K_loop = padded_width(dy_c)
    M = weight.shape[1]
    dx = torch.empty((B, M), dtype=dy_c.dtype, device=dy_c.device)
    if B == 0:
        return dx

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_B"]) * triton.cdiv(M, meta["BLOCK_M"]),)

    if _tma_readable(dy_c):
        gathered_rows_matmul_tma[grid](
            _descriptor(dy_c, K_loop),
            weight,
            idx,
            dx,
            B,
            M,
            K_loop,
            K,
            pow2_bucket(B),
            weight.stride(0),
            weight.stride(1),
            dx.stride(0),
            dx.stride(1),
            INPUT_PRECISION=input_precision(dy_c.dtype),
        )
        return dx
    gathered_rows_matmul[grid](
        dy_c,
        weight,
        idx,
        dx,
        B,
        M,
        K_loop,
        K,
        pow2_bucket(B),
        dy_c.stride(0),
        dy_c.stride(1),
        weight.stride(0),
        weight.stride(1),
        dx.stride(0),
        dx.stride(1),
        INPUT_PRECISION=input_precision(dy_c.dtype),
    )
    return dx


def gathered_weight_grad(
    dy_c: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dy_c.T @ x``: the k selected rows of dW (k x M, ``dtype``, default ``dy_c``'s), or
    written into ``out[idx]`` if given. Tiles of ``x`` are cast to ``dy_c``'s dtype; the float32
    accumulator is rounded once, to the output's dtype.

    The Triton kernel stores the rows straight into ``out``; the cuBLAS route
    (``TRITON_MEBP_PRODUCTS``) computes them apart and copies them in."""
    check_dtypes("gathered_weight_grad", dy_c=dy_c, x=x, out=out, dtype=dtype)
    check_indices("gathered_weight_grad", idx=idx)
    if product_route("dw", scatter=out is not None) == "cublas":
        rows = _library_product(dy_c.t(), x, out.dtype if out is not None else dtype or dy_c.dtype)
        if out is None:
            return rows
        return out.index_copy_(0, idx.long(), rows)
    B, K = dy_c.shape
    K_loop = padded_width(dy_c)
    M = x.shape[1]
    scatter = out is not None
    if not scatter:
        out = torch.empty((K, M), dtype=dtype or dy_c.dtype, device=dy_c.device)
    if B == 0:
        if not scatter:
            out.zero_()
        return out

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(M, meta["BLOCK_M"]))

    if _tma_readable(dy_c, x):
        transposed_matmul_rows_tma[grid](
            _descriptor(dy_c, K_loop),
            _descriptor(x, M),
            idx,
            out,
            B,
            M,
            K_loop,
            K,
            pow2_bucket(B),
            out.stride(0),
            out.stride(1),
            SCATTER=scatter,
            INPUT_PRECISION=input_precision(dy_c.dtype),
        )
        return out
    transposed_matmul_rows[grid](
        dy_c,
        x,
        idx,
        out,
        B,
        M,
        K_loop,
        K,
        pow2_bucket(B),
        dy_c.stride(0),
        dy_c.stride(1),
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        SCATTER=scatter,
        INPUT_PRECISION=input_precision(dy_c.dtype),
    )
    return out


def per_example_input_grad(
    values: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``dx[b] = sum_j values[b, j] * weight[idx[b, j]]`` (B x M, dtype of ``values``), summed in
    float32 from both operands as stored."""
    check_dtypes("per_example_input_grad", values=values, weight=weight)
    check_indices("per_example_input_grad", idx=idx)
    B, K = values.shape
    M = weight.shape[1]
    dx = torch.empty((B, M), dtype=values.dtype, device=values.device)
    if B == 0:
        return dx
    values, idx = values.contiguous(), idx.contiguous()
    per_example_dx[lambda meta: (B, triton.cdiv(M, meta["BLOCK_M"]))](
        values,
        idx,
        weight,
        dx,
        M,
        K,
        weight.stride(0),
        weight.stride(1),
        dx.stride(0),
        dx.stride(1),
    )
    return dx


def _row_segments(idx: torch.Tensor, n_rows: int):
    """The (example, slot) entries of ``idx`` ordered by row, without a host read.

    Returns ``(order, seg)``: ``order`` the flat positions sorted by row, stably (within a row by
    example, a fixed order, so the sums do not depend on scheduling), and ``seg`` (n_rows + 1) the
    segment bounds: row r's entries are ``order[seg[r]:seg[r + 1]]`` (empty where none selected
    r). The bounds are binary searches of ``0..n_rows`` in the sorted rows: no atomics."""
    flat = idx.reshape(-1)
    sorted_rows, order = torch.sort(flat, stable=True)
    queries = torch.arange(n_rows + 1, dtype=flat.dtype, device=flat.device)
    return order, torch.searchsorted(sorted_rows, queries)


def _distinct_rows(seg: torch.Tensor):
    """``(rows, seg)`` of the rows with a non-empty segment, ascending, and their bounds. Their
    number sizes the result: the one host read of the per-example path (``grad="sparse"``)."""
    present = seg[1:] > seg[:-1]
    count = int(present.sum())
    rows = torch.argsort((~present).to(torch.uint8), stable=True)[:count]  # present rows first
    return rows, torch.cat((seg.index_select(0, rows), seg[-1:]))


def per_example_weight_grad(
    values: torch.Tensor,
    idx: torch.Tensor,
    x: torch.Tensor,
    n_rows: int,
    dense: bool = False,
    dtype: torch.dtype | None = None,
):
    """Rows of dW touched by a per-example selection, each summed over its examples (in float32).

    Returns ``(rows, grad)``: the distinct selected rows ascending (int64) and their gradient
    (len(rows) x M); with ``dense=True``, ``(None, grad)`` with the whole n_rows x M gradient,
    zero where nothing was selected. The entries are ordered by row on the device (a stable sort,
    segment bounds by binary search) and one program sums each row's segment in a fixed order:
    deterministic, no atomics. ``dense=True`` reads nothing on the host (no sync on a GPU, so a
    step can be captured in a CUDA graph); the row-sparse result reads the number of distinct
    rows once, since it sizes the result. The gradient in ``dtype`` (default ``values``'s).
    """
    check_dtypes("per_example_weight_grad", values=values, x=x, dtype=dtype)
    check_indices("per_example_weight_grad", idx=idx)
    B, K = values.shape
    M = x.shape[1]
    order, seg = _row_segments(idx, n_rows)
    rows = None
    if not dense:
        rows, seg = _distinct_rows(seg)
    n_out = seg.numel() - 1
    target = torch.empty((n_out, M), dtype=dtype or values.dtype, device=x.device)
    if n_out > 0 and M > 0:
        examples = order // K
        ordered_values = values.reshape(-1)[order]
        segment_rows[lambda meta: (n_out, triton.cdiv(M, meta["BLOCK_M"]))](
            seg,
            examples,
            ordered_values,
            x,
            target,
            M,
            x.stride(0),
            x.stride(1),
            target.stride(0),
            target.stride(1),
        )
    return rows, target
