"""Will meProp be faster for my shapes? The backward speedup predicted by a fitted cost model.

A cost model is fitted, by non-negative least squares on relative error
(``scipy.optimize.nnls``), to a sweep's measured times of one device, commit, dtype, mode and
gradient layout:

- dense backward:  ``t = c1·B·M·N + c2·N·M + c3·B·(M + N) + c0``  (two GEMMs, the weight
  gradient written, the activations read and written, fixed costs);
- meProp backward: ``t = c1·B·k·M + c2·B·N + c3·k·M + c4·B·k + c5·N·M + c0``  (the gathered GEMMs,
  one pass over ``dy`` to select, the selected rows of ``W``, per-entry work of per-example
  selection, the zero fill of a dense gradient, fixed costs); for a full training step
  (``metric="step-sgd"`` / ``"step-adam"``) also ``B·M·N``, the forward pass it holds.

The predicted speedup is the ratio of the two. For per-example mode ``Estimate.masked_dense_ms``
also prices the same gradient by dense products on the masked ``dy`` (the dense backward, the
selection's terms of the per-example fit, the masked gradient's zero fill at the copy bandwidth),
which ``MeLinear(auto=True)`` runs where ``masked_dense_is_faster`` says so.
Which model answers (``Estimate.model``):

- ``"data"``: fitted to the sweep CSV(s) passed as ``data=`` (or named by
  ``$TRITON_MEBP_SWEEP_CSV``), each device's latest commit;
- ``"shipped"``: coefficients shipped with the package (``triton_mebp/data/speed_model.json``,
  written by ``mebp sweep --fit`` from the project's committed sweep, one commit per device);
- ``"nominal"``: a roofline model from nominal device figures (``NOMINAL``) where neither covers
  the device; it prices per-example products as the memory traffic they are (``_nominal``).
"""

import csv
import functools
import importlib.resources
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .functional import check_options, resolve_k

DATA_ENV = "TRITON_MEBP_SWEEP_CSV"
METRICS = ("backward", "step-sgd", "step-adam")
MODEL_FORMAT = 1
SHIPPED = ("data", "speed_model.json")  # inside the package

# Nominal device figures when no model covers the device: dense GEMM rate (FLOP/s), memory
# bandwidth (B/s), fixed cost per backward (s), the share of the GEMM rate the gathered
# products reach, and the rate of plain multiply-adds (FLOP/s: no tensor cores, no blocking),
# at which the per-example products compute.
NOMINAL = {
    "cpu": dict(
        flops=1.0e11, bandwidth=1.0e10, overhead=5e-5, gathered_share=0.7, fma_flops=2.5e10
    ),
    "cuda": dict(
        flops=6.0e14, bandwidth=3.0e12, overhead=3e-5, gathered_share=0.6, fma_flops=6.0e13
    ),
}
# Bytes moved per selected (example, column) entry of the per-example products besides the rows
# they stream: the sort by row (keys and positions, read and written in a few passes), the
# values and examples gathered in that order, the indices read by dx.
ENTRY_BYTES = 64
INDEX_BYTES = 8  # an int64 index


def _dense_features(B, M, N):
    return np.array([B * M * N, N * M, B * (M + N), 1.0], dtype=np.float64)


def _mebp_features(B, M, N, k, metric="backward"):
    step = [B * M * N] if metric != "backward" else []  # a full step holds the dense forward
    return np.array([B * k * M, B * N, k * M, B * k, N * M, *step, 1.0], dtype=np.float64)


