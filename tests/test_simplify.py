"""meSimp: hit statistics, consumer discovery, physical compaction, optimizer state, schedule,
compact checkpoints."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_mebp as mebp
from conftest import DEVICE, assert_close
from triton_mebp.simplify import (
    PruneReport,
    Simplifier,
    SimplifySchedule,
    load_simplified,
    save_simplified,
)


def make_mlp(widths, bias=True, activation=nn.ReLU, k=0.25, mode="unified", grad="dense", **kw):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(activation())
    model = nn.Sequential(*layers).to(DEVICE)
    return mebp.convert(model, k=k, mode=mode, grad=grad, inplace=True, **kw)


def train_steps(model, steps=3, batch=6, optimizer=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    n_in = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, n_in, generator=generator).to(DEVICE)
        loss = model(x).pow(2).sum()
        if optimizer is not None:
            optimizer.zero_grad()
        loss.backward()
        if optimizer is not None:
            optimizer.step()


def expected_keep(layer, threshold):
    """Kept neurons by the rule of the method, computed here independently of the simplifier."""
    return [
        j
        for j in range(layer.out_features)
        if layer.hits[j].item() >= threshold * layer.refs.item()
    ]


def masked_forward(model, masks, x):
    """The unpruned Sequential with each removed neuron's output forced to zero."""
    pending = None
    for module in model:
        if isinstance(module, nn.Linear) and pending is not None:
            x = x * pending
            pending = None
        x = module(x)
        if id(module) in masks:
            pending = masks[id(module)]
    return x


