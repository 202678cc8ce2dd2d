"""meSimp: remove the hidden neurons that meProp seldom selects, physically, and keep training.

``Simplifier(model)`` finds each hidden ``MeLinear`` whose output reaches only ``nn.Linear``
layers through element-wise modules and switches its hit counting on. It follows only what it can
prove: a model whose class is exactly ``nn.Sequential`` is a chain; any other model must trace
with ``torch.fx``; every other layer is skipped with the reason. ``prune()`` keeps neuron j iff ``hits[j] >= threshold *
refs``, deletes the other rows of the layer's weight and bias and the matching columns of every
consumer's weight, slices the optimizer's state the same way, and resets the counters.
``SimplifySchedule`` calls it on the paper's cycle schedule; ``save_simplified`` /
``load_simplified`` store and restore a compacted model without pickled objects.
"""

import inspect
import math
import numbers
import operator
import os
from dataclasses import dataclass, field
from typing import IO

import torch
import torch.nn.functional as F
from torch import nn

from .modules import MeLinear

# Modules and functions that act on each element alone: a removed neuron stays one feature.
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.hardsigmoid,
    F.hardswish,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    F.tanhshrink,
    F.dropout,
    F.sigmoid,
    F.tanh,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.dropout,
}
ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
SCALAR_OPERATORS = {
    operator.mul,
    operator.truediv,
    operator.add,
    operator.sub,
    torch.mul,
    torch.add,
}
CHECKPOINT_FORMAT = "triton_mebp.simplified/1"
# torch's transformer layers trace (with the fast path off); their stacks do not (their forward
# branches on tensor properties), so a stack is a leaf and each of its layers is traced alone.
TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
TRANSFORMER_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)


DROPOUT_MODULES = (nn.Dropout, nn.AlphaDropout)
DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _is_elementwise_module(module) -> bool:
    return type(module) in ELEMENTWISE_MODULES and not _has_hooks(module)


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear)


def _is_plain_linear(module) -> bool:
    """An ``nn.Linear`` computing ``x W^T + b`` and nothing else: a subclass counts only if it
    keeps the forward and adds no parameters, buffers or submodules (a LoRA adapter does not)."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward in (nn.Linear.forward, MeLinear.forward)
        and {n for n, _ in module.named_parameters(recurse=False)} <= {"weight", "bias"}
        and {n for n, _ in module.named_buffers(recurse=False)} <= {"hits", "refs"}
        and not any(True for _ in module.children())
        and not _has_hooks(module)
    )


def _is_plain_me_linear(module) -> bool:
    return isinstance(module, MeLinear) and _is_plain_linear(module)


@dataclass
class PrunePlan:
    """One prunable layer and the layers that read its output.

    ``offsets``: {consumer name: f(0)}, where f is the element-wise path from the layer to that
    consumer; a removed neuron contributes the constant ``f(0) * W_consumer[:, j]``, which prune()
    folds into the consumer's bias (omitted where f(0) = 0).
    """

    name: str
    layer: MeLinear
    consumers: list = field(default_factory=list)  # [(name, nn.Linear)]
    offsets: dict = field(default_factory=dict)


class PruneReport(dict):
    """``{layer_name: (old_width, new_width)}``; ``skipped`` maps the layers left alone to why."""

    def __init__(self, widths, skipped):
        super().__init__(widths)
        self.skipped = dict(skipped)


# ---------------------------------------------------------------------------------------------
# Finding consumers


def _flatten_sequential(seq: nn.Sequential, prefix: str):
    """The modules a Sequential runs, in order, nested plain Sequentials expanded: [(name, module)].

    Only a module whose class is exactly ``nn.Sequential`` (and that has no forward hooks) is
    known to run its children as a chain; a subclass may have a forward of its own.
    """
    chain = []
    for child_name, child in seq.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if type(child) is nn.Sequential and not _has_hooks(child):
            chain += _flatten_sequential(child, name)
        else:
            chain.append((name, child))
    return chain


def _module_step(module):
    """What an element-wise module does to a removed neuron's zero in eval mode."""
    return (lambda v: v) if isinstance(module, DROPOUT_MODULES) else module


