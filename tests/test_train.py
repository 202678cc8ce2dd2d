"""The training loop and experiment runner, on a tiny synthetic dataset."""

import statistics

import pytest
import torch
from torch import nn

import triton_mebp as mebp
from triton_mebp.app import train
from triton_mebp.app.data import Dataset


def blobs(n_train=240, n_test=120, n_features=12, n_classes=3, seed=0) -> Dataset:
    """Well separated Gaussian clusters: any working trainer reaches high accuracy."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, n_features, generator=g) * 3

    def draw(n):
        y = torch.randint(0, n_classes, (n,), generator=g)
        return centers[y] + 0.5 * torch.randn(n, n_features, generator=g), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset("blobs", x_train, y_train, x_test, y_test, n_classes)


SMALL = dict(hidden=40, layers=2, epochs=3, batch_size=16)


@pytest.mark.parametrize("mode", train.TRAIN_MODES)
@pytest.mark.parametrize(
    "optimizer,sparse", [("adagrad", False), ("adam", False), ("adam", True), ("sgd", True)]
)
def test_training_learns(mode, optimizer, sparse):
    ds = blobs()
    config = train.TrainConfig(mode=mode, k=0.25, optimizer=optimizer, sparse_grad=sparse, **SMALL)
    run = train.train_one(config, ds, seed=0)
    assert len(run["epochs"]) == SMALL["epochs"]
    assert run["test_acc"] > 90.0
    assert run["epochs"][-1]["train_loss"] < run["epochs"][0]["train_loss"]
    assert all(e["backward_s"] > 0 and e["epoch_s"] >= e["backward_s"] for e in run["epochs"])
    assert run["backward_s_per_epoch"] == statistics.median(e["backward_s"] for e in run["epochs"])
    assert run["widths"] == [40, 40]


def test_meprop_layers_and_optimizer_are_the_requested_ones(monkeypatch):
    ds = blobs()
    seen = {}
    original = train.make_optimizer

    def spy(name, params, lr, row_sparse, eps=None):
        seen["optimizer"] = original(name, params, lr, row_sparse, eps)
        return seen["optimizer"]

    monkeypatch.setattr(train, "make_optimizer", spy)
    config = train.TrainConfig(
        mode="per_example", k=5, optimizer="adam", sparse_grad=True, lr=0.01, eps=1e-3, **SMALL
    )
    train.train_one(config, ds, seed=0)
    from triton_mebp.optim import RowAdam

    optimizer = seen["optimizer"]
    assert isinstance(optimizer, RowAdam) and optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.param_groups[0]["eps"] == 1e-3 and config.label.endswith(
        "lr=0.01 eps=0.001 + row-sparse"
    )
    # The hidden weights got row-sparse gradients: RowAdam kept per-row step counts for them.
    row_steps = [s["row_step"] for s in optimizer.state.values() if "row_step" in s]
    assert len(row_steps) == 2
    steps_per_epoch = -(-len(ds.y_train) // SMALL["batch_size"])
    assert all(r.max() <= steps_per_epoch * SMALL["epochs"] for r in row_steps)
    assert any(r.min() < steps_per_epoch * SMALL["epochs"] for r in row_steps)


def test_same_seed_same_run_different_seed_different_run():
    ds = blobs()
    config = train.TrainConfig(mode="unified", k=0.2, optimizer="adagrad", **SMALL)
    a, b, c = (train.train_one(config, ds, seed=s) for s in (3, 3, 4))
    losses = [[e["train_loss"] for e in r["epochs"]] for r in (a, b, c)]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_simplify_shrinks_but_keeps_k_and_counts_parameters():
    ds = blobs()
    config = train.TrainConfig(
        mode="unified",
        k=4,
        optimizer="adagrad",
        simplify=True,
        threshold=0.3,
        prune_fraction=0.5,
        hidden=40,
        layers=2,
        epochs=4,
        batch_size=16,
    )
    run = train.train_one(config, ds, seed=0)
    widths = [e["widths"] for e in run["epochs"]]
    assert all(w >= 4 for ws in widths for w in ws)
    assert all(ws[i] <= prev[i] for prev, ws in zip([[40, 40]] + widths, widths) for i in range(2))
    assert sum(run["widths"]) < 80
    assert [e["pruned"] for e in run["epochs"]] == [True, True, False, False]
    assert widths[1] == widths[2] == widths[3]  # no pruning after the first half
    h1, h2 = run["widths"]
    assert run["params"] == (12 * h1 + h1) + (h1 * h2 + h2) + (h2 * 3 + 3)
    assert run["test_acc"] > 80.0


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        train.TrainConfig(mode="sparse")
    with pytest.raises(ValueError, match="optimizer"):
        train.TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="outside"):
        train.TrainConfig(mode="unified", k=600, hidden=500)
    with pytest.raises(ValueError, match="ratio"):
        train.TrainConfig(mode="unified", k=1.5)
    with pytest.raises(ValueError, match="meProp mode"):
        train.TrainConfig(mode="dense", simplify=True)
    with pytest.raises(ValueError, match="threshold"):
        train.TrainConfig(mode="unified", simplify=True, threshold=1.5)
    with pytest.raises(ValueError, match="epochs"):
        train.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        train.TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="eps"):
        train.TrainConfig(optimizer="sgd", eps=1e-3)
    # Dense mode ignores k.
    assert train.TrainConfig(mode="dense", k=10_000).k_count == 500


def test_labels_and_learning_rates():
    assert train.TrainConfig(mode="unified", k=0.05).label == "meProp unified k=25, adagrad"
    assert train.TrainConfig(optimizer="adam").learning_rate == 1e-3
    assert train.TrainConfig(optimizer="adagrad").learning_rate == 0.1
    assert train.TrainConfig(optimizer="sgd", lr=0.5).learning_rate == 0.5
    assert "meSimp per-example" in train.TrainConfig(mode="per_example", simplify=True).label


def test_build_mlp_and_widths():
    model = train.build_mlp(7, 4, hidden=9, layers=3)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7, 9), (9, 9), (9, 9), (9, 4)]
    assert train.hidden_widths(model) == [9, 9, 9]
    converted = mebp.convert(model, k=2)
    assert train.hidden_widths(converted) == [9, 9, 9]
    assert train.count_parameters(model) == 7 * 9 + 9 + 2 * (81 + 9) + 9 * 4 + 4


def test_evaluate_matches_a_manual_count():
    ds = blobs()
    model = train.build_mlp(ds.n_features, 3, 8, 1)
    acc, loss = train.evaluate(model, ds.x_test, ds.y_test, batch_size=7)
    with torch.no_grad():
        logits = model(ds.x_test)
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == ds.y_test).double().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, ds.y_test).item(), rel=1e-5)


def fake_run(label, acc, bwd, widths, seed, mode="unified", optimizer="adagrad"):
    config = train.TrainConfig(mode=mode, optimizer=optimizer, **SMALL)
    return dict(
        label=label,
        seed=seed,
        config=vars(config).copy(),
        device="cpu",
        initial_widths=[40, 40],
        test_acc=acc,
        test_loss=0.1,
        widths=widths,
        params=100 + seed,
        backward_s_per_epoch=bwd,
        epoch_s=2 * bwd,
        epochs=[],
    )


def test_summarize_and_comparisons():
    dense = train.summarize(
        "d",
        [
            fake_run("d", a, b, [40, 40], s, mode="dense")
            for s, (a, b) in enumerate([(97.0, 2.0), (98.0, 4.0), (99.0, 3.0)])
        ],
    )
    sparse = train.summarize(
        "u",
        [
            fake_run("u", a, b, w, s)
            for s, (a, b, w) in enumerate([(96.0, 1.0, [10, 20]), (97.0, 0.5, [12, 22])])
        ],
    )
    other = train.summarize("o", [fake_run("o", 90.0, 1.0, [40, 40], 0, optimizer="adam")])
    assert dense["test_acc_mean"] == pytest.approx(98.0)
    assert dense["test_acc_std"] == pytest.approx(statistics.stdev([97.0, 98.0, 99.0]))
    assert sparse["widths_mean"] == [11.0, 21.0]
    assert sparse["params_mean"] == 100.5
    train.add_comparisons([dense, sparse, other])
    assert sparse["gap_to_dense"] == pytest.approx(96.5 - 98.0)
    assert sparse["speedup"] == pytest.approx(3.0 / 0.75)
    assert dense["speedup"] == pytest.approx(1.0) and dense["gap_to_dense"] == 0.0
    assert other["gap_to_dense"] is None and other["speedup"] is None  # no Adam baseline


def test_baseline_with_the_same_learning_rate_is_preferred():
    def summary(label, acc, mode="unified", lr=None):
        run = fake_run(label, acc, 1.0, [40, 40], 0, mode=mode)
        run["config"]["lr"] = lr
        return train.summarize(label, [run])

    default, tuned = summary("d", 97.0, "dense"), summary("d2", 95.0, "dense", lr=0.5)
    same, other = summary("u", 94.0, lr=0.5), summary("u2", 96.0, lr=0.3)
    train.add_comparisons([default, tuned, same, other])
    assert same["baseline"] == "d2" and same["gap_to_dense"] == pytest.approx(-1.0)
    assert other["baseline"] == "d" and other["gap_to_dense"] == pytest.approx(-1.0)


def test_run_experiment_over_seeds():
    ds = blobs()
    configs = [
        train.TrainConfig(mode="dense", optimizer="adagrad", **SMALL),
        train.TrainConfig(mode="unified", k=0.2, optimizer="adagrad", **SMALL),
    ]
    summaries = train.run_experiment(configs, ds, seeds=[0, 1], progress=False)
    assert [s["label"] for s in summaries] == [c.label for c in configs]
    for s in summaries:
        assert s["seeds"] == [0, 1] and len(s["runs"]) == 2
        assert s["test_acc_mean"] == pytest.approx(
            statistics.fmean(r["test_acc"] for r in s["runs"])
        )
    assert summaries[1]["gap_to_dense"] == pytest.approx(
        summaries[1]["test_acc_mean"] - summaries[0]["test_acc_mean"]
    )
    with pytest.raises(ValueError, match="distinct"):
        train.run_experiment(configs + configs[:1], ds, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        train.run_experiment(configs, ds, seeds=[], progress=False)


def test_benchmark_backward_rows():
    rows = train.benchmark_backward(width=64, batch=8, ks=(0.1, 0.5), repeats=2)
    assert [(r["mode"], r["k"]) for r in rows] == [
        ("dense", 64),
        ("unified", 6),
        ("unified", 32),
        ("per_example", 6),
        ("per_example", 32),
    ]
    assert all(r["backward_s"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0
    for r in rows:
        assert r["speedup"] == pytest.approx(rows[0]["backward_s"] / r["backward_s"])


def test_demo_configs_cover_the_issue():
    main, sweep = train.demo_configs()
    settings = {(c.optimizer, c.mode, c.simplify, c.sparse_grad) for c in main}
    for optimizer in ("adagrad", "adam"):
        assert (optimizer, "dense", False, False) in settings
        for mode in ("unified", "per_example"):
            assert (optimizer, mode, False, False) in settings
        assert any(c.simplify and c.optimizer == optimizer for c in main)
    assert ("adam", "per_example", False, True) in settings  # the Adam fix, side by side
    assert all(c.hidden == 500 and c.layers == 2 and c.batch_size == 10 for c in main + sweep)
    assert {c.k_count for c in main if c.mode != "dense"} == {25}
    assert {c.learning_rate for c in main if c.optimizer == "adam" and c.eps is None} == {1e-3}
    assert [(c.mode, c.learning_rate, c.eps, c.sparse_grad) for c in main if c.eps is not None] == [
        ("per_example", 1e-2, 1e-3, True)
    ]
    assert {c.learning_rate for c in main if c.optimizer == "adagrad"} == {0.1}
    assert len({c.label for c in main + sweep}) == len(main + sweep)


def test_resolve_device():
    assert train.resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert train.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            train.resolve_device("cuda")
