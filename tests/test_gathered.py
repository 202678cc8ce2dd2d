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
    assert dense_rows is None  # the distinct rows would need a host read
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


@pytest.fixture
def launches(monkeypatch):
    """The Triton kernels launched during the test, by name (they still run)."""
    from triton_mebp.kernels._tuning import TunedKernel

    names = []
    original = TunedKernel.__getitem__

    def recording(self, grid):
        names.append(self.fn.__name__)
        return original(self, grid)

    monkeypatch.setattr(TunedKernel, "__getitem__", recording)
    return names


# TMA: Hopper or newer, or the interpreter (which runs the descriptors on CPU tensors)
HAS_TMA = DEVICE.type != "cuda" or torch.cuda.get_device_capability()[0] >= 9


def _ran(launches, family):
    """Whether a kernel of ``family`` (pointer or TMA variant) was launched."""
    return any(name.startswith(family) for name in launches)


ROUTED = [
    ("triton", {"dx": True, "dw": True, "dw dense": True}),
    ("cublas", {"dx": False, "dw": False, "dw dense": False}),
    ("auto", {"dx": False, "dw": False, "dw dense": True}),
    ("dx=triton,dw=cublas", {"dx": True, "dw": False, "dw dense": False}),
    ("dw=triton", {"dx": False, "dw": True, "dw dense": True}),
]


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("route,on_triton", ROUTED)
def test_product_routes_agree(monkeypatch, launches, route, on_triton, dtype, padded):
    monkeypatch.setenv("TRITON_MEBP_PRODUCTS", route)
    ops = backend.triton_ops()
    B, M, N, k = 9, 33, 100, 7
    dy = torch.randn(B, N, device=DEVICE).to(dtype)
    x = torch.randn(B, M, device=DEVICE).to(dtype)
    w = torch.randn(N, M, device=DEVICE).to(dtype)
    if padded:
        idx, dy_c = ops.unified_select(dy, k)  # the [:, :k] view of zero-padded rows
    else:
        idx = distinct_indices(N, k, torch.int32)
        dy_c = dy[:, idx.long()]
    rows = idx.long()
    reference = dy.double()[:, rows]
    launches.clear()

    dx = ops.gathered_input_grad(dy_c, w, idx)
    assert_close(dx, reference @ w.double()[rows], dtype)
    assert_close(dx, torch_ops.gathered_input_grad(dy_c, w, rows), dtype)
    assert _ran(launches, "_gathered_rows_matmul") == on_triton["dx"]
    launches.clear()

    dw_rows = ops.gathered_weight_grad(dy_c, x, idx)
    assert dw_rows.shape == (k, M) and dw_rows.dtype == dtype
    assert_close(dw_rows, reference.t() @ x.double(), dtype)
    assert _ran(launches, "_transposed_matmul_rows") == on_triton["dw"]
    launches.clear()

    dense = torch.full((N, M), 7.0, device=DEVICE, dtype=dtype)  # rows outside idx kept
    assert ops.gathered_weight_grad(dy_c, x, idx, out=dense) is dense
    expected = torch.full((N, M), 7.0, dtype=torch.float64, device=DEVICE)
    expected[rows] = reference.t() @ x.double()
    assert_close(dense, expected, dtype)
    assert_close(dense, torch_ops.gathered_weight_grad(dy_c, x, rows, out=dense.clone()), dtype)
    assert _ran(launches, "_transposed_matmul_rows") == on_triton["dw dense"]