def _fit(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the relative error of the predicted times."""
    from scipy.optimize import nnls  # type: ignore[import-untyped]

    scale = features.max(axis=0)
    scale[scale == 0] = 1.0
    coefficients, _ = nnls(features / scale / times[:, None], np.ones_like(times))
    return coefficients / scale


@dataclass(frozen=True)
class Estimate:
    speedup: float  # dense time / meProp time
    dense_ms: float
    mebp_ms: float
    model: str  # "data", "shipped" or "nominal": which model answered
    source: str  # what it was fitted to: device, commit, points (or the nominal kind)
    # mode="per_example": the same gradient by dense products on the masked dy (the selection,
    # a zeroed B x N gradient with the kept entries scattered in, two dense GEMMs); None otherwise
    masked_dense_ms: float | None = None


# ---------------------------------------------------------------- fitting


def _shape(r: dict) -> tuple[int, int, int]:
    return int(r["batch"]), int(r["in_features"]), int(r["out_features"])


def _kind(device_name: str) -> str:
    return "cpu" if device_name.startswith("cpu") else "cuda"


def read_sweep(paths: Iterable[str | Path]) -> list[dict]:
    """The layer and copy-bandwidth rows of sweep CSVs (any layout the sweep has written)."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("kernel") in ("layer", "copy")]
    return rows


def fit_speed_model(rows: list[dict], commits: dict | None = None) -> dict:
    """Cost-model coefficients for every device, dtype, metric, mode and gradient layout that
    sweep rows measure: the JSON-ready form ``mebp sweep --fit`` ships.

    Each device's rows are those of one commit: ``commits[device]`` if given, else its latest
    (by timestamp). meProp rows are the Triton provider's on a GPU, the PyTorch ops' on a CPU.
    """
    latest: dict = {}
    for r in rows:
        if r["device"] not in latest or r["timestamp"] > latest[r["device"]][1]:
            latest[r["device"]] = (r["commit"], r["timestamp"])
    chosen = {device: commit for device, (commit, _) in latest.items()} | dict(commits or {})
    devices = []
    for device, commit in sorted(chosen.items()):
        mine = [r for r in rows if r["device"] == device and r["commit"] == commit]
        if not mine:
            continue
        kind = _kind(device)
        copies = [float(r["gbps"]) * 1e9 for r in mine if r["kernel"] == "copy" and r.get("gbps")]
        layer = [r for r in mine if r["kernel"] == "layer" and r["metric"] in METRICS]
        fits = []
        for dtype, metric in sorted({(r["dtype"], r["metric"]) for r in layer}):
            of = [r for r in layer if r["dtype"] == dtype and r["metric"] == metric]
            dense = [r for r in of if r["provider"] == "dense"]
            mebp = [r for r in of if r["provider"] != "dense"]
            preferred = "mebp-triton" if kind == "cuda" else "mebp-torch"
            if any(r["provider"] == preferred for r in mebp):
                mebp = [r for r in mebp if r["provider"] == preferred]
            for mode, grad in sorted({(r["mode"], r["grad"]) for r in mebp}):
                points = [r for r in mebp if r["mode"] == mode and r["grad"] == grad]
                if not dense or len(points) < 2:
                    continue
                dense_fit = _fit(
                    np.stack([_dense_features(*_shape(r)) for r in dense]),
                    np.array([float(r["median_ms"]) for r in dense]),
                )
                mebp_fit = _fit(
                    np.stack([_mebp_features(*_shape(r), int(r["k"]), metric) for r in points]),
                    np.array([float(r["median_ms"]) for r in points]),
                )
                sizes = [b * m * n for b, m, n in map(_shape, points)]
                fits.append(
                    dict(
                        dtype=dtype,
                        metric=metric,
                        mode=mode,
                        grad=grad,
                        provider=points[0]["provider"],
                        dense=dense_fit.tolist(),
                        mebp=mebp_fit.tolist(),
                        sizes=[min(sizes), max(sizes)],
                        points=[len(dense), len(points)],
                    )
                )
        if fits:
            devices.append(
                dict(
                    device=device,
                    kind=kind,
                    commit=commit,
                    copy_bandwidth=max(copies) if copies else None,
                    fits=fits,
                )
            )
    return {"format": MODEL_FORMAT, "devices": devices}


# ---------------------------------------------------------------- the models


def _data_paths(data: str | Path | Iterable[str | Path] | None) -> tuple:
    if data is None:
        data = os.environ.get(DATA_ENV)
    if data is None:
        return ()
    if isinstance(data, (str, Path)):
        data = [data]
    paths = []
    for p in data:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"sweep data {path} does not exist")
        paths.append((str(path), path.stat().st_mtime_ns))
    return tuple(paths)


@functools.lru_cache(maxsize=16)
def _fitted(paths: tuple) -> dict:
    return fit_speed_model(read_sweep([p for p, _ in paths]))


@functools.lru_cache(maxsize=1)
def shipped_model() -> dict:
    """The coefficients shipped with the package (no devices if the file is absent)."""
    resource = importlib.resources.files(__package__).joinpath(SHIPPED[0]).joinpath(SHIPPED[1])
    if not resource.is_file():
        return {"format": MODEL_FORMAT, "devices": []}
    model = json.loads(resource.read_text())
    if model.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{'/'.join(SHIPPED)} has format {model.get('format')!r}, this version "
            f"reads {MODEL_FORMAT}; rerun `mebp sweep --fit`"
        )
    return model


def _device_kind(device: str | torch.device | None) -> tuple[str, str | None]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return "cpu", None
    if device.type != "cuda":
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else None
    return "cuda", name