@pytest.mark.parametrize("widths", [(9, 16, 5), (9, 20, 16, 4), (7, 16, 20, 12, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_prune_is_exact(widths, bias, mode, any_backend):
    model = make_mlp(widths, bias=bias, mode=mode)
    simp = Simplifier(model, threshold=0.2)
    hidden = [m for m in model if isinstance(m, mebp.MeLinear)]
    assert simp.layers == [str(2 * i) for i in range(len(widths) - 2)]
    train_steps(model)
    keeps = {id(m): expected_keep(m, 0.2) for m in hidden}
    reference = copy.deepcopy(model)
    masks = {}
    for original, layer in zip(reference, model):
        if isinstance(layer, mebp.MeLinear):
            mask = torch.zeros(layer.out_features, device=DEVICE)
            mask[keeps[id(layer)]] = 1
            masks[id(original)] = mask
    params_before = [id(p) for p in model.parameters()]
    report = simp.prune()
    assert isinstance(report, PruneReport)
    assert report == {
        str(2 * i): (widths[i + 1], len(keeps[id(model[2 * i])])) for i in range(len(widths) - 2)
    }
    assert any(new < old for old, new in report.values())  # the test prunes something
    assert [id(p) for p in model.parameters()] == params_before
    for layer in hidden:
        assert layer.weight.shape == (len(keeps[id(layer)]), layer.in_features)
        assert (
            layer.hits.shape == (layer.out_features,) and layer.hits.sum() == 0 and layer.refs == 0
        )
    x = torch.randn(5, widths[0], device=DEVICE)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert_close(model(x), masked_forward(reference, masks, x), torch.float32)
    # the output width never changes, the pruned model keeps training
    assert model(x).shape == (5, widths[-1])
    train_steps(model, steps=1)


def test_hits_counted_in_both_modes(any_backend):
    for mode in ("unified", "per_example"):
        model = make_mlp((6, 12, 3), mode=mode, k=3)
        Simplifier(model)
        train_steps(model, steps=2, batch=5)
        layer = model[0]
        assert layer.refs.item() == 10
        # every example counts k selections, in both modes
        assert layer.hits.sum().item() == 10 * 3


def test_bad_arguments():
    model = make_mlp((4, 8, 2))
    for threshold in (-0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises((ValueError, TypeError), match="threshold"):
            Simplifier(model, threshold=threshold)
    with pytest.raises(ValueError, match="min_width"):
        Simplifier(model, min_width=0)
    with pytest.raises(ValueError, match="no MeLinear"):
        Simplifier(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_prune_before_backward_changes_nothing():
    model = make_mlp((5, 8, 8, 2))
    simp = Simplifier(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"layer '0'.*no examples"):
        simp.prune()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def _sliced_state_matches(old_state, new_state, cuts):
    for key, old in old_state.items():
        new = new_state[key]
        if isinstance(old, torch.Tensor) and old.dim() > 0:
            expected = old
            for dim, index in cuts.items():
                expected = expected.index_select(dim, torch.tensor(index, device=old.device))
            assert torch.equal(new, expected), key
        elif isinstance(old, torch.Tensor):
            assert torch.equal(new, old)
        else:
            assert new == old


@pytest.mark.parametrize(
    "make_optimizer,grad",
    [
        (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), "dense"),
        (lambda p: torch.optim.Adam(p, lr=1e-3), "dense"),
        (lambda p: torch.optim.AdamW(p, lr=1e-3), "dense"),
        (lambda p: torch.optim.Adagrad(p, lr=0.01), "sparse"),
        (lambda p: torch.optim.SparseAdam(p, lr=1e-3), "sparse"),
    ],
)
def test_optimizer_state_is_sliced(make_optimizer, grad):
    bias = grad == "dense"
    model = make_mlp((6, 16, 12, 3), bias=bias, grad=grad, skip_output=grad == "dense")
    optimizer = make_optimizer(list(model.parameters()))
    simp = Simplifier(model, threshold=0.3, optimizer=optimizer)
    train_steps(model, steps=3, optimizer=optimizer)
    first, second, out = model[0], model[2], model[4]
    keep1, keep2 = expected_keep(first, 0.3), expected_keep(second, 0.3)
    old_states = {id(p): copy.deepcopy(optimizer.state[p]) for p in model.parameters()}
    cuts = {
        id(first.weight): {0: keep1},
        id(second.weight): {0: keep2, 1: keep1},
        id(out.weight): {1: keep2},
    }
    if bias:
        cuts.update({id(first.bias): {0: keep1}, id(second.bias): {0: keep2}, id(out.bias): {}})
    simp.prune()
    assert (first.out_features, second.out_features) == (len(keep1), len(keep2))
    assert len(keep1) < 16 or len(keep2) < 12, "the data should make this prune remove neurons"
    for p in model.parameters():
        _sliced_state_matches(old_states[id(p)], optimizer.state[p], cuts[id(p)])
    train_steps(
        model, steps=1, optimizer=optimizer
    )  # the optimizer keeps training the pruned model


def test_per_row_state_and_failed_prune_is_atomic():
    model = make_mlp((6, 16, 12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    simp = Simplifier(model, threshold=0.3, optimizer=optimizer)
    train_steps(model, steps=3, optimizer=optimizer)
    first, second, out = model[0], model[2], model[4]
    optimizer.state[first.weight]["row_step"] = torch.arange(16)
    optimizer.state[out.weight]["row_step"] = torch.arange(3)
    optimizer.state[second.weight]["odd"] = torch.zeros(5)
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"'odd'.*2\.weight"):
        simp.prune()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert first.out_features == 16 and second.in_features == 16
    after = optimizer.state_dict()
    for index, state in state_before["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][index][key], value), key
            else:
                assert after["state"][index][key] == value, key
    del optimizer.state[second.weight]["odd"]
    keep1 = expected_keep(first, 0.3)
    simp.prune()
    assert torch.equal(optimizer.state[first.weight]["row_step"], torch.tensor(keep1))
    assert torch.equal(optimizer.state[out.weight]["row_step"], torch.arange(3))  # columns only


def test_ratio_k_becomes_a_count_capped_at_the_width():
    model = make_mlp((6, 16, 12, 3), k=6)
    model[2].k = 0.5
    simp = Simplifier(model, threshold=1.0)
    assert model[0].k == 6 and model[2].k == 6  # 0.5 of 12, resolved when the Simplifier is built
    train_steps(model, steps=4)
    simp.prune()
    # at most 6 neurons can be selected at every step, so each layer keeps 6 or fewer
    for layer in (model[0], model[2]):
        assert layer.out_features <= 6 and layer.k == layer.out_features
    train_steps(model, steps=1)


def _prune_spread_out(k, width=100, rounds=12, steps=4, batch=32):
    """Widths after each prune of a layer whose selections are spread out over all neurons."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, width), nn.Linear(width, width))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(width))  # the hidden layer's dy is the output gradient
    model = mebp.convert(model.to(DEVICE), k=k, mode="per_example", inplace=True)
    simp = Simplifier(model, threshold=0.1)
    scale = 1 + torch.arange(width) / width  # hit rates differ a little from neuron to neuron
    widths = []
    for _ in range(rounds):
        for _ in range(steps):
            x = torch.randn(batch, 6, generator=generator).to(DEVICE)
            dy = (torch.randn(batch, width, generator=generator) * scale).to(DEVICE)
            model(x).backward(dy)
        widths.append(simp.prune()["0"][1])
    return widths, model[0].k


def test_pruning_stops_at_a_sensible_width_with_a_ratio_k():
    # 5% of 100 means k = 5; with threshold 0.1 a neuron's expected hit rate k / width reaches
    # the threshold at width 50, so pruning must stop between k and 50, for a ratio k as for
    # the same absolute k (the papers' setting), instead of shrinking k with the layer.
    widths, k = _prune_spread_out(0.05)
    assert k == 5
    assert 5 <= widths[-1] <= 50 and len(set(widths[-6:])) == 1, widths
    assert _prune_spread_out(5) == (widths, 5)


def test_min_width_keeps_most_hit_rows():
    model = make_mlp((6, 16, 3), k=2)
    simp = Simplifier(model, threshold=1.0, min_width=3)
    train_steps(model, steps=3)
    hits = model[0].hits.clone()
    rows_before = model[0].weight.detach().clone()
    top = sorted(torch.sort(hits, descending=True, stable=True).indices[:3].tolist())
    assert len(expected_keep(model[0], 1.0)) < 3  # the rule alone would keep fewer
    simp.prune()
    assert torch.equal(model[0].weight.detach(), rows_before[top])


def test_old_graph_alive_does_not_break_next_backward():
    model = make_mlp((6, 16, 3))
    simp = Simplifier(model, threshold=0.3)
    train_steps(model, steps=2)
    x = torch.randn(4, 6, device=DEVICE)
    old_loss = model(x).sum()  # graph still holds the gradient accumulators
    simp.prune()
    assert model[0].out_features < 16
    model(x).sum().backward()
    assert model[0].weight.grad.shape == model[0].weight.shape
    assert model[2].weight.grad.shape == model[2].weight.shape
    del old_loss


def test_grads_are_sliced():
    model = make_mlp((6, 16, 3))
    simp = Simplifier(model, threshold=0.3)
    train_steps(model, steps=2)
    grad0, grad2 = model[0].weight.grad.clone(), model[2].weight.grad.clone()
    keep = expected_keep(model[0], 0.3)
    simp.prune()
    assert torch.equal(model[0].weight.grad, grad0[keep])
    assert torch.equal(model[2].weight.grad, grad2[:, keep])


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 8)
        self.branch = nn.Linear(8, 12)
        self.head = nn.Linear(12, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + F.gelu(self.hidden(h))  # residual add: not element-wise
        b = self.branch(h).tanh() * 2.0  # method + scalar multiply: element-wise
        return self.out(self.head(F.dropout(b, 0.0, self.training)) + h)


def test_fx_trace_finds_consumers_and_reports_others():
    model = mebp.convert(Residual().to(DEVICE), k=0.5, inplace=True)
    simp = Simplifier(model, threshold=0.3)
    assert simp.consumers == {"branch": ["head"]}
    assert "not element-wise" in simp.skipped["inp"] and "add" in simp.skipped["inp"]
    assert "not element-wise" in simp.skipped["hidden"]
    assert "add" in simp.skipped["head"]
    train_steps(model, steps=3)
    keep = expected_keep(model.branch, 0.3)
    report = simp.prune()
    assert set(report) == {"branch"} and report.skipped == simp.skipped
    assert report["branch"] == (12, len(keep))
    x = torch.randn(3, 6, device=DEVICE)
    model.eval()
    with torch.no_grad():
        # the pruned branch's removed features as zeros feeding the head's old-width weight
        full_weight = torch.zeros(8, 12, device=DEVICE)
        full_weight[:, keep] = model.head.weight
        h = torch.relu(model.inp(x))
        h = h + F.gelu(model.hidden(h))
        b = torch.zeros(3, 12, device=DEVICE)
        b[:, keep] = model.branch(h).tanh() * 2.0
        expected = model.out(F.linear(b, full_weight, model.head.bias) + h)
        assert_close(model(x), expected, torch.float32)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Dropout(0.0), nn.Linear(10, 4))
        self.tail = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 0
        return self.tail(torch.relu(self.body(x)))


def test_untraceable_model_is_left_alone():
    """Without a trace nothing proves the forward runs `body` as a chain."""
    model = mebp.convert(Untraceable().to(DEVICE), k=0.3, inplace=True)
    simp = Simplifier(model, threshold=0.3)
    assert simp.consumers == {}
    assert set(simp.skipped) == {"body.0", "body.3"}
    assert all("torch.fx could not trace" in reason for reason in simp.skipped.values())


def test_output_layer_and_shared_layers_are_left_alone():
    model = make_mlp((5, 8, 3), skip_output=False)
    simp = Simplifier(model)
    assert simp.layers == ["0"] and "model's output" in simp.skipped["2"]
    shared = mebp.MeLinear(8, 8, k=2)
    tied = nn.Sequential(
        mebp.MeLinear(4, 8, k=2), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(8, 2)
    )
    simp = Simplifier(tied)
    assert simp.layers == []
    assert "several places" in simp.skipped["0"]


def test_schedule_prunes_in_alternate_cycles_and_resets_state():
    events = []

    class Recorder:
        def prune(self):
            events.append(("prune", schedule.steps))
            return {}

        def reset_optimizer_state(self):
            events.append(("reset", schedule.steps))

    schedule = SimplifySchedule(Recorder(), steps_per_epoch=4, cycle_epochs=1, prunes_per_epoch=2)
    for _ in range(16):
        schedule.step()
    assert events == [
        ("reset", 4),
        ("prune", 6),
        ("prune", 8),
        ("reset", 8),
        ("reset", 12),
        ("prune", 14),
        ("prune", 16),
        ("reset", 16),
    ]
    events.clear()
    schedule = SimplifySchedule(
        Recorder(),
        steps_per_epoch=3,
        cycle_epochs=2,
        prunes_per_epoch=8,
        prune_first_cycle=True,
        reset_optimizer=False,
        last_pruning_cycle=0,
    )
    for _ in range(24):
        schedule.step()
    assert events == [("prune", s) for s in range(1, 7)]


def test_schedule_in_a_training_loop():
    model = make_mlp((8, 24, 24, 3), k=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, threshold=0.2, optimizer=optimizer)
    schedule = SimplifySchedule(simp, steps_per_epoch=4, cycle_epochs=1, prunes_per_epoch=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        x = torch.randn(8, 8, generator=generator).to(DEVICE)
        loss = F.cross_entropy(model(x), x[:, :3].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    assert [s for s, _ in schedule.history] == [6, 8]
    assert model[0].out_features < 24 and model[2].in_features == model[0].out_features
    assert len(optimizer.state) == 0  # reset at the end of the last cycle


def test_save_and_load_simplified(tmp_path):
    model = make_mlp((7, 16, 20, 3))
    simp = Simplifier(model, threshold=0.3)
    train_steps(model)
    simp.prune()
    path = tmp_path / "small.pt"
    save_simplified(model, path)
    fresh = make_mlp((7, 16, 20, 3))
    loaded = load_simplified(fresh, path)
    assert loaded is fresh
    assert [m.out_features for m in fresh if isinstance(m, nn.Linear)] == [
        m.out_features for m in model if isinstance(m, nn.Linear)
    ]
    assert fresh[0].hits.shape == (fresh[0].out_features,)
    # the ratio k=0.25 means the count the Simplifier kept (of the full width, capped)
    assert (
        [fresh[i].k for i in (0, 2)]
        == [model[i].k for i in (0, 2)]
        == [min(4, model[0].out_features), min(5, model[2].out_features)]
    )
    x = torch.randn(4, 7, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    train_steps(fresh, steps=1)
    # a checkpoint of a different architecture names the layer that does not fit
    with pytest.raises(ValueError, match="layer '4'"):
        load_simplified(make_mlp((7, 16, 20, 5)), path)  # output width differs
    with pytest.raises(ValueError, match="layer '0'"):
        load_simplified(make_mlp((9, 16, 20, 3)), path)  # input width differs
    with pytest.raises(ValueError, match="layer '4'"):
        load_simplified(make_mlp((7, 16, 20)), path)  # one layer fewer
    with pytest.raises(ValueError, match="layer '2'"):
        load_simplified(make_mlp((7, 16, model[2].out_features - 1, 3)), path)  # hidden too narrow
    other = make_mlp((7, 16, 20, 3), bias=False)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"'0\.bias'"):
        load_simplified(other, path)
    assert [m.out_features for m in other if isinstance(m, nn.Linear)] == [16, 20, 3]
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
