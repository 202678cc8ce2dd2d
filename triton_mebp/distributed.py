"""meProp and meSimp under ``torch.nn.parallel.DistributedDataParallel``.

``DistributedDataParallel`` here is DDP itself (a subclass) with the model's ``MeLinear`` weights
taken out of DDP's dense all-reduce (DDP's list of ignored parameters) and reduced by their own
backward instead: in unified mode each layer all-reduces its column scores first, so that every
rank selects the same k rows (the selection of one process training on the concatenated batch),
then all-reduces only those k rows of its weight gradient. In per-example mode the ranks' rows
differ: the layer all-reduces how often each row was selected, then the rows in the union, or the
whole gradient when the union is every row. Everything else (biases, layers left dense) goes
through DDP's buckets as usual. ``DistributedSimplifier`` sums meSimp's hit counts over the ranks
before pruning, so every rank removes the same neurons, and rebuilds DDP's buckets for the new
shapes. See docs/distributed.md.
"""

import datetime
import inspect
import numbers

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.utils import _verify_param_shape_across_processes

from . import backend
from .functional import DISTRIBUTED_MARK, _row_sparse, _zeroed_grad_buffer, distributed_backward
from .modules import MeLinear
from .simplify import Simplifier
from .transformer import MeMultiheadAttention

_DDP = nn.parallel.DistributedDataParallel
_MODES = {"unified": 1.0, "per_example": 2.0}
_HEADER = 5  # failed, k, k**2, mode, mode**2 (summed over the ranks)


class DistributedBackwardError(RuntimeError):
    """A collective of the distributed meProp path failed, timed out or found ranks out of step."""


