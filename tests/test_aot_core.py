"""Every core kernel with every autotune config compiles for sm_90 and sm_80 (no GPU needed).

bf16, the main GPU training dtype, compiles every config; fp32 and fp16 compile the first config
(their own code paths) and, for the matrix products, every config the pruner keeps for them, as
does autocast's mixed case (bf16 ``dy_c`` with float32 W rows or x, cast to bf16 in the kernel).
The products' TMA variants, which the launchers take on Hopper only, compile for sm_90.
"""

import pytest
import torch

from aot import check_results, compile_specs, config_indices
from triton_mebp.kernels import gathered

SEL = "triton_mebp.kernels.selection"
GAT = "triton_mebp.kernels.gathered"
STREAM_DTYPES = ("fp32", "bf16")
# (dy_c, the other operand): the same dtype, or autocast's bf16 with float32 master weights / x
DOT_DTYPES = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32"))


def _dot_label(dt, other):
    return f"dot-{dt}" if dt == other else f"dot-{dt}-{other}"


def _specs():
    specs = []
    for dt in STREAM_DTYPES:
        specs += [
            dict(
                kernel=f"{SEL}:column_scores",
                label=dt,
                signature={
                    "dy_ptr": f"*{dt}",
                    "scores_ptr": "*fp32",
                    "B": "i32",
                    "N": "i32",
                    "stride_b": "i32",
                    "stride_n": "i32",
                },
            ),
            dict(
                kernel=f"{SEL}:gather_columns",
                label=dt,
                signature={
                    "dy_ptr": f"*{dt}",
                    "idx_ptr": "*i64",
                    "out_ptr": f"*{dt}",
                    "B": "i32",
                    "K": "i32",
                    "stride_b": "i32",
                    "stride_n": "i32",
                },
            ),
            dict(
                kernel=f"{SEL}:per_example_select_rows",
                label=dt,
                signature={
                    "dy_ptr": f"*{dt}",
                    "val_ptr": f"*{dt}",
                    "idx_ptr": "*i64",
                    "hits_ptr": "*i64",
                    "N": "i32",
                    "k": "i32",
                    "stride_b": "i32",
                    "stride_n": "i32",
                },
                constexprs={"COUNT_HITS": True},
            ),
            dict(
                kernel=f"{GAT}:per_example_dx",
                label=dt,
                signature={
                    "v_ptr": f"*{dt}",
                    "i_ptr": "*i64",
                    "w_ptr": f"*{dt}",
                    "dx_ptr": f"*{dt}",
                    "M": "i32",
                    "K": "i32",
                    "stride_wn": "i32",
                    "stride_wm": "i32",
                    "stride_xb": "i32",
                    "stride_xm": "i32",
                },
            ),
            dict(
                kernel=f"{GAT}:segment_rows",
                label=dt,
                signature={
                    "seg_ptr": "*i64",
                    "example_ptr": "*i64",
                    "value_ptr": f"*{dt}",
                    "x_ptr": f"*{dt}",
                    "out_ptr": f"*{dt}",
                    "M": "i32",
                    "stride_xb": "i32",
                    "stride_xm": "i32",
                    "stride_on": "i32",
                    "stride_om": "i32",
                },
            ),
        ]
    for dt, passes in (("fp32", 4), ("fp16", 3), ("bf16", 2)):
        specs.append(
            dict(
                kernel=f"{SEL}:per_example_top",
                label=dt,
                signature={
                    "dy_ptr": f"*{dt}",
                    "val_ptr": f"*{dt}",
                    "idx_ptr": "*i64",
                    "hits_ptr": "*i64",
                    "N": "i32",
                    "k": "i32",
                    "stride_b": "i32",
                    "stride_n": "i32",
                },
                constexprs={"COUNT_HITS": True, "PASSES": passes},
            )
        )
    for dt in STREAM_DTYPES:
        specs += [
            dict(
                kernel=f"{SEL}:scores_bias_partial",
                label=dt,
                signature={
                    "dy_ptr": f"*{dt}",
                    "part_ptr": "*fp32",
                    "B": "i32",
                    "N": "i32",
                    "stride_b": "i32",
                    "stride_n": "i32",
                    "ROWS_PER_CHUNK": "i32",
                },
            ),
            dict(
                kernel=f"{SEL}:scores_bias_finish",
                label=dt,
                signature={
                    "part_ptr": "*fp32",
                    "scores_ptr": "*fp32",
                    "db_ptr": f"*{dt}",
                    "N": "i32",
                    "CHUNKS": "i32",
                },
            ),
            dict(
                kernel=f"{SEL}:gather_padded",
                label=dt,
                signature={
                    "dy_ptr": f"*{dt}",
                    "idx_ptr": "*i64",
                    "out_ptr": f"*{dt}",
                    "B": "i32",
                    "K": "i32",
                    "K_PAD": "i32",
                    "stride_b": "i32",
                    "stride_n": "i32",
                },
            ),
        ]
    for count in (True, False):
        specs.append(
            dict(
                kernel=f"{SEL}:unified_select_row",
                label=f"hits={count}",
                signature={
                    "scores_ptr": "*fp32",
                    "idx_ptr": "*i64",
                    "hits_ptr": "*i64",
                    "N": "i32",
                    "k": "i32",
                    "hit_increment": "i32",
                },
                constexprs={"COUNT_HITS": count},
            )
        )
        specs.append(
            dict(
                kernel=f"{SEL}:unified_top",
                label=f"hits={count}",
                signature={
                    "scores_ptr": "*fp32",
                    "idx_ptr": "*i64",
                    "hits_ptr": "*i64",
                    "N": "i32",
                    "k": "i32",
                    "hit_increment": "i32",
                },
                constexprs={"COUNT_HITS": count},
            )
        )
    for dt, other in DOT_DTYPES:
        precision = "tf32" if dt == "fp32" else "ieee"
        common = {"B": "i32", "M": "i32", "K": "i32", "K_VALID": "i32", "B_BUCKET": "i32"}
        specs += [
            dict(
                kernel=f"{GAT}:gathered_rows_matmul",
                label=_dot_label(dt, other),
                signature={
                    "a_ptr": f"*{dt}",
                    "w_ptr": f"*{other}",
                    "idx_ptr": "*i64",
                    "c_ptr": f"*{dt}",
                    **common,
                    **{
                        s: "i32"
                        for s in (
                            "stride_ab",
                            "stride_ak",
                            "stride_wn",
                            "stride_wm",
                            "stride_cb",
                            "stride_cm",
                        )
                    },
                },
                constexprs={"INPUT_PRECISION": precision},
            ),
            dict(
                kernel=f"{GAT}:transposed_matmul_rows",
                label=_dot_label(dt, other),
                signature={
                    "a_ptr": f"*{dt}",
                    "x_ptr": f"*{other}",
                    "idx_ptr": "*i64",
                    "out_ptr": f"*{other}",  # dW: the weight's dtype
                    **common,
                    **{
                        s: "i32"
                        for s in (
                            "stride_ab",
                            "stride_ak",
                            "stride_xb",
                            "stride_xm",
                            "stride_on",
                            "stride_om",
                        )
                    },
                },
                constexprs={"INPUT_PRECISION": precision, "SCATTER": dt != "fp16"},
            ),
        ]
    # The TMA variants, taken for 16-bit dy_c on Hopper only: descriptors of the config's blocks.
    for dt, other in DOT_DTYPES:
        if dt == "fp32":
            continue
        common = {"B": "i32", "M": "i32", "K": "i32", "K_VALID": "i32", "B_BUCKET": "i32"}
        specs += [
            dict(
                kernel=f"{GAT}:gathered_rows_matmul_tma",
                label=_dot_label(dt, other),
                signature={
                    "a_desc": f"tensordesc<{dt}[{{BLOCK_B}}, {{BLOCK_K}}]>",
                    "w_ptr": f"*{other}",
                    "idx_ptr": "*i64",
                    "c_ptr": f"*{dt}",
                    **common,
                    **{s: "i32" for s in ("stride_wn", "stride_wm", "stride_cb", "stride_cm")},
                },
                constexprs={"INPUT_PRECISION": "ieee"},
                targets=[90],
            ),
            dict(
                kernel=f"{GAT}:transposed_matmul_rows_tma",
                label=_dot_label(dt, other),
                signature={
                    "a_desc": f"tensordesc<{dt}[{{BLOCK_B}}, {{BLOCK_K}}]>",
                    "x_desc": f"tensordesc<{other}[{{BLOCK_B}}, {{BLOCK_M}}]>",
                    "idx_ptr": "*i64",
                    "out_ptr": f"*{other}",
                    **common,
                    "stride_on": "i32",
                    "stride_om": "i32",
                },
                constexprs={"INPUT_PRECISION": "ieee", "SCATTER": dt != "fp16"},
                targets=[90],
            ),
        ]
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for spec in specs:
        dt, *other = spec["label"].replace("dot-", "").split("-")
        name = spec["kernel"].split(":")[1]
        if name.startswith(("gathered_rows_matmul", "transposed_matmul_rows")):
            kernel = getattr(gathered, name)
            operand = "w_ptr" if name.startswith("gathered_rows_matmul") else "x_ptr"
            large = {
                "a_ptr": torch.empty(0, dtype=torch_dtypes[dt]),
                operand: torch.empty(0, dtype=torch_dtypes[(other or [dt])[0]]),
                "B": 4096,
                "M": 8192,
                "K": 4096,
            }
            spec["configs"] = config_indices(kernel, large)
        elif (dt != "bf16" and not spec["label"].startswith("hits")) or spec[
            "label"
        ] == "hits=False":
            spec["configs"] = [0]
    # The split search of wide unified selections: every config (scores are float32 whatever dy).
    for pass_ in (0, 3):
        specs += [
            dict(
                kernel=f"{SEL}:slice_histogram",
                label=f"pass={pass_}",
                signature={
                    "scores_ptr": "*fp32",
                    "state_ptr": "*i32",
                    "part_ptr": "*i32",
                    "N": "i32",
                    "SLICE": "i32",
                },
                constexprs={"PASS": pass_},
            ),
            dict(
                kernel=f"{SEL}:slice_digit",
                label=f"pass={pass_}",
                signature={
                    "part_ptr": "*i32",
                    "state_ptr": "*i32",
                    "slices_ptr": "*i32",
                    "k": "i32",
                    "PROGRAMS": "i32",
                },
                constexprs={"PASS": pass_},
            ),
        ]
    for count in (True, False):
        specs.append(
            dict(
                kernel=f"{SEL}:slice_compact",
                label=f"hits={count}",
                signature={
                    "scores_ptr": "*fp32",
                    "state_ptr": "*i32",
                    "slices_ptr": "*i32",
                    "idx_ptr": "*i64",
                    "hits_ptr": "*i64",
                    "N": "i32",
                    "SLICE": "i32",
                    "hit_increment": "i32",
                },
                constexprs={"COUNT_HITS": count},
                **({} if count else {"configs": [0]}),
            )
        )
    return specs


@pytest.fixture(scope="module")
def results():
    return compile_specs(_specs())


def test_every_config_compiles_for_hopper_and_ampere(results):
    kernels = {s["kernel"] for s in _specs()}
    assert {r["kernel"] for r in results} == kernels
    check_results(results)


def test_half_precision_products_use_tensor_cores(results):
    for kernel in (
        "gathered_rows_matmul",
        "transposed_matmul_rows",
        "gathered_rows_matmul_tma",  # compiled for sm_90 only
        "transposed_matmul_rows_tma",
    ):
        for label in ("dot-fp16", "dot-bf16", "dot-bf16-fp32"):
            mine = [r for r in results if r["kernel"].endswith(kernel) and r["label"] == label]
            assert mine and any(r["wgmma"] for r in mine if r["target"] == 90), (kernel, label)
            assert all(r["mma"] for r in mine if r["target"] == 80), (kernel, label)
