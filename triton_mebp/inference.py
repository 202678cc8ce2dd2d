"""``optimize_for_inference``: a compacted model's Linear(+activation) chains as fused kernels.

On CUDA, each ``nn.Sequential`` run of Linear layers (each optionally followed by an activation;
dropout and identity modules are dropped, as in eval mode) becomes a ``FusedMLP`` (one kernel for
the whole run, hidden activations kept on chip) when every layer after the first is at most
``MAX_FUSED_WIDTH`` wide, or else ``FusedLinear`` modules (bias and activation fused into the
GEMM); both run as ``torch.ops.triton_mebp`` operators, so such models compile and export. On
the CPU the model stays plain PyTorch. Inference only: the kernels have no backward, so an input
that needs a gradient takes the PyTorch path.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import backend
from .library import OPS
from .modules import MeLinear
from .torch_ops import ACTIVATIONS as TORCH_ACTIVATIONS

ACTIVATION_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
PASS_THROUGH = (nn.Dropout, nn.Identity)


def _activation_name(module):
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    return ACTIVATION_MODULES.get(type(module))


def _backend_handles(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The backend's inference ops for inputs they handle; plain PyTorch (with autograd and its
    own errors) for inputs that need a gradient or do not match the weights."""
    return not (
        (torch.is_grad_enabled() and x.requires_grad)
        or x.dtype != weight.dtype
        or x.device != weight.device
        or x.dim() == 0
    )


def _kernels():
    from .kernels import fused_mlp

    return fused_mlp


def _frozen(tensor):
    return None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)


