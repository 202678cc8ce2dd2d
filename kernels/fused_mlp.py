"""Inference kernels for compacted models.

- ``linear_act``: ``y = act(x @ W.T + b)``, the bias and the activation applied in the GEMM's
  epilogue (one pass over ``y``).
- ``fused_mlp``: a whole narrow MLP in one kernel. Each program takes ``BLOCK_B`` rows of ``x``,
  computes the first layer by a K loop over the input width, then keeps the hidden activations
  in registers through every later layer and writes only the last layer's output. The later
  layers' weights are packed, zero-padded to ``WIDTH x WIDTH`` (a power of two up to 256), so
  padded units contribute nothing whatever their activation; they are read in ``BLOCK_N``-unit
  chunks (two layers at a time, see the kernel), so no WIDTH x WIDTH tile sits in registers.

Activations: "identity", "relu", "tanh", "sigmoid", "gelu" (the exact, erf form; erf to 1.5e-7).
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
        # x * Phi(x), erfc by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7): branch-free, where
        # libdevice's erf made ptxas spill registers in the fused MLP's loops.
        z = tl.abs(x) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.3275911 * z)
        poly = t * (
            0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
        )
        tail = 0.5 * poly * tl.exp(-z * z)  # Phi(-|x|)
        y = x * tl.where(x < 0, tail, 1.0 - tail)
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
    BLOCK_N: tl.constexpr,
):
    """y = f_L(... f_2(f_1(x))): layer 1 is w_first (H_FIRST x K); layers 2..L are the packed
    w_rest (NUM_REST x WIDTH x WIDTH, contiguous) and b_rest (NUM_REST x WIDTH).

    The packed layers go by pairs, their weights by BLOCK_N-unit chunks: chunk j of the first
    layer's output, act(h @ W_a[j].T + b_a[j]), is at once the j-th slice of the second layer's
    input, so acc += chunk @ W_b[:, j].T; no weight tile larger than WIDTH x BLOCK_N is loaded.
    An odd last layer writes its output chunk by chunk."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    units = tl.arange(0, WIDTH)
    chunk = tl.arange(0, BLOCK_N)
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
    h = _activate(acc, HIDDEN_ACTIVATION).to(w_rest_ptr.dtype.element_ty)
    for pair in tl.static_range(NUM_REST // 2):
        w_a = w_rest_ptr + 2 * pair * WIDTH * WIDTH
        w_b = w_a + WIDTH * WIDTH
        acc = tl.zeros([BLOCK_B, WIDTH], dtype=tl.float32)
        for n in range(0, WIDTH, BLOCK_N):
            # Inputs x outputs n..n+BLOCK_N of layer a (W_a read transposed).
            w_t = tl.load(w_a + (n + chunk)[None, :] * WIDTH + units[:, None])
            bias = tl.load(b_rest_ptr + 2 * pair * WIDTH + n + chunk).to(tl.float32)
            part = tl.dot(h, w_t, input_precision=INPUT_PRECISION) + bias[None, :]
            part = _activate(part, HIDDEN_ACTIVATION).to(h.dtype)
            # Inputs n..n+BLOCK_N x all outputs of layer b.
            w_t = tl.load(w_b + units[None, :] * WIDTH + (n + chunk)[:, None])
            acc = tl.dot(part, w_t, acc, input_precision=INPUT_PRECISION)
        acc += tl.load(b_rest_ptr + (2 * pair + 1) * WIDTH + units).to(tl.float32)[None, :]
        if 2 * pair + 2 == NUM_REST:
            h = _activate(acc, OUTPUT_ACTIVATION)
        else:
            h = _activate(acc, HIDDEN_ACTIVATION).to(h.dtype)
    y_rows = y_ptr + offs_b[:, None].to(tl.int64) * stride_yb
    if NUM_REST % 2 == 1:
        w_last = w_rest_ptr + (NUM_REST - 1) * WIDTH * WIDTH
        for n in range(0, N_OUT, BLOCK_N):
            w_t = tl.load(w_last + (n + chunk)[None, :] * WIDTH + units[:, None])
            bias = tl.load(b_rest_ptr + (NUM_REST - 1) * WIDTH + n + chunk).to(tl.float32)
            out = tl.dot(h, w_t, input_precision=INPUT_PRECISION) + bias[None, :]
            out = _activate(out, OUTPUT_ACTIVATION)
            tl.store(
                y_rows + (n + chunk)[None, :] * stride_yn,
                out.to(y_ptr.dtype.element_ty),
                mask=mask_b[:, None] & (n + chunk < N_OUT)[None, :],
            )
    else:
        tl.store(
            y_rows + units[None, :] * stride_yn,
            h.to(y_ptr.dtype.element_ty),
            mask=mask_b[:, None] & (units < N_OUT)[None, :],
        )


def _fma_dots(dtype: torch.dtype) -> bool:
    """Whether tl.dot runs as FMAs (fp32 without TF32), its operands' rows and columns held in
    each thread's registers, rather than on tensor cores."""
    return dtype == torch.float32 and input_precision(dtype) == "ieee"


# The K tile FMA dots take without spilling on sm_90 and sm_80 (ptxas -v, perf/static_report.py).
FMA_MAX_BLOCK_K = 32


def _prune_linear(configs, named_args):
    elem = named_args["x_ptr"].element_size()
    fma = _fma_dots(named_args["x_ptr"].dtype)
    fitting = [
        c
        for c in configs
        if (c.kwargs["BLOCK_B"] + c.kwargs["BLOCK_N"])
        * c.kwargs["BLOCK_K"]
        * elem
        * max(c.num_stages - 1, 1)
        <= SMEM_LIMIT
        and c.kwargs["BLOCK_N"] <= max(pow2_bucket(named_args["N"]), 32)
        and not (fma and c.kwargs["BLOCK_K"] > FMA_MAX_BLOCK_K)
    ]
    return fitting or configs[-1:]


def fused_smem_bytes(
    width: int, elem: int, block_b: int, block_k: int, block_n: int, stages: int
) -> int:
    """Shared memory the fused MLP needs (an upper estimate), by the larger of its two phases: the
    first layer's x and weight tiles per stage; the later layers' two weight chunks per stage
    next to the hidden tile."""
    first = (block_b + width) * block_k * elem * stages
    rest = (2 * width * block_n * stages + block_b * width) * elem
    return max(first, rest)


# Registers: how much of the hidden tile's fp32 accumulator a thread may hold and still compile
# without spilling on sm_90 and sm_80 under Triton 3.6 and 3.9 (ptxas -v, perf/static_report.py).
# With 4 warps a thread holds twice the share of the operand and chunk tiles as well; with FMA
# dots, its rows and columns of both operands.
MMA_ACCUMULATORS_PER_THREAD = {4: 32, 8: 64}
FMA_ACCUMULATORS_PER_THREAD = 32
FMA_MAX_BLOCK_N = 16
FMA_MAX_FIRST_TILE = 32 * 128  # BLOCK_K x WIDTH of the first layer's weight tile


def fused_config_fits(config, width: int, dtype: torch.dtype) -> bool:
    """Whether a config of the fused MLP fits ``width`` in ``dtype``: shared memory, and the
    register budget above (so that no config the tuner may pick spills)."""
    block_b, block_k, block_n = (config.kwargs[n] for n in ("BLOCK_B", "BLOCK_K", "BLOCK_N"))
    elem = torch.empty((), dtype=dtype).element_size()
    if block_n > width or (
        fused_smem_bytes(width, elem, block_b, block_k, block_n, config.num_stages) > SMEM_LIMIT
    ):
        return False
    accumulators = block_b * width // (32 * config.num_warps)
    if _fma_dots(dtype):
        return (
            any(config is c for c in FMA_CONFIGS)
            and accumulators <= FMA_ACCUMULATORS_PER_THREAD
            and block_n <= FMA_MAX_BLOCK_N
            and block_k <= FMA_MAX_BLOCK_K
            and block_k * width <= FMA_MAX_FIRST_TILE
        )
    return any(config is c for c in MMA_CONFIGS) and accumulators <= (
        MMA_ACCUMULATORS_PER_THREAD.get(config.num_warps, 0)
    )


def _prune_fused(configs, named_args):
    width = named_args["w_rest_ptr"].shape[-1]  # WIDTH: constexprs are not among the tuner's args
    fitting = [c for c in configs if fused_config_fits(c, width, named_args["x_ptr"].dtype)]
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


def _fused_configs(shapes):
    return tuple(
        triton.Config({"BLOCK_B": bb, "BLOCK_K": bk, "BLOCK_N": bn}, num_stages=s, num_warps=w)
        for bb, bk, bn, s, w in shapes
    )


# Two groups of configs: tiles for tensor cores (16-bit, TF32), and small ones for FMA dots
# (fp32 without TF32). The pruner keeps those of the dots' group that fit the width and dtype.
# (Small tiles also compile to tensor-core dots, but ptxas spilled 8 bytes in some of them.)
MMA_CONFIGS = _fused_configs(
    (
        (128, 64, 32, 3, 8),
        (64, 64, 32, 3, 8),
        (64, 32, 16, 2, 8),
        (64, 64, 64, 3, 4),
        (64, 64, 16, 3, 4),
    )
)
FMA_CONFIGS = _fused_configs(
    (
        (32, 32, 16, 3, 4),
        (64, 16, 16, 3, 4),
        (16, 32, 16, 2, 4),
        (16, 16, 16, 3, 4),
    )
)
fused_mlp_kernel = TunedKernel(
    _fused_mlp_kernel,
    MMA_CONFIGS + FMA_CONFIGS,
    key=["K", "H_FIRST", "N_OUT", "NUM_REST", "WIDTH", "INPUT_PRECISION"],
    prune=_prune_fused,
)


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
    return _fits_width(fused_width(out_widths), dtype)


def _fits_width(width: int, dtype: torch.dtype) -> bool:
    return any(fused_config_fits(c, width, dtype) for c in fused_mlp_kernel.configs)


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
    if not (
        rest_weight.shape[2] == width
        and 16 <= width <= MAX_FUSED_WIDTH
        and width & (width - 1) == 0
        and _fits_width(width, x.dtype)
    ):
        raise ValueError(
            f"fused_mlp: packed {tuple(rest_weight.shape)} is not a square power-of-two width "
            f"in 16..{MAX_FUSED_WIDTH} that fits the kernel in {x.dtype} (see pack_layers)"
        )
    y = torch.empty((B, out_features), dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    fused_mlp_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
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
