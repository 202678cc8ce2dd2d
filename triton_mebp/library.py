"""meProp's operations as PyTorch custom operators: ``torch.ops.triton_mebp.*``.

Each operator calls the backend operation of the same name (``backend.ops_for``: Triton kernels
for CUDA tensors, PyTorch ops for CPU tensors) and has a fake implementation, so Dynamo,
AOTAutograd and Inductor see a meProp backward as opaque calls with known output shapes and
``torch.compile(model, fullgraph=True)`` captures whole training steps. ``mebp_linear`` and
``MeLSTM`` call these operators in their backward, compiled or not.

The operators are defined with ``torch.library.Library`` rather than ``custom_op``: calling an
overload (``OPS.unified_select.default``) then costs about as much as calling the backend
function itself, where ``custom_op``'s Python wrapper adds about 100 us per call (2-core CPU),
which small layers would feel in eager mode. Schemas mark the in-place arguments (``(a!)``):
the hit counters, and the parameter and state of a row-sparse optimizer update. Every operation
of the backend contract (``backend.Backend``) has an operator of the same name; ``ops`` offers
the backward ones under the contract's signatures.
"""

import types
import weakref

import torch

from . import backend, torch_ops

NAMESPACE = "triton_mebp"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_DEVICES = ("CPU", "CUDA")


def _ops(tensor, width=1, others=()):
    """The backend for ``tensor``; the PyTorch ops for products of no columns (the kernels need
    at least one) and where another operand or the output (``others``: tensors or dtypes, None
    for none) has a dtype the kernels do not compute (a float64 weight under autocast)."""
    for other in others:
        dtype = other.dtype if isinstance(other, torch.Tensor) else other
        if dtype is not None and dtype not in backend.KERNEL_DTYPES:
            return torch_ops
    return backend.ops_for(tensor) if width else torch_ops


