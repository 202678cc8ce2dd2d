"""MeLinear, convert(), row-sparse gradients with torch's sparse optimizers."""

import copy

import pytest
import torch
from torch import nn

import triton_mebp as mebp
from conftest import DEVICE, assert_close
from reference import mebp_reference, selection_mask, separated_grad


def mlp(widths=(12, 40, 30, 5)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(DEVICE)


def test_melinear_is_a_drop_in_linear():
    layer = mebp.MeLinear(6, 9, k=3)
    assert isinstance(layer, nn.Linear)
    plain = nn.Linear(6, 9)
    layer.load_state_dict(plain.state_dict())
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), plain(x))
    assert "k=3" in repr(layer)


def test_melinear_backward_is_mebp(any_backend):
    layer = mebp.MeLinear(7, 20, k=4, mode="per_example").to(DEVICE)
    x = torch.randn(5, 7, device=DEVICE)
    dy = separated_grad(5, 20, "per_example", device=DEVICE)
    layer(x).backward(dy)
    _, ref_dw, ref_db = mebp_reference(x, layer.weight.detach(), dy, 4, "per_example")
    assert_close(layer.weight.grad, ref_dw)
    assert_close(layer.bias.grad, ref_db)


def test_ratio_k_follows_width():
    assert mebp.MeLinear(3, 500, k=0.05).k_count == 25
    assert mebp.MeLinear(3, 10, k=0.01).k_count == 1
    assert mebp.MeLinear(3, 10, k=1.0).k_count == 10
    with pytest.raises(ValueError, match="k=11"):
        mebp.MeLinear(3, 10, k=11)


def test_from_linear_shares_parameters():
    linear = nn.Linear(4, 6)
    layer = mebp.MeLinear.from_linear(linear, k=2)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    layer(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert layer.weight is linear.weight


def test_hit_counting_switch():
    layer = mebp.MeLinear(4, 10, k=2, count_hits=True)
    layer(torch.randn(3, 4)).sum().backward()
    assert layer.hits.sum().item() == 3 * 2 and layer.refs.item() == 3
    layer.count_hits = False
    layer(torch.randn(3, 4)).sum().backward()
    assert layer.refs.item() == 3
    layer.reset_hits()
    assert layer.hits.sum().item() == 0 and layer.refs.item() == 0
    assert "hits" not in layer.state_dict()


def test_convert_keeps_output_layer_and_input_model():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    converted = mebp.convert(model, k=3)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [type(m) for m in converted] == [
        mebp.MeLinear,
        nn.ReLU,
        mebp.MeLinear,
        nn.ReLU,
        nn.Linear,
    ]
    assert converted[0].weight is not model[0].weight
    x = torch.randn(4, 12, device=DEVICE)
    assert torch.equal(converted(x), model(x))
    converted(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_convert_options():
    model = mlp()
    everything = mebp.convert(model, k=3, skip_output=False)
    assert all(isinstance(m, mebp.MeLinear) for m in everything if isinstance(m, nn.Linear))
    excluded = mebp.convert(model, k=3, exclude=("2",))
    assert type(excluded[2]) is nn.Linear and type(excluded[0]) is mebp.MeLinear
    same = mebp.convert(model, k=3, inplace=True, mode="per_example", grad="sparse")
    assert same is model and isinstance(model[0], mebp.MeLinear)
    assert model[0].mode == "per_example" and model[0].grad == "sparse"


def test_convert_replaces_a_shared_layer_everywhere():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(8, 2))
    converted = mebp.convert(model, k=2)
    assert converted[0] is converted[2] and isinstance(converted[0], mebp.MeLinear)


def test_convert_names_the_layer_when_k_does_not_fit():
    with pytest.raises(ValueError, match="'2'.*30"):
        mebp.convert(mlp(), k=35)


SPARSE_OPTIMIZERS = [
    lambda params: torch.optim.SGD(params, lr=0.1),
    lambda params: torch.optim.SparseAdam(params, lr=0.01),
    lambda params: torch.optim.Adagrad(params, lr=0.1),
]


@pytest.mark.parametrize("make_optimizer", SPARSE_OPTIMIZERS, ids=["SGD", "SparseAdam", "Adagrad"])
@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_row_sparse_gradients_update_only_selected_rows(any_backend, make_optimizer, mode):
    layer = mebp.MeLinear(6, 30, bias=False, k=2, mode=mode, grad="sparse").to(DEVICE)
    optimizer = make_optimizer([layer.weight])
    before = layer.weight.detach().clone()
    x = torch.randn(3, 6, device=DEVICE)
    dy = separated_grad(3, 30, mode, device=DEVICE)
    layer(x).backward(dy)
    selected = layer.weight.grad.coalesce().indices()[0].cpu()
    optimizer.step()
    moved = (layer.weight.detach() != before).any(1).nonzero().flatten().cpu()
    assert torch.equal(moved, selected)
    assert 2 <= moved.numel() <= (2 if mode == "unified" else 6)


def test_sgd_step_rows_matches_dense_sgd(any_backend):
    layer = mebp.MeLinear(5, 20, k=3, grad="sparse").to(DEVICE)
    dense = copy.deepcopy(layer)
    dense.grad = "dense"
    x = torch.randn(4, 5, device=DEVICE)
    dy = separated_grad(4, 20, "unified", device=DEVICE)
    layer(x).backward(dy)
    dense(x).backward(dy)
    mebp.sgd_step_rows(layer.parameters(), lr=0.5)
    torch.optim.SGD(dense.parameters(), lr=0.5).step()
    assert_close(layer.weight, dense.weight)
    assert_close(layer.bias, dense.bias)


def test_training_converges_on_a_toy_problem():
    torch.manual_seed(1)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long()
    model = mebp.convert(mlp((10, 64, 64, 2)), k=0.1)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE))
        loss.backward()
        optimizer.step()
    accuracy = (model(x.to(DEVICE)).argmax(1).cpu() == y).float().mean().item()
    assert accuracy > 0.9


