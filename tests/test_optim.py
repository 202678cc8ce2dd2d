"""Row-sparse optimizers (triton_mebp.optim) against a float64 per-row reference and torch.optim."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import triton_mebp as mebp
from aot import check_results, compile_specs
from conftest import DEVICE, KERNEL_DTYPES, assert_close
from triton_mebp.optim import RowAdagrad, RowAdam, RowAdamW, RowSGD
from triton_mebp.simplify import Simplifier

# name -> (class, hyper-parameters, matching torch.optim class)
OPTIMIZERS = {
    "sgd": (RowSGD, dict(lr=0.1), torch.optim.SGD),
    "sgd_momentum": (
        RowSGD,
        dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
        torch.optim.SGD,
    ),
    "sgd_nesterov": (
        RowSGD,
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        torch.optim.SGD,
    ),
    "adagrad": (
        RowAdagrad,
        dict(lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1),
        torch.optim.Adagrad,
    ),
    "adam": (RowAdam, dict(lr=0.01, weight_decay=0.01), torch.optim.Adam),
    "adamw": (RowAdamW, dict(lr=0.01, weight_decay=0.1), torch.optim.AdamW),
}

# Parameter shapes: rows first; 1-D and 3-D parameters are updated row by row too.
PARAM_SHAPES = [(1, 1), (7, 33), (33, 7), (5, 131), (17,), (5, 3, 4)]


class RowReference:
    """The row semantics written out row by row in float64 with ``math``: the selected rows move,
    each with its own step count; other rows and their state stay as they are."""

    def __init__(self, name, param):
        cls, hp, _ = OPTIMIZERS[name]
        self.kind = {RowSGD: "sgd", RowAdagrad: "adagrad", RowAdam: "adam", RowAdamW: "adamw"}[cls]
        self.hp = dict(hp)
        self.p = param.detach().cpu().to(torch.float64).reshape(param.shape[0], -1).clone()
        self.a = torch.zeros_like(self.p)  # momentum buffer / Adagrad sum / Adam exp_avg
        self.b = torch.zeros_like(self.p)  # Adam exp_avg_sq
        if self.kind == "adagrad":
            self.a.fill_(self.hp.get("initial_accumulator_value", 0.0))
        self.count = [0] * self.p.shape[0]

    def step(self, row_grads, lr=None):
        """``row_grads``: {row: float64 gradient of that row (duplicates already summed)}."""
        hp = self.hp
        lr = hp["lr"] if lr is None else lr
        wd = hp.get("weight_decay", 0.0)
        for r, g in row_grads.items():
            g = g.reshape(-1).cpu().to(torch.float64).clone()
            p, first = self.p[r], self.count[r] == 0
            self.count[r] += 1
            t = self.count[r]
            if self.kind == "sgd":
                g += wd * p
                mom = hp.get("momentum", 0.0)
                if mom:
                    self.a[r] = g if first else mom * self.a[r] + (1 - hp.get("dampening", 0.0)) * g
                    g = g + mom * self.a[r] if hp.get("nesterov") else self.a[r].clone()
                self.p[r] = p - lr * g
            elif self.kind == "adagrad":
                g += wd * p
                self.a[r] += g * g
                clr = lr / (1 + (t - 1) * hp.get("lr_decay", 0.0))
                self.p[r] = p - clr * g / (self.a[r].sqrt() + hp.get("eps", 1e-10))
            else:
                beta1, beta2 = hp.get("betas", (0.9, 0.999))
                if self.kind == "adamw":
                    p = p * (1 - lr * wd)
                else:
                    g += wd * p
                self.a[r] = beta1 * self.a[r] + (1 - beta1) * g
                self.b[r] = beta2 * self.b[r] + (1 - beta2) * g * g
                denom = self.b[r].sqrt() / math.sqrt(1 - beta2**t) + hp.get("eps", 1e-8)
                self.p[r] = p - lr / (1 - beta1**t) * self.a[r] / denom


def random_row_grad(shape, dtype, generator, duplicates=True, rows=None):
    """An uncoalesced row-sparse gradient (some rows repeated) and its per-row float64 sums."""
    n = shape[0]
    if rows is None:
        rows = torch.randperm(n, generator=generator)[
            : int(torch.randint(1, n + 1, (1,), generator=generator))
        ]
    if duplicates:
        rows = torch.cat([rows, rows[:2]])
    values = torch.randn((rows.numel(),) + tuple(shape[1:]), generator=generator).to(dtype)
    grad = row_sparse(rows.unsqueeze(0), values, shape, device="cpu")
    sums = {}
    for r, v in zip(rows.tolist(), values.to(torch.float64)):
        sums[r] = sums[r] + v if r in sums else v.clone()
    return grad, sums


def row_sparse(indices, values, shape, check_invariants=True, device=DEVICE):
    return torch.sparse_coo_tensor(
        indices, values, shape, check_invariants=check_invariants, device=device
    )


def make_param(shape, dtype, strided=False, device=DEVICE):
    data = torch.randn(shape[::-1]).t() if strided else torch.randn(shape)
    return nn.Parameter(data.to(device=device, dtype=dtype))


def _check_against_reference(name, shape, dtype, steps=4, strided=False, device=DEVICE):
    cls, hp, _ = OPTIMIZERS[name]
    param = make_param(shape, dtype, strided, device)
    reference = RowReference(name, param)
    optimizer = cls([param], **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grad, sums = random_row_grad(shape, dtype, gen)
        param.grad = grad.to(device)
        optimizer.step()
        reference.step(sums)
    assert_close(param.detach().cpu().reshape(shape[0], -1), reference.p, dtype)
    row_step = optimizer.state[param]["row_step"]
    assert row_step.dtype == torch.float32 and row_step.shape == (shape[0],)
    assert row_step.tolist() == [float(c) for c in reference.count]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("shape", PARAM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_matches_reference(name, shape, dtype):
    before = mebp.get_backend()
    mebp.set_backend("torch")
    try:
        _check_against_reference(name, shape, dtype, device="cpu")
    finally:
        mebp.set_backend(before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("shape", [(7, 33), (33, 7), (17,), (5, 3, 4)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernels_match_reference(triton_backend, name, shape, dtype):
    _check_against_reference(name, shape, dtype, steps=3)


@pytest.mark.parametrize("name", ["sgd_nesterov", "adam"])
def test_strided_parameter(any_backend, name):
    _check_against_reference(name, (9, 13), torch.float32, steps=3, strided=True)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_row_selected_equals_torch_optim(any_backend, name):
    """Row-sparse gradients holding every row, from MeLinear(grad="sparse") with k = width, and
    a dense bias in the same optimizer: the result equals torch.optim on dense gradients."""
    cls, hp, torch_cls = OPTIMIZERS[name]
    dtype = torch.float64 if any_backend == "torch" else torch.float32
    dense = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).to(DEVICE, dtype)
    sparse = mebp.convert(dense, k=1.0, grad="sparse")
    ours, theirs = cls(sparse.parameters(), **hp), torch_cls(dense.parameters(), **hp)
    for _ in range(4):
        x = torch.randn(5, 6, dtype=dtype, device=DEVICE)
        for model, optimizer in ((sparse, ours), (dense, theirs)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
        assert sparse[0].weight.grad.is_sparse and not sparse[0].bias.grad.is_sparse
        ours.step()
        theirs.step()
    for a, b in zip(sparse.parameters(), dense.parameters()):
        assert_close(a.detach(), b.detach(), dtype)


@pytest.mark.parametrize(
    "name, capturable",
    [(name, False) for name in OPTIMIZERS] + [("adagrad", True), ("adam", True), ("adamw", True)],
)
def test_dense_gradients_equal_torch_optim(name, capturable):
    """With ``capturable=True`` the step count is a tensor on the parameter's device."""
    cls, hp, torch_cls = OPTIMIZERS[name]
    ours_hp = dict(hp, capturable=True) if capturable else hp
    a = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    ours, theirs = cls([a], **ours_hp), torch_cls([b], **hp)
    for _ in range(5):
        g = torch.randn(4, 5, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=1e-12)
    assert "row_step" not in ours.state[a]


