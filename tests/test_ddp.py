"""meProp and meSimp under DistributedDataParallel: gloo on loopback, 2 and 3 CPU processes
started by the tests themselves. Each run of ranks is compared with one process training on the
concatenated batches (the reference the distributed path must equal)."""

import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import triton_mebp as mebp
from triton_mebp.distributed import DistributedBackwardError

BATCH = 4  # examples per rank and step
STEPS = 3
K = 4
# (mode, grad, optimizer) of the equivalence runs
CONFIGS = [
    ("unified", "dense", "sgd"),
    ("unified", "sparse", "sgd"),
    ("unified", "dense", "rowadam"),
    ("unified", "sparse", "rowadam"),
    ("per_example", "dense", "sgd"),
    ("per_example", "sparse", "rowadam"),
]

AMP_CONFIGS = [("unified", "sparse", "sgd"), ("per_example", "dense", "sgd")]


def _mlp(widths=(8, 32, 16, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def _model(mode, grad, seed=0):
    model = mebp.convert(_mlp(seed=seed), k=K, mode=mode, grad=grad)
    if mode == "per_example":
        model[2].k = 16  # every row selected: the union is the whole gradient (dense fallback)
    return model


def _twice(seed=0):
    torch.manual_seed(seed)
    hidden = mebp.MeLinear(32, 32, k=K)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), hidden, nn.ReLU(), hidden, nn.ReLU(), nn.Linear(32, 3)
    )


def _optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    return mebp.RowAdam(params, lr=1e-2)


def _batch(step, rank, n_in=8, classes=3):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return (
        torch.randn(BATCH, n_in, generator=generator),
        torch.randint(0, classes, (BATCH,), generator=generator),
    )


