"""Inference kernels for compacted models.

- ``linear_act``: ``y = act(x @ W.T + b)``, the bias and the activation applied in the GEMM's
  epilogue (one pass over ``y``).
- ``fused_mlp``: a whole narrow MLP in one kernel. Each program takes ``BLOCK_B`` rows of ``x``,
  computes the first layer by a K loop over the input width, then keeps the hidden activations
  in registers through every later layer and writes only the last layer's output. The later
  layers' weights are packed, zero-padded to ``WIDTH x WIDTH`` (a power of two), so padded units
  contribute nothing whatever their activation. Widths up to 128 in any dtype, 256 with 16-bit
  weights (a separate config space, `fused_mlp_wide_kernel`, sized for its shared memory).

Activations: "identity", "relu", "tanh", "sigmoid", "gelu" (the exact, erf form).
"""

import torch
import triton
import triton.language as tl

from ._checks import check_dtypes
from ._tiles import grouped_tile
from ._tuning import SMEM_LIMIT, TunedKernel, input_precision, pow2_bucket

ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "gelu")
MAX_FUSED_WIDTH = 256


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == "tanh":
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    elif ACTIVATION == "sigmoid":
        y = tl.sigmoid(x)
    elif ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        y = x
    return y


@triton.jit
def _linear_act_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    B,
    N,
    K,
    B_BUCKET,
    stride_xb,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_bn,
    stride_yb,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_B: tl.constexpr,
):
    """y[B, N] = act(x[B, K] @ w[N, K].T + b[N])."""
    pid_b, pid_n = grouped_tile(tl.program_id(0), B, N, BLOCK_B, BLOCK_N, GROUP_B)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_b = offs_b < B
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_b[:, None].to(tl.int64) * stride_xb + offs_k[None, :] * stride_xk,
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk,
            mask=mask_n[None, :] & mask_k[:, None],
            other=0.0,
        )
        acc = tl.dot(x, w_t.to(x.dtype), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = _activate(acc, ACTIVATION)
    y_ptrs = y_ptr + offs_b[:, None].to(tl.int64) * stride_yb + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


@triton.jit
def _fused_mlp_kernel(
    x_ptr,
    w_first_ptr,
    b_first_ptr,
    w_rest_ptr,
    b_rest_ptr,
    y_ptr,
    B,
    K,
    H_FIRST,
    N_OUT,
    stride_xb,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_bn,
    stride_yb,
    stride_yn,
    NUM_REST: tl.constexpr,
    WIDTH: tl.constexpr,
    HIDDEN_ACTIVATION: tl.constexpr,
    OUTPUT_ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = f_L(... f_2(f_1(x))): layer 1 is w_first (H_FIRST x K); layers 2..L are the packed
    w_rest (NUM_REST x WIDTH x WIDTH, contiguous) and b_rest (NUM_REST x WIDTH)."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    units = tl.arange(0, WIDTH)
    mask_first = units < H_FIRST
    acc = tl.zeros([BLOCK_B, WIDTH], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_b[:, None].to(tl.int64) * stride_xb + offs_k[None, :] * stride_xk,
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_t = tl.load(
            w_first_ptr + units[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=mask_first[None, :] & mask_k[:, None],
            other=0.0,
        )
        acc = tl.dot(x, w_t.to(x.dtype), acc, input_precision=INPUT_PRECISION)
    acc += tl.load(b_first_ptr + units * stride_bn, mask=mask_first, other=0.0).to(tl.float32)[
        None, :
    ]
    h = _activate(acc, HIDDEN_ACTIVATION)
    for layer in tl.static_range(NUM_REST):
        # w_rest[layer] read transposed: rows are this layer's inputs, columns its outputs.
        w_t = tl.load(w_rest_ptr + layer * WIDTH * WIDTH + units[None, :] * WIDTH + units[:, None])
        bias = tl.load(b_rest_ptr + layer * WIDTH + units).to(tl.float32)
        acc = tl.dot(h.to(w_t.dtype), w_t, input_precision=INPUT_PRECISION) + bias[None, :]
        if layer == NUM_REST - 1:
            h = _activate(acc, OUTPUT_ACTIVATION)
        else:
            h = _activate(acc, HIDDEN_ACTIVATION)
    y_ptrs = y_ptr + offs_b[:, None].to(tl.int64) * stride_yb + units[None, :] * stride_yn
    tl.store(y_ptrs, h.to(y_ptr.dtype.element_ty), mask=mask_b[:, None] & (units < N_OUT)[None, :])


def _prune_linear(configs, named_args):
    elem = named_args["x_ptr"].element_size()
    fitting = [
        c
        for c in configs
        if (c.kwargs["BLOCK_B"] + c.kwargs["BLOCK_N"])
        * c.kwargs["BLOCK_K"]
        * elem
        * max(c.num_stages - 1, 1)
        <= SMEM_LIMIT
        and c.kwargs["BLOCK_N"] <= max(pow2_bucket(named_args["N"]), 32)
    ]
    return fitting or configs[-1:]


def fused_smem_bytes(width: int, elem: int, block_b: int, block_k: int, stages: int) -> int:
    """Shared memory the fused MLP needs, by the larger of its two phases (an estimate)."""
    first = (block_b + width) * block_k * elem * max(stages - 1, 1)
    rest = (width * width + block_b * width) * elem
    return max(first, rest)


def _prune_fused(configs, named_args):
    elem = named_args["x_ptr"].element_size()
    width = named_args["w_rest_ptr"].shape[-1]  # WIDTH: constexprs are not among the tuner's args
    fitting = [
        c
        for c in configs
        if fused_smem_bytes(width, elem, c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.num_stages)
        <= SMEM_LIMIT
        and c.kwargs["BLOCK_B"] * width <= 64 * 256
    ]
    return fitting or configs[-1:]


linear_act_kernel = TunedKernel(
    _linear_act_kernel,
    [
        triton.Config(
            {"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_B": 8}, num_stages=s, num_warps=w
        )
        for bb, bn, bk, s, w in (
            (128, 128, 32, 4, 8),
            (128, 64, 64, 3, 4),
            (64, 64, 32, 4, 4),
            (128, 32, 64, 4, 4),
        )
    ],
    key=["B_BUCKET", "N", "K"],
    prune=_prune_linear,
)
# Two config spaces over the same kernel: up to WIDTH 128, and wider (16-bit weights only).
fused_mlp_kernel = TunedKernel(
    _fused_mlp_kernel,
    [
        triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bb, bk, s, w in ((128, 64, 3, 8), (64, 64, 3, 4), (32, 64, 4, 4), (64, 32, 4, 4))
    ],
    key=["K", "H_FIRST", "N_OUT", "NUM_REST", "WIDTH"],
    prune=_prune_fused,
)
fused_mlp_wide_kernel = TunedKernel(
    _fused_mlp_kernel,
    [
        triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bb, bk, s, w in ((64, 64, 3, 4), (32, 64, 4, 4), (16, 64, 2, 4))
    ],
    key=["K", "H_FIRST", "N_OUT", "NUM_REST", "WIDTH"],
    prune=_prune_fused,
)
NARROW_WIDTH = 128


def _fused_configs(width):
    return (fused_mlp_kernel if width <= NARROW_WIDTH else fused_mlp_wide_kernel).configs


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "identity",
) -> torch.Tensor:
    """``act(x @ weight.T + bias)`` for a 2-D ``x`` (B x K), ``weight`` N x K; any strides."""
    _check_activation(activation)
    check_dtypes("linear_act", x=x, weight=weight, bias=bias)
    B, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or (bias is not None and bias.shape != (N,)):
        raise ValueError(
            f"linear_act: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
            f"{None if bias is None else tuple(bias.shape)} do not match"
        )
    y = torch.empty((B, N), dtype=x.dtype, device=x.device)
    if B == 0 or N == 0:
        return y
    linear_act_kernel[
        lambda meta: (triton.cdiv(B, meta["BLOCK_B"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    ](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        B,
        N,
        K,
        pow2_bucket(B),
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        INPUT_PRECISION=input_precision(x.dtype),
    )
    return y


def fused_width(out_widths) -> int:
    """The padded width of a fused MLP whose layers have ``out_widths`` outputs."""
    return max(16, pow2_bucket(max(out_widths)))


def fused_mlp_fits(out_widths, dtype: torch.dtype) -> bool:
    """Whether an MLP with these layer widths fits the fused kernel in ``dtype``."""
    if len(out_widths) < 2 or max(out_widths) > MAX_FUSED_WIDTH:
        return False
    width = fused_width(out_widths)
    elem = torch.empty((), dtype=dtype).element_size()
    return any(
        fused_smem_bytes(width, elem, c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.num_stages)
        <= SMEM_LIMIT
        and c.kwargs["BLOCK_B"] * width <= 64 * 256
        for c in _fused_configs(width)
    )


def pack_layers(weights, biases, width: int):
    """Layers 2..L zero-padded into ``(NUM_REST x width x width, NUM_REST x width)`` tensors."""
    first = weights[0]
    packed_w = first.new_zeros((len(weights), width, width))
    packed_b = first.new_zeros((len(weights), width))
    for i, (w, b) in enumerate(zip(weights, biases)):
        packed_w[i, : w.shape[0], : w.shape[1]] = w
        if b is not None:
            packed_b[i, : b.shape[0]] = b
    return packed_w, packed_b


def fused_mlp(
    x: torch.Tensor,
    first_weight: torch.Tensor,
    first_bias: torch.Tensor,
    rest_weight: torch.Tensor,
    rest_bias: torch.Tensor,
    out_features: int,
    hidden_activation: str = "relu",
    output_activation: str = "identity",
) -> torch.Tensor:
    """A whole MLP in one kernel: ``x`` (B x K) through ``first_weight`` (H x K, with
    ``first_bias`` of H) and the packed later layers of ``pack_layers``; returns B x out_features."""
    _check_activation(hidden_activation)
    _check_activation(output_activation)
    check_dtypes(
        "fused_mlp",
        x=x,
        first_weight=first_weight,
        first_bias=first_bias,
        rest_weight=rest_weight,
        rest_bias=rest_bias,
    )
    B, K = x.shape
    num_rest, width, _ = rest_weight.shape
    H = first_weight.shape[0]
    if (
        first_weight.shape[1] != K
        or H > width
        or out_features > width
        or not rest_weight.is_contiguous()
        or not rest_bias.is_contiguous()
        or first_bias.shape != (H,)
    ):
        raise ValueError(
            f"fused_mlp: x {tuple(x.shape)}, first weight {tuple(first_weight.shape)}, "
            f"packed {tuple(rest_weight.shape)} and out_features {out_features} do not match"
        )
    y = torch.empty((B, out_features), dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    kernel = fused_mlp_kernel if width <= NARROW_WIDTH else fused_mlp_wide_kernel
    kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
        x,
        first_weight,
        first_bias,
        rest_weight,
        rest_bias,
        y,
        B,
        K,
        H,
        out_features,
        x.stride(0),
        x.stride(1),
        first_weight.stride(0),
        first_weight.stride(1),
        first_bias.stride(0),
        y.stride(0),
        y.stride(1),
        NUM_REST=num_rest,
        WIDTH=width,
        HIDDEN_ACTIVATION=hidden_activation,
        OUTPUT_ACTIVATION=output_activation,
        INPUT_PRECISION=input_precision(x.dtype),
    )
    return y