@pytest.mark.parametrize("name", ["sgd_momentum", "adagrad", "adam"])
def test_duplicate_rows_are_summed_and_grad_untouched(any_backend, name):
    cls, hp, _ = OPTIMIZERS[name]
    rows = torch.tensor([3, 0, 3, 3, 5], device=DEVICE)
    values = torch.randn(5, 4, device=DEVICE)
    uncoalesced = row_sparse(rows.unsqueeze(0), values, (6, 4))
    summed = torch.zeros(6, 4, device=DEVICE).index_add_(0, rows, values)
    a = nn.Parameter(torch.randn(6, 4, device=DEVICE))
    b = nn.Parameter(a.detach().clone())
    a.grad = uncoalesced
    b.grad = summed.to_sparse(1)
    cls([a], **hp).step()
    cls([b], **hp).step()
    assert_close(a.detach(), b.detach(), torch.float32)
    assert not a.grad.is_coalesced() and torch.equal(a.grad._values(), values)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unselected_rows_and_their_state_do_not_change(any_backend, name):
    cls, hp, _ = OPTIMIZERS[name]
    param = nn.Parameter(torch.randn(8, 5, device=DEVICE))
    optimizer = cls([param], **hp)
    param.grad = torch.randn(8, 5, device=DEVICE).to_sparse(1)  # every row once: state non-zero
    optimizer.step()
    before = {k: v.clone() for k, v in optimizer.state[param].items()}
    weight_before = param.detach().clone()
    selected = torch.tensor([1, 6], device=DEVICE)
    param.grad = row_sparse(selected.unsqueeze(0), torch.randn(2, 5, device=DEVICE), (8, 5))
    optimizer.step()
    others = torch.tensor([0, 2, 3, 4, 5, 7], device=DEVICE)
    assert torch.equal(param.detach()[others], weight_before[others])
    assert not torch.equal(param.detach()[selected], weight_before[selected])
    for key, value in optimizer.state[param].items():
        if value.dim() > 0:
            assert torch.equal(value[others], before[key][others]), key
    assert optimizer.state[param]["row_step"].tolist() == [1, 2, 1, 1, 1, 1, 2, 1]