def _concatenated(step, world, **kwargs):
    parts = [_batch(step, rank, **kwargs) for rank in range(world)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _train(model, optimizer, batches, autocast=False):
    for x, y in batches:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        optimizer.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# --- what each rank runs -------------------------------------------------------------------------


def _equivalence(rank, world):
    results = {}
    for mode, grad, opt_name in CONFIGS:
        model = _model(mode, grad, seed=rank)  # rank 0's weights must win (DDP's broadcast)
        ddp = mebp.DistributedDataParallel(model)
        optimizer = _optimizer(opt_name, ddp.parameters())
        _train(ddp, optimizer, [_batch(step, rank) for step in range(STEPS)])
        results[(mode, grad, opt_name)] = dict(
            params=_params(model), stats=ddp.comm_stats.as_dict()
        )
        ddp.release()
    # Under bf16 autocast with float32 weights: bf16 products, float32 rows all-reduced.
    for mode, grad, opt_name in AMP_CONFIGS:
        model = _model(mode, grad, seed=rank)
        ddp = mebp.DistributedDataParallel(model)
        optimizer = _optimizer(opt_name, ddp.parameters())
        _train(ddp, optimizer, [_batch(step, rank) for step in range(STEPS)], autocast=True)
        dtypes = {p.grad.dtype for p in model.parameters()}
        results[("amp", mode, grad, opt_name)] = dict(params=_params(model), dtypes=dtypes)
        ddp.release()
    # After release() the model is a plain model again: torch's DDP would reduce every weight.
    try:
        ddp(_batch(0, rank)[0])
    except RuntimeError as error:
        results["released"] = dict(
            error=str(error),
            ignore_list=hasattr(model, "_ddp_params_and_buffers_to_ignore"),
            marked=any(
                hasattr(t, "_ddp_ignored") for t in list(model.parameters()) + list(model.buffers())
            ),
        )
    # One MeLinear called twice in the forward: each call reduces its own share of the gradient.
    model = _twice(seed=rank)
    ddp = mebp.DistributedDataParallel(model)
    _train(ddp, _optimizer("sgd", ddp.parameters()), [_batch(step, rank) for step in range(STEPS)])
    results["twice"] = dict(params=_params(model))
    ddp.release()
    # Gradient accumulation: DDP skips its buckets under no_sync, the meProp layers still reduce.
    model = _model("unified", "sparse", seed=rank)
    ddp = mebp.DistributedDataParallel(model)
    optimizer = _optimizer("sgd", ddp.parameters())
    for step in range(2):
        optimizer.zero_grad()
        (x0, y0), (x1, y1) = _batch(2 * step, rank), _batch(2 * step + 1, rank)
        with ddp.no_sync():
            F.cross_entropy(ddp(x0), y0).backward()
        F.cross_entropy(ddp(x1), y1).backward()
        optimizer.step()
    results["no_sync"] = dict(params=_params(model))
    ddp.release()
    # torch's own DDP on a converted model with dense gradients: ranks select locally, DDP
    # all-reduces every weight gradient whole; the ranks stay identical.
    model = _model("unified", "dense")
    ddp = nn.parallel.DistributedDataParallel(model)
    _train(ddp, _optimizer("sgd", ddp.parameters()), [_batch(step, rank) for step in range(STEPS)])
    results["torch-ddp"] = dict(params=_params(model))
    return results


def _simplify(rank, world, checkpoint):
    model = mebp.convert(_mlp(widths=(8, 32, 32, 3)), k=K, mode="per_example", grad="sparse")
    ddp = mebp.DistributedDataParallel(model)
    optimizer = mebp.RowAdam(ddp.parameters(), lr=1e-2)
    simp = mebp.DistributedSimplifier(ddp, threshold=0.25, optimizer=optimizer)
    _train(ddp, optimizer, [_batch(step, rank) for step in range(STEPS)])
    report = dict(simp.prune())
    _train(ddp, optimizer, [_batch(step, rank) for step in range(STEPS, STEPS + 2)])
    if rank == 0:
        mebp.save_simplified(model, checkpoint)
    return dict(
        report=report,
        params=_params(model),
        row_steps=[
            optimizer.state[p]["row_step"].clone() for p in (model[0].weight, model[2].weight)
        ],
    )


def _resume(rank, world, checkpoint):
    model = mebp.load_simplified(mebp.convert(_mlp(widths=(8, 32, 32, 3)), k=K), checkpoint)
    ddp = mebp.DistributedDataParallel(model)
    optimizer = mebp.RowAdam(ddp.parameters(), lr=1e-2)
    _train(ddp, optimizer, [_batch(0, rank)])
    return dict(params=_params(model))


class _FailOn(torch.autograd.Function):
    """Identity whose backward raises on one rank (a bad batch found only there)."""

    @staticmethod
    def forward(ctx, x, fail):
        ctx.fail = fail
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.fail:
            raise ValueError("bad batch on this rank")
        return grad, None


class _Fail(nn.Module):
    def __init__(self, fail):
        super().__init__()
        self.fail = fail

    def forward(self, x):
        return _FailOn.apply(x, self.fail)


def _failure(rank, world, how):
    ddp = mebp.DistributedDataParallel(_model("unified", "dense"), timeout=3)
    if how == "k":
        ddp.module[0].k = K + rank  # misconfigured: the ranks disagree on k
        x, y = _batch(0, rank)
        result = dict(error=None, tensor_parallel=None)
        try:
            F.cross_entropy(ddp(x), y).backward()
        except DistributedBackwardError as error:
            result["error"] = str(error)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        model = _model("unified", "dense")
        parallelize_module(model, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel()})
        try:
            model(x)
        except TypeError as error:
            result["tensor_parallel"] = str(error)
        return result
    x, y = _batch(0, rank)
    if how == "below":
        # Rank 1 fails after the meProp layers' backward, before the first (dense) layer's:
        # rank 0 then waits in DDP's own all-reduce of the dense gradients.
        torch.manual_seed(0)
        ddp = mebp.DistributedDataParallel(
            nn.Sequential(nn.Linear(8, 8), _Fail(rank == 1), *_model("unified", "dense")), timeout=3
        )
    start = time.perf_counter()
    try:
        out = ddp(x)
        F.cross_entropy(out if how == "below" else _FailOn.apply(out, rank == 1), y).backward()
    except Exception as error:  # noqa: BLE001
        result = dict(error=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - start)
    else:
        result = dict(error=None, seconds=time.perf_counter() - start)
    if rank == 1 and how in ("stays", "below"):
        time.sleep(8)  # alive without taking part: only a timeout can end rank 0's wait
    return result


SCENARIOS = {
    "equivalence": _equivalence,
    "simplify": _simplify,
    "resume": _resume,
    "failure": _failure,
}