def _choose(
    model: dict, kind: str, name: str | None, dtype: str, mode: str, grad: str, metric: str
) -> tuple | None:
    """(device entry, fit, fill bandwidth or None) answering the question, or None.

    The device's exact name if the model has it, else the first device of that kind; the dtype
    asked for, else the only one measured; a dense gradient measured only row-sparse adds its
    zero fill at the device's copy bandwidth."""
    devices = [d for d in model["devices"] if d["kind"] == kind]
    device = next((d for d in devices if d["device"] == name), devices[0] if devices else None)
    if device is None:
        return None
    fits = [f for f in device["fits"] if f["metric"] == metric]
    dtypes = {f["dtype"] for f in fits}
    if dtype not in dtypes and len(dtypes) == 1:
        dtype = dtypes.pop()
    fits = [f for f in fits if f["dtype"] == dtype and f["mode"] == mode]
    exact = [f for f in fits if f["grad"] == grad]
    if exact:
        return device, exact[0], None
    if grad == "dense" and fits:
        return device, fits[0], device["copy_bandwidth"] or NOMINAL[kind]["bandwidth"]
    return None


def _nominal(kind, B, M, N, k, mode, grad, elem):
    """(dense, meProp, masked-dense or None) times in ms from the nominal figures, a sum of
    compute and memory-traffic terms.

    Unified: gathered GEMMs at a share of the GEMM rate, one read of ``dy``, the inputs and
    outputs. Per-example: no tensor cores, and every selected (example, column) entry streams a
    row of ``W`` (for dx) and a row of ``x`` (for dW), M elements each, so the products move
    ``2·B·k·M`` elements (caches may hold some of the rows: a GPU run measures how many) plus
    ``ENTRY_BYTES`` per entry; the masked-dense alternative is the dense backward on a zeroed
    ``B x N`` gradient with the kept entries scattered in, after the same selection.
    """
    figures = NOMINAL[kind]
    bandwidth = figures["bandwidth"]
    gemms = 4.0 * B * M * N / figures["flops"]
    dense_traffic = elem * (B * N + 2 * B * M + 2 * N * M)
    dense = figures["overhead"] + gemms + dense_traffic / bandwidth
    if mode == "unified":
        w_rows = N if grad == "dense" else k
        gathered = 4.0 * B * k * M / (figures["flops"] * figures["gathered_share"])
        traffic = elem * (B * N + 2 * B * M + k * M + w_rows * M)
        mebp = 2 * figures["overhead"] + gathered + traffic / bandwidth
        return dense * 1e3, mebp * 1e3, None
    w_rows = N if grad == "dense" else min(N, B * k)
    selection = elem * B * N + B * k * (elem + INDEX_BYTES)  # reads dy, writes values, indices
    products = 4.0 * B * k * M / figures["fma_flops"]
    traffic = selection + elem * (2 * B * k * M + B * M + w_rows * M) + B * k * ENTRY_BYTES
    mebp = 2 * figures["overhead"] + products + traffic / bandwidth
    # zero fill of the masked gradient, the scatter of the kept entries, then the dense products
    masked_traffic = selection + elem * B * N + B * k * (elem + INDEX_BYTES) + dense_traffic
    masked = 3 * figures["overhead"] + gemms + masked_traffic / bandwidth
    return dense * 1e3, mebp * 1e3, masked * 1e3


def _fitted_masked_dense(fit, dense_ms, B, N, k, elem, bandwidth):
    """The masked-dense backward from a fitted per-example model: the dense backward, the
    selection's terms of the meProp fit (its pass over ``dy`` and its per-entry work, which
    also holds the per-entry work of the products: an upper bound) and the masked gradient
    zero-filled and scattered at the copy bandwidth."""
    selection = fit["mebp"][1] * B * N + fit["mebp"][3] * B * k
    return dense_ms + selection + (elem * B * N + B * k * (elem + INDEX_BYTES)) / bandwidth * 1e3


