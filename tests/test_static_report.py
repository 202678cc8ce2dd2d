"""The static GPU report on the hot kernels of the unified backward, computed fresh (no GPU).

The unified path at the target shape (B = 4096, M = N = 8192, k = 410, bf16, sm_90), each kernel's
first config (the one used without tuning): no register spills, no scalar 2-byte loads of the
matrix tiles, tensor-core (wgmma) instructions in the products, whose dense operands come by TMA
(and by 16-byte cp.async in the pointer kernels, TRITON_MEBP_TMA=0). The v1 layout (an unpadded
dy_c of 410 columns) is compiled too, and must show the scalar loads the report is there to catch;
so are the products under autocast (bf16 dy_c and x, float32 W and dW), both kinds.

The inference kernels (the fused MLP at widths 128 and 256, three packed layers; the linear with
its epilogue), first config, every dtype, sm_90 and sm_80: no spills, tensor cores in 16-bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCTS = ("gathered_rows_matmul", "transposed_matmul_rows")
TMA_PRODUCTS = ("gathered_rows_matmul_tma", "transposed_matmul_rows_tma")
HOT = ("scores_bias_partial", "gather_padded", *TMA_PRODUCTS)


def _report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "static_report.py"), *args, "--json", "-"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rows():
    return _report(
        "--calls",
        "unified",
        "unified-pointer",
        "unified-v1",
        "unified-amp",
        "--kernels",
        *HOT,
        *PRODUCTS,
        "--dtypes",
        "bf16",
        "--ks",
        "410",
        "--targets",
        "90",
        "--first-config",
    )


@pytest.fixture(scope="module")
def inference_rows():
    return _report("--calls", "inference", "--ks", "410", "--first-config")


def _mine(rows, call, kernel):
    found = [r for r in rows if r["call"] == call and r["kernel"] == kernel]
    assert found, (call, kernel)
    return found


def test_every_hot_kernel_compiled(rows):
    assert all(r["ok"] for r in rows), [r["error"] for r in rows if not r["ok"]]
    assert {r["kernel"] for r in rows if r["call"] == "unified"} == set(HOT)
    assert all(r["triton"] and r["target"] == "sm_90" for r in rows)


def test_unified_kernels_do_not_spill(rows):
    for row in rows:
        if row["call"] in ("unified", "unified-pointer"):
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
            assert 0 < row["registers"] <= 255, row


def test_products_load_whole_aligned_tiles_on_tensor_cores(rows):
    for kernel in PRODUCTS:
        for row in _mine(rows, "unified-pointer", kernel):
            assert row["ld2"] == 0 and row["ld1"] == 0, row  # no scalar bf16 tile loads
            assert row["cp_async16"] > 0, row  # 16-byte async tile copies
            assert row["wgmma"] > 0, row
    for kernel in TMA_PRODUCTS:
        for row in _mine(rows, "unified", kernel):
            assert row["ld2"] == 0 and row["ld1"] == 0, row
            assert row["tma"] > 0, row  # dy_c (and x) tiles by TMA bulk copies
            assert row["wgmma"] > 0, row
    (dx,) = _mine(rows, "unified", "gathered_rows_matmul_tma")
    assert dx["cp_async16"] > 0, dx  # the gathered rows of W stay on cp.async


def test_autocast_products_stay_on_tensor_cores_without_spills(rows):
    """float32 master weights under bf16 autocast: the float32 tiles of W are cast to bf16 in
    the kernel, the products still multiply on tensor cores and do not spill."""
    for kernel in PRODUCTS + TMA_PRODUCTS:
        for row in _mine(rows, "unified-amp", kernel):
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
            assert row["ld2"] == 0 and row["ld1"] == 0, row
            assert row["wgmma"] > 0, row
            assert row["tma" if kernel in TMA_PRODUCTS else "cp_async16"] > 0, row


def test_score_pass_and_gather_move_vectors(rows):
    (scores,) = _mine(rows, "unified", "scores_bias_partial")
    assert scores["ld2"] == 0 and scores["ld16"] > 0, scores
    assert scores["programs_per_sm"] >= 4, scores  # fills an H100
    (gather,) = _mine(rows, "unified", "gather_padded")
    assert gather["st2"] == 0 and gather["st16"] > 0, gather  # aligned rows of dy_c


def test_the_report_sees_the_unpadded_layout(rows):
    # v1 at k = 410: the 820-byte rows of dy_c force scalar 2-byte loads and more registers.
    (v1,) = _mine(rows, "unified-v1", "gathered_rows_matmul")
    (v2,) = _mine(rows, "unified-pointer", "gathered_rows_matmul")
    assert v1["ld2"] > 0
    assert v2["registers"] < v1["registers"]


def test_product_grids_fill_an_h100(rows):
    # At k = 410 each product's grid gives every one of the 132 SMs a program, with the programs
    # resident per SM that shared memory and registers allow (split-K over B is not needed).
    for kernel in TMA_PRODUCTS:
        for row in _mine(rows, "unified", kernel):  # dW: into a dense gradient, and as rows
            assert row["programs"] >= 132 and row["waves"] >= 0.9, row


def test_occupancy_takes_the_tightest_limit():
    sys.path.insert(0, str(ROOT / "perf"))
    try:
        import static_report
    finally:
        sys.path.remove(str(ROOT / "perf"))
    smem_bound = static_report.occupancy(90, 264, 64, 4, 100 * 1024)  # 2 x 101 KB <= 228 KB
    assert smem_bound == dict(resident_per_sm=2, waves=1.0)
    # 255 registers round up to 256 per thread: 8 warps use 65536, the whole register file.
    assert static_report.occupancy(90, 132, 255, 8, 1024)["resident_per_sm"] == 1
    assert static_report.occupancy(90, 132, 32, 32, 1024)["resident_per_sm"] == 2  # 64 warps
    assert static_report.occupancy(80, 54, 32, 4, 100 * 1024) == dict(
        resident_per_sm=1, waves=0.5
    )  # A100: 164 KB of shared memory, 108 SMs


def test_inference_kernels_do_not_spill(inference_rows):
    assert inference_rows and all(r["ok"] for r in inference_rows), inference_rows
    for row in inference_rows:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        assert 0 < row["registers"] <= 255, row
    # the fused MLP at widths 128 and 256 in every dtype (fp32 without TF32 too), both targets
    fused = [r for r in inference_rows if r["kernel"] == "fused_mlp_kernel"]
    assert len(fused) == 2 * 3 * 2, [(r["dtype"], r["target"]) for r in fused]


def test_inference_kernels_use_tensor_cores_in_16_bit(inference_rows):
    for row in inference_rows:
        if row["dtype"] in ("bf16", "fp16"):
            if row["target"] == "sm_90":
                assert row["wgmma"] > 0, row
            else:
                assert row["mma_sync"] > 0, row
