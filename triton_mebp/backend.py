"""The backend contract and the choice of backend.

A backend is whatever provides every operation of ``Backend`` below, under those names and
signatures. Two implement it: the PyTorch-ops backend (``triton_mebp.torch_ops``, for CPU tensors)
and the Triton launchers (``triton_mebp.kernels``, for CUDA tensors). Indices cross the boundary
as int64, ascending where a set of rows or columns is returned.

``set_backend("triton")`` (or ``TRITON_MEBP_BACKEND=triton``) forces the kernels on CPU tensors
as well, which works under Triton's interpreter (``TRITON_INTERPRET=1``); that is how the test
suite runs every kernel without a GPU. ``"torch"`` forces PyTorch ops everywhere.
Tensors of a dtype the kernels do not compute (float64) always take the PyTorch ops.
"""

import os
import types
from typing import Literal, Protocol, overload

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
# The dtypes of kernels/_checks.py: written out here so that choosing a backend imports no Triton.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_chosen: str | None = None
_triton_ops: "Backend | None" = None


class Backend(Protocol):
    """Every operation the library needs from a backend."""

    name: str

    # Selection. ``hits`` (int64, N), if given, is a per-column counter updated in place.
    def unified_select(
        self, dy: Tensor, k: int, hits: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Batch-shared top-k columns of ``dy`` (B x N) by ``sum_b |dy[b, n]|``: ``(idx, dy_c)``,
        idx ascending (k), ``dy_c = dy[:, idx]`` (B x k); hits += B at the selected columns."""
        ...

    def unified_select_and_bias(
        self, dy: Tensor, k: int, hits: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``unified_select`` and the bias gradient ``db = dy.sum(0)`` (dtype of ``dy``):
        ``(idx, dy_c, db)``, from one pass over ``dy`` where the backend can."""
        ...

    def per_example_select(
        self, dy: Tensor, k: int, hits: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Top-k of ``|dy[b]|`` per row: ``(values, idx)``, both B x k, idx ascending per row;
        hits += 1 per selection."""
        ...

    # Products of the backward pass on the selected entries. Operands may differ in dtype
    # (autocast: bf16/fp16 ``dy_c``/``values`` and ``x``, float32 ``weight``): matrix products
    # cast the other operand to ``dy_c``'s dtype (gathered rows only, never the whole weight)
    # and accumulate in float32; the per-example sums widen both operands to float32.
    def gathered_input_grad(self, dy_c: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
        """``dy_c @ weight[idx]`` (B x M, dtype of ``dy_c``)."""
        ...

    def gathered_weight_grad(
        self,
        dy_c: Tensor,
        x: Tensor,
        idx: Tensor,
        out: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``dy_c.T @ x`` (k x M, ``dtype``, default ``dy_c``'s), or written into the rows ``idx``
        of ``out`` and ``out`` returned."""
        ...

    def per_example_input_grad(self, values: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
        """``dx[b] = sum_j values[b, j] * weight[idx[b, j]]`` (B x M, dtype of ``values``)."""
        ...

    @overload
    def per_example_weight_grad(
        self,
        values: Tensor,
        idx: Tensor,
        x: Tensor,
        n_rows: int,
        dense: Literal[False] = False,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def per_example_weight_grad(
        self,
        values: Tensor,
        idx: Tensor,
        x: Tensor,
        n_rows: int,
        dense: Literal[True],
        dtype: torch.dtype | None = None,
    ) -> tuple[None, Tensor]: ...

    def per_example_weight_grad(
        self,
        values: Tensor,
        idx: Tensor,
        x: Tensor,
        n_rows: int,
        dense: bool = False,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        """``(rows, grad)``: the distinct selected rows ascending and their gradient rows (their
        number read on the host once), or with ``dense=True`` ``(None, grad)`` with the whole
        n_rows x M gradient (zero rows where nothing was selected), read nothing on the host; the
        gradient in ``dtype`` (default ``values``'s)."""
        ...

    # Row-sparse optimizer updates, in place on the rows ``idx`` (distinct) of a 2-D parameter
    # and its state; ``row_step`` (float32, one per parameter row) counts each row's updates.
    def row_sgd_step(
        self,
        param: Tensor,
        idx: Tensor,
        grad: Tensor,
        row_step: Tensor,
        momentum_buffer: Tensor | None,
        *,
        lr: float,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
    ) -> None: ...

    def row_adagrad_step(
        self,
        param: Tensor,
        idx: Tensor,
        grad: Tensor,
        row_step: Tensor,
        state_sum: Tensor,
        *,
        lr: float,
        lr_decay: float,
        weight_decay: float,
        eps: float,
    ) -> None: ...

    def row_adam_step(
        self,
        param: Tensor,
        idx: Tensor,
        grad: Tensor,
        row_step: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
    ) -> None: ...

    # Inference of compacted models.
    def linear_act(
        self, x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "identity"
    ) -> Tensor:
        """``act(x @ weight.T + bias)`` for a 2-D ``x``."""
        ...

    def fused_mlp(
        self,
        x: Tensor,
        first_weight: Tensor,
        first_bias: Tensor,
        rest_weight: Tensor,
        rest_bias: Tensor,
        out_features: int,
        hidden_activation: str = "relu",
        output_activation: str = "identity",
    ) -> Tensor:
        """A whole MLP: ``first_weight`` (H x K) then the zero-padded later layers packed as
        ``rest_weight`` (L x W x W) and ``rest_bias`` (L x W); B x out_features."""
        ...


OPERATIONS = tuple(
    name for name in vars(Backend) if not name.startswith("_") and callable(vars(Backend)[name])
)


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


def triton_ops() -> Backend:
    """The Triton launchers, gathered from their kernel families on first use."""
    global _triton_ops
    if _triton_ops is None:
        from .kernels import fused_mlp, gathered, optim_rows, selection

        families = (selection, gathered, optim_rows, fused_mlp)
        found = {
            name: getattr(family, name)
            for family in families
            for name in OPERATIONS
            if hasattr(family, name)
        }
        missing = sorted(set(OPERATIONS) - set(found))
        if missing:
            raise ImportError(f"the Triton kernels lack backend operations {missing}")
        _triton_ops = types.SimpleNamespace(name="triton", **found)  # type: ignore[assignment]
    return _triton_ops  # type: ignore[return-value]


def ops_for(tensor: torch.Tensor) -> Backend:
    """The backend to use for ``tensor`` under the current backend choice; PyTorch ops for
    dtypes the kernels do not support (float64), whatever the choice."""
    name = get_backend()
    if tensor.dtype not in KERNEL_DTYPES:
        name = "torch"
    if name == "auto":
        name = "triton" if tensor.is_cuda else "torch"
    if name == "torch":
        from . import torch_ops

        return torch_ops  # type: ignore[return-value]  # a module implementing the contract
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors (got a tensor on {tensor.device}); on the CPU "
            "it runs only under Triton's interpreter (TRITON_INTERPRET=1 set before import)"
        )
    return triton_ops()