@pytest.mark.parametrize("route", ["triton", "cublas"])
def test_product_routes_compute_in_the_gradients_dtype(monkeypatch, route):
    """float32 weights and inputs with a float16 gradient (autocast): both routes compute in
    float16 and return float16."""
    monkeypatch.setenv("TRITON_MEBP_PRODUCTS", route)
    ops = backend.triton_ops()
    B, M, N, k = 6, 20, 30, 5
    idx = distinct_indices(N, k, torch.int64)
    dy_c = torch.randn(B, k, device=DEVICE).half()
    x, w = torch.randn(B, M, device=DEVICE), torch.randn(N, M, device=DEVICE)
    dx = ops.gathered_input_grad(dy_c, w, idx)
    assert dx.dtype == torch.float16
    assert_close(dx, dy_c.double() @ w.half().double()[idx], torch.float16)
    dw = ops.gathered_weight_grad(dy_c, x, idx)
    assert dw.dtype == torch.float16
    assert_close(dw, dy_c.double().t() @ x.half().double(), torch.float16)
    # dW of float32 master weights: from the float32 accumulator, not rounded to float16.
    expected = dy_c.double().t() @ x.half().double()
    dw = ops.gathered_weight_grad(dy_c, x, idx, dtype=torch.float32)
    assert dw.dtype == torch.float32
    assert_close(dw, expected, torch.float32)
    dense = ops.gathered_weight_grad(dy_c, x, idx, out=torch.zeros(N, M, device=DEVICE))
    assert_close(dense[idx], expected, torch.float32)


