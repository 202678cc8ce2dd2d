"""The command line: a miniature demo, train on digits and on MNIST IDX files, errors, pass-through."""

import argparse
import csv
import json
import sys
import types

import matplotlib.image
import pytest

import triton_mebp
from test_data import make_mnist
from triton_mebp.app import cli
from triton_mebp.app.train import demo_configs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "text,expected", [("25", 25), ("0.05", 0.05), ("5%", 0.05), ("1.0", 1.0), ("100%", 1.0)]
)
def test_parse_k(text, expected):
    value = cli.parse_k(text)
    assert value == pytest.approx(expected) and type(value) is type(expected)


@pytest.mark.parametrize("text", ["abc", "0", "0.0", "1.5", "-3", "150%", ""])
def test_parse_k_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="k"):
        cli.parse_k(text)


def test_version(capsys):
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out.strip() == triton_mebp.__version__


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_miniature_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(
        [
            "demo",
            "--epochs",
            "1",
            "--hidden",
            "32",
            "--batch-size",
            "40",
            "--seeds",
            "0",
            "--device",
            "cpu",
            "--benchmark-width",
            "64",
            "--benchmark-batch",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    main, sweep = demo_configs(epochs=1, hidden=32, batch_size=40)
    for config in main:
        assert config.label in printed
    assert "test acc % (mean ± std)" in printed and "speedup" in printed

    payload = json.loads((out / "results.json").read_text())
    table = payload["table"]
    assert [s["label"] for s in table] == [c.label for c in main]
    assert len(payload["k_sweep"]) == len(sweep)
    assert len(payload["layer_benchmark"]) == 1 + 2 * 6
    for s in table + payload["k_sweep"]:
        assert 0.0 <= s["test_acc_mean"] <= 100.0 and s["backward_s_mean"] > 0
        if s["config"]["mode"] == "dense":
            assert s["gap_to_dense"] == 0.0
        else:
            assert s["gap_to_dense"] is not None and s["speedup"] > 0
    # One epoch with AdaGrad on digits is far above chance (10%); Adam at 1e-3 needs longer.
    assert table[0]["label"] == "dense, adagrad" and table[0]["test_acc_mean"] > 40.0
    simplified = [s for s in table if s["config"]["simplify"]]
    assert simplified and all(max(s["widths_mean"]) < 32 for s in simplified)
    assert payload["meta"]["dataset"].startswith("digits (standardized)")  # the demo's default
    assert cli.build_parser().parse_args(["demo", "--no-standardize"]).standardize is False

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [s["label"] for s in table + payload["k_sweep"]]
    for row, s in zip(rows, table):
        assert float(row["test_acc_mean"]) == pytest.approx(s["test_acc_mean"], abs=1e-4)
    table_md = (out / "table.md").read_text()
    assert table_md.count("\n") == len(table) + 2
    for name in ("accuracy_vs_k", "backward_vs_k", "hidden_width", "loss_curves"):
        check_png(out / f"{name}.png")


def test_train_mnist_from_idx_files(tmp_path, capsys):
    make_mnist(tmp_path, n_train=40, n_test=10, side=5, gz=True)
    out = tmp_path / "out"
    rc = cli.main(
        [
            "train",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--mode",
            "dense",
            "unified",
            "--k",
            "3",
            "0.5",
            "--hidden",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--optimizer",
            "sgd",
            "--sparse-grad",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mnist: 40 training and 10 test examples, 25 features" in printed
    payload = json.loads((out / "results.json").read_text())
    labels = [s["label"] for s in payload["table"]]
    assert labels == [
        "dense, sgd + row-sparse",
        "meProp unified k=3, sgd + row-sparse",
        "meProp unified k=8, sgd + row-sparse",
    ]
    check_png(out / "loss_curves.png")
    assert not (out / "hidden_width.png").exists()  # no meSimp run


def test_train_simplify_on_digits(tmp_path, capsys):
    out = tmp_path / "simp"
    rc = cli.main(
        [
            "train",
            "--mode",
            "unified",
            "--k",
            "4",
            "--hidden",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--simplify",
            "--threshold",
            "0.2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    payload = json.loads((out / "results.json").read_text())
    (summary,) = payload["table"]
    assert summary["config"]["simplify"] and summary["config"]["threshold"] == 0.2
    assert 4 <= min(summary["widths_mean"]) and max(summary["widths_mean"]) < 32
    check_png(out / "hidden_width.png")


def test_missing_mnist_says_what_and_where(tmp_path, capsys):
    rc = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err
    rc = cli.main(["train", "--dataset", "mnist", "--no-progress"])
    assert rc == 2 and "--data-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--k", "zero"], "k must be"),
        (["train", "--mode", "sparse"], "invalid choice"),
        (["train", "--optimizer", "rmsprop"], "invalid choice"),
        (["train", "--epochs", "0"], "positive int"),
    ],
)
def test_bad_options_are_rejected(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_invalid_settings_give_clear_errors(capsys):
    assert cli.main(["train", "--mode", "dense", "--simplify", "--epochs", "1"]) == 2
    assert "--simplify needs --mode unified or per_example" in capsys.readouterr().err
    assert cli.main(["train", "--mode", "unified", "--k", "600", "--hidden", "500"]) == 2
    assert "outside [1, 500]" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sweep", "plot"])
def test_sweep_and_plot_pass_their_arguments_through(command, monkeypatch):
    seen = {}
    fake = types.ModuleType(f"triton_mebp.bench.{command}")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, f"triton_mebp.bench.{command}", fake)
    assert cli.main([command, "--quick", "--out", "x.csv", "-h"]) == 0
    assert seen["argv"] == ["--quick", "--out", "x.csv", "-h"]


def test_pos_task_is_handed_its_options(monkeypatch, tmp_path, capsys):
    seen = {}
    fake = types.ModuleType("triton_mebp.app.pos")

    def run_pos_task(train_path, dev_path, test_path=None, **options):
        seen.update(train=train_path, dev=dev_path, test=test_path, **options)
        return {"models": {"meprop": {"dev_accuracy": 50.0, "epochs": []}}, "backward_speedup": 2.0}

    fake.run_pos_task = run_pos_task
    monkeypatch.setitem(sys.modules, "triton_mebp.app.pos", fake)
    rc = cli.main(
        [
            "train",
            "--task",
            "pos",
            "--train",
            "a.txt",
            "--dev",
            "b.txt",
            "--mode",
            "per_example",
            "--k",
            "5",
            "--optimizer",
            "adam",
            "--epochs",
            "2",
            "--seeds",
            "1",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert seen["train"] == "a.txt" and seen["dev"] == "b.txt" and seen["test"] is None
    assert seen["mode"] == "per_example" and seen["k"] == 5 and seen["optimizer"] == "adam"
    assert seen["seeds"] == (1, 2) and seen["epochs"] == 2 and seen["device"] == "cpu"
    assert seen["hidden"] == 500 and seen["embedding_dim"] == 100 and seen["progress"] is False
    printed = capsys.readouterr().out
    assert "meprop: dev_accuracy 50" in printed and "2.00×" in printed
    assert cli.main(["train", "--task", "pos", "--train", "a.txt"]) == 2
    assert "--dev" in capsys.readouterr().err