def _sequential_links(model: nn.Sequential, producer):
    """Consumers found by walking the chain of an exact nn.Sequential: (links, reasons, paths).

    ``links``: {name: [(consumer name, consumer)]}; ``paths``: {name: {consumer name: [steps]}},
    the element-wise steps between them; ``reasons``: {name: why it has no consumers to prune}.
    """
    links, reasons, paths = {}, {}, {}
    chain = _flatten_sequential(model, "")
    for i, (name, module) in enumerate(chain):
        if not producer(module):
            continue
        consumers, steps, reason = [], [], None
        for next_name, following in chain[i + 1 :]:
            if _is_elementwise_module(following):
                steps.append(_module_step(following))
                continue
            if _is_plain_linear(following):
                consumers.append((next_name, following))
            else:
                reason = (
                    f"its output reaches {next_name!r} ({type(following).__name__}), "
                    "which is not element-wise"
                    + (
                        ""
                        if not _is_linear(following)
                        else " (an nn.Linear subclass with a forward, parameters or hooks of "
                        "its own)"
                    )
                )
            break
        else:
            reason = "its output is the model's output"
        if reason:
            reasons[name] = reason
        else:
            links[name] = consumers
            paths[name] = {consumers[0][0]: steps}
    return links, reasons, paths


class _LinearLeafTracer(torch.fx.Tracer):
    """Linear layers, attention modules and transformer stacks are leaves; torch's transformer
    layers are traced through, so their MLP (linear1 -> activation -> dropout -> linear2) is seen."""

    def is_leaf_module(self, module, qualified_name):
        if isinstance(module, TRANSFORMER_LAYERS):
            return False
        return (
            _is_linear(module)
            or isinstance(module, (nn.MultiheadAttention,) + TRANSFORMER_STACKS)
            or super().is_leaf_module(module, qualified_name)
        )

    def trace(self, root, concrete_args=None):
        # With the fast path off, nn.Transformer*Layer runs (and traces) its plain Python forward,
        # the one training uses; the fast path is an inference-only fusion of the same math.
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)


def _node_label(node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "output":
        return "the model's output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r}"


def _passes_through(node, source, modules) -> bool:
    """Whether ``node`` is an element-wise function of ``source`` alone."""
    tensor_args = [
        a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)
    ]
    if node.op == "call_module":
        return (
            _is_elementwise_module(modules[node.target])
            and node.args[:1] == (source,)
            and tensor_args == [source]
        )
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS and tensor_args == [source]
    if node.op == "call_function":
        if node.target in ELEMENTWISE_FUNCTIONS:
            return node.args[:1] == (source,) and tensor_args == [source]
        if node.target in SCALAR_OPERATORS:
            others = [a for a in node.args if a is not source]
            return (
                tensor_args == [source]
                and len(node.args) == 2
                and not node.kwargs
                and all(isinstance(a, numbers.Number) for a in others)
            )
    return False


def _node_step(node, source, modules):
    """What the pass-through ``node`` does to its source's value, in eval mode."""
    if node.op == "call_module":
        return _module_step(modules[node.target])
    if node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
        return lambda v: v
    swap = lambda v: (
        [v if a is source else a for a in node.args],
        {key: v if a is source else a for key, a in node.kwargs.items()},
    )
    if node.op == "call_method":

        def method_step(v):
            args, kwargs = swap(v)
            return getattr(args[0], node.target)(*args[1:], **kwargs)

        return method_step

    def step(v):
        args, kwargs = swap(v)
        return node.target(*args, **kwargs)

    return step


