""""Will meProp be faster for my shapes?": backward speedup predicted from the sweep data.

A cost model is fitted, by non-negative least squares on relative error, to the sweep's measured
times of one device, dtype, mode and gradient layout:

- dense backward:  ``t = c1·B·M·N + c2·N·M + c3·B·(M + N) + c0``  (two GEMMs, the weight
  gradient written, the activations read and written, fixed costs);
- meProp backward: ``t = c1·B·k·M + c2·B·N + c3·k·M + c4·B·k + c5·N·M + c0``  (the gathered GEMMs,
  one pass over ``dy`` to select, the selected rows of ``W``, per-entry work of per-example
  selection, the zero fill of a dense gradient, fixed costs); for a full training step
  (``metric="step-sgd"`` / ``"step-adam"``) also ``B·M·N``, the forward pass it holds.

The predicted speedup is the ratio of the two. Without sweep data for the device, a nominal
roofline model stands in (see ``NOMINAL``); ``estimate(...)`` says which source was used.
"""
import csv
import functools
import glob
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .functional import check_options, resolve_k

DATA_ENV = "TRITON_MEBP_SWEEP_CSV"
METRICS = ("backward", "step-sgd", "step-adam")

# Nominal device figures when no sweep data exists: dense GEMM rate (FLOP/s), memory bandwidth
# (B/s), fixed cost per backward (s), and the share of the GEMM rate the gathered products reach.
NOMINAL = {
    "cpu": dict(flops=1.0e11, bandwidth=1.0e10, overhead=5e-5, gathered_share=0.7),
    "cuda": dict(flops=6.0e14, bandwidth=3.0e12, overhead=3e-5, gathered_share=0.6),
}


# The constant comes last: where the data allow several exact fits (few shapes), the search in
# nonnegative_least_squares keeps the first, so size-proportional terms are preferred.
def _dense_features(B, M, N):
    return np.array([B * M * N, N * M, B * (M + N), 1.0], dtype=np.float64)


def _mebp_features(B, M, N, k, metric="backward"):
    step = [B * M * N] if metric != "backward" else []  # a full step holds the dense forward
    return np.array([B * k * M, B * N, k * M, B * k, N * M, *step, 1.0], dtype=np.float64)


def nonnegative_least_squares(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin ||A x - b||`` over ``x >= 0``, exactly, for the few columns used here.

    The optimum is the unconstrained solution on its own support, so trying every support and
    keeping the best non-negative one finds it (2**columns small solves).
    """
    n = A.shape[1]
    best, best_residual = np.zeros(n), float(np.sum(b ** 2))
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
            if np.any(sol < 0):
                continue
            x = np.zeros(n)
            x[cols] = sol
            residual = float(np.sum((A @ x - b) ** 2))
            if residual < best_residual * (1 - 1e-9) - 1e-300:  # ties keep the earlier support
                best, best_residual = x, residual
    return best


def _fit(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Coefficients minimising the relative error of the predicted times."""
    scale = features.max(axis=0)
    scale[scale == 0] = 1.0
    weighted = features / scale / times[:, None]
    return nonnegative_least_squares(weighted, np.ones_like(times)) / scale


@dataclass(frozen=True)
class Estimate:
    speedup: float          # dense time / meProp time
    dense_ms: float
    mebp_ms: float
    source: str             # "sweep: <device> (<n> points)" or "nominal <kind> model"


def _data_paths(data) -> tuple:
    if data is None:
        data = os.environ.get(DATA_ENV)
    if data is None:
        folder = Path(__file__).resolve().parents[1] / "perf" / "results"
        data = sorted(glob.glob(str(folder / "sweep-*.csv")))
    elif isinstance(data, (str, Path)):
        data = [data]
    paths = []
    for p in data:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"sweep data {path} does not exist")
        paths.append((str(path), path.stat().st_mtime_ns))
    return tuple(paths)


@functools.lru_cache(maxsize=16)
def _load(paths: tuple) -> tuple:
    rows = []
    for path, _ in paths:
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("kernel") in ("layer", "copy")]
    return tuple(rows)


def _device_kind(device) -> tuple[str, str | None]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return "cpu", None
    if device.type != "cuda":
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else None
    return "cuda", name


def _rows_for(rows, kind, name):
    """Rows measured on this device: its exact name if present, else any device of that kind."""
    is_cpu = [r for r in rows if r["device"].startswith("cpu")]
    candidates = is_cpu if kind == "cpu" else [r for r in rows if not r["device"].startswith("cpu")]
    exact = [r for r in candidates if name is not None and r["device"] == name]
    return exact or candidates


def _shape(r):
    return int(r["batch"]), int(r["in_features"]), int(r["out_features"])


