"""Row-gathered products, against float64 references."""

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, SHAPES, assert_close
from triton_mebp import backend, torch_ops


@pytest.fixture(params=["torch", "triton"])
def ops(request):
    return torch_ops if request.param == "torch" else backend.triton_ops()


def distinct_indices(N, k, dtype):
    return torch.randperm(N)[:k].sort().values.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,M,N", SHAPES)
def test_unified_products(ops, B, M, N, dtype):
    k = max(1, N // 3)
    idx = distinct_indices(N, k, torch.int64)
    dy_c = torch.randn(B, k, device=DEVICE).to(dtype)
    x = torch.randn(B, M, device=DEVICE).to(dtype)
    w = torch.randn(N, M, device=DEVICE).to(dtype)
    rows = idx.long()

    assert_close(ops.gathered_input_grad(dy_c, w, idx), dy_c.double() @ w.double()[rows], dtype)
    expected_rows = dy_c.double().t() @ x.double()
    assert_close(ops.gathered_weight_grad(dy_c, x, idx), expected_rows, dtype)

    dense = torch.zeros(N, M, device=DEVICE, dtype=dtype)
    ops.gathered_weight_grad(dy_c, x, idx, out=dense)
    expected = torch.zeros(N, M, dtype=torch.float64, device=DEVICE)
    expected[rows] = expected_rows
    assert_close(dense, expected, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,M,N", SHAPES)
def test_per_example_products(ops, B, M, N, dtype):
    k = max(1, N // 4)
    idx = (
        torch.stack([torch.randperm(N)[:k].sort().values for _ in range(B)])
        .to(torch.int64)
        .to(DEVICE)
    )
    values = torch.randn(B, k, device=DEVICE).to(dtype)
    x = torch.randn(B, M, device=DEVICE).to(dtype)
    w = torch.randn(N, M, device=DEVICE).to(dtype)
    sparse = torch.zeros(B, N, dtype=torch.float64, device=DEVICE).scatter_(
        1, idx.long(), values.double()
    )

    assert_close(ops.per_example_input_grad(values, idx, w), sparse @ w.double(), dtype)
    full = sparse.t() @ x.double()
    rows, grad_rows = ops.per_example_weight_grad(values, idx, x, N)
    touched = torch.unique(idx.long())
    assert torch.equal(rows.long().cpu(), touched.cpu())
    assert_close(grad_rows, full[touched], dtype)
    dense_rows, dense = ops.per_example_weight_grad(values, idx, x, N, dense=True)
    assert torch.equal(dense_rows.long().cpu(), touched.cpu())
    assert dense.shape == (N, M)
    assert_close(dense, full, dtype)


def test_products_accept_strided_operands(ops):
    N, M, B, k = 40, 24, 9, 7
    idx = distinct_indices(N, k, torch.int64)
    w = torch.randn(M, N, device=DEVICE).t()  # transposed weight
    x = torch.randn(B, 2 * M, device=DEVICE)[:, ::2]  # sliced input
    dy_c = torch.randn(k, B, device=DEVICE).t()  # transposed gradient
    rows = idx.long()
    assert_close(ops.gathered_input_grad(dy_c, w, idx), dy_c.double() @ w.double()[rows])
    assert_close(ops.gathered_weight_grad(dy_c, x, idx), dy_c.double().t() @ x.double())


def test_per_example_weight_grad_is_deterministic():
    ops = backend.triton_ops()
    B, N, M, k = 64, 8, 16, 4
    idx = torch.stack([torch.randperm(N)[:k].sort().values for _ in range(B)]).int().to(DEVICE)
    values = torch.randn(B, k, device=DEVICE)
    x = torch.randn(B, M, device=DEVICE)
    first = ops.per_example_weight_grad(values, idx, x, N)[1]
    for _ in range(3):
        assert torch.equal(ops.per_example_weight_grad(values, idx, x, N)[1], first)


def test_empty_batch_products(ops):
    idx = distinct_indices(10, 3, torch.int64)
    w = torch.randn(10, 6, device=DEVICE)
    empty = torch.zeros(0, 3, device=DEVICE)
    assert ops.gathered_input_grad(empty, w, idx).shape == (0, 6)
    assert torch.equal(
        ops.gathered_weight_grad(empty, torch.zeros(0, 6, device=DEVICE), idx),
        torch.zeros(3, 6, device=DEVICE),
    )


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,M,N,k", [(5, 33, 100, 7), (9, 70, 140, 65)])
def test_products_read_the_zero_padded_selection(B, M, N, k, dtype):
    ops = backend.triton_ops()
    dy = torch.randn(B, N, device=DEVICE).to(dtype)
    x = torch.randn(B, M, device=DEVICE).to(dtype)
    w = torch.randn(N, M, device=DEVICE).to(dtype)
    w[-1] = float("inf")  # never selected here: padding must not read it
    dy[:, -1] = 0.0
    idx, dy_c = ops.unified_select(dy, k)
    assert dy_c.stride(0) % 64 == 0
    rows = idx.long()
    reference = dy.double()[:, rows]
    assert_close(ops.gathered_input_grad(dy_c, w, idx), reference @ w.double()[rows], dtype)
    assert_close(ops.gathered_weight_grad(dy_c, x, idx), reference.t() @ x.double(), dtype)
    dense = torch.zeros(N, M, device=DEVICE, dtype=dtype)
    ops.gathered_weight_grad(dy_c, x, idx, out=dense)
    expected = torch.zeros(N, M, dtype=torch.float64, device=DEVICE)
    expected[rows] = reference.t() @ x.double()
    assert_close(dense, expected, dtype)
