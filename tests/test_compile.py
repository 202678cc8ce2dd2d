"""torch.compile, custom operators and torch.export.

Compiling is slow on the CPU (Inductor takes seconds per graph), so the tests are few: most use
the ``aot_eager`` backend (Dynamo's capture with ``fullgraph=True`` and AOTAutograd's traced
backward, without code generation), one runs Inductor.
"""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import triton_mebp as mebp
from conftest import DEVICE, assert_close
from reference import separated_grad
from triton_mebp import backend, library

OPS = torch.ops.triton_mebp


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_mlp(mode="unified", grad="dense", widths=(8, 16, 12, 3), k=4, device=DEVICE):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return mebp.convert(
        nn.Sequential(*layers).to(device), k=k, mode=mode, grad=grad, count_hits=True
    )


def dense_grads(model):
    return [p.grad.to_dense() for p in model.parameters()]


def train_and_compare(eager, compiled_model, compiled, batches):
    """Runs the same steps eagerly and compiled; gradients and hit counters must agree."""
    for x in batches:
        for model, run in ((eager, eager), (compiled_model, compiled)):
            model.zero_grad(set_to_none=True)
            run(x).square().sum().backward()
        for expected, actual in zip(dense_grads(eager), dense_grads(compiled_model)):
            assert_close(actual, expected, torch.float32)
        for a, b in zip(eager.modules(), compiled_model.modules()):
            if isinstance(a, mebp.MeLinear):
                assert torch.equal(a.hits, b.hits) and torch.equal(a.refs, b.refs)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("grad", ["dense", "sparse"])
def test_compiled_training_matches_eager(mode, grad):
    eager = make_mlp(mode, grad)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter)
    batches = [torch.randn(5, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)]
    train_and_compare(eager, compiled_model, compiled, batches)
    assert eager[0].hits.sum() > 0 and counter.frame_count == 1
    if grad == "sparse":
        assert compiled_model[0].weight.grad.is_sparse
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        assert_close(compiled(batches[0]), eager(batches[0]), torch.float32)


@pytest.mark.parametrize("grad", ["dense", "sparse"])
def test_compiled_per_example_with_dense_products_matches_eager(monkeypatch, grad):
    """MeLinear(auto=True) in per-example mode where the cost model picks the masked-dense
    products: one graph, the same gradients and hit counts as eager."""
    import triton_mebp.estimate as estimate

    monkeypatch.setattr(estimate, "masked_dense_is_faster", lambda *a, **kw: True)
    eager = make_mlp("per_example", grad)
    for m in eager.modules():
        if isinstance(m, mebp.MeLinear):
            m.auto = True
    batches = [torch.randn(5, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)]
    eager(batches[0])  # the decisions made before compiling (a new one would recompile)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter)
    train_and_compare(eager, compiled_model, compiled, batches)
    assert counter.frame_count == 1 and eager[0].hits.sum() > 0
    assert [d[1] for d in compiled_model[0]._auto_decisions.values()] == [True]


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_compiled_training_under_autocast_matches_eager(mode):
    """float32 master weights, bf16 autocast: the compiled backward (the ``linear`` operator's)
    runs the same bf16 products as the eager one (float32 products would differ by ~1e-3) and
    returns float32 weight gradients."""
    eager = make_mlp(mode, "dense")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")

    def autocast(model):
        def run(x):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                return model(x)

        return run

    batches = [torch.randn(5, 8, device=DEVICE)]
    for model, run in ((eager, autocast(eager)), (compiled_model, autocast(compiled))):
        model.zero_grad(set_to_none=True)
        y = run(batches[0])
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
    for expected, actual in zip(dense_grads(eager), dense_grads(compiled_model)):
        assert actual.dtype == torch.float32
        assert_close(actual, expected, torch.float32)  # the same bf16 products


def test_inductor_compiles_a_training_step():
    eager = make_mlp("unified", "dense")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    train_and_compare(eager, compiled_model, compiled, [torch.randn(6, 8, device=DEVICE)])