@functools.lru_cache(maxsize=256)
def _models(paths, kind, name, dtype, mode, grad, metric):
    rows = [r for r in _rows_for(_load(paths), kind, name) if r["metric"] == metric]
    dtypes = {r["dtype"] for r in rows}
    if dtype not in dtypes and len(dtypes) == 1:
        dtype = dtypes.pop()  # the only dtype measured on this device
    rows = [r for r in rows if r["dtype"] == dtype]
    dense = [r for r in rows if r["provider"] == "dense"]
    mebp = [r for r in rows if r["provider"] != "dense" and r["mode"] == mode]
    # On a GPU the Triton path is what meProp layers run; on the CPU the PyTorch path.
    preferred = "mebp-triton" if kind == "cuda" else "mebp-torch"
    if any(r["provider"] == preferred for r in mebp):
        mebp = [r for r in mebp if r["provider"] == preferred]
    # A dense gradient measured only as row-sparse: add its zero fill at the copy bandwidth.
    fill_bandwidth = None
    if any(r["grad"] == grad for r in mebp):
        mebp = [r for r in mebp if r["grad"] == grad]
    elif grad == "dense":
        copies = [float(r["gbps"]) * 1e9 for r in _rows_for(_load(paths), kind, name)
                  if r["kernel"] == "copy" and r["gbps"]]
        fill_bandwidth = max(copies) if copies else NOMINAL[kind]["bandwidth"]
    if len(dense) < 1 or len(mebp) < 2:
        return None
    dense_fit = _fit(np.stack([_dense_features(*_shape(r)) for r in dense]),
                     np.array([float(r["median_ms"]) for r in dense]))
    mebp_fit = _fit(np.stack([_mebp_features(*_shape(r), int(r["k"]), metric) for r in mebp]),
                    np.array([float(r["median_ms"]) for r in mebp]))
    device_label = name or sorted({r["device"] for r in rows})[0]
    sizes = [b * m * n for b, m, n in map(_shape, mebp)]
    source = f"sweep: {device_label} ({len(dense)} dense, {len(mebp)} meProp points)"
    if fill_bandwidth is not None:
        source += ", dense-gradient fill added at the copy bandwidth"
    return dense_fit, mebp_fit, fill_bandwidth, (min(sizes), max(sizes)), source


def _nominal(kind, B, M, N, k, mode, grad, elem):
    figures = NOMINAL[kind]
    dense = figures["overhead"] + 4.0 * B * M * N / figures["flops"] \
        + elem * (B * N + 2 * B * M + 2 * N * M) / figures["bandwidth"]
    gathered = 4.0 * B * k * M / (figures["flops"] * figures["gathered_share"])
    w_rows = N if grad == "dense" else (min(N, B * k) if mode == "per_example" else k)
    traffic = elem * (B * N + 2 * B * M + k * M + w_rows * M)
    mebp = 2 * figures["overhead"] + gathered + traffic / figures["bandwidth"]
    return dense * 1e3, mebp * 1e3


def estimate(batch: int, in_features: int, out_features: int, k, mode: str = "unified",
             device="cpu", *, dtype=None, grad: str = "dense", metric: str = "backward",
             data=None) -> Estimate:
    """Predicted dense and meProp times and their ratio for one layer; see ``estimate_speedup``."""
    for name, value in (("batch", batch), ("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_options(mode, grad)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    kept = resolve_k(k, out_features)
    kind, name = _device_kind(device)
    dtype = dtype if dtype is not None else (torch.bfloat16 if kind == "cuda" else torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    dtype_label = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    models = _models(_data_paths(data), kind, name, dtype_label, mode, grad, metric)
    if models is None:
        dense_ms, mebp_ms = _nominal(kind, batch, in_features, out_features, kept, mode, grad,
                                     dtype.itemsize)
        source = f"nominal {kind} model"
    else:
        dense_fit, mebp_fit, fill_bandwidth, (smallest, largest), source = models
        if not smallest <= batch * in_features * out_features <= largest:
            source += ", extrapolated beyond the measured layer sizes"
        dense_ms = float(_dense_features(batch, in_features, out_features) @ dense_fit)
        mebp_ms = float(_mebp_features(batch, in_features, out_features, kept, metric) @ mebp_fit)
        if fill_bandwidth is not None:
            mebp_ms += out_features * in_features * dtype.itemsize / fill_bandwidth * 1e3
    if kept == out_features:  # meProp runs the dense backward then
        mebp_ms = dense_ms
    if dense_ms <= 0 or mebp_ms <= 0:
        raise RuntimeError(f"the cost model ({source}) predicts no time for this shape; "
                           "the sweep data does not cover it")
    return Estimate(dense_ms / mebp_ms, dense_ms, mebp_ms, source)


def estimate_speedup(batch: int, in_features: int, out_features: int, k, mode: str = "unified",
                     device="cpu", *, dtype=None, grad: str = "dense", metric: str = "backward",
                     data=None) -> float:
    """Predicted speedup of meProp's backward over dense backward for one linear layer.

    ``k``: int count or float ratio of ``out_features`` (as in ``mebp_linear``); ``mode``:
    "unified" or "per_example"; ``device``: "cpu", "cuda" or a torch.device; ``dtype`` defaults
    to fp32 on the CPU and bf16 on a GPU; ``grad``: the weight gradient layout; ``metric``:
    "backward" or a full training step ("step-sgd", "step-adam"). ``data``: sweep CSV path(s);
    by default ``$TRITON_MEBP_SWEEP_CSV`` or the repository's ``perf/results/sweep-*.csv``. Above 1
    means meProp is predicted faster. Reads the CSV once (cached); later calls cost microseconds.
    """
    return estimate(batch, in_features, out_features, k, mode, device, dtype=dtype, grad=grad,
                    metric=metric, data=data).speedup


def mebp_is_faster(batch: int, in_features: int, out_features: int, k, mode: str = "unified",
                   device="cpu", *, dtype=None, grad: str = "dense", margin: float = 1.1,
                   data=None) -> bool:
    """True when meProp's backward is predicted at least ``margin`` times faster than dense.

    For an automatic dense fallback: a layer whose shape predicts less keeps full back
    propagation. Same inputs as ``estimate_speedup``; the margin keeps borderline shapes dense.
    """
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    return estimate_speedup(batch, in_features, out_features, k, mode, device, dtype=dtype,
                            grad=grad, data=data) >= margin
