"""The Simplifier prunes only what it can prove: after prune(), either a layer was skipped with a
reason, or the model's output equals the unpruned model's with the removed neurons forced to zero.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import triton_mebp as mebp
from triton_mebp.simplify import Simplifier

THRESHOLD = 0.4


def train(model, n_in, steps=2, batch=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        model(torch.randn(batch, n_in, generator=generator)).pow(2).sum().backward()


def expected_keep(layer, threshold=THRESHOLD, min_width=1):
    """Kept neurons by the method's rule, written out here (min_width=1: the most hit one)."""
    hits, refs = layer.hits.tolist(), int(layer.refs)
    keep = [j for j, h in enumerate(hits) if h >= threshold * refs]
    return keep if len(keep) >= min_width else [max(range(len(hits)), key=lambda j: (hits[j], -j))]


def masked_copy(model, simp):
    """A copy of the unpruned model whose pruned layers' removed outputs are forced to zero."""
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for name in simp.layers:
        layer = dict(model.named_modules())[name]
        mask = torch.zeros(layer.out_features)
        mask[expected_keep(layer)] = 1
        modules[name].register_forward_hook(lambda m, args, out, mask=mask: out * mask)
    return reference.eval()


def check_prune(model, n_in, expect_pruned=None):
    """Prunes after a little training; asserts the masked-reference property. Returns the report."""
    simp = Simplifier(model, threshold=THRESHOLD)
    me_layers = {n for n, m in model.named_modules() if isinstance(m, mebp.MeLinear)}
    assert set(simp.layers) | set(simp.skipped) == me_layers
    assert not set(simp.layers) & set(simp.skipped)
    assert all(isinstance(r, str) and r for r in simp.skipped.values())
    train(model, n_in)
    reference = masked_copy(model, simp)
    report = simp.prune()
    assert set(report) == set(simp.layers) and report.skipped == simp.skipped
    if expect_pruned is not None:
        assert set(simp.layers) == set(expect_pruned)
    x = torch.randn(5, n_in)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    return simp, report


def mlp(*modules):
    return mebp.convert(nn.Sequential(*modules), k=0.5, inplace=True)


# 2(a): an nn.Sequential subclass with a forward of its own


class ResidualSequential(nn.Sequential):
    def forward(self, x):
        h = self[1](self[0](x))
        return self[4](h + torch.relu(self[2](h)))


def test_sequential_subclass_with_its_own_forward_is_traced_not_chained():
    torch.manual_seed(0)
    model = mebp.convert(
        ResidualSequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
        k=2,
        inplace=True,
    )
    simp, report = check_prune(model, 6, expect_pruned=[])
    assert "add" in simp.skipped["0"] and "add" in simp.skipped["2"]


# 2(b): a forward torch.fx cannot trace


class UntraceableParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        )

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow
            x = x * 0
        h = self.seq[1](self.seq[0](x))
        h = h - h.mean()
        return self.seq[4](self.seq[3](self.seq[2](h)))


def test_untraceable_model_is_skipped_with_the_reason():
    torch.manual_seed(0)
    model = mebp.convert(UntraceableParent(), k=2, inplace=True)
    simp, report = check_prune(model, 6, expect_pruned=[])
    assert set(simp.skipped) == {"seq.0", "seq.2"}
    assert all("torch.fx could not trace" in r for r in simp.skipped.values())
    assert dict(report) == {}


# 2(c): element-wise ops with f(0) != 0


class ShiftedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.out(1.5 - torch.sigmoid(self.inp(x)) * 2.0)


@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Softplus, nn.LogSigmoid, nn.ELU, nn.GELU])
def test_activation_with_nonzero_value_at_zero_is_folded_into_the_bias(activation):
    torch.manual_seed(0)
    model = mlp(
        nn.Linear(6, 10),
        activation(),
        nn.Dropout(0.0),
        nn.Linear(10, 8),
        activation(),
        nn.Linear(8, 3),
    )
    simp, report = check_prune(model, 6, expect_pruned=["0", "3"])
    assert any(new < old for old, new in report.values())


def test_scalar_shift_in_a_traced_forward_is_folded_into_the_bias():
    torch.manual_seed(0)
    model = mebp.convert(ShiftedBranch(), k=3, inplace=True, skip_output=True)
    simp, report = check_prune(model, 6, expect_pruned=["inp"])
    assert report["inp"][1] < 10


def test_nonzero_at_zero_without_a_consumer_bias_blocks_the_prune():
    model = mlp(nn.Linear(6, 10), nn.Sigmoid(), nn.Linear(10, 3, bias=False))
    simp, _ = check_prune(model, 6, expect_pruned=[])
    assert "no bias" in simp.skipped["0"] and "0.5" in simp.skipped["0"]


