"""mebp_linear's backward against masked-dense meProp in float64, on both backends."""

import pytest
import torch
import torch.nn.functional as F

import triton_mebp as mebp
from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES, SHAPES, assert_close
from reference import mebp_reference, separated_grad

MODES = ["unified", "per_example"]


def run_backward(x, w, b, dy, **options):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    mebp.mebp_linear(x, w, b, **options).backward(dy)
    return x.grad, w.grad, b.grad if b is not None else None


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,M,N", SHAPES)
def test_backward_matches_masked_dense_reference(any_backend, B, M, N, mode, dtype):
    x = torch.randn(B, M, device=DEVICE).to(dtype)
    w = torch.randn(N, M, device=DEVICE).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype)
    dy = separated_grad(B, N, mode, dtype, DEVICE)
    for k in sorted({1, max(1, N // 5), N}):
        dx, dw, db = run_backward(x, w, b, dy, k=k, mode=mode)
        ref_dx, ref_dw, ref_db = mebp_reference(x, w, dy, k, mode)
        assert_close(dx, ref_dx, dtype)
        assert_close(dw, ref_dw, dtype)
        assert_close(db, ref_db, dtype)


@pytest.mark.parametrize("grad", ["dense", "sparse"])
@pytest.mark.parametrize("sparse_bias", [False, True])
@pytest.mark.parametrize("B,M,N", SHAPES)
def test_per_example_dense_products_match_the_reference(any_backend, B, M, N, grad, sparse_bias):
    """The masked-dense per-example backward (what MeLinear(auto=True) runs where the cost model
    predicts the per-example products slower): meProp's gradient, rows and hit counts."""
    from reference import selection_mask
    from triton_mebp.functional import _mebp_linear

    x = torch.randn(B, M, device=DEVICE, requires_grad=True)
    w = torch.randn(N, M, device=DEVICE, requires_grad=True)
    b = torch.randn(N, device=DEVICE, requires_grad=True)
    dy = separated_grad(B, N, "per_example", device=DEVICE)
    k = max(1, N // 5)
    hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    refs = torch.zeros((), dtype=torch.int64, device=DEVICE)
    y = _mebp_linear(x, w, b, k, "per_example", grad, sparse_bias, hits, refs, True)
    y.backward(dy)
    ref_dx, ref_dw, ref_db = mebp_reference(x, w, dy, k, "per_example")
    mask = selection_mask(dy, k, "per_example")
    if sparse_bias:
        ref_db = torch.where(mask, dy.double(), 0.0).sum(0)
    assert_close(x.grad, ref_dx)
    assert_close(w.grad.to_dense(), ref_dw)
    assert_close(b.grad, ref_db)
    if grad == "sparse" and k < N:
        assert w.grad.is_sparse
        assert torch.equal(w.grad._indices()[0].cpu(), mask.any(0).nonzero().flatten())
    assert torch.equal(hits.cpu(), mask.sum(0)) and int(refs) == B


@pytest.mark.parametrize("mode", MODES)
def test_sparse_weight_gradient_holds_only_selected_rows(any_backend, mode):
    B, M, N, k = 6, 12, 40, 3
    x, w = torch.randn(B, M, device=DEVICE), torch.randn(N, M, device=DEVICE)
    dy = separated_grad(B, N, mode, device=DEVICE)
    _, dw, _ = run_backward(x, w, None, dy, k=k, mode=mode, grad="sparse")
    assert dw.is_sparse and dw.shape == (N, M)
    _, ref_dw, _ = mebp_reference(x, w, dy, k, mode)
    touched = ref_dw.abs().sum(1).nonzero().flatten()
    assert torch.equal(dw.coalesce().indices()[0].cpu(), touched.cpu())
    assert_close(dw.to_dense(), ref_dw)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_bias_gradient(any_backend, mode):
    B, M, N, k = 5, 8, 30, 4
    x, w, b = (
        torch.randn(B, M, device=DEVICE),
        torch.randn(N, M, device=DEVICE),
        torch.randn(N, device=DEVICE),
    )
    dy = separated_grad(B, N, mode, device=DEVICE)
    _, _, db = run_backward(x, w, b, dy, k=k, mode=mode, sparse_bias=True)
    from reference import selection_mask

    kept = torch.where(selection_mask(dy, k, mode), dy.double(), 0.0)
    assert_close(db, kept.sum(0))


@pytest.mark.parametrize("mode", MODES)
def test_any_leading_shape(any_backend, mode):
    x = torch.randn(2, 3, 4, 10, device=DEVICE)
    w, b = torch.randn(20, 10, device=DEVICE), torch.randn(20, device=DEVICE)
    dy = separated_grad(24, 20, mode, device=DEVICE).reshape(2, 3, 4, 20)
    dx, dw, db = run_backward(x, w, b, dy, k=5, mode=mode)
    ref_dx, ref_dw, ref_db = mebp_reference(x.reshape(24, 10), w, dy.reshape(24, 20), 5, mode)
    assert dx.shape == x.shape
    assert_close(dx.reshape(24, 10), ref_dx)
    assert_close(dw, ref_dw)
    assert_close(db, ref_db)


def test_full_k_is_exact_dense_backprop_gradcheck():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda *t: mebp.mebp_linear(*t, k=6, mode=mode), (x, w, b))
        assert torch.autograd.gradcheck(
            lambda *t: mebp.mebp_linear(*t, k=1.0, mode=mode), (x, w, b)
        )


@pytest.mark.parametrize("mode", MODES)
def test_k_one_below_full_goes_through_the_backend(any_backend, mode, monkeypatch):
    """k = N takes the dense shortcut; k = N - 1 is the smallest cut that reaches the backend."""
    from triton_mebp import backend

    B, M, N = 5, 9, 12
    x, w, b = (
        torch.randn(B, M, device=DEVICE),
        torch.randn(N, M, device=DEVICE),
        torch.randn(N, device=DEVICE),
    )
    dy = separated_grad(B, N, mode, device=DEVICE)
    ops = backend.ops_for(dy)
    name = "unified_select_and_bias" if mode == "unified" else "per_example_select"
    calls = []
    real = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))
    got = run_backward(x, w, b, dy, k=N - 1, mode=mode)
    assert calls == [name]
    for g, ref in zip(got, mebp_reference(x, w, dy, N - 1, mode)):
        assert_close(g, ref)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_dense_autograd_when_k_is_full(any_backend, mode):
    x, w, b = (
        torch.randn(7, 9, device=DEVICE),
        torch.randn(11, 9, device=DEVICE),
        torch.randn(11, device=DEVICE),
    )
    dy = torch.randn(7, 11, device=DEVICE)
    got = run_backward(x, w, b, dy, k=11, mode=mode)
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    F.linear(xs, ws, bs).backward(dy)
    for g, ref in zip(got, (xs.grad, ws.grad, bs.grad)):
        assert_close(g, ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_reach_gradients_as_in_dense_backprop(any_backend, mode):
    B, M, N = 4, 6, 30
    x, w = torch.randn(B, M, device=DEVICE), torch.randn(N, M, device=DEVICE)
    dy = torch.randn(B, N, device=DEVICE) * 1e-3
    dy[1, 7] = float("nan")
    dy[3, 20] = float("inf")
    dx, dw, _ = run_backward(x, w, None, dy, k=3, mode=mode)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xs, ws).backward(dy)
    assert torch.equal(dx.isnan() | dx.isinf(), xs.grad.isnan() | xs.grad.isinf())
    assert torch.equal(dw.isnan() | dw.isinf(), ws.grad.isnan() | ws.grad.isinf())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grad", ["dense", "sparse"])
def test_empty_batch(any_backend, mode, grad):
    x = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 5, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)
    y = mebp.mebp_linear(x, w, b, k=2, mode=mode, grad=grad)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 5)
    assert torch.equal(w.grad.to_dense(), torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_inputs_are_not_modified(any_backend):
    x, w, b = (
        torch.randn(5, 6, device=DEVICE),
        torch.randn(9, 6, device=DEVICE),
        torch.randn(9, device=DEVICE),
    )
    dy = torch.randn(5, 9, device=DEVICE)
    copies = [t.clone() for t in (x, w, b, dy)]
    for mode in MODES:
        run_backward(x, w, b, dy, k=2, mode=mode)
    for t, c in zip((x, w, b, dy), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("mode", MODES)
def test_hit_counters(any_backend, mode):
    B, M, N, k = 6, 4, 25, 3
    x, w = torch.randn(B, M, device=DEVICE), torch.randn(N, M, device=DEVICE, requires_grad=True)
    hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    refs = torch.zeros((), dtype=torch.int64, device=DEVICE)
    dy = separated_grad(B, N, mode, device=DEVICE)
    for _ in range(2):
        mebp.mebp_linear(x, w, k=k, mode=mode, hits=hits, refs=refs).backward(dy)
    from reference import selection_mask

    assert torch.equal(hits.cpu(), 2 * selection_mask(dy, k, mode).sum(0).cpu())
    assert refs.item() == 2 * B


@pytest.mark.parametrize("bad_k", [0, -1, 41, 1.5, 0.0, -0.1, float("nan")])
def test_k_out_of_range_is_a_value_error_naming_k_and_width(bad_k):
    w = torch.randn(40, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"k=.*40"):
        mebp.mebp_linear(torch.randn(2, 3), w, k=bad_k)


@pytest.mark.parametrize("bad_k", ["5", None, True, [3]])
def test_k_of_wrong_type_is_a_type_error(bad_k):
    with pytest.raises(TypeError, match="k must be"):
        mebp.mebp_linear(torch.randn(2, 3), torch.randn(40, 3), k=bad_k)


def test_bad_mode_and_grad():
    with pytest.raises(ValueError, match="mode"):
        mebp.mebp_linear(torch.randn(2, 3), torch.randn(4, 3), k=1, mode="rows")
    with pytest.raises(ValueError, match="grad"):
        mebp.mebp_linear(torch.randn(2, 3), torch.randn(4, 3), k=1, grad="coo")


MISMATCHES = [
    (torch.randn(2, 4), torch.randn(5, 3)),  # shape
    (torch.randn(2, 3, dtype=torch.float64), torch.randn(5, 3)),  # dtype
] + ([(torch.randn(2, 3), torch.randn(5, 3, device="cuda"))] if HAS_CUDA else [])  # device


@pytest.mark.parametrize("x,w", MISMATCHES)
def test_mismatches_raise_what_f_linear_raises(x, w):
    with pytest.raises(Exception) as expected:
        F.linear(x, w)
    with pytest.raises(type(expected.value)) as got:
        mebp.mebp_linear(x, w.requires_grad_(), k=2)
    assert str(got.value) == str(expected.value)


def test_bad_counters():
    w = torch.randn(5, 3)
    with pytest.raises(ValueError, match="hits"):
        mebp.mebp_linear(torch.randn(2, 3), w, k=2, hits=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="hits"):
        mebp.mebp_linear(torch.randn(2, 3), w, k=2, hits=torch.zeros(5))


def test_autocast_backward_returns_gradients_in_the_parameters_dtype():
    layer = mebp.MeLinear(16, 32, k=4)
    x = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert (layer.weight.grad.abs().sum(1) > 0).sum().item() == 4


def test_dense_gradient_memory_is_reused_only_when_nothing_holds_it():
    w = torch.randn(30, 8, requires_grad=True)
    x = torch.randn(4, 8)
    dy = separated_grad(4, 30, "unified")

    def step():
        mebp.mebp_linear(x, w, k=3).backward(dy)

    step()
    expected = w.grad.clone()
    kept = w.grad
    w.grad = None
    step()  # the first gradient is still held: new memory
    assert kept.data_ptr() != w.grad.data_ptr() and torch.equal(kept, expected)
    view = w.grad.view(-1)
    w.grad = None
    step()  # held through a view: new memory again
    assert torch.equal(view.view(30, 8), expected) and torch.equal(w.grad, expected)
    address = w.grad.data_ptr()
    w.grad = None
    step()  # dropped: its memory comes back, zeroed and refilled
    assert w.grad.data_ptr() == address and torch.equal(w.grad, expected)
    step()  # accumulation into .grad still adds
    assert torch.allclose(w.grad, 2 * expected)