def define(schema, impl, fake=None):
    """Defines ``triton_mebp::NAME`` with ``impl`` for CPU and CUDA tensors and ``fake`` (default:
    ``impl`` itself, for operators made of PyTorch ops alone) for tracing."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    for device in _DEVICES:
        LIB.impl(name, impl, device)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake or impl, lib=LIB)


# ---- selection and hit counting ----


def _unified_select(dy, k, hits=None):
    return backend.ops_for(dy).unified_select(dy, k, hits)


def _selected_columns_fake(dy, k):
    """``dy_c`` laid out as the backend returns it: the Triton kernels (v2) hand out the
    ``[:, :k]`` view of rows zero-padded to a multiple of 64 columns."""
    if backend.ops_for(dy) is not torch_ops:
        from .kernels._tiles import PAD_COLUMNS
        from .kernels._tuning import kernel_version

        if kernel_version() == "v2":
            return dy.new_empty(dy.shape[0], -(-k // PAD_COLUMNS) * PAD_COLUMNS)[:, :k]
    return dy.new_empty(dy.shape[0], k)


def _unified_select_fake(dy, k, hits=None):
    return dy.new_empty(k, dtype=torch.int64), _selected_columns_fake(dy, k)


define(
    "unified_select(Tensor dy, SymInt k, Tensor(a!)? hits=None) -> (Tensor, Tensor)",
    _unified_select,
    _unified_select_fake,
)


def _unified_select_and_bias(dy, k, hits=None):
    return backend.ops_for(dy).unified_select_and_bias(dy, k, hits)


def _unified_select_and_bias_fake(dy, k, hits=None):
    return (*_unified_select_fake(dy, k, hits), dy.new_empty(dy.shape[1]))


define(
    "unified_select_and_bias(Tensor dy, SymInt k, Tensor(a!)? hits=None) "
    "-> (Tensor, Tensor, Tensor)",
    _unified_select_and_bias,
    _unified_select_and_bias_fake,
)


def _per_example_select(dy, k, hits=None):
    return backend.ops_for(dy).per_example_select(dy, k, hits)


def _per_example_select_fake(dy, k, hits=None):
    B = dy.shape[0]
    return dy.new_empty(B, k), dy.new_empty(B, k, dtype=torch.int64)


define(
    "per_example_select(Tensor dy, SymInt k, Tensor(a!)? hits=None) -> (Tensor, Tensor)",
    _per_example_select,
    _per_example_select_fake,
)


def _count_examples(counter, dy):
    counter.add_(dy.shape[0])


def _nothing(*args, **kwargs):
    return None


define("count_examples(Tensor(a!) counter, Tensor dy) -> ()", _count_examples, _nothing)


# ---- gathered products (unified selection) ----


def _gathered_input_grad(dy_c, weight, idx):
    return _ops(dy_c, weight.shape[1], (weight,)).gathered_input_grad(dy_c, weight, idx)


def _gathered_input_grad_fake(dy_c, weight, idx):
    return dy_c.new_empty(dy_c.shape[0], weight.shape[1])


define(
    "gathered_input_grad(Tensor dy_c, Tensor weight, Tensor idx) -> Tensor",
    _gathered_input_grad,
    _gathered_input_grad_fake,
)


def _gathered_weight_grad(dy_c, x, idx, dtype=None):
    return _ops(dy_c, x.shape[1], (x, dtype)).gathered_weight_grad(dy_c, x, idx, dtype=dtype)


def _gathered_weight_grad_fake(dy_c, x, idx, dtype=None):
    return dy_c.new_empty(dy_c.shape[1], x.shape[1], dtype=dtype or dy_c.dtype)


define(
    "gathered_weight_grad(Tensor dy_c, Tensor x, Tensor idx, ScalarType? dtype=None) -> Tensor",
    _gathered_weight_grad,
    _gathered_weight_grad_fake,
)


def _gathered_weight_grad_dense(dy_c, x, idx, weight):
    out = zeroed_grad_buffer(weight, weight.dtype)
    return _ops(dy_c, x.shape[1], (x, out)).gathered_weight_grad(dy_c, x, idx, out=out)


def _gathered_weight_grad_dense_fake(dy_c, x, idx, weight):
    return weight.new_empty(weight.shape[0], x.shape[1])


define(
    "gathered_weight_grad_dense(Tensor dy_c, Tensor x, Tensor idx, Tensor weight) -> Tensor",
    _gathered_weight_grad_dense,
    _gathered_weight_grad_dense_fake,
)


# ---- per-example products ----


def _per_example_input_grad(values, idx, weight):
    return _ops(values, weight.shape[1], (weight,)).per_example_input_grad(values, idx, weight)


def _per_example_input_grad_fake(values, idx, weight):
    return values.new_empty(values.shape[0], weight.shape[1])


define(
    "per_example_input_grad(Tensor values, Tensor idx, Tensor weight) -> Tensor",
    _per_example_input_grad,
    _per_example_input_grad_fake,
)


def _per_example_weight_grad(values, idx, x, n_rows, dtype=None):
    ops = _ops(values, x.shape[1], (x, dtype))
    return ops.per_example_weight_grad(values, idx, x, n_rows, dtype=dtype)


def _per_example_weight_grad_fake(values, idx, x, n_rows, dtype=None):
    distinct = torch.library.get_ctx().new_dynamic_size()  # rows selected by some example
    return (
        values.new_empty(distinct, dtype=torch.int64),
        values.new_empty(distinct, x.shape[1], dtype=dtype or values.dtype),
    )


define(
    "per_example_weight_grad(Tensor values, Tensor idx, Tensor x, SymInt n_rows, "
    "ScalarType? dtype=None) -> (Tensor, Tensor)",
    _per_example_weight_grad,
    _per_example_weight_grad_fake,
)


def _per_example_weight_grad_dense(values, idx, x, n_rows, dtype=None):
    ops = _ops(values, x.shape[1], (x, dtype))
    return ops.per_example_weight_grad(values, idx, x, n_rows, dense=True, dtype=dtype)[1]


def _per_example_weight_grad_dense_fake(values, idx, x, n_rows, dtype=None):
    return values.new_empty(n_rows, x.shape[1], dtype=dtype or values.dtype)


define(
    "per_example_weight_grad_dense(Tensor values, Tensor idx, Tensor x, SymInt n_rows, "
    "ScalarType? dtype=None) -> Tensor",
    _per_example_weight_grad_dense,
    _per_example_weight_grad_dense_fake,
)


def _selected_rows_fake(idx, n_rows):
    distinct = torch.library.get_ctx().new_dynamic_size()
    return idx.new_empty(distinct, dtype=torch.int64)


# The rows a per-example selection touched: the row-sparse weight gradient of the masked-dense
# per-example backward (PyTorch ops on every device: one scatter of flags and one sort of N).
define(
    "selected_rows(Tensor idx, SymInt n_rows) -> Tensor",
    torch_ops.selected_rows,
    _selected_rows_fake,
)


# ---- row-sparse optimizer updates (in place on the rows idx of a parameter and its state) ----


def _row_sgd_step(
    param, idx, grad, row_step, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov
):
    backend.ops_for(param).row_sgd_step(
        param,
        idx,
        grad,
        row_step,
        momentum_buffer,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )


define(
    "row_sgd_step(Tensor(a!) param, Tensor idx, Tensor grad, Tensor(b!) row_step, "
    "Tensor(c!)? momentum_buffer, *, float lr, float momentum, float dampening, "
    "float weight_decay, bool nesterov) -> ()",
    _row_sgd_step,
    _nothing,
)


def _row_adagrad_step(param, idx, grad, row_step, state_sum, *, lr, lr_decay, weight_decay, eps):
    backend.ops_for(param).row_adagrad_step(
        param,
        idx,
        grad,
        row_step,
        state_sum,
        lr=lr,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        eps=eps,
    )


define(
    "row_adagrad_step(Tensor(a!) param, Tensor idx, Tensor grad, Tensor(b!) row_step, "
    "Tensor(c!) state_sum, *, float lr, float lr_decay, float weight_decay, float eps) -> ()",
    _row_adagrad_step,
    _nothing,
)


def _row_adam_step(
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
):
    backend.ops_for(param).row_adam_step(
        param,
        idx,
        grad,
        row_step,
        exp_avg,
        exp_avg_sq,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled=decoupled,
    )


define(
    "row_adam_step(Tensor(a!) param, Tensor idx, Tensor grad, Tensor(b!) row_step, "
    "Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, *, float lr, float beta1, float beta2, "
    "float eps, float weight_decay, bool decoupled) -> ()",
    _row_adam_step,
    _nothing,
)


# ---- inference of compacted models (optimize_for_inference), so that fused models export ----


def _linear_act(x, weight, bias, activation):
    return backend.ops_for(x).linear_act(x, weight, bias, activation)


def _linear_act_fake(x, weight, bias, activation):
    return x.new_empty(x.shape[0], weight.shape[0])


define(
    "linear_act(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor",
    _linear_act,
    _linear_act_fake,
)


def _fused_mlp(
    x,
    first_weight,
    first_bias,
    rest_weight,
    rest_bias,
    out_features,
    hidden_activation,
    output_activation,
):
    y = backend.ops_for(x).fused_mlp(
        x,
        first_weight,
        first_bias,
        rest_weight,
        rest_bias,
        out_features,
        hidden_activation,
        output_activation,
    )
    return y.contiguous()  # as the fake says (the PyTorch ops return a slice of the padded width)


def _fused_mlp_fake(
    x, first_weight, first_bias, rest_weight, rest_bias, out_features, *activations
):
    return x.new_empty(x.shape[0], out_features)


define(
    "fused_mlp(Tensor x, Tensor first_weight, Tensor first_bias, Tensor rest_weight, "
    "Tensor rest_bias, SymInt out_features, str hidden_activation, str output_activation) -> Tensor",
    _fused_mlp,
    _fused_mlp_fake,
)


OPS = torch.ops.triton_mebp


def _gathered_weight_grad_through_op(dy_c, x, idx, out=None, dtype=None):
    rows = OPS.gathered_weight_grad.default(dy_c, x, idx, out.dtype if out is not None else dtype)
    return rows if out is None else out.index_copy_(0, idx, rows)


def _per_example_weight_grad_through_op(values, idx, x, n_rows, dense=False, dtype=None):
    if dense:
        return None, OPS.per_example_weight_grad_dense.default(values, idx, x, n_rows, dtype)
    return OPS.per_example_weight_grad.default(values, idx, x, n_rows, dtype)


# The backward operations of the backend contract (backend.Backend), under the same names and
# signatures, through the operators: what a traceable backward calls instead of
# backend.ops_for(tensor). (dense=True of per_example_weight_grad returns None for the rows.)
ops = types.SimpleNamespace(
    name="operators",
    unified_select=OPS.unified_select.default,
    unified_select_and_bias=OPS.unified_select_and_bias.default,
    per_example_select=OPS.per_example_select.default,
    gathered_input_grad=OPS.gathered_input_grad.default,
    gathered_weight_grad=_gathered_weight_grad_through_op,
    per_example_input_grad=OPS.per_example_input_grad.default,
    per_example_weight_grad=_per_example_weight_grad_through_op,
)


# ---- the CPU dense-gradient buffer ----

_dense_grad_storage: dict[
    int, tuple
] = {}  # id(weight) -> (weak reference to weight, storage of the last dense grad)
_CAN_REUSE = hasattr(torch._C, "_storage_Use_Count")


def zeroed_grad_buffer(weight, dtype):
    """A zeroed tensor of ``weight``'s shape for a dense weight gradient.

    On the CPU a fresh 4096 x 4096 gradient costs more in page faults than zeroing it (15 ms
    against 1.3 ms on 2 cores), so the memory of the gradient returned last time is reused once
    nothing holds it any more (``optimizer.zero_grad()`` sets ``.grad`` to None): only the
    storage is kept here, so autograd still takes the returned tensor as ``.grad`` without a copy.
    This runs inside the ``gathered_weight_grad_dense`` operator, so compiled steps reuse it too.
    """
    if weight.device.type != "cpu" or not _CAN_REUSE:
        return torch.zeros_like(weight, dtype=dtype)
    key = id(weight)
    owner, storage = _dense_grad_storage.get(key, (None, None))
    if (
        owner is not None
        and owner() is weight
        and storage.nbytes() == weight.numel() * dtype.itemsize
        and torch._C._storage_Use_Count(storage._cdata) == 1
    ):  # held by this cache alone
        # (torch's stub lists set_ without the default, contiguous, stride)
        return torch.empty(0, dtype=dtype).set_(storage, 0, weight.shape).zero_()  # type: ignore[call-overload]
    buffer = torch.zeros(weight.shape, dtype=dtype)
    _dense_grad_storage[key] = (
        weakref.ref(weight, lambda _: _dense_grad_storage.pop(key, None)),
        buffer.untyped_storage(),
    )
    return buffer
