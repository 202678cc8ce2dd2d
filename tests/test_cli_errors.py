"""User errors of the command line: one line on stderr, exit status 2, before any training."""

import os

import numpy as np
import pytest

from test_data import idx_bytes, make_mnist
from triton_mebp.app import cli, train


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a run gets as far as training."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started although the arguments were bad")

    monkeypatch.setattr(train, "run_experiment", refuse)


def one_line_error(capsys, rc_or_exit, needle):
    err = capsys.readouterr().err
    assert rc_or_exit == 2, err
    assert err.count("\n") == 1 and err.startswith("mebp") and needle in err, err
    return err


def run(argv):
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_bogus_device(capsys, no_training):
    one_line_error(capsys, run(["train", "--device", "bogus", "--epochs", "1"]), "'bogus'")


def test_out_is_an_existing_file(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file")
    one_line_error(capsys, run(["train", "--epochs", "1", "--out", out]), "not a folder")
    one_line_error(
        capsys, run(["demo", "--epochs", "1", "--out", out + "/sub/deeper"]), "is a file"
    )


def test_out_in_a_folder_without_write_permission(tmp_path, capsys, no_training, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: False if str(path) == str(locked) else real_access(path, mode),
    )  # root may write anywhere
    one_line_error(
        capsys, run(["train", "--epochs", "1", "--out", str(locked / "run")]), "no permission"
    )


def test_plot_of_a_binary_file(tmp_path, capsys):
    path = tmp_path / "sweep.csv"
    path.write_bytes(bytes(range(256)) * 3)
    one_line_error(
        capsys, run(["plot", str(path), "--out", str(tmp_path / "charts")]), "not a sweep CSV"
    )


@pytest.mark.parametrize("option", ["--min-run-time", "--time-budget", "--rep-ms", "--threads"])
def test_sweep_rejects_non_positive_numbers(option, tmp_path, capsys):
    out = str(tmp_path / "sweep.csv")  # should the option pass, the sweep writes there
    one_line_error(
        capsys,
        run(
            ["sweep", option, "-1", "--out", out, "--no-lstm", "--no-ceilings", "--shapes", "1x1x1"]
        ),
        option,
    )


def test_argument_errors_are_one_line(capsys):
    one_line_error(capsys, run(["train", "--mode", "sparse"]), "invalid choice")
    one_line_error(capsys, run(["frobnicate"]), "invalid choice")


@pytest.mark.parametrize("shape", [(0, 4, 4), (3, 0, 4)], ids=["no images", "no pixels"])
def test_mnist_without_images_or_pixels(tmp_path, capsys, no_training, shape):
    make_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(shape, np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(shape[0], np.uint8)))
    one_line_error(
        capsys,
        run(
            [
                "train",
                "--dataset",
                "mnist",
                "--data-dir",
                str(tmp_path),
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "out"),
            ]
        ),
        "train-images-idx3-ubyte",
    )
