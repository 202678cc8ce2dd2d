"""Perf sweep and charts: timing, work counts, the CSV (columns, resuming), the PNGs."""

import csv
import time

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from triton_mebp.bench import plot, sweep

SHAPE = (6, 16, 24)  # batch, in, out
KS = (0.25,)  # k = 6 of 24


def run_sweep(out, *extra):
    args = [
        "--out",
        str(out),
        "--shapes",
        "x".join(map(str, SHAPE)),
        "--ks",
        ",".join(map(str, KS)),
        "--min-run-time",
        "0.01",
        "--rep-ms",
        "5",
        "--no-progress",
        "--device",
        DEVICE.type,
        "--dtypes",
        "fp32",
        "--no-lstm",
        *extra,
    ]
    assert sweep.main(args) == 0
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep.csv"
    return out, run_sweep(out)


def test_measure_times_a_known_duration():
    preset = sweep.Preset(shapes=(), ks=(), min_run_time=0.05)
    median, q20, q80 = sweep.measure(lambda: time.sleep(0.004), torch.device("cpu"), preset)
    assert 3.9 <= median <= 200.0  # milliseconds (a loaded machine oversleeps)
    assert q20 <= median <= q80


def test_work_counts_by_hand():
    # B=2, M=3, N=5, k=2, 4-byte elements
    assert sweep.work("layer", "backward", "", 2, 3, 5, 5, 4) == (120.0, 4 * (10 + 12 + 30))
    assert sweep.work("layer", "backward", "unified", 2, 3, 5, 2, 4, "sparse") == (
        48.0,
        4 * (10 + 12 + 6 + 6),
    )
    assert sweep.work("layer", "backward", "unified", 2, 3, 5, 2, 4, "dense") == (
        48.0,
        4 * (10 + 12 + 6 + 15),
    )
    assert sweep.work("layer", "forward", "", 2, 3, 5, 5, 2) == (60.0, 2 * (6 + 15 + 10))
    assert sweep.work("select", "time", "unified", 2, 3, 5, 2, 4) == (10.0, 4 * (10 + 4))
    # per example: B*k = 4 selections reach at most 4 distinct rows of W
    assert sweep.work("input_grad", "time", "per_example", 2, 3, 5, 2, 4) == (
        24.0,
        4 * (4 + 12 + 6),
    )
    assert sweep.work("update", "time", "unified", 2, 3, 5, 2, 4) == (12.0, 4 * 18)
    assert sweep.work("reduced_gemm", "time", "unified", 2, 3, 5, 2, 4) == (24.0, 4 * (4 + 6 + 6))


def test_sweep_rows_cover_providers_metrics_and_kernels(swept):
    _, rows = swept
    B, M, N = SHAPE
    k = round(KS[0] * N)
    providers = {"dense", "mebp-torch"} | ({"mebp-triton"} if HAS_CUDA else set())
    assert {r["provider"] for r in rows if r["kernel"] == "layer"} == providers
    for provider in providers:
        modes = {""} if provider == "dense" else {"unified", "per_example"}
        for mode in modes:
            mine = [r for r in rows if r["provider"] == provider and r["mode"] == mode]
            layer = {r["metric"] for r in mine if r["kernel"] == "layer"}
            assert {"forward", "backward", "step-sgd"} <= layer, (provider, mode, layer)
            kernels = {r["kernel"] for r in mine if r["kernel"] != "layer"}
            expected = {"input_grad", "weight_grad", "update"} | ({"select"} if mode else set())
            if mode == "unified":
                expected.add("reduced_gemm")
            assert kernels == expected, (provider, mode, kernels)
    for r in rows:
        assert list(r) == sweep.COLUMNS
        assert r["device"] and r["torch"] == torch.__version__ and r["commit"] and r["timestamp"]
        median, q20, q80 = float(r["median_ms"]), float(r["q20_ms"]), float(r["q80_ms"])
        assert 0 < q20 <= median <= q80
    backward = [r for r in rows if r["kernel"] == "layer" and r["metric"] == "backward"]
    for r in backward:
        kept = N if r["provider"] == "dense" else k
        assert int(r["k"]) == kept
        expected_tflops = 4.0 * B * kept * M / (float(r["median_ms"]) * 1e-3) / 1e12
        assert float(r["tflops"]) == pytest.approx(expected_tflops, rel=1e-4)


def test_ceilings_are_measured(swept):
    _, rows = swept
    copy = [r for r in rows if r["kernel"] == "copy"]
    matmul = [r for r in rows if r["kernel"] == "matmul"]
    assert len(copy) == 1 and len(matmul) == 1
    moved = 2 * int(copy[0]["in_features"]) * 4
    assert float(copy[0]["gbps"]) == pytest.approx(
        moved / float(copy[0]["median_ms"]) / 1e6, rel=1e-4
    )
    n = int(matmul[0]["batch"])
    assert float(matmul[0]["tflops"]) == pytest.approx(
        2 * n**3 / float(matmul[0]["median_ms"]) / 1e9, rel=1e-4
    )


