"""``MeLinear`` (a drop-in ``nn.Linear``) and ``convert`` for whole models."""

import copy
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .functional import _mebp_linear, check_options, resolve_k


class MeLinear(nn.Linear):
    """``nn.Linear`` whose backward keeps only the top-k output gradients (meProp).

    ``k``: int count or float ratio of ``out_features``; ``mode``: "unified" or "per_example";
    ``grad``: "dense" or "sparse" weight gradient. With ``count_hits=True`` every backward adds to
    the buffers ``hits`` (per output neuron: examples in which it was selected) and ``refs``
    (examples seen), the statistics that model simplification uses. With ``auto=True`` the layer
    asks the sweep's cost model, once per batch size, dtype and device: in unified mode it runs
    the dense backward where meProp is predicted no faster (``estimate.mebp_is_faster``); in
    per-example mode it keeps meProp's gradient and hit counting and computes the products
    densely on the masked ``dy`` where the per-example products are predicted slower
    (``estimate.masked_dense_is_faster``: on a GPU above k of about half a percent).
    """

    hits: torch.Tensor
    refs: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        k: int | float = 0.05,
        mode: str = "unified",
        grad: str = "dense",
        sparse_bias: bool = False,
        count_hits: bool = False,
        auto: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(k, mode, grad, sparse_bias, count_hits, auto)

    def _setup(self, k, mode, grad, sparse_bias, count_hits, auto=False):
        check_options(mode, grad)
        resolve_k(k, self.out_features, "MeLinear")
        self.k, self.mode, self.grad = k, mode, grad
        self.sparse_bias, self.count_hits, self.auto = sparse_bias, count_hits, auto
        self._auto_decisions = {}
        device = self.weight.device
        self.register_buffer(
            "hits",
            torch.zeros(self.out_features, dtype=torch.int64, device=device),
            persistent=False,
        )
        self.register_buffer(
            "refs", torch.zeros((), dtype=torch.int64, device=device), persistent=False
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        k: int | float = 0.05,
        mode: str = "unified",
        grad: str = "dense",
        sparse_bias: bool = False,
        count_hits: bool = False,
        auto: bool = False,
    ) -> "MeLinear":
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

    def _backward_plan(self, input) -> tuple[int, bool]:
        """``(k, masked_dense)`` for this input: the layer's k, or the full width where auto
        predicts no gain (unified mode); whether per-example mode computes its gradient by dense
        products on the masked ``dy``, where auto predicts that faster."""
        k = self.k_count
        if not self.auto or k == self.out_features:
            return k, False
        batch = input.numel() // max(self.in_features, 1)
        # the dtype the backward runs in: under autocast the autocast dtype (for dense too)
        device_type = input.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else self.weight.dtype
        )
        key = (batch, input.device, dtype, k)
        if key not in self._auto_decisions:
            from . import estimate

            shape = (batch, self.in_features, self.out_features, k)
            options = dict(device=input.device, dtype=dtype, grad=self.grad)
            if batch == 0:
                decision = (self.out_features, False)
            elif self.mode == "per_example":
                decision = (k, estimate.masked_dense_is_faster(*shape, **options))
            elif estimate.mebp_is_faster(*shape, self.mode, **options):
                decision = (k, False)
            else:
                decision = (self.out_features, False)
            self._auto_decisions[key] = decision
        return self._auto_decisions[key]

    def forward(self, input):
        counting = self.count_hits and self.training
        k, masked_dense = self._backward_plan(input)
        return _mebp_linear(
            input,
            self.weight,
            self.bias,
            k,
            self.mode,
            self.grad,
            self.sparse_bias,
            self.hits if counting else None,
            self.refs if counting else None,
            masked_dense,
        )

    def extra_repr(self) -> str:
        auto = ", auto=True" if self.auto else ""
        return f"{super().extra_repr()}, k={self.k}, mode={self.mode}, grad={self.grad}{auto}"


@dataclass
class ConvertEntry:
    """One module (or the in-projection of an attention module) that ``convert`` looked at."""

    name: str
    kind: str
    role: str
    width: int | None
    k: int | None  # the kept count when converted
    reason: str = ""  # why it stays dense

    @property
    def converted(self) -> bool:
        return self.k is not None