def test_adam_late_row_takes_a_normal_sized_step(any_backend):
    """A row first selected at step 20 moves by lr (Adam's first step), not more."""
    lr = 1e-3
    param = nn.Parameter(torch.zeros(3, 64, device=DEVICE))
    optimizer = RowAdam([param], lr=lr)
    for _ in range(19):
        param.grad = row_sparse(torch.tensor([[0]]), torch.randn(1, 64), (3, 64))
        optimizer.step()
    param.grad = row_sparse(torch.tensor([[2]]), torch.randn(1, 64) * 1e-2, (3, 64))
    optimizer.step()
    torch.testing.assert_close(
        param.detach()[2].abs().cpu(), torch.full((64,), lr), atol=1e-7, rtol=1e-4
    )
    assert torch.equal(param.detach()[1].cpu(), torch.zeros(64))


def test_empty_row_sparse_gradient_changes_nothing(any_backend):
    param = nn.Parameter(torch.randn(4, 3, device=DEVICE))
    before = param.detach().clone()
    optimizer = RowAdam([param])
    param.grad = row_sparse(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3), (4, 3))
    optimizer.step()
    assert torch.equal(param.detach(), before)
    assert optimizer.state[param]["row_step"].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip(name):
    cls, hp, _ = OPTIMIZERS[name]
    weight, bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
    optimizer = cls([{"params": [weight]}, {"params": [bias], "lr": hp["lr"] / 2}], **hp)
    gen = torch.Generator().manual_seed(2)

    def grads():
        weight.grad = random_row_grad((6, 4), torch.float32, gen)[0]
        bias.grad = torch.randn(6, generator=gen)

    for _ in range(3):
        grads()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    weight2, bias2 = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
    restored = cls([{"params": [weight2]}, {"params": [bias2]}], **hp)
    restored.load_state_dict(saved)
    assert restored.param_groups[1]["lr"] == hp["lr"] / 2
    for _ in range(3):
        gen_state = gen.get_state()
        grads()
        optimizer.step()
        gen.set_state(gen_state)
        weight2.grad, bias2.grad = weight.grad, bias.grad
        restored.step()
    assert torch.equal(weight2.detach(), weight.detach())
    assert torch.equal(bias2.detach(), bias.detach())


def test_load_state_dict_keeps_row_step_float32():
    """torch.optim casts loaded state to the parameter dtype; row counts must not be rounded."""
    param = nn.Parameter(torch.randn(3, 2, dtype=torch.bfloat16))
    optimizer = RowAdam([param])
    param.grad = torch.randn(3, 2, dtype=torch.bfloat16).to_sparse(1)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][0]["row_step"] = torch.tensor([3001.0, 1.0, 257.0])
    restored = RowAdam([nn.Parameter(param.detach().clone())])
    restored.load_state_dict(saved)
    row_step = restored.state[restored.param_groups[0]["params"][0]]["row_step"]
    assert row_step.dtype == torch.float32 and row_step.tolist() == [3001.0, 1.0, 257.0]
    assert saved["state"][0]["row_step"].tolist() == [3001.0, 1.0, 257.0]  # input unchanged