class FusedLinear(nn.Module):
    """``act(x @ W.T + b)``: one kernel on CUDA, the backend's ``linear_act``."""

    def __init__(self, linear: nn.Linear, activation: str = "identity"):
        super().__init__()
        if activation not in TORCH_ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {tuple(TORCH_ACTIVATIONS)}, got {activation!r}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = _frozen(linear.weight), _frozen(linear.bias)
        self.activation = activation

    def forward(self, x):
        if not _backend_handles(x, self.weight):
            return TORCH_ACTIVATIONS[self.activation](F.linear(x, self.weight, self.bias))
        y = OPS.linear_act.default(
            x.reshape(-1, self.in_features), self.weight, self.bias, self.activation
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, activation={self.activation}"


class FusedMLP(nn.Module):
    """A chain of Linear layers with one hidden activation, run as one kernel on CUDA.

    ``linears``: the layers in order; ``hidden_activation`` follows every layer but the last,
    ``output_activation`` the last. Widths after the first layer must fit the fused kernel.
    """

    def __init__(
        self, linears, hidden_activation: str = "relu", output_activation: str = "identity"
    ):
        super().__init__()
        for name in (hidden_activation, output_activation):
            if name not in TORCH_ACTIVATIONS:
                raise ValueError(
                    f"activation must be one of {tuple(TORCH_ACTIVATIONS)}, got {name!r}"
                )
        if len(linears) < 2:
            raise ValueError(f"FusedMLP needs at least 2 linear layers, got {len(linears)}")
        for i, (a, b) in enumerate(zip(linears[:-1], linears[1:])):
            if a.out_features != b.in_features:
                raise ValueError(
                    f"FusedMLP: layer {i} has {a.out_features} outputs but layer {i + 1} "
                    f"reads {b.in_features}"
                )
        kernels = _kernels()
        widths = [lin.out_features for lin in linears]
        if max(widths) > kernels.MAX_FUSED_WIDTH:
            raise ValueError(f"FusedMLP: layer widths {widths} exceed {kernels.MAX_FUSED_WIDTH}")
        self.in_features, self.out_features = linears[0].in_features, linears[-1].out_features
        self.hidden_activation, self.output_activation = hidden_activation, output_activation
        self.weights = nn.ParameterList([_frozen(lin.weight) for lin in linears])
        self.biases = [None if lin.bias is None else _frozen(lin.bias) for lin in linears]
        for i, b in enumerate(self.biases):
            if b is not None:
                self.register_parameter(f"bias_{i}", b)
        first = linears[0].weight
        width = kernels.fused_width(widths)
        rest_w, rest_b = kernels.pack_layers(
            [lin.weight.detach() for lin in linears[1:]],
            [None if lin.bias is None else lin.bias.detach() for lin in linears[1:]],
            width,
        )
        self.register_buffer("packed_weight", rest_w)
        self.register_buffer("packed_bias", rest_b)
        self.register_buffer(
            "first_bias",
            first.new_zeros(first.shape[0])
            if linears[0].bias is None
            else linears[0].bias.detach().clone(),
        )

    def _torch_forward(self, x):
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = F.linear(x, w, b)
            x = TORCH_ACTIVATIONS[self.output_activation if i == last else self.hidden_activation](
                x
            )
        return x

    def forward(self, x):
        if not _backend_handles(x, self.weights[0]):
            return self._torch_forward(x)
        y = OPS.fused_mlp.default(
            x.reshape(-1, self.in_features),
            self.weights[0],
            self.first_bias,
            self.packed_weight,
            self.packed_bias,
            self.out_features,
            self.hidden_activation,
            self.output_activation,
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        widths = [self.in_features] + [w.shape[0] for w in self.weights]
        return (
            f"widths={'-'.join(map(str, widths))}, hidden={self.hidden_activation}, "
            f"output={self.output_activation}"
        )


def _plain_linear(layer: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` with the same Parameters (a MeLinear's forward is an ordinary linear)."""
    plain = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(plain)
    plain.in_features, plain.out_features = layer.in_features, layer.out_features
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain


def _units(children):
    """Splits a Sequential's children into (linear, activation name) units and other modules."""
    units: list[tuple[nn.Module, str | None]] = []
    i = 0
    while i < len(children):
        module = children[i]
        if isinstance(module, PASS_THROUGH):
            i += 1
            continue
        if type(module) is nn.Linear:
            activation, j = "identity", i + 1
            while j < len(children) and isinstance(children[j], PASS_THROUGH):
                j += 1
            if j < len(children) and _activation_name(children[j]) is not None:
                activation, j = _activation_name(children[j]), j + 1
            units.append((module, activation))
            i = j
        else:
            units.append((module, None))
            i += 1
    return units


def _fusable(run, dtype) -> bool:
    kernels = _kernels()
    hidden = {act for _, act in run[:-1]}
    return (
        len(run) >= 2
        and len(hidden) == 1
        and kernels.fused_mlp_fits([lin.out_features for lin, _ in run], dtype)
    )


def _fuse_sequential(seq: nn.Sequential, fuse_mlp: bool) -> nn.Sequential:
    modules: list[nn.Module] = []
    run: list[tuple[nn.Linear, str]] = []

    def flush():
        if not run:
            return
        # The longest prefix runs that fit one fused kernel; the rest as fused linears.
        start = 0
        while start < len(run):
            end = len(run)
            while (
                fuse_mlp
                and end - start >= 2
                and not _fusable(run[start:end], run[start][0].weight.dtype)
            ):
                end -= 1
            if fuse_mlp and end - start >= 2:
                modules.append(
                    FusedMLP([lin for lin, _ in run[start:end]], run[start][1], run[end - 1][1])
                )
                start = end
            else:
                lin, act = run[start]
                modules.append(FusedLinear(lin, act))
                start += 1
        run.clear()

    for module, activation in _units(list(seq.children())):
        if activation is None:
            flush()
            modules.append(module)
        else:
            if run and run[-1][0].out_features != module.in_features:
                flush()
            run.append((module, activation))
    flush()
    return nn.Sequential(*modules)


def _fuse_tree(module: nn.Module, fuse_mlp: bool) -> nn.Module:
    """Fuses every nn.Sequential in the tree, innermost first."""
    for name, child in list(module.named_children()):
        setattr(module, name, _fuse_tree(child, fuse_mlp))
    return _fuse_sequential(module, fuse_mlp) if isinstance(module, nn.Sequential) else module


def optimize_for_inference(
    model: nn.Module, *, kernels: bool | None = None, fuse_mlp: bool = True
) -> nn.Module:
    """A copy of ``model`` for inference, in eval mode, with ``requires_grad`` off.

    ``MeLinear`` layers become plain ``nn.Linear`` (their forward is the same). With kernels
    (``kernels=None``: when the model is on CUDA or the backend is forced to "triton"), every
    ``nn.Sequential``'s Linear(+activation) runs become ``FusedMLP`` (``fuse_mlp=True`` and widths
    that fit) or ``FusedLinear`` modules. The input model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference needs an nn.Module, got {type(model).__name__}")
    result = copy.deepcopy(model)
    for parent in [result] + list(result.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MeLinear):
                setattr(parent, name, _plain_linear(child))
    if isinstance(result, MeLinear):
        result = _plain_linear(result)
    if kernels is None:
        first = next(result.parameters(), None)
        kernels = first is not None and (first.is_cuda or backend.get_backend() == "triton")
    if kernels:
        result = _fuse_tree(result, fuse_mlp)
    result.eval()
    result.requires_grad_(False)
    return result
