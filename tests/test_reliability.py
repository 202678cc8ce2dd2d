"""Inputs that used to crash deep inside autograd or pass silently: each gets the right answer or
a clear error at the call."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_mebp as mebp
from conftest import DEVICE, assert_close
from reference import mebp_reference, separated_grad
from triton_mebp import backend
from triton_mebp.optim import RowAdagrad, RowAdam, RowSGD
from triton_mebp.simplify import SimplifySchedule

MODES = ["unified", "per_example"]


def grads(x, w, b, dy, **options):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    mebp.mebp_linear(x, w, b, **options).backward(dy)
    return x.grad, w.grad, None if b is None else b.grad


# 4: backward where F.linear works


@pytest.mark.parametrize("mode", MODES)
def test_bias_of_shape_one_by_out(any_backend, mode):
    B, M, N, k = 5, 6, 9, 3
    x, w = torch.randn(B, M, device=DEVICE), torch.randn(N, M, device=DEVICE)
    b = torch.randn(1, N, device=DEVICE)
    dy = separated_grad(B, N, mode, device=DEVICE)
    dx, dw, db = grads(x, w, b, dy, k=k, mode=mode)
    ref_dx, ref_dw, ref_db = mebp_reference(x, w, dy, k, mode)
    assert db.shape == (1, N)
    assert_close(db, ref_db.reshape(1, N))
    assert_close(dx, ref_dx)
    assert_close(dw, ref_dw)
    # k = width: exactly F.linear's gradients
    bb = b.clone().requires_grad_()
    F.linear(x, w, bb).backward(dy)
    assert_close(grads(x, w, b, dy, k=N, mode=mode)[2], bb.grad.double())


@pytest.mark.parametrize("grad", ["dense", "sparse"])
@pytest.mark.parametrize("mode", MODES)
def test_zero_input_features(any_backend, mode, grad):
    B, N, k = 4, 6, 2
    x, w, b = (
        torch.randn(B, 0, device=DEVICE),
        torch.randn(N, 0, device=DEVICE),
        torch.randn(N, device=DEVICE),
    )
    dy = separated_grad(B, N, mode, device=DEVICE)
    hits, refs = (
        torch.zeros(N, dtype=torch.int64, device=DEVICE),
        torch.zeros((), dtype=torch.int64, device=DEVICE),
    )
    dx, dw, db = grads(x, w, b, dy, k=k, mode=mode, grad=grad, hits=hits, refs=refs)
    assert dx.shape == (B, 0) and dw.shape == (N, 0)
    assert_close(db, dy.double().sum(0))
    assert int(hits.sum()) == B * k and int(refs) == B


# 5: optimizer state of torch.optim.SGD


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch_sgd_state_loads_into_row_sgd(momentum):
    torch.manual_seed(0)
    theirs = nn.Parameter(torch.randn(5, 3))
    ours = nn.Parameter(theirs.detach().clone())
    sgd = torch.optim.SGD([theirs], lr=0.1, momentum=momentum)
    for _ in range(2):
        theirs.grad = torch.randn(5, 3)
        sgd.step()
    ours.data.copy_(theirs.detach())
    row_sgd = RowSGD([ours], lr=0.1, momentum=momentum)
    row_sgd.load_state_dict(copy.deepcopy(sgd.state_dict()))  # as from a file
    for _ in range(2):
        g = torch.randn(5, 3)
        theirs.grad, ours.grad = g.clone(), g.clone()
        sgd.step()
        row_sgd.step()
    assert_close(ours.detach(), theirs.detach().double())
    # a row-sparse step after the load: every row's buffer counts as set
    g = torch.randn(2, 3)
    ours.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), g, (5, 3))
    expected = theirs.detach().clone()
    if momentum:
        buf = sgd.state[theirs]["momentum_buffer"][[1, 3]] * momentum + g
        expected[[1, 3]] -= 0.1 * buf
    else:
        expected[[1, 3]] -= 0.1 * g
    row_sgd.step()
    assert_close(ours.detach(), expected.double())


@pytest.mark.parametrize("cls", [RowAdam, RowAdagrad])
def test_state_without_step_count_is_refused_at_load(cls):
    param = nn.Parameter(torch.randn(4, 3))
    sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.randn(4, 3)
    sgd.step()
    optimizer = cls([param])
    with pytest.raises(ValueError, match="no 'step' entry"):
        optimizer.load_state_dict(sgd.state_dict())
    assert len(optimizer.state) == 0


# 6: grad="sparse" with a weight computed in the graph


@pytest.mark.parametrize("tied", [True, False], ids=["transposed", "scaled"])
def test_sparse_gradient_of_a_computed_weight_falls_back_to_dense(any_backend, tied):
    torch.manual_seed(0)
    base = torch.randn(*((6, 8) if tied else (8, 6)), device=DEVICE, requires_grad=True)
    x = torch.randn(4, 6, device=DEVICE)
    dy = separated_grad(4, 8, "unified", device=DEVICE)
    weight = base.t() if tied else base * 2.0
    with pytest.warns(UserWarning, match="leaf weight"):
        mebp.mebp_linear(x, weight, k=3, grad="sparse").backward(dy)
    _, ref_dw, _ = mebp_reference(x, weight.detach(), dy, 3, "unified")
    assert base.grad.layout == torch.strided
    assert_close(base.grad, ref_dw.t() if tied else 2.0 * ref_dw)


def test_sparse_gradient_of_a_leaf_weight_does_not_warn():
    w = torch.randn(5, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mebp.mebp_linear(torch.randn(3, 4), w, k=2, grad="sparse").sum().backward()
    assert w.grad.is_sparse


# 8: smaller ones


def test_counters_of_the_wrong_type_name_the_argument():
    x, w = torch.randn(3, 4), torch.randn(8, 4)
    with pytest.raises(TypeError, match="hits must be an int64 tensor.*got list"):
        mebp.mebp_linear(x, w, k=2, hits=[0] * 8)
    with pytest.raises(TypeError, match="refs must be an int64 tensor.*got int"):
        mebp.mebp_linear(x, w, k=2, refs=0)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_schedule_rejects_a_bad_last_pruning_cycle(value):
    with pytest.raises(ValueError, match="last_pruning_cycle"):
        SimplifySchedule(object(), steps_per_epoch=2, last_pruning_cycle=value)


class Head(nn.Linear):
    pass


def test_skip_output_with_a_linear_subclass_head_converts_every_hidden_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), Head(8, 2))
    converted = mebp.convert(model, k=2)
    assert isinstance(converted[0], mebp.MeLinear) and isinstance(converted[2], mebp.MeLinear)
    assert type(converted[4]) is Head


def _expected_lowest(scores, k):
    """Positions of the k largest scores, ties to the lowest positions, by a stable sort."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


