"""``MeLinear`` (a drop-in ``nn.Linear``) and ``convert`` for whole models."""
import copy
import fnmatch

import torch
from torch import nn

from .functional import check_options, mebp_linear, resolve_k


class MeLinear(nn.Linear):
    """``nn.Linear`` whose backward keeps only the top-k output gradients (meProp).

    ``k``: int count or float ratio of ``out_features``; ``mode``: "unified" or "per_example";
    ``grad``: "dense" or "sparse" weight gradient. With ``count_hits=True`` every backward adds to
    the buffers ``hits`` (per output neuron: examples in which it was selected) and ``refs``
    (examples seen), the statistics that model simplification uses. With ``auto=True`` the layer
    runs the dense backward for input shapes where the sweep's cost model
    (``triton_mebp.estimate.mebp_is_faster``) predicts meProp would not be faster; the decision
    is made once per batch size, dtype and device.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 k=0.05, mode="unified", grad="dense", sparse_bias=False, count_hits=False,
                 auto=False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(k, mode, grad, sparse_bias, count_hits, auto)

    def _setup(self, k, mode, grad, sparse_bias, count_hits, auto=False):
        check_options(mode, grad)
        resolve_k(k, self.out_features, "MeLinear")
        self.k, self.mode, self.grad = k, mode, grad
        self.sparse_bias, self.count_hits, self.auto = sparse_bias, count_hits, auto
        self._auto_decisions = {}
        device = self.weight.device
        self.register_buffer("hits", torch.zeros(self.out_features, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("refs", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, k=0.05, mode="unified", grad="dense",
                    sparse_bias=False, count_hits=False, auto=False) -> "MeLinear":
        """A MeLinear that shares ``linear``'s Parameter objects (an optimizer keeps working)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        layer._setup(k, mode, grad, sparse_bias, count_hits, auto)
        return layer

    @property
    def k_count(self) -> int:
        """``k`` as a count of this layer's current width."""
        return resolve_k(self.k, self.out_features, "MeLinear")

    def reset_hits(self) -> None:
        self.hits.zero_()
        self.refs.zero_()

    def _backward_k(self, input) -> int:
        """k for this input: the layer's k, or the full width where auto predicts no gain."""
        k = self.k_count
        if not self.auto or k == self.out_features:
            return k
        batch = input.numel() // max(self.in_features, 1)
        key = (batch, input.device, self.weight.dtype, k)
        if key not in self._auto_decisions:
            from .estimate import mebp_is_faster
            self._auto_decisions[key] = batch > 0 and mebp_is_faster(
                batch, self.in_features, self.out_features, k, self.mode, device=input.device,
                dtype=self.weight.dtype, grad=self.grad)
        return k if self._auto_decisions[key] else self.out_features

    def forward(self, input):
        counting = self.count_hits and self.training
        return mebp_linear(input, self.weight, self.bias, k=self._backward_k(input), mode=self.mode,
                           grad=self.grad, sparse_bias=self.sparse_bias,
                           hits=self.hits if counting else None, refs=self.refs if counting else None)

    def extra_repr(self) -> str:
        auto = ", auto=True" if self.auto else ""
        return f"{super().extra_repr()}, k={self.k}, mode={self.mode}, grad={self.grad}{auto}"


def convert(model: nn.Module, *, k=0.05, mode="unified", grad="dense", exclude=(),
            skip_output=True, inplace=False, sparse_bias=False, count_hits=False,
            auto=False) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by ``MeLinear`` sharing the same parameters.

    ``nn.LSTM`` layers (without ``proj_size``) become ``MeLSTM``, with ``k`` taken against the
    4 * hidden_size gate width; their weight gradients are always dense.
    ``exclude``: qualified module names (shell-style patterns allowed) to leave dense.
    ``skip_output``: keep the last ``nn.Linear`` (in registration order, the output layer of an
    ``nn.Sequential`` MLP) on full back propagation, as the paper does. The input model is left
    as it is unless ``inplace=True``. Subclasses of ``nn.Linear`` and ``nn.LSTM`` are left alone.
    """
    from .rnn import MeLSTM

    check_options(mode, grad)
    if isinstance(exclude, str):
        exclude = (exclude,)
    target = model if inplace else copy.deepcopy(model)
    linears = [(name, m) for name, m in target.named_modules() if type(m) is nn.Linear]
    if skip_output and linears:
        linears = linears[:-1]
    lstms = [(name, m) for name, m in target.named_modules() if type(m) is nn.LSTM and not m.proj_size]
    replacements = {}
    for name, module in linears + lstms:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        if isinstance(module, nn.LSTM):
            resolve_k(k, 4 * module.hidden_size, f"LSTM {name!r} (4 * hidden_size gates)")
            replacements[id(module)] = MeLSTM.from_lstm(module, k=k, mode=mode)
            continue
        resolve_k(k, module.out_features, f"layer {name!r}")
        replacements[id(module)] = MeLinear.from_linear(module, k=k, mode=mode, grad=grad,
                                                        sparse_bias=sparse_bias, count_hits=count_hits,
                                                        auto=auto)
    if id(target) in replacements:
        return replacements[id(target)]
    for parent in target.modules():
        # _modules, not named_children(): the latter skips a child registered twice.
        for child_name, child in list(parent._modules.items()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return target