def op_samples():
    """(operator, args) with small inputs for every meProp operator."""
    B, M, N, k = 5, 7, 11, 3
    dy, x, w = separated_grad(B, N, "unified"), torch.randn(B, M), torch.randn(N, M)
    idx = torch.tensor([1, 4, 9])
    dy_c = dy[:, idx].contiguous()
    values, per_idx = OPS.per_example_select.default(separated_grad(B, N, "per_example"), k)
    hits = torch.zeros(N, dtype=torch.int64)
    rows = torch.randn(k, M)
    from triton_mebp.kernels import fused_mlp

    w2 = torch.randn(4, N)
    packed = fused_mlp.pack_layers([w2], [torch.randn(4)], fused_mlp.fused_width([N, 4]))
    return [
        (OPS.unified_select.default, (dy, k)),
        (OPS.unified_select.default, (dy, k, hits.clone())),
        (OPS.unified_select_and_bias.default, (dy, k)),
        (OPS.unified_select_and_bias.default, (dy, k, hits.clone())),
        (OPS.per_example_select.default, (dy, k, hits.clone())),
        (OPS.count_examples.default, (torch.zeros((), dtype=torch.int64), dy)),
        (OPS.gathered_input_grad.default, (dy_c, w, idx)),
        (OPS.gathered_weight_grad.default, (dy_c, x, idx)),
        (OPS.gathered_weight_grad_dense.default, (dy_c, x, idx, w)),
        (OPS.per_example_input_grad.default, (values, per_idx, w)),
        (OPS.per_example_weight_grad.default, (values, per_idx, x, N)),
        (OPS.per_example_weight_grad_dense.default, (values, per_idx, x, N)),
        # Autocast's mixed operands: fp16 dy_c/values, float32 x and W, float32 dW.
        (OPS.gathered_input_grad.default, (dy_c.half(), w, idx)),
        (OPS.gathered_weight_grad.default, (dy_c.half(), x, idx, torch.float32)),
        (OPS.gathered_weight_grad_dense.default, (dy_c.half(), x, idx, w)),
        (OPS.per_example_input_grad.default, (values.half(), per_idx, w)),
        (OPS.per_example_weight_grad.default, (values.half(), per_idx, x, N, torch.float32)),
        (OPS.per_example_weight_grad_dense.default, (values.half(), per_idx, x, N, torch.float32)),
        (
            OPS.row_sgd_step.default,
            (w.clone(), idx, rows, torch.zeros(N), torch.zeros(N, M)),
            dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False),
        ),
        (
            OPS.row_adagrad_step.default,
            (w.clone(), idx, rows, torch.zeros(N), torch.zeros(N, M)),
            dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10),
        ),
        (
            OPS.row_adam_step.default,
            (w.clone(), idx, rows, torch.zeros(N), torch.zeros(N, M), torch.zeros(N, M)),
            dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True),
        ),
        (
            OPS.linear.default,
            (
                x.clone().requires_grad_(),
                w.clone().requires_grad_(),
                torch.randn(N, requires_grad=True),
                k,
                "unified",
                "dense",
                False,
                None,
                None,
                False,
                None,
            ),
        ),
        (
            OPS.linear.default,
            (
                x,
                w.clone().requires_grad_(),
                None,
                k,
                "per_example",
                "dense",
                True,
                None,
                None,
                False,
                None,
            ),
        ),
        (
            OPS.linear.default,
            (
                x,
                w.clone().requires_grad_(),
                torch.randn(N, requires_grad=True),
                k,
                "per_example",
                "sparse",
                False,
                None,
                None,
                True,
                None,
            ),
        ),
        (OPS.selected_rows.default, (per_idx, N)),
        (OPS.linear_act.default, (x, w, torch.randn(N), "relu")),
        (OPS.fused_mlp.default, (x, w, torch.randn(N), *packed, 4, "tanh", "identity")),
    ]


