"""meProp for one linear layer: dense forward, top-k sparsified backward."""

import numbers
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from . import library
from .library import OPS

MODES = ("unified", "per_example")
GRADS = ("dense", "sparse")


def resolve_k(k: int | float, width: int, layer: str = "layer") -> int:
    """The number of kept gradient entries for a layer of ``width`` outputs.

    ``k`` is an int in [1, width] or a float ratio in (0, 1] of the width (rounded, at least 1).
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(
            f"k must be an int count or a float ratio, got {type(k).__name__} {k!r} "
            f"for {layer} of width {width}"
        )
    if isinstance(k, numbers.Integral):
        if not 1 <= k <= width:
            raise ValueError(f"k={k} is outside [1, {width}] for {layer} of width {width}")
        return int(k)
    if not (0.0 < k <= 1.0):  # also rejects NaN
        raise ValueError(f"k={k} as a ratio must be in (0, 1] (for {layer} of width {width})")
    if width < 1:
        raise ValueError(f"k={k} cannot select from {layer} of width {width}")
    return min(width, max(1, round(k * width)))


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_options(mode: str, grad: str) -> None:
    check_mode(mode)
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")


# weight -> the object that runs its layer's backward across a process group: global selection and
# reduced weight gradients (registered by triton_mebp.distributed; see docs/distributed.md).
distributed_backward = WeakIdKeyDictionary()
DISTRIBUTED_MARK = "_mebp_distributed"  # set on those weights too: torch.compile sees it

_zeroed_grad_buffer = library.zeroed_grad_buffer


# weight.data_ptr() -> (values, indices pointers, rows) of the row-sparse gradient last returned
_fresh_row_grads: dict[int, tuple] = {}


def _row_sparse(rows_idx, rows, shape, weight=None):
    """A row-sparse gradient from distinct, ascending row indices; remembered for ``weight``."""
    grad = torch.sparse_coo_tensor(
        rows_idx.long().unsqueeze(0), rows, shape, is_coalesced=True, check_invariants=False
    )
    if weight is not None and not torch.compiler.is_compiling():
        try:
            _fresh_row_grads[weight.data_ptr()] = _identity(grad)
        except RuntimeError:  # traced (fake) tensors have no memory: nothing to remember
            pass
    return grad


def _identity(grad):
    return grad._values().data_ptr(), grad._indices().data_ptr(), grad._nnz()


def _keep_rows_coalesced(param):
    """After autograd stored a row-sparse gradient in ``param.grad``: autograd's copy drops the
    "coalesced" flag, so every optimizer step would sort the rows again (on a GPU, with a host
    sync). When ``param.grad`` is exactly the gradient returned by the backward (the same memory,
    not a sum of several backward passes) the flag is put back."""
    fresh = _fresh_row_grads.pop(param.data_ptr(), None)
    grad = param.grad
    if (
        fresh is not None
        and grad is not None
        and grad.is_sparse
        and not grad.is_coalesced()
        and fresh == _identity(grad)
    ):
        param.grad = torch.sparse_coo_tensor(
            grad._indices(), grad._values(), grad.shape, is_coalesced=True, check_invariants=False
        )


def _watch_row_sparse_grads(weight) -> None:
    if (
        weight.requires_grad
        and weight.is_leaf
        and not getattr(weight, "_mebp_keeps_rows_coalesced", False)
    ):
        weight.register_post_accumulate_grad_hook(_keep_rows_coalesced)
        weight._mebp_keeps_rows_coalesced = True


def _dense_backward(dy, x, weight, ctx):
    """k = width: ordinary back propagation (every neuron selected), under autocast as the dense
    layer's: products in ``dy``'s dtype, dW rounded to it, then cast to the weight's."""
    if ctx.hits is not None:
        OPS.count_examples.default(ctx.hits, dy)
    dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        dw = (dy.t() @ x.to(dy.dtype)).to(weight.dtype)
        if ctx.grad == "sparse":
            dw = _row_sparse(
                torch.arange(weight.shape[0], device=dw.device), dw, weight.shape, weight
            )
    return dx, dw, dy.sum(0)


