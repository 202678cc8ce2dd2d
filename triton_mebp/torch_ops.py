"""The PyTorch-ops backend: every operation of ``backend.Backend``, for CPU tensors.

Each function matches a launcher in ``triton_mebp.kernels`` by name, signature and meaning.
No Python loops over rows or examples.
"""

import torch
import torch.nn.functional as F

name = "torch"


def host_reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading a value of ``tensor`` on the host costs nothing (a CPU tensor) and may
    skip work; on a GPU it would wait for the device, so those paths compute without asking."""
    return tensor.device.type == "cpu"


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of non-negative scores; NaN above +inf, as in the kernels."""
    if scores.dtype == torch.float64:
        bits, nan = scores.view(torch.int64) & 0x7FFFFFFFFFFFFFFF, 0x7FFFFFFFFFFFFFFF
    else:
        bits, nan = scores.float().view(torch.int32).to(torch.int64) & 0x7FFFFFFF, 0x7FFFFFFF
    return torch.where(scores.isnan(), nan, bits)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries of each row of ``scores`` (B x N, non-negative),
    ascending; ties at the threshold go to the lowest positions, as in the kernels."""
    if not host_reads_are_free(scores):
        return _top_k_on_device(scores, k)
    B, N = scores.shape
    if k == N:
        return torch.arange(N, device=scores.device).repeat(B, 1)
    values, idx = torch.topk(scores, k + 1, dim=1, sorted=False)
    if bool(values.isnan().any()):  # compare order keys, where NaN ranks above +inf
        scores, values = _order_keys(scores), _order_keys(values)
    # The (k+1)-th and k-th largest: where they differ, the k largest are the k+1 found less
    # their smallest; where they are equal, topk's choice among the ties is in doubt.
    two = torch.topk(values, 2, dim=1, largest=False).values
    if not bool((two[:, 0] == two[:, 1]).any()):
        return idx[values > two[:, :1]].view(B, k).sort(dim=1).values
    kth = two[:, 1:]
    above, at = scores > kth, scores == kth
    chosen = above | (at & (at.cumsum(1) <= k - above.sum(1, keepdim=True)))  # k per row
    return chosen.nonzero()[:, 1].view(B, k)


def _top_k_on_device(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``_top_k`` without reading any value on the host (no sync on a GPU): the lowest-positions
    choice among threshold ties is computed for every row and kept where topk's may differ."""
    values, idx = torch.topk(scores, k, dim=1, sorted=False)  # ties: an unspecified choice
    keys = _order_keys(scores)
    kth = _order_keys(values).min(1, keepdim=True).values
    above, at = keys > kth, keys == kth
    n_above = above.sum(1, keepdim=True)
    straddles = n_above + at.sum(1, keepdim=True) > k
    chosen = above | (at & (at.cumsum(1) <= k - n_above))
    preference = torch.arange(scores.shape[1], 0, -1, device=scores.device)  # lowest first
    lowest = torch.topk(chosen * preference, k, dim=1, sorted=False).indices
    return torch.where(straddles, lowest, idx).sort(dim=1).values