def on_device(value):
    """A sample argument on the test device (CUDA when there is one), keeping requires_grad."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().to(DEVICE).requires_grad_(value.requires_grad)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_opcheck_every_operator(backend_name):
    before = mebp.get_backend()
    mebp.set_backend(backend_name)
    try:
        checked = set()
        for op, args, *kwargs in op_samples():
            torch.library.opcheck(op, tuple(map(on_device, args)), *kwargs)
            checked.add(op._schema.name)
    finally:
        mebp.set_backend(before)
    defined = {
        name for name in torch._C._dispatch_get_all_op_names() if name.startswith("triton_mebp::")
    }
    assert checked == defined
    assert {f"triton_mebp::{name}" for name in backend.OPERATIONS} <= defined  # the whole contract


def test_batch_sizes_share_one_dynamic_graph():
    eager = make_mlp("per_example", "sparse")
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend=counter)
    batches = [torch.randn(b, 8, device=DEVICE) for b in (3, 6, 9, 4)]
    train_and_compare(eager, compiled_model, compiled, batches)
    assert counter.frame_count == 1


def test_prune_between_compiled_steps_recompiles_once():
    eager = make_mlp("unified", "dense", k=0.25)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter)
    simplifiers = [mebp.Simplifier(m, threshold=0.5) for m in (eager, compiled_model)]
    batches = [torch.randn(6, 8, device=DEVICE) for _ in range(6)]
    train_and_compare(eager, compiled_model, compiled, batches[:3])
    reports = [s.prune() for s in simplifiers]
    assert reports[0] == reports[1] and any(new < old for old, new in reports[0].values())
    train_and_compare(eager, compiled_model, compiled, batches[3:])
    assert counter.frame_count == 2


def test_compiled_steps_reuse_the_dense_gradient_memory():
    model = make_mlp("unified", "dense", device="cpu")  # the CPU gradient buffer
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    pointers = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        compiled(torch.randn(4, 8)).sum().backward()
        pointers.append(model[0].weight.grad.data_ptr())
        _, cached = library._dense_grad_storage[id(model[0].weight)]
        assert cached.data_ptr() == pointers[-1]  # the gradient lives in the layer's buffer
    assert len(set(pointers)) == 1


@torch._dynamo.config.patch(allow_rnn=True)  # Dynamo wraps nn.LSTM (and subclasses) only on request
def test_compiled_lstm_matches_eager():
    eager = mebp.MeLSTM(5, 4, k=3, mode="unified", device=DEVICE)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 2, 5, device=DEVICE)
    for run in (eager, compiled):
        run(x)[0].square().sum().backward()
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        assert_close(b.grad, a.grad, torch.float32)


def simplified_mlp():
    model = make_mlp("unified", "dense", k=0.25)
    simplifier = mebp.Simplifier(model, threshold=0.5)
    for _ in range(3):
        model(torch.randn(6, 8, device=DEVICE)).square().sum().backward()
    assert any(new < old for old, new in simplifier.prune().values())
    return model.eval()


def test_export_of_a_simplified_model_runs_the_same():
    model = simplified_mlp()
    x = torch.randn(5, 8, device=DEVICE)
    program = torch.export.export(model, (x,))
    assert "triton_mebp.linear.default" in {str(node.target) for node in program.graph.nodes}
    assert_close(program.module()(x), model(x), torch.float32)
    fast = mebp.optimize_for_inference(model)
    program = torch.export.export(fast, (x,))
    assert_close(program.module()(x), fast(x), torch.float32)


def test_export_of_fused_inference_kernels(triton_backend):
    model = simplified_mlp()
    x = torch.randn(5, 8, device=DEVICE)
    for fuse_mlp in (True, False):
        fast = mebp.optimize_for_inference(model, kernels=True, fuse_mlp=fuse_mlp)
        program = torch.export.export(fast, (x,))
        targets = {str(node.target) for node in program.graph.nodes}
        expected = "fused_mlp" if fuse_mlp else "linear_act"
        assert f"triton_mebp.{expected}.default" in targets
        with torch.no_grad():
            assert_close(program.module()(x), model(x), torch.float32)