def _unified_backward(dy, x, weight, ctx):
    # The bias gradient comes out of the selection's pass over dy (one read of dy, not two).
    idx, dy_c, db = OPS.unified_select_and_bias.default(dy, ctx.k, ctx.hits)
    dx = OPS.gathered_input_grad.default(dy_c, weight, idx) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        if ctx.grad == "dense":
            dw = OPS.gathered_weight_grad_dense.default(dy_c, x, idx, weight)
        else:
            rows = OPS.gathered_weight_grad.default(dy_c, x, idx, weight.dtype)
            dw = _row_sparse(idx, rows, weight.shape, weight)
    if ctx.sparse_bias:
        db = dy.new_zeros(weight.shape[0]).index_copy_(0, idx.long(), dy_c.sum(0))
    return dx, dw, db


def _per_example_backward(dy, x, weight, ctx):
    values, idx = OPS.per_example_select.default(dy, ctx.k, ctx.hits)
    dw: torch.Tensor | None
    if x.shape[1] == 0:  # in_features = 0: nothing to gather (embedding_bag rejects empty rows)
        dx, dw = x.new_zeros(x.shape), torch.zeros_like(weight)
        dw = dw.to_sparse() if ctx.grad == "sparse" else dw
        return dx, dw, _per_example_bias_grad(dy, values, idx, weight, ctx)
    if ctx.masked_dense:
        return _masked_dense_backward(dy, values, idx, x, weight, ctx)
    dx = (
        OPS.per_example_input_grad.default(values, idx, weight) if ctx.needs_input_grad[0] else None
    )
    dw = None
    if ctx.needs_input_grad[1]:
        n_rows, dtype = weight.shape[0], weight.dtype
        if ctx.grad == "dense":
            dw = OPS.per_example_weight_grad_dense.default(values, idx, x, n_rows, dtype)
        else:
            rows, grad_rows = OPS.per_example_weight_grad.default(values, idx, x, n_rows, dtype)
            dw = _row_sparse(rows, grad_rows, weight.shape, weight)
    return dx, dw, _per_example_bias_grad(dy, values, idx, weight, ctx)


def _masked_dense_backward(dy, values, idx, x, weight, ctx):
    """Per-example meProp's gradient by dense products (cuBLAS on a GPU): the kept entries
    scattered into a zeroed B x N gradient, then ``dx = dy_m W`` and ``dW = dy_mᵀ x``. The
    per-example products stream a row of W and of x per kept entry, so on a GPU these GEMMs
    win above a small k (``estimate.masked_dense_is_faster``). Under autocast as the dense
    layer's: GEMMs in ``dy``'s dtype, dW rounded to it, then cast to the weight's."""
    kept = torch.zeros_like(dy).scatter_(1, idx, values)
    dx = kept @ weight.to(kept.dtype) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        dw = (kept.t() @ x.to(kept.dtype)).to(weight.dtype)
        if ctx.grad == "sparse":
            rows = OPS.selected_rows.default(idx, weight.shape[0])
            dw = _row_sparse(rows, dw.index_select(0, rows), weight.shape, weight)
    return dx, dw, _per_example_bias_grad(dy, values, idx, weight, ctx)


def _per_example_bias_grad(dy, values, idx, weight, ctx):
    if ctx.sparse_bias:
        return dy.new_zeros(weight.shape[0]).index_add_(
            0, idx.reshape(-1).long(), values.reshape(-1)
        )
    return dy.sum(0)