def test_load_state_dict_rejects_wrong_row_step_shape():
    param = nn.Parameter(torch.randn(3, 2))
    optimizer = RowAdam([param])
    param.grad = torch.randn(3, 2).to_sparse(1)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][0]["row_step"] = torch.zeros(5)
    target = RowAdam([nn.Parameter(torch.randn(3, 2))], lr=0.5)
    with pytest.raises(ValueError, match="row_step"):
        target.load_state_dict(saved)
    assert not target.state and target.param_groups[0]["lr"] == 0.5  # left as it was


def test_lr_scheduler_and_zero_grad(any_backend):
    param = nn.Parameter(torch.randn(5, 3, device=DEVICE))
    reference = RowReference("adam", param)
    optimizer = RowAdam([param], **OPTIMIZERS["adam"][1])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        grad, sums = random_row_grad((5, 3), torch.float32, gen)
        param.grad = grad.to(DEVICE)
        optimizer.step()
        reference.step(sums, lr=OPTIMIZERS["adam"][1]["lr"] * 0.5**step)
        scheduler.step()
        optimizer.zero_grad()
        assert param.grad is None
    assert scheduler.get_last_lr() == [OPTIMIZERS["adam"][1]["lr"] * 0.5**4]
    assert_close(param.detach().cpu(), reference.p, torch.float32)


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "adagrad"])
def test_state_survives_simplification(name):
    cls, hp, _ = OPTIMIZERS[name]
    model = mebp.convert(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)),
        k=3,
        grad="sparse",
    )
    optimizer = cls(model.parameters(), **hp)
    simplifier = Simplifier(model, threshold=0.3, optimizer=optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).square().sum().backward()
        optimizer.step()
    layer = model[2]
    keep = (layer.hits.double() >= 0.3 * int(layer.refs)).nonzero().flatten()
    keep_in = (model[0].hits.double() >= 0.3 * int(model[0].refs)).nonzero().flatten()
    old_state = copy.deepcopy(optimizer.state[layer.weight])
    old_weight = layer.weight.detach().clone()
    report = simplifier.prune()
    assert report["2"] == (12, keep.numel()) and keep.numel() < 12
    state = optimizer.state[layer.weight]
    for key, value in state.items():
        if value.dim() == 0:
            assert torch.equal(value, old_state[key])
        elif key == "row_step":
            assert torch.equal(value, old_state[key][keep])
        else:
            assert torch.equal(value, old_state[key][keep][:, keep_in]), key
    # Training goes on, and the pruned layer's rows follow the reference from the sliced state.
    reference = RowReference(name, layer.weight)
    reference.count = [int(c) for c in state["row_step"]]
    first_state = next(state[key] for key in ("exp_avg", "momentum_buffer", "sum") if key in state)
    reference.a = first_state.double().clone()
    reference.b = state["exp_avg_sq"].double().clone() if "exp_avg_sq" in state else reference.b
    assert torch.equal(layer.weight.detach(), old_weight[keep][:, keep_in])
    optimizer.zero_grad()
    model(torch.randn(4, 6)).square().sum().backward()
    grad = layer.weight.grad.coalesce()
    reference.step({r: v for r, v in zip(grad.indices()[0].tolist(), grad.values().double())})
    optimizer.step()
    assert_close(layer.weight.detach(), reference.p, torch.float32)