def _worker(rank, world, init_file, out_dir, scenario, args):
    os.environ.pop("TRITON_INTERPRET", None)  # the PyTorch backend runs on CPU tensors
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = SCENARIOS[scenario](rank, world, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # skip the process group's teardown: a failed rank may leave work pending


def _launch(world, scenario, *args, timeout=60):
    """Runs ``scenario`` on ``world`` processes; each rank's result (None if it wrote none)."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _worker,
            args=(world, os.path.join(tmp, "init"), tmp, scenario, args),
            nprocs=world,
            join=False,
            start_method="fork",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{scenario} on {world} ranks ran past {timeout} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        return [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def equivalence_runs(request):
    return request.param, _launch(request.param, "equivalence")


def _single_process(world, mode, grad, opt_name, steps=STEPS, autocast=False):
    model = _model(mode, grad, seed=0)
    optimizer = _optimizer(opt_name, model.parameters())
    _train(model, optimizer, [_concatenated(step, world) for step in range(steps)], autocast)
    return _params(model)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c))
def test_ranks_equal_one_process_on_the_concatenated_batch(equivalence_runs, config):
    world, results = equivalence_runs
    ranks = [r[config]["params"] for r in results]
    for other in ranks[1:]:
        for a, b in zip(ranks[0], other):
            assert torch.equal(a, b)
    start = _params(_model(config[0], config[1], seed=0))
    for got, expected, initial in zip(ranks[0], _single_process(world, *config), start):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert not torch.equal(got, initial)


@pytest.mark.parametrize("config", AMP_CONFIGS, ids=lambda c: "-".join(c))
def test_ranks_under_autocast_equal_one_process(equivalence_runs, config):
    """bf16 autocast, float32 weights: the distributed backward takes bf16 operands and returns
    float32 gradients; the ranks agree with each other exactly and with one process up to bf16
    rounding (of the forward and of db, which differ with the batch's split)."""
    world, results = equivalence_runs
    ranks = [r[("amp", *config)] for r in results]
    assert all(r["dtypes"] == {torch.float32} for r in ranks)
    for other in ranks[1:]:
        for a, b in zip(ranks[0]["params"], other["params"]):
            assert torch.equal(a, b)
    start = _params(_model(config[0], config[1], seed=0))
    expected = _single_process(world, *config, autocast=True)
    for got, want, initial in zip(ranks[0]["params"], expected, start):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)
        assert not torch.equal(got, initial)


def test_release_ends_the_wrapper(equivalence_runs):
    world, results = equivalence_runs
    released = results[0]["released"]
    assert "released" in released["error"]
    assert not released["ignore_list"] and not released["marked"]


def test_torch_ddp_with_dense_gradients_keeps_ranks_identical(equivalence_runs):
    world, results = equivalence_runs
    for other in results[1:]:
        for a, b in zip(results[0]["torch-ddp"]["params"], other["torch-ddp"]["params"]):
            assert torch.equal(a, b)
    start = _params(_model("unified", "dense"))
    assert all(not torch.equal(p, s) for p, s in zip(results[0]["torch-ddp"]["params"], start))


def test_a_layer_called_twice(equivalence_runs):
    world, results = equivalence_runs
    model = _twice(seed=0)
    _train(
        model,
        _optimizer("sgd", model.parameters()),
        [_concatenated(step, world) for step in range(STEPS)],
    )
    for other in results[1:]:
        for a, b in zip(results[0]["twice"]["params"], other["twice"]["params"]):
            assert torch.equal(a, b)
    for got, expected in zip(results[0]["twice"]["params"], _params(model)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_under_no_sync(equivalence_runs):
    world, results = equivalence_runs
    model = _model("unified", "sparse", seed=0)
    optimizer = _optimizer("sgd", model.parameters())
    for step in range(2):
        optimizer.zero_grad()
        for micro in (2 * step, 2 * step + 1):
            x, y = _concatenated(micro, world)
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for other in results[1:]:
        for a, b in zip(results[0]["no_sync"]["params"], other["no_sync"]["params"]):
            assert torch.equal(a, b)
    for got, expected in zip(results[0]["no_sync"]["params"], _params(model)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_only_the_selected_rows_travel(equivalence_runs):
    world, results = equivalence_runs
    stats = results[0][("unified", "sparse", "sgd")]["stats"]
    for name, (n_in, n_out) in {"0": (8, 32), "2": (32, 16)}.items():
        rows = STEPS * K * n_in * 4
        scores = STEPS * n_out * 8  # the column scores travel as float64
        assert rows + scores <= stats["layer_bytes"][name] <= rows + scores + STEPS * 64
        assert stats["layer_bytes"][name] < STEPS * n_out * n_in * 4 or n_in < 16
    dense_params = 32 + 16 + (3 * 16 + 3)  # the biases and the dense output layer
    assert stats["ddp_bytes"] == STEPS * dense_params * 4
    assert stats["mebp_bytes"] == sum(stats["layer_bytes"].values())


def test_per_example_counts_union_and_dense_exchanges(equivalence_runs):
    world, results = equivalence_runs
    stats = results[0][("per_example", "dense", "sgd")]["stats"]
    # layer 0 (k=4 of 32) exchanged the union of the rows; layer 2 (k=16 of 16) every row
    assert stats["per_example_union"] == STEPS
    assert stats["per_example_dense"] == STEPS
    union_bytes = stats["layer_bytes"]["0"] - STEPS * (32 + 5) * 8
    assert 0 < union_bytes < STEPS * 32 * 8 * 4


def test_mesimp_prunes_in_step_and_checkpoints_load_on_any_world_size():
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "small.pt")
        results = _launch(2, "simplify", checkpoint)
        # The same neurons, weights and optimizer state on both ranks...
        assert results[0]["report"] == results[1]["report"]
        for key in ("params", "row_steps"):
            for a, b in zip(results[0][key], results[1][key]):
                assert torch.equal(a, b)
        # ...and those of one process pruning after training on the concatenated batches.
        model = mebp.convert(_mlp(widths=(8, 32, 32, 3)), k=K, mode="per_example", grad="sparse")
        optimizer = mebp.RowAdam(model.parameters(), lr=1e-2)
        simp = mebp.Simplifier(model, threshold=0.25, optimizer=optimizer)
        _train(model, optimizer, [_concatenated(step, 2) for step in range(STEPS)])
        assert dict(simp.prune()) == results[0]["report"]
        assert any(new < old for old, new in results[0]["report"].values())
        _train(model, optimizer, [_concatenated(step, 2) for step in range(STEPS, STEPS + 2)])
        for got, expected in zip(results[0]["params"], _params(model)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        # The checkpoint of rank 0 loads in one process and in three.
        single = mebp.load_simplified(mebp.convert(_mlp(widths=(8, 32, 32, 3)), k=K), checkpoint)
        for got, expected in zip(_params(single), results[0]["params"]):
            assert torch.equal(got, expected)
        three = _launch(3, "resume", checkpoint)
    for r in three[1:]:
        for a, b in zip(three[0]["params"], r["params"]):
            assert torch.equal(a, b)
    assert [tuple(p.shape) for p in three[0]["params"]] == [
        tuple(p.shape) for p in results[0]["params"]
    ]


def test_ranks_that_disagree_on_k_and_tensor_parallel_layers_fail_clearly():
    results = _launch(2, "failure", "k")
    for result in results:
        assert "disagree on k" in result["error"]
        assert "does not support tensor parallelism" in result["tensor_parallel"]


@pytest.mark.parametrize("how", ["stays", "exits", "below"])
def test_a_rank_failing_in_backward_fails_the_others_within_the_timeout(how):
    results = _launch(2, "failure", how, timeout=40)
    assert "bad batch on this rank" in results[1]["error"]
    assert "DistributedBackwardError" in results[0]["error"]
    assert "another rank did not take part" in results[0]["error"]
    assert results[0]["seconds"] < 3 + 10  # the 3 s timeout, with slack for a busy machine


def test_plain_modules_and_bad_arguments():
    with pytest.raises(RuntimeError, match="process group"):
        mebp.DistributedDataParallel(_model("unified", "dense"))
    model = _model("unified", "dense")
    tied = nn.ModuleDict(dict(mlp=model, embedding=nn.Embedding(32, 8)))
    tied.embedding.weight = model[0].weight
    with pytest.raises(ValueError, match="is also embedding.weight"):
        mebp.distributed._me_layers(tied)
    assert [name for name, _ in mebp.distributed._me_layers(model)] == ["0", "2"]
    attention = mebp.MeMultiheadAttention.from_mha(nn.MultiheadAttention(8, 2), grad="sparse")
    with pytest.raises(ValueError, match="MeMultiheadAttention 'attention' has grad='sparse'"):
        mebp.DistributedDataParallel(nn.ModuleDict(dict(attention=attention)))
    with pytest.raises(ValueError, match="timeout"):
        mebp.distributed._timedelta(-1)


class _SpyBackward:
    """Stands for a layer's distributed runner: records its calls, does dense back propagation."""

    def __init__(self):
        self.calls = 0

    def backward(self, dy, x, weight, ctx):
        self.calls += 1
        return dy @ weight, dy.t() @ x, dy.sum(0)


def test_layers_with_collectives_stay_out_of_compiled_graphs():
    # A traced backward (AOTAutograd) sees fake tensors, not the registered weight: the layer must
    # run its backward eagerly, or its collectives would be skipped and the ranks drift apart.
    layer = mebp.MeLinear(8, 16, k=4)
    spy = _SpyBackward()
    mebp.functional.distributed_backward[layer.weight] = spy
    setattr(layer.weight, mebp.functional.DISTRIBUTED_MARK, True)
    compiled = torch.compile(nn.Sequential(layer, nn.ReLU(), nn.Linear(16, 3)), backend="aot_eager")
    x = torch.randn(5, 8)
    compiled(x).sum().backward()
    assert spy.calls == 1
    expected = torch.autograd.grad(
        F.relu(F.linear(x, layer.weight, layer.bias)) @ compiled._orig_mod[2].weight.t(),
        layer.weight,
        torch.ones(5, 3),
    )[0]
    torch.testing.assert_close(layer.weight.grad, expected)
