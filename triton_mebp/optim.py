"""Row-sparse optimizers: update only the rows that received a gradient.

``RowSGD``, ``RowAdagrad``, ``RowAdam`` and ``RowAdamW`` are ``torch.optim.Optimizer`` subclasses.
A parameter whose gradient is row-sparse (``grad="sparse"``: a ``torch.sparse_coo`` tensor with
one sparse dimension) is updated on its gradient's rows only, with the backend's fused row
update (one Triton kernel on CUDA, PyTorch ops on the CPU); rows not in the gradient are neither
read nor written, and their state does not decay. Each such parameter keeps a per-row step count ``row_step`` (float32,
``(param.shape[0],)``); Adam bias-corrects every row with its own count. Parameters with dense
gradients get exactly the update of the matching ``torch.optim`` class. See docs/optim.md.

State layout (relied on by the model simplifier): per-element state tensors have the parameter's
shape, ``row_step`` has shape ``(param.shape[0],)``, ``step`` is a 0-d float32 CPU tensor (on the
parameter's device with ``capturable=True``).

CUDA graphs: a step reads nothing on the host once each parameter's state exists (after a warm-up
step), for ``RowSGD`` always and for ``RowAdagrad``/``RowAdam``/``RowAdamW`` with
``capturable=True`` (as in ``torch.optim``: the step count of parameters with dense gradients then
lives on the device; row-sparse parameters count steps per row on the device anyway).
"""

import math
from collections.abc import Iterable
from typing import Any

import torch

from . import backend, torch_ops

# What torch.optim optimizers take: parameters, or parameter groups (dicts with "params").
ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _check_range(name, value, low=0.0, high=math.inf, high_open=False):
    value_f = float(value)
    above = value_f >= high if high_open else value_f > high
    if not value_f >= low or above:  # also rejects NaN
        raise ValueError(
            f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}"
        )


def _rows_view(tensor, what):
    """``tensor`` as a 2-D (rows x rest) view sharing its storage, so in-place writes land."""
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 0:
        raise ValueError(f"{what} is 0-d and has no rows to update")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{what} of shape {tuple(tensor.shape)} must be contiguous for a "
            "row-sparse update (only 2-D tensors may be strided)"
        )
    return tensor.view(tensor.shape[0], math.prod(tensor.shape[1:]))


def _row_sparse_parts(param, grad):
    """``(rows, values)`` of a row-sparse gradient: distinct row indices, (rows x rest) values."""
    if grad.layout != torch.sparse_coo:
        raise ValueError(f"sparse gradients must be torch.sparse_coo, got {grad.layout}")
    if tuple(grad.shape) != tuple(param.shape):
        raise ValueError(
            f"gradient shape {tuple(grad.shape)} does not match the parameter's "
            f"{tuple(param.shape)}"
        )
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"a row-sparse gradient has one sparse dimension (rows), got "
            f"sparse_dim={grad.sparse_dim()} for a parameter of shape "
            f"{tuple(param.shape)}"
        )
    if grad.device != param.device:
        raise ValueError(f"gradient on {grad.device}, parameter on {param.device}")
    grad = grad.coalesce()  # sums duplicate rows; a new tensor, p.grad is left as it is
    rows = grad.indices()[0]
    if torch_ops.host_reads_are_free(rows) and rows.numel():  # on a GPU it would cost a sync
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= param.shape[0]:
            raise ValueError(
                f"row indices of the sparse gradient must be in "
                f"[0, {param.shape[0]}), got [{low}, {high}]"
            )
    values = grad.values()
    return rows, values.reshape(values.shape[0], math.prod(param.shape[1:]))


