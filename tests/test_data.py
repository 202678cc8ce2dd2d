"""Dataset loaders: the MNIST IDX reader (on small IDX files written here) and the digits split."""

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from triton_mebp.app import data

IMAGE_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
LABEL_FILES = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.asarray(array, dtype=dtype).tobytes()


def write(path, payload: bytes):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist(folder, n_train=12, n_test=5, side=4, gz=False, names=None, rng=None):
    """Writes the four MNIST files; returns the arrays written."""
    rng = rng or np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    names = names or data.MNIST_FILES
    for key, array in arrays.items():
        write(folder / (names[key] + (".gz" if gz else "")), idx_bytes(array))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_what_was_written(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    ds = data.load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.n_classes == 10 and ds.n_features == 16
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        expected = torch.tensor(images.reshape(len(images), -1).astype(np.float64) / 255.0)
        torch.testing.assert_close(x.double(), expected, atol=1e-7, rtol=0)
        assert y.tolist() == labels.tolist()


def test_load_mnist_accepts_dotted_names(tmp_path):
    dotted = {key: name.replace("-idx", ".idx") for key, name in data.MNIST_FILES.items()}
    arrays = make_mnist(tmp_path, names=dotted)
    ds = data.load_mnist(str(tmp_path))
    assert ds.y_test.tolist() == arrays["test_labels"].tolist()


def test_missing_file_names_what_was_expected_where(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        data.load_mnist(tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message and str(tmp_path) in message and ".gz" in message


def test_missing_folder_and_no_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--data-dir"):
        data.load_mnist(None)


def test_wrong_magic(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))
    with pytest.raises(ValueError, match="not an IDX file.*magic"):
        data.load_mnist(tmp_path)


def test_truncated_file(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*bytes"):
        data.load_mnist(tmp_path)


def test_count_mismatch_and_swapped_files(tmp_path):
    arrays = make_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(arrays["train_labels"][:-1]))
    with pytest.raises(ValueError, match="12 images but .* 11 labels"):
        data.load_mnist(tmp_path)
    make_mnist(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(arrays["train_labels"]))
    with pytest.raises(ValueError, match="0x00000803"):
        data.load_mnist(tmp_path)


def test_labels_out_of_range(tmp_path):
    make_mnist(tmp_path)
    write(
        tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.array([1, 2, 12, 3, 4], dtype=np.uint8))
    )
    with pytest.raises(ValueError, match="0..9"):
        data.load_mnist(tmp_path)


def test_bad_gzip(tmp_path):
    make_mnist(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        data.load_mnist(tmp_path)


@pytest.mark.parametrize("type_code", [0x0C, 0x0D])
def test_read_idx_big_endian_types(tmp_path, type_code):
    array = np.arange(-6, 6).reshape(3, 4) * 1000
    path = tmp_path / "values.idx"
    write(path, idx_bytes(array, type_code))
    assert np.array_equal(data.read_idx(path).astype(np.int64), array)


def test_digits_split_is_fixed_and_covers_the_dataset():
    from sklearn.datasets import load_digits

    first, second = data.load_digits(), data.load_digits()
    assert torch.equal(first.x_test, second.x_test) and torch.equal(first.y_train, second.y_train)
    x, y = load_digits(return_X_y=True)
    assert len(first.y_train) + len(first.y_test) == len(y)
    assert len(first.y_test) == math.ceil(0.2 * len(y))
    assert first.x_train.min() >= 0 and first.x_train.max() <= 1
    # Every example lands in exactly one split, scaled by 1/16.
    joined = torch.cat([first.x_train, first.x_test]).double() * 16
    rows = sorted(map(tuple, joined.round().long().tolist()))
    assert rows == sorted(map(tuple, x.astype(np.int64).tolist()))
    # Stratified: every class is in the test set, in proportion.
    counts = torch.bincount(first.y_test, minlength=10)
    assert counts.min() >= 30


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match="digits"):
        data.load_dataset("cifar")


def test_standardized_uses_training_statistics_only():
    from triton_mebp.app.data import Dataset

    x_train = torch.tensor([[0.0, 1.0, 5.0], [2.0, 1.0, 7.0], [4.0, 1.0, 9.0]])
    x_test = torch.tensor([[2.0, 3.0, 100.0]])
    data = Dataset(
        "toy",
        x_train,
        torch.zeros(3, dtype=torch.int64),
        x_test,
        torch.zeros(1, dtype=torch.int64),
        2,
    ).standardized()
    torch.testing.assert_close(data.x_train[:, 0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(data.x_train[:, 1], torch.zeros(3))  # constant: only shifted
    torch.testing.assert_close(data.x_test, torch.tensor([[0.0, 2.0, 46.5]]))
    assert torch.equal(x_train[:, 0], torch.tensor([0.0, 2.0, 4.0]))  # the input is untouched