def unified_select(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """Batch-shared top-k columns by ``sum_b |dy[b, n]|``: ``(idx ascending, dy[:, idx])``."""
    scores = dy.abs().sum(0, dtype=torch.float32)
    idx = _top_k(scores.unsqueeze(0), k)[0]
    if hits is not None:
        hits.index_add_(0, idx, torch.full_like(idx, dy.shape[0]))
    return idx, dy.index_select(1, idx)


def unified_select_and_bias(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """``unified_select`` and the bias gradient ``dy.sum(0)``: ``(idx, dy_c, db)``."""
    return (*unified_select(dy, k, hits), dy.sum(0))


def per_example_select(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """Per-row top-k of ``|dy|``: ``(values, idx)``, B x k, idx ascending within each row."""
    idx = _top_k(dy.abs(), k)
    if hits is not None:
        hits.index_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))  # no host read
    return dy.gather(1, idx), idx


def _product(a, b, dtype):
    """``a @ b`` as the kernels compute it: ``b`` rounded to ``a``'s dtype (autocast: bf16 or
    fp16), the products summed in float32 at least, the result in ``dtype``."""
    b = b.to(a.dtype)
    if dtype == a.dtype:
        return a @ b
    wide = torch.promote_types(dtype, torch.float32)  # bf16 x bf16 products are exact in fp32
    return (a.to(wide) @ b.to(wide)).to(dtype)


def _widest(dtype, *tensors):
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def gathered_input_grad(dy_c, weight, idx):
    """``dy_c @ weight[idx]`` in ``dy_c``'s dtype: only the gathered rows are cast."""
    return _product(dy_c, weight.index_select(0, idx), dy_c.dtype)


def gathered_weight_grad(dy_c, x, idx, out=None, dtype=None):
    rows = _product(dy_c.t(), x, out.dtype if out is not None else dtype or dy_c.dtype)
    if out is None:
        return rows
    return out.index_copy_(0, idx, rows)


def per_example_input_grad(values, idx, weight):
    """``dx[b] = sum_j values[b, j] * weight[idx[b, j]]``: a weighted bag of rows per example,
    summed in the wider dtype of the two (as the kernel, which widens both to float32)."""
    wide = _widest(values.dtype, weight)
    dx = F.embedding_bag(idx, weight.to(wide), per_sample_weights=values.to(wide), mode="sum")
    return dx.to(values.dtype)


def _row_segments(idx, n_rows):
    """``(order, seg)``: the flat entries of ``idx`` sorted by row, stably (within a row by
    example), and the n_rows + 1 bounds of each row's segment, found without a host read."""
    flat = idx.reshape(-1)
    sorted_rows, order = torch.sort(flat, stable=True)
    queries = torch.arange(n_rows + 1, dtype=flat.dtype, device=flat.device)
    return order, torch.searchsorted(sorted_rows, queries)


def _distinct_rows(seg):
    """``(rows, starts)``: the rows with a non-empty segment, ascending, and where each starts;
    their number is read on the host once (it sizes the row-sparse result)."""
    present = seg[1:] > seg[:-1]
    count = int(present.sum())
    rows = torch.argsort((~present).to(torch.uint8), stable=True)[:count]  # present rows first
    return rows, seg.index_select(0, rows)


def selected_rows(idx: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The distinct rows in ``idx`` (any shape, values in [0, n_rows)) ascending, int64; their
    number is read on the host once (it sizes the result)."""
    flat = idx.reshape(-1).long()
    present = torch.zeros(n_rows, dtype=torch.bool, device=idx.device).index_fill_(0, flat, True)
    count = int(present.sum())
    return torch.argsort((~present).to(torch.uint8), stable=True)[:count]  # present rows first


def per_example_weight_grad(values, idx, x, n_rows, dense=False, dtype=None):
    """``(rows, grad)``: the distinct selected rows ascending and their gradient rows, or with
    ``dense=True`` ``(None, grad)`` with the whole n_rows x M gradient (zero rows where nothing
    was selected, and no host read: no sync on a GPU); the gradient in ``dtype`` (default
    ``values``'s).

    The (example, slot) pairs are sorted by row once; each row's gradient is then a weighted bag
    of the input rows of the examples that selected it (an empty bag sums to zero). The
    row-sparse result reads the number of distinct rows on the host once.
    """
    B, K = values.shape
    order, seg = _row_segments(idx, n_rows)
    rows, starts = (None, seg[:-1]) if dense else _distinct_rows(seg)
    dtype = dtype or values.dtype
    wide = _widest(dtype, values, x)
    grad = F.embedding_bag(
        order // K,
        x.to(wide),
        starts,
        per_sample_weights=values.reshape(-1)[order].to(wide),
        mode="sum",
    )
    return rows, grad.to(dtype)


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def row_sgd_step(
    param, idx, grad, row_step, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov
) -> None:
    dtype = _compute_dtype(param.dtype)
    first = (row_step.index_select(0, idx) == 0).unsqueeze(1)
    row_step.index_add_(0, idx, torch.ones_like(idx, dtype=row_step.dtype))
    p_rows = param.index_select(0, idx).to(dtype)
    d_p = grad.to(dtype)
    if weight_decay:
        d_p = d_p.add(p_rows, alpha=weight_decay)
    if momentum_buffer is not None:
        buf = momentum_buffer.index_select(0, idx).to(dtype)
        buf = torch.where(first, d_p, buf.mul_(momentum).add_(d_p, alpha=1 - dampening))
        momentum_buffer.index_copy_(0, idx, buf.to(momentum_buffer.dtype))
        d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
    param.index_copy_(0, idx, p_rows.sub_(d_p, alpha=lr).to(param.dtype))


def row_adagrad_step(
    param, idx, grad, row_step, state_sum, *, lr, lr_decay, weight_decay, eps
) -> None:
    dtype = _compute_dtype(param.dtype)
    step = row_step.index_select(0, idx) + 1
    row_step.index_copy_(0, idx, step)
    clr = (lr / (1 + (step.to(torch.float64) - 1) * lr_decay)).to(dtype)
    p_rows = param.index_select(0, idx).to(dtype)
    g = grad.to(dtype)
    if weight_decay:
        g = g.add(p_rows, alpha=weight_decay)
    total = state_sum.index_select(0, idx).to(dtype).addcmul_(g, g)
    state_sum.index_copy_(0, idx, total.to(state_sum.dtype))
    p_rows -= clr.unsqueeze(1) * g / total.sqrt().add_(eps)
    param.index_copy_(0, idx, p_rows.to(param.dtype))


def row_adam_step(
    param,
    idx,
    grad,
    row_step,
    exp_avg,
    exp_avg_sq,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
) -> None:
    dtype = _compute_dtype(param.dtype)
    step = row_step.index_select(0, idx) + 1
    row_step.index_copy_(0, idx, step)
    step = step.to(torch.float64).unsqueeze(1)
    step_size = (lr / (1 - torch.pow(beta1, step))).to(dtype)
    bc2_sqrt = (1 - torch.pow(beta2, step)).sqrt_().to(dtype)
    p_rows = param.index_select(0, idx).to(dtype)
    g = grad.to(dtype)
    if weight_decay:
        if decoupled:
            p_rows.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p_rows, alpha=weight_decay)
    m = exp_avg.index_select(0, idx).to(dtype).lerp_(g, 1 - beta1)
    v = exp_avg_sq.index_select(0, idx).to(dtype).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.index_copy_(0, idx, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, idx, v.to(exp_avg_sq.dtype))
    denom = v.sqrt_().div_(bc2_sqrt).add_(eps)
    p_rows -= m.mul_(step_size).div_(denom)
    param.index_copy_(0, idx, p_rows.to(param.dtype))


ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
}


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def linear_act(x, weight, bias=None, activation="identity"):
    return _activation(activation)(F.linear(x, weight, bias))


def fused_mlp(
    x,
    first_weight,
    first_bias,
    rest_weight,
    rest_bias,
    out_features,
    hidden_activation="relu",
    output_activation="identity",
):
    """The packed layers' zero padding adds nothing: padded columns meet zero weights."""
    hidden, output = _activation(hidden_activation), _activation(output_activation)
    width = rest_weight.shape[1]
    h = hidden(F.linear(x, first_weight, first_bias))
    h = F.pad(h, (0, width - h.shape[1]))
    last = rest_weight.shape[0] - 1
    for i in range(last + 1):
        h = F.linear(h, rest_weight[i], rest_bias[i])
        h = output(h[:, :out_features]) if i == last else hidden(h)
    return h
