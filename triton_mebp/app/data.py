"""Datasets for the training CLI: scikit-learn's bundled digits and MNIST from its IDX files.

Both loaders return a :class:`Dataset` of float32 features scaled to [0, 1] and int64 labels,
already split into a training and a test set.
"""

import dataclasses
import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "mnist")

# MNIST's standard file names; some mirrors write "train-images.idx3-ubyte" with a dot instead.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX element types: the third byte of the magic number.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.y_train)} training and {len(self.y_test)} test examples, "
            f"{self.n_features} features, {self.n_classes} classes"
        )

    def standardized(self) -> "Dataset":
        """Features shifted and scaled to zero mean and unit variance, by the training set's
        statistics (a feature constant in training is only shifted)."""
        mean = self.x_train.mean(0)
        std = self.x_train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return dataclasses.replace(
            self,
            name=f"{self.name} (standardized)",
            x_train=(self.x_train - mean) / std,
            x_test=(self.x_test - mean) / std,
        )


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn).

    The split is fixed (stratified, ``split_seed``), so every run and every model sees the same
    test set. Pixels (0..16) are scaled to [0, 1].
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn "
            "(or pip install 'triton_mebp[demo]')"
        ) from error
    x, y = sklearn_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    return Dataset(
        "digits",
        _features(x_train, 16.0),
        torch.as_tensor(y_train, dtype=torch.int64),
        _features(x_test, 16.0),
        torch.as_tensor(y_test, dtype=torch.int64),
        10,
    )


def _features(array, scale: float) -> torch.Tensor:
    array = np.asarray(array, dtype=np.float32).reshape(len(array), -1) / scale
    return torch.from_numpy(np.ascontiguousarray(array))


def read_idx(path) -> np.ndarray:
    """Reads one IDX file (big-endian, as MNIST ships it), gzipped (``.gz``) or not."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(
            f"{path}: cannot read as {'gzip' if opener is gzip.open else 'IDX'} file: {error}"
        ) from error
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes, the header needs 4)")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code not in _IDX_TYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}, expected "
            "0x000008NN: two zero bytes, a type code, the number of dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[dtype_code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} of {dtype.name} "
            f"({expected} bytes with the header) but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_mnist_file(data_dir: str, stem: str) -> str:
    names = [stem, stem.replace("-idx", ".idx")]
    candidates = [os.path.join(data_dir, name + suffix) for name in names for suffix in ("", ".gz")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"MNIST file {stem} not found in {data_dir!r}: expected one of "
        f"{', '.join(os.path.basename(c) for c in candidates)} (the standard IDX files from the "
        "MNIST distribution, gzipped or not)"
    )


def _mnist_pair(data_dir: str, images_stem: str, labels_stem: str):
    images_path = _find_mnist_file(data_dir, images_stem)
    labels_path = _find_mnist_file(data_dir, labels_stem)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected an IDX image file of uint8 with 3 dimensions "
            f"(magic 0x00000803), got {images.dtype} with shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{labels_path}: expected an IDX label file of uint8 with 1 dimension "
            f"(magic 0x00000801), got {labels.dtype} with shape {labels.shape}"
        )
    if len(images) == 0 or images.shape[1] * images.shape[2] == 0:
        raise ValueError(
            f"{images_path}: holds {len(images)} images of {images.shape[1]} x "
            f"{images.shape[2]} pixels; MNIST needs at least one image of at least "
            "one pixel"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must be digits 0..9, found {int(labels.max())}")
    return _features(images, 255.0), torch.as_tensor(labels.astype(np.int64))


def load_mnist(data_dir) -> Dataset:
    """MNIST from the four standard IDX files in ``data_dir`` (``.gz`` or not).

    Expected: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
    t10k-labels-idx1-ubyte. Images are flattened and scaled to [0, 1].
    """
    if data_dir is None:
        raise ValueError(
            "MNIST needs --data-dir: the folder holding its four IDX files ("
            + ", ".join(MNIST_FILES.values())
            + ", gzipped or not)"
        )
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"MNIST data folder {data_dir!r} does not exist (expected a folder "
            f"holding {', '.join(MNIST_FILES.values())})"
        )
    x_train, y_train = _mnist_pair(
        data_dir, MNIST_FILES["train_images"], MNIST_FILES["train_labels"]
    )
    x_test, y_test = _mnist_pair(data_dir, MNIST_FILES["test_images"], MNIST_FILES["test_labels"])
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"MNIST training images have {x_train.shape[1]} pixels but test images "
            f"have {x_test.shape[1]} in {data_dir!r}"
        )
    return Dataset("mnist", x_train, y_train, x_test, y_test, 10)


def load_dataset(name: str, data_dir=None) -> Dataset:
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist(data_dir)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