@pytest.mark.parametrize("value", ["cuBLAS", "torch", "dx=cublas,dW=triton", "dx:cublas", ""])
def test_a_bad_products_choice_is_named(monkeypatch, launches, value):
    monkeypatch.setenv("TRITON_MEBP_PRODUCTS", value)
    ops = backend.triton_ops()
    dy_c, w = torch.randn(3, 2, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    idx = torch.tensor([1, 3], device=DEVICE)
    for call in (
        lambda: ops.gathered_input_grad(dy_c, w, idx),
        lambda: ops.gathered_weight_grad(dy_c, torch.randn(3, 4, device=DEVICE), idx),
    ):
        with pytest.raises(ValueError, match="TRITON_MEBP_PRODUCTS.*'auto', 'triton', 'cublas'"):
            call()
    assert launches == []


@pytest.mark.parametrize(
    "layout,dtype,tma_dx,tma_dw",
    [
        ("padded", torch.float16, True, True),  # dy_c from the selection, x rows of 48 elements
        ("padded", torch.bfloat16, True, True),
        ("padded, x unaligned", torch.float16, True, False),  # x rows of 33: not 16-byte rows
        ("unpadded", torch.float16, False, False),  # dy_c rows of 7 elements
        ("padded, TRITON_MEBP_TMA=0", torch.float16, False, False),
        ("padded", torch.float32, False, False),  # float32 products keep the pointer kernels
    ],
)
def test_products_read_dense_operands_by_tma_where_they_can(
    monkeypatch, launches, bf16_dot, layout, dtype, tma_dx, tma_dw
):
    monkeypatch.setenv("TRITON_MEBP_PRODUCTS", "triton")
    monkeypatch.setenv("TRITON_MEBP_TMA", "0" if "TMA=0" in layout else "1")
    ops = backend.triton_ops()
    B, N, k = 19, 90, 7
    M = 33 if "x unaligned" in layout else 48
    dy = torch.randn(B, N, device=DEVICE).to(dtype)
    x = torch.randn(B, M, device=DEVICE).to(dtype)
    w = torch.randn(N, M, device=DEVICE).to(dtype)
    if layout == "unpadded":
        idx = distinct_indices(N, k, torch.int64)
        dy_c = dy[:, idx]
    else:
        idx, dy_c = ops.unified_select(dy, k)
    rows = idx.long()
    reference = dy.double()[:, rows]
    tma_dx, tma_dw = tma_dx and HAS_TMA, tma_dw and HAS_TMA
    launches.clear()
    assert_close(ops.gathered_input_grad(dy_c, w, idx), reference @ w.double()[rows], dtype)
    assert ("_gathered_rows_matmul_tma_kernel" in launches) == tma_dx
    assert _ran(launches, "_gathered_rows_matmul")
    launches.clear()
    assert_close(ops.gathered_weight_grad(dy_c, x, idx), reference.t() @ x.double(), dtype)
    dense = torch.zeros(N, M, device=DEVICE, dtype=dtype)
    ops.gathered_weight_grad(dy_c, x, idx, out=dense)
    expected = torch.zeros(N, M, dtype=torch.float64, device=DEVICE)
    expected[rows] = reference.t() @ x.double()
    assert_close(dense, expected, dtype)
    assert set(launches) == {
        "_transposed_matmul_rows_tma_kernel" if tma_dw else "_transposed_matmul_rows_kernel"
    }


@pytest.mark.parametrize("tma", ["1", "0"])
def test_autocast_operands_on_both_kernel_kinds(monkeypatch, launches, bf16_dot, tma):
    """bf16 dy_c with float32 W and x (autocast, float32 master weights), through the TMA and
    the pointer kernels: the float32 tiles are rounded to bf16 in the kernel and dW comes from
    the float32 accumulator (float32 tolerance against the rounded operands' product)."""
    monkeypatch.setenv("TRITON_MEBP_PRODUCTS", "triton")
    monkeypatch.setenv("TRITON_MEBP_TMA", tma)
    ops = backend.triton_ops()
    B, N, M, k = 19, 90, 48, 7
    dy = torch.randn(B, N, device=DEVICE).to(torch.bfloat16)
    x, w = torch.randn(B, M, device=DEVICE), torch.randn(N, M, device=DEVICE)
    idx, dy_c = ops.unified_select(dy, k)
    rows = idx.long()
    reference = dy.double()[:, rows]
    rounded_x, rounded_w = x.bfloat16().double(), w.bfloat16().double()
    launches.clear()
    dx = ops.gathered_input_grad(dy_c, w, idx)
    assert dx.dtype == torch.bfloat16
    assert_close(dx, reference @ rounded_w[rows], torch.bfloat16)
    rows_dw = ops.gathered_weight_grad(dy_c, x, idx, dtype=torch.float32)
    assert rows_dw.dtype == torch.float32
    assert_close(rows_dw, reference.t() @ rounded_x, torch.float32)
    assert not torch.allclose(rows_dw.double(), reference.t() @ x.double(), rtol=1e-4, atol=1e-4)
    dense = ops.gathered_weight_grad(dy_c, x, idx, out=torch.zeros(N, M, device=DEVICE))
    assert_close(dense[rows], reference.t() @ rounded_x, torch.float32)
    suffix = "_tma_kernel" if tma == "1" else "_kernel"
    assert set(launches) == {f"_gathered_rows_matmul{suffix}", f"_transposed_matmul_rows{suffix}"}


def test_a_bad_tma_choice_is_named(monkeypatch, launches):
    monkeypatch.setenv("TRITON_MEBP_PRODUCTS", "triton")
    monkeypatch.setenv("TRITON_MEBP_TMA", "yes")
    dy_c, w = torch.randn(3, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    with pytest.raises(ValueError, match="TRITON_MEBP_TMA must be '0' or '1'"):
        backend.triton_ops().gathered_input_grad(dy_c, w, torch.tensor([1, 3, 4, 0]))
    assert launches == []


def test_tma_tuning_keys_tell_the_operands_dtypes_apart():
    # Under autocast x may be float32 or bf16 at the same sizes: different configs fit.
    from triton_mebp.kernels import gathered

    dy_c = torch.zeros(8, 64, dtype=torch.bfloat16)
    keys = set()
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.zeros(8, 32, dtype=dtype)
        named = dict(
            a_desc=gathered._descriptor(dy_c, 64),
            x_desc=gathered._descriptor(x, 32),
            idx_ptr=torch.zeros(64, dtype=torch.int64),
            out_ptr=torch.zeros(64, 32, dtype=torch.float32),
            B_BUCKET=8,
            M=32,
            K=64,
        )
        keys.add(gathered.transposed_matmul_rows_tma._tuning_key(named))
    assert len(keys) == 2
