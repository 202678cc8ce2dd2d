"""meProp for recurrent layers: ``MeLSTM``, a drop-in ``nn.LSTM`` with a top-k sparsified backward.

Forward is the ordinary LSTM (gate order i, f, g, o as in ``nn.LSTM``). Back propagation through
time keeps, at every step, only the ``k`` largest-magnitude entries of the gradient of the 4H
gate pre-activations (one index set for the batch, ``mode="unified"``, or a top-k per example,
``"per_example"``). The recurrent product ``dh_prev = dgates @ W_hh`` and the input and weight
gradients then use only the selected rows of ``W_hh`` and ``W_ih``. The bias gradient stays dense,
as in ``MeLinear``.

The recurrence is a loop over time steps (inherent to BPTT); it calls the meProp operators
(``torch.ops.triton_mebp``: Triton kernels for CUDA tensors, PyTorch ops for CPU tensors). The
products that do not feed the recurrence (``dx``, ``dW_ih``, ``dW_hh``) are computed once for all
time steps after the loop.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import library
from .functional import check_mode, resolve_k
from .library import OPS


def _run_layer(x, h0, c0, w_ih, w_hh, bias, active, reverse, keep):
    """One direction of one layer over a time-major sequence ``x`` (T x B x I).

    ``active`` (T x B x 1 bool, or None when every sequence has length T) marks the real steps:
    elsewhere the state is carried unchanged and the output is zero, so each sequence starts
    (reverse) or ends (forward) at its own last step. With ``keep``, also returns what backward
    needs: the gate activations, the states before each step and ``tanh`` of each new cell state.
    """
    T, B, _ = x.shape
    H = w_hh.shape[1]
    projected = F.linear(x, w_ih, bias)  # the input products of all steps at once
    out = x.new_empty(T, B, H)
    acts = x.new_empty(T, B, 4 * H) if keep else None
    h_prev = x.new_empty(T, B, H) if keep else None
    c_prev = x.new_empty(T, B, H) if keep else None
    tanh_c = x.new_empty(T, B, H) if keep else None
    h, c = h0, c0
    for t in range(T - 1, -1, -1) if reverse else range(T):
        a = torch.addmm(projected[t], h, w_hh.t())
        a[:, : 2 * H].sigmoid_()
        a[:, 2 * H : 3 * H].tanh_()
        a[:, 3 * H :].sigmoid_()
        i, f, g, o = a.chunk(4, 1)
        c_new = torch.addcmul(f * c, i, g)
        tc = torch.tanh(c_new)
        h_new = o * tc
        if keep:
            acts[t], h_prev[t], c_prev[t], tanh_c[t] = a, h, c, tc  # type: ignore[index]
        if active is None:
            out[t] = h_new
            h, c = h_new, c_new
        else:
            m = active[t]
            out[t] = h_new * m
            h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
    return out, h, c, (acts, h_prev, c_prev, tanh_c)


def _gate_grads(dh_new, dc_new, acts_t, c_prev_t, tanh_c_t, H):
    """Gradient of the 4H gate pre-activations of one step, and the part of dc_prev through f."""
    i, f, g, o = acts_t.chunk(4, 1)
    dc_total = dc_new + dh_new * o * (1 - tanh_c_t * tanh_c_t)
    dgates = torch.empty_like(acts_t)
    dgates[:, :H] = dc_total * g * i * (1 - i)
    dgates[:, H : 2 * H] = dc_total * c_prev_t * f * (1 - f)
    dgates[:, 2 * H : 3 * H] = dc_total * i * (1 - g * g)
    dgates[:, 3 * H :] = dh_new * tanh_c_t * o * (1 - o)
    return dgates, dc_total * f


def deferred_products(
    ops, mode, kept, kept_idx, x, h_prev, w_ih, w_hh, need_x=True, need_w_ih=True, need_w_hh=True
):
    """``(dx, dW_ih, dW_hh)`` from the kept gate gradients of all T steps at once.

    ``mode``: "dense" (``kept`` is T x B x 4H), "unified" (``kept`` T x B x k with column indices
    ``kept_idx`` T x k) or "per_example" (``kept`` values and ``kept_idx`` both T x B x k).
    A product not needed is returned as None.
    """
    T, B, n_in = x.shape
    H = w_hh.shape[1]
    dx = dw_ih = dw_hh = None
    if mode == "dense":
        flat = kept.reshape(T * B, 4 * H)
        dx = (flat @ w_ih).view(T, B, n_in) if need_x else None
        dw_ih = flat.t() @ x.reshape(T * B, n_in) if need_w_ih else None
        dw_hh = flat.t() @ h_prev.reshape(T * B, H) if need_w_hh else None
    elif mode == "unified":
        # Every step is a dense product on its gathered rows: batched over time.
        k = kept.shape[2]
        rows = kept_idx.reshape(-1)
        if need_x:
            dx = torch.bmm(kept, w_ih.index_select(0, rows).view(T, k, n_in))
        kept_t = kept.transpose(1, 2)
        if need_w_ih:
            dw_ih = torch.zeros_like(w_ih).index_add_(
                0, rows, torch.bmm(kept_t, x).reshape(T * k, n_in)
            )
        if need_w_hh:
            dw_hh = torch.zeros_like(w_hh).index_add_(
                0, rows, torch.bmm(kept_t, h_prev).reshape(T * k, H)
            )
    else:
        # Each (step, example) pair is one example of a per-example product.
        k = kept.shape[2]
        values, idx = kept.reshape(T * B, k), kept_idx.reshape(T * B, k)
        if need_x:
            dx = ops.per_example_input_grad(values, idx, w_ih).view(T, B, n_in)
        if need_w_ih:
            _, dw_ih = ops.per_example_weight_grad(
                values, idx, x.reshape(T * B, n_in), 4 * H, dense=True
            )
        if need_w_hh:
            _, dw_hh = ops.per_example_weight_grad(
                values, idx, h_prev.reshape(T * B, H), 4 * H, dense=True
            )
    return dx, dw_ih, dw_hh


class MeLSTMLayerFunction(torch.autograd.Function):
    """One direction of one LSTM layer; backward sparsifies the gate gradients step by step."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, active, k, mode, reverse):
        bias = None if b_ih is None or b_hh is None else b_ih + b_hh
        out, h, c, (acts, h_prev, c_prev, tanh_c) = _run_layer(
            x, h0, c0, w_ih, w_hh, bias, active, reverse, keep=True
        )
        ctx.save_for_backward(x, w_ih, w_hh, acts, h_prev, c_prev, tanh_c, active)
        ctx.k, ctx.mode, ctx.reverse, ctx.has_bias = k, mode, reverse, b_ih is not None
        return out, h, c

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hn, d_cn):
        x, w_ih, w_hh, acts, h_prev, c_prev, tanh_c, active = ctx.saved_tensors
        T, B, n_in = x.shape
        H = w_hh.shape[1]
        k, mode = ctx.k, ctx.mode
        dense = k == 4 * H
        d_out = d_out.to(x.dtype)
        dh, dc = d_hn.to(x.dtype), d_cn.to(x.dtype)
        db = x.new_zeros(4 * H) if ctx.has_bias else None
        if dense:
            kept = x.new_empty(T, B, 4 * H)
        elif mode == "unified":
            kept, kept_idx = (
                x.new_empty(T, B, k),
                torch.empty(T, k, dtype=torch.int64, device=x.device),
            )
        else:
            kept = x.new_empty(T, B, k)
            kept_idx = torch.empty(T, B, k, dtype=torch.int64, device=x.device)

        for t in range(T) if ctx.reverse else range(T - 1, -1, -1):
            dh_new = dh + d_out[t]
            dc_new = dc
            if active is not None:
                m = active[t]
                dh_new, dc_new = dh_new * m, dc * m
                carried_h, carried_c = dh.masked_fill(m, 0), dc.masked_fill(m, 0)
            dgates, dc = _gate_grads(dh_new, dc_new, acts[t], c_prev[t], tanh_c[t], H)
            if db is not None:
                db += dgates.sum(0)
            if dense:
                kept[t] = dgates
                dh = dgates @ w_hh
            elif mode == "unified":
                idx, dgates_c = OPS.unified_select.default(dgates, k)
                kept[t], kept_idx[t] = dgates_c, idx
                dh = OPS.gathered_input_grad.default(dgates_c, w_hh, idx)
            else:
                values, idx = OPS.per_example_select.default(dgates, k)
                kept[t], kept_idx[t] = values, idx
                dh = OPS.per_example_input_grad.default(values, idx, w_hh)
            if active is not None:
                dh, dc = dh + carried_h, dc + carried_c

        need_x, need_w_ih, need_w_hh = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[3],
            ctx.needs_input_grad[4],
        )
        dx, dw_ih, dw_hh = deferred_products(
            library.ops,
            "dense" if dense else mode,
            kept,
            None if dense else kept_idx,
            x,
            h_prev,
            w_ih,
            w_hh,
            need_x,
            need_w_ih,
            need_w_hh,
        )
        db_ih = db if ctx.has_bias and ctx.needs_input_grad[5] else None
        db_hh = db.clone() if db is not None and ctx.needs_input_grad[6] else None
        dh0 = dh if ctx.needs_input_grad[1] else None
        dc0 = dc if ctx.needs_input_grad[2] else None
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, None