def estimate(
    batch: int,
    in_features: int,
    out_features: int,
    k: int | float,
    mode: str = "unified",
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    grad: str = "dense",
    metric: str = "backward",
    data: str | Path | Iterable[str | Path] | None = None,
) -> Estimate:
    """Predicted dense and meProp times and their ratio for one layer; see ``estimate_speedup``."""
    for what, value in (
        ("batch", batch),
        ("in_features", in_features),
        ("out_features", out_features),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    check_options(mode, grad)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    kept = resolve_k(k, out_features)
    kind, name = _device_kind(device)
    dtype = dtype if dtype is not None else (torch.bfloat16 if kind == "cuda" else torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    dtype_label = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype)
    )
    paths = _data_paths(data)
    model, which = (_fitted(paths), "data") if paths else (shipped_model(), "shipped")
    chosen = _choose(model, kind, name, dtype_label, mode, grad, metric)
    masked_ms = None
    if chosen is None:
        dense_ms, mebp_ms, masked_ms = _nominal(
            kind, batch, in_features, out_features, kept, mode, grad, dtype.itemsize
        )
        which, source = "nominal", f"nominal {kind} model"
    else:
        entry, fit, fill_bandwidth = chosen
        origin = ", ".join(p for p, _ in paths) if paths else "/".join(SHIPPED)
        source = (
            f"{origin}: {entry['device']} at commit {entry['commit']} "
            f"({fit['points'][0]} dense, {fit['points'][1]} meProp points, {fit['dtype']})"
        )
        if fill_bandwidth is not None:
            source += ", dense-gradient fill added at the copy bandwidth"
        smallest, largest = fit["sizes"]
        if not smallest <= batch * in_features * out_features <= largest:
            source += ", extrapolated beyond the measured layer sizes"
        dense_ms = float(_dense_features(batch, in_features, out_features) @ np.array(fit["dense"]))
        mebp_ms = float(
            _mebp_features(batch, in_features, out_features, kept, metric) @ np.array(fit["mebp"])
        )
        if fill_bandwidth is not None:
            mebp_ms += out_features * in_features * dtype.itemsize / fill_bandwidth * 1e3
        if mode == "per_example":
            bandwidth = entry["copy_bandwidth"] or NOMINAL[kind]["bandwidth"]
            masked_ms = _fitted_masked_dense(
                fit, dense_ms, batch, out_features, kept, dtype.itemsize, bandwidth
            )
    if kept == out_features:  # meProp runs the dense backward then
        mebp_ms = dense_ms
        masked_ms = dense_ms if masked_ms is not None else None
    if dense_ms <= 0 or mebp_ms <= 0:
        raise RuntimeError(
            f"the cost model ({source}) predicts no time for this shape; "
            "the sweep data does not cover it"
        )
    return Estimate(dense_ms / mebp_ms, dense_ms, mebp_ms, which, source, masked_ms)


def estimate_speedup(
    batch: int,
    in_features: int,
    out_features: int,
    k: int | float,
    mode: str = "unified",
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    grad: str = "dense",
    metric: str = "backward",
    data: str | Path | Iterable[str | Path] | None = None,
) -> float:
    """Predicted speedup of meProp's backward over dense backward for one linear layer.

    ``k``: int count or float ratio of ``out_features`` (as in ``mebp_linear``); ``mode``:
    "unified" or "per_example"; ``device``: "cpu", "cuda" or a torch.device; ``dtype`` defaults
    to fp32 on the CPU and bf16 on a GPU; ``grad``: the weight gradient layout; ``metric``:
    "backward" or a full training step ("step-sgd", "step-adam"). ``data``: your own sweep CSV
    path(s) (``mebp sweep --out FILE``; default ``$TRITON_MEBP_SWEEP_CSV``), fitted to each
    device's latest commit; without it the coefficients shipped with the package answer, or a
    nominal model for a device they do not cover (``estimate(...).model`` says which). Above 1
    means meProp is predicted faster. Fits once (cached); later calls cost microseconds.
    """
    return estimate(
        batch,
        in_features,
        out_features,
        k,
        mode,
        device,
        dtype=dtype,
        grad=grad,
        metric=metric,
        data=data,
    ).speedup


def mebp_is_faster(
    batch: int,
    in_features: int,
    out_features: int,
    k: int | float,
    mode: str = "unified",
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    grad: str = "dense",
    margin: float = 1.1,
    data: str | Path | Iterable[str | Path] | None = None,
) -> bool:
    """True when meProp's backward is predicted at least ``margin`` times faster than dense.

    For an automatic dense fallback: a layer whose shape predicts less keeps full back
    propagation. Same inputs as ``estimate_speedup``; the margin keeps borderline shapes dense.
    """
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    return (
        estimate_speedup(
            batch, in_features, out_features, k, mode, device, dtype=dtype, grad=grad, data=data
        )
        >= margin
    )


def masked_dense_is_faster(
    batch: int,
    in_features: int,
    out_features: int,
    k: int | float,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    grad: str = "dense",
    margin: float = 1.1,
    data: str | Path | Iterable[str | Path] | None = None,
) -> bool:
    """Whether per-example meProp should compute its gradient by dense products on the masked
    ``dy`` (the same gradient, at the GEMM rate): False only where its own products (a row of
    ``W`` and of ``x`` per selected entry) are predicted at least ``margin`` times faster. What
    ``MeLinear(mode="per_example", auto=True)`` asks; same inputs as ``estimate_speedup``.
    """
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    predicted = estimate(
        batch,
        in_features,
        out_features,
        k,
        "per_example",
        device,
        dtype=dtype,
        grad=grad,
        data=data,
    )
    masked = predicted.masked_dense_ms  # set for mode="per_example"
    return masked is None or predicted.mebp_ms * margin > masked
