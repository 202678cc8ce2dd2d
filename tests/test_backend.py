"""Backend choice: the switch, the environment variable and their errors."""

import pytest
import torch

import triton_mebp as mebp
from triton_mebp import backend, torch_ops


@pytest.fixture
def restore_backend():
    before = backend._chosen
    yield
    backend._chosen = before


def test_set_backend_validates(restore_backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        mebp.set_backend("cuda")
    mebp.set_backend("torch")
    assert mebp.get_backend() == "torch"
    assert backend.ops_for(torch.zeros(1)) is torch_ops


def test_environment_variable_chooses_when_unset(restore_backend, monkeypatch):
    backend._chosen = None
    monkeypatch.setenv("TRITON_MEBP_BACKEND", "triton")
    assert mebp.get_backend() == "triton"
    monkeypatch.setenv("TRITON_MEBP_BACKEND", "gpu")
    with pytest.raises(ValueError, match="TRITON_MEBP_BACKEND"):
        mebp.get_backend()


def test_auto_uses_pytorch_ops_for_cpu_tensors(restore_backend):
    mebp.set_backend("auto")
    assert backend.ops_for(torch.zeros(1)) is torch_ops


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(restore_backend, monkeypatch):
    mebp.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.ops_for(torch.zeros(1))
    layer = mebp.MeLinear(3, 8, k=2)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        layer(torch.randn(2, 3)).sum().backward()


def test_both_backends_implement_the_whole_contract():
    import inspect

    contract = backend.Backend
    assert {
        "unified_select",
        "per_example_select",
        "gathered_input_grad",
        "gathered_weight_grad",
        "per_example_input_grad",
        "per_example_weight_grad",
        "row_sgd_step",
        "row_adagrad_step",
        "row_adam_step",
        "linear_act",
        "fused_mlp",
    } <= set(backend.OPERATIONS)
    for ops in (torch_ops, backend.triton_ops()):
        for name in backend.OPERATIONS:
            expected = inspect.signature(getattr(contract, name))
            expected = expected.replace(parameters=list(expected.parameters.values())[1:])
            actual = inspect.signature(getattr(ops, name))
            assert [(p.name, p.kind, p.default) for p in actual.parameters.values()] == [
                (p.name, p.kind, p.default) for p in expected.parameters.values()
            ], (ops.name, name)
    assert torch_ops.name == "torch" and backend.triton_ops().name == "triton"


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_selection_returns_int64_indices_on_both_backends(restore_backend, name):
    mebp.set_backend(name)
    dy = torch.randn(6, 20)
    ops = backend.ops_for(dy)
    idx, _ = ops.unified_select(dy, 5)
    _, idx_pe = ops.per_example_select(dy, 5)
    assert idx.dtype == idx_pe.dtype == torch.int64