def mebp_lstm_layer(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
    *,
    k: int | float,
    mode: str = "unified",
    reverse: bool = False,
    active: torch.Tensor | None = None,
):
    """One direction of one LSTM layer with a meProp backward.

    ``x``: T x B x I (time-major); ``h0``, ``c0``: B x H; weights as in ``nn.LSTM`` (4H x I,
    4H x H, biases 4H or both None); ``k``: count or ratio of the 4H gate width; ``active``:
    T x B x 1 bool marking the real steps of variable-length sequences (None: all real).
    Returns ``(output T x B x H, h_n, c_n)``; the output is zero at steps that are not active.
    """
    check_mode(mode)
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be tensors or both be None")
    k = resolve_k(k, w_hh.shape[0], "the LSTM gates")
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return MeLSTMLayerFunction.apply(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, active, k, mode, reverse
        )
    bias = None if b_ih is None or b_hh is None else b_ih + b_hh
    out, h, c, _ = _run_layer(x, h0, c0, w_ih, w_hh, bias, active, reverse, keep=False)
    return out, h, c


class MeLSTM(nn.LSTM):
    """``nn.LSTM`` whose backward keeps only the top-k gate gradients at each time step (meProp).

    Same constructor options, parameter names and shapes as ``nn.LSTM`` (``proj_size`` is not
    supported), so an ``nn.LSTM`` state dict loads into it. ``k``: int count or float ratio of the
    4 * hidden_size gate width; ``mode``: "unified" or "per_example". Accepts padded input, a
    ``PackedSequence``, or padded input with ``lengths=`` (the steps past each length get zero
    output and zero gradient, and the final states are taken at each sequence's own last step).
    """

    def __init__(self, *args, k: int | float = 0.05, mode: str = "unified", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup(k, mode)

    def _setup(self, k, mode):
        if self.proj_size:
            raise ValueError(f"MeLSTM does not support proj_size (got {self.proj_size})")
        check_mode(mode)
        resolve_k(k, 4 * self.hidden_size, "MeLSTM gates")
        self.k, self.mode = k, mode

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, *, k: int | float = 0.05, mode: str = "unified") -> "MeLSTM":
        """A MeLSTM with ``lstm``'s options that shares its Parameter objects."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"from_lstm needs an nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise ValueError(f"MeLSTM does not support proj_size (got {lstm.proj_size})")
        layer = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            bias=lstm.bias,
            batch_first=lstm.batch_first,
            dropout=lstm.dropout,
            bidirectional=lstm.bidirectional,
            device="meta",
            k=k,
            mode=mode,
        )
        for name in lstm._flat_weights_names:
            setattr(layer, name, getattr(lstm, name))
        layer.train(lstm.training)
        return layer

    @property
    def k_count(self) -> int:
        """``k`` as a count of the 4 * hidden_size gate width."""
        return resolve_k(self.k, 4 * self.hidden_size, "MeLSTM gates")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, mode={self.mode}"

    def _check_input(self, x):
        weight = self.weight_ih_l0
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"MeLSTM expects input_size {self.input_size} in the last dimension, "
                f"got input of shape {tuple(x.shape)}"
            )
        if x.dtype != weight.dtype or x.device != weight.device:
            raise ValueError(
                f"MeLSTM input is {x.dtype} on {x.device}, but its weights are "
                f"{weight.dtype} on {weight.device}"
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"MeLSTM needs at least one time step, got input of shape {tuple(x.shape)}"
            )

    def _active_steps(self, lengths, T, B, device):
        lengths = torch.as_tensor(lengths).to(device)
        if (
            lengths.dtype.is_floating_point
            or lengths.dtype == torch.bool
            or tuple(lengths.shape) != (B,)
        ):
            raise ValueError(
                f"lengths must hold {B} integers (one per sequence), got "
                f"{lengths.dtype} of shape {tuple(lengths.shape)}"
            )
        if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
            raise ValueError(
                f"lengths must be in [0, {T}] (the padded length), got "
                f"{lengths.min().item()}..{lengths.max().item()}"
            )
        if B == 0 or bool((lengths == T).all()):
            return None
        return (torch.arange(T, device=device)[:, None] < lengths[None, :]).unsqueeze(-1)

    def _initial_state(self, hx, B, x, batched):
        n_states = self.num_layers * (2 if self.bidirectional else 1)
        shape = (n_states, B, self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            return zeros, zeros
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError("MeLSTM hx must be a tuple (h_0, c_0)")
        states = []
        for name, state in zip(("h_0", "c_0"), hx):
            state = state if batched else state.unsqueeze(1)
            if tuple(state.shape) != shape:
                expected = shape if batched else (shape[0], shape[2])
                raise ValueError(
                    f"MeLSTM {name} must have shape {expected}, got "
                    f"{tuple(state.shape if batched else state.squeeze(1).shape)}"
                )
            if state.dtype != x.dtype or state.device != x.device:
                raise ValueError(
                    f"MeLSTM {name} is {state.dtype} on {state.device}, input is "
                    f"{x.dtype} on {x.device}"
                )
            states.append(state)
        return states[0], states[1]

    def forward(self, input, hx=None, *, lengths=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths= is for padded input; a PackedSequence carries its own")
            x, lengths = pad_packed_sequence(input)
            batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"MeLSTM expects 2-D (unbatched) or 3-D input, got shape {tuple(input.shape)}"
                )
            batched = input.dim() == 3
            if not batched and lengths is not None:
                raise ValueError("lengths= needs batched (3-D) input")
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        self._check_input(x)
        T, B = x.shape[:2]
        active = None if lengths is None else self._active_steps(lengths, T, B, x.device)
        h0, c0 = self._initial_state(hx, B, x, batched)

        directions = 2 if self.bidirectional else 1
        k = self.k_count
        layer_input, h_last, c_last = x, [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                state = layer * directions + direction
                out, h, c = mebp_lstm_layer(
                    layer_input,
                    h0[state],
                    c0[state],
                    getattr(self, "weight_ih" + suffix),
                    getattr(self, "weight_hh" + suffix),
                    getattr(self, "bias_ih" + suffix) if self.bias else None,
                    getattr(self, "bias_hh" + suffix) if self.bias else None,
                    k=k,
                    mode=self.mode,
                    reverse=bool(direction),
                    active=active,
                )
                outputs.append(out)
                h_last.append(h)
                c_last.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        h_n, c_n = torch.stack(h_last), torch.stack(c_last)

        output = layer_input
        if packed:
            order = input.sorted_indices
            if order is not None:
                output, lengths = output.index_select(1, order), lengths[order.cpu()]
            data = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True).data
            return (
                PackedSequence(
                    data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
                ),
                (h_n, c_n),
            )
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)