class _RowOptimizer(torch.optim.Optimizer):
    """Shared step loop: row-sparse gradients go to ``_rows`` (the backend's fused row update),
    dense ones to ``_dense`` (the torch.optim update)."""

    _per_element: tuple[str, ...] = ()  # names of the per-element state tensors

    def _init_state(self, param, state, group):
        raise NotImplementedError

    def _dense(self, param, grad, state, group):
        raise NotImplementedError

    def _rows(self, ops, param, rows, values, state, group):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, param.grad, group)
        return loss

    def _update(self, param, grad, group):
        if param.is_complex():
            raise ValueError(f"{type(self).__name__} does not support complex parameters")
        state = self.state[param]
        if not state:
            on = param.device if group.get("capturable") else "cpu"
            state["step"] = torch.zeros((), dtype=torch.float32, device=on)
            self._init_state(param, state, group)
        for name in self._per_element:
            if name in state and tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"optimizer state {name!r} has shape {tuple(state[name].shape)} "
                    f"but the parameter has {tuple(param.shape)}"
                )
        if grad.layout not in (torch.strided, torch.sparse_coo):
            raise ValueError(f"gradients must be dense or torch.sparse_coo, got {grad.layout}")
        if grad.is_sparse:
            rows, values = _row_sparse_parts(param, grad)
        elif "row_step" in state:
            # A dense gradient for a parameter with per-row state: every row is selected.
            if tuple(grad.shape) != tuple(param.shape):
                raise ValueError(
                    f"gradient shape {tuple(grad.shape)} does not match the "
                    f"parameter's {tuple(param.shape)}"
                )
            rows = torch.arange(param.shape[0], device=param.device)
            values = grad.reshape(param.shape[0], math.prod(param.shape[1:]))
        else:
            self._dense(param, grad, state, group)
            state["step"] += 1
            return
        if values.dtype != param.dtype:
            raise ValueError(
                f"gradient dtype {values.dtype} does not match the parameter's {param.dtype}"
            )
        if "row_step" not in state:
            # Dense steps so far updated every row.
            state["row_step"] = (
                state["step"].to(param.device, torch.float32).expand(param.shape[0]).clone()
            )
        if tuple(state["row_step"].shape) != (param.shape[0],):
            raise ValueError(
                f"optimizer state 'row_step' has shape "
                f"{tuple(state['row_step'].shape)}, expected ({param.shape[0]},)"
            )
        for name in self._per_element:
            if name in state and param.dim() != 2 and not state[name].is_contiguous():
                state[name] = state[name].contiguous()
        self._rows(backend.ops_for(param), param, rows, values, state, group)
        state["step"] += 1

    def _adopt_stepless_state(self, state) -> bool:
        """Turns a saved state without a step count (another optimizer's) into this one's, in
        place; False where it cannot."""
        return False

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer``'s, but ``row_step`` stays float32 (not the param dtype).

        A state without a step count (``torch.optim.SGD``'s) is adopted where the optimizer
        knows how (``RowSGD``) and refused with a ValueError otherwise, before anything changes.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_row_steps = {
            i: s["row_step"]
            for i, s in state_dict["state"].items()
            if isinstance(s, dict) and "row_step" in s
        }
        params = [p for g in self.param_groups for p in g["params"]]
        stepless = [
            i
            for i, s in state_dict["state"].items()
            if isinstance(s, dict) and s and "step" not in s
        ]
        for saved_id in stepless:
            if not self._adopt_stepless_state(dict(state_dict["state"][saved_id])):
                raise ValueError(
                    f"saved state {sorted(state_dict['state'][saved_id])} of "
                    f"parameter {saved_id} has no 'step' entry: it is not the state "
                    f"of {type(self).__name__} or of its torch.optim counterpart"
                )
        for saved_id, param in zip(saved_ids, params):  # checked before anything changes
            row_step = saved_row_steps.get(saved_id)
            if row_step is not None and tuple(row_step.shape) != tuple(param.shape[:1]):
                raise ValueError(
                    f"saved 'row_step' has shape {tuple(row_step.shape)}, the "
                    f"parameter has shape {tuple(param.shape)}"
                )
        super().load_state_dict(state_dict)
        for saved_id, param in zip(saved_ids, params):
            if saved_id in stepless:
                self._adopt_stepless_state(self.state[param])
            if saved_id in saved_row_steps:
                self.state[param]["row_step"] = saved_row_steps[saved_id].to(
                    device=param.device, dtype=torch.float32, copy=True
                )


class RowSGD(_RowOptimizer):
    """SGD with momentum, Nesterov and weight decay, as ``torch.optim.SGD``, row-sparse aware.

    On a row-sparse gradient only its rows move; weight decay applies to those rows only, and a
    row's momentum buffer is updated (and, on its first update, set to the gradient) only when the
    row is selected.
    """

    _per_element = ("momentum_buffer",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        _check_range("lr", lr)
        _check_range("momentum", momentum)
        _check_range("weight_decay", weight_decay)
        _check_range("dampening", dampening, 0.0, 1.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
            ),
        )

    def _init_state(self, param, state, group):
        pass  # the momentum buffer comes with the first update: a dense one sets it to d_p

    def _adopt_stepless_state(self, state) -> bool:
        # torch.optim.SGD keeps only the momentum buffer (None without momentum); a buffer was
        # set at its first step, which updated every row.
        if not set(state) <= {"momentum_buffer"}:
            return False
        if state.get("momentum_buffer") is None:
            state.clear()
        else:
            state["step"] = torch.ones((), dtype=torch.float32)
        return True

    @staticmethod
    def _buffer(param, state):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _dense(self, param, grad, state, group):
        d_p = grad if group["weight_decay"] == 0 else grad.add(param, alpha=group["weight_decay"])
        if group["momentum"]:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d_p.detach().clone()
            else:
                buf.mul_(group["momentum"]).add_(d_p, alpha=1 - group["dampening"])
            d_p = d_p.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        param.add_(d_p, alpha=-group["lr"])

    def _rows(self, ops, param, rows, values, state, group):
        buf = self._buffer(param, state) if group["momentum"] else None
        ops.row_sgd_step(
            _rows_view(param, "parameter"),
            rows,
            values,
            state["row_step"],
            None if buf is None else _rows_view(buf, "momentum_buffer"),
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
        )


class RowAdagrad(_RowOptimizer):
    """Adagrad as ``torch.optim.Adagrad``, row-sparse aware; ``lr_decay`` uses each row's count."""

    _per_element = ("sum",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        capturable: bool = False,
    ) -> None:
        _check_range("lr", lr)
        _check_range("lr_decay", lr_decay)
        _check_range("weight_decay", weight_decay)
        _check_range("initial_accumulator_value", initial_accumulator_value)
        _check_range("eps", eps)
        super().__init__(
            params,
            dict(
                lr=lr,
                lr_decay=lr_decay,
                weight_decay=weight_decay,
                initial_accumulator_value=initial_accumulator_value,
                eps=eps,
                capturable=capturable,
            ),
        )

    def _init_state(self, param, state, group):
        state["sum"] = torch.full_like(
            param, group["initial_accumulator_value"], memory_format=torch.preserve_format
        )

    def _dense(self, param, grad, state, group):
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        state["sum"].addcmul_(grad, grad, value=1)
        denom = state["sum"].sqrt().add_(group["eps"])
        if group["capturable"]:  # the step count stays on the device
            clr = group["lr"] / (1 + state["step"].double() * group["lr_decay"])
            param.sub_(grad.div(denom).mul_(clr))
        else:
            clr = group["lr"] / (1 + float(state["step"]) * group["lr_decay"])
            param.addcdiv_(grad, denom, value=-clr)

    def _rows(self, ops, param, rows, values, state, group):
        ops.row_adagrad_step(
            _rows_view(param, "parameter"),
            rows,
            values,
            state["row_step"],
            _rows_view(state["sum"], "sum"),
            lr=group["lr"],
            lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
        )


class RowAdam(_RowOptimizer):
    """Adam as ``torch.optim.Adam`` (L2 weight decay), row-sparse aware, bias-corrected per row.

    On a row-sparse gradient only its rows move; each row's moments are updated and its step
    count incremented only when the row is selected, and its bias correction uses its own count.
    """

    _per_element = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        capturable: bool = False,
    ) -> None:
        _check_range("lr", lr)
        _check_range("eps", eps)
        _check_range("weight_decay", weight_decay)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        _check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        _check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        super().__init__(
            params,
            dict(
                lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, capturable=capturable
            ),
        )

    def _init_state(self, param, state, group):
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _dense(self, param, grad, state, group):
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        if wd:
            if self._decoupled:
                param.mul_(1 - lr * wd)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["capturable"]:  # the step count stays on the device
            step = state["step"].double() + 1
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(group["eps"])
            param.sub_(exp_avg.div(denom).mul_(lr / (1 - beta1**step)))
        else:
            step = float(state["step"]) + 1
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
            param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))

    def _rows(self, ops, param, rows, values, state, group):
        beta1, beta2 = group["betas"]
        ops.row_adam_step(
            _rows_view(param, "parameter"),
            rows,
            values,
            state["row_step"],
            _rows_view(state["exp_avg"], "exp_avg"),
            _rows_view(state["exp_avg_sq"], "exp_avg_sq"),
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=self._decoupled,
        )


class RowAdamW(RowAdam):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``), row-sparse aware.

    On a row-sparse gradient the decay applies to the selected rows only.
    """

    _decoupled = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        capturable: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            capturable=capturable,
        )


def sgd_step_rows(params: Iterable[torch.Tensor], lr: float) -> None:
    """Plain SGD ``p -= lr * p.grad`` that touches only the gradient's rows when it is row-sparse
    (one ``RowSGD`` step without momentum); dense gradients get the ordinary update."""
    with_grads = [p for p in params if p.grad is not None]
    if with_grads:
        RowSGD(with_grads, lr=lr).step()


__all__ = ["RowAdagrad", "RowAdam", "RowAdamW", "RowSGD", "sgd_step_rows"]
