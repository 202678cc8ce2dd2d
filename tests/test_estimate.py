"""``estimate_speedup`` / ``mebp_is_faster``: the cost model fitted to sweep data."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from triton_mebp import estimate as est
from triton_mebp.bench.sweep import COLUMNS


def dense_ms(B, M, N, rate):
    return 0.02 + 4.0 * B * M * N / rate * 1e3


def mebp_ms(B, M, N, k, rate):
    # one pass over dy (B*N floats at 10 GB/s), gathered products at 70% of the dense rate
    return 0.08 + B * N * 4 / 1e10 * 1e3 + 4.0 * B * k * M / (0.7 * rate) * 1e3


def write_sweep(
    path,
    device,
    rate,
    shapes=((64, 256, 512), (256, 1024, 1024), (128, 512, 2048)),
    ks=(0.01, 0.05, 0.2),
    dtype="fp32",
    provider="mebp-torch",
    grad="sparse",
    metric="backward",
):
    rows = []
    # a full step adds the dense forward (2·B·M·N at the dense rate) to either backward
    forward = (
        (lambda B, M, N: 2.0 * B * M * N / rate * 1e3)
        if metric != "backward"
        else (lambda B, M, N: 0.0)
    )

    def row(prov, mode, B, M, N, k, ms, g):
        rows.append(
            {c: "" for c in COLUMNS}
            | dict(
                kernel="layer",
                provider=prov,
                mode=mode,
                grad=g,
                dtype=dtype,
                batch=B,
                in_features=M,
                out_features=N,
                k=k,
                metric=metric,
                median_ms=ms,
                q20_ms=ms,
                q80_ms=ms,
                device=device,
                commit="c0",
                timestamp="t",
            )
        )

    for B, M, N in shapes:
        row("dense", "", B, M, N, N, dense_ms(B, M, N, rate) + forward(B, M, N), "dense")
        for ratio in ks:
            k = max(1, round(ratio * N))
            row(provider, "unified", B, M, N, k, mebp_ms(B, M, N, k, rate) + forward(B, M, N), grad)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def cpu_data(tmp_path):
    return write_sweep(tmp_path / "sweep-cpu.csv", "cpu test (2 threads)", rate=1e11)


def test_fit_is_the_nonnegative_least_squares_of_relative_error():
    # times 2·a + 3·b exactly: recovered; then a column that would need a negative weight is 0
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    np.testing.assert_allclose(est._fit(features, features @ [2.0, 3.0]), [2.0, 3.0], rtol=1e-9)
    # times falling as the second feature grows: its weight is held at 0, and the first minimises
    # sum((c / t - 1)^2), i.e. c = sum(1/t) / sum(1/t^2)
    features = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    times = np.array([3.0, 2.0, 1.0])
    expected = np.sum(1 / times) / np.sum(1 / times**2)
    np.testing.assert_allclose(est._fit(features, times), [expected, 0.0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "B,M,N,ratio", [(512, 4096, 4096, 0.05), (32, 2048, 512, 0.1), (256, 1024, 1024, 0.02)]
)
def test_recovers_the_cost_behind_the_data_on_unseen_shapes(cpu_data, B, M, N, ratio):
    k = round(ratio * N)
    expected = dense_ms(B, M, N, 1e11) / mebp_ms(B, M, N, k, 1e11)
    got = est.estimate(B, M, N, ratio, "unified", "cpu", grad="sparse", data=cpu_data)
    assert got.model == "data" and got.source.startswith(
        f"{cpu_data}: cpu test (2 threads) at commit c0"
    )
    assert ("extrapolated" in got.source) == (B * M * N > 256 * 1024 * 1024)  # largest in the data
    assert got.speedup == pytest.approx(expected, rel=0.02)
    assert est.estimate_speedup(
        B, M, N, k, "unified", "cpu", grad="sparse", data=cpu_data
    ) == pytest.approx(got.speedup)


def test_speedup_falls_as_k_grows(cpu_data):
    values = [
        est.estimate_speedup(512, 2048, 2048, r, data=cpu_data) for r in (0.005, 0.05, 0.2, 0.5)
    ]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_k_equal_to_width_means_no_speedup(cpu_data):
    assert est.estimate_speedup(64, 128, 256, 256, data=cpu_data) == 1.0
    assert est.estimate_speedup(64, 128, 256, 1.0, data=cpu_data) == 1.0


def test_mebp_is_faster_compares_with_the_margin(cpu_data):
    s = est.estimate_speedup(512, 4096, 4096, 0.05, data=cpu_data)
    assert s > 2
    assert est.mebp_is_faster(512, 4096, 4096, 0.05, data=cpu_data, margin=0.9 * s)
    assert not est.mebp_is_faster(512, 4096, 4096, 0.05, data=cpu_data, margin=1.1 * s)
    # tiny layer: the fixed costs dominate and meProp loses
    assert not est.mebp_is_faster(4, 16, 32, 0.5, data=cpu_data)


def test_gpu_rows_are_used_for_a_cuda_device(tmp_path):
    data = write_sweep(tmp_path / "both.csv", "cpu test (2 threads)", rate=1e11)
    write_sweep(data, "NVIDIA Test GPU", rate=1e14, dtype="bf16", provider="mebp-triton")
    cpu = est.estimate(1024, 4096, 4096, 0.05, device="cpu", grad="sparse", data=data)
    gpu = est.estimate(1024, 4096, 4096, 0.05, device="cuda", grad="sparse", data=data)
    assert "cpu test" in cpu.source and "NVIDIA Test GPU" in gpu.source
    k = round(0.05 * 4096)
    assert gpu.speedup == pytest.approx(
        dense_ms(1024, 4096, 4096, 1e14) / mebp_ms(1024, 4096, 4096, k, 1e14), rel=0.02
    )


def test_other_dtype_falls_back_to_the_measured_one(cpu_data):
    a = est.estimate_speedup(
        256, 1024, 2048, 0.05, dtype=torch.float16, grad="sparse", data=cpu_data
    )
    b = est.estimate_speedup(
        256, 1024, 2048, 0.05, dtype=torch.float32, grad="sparse", data=cpu_data
    )
    assert a == b


def test_without_data_the_nominal_model_answers(tmp_path):
    empty = write_sweep(tmp_path / "empty.csv", "cpu x", rate=1e11, shapes=())
    small = est.estimate(2, 8, 8, 4, data=empty)
    big = est.estimate(1024, 8192, 8192, 0.01, device="cuda", data=empty)
    assert small.source == "nominal cpu model" and big.source == "nominal cuda model"
    assert small.model == big.model == "nominal"
    assert small.speedup < 1 < big.speedup
    assert est.mebp_is_faster(1024, 8192, 8192, 0.01, device="cuda", data=empty)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch=0), "batch"),
        (dict(in_features=2.5), "in_features"),
        (dict(out_features=-1), "out_features"),
        (dict(k=0), "k=0"),
        (dict(k=1.5), "ratio"),
        (dict(k=300), "outside"),
        (dict(mode="rows"), "mode"),
        (dict(grad="coo"), "grad"),
        (dict(metric="forward"), "metric"),
        (dict(device="meta"), "device"),
        (dict(dtype=torch.int32), "dtype"),
    ],
)
def test_bad_input_is_named(cpu_data, kwargs, match):
    args = (
        dict(
            batch=8,
            in_features=16,
            out_features=256,
            k=0.1,
            mode="unified",
            device="cpu",
            data=cpu_data,
        )
        | kwargs
    )
    with pytest.raises(ValueError, match=match):
        est.estimate_speedup(**args)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        est.estimate_speedup(8, 16, 32, 4, data=tmp_path / "nowhere.csv")


def test_bad_margin_is_refused(cpu_data):
    with pytest.raises(ValueError, match="margin"):
        est.mebp_is_faster(8, 16, 32, 4, data=cpu_data, margin=0)


def test_dense_gradient_measured_only_sparse_adds_the_zero_fill(tmp_path):
    data = write_sweep(tmp_path / "s.csv", "cpu test (2 threads)", rate=1e11)
    with open(data, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=COLUMNS).writerow(
            {c: "" for c in COLUMNS}
            | dict(
                kernel="copy",
                provider="torch",
                dtype="fp32",
                batch=1,
                in_features=8,
                out_features=8,
                k=0,
                metric="bandwidth",
                median_ms=1,
                q20_ms=1,
                q80_ms=1,
                gbps=20.0,
                device="cpu test (2 threads)",
                commit="c0",
                timestamp="t",
            )
        )
    sparse = est.estimate(256, 2048, 1024, 0.05, grad="sparse", data=data)
    dense = est.estimate(256, 2048, 1024, 0.05, grad="dense", data=data)
    assert dense.mebp_ms - sparse.mebp_ms == pytest.approx(1024 * 2048 * 4 / 20e9 * 1e3)
    assert dense.dense_ms == sparse.dense_ms and "fill" in dense.source


def test_full_step_estimate_includes_the_forward(tmp_path):
    data = write_sweep(tmp_path / "step.csv", "cpu test (2 threads)", rate=1e11, metric="step-sgd")
    B, M, N, k = 512, 2048, 2048, 102
    forward = 2.0 * B * M * N / 1e11 * 1e3
    expected = (dense_ms(B, M, N, 1e11) + forward) / (mebp_ms(B, M, N, k, 1e11) + forward)
    got = est.estimate_speedup(B, M, N, k, grad="sparse", metric="step-sgd", data=data)
    assert got == pytest.approx(expected, rel=0.02)
    assert got < est.estimate_speedup(
        B,
        M,
        N,
        k,
        grad="sparse",
        data=write_sweep(tmp_path / "bwd.csv", "cpu test (2 threads)", rate=1e11),
    )


ROOT = Path(__file__).resolve().parents[1]
SHIPPED_FACTOR = 1.6  # shipped predictions of the committed sweep's speedups are this close


def test_shipped_model_is_the_fit_of_the_committed_sweep():
    model = est.shipped_model()
    assert model["devices"], "no device in triton_mebp/data/speed_model.json"
    rows = est.read_sweep([ROOT / p for p in model["fitted_from"]])
    refit = est.fit_speed_model(rows, {d["device"]: d["commit"] for d in model["devices"]})
    assert [(d["device"], d["commit"]) for d in refit["devices"]] == [
        (d["device"], d["commit"]) for d in model["devices"]
    ]
    for shipped, fresh in zip(model["devices"], refit["devices"]):
        assert len(shipped["fits"]) == len(fresh["fits"])
        for a, b in zip(shipped["fits"], fresh["fits"]):
            assert {k: a[k] for k in ("dtype", "metric", "mode", "grad")} == {
                k: b[k] for k in ("dtype", "metric", "mode", "grad")
            }
            np.testing.assert_allclose(a["dense"], b["dense"], rtol=1e-6, atol=1e-15)
            np.testing.assert_allclose(a["mebp"], b["mebp"], rtol=1e-6, atol=1e-15)


def test_shipped_model_predicts_the_committed_sweep_speedups(monkeypatch):
    monkeypatch.delenv(est.DATA_ENV, raising=False)
    model = est.shipped_model()
    (cpu,) = [d for d in model["devices"] if d["kind"] == "cpu"]
    rows = [
        r
        for r in est.read_sweep([ROOT / p for p in model["fitted_from"]])
        if r["device"] == cpu["device"] and r["commit"] == cpu["commit"] and r["kernel"] == "layer"
    ]
    checked = 0
    for metric in est.METRICS:
        dense = {
            est._shape(r): float(r["median_ms"])
            for r in rows
            if r["provider"] == "dense" and r["metric"] == metric
        }
        for r in rows:
            if r["provider"] == "dense" or r["metric"] != metric:
                continue
            measured = dense[est._shape(r)] / float(r["median_ms"])
            got = est.estimate(
                *est._shape(r), int(r["k"]), r["mode"], "cpu", grad=r["grad"], metric=metric
            )
            assert got.model == "shipped" and cpu["commit"] in got.source
            assert 1 / SHIPPED_FACTOR <= got.speedup / measured <= SHIPPED_FACTOR, (r, got)
            checked += 1
    assert checked >= 30


def test_an_installed_package_answers_from_the_shipped_model(tmp_path):
    # A copy of the package without the checkout around it (no perf/, no .git): as installed.
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "triton_mebp",
        site / "triton_mebp",
        ignore=shutil.ignore_patterns("__pycache__", "app", "bench"),
    )
    shutil.copytree(
        ROOT / "kernels",
        site / "triton_mebp" / "kernels",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {k: v for k, v in os.environ.items() if k not in (est.DATA_ENV, "PYTHONPATH")}
    script = (
        "import triton_mebp as m; from triton_mebp.estimate import estimate; "
        "e = estimate(512, 4096, 4096, 0.05, 'unified', 'cpu', grad='sparse'); "
        "print(m.__file__); print(e.model); print(e.source); print(e.speedup)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    where, model, source, speedup = result.stdout.strip().splitlines()[-4:]
    assert Path(where).parent == site / "triton_mebp"
    assert model == "shipped" and source.startswith("data/speed_model.json: cpu")
    assert float(speedup) == pytest.approx(
        est.estimate(512, 4096, 4096, 0.05, "unified", "cpu", grad="sparse").speedup
    )


def test_sweep_fit_writes_the_model_of_one_commit(tmp_path):
    from triton_mebp.bench import sweep

    data = write_sweep(tmp_path / "sweep-cpu.csv", "cpu test (2 threads)", rate=1e11)
    with open(data) as f:
        first = f.read()
    write_sweep(data, "cpu test (2 threads)", rate=1e9)  # another (slower) run...
    with open(data) as f:
        text = f.read()
    with open(data, "w") as f:  # ...at a later commit
        f.write(first + text[len(first) :].replace(",c0,t", ",c1,u"))
    out = tmp_path / "model.json"
    for commit, rate in (("c0", 1e11), (None, 1e9)):  # default: the device's latest commit
        args = ["--fit", "--out", str(data), "--model-out", str(out)]
        assert sweep.main(args + (["--commit", commit] if commit else [])) == 0
        model = json.loads(out.read_text())
        (device,) = model["devices"]
        assert device["commit"] == (commit or "c1") and model["fitted_from"] == [data.as_posix()]
        (fit,) = [f for f in device["fits"] if f["mode"] == "unified"]
        B, M, N, k = 256, 1024, 1024, 51
        dense = est._dense_features(B, M, N) @ fit["dense"]
        mebp = est._mebp_features(B, M, N, k) @ fit["mebp"]
        assert dense / mebp == pytest.approx(
            dense_ms(B, M, N, rate) / mebp_ms(B, M, N, k, rate), rel=0.02
        )
    assert (
        sweep.main(["--fit", "--out", str(data), "--commit", "nope", "--model-out", str(out)]) == 2
    )


# ---------------------------------------------------------------- per-example: masked-dense


def nominal_per_example_and_masked(B, M, N, k, elem):
    """The nominal model's per-example and masked-dense times (s, dense gradient), written out
    from its description: the per-example products stream 2·B·k·M elements (a row of W and of x
    per kept entry) plus ENTRY_BYTES per entry and compute 4·B·k·M FMA flops; the masked-dense
    backward is the dense backward plus a zero fill of the B x N gradient and a scatter."""
    f = est.NOMINAL["cuda"]
    selection = elem * B * N + B * k * (elem + 8)
    per_example = (
        2 * f["overhead"]
        + 4 * B * k * M / f["fma_flops"]
        + (selection + elem * (2 * B * k * M + B * M + N * M) + B * k * est.ENTRY_BYTES)
        / f["bandwidth"]
    )
    dense_traffic = elem * (B * N + 2 * B * M + 2 * N * M)
    masked = (
        3 * f["overhead"]
        + 4 * B * M * N / f["flops"]
        + (selection + elem * B * N + B * k * (elem + 8) + dense_traffic) / f["bandwidth"]
    )
    return per_example, masked


@pytest.mark.parametrize("B,M,N", [(4096, 8192, 8192), (512, 4096, 4096), (1024, 2048, 8192)])
def test_per_example_flips_to_masked_dense_at_the_nominal_break_even(tmp_path, B, M, N):
    empty = write_sweep(tmp_path / "empty.csv", "cpu x", rate=1e11, shapes=())
    margin = 1.1
    # both times are linear in k: margin · per_example(k) = masked(k) at k*
    p0, m0 = nominal_per_example_and_masked(B, M, N, 0, 2)
    p1, m1 = nominal_per_example_and_masked(B, M, N, 1, 2)
    k_star = (m0 - margin * p0) / (margin * (p1 - p0) - (m1 - m0))
    assert 1 < k_star < N / 50  # per-example pays only below 2% of the width on a GPU
    below, above = int(k_star), int(k_star) + 1

    def choice(k):
        return est.masked_dense_is_faster(B, M, N, k, "cuda", dtype=torch.bfloat16, data=empty)

    assert not choice(below) and choice(above)
    e = est.estimate(B, M, N, below, "per_example", "cuda", dtype=torch.bfloat16, data=empty)
    expected = nominal_per_example_and_masked(B, M, N, below, 2)
    assert (e.mebp_ms, e.masked_dense_ms) == pytest.approx([t * 1e3 for t in expected])


def test_per_example_at_5_percent_on_a_gpu_runs_the_masked_dense_backward(tmp_path):
    empty = write_sweep(tmp_path / "empty.csv", "cpu x", rate=1e11, shapes=())
    for grad in ("dense", "sparse"):
        e = est.estimate(
            4096,
            8192,
            8192,
            0.05,
            "per_example",
            "cuda",
            dtype=torch.bfloat16,
            grad=grad,
            data=empty,
        )
        assert e.model == "nominal" and e.masked_dense_ms < e.mebp_ms
        # memory-bound: 2·B·k·M bf16 elements of streamed rows at the nominal bandwidth
        assert e.mebp_ms > 2 * 4096 * 410 * 8192 * 2 / est.NOMINAL["cuda"]["bandwidth"] * 1e3
        assert est.masked_dense_is_faster(
            4096, 8192, 8192, 0.05, "cuda", dtype=torch.bfloat16, grad=grad, data=empty
        )
    unified = est.estimate(4096, 8192, 8192, 0.05, "unified", "cuda", data=empty)
    assert unified.masked_dense_ms is None and unified.speedup > 1


def test_fitted_per_example_model_prices_the_masked_dense_backward():
    """From a fit: the dense backward plus the per-example fit's selection terms and the zero
    fill at the copy bandwidth; per-example wins at small k, the masked-dense GEMMs at large."""
    (cpu,) = [d for d in est.shipped_model()["devices"] if d["kind"] == "cpu"]
    (fit,) = [
        f
        for f in cpu["fits"]
        if (f["metric"], f["mode"], f["grad"]) == ("backward", "per_example", "sparse")
    ]
    B, M, N, k = 256, 2048, 2048, 102
    e = est.estimate(B, M, N, k, "per_example", "cpu", grad="sparse")
    assert e.model == "shipped"
    selection = fit["mebp"][1] * B * N + fit["mebp"][3] * B * k
    fill = (4 * B * N + B * k * 12) / cpu["copy_bandwidth"] * 1e3
    assert e.masked_dense_ms == pytest.approx(e.dense_ms + selection + fill)
    assert not est.masked_dense_is_faster(B, M, N, 0.01, "cpu", grad="sparse")
    assert est.masked_dense_is_faster(B, M, N, 0.5, "cpu", grad="sparse")


def test_committed_break_even_file_is_the_models_answer(monkeypatch):
    """perf/results/per-example-break-even.csv (cited by the README) is current: at each row's
    k the decision flips, one below it does not."""
    monkeypatch.delenv(est.DATA_ENV, raising=False)
    path = ROOT / "perf" / "results" / "per-example-break-even.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["device"] for r in rows} == {"cuda", "cpu"}
    for r in rows:
        B, M, N = est._shape(r)
        dtype = getattr(torch, r["dtype"])
        options = dict(dtype=dtype, grad=r["grad"])

        def faster_masked(k):
            e = est.estimate(B, M, N, k, "per_example", r["device"], **options)
            return e.masked_dense_ms <= e.mebp_ms

        def auto(k):
            return est.masked_dense_is_faster(B, M, N, k, r["device"], **options)

        even, switch = int(r["break_even_k"]), int(r["auto_dense_from_k"])
        assert faster_masked(even) and not faster_masked(even - 1), r
        assert auto(switch) and not auto(switch - 1), r
        assert r["model"] == ("nominal" if r["device"] == "cuda" else "shipped")