def _fx_links(model: nn.Module, graph, producer):
    """Consumers found in a torch.fx graph of the model's forward: (links, reasons, paths)."""
    modules = dict(model.named_modules())
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    read_directly = [node.target for node in graph.nodes if node.op == "get_attr"]
    links: dict = {}
    reasons: dict = {}
    paths: dict = {}
    for name, module in modules.items():
        if not producer(module):
            continue
        nodes = calls.get(name, [])
        owner = name.rpartition(".")[0]
        if not nodes and isinstance(modules.get(owner), nn.MultiheadAttention):
            reasons[name] = (
                "it is the output projection of an nn.MultiheadAttention; "
                "attention is not simplified"
            )
            continue
        if len(nodes) != 1:
            reasons[name] = (
                "it is never called in the traced forward"
                if not nodes
                else f"it is called {len(nodes)} times in the forward"
            )
            continue
        consumers, reason, frontier = [], None, [nodes[0]]
        steps: dict = {nodes[0]: []}  # the element-wise steps from the layer's output to each node
        while frontier and reason is None:
            source = frontier.pop()
            for user in source.users:
                if _passes_through(user, source, modules):
                    steps[user] = steps[source] + [_node_step(user, source, modules)]
                    frontier.append(user)
                elif (
                    user.op == "call_module"
                    and _is_plain_linear(modules[user.target])
                    and user.args == (source,)
                    and not user.kwargs
                ):
                    if len(calls[user.target]) != 1:
                        reason = (
                            f"its consumer {user.target!r} is called "
                            f"{len(calls[user.target])} times in the forward"
                        )
                        break
                    consumers.append((user.target, modules[user.target]))
                    paths.setdefault(name, {})[user.target] = steps[source]
                else:
                    reason = f"its output reaches {_node_label(user)}, which is not element-wise"
                    if user.op == "call_module" and _is_linear(modules[user.target]):
                        reason += (
                            " (an nn.Linear subclass with a forward, parameters or hooks "
                            "of its own)"
                        )
                    break
        if reason is None and not consumers:
            reason = "its output is not used by any layer"
        if reason is None:
            involved = [name] + [c for c, _ in consumers]
            direct = [t for t in read_directly if any(t.startswith(f"{m}.") for m in involved)]
            if direct:
                reason = f"the forward reads {direct[0]!r} directly"
        if reason:
            reasons[name] = reason
            paths.pop(name, None)
        else:
            links[name] = consumers
    return links, reasons, paths


def _find_links(model: nn.Module, producer=_is_plain_me_linear):
    """For each ``producer`` layer: the Linear layers that read its output, the element-wise
    steps in between, or why it has none the simplifier can follow: (links, reasons, paths)."""
    if type(model) is nn.Sequential:
        return _sequential_links(model, producer)
    # torch.fx traces through containers without their hooks (leaf modules are checked one by one)
    hooked = [
        name
        for name, m in model.named_modules()
        if name and _has_hooks(m) and any(True for _ in m.children())
    ]
    if hooked:
        why = f"module {hooked[0]!r} has forward hooks, which the simplifier cannot see through"
        return {}, {name: why for name, m in model.named_modules() if producer(m)}, {}
    if isinstance(model, TRANSFORMER_STACKS):  # its own forward does not trace; its layers do
        links: dict = {}
        reasons: dict = {}
        paths: dict = {}
        _stack_layer_links(model, [""], producer, links, reasons, paths)
        return links, reasons, paths
    try:
        graph = (
            _trace_layer(model)
            if isinstance(model, TRANSFORMER_LAYERS)
            else _LinearLeafTracer().trace(model)
        )
    except Exception as error:  # any untraceable forward: nothing is proven safe
        why = (
            f"torch.fx could not trace the model ({type(error).__name__}: {error}), so the "
            "simplifier cannot see what reads the layer's output"
        )
        return {}, {name: why for name, m in model.named_modules() if producer(m)}, {}
    links, reasons, paths = _fx_links(model, graph, producer)
    modules = dict(model.named_modules())
    stacks = [
        node.target
        for node in graph.nodes
        if node.op == "call_module" and isinstance(modules[node.target], TRANSFORMER_STACKS)
    ]
    _stack_layer_links(model, stacks, producer, links, reasons, paths)
    return links, reasons, paths