def test_bad_input_errors():
    param = nn.Parameter(torch.randn(4, 3))
    optimizer = RowAdam([param])
    param.grad = row_sparse(torch.tensor([[0], [1]]), torch.randn(1), (4, 3), device="cpu")
    with pytest.raises(ValueError, match="one sparse dimension"):
        optimizer.step()
    param.grad = row_sparse(
        torch.tensor([[4]]), torch.randn(1, 3), (4, 3), check_invariants=False, device="cpu"
    )
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        optimizer.step()
    param.grad = torch.randn(4, 3).to_sparse(1)
    optimizer.step()
    param.data = torch.randn(5, 3)  # resized without slicing the optimizer's state
    param.grad = torch.randn(5, 3).to_sparse(1)
    with pytest.raises(ValueError, match="'exp_avg' has shape"):
        optimizer.step()
    for cls, kwargs, match in (
        (RowAdam, dict(lr=-1.0), "lr"),
        (RowAdam, dict(betas=(0.9, 1.0)), "betas"),
        (RowSGD, dict(momentum=-0.1), "momentum"),
        (RowSGD, dict(nesterov=True), "nesterov"),
        (RowAdagrad, dict(eps=-1.0), "eps"),
    ):
        with pytest.raises(ValueError, match=match):
            cls([nn.Parameter(torch.randn(2))], **kwargs)


def test_autotuning_copies_every_tensor_updated_in_place():
    """Tuning trials run the kernel many times: they must run on copies of what it updates."""
    from triton_mebp.kernels import optim_rows

    for kernel in (optim_rows.row_sgd, optim_rows.row_adagrad, optim_rows.row_adam):
        written = {n for n in kernel.fn.arg_names if n.endswith("_ptr")} - {"idx_ptr", "g_ptr"}
        assert set(kernel.in_place) == written, kernel.fn.__name__


def _signature(dtype, names):
    kinds = {"p_ptr": f"*{dtype}", "idx_ptr": "*i64", "g_ptr": f"*{dtype}", "step_ptr": "*fp32"}
    return {
        n: kinds.get(
            n,
            f"*{dtype}"
            if n.endswith("_ptr")
            else "i32"
            if n in ("K", "M") or n.startswith("stride")
            else "fp32",
        )
        for n in names
    }


def test_kernels_compile_ahead_of_time():
    from triton_mebp.kernels import optim_rows

    specs = []
    for dtype, attr, constexprs in (
        ("bf16", "row_sgd", {"MOMENTUM": True, "NESTEROV": True}),
        ("fp32", "row_sgd", {"MOMENTUM": False, "NESTEROV": False}),
        ("bf16", "row_adagrad", {}),
        ("fp32", "row_adagrad", {}),
        ("bf16", "row_adam", {"DECOUPLED": True}),
        ("fp32", "row_adam", {"DECOUPLED": False}),
    ):
        kernel = getattr(optim_rows, attr)
        names = [
            n
            for n in kernel.fn.arg_names
            if n not in constexprs and n not in ("BLOCK_K", "BLOCK_M")
        ]
        specs.append(
            {
                "kernel": f"triton_mebp.kernels.optim_rows:{attr}",
                "label": dtype,
                "signature": _signature(dtype, names),
                "constexprs": constexprs,
            }
        )
    results = compile_specs(specs)
    check_results(results)
    assert (
        len(results)
        == sum(len(getattr(optim_rows, s["kernel"].split(":")[1]).configs) for s in specs) * 2
    )


def test_in_place_kernels_tune_on_copies_and_update_once(monkeypatch):
    """With tuning on, the tuner sees copies of the in-place tensors; the real ones are updated
    once, by the chosen config, and a second launch reuses the choice without tuning."""
    from triton_mebp.kernels import _tuning, optim_rows

    kernel = optim_rows.row_sgd
    seen = []

    class FakeTuner:
        best_config = kernel.configs[-1]

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(args[0].data_ptr())
                args[0].add_(100.0)  # a trial that scribbles over what it was given

            return run

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda: True)
    monkeypatch.setattr(kernel, "tuned", FakeTuner())
    monkeypatch.setattr(kernel, "chosen", {})
    param = torch.randn(6, 5, device=DEVICE)
    before = param.clone()
    idx = torch.tensor([1, 4], device=DEVICE)
    grad = torch.randn(2, 5, device=DEVICE)
    step = torch.zeros(6, device=DEVICE)
    optim_rows.row_sgd_step(
        param,
        idx,
        grad,
        step,
        None,
        lr=0.5,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
    )
    assert len(seen) == 1 and seen[0] != param.data_ptr()
    expected = before.clone()
    expected[idx] -= 0.5 * grad
    torch.testing.assert_close(param, expected)
    assert kernel.last_config is FakeTuner.best_config
    optim_rows.row_sgd_step(
        param,
        idx,
        grad,
        step,
        None,
        lr=0.5,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
    )
    assert len(seen) == 1  # the key's config is remembered
