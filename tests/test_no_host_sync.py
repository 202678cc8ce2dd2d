"""The unified backward, and the per-example one with dense gradients, ask the device nothing:
no ``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero``, ``unique`` or truth test of a tensor
from the library's code (on a GPU each would wait for the device and forbid CUDA-graph capture).
Checked on the CPU: those calls raise when made from a file of ``triton_mebp`` or ``kernels/``
(the interpreter and PyTorch may make them internally, on the library's behalf)."""

import functools
import sys
from pathlib import Path

import pytest
import torch

import triton_mebp as mebp
from conftest import DEVICE

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = tuple(str(p) for p in (ROOT / "triton_mebp", ROOT / "kernels"))
METHODS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "unique",
    "unique_consecutive",
    "__bool__",
    "__int__",
    "__float__",
)
FUNCTIONS = ("nonzero", "unique", "unique_consecutive", "argwhere", "masked_select", "bincount")


class HostSync(AssertionError):
    pass


def _guard(name, original):
    def guarded(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(LIBRARY):
            raise HostSync(f"{name} called from {caller}:{sys._getframe(1).f_lineno}")
        return original(*args, **kwargs)

    return guarded


@pytest.fixture
def no_host_sync(monkeypatch):
    # The PyTorch ops may read values on the host only for CPU tensors: take the device path.
    from triton_mebp import torch_ops

    monkeypatch.setattr(torch_ops, "host_reads_are_free", lambda tensor: False)
    for name in METHODS:
        monkeypatch.setattr(
            torch.Tensor, name, _guard(f"Tensor.{name}", getattr(torch.Tensor, name))
        )
    for name in FUNCTIONS:
        monkeypatch.setattr(torch, name, _guard(f"torch.{name}", getattr(torch, name)))


def test_the_guard_catches_a_sync_in_library_code(no_host_sync, monkeypatch):
    from triton_mebp import optim, torch_ops

    monkeypatch.setattr(torch_ops, "host_reads_are_free", lambda tensor: True)

    grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 1]]), torch.ones(2, 3), (4, 3), check_invariants=False
    )
    with pytest.raises(HostSync):
        optim._row_sparse_parts(torch.zeros(4, 3), grad)  # checks the index range on the host


@pytest.mark.parametrize("grad", ["dense", "sparse"])
@pytest.mark.parametrize(
    "backend_name,products", [("torch", ""), ("triton", "triton"), ("triton", "cublas")]
)
def test_unified_backward_makes_no_host_sync(
    no_host_sync, monkeypatch, backend_name, products, grad
):
    if products:  # the Triton backend's gathered products: its kernels or cuBLAS
        monkeypatch.setenv("TRITON_MEBP_PRODUCTS", products)
    before = mebp.get_backend()
    mebp.set_backend(backend_name)
    try:
        layer = mebp.MeLinear(40, 70, k=9, grad=grad, count_hits=True).to(DEVICE)
        x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
        layer(x).square().sum().backward()
    finally:
        mebp.set_backend(before)
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None


@pytest.mark.parametrize("grad", ["dense", "sparse"])
def test_unified_backward_on_tma_products_makes_no_host_sync(no_host_sync, monkeypatch, grad):
    # float16 operands with aligned rows: both products read them through TMA descriptors.
    from triton_mebp.kernels import gathered

    monkeypatch.setenv("TRITON_MEBP_PRODUCTS", "triton")
    monkeypatch.setenv("TRITON_MEBP_TMA", "1")
    taken = []
    original = gathered._tma_readable
    monkeypatch.setattr(
        gathered, "_tma_readable", lambda *t: taken.append(original(*t)) or taken[-1]
    )
    before = mebp.get_backend()
    mebp.set_backend("triton")
    try:
        layer = mebp.MeLinear(40, 70, k=9, grad=grad).to(DEVICE, torch.float16)
        x = torch.randn(6, 40, device=DEVICE, dtype=torch.float16, requires_grad=True)
        layer(x).float().square().sum().backward()
    finally:
        mebp.set_backend(before)
    hopper = DEVICE.type != "cuda" or torch.cuda.get_device_capability()[0] >= 9
    assert taken == [hopper, hopper]  # dx, dW (the interpreter runs the descriptors too)
    assert x.grad is not None and layer.weight.grad is not None


