"""MeLSTM: a drop-in nn.LSTM whose BPTT keeps the top-k gate gradients of each step."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from conftest import DEVICE, assert_close
from triton_mebp.rnn import MeLSTM, mebp_lstm_layer

INPUT, HIDDEN, T, B = 5, 6, 7, 4  # gate width 4H = 24
LENGTHS = [7, 3, 5, 1]


def _topk_mask_hook(k, mode):
    """Zeroes all but the top-k of a gate gradient (per step), chosen here independently."""

    def hook(grad):
        if mode == "unified":
            keep = torch.zeros(grad.shape[1], dtype=torch.bool, device=grad.device)
            keep[torch.topk(grad.abs().sum(0), k).indices] = True
            return grad * keep
        keep = torch.zeros_like(grad, dtype=torch.bool)
        keep.scatter_(1, torch.topk(grad.abs(), k, dim=1).indices, True)
        return grad * keep

    return hook


def reference_lstm(lstm, x, lengths, h0, c0, k, mode):
    """A plain cell loop through autograd; the gate products' gradients are masked by top-k.

    ``x`` is time-major; returns (output with zeros past each length, h_n, c_n). The bias is
    added after the hook, so its gradient stays dense as in meProp.
    """
    steps, batch = x.shape[:2]
    active = (torch.arange(steps)[:, None] < torch.as_tensor(lengths)[None, :]).unsqueeze(-1)
    directions = 2 if lstm.bidirectional else 1
    hook = _topk_mask_hook(k, mode)
    layer_input, h_n, c_n = x, [], []
    for layer in range(lstm.num_layers):
        outputs = []
        for direction in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = getattr(lstm, "weight_ih" + sfx), getattr(lstm, "weight_hh" + sfx)
            bias = getattr(lstm, "bias_ih" + sfx) + getattr(lstm, "bias_hh" + sfx)
            h, c = h0[layer * directions + direction], c0[layer * directions + direction]
            out = [None] * steps
            for t in reversed(range(steps)) if direction else range(steps):
                products = layer_input[t] @ w_ih.t() + h @ w_hh.t()
                products.register_hook(hook)
                i, f, g, o = (products + bias).chunk(4, 1)
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
                m = active[t]
                out[t] = torch.where(m, h_new, torch.zeros_like(h_new))
                h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
            outputs.append(torch.stack(out))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=2)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


def _inputs(batch_first, dtype=torch.float64, bidirectional=True, layers=2):
    directions = 2 if bidirectional else 1
    x = torch.randn((B, T, INPUT) if batch_first else (T, B, INPUT), dtype=dtype, device=DEVICE)
    h0 = torch.randn(layers * directions, B, HIDDEN, dtype=dtype, device=DEVICE)
    c0 = torch.randn(layers * directions, B, HIDDEN, dtype=dtype, device=DEVICE)
    return x, h0, c0


def _grads(out, h_n, c_n, wrt, weights):
    loss = (out * weights[0]).sum() + (h_n * weights[1]).sum() + (c_n * weights[2]).sum()
    return torch.autograd.grad(loss, wrt)


def _loss_weights(steps_batch_shape, dtype, layers=2, directions=2):
    g = torch.Generator().manual_seed(7)
    shape_out = (*steps_batch_shape, directions * HIDDEN)
    shape_state = (layers * directions, B, HIDDEN)
    return [
        torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE, dtype)
        for s in (shape_out, shape_state, shape_state)
    ]


def _run_me(me, x, h0, c0, kind, batch_first):
    """MeLSTM output padded (in the input's layout), from full, lengths= or packed input."""
    if kind == "packed":
        packed = pack_padded_sequence(
            x, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False
        )
        out, (h, c) = me(packed, (h0, c0))
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
        return out, h, c
    out, (h, c) = me(x, (h0, c0), lengths=LENGTHS if kind == "lengths" else None)
    return out, h, c


@pytest.mark.parametrize("kind", ["full", "lengths", "packed"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_full_k_matches_nn_lstm(kind, batch_first):
    ref = nn.LSTM(INPUT, HIDDEN, 2, batch_first=batch_first, bidirectional=True).double().to(DEVICE)
    me = (
        MeLSTM(INPUT, HIDDEN, 2, batch_first=batch_first, bidirectional=True, k=1.0)
        .double()
        .to(DEVICE)
    )
    me.load_state_dict(ref.state_dict())
    x, h0, c0 = _inputs(batch_first)
    for t in (x, h0, c0):
        t.requires_grad_(True)
    lengths = torch.tensor(LENGTHS if kind != "full" else [T] * B)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    ref_out, (ref_h, ref_c) = ref(packed, (h0, c0))
    ref_out, _ = pad_packed_sequence(ref_out, batch_first=batch_first, total_length=T)
    out, h, c = _run_me(me, x, h0, c0, kind, batch_first)
    assert_close(out, ref_out)
    assert_close(h, ref_h)
    assert_close(c, ref_c)
    weights = _loss_weights(out.shape[:2], torch.float64)
    expected = _grads(ref_out, ref_h, ref_c, [x, h0, c0, *ref.parameters()], weights)
    actual = _grads(out, h, c, [x, h0, c0, *me.parameters()], weights)
    for a, e in zip(actual, expected):
        assert_close(a, e)


@pytest.mark.parametrize("kind", ["full", "lengths", "packed"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_sparse_grads_match_masked_reference(mode, batch_first, kind):
    k = 5
    me = (
        MeLSTM(INPUT, HIDDEN, 2, batch_first=batch_first, bidirectional=True, k=k, mode=mode)
        .double()
        .to(DEVICE)
    )
    x, h0, c0 = _inputs(batch_first)
    for t in (x, h0, c0):
        t.requires_grad_(True)
    out, h, c = _run_me(me, x, h0, c0, kind, batch_first)
    lengths = LENGTHS if kind != "full" else [T] * B
    x_tm = x.transpose(0, 1) if batch_first else x
    ref_out, ref_h, ref_c = reference_lstm(me, x_tm, lengths, h0, c0, k, mode)
    if batch_first:
        ref_out = ref_out.transpose(0, 1)
    assert_close(out, ref_out)
    weights = _loss_weights(out.shape[:2], torch.float64)
    wrt = [x, h0, c0, *me.parameters()]
    expected = _grads(ref_out, ref_h, ref_c, wrt, weights)
    actual = _grads(out, h, c, wrt, weights)
    for a, e in zip(actual, expected):
        assert_close(a, e)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_sparse_differs_from_dense_and_touches_few_rows(mode):
    """One layer, one step from a zero state: dW_hh is zero, dW_ih has at most k (per example:
    B * k) non-zero rows, and the result is not the dense gradient."""
    k = 3
    me = MeLSTM(INPUT, HIDDEN, k=k, mode=mode).double().to(DEVICE)
    x = torch.randn(1, B, INPUT, dtype=torch.float64, device=DEVICE)
    out, _ = me(x)
    out.sum().backward()
    rows = (me.weight_ih_l0.grad != 0).any(1).sum().item()
    assert 1 <= rows <= (k if mode == "unified" else B * k)
    sparse = me.weight_ih_l0.grad.clone()
    me.zero_grad()
    me.k = 1.0
    me(x)[0].sum().backward()
    assert (me.weight_ih_l0.grad != 0).any(1).sum().item() > rows
    assert not torch.allclose(sparse, me.weight_ih_l0.grad)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_triton_backend_matches_masked_reference(mode, triton_backend):
    """The kernels (interpreted on CPU) inside the BPTT loop, fp32, 2 layers, variable lengths."""
    k = 5
    me = MeLSTM(INPUT, HIDDEN, 2, bidirectional=True, k=k, mode=mode).to(DEVICE)
    x, h0, c0 = _inputs(False, torch.float32)
    x.requires_grad_(True)
    out, (h, c) = me(x, (h0, c0), lengths=LENGTHS)
    weights = _loss_weights(out.shape[:2], torch.float32)
    actual = _grads(out, h, c, [x, *me.parameters()], weights)
    ref = MeLSTM(INPUT, HIDDEN, 2, bidirectional=True).double().to(DEVICE)
    ref.load_state_dict(me.state_dict())
    x64 = x.detach().double().requires_grad_(True)
    ref_out, ref_h, ref_c = reference_lstm(ref, x64, LENGTHS, h0.double(), c0.double(), k, mode)
    expected = _grads(
        ref_out, ref_h, ref_c, [x64, *ref.parameters()], [w.double() for w in weights]
    )
    assert_close(out, ref_out, torch.float32)
    for a, e in zip(actual, expected):
        assert_close(a, e, torch.float32)


def test_padded_steps_get_zero_gradient_and_output():
    me = MeLSTM(INPUT, HIDDEN, batch_first=True, bidirectional=True, k=0.25).double()
    x = torch.randn(B, T, INPUT, dtype=torch.float64, requires_grad=True)
    out, (h, c) = me(x, lengths=torch.tensor(LENGTHS))
    (out.pow(2).sum() + h.sum()).backward()
    for b, length in enumerate(LENGTHS):
        assert torch.all(out[b, length:] == 0)
        assert torch.all(x.grad[b, length:] == 0)
        assert torch.any(x.grad[b, :length] != 0)
    # Final states at each sequence's own last step: the same as running it alone.
    for b, length in enumerate(LENGTHS):
        _, (h_b, c_b) = me(x[b : b + 1, :length].detach())
        assert_close(h[:, b], h_b[:, 0])
        assert_close(c[:, b], c_b[:, 0])


def test_from_lstm_shares_parameters_and_unbatched_input():
    lstm = nn.LSTM(INPUT, HIDDEN, 2, dropout=0.3).double()
    lstm.eval()
    me = MeLSTM.from_lstm(lstm, k=4, mode="per_example")
    assert not me.training and me.dropout == 0.3 and me.k_count == 4
    assert [id(p) for p in me.parameters()] == [id(p) for p in lstm.parameters()]
    assert list(dict(me.named_parameters())) == list(dict(lstm.named_parameters()))
    x = torch.randn(T, INPUT, dtype=torch.float64)
    h0 = torch.randn(2, HIDDEN, dtype=torch.float64)
    c0 = torch.randn(2, HIDDEN, dtype=torch.float64)
    ref_out, (ref_h, ref_c) = lstm(x, (h0, c0))
    before = x.clone()
    out, (h, c) = me(x, (h0, c0))
    assert_close(out, ref_out)
    assert_close(h, ref_h)
    assert_close(c, ref_c)
    assert torch.equal(x, before)
    with torch.no_grad():
        lstm.weight_hh_l1.add_(1.0)  # shared: the MeLSTM sees the change
    assert not torch.allclose(me(x, (h0, c0))[0], out)


def test_no_grad_forward_matches_grad_forward():
    me = MeLSTM(INPUT, HIDDEN, bidirectional=True, k=0.1)
    x = torch.randn(T, B, INPUT)
    with torch.no_grad():
        out_ng, (h_ng, _) = me(x, lengths=LENGTHS)
    out, (h, _) = me(x, lengths=LENGTHS)
    assert out.requires_grad
    assert torch.equal(out_ng, out.detach()) and torch.equal(h_ng, h.detach())


def test_bad_input_is_reported():
    me = MeLSTM(INPUT, HIDDEN, k=0.1)
    with pytest.raises(ValueError, match="input_size 5"):
        me(torch.randn(T, B, INPUT + 1))
    with pytest.raises(ValueError, match="float64"):
        me(torch.randn(T, B, INPUT, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 7\]"):
        me(torch.randn(T, B, INPUT), lengths=[8, 1, 1, 1])
    with pytest.raises(ValueError, match="4 integers"):
        me(torch.randn(T, B, INPUT), lengths=[1, 2])
    with pytest.raises(ValueError, match="h_0 must have shape"):
        me(torch.randn(T, B, INPUT), (torch.zeros(1, B + 1, HIDDEN), torch.zeros(1, B, HIDDEN)))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        me(torch.randn(T))
    with pytest.raises(ValueError, match="proj_size"):
        MeLSTM(INPUT, HIDDEN, proj_size=2)
    with pytest.raises(ValueError, match="mode"):
        MeLSTM(INPUT, HIDDEN, mode="rows")
    with pytest.raises(ValueError, match="outside"):
        MeLSTM(INPUT, HIDDEN, k=4 * HIDDEN + 1)
    with pytest.raises(TypeError, match="nn.LSTM"):
        MeLSTM.from_lstm(nn.GRU(INPUT, HIDDEN))
    with pytest.raises(ValueError, match="mode"):
        mebp_lstm_layer(
            torch.randn(T, B, INPUT),
            torch.zeros(B, HIDDEN),
            torch.zeros(B, HIDDEN),
            me.weight_ih_l0,
            me.weight_hh_l0,
            k=2,
            mode="dense",
        )
    with pytest.raises(ValueError, match="b_ih and b_hh"):
        mebp_lstm_layer(
            torch.randn(T, B, INPUT),
            torch.zeros(B, HIDDEN),
            torch.zeros(B, HIDDEN),
            me.weight_ih_l0,
            me.weight_hh_l0,
            me.bias_ih_l0,
            None,
            k=2,
        )