class CommStats:
    """Bytes all-reduced so far, readable at any time and reset with ``reset()``.

    Counted as payload (the size of the tensors all-reduced by each rank); a ring all-reduce sends
    about ``2 (W - 1) / W`` times that over each rank's link, for both paths alike.

    - ``mebp_bytes``: by the meProp layers (column scores, selected rows, per-example row counts);
      ``layer_bytes`` splits it by layer name.
    - ``ddp_bytes``: by DDP's buckets (the dense parameters), counted by the comm hook the wrapper
      registers (``counting_allreduce_hook``) unless another hook was registered.
    - ``per_example_union`` / ``per_example_dense``: per-example backward passes that exchanged the
      union of the selected rows / fell back to the whole gradient.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.mebp_bytes = 0
        self.ddp_bytes = 0
        self.layer_bytes: dict[str, int] = {}
        self.per_example_union = 0
        self.per_example_dense = 0

    @property
    def total_bytes(self) -> int:
        return self.mebp_bytes + self.ddp_bytes

    def as_dict(self) -> dict:
        return dict(
            mebp_bytes=self.mebp_bytes,
            ddp_bytes=self.ddp_bytes,
            total_bytes=self.total_bytes,
            layer_bytes=dict(self.layer_bytes),
            per_example_union=self.per_example_union,
            per_example_dense=self.per_example_dense,
        )

    def __repr__(self) -> str:
        return f"CommStats({self.as_dict()})"


def _wait(work, what: str):
    try:
        work.wait()
    except Exception as error:
        raise DistributedBackwardError(
            f"{what} did not complete: another rank did not take part. It probably raised in its "
            "forward or backward, stopped, or runs a different model; every rank must run the "
            f"same backward passes through the same layers. ({type(error).__name__}: {error})"
        ) from error


class _DistributedLayer:
    """The backward of one MeLinear across a process group (see functional.distributed_backward)."""

    def __init__(self, name: str, group, stats: CommStats):
        self.name, self.group, self.stats = name, group, stats
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _label(self) -> str:
        return f"meProp layer {self.name!r} (rank {self.rank} of {self.world})"

    def _all_reduce(self, tensor, count: bool = True):
        if count:
            size = tensor.numel() * tensor.element_size()
            self.stats.mebp_bytes += size
            self.stats.layer_bytes[self.name] = self.stats.layer_bytes.get(self.name, 0) + size
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def _exchange_header(self, payload, k: int, mode: str):
        """Starts the all-reduce of ``payload``: a header (see ``_check_header``) + N values."""
        m = _MODES[mode]
        payload[:_HEADER] = torch.tensor([0.0, k, k * k, m, m * m], dtype=payload.dtype)
        return self._all_reduce(payload)

    def _check_header(self, payload, k, mode):
        failed, k_sum, k_sq, m_sum, m_sq = payload[:_HEADER].tolist()
        if failed:
            raise DistributedBackwardError(
                f"{self._label()}: {int(failed)} other rank(s) failed in this layer's backward"
            )
        W = self.world
        if W * k_sq != k_sum * k_sum or W * m_sq != m_sum * m_sum:
            raise DistributedBackwardError(
                f"{self._label()}: the ranks disagree on k or mode (this rank: k={k}, "
                f"mode={mode!r}; mean over ranks: k={k_sum / W:g}); with auto=True the ranks must "
                "see batches of the same size"
            )

    def _send_failure(self, n: int, device):
        payload = torch.zeros(_HEADER + n, dtype=torch.float64, device=device)
        payload[0] = 1.0
        try:
            self._all_reduce(payload, count=False).wait()
        except Exception:  # the others may be gone already; the local error is what matters
            pass

    def backward(self, dy, x, weight, ctx):
        if ctx.mode == "unified":
            return self._unified(dy, x, weight, ctx)
        return self._per_example(dy, x, weight, ctx)

    def _unified(self, dy, x, weight, ctx):
        B, N = dy.shape
        k = ctx.k
        try:
            payload = torch.empty(_HEADER + N, dtype=torch.float64, device=dy.device)
            payload[_HEADER:] = dy.abs().sum(0, dtype=torch.float32)
        except Exception:
            self._send_failure(N, dy.device)
            raise
        work = self._exchange_header(payload, k, "unified")
        db = None if ctx.sparse_bias else dy.sum(0)  # while the scores travel
        _wait(work, f"{self._label()}: the all-reduce of the column scores")
        self._check_header(payload, k, "unified")
        idx = torch.topk(payload[_HEADER:], k, sorted=False).indices.sort().values
        if ctx.hits is not None:
            ctx.hits.index_add_(0, idx, torch.full_like(idx, B))
        dy_c = dy.index_select(1, idx)
        ops = backend.ops_for(dy)
        rows = work = dw = dx = None
        if ctx.needs_input_grad[1]:
            rows = ops.gathered_weight_grad(dy_c, x, idx, dtype=weight.dtype)
            work = self._all_reduce(rows)
        if ctx.needs_input_grad[0]:
            dx = ops.gathered_input_grad(dy_c, weight, idx)  # while the rows travel
        if ctx.sparse_bias:
            db = dy.new_zeros(N).index_copy_(0, idx, dy_c.sum(0))
        if work is not None and rows is not None:
            _wait(work, f"{self._label()}: the all-reduce of the {k} selected weight rows")
            rows.div_(self.world)
            if ctx.grad == "dense":
                dw = _zeroed_grad_buffer(weight, weight.dtype).index_copy_(0, idx, rows)
            else:
                dw = _row_sparse(idx, rows, weight.shape)
        return dx, dw, db

    def _per_example(self, dy, x, weight, ctx):
        B, N = dy.shape
        k = ctx.k
        ops = backend.ops_for(dy)
        try:
            values, idx = ops.per_example_select(dy, k, ctx.hits)
            payload = torch.empty(_HEADER + N, dtype=torch.float64, device=dy.device)
            payload[_HEADER:] = torch.bincount(idx.reshape(-1).long(), minlength=N)
        except Exception:
            self._send_failure(N, dy.device)
            raise
        work = self._exchange_header(payload, k, "per_example")
        dx = ops.per_example_input_grad(values, idx, weight) if ctx.needs_input_grad[0] else None
        if ctx.sparse_bias:
            db = dy.new_zeros(N).index_add_(0, idx.reshape(-1).long(), values.reshape(-1))
        else:
            db = dy.sum(0)
        _wait(work, f"{self._label()}: the all-reduce of the per-example row counts")
        self._check_header(payload, k, "per_example")
        dw = None
        if ctx.needs_input_grad[1]:
            union = (payload[_HEADER:] > 0).nonzero().flatten()
            if B > 0:
                rows, grad_rows = ops.per_example_weight_grad(values, idx, x, N, dtype=weight.dtype)
                rows = rows.long()
            else:
                rows = torch.zeros(0, dtype=torch.long, device=dy.device)
                grad_rows = weight.new_zeros(0, weight.shape[1])
            if union.numel() < N:  # the union is smaller than the whole gradient
                self.stats.per_example_union += 1
                exchanged = grad_rows.new_zeros(union.numel(), weight.shape[1])
                exchanged.index_copy_(0, torch.searchsorted(union, rows), grad_rows)
                where = union
            else:
                self.stats.per_example_dense += 1
                exchanged = grad_rows.new_zeros(weight.shape).index_copy_(0, rows, grad_rows)
                where = None
            _wait(
                self._all_reduce(exchanged),
                f"{self._label()}: the all-reduce of the selected weight rows",
            )
            exchanged.div_(self.world)
            if ctx.grad == "dense":
                dw = (
                    exchanged
                    if where is None
                    else _zeroed_grad_buffer(weight, weight.dtype).index_copy_(0, where, exchanged)
                )
            else:
                where = torch.arange(N, device=dy.device) if where is None else where
                dw = _row_sparse(where, exchanged, weight.shape)
        return dx, dw, db


def counting_allreduce_hook(state, bucket):
    """DDP's default gradient averaging (all-reduce, divide by the world size) that also counts
    the bucket's bytes in ``state.stats.ddp_bytes``. ``state``: ``_HookState`` (or anything with
    ``group``, ``world`` and ``stats``)."""
    buffer = bucket.buffer()
    state.stats.ddp_bytes += buffer.numel() * buffer.element_size()
    buffer.div_(state.world)
    future = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()

    def done(fut):
        try:
            return fut.value()[0]
        except Exception as error:
            raise DistributedBackwardError(
                f"DDP's all-reduce of a gradient bucket (rank {dist.get_rank(state.group)} of "
                f"{state.world}) did not complete: another rank did not take part; it probably "
                f"raised in its forward or backward. ({type(error).__name__}: {error})"
            ) from error

    return future.then(done)


class _HookState:
    def __init__(self, group, stats):
        self.group, self.stats = group, stats
        self.world = dist.get_world_size(group)


def count_ddp_bytes(
    ddp: nn.parallel.DistributedDataParallel, stats: CommStats | None = None
) -> CommStats:
    """Registers ``counting_allreduce_hook`` on any DDP (before its first backward, in place of
    another comm hook) and returns the ``CommStats`` whose ``ddp_bytes`` it counts."""
    stats = stats if stats is not None else CommStats()
    ddp.register_comm_hook(_HookState(ddp.process_group, stats), counting_allreduce_hook)
    return stats


def _timedelta(timeout):
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not float(timeout) > 0:
        raise ValueError(
            f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}"
        )
    return datetime.timedelta(seconds=float(timeout))


_groups: dict = {}  # (ranks, timeout, use, default group) -> process group, reused by later wrappers


def _group(parent, timeout, use: str):
    """A process group over ``parent``'s ranks with ``timeout``: one per use, made once (every
    rank of ``parent`` makes it at the same point, when it builds its first such wrapper)."""
    key = (tuple(dist.get_process_group_ranks(parent)), timeout, use, dist.group.WORLD)
    if key not in _groups:
        _groups[key] = dist.new_group(list(key[0]), timeout=timeout, use_local_synchronization=True)
    return _groups[key]


def _me_layers(module: nn.Module):
    """[(qualified name, MeLinear)], each layer once; raises for what the wrapper cannot reduce:
    DTensor parameters, a weight another module shares, sparse MeMultiheadAttention gradients."""
    sharded = [n for n, p in module.named_parameters() if type(p).__name__ == "DTensor"]
    if sharded:
        raise TypeError(
            f"parameter {sharded[0]!r} is a DTensor (FSDP2 or tensor parallelism): "
            "triton_mebp.DistributedDataParallel supports replicated models only"
        )
    for name, layer in module.named_modules():
        if (
            isinstance(layer, MeMultiheadAttention)
            and layer.grad == "sparse"
            and layer.in_proj_k is not None
        ):
            raise ValueError(
                f"MeMultiheadAttention {name!r} has grad='sparse': its in-projection "
                "goes through DDP's buckets, which take dense gradients only; set "
                "its grad to 'dense'"
            )
    layers, seen = [], set()
    for name, layer in module.named_modules():
        if isinstance(layer, MeLinear) and id(layer) not in seen:
            seen.add(id(layer))
            layers.append((name, layer))
    weights = {id(layer.weight): name for name, layer in layers}
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        if isinstance(owner, MeLinear):
            continue
        for pname, param in owner.named_parameters(recurse=False):
            if id(param) in weights:
                raise ValueError(
                    f"the weight of MeLinear {weights[id(param)]!r} is also {owner_name}.{pname} "
                    f"({type(owner).__name__}): the gradient of that use would not be reduced; "
                    "leave the layer dense (convert(..., exclude=...))"
                )
    return layers


def _set_ignored(module: nn.Module, names) -> None:
    """Sets the names DDP ignores in ``module`` (and its marks on them); None: no such list."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if hasattr(tensor, "_ddp_ignored"):
            del tensor._ddp_ignored
    if names is not None:
        _DDP._set_params_and_buffers_to_ignore_for_model(module, names)
    elif hasattr(module, "_ddp_params_and_buffers_to_ignore"):
        del module._ddp_params_and_buffers_to_ignore