@pytest.mark.parametrize("mode", MODES)
def test_ties_go_to_the_lowest_positions_on_both_backends(any_backend, mode):
    N, k = 12, 4
    dy = torch.zeros(5, N, device=DEVICE)
    dy[0, [2, 7]] = 1.0  # fewer nonzeros than k: zeros tie at the threshold
    dy[1] = 0.5  # all equal
    dy[2, [9, 3, 10, 1, 6]] = torch.tensor([-2.0, 2.0, 2.0, 1.0, 2.0], device=DEVICE)
    dy[3, [11, 5]] = torch.tensor([3.0, -3.0], device=DEVICE)
    dy[4] = torch.arange(N, 0, -1, device=DEVICE).float() % 3
    ops = backend.ops_for(dy)
    hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    if mode == "unified":
        idx, _ = ops.unified_select(dy, k, hits)
        expected = _expected_lowest(dy.abs().sum(0).tolist(), k)
        assert idx.tolist() == expected
        assert hits.tolist() == [5 if j in expected else 0 for j in range(N)]
    else:
        _, idx = ops.per_example_select(dy, k, hits)
        expected = [_expected_lowest(row, k) for row in dy.abs().tolist()]
        assert idx.tolist() == expected
        assert hits.tolist() == [sum(j in row for row in expected) for j in range(N)]
