"""Backend choice: Triton kernels for CUDA tensors, PyTorch ops for CPU tensors.

``set_backend("triton")`` (or ``TRITON_MEBP_BACKEND=triton``) forces the kernels on CPU tensors
as well, which works under Triton's interpreter (``TRITON_INTERPRET=1``); that is how the test
suite runs every kernel without a GPU. ``"torch"`` forces PyTorch ops everywhere.
Tensors of a dtype the kernels do not compute (float64) always take the PyTorch ops.
"""
import os
import types

import torch

from . import torch_ops

BACKENDS = ("auto", "torch", "triton")
# The dtypes of kernels/_checks.py: written out here so that choosing a backend imports no Triton.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_chosen: str | None = None
_triton_ops = None


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every meProp layer: "auto", "torch" or "triton"."""
    global _chosen
    _chosen = _check(name, "set_backend")


def get_backend() -> str:
    if _chosen is not None:
        return _chosen
    return _check(os.environ.get("TRITON_MEBP_BACKEND", "auto"), "TRITON_MEBP_BACKEND")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_ops():
    """The kernel launchers, under the same names as ``torch_ops`` (imported on first use)."""
    global _triton_ops
    if _triton_ops is None:
        from .kernels import gathered, row_update, selection
        _triton_ops = types.SimpleNamespace(
            unified_select=selection.unified_select,
            per_example_select=selection.per_example_select,
            gathered_input_grad=gathered.gathered_input_grad,
            gathered_weight_grad=gathered.gathered_weight_grad,
            per_example_input_grad=gathered.per_example_input_grad,
            per_example_weight_grad=gathered.per_example_weight_grad,
            row_sgd_update=row_update.row_sgd_update,
        )
    return _triton_ops


def ops_for(tensor):
    """The operations to use for ``tensor`` under the current backend choice; PyTorch ops for
    dtypes the kernels do not support (float64), whatever the choice."""
    name = get_backend()
    if tensor.dtype not in KERNEL_DTYPES:
        return torch_ops
    if name == "auto":
        name = "triton" if tensor.is_cuda else "torch"
    if name == "torch":
        return torch_ops
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors (got a tensor on {tensor.device}); on the CPU "
            "it runs only under Triton's interpreter (TRITON_INTERPRET=1 set before import)")
    return triton_ops()