def _trace_layer(layer):
    """The graph of an nn.Transformer*Layer's forward, traced with its default masks and flags.

    The masks and flags only reach the attention calls (leaves): the layer's other data flow is
    the same for every value, so the trace with the defaults proves it.
    """
    defaults = {
        name: p.default
        for name, p in inspect.signature(layer.forward).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return _LinearLeafTracer().trace(layer, concrete_args=defaults)


def _stack_layer_links(model, stacks, producer, links, reasons, paths):
    """Links inside the layers of each nn.TransformerEncoder/Decoder the traced forward calls.

    The stack's own forward (torch's code) only calls each layer and its final norm, and the
    stack is a leaf of the trace, so nothing else reaches a layer's linear layers: a chain that a
    layer's own traced forward proves (its MLP) is safe wherever the layer sits.
    """
    modules = dict(model.named_modules())
    for stack_name in stacks:
        for index, layer in enumerate(modules[stack_name].layers):
            prefix = f"{stack_name}.layers.{index}." if stack_name else f"layers.{index}."
            try:
                layer_graph = _trace_layer(layer)
            except Exception as error:
                for name, module in layer.named_modules():
                    if producer(module):
                        reasons[prefix + name] = (
                            f"torch.fx could not trace its transformer layer "
                            f"({type(error).__name__}: {error})"
                        )
                continue
            layer_links, layer_reasons, layer_paths = _fx_links(layer, layer_graph, producer)
            for name, consumers in layer_links.items():
                reasons.pop(prefix + name, None)
                links[prefix + name] = [(prefix + c, m) for c, m in consumers]
                paths[prefix + name] = {prefix + c: steps for c, steps in layer_paths[name].items()}
            for name, reason in layer_reasons.items():
                reasons[prefix + name] = reason


def _shared_objects(model: nn.Module):
    """ids of modules and parameters that appear at more than one place in the model."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        (shared if id(module) in seen else seen).add(id(module))
    seen_params: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen_params else seen_params).add(id(param))
    return shared


# ---------------------------------------------------------------------------------------------
# Changing parameters in place


def replace_parameter_data(param: torch.Tensor, new: torch.Tensor) -> None:
    """Gives ``param`` the data ``new`` (any shape), keeping the Parameter object.

    A shape change through ``.data`` alone leaves autograd's cached gradient accumulator with the
    old shape, and the next backward fails while any old graph still holds it; a dtype change
    drops that cache, hence the detour through an empty tensor of another dtype.
    """
    other = torch.float32 if new.dtype == torch.float64 else torch.float64
    param.grad = None
    param.data = torch.empty(0, dtype=other, device=new.device)
    param.data = new


def _slice(tensor, cuts):
    for dim, index in cuts.items():
        tensor = tensor.index_select(dim, index)
    return tensor


def _sliced_state(optimizer, param, cuts, label):
    """The optimizer state of ``param`` sliced by ``cuts`` ({dim: kept indices}); raises if a
    state tensor has a shape the slicing rule does not cover."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state:
        return None
    old_shape = tuple(param.shape)
    sliced = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            sliced[key] = value
        elif value.layout != torch.strided:
            raise ValueError(
                f"optimizer state {key!r} of {label} is a {value.layout} tensor; "
                "the simplifier slices dense state only"
            )
        elif tuple(value.shape) == old_shape:
            sliced[key] = _slice(value, {d: i.to(value.device) for d, i in cuts.items()})
        elif tuple(value.shape) == old_shape[:1]:
            sliced[key] = _slice(value, {0: cuts[0].to(value.device)}) if 0 in cuts else value
        else:
            raise ValueError(
                f"optimizer state {key!r} of {label} has shape {tuple(value.shape)}, "
                f"neither the parameter's {old_shape} nor per row {old_shape[:1]}: "
                "the simplifier cannot slice it"
            )
    return sliced


def _apply_cuts(param_cuts, layer_widths, optimizer, labels, shifts=None):
    """Slices parameters (and their grads and optimizer state), validating everything first.

    ``param_cuts``: {id: (param, {dim: kept indices})}; ``layer_widths``: [(layer, attr, width)];
    ``shifts``: {id: float64 tensor added to the parameter before slicing}.
    """
    staged = []
    shifts = shifts or {}
    for param, cuts in param_cuts.values():
        label = labels[id(param)]
        cuts = {d: i.to(param.device) for d, i in cuts.items()}
        with torch.no_grad():
            data = param.detach()
            if id(param) in shifts:
                data = (data.double() + shifts[id(param)].to(data.device)).to(data.dtype)
            data = _slice(data, cuts)
        grad = param.grad
        new_grad = None
        if grad is not None and grad.layout == torch.strided and grad.shape == param.shape:
            new_grad = _slice(grad, cuts)
        state = _sliced_state(optimizer, param, cuts, label)
        staged.append((param, data, new_grad, state))
    # Nothing above changed the model or the optimizer; from here on nothing can fail.
    for param, data, new_grad, state in staged:
        replace_parameter_data(param, data)
        param.grad = new_grad
        if state is not None:
            optimizer.state[param] = state
    for layer, attr, width in layer_widths:
        setattr(layer, attr, width)


def _fix_k_count(layer: MeLinear) -> None:
    """Turns a ratio k into the count it means at the layer's current width.

    Pruning keeps k fixed as a count, as the papers do: a neuron's expected hit rate k/width then
    rises as the layer shrinks, and pruning stops near width k/threshold. A ratio that followed
    the width would keep the rate at k, below a larger threshold, and prune on to one neuron.
    """
    layer.k = layer.k_count


def _resize_me_linear(layer: MeLinear, width: int) -> None:
    """Hit counters of the new width, and k (a count: see ``_fix_k_count``) capped at it."""
    layer.hits = torch.zeros(width, dtype=torch.int64, device=layer.weight.device)
    layer.refs.zero_()
    if (
        isinstance(layer.k, numbers.Integral)
        and not isinstance(layer.k, bool)
        and int(layer.k) > width
    ):
        layer.k = width


def _offsets(name, consumers, paths):
    """({consumer: f(0)} for the paths with f(0) != 0, None) or ({}, why the layer cannot be
    pruned exactly): what a removed neuron, forced to zero, still feeds each consumer."""
    offsets = {}
    for consumer_name, consumer in consumers:
        value = torch.zeros(1, dtype=torch.float64)
        with torch.no_grad():
            for step in paths[consumer_name]:
                value = step(value)
        constant = float(value.reshape(-1)[0])
        if not math.isfinite(constant):
            return {}, (
                f"the element-wise path from {name!r} to {consumer_name!r} maps 0 to {constant}"
            )
        if constant != 0.0:
            if consumer.bias is None:
                return {}, (
                    f"the element-wise path from {name!r} to {consumer_name!r} maps 0 to "
                    f"{constant:g}, and {consumer_name!r} has no bias to absorb it"
                )
            offsets[consumer_name] = constant
    return offsets, None


# ---------------------------------------------------------------------------------------------


class Simplifier:
    """Prunes the seldom selected neurons of a model's hidden ``MeLinear`` layers (meSimp).

    ``threshold``: neuron j stays iff it was selected in at least ``threshold`` of the examples
    seen since the last prune. ``optimizer``: its per-parameter state is sliced with the
    parameters (built before pruning, it keeps training the pruned model). ``min_width``: the
    fewest neurons a layer keeps (its most selected ones). A ratio ``k`` of a prunable layer is
    resolved here to a count of its current width (``layer.k`` becomes that int) and stays that
    count while the layer shrinks (capped at the width). ``layers`` names the prunable layers,
    ``consumers`` what reads each, ``skipped`` the other MeLinear layers and why.
    """

    model: nn.Module
    threshold: float
    optimizer: torch.optim.Optimizer | None
    min_width: int
    plans: list[PrunePlan]
    skipped: dict[str, str]

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float = 0.1,
        optimizer: torch.optim.Optimizer | None = None,
        min_width: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Simplifier needs an nn.Module, got {type(model).__name__}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, numbers.Real)
            or not (0.0 <= threshold <= 1.0)
        ):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if (
            isinstance(min_width, bool)
            or not isinstance(min_width, numbers.Integral)
            or min_width < 1
        ):
            raise ValueError(f"min_width must be an int >= 1, got {min_width!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not any(isinstance(m, MeLinear) for m in model.modules()):
            raise ValueError(
                "the model has no MeLinear layer to simplify: convert it first "
                "(triton_mebp.convert(model))"
            )
        self.model, self.threshold = model, float(threshold)
        self.optimizer, self.min_width = optimizer, int(min_width)
        links, reasons, paths = _find_links(model)
        shared = _shared_objects(model)
        modules = dict(model.named_modules())
        self.plans, self.skipped = [], dict(reasons)
        for name, module in modules.items():
            if isinstance(module, MeLinear) and name not in links and name not in reasons:
                self.skipped[name] = (
                    f"it is a {type(module).__name__} with a forward, "
                    "parameters or hooks of its own"
                )
        for name, consumers in links.items():
            layer = modules[name]
            involved = [(name, layer)] + consumers
            tied = [
                n
                for n, m in involved
                if id(m) in shared or any(id(p) in shared for p in m.parameters(recurse=False))
            ]
            if tied:
                self.skipped[name] = (
                    f"{tied[0]!r} or its parameters are used at several places in the model"
                )
                continue
            offsets, reason = _offsets(name, consumers, paths[name])
            if reason:
                self.skipped[name] = reason
                continue
            self.plans.append(PrunePlan(name, layer, list(consumers), offsets))
        for plan in self.plans:
            _fix_k_count(plan.layer)
            plan.layer.count_hits = True
            plan.layer.reset_hits()

    @property
    def layers(self):
        return [plan.name for plan in self.plans]

    @property
    def consumers(self):
        return {plan.name: [name for name, _ in plan.consumers] for plan in self.plans}

    def _kept(self, plan: PrunePlan) -> torch.Tensor:
        layer = plan.layer
        refs = int(layer.refs)
        if refs == 0:
            raise RuntimeError(
                f"layer {plan.name!r} has seen no examples since the last prune (refs = 0): run "
                "backward passes with the model in training mode before prune()"
            )
        hits = layer.hits
        if hits.shape != (layer.out_features,):
            raise RuntimeError(
                f"layer {plan.name!r}: hits has shape {tuple(hits.shape)}, "
                f"expected ({layer.out_features},)"
            )
        keep = (hits.double() >= self.threshold * refs).nonzero().flatten()
        floor = min(self.min_width, layer.out_features)
        if keep.numel() < floor:
            keep = torch.sort(hits, descending=True, stable=True).indices[:floor].sort().values
        return keep

    def prune(self) -> PruneReport:
        """Removes the seldom selected neurons; returns ``{layer_name: (old_width, new_width)}``.

        Validates everything before changing anything: an error leaves the model and the
        optimizer as they were. Resets the hit counters of every managed layer.
        """
        kept = {plan.name: self._kept(plan) for plan in self.plans}
        names = {
            id(p): f"{mname}.{pname}"
            for mname, m in self.model.named_modules()
            for pname, p in m.named_parameters(recurse=False)
        }
        param_cuts: dict = {}
        shifts: dict = {}
        widths: list = []
        report = {}
        for plan in self.plans:
            layer, keep = plan.layer, kept[plan.name]
            old, new = layer.out_features, keep.numel()
            report[plan.name] = (old, new)
            if new == old:
                continue
            for name, consumer in plan.consumers:
                if consumer.in_features != old:
                    raise RuntimeError(
                        f"consumer {name!r} of {plan.name!r} reads "
                        f"{consumer.in_features} features, expected {old}"
                    )
            for param, dim in [(layer.weight, 0), (layer.bias, 0)] + [
                (c.weight, 1) for _, c in plan.consumers
            ]:
                if param is not None:
                    param_cuts.setdefault(id(param), (param, {}))[1][dim] = keep
            removed = torch.ones(old, dtype=torch.bool)
            removed[keep.cpu()] = False
            for name, consumer in plan.consumers:
                if name in plan.offsets:
                    # The removed inputs' constant f(0) * W[:, removed], folded into the bias.
                    weight = consumer.weight.detach()
                    delta = (
                        weight[:, removed.to(weight.device)].double().sum(1) * plan.offsets[name]
                    )
                    param_cuts.setdefault(id(consumer.bias), (consumer.bias, {}))
                    shifts[id(consumer.bias)] = shifts.get(id(consumer.bias), 0) + delta
            widths.append((layer, "out_features", new))
            widths += [(c, "in_features", new) for _, c in plan.consumers]
        for plan in self.plans:  # a ratio set on a layer after the Simplifier was built
            _fix_k_count(plan.layer)
        _apply_cuts(param_cuts, widths, self.optimizer, names, shifts)
        for plan in self.plans:
            _resize_me_linear(plan.layer, plan.layer.out_features)
        return PruneReport(report, self.skipped)

    def reset_optimizer_state(self) -> None:
        """Forgets the optimizer's state (Adam's moments and step counts), as at a cycle's end."""
        if self.optimizer is not None:
            self.optimizer.state.clear()


class SimplifySchedule:
    """The paper's schedule: training in cycles, pruning in every other cycle.

    Call ``step()`` once after each optimizer step. Each cycle is ``cycle_epochs`` epochs of
    ``steps_per_epoch`` steps; in pruning cycles (the second, fourth, ... or, with
    ``prune_first_cycle=True``, the first, third, ...) the model is pruned ``prunes_per_epoch``
    times per epoch, evenly spaced. With ``reset_optimizer=True`` the optimizer's state is cleared
    at the end of every cycle. ``step()`` returns the prune report when it pruned, else None;
    ``history`` keeps ``(step, report)`` of every prune.
    """

    def __init__(
        self,
        simplifier: Simplifier,
        *,
        steps_per_epoch: int,
        cycle_epochs: int = 5,
        prunes_per_epoch: int = 8,
        prune_first_cycle: bool = False,
        reset_optimizer: bool = True,
        last_pruning_cycle: int | None = None,
    ) -> None:
        for label, value in (
            ("steps_per_epoch", steps_per_epoch),
            ("cycle_epochs", cycle_epochs),
            ("prunes_per_epoch", prunes_per_epoch),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        if last_pruning_cycle is not None and (
            isinstance(last_pruning_cycle, bool)
            or not isinstance(last_pruning_cycle, numbers.Integral)
            or last_pruning_cycle < 0
        ):
            raise ValueError(
                f"last_pruning_cycle must be None or an int >= 0, got {last_pruning_cycle!r}"
            )
        self.simplifier = simplifier
        self.steps_per_epoch, self.cycle_epochs = int(steps_per_epoch), int(cycle_epochs)
        self.prunes_per_epoch = int(prunes_per_epoch)
        self.prune_first_cycle, self.reset_optimizer = prune_first_cycle, reset_optimizer
        self.last_pruning_cycle = last_pruning_cycle
        self.steps = 0
        self.history: list[tuple[int, PruneReport]] = []

    @property
    def cycle(self) -> int:
        """The cycle the next step belongs to."""
        return self.steps // (self.steps_per_epoch * self.cycle_epochs)

    def is_pruning_cycle(self, cycle: int) -> bool:
        if self.last_pruning_cycle is not None and cycle > self.last_pruning_cycle:
            return False
        return cycle % 2 == (0 if self.prune_first_cycle else 1)

    def step(self) -> PruneReport | None:
        cycle = self.cycle
        self.steps += 1
        in_epoch = (self.steps - 1) % self.steps_per_epoch + 1
        report = None
        # Prune when the step crosses one of the prunes_per_epoch marks of the epoch.
        mark = lambda step: step * self.prunes_per_epoch // self.steps_per_epoch
        if self.is_pruning_cycle(cycle) and mark(in_epoch) > mark(in_epoch - 1):
            report = self.simplifier.prune()
            self.history.append((self.steps, report))
        if self.reset_optimizer and self.steps % (self.steps_per_epoch * self.cycle_epochs) == 0:
            self.simplifier.reset_optimizer_state()
        return report


# ---------------------------------------------------------------------------------------------
# Compact checkpoints


def _linear_shapes(model: nn.Module):
    return {
        name: [m.out_features, m.in_features] for name, m in model.named_modules() if _is_linear(m)
    }


def save_simplified(model: nn.Module, path: str | os.PathLike | IO[bytes]) -> None:
    """Saves the (compacted) model's weights and its Linear widths, tensors and plain data only."""
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "linear_shapes": _linear_shapes(model),
            "state_dict": model.state_dict(),
        },
        path,
    )