def test_wide_unified_selection_makes_no_host_sync(no_host_sync, monkeypatch):
    # The split search of wide layers (several programs per pass), lowered to this layer's width.
    from triton_mebp.kernels import selection

    monkeypatch.setattr(selection, "SPLIT_MIN_COLUMNS", 64)
    monkeypatch.setattr(selection, "SPLIT_SLICE", 16)
    widths = []
    original = selection._top_columns_split
    monkeypatch.setattr(
        selection, "_top_columns_split", lambda s, *a: widths.append(len(s)) or original(s, *a)
    )
    before = mebp.get_backend()
    mebp.set_backend("triton")
    try:
        layer = mebp.MeLinear(40, 70, k=9, count_hits=True).to(DEVICE)
        layer(torch.randn(6, 40, device=DEVICE)).square().sum().backward()
    finally:
        mebp.set_backend(before)
    assert widths == [70]
    assert layer.weight.grad is not None and layer.bias.grad is not None


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_per_example_backward_with_dense_gradients_makes_no_host_sync(no_host_sync, backend_name):
    before = mebp.get_backend()
    mebp.set_backend(backend_name)
    try:
        layer = mebp.MeLinear(40, 70, k=9, mode="per_example", count_hits=True).to(DEVICE)
        x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
        layer(x).square().sum().backward()
    finally:
        mebp.set_backend(before)
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
    assert int(layer.hits.sum()) == 6 * 9


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_row_sparse_gradients_stay_coalesced_through_accumulation(any_backend, mode):
    layer = mebp.MeLinear(12, 30, k=4, mode=mode, grad="sparse").to(DEVICE)
    x = torch.randn(5, 12, device=DEVICE)
    layer(x).square().sum().backward()
    first = layer.weight.grad
    assert first.is_coalesced()  # the optimizers' coalesce() is then free (no sort, no sync)
    rows = first._indices()[0]
    assert torch.equal(rows, rows.unique())
    # A second backward sums into the gradient: it must stay right, flagged or not.
    expected = first.to_dense() * 2
    layer(x).square().sum().backward()
    second = layer.weight.grad
    assert torch.allclose(second.to_dense(), expected)
    if second.is_coalesced():
        assert torch.equal(second._indices()[0], second._indices()[0].unique())


def test_torch_ops_device_top_k_equals_the_cpu_path():
    from triton_mebp import torch_ops

    scores = torch.rand(6, 50)
    scores[1, 10:20] = 0.5  # ties straddling the threshold
    scores[2] = 1.0  # all equal
    scores[3, 7] = float("nan")
    scores[4, 3] = float("inf")
    for k in (1, 5, 12, 49, 50):
        assert torch.equal(torch_ops._top_k_on_device(scores, k), torch_ops._top_k(scores, k)), k


def _mlp(grad):
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48), torch.nn.Tanh()
    )
    return mebp.convert(model, k=0.1, grad=grad, skip_output=False).to(DEVICE)


@pytest.mark.parametrize(
    "grad, optimizer",
    [
        ("dense", functools.partial(torch.optim.SGD, momentum=0.9)),
        ("sparse", functools.partial(mebp.RowSGD, momentum=0.9)),
        ("sparse", functools.partial(mebp.RowAdagrad, lr_decay=0.01, capturable=True)),
        ("sparse", functools.partial(mebp.RowAdam, capturable=True)),
    ],
    ids=["SGD", "RowSGD", "RowAdagrad", "RowAdam"],
)
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_a_training_step_makes_no_host_sync(request, backend_name, grad, optimizer):
    """Forward, unified backward and optimizer step of a converted MLP: what a CUDA graph would
    capture. The first step (state set-up) runs unguarded, as a capture's warm-up steps do."""
    before = mebp.get_backend()
    mebp.set_backend(backend_name)
    try:
        model = _mlp(grad)
        opt = optimizer(model.parameters(), lr=0.05)
        x, target = torch.randn(8, 24, device=DEVICE), torch.randn(8, 48, device=DEVICE)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), target).backward()
            opt.step()

        step()
        weights = [p.detach().clone() for p in model.parameters()]
        request.getfixturevalue("no_host_sync")
        step()
    finally:
        mebp.set_backend(before)
    assert all(not torch.equal(w, p) for w, p in zip(weights, model.parameters()))