def _backward(ctx, grad_output, x, weight, hits, refs):
    """Keeps the top-k entries of ``dy`` by magnitude (dense back propagation when k = width)."""
    ctx.hits, ctx.refs = hits, refs
    n_out, n_in = weight.shape
    # Under autocast (ctx.compute_dtype) the selection and the products run in the autocast
    # dtype, as the dense backward's: dy in that dtype; x and the gathered rows of W cast to it
    # inside the products (never a copy of the whole weight); float32 accumulation. dx comes out
    # in the autocast dtype (autograd casts it to x's), dW and db in the weight's dtype. Without
    # autocast everything runs in the weight's dtype.
    if ctx.compute_dtype is None:
        dy = grad_output.reshape(-1, n_out).to(weight.dtype)
        x2 = x.reshape(dy.shape[0], n_in).to(weight.dtype)
    else:
        dy = grad_output.reshape(-1, n_out).to(ctx.compute_dtype)
        x2 = x.reshape(dy.shape[0], n_in)
    if refs is not None:
        OPS.count_examples.default(refs, dy)
    sync = distributed_backward.get(weight)
    if sync is not None:
        dx, dw, db = sync.backward(dy, x2, weight, ctx)
    elif dy.shape[0] == 0:
        dx, dw, db = dy.new_zeros(0, n_in), torch.zeros_like(weight), dy.new_zeros(n_out)
        if ctx.grad == "sparse":
            dw = dw.to_sparse()
    elif ctx.k == n_out:
        dx, dw, db = _dense_backward(dy, x2, weight, ctx)
    else:
        step = _unified_backward if ctx.mode == "unified" else _per_example_backward
        dx, dw, db = step(dy, x2, weight, ctx)
    dx = dx.reshape(x.shape) if dx is not None else None
    db = db if ctx.has_bias and ctx.needs_input_grad[2] else None
    if db is not None and db.shape != ctx.bias_shape:  # a bias F.linear broadcasts
        db = (
            db.reshape(ctx.bias_shape)
            if db.numel() == ctx.bias_shape.numel()
            else grad_output.sum_to_size(ctx.bias_shape)
        )
    db = db.to(ctx.bias_dtype) if db is not None else None
    return dx, dw, db


def _forward(x, weight, bias, compute_dtype):
    if compute_dtype is not None:
        x, weight = x.to(compute_dtype), weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    return F.linear(x, weight, bias)


def _remember(
    ctx, x, weight, bias, k, mode, grad, sparse_bias, hits, refs, masked_dense, compute_dtype
):
    ctx.save_for_backward(x, weight, hits, refs)
    ctx.k, ctx.mode, ctx.grad, ctx.sparse_bias = k, mode, grad, sparse_bias
    ctx.masked_dense, ctx.compute_dtype = masked_dense, compute_dtype
    ctx.has_bias = bias is not None
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.bias_dtype = None if bias is None else bias.dtype


class MebpLinearFunction(torch.autograd.Function):
    """``y = x W^T + b``; backward keeps the top-k entries of ``dy`` by magnitude (eager mode)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, k, mode, grad, sparse_bias, hits, refs, masked_dense, compute_dtype
    ):
        _remember(
            ctx,
            x,
            weight,
            bias,
            k,
            mode,
            grad,
            sparse_bias,
            hits,
            refs,
            masked_dense,
            compute_dtype,
        )
        return _forward(x, weight, bias, compute_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return (*_backward(ctx, grad_output, *ctx.saved_tensors), *_NO_GRADS)


_NO_GRADS = (None,) * 8  # k, mode, grad, sparse_bias, hits, refs, masked_dense, compute_dtype


# The same layer as one operator for torch.compile and torch.export: its backward (the same
# function) is traced by AOTAutograd, which, unlike Dynamo, accepts row-sparse gradients.
library.define(
    "linear(Tensor x, Tensor weight, Tensor? bias, SymInt k, str mode, str grad, bool sparse_bias, "
    "Tensor? hits, Tensor? refs, bool masked_dense, ScalarType? compute_dtype) -> Tensor",
    lambda x, weight, bias, k, mode, grad, sparse_bias, hits, refs, masked_dense, compute_dtype: (
        _forward(x, weight, bias, compute_dtype)
    ),
)


def _setup_linear(ctx, inputs, output):
    _remember(ctx, *inputs)


def _linear_backward(ctx, grad_output):
    return (*_backward(ctx, grad_output, *ctx.saved_tensors), *_NO_GRADS)


torch.library.register_autograd(
    f"{library.NAMESPACE}::linear", _linear_backward, setup_context=_setup_linear, lib=library.LIB
)


def mebp_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int | float,
    mode: str = "unified",
    grad: str = "dense",
    sparse_bias: bool = False,
    hits: torch.Tensor | None = None,
    refs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` with minimal-effort back propagation.

    Forward is the ordinary dense linear. Backward keeps the ``k`` largest-magnitude entries of
    ``dy = dL/dy`` (``mode="unified"``: one column set for the batch, scored by ``sum_b |dy|``;
    ``"per_example"``: a top-k per row) and computes ``dx`` and ``dW`` from those alone. ``dW``
    is dense with zero rows outside the selection (``grad="dense"``) or a row-sparse
    ``torch.sparse_coo`` tensor of the selected rows (``grad="sparse"``). The bias gradient is
    dense unless ``sparse_bias=True``. ``hits`` (int64, out_features) and ``refs`` (int64 scalar),
    if given, are counters updated in place by each backward: selections per neuron, examples seen.
    """
    return _mebp_linear(
        input, weight, bias, k, mode, grad, sparse_bias, hits, refs, False, stacklevel=3
    )


