"""The benchmark harness: its timer, the CSV schema and writer, the older layouts it reads."""

import csv
import time

import pytest
import torch

import triton_mebp
from triton_mebp.bench import harness

CPU = torch.device("cpu")


def read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_measure_times_known_durations_side_by_side():
    timings = harness.measure_side_by_side(
        {"short": lambda: time.sleep(0.002), "long": lambda: time.sleep(0.008)},
        CPU,
        min_run_time=0.1,
        rounds=2,
    )
    short, long = timings["short"], timings["long"]
    assert (
        1.9 <= short.median_ms <= 200 and 7.9 <= long.median_ms <= 400
    )  # a loaded machine oversleeps
    assert short.q20_ms <= short.median_ms <= short.q80_ms
    assert long.median_ms > short.median_ms
    single = harness.measure(lambda: time.sleep(0.004), CPU, min_run_time=0.05)
    assert 3.9 <= single.median_ms <= 200 and single.q20_ms <= single.median_ms <= single.q80_ms


def test_summarize_gives_median_and_quantiles():
    assert harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))


def test_written_rows_carry_the_environment_and_the_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_MEBP_COMMIT", "abc123")
    out = tmp_path / "r.csv"
    env = harness.environment(CPU)
    harness.write_rows([dict(kernel="layer", provider="dense", batch=2, median_ms="1.5")], out, env)
    fields, rows = read(out)
    assert fields == harness.COLUMNS
    (row,) = rows
    assert row["commit"] == "abc123" and row["device"].startswith("cpu ")
    assert row["torch"] == torch.__version__ and row["triton_mebp"] == triton_mebp.__version__
    assert row["timestamp"] and row["batch"] == "2" and row["median_ms"] == "1.5"
    with pytest.raises(ValueError, match="latency"):
        harness.write_rows([dict(kernel="layer", latency=3)], out)


def test_results_of_their_own_columns_get_the_environment_too(tmp_path):
    out = tmp_path / "acc.csv"
    harness.write_rows(
        [dict(variant="dense", value="98.2")],
        out,
        dict(device="d", commit="c"),
        columns=["variant", "value"],
    )
    fields, rows = read(out)
    assert fields == ["variant", "value", *harness.ENVIRONMENT]
    assert rows[0]["device"] == "d" and rows[0]["commit"] == "c" and rows[0]["timestamp"]


def test_sink_upgrades_an_older_sweep_file_and_appends(tmp_path):
    old_columns = [c for c in harness.COLUMNS if c not in ("shape", "triton_mebp")]
    out = tmp_path / "sweep-cpu.csv"
    old = {c: "" for c in old_columns} | dict(
        kernel="layer", provider="dense", batch="8", median_ms="2.5", commit="old", device="cpu x"
    )
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow(old)
    sink = harness.CsvSink(out, key=lambda r: (r["commit"], r["provider"]))
    assert sink.done == {("old", "dense")}
    sink.write([dict(kernel="layer", provider="mebp-torch", commit="new", device="cpu x")])
    fields, rows = read(out)
    assert fields == harness.COLUMNS
    assert [r["commit"] for r in rows] == ["old", "new"]
    assert rows[0]["median_ms"] == "2.5" and rows[0]["batch"] == "8" and rows[0]["shape"] == ""


def test_older_lstm_rows_read_in_the_schema(tmp_path):
    out = tmp_path / "lstm-cpu.csv"
    out.write_text(
        "kernel,provider,metric,dtype,seq,batch,input,hidden,layers,k,median_ms,q20_ms,"
        "q80_ms,device,torch,timestamp,commit\n"
        "lstm,mebp-unified,backward,float32,30,32,100,500,1,100,17.1,17.0,17.5,"
        "cpu (2 threads),2.13.0+cpu,2026-11-26T02:56:33+00:00,9234b727a848\n"
    )
    (row,) = harness.read_rows(out)
    assert (row["in_features"], row["out_features"], row["k"]) == ("100", "2000", "100")
    assert row["shape"] == "seq=30,hidden=500,layers=1" and row["dtype"] == "fp32"
    assert (
        row["mode"] == "unified" and row["median_ms"] == "17.1" and row["commit"] == "9234b727a848"
    )


def test_a_csv_of_another_kind_is_named(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv has other columns"):
        harness.CsvSink(other)
    assert harness.read_rows(tmp_path / "missing.csv") == []


def test_git_commit_of_a_worktree_reads_the_main_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_MEBP_COMMIT", raising=False)
    main = tmp_path / "main" / ".git"
    (main / "refs" / "heads").mkdir(parents=True)
    (main / "refs" / "heads" / "topic").write_text("0123456789abcdef\n")
    gitdir = main / "worktrees" / "wt"
    gitdir.mkdir(parents=True)
    (gitdir / "HEAD").write_text("ref: refs/heads/topic\n")
    (gitdir / "commondir").write_text("../..\n")
    checkout = tmp_path / "wt"
    checkout.mkdir()
    (checkout / ".git").write_text(f"gitdir: {gitdir}\n")
    assert harness.git_commit(checkout) == "0123456789ab"
