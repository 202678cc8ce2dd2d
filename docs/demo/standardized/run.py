"""The demo's main table on standardized inputs (the demo's default), without rerunning what is
already committed: the Adam rows of docs/demo/standardized-adam/ and -rowadam/ (same split, model,
seeds and epochs; 2 threads) are reused, the other rows of ``demo_configs()`` are trained here
(1 thread). Writes results.json, results.csv, table.md, table-accuracy.md (no timing columns)
and charts next to this file; ``--table-only`` rewrites table-accuracy.md from results.json.

    nice -n 10 python docs/demo/standardized/run.py
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))

import torch  # noqa: E402

from triton_mebp.app.cli import _meta  # noqa: E402
from triton_mebp.app.data import load_digits  # noqa: E402
from triton_mebp.app.report import format_table, write_report  # noqa: E402
from triton_mebp.app.train import add_comparisons, demo_configs, run_experiment  # noqa: E402

SEEDS = (0, 1, 2)
REUSED = ("standardized-adam", "standardized-rowadam")


def accuracy_table(summaries) -> str:
    """The table without the timing columns (the rows were timed on differently loaded machines)."""
    lines = [
        "| setting | test acc % (mean ± std) | vs dense (points) | hidden widths | params |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        gap = "baseline" if s["config"]["mode"] == "dense" else f"{s['gap_to_dense']:+.2f}"
        lines.append(
            f"| {s['label']} | {s['test_acc_mean']:.2f} ± {s['test_acc_std']:.2f} | {gap} | "
            f"{'/'.join(f'{w:.0f}' for w in s['widths_mean'])} | {s['params_mean']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    if sys.argv[1:] == ["--table-only"]:  # rewrite table-accuracy.md from results.json
        with open(os.path.join(HERE, "results.json")) as f:
            summaries = json.load(f)["table"]
        with open(os.path.join(HERE, "table-accuracy.md"), "w") as f:
            f.write(accuracy_table(summaries))
        return
    torch.set_num_threads(1)
    dataset = load_digits().standardized()
    main_configs, _ = demo_configs()
    reused = {}
    for folder in REUSED:
        with open(os.path.join(HERE, "..", folder, "results.json")) as f:
            saved = json.load(f)
        assert saved["meta"]["seeds"] == list(SEEDS), saved["meta"]
        for summary in saved["table"]:
            summary["reused_from"] = f"docs/demo/{folder}"
            reused[summary["label"]] = summary
    todo = [c for c in main_configs if c.label not in reused]
    for config in main_configs:
        if config.label in reused:
            assert reused[config.label]["config"]["epochs"] == config.epochs, config.label
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"training {[c.label for c in todo]}; reusing {sorted(reused)}", flush=True)
    trained = {
        s["label"]: s
        for s in run_experiment(todo, dataset, seeds=SEEDS, device="cpu", progress=False)
    }
    summaries = add_comparisons([trained.get(c.label) or reused[c.label] for c in main_configs])
    meta = _meta(dataset, torch.device("cpu"), SEEDS, started_at)
    meta["note"] = (
        "rows with 'reused_from' were trained earlier with 2 threads and are read from "
        "that folder; the others were trained by docs/demo/standardized/run.py"
    )
    write_report(HERE, summaries, meta=meta)
    with open(os.path.join(HERE, "table-accuracy.md"), "w") as f:
        f.write(accuracy_table(summaries))
    print(format_table(summaries))


if __name__ == "__main__":
    main()