class ConvertReport(list):
    """What ``convert(..., report=True)`` did: a list of ``ConvertEntry``, one per module with
    weights (an attention module's packed in-projection listed as ``NAME.in_proj``)."""

    @property
    def converted(self) -> dict:
        """``{name: k}`` of the projections that now back-propagate with meProp."""
        return {e.name: e.k for e in self if e.converted}

    @property
    def dense(self) -> dict:
        """``{name: reason}`` of the modules left on full back propagation."""
        return {e.name: e.reason for e in self if not e.converted}

    def __str__(self) -> str:
        rows = [("module", "kind", "role", "width", "k", "backward")] + [
            (
                e.name or "(model)",
                e.kind,
                e.role,
                "" if e.width is None else str(e.width),
                "" if e.k is None else str(e.k),
                "meProp" if e.converted else f"dense: {e.reason}",
            )
            for e in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5] for row in rows
        )


def convert(
    model: nn.Module,
    *,
    k: int | float = 0.05,
    mode: str = "unified",
    grad: str = "dense",
    exclude: str | Iterable[str] = (),
    skip_output: bool = True,
    inplace: bool = False,
    sparse_bias: bool = False,
    count_hits: bool = False,
    auto: bool = False,
    attention_k: int | float | None = None,
    mlp_k: int | float | None = None,
    roles: dict[str, list[str]] | None = None,
    report: bool = False,
):
    """Replace the model's ``nn.Linear`` layers by ``MeLinear`` sharing the same parameters.

    ``nn.LSTM`` layers (without ``proj_size``) become ``MeLSTM``, with ``k`` taken against the
    4 * hidden_size gate width; their weight gradients are always dense.
    ``nn.MultiheadAttention`` layers (also inside ``nn.Transformer*Layer``) become
    ``MeMultiheadAttention``: meProp for the packed in-projection (``k`` against its 3 * embed_dim
    outputs, listed as ``NAME.in_proj``) and a ``MeLinear`` output projection.
    ``exclude``: qualified module names (shell-style patterns allowed) to leave dense.
    ``skip_output``: keep the last ``nn.Linear`` (in registration order, the output layer of an
    ``nn.Sequential`` MLP; never one of an ``nn.Transformer*Layer``) on full back propagation, as
    the paper does. The input model is left
    as it is unless ``inplace=True``. Subclasses of ``nn.Linear`` and ``nn.LSTM`` are left alone.
    ``attention_k`` / ``mlp_k``: ``k`` of the attention projections / the MLP layers of
    transformer blocks, instead of ``k`` (roles: ``triton_mebp.transformer.linear_roles``;
    ``roles`` overrides its name patterns, e.g. ``{"attention": ["*.attn.*"]}``).
    ``report=True`` returns ``(model, ConvertReport)``: which modules were converted, with which
    ``k``, and why the others were left dense.
    """
    from .rnn import MeLSTM
    from .transformer import TRANSFORMER_LAYERS, MeMultiheadAttention, k_for_role, linear_roles

    check_options(mode, grad)
    if isinstance(exclude, str):
        exclude = (exclude,)
    target = model if inplace else copy.deepcopy(model)
    role_of = linear_roles(target, roles)
    linear_options: dict[str, Any] = dict(
        mode=mode, grad=grad, sparse_bias=sparse_bias, count_hits=count_hits, auto=auto
    )

    def excluded_by(name):
        pattern = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
        return None if pattern is None else f"excluded by the pattern {pattern!r}"

    def linear_k(name, module):
        layer_k = k_for_role(role_of.get(name, "other"), k, attention_k, mlp_k)
        return resolve_k(layer_k, module.out_features, f"layer {name!r}"), layer_k

    entries, replacements, done = ConvertReport(), {}, set()
    # The output layer is the last Linear of any class (a subclass head is left alone anyway);
    # attention output projections and a transformer layer's own linear layers are not candidates.
    projections = {id(m.out_proj) for m in target.modules() if isinstance(m, nn.MultiheadAttention)}
    inside = tuple(
        f"{name}."
        for name, m in target.named_modules()
        if isinstance(m, TRANSFORMER_LAYERS) and name
    )
    linears = [
        name
        for name, m in target.named_modules()
        if isinstance(m, nn.Linear)
        and id(m) not in projections
        and not (name.startswith(inside) or isinstance(target, TRANSFORMER_LAYERS))
    ]
    output = linears[-1] if skip_output and linears else None
    for name, module in target.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        in_name, out_name, width = f"{prefix}in_proj", f"{prefix}out_proj", 3 * module.embed_dim
        done.add(id(module.out_proj))
        why = excluded_by(name) or (
            None
            if type(module) is nn.MultiheadAttention
            else f"{type(module).__name__} is a subclass of nn.MultiheadAttention: left alone"
        )
        if why:
            entries.append(
                ConvertEntry(in_name, "MultiheadAttention.in_proj", "attention", width, None, why)
            )
            entries.append(
                ConvertEntry(
                    out_name,
                    type(module.out_proj).__name__,
                    "attention",
                    module.out_proj.out_features,
                    None,
                    why,
                )
            )
            continue
        role_k = k_for_role("attention", k, attention_k, mlp_k)
        in_why = excluded_by(in_name)
        in_k = None if in_why else role_k
        in_count = (
            None if in_why else resolve_k(role_k, width, f"layer {in_name!r} (3 * embed_dim)")
        )
        new = MeMultiheadAttention.from_mha(module, in_proj_k=in_k, mode=mode, grad=grad)
        entries.append(
            ConvertEntry(
                in_name, "MultiheadAttention.in_proj", "attention", width, in_count, in_why or ""
            )
        )
        out_why = excluded_by(out_name)
        out_count = None
        if not out_why:
            out_count, out_k = linear_k(out_name, module.out_proj)
            new.out_proj = MeLinear.from_linear(module.out_proj, k=out_k, **linear_options)
        entries.append(
            ConvertEntry(
                out_name,
                type(module.out_proj).__name__,
                "attention",
                module.out_proj.out_features,
                out_count,
                out_why or "",
            )
        )
        replacements[id(module)] = new
    for name, module in target.named_modules():
        if id(module) in done or isinstance(module, nn.MultiheadAttention):
            continue
        if isinstance(module, nn.Linear):
            role, why = role_of.get(name, "other"), excluded_by(name)
            if type(module) is not nn.Linear:
                why = f"{type(module).__name__} is a subclass of nn.Linear: left alone"
            elif not why and name == output:
                why = "the last nn.Linear, taken as the output layer (skip_output=True)"
            count = None
            if not why:
                count, layer_k = linear_k(name, module)
                replacements[id(module)] = MeLinear.from_linear(module, k=layer_k, **linear_options)
            entries.append(
                ConvertEntry(
                    name, type(module).__name__, role, module.out_features, count, why or ""
                )
            )
        elif isinstance(module, nn.LSTM):
            width = 4 * module.hidden_size
            why = excluded_by(name) or (
                f"{type(module).__name__} is a subclass of nn.LSTM: left alone"
                if type(module) is not nn.LSTM
                else "an LSTM with proj_size has no meProp path"
                if module.proj_size
                else None
            )
            count = None
            if not why:
                count = resolve_k(k, width, f"LSTM {name!r} (4 * hidden_size gates)")
                replacements[id(module)] = MeLSTM.from_lstm(module, k=k, mode=mode)
            entries.append(
                ConvertEntry(name, type(module).__name__, "other", width, count, why or "")
            )
        elif next(module.parameters(recurse=False), None) is not None:
            entries.append(
                ConvertEntry(
                    name,
                    type(module).__name__,
                    "other",
                    None,
                    None,
                    f"no meProp path for {type(module).__name__}",
                )
            )
    order = {name: i for i, (name, _) in enumerate(target.named_modules())}
    entries.sort(key=lambda e: order.get(e.name, order.get(e.name.rpartition(".")[0], -1)))
    if id(target) in replacements:
        target = replacements[id(target)]
    else:
        for parent in target.modules():
            # _modules, not named_children(): the latter skips a child registered twice.
            for child_name, child in list(parent._modules.items()):
                if id(child) in replacements:
                    setattr(parent, child_name, replacements[id(child)])
    return (target, entries) if report else target