def _ignored_names(layers):
    names = []
    for name, _ in layers:
        for attr in ("weight", "hits", "refs"):
            # DDP matches both "name.attr" and, for the root module, ".attr" and "attr".
            names += [f"{name}.{attr}"] + ([attr] if not name else [])
    return names


class DistributedDataParallel(_DDP):
    """``torch.nn.parallel.DistributedDataParallel`` for models with ``MeLinear`` layers.

    Takes DDP's arguments, plus ``timeout`` (seconds or a ``timedelta``): the longest a
    collective may wait for the other ranks before the backward raises a
    ``DistributedBackwardError`` (it also applies to DDP's own all-reduces unless a
    ``process_group`` is given; default: the default process group's timeout).

    The MeLinear weights (and their hit counters) are not DDP's: their backward all-reduces the
    column scores, selects the same rows on every rank and all-reduces only those rows, averaged
    like DDP's gradients. ``comm_stats`` counts the bytes. ``rebuild()`` re-creates DDP's buckets
    after the model's shapes changed (``DistributedSimplifier`` calls it). ``release()`` ends the
    wrapper and returns the layers to single-process backward.
    """

    def __init__(self, module, *args, timeout=None, **kwargs):
        layers = _me_layers(module)
        timeout = _timedelta(timeout)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "triton_mebp.distributed.DistributedDataParallel needs an "
                "initialised process group (torch.distributed.init_process_group)"
            )
        bound = inspect.signature(_DDP.__init__).bind(None, module, *args, **kwargs).arguments
        previous = getattr(module, "_ddp_params_and_buffers_to_ignore", None)
        ignored = list(previous or ())
        _set_ignored(module, ignored + [n for n in _ignored_names(layers) if n not in ignored])
        if (
            timeout is not None
            and bound.get("process_group") is None
            and bound.get("device_mesh") is None
        ):
            kwargs["process_group"] = _group(dist.group.WORLD, timeout, "ddp")
        try:
            super().__init__(module, *args, **kwargs)
        except Exception:
            _set_ignored(module, previous)
            raise
        self._previous_ignored, self._released = previous, False
        self.mebp_layers = layers
        self.comm_stats = CommStats()
        self.mebp_group = _group(self.process_group, timeout, "mebp")
        weights = [layer.weight for _, layer in layers]
        if weights and bound.get("init_sync", True):
            # DDP leaves ignored parameters alone: same shapes everywhere, rank 0's values.
            self._verify_mebp_shapes()
            source = dist.get_global_rank(self.mebp_group, 0)
            with torch.no_grad():
                for weight in weights:
                    dist.broadcast(weight.data, src=source, group=self.mebp_group)
        for name, layer in layers:
            distributed_backward[layer.weight] = _DistributedLayer(
                name, self.mebp_group, self.comm_stats
            )
            setattr(layer.weight, DISTRIBUTED_MARK, True)  # torch.compile leaves the layer eager
        self._shapes = self._current_shapes()

    def _verify_mebp_shapes(self):
        try:
            _verify_param_shape_across_processes(
                self.mebp_group, [layer.weight for _, layer in self.mebp_layers]
            )
        except Exception as error:
            raise DistributedBackwardError(
                f"the MeLinear weights differ in shape between the ranks: {error}"
            ) from error

    def _current_shapes(self):
        return [tuple(p.shape) for p in self.module.parameters()]

    def _ensure_comm_hook(self):
        if not self._comm_hooks:
            count_ddp_bytes(self, self.comm_stats)

    def forward(self, *inputs, **kwargs):
        if self._released:
            raise RuntimeError("this DistributedDataParallel was released: wrap the model again")
        if self._current_shapes() != self._shapes:
            raise RuntimeError(
                "the model's parameter shapes changed since DDP built its buckets: prune with "
                "triton_mebp.DistributedSimplifier(ddp, ...) (which keeps the ranks in step and "
                "rebuilds), or call ddp.rebuild() on every rank after changing the model"
            )
        self._ensure_comm_hook()
        return super().forward(*inputs, **kwargs)

    def rebuild(self) -> None:
        """Re-creates DDP's reducer for the model's current parameter shapes (on every rank).

        A collective: checks that every rank's parameters have the same shapes, then builds new
        buckets the way DDP does on unpickling; the communication hook carries over.
        """
        hooks = list(self._comm_hooks)
        self.reducer._remove_autograd_hooks()
        parameters, expect_sparse_gradient = self._build_params_for_reducer()
        try:
            _verify_param_shape_across_processes(self.process_group, parameters)
        except Exception as error:
            raise DistributedBackwardError(
                f"after a change of shapes the ranks' models differ: {error}"
            ) from error
        self._verify_mebp_shapes()
        self._ddp_init_helper(
            parameters,
            expect_sparse_gradient,
            self._build_debug_param_to_name_mapping(parameters),
            self.static_graph,
        )
        if self.static_graph:
            self.reducer._set_static_graph()
        self._has_rebuilt_buckets = False
        self._comm_hooks = []
        for hook, state in hooks:
            self.register_comm_hook(state, hook)
        self._shapes = self._current_shapes()

    def release(self) -> None:
        """Ends the wrapper: the MeLinear layers go back to single-process backward and the model
        forgets the parameters DDP was told to ignore (so that another DDP reduces them)."""
        for _, layer in self.mebp_layers:
            if isinstance(distributed_backward.get(layer.weight), _DistributedLayer):
                del distributed_backward[layer.weight]
            if hasattr(layer.weight, DISTRIBUTED_MARK):
                delattr(layer.weight, DISTRIBUTED_MARK)
        _set_ignored(self.module, self._previous_ignored)
        self._released = True


