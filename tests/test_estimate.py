"""``estimate_speedup`` / ``mebp_is_faster``: the cost model fitted to sweep data."""
import csv

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


def write_sweep(path, device, rate, shapes=((64, 256, 512), (256, 1024, 1024), (128, 512, 2048)),
                ks=(0.01, 0.05, 0.2), dtype="fp32", provider="mebp-torch", grad="sparse",
                metric="backward"):
    rows = []
    # a full step adds the dense forward (2·B·M·N at the dense rate) to either backward
    forward = (lambda B, M, N: 2.0 * B * M * N / rate * 1e3) if metric != "backward" else (lambda B, M, N: 0.0)

    def row(prov, mode, B, M, N, k, ms, g):
        rows.append({c: "" for c in COLUMNS} | dict(
            kernel="layer", provider=prov, mode=mode, grad=g, dtype=dtype, batch=B, in_features=M,
            out_features=N, k=k, metric=metric, median_ms=ms, q20_ms=ms, q80_ms=ms,
            device=device, commit="c0", timestamp="t"))
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


def test_nonnegative_least_squares_by_hand():
    # unconstrained optimum (1, -1); with x >= 0: x2 = 0, min (x1-1)^2 + 1 + x1^2 -> x1 = 1/2
    A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([1.0, -1.0, 0.0])
    np.testing.assert_allclose(est.nonnegative_least_squares(A, b), [0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(est.nonnegative_least_squares(A, np.array([1.0, 2.0, 3.0])), [1.0, 2.0])


@pytest.mark.parametrize("B,M,N,ratio", [(512, 4096, 4096, 0.05), (32, 2048, 512, 0.1),
                                         (256, 1024, 1024, 0.02)])
def test_recovers_the_cost_behind_the_data_on_unseen_shapes(cpu_data, B, M, N, ratio):
    k = round(ratio * N)
    expected = dense_ms(B, M, N, 1e11) / mebp_ms(B, M, N, k, 1e11)
    got = est.estimate(B, M, N, ratio, "unified", "cpu", grad="sparse", data=cpu_data)
    assert got.source.startswith("sweep: cpu test")
    assert ("extrapolated" in got.source) == (B * M * N > 256 * 1024 * 1024)  # largest in the data
    assert got.speedup == pytest.approx(expected, rel=0.02)
    assert est.estimate_speedup(B, M, N, k, "unified", "cpu", grad="sparse", data=cpu_data) == \
        pytest.approx(got.speedup)


def test_speedup_falls_as_k_grows(cpu_data):
    values = [est.estimate_speedup(512, 2048, 2048, r, data=cpu_data) for r in (0.005, 0.05, 0.2, 0.5)]
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
    assert gpu.speedup == pytest.approx(dense_ms(1024, 4096, 4096, 1e14) / mebp_ms(1024, 4096, 4096, k, 1e14),
                                        rel=0.02)


def test_other_dtype_falls_back_to_the_measured_one(cpu_data):
    a = est.estimate_speedup(256, 1024, 2048, 0.05, dtype=torch.float16, grad="sparse", data=cpu_data)
    b = est.estimate_speedup(256, 1024, 2048, 0.05, dtype=torch.float32, grad="sparse", data=cpu_data)
    assert a == b


def test_without_data_the_nominal_model_answers(tmp_path):
    empty = write_sweep(tmp_path / "empty.csv", "cpu x", rate=1e11, shapes=())
    small = est.estimate(2, 8, 8, 4, data=empty)
    big = est.estimate(1024, 8192, 8192, 0.01, device="cuda", data=empty)
    assert small.source == "nominal cpu model" and big.source == "nominal cuda model"
    assert small.speedup < 1 < big.speedup
    assert est.mebp_is_faster(1024, 8192, 8192, 0.01, device="cuda", data=empty)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch=0), "batch"), (dict(in_features=2.5), "in_features"), (dict(out_features=-1), "out_features"),
    (dict(k=0), "k=0"), (dict(k=1.5), "ratio"), (dict(k=300), "outside"), (dict(mode="rows"), "mode"),
    (dict(grad="coo"), "grad"), (dict(metric="forward"), "metric"), (dict(device="meta"), "device"),
    (dict(dtype=torch.int32), "dtype")])
def test_bad_input_is_named(cpu_data, kwargs, match):
    args = dict(batch=8, in_features=16, out_features=256, k=0.1, mode="unified", device="cpu",
                data=cpu_data) | kwargs
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
        csv.DictWriter(f, fieldnames=COLUMNS).writerow({c: "" for c in COLUMNS} | dict(
            kernel="copy", provider="torch", dtype="fp32", batch=1, in_features=8, out_features=8,
            k=0, metric="bandwidth", median_ms=1, q20_ms=1, q80_ms=1, gbps=20.0,
            device="cpu test (2 threads)", commit="c0", timestamp="t"))
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
    assert got < est.estimate_speedup(B, M, N, k, grad="sparse", data=write_sweep(
        tmp_path / "bwd.csv", "cpu test (2 threads)", rate=1e11))