class Reciprocal(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.out(1.0 / self.inp(x))


def test_non_finite_value_at_zero_blocks_the_prune():
    simp = Simplifier(mebp.convert(Reciprocal(), k=3, inplace=True))
    assert simp.layers == [] and "inf" in simp.skipped["inp"]


# 2(d): an nn.Linear subclass with parameters of its own as the consumer


class LoraLinear(nn.Linear):
    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.a = nn.Parameter(torch.randn(2, n_in))
        self.b = nn.Parameter(torch.randn(n_out, 2))

    def forward(self, x):
        return super().forward(x) + (x @ self.a.t()) @ self.b.t()


def test_linear_subclass_consumer_is_not_pruned():
    torch.manual_seed(0)
    model = mlp(nn.Linear(6, 8), nn.ReLU(), LoraLinear(8, 4), nn.Linear(4, 3))
    simp, _ = check_prune(model, 6, expect_pruned=[])
    assert "LoraLinear" in simp.skipped["0"]
    model.train()
    model(torch.randn(2, 6)).sum().backward()  # the next forward and backward still work


def test_modules_with_forward_hooks_are_not_followed():
    model = mlp(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model[1].register_forward_hook(lambda m, args, out: out + 1.0)
    simp, _ = check_prune(model, 6, expect_pruned=[])
    assert "ReLU" in simp.skipped["0"]


class DirectWeightRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x))) + self.out.weight.sum()


def test_parameters_read_in_the_forward_block_the_prune():
    simp = Simplifier(mebp.convert(DirectWeightRead(), k=2, inplace=True))
    assert simp.layers == [] and "out.weight" in simp.skipped["inp"]


# The property: random small models of Linear, activations, residual adds, norms and
# Sequential subclasses.

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Softplus, nn.LeakyReLU, nn.Identity]


class Residual(nn.Module):
    def __init__(self, width, activation):
        super().__init__()
        self.inner, self.act = nn.Linear(width, width), activation()

    def forward(self, x):
        return x + self.act(self.inner(x))


class OwnForwardSequential(nn.Sequential):
    def forward(self, x):
        h = super().forward(x)
        return h * 0.5 + h.mean(-1, keepdim=True)


class InheritedSequential(nn.Sequential):
    pass


class Wrapper(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x) * 2.0


@st.composite
def small_models(draw):
    width, modules = 5, []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(
            st.sampled_from(["linear", "act", "residual", "norm", "own", "inherited", "nested"])
        )
        new = draw(st.integers(2, 7))
        activation = draw(st.sampled_from(ACTIVATIONS))
        if kind == "linear":
            modules.append(nn.Linear(width, new, bias=draw(st.booleans())))
            width = new
        elif kind == "act":
            modules.append(activation())
        elif kind == "residual":
            modules.append(Residual(width, activation))
        elif kind == "norm":
            modules.append(nn.LayerNorm(width))
        else:
            cls = {
                "own": OwnForwardSequential,
                "inherited": InheritedSequential,
                "nested": nn.Sequential,
            }[kind]
            modules.append(cls(nn.Linear(width, new), activation(), nn.Linear(new, new)))
            width = new
    modules.append(nn.Linear(width, 3))
    body = nn.Sequential(*modules)
    root = draw(st.sampled_from(["sequential", "own", "wrapper"]))
    if root == "own":
        body = OwnForwardSequential(*modules)
    elif root == "wrapper":
        body = Wrapper(body)
    return body, draw(st.integers(0, 2**16))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_models(), st.sampled_from(["unified", "per_example"]))
def test_prune_is_exact_or_skipped_on_random_models(model_and_seed, mode):
    model, seed = model_and_seed
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.7)
    model = mebp.convert(model, k=0.5, mode=mode, inplace=True)
    if not any(isinstance(m, mebp.MeLinear) for m in model.modules()):
        return
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, 5, seed=seed)
    optimizer.step()
    optimizer.zero_grad()
    simp = Simplifier(model, threshold=THRESHOLD, optimizer=optimizer)
    train(model, 5, seed=seed + 1)
    reference = masked_copy(model, simp)
    report = simp.prune()
    assert set(report) | set(report.skipped) == {
        n for n, m in model.named_modules() if isinstance(m, mebp.MeLinear)
    }
    x = torch.randn(4, 5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    train(model, 5, steps=1, seed=seed + 2)  # the pruned model and its optimizer keep going
    optimizer.step()