class DistributedSimplifier(Simplifier):
    """meSimp across the ranks of a ``triton_mebp.distributed.DistributedDataParallel``.

    ``prune()`` sums the hit and example counts of every rank first (one all-reduce), so every
    rank removes the same neurons; the parameters and the optimizer's state are sliced alike on
    each rank, and DDP's buckets are rebuilt for the new shapes. Call it on every rank at the same
    step (``SimplifySchedule`` does). Other arguments as ``Simplifier``.
    """

    def __init__(
        self,
        ddp: DistributedDataParallel,
        *,
        threshold: float = 0.1,
        optimizer=None,
        min_width: int = 1,
    ):
        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(
                "DistributedSimplifier needs a triton_mebp.distributed."
                f"DistributedDataParallel, got {type(ddp).__name__}"
            )
        super().__init__(ddp.module, threshold=threshold, optimizer=optimizer, min_width=min_width)
        self.ddp = ddp

    def prune(self):
        layers = [plan.layer for plan in self.plans]
        saved = [(layer.hits.clone(), layer.refs.clone()) for layer in layers]
        if layers:
            counts = torch.cat([torch.cat([layer.hits, layer.refs.view(1)]) for layer in layers])
            _wait(
                dist.all_reduce(counts, group=self.ddp.mebp_group, async_op=True),
                "meSimp: the all-reduce of the hit counts",
            )
            start = 0
            for layer in layers:
                n = layer.hits.numel()
                layer.hits.copy_(counts[start : start + n])
                layer.refs.copy_(counts[start + n])
                start += n + 1
        try:
            report = super().prune()
        except Exception:
            for layer, (hits, refs) in zip(layers, saved):
                layer.hits.copy_(hits)
                layer.refs.copy_(refs)
            raise
        if any(old != new for old, new in report.values()):
            self.ddp.rebuild()
        return report


__all__ = [
    "CommStats",
    "DistributedBackwardError",
    "DistributedDataParallel",
    "DistributedSimplifier",
    "count_ddp_bytes",
    "counting_allreduce_hook",
]
