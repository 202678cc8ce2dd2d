"""Dtypes: every kernel launcher computes a dtype correctly or refuses it before launching;
float64 takes the PyTorch ops whatever the backend; bfloat16 runs in the interpreter too."""

import pytest
import torch

import triton_mebp as mebp
from aot import compile_specs
from conftest import DEVICE, TOLERANCES, assert_close
from reference import mebp_reference, separated_grad
from triton_mebp import backend, torch_ops
from triton_mebp.kernels import fused_mlp, gathered, optim_rows, selection

MODES = ["unified", "per_example"]


def _launches(dtype):
    """Every kernel launcher with small arguments of ``dtype``: [(name, call, written tensors)]."""
    f = dict(dtype=dtype, device=DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    rand = lambda *shape: (torch.randn(*shape) * 4).to(**f)
    dy, x, w = rand(3, 6), rand(3, 4), rand(6, 4)
    idx, dy_c = torch.tensor([1, 4], **i32), rand(3, 2)
    values, pidx = rand(3, 2), torch.tensor([[0, 2], [1, 2], [3, 5]], **i32)
    out, param, grad = torch.zeros(6, 4, **f), rand(6, 4), rand(2, 4)
    state, state2 = torch.zeros(6, 4, **f), torch.zeros(6, 4, **f)
    row_step = torch.zeros(6, dtype=torch.float32, device=DEVICE)
    bias = rand(6)
    packed_w, packed_b = torch.zeros(1, 16, 16, **f), torch.zeros(1, 16, **f)
    return [
        ("unified_select", lambda: selection.unified_select(dy, 2), []),
        ("unified_select_and_bias", lambda: selection.unified_select_and_bias(dy, 2), []),
        ("per_example_select", lambda: selection.per_example_select(dy, 2), []),
        ("gathered_input_grad", lambda: gathered.gathered_input_grad(dy_c, w, idx), []),
        (
            "gathered_weight_grad",
            lambda: gathered.gathered_weight_grad(dy_c, x, idx, out=out),
            [out],
        ),
        ("per_example_input_grad", lambda: gathered.per_example_input_grad(values, pidx, w), []),
        (
            "per_example_weight_grad",
            lambda: gathered.per_example_weight_grad(values, pidx, x, 6),
            [],
        ),
        (
            "row_sgd_step",
            lambda: optim_rows.row_sgd_step(
                param,
                idx,
                grad,
                row_step,
                state,
                lr=0.1,
                momentum=0.9,
                dampening=0.0,
                weight_decay=0.0,
                nesterov=False,
            ),
            [param, state],
        ),
        (
            "row_adagrad_step",
            lambda: optim_rows.row_adagrad_step(
                param, idx, grad, row_step, state, lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10
            ),
            [param, state],
        ),
        (
            "row_adam_step",
            lambda: optim_rows.row_adam_step(
                param,
                idx,
                grad,
                row_step,
                state,
                state2,
                lr=0.1,
                beta1=0.9,
                beta2=0.99,
                eps=1e-8,
                weight_decay=0.0,
                decoupled=False,
            ),
            [param, state, state2],
        ),
        ("linear_act", lambda: fused_mlp.linear_act(x, w[:, :4], None, "relu"), []),
        ("fused_mlp", lambda: fused_mlp.fused_mlp(x, w, bias, packed_w, packed_b, 5), []),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
@pytest.mark.parametrize("position", range(11))
def test_every_launcher_refuses_other_dtypes_before_launching(position, dtype):
    name, call, written = _launches(dtype)[position]
    before = [t.clone() for t in written]
    with pytest.raises(TypeError, match=f"{name}: .*{dtype}"):
        call()
    for tensor, old in zip(written, before):
        assert torch.equal(tensor, old)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_weight_gradient_launchers_refuse_an_output_dtype_they_do_not_compute(dtype):
    dy_c, x = torch.randn(3, 2, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    idx = torch.tensor([1, 4], device=DEVICE)
    with pytest.raises(TypeError, match=f"gathered_weight_grad: dtype has dtype {dtype}"):
        gathered.gathered_weight_grad(dy_c, x, idx, dtype=dtype)
    values, pidx = torch.randn(3, 2, device=DEVICE), torch.tensor([[0, 2], [1, 2], [3, 5]])
    with pytest.raises(TypeError, match=f"per_example_weight_grad: dtype has dtype {dtype}"):
        gathered.per_example_weight_grad(values, pidx.to(DEVICE), x, 6, dtype=dtype)


def test_mixed_operands_with_a_float64_weight_take_the_torch_ops(triton_backend):
    """Autocast over float64 weights: the operators pass such products to the PyTorch ops."""
    OPS = torch.ops.triton_mebp
    dy_c = torch.randn(3, 2, device=DEVICE).half()
    w = torch.randn(6, 4, dtype=torch.float64, device=DEVICE)
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    idx = torch.tensor([1, 4], device=DEVICE)
    dx = OPS.gathered_input_grad.default(dy_c, w, idx)
    assert dx.dtype == torch.float16
    assert_close(dx, dy_c.double() @ w.half().double()[idx], torch.float16)
    dw = OPS.gathered_weight_grad.default(dy_c, x, idx, torch.float64)
    assert dw.dtype == torch.float64
    assert_close(dw, dy_c.double().t() @ x.half().double(), torch.float32)


def test_float64_takes_the_torch_ops_whatever_the_backend(triton_backend):
    assert backend.ops_for(torch.zeros(1, dtype=torch.float64, device=DEVICE)) is torch_ops
    assert backend.ops_for(torch.zeros(1, device=DEVICE)) is not torch_ops


@pytest.mark.parametrize("mode", MODES)
def test_float64_gradients_on_the_triton_backend(triton_backend, mode):
    B, M, N, k = 5, 8, 10, 3
    x = torch.randn(B, M, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(N, M, dtype=torch.float64, device=DEVICE, requires_grad=True)
    dy = separated_grad(B, N, mode, torch.float64, DEVICE)
    mebp.mebp_linear(x, w, k=k, mode=mode).backward(dy)
    ref_dx, ref_dw, _ = mebp_reference(x.detach(), w.detach(), dy, k, mode)
    assert_close(x.grad, ref_dx)
    assert_close(w.grad, ref_dw)


@pytest.mark.parametrize("mode", MODES)
def test_float64_lstm_on_the_triton_backend(mode):
    torch.manual_seed(0)
    lstm = mebp.MeLSTM(3, 4, k=5, mode=mode).double().to(DEVICE)
    x = torch.randn(6, 2, 3, dtype=torch.float64, device=DEVICE)
    grads = {}
    before = mebp.get_backend()
    try:
        for name in ("torch", "triton"):
            mebp.set_backend(name)
            lstm.zero_grad()
            lstm(x)[0].square().sum().backward()
            grads[name] = [p.grad.clone() for p in lstm.parameters()]
    finally:
        mebp.set_backend(before)
    for ours, theirs in zip(grads["triton"], grads["torch"]):
        assert_close(ours, theirs)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_input_of_another_dtype_than_the_weight(any_backend, bf16_dot, mode):
    """A bf16 input (an earlier autocast layer's output) into a float32 layer under autocast."""
    B, M, N, k = 4, 8, 6, 2
    x = torch.randn(B, M, device=DEVICE).to(torch.bfloat16).requires_grad_()
    w = torch.randn(N, M, device=DEVICE, requires_grad=True)
    dy = separated_grad(B, N, mode, torch.float32, DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = mebp.mebp_linear(x, w, k=k, mode=mode)
    y.float().backward(dy)
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref_dx, ref_dw, _ = mebp_reference(x.detach(), w.detach(), dy, k, mode)
    assert_close(x.grad, ref_dx, torch.bfloat16)
    assert_close(w.grad, ref_dw, torch.bfloat16)


# Mixed precision: under autocast with float32 weights the backward runs in the autocast dtype
# (selection on dy, and the unified products on dy_c, x and the gathered rows of W rounded to
# it, with float32 accumulation); dW and db come out in the weight's dtype.

AMP_DTYPES = [torch.bfloat16, torch.float16]


class _Spy:
    """A backend wrapper recording, per operation, the dtypes of the floating tensors it received
    and of the last floating tensor it returned, and the 2-D tensors it saw."""

    def __init__(self, ops):
        self.ops, self.calls, self.weights = ops, {}, []

    def __getattr__(self, name):
        op = getattr(self.ops, name)
        if not callable(op):
            return op

        def recorded(*args, **kwargs):
            result = op(*args, **kwargs)
            given = [*args, *kwargs.values()]
            tensors = [a for a in given if isinstance(a, torch.Tensor) and a.is_floating_point()]
            out = [r for r in (result if isinstance(result, tuple) else [result])]
            out = [r for r in out if isinstance(r, torch.Tensor) and r.is_floating_point()]
            self.calls[name] = ([t.dtype for t in tensors], out[-1].dtype)
            self.weights += [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
            return result

        return recorded


@pytest.fixture
def spy(monkeypatch):
    """Every backend operation the layers call goes through one ``_Spy``."""
    spies = {}
    ops_for = backend.ops_for

    def spied(tensor):
        ops = ops_for(tensor)
        return spies.setdefault(id(ops), _Spy(ops))

    monkeypatch.setattr(backend, "ops_for", spied)
    yield spies


def _autocast_backward(x, w, b, dy, k, mode, dtype, grad="dense"):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = mebp.mebp_linear(x, w, b, k=k, mode=mode, grad=grad)
    assert y.dtype == dtype
    y.backward(dy.to(dtype))
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    return x.grad, w.grad.to_dense(), b.grad, w


@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_autocast_backward_hands_the_backend_compute_dtype_operands(
    any_backend, bf16_dot, spy, mode, dtype
):
    B, M, N, k = 3, 5, 8, 3
    x, w, b = torch.randn(B, M), torch.randn(N, M), torch.randn(N)
    dy = separated_grad(B, N, mode, torch.float32, DEVICE)
    *_, weight = _autocast_backward(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), dy, k, mode, dtype)
    (ops,) = spy.values()
    f32 = torch.float32
    if mode == "unified":
        expected = {
            "unified_select_and_bias": ([dtype], dtype),
            "gathered_input_grad": ([dtype, f32], dtype),  # dy_c, the float32 weight -> dx
            "gathered_weight_grad": ([dtype, f32, f32], f32),  # dy_c, x, out -> dW
        }
    else:
        expected = {
            "per_example_select": ([dtype], dtype),
            "per_example_input_grad": ([dtype, f32], dtype),
            "per_example_weight_grad": ([dtype, f32], f32),
        }
    assert ops.calls == expected
    # The weight itself, not a cast copy of it.
    assert any(t.data_ptr() == weight.data_ptr() for t in ops.weights)


@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize(
    "mode,grad",
    [("unified", "dense"), ("unified", "sparse")]
    + [("per_example", "dense"), ("per_example", "sparse")],
)
@pytest.mark.parametrize(
    "backend_name,kernels",
    [("torch", "v2"), ("triton", "v2"), ("triton", "v1"), ("triton", "cublas")],
    ids=["torch", "triton", "triton-v1", "triton-products=cublas"],
)
def test_autocast_gradients_match_the_compute_dtype_reference(
    bf16_dot, monkeypatch, backend_name, kernels, mode, grad, dtype
):
    """Float64 references: the unified products from dy, x and W rounded to the autocast dtype,
    the per-example sums from dy so rounded and x, W as stored. dW comes out of a float32
    accumulator, so it meets float32 tolerances: a product of the unrounded x (float32 products)
    or a dW rounded to bf16/fp16 would be off by about 1e-3. On the Triton backend: the v2 and v1
    kernels (``TRITON_MEBP_KERNELS``) and the cuBLAS route of the products."""
    monkeypatch.setattr(backend, "_chosen", backend_name)
    monkeypatch.setenv("TRITON_MEBP_KERNELS", "v1" if kernels == "v1" else "v2")
    monkeypatch.setenv("TRITON_MEBP_PRODUCTS", "cublas" if kernels == "cublas" else "triton")
    B, M, N, k = 4, 9, 10, 3
    x, w, b = (torch.randn(*s, device=DEVICE) for s in ((B, M), (N, M), (N,)))
    dy = separated_grad(B, N, mode, torch.float32, DEVICE).to(dtype)
    dx, dw, db, _ = _autocast_backward(x, w, b, dy, k, mode, dtype, grad)
    rounded = (lambda t: t.to(dtype)) if mode == "unified" else (lambda t: t)
    ref_dx, ref_dw, ref_db = mebp_reference(rounded(x), rounded(w), dy, k, mode)
    assert_close(dw, ref_dw, torch.float32)
    assert_close(dx, ref_dx, dtype)
    assert_close(db, ref_db, dtype)
    if mode == "unified":  # the float32 operands as stored would not do
        _, unrounded_dw, _ = mebp_reference(x, w, dy, k, mode)
        assert not torch.allclose(dw.double(), unrounded_dw, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_autocast_input_gradient_multiplies_the_rounded_weight_rows(any_backend, bf16_dot, dtype):
    """Two selected outputs with the same gradient column and weight rows +c(1 + 2^-12) and -c:
    rounded to bf16/fp16 the rows cancel exactly (dx = 0); in float32 they leave c * 2^-12."""
    B, M = 3, 4
    c = torch.tensor([1.0, 1.25, 1.5, 1.75], device=DEVICE)
    w = torch.zeros(6, M, device=DEVICE)
    w[2], w[3] = c * (1 + 2.0**-12), -c  # outputs 2 and 3: the largest scores
    column = torch.tensor([1.0, -2.0, 0.5], device=DEVICE).unsqueeze(1)
    dy = torch.cat([0.1 * column, 0.2 * column, column, column, 0.3 * column, 0.4 * column], 1)
    b = torch.zeros(6, device=DEVICE)
    dx, dw, _, _ = _autocast_backward(
        torch.randn(B, M, device=DEVICE), w, b, dy, 2, "unified", dtype
    )
    assert torch.equal(dx, torch.zeros_like(dx))
    assert (dw[2:4].abs().sum(1) > 0).all() and not dw[[0, 1, 4, 5]].any()


@pytest.mark.parametrize("mode", MODES)
def test_auto_asks_the_cost_model_about_the_autocast_dtype(monkeypatch, mode):
    """MeLinear(auto=True) under autocast: the backward (and the dense one it is compared with)
    runs in the autocast dtype, so that is the dtype the cost model is asked about."""
    import triton_mebp.estimate as estimate

    asked = []

    def record(*args, dtype, **kwargs):
        asked.append(dtype)
        return True

    monkeypatch.setattr(estimate, "mebp_is_faster", record)
    monkeypatch.setattr(estimate, "masked_dense_is_faster", record)
    layer = mebp.MeLinear(6, 8, k=2, mode=mode, auto=True)
    x = torch.randn(3, 6)
    layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert asked == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("grad", ["dense", "sparse"])
def test_autocast_per_example_by_masked_dense_products(grad):
    """The per-example gradient by dense GEMMs on the masked dy (``MeLinear(auto=True)``'s
    choice): under autocast as the dense layer's, bf16 GEMMs, float32 gradients."""
    from triton_mebp.functional import _mebp_linear

    B, M, N, k = 4, 9, 10, 3
    x, w, b = (torch.randn(*s, device=DEVICE) for s in ((B, M), (N, M), (N,)))
    dy = separated_grad(B, N, "per_example", torch.bfloat16, DEVICE)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = _mebp_linear(x, w, b, k, "per_example", grad, False, None, None, True)
    y.backward(dy)
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    ref_dx, ref_dw, ref_db = mebp_reference(x.detach(), w.detach(), dy, k, "per_example")
    assert_close(x.grad, ref_dx, torch.bfloat16)
    assert_close(w.grad.to_dense(), ref_dw, torch.bfloat16)
    assert_close(b.grad, ref_db, torch.bfloat16)


# bfloat16 in the interpreter, through the `bf16_dot` fixture (see conftest.py).


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,M,N", [(1, 7, 33), (7, 33, 20)])
def test_bf16_backward_on_the_kernels(triton_backend, bf16_dot, B, M, N, mode):
    x = torch.randn(B, M, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(N, M, device=DEVICE).to(torch.bfloat16)
    dy = separated_grad(B, N, mode, torch.float64, DEVICE)
    dy16 = dy.to(torch.bfloat16)
    for k in (1, N // 3, N):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        mebp.mebp_linear(xg, wg, k=k, mode=mode).backward(dy16)
        ref_dx, ref_dw, _ = mebp_reference(x, w, dy16, k, mode)
        assert_close(xg.grad, ref_dx, torch.bfloat16)
        assert_close(wg.grad, ref_dw, torch.bfloat16)


def test_bf16_sparse_gradient_and_row_sgd_on_the_kernels(triton_backend, bf16_dot):
    layer = mebp.MeLinear(9, 12, k=4, grad="sparse").to(DEVICE, torch.bfloat16)
    x = torch.randn(5, 9, device=DEVICE).to(torch.bfloat16)
    dy = separated_grad(5, 12, "unified", torch.bfloat16, DEVICE)
    layer(x).backward(dy)
    _, ref_dw, _ = mebp_reference(x, layer.weight.detach(), dy, 4, "unified")
    assert_close(layer.weight.grad.to_dense(), ref_dw, torch.bfloat16)
    expected = layer.weight.detach().double() - 0.5 * ref_dw
    mebp.sgd_step_rows([layer.weight], lr=0.5)
    assert_close(layer.weight.detach(), expected, torch.bfloat16)


def test_bf16_fused_inference_kernels(bf16_dot):
    widths = (7, 16, 9, 3)
    weights = [
        (torch.randn(n, m) / m**0.5).to(DEVICE, torch.bfloat16)
        for m, n in zip(widths[:-1], widths[1:])
    ]
    biases = [torch.randn(n).to(DEVICE, torch.bfloat16) for n in widths[1:]]
    x = torch.randn(5, 7, device=DEVICE).to(torch.bfloat16)
    h = x.double()
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w.double().t() + b.double()
        h = h if i == len(weights) - 1 else torch.relu(h)
    first = torch.relu(x.double() @ weights[0].double().t() + biases[0].double())
    assert_close(fused_mlp.linear_act(x, weights[0], biases[0], "relu"), first, torch.bfloat16)
    width = fused_mlp.fused_width(widths[1:])
    packed_w, packed_b = fused_mlp.pack_layers(weights[1:], biases[1:], width)
    y = fused_mlp.fused_mlp(x, weights[0], biases[0], packed_w, packed_b, 3, "relu", "identity")
    assert_close(y, h, torch.bfloat16)


def test_bf16_products_compile_to_bf16_mma_with_float32_accumulation():
    """What the interpreter cannot show: the compiled products multiply bf16 operands and add
    in float32 (wgmma on sm_90, mma.sync on sm_80)."""
    strides = ("stride_ab", "stride_ak")
    common = {"B": "i32", "M": "i32", "K": "i32", "K_VALID": "i32", "B_BUCKET": "i32"}
    specs = [
        dict(
            kernel="triton_mebp.kernels.gathered:gathered_rows_matmul",
            configs=[3],
            signature={
                "a_ptr": "*bf16",
                "w_ptr": "*bf16",
                "idx_ptr": "*i32",
                "c_ptr": "*bf16",
                **common,
                **{
                    s: "i32" for s in strides + ("stride_wn", "stride_wm", "stride_cb", "stride_cm")
                },
            },
            constexprs={"INPUT_PRECISION": "ieee"},
        ),
        dict(
            kernel="triton_mebp.kernels.gathered:transposed_matmul_rows",
            configs=[3],
            signature={
                "a_ptr": "*bf16",
                "x_ptr": "*bf16",
                "idx_ptr": "*i32",
                "out_ptr": "*bf16",
                **common,
                **{
                    s: "i32" for s in strides + ("stride_xb", "stride_xm", "stride_on", "stride_om")
                },
            },
            constexprs={"SCATTER": True, "INPUT_PRECISION": "ieee"},
        ),
    ]
    results = compile_specs(specs)
    assert len(results) == 4 and all(r["ok"] for r in results), results
    for r in results:
        products = r["mma_instructions"]
        assert products, (r["kernel"], r["target"])
        assert all(".f32.bf16.bf16" in p for p in products), (r["kernel"], r["target"], products)


@pytest.mark.parametrize("name", ["sgd_nesterov", "adagrad", "adam", "adamw"])
def test_bf16_row_optimizers_on_the_kernels(triton_backend, name):
    """No dot products here: the interpreter computes these bf16 kernels as they are."""
    from test_optim import _check_against_reference

    _check_against_reference(name, (7, 33), torch.bfloat16, steps=3)