def _mebp_linear(
    input, weight, bias, k, mode, grad, sparse_bias, hits, refs, masked_dense, stacklevel=2
):
    """``mebp_linear``, and with ``masked_dense=True`` per-example mode's gradient by dense
    products on the masked ``dy`` (``_masked_dense_backward``), which ``MeLinear(auto=True)``
    chooses where the cost model predicts it faster. ``stacklevel``: where a warning points."""
    check_options(mode, grad)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D tensor (out_features, in_features), got "
            f"{getattr(weight, 'shape', type(weight).__name__)}"
        )
    n_out = weight.shape[0]
    k = resolve_k(k, n_out)
    for name, counter, shape in (("hits", hits, (n_out,)), ("refs", refs, ())):
        if counter is not None and not isinstance(counter, torch.Tensor):
            raise TypeError(
                f"{name} must be an int64 tensor of shape {shape} on {weight.device}, "
                f"got {type(counter).__name__}"
            )
        if counter is not None and (
            counter.dtype != torch.int64
            or tuple(counter.shape) != shape
            or counter.device != weight.device
        ):
            raise ValueError(
                f"{name} must be an int64 tensor of shape {shape} on {weight.device}, "
                f"got {counter.dtype} {tuple(counter.shape)} on {counter.device}"
            )
    if grad == "sparse" and weight.layout != torch.strided:
        raise ValueError("grad='sparse' needs a dense (strided) weight")
    if grad == "sparse" and weight.grad_fn is not None:
        # A weight computed in the graph (W.t(), W.half(), a tied weight) passes its gradient on
        # to ops that do not take sparse gradients.
        warnings.warn(
            "grad='sparse' needs a leaf weight (a Parameter); this weight is computed "
            "in the graph, so its gradient is dense",
            stacklevel=stacklevel,
        )
        grad = "dense"
    if not torch.is_grad_enabled():
        return F.linear(input, weight, bias)
    if type(weight).__name__ == "DTensor":
        raise TypeError(
            "mebp_linear's backward does not support tensor parallelism: the weight "
            "is a DTensor; leave this layer dense (convert(..., exclude=[name]))"
        )
    compute_dtype = None
    if torch.is_autocast_enabled(input.device.type):
        compute_dtype = torch.get_autocast_dtype(input.device.type)
    args = (
        input,
        weight,
        bias,
        k,
        mode,
        grad,
        sparse_bias,
        hits,
        refs,
        masked_dense,
        compute_dtype,
    )
    if torch.compiler.is_compiling():
        if getattr(weight, DISTRIBUTED_MARK, False):
            return _linear_outside_graph(*args)
        return OPS.linear.default(*args)
    if grad == "sparse":
        _watch_row_sparse_grads(weight)
    return MebpLinearFunction.apply(*args)


@torch.compiler.disable
def _linear_outside_graph(*args):
    """A layer whose backward runs collectives (``distributed_backward`` looks its weight up, which
    a traced backward's fake tensors would miss): kept out of compiled graphs, backward eager."""
    return MebpLinearFunction.apply(*args)