def _not_a_checkpoint(path, why):
    return ValueError(f"{path}: not a triton_mebp checkpoint: {why}")


def _read_checkpoint(path, map_location):
    """The checkpoint's (linear_shapes, state_dict), their types checked in full."""
    try:
        checkpoint = torch.load(path, weights_only=True, map_location=map_location or "cpu")
    except OSError:
        raise
    except Exception as error:  # empty, truncated, not a zip archive, pickled code, ...
        raise _not_a_checkpoint(
            path,
            f"torch.load failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})",
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise _not_a_checkpoint(path, f"no format {CHECKPOINT_FORMAT!r} entry")
    shapes, state = checkpoint.get("linear_shapes"), checkpoint.get("state_dict")
    is_width = lambda w: isinstance(w, int) and not isinstance(w, bool)
    if not isinstance(shapes, dict) or not all(
        isinstance(name, str)
        and isinstance(pair, (list, tuple))
        and len(pair) == 2
        and all(is_width(w) for w in pair)
        for name, pair in shapes.items()
    ):
        raise _not_a_checkpoint(
            path, "'linear_shapes' must map layer names to [out_features, in_features] ints"
        )
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise _not_a_checkpoint(path, "'state_dict' must map names to tensors")
    return {name: (int(o), int(i)) for name, (o, i) in shapes.items()}, state


def load_simplified(
    model: nn.Module, path: str | os.PathLike | IO[bytes], *, map_location=None
) -> nn.Module:
    """Resizes a freshly built full-size ``model`` to a saved simplified one and loads its weights.

    Loads with ``torch.load(weights_only=True)``. A file that is not such a checkpoint, or one that
    does not fit the model's architecture, raises a ValueError (naming the layer where one does
    not fit) before anything in the model changes.
    """
    saved_shapes, state = _read_checkpoint(path, map_location)
    modules = dict(model.named_modules())
    model_shapes = _linear_shapes(model)
    for name in saved_shapes:
        if name not in model_shapes:
            raise ValueError(f"checkpoint layer {name!r} is not an nn.Linear of the model")
    for name in model_shapes:
        if name not in saved_shapes:
            raise ValueError(f"layer {name!r} of the model is missing from the checkpoint")
    # Only a hidden width may be smaller: a layer's output read by Linear layers alone (through
    # element-wise modules), and those layers' inputs with it. Every other width must match.
    links, _, _ = _find_links(model, producer=_is_plain_linear)
    read_from = {
        consumer: producer for producer, consumers in links.items() for consumer, _ in consumers
    }
    current = model.state_dict()
    expected = {key: tuple(value.shape) for key, value in current.items()}
    for name, (out_f, in_f) in saved_shapes.items():
        full_out, full_in = model_shapes[name]
        fits_out = out_f == full_out or (name in links and 1 <= out_f < full_out)
        fits_in = in_f == full_in or (
            name in read_from and 1 <= in_f < full_in and in_f == saved_shapes[read_from[name]][0]
        )
        if not (fits_out and fits_in):
            raise ValueError(
                f"checkpoint layer {name!r} is {out_f} x {in_f} (out x in), which "
                f"does not fit the model's {full_out} x {full_in}"
            )
        prefix = f"{name}." if name else ""
        expected[f"{prefix}weight"] = (out_f, in_f)
        if modules[name].bias is not None:
            expected[f"{prefix}bias"] = (out_f,)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    values = {}
    for key, shape in expected.items():
        value, target = state[key], current[key]
        layer = key.rsplit(".", 1)[0] if "." in key else key
        if tuple(value.shape) != shape:
            raise ValueError(
                f"checkpoint entry {key!r} (layer {layer!r}) has shape "
                f"{tuple(value.shape)}, expected {shape}"
            )
        if (
            value.layout != torch.strided
            or value.is_complex() != target.is_complex()
            or value.is_floating_point() != target.is_floating_point()
        ):
            raise ValueError(
                f"checkpoint entry {key!r} (layer {layer!r}) is a {value.layout} "
                f"{value.dtype} tensor, expected a dense {target.dtype} one"
            )
        values[key] = value.to(device=target.device, dtype=target.dtype)
    # Everything fits: from here on nothing can fail.
    for name, (out_f, in_f) in saved_shapes.items():
        layer = modules[name]
        if (layer.out_features, layer.in_features) == (out_f, in_f):
            continue
        replace_parameter_data(layer.weight, layer.weight.new_empty(out_f, in_f))
        if layer.bias is not None:
            replace_parameter_data(layer.bias, layer.bias.new_empty(out_f))
        if isinstance(layer, MeLinear):
            _fix_k_count(layer)  # against the full width, as the Simplifier resolved it
        layer.out_features, layer.in_features = out_f, in_f
        if isinstance(layer, MeLinear):
            _resize_me_linear(layer, out_f)
    model.load_state_dict(values)
    return model