def test_config_column_names_the_chosen_autotune_config(swept):
    _, rows = swept
    kernel_rows = [r for r in rows if r["kernel"] in sweep.KERNELS]
    triton_rows = [r for r in kernel_rows if r["provider"] == "mebp-triton"]
    assert bool(triton_rows) == HAS_CUDA
    for r in kernel_rows:
        if r["provider"] == "mebp-triton":
            assert "warps=" in r["config"], r
        else:  # PyTorch ops have no autotune config
            assert r["config"] == "", r


def test_sweep_resumes_and_only_adds_what_is_missing(tmp_path, monkeypatch):
    out = tmp_path / "resume.csv"
    common = ["--no-ceilings", "--modes", "unified", "--providers", "dense,mebp-torch"]
    first = run_sweep(out, *common)
    again = run_sweep(out, *common)
    assert again == first
    more = run_sweep(out, *common, "--ks", "0.25,0.5")
    added = more[len(first) :]
    assert added and {r["k"] for r in added} == {"12"}
    monkeypatch.setenv("TRITON_MEBP_COMMIT", "another")
    other = run_sweep(out, *common)
    assert {r["commit"] for r in other[len(more) :]} == {"another"}
    assert len(other) - len(more) == len(first)


def test_git_commit_is_read_without_git(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_MEBP_COMMIT", raising=False)
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "refs" / "heads" / "main").write_text("0123456789abcdef0123\n")
    assert sweep.git_commit(repo / "sub") == "0123456789ab"
    (repo / ".git" / "refs" / "heads" / "main").unlink()
    (repo / ".git" / "packed-refs").write_text(
        "# pack-refs\nfedcba9876543210aaaa refs/heads/main\n"
    )
    assert sweep.git_commit(repo) == "fedcba987654"
    (repo / ".git" / "HEAD").write_text("aaaabbbbccccdddd\n")
    assert sweep.git_commit(repo) == "aaaabbbbcccc"


@pytest.mark.parametrize(
    "argv",
    [
        ["--shapes", "4x8"],
        ["--shapes", "0x8x8"],
        ["--ks", "0"],
        ["--ks", "1.5"],
        ["--modes", "both"],
        ["--providers", "cublas"],
    ],
)
def test_bad_arguments_are_refused(argv, tmp_path):
    with pytest.raises(SystemExit) as info:
        sweep.main(["--out", str(tmp_path / "x.csv"), *argv])
    assert info.value.code == 2
    assert not (tmp_path / "x.csv").exists()


def test_cpu_sweep_refuses_half_precision_and_unknown_devices(tmp_path, capsys):
    assert (
        sweep.main(["--device", "cpu", "--dtypes", "bf16", "--out", str(tmp_path / "x.csv")]) == 2
    )
    assert "fp32 only" in capsys.readouterr().err
    assert sweep.main(["--device", "tpu9", "--out", str(tmp_path / "x.csv")]) == 2
    assert "cpu or cuda" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_csv_with_other_columns_is_refused(tmp_path):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other columns"):
        sweep.main(["--out", str(out), "--device", "cpu", "--no-progress"])


def _row(provider, mode, k, metric, median, q20, q80):
    return dict(
        kernel="layer",
        provider=provider,
        mode=mode,
        grad="sparse",
        dtype="fp32",
        batch="8",
        in_features="16",
        out_features="100",
        k=str(k),
        metric=metric,
        median_ms=str(median),
        q20_ms=str(q20),
        q80_ms=str(q80),
    )


def test_speedups_divide_dense_by_mebp_with_quantile_band():
    rows = [
        _row("dense", "", 100, "backward", 10, 9, 11),
        _row("mebp-torch", "unified", 5, "backward", 2, 1.5, 2.5),
        _row("mebp-torch", "unified", 20, "backward", 4, 4, 4),
        _row("mebp-torch", "unified", 5, "forward", 1, 1, 1),
    ]
    curves = plot.speedups(rows, "backward")
    assert list(curves) == [((8, 16, 100), "fp32", "mebp-torch", "unified", "sparse")]
    (r1, s1, lo1, hi1), (r2, s2, _, _) = next(iter(curves.values()))
    assert (r1, r2) == (0.05, 0.2)
    assert (s1, lo1, hi1) == pytest.approx((5.0, 9 / 2.5, 11 / 1.5))
    assert s2 == pytest.approx(2.5)