def test_convert_swaps_lstms_sharing_parameters():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(6, 10, batch_first=True)
            self.out = nn.Linear(10, 3)

        def forward(self, x):
            return self.out(self.lstm(x)[0])

    model = Tagger()
    converted = mebp.convert(model, k=8, inplace=True)
    assert isinstance(converted.lstm, mebp.MeLSTM) and type(converted.out) is nn.Linear
    assert converted.lstm.weight_hh_l0 is model.lstm.weight_hh_l0
    with pytest.raises(ValueError, match="'lstm'.*40"):
        mebp.convert(Tagger(), k=41)


def test_auto_falls_back_to_dense_backward_where_the_cost_model_says_so(monkeypatch, tmp_path):
    import triton_mebp.estimate as estimate

    decisions = {}

    def fake_is_faster(batch, in_features, out_features, k, mode, device, *, dtype, grad):
        decisions[batch] = batch >= 8
        return decisions[batch]

    monkeypatch.setattr(estimate, "mebp_is_faster", fake_is_faster)
    layer = mebp.MeLinear(5, 20, k=3, auto=True, count_hits=True)
    layer(torch.randn(4, 5)).sum().backward()  # predicted slower: every row gets a gradient
    assert (layer.weight.grad.abs().sum(1) > 0).sum().item() == 20
    layer.weight.grad = None
    layer(torch.randn(8, 5)).sum().backward()  # predicted faster: meProp
    assert (layer.weight.grad.abs().sum(1) > 0).sum().item() == 3
    layer(torch.randn(8, 5)).sum().backward()
    assert sorted(decisions) == [4, 8]  # one decision per batch size


def test_auto_decides_with_the_real_cost_model():
    """Where the answer is not in doubt: a tiny layer gains nothing from meProp (per-call overhead
    dominates), a wide one at k = 1% gains a lot on the CPU (measured 10-40x in the sweep)."""
    tiny = mebp.MeLinear(16, 16, k=2, auto=True)
    tiny(torch.randn(3, 16)).sum().backward()
    assert list(tiny._auto_decisions.values()) == [(16, False)]  # k = width: dense backward
    assert (tiny.weight.grad.abs().sum(1) > 0).all()  # dense backward: every row
    wide = mebp.MeLinear(2048, 2048, k=0.01, auto=True)
    wide(torch.randn(256, 2048)).sum().backward()
    assert list(wide._auto_decisions.values()) == [(20, False)]
    assert int((wide.weight.grad.abs().sum(1) > 0).sum()) == 20  # meProp: k rows


@pytest.mark.parametrize("grad", ["dense", "sparse"])
def test_auto_per_example_computes_meprops_gradient_densely_where_that_is_faster(
    any_backend, monkeypatch, grad
):
    """Per-example mode never falls back to full back propagation: where its own products are
    predicted slower it runs dense products on the masked dy, with the same gradient and hits."""
    import triton_mebp.estimate as estimate
    from triton_mebp import functional

    asked, masked_runs = [], []
    monkeypatch.setattr(
        estimate, "masked_dense_is_faster", lambda *a, **kw: asked.append(a) or True
    )
    monkeypatch.setattr(estimate, "mebp_is_faster", None)  # unified mode's question: not asked
    masked = functional._masked_dense_backward
    monkeypatch.setattr(
        functional,
        "_masked_dense_backward",
        lambda *a: masked_runs.append(1) or masked(*a),
    )
    B, M, N, k = 5, 7, 20, 4
    layer = mebp.MeLinear(M, N, k=k, mode="per_example", grad=grad, auto=True, count_hits=True)
    layer = layer.to(DEVICE)
    x = torch.randn(B, M, device=DEVICE, requires_grad=True)
    dy = separated_grad(B, N, "per_example", device=DEVICE)
    layer(x).backward(dy)
    assert asked == [(B, M, N, k)] and masked_runs == [1]
    ref_dx, ref_dw, ref_db = mebp_reference(x.detach(), layer.weight.detach(), dy, k, "per_example")
    assert_close(x.grad, ref_dx)
    assert_close(layer.weight.grad.to_dense(), ref_dw)
    assert_close(layer.bias.grad, ref_db)
    mask = selection_mask(dy, k, "per_example")
    if grad == "sparse":
        rows = layer.weight.grad._indices()[0]
        assert torch.equal(rows.cpu(), mask.any(0).nonzero().flatten())
    assert torch.equal(layer.hits.cpu(), mask.sum(0)) and int(layer.refs) == B


def test_auto_per_example_decides_with_the_real_cost_model():
    """The CPU's shipped speed model (2-core sweep): the per-example products win at k = 1% of a
    4096-wide layer at batch 512 and lose at 20% (docs: perf/results/per-example-break-even.csv)."""
    x = torch.empty(512, 4096)
    small = mebp.MeLinear(4096, 4096, k=0.01, mode="per_example", auto=True)
    large = mebp.MeLinear.from_linear(small, k=0.2, mode="per_example", auto=True)
    assert small._backward_plan(x) == (41, False)
    assert large._backward_plan(x) == (819, True)
