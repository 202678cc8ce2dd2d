"""Summarises runs.jsonl (written by run.py) into summary.csv and table.md next to this file,
the last step of drift.csv (drift.py) into drift.md and lstm_runs.jsonl (lstm.py) into lstm.md.

    python docs/fidelity/table.py
"""

import collections
import csv
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs.jsonl")
FIELDS = (
    "setting",
    "mode",
    "k",
    "optimizer",
    "extra",
    "seeds",
    "test_acc_mean",
    "test_acc_std",
    "gap_to_dense",
    "last_epoch_test_acc_mean",
    "best_epoch_mean",
    "held_out_acc_mean",
    "widths",
    "backward_s_per_epoch",
)
BASELINE = {"adam": "adam", "rowadam": "adam", "adagrad": "adagrad"}  # RowAdam on dense = Adam


def _extra(config):
    parts = []
    if config.get("row_scale"):
        parts.append("rows / examples that selected them")
    if config.get("step_scale"):
        parts.append("row steps × fraction of examples that selected them")
    if config.get("activation", "relu") != "relu":
        parts.append(config["activation"])
    if config.get("clip"):
        parts.append(f"clip ±{config['clip']:g}")
    if config.get("simplify"):
        parts.append(f"meSimp (threshold {config['threshold']:g})")
    return ", ".join(parts)


def _setting(config):
    k = (
        ""
        if config["mode"] == "dense"
        else f" k={round(config['k'] * config['hidden'])} ({config['k']:.0%})"
    )
    extra = _extra(config)
    return f"{config['mode'].replace('_', '-')}{k}, {config['optimizer']}" + (
        f", {extra}" if extra else ""
    )


def _mean_std(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(path=RUNS):
    groups = collections.OrderedDict()
    with open(path) as f:
        for line in f:
            run = json.loads(line)
            groups.setdefault(_setting(run["config"]), []).append(run)
    rows = []
    for setting, runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        config = runs[0]["config"]
        mean, std = _mean_std([r["test_acc"] for r in runs])
        rows.append(
            dict(
                setting=setting,
                mode=config["mode"],
                k="" if config["mode"] == "dense" else config["k"],
                optimizer=config["optimizer"],
                extra=_extra(config),
                seeds=" ".join(str(r["seed"]) for r in runs),
                test_acc_mean=mean,
                test_acc_std=std,
                last_epoch_test_acc_mean=statistics.fmean(r["last_test_acc"] for r in runs),
                best_epoch_mean=statistics.fmean(r["best_epoch"] for r in runs),
                held_out_acc_mean=statistics.fmean(r["held_out_acc"] for r in runs),
                widths="/".join(
                    f"{statistics.fmean(w):.0f}" for w in zip(*(r["widths"] for r in runs))
                ),
                backward_s_per_epoch=statistics.fmean(r["backward_s_per_epoch"] for r in runs),
            )
        )
    dense = {(r["optimizer"], "tanh" in r["extra"]): r for r in rows if r["mode"] == "dense"}
    for row in rows:  # against dense with the same optimizer (RowAdam: Adam) and activation
        base = dense.get((BASELINE[row["optimizer"]], "tanh" in row["extra"]))
        row["gap_to_dense"] = (
            None
            if base is None or row["mode"] == "dense"
            else row["test_acc_mean"] - base["test_acc_mean"]
        )
    order = {"dense": 0, "unified": 1, "per_example": 2}
    rows.sort(
        key=lambda r: (
            BASELINE[r["optimizer"]],
            "tanh" in r["extra"],
            r["optimizer"],
            r["k"] or 0,
            order[r["mode"]],
            r["extra"],
        )
    )
    return rows


def main():
    rows = summarise()
    with open(os.path.join(HERE, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| setting | seeds | test acc % at best held-out epoch | vs dense | test acc % at last "
        "epoch | best epoch (mean) | hidden widths |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = (
            "baseline"
            if r["mode"] == "dense"
            else "n/a"
            if r["gap_to_dense"] is None
            else f"{r['gap_to_dense']:+.2f}"
        )
        lines.append(
            f"| {r['setting']} | {r['seeds']} | {r['test_acc_mean']:.2f} ± "
            f"{r['test_acc_std']:.2f} | {gap} | {r['last_epoch_test_acc_mean']:.2f} | "
            f"{r['best_epoch_mean']:.1f} | {r['widths']} |"
        )
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    drift = os.path.join(HERE, "drift.csv")
    if os.path.exists(drift):  # drift.py's last step, as a table
        with open(drift) as f:
            rows = list(csv.DictReader(f))
        last = max(int(r["step"]) for r in rows)
        lines = [
            f"| {r['setting']} | {float(r['loss']):.3f} | {float(r['h1_mean']):.2f} | "
            f"{100 * float(r['h1_active']):.0f}% | {float(r['h2_mean']):.2f} | "
            f"{float(r['logit_absmax']):.0f} |"
            for r in rows
            if int(r["step"]) == last
        ]
        with open(os.path.join(HERE, "drift.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    lstm = os.path.join(HERE, "lstm_runs.jsonl")
    if os.path.exists(lstm):  # lstm.py's runs, one row each
        with open(lstm) as f:
            runs = [json.loads(line) for line in f]
        lines = [
            "| LSTM tagger | seed | test acc % at best held-out epoch | best epoch | test acc % at "
            "last epoch |",
            "|---|---|---|---|---|",
        ]
        for r in runs:
            k = "" if r["mode"] == "dense" else f" k={r['k']} of 2000 gates"
            lines.append(
                f"| {r['mode'].replace('_', '-')}{k}, {r['optimizer']}, {r['epochs_run']} "
                f"epochs | {r['seed']} | {r['test_accuracy']:.2f} | {r['best_epoch']} | "
                f"{r['last_test_accuracy']:.2f} |"
            )
        with open(os.path.join(HERE, "lstm.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