def test_plot_writes_three_readable_charts(swept, tmp_path):
    import matplotlib.image

    out, _ = swept
    assert plot.main([str(out), "--out", str(tmp_path)]) == 0
    slug = "cpu" if not HAS_CUDA else sweep.device_slug(DEVICE)
    for kind in ("speedup", "breakdown", "roofline"):
        image = matplotlib.image.imread(tmp_path / f"{kind}-{slug}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image.std() > 0.01  # something was drawn


def test_plot_without_data_fails_clearly(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing.csv"), "--out", str(tmp_path)]) == 2
    assert "no sweep CSV" in capsys.readouterr().err


def test_a_failing_measurement_is_reported_and_the_rest_recorded(tmp_path, monkeypatch, capsys):
    real = sweep._kernel_closures

    def with_a_broken_kernel(task, device):
        closures = real(task, device)
        if task.provider == "mebp-torch":
            closures["input_grad"] = lambda: 1 / 0
        return closures

    monkeypatch.setattr(sweep, "_kernel_closures", with_a_broken_kernel)
    out = tmp_path / "broken.csv"
    args = [
        "--out",
        str(out),
        "--shapes",
        "4x8x16",
        "--ks",
        "0.25",
        "--min-run-time",
        "0.01",
        "--no-progress",
        "--no-ceilings",
        "--no-lstm",
        "--device",
        "cpu",
        "--modes",
        "unified",
    ]
    assert sweep.main(args) == 1
    assert (
        "FAILED mebp-torch unified sparse fp32 4x8x16 k=4 input_grad: ZeroDivisionError"
        in capsys.readouterr().err
    )
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    mebp = {(r["kernel"], r["metric"]) for r in rows if r["provider"] == "mebp-torch"}
    assert ("input_grad", "time") not in mebp
    assert {("layer", "backward"), ("select", "time"), ("weight_grad", "time")} <= mebp


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("grad", ["sparse", "dense"])
def test_triton_provider_times_every_kernel_and_names_its_config(mode, grad):
    # On a GPU this is the compiled path; without one, the kernels run in the interpreter.
    task = sweep.Task("mebp-triton", mode, grad, "fp32", 3, 8, 16, 4)
    preset = sweep.Preset(shapes=(), ks=(), min_run_time=0.001, rep_ms=5, warmup_ms=1)
    env = dict(device="d", torch="t", triton="t", commit="c", timestamp="")
    rows, failures = sweep.run_task(task, DEVICE, preset, env)
    assert failures == []
    kernels = {r["kernel"]: r for r in rows if r["kernel"] in sweep.KERNELS}
    others = {r["kernel"] for r in rows if r["kernel"] not in sweep.KERNELS + ("layer",)}
    assert set(kernels) == set(sweep.KERNELS)
    assert others == ({"reduced_gemm"} if mode == "unified" else set())
    for r in kernels.values():
        assert "warps=" in r["config"] and float(r["median_ms"]) > 0
    assert kernels["select"]["config"].count("[") == (4 if mode == "unified" else 1)
    assert {r["metric"] for r in rows if r["kernel"] == "layer"} >= {
        "forward",
        "backward",
        "step-sgd",
    }


def test_threads_option_is_recorded_and_restored(tmp_path):
    before = torch.get_num_threads()
    out = tmp_path / "threads.csv"
    assert (
        sweep.main(
            [
                "--device",
                "cpu",
                "--threads",
                "1",
                "--out",
                str(out),
                "--shapes",
                "4x8x16",
                "--ks",
                "0.5",
                "--modes",
                "unified",
                "--no-ceilings",
                "--no-lstm",
                "--no-progress",
                "--min-run-time",
                "0.01",
            ]
        )
        == 0
    )
    assert torch.get_num_threads() == before
    with open(out, newline="") as f:
        assert {r["device"].endswith("(1 threads)") for r in csv.DictReader(f)} == {True}
    assert sweep.main(["--device", "cpu", "--threads", "0", "--out", str(out)]) == 2


def test_plot_skips_csv_files_of_another_kind(swept, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("name,value\na,1\n")
    out, _ = swept
    assert plot.main([str(other), str(out), "--out", str(tmp_path / "charts")]) == 0
    assert "other.csv is not a sweep CSV" in capsys.readouterr().err
    assert len(list((tmp_path / "charts").glob("*.png"))) == 3
    assert plot.main([str(other), "--out", str(tmp_path / "charts2")]) == 2


def test_lstm_section_times_melstm_against_nn_lstm_once_per_commit(tmp_path):
    preset = sweep.Preset(
        shapes=(), ks=(), min_run_time=0.01, rep_ms=5, warmup_ms=1, lstm=(3, 4, 8, 16, 0.25)
    )
    env = dict(device="d", torch="t", triton="t", commit="c1", timestamp="")
    out = tmp_path / "lstm-cpu.csv"
    assert sweep.run_lstm_section(preset, torch.device("cpu"), out, env, fresh=False) == []
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    backward = {r["provider"]: r for r in rows if r["metric"] == "backward"}
    assert {"nn.LSTM", "mebp-unified", "mebp-per_example"} <= set(backward)
    assert backward["mebp-unified"]["k"] == "16" and backward["nn.LSTM"]["k"] == "64"
    assert all(float(r["median_ms"]) > 0 and r["commit"] == "c1" for r in rows)
    assert sweep.run_lstm_section(preset, torch.device("cpu"), out, env, fresh=False) == []
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)  # already measured for this commit


OPS = (
    "unified_select",
    "per_example_select",
    "gathered_input_grad",
    "gathered_weight_grad",
    "per_example_input_grad",
    "per_example_weight_grad",
    "row_sgd_step",
)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the PyTorch backend's operations, wrapped where the library finds them."""
    from triton_mebp import torch_ops

    calls = {}
    for name in OPS:
        real = getattr(torch_ops, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch_ops, name, counted)
    return calls


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_sweep_rows_time_the_backend_ops_the_library_calls(mode, op_calls, monkeypatch):
    ran, called = [], {}  # called: (kernel, metric) of a row -> the ops its timed closure ran

    def measure(fn, device, preset):
        op_calls.clear()
        fn()
        ran[:] = [set(op_calls)]
        return sweep.Timing(1.0, 1.0, 1.0)

    real_row = sweep._row

    def row(task, env, kernel, metric, timing, config=""):
        called[kernel, metric] = ran[0]
        return real_row(task, env, kernel, metric, timing, config)

    monkeypatch.setattr(sweep, "measure", measure)
    monkeypatch.setattr(sweep, "_row", row)
    task = sweep.Task("mebp-torch", mode, "sparse", "fp32", 6, 16, 24, 6)
    preset = sweep.Preset(shapes=(), ks=(), min_run_time=0.001)
    env = dict(device="d", torch="t", triton="t", commit="c", timestamp="")
    rows, failures = sweep.run_task(task, torch.device("cpu"), preset, env)
    assert failures == [] and rows
    select = "unified_select" if mode == "unified" else "per_example_select"
    products = (
        {"gathered_input_grad", "gathered_weight_grad"}
        if mode == "unified"
        else {"per_example_input_grad", "per_example_weight_grad"}
    )
    assert called[("layer", "backward")] == {select} | products
    assert called[("layer", "forward")] == set()
    assert {select} | products <= called[("layer", "step-sgd")]
    input_grad, weight_grad = sorted(products)
    assert called[("select", "time")] == {select}
    assert called[("input_grad", "time")] == {input_grad}
    assert called[("weight_grad", "time")] == {weight_grad}
    assert called[("update", "time")] == {"row_sgd_step"}


def test_lstm_rows_time_the_backend_ops_melstm_calls(op_calls, monkeypatch):
    from triton_mebp.bench import harness, lstm

    called = {}  # (metric, provider) -> the ops one call of its timed closure ran
    metrics = iter(("forward", "backward", "products"))

    def side_by_side(fns, device, **kwargs):
        metric = next(metrics)
        for name, fn in fns.items():
            op_calls.clear()
            fn()
            called[metric, name] = set(op_calls)
        return {name: harness.Timing(1.0, 1.0, 1.0) for name in fns}

    monkeypatch.setattr(harness, "measure_side_by_side", side_by_side)
    rows = lstm.run(seq=3, batch=4, n_in=8, hidden=16, k=0.25, device="cpu")
    assert {(r["metric"], r["provider"]) for r in rows} == set(called)
    unified = {"unified_select", "gathered_input_grad"}
    per_example = {"per_example_select", "per_example_input_grad", "per_example_weight_grad"}
    for metric in ("backward", "products"):
        assert unified <= called[metric, "mebp-unified"], metric
        assert called[metric, "mebp-per_example"] == per_example, metric
    assert called["forward", "mebp-unified"] == set() and called["backward", "nn.LSTM"] == set()


def test_compiled_step_is_timed_for_dense_and_mebp(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sweep, "COMPILE_BACKEND", "aot_eager"
    )  # the capture, without code generation
    rows = run_sweep(
        tmp_path / "compiled.csv",
        "--no-ceilings",
        "--modes",
        "unified",
        "--providers",
        "dense,mebp-torch",
        "--compiled-ks",
        "0.25",
    )
    compiled = {r["provider"] for r in rows if r["metric"] == "step-sgd-compiled"}
    assert compiled == {"dense", "mebp-torch"}
    assert not any(
        r["metric"] == "step-sgd-compiled"
        for r in run_sweep(
            tmp_path / "plain.csv",
            "--no-ceilings",
            "--modes",
            "unified",
            "--compiled-ks",
            "0.25",
            "--no-compiled",
        )
    )
